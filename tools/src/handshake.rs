//! What a client connection's handshake did, from libzmq's socket monitor: libzmq tells a client
//! why a handshake failed (refused key or address, wrong server key, CURVE on one side only)
//! in no other way, and "no reply" alone does not say whether to fix a key or the server.

use shared::socket::{
    monitor_event, try_recv_frames, PROTOCOL_ERROR_CRYPTOGRAPHIC, PROTOCOL_ERROR_MECHANISM_MISMATCH,
};

/// Attaches a monitor to `socket` for the events [`Seen`] reads (before `connect`, so none is
/// missed).
pub fn watch(ctx: &zmq::Context, socket: &zmq::Socket) -> zmq::Result<zmq::Socket> {
    // Unique per socket: a context may hold several watched sockets.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let address = format!("inproc://handshake-monitor-{n}");
    let events = zmq::SocketEvent::CONNECTED as i32
        | zmq::SocketEvent::CONNECT_RETRIED as i32
        | zmq::SocketEvent::HANDSHAKE_SUCCEEDED as i32
        | zmq::SocketEvent::HANDSHAKE_FAILED_AUTH as i32
        | zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL as i32
        | zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL as i32;
    socket.monitor(&address, events)?;
    let monitor = ctx.socket(zmq::PAIR)?;
    monitor.set_linger(0)?;
    monitor.connect(&address)?;
    Ok(monitor)
}

/// What a watched socket's connections did; the last failure wins, a finished handshake
/// clears it.
#[derive(Debug, Default)]
pub struct Seen {
    connected: bool,
    retried: bool,
    handshake_done: bool,
    failure: Option<&'static str>,
}

impl Seen {
    /// Reads the events waiting on `monitor` (from [`watch`]).
    pub fn read(&mut self, monitor: &zmq::Socket, frames: &mut Vec<zmq::Message>) {
        while let Ok(true) = try_recv_frames(monitor, frames, 2) {
            if let Some((event, value)) = frames.first().and_then(|f| monitor_event(f)) {
                self.note(event, value);
            }
        }
    }

    /// The handshake finished and nothing failed since.
    pub fn handshake_done(&self) -> bool {
        self.handshake_done && self.failure.is_none()
    }

    /// A TCP (or IPC) connection was made.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// A connect failed and none has succeeded: nothing listening there (yet).
    pub fn unreachable(&self) -> bool {
        self.retried && !self.connected
    }

    /// Why the last handshake failed, if one did.
    pub fn failure(&self) -> Option<&'static str> {
        self.failure
    }

    fn note(&mut self, event: u16, value: u32) {
        use zmq::SocketEvent as E;
        let failure = match event {
            e if e == E::CONNECTED as u16 => {
                self.connected = true;
                return;
            }
            e if e == E::CONNECT_RETRIED as u16 => {
                self.retried = true;
                return;
            }
            e if e == E::HANDSHAKE_SUCCEEDED as u16 => {
                self.handshake_done = true;
                self.failure = None;
                return;
            }
            // The broker's ZAP handler answered 400 (the only refusal it gives).
            e if e == E::HANDSHAKE_FAILED_AUTH as u16 => {
                "the broker refused this client (its address is not in --allow-from or its \
                 CURVE key is not in --curve-allow-keys)"
            }
            e if e == E::HANDSHAKE_FAILED_PROTOCOL as u16 => match value {
                PROTOCOL_ERROR_MECHANISM_MISMATCH => {
                    "security mismatch: one side uses CURVE and the other does not \
                     (--curve-server-key)"
                }
                PROTOCOL_ERROR_CRYPTOGRAPHIC => {
                    "the CURVE handshake failed (is --curve-server-key the broker's public key?)"
                }
                _ => "the ZMTP handshake failed (not a ZeroMQ 3.x+ peer?)",
            },
            // The broker hung up mid-handshake: how a wrong server key or a plaintext client
            // of a CURVE broker looks from this side.
            e if e == E::HANDSHAKE_FAILED_NO_DETAIL as u16 => {
                "the broker closed the connection during the handshake (a wrong \
                 --curve-server-key, a broker that requires CURVE, or one at --max-connections)"
            }
            _ => return,
        };
        self.failure = Some(failure);
    }

    /// Why the connection has not carried a reply, as far as the events tell.
    pub fn why(&self) -> &'static str {
        match (self.failure, self.connected, self.handshake_done) {
            (Some(failure), _, _) => failure,
            (None, false, _) => "could not connect (nothing listening, or a full backlog)",
            (None, true, false) => "connected, but the handshake did not finish",
            (None, true, true) => "connected and handshaken, but no answer (a stuck broker?)",
        }
    }
}
