//! Why replies are dropped, connections refused and connections reset: typed reasons whose
//! labels are the metric label values, so a misspelt reason does not compile instead of
//! silently not being counted. Every series is pre-registered from these lists.

/// An enum of metric reasons: its variants, their labels, [`ALL`](DropReason::ALL) in label
/// order and [`index`](DropReason::index) into it, for per-reason tables without hashing.
macro_rules! reasons {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every reason, in a fixed order (pre-registration and tallies walk it).
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The metric label (and log word).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }

            /// Position in [`Self::ALL`].
            pub const fn index(self) -> usize {
                self as usize
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

reasons! {
    /// Why a reply could not be delivered (`broker_replies_dropped_total{reason}`).
    DropReason {
        /// The client disconnected before its reply left.
        PeerGone => "peer_gone",
        /// The client is not reading: its queue is at the high-water mark or holds
        /// `--max-connection-bytes`.
        Hwm => "hwm",
        /// All connections together hold `--max-buffered-bytes`.
        Budget => "budget",
        /// The broker reset the connection (over a bound, stalled, or its key revoked) with
        /// replies still queued or still being handled.
        Reset => "reset",
        /// The broker closed the connection for its age (`--max-connection-age`) with the
        /// request still held: at the grace, or a request that crossed the close.
        Age => "age",
    }
}

reasons! {
    /// Why a connection was refused (`broker_connections_refused_total{reason}`).
    RefusalReason {
        /// Its address is outside `--allow-from`.
        Allowlist => "allowlist",
        /// `--max-connections` were open.
        Limit => "limit",
        /// Its CURVE public key is not in `--curve-allow-keys`.
        ClientKey => "client_key",
        /// Its CURVE handshake could not be decrypted (it has the wrong server key).
        ServerKey => "server_key",
        /// It did not speak CURVE to a CURVE front (a plaintext client), or the reverse.
        Mechanism => "mechanism",
        /// It hung up before finishing its handshake (a plaintext client that noticed the
        /// mismatch before the broker did shows here), sent malformed or out-of-order
        /// commands, or did not finish within `--stall-timeout`.
        Handshake => "handshake",
    }
}

reasons! {
    /// Why the broker closed a connection it had accepted
    /// (`broker_connections_reset_total{reason}`). A connection refused at accept is not
    /// reset: it is counted as refused ([`RefusalReason::Limit`]).
    ResetReason {
        /// Held more than `--max-connection-bytes` in one direction.
        Oversized => "oversized",
        /// Held bytes without progress (no complete request, or no reply read) for
        /// `--stall-timeout`.
        Stalled => "stalled",
        /// Among the largest holders while all connections together held more than
        /// `--max-buffered-bytes`.
        Budget => "budget",
        /// Among the largest holders while the process was near its memory limit.
        Memory => "memory",
        /// Its CURVE key was removed from `--curve-allow-keys`.
        Revoked => "revoked",
        /// Older than `--max-connection-age`: closed at a moment it held no request, so its
        /// client reconnects (through a balancer, perhaps to another pod).
        Age => "age",
        /// Older than `--max-connection-age` plus `--max-connection-age-grace` and never
        /// quiet: closed with what it held.
        AgeGrace => "age_grace",
    }
}

reasons! {
    /// Why a request was not run (`broker_requests_refused_total{reason}`); its client got
    /// `ERR overloaded`, `ERR deadline_exceeded` or `ERR draining`.
    RefusedReason {
        /// At the door: the wait predicted from the queue and the mean service time was over
        /// the queue target while a queue stood.
        PredictedWait => "predicted_wait",
        /// At a worker: it had waited longer than the queue target (plus a service time)
        /// while a queue stood.
        QueueTime => "queue_time",
        /// Its deadline had passed, or the predicted wait was longer than its budget.
        DeadlineExceeded => "deadline_exceeded",
        /// `--max-inflight` requests were held.
        MaxInflight => "max_inflight",
        /// It would have taken the held bytes over `--max-inflight-bytes`.
        MaxInflightBytes => "max_inflight_bytes",
        /// Its connection's held requests and unread replies were at half of
        /// `--max-connection-bytes`.
        MaxConnectionBytes => "max_connection_bytes",
        /// The process was near its memory limit.
        Memory => "memory",
        /// The broker was draining.
        Draining => "draining",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_indices_follow_all() {
        fn check<T: Copy + PartialEq + std::fmt::Debug>(
            all: &[T],
            label: fn(T) -> &'static str,
            index: fn(T) -> usize,
        ) {
            for (i, reason) in all.iter().enumerate() {
                assert_eq!(index(*reason), i, "{reason:?}");
                let text = label(*reason);
                assert!(
                    text.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                    "{text}"
                );
                assert_eq!(
                    all.iter().filter(|r| label(**r) == text).count(),
                    1,
                    "{text}"
                );
            }
        }
        check(DropReason::ALL, DropReason::as_str, DropReason::index);
        check(
            RefusalReason::ALL,
            RefusalReason::as_str,
            RefusalReason::index,
        );
        check(ResetReason::ALL, ResetReason::as_str, ResetReason::index);
        check(
            RefusedReason::ALL,
            RefusedReason::as_str,
            RefusedReason::index,
        );
    }
}
