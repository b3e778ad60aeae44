//! Shutdown: stop signals turned into lifecycle events, the hard stop, the drain deadline (what
//! is still held gets `ERR timeout`), and joining the workers at the end.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use shared::ErrorCode;
use worker::Event;

use super::replies::Body;
use super::{Coordinator, Error, Exit};
use crate::signals::SignalEvent;

/// How long shutdown waits for a worker to finish the request it is on (one that is not
/// inside its handler any more is about to exit).
const JOIN_GRACE: Duration = Duration::from_secs(1);

impl Coordinator {
    /// Handles pending signals; returns a signal that calls for a hard stop.
    pub(super) fn read_signals(&mut self) -> Result<Option<Signal>, Error> {
        while let Some(event) = self.sockets.signals.pending()? {
            match event {
                SignalEvent::Stop(sig) => {
                    if !self.clock.stop_requested(Instant::now()) {
                        return Ok(Some(sig));
                    }
                    log::info!(
                        "{sig} received: not ready; serving for {} more, then draining",
                        humantime::format_duration(self.config.shutdown_delay)
                    );
                }
                SignalEvent::Ignored(name) => log::info!("{name} received and ignored"),
            }
        }
        Ok(None)
    }

    /// A second stop signal: leave now.
    pub(super) fn hard_stop(&mut self, sig: Signal) -> Exit {
        log::warn!("second {sig} during shutdown: exiting now");
        // Nothing may wait on the way out: drop queued replies.
        let _ = self.sockets.front.set_linger(0);
        Exit::HardStop(sig)
    }

    /// At the drain deadline: every request still held gets `ERR timeout`; workers still in a
    /// handler are abandoned.
    pub(super) fn expire(&mut self) {
        // Queued requests will not run: take them back so no worker starts one.
        while self.workers.jobs_back.try_recv().is_ok() {}
        let now = Instant::now();
        let held = self.inflight.remove_all(now);
        let timed_out = held.len();
        for entry in held {
            self.release_connection(&entry);
            let latency = Some(now.saturating_duration_since(entry.received));
            let body = Body::refusal(ErrorCode::Timeout);
            self.answer(entry.envelope, entry.origin, body, latency);
        }
        log::warn!("drain deadline reached: {timed_out} requests answered ERR timeout");
    }

    /// Stops and joins every worker that is not stuck in a handler. Returns how many were
    /// left behind.
    pub(super) fn stop_workers(&mut self) -> usize {
        // Nothing queued is run any more; closing the channel makes every worker leave once
        // it has finished the request it is on.
        while self.workers.jobs_back.try_recv().is_ok() {}
        let (closed, _) = crossbeam_channel::bounded(0);
        drop(std::mem::replace(&mut self.workers.jobs, closed));
        let grace = Instant::now() + JOIN_GRACE;
        let mut handles = std::mem::take(&mut self.workers.handles);
        let mut stopped = vec![false; handles.len()];
        // A worker inside its handler now is stuck past the drain: it is not waited for.
        // Any other reports that it is leaving promptly.
        while handles.iter().any(|h| {
            !stopped[h.index as usize] && !self.workers.activity.in_handler(h.index as usize)
        }) {
            match self.workers.events.recv_deadline(grace) {
                Ok(Event::Stopped(index)) => {
                    if let Some(s) = stopped.get_mut(index as usize) {
                        *s = true;
                    }
                }
                // Replies to requests already answered ERR timeout: nobody to send them to.
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let mut left = 0;
        for handle in handles.drain(..) {
            if stopped[handle.index as usize] {
                if handle.thread.join().is_err() {
                    log::error!("worker {} panicked outside its handler", handle.index);
                }
            } else {
                // Dropping the handle detaches the thread; process exit ends it.
                left += 1;
            }
        }
        if left > 0 {
            log::warn!("{left} workers left behind inside their handler");
        }
        self.conns.clear();
        left
    }
}
