//! Operability end to end: the admin HTTP server (/metrics parsed as exposition format,
//! /readyz, /livez), and `broker probe`, against the real binary.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{err_code, eventually, ok, sync_read, Broker, Client, EVENT_TIMEOUT};
use nix::sys::signal::Signal;
use shared::protocol::Reply;
use shared::ErrorCode;

/// One scrape, parsed: metric name + sorted labels -> value.
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn take(broker: &Broker) -> Scrape {
        let (status, body) = broker.http_get("/metrics");
        assert_eq!(status, 200);
        let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
            .expect("valid exposition format");
        let mut values = HashMap::new();
        for sample in parsed.samples {
            let mut labels: Vec<String> = sample
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            labels.sort();
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(buckets) => {
                    buckets.last().map_or(0.0, |b| b.count)
                }
                prometheus_parse::Value::Summary(_) => continue,
            };
            values.insert(format!("{}{{{}}}", sample.metric, labels.join(",")), value);
        }
        Scrape(values)
    }

    /// Scrapes until `ready` holds: threads publish their counts when they flush (the
    /// coordinator before every poll, a worker before it goes idle), a moment after a reply.
    fn settled(broker: &Broker, ready: impl Fn(&Scrape) -> bool) -> Scrape {
        let mut scrape = Scrape::take(broker);
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        while !ready(&scrape) {
            assert!(
                std::time::Instant::now() < deadline,
                "metrics never settled: {:?}",
                scrape.0
            );
            std::thread::sleep(Duration::from_millis(10));
            scrape = Scrape::take(broker);
        }
        scrape
    }

    fn get_or_zero(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(0.0)
    }

    fn get(&self, key: &str) -> f64 {
        *self
            .0
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key}; have {:?}", self.0.keys()))
    }

    fn outcome(&self, outcome: &str) -> f64 {
        self.get(&format!("broker_requests_total{{outcome={outcome}}}"))
    }
}

#[test]
fn metrics_count_every_outcome_exactly() {
    let mut broker = Broker::start(&[
        "--workers",
        "1",
        "--handler",
        "sleep",
        "--max-sleep",
        "60s",
        "--max-inflight",
        "2",
        "--max-message-bytes",
        "100",
        "--drain-timeout",
        "1s",
        "--shutdown-delay",
        "0s",
    ]);
    let client = Client::dealer(&broker.front, true);
    let mut reply_bytes = 0;
    let mut exchange = |body: &[u8]| {
        client.send(&[body]);
        let frames = client.recv();
        reply_bytes += frames.iter().map(Vec::len).sum::<usize>();
        err_code(&shared::protocol::parse_reply(frames).expect("well-formed"))
    };
    for _ in 0..3 {
        assert_eq!(exchange(b"0"), None);
    }
    assert_eq!(exchange(b""), Some(ErrorCode::BadRequest));
    assert_eq!(exchange(b"abc"), Some(ErrorCode::BadRequest));
    for _ in 0..2 {
        assert_eq!(exchange(&[b'9'; 101]), Some(ErrorCode::TooLarge));
    }
    let scrape = Scrape::settled(&broker, |s| {
        s.get_or_zero("broker_request_duration_seconds_count{}") >= 4.0
            && s.get_or_zero("broker_queue_wait_seconds_count{}") >= 4.0
            && s.get_or_zero("broker_requests_total{outcome=too_large}") >= 2.0
    });
    assert_eq!(scrape.outcome("ok"), 3.0);
    assert_eq!(scrape.outcome("bad_request"), 2.0);
    assert_eq!(scrape.outcome("too_large"), 2.0);
    assert_eq!(scrape.outcome("overloaded"), 0.0);
    // Latency is observed for requests that reached a worker: 3 OK + the handler's refusal.
    assert_eq!(scrape.get("broker_request_duration_seconds_count{}"), 4.0);
    assert_eq!(scrape.get("broker_queue_wait_seconds_count{}"), 4.0);
    // Bodies sent: "0" x3, "", "abc", 101 bytes x2.
    assert_eq!(scrape.get("broker_received_bytes_total{}"), 208.0);
    assert_eq!(scrape.get("broker_sent_bytes_total{}"), reply_bytes as f64);
    assert_eq!(scrape.get("broker_workers{}"), 1.0);
    assert_eq!(scrape.get("broker_build_info{version=0.1.0}"), 1.0);
    assert!(scrape.get("process_resident_memory_bytes{}") > 0.0);

    // Fill the pool (one running, one queued), then two more are refused.
    let held = [
        Client::dealer(&broker.front, true),
        Client::dealer(&broker.front, true),
    ];
    for h in &held {
        h.send(&[b"30000"]);
        sync_read(h);
    }
    for _ in 0..2 {
        assert_eq!(
            err_code(&client.request(&[b"0"])),
            Some(ErrorCode::Overloaded)
        );
    }
    broker.signal(Signal::SIGTERM);
    broker.wait_for_log("stopping -> draining", EVENT_TIMEOUT);
    for _ in 0..2 {
        assert_eq!(
            err_code(&client.request(&[b"0"])),
            Some(ErrorCode::Draining)
        );
    }
    let scrape = Scrape::settled(&broker, |s| {
        s.get_or_zero("broker_requests_total{outcome=draining}") >= 2.0
    });
    assert_eq!(scrape.outcome("overloaded"), 2.0);
    assert_eq!(scrape.outcome("draining"), 2.0);
    assert_eq!(scrape.outcome("timeout"), 0.0);
    assert_eq!(scrape.get("broker_draining{}"), 1.0);
    assert_eq!(scrape.get("broker_inflight_requests{}"), 2.0);
    assert_eq!(scrape.get("broker_workers_busy{}"), 1.0);
    assert!(scrape.get("broker_worker_busy_seconds_total{}") > 0.0);
    // Both held requests end at the drain deadline.
    for h in &held {
        assert_eq!(err_code(&h.recv_reply()), Some(ErrorCode::Timeout));
    }
    assert!(broker.wait_exit(EVENT_TIMEOUT).success());
}

#[test]
fn readiness_drops_at_sigterm_while_the_delay_still_serves() {
    let mut broker = Broker::start(&[
        "--workers",
        "2",
        "--handler",
        "sleep",
        "--shutdown-delay",
        "2s",
    ]);
    assert_eq!(broker.http_get("/readyz").0, 200);
    // Held across the delay, so the broker is still draining (not gone) afterwards.
    let long = Client::dealer(&broker.front, true);
    long.send(&[b"3000"]);
    sync_read(&long);
    let client = Client::dealer(&broker.front, true);
    broker.signal(Signal::SIGTERM);
    let sent = Instant::now();
    // Well inside the kubelet's readiness period (2 s in the Deployment; the kubelet test
    // checks that bound against the rendered manifest).
    eventually("/readyz 503 after SIGTERM", Duration::from_secs(1), || {
        broker.http_get("/readyz").0 == 503
    });
    log_elapsed("readyz flipped after", sent.elapsed());
    // Still served while not ready, and the other endpoints keep answering.
    assert_eq!(ok(client.request(&[b"0"])), [b"0".to_vec()]);
    assert_eq!(broker.http_get("/livez").0, 200);
    assert_eq!(broker.http_get("/metrics").0, 200);
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "the check ran inside the delay"
    );
    broker.wait_for_log("stopping -> draining", EVENT_TIMEOUT);
    assert_eq!(broker.http_get("/livez").0, 200);
    assert_eq!(Scrape::take(&broker).get("broker_draining{}"), 1.0);
    assert_eq!(broker.http_get("/readyz").0, 503);
    assert_eq!(ok(long.recv_reply()), [b"3000".to_vec()]);
    assert!(broker.wait_exit(EVENT_TIMEOUT).success());
}

fn log_elapsed(what: &str, elapsed: Duration) {
    eprintln!("{what} {elapsed:?}");
}

#[test]
fn liveness_fails_only_when_every_worker_is_stuck() {
    let broker = Broker::start(&[
        "--workers",
        "4",
        "--handler",
        "sleep",
        "--stuck-after",
        "1s",
    ]);
    assert_eq!(broker.http_get("/livez").0, 200);
    let first = Client::dealer(&broker.front, true);
    first.send(&[b"4000"]);
    // One of four stuck: a metric, not a restart.
    eventually("one worker reported stuck", EVENT_TIMEOUT, || {
        Scrape::take(&broker).get("broker_workers_stuck{}") == 1.0
    });
    assert_eq!(broker.http_get("/livez").0, 200);
    assert_eq!(broker.http_get("/healthz").0, 200);
    let rest: Vec<Client> = (0..3)
        .map(|_| Client::dealer(&broker.front, true))
        .collect();
    for client in &rest {
        client.send(&[b"2500"]);
    }
    eventually(
        "/livez 503 with the whole pool wedged",
        EVENT_TIMEOUT,
        || broker.http_get("/livez").0 == 503,
    );
    let (_, why) = broker.http_get("/livez");
    assert!(why.contains("all 4 workers"), "{why}");
    for client in rest.iter().chain([&first]) {
        assert!(matches!(client.recv_reply(), Reply::Ok(_)));
    }
    eventually("/livez back to 200", EVENT_TIMEOUT, || {
        broker.http_get("/livez").0 == 200
    });
}

#[test]
fn unknown_paths_404_wrong_methods_405_and_slow_clients_do_not_stall() {
    let broker = Broker::start(&["--workers", "1"]);
    assert_eq!(broker.http_get("/nope").0, 404);
    assert_eq!(
        common::http_request(broker.admin, "POST", "/metrics").0,
        405
    );
    assert_eq!(
        common::http_request(broker.admin, "DELETE", "/readyz").0,
        405
    );
    // Idle and half-sent connections hold no one up.
    let mut idle: Vec<std::net::TcpStream> = (0..10)
        .map(|_| std::net::TcpStream::connect(broker.admin).expect("connect"))
        .collect();
    idle[0].write_all(b"GET /metr").expect("partial request");
    idle[1]
        .write_all(b"\x16\x03\x01garbage\r\n\r\n")
        .expect("garbage");
    assert_eq!(broker.http_get("/readyz").0, 200);
    assert_eq!(broker.http_get("/metrics").0, 200);
    let client = Client::req(&broker.front);
    assert_eq!(
        ok(client.request(&[b"data path fine"])),
        [b"data path fine".to_vec()]
    );
}

#[test]
fn dropped_replies_are_counted_by_reason() {
    let broker = Broker::start(&[
        "--workers",
        "2",
        "--handler",
        "sleep",
        "--max-inflight",
        "10000",
    ]);
    // A client that leaves with a request in flight.
    {
        let gone = Client::dealer(&broker.front, true);
        gone.send(&[b"200"]);
        sync_read(&gone);
    }
    eventually("peer_gone drop counted", EVENT_TIMEOUT, || {
        Scrape::take(&broker).get("broker_replies_dropped_total{reason=peer_gone}") == 1.0
    });
    // A client that never reads its replies. Once half its --max-connection-bytes is held,
    // its requests are refused (work is not done for replies it cannot be sent); the
    // refusals then fill the rest, and those beyond it are dropped.
    let ctx = zmq::Context::new();
    let deaf = common::deaf_client(&ctx, &broker.front);
    let payload = [b"0".to_vec(), vec![7u8; 16 * 1024]];
    for _ in 0..12_000 {
        deaf.send_multipart(&payload, 0).expect("send");
    }
    eventually("hwm drops counted", EVENT_TIMEOUT, || {
        Scrape::take(&broker).get("broker_replies_dropped_total{reason=hwm}") > 0.0
    });
}

fn probe(args: &[&str]) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg("probe")
        .args(args)
        .output()
        .expect("probe runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text, started.elapsed())
}

#[test]
fn probe_succeeds_against_a_busy_broker_and_fails_against_a_stopped_one() {
    let mut broker = Broker::start(&["--workers", "1", "--handler", "sleep"]);
    let (code, text, _) = probe(&["--endpoint", &broker.front]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("serving"), "{text}");
    // Every worker busy and requests queued: the coordinator still answers at once.
    let busy: Vec<Client> = (0..3)
        .map(|_| Client::dealer(&broker.front, true))
        .collect();
    for client in &busy {
        client.send(&[b"2000"]);
    }
    eventually("the worker is busy", EVENT_TIMEOUT, || {
        Scrape::take(&broker).get("broker_workers_busy{}") == 1.0
    });
    let (code, text, _) = probe(&["--endpoint", &broker.front, "--timeout", "500ms"]);
    assert_eq!(code, Some(0), "{text}");
    let livez = format!("http://{}/livez", broker.admin);
    assert_eq!(probe(&["--http", &livez]).0, Some(0));
    let missing = format!("http://{}/nope", broker.admin);
    assert_eq!(probe(&["--http", &missing]).0, Some(1));

    broker.signal(Signal::SIGINT);
    broker.signal(Signal::SIGINT);
    broker.wait_exit(EVENT_TIMEOUT);
    let (code, text, took) = probe(&["--endpoint", &broker.front, "--timeout", "300ms"]);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(text.trim().lines().count(), 1, "one-line reason: {text}");
    assert!(text.contains("no reply"), "{text}");
    assert!(
        took < Duration::from_secs(3),
        "probe exits near its timeout, took {took:?}"
    );
    assert_eq!(probe(&["--http", &livez, "--timeout", "300ms"]).0, Some(1));
}

#[test]
fn the_probe_names_lookup_failures_and_refuses_a_zero_timeout() {
    let (code, text, _) = probe(&["--endpoint", "tcp://no-such-host.invalid:5555"]);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    assert!(
        text.contains("cannot resolve no-such-host.invalid"),
        "{text}"
    );
    let (code, text, _) = probe(&["--timeout", "0"]);
    assert_eq!(code, Some(2), "{text}");
    let (code, text, _) = probe(&["--timeout", "300000000000y"]);
    assert_eq!(code, Some(2), "{text}");
}

#[test]
fn idle_and_slow_admin_connections_cannot_starve_the_probes() {
    let broker = Broker::start(&["--workers", "1"]);
    // A port scanner's worth of idle connections, and slow clients trickling their headers.
    let mut idle: Vec<std::net::TcpStream> = (0..600)
        .filter_map(|_| std::net::TcpStream::connect(broker.admin).ok())
        .collect();
    assert!(idle.len() >= 500, "connections opened: {}", idle.len());
    for stream in idle.iter_mut().take(100) {
        let _ = stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: a");
    }
    // The kubelet's probes (1 s timeout, fresh connection each) are answered every time.
    let readyz = format!("http://{}/readyz", broker.admin);
    let livez = format!("http://{}/livez", broker.admin);
    for round in 0..20 {
        for url in [&readyz, &livez] {
            let (code, text, _) = probe(&["--http", url, "--timeout", "1s"]);
            assert_eq!(code, Some(0), "round {round}, {url}: {text}");
        }
        // More idle connections keep arriving.
        idle.extend((0..20).filter_map(|_| std::net::TcpStream::connect(broker.admin).ok()));
    }
    assert_eq!(broker.http_get("/metrics").0, 200);
}
