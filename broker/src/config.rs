//! Command-line and environment configuration: clap flags (each with a `BROKER_*` env var),
//! their defaults and accepted ranges as named constants, and the validated [`Config`] the
//! rest of the code takes. Every value accepted here works: anything else is refused with
//! exit code 2 and one line naming the flag, before anything binds.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{BoolishValueParser, EnumValueParser, PathBufValueParser};
use clap::{Args, Parser, ValueEnum};
use log::LevelFilter;
use shared::curve::{self, Key, SecretKey};
use shared::logging::LogFormat;
use shared::parse::{bounded_duration, count, Trimmed};

use crate::access::AllowKeys;

/// Defaults and limits, named once; the README's configuration table mirrors them.
pub mod defaults {
    use std::time::Duration;

    /// `--frontend`
    pub const FRONTEND: &str = "tcp://0.0.0.0:5555";
    /// `--admin`
    pub const ADMIN: &str = "0.0.0.0:8000";
    /// `--max-inflight`
    pub const MAX_INFLIGHT: usize = 4096;
    /// `--max-inflight-bytes`
    pub const MAX_INFLIGHT_BYTES: &str = "64MiB";
    /// `--max-message-bytes`
    pub const MAX_MESSAGE_BYTES: &str = "1MiB";
    /// `--max-connections`
    pub const MAX_CONNECTIONS: usize = 1000;
    /// `--max-connection-bytes`
    pub const MAX_CONNECTION_BYTES: &str = "4MiB";
    /// `--max-buffered-bytes`
    pub const MAX_BUFFERED_BYTES: &str = "64MiB";
    /// `--stall-timeout`
    pub const STALL_TIMEOUT: &str = "10s";
    /// `--max-sleep`
    pub const MAX_SLEEP: &str = "10s";
    /// `--shutdown-delay`
    pub const SHUTDOWN_DELAY: &str = "0s";
    /// `--drain-timeout`
    pub const DRAIN_TIMEOUT: &str = "10s";
    /// `--queue-target` (chosen from measurements: docs/architecture.md, "Overload")
    pub const QUEUE_TARGET: &str = "20ms";
    /// `--queue-interval`
    pub const QUEUE_INTERVAL: &str = "100ms";
    /// `--stuck-after`
    pub const STUCK_AFTER: &str = "30s";
    /// `--max-connection-age`: never.
    pub const MAX_CONNECTION_AGE: &str = "0s";
    /// `--max-connection-age-grace`: as long as the default `--drain-timeout`, the time a
    /// held request is given to finish before it is given up.
    pub const MAX_CONNECTION_AGE_GRACE: &str = "10s";
    /// `--cpu-rounds`
    pub const CPU_ROUNDS: u64 = 10_000;
    /// `--handler`
    pub const HANDLER: &str = "echo";
    /// `--log-level`
    pub const LOG_LEVEL: &str = "info";
    /// `--log-format`
    pub const LOG_FORMAT: &str = "text";
    /// How long queued replies may take to leave at exit (the front socket's linger).
    pub const FLUSH_LINGER: Duration = Duration::from_secs(1);
}

/// The largest value each flag accepts: beyond these a setting cannot work on any machine
/// (a timer past the end of `Instant`, more threads or sockets than libzmq or the kernel allow).
pub mod limits {
    use std::time::Duration;

    /// Longest `--shutdown-delay`, `--drain-timeout`, `--max-sleep`, `--stall-timeout`.
    pub const MAX_WAIT: Duration = Duration::from_secs(3600);
    /// Shortest `--queue-target` and `--queue-interval`: below a millisecond, scheduling noise
    /// alone would make a queue look standing and shed healthy requests.
    pub const MIN_QUEUE_TIME: Duration = Duration::from_millis(1);
    /// Longest `--stuck-after`.
    pub const MAX_STUCK_AFTER: Duration = Duration::from_secs(86_400);
    /// Longest `--max-connection-age`.
    pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(86_400);
    /// Shortest `--max-connection-age` but 0: a client's libzmq waits 100 to 200 ms before it
    /// reconnects (`ZMQ_RECONNECT_IVL` and its jitter), so a shorter age would have clients
    /// spend more than a tenth of their time reconnecting.
    pub const MIN_CONNECTION_AGE: Duration = Duration::from_secs(1);
    /// Most `--workers`: each is a thread with its own stack (2 MiB of address space); a
    /// thousand is past any pool that helps on one pod.
    pub const MAX_WORKERS: usize = 1000;
    /// Most `--max-inflight`.
    pub const MAX_INFLIGHT: usize = 1_000_000;
    /// Most `--max-connections`.
    pub const MAX_CONNECTIONS: usize = 100_000;
    /// Largest `--max-message-bytes` (libzmq allocates a frame at its declared size).
    pub const MAX_MESSAGE_BYTES: u64 = 256 * 1024 * 1024;
    /// Largest byte budget of any kind.
    pub const MAX_BUDGET: u64 = 1 << 40;
    /// Most `--cpu-rounds`.
    pub const MAX_CPU_ROUNDS: u64 = 1_000_000_000;
    /// The smallest frame limit set on the front socket: the ZMTP handshake (a READY command
    /// with the peer's metadata) must fit, or no client can connect.
    pub const MIN_FRAME_LIMIT: u64 = 64 * 1024;
    /// What a request of `--max-message-bytes` may cost in the in-flight table beyond its
    /// bytes (a 255-byte routing id and three frames' overhead fit): `--max-inflight-bytes`
    /// must be at least the message limit plus this.
    pub const INFLIGHT_SLACK: u64 = 1024;
    /// Smallest `--max-message-bytes`: a health request (`broker probe`) and its envelope must
    /// fit, or the probes fail on a healthy broker.
    pub const MIN_MESSAGE_BYTES: u64 = 64;
    /// Shortest `--stall-timeout` and `--stuck-after`: below a second, scheduling delays on a
    /// busy node look like stalls, and healthy clients or the pod itself would be reset.
    pub const MIN_PATIENCE: Duration = Duration::from_secs(1);
    /// Smallest `--memory-limit`: the broker at rest takes about 8 MiB, and a limit it sits
    /// near would refuse every request while the probes say it is healthy.
    pub const MIN_MEMORY_LIMIT: u64 = 32 << 20;
}

/// The broker's own command line, without the tools' subcommands: for programs that embed
/// the broker with their own handler (examples/uppercase.rs).
#[derive(Debug, Parser)]
#[command(
    name = "broker",
    version,
    about = "A ZeroMQ request/reply worker-pool broker"
)]
pub struct ServeCli {
    /// The broker's flags.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Which built-in handler the workers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HandlerKind {
    /// Reply with the request body.
    Echo,
    /// Sleep for the milliseconds in the first frame (capped by --max-sleep), then echo.
    Sleep,
    /// Burn --cpu-rounds hash rounds (fewer if the first frame asks), then echo.
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
#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    /// ZeroMQ endpoint the front ROUTER binds: tcp://IP:PORT, tcp://*:PORT or ipc://PATH.
    #[arg(long, env = "BROKER_FRONTEND", default_value = defaults::FRONTEND, value_parser = Trimmed(parse_endpoint))]
    pub frontend: Endpoint,
    /// Address of the admin HTTP server (/metrics, /livez, /readyz).
    #[arg(long, env = "BROKER_ADMIN", default_value = defaults::ADMIN, value_parser = Trimmed(parse_admin))]
    pub admin: SocketAddr,
    /// Worker threads, 1 to 1000 [default: the CPUs this process may use]
    #[arg(long, env = "BROKER_WORKERS", value_parser = Trimmed(parse_workers))]
    pub workers: Option<NonZeroUsize>,
    /// Handler the workers run.
    #[arg(long, env = "BROKER_HANDLER", value_parser = Trimmed(EnumValueParser::<HandlerKind>::new()), ignore_case = true, default_value = defaults::HANDLER)]
    pub handler: HandlerKind,
    /// Longest sleep the `sleep` handler grants (at most 1h).
    #[arg(long, env = "BROKER_MAX_SLEEP", value_parser = Trimmed(parse_wait), default_value = defaults::MAX_SLEEP)]
    pub max_sleep: Duration,
    /// Hash rounds per request for the `cpu` handler; a request may ask for fewer.
    #[arg(long, env = "BROKER_CPU_ROUNDS", default_value_t = defaults::CPU_ROUNDS,
          value_parser = Trimmed(clap::value_parser!(u64).range(0..=limits::MAX_CPU_ROUNDS)))]
    pub cpu_rounds: u64,
    /// Requests held at once (queued + running), 1 to 1,000,000; beyond it `ERR overloaded`.
    #[arg(long, env = "BROKER_MAX_INFLIGHT", default_value_t = defaults::MAX_INFLIGHT,
          value_parser = Trimmed(count::<1, { limits::MAX_INFLIGHT }>))]
    pub max_inflight: usize,
    /// Request bytes held at once (each frame counts its size plus 64); beyond it
    /// `ERR overloaded`. Sizes take 1048576, 1MiB, 1Mi, 1MB (=10^6).
    #[arg(long, env = "BROKER_MAX_INFLIGHT_BYTES", default_value = defaults::MAX_INFLIGHT_BYTES, value_parser = Trimmed(parse_size))]
    pub max_inflight_bytes: u64,
    /// Largest request (body plus envelope) and, doubled (at least 64KiB), largest reply;
    /// larger requests get `ERR too_large`.
    #[arg(long, env = "BROKER_MAX_MESSAGE_BYTES", default_value = defaults::MAX_MESSAGE_BYTES, value_parser = Trimmed(parse_size))]
    pub max_message_bytes: u64,
    /// Front connections at once; more are closed on arrival and counted.
    #[arg(long, env = "BROKER_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS,
          value_parser = Trimmed(count::<1, { limits::MAX_CONNECTIONS }>))]
    pub max_connections: usize,
    /// Bytes one connection may hold in the broker in each direction (requests still arriving
    /// or unread, replies not yet taken by the client); an inbound excess resets the
    /// connection, an outbound one drops the reply.
    #[arg(long, env = "BROKER_MAX_CONNECTION_BYTES", default_value = defaults::MAX_CONNECTION_BYTES, value_parser = Trimmed(parse_size))]
    pub max_connection_bytes: u64,
    /// Bytes all connections together may hold in each direction; beyond it the largest
    /// inbound holders are reset, and outbound replies that do not fit are dropped.
    #[arg(long, env = "BROKER_MAX_BUFFERED_BYTES", default_value = defaults::MAX_BUFFERED_BYTES, value_parser = Trimmed(parse_size))]
    pub max_buffered_bytes: u64,
    /// A connection that holds bytes without progress (no complete request arriving, or its
    /// replies not read) for this long is reset (at most 1h).
    #[arg(long, env = "BROKER_STALL_TIMEOUT", value_parser = Trimmed(parse_patience), default_value = defaults::STALL_TIMEOUT)]
    pub stall_timeout: Duration,
    /// Memory the process must stay under: near it the broker refuses new work and resets
    /// the connections holding the most [default: the cgroup's memory limit, if any].
    #[arg(long, env = "BROKER_MEMORY_LIMIT", value_parser = Trimmed(parse_size))]
    pub memory_limit: Option<u64>,
    /// After SIGTERM, keep serving (while not ready) this long before draining (at most 1h).
    #[arg(long, env = "BROKER_SHUTDOWN_DELAY", value_parser = Trimmed(parse_wait), default_value = defaults::SHUTDOWN_DELAY)]
    pub shutdown_delay: Duration,
    /// Longest wait for in-flight requests once draining; then `ERR timeout` (at most 1h).
    #[arg(long, env = "BROKER_DRAIN_TIMEOUT", value_parser = Trimmed(parse_positive_wait), default_value = defaults::DRAIN_TIMEOUT)]
    pub drain_timeout: Duration,
    /// Once a queue stands (it has not drained for --queue-interval), the longest a request
    /// may expect to wait and be served in: new ones whose predicted wait plus a service time
    /// is longer are refused at once (`ERR overloaded`), and one that has waited longer than
    /// the target plus a service time is not started. Raised to two mean service times for
    /// slow handlers. 1ms to 1h.
    #[arg(long, env = "BROKER_QUEUE_TARGET", value_parser = Trimmed(parse_queue_time), default_value = defaults::QUEUE_TARGET)]
    pub queue_target: Duration,
    /// A queue that has not drained for this long is standing; while it keeps draining,
    /// nothing is refused for queue time. At least the target. 1ms to 1h.
    #[arg(long, env = "BROKER_QUEUE_INTERVAL", value_parser = Trimmed(parse_queue_time), default_value = defaults::QUEUE_INTERVAL)]
    pub queue_interval: Duration,
    /// Close a front connection this long after it opened (jittered by up to 10 % either way),
    /// at a moment it holds no request, so its client reconnects through its balancer; 0s:
    /// never (1s to 24h).
    #[arg(long, env = "BROKER_MAX_CONNECTION_AGE", value_parser = Trimmed(parse_connection_age), default_value = defaults::MAX_CONNECTION_AGE)]
    pub max_connection_age: Duration,
    /// A connection past its age that never goes without a request in flight is closed this
    /// long after its age regardless, the requests it holds given up (at most 1h).
    #[arg(long, env = "BROKER_MAX_CONNECTION_AGE_GRACE", value_parser = Trimmed(parse_wait), default_value = defaults::MAX_CONNECTION_AGE_GRACE)]
    pub max_connection_age_grace: Duration,
    /// /livez fails when the pipeline makes no progress for this long (at most 24h).
    #[arg(long, env = "BROKER_STUCK_AFTER", value_parser = Trimmed(parse_stuck_after), default_value = defaults::STUCK_AFTER)]
    pub stuck_after: Duration,
    /// Log level (any case).
    #[arg(long, alias = "loglevel", env = "BROKER_LOG_LEVEL", value_parser = Trimmed(EnumValueParser::<LogLevelArg>::new()), ignore_case = true, default_value = defaults::LOG_LEVEL)]
    pub log_level: LogLevelArg,
    /// Log format (any case).
    #[arg(long, env = "BROKER_LOG_FORMAT", value_parser = Trimmed(EnumValueParser::<LogFormatArg>::new()), ignore_case = true, default_value = defaults::LOG_FORMAT)]
    pub log_format: LogFormatArg,
    /// Accept front connections only from this network (CIDR; repeat, or comma-separate in
    /// the env var). Unset: accept all (use a NetworkPolicy).
    #[arg(long = "allow-from", env = "BROKER_ALLOW_FROM", value_delimiter = ',', value_parser = Trimmed(parse_network))]
    pub allow_from: Vec<ipnet::IpNet>,
    /// The front socket's CURVE secret key (a `broker keygen` file, or one Z85 key): clients
    /// must connect with CURVE and the matching public key; plaintext clients are refused.
    #[arg(long, env = "BROKER_CURVE_SECRET_KEY_FILE", value_parser = Trimmed(PathBufValueParser::new()))]
    pub curve_secret_key_file: Option<PathBuf>,
    /// Client public keys allowed to connect (Z85, one a line, # comments), re-read when the
    /// file changes. Needs --curve-secret-key-file. Unset: any CURVE client is accepted.
    #[arg(long, env = "BROKER_CURVE_ALLOW_KEYS", value_parser = Trimmed(PathBufValueParser::new()))]
    pub curve_allow_keys: Option<PathBuf>,
    /// Skip per-request metric updates (only to measure their cost; breaks autoscaling).
    #[arg(long, env = "BROKER_NO_METRICS", hide = true, value_parser = Trimmed(BoolishValueParser::new()))]
    pub no_metrics: bool,
}

/// A front endpoint that libzmq can bind and a client can reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    text: String,
    port: Option<u16>,
    ipv6: bool,
}

impl Endpoint {
    /// The endpoint as libzmq takes it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The TCP port (`None` for ipc://).
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// An IPv6 address: the socket must be told (libzmq binds IPv4 only by default).
    pub fn ipv6(&self) -> bool {
        self.ipv6
    }

    /// Whether binding this endpoint and `admin` would take the same TCP port on an address
    /// they share (one of them a wildcard, or the same IP): the second bind would fail.
    pub fn overlaps(&self, admin: SocketAddr) -> bool {
        let Some(port) = self.port else {
            return false;
        };
        let host = self
            .text
            .strip_prefix("tcp://")
            .and_then(|h| h.rsplit_once(':'))
            .map_or("", |(host, _)| host);
        let ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .ok();
        port == admin.port()
            && (admin.ip().is_unspecified()
                || ip.is_none_or(|ip| ip.is_unspecified() || ip == admin.ip()))
    }

    /// The socket file of an ipc:// endpoint.
    pub fn ipc_path(&self) -> Option<&str> {
        self.text.strip_prefix("ipc://")
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Parses `tcp://IP:PORT`, `tcp://*:PORT`, `tcp://[IPv6]:PORT` or `ipc://PATH`. Host names
/// and interface names are refused: what a broker binds should not depend on a lookup.
pub fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    const EXPECTED: &str = "expected tcp://IP:PORT, tcp://*:PORT or ipc://PATH";
    if let Some(path) = text.strip_prefix("ipc://") {
        // sun_path holds 108 bytes with the terminating NUL.
        if path.is_empty() || path.len() > 107 || path.contains('\0') {
            return Err(format!("{EXPECTED}; an ipc path is 1 to 107 bytes"));
        }
        // libzmq binds ipc://* to a random temporary path that no client could be told.
        if path == "*" {
            return Err(format!(
                "{EXPECTED}; ipc://* is a random path no client can find"
            ));
        }
        return Ok(Endpoint {
            text: text.to_owned(),
            port: None,
            ipv6: false,
        });
    }
    let hostport = text.strip_prefix("tcp://").ok_or(EXPECTED)?;
    let (host, port) = hostport.rsplit_once(':').ok_or(EXPECTED)?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{EXPECTED}; the port must be 1 to 65535"))?;
    let host_ok = host == "*"
        || host.parse::<std::net::Ipv4Addr>().is_ok()
        || host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok());
    if !host_ok {
        return Err(format!("{EXPECTED}; the host must be an IP address or *"));
    }
    Ok(Endpoint {
        text: text.to_owned(),
        port: Some(port),
        ipv6: host.starts_with('['),
    })
}

/// Parses the admin address: an IP and a port other than 0 (probes and scrapes need to know
/// where to go; a random port could be told to no one).
fn parse_admin(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| "expected IP:PORT, e.g. 0.0.0.0:8000 or [::]:8000".to_owned())?;
    if addr.port() == 0 {
        return Err("the port must be 1 to 65535 (probes and scrapes need a known port)".into());
    }
    Ok(addr)
}

/// Parses one `--allow-from` network in CIDR form.
fn parse_network(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse()
        .map_err(|_| "expected a network in CIDR form, e.g. 10.0.0.0/8 or fd00::/8".to_owned())
}

fn parse_workers(text: &str) -> Result<NonZeroUsize, String> {
    let n: usize = text
        .parse()
        .map_err(|_| format!("expected a number from 1 to {}", limits::MAX_WORKERS))?;
    NonZeroUsize::new(n)
        .filter(|n| n.get() <= limits::MAX_WORKERS)
        .ok_or_else(|| format!("expected a number from 1 to {}", limits::MAX_WORKERS))
}

fn parse_wait(text: &str) -> Result<Duration, String> {
    bounded_duration(text, limits::MAX_WAIT, false)
}

fn parse_positive_wait(text: &str) -> Result<Duration, String> {
    bounded_duration(text, limits::MAX_WAIT, true)
}

fn parse_stuck_after(text: &str) -> Result<Duration, String> {
    at_least_a_second(bounded_duration(text, limits::MAX_STUCK_AFTER, true)?)
}

fn parse_connection_age(text: &str) -> Result<Duration, String> {
    let age = bounded_duration(text, limits::MAX_CONNECTION_AGE, false)?;
    if !age.is_zero() && age < limits::MIN_CONNECTION_AGE {
        return Err("must be 0s (never) or at least 1s".into());
    }
    Ok(age)
}

fn parse_patience(text: &str) -> Result<Duration, String> {
    at_least_a_second(bounded_duration(text, limits::MAX_WAIT, true)?)
}

fn parse_queue_time(text: &str) -> Result<Duration, String> {
    let d = bounded_duration(text, limits::MAX_WAIT, true)?;
    if d < limits::MIN_QUEUE_TIME {
        return Err("must be at least 1ms".into());
    }
    Ok(d)
}

fn at_least_a_second(d: Duration) -> Result<Duration, String> {
    if d < limits::MIN_PATIENCE {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

/// Parses a byte size: a plain number, or one with a unit: `Ki`/`KiB`, `Mi`/`MiB`, `Gi`/`GiB`
/// (powers of 1024, as Kubernetes quantities), `K`/`KB`, `M`/`MB`, `G`/`GB` (powers of 1000).
/// Units are case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, String> {
    const EXPECTED: &str = "expected a size such as 1048576, 64KiB, 1Mi or 2GB";
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| EXPECTED)?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "ti" | "tib" => 1 << 40,
        _ => return Err(EXPECTED.into()),
    };
    number
        .checked_mul(multiplier)
        .filter(|n| *n <= limits::MAX_BUDGET)
        .ok_or_else(|| format!("at most {} bytes are accepted", limits::MAX_BUDGET))
}

/// A flag combination that parses but cannot work.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A size outside what can work.
    #[error("invalid value for {flag}: {why}")]
    Range {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A CURVE setting that cannot be used.
    #[error("invalid value for {flag}: {why}")]
    Curve {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The CPU count could not be read and --workers was not given.
    #[error("cannot tell how many CPUs this process may use ({0}); set --workers")]
    NoParallelism(String),
}

/// Validated broker configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Front socket endpoint.
    pub frontend: Endpoint,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    /// Pool size.
    pub workers: usize,
    /// Built-in handler.
    pub handler: HandlerKind,
    /// `sleep` handler cap.
    pub max_sleep: Duration,
    /// `cpu` handler rounds.
    pub cpu_rounds: u64,
    /// Requests held at once.
    pub max_inflight: usize,
    /// Request bytes held at once.
    pub max_inflight_bytes: usize,
    /// Largest request (body + envelope).
    pub max_message_bytes: usize,
    /// Largest single frame libzmq accepts on the front socket.
    pub frame_limit: usize,
    /// Largest reply body a handler may return.
    pub max_reply_bytes: usize,
    /// Front connections at once.
    pub max_connections: usize,
    /// Bytes one connection may hold, per direction.
    pub max_connection_bytes: usize,
    /// Bytes all connections may hold together.
    pub max_buffered_bytes: usize,
    /// How long a connection may hold bytes without progress.
    pub stall_timeout: Duration,
    /// The memory the process must stay under, if known.
    pub memory_limit: Option<u64>,
    /// Serve-while-not-ready time after SIGTERM.
    pub shutdown_delay: Duration,
    /// Drain deadline.
    pub drain_timeout: Duration,
    /// Queue-wait target (before it follows the service time).
    pub queue_target: Duration,
    /// How long a queue must go undrained to be standing.
    pub queue_interval: Duration,
    /// Liveness threshold.
    pub stuck_after: Duration,
    /// Front connections are closed this long after they opened (jittered); `None`: never.
    pub max_connection_age: Option<Duration>,
    /// How long past its age a connection that is never quiet is kept.
    pub max_connection_age_grace: Duration,
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
    /// CURVE on the front socket, if set.
    pub curve: Option<Curve>,
}

/// The front socket as a CURVE server.
#[derive(Clone, Debug)]
pub struct Curve {
    /// The server's secret key.
    pub secret: SecretKey,
    /// Its public key, which clients need.
    pub public: Key,
    /// The client keys allowed, if restricted.
    pub allow_keys: Option<AllowKeys>,
}

impl Curve {
    /// Reads and checks the CURVE flags.
    fn from_args(
        secret_file: Option<PathBuf>,
        allow_file: Option<PathBuf>,
    ) -> Result<Option<Curve>, ConfigError> {
        const SECRET: &str = "--curve-secret-key-file";
        const ALLOW: &str = "--curve-allow-keys";
        let bad = |flag, why: String| ConfigError::Curve { flag, why };
        let Some(secret_file) = secret_file else {
            return match allow_file {
                Some(_) => Err(bad(ALLOW, format!("needs {SECRET}"))),
                None => Ok(None),
            };
        };
        if zmq::has("curve") != Some(true) {
            return Err(bad(SECRET, "this libzmq was built without CURVE".into()));
        }
        let secret =
            curve::read_key_file(&secret_file, "secret").map_err(|e| bad(SECRET, e.to_string()))?;
        let public = crate::sys::curve_public(&secret)
            .ok_or_else(|| bad(SECRET, "libzmq cannot derive its public key".into()))?;
        let allow_keys = allow_file
            .map(|path| AllowKeys::load(&path))
            .transpose()
            .map_err(|e| bad(ALLOW, e.to_string()))?;
        Ok(Some(Curve {
            secret: SecretKey(secret),
            public,
            allow_keys,
        }))
    }
}

impl Config {
    /// Validates flags into a configuration, filling in CPU- and cgroup-derived defaults.
    pub fn from_args(args: ServeArgs) -> Result<Config, ConfigError> {
        let workers = match args.workers {
            Some(n) => n.get(),
            // cgroup-aware: follows the container's CPU quota.
            None => std::thread::available_parallelism()
                .map_err(|e| ConfigError::NoParallelism(e.to_string()))?
                .get()
                .min(limits::MAX_WORKERS),
        };
        let range = |flag: &'static str, why: String| ConfigError::Range { flag, why };
        if args.frontend.overlaps(args.admin) {
            return Err(range(
                "--admin",
                format!(
                    "{} takes the port of --frontend {}",
                    args.admin, args.frontend
                ),
            ));
        }
        if args.max_message_bytes < limits::MIN_MESSAGE_BYTES
            || args.max_message_bytes > limits::MAX_MESSAGE_BYTES
        {
            return Err(range(
                "--max-message-bytes",
                format!(
                    "must be {} to {} bytes",
                    limits::MIN_MESSAGE_BYTES,
                    limits::MAX_MESSAGE_BYTES
                ),
            ));
        }
        let max_message_bytes = args.max_message_bytes;
        // Bodies up to twice the limit are read and answered ERR too_large; a frame beyond
        // that is refused by libzmq before it is buffered. Never below what a handshake needs.
        let frame_limit = (max_message_bytes * 2).max(limits::MIN_FRAME_LIMIT);
        // A request of the largest size must be able to arrive (a frame plus slack) and be
        // admitted (its bytes plus frame overhead).
        let least_connection_bytes = frame_limit + 64 * 1024;
        if args.max_connection_bytes < least_connection_bytes {
            return Err(range(
                "--max-connection-bytes",
                format!(
                    "must be at least {least_connection_bytes} (twice --max-message-bytes, \
                     at least 64KiB, plus 64KiB) so a request of the largest size can arrive"
                ),
            ));
        }
        if args.max_buffered_bytes < args.max_connection_bytes {
            return Err(range(
                "--max-buffered-bytes",
                "must be at least --max-connection-bytes".into(),
            ));
        }
        // A request of the largest size, as it is held: its bytes, a routing id of up to 255
        // bytes, and the per-frame overhead of a routing id, a delimiter and a body frame.
        let least_inflight = max_message_bytes + limits::INFLIGHT_SLACK;
        if args.max_inflight_bytes < least_inflight {
            return Err(range(
                "--max-inflight-bytes",
                format!(
                    "must be at least {least_inflight} (--max-message-bytes plus 1KiB) so a \
                     request of the largest size can be admitted"
                ),
            ));
        }
        let cgroup = cgroup_memory_limit();
        let memory_limit = match args.memory_limit {
            Some(0) => None,
            Some(limit) if limit < limits::MIN_MEMORY_LIMIT => {
                return Err(range(
                    "--memory-limit",
                    "must be at least 32MiB (or 0 for none)".into(),
                ))
            }
            // Above the cgroup's, the guard would act after the kernel's OOM killer.
            Some(limit) if cgroup.is_some_and(|c| limit > c) => {
                return Err(range(
                    "--memory-limit",
                    format!(
                        "{limit} is above this process's cgroup memory limit ({}); leave it \
                         unset to use that",
                        cgroup.unwrap_or_default()
                    ),
                ))
            }
            Some(limit) => Some(limit),
            None => cgroup,
        };
        let curve = Curve::from_args(args.curve_secret_key_file, args.curve_allow_keys)?;
        let as_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Ok(Config {
            curve,
            max_inflight: args.max_inflight,
            max_inflight_bytes: as_usize(args.max_inflight_bytes),
            workers,
            frontend: args.frontend,
            admin: args.admin,
            handler: args.handler,
            max_sleep: args.max_sleep,
            cpu_rounds: args.cpu_rounds,
            max_message_bytes: as_usize(max_message_bytes),
            frame_limit: as_usize(frame_limit),
            max_reply_bytes: as_usize(frame_limit),
            max_connections: args.max_connections,
            max_connection_bytes: as_usize(args.max_connection_bytes),
            max_buffered_bytes: as_usize(args.max_buffered_bytes),
            stall_timeout: args.stall_timeout,
            memory_limit,
            shutdown_delay: args.shutdown_delay,
            drain_timeout: args.drain_timeout,
            queue_target: args.queue_target,
            queue_interval: args.queue_interval,
            stuck_after: args.stuck_after,
            max_connection_age: Some(args.max_connection_age).filter(|age| !age.is_zero()),
            max_connection_age_grace: args.max_connection_age_grace,
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

    /// File descriptors the broker may need at once: two per front connection (libzmq's and
    /// the broker's duplicate), the admin server's connections, and a margin for the few of
    /// libzmq (mailboxes, its poller), the signalfd, the workers' eventfd and the runtime.
    pub fn fds_needed(&self) -> u64 {
        2 * self.max_connections as u64 + crate::admin::MAX_CONNECTIONS as u64 + 64
    }
}

/// Every environment variable `command` (and its subcommands) reads a flag from.
pub fn known_env(command: &clap::Command) -> Vec<String> {
    let mut names: Vec<String> = command
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect();
    for sub in command.get_subcommands() {
        names.extend(known_env(sub));
    }
    names.sort();
    names.dedup();
    names
}

/// The `BROKER_*` variables among `vars` that none of `known` is (a typo, or a setting of
/// another version), each with the known name nearest to it if one is within three edits.
pub fn unknown_env(vars: &[String], known: &[String]) -> Vec<(String, Option<String>)> {
    vars.iter()
        .filter(|name| name.starts_with("BROKER_") && !known.contains(name))
        .map(|name| {
            let nearest = known
                .iter()
                .map(|k| (edit_distance(name, k), k))
                .filter(|(d, _)| *d <= 3)
                .min_by_key(|(d, _)| *d)
                .map(|(_, k)| k.clone());
            (name.clone(), nearest)
        })
        .collect()
}

/// Levenshtein distance between two ASCII-ish names (characters compared as chars).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The memory limit of this process's cgroup (v2 `memory.max`, or v1
/// `memory.limit_in_bytes`), if one is set.
pub fn cgroup_memory_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |path: String| -> Option<u64> {
        let text = std::fs::read_to_string(path).ok()?;
        let value: u64 = text.trim().parse().ok()?;
        // v1 reports "no limit" as a huge page-rounded number.
        (value < (1 << 60)).then_some(value)
    };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_end_matches('/');
        if controllers.is_empty() {
            // v2; inside a container's cgroup namespace the path is "/".
            for base in [format!("/sys/fs/cgroup{path}"), "/sys/fs/cgroup".into()] {
                if let Some(limit) = read(format!("{base}/memory.max")) {
                    return Some(limit);
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            for base in [
                format!("/sys/fs/cgroup/memory{path}"),
                "/sys/fs/cgroup/memory".into(),
            ] {
                if let Some(limit) = read(format!("{base}/memory.limit_in_bytes")) {
                    return Some(limit);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(list: &[&str]) -> Result<ServeArgs, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("broker").chain(list.iter().copied()))
            .map(|w| w.serve)
    }

    fn config(list: &[&str]) -> Result<Config, ConfigError> {
        Config::from_args(args(list).expect("flags parse"))
    }

    #[test]
    fn the_admin_server_cannot_take_the_front_port() {
        for (front, admin) in [
            ("tcp://0.0.0.0:5555", "0.0.0.0:5555"),
            ("tcp://*:5555", "127.0.0.1:5555"),
            ("tcp://127.0.0.1:5555", "0.0.0.0:5555"),
            ("tcp://127.0.0.1:5555", "127.0.0.1:5555"),
            ("tcp://[::]:5555", "127.0.0.1:5555"),
        ] {
            assert!(
                matches!(
                    config(&["--frontend", front, "--admin", admin]),
                    Err(ConfigError::Range {
                        flag: "--admin",
                        ..
                    })
                ),
                "{front} and {admin}"
            );
        }
        for (front, admin) in [
            ("tcp://127.0.0.1:5555", "127.0.0.2:5555"),
            ("tcp://0.0.0.0:5555", "0.0.0.0:8000"),
            ("ipc:///tmp/broker.sock", "0.0.0.0:5555"),
        ] {
            assert!(
                config(&["--frontend", front, "--admin", admin]).is_ok(),
                "{front} and {admin}"
            );
        }
    }

    #[test]
    fn durations_are_bounded() {
        for flag in [
            "--drain-timeout",
            "--shutdown-delay",
            "--max-sleep",
            "--stall-timeout",
        ] {
            assert!(args(&[flag, "300000000000y"]).is_err(), "{flag}");
            assert!(args(&[flag, "18446744073709551615s"]).is_err(), "{flag}");
            assert!(args(&[flag, "1h"]).is_ok(), "{flag}");
        }
        assert!(args(&["--drain-timeout", "0s"]).is_err());
        for flag in ["--queue-target", "--queue-interval"] {
            assert!(args(&[flag, "0s"]).is_err(), "{flag}");
            assert!(args(&[flag, "999us"]).is_err(), "{flag}");
            assert!(args(&[flag, "2h"]).is_err(), "{flag}");
            assert!(args(&[flag, "1ms"]).is_ok(), "{flag}");
            assert!(args(&[flag, "1h"]).is_ok(), "{flag}");
        }
        assert!(args(&["--stuck-after", "25h"]).is_err());
        let age = |text| config(&["--max-connection-age", text]).map(|c| c.max_connection_age);
        assert_eq!(age("0s"), Ok(None), "0s: never");
        assert_eq!(age("1s"), Ok(Some(Duration::from_secs(1))));
        assert_eq!(age(" 24h "), Ok(Some(Duration::from_secs(86_400))));
        for bad in ["999ms", "25h", "-1s", "soon"] {
            assert!(args(&["--max-connection-age", bad]).is_err(), "{bad}");
        }
        assert_eq!(
            config(&["--max-connection-age-grace", "0s"])
                .expect("no grace is valid")
                .max_connection_age_grace,
            Duration::ZERO
        );
        assert!(args(&["--max-connection-age-grace", "2h"]).is_err());
    }

    #[test]
    fn unknown_variables_are_named_with_the_nearest_known_one() {
        use clap::CommandFactory;
        let known = known_env(&Wrapper::command());
        assert!(known.contains(&"BROKER_WORKERS".to_owned()));
        assert!(known.contains(&"BROKER_QUEUE_TARGET".to_owned()));
        let vars: Vec<String> = [
            "BROKER_WORKER",
            "BROKER_WORKERS",
            "BROKER_ZZZZZZZZZZ",
            "PATH",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            unknown_env(&vars, &known),
            [
                (
                    "BROKER_WORKER".to_owned(),
                    Some("BROKER_WORKERS".to_owned())
                ),
                ("BROKER_ZZZZZZZZZZ".to_owned(), None),
            ]
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64ki"), Ok(64 << 10));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("256Mi"), Ok(256 << 20));
        for bad in [
            "",
            "MiB",
            "1.5MiB",
            "-1",
            "1 parsec",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("2Ti").is_err(), "over the budget limit");
    }

    #[test]
    fn endpoints_must_be_bindable_and_reachable() {
        let port = |text: &str| parse_endpoint(text).map(|e| e.port());
        assert_eq!(port("tcp://0.0.0.0:5555"), Ok(Some(5555)));
        assert_eq!(port("tcp://*:1"), Ok(Some(1)));
        assert_eq!(port("tcp://[::1]:65535"), Ok(Some(65535)));
        assert_eq!(port("ipc:///tmp/broker.sock"), Ok(None));
        for bad in [
            "tcp://127.0.0.1:99999",
            "tcp://127.0.0.1:0",
            "tcp://127.0.0.1",
            "tcp://localhost:5555",
            "tcp://eth0:5555",
            "inproc://broker",
            "pgm://x",
            "nonsense",
            "ipc://",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_definition_is_consistent_and_levels_take_any_case() {
        use clap::CommandFactory;
        Wrapper::command().debug_assert();
        assert_eq!(
            config(&["--log-level", "INFO"]).expect("valid").log_level,
            LevelFilter::Info
        );
        assert_eq!(
            config(&["--log-format", "JSON"]).expect("valid").log_format,
            LogFormat::Json
        );
    }

    #[test]
    fn counts_are_bounded() {
        assert!(args(&["--workers", "0"]).is_err());
        assert!(args(&["--workers", "1001"]).is_err());
        assert!(args(&["--workers", "288230376151711744"]).is_err());
        assert!(args(&["--max-inflight", "18446744073709551615"]).is_err());
        assert!(args(&["--max-inflight", "1000001"]).is_err());
        assert!(args(&["--max-connections", "0"]).is_err());
        assert_eq!(config(&["--workers", "1000"]).expect("valid").workers, 1000);
    }

    #[test]
    fn budgets_must_fit_the_largest_message() {
        let defaults = config(&[]).expect("defaults are valid");
        assert_eq!(defaults.max_inflight, defaults::MAX_INFLIGHT);
        assert_eq!(defaults.frame_limit, 2 << 20);
        // A tiny message limit still leaves room for the handshake.
        assert_eq!(
            config(&["--max-message-bytes", "64"])
                .expect("valid")
                .frame_limit,
            64 << 10
        );
        assert!(matches!(
            config(&["--max-message-bytes", "63"]),
            Err(ConfigError::Range {
                flag: "--max-message-bytes",
                ..
            })
        ));
        assert!(matches!(
            config(&["--max-connection-bytes", "1MiB"]),
            Err(ConfigError::Range {
                flag: "--max-connection-bytes",
                ..
            })
        ));
        assert!(matches!(
            config(&["--max-buffered-bytes", "1MiB"]),
            Err(ConfigError::Range {
                flag: "--max-buffered-bytes",
                ..
            })
        ));
        assert!(matches!(
            config(&["--max-inflight-bytes", "1000"]),
            Err(ConfigError::Range {
                flag: "--max-inflight-bytes",
                ..
            })
        ));
        assert_eq!(
            config(&["--memory-limit", "256Mi"])
                .expect("valid")
                .memory_limit,
            Some(256 << 20)
        );
    }
}
