//! `broker bench`: a load client for a running broker (like `redis-benchmark` or `nats bench`).
//!
//! Each client is a DEALER connected to every address of every `--endpoint` (a DNS name that
//! resolves to several pods connects to each, which is how a client reaches every pod behind a
//! headless Service). Clients keep `--window` requests outstanding (closed loop) or follow a
//! constant `--rate` (open loop, latency measured from the intended send time so a stall is not
//! hidden by coordinated omission). Every echo reply is checked against its request.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use shared::protocol::{STATUS_ERR, STATUS_OK};
use shared::ErrorCode;

use crate::config::parse_duration;

/// Flags of `broker bench`.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {
    /// Broker endpoint; repeat for several. A DNS name connects to each address it resolves to.
    #[arg(long = "endpoint", default_value = "tcp://127.0.0.1:5555")]
    pub endpoints: Vec<String>,
    /// Client connections.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Outstanding requests per client.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Request body size in bytes (at least 8: the first 8 carry the request id).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Run for this long (ignored when --requests is given).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Stop after this many requests in total.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Open loop: send this many requests per second in total, on schedule.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Threads driving the clients.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// How long to wait for outstanding replies at the end before counting them lost.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub timeout: Duration,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Do not check that replies echo their requests (for non-echo handlers).
    #[arg(long)]
    pub no_verify: bool,
    /// Send an empty delimiter frame first, as REQ does (REP servers need it).
    #[arg(long)]
    pub delimiter: bool,
    /// The server is a plain echo (no `OK` status frame), e.g. a bare REP socket.
    #[arg(long)]
    pub raw: bool,
}

/// What a run measured.
#[derive(Debug)]
pub struct Report {
    /// Requests sent.
    pub sent: u64,
    /// `OK` replies that matched their request.
    pub ok: u64,
    /// `ERR` replies by code.
    pub errors: BTreeMap<String, u64>,
    /// Replies that did not match their request or the protocol.
    pub mismatched: u64,
    /// OK replies that could not be matched to a request because an earlier `ERR` reply (which
    /// carries no request id) was attributed to it; counted in `ok`, latency not recorded.
    pub unattributed: u64,
    /// Requests whose reply never came.
    pub lost: u64,
    /// Wall time of the sending phase.
    pub elapsed: Duration,
    /// Latency of OK replies, microseconds.
    pub latency: Histogram<u64>,
}

impl Report {
    fn empty() -> Report {
        Report {
            sent: 0,
            ok: 0,
            errors: BTreeMap::new(),
            mismatched: 0,
            unattributed: 0,
            lost: 0,
            elapsed: Duration::ZERO,
            latency: new_histogram(),
        }
    }

    /// OK replies per second.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let q = |p: f64| self.latency.value_at_quantile(p);
        serde_json::json!({
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "mismatched": self.mismatched,
            "unattributed": self.unattributed,
            "lost": self.lost,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "throughput_rps": self.throughput(),
            "latency_us": {
                "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999),
                "max": self.latency.max(), "mean": self.latency.mean(),
            },
        })
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        let q = |p: f64| self.latency.value_at_quantile(p) as f64 / 1000.0;
        let mut out = format!(
            "requests {} ok {} mismatched {} unattributed {} lost {} in {:.2}s\n\
             throughput {:.0} req/s\n\
             latency ms p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}\n",
            self.sent,
            self.ok,
            self.mismatched,
            self.unattributed,
            self.lost,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            self.latency.max() as f64 / 1000.0
        );
        for (code, n) in &self.errors {
            out.push_str(&format!("ERR {code}: {n}\n"));
        }
        out
    }
}

/// Why a bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag value that cannot work.
    #[error("{0}")]
    Usage(String),
    /// An endpoint did not resolve.
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
    /// libzmq refused a socket operation.
    #[error("{0}: {1}")]
    Zmq(&'static str, zmq::Error),
    /// A client thread panicked.
    #[error("a client thread failed")]
    Thread,
}

/// Runs the load and returns the report.
pub fn run(args: &BenchArgs) -> Result<Report, Error> {
    if args.size < 8 {
        return Err(Error::Usage("--size must be at least 8".into()));
    }
    if args.clients == 0 || args.window == 0 || args.threads == 0 {
        return Err(Error::Usage(
            "--clients, --window and --threads must be at least 1".into(),
        ));
    }
    if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        return Err(Error::Usage("--rate must be more than 0".into()));
    }
    let endpoints = crate::client::resolve(&args.endpoints).map_err(|e| match e {
        crate::client::Error::Resolve(name, io) => Error::Resolve(name, io),
        other => Error::Usage(other.to_string()),
    })?;
    let threads = args.threads.min(args.clients);
    let started = Instant::now();
    let progress = Progress::new(args);
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let clients = (t..args.clients).step_by(threads).collect::<Vec<_>>();
        let share = |total: u64| total * clients.len() as u64 / args.clients as u64;
        let plan = Plan {
            requests: args.requests.map(share),
            deadline: started + args.duration,
            interval: args
                .rate
                .map(|r| Duration::from_secs_f64(args.clients as f64 / r)),
            window: args.window,
            size: args.size,
            timeout: args.timeout,
            verify: !args.no_verify,
            delimiter: args.delimiter,
            raw: args.raw,
        };
        // A context per thread: libzmq allows 1023 sockets per context by default.
        let ctx = zmq::Context::new();
        let sockets = clients
            .iter()
            .map(|&id| connect(&ctx, &endpoints, id))
            .collect::<Result<Vec<_>, _>>()?;
        let mut progress = progress.clone();
        // One thread draws the bar; it scales its own count by the thread count.
        progress.enabled &= t == 0;
        progress.scale = threads as u64;
        handles.push(
            thread::Builder::new()
                .name(format!("bench-{t}"))
                .spawn(move || drive(sockets, plan, started, progress))
                .map_err(|_| Error::Thread)?,
        );
    }
    let mut report = Report::empty();
    for handle in handles {
        let part = handle.join().map_err(|_| Error::Thread)??;
        report.sent += part.sent;
        report.ok += part.ok;
        report.mismatched += part.mismatched;
        report.unattributed += part.unattributed;
        report.lost += part.lost;
        report.elapsed = report.elapsed.max(part.elapsed);
        for (code, n) in part.errors {
            *report.errors.entry(code).or_default() += n;
        }
        let _ = report.latency.add(&part.latency);
    }
    progress.finish();
    Ok(report)
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 1 hour at 3 significant digits; cannot fail with these bounds.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

fn connect(ctx: &zmq::Context, endpoints: &[String], _id: usize) -> Result<zmq::Socket, Error> {
    let socket = ctx
        .socket(zmq::DEALER)
        .map_err(|e| Error::Zmq("socket", e))?;
    socket.set_linger(0).map_err(|e| Error::Zmq("linger", e))?;
    socket.set_sndhwm(0).map_err(|e| Error::Zmq("sndhwm", e))?;
    socket.set_rcvhwm(0).map_err(|e| Error::Zmq("rcvhwm", e))?;
    // Queue only to peers that are connected: an address that does not answer (a pod being
    // replaced, ::1 with nothing on it) must not swallow requests.
    socket
        .set_immediate(true)
        .map_err(|e| Error::Zmq("immediate", e))?;
    for endpoint in endpoints {
        socket
            .connect(endpoint)
            .map_err(|e| Error::Zmq("connect", e))?;
    }
    Ok(socket)
}

struct Plan {
    requests: Option<u64>,
    deadline: Instant,
    interval: Option<Duration>,
    window: usize,
    size: usize,
    timeout: Duration,
    verify: bool,
    delimiter: bool,
    raw: bool,
}

/// One client's outstanding requests: a slot per window position.
struct ClientState {
    socket: zmq::Socket,
    slots: Vec<Option<(u32, Instant)>>,
    free: Vec<u32>,
    seq: u32,
    next_send: Instant,
}

fn drive(
    sockets: Vec<zmq::Socket>,
    plan: Plan,
    started: Instant,
    mut progress: Progress,
) -> Result<Report, Error> {
    let mut clients: Vec<ClientState> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| ClientState {
            socket,
            slots: vec![None; plan.window],
            free: (0..plan.window as u32).rev().collect(),
            seq: 0,
            // Stagger open-loop clients across one interval.
            next_send: started
                + plan.interval.map_or(Duration::ZERO, |iv| {
                    iv.mul_f64(i as f64 / plan.window.max(1) as f64 / 4.0)
                }),
        })
        .collect();
    let mut report = Report::empty();
    let mut body = vec![0xA5u8; plan.size];
    let mut sending = true;
    let mut outstanding = 0usize;
    let mut drain_deadline = None;
    loop {
        let now = Instant::now();
        if sending {
            let budget_left = plan.requests.is_none_or(|n| report.sent < n);
            if !budget_left || (plan.requests.is_none() && now >= plan.deadline) {
                sending = false;
                report.elapsed = now - started;
                drain_deadline = Some(now + plan.timeout);
            }
        }
        if !sending && (outstanding == 0 || drain_deadline.is_some_and(|d| now >= d)) {
            report.lost = outstanding as u64;
            if report.elapsed.is_zero() {
                report.elapsed = now - started;
            }
            return Ok(report);
        }
        // Send what the window (closed loop) or the schedule (open loop) allows.
        let mut next_due: Option<Instant> = None;
        let mut blocked = false;
        if sending {
            for client in clients.iter_mut() {
                while plan.requests.is_none_or(|n| report.sent < n) {
                    let intended = match plan.interval {
                        Some(_) if client.next_send > now => {
                            let due = client.next_send;
                            next_due = Some(next_due.map_or(due, |d: Instant| d.min(due)));
                            break;
                        }
                        Some(_) => client.next_send,
                        None => now,
                    };
                    let Some(slot) = client.free.pop() else { break };
                    client.seq = client.seq.wrapping_add(1);
                    let id = (u64::from(slot) << 32) | u64::from(client.seq);
                    body[..8].copy_from_slice(&id.to_le_bytes());
                    let sent = if plan.delimiter {
                        client
                            .socket
                            .send("", zmq::DONTWAIT | zmq::SNDMORE)
                            .and_then(|()| client.socket.send(&body[..], 0))
                    } else {
                        client.socket.send(&body[..], zmq::DONTWAIT)
                    };
                    match sent {
                        Ok(()) => {}
                        // Not connected yet (ZMQ_IMMEDIATE): try again after a short wait.
                        Err(zmq::Error::EAGAIN) => {
                            client.free.push(slot);
                            blocked = true;
                            break;
                        }
                        Err(e) => return Err(Error::Zmq("send", e)),
                    }
                    client.slots[slot as usize] = Some((client.seq, intended));
                    report.sent += 1;
                    outstanding += 1;
                    if let Some(iv) = plan.interval {
                        client.next_send += iv;
                    }
                }
            }
        }
        // Wait for replies, or until the next scheduled send.
        let wait = match (sending, next_due, drain_deadline) {
            _ if blocked => Duration::from_millis(1),
            (true, Some(due), _) => due.saturating_duration_since(Instant::now()),
            (true, None, _) => Duration::from_millis(100),
            (false, _, Some(d)) => d.saturating_duration_since(Instant::now()),
            (false, _, None) => Duration::from_millis(100),
        };
        let mut items: Vec<zmq::PollItem> = clients
            .iter()
            .map(|c| c.socket.as_poll_item(zmq::POLLIN))
            .collect();
        let ready = match zmq::poll(&mut items, wait.as_micros().div_ceil(1000) as i64) {
            Ok(n) => n,
            Err(zmq::Error::EINTR) => 0,
            Err(e) => return Err(Error::Zmq("poll", e)),
        };
        if ready == 0 {
            continue;
        }
        let readable: Vec<bool> = items.iter().map(|i| i.is_readable()).collect();
        drop(items);
        for (client, readable) in clients.iter_mut().zip(readable) {
            if !readable {
                continue;
            }
            loop {
                let mut frames = match client.socket.recv_multipart(zmq::DONTWAIT) {
                    Ok(frames) => frames,
                    Err(zmq::Error::EAGAIN) => break,
                    Err(e) => return Err(Error::Zmq("recv", e)),
                };
                let done = Instant::now();
                if plan.delimiter && frames.first().is_some_and(Vec::is_empty) {
                    frames.remove(0);
                }
                if plan.raw {
                    frames.insert(0, STATUS_OK.to_vec());
                }
                match check_reply(&frames, client, plan.verify, plan.size) {
                    Checked::Ok(intended) => {
                        report.ok += 1;
                        let us = done.saturating_duration_since(intended).as_micros() as u64;
                        let _ = report.latency.record(us.max(1));
                        outstanding -= 1;
                    }
                    Checked::Err(code) => {
                        *report.errors.entry(code).or_default() += 1;
                        outstanding -= 1;
                    }
                    Checked::Unattributed => {
                        report.ok += 1;
                        report.unattributed += 1;
                        outstanding -= 1;
                    }
                    Checked::Mismatch(freed) => {
                        report.mismatched += 1;
                        if freed {
                            outstanding -= 1;
                        }
                    }
                }
            }
        }
        progress.tick(report.ok);
    }
}

enum Checked {
    Ok(Instant),
    Err(String),
    /// An OK whose slot an earlier ERR already freed (and counted).
    Unattributed,
    /// Did not match; `true` when it still answered one of our requests.
    Mismatch(bool),
}

fn check_reply(frames: &[Vec<u8>], client: &mut ClientState, verify: bool, size: usize) -> Checked {
    // Every reply frees exactly one slot, so occupied slots always equal outstanding
    // requests. An ERR reply carries no request id: it frees the oldest outstanding slot.
    // Exact when there are no errors; with errors, a later OK whose slot was freed that way
    // is counted as unattributed and frees the oldest slot in turn.
    match frames.first().map(Vec::as_slice) {
        Some(STATUS_OK) => {}
        Some(STATUS_ERR) => {
            let code = frames
                .get(1)
                .and_then(|c| ErrorCode::from_bytes(c))
                .map_or_else(|| "malformed".to_owned(), |c| c.as_str().to_owned());
            let freed = free_oldest(client);
            return if freed {
                Checked::Err(code)
            } else {
                Checked::Mismatch(false)
            };
        }
        _ => return Checked::Mismatch(false),
    }
    let Some(echo) = frames.get(1).filter(|f| f.len() >= 8) else {
        return Checked::Mismatch(false);
    };
    let id = u64::from_le_bytes(echo[..8].try_into().unwrap_or_default());
    let (slot, seq) = ((id >> 32) as u32, id as u32);
    let Some(entry) = client.slots.get(slot as usize).copied() else {
        return Checked::Mismatch(false);
    };
    let Some((expected, intended)) = entry else {
        free_oldest(client);
        return Checked::Unattributed;
    };
    if expected != seq {
        free_oldest(client);
        return Checked::Unattributed;
    }
    client.slots[slot as usize] = None;
    client.free.push(slot);
    if verify && (echo.len() != size || echo[8..].iter().any(|&b| b != 0xA5)) {
        return Checked::Mismatch(true);
    }
    Checked::Ok(intended)
}

fn free_oldest(client: &mut ClientState) -> bool {
    let oldest = client
        .slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|(_, t)| (i, t)))
        .min_by_key(|(_, t)| *t);
    match oldest {
        Some((i, _)) => {
            client.slots[i] = None;
            client.free.push(i as u32);
            true
        }
        None => false,
    }
}

/// A progress line on stderr, only when stderr is a terminal.
#[derive(Clone)]
struct Progress {
    enabled: bool,
    scale: u64,
    last: Instant,
    started: Instant,
    total: Option<u64>,
    duration: Duration,
}

impl Progress {
    fn new(args: &BenchArgs) -> Progress {
        Progress {
            enabled: std::io::stderr().is_terminal() && !args.json,
            scale: 1,
            last: Instant::now(),
            started: Instant::now(),
            total: args.requests,
            duration: args.duration,
        }
    }

    fn tick(&mut self, done: u64) {
        if !self.enabled || self.last.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last = Instant::now();
        let done = done * self.scale;
        let elapsed = self.started.elapsed();
        let fraction = match self.total {
            Some(total) => done as f64 / total.max(1) as f64,
            None => elapsed.as_secs_f64() / self.duration.as_secs_f64().max(1e-9),
        }
        .min(1.0);
        let filled = (fraction * 30.0) as usize;
        eprint!(
            "\r[{}{}] {:>5.1}% {:>10.0} req/s",
            "#".repeat(filled),
            " ".repeat(30 - filled),
            fraction * 100.0,
            done as f64 / elapsed.as_secs_f64().max(1e-9)
        );
        let _ = std::io::stderr().flush();
    }

    fn finish(&self) {
        if self.enabled {
            eprintln!();
        }
    }
}
