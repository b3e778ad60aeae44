//! Peers that are not the broker, for the tools' tests: a ZeroMQ service (a real ROUTER socket
//! on a free loopback port) that answers every request with what a function makes of its body,
//! the way an echo service or a server that does not know the broker's protocol would.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use crossbeam_channel::Receiver;
use shared::protocol::envelope_len;

/// A ZeroMQ ROUTER answering each request's body with `reply(body)` behind the request's own
/// envelope (so REQ and DEALER clients get their answers), until dropped.
pub struct ZmqService {
    /// Where it listens (`tcp://127.0.0.1:PORT`).
    pub endpoint: String,
    /// The body (the frames after the envelope) of every request it answered.
    pub bodies: Receiver<Vec<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ZmqService {
    /// Binds a free port and starts answering.
    pub fn start(reply: fn(&[Vec<u8>]) -> Vec<Vec<u8>>) -> ZmqService {
        let ctx = zmq::Context::new();
        let socket = ctx.socket(zmq::ROUTER).expect("router");
        socket.set_linger(1000).expect("linger");
        socket.set_sndhwm(0).expect("sndhwm");
        socket.bind("tcp://127.0.0.1:0").expect("bind");
        let endpoint = socket
            .get_last_endpoint()
            .expect("endpoint")
            .expect("utf-8");
        let (tx, bodies) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                // Looks at the stop flag every 50 ms while idle.
                if socket.poll(zmq::POLLIN, 50).expect("poll") == 0 {
                    continue;
                }
                let mut frames = socket.recv_multipart(0).expect("recv");
                let body = frames.split_off(envelope_len(&frames).unwrap_or(frames.len()));
                frames.extend(reply(&body));
                let _ = tx.send(body);
                socket.send_multipart(frames, 0).expect("reply");
            }
        });
        ZmqService {
            endpoint,
            bodies,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ZmqService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
