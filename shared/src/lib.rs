//! What the broker binary and the worker pool both speak: the wire protocol (client-facing and
//! coordinator <-> worker), the Prometheus metrics and their names, and log set-up.

pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod socket;

pub use metrics::Metrics;
pub use protocol::ErrorCode;
