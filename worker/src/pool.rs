//! Worker threads. Each owns a DEALER socket on the coordinator's inproc ROUTER, announces
//! itself with `READY`, then runs one request at a time until it reads `STOP` or its context
//! is terminated. A request comes from the coordinator (the worker was idle) or from the shared
//! queue (the worker had just finished one); each reply says whether the worker is idle now.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use shared::metrics::Recorder;
use shared::protocol::internal::{self, ReplyHead, Ticket};
use shared::protocol::{encode_err, encode_ok, MAX_FRAMES};
use shared::socket::{recv_frames, send_frames, send_one};
use shared::Metrics;
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

/// What every worker of a pool shares: where the coordinator is, the shared queue, the
/// metrics and activity board, and the reply size limit.
#[derive(Clone)]
pub struct Pool {
    /// The coordinator's inproc endpoint, bound in the context passed to [`Worker::spawn`].
    pub endpoint: String,
    /// Requests queued while no worker was idle.
    pub queue: Receiver<Job>,
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
    /// Index in the pool, also its routing id on the inproc link.
    pub index: u32,
    /// The thread; joining it after `STOP` returns promptly.
    pub thread: JoinHandle<()>,
}

impl Worker {
    /// Connects a DEALER to the coordinator at `pool.endpoint` (an inproc endpoint already
    /// bound in `ctx`) and starts the worker thread `worker-<index>` running `handler`.
    pub fn spawn(
        ctx: &zmq::Context,
        pool: &Pool,
        index: u32,
        handler: Box<dyn Handler>,
    ) -> Result<Worker, Error> {
        let connect_error = |source| Error::Connect {
            index,
            endpoint: pool.endpoint.clone(),
            source,
        };
        let socket = ctx.socket(zmq::DEALER).map_err(connect_error)?;
        socket
            .set_identity(&internal::worker_id(index))
            .map_err(connect_error)?;
        socket.set_linger(0).map_err(connect_error)?;
        socket.connect(&pool.endpoint).map_err(connect_error)?;
        let pool = pool.clone();
        let thread = thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || run(socket, index as usize, handler, pool))
            .map_err(|source| Error::Spawn { index, source })?;
        Ok(Worker { index, thread })
    }
}

fn run(socket: zmq::Socket, index: usize, handler: Box<dyn Handler>, pool: Pool) {
    let mut worker = Running {
        socket,
        index,
        handler,
        rec: pool.metrics.recorder(),
        activity: &pool.activity,
        max_reply_bytes: pool.max_reply_bytes,
    };
    if let Err(e) = send_one(&worker.socket, Message::from(internal::READY), 0) {
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
        let Some(mut ticket) = frames.first().and_then(|t| Ticket::from_bytes(t)) else {
            log::error!("worker {index}: malformed message from the coordinator ignored");
            continue;
        };
        frames.remove(0);
        let mut body = std::mem::take(&mut frames);
        // Busy: run this request, then any queued ones, without a round trip through the
        // coordinator. Only a free worker takes one, so nothing waits behind a slow request.
        let outcome = loop {
            let reply = worker.run_one(body);
            let next = pool.queue.try_recv().ok();
            // The reply says whether this worker is idle now, so no separate READY is needed.
            let head = ReplyHead {
                ticket,
                idle: next.is_none(),
            };
            if head.idle {
                // Publish counts before going quiet.
                worker.rec.flush();
            }
            match worker.send_reply(head, reply) {
                Ok(spare) => frames = spare,
                Err(e) => break Err(e),
            }
            let Some(job) = next else { break Ok(()) };
            let now = Instant::now();
            worker.rec.picked_up(now.duration_since(job.received));
            worker.rec.flush_if_due(now);
            ticket = job.ticket;
            body = job.body;
        };
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
    max_reply_bytes: usize,
}

impl Running<'_> {
    /// Runs one request's handler, catching a panic.
    fn run_one(&mut self, body: Vec<Frame>) -> Result<Vec<Frame>, HandlerError> {
        let started = Instant::now();
        self.activity.begin(self.index);
        self.rec.worker_started();
        let handler = &mut self.handler;
        let result = catch_unwind(AssertUnwindSafe(|| handler.handle(body)));
        self.activity.end(self.index);
        self.rec.worker_finished(started.elapsed());
        match result {
            Ok(Ok(reply)) => {
                let size: usize = reply.iter().map(|f| f.len()).sum();
                if size > self.max_reply_bytes || reply.len() >= MAX_FRAMES {
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

    /// Sends a reply to the coordinator; returns the reply's emptied frame buffer for reuse.
    fn send_reply(
        &mut self,
        head: ReplyHead,
        reply: Result<Vec<Frame>, HandlerError>,
    ) -> zmq::Result<Vec<Frame>> {
        let head = Message::from(&head.to_bytes()[..]);
        match reply {
            Ok(mut frames) => {
                let all = std::iter::once(head).chain(encode_ok(frames.drain(..)));
                send_frames(&self.socket, all, 0)?;
                Ok(frames)
            }
            Err(HandlerError { code, message }) => {
                let all = std::iter::once(head).chain(encode_err(code, &message));
                send_frames(&self.socket, all, 0)?;
                Ok(Vec::new())
            }
        }
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
    use shared::socket::recv_frames;

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

    const TICKET: Ticket = Ticket {
        slot: 1,
        generation: 2,
    };

    /// Reads one reply: (head, body frames).
    fn reply(router: &zmq::Socket) -> (ReplyHead, Vec<Vec<u8>>) {
        let mut frames = Vec::new();
        recv_frames(router, 0, &mut frames).expect("reply");
        let head = ReplyHead::from_bytes(&frames[1]).expect("reply head");
        (head, frames[2..].iter().map(|f| f.to_vec()).collect())
    }

    fn exchange(router: &zmq::Socket, id: &[u8], body: &[u8]) -> Vec<Vec<u8>> {
        router
            .send_multipart([id, &TICKET.to_bytes()[..], body], 0)
            .expect("dispatch");
        let (head, body) = reply(router);
        // The queue is empty: the reply itself says the worker is idle again.
        assert_eq!(
            head,
            ReplyHead {
                ticket: TICKET,
                idle: true
            }
        );
        body
    }

    fn start(
        path: &str,
    ) -> (
        zmq::Context,
        zmq::Socket,
        Worker,
        crossbeam_channel::Sender<Job>,
    ) {
        let ctx = zmq::Context::new();
        let router = ctx.socket(zmq::ROUTER).expect("router");
        router.bind(path).expect("bind");
        let (queue, jobs) = crossbeam_channel::bounded(4);
        let pool = Pool {
            endpoint: path.into(),
            queue: jobs,
            metrics: Arc::new(Metrics::new("test").expect("metrics")),
            activity: Arc::new(Activity::new(1)),
            max_reply_bytes: 10,
        };
        let worker = Worker::spawn(&ctx, &pool, 0, Box::new(Panicky)).expect("spawn");
        let ready = router.recv_multipart(0).expect("READY");
        let id = internal::worker_id(0);
        assert_eq!(ready, [id.to_vec(), internal::READY.to_vec()]);
        (ctx, router, worker, queue)
    }

    fn stop(router: &zmq::Socket, worker: Worker) {
        let id = internal::worker_id(0);
        router
            .send_multipart([&id[..], internal::STOP], 0)
            .expect("stop");
        worker.thread.join().expect("worker exits after STOP");
    }

    #[test]
    fn a_panicking_handler_answers_handler_failed_and_keeps_serving() {
        let (_ctx, router, worker, _queue) = start("inproc://pool-test-panic");
        let id = internal::worker_id(0);
        // Keep the test output clean of the expected panic message.
        std::panic::set_hook(Box::new(|_| {}));
        let reply = exchange(&router, &id, b"panic");
        let _ = std::panic::take_hook();
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
        // A reply over the limit (10 bytes here) is refused, not sent.
        let reply = exchange(&router, &id, b"huge");
        assert_eq!(&reply[..2], [b"ERR".to_vec(), b"handler_failed".to_vec()]);
        let reply = exchange(&router, &id, b"hello");
        assert_eq!(reply, [b"OK".to_vec(), b"hello".to_vec()]);
        stop(&router, worker);
    }

    #[test]
    fn a_busy_worker_takes_queued_requests_and_says_idle_only_at_the_end() {
        let (_ctx, router, worker, queue) = start("inproc://pool-test-queue");
        let id = internal::worker_id(0);
        let queued = Ticket {
            slot: 9,
            generation: 0,
        };
        queue
            .send(Job {
                ticket: queued,
                received: Instant::now(),
                body: vec![Frame::from("second")],
            })
            .expect("queue");
        router
            .send_multipart([&id[..], &TICKET.to_bytes()[..], b"first"], 0)
            .expect("dispatch");
        let (head, body) = reply(&router);
        assert_eq!(
            (head.ticket, head.idle),
            (TICKET, false),
            "took the queued one"
        );
        assert_eq!(body, [b"OK".to_vec(), b"first".to_vec()]);
        let (head, body) = reply(&router);
        assert_eq!((head.ticket, head.idle), (queued, true));
        assert_eq!(body, [b"OK".to_vec(), b"second".to_vec()]);
        stop(&router, worker);
    }
}
