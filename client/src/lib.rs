//! The broker's client library, what an application embeds: the retrying [`Client`] (Lazy
//! Pirate on a DEALER), endpoint resolution ([`resolve`]) and CURVE settings ([`Security`]).
//! It pulls in no command-line or report dependencies; the tools built on it (`broker probe`,
//! `broker bench`, the load driver, `broker keygen`) are the `tools` crate.

pub mod resolve;
pub mod retry;
pub mod security;

pub use retry::{Client, Error, RetryPolicy, Stats};
pub use security::Security;
