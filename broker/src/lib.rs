//! The broker engine: binds the front socket, starts the worker pool and the admin server,
//! and runs the coordinator until the broker has drained. `main.rs` only parses flags, sets
//! up logging and signals, and maps the result to an exit code.

pub mod access;
pub mod admin;
pub mod bench;
pub mod client;
pub mod config;
pub mod coordinator;
pub mod lifecycle;
pub mod probe;
pub mod signals;

use std::process::ExitCode;
use std::sync::Arc;

use shared::Metrics;
use worker::handlers::{Cpu, Echo, Sleep};
use worker::{Activity, Handler, MakeHandler, Worker};

pub use config::Config;
pub use coordinator::Exit;
pub use lifecycle::{State, Status};
pub use signals::Signals;

/// The version exported in `broker_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The coordinator's end of the worker link.
const BACKEND: &str = "inproc://broker-workers";

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
    /// The coordinator failed.
    #[error(transparent)]
    Coordinator(#[from] coordinator::Error),
}

/// The broker's whole serve path, for `main` and for programs that embed the broker with
/// their own handler (examples/uppercase.rs): validate the flags (exit 2), set up logging
/// and signals, run, and map the outcome to an exit code (0 drained, 1 fatal, 128+N hard stop).
pub fn serve(
    args: config::ServeArgs,
    make_handler: impl FnOnce(&Config) -> Arc<dyn MakeHandler>,
) -> ExitCode {
    // Config errors exit 2 before anything is bound or started.
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = shared::logging::init(config.log_level, config.log_format) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    log_panics();
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
        HandlerKind::Cpu => Arc::new(move |_| {
            Box::new(Cpu {
                rounds,
                max_rounds: rounds.saturating_mul(100).max(1_000_000),
            }) as Box<dyn Handler>
        }),
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
        let metrics = Arc::new(metrics);
        let activity = Arc::new(Activity::new(config.workers));
        let status = Arc::new(Status::new(config.stuck_after, Arc::clone(&activity)));

        // Two contexts: terminating the front one flushes replies (bounded by its linger)
        // without waiting on a worker socket that a stuck handler keeps open.
        let front_ctx = zmq::Context::new();
        // The ZAP handler is bound before the front socket, so no connection is accepted
        // unchecked.
        let zap = if config.allow_from.is_empty() {
            None
        } else {
            log::info!(
                "accepting front connections only from {:?}",
                config.allow_from
            );
            let allow = access::Allowlist::new(config.allow_from.clone());
            Some(access::ZapHandler::bind(
                &front_ctx,
                allow,
                Arc::clone(&metrics),
            )?)
        };
        let front = front_socket(&front_ctx, config, zap.is_some())?;
        let admin = admin::Admin::spawn(config.admin, Arc::clone(&status), Arc::clone(&metrics))?;

        let backend_ctx = zmq::Context::new();
        let backend = backend_ctx
            .socket(zmq::ROUTER)
            .and_then(|s| s.set_router_mandatory(true).map(|()| s))
            .and_then(|s| s.set_linger(0).map(|()| s))
            .map_err(|source| Error::Socket {
                what: "backend",
                source,
            })?;
        backend.bind(BACKEND).map_err(|source| Error::Bind {
            endpoint: BACKEND.into(),
            source,
        })?;
        // Bounded by the in-flight limit, so pushing never blocks and never allocates.
        let (queue, jobs) = crossbeam_channel::bounded(config.max_inflight);
        let mut threads = Vec::with_capacity(config.workers);
        for index in 0..config.workers {
            threads.push(Worker::spawn(
                &backend_ctx,
                BACKEND,
                index as u32,
                self.make_handler.make(index),
                Arc::clone(&metrics),
                Arc::clone(&activity),
                jobs.clone(),
            )?);
        }
        log::info!(
            "front {} admin {} workers {} handler {} max-inflight {}",
            config.frontend,
            config.admin,
            config.workers,
            config.handler.name(),
            config.max_inflight
        );

        let coordinator = coordinator::Coordinator::new(
            config,
            front,
            backend,
            signals,
            zap,
            threads,
            (queue, jobs),
            Arc::clone(&activity),
            Arc::clone(&status),
            Arc::clone(&metrics),
        );
        let exit = coordinator.run();
        // The coordinator has closed its sockets; this waits at most the front linger for
        // queued replies to leave.
        drop(front_ctx);
        admin.stop();
        let exit = exit?;
        if matches!(exit, Exit::Drained { .. }) {
            log::info!("stopped cleanly");
        }
        Ok(exit)
    }
}

fn front_socket(ctx: &zmq::Context, config: &Config, zap: bool) -> Result<zmq::Socket, Error> {
    let socket_error = |source| Error::Socket {
        what: "front",
        source,
    };
    let socket = ctx.socket(zmq::ROUTER).map_err(socket_error)?;
    // Unknown or full peers fail the send instead of silently dropping or blocking.
    socket.set_router_mandatory(true).map_err(socket_error)?;
    // Bodies up to twice the limit are read and answered ERR too_large; a frame beyond that
    // is refused by libzmq (the connection is dropped) before it is buffered.
    let frame_limit = config
        .max_message_bytes
        .saturating_mul(2)
        .min(i64::MAX as usize) as i64;
    socket.set_maxmsgsize(frame_limit).map_err(socket_error)?;
    socket
        .set_linger(config.flush_linger.as_millis() as i32)
        .map_err(socket_error)?;
    // Notice clients that vanished without a FIN (a node died) instead of holding their pipes.
    socket.set_tcp_keepalive(1).map_err(socket_error)?;
    socket.set_tcp_keepalive_idle(60).map_err(socket_error)?;
    if zap {
        // With a domain set, libzmq asks the ZAP handler about every connection (NULL
        // mechanism included) and drops those it refuses.
        socket
            .set_zap_domain(access::ZAP_DOMAIN)
            .map_err(socket_error)?;
    }
    socket
        .bind(&config.frontend)
        .map_err(|source| Error::Bind {
            endpoint: config.frontend.clone(),
            source,
        })?;
    Ok(socket)
}
