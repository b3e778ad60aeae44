//! The lifecycle clock: when the shutdown delay ends, when the drain must give up, and when a
//! drained broker may stop. Pure (it is given `now` and never reads a clock itself), so every
//! transition is unit-tested without processes or sleeps.
//!
//! ```text
//! running --stop signal--> stopping --shutdown delay--> draining --held = 0 and front quiet--> stop
//!                                                          \--drain deadline--> expire, stop
//! ```

use std::time::{Duration, Instant};

/// Once nothing is held, the drain still answers `ERR draining` until the front has been quiet
/// this long: a client in a request loop learns it must go elsewhere instead of having its
/// next request, already on the wire, dropped unread when the socket closes.
pub const DRAIN_QUIET: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    /// Not ready, still serving until `drain_at`.
    Stopping {
        drain_at: Option<Instant>,
    },
    /// Refusing new work until everything held is answered, at most until `deadline`.
    Draining {
        deadline: Option<Instant>,
    },
    Done,
}

/// What the coordinator must do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Keep serving; call again by this instant at the latest (`None`: no deadline).
    Wait(Option<Instant>),
    /// The shutdown delay is over: refuse new work from now on.
    BeginDrain,
    /// The drain deadline passed: answer what is still held with `ERR timeout`, then stop.
    Expire,
    /// Drained: stop.
    Stop,
}

/// The lifecycle timing of one broker.
#[derive(Debug)]
pub struct Clock {
    shutdown_delay: Duration,
    drain_timeout: Duration,
    phase: Phase,
}

impl Clock {
    /// A running broker's clock.
    pub fn new(shutdown_delay: Duration, drain_timeout: Duration) -> Clock {
        Clock {
            shutdown_delay,
            drain_timeout,
            phase: Phase::Running,
        }
    }

    /// A stop signal arrived at `now`. Returns false for a second one: stop at once.
    pub fn stop_requested(&mut self, now: Instant) -> bool {
        if self.phase != Phase::Running {
            return false;
        }
        self.phase = Phase::Stopping {
            drain_at: now.checked_add(self.shutdown_delay),
        };
        true
    }

    /// True from the first stop signal on.
    pub fn stopping(&self) -> bool {
        self.phase != Phase::Running
    }

    /// True once new work is refused.
    pub fn draining(&self) -> bool {
        matches!(self.phase, Phase::Draining { .. } | Phase::Done)
    }

    /// What to do at `now`, with `held` requests in flight and the last request read at
    /// `last_read`. Call until it answers [`Step::Wait`].
    pub fn step(&mut self, now: Instant, held: usize, last_read: Instant) -> Step {
        match self.phase {
            Phase::Running => Step::Wait(None),
            Phase::Stopping { drain_at } => match drain_at {
                Some(at) if now >= at => {
                    // Measured from the end of the delay, not from when this turn ran.
                    self.phase = Phase::Draining {
                        deadline: at.checked_add(self.drain_timeout),
                    };
                    Step::BeginDrain
                }
                other => Step::Wait(other),
            },
            Phase::Draining { deadline } => {
                if deadline.is_some_and(|d| now >= d) {
                    self.phase = Phase::Done;
                    return Step::Expire;
                }
                if held > 0 {
                    return Step::Wait(deadline);
                }
                match last_read.checked_add(DRAIN_QUIET) {
                    Some(quiet) if now < quiet => {
                        Step::Wait(Some(deadline.map_or(quiet, |d| d.min(quiet))))
                    }
                    _ => {
                        self.phase = Phase::Done;
                        Step::Stop
                    }
                }
            }
            Phase::Done => Step::Stop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn runs_until_a_signal_and_a_second_signal_means_now() {
        let t0 = Instant::now();
        let mut clock = Clock::new(5 * SEC, 10 * SEC);
        assert_eq!(clock.step(t0, 3, t0), Step::Wait(None));
        assert!(!clock.stopping());
        assert!(clock.stop_requested(t0));
        assert!(clock.stopping() && !clock.draining());
        assert!(!clock.stop_requested(t0 + SEC), "second signal");
    }

    #[test]
    fn serves_through_the_delay_then_drains_until_nothing_is_held() {
        let t0 = Instant::now();
        let mut clock = Clock::new(5 * SEC, 10 * SEC);
        clock.stop_requested(t0);
        assert_eq!(clock.step(t0 + SEC, 2, t0), Step::Wait(Some(t0 + 5 * SEC)));
        // The turn ran late: the deadline still counts from the end of the delay.
        assert_eq!(clock.step(t0 + 6 * SEC, 2, t0), Step::BeginDrain);
        assert!(clock.draining());
        assert_eq!(
            clock.step(t0 + 6 * SEC, 2, t0),
            Step::Wait(Some(t0 + 15 * SEC))
        );
        // Nothing held, but a request was read just now: wait for the front to go quiet.
        let read = t0 + 7 * SEC;
        assert_eq!(
            clock.step(read, 0, read),
            Step::Wait(Some(read + DRAIN_QUIET))
        );
        assert_eq!(clock.step(read + DRAIN_QUIET, 0, read), Step::Stop);
        assert_eq!(clock.step(read + 2 * DRAIN_QUIET, 0, read), Step::Stop);
    }

    #[test]
    fn the_drain_deadline_expires_what_is_held() {
        let t0 = Instant::now();
        let mut clock = Clock::new(Duration::ZERO, 10 * SEC);
        clock.stop_requested(t0);
        assert_eq!(clock.step(t0, 1, t0), Step::BeginDrain);
        assert_eq!(
            clock.step(t0 + 9 * SEC, 1, t0),
            Step::Wait(Some(t0 + 10 * SEC))
        );
        assert_eq!(clock.step(t0 + 10 * SEC, 1, t0), Step::Expire);
        assert_eq!(clock.step(t0 + 10 * SEC, 1, t0), Step::Stop);
    }

    #[test]
    fn the_quiet_wait_never_outlasts_the_deadline() {
        let t0 = Instant::now();
        let mut clock = Clock::new(Duration::ZERO, Duration::from_millis(50));
        clock.stop_requested(t0);
        assert_eq!(clock.step(t0, 0, t0), Step::BeginDrain);
        let deadline = t0 + Duration::from_millis(50);
        assert_eq!(clock.step(t0, 0, t0), Step::Wait(Some(deadline)));
        assert_eq!(clock.step(deadline, 0, t0), Step::Expire);
    }

    #[test]
    fn durations_past_the_end_of_time_mean_never() {
        let t0 = Instant::now();
        let mut clock = Clock::new(Duration::MAX, Duration::MAX);
        clock.stop_requested(t0);
        assert_eq!(clock.step(t0 + SEC, 0, t0), Step::Wait(None));
        let mut clock = Clock::new(Duration::ZERO, Duration::MAX);
        clock.stop_requested(t0);
        assert_eq!(clock.step(t0, 0, t0), Step::BeginDrain);
        assert_eq!(clock.step(t0, 1, t0), Step::Wait(None));
    }
}
