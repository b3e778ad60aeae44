//! Micro-benches of the per-request code on the coordinator's path: envelope parsing and
//! checks, wire-size accounting, the in-flight table, and the metric updates one request costs.

use std::hint::black_box;
use std::time::Duration;

use broker::coordinator::slab::Slab;
use criterion::{criterion_group, criterion_main, Criterion};
use shared::protocol::{inspect, wire_size};
use shared::{ErrorCode, Metrics};
use zmq::Message;

fn parsing(c: &mut Criterion) {
    let frames = vec![
        Message::from(&b"\x00\x6b\x8b\x45\x67"[..]),
        Message::new(),
        Message::from(&[0x5Au8; 64][..]),
    ];
    c.bench_function("inspect_a_request", |b| {
        b.iter(|| black_box(inspect(black_box(&frames), 1 << 20)))
    });
    c.bench_function("wire_size_of_a_request", |b| {
        b.iter(|| {
            black_box(&frames)
                .iter()
                .map(|f| wire_size(f.len()))
                .sum::<usize>()
        })
    });
    c.bench_function("inflight_insert_remove", |b| {
        let mut slab = Slab::new(4096);
        b.iter(|| {
            let ticket = slab
                .insert(black_box(7u64))
                .unwrap_or_else(|_| unreachable!());
            black_box(slab.remove(ticket))
        })
    });
}

fn metrics(c: &mut Criterion) {
    let on = Metrics::new("bench").expect("metrics");
    let mut off = Metrics::new("bench").expect("metrics");
    off.set_enabled(false);
    for (name, metrics) in [
        ("metrics_per_request_on", &on),
        ("metrics_per_request_off", &off),
    ] {
        let mut m = metrics.recorder();
        c.bench_function(name, |b| {
            b.iter(|| {
                // Everything one OK request records, coordinator and worker side.
                m.request_read(black_box(64));
                m.picked_up(black_box(Duration::from_micros(12)));
                m.worker_started();
                m.worker_finished(black_box(Duration::from_micros(3)));
                m.replied(black_box(None), Some(black_box(Duration::from_micros(40))));
                m.reply_sent(black_box(66));
            })
        });
    }
    let mut m = on.recorder();
    c.bench_function("metrics_error_reply", |b| {
        b.iter(|| m.replied(black_box(Some(ErrorCode::Overloaded)), None))
    });
    c.bench_function("metrics_flush", |b| {
        b.iter(|| {
            m.replied(None, Some(Duration::from_micros(40)));
            m.flush()
        })
    });
}

criterion_group!(benches, parsing, metrics);
criterion_main!(benches);
