//! `--curve-allow-keys`: the client keys allowed, as last read, and the watcher that re-reads
//! the file when it changes (a Kubernetes Secret update swaps a symlink; an editor renames a
//! new file in place). A broken or missing file keeps the keys in force.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use shared::curve::{self, Key, KeyError};

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

#[cfg(test)]
mod tests {
    use super::*;

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
