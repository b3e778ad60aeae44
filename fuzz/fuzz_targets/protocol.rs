//! Fuzzes the request/reply parsing the coordinator and clients run on untrusted bytes:
//! envelope detection, request classification, reply parsing, and the internal ticket and
//! worker-id frames. Input bytes are split into frames at 0xFF.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::protocol::internal::{parse_worker_id, worker_id, Ticket};
use shared::protocol::{classify, envelope_len, parse_reply, RequestKind, HEALTH_REQUEST};
use shared::ErrorCode;

const MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    let frames: Vec<&[u8]> = data.split(|b| *b == 0xFF).collect();
    if let Some(n) = envelope_len(&frames) {
        assert!((1..=2).contains(&n) && n <= frames.len());
        let body = &frames[n..];
        let size: usize = body.iter().map(|f| f.len()).sum();
        match classify(body, MAX) {
            Err(ErrorCode::BadRequest) => assert_eq!(size, 0),
            Err(ErrorCode::TooLarge) => assert!(size > MAX),
            Ok(RequestKind::Health) => assert!(body.len() == 1 && body[0] == HEALTH_REQUEST),
            Ok(RequestKind::Work) => assert!(size > 0 && size <= MAX),
            Err(other) => panic!("classify never answers {other}"),
        }
    }
    let _ = parse_reply(frames.iter().map(|f| f.to_vec()).collect::<Vec<_>>());
    if let Some(ticket) = Ticket::from_bytes(data) {
        assert_eq!(ticket.to_bytes(), data);
    }
    if let Some(index) = parse_worker_id(data) {
        assert_eq!(worker_id(index), data);
    }
});
