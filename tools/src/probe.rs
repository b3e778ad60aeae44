//! `broker probe`: an exec-probe client for images without a shell. It sends the reserved
//! health request through the front socket (answered by the coordinator itself, ahead of any
//! queued work), with `--timeout` as its deadline header, or GETs an admin URL. Exit 0 only when a broker answers that it is serving (or
//! the URL answers 2xx); else 1 with a one-line reason on stderr: the state a broker is in
//! when it is not serving, what a peer that is not a broker answered, or what the connection
//! did meanwhile (including a peer that does not speak ZMTP at all, see [`crate::greeting`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::builder::StringValueParser;
use clap::Args;
use client::Security;
use shared::parse::Trimmed;
use shared::protocol::{timeout_header, HEALTH_REQUEST, STATUS_OK};

use crate::curve::CurveArgs;
use crate::greeting::{first_line, Greeting};
use crate::handshake::{watch, Seen};

/// The states a broker's health reply names (`OK <state>`, docs/protocol.md), as
/// `broker::State::as_str` spells them; only [`SERVING`] passes the probe.
pub const HEALTH_STATES: [&str; 5] = ["starting", "serving", "stopping", "draining", "stopped"];
/// The one state in which the probe exits 0.
pub const SERVING: &str = "serving";

/// The longest `--timeout`.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Flags of `broker probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Broker front endpoint to send the health request to.
    #[arg(
        long,
        env = "BROKER_PROBE_ENDPOINT",
        default_value = "tcp://127.0.0.1:5555",
        value_parser = Trimmed(StringValueParser::new())
    )]
    pub endpoint: String,
    /// Give up (exit 1) when no reply came within this time (more than 0, at most 1h).
    #[arg(long, env = "BROKER_PROBE_TIMEOUT", value_parser = Trimmed(parse_timeout), default_value = "500ms")]
    pub timeout: Duration,
    /// Probe this admin URL (e.g. http://127.0.0.1:8000/livez) instead; 2xx is healthy.
    #[arg(long, env = "BROKER_PROBE_HTTP", value_parser = Trimmed(parse_http_url))]
    pub http: Option<String>,
    /// CURVE settings, for a broker that requires them.
    #[command(flatten)]
    pub curve: CurveArgs,
}

/// `http://HOST:PORT/path`: what [`probe_http`] can request (no TLS, a host and a port).
fn parse_http_url(text: &str) -> Result<String, String> {
    const EXPECTED: &str = "expected http://HOST:PORT/PATH";
    let rest = text.strip_prefix("http://").ok_or(EXPECTED)?;
    let authority = rest.split('/').next().unwrap_or("");
    let port = authority.rsplit_once(':').map(|(_, p)| p);
    match port.map(str::parse::<u16>) {
        Some(Ok(p)) if p > 0 && authority.len() > p.to_string().len() + 1 => Ok(text.to_owned()),
        _ => Err(EXPECTED.into()),
    }
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    shared::parse::bounded_duration(text, MAX_TIMEOUT, true)
}

/// Why a probe failed; printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// libzmq refused a step (bad endpoint, say).
    #[error("{0}: {1}")]
    Zmq(&'static str, zmq::Error),
    /// The endpoint's host name did not resolve.
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    /// The endpoint is not one a client can connect to.
    #[error("{0}: expected tcp://HOST:PORT or ipc://PATH")]
    Endpoint(String),
    /// Nothing came back in time; the last says what the connection did meanwhile.
    #[error("no reply from {0} within {1:?}: {2}")]
    Timeout(String, Duration, String),
    /// A broker answered, in a state other than serving.
    #[error("{0}: broker is {1}")]
    NotServing(String, &'static str),
    /// A ZeroMQ peer answered, but not with a broker's health reply (an echo service, say).
    #[error("{0} is not a broker: it answered {1}")]
    NotBroker(String, String),
    /// The peer does not speak ZMTP (an HTTP server, an SSH banner, garbage).
    #[error("{0} is not a ZeroMQ peer: it answered '{1}'")]
    NotZmtp(String, String),
    /// The admin URL could not be used.
    #[error("{0}")]
    Http(String),
    /// libzmq refused the CURVE keys.
    #[error("cannot set the CURVE keys: {0}")]
    Curve(String),
}

/// Runs the probe and maps the result to the exit code.
pub fn run(args: &ProbeArgs) -> ExitCode {
    let security = match args.curve.security_or_usage_error() {
        Ok(security) => security,
        Err(code) => return code,
    };
    let result = match &args.http {
        Some(url) => probe_http(url, args.timeout),
        None => probe_zmq(&args.endpoint, args.timeout, &security).map(str::to_owned),
    };
    match result {
        Ok(state) => {
            println!("ok: {state}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("probe failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Checks that `endpoint` names something a client can connect to, resolving a host name now
/// so a lookup failure is reported as one (libzmq would only retry it quietly).
fn check_endpoint(endpoint: &str) -> Result<(), ProbeError> {
    if endpoint.starts_with("ipc://") {
        return Ok(());
    }
    let hostport = endpoint
        .strip_prefix("tcp://")
        .ok_or_else(|| ProbeError::Endpoint(endpoint.into()))?;
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| ProbeError::Endpoint(endpoint.into()))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(ProbeError::Endpoint(endpoint.into()));
    }
    match hostport.to_socket_addrs().map(|addrs| addrs.count()) {
        Ok(0) => Err(ProbeError::Resolve(host.into(), "no address".into())),
        Ok(_) => Ok(()),
        Err(e) => Err(ProbeError::Resolve(host.into(), e.to_string())),
    }
}

/// Sends a health request to `endpoint`; returns the broker's state when it is serving.
pub fn probe_zmq(
    endpoint: &str,
    timeout: Duration,
    security: &Security,
) -> Result<&'static str, ProbeError> {
    check_endpoint(endpoint)?;
    let ctx = zmq::Context::new();
    let socket = ctx
        .socket(zmq::REQ)
        .map_err(|e| ProbeError::Zmq("socket", e))?;
    // Exit at once whatever state the connection is in.
    socket
        .set_linger(0)
        .map_err(|e| ProbeError::Zmq("linger", e))?;
    socket
        .set_ipv6(true)
        .map_err(|e| ProbeError::Zmq("ipv6", e))?;
    security
        .apply(&socket)
        .map_err(|e| ProbeError::Curve(e.to_string()))?;
    let monitor = watch(&ctx, &socket).map_err(|e| ProbeError::Zmq("monitor", e))?;
    let mut seen = Seen::default();
    socket
        .connect(endpoint)
        .map_err(|e| ProbeError::Zmq("connect", e))?;
    let started = Instant::now();
    let deadline = started + timeout;
    // The probe's deadline travels with it, as every client's does (docs/protocol.md).
    socket
        .send(timeout_header(timeout), zmq::DONTWAIT | zmq::SNDMORE)
        .and_then(|()| socket.send(HEALTH_REQUEST, zmq::DONTWAIT))
        .map_err(|e| ProbeError::Zmq("send", e))?;
    // A connection whose handshake is still unfinished by then is looked at raw, once.
    let suspicious_at = started + timeout / 2;
    let mut looked = false;
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut items = [
            socket.as_poll_item(zmq::POLLIN),
            monitor.as_poll_item(zmq::POLLIN),
        ];
        // Wake at the halfway mark to look; after it, events and the reply wake the loop.
        let now = Instant::now();
        let wait = match looked || now >= suspicious_at {
            true => left,
            false => left.min(suspicious_at - now),
        };
        match zmq::poll(&mut items, wait.as_millis() as i64) {
            Ok(_) if items[0].is_readable() => break,
            Ok(_) if left.is_zero() => {
                return Err(ProbeError::Timeout(
                    endpoint.into(),
                    timeout,
                    seen.why().into(),
                ))
            }
            Ok(_) => seen.read(&monitor, &mut events),
            Err(zmq::Error::EINTR) => continue,
            Err(e) => return Err(ProbeError::Zmq("poll", e)),
        }
        // A failed handshake, or one that takes this long, may be a peer that is no ZeroMQ
        // peer at all; the monitor cannot tell, the first bytes on a raw connection can.
        let stalled = seen.connected() && !seen.handshake_done() && Instant::now() >= suspicious_at;
        if !looked && (seen.failure().is_some() || stalled) {
            looked = true;
            let budget = deadline.saturating_duration_since(Instant::now());
            if let Greeting::Other(answer) = Greeting::read(endpoint, budget) {
                return Err(ProbeError::NotZmtp(endpoint.into(), first_line(&answer)));
            }
        }
    }
    let frames = socket
        .recv_multipart(zmq::DONTWAIT)
        .map_err(|e| ProbeError::Zmq("recv", e))?;
    health_state(&frames).map_err(|what| match what {
        Answer::State(state) => ProbeError::NotServing(endpoint.into(), state),
        Answer::Other(what) => ProbeError::NotBroker(endpoint.into(), what),
    })
}

/// A health reply that does not pass.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// A broker in this state (one of [`HEALTH_STATES`] but [`SERVING`]).
    State(&'static str),
    /// Not a broker's health reply: the frames, described.
    Other(String),
}

/// Reads a health reply body: `OK serving` passes; `OK <another state>` is a broker that is not
/// serving; anything else (an echo of the request, an `OK` with other frames, an `ERR`) is not
/// a broker's answer.
pub fn health_state(frames: &[Vec<u8>]) -> Result<&'static str, Answer> {
    if let [status, state] = frames {
        if status[..] == *STATUS_OK {
            if let Some(&state) = HEALTH_STATES.iter().find(|s| s.as_bytes() == &state[..]) {
                return if state == SERVING {
                    Ok(state)
                } else {
                    Err(Answer::State(state))
                };
            }
        }
    }
    Err(Answer::Other(describe(frames)))
}

/// Frames for a one-line message: each quoted with its bytes escaped, long ones cut, at most
/// four shown.
fn describe(frames: &[Vec<u8>]) -> String {
    const FRAMES: usize = 4;
    const BYTES: usize = 40;
    if frames.is_empty() {
        return "an empty message".into();
    }
    let mut out: Vec<String> = frames
        .iter()
        .take(FRAMES)
        .map(|frame| {
            let cut = &frame[..frame.len().min(BYTES)];
            let more = if frame.len() > BYTES { "..." } else { "" };
            format!("\"{}{more}\"", cut.escape_ascii())
        })
        .collect();
    if frames.len() > FRAMES {
        out.push(format!("and {} more frames", frames.len() - FRAMES));
    }
    out.join(" ")
}

/// GETs `url` (`http://host:port/path`); 2xx is healthy. Returns the status line.
pub fn probe_http(url: &str, timeout: Duration) -> Result<String, ProbeError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ProbeError::Http(format!("{url}: only http:// URLs are supported")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let fail = |what: &str, e: std::io::Error| ProbeError::Http(format!("{url}: {what}: {e}"));
    let deadline = Instant::now() + timeout;
    let addr: SocketAddr = authority
        .to_socket_addrs()
        .map_err(|e| fail("resolve", e))?
        .next()
        .ok_or_else(|| ProbeError::Http(format!("{url}: no address")))?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut stream = TcpStream::connect_timeout(&addr, left()).map_err(|e| fail("connect", e))?;
    stream
        .set_write_timeout(Some(left()))
        .and_then(|()| stream.set_read_timeout(Some(left())))
        .map_err(|e| fail("socket", e))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: broker-probe\r\n\r\n"
    )
    .map_err(|e| fail("send", e))?;
    // The status line is all we need; read a bounded prefix.
    let mut head = [0u8; 256];
    let n = stream.read(&mut head).map_err(|e| fail("read", e))?;
    let text = String::from_utf8_lossy(&head[..n]);
    let status_line = text.lines().next().unwrap_or_default().to_owned();
    match status_line.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') => Ok(status_line),
        _ => Err(ProbeError::Http(format!("{url}: {status_line}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_timeouts_are_checked() {
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("300000000000y").is_err());
        assert_eq!(parse_timeout("2s"), Ok(Duration::from_secs(2)));
        assert!(matches!(
            check_endpoint("tcp://no-such-host.invalid:5555"),
            Err(ProbeError::Resolve(host, _)) if host == "no-such-host.invalid"
        ));
        assert!(matches!(
            check_endpoint("udp://x"),
            Err(ProbeError::Endpoint(_))
        ));
        assert!(check_endpoint("tcp://127.0.0.1:5555").is_ok());
    }

    #[test]
    fn flag_values_are_trimmed_as_the_brokers_are() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            probe: ProbeArgs,
        }
        let cli = Cli::try_parse_from([
            "probe",
            "--endpoint",
            " tcp://127.0.0.1:5555\n",
            "--timeout",
            "\u{a0}2s ",
            "--curve-key-file",
            " client.key\t",
        ])
        .map_err(|e| e.to_string())
        .expect("parses");
        assert_eq!(cli.probe.endpoint, "tcp://127.0.0.1:5555");
        assert_eq!(cli.probe.timeout, Duration::from_secs(2));
        assert_eq!(
            cli.probe.curve.curve_key_file,
            Some(std::path::PathBuf::from("client.key"))
        );
    }

    #[test]
    fn only_ok_serving_passes_and_other_replies_are_told_apart() {
        let frames = |fs: &[&[u8]]| fs.iter().map(|f| f.to_vec()).collect::<Vec<_>>();
        assert_eq!(health_state(&frames(&[b"OK", b"serving"])), Ok("serving"));
        for state in ["starting", "stopping", "draining", "stopped"] {
            assert_eq!(
                health_state(&frames(&[b"OK", state.as_bytes()])),
                Err(Answer::State(state))
            );
        }
        let other = |fs: &[&[u8]]| match health_state(&frames(fs)) {
            Err(Answer::Other(what)) => what,
            reply => panic!("{fs:?}: {reply:?}"),
        };
        assert_eq!(other(&[HEALTH_REQUEST]), r#""\x00broker.health""#);
        assert_eq!(
            other(&[b"OK", HEALTH_REQUEST]),
            r#""OK" "\x00broker.health""#
        );
        assert_eq!(other(&[b"OK", b"serving", b"x"]), r#""OK" "serving" "x""#);
        assert_eq!(other(&[b"OK", b"Serving"]), r#""OK" "Serving""#);
        assert_eq!(
            other(&[b"ERR", b"bad_request", b"no"]),
            r#""ERR" "bad_request" "no""#
        );
        assert_eq!(other(&[]), "an empty message");
        let long = [b'a'; 50];
        assert_eq!(
            other(&[&long, b"2", b"3", b"4", b"5", b"6"]),
            format!(
                "\"{}...\" \"2\" \"3\" \"4\" and 2 more frames",
                "a".repeat(40)
            )
        );
    }
}
