//! Worker threads. Each takes requests from the job queue the coordinator fills (`jobs.rs`), one
//! at a time and only when it is free (so nothing waits behind a slow request while another
//! worker idles), runs its handler, and returns the outcome on the event channel, waking the
//! coordinator if it sleeps. A worker stops when the job queue is closed and empty.

use std::any::Any;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use nix::sys::eventfd::{EfdFlags, EventFd};
use shared::metrics::Recorder;
use shared::protocol::MAX_FRAMES;
use shared::Metrics;

use crate::jobs::{Jobs, Taken};
use crate::queue::QueueState;
use crate::{Context, Frame, Handler, HandlerError};

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
/// reads it to tell a busy pool from a wedged one, and the autoscaling signal how long the
/// pool has been busy.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    // Per worker: 0 when idle, else 1 + the millisecond (since `epoch`) its request started.
    busy_since: Box<[AtomicU64]>,
    // Per worker: nanoseconds spent in finished requests.
    finished_ns: Box<[AtomicU64]>,
}

impl Activity {
    /// Activity for `workers` idle workers.
    pub fn new(workers: usize) -> Activity {
        Activity {
            epoch: Instant::now(),
            busy_since: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            finished_ns: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn now_mark(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn begin(&self, index: usize) {
        self.busy_since[index].store(self.now_mark(), Ordering::Relaxed);
    }

    fn end(&self, index: usize, busy: Duration) {
        // Counted before the request stops showing as running: a reader in between counts it
        // twice for a moment, never not at all.
        let nanos = u64::try_from(busy.as_nanos()).unwrap_or(u64::MAX);
        self.finished_ns[index].fetch_add(nanos, Ordering::Relaxed);
        self.busy_since[index].store(0, Ordering::Relaxed);
    }

    /// Seconds the workers have spent in handlers, the requests running now included (to the
    /// millisecond).
    pub fn busy_seconds(&self) -> f64 {
        let finished: u64 = self
            .finished_ns
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum();
        let running: Duration = self.busy_for().flatten().sum();
        finished as f64 / 1e9 + running.as_secs_f64()
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

/// A request for a worker: the coordinator's ticket for it, when it was read, its deadline and
/// its body.
#[derive(Debug)]
pub struct Job {
    /// Names the request in the coordinator's table.
    pub ticket: Ticket,
    /// When the coordinator read it (for the queue wait).
    pub received: Instant,
    /// When its client stops waiting, if it said: it is not started after that.
    pub deadline: Option<Instant>,
    /// The request body.
    pub body: Vec<Frame>,
}

/// Why a worker did not start a request it took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shed {
    /// It waited past the queue target while a queue stood (`ERR overloaded`).
    QueueTime,
    /// Its deadline had passed (`ERR deadline_exceeded`).
    Deadline,
}

/// What became of a request a worker took.
#[derive(Debug)]
pub enum Outcome {
    /// The handler ran: its reply frames (after the `OK` status), or its refusal.
    Ran(Result<Vec<Frame>, HandlerError>),
    /// It was not started.
    Shed(Shed),
}

/// What a worker tells the coordinator.
#[derive(Debug)]
pub enum Event {
    /// Worker `index` is running and takes jobs.
    Started(u32),
    /// Worker `index` found the job channel closed and is leaving.
    Stopped(u32),
    /// A request's outcome.
    Done {
        /// The request.
        ticket: Ticket,
        /// What the worker did with it.
        outcome: Outcome,
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
    /// Requests to run; closing it stops the workers once it is empty.
    pub jobs: Arc<Jobs>,
    /// Where outcomes go.
    pub events: Sender<Event>,
    /// Wakes the coordinator.
    pub waker: Arc<Waker>,
    /// The broker's metrics.
    pub metrics: Arc<Metrics>,
    /// What each worker is doing.
    pub activity: Arc<Activity>,
    /// How long requests wait and take.
    pub queue: Arc<QueueState>,
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
        if pool.jobs.is_empty() {
            // About to idle: publish counts first.
            rec.flush();
        }
        let Some(Taken { job, queued_since }) = pool.jobs.pop() else {
            break;
        };
        let started = Instant::now();
        let waited = started.duration_since(job.received);
        rec.picked_up(waited);
        rec.flush_if_due(started);
        let ticket = job.ticket;
        let undrained = started.saturating_duration_since(queued_since);
        let verdict = shed(&job, waited, started, undrained, &pool.queue);
        let outcome = match verdict {
            Some(shed) => Outcome::Shed(shed),
            None => Outcome::Ran(run_one(
                index as usize,
                &mut *handler,
                job,
                started,
                &pool,
                &mut rec,
            )),
        };
        let done = Event::Done { ticket, outcome };
        if pool.events.send(done).is_err() {
            break;
        }
        pool.waker.notify();
    }
    let _ = pool.events.send(Event::Stopped(index));
    log::debug!("worker {index}: stopped");
}

/// Why `job`, taken at `now` after waiting `waited` in a queue that had gone `undrained`
/// without being empty, must not be started, if it must not: its deadline has passed or leaves
/// less than a mean service time (its client would not wait for the reply), or it waited past
/// the target (and a service time) while a queue stands.
fn shed(
    job: &Job,
    waited: Duration,
    now: Instant,
    undrained: Duration,
    queue: &QueueState,
) -> Option<Shed> {
    let service = queue.service();
    if job
        .deadline
        .is_some_and(|deadline| now.checked_add(service).is_none_or(|end| end > deadline))
    {
        return Some(Shed::Deadline);
    }
    queue.shed(undrained, waited).then_some(Shed::QueueTime)
}

/// Runs one request's handler, catching a panic and refusing an oversized reply.
fn run_one(
    index: usize,
    handler: &mut dyn Handler,
    job: Job,
    started: Instant,
    pool: &Pool,
    rec: &mut Recorder,
) -> Result<Vec<Frame>, HandlerError> {
    let context = Context::new(job.deadline);
    pool.activity.begin(index);
    rec.worker_started();
    let result = catch_unwind(AssertUnwindSafe(|| handler.handle_with(job.body, &context)));
    let took = started.elapsed();
    pool.activity.end(index, took);
    pool.queue.served(took);
    rec.worker_finished(took);
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
    use crossbeam_channel::Receiver;

    struct Panicky;

    impl Handler for Panicky {
        fn handle(&mut self, request: Vec<Frame>) -> Result<Vec<Frame>, HandlerError> {
            match &request[0][..] {
                b"panic" => panic!("asked to"),
                b"refuse" => Err(HandlerError::bad_request("refused")),
                b"huge" => Ok(vec![Frame::from(&[0u8; 11][..])]),
                b"block" => {
                    std::thread::sleep(Duration::from_millis(150));
                    Ok(request)
                }
                _ => Ok(request),
            }
        }

        fn handle_with(
            &mut self,
            request: Vec<Frame>,
            context: &Context,
        ) -> Result<Vec<Frame>, HandlerError> {
            if &request[0][..] == b"time left" {
                // Tell the test what the handler saw.
                let left = context
                    .time_left()
                    .map_or(u64::MAX, |d| d.as_millis() as u64);
                return Ok(vec![Frame::from(&left.to_le_bytes()[..])]);
            }
            self.handle(request)
        }
    }

    struct Harness {
        jobs: Arc<Jobs>,
        events: Receiver<Event>,
        waker: Arc<Waker>,
        worker: Worker,
    }

    fn start() -> Harness {
        let jobs = Arc::new(Jobs::new());
        let (event_tx, events) = crossbeam_channel::unbounded();
        let waker = Arc::new(Waker::new().expect("eventfd"));
        let pool = Pool {
            jobs: Arc::clone(&jobs),
            events: event_tx,
            waker: Arc::clone(&waker),
            metrics: Arc::new(Metrics::new("test").expect("metrics")),
            activity: Arc::new(Activity::new(1)),
            queue: Arc::new(QueueState::new(
                Duration::from_millis(20),
                Duration::from_millis(100),
            )),
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

    /// Sends a job read at `received` with `deadline` and returns what the worker did.
    fn outcome(
        h: &Harness,
        slot: u32,
        body: &[u8],
        received: Instant,
        deadline: Option<Instant>,
    ) -> Outcome {
        let ticket = Ticket {
            slot,
            generation: 2,
        };
        h.jobs
            .push(Job {
                ticket,
                received,
                deadline,
                body: vec![Frame::from(body)],
            })
            .expect("the queue is open");
        match h.events.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Done { ticket: t, outcome }) => {
                assert_eq!(t, ticket, "the ticket comes back");
                outcome
            }
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn run(h: &Harness, slot: u32, body: &[u8]) -> Result<Vec<Vec<u8>>, HandlerError> {
        match outcome(h, slot, body, Instant::now(), None) {
            Outcome::Ran(result) => {
                result.map(|frames| frames.iter().map(|f| f.to_vec()).collect())
            }
            Outcome::Shed(shed) => panic!("shed: {shed:?}"),
        }
    }

    #[test]
    fn expired_and_stale_requests_are_never_started_and_handlers_see_the_time_left() {
        let h = start();
        let now = Instant::now();
        // Its deadline has passed: not started (a "panic" body would fail the handler).
        let expired = outcome(&h, 1, b"panic", now, Some(now));
        assert!(
            matches!(expired, Outcome::Shed(Shed::Deadline)),
            "{expired:?}"
        );
        // A request that waits behind three of 150 ms, in a queue that does not drain for
        // longer than the interval (300 ms: twice the target, which is two service times),
        // past the target: not started.
        let long_ago = Instant::now() - Duration::from_secs(5);
        let jobs = [
            (2, &b"block"[..]),
            (3, b"block"),
            (4, b"block"),
            (5, b"panic"),
        ];
        for (slot, body) in jobs {
            h.jobs
                .push(Job {
                    ticket: Ticket {
                        slot,
                        generation: 2,
                    },
                    received: long_ago,
                    deadline: None,
                    body: vec![Frame::from(body)],
                })
                .expect("the queue is open");
        }
        let mut outcomes = Vec::new();
        for _ in jobs {
            match h.events.recv_timeout(Duration::from_secs(10)) {
                Ok(Event::Done { ticket, outcome }) => outcomes.push((ticket.slot, outcome)),
                other => panic!("expected Done, got {other:?}"),
            }
        }
        assert!(
            matches!(outcomes[0], (2, Outcome::Ran(Ok(_)))),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[3], (5, Outcome::Shed(Shed::QueueTime))),
            "{outcomes:?}"
        );
        // Taking it drained the queue: an old request is started again.
        let fresh = outcome(&h, 8, b"x", long_ago, None);
        assert!(matches!(fresh, Outcome::Ran(Ok(_))), "{fresh:?}");
        // A handler sees the time its client has left.
        let deadline = Instant::now() + Duration::from_secs(60);
        let Outcome::Ran(Ok(reply)) = outcome(&h, 9, b"time left", Instant::now(), Some(deadline))
        else {
            panic!("ran");
        };
        let left = u64::from_le_bytes(reply[0][..].try_into().expect("8 bytes"));
        assert!((59_000..=60_000).contains(&left), "{left} ms left");
        assert_eq!(
            run(&h, 10, b"time left"),
            Ok(vec![u64::MAX.to_le_bytes().to_vec()]),
            "no deadline, no time left to tell"
        );
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
        h.jobs.close();
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
