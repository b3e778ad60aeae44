//! Scale-out with connection age limits, on real processes over 127.0.0.1: what each kind of
//! client loses when the broker recycles its connection, brokers added behind an L4 balancer
//! (haproxy, as kube-proxy) winning their share of existing clients, and clients beyond one
//! pod's connection cap. Bounded in time; figures are printed (run with --nocapture).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::{metric, Broker, EVENT_TIMEOUT};
use nix::sys::signal::Signal;

/// These tests load both cores; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How long a client waits for a reply before it counts the request lost (or retries it).
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// A round trip longer than this waited for a reconnect.
const SLOW: Duration = Duration::from_millis(50);

/// The kinds of client whose losses are measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// REQ in a loop, no retry: a request without a reply in time is lost (the socket is
    /// then replaced, as a REQ that got no reply cannot send again).
    PlainReq,
    /// The same with 0 to 10 ms between requests.
    PacedReq,
    /// REQ with the Lazy Pirate retry of docs/protocol.md: on timeout, a new socket and the
    /// request again.
    PirateReq,
    /// `client::Client`: Lazy Pirate on a DEALER with ZMQ_IMMEDIATE.
    PirateDealer,
    /// Lazy Pirate on a DEALER without ZMQ_IMMEDIATE (a request id per attempt).
    PirateDealerQueued,
    /// DEALER keeping 4 requests outstanding, no retry.
    Pipeline,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::PlainReq,
        Kind::PacedReq,
        Kind::PirateReq,
        Kind::PirateDealer,
        Kind::PirateDealerQueued,
        Kind::Pipeline,
    ];
}

/// What the clients of one kind saw.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    /// Requests sent (a retry of one is not another).
    sent: u64,
    /// Requests answered OK.
    ok: u64,
    /// Requests that never got a reply (no retry), or gave up after their retries.
    lost: u64,
    /// Attempts repeated after a timeout.
    retries: u64,
    /// Answered requests that took longer than [`SLOW`], and their total time.
    slow: u64,
    slow_time: Duration,
    /// The longest answered round trip.
    worst: Duration,
}

impl Seen {
    fn add(&mut self, o: &Seen) {
        self.sent += o.sent;
        self.ok += o.ok;
        self.lost += o.lost;
        self.retries += o.retries;
        self.slow += o.slow;
        self.slow_time += o.slow_time;
        self.worst = self.worst.max(o.worst);
    }

    fn answered(&mut self, took: Duration) {
        self.ok += 1;
        self.worst = self.worst.max(took);
        if took > SLOW {
            self.slow += 1;
            self.slow_time += took;
        }
    }
}

fn req_socket(ctx: &zmq::Context, endpoint: &str) -> zmq::Socket {
    let s = ctx.socket(zmq::REQ).expect("socket");
    s.set_linger(0).expect("linger");
    s.connect(endpoint).expect("connect");
    s
}

fn dealer_socket(ctx: &zmq::Context, endpoint: &str) -> zmq::Socket {
    let s = ctx.socket(zmq::DEALER).expect("socket");
    s.set_linger(0).expect("linger");
    s.connect(endpoint).expect("connect");
    s
}

/// One REQ round trip: the reply within the timeout, checked to echo `body`.
fn req_round_trip(s: &zmq::Socket, body: &[u8]) -> bool {
    s.send(body, 0).expect("send");
    if s.poll(zmq::POLLIN, REPLY_TIMEOUT.as_millis() as i64)
        .expect("poll")
        == 0
    {
        return false;
    }
    let reply = s.recv_multipart(0).expect("recv");
    assert_eq!(reply, [b"OK".to_vec(), body.to_vec()], "echo");
    true
}

/// Runs one client of `kind` against `endpoint` until `stop`.
fn run_client(kind: Kind, endpoint: &str, stop: &AtomicBool, n: u64) -> Seen {
    let mut seen = Seen::default();
    let ctx = zmq::Context::new();
    let mut i = 0u64;
    let mut body = move || {
        i += 1;
        format!("{n}-{i}").into_bytes()
    };
    match kind {
        Kind::PlainReq | Kind::PacedReq => {
            let mut s = req_socket(&ctx, endpoint);
            while !stop.load(Ordering::Relaxed) {
                let b = body();
                seen.sent += 1;
                let sent = Instant::now();
                if req_round_trip(&s, &b) {
                    seen.answered(sent.elapsed());
                } else {
                    seen.lost += 1;
                    s = req_socket(&ctx, endpoint);
                }
                if kind == Kind::PacedReq {
                    // Pacing, not synchronisation: think time between requests.
                    thread::sleep(Duration::from_micros(
                        u64::from(sent.elapsed().subsec_nanos()) % 10_000,
                    ));
                }
            }
        }
        Kind::PirateReq => {
            let mut s = req_socket(&ctx, endpoint);
            while !stop.load(Ordering::Relaxed) {
                let b = body();
                seen.sent += 1;
                let sent = Instant::now();
                let mut done = false;
                for attempt in 0..4 {
                    if attempt > 0 {
                        seen.retries += 1;
                        s = req_socket(&ctx, endpoint);
                    }
                    if req_round_trip(&s, &b) {
                        done = true;
                        break;
                    }
                }
                if done {
                    seen.answered(sent.elapsed());
                } else {
                    seen.lost += 1;
                }
            }
        }
        Kind::PirateDealer => {
            let policy = client::RetryPolicy {
                timeout: REPLY_TIMEOUT,
                retries: 3,
                backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(100),
                ..client::RetryPolicy::default()
            };
            let mut c = client::Client::new(&[endpoint.to_owned()], policy).expect("client");
            while !stop.load(Ordering::Relaxed) {
                let b = body();
                seen.sent += 1;
                let sent = Instant::now();
                match c.request(&[&b]) {
                    Ok(frames) => {
                        assert_eq!(frames, [b.clone()], "echo");
                        seen.answered(sent.elapsed());
                    }
                    Err(_) => seen.lost += 1,
                }
            }
            seen.retries = c.stats().retries;
        }
        Kind::PirateDealerQueued => {
            let mut s = dealer_socket(&ctx, endpoint);
            while !stop.load(Ordering::Relaxed) {
                let b = body();
                seen.sent += 1;
                let sent = Instant::now();
                let mut done = false;
                for attempt in 0..4u8 {
                    if attempt > 0 {
                        seen.retries += 1;
                        s = dealer_socket(&ctx, endpoint);
                    }
                    // A fresh id per attempt: a late reply to an earlier one is not taken.
                    let mut id = b.clone();
                    id.push(attempt);
                    s.send_multipart([&id[..], b"", &b[..]], 0).expect("send");
                    let deadline = sent + REPLY_TIMEOUT * (u32::from(attempt) + 1);
                    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                        if s.poll(zmq::POLLIN, left.as_millis() as i64 + 1)
                            .expect("poll")
                            == 0
                        {
                            continue;
                        }
                        let reply = s.recv_multipart(0).expect("recv");
                        if reply[0] == id {
                            assert_eq!(reply[1..], [Vec::new(), b"OK".to_vec(), b.clone()]);
                            done = true;
                            break;
                        }
                    }
                    if done {
                        break;
                    }
                }
                if done {
                    seen.answered(sent.elapsed());
                } else {
                    seen.lost += 1;
                }
            }
        }
        Kind::Pipeline => {
            const WINDOW: usize = 4;
            let s = dealer_socket(&ctx, endpoint);
            let mut outstanding: Vec<(Vec<u8>, Instant)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                while outstanding.len() < WINDOW {
                    let b = body();
                    s.send_multipart([&b[..], b"", &b[..]], 0).expect("send");
                    seen.sent += 1;
                    outstanding.push((b, Instant::now()));
                }
                // Each request has its own timeout: one lost does not hold up the others.
                let before = outstanding.len();
                outstanding.retain(|(_, sent)| sent.elapsed() < REPLY_TIMEOUT);
                seen.lost += (before - outstanding.len()) as u64;
                let oldest = outstanding.iter().map(|(_, t)| *t).min();
                let left =
                    oldest.map_or(REPLY_TIMEOUT, |t| REPLY_TIMEOUT.saturating_sub(t.elapsed()));
                if s.poll(zmq::POLLIN, left.as_millis() as i64 + 1)
                    .expect("poll")
                    == 0
                {
                    continue;
                }
                let reply = s.recv_multipart(0).expect("recv");
                if let Some(at) = outstanding.iter().position(|(id, _)| *id == reply[0]) {
                    let (id, sent) = outstanding.remove(at);
                    assert_eq!(reply[1..], [Vec::new(), b"OK".to_vec(), id], "echo");
                    seen.answered(sent.elapsed());
                }
            }
        }
    }
    seen
}

/// `clients` clients of `kind` for `duration`.
fn load(kind: Kind, endpoint: &str, clients: u64, duration: Duration) -> Seen {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..clients)
        .map(|n| {
            let (stop, endpoint) = (Arc::clone(&stop), endpoint.to_owned());
            thread::spawn(move || run_client(kind, &endpoint, &stop, n))
        })
        .collect();
    let until = Instant::now() + duration;
    while Instant::now() < until {
        // Waiting out the measurement's length, not an event.
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = Seen::default();
    for t in threads {
        total.add(&t.join().expect("client thread"));
    }
    total
}

fn counter(broker: &Broker, name: &str) -> f64 {
    let v = metric(broker, name);
    if v.is_nan() {
        0.0
    } else {
        v
    }
}

/// Connections the broker closed for their age: (quietly, at the grace).
fn closures(broker: &Broker) -> (f64, f64) {
    (
        counter(broker, "broker_connections_reset_total{reason=\"age\"}"),
        counter(
            broker,
            "broker_connections_reset_total{reason=\"age_grace\"}",
        ),
    )
}

/// Measures every kind of client against one broker per close strategy; prints the table.
/// AGE_STRATEGIES (default "shadow") lists strategies, AGE_SECONDS (default 15) the length of
/// each run.
#[test]
#[ignore = "a measurement: minutes of load (cargo test --release --test scaleout -- --ignored --nocapture)"]
fn loss_per_close_strategy_and_client_kind() {
    let _serial = serial();
    let strategies = std::env::var("AGE_STRATEGIES").unwrap_or_else(|_| "shadow".into());
    let seconds: u64 = std::env::var("AGE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let mut rows = Vec::new();
    for strategy in strategies.split(',') {
        for kind in Kind::ALL {
            let mut broker = Broker::start(&[
                "--workers",
                "2",
                "--max-connection-age",
                "1s",
                "--max-connection-age-grace",
                "1s",
                "--max-connection-age-close",
                strategy,
            ]);
            let seen = load(kind, &broker.front, 8, Duration::from_secs(seconds));
            let (quiet, graced) = closures(&broker);
            let dropped = counter(&broker, "broker_replies_dropped_total{reason=\"age\"}");
            broker.signal(Signal::SIGTERM);
            assert!(broker.wait_exit(EVENT_TIMEOUT).success());
            common::assert_all_answered(&broker);
            let row = format!(
                "{strategy:7} {kind:13?} closures {quiet:5} + {graced:4} at grace | sent {:7} lost {:4} retries {:4} | broker dropped(age) {dropped:4} | slow {:4} mean {:?} worst {:?}",
                seen.sent,
                seen.lost,
                seen.retries,
                seen.slow,
                seen.slow_time.checked_div(seen.slow as u32).unwrap_or_default(),
                seen.worst,
            );
            eprintln!("{row}");
            rows.push(row);
        }
    }
    eprintln!("\n{}", rows.join("\n"));
}
