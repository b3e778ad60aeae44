//! Signals as events: every asynchronous signal whose default action would kill the broker is
//! blocked in every thread and read from a signalfd that the coordinator polls next to its
//! sockets. No handler runs, so no blocking call is interrupted, and no stray signal (a
//! terminal's SIGHUP, a mistargeted `kill -USR1`) kills the broker without a drain or a log.
//!
//! - SIGTERM, SIGINT, SIGQUIT: stop (drain; a second one exits at once).
//! - SIGHUP, SIGUSR1, SIGUSR2, SIGALRM, SIGTSTP/TTIN/TTOU, SIGVTALRM, SIGPROF, SIGIO,
//!   SIGPWR, SIGXCPU, SIGXFSZ, SIGSTKFLT and the real-time signals: logged and ignored (the
//!   broker has nothing to reload and must not be paused or killed by them).
//! - Left alone: faults (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP, SIGSYS), whose
//!   default is right; SIGKILL and SIGSTOP, which cannot be caught; and those whose default
//!   is to do nothing (SIGCHLD, SIGCONT, SIGURG, SIGWINCH), plus SIGPIPE, which the Rust
//!   runtime already ignores.

use std::os::fd::{AsRawFd, RawFd};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Setting up signal delivery failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up signal handling: {0}")]
pub struct Error(#[from] nix::Error);

/// What a signal asks of the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignalEvent {
    /// Stop: drain, or exit at once if already stopping.
    Stop(Signal),
    /// Nothing: log it (the name, or `signal N` for a real-time one).
    Ignored(String),
}

/// Signals left at their default disposition (see the module comment).
const LEFT_ALONE: [Signal; 12] = [
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGILL,
    Signal::SIGFPE,
    Signal::SIGABRT,
    Signal::SIGTRAP,
    Signal::SIGSYS,
    Signal::SIGCHLD,
    Signal::SIGCONT,
    Signal::SIGURG,
    Signal::SIGWINCH,
    Signal::SIGPIPE,
];

/// Every signal the broker handles: all but those [`LEFT_ALONE`].
fn handled() -> SigSet {
    // sigfillset, which glibc keeps from touching its own internal real-time signals.
    let mut mask = SigSet::all();
    for signal in LEFT_ALONE {
        mask.remove(signal);
    }
    mask
}

/// Blocks the handled signals in the calling thread: `main` does it first of all, so that a
/// stop signal arriving at any moment of the start (while flags are parsed, logging is set up,
/// sockets are bound) waits for the coordinator and is drained, instead of killing the process
/// by its default action. (Between exec and `main`, while the dynamic loader and the runtime
/// start, 1 to 8 ms measured here, the default still applies: only the parent can block
/// signals across exec.)
pub fn block() -> Result<(), Error> {
    handled().thread_block()?;
    Ok(())
}

/// Unblocks them again, for the tools (`probe`, `bench`, `keygen`), which keep the default
/// dispositions: a SIGTERM ends them.
pub fn unblock() -> Result<(), Error> {
    handled().thread_unblock()?;
    Ok(())
}

/// The signals read as events, readable as a file descriptor.
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks the handled signals in the calling thread (again, if [`block`] did already) and
    /// opens a signalfd for them; a signal that arrived while they were blocked is read from it.
    ///
    /// Call it before any thread starts (libzmq's I/O threads included): threads inherit the
    /// mask, so a signal is never delivered to a thread that would die of it.
    pub fn install() -> Result<Signals, Error> {
        let mask = handled();
        mask.thread_block()?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals { fd })
    }

    /// The next pending signal, if any.
    pub fn pending(&mut self) -> Result<Option<SignalEvent>, Error> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => return Ok(Some(classify(info.ssi_signo as i32))),
                Ok(None) => return Ok(None),
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(Error(e)),
            }
        }
    }
}

/// What signal number `signo` asks for.
pub fn classify(signo: i32) -> SignalEvent {
    match Signal::try_from(signo) {
        Ok(sig @ (Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT)) => SignalEvent::Stop(sig),
        Ok(sig) => SignalEvent::Ignored(sig.as_str().to_owned()),
        Err(_) => SignalEvent::Ignored(format!("signal {signo}")),
    }
}

impl AsRawFd for Signals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_stop_and_the_rest_are_ignored_by_name() {
        assert_eq!(
            classify(Signal::SIGTERM as i32),
            SignalEvent::Stop(Signal::SIGTERM)
        );
        assert_eq!(
            classify(Signal::SIGQUIT as i32),
            SignalEvent::Stop(Signal::SIGQUIT)
        );
        assert_eq!(
            classify(Signal::SIGHUP as i32),
            SignalEvent::Ignored("SIGHUP".into())
        );
        assert_eq!(classify(40), SignalEvent::Ignored("signal 40".into()));
    }
}
