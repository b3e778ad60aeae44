//! Multipart receive and send helpers over `zmq` sockets that retry on EINTR, so a signal never
//! turns a blocking call into an error path, and reuse the caller's frame buffer.

use zmq::{Message, Socket};

/// libzmq's protocol error (zmq.h) for a CURVE box that did not open (a wrong server key), the
/// value of a `HANDSHAKE_FAILED_PROTOCOL` monitor event.
pub const PROTOCOL_ERROR_CRYPTOGRAPHIC: u32 = 0x1100_0001;
/// libzmq's protocol error (zmq.h) for peers on different security mechanisms (CURVE vs NULL).
pub const PROTOCOL_ERROR_MECHANISM_MISMATCH: u32 = 0x1100_0002;

/// Decodes the first frame of a socket monitor event (libzmq's v1 format: a `u16` event then a
/// `u32` value: an fd, an errno or a protocol error code, depending on the event).
pub fn monitor_event(frame: &[u8]) -> Option<(u16, u32)> {
    match *frame {
        [e0, e1, v0, v1, v2, v3] => Some((
            u16::from_le_bytes([e0, e1]),
            u32::from_le_bytes([v0, v1, v2, v3]),
        )),
        _ => None,
    }
}

/// Receives every frame of one message into `frames` (cleared first).
///
/// With `zmq::DONTWAIT`, `Err(EAGAIN)` means nothing was waiting; once the first frame has been
/// read the rest of the message is already queued (ZeroMQ delivers messages whole), so later
/// frames never see EAGAIN.
pub fn recv_frames(socket: &Socket, flags: i32, frames: &mut Vec<Message>) -> zmq::Result<()> {
    frames.clear();
    loop {
        let mut frame = Message::new();
        retry_eintr(|| socket.recv(&mut frame, flags))?;
        let more = frame.get_more();
        frames.push(frame);
        if !more {
            return Ok(());
        }
    }
}

/// One message as [`recv_frames_capped`] read it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Frames the message had, dropped ones included.
    pub frames: usize,
    /// Wire bytes of the frames dropped past the cap, so byte accounting still sees them.
    pub dropped_bytes: u64,
}

/// Receives one message like [`recv_frames`], keeping at most `cap` frames: the rest are read
/// and dropped one at a time, so a message of millions of frames costs no memory here.
pub fn recv_frames_capped(
    socket: &Socket,
    flags: i32,
    frames: &mut Vec<Message>,
    cap: usize,
) -> zmq::Result<Received> {
    frames.clear();
    let mut received = Received::default();
    let mut spare = Message::new();
    loop {
        let mut frame = if received.frames < cap {
            Message::new()
        } else {
            std::mem::replace(&mut spare, Message::new())
        };
        // Only the first frame can find nothing waiting: a message arrives whole.
        let first = received.frames == 0;
        retry_eintr(|| socket.recv(&mut frame, if first { flags } else { 0 }))?;
        received.frames += 1;
        let more = frame.get_more();
        if received.frames <= cap {
            frames.push(frame);
        } else {
            received.dropped_bytes += crate::protocol::wire_size(frame.len()) as u64;
            spare = frame;
        }
        if !more {
            return Ok(received);
        }
    }
}

/// Receives the next message into `frames` (at most `cap` kept, see [`recv_frames_capped`])
/// without blocking; `None` when nothing waits.
///
/// A non-blocking receive processes the socket's pending commands only every millisecond or
/// so, so a message whose arrival is announced by a command can look absent. Before saying
/// nothing waits, this asks the socket (`ZMQ_EVENTS`, which processes them). After `None`
/// the socket's `ZMQ_FD` becomes readable when something arrives, so a caller can poll it.
pub fn try_recv_message(
    socket: &Socket,
    frames: &mut Vec<Message>,
    cap: usize,
) -> zmq::Result<Option<Received>> {
    match recv_frames_capped(socket, zmq::DONTWAIT, frames, cap) {
        Ok(received) => return Ok(Some(received)),
        Err(zmq::Error::EAGAIN) => {}
        Err(e) => return Err(e),
    }
    if !socket.get_events()?.contains(zmq::POLLIN) {
        return Ok(None);
    }
    match recv_frames_capped(socket, zmq::DONTWAIT, frames, cap) {
        Ok(received) => Ok(Some(received)),
        Err(zmq::Error::EAGAIN) => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`try_recv_message`], for callers that need only whether a message came.
pub fn try_recv_frames(
    socket: &Socket,
    frames: &mut Vec<Message>,
    cap: usize,
) -> zmq::Result<bool> {
    Ok(try_recv_message(socket, frames, cap)?.is_some())
}

/// Sends `frames` as one message; `flags` are added to every frame.
pub fn send_frames<I>(socket: &Socket, frames: I, flags: i32) -> zmq::Result<()>
where
    I: IntoIterator<Item = Message>,
{
    let mut frames = frames.into_iter().peekable();
    while let Some(frame) = frames.next() {
        let more = if frames.peek().is_some() {
            zmq::SNDMORE
        } else {
            0
        };
        send_one(socket, frame, flags | more)?;
    }
    Ok(())
}

/// Sends one frame without copying it.
///
/// The binding consumes the frame even when the send fails, so EINTR cannot be retried here.
/// It cannot happen either: the broker blocks SIGTERM/SIGINT in every thread before any socket
/// exists (they arrive through a signalfd), and front-socket sends are non-blocking.
pub fn send_one(socket: &Socket, frame: Message, flags: i32) -> zmq::Result<()> {
    socket.send(frame, flags)
}

/// Calls `op` until it fails with something other than EINTR.
pub fn retry_eintr<T>(mut op: impl FnMut() -> zmq::Result<T>) -> zmq::Result<T> {
    loop {
        match op() {
            Err(zmq::Error::EINTR) => continue,
            other => return other,
        }
    }
}
