//! A memory cgroup for one broker process, limited as its pod would be: the kernel OOM-kills
//! the broker if it ever exceeds the limit, and the cgroup records its peak. cgroup v1 (the
//! memory controller these machines mount at /sys/fs/cgroup/memory) or v2 with the memory
//! controller delegated; `None` where neither can be created (the tests then rely on the
//! process's peak resident size alone, and say so).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct MemoryCgroup {
    pub dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    pub fn create(limit: u64) -> Option<MemoryCgroup> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "broker-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let path = path.trim_end_matches('/');
            let (dir, v2) = if controllers.split(',').any(|c| c == "memory") {
                (
                    PathBuf::from(format!("/sys/fs/cgroup/memory{path}/{name}")),
                    false,
                )
            } else if controllers.is_empty()
                && std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cgroup.subtree_control"))
                    .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
            {
                (PathBuf::from(format!("/sys/fs/cgroup{path}/{name}")), true)
            } else {
                continue;
            };
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let cgroup = MemoryCgroup { dir, v2 };
            let limit_file = if v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            if std::fs::write(cgroup.dir.join(limit_file), limit.to_string()).is_err() {
                continue;
            }
            if !v2 {
                // No swap to hide in.
                let _ = std::fs::write(cgroup.dir.join("memory.swappiness"), "0");
            }
            return Some(cgroup);
        }
        None
    }

    /// The file a process writes its pid to, to join.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// The most memory the cgroup ever held.
    pub fn peak(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// How many times the kernel OOM-killed a process in the cgroup.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Empty once the broker has exited; a failure only leaves an empty directory.
        let _ = std::fs::remove_dir(&self.dir);
    }
}
