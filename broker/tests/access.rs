//! `--allow-from`: the ZAP handler refuses connections from outside the allowlist (proven from
//! a second loopback address, 127.0.0.2) and counts them; allowed peers are served.

mod common;

use std::time::Duration;

use common::{free_port, ok, Broker, Client, EVENT_TIMEOUT};

/// A DEALER whose connection leaves from `source` (libzmq's `tcp://src:0;dst:port` form).
fn client_from(source: &str, port: u16) -> Client {
    Client::dealer(&format!("tcp://{source}:0;127.0.0.1:{port}"), true)
}

fn refused(broker: &Broker) -> f64 {
    common::metric(
        broker,
        "broker_connections_refused_total{reason=\"allowlist\"}",
    )
}

#[test]
fn only_allowed_networks_get_served() {
    let port = free_port();
    let front = format!("tcp://127.0.0.1:{port}");
    let broker = Broker::start(&[
        "--frontend",
        &front,
        "--allow-from",
        "127.0.0.1/32,10.0.0.0/8",
    ]);
    let allowed = client_from("127.0.0.1", port);
    assert_eq!(ok(allowed.request(&[b"in"])), [b"in".to_vec()]);

    let outsider = client_from("127.0.0.2", port);
    outsider.send(&[b"let me in"]);
    common::eventually("refusal counted", EVENT_TIMEOUT, || refused(&broker) >= 1.0);
    assert_eq!(
        outsider.try_recv(Duration::from_millis(300)),
        None,
        "an outsider got a reply"
    );
    // The refusal cost the allowed client nothing.
    assert_eq!(ok(allowed.request(&[b"still in"])), [b"still in".to_vec()]);
}

#[test]
fn without_an_allowlist_everyone_is_served_and_bad_cidrs_exit_2() {
    let port = free_port();
    let front = format!("tcp://127.0.0.1:{port}");
    let broker = Broker::start(&["--frontend", &front]);
    let other = client_from("127.0.0.2", port);
    assert_eq!(ok(other.request(&[b"open"])), [b"open".to_vec()]);
    assert_eq!(refused(&broker), 0.0);

    let mut bad = Broker::spawn(&["--allow-from", "127.0.0.300/8"], &[]);
    let status = bad.wait_exit(EVENT_TIMEOUT);
    assert_eq!(status.code(), Some(2));
}
