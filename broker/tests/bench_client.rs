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

/// Runs `broker bench` to its end: (exit code, stdout, stderr, how long it took).
fn bench_raw(args: &[&str]) -> (Option<i32>, String, String, std::time::Duration) {
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg("bench")
        .args(args)
        .output()
        .expect("bench runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn a_run_against_nothing_ends_on_time_and_fails() {
    // Nothing listens on this port: every run still ends within its duration plus timeout
    // (1 s + 1 s here; the bound checked is generous), and says why it failed.
    let nowhere = format!("tcp://127.0.0.1:{}", common::free_port());
    for extra in [&[][..], &["--rate", "100"][..]] {
        let mut args = vec![
            "--endpoint",
            &nowhere,
            "--requests",
            "10",
            "--duration",
            "1s",
            "--timeout",
            "1s",
        ];
        args.extend_from_slice(extra);
        let (code, _, stderr, took) = bench_raw(&args);
        assert_eq!(code, Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains("nothing connected"), "{extra:?}: {stderr}");
        assert!(
            took < std::time::Duration::from_secs(8),
            "{extra:?} took {took:?}"
        );
    }
}

#[test]
fn a_broker_killed_mid_run_costs_the_run_its_timeout_and_fails_it() {
    let broker = Broker::start(&["--workers", "1"]);
    let front = broker.front.clone();
    let run = std::thread::spawn(move || {
        bench_raw(&[
            "--endpoint",
            &front,
            "--clients",
            "2",
            "--window",
            "4",
            "--duration",
            "3s",
            "--timeout",
            "1s",
            "--no-verify",
            "--json",
        ])
    });
    common::eventually("load reaches the broker", common::EVENT_TIMEOUT, || {
        common::ok_count(&broker) > 0
    });
    broker.signal(nix::sys::signal::Signal::SIGKILL);
    let (code, stdout, stderr, took) = run.join().expect("bench thread");
    assert_eq!(code, Some(1), "{stdout} {stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON report");
    assert!(report["lost"].as_u64() > Some(0), "{report}");
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_run_of_only_errors_fails_and_impossible_flags_exit_2() {
    let broker = Broker::start(&["--workers", "1", "--max-message-bytes", "1000"]);
    let (code, stdout, stderr, _) = bench_raw(&[
        "--endpoint",
        &broker.front,
        "--size",
        "2000",
        "--requests",
        "50",
        "--json",
    ]);
    assert_eq!(code, Some(1), "{stdout} {stderr}");
    assert!(stderr.contains("every reply was an error"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON report");
    assert_eq!(report["errors"]["too_large"], 50, "{report}");
    for flags in [
        &["--size", "4"][..],
        &["--clients", "0"][..],
        &["--rate", "0"][..],
        &["--rate", "NaN"][..],
        &["--duration", "0s"][..],
        &["--timeout", "300000000000y"][..],
        &["--threads", "0"][..],
    ] {
        let (code, _, stderr, _) = bench_raw(flags);
        assert_eq!(code, Some(2), "{flags:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{flags:?}: {stderr}");
    }
}

#[test]
fn an_endpoint_that_never_finishes_its_handshake_is_named_and_the_run_goes_on() {
    let broker = Broker::start(&["--workers", "1"]);
    // Accepts TCP and never speaks ZMTP (the backlog accepts for it).
    let port = common::free_port();
    let _silent = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let silent = format!("tcp://127.0.0.1:{port}");
    let (code, stdout, stderr, _) = bench_raw(&[
        "--endpoint",
        &broker.front,
        "--endpoint",
        &silent,
        "--requests",
        "100",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stdout} {stderr}");
    assert!(
        stderr.contains(&format!(
            "warning: {silent}: connected, but the handshake did not finish"
        )),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON report");
    assert_eq!(report["ok"], 100, "{report}");
}
