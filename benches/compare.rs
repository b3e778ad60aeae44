//! The broker next to the limits libzmq sets, in one criterion run per case:
//! - `broker`: the real binary, echo handler, metrics on;
//! - `broker-no-metrics`: the same with per-request metric updates off (throughput case);
//! - `zmq-proxy`: `zmq::proxy` ROUTER -> inproc DEALER -> the same number of echo threads;
//! - `router-echo`: one ROUTER socket echoing on one thread.
//!
//! Throughput cases pin the client to core 0 and the server to core 1; the latency case pins
//! both to core 0 (on 2 cores, unpinned numbers are noise). `BENCH_WORKERS` sets the pool size
//! (default 2). Run: `cargo bench --bench compare`; report: target/criterion/report/index.html.

#[path = "common.rs"]
mod common;

use std::time::Duration;

use common::{broker, pin, router_echo, unpin, zmq_proxy, Driver, Server};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

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

/// A named way to start a system under test.
type System = (&'static str, Box<dyn Fn() -> Server>);

fn workers() -> usize {
    std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(2)
}

fn compare(c: &mut Criterion) {
    let workers = workers();
    for case in &CASES {
        let (client_core, server_core) = if case.same_core { (0, 0) } else { (0, 1) };
        let mut group = c.benchmark_group(case.name);
        group.throughput(Throughput::Elements(1));
        group.measurement_time(Duration::from_secs(4));
        group.warm_up_time(Duration::from_secs(1));
        group.sample_size(20);
        let mut systems: Vec<System> = vec![
            (
                "broker",
                Box::new(move || broker(server_core, workers, &[])),
            ),
            (
                "zmq-proxy",
                Box::new(move || zmq_proxy(server_core, workers)),
            ),
            ("router-echo", Box::new(move || router_echo(server_core))),
        ];
        if case.name.starts_with("throughput") {
            systems.insert(
                1,
                (
                    "broker-no-metrics",
                    Box::new(move || broker(server_core, workers, &["--no-metrics"])),
                ),
            );
        }
        for (name, start) in systems {
            let server = start();
            pin(client_core);
            let driver = Driver::connect(&server.endpoint, case.clients, case.window, case.size);
            group.bench_function(name, |b| b.iter_custom(|iters| driver.run(iters)));
            drop(driver);
            unpin();
        }
        group.finish();
    }
}

criterion_group!(benches, compare);
criterion_main!(benches);
