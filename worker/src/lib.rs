//! The worker side of the broker: the [`Handler`] trait where a user's code plugs in, the
//! built-in handlers, and the worker threads that run them, fed and answered over channels.

pub mod handlers;
pub mod pool;

use std::fmt;

pub use pool::{Activity, Error, Event, Job, Pool, Ticket, Waker, Worker};
pub use shared::ErrorCode;

/// One frame of a request or reply body. A `zmq::Message` so an echo moves bytes without
/// copying them.
pub type Frame = zmq::Message;

/// Application code run by a worker thread, one request at a time.
///
/// `handle` receives the request body (the frames after the envelope, at least one) and returns
/// the reply body that follows the `OK` status frame. Returning the request's own `Vec` (as the
/// echo handler does) costs no allocation. An `Err` becomes `ERR <code> <message>`; a panic
/// becomes `ERR handler_failed` and the worker keeps serving with the same handler value.
pub trait Handler: Send {
    /// Handles one request.
    fn handle(&mut self, request: Vec<Frame>) -> Result<Vec<Frame>, HandlerError>;
}

/// Builds one [`Handler`] per worker thread, so handlers need not be `Sync` and can keep
/// per-thread state (a connection, a buffer) without locks.
pub trait MakeHandler: Send + Sync {
    /// Builds the handler for worker `index`.
    fn make(&self, index: usize) -> Box<dyn Handler>;
}

impl<F> MakeHandler for F
where
    F: Fn(usize) -> Box<dyn Handler> + Send + Sync,
{
    fn make(&self, index: usize) -> Box<dyn Handler> {
        self(index)
    }
}

/// A handler's refusal: the code and message of the `ERR` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerError {
    /// The code frame.
    pub code: ErrorCode,
    /// The message frame.
    pub message: String,
}

impl HandlerError {
    /// The request itself is at fault (`ERR bad_request`).
    pub fn bad_request(message: impl Into<String>) -> HandlerError {
        HandlerError {
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }

    /// The handler failed for its own reasons (`ERR handler_failed`).
    pub fn failed(message: impl Into<String>) -> HandlerError {
        HandlerError {
            code: ErrorCode::HandlerFailed,
            message: message.into(),
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for HandlerError {}
