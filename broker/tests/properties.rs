//! Property: whatever frames a client sends, with envelopes of 0 to 4 frames, the broker
//! answers with exactly one well-formed reply carrying the envelope back (the one the protocol
//! predicts), never panics, and keeps serving. Real binary, real DEALER socket over TCP;
//! proptest generates and shrinks the frame sequences.

mod common;

use common::{Broker, EVENT_TIMEOUT};
use proptest::collection::vec;
use proptest::prelude::*;
use shared::protocol::{inspect, parse_reply, Reply, RequestKind, HEALTH_REQUEST};

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

/// An envelope a client or proxies could put in front: non-empty frames (ids, routing ids).
fn envelope() -> impl Strategy<Value = Option<Vec<Vec<u8>>>> {
    prop_oneof![
        1 => Just(None),
        3 => vec(vec(1u8..=255, 1..12), 0..4).prop_map(Some),
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
    proptest!(config, |(envelope in envelope(), body in vec(frame(), 1..6))| {
        // A DEALER with an envelope ends it with the empty delimiter; without one, it sends
        // the body alone.
        let mut sent: Vec<Vec<u8>> = Vec::new();
        if let Some(hops) = &envelope {
            sent.extend(hops.iter().cloned());
            sent.push(Vec::new());
        }
        sent.extend(body.iter().cloned());
        socket.send_multipart(&sent, 0).expect("send");
        let mut reply = recv(&socket);
        // What the broker sees: its routing id, then what was sent. The rule splits it.
        let mut seen = vec![b"routing-id".to_vec()];
        seen.extend(sent.iter().cloned());
        let inspection = inspect(&seen, MAX).expect("a routing id at least");
        let split = inspection.envelope_frames;
        // An envelope over its bounds is not echoed (the reply goes to the peer alone).
        let expected_envelope = if inspection.echo_envelope { &seen[1..split] } else { &seen[1..1] };
        prop_assert!(reply.len() >= expected_envelope.len());
        prop_assert_eq!(&reply[..expected_envelope.len()], expected_envelope, "envelope comes back");
        let rest = reply.split_off(expected_envelope.len());
        match (inspection.verdict, parse_reply(rest).expect("well-formed reply")) {
            (Ok(RequestKind::Work), Reply::Ok(echo)) => prop_assert_eq!(echo, seen[split..].to_vec()),
            (Ok(RequestKind::Health), Reply::Ok(state)) => prop_assert_eq!(state, vec![b"serving".to_vec()]),
            (Err(code), Reply::Err { code: got, .. }) => prop_assert_eq!(code, got),
            (expected, got) => prop_assert!(false, "expected {:?}, got {:?}", expected, got),
        }
        // Exactly one: the next reply on this connection answers the next request.
        socket.send_multipart([&b"sync"[..], b"", HEALTH_REQUEST], 0).expect("send sync");
        let sync = recv(&socket);
        prop_assert_eq!(sync, vec![b"sync".to_vec(), Vec::new(), b"OK".to_vec(), b"serving".to_vec()]);
    });
    // Still serving, nothing counted as a handler failure.
    let metrics = broker.http_get("/metrics").1;
    assert!(
        metrics.contains("broker_requests_total{outcome=\"handler_failed\"} 0"),
        "{metrics}"
    );
}
