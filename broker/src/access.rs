//! Access control for the front socket: a ZAP handler (ZeroMQ's authentication protocol,
//! RFC 27) that accepts a connection only when its peer address is in `--allow-from`.
//! The coordinator polls the handler's socket next to its others, so no thread is added and
//! the socket closes with the coordinator. Without `--allow-from` no handler is installed and
//! every peer is accepted (rely on the NetworkPolicy then; see docs/security.md).

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use shared::socket::{send_frames, try_recv_frames};
use shared::Metrics;
use zmq::Message;

/// Where libzmq sends ZAP requests (fixed by the ZAP specification).
pub const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";
/// The ZAP domain set on the front socket.
pub const ZAP_DOMAIN: &str = "broker";

/// Setting up the handler failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the ZAP handler: {0}")]
pub struct Error(#[from] zmq::Error);

/// Allowed peer networks.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    nets: Vec<IpNet>,
}

impl Allowlist {
    /// An allowlist of `nets`; empty allows nothing.
    pub fn new(nets: Vec<IpNet>) -> Allowlist {
        Allowlist { nets }
    }

    /// Is `address` (as ZAP reports it: an IP, v4-mapped v6 included) allowed?
    pub fn allows(&self, address: &str) -> bool {
        let Ok(ip) = address
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
        else {
            return false;
        };
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.nets.iter().any(|net| net.contains(&ip))
    }
}

/// The ZAP handler: a REP socket on [`ZAP_ENDPOINT`] in the front socket's context.
pub struct ZapHandler {
    socket: zmq::Socket,
    allow: Allowlist,
    metrics: Arc<Metrics>,
    frames: Vec<Message>,
}

impl ZapHandler {
    /// Binds the handler in `ctx`. Call before the front socket binds, so no connection
    /// is ever accepted unchecked.
    pub fn bind(
        ctx: &zmq::Context,
        allow: Allowlist,
        metrics: Arc<Metrics>,
    ) -> Result<ZapHandler, Error> {
        let socket = ctx.socket(zmq::REP)?;
        socket.set_linger(0)?;
        socket.bind(ZAP_ENDPOINT)?;
        Ok(ZapHandler {
            socket,
            allow,
            metrics,
            frames: Vec::with_capacity(8),
        })
    }

    /// The socket, for the coordinator's poll set.
    pub fn socket(&self) -> &zmq::Socket {
        &self.socket
    }

    /// Answers every pending ZAP request.
    pub fn handle_pending(&mut self) {
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
            if self.frames.len() < 6 {
                log::error!("ZAP handler: malformed request ignored");
                continue;
            }
            let address = String::from_utf8_lossy(&self.frames[3]).into_owned();
            let allowed = self.allow.allows(&address);
            if !allowed {
                self.metrics.connection_refused("allowlist");
                log::debug!("connection from {address} refused: not in --allow-from");
            }
            let (code, text) = if allowed {
                ("200", "OK")
            } else {
                ("400", "address not allowed")
            };
            let request_id = std::mem::replace(&mut self.frames[1], Message::new());
            let reply = [
                Message::from("1.0"),
                request_id,
                Message::from(code),
                Message::from(text),
                Message::new(),
                Message::new(),
            ];
            if let Err(e) = send_frames(&self.socket, reply, zmq::DONTWAIT) {
                log::error!("ZAP handler: reply failed: {e}");
            }
        }
    }
}

/// `broker keygen`: prints a new CURVE key pair in the format the key-file flags read.
pub fn keygen() -> std::process::ExitCode {
    if zmq::has("curve") != Some(true) {
        eprintln!("error: this libzmq was built without CURVE (libsodium)");
        return std::process::ExitCode::FAILURE;
    }
    match zmq::CurveKeyPair::new() {
        Ok(pair) => {
            let z85 = |key: &[u8; 32]| zmq::z85_encode(key).unwrap_or_default();
            println!(
                "# CURVE key pair (Z85). The public key may be shared; keep the secret one secret."
            );
            println!("public-key = \"{}\"", z85(&pair.public_key));
            println!("secret-key = \"{}\"", z85(&pair.secret_key));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot generate a key pair: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_matches_networks_and_mapped_addresses() {
        let allow = Allowlist::new(vec![
            "127.0.0.1/32".parse().expect("net"),
            "10.0.0.0/8".parse().expect("net"),
            "fd00::/8".parse().expect("net"),
        ]);
        assert!(allow.allows("127.0.0.1"));
        assert!(!allow.allows("127.0.0.2"));
        assert!(allow.allows("10.1.2.3"));
        assert!(allow.allows("::ffff:10.9.9.9"));
        assert!(allow.allows("fd12::1"));
        assert!(!allow.allows("192.168.1.1"));
        assert!(!allow.allows("not an address"));
        assert!(!Allowlist::default().allows("127.0.0.1"));
    }
}
