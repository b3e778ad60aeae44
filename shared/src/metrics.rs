//! The Prometheus metrics: their names (public interface, listed in the README), their
//! buckets, and one [`Metrics`] value on an explicit registry that the broker shares with its
//! workers. Handles are resolved once here so the hot path touches only atomics.

use std::time::{Duration, Instant};

use prometheus::local::{LocalCounter, LocalHistogram, LocalIntCounter};
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
    /// Connections refused by the `--allow-from` ZAP handler.
    pub const CONNECTIONS_REFUSED_TOTAL: &str = "broker_connections_refused_total";
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

/// Every metric the broker exports, on its own registry. The hot path updates it through a
/// per-thread [`Recorder`]; with [`Metrics::set_enabled`]`(false)` recorders do nothing (the
/// benchmarks' metrics-off baseline).
pub struct Metrics {
    registry: Registry,
    enabled: bool,
    requests_ok: IntCounter,
    requests_err: [IntCounter; ErrorCode::ALL.len()],
    dropped_peer_gone: IntCounter,
    dropped_hwm: IntCounter,
    request_duration: Histogram,
    queue_wait: Histogram,
    inflight: IntGauge,
    workers: IntGauge,
    workers_busy: IntGauge,
    workers_stuck: IntGauge,
    worker_busy_seconds: prometheus::Counter,
    received_bytes: IntCounter,
    sent_bytes: IntCounter,
    health_checks: IntCounter,
    connections_refused: IntCounter,
    draining: IntGauge,
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
            enabled: true,
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
            connections_refused: IntCounter::new(
                names::CONNECTIONS_REFUSED_TOTAL,
                "Connections refused because the peer is not in --allow-from.",
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
        r.register(Box::new(metrics.connections_refused.clone()))?;
        r.register(Box::new(metrics.draining.clone()))?;
        #[cfg(target_os = "linux")]
        r.register(Box::new(
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
            inflight: self.inflight.clone(),
            workers_busy: self.workers_busy.clone(),
            last_flush: Instant::now(),
        }
    }

    /// A health request was answered.
    #[inline]
    pub fn health_check(&self) {
        self.health_checks.inc();
    }

    /// A connection was refused by the allowlist.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// A reply could not be delivered.
    #[inline]
    pub fn count_drop(&self, reason: DropReason) {
        match reason {
            DropReason::PeerGone => self.dropped_peer_gone.inc(),
            DropReason::Hwm => self.dropped_hwm.inc(),
        }
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

/// Per-request metric updates for one thread (the coordinator, or one worker). Each update is
/// a few plain memory operations; [`Recorder::flush`] publishes them, so a scrape sees them
/// once the thread flushes: the coordinator before every poll, a worker before it goes idle
/// and at least every [`Recorder::FLUSH_EVERY`] while busy. Gauges stay live (atomic).
pub struct Recorder {
    enabled: bool,
    requests_ok: LocalIntCounter,
    requests_err: [LocalIntCounter; ErrorCode::ALL.len()],
    request_duration: LocalHistogram,
    queue_wait: LocalHistogram,
    worker_busy_seconds: LocalCounter,
    received_bytes: LocalIntCounter,
    sent_bytes: LocalIntCounter,
    inflight: IntGauge,
    workers_busy: IntGauge,
    last_flush: Instant,
}

impl Recorder {
    /// Longest a busy thread keeps counts to itself.
    pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

    /// A request body of `bytes` was read.
    #[inline]
    pub fn request_read(&mut self, bytes: usize) {
        if self.enabled {
            self.received_bytes.inc_by(bytes as u64);
        }
    }

    /// Requests read and not yet answered (live).
    #[inline]
    pub fn set_inflight(&self, n: usize) {
        if self.enabled {
            self.inflight.set(n as i64);
        }
    }

    /// A worker picked up a request that waited `wait` since it was read.
    #[inline]
    pub fn picked_up(&mut self, wait: Duration) {
        if self.enabled {
            self.queue_wait.observe(wait.as_secs_f64());
        }
    }

    /// A request was answered with `outcome` (`None` is `OK`); `latency` is from read to
    /// reply for requests that were admitted, `None` for those refused at once.
    #[inline]
    pub fn replied(&mut self, outcome: Option<ErrorCode>, latency: Option<Duration>) {
        if !self.enabled {
            return;
        }
        match outcome {
            None => self.requests_ok.inc(),
            Some(code) => self.requests_err[code.index()].inc(),
        }
        if let Some(latency) = latency {
            self.request_duration.observe(latency.as_secs_f64());
        }
    }

    /// A reply body of `bytes` left through the front socket.
    #[inline]
    pub fn reply_sent(&mut self, bytes: usize) {
        if self.enabled {
            self.sent_bytes.inc_by(bytes as u64);
        }
    }

    /// A worker started running a request (live gauge).
    #[inline]
    pub fn worker_started(&self) {
        if self.enabled {
            self.workers_busy.inc();
        }
    }

    /// A worker finished a request after `busy` in its handler.
    #[inline]
    pub fn worker_finished(&mut self, busy: Duration) {
        if self.enabled {
            self.workers_busy.dec();
            self.worker_busy_seconds.inc_by(busy.as_secs_f64());
        }
    }

    /// Publishes the local counts.
    pub fn flush(&mut self) {
        self.requests_ok.flush();
        for counter in &self.requests_err {
            counter.flush();
        }
        self.request_duration.flush();
        self.queue_wait.flush();
        self.worker_busy_seconds.flush();
        self.received_bytes.flush();
        self.sent_bytes.flush();
        self.last_flush = Instant::now();
    }

    /// Publishes the local counts if the last flush was [`Recorder::FLUSH_EVERY`] ago.
    #[inline]
    pub fn flush_if_due(&mut self, now: Instant) {
        if now.duration_since(self.last_flush) >= Recorder::FLUSH_EVERY {
            self.flush();
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_is_exported_from_the_start() {
        let metrics = Metrics::new("test").expect("metrics register");
        let mut recorder = metrics.recorder();
        recorder.replied(None, Some(Duration::from_micros(30)));
        recorder.replied(Some(ErrorCode::Timeout), None);
        metrics.count_drop(DropReason::Hwm);
        let text = String::from_utf8(metrics.encode().expect("encode")).expect("utf8");
        assert!(
            text.contains("broker_requests_total{outcome=\"ok\"} 0"),
            "not before a flush"
        );
        recorder.flush();
        let text = String::from_utf8(metrics.encode().expect("encode")).expect("utf8");
        assert!(text.contains("broker_requests_total{outcome=\"ok\"} 1"));
        assert!(text.contains("broker_requests_total{outcome=\"timeout\"} 1"));
        assert!(text.contains("broker_requests_total{outcome=\"draining\"} 0"));
        assert!(text.contains("broker_replies_dropped_total{reason=\"hwm\"} 1"));
        assert!(text.contains("broker_build_info{version=\"test\"} 1"));
        assert!(text.contains("broker_request_duration_seconds_bucket{le=\"0.000025\"} 0"));
        assert!(text.contains("broker_request_duration_seconds_bucket{le=\"0.00005\"} 1"));
    }

    #[test]
    fn disabled_metrics_skip_per_request_updates() {
        let mut metrics = Metrics::new("test").expect("metrics register");
        metrics.set_enabled(false);
        let mut recorder = metrics.recorder();
        recorder.replied(None, Some(Duration::from_micros(30)));
        recorder.request_read(10);
        recorder.flush();
        let text = String::from_utf8(metrics.encode().expect("encode")).expect("utf8");
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
