//! The worker side of the broker: the [`Handler`] trait where a user's code plugs in, the
//! built-in handlers, and the worker threads that run them, fed and answered over channels.

pub mod handlers;
pub mod pool;
pub mod queue;

use std::fmt;
use std::time::{Duration, Instant};

pub use pool::{Activity, Error, Event, Job, Outcome, Pool, Shed, Ticket, Waker, Worker};
pub use queue::QueueState;
pub use shared::ErrorCode;

/// One frame of a request or reply body. A `zmq::Message` so an echo moves bytes without
/// copying them.
pub type Frame = zmq::Message;

/// What a handler may know about the request beside its body: its deadline, when the client
/// sent one (the `\x00broker.timeout-ms=N` header, stripped from the body).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Context {
    deadline: Option<Instant>,
}

impl Context {
    /// A context with `deadline` (`None`: the client set none).
    pub fn new(deadline: Option<Instant>) -> Context {
        Context { deadline }
    }

    /// When the client stops waiting, if it said.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The time left before the client stops waiting, if it said (zero once passed).
    pub fn time_left(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

/// Application code run by a worker thread, one request at a time.
///
/// `handle` receives the request body (the frames after the envelope and the deadline header,
/// at least one) and returns the reply body that follows the `OK` status frame. Returning the
/// request's own `Vec` (as the echo handler does) costs no allocation. An `Err` becomes
/// `ERR <code> <message>`; a panic becomes `ERR handler_failed` and the worker keeps serving
/// with the same handler value.
///
/// The worker calls [`Handler::handle_with`], which a handler that wants the request's
/// [`Context`] (the time its client has left) overrides; by default it calls `handle`.
pub trait Handler: Send {
    /// Handles one request.
    fn handle(&mut self, request: Vec<Frame>) -> Result<Vec<Frame>, HandlerError>;

    /// Handles one request knowing its context. The default ignores the context.
    fn handle_with(
        &mut self,
        request: Vec<Frame>,
        context: &Context,
    ) -> Result<Vec<Frame>, HandlerError> {
        let _ = context;
        self.handle(request)
    }
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

    /// The client's deadline passed before the handler could finish (`ERR deadline_exceeded`).
    pub fn deadline_exceeded(message: impl Into<String>) -> HandlerError {
        HandlerError {
            code: ErrorCode::DeadlineExceeded,
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
