//! `broker bench` against the real broker: counts, verification and the JSON report; its
//! deadlines (the header each request carries, replies after `--timeout` counted late) against
//! the real broker and against ZeroMQ services that do not know the header.

mod common;
mod peers;

use std::process::Command;
use std::time::Duration;

use common::Broker;
use peers::ZmqService;
use shared::protocol::parse_timeout_header;

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

/// Answers like `benches/c/router_echo.c` (and any echo that does not know the deadline header):
/// `OK` and the body as it came, the header included.
fn ok_echo(body: &[Vec<u8>]) -> Vec<Vec<u8>> {
    [vec![b"OK".to_vec()], body.to_vec()].concat()
}

#[test]
fn each_request_carries_its_budget_and_an_echo_that_returns_it_verifies() {
    let echo = ZmqService::start(ok_echo);
    let args = |extra: &[&'static str]| {
        let mut args = vec![
            "--endpoint",
            &echo.endpoint,
            "--requests",
            "200",
            "--clients",
            "2",
            "--window",
            "4",
            "--timeout",
            "2s",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| bench(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (code, report) = run(args(&[]));
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(
        (report["ok"].as_u64(), report["mismatched"].as_u64()),
        (Some(200), Some(0))
    );
    let bodies: Vec<Vec<Vec<u8>>> = echo.bodies.try_iter().collect();
    assert_eq!(bodies.len(), 200);
    for body in &bodies {
        // [deadline header, body]: the header first, right after the envelope.
        let budget = match &body[..] {
            [header, _] => parse_timeout_header(header),
            _ => None,
        };
        match budget {
            Some(Ok(budget)) => assert!(budget <= Duration::from_secs(2), "{budget:?}"),
            _ => panic!("no deadline header: {body:?}"),
        }
    }

    let (code, report) = run(args(&["--no-deadline-header"]));
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["ok"], 200, "{report}");
    let bodies: Vec<Vec<Vec<u8>>> = echo.bodies.try_iter().collect();
    assert_eq!(bodies.len(), 200);
    assert!(
        bodies.iter().all(|body| body.len() == 1),
        "no header: {:?}",
        bodies[0]
    );
}

#[test]
fn replies_after_the_timeout_are_counted_late_not_ok() {
    // Every request takes 50 ms and the client waits 30 ms: each OK comes too late. Without the
    // header the broker runs them all whatever their budget, so lateness is certain.
    let broker = Broker::start(&["--workers", "1", "--handler", "sleep"]);
    let (code, stdout, stderr, _) = bench_raw(&[
        "--endpoint",
        &broker.front,
        "--no-deadline-header",
        "--first-frame",
        "50",
        "--timeout",
        "30ms",
        "--duration",
        "1s",
        "--clients",
        "1",
        "--window",
        "1",
        "--json",
    ]);
    assert_eq!(code, Some(1), "no OK in time: {stdout} {stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON report");
    let count = |key: &str| report[key].as_u64().unwrap_or(u64::MAX);
    assert_eq!((count("ok"), count("mismatched")), (0, 0), "{report}");
    assert!(count("late") >= 5, "{report}");
    // The last request may still be running when the run ends: lost, not late.
    assert!(count("lost") <= 1, "{report}");
    assert_eq!(count("late") + count("lost"), count("sent"), "{report}");
    // The one-line reason: the lost request if there is one, else that no OK came in time.
    let why = if count("lost") == 0 {
        "late"
    } else {
        "1 replies lost"
    };
    assert!(stderr.contains(why), "{stderr}");
    assert_eq!(
        report["latency_us"]["max"], 0,
        "late replies are not OK latencies"
    );
}

#[test]
fn error_codes_the_tool_does_not_know_are_counted_by_their_name() {
    // A server newer than this tool, say: its codes are kept as they came.
    let newer = ZmqService::start(|_| {
        vec![
            b"ERR".to_vec(),
            b"quota_exceeded".to_vec(),
            b"over the tenant's quota".to_vec(),
        ]
    });
    let (code, report) = bench(&["--endpoint", &newer.endpoint, "--requests", "50"]);
    assert_eq!(code, Some(1), "only errors: {report}");
    assert_eq!(report["errors"]["quota_exceeded"], 50, "{report}");
}

#[test]
fn the_broker_strips_the_header_and_refuses_what_cannot_be_done_in_time() {
    let broker = Broker::start(&["--workers", "1", "--handler", "sleep"]);
    let run = |ms: &str, timeout: &str| {
        let (code, stdout, stderr, _) = bench_raw(&[
            "--endpoint",
            &broker.front,
            "--first-frame",
            ms,
            "--timeout",
            timeout,
            "--duration",
            "1s",
            "--clients",
            "1",
            "--window",
            "4",
            "--json",
        ]);
        let report: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("JSON report ({e}): {stdout} {stderr}"));
        (code, report)
    };
    let count = |report: &serde_json::Value, key: &str| report[key].as_u64().unwrap_or(u64::MAX);
    // Room in the budget: every request is served, and the sleep handler read its
    // milliseconds from the first frame after the header, which the broker stripped (the echo
    // verifies without it).
    let (code, report) = run("5", "2s");
    assert_eq!(code, Some(0), "{report}");
    assert!(count(&report, "ok") > 0, "{report}");
    assert_eq!(count(&report, "ok"), count(&report, "sent"), "{report}");
    // 200 ms of work per request, 100 ms budgets, one worker: nothing can be done in time,
    // and the broker says so instead of doing it for nobody.
    let (code, report) = run("200", "100ms");
    assert_eq!(code, Some(1), "no OK in time: {report}");
    assert_eq!(
        (count(&report, "ok"), count(&report, "mismatched")),
        (0, 0),
        "{report}"
    );
    assert!(
        report["errors"]["deadline_exceeded"].as_u64() > Some(0),
        "{report}"
    );
    let errors: u64 = report["errors"]
        .as_object()
        .expect("errors")
        .values()
        .filter_map(|n| n.as_u64())
        .sum();
    assert_eq!(
        count(&report, "late") + errors + count(&report, "lost"),
        count(&report, "sent"),
        "{report}"
    );
}
