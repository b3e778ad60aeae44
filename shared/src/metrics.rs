//! The Prometheus metrics: their names (public interface, listed in the README), their
//! buckets, and one [`Metrics`] value on an explicit registry that the broker shares with its
//! workers. Handles are resolved once here so the hot path touches only plain counters.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::local::{LocalCounter, LocalHistogram, LocalIntCounter};
use prometheus::proto::{Counter as CounterProto, Metric, MetricFamily, MetricType};
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
    /// The time integral of requests held: `rate / broker_workers` is the mean concurrency
    /// per worker, the autoscaling signal.
    pub const INFLIGHT_SECONDS_TOTAL: &str = "broker_inflight_seconds_total";
    /// Request bytes held (what `--max-inflight-bytes` bounds).
    pub const INFLIGHT_BYTES: &str = "broker_inflight_bytes";
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
    /// Front connections open.
    pub const CONNECTIONS: &str = "broker_connections";
    /// Front connections refused, by reason.
    pub const CONNECTIONS_REFUSED_TOTAL: &str = "broker_connections_refused_total";
    /// Front connections the broker closed to stay within its bounds, by reason.
    pub const CONNECTIONS_RESET_TOTAL: &str = "broker_connections_reset_total";
    /// Bytes held for front connections in libzmq and the kernel, by direction.
    pub const BUFFERED_BYTES: &str = "broker_buffered_bytes";
    /// 1 while the broker refuses new work because it is near its memory limit.
    pub const MEMORY_SHEDDING: &str = "broker_memory_shedding";
    /// 1 from SIGTERM on.
    pub const DRAINING: &str = "broker_draining";
    /// Client keys in force from `--curve-allow-keys`.
    pub const CURVE_ALLOWED_KEYS: &str = "broker_curve_allowed_keys";
    /// Reads of a changed `--curve-allow-keys` file, by result.
    pub const CURVE_KEY_RELOADS_TOTAL: &str = "broker_curve_key_reloads_total";
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
    /// The client disconnected before its reply left.
    PeerGone,
    /// The client is not reading: its queue is at the high-water mark or holds
    /// `--max-connection-bytes`.
    Hwm,
    /// All connections together hold `--max-buffered-bytes`.
    Budget,
    /// The broker reset the connection (over a bound, stalled, or its key revoked) with replies
    /// still queued or still being handled.
    Reset,
}

impl DropReason {
    const ALL: [DropReason; 4] = [
        DropReason::PeerGone,
        DropReason::Hwm,
        DropReason::Budget,
        DropReason::Reset,
    ];

    /// The metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::PeerGone => "peer_gone",
            DropReason::Hwm => "hwm",
            DropReason::Budget => "budget",
            DropReason::Reset => "reset",
        }
    }
}

/// Reasons a connection is refused, pre-registered so every series exists from the start.
/// - `allowlist`: its address is outside `--allow-from`;
/// - `limit`: `--max-connections` were open;
/// - `client_key`: its CURVE public key is not in `--curve-allow-keys`;
/// - `server_key`: its CURVE handshake could not be decrypted (it has the wrong server key);
/// - `mechanism`: it did not speak CURVE to a CURVE front (a plaintext client), or the reverse;
/// - `handshake`: it hung up before finishing its handshake (a plaintext client that noticed the
///   mismatch before the broker did shows here), or sent malformed or out-of-order commands.
pub const REFUSAL_REASONS: &[&str] = &[
    "allowlist",
    "limit",
    "client_key",
    "server_key",
    "mechanism",
    "handshake",
];
/// Reasons a connection is reset (see `broker::conns::ResetReason`).
pub const RESET_REASONS: &[&str] = &["oversized", "stalled", "budget", "memory", "revoked"];

/// Every metric the broker exports, on its own registry. The hot path updates it through a
/// per-thread [`Recorder`]; with [`Metrics::set_enabled`]`(false)` recorders do nothing (the
/// benchmarks' metrics-off baseline).
pub struct Metrics {
    registry: Registry,
    enabled: bool,
    requests_ok: IntCounter,
    requests_err: [IntCounter; ErrorCode::ALL.len()],
    dropped: [IntCounter; DropReason::ALL.len()],
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
    connections: IntGauge,
    refused: IntCounterVec,
    resets: IntCounterVec,
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
        for reason in REFUSAL_REASONS {
            refused.with_label_values(&[reason]);
        }
        for reason in RESET_REASONS {
            resets.with_label_values(&[reason]);
        }
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
            dropped: DropReason::ALL.map(|reason| dropped.with_label_values(&[reason.as_str()])),
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
            received_bytes: counter(names::RECEIVED_BYTES_TOTAL, "Request body bytes read.")?,
            sent_bytes: counter(names::SENT_BYTES_TOTAL, "Reply body bytes sent.")?,
            health_checks: counter(
                names::HEALTH_CHECKS_TOTAL,
                "Health requests answered by the coordinator.",
            )?,
            connections: gauge(names::CONNECTIONS, "Front connections open.")?,
            buffered_in: buffered.with_label_values(&["in"]),
            buffered_out: buffered.with_label_values(&["out"]),
            refused,
            resets,
            shedding: gauge(
                names::MEMORY_SHEDDING,
                "1 while new work is refused because the process is near its memory limit.",
            )?,
            draining: gauge(names::DRAINING, "1 from the first SIGTERM/SIGINT on.")?,
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
            inflight: self.inflight.clone(),
            workers_busy: self.workers_busy.clone(),
            last_flush: Instant::now(),
        }
    }

    /// A health request was answered.
    pub fn health_check(&self) {
        self.health_checks.inc();
    }

    /// A connection was refused (`reason`: one of [`REFUSAL_REASONS`]).
    pub fn connection_refused(&self, reason: &str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    /// Connections were reset (`reason`: one of [`RESET_REASONS`]).
    pub fn connections_reset(&self, reason: &str, n: u64) {
        self.resets.with_label_values(&[reason]).inc_by(n);
    }

    /// `n` replies could not be delivered.
    pub fn count_drops(&self, reason: DropReason, n: u64) {
        let index = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.dropped[index].inc_by(n);
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

/// `broker_inflight_seconds_total`: the coordinator publishes the integral once per turn; a
/// scrape adds what the requests held since then have accrued, so the counter is exact at any
/// instant and `rate()` over any window is the mean number held.
#[derive(Clone)]
struct HeldSeconds {
    desc: Desc,
    state: std::sync::Arc<Mutex<HeldState>>,
}

struct HeldState {
    seconds: f64,
    count: usize,
    since: Instant,
    /// The last value reported: a counter never goes down, even if a turn's publication
    /// lands below an extrapolation (the count fell in between).
    reported: f64,
}

impl HeldSeconds {
    fn new() -> Result<HeldSeconds> {
        Ok(HeldSeconds {
            desc: Desc::new(
                names::INFLIGHT_SECONDS_TOTAL.into(),
                "Time integral of requests held (queued + running); rate / broker_workers is the \
                 mean concurrency per worker."
                    .into(),
                Vec::new(),
                Default::default(),
            )?,
            state: std::sync::Arc::new(Mutex::new(HeldState {
                seconds: 0.0,
                count: 0,
                since: Instant::now(),
                reported: 0.0,
            })),
        })
    }

    fn value(&self, now: Instant) -> f64 {
        let mut s = self.state.lock();
        let value =
            s.seconds + s.count as f64 * now.saturating_duration_since(s.since).as_secs_f64();
        s.reported = s.reported.max(value);
        s.reported
    }
}

impl Collector for HeldSeconds {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut counter = CounterProto::default();
        counter.set_value(self.value(Instant::now()));
        let mut metric = Metric::default();
        metric.set_counter(counter);
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::COUNTER);
        family.set_metric(vec![metric]);
        vec![family]
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
    fn held_seconds_integrate_between_publications_and_never_fall() {
        let metrics = Metrics::new("test").expect("metrics register");
        let t0 = Instant::now() - Duration::from_secs(10);
        // 4 requests held for the last 10 s on top of 2.5 s accumulated earlier.
        metrics.set_held(2.5, 4, t0);
        let value = metrics.held.value(t0 + Duration::from_secs(10));
        assert!((value - 42.5).abs() < 1e-9, "{value}");
        // A later publication that lands below what was reported cannot make it fall.
        metrics.set_held(40.0, 0, t0 + Duration::from_secs(11));
        assert!((metrics.held.value(t0 + Duration::from_secs(11)) - 42.5).abs() < 1e-9);
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
