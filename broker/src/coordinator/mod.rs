//! The coordinator: one thread that owns the front ROUTER, its connection monitor, the signalfd,
//! the job queue the workers take requests from and every worker thread. It reads requests,
//! queues each for the workers (a worker takes one only when it is free, so nothing waits
//! behind a slow request while another worker idles), returns replies within each
//! connection's byte limits, and runs the lifecycle from serving through the drain to joining
//! the workers.
//!
//! This file is the loop. The rest, by concern: [`intake`] (a request from read to queued:
//! inspection, attribution, the load it meets), [`admission`] (the pure decision),
//! [`inflight`] (the requests held, with their bytes, held-time integral and gauge, stored in
//! a [`slab`]), [`replies`] (every answer, within the byte budgets), [`connections`] (monitor
//! events, refusals, ZAP and keys), `poll` (what the loop waits on), `shutdown` (signals, the
//! drain deadline, joining the workers) and [`clock`] (the lifecycle state machine).
//! docs/architecture.md walks a request and a SIGTERM through them.

pub mod admission;
pub mod age;
pub mod clock;
pub mod connections;
pub mod inflight;
pub mod intake;
mod poll;
pub mod replies;
mod shutdown;
pub mod slab;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use nix::sys::signal::Signal;
use shared::metrics::Recorder;
use shared::protocol::MAX_FRAMES;
use shared::socket::try_recv_message;
use shared::Metrics;
use worker::{Activity, Event, Jobs, QueueState, Waker};
use zmq::{Message, Socket};

use crate::access::{Refusals, ZapHandler};
use crate::config::Config;
use crate::conns;
use crate::demand::{Demand, RefusedAllowance};
use crate::guard;
use crate::lifecycle::Status;
use crate::signals::{self, Signals};
use clock::{Clock, Step};
use inflight::InFlight;
use poll::Ready;
use replies::Outbox;

/// Messages read from one socket before looking at the others, so a flood on the front
/// cannot starve replies coming back from the workers.
const BATCH: usize = 256;
/// How often outbound byte estimates are refreshed from the guard's measurements and the
/// connection gauges published.
const RESYNC_EVERY: Duration = Duration::from_millis(100);
/// While requests keep the coordinator busy it does not poll; it looks at its other inputs
/// (signals, connection events, ZAP) this often.
const LOOK_EVERY: Duration = Duration::from_millis(1);
/// While busy, per-turn figures are published at most this often (a turn can be one request):
/// a scrape then lags by at most this much, and before every sleep they are published anyway.
const PUBLISH_EVERY: Duration = Duration::from_millis(1);
/// How often the `--curve-allow-keys` file is checked for changes (also before every batch of
/// handshakes), so a removed key's connections are reset within about this long.
const KEY_CHECK_EVERY: Duration = Duration::from_secs(1);

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
    /// Where requests go: the first free worker takes the next; closing it stops the workers
    /// once they have taken what is queued, and what no worker will run can be taken back.
    pub jobs: Arc<Jobs>,
    /// Outcomes and start-up reports from the workers.
    pub events: Receiver<Event>,
    /// How the workers wake the coordinator when an event arrives while it sleeps.
    pub waker: Arc<Waker>,
    /// What each worker is doing now (shared with the liveness check).
    pub activity: Arc<Activity>,
    /// How long requests wait and take (shared with the workers).
    pub queue: Arc<QueueState>,
    /// The autoscaling signal, which counts refused requests as demand on the pool.
    pub demand: Arc<Demand>,
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
    inflight: InFlight,
    outbox: Outbox,
    conns: conns::Table,
    workers: Workers,
    /// Workers that have reported themselves started.
    started: usize,
    /// Receive buffers reused across turns: front requests, monitor events.
    frames: Vec<Message>,
    monitor_frames: Vec<Message>,
    /// The time of this turn (read once per turn, after the poll).
    now: Instant,
    /// Requests may be waiting on the front socket (the last read stopped at a full batch).
    front_ready: bool,
    /// When to look at the other inputs while busy.
    next_look: Instant,
    /// When per-turn figures are next published while busy.
    next_publish: Instant,
    /// The descriptors `wait` polls (fixed for the sockets' lives; asked of libzmq once).
    poll_fds: [RawFd; 5],
    last_read: Instant,
    next_resync: Instant,
    next_key_check: Instant,
    refusals: Refusals,
    /// How much refused work may still count as demand (a retry storm must not inflate it).
    allowance: RefusedAllowance,
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
            inflight: InFlight::new(
                config.max_inflight,
                config.max_inflight_bytes,
                metrics.inflight_gauge(),
                now,
            ),
            outbox: Outbox::new(
                config.max_connection_bytes,
                config.max_buffered_bytes,
                Arc::clone(&metrics),
            ),
            metrics,
            guard,
            // Turn often enough that liveness never mistakes an idle loop for a stuck one.
            heartbeat: (config.stuck_after / 4).min(Duration::from_millis(500)),
            conns,
            workers,
            started: 0,
            frames: Vec::with_capacity(8),
            monitor_frames: Vec::with_capacity(2),
            now,
            front_ready: false,
            next_look: now,
            next_publish: now,
            poll_fds: [-1; 5],
            last_read: now,
            next_resync: now,
            next_key_check: now + KEY_CHECK_EVERY,
            handshake_failed: false,
            allowance: RefusedAllowance::new(config.workers, now),
            config: config.clone(),
        }
    }

    /// Runs until drained or hard-stopped. On a clean exit every worker that is not stuck in
    /// its handler has been joined.
    pub fn run(mut self) -> Result<Exit, Error> {
        self.poll_fds = self.poll_fds()?;
        // A socket's notification fd only signals news after the socket has been found
        // empty once (libzmq's edge-triggered ZMQ_FD): look at each before the first poll.
        self.read_monitor()?;
        self.read_front()?;
        self.handle_zap();
        loop {
            let now = Instant::now();
            self.status.heartbeat_at(now);
            let Some(wake_at) = self.step_lifecycle(now) else {
                break;
            };
            if now >= self.next_resync {
                self.resync(now);
            }
            if now >= self.next_key_check {
                self.next_key_check = now + KEY_CHECK_EVERY;
                self.refresh_keys();
            }
            self.refusals.log_if_due(now);
            let recycle_at = self.recycle(now);
            let wait = wake_at
                .into_iter()
                .chain(recycle_at)
                .min()
                .map_or(self.heartbeat, |at| at.saturating_duration_since(now))
                .min(self.heartbeat)
                .min(self.next_resync.saturating_duration_since(now))
                .min(self.next_key_check.saturating_duration_since(now));
            // Replies sent since the front was last read may have consumed its notification:
            // libzmq wants ZMQ_EVENTS asked after any send or receive before its fd is polled.
            if !self.front_ready && self.outbox.sent_since_read {
                self.outbox.sent_since_read = false;
                self.front_ready = self
                    .sockets
                    .front
                    .get_events()
                    .is_ok_and(|e| e.contains(zmq::POLLIN));
            }
            let busy = self.front_ready || !self.workers.events.is_empty();
            // Publish this turn's counts before blocking, so a scrape sees them; while busy,
            // every millisecond at most.
            if !busy || now >= self.next_publish {
                self.next_publish = now + PUBLISH_EVERY;
                self.publish(now);
            }
            let ready = if busy {
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
        self.publish(Instant::now());
        let tally = &self.outbox.tally;
        log::info!(
            "read {} requests, answered {} ({} replies undeliverable: client gone or not reading)",
            tally.read,
            tally.answered,
            tally.undeliverable
        );
        let abandoned = self.stop_workers();
        Ok(Exit::Drained { abandoned })
    }

    /// Steps the lifecycle clock at `now`, acting on what it decides. `None` once drained;
    /// else the latest instant the clock must be stepped again at (`Some(None)`: no deadline).
    fn step_lifecycle(&mut self, now: Instant) -> Option<Option<Instant>> {
        loop {
            // Before each step, so every state the clock passes through is published (and
            // logged) in order, a stop signal's `stopping` included.
            self.publish_state();
            match self.clock.step(now, self.inflight.len(), self.last_read) {
                Step::Wait(at) => return Some(at),
                Step::BeginDrain => log::info!(
                    "draining {} in-flight requests, deadline {}",
                    self.inflight.len(),
                    humantime::format_duration(self.config.drain_timeout)
                ),
                Step::Expire => self.expire(),
                Step::Stop => {
                    self.publish_state();
                    return None;
                }
            }
        }
    }

    /// Publishes the clock's state: the one place the broker's state changes.
    fn publish_state(&mut self) {
        self.status.set(self.clock.state());
        if self.clock.stopping() {
            self.metrics.set_draining();
        }
    }

    /// Takes every waiting worker event: start-up reports and outcomes.
    fn read_events(&mut self) {
        while let Ok(event) = self.workers.events.try_recv() {
            match event {
                Event::Started(_) => {
                    self.started += 1;
                    if self.started == self.workers.handles.len() {
                        self.clock.started();
                    }
                }
                Event::Done { ticket, outcome } => self.on_done(ticket, outcome),
                // Only while stopping, read by stop_workers.
                Event::Stopped(_) => {}
            }
        }
    }

    /// Publishes per-turn figures: the recorder's counts and the held-requests integral.
    fn publish(&mut self, now: Instant) {
        self.inflight.publish(&self.metrics, now);
        self.rec.flush();
        // Readiness: not while new work would be refused (at --max-connections a pod stays
        // ready and refuses only the excess connections).
        self.status.set_shedding(self.guard.shedding());
    }

    /// Refreshes outbound estimates from the guard's measurements and publishes gauges.
    fn resync(&mut self, now: Instant) {
        self.next_resync = now + RESYNC_EVERY;
        self.conns.resync();
        self.metrics.set_connections(self.conns.open());
        let queue = &self.workers.queue;
        self.metrics.set_queue(queue.target(), queue.service());
    }

    /// Reads up to [`BATCH`] requests from the front socket; remembers whether more wait.
    fn read_front(&mut self) -> Result<(), Error> {
        // More may wait after a full batch; an empty socket signals its descriptor later.
        self.front_ready = true;
        self.outbox.sent_since_read = false;
        // Out of `self` while requests are handled, which needs the coordinator and the
        // buffer at once; put back after the batch, so its capacity is reused.
        let mut frames = std::mem::take(&mut self.frames);
        let mut result = Ok(());
        for _ in 0..BATCH {
            // One frame past the limit is kept: enough for inspect to refuse the request.
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
}
