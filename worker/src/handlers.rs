//! Built-in handlers: `echo` (the default), `sleep` (for drain and liveness tests and demos)
//! and `cpu` (a fixed amount of real computation, for autoscaling demos).

use std::time::Duration;

use crate::{Context, Frame, Handler, HandlerError};

/// Replies with the request body, unchanged and uncopied.
#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

impl Handler for Echo {
    fn handle(&mut self, request: Vec<Frame>) -> Result<Vec<Frame>, HandlerError> {
        Ok(request)
    }
}

/// Sleeps for the milliseconds given as ASCII digits in the first body frame, capped at `max`,
/// then echoes the body.
#[derive(Clone, Copy, Debug)]
pub struct Sleep {
    /// The longest sleep a request can ask for (`--max-sleep`).
    pub max: Duration,
}

impl Handler for Sleep {
    fn handle(&mut self, request: Vec<Frame>) -> Result<Vec<Frame>, HandlerError> {
        self.handle_with(request, &Context::default())
    }

    /// Sleeps no longer than the client waits: with a deadline closer than the sleep asked
    /// for, it sleeps until the deadline and answers `ERR deadline_exceeded`, as a handler
    /// that watches its budget would.
    fn handle_with(
        &mut self,
        request: Vec<Frame>,
        context: &Context,
    ) -> Result<Vec<Frame>, HandlerError> {
        let millis = parse_ascii_u64(request.first().map(|f| &f[..]).unwrap_or_default())
            .ok_or_else(|| {
                HandlerError::bad_request("sleep: first frame must be milliseconds in ASCII digits")
            })?;
        let asked = Duration::from_millis(millis).min(self.max);
        match context.time_left() {
            Some(left) if left < asked => {
                std::thread::sleep(left);
                Err(HandlerError::deadline_exceeded(format!(
                    "sleep: the deadline came {} ms into a {} ms sleep",
                    left.as_millis(),
                    asked.as_millis()
                )))
            }
            _ => {
                std::thread::sleep(asked);
                Ok(request)
            }
        }
    }
}

/// Runs a fixed number of hash rounds, then echoes the body with an 8-byte digest appended.
/// Real CPU work, so utilisation and CPU-based autoscaling respond to it. The cost of a request
/// is bounded by `rounds` whatever it carries: each round hashes at most [`SEED_BYTES`] of the
/// first frame plus the round number, so a large frame costs no more than a small one.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    /// Rounds per request (`--cpu-rounds`); a request may ask for fewer with an ASCII number
    /// in its first frame, never for more.
    pub rounds: u64,
}

/// How much of the first frame seeds the hash.
pub const SEED_BYTES: usize = 64;

impl Handler for Cpu {
    fn handle(&mut self, mut request: Vec<Frame>) -> Result<Vec<Frame>, HandlerError> {
        let first = request.first().map(|f| &f[..]).unwrap_or_default();
        let rounds = parse_ascii_u64(first).map_or(self.rounds, |asked| asked.min(self.rounds));
        let digest = spin(rounds, &first[..first.len().min(SEED_BYTES)]);
        // Keep the echo contract; the digest proves the work was not optimised away.
        request.push(Frame::from(&digest.to_le_bytes()[..]));
        Ok(request)
    }
}

/// FNV-1a over `seed`, `rounds` times: cheap to write, impossible for the optimiser to skip.
fn spin(rounds: u64, seed: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for round in 0..rounds {
        for &byte in seed.iter().chain(&round.to_le_bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    std::hint::black_box(hash)
}

/// Parses a non-empty run of ASCII digits, optionally surrounded by ASCII white space (and
/// nothing else: the protocol says ASCII, so an ideographic or no-break space is refused).
fn parse_ascii_u64(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(parts: &[&[u8]]) -> Vec<Frame> {
        parts.iter().map(|p| Frame::from(*p)).collect()
    }

    #[test]
    fn echo_returns_the_body() {
        let reply = Echo.handle(frames(&[b"a", b"", b"c"])).expect("echo");
        let reply: Vec<&[u8]> = reply.iter().map(|f| &f[..]).collect();
        assert_eq!(reply, [b"a".as_slice(), b"", b"c"]);
    }

    #[test]
    fn sleep_parses_and_caps() {
        let mut sleep = Sleep {
            max: Duration::from_millis(1),
        };
        let reply = sleep
            .handle(frames(&[b" 100000 ", b"x"]))
            .expect("capped sleep");
        assert_eq!(&reply[1][..], b"x");
        let ideographic = "\u{3000}5".as_bytes();
        let no_break = "5\u{a0}".as_bytes();
        for bad in [
            &b""[..],
            b"abc",
            b"-5",
            b"1.5",
            b"\xff",
            ideographic,
            no_break,
        ] {
            let err = sleep.handle(frames(&[bad])).expect_err("bad input");
            assert_eq!(err.code, shared::ErrorCode::BadRequest);
        }
    }

    #[test]
    fn sleep_stops_at_the_deadline() {
        let mut sleep = Sleep {
            max: Duration::from_secs(10),
        };
        let deadline = std::time::Instant::now() + Duration::from_millis(20);
        let err = sleep
            .handle_with(frames(&[b"5000"]), &Context::new(Some(deadline)))
            .expect_err("the deadline comes first");
        assert_eq!(err.code, shared::ErrorCode::DeadlineExceeded);
        let later = std::time::Instant::now() + Duration::from_secs(10);
        let reply = sleep
            .handle_with(frames(&[b"1", b"x"]), &Context::new(Some(later)))
            .expect("time enough");
        assert_eq!(&reply[1][..], b"x");
    }

    #[test]
    fn cpu_echoes_and_appends_a_digest() {
        let mut cpu = Cpu { rounds: 10 };
        let reply = cpu.handle(frames(&[b"hello"])).expect("cpu");
        assert_eq!(reply.len(), 2);
        assert_eq!(&reply[0][..], b"hello");
        assert_eq!(spin(10, b"hello").to_le_bytes(), reply[1][..]);
        assert_ne!(spin(10, b"hello"), spin(11, b"hello"));
        // A request may ask for fewer rounds, never more.
        let reply = cpu.handle(frames(&[b"3"])).expect("cpu");
        assert_eq!(spin(3, b"3").to_le_bytes(), reply[1][..]);
        let reply = cpu.handle(frames(&[b"99999999999"])).expect("cpu");
        assert_eq!(spin(10, b"99999999999").to_le_bytes(), reply[1][..]);
    }

    #[test]
    fn cpu_cost_does_not_grow_with_the_frame() {
        // Only the seed prefix is hashed per round: a 1 MiB frame hashes what 64 bytes do.
        let big = vec![b'x'; 1 << 20];
        let mut cpu = Cpu { rounds: 1000 };
        let reply = cpu.handle(vec![Frame::from(&big[..])]).expect("cpu");
        assert_eq!(spin(1000, &big[..SEED_BYTES]).to_le_bytes(), reply[1][..]);
    }
}
