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
    // Taken before the signal is sent: the broker cannot have seen it earlier.
    let signalled = Instant::now();
    broker.signal(Signal::SIGTERM);
    broker.wait_for_log("SIGTERM received", EVENT_TIMEOUT);
    let mut served = 0;
    // Requests inside the delay are served normally (not ERR draining), until the broker
    // says it is draining.
    loop {
        match client.request(&[b"during-delay"]) {
            Reply::Ok(frames) => {
                assert_eq!(frames, [b"during-delay".to_vec()]);
                served += 1;
            }
            Reply::Err {
                code: ErrorCode::Draining,
                ..
            } => break,
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert!(served > 0, "no request served during the delay");
    assert!(
        signalled.elapsed() >= Duration::from_secs(1),
        "drained inside the delay"
    );
    assert!(broker.wait_exit(EVENT_TIMEOUT).success());
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

/// Frames past the 256 the broker keeps are read and dropped, and their bytes still count as
/// read: the connection is not left looking as if it held them (which would reset it as stalled
/// once idle for the stall timeout).
#[test]
fn a_message_of_too_many_frames_is_refused_and_its_connection_stays_clean() {
    let broker = Broker::start(&["--workers", "1", "--stall-timeout", "1s"]);
    let client = Client::dealer(&broker.front, true);
    let frame = vec![7u8; 1024];
    let frames: Vec<&[u8]> = (0..400).map(|_| &frame[..]).collect();
    // 144 frames (about 148 KiB) past the cap: more than the 64 KiB a stall needs.
    assert_eq!(
        err_code(&client.request(&frames)),
        Some(ErrorCode::TooLarge)
    );
    // A stalled connection is reset within the timeout plus one 100 ms scan; wait three times
    // that (a negative needs the whole wait).
    never_reset_as_stalled(
        &broker,
        Duration::from_secs(3),
        "an idle, clean connection was reset as stalled",
    );
    assert_eq!(
        ok(client.request(&[b"still here"])),
        [b"still here".to_vec()]
    );
}

/// ZMTP heartbeats are read by libzmq, never by the broker: without the heartbeat credit they
/// would pile up as bytes the connection seems to hold, and an idle client with heartbeats on
/// would be reset as stalled. At 1 ms, 4 s of PINGs are 36 KB, far over the 4 KiB floor.
/// Scrapes every 100 ms for `wait` and fails with `why` if any connection is reset as
/// stalled (a negative needs the whole wait).
fn never_reset_as_stalled(broker: &Broker, wait: Duration, why: &str) {
    let idle = Instant::now();
    while idle.elapsed() < wait {
        assert_eq!(
            common::metric(broker, "broker_connections_reset_total{reason=\"stalled\"}"),
            0.0,
            "{why}"
        );
        std::thread::sleep(Duration::from_millis(100)); // between scrapes
    }
}

#[test]
fn a_client_with_heartbeats_on_is_not_taken_for_a_stalled_one() {
    let broker = Broker::start(&["--workers", "1", "--stall-timeout", "1s"]);
    let ctx = zmq::Context::new();
    let socket = ctx.socket(zmq::DEALER).expect("dealer");
    socket.set_heartbeat_ivl(1).expect("heartbeat interval");
    socket.set_linger(0).expect("linger");
    socket.connect(&broker.front).expect("connect");
    let ask = |body: &[u8]| {
        socket.send_multipart([&b""[..], body], 0).expect("send");
        assert!(
            socket.poll(zmq::POLLIN, 10_000).expect("poll") > 0,
            "no reply"
        );
        socket.recv_multipart(0).expect("reply")
    };
    assert_eq!(ask(b"first"), [&b""[..], b"OK", b"first"]);
    never_reset_as_stalled(
        &broker,
        Duration::from_secs(4),
        "an idle client with heartbeats was reset as stalled",
    );
    assert!(
        common::metric(&broker, "broker_buffered_bytes{direction=\"in\"}") < 4096.0,
        "heartbeats counted as held"
    );
    assert_eq!(ask(b"second"), [&b""[..], b"OK", b"second"]);
}

#[test]
fn absurd_frames_and_garbage_do_not_disturb_other_clients() {
    use std::io::Write;
    let broker = Broker::start(&[
        "--workers",
        "1",
        "--max-message-bytes",
        "1000",
        "--stall-timeout",
        "1s",
    ]);
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

    // The half greeting is closed when the handshake timer (--stall-timeout) fires, and the
    // failed handshakes are counted.
    half.set_read_timeout(Some(EVENT_TIMEOUT))
        .expect("read timeout");
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut half, &mut rest).expect("closed by the broker");
    common::eventually("failed handshakes counted", EVENT_TIMEOUT, || {
        common::metric(
            &broker,
            "broker_connections_refused_total{reason=\"handshake\"}",
        ) >= 2.0
    });
    assert_eq!(ok(good.request(&[b"last"])), [b"last".to_vec()]);
}

/// Runs the broker to its exit: (exit code, stderr and log together, the log alone).
fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut broker = Broker::spawn(args, env);
    // Returns once the output is read to the end.
    let status = broker.wait_exit(EVENT_TIMEOUT);
    (
        status.code(),
        format!("{}{}", broker.stderr_text(), broker.log_text()),
        broker.log_text(),
    )
}

#[test]
fn every_refused_setting_exits_2_with_one_line_before_anything_starts() {
    /// Flags, environment, and the flag the one-line error must name.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&["--workers", "many"], &[], "--workers"),
        (&["--log-format", "xml"], &[], "--log-format"),
        (&["--log-level", "loud"], &[], "--log-level"),
        (&["--drain-timeout", "soon"], &[], "--drain-timeout"),
        (&["--drain-timeout", "0s"], &[], "--drain-timeout"),
        (&["--no-such-flag"], &[], "--no-such-flag"),
        (&[], &[("BROKER_WORKERS", "0")], "--workers"),
        // Timers that would overflow a clock (these used to panic on SIGTERM).
        (
            &["--drain-timeout", "300000000000y"],
            &[],
            "--drain-timeout",
        ),
        (
            &["--shutdown-delay", "300000000000y"],
            &[],
            "--shutdown-delay",
        ),
        (
            &["--drain-timeout", "18446744073709551615s"],
            &[],
            "--drain-timeout",
        ),
        (&["--stall-timeout", "2h"], &[], "--stall-timeout"),
        (&["--stuck-after", "25h"], &[], "--stuck-after"),
        (
            &["--max-connection-age", "25h"],
            &[],
            "--max-connection-age",
        ),
        (
            &["--max-connection-age-grace", "2h"],
            &[],
            "--max-connection-age-grace",
        ),
        // Counts beyond what memory, libzmq or the kernel allow (these used to abort).
        (
            &["--max-inflight", "18446744073709551615"],
            &[],
            "--max-inflight",
        ),
        (&["--max-inflight", "100000000000"], &[], "--max-inflight"),
        (&["--workers", "288230376151711744"], &[], "--workers"),
        (&["--workers", "1100"], &[], "--workers"),
        (&["--max-connections", "0"], &[], "--max-connections"),
        // Endpoints that bind somewhere else, or nowhere a client can reach.
        (&["--frontend", "nonsense"], &[], "--frontend"),
        (&["--frontend", "tcp://127.0.0.1:99999"], &[], "--frontend"),
        (&["--frontend", "tcp://127.0.0.1"], &[], "--frontend"),
        (&["--frontend", "tcp://localhost:5555"], &[], "--frontend"),
        (&["--frontend", "inproc://broker"], &[], "--frontend"),
        // Sizes that cannot work together.
        (&["--max-message-bytes", "0"], &[], "--max-message-bytes"),
        (&["--max-message-bytes", "1TiB"], &[], "--max-message-bytes"),
        (
            &["--max-connection-bytes", "1KiB"],
            &[],
            "--max-connection-bytes",
        ),
        (
            &["--max-buffered-bytes", "1MiB"],
            &[],
            "--max-buffered-bytes",
        ),
        (
            &[],
            &[("BROKER_MAX_INFLIGHT_BYTES", "1")],
            "--max-inflight-bytes",
        ),
        (&["--memory-limit", "lots"], &[], "--memory-limit"),
        // Values that parse but cannot work (found by the red team).
        (&["--memory-limit", "1MiB"], &[], "--memory-limit"),
        (&["--stall-timeout", "0s"], &[], "--stall-timeout"),
        (&["--stall-timeout", "999ms"], &[], "--stall-timeout"),
        (&["--stuck-after", "1ms"], &[], "--stuck-after"),
        (
            &[],
            &[("BROKER_MAX_CONNECTION_AGE", "999ms")],
            "--max-connection-age",
        ),
        (&["--max-message-bytes", "63"], &[], "--max-message-bytes"),
        (&["--frontend", "ipc://*"], &[], "--frontend"),
        // A random admin port no probe could be told (issue 19).
        (&["--admin", "127.0.0.1:0"], &[], "--admin"),
        (&["--admin", " 127.0.0.1:0\n"], &[], "--admin"),
        // The admin server on the front port: the second bind would fail after the first.
        (
            &[
                "--frontend",
                "tcp://127.0.0.1:5999",
                "--admin",
                "0.0.0.0:5999",
            ],
            &[],
            "--admin",
        ),
        // Queue times that scheduling noise alone would trip, or that no clock can add.
        (&["--queue-target", "0s"], &[], "--queue-target"),
        (&["--queue-target", "500us"], &[], "--queue-target"),
        (&["--queue-interval", "2h"], &[], "--queue-interval"),
    ];
    for (args, env, needle) in cases {
        let (code, output, log) = run_to_exit(args, env);
        assert_eq!(code, Some(2), "{args:?} {env:?}: {output}");
        assert_eq!(
            output.trim().lines().count(),
            1,
            "{args:?}: one line, got {output:?}"
        );
        assert!(
            output.contains(needle),
            "{args:?}: {output:?} names {needle}"
        );
        // Logging starts only after the configuration is valid, and everything that binds
        // after logging: an empty log means nothing was bound or started.
        assert!(log.is_empty(), "{args:?}: the broker started: {log}");
    }
}

#[test]
fn more_connections_than_file_descriptors_allow_exit_2() {
    // 600 connections need 1,200 descriptors and more; the hard limit here is 512.
    let output = std::process::Command::new("prlimit")
        .args(["--nofile=512:512", env!("CARGO_BIN_EXE_broker")])
        .args(["--max-connections", "600", "--admin", "127.0.0.1:1"])
        .output()
        .expect("prlimit (util-linux) runs the broker");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--max-connections") && stderr.contains("512"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "nothing started");
}

#[test]
fn the_extremes_of_every_accepted_range_work() {
    // The smallest message limit: clients still connect (the handshake has its own room),
    // a 64-byte body is served and a 65-byte one refused, and the exec probe still passes.
    let tiny = Broker::start(&["--workers", "1", "--max-message-bytes", "64"]);
    let client = Client::dealer(&tiny.front, true);
    assert_eq!(ok(client.request(&[&[7u8; 64]])), [vec![7u8; 64]]);
    assert_eq!(
        err_code(&client.request(&[&[7u8; 65]])),
        Some(ErrorCode::TooLarge)
    );
    let probe = std::process::Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["probe", "--endpoint", &tiny.front])
        .status()
        .expect("probe runs");
    assert!(probe.success(), "the probe fits the smallest limit");
    // The shortest patience: an idle client is not reset, the idle broker stays live.
    let patient = Broker::start(&["--stall-timeout", "1s", "--stuck-after", "1s"]);
    let client = Client::dealer(&patient.front, true);
    assert_eq!(ok(client.request(&[b"a"])), [b"a".to_vec()]);
    patient.wait_for_log("state starting -> serving", EVENT_TIMEOUT);
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(3) {
        assert_eq!(patient.http_get("/livez").0, 200, "an idle broker is live");
        std::thread::sleep(Duration::from_millis(200)); // between probes
    }
    assert_eq!(ok(client.request(&[b"b"])), [b"b".to_vec()]);
    // IPv6, where the machine has it: the socket is told to bind it.
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let port = common::free_port();
        let endpoint = format!("tcp://[::1]:{port}");
        let _v6 = Broker::start(&["--frontend", &endpoint]);
        let client = Client::dealer(&endpoint, true);
        assert_eq!(ok(client.request(&[b"six"])), [b"six".to_vec()]);
    }
    // The shortest and longest queue times: served either way.
    for (target, interval) in [("1ms", "1ms"), ("1h", "1h")] {
        let queued = Broker::start(&["--queue-target", target, "--queue-interval", interval]);
        let client = Client::dealer(&queued.front, true);
        assert_eq!(ok(client.request(&[b"q"])), [b"q".to_vec()], "{target}");
    }
    // The largest pool, and the largest in-flight table, which costs nothing until used.
    let big = Broker::start(&["--workers", "1000", "--max-inflight", "1000000"]);
    let client = Client::req(&big.front);
    assert_eq!(ok(client.request(&[b"many"])), [b"many".to_vec()]);
    let rss = common::metric(&big, "process_resident_memory_bytes");
    assert!(
        rss < 128.0 * 1048576.0,
        "1000 workers and a 1M table: {rss} bytes"
    );
    // Log levels in any case, from the flag or the environment.
    let _upper = Broker::start(&["--log-level", "INFO", "--log-format", "JSON"]);
    let mut quiet = Broker::spawn(&[], &[("BROKER_LOG_LEVEL", "WARN")]);
    let client = Client::req(&quiet.front);
    assert_eq!(ok(client.request(&[b"up"])), [b"up".to_vec()]);
    quiet.signal(Signal::SIGTERM);
    assert!(quiet.wait_exit(EVENT_TIMEOUT).success());
    assert!(
        !quiet.log_text().contains("INFO"),
        "WARN hides info lines: {}",
        quiet.log_text()
    );
    // The shortest connection age, with no grace: the connection is closed after about a
    // second and the client served again on the next one; the longest age and grace serve.
    let brief = Broker::start(&[
        "--max-connection-age",
        "1s",
        "--max-connection-age-grace",
        "0s",
    ]);
    let client = Client::req(&brief.front);
    assert_eq!(ok(client.request(&[b"before"])), [b"before".to_vec()]);
    common::eventually("the connection recycled", EVENT_TIMEOUT, || {
        common::metric(&brief, "broker_connections_reset_total{reason=\"age\"}") == 1.0
    });
    assert_eq!(ok(client.request(&[b"after"])), [b"after".to_vec()]);
    let longest = Broker::start(&[
        "--max-connection-age",
        "24h",
        "--max-connection-age-grace",
        "1h",
    ]);
    let client = Client::req(&longest.front);
    assert_eq!(ok(client.request(&[b"aged"])), [b"aged".to_vec()]);
    // The longest timers: a drain with nothing in flight still ends at once, and a second
    // signal during an hour-long shutdown delay exits now.
    let mut long = Broker::start(&["--drain-timeout", "1h", "--stall-timeout", "1h"]);
    long.signal(Signal::SIGTERM);
    assert!(long.wait_exit(EVENT_TIMEOUT).success());
    let mut delayed = Broker::start(&["--shutdown-delay", "1h", "--stuck-after", "24h"]);
    delayed.signal(Signal::SIGTERM);
    delayed.wait_for_log("SIGTERM received", EVENT_TIMEOUT);
    delayed.signal(Signal::SIGTERM);
    assert_eq!(
        delayed.wait_exit(EVENT_TIMEOUT).code(),
        Some(128 + Signal::SIGTERM as i32)
    );
}

#[test]
fn stray_signals_are_logged_and_ignored_and_sigquit_drains() {
    let mut broker = Broker::start(&["--workers", "1"]);
    let client = Client::req(&broker.front);
    for signal in [
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
        Signal::SIGTSTP,
        Signal::SIGVTALRM,
        Signal::SIGPROF,
        Signal::SIGXCPU,
    ] {
        broker.signal(signal);
        broker.wait_for_log(
            &format!("{} received and ignored", signal.as_str()),
            EVENT_TIMEOUT,
        );
        assert_eq!(
            ok(client.request(&[b"still"])),
            [b"still".to_vec()],
            "{signal}"
        );
    }
    // A real-time signal, which no name covers.
    let status = std::process::Command::new("kill")
        .args(["-s", "RTMIN+3", &broker.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    broker.wait_for_log("received and ignored", EVENT_TIMEOUT);
    assert_eq!(ok(client.request(&[b"alive"])), [b"alive".to_vec()]);
    // SIGQUIT stops the broker the way SIGTERM does.
    broker.signal(Signal::SIGQUIT);
    assert!(broker.wait_exit(EVENT_TIMEOUT).success());
    broker.wait_for_log("SIGQUIT received", EVENT_TIMEOUT);
    common::assert_all_answered(&broker);
}

#[test]
fn port_in_use_is_fatal_with_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("tcp://{}", taken.local_addr().expect("addr"));
    let (code, output, _) = run_to_exit(&["--frontend", &endpoint], &[]);
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("cannot bind") && output.contains("ERROR"),
        "{output}"
    );
}

/// An ipc:// path another broker serves is refused like a taken port (libzmq would take the
/// path over and leave the first broker unreachable), and a clean exit removes the socket file.
#[test]
fn an_ipc_path_in_use_is_fatal_and_a_clean_exit_removes_it() {
    let dir = std::env::temp_dir().join(format!("broker-ipc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("front.sock");
    let endpoint = format!("ipc://{}", path.display());
    let mut first = Broker::start(&["--frontend", &endpoint]);
    let (code, output, _) = run_to_exit(&["--frontend", &endpoint], &[]);
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("cannot bind"), "{output}");
    // The first is still the one answering.
    let client = Client::dealer(&endpoint, true);
    assert_eq!(
        ok(client.request(&[b"still mine"])),
        [b"still mine".to_vec()]
    );
    first.signal(Signal::SIGTERM);
    assert!(first.wait_exit(EVENT_TIMEOUT).success());
    assert!(!path.exists(), "the socket file is left behind");
    let _ = std::fs::remove_dir_all(&dir);
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
