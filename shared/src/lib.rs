//! What the broker, its workers and its tools share: the client-facing wire protocol, the
//! Prometheus metrics and their names, log set-up, CURVE key files, and the parsers of
//! command-line values.

pub mod curve;
pub mod logging;
pub mod metrics;
pub mod parse;
pub mod protocol;
pub mod socket;

pub use metrics::Metrics;
pub use protocol::ErrorCode;
