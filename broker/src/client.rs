//! A small retrying client (the zguide's Lazy Pirate pattern), the behaviour docs/protocol.md
//! asks of clients in any language:
//!
//! - every request has a timeout; on timeout the socket is closed and reopened (a REQ socket
//!   cannot send again until it receives, and the old connection may be to a dead pod);
//! - `ERR draining` and `ERR overloaded` are retried after a backoff, on a fresh connection so
//!   a load balancer can pick another instance;
//! - other `ERR` replies are final (the request was read and refused, or ran and failed);
//! - the socket connects to every endpoint (and every address a DNS name resolves to), and
//!   libzmq sends each request to the next connected one.

use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use shared::protocol::{parse_reply, Reply};
use shared::ErrorCode;

/// How hard to try.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Time to wait for each reply.
    pub timeout: Duration,
    /// Attempts after the first.
    pub retries: u32,
    /// First backoff; doubles per retry up to `max_backoff`.
    pub backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            timeout: Duration::from_secs(2),
            retries: 5,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// What the client did, for tests and reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests that got an `OK`.
    pub ok: u64,
    /// Requests that failed for good.
    pub failed: u64,
    /// Attempts repeated (any reason).
    pub retries: u64,
    /// Attempts that timed out.
    pub timeouts: u64,
    /// `ERR draining` replies seen.
    pub draining: u64,
    /// `ERR overloaded` replies seen.
    pub overloaded: u64,
    /// Sockets reopened.
    pub reconnects: u64,
}

/// Why a request failed for good.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker answered `ERR` with a code that is not retried.
    #[error("ERR {code}: {message}")]
    Refused {
        /// The code.
        code: ErrorCode,
        /// The message.
        message: String,
    },
    /// Every attempt timed out or was told to go elsewhere.
    #[error("no OK reply after {attempts} attempts")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
    },
    /// The reply did not follow the protocol.
    #[error("malformed reply: {0}")]
    Malformed(String),
    /// An endpoint did not resolve.
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
    /// libzmq refused a socket operation.
    #[error("{0}: {1}")]
    Zmq(&'static str, zmq::Error),
}

/// Expands `tcp://name:port` into one endpoint per resolved address (other transports and
/// literal addresses pass through).
pub fn resolve(endpoints: &[String]) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for endpoint in endpoints {
        let Some(hostport) = endpoint.strip_prefix("tcp://") else {
            out.push(endpoint.clone());
            continue;
        };
        let addrs = hostport
            .to_socket_addrs()
            .map_err(|e| Error::Resolve(endpoint.clone(), e))?;
        let mut seen: Vec<String> = addrs.map(|a| format!("tcp://{a}")).collect();
        seen.sort();
        seen.dedup();
        out.extend(seen);
    }
    Ok(out)
}

/// A retrying request/reply client.
pub struct Client {
    ctx: zmq::Context,
    endpoints: Vec<String>,
    socket: Option<zmq::Socket>,
    policy: RetryPolicy,
    stats: Stats,
}

impl Client {
    /// A client of `endpoints` (resolved now; connections open on first use).
    pub fn new(endpoints: &[String], policy: RetryPolicy) -> Result<Client, Error> {
        Ok(Client {
            ctx: zmq::Context::new(),
            endpoints: resolve(endpoints)?,
            socket: None,
            policy,
            stats: Stats::default(),
        })
    }

    /// What the client has done so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    fn socket(&mut self) -> Result<&zmq::Socket, Error> {
        if self.socket.is_none() {
            let socket = self
                .ctx
                .socket(zmq::REQ)
                .map_err(|e| Error::Zmq("socket", e))?;
            // Closing must never wait; an unanswered request is retried on a new socket.
            socket.set_linger(0).map_err(|e| Error::Zmq("linger", e))?;
            // Only queue to peers that are connected.
            socket
                .set_immediate(true)
                .map_err(|e| Error::Zmq("immediate", e))?;
            for endpoint in &self.endpoints {
                socket
                    .connect(endpoint)
                    .map_err(|e| Error::Zmq("connect", e))?;
            }
            self.socket = Some(socket);
        }
        self.socket
            .as_ref()
            .ok_or(Error::Zmq("socket", zmq::Error::EFAULT))
    }

    fn reopen(&mut self) {
        self.socket = None;
        self.stats.reconnects += 1;
    }

    /// Sends `body` and returns the frames after `OK`, retrying as the policy allows.
    pub fn request(&mut self, body: &[&[u8]]) -> Result<Vec<Vec<u8>>, Error> {
        let mut backoff = self.policy.backoff;
        let attempts = self.policy.retries + 1;
        for attempt in 0..attempts {
            if attempt > 0 {
                self.stats.retries += 1;
                std::thread::sleep(jitter(backoff));
                backoff = (backoff * 2).min(self.policy.max_backoff);
            }
            match self.attempt(body)? {
                Some(Reply::Ok(frames)) => {
                    self.stats.ok += 1;
                    return Ok(frames);
                }
                Some(Reply::Err { code, message }) => match code {
                    ErrorCode::Draining | ErrorCode::Overloaded => {
                        if code == ErrorCode::Draining {
                            self.stats.draining += 1;
                        } else {
                            self.stats.overloaded += 1;
                        }
                        // A fresh connection lets a balancer pick another instance.
                        self.reopen();
                    }
                    _ => {
                        self.stats.failed += 1;
                        return Err(Error::Refused { code, message });
                    }
                },
                None => {
                    self.stats.timeouts += 1;
                    self.reopen();
                }
            }
        }
        self.stats.failed += 1;
        Err(Error::GaveUp { attempts })
    }

    /// One attempt: the reply, or `None` on timeout.
    fn attempt(&mut self, body: &[&[u8]]) -> Result<Option<Reply<Vec<u8>>>, Error> {
        let timeout = self.policy.timeout;
        let deadline = Instant::now() + timeout;
        let socket = self.socket()?;
        // With ZMQ_IMMEDIATE and no connected peer the send would block: wait for one.
        loop {
            match socket.send_multipart(body, zmq::DONTWAIT) {
                Ok(()) => break,
                Err(zmq::Error::EAGAIN) if Instant::now() < deadline => {
                    match socket.poll(zmq::POLLOUT, 10) {
                        Ok(_) | Err(zmq::Error::EINTR) => continue,
                        Err(e) => return Err(Error::Zmq("poll", e)),
                    }
                }
                Err(zmq::Error::EAGAIN) => return Ok(None),
                Err(e) => return Err(Error::Zmq("send", e)),
            }
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match socket.poll(zmq::POLLIN, left.as_millis() as i64) {
                Ok(0) => return Ok(None),
                Ok(_) => break,
                Err(zmq::Error::EINTR) => continue,
                Err(e) => return Err(Error::Zmq("poll", e)),
            }
        }
        let frames = socket
            .recv_multipart(0)
            .map_err(|e| Error::Zmq("recv", e))?;
        parse_reply(frames)
            .map(Some)
            .map_err(|e| Error::Malformed(e.to_string()))
    }
}

/// Up to 25% random-ish jitter, so clients that failed together do not retry together.
fn jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()))
        ^ u64::from(std::process::id());
    let spread = base.as_micros() as u64 / 4;
    base + Duration::from_micros(if spread == 0 { 0 } else { nanos % spread })
}
