//! Front connections as the broker accounts for them: each one libzmq accepts is duplicated
//! (so it can be measured and shut down without racing libzmq), counted against
//! `--max-connections`, and carries byte counters that bound what libzmq holds for it.
//!
//! The coordinator owns the [`Table`]: it learns of connections from the front socket's
//! monitor, attributes every request it reads to its connection (`__fd` metadata), and counts
//! reply bytes as it sends them. The guard thread reads the same [`Conn`] values through the
//! [`Registry`], measures them with `TCP_INFO`, and shuts down those over their limits.
//!
//! Per connection, in wire bytes (ZMTP framing included):
//! - held inbound = bytes the kernel received - bytes of requests the coordinator read - the
//!   handshake allowance - the heartbeat credit: the kernel's receive buffer, a message libzmq
//!   is still receiving, and complete requests not yet read. ZMTP heartbeats (PING) are read
//!   by libzmq, never by the broker; libzmq answers each with a PONG two bytes shorter, which
//!   shows as bytes the peer acknowledged beyond the replies the broker sent, so 9/7 of those
//!   (a 9-byte PING per 7-byte PONG) are credited back;
//! - held outbound = bytes of replies handed to libzmq - (bytes the peer acknowledged - the
//!   handshake libzmq wrote): replies in libzmq's queue and in the kernel's send buffer.
//!
//! With `--max-connection-age`, each TCP connection also has a jittered expiry and a
//! [`Phase`] of its recycling; [`Table::sweep_ages`] applies `coordinator::age::decide` to
//! them and makes the socket calls (cork, half-close, abort).

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use shared::metrics::ResetReason;
use shared::protocol::FRAME_OVERHEAD;

use crate::coordinator::age::{self, Phase, Step, Swept, View};
use crate::sys::{self, TcpCounters};

/// What libzmq reads of a connection before any request: the ZMTP greeting (64 bytes) and the
/// READY command with the peer's metadata (socket type and a routing id of up to 255 bytes).
pub const HANDSHAKE_ALLOWANCE: u64 = 1024;

/// One front connection, shared by the coordinator and the guard.
#[derive(Debug)]
pub struct Conn {
    /// A serial number, unique for the broker's life (fd numbers are reused).
    pub id: u64,
    /// The broker's duplicate of libzmq's socket.
    fd: OwnedFd,
    /// The kernel counts its bytes (TCP). An ipc:// connection has no such counters: its
    /// bytes are not bounded per connection (nothing could say when they leave), only by the
    /// process-wide memory guard.
    measurable: bool,
    /// When libzmq accepted it.
    pub opened: Instant,
    /// Wire bytes of requests the coordinator read from it.
    pub consumed: AtomicU64,
    /// Wire bytes of replies the coordinator handed to libzmq for it.
    pub sent: AtomicU64,
    /// `tcpi_bytes_received` at the last measurement.
    pub received: AtomicU64,
    /// `tcpi_bytes_acked` at the last measurement.
    pub acked: AtomicU64,
    /// What libzmq wrote before any reply (greeting, READY), measured at the first request.
    pub handshake_out: AtomicU64,
    /// The most that the peer's acknowledged bytes have exceeded the replies sent: what libzmq
    /// wrote on its own (PONGs), a lower bound that only grows.
    pub own_out: AtomicU64,
    /// Set once the broker shut the connection down; the reason is in `reset`.
    reset: AtomicU8,
    /// Refused at accept (over `--max-connections`): never served.
    refused: AtomicBool,
}

impl Conn {
    fn new(id: u64, fd: OwnedFd) -> Conn {
        let measurable = sys::tcp_counters(fd.as_fd()).is_ok();
        Conn {
            id,
            fd,
            measurable,
            opened: Instant::now(),
            consumed: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            handshake_out: AtomicU64::new(0),
            own_out: AtomicU64::new(0),
            reset: AtomicU8::new(0),
            refused: AtomicBool::new(false),
        }
    }

    /// Reads the kernel's counters now and records them.
    pub fn measure(&self) -> std::io::Result<TcpCounters> {
        let counters = sys::tcp_counters(self.fd.as_fd())?;
        self.received.store(counters.received, Ordering::Relaxed);
        let acked = self
            .acked
            .fetch_max(counters.acked, Ordering::Relaxed)
            .max(counters.acked);
        let delivered = acked.saturating_sub(self.handshake_out.load(Ordering::Relaxed));
        let surplus = delivered.saturating_sub(self.sent.load(Ordering::Relaxed));
        self.own_out.fetch_max(surplus, Ordering::Relaxed);
        Ok(counters)
    }

    /// Inbound bytes held for this connection as of the last measurement.
    pub fn held_in(&self) -> u64 {
        let heartbeats = self.own_out.load(Ordering::Relaxed) / 7 * 9;
        self.received
            .load(Ordering::Relaxed)
            .saturating_sub(self.consumed.load(Ordering::Relaxed))
            .saturating_sub(HANDSHAKE_ALLOWANCE)
            .saturating_sub(heartbeats)
    }

    /// Outbound bytes held for this connection as of the last measurement.
    pub fn held_out(&self) -> u64 {
        if !self.measurable {
            return 0;
        }
        let delivered = self
            .acked
            .load(Ordering::Relaxed)
            .saturating_sub(self.handshake_out.load(Ordering::Relaxed));
        self.sent.load(Ordering::Relaxed).saturating_sub(delivered)
    }

    /// Resets the connection (libzmq then drops it and everything it held) and records why.
    /// Returns false if it was already reset.
    pub fn reset(&self, reason: ResetReason) -> bool {
        if !self.mark(reason) {
            return false;
        }
        self.abort();
        true
    }

    /// Records why the broker is closing it; false if that was already decided.
    fn mark(&self, reason: ResetReason) -> bool {
        // Stored as index + 1: 0 is "not reset".
        let mark = reason.index() as u8 + 1;
        self.reset
            .compare_exchange(0, mark, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Half-closes the connection (`shutdown(SHUT_WR)`: a FIN behind whatever is already in
    /// the kernel) and records why. Returns false if it was already reset.
    fn half_close(&self, reason: ResetReason) -> bool {
        if !self.mark(reason) {
            return false;
        }
        let how = nix::sys::socket::Shutdown::Write;
        if let Err(e) = nix::sys::socket::shutdown(self.fd.as_raw_fd(), how) {
            // Already gone (the peer closed first): libzmq reports it closed either way.
            log::debug!("half-close of connection {} failed ({e})", self.id);
        }
        true
    }

    /// Corks or uncorks the connection (see [`sys::set_cork`]); a failure only loses the
    /// reply's company of the FIN.
    fn cork(&self, on: bool) {
        if let Err(e) = sys::set_cork(self.fd.as_fd(), on) {
            log::debug!("cork {on} of connection {} failed ({e})", self.id);
        }
    }

    /// Refuses the connection at accept (over `--max-connections`): closed at once, never
    /// served, counted as refused rather than reset.
    fn refuse(&self) {
        self.refused.store(true, Ordering::Relaxed);
        self.abort();
    }

    fn abort(&self) {
        // The last count of what the peer acknowledged: an abort zeroes the kernel's
        // counters, and what was acknowledged until now is delivered, not lost with it.
        let _ = self.measure();
        if let Err(e) = sys::abort_connection(self.fd.as_fd()) {
            // Not expected on Linux; a shutdown and an empty receive queue end it too, if the
            // peer stops sending.
            log::debug!(
                "abort of connection {} failed ({e}); shutting it down",
                self.id
            );
            let _ =
                nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            sys::discard_input(self.fd.as_fd());
        }
    }

    /// Why the broker shut it down, if it did.
    pub fn reset_reason(&self) -> Option<ResetReason> {
        let mark = self.reset.load(Ordering::Acquire);
        ResetReason::ALL
            .get(usize::from(mark).checked_sub(1)?)
            .copied()
    }

    /// True if it was refused at accept.
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }
}

/// The live connections, for the guard's scans.
#[derive(Debug, Default)]
pub struct Registry {
    live: Mutex<Vec<Arc<Conn>>>,
}

impl Registry {
    /// A copy of the live list; the `Arc`s keep each socket open while the caller uses it.
    pub fn snapshot(&self) -> Vec<Arc<Conn>> {
        self.live.lock().clone()
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.live.lock().len()
    }

    /// True when no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn add(&self, conn: Arc<Conn>) {
        self.live.lock().push(conn);
    }

    fn remove(&self, id: u64) {
        self.live.lock().retain(|c| c.id != id);
    }
}

/// What became of a connection the monitor reported accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Tracked and served.
    Tracked,
    /// Over `--max-connections`: shut down at once.
    Refused,
    /// Could not be duplicated or is not a front connection (it closed before the event was
    /// read and its number was reused).
    Untracked,
}

/// What the table knows of the connection a request came through.
#[derive(Debug, PartialEq, Eq)]
pub enum Attribution {
    /// A served connection, by id; `first` for its first request.
    Tracked {
        /// The connection's serial number.
        id: u64,
        /// This is the first request read from it.
        first: bool,
    },
    /// Over `--max-connections` and being closed: the request is not served.
    Refused,
    /// Not tracked (its events were lost, or it closed before they were read). ipc://
    /// connections are tracked and counted, but have no TCP counters: only the process-wide
    /// memory guard bounds what they hold.
    Untracked,
}

/// A closed connection's final figures.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed {
    /// The connection's serial number.
    pub id: u64,
    /// Replies handed to libzmq that the peer never acknowledged: lost with the connection.
    pub undelivered: u64,
    /// Why the broker closed it, if it did.
    pub reset: Option<ResetReason>,
    /// It was refused at accept.
    pub refused: bool,
}

/// The coordinator's view of one connection: the shared counters, the end offset and frame
/// count of each reply not yet known to be delivered (to count what is lost if the peer goes,
/// and what libzmq holds per frame), and what its requests in flight cost.
#[derive(Debug)]
struct Tracked {
    conn: Arc<Conn>,
    pending: VecDeque<(u64, u32)>,
    /// Frames of the replies in `pending`.
    pending_frames: u64,
    /// In-flight cost of its requests read and not yet answered.
    inflight: u64,
    first_request_seen: bool,
    /// Its CURVE client key, learnt from its first request (with `--curve-allow-keys`).
    key: Option<shared::curve::Key>,
    /// Its recycling, with `--max-connection-age` (TCP connections only: an ipc:// client has
    /// no balancer to be sent elsewhere by).
    aging: Option<Aging>,
}

/// A connection's recycling under `--max-connection-age`.
#[derive(Debug)]
struct Aging {
    /// When it reaches its age.
    expires: Instant,
    phase: Phase,
    /// When its last request was read (or it opened), to the turn.
    last_read: Instant,
    /// While corked: the bytes libzmq had written into the kernel at the last look.
    written_seen: Option<u64>,
}

/// `--max-connection-age` and its grace, with the seed of each connection's jitter.
#[derive(Debug)]
struct AgeLimit {
    age: Duration,
    grace: Duration,
    seed: RandomState,
}

/// At most this many reply offsets are kept per connection before a measurement trims them.
const PENDING_TRIM: usize = 1024;

/// Every front connection, indexed by libzmq's fd number (small and dense), owned by the
/// coordinator.
#[derive(Debug)]
pub struct Table {
    by_fd: Vec<Option<Tracked>>,
    registry: Arc<Registry>,
    max: usize,
    front_port: Option<u16>,
    next_id: u64,
    open: usize,
    /// Outbound bytes held for all connections: exact after [`Table::resync`], raised by
    /// every reply sent, lowered by every measurement.
    out_estimate: u64,
    /// `--max-connection-age`, if set.
    ages: Option<AgeLimit>,
    /// When the age sweep must look again (the earliest any connection asked for).
    next_age_check: Option<Instant>,
    /// An aged connection's last held request was answered: sweep at the next turn.
    age_check_now: bool,
    /// Requests read from connections already closed for their age, since the last sweep.
    crossed: u64,
    /// The time of the coordinator's turn, as the last sweep was told: stamps reads.
    turn: Instant,
}

impl Table {
    /// A table that refuses connections beyond `max`. `front_port` (the front socket's TCP
    /// port) tells a front connection from any other socket a reused fd number may name.
    pub fn new(max: usize, front_port: Option<u16>, registry: Arc<Registry>) -> Table {
        Table {
            by_fd: Vec::new(),
            registry,
            max,
            front_port,
            next_id: 0,
            open: 0,
            out_estimate: 0,
            ages: None,
            next_age_check: None,
            age_check_now: false,
            crossed: 0,
            turn: Instant::now(),
        }
    }

    /// Closes connections `age` after they opened (`None`: never), jittered by up to 10 %
    /// either way, and after `grace` more regardless.
    pub fn with_age_limit(mut self, age: Option<Duration>, grace: Duration) -> Table {
        self.ages = age.map(|age| AgeLimit {
            age,
            grace,
            seed: RandomState::new(),
        });
        self
    }

    /// Connections open now (refused ones excluded).
    pub fn open(&self) -> usize {
        self.open
    }

    /// The monitor reported `zmq_fd` accepted.
    pub fn accepted(&mut self, zmq_fd: RawFd) -> Accepted {
        let Ok(index) = usize::try_from(zmq_fd) else {
            return Accepted::Untracked;
        };
        let Ok(fd) = sys::dup_socket(zmq_fd) else {
            return Accepted::Untracked;
        };
        if let Some(port) = self.front_port {
            let local =
                nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd());
            let ours = local.ok().is_some_and(|addr| {
                addr.as_sockaddr_in().map(|a| a.port()) == Some(port)
                    || addr.as_sockaddr_in6().map(|a| a.port()) == Some(port)
            });
            if !ours {
                return Accepted::Untracked;
            }
        }
        if self.by_fd.len() <= index {
            self.by_fd.resize_with(index + 1, || None);
        }
        if let Some(stale) = self.by_fd[index].take() {
            // Its DISCONNECTED event was lost or is still queued: close it out now.
            self.finish(stale);
        }
        self.next_id += 1;
        let conn = Arc::new(Conn::new(self.next_id, fd));
        let mut aging = None;
        let verdict = if self.open >= self.max {
            conn.refuse();
            Accepted::Refused
        } else {
            self.open += 1;
            self.registry.add(Arc::clone(&conn));
            if let Some(limit) = self.ages.as_ref().filter(|_| conn.measurable) {
                let expires = conn.opened + jittered(limit.age, limit.seed.hash_one(conn.id));
                self.next_age_check = Some(self.next_age_check.map_or(expires, |t| t.min(expires)));
                aging = Some(Aging {
                    expires,
                    phase: Phase::Young,
                    last_read: conn.opened,
                    written_seen: None,
                });
            }
            Accepted::Tracked
        };
        self.by_fd[index] = Some(Tracked {
            conn,
            pending: VecDeque::new(),
            pending_frames: 0,
            inflight: 0,
            first_request_seen: false,
            key: None,
            aging,
        });
        verdict
    }

    /// The monitor reported `zmq_fd` closed. Returns its final figures if it was tracked.
    pub fn disconnected(&mut self, zmq_fd: RawFd) -> Option<Closed> {
        let index = usize::try_from(zmq_fd).ok()?;
        let tracked = self.by_fd.get_mut(index)?.take()?;
        Some(self.finish(tracked))
    }

    fn finish(&mut self, mut tracked: Tracked) -> Closed {
        let conn = Arc::clone(&tracked.conn);
        self.out_estimate = self.out_estimate.saturating_sub(tracked.counted_out());
        // Our duplicate keeps the socket readable after libzmq closed it: this is the exact
        // count of what the peer acknowledged.
        let _ = conn.measure();
        trim(&mut tracked);
        let refused = conn.refused();
        if !refused {
            self.open -= 1;
            self.registry.remove(conn.id);
        }
        Closed {
            id: conn.id,
            undelivered: tracked.pending.len() as u64,
            reset: conn.reset_reason(),
            refused,
        }
    }

    /// The connection a request read from `zmq_fd` came through, with its wire size counted.
    pub fn request_read(&mut self, zmq_fd: RawFd, wire_bytes: u64) -> Attribution {
        let turn = self.turn;
        let Some(tracked) = self.get_mut(zmq_fd) else {
            return Attribution::Untracked;
        };
        let conn = &tracked.conn;
        conn.consumed.fetch_add(wire_bytes, Ordering::Relaxed);
        if conn.refused() {
            return Attribution::Refused;
        }
        if let Some(aging) = tracked.aging.as_mut() {
            if matches!(aging.phase, Phase::Closing { .. } | Phase::Done) {
                // It crossed the close: its reply could not leave. Counted by the next sweep.
                self.crossed += 1;
                return Attribution::Refused;
            }
            aging.last_read = turn;
        }
        let first = !tracked.first_request_seen;
        if first {
            tracked.first_request_seen = true;
            // The peer acknowledged our greeting and READY before it could send a request.
            if let Ok(counters) = conn.measure() {
                conn.handshake_out.store(counters.acked, Ordering::Relaxed);
            }
        }
        Attribution::Tracked { id: conn.id, first }
    }

    /// Records the CURVE key connection `zmq_fd` authenticated with.
    pub fn set_key(&mut self, zmq_fd: RawFd, key: shared::curve::Key) {
        if let Some(tracked) = self.get_mut(zmq_fd) {
            tracked.key = Some(key);
        }
    }

    /// Resets connection `zmq_fd` for `reason`; true if this call reset it.
    pub fn reset(&mut self, zmq_fd: RawFd, reason: ResetReason) -> bool {
        self.get_mut(zmq_fd)
            .is_some_and(|tracked| tracked.conn.reset(reason))
    }

    /// Resets every connection whose CURVE key `allowed` refuses; returns how many.
    pub fn revoke(&mut self, allowed: impl Fn(&shared::curve::Key) -> bool) -> u64 {
        let mut revoked = 0;
        for tracked in self.by_fd.iter().flatten() {
            if tracked.key.as_ref().is_some_and(|key| !allowed(key))
                && tracked.conn.reset(ResetReason::Revoked)
            {
                revoked += 1;
            }
        }
        revoked
    }

    /// Outbound bytes held for connection `id` on `zmq_fd` (wire bytes plus
    /// [`FRAME_OVERHEAD`] per unacknowledged reply frame, what libzmq holds in memory), measured
    /// now if the recorded figure is above `limit` (it may be stale). `None` if that
    /// connection is gone.
    pub fn held_out(&mut self, zmq_fd: RawFd, id: u64, limit: u64) -> Option<u64> {
        let tracked = self.get_mut(zmq_fd).filter(|t| t.conn.id == id)?;
        let before = tracked.held_out();
        if before <= limit {
            return Some(before);
        }
        let _ = tracked.conn.measure();
        trim(tracked);
        let after = tracked.held_out();
        self.out_estimate = self.out_estimate.saturating_sub(before - after.min(before));
        Some(after)
    }

    /// True when connection `id` can hold a request of `cost` more within `cap` (the requests
    /// it has in flight and the replies it has not read, together): a client may pipeline as
    /// deep as it likes within its byte bound, and beyond it is refused before any work is
    /// done for a reply it could not be sent. Untracked connections always fit.
    pub fn fits(&mut self, zmq_fd: RawFd, id: u64, cost: u64, cap: u64) -> bool {
        let Some(inflight) = self
            .get_mut(zmq_fd)
            .filter(|t| t.conn.id == id)
            .map(|t| t.inflight)
        else {
            return true;
        };
        let Some(room) = cap.checked_sub(inflight.saturating_add(cost)) else {
            return false;
        };
        self.held_out(zmq_fd, id, room)
            .is_none_or(|held| held <= room)
    }

    /// A request of `cost` from connection `id` is now in flight.
    pub fn hold(&mut self, zmq_fd: RawFd, id: u64, cost: u64) {
        if let Some(tracked) = self.get_mut(zmq_fd).filter(|t| t.conn.id == id) {
            tracked.inflight += cost;
        }
    }

    /// A request of `cost` from connection `id` is answered (or given up). The last one an
    /// aged connection holds is about to be answered: it is corked now, before its reply goes
    /// to libzmq, so that the reply leaves with the FIN.
    pub fn release(&mut self, zmq_fd: RawFd, id: u64, cost: u64) {
        let Some(tracked) = self.get_mut(zmq_fd).filter(|t| t.conn.id == id) else {
            return;
        };
        tracked.inflight = tracked.inflight.saturating_sub(cost);
        if tracked.inflight > 0 {
            return;
        }
        let Some(aging) = tracked.aging.as_mut().filter(|a| a.phase == Phase::Due) else {
            return;
        };
        tracked.conn.cork(true);
        aging.phase = Phase::Corked;
        aging.written_seen = None;
        self.age_check_now = true;
    }

    /// A reply of `wire_bytes` in `frames` frames was handed to libzmq for connection `id`.
    pub fn reply_sent(&mut self, zmq_fd: RawFd, id: u64, wire_bytes: u64, frames: u32) {
        let Some(tracked) = self.get_mut(zmq_fd).filter(|t| t.conn.id == id) else {
            return;
        };
        if !tracked.conn.measurable {
            return;
        }
        // An answer it did not hold (a refusal, a health check) to an aged connection: the
        // sweep looks at it again soon.
        let aged_and_idle = tracked.inflight == 0
            && tracked
                .aging
                .as_ref()
                .is_some_and(|a| a.phase == Phase::Due);
        let end = tracked.conn.sent.fetch_add(wire_bytes, Ordering::Relaxed) + wire_bytes;
        tracked.pending.push_back((end, frames));
        tracked.pending_frames += u64::from(frames);
        if tracked.pending.len() >= PENDING_TRIM {
            let _ = tracked.conn.measure();
            trim(tracked);
        }
        self.out_estimate += wire_bytes + u64::from(frames) * FRAME_OVERHEAD as u64;
        self.age_check_now |= aged_and_idle;
    }

    /// Outbound bytes held for all connections (see the field's note on freshness).
    pub fn out_estimate(&self) -> u64 {
        self.out_estimate
    }

    /// Recomputes the outbound total from the latest measurements (the guard's included).
    pub fn resync(&mut self) {
        self.out_estimate = self.by_fd.iter().flatten().map(Tracked::counted_out).sum();
    }

    /// Over the reply budget, for a reply of `wire` bytes to connection `keep` on `keep_fd`:
    /// resets the connection holding the most unread replies, when it holds more than the
    /// reply's own connection would with the reply and more than `floor`, so that the reply of
    /// a client that reads is not dropped for one that does not. Both are measured first (the
    /// recorded figures lag what their peers acknowledged): two reads of `TCP_INFO`, not one per
    /// connection. Returns what the reset connection held (libzmq drops it with the
    /// connection), 0 if none qualified.
    pub fn reset_largest_outbound(
        &mut self,
        keep_fd: RawFd,
        keep: u64,
        wire: u64,
        floor: u64,
    ) -> u64 {
        let own = self.held_out(keep_fd, keep, 0).unwrap_or(0);
        let floor = (own + wire).max(floor);
        let Some(index) = self
            .by_fd
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|t| (i, t)))
            .filter(|(_, t)| t.conn.id != keep && t.counted_out() > floor)
            .max_by_key(|(_, t)| t.counted_out())
            .map(|(i, _)| i)
        else {
            return 0;
        };
        let Some(victim) = self.by_fd.get_mut(index).and_then(Option::as_mut) else {
            return 0;
        };
        let before = victim.counted_out();
        let _ = victim.conn.measure();
        trim(victim);
        let held = victim.counted_out();
        self.out_estimate = self.out_estimate.saturating_sub(before - held.min(before));
        if held <= floor || !victim.conn.reset(ResetReason::Budget) {
            return 0;
        }
        log::debug!(
            "connection {}: reset, budget ({held} bytes of replies unread)",
            victim.conn.id
        );
        self.out_estimate = self.out_estimate.saturating_sub(held);
        held
    }

    /// Measures every connection holding outbound bytes (when the total looks over budget).
    pub fn measure_outbound(&mut self) {
        for tracked in self.by_fd.iter_mut().flatten() {
            if tracked.held_out() > 0 {
                let _ = tracked.conn.measure();
                trim(tracked);
            }
        }
        self.resync();
    }

    /// Applies the age decision to every connection due a look: closes those past their age
    /// that can go now, aborts those past their grace. Cheap when none is due.
    pub fn sweep_ages(&mut self, now: Instant) -> Swept {
        self.turn = now;
        let mut swept = Swept {
            crossed: std::mem::take(&mut self.crossed),
            ..Swept::default()
        };
        let Some(limit) = &self.ages else {
            return swept;
        };
        let grace = limit.grace;
        if !self.age_check_now && self.next_age_check.is_none_or(|t| now < t) {
            swept.next = self.next_age_check;
            return swept;
        }
        self.age_check_now = false;
        let mut next: Option<Instant> = None;
        for tracked in self.by_fd.iter_mut().flatten() {
            let Some(aging) = tracked.aging.as_mut() else {
                continue;
            };
            let conn = &tracked.conn;
            if conn.reset_reason().is_some()
                && !matches!(aging.phase, Phase::Closing { .. } | Phase::Done)
            {
                // Reset by the guard or for its key meanwhile: nothing left to recycle.
                aging.phase = Phase::Done;
                continue;
            }
            if aging.phase == Phase::Young && now >= aging.expires {
                aging.phase = Phase::Due;
            }
            let mut view = View {
                now,
                expires: aging.expires,
                grace,
                phase: aging.phase,
                holds: tracked.inflight > 0,
                last_read: aging.last_read,
                unread: false,
                written: false,
                delivered: false,
            };
            let measured = matches!(aging.phase, Phase::Due | Phase::Corked) && !view.holds;
            if measured {
                let _ = conn.measure();
                let (out, unread) = sys::queued_bytes(conn.fd.as_fd()).unwrap_or((0, 0));
                // What libzmq has written into the kernel, against what it was handed (plain
                // ZMTP sizes: a lower bound under CURVE, hence the second look that finds
                // libzmq done writing).
                let written = conn.acked.load(Ordering::Relaxed) + out;
                let expected =
                    conn.handshake_out.load(Ordering::Relaxed) + conn.sent.load(Ordering::Relaxed);
                view.written = written >= expected && aging.written_seen == Some(written);
                aging.written_seen = Some(written);
                view.unread = unread > 0;
                view.delivered = conn.held_out() == 0;
            }
            let mut wake = |at: Instant| next = Some(next.map_or(at, |t: Instant| t.min(at)));
            match age::decide(&view) {
                Step::Wait(at) => {
                    if let Some(at) = at {
                        wake(at);
                    }
                }
                Step::Close => {
                    if conn.half_close(ResetReason::Age) {
                        swept.closed += 1;
                        aging.phase = Phase::Closing { since: now };
                        wake(now + age::HALF_CLOSED_LINGER);
                    } else {
                        aging.phase = Phase::Done;
                    }
                }
                Step::Uncork => {
                    conn.cork(false);
                    aging.phase = Phase::Due;
                    // A request arriving is read within the turn: look again soon.
                    wake(now + age::RECHECK);
                }
                Step::Abort(reason) => {
                    if conn.reset(reason) {
                        swept.graced.push(conn.id);
                    }
                    aging.phase = Phase::Done;
                }
                Step::Finish => {
                    conn.abort();
                    aging.phase = Phase::Done;
                }
            }
        }
        self.next_age_check = next;
        swept.next = next;
        swept
    }

    /// Drops every connection (at exit): our duplicates close.
    pub fn clear(&mut self) {
        self.by_fd.clear();
        self.open = 0;
        self.out_estimate = 0;
        self.registry.live.lock().clear();
    }

    fn get_mut(&mut self, zmq_fd: RawFd) -> Option<&mut Tracked> {
        let index = usize::try_from(zmq_fd).ok()?;
        self.by_fd.get_mut(index)?.as_mut()
    }
}

impl Tracked {
    /// Outbound bytes held as of the last measurement, with libzmq's per-frame overhead.
    fn held_out(&self) -> u64 {
        self.conn.held_out() + self.pending_frames * FRAME_OVERHEAD as u64
    }

    /// What it counts in the outbound total: nothing once it has been reset (libzmq drops
    /// its queue with it), so a reset is never subtracted twice.
    fn counted_out(&self) -> u64 {
        if self.conn.reset_reason().is_some() {
            0
        } else {
            self.held_out()
        }
    }
}

/// A connection's age, `age` jittered by up to 10 % either way by `random` (so connections
/// opened together, a fleet of clients started at once, do not all reconnect at once).
fn jittered(age: Duration, random: u64) -> Duration {
    // 53 random bits as a fraction in [0, 1).
    let unit = (random >> 11) as f64 / (1u64 << 53) as f64;
    age.mul_f64(0.9 + 0.2 * unit)
}

/// Forgets the replies the peer has acknowledged.
fn trim(tracked: &mut Tracked) {
    let conn = &tracked.conn;
    let delivered = conn
        .acked
        .load(Ordering::Relaxed)
        .saturating_sub(conn.handshake_out.load(Ordering::Relaxed));
    while let Some(&(end, frames)) = tracked.pending.front() {
        if end > delivered {
            break;
        }
        tracked.pending.pop_front();
        tracked.pending_frames -= u64::from(frames);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpListener, TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (listener, client, server)
    }

    #[test]
    fn connections_beyond_the_limit_are_refused_and_others_counted() {
        let registry = Arc::new(Registry::default());
        let (l1, _c1, s1) = pair();
        let port = l1.local_addr().expect("addr").port();
        let mut table = Table::new(1, Some(port), Arc::clone(&registry));
        assert_eq!(table.accepted(s1.as_raw_fd()), Accepted::Tracked);
        assert_eq!(table.open(), 1);
        // A second connection to the same listener is over the limit.
        let mut c2 = TcpStream::connect(l1.local_addr().expect("addr")).expect("connect");
        let (s2, _) = l1.accept().expect("accept");
        assert_eq!(table.accepted(s2.as_raw_fd()), Accepted::Refused);
        let mut buf = [0u8; 1];
        assert!(
            matches!(c2.read(&mut buf), Ok(0) | Err(_)),
            "the refused peer sees its connection end (reset)"
        );
        assert_eq!(registry.len(), 1);
        // A socket on another port (a reused fd number) is not a front connection.
        let (_l3, _c3, s3) = pair();
        assert_eq!(table.accepted(s3.as_raw_fd()), Accepted::Untracked);
        let closed = table.disconnected(s2.as_raw_fd()).expect("tracked");
        assert!(closed.refused);
        let closed = table.disconnected(s1.as_raw_fd()).expect("tracked");
        assert_eq!(closed.undelivered, 0);
        assert_eq!((table.open(), registry.len()), (0, 0));
    }

    #[test]
    fn held_bytes_and_undelivered_replies_come_from_the_kernel_counters() {
        let registry = Arc::new(Registry::default());
        let (listener, mut client, mut server) = pair();
        let port = listener.local_addr().expect("addr").port();
        let mut table = Table::new(10, Some(port), registry);
        let fd = server.as_raw_fd();
        assert_eq!(table.accepted(fd), Accepted::Tracked);
        // 3000 bytes arrive; a 1000-byte request is read: 2000 - allowance are held.
        client.write_all(&[0u8; 3000]).expect("write");
        let mut buf = vec![0u8; 3000];
        server.read_exact(&mut buf).expect("read");
        let Attribution::Tracked { id, first: true } = table.request_read(fd, 1000) else {
            panic!("tracked, first request");
        };
        let conn = registry_conn(&table, fd);
        conn.measure().expect("measure");
        assert_eq!(conn.held_in(), 2000 - HANDSHAKE_ALLOWANCE);
        // Two replies go out; the client reads both: nothing held, nothing undelivered.
        for _ in 0..2 {
            server.write_all(&[1u8; 500]).expect("reply");
            table.reply_sent(fd, id, 500, 2);
        }
        client.read_exact(&mut buf[..1000]).expect("client reads");
        wait_acked(&conn, 1000);
        assert_eq!(table.held_out(fd, id, 0), Some(0));
        // A third is counted as sent but never written: undelivered when the peer goes.
        table.reply_sent(fd, id, 500, 2);
        // What libzmq holds: the bytes, and a zmq_msg_t per frame.
        assert_eq!(
            table.held_out(fd, id, u64::MAX),
            Some(500 + 2 * FRAME_OVERHEAD as u64)
        );
        // Requests in flight and unread replies share the connection's bound.
        let held = 500 + 2 * FRAME_OVERHEAD as u64;
        assert!(table.fits(fd, id, 1000, held + 1000));
        table.hold(fd, id, 1000);
        assert!(!table.fits(fd, id, 1, held + 1000), "full");

        assert!(
            table.fits(fd, id + 1, 1, 0),
            "another connection's id is not bounded here"
        );
        table.release(fd, id, 1000);
        assert!(table.fits(fd, id, 1000, held + 1000));
        assert_eq!(
            table.held_out(fd, id + 1, 0),
            None,
            "another connection's id"
        );
        drop(client);
        let closed = table.disconnected(fd).expect("tracked");
        assert_eq!(closed.undelivered, 1);
    }

    #[test]
    fn requests_in_flight_alone_can_fill_a_connections_bound() {
        let (listener, _client, server) = pair();
        let port = listener.local_addr().expect("addr").port();
        let mut table = Table::new(10, Some(port), Arc::new(Registry::default()));
        let fd = server.as_raw_fd();
        assert_eq!(table.accepted(fd), Accepted::Tracked);
        let Attribution::Tracked { id, .. } = table.request_read(fd, 10) else {
            panic!("tracked");
        };
        // Nothing unread, but requests held up to the bound: no more fits.
        assert!(table.fits(fd, id, 1000, 1000));
        table.hold(fd, id, 1000);
        assert!(!table.fits(fd, id, 1, 1000));
        assert!(!table.fits(fd, id, u64::MAX, 1000), "no overflow");
        table.release(fd, id, 1000);
        assert!(table.fits(fd, id, 1000, 1000));
    }

    fn aging_table(port: u16) -> Table {
        Table::new(10, Some(port), Arc::new(Registry::default()))
            .with_age_limit(Some(Duration::from_secs(10)), Duration::from_secs(5))
    }

    /// A connection of an aging table holding one request of cost 100: the table, the
    /// connection's fd and id, and when it reaches its age.
    fn holding_one(server: &TcpStream, port: u16) -> (Table, RawFd, u64, Instant) {
        let mut table = aging_table(port);
        let fd = server.as_raw_fd();
        assert_eq!(table.accepted(fd), Accepted::Tracked);
        let Attribution::Tracked { id, .. } = table.request_read(fd, 10) else {
            panic!("tracked");
        };
        table.hold(fd, id, 100);
        let due = table.sweep_ages(Instant::now()).next.expect("an expiry");
        (table, fd, id, due)
    }

    #[test]
    fn ages_are_jittered_by_a_tenth_either_way() {
        let age = Duration::from_secs(60);
        assert_eq!(jittered(age, 0), Duration::from_secs(54));
        assert!(jittered(age, u64::MAX) <= Duration::from_secs(66));
        assert!(jittered(age, u64::MAX) > Duration::from_millis(65_999));
        assert_eq!(jittered(age, 1 << 63), Duration::from_secs(60));
    }

    #[test]
    fn an_aged_idle_connection_is_half_closed_and_a_request_crossing_it_refused() {
        let (listener, mut client, server) = pair();
        let mut table = aging_table(listener.local_addr().expect("addr").port());
        let fd = server.as_raw_fd();
        let before = Instant::now();
        assert_eq!(table.accepted(fd), Accepted::Tracked);
        let expires = table.sweep_ages(before).next.expect("an expiry");
        assert!(expires >= before + Duration::from_secs(9));
        assert!(expires <= Instant::now() + Duration::from_secs(11));
        // A request read (and answered at once) just before its age: closed once quiet.
        let read_at = expires - Duration::from_millis(1);
        assert_eq!(table.sweep_ages(read_at).closed, 0);
        assert!(matches!(
            table.request_read(fd, 10),
            Attribution::Tracked { first: true, .. }
        ));
        let swept = table.sweep_ages(expires);
        assert_eq!((swept.closed, swept.next), (0, Some(read_at + age::QUIET)));
        let due = read_at + age::QUIET;
        assert_eq!(table.sweep_ages(due).closed, 1);
        let mut buf = [0u8; 8];
        assert_eq!(
            client.read(&mut buf).expect("read"),
            0,
            "the client sees the FIN"
        );
        // A request that crossed the FIN is not served, and counted by the next sweep.
        assert_eq!(table.request_read(fd, 10), Attribution::Refused);
        assert_eq!(table.sweep_ages(due + age::QUIET).crossed, 1);
        let closed = table.disconnected(fd).expect("tracked");
        assert_eq!(closed.reset, Some(ResetReason::Age));
    }

    #[test]
    fn the_last_reply_of_an_aged_connection_leaves_with_the_fin() {
        let (listener, mut client, mut server) = pair();
        let port = listener.local_addr().expect("addr").port();
        let (mut table, fd, id, due) = holding_one(&server, port);
        let swept = table.sweep_ages(due);
        assert_eq!(swept.closed, 0, "it holds a request");
        assert_eq!(swept.next, Some(due + Duration::from_secs(5)), "the grace");
        // Answered: corked before the reply is written (here by the test, as libzmq would).
        table.release(fd, id, 100);
        server.write_all(b"reply").expect("write");
        table.reply_sent(fd, id, 5, 1);
        let first = table.sweep_ages(due);
        assert_eq!(first.closed, 0, "one look to see libzmq has written it");
        assert_eq!(first.next, Some(due + age::SETTLE));
        assert_eq!(table.sweep_ages(due + age::SETTLE).closed, 1);
        let mut got = Vec::new();
        client.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"reply", "the reply, then the end of the stream");
    }

    #[test]
    fn a_connection_never_quiet_is_reset_at_the_grace() {
        let (listener, _client, server) = pair();
        let port = listener.local_addr().expect("addr").port();
        let (mut table, fd, id, due) = holding_one(&server, port);
        let swept = table.sweep_ages(due + Duration::from_secs(5));
        assert_eq!(swept.graced, [id]);
        assert_eq!(swept.next, None, "nothing more to do");
        assert_eq!(
            table.disconnected(fd).expect("tracked").reset,
            Some(ResetReason::AgeGrace)
        );
    }

    fn registry_conn(table: &Table, fd: RawFd) -> Arc<Conn> {
        let tracked = table.by_fd[fd as usize].as_ref().expect("tracked");
        Arc::clone(&tracked.conn)
    }

    fn wait_acked(conn: &Conn, bytes: u64) {
        for _ in 0..1000 {
            if conn.measure().expect("measure").acked >= bytes {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("never acknowledged");
    }
}
