//! Clients against real brokers. The retrying client (`client::Client`), with a resolver the
//! test controls standing in for DNS: a broker added to the set gets its share of requests
//! within the re-resolve interval, one removed gets none, and no request fails; a late reply to
//! an earlier, timed-out attempt is never taken for the current request. And a client in
//! another language: docs/protocol.md's pyzmq deadline example, run as written.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use client::resolve::{self, Resolve};
use client::{Client, RetryPolicy, Security};
use common::deploy::repo;
use common::{eventually, metric, ok_count, Broker, EVENT_TIMEOUT};

/// The address set a headless Service's DNS would return, changed by the test.
#[derive(Clone, Default)]
struct Pods(Arc<Mutex<Vec<String>>>);

impl Pods {
    fn set(&self, endpoints: &[&Broker]) {
        *self.0.lock().expect("pods") = endpoints.iter().map(|b| b.front.clone()).collect();
    }
}

impl Resolve for Pods {
    fn resolve(&self, _: &[String]) -> Result<Vec<String>, resolve::Error> {
        let mut pods = self.0.lock().expect("pods").clone();
        pods.sort();
        Ok(pods)
    }
}

#[test]
fn added_brokers_get_requests_and_removed_ones_none_and_nothing_fails() {
    let brokers: Vec<Broker> = (0..3).map(|_| Broker::start(&["--workers", "1"])).collect();
    let pods = Pods::default();
    pods.set(&[&brokers[0], &brokers[1]]);
    let reresolve = Duration::from_millis(300);
    let policy = RetryPolicy {
        timeout: Duration::from_secs(1),
        reresolve,
        ..RetryPolicy::default()
    };
    let mut client = Client::with_resolver(
        &["tcp://broker-pods:5555".into()],
        policy,
        pods.clone(),
        Security::None,
    )
    .expect("client");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let load = thread::spawn(move || {
        let mut sent = 0u64;
        while !flag.load(Ordering::Relaxed) && sent < 1_000_000 {
            sent += 1;
            let body = sent.to_string();
            let reply = client
                .request(&[body.as_bytes()])
                .expect("no request fails");
            assert_eq!(reply, [body.into_bytes()], "its own reply");
        }
        client.stats()
    });
    eventually("both pods in the set are used", EVENT_TIMEOUT, || {
        ok_count(&brokers[0]) >= 50 && ok_count(&brokers[1]) >= 50
    });
    assert_eq!(ok_count(&brokers[2]), 0, "not in the set yet");

    // A pod added by the autoscaler gets its share within the interval (plus slack).
    pods.set(&[&brokers[0], &brokers[1], &brokers[2]]);
    eventually(
        "the new pod gets requests",
        reresolve + Duration::from_secs(2),
        || ok_count(&brokers[2]) >= 50,
    );

    // A pod that left the set gets nothing more once the client has re-resolved.
    pods.set(&[&brokers[1], &brokers[2]]);
    let settled = |b: &Broker| {
        let before = ok_count(b);
        thread::sleep(reresolve * 2); // two re-resolve intervals of traffic
        ok_count(b) == before
    };
    eventually(
        "the removed pod is left alone",
        reresolve + Duration::from_secs(5),
        || settled(&brokers[0]),
    );
    let (b1, b2) = (ok_count(&brokers[1]), ok_count(&brokers[2]));
    eventually("the others carry the load", EVENT_TIMEOUT, || {
        ok_count(&brokers[1]) > b1 + 50 && ok_count(&brokers[2]) > b2 + 50
    });
    stop.store(true, Ordering::Relaxed);
    let stats = load.join().expect("no request failed");
    eprintln!("client: {stats:?}");
    assert_eq!(stats.failed, 0);
    assert!(stats.added >= 1 && stats.removed >= 1, "{stats:?}");
}

#[test]
fn a_late_reply_to_a_timed_out_attempt_is_never_taken_for_the_next_request() {
    // Two workers: the next request is served while the first still sleeps.
    let broker = Broker::start(&["--workers", "2", "--handler", "sleep"]);
    // Without the deadline header the sleep handler does not know when the client gives up
    // (as with a handler that ignores its deadline, or a broker older than the header), so
    // its reply comes after the timeout.
    let policy = RetryPolicy {
        timeout: Duration::from_millis(300),
        retries: 0,
        deadline_header: false,
        ..RetryPolicy::default()
    };
    let mut client = Client::new(std::slice::from_ref(&broker.front), policy).expect("client");
    assert!(
        client.request(&[b"600"]).is_err(),
        "600 ms outlasts the 300 ms timeout"
    );
    for ms in ["0", "1", "2"] {
        let reply = client.request(&[ms.as_bytes()]).map_err(|e| e.to_string());
        assert_eq!(
            reply,
            Ok(vec![ms.as_bytes().to_vec()]),
            "its own answer, not the late one"
        );
    }
    // The late reply went to the connection the client closed on timeout, and was dropped
    // there: it never reached a later request.
    eventually(
        "the late reply is dropped as peer_gone",
        EVENT_TIMEOUT,
        || {
            metric(
                &broker,
                "broker_replies_dropped_total{reason=\"peer_gone\"}",
            ) == 1.0
        },
    );
    let stats = client.stats();
    assert_eq!(
        (stats.ok, stats.timeouts, stats.reconnects),
        (3, 1, 1),
        "{stats:?}"
    );
}

/// The Python code block under `heading` in docs/protocol.md.
fn protocol_example(heading: &str) -> String {
    let doc = std::fs::read_to_string(repo().join("docs/protocol.md")).expect("docs/protocol.md");
    let section = doc
        .split_once(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no {heading:?} in docs/protocol.md"))
        .1;
    let code = section
        .split_once("```python\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .unwrap_or_else(|| panic!("no python block under {heading:?}"))
        .0;
    code.to_owned()
}

/// Runs the example against `broker` (its endpoint put in place of `tcp://broker:5555`) with
/// the project's venv Python (scripts/setup installs pyzmq there), and checks that it prints
/// exactly what its `# -> ` comments say, in order.
fn run_example(code: &str, broker: &Broker) {
    assert_eq!(code.matches("tcp://broker:5555").count(), 1, "{code}");
    let code = code.replace("tcp://broker:5555", &broker.front);
    let expected: Vec<&str> = code
        .lines()
        .filter_map(|l| l.split_once("# -> ").map(|(_, want)| want.trim()))
        .collect();
    assert!(!expected.is_empty(), "the example states no output");
    let python = repo().join("target/tools/venv/bin/python");
    let timeout = EVENT_TIMEOUT.as_secs().to_string();
    let output = std::process::Command::new("timeout")
        .arg(&timeout)
        .arg(&python)
        .args(["-c", &code])
        .output()
        .unwrap_or_else(|e| panic!("{} runs (scripts/setup makes it): {e}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{:?}: {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn the_protocol_docs_pyzmq_deadline_example_runs_as_written() {
    let broker = Broker::start(&["--workers", "1"]);
    run_example(
        &protocol_example("### pyzmq: a request with a deadline"),
        &broker,
    );
    // Refused before a worker: the two refusals reached no handler.
    assert_eq!(ok_count(&broker), 1);
}
