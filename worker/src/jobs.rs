//! The job queue: the requests the coordinator admitted, waiting for the first free worker. A
//! deque under one small lock, with a condition variable for idle workers. A worker that finds
//! it empty parks at once (a futex wait): a channel's blocking receive spins and yields first,
//! which on a core shared with the I/O thread cost a context switch or two per request at low
//! load. The lock is held for a push or a pop only; the coordinator wakes a worker only when
//! one is idle.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex};

use crate::Job;

/// A job a worker took, and whether taking it left the queue drained (it was the last one, or
/// the worker had waited for it on an empty queue).
#[derive(Debug)]
pub struct Taken {
    /// The job.
    pub job: Job,
    /// The queue was empty just before or just after this job.
    pub drained: bool,
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Job>,
    closed: bool,
    idle: usize,
}

/// The queue between the coordinator and the workers.
#[derive(Debug, Default)]
pub struct Jobs {
    inner: Mutex<Inner>,
    ready: Condvar,
    /// The queue's length, readable without the lock (admission predicts waits by it).
    len: AtomicUsize,
}

impl Jobs {
    /// An empty, open queue.
    pub fn new() -> Jobs {
        Jobs::default()
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
        let mut waited = false;
        loop {
            if let Some(job) = inner.queue.pop_front() {
                self.len.store(inner.queue.len(), Ordering::Relaxed);
                let drained = waited || inner.queue.is_empty();
                return Some(Taken { job, drained });
            }
            if inner.closed {
                return None;
            }
            inner.idle += 1;
            self.ready.wait(&mut inner);
            inner.idle -= 1;
            waited = true;
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
    fn fifo_with_drain_marks_and_a_length() {
        let jobs = Jobs::new();
        for slot in 0..3 {
            jobs.push(job(slot)).expect("open");
        }
        assert_eq!(jobs.len(), 3);
        let first = jobs.pop().expect("a job");
        assert_eq!((first.job.ticket.slot, first.drained), (0, false));
        assert_eq!(jobs.pop().map(|t| t.drained), Some(false));
        let last = jobs.pop().expect("a job");
        assert_eq!(
            (last.job.ticket.slot, last.drained),
            (2, true),
            "the last drains it"
        );
        assert!(jobs.is_empty());
    }

    #[test]
    fn an_idle_worker_is_woken_and_closing_ends_every_wait() {
        let jobs = Arc::new(Jobs::new());
        let worker = {
            let jobs = Arc::clone(&jobs);
            std::thread::spawn(move || {
                let mut taken = Vec::new();
                while let Some(t) = jobs.pop() {
                    taken.push((t.job.ticket.slot, t.drained));
                }
                taken
            })
        };
        // Pushed once it waits: it is woken, and a job found after waiting counts as found on
        // a drained queue.
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
        assert_eq!(taken, [(7, true)]);
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
