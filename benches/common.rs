//! Bench support: the systems compared (the broker binary, libzmq's own proxy pool, a
//! one-socket ROUTER echo), CPU pinning, and a pipelined DEALER load driver.

#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// Pins the calling thread (and the threads it starts later) to `core`, when the machine has it.
pub fn pin(core: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if core >= cores {
        return;
    }
    let mut set = CpuSet::new();
    if set.set(core).is_ok() {
        let _ = sched_setaffinity(Pid::from_raw(0), &set);
    }
}

/// Unpins the calling thread.
pub fn unpin() {
    let mut set = CpuSet::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for core in 0..cores {
        let _ = set.set(core);
    }
    let _ = sched_setaffinity(Pid::from_raw(0), &set);
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A server under test, listening on `endpoint`.
pub struct Server {
    pub endpoint: String,
    child: Option<Child>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = nix::sys::signal::kill(
                Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
        // In-process servers keep their idle threads until the bench process exits.
    }
}

/// The real broker binary (echo handler), pinned to `core` with taskset.
pub fn broker(core: usize, workers: usize, extra: &[&str]) -> Server {
    let endpoint = format!("tcp://127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let workers = workers.to_string();
    let mut args = vec![
        "-c".to_string(),
        core.to_string(),
        env!("CARGO_BIN_EXE_broker").to_string(),
    ];
    for a in [
        "--frontend",
        &endpoint,
        "--admin",
        &admin,
        "--workers",
        &workers,
        "--max-inflight",
        "100000",
        "--log-level",
        "warn",
    ]
    .iter()
    .chain(extra)
    {
        args.push(a.to_string());
    }
    let child = Command::new("taskset")
        .args(&args)
        .stdout(Stdio::null())
        .spawn()
        .expect("taskset + broker start (util-linux)");
    let server = Server {
        endpoint,
        child: Some(child),
    };
    wait_ready(&server.endpoint);
    server
}

fn wait_ready(endpoint: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker::probe::probe_zmq(endpoint, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "server at {endpoint} never answered"
        );
    }
}

/// libzmq's own proxy: ROUTER front, inproc DEALER back, `workers` echo threads. No metrics,
/// no drain logic: the bare limit for the broker's shape.
pub fn zmq_proxy(core: usize, workers: usize) -> Server {
    let endpoint = format!("tcp://127.0.0.1:{}", free_port());
    let bind = endpoint.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        pin(core); // the context's I/O thread and the workers inherit it
        let ctx = zmq::Context::new();
        let front = ctx.socket(zmq::ROUTER).expect("router");
        front.bind(&bind).expect("bind");
        let back = ctx.socket(zmq::DEALER).expect("dealer");
        back.bind("inproc://proxy-workers").expect("bind inproc");
        for _ in 0..workers {
            let socket = ctx.socket(zmq::DEALER).expect("worker");
            socket.connect("inproc://proxy-workers").expect("connect");
            thread::spawn(move || {
                let mut frames = Vec::new();
                loop {
                    if shared::socket::recv_frames(&socket, 0, &mut frames).is_err() {
                        return;
                    }
                    if shared::socket::send_frames(&socket, frames.drain(..), 0).is_err() {
                        return;
                    }
                }
            });
        }
        let _ = ready_tx.send(());
        let _ = zmq::proxy(&front, &back);
    });
    let _ = ready_rx.recv();
    Server {
        endpoint,
        child: None,
    }
}

/// One ROUTER socket echoing on one thread: no hop at all.
pub fn router_echo(core: usize) -> Server {
    let endpoint = format!("tcp://127.0.0.1:{}", free_port());
    let bind = endpoint.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        pin(core);
        let ctx = zmq::Context::new();
        let socket = ctx.socket(zmq::ROUTER).expect("router");
        socket.bind(&bind).expect("bind");
        let _ = ready_tx.send(());
        let mut frames = Vec::new();
        loop {
            if shared::socket::recv_frames(&socket, 0, &mut frames).is_err() {
                return;
            }
            let _ = shared::socket::send_frames(&socket, frames.drain(..), 0);
        }
    });
    let _ = ready_rx.recv();
    Server {
        endpoint,
        child: None,
    }
}

/// Pipelined DEALER clients (with the empty delimiter, which every system here accepts).
pub struct Driver {
    _ctx: zmq::Context,
    sockets: Vec<zmq::Socket>,
    window: usize,
    body: Vec<u8>,
}

impl Driver {
    pub fn connect(endpoint: &str, clients: usize, window: usize, size: usize) -> Driver {
        let ctx = zmq::Context::new();
        let sockets = (0..clients)
            .map(|_| {
                let s = ctx.socket(zmq::DEALER).expect("dealer");
                s.set_linger(0).expect("linger");
                s.set_sndhwm(0).expect("hwm");
                s.set_rcvhwm(0).expect("hwm");
                s.connect(endpoint).expect("connect");
                s
            })
            .collect();
        let driver = Driver {
            _ctx: ctx,
            sockets,
            window,
            body: vec![0x5A; size],
        };
        driver.run(200); // connections up, caches warm
        driver
    }

    /// Sends `requests` requests keeping `window` outstanding per client; returns the time
    /// until the last reply.
    pub fn run(&self, requests: u64) -> Duration {
        let started = Instant::now();
        let mut sent = 0u64;
        let mut received = 0u64;
        let mut outstanding = vec![0usize; self.sockets.len()];
        for (i, socket) in self.sockets.iter().enumerate() {
            while outstanding[i] < self.window && sent < requests {
                self.send(socket);
                outstanding[i] += 1;
                sent += 1;
            }
        }
        let mut frames = Vec::with_capacity(4);
        while received < requests {
            let mut items: Vec<zmq::PollItem> = self
                .sockets
                .iter()
                .map(|s| s.as_poll_item(zmq::POLLIN))
                .collect();
            zmq::poll(&mut items, 5_000).expect("poll");
            let readable: Vec<bool> = items.iter().map(|i| i.is_readable()).collect();
            assert!(readable.iter().any(|r| *r), "no reply within 5 s");
            for (i, socket) in self.sockets.iter().enumerate() {
                if !readable[i] {
                    continue;
                }
                while shared::socket::recv_frames(socket, zmq::DONTWAIT, &mut frames).is_ok() {
                    received += 1;
                    outstanding[i] -= 1;
                    if sent < requests {
                        self.send(socket);
                        outstanding[i] += 1;
                        sent += 1;
                    }
                }
            }
        }
        started.elapsed()
    }

    fn send(&self, socket: &zmq::Socket) {
        socket.send("", zmq::SNDMORE).expect("send");
        socket.send(&self.body[..], 0).expect("send");
    }
}
