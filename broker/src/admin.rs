//! Admin HTTP server (placeholder until the operability work lands).

use std::net::SocketAddr;
use std::sync::Arc;

use shared::Metrics;

use crate::lifecycle::Status;

/// Starting the admin server failed.
#[derive(Debug, thiserror::Error)]
#[error("admin server on {addr}: {source}")]
pub struct Error {
    addr: SocketAddr,
    source: std::io::Error,
}

/// The running admin server.
pub struct Admin;

impl Admin {
    /// Starts the admin server.
    pub fn spawn(
        _addr: SocketAddr,
        _status: Arc<Status>,
        _metrics: Arc<Metrics>,
    ) -> Result<Admin, Error> {
        Ok(Admin)
    }

    /// Stops and joins it.
    pub fn stop(self) {}
}
