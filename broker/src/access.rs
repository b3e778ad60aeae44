//! Access control for the front socket: a ZAP handler (ZeroMQ's authentication protocol,
//! RFC 27) that accepts a connection only when its peer address is in `--allow-from` and, with
//! CURVE, its public key is in `--curve-allow-keys`. The coordinator polls the handler's
//! socket next to its others, so no thread is added and the socket closes with the
//! coordinator. Without either setting no handler is installed and every peer is accepted
//! (rely on the NetworkPolicy then; see docs/security.md).
//!
//! The allow file is re-read when it changes (a Kubernetes Secret update swaps a symlink; an
//! editor renames a new file in place): new connections see the new keys at once, and the
//! coordinator resets open connections whose key was removed.

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use shared::curve::{self, Key, KeyError};
use shared::metrics::REFUSAL_REASONS;
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

/// What identifies one version of a file: a rename or a Secret update changes the inode, an
/// edit in place the size or times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        // Follows symlinks: a Secret's file is a link through `..data`, which the kubelet
        // swaps atomically on update.
        let m = std::fs::metadata(path)?;
        Ok(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The client keys of `--curve-allow-keys`, as last read.
#[derive(Clone, Debug)]
pub struct AllowKeys {
    path: PathBuf,
    stamp: Option<Stamp>,
    keys: Vec<Key>,
}

/// What [`AllowKeys::refresh`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Refresh {
    /// The file has not changed.
    Unchanged,
    /// The file changed and its keys are now in force; `removed` keys were dropped.
    Reloaded {
        /// Keys now allowed.
        keys: usize,
        /// Keys no longer allowed.
        removed: usize,
    },
    /// The file changed but cannot be used; the previous keys stay in force.
    Failed(String),
}

impl AllowKeys {
    /// Reads the file; an unreadable or malformed file, or one without keys, is an error.
    pub fn load(path: &Path) -> Result<AllowKeys, KeyError> {
        let stamp = Stamp::of(path).ok();
        Ok(AllowKeys {
            path: path.to_owned(),
            stamp,
            keys: curve::read_allow_file(path)?,
        })
    }

    /// How many keys are in force.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True if no key is in force (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Is `key` allowed?
    pub fn allows(&self, key: &Key) -> bool {
        self.keys.binary_search(key).is_ok()
    }

    /// Re-reads the file if it changed since the last read.
    pub fn refresh(&mut self) -> Refresh {
        let stamp = match Stamp::of(&self.path) {
            Ok(stamp) => stamp,
            // Gone (a Secret mid-update, a careless operator): keep what is in force.
            Err(e) if self.stamp.is_some() => {
                self.stamp = None;
                return Refresh::Failed(format!("{}: {e}", self.path.display()));
            }
            Err(_) => return Refresh::Unchanged,
        };
        if self.stamp == Some(stamp) {
            return Refresh::Unchanged;
        }
        self.stamp = Some(stamp);
        match curve::read_allow_file(&self.path) {
            Ok(keys) => {
                let removed = self.keys.iter().filter(|k| keys.binary_search(k).is_err());
                let removed = removed.count();
                self.keys = keys;
                Refresh::Reloaded {
                    keys: self.keys.len(),
                    removed,
                }
            }
            Err(e) => Refresh::Failed(e.to_string()),
        }
    }
}

/// Refused connections: counted in the metrics at once, logged as one summary line a
/// second at most, so a flood of refused handshakes cannot flood the log.
pub struct Refusals {
    metrics: Arc<Metrics>,
    counts: [u64; REFUSAL_REASONS.len()],
    last_peer: Option<String>,
    next_log: std::time::Instant,
}

impl Refusals {
    /// How often at most a summary is logged.
    pub const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

    /// No refusals yet.
    pub fn new(metrics: Arc<Metrics>) -> Refusals {
        Refusals {
            metrics,
            counts: [0; REFUSAL_REASONS.len()],
            last_peer: None,
            next_log: std::time::Instant::now(),
        }
    }

    /// A connection was refused for `reason` (one of `REFUSAL_REASONS`), from `peer` if known.
    pub fn note(&mut self, reason: &'static str, peer: Option<String>) {
        self.metrics.connection_refused(reason);
        if let Some(i) = REFUSAL_REASONS.iter().position(|r| *r == reason) {
            self.counts[i] += 1;
        }
        if peer.is_some() {
            self.last_peer = peer;
        }
    }

    /// Logs what was refused since the last summary, if any and if one is due.
    pub fn log_if_due(&mut self, now: std::time::Instant) {
        if now < self.next_log || self.counts.iter().all(|&n| n == 0) {
            return;
        }
        self.next_log = now + Self::LOG_EVERY;
        let total: u64 = self.counts.iter().sum();
        let parts: Vec<String> = REFUSAL_REASONS
            .iter()
            .zip(&self.counts)
            .filter(|(_, &n)| n > 0)
            .map(|(reason, n)| format!("{n} {reason}"))
            .collect();
        let from = self
            .last_peer
            .take()
            .map_or(String::new(), |p| format!(" (latest from {p})"));
        log::warn!("refused {total} connections: {}{from}", parts.join(", "));
        self.counts = [0; REFUSAL_REASONS.len()];
    }
}

/// What the ZAP handler checks.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// `--allow-from`, if set.
    pub networks: Option<Allowlist>,
    /// `--curve-allow-keys`, if set.
    pub keys: Option<AllowKeys>,
}

impl Policy {
    /// True if anything is checked (a handler is needed).
    pub fn checks(&self) -> bool {
        self.networks.is_some() || self.keys.is_some()
    }
}

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
                Err(("handshake", "malformed ZAP request"))
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
    fn check(&self) -> Result<String, (&'static str, &'static str)> {
        if let Some(networks) = &self.policy.networks {
            if !networks.allows(&String::from_utf8_lossy(&self.frames[3])) {
                return Err(("allowlist", "address not allowed"));
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
            (Some(_), _) => Err(("client_key", "client key not allowed")),
            (None, key) => Ok(key.map(|k| curve::encode_key(&k)).unwrap_or_default()),
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

    #[test]
    fn allow_keys_follow_the_file_and_keep_the_old_keys_when_it_breaks() {
        let dir = std::env::temp_dir().join(format!("broker-allow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("allow");
        let key = || zmq::CurveKeyPair::new().expect("curve").public_key;
        let (a, b) = (key(), key());
        let write = |keys: &[Key], extra: &str| {
            // Write and rename, as the kubelet and editors do.
            let text: String = keys.iter().map(|k| curve::encode_key(k) + "\n").collect();
            std::fs::write(dir.join("new"), text + extra).expect("write");
            std::fs::rename(dir.join("new"), &path).expect("rename");
        };
        write(&[a], "");
        let mut allow = AllowKeys::load(&path).expect("load");
        assert!(allow.allows(&a) && !allow.allows(&b));
        assert_eq!(allow.refresh(), Refresh::Unchanged);
        write(&[b], "");
        assert_eq!(
            allow.refresh(),
            Refresh::Reloaded {
                keys: 1,
                removed: 1
            }
        );
        assert!(allow.allows(&b) && !allow.allows(&a));
        write(&[a], "garbage\n");
        assert!(matches!(allow.refresh(), Refresh::Failed(_)));
        assert!(allow.allows(&b), "a broken file changes nothing");
        std::fs::remove_file(&path).expect("remove");
        assert!(matches!(allow.refresh(), Refresh::Failed(_)));
        assert!(allow.allows(&b), "a missing file changes nothing");
        write(&[a, b], "");
        assert_eq!(
            allow.refresh(),
            Refresh::Reloaded {
                keys: 2,
                removed: 0
            }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
