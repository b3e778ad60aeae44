//! `broker_demand_seconds_total`, the autoscaling signal: seconds of work asked of the pool.
//! It is the time workers spent in handlers (requests running now included, so the counter is
//! exact at any scrape) plus, for every request refused for load, the mean service time it
//! would have cost. `rate(...) / broker_workers` is then the offered load per worker: below
//! capacity it equals utilisation, above it it keeps growing with what was turned away, so an
//! autoscaler still sees demand when admission keeps the queue short.
//!
//! A refusal is answered in microseconds, so a client that retries at once can be refused far
//! faster than the pool could ever have served it: refused demand is therefore counted at most
//! [`REFUSED_PER_WORKER`] seconds per second per worker ([`RefusedAllowance`]), and one pod's
//! signal never claims more than that plus its capacity. Which refusals count at all is
//! `admission::counts_as_demand`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Metric, MetricFamily, MetricType};
use shared::metrics::names;
use worker::Activity;

/// The most refused demand counted, in seconds per second per worker: the signal reads at most
/// this plus 1 per worker (ten times capacity asks an HPA for at most about 16 times the
/// pods, which its own scale-up policy then paces).
pub const REFUSED_PER_WORKER: f64 = 10.0;

/// The demand counter's sources.
#[derive(Debug)]
pub struct Demand {
    activity: Arc<Activity>,
    /// Seconds of refused work, as `f64` bits: it cannot wrap, and it has one writer (the
    /// coordinator), so a load and a store add to it.
    refused_secs: AtomicU64,
    /// The last value reported: a counter never goes down, even when a request that just
    /// finished is counted between its two halves (see `Activity::end`).
    reported: Mutex<f64>,
}

impl Demand {
    /// Demand of the pool whose workers report to `activity`.
    pub fn new(activity: Arc<Activity>) -> Demand {
        Demand {
            activity,
            refused_secs: AtomicU64::new(0.0f64.to_bits()),
            reported: Mutex::new(0.0),
        }
    }

    /// Counts `seconds` of refused work. Called by the coordinator alone (one writer).
    pub fn refused(&self, seconds: f64) {
        let total = f64::from_bits(self.refused_secs.load(Ordering::Relaxed)) + seconds;
        self.refused_secs.store(total.to_bits(), Ordering::Relaxed);
    }

    /// Seconds of work asked of the pool so far.
    pub fn seconds(&self) -> f64 {
        let refused = f64::from_bits(self.refused_secs.load(Ordering::Relaxed));
        let value = self.activity.busy_seconds() + refused;
        let mut reported = self.reported.lock();
        *reported = reported.max(value);
        *reported
    }
}

/// How much refused demand may still be counted: a token bucket the coordinator owns, filled at
/// [`REFUSED_PER_WORKER`] seconds per second per worker and holding at most one second of that.
#[derive(Debug)]
pub struct RefusedAllowance {
    per_second: f64,
    left: f64,
    filled: Instant,
}

impl RefusedAllowance {
    /// A full allowance for `workers` workers, as of `now`.
    pub fn new(workers: usize, now: Instant) -> RefusedAllowance {
        let per_second = REFUSED_PER_WORKER * workers.max(1) as f64;
        RefusedAllowance {
            per_second,
            left: per_second,
            filled: now,
        }
    }

    /// How many seconds of a refused request that would have taken `service` may be counted
    /// at `now`: all of it while the allowance lasts, then what has been refilled since.
    pub fn take(&mut self, now: Instant, service: Duration) -> f64 {
        let refill = now.saturating_duration_since(self.filled).as_secs_f64() * self.per_second;
        self.left = (self.left + refill).min(self.per_second);
        self.filled = self.filled.max(now);
        let counted = service.as_secs_f64().min(self.left);
        self.left -= counted;
        counted
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
                 included) plus the mean service time of every request refused for load \
                 that more pods would have served, at most 10 s per second per worker; \
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
        demand.refused(0.01);
        demand.refused(0.01);
        assert!((demand.seconds() - 0.02).abs() < 1e-12);
        // Reported once, never less.
        *demand.reported.lock() = 5.0;
        assert_eq!(demand.seconds(), 5.0);
    }

    #[test]
    fn refused_demand_is_counted_up_to_ten_seconds_per_second_per_worker() {
        let t0 = Instant::now();
        let mut allowance = RefusedAllowance::new(2, t0);
        let ms = Duration::from_millis(1);
        // A storm of 100 ms refusals: one second's worth (20 s for two workers) at once...
        let burst: f64 = (0..1000).map(|_| allowance.take(t0, 100 * ms)).sum();
        assert!((burst - 20.0).abs() < 1e-9, "{burst}");
        // ...then 20 s per second, however many are refused.
        let next: f64 = (0..1000)
            .map(|_| allowance.take(t0 + 500 * ms, 100 * ms))
            .sum();
        assert!((next - 10.0).abs() < 1e-9, "{next}");
        // Below the cap every refusal counts in full; the bucket holds one second at most.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(allowance.take(later, 10 * ms), 0.01);
        let full: f64 = (0..1000).map(|_| allowance.take(later, 100 * ms)).sum();
        assert!((full - 19.99).abs() < 1e-9, "{full}");
        // A clock read out of order refills nothing.
        assert_eq!(allowance.take(t0, 100 * ms), 0.0);
    }
}
