//! Regression bench: the real broker binary driven by the project's own load driver
//! (`tools::load`, what `broker bench` runs), for tracking the broker's speed from change to
//! change with criterion's saved baselines. It compares nothing: the comparison with libzmq's
//! C proxy, measured by a C client that shares no code with the broker, is
//! `scripts/compare.sh` (docs/performance.md).
//!
//! Throughput cases pin the driver to core 0 and the broker to core 1; the latency case pins
//! both to core 0 (on 2 cores, unpinned numbers are noise). `BENCH_WORKERS` sets the pool size
//! (default 2). Run: `cargo bench --bench regression`.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use client::Security;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use tools::load::{self, Plan};

struct Case {
    name: &'static str,
    clients: usize,
    window: usize,
    size: usize,
    same_core: bool,
}

const CASES: [Case; 3] = [
    Case {
        name: "latency_1x1_64B",
        clients: 1,
        window: 1,
        size: 64,
        same_core: true,
    },
    Case {
        name: "throughput_16x16_64B",
        clients: 16,
        window: 16,
        size: 64,
        same_core: false,
    },
    Case {
        name: "large_4x4_64KiB",
        clients: 4,
        window: 4,
        size: 64 * 1024,
        same_core: false,
    },
];

/// Pins the calling thread (and the threads it starts later) to `cores`.
fn pin(cores: &[usize]) {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut set = CpuSet::new();
    for &core in cores.iter().filter(|&&c| c < available) {
        let _ = set.set(core);
    }
    let _ = sched_setaffinity(Pid::from_raw(0), &set);
}

/// A free port below the kernel's ephemeral range (32768 and up here), so no outgoing
/// connection (the load client's own) can be handed it before the broker binds it.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id() % 10_000;
    (0..20_000u32)
        .map(|i| (12_000 + (seed + NEXT.fetch_add(1, Ordering::Relaxed) + i) % 20_000) as u16)
        .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// The broker binary, pinned to `core`, stopped with SIGTERM on drop.
struct Broker {
    endpoint: String,
    child: Child,
}

impl Broker {
    fn start(core: usize, workers: usize) -> Broker {
        let endpoint = format!("tcp://127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let child = Command::new("taskset")
            .args(["-c", &core.to_string(), env!("CARGO_BIN_EXE_broker")])
            .args(["--frontend", &endpoint, "--admin", &admin])
            .args(["--workers", &workers.to_string(), "--log-level", "warn"])
            .stdout(Stdio::null())
            .spawn()
            .expect("taskset + broker start (util-linux)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tools::probe::probe_zmq(&endpoint, Duration::from_millis(200), &Security::None)
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "broker at {endpoint} never answered"
            );
        }
        Broker { endpoint, child }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn regression(c: &mut Criterion) {
    let workers = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(2);
    for case in &CASES {
        let (driver_core, broker_core) = if case.same_core { (0, 0) } else { (0, 1) };
        let mut group = c.benchmark_group(case.name);
        group.throughput(Throughput::Elements(1));
        group.measurement_time(Duration::from_secs(4));
        group.warm_up_time(Duration::from_secs(1));
        group.sample_size(20);
        let broker = Broker::start(broker_core, workers);
        pin(&[driver_core]);
        let plan = |requests: u64| Plan {
            endpoints: vec![broker.endpoint.clone()],
            clients: case.clients,
            window: case.window,
            size: case.size,
            duration: Duration::from_secs(600),
            requests: Some(requests),
            rate: None,
            threads: 1,
            timeout: Duration::from_secs(5),
            // As `broker bench` runs by default: the broker strips it.
            deadline_header: true,
            verify: true,
            raw: false,
            first_frame: None,
            security: Security::None,
        };
        group.bench_function("broker", |b| {
            b.iter_custom(|iters| {
                let report = load::run(&plan(iters.max(1))).expect("load runs");
                assert_eq!(report.failure(), None, "every request answered OK");
                report.total
            })
        });
        pin(&[0, 1]);
        group.finish();
    }
}

criterion_group!(benches, regression);
criterion_main!(benches);
