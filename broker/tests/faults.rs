//! Failure behaviour with real processes on 127.0.0.1: rolling restarts and a crash behind
//! haproxy (standing in for kube-proxy) under load from retrying clients, an overload soak, a
//! connection storm, and slow or vanished clients at scale. Bounded in time; figures are
//! printed (run with --nocapture) and collected in docs/reliability.md.
//! FAULT_SOAK_SECS (default 10) sets the overload soak's length.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use client::{Client as RetryClient, RetryPolicy, Stats};
use common::haproxy::{Haproxy, Server};
use common::{eventually, metric, ok, Broker, Client, EVENT_TIMEOUT};
use nix::sys::signal::Signal;

/// These tests load both cores; run them one at a time so none measures another's load.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The shutdown delay the manifests set (deploy/base/deployment.yaml).
const MANIFEST_SHUTDOWN_DELAY: &str = "5s";

struct Slot {
    zmq: u16,
    admin: u16,
}

impl Slot {
    fn new() -> Slot {
        // Restarted replicas bind the same ports again.
        Slot {
            zmq: common::stable_port(),
            admin: common::stable_port(),
        }
    }

    fn start(&self, extra: &[&str]) -> Broker {
        let front = format!("tcp://127.0.0.1:{}", self.zmq);
        let admin = format!("127.0.0.1:{}", self.admin);
        let mut args = vec!["--frontend", &front, "--admin", &admin];
        args.extend_from_slice(extra);
        let broker = Broker::spawn_exact(&args, &[], self.zmq, self.admin);
        broker.wait_for_log("state starting -> serving", EVENT_TIMEOUT);
        broker
    }
}

/// haproxy in front of `slots`, every one in the rotation.
fn balancer(slots: &[Slot]) -> Haproxy {
    let servers: Vec<Server> = slots
        .iter()
        .map(|s| Server {
            zmq: s.zmq,
            admin: s.admin,
            disabled: false,
        })
        .collect();
    Haproxy::start(&servers)
}

/// Retrying clients sending `body` in a loop until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<Stats>>,
}

impl Load {
    fn start(endpoint: &str, clients: usize, body: &'static [u8]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let policy = RetryPolicy {
            timeout: Duration::from_secs(1),
            retries: 30,
            backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
            ..RetryPolicy::default()
        };
        let threads = (0..clients)
            .map(|_| {
                let (stop, endpoint) = (Arc::clone(&stop), endpoint.to_owned());
                thread::spawn(move || {
                    let mut client = RetryClient::new(&[endpoint], policy).expect("client");
                    let mut sent = 0;
                    while !stop.load(Ordering::Relaxed) && sent < 1_000_000 {
                        sent += 1;
                        match client.request(&[body]) {
                            Ok(frames) => assert_eq!(frames, [body.to_vec()], "echo"),
                            Err(e) => eprintln!("request failed for good: {e}"),
                        }
                    }
                    client.stats()
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Stats::default();
        for thread in self.threads {
            total.add(&thread.join().expect("load thread"));
        }
        total
    }
}

#[test]
fn rolling_restart_behind_a_balancer_fails_no_request() {
    let _serial = serial();
    let slots: Vec<Slot> = (0..3).map(|_| Slot::new()).collect();
    let args = [
        "--workers",
        "2",
        "--handler",
        "sleep",
        "--shutdown-delay",
        MANIFEST_SHUTDOWN_DELAY,
        "--drain-timeout",
        "10s",
    ];
    let mut brokers: Vec<Broker> = slots.iter().map(|s| s.start(&args)).collect();
    let haproxy = balancer(&slots);
    for i in 0..3 {
        haproxy.wait_status(i, "UP");
    }
    let load = Load::start(&haproxy.endpoint(), 6, b"2");
    eventually("load reaches the brokers", EVENT_TIMEOUT, || {
        brokers.iter().map(common::ok_count).sum::<u64>() >= 200
    });

    let mut drains = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        let started = Instant::now();
        brokers[i].signal(Signal::SIGTERM);
        haproxy.wait_status(i, "DOWN");
        let status = brokers[i].wait_exit(Duration::from_secs(20));
        assert!(status.success(), "replica {i} exit {status:?}");
        common::assert_all_answered(&brokers[i]);
        drains.push(started.elapsed());
        brokers[i] = slot.start(&args);
        haproxy.wait_status(i, "UP");
    }
    // The restarted replicas take traffic again.
    eventually("traffic after the restarts", EVENT_TIMEOUT, || {
        brokers.iter().map(common::ok_count).sum::<u64>() >= 200
    });
    let stats = load.finish();
    eprintln!("rolling restart: {stats:?}; SIGTERM-to-exit per replica {drains:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert!(stats.ok > 0);
}

#[test]
fn a_crashed_replica_costs_retries_not_requests() {
    let _serial = serial();
    let slots: Vec<Slot> = (0..3).map(|_| Slot::new()).collect();
    let args = ["--workers", "2", "--handler", "sleep"];
    let mut brokers: Vec<Broker> = slots.iter().map(|s| s.start(&args)).collect();
    let haproxy = balancer(&slots);
    for i in 0..3 {
        haproxy.wait_status(i, "UP");
    }
    let load = Load::start(&haproxy.endpoint(), 6, b"2");
    eventually("load on every replica", EVENT_TIMEOUT, || {
        brokers.iter().all(|b| common::ok_count(b) >= 20)
    });
    brokers[1].signal(Signal::SIGKILL);
    let status = brokers[1].wait_exit(EVENT_TIMEOUT);
    assert_eq!(status.code(), None, "killed by a signal");
    haproxy.wait_status(1, "DOWN");
    let before: u64 = [0, 2].iter().map(|&i| common::ok_count(&brokers[i])).sum();
    eventually("the survivors carry the load", EVENT_TIMEOUT, || {
        [0, 2]
            .iter()
            .map(|&i| common::ok_count(&brokers[i]))
            .sum::<u64>()
            >= before + 500
    });
    let stats = load.finish();
    eprintln!("crash: {stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert!(
        stats.timeouts + stats.retries > 0,
        "the crash is visible in the clients' counts: {stats:?}"
    );
}

#[test]
fn overload_soak_refuses_fast_keeps_memory_flat_and_recovers() {
    let _serial = serial();
    let seconds: u64 = std::env::var("FAULT_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let broker = Broker::start(&[
        "--workers",
        "2",
        "--handler",
        "cpu",
        "--cpu-rounds",
        "70000",
        "--max-inflight",
        "32",
    ]);
    // The pool's capacity in this build, measured; the soak offers five times that.
    let capacity = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args([
            "bench",
            "--endpoint",
            &broker.front,
            "--clients",
            "4",
            "--window",
            "2",
        ])
        .args(["--duration", "2s", "--no-verify", "--json"])
        .output()
        .expect("capacity bench");
    let capacity: serde_json::Value = serde_json::from_slice(&capacity.stdout).expect("bench JSON");
    let capacity = capacity["throughput_rps"].as_f64().expect("throughput");
    let rate = format!("{:.0}", capacity * 5.0);
    let rss_before = metric(&broker, "process_resident_memory_bytes");
    let bench = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args([
            "bench",
            "--endpoint",
            &broker.front,
            "--clients",
            "8",
            "--window",
            "16",
        ])
        .args(["--rate", &rate, "--no-verify", "--json"])
        .args(["--duration", &format!("{seconds}s")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("bench");
    // Sample memory and the time to an ERR overloaded while the soak runs.
    let probe = Client::req(&broker.front);
    let (mut rss_max, mut refusal_max, mut refusals) = (rss_before, Duration::ZERO, 0);
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        let sent = Instant::now();
        let reply = probe.request(&[b"x"]);
        if common::err_code(&reply) == Some(shared::ErrorCode::Overloaded) {
            refusals += 1;
            refusal_max = refusal_max.max(sent.elapsed());
        }
        rss_max = rss_max.max(metric(&broker, "process_resident_memory_bytes"));
        thread::sleep(Duration::from_millis(100)); // sampling period, not synchronisation
    }
    let output = bench.wait_with_output().expect("bench output");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("bench JSON");
    let overloaded = report["errors"]["overloaded"].as_u64().unwrap_or(0);
    eprintln!(
        "soak {seconds}s: capacity {capacity:.0} req/s, offered {rate}/s; sent {} ok {} \
         overloaded {overloaded}; probe saw {refusals} refusals, slowest {refusal_max:?}; \
         RSS {:.1} -> max {:.1} MiB",
        report["sent"],
        report["ok"],
        rss_before / 1048576.0,
        rss_max / 1048576.0
    );
    assert!(
        overloaded > report["ok"].as_u64().unwrap_or(0),
        "the load was beyond capacity: {report}"
    );
    assert_eq!(report["lost"], 0, "{report}");
    assert!(
        refusals > 0 && refusal_max < Duration::from_secs(1),
        "refusals are immediate"
    );
    assert!(
        rss_max - rss_before < 32.0 * 1048576.0,
        "RSS grew by more than 32 MiB"
    );
    // Load gone: the very next request is served.
    let fresh = Client::req(&broker.front);
    assert!(matches!(
        fresh.request(&[b"5000"]),
        shared::protocol::Reply::Ok(_)
    ));
}

#[test]
fn connection_storm_leaks_no_fds() {
    let _serial = serial();
    let broker = Broker::start(&["--workers", "2"]);
    let baseline = metric(&broker, "process_open_fds");
    let mut connected = 0;
    // 10 rounds of 1000 connections (libzmq allows 1023 sockets per context).
    for _ in 0..10 {
        let ctx = zmq::Context::new();
        let sockets: Vec<zmq::Socket> = (0..1000)
            .map(|_| {
                let s = ctx.socket(zmq::DEALER).expect("socket");
                s.set_linger(0).expect("linger");
                s.connect(&broker.front).expect("connect");
                s.send(shared::protocol::HEALTH_REQUEST, 0).expect("send");
                s
            })
            .collect();
        for s in &sockets {
            assert!(
                s.poll(zmq::POLLIN, EVENT_TIMEOUT.as_millis() as i64)
                    .expect("poll")
                    > 0,
                "health reply"
            );
            s.recv_multipart(0).expect("recv");
            connected += 1;
        }
    }
    assert_eq!(connected, 10_000);
    eventually("open fds back to baseline", Duration::from_secs(30), || {
        metric(&broker, "process_open_fds") <= baseline + 2.0
    });
    eprintln!(
        "storm: 10000 connections; fds {baseline} before, {} after",
        metric(&broker, "process_open_fds")
    );
    let client = Client::req(&broker.front);
    assert_eq!(ok(client.request(&[b"alive"])), [b"alive".to_vec()]);
}

#[test]
fn slow_and_vanished_clients_at_scale_do_not_hurt_others() {
    let _serial = serial();
    // Eight sleeping workers, so 200 requests of 100 ms take 2.5 s.
    let broker = Broker::start(&[
        "--workers",
        "8",
        "--handler",
        "sleep",
        "--max-inflight",
        "100000",
    ]);
    let good = Client::dealer(&broker.front, true);
    let measure = |n: usize| {
        let mut worst = Duration::ZERO;
        for _ in 0..n {
            let sent = Instant::now();
            assert!(matches!(
                good.request(&[b"0"]),
                shared::protocol::Reply::Ok(_)
            ));
            worst = worst.max(sent.elapsed());
        }
        worst
    };
    let before = measure(200);
    let ctx = zmq::Context::new();
    // 200 clients vanish with a request in flight.
    for _ in 0..200 {
        let s = ctx.socket(zmq::DEALER).expect("socket");
        s.set_linger(0).expect("linger");
        s.connect(&broker.front).expect("connect");
        // Long enough that the broker has seen the disconnect before the reply is ready (a
        // reply sent before libzmq notices is lost in the closing connection, uncounted).
        s.send_multipart([&b""[..], b"100"], 0).expect("send");
        s.send_multipart([&b""[..], shared::protocol::HEALTH_REQUEST], 0)
            .expect("send");
        s.poll(zmq::POLLIN, EVENT_TIMEOUT.as_millis() as i64)
            .expect("health reply");
    }
    // 100 clients that stop reading. Three of them send 20,000 requests of 4 KiB: once half
    // their --max-connection-bytes (4 MiB, the kernel's 256 KiB buffers included) holds
    // unread replies their requests are refused, and even if every one was refused, 20,000
    // refusals (about 350 bytes each in libzmq) are more than the bound holds, so some
    // replies must be dropped.
    let (small, large) = (vec![b'0'; 256], vec![b'0'; 4096]);
    let deaf: Vec<zmq::Socket> = (0..100)
        .map(|i| {
            let s = common::deaf_client(&ctx, &broker.front);
            let (count, filler) = if i < 3 {
                (20_000, &large)
            } else {
                (10, &small)
            };
            for _ in 0..count {
                s.send_multipart([&b"0"[..], filler], 0).expect("send");
            }
            s
        })
        .collect();
    let flood = 200.0 + 3.0 * 20_000.0 + 97.0 * 10.0;
    eventually("the flood is answered", Duration::from_secs(60), || {
        let answered = ["ok", "overloaded"]
            .iter()
            .map(|o| {
                metric(
                    &broker,
                    &format!("broker_requests_total{{outcome=\"{o}\"}}"),
                )
            })
            .sum::<f64>();
        answered >= 200.0 + flood
    });
    let during = measure(200);
    eventually("drops counted by reason", EVENT_TIMEOUT, || {
        metric(
            &broker,
            "broker_replies_dropped_total{reason=\"peer_gone\"}",
        ) >= 200.0
            && metric(&broker, "broker_replies_dropped_total{reason=\"hwm\"}") > 0.0
    });
    eprintln!(
        "slow/vanished: worst round trip {before:?} before, {during:?} during; dropped peer_gone {} hwm {}",
        metric(&broker, "broker_replies_dropped_total{reason=\"peer_gone\"}"),
        metric(&broker, "broker_replies_dropped_total{reason=\"hwm\"}")
    );
    assert!(
        during < Duration::from_secs(1),
        "a good client waited {during:?}"
    );
    drop(deaf);
}
