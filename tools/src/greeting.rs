//! Whether the peer on an endpoint speaks ZMTP at all, from the first bytes it sends on a raw
//! connection. libzmq's socket monitor tells a client only that a handshake failed, and the
//! same event comes from a broker that refused a CURVE key and from an HTTP server on the
//! port; the first bytes tell them apart. Every ZMTP peer starts with the signature's 0xFF
//! unprompted (RFC 23: both sides send their greeting at once); an SSH server sends its banner
//! unprompted too, and an HTTP server answers the line sent to a peer that stays silent.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The first byte of every ZMTP 2.0 and 3.x greeting (the signature's padding marker).
const ZMTP_SIGNATURE_START: u8 = 0xFF;
/// How long a peer gets to speak first before it is sent [`PROVOKE`]: a ZMTP peer sends its
/// signature as soon as the connection is accepted.
const SPEAK_FIRST: Duration = Duration::from_millis(200);
/// Sent to a peer that stays silent: a ZMTP signature, then the end of an HTTP request head,
/// so that an HTTP server answers (400) instead of waiting for more.
const PROVOKE: &[u8] = b"\xFF\x00\x00\x00\x00\x00\x00\x00\x01\x7F\r\n\r\n";
/// The most bytes of an answer kept to name it.
const KEEP: usize = 64;

/// What came first from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Greeting {
    /// A ZMTP signature: a ZeroMQ peer, whatever else is wrong.
    Zmtp,
    /// Nothing within the time given (or the connection closed, or could not be made): no
    /// verdict.
    Silent,
    /// Bytes that no ZMTP peer sends first (up to 64 of them).
    Other(Vec<u8>),
}

impl Greeting {
    /// Reads the first bytes the peer at `endpoint` (`tcp://HOST:PORT` or `ipc://PATH`) sends,
    /// within `budget`.
    pub fn read(endpoint: &str, budget: Duration) -> Greeting {
        let deadline = Instant::now() + budget;
        if let Some(path) = endpoint.strip_prefix("ipc://") {
            return match UnixStream::connect(path) {
                Ok(stream) => listen(stream, deadline),
                Err(_) => Greeting::Silent,
            };
        }
        let Some(addr) = endpoint
            .strip_prefix("tcp://")
            .and_then(|hostport| hostport.to_socket_addrs().ok()?.next())
        else {
            return Greeting::Silent;
        };
        match TcpStream::connect_timeout(&addr, left(deadline)) {
            Ok(stream) => listen(stream, deadline),
            Err(_) => Greeting::Silent,
        }
    }

    /// Classifies the first bytes of an answer.
    pub fn of(first: &[u8]) -> Greeting {
        match first.first() {
            None => Greeting::Silent,
            Some(&ZMTP_SIGNATURE_START) => Greeting::Zmtp,
            Some(_) => Greeting::Other(first[..first.len().min(KEEP)].to_vec()),
        }
    }
}

/// The first line of an answer, printable: `HTTP/1.1 400 Bad Request`, `SSH-2.0-OpenSSH_9.2p1`,
/// or escaped bytes.
pub fn first_line(answer: &[u8]) -> String {
    let line = answer.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.escape_ascii().to_string()
}

/// The time left until `deadline`, never zero (a zero timeout means "none" to the socket calls).
fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// What a stream-like connection needs for [`listen`].
trait Stream: Read + Write {
    fn set_read_timeout(&self, timeout: Duration) -> std::io::Result<()>;
}

impl Stream for TcpStream {
    fn set_read_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, Some(timeout))
    }
}

impl Stream for UnixStream {
    fn set_read_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, Some(timeout))
    }
}

/// Lets the peer speak first, provokes it if it does not, and classifies what it said.
fn listen(mut stream: impl Stream, deadline: Instant) -> Greeting {
    let mut buf = [0u8; KEEP];
    let first_wait = deadline.min(Instant::now() + SPEAK_FIRST);
    match read_some(&mut stream, &mut buf, first_wait) {
        Some(0) => return Greeting::Silent,
        Some(n) => return Greeting::of(&buf[..n]),
        None if Instant::now() >= deadline => return Greeting::Silent,
        None => {}
    }
    if stream.write_all(PROVOKE).is_err() {
        return Greeting::Silent;
    }
    match read_some(&mut stream, &mut buf, deadline) {
        Some(n) => Greeting::of(&buf[..n]),
        None => Greeting::Silent,
    }
}

/// Reads what arrives before `until`: `Some(0)` when the peer closed, `None` when nothing came.
fn read_some(stream: &mut impl Stream, buf: &mut [u8], until: Instant) -> Option<usize> {
    loop {
        if Instant::now() >= until || stream.set_read_timeout(left(until)).is_err() {
            return None;
        }
        match stream.read(buf) {
            Ok(n) => return Some(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None
            }
            // Reset by the peer: it said nothing we can name.
            Err(_) => return Some(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_are_classified_and_named() {
        assert_eq!(Greeting::of(b""), Greeting::Silent);
        assert_eq!(
            Greeting::of(b"\xFF\x00\x00\x00\x00\x00\x00\x00\x01\x7F"),
            Greeting::Zmtp
        );
        let http = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(Greeting::of(http), Greeting::Other(http.to_vec()));
        assert_eq!(first_line(http), "HTTP/1.1 400 Bad Request");
        assert_eq!(
            first_line(b"SSH-2.0-OpenSSH_9.2p1\r\n"),
            "SSH-2.0-OpenSSH_9.2p1"
        );
        assert_eq!(first_line(b"\x01\x02ab"), "\\x01\\x02ab");
        let long = vec![b'x'; 500];
        assert_eq!(Greeting::of(&long), Greeting::Other(vec![b'x'; KEEP]));
    }
}
