//! The broker engine: binds the front socket, starts the worker pool, the guard and the admin
//! server, and runs the coordinator until the broker has drained. `main.rs` only picks the
//! subcommand; [`serve`] is the whole serve path, shared with programs that embed the broker.

pub mod access;
pub mod admin;
pub mod config;
pub mod conns;
pub mod coordinator;
pub mod demand;
pub mod guard;
pub mod lifecycle;
pub mod signals;
mod sys;

use std::process::ExitCode;
use std::sync::Arc;

use shared::Metrics;
use worker::handlers::{Cpu, Echo, Sleep};
use worker::{Activity, Handler, MakeHandler, Pool, Worker};

/// The client library: the retrying client, resolution, CURVE settings (the `tools` feature).
#[cfg(feature = "tools")]
pub use client;
pub use config::Config;
pub use coordinator::Exit;
pub use lifecycle::{State, Status};
pub use signals::Signals;

/// The version exported in `broker_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// SO_RCVBUF and SO_SNDBUF of each front connection (the kernel doubles them for its own
/// bookkeeping): enough for full speed on loopback and in a cluster, small enough that the
/// kernel never holds much on the broker's behalf.
pub const SOCKET_BUFFER_BYTES: i32 = 256 * 1024;
/// The front socket's receive high-water mark, in messages per connection (see `front_sockets`).
pub const FRONT_RCVHWM: i32 = 100;
/// Where the front socket's monitor publishes connection events.
const FRONT_MONITOR: &str = "inproc://broker-front-monitor";

/// Why the broker could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metrics registry rejected a metric (a programming error).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A socket could not be created or configured.
    #[error("{what} socket: {source}")]
    Socket {
        /// Which socket.
        what: &'static str,
        /// What libzmq said.
        source: zmq::Error,
    },
    /// The front endpoint could not be bound (address in use, bad address).
    #[error("cannot bind {endpoint}: {source}")]
    Bind {
        /// The endpoint.
        endpoint: String,
        /// What libzmq said.
        source: zmq::Error,
    },
    /// A worker could not start.
    #[error(transparent)]
    Worker(#[from] worker::Error),
    /// The admin server could not start.
    #[error(transparent)]
    Admin(#[from] admin::Error),
    /// The access-control handler could not start.
    #[error(transparent)]
    Access(#[from] access::Error),
    /// The guard thread, or the workers' eventfd, could not be set up.
    #[error("cannot start the guard thread or the workers' waker: {0}")]
    Guard(std::io::Error),
    /// The coordinator failed.
    #[error(transparent)]
    Coordinator(#[from] coordinator::Error),
}

/// Parses the command line as `T`: help and version print as usual (exit 0); any other error
/// prints clap's first line and returns exit code 2, so a bad flag costs one line.
pub fn parse_args<T: clap::Parser>() -> Result<T, ExitCode> {
    T::try_parse().map_err(|e| {
        use clap::error::ErrorKind;
        if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        let text = e.render().to_string();
        eprintln!(
            "{}",
            text.lines().next().unwrap_or("error: invalid arguments")
        );
        ExitCode::from(2)
    })
}

/// The broker's whole serve path, for `main` and for programs that embed the broker with
/// their own handler (examples/uppercase.rs): validate the flags (exit 2), set up logging
/// and signals, run, and map the outcome to an exit code (0 drained, 1 fatal, 128+N hard stop).
pub fn serve(
    args: config::ServeArgs,
    make_handler: impl FnOnce(&Config) -> Arc<dyn MakeHandler>,
) -> ExitCode {
    use clap::CommandFactory;
    serve_with(
        args,
        make_handler,
        &config::known_env(&config::ServeCli::command()),
    )
}

/// [`serve`], with `known_env` the environment variables the program's own command line reads
/// (the broker binary's include its tools'): any other `BROKER_*` variable is named in a
/// warning at start, with the nearest known one (`BROKER_WORKER`: did you mean
/// `BROKER_WORKERS`?), since clap ignores it silently.
pub fn serve_with(
    args: config::ServeArgs,
    make_handler: impl FnOnce(&Config) -> Arc<dyn MakeHandler>,
    known_env: &[String],
) -> ExitCode {
    // Config errors exit 2 before anything is bound or started.
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = raise_fd_limit(config.fds_needed()) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = shared::logging::init(config.log_level, config.log_format) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    log_panics();
    let vars: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .collect();
    for (name, nearest) in config::unknown_env(&vars, known_env) {
        match nearest {
            Some(known) => log::warn!("{name} is not a setting (did you mean {known}?); ignored"),
            None => log::warn!("{name} is not a setting; ignored"),
        }
    }
    // Return large request buffers to the OS when freed (see sys::tune_malloc): 128 KiB is
    // glibc's default threshold, fixed so it cannot drift up; two arenas for the threads.
    sys::tune_malloc(128 * 1024, 2);
    // Before any thread exists, so every thread inherits the blocked mask.
    let signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let handler = make_handler(&config);
    match Broker::new(config, handler).run(signals) {
        Ok(Exit::Drained { .. }) => ExitCode::SUCCESS,
        Ok(Exit::HardStop(signal)) => ExitCode::from(128 + signal as u8),
        Err(e) => {
            log::error!("fatal: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft open-files limit to the hard one if needed, and refuses a configuration
/// that needs more descriptors than the hard limit allows.
fn raise_fd_limit(needed: u64) -> Result<(), String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| format!("cannot read the open-files limit: {e}"))?;
    if needed > hard {
        return Err(format!(
            "invalid value for --max-connections: the settings need {needed} file descriptors \
             (two per connection) but the hard limit is {hard} (ulimit -Hn)"
        ));
    }
    if needed > soft {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .map_err(|e| format!("cannot raise the open-files limit to {hard}: {e}"))?;
    }
    Ok(())
}

/// Handler panics are caught and answered `ERR handler_failed`; log them in the configured
/// format instead of raw stderr text.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        log::error!(
            "panic in thread {}: {info}",
            thread.name().unwrap_or("unnamed")
        );
    }));
}

/// The built-in handler chosen by `--handler`.
pub fn builtin_handler(config: &Config) -> Arc<dyn MakeHandler> {
    use config::HandlerKind;
    let (max_sleep, rounds) = (config.max_sleep, config.cpu_rounds);
    match config.handler {
        HandlerKind::Echo => Arc::new(|_| Box::new(Echo) as Box<dyn Handler>),
        HandlerKind::Sleep => {
            Arc::new(move |_| Box::new(Sleep { max: max_sleep }) as Box<dyn Handler>)
        }
        HandlerKind::Cpu => Arc::new(move |_| Box::new(Cpu { rounds }) as Box<dyn Handler>),
    }
}

/// A broker ready to run.
pub struct Broker {
    config: Config,
    make_handler: Arc<dyn MakeHandler>,
}

impl Broker {
    /// A broker whose workers run handlers made by `make_handler`.
    pub fn new(config: Config, make_handler: Arc<dyn MakeHandler>) -> Broker {
        Broker {
            config,
            make_handler,
        }
    }

    /// Binds, serves until a stop signal has drained it, and returns how it ended.
    ///
    /// `signals` must have been installed before any thread was started.
    pub fn run(self, signals: Signals) -> Result<Exit, Error> {
        let config = &self.config;
        let mut metrics = Metrics::new(VERSION)?;
        metrics.set_enabled(config.metrics);
        metrics.set_workers(config.workers);
        metrics.set_memory_limit(config.memory_limit);
        let activity = Arc::new(Activity::new(config.workers));
        let demand = Arc::new(demand::Demand::new(Arc::clone(&activity)));
        metrics
            .registry()
            .register(Box::new(demand::DemandCollector::new(Arc::clone(&demand))?))?;
        let metrics = Arc::new(metrics);
        let status = Arc::new(Status::new(config.stuck_after, Arc::clone(&activity)));

        // One context, for the front socket, its monitor and the ZAP handler (workers use
        // channels): terminating it at exit flushes replies, bounded by the front's linger.
        let front_ctx = zmq::Context::new();
        // The ZAP handler is bound before the front socket, so no connection is accepted
        // unchecked.
        let policy = access::Policy {
            networks: (!config.allow_from.is_empty())
                .then(|| access::Allowlist::new(config.allow_from.clone())),
            keys: config.curve.as_ref().and_then(|c| c.allow_keys.clone()),
        };
        if !config.allow_from.is_empty() {
            log::info!(
                "accepting front connections only from {:?}",
                config.allow_from
            );
        }
        if let Some(curve) = &config.curve {
            log::info!(
                "CURVE on the front socket, public key {}; {}",
                shared::curve::encode_key(&curve.public),
                curve.allow_keys.as_ref().map_or(
                    "any client key accepted".to_owned(),
                    |keys| format!("{} client keys allowed", keys.len())
                )
            );
        }
        let zap = if policy.checks() {
            Some(access::ZapHandler::bind(
                &front_ctx,
                policy,
                Arc::clone(&metrics),
            )?)
        } else {
            None
        };
        // The admin port first: if it is taken, nothing has been bound for clients yet.
        let admin = admin::Admin::spawn(config.admin, Arc::clone(&status), Arc::clone(&metrics))?;
        if let Some(path) = config.frontend.ipc_path() {
            ipc_path_free(path)?;
        }
        let (front, monitor) = front_sockets(&front_ctx, config, zap.is_some())?;
        let registry = Arc::new(conns::Registry::default());
        let conns = conns::Table::new(
            config.max_connections,
            config.frontend.port(),
            Arc::clone(&registry),
        )
        .with_age_limit(config.max_connection_age, config.max_connection_age_grace);
        let guard_shared = Arc::new(guard::Shared::default());
        let guard = guard::Guard::spawn(
            guard::Limits {
                connection_bytes: config.max_connection_bytes as u64,
                buffered_bytes: config.max_buffered_bytes as u64,
                stall_timeout: config.stall_timeout,
                memory_limit: config.memory_limit,
            },
            registry,
            Arc::clone(&guard_shared),
            Arc::clone(&metrics),
        )
        .map_err(Error::Guard)?;

        // Requests go to the workers through the job queue (the first free worker takes the
        // next), and outcomes come back over a channel. Both unbounded in type, bounded in
        // use: the in-flight table is checked before anything is queued.
        let jobs = Arc::new(worker::Jobs::new());
        let (events_tx, events) = crossbeam_channel::unbounded();
        let queue = Arc::new(worker::QueueState::new(
            config.queue_target,
            config.queue_interval,
        ));
        let waker = Arc::new(worker::Waker::new().map_err(Error::Guard)?);
        let pool = Pool {
            jobs: Arc::clone(&jobs),
            events: events_tx,
            waker: Arc::clone(&waker),
            metrics: Arc::clone(&metrics),
            activity: Arc::clone(&activity),
            queue: Arc::clone(&queue),
            max_reply_bytes: config.max_reply_bytes,
        };
        // This thread becomes the coordinator; the workers inherit the policy from it. libzmq's
        // I/O thread, the guard and the admin thread already run and keep the default one.
        if let Err(e) = sys::batch_scheduling() {
            log::debug!("SCHED_BATCH refused ({e}): running with the default policy");
        }
        let mut handles = Vec::with_capacity(config.workers);
        for index in 0..config.workers {
            handles.push(Worker::spawn(
                &pool,
                index as u32,
                self.make_handler.make(index),
            )?);
        }
        drop(pool);
        log::info!(
            "front {} admin {} workers {} handler {} max-inflight {} ({} MiB) \
             max-connections {} max-connection-age {} memory-limit {}",
            config.frontend,
            config.admin,
            config.workers,
            config.handler.name(),
            config.max_inflight,
            config.max_inflight_bytes >> 20,
            config.max_connections,
            config
                .max_connection_age
                .map_or("never".to_owned(), |age| format!(
                    "{} (grace {})",
                    humantime::format_duration(age),
                    humantime::format_duration(config.max_connection_age_grace)
                )),
            config
                .memory_limit
                .map_or("none".to_owned(), |l| format!("{} MiB", l >> 20)),
        );

        let coordinator = coordinator::Coordinator::new(
            config,
            coordinator::Sockets {
                front,
                monitor,
                zap,
                signals,
            },
            coordinator::Workers {
                handles,
                jobs,
                events,
                waker,
                activity,
                queue,
                demand,
            },
            conns,
            Arc::clone(&status),
            Arc::clone(&metrics),
            guard_shared,
        );
        let exit = coordinator.run();
        // The coordinator has closed its sockets; this waits at most the front linger for
        // queued replies to leave.
        drop(front_ctx);
        guard.stop();
        admin.stop();
        if let Some(path) = config.frontend.ipc_path() {
            // libzmq leaves the socket file behind.
            let _ = std::fs::remove_file(path);
        }
        let exit = exit?;
        if matches!(exit, Exit::Drained { .. }) {
            log::info!("stopped cleanly");
        }
        Ok(exit)
    }
}

/// Refuses an ipc:// path another process is listening on: libzmq would silently take the
/// path over, leaving the other broker running but unreachable. A stale file (nobody
/// listening) is fine: libzmq replaces it.
fn ipc_path_free(path: &str) -> Result<(), Error> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(Error::Bind {
            endpoint: format!("ipc://{path}"),
            source: zmq::Error::EADDRINUSE,
        }),
        Err(_) => Ok(()),
    }
}

/// The front ROUTER, configured and bound, and the PAIR that reads its connection events.
fn front_sockets(
    ctx: &zmq::Context,
    config: &Config,
    zap: bool,
) -> Result<(zmq::Socket, zmq::Socket), Error> {
    let socket_error = |source| Error::Socket {
        what: "front",
        source,
    };
    let socket = ctx.socket(zmq::ROUTER).map_err(socket_error)?;
    // Unknown or full peers fail the send instead of silently dropping or blocking.
    socket.set_router_mandatory(true).map_err(socket_error)?;
    // No message count limits a peer's replies: libzmq's default (1000, with credit returned
    // in batches) dropped replies to a client that read everything but kept ~500 requests
    // outstanding. The byte bounds decide instead (--max-connection-bytes, counting libzmq's
    // per-frame overhead, and --max-buffered-bytes), and admission refuses work whose reply
    // would not fit.
    socket.set_sndhwm(0).map_err(socket_error)?;
    // Complete requests libzmq reads ahead of the coordinator, per connection. Its default
    // (1000) let a client pipelining 8 KiB requests put 8 MB in libzmq's queue while the
    // coordinator was busy, which the guard then reset as over --max-connection-bytes; beyond
    // this many, TCP flow control holds the rest in the client.
    socket.set_rcvhwm(FRONT_RCVHWM).map_err(socket_error)?;
    // A frame beyond this is refused by libzmq (the connection is dropped) before it is
    // buffered; libzmq allocates a frame at its declared size.
    socket
        .set_maxmsgsize(config.frame_limit.min(i64::MAX as usize) as i64)
        .map_err(socket_error)?;
    socket
        .set_linger(config.flush_linger.as_millis() as i32)
        .map_err(socket_error)?;
    // A connection that never finishes its handshake is dropped after the stall timeout.
    socket
        .set_handshake_ivl(config.stall_timeout.as_millis().min(i32::MAX as u128) as i32)
        .map_err(socket_error)?;
    // Fixed kernel buffers instead of autotuned ones (up to 6 MiB in, 4 MiB out on Linux):
    // TCP flow control then holds back a client that sends faster than the broker reads,
    // instead of the kernel buffering megabytes that count against the connection's bounds.
    socket
        .set_rcvbuf(SOCKET_BUFFER_BYTES)
        .map_err(socket_error)?;
    socket
        .set_sndbuf(SOCKET_BUFFER_BYTES)
        .map_err(socket_error)?;
    // Room in the accept queue for every allowed connection arriving at once (a client fleet
    // restarting); libzmq's default of 100 makes the kernel drop the rest of a burst.
    socket
        .set_backlog(config.max_connections.clamp(100, 4096) as i32)
        .map_err(socket_error)?;
    // Notice clients that vanished without a FIN (a node died) instead of holding their pipes.
    socket.set_tcp_keepalive(1).map_err(socket_error)?;
    socket.set_tcp_keepalive_idle(60).map_err(socket_error)?;
    if config.frontend.ipv6() {
        socket.set_ipv6(true).map_err(socket_error)?;
    }
    if let Some(curve) = &config.curve {
        // A CURVE server refuses every other mechanism: plaintext clients fail the handshake.
        socket.set_curve_server(true).map_err(socket_error)?;
        socket
            .set_curve_secretkey(&curve.secret.0)
            .map_err(socket_error)?;
    }
    if zap {
        // With a domain set, libzmq asks the ZAP handler about every connection (NULL
        // mechanism included) and drops those it refuses.
        socket
            .set_zap_domain(access::ZAP_DOMAIN)
            .map_err(socket_error)?;
    }
    // The monitor is attached before the bind, so no connection goes unseen. Handshakes
    // that fail (wrong server key, plaintext client) are counted as refusals.
    let events = zmq::SocketEvent::ACCEPTED as i32
        | zmq::SocketEvent::DISCONNECTED as i32
        | zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL as i32
        | zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL as i32;
    socket
        .monitor(FRONT_MONITOR, events)
        .map_err(socket_error)?;
    let monitor_error = |source| Error::Socket {
        what: "monitor",
        source,
    };
    let monitor = ctx.socket(zmq::PAIR).map_err(monitor_error)?;
    // Unlimited: libzmq's I/O thread blocks when a monitor pipe is full, which would stall
    // every connection; events are small and the coordinator reads them every turn.
    monitor.set_rcvhwm(0).map_err(monitor_error)?;
    monitor.set_linger(0).map_err(monitor_error)?;
    monitor.connect(FRONT_MONITOR).map_err(monitor_error)?;
    socket
        .bind(config.frontend.as_str())
        .map_err(|source| Error::Bind {
            endpoint: config.frontend.to_string(),
            source,
        })?;
    Ok((socket, monitor))
}
