//! `broker`: parse flags, set up logging and signals, run the broker, map the outcome to an
//! exit code (0 drained, 1 fatal, 2 bad configuration, 128+N hard stop by signal N).

use std::process::ExitCode;

use broker::config::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    match cli.command {
        Some(Command::Probe(args)) => broker::probe::run(&args),
        Some(Command::Bench(args)) => bench(&args),
        None => broker::serve(cli.serve, broker::builtin_handler),
    }
}

fn bench(args: &broker::bench::BenchArgs) -> ExitCode {
    match broker::bench::run(args) {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            // Lost or wrong replies are a failed run for scripts.
            if report.lost > 0 || report.mismatched > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(broker::bench::Error::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints clap's help or version as usual; any other error as one line, exit 2.
fn usage_error(e: &clap::Error) -> ExitCode {
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
}
