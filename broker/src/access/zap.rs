//! The ZAP handler (ZeroMQ's authentication protocol, RFC 27): a REP socket in the front
//! socket's context that accepts a connection only when its peer address is in `--allow-from`
//! and, with CURVE, its public key is in `--curve-allow-keys`. The coordinator polls its socket
//! next to its others, so no thread is added.

use std::sync::Arc;

use shared::curve::{self, Key};
use shared::metrics::RefusalReason;
use shared::socket::{send_frames, try_recv_frames};
use shared::Metrics;
use zmq::Message;

use super::{AllowKeys, Error, Policy, Refresh, Refusals, ZAP_ENDPOINT};

/// The ZAP handler: a REP socket on [`ZAP_ENDPOINT`] in the front socket's context.
pub struct ZapHandler {
    socket: zmq::Socket,
    policy: Policy,
    metrics: Arc<Metrics>,
    frames: Vec<Message>,
}

impl ZapHandler {
    /// Binds the handler in `ctx`. Call before the front socket binds, so no connection
    /// is ever accepted unchecked.
    pub fn bind(
        ctx: &zmq::Context,
        policy: Policy,
        metrics: Arc<Metrics>,
    ) -> Result<ZapHandler, Error> {
        let socket = ctx.socket(zmq::REP)?;
        socket.set_linger(0)?;
        socket.bind(ZAP_ENDPOINT)?;
        if let Some(keys) = &policy.keys {
            metrics.set_allowed_keys(keys.len());
        }
        Ok(ZapHandler {
            socket,
            policy,
            metrics,
            frames: Vec::with_capacity(8),
        })
    }

    /// The socket, for the coordinator's poll set.
    pub fn socket(&self) -> &zmq::Socket {
        &self.socket
    }

    /// The allowed client keys, if `--curve-allow-keys` is set.
    pub fn keys(&self) -> Option<&AllowKeys> {
        self.policy.keys.as_ref()
    }

    /// Re-reads the allow file if it changed; logs and counts the outcome. True if keys
    /// were removed (open connections must be checked again).
    pub fn refresh_keys(&mut self) -> bool {
        let Some(keys) = &mut self.policy.keys else {
            return false;
        };
        match keys.refresh() {
            Refresh::Unchanged => false,
            Refresh::Reloaded { keys, removed } => {
                log::info!("allowed client keys reloaded: {keys} in force, {removed} removed");
                self.metrics.keys_reloaded(Some(keys));
                removed > 0
            }
            Refresh::Failed(why) => {
                log::error!("allowed client keys not reloaded, previous keys kept: {why}");
                self.metrics.keys_reloaded(None);
                false
            }
        }
    }

    /// Answers every pending ZAP request, noting refusals in `refusals`.
    pub fn handle_pending(&mut self, refusals: &mut Refusals) {
        loop {
            match try_recv_frames(&self.socket, &mut self.frames, 16) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    log::error!("ZAP handler: receive failed: {e}");
                    return;
                }
            }
            // version, request id, domain, address, routing id, mechanism, credentials...
            // Only libzmq writes here, so a short request is a bug; it is still answered
            // (refused): a REP socket that skips a reply can never receive again.
            let verdict = if self.frames.len() < 6 {
                log::error!("ZAP handler: malformed request refused");
                Err((RefusalReason::Handshake, "malformed ZAP request"))
            } else {
                self.check()
            };
            let (code, text, user) = match verdict {
                Ok(user) => ("200", "OK", user),
                Err((reason, text)) if self.frames.len() < 6 => {
                    refusals.note(reason, None);
                    ("500", text, String::new())
                }
                Err((reason, text)) => {
                    let peer = String::from_utf8_lossy(&self.frames[3]).into_owned();
                    log::debug!("connection from {peer} refused: {text}");
                    refusals.note(reason, Some(peer));
                    ("400", text, String::new())
                }
            };
            let request_id = self
                .frames
                .get_mut(1)
                .map_or_else(Message::new, |id| std::mem::replace(id, Message::new()));
            // The user id travels with every message of the connection (its `User-Id`
            // property): the coordinator learns each connection's key from it.
            let reply = [
                Message::from("1.0"),
                request_id,
                Message::from(code),
                Message::from(text),
                Message::from(user.as_str()),
                Message::new(),
            ];
            if let Err(e) = send_frames(&self.socket, reply, zmq::DONTWAIT) {
                log::error!("ZAP handler: reply failed: {e}");
            }
        }
    }

    /// The connection's user id (its CURVE key in Z85, or empty), or the refusal's reason
    /// label and status text.
    fn check(&self) -> Result<String, (RefusalReason, &'static str)> {
        if let Some(networks) = &self.policy.networks {
            if !networks.allows(&String::from_utf8_lossy(&self.frames[3])) {
                return Err((RefusalReason::Allowlist, "address not allowed"));
            }
        }
        let curve = &*self.frames[5] == b"CURVE";
        let key = self
            .frames
            .get(6)
            .filter(|_| curve)
            .and_then(|f| Key::try_from(&f[..]).ok());
        match (&self.policy.keys, key) {
            (Some(keys), Some(key)) if keys.allows(&key) => Ok(curve::encode_key(&key)),
            (Some(_), _) => Err((RefusalReason::ClientKey, "client key not allowed")),
            (None, key) => Ok(key.map(|k| curve::encode_key(&k)).unwrap_or_default()),
        }
    }
}
