//! Fuzzes the request/reply code the coordinator and clients run on untrusted bytes: the
//! envelope rule over envelopes of 0..N frames, request classification, the reply encoder
//! against its decoder (round trip), and reply parsing of arbitrary frames. Input bytes are
//! split into frames at 0xFF.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::protocol::{
    encode_err, encode_ok, envelope_len, inspect, parse_reply, wire_size, Reply, RequestKind,
    HEALTH_REQUEST, MAX_ENVELOPE_FRAMES, MAX_FRAMES,
};
use shared::ErrorCode;

const MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    let frames: Vec<&[u8]> = data.split(|b| *b == 0xFF).collect();
    if let Some(n) = envelope_len(&frames) {
        // The zguide's rule: the routing id, then everything up to the first empty frame.
        assert!(n >= 1 && n <= frames.len());
        if n == 1 {
            assert!(frames[1..].iter().all(|f| !f.is_empty()));
        } else {
            assert!(frames[n - 1].is_empty());
            assert!(frames[1..n - 1].iter().all(|f| !f.is_empty()));
        }
        let (envelope, body) = frames.split_at(n);
        let size: usize = body.iter().map(|f| f.len()).sum();
        let hops: usize = envelope[1..].iter().map(|f| f.len()).sum();
        let too_many = envelope.len() > MAX_ENVELOPE_FRAMES || frames.len() > MAX_FRAMES;
        let seen = inspect(&frames, MAX).expect("a routing id at least");
        // The one-pass inspection agrees with the rule and with the sizes counted apart.
        assert_eq!(seen.envelope_frames, n);
        assert_eq!((seen.body_bytes, seen.envelope_bytes), (size, hops));
        let wire: usize = frames[1..].iter().map(|f| wire_size(f.len())).sum();
        assert_eq!(seen.wire_bytes, wire);
        match seen.verdict {
            Err(ErrorCode::TooLarge) => assert!(too_many || size + hops > MAX),
            Err(ErrorCode::BadRequest) => assert!(!too_many && size == 0 && hops <= MAX),
            Ok(RequestKind::Health) => assert!(body == [HEALTH_REQUEST]),
            Ok(RequestKind::Work) => assert!(!too_many && size > 0 && size + hops <= MAX),
            Err(other) => panic!("inspect never answers {other}"),
        }
        // An envelope that is not echoed is always one whose request is refused.
        if !seen.echo_envelope {
            assert_eq!(seen.verdict, Err(ErrorCode::TooLarge));
        }
    }
    // Arbitrary frames never make the decoder panic.
    let _ = parse_reply(frames.iter().map(|f| f.to_vec()).collect::<Vec<_>>());
    // The encoder and the decoder agree.
    let ok: Vec<zmq::Message> = encode_ok(frames.iter().map(|f| zmq::Message::from(*f))).collect();
    match parse_reply(ok) {
        Ok(Reply::Ok(back)) => assert!(back.iter().map(|m| &m[..]).eq(frames.iter().copied())),
        other => panic!("OK did not round-trip: {other:?}"),
    }
    if let Some((&first, rest)) = data.split_first() {
        let code = ErrorCode::ALL[usize::from(first) % ErrorCode::ALL.len()];
        let message = String::from_utf8_lossy(rest);
        let err = Vec::from(encode_err(code, &message));
        assert_eq!(
            parse_reply(err),
            Ok(Reply::Err { code, message: message.into_owned() })
        );
    }
});
