//! The per-thread [`Recorder`] of per-request metrics: plain local counts and histograms that
//! the thread publishes now and then, so the hot path takes no lock and no atomic add.

use std::time::{Duration, Instant};

use prometheus::local::{LocalCounter, LocalHistogram, LocalIntCounter};
use prometheus::IntGauge;

use super::RefusedReason;
use crate::protocol::ErrorCode;

/// Per-request metric updates for one thread (the coordinator, or one worker). Each update is
/// a few plain memory operations; [`Recorder::flush`] publishes them, so a scrape sees them
/// once the thread flushes: the coordinator before every poll, a worker before it goes idle
/// and at least every [`Recorder::FLUSH_EVERY`] while busy. Gauges stay live (atomic).
pub struct Recorder {
    pub(super) enabled: bool,
    pub(super) requests_ok: LocalIntCounter,
    pub(super) requests_err: [LocalIntCounter; ErrorCode::ALL.len()],
    pub(super) request_duration: LocalHistogram,
    pub(super) queue_wait: LocalHistogram,
    pub(super) worker_busy_seconds: LocalCounter,
    pub(super) received_bytes: LocalIntCounter,
    pub(super) sent_bytes: LocalIntCounter,
    pub(super) workers_busy: IntGauge,
    /// Per [`RefusedReason`], by its index.
    pub(super) refused: Vec<LocalIntCounter>,
    pub(super) last_flush: Instant,
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

    /// A request was refused without being run.
    #[inline]
    pub fn refused(&mut self, reason: RefusedReason) {
        if self.enabled {
            if let Some(counter) = self.refused.get_mut(reason.index()) {
                counter.inc();
            }
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
        for counter in &self.refused {
            counter.flush();
        }
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
