//! The core broker, end to end: the real binary, real ZeroMQ clients over TCP on 127.0.0.1,
//! real signals.

mod common;

use std::time::{Duration, Instant};

use common::{err_code, ok, sync_read, Broker, Client, EVENT_TIMEOUT};
use nix::sys::signal::Signal;
use shared::protocol::Reply;
use shared::ErrorCode;

#[test]
fn echo_round_trip_for_req_and_dealer_clients() {
    let broker = Broker::start(&["--workers", "2"]);
    let body: [&[u8]; 3] = [b"one", b"", b"three"];
    // Behind a delimiter, a body may hold empty frames.
    for client in [
        Client::req(&broker.front),
        Client::dealer(&broker.front, true),
    ] {
        assert_eq!(
            ok(client.request(&body)),
            [b"one".to_vec(), vec![], b"three".to_vec()]
        );
        assert_eq!(ok(client.request(&[b"x"])), [b"x".to_vec()]);
    }
    // Without one, the envelope is the routing id alone and the body is everything.
    let bare = Client::dealer(&broker.front, false);
    assert_eq!(
        ok(bare.request(&[b"one", b"two"])),
        [b"one".to_vec(), b"two".to_vec()]
    );
    // ...so its first empty frame ends an envelope, which comes back in front of the reply
    // (docs/protocol.md: such a client cannot send empty body frames).
    bare.send(&body);
    assert_eq!(
        bare.recv(),
        [b"one".to_vec(), vec![], b"OK".to_vec(), b"three".to_vec()]
    );
}

#[test]
fn envelopes_come_back_through_proxies_and_correlate_every_reply() {
    let broker = Broker::start(&[
        "--workers",
        "1",
        "--handler",
        "sleep",
        "--max-inflight",
        "1",
        "--max-message-bytes",
        "1000",
    ]);
    let ctx = zmq::Context::new();
    // Two plain ROUTER->DEALER devices (zmq_proxy) in front of the broker, as at an edge.
    let hop = |upstream: String| {
        let front = ctx.socket(zmq::ROUTER).expect("router");
        let back = ctx.socket(zmq::DEALER).expect("dealer");
        let port = common::free_port();
        front
            .bind(&format!("tcp://127.0.0.1:{port}"))
            .expect("bind");
        back.connect(&upstream).expect("connect");
        std::thread::spawn(move || {
            let _ = zmq::proxy(&front, &back);
        });
        format!("tcp://127.0.0.1:{port}")
    };
    let one = hop(broker.front.clone());
    let two = hop(one.clone());
    for endpoint in [&one, &two] {
        let req = Client::req(endpoint);
        assert_eq!(
            ok(req.request(&[b"0", b"via"])),
            [b"0".to_vec(), b"via".to_vec()]
        );
    }
    // A DEALER with a correlation id gets it back on every kind of reply.
    let dealer = Client::dealer(&broker.front, false);
    let exchange = |id: &[u8], body: &[&[u8]]| {
        let mut frames: Vec<&[u8]> = vec![id, b""];
        frames.extend_from_slice(body);
        dealer.socket.send_multipart(&frames, 0).expect("send");
        let mut reply = dealer.recv();
        assert_eq!(&reply[..2], [id.to_vec(), vec![]], "the id comes back");
        shared::protocol::parse_reply(reply.split_off(2)).expect("well-formed")
    };
    assert_eq!(ok(exchange(b"req-1", &[b"0"])), [b"0".to_vec()]);
    assert_eq!(
        err_code(&exchange(b"req-2", &[b""])),
        Some(ErrorCode::BadRequest)
    );
    assert_eq!(
        err_code(&exchange(b"req-3", &[&[b'1'; 1001]])),
        Some(ErrorCode::TooLarge)
    );
    // One request held (max-inflight 1): the next is refused, and says which one it was.
    dealer
        .socket
        .send_multipart([&b"held"[..], b"", b"500"], 0)
        .expect("send");
    assert_eq!(
        err_code(&exchange(b"req-4", &[b"0"])),
        Some(ErrorCode::Overloaded)
    );
    let mut held = dealer.recv();
    assert_eq!(&held[..2], [b"held".to_vec(), vec![]]);
    assert!(matches!(
        shared::protocol::parse_reply(held.split_off(2)),
        Ok(Reply::Ok(_))
    ));
    assert_eq!(
        exchange(b"health", &[shared::protocol::HEALTH_REQUEST]),
        Reply::Ok(vec![b"serving".to_vec()])
    );
}

#[test]
fn sigterm_drains_in_flight_requests_and_refuses_new_ones() {
    let mut broker = Broker::start(&[
        "--workers",
        "2",
        "--handler",
        "sleep",
        "--drain-timeout",
        "5s",
    ]);
    // Four 300 ms requests on two workers: two running, two queued when SIGTERM arrives.
    let inflight: Vec<Client> = (0..4)
        .map(|_| Client::dealer(&broker.front, true))
        .collect();
    for client in &inflight {
        client.send(&[b"300"]);
        sync_read(client);
    }
    let chatty = Client::dealer(&broker.front, false);
    let started = Instant::now();
    broker.signal(Signal::SIGTERM);

    // A client that keeps sending until it is told the broker is draining.
    let (mut sent, mut oks, mut draining) = (0, 0, false);
    while !draining && sent < 10_000 {
        sent += 1;
        match chatty.request(&[b"0"]) {
            Reply::Ok(_) => oks += 1,
            Reply::Err {
                code: ErrorCode::Draining,
                ..
            } => draining = true,
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert!(draining, "no ERR draining after {sent} requests");
    assert_eq!(oks + 1, sent, "every chatty request got exactly one reply");

    for client in &inflight {
        assert_eq!(ok(client.recv_reply()), [b"300".to_vec()]);
    }
    let status = broker.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exit within the drain timeout"
    );
    // Exactly one reply each: nothing further arrives.
    for client in inflight.iter().chain([&chatty]) {
        assert_eq!(client.try_recv(Duration::from_millis(50)), None);
    }
    common::assert_all_answered(&broker);
    let log = broker.log_text();
    for transition in [
        "serving -> stopping",
        "stopping -> draining",
        "draining -> stopped",
    ] {
        assert!(
            log.contains(transition),
            "missing {transition:?} in log:\n{log}"
        );
    }
}

#[test]
fn requests_during_the_shutdown_delay_are_served() {
    let mut broker = Broker::start(&["--workers", "1", "--shutdown-delay", "1s"]);
    let client = Client::dealer(&broker.front, true);
    broker.signal(Signal::SIGTERM);
    broker.wait_for_log("SIGTERM received", EVENT_TIMEOUT);
    let delay_started = Instant::now();
    let mut served = 0;
    // Requests inside the delay are served normally (not ERR draining).
    while delay_started.elapsed() < Duration::from_millis(700) {
        assert_eq!(
            ok(client.request(&[b"during-delay"])),
            [b"during-delay".to_vec()]
        );
        served += 1;
    }
    assert!(served > 0, "no request served during the delay");
    // With nothing in flight, the drain ends as soon as the delay does, not before.
    assert!(broker.wait_exit(EVENT_TIMEOUT).success());
    assert!(
        delay_started.elapsed() >= Duration::from_millis(900),
        "exited inside the delay"
    );
}

#[test]
fn drain_deadline_times_out_running_requests() {
    let mut broker = Broker::start(&[
        "--workers",
        "1",
        "--handler",
        "sleep",
        "--max-sleep",
        "60s",
        "--drain-timeout",
        "1s",
    ]);
    let client = Client::dealer(&broker.front, true);
    client.send(&[b"30000"]);
    sync_read(&client);
    let started = Instant::now();
    broker.signal(Signal::SIGTERM);
    let reply = client.recv_reply();
    assert_eq!(err_code(&reply), Some(ErrorCode::Timeout), "{reply:?}");
    let status = broker.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    broker.wait_for_log("1 workers left behind", EVENT_TIMEOUT);
    common::assert_all_answered(&broker);
}

#[test]
fn second_signal_exits_at_once() {
    let mut broker = Broker::start(&[
        "--workers",
        "1",
        "--handler",
        "sleep",
        "--max-sleep",
        "60s",
        "--drain-timeout",
        "60s",
    ]);
    let client = Client::dealer(&broker.front, true);
    client.send(&[b"30000"]);
    sync_read(&client);
    broker.signal(Signal::SIGTERM);
    broker.wait_for_log("state stopping -> draining", EVENT_TIMEOUT);
    let second = Instant::now();
    broker.signal(Signal::SIGINT);
    let status = broker.wait_exit(Duration::from_secs(5));
    assert!(
        second.elapsed() < Duration::from_secs(2),
        "hard stop took {:?}",
        second.elapsed()
    );
    assert_eq!(status.code(), Some(128 + Signal::SIGINT as i32));
}

#[test]
fn a_slow_request_does_not_hold_up_quick_ones() {
    let broker = Broker::start(&["--workers", "4", "--handler", "sleep"]);
    let slow = Client::dealer(&broker.front, true);
    slow.send(&[b"2000"]);
    sync_read(&slow);
    let clients: Vec<Client> = (0..8)
        .map(|_| Client::dealer(&broker.front, true))
        .collect();
    for round in 0..25 {
        for client in &clients {
            client.send(&[format!("{}", round % 2).as_bytes()]);
        }
        for client in &clients {
            assert!(matches!(client.recv_reply(), Reply::Ok(_)));
        }
    }
    // All 200 quick replies are in, and the slow one is still running.
    assert_eq!(
        slow.try_recv(Duration::ZERO),
        None,
        "slow request finished first"
    );
    assert!(matches!(slow.recv_reply(), Reply::Ok(_)));
}

#[test]
fn overload_is_refused_at_once() {
    let broker = Broker::start(&[
        "--workers",
        "1",
        "--handler",
        "sleep",
        "--max-inflight",
        "2",
    ]);
    let held: Vec<Client> = (0..2)
        .map(|_| Client::dealer(&broker.front, true))
        .collect();
    for client in &held {
        client.send(&[b"1000"]);
        sync_read(client);
    }
    let extra = Client::req(&broker.front);
    let reply = extra.request(&[b"0"]);
    assert_eq!(err_code(&reply), Some(ErrorCode::Overloaded), "{reply:?}");
    for client in &held {
        assert!(matches!(client.recv_reply(), Reply::Ok(_)));
    }
    // Capacity is back once they finish.
    assert!(matches!(extra.request(&[b"0"]), Reply::Ok(_)));
}

#[test]
fn a_client_that_never_reads_does_not_slow_others() {
    // Room for the whole flood, so what is measured is the slow reader, not overload.
    let broker = Broker::start(&["--workers", "2", "--max-inflight", "10000"]);
    let ctx = zmq::Context::new();
    let deaf = common::deaf_client(&ctx, &broker.front);
    let payload = vec![7u8; 16 * 1024];
    // Far more reply bytes than the broker's send queue and the kernel buffers can hold.
    for _ in 0..4000 {
        deaf.send(&payload[..], 0).expect("send");
    }
    let other = Client::dealer(&broker.front, true);
    for i in 0..200u32 {
        let body = i.to_string();
        assert_eq!(ok(other.request(&[body.as_bytes()])), [body.into_bytes()]);
    }
}

#[test]
fn bad_bodies_get_error_replies() {
    let broker = Broker::start(&["--workers", "1", "--max-message-bytes", "1000"]);
    let client = Client::dealer(&broker.front, true);
    assert_eq!(
        err_code(&client.request(&[b""])),
        Some(ErrorCode::BadRequest)
    );
    let big = vec![1u8; 1001];
    assert_eq!(
        err_code(&client.request(&[&big])),
        Some(ErrorCode::TooLarge)
    );
    // Split over frames, the total counts.
    assert_eq!(
        err_code(&client.request(&[&big[..600], &big[600..]])),
        Some(ErrorCode::TooLarge)
    );
    let sleeper = Broker::start(&["--workers", "1", "--handler", "sleep"]);
    let client2 = Client::req(&sleeper.front);
    let reply = client2.request(&[b"soon"]);
    match reply {
        Reply::Err {
            code: ErrorCode::BadRequest,
            message,
        } => assert!(message.contains("milliseconds")),
        other => panic!("expected bad_request, got {other:?}"),
    }
    // The limits did not cost the connection anything.
    assert_eq!(ok(client.request(&[b"fine"])), [b"fine".to_vec()]);
}

#[test]
fn absurd_frames_and_garbage_do_not_disturb_other_clients() {
    use std::io::Write;
    let broker = Broker::start(&["--workers", "1", "--max-message-bytes", "1000"]);
    let good = Client::dealer(&broker.front, true);
    assert_eq!(ok(good.request(&[b"before"])), [b"before".to_vec()]);

    // A frame beyond the socket limit: libzmq drops that connection, no reply.
    let absurd = Client::dealer(&broker.front, true);
    absurd.send(&[&vec![0u8; 100_000]]);
    assert_eq!(absurd.try_recv(Duration::from_millis(300)), None);

    // Bytes that are not ZMTP at all.
    let port = broker.front.rsplit(':').next().expect("port");
    let mut raw = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n\xff\x00garbage")
        .expect("write garbage");
    let mut raw2 = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    raw2.write_all(&[0xff; 10_000]).ok();
    // Truncated ZMTP handshakes: half a greeting left hanging, and a whole greeting followed
    // by a cut-off READY command.
    let mut half = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    half.write_all(&[0xff, 0, 0, 0, 0, 0, 0, 0, 1])
        .expect("partial signature");
    let mut greeting = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f, 3, 0];
    greeting.extend_from_slice(b"NULL");
    greeting.resize(64, 0);
    let mut cut = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    cut.write_all(&greeting).expect("greeting");
    cut.write_all(&[0x04, 0x29, 0x05, b'R', b'E'])
        .expect("truncated READY");
    drop(cut);

    assert_eq!(ok(good.request(&[b"after"])), [b"after".to_vec()]);
    let fresh = Client::req(&broker.front);
    assert_eq!(ok(fresh.request(&[b"new"])), [b"new".to_vec()]);
}

fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut broker = Broker::spawn(args, env);
    let status = broker.wait_exit(EVENT_TIMEOUT);
    // Let the stderr reader finish.
    common::eventually("stderr collected", EVENT_TIMEOUT, || {
        !broker.stderr_text().is_empty() || !broker.log_text().is_empty()
    });
    (
        status.code(),
        format!("{}{}", broker.stderr_text(), broker.log_text()),
    )
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    for (args, env, needle) in [
        (&["--workers", "many"][..], &[][..], "--workers"),
        (&["--log-format", "xml"][..], &[][..], "--log-format"),
        (&["--drain-timeout", "soon"][..], &[][..], "--drain-timeout"),
        (&["--drain-timeout", "0s"][..], &[][..], "--drain-timeout"),
        (&["--frontend", "nonsense"][..], &[][..], "--frontend"),
        (&["--no-such-flag"][..], &[][..], "--no-such-flag"),
        (&[][..], &[("BROKER_WORKERS", "0")][..], "--workers"),
    ] {
        let (code, output) = run_to_exit(args, env);
        assert_eq!(code, Some(2), "{args:?}: {output}");
        assert_eq!(
            output.trim().lines().count(),
            1,
            "{args:?}: one line, got {output:?}"
        );
        assert!(
            output.contains(needle),
            "{args:?}: {output:?} names {needle}"
        );
    }
}

#[test]
fn port_in_use_is_fatal_with_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("tcp://{}", taken.local_addr().expect("addr"));
    let (code, output) = run_to_exit(&["--frontend", &endpoint], &[]);
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("cannot bind") && output.contains("ERROR"),
        "{output}"
    );
}

#[test]
fn json_logs_carry_time_level_target_and_message() {
    let mut broker = Broker::spawn(&["--log-format", "json", "--loglevel", "info"], &[]);
    let line = broker.wait_for_log("starting -> serving", EVENT_TIMEOUT);
    let value: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    for key in ["time", "level", "target", "message"] {
        assert!(value.get(key).is_some(), "{key} missing from {line}");
    }
    assert_eq!(value["level"], "INFO");
    broker.signal(Signal::SIGTERM);
    assert!(broker.wait_exit(EVENT_TIMEOUT).success());
}
