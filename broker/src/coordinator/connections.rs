//! Connections as the coordinator sees them: the front socket's monitor events (accepted,
//! closed, handshakes that failed) feeding the connection table, refusals counted by reason,
//! the ZAP handler's requests, and CURVE keys (the allow file re-read when it changes, and
//! connections whose key was removed reset).

use std::os::fd::RawFd;

use shared::metrics::{DropReason, RefusalReason, ResetReason};
use shared::socket::{
    monitor_event, try_recv_frames, PROTOCOL_ERROR_CRYPTOGRAPHIC, PROTOCOL_ERROR_MECHANISM_MISMATCH,
};
use zmq::Message;

use super::{Coordinator, Error};
use crate::conns::Accepted;

/// A monitor event the coordinator acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnEvent {
    /// libzmq accepted a connection on this fd.
    Accepted(RawFd),
    /// The connection on this fd closed.
    Disconnected(RawFd),
    /// A handshake failed with a protocol error that names why.
    Refused(RefusalReason),
    /// A handshake failed without detail (the peer closed, the handshake timer fired, or the
    /// broker closed it): counted at the DISCONNECTED that follows, if the broker did not.
    HandshakeFailed,
}

impl ConnEvent {
    /// Decodes a monitor event's first frame; `None` for one the coordinator ignores.
    pub fn decode(frame: &[u8]) -> Option<ConnEvent> {
        let (event, value) = monitor_event(frame)?;
        let fd = value as RawFd;
        Some(match event {
            e if e == zmq::SocketEvent::ACCEPTED as u16 => ConnEvent::Accepted(fd),
            e if e == zmq::SocketEvent::DISCONNECTED as u16 => ConnEvent::Disconnected(fd),
            e if e == zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL as u16 => {
                ConnEvent::Refused(match value {
                    PROTOCOL_ERROR_CRYPTOGRAPHIC => RefusalReason::ServerKey,
                    PROTOCOL_ERROR_MECHANISM_MISMATCH => RefusalReason::Mechanism,
                    _ => RefusalReason::Handshake,
                })
            }
            // The value is an errno, and says little: EPIPE when the peer closed
            // mid-handshake (how a plaintext client that noticed the mismatch first shows;
            // which side notices first is a race), whatever errno was last set when the
            // handshake timer (--stall-timeout) fired or the broker closed the connection.
            e if e == zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL as u16 => {
                ConnEvent::HandshakeFailed
            }
            _ => return None,
        })
    }
}

impl Coordinator {
    /// Reads connection events from the front socket's monitor.
    pub(super) fn read_monitor(&mut self) -> Result<(), Error> {
        loop {
            match try_recv_frames(&self.sockets.monitor, &mut self.monitor_frames, 2) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(source) => {
                    return Err(Error::Socket {
                        socket: "monitor",
                        source,
                    })
                }
            }
            // The endpoint (second frame) is not needed: fds name connections.
            if let Some(event) = self
                .monitor_frames
                .first()
                .and_then(|f| ConnEvent::decode(f))
            {
                self.on_conn_event(event);
            }
        }
    }

    fn on_conn_event(&mut self, event: ConnEvent) {
        match event {
            ConnEvent::Accepted(fd) => match self.conns.accepted(fd) {
                Accepted::Tracked => {}
                Accepted::Refused => {
                    log::debug!("connection refused: --max-connections reached");
                    self.refusals.note(RefusalReason::Limit, None);
                }
                Accepted::Untracked => log::debug!("accepted fd {fd} already gone"),
            },
            ConnEvent::Refused(reason) => {
                log::debug!("handshake failed: {reason}");
                self.refusals.note(reason, None);
            }
            ConnEvent::HandshakeFailed => {
                log::debug!("handshake failed: closed or timed out");
                self.handshake_failed = true;
            }
            ConnEvent::Disconnected(fd) => {
                let closed = self.conns.disconnected(fd);
                // libzmq reports a connection the broker closed itself (refused at
                // --max-connections, or reset) as a failed handshake too.
                if std::mem::take(&mut self.handshake_failed)
                    && closed
                        .as_ref()
                        .is_none_or(|c| !c.refused && c.reset.is_none())
                {
                    self.refusals.note(RefusalReason::Handshake, None);
                }
                let Some(closed) = closed else {
                    return;
                };
                let reason = match closed.reset {
                    // Nothing it held outlives an age close (given up at the grace; requests
                    // that crossed a half-close are refused), so no late reply is named.
                    Some(ResetReason::Age | ResetReason::AgeGrace) => DropReason::Age,
                    Some(_) => {
                        self.outbox.remember_reset(closed.id);
                        DropReason::Reset
                    }
                    None => DropReason::PeerGone,
                };
                if closed.undelivered > 0 {
                    self.outbox.lost(reason, closed.undelivered);
                }
            }
        }
    }

    /// Answers pending ZAP requests, with the allow file re-read first if it changed.
    pub(super) fn handle_zap(&mut self) {
        self.refresh_keys();
        if let Some(handler) = &mut self.sockets.zap {
            handler.handle_pending(&mut self.refusals);
        }
    }

    /// Re-reads the allow file if it changed, and resets connections whose key it dropped.
    pub(super) fn refresh_keys(&mut self) {
        let Some(handler) = &mut self.sockets.zap else {
            return;
        };
        if !handler.refresh_keys() {
            return;
        }
        let Some(keys) = handler.keys() else {
            return;
        };
        let revoked = self.conns.revoke(|key| keys.allows(key));
        if revoked > 0 {
            self.metrics
                .connections_reset(ResetReason::Revoked, revoked);
            log::warn!("reset {revoked} connections whose client key was removed");
        }
    }

    /// Checks a connection's first request against the allowed keys (its key may have been
    /// removed since its handshake). False if the connection was reset instead.
    pub(super) fn admit_key(&mut self, fd: RawFd, first_frame: &mut Message) -> bool {
        let Some(keys) = self.sockets.zap.as_ref().and_then(|z| z.keys()) else {
            return true;
        };
        let key = first_frame
            .gets("User-Id")
            .and_then(|id| shared::curve::decode_key(id, "User-Id").ok());
        match key {
            Some(key) if keys.allows(&key) => {
                self.conns.set_key(fd, key);
                true
            }
            _ => {
                if self.conns.reset(fd, ResetReason::Revoked) {
                    self.metrics.connections_reset(ResetReason::Revoked, 1);
                    log::warn!("reset a connection whose client key was removed");
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(event: zmq::SocketEvent, value: u32) -> Vec<u8> {
        let mut frame = (event as u16).to_le_bytes().to_vec();
        frame.extend(value.to_le_bytes());
        frame
    }

    #[test]
    fn monitor_events_decode_to_what_the_coordinator_counts() {
        use zmq::SocketEvent as E;
        let decode = |e, v| ConnEvent::decode(&frame(e, v));
        assert_eq!(decode(E::ACCEPTED, 12), Some(ConnEvent::Accepted(12)));
        assert_eq!(
            decode(E::DISCONNECTED, 12),
            Some(ConnEvent::Disconnected(12))
        );
        assert_eq!(
            decode(E::HANDSHAKE_FAILED_PROTOCOL, PROTOCOL_ERROR_CRYPTOGRAPHIC),
            Some(ConnEvent::Refused(RefusalReason::ServerKey))
        );
        assert_eq!(
            decode(
                E::HANDSHAKE_FAILED_PROTOCOL,
                PROTOCOL_ERROR_MECHANISM_MISMATCH
            ),
            Some(ConnEvent::Refused(RefusalReason::Mechanism))
        );
        assert_eq!(
            decode(E::HANDSHAKE_FAILED_PROTOCOL, 0x1000_0001),
            Some(ConnEvent::Refused(RefusalReason::Handshake))
        );
        assert_eq!(
            decode(E::HANDSHAKE_FAILED_NO_DETAIL, 32),
            Some(ConnEvent::HandshakeFailed)
        );
        assert_eq!(decode(E::LISTENING, 5), None);
        assert_eq!(ConnEvent::decode(b"short"), None);
    }
}
