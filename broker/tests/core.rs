//! The core broker, end to end: the real binary, real ZeroMQ clients over TCP on 127.0.0.1,
//! real signals.

mod common;

use std::time::{Duration, Instant};

use common::{err_code, ok, Broker, Client, EVENT_TIMEOUT};
use nix::sys::signal::Signal;
use shared::protocol::Reply;
use shared::ErrorCode;

#[test]
fn echo_round_trip_for_req_and_dealer_clients() {
    let broker = Broker::start(&["--workers", "2"]);
    let body: [&[u8]; 3] = [b"one", b"", b"three"];
    for client in [
        Client::req(&broker.front),
        Client::dealer(&broker.front, true),
        Client::dealer(&broker.front, false),
    ] {
        assert_eq!(
            ok(client.request(&body)),
            [b"one".to_vec(), vec![], b"three".to_vec()]
        );
        assert_eq!(ok(client.request(&[b"x"])), [b"x".to_vec()]);
    }
}
