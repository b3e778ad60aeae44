//! Overload without collapse (issue 20), on the real binary: a request that waited past the
//! queue target in a standing queue is never started; an expired deadline is never started and
//! gets `ERR deadline_exceeded`; a malformed deadline header gets `ERR bad_request`; the
//! header is stripped and the handler sees the time left; shedding stops as soon as the queue
//! drains; pipelined fast load is never refused; refusals are counted by reason and as demand.
//! Throughput and goodput under overload are benchmarks (`scripts/perf.sh overload`), not
//! asserted here.

mod common;

use std::time::Duration;

use common::pipeline::pipeline;
use common::{err_code, eventually, metric, ok, Broker, Client, EVENT_TIMEOUT};
use shared::protocol::{timeout_header, Reply};
use shared::ErrorCode;

fn refused(broker: &Broker, reason: &str) -> f64 {
    metric(
        broker,
        &format!("broker_requests_refused_total{{reason=\"{reason}\"}}"),
    )
}

fn with_budget(client: &Client, millis: u64, body: &[&[u8]]) {
    let header = timeout_header(Duration::from_millis(millis));
    let mut frames: Vec<&[u8]> = vec![&header];
    frames.extend_from_slice(body);
    client.send(&frames);
}

/// The handler's cost jumps from 10 ms to 200 ms: the door, predicting with the old cost,
/// lets in a queue that in fact holds a second of work. Once it has stood longer than its
/// interval, the requests that waited past the target are answered `ERR overloaded` without
/// running; what the door could tell was too much is refused at once.
#[test]
fn a_request_that_waited_past_the_target_in_a_standing_queue_is_never_started() {
    let broker = Broker::start(&[
        "--workers",
        "1",
        "--handler",
        "sleep",
        "--queue-target",
        "20ms",
        "--queue-interval",
        "50ms",
    ]);
    let client = Client::dealer(&broker.front, true);
    // The broker learns a service time of 10 ms.
    for _ in 0..5 {
        assert!(matches!(client.request(&[b"10"]), Reply::Ok(_)));
    }
    let busy_before = metric(&broker, "broker_worker_busy_seconds_total");
    for _ in 0..10 {
        client.send(&[b"200"]);
    }
    let outcomes: Vec<Option<ErrorCode>> =
        (0..10).map(|_| err_code(&client.recv_reply())).collect();
    let served = outcomes.iter().filter(|o| o.is_none()).count();
    eventually("refusals published", EVENT_TIMEOUT, || {
        refused(&broker, "queue_time") + refused(&broker, "predicted_wait") == (10 - served) as f64
    });
    let (shed, at_door) = (
        refused(&broker, "queue_time"),
        refused(&broker, "predicted_wait"),
    );
    eprintln!(
        "10 x 200 ms after 10 ms ones: {served} served, {shed} shed by a worker, {at_door} \
         refused at the door: {outcomes:?}"
    );
    assert!(served >= 1, "the queue's head is served: {outcomes:?}");
    assert!(shed >= 1.0, "the stale part is shed: {outcomes:?}");
    assert!(
        at_door >= 1.0,
        "the excess is refused at once: {outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .all(|o| o.is_none() || *o == Some(ErrorCode::Overloaded)),
        "{outcomes:?}"
    );
    // Never started: the pool was busy for the served requests only.
    let busy = metric(&broker, "broker_worker_busy_seconds_total") - busy_before;
    assert!(
        busy < 0.2 * (served as f64 + 0.5),
        "{busy} s busy for {served} requests of 0.2 s"
    );
    // Every request that waited for a worker is in the queue-wait histogram, the shed ones
    // included (those refused at the door never waited).
    let waited = metric(&broker, "broker_queue_wait_seconds_count");
    assert_eq!(waited, 5.0 + served as f64 + shed);
    // Shedding stops as soon as the queue drains: the next request is served.
    assert!(matches!(client.request(&[b"1"]), Reply::Ok(_)));
}

#[test]
fn an_expired_deadline_is_never_started_and_gets_deadline_exceeded() {
    let broker = Broker::start(&["--workers", "1", "--handler", "sleep"]);
    let client = Client::dealer(&broker.front, true);
    // A budget already spent is refused at the door.
    with_budget(&client, 0, &[b"1"]);
    assert_eq!(
        err_code(&client.recv_reply()),
        Some(ErrorCode::DeadlineExceeded)
    );
    // One that runs out while it waits for the only worker is not started.
    let holder = Client::dealer(&broker.front, true);
    holder.send(&[b"300"]);
    eventually("the worker is busy", EVENT_TIMEOUT, || {
        metric(&broker, "broker_workers_busy") == 1.0
    });
    with_budget(&client, 50, &[b"1"]);
    assert_eq!(
        err_code(&client.recv_reply()),
        Some(ErrorCode::DeadlineExceeded)
    );
    assert!(matches!(holder.recv_reply(), Reply::Ok(_)));
    eventually("refusals published", EVENT_TIMEOUT, || {
        refused(&broker, "deadline_exceeded") == 2.0
    });
    assert_eq!(
        metric(
            &broker,
            "broker_requests_total{outcome=\"deadline_exceeded\"}"
        ),
        2.0
    );
    // Neither ran: the worker ran the holder alone.
    assert!(metric(&broker, "broker_worker_busy_seconds_total") < 0.3 + 0.15);
}

#[test]
fn the_header_is_stripped_checked_and_its_budget_reaches_the_handler() {
    let broker = Broker::start(&["--workers", "2", "--handler", "sleep"]);
    let client = Client::dealer(&broker.front, true);
    // The handler sees the body alone: the echo has no header.
    with_budget(&client, 5000, &[b"1", b"payload"]);
    assert_eq!(
        ok(client.recv_reply()),
        [b"1".to_vec(), b"payload".to_vec()]
    );
    // The sleep handler sees the time left and stops at the deadline.
    with_budget(&client, 200, &[b"5000"]);
    match client.recv_reply() {
        Reply::Err {
            code: ErrorCode::DeadlineExceeded,
            message,
        } => assert!(message.contains("5000 ms sleep"), "{message}"),
        other => panic!("expected the handler's ERR deadline_exceeded, got {other:?}"),
    }
    // Malformed headers, and a header with no body, are bad requests.
    for bad in [
        &b"\x00broker.timeout-ms="[..],
        b"\x00broker.timeout-ms=soon",
        b"\x00broker.timeout-ms= 5",
        b"\x00broker.timeout-ms=99999999999999999999",
    ] {
        client.send(&[bad, b"1"]);
        assert_eq!(
            err_code(&client.recv_reply()),
            Some(ErrorCode::BadRequest),
            "{bad:?}"
        );
    }
    let header = timeout_header(Duration::from_secs(1));
    client.send(&[&header]);
    assert_eq!(err_code(&client.recv_reply()), Some(ErrorCode::BadRequest));
    // A REQ client and a health request with a header work too.
    let req = Client::req(&broker.front);
    with_budget(&req, 1000, &[shared::protocol::HEALTH_REQUEST]);
    assert_eq!(ok(req.recv_reply()), [b"serving".to_vec()]);
    // Only the runs out at the door or at a worker are refusals; the handler's own ERR is not.
    assert_eq!(refused(&broker, "deadline_exceeded"), 0.0);
}

/// The 16 x 16 pipelined echo load of the benchmarks, at the defaults: never refused.
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "needs --release: a quarter-million-request run"
)]
fn pipelined_fast_load_is_never_refused() {
    let broker = Broker::start(&["--workers", "2"]);
    let body = [0x5Au8; 64];
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let front = broker.front.clone();
            std::thread::spawn(move || pipeline(&front, 16, 16_000, &[&body]))
        })
        .collect();
    for handle in handles {
        let outcome = handle.join().expect("client thread");
        assert_eq!(outcome.lost, 0, "{outcome:?}");
        assert!(outcome.errors.is_empty(), "refused: {outcome:?}");
        assert_eq!(outcome.ok, 16_000);
    }
    let refusals: f64 = [
        "predicted_wait",
        "queue_time",
        "max_inflight",
        "max_connection_bytes",
    ]
    .iter()
    .map(|r| refused(&broker, r))
    .sum();
    assert_eq!(refusals, 0.0);
}

/// Refusals for load count as demand on the pool: the signal sees the requests turned away.
#[test]
fn refused_requests_count_as_demand() {
    let broker = Broker::start(&[
        "--workers",
        "1",
        "--handler",
        "sleep",
        "--max-inflight",
        "2",
    ]);
    let client = Client::dealer(&broker.front, true);
    assert!(matches!(client.request(&[b"50"]), Reply::Ok(_)));
    let before = metric(&broker, "broker_demand_seconds_total");
    for _ in 0..12 {
        client.send(&[b"50"]);
    }
    let refused_now = (0..12)
        .map(|_| client.recv_reply())
        .filter(|r| err_code(r) == Some(ErrorCode::Overloaded))
        .count();
    assert_eq!(refused_now, 10, "two held, ten over --max-inflight");
    let after = metric(&broker, "broker_demand_seconds_total");
    // Two served (0.1 s) and ten refused at about 50 ms each (0.5 s).
    eprintln!("demand {before:.3} -> {after:.3} s");
    assert!(after - before > 0.5, "{before} -> {after}");
    assert_eq!(refused(&broker, "max_inflight"), 10.0);
}

/// A request no pool could have served in time is not demand: a spent budget, or one shorter
/// than the handler takes. A thousand of them leave the signal where it was, so a client with
/// a broken clock cannot ask the autoscaler for pods.
#[test]
fn requests_no_pool_could_serve_are_not_demand() {
    let broker = Broker::start(&["--workers", "1", "--handler", "sleep"]);
    let client = Client::dealer(&broker.front, true);
    for _ in 0..3 {
        assert!(matches!(client.request(&[b"50"]), Reply::Ok(_)));
    }
    let before = metric(&broker, "broker_demand_seconds_total");
    for budget in [0, 10] {
        for _ in 0..500 {
            with_budget(&client, budget, &[b"50"]);
        }
        for _ in 0..500 {
            let reply = client.recv_reply();
            assert_eq!(
                err_code(&reply),
                Some(ErrorCode::DeadlineExceeded),
                "{reply:?}"
            );
        }
    }
    let after = metric(&broker, "broker_demand_seconds_total");
    eprintln!("demand {before:.3} -> {after:.3} s");
    assert_eq!(refused(&broker, "deadline_exceeded"), 1000.0);
    assert!(after - before < 0.001, "{before} -> {after}");
}

/// A client that retries the moment it is refused is answered in microseconds, far faster than
/// the pool could serve it: what its refusals count as demand is capped at
/// `REFUSED_PER_WORKER` (10) seconds per second per worker, with a second of that as a burst.
#[test]
fn a_retry_storm_counts_no_more_demand_than_the_cap() {
    let broker = Broker::start(&[
        "--workers",
        "1",
        "--handler",
        "sleep",
        "--max-inflight",
        "1",
    ]);
    let holder = Client::dealer(&broker.front, true);
    // The mean service time becomes a second, so each refusal would count a second.
    assert!(matches!(holder.request(&[b"1000"]), Reply::Ok(_)));
    let before = metric(&broker, "broker_demand_seconds_total");
    let started = std::time::Instant::now();
    holder.send(&[b"1000"]);
    let storm = Client::dealer(&broker.front, true);
    let mut refused_now = 0;
    for _ in 0..20 {
        for _ in 0..100 {
            storm.send(&[b"1000"]);
        }
        refused_now += (0..100)
            .map(|_| storm.recv_reply())
            .filter(|r| err_code(r) == Some(ErrorCode::Overloaded))
            .count();
    }
    assert!(matches!(holder.recv_reply(), Reply::Ok(_)));
    let after = metric(&broker, "broker_demand_seconds_total");
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("{refused_now} refused in {elapsed:.3} s: demand {before:.3} -> {after:.3} s");
    assert!(refused_now >= 1900, "the storm was refused: {refused_now}");
    // One second in the handler, at most 10 s of burst and 10 s per second since.
    let cap = 1.0 + 10.0 + 10.0 * elapsed;
    assert!(
        after - before <= cap + 0.01,
        "{before} -> {after}, cap {cap:.3}"
    );
    // And the cap is what counted, not nothing: the storm did ask for more than the pool had.
    assert!(after - before > 5.0, "{before} -> {after}");
}

/// An idle queue has drained, however long it sat idle: the first burst after a quiet spell
/// longer than the interval is served, not taken for a queue that stood all along.
#[test]
fn a_burst_after_a_quiet_spell_is_served() {
    let broker = Broker::start(&[
        "--workers",
        "1",
        "--handler",
        "sleep",
        "--queue-target",
        "20ms",
        "--queue-interval",
        "100ms",
    ]);
    let client = Client::dealer(&broker.front, true);
    for _ in 0..5 {
        assert!(matches!(client.request(&[b"10"]), Reply::Ok(_)));
    }
    // The quiet spell is the input here, not a wait for an event: three intervals idle.
    std::thread::sleep(Duration::from_millis(300));
    // Six of 10 ms: the last waits about 50 ms, inside the interval, so the queue drains
    // before it would stand.
    for _ in 0..6 {
        client.send(&[b"10"]);
    }
    let outcomes: Vec<Option<ErrorCode>> = (0..6).map(|_| err_code(&client.recv_reply())).collect();
    assert!(outcomes.iter().all(Option::is_none), "{outcomes:?}");
    assert_eq!(refused(&broker, "predicted_wait"), 0.0);
    assert_eq!(refused(&broker, "queue_time"), 0.0);
}

/// A reply that would come after the client's budget is refused at the door: the budget must
/// cover the predicted wait and a service time, not the wait alone.
#[test]
fn a_budget_shorter_than_the_service_time_is_refused_at_once() {
    let broker = Broker::start(&["--workers", "1", "--handler", "sleep"]);
    let client = Client::dealer(&broker.front, true);
    for _ in 0..3 {
        assert!(matches!(client.request(&[b"100"]), Reply::Ok(_)));
    }
    // An idle pool, a 100 ms handler and a 50 ms budget: the reply would be 50 ms late.
    let busy_before = metric(&broker, "broker_worker_busy_seconds_total");
    with_budget(&client, 50, &[b"100"]);
    assert_eq!(
        err_code(&client.recv_reply()),
        Some(ErrorCode::DeadlineExceeded)
    );
    assert_eq!(refused(&broker, "deadline_exceeded"), 1.0);
    // A budget that covers it is served.
    with_budget(&client, 1000, &[b"100"]);
    assert!(matches!(client.recv_reply(), Reply::Ok(_)));
    // The refused one never ran.
    let busy = metric(&broker, "broker_worker_busy_seconds_total") - busy_before;
    assert!(busy < 0.15, "{busy} s busy for one request of 0.1 s");
}
