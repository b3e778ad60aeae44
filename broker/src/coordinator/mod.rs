//! The coordinator: one thread that owns the front ROUTER, its connection monitor, the signalfd,
//! the job channel the workers take requests from and every worker thread. It reads requests,
//! queues each for the workers (a worker takes one only when it is free, so nothing waits
//! behind a slow request while another worker idles), returns replies within each
//! connection's byte limits, and runs the lifecycle from serving through the drain to joining
//! the workers.
//!
//! Its parts: [`inflight`] (the table of requests read and not answered), [`clock`] (when
//! to drain and stop), and this module (the sockets and the loop that joins them).

pub mod clock;
pub mod inflight;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use nix::sys::signal::Signal;
use shared::metrics::{DropReason, Recorder};
use shared::protocol::{
    classify, echoes_envelope, encode_err, encode_ok, envelope_len, wire_size, RequestKind,
    FRAME_OVERHEAD, MAX_FRAMES, STATUS_OK,
};
use shared::socket::{
    monitor_event, send_one, try_recv_frames, try_recv_message, PROTOCOL_ERROR_CRYPTOGRAPHIC,
    PROTOCOL_ERROR_MECHANISM_MISMATCH,
};
use shared::{ErrorCode, Metrics};
use worker::{Activity, Event, Job, Waker};
use zmq::{Message, Socket};

use crate::access::{Refusals, ZapHandler};
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
/// How long shutdown waits for a worker to finish the request it is on (one that is not
/// inside its handler any more is about to exit).
const JOIN_GRACE: Duration = Duration::from_secs(1);
/// How often outbound byte estimates are refreshed from the guard's measurements and the
/// connection gauges published.
const RESYNC_EVERY: Duration = Duration::from_millis(100);
/// While requests keep the coordinator busy it does not poll; it looks at its other inputs
/// (signals, connection events, ZAP) this often.
const LOOK_EVERY: Duration = Duration::from_millis(1);
/// Shortest interval between measuring every connection's outbound bytes when the total
/// looks over budget (each measurement is a syscall per connection).
const MEASURE_ALL_EVERY: Duration = Duration::from_millis(10);

/// How often the `--curve-allow-keys` file is checked for changes (also before every batch of
/// handshakes), so a removed key's connections are reset within about this long.
const KEY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Reset connections remembered for naming the drops of their late replies; more than
/// `--max-connections` would rarely matter, and a miss only files a drop under `peer_gone`.
const RECENT_RESETS: usize = 1024;

/// A fatal coordinator error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// poll(2) failed.
    #[error("poll failed: {0}")]
    Poll(std::io::Error),
    /// A socket failed in a way that is not about one client.
    #[error("{socket} socket failed: {source}")]
    Socket {
        /// `front`, `monitor` or `notification` (a socket's ZMQ_FD).
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
    /// The ZAP handler, when connections are checked.
    pub zap: Option<ZapHandler>,
    /// SIGTERM and friends.
    pub signals: Signals,
}

/// The worker pool as the coordinator sees it.
pub struct Workers {
    /// Every worker thread, joined at the end.
    pub handles: Vec<worker::Worker>,
    /// Where requests go; dropping it stops the workers once they have taken what is queued.
    pub jobs: Sender<Job>,
    /// A receiver of the same channel, to take back what no worker will run (drain deadline).
    pub jobs_back: Receiver<Job>,
    /// Outcomes and start-up reports from the workers.
    pub events: Receiver<Event>,
    /// How the workers wake the coordinator when an event arrives while it sleeps.
    pub waker: Arc<Waker>,
    /// What each worker is doing now (shared with the liveness check).
    pub activity: Arc<Activity>,
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
    /// Workers that have reported themselves started.
    started: usize,
    /// Receive buffers reused across turns: front requests, reply bodies.
    frames: Vec<Message>,
    reply: Vec<Message>,
    /// Envelope vectors of answered requests, reused so a steady load allocates none.
    spare_envelopes: Vec<Vec<Message>>,
    tally: Tally,
    /// The time of this turn (read once per turn, after the poll).
    now: Instant,
    /// Requests may be waiting on the front socket (the last read stopped at a full batch).
    front_ready: bool,
    /// A reply was sent on the front socket since it was last asked for its events.
    sent_since_read: bool,
    /// When to look at the other inputs while busy.
    next_look: Instant,
    last_read: Instant,
    next_resync: Instant,
    last_measure_all: Instant,
    next_key_check: Instant,
    refusals: Refusals,
    /// Connections the broker reset that have closed, newest last (at most [`RECENT_RESETS`]):
    /// a reply finished after its connection was reset is dropped as `reset`, not `peer_gone`.
    recent_resets: VecDeque<u64>,
    /// The last monitor event was a handshake that failed without a protocol error; counted at
    /// the DISCONNECTED that libzmq sends right after it, unless the broker itself closed that
    /// connection (refused at --max-connections, or reset): libzmq reports that as a failed
    /// handshake too, with an errno that does not say so.
    handshake_failed: bool,
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
        Coordinator {
            sockets,
            clock: Clock::new(config.shutdown_delay, config.drain_timeout),
            status,
            rec: metrics.recorder(),
            refusals: Refusals::new(Arc::clone(&metrics)),
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
            started: 0,
            frames: Vec::with_capacity(8),
            reply: Vec::with_capacity(8),
            spare_envelopes: Vec::new(),
            tally: Tally::default(),
            now,
            front_ready: false,
            sent_since_read: false,
            next_look: now,
            last_read: now,
            next_resync: now,
            last_measure_all: now,
            next_key_check: now + KEY_CHECK_EVERY,
            recent_resets: VecDeque::with_capacity(RECENT_RESETS),
            handshake_failed: false,
            config: config.clone(),
        }
    }

    /// Runs until drained or hard-stopped. On a clean exit every worker that is not stuck in
    /// its handler has been joined.
    pub fn run(mut self) -> Result<Exit, Error> {
        // A socket's notification fd only signals news after the socket has been found
        // empty once (libzmq's edge-triggered ZMQ_FD): look at each before the first poll.
        self.read_monitor()?;
        self.read_front()?;
        self.handle_zap();
        'turns: loop {
            let now = Instant::now();
            self.status.heartbeat_at(now);
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
            if now >= self.next_key_check {
                self.next_key_check = now + KEY_CHECK_EVERY;
                self.refresh_keys();
            }
            self.refusals.log_if_due(now);
            let wait = wake_at
                .map_or(self.heartbeat, |at| at.saturating_duration_since(now))
                .min(self.heartbeat)
                .min(self.next_resync.saturating_duration_since(now))
                .min(self.next_key_check.saturating_duration_since(now));
            // Publish this turn's counts before blocking, so a scrape sees them.
            self.publish(now);
            // Replies sent since the front was last read may have consumed its notification:
            // libzmq wants ZMQ_EVENTS asked after any send or receive before its fd is polled.
            if !self.front_ready && self.sent_since_read {
                self.sent_since_read = false;
                self.front_ready = self
                    .sockets
                    .front
                    .get_events()
                    .is_ok_and(|e| e.contains(zmq::POLLIN));
            }
            let ready = if self.front_ready || !self.workers.events.is_empty() {
                // Work is waiting: no sleep. The other inputs are looked at now and then.
                if now >= self.next_look {
                    self.next_look = now + LOOK_EVERY;
                    let mut ready = self.wait(Duration::ZERO)?;
                    // Read even without a signal: cheap, and immune to a missed edge.
                    ready.monitor = true;
                    ready
                } else {
                    Ready::default()
                }
            } else {
                // Sleep only if no worker event is waiting; one sent after this look wakes
                // the poll through the waker's eventfd.
                self.workers.waker.sleeping();
                let ready = if self.workers.events.is_empty() {
                    self.wait(wait)
                } else {
                    Ok(Ready::default())
                };
                self.workers
                    .waker
                    .awake(ready.as_ref().is_ok_and(|r| r.woken));
                ready?
            };
            // One clock reading per turn stamps every request read and answered in it.
            self.now = Instant::now();
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
                self.handle_zap();
            }
            self.read_events();
            if ready.front || self.front_ready {
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

    /// Answers pending ZAP requests, with the allow file re-read first if it changed.
    fn handle_zap(&mut self) {
        self.refresh_keys();
        if let Some(handler) = &mut self.sockets.zap {
            handler.handle_pending(&mut self.refusals);
        }
    }

    /// Re-reads the allow file if it changed, and resets connections whose key it dropped.
    fn refresh_keys(&mut self) {
        let Some(handler) = &mut self.sockets.zap else {
            return;
        };
        if !handler.refresh_keys() {
            return;
        }
        let Some(keys) = handler.keys() else {
            return;
        };
        let revoked = self.conns.revoke(|key| keys.allows(key));
        if revoked > 0 {
            self.metrics.connections_reset("revoked", revoked);
            log::warn!("reset {revoked} connections whose client key was removed");
        }
    }

    /// Checks a connection's first request against the allowed keys (its key may have been
    /// removed since its handshake). False if the connection was reset instead.
    fn admit_key(&mut self, fd: RawFd, first_frame: &mut Message) -> bool {
        let Some(keys) = self.sockets.zap.as_ref().and_then(|z| z.keys()) else {
            return true;
        };
        let key = first_frame
            .gets("User-Id")
            .and_then(|id| shared::curve::decode_key(id, "User-Id").ok());
        match key {
            Some(key) if keys.allows(&key) => {
                self.conns.set_key(fd, key);
                true
            }
            _ => {
                if self.conns.reset(fd, conns::ResetReason::Revoked) {
                    self.metrics.connections_reset("revoked", 1);
                    log::warn!("reset a connection whose client key was removed");
                }
                false
            }
        }
    }

    /// Publishes per-turn figures: the recorder's counts and the held-requests integral.
    fn publish(&mut self, now: Instant) {
        self.held.set(now, self.inflight.len());
        self.metrics
            .set_held(self.held.seconds, self.held.count, self.held.since);
        self.rec.flush();
        // Readiness: not while a new client or new work would be refused.
        self.status
            .set_full(self.conns.open() >= self.config.max_connections);
        self.status.set_shedding(self.guard.shedding());
    }

    /// Refreshes outbound estimates from the guard's measurements and publishes gauges.
    fn resync(&mut self, now: Instant) {
        self.next_resync = now + RESYNC_EVERY;
        self.conns.resync();
        self.metrics.set_connections(self.conns.open());
        self.metrics.set_inflight_bytes(self.inflight_bytes);
    }

    /// Waits up to `timeout` for input: the signalfd, the workers' waker, and the
    /// notification descriptors of the ZeroMQ sockets (readable when libzmq has news for the
    /// socket; the socket itself then says whether a message waits).
    fn wait(&self, timeout: Duration) -> Result<Ready, Error> {
        let s = &self.sockets;
        let fd = |socket: &Socket| {
            socket.get_fd().map_err(|source| Error::Socket {
                socket: "notification",
                source,
            })
        };
        let mut fds = [
            (s.signals.as_raw_fd(), false),
            (fd(&s.monitor)?, false),
            (self.workers.waker.as_raw_fd(), false),
            (fd(&s.front)?, false),
            // Without a ZAP handler, a negative descriptor, which poll skips.
            (s.zap.as_ref().map_or(Ok(-1), |z| fd(z.socket()))?, false),
        ];
        // Round up so a 0.4 ms deadline does not become a busy loop of 0 ms polls.
        let millis = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        crate::sys::poll_readable(&mut fds, millis).map_err(Error::Poll)?;
        Ok(Ready {
            signal: fds[0].1,
            monitor: fds[1].1,
            woken: fds[2].1,
            front: fds[3].1,
            zap: fds[4].1,
        })
    }

    /// Reads connection events from the front socket's monitor.
    fn read_monitor(&mut self) -> Result<(), Error> {
        loop {
            match try_recv_frames(&self.sockets.monitor, &mut self.frames, 2) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(source) => {
                    return Err(Error::Socket {
                        socket: "monitor",
                        source,
                    })
                }
            }
            // The endpoint (second frame) is not needed: fds name connections.
            let Some((event, value)) = self.frames.first().and_then(|f| monitor_event(f)) else {
                continue;
            };
            let fd = value as RawFd;
            if event == zmq::SocketEvent::ACCEPTED as u16 {
                match self.conns.accepted(fd) {
                    Accepted::Tracked => {}
                    Accepted::Refused => {
                        log::debug!("connection refused: --max-connections reached");
                        self.refusals.note("limit", None);
                    }
                    Accepted::Untracked => log::debug!("accepted fd {fd} already gone"),
                }
            } else if event == zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL as u16 {
                let reason = match value {
                    PROTOCOL_ERROR_CRYPTOGRAPHIC => "server_key",
                    PROTOCOL_ERROR_MECHANISM_MISMATCH => "mechanism",
                    _ => "handshake",
                };
                log::debug!("handshake failed: {reason} (protocol error {value:#x})");
                self.refusals.note(reason, None);
            } else if event == zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL as u16 {
                // The value is an errno, and says little: EPIPE when the peer closed
                // mid-handshake (how a plaintext client that noticed the mismatch first shows;
                // which side notices first is a race), whatever errno was last set when the
                // handshake timer (--stall-timeout) fired or the broker closed the connection.
                log::debug!("handshake failed: closed or timed out (errno {value})");
                self.handshake_failed = true;
            } else if event == zmq::SocketEvent::DISCONNECTED as u16 {
                let closed = self.conns.disconnected(fd);
                if std::mem::take(&mut self.handshake_failed)
                    && closed
                        .as_ref()
                        .is_none_or(|c| !c.refused && c.reset.is_none())
                {
                    self.refusals.note("handshake", None);
                }
                if let Some(closed) = closed {
                    if closed.reset.is_some() {
                        if self.recent_resets.len() == RECENT_RESETS {
                            self.recent_resets.pop_front();
                        }
                        self.recent_resets.push_back(closed.id);
                    }
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

    /// Reads up to [`BATCH`] requests from the front socket; remembers whether more wait.
    fn read_front(&mut self) -> Result<(), Error> {
        let mut frames = std::mem::take(&mut self.frames);
        let mut result = Ok(());
        // More may wait after a full batch; an empty socket signals its descriptor later.
        self.front_ready = true;
        self.sent_since_read = false;
        for _ in 0..BATCH {
            // One frame past the limit is kept: enough for classify to refuse the request.
            match try_recv_message(&self.sockets.front, &mut frames, MAX_FRAMES + 1) {
                Ok(Some(received)) => self.on_request(&mut frames, received.dropped_bytes),
                Ok(None) => {
                    self.front_ready = false;
                    break;
                }
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

    /// Handles one request; `dropped_bytes` are the wire bytes of frames read past the cap.
    fn on_request(&mut self, frames: &mut Vec<Message>, dropped_bytes: u64) {
        // A ROUTER always prepends the routing id, so there is at least one frame.
        let Some(envelope_frames) = envelope_len(frames) else {
            return;
        };
        let now = self.now;
        let kept: usize = frames[1..].iter().map(|f| wire_size(f.len())).sum();
        let wire = kept as u64 + dropped_bytes;
        // The connection's fd is in the metadata of the first frame the client sent, not of
        // the routing id: libzmq 4.3.4 drops the routing id's metadata when a poll prefetched
        // the message (fixed upstream in 74529d97).
        let fd = frames
            .get_mut(1)
            .and_then(|first| first.gets("__fd"))
            .and_then(|text| text.parse::<RawFd>().ok());
        let mut attribution = fd.map(|fd| self.conns.request_read(fd, wire));
        if matches!(attribution, Some(conns::Attribution::Untracked)) {
            // Its connection's ACCEPTED event may still be queued: take the events, retry.
            let _ = self.read_monitor();
            attribution = fd.map(|fd| self.conns.request_read(fd, wire));
        }
        let origin = match fd.zip(attribution) {
            // Its connection is being refused (over --max-connections): not served.
            Some((_, conns::Attribution::Refused)) => return,
            Some((fd, conns::Attribution::Tracked { id, first })) => {
                if first && !self.admit_key(fd, &mut frames[1]) {
                    return;
                }
                Some(Origin { fd, conn: id })
            }
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
                // The first free worker takes it. The channel holds at most --max-inflight
                // jobs (the table is checked first).
                let job = Job {
                    ticket,
                    received: now,
                    body: std::mem::take(frames),
                };
                if self.workers.jobs.send(job).is_err() {
                    log::error!("job channel closed; request dropped");
                }
            }
        }
    }

    /// Takes every waiting worker event: start-up reports and outcomes.
    fn read_events(&mut self) {
        while let Ok(event) = self.workers.events.try_recv() {
            match event {
                Event::Started(_) => {
                    self.started += 1;
                    if self.started == self.workers.handles.len()
                        && self.status.state() == State::Starting
                    {
                        self.status.set(State::Serving);
                    }
                }
                Event::Done { ticket, result } => self.on_done(ticket, result),
                // Only while stopping, read by stop_workers.
                Event::Stopped(_) => {}
            }
        }
    }

    /// Sends a worker's outcome to the client that asked.
    fn on_done(
        &mut self,
        ticket: worker::Ticket,
        result: Result<Vec<Message>, worker::HandlerError>,
    ) {
        // A stale ticket (the request timed out at the drain deadline) finds no entry.
        let Some(mut entry) = self.inflight.remove(ticket) else {
            log::debug!("late reply discarded");
            return;
        };
        let now = self.now;
        self.inflight_bytes -= entry.cost;
        self.held.set(now, self.inflight.len());
        self.rec.set_inflight(self.inflight.len());
        let mut body = std::mem::take(&mut self.reply);
        body.clear();
        let outcome = match result {
            Ok(mut frames) => {
                body.extend(encode_ok(frames.drain(..)));
                None
            }
            Err(worker::HandlerError { code, message }) => {
                body.extend(encode_err(code, &message));
                Some(code)
            }
        };
        self.send_reply(&mut entry.envelope, entry.origin, &mut body);
        self.reply = body;
        self.rec
            .replied(outcome, Some(now.duration_since(entry.received)));
        self.spare_envelopes.push(entry.envelope);
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
        self.sent_since_read = true;
        let mut frames = envelope.drain(..).chain(body.drain(..));
        let Some(first) = frames.next() else { return };
        let reason = match send_one(&self.sockets.front, first, zmq::DONTWAIT | zmq::SNDMORE) {
            Ok(()) => None,
            Err(zmq::Error::EHOSTUNREACH) => match origin {
                Some(o) if self.recent_resets.contains(&o.conn) => Some(DropReason::Reset),
                _ => Some(DropReason::PeerGone),
            },
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
        while self.workers.jobs_back.try_recv().is_ok() {}
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
        // Nothing queued is run any more; closing the channel makes every worker leave once
        // it has finished the request it is on.
        while self.workers.jobs_back.try_recv().is_ok() {}
        let (closed, _) = crossbeam_channel::bounded(0);
        drop(std::mem::replace(&mut self.workers.jobs, closed));
        let grace = Instant::now() + JOIN_GRACE;
        let mut handles = std::mem::take(&mut self.workers.handles);
        let mut stopped = vec![false; handles.len()];
        // A worker inside its handler now is stuck past the drain: it is not waited for.
        // Any other reports that it is leaving promptly.
        while handles.iter().any(|h| {
            !stopped[h.index as usize] && !self.workers.activity.in_handler(h.index as usize)
        }) {
            match self.workers.events.recv_deadline(grace) {
                Ok(Event::Stopped(index)) => {
                    if let Some(s) = stopped.get_mut(index as usize) {
                        *s = true;
                    }
                }
                // Replies to requests already answered ERR timeout: nobody to send them to.
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let mut left = 0;
        for handle in handles.drain(..) {
            if stopped[handle.index as usize] {
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

/// Which polled inputs are readable (worker events are read every turn regardless).
#[derive(Default)]
struct Ready {
    signal: bool,
    monitor: bool,
    woken: bool,
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
        ErrorCode::Overloaded => {
            "broker is at its in-flight or memory limit; retry later or elsewhere"
        }
        ErrorCode::Draining => "broker is shutting down; retry on another instance",
        ErrorCode::Timeout => "request still running at the drain deadline",
        ErrorCode::HandlerFailed => "handler failed",
    }
}
