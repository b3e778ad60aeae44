//! Queue management by time: what the pool knows about how long requests wait and take, shared
//! lock-free between the workers (which measure it) and the coordinator (which admits by it).
//!
//! As in Facebook's server queues ("Fail at Scale", ACM Queue 2015) and CoDel: while the queue
//! keeps draining, nothing is refused; once it has not drained for an interval (a *standing*
//! queue), new requests whose predicted wait plus a service time is past the target are
//! refused at the door, at once, and a request that has waited past the target plus a service
//! time (what the door's prediction allowed, and one service time more) is not started. In
//! steady overload every refusal is then immediate, and workers shed only what the prediction
//! got wrong. The target follows the service time ([`TARGET_SERVICE_TIMES`] mean service times at
//! least), so a slow handler's ordinary queue is never taken for overload. The pure decisions
//! are [`past_target`] and [`predicted_wait`]; [`QueueState`] holds the measurements, and the
//! job queue (`jobs.rs`) how long it has gone without being empty.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The effective target is at least this many mean service times: with the door refusing at
/// the target, the queue then holds about this many requests per worker, enough that a worker
/// never idles for want of one while clients are refused.
pub const TARGET_SERVICE_TIMES: u32 = 2;
/// Weight of a new service-time sample in the moving average (1/8: a few dozen requests
/// forget a change of handler cost).
const EWMA_SHIFT: u32 = 3;

/// The queue's timing, shared by the pool and the coordinator.
#[derive(Debug)]
pub struct QueueState {
    target: Duration,
    interval: Duration,
    /// Moving average of handler time, nanoseconds (0: no sample yet).
    service_ns: AtomicU64,
}

impl QueueState {
    /// A queue with `--queue-target` and `--queue-interval`.
    pub fn new(target: Duration, interval: Duration) -> QueueState {
        QueueState {
            target,
            interval,
            service_ns: AtomicU64::new(0),
        }
    }

    /// A handler ran for `took`.
    pub fn served(&self, took: Duration) {
        let sample = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .service_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |mean| {
                Some(if mean == 0 {
                    sample
                } else {
                    // mean + (sample - mean) / 8, in signed arithmetic.
                    let delta = (sample as i128 - mean as i128) >> EWMA_SHIFT;
                    (mean as i128 + delta).clamp(1, u64::MAX as i128) as u64
                })
            });
    }

    /// The mean handler time (zero before the first request finished).
    pub fn service(&self) -> Duration {
        Duration::from_nanos(self.service_ns.load(Ordering::Relaxed))
    }

    /// The target in force: `--queue-target`, or [`TARGET_SERVICE_TIMES`] mean service times
    /// if that is longer.
    pub fn target(&self) -> Duration {
        self.target
            .max(self.service().saturating_mul(TARGET_SERVICE_TIMES))
    }

    /// The interval in force: `--queue-interval`, and never shorter than the target.
    pub fn interval(&self) -> Duration {
        self.interval.max(self.target())
    }

    /// Whether a worker taking a request that waited `sojourn`, from a queue that had gone
    /// `undrained` without being empty, must not start it: past the target plus one service
    /// time in a standing queue. The door lets in only requests whose predicted wait plus a
    /// service time is within the target, so a worker sheds only what the prediction got wrong
    /// (the handler's cost changed), not the ordinary spread of the wait around it.
    pub fn shed(&self, undrained: Duration, sojourn: Duration) -> bool {
        let limit = self.target().saturating_add(self.service());
        past_target(undrained, sojourn, limit, self.interval())
    }

    /// Whether a request arriving with `predicted` wait ahead of it, to a queue that has gone
    /// `undrained` without being empty, would be shed when its turn came: it would then have
    /// waited `predicted` plus up to a service time (the requests running when it arrived), in
    /// a queue undrained for as much longer.
    pub fn shed_at_door(&self, undrained: Duration, predicted: Duration) -> bool {
        let wait = predicted.saturating_add(self.service());
        past_target(
            undrained.saturating_add(wait),
            wait,
            self.target(),
            self.interval(),
        )
    }
}

/// The one rule: a request that has waited `wait` in a queue that has gone `undrained`
/// without draining is past its time when the queue stands (undrained longer than `interval`)
/// and it waited longer than `target`.
pub fn past_target(
    undrained: Duration,
    wait: Duration,
    target: Duration,
    interval: Duration,
) -> bool {
    undrained > interval && wait > target
}

/// The wait a request arriving now can expect: `queued` requests ahead of it, shared by
/// `workers`, each taking `service`.
pub fn predicted_wait(queued: usize, workers: usize, service: Duration) -> Duration {
    let per_worker = queued as f64 / workers.max(1) as f64;
    service.mul_f64(per_worker)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_target_follows_the_service_time() {
        let q = QueueState::new(20 * MS, 100 * MS);
        assert_eq!((q.target(), q.interval()), (20 * MS, 100 * MS));
        q.served(10 * MS);
        assert_eq!(q.service(), 10 * MS, "the first sample is the mean");
        assert_eq!(q.target(), 20 * MS);
        q.served(1500 * MS);
        // 10 + (1500 - 10) / 8
        assert_eq!(q.service(), Duration::from_nanos(196_250_000));
        assert_eq!(q.target(), Duration::from_nanos(392_500_000));
        assert_eq!(q.interval(), q.target(), "never shorter than the target");
        for _ in 0..200 {
            q.served(1500 * MS);
        }
        assert!(q.service() > 1490 * MS && q.service() <= 1500 * MS);
    }

    #[test]
    fn only_a_standing_queue_sheds_and_only_past_the_target() {
        let (target, interval) = (20 * MS, 100 * MS);
        assert!(
            !past_target(100 * MS, Duration::from_secs(5), target, interval),
            "draining"
        );
        assert!(
            !past_target(101 * MS, 20 * MS, target, interval),
            "at the target"
        );
        assert!(past_target(101 * MS, 21 * MS, target, interval));
    }

    #[test]
    fn the_door_refuses_what_the_worker_would_shed() {
        let q = QueueState::new(20 * MS, 100 * MS);
        q.served(10 * MS);
        // Just drained (a burst): a wait up to the interval (with a service time) is let in:
        // it will be served.
        assert!(!q.shed_at_door(Duration::ZERO, 90 * MS));
        assert!(
            q.shed_at_door(Duration::ZERO, 91 * MS),
            "past the interval by its turn"
        );
        // Standing: a wait that with one service time exceeds the target is refused.
        let standing = Duration::from_secs(1);
        assert!(!q.shed_at_door(standing, 10 * MS));
        assert!(q.shed_at_door(standing, 11 * MS));
        // A worker sheds past the target and one service time: past what the door let in.
        assert!(q.shed(standing, 31 * MS) && !q.shed(standing, 30 * MS));
        assert!(!q.shed(100 * MS, Duration::from_secs(5)), "draining: never");
    }

    #[test]
    fn the_predicted_wait_shares_the_queue_among_the_workers() {
        assert_eq!(predicted_wait(0, 2, 10 * MS), Duration::ZERO);
        assert_eq!(predicted_wait(4, 2, 10 * MS), 20 * MS);
        assert_eq!(predicted_wait(3, 2, 10 * MS), 15 * MS);
        assert_eq!(predicted_wait(5, 0, MS), 5 * MS, "no worker counts as one");
        assert_eq!(
            predicted_wait(256, 2, Duration::from_micros(2)),
            Duration::from_micros(256)
        );
    }
}
