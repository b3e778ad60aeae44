//! Access control for the front socket: a ZAP handler (`zap.rs`) (ZeroMQ's authentication protocol,
//! RFC 27) that accepts a connection only when its peer address is in `--allow-from` and, with
//! CURVE, its public key is in `--curve-allow-keys`. The coordinator polls the handler's
//! socket next to its others, so no thread is added and the socket closes with the
//! coordinator. Without either setting no handler is installed and every peer is accepted
//! (rely on the NetworkPolicy then; see docs/security.md).
//!
//! The allow file is re-read when it changes (a Kubernetes Secret update swaps a symlink; an
//! editor renames a new file in place): new connections see the new keys at once, and the
//! coordinator resets open connections whose key was removed.

mod allowlist;
mod keys;
mod refusals;
mod zap;

pub use allowlist::Allowlist;
pub use keys::{AllowKeys, Refresh};
pub use refusals::Refusals;
pub use zap::ZapHandler;

/// Where libzmq sends ZAP requests (fixed by the ZAP specification).
pub const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";
/// The ZAP domain set on the front socket.
pub const ZAP_DOMAIN: &str = "broker";

/// Setting up the handler failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the ZAP handler: {0}")]
pub struct Error(#[from] zmq::Error);

/// What the ZAP handler checks.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// `--allow-from`, if set.
    pub networks: Option<Allowlist>,
    /// `--curve-allow-keys`, if set.
    pub keys: Option<AllowKeys>,
}

impl Policy {
    /// True if anything is checked (a handler is needed).
    pub fn checks(&self) -> bool {
        self.networks.is_some() || self.keys.is_some()
    }
}
