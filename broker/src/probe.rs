//! `broker probe` (placeholder).

use std::process::ExitCode;

use crate::config::ProbeArgs;

/// Runs the probe.
pub fn run(_args: &ProbeArgs) -> ExitCode {
    ExitCode::FAILURE
}
