//! The wire protocol: how a request and its reply are framed on the front socket (the zguide's
//! reply envelope), the reserved health request, and the one reply encoder and its decoder. `docs/protocol.md` is the
//! prose version of this module; keep them in step.

use std::fmt;
use std::ops::Deref;
use std::time::Duration;

use zmq::Message;

/// First reply-body frame of a successful reply.
pub const STATUS_OK: &[u8] = b"OK";
/// First reply-body frame of a failed reply; a code frame and a message frame follow.
pub const STATUS_ERR: &[u8] = b"ERR";

/// The single body frame of a health request. It starts with a NUL byte so that no text
/// protocol collides with it; the coordinator answers it itself, never a worker.
pub const HEALTH_REQUEST: &[u8] = b"\x00broker.health";

/// Prefix of the optional deadline header: the first frame after the envelope may be
/// `\x00broker.timeout-ms=N`, N the client's remaining budget in ASCII decimal milliseconds
/// (relative, since the clocks of client and pod differ). The broker strips it before the
/// handler sees the body and never starts a request whose budget has run out.
pub const TIMEOUT_HEADER: &[u8] = b"\x00broker.timeout-ms=";
/// Most digits a deadline header's N may have (any such number fits a `u64`).
pub const MAX_TIMEOUT_DIGITS: usize = 19;

/// A frame that starts like a deadline header but is not one (`ERR bad_request`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed deadline header: expected \\0broker.timeout-ms= and 1 to 19 ASCII digits")]
pub struct MalformedHeader;

/// The deadline header for a budget of `budget` (whole milliseconds, rounded down, so the
/// broker never thinks a client waits longer than it does).
pub fn timeout_header(budget: Duration) -> Message {
    // At most 19 digits, as the parser takes: about 317 million years.
    let millis = u64::try_from(budget.as_millis())
        .unwrap_or(u64::MAX)
        .min(9_999_999_999_999_999_999);
    let mut frame = Vec::with_capacity(TIMEOUT_HEADER.len() + MAX_TIMEOUT_DIGITS);
    frame.extend_from_slice(TIMEOUT_HEADER);
    frame.extend_from_slice(millis.to_string().as_bytes());
    Message::from(frame)
}

/// Reads a deadline header: `None` when `frame` is not one (it does not start with
/// [`TIMEOUT_HEADER`]), the budget when it is, [`MalformedHeader`] when it starts like one
/// but N is not 1 to [`MAX_TIMEOUT_DIGITS`] ASCII digits.
pub fn parse_timeout_header(frame: &[u8]) -> Option<Result<Duration, MalformedHeader>> {
    let digits = frame.strip_prefix(TIMEOUT_HEADER)?;
    if digits.is_empty()
        || digits.len() > MAX_TIMEOUT_DIGITS
        || !digits.iter().all(u8::is_ascii_digit)
    {
        return Some(Err(MalformedHeader));
    }
    let millis = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(Ok(Duration::from_millis(millis)))
}

/// Most frames an envelope may have, the routing id the broker's ROUTER adds included: room
/// for a correlation id and a delimiter behind a dozen proxy hops.
pub const MAX_ENVELOPE_FRAMES: usize = 32;
/// Most frames a whole request may have. libzmq keeps a 64-byte `zmq_msg_t` per frame, so a
/// message of many tiny frames costs far more memory than its bytes; this caps that.
pub const MAX_FRAMES: usize = 256;
/// What one frame costs in memory besides its bytes (a `zmq_msg_t`), counted by admission.
pub const FRAME_OVERHEAD: usize = 64;

/// Why a request failed. The wire form ([`ErrorCode::as_str`]) is public interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request was malformed (an empty body, or a handler rejected its input).
    BadRequest,
    /// The request was larger than `--max-message-bytes`, or had too many frames.
    TooLarge,
    /// The broker already holds as many requests or bytes as it may (`--max-inflight`,
    /// `--max-inflight-bytes`), or is shedding load to stay inside its memory limit.
    Overloaded,
    /// The broker is shutting down and takes no new work.
    Draining,
    /// The request was still running at the drain deadline.
    Timeout,
    /// The handler panicked or reported an internal failure.
    HandlerFailed,
    /// The request's deadline (its `\x00broker.timeout-ms=N` header) passed before a worker
    /// could start it, or was sure to, or the handler gave up at it.
    DeadlineExceeded,
}

impl ErrorCode {
    /// Every code, in a fixed order (metric label pre-registration walks this).
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::Overloaded,
        ErrorCode::Draining,
        ErrorCode::Timeout,
        ErrorCode::HandlerFailed,
        ErrorCode::DeadlineExceeded,
    ];

    /// The code frame as it travels on the wire, also the metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Draining => "draining",
            ErrorCode::Timeout => "timeout",
            ErrorCode::HandlerFailed => "handler_failed",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
        }
    }

    /// Parses a code frame.
    pub fn from_bytes(bytes: &[u8]) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.as_str().as_bytes() == bytes)
    }

    /// Index into [`ErrorCode::ALL`], for per-code tables without hashing.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many leading frames of a message read from a ROUTER socket are envelope (the zguide's
/// rule): the routing id ROUTER adds, plus every frame up to and including the first empty
/// frame. Without an empty frame the envelope is the routing id alone (a DEALER that sends no
/// delimiter). Returns `None` for a message with no frames at all.
pub fn envelope_len(frames: &[impl Deref<Target = [u8]>]) -> Option<usize> {
    let (_, rest) = frames.split_first()?;
    Some(match rest.iter().position(|frame| frame.is_empty()) {
        Some(delimiter) => delimiter + 2,
        None => 1,
    })
}

/// What a request body asks for, once it passed the checks in [`inspect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// An application request for a worker's handler.
    Work,
    /// The reserved health request, answered by the coordinator.
    Health,
}

/// What the broker learns of a message read from its ROUTER (routing id first), in one pass
/// over its frames: where the envelope ends, whether the reply may carry it back, the sizes
/// that admission and byte accounting need, and the verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inspection {
    /// Leading frames that are envelope, the routing id included ([`envelope_len`]).
    pub envelope_frames: usize,
    /// Whether the reply carries the envelope back whole. An envelope over its bounds (more
    /// than [`MAX_ENVELOPE_FRAMES`] frames, or more than the byte limit besides the routing id)
    /// is not echoed: the `ERR too_large` reply goes to the routing id alone.
    pub echo_envelope: bool,
    /// Bytes of the body frames (the deadline header excluded).
    pub body_bytes: usize,
    /// The deadline header's frame, if the request has one: the first frame after the
    /// envelope, stripped before the handler sees the body.
    pub header: bool,
    /// The client's budget from its deadline header, if it sent a well-formed one.
    pub timeout: Option<Duration>,
    /// Bytes of the envelope frames but the routing id.
    pub envelope_bytes: usize,
    /// Wire bytes of every frame but the routing id ([`wire_size`]): what the client sent.
    pub wire_bytes: usize,
    /// The request's verdict: the envelope's and body's bytes (the routing id excepted) count
    /// toward the byte limit; a malformed deadline header or an empty body is a bad request; a
    /// body of exactly [`HEALTH_REQUEST`] is a health check.
    pub verdict: Result<RequestKind, ErrorCode>,
}

/// Inspects `frames` as read from a ROUTER socket, with `max_bytes` the request byte limit.
/// `None` for a message with no frames at all.
pub fn inspect<F: Deref<Target = [u8]>>(frames: &[F], max_bytes: usize) -> Option<Inspection> {
    let (_, rest) = frames.split_first()?;
    let (mut delimiter, mut before, mut after, mut wire) = (None, 0usize, 0usize, 0usize);
    for (i, frame) in rest.iter().enumerate() {
        let len = frame.len();
        wire += wire_size(len);
        if delimiter.is_some() {
            after += len;
        } else if len == 0 {
            delimiter = Some(i);
        } else {
            before += len;
        }
    }
    // Without a delimiter the envelope is the routing id alone and every frame is body.
    let (envelope_frames, envelope_bytes, mut body_bytes) = match delimiter {
        Some(i) => (i + 2, before, after),
        None => (1, 0, before),
    };
    let parsed = frames
        .get(envelope_frames)
        .and_then(|first| parse_timeout_header(first));
    let header = parsed.is_some();
    if header {
        body_bytes -= frames[envelope_frames].len();
    }
    let body_start = envelope_frames + usize::from(header);
    let echo_envelope = envelope_frames <= MAX_ENVELOPE_FRAMES && envelope_bytes <= max_bytes;
    let verdict = if !echo_envelope
        || frames.len() > MAX_FRAMES
        || body_bytes.saturating_add(envelope_bytes) > max_bytes
    {
        Err(ErrorCode::TooLarge)
    } else if matches!(parsed, Some(Err(_))) || body_bytes == 0 {
        // A header that is not one, or no frames (only empty ones): nothing to work on.
        Err(ErrorCode::BadRequest)
    } else if frames.len() == body_start + 1 && &*frames[body_start] == HEALTH_REQUEST {
        Ok(RequestKind::Health)
    } else {
        Ok(RequestKind::Work)
    };
    Some(Inspection {
        envelope_frames,
        echo_envelope,
        body_bytes,
        header,
        timeout: parsed.and_then(Result::ok),
        envelope_bytes,
        wire_bytes: wire,
        verdict,
    })
}

/// The bytes a frame of `len` bytes took on the wire (ZMTP 3: a flags byte and a 1- or 8-byte
/// size), for per-connection accounting against what the kernel says it received.
pub const fn wire_size(len: usize) -> usize {
    if len <= 255 {
        len + 2
    } else {
        len + 9
    }
}

/// The one reply encoder: the frames of an `OK` reply body, ahead of the handler's frames.
pub fn encode_ok<I: IntoIterator<Item = Message>>(frames: I) -> impl Iterator<Item = Message> {
    std::iter::once(Message::from(STATUS_OK)).chain(frames)
}

/// The one reply encoder: an `ERR` reply body, exactly three frames.
pub fn encode_err(code: ErrorCode, message: &str) -> [Message; 3] {
    [
        Message::from(STATUS_ERR),
        Message::from(code.as_str()),
        Message::from(message),
    ]
}

/// A reply body as a client sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<T> {
    /// `OK` followed by the handler's frames.
    Ok(Vec<T>),
    /// `ERR`, a known code and a message.
    Err {
        /// The error code frame.
        code: ErrorCode,
        /// The human-readable message frame.
        message: String,
    },
}

/// A reply body that does not follow the protocol.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The body had no frames.
    #[error("empty reply")]
    Empty,
    /// The status frame was neither `OK` nor `ERR`.
    #[error("unknown status frame {0:?}")]
    BadStatus(String),
    /// `ERR` was not followed by a known code and a message.
    #[error("malformed ERR reply")]
    BadError,
}

/// The decoder of [`encode_ok`] and [`encode_err`]: parses a reply body (the frames after the
/// envelope). Used by clients: the probe, the bench client and the tests.
pub fn parse_reply<T: Deref<Target = [u8]>>(mut body: Vec<T>) -> Result<Reply<T>, ReplyError> {
    if body.is_empty() {
        return Err(ReplyError::Empty);
    }
    let rest = body.split_off(1);
    match body[0].deref() {
        STATUS_OK => Ok(Reply::Ok(rest)),
        STATUS_ERR => match rest.as_slice() {
            [code, message] => Ok(Reply::Err {
                code: ErrorCode::from_bytes(code.deref()).ok_or(ReplyError::BadError)?,
                message: String::from_utf8_lossy(message.deref()).into_owned(),
            }),
            _ => Err(ReplyError::BadError),
        },
        other => Err(ReplyError::BadStatus(
            String::from_utf8_lossy(other).into_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_is_everything_up_to_the_first_empty_frame() {
        let len = |frames: &[&[u8]]| envelope_len(frames);
        assert_eq!(len(&[]), None);
        assert_eq!(len(&[b"id"]), Some(1));
        // A DEALER without delimiter: the routing id alone.
        assert_eq!(len(&[b"id", b"body", b"more"]), Some(1));
        // REQ, or a DEALER with delimiter.
        assert_eq!(len(&[b"id", b"", b"body"]), Some(2));
        assert_eq!(len(&[b"id", b""]), Some(2));
        // A DEALER with a correlation id, and a proxy hop in front of a REQ.
        assert_eq!(len(&[b"id", b"req-7", b"", b"body"]), Some(3));
        assert_eq!(len(&[b"id", b"client", b"", b"body", b"", b"x"]), Some(3));
    }

    #[test]
    fn inspect_bounds_envelope_and_body() {
        let verdict = |frames: &[&[u8]], max| inspect(frames, max).map(|i| i.verdict);
        assert_eq!(verdict(&[], 10), None);
        assert_eq!(verdict(&[b"id"], 10), Some(Err(ErrorCode::BadRequest)));
        assert_eq!(
            verdict(&[b"id", b"", b"", b""], 10),
            Some(Err(ErrorCode::BadRequest))
        );
        assert_eq!(
            verdict(&[b"id", b"123456", b"78901"], 10),
            Some(Err(ErrorCode::TooLarge))
        );
        assert_eq!(
            verdict(&[b"id", b"1234567890"], 10),
            Some(Ok(RequestKind::Work))
        );
        // The routing id is not counted; the rest of the envelope is.
        let hop = inspect(
            &[&b"routing-id-of-any-length"[..], b"12345", b"", b"12345"],
            10,
        )
        .expect("frames");
        assert_eq!(
            hop,
            Inspection {
                envelope_frames: 3,
                echo_envelope: true,
                body_bytes: 5,
                header: false,
                timeout: None,
                envelope_bytes: 5,
                wire_bytes: 7 + 2 + 7,
                verdict: Ok(RequestKind::Work),
            }
        );
        assert_eq!(
            verdict(&[b"id", b"123456", b"", b"12345"], 10),
            Some(Err(ErrorCode::TooLarge))
        );
        assert_eq!(
            verdict(&[b"id", HEALTH_REQUEST], 100),
            Some(Ok(RequestKind::Health))
        );
        assert_eq!(
            verdict(&[b"id", b"", HEALTH_REQUEST], 100),
            Some(Ok(RequestKind::Health))
        );
        // The health frame is only special alone.
        assert_eq!(
            verdict(&[b"id", HEALTH_REQUEST, b"x"], 100),
            Some(Ok(RequestKind::Work))
        );
        let mut hops = vec![&b"hop"[..]; MAX_ENVELOPE_FRAMES];
        hops.extend([&b""[..], b"x"]);
        let over = inspect(&hops, 1000).expect("frames");
        assert_eq!(
            (over.echo_envelope, over.verdict),
            (false, Err(ErrorCode::TooLarge))
        );
        hops.remove(0);
        let within = inspect(&hops, 1000).expect("frames");
        assert_eq!(within.envelope_frames, MAX_ENVELOPE_FRAMES);
        assert!(within.echo_envelope);
        // An envelope over the byte limit is not echoed either.
        let big = inspect(&[&b"id"[..], &[1u8; 11], b"", b"x"], 10).expect("frames");
        assert_eq!(
            (big.echo_envelope, big.verdict),
            (false, Err(ErrorCode::TooLarge))
        );
        let mut frames = vec![&b"x"[..]; MAX_FRAMES];
        assert_eq!(verdict(&frames, 1000), Some(Ok(RequestKind::Work)));
        frames.push(b"x");
        assert_eq!(verdict(&frames, 1000), Some(Err(ErrorCode::TooLarge)));
    }

    #[test]
    fn inspect_reads_and_checks_the_deadline_header() {
        let header = timeout_header(Duration::from_millis(250));
        let frames: [&[u8]; 4] = [b"id", b"", &header, b"work"];
        let seen = inspect(&frames, 100).expect("frames");
        assert_eq!(seen.envelope_frames, 2);
        assert!(seen.header);
        assert_eq!(seen.timeout, Some(Duration::from_millis(250)));
        assert_eq!(seen.body_bytes, 4, "the header is not body");
        assert_eq!(seen.verdict, Ok(RequestKind::Work));
        // Without a delimiter too; and in front of a health request.
        let bare = inspect(&[&b"id"[..], &header, b"x"], 100).expect("frames");
        assert_eq!((bare.header, bare.body_bytes), (true, 1));
        let health = inspect(&[&b"id"[..], &header, HEALTH_REQUEST], 100).expect("frames");
        assert_eq!(health.verdict, Ok(RequestKind::Health));
        // A header alone is an empty request; a malformed one is a bad request.
        let alone = inspect(&[&b"id"[..], &header], 100).expect("frames");
        assert_eq!(alone.verdict, Err(ErrorCode::BadRequest));
        let bad = inspect(&[&b"id"[..], b"\x00broker.timeout-ms=soon", b"x"], 100).expect("frames");
        assert_eq!((bad.header, bad.timeout), (true, None));
        assert_eq!(bad.verdict, Err(ErrorCode::BadRequest));
        // Only the first frame after the envelope is a header.
        let later = inspect(&[&b"id"[..], b"x", &header], 100).expect("frames");
        assert_eq!((later.header, later.timeout), (false, None));
        assert_eq!(later.verdict, Ok(RequestKind::Work));
    }

    #[test]
    fn inspect_agrees_with_the_envelope_rule() {
        let cases: [&[&[u8]]; 5] = [
            &[b"id"],
            &[b"id", b"a", b"b"],
            &[b"id", b""],
            &[b"id", b"req-7", b"", b"body"],
            &[b"id", b"client", b"", b"body", b"", b"x"],
        ];
        for frames in cases {
            let seen = inspect(frames, 100).expect("frames");
            assert_eq!(
                Some(seen.envelope_frames),
                envelope_len(frames),
                "{frames:?}"
            );
            let wire: usize = frames[1..].iter().map(|f| wire_size(f.len())).sum();
            assert_eq!(seen.wire_bytes, wire);
        }
    }

    #[test]
    fn error_codes_round_trip() {
        for (i, code) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(ErrorCode::from_bytes(code.as_str().as_bytes()), Some(code));
            assert_eq!(code.index(), i);
        }
        assert_eq!(ErrorCode::from_bytes(b"nope"), None);
    }

    #[test]
    fn encoder_and_decoder_agree() {
        let ok: Vec<Message> = encode_ok([Message::from("a"), Message::new()]).collect();
        assert_eq!(
            parse_reply(ok).map(|r| match r {
                Reply::Ok(frames) => frames.iter().map(|f| f.to_vec()).collect::<Vec<_>>(),
                Reply::Err { .. } => Vec::new(),
            }),
            Ok(vec![b"a".to_vec(), Vec::new()])
        );
        let err = encode_err(ErrorCode::Timeout, "late");
        assert_eq!(
            parse_reply(Vec::from(err)),
            Ok(Reply::Err {
                code: ErrorCode::Timeout,
                message: "late".into()
            })
        );
        assert_eq!(parse_reply(Vec::<Vec<u8>>::new()), Err(ReplyError::Empty));
        assert_eq!(
            parse_reply(vec![b"ERR".to_vec(), b"timeout".to_vec()]),
            Err(ReplyError::BadError)
        );
        assert!(matches!(
            parse_reply(vec![b"MAYBE".to_vec()]),
            Err(ReplyError::BadStatus(_))
        ));
    }

    #[test]
    fn deadline_headers_round_trip_and_malformed_ones_are_told_apart() {
        let ms = Duration::from_millis;
        let header = timeout_header(ms(1500));
        assert_eq!(&header[..], b"\x00broker.timeout-ms=1500");
        assert_eq!(parse_timeout_header(&header), Some(Ok(ms(1500))));
        // Rounded down: 0.9 ms left is nothing left.
        assert_eq!(
            &timeout_header(Duration::from_micros(900))[..],
            b"\x00broker.timeout-ms=0"
        );
        assert_eq!(
            parse_timeout_header(b"\x00broker.timeout-ms=0"),
            Some(Ok(ms(0)))
        );
        let max = b"\x00broker.timeout-ms=9999999999999999999";
        assert_eq!(
            parse_timeout_header(max),
            Some(Ok(ms(9_999_999_999_999_999_999)))
        );
        assert_eq!(
            parse_timeout_header(&timeout_header(Duration::MAX)),
            Some(Ok(ms(9_999_999_999_999_999_999)))
        );
        for bad in [
            &b"\x00broker.timeout-ms="[..],
            b"\x00broker.timeout-ms=-1",
            b"\x00broker.timeout-ms= 5",
            b"\x00broker.timeout-ms=5 ",
            b"\x00broker.timeout-ms=1.5",
            b"\x00broker.timeout-ms=99999999999999999999",
            "\x00broker.timeout-ms=\u{0663}".as_bytes(),
        ] {
            assert_eq!(
                parse_timeout_header(bad),
                Some(Err(MalformedHeader)),
                "{bad:?}"
            );
        }
        for other in [
            &b"hello"[..],
            b"",
            HEALTH_REQUEST,
            b"\x00broker.timeout-m=5",
        ] {
            assert_eq!(parse_timeout_header(other), None, "{other:?}");
        }
    }

    #[test]
    fn wire_sizes_follow_zmtp_framing() {
        assert_eq!(wire_size(0), 2);
        assert_eq!(wire_size(255), 257);
        assert_eq!(wire_size(256), 265);
    }
}
