//! `broker bench`: a load client for a running broker (like `redis-benchmark` or `nats bench`),
//! the flags around [`crate::load`]. Each client is a DEALER connected to every address of
//! every `--endpoint` (a DNS name that resolves to several pods connects to each, which is how
//! a client reaches every pod behind a headless Service).
//!
//! Every request carries `--timeout` as its deadline (the header `\0broker.timeout-ms=N`, what
//! is left of it when sent), and an OK after it is counted late; `--no-deadline-header` leaves
//! the header out. An echo that returns the header (a server that does not know it) verifies.
//!
//! Exit codes: 0 when every request was answered and at least one OK came in time; 1 when the
//! run failed (nothing could be sent, no replies, only errors or late replies, or any reply
//! lost or wrong); 2 for flags that cannot work.

use std::process::ExitCode;
use std::time::Duration;

use clap::builder::StringValueParser;
use clap::Args;
use shared::parse::{bounded_duration, count, Trimmed};

use crate::curve::CurveArgs;
use crate::load::{self, Plan};

/// The longest --duration and --timeout.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Flags of `broker bench`.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {
    /// Broker endpoint; repeat for several. A DNS name connects to each address it resolves to.
    #[arg(long = "endpoint", default_value = "tcp://127.0.0.1:5555", value_parser = Trimmed(StringValueParser::new()))]
    pub endpoints: Vec<String>,
    /// Client connections.
    #[arg(long, default_value_t = 16, value_parser = Trimmed(count::<1, 100_000>))]
    pub clients: usize,
    /// Outstanding requests per client.
    #[arg(long, default_value_t = 16, value_parser = Trimmed(count::<1, 1_000_000>))]
    pub window: usize,
    /// Request body size in bytes (at least 8: the first 8 carry the request id).
    #[arg(long, default_value_t = 64, value_parser = Trimmed(count::<8, 1_073_741_824>))]
    pub size: usize,
    /// Send for this long (also the limit with --requests).
    #[arg(long, value_parser = Trimmed(parse_wait), default_value = "10s")]
    pub duration: Duration,
    /// Stop sending after this many requests in total.
    #[arg(long, value_parser = Trimmed(clap::value_parser!(u64).range(1..)))]
    pub requests: Option<u64>,
    /// Open loop: send this many requests per second in total, on schedule.
    #[arg(long, value_parser = Trimmed(parse_rate))]
    pub rate: Option<f64>,
    /// Threads driving the clients.
    #[arg(long, default_value_t = 1, value_parser = Trimmed(count::<1, 256>))]
    pub threads: usize,
    /// Each request's budget: sent in its deadline header (what is left of it when sent), and
    /// an OK after it counts as late. Also how long to wait for outstanding replies at the end
    /// before counting them lost.
    #[arg(long, value_parser = Trimmed(parse_wait), default_value = "5s")]
    pub timeout: Duration,
    /// Send no deadline header (for a server that would take it for body: a handler behind an
    /// older broker, a bare server that is not an echo).
    #[arg(long)]
    pub no_deadline_header: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Do not check that replies echo their requests (for non-echo handlers).
    #[arg(long)]
    pub no_verify: bool,
    /// The server is a bare echo (no `OK` status frame), e.g. a REP socket.
    #[arg(long)]
    pub raw: bool,
    /// Send this text as a frame ahead of each body: the milliseconds for the `sleep`
    /// handler, or the rounds for `cpu`. Sent as given, white space included (it is payload).
    #[arg(long)]
    pub first_frame: Option<String>,
    /// CURVE settings, for a broker that requires them.
    #[command(flatten)]
    pub curve: CurveArgs,
}

fn parse_wait(text: &str) -> Result<Duration, String> {
    bounded_duration(text, MAX_WAIT, true)
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 1e9 => Ok(r),
        _ => Err("expected requests per second, more than 0".into()),
    }
}

/// Runs the bench and prints its report; returns the exit code.
pub fn run(args: &BenchArgs) -> ExitCode {
    let security = match args.curve.security_or_usage_error() {
        Ok(security) => security,
        Err(code) => return code,
    };
    let endpoints = match client::resolve::resolve(&args.endpoints) {
        Ok(endpoints) => endpoints,
        Err(e) => {
            eprintln!("bench failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let plan = Plan {
        endpoints,
        clients: args.clients,
        window: args.window,
        size: args.size,
        duration: args.duration,
        requests: args.requests,
        rate: args.rate,
        threads: args.threads,
        timeout: args.timeout,
        deadline_header: !args.no_deadline_header,
        verify: !args.no_verify,
        raw: args.raw,
        first_frame: args.first_frame.as_ref().map(|f| f.as_bytes().to_vec()),
        security,
    };
    match load::preflight(&plan) {
        Ok(warnings) => {
            for warning in warnings {
                eprintln!("warning: {warning}");
            }
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            return ExitCode::FAILURE;
        }
    }
    let report = match load::run(&plan) {
        Ok(report) => report,
        Err(load::Error::Plan(why)) => {
            eprintln!("error: {why}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    match report.failure() {
        Some(why) => {
            eprintln!("bench failed: {why}");
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
    }
}
