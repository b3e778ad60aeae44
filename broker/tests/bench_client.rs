//! `broker bench` against the real broker: counts, verification and the JSON report.

mod common;

use std::process::Command;

use common::Broker;

fn bench(args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "bench printed no JSON ({e}): {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code(), report)
}

#[test]
fn closed_loop_run_verifies_every_echo() {
    let broker = Broker::start(&["--workers", "2", "--max-inflight", "1000"]);
    let (code, report) = bench(&[
        "--endpoint",
        &broker.front,
        "--clients",
        "4",
        "--window",
        "8",
        "--requests",
        "4000",
        "--size",
        "100",
    ]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["sent"], 4000);
    assert_eq!(report["ok"], 4000);
    assert_eq!(report["mismatched"], 0);
    assert_eq!(report["lost"], 0);
    assert!(report["latency_us"]["p50"].as_u64() > Some(0));
}

#[test]
fn open_loop_run_and_errors_by_code() {
    // A pool that can hold 2 requests refuses most of a 4 x 8 window: the report says so.
    let broker = Broker::start(&["--workers", "1", "--max-inflight", "2"]);
    let (code, report) = bench(&[
        "--endpoint",
        &broker.front,
        "--clients",
        "4",
        "--window",
        "8",
        "--requests",
        "2000",
    ]);
    assert_eq!(code, Some(0), "{report}");
    let overloaded = report["errors"]["overloaded"].as_u64().unwrap_or(0);
    assert!(overloaded > 0, "{report}");
    assert_eq!(
        report["ok"].as_u64().unwrap_or(0) + overloaded,
        2000,
        "{report}"
    );
    assert_eq!(report["lost"], 0);

    let (code, report) = bench(&[
        "--endpoint",
        &broker.front,
        "--clients",
        "2",
        "--window",
        "1",
        "--rate",
        "500",
        "--requests",
        "200",
    ]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["ok"], 200);
}

#[test]
fn a_name_resolving_to_the_broker_works_and_bad_flags_exit_2() {
    let broker = Broker::start(&["--workers", "1"]);
    let port = broker.front.rsplit(':').next().expect("port");
    let by_name = format!("tcp://localhost:{port}");
    let (code, report) = bench(&[
        "--endpoint",
        &by_name,
        "--requests",
        "100",
        "--clients",
        "1",
    ]);
    // localhost may also resolve to ::1, where nothing listens: ZMQ_IMMEDIATE keeps requests
    // off that unconnected peer, so none are lost.
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["ok"], 100);
    let status = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["bench", "--size", "4"])
        .output()
        .expect("bench runs");
    assert_eq!(status.status.code(), Some(2));
}
