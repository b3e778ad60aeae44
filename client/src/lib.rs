//! The client side of the broker, apart from the server: the retrying [`Client`] that
//! applications and tests use, endpoint resolution, CURVE settings, `broker probe`, and the
//! load driver behind `broker bench` and the benchmarks.

pub mod bench;
pub mod handshake;
pub mod load;
pub mod probe;
pub mod resolve;
pub mod retry;
pub mod security;

pub use retry::{Client, Error, RetryPolicy, Stats};
pub use security::Security;
