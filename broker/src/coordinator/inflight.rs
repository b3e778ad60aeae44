//! The in-flight table: every request the coordinator has read and not yet answered, with
//! everything that is counted about them together, so no count can drift from another: the
//! requests held (against `--max-inflight`), their bytes (against `--max-inflight-bytes`),
//! the time integral of requests held (`broker_inflight_seconds_total`) and the live
//! `broker_inflight_requests` gauge.

use std::os::fd::RawFd;
use std::time::Instant;

use prometheus::IntGauge;
use shared::Metrics;
use worker::Ticket;
use zmq::Message;

use super::slab::Slab;

/// Where a request came from: the connection it arrived on, for its reply's byte accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// libzmq's fd of the connection.
    pub fd: RawFd,
    /// The connection's serial number (fd numbers are reused).
    pub conn: u64,
}

/// One request read and not yet answered. Its body travels with it to a worker.
#[derive(Debug)]
pub struct Entry {
    /// The frames the reply goes back with.
    pub envelope: Vec<Message>,
    /// Its connection, when known.
    pub origin: Option<Origin>,
    /// When it was read.
    pub received: Instant,
    /// What it counts against `--max-inflight-bytes`.
    pub cost: usize,
}

/// The time integral of requests held since the table was made.
#[derive(Debug)]
struct Held {
    seconds: f64,
    since: Instant,
}

/// The requests held, and their counts.
pub struct InFlight {
    slab: Slab<Entry>,
    bytes: usize,
    max_bytes: usize,
    held: Held,
    gauge: IntGauge,
}

impl InFlight {
    /// An empty table for at most `max` requests and `max_bytes` of cost; `gauge` is the live
    /// count's gauge.
    pub fn new(max: usize, max_bytes: usize, gauge: IntGauge, now: Instant) -> InFlight {
        InFlight {
            slab: Slab::new(max),
            bytes: 0,
            max_bytes,
            held: Held {
                seconds: 0.0,
                since: now,
            },
            gauge,
        }
    }

    /// Requests held.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// True when another request would be over `--max-inflight`.
    pub fn is_full(&self) -> bool {
        self.slab.is_full()
    }

    /// Cost held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when a request costing `cost` fits under `--max-inflight-bytes`.
    pub fn fits(&self, cost: usize) -> bool {
        self.bytes.saturating_add(cost) <= self.max_bytes
    }

    /// Holds `entry` from `now` on; when full, gives it back. The caller has checked
    /// [`InFlight::fits`]: the byte bound is admission's decision, the count a hard one.
    pub fn insert(&mut self, entry: Entry, now: Instant) -> Result<Ticket, Entry> {
        let cost = entry.cost;
        self.integrate(now);
        let ticket = self.slab.insert(entry)?;
        self.bytes += cost;
        self.gauge.set(self.slab.len() as i64);
        Ok(ticket)
    }

    /// Releases the request `ticket` names at `now`; `None` for a stale or unknown ticket (its
    /// request was already answered).
    pub fn remove(&mut self, ticket: Ticket, now: Instant) -> Option<Entry> {
        self.integrate(now);
        let entry = self.slab.remove(ticket)?;
        self.bytes -= entry.cost;
        self.gauge.set(self.slab.len() as i64);
        Some(entry)
    }

    /// Releases every request held (the drain deadline).
    pub fn remove_all(&mut self, now: Instant) -> Vec<Entry> {
        self.slab
            .tickets()
            .into_iter()
            .filter_map(|ticket| self.remove(ticket, now))
            .collect()
    }

    /// Releases every request held for connection `conn` (closed at the end of its age's
    /// grace).
    pub fn remove_from(&mut self, conn: u64, now: Instant) -> Vec<Entry> {
        let tickets: Vec<Ticket> = self
            .slab
            .tickets()
            .into_iter()
            .filter(|t| {
                self.slab
                    .get(*t)
                    .is_some_and(|e| e.origin.is_some_and(|o| o.conn == conn))
            })
            .collect();
        tickets
            .into_iter()
            .filter_map(|ticket| self.remove(ticket, now))
            .collect()
    }

    /// The request-seconds held up to `now`.
    pub fn held_seconds(&mut self, now: Instant) -> f64 {
        self.integrate(now);
        self.held.seconds
    }

    /// Publishes the integral and the byte gauge as of `now` (the count gauge is live).
    pub fn publish(&mut self, metrics: &Metrics, now: Instant) {
        self.integrate(now);
        metrics.set_held(self.held.seconds, self.slab.len(), self.held.since);
        metrics.set_inflight_bytes(self.bytes);
    }

    /// Adds what the requests held accrued since the last change.
    fn integrate(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.held.since).as_secs_f64();
        self.held.seconds += self.slab.len() as f64 * elapsed;
        self.held.since = self.held.since.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(cost: usize, now: Instant) -> Entry {
        Entry {
            envelope: vec![Message::from("id")],
            origin: None,
            received: now,
            cost,
        }
    }

    fn table(max: usize, max_bytes: usize, now: Instant) -> (InFlight, IntGauge) {
        let gauge = IntGauge::new("test_inflight", "test").expect("gauge");
        (InFlight::new(max, max_bytes, gauge.clone(), now), gauge)
    }

    #[test]
    fn counts_bytes_and_the_gauge_move_together() {
        let t0 = Instant::now();
        let (mut t, gauge) = table(2, 100, t0);
        assert!(t.fits(100) && !t.fits(101));
        let a = t.insert(entry(60, t0), t0).expect("room");
        assert_eq!((t.len(), t.bytes(), gauge.get()), (1, 60, 1));
        assert!(
            t.fits(40) && !t.fits(41),
            "the byte bound counts what is held"
        );
        let b = t.insert(entry(40, t0), t0).expect("room");
        assert!(t.is_full());
        let refused = t.insert(entry(0, t0), t0).expect_err("over --max-inflight");
        assert_eq!(refused.cost, 0);
        assert_eq!((t.len(), t.bytes(), gauge.get()), (2, 100, 2));
        assert_eq!(t.remove(a, t0).map(|e| e.cost), Some(60));
        assert!(t.remove(a, t0).is_none(), "a stale ticket releases nothing");
        assert_eq!((t.len(), t.bytes(), gauge.get()), (1, 40, 1));
        assert_eq!(t.remove(b, t0).map(|e| e.cost), Some(40));
        assert!(t.is_empty());
        assert_eq!((t.bytes(), gauge.get()), (0, 0));
    }

    #[test]
    fn a_connections_requests_are_released_together() {
        let t0 = Instant::now();
        let (mut t, gauge) = table(10, 1000, t0);
        let from = |conn, cost| Entry {
            origin: Some(Origin { fd: 7, conn }),
            ..entry(cost, t0)
        };
        t.insert(from(1, 10), t0).expect("room");
        let other = t.insert(from(2, 20), t0).expect("room");
        t.insert(from(1, 30), t0).expect("room");
        t.insert(entry(40, t0), t0).expect("room");
        let mut given_up: Vec<usize> = t.remove_from(1, t0).iter().map(|e| e.cost).collect();
        given_up.sort_unstable();
        assert_eq!(given_up, [10, 30]);
        assert_eq!((t.len(), t.bytes(), gauge.get()), (2, 60, 2));
        assert!(t.remove_from(1, t0).is_empty());
        assert_eq!(t.remove(other, t0).map(|e| e.cost), Some(20));
    }

    #[test]
    fn held_seconds_integrate_the_count_over_time() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let (mut t, _) = table(10, 1000, t0);
        // Two held for 2 s, then one for 3 s: 7 request-seconds.
        let a = t.insert(entry(1, t0), t0).expect("room");
        t.insert(entry(1, t0), t0).expect("room");
        t.remove(a, t0 + s(2));
        assert!((t.held_seconds(t0 + s(5)) - 7.0).abs() < 1e-9);
        // A clock reading from before the last change adds nothing, and takes nothing away.
        assert!((t.held_seconds(t0 + s(4)) - 7.0).abs() < 1e-9);
        let all = t.remove_all(t0 + s(6));
        assert_eq!(all.len(), 1);
        assert!((t.held_seconds(t0 + s(100)) - 8.0).abs() < 1e-9);
    }
}
