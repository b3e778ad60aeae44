//! The job queue: the requests the coordinator admitted, waiting for the first free worker. A
//! deque under one small lock, with a condition variable for idle workers. A worker that finds
//! it empty backs off briefly (spins, then yields a few times, as crossbeam's channels do)
//! before it parks: under load the next job nearly always comes during the back-off, so the
//! coordinator pushes without a futex wake and the worker takes it without a context switch.
//! Parking at once cost 20-30 % of the pipelined throughput and 2.5x its p99 on a 2 vCPU Xeon
//! and bought nothing measurable at one request in flight (docs/performance.md, "Before and
//! after"). The lock is held for a push or a pop only; the coordinator wakes a worker only
//! when one is parked.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::Job;

/// Back-off steps before an idle worker parks: spins of 2, 4 ... 128 `spin_loop` hints, then
/// yields (crossbeam's `Backoff::snooze` schedule, which the channel this queue replaced used).
const BACKOFF_STEPS: u32 = 11;
const SPIN_STEPS: u32 = 7;

fn backoff(step: u32) {
    if step <= SPIN_STEPS {
        for _ in 0..1u32 << step {
            std::hint::spin_loop();
        }
    } else {
        std::thread::yield_now();
    }
}

/// A job a worker took, and since when the queue had held something when it took it.
#[derive(Debug)]
pub struct Taken {
    /// The job.
    pub job: Job,
    /// The queue has not been empty since this instant (its last push onto an empty queue):
    /// how long it has gone without draining is what queue management asks.
    pub queued_since: Instant,
}

#[derive(Debug)]
struct Inner {
    queue: VecDeque<Job>,
    closed: bool,
    idle: usize,
    /// When the queue last went from empty to not (meaningful while it is not empty).
    since: Instant,
}

/// The queue between the coordinator and the workers.
#[derive(Debug)]
pub struct Jobs {
    inner: Mutex<Inner>,
    ready: Condvar,
    epoch: Instant,
    /// The queue's length, readable without the lock (admission predicts waits by it).
    len: AtomicUsize,
    /// `Inner::since` as nanoseconds since `epoch`, readable without the lock.
    since_ns: AtomicU64,
}

impl Default for Jobs {
    fn default() -> Jobs {
        Jobs::new()
    }
}

impl Jobs {
    /// An empty, open queue.
    pub fn new() -> Jobs {
        let epoch = Instant::now();
        Jobs {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                closed: false,
                idle: 0,
                since: epoch,
            }),
            ready: Condvar::new(),
            epoch,
            len: AtomicUsize::new(0),
            since_ns: AtomicU64::new(0),
        }
    }

    /// How long the queue has gone without being empty, as of `now` (zero while it is empty:
    /// an idle queue has drained, however long ago its last job left).
    pub fn undrained(&self, now: Instant) -> Duration {
        if self.is_empty() {
            return Duration::ZERO;
        }
        let since = Duration::from_nanos(self.since_ns.load(Ordering::Relaxed));
        now.saturating_duration_since(self.epoch)
            .saturating_sub(since)
    }

    /// Jobs waiting for a worker.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// True when no job waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues `job` for the first free worker; gives it back once the queue is closed.
    pub fn push(&self, job: Job) -> Result<(), Job> {
        let mut inner = self.inner.lock();
        if inner.closed {
            return Err(job);
        }
        if inner.queue.is_empty() {
            let now = Instant::now();
            inner.since = now;
            let ns = now.saturating_duration_since(self.epoch).as_nanos();
            self.since_ns
                .store(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        inner.queue.push_back(job);
        self.len.store(inner.queue.len(), Ordering::Relaxed);
        let wake = inner.idle > 0;
        drop(inner);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Takes the oldest job, waiting for one while the queue is open; `None` once it is closed
    /// and empty.
    pub fn pop(&self) -> Option<Taken> {
        let mut inner = self.inner.lock();
        let mut step = 0;
        loop {
            let queued_since = inner.since;
            if let Some(job) = inner.queue.pop_front() {
                self.len.store(inner.queue.len(), Ordering::Relaxed);
                return Some(Taken { job, queued_since });
            }
            if inner.closed {
                return None;
            }
            if step < BACKOFF_STEPS {
                step += 1;
                // Without the lock, so the coordinator can push meanwhile.
                MutexGuard::unlocked(&mut inner, || backoff(step));
                continue;
            }
            inner.idle += 1;
            self.ready.wait(&mut inner);
            inner.idle -= 1;
        }
    }

    /// Takes back every job no worker has started; returns how many.
    pub fn take_back(&self) -> usize {
        let mut inner = self.inner.lock();
        let taken = inner.queue.len();
        inner.queue.clear();
        self.len.store(0, Ordering::Relaxed);
        taken
    }

    /// Closes the queue: workers take what is queued, then `pop` answers `None`.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ticket;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn job(slot: u32) -> Job {
        Job {
            ticket: Ticket {
                slot,
                generation: 0,
            },
            received: Instant::now(),
            deadline: None,
            body: Vec::new(),
        }
    }

    #[test]
    fn fifo_with_a_length_and_the_time_since_it_was_last_empty() {
        let jobs = Jobs::new();
        assert_eq!(
            jobs.undrained(Instant::now() + Duration::from_secs(9)),
            Duration::ZERO
        );
        let before = Instant::now();
        for slot in 0..3 {
            jobs.push(job(slot)).expect("open");
        }
        let after = Instant::now();
        assert_eq!(jobs.len(), 3);
        let later = after + Duration::from_secs(1);
        let undrained = jobs.undrained(later);
        assert!(undrained >= Duration::from_secs(1) && undrained <= later - before);
        let first = jobs.pop().expect("a job");
        assert_eq!(first.job.ticket.slot, 0);
        assert!(first.queued_since >= before && first.queued_since <= after);
        let second = jobs.pop().expect("a job");
        assert_eq!(
            second.queued_since, first.queued_since,
            "not empty in between"
        );
        assert_eq!(jobs.pop().map(|t| t.job.ticket.slot), Some(2));
        assert!(jobs.is_empty());
        assert_eq!(jobs.undrained(later), Duration::ZERO, "empty: drained");
        // Non-empty again: counted from the new push.
        let again = Instant::now();
        jobs.push(job(3)).expect("open");
        assert!(jobs.pop().expect("a job").queued_since >= again);
    }

    #[test]
    fn an_idle_worker_is_woken_and_closing_ends_every_wait() {
        let jobs = Arc::new(Jobs::new());
        let worker = {
            let jobs = Arc::clone(&jobs);
            std::thread::spawn(move || {
                let mut taken = Vec::new();
                while let Some(t) = jobs.pop() {
                    taken.push(t.job.ticket.slot);
                }
                taken
            })
        };
        // Pushed once it waits: it is woken.
        let deadline = Instant::now() + Duration::from_secs(10);
        while jobs.inner.lock().idle == 0 {
            assert!(Instant::now() < deadline, "the worker never waited");
            std::thread::yield_now();
        }
        jobs.push(job(7)).expect("open");
        while !jobs.is_empty() {
            std::thread::yield_now();
        }
        jobs.close();
        assert!(jobs.push(job(8)).is_err(), "closed");
        let taken = worker.join().expect("worker");
        assert_eq!(taken, [7]);
    }

    #[test]
    fn queued_jobs_are_taken_back() {
        let jobs = Jobs::new();
        jobs.push(job(1)).expect("open");
        jobs.push(job(2)).expect("open");
        assert_eq!(jobs.take_back(), 2);
        assert!(jobs.is_empty());
        jobs.close();
        assert!(jobs.pop().is_none());
    }
}
