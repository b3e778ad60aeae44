//! What a careless operator can do, on the real binary (issue 19): white space around any value
//! is ignored the same way everywhere; an unknown `BROKER_*` variable is named in a warning with
//! the nearest known one; a stop signal at any moment once `main` runs is drained, with a log
//! line; the sleep handler takes ASCII digits only, as documented; the admin listener's accept
//! queue is long enough for a connection flood.

mod common;

use std::process::Command;
use std::time::Instant;

use common::{err_code, ok, Broker, Client, EVENT_TIMEOUT};
use nix::sys::signal::Signal;
use shared::ErrorCode;

#[test]
fn white_space_around_any_value_is_ignored() {
    // Leading, trailing, a newline from a ConfigMap block, a no-break space, after a comma.
    let mut broker = Broker::spawn(
        &[],
        &[
            ("BROKER_HANDLER", " sleep"),
            ("BROKER_MAX_INFLIGHT", "5\n"),
            ("BROKER_WORKERS", "\u{a0}2"),
            ("BROKER_ALLOW_FROM", "10.0.0.0/8, 127.0.0.1/32"),
            ("BROKER_LOG_FORMAT", "text "),
            ("BROKER_QUEUE_TARGET", " 20ms"),
            ("BROKER_MAX_INFLIGHT_BYTES", " 64MiB "),
        ],
    );
    let line = broker.wait_for_log("handler", EVENT_TIMEOUT);
    assert!(
        line.contains("workers 2 handler sleep max-inflight 5"),
        "the values took effect: {line}"
    );
    broker.wait_for_log("state starting -> serving", EVENT_TIMEOUT);
    let client = Client::dealer(&broker.front, true);
    assert_eq!(
        ok(client.request(&[b"1", b"x"])),
        [b"1".to_vec(), b"x".to_vec()]
    );
    broker.signal(Signal::SIGTERM);
    assert!(broker.wait_exit(EVENT_TIMEOUT).success());
}

#[test]
fn an_unknown_variable_is_named_with_the_nearest_setting() {
    let broker = Broker::spawn(
        &[],
        &[
            ("BROKER_WORKER", "4"),
            // A tool's variable (the exec probe's), set in the same pod: known, no warning.
            (
                "BROKER_CURVE_SERVER_KEY_FILE",
                "/etc/broker/curve/server.pub",
            ),
        ],
    );
    let line = broker.wait_for_log("BROKER_WORKER ", EVENT_TIMEOUT);
    assert!(
        line.contains("WARN") && line.contains("did you mean BROKER_WORKERS?"),
        "{line}"
    );
    broker.wait_for_log("state starting -> serving", EVENT_TIMEOUT);
    assert!(
        !broker.log_text().contains("BROKER_CURVE_SERVER_KEY_FILE"),
        "{}",
        broker.log_text()
    );
}

/// Whether SIGTERM is blocked in process `pid` (its main thread's mask, from /proc).
fn sigterm_blocked(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (Signal::SIGTERM as u32 - 1)) != 0)
}

/// Issue 19: SIGTERM within about a millisecond of exec killed the broker by the default action
/// (exit 143, no log line). Now `main` blocks it first of all: a SIGTERM sent the moment that is
/// so, while flags are parsed and sockets bound, is drained with the usual lines and exit 0.
#[test]
fn a_stop_signal_during_start_up_is_drained_with_a_log_line() {
    let mut blocked_after = Vec::new();
    for _ in 0..20 {
        let mut broker = Broker::spawn(&[], &[]);
        let pid = broker.pid().as_raw();
        let spawned = Instant::now();
        while !sigterm_blocked(pid) {
            assert!(
                spawned.elapsed() < EVENT_TIMEOUT,
                "SIGTERM never blocked in the broker"
            );
            std::hint::spin_loop();
        }
        blocked_after.push(spawned.elapsed());
        broker.signal(Signal::SIGTERM);
        let status = broker.wait_exit(EVENT_TIMEOUT);
        let log = broker.log_text();
        assert_eq!(status.code(), Some(0), "{log}\n{}", broker.stderr_text());
        assert!(log.contains("SIGTERM received"), "{log}");
        assert!(log.contains("stopped cleanly"), "{log}");
    }
    blocked_after.sort();
    eprintln!(
        "SIGTERM blocked {:?} (median) after the spawn returned",
        blocked_after[blocked_after.len() / 2]
    );
}

#[test]
fn the_sleep_handler_takes_ascii_digits_only() {
    let broker = Broker::start(&["--workers", "1", "--handler", "sleep"]);
    let client = Client::dealer(&broker.front, true);
    for body in ["\u{3000}5", "5\u{a0}", "٥"] {
        assert_eq!(
            err_code(&client.request(&[body.as_bytes()])),
            Some(ErrorCode::BadRequest),
            "{body:?}"
        );
    }
    assert!(matches!(
        client.request(&[b" 5\t"]),
        shared::protocol::Reply::Ok(_)
    ));
}

/// The admin listener's accept queue: std's listeners have 128, and under a flood of
/// connections one probe in a few hundred waited for a SYN retransmit (a second), which a
/// kubelet with a one-second timeout counts as a failure. `ss` reports a listener's backlog.
#[test]
fn the_admin_listener_has_room_for_a_flood() {
    let broker = Broker::start(&[]);
    let port = broker.admin.port();
    let output = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2, installed by scripts/setup) runs");
    let text = String::from_utf8_lossy(&output.stdout);
    // State Recv-Q Send-Q Local Peer: Send-Q is the backlog of a listener.
    let backlog: u32 = text
        .split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listener on {port}: {text:?}"));
    assert!(backlog >= 1024, "admin backlog {backlog}");
}
