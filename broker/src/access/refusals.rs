//! Refused connections: counted in the metrics at once, logged as one summary line a second
//! at most, whichever part of the broker noticed them (the ZAP handler, the connection table,
//! a failed handshake).

use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::metrics::RefusalReason;
use shared::Metrics;

/// Refused connections: counted in the metrics at once, logged as one summary line a
/// second at most, so a flood of refused handshakes cannot flood the log.
pub struct Refusals {
    metrics: Arc<Metrics>,
    counts: [u64; RefusalReason::ALL.len()],
    last_peer: Option<String>,
    next_log: Instant,
}

impl Refusals {
    /// How often at most a summary is logged.
    pub const LOG_EVERY: Duration = Duration::from_secs(1);

    /// No refusals yet.
    pub fn new(metrics: Arc<Metrics>) -> Refusals {
        Refusals {
            metrics,
            counts: [0; RefusalReason::ALL.len()],
            last_peer: None,
            next_log: Instant::now(),
        }
    }

    /// A connection was refused for `reason`, from `peer` if known.
    pub fn note(&mut self, reason: RefusalReason, peer: Option<String>) {
        self.metrics.connection_refused(reason);
        self.counts[reason.index()] += 1;
        if peer.is_some() {
            self.last_peer = peer;
        }
    }

    /// Logs what was refused since the last summary, if any and if one is due.
    pub fn log_if_due(&mut self, now: Instant) {
        if now < self.next_log || self.counts.iter().all(|&n| n == 0) {
            return;
        }
        self.next_log = now + Self::LOG_EVERY;
        let total: u64 = self.counts.iter().sum();
        let parts: Vec<String> = RefusalReason::ALL
            .iter()
            .zip(&self.counts)
            .filter(|(_, &n)| n > 0)
            .map(|(reason, n)| format!("{n} {reason}"))
            .collect();
        let from = self
            .last_peer
            .take()
            .map_or(String::new(), |p| format!(" (latest from {p})"));
        log::warn!("refused {total} connections: {}{from}", parts.join(", "));
        self.counts = [0; RefusalReason::ALL.len()];
    }
}
