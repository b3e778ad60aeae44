//! A pipelining DEALER for the tests: keeps a window of requests outstanding, reads every
//! reply, checks every echo, and counts what came back by outcome.

use std::collections::HashMap;

use shared::protocol::{parse_reply, Reply};
use shared::ErrorCode;

use super::EVENT_TIMEOUT;

/// What a pipelining client saw.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ok: u64,
    pub errors: HashMap<ErrorCode, u64>,
    /// Requests sent that got no reply within [`EVENT_TIMEOUT`] of the last one.
    pub lost: u64,
}

/// A DEALER that keeps `window` requests of `[id, "", body...]` outstanding until `total` are
/// sent, reads every reply, and checks each echo against its request. Its own queues are
/// unlimited, so only the broker decides what is refused or lost.
pub fn pipeline(endpoint: &str, window: usize, total: usize, body: &[&[u8]]) -> Outcome {
    let ctx = zmq::Context::new();
    let socket = ctx.socket(zmq::DEALER).expect("dealer");
    socket.set_sndhwm(0).expect("sndhwm");
    socket.set_rcvhwm(0).expect("rcvhwm");
    socket.set_linger(0).expect("linger");
    socket.connect(endpoint).expect("connect");
    let mut outcome = Outcome::default();
    let (mut sent, mut answered) = (0usize, 0usize);
    let send = |n: usize| {
        let id = (n as u64).to_le_bytes();
        let mut frames: Vec<&[u8]> = vec![&id, b""];
        frames.extend_from_slice(body);
        socket.send_multipart(frames, 0).expect("send");
    };
    while answered < total {
        while sent < total && sent - answered < window {
            send(sent);
            sent += 1;
        }
        if socket
            .poll(zmq::POLLIN, EVENT_TIMEOUT.as_millis() as i64)
            .expect("poll")
            == 0
        {
            outcome.lost = (sent - answered) as u64;
            break;
        }
        let mut reply = socket.recv_multipart(0).expect("recv");
        answered += 1;
        assert!(
            reply.len() >= 3 && reply[1].is_empty(),
            "envelope: {reply:?}"
        );
        let rest = reply.split_off(2);
        match parse_reply(rest).expect("well-formed reply") {
            Reply::Ok(echo) => {
                assert_eq!(echo, body, "an echo of its request");
                outcome.ok += 1;
            }
            Reply::Err { code, .. } => *outcome.errors.entry(code).or_default() += 1,
        }
    }
    outcome
}
