//! The broker's command-line tools, built on the `client` library and run as subcommands of
//! the `broker` binary: `broker probe` ([`probe`]), `broker bench` ([`mod@bench`], around the load
//! driver in [`load`] that the criterion benches use too) and `broker keygen` ([`keygen`]).
//! The command-line ([`curve`]'s flags, clap) and report (hdrhistogram, JSON) dependencies live
//! here, so that a program embedding the client pulls in none of them.

pub mod bench;
pub mod curve;
pub mod greeting;
pub mod handshake;
pub mod keygen;
pub mod load;
pub mod probe;
