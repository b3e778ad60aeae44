//! SIGTERM and SIGINT as events: blocked in every thread, read from a signalfd that the
//! coordinator polls next to its sockets. No handler runs, so no blocking call is interrupted.

use std::os::fd::{AsRawFd, RawFd};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Setting up signal delivery failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up signal handling: {0}")]
pub struct Error(#[from] nix::Error);

/// The stop signals, readable as a file descriptor.
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks SIGTERM and SIGINT in the calling thread and opens a signalfd for them.
    ///
    /// Call it first, before any thread starts (libzmq's I/O threads included): threads inherit
    /// the mask, so a signal is never delivered to a thread that would die of it.
    pub fn install() -> Result<Signals, Error> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGTERM);
        mask.add(Signal::SIGINT);
        mask.thread_block()?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals { fd })
    }

    /// The next pending stop signal, if any.
    pub fn pending(&mut self) -> Result<Option<Signal>, Error> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(signal) => return Ok(Some(signal)),
                    Err(_) => continue,
                },
                Ok(None) => return Ok(None),
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(Error(e)),
            }
        }
    }
}

impl AsRawFd for Signals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
