//! Built-in handlers: `echo` (the default), `sleep` (for drain and liveness tests and demos)
//! and `cpu` (a fixed amount of real computation, for autoscaling demos).

use std::time::Duration;

use crate::{Frame, Handler, HandlerError};

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
        let millis = parse_ascii_u64(request.first().map(|f| &f[..]).unwrap_or_default())
            .ok_or_else(|| {
                HandlerError::bad_request("sleep: first frame must be milliseconds in ASCII digits")
            })?;
        std::thread::sleep(Duration::from_millis(millis).min(self.max));
        Ok(request)
    }
}

/// Runs `rounds` iterations of a hash over the request (or the rounds given as ASCII digits in
/// the first frame, when it parses), then echoes the body. Real CPU work, so utilisation and
/// CPU-based autoscaling respond to it.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    /// Rounds when the request does not say.
    pub rounds: u64,
    /// The most rounds a request can ask for.
    pub max_rounds: u64,
}

impl Handler for Cpu {
    fn handle(&mut self, mut request: Vec<Frame>) -> Result<Vec<Frame>, HandlerError> {
        let rounds = request
            .first()
            .and_then(|f| parse_ascii_u64(f))
            .unwrap_or(self.rounds)
            .min(self.max_rounds);
        let digest = spin(rounds, request.first().map(|f| &f[..]).unwrap_or_default());
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

/// Parses a non-empty run of ASCII digits, optionally surrounded by ASCII white space.
fn parse_ascii_u64(bytes: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
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
        for bad in [&b""[..], b"abc", b"-5", b"1.5", b"\xff"] {
            let err = sleep.handle(frames(&[bad])).expect_err("bad input");
            assert_eq!(err.code, shared::ErrorCode::BadRequest);
        }
    }

    #[test]
    fn cpu_echoes_and_appends_a_digest() {
        let mut cpu = Cpu {
            rounds: 10,
            max_rounds: 100,
        };
        let reply = cpu.handle(frames(&[b"hello"])).expect("cpu");
        assert_eq!(reply.len(), 2);
        assert_eq!(&reply[0][..], b"hello");
        assert_eq!(spin(10, b"hello").to_le_bytes(), reply[1][..]);
        assert_ne!(spin(10, b"hello"), spin(11, b"hello"));
    }
}
