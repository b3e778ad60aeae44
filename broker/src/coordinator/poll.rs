//! What the coordinator's loop waits on: `poll(2)` over raw descriptors (the signalfd, the
//! workers' waker, and the notification fds of the ZeroMQ sockets, asked of libzmq once),
//! rather than `zmq_poll`, which asks every socket for its events before and after waiting.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use zmq::Socket;

use super::{Coordinator, Error};

impl Coordinator {
    /// Waits up to `timeout` for input: the signalfd, the workers' waker, and the
    /// notification descriptors of the ZeroMQ sockets (readable when libzmq has news for the
    /// socket; the socket itself then says whether a message waits).
    pub(super) fn wait(&self, timeout: Duration) -> Result<Ready, Error> {
        let mut fds = self.poll_fds.map(|fd| (fd, false));
        // Round up so a 0.4 ms deadline does not become a busy loop of 0 ms polls.
        let millis = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        crate::sys::poll_readable(&mut fds, millis).map_err(Error::Poll)?;
        Ok(Ready {
            signal: fds[0].1,
            monitor: fds[1].1,
            woken: fds[2].1,
            front: fds[3].1,
            zap: fds[4].1,
        })
    }

    /// The descriptors to poll, in `Ready`'s order: the signalfd, the monitor's and the front
    /// socket's notification fds, the workers' waker, and the ZAP socket's (without a ZAP
    /// handler a negative descriptor, which poll skips).
    pub(super) fn poll_fds(&self) -> Result<[RawFd; 5], Error> {
        let s = &self.sockets;
        let fd = |socket: &Socket| {
            socket.get_fd().map_err(|source| Error::Socket {
                socket: "notification",
                source,
            })
        };
        Ok([
            s.signals.as_raw_fd(),
            fd(&s.monitor)?,
            self.workers.waker.as_raw_fd(),
            fd(&s.front)?,
            s.zap.as_ref().map_or(Ok(-1), |z| fd(z.socket()))?,
        ])
    }
}

/// Which polled inputs are readable (worker events are read every turn regardless).
#[derive(Default)]
pub(super) struct Ready {
    pub(super) signal: bool,
    pub(super) monitor: bool,
    pub(super) woken: bool,
    pub(super) front: bool,
    pub(super) zap: bool,
}
