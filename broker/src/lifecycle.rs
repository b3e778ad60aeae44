//! The broker's lifecycle state and health, shared lock-free between the coordinator (which
//! publishes the state its lifecycle clock decides, `coordinator/clock.rs`) and the admin
//! server (which reports it as readiness and liveness). The states and their transitions are
//! drawn in docs/architecture.md, "Lifecycle".

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use worker::Activity;

/// Where the broker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum State {
    /// Sockets bound, waiting for every worker to report that it started.
    Starting = 0,
    /// Taking work; ready.
    Serving = 1,
    /// A stop signal seen: not ready, still taking work for `--shutdown-delay`.
    Stopping = 2,
    /// Taking no new work (`ERR draining`), finishing what it took.
    Draining = 3,
    /// Drained; flushing replies and joining workers.
    Stopped = 4,
}

impl State {
    fn from_u8(raw: u8) -> State {
        match raw {
            0 => State::Starting,
            1 => State::Serving,
            2 => State::Stopping,
            3 => State::Draining,
            _ => State::Stopped,
        }
    }

    /// Lower-case name, as logged and as the health reply's second frame.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Serving => "serving",
            State::Stopping => "stopping",
            State::Draining => "draining",
            State::Stopped => "stopped",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the broker is not live.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unhealthy {
    /// The coordinator loop has not turned for this long.
    #[error("coordinator loop has not turned for {0:?}")]
    CoordinatorStuck(Duration),
    /// Every worker has been on its current request for longer than the threshold.
    #[error("all {workers} workers have been on one request for more than {threshold:?}")]
    PoolWedged {
        /// Pool size.
        workers: usize,
        /// `--stuck-after`.
        threshold: Duration,
    },
}

/// Shared state and health of one broker.
#[derive(Debug)]
pub struct Status {
    state: AtomicU8,
    /// New work is refused to stay inside the memory limit.
    shedding: AtomicBool,
    epoch: Instant,
    heartbeat_ms: AtomicU64,
    stuck_after: Duration,
    activity: Arc<Activity>,
}

impl Status {
    /// A starting broker whose workers report to `activity`.
    pub fn new(stuck_after: Duration, activity: Arc<Activity>) -> Status {
        Status {
            state: AtomicU8::new(State::Starting as u8),
            shedding: AtomicBool::new(false),
            epoch: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            stuck_after,
            activity,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Moves to `next`, logging the transition at info (the coordinator calls this in one
    /// place, with the state its clock decided).
    pub fn set(&self, next: State) {
        let previous = State::from_u8(self.state.swap(next as u8, Ordering::AcqRel));
        if previous != next {
            log::info!(target: "broker::lifecycle", "state {previous} -> {next}");
        }
    }

    /// Ready to be sent traffic: only while serving (never once a stop signal arrived), and
    /// not while new work would be refused for memory. A pod at `--max-connections` stays
    /// ready: it refuses only the excess connections (which their clients retry, through a
    /// balancer to another pod), where unready would take every pod of a fleet that headless
    /// clients all connect to out of its Services at once (docs/kubernetes.md, section 3).
    pub fn ready(&self) -> bool {
        self.not_ready_because().is_none()
    }

    /// Why the broker is not ready, if it is not.
    pub fn not_ready_because(&self) -> Option<String> {
        let state = self.state();
        if state != State::Serving {
            Some(state.to_string())
        } else if self.shedding.load(Ordering::Relaxed) {
            Some("shedding load near --memory-limit".into())
        } else {
            None
        }
    }

    /// Whether new work is refused for memory (set by the coordinator from the guard's flag).
    pub fn set_shedding(&self, shedding: bool) {
        self.shedding.store(shedding, Ordering::Relaxed);
    }

    /// Called by the coordinator every time its loop turns, with the time it read.
    pub fn heartbeat_at(&self, now: Instant) {
        self.heartbeat_ms.store(
            now.saturating_duration_since(self.epoch).as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    /// Workers on their current request for longer than `--stuck-after`.
    pub fn stuck_workers(&self) -> usize {
        self.activity
            .busy_for()
            .filter(|busy| busy.is_some_and(|d| d > self.stuck_after))
            .count()
    }

    /// Live unless the coordinator stopped turning or every worker is stuck. One stuck worker
    /// among healthy ones is not a reason to restart (that would kill the others' requests).
    pub fn live(&self) -> Result<(), Unhealthy> {
        self.live_at(self.epoch.elapsed())
    }

    /// [`Status::live`] at `now` (time since this status was made).
    fn live_at(&self, now: Duration) -> Result<(), Unhealthy> {
        let beat = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        let since = now.saturating_sub(beat);
        if since > self.stuck_after {
            return Err(Unhealthy::CoordinatorStuck(since));
        }
        let workers = self.activity.len();
        if workers > 0 && self.stuck_workers() == workers {
            return Err(Unhealthy::PoolWedged {
                workers,
                threshold: self.stuck_after,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_serving() {
        let status = Status::new(Duration::from_secs(1), Arc::new(Activity::new(1)));
        assert!(!status.ready());
        status.set(State::Serving);
        assert!(status.ready());
        status.set_shedding(true);
        assert_eq!(
            status.not_ready_because().as_deref(),
            Some("shedding load near --memory-limit")
        );
        status.set_shedding(false);
        assert!(status.ready());
        status.set(State::Stopping);
        assert!(!status.ready());
        assert_eq!(status.state(), State::Stopping);
    }

    #[test]
    fn idle_broker_is_live_and_a_silent_coordinator_is_not() {
        let status = Status::new(Duration::from_secs(30), Arc::new(Activity::new(2)));
        let at = |ms: u64| status.heartbeat_ms.store(ms, Ordering::Relaxed);
        let secs = Duration::from_secs;
        at(1_000);
        assert_eq!(status.live_at(secs(1)), Ok(()));
        assert_eq!(status.live_at(secs(31)), Ok(()), "exactly the threshold");
        assert_eq!(
            status.live_at(secs(32)),
            Err(Unhealthy::CoordinatorStuck(secs(31)))
        );
        at(32_000);
        assert_eq!(status.live_at(secs(32)), Ok(()), "turning again");
    }
}
