//! `broker`: serve (the default), or run one of the tools (the `tools` crate) that share its
//! flags' style: `probe` (exec health check), `bench` (load client), `keygen` (a CURVE key pair).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A ZeroMQ request/reply worker-pool broker for Kubernetes.
#[derive(Debug, Parser)]
#[command(
    name = "broker",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Run a tool instead of the broker.
    #[command(subcommand)]
    command: Option<Command>,
    /// Broker flags (when no subcommand is given).
    #[command(flatten)]
    serve: broker::config::ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Health-check a running broker (for exec probes): exit 0 when it is serving, 1 otherwise.
    Probe(tools::probe::ProbeArgs),
    /// Load a running broker and report throughput and latency.
    Bench(tools::bench::BenchArgs),
    /// Print a new CURVE key pair (Z85) for the broker or a client.
    Keygen,
}

fn main() -> ExitCode {
    // First of all: from here on a stop signal waits for the coordinator (and is drained)
    // instead of killing the process before it can log anything.
    if let Err(e) = broker::signals::block() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let cli = match broker::parse_args::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if cli.command.is_some() {
        // The tools keep the default dispositions: a SIGTERM ends them.
        if let Err(e) = broker::signals::unblock() {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    match cli.command {
        Some(Command::Probe(args)) => tools::probe::run(&args),
        Some(Command::Bench(args)) => tools::bench::run(&args),
        Some(Command::Keygen) => tools::keygen::run(),
        None => {
            use clap::CommandFactory;
            let known = broker::config::known_env(&Cli::command());
            broker::serve_with(cli.serve, broker::builtin_handler, &known)
        }
    }
}
