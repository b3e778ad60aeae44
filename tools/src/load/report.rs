//! What a load run measured ([`Report`]): counts, the latency histogram, the load client's own
//! CPU, and the two forms `broker bench` prints (text for people, `--json` for scripts), with
//! the rule for when a run failed.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// What a run measured.
#[derive(Debug)]
pub struct Report {
    /// Requests sent.
    pub sent: u64,
    /// `OK` replies that matched their request and came within its timeout.
    pub ok: u64,
    /// `OK` replies that matched their request but came after its timeout: the client had
    /// given up, so the work was done for nobody.
    pub late: u64,
    /// `ERR` replies by code.
    pub errors: BTreeMap<String, u64>,
    /// Replies that did not match a request, or a request's body, or the protocol.
    pub mismatched: u64,
    /// Requests whose reply never came.
    pub lost: u64,
    /// Wall time of the sending phase.
    pub elapsed: Duration,
    /// Wall time of the whole run, to the last reply (or the end of the drain).
    pub total: Duration,
    /// Latency of OK replies within their timeout, microseconds.
    pub latency: Histogram<u64>,
    /// The busiest driver thread's CPU time over its wall time.
    pub driver_cpu: f64,
    /// The whole process's CPU time (libzmq's I/O threads included) over wall time times the
    /// CPUs it may use.
    pub process_cpu: f64,
}

/// A driver thread or the process above this share of its CPU was the bottleneck.
pub const SATURATED: f64 = 0.9;

impl Report {
    pub(crate) fn empty() -> Report {
        Report {
            sent: 0,
            ok: 0,
            late: 0,
            errors: BTreeMap::new(),
            mismatched: 0,
            lost: 0,
            elapsed: Duration::ZERO,
            total: Duration::ZERO,
            latency: new_histogram(),
            driver_cpu: 0.0,
            process_cpu: 0.0,
        }
    }

    /// OK replies (within their timeout) per second.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Replies of any kind, late ones included.
    pub fn answered(&self) -> u64 {
        self.ok + self.late + self.errors.values().sum::<u64>()
    }

    /// True when the load client itself ran out of CPU: its figures are a floor.
    pub fn saturated(&self) -> bool {
        self.driver_cpu >= SATURATED || self.process_cpu >= SATURATED
    }

    /// Why the run failed, if it did: nothing answered, no OK in time, or a reply lost or wrong.
    pub fn failure(&self) -> Option<String> {
        if self.sent == 0 {
            return Some("no request could be sent (nothing connected)".into());
        }
        if self.lost > 0 || self.mismatched > 0 {
            return Some(format!(
                "{} replies lost and {} wrong",
                self.lost, self.mismatched
            ));
        }
        if self.answered() == 0 {
            return Some("no replies".into());
        }
        if self.ok == 0 && self.late > 0 {
            return Some(format!(
                "no OK reply within --timeout ({} late, {} errors)",
                self.late,
                self.answered() - self.late
            ));
        }
        if self.ok == 0 {
            return Some("every reply was an error".into());
        }
        None
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let q = |p: f64| self.latency.value_at_quantile(p);
        serde_json::json!({
            "sent": self.sent,
            "ok": self.ok,
            "late": self.late,
            "errors": self.errors,
            "mismatched": self.mismatched,
            "lost": self.lost,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "throughput_rps": self.throughput(),
            "latency_us": {
                "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999),
                "max": self.latency.max(), "mean": self.latency.mean(),
            },
            "driver_cpu": self.driver_cpu,
            "process_cpu": self.process_cpu,
            "client_saturated": self.saturated(),
        })
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        let q = |p: f64| self.latency.value_at_quantile(p) as f64 / 1000.0;
        let mut out = format!(
            "requests {} ok {} late {} mismatched {} lost {} in {:.2}s\n\
             throughput {:.0} req/s\n\
             latency ms p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}\n\
             client cpu: busiest driver thread {:.0}%, process {:.0}% of its CPUs\n",
            self.sent,
            self.ok,
            self.late,
            self.mismatched,
            self.lost,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            self.latency.max() as f64 / 1000.0,
            self.driver_cpu * 100.0,
            self.process_cpu * 100.0,
        );
        for (code, n) in &self.errors {
            out.push_str(&format!("ERR {code}: {n}\n"));
        }
        if self.saturated() {
            out.push_str(
                "warning: the load client was CPU-bound; the server may be faster than shown \
                 (add --threads or run the client elsewhere)\n",
            );
        }
        out
    }

    pub(crate) fn merge(&mut self, part: Report) {
        self.sent += part.sent;
        self.ok += part.ok;
        self.late += part.late;
        self.mismatched += part.mismatched;
        self.lost += part.lost;
        self.elapsed = self.elapsed.max(part.elapsed);
        for (code, n) in part.errors {
            *self.errors.entry(code).or_default() += n;
        }
        let _ = self.latency.add(&part.latency);
        self.driver_cpu = self.driver_cpu.max(part.driver_cpu);
    }
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 µs to 1 hour at 3 significant digits; cannot fail with these bounds.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}
