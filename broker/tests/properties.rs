//! Property: whatever frames a client sends, the broker answers with exactly one well-formed
//! reply (the one the protocol predicts), never panics, and keeps serving. Real binary, real
//! DEALER socket over TCP; proptest generates and shrinks the frame sequences.

mod common;

use common::{Broker, EVENT_TIMEOUT};
use proptest::collection::vec;
use proptest::prelude::*;
use shared::protocol::{classify, parse_reply, Reply, RequestKind, HEALTH_REQUEST};

const MAX: usize = 256;

/// Frames biased towards the interesting cases: empty, the health frame, around the limit.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..40),
        1 => Just(Vec::new()),
        1 => Just(HEALTH_REQUEST.to_vec()),
        1 => vec(any::<u8>(), MAX - 2..MAX + 3),
    ]
}

#[test]
fn every_frame_sequence_gets_exactly_one_predicted_reply() {
    let broker = Broker::start(&["--workers", "2", "--max-message-bytes", &MAX.to_string()]);
    let ctx = zmq::Context::new();
    let socket = ctx.socket(zmq::DEALER).expect("dealer");
    socket.set_linger(0).expect("linger");
    socket.connect(&broker.front).expect("connect");
    let recv = |socket: &zmq::Socket| {
        assert!(
            socket
                .poll(zmq::POLLIN, EVENT_TIMEOUT.as_millis() as i64)
                .expect("poll")
                > 0,
            "no reply"
        );
        socket.recv_multipart(0).expect("recv")
    };

    let config = ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(frames in vec(frame(), 1..6))| {
        socket.send_multipart(&frames, 0).expect("send");
        let mut reply = recv(&socket);
        // The envelope comes back as it was: a leading empty frame is the delimiter.
        let delimited = frames[0].is_empty();
        if delimited {
            prop_assert_eq!(reply.remove(0), Vec::<u8>::new());
        }
        let body = &frames[usize::from(delimited)..];
        match (classify(body, MAX), parse_reply(reply).expect("well-formed reply")) {
            (Ok(RequestKind::Work), Reply::Ok(echo)) => prop_assert_eq!(echo, body.to_vec()),
            (Ok(RequestKind::Health), Reply::Ok(state)) => prop_assert_eq!(state, vec![b"serving".to_vec()]),
            (Err(code), Reply::Err { code: got, .. }) => prop_assert_eq!(code, got),
            (expected, got) => prop_assert!(false, "expected {:?}, got {:?}", expected, got),
        }
        // Exactly one: the next reply on this connection answers the next request.
        socket.send_multipart([&b""[..], HEALTH_REQUEST], 0).expect("send sync");
        let sync = recv(&socket);
        prop_assert_eq!(sync, vec![Vec::new(), b"OK".to_vec(), b"serving".to_vec()]);
    });
    // Still serving, nothing counted as a handler failure.
    let metrics = broker.http_get("/metrics").1;
    assert!(
        metrics.contains("broker_requests_total{outcome=\"handler_failed\"} 0"),
        "{metrics}"
    );
}
