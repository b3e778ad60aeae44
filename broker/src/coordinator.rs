//! The coordinator: one thread that owns the front ROUTER, the inproc ROUTER to the workers,
//! the signalfd and every worker thread. It reads requests, hands each to a free worker (the
//! zguide's load-balancing pattern: a worker gets a request only when it is free, so nothing
//! waits behind a slow request while another worker idles), returns replies, and runs the
//! lifecycle from serving through the drain to joining the workers.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use nix::sys::signal::Signal;
use shared::metrics::{DropReason, Recorder};
use shared::protocol::internal::{self, Ticket};
use shared::protocol::{classify, envelope_len, RequestKind, STATUS_ERR, STATUS_OK};
use shared::socket::{recv_frames, retry_eintr, send_frames, send_one};
use shared::{ErrorCode, Metrics};
use worker::{Activity, Job};
use zmq::{Message, Socket};

use crate::access::ZapHandler;
use crate::config::Config;
use crate::lifecycle::{State, Status};
use crate::signals::{self, Signals};

/// Messages read from one socket before looking at the others, so a flood on the front
/// cannot starve replies coming back from the workers.
const BATCH: usize = 256;
/// Once nothing is in flight, the drain still answers `ERR draining` until the front has been
/// quiet this long: a client in a request loop learns it must go elsewhere instead of having
/// its next request, already on the wire, dropped unread when the socket closes.
const DRAIN_QUIET: Duration = Duration::from_millis(100);
/// How long shutdown waits for a worker that has not said READY yet.
const READY_GRACE: Duration = Duration::from_secs(1);

/// A fatal coordinator error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// zmq_poll failed.
    #[error("poll failed: {0}")]
    Poll(zmq::Error),
    /// A socket failed in a way that is not about one client.
    #[error("{socket} socket failed: {source}")]
    Socket {
        /// `front` or `backend`.
        socket: &'static str,
        /// What libzmq said.
        source: zmq::Error,
    },
    /// Reading the signalfd failed.
    #[error(transparent)]
    Signals(#[from] signals::Error),
}

/// How the coordinator ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Drained (or hit the drain deadline), workers stopped; `abandoned` were left inside a
    /// handler at the deadline.
    Drained {
        /// Workers left behind.
        abandoned: usize,
    },
    /// A second stop signal: leave now.
    HardStop(Signal),
}

/// What the coordinator knows of one worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WorkerState {
    /// Has not said READY yet.
    Starting,
    /// Free for work: blocked on its inproc socket, waiting for the coordinator.
    Idle,
    /// Running requests: one handed to it, then any it takes from the shared queue. It says
    /// READY again when the queue is empty.
    Active,
    /// Still inside a handler at the end of the drain; never waited on again.
    Abandoned,
    /// Sent STOP.
    Stopped,
}

/// One request read and not yet answered. Its body travels with it to a worker.
struct Entry {
    client: Message,
    delimiter: bool,
    received: Instant,
}

struct Slot {
    generation: u32,
    entry: Option<Entry>,
}

/// In-flight requests, indexed by slot; bounded by `--max-inflight`.
struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
    len: usize,
    capacity: usize,
}

impl Table {
    fn new(capacity: usize) -> Table {
        Table {
            slots: Vec::with_capacity(capacity.min(1 << 16)),
            free: Vec::new(),
            len: 0,
            capacity,
        }
    }

    fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// Stores `entry`; the caller checked [`Table::is_full`].
    fn insert(&mut self, entry: Entry) -> Ticket {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    entry: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[slot as usize];
        s.entry = Some(entry);
        self.len += 1;
        Ticket {
            slot,
            generation: s.generation,
        }
    }

    fn remove(&mut self, ticket: Ticket) -> Option<Entry> {
        let s = self.slots.get_mut(ticket.slot as usize)?;
        if s.generation != ticket.generation {
            return None;
        }
        let entry = s.entry.take()?;
        // A late reply carrying the old generation is now recognised as stale.
        s.generation = s.generation.wrapping_add(1);
        self.free.push(ticket.slot);
        self.len -= 1;
        Some(entry)
    }

    fn tickets(&self) -> Vec<Ticket> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.entry.is_some())
            .map(|(slot, s)| Ticket {
                slot: slot as u32,
                generation: s.generation,
            })
            .collect()
    }
}

/// The coordinator and everything it owns.
pub struct Coordinator {
    front: Socket,
    backend: Socket,
    signals: Signals,
    zap: Option<ZapHandler>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    rec: Recorder,
    max_message_bytes: usize,
    shutdown_delay: Duration,
    drain_timeout: Duration,
    heartbeat: Duration,
    table: Table,
    /// Requests read while no worker was free; free workers take them directly.
    queue: Sender<Job>,
    dequeue: Receiver<Job>,
    activity: Arc<Activity>,
    threads: Vec<worker::Worker>,
    workers: Vec<WorkerState>,
    idle: Vec<u32>,
    /// Receive buffers reused across turns: front requests, worker messages.
    frames: Vec<Message>,
    worker_frames: Vec<Message>,
    /// Lifetime totals, logged at exit: every request read must have been answered.
    read: u64,
    answered: u64,
    undeliverable: u64,
    last_read: Instant,
}

impl Coordinator {
    /// A coordinator for bound `front` and `backend` sockets, the workers connected to
    /// `backend` and the shared queue they take from.
    #[allow(clippy::too_many_arguments)] // one call site, each argument a distinct resource
    pub fn new(
        config: &Config,
        front: Socket,
        backend: Socket,
        signals: Signals,
        zap: Option<ZapHandler>,
        threads: Vec<worker::Worker>,
        (queue, dequeue): (Sender<Job>, Receiver<Job>),
        activity: Arc<Activity>,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
    ) -> Coordinator {
        let workers = vec![WorkerState::Starting; threads.len()];
        Coordinator {
            front,
            backend,
            signals,
            zap,
            status,
            rec: metrics.recorder(),
            metrics,
            max_message_bytes: config.max_message_bytes,
            shutdown_delay: config.shutdown_delay,
            drain_timeout: config.drain_timeout,
            // Turn often enough that liveness never mistakes an idle loop for a stuck one.
            heartbeat: (config.stuck_after / 4).min(Duration::from_millis(500)),
            table: Table::new(config.max_inflight),
            queue,
            dequeue,
            activity,
            idle: Vec::with_capacity(threads.len()),
            workers,
            threads,
            frames: Vec::with_capacity(8),
            worker_frames: Vec::with_capacity(8),
            read: 0,
            answered: 0,
            undeliverable: 0,
            last_read: Instant::now(),
        }
    }

    /// Runs until drained or hard-stopped. On a clean exit every worker that is not stuck in
    /// its handler has been joined.
    pub fn run(mut self) -> Result<Exit, Error> {
        let mut stop_at: Option<Instant> = None;
        let mut drain_deadline: Option<Instant> = None;
        loop {
            self.status.heartbeat();
            let now = Instant::now();
            if let Some(at) = stop_at.filter(|at| now >= *at) {
                stop_at = None;
                drain_deadline = Some(at + self.drain_timeout);
                self.status.set(State::Draining);
                log::info!(
                    "draining {} in-flight requests, deadline {}",
                    self.table.len,
                    humantime::format_duration(self.drain_timeout)
                );
            }
            let mut quiet_at = None;
            if let Some(deadline) = drain_deadline {
                if now >= deadline {
                    self.expire();
                    break;
                }
                if self.table.len == 0 {
                    let quiet = self.last_read + DRAIN_QUIET;
                    if now >= quiet {
                        break;
                    }
                    quiet_at = Some(quiet);
                }
            }

            let wake = [stop_at, drain_deadline, quiet_at]
                .into_iter()
                .flatten()
                .map(|at| at.saturating_duration_since(now))
                .fold(self.heartbeat, Duration::min);
            // Publish this turn's counts before blocking, so a scrape sees them.
            self.rec.flush();
            let (signal, backend, front, zap) = self.poll(wake)?;
            if zap {
                if let Some(handler) = &mut self.zap {
                    handler.handle_pending();
                }
            }
            if signal {
                while let Some(sig) = self.signals.pending()? {
                    if self.status.state() >= State::Stopping {
                        log::warn!("second {sig} during shutdown: exiting now");
                        // Nothing may wait on the way out: drop queued replies.
                        let _ = self.front.set_linger(0);
                        return Ok(Exit::HardStop(sig));
                    }
                    log::info!(
                        "{sig} received: not ready; serving for {} more, then draining",
                        humantime::format_duration(self.shutdown_delay)
                    );
                    self.status.set(State::Stopping);
                    self.metrics.set_draining();
                    stop_at = Some(Instant::now() + self.shutdown_delay);
                }
            }
            if backend {
                self.read_backend()?;
            }
            if front {
                self.read_front()?;
            }
        }
        self.status.set(State::Stopped);
        log::info!(
            "read {} requests, answered {} ({} replies undeliverable: client gone or not reading)",
            self.read,
            self.answered,
            self.undeliverable
        );
        let abandoned = self.stop_workers();
        Ok(Exit::Drained { abandoned })
    }

    /// Waits for input: (signal, backend, front, ZAP) readable.
    fn poll(&self, timeout: Duration) -> Result<(bool, bool, bool, bool), Error> {
        let mut items = [
            zmq::PollItem::from_fd(self.signals.as_raw_fd(), zmq::POLLIN),
            self.backend.as_poll_item(zmq::POLLIN),
            self.front.as_poll_item(zmq::POLLIN),
            // Without an allowlist, a never-readable stand-in keeps the set fixed-size.
            match &self.zap {
                Some(zap) => zap.socket().as_poll_item(zmq::POLLIN),
                None => zmq::PollItem::from_fd(self.signals.as_raw_fd(), zmq::PollEvents::empty()),
            },
        ];
        // Round up so a 0.4 ms deadline does not become a busy loop of 0 ms polls.
        let millis = timeout.as_micros().div_ceil(1000) as i64;
        retry_eintr(|| zmq::poll(&mut items, millis)).map_err(Error::Poll)?;
        Ok((
            items[0].is_readable(),
            items[1].is_readable(),
            items[2].is_readable(),
            self.zap.is_some() && items[3].is_readable(),
        ))
    }

    /// Reads up to [`BATCH`] requests from the front socket.
    fn read_front(&mut self) -> Result<(), Error> {
        let mut frames = std::mem::take(&mut self.frames);
        for _ in 0..BATCH {
            match recv_frames(&self.front, zmq::DONTWAIT, &mut frames) {
                Ok(()) => self.on_request(&mut frames),
                Err(zmq::Error::EAGAIN) => break,
                Err(source) => {
                    return Err(Error::Socket {
                        socket: "front",
                        source,
                    })
                }
            }
        }
        self.frames = frames;
        Ok(())
    }

    fn on_request(&mut self, frames: &mut Vec<Message>) {
        // A ROUTER always prepends the routing id, so there is at least one frame.
        let Some(envelope) = envelope_len(frames) else {
            return;
        };
        self.read += 1;
        self.last_read = Instant::now();
        let delimiter = envelope == 2;
        let body = &frames[envelope..];
        let size: usize = body.iter().map(|f| f.len()).sum();
        self.rec.request_read(size);

        let verdict = classify(body, self.max_message_bytes);
        let mut parts = frames.drain(..);
        let Some(client) = parts.next() else {
            return;
        };
        if delimiter {
            parts.next();
        }
        let state = self.status.state();
        match verdict {
            Ok(RequestKind::Health) => {
                self.metrics.health_check();
                let reply = [Message::from(STATUS_OK), Message::from(state.as_str())];
                self.send_reply(client, delimiter, reply);
            }
            Err(code) => self.reject(client, delimiter, code),
            Ok(RequestKind::Work) if state >= State::Draining => {
                self.reject(client, delimiter, ErrorCode::Draining)
            }
            Ok(RequestKind::Work) if self.table.is_full() => {
                self.reject(client, delimiter, ErrorCode::Overloaded)
            }
            Ok(RequestKind::Work) => {
                let received = Instant::now();
                let ticket = self.table.insert(Entry {
                    client,
                    delimiter,
                    received,
                });
                self.rec.set_inflight(self.table.len);
                match self.idle.pop() {
                    Some(w) => {
                        self.rec.picked_up(Duration::ZERO);
                        self.dispatch(w, ticket, parts);
                    }
                    // Every worker is busy: queue it for the first one to finish. The queue
                    // holds at most --max-inflight jobs (the table is checked first).
                    None => {
                        let job = Job {
                            ticket,
                            received,
                            body: parts.collect(),
                        };
                        if self.queue.try_send(job).is_err() {
                            log::error!("shared queue full or closed; request dropped");
                        }
                    }
                }
            }
        }
    }

    /// Sends a request to idle worker `w`.
    fn dispatch(&mut self, w: u32, ticket: Ticket, body: impl Iterator<Item = Message>) {
        self.workers[w as usize] = WorkerState::Active;
        let head = [
            Message::from(&internal::worker_id(w)[..]),
            Message::from(&ticket.to_bytes()[..]),
        ];
        // The worker said READY and is idle, so its inproc pipe has room: this cannot block.
        if let Err(e) = send_frames(&self.backend, head.into_iter().chain(body), 0) {
            // Only possible if the worker thread died; its request times out at drain.
            log::error!("cannot dispatch to worker {w}: {e}");
        }
    }

    /// Worker `w` said READY: it found the queue empty. A request queued since then goes to
    /// it now; otherwise it is idle. So no request waits in the queue while a worker idles.
    fn next_for(&mut self, w: u32) {
        match self.dequeue.try_recv() {
            Ok(job) => {
                self.rec.picked_up(job.received.elapsed());
                self.dispatch(w, job.ticket, job.body.into_iter());
            }
            Err(_) => {
                self.workers[w as usize] = WorkerState::Idle;
                self.idle.push(w);
            }
        }
    }

    /// Reads READY announcements and replies from the workers.
    fn read_backend(&mut self) -> Result<(), Error> {
        // A buffer kept across calls: this runs on every wake-up under load.
        let mut frames = std::mem::take(&mut self.worker_frames);
        let result = loop {
            match recv_frames(&self.backend, zmq::DONTWAIT, &mut frames) {
                Ok(()) => self.on_worker_message(&mut frames),
                Err(zmq::Error::EAGAIN) => break Ok(()),
                Err(source) => {
                    break Err(Error::Socket {
                        socket: "backend",
                        source,
                    })
                }
            }
        };
        self.worker_frames = frames;
        result
    }

    fn on_worker_message(&mut self, frames: &mut Vec<Message>) {
        let Some(w) = frames.first().and_then(|id| internal::parse_worker_id(id)) else {
            return;
        };
        let Some(&state) = self.workers.get(w as usize) else {
            return;
        };
        if frames.len() == 2 && &frames[1][..] == internal::READY {
            if matches!(state, WorkerState::Starting | WorkerState::Active) {
                self.next_for(w);
                if self.status.state() == State::Starting
                    && !self.workers.contains(&WorkerState::Starting)
                {
                    self.status.set(State::Serving);
                }
            }
            return;
        }
        let Some(ticket) = frames.get(1).and_then(|t| Ticket::from_bytes(t)) else {
            log::error!("malformed message from worker {w} ignored");
            return;
        };
        // A stale ticket (the request timed out at the drain deadline) finds no entry.
        if let Some(entry) = self.table.remove(ticket) {
            self.rec.set_inflight(self.table.len);
            let outcome = match frames.get(2).map(|f| &f[..]) {
                Some(STATUS_OK) => None,
                _ => frames
                    .get(3)
                    .and_then(|code| ErrorCode::from_bytes(code))
                    .or(Some(ErrorCode::HandlerFailed)),
            };
            self.send_reply(entry.client, entry.delimiter, frames.drain(2..));
            self.rec.replied(outcome, Some(entry.received.elapsed()));
        } else {
            log::debug!("late reply from worker {w} discarded");
        }
    }

    /// Answers a request that no worker will see.
    fn reject(&mut self, client: Message, delimiter: bool, code: ErrorCode) {
        self.rec.replied(Some(code), None);
        let reply = [
            Message::from(STATUS_ERR),
            Message::from(code.as_str()),
            Message::from(reject_message(code)),
        ];
        self.send_reply(client, delimiter, reply);
    }

    /// Sends a reply without blocking. A client that is gone or not reading loses its reply
    /// (counted) rather than stalling everyone else.
    fn send_reply(
        &mut self,
        client: Message,
        delimiter: bool,
        body: impl IntoIterator<Item = Message>,
    ) {
        // With ROUTER_MANDATORY the first frame decides: EHOSTUNREACH for an unknown peer,
        // EAGAIN at the peer's high-water mark. Once it is accepted the rest of the message
        // is too (the pipe counts whole messages).
        self.answered += 1;
        let first = send_one(&self.front, client, zmq::DONTWAIT | zmq::SNDMORE);
        let reason = match first {
            Ok(()) => None,
            Err(zmq::Error::EHOSTUNREACH) => Some(DropReason::PeerGone),
            Err(zmq::Error::EAGAIN) => Some(DropReason::Hwm),
            Err(e) => {
                log::debug!("reply dropped: {e}");
                Some(DropReason::PeerGone)
            }
        };
        if let Some(reason) = reason {
            self.undeliverable += 1;
            self.metrics.count_drop(reason);
            return;
        }
        let mut sent = 0;
        let rest = delimiter
            .then(Message::new)
            .into_iter()
            .chain(body)
            .inspect(|frame| sent += frame.len());
        if let Err(e) = send_frames(&self.front, rest, zmq::DONTWAIT) {
            log::debug!("reply cut short: {e}");
        }
        self.rec.reply_sent(sent);
    }

    /// At the drain deadline: every request still held gets `ERR timeout`; workers still in a
    /// handler are abandoned.
    fn expire(&mut self) {
        // Queued requests will not run: take them back so no worker starts one.
        while self.dequeue.try_recv().is_ok() {}
        let mut timed_out = 0;
        for ticket in self.table.tickets() {
            if let Some(entry) = self.table.remove(ticket) {
                timed_out += 1;
                let reply = [
                    Message::from(STATUS_ERR),
                    Message::from(ErrorCode::Timeout.as_str()),
                    Message::from(reject_message(ErrorCode::Timeout)),
                ];
                self.send_reply(entry.client, entry.delimiter, reply);
                self.rec
                    .replied(Some(ErrorCode::Timeout), Some(entry.received.elapsed()));
            }
        }
        self.rec.set_inflight(0);
        log::warn!("drain deadline reached: {timed_out} requests answered ERR timeout");
    }

    /// Stops and joins every worker that is not stuck in a handler. Returns how many were
    /// left behind.
    fn stop_workers(&mut self) -> usize {
        // A worker inside a handler now is stuck past the drain: leave it. Any other worker
        // not yet idle (starting, or between its last reply and READY) says READY shortly.
        for (w, state) in self.workers.iter_mut().enumerate() {
            if *state == WorkerState::Active && self.activity.in_handler(w) {
                *state = WorkerState::Abandoned;
            }
        }
        let waiting = |workers: &[WorkerState]| {
            workers
                .iter()
                .any(|s| matches!(s, WorkerState::Starting | WorkerState::Active))
        };
        let grace = Instant::now() + READY_GRACE;
        while waiting(&self.workers) && Instant::now() < grace {
            let mut item = [self.backend.as_poll_item(zmq::POLLIN)];
            if matches!(retry_eintr(|| zmq::poll(&mut item, 50)), Ok(n) if n > 0) {
                let _ = self.read_backend();
            }
        }
        for w in 0..self.workers.len() as u32 {
            if self.workers[w as usize] == WorkerState::Idle {
                let stop = [
                    Message::from(&internal::worker_id(w)[..]),
                    Message::from(internal::STOP),
                ];
                match send_frames(&self.backend, stop, 0) {
                    Ok(()) => self.workers[w as usize] = WorkerState::Stopped,
                    Err(e) => log::error!("cannot stop worker {w}: {e}"),
                }
            }
        }
        let mut left = 0;
        for thread in std::mem::take(&mut self.threads) {
            if self.workers[thread.index as usize] == WorkerState::Stopped {
                if thread.thread.join().is_err() {
                    log::error!("worker {} panicked outside its handler", thread.index);
                }
            } else {
                // Dropping the handle detaches the thread; process exit ends it.
                left += 1;
            }
        }
        if left > 0 {
            log::warn!("{left} workers left behind inside their handler");
        }
        left
    }
}

/// The message frame of an error the coordinator answers itself.
fn reject_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadRequest => "request body is empty",
        ErrorCode::TooLarge => "request body exceeds --max-message-bytes",
        ErrorCode::Overloaded => "too many requests in flight; retry later or elsewhere",
        ErrorCode::Draining => "broker is shutting down; retry on another instance",
        ErrorCode::Timeout => "request still running at the drain deadline",
        ErrorCode::HandlerFailed => "handler failed",
    }
}
