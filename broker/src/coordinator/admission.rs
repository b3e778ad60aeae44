//! Admission: the pure decision of what becomes of a request, from its verdict, its client's
//! budget and the broker's load ([`admit`]), the code and message a refusal is answered with,
//! and what a held request costs. No sockets, no clocks: unit-tested for every reason and
//! limit.

use std::time::Duration;

use shared::metrics::RefusedReason;
use shared::protocol::{Inspection, RequestKind, FRAME_OVERHEAD};
use shared::ErrorCode;

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
    Refuse(RefusedReason),
}

/// The broker's load as admission sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// New work is refused (the drain has begun).
    pub draining: bool,
    /// `--max-inflight` requests are held.
    pub full: bool,
    /// The request's cost fits under `--max-inflight-bytes`.
    pub bytes_fit: bool,
    /// The request's cost fits its connection's share of `--max-connection-bytes`.
    pub conn_fits: bool,
    /// New work is refused to stay inside the memory limit.
    pub shedding: bool,
    /// A request admitted now would wait past the queue target in a standing queue.
    pub past_target: bool,
    /// How long a request admitted now can expect to wait for its reply: its wait for a worker
    /// and a mean service time.
    pub predicted_reply: Duration,
}

/// Decides what becomes of a request with `verdict` (from `inspect`) and its client's
/// `budget` (from its deadline header) under `load`. Health checks are answered in every state,
/// so a draining or overloaded broker still says so. Refused at the door, in this order: the
/// drain, a budget already spent, the memory bounds, then time: a request the queue would shed
/// when its turn came (past the target in a standing queue; while the queue keeps draining
/// nothing is refused for time), or whose reply would come after its client's budget ran out
/// (its predicted wait and a mean service time: a late reply is a failure to its client).
pub fn admit(
    verdict: Result<RequestKind, ErrorCode>,
    budget: Option<Duration>,
    load: Load,
) -> Admission {
    use RefusedReason as R;
    let refuse = |reason| Admission::Refuse(reason);
    match verdict {
        Err(code) => Admission::Reject(code),
        Ok(RequestKind::Health) => Admission::Health,
        Ok(RequestKind::Work) if load.draining => refuse(R::Draining),
        Ok(RequestKind::Work) if budget.is_some_and(|b| b.is_zero()) => refuse(R::DeadlineExceeded),
        Ok(RequestKind::Work) if load.full => refuse(R::MaxInflight),
        Ok(RequestKind::Work) if !load.bytes_fit => refuse(R::MaxInflightBytes),
        Ok(RequestKind::Work) if !load.conn_fits => refuse(R::MaxConnectionBytes),
        Ok(RequestKind::Work) if load.shedding => refuse(R::Memory),
        Ok(RequestKind::Work) if load.past_target => refuse(R::PredictedWait),
        Ok(RequestKind::Work) if budget.is_some_and(|b| load.predicted_reply > b) => {
            refuse(R::DeadlineExceeded)
        }
        Ok(RequestKind::Work) => Admission::Serve,
    }
}

/// The `ERR` code and message a refused request is answered with.
pub fn refusal(reason: RefusedReason) -> (ErrorCode, &'static str) {
    use RefusedReason as R;
    match reason {
        R::Draining => (
            ErrorCode::Draining,
            "broker is shutting down; retry on another instance",
        ),
        R::DeadlineExceeded => (
            ErrorCode::DeadlineExceeded,
            "the request's deadline passed, or would before a worker could start it",
        ),
        R::PredictedWait | R::QueueTime => (
            ErrorCode::Overloaded,
            "broker's queue is longer than its target; retry later or elsewhere",
        ),
        R::MaxInflight | R::MaxInflightBytes | R::Memory => (
            ErrorCode::Overloaded,
            "broker is at its in-flight or memory limit; retry later or elsewhere",
        ),
        R::MaxConnectionBytes => (
            ErrorCode::Overloaded,
            "this connection holds as many requests and unread replies as it may; read \
             replies before sending more",
        ),
    }
}

/// Whether a refusal for `reason` counts as demand on the pool (the autoscaling signal, see
/// `demand`): work more pods would have done. Not the drain; not a connection over its own
/// bound (one client's window, which more pods do not shorten); not a request whose `budget`
/// was spent or shorter than a mean `service` time (an idle pool could not have served it
/// either). A shed at a worker passes `None`: it was admitted with time to spare.
pub fn counts_as_demand(
    reason: RefusedReason,
    budget: Option<Duration>,
    service: Duration,
) -> bool {
    use RefusedReason as R;
    match reason {
        R::Draining | R::MaxConnectionBytes => false,
        R::DeadlineExceeded => budget.is_none_or(|b| !b.is_zero() && b >= service),
        R::MaxInflight | R::MaxInflightBytes | R::Memory | R::PredictedWait | R::QueueTime => true,
    }
}

/// What a request counts against `--max-inflight-bytes` while it is held: every byte it keeps
/// (the routing id, the rest of the envelope, the body) and [`FRAME_OVERHEAD`] for each of its
/// `frames` (a `zmq_msg_t` apiece). The envelope stays in the table until the reply, so it is
/// counted like the body.
pub fn cost(seen: &Inspection, routing_id: usize, frames: usize) -> usize {
    routing_id + seen.envelope_bytes + seen.body_bytes + frames * FRAME_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::protocol::inspect;
    use RefusedReason as R;

    const MS: Duration = Duration::from_millis(1);

    const IDLE: Load = Load {
        draining: false,
        full: false,
        bytes_fit: true,
        conn_fits: true,
        shedding: false,
        past_target: false,
        predicted_reply: Duration::ZERO,
    };

    const WORK: Result<RequestKind, ErrorCode> = Ok(RequestKind::Work);

    #[test]
    fn refusals_count_as_demand_only_when_more_pods_would_have_served_them() {
        let service = 10 * MS;
        for reason in [
            R::MaxInflight,
            R::MaxInflightBytes,
            R::Memory,
            R::PredictedWait,
        ] {
            assert!(counts_as_demand(reason, None, service), "{reason:?}");
            assert!(
                counts_as_demand(reason, Some(service), service),
                "{reason:?}"
            );
        }
        assert!(counts_as_demand(R::QueueTime, None, service));
        // A deadline shed at a worker, or a budget the queue (not the handler) could not meet.
        assert!(counts_as_demand(R::DeadlineExceeded, None, service));
        assert!(counts_as_demand(
            R::DeadlineExceeded,
            Some(service),
            service
        ));
        // A budget spent, or shorter than the handler takes: no pool could have met it.
        assert!(!counts_as_demand(
            R::DeadlineExceeded,
            Some(Duration::ZERO),
            service
        ));
        assert!(!counts_as_demand(
            R::DeadlineExceeded,
            Some(service - MS),
            service
        ));
        assert!(!counts_as_demand(R::Draining, None, service));
        assert!(!counts_as_demand(R::MaxConnectionBytes, None, service));
    }

    #[test]
    fn an_idle_broker_serves_work_and_answers_health() {
        assert_eq!(admit(WORK, None, IDLE), Admission::Serve);
        assert_eq!(admit(WORK, Some(MS), IDLE), Admission::Serve);
        assert_eq!(
            admit(Ok(RequestKind::Health), None, IDLE),
            Admission::Health
        );
    }

    #[test]
    fn malformed_requests_are_rejected_whatever_the_load() {
        let everything = Load {
            draining: true,
            full: true,
            bytes_fit: false,
            conn_fits: false,
            shedding: true,
            past_target: true,
            predicted_reply: Duration::from_secs(60),
        };
        for load in [IDLE, everything] {
            for code in [ErrorCode::TooLarge, ErrorCode::BadRequest] {
                assert_eq!(
                    admit(Err(code), Some(Duration::ZERO), load),
                    Admission::Reject(code)
                );
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
                R::Draining,
                ErrorCode::Draining,
            ),
            (
                Load { full: true, ..IDLE },
                R::MaxInflight,
                ErrorCode::Overloaded,
            ),
            (
                Load {
                    bytes_fit: false,
                    ..IDLE
                },
                R::MaxInflightBytes,
                ErrorCode::Overloaded,
            ),
            (
                Load {
                    conn_fits: false,
                    ..IDLE
                },
                R::MaxConnectionBytes,
                ErrorCode::Overloaded,
            ),
            (
                Load {
                    shedding: true,
                    ..IDLE
                },
                R::Memory,
                ErrorCode::Overloaded,
            ),
            (
                Load {
                    past_target: true,
                    ..IDLE
                },
                R::PredictedWait,
                ErrorCode::Overloaded,
            ),
        ];
        for (load, reason, code) in cases {
            assert_eq!(
                admit(WORK, None, load),
                Admission::Refuse(reason),
                "{reason}"
            );
            assert_eq!(refusal(reason).0, code, "{reason}");
            assert_eq!(
                admit(Ok(RequestKind::Health), None, load),
                Admission::Health
            );
        }
    }

    #[test]
    fn a_long_queue_alone_is_not_refused() {
        // A burst that will drain (the queue's own rule says so): let in.
        let burst = Load {
            predicted_reply: Duration::from_millis(90),
            ..IDLE
        };
        assert_eq!(admit(WORK, None, burst), Admission::Serve);
        assert_eq!(
            admit(
                WORK,
                None,
                Load {
                    past_target: true,
                    ..burst
                }
            ),
            Admission::Refuse(R::PredictedWait)
        );
    }

    #[test]
    fn a_budget_that_is_spent_or_shorter_than_the_reply_is_refused_as_deadline_exceeded() {
        assert_eq!(
            admit(WORK, Some(Duration::ZERO), IDLE),
            Admission::Refuse(R::DeadlineExceeded)
        );
        let waiting = Load {
            // e.g. 6 ms in the queue and 4 ms in the handler
            predicted_reply: 10 * MS,
            ..IDLE
        };
        assert_eq!(admit(WORK, Some(10 * MS), waiting), Admission::Serve);
        assert_eq!(
            admit(WORK, Some(9 * MS), waiting),
            Admission::Refuse(R::DeadlineExceeded)
        );
        assert_eq!(refusal(R::DeadlineExceeded).0, ErrorCode::DeadlineExceeded);
        // No budget: no deadline to miss.
        assert_eq!(
            admit(
                WORK,
                None,
                Load {
                    predicted_reply: Duration::from_secs(9),
                    ..IDLE
                }
            ),
            Admission::Serve
        );
    }

    #[test]
    fn draining_is_told_before_overload_and_before_a_spent_budget() {
        let everything = Load {
            draining: true,
            full: true,
            bytes_fit: false,
            conn_fits: false,
            shedding: true,
            past_target: true,
            predicted_reply: Duration::from_secs(1),
        };
        assert_eq!(
            admit(WORK, Some(Duration::ZERO), everything),
            Admission::Refuse(R::Draining),
            "a draining broker sends clients elsewhere, not into a retry here"
        );
    }

    #[test]
    fn every_reason_has_a_message() {
        for &reason in R::ALL {
            assert!(!refusal(reason).1.is_empty(), "{reason}");
        }
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
