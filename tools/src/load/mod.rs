//! The load driver behind `broker bench` and the criterion benches: pipelined DEALER clients
//! spread over driver threads, each request correlated to its reply by the 8-byte id in its
//! envelope (`[id, "", body]`), every reply checked.
//!
//! Closed loop: each client keeps `window` requests outstanding. Open loop (`rate`): each
//! client sends on a fixed schedule and latency is measured from the intended send time, so a
//! stall is not hidden by coordinated omission. The sending phase ends at `duration` (or once
//! `requests` were sent, if sooner) and the run ends at most `timeout` later, whatever the
//! server does: an unreachable or dead server costs the run its duration plus its timeout.
//!
//! `timeout` is also each request's budget, as a client with a deadline has one: the request
//! carries what is left of it in its deadline header (`\0broker.timeout-ms=N`, unless
//! `deadline_header` is off), and an `OK` that comes after it is counted late, not OK.

mod driver;
mod report;

use std::thread;
use std::time::{Duration, Instant};

use client::Security;
use nix::time::{clock_gettime, ClockId};

use driver::{body_template, Driver};
pub use report::{Report, SATURATED};

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
    /// Each request's budget, from its intended send time: sent in its deadline header, and
    /// the time after which its reply counts as late. Also how long to wait for outstanding
    /// replies once sending stops.
    pub timeout: Duration,
    /// Send the budget in a deadline header after each envelope. An echo that returns the
    /// header is still a correct echo; leave it out for a server that would take it for body.
    pub deadline_header: bool,
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
            deadline_header: plan.deadline_header,
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
