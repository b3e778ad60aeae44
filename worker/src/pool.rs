//! Worker threads. Each takes requests from the job channel the coordinator fills, one at a
//! time and only when it is free (so nothing waits behind a slow request while another worker
//! idles), runs its handler, and returns the outcome on the event channel, waking the
//! coordinator if it sleeps. A worker stops when the job channel is closed and empty.

use std::any::Any;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use nix::sys::eventfd::{EfdFlags, EventFd};
use shared::metrics::Recorder;
use shared::protocol::MAX_FRAMES;
use shared::Metrics;

use crate::{Frame, Handler, HandlerError};

/// Starting a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS refused a thread.
    #[error("worker {index}: cannot spawn thread: {source}")]
    Spawn {
        /// Worker index.
        index: u32,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// What each worker is doing, readable from any thread without locks: the liveness check
/// reads it to tell a busy pool from a wedged one.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    // Per worker: 0 when idle, else 1 + the millisecond (since `epoch`) its request started.
    busy_since: Box<[AtomicU64]>,
}

impl Activity {
    /// Activity for `workers` idle workers.
    pub fn new(workers: usize) -> Activity {
        Activity {
            epoch: Instant::now(),
            busy_since: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn now_mark(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn begin(&self, index: usize) {
        self.busy_since[index].store(self.now_mark(), Ordering::Relaxed);
    }

    fn end(&self, index: usize) {
        self.busy_since[index].store(0, Ordering::Relaxed);
    }

    /// True while worker `index` is inside its handler.
    pub fn in_handler(&self, index: usize) -> bool {
        self.busy_since
            .get(index)
            .is_some_and(|since| since.load(Ordering::Relaxed) != 0)
    }

    /// How long each worker has been on its current request (`None`: idle).
    pub fn busy_for(&self) -> impl Iterator<Item = Option<Duration>> + '_ {
        let now = self.now_mark();
        self.busy_since
            .iter()
            .map(move |since| match since.load(Ordering::Relaxed) {
                0 => None,
                mark => Some(Duration::from_millis(now.saturating_sub(mark))),
            })
    }

    /// Pool size.
    pub fn len(&self) -> usize {
        self.busy_since.len()
    }

    /// True for an empty pool.
    pub fn is_empty(&self) -> bool {
        self.busy_since.is_empty()
    }
}

/// Names one in-flight request: a slot in the coordinator's table and that slot's generation,
/// so an outcome that arrives after its request timed out (and the slot was reused) is
/// recognised and dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// Index into the in-flight table.
    pub slot: u32,
    /// Bumped every time the slot is reused.
    pub generation: u32,
}

/// A request for a worker: the coordinator's ticket for it, when it was read, and its body.
#[derive(Debug)]
pub struct Job {
    /// Names the request in the coordinator's table.
    pub ticket: Ticket,
    /// When the coordinator read it (for the queue-wait metric).
    pub received: Instant,
    /// The request body.
    pub body: Vec<Frame>,
}

/// What a worker tells the coordinator.
#[derive(Debug)]
pub enum Event {
    /// Worker `index` is running and takes jobs.
    Started(u32),
    /// Worker `index` found the job channel closed and is leaving.
    Stopped(u32),
    /// A request's outcome: the handler's reply frames, or its refusal.
    Done {
        /// The request.
        ticket: Ticket,
        /// Reply frames (after the `OK` status), or the `ERR` code and message.
        result: Result<Vec<Frame>, HandlerError>,
    },
}

/// Wakes the coordinator from its poll when an event arrives while it sleeps: an eventfd in
/// its poll set, written only when it has said it is about to sleep, so a busy broker pays
/// no syscall per reply.
#[derive(Debug)]
pub struct Waker {
    sleeping: AtomicBool,
    fd: EventFd,
}

impl Waker {
    /// A waker with its eventfd.
    pub fn new() -> std::io::Result<Waker> {
        Ok(Waker {
            sleeping: AtomicBool::new(false),
            fd: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
        })
    }

    /// Coordinator: about to block. The caller must then look at its event channel once more
    /// and call [`Waker::awake`] instead of blocking if anything is there; an event sent after
    /// that look writes the eventfd.
    pub fn sleeping(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
        // The channel check that follows must not be ordered before this store.
        fence(Ordering::SeqCst);
    }

    /// Coordinator: awake again (after its poll, or instead of it). `signaled`: the poll
    /// found the eventfd readable, so it is cleared (read) for the next sleep.
    pub fn awake(&self, signaled: bool) {
        self.sleeping.store(false, Ordering::SeqCst);
        if signaled {
            let _ = self.fd.read();
        }
    }

    /// Worker: an event was just sent; wake the coordinator if it sleeps.
    pub fn notify(&self) {
        // Orders the event's send before the flag is read (pairs with the fence in `sleeping`).
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) && self.sleeping.swap(false, Ordering::SeqCst) {
            let _ = self.fd.write(1);
        }
    }
}

impl AsRawFd for Waker {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_fd().as_raw_fd()
    }
}

/// What every worker of a pool shares.
#[derive(Clone)]
pub struct Pool {
    /// Requests to run; closing the sender stops the workers once it is empty.
    pub jobs: Receiver<Job>,
    /// Where outcomes go.
    pub events: Sender<Event>,
    /// Wakes the coordinator.
    pub waker: Arc<Waker>,
    /// The broker's metrics.
    pub metrics: Arc<Metrics>,
    /// What each worker is doing.
    pub activity: Arc<Activity>,
    /// Largest reply body a handler may return; larger becomes `ERR handler_failed`.
    pub max_reply_bytes: usize,
}

/// A running worker thread, owned (and joined) by the coordinator.
#[derive(Debug)]
pub struct Worker {
    /// Index in the pool.
    pub index: u32,
    /// The thread; it ends once the job channel is closed and empty.
    pub thread: JoinHandle<()>,
}

impl Worker {
    /// Starts the worker thread `worker-<index>` running `handler`.
    pub fn spawn(pool: &Pool, index: u32, handler: Box<dyn Handler>) -> Result<Worker, Error> {
        let pool = pool.clone();
        let thread = thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || run(index, handler, pool))
            .map_err(|source| Error::Spawn { index, source })?;
        Ok(Worker { index, thread })
    }
}

fn run(index: u32, mut handler: Box<dyn Handler>, pool: Pool) {
    let mut rec = pool.metrics.recorder();
    if pool.events.send(Event::Started(index)).is_err() {
        return;
    }
    pool.waker.notify();
    log::debug!("worker {index}: ready");
    loop {
        let job = match pool.jobs.try_recv() {
            Ok(job) => job,
            Err(TryRecvError::Empty) => {
                // Idle: publish counts, then wait for work (or the channel to close).
                rec.flush();
                match pool.jobs.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let started = Instant::now();
        rec.picked_up(started.duration_since(job.received));
        rec.flush_if_due(started);
        let result = run_one(
            index as usize,
            &mut *handler,
            job.body,
            started,
            &pool,
            &mut rec,
        );
        let done = Event::Done {
            ticket: job.ticket,
            result,
        };
        if pool.events.send(done).is_err() {
            break;
        }
        pool.waker.notify();
    }
    let _ = pool.events.send(Event::Stopped(index));
    log::debug!("worker {index}: stopped");
}

/// Runs one request's handler, catching a panic and refusing an oversized reply.
fn run_one(
    index: usize,
    handler: &mut dyn Handler,
    body: Vec<Frame>,
    started: Instant,
    pool: &Pool,
    rec: &mut Recorder,
) -> Result<Vec<Frame>, HandlerError> {
    pool.activity.begin(index);
    rec.worker_started();
    let result = catch_unwind(AssertUnwindSafe(|| handler.handle(body)));
    pool.activity.end(index);
    rec.worker_finished(started.elapsed());
    match result {
        Ok(Ok(reply)) => {
            let size: usize = reply.iter().map(|f| f.len()).sum();
            if size > pool.max_reply_bytes || reply.len() >= MAX_FRAMES {
                Err(HandlerError::failed(format!(
                    "reply of {size} bytes in {} frames exceeds the reply limit",
                    reply.len()
                )))
            } else {
                Ok(reply)
            }
        }
        Ok(Err(e)) => Err(e),
        Err(panic) => Err(HandlerError::failed(format!(
            "handler panicked: {}",
            panic_message(&panic)
        ))),
    }
}

fn panic_message(panic: &Box<dyn Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Panicky;

    impl Handler for Panicky {
        fn handle(&mut self, request: Vec<Frame>) -> Result<Vec<Frame>, HandlerError> {
            match &request[0][..] {
                b"panic" => panic!("asked to"),
                b"refuse" => Err(HandlerError::bad_request("refused")),
                b"huge" => Ok(vec![Frame::from(&[0u8; 11][..])]),
                _ => Ok(request),
            }
        }
    }

    struct Harness {
        jobs: Sender<Job>,
        events: Receiver<Event>,
        waker: Arc<Waker>,
        worker: Worker,
    }

    fn start() -> Harness {
        let (jobs, job_rx) = crossbeam_channel::unbounded();
        let (event_tx, events) = crossbeam_channel::unbounded();
        let waker = Arc::new(Waker::new().expect("eventfd"));
        let pool = Pool {
            jobs: job_rx,
            events: event_tx,
            waker: Arc::clone(&waker),
            metrics: Arc::new(Metrics::new("test").expect("metrics")),
            activity: Arc::new(Activity::new(1)),
            max_reply_bytes: 10,
        };
        let worker = Worker::spawn(&pool, 0, Box::new(Panicky)).expect("spawn");
        assert!(matches!(
            events.recv_timeout(Duration::from_secs(10)),
            Ok(Event::Started(0))
        ));
        Harness {
            jobs,
            events,
            waker,
            worker,
        }
    }

    fn run(h: &Harness, slot: u32, body: &[u8]) -> Result<Vec<Vec<u8>>, HandlerError> {
        let ticket = Ticket {
            slot,
            generation: 2,
        };
        h.jobs
            .send(Job {
                ticket,
                received: Instant::now(),
                body: vec![Frame::from(body)],
            })
            .expect("send job");
        match h.events.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Done { ticket: t, result }) => {
                assert_eq!(t, ticket, "the ticket comes back");
                result.map(|frames| frames.iter().map(|f| f.to_vec()).collect())
            }
            other => panic!("expected Done, got {other:?}"),
        }
    }

    #[test]
    fn panics_refusals_and_oversized_replies_become_errors_and_the_worker_carries_on() {
        let h = start();
        // Keep the test output clean of the expected panic message.
        std::panic::set_hook(Box::new(|_| {}));
        let panicked = run(&h, 1, b"panic");
        let _ = std::panic::take_hook();
        let e = panicked.expect_err("a panic is an error");
        assert_eq!(e.code, shared::ErrorCode::HandlerFailed);
        assert!(e.message.contains("asked to"));
        assert_eq!(
            run(&h, 2, b"refuse"),
            Err(HandlerError::bad_request("refused"))
        );
        let e = run(&h, 3, b"huge").expect_err("over the 10-byte reply limit");
        assert_eq!(e.code, shared::ErrorCode::HandlerFailed);
        assert_eq!(run(&h, 4, b"hello"), Ok(vec![b"hello".to_vec()]));
        // Closing the job channel stops the worker.
        drop(h.jobs);
        h.worker
            .thread
            .join()
            .expect("worker exits when the channel closes");
    }

    #[test]
    fn a_sleeping_coordinator_is_woken_once_and_a_busy_one_never() {
        let waker = Waker::new().expect("eventfd");
        // Busy: no write.
        waker.notify();
        assert!(waker.fd.read().is_err(), "nothing written while awake");
        // Sleeping: one write, however many notify.
        waker.sleeping();
        waker.notify();
        waker.notify();
        assert_eq!(waker.fd.read().ok(), Some(1));
        waker.awake(false);
        let h = start();
        h.waker.sleeping();
        assert_eq!(run(&h, 1, b"x"), Ok(vec![b"x".to_vec()]));
        assert_eq!(h.waker.fd.read().ok(), Some(1), "the reply woke it");
    }
}
