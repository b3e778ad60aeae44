//! `broker_demand_seconds_total`, the autoscaling signal: seconds of work asked of the pool.
//! It is the time workers spent in handlers (requests running now included, so the counter is
//! exact at any scrape) plus, for every request refused for load, the mean service time it
//! would have cost. `rate(...) / broker_workers` is then the offered load per worker: below
//! capacity it equals utilisation, above it it keeps growing with what was turned away, so an
//! autoscaler still sees demand when admission keeps the queue short.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Metric, MetricFamily, MetricType};
use shared::metrics::names;
use worker::Activity;

/// The demand counter's sources.
#[derive(Debug)]
pub struct Demand {
    activity: Arc<Activity>,
    /// Service time of refused requests, nanoseconds.
    refused_ns: AtomicU64,
    /// The last value reported: a counter never goes down, even when a request that just
    /// finished is counted between its two halves (see `Activity::end`).
    reported: Mutex<f64>,
}

impl Demand {
    /// Demand of the pool whose workers report to `activity`.
    pub fn new(activity: Arc<Activity>) -> Demand {
        Demand {
            activity,
            refused_ns: AtomicU64::new(0),
            reported: Mutex::new(0.0),
        }
    }

    /// A request was refused for load; it would have taken `service`.
    pub fn refused(&self, service: Duration) {
        let nanos = u64::try_from(service.as_nanos()).unwrap_or(u64::MAX);
        self.refused_ns.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Seconds of work asked of the pool so far.
    pub fn seconds(&self) -> f64 {
        let value =
            self.activity.busy_seconds() + self.refused_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let mut reported = self.reported.lock();
        *reported = reported.max(value);
        *reported
    }
}

/// The collector that exports [`Demand`].
pub struct DemandCollector {
    desc: Desc,
    demand: Arc<Demand>,
}

impl DemandCollector {
    /// A collector of `demand`.
    pub fn new(demand: Arc<Demand>) -> prometheus::Result<DemandCollector> {
        Ok(DemandCollector {
            desc: Desc::new(
                names::DEMAND_SECONDS_TOTAL.into(),
                "Seconds of work asked of the pool: time in handlers (running requests \
                 included) plus the mean service time of every request refused for load; \
                 rate / broker_workers is the offered load per worker, the autoscaling signal."
                    .into(),
                Vec::new(),
                Default::default(),
            )?,
            demand,
        })
    }
}

impl Collector for DemandCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut counter = Counter::default();
        counter.set_value(self.demand.seconds());
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
    use super::*;

    #[test]
    fn refused_demand_adds_to_the_pools_busy_time_and_the_counter_never_falls() {
        let demand = Demand::new(Arc::new(Activity::new(2)));
        assert_eq!(demand.seconds(), 0.0);
        demand.refused(Duration::from_millis(10));
        demand.refused(Duration::from_millis(10));
        assert!((demand.seconds() - 0.02).abs() < 1e-12);
        // Reported once, never less.
        *demand.reported.lock() = 5.0;
        assert_eq!(demand.seconds(), 5.0);
    }
}
