//! Connection age limits (`--max-connection-age`, `--max-connection-age-grace`): a front
//! connection older than its age is closed at a moment it holds no request, so its client's
//! libzmq reconnects, through whatever balancer is in front (a ClusterIP Service), perhaps to
//! a pod added since. After the grace it is closed regardless, with what it holds.
//!
//! How it closes, so that a client loses nothing it sent (docs/protocol.md, "What a client
//! sees when the broker recycles its connection", has the measurements):
//! - **In the shadow of its last reply.** When the last request an aged connection holds is
//!   answered, the connection is corked before the reply goes to libzmq; once libzmq has
//!   written the reply into the kernel, `shutdown(SHUT_WR)` sends it with the FIN in one
//!   segment. A request/reply client (REQ, or a Lazy Pirate DEALER) cannot send again before
//!   it has that reply, and its libzmq reads the end of the stream right behind it: the next
//!   request waits in the client's queue and goes out on the new connection.
//! - **Idle**: one that held nothing and read nothing for [`QUIET`] is half-closed as it is.
//! - A half-closed connection whose client has not closed its side within
//!   [`HALF_CLOSED_LINGER`] (a peer ignoring the FIN) is aborted.
//!
//! [`decide`] is the whole decision, pure and unit-tested per transition; `conns::Table`
//! keeps each connection's [`Phase`] and does the socket calls; `Coordinator::recycle`
//! runs the sweep and counts what it did.

use std::time::{Duration, Instant};

use shared::metrics::{DropReason, ResetReason};

use super::Coordinator;

/// An aged connection that is not answering anything is closed only after it has read no
/// request for this long: a client busy in a loop is closed in the shadow of a reply instead.
pub const QUIET: Duration = Duration::from_millis(100);
/// How often a corked connection is looked at until libzmq has written its last reply (the
/// reply waits in the kernel meanwhile, so this is latency, never loss).
pub const SETTLE: Duration = Duration::from_millis(1);
/// How often an aged connection is looked at again while its client has not acknowledged
/// every reply, or a request of its is arriving.
pub const RECHECK: Duration = Duration::from_millis(10);
/// A client's libzmq closes its side as soon as it reads the FIN; a peer that has not within
/// this long ignores it, and is aborted.
pub const HALF_CLOSED_LINGER: Duration = Duration::from_secs(1);

/// Where a connection is in its recycling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Younger than its age.
    Young,
    /// Past its age, waiting for a moment it holds nothing.
    Due,
    /// Past its age, its last held request answered, the socket corked so that the reply
    /// waits in the kernel for the FIN.
    Corked,
    /// Half-closed (FIN sent) at `since`; the client reconnects.
    Closing {
        /// When the FIN was sent.
        since: Instant,
    },
    /// Aborted; waiting for libzmq to report it closed.
    Done,
}

/// What [`decide`] looks at. The last four are measured only for a connection past its age.
#[derive(Clone, Copy, Debug)]
pub struct View {
    /// Now.
    pub now: Instant,
    /// When it reaches its age (jittered).
    pub expires: Instant,
    /// `--max-connection-age-grace`.
    pub grace: Duration,
    /// Its phase.
    pub phase: Phase,
    /// It has requests in flight (queued or running).
    pub holds: bool,
    /// When its last request was read (or it opened).
    pub last_read: Instant,
    /// The kernel has bytes from it that libzmq has not read (a request on its way).
    pub unread: bool,
    /// Every reply handed to libzmq for it is in the kernel (and libzmq has stopped writing).
    pub written: bool,
    /// Its client has acknowledged every reply.
    pub delivered: bool,
}

/// What to do with one connection now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing before this instant (`None`: nothing to do any more). Answering a connection's
    /// last held request asks for a look sooner.
    Wait(Option<Instant>),
    /// Half-close it (`shutdown(SHUT_WR)`): counted as `age`.
    Close,
    /// It took a request again (or one is arriving) since it was corked: uncork, wait again.
    Uncork,
    /// Abort it for this reason, with what it holds (at the grace).
    Abort(ResetReason),
    /// It was half-closed and its peer did not close: abort it, already counted.
    Finish,
}

/// The decision for one connection.
pub fn decide(v: &View) -> Step {
    match v.phase {
        Phase::Done => return Step::Wait(None),
        Phase::Closing { since } => {
            let end = since + HALF_CLOSED_LINGER;
            return if v.now >= end {
                Step::Finish
            } else {
                Step::Wait(Some(end))
            };
        }
        Phase::Young | Phase::Due | Phase::Corked => {}
    }
    if v.now < v.expires {
        return Step::Wait(Some(v.expires));
    }
    let hard = v.expires + v.grace;
    match graceful(v) {
        Step::Close => Step::Close,
        // Past the grace it goes now, whatever it holds.
        _ if v.now >= hard => Step::Abort(ResetReason::AgeGrace),
        Step::Wait(at) => Step::Wait(Some(at.map_or(hard, |at| at.min(hard)))),
        step => step,
    }
}

/// The decision for an aged connection, the grace aside.
fn graceful(v: &View) -> Step {
    if v.phase == Phase::Corked {
        if v.holds || v.unread {
            return Step::Uncork;
        }
        if v.written {
            return Step::Close;
        }
        return Step::Wait(Some(v.now + SETTLE));
    }
    if v.holds {
        // Answering its last request asks for a look sooner.
        return Step::Wait(None);
    }
    let quiet_at = v.last_read + QUIET;
    if v.now < quiet_at {
        return Step::Wait(Some(quiet_at));
    }
    if !v.delivered || v.unread {
        return Step::Wait(Some(v.now + RECHECK));
    }
    Step::Close
}

/// What one sweep did, for the coordinator to count.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Connections half-closed at a quiet moment.
    pub closed: u64,
    /// Connections aborted at the grace: their ids, so their held requests are given up.
    pub graced: Vec<u64>,
    /// Requests read from connections already closed for their age (they crossed the close):
    /// not served, counted as dropped.
    pub crossed: u64,
    /// When the sweep wants to run again.
    pub next: Option<Instant>,
}

impl Coordinator {
    /// Closes the connections that are past their age and can go now; returns the latest
    /// instant it must run again (`None`: not before some connection's last held request is
    /// answered, or never).
    pub(super) fn recycle(&mut self, now: Instant) -> Option<Instant> {
        let swept = self.conns.sweep_ages(now);
        if swept.closed > 0 {
            self.metrics
                .connections_reset(ResetReason::Age, swept.closed);
            log::debug!("closed {} connections past their age", swept.closed);
        }
        if !swept.graced.is_empty() {
            let graced = swept.graced.len() as u64;
            self.metrics
                .connections_reset(ResetReason::AgeGrace, graced);
            let mut given_up = 0;
            for conn in swept.graced {
                for entry in self.inflight.remove_from(conn, now) {
                    self.release_connection(&entry);
                    given_up += 1;
                }
            }
            // Their replies could not reach the client any more: dropped, and answered as far
            // as the tally goes (the workers' late outcomes find no entry).
            self.outbox.tally.answered += given_up;
            self.outbox.lost(DropReason::Age, given_up);
            log::debug!(
                "closed {graced} connections at the end of their grace, {given_up} requests given up"
            );
        }
        if swept.crossed > 0 {
            // Read (after the close) and dropped: in the tally on both sides.
            self.outbox.tally.read += swept.crossed;
            self.outbox.tally.answered += swept.crossed;
            self.outbox.lost(DropReason::Age, swept.crossed);
        }
        swept.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(start: Instant) -> View {
        View {
            now: start,
            expires: start + Duration::from_secs(10),
            grace: Duration::from_secs(5),
            phase: Phase::Young,
            holds: false,
            last_read: start,
            unread: false,
            written: true,
            delivered: true,
        }
    }

    #[test]
    fn young_connections_wait_for_their_age() {
        let t = Instant::now();
        let v = view(t);
        assert_eq!(decide(&v), Step::Wait(Some(v.expires)));
    }

    #[test]
    fn an_aged_idle_connection_is_closed_after_a_quiet_moment() {
        let t = Instant::now();
        let mut v = view(t);
        v.now = v.expires;
        v.last_read = v.expires - Duration::from_millis(30);
        assert_eq!(
            decide(&v),
            Step::Wait(Some(v.last_read + QUIET)),
            "read 30 ms ago: not quiet yet"
        );
        v.now = v.last_read + QUIET;
        assert_eq!(decide(&v), Step::Close);
        v.phase = Phase::Due;
        assert_eq!(decide(&v), Step::Close);
    }

    #[test]
    fn an_aged_connection_with_replies_in_flight_or_a_request_arriving_waits() {
        let t = Instant::now();
        let mut v = view(t);
        v.now = v.expires + QUIET;
        v.delivered = false;
        assert_eq!(decide(&v), Step::Wait(Some(v.now + RECHECK)));
        v.delivered = true;
        v.unread = true;
        assert_eq!(decide(&v), Step::Wait(Some(v.now + RECHECK)));
        v.unread = false;
        v.holds = true;
        assert_eq!(
            decide(&v),
            Step::Wait(Some(v.expires + v.grace)),
            "holding: until the grace, or until its last request is answered"
        );
        v.phase = Phase::Corked;
        v.holds = false;
        v.unread = true;
        assert_eq!(
            decide(&v),
            Step::Uncork,
            "a corked connection with a request arriving"
        );
    }

    #[test]
    fn a_corked_connection_closes_once_libzmq_wrote_the_reply() {
        let t = Instant::now();
        let mut v = view(t);
        v.now = v.expires + Duration::from_millis(1);
        v.phase = Phase::Corked;
        // Busy until a moment ago: the quiet rule does not apply to the shadow of a reply.
        v.last_read = v.now;
        v.delivered = false;
        v.written = false;
        assert_eq!(decide(&v), Step::Wait(Some(v.now + SETTLE)));
        v.written = true;
        assert_eq!(decide(&v), Step::Close);
        v.unread = true;
        assert_eq!(decide(&v), Step::Uncork, "a request is on its way");
        v.unread = false;
        v.holds = true;
        assert_eq!(decide(&v), Step::Uncork, "it took another request");
    }

    #[test]
    fn the_grace_ends_everything_but_a_half_close_already_made() {
        let t = Instant::now();
        let mut v = view(t);
        v.now = v.expires + v.grace;
        v.holds = true;
        for phase in [Phase::Young, Phase::Due, Phase::Corked] {
            v.phase = phase;
            assert_eq!(decide(&v), Step::Abort(ResetReason::AgeGrace), "{phase:?}");
        }
        v.grace = Duration::ZERO;
        v.now = v.expires;
        v.phase = Phase::Due;
        assert_eq!(
            decide(&v),
            Step::Abort(ResetReason::AgeGrace),
            "no grace: at the age, with what it holds"
        );
        v.holds = false;
        v.last_read = v.now - QUIET;
        assert_eq!(
            decide(&v),
            Step::Close,
            "no grace, but quiet: closed cleanly"
        );
        let since = v.now;
        v.phase = Phase::Closing { since };
        assert_eq!(decide(&v), Step::Wait(Some(since + HALF_CLOSED_LINGER)));
        v.now = since + HALF_CLOSED_LINGER;
        assert_eq!(decide(&v), Step::Finish);
        v.phase = Phase::Done;
        assert_eq!(decide(&v), Step::Wait(None));
    }
}
