//! Replies: every answer the coordinator sends, whoever made it (a worker's outcome, a refusal,
//! a health check, the drain deadline), leaves through [`Outbox::send`], without blocking and
//! within the connection's and the broker's outbound byte budgets. A reply that does not fit,
//! or whose client is gone or not reading, is dropped and counted rather than stalling
//! everyone else. The [`Outbox`] also keeps the lifetime tally logged at exit.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::metrics::{DropReason, Recorder, RefusedReason, ResetReason};
use shared::protocol::{encode_err, encode_ok, wire_size, STATUS_OK};
use shared::socket::send_one;
use shared::{ErrorCode, Metrics};
use worker::{Outcome, Shed};
use zmq::{Message, Socket};

use super::admission::refusal;
use super::inflight::{Entry, Origin};
use super::Coordinator;
use crate::conns;
use crate::guard::STALL_FLOOR;
use crate::lifecycle::State;

/// Reset connections remembered for naming the drops of their late replies; more than
/// `--max-connections` would rarely matter, and a miss only files a drop under `peer_gone`.
const RECENT_RESETS: usize = 1024;
/// Shortest interval between measuring every connection's outbound bytes when the total
/// looks over budget (each measurement is a syscall per connection).
const MEASURE_ALL_EVERY: Duration = Duration::from_millis(10);

/// A reply body, before encoding.
pub enum Body<'a> {
    /// `OK` and a handler's frames.
    Ok(Vec<Message>),
    /// `ERR`, a code and a message.
    Err(ErrorCode, &'a str),
    /// `OK` and the broker's state: the answer to a health request.
    Health(State),
}

impl Body<'static> {
    /// The `ERR` reply of a request the coordinator answers itself.
    pub fn refusal(code: ErrorCode) -> Body<'static> {
        Body::Err(code, reject_message(code))
    }
}

impl Body<'_> {
    /// The outcome it is counted as in `broker_requests_total` (`None` for a health check,
    /// which is counted apart).
    fn outcome(&self) -> Option<Option<ErrorCode>> {
        match self {
            Body::Ok(_) => Some(None),
            Body::Err(code, _) => Some(Some(*code)),
            Body::Health(_) => None,
        }
    }

    /// Appends the encoded frames to `frames`.
    fn encode(self, frames: &mut Vec<Message>) {
        match self {
            Body::Ok(handler) => frames.extend(encode_ok(handler)),
            Body::Err(code, message) => frames.extend(encode_err(code, message)),
            Body::Health(state) => {
                frames.push(Message::from(STATUS_OK));
                frames.push(Message::from(state.as_str()));
            }
        }
    }
}

/// The message frame of an error the coordinator answers itself.
fn reject_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadRequest => "request body is empty",
        ErrorCode::TooLarge => {
            "request exceeds --max-message-bytes, or has too many frames or envelope frames"
        }
        ErrorCode::Overloaded => {
            "broker is at its in-flight or memory limit; retry later or elsewhere"
        }
        ErrorCode::Draining => "broker is shutting down; retry on another instance",
        ErrorCode::Timeout => "request still running at the drain deadline",
        ErrorCode::HandlerFailed => "handler failed",
        ErrorCode::DeadlineExceeded => "the request's deadline passed before a worker started it",
    }
}

/// Why a send that libzmq refused is a drop: with `ROUTER_MANDATORY`, EHOSTUNREACH for a peer
/// it no longer knows (`reset` if the broker closed that connection itself), EAGAIN for one at
/// its high-water mark.
fn refused_send(error: zmq::Error, reset_by_us: bool) -> DropReason {
    match error {
        zmq::Error::EHOSTUNREACH if reset_by_us => DropReason::Reset,
        zmq::Error::EAGAIN => DropReason::Hwm,
        _ => DropReason::PeerGone,
    }
}

/// Lifetime totals, logged at exit: every request read must have been answered.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests read and served (not those of refused or revoked connections).
    pub read: u64,
    /// Replies sent or dropped.
    pub answered: u64,
    /// Replies that could not be delivered.
    pub undeliverable: u64,
}

/// Everything on the way out of the front socket.
pub struct Outbox {
    /// The body being sent, reused so a steady load allocates none.
    body: Vec<Message>,
    /// Envelope vectors of answered requests, reused likewise.
    spare_envelopes: Vec<Vec<Message>>,
    /// Connections the broker reset that have closed, newest last (at most
    /// [`RECENT_RESETS`]): a reply finished after its connection was reset is dropped as
    /// `reset`, not `peer_gone`.
    recent_resets: VecDeque<u64>,
    /// A reply was sent since the front socket was last read (its events must be asked for
    /// before its descriptor is polled).
    pub sent_since_read: bool,
    last_measure_all: Instant,
    max_connection_bytes: u64,
    max_buffered_bytes: u64,
    metrics: Arc<Metrics>,
    /// What was read and answered.
    pub tally: Tally,
}

impl Outbox {
    /// An outbox within `--max-connection-bytes` and `--max-buffered-bytes`.
    pub fn new(
        max_connection_bytes: usize,
        max_buffered_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Outbox {
        Outbox {
            body: Vec::with_capacity(8),
            spare_envelopes: Vec::new(),
            recent_resets: VecDeque::with_capacity(RECENT_RESETS),
            sent_since_read: false,
            last_measure_all: Instant::now(),
            max_connection_bytes: max_connection_bytes as u64,
            max_buffered_bytes: max_buffered_bytes as u64,
            metrics,
            tally: Tally::default(),
        }
    }

    /// An empty envelope vector, reused if one is spare.
    pub fn envelope(&mut self) -> Vec<Message> {
        self.spare_envelopes.pop().unwrap_or_default()
    }

    /// A connection the broker reset has closed: its late replies are `reset` drops.
    pub fn remember_reset(&mut self, conn: u64) {
        if self.recent_resets.len() == RECENT_RESETS {
            self.recent_resets.pop_front();
        }
        self.recent_resets.push_back(conn);
    }

    /// `n` replies were lost for `reason` without being sent (their connection closed).
    pub fn lost(&mut self, reason: DropReason, n: u64) {
        self.tally.undeliverable += n;
        self.metrics.count_drops(reason, n);
    }

    /// Sends `envelope` + `body` to `origin`'s connection, or drops it (counted). The
    /// envelope vector is kept for reuse.
    pub fn send(
        &mut self,
        front: &Socket,
        conns: &mut conns::Table,
        rec: &mut Recorder,
        mut envelope: Vec<Message>,
        origin: Option<Origin>,
        body: Body<'_>,
    ) {
        self.tally.answered += 1;
        body.encode(&mut self.body);
        // One look at each frame's length (an FFI call apiece): the bytes after the routing id
        // and their wire size.
        let (mut bytes, mut wire) = (0usize, 0u64);
        for frame in envelope[1..].iter().chain(self.body.iter()) {
            let len = frame.len();
            bytes += len;
            wire += wire_size(len) as u64;
        }
        let frames = (envelope.len() + self.body.len()) as u32;
        let verdict = match origin.and_then(|o| self.over_limits(conns, o, wire)) {
            Some(reason) => Err(reason),
            None => self.hand_over(front, &mut envelope, origin),
        };
        self.body.clear();
        envelope.clear();
        self.spare_envelopes.push(envelope);
        match verdict {
            Ok(()) => {
                rec.reply_sent(bytes);
                if let Some(o) = origin {
                    conns.reply_sent(o.fd, o.conn, wire, frames);
                }
            }
            Err(reason) => self.lost(reason, 1),
        }
    }

    /// Hands the frames to libzmq, or says why it refused.
    fn hand_over(
        &mut self,
        front: &Socket,
        envelope: &mut Vec<Message>,
        origin: Option<Origin>,
    ) -> Result<(), DropReason> {
        // With ROUTER_MANDATORY the first frame decides: once it is accepted the rest of the
        // message is too (the pipe counts whole messages).
        self.sent_since_read = true;
        let mut frames = envelope.drain(..).chain(self.body.drain(..)).peekable();
        let Some(first) = frames.next() else {
            return Ok(());
        };
        if let Err(e) = send_one(front, first, zmq::DONTWAIT | zmq::SNDMORE) {
            let reset = origin.is_some_and(|o| self.recent_resets.contains(&o.conn));
            log::debug!("reply dropped: {e}");
            return Err(refused_send(e, reset));
        }
        while let Some(frame) = frames.next() {
            let more = if frames.peek().is_some() {
                zmq::SNDMORE
            } else {
                0
            };
            if let Err(e) = send_one(front, frame, zmq::DONTWAIT | more) {
                log::debug!("reply cut short: {e}");
                break;
            }
        }
        Ok(())
    }

    /// True when the outbound total plus `extra` is at most `limit`, measuring every
    /// connection (at most every [`MEASURE_ALL_EVERY`]) before saying no: the total is an
    /// estimate that only replies raise between measurements.
    fn within_budget(&mut self, conns: &mut conns::Table, extra: u64, limit: u64) -> bool {
        if conns.out_estimate() + extra <= limit {
            return true;
        }
        let now = Instant::now();
        if now >= self.last_measure_all + MEASURE_ALL_EVERY {
            self.last_measure_all = now;
            conns.measure_outbound();
        }
        conns.out_estimate() + extra <= limit
    }

    /// Why a reply of `wire` bytes to `origin` must be dropped, if it must.
    fn over_limits(
        &mut self,
        conns: &mut conns::Table,
        origin: Origin,
        wire: u64,
    ) -> Option<DropReason> {
        let cap = self.max_connection_bytes;
        let held = conns.held_out(origin.fd, origin.conn, cap.saturating_sub(wire))?;
        if held + wire > cap {
            log::debug!("reply of {wire} bytes dropped: its connection holds {held} of {cap}");
            return Some(DropReason::Hwm);
        }
        if self.within_budget(conns, wire, self.max_buffered_bytes) {
            return None;
        }
        // The budget is full: the connection holding the most unread replies (more than this
        // one would with this reply, and more than a client between requests holds) is the
        // one not reading. Reset it rather than drop the reply of a client that reads.
        if conns.reset_largest_outbound(origin.fd, origin.conn, wire, STALL_FLOOR) > 0 {
            self.metrics.connections_reset(ResetReason::Budget, 1);
            if conns.out_estimate() + wire <= self.max_buffered_bytes {
                return None;
            }
        }
        Some(DropReason::Budget)
    }
}

impl Coordinator {
    /// Answers a request with `body` and counts its outcome; `latency` is from read to reply
    /// for requests that were admitted, `None` for those answered at once.
    pub(super) fn answer(
        &mut self,
        envelope: Vec<Message>,
        origin: Option<Origin>,
        body: Body<'_>,
        latency: Option<Duration>,
    ) {
        if let Some(outcome) = body.outcome() {
            self.rec.replied(outcome, latency);
        }
        self.outbox.send(
            &self.sockets.front,
            &mut self.conns,
            &mut self.rec,
            envelope,
            origin,
            body,
        );
    }

    /// Releases the request `ticket` names from the in-flight table and its connection's
    /// count; `None` if it was already answered.
    pub(super) fn release(&mut self, ticket: worker::Ticket, now: Instant) -> Option<Entry> {
        let entry = self.inflight.remove(ticket, now)?;
        self.release_connection(&entry);
        Some(entry)
    }

    /// Takes `entry`'s cost off its connection's count (the table has let it go).
    pub(super) fn release_connection(&mut self, entry: &Entry) {
        if let Some(o) = entry.origin {
            self.conns.release(o.fd, o.conn, entry.cost as u64);
        }
    }

    /// Sends a worker's outcome to the client that asked: its handler's reply, or the refusal
    /// of a request the worker would not start.
    pub(super) fn on_done(&mut self, ticket: worker::Ticket, outcome: Outcome) {
        let now = self.now;
        // A stale ticket (the request timed out at the drain deadline) finds no entry.
        let Some(entry) = self.release(ticket, now) else {
            log::debug!("late reply discarded");
            return;
        };
        let latency = Some(now.saturating_duration_since(entry.received));
        match outcome {
            Outcome::Ran(Ok(frames)) => {
                self.answer(entry.envelope, entry.origin, Body::Ok(frames), latency)
            }
            Outcome::Ran(Err(e)) => self.answer(
                entry.envelope,
                entry.origin,
                Body::Err(e.code, &e.message),
                latency,
            ),
            Outcome::Shed(shed) => {
                let reason = match shed {
                    Shed::QueueTime => RefusedReason::QueueTime,
                    Shed::Deadline => RefusedReason::DeadlineExceeded,
                };
                self.refused(reason, None);
                let (code, message) = refusal(reason);
                self.answer(
                    entry.envelope,
                    entry.origin,
                    Body::Err(code, message),
                    latency,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::protocol::{parse_reply, Reply};

    fn encoded(body: Body<'_>) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        body.encode(&mut frames);
        frames.iter().map(|f| f.to_vec()).collect()
    }

    #[test]
    fn bodies_encode_to_the_protocol_and_count_their_outcome() {
        let ok = Body::Ok(vec![Message::from("a"), Message::new()]);
        assert_eq!(ok.outcome(), Some(None));
        assert_eq!(encoded(ok), [b"OK".to_vec(), b"a".to_vec(), Vec::new()]);
        let err = Body::refusal(ErrorCode::Overloaded);
        assert_eq!(err.outcome(), Some(Some(ErrorCode::Overloaded)));
        let frames = encoded(err);
        assert!(matches!(
            parse_reply(frames),
            Ok(Reply::Err {
                code: ErrorCode::Overloaded,
                ..
            })
        ));
        let health = Body::Health(State::Draining);
        assert_eq!(health.outcome(), None, "health checks are counted apart");
        assert_eq!(encoded(health), [b"OK".to_vec(), b"draining".to_vec()]);
    }

    #[test]
    fn every_code_has_a_message() {
        for code in ErrorCode::ALL {
            assert!(!reject_message(code).is_empty(), "{code}");
        }
    }

    #[test]
    fn refused_sends_are_filed_by_what_libzmq_said() {
        assert_eq!(refused_send(zmq::Error::EAGAIN, false), DropReason::Hwm);
        assert_eq!(
            refused_send(zmq::Error::EHOSTUNREACH, false),
            DropReason::PeerGone
        );
        assert_eq!(
            refused_send(zmq::Error::EHOSTUNREACH, true),
            DropReason::Reset
        );
        assert_eq!(refused_send(zmq::Error::ETERM, false), DropReason::PeerGone);
    }
}
