//! `broker probe` against real peers: exit 0 only when the real broker answers that it is
//! serving (the probe's deadline header included: the broker strips it); a broker that is stopping or draining, a ZeroMQ echo service and a peer that does not
//! speak ZMTP (the broker's own admin port, Python's HTTP server, an SSH banner) each exit 1
//! with one line that names what answered.

mod common;
mod peers;

use std::io::Write;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use broker::State;
use common::{eventually, free_port, Broker, Client, EVENT_TIMEOUT};
use nix::sys::signal::Signal;
use peers::ZmqService;
use tools::probe::HEALTH_STATES;

/// Runs `broker probe --endpoint ENDPOINT --timeout 2s`: exit code, stdout + stderr, duration.
fn probe(endpoint: &str) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["probe", "--endpoint", endpoint, "--timeout", "2s"])
        .output()
        .expect("probe runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text, started.elapsed())
}

/// Asserts a failed probe: exit 1, one line, containing `needle`, within its timeout (+ slack
/// for a busy machine).
fn fails_naming(endpoint: &str, needle: &str) -> String {
    let (code, text, took) = probe(endpoint);
    assert_eq!(code, Some(1), "{endpoint}: {text}");
    assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
    assert!(
        text.contains(needle),
        "{endpoint}: expected {needle:?} in {text}"
    );
    assert!(took < Duration::from_secs(5), "{endpoint}: took {took:?}");
    text
}

#[test]
fn the_probes_states_are_the_brokers_own() {
    let states = [
        State::Starting,
        State::Serving,
        State::Stopping,
        State::Draining,
        State::Stopped,
    ];
    let names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
    assert_eq!(names, HEALTH_STATES);
    assert_eq!(State::Serving.as_str(), tools::probe::SERVING);
}

#[test]
fn only_a_serving_broker_passes_and_a_stopping_or_draining_one_is_named() {
    // Stopping: a SIGTERM'd broker keeps serving (not ready) for its shutdown delay.
    let stopping = Broker::start(&["--workers", "1", "--shutdown-delay", "60s"]);
    let (code, text, _) = probe(&stopping.front);
    assert_eq!((code, text.trim()), (Some(0), "ok: serving"));
    stopping.signal(Signal::SIGTERM);
    stopping.wait_for_log("state serving -> stopping", EVENT_TIMEOUT);
    fails_naming(&stopping.front, "broker is stopping");

    // Draining: no delay, one request still held, so it stays draining until that finishes.
    let draining = Broker::start(&["--workers", "1", "--handler", "sleep"]);
    let held = Client::dealer(&draining.front, true);
    held.send(&[b"8000"]);
    eventually("the request is running", EVENT_TIMEOUT, || {
        common::metric(&draining, "broker_workers_busy") == 1.0
    });
    draining.signal(Signal::SIGTERM);
    draining.wait_for_log("-> draining", EVENT_TIMEOUT);
    let text = fails_naming(&draining.front, "broker is draining");
    assert!(text.contains(&draining.front), "{text}");
}

#[test]
fn a_zeromq_service_that_is_not_a_broker_is_named_as_such() {
    // An echo service: the health request comes back as it went, with the probe's deadline
    // header (its --timeout) in front.
    let echo = ZmqService::start(|body| body.to_vec());
    fails_naming(
        &echo.endpoint,
        r#"is not a broker: it answered "\x00broker.timeout-ms=2000" "\x00broker.health""#,
    );
    // One that puts OK in front, as a broker's echo handler would answer an ordinary request.
    let ok_echo = ZmqService::start(|body| [vec![b"OK".to_vec()], body.to_vec()].concat());
    fails_naming(
        &ok_echo.endpoint,
        r#"is not a broker: it answered "OK" "\x00broker.timeout-ms=2000" "\x00broker.health""#,
    );
    // OK with a state no broker has, and an ERR.
    let odd = ZmqService::start(|_| vec![b"OK".to_vec(), b"fine".to_vec()]);
    fails_naming(&odd.endpoint, r#"is not a broker: it answered "OK" "fine""#);
    let err = ZmqService::start(|_| vec![b"ERR".into(), b"bad_request".into(), b"no".into()]);
    fails_naming(
        &err.endpoint,
        r#"is not a broker: it answered "ERR" "bad_request" "no""#,
    );
}

/// Python's HTTP server on a free port, killed on drop.
struct PythonHttp {
    child: Child,
    port: u16,
}

impl PythonHttp {
    fn start() -> PythonHttp {
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server starts");
        let server = PythonHttp { child, port };
        eventually("the HTTP server listens", EVENT_TIMEOUT, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        server
    }
}

impl Drop for PythonHttp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_peer_that_does_not_speak_zmtp_is_named_and_not_blamed_on_keys() {
    // The broker's own admin port: an operator's likely mistake, answered by hyper.
    let broker = Broker::start(&["--workers", "1"]);
    let admin = format!("tcp://{}", broker.admin);
    let text = fails_naming(
        &admin,
        &format!("{admin} is not a ZeroMQ peer: it answered 'HTTP/1.1 400 Bad Request'"),
    );
    assert!(
        !text.contains("CURVE") && !text.contains("max-connections"),
        "{text}"
    );

    // Another real HTTP server, one that waits for a whole request line before it answers.
    let python = PythonHttp::start();
    let text = fails_naming(
        &format!("tcp://127.0.0.1:{}", python.port),
        "is not a ZeroMQ peer: it answered '",
    );
    assert!(text.contains("HTML"), "Python's error page: {text}");

    // A server that speaks first: an SSH banner, to every connection until the probe is done.
    let ssh = TcpListener::bind("127.0.0.1:0").expect("bind");
    ssh.set_nonblocking(true).expect("non-blocking");
    let ssh_endpoint = format!("tcp://{}", ssh.local_addr().expect("address"));
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    let banner = thread::spawn(move || {
        let mut held = Vec::new();
        let give_up = Instant::now() + EVENT_TIMEOUT;
        while !flag.load(Ordering::Relaxed) && Instant::now() < give_up {
            match ssh.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n");
                    held.push(stream);
                }
                // Nothing waiting: look again shortly (a non-blocking accept loop).
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
        held.len()
    });
    fails_naming(
        &ssh_endpoint,
        "is not a ZeroMQ peer: it answered 'SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3'",
    );
    done.store(true, Ordering::Relaxed);
    assert!(
        banner.join().expect("banner server") >= 2,
        "libzmq's and the raw look"
    );

    // A listener that says nothing is still reported as before: no verdict without bytes.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent = format!("tcp://{}", silent.local_addr().expect("address"));
    fails_naming(&silent, "connected, but the handshake did not finish");
}
