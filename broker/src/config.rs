//! Command-line and environment configuration: clap flags (each with a `BROKER_*` env var),
//! their defaults as named constants, and the validated [`Config`] the rest of the code takes.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use log::LevelFilter;
use shared::logging::LogFormat;

/// Defaults, named once; the README's configuration table mirrors them.
pub mod defaults {
    use std::time::Duration;

    /// `--frontend`
    pub const FRONTEND: &str = "tcp://0.0.0.0:5555";
    /// `--admin`
    pub const ADMIN: &str = "0.0.0.0:8000";
    /// `--max-inflight` is this many per worker unless set.
    pub const INFLIGHT_PER_WORKER: usize = 64;
    /// `--max-message-bytes`
    pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
    /// `--max-sleep`
    pub const MAX_SLEEP: Duration = Duration::from_secs(10);
    /// `--shutdown-delay`
    pub const SHUTDOWN_DELAY: Duration = Duration::ZERO;
    /// `--drain-timeout`
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--stuck-after`
    pub const STUCK_AFTER: Duration = Duration::from_secs(30);
    /// `--cpu-rounds`
    pub const CPU_ROUNDS: u64 = 10_000;
    /// How long queued replies may take to leave at exit (the front socket's linger).
    pub const FLUSH_LINGER: Duration = Duration::from_secs(1);
}

/// A ZeroMQ request/reply worker-pool broker for Kubernetes.
#[derive(Debug, Parser)]
#[command(
    name = "broker",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Run a tool instead of the broker.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Broker flags (when no subcommand is given).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands besides serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Health-check a running broker (for exec probes): exit 0 on a reply, 1 otherwise.
    Probe(ProbeArgs),
    /// Load a running broker and report throughput and latency.
    Bench(crate::bench::BenchArgs),
}

/// Which built-in handler the workers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HandlerKind {
    /// Reply with the request body.
    Echo,
    /// Sleep for the milliseconds in the first frame (capped by --max-sleep), then echo.
    Sleep,
    /// Burn a fixed amount of CPU (--cpu-rounds, or rounds in the first frame), then echo.
    Cpu,
}

impl HandlerKind {
    /// The name `--handler` takes.
    pub fn name(self) -> &'static str {
        match self {
            HandlerKind::Echo => "echo",
            HandlerKind::Sleep => "sleep",
            HandlerKind::Cpu => "cpu",
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: time, level, target, message.
    Json,
}

/// Log level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevelArg {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Lifecycle and configuration.
    Info,
    /// Per-connection and per-worker detail.
    Debug,
    /// Everything.
    Trace,
}

/// Flags of the broker itself.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// ZeroMQ endpoint the front ROUTER socket binds.
    #[arg(long, env = "BROKER_FRONTEND", default_value = defaults::FRONTEND)]
    pub frontend: String,
    /// Address of the admin HTTP server (/metrics, /livez, /readyz).
    #[arg(long, env = "BROKER_ADMIN", default_value = defaults::ADMIN)]
    pub admin: SocketAddr,
    /// Worker threads [default: the CPUs this process may use]
    #[arg(long, env = "BROKER_WORKERS")]
    pub workers: Option<NonZeroUsize>,
    /// Handler the workers run.
    #[arg(long, env = "BROKER_HANDLER", value_enum, default_value = "echo")]
    pub handler: HandlerKind,
    /// Longest sleep the `sleep` handler grants.
    #[arg(long, env = "BROKER_MAX_SLEEP", value_parser = parse_duration, default_value = "10s")]
    pub max_sleep: Duration,
    /// Rounds of work per request for the `cpu` handler when the request does not say.
    #[arg(long, env = "BROKER_CPU_ROUNDS", default_value_t = defaults::CPU_ROUNDS)]
    pub cpu_rounds: u64,
    /// Requests held at once (queued + running); beyond it `ERR overloaded` [default: 64 per worker]
    #[arg(long, env = "BROKER_MAX_INFLIGHT")]
    pub max_inflight: Option<NonZeroUsize>,
    /// Largest request body in bytes; larger gets `ERR too_large`.
    #[arg(long, env = "BROKER_MAX_MESSAGE_BYTES", default_value_t = defaults::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// After SIGTERM, keep serving (while not ready) this long before draining.
    #[arg(long, env = "BROKER_SHUTDOWN_DELAY", value_parser = parse_duration, default_value = "0s")]
    pub shutdown_delay: Duration,
    /// Longest wait for in-flight requests once draining; then `ERR timeout`.
    #[arg(long, env = "BROKER_DRAIN_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
    /// /livez fails when the pipeline makes no progress for this long.
    #[arg(long, env = "BROKER_STUCK_AFTER", value_parser = parse_duration, default_value = "30s")]
    pub stuck_after: Duration,
    /// Log level.
    #[arg(
        long,
        alias = "loglevel",
        env = "BROKER_LOG_LEVEL",
        value_enum,
        default_value = "info"
    )]
    pub log_level: LogLevelArg,
    /// Log format.
    #[arg(long, env = "BROKER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormatArg,
    /// Accept front connections only from this network (CIDR; repeat, or comma-separate in
    /// the env var). Unset: accept all (use a NetworkPolicy).
    #[arg(long = "allow-from", env = "BROKER_ALLOW_FROM", value_delimiter = ',')]
    pub allow_from: Vec<ipnet::IpNet>,
    /// Skip per-request metric updates (only to measure their cost; breaks autoscaling).
    #[arg(long, env = "BROKER_NO_METRICS", hide = true)]
    pub no_metrics: bool,
}

/// Flags of `broker probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Broker front endpoint to send the health request to.
    #[arg(
        long,
        env = "BROKER_PROBE_ENDPOINT",
        default_value = "tcp://127.0.0.1:5555"
    )]
    pub endpoint: String,
    /// Give up (exit 1) when no reply came within this time.
    #[arg(long, env = "BROKER_PROBE_TIMEOUT", value_parser = parse_duration, default_value = "500ms")]
    pub timeout: Duration,
    /// Probe this admin URL (e.g. http://127.0.0.1:8000/livez) instead; 2xx is healthy.
    #[arg(long, env = "BROKER_PROBE_HTTP")]
    pub http: Option<String>,
}

/// Parses `500ms`, `5s`, `1m` or a bare `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{e} (expected a duration such as 500ms, 5s or 1m)"))
}

/// A flag combination that parses but cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--max-message-bytes 0`
    #[error("invalid value for --max-message-bytes: must be at least 1")]
    ZeroMessageBytes,
    /// The endpoint is not `transport://address`.
    #[error(
        "invalid value '{0}' for --frontend: expected transport://address, e.g. tcp://0.0.0.0:5555"
    )]
    BadEndpoint(String),
    /// `--drain-timeout 0`
    #[error("invalid value for --drain-timeout: must be more than 0")]
    ZeroDrainTimeout,
    /// `--stuck-after 0`
    #[error("invalid value for --stuck-after: must be more than 0")]
    ZeroStuckAfter,
    /// The CPU count could not be read and --workers was not given.
    #[error("cannot tell how many CPUs this process may use ({0}); set --workers")]
    NoParallelism(std::io::Error),
}

/// Validated broker configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Front socket endpoint.
    pub frontend: String,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    /// Pool size.
    pub workers: usize,
    /// Built-in handler.
    pub handler: HandlerKind,
    /// `sleep` handler cap.
    pub max_sleep: Duration,
    /// `cpu` handler default rounds.
    pub cpu_rounds: u64,
    /// Requests held at once.
    pub max_inflight: usize,
    /// Largest request body.
    pub max_message_bytes: usize,
    /// Serve-while-not-ready time after SIGTERM.
    pub shutdown_delay: Duration,
    /// Drain deadline.
    pub drain_timeout: Duration,
    /// Liveness threshold.
    pub stuck_after: Duration,
    /// Front socket linger at exit.
    pub flush_linger: Duration,
    /// Log level.
    pub log_level: LevelFilter,
    /// Log format.
    pub log_format: LogFormat,
    /// Per-request metric updates on.
    pub metrics: bool,
    /// Networks allowed to connect to the front socket; empty allows all.
    pub allow_from: Vec<ipnet::IpNet>,
}

impl Config {
    /// Validates flags into a configuration, filling in CPU-derived defaults.
    pub fn from_args(args: ServeArgs) -> Result<Config, ConfigError> {
        let workers = match args.workers {
            Some(n) => n.get(),
            // cgroup-aware: follows the container's CPU quota.
            None => std::thread::available_parallelism()
                .map_err(ConfigError::NoParallelism)?
                .get(),
        };
        if args.max_message_bytes == 0 {
            return Err(ConfigError::ZeroMessageBytes);
        }
        if !args.frontend.contains("://") {
            return Err(ConfigError::BadEndpoint(args.frontend));
        }
        if args.drain_timeout.is_zero() {
            return Err(ConfigError::ZeroDrainTimeout);
        }
        if args.stuck_after.is_zero() {
            return Err(ConfigError::ZeroStuckAfter);
        }
        Ok(Config {
            max_inflight: args
                .max_inflight
                .map_or(workers * defaults::INFLIGHT_PER_WORKER, NonZeroUsize::get),
            workers,
            frontend: args.frontend,
            admin: args.admin,
            handler: args.handler,
            max_sleep: args.max_sleep,
            cpu_rounds: args.cpu_rounds,
            max_message_bytes: args.max_message_bytes,
            shutdown_delay: args.shutdown_delay,
            drain_timeout: args.drain_timeout,
            stuck_after: args.stuck_after,
            metrics: !args.no_metrics,
            allow_from: args.allow_from,
            flush_linger: defaults::FLUSH_LINGER,
            log_level: match args.log_level {
                LogLevelArg::Off => LevelFilter::Off,
                LogLevelArg::Error => LevelFilter::Error,
                LogLevelArg::Warn => LevelFilter::Warn,
                LogLevelArg::Info => LevelFilter::Info,
                LogLevelArg::Debug => LevelFilter::Debug,
                LogLevelArg::Trace => LevelFilter::Trace,
            },
            log_format: match args.log_format {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            },
        })
    }

    /// A configuration with every default, for embedding and tests.
    pub fn with_defaults() -> Result<Config, ConfigError> {
        Config::from_args(ServeArgs::parse_from(["broker"]))
    }
}

impl ServeArgs {
    fn parse_from<I, T>(args: I) -> ServeArgs
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            serve: ServeArgs,
        }
        Wrapper::parse_from(args).serve
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn inflight_defaults_to_64_per_worker() {
        let mut args = ServeArgs::parse_from(["broker", "--workers", "3"]);
        let config = Config::from_args(args).expect("valid");
        assert_eq!(config.max_inflight, 192);
        args = ServeArgs::parse_from(["broker", "--max-message-bytes", "0"]);
        assert!(matches!(
            Config::from_args(args),
            Err(ConfigError::ZeroMessageBytes)
        ));
    }
}
