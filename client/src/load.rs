//! The load driver behind `broker bench` and the criterion benches: pipelined DEALER clients
//! spread over driver threads, each request correlated to its reply by the 8-byte id in its
//! envelope (`[id, "", body]`), every reply checked.
//!
//! Closed loop: each client keeps `window` requests outstanding. Open loop (`rate`): each
//! client sends on a fixed schedule and latency is measured from the intended send time, so a
//! stall is not hidden by coordinated omission. The sending phase ends at `duration` (or once
//! `requests` were sent, if sooner) and the run ends at most `timeout` later, whatever the
//! server does: an unreachable or dead server costs the run its duration plus its timeout.

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::time::{clock_gettime, ClockId};
use shared::protocol::{ErrorCode, STATUS_ERR, STATUS_OK};

use crate::security::Security;

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Concrete endpoints (already resolved); every client connects to each.
    pub endpoints: Vec<String>,
    /// Client sockets in all.
    pub clients: usize,
    /// Outstanding requests per client (closed loop), or the most a client may have
    /// outstanding while it keeps its schedule (open loop).
    pub window: usize,
    /// Body bytes per request (at least 8).
    pub size: usize,
    /// Length of the sending phase.
    pub duration: Duration,
    /// Stop sending after this many requests in all.
    pub requests: Option<u64>,
    /// Open loop: requests per second in all.
    pub rate: Option<f64>,
    /// Driver threads.
    pub threads: usize,
    /// How long to wait for outstanding replies once sending stops.
    pub timeout: Duration,
    /// Check that each reply echoes its request.
    pub verify: bool,
    /// The server replies without a status frame (a bare echo, e.g. a REP socket).
    pub raw: bool,
    /// A frame sent ahead of each body (e.g. the milliseconds for the `sleep` handler);
    /// an echo must return it too.
    pub first_frame: Option<Vec<u8>>,
    /// How the sockets authenticate.
    pub security: Security,
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
    /// Replies that did not match a request, or a request's body, or the protocol.
    pub mismatched: u64,
    /// Requests whose reply never came.
    pub lost: u64,
    /// Wall time of the sending phase.
    pub elapsed: Duration,
    /// Wall time of the whole run, to the last reply (or the end of the drain).
    pub total: Duration,
    /// Latency of OK replies, microseconds.
    pub latency: Histogram<u64>,
    /// The busiest driver thread's CPU time over its wall time.
    pub driver_cpu: f64,
    /// The whole process's CPU time (libzmq's I/O threads included) over wall time times the
    /// CPUs it may use.
    pub process_cpu: f64,
}

/// A driver thread or the process above this share of its CPU was the bottleneck.
pub const SATURATED: f64 = 0.9;

impl Report {
    fn empty() -> Report {
        Report {
            sent: 0,
            ok: 0,
            errors: BTreeMap::new(),
            mismatched: 0,
            lost: 0,
            elapsed: Duration::ZERO,
            total: Duration::ZERO,
            latency: new_histogram(),
            driver_cpu: 0.0,
            process_cpu: 0.0,
        }
    }

    /// OK replies per second.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Replies of any kind.
    pub fn answered(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }

    /// True when the load client itself ran out of CPU: its figures are a floor.
    pub fn saturated(&self) -> bool {
        self.driver_cpu >= SATURATED || self.process_cpu >= SATURATED
    }

    /// Why the run failed, if it did: nothing answered, only errors, or a reply lost or wrong.
    pub fn failure(&self) -> Option<String> {
        if self.sent == 0 {
            return Some("no request could be sent (nothing connected)".into());
        }
        if self.lost > 0 || self.mismatched > 0 {
            return Some(format!(
                "{} replies lost and {} wrong",
                self.lost, self.mismatched
            ));
        }
        if self.answered() == 0 {
            return Some("no replies".into());
        }
        if self.ok == 0 {
            return Some("every reply was an error".into());
        }
        None
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let q = |p: f64| self.latency.value_at_quantile(p);
        serde_json::json!({
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "mismatched": self.mismatched,
            "lost": self.lost,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "throughput_rps": self.throughput(),
            "latency_us": {
                "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999),
                "max": self.latency.max(), "mean": self.latency.mean(),
            },
            "driver_cpu": self.driver_cpu,
            "process_cpu": self.process_cpu,
            "client_saturated": self.saturated(),
        })
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        let q = |p: f64| self.latency.value_at_quantile(p) as f64 / 1000.0;
        let mut out = format!(
            "requests {} ok {} mismatched {} lost {} in {:.2}s\n\
             throughput {:.0} req/s\n\
             latency ms p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}\n\
             client cpu: busiest driver thread {:.0}%, process {:.0}% of its CPUs\n",
            self.sent,
            self.ok,
            self.mismatched,
            self.lost,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            self.latency.max() as f64 / 1000.0,
            self.driver_cpu * 100.0,
            self.process_cpu * 100.0,
        );
        for (code, n) in &self.errors {
            out.push_str(&format!("ERR {code}: {n}\n"));
        }
        if self.saturated() {
            out.push_str(
                "warning: the load client was CPU-bound; the server may be faster than shown \
                 (add --threads or run the client elsewhere)\n",
            );
        }
        out
    }

    fn merge(&mut self, part: Report) {
        self.sent += part.sent;
        self.ok += part.ok;
        self.mismatched += part.mismatched;
        self.lost += part.lost;
        self.elapsed = self.elapsed.max(part.elapsed);
        for (code, n) in part.errors {
            *self.errors.entry(code).or_default() += n;
        }
        let _ = self.latency.add(&part.latency);
        self.driver_cpu = self.driver_cpu.max(part.driver_cpu);
    }
}

/// Why a run could not start or went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A plan that cannot run.
    #[error("{0}")]
    Plan(String),
    /// libzmq refused a socket operation.
    #[error("{0}: {1}")]
    Zmq(&'static str, zmq::Error),
    /// An endpoint refused the handshake.
    #[error("{0} refused the connection: {1}")]
    Refused(String, &'static str),
    /// A driver thread could not start or panicked.
    #[error("a driver thread failed")]
    Thread,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 1 hour at 3 significant digits; cannot fail with these bounds.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

/// Runs the plan and returns the report.
pub fn run(plan: &Plan) -> Result<Report, Error> {
    if plan.size < 8 {
        return Err(Error::Plan("the body must be at least 8 bytes".into()));
    }
    if plan.clients == 0 || plan.window == 0 || plan.threads == 0 {
        return Err(Error::Plan(
            "clients, window and threads must be at least 1".into(),
        ));
    }
    if plan.rate.is_some_and(|r| !r.is_finite() || r <= 0.0) {
        return Err(Error::Plan("the rate must be a number above 0".into()));
    }
    let threads = plan.threads.min(plan.clients);
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let ids: Vec<usize> = (t..plan.clients).step_by(threads).collect();
        let share = |total: u64| total * ids.len() as u64 / plan.clients as u64;
        // A context per thread: each gets its own I/O thread, and libzmq allows 1023
        // sockets per context.
        let ctx = zmq::Context::new();
        let sockets = ids
            .iter()
            .map(|_| connect(&ctx, plan))
            .collect::<Result<Vec<_>, _>>()?;
        let driver = Driver {
            requests: plan.requests.map(share),
            deadline: started + plan.duration,
            interval: plan
                .rate
                .map(|r| Duration::from_secs_f64(plan.clients as f64 / r)),
            window: plan.window,
            timeout: plan.timeout,
            verify: plan.verify,
            raw: plan.raw,
            first_frame: plan.first_frame.clone(),
            template: body_template(plan.size, t),
        };
        handles.push(
            thread::Builder::new()
                .name(format!("bench-{t}"))
                .spawn(move || {
                    let _ctx = ctx;
                    driver.run(sockets, started)
                })
                .map_err(|_| Error::Thread)?,
        );
    }
    let mut report = Report::empty();
    for handle in handles {
        report.merge(handle.join().map_err(|_| Error::Thread)??);
    }
    report.total = started.elapsed();
    let wall = report.total.as_secs_f64().max(1e-9);
    let cpus = allowed_cpus() as f64;
    report.process_cpu = (process_cpu() - cpu_before) / (wall * cpus);
    Ok(report)
}

/// How long the pre-flight waits for each endpoint's handshake.
const PREFLIGHT_WAIT: Duration = Duration::from_secs(2);

/// Connects once to each endpoint, alone, and fails when one refuses the handshake (a key it
/// does not allow, the wrong server key, CURVE on one side only). In the run itself a DEALER
/// sends only to the endpoints that accepted it, so such an endpoint would otherwise go
/// unnoticed behind the others' replies. An endpoint with nothing listening is left to the
/// run (a name may resolve to an address that does not answer); one that accepts the
/// connection but does not finish the handshake within 2 s (`PREFLIGHT_WAIT`) is returned as a
/// warning.
pub fn preflight(plan: &Plan) -> Result<Vec<String>, Error> {
    let zmq = |what| move |e| Error::Zmq(what, e);
    let ctx = zmq::Context::new();
    let mut warnings = Vec::new();
    for endpoint in &plan.endpoints {
        let socket = dealer(&ctx, plan)?;
        let monitor = crate::handshake::watch(&ctx, &socket).map_err(zmq("monitor"))?;
        socket.connect(endpoint).map_err(zmq("connect"))?;
        let mut seen = crate::handshake::Seen::default();
        let mut frames = Vec::new();
        let deadline = Instant::now() + PREFLIGHT_WAIT;
        loop {
            seen.read(&monitor, &mut frames);
            if let Some(why) = seen.failure() {
                return Err(Error::Refused(endpoint.clone(), why));
            }
            if seen.handshake_done() || seen.unreachable() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warnings.push(format!("{endpoint}: {}", seen.why()));
                break;
            }
            match monitor.poll(zmq::POLLIN, left.as_millis().max(1) as i64) {
                Ok(_) | Err(zmq::Error::EINTR) => {}
                Err(e) => return Err(Error::Zmq("poll", e)),
            }
        }
    }
    Ok(warnings)
}

/// A client socket as the run uses them, connected to every endpoint.
fn connect(ctx: &zmq::Context, plan: &Plan) -> Result<zmq::Socket, Error> {
    let socket = dealer(ctx, plan)?;
    for endpoint in &plan.endpoints {
        socket
            .connect(endpoint)
            .map_err(|e| Error::Zmq("connect", e))?;
    }
    Ok(socket)
}

/// A DEALER with the run's options and security, not yet connected.
fn dealer(ctx: &zmq::Context, plan: &Plan) -> Result<zmq::Socket, Error> {
    let zmq = |what| move |e| Error::Zmq(what, e);
    let socket = ctx.socket(zmq::DEALER).map_err(zmq("socket"))?;
    socket.set_linger(0).map_err(zmq("linger"))?;
    // IPv6 endpoints as well as IPv4 ones (libzmq connects IPv4 only by default).
    socket.set_ipv6(true).map_err(zmq("ipv6"))?;
    socket.set_sndhwm(0).map_err(zmq("sndhwm"))?;
    socket.set_rcvhwm(0).map_err(zmq("rcvhwm"))?;
    // Queue only to peers that are connected: an address that does not answer (a pod being
    // replaced, ::1 with nothing on it) must not swallow requests.
    socket.set_immediate(true).map_err(zmq("immediate"))?;
    plan.security
        .apply(&socket)
        .map_err(|e| Error::Plan(e.to_string()))?;
    Ok(socket)
}

/// A body of `size` bytes whose first 8 will carry the request id; the rest is a pattern
/// that differs per driver thread, so a reply crossed between clients is caught.
fn body_template(size: usize, thread: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (i.wrapping_mul(31) ^ thread.wrapping_mul(131)) as u8)
        .collect()
}

/// One client socket and its outstanding requests, a slot per window position.
struct Client {
    socket: zmq::Socket,
    /// Per slot: the sequence number and the (intended) send time of its request.
    slots: Vec<Option<(u32, Instant)>>,
    free: Vec<u32>,
    seq: u32,
    next_send: Instant,
}

/// One driver thread's share of the plan.
struct Driver {
    requests: Option<u64>,
    deadline: Instant,
    interval: Option<Duration>,
    window: usize,
    timeout: Duration,
    verify: bool,
    raw: bool,
    first_frame: Option<Vec<u8>>,
    template: Vec<u8>,
}

/// How a reply checked out.
enum Checked {
    Ok(Instant),
    Err(&'static str),
    Mismatch,
}

impl Driver {
    fn run(mut self, sockets: Vec<zmq::Socket>, started: Instant) -> Result<Report, Error> {
        let cpu_started = thread_cpu();
        let count = sockets.len().max(1);
        let mut clients: Vec<Client> = sockets
            .into_iter()
            .enumerate()
            .map(|(i, socket)| Client {
                socket,
                slots: vec![None; self.window],
                free: (0..self.window as u32).rev().collect(),
                seq: 0,
                // Stagger open-loop clients across one interval.
                next_send: started
                    + self
                        .interval
                        .map_or(Duration::ZERO, |iv| iv.mul_f64(i as f64 / count as f64)),
            })
            .collect();
        let mut report = Report::empty();
        let mut sending = true;
        let mut outstanding = 0usize;
        let mut drain_until = None;
        let mut frames: Vec<zmq::Message> = Vec::with_capacity(6);
        loop {
            let now = Instant::now();
            if sending && (now >= self.deadline || self.requests.is_some_and(|n| report.sent >= n))
            {
                sending = false;
                report.elapsed = now - started;
                drain_until = Some(now + self.timeout);
            }
            if !sending && (outstanding == 0 || drain_until.is_some_and(|d| now >= d)) {
                report.lost = outstanding as u64;
                if report.elapsed.is_zero() {
                    report.elapsed = now - started;
                }
                let wall = started.elapsed().as_secs_f64().max(1e-9);
                report.driver_cpu = (thread_cpu() - cpu_started) / wall;
                return Ok(report);
            }
            let (next_due, blocked) = if sending {
                self.send_due(&mut clients, now, &mut report, &mut outstanding)?
            } else {
                (None, false)
            };
            // Wait for replies, until the next scheduled send, or the end of a phase.
            let limit = if sending {
                self.deadline
            } else {
                drain_until.unwrap_or(now)
            };
            let wait = if blocked {
                Duration::from_millis(1)
            } else {
                next_due
                    .unwrap_or(limit)
                    .min(limit)
                    .saturating_duration_since(Instant::now())
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
                    match shared::socket::recv_frames(&client.socket, zmq::DONTWAIT, &mut frames) {
                        Ok(()) => {}
                        Err(zmq::Error::EAGAIN) => break,
                        Err(e) => return Err(Error::Zmq("recv", e)),
                    }
                    let done = Instant::now();
                    match self.check(&frames, client) {
                        Some(checked) => {
                            outstanding -= 1;
                            match checked {
                                Checked::Ok(intended) => {
                                    report.ok += 1;
                                    let us = done.saturating_duration_since(intended).as_micros();
                                    let _ = report.latency.record((us as u64).max(1));
                                }
                                Checked::Err(code) => {
                                    *report.errors.entry(code.to_owned()).or_default() += 1;
                                }
                                Checked::Mismatch => report.mismatched += 1,
                            }
                        }
                        // Not ours at all: counted, frees nothing.
                        None => report.mismatched += 1,
                    }
                }
            }
        }
    }

    /// Sends what each client's window (closed loop) or schedule (open loop) allows. Returns
    /// the next scheduled send and whether a send found no connected peer.
    fn send_due(
        &mut self,
        clients: &mut [Client],
        now: Instant,
        report: &mut Report,
        outstanding: &mut usize,
    ) -> Result<(Option<Instant>, bool), Error> {
        let mut next_due: Option<Instant> = None;
        for client in clients.iter_mut() {
            while self.requests.is_none_or(|n| report.sent < n) {
                let intended = match self.interval {
                    Some(_) if client.next_send > now => {
                        let due = client.next_send;
                        next_due = Some(next_due.map_or(due, |d| d.min(due)));
                        break;
                    }
                    Some(_) => client.next_send,
                    None => now,
                };
                let Some(slot) = client.free.pop() else { break };
                let seq = client.seq.wrapping_add(1);
                let id = (u64::from(slot) << 32 | u64::from(seq)).to_be_bytes();
                self.template[..8].copy_from_slice(&id);
                let socket = &client.socket;
                let more = zmq::DONTWAIT | zmq::SNDMORE;
                let sent = socket
                    .send(&id[..], more)
                    .and_then(|()| socket.send("", more))
                    .and_then(|()| match &self.first_frame {
                        Some(first) => socket.send(&first[..], more),
                        None => Ok(()),
                    })
                    .and_then(|()| socket.send(&self.template[..], zmq::DONTWAIT));
                match sent {
                    Ok(()) => {}
                    // Not connected yet (ZMQ_IMMEDIATE): the first frame is refused whole.
                    Err(zmq::Error::EAGAIN) => {
                        client.free.push(slot);
                        return Ok((next_due, true));
                    }
                    Err(e) => return Err(Error::Zmq("send", e)),
                }
                client.seq = seq;
                client.slots[slot as usize] = Some((seq, intended));
                report.sent += 1;
                *outstanding += 1;
                if let Some(iv) = self.interval {
                    client.next_send += iv;
                }
            }
        }
        Ok((next_due, false))
    }

    /// Matches a reply to its request by the id in its envelope and checks it. `None` when it
    /// answers no outstanding request of this client.
    fn check(&self, frames: &[zmq::Message], client: &mut Client) -> Option<Checked> {
        let id: [u8; 8] = frames.first()?.as_ref().try_into().ok()?;
        if !frames.get(1)?.is_empty() {
            return None;
        }
        let raw = u64::from_be_bytes(id);
        let (slot, seq) = ((raw >> 32) as usize, raw as u32);
        let (expected, intended) = (*client.slots.get(slot)?)?;
        if expected != seq {
            return None;
        }
        client.slots[slot] = None;
        client.free.push(slot as u32);
        let body = if self.raw {
            &frames[2..]
        } else {
            match frames.get(2).map(|f| &f[..]) {
                Some(STATUS_OK) => &frames[3..],
                Some(STATUS_ERR) => {
                    return Some(Checked::Err(
                        frames
                            .get(3)
                            .and_then(|c| ErrorCode::from_bytes(c))
                            .map_or("malformed", ErrorCode::as_str),
                    ))
                }
                _ => return Some(Checked::Mismatch),
            }
        };
        if self.verify {
            let echo = match (body, &self.first_frame) {
                ([echo], None) => echo,
                ([first, echo], Some(sent)) if first[..] == sent[..] => echo,
                _ => return Some(Checked::Mismatch),
            };
            if !same_but_id(echo, &self.template, &id) {
                return Some(Checked::Mismatch);
            }
        }
        Some(Checked::Ok(intended))
    }
}

/// True when `echo` is the template with `id` in its first 8 bytes (the template has moved
/// on to later ids since this request was sent).
fn same_but_id(echo: &[u8], template: &[u8], id: &[u8; 8]) -> bool {
    echo.len() == template.len() && echo[..8] == id[..] && echo[8..] == template[8..]
}

/// This thread's CPU time, in seconds.
fn thread_cpu() -> f64 {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

/// The process's CPU time (every thread), in seconds.
fn process_cpu() -> f64 {
    clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

/// CPUs this process may run on (its affinity mask, so a pinned client counts one).
fn allowed_cpus() -> usize {
    nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&i| set.is_set(i).unwrap_or(false))
                .count()
        })
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or(1)
}
