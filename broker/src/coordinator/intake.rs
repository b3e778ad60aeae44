//! Intake: what happens to a request from the moment the coordinator reads it until it is
//! queued for a worker or answered at once. `Coordinator::on_request` inspects it once
//! (`shared::protocol::inspect`), attributes it to its connection, and asks [`admit`], a pure
//! decision over the request's verdict and the broker's load, whether to serve, answer a
//! health check, or refuse it and why.

use std::os::fd::RawFd;

use shared::protocol::{inspect, Inspection, RequestKind, FRAME_OVERHEAD};
use shared::ErrorCode;
use worker::Job;
use zmq::Message;

use super::inflight::{Entry, Origin};
use super::replies::Body;
use super::Coordinator;
use crate::conns::Attribution;

/// Why a request that passed its checks is not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The broker is draining.
    Draining,
    /// `--max-inflight` requests are held.
    MaxInflight,
    /// The request would take the held bytes over `--max-inflight-bytes`.
    MaxInflightBytes,
    /// Its connection's requests in flight and unread replies would exceed half of
    /// `--max-connection-bytes`: its reply might not fit (the other half is room for replies
    /// already due and for refusals like this one).
    ConnectionBytes,
    /// All connections' unread replies would exceed half of `--max-buffered-bytes`.
    BufferedBytes,
    /// The process is near its memory limit.
    Memory,
}

impl Refusal {
    /// The `ERR` code the client gets.
    pub fn code(self) -> ErrorCode {
        match self {
            Refusal::Draining => ErrorCode::Draining,
            Refusal::MaxInflight
            | Refusal::MaxInflightBytes
            | Refusal::ConnectionBytes
            | Refusal::BufferedBytes
            | Refusal::Memory => ErrorCode::Overloaded,
        }
    }
}

/// What admission decided for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Queue it for a worker.
    Serve,
    /// A health request: the coordinator answers it.
    Health,
    /// Malformed or over a size limit: `ERR` with this code.
    Reject(ErrorCode),
    /// Well-formed, but the broker will not take it now.
    Refuse(Refusal),
}

/// The broker's load as admission sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// New work is refused (the drain has begun).
    pub draining: bool,
    /// `--max-inflight` requests are held.
    pub full: bool,
    /// The request's cost fits under `--max-inflight-bytes`.
    pub bytes_fit: bool,
    /// The request's cost fits its connection's share of `--max-connection-bytes`.
    pub conn_fits: bool,
    /// The request's cost fits the share of `--max-buffered-bytes` work may use.
    pub buffered_fits: bool,
    /// New work is refused to stay inside the memory limit.
    pub shedding: bool,
}

/// Decides what becomes of a request with `verdict` (from `inspect`) under `load`. Health
/// checks are answered in every state, so a draining or overloaded broker still says so.
pub fn admit(verdict: Result<RequestKind, ErrorCode>, load: Load) -> Admission {
    match verdict {
        Err(code) => Admission::Reject(code),
        Ok(RequestKind::Health) => Admission::Health,
        Ok(RequestKind::Work) if load.draining => Admission::Refuse(Refusal::Draining),
        Ok(RequestKind::Work) if load.full => Admission::Refuse(Refusal::MaxInflight),
        Ok(RequestKind::Work) if !load.bytes_fit => Admission::Refuse(Refusal::MaxInflightBytes),
        Ok(RequestKind::Work) if !load.conn_fits => Admission::Refuse(Refusal::ConnectionBytes),
        Ok(RequestKind::Work) if !load.buffered_fits => Admission::Refuse(Refusal::BufferedBytes),
        Ok(RequestKind::Work) if load.shedding => Admission::Refuse(Refusal::Memory),
        Ok(RequestKind::Work) => Admission::Serve,
    }
}

/// What a request counts against `--max-inflight-bytes` while it is held: every byte it keeps
/// (the routing id, the rest of the envelope, the body) and [`FRAME_OVERHEAD`] for each of its
/// `frames` (a `zmq_msg_t` apiece). The envelope stays in the table until the reply, so it is
/// counted like the body.
pub fn cost(seen: &Inspection, routing_id: usize, frames: usize) -> usize {
    routing_id + seen.envelope_bytes + seen.body_bytes + frames * FRAME_OVERHEAD
}

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
        self.rec.request_read(seen.envelope_bytes + seen.body_bytes);
        let cost = cost(&seen, frames[0].len(), frames.len());
        let work = seen.verdict == Ok(RequestKind::Work);
        let load = Load {
            draining: self.clock.draining(),
            full: self.inflight.is_full(),
            bytes_fit: self.inflight.fits(cost),
            // Only asked for work: they may measure connections.
            conn_fits: !work
                || origin.is_none_or(|o| {
                    let share = self.config.max_connection_bytes as u64 / 2;
                    self.conns.fits(o.fd, o.conn, cost as u64, share)
                }),
            buffered_fits: !work || self.outbox.buffered_room(&mut self.conns, cost as u64),
            shedding: self.guard.shedding(),
        };
        let admission = admit(seen.verdict, load);
        let mut envelope = self.outbox.envelope();
        if seen.echo_envelope {
            envelope.extend(frames.drain(..seen.envelope_frames));
        } else {
            envelope.extend(frames.drain(..1));
        }
        match admission {
            Admission::Serve => {
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
                // The first free worker takes it. The channel holds at most --max-inflight
                // jobs (the table is checked first).
                let job = Job {
                    ticket,
                    received: now,
                    body: std::mem::take(frames),
                };
                if self.workers.jobs.send(job).is_err() {
                    log::error!("job channel closed; request dropped");
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
            Admission::Refuse(refusal) => {
                frames.clear();
                self.answer(envelope, origin, Body::refusal(refusal.code()), None);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Load = Load {
        draining: false,
        full: false,
        bytes_fit: true,
        conn_fits: true,
        buffered_fits: true,
        shedding: false,
    };

    #[test]
    fn an_idle_broker_serves_work_and_answers_health() {
        assert_eq!(admit(Ok(RequestKind::Work), IDLE), Admission::Serve);
        assert_eq!(admit(Ok(RequestKind::Health), IDLE), Admission::Health);
    }

    #[test]
    fn malformed_requests_are_rejected_whatever_the_load() {
        for load in [
            IDLE,
            Load {
                draining: true,
                full: true,
                bytes_fit: false,
                conn_fits: false,
                buffered_fits: false,
                shedding: true,
            },
        ] {
            for code in [ErrorCode::TooLarge, ErrorCode::BadRequest] {
                assert_eq!(admit(Err(code), load), Admission::Reject(code));
            }
        }
    }

    #[test]
    fn every_limit_refuses_work_but_never_a_health_check() {
        let cases = [
            (
                Load {
                    draining: true,
                    ..IDLE
                },
                Refusal::Draining,
                ErrorCode::Draining,
            ),
            (
                Load { full: true, ..IDLE },
                Refusal::MaxInflight,
                ErrorCode::Overloaded,
            ),
            (
                Load {
                    bytes_fit: false,
                    ..IDLE
                },
                Refusal::MaxInflightBytes,
                ErrorCode::Overloaded,
            ),
            (
                Load {
                    conn_fits: false,
                    ..IDLE
                },
                Refusal::ConnectionBytes,
                ErrorCode::Overloaded,
            ),
            (
                Load {
                    buffered_fits: false,
                    ..IDLE
                },
                Refusal::BufferedBytes,
                ErrorCode::Overloaded,
            ),
            (
                Load {
                    shedding: true,
                    ..IDLE
                },
                Refusal::Memory,
                ErrorCode::Overloaded,
            ),
        ];
        for (load, refusal, code) in cases {
            assert_eq!(
                admit(Ok(RequestKind::Work), load),
                Admission::Refuse(refusal)
            );
            assert_eq!(refusal.code(), code);
            assert_eq!(admit(Ok(RequestKind::Health), load), Admission::Health);
        }
    }

    #[test]
    fn draining_is_told_before_overload() {
        let everything = Load {
            draining: true,
            full: true,
            bytes_fit: false,
            conn_fits: false,
            buffered_fits: false,
            shedding: true,
        };
        assert_eq!(
            admit(Ok(RequestKind::Work), everything),
            Admission::Refuse(Refusal::Draining),
            "a draining broker sends clients elsewhere, not into a retry here"
        );
    }

    #[test]
    fn cost_counts_every_byte_and_frame_held() {
        let frames: [&[u8]; 5] = [b"routing-id", b"req-7", b"", b"hello", b"!"];
        let seen = inspect(&frames, 1 << 20).expect("frames");
        assert_eq!(
            cost(&seen, 10, frames.len()),
            10 + 5 + 6 + 5 * FRAME_OVERHEAD
        );
        let bare: [&[u8]; 2] = [b"routing-id", b"x"];
        let seen = inspect(&bare, 1 << 20).expect("frames");
        assert_eq!(cost(&seen, 10, bare.len()), 10 + 1 + 2 * FRAME_OVERHEAD);
        // Issue 19's attack: a 1 MiB envelope frame around a 4-byte body costs its megabyte.
        let big = vec![7u8; (1 << 20) - 100];
        let attack: [&[u8]; 4] = [b"id", &big, b"", b"9999"];
        let seen = inspect(&attack, 1 << 20).expect("frames");
        assert_eq!(seen.verdict, Ok(RequestKind::Work));
        assert!(cost(&seen, 2, attack.len()) > (1 << 20) - 100);
    }
}
