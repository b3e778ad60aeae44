//! Intake: what happens to a request from the moment the coordinator reads it until it is
//! queued for a worker or answered at once. `Coordinator::on_request` inspects it once
//! (`shared::protocol::inspect`), attributes it to its connection, strips its deadline header,
//! measures the load it meets, and asks `admission::admit` whether to serve it, answer a health
//! check, or refuse it and why (a typed `RefusedReason`, counted by reason).

use std::os::fd::RawFd;
use std::time::Duration;

use shared::metrics::RefusedReason;
use shared::protocol::{inspect, RequestKind};
use worker::queue::predicted_wait;
use worker::Job;
use zmq::Message;

use super::admission::{admit, cost, counts_as_demand, refusal, Admission, Load};
use super::inflight::{Entry, Origin};
use super::replies::Body;
use super::Coordinator;
use crate::conns::Attribution;

impl Coordinator {
    /// Handles one request; `dropped_bytes` are the wire bytes of frames read past the cap.
    /// `frames` is left empty (its frames moved into the job or dropped).
    pub(super) fn on_request(&mut self, frames: &mut Vec<Message>, dropped_bytes: u64) {
        // A ROUTER always prepends the routing id, so there is at least one frame.
        let Some(seen) = inspect(frames, self.config.max_message_bytes) else {
            return;
        };
        let Some(origin) = self.attribute(frames, seen.wire_bytes as u64 + dropped_bytes) else {
            frames.clear();
            return;
        };
        let now = self.now;
        self.outbox.tally.read += 1;
        self.last_read = now;
        let header_bytes = if seen.header {
            frames[seen.envelope_frames].len()
        } else {
            0
        };
        self.rec
            .request_read(seen.envelope_bytes + header_bytes + seen.body_bytes);
        // The header frame is not held: it is stripped before the job is queued.
        let cost = cost(
            &seen,
            frames[0].len(),
            frames.len() - usize::from(seen.header),
        );
        let admission = if seen.verdict == Ok(RequestKind::Work) {
            let load = self.load(origin, cost);
            admit(seen.verdict, seen.timeout, load)
        } else {
            admit(seen.verdict, seen.timeout, Load::default())
        };
        let mut envelope = self.outbox.envelope();
        if seen.echo_envelope {
            envelope.extend(frames.drain(..seen.envelope_frames));
        } else {
            envelope.extend(frames.drain(..1));
        }
        match admission {
            Admission::Serve => {
                if seen.header {
                    // The handler sees the body alone.
                    frames.remove(0);
                }
                let entry = Entry {
                    envelope,
                    origin,
                    received: now,
                    cost,
                };
                if let Some(o) = origin {
                    self.conns.hold(o.fd, o.conn, cost as u64);
                }
                let Ok(ticket) = self.inflight.insert(entry, now) else {
                    // Admission checked the table; unreachable, but never lose it silently.
                    log::error!("in-flight table full after the check; request dropped");
                    frames.clear();
                    return;
                };
                // The first free worker takes it. The queue holds at most --max-inflight jobs
                // (the table is checked first).
                let job = Job {
                    ticket,
                    received: now,
                    deadline: seen.timeout.and_then(|budget| now.checked_add(budget)),
                    body: std::mem::take(frames),
                };
                if self.workers.jobs.push(job).is_err() {
                    log::error!("job queue closed; request dropped");
                }
            }
            Admission::Health => {
                frames.clear();
                self.metrics.health_check();
                self.answer(envelope, origin, Body::Health(self.clock.state()), None);
            }
            Admission::Reject(code) => {
                frames.clear();
                self.answer(envelope, origin, Body::refusal(code), None);
            }
            Admission::Refuse(reason) => {
                frames.clear();
                self.refused(reason, seen.timeout);
                let (code, message) = refusal(reason);
                self.answer(envelope, origin, Body::Err(code, message), None);
            }
        }
    }

    /// The load a work request costing `cost` from `origin` meets. Asked for work only: it
    /// may measure connections.
    fn load(&mut self, origin: Option<Origin>, cost: usize) -> Load {
        let queue = &self.workers.queue;
        let now = self.now;
        let predicted = predicted_wait(
            self.workers.jobs.len(),
            self.config.workers,
            queue.service(),
        );
        Load {
            draining: self.clock.draining(),
            full: self.inflight.is_full(),
            bytes_fit: self.inflight.fits(cost),
            conn_fits: origin.is_none_or(|o| {
                let share = self.config.max_connection_bytes as u64 / 2;
                self.conns.fits(o.fd, o.conn, cost as u64, share)
            }),
            shedding: self.guard.shedding(),
            past_target: queue.shed_at_door(self.workers.jobs.undrained(now), predicted),
            predicted_reply: predicted.saturating_add(queue.service()),
        }
    }

    /// Counts a refusal by reason and, when more pods would have served it, as demand, as
    /// far as the allowance lets (see `demand`). `budget` is the request's at the door, `None`
    /// for a shed at a worker.
    pub(super) fn refused(&mut self, reason: RefusedReason, budget: Option<Duration>) {
        self.rec.refused(reason);
        let service = self.workers.queue.service();
        if counts_as_demand(reason, budget, service) {
            let seconds = self.allowance.take(self.now, service);
            self.workers.demand.refused(seconds);
        }
    }

    /// The connection a request of `wire` bytes came through: `Some(origin)` to serve it
    /// (`Some(None)` when its connection is not tracked), `None` when it must not be served
    /// (its connection is being refused, or was reset for a revoked key).
    fn attribute(&mut self, frames: &mut [Message], wire: u64) -> Option<Option<Origin>> {
        // The connection's fd is in the metadata of the first frame the client sent, not of
        // the routing id: libzmq 4.3.4 drops the routing id's metadata when a poll prefetched
        // the message (fixed upstream in 74529d97).
        let fd = frames
            .get_mut(1)
            .and_then(|first| first.gets("__fd"))
            .and_then(|text| text.parse::<RawFd>().ok());
        let Some(fd) = fd else {
            return Some(None);
        };
        let mut attribution = self.conns.request_read(fd, wire);
        if attribution == Attribution::Untracked {
            // Its connection's ACCEPTED event may still be queued: take the events, retry.
            if let Err(e) = self.read_monitor() {
                log::error!("{e}");
            }
            attribution = self.conns.request_read(fd, wire);
        }
        match attribution {
            // Over --max-connections and being closed: not served.
            Attribution::Refused => None,
            Attribution::Tracked { id, first } => {
                if first && !self.admit_key(fd, &mut frames[1]) {
                    return None;
                }
                Some(Some(Origin { fd, conn: id }))
            }
            Attribution::Untracked => Some(None),
        }
    }
}
