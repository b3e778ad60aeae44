//! What the broker binary and the worker pool both speak: the wire protocol (client-facing and
//! coordinator <-> worker), the Prometheus metrics and their names, log set-up, CURVE key files, and the parsers of
//! command-line values the broker and its tools share.

pub mod curve;
pub mod logging;
pub mod metrics;
pub mod parse;
pub mod protocol;
pub mod socket;

pub use metrics::Metrics;
pub use protocol::ErrorCode;
