//! `broker probe`: an exec-probe client for images without a shell. It sends the reserved
//! health request through the front socket (answered by the coordinator itself, ahead of any
//! queued work) or GETs an admin URL, and exits 0 on an answer within the timeout, else 1 with
//! a one-line reason on stderr.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use shared::protocol::{parse_reply, Reply, HEALTH_REQUEST};

use crate::config::ProbeArgs;

/// Why a probe failed; printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// libzmq refused a step (bad endpoint, say).
    #[error("{0}: {1}")]
    Zmq(&'static str, zmq::Error),
    /// Nothing came back in time.
    #[error("no reply from {0} within {1:?}")]
    Timeout(String, Duration),
    /// Something came back, but not a health reply.
    #[error("unexpected reply from {0}: {1}")]
    BadReply(String, String),
    /// The admin URL could not be used.
    #[error("{0}")]
    Http(String),
}

/// Runs the probe and maps the result to the exit code.
pub fn run(args: &ProbeArgs) -> ExitCode {
    let result = match &args.http {
        Some(url) => probe_http(url, args.timeout),
        None => probe_zmq(&args.endpoint, args.timeout),
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

/// Sends a health request to `endpoint`; returns the broker's state.
pub fn probe_zmq(endpoint: &str, timeout: Duration) -> Result<String, ProbeError> {
    let ctx = zmq::Context::new();
    let socket = ctx
        .socket(zmq::REQ)
        .map_err(|e| ProbeError::Zmq("socket", e))?;
    // Exit at once whatever state the connection is in.
    socket
        .set_linger(0)
        .map_err(|e| ProbeError::Zmq("linger", e))?;
    socket
        .connect(endpoint)
        .map_err(|e| ProbeError::Zmq("connect", e))?;
    socket
        .send(HEALTH_REQUEST, zmq::DONTWAIT)
        .map_err(|e| ProbeError::Zmq("send", e))?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match socket.poll(zmq::POLLIN, left.as_millis() as i64) {
            Ok(0) => return Err(ProbeError::Timeout(endpoint.into(), timeout)),
            Ok(_) => break,
            Err(zmq::Error::EINTR) if !left.is_zero() => continue,
            Err(e) => return Err(ProbeError::Zmq("poll", e)),
        }
    }
    let frames = socket
        .recv_multipart(zmq::DONTWAIT)
        .map_err(|e| ProbeError::Zmq("recv", e))?;
    match parse_reply(frames) {
        Ok(Reply::Ok(frames)) if frames.len() == 1 => {
            Ok(String::from_utf8_lossy(&frames[0]).into_owned())
        }
        Ok(other) => Err(ProbeError::BadReply(endpoint.into(), format!("{other:?}"))),
        Err(e) => Err(ProbeError::BadReply(endpoint.into(), e.to_string())),
    }
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
    let addr = authority
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
