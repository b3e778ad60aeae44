//! One driver thread of a load run: its share of the client sockets, their windows or
//! schedules, and the check of every reply against the request it answers.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use nix::time::{clock_gettime, ClockId};
use shared::protocol::{parse_timeout_header, timeout_header, ErrorCode, STATUS_ERR, STATUS_OK};

use super::{Error, Report};

/// A body of `size` bytes whose first 8 will carry the request id; the rest is a pattern
/// that differs per driver thread, so a reply crossed between clients is caught.
pub(super) fn body_template(size: usize, thread: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (i.wrapping_mul(31) ^ thread.wrapping_mul(131)) as u8)
        .collect()
}

/// One client socket and its outstanding requests, a slot per window position.
struct Client {
    socket: zmq::Socket,
    /// Per slot: the sequence number and the (intended) send time of its request.
    slots: Vec<Option<(u32, Instant)>>,
    free: Vec<u32>,
    seq: u32,
    next_send: Instant,
}

/// One driver thread's share of the plan.
pub(super) struct Driver {
    /// This thread's share of `Plan::requests`.
    pub requests: Option<u64>,
    /// When the sending phase ends.
    pub deadline: Instant,
    /// Open loop: the time between two sends of one client.
    pub interval: Option<Duration>,
    pub window: usize,
    /// Each request's budget: what its deadline header says, and when its reply is late.
    pub timeout: Duration,
    /// Send the deadline header after each envelope.
    pub deadline_header: bool,
    pub verify: bool,
    pub raw: bool,
    pub first_frame: Option<Vec<u8>>,
    /// The body sent, its first 8 bytes rewritten per request.
    pub template: Vec<u8>,
}

/// How a reply checked out.
enum Checked {
    /// An OK that matched its request, sent (or due) at this time.
    Ok(Instant),
    /// An ERR with this code.
    Err(Cow<'static, str>),
    Mismatch,
}

impl Driver {
    pub(super) fn run(
        mut self,
        sockets: Vec<zmq::Socket>,
        started: Instant,
    ) -> Result<Report, Error> {
        let cpu_started = thread_cpu();
        let count = sockets.len().max(1);
        let mut clients: Vec<Client> = sockets
            .into_iter()
            .enumerate()
            .map(|(i, socket)| Client {
                socket,
                slots: vec![None; self.window],
                free: (0..self.window as u32).rev().collect(),
                seq: 0,
                // Stagger open-loop clients across one interval.
                next_send: started
                    + self
                        .interval
                        .map_or(Duration::ZERO, |iv| iv.mul_f64(i as f64 / count as f64)),
            })
            .collect();
        let mut report = Report::empty();
        let mut sending = true;
        let mut outstanding = 0usize;
        let mut drain_until = None;
        let mut frames: Vec<zmq::Message> = Vec::with_capacity(6);
        loop {
            let now = Instant::now();
            if sending && (now >= self.deadline || self.requests.is_some_and(|n| report.sent >= n))
            {
                sending = false;
                report.elapsed = now - started;
                drain_until = Some(now + self.timeout);
            }
            if !sending && (outstanding == 0 || drain_until.is_some_and(|d| now >= d)) {
                report.lost = outstanding as u64;
                if report.elapsed.is_zero() {
                    report.elapsed = now - started;
                }
                let wall = started.elapsed().as_secs_f64().max(1e-9);
                report.driver_cpu = (thread_cpu() - cpu_started) / wall;
                return Ok(report);
            }
            let (next_due, blocked) = if sending {
                self.send_due(&mut clients, now, &mut report, &mut outstanding)?
            } else {
                (None, false)
            };
            // Wait for replies, until the next scheduled send, or the end of a phase.
            let limit = if sending {
                self.deadline
            } else {
                drain_until.unwrap_or(now)
            };
            let wait = if blocked {
                Duration::from_millis(1)
            } else {
                next_due
                    .unwrap_or(limit)
                    .min(limit)
                    .saturating_duration_since(Instant::now())
            };
            let mut items: Vec<zmq::PollItem> = clients
                .iter()
                .map(|c| c.socket.as_poll_item(zmq::POLLIN))
                .collect();
            let ready = match zmq::poll(&mut items, wait.as_micros().div_ceil(1000) as i64) {
                Ok(n) => n,
                Err(zmq::Error::EINTR) => 0,
                Err(e) => return Err(Error::Zmq("poll", e)),
            };
            if ready == 0 {
                continue;
            }
            let readable: Vec<bool> = items.iter().map(|i| i.is_readable()).collect();
            drop(items);
            for (client, readable) in clients.iter_mut().zip(readable) {
                if !readable {
                    continue;
                }
                loop {
                    match shared::socket::recv_frames(&client.socket, zmq::DONTWAIT, &mut frames) {
                        Ok(()) => {}
                        Err(zmq::Error::EAGAIN) => break,
                        Err(e) => return Err(Error::Zmq("recv", e)),
                    }
                    let done = Instant::now();
                    match self.check(&frames, client) {
                        Some(checked) => {
                            outstanding -= 1;
                            match checked {
                                // The client stopped waiting at its timeout: work done for
                                // nobody, not a success.
                                Checked::Ok(intended) if done > intended + self.timeout => {
                                    report.late += 1;
                                }
                                Checked::Ok(intended) => {
                                    report.ok += 1;
                                    let us = done.saturating_duration_since(intended).as_micros();
                                    let _ = report.latency.record((us as u64).max(1));
                                }
                                Checked::Err(code) => match report.errors.get_mut(&*code) {
                                    Some(n) => *n += 1,
                                    None => {
                                        report.errors.insert(code.into_owned(), 1);
                                    }
                                },
                                Checked::Mismatch => report.mismatched += 1,
                            }
                        }
                        // Not ours at all: counted, frees nothing.
                        None => report.mismatched += 1,
                    }
                }
            }
        }
    }

    /// Sends what each client's window (closed loop) or schedule (open loop) allows. Returns
    /// the next scheduled send and whether a send found no connected peer.
    fn send_due(
        &mut self,
        clients: &mut [Client],
        now: Instant,
        report: &mut Report,
        outstanding: &mut usize,
    ) -> Result<(Option<Instant>, bool), Error> {
        let mut next_due: Option<Instant> = None;
        for client in clients.iter_mut() {
            while self.requests.is_none_or(|n| report.sent < n) {
                let intended = match self.interval {
                    Some(_) if client.next_send > now => {
                        let due = client.next_send;
                        next_due = Some(next_due.map_or(due, |d| d.min(due)));
                        break;
                    }
                    Some(_) => client.next_send,
                    None => now,
                };
                let Some(slot) = client.free.pop() else { break };
                let seq = client.seq.wrapping_add(1);
                let id = (u64::from(slot) << 32 | u64::from(seq)).to_be_bytes();
                self.template[..8].copy_from_slice(&id);
                let socket = &client.socket;
                let more = zmq::DONTWAIT | zmq::SNDMORE;
                let sent = socket
                    .send(&id[..], more)
                    .and_then(|()| socket.send("", more))
                    .and_then(|()| match self.deadline_header {
                        // What is left of the budget when it leaves: an open-loop request
                        // sent behind its schedule has less than the whole timeout.
                        true => socket.send(
                            timeout_header(
                                (intended + self.timeout).saturating_duration_since(Instant::now()),
                            ),
                            more,
                        ),
                        false => Ok(()),
                    })
                    .and_then(|()| match &self.first_frame {
                        Some(first) => socket.send(&first[..], more),
                        None => Ok(()),
                    })
                    .and_then(|()| socket.send(&self.template[..], zmq::DONTWAIT));
                match sent {
                    Ok(()) => {}
                    // Not connected yet (ZMQ_IMMEDIATE): the first frame is refused whole.
                    Err(zmq::Error::EAGAIN) => {
                        client.free.push(slot);
                        return Ok((next_due, true));
                    }
                    Err(e) => return Err(Error::Zmq("send", e)),
                }
                client.seq = seq;
                client.slots[slot as usize] = Some((seq, intended));
                report.sent += 1;
                *outstanding += 1;
                if let Some(iv) = self.interval {
                    client.next_send += iv;
                }
            }
        }
        Ok((next_due, false))
    }

    /// Matches a reply to its request by the id in its envelope and checks it. `None` when it
    /// answers no outstanding request of this client.
    fn check(&self, frames: &[zmq::Message], client: &mut Client) -> Option<Checked> {
        let id: [u8; 8] = frames.first()?.as_ref().try_into().ok()?;
        if !frames.get(1)?.is_empty() {
            return None;
        }
        let raw = u64::from_be_bytes(id);
        let (slot, seq) = ((raw >> 32) as usize, raw as u32);
        let (expected, intended) = (*client.slots.get(slot)?)?;
        if expected != seq {
            return None;
        }
        client.slots[slot] = None;
        client.free.push(slot as u32);
        let body = if self.raw {
            &frames[2..]
        } else {
            match frames.get(2).map(|f| &f[..]) {
                Some(STATUS_OK) => &frames[3..],
                Some(STATUS_ERR) => return Some(Checked::Err(error_code(frames.get(3)))),
                _ => return Some(Checked::Mismatch),
            }
        };
        // A server that does not know the deadline header (a bare echo) returns it: it is
        // what was sent, not a mismatch.
        let body = match body.split_first() {
            Some((first, rest))
                if self.deadline_header && matches!(parse_timeout_header(first), Some(Ok(_))) =>
            {
                rest
            }
            _ => body,
        };
        if self.verify {
            let echo = match (body, &self.first_frame) {
                ([echo], None) => echo,
                ([first, echo], Some(sent)) if first[..] == sent[..] => echo,
                _ => return Some(Checked::Mismatch),
            };
            if !same_but_id(echo, &self.template, &id) {
                return Some(Checked::Mismatch);
            }
        }
        Some(Checked::Ok(intended))
    }
}

/// The code frame of an `ERR` reply as the report counts it: a known code, an unknown one kept
/// as it came when it looks like a code (a newer server's, say), or `malformed`.
fn error_code(frame: Option<&zmq::Message>) -> Cow<'static, str> {
    let Some(code) = frame else {
        return Cow::Borrowed("malformed");
    };
    if let Some(known) = ErrorCode::from_bytes(code) {
        return Cow::Borrowed(known.as_str());
    }
    let looks_like_a_code = (1..=32).contains(&code.len())
        && code
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_');
    match looks_like_a_code {
        true => Cow::Owned(String::from_utf8_lossy(code).into_owned()),
        false => Cow::Borrowed("malformed"),
    }
}

/// True when `echo` is the template with `id` in its first 8 bytes (the template has moved
/// on to later ids since this request was sent).
fn same_but_id(echo: &[u8], template: &[u8], id: &[u8; 8]) -> bool {
    echo.len() == template.len() && echo[..8] == id[..] && echo[8..] == template[8..]
}

/// This thread's CPU time, in seconds.
fn thread_cpu() -> f64 {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_kept_known_or_new_and_garbage_is_malformed() {
        let code = |bytes: &[u8]| error_code(Some(&zmq::Message::from(bytes))).into_owned();
        assert_eq!(code(b"overloaded"), "overloaded");
        assert_eq!(code(b"deadline_exceeded"), "deadline_exceeded");
        assert_eq!(code(b"quota_exceeded"), "quota_exceeded");
        assert_eq!(code(b"Overloaded!"), "malformed");
        assert_eq!(code(b""), "malformed");
        assert_eq!(code(&[b'a'; 33]), "malformed");
        assert_eq!(error_code(None), "malformed");
    }
}
