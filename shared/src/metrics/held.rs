//! `broker_inflight_seconds_total`, the time integral of requests held: the coordinator
//! publishes the integral once per turn, and a scrape adds what the requests held since then
//! have accrued, so the counter is exact at any instant.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter as CounterProto, Metric, MetricFamily, MetricType};

use super::{names, Result};

/// `broker_inflight_seconds_total`: the coordinator publishes the integral once per turn; a
/// scrape adds what the requests held since then have accrued, so the counter is exact at any
/// instant and `rate()` over any window is the mean number held.
#[derive(Clone)]
pub(super) struct HeldSeconds {
    desc: Desc,
    pub(super) state: Arc<Mutex<HeldState>>,
}

pub(super) struct HeldState {
    pub(super) seconds: f64,
    pub(super) count: usize,
    pub(super) since: Instant,
    /// The last value reported: a counter never goes down, even if a turn's publication
    /// lands below an extrapolation (the count fell in between).
    reported: f64,
}

impl HeldSeconds {
    pub(super) fn new() -> Result<HeldSeconds> {
        Ok(HeldSeconds {
            desc: Desc::new(
                names::INFLIGHT_SECONDS_TOTAL.into(),
                "Time integral of requests held (queued + running); rate / broker_workers is the \
                 mean concurrency per worker."
                    .into(),
                Vec::new(),
                Default::default(),
            )?,
            state: Arc::new(Mutex::new(HeldState {
                seconds: 0.0,
                count: 0,
                since: Instant::now(),
                reported: 0.0,
            })),
        })
    }

    pub(super) fn value(&self, now: Instant) -> f64 {
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    #[test]
    fn held_seconds_integrate_between_publications_and_never_fall() {
        let metrics = crate::Metrics::new("test").expect("metrics register");
        let t0 = Instant::now() - Duration::from_secs(10);
        // 4 requests held for the last 10 s on top of 2.5 s accumulated earlier.
        metrics.set_held(2.5, 4, t0);
        let value = metrics.held.value(t0 + Duration::from_secs(10));
        assert!((value - 42.5).abs() < 1e-9, "{value}");
        // A later publication that lands below what was reported cannot make it fall.
        metrics.set_held(40.0, 0, t0 + Duration::from_secs(11));
        assert!((metrics.held.value(t0 + Duration::from_secs(11)) - 42.5).abs() < 1e-9);
    }
}
