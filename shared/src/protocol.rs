//! The wire protocol: how a request and its reply are framed on the front socket, the reserved
//! health request, and the small internal protocol between the coordinator and its workers.
//! `docs/protocol.md` is the prose version of this module; keep them in step.

use std::fmt;
use std::ops::Deref;

/// First reply-body frame of a successful reply.
pub const STATUS_OK: &[u8] = b"OK";
/// First reply-body frame of a failed reply; a code frame and a message frame follow.
pub const STATUS_ERR: &[u8] = b"ERR";

/// The single body frame of a health request. It starts with a NUL byte so that no text
/// protocol collides with it; the coordinator answers it itself, never a worker.
pub const HEALTH_REQUEST: &[u8] = b"\x00broker.health";

/// Why a request failed. The wire form ([`ErrorCode::as_str`]) is public interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request was malformed (an empty body, or a handler rejected its input).
    BadRequest,
    /// The request body was larger than `--max-message-bytes`.
    TooLarge,
    /// `--max-inflight` requests were already held.
    Overloaded,
    /// The broker is shutting down and takes no new work.
    Draining,
    /// The request was still running at the drain deadline.
    Timeout,
    /// The handler panicked or reported an internal failure.
    HandlerFailed,
}

impl ErrorCode {
    /// Every code, in a fixed order (metric label pre-registration walks this).
    pub const ALL: [ErrorCode; 6] = [
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::Overloaded,
        ErrorCode::Draining,
        ErrorCode::Timeout,
        ErrorCode::HandlerFailed,
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

/// How many leading frames of a message read from a ROUTER socket are envelope: the routing id
/// ROUTER adds, plus the empty delimiter frame when the client sent one (REQ always does).
/// Returns `None` for a message with no frames at all.
pub fn envelope_len(frames: &[impl Deref<Target = [u8]>]) -> Option<usize> {
    match frames {
        [] => None,
        [_, delimiter, ..] if delimiter.deref().is_empty() => Some(2),
        [_, ..] => Some(1),
    }
}

/// What a request body asks for, once it passed the checks in [`classify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// An application request for a worker's handler.
    Work,
    /// The reserved health request, answered by the coordinator.
    Health,
}

/// Checks a request body (the frames after the envelope) before any worker sees it.
pub fn classify(
    body: &[impl Deref<Target = [u8]>],
    max_bytes: usize,
) -> Result<RequestKind, ErrorCode> {
    let size: usize = body.iter().map(|frame| frame.deref().len()).sum();
    // No frames, or only empty ones: nothing to work on.
    if size == 0 {
        return Err(ErrorCode::BadRequest);
    }
    if size > max_bytes {
        return Err(ErrorCode::TooLarge);
    }
    if body.len() == 1 && body[0].deref() == HEALTH_REQUEST {
        return Ok(RequestKind::Health);
    }
    Ok(RequestKind::Work)
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

/// Parses a reply body (the frames after the envelope). Used by clients: the probe, the bench
/// client and the tests.
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

/// The internal protocol on the inproc link between the coordinator (a ROUTER) and each worker
/// (a DEALER whose routing id is [`internal::worker_id`]).
///
/// - worker -> coordinator `[READY]` once connected; the worker is then free.
/// - coordinator -> worker `[ticket, body...]`: a request to run.
/// - worker -> coordinator `[ticket, OK|ERR, ...]`: its reply body; the worker is free again.
/// - coordinator -> worker `[STOP]`: leave the loop and close the socket.
pub mod internal {
    /// Sent by a worker once, when it is connected and free.
    pub const READY: &[u8] = b"READY";
    /// Sent by the coordinator to a free worker to make it exit.
    pub const STOP: &[u8] = b"STOP";

    /// The routing id of worker `index` on the inproc link.
    pub fn worker_id(index: u32) -> [u8; 5] {
        let [a, b, c, d] = index.to_be_bytes();
        [b'w', a, b, c, d]
    }

    /// The inverse of [`worker_id`].
    pub fn parse_worker_id(id: &[u8]) -> Option<u32> {
        match id {
            [b'w', a, b, c, d] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => None,
        }
    }

    /// Names one in-flight request: a slot in the coordinator's table and that slot's
    /// generation, so a late reply for a slot since reused is recognised and dropped.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Ticket {
        /// Index into the in-flight table.
        pub slot: u32,
        /// Bumped every time the slot is reused.
        pub generation: u32,
    }

    impl Ticket {
        /// The ticket frame.
        pub fn to_bytes(self) -> [u8; 8] {
            (u64::from(self.generation) << 32 | u64::from(self.slot)).to_le_bytes()
        }

        /// Parses a ticket frame.
        pub fn from_bytes(bytes: &[u8]) -> Option<Ticket> {
            let raw = u64::from_le_bytes(bytes.try_into().ok()?);
            Some(Ticket {
                slot: raw as u32,
                generation: (raw >> 32) as u32,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::internal::{parse_worker_id, worker_id, Ticket};
    use super::*;

    #[test]
    fn envelope_with_and_without_delimiter() {
        assert_eq!(envelope_len(&[] as &[&[u8]]), None);
        assert_eq!(envelope_len(&[b"id".as_slice()]), Some(1));
        assert_eq!(envelope_len(&[b"id".as_slice(), b"body"]), Some(1));
        assert_eq!(envelope_len(&[b"id".as_slice(), b"", b"body"]), Some(2));
        assert_eq!(envelope_len(&[b"id".as_slice(), b""]), Some(2));
    }

    #[test]
    fn classify_rejects_bad_bodies() {
        let empty: [&[u8]; 0] = [];
        assert_eq!(classify(&empty, 10), Err(ErrorCode::BadRequest));
        assert_eq!(
            classify(&[b"".as_slice(), b""], 10),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(
            classify(&[b"123456".as_slice(), b"78901"], 10),
            Err(ErrorCode::TooLarge)
        );
        assert_eq!(
            classify(&[b"1234567890".as_slice()], 10),
            Ok(RequestKind::Work)
        );
        assert_eq!(classify(&[HEALTH_REQUEST], 100), Ok(RequestKind::Health));
        // The health frame is only special alone.
        assert_eq!(
            classify(&[HEALTH_REQUEST, b"x"], 100),
            Ok(RequestKind::Work)
        );
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
    fn parse_replies() {
        assert_eq!(
            parse_reply(vec![b"OK".to_vec(), b"a".to_vec()]),
            Ok(Reply::Ok(vec![b"a".to_vec()]))
        );
        assert_eq!(
            parse_reply(vec![b"ERR".to_vec(), b"timeout".to_vec(), b"late".to_vec()]),
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
    fn tickets_and_worker_ids_round_trip() {
        let ticket = Ticket {
            slot: 7,
            generation: u32::MAX,
        };
        assert_eq!(Ticket::from_bytes(&ticket.to_bytes()), Some(ticket));
        assert_eq!(Ticket::from_bytes(b"short"), None);
        assert_eq!(parse_worker_id(&worker_id(513)), Some(513));
        assert_eq!(parse_worker_id(b"READY"), None);
    }
}
