//! The coordinator: one thread that owns the front ROUTER, its connection monitor, the inproc
//! ROUTER to the workers, the signalfd and every worker thread. It reads requests, hands each
//! to an idle worker (the zguide's load-balancing pattern: a worker gets a request only when
//! it is free, so nothing waits behind a slow request while another worker idles), returns
//! replies within each connection's byte limits, and runs the lifecycle from serving through
//! the drain to joining the workers.
//!
//! Its parts: [`inflight`] (the table of requests read and not answered), [`clock`] (when
//! to drain and stop), and this module (the sockets and the loop that joins them).

pub mod clock;
pub mod inflight;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use nix::sys::signal::Signal;
use shared::metrics::{DropReason, Recorder};
use shared::protocol::internal::{self, ReplyHead, Ticket};
use shared::protocol::{
    classify, echoes_envelope, encode_err, envelope_len, wire_size, RequestKind, FRAME_OVERHEAD,
    MAX_FRAMES, STATUS_OK,
};
use shared::socket::{recv_frames, recv_frames_capped, retry_eintr, send_one};
use shared::{ErrorCode, Metrics};
use worker::{Activity, Job};
use zmq::{Message, Socket};

use crate::access::ZapHandler;
use crate::config::Config;
use crate::conns::{self, Accepted};
use crate::guard;
use crate::lifecycle::{State, Status};
use crate::signals::{self, SignalEvent, Signals};
use clock::{Clock, Step};
use inflight::Slab;

/// Messages read from one socket before looking at the others, so a flood on the front
/// cannot starve replies coming back from the workers.
const BATCH: usize = 256;
/// How long shutdown waits for a worker that has not said it is idle yet.
const IDLE_GRACE: Duration = Duration::from_secs(1);
/// How often outbound byte estimates are refreshed from the guard's measurements and the
/// connection gauges published.
const RESYNC_EVERY: Duration = Duration::from_millis(100);
/// Shortest interval between measuring every connection's outbound bytes when the total
/// looks over budget (each measurement is a syscall per connection).
const MEASURE_ALL_EVERY: Duration = Duration::from_millis(10);

/// A fatal coordinator error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// zmq_poll failed.
    #[error("poll failed: {0}")]
    Poll(zmq::Error),
    /// A socket failed in a way that is not about one client.
    #[error("{socket} socket failed: {source}")]
    Socket {
        /// `front`, `backend` or `monitor`.
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

/// The sockets the coordinator polls.
pub struct Sockets {
    /// The front ROUTER, bound.
    pub front: Socket,
    /// The PAIR reading the front socket's monitor events (accepted, disconnected).
    pub monitor: Socket,
    /// The inproc ROUTER the workers connect to.
    pub backend: Socket,
    /// The ZAP handler, when connections are checked.
    pub zap: Option<ZapHandler>,
    /// SIGTERM and friends.
    pub signals: Signals,
}

/// The worker pool as the coordinator sees it.
pub struct Workers {
    /// Every worker thread, joined at the end.
    pub handles: Vec<worker::Worker>,
    /// Sender of the overflow queue: requests read while no worker was idle.
    pub overflow: Sender<Job>,
    /// A receiver of the same queue, to take back what no worker will run (drain deadline).
    pub overflow_rx: Receiver<Job>,
    /// What each worker is doing now (shared with the liveness check).
    pub activity: Arc<Activity>,
}

/// What the coordinator knows of one worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WorkerState {
    /// Has not said READY yet.
    Starting,
    /// Free for work: blocked on its inproc socket, waiting for the coordinator.
    Idle,
    /// Running requests: one handed to it, then any it takes from the overflow queue. Its
    /// reply to the last one says it is idle.
    Active,
    /// Still inside a handler at the end of the drain; never waited on again.
    Abandoned,
    /// Sent STOP.
    Stopped,
}

/// Where a request came from: the connection it arrived on, for its reply's byte accounting.
#[derive(Clone, Copy, Debug)]
struct Origin {
    fd: RawFd,
    conn: u64,
}

/// One request read and not yet answered. Its body travels with it to a worker.
struct Entry {
    envelope: Vec<Message>,
    origin: Option<Origin>,
    received: Instant,
    /// What it counts against `--max-inflight-bytes`.
    cost: usize,
}

/// The time integral of requests held, for `broker_inflight_seconds_total`.
struct Held {
    seconds: f64,
    count: usize,
    since: Instant,
}

impl Held {
    fn set(&mut self, now: Instant, count: usize) {
        self.seconds += self.count as f64 * now.saturating_duration_since(self.since).as_secs_f64();
        self.since = now;
        self.count = count;
    }
}

/// Lifetime totals, logged at exit: every request read must have been answered.
#[derive(Default)]
struct Tally {
    read: u64,
    answered: u64,
    undeliverable: u64,
}

/// The coordinator and everything it owns.
pub struct Coordinator {
    sockets: Sockets,
    config: Config,
    clock: Clock,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    rec: Recorder,
    guard: Arc<guard::Shared>,
    heartbeat: Duration,
    inflight: Slab<Entry>,
    inflight_bytes: usize,
    held: Held,
    conns: conns::Table,
    workers: Workers,
    worker_states: Vec<WorkerState>,
    idle: Vec<u32>,
    /// Receive buffers reused across turns: front requests, worker messages, reply bodies.
    frames: Vec<Message>,
    worker_frames: Vec<Message>,
    reply: Vec<Message>,
    /// Envelope vectors of answered requests, reused so a steady load allocates none.
    spare_envelopes: Vec<Vec<Message>>,
    tally: Tally,
    last_read: Instant,
    next_resync: Instant,
    last_measure_all: Instant,
}

impl Coordinator {
    /// A coordinator for bound sockets and a started pool.
    pub fn new(
        config: &Config,
        sockets: Sockets,
        workers: Workers,
        conns: conns::Table,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
        guard: Arc<guard::Shared>,
    ) -> Coordinator {
        let now = Instant::now();
        let n = workers.handles.len();
        Coordinator {
            sockets,
            clock: Clock::new(config.shutdown_delay, config.drain_timeout),
            status,
            rec: metrics.recorder(),
            metrics,
            guard,
            // Turn often enough that liveness never mistakes an idle loop for a stuck one.
            heartbeat: (config.stuck_after / 4).min(Duration::from_millis(500)),
            inflight: Slab::new(config.max_inflight),
            inflight_bytes: 0,
            held: Held {
                seconds: 0.0,
                count: 0,
                since: now,
            },
            conns,
            workers,
            worker_states: vec![WorkerState::Starting; n],
            idle: Vec::with_capacity(n),
            frames: Vec::with_capacity(8),
            worker_frames: Vec::with_capacity(8),
            reply: Vec::with_capacity(8),
            spare_envelopes: Vec::new(),
            tally: Tally::default(),
            last_read: now,
            next_resync: now,
            last_measure_all: now,
            config: config.clone(),
        }
    }

    /// Runs until drained or hard-stopped. On a clean exit every worker that is not stuck in
    /// its handler has been joined.
    pub fn run(mut self) -> Result<Exit, Error> {
        'turns: loop {
            self.status.heartbeat();
            let now = Instant::now();
            let wake_at = loop {
                match self.clock.step(now, self.inflight.len(), self.last_read) {
                    Step::Wait(at) => break at,
                    Step::BeginDrain => {
                        self.status.set(State::Draining);
                        log::info!(
                            "draining {} in-flight requests, deadline {}",
                            self.inflight.len(),
                            humantime::format_duration(self.config.drain_timeout)
                        );
                    }
                    Step::Expire => self.expire(),
                    Step::Stop => break 'turns,
                }
            };
            if now >= self.next_resync {
                self.resync(now);
            }
            let wait = wake_at
                .map_or(self.heartbeat, |at| at.saturating_duration_since(now))
                .min(self.heartbeat)
                .min(self.next_resync.saturating_duration_since(now));
            // Publish this turn's counts before blocking, so a scrape sees them.
            self.publish(now);
            let ready = self.poll(wait)?;
            if ready.signal {
                if let Some(sig) = self.read_signals()? {
                    return Ok(self.hard_stop(sig));
                }
            }
            // Connection events first: a request is then attributed to the connection it
            // came through, not to an earlier one that had the same fd number.
            if ready.monitor {
                self.read_monitor()?;
            }
            if ready.zap {
                if let Some(handler) = &mut self.sockets.zap {
                    handler.handle_pending();
                }
            }
            if ready.backend {
                self.read_backend()?;
            }
            if ready.front {
                self.read_front()?;
            }
        }
        self.status.set(State::Stopped);
        self.publish(Instant::now());
        log::info!(
            "read {} requests, answered {} ({} replies undeliverable: client gone or not reading)",
            self.tally.read,
            self.tally.answered,
            self.tally.undeliverable
        );
        let abandoned = self.stop_workers();
        Ok(Exit::Drained { abandoned })
    }

    fn hard_stop(&mut self, sig: Signal) -> Exit {
        log::warn!("second {sig} during shutdown: exiting now");
        // Nothing may wait on the way out: drop queued replies.
        let _ = self.sockets.front.set_linger(0);
        Exit::HardStop(sig)
    }

    /// Handles pending signals; returns a signal that calls for a hard stop.
    fn read_signals(&mut self) -> Result<Option<Signal>, Error> {
        while let Some(event) = self.sockets.signals.pending()? {
            match event {
                SignalEvent::Stop(sig) => {
                    if !self.clock.stop_requested(Instant::now()) {
                        return Ok(Some(sig));
                    }
                    log::info!(
                        "{sig} received: not ready; serving for {} more, then draining",
                        humantime::format_duration(self.config.shutdown_delay)
                    );
                    self.status.set(State::Stopping);
                    self.metrics.set_draining();
                }
                SignalEvent::Ignored(name) => log::info!("{name} received and ignored"),
            }
        }
        Ok(None)
    }

    /// Publishes per-turn figures: the recorder's counts and the held-requests integral.
    fn publish(&mut self, now: Instant) {
        self.held.set(now, self.inflight.len());
        self.metrics
            .set_held(self.held.seconds, self.held.count, self.held.since);
        self.rec.flush();
    }

    /// Refreshes outbound estimates from the guard's measurements and publishes gauges.
    fn resync(&mut self, now: Instant) {
        self.next_resync = now + RESYNC_EVERY;
        self.conns.resync();
        self.metrics.set_connections(self.conns.open());
        self.metrics.set_inflight_bytes(self.inflight_bytes);
    }

    /// Waits for input.
    fn poll(&self, timeout: Duration) -> Result<Ready, Error> {
        let s = &self.sockets;
        let mut items = [
            zmq::PollItem::from_fd(s.signals.as_raw_fd(), zmq::POLLIN),
            s.monitor.as_poll_item(zmq::POLLIN),
            s.backend.as_poll_item(zmq::POLLIN),
            s.front.as_poll_item(zmq::POLLIN),
            // Without a ZAP handler, a never-readable stand-in keeps the set fixed-size.
            match &s.zap {
                Some(zap) => zap.socket().as_poll_item(zmq::POLLIN),
                None => zmq::PollItem::from_fd(s.signals.as_raw_fd(), zmq::PollEvents::empty()),
            },
        ];
        // Round up so a 0.4 ms deadline does not become a busy loop of 0 ms polls.
        let millis = timeout.as_micros().div_ceil(1000).min(i64::MAX as u128) as i64;
        retry_eintr(|| zmq::poll(&mut items, millis)).map_err(Error::Poll)?;
        Ok(Ready {
            signal: items[0].is_readable(),
            monitor: items[1].is_readable(),
            backend: items[2].is_readable(),
            front: items[3].is_readable(),
            zap: s.zap.is_some() && items[4].is_readable(),
        })
    }

    /// Reads connection events from the front socket's monitor.
    fn read_monitor(&mut self) -> Result<(), Error> {
        loop {
            match recv_frames(&self.sockets.monitor, zmq::DONTWAIT, &mut self.frames) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(source) => {
                    return Err(Error::Socket {
                        socket: "monitor",
                        source,
                    })
                }
            }
            // v1 events: [u16 event, u32 value (the fd)] then the endpoint.
            let Some(head) = self.frames.first().filter(|f| f.len() == 6) else {
                continue;
            };
            let event = u16::from_le_bytes([head[0], head[1]]);
            let fd = u32::from_le_bytes([head[2], head[3], head[4], head[5]]) as RawFd;
            if event == zmq::SocketEvent::ACCEPTED as u16 {
                match self.conns.accepted(fd) {
                    Accepted::Tracked => {}
                    Accepted::Refused => {
                        self.metrics.connection_refused("limit");
                        log::debug!("connection refused: --max-connections reached");
                    }
                    Accepted::Untracked => log::debug!("accepted fd {fd} already gone"),
                }
            } else if event == zmq::SocketEvent::DISCONNECTED as u16 {
                if let Some(closed) = self.conns.disconnected(fd) {
                    if closed.undelivered > 0 {
                        let reason = if closed.reset.is_some() {
                            DropReason::Reset
                        } else {
                            DropReason::PeerGone
                        };
                        self.tally.undeliverable += closed.undelivered;
                        self.metrics.count_drops(reason, closed.undelivered);
                    }
                }
            }
        }
    }

    /// Reads up to [`BATCH`] requests from the front socket.
    fn read_front(&mut self) -> Result<(), Error> {
        let mut frames = std::mem::take(&mut self.frames);
        let mut result = Ok(());
        for _ in 0..BATCH {
            // One frame past the limit is kept: enough for classify to refuse the request.
            match recv_frames_capped(
                &self.sockets.front,
                zmq::DONTWAIT,
                &mut frames,
                MAX_FRAMES + 1,
            ) {
                Ok(_) => self.on_request(&mut frames),
                Err(zmq::Error::EAGAIN) => break,
                Err(source) => {
                    result = Err(Error::Socket {
                        socket: "front",
                        source,
                    });
                    break;
                }
            }
        }
        self.frames = frames;
        result
    }

    fn on_request(&mut self, frames: &mut Vec<Message>) {
        // A ROUTER always prepends the routing id, so there is at least one frame.
        let Some(envelope_frames) = envelope_len(frames) else {
            return;
        };
        let now = Instant::now();
        let wire: usize = frames[1..].iter().map(|f| wire_size(f.len())).sum();
        // The connection's fd is in the metadata of the first frame the client sent, not of
        // the routing id: libzmq 4.3.4 drops the routing id's metadata when a poll prefetched
        // the message (fixed upstream in 74529d97).
        let fd = frames
            .get_mut(1)
            .and_then(|first| first.gets("__fd"))
            .and_then(|text| text.parse::<RawFd>().ok());
        let origin = match fd.map(|fd| (fd, self.conns.request_read(fd, wire as u64))) {
            // Its connection is being refused (over --max-connections): not served.
            Some((_, conns::Attribution::Refused)) => return,
            Some((fd, conns::Attribution::Tracked(conn))) => Some(Origin { fd, conn }),
            Some((_, conns::Attribution::Untracked)) | None => None,
        };
        self.tally.read += 1;
        self.last_read = now;
        let (envelope, body) = frames.split_at(envelope_frames);
        self.rec
            .request_read(body.iter().map(|f| f.len()).sum::<usize>());
        let verdict = classify(envelope, body, self.config.max_message_bytes);
        let echo_envelope = echoes_envelope(envelope, self.config.max_message_bytes);
        let cost: usize = body.iter().map(|f| f.len() + FRAME_OVERHEAD).sum();
        let mut envelope = self.spare_envelopes.pop().unwrap_or_default();
        if echo_envelope {
            envelope.extend(frames.drain(..envelope_frames));
        } else {
            envelope.extend(frames.drain(..1));
            frames.clear();
        }
        let verdict = match verdict {
            Ok(RequestKind::Work) if self.clock.draining() => Err(ErrorCode::Draining),
            Ok(RequestKind::Work)
                if self.inflight.is_full()
                    || self.inflight_bytes + cost > self.config.max_inflight_bytes
                    || self.guard.shedding() =>
            {
                Err(ErrorCode::Overloaded)
            }
            other => other,
        };
        match verdict {
            Ok(RequestKind::Health) => {
                self.metrics.health_check();
                self.reply.clear();
                self.reply.push(Message::from(STATUS_OK));
                self.reply.push(Message::from(self.status.state().as_str()));
                let mut body = std::mem::take(&mut self.reply);
                self.send_reply(&mut envelope, origin, &mut body);
                self.reply = body;
                frames.clear();
            }
            Err(code) => {
                frames.clear();
                self.reject(&mut envelope, origin, code);
            }
            Ok(RequestKind::Work) => {
                let entry = Entry {
                    envelope,
                    origin,
                    received: now,
                    cost,
                };
                let Ok(ticket) = self.inflight.insert(entry) else {
                    // Checked above; unreachable, but never lose the request silently.
                    log::error!("in-flight table full after the check; request dropped");
                    return;
                };
                self.inflight_bytes += cost;
                self.held.set(now, self.inflight.len());
                self.rec.set_inflight(self.inflight.len());
                match self.idle.pop() {
                    Some(w) => {
                        self.rec.picked_up(Duration::ZERO);
                        self.dispatch(w, ticket, frames);
                    }
                    // Every worker is busy: queue it for the first one to finish. The queue
                    // holds at most --max-inflight jobs (the table is checked first).
                    None => {
                        let job = Job {
                            ticket,
                            received: now,
                            body: std::mem::take(frames),
                        };
                        if self.workers.overflow.try_send(job).is_err() {
                            log::error!("overflow queue full or closed; request dropped");
                        }
                    }
                }
            }
        }
    }

    /// Sends a request to idle worker `w`.
    fn dispatch(&mut self, w: u32, ticket: Ticket, body: &mut Vec<Message>) {
        self.worker_states[w as usize] = WorkerState::Active;
        let head = [
            Message::from(&internal::worker_id(w)[..]),
            Message::from(&ticket.to_bytes()[..]),
        ];
        // The worker is idle, so its inproc pipe has room: this cannot block.
        let all = head.into_iter().chain(body.drain(..));
        if let Err(e) = shared::socket::send_frames(&self.sockets.backend, all, 0) {
            // Only possible if the worker thread died; its request times out at drain.
            log::error!("cannot dispatch to worker {w}: {e}");
        }
    }

    /// Worker `w` is idle (it found the overflow queue empty). A request queued since then
    /// goes to it now; otherwise it waits. So no request waits while a worker idles.
    fn next_for(&mut self, w: u32) {
        match self.workers.overflow_rx.try_recv() {
            Ok(mut job) => {
                self.rec.picked_up(job.received.elapsed());
                self.dispatch(w, job.ticket, &mut job.body);
            }
            Err(_) => {
                self.worker_states[w as usize] = WorkerState::Idle;
                self.idle.push(w);
            }
        }
    }

    /// Reads replies and READY announcements from the workers.
    fn read_backend(&mut self) -> Result<(), Error> {
        // A buffer kept across calls: this runs on every wake-up under load.
        let mut frames = std::mem::take(&mut self.worker_frames);
        let result = loop {
            match recv_frames(&self.sockets.backend, zmq::DONTWAIT, &mut frames) {
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
        let Some(&state) = self.worker_states.get(w as usize) else {
            return;
        };
        if frames.len() == 2 && &frames[1][..] == internal::READY {
            if state == WorkerState::Starting {
                self.next_for(w);
                if self.status.state() == State::Starting
                    && !self.worker_states.contains(&WorkerState::Starting)
                {
                    self.status.set(State::Serving);
                }
            }
            return;
        }
        let Some(head) = frames.get(1).and_then(|h| ReplyHead::from_bytes(h)) else {
            log::error!("malformed message from worker {w} ignored");
            return;
        };
        // A stale ticket (the request timed out at the drain deadline) finds no entry.
        match self.inflight.remove(head.ticket) {
            Some(mut entry) => {
                let now = Instant::now();
                self.inflight_bytes -= entry.cost;
                self.held.set(now, self.inflight.len());
                self.rec.set_inflight(self.inflight.len());
                let outcome = match frames.get(2).map(|f| &f[..]) {
                    Some(STATUS_OK) => None,
                    _ => frames
                        .get(3)
                        .and_then(|code| ErrorCode::from_bytes(code))
                        .or(Some(ErrorCode::HandlerFailed)),
                };
                frames.drain(..2);
                self.send_reply(&mut entry.envelope, entry.origin, frames);
                self.rec
                    .replied(outcome, Some(now.duration_since(entry.received)));
                self.spare_envelopes.push(entry.envelope);
            }
            None => log::debug!("late reply from worker {w} discarded"),
        }
        if head.idle && matches!(state, WorkerState::Active | WorkerState::Abandoned) {
            self.next_for(w);
        }
    }

    /// Answers a request that no worker will see.
    fn reject(&mut self, envelope: &mut Vec<Message>, origin: Option<Origin>, code: ErrorCode) {
        self.rec.replied(Some(code), None);
        let mut body = std::mem::take(&mut self.reply);
        body.clear();
        body.extend(encode_err(code, reject_message(code)));
        self.send_reply(envelope, origin, &mut body);
        self.reply = body;
        self.spare_envelopes.push(std::mem::take(envelope));
    }

    /// Sends `envelope` + `body` without blocking, within the connection's outbound byte
    /// limit and the broker's buffer budget. A reply that does not fit, or whose client is
    /// gone or not reading, is dropped (counted) rather than stalling everyone else. Both
    /// vectors are left empty.
    fn send_reply(
        &mut self,
        envelope: &mut Vec<Message>,
        origin: Option<Origin>,
        body: &mut Vec<Message>,
    ) {
        self.tally.answered += 1;
        let wire = envelope[1..]
            .iter()
            .chain(body.iter())
            .map(|f| wire_size(f.len()) as u64)
            .sum::<u64>();
        if let Some(reason) = origin.and_then(|o| self.over_limits(o, wire)) {
            self.drop_reply(reason, envelope, body);
            return;
        }
        // With ROUTER_MANDATORY the first frame decides: EHOSTUNREACH for an unknown peer,
        // EAGAIN at the peer's high-water mark. Once it is accepted the rest of the message
        // is too (the pipe counts whole messages).
        let mut frames = envelope.drain(..).chain(body.drain(..));
        let Some(first) = frames.next() else { return };
        let reason = match send_one(&self.sockets.front, first, zmq::DONTWAIT | zmq::SNDMORE) {
            Ok(()) => None,
            Err(zmq::Error::EHOSTUNREACH) => Some(DropReason::PeerGone),
            Err(zmq::Error::EAGAIN) => Some(DropReason::Hwm),
            Err(e) => {
                log::debug!("reply dropped: {e}");
                Some(DropReason::PeerGone)
            }
        };
        if let Some(reason) = reason {
            drop(frames);
            self.tally.undeliverable += 1;
            self.metrics.count_drops(reason, 1);
            return;
        }
        let mut sent = 0;
        let mut frames = frames.peekable();
        while let Some(frame) = frames.next() {
            sent += frame.len();
            let more = if frames.peek().is_some() {
                zmq::SNDMORE
            } else {
                0
            };
            if let Err(e) = send_one(&self.sockets.front, frame, zmq::DONTWAIT | more) {
                log::debug!("reply cut short: {e}");
                break;
            }
        }
        self.rec.reply_sent(sent);
        if let Some(o) = origin {
            self.conns.reply_sent(o.fd, o.conn, wire);
        }
    }

    /// Why a reply of `wire` bytes to `origin` must be dropped, if it must.
    fn over_limits(&mut self, origin: Origin, wire: u64) -> Option<DropReason> {
        let cap = self.config.max_connection_bytes as u64;
        let held = self
            .conns
            .held_out(origin.fd, origin.conn, cap.saturating_sub(wire))?;
        if held + wire > cap {
            return Some(DropReason::Hwm);
        }
        let budget = self.config.max_buffered_bytes as u64;
        if self.conns.out_estimate() + wire > budget {
            let now = Instant::now();
            if now >= self.last_measure_all + MEASURE_ALL_EVERY {
                self.last_measure_all = now;
                self.conns.measure_outbound();
            }
            if self.conns.out_estimate() + wire > budget {
                return Some(DropReason::Budget);
            }
        }
        None
    }

    fn drop_reply(
        &mut self,
        reason: DropReason,
        envelope: &mut Vec<Message>,
        body: &mut Vec<Message>,
    ) {
        envelope.clear();
        body.clear();
        self.tally.undeliverable += 1;
        self.metrics.count_drops(reason, 1);
    }

    /// At the drain deadline: every request still held gets `ERR timeout`; workers still in a
    /// handler are abandoned.
    fn expire(&mut self) {
        // Queued requests will not run: take them back so no worker starts one.
        while self.workers.overflow_rx.try_recv().is_ok() {}
        let mut timed_out = 0;
        for ticket in self.inflight.tickets() {
            if let Some(mut entry) = self.inflight.remove(ticket) {
                timed_out += 1;
                self.inflight_bytes -= entry.cost;
                let mut body = std::mem::take(&mut self.reply);
                body.clear();
                body.extend(encode_err(
                    ErrorCode::Timeout,
                    reject_message(ErrorCode::Timeout),
                ));
                self.send_reply(&mut entry.envelope, entry.origin, &mut body);
                self.reply = body;
                self.rec
                    .replied(Some(ErrorCode::Timeout), Some(entry.received.elapsed()));
            }
        }
        self.held.set(Instant::now(), 0);
        self.rec.set_inflight(0);
        log::warn!("drain deadline reached: {timed_out} requests answered ERR timeout");
    }

    /// Stops and joins every worker that is not stuck in a handler. Returns how many were
    /// left behind.
    fn stop_workers(&mut self) -> usize {
        // A worker inside a handler now is stuck past the drain: leave it. Any other worker
        // not yet idle (starting, or about to send its last reply) says so shortly.
        for (w, state) in self.worker_states.iter_mut().enumerate() {
            if *state == WorkerState::Active && self.workers.activity.in_handler(w) {
                *state = WorkerState::Abandoned;
            }
        }
        let waiting = |states: &[WorkerState]| {
            states
                .iter()
                .any(|s| matches!(s, WorkerState::Starting | WorkerState::Active))
        };
        let grace = Instant::now() + IDLE_GRACE;
        while waiting(&self.worker_states) && Instant::now() < grace {
            let mut item = [self.sockets.backend.as_poll_item(zmq::POLLIN)];
            if matches!(retry_eintr(|| zmq::poll(&mut item, 50)), Ok(n) if n > 0) {
                let _ = self.read_backend();
            }
        }
        for w in 0..self.worker_states.len() as u32 {
            if self.worker_states[w as usize] == WorkerState::Idle {
                let stop = [
                    Message::from(&internal::worker_id(w)[..]),
                    Message::from(internal::STOP),
                ];
                match shared::socket::send_frames(&self.sockets.backend, stop, 0) {
                    Ok(()) => self.worker_states[w as usize] = WorkerState::Stopped,
                    Err(e) => log::error!("cannot stop worker {w}: {e}"),
                }
            }
        }
        let mut left = 0;
        for handle in std::mem::take(&mut self.workers.handles) {
            if self.worker_states[handle.index as usize] == WorkerState::Stopped {
                if handle.thread.join().is_err() {
                    log::error!("worker {} panicked outside its handler", handle.index);
                }
            } else {
                // Dropping the handle detaches the thread; process exit ends it.
                left += 1;
            }
        }
        if left > 0 {
            log::warn!("{left} workers left behind inside their handler");
        }
        self.conns.clear();
        left
    }
}

/// Which polled inputs are readable.
struct Ready {
    signal: bool,
    monitor: bool,
    backend: bool,
    front: bool,
    zap: bool,
}

/// The message frame of an error the coordinator answers itself.
fn reject_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadRequest => "request body is empty",
        ErrorCode::TooLarge => {
            "request exceeds --max-message-bytes, or has too many frames or envelope frames"
        }
        ErrorCode::Overloaded => "broker is at its in-flight limit; retry later or elsewhere",
        ErrorCode::Draining => "broker is shutting down; retry on another instance",
        ErrorCode::Timeout => "request still running at the drain deadline",
        ErrorCode::HandlerFailed => "handler failed",
    }
}
