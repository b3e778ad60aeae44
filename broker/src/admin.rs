//! The admin HTTP server: `/metrics`, `/livez` (alias `/healthz`) and `/readyz`, served by hyper
//! on its own named thread with a current-thread runtime, apart from the ZeroMQ data path. It
//! keeps answering through the drain. Idle, slow or malformed clients cannot starve the probes:
//! headers must arrive within [`HEADER_TIMEOUT`], and when [`MAX_CONNECTIONS`] are open the
//! oldest is closed to make room, so a new connection (a kubelet probe) is always served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use shared::Metrics;
use tokio::sync::{oneshot, Notify};

use crate::lifecycle::Status;

/// A client gets this long to send its request headers (a probe sends them at once).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// No connection lives longer than this, keep-alive included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections open at once; a new one beyond it closes the oldest.
pub const MAX_CONNECTIONS: usize = 256;
/// The Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Starting the admin server failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address could not be bound.
    #[error("cannot bind admin address {addr}: {source}")]
    Bind {
        /// `--admin`.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The thread or its runtime could not start.
    #[error("cannot start the admin thread: {0}")]
    Start(std::io::Error),
}

/// The running admin server; [`Admin::stop`] ends and joins it.
pub struct Admin {
    shutdown: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

/// A listening TCP socket on `addr` whose accept queue is as long as the system allows
/// (`SOMAXCONN`, 4096; the kernel caps it at `net.core.somaxconn`): room for a burst of
/// connections (a header flood, a fleet of scrapers), so a probe's SYN is not dropped and
/// retransmitted a second later, as with std's listener (128).
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType};
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // As std does: a restarted broker can bind while old connections are in TIME_WAIT.
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::bind(fd.as_raw_fd(), &socket::SockaddrStorage::from(addr))?;
    socket::listen(&fd, Backlog::MAXCONN)?;
    Ok(std::net::TcpListener::from(fd))
}

impl Admin {
    /// Binds `addr` now (so a taken port fails start-up) and serves on the `admin` thread.
    pub fn spawn(
        addr: SocketAddr,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
    ) -> Result<Admin, Error> {
        let bind_error = |source| Error::Bind { addr, source };
        let listener = listen(addr).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Start)?;
        let (shutdown, stop) = oneshot::channel();
        let thread = thread::Builder::new()
            .name("admin".into())
            .spawn(move || {
                let state = Arc::new(AdminState { status, metrics });
                if let Err(e) = runtime.block_on(serve(listener, state, stop)) {
                    log::error!("admin server failed: {e}");
                }
            })
            .map_err(Error::Start)?;
        log::info!("admin server on http://{addr}");
        Ok(Admin { shutdown, thread })
    }

    /// Stops accepting, drops open connections and joins the thread.
    pub fn stop(self) {
        let _ = self.shutdown.send(());
        if self.thread.join().is_err() {
            log::error!("admin thread panicked");
        }
    }
}

struct AdminState {
    status: Arc<Status>,
    metrics: Arc<Metrics>,
}

/// The open connections, oldest first, each with the means to close it.
#[derive(Default)]
struct Live {
    next_id: u64,
    open: std::collections::VecDeque<(u64, Arc<Notify>)>,
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<AdminState>,
    mut stop: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let live = Arc::new(Mutex::new(Live::default()));
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut stop => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                // Out of fds and the like: keep serving the connections we have.
                Err(e) => {
                    log::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let close = Arc::new(Notify::new());
        let id = {
            let mut live = live.lock();
            if live.open.len() >= MAX_CONNECTIONS {
                // The oldest connection is the likeliest to be idle; the newest may be a probe.
                if let Some((_, oldest)) = live.open.pop_front() {
                    oldest.notify_one();
                }
            }
            live.next_id += 1;
            let id = live.next_id;
            live.open.push_back((id, Arc::clone(&close)));
            id
        };
        let (state, live) = (Arc::clone(&state), Arc::clone(&live));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {}
                () = close.notified() => {}
            }
            live.lock().open.retain(|(open, _)| *open != id);
        });
    }
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(path, "/metrics" | "/livez" | "/healthz" | "/readyz");
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => metrics(state),
        "/readyz" => match state.status.not_ready_because() {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => match state.status.live() {
            Ok(()) => text(StatusCode::OK, "live\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not live: {why}\n"),
            ),
        },
    }
}

fn metrics(state: &AdminState) -> Response<Full<Bytes>> {
    state.metrics.set_stuck(state.status.stuck_workers());
    match state.metrics.encode() {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            response
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
