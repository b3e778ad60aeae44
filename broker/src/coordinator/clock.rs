//! The lifecycle clock: the broker's one lifecycle state machine. It holds the [`State`] and
//! decides every transition (started, stop requested, shutdown delay over, drained, drain
//! deadline); the coordinator publishes the state it holds in one place
//! (`Coordinator::publish_state`). Pure: it is given `now` and never reads a clock itself, so
//! every transition is unit-tested without processes or sleeps. The states and transitions are
//! drawn once, in docs/architecture.md ("Lifecycle").

use std::time::{Duration, Instant};

use crate::lifecycle::State;

/// Once nothing is held, the drain still answers `ERR draining` until the front has been quiet
/// this long: a client in a request loop learns it must go elsewhere instead of having its
/// next request, already on the wire, dropped unread when the socket closes.
pub const DRAIN_QUIET: Duration = Duration::from_millis(100);

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

/// The lifecycle of one broker: its state and the deadlines of the shutdown.
#[derive(Debug)]
pub struct Clock {
    shutdown_delay: Duration,
    drain_timeout: Duration,
    state: State,
    /// While stopping: when the drain begins (`None`: never).
    drain_at: Option<Instant>,
    /// While draining: when held requests are answered `ERR timeout` (`None`: never).
    deadline: Option<Instant>,
}

impl Clock {
    /// A starting broker's clock.
    pub fn new(shutdown_delay: Duration, drain_timeout: Duration) -> Clock {
        Clock {
            shutdown_delay,
            drain_timeout,
            state: State::Starting,
            drain_at: None,
            deadline: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Every worker reported that it started: a starting broker is serving.
    pub fn started(&mut self) {
        if self.state == State::Starting {
            self.state = State::Serving;
        }
    }

    /// A stop signal arrived at `now`. Returns false for a second one: stop at once.
    pub fn stop_requested(&mut self, now: Instant) -> bool {
        if self.stopping() {
            return false;
        }
        self.state = State::Stopping;
        self.drain_at = now.checked_add(self.shutdown_delay);
        true
    }

    /// True from the first stop signal on.
    pub fn stopping(&self) -> bool {
        self.state >= State::Stopping
    }

    /// True once new work is refused.
    pub fn draining(&self) -> bool {
        self.state >= State::Draining
    }

    /// What to do at `now`, with `held` requests in flight and the last request read at
    /// `last_read`. Call until it answers [`Step::Wait`].
    pub fn step(&mut self, now: Instant, held: usize, last_read: Instant) -> Step {
        match self.state {
            State::Starting | State::Serving => Step::Wait(None),
            State::Stopping => match self.drain_at {
                Some(at) if now >= at => {
                    // Measured from the end of the delay, not from when this turn ran.
                    self.state = State::Draining;
                    self.deadline = at.checked_add(self.drain_timeout);
                    Step::BeginDrain
                }
                other => Step::Wait(other),
            },
            State::Draining => {
                let deadline = self.deadline;
                if deadline.is_some_and(|d| now >= d) {
                    self.state = State::Stopped;
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
                        self.state = State::Stopped;
                        Step::Stop
                    }
                }
            }
            State::Stopped => Step::Stop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn starts_serves_until_a_signal_and_a_second_signal_means_now() {
        let t0 = Instant::now();
        let mut clock = Clock::new(5 * SEC, 10 * SEC);
        assert_eq!(clock.state(), State::Starting);
        clock.started();
        assert_eq!(clock.state(), State::Serving);
        assert_eq!(clock.step(t0, 3, t0), Step::Wait(None));
        assert!(!clock.stopping());
        assert!(clock.stop_requested(t0));
        assert_eq!(clock.state(), State::Stopping);
        assert!(clock.stopping() && !clock.draining());
        // A late start report does not undo the stop.
        clock.started();
        assert_eq!(clock.state(), State::Stopping);
        assert!(!clock.stop_requested(t0 + SEC), "second signal");
    }

    #[test]
    fn a_signal_while_starting_stops_too() {
        let t0 = Instant::now();
        let mut clock = Clock::new(Duration::ZERO, SEC);
        assert!(clock.stop_requested(t0));
        assert_eq!(clock.step(t0, 0, t0), Step::BeginDrain);
        assert_eq!(clock.state(), State::Draining);
    }

    #[test]
    fn serves_through_the_delay_then_drains_until_nothing_is_held() {
        let t0 = Instant::now();
        let mut clock = Clock::new(5 * SEC, 10 * SEC);
        clock.started();
        clock.stop_requested(t0);
        assert_eq!(clock.step(t0 + SEC, 2, t0), Step::Wait(Some(t0 + 5 * SEC)));
        // The turn ran late: the deadline still counts from the end of the delay.
        assert_eq!(clock.step(t0 + 6 * SEC, 2, t0), Step::BeginDrain);
        assert!(clock.draining());
        assert_eq!(clock.state(), State::Draining);
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
        assert_eq!(clock.state(), State::Stopped);
        assert_eq!(clock.step(read + 2 * DRAIN_QUIET, 0, read), Step::Stop);
    }

    #[test]
    fn the_drain_deadline_expires_what_is_held() {
        let t0 = Instant::now();
        let mut clock = Clock::new(Duration::ZERO, 10 * SEC);
        clock.started();
        clock.stop_requested(t0);
        assert_eq!(clock.step(t0, 1, t0), Step::BeginDrain);
        assert_eq!(
            clock.step(t0 + 9 * SEC, 1, t0),
            Step::Wait(Some(t0 + 10 * SEC))
        );
        assert_eq!(clock.step(t0 + 10 * SEC, 1, t0), Step::Expire);
        assert_eq!(clock.state(), State::Stopped);
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
