//! Client-side CURVE: the broker's public key and the client's own key pair, read from flags,
//! environment variables and key files, and applied to every socket the tools open.
//!
//! A key file is what `broker keygen` prints (`public-key = "..."` and `secret-key = "..."`
//! lines, Z85), or a file holding one bare Z85 key. Keys are 40 Z85 characters (32 bytes).

use std::path::Path;

use clap::Args;

/// A CURVE key (32 bytes).
pub type Key = [u8; 32];

/// A key or key file that cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not 40 Z85 characters.
    #[error("{what}: not a CURVE key (expected 40 Z85 characters)")]
    Malformed {
        /// Which key.
        what: String,
    },
    /// The file could not be read.
    #[error("{path}: {why}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// The file has no key of the wanted kind.
    #[error("{path}: no {kind} key found")]
    Missing {
        /// The file.
        path: String,
        /// `public` or `secret`.
        kind: &'static str,
    },
    /// Only some of the client's CURVE settings were given.
    #[error("CURVE needs both --curve-server-key and --curve-key-file")]
    Incomplete,
}

/// The Z85 alphabet (ZeroMQ RFC 32).
const Z85: &[u8] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

/// Decodes a Z85 key.
pub fn decode_key(text: &str, what: &str) -> Result<Key, KeyError> {
    let text = text.trim().trim_matches('"');
    let malformed = || KeyError::Malformed { what: what.into() };
    // libzmq's decoder does not check the alphabet: a stray character would decode quietly.
    if text.len() != 40 || !text.bytes().all(|b| Z85.contains(&b)) {
        return Err(malformed());
    }
    zmq::z85_decode(text)
        .ok()
        .and_then(|bytes| Key::try_from(bytes.as_slice()).ok())
        .ok_or_else(malformed)
}

/// Encodes a key as Z85.
pub fn encode_key(key: &Key) -> String {
    // 32 bytes is a multiple of 4, the only thing Z85 encoding can refuse.
    zmq::z85_encode(key).unwrap_or_default()
}

/// Reads the `kind` key (`"public"` or `"secret"`) from a key file: a `<kind>-key = "..."`
/// line, or the only key in a file that holds one bare key.
pub fn read_key_file(path: &Path, kind: &'static str) -> Result<Key, KeyError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| KeyError::File {
        path: shown.clone(),
        why: e.to_string(),
    })?;
    parse_key_text(&text, kind, &shown)
}

/// The `kind` key in a key file's `text` (see [`read_key_file`]).
pub fn parse_key_text(text: &str, kind: &'static str, path: &str) -> Result<Key, KeyError> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let prefix = format!("{kind}-key");
    fn named(line: &str) -> Option<(&str, &str)> {
        let (name, value) = line.split_once('=')?;
        let name = name.trim();
        matches!(name, "public-key" | "secret-key").then_some((name, value))
    }
    for line in &lines {
        if let Some((name, value)) = named(line) {
            if name == prefix {
                return decode_key(value, &format!("{path}: {prefix}"));
            }
        }
    }
    match lines.as_slice() {
        // A bare key (which may itself contain '=', a Z85 character).
        [bare] if named(bare).is_none() => decode_key(bare, path),
        _ => Err(KeyError::Missing {
            path: path.into(),
            kind,
        }),
    }
}

/// How a client socket authenticates.
#[derive(Clone, Debug, Default)]
pub enum Security {
    /// Plain ZMTP (the NULL mechanism).
    #[default]
    None,
    /// CURVE with the broker's public key and the client's key pair.
    Curve {
        /// The broker's public key.
        server: Key,
        /// This client's public key (the broker's allow file lists it).
        public: Key,
        /// This client's secret key.
        secret: Key,
    },
}

impl Security {
    /// Configures `socket` before it connects.
    pub fn apply(&self, socket: &zmq::Socket) -> Result<(), crate::retry::Error> {
        let err = |what| move |e| crate::retry::Error::Zmq(what, e);
        if let Security::Curve {
            server,
            public,
            secret,
        } = self
        {
            socket.set_curve_serverkey(server).map_err(err("curve"))?;
            socket.set_curve_publickey(public).map_err(err("curve"))?;
            socket.set_curve_secretkey(secret).map_err(err("curve"))?;
        }
        Ok(())
    }
}

/// CURVE flags shared by `broker probe` and `broker bench`.
#[derive(Clone, Debug, Default, Args)]
pub struct CurveArgs {
    /// The broker's CURVE public key (Z85); with --curve-key-file, connect with CURVE.
    #[arg(long, env = "BROKER_CURVE_SERVER_KEY")]
    pub curve_server_key: Option<String>,
    /// This client's key pair, as `broker keygen` writes it.
    #[arg(long, env = "BROKER_CURVE_KEY_FILE")]
    pub curve_key_file: Option<std::path::PathBuf>,
}

impl CurveArgs {
    /// The security these flags ask for.
    pub fn security(&self) -> Result<Security, KeyError> {
        match (&self.curve_server_key, &self.curve_key_file) {
            (None, None) => Ok(Security::None),
            (Some(server), Some(file)) => Ok(Security::Curve {
                server: decode_key(server, "--curve-server-key")?,
                public: read_key_file(file, "public")?,
                secret: read_key_file(file, "secret")?,
            }),
            _ => Err(KeyError::Incomplete),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_files_parse() {
        let pair = zmq::CurveKeyPair::new().expect("libzmq with CURVE");
        let public = encode_key(&pair.public_key);
        let secret = encode_key(&pair.secret_key);
        assert_eq!(decode_key(&public, "k"), Ok(pair.public_key));
        let file = format!("# a comment\npublic-key = \"{public}\"\nsecret-key = \"{secret}\"\n");
        assert_eq!(parse_key_text(&file, "secret", "f"), Ok(pair.secret_key));
        assert_eq!(parse_key_text(&file, "public", "f"), Ok(pair.public_key));
        assert_eq!(
            parse_key_text(&format!("{secret}\n"), "secret", "f"),
            Ok(pair.secret_key)
        );
        assert!(matches!(
            parse_key_text("public-key = \"x\"", "secret", "f"),
            Err(KeyError::Missing { .. })
        ));
        assert!(matches!(
            decode_key("short", "k"),
            Err(KeyError::Malformed { .. })
        ));
        assert!(matches!(
            decode_key(&"\x01".repeat(40), "k"),
            Err(KeyError::Malformed { .. })
        ));
    }
}
