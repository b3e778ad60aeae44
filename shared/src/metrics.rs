//! The Prometheus metrics: their names (public interface, listed in the README), their
//! buckets, and one [`Metrics`] value on an explicit registry that the broker shares with its
//! workers. Handles are resolved once here so the hot path touches only atomics.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::protocol::ErrorCode;

/// Metric names. Changing one breaks dashboards and autoscalers: treat them as API.
pub mod names {
    /// Replies sent, by outcome.
    pub const REQUESTS_TOTAL: &str = "broker_requests_total";
    /// Read from the front socket to reply sent.
    pub const REQUEST_DURATION_SECONDS: &str = "broker_request_duration_seconds";
    /// Read to picked up by a worker.
    pub const QUEUE_WAIT_SECONDS: &str = "broker_queue_wait_seconds";
    /// Requests read and not yet answered.
    pub const INFLIGHT_REQUESTS: &str = "broker_inflight_requests";
    /// Pool size.
    pub const WORKERS: &str = "broker_workers";
    /// Workers running a request now.
    pub const WORKERS_BUSY: &str = "broker_workers_busy";
    /// Workers on their current request for longer than `--stuck-after`.
    pub const WORKERS_STUCK: &str = "broker_workers_stuck";
    /// Time workers spent running requests; `rate / broker_workers` is utilisation.
    pub const WORKER_BUSY_SECONDS_TOTAL: &str = "broker_worker_busy_seconds_total";
    /// Replies that could not be delivered, by reason.
    pub const REPLIES_DROPPED_TOTAL: &str = "broker_replies_dropped_total";
    /// Request payload bytes read (body frames only).
    pub const RECEIVED_BYTES_TOTAL: &str = "broker_received_bytes_total";
    /// Reply payload bytes sent (body frames only).
    pub const SENT_BYTES_TOTAL: &str = "broker_sent_bytes_total";
    /// Health requests answered by the coordinator (`broker probe`).
    pub const HEALTH_CHECKS_TOTAL: &str = "broker_health_checks_total";
    /// 1 from SIGTERM on.
    pub const DRAINING: &str = "broker_draining";
    /// Always 1, labelled with the version.
    pub const BUILD_INFO: &str = "broker_build_info";
}

/// Histogram buckets in seconds: 25 µs to 10 s in 1-2.5-5 steps. The client library's
/// defaults start at 5 ms, where every echo request would land in the first bucket.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Why a reply could not be delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The client disconnected (EHOSTUNREACH under ROUTER_MANDATORY).
    PeerGone,
    /// The client's send queue is full: it stopped reading (EAGAIN).
    Hwm,
}

/// Every metric the broker exports, on its own registry.
pub struct Metrics {
    registry: Registry,
    requests_ok: IntCounter,
    requests_err: [IntCounter; ErrorCode::ALL.len()],
    dropped_peer_gone: IntCounter,
    dropped_hwm: IntCounter,
    /// Read from the front socket to reply sent.
    pub request_duration: Histogram,
    /// Read to picked up by a worker.
    pub queue_wait: Histogram,
    /// Requests read and not yet answered.
    pub inflight: IntGauge,
    /// Pool size.
    pub workers: IntGauge,
    /// Workers running a request now.
    pub workers_busy: IntGauge,
    /// Workers stuck on one request past `--stuck-after` (set when scraped).
    pub workers_stuck: IntGauge,
    /// Seconds spent in handlers. Counted in microseconds internally, see [`Metrics::add_busy`].
    worker_busy_seconds: prometheus::Counter,
    /// Request payload bytes.
    pub received_bytes: IntCounter,
    /// Reply payload bytes.
    pub sent_bytes: IntCounter,
    /// Health requests answered.
    pub health_checks: IntCounter,
    /// 1 from SIGTERM on.
    pub draining: IntGauge,
}

/// Registering metrics can fail only on a name clash, a programming error caught by tests.
pub type Result<T> = std::result::Result<T, prometheus::Error>;

impl Metrics {
    /// Builds every metric on a fresh registry, with process metrics and build info.
    pub fn new(version: &str) -> Result<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                names::REQUESTS_TOTAL,
                "Replies sent, by outcome (ok or the ERR code).",
            ),
            &["outcome"],
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                names::REPLIES_DROPPED_TOTAL,
                "Replies that could not be delivered.",
            ),
            &["reason"],
        )?;
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        };
        let build_info = IntGaugeVec::new(
            Opts::new(names::BUILD_INFO, "Always 1; the version is a label."),
            &["version"],
        )?;
        build_info.with_label_values(&[version]).set(1);

        let metrics = Metrics {
            requests_ok: requests.with_label_values(&["ok"]),
            requests_err: ErrorCode::ALL.map(|code| requests.with_label_values(&[code.as_str()])),
            dropped_peer_gone: dropped.with_label_values(&["peer_gone"]),
            dropped_hwm: dropped.with_label_values(&["hwm"]),
            request_duration: histogram(
                names::REQUEST_DURATION_SECONDS,
                "Time from reading a request to sending its reply.",
            )?,
            queue_wait: histogram(
                names::QUEUE_WAIT_SECONDS,
                "Time from reading a request to a worker picking it up.",
            )?,
            inflight: IntGauge::new(
                names::INFLIGHT_REQUESTS,
                "Requests read and not yet answered.",
            )?,
            workers: IntGauge::new(names::WORKERS, "Worker threads in the pool.")?,
            workers_busy: IntGauge::new(names::WORKERS_BUSY, "Workers running a request now.")?,
            workers_stuck: IntGauge::new(
                names::WORKERS_STUCK,
                "Workers on their current request for longer than --stuck-after.",
            )?,
            worker_busy_seconds: prometheus::Counter::new(
                names::WORKER_BUSY_SECONDS_TOTAL,
                "Seconds workers spent running requests; rate / broker_workers is utilisation.",
            )?,
            received_bytes: IntCounter::new(
                names::RECEIVED_BYTES_TOTAL,
                "Request body bytes read.",
            )?,
            sent_bytes: IntCounter::new(names::SENT_BYTES_TOTAL, "Reply body bytes sent.")?,
            health_checks: IntCounter::new(
                names::HEALTH_CHECKS_TOTAL,
                "Health requests answered by the coordinator.",
            )?,
            draining: IntGauge::new(names::DRAINING, "1 from the first SIGTERM/SIGINT on.")?,
            registry,
        };
        let r = &metrics.registry;
        r.register(Box::new(requests))?;
        r.register(Box::new(dropped))?;
        r.register(Box::new(build_info))?;
        r.register(Box::new(metrics.request_duration.clone()))?;
        r.register(Box::new(metrics.queue_wait.clone()))?;
        r.register(Box::new(metrics.inflight.clone()))?;
        r.register(Box::new(metrics.workers.clone()))?;
        r.register(Box::new(metrics.workers_busy.clone()))?;
        r.register(Box::new(metrics.workers_stuck.clone()))?;
        r.register(Box::new(metrics.worker_busy_seconds.clone()))?;
        r.register(Box::new(metrics.received_bytes.clone()))?;
        r.register(Box::new(metrics.sent_bytes.clone()))?;
        r.register(Box::new(metrics.health_checks.clone()))?;
        r.register(Box::new(metrics.draining.clone()))?;
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    /// Counts one reply sent with this outcome (`None` is `OK`).
    #[inline]
    pub fn count_reply(&self, outcome: Option<ErrorCode>) {
        match outcome {
            None => self.requests_ok.inc(),
            Some(code) => self.requests_err[code.index()].inc(),
        }
    }

    /// Counts one reply that could not be delivered.
    #[inline]
    pub fn count_drop(&self, reason: DropReason) {
        match reason {
            DropReason::PeerGone => self.dropped_peer_gone.inc(),
            DropReason::Hwm => self.dropped_hwm.inc(),
        }
    }

    /// Adds time a worker spent in its handler.
    #[inline]
    pub fn add_busy(&self, seconds: f64) {
        self.worker_busy_seconds.inc_by(seconds);
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

    #[test]
    fn every_outcome_is_exported_from_the_start() {
        let metrics = Metrics::new("test").expect("metrics register");
        metrics.count_reply(None);
        metrics.count_reply(Some(ErrorCode::Timeout));
        metrics.count_drop(DropReason::Hwm);
        let text = String::from_utf8(metrics.encode().expect("encode")).expect("utf8");
        assert!(text.contains("broker_requests_total{outcome=\"ok\"} 1"));
        assert!(text.contains("broker_requests_total{outcome=\"timeout\"} 1"));
        assert!(text.contains("broker_requests_total{outcome=\"draining\"} 0"));
        assert!(text.contains("broker_replies_dropped_total{reason=\"hwm\"} 1"));
        assert!(text.contains("broker_build_info{version=\"test\"} 1"));
        assert!(text.contains("broker_request_duration_seconds_bucket{le=\"0.000025\"} 0"));
    }

    #[test]
    fn buckets_are_increasing_and_span_25us_to_10s() {
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(LATENCY_BUCKETS.first(), Some(&0.000_025));
        assert_eq!(LATENCY_BUCKETS.last(), Some(&10.0));
    }
}
