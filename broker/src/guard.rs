//! The guard thread: keeps what the front connections make libzmq and the kernel hold inside
//! its bounds, and the process inside its memory limit.
//!
//! Every scan (each [`SCAN_EVERY`], and at once when memory grows fast) it reads every
//! connection's `TCP_INFO` through the broker's duplicate socket and resets (shuts down) a
//! connection that
//! - holds more than `--max-connection-bytes` inbound (a request larger than any allowed
//!   arriving, or many unread ones): `oversized`;
//! - holds more than [`STALL_FLOOR`] bytes and has made no progress for `--stall-timeout`
//!   (no complete request in, or none of its replies taken): `stalled`;
//! - is among the largest inbound holders while all connections together hold more than
//!   `--max-buffered-bytes` inbound: `budget`. (Outbound, the coordinator keeps the total
//!   under the same figure by dropping replies that do not fit.)
//!
//! The last resort: every [`TICK`] it reads the process's resident memory. Above
//! [`SHED_AT_PERCENT`] of the memory limit the broker refuses new work (`ERR overloaded`) and
//! resets the largest holders until it is below [`RESUME_AT_PERCENT`]. This catches what the
//! byte counts cannot see, such as a message of thousands of tiny frames (libzmq keeps a
//! 64-byte `zmq_msg_t` per frame) arriving faster than a scan.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use shared::Metrics;

use shared::metrics::ResetReason;

use crate::conns::{Conn, Registry};

/// How often resident memory is read above half the memory limit: an attack of tiny frames
/// grows libzmq's memory by a few MiB per millisecond on loopback.
pub const TICK: Duration = Duration::from_millis(2);
/// How often below half the limit (or without one): from there the fastest growth measured
/// cannot reach the shedding mark within one relaxed tick, and idle costs less CPU.
pub const TICK_RELAXED: Duration = Duration::from_millis(10);
/// How often every connection is measured when nothing else calls for it.
pub const SCAN_EVERY: Duration = Duration::from_millis(100);
/// Memory growth since the last scan that calls for a scan now.
pub const SCAN_ON_GROWTH: u64 = 16 << 20;
/// Above this share of the memory limit, new work is refused and the largest holders reset.
pub const SHED_AT_PERCENT: u64 = 85;
/// Below this share, new work is taken again.
pub const RESUME_AT_PERCENT: u64 = 75;
/// A connection holding at most this many bytes is never reset for stalling: room for a small
/// request arriving slowly. Kept small because what it lets a connection hold for ever is
/// multiplied by libzmq's per-frame cost when it is a message of tiny frames (4 KiB of empty
/// frames is 128 KiB in libzmq). Heartbeats are credited (see `conns`), not absorbed here.
pub const STALL_FLOOR: u64 = 4 * 1024;
/// Under memory pressure, connections that made no progress for this long are reset before
/// any that did: an attacker's held message makes none, a busy client's requests do.
pub const IDLE_FIRST_AFTER: Duration = Duration::from_secs(1);

/// The guard's bounds.
#[derive(Clone, Debug)]
pub struct Limits {
    /// `--max-connection-bytes`.
    pub connection_bytes: u64,
    /// `--max-buffered-bytes`.
    pub buffered_bytes: u64,
    /// `--stall-timeout`.
    pub stall_timeout: Duration,
    /// `--memory-limit` or the cgroup's.
    pub memory_limit: Option<u64>,
}

/// What the guard shares with the coordinator.
#[derive(Debug, Default)]
pub struct Shared {
    shedding: AtomicBool,
}

impl Shared {
    /// True while new work must be refused to stay inside the memory limit.
    pub fn shedding(&self) -> bool {
        self.shedding.load(Ordering::Relaxed)
    }
}

/// The running guard thread.
pub struct Guard {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Guard {
    /// Starts the `guard` thread.
    pub fn spawn(
        limits: Limits,
        registry: Arc<Registry>,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Guard> {
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let rss = Rss::open();
        let thread = thread::Builder::new().name("guard".into()).spawn(move || {
            let mut guard = Scanner {
                limits,
                registry,
                shared,
                metrics,
                progress: HashMap::new(),
                rss,
                scanned_rss: 0,
                next_scan: Instant::now(),
                next_trim: Instant::now(),
                trim_due: false,
            };
            guard.run(&stopped);
        })?;
        Ok(Guard { stop, thread })
    }

    /// Stops and joins the thread.
    pub fn stop(self) {
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            log::error!("guard thread panicked");
        }
    }
}

/// Progress of one connection between scans.
struct Progress {
    consumed: u64,
    acked: u64,
    /// When it last made inbound progress or held little inbound.
    in_since: Instant,
    /// Likewise outbound.
    out_since: Instant,
}

struct Scanner {
    limits: Limits,
    registry: Arc<Registry>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    progress: HashMap<u64, Progress>,
    rss: Option<Rss>,
    scanned_rss: u64,
    next_scan: Instant,
    next_trim: Instant,
    /// Connections were reset since the last trim: their memory is free but still resident.
    trim_due: bool,
}

impl Scanner {
    fn run(&mut self, stopped: &Receiver<()>) {
        let mut tick = TICK;
        loop {
            match stopped.recv_timeout(tick) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            let rss = self.rss.as_ref().and_then(Rss::read).unwrap_or(0);
            tick = match self.limits.memory_limit {
                Some(limit) if rss >= limit / 2 => TICK,
                _ => TICK_RELAXED,
            };
            let pressure = self.update_shedding(rss);
            if pressure || now >= self.next_scan || rss >= self.scanned_rss + SCAN_ON_GROWTH {
                self.trim_due |= self.scan(now, pressure.then_some(rss)) > 0;
                self.scanned_rss = rss;
                self.next_scan = now + SCAN_EVERY;
            }
            // After resets and while shedding, hand freed memory back to the OS so the
            // resident size reflects what is in use (glibc keeps freed chunks in its arenas):
            // otherwise memory an attacker made libzmq allocate stays resident after it left.
            if (self.trim_due || self.shared.shedding()) && now >= self.next_trim {
                crate::sys::trim_malloc();
                self.trim_due = false;
                self.next_trim = now + SCAN_EVERY;
            }
        }
    }

    /// Turns shedding on above [`SHED_AT_PERCENT`] and off below [`RESUME_AT_PERCENT`];
    /// returns true while above the first.
    fn update_shedding(&self, rss: u64) -> bool {
        let Some(limit) = self.limits.memory_limit else {
            return false;
        };
        let over = rss >= limit / 100 * SHED_AT_PERCENT;
        let was = self.shared.shedding.load(Ordering::Relaxed);
        let now = over || (was && rss >= limit / 100 * RESUME_AT_PERCENT);
        if now != was {
            self.shared.shedding.store(now, Ordering::Relaxed);
            self.metrics.set_shedding(now);
            if now {
                log::warn!(
                    "resident memory {} MiB is near the limit of {} MiB: refusing new work and \
                     resetting the connections that hold the most",
                    rss >> 20,
                    limit >> 20
                );
            } else {
                log::info!("resident memory {} MiB: taking work again", rss >> 20);
            }
        }
        over
    }

    /// Measures every connection and resets those over a bound. With `pressure` (the
    /// resident memory), also resets the largest holders. Returns how many it reset.
    fn scan(&mut self, now: Instant, pressure: Option<u64>) -> u64 {
        let conns = self.registry.snapshot();
        let mut resets = [0u64; ResetReason::ALL.len()];
        // (inbound held, both directions held, no progress for IDLE_FIRST_AFTER, connection)
        let mut holders: Vec<(u64, u64, bool, &Arc<Conn>)> = Vec::with_capacity(conns.len());
        let (mut total_in, mut total_out) = (0u64, 0u64);
        for conn in &conns {
            if conn.reset_reason().is_some() || conn.measure().is_err() {
                continue;
            }
            let (held_in, held_out) = (conn.held_in(), conn.held_out());
            let consumed = conn.consumed.load(Ordering::Relaxed);
            let acked = conn.acked.load(Ordering::Relaxed);
            let p = self.progress.entry(conn.id).or_insert(Progress {
                consumed,
                acked,
                in_since: now,
                out_since: now,
            });
            if consumed != p.consumed || held_in <= STALL_FLOOR {
                p.consumed = consumed;
                p.in_since = now;
            }
            if acked != p.acked || held_out <= STALL_FLOOR {
                p.acked = acked;
                p.out_since = now;
            }
            let stalled = |since: Instant| now.duration_since(since) >= self.limits.stall_timeout;
            let reason = if held_in > self.limits.connection_bytes {
                Some(ResetReason::Oversized)
            } else if stalled(p.in_since) || stalled(p.out_since) {
                Some(ResetReason::Stalled)
            } else {
                None
            };
            if let Some(reason) = reason {
                log::debug!(
                    "connection {}: reset, {} (holds {held_in} bytes in, {held_out} out)",
                    conn.id,
                    reason.as_str(),
                );
                if conn.reset(reason) {
                    resets[reason.index()] += 1;
                }
                continue;
            }
            total_in += held_in;
            total_out += held_out;
            let idle = now.duration_since(p.in_since.min(p.out_since)) >= IDLE_FIRST_AFTER;
            holders.push((held_in, held_in + held_out, idle, conn));
        }
        // Forget connections that are gone.
        if self.progress.len() > conns.len() {
            let live: std::collections::HashSet<u64> = conns.iter().map(|c| c.id).collect();
            self.progress.retain(|id, _| live.contains(id));
        }
        // Inbound over budget: reset the largest inbound holders until under it.
        let mut over = total_in.saturating_sub(self.limits.buffered_bytes);
        if over > 0 {
            holders.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
            for (held_in, _, _, conn) in &holders {
                if over == 0 || *held_in == 0 {
                    break;
                }
                if conn.reset(ResetReason::Budget) {
                    resets[ResetReason::Budget.index()] += 1;
                    over = over.saturating_sub(*held_in);
                    total_in = total_in.saturating_sub(*held_in);
                }
            }
        }
        // Near the memory limit: free at least what lies above the resume mark, connections
        // without progress first, then the largest holders (either direction), and always
        // something if anyone holds anything.
        if let (Some(rss), Some(limit)) = (pressure, self.limits.memory_limit) {
            let mut to_free = rss.saturating_sub(limit / 100 * RESUME_AT_PERCENT).max(1);
            // A connection holding no more than the stall floor cannot be what fills memory
            // (even as tiny frames, 4 KiB is 128 KiB in libzmq): a client between requests,
            // or with a small reply on its way, is left alone.
            holders.retain(|h| h.1 > STALL_FLOOR);
            holders.sort_unstable_by_key(|h| (std::cmp::Reverse(h.2), std::cmp::Reverse(h.1)));
            for (held_in, held, _, conn) in &holders {
                if to_free == 0 {
                    break;
                }
                if conn.reset(ResetReason::Memory) {
                    resets[ResetReason::Memory.index()] += 1;
                    to_free = to_free.saturating_sub(*held);
                    total_in = total_in.saturating_sub(*held_in);
                }
            }
        }
        self.metrics.set_buffered(total_in, total_out);
        self.report(&resets);
        resets.iter().sum()
    }

    fn report(&self, resets: &[u64; ResetReason::ALL.len()]) {
        let mut parts = Vec::new();
        for &reason in ResetReason::ALL {
            let n = resets[reason.index()];
            if n > 0 {
                self.metrics.connections_reset(reason, n);
                parts.push(format!("{n} {}", reason.as_str()));
            }
        }
        // One line per scan at most, however many connections an attack opened.
        if !parts.is_empty() {
            log::warn!("reset connections over their bounds: {}", parts.join(", "));
        }
    }
}

/// The process's resident memory, from /proc/self/statm (kept open: one pread a tick).
struct Rss {
    file: File,
    page: u64,
}

impl Rss {
    fn open() -> Option<Rss> {
        let file = File::open("/proc/self/statm").ok()?;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| u64::try_from(p).ok())
            .unwrap_or(4096);
        Some(Rss { file, page })
    }

    fn read(&self) -> Option<u64> {
        let mut buf = [0u8; 128];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * self.page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_is_read_and_grows_with_use() {
        let rss = Rss::open().expect("statm");
        let before = rss.read().expect("read");
        let block = std::hint::black_box(vec![1u8; 64 << 20]);
        let after = rss.read().expect("read");
        assert!(after >= before + (60 << 20), "{before} -> {after}");
        drop(block);
    }

    #[test]
    fn shedding_turns_on_above_and_off_below_with_hysteresis() {
        let scanner = Scanner {
            limits: Limits {
                connection_bytes: 1,
                buffered_bytes: 1,
                stall_timeout: Duration::from_secs(1),
                memory_limit: Some(1000),
            },
            registry: Arc::new(Registry::default()),
            shared: Arc::new(Shared::default()),
            metrics: Arc::new(Metrics::new("test").expect("metrics")),
            progress: HashMap::new(),
            rss: None,
            scanned_rss: 0,
            next_scan: Instant::now(),
            next_trim: Instant::now(),
            trim_due: false,
        };
        assert!(!scanner.update_shedding(800));
        assert!(!scanner.shared.shedding());
        assert!(scanner.update_shedding(850));
        assert!(scanner.shared.shedding());
        assert!(!scanner.update_shedding(800), "below the mark");
        assert!(scanner.shared.shedding(), "but above the resume mark");
        assert!(!scanner.update_shedding(740));
        assert!(!scanner.shared.shedding());
    }
}
