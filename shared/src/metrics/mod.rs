//! The Prometheus metrics: one [`Metrics`] value on an explicit registry that the broker
//! shares with its workers, built here with every series pre-registered. Its parts: [`names`]
//! (the public names), [`reasons`] (typed label values), the per-thread [`Recorder`] of
//! per-request updates, and the held-requests integral (`held.rs`). Handles are resolved once
//! here so the hot path touches only plain counters.

mod held;
pub mod names;
pub mod reasons;
mod recorder;

use std::time::Instant;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::protocol::ErrorCode;
use held::HeldSeconds;
pub use reasons::{DropReason, RefusalReason, RefusedReason, ResetReason};
pub use recorder::Recorder;

/// Histogram buckets in seconds: 25 µs to 10 s in 1-2.5-5 steps. The client library's
/// defaults start at 5 ms, where every echo request would land in the first bucket.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every metric the broker exports, on its own registry. The hot path updates it through a
/// per-thread [`Recorder`]; with [`Metrics::set_enabled`]`(false)` recorders do nothing (the
/// benchmarks' metrics-off baseline).
pub struct Metrics {
    registry: Registry,
    enabled: bool,
    requests_ok: IntCounter,
    requests_err: [IntCounter; ErrorCode::ALL.len()],
    dropped: Vec<IntCounter>,
    request_duration: Histogram,
    queue_wait: Histogram,
    inflight: IntGauge,
    held: HeldSeconds,
    inflight_bytes: IntGauge,
    workers: IntGauge,
    workers_busy: IntGauge,
    workers_stuck: IntGauge,
    worker_busy_seconds: prometheus::Counter,
    received_bytes: IntCounter,
    sent_bytes: IntCounter,
    health_checks: IntCounter,
    requests_refused: Vec<IntCounter>,
    queue_target: prometheus::Gauge,
    service: prometheus::Gauge,
    memory_limit: IntGauge,
    connections: IntGauge,
    refused: Vec<IntCounter>,
    resets: Vec<IntCounter>,
    buffered_in: IntGauge,
    buffered_out: IntGauge,
    shedding: IntGauge,
    draining: IntGauge,
    allowed_keys: IntGauge,
    key_reloads: [IntCounter; 2],
}

/// Registering metrics can fail only on a name clash, a programming error caught by tests.
pub type Result<T> = std::result::Result<T, prometheus::Error>;

/// Registers a clone of `metric` and returns it: each metric is named once, where it is made.
fn reg<M: Collector + Clone + 'static>(registry: &Registry, metric: M) -> Result<M> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl Metrics {
    /// Builds every metric on a fresh registry, with process metrics and build info.
    pub fn new(version: &str) -> Result<Metrics> {
        let r = Registry::new();
        let requests = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    names::REQUESTS_TOTAL,
                    "Replies sent, by outcome (ok or the ERR code).",
                ),
                &["outcome"],
            )?,
        )?;
        let dropped = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    names::REPLIES_DROPPED_TOTAL,
                    "Replies that could not be delivered, by reason.",
                ),
                &["reason"],
            )?,
        )?;
        let histogram = |name: &str, help: &str| {
            reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                )?,
            )
        };
        let gauge = |name: &str, help: &str| reg(&r, IntGauge::new(name, help)?);
        let counter = |name: &str, help: &str| reg(&r, IntCounter::new(name, help)?);
        let build_info = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(names::BUILD_INFO, "Always 1; the version is a label."),
                &["version"],
            )?,
        )?;
        build_info.with_label_values(&[version]).set(1);
        let refused = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    names::CONNECTIONS_REFUSED_TOTAL,
                    "Front connections refused, by reason (allowlist, limit, client_key, server_key, mechanism, handshake).",
                ),
                &["reason"],
            )?,
        )?;
        let requests_refused = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    names::REQUESTS_REFUSED_TOTAL,
                    "Requests refused without being run, by reason (why the client got ERR \
                     overloaded, deadline_exceeded or draining).",
                ),
                &["reason"],
            )?,
        )?;
        let float_gauge = |name: &str, help: &str| reg(&r, prometheus::Gauge::new(name, help)?);
        let resets = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    names::CONNECTIONS_RESET_TOTAL,
                    "Front connections the broker closed: over a bound, or their CURVE key revoked.",
                ),
                &["reason"],
            )?,
        )?;
        let labelled = |vec: &IntCounterVec, labels: Vec<&str>| {
            labels
                .into_iter()
                .map(|label| vec.with_label_values(&[label]))
                .collect::<Vec<_>>()
        };
        let buffered = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    names::BUFFERED_BYTES,
                    "Bytes held for front connections in libzmq and the kernel, by direction.",
                ),
                &["direction"],
            )?,
        )?;
        let reloads = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    names::CURVE_KEY_RELOADS_TOTAL,
                    "Reads of a changed --curve-allow-keys file, by result (ok, error: the \
                     previous keys stay in force).",
                ),
                &["result"],
            )?,
        )?;
        let metrics = Metrics {
            enabled: true,
            requests_ok: requests.with_label_values(&["ok"]),
            requests_err: ErrorCode::ALL.map(|code| requests.with_label_values(&[code.as_str()])),
            dropped: labelled(
                &dropped,
                DropReason::ALL.iter().map(|r| r.as_str()).collect(),
            ),
            request_duration: histogram(
                names::REQUEST_DURATION_SECONDS,
                "Time from reading a request to sending its reply.",
            )?,
            queue_wait: histogram(
                names::QUEUE_WAIT_SECONDS,
                "Time from reading a request to a worker picking it up.",
            )?,
            inflight: gauge(
                names::INFLIGHT_REQUESTS,
                "Requests read and not yet answered.",
            )?,
            held: reg(&r, HeldSeconds::new()?)?,
            inflight_bytes: gauge(
                names::INFLIGHT_BYTES,
                "Request bytes held (frames count their size plus 64).",
            )?,
            workers: gauge(names::WORKERS, "Worker threads in the pool.")?,
            workers_busy: gauge(names::WORKERS_BUSY, "Workers running a request now.")?,
            workers_stuck: gauge(
                names::WORKERS_STUCK,
                "Workers on their current request for longer than --stuck-after.",
            )?,
            worker_busy_seconds: reg(
                &r,
                prometheus::Counter::new(
                    names::WORKER_BUSY_SECONDS_TOTAL,
                    "Seconds workers spent running requests; rate / broker_workers is utilisation.",
                )?,
            )?,
            received_bytes: counter(
                names::RECEIVED_BYTES_TOTAL,
                "Request bytes read: every frame after the routing id (envelope, deadline \
                 header, body), without ZMTP framing; what the clients sent.",
            )?,
            sent_bytes: counter(
                names::SENT_BYTES_TOTAL,
                "Reply bytes handed to libzmq: every frame after the routing id (envelope, \
                 status, body), without ZMTP framing; what the clients are sent.",
            )?,
            health_checks: counter(
                names::HEALTH_CHECKS_TOTAL,
                "Health requests answered by the coordinator.",
            )?,
            connections: gauge(names::CONNECTIONS, "Front connections open.")?,
            buffered_in: buffered.with_label_values(&["in"]),
            buffered_out: buffered.with_label_values(&["out"]),
            refused: labelled(
                &refused,
                RefusalReason::ALL.iter().map(|r| r.as_str()).collect(),
            ),
            resets: labelled(
                &resets,
                ResetReason::ALL.iter().map(|r| r.as_str()).collect(),
            ),
            shedding: gauge(
                names::MEMORY_SHEDDING,
                "1 while new work is refused because the process is near its memory limit.",
            )?,
            draining: gauge(names::DRAINING, "1 from the first SIGTERM/SIGINT on.")?,
            requests_refused: labelled(
                &requests_refused,
                RefusedReason::ALL.iter().map(|r| r.as_str()).collect(),
            ),
            queue_target: float_gauge(
                names::QUEUE_TARGET_SECONDS,
                "The queue-wait target in force: --queue-target, or a few mean service times if \
                 that is longer.",
            )?,
            service: float_gauge(
                names::SERVICE_SECONDS,
                "The mean handler time (moving average) admission predicts queue waits with.",
            )?,
            memory_limit: gauge(
                names::MEMORY_LIMIT_BYTES,
                "The memory limit the broker keeps its resident size under (--memory-limit or \
                 the cgroup's; 0: none).",
            )?,
            allowed_keys: gauge(
                names::CURVE_ALLOWED_KEYS,
                "Client public keys in force from --curve-allow-keys (0 without it).",
            )?,
            key_reloads: ["ok", "error"].map(|result| reloads.with_label_values(&[result])),
            registry: r,
        };
        #[cfg(target_os = "linux")]
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    /// Turns the per-request updates on or off (off only to measure what they cost).
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// A per-thread recorder for the per-request metrics: plain (non-atomic) local counts
    /// and histograms, pushed to the shared metrics by [`Recorder::flush`].
    pub fn recorder(&self) -> Recorder {
        Recorder {
            enabled: self.enabled,
            requests_ok: self.requests_ok.local(),
            requests_err: self.requests_err.each_ref().map(IntCounter::local),
            request_duration: self.request_duration.local(),
            queue_wait: self.queue_wait.local(),
            worker_busy_seconds: self.worker_busy_seconds.local(),
            received_bytes: self.received_bytes.local(),
            sent_bytes: self.sent_bytes.local(),
            workers_busy: self.workers_busy.clone(),
            refused: self
                .requests_refused
                .iter()
                .map(IntCounter::local)
                .collect(),
            last_flush: Instant::now(),
        }
    }

    /// The live gauge of requests held, for the in-flight table to keep (a detached one when
    /// per-request updates are off, so the published gauge stays 0 as the others do).
    pub fn inflight_gauge(&self) -> IntGauge {
        if self.enabled {
            self.inflight.clone()
        } else {
            IntGauge::new(names::INFLIGHT_REQUESTS, "detached")
                .unwrap_or_else(|_| self.inflight.clone())
        }
    }

    /// A health request was answered.
    pub fn health_check(&self) {
        self.health_checks.inc();
    }

    /// A connection was refused.
    pub fn connection_refused(&self, reason: RefusalReason) {
        self.refused[reason.index()].inc();
    }

    /// `n` connections were reset.
    pub fn connections_reset(&self, reason: ResetReason, n: u64) {
        self.resets[reason.index()].inc_by(n);
    }

    /// `n` replies could not be delivered.
    pub fn count_drops(&self, reason: DropReason, n: u64) {
        self.dropped[reason.index()].inc_by(n);
    }

    /// The allow file was read after a change: `keys` in force, or `None` if it was refused.
    pub fn keys_reloaded(&self, keys: Option<usize>) {
        match keys {
            Some(n) => {
                self.key_reloads[0].inc();
                self.set_allowed_keys(n);
            }
            None => self.key_reloads[1].inc(),
        }
    }

    /// Client keys in force.
    pub fn set_allowed_keys(&self, n: usize) {
        self.allowed_keys.set(n as i64);
    }

    /// The queue target in force and the mean service time behind it.
    pub fn set_queue(&self, target: std::time::Duration, service: std::time::Duration) {
        self.queue_target.set(target.as_secs_f64());
        self.service.set(service.as_secs_f64());
    }

    /// The memory limit in force, if any.
    pub fn set_memory_limit(&self, limit: Option<u64>) {
        self.memory_limit
            .set(limit.map_or(0, |l| l.min(i64::MAX as u64) as i64));
    }

    /// Pool size.
    pub fn set_workers(&self, n: usize) {
        self.workers.set(n as i64);
    }

    /// Workers stuck past `--stuck-after` (computed at scrape time).
    pub fn set_stuck(&self, n: usize) {
        self.workers_stuck.set(n as i64);
    }

    /// The broker received its first stop signal.
    pub fn set_draining(&self) {
        self.draining.set(1);
    }

    /// Front connections open.
    pub fn set_connections(&self, n: usize) {
        self.connections.set(n as i64);
    }

    /// Request bytes held.
    pub fn set_inflight_bytes(&self, n: usize) {
        self.inflight_bytes.set(n as i64);
    }

    /// Bytes held for front connections, inbound and outbound.
    pub fn set_buffered(&self, inbound: u64, outbound: u64) {
        self.buffered_in.set(inbound.min(i64::MAX as u64) as i64);
        self.buffered_out.set(outbound.min(i64::MAX as u64) as i64);
    }

    /// Whether new work is refused to stay inside the memory limit.
    pub fn set_shedding(&self, on: bool) {
        self.shedding.set(i64::from(on));
    }

    /// The held-requests integral as of `since`: `seconds` accumulated, `count` held since.
    pub fn set_held(&self, seconds: f64, count: usize, since: Instant) {
        let mut state = self.held.state.lock();
        state.seconds = seconds;
        state.count = count;
        state.since = since;
    }

    /// The registry, to add application metrics next to the broker's.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders the registry in the Prometheus text format.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(8 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn text(metrics: &Metrics) -> String {
        String::from_utf8(metrics.encode().expect("encode")).expect("utf8")
    }

    #[test]
    fn every_outcome_is_exported_from_the_start() {
        let metrics = Metrics::new("test").expect("metrics register");
        let mut recorder = metrics.recorder();
        recorder.replied(None, Some(Duration::from_micros(30)));
        recorder.replied(Some(ErrorCode::Timeout), None);
        metrics.count_drops(DropReason::Hwm, 2);
        assert!(
            text(&metrics).contains("broker_requests_total{outcome=\"ok\"} 0"),
            "not before a flush"
        );
        recorder.flush();
        let text = text(&metrics);
        for line in [
            "broker_requests_total{outcome=\"ok\"} 1",
            "broker_requests_total{outcome=\"timeout\"} 1",
            "broker_requests_total{outcome=\"draining\"} 0",
            "broker_replies_dropped_total{reason=\"hwm\"} 2",
            "broker_replies_dropped_total{reason=\"budget\"} 0",
            "broker_connections_refused_total{reason=\"limit\"} 0",
            "broker_connections_reset_total{reason=\"stalled\"} 0",
            "broker_buffered_bytes{direction=\"in\"} 0",
            "broker_build_info{version=\"test\"} 1",
            "broker_request_duration_seconds_bucket{le=\"0.000025\"} 0",
            "broker_request_duration_seconds_bucket{le=\"0.00005\"} 1",
            "# TYPE broker_inflight_seconds_total counter",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn disabled_metrics_skip_per_request_updates() {
        let mut metrics = Metrics::new("test").expect("metrics register");
        metrics.set_enabled(false);
        let mut recorder = metrics.recorder();
        recorder.replied(None, Some(Duration::from_micros(30)));
        recorder.request_read(10);
        recorder.flush();
        let text = text(&metrics);
        assert!(text.contains("broker_requests_total{outcome=\"ok\"} 0"));
        assert!(text.contains("broker_received_bytes_total 0"));
    }

    #[test]
    fn buckets_are_increasing_and_span_25us_to_10s() {
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(LATENCY_BUCKETS.first(), Some(&0.000_025));
        assert_eq!(LATENCY_BUCKETS.last(), Some(&10.0));
    }
}
