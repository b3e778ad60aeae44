//! Worker threads. Each owns a DEALER socket on the coordinator's inproc ROUTER, announces
//! itself with `READY`, then runs one request at a time until it reads `STOP` or its context
//! is terminated. The coordinator decides who works on what; a worker only runs its handler.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use shared::metrics::Recorder;
use shared::protocol::{internal, STATUS_ERR, STATUS_OK};
use shared::socket::{recv_frames, send_frames, send_one};
use shared::{ErrorCode, Metrics};
use zmq::Message;

use crate::{Frame, Handler, HandlerError};

/// Starting a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The worker's socket could not be created or connected.
    #[error("worker {index}: cannot connect to {endpoint}: {source}")]
    Connect {
        /// Worker index.
        index: u32,
        /// The coordinator's inproc endpoint.
        endpoint: String,
        /// What libzmq said.
        source: zmq::Error,
    },
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

/// A request waiting in the shared queue. The coordinator queues a request there only while
/// no worker is free; a worker that finishes one takes the next from here itself.
#[derive(Debug)]
pub struct Job {
    /// Names the request in the coordinator's table.
    pub ticket: internal::Ticket,
    /// When the coordinator read it (for the queue-wait metric).
    pub received: Instant,
    /// The request body.
    pub body: Vec<Frame>,
}

/// A running worker thread, owned (and joined) by the coordinator.
#[derive(Debug)]
pub struct Worker {
    /// Index in the pool, also its routing id on the inproc link.
    pub index: u32,
    /// The thread; joining it after `STOP` returns promptly.
    pub thread: JoinHandle<()>,
}

impl Worker {
    /// Connects a DEALER to the coordinator at `endpoint` (an inproc endpoint already bound
    /// in `ctx`) and starts the worker thread `worker-<index>` running `handler`.
    pub fn spawn(
        ctx: &zmq::Context,
        endpoint: &str,
        index: u32,
        handler: Box<dyn Handler>,
        metrics: Arc<Metrics>,
        activity: Arc<Activity>,
        queue: Receiver<Job>,
    ) -> Result<Worker, Error> {
        let connect_error = |source| Error::Connect {
            index,
            endpoint: endpoint.to_owned(),
            source,
        };
        let socket = ctx.socket(zmq::DEALER).map_err(connect_error)?;
        socket
            .set_identity(&internal::worker_id(index))
            .map_err(connect_error)?;
        socket.set_linger(0).map_err(connect_error)?;
        socket.connect(endpoint).map_err(connect_error)?;
        let thread = thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || run(socket, index as usize, handler, &metrics, &activity, queue))
            .map_err(|source| Error::Spawn { index, source })?;
        Ok(Worker { index, thread })
    }
}

fn run(
    socket: zmq::Socket,
    index: usize,
    handler: Box<dyn Handler>,
    metrics: &Metrics,
    activity: &Activity,
    queue: Receiver<Job>,
) {
    let mut worker = Running {
        socket,
        index,
        handler,
        rec: metrics.recorder(),
        activity,
    };
    if let Err(e) = worker.announce() {
        log::error!("worker {index}: cannot announce itself: {e}");
        return;
    }
    log::debug!("worker {index}: ready");
    // Reused across requests: an echo hands the same Vec back, so steady state allocates nothing.
    let mut frames: Vec<Frame> = Vec::with_capacity(4);
    loop {
        // Idle: the coordinator hands this worker a request directly, or says STOP.
        match recv_frames(&worker.socket, 0, &mut frames) {
            Ok(()) => {}
            Err(zmq::Error::ETERM) => break,
            Err(e) => {
                log::error!("worker {index}: receive failed, stopping: {e}");
                break;
            }
        }
        if frames.len() == 1 && &frames[0][..] == internal::STOP {
            break;
        }
        let outcome = if frames.len() < 2 {
            log::error!("worker {index}: malformed message from the coordinator ignored");
            Ok(())
        } else {
            let ticket = frames.remove(0);
            worker
                .run_one(ticket, std::mem::take(&mut frames))
                .map(|spare| frames = spare)
                // Busy: take queued requests without a round trip through the coordinator.
                // Only a free worker takes one, so nothing waits behind a slow request.
                .and_then(|()| {
                    while let Ok(job) = queue.try_recv() {
                        let now = Instant::now();
                        worker.rec.picked_up(now.duration_since(job.received));
                        worker.rec.flush_if_due(now);
                        let ticket = Message::from(&job.ticket.to_bytes()[..]);
                        frames = worker.run_one(ticket, job.body)?;
                    }
                    Ok(())
                })
        }
        .and_then(|()| worker.announce());
        match outcome {
            Ok(()) => {}
            Err(zmq::Error::ETERM) => break,
            Err(e) => {
                log::error!("worker {index}: cannot return a reply, stopping: {e}");
                break;
            }
        }
    }
    log::debug!("worker {index}: stopped");
}

/// A worker thread's state.
struct Running<'a> {
    socket: zmq::Socket,
    index: usize,
    handler: Box<dyn Handler>,
    rec: Recorder,
    activity: &'a Activity,
}

impl Running<'_> {
    /// Tells the coordinator this worker is free (and the queue was empty).
    fn announce(&mut self) -> zmq::Result<()> {
        self.rec.flush();
        send_one(&self.socket, Message::from(internal::READY), 0)
    }

    /// Runs one request and sends its reply; returns a spare frame buffer.
    fn run_one(&mut self, ticket: Message, body: Vec<Frame>) -> zmq::Result<Vec<Frame>> {
        let started = Instant::now();
        self.activity.begin(self.index);
        self.rec.worker_started();
        let handler = &mut self.handler;
        let result = catch_unwind(AssertUnwindSafe(|| handler.handle(body)));
        self.activity.end(self.index);
        self.rec.worker_finished(started.elapsed());
        match result {
            Ok(Ok(mut reply)) => {
                let status = [ticket, Message::from(STATUS_OK)];
                send_frames(&self.socket, status.into_iter().chain(reply.drain(..)), 0)?;
                Ok(reply)
            }
            Ok(Err(HandlerError { code, message })) => {
                send_error(&self.socket, ticket, code, &message).map(|()| Vec::new())
            }
            Err(panic) => send_error(
                &self.socket,
                ticket,
                ErrorCode::HandlerFailed,
                &format!("handler panicked: {}", panic_message(&panic)),
            )
            .map(|()| Vec::new()),
        }
    }
}

fn send_error(
    socket: &zmq::Socket,
    ticket: Message,
    code: ErrorCode,
    message: &str,
) -> zmq::Result<()> {
    let frames = [
        ticket,
        Message::from(STATUS_ERR),
        Message::from(code.as_str()),
        Message::from(message),
    ];
    send_frames(socket, frames, 0)
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
    use shared::socket::recv_frames;

    struct Panicky;

    impl Handler for Panicky {
        fn handle(&mut self, request: Vec<Frame>) -> Result<Vec<Frame>, HandlerError> {
            match &request[0][..] {
                b"panic" => panic!("asked to"),
                b"refuse" => Err(HandlerError::bad_request("refused")),
                _ => Ok(request),
            }
        }
    }

    fn exchange(router: &zmq::Socket, id: &[u8], body: &[u8]) -> Vec<Vec<u8>> {
        let ticket = internal::Ticket {
            slot: 1,
            generation: 2,
        }
        .to_bytes();
        router
            .send_multipart([id, &ticket[..], body], 0)
            .expect("dispatch");
        let mut frames = Vec::new();
        recv_frames(router, 0, &mut frames).expect("reply");
        assert_eq!(&frames[1][..], &ticket[..], "ticket comes back");
        // Free again (its queue is empty), it says so.
        let ready = router.recv_multipart(0).expect("READY");
        assert_eq!(ready[1], internal::READY);
        frames[2..].iter().map(|f| f.to_vec()).collect()
    }

    #[test]
    fn a_panicking_handler_answers_handler_failed_and_keeps_serving() {
        let ctx = zmq::Context::new();
        let router = ctx.socket(zmq::ROUTER).expect("router");
        router.bind("inproc://pool-test").expect("bind");
        let metrics = Arc::new(Metrics::new("test").expect("metrics"));
        let activity = Arc::new(Activity::new(1));
        // Keep the test output clean of the expected panic message.
        std::panic::set_hook(Box::new(|_| {}));
        let (_queue, jobs) = crossbeam_channel::bounded(1);
        let worker = Worker::spawn(
            &ctx,
            "inproc://pool-test",
            0,
            Box::new(Panicky),
            metrics,
            activity,
            jobs,
        )
        .expect("spawn");
        let ready = router.recv_multipart(0).expect("READY");
        let id = internal::worker_id(0);
        assert_eq!(ready, [id.to_vec(), internal::READY.to_vec()]);

        let reply = exchange(&router, &id, b"panic");
        assert_eq!(&reply[..2], [b"ERR".to_vec(), b"handler_failed".to_vec()]);
        assert!(String::from_utf8_lossy(&reply[2]).contains("asked to"));
        let reply = exchange(&router, &id, b"refuse");
        assert_eq!(
            reply,
            [
                b"ERR".to_vec(),
                b"bad_request".to_vec(),
                b"refused".to_vec()
            ]
        );
        let reply = exchange(&router, &id, b"hello");
        assert_eq!(reply, [b"OK".to_vec(), b"hello".to_vec()]);

        router
            .send_multipart([&id[..], internal::STOP], 0)
            .expect("stop");
        worker.thread.join().expect("worker exits after STOP");
        let _ = std::panic::take_hook();
    }
}
