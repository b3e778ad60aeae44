//! Test support: start the real `broker` binary on free loopback ports, wait on its log lines
//! and exit with deadlines, and talk to it with real ZeroMQ clients over TCP.

#![allow(dead_code)]

pub mod cgroup;
pub mod deploy;
pub mod haproxy;
pub mod pipeline;
pub mod zmtp;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shared::protocol::{parse_reply, Reply};

/// How long any single event may take before a test fails loudly.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A port on 127.0.0.1 that was free a moment ago, from outside the kernel's ephemeral range,
/// so no outgoing connection (a client's, haproxy's) can be given it before the broker binds.
pub fn free_port() -> u16 {
    stable_port()
}

/// A free port outside the kernel's ephemeral range. Ports a test binds twice (a restarted
/// replica) must come from here: a port from the ephemeral range can be handed to an outgoing
/// connection as its source port in between.
pub fn stable_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| {
            r.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u32>().ok())
        })
        .unwrap_or(32768);
    let span = low.saturating_sub(10_000).max(1);
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let port = 10_000 + (seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span);
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// The real broker binary, running.
pub struct Broker {
    child: Child,
    pub front: String,
    pub admin: SocketAddr,
    lines: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    /// The stdout and stderr readers: finished once the process's pipes closed.
    readers: [thread::JoinHandle<()>; 2],
}

impl Broker {
    /// Starts the broker with `args` on free ports and waits until it is serving.
    pub fn start(args: &[&str]) -> Broker {
        let broker = Broker::spawn(args, &[]);
        broker.wait_for_log("state starting -> serving", EVENT_TIMEOUT);
        broker
    }

    /// Starts the broker with `args` and `env` on free ports without waiting.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Broker {
        let (front, admin) = (free_port(), free_port());
        let mut full: Vec<String> = Vec::new();
        if !args.contains(&"--frontend") {
            full.extend(["--frontend".into(), format!("tcp://127.0.0.1:{front}")]);
        }
        if !args.contains(&"--admin") {
            full.extend(["--admin".into(), format!("127.0.0.1:{admin}")]);
        }
        full.extend(args.iter().map(|a| a.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        Broker::spawn_exact(&full, env, front, admin)
    }

    /// Starts the broker with exactly `args` and `env`; `front` and `admin` are the ports
    /// they make it listen on (for the helpers).
    pub fn spawn_exact(args: &[&str], env: &[(&str, &str)], front: u16, admin: u16) -> Broker {
        Broker::spawn_in(args, env, front, admin, None)
    }

    /// As [`Broker::spawn_exact`], inside the cgroup whose `cgroup.procs` is `procs`: a shell
    /// joins it and then becomes the broker, so every byte the broker ever uses is counted.
    pub fn spawn_in(
        args: &[&str],
        env: &[(&str, &str)],
        front: u16,
        admin: u16,
        procs: Option<&std::path::Path>,
    ) -> Broker {
        let front = format!("tcp://127.0.0.1:{front}");
        let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().expect("admin address");
        let mut command = match procs {
            None => Command::new(env!("CARGO_BIN_EXE_broker")),
            Some(procs) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", "echo $$ > \"$1\" && shift && exec \"$0\" \"$@\""])
                    .arg(env!("CARGO_BIN_EXE_broker"))
                    .arg(procs);
                sh
            }
        };
        command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("broker binary starts");
        let (tx, lines) = crossbeam_channel::unbounded();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let log_copy = Arc::clone(&log);
        let out_reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                log_copy.lock().expect("log lock").push(line.clone());
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("piped stderr");
        let err_copy = Arc::clone(&stderr);
        let err_reader = thread::spawn(move || {
            let mut text = String::new();
            let _ = err_pipe.read_to_string(&mut text);
            err_copy.lock().expect("stderr lock").push_str(&text);
        });
        Broker {
            child,
            front,
            admin,
            lines,
            log,
            stderr,
            readers: [out_reader, err_reader],
        }
    }

    /// Waits for a stdout line containing `needle` (seen since start), or fails.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        if let Some(line) = self.log_lines().into_iter().find(|l| l.contains(needle)) {
            return line;
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_deadline(deadline) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no log line with {needle:?} within {timeout:?}; log:\n{}",
                        self.log_text()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Output closed; the line may have been read by an earlier call.
                    if let Some(line) = self.log_lines().into_iter().find(|l| l.contains(needle)) {
                        return line;
                    }
                    panic!(
                        "broker exited before logging {needle:?}; log:\n{}",
                        self.log_text()
                    )
                }
            }
        }
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal the broker");
    }

    /// The exit status if the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit and its output to be read to the end, or fails after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The readers reach the end of the pipes just after the exit; what the
                // process wrote last must be in stderr_text() and log_lines() on return.
                while !self.readers.iter().all(thread::JoinHandle::is_finished) {
                    assert!(
                        Instant::now() < deadline,
                        "the broker's output did not close within {timeout:?}"
                    );
                    thread::sleep(Duration::from_millis(1));
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not exit within {timeout:?}; log:\n{}",
                self.log_text()
            );
            // Polling the child is the only portable way to wait with a deadline.
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// GET `path` on the admin server: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_request(self.admin, "GET", path)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 request over a fresh connection: (status code, body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, EVENT_TIMEOUT).expect("connect to admin");
    stream
        .set_read_timeout(Some(EVENT_TIMEOUT))
        .expect("read timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Polls `check` until it returns true, or fails after `timeout`.
pub fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what}: not true within {timeout:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A ZeroMQ client of the broker: REQ, or DEALER with or without the empty delimiter.
pub struct Client {
    pub socket: zmq::Socket,
    delimiter: bool,
    _ctx: zmq::Context,
}

impl Client {
    pub fn dealer(endpoint: &str, delimiter: bool) -> Client {
        Client::new(endpoint, zmq::DEALER, delimiter)
    }

    pub fn req(endpoint: &str) -> Client {
        Client::new(endpoint, zmq::REQ, false)
    }

    fn new(endpoint: &str, kind: zmq::SocketType, delimiter: bool) -> Client {
        let ctx = zmq::Context::new();
        let socket = ctx.socket(kind).expect("client socket");
        socket.set_linger(0).expect("linger");
        socket.set_ipv6(true).expect("ipv6");
        socket.connect(endpoint).expect("connect");
        Client {
            socket,
            delimiter,
            _ctx: ctx,
        }
    }

    pub fn send(&self, body: &[&[u8]]) {
        if self.delimiter {
            self.socket.send("", zmq::SNDMORE).expect("send delimiter");
        }
        self.socket.send_multipart(body, 0).expect("send request");
    }

    /// The next reply body (envelope removed), or `None` after `timeout`.
    pub fn try_recv(&self, timeout: Duration) -> Option<Vec<Vec<u8>>> {
        let ready = self
            .socket
            .poll(zmq::POLLIN, timeout.as_millis() as i64)
            .expect("poll");
        if ready == 0 {
            return None;
        }
        let mut frames = self.socket.recv_multipart(0).expect("recv reply");
        if self.delimiter {
            assert_eq!(
                frames.first().map(Vec::len),
                Some(0),
                "reply keeps the delimiter"
            );
            frames.remove(0);
        }
        Some(frames)
    }

    pub fn recv(&self) -> Vec<Vec<u8>> {
        self.try_recv(EVENT_TIMEOUT)
            .unwrap_or_else(|| panic!("no reply within {EVENT_TIMEOUT:?}"))
    }

    pub fn recv_reply(&self) -> Reply<Vec<u8>> {
        parse_reply(self.recv()).expect("well-formed reply")
    }

    pub fn request(&self, body: &[&[u8]]) -> Reply<Vec<u8>> {
        self.send(body);
        self.recv_reply()
    }
}

/// The ERR code of a reply, or `None` for OK.
pub fn err_code(reply: &Reply<Vec<u8>>) -> Option<shared::ErrorCode> {
    match reply {
        Reply::Ok(_) => None,
        Reply::Err { code, .. } => Some(*code),
    }
}

/// Expects an `OK` reply and returns its frames.
pub fn ok(reply: Reply<Vec<u8>>) -> Vec<Vec<u8>> {
    match reply {
        Reply::Ok(frames) => frames,
        Reply::Err { code, message } => panic!("expected OK, got ERR {code} {message}"),
    }
}

/// After a clean exit: the broker's own tally says every request it read was answered.
pub fn assert_all_answered(broker: &Broker) {
    let line = broker.wait_for_log("requests, answered", EVENT_TIMEOUT);
    // "... read R requests, answered A (...": the two numbers after "read ".
    let tally = &line[line.find("read ").expect("tally")..];
    let tail: Vec<u64> = tally
        .split_whitespace()
        .filter_map(|w| w.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .take(2)
        .collect();
    assert_eq!(tail[0], tail[1], "read vs answered: {line}");
}

/// The value of one sample (`name` with its labels, as the text format writes it) from a
/// scrape of /metrics, or NaN when it is absent. A plain read, for waiting on progress.
pub fn metric(broker: &Broker, name: &str) -> f64 {
    sample(&broker.http_get("/metrics").1, name)
}

/// The value of one sample (`name` with its labels) in the text of a /metrics scrape, or NaN
/// when it is absent.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// `broker_requests_total{outcome="ok"}`, 0 when absent.
pub fn ok_count(broker: &Broker) -> u64 {
    let ok = metric(broker, "broker_requests_total{outcome=\"ok\"}");
    if ok.is_nan() {
        0
    } else {
        ok as u64
    }
}

/// Sends a health request on `client` and waits for its reply: every request sent on the same
/// connection before it has then been read by the broker (one connection is read in order).
pub fn sync_read(client: &Client) {
    let reply = client.request(&[shared::protocol::HEALTH_REQUEST]);
    assert!(
        matches!(reply, Reply::Ok(ref frames) if frames.len() == 1),
        "health reply: {reply:?}"
    );
}

/// A DEALER that will never read: its receive queue holds one message and a 4 KiB kernel
/// buffer, so the broker's replies pile up on the broker's side.
pub fn deaf_client(ctx: &zmq::Context, endpoint: &str) -> zmq::Socket {
    let socket = ctx.socket(zmq::DEALER).expect("socket");
    socket.set_rcvhwm(1).expect("rcvhwm");
    socket.set_rcvbuf(4096).expect("rcvbuf");
    socket.set_sndhwm(0).expect("sndhwm");
    socket.set_linger(0).expect("linger");
    socket.connect(endpoint).expect("connect");
    socket
}
