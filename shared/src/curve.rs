//! CURVE keys as the broker and its tools read them: Z85 text (ZeroMQ RFC 32), 40 characters
//! for a 32-byte key.
//!
//! - A key file is what `broker keygen` prints (`public-key = "..."` and `secret-key = "..."`
//!   lines, `#` comments), or a file holding one bare key.
//! - An allow file lists client public keys, one a line (bare, quoted, or as a
//!   `public-key = "..."` line), with `#` comment lines and blank lines.

use std::fmt;
use std::io::Read;
use std::path::Path;

/// A CURVE key (32 bytes).
pub type Key = [u8; 32];

/// A secret key: never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub Key);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

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
    /// Two keys of the same kind: which one was meant is a guess.
    #[error("{path}: more than one {kind}-key line")]
    Twice {
        /// The file.
        path: String,
        /// `public` or `secret`.
        kind: &'static str,
    },
    /// A line of an allow file that is neither a public key nor a comment.
    #[error("{path}, line {line}: {why}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// Only some of a client's CURVE settings were given.
    #[error("CURVE needs --curve-key-file and --curve-server-key (or --curve-server-key-file)")]
    Incomplete,
}

/// The Z85 alphabet (ZeroMQ RFC 32).
const Z85: &[u8] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

/// Decodes a Z85 key (surrounding blanks and quotes ignored).
pub fn decode_key(text: &str, what: &str) -> Result<Key, KeyError> {
    try_decode(text).ok_or_else(|| KeyError::Malformed { what: what.into() })
}

fn try_decode(text: &str) -> Option<Key> {
    let text = text.trim().trim_matches('"');
    // libzmq's decoder does not check the alphabet: a stray character would decode quietly.
    if text.len() != 40 || !text.bytes().all(|b| Z85.contains(&b)) {
        return None;
    }
    let key = Key::try_from(zmq::z85_decode(text).ok()?.as_slice()).ok()?;
    // Nor overflow: a group above 2^32 - 1 (such as "#####") wraps. Canonical text only.
    (encode_key(&key) == text).then_some(key)
}

/// Encodes a key as Z85.
pub fn encode_key(key: &Key) -> String {
    // 32 bytes is a multiple of 4, the only thing Z85 encoding can refuse.
    zmq::z85_encode(key).unwrap_or_default()
}

/// Largest key file read: a key pair with comments is under 200 bytes.
const MAX_KEY_FILE: u64 = 64 * 1024;
/// Largest allow file read: about 100,000 keys. Parsing runs on the coordinator thread (about
/// 1.2 us a key), so this also bounds how long a reload holds requests up (about 120 ms).
pub const MAX_ALLOW_FILE: u64 = 4 * 1024 * 1024;

/// Reads a regular file of at most `limit` bytes as text (a leading byte-order mark dropped).
/// The file is opened non-blocking and checked after opening, so a FIFO swapped in at any
/// moment cannot block the thread, and a device (`/dev/zero`) is never read.
fn read(path: &Path, limit: u64) -> Result<String, KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |why: String| KeyError::File {
        path: path.display().to_string(),
        why,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(|e| fail(e.to_string()))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    if bytes.len() as u64 > limit {
        return Err(fail(format!("larger than {limit} bytes")));
    }
    let text = String::from_utf8(bytes).map_err(|_| fail("not UTF-8 text".into()))?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    })
}

/// Reads the `kind` key (`"public"` or `"secret"`) from a key file: a `<kind>-key = "..."`
/// line, or the only key in a file that holds one bare key.
pub fn read_key_file(path: &Path, kind: &'static str) -> Result<Key, KeyError> {
    parse_key_text(
        &read(path, MAX_KEY_FILE)?,
        kind,
        &path.display().to_string(),
    )
}

/// Splits a `public-key = "..."` or `secret-key = "..."` line.
fn named(line: &str) -> Option<(&str, &str)> {
    let (name, value) = line.split_once('=')?;
    let name = name.trim();
    matches!(name, "public-key" | "secret-key").then_some((name, value))
}

/// The `kind` key in a key file's `text` (see [`read_key_file`]).
pub fn parse_key_text(text: &str, kind: &'static str, path: &str) -> Result<Key, KeyError> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let prefix = format!("{kind}-key");
    let mut found = lines
        .iter()
        .filter_map(|line| named(line))
        .filter(|(name, _)| *name == prefix);
    if let Some((_, value)) = found.next() {
        if found.next().is_some() {
            return Err(KeyError::Twice {
                path: path.into(),
                kind,
            });
        }
        return decode_key(value, &format!("{path}: {prefix}"));
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

/// Reads a key pair file (both `public-key` and `secret-key` lines, as `broker keygen`
/// writes them): a bare key cannot say which half it is.
pub fn read_key_pair(path: &Path) -> Result<(Key, SecretKey), KeyError> {
    parse_key_pair(&read(path, MAX_KEY_FILE)?, &path.display().to_string())
}

/// The public and secret keys of a key pair file's `text` (see [`read_key_pair`]).
pub fn parse_key_pair(text: &str, path: &str) -> Result<(Key, SecretKey), KeyError> {
    let find = |kind: &'static str| {
        let prefix = format!("{kind}-key");
        let mut found = text
            .lines()
            .filter_map(|line| named(line.trim()))
            .filter(|(name, _)| *name == prefix);
        match (found.next(), found.next()) {
            (Some((_, value)), None) => decode_key(value, &format!("{path}: {prefix}")),
            (Some(_), Some(_)) => Err(KeyError::Twice {
                path: path.into(),
                kind,
            }),
            (None, _) => Err(KeyError::Missing {
                path: path.into(),
                kind,
            }),
        }
    };
    Ok((find("public")?, SecretKey(find("secret")?)))
}

/// Reads an allow file: the client public keys it lists, sorted and without duplicates.
/// A file with no key is an error: it would lock every client out, and is more likely a file
/// caught half-written.
pub fn read_allow_file(path: &Path) -> Result<Vec<Key>, KeyError> {
    parse_allow_text(&read(path, MAX_ALLOW_FILE)?, &path.display().to_string())
}

/// The keys of an allow file's `text` (see [`read_allow_file`]).
pub fn parse_allow_text(text: &str, path: &str) -> Result<Vec<Key>, KeyError> {
    let mut keys = Vec::new();
    let bad = |line, why| KeyError::Line {
        path: path.into(),
        line,
        why,
    };
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        // '#' is a Z85 character, but no key starts with it (its group would exceed 2^32).
        if line.starts_with('#') {
            continue;
        }
        if let Some(key) = try_decode(line) {
            keys.push(key);
            continue;
        }
        match named(line) {
            Some(("public-key", value)) => {
                keys.push(try_decode(value).ok_or(bad(index + 1, "not a Z85 public key"))?)
            }
            Some(_) => return Err(bad(index + 1, "a secret key does not belong here")),
            None => return Err(bad(index + 1, "not a Z85 public key or a # comment")),
        }
    }
    if keys.is_empty() {
        return Err(KeyError::Missing {
            path: path.into(),
            kind: "public",
        });
    }
    keys.sort_unstable();
    keys.dedup();
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_key_files_parse() {
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
        assert_eq!(format!("{:?}", SecretKey(pair.secret_key)), "SecretKey(..)");
        assert_eq!(
            parse_key_pair(&file, "f"),
            Ok((pair.public_key, SecretKey(pair.secret_key)))
        );
        assert!(matches!(
            parse_key_pair(&format!("{secret}\n"), "f"),
            Err(KeyError::Missing { .. })
        ));
    }

    #[test]
    fn allow_files_list_keys_and_refuse_anything_else() {
        let keys: Vec<Key> = (0..3)
            .map(|_| zmq::CurveKeyPair::new().expect("curve").public_key)
            .collect();
        let z = |i: usize| encode_key(&keys[i]);
        let text = format!(
            "# clients\n\n{}\n  \"{}\"  \npublic-key = \"{}\"\n{}\n",
            z(0),
            z(1),
            z(2),
            z(0)
        );
        let mut want = keys.clone();
        want.sort_unstable();
        assert_eq!(parse_allow_text(&text, "f"), Ok(want));
        // Text that libzmq would decode with an overflow is not a key.
        assert!(decode_key(&"#".repeat(40), "k").is_err());

        let line = |text: &str| match parse_allow_text(text, "f") {
            Err(KeyError::Line { line, .. }) => Some(line),
            _ => None,
        };
        assert_eq!(line(&format!("{}\nnot a key\n", z(0))), Some(2));
        assert_eq!(line(&format!("{}\n{}x\n", z(0), z(1))), Some(2));
        assert_eq!(line(&format!("secret-key = \"{}\"\n", z(0))), Some(1));
        assert!(matches!(
            parse_allow_text("# nobody\n\n", "f"),
            Err(KeyError::Missing { .. })
        ));
    }

    #[test]
    fn key_files_are_read_only_from_small_regular_files() {
        let dir = std::env::temp_dir().join(format!("curve-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let pair = zmq::CurveKeyPair::new().expect("curve");
        let (public, secret) = (encode_key(&pair.public_key), encode_key(&pair.secret_key));
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let why = |result: Result<Vec<Key>, KeyError>| match result {
            Err(KeyError::File { why, .. }) => why,
            other => panic!("expected a file error, got {other:?}"),
        };
        // A device never ends; a directory is not a file.
        assert_eq!(
            why(read_allow_file(Path::new("/dev/zero"))),
            "not a regular file"
        );
        assert_eq!(why(read_allow_file(&dir)), "not a regular file");
        // A FIFO with no writer: opening it must not block (it may be swapped in between any
        // check and the open, so the open itself is non-blocking and checked after).
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(read_allow_file(&fifo)));
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading a FIFO blocked");
        assert_eq!(why(result), "not a regular file");
        let big = write("big", &format!("{public}\n").repeat(110_000));
        assert!(why(read_allow_file(&big)).starts_with("larger than"));
        // A byte-order mark (some editors write one) is not part of the first key.
        let bom = write("bom", &format!("\u{feff}{public}\r\n"));
        assert_eq!(read_allow_file(&bom), Ok(vec![pair.public_key]));
        // Two secret keys: which one was meant is a guess, so neither is used.
        let twice = write(
            "twice",
            &format!(
                "public-key = \"{public}\"\nsecret-key = \"{secret}\"\nsecret-key = \"{secret}\"\n"
            ),
        );
        assert!(matches!(read_key_pair(&twice), Err(KeyError::Twice { .. })));
        assert!(matches!(
            read_key_file(&twice, "secret"),
            Err(KeyError::Twice { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
