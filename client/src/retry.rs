//! A retrying request/reply client, the behaviour docs/protocol.md asks of clients in any
//! language (the zguide's Lazy Pirate pattern, on a DEALER):
//!
//! - every request carries a fresh 8-byte id in its envelope (`[id, "", body...]`) and only a
//!   reply with that id answers it: a late reply to an earlier, timed-out attempt is
//!   discarded, never taken for the current request;
//! - every attempt has a timeout; on timeout the socket is closed and reopened (the old
//!   connection may be to a dead pod);
//! - every attempt carries its deadline, the header frame `\0broker.timeout-ms=N` right after
//!   the envelope, N what is left of that attempt's timeout when it is sent: the broker never
//!   starts work whose client has stopped waiting, and the handler knows how long it has. It
//!   is the attempt's timeout, not the call's, because a reply after it is discarded (the next
//!   attempt has a new id); the call has no deadline of its own;
//! - `ERR draining`, `ERR overloaded` and `ERR deadline_exceeded` (the attempt's budget ran out
//!   before its work could be done: a timeout the broker saw first) are retried after a
//!   backoff, on a fresh connection so a load balancer can pick another instance; other `ERR`
//!   replies are final;
//! - the socket connects to every address of every endpoint and re-resolves names on a timer
//!   (default 30 s) and on every reconnect, connecting to new addresses and dropping vanished
//!   ones, so pods added by an autoscaler get their share and replaced pods are forgotten.

use std::time::{Duration, Instant};

use shared::protocol::{parse_reply, timeout_header, Reply};
use shared::ErrorCode;

use crate::resolve::{self, Dns, Resolve};
use crate::security::Security;

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
    /// How often names are resolved again while the socket is open.
    pub reresolve: Duration,
    /// Send each attempt's deadline header (on by default). Off only for a server that would
    /// take it for body: a broker older than the header, or a plain ZeroMQ service.
    pub deadline_header: bool,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            timeout: Duration::from_secs(2),
            retries: 5,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            reresolve: Duration::from_secs(30),
            deadline_header: true,
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
    /// `ERR deadline_exceeded` replies seen.
    pub deadline_exceeded: u64,
    /// Sockets reopened.
    pub reconnects: u64,
    /// Replies discarded because they answered an earlier attempt.
    pub stale: u64,
    /// Endpoints connected after a resolution found them new.
    pub added: u64,
    /// Endpoints disconnected after a resolution no longer returned them.
    pub removed: u64,
}

impl Stats {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Stats) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.retries += other.retries;
        self.timeouts += other.timeouts;
        self.draining += other.draining;
        self.overloaded += other.overloaded;
        self.deadline_exceeded += other.deadline_exceeded;
        self.reconnects += other.reconnects;
        self.stale += other.stale;
        self.added += other.added;
        self.removed += other.removed;
    }
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
    #[error(transparent)]
    Resolve(#[from] resolve::Error),
    /// libzmq refused a socket operation.
    #[error("{0}: {1}")]
    Zmq(&'static str, zmq::Error),
}

/// A retrying request/reply client.
pub struct Client {
    ctx: zmq::Context,
    endpoints: Vec<String>,
    resolver: Box<dyn Resolve>,
    security: Security,
    socket: Option<zmq::Socket>,
    connected: Vec<String>,
    next_resolve: Instant,
    policy: RetryPolicy,
    stats: Stats,
    next_id: u64,
}

impl Client {
    /// A client of `endpoints`, resolved with DNS (names are checked now; connections open on
    /// first use).
    pub fn new(endpoints: &[String], policy: RetryPolicy) -> Result<Client, Error> {
        Client::with_resolver(endpoints, policy, Dns, Security::None)
    }

    /// A client of `endpoints`, resolved with DNS, that connects with `security` (CURVE).
    pub fn with_security(
        endpoints: &[String],
        policy: RetryPolicy,
        security: Security,
    ) -> Result<Client, Error> {
        Client::with_resolver(endpoints, policy, Dns, security)
    }

    /// A client that resolves `endpoints` with `resolver` and connects with `security`.
    pub fn with_resolver(
        endpoints: &[String],
        policy: RetryPolicy,
        resolver: impl Resolve + 'static,
        security: Security,
    ) -> Result<Client, Error> {
        resolver.resolve(endpoints)?;
        Ok(Client {
            ctx: zmq::Context::new(),
            endpoints: endpoints.to_vec(),
            resolver: Box::new(resolver),
            security,
            socket: None,
            connected: Vec::new(),
            next_resolve: Instant::now(),
            policy,
            stats: Stats::default(),
            // Ids from different client processes need not differ: a reply comes back on the
            // connection its request went out on. A time-based start only makes logs clearer.
            next_id: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        })
    }

    /// What the client has done so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The endpoints the socket is connected to now.
    pub fn connected(&self) -> &[String] {
        &self.connected
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
                    ErrorCode::Draining | ErrorCode::Overloaded | ErrorCode::DeadlineExceeded => {
                        match code {
                            ErrorCode::Draining => self.stats.draining += 1,
                            ErrorCode::Overloaded => self.stats.overloaded += 1,
                            _ => self.stats.deadline_exceeded += 1,
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

    fn reopen(&mut self) {
        self.socket = None;
        self.connected.clear();
        // Resolve again before reconnecting: the pods may have changed.
        self.next_resolve = Instant::now();
        self.stats.reconnects += 1;
    }

    /// The socket, opened and connected, with names re-resolved if due.
    fn socket(&mut self) -> Result<&zmq::Socket, Error> {
        let now = Instant::now();
        if self.socket.is_none() {
            let socket = self
                .ctx
                .socket(zmq::DEALER)
                .map_err(|e| Error::Zmq("socket", e))?;
            // Closing must never wait; an unanswered request is retried on a new socket.
            socket.set_linger(0).map_err(|e| Error::Zmq("linger", e))?;
            // IPv6 endpoints as well as IPv4 ones (libzmq connects IPv4 only by default).
            socket.set_ipv6(true).map_err(|e| Error::Zmq("ipv6", e))?;
            // Not ZMQ_IMMEDIATE, though it would keep requests off an address that does not
            // answer: with it, libzmq 4.3.4 ends a pipe at once when its connection drops, drops
            // what the pipe held (the reply that came with a recycled connection's close, or the
            // next request), and can abort the process (`!_more` in fq.cpp, libzmq #3485) when
            // that happens mid-message, which the broker's connection age makes routine. A
            // request queued to a dead address costs one timeout, then a fresh socket and the
            // names resolved again.
            self.security.apply(&socket)?;
            self.socket = Some(socket);
            self.next_resolve = now;
        }
        if now >= self.next_resolve {
            self.next_resolve = now + self.policy.reresolve;
            match self.resolver.resolve(&self.endpoints) {
                Ok(wanted) => self.reconcile(wanted)?,
                // Keep what is connected; a resolver outage must not cut the client off.
                Err(e) if !self.connected.is_empty() => log::warn!("{e}; keeping connections"),
                Err(e) => return Err(e.into()),
            }
        }
        self.socket
            .as_ref()
            .ok_or(Error::Zmq("socket", zmq::Error::EFAULT))
    }

    /// Connects to endpoints that are new and disconnects from those no longer wanted.
    fn reconcile(&mut self, wanted: Vec<String>) -> Result<(), Error> {
        let Some(socket) = &self.socket else {
            return Ok(());
        };
        for endpoint in &wanted {
            if !self.connected.contains(endpoint) {
                socket
                    .connect(endpoint)
                    .map_err(|e| Error::Zmq("connect", e))?;
                if !self.connected.is_empty() {
                    self.stats.added += 1;
                }
            }
        }
        for endpoint in &self.connected {
            if !wanted.contains(endpoint) {
                // Already gone (the peer closed) is not an error.
                let _ = socket.disconnect(endpoint);
                self.stats.removed += 1;
            }
        }
        self.connected = wanted;
        Ok(())
    }

    /// One attempt: the reply, or `None` on timeout.
    fn attempt(&mut self, body: &[&[u8]]) -> Result<Option<Reply<Vec<u8>>>, Error> {
        let deadline = Instant::now() + self.policy.timeout;
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id.to_be_bytes();
        let with_header = self.policy.deadline_header;
        let socket = self.socket()?;
        // At its high-water mark the send would block: wait for room, within the attempt.
        loop {
            // The budget is what is left when the request leaves, not when it was first tried.
            let header = timeout_header(deadline.saturating_duration_since(Instant::now()));
            let mut frames: Vec<&[u8]> = Vec::with_capacity(body.len() + 3);
            frames.extend([&id[..], b""]);
            if with_header {
                frames.push(&header[..]);
            }
            frames.extend_from_slice(body);
            match socket.send_multipart(&frames, zmq::DONTWAIT) {
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
        let mut stale = 0;
        let reply = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match socket.poll(zmq::POLLIN, left.as_millis().max(1) as i64) {
                Ok(0) if Instant::now() >= deadline => break None,
                Ok(0) | Err(zmq::Error::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(Error::Zmq("poll", e)),
            }
            let mut reply = socket
                .recv_multipart(zmq::DONTWAIT)
                .map_err(|e| Error::Zmq("recv", e))?;
            // Only a reply carrying this attempt's id answers it.
            if reply.len() < 2 || reply[0] != id || !reply[1].is_empty() {
                stale += 1;
                continue;
            }
            reply.drain(..2);
            break Some(reply);
        };
        self.stats.stale += stale;
        reply
            .map(|frames| parse_reply(frames).map_err(|e| Error::Malformed(e.to_string())))
            .transpose()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A ROUTER on a free loopback port standing in for the broker, and its endpoint.
    fn peer() -> (zmq::Socket, String) {
        let peer = zmq::Context::new().socket(zmq::ROUTER).expect("router");
        peer.bind("tcp://127.0.0.1:0").expect("bind");
        let endpoint = peer.get_last_endpoint().expect("endpoint").expect("utf-8");
        (peer, endpoint)
    }

    /// A peer that answers with someone else's id first (a late reply to an earlier attempt,
    /// as a proxy that kept the connection could deliver it), then with the right one.
    #[test]
    fn a_reply_with_another_id_is_discarded_and_counted() {
        let (peer, endpoint) = peer();
        let server = std::thread::spawn(move || {
            let request = peer.recv_multipart(0).expect("request");
            assert_eq!(
                request.len(),
                5,
                "[routing id, request id, \"\", deadline header, body]"
            );
            let (routing, id, body) = (&request[0], &request[1], &request[4]);
            let mut old = id.clone();
            old[7] ^= 1;
            for reply_id in [&old, id] {
                let frames: [&[u8]; 5] = [routing, reply_id, b"", b"OK", body];
                peer.send_multipart(frames, 0).expect("reply");
            }
            // Kept open until the client has its reply: closing a socket right after a send
            // can lose what is still queued.
            peer
        });
        let policy = RetryPolicy {
            timeout: Duration::from_secs(5),
            retries: 0,
            ..RetryPolicy::default()
        };
        let mut client = Client::new(&[endpoint], policy).expect("client");
        assert_eq!(
            client.request(&[b"mine"]).expect("reply"),
            [b"mine".to_vec()]
        );
        drop(server.join().expect("peer"));
        assert_eq!((client.stats().stale, client.stats().ok), (1, 1));
    }

    /// A peer that lets the first attempt time out and answers the second: each attempt carries
    /// a deadline header after its envelope, of at most the attempt's timeout, and the body
    /// follows it unchanged.
    #[test]
    fn every_attempt_carries_what_is_left_of_its_timeout() {
        let (peer, endpoint) = peer();
        let timeout = Duration::from_millis(300);
        let server = std::thread::spawn(move || {
            let mut budgets = Vec::new();
            for attempt in 0..2 {
                let request = peer.recv_multipart(0).expect("request");
                let [routing, id, delimiter, header, body] = &request[..] else {
                    panic!("attempt {attempt}: {request:?}");
                };
                assert!(delimiter.is_empty() && body == b"job", "{request:?}");
                let budget = shared::protocol::parse_timeout_header(header)
                    .unwrap_or_else(|| panic!("not a deadline header: {header:?}"))
                    .expect("well formed");
                budgets.push(budget);
                if attempt == 1 {
                    let frames: [&[u8]; 5] = [routing, id, b"", b"OK", body];
                    peer.send_multipart(frames, 0).expect("reply");
                }
            }
            (peer, budgets)
        });
        let policy = RetryPolicy {
            timeout,
            retries: 1,
            ..RetryPolicy::default()
        };
        let mut client = Client::new(&[endpoint], policy).expect("client");
        assert_eq!(client.request(&[b"job"]).expect("reply"), [b"job".to_vec()]);
        let (_peer, budgets) = server.join().expect("peer");
        assert_eq!(budgets.len(), 2);
        for budget in budgets {
            assert!(budget <= timeout, "{budget:?} is more than the attempt has");
        }
        assert_eq!((client.stats().timeouts, client.stats().ok), (1, 1));
    }

    /// `ERR deadline_exceeded` (the budget ran out at the broker) is retried on a fresh
    /// connection, as a timeout would be, and counted.
    #[test]
    fn deadline_exceeded_is_retried_on_a_fresh_connection() {
        let (peer, endpoint) = peer();
        let server = std::thread::spawn(move || {
            for attempt in 0..2 {
                let request = peer.recv_multipart(0).expect("request");
                let (routing, id) = (&request[0], &request[1]);
                let body: &[&[u8]] = match attempt {
                    0 => &[b"ERR", b"deadline_exceeded", b"the budget ran out"],
                    _ => &[b"OK", b"done"],
                };
                let frames = [&routing[..], &id[..], b""]
                    .into_iter()
                    .chain(body.iter().copied());
                peer.send_multipart(frames, 0).expect("reply");
            }
            peer
        });
        let policy = RetryPolicy {
            timeout: Duration::from_secs(5),
            retries: 1,
            backoff: Duration::from_millis(1),
            ..RetryPolicy::default()
        };
        let mut client = Client::new(&[endpoint], policy).expect("client");
        assert_eq!(
            client.request(&[b"job"]).expect("reply"),
            [b"done".to_vec()]
        );
        drop(server.join().expect("peer"));
        let stats = client.stats();
        assert_eq!(
            (
                stats.deadline_exceeded,
                stats.retries,
                stats.reconnects,
                stats.ok
            ),
            (1, 1, 1, 1),
            "{stats:?}"
        );
    }
}
