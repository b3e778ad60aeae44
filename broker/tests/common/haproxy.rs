//! haproxy in TCP mode, standing in for kube-proxy in front of brokers: `balance roundrobin`
//! (or `random`, as kube-proxy's iptables mode) picks a broker per connection, each broker's
//! /readyz is its health check, and servers declared disabled can be enabled live through the
//! runtime API (pods an autoscaler adds).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::{eventually, free_port, stable_port, Broker, EVENT_TIMEOUT};

/// One broker behind the balancer: its front and admin ports, and whether it takes
/// connections from the start.
#[derive(Clone, Copy, Debug)]
pub struct Server {
    /// The broker's ZeroMQ port.
    pub zmq: u16,
    /// The broker's admin port (health-checked on /readyz).
    pub admin: u16,
    /// Off until [`Haproxy::enable`] (declared up front, as haproxy needs every server).
    pub disabled: bool,
}

/// Starts a broker with `args` on ports of its own (stable ones: haproxy is told them), and
/// waits until it serves: its place behind the balancer, in the rotation unless `disabled`.
pub fn broker_behind(args: &[&str], disabled: bool) -> (Broker, Server) {
    let (zmq, admin) = (stable_port(), stable_port());
    let front = format!("tcp://127.0.0.1:{zmq}");
    let admin_addr = format!("127.0.0.1:{admin}");
    let mut all = vec!["--frontend", &front, "--admin", &admin_addr];
    all.extend_from_slice(args);
    let broker = Broker::spawn_exact(&all, &[], zmq, admin);
    broker.wait_for_log("state starting -> serving", EVENT_TIMEOUT);
    (
        broker,
        Server {
            zmq,
            admin,
            disabled,
        },
    )
}

/// A running haproxy; killed on drop.
pub struct Haproxy {
    child: Child,
    port: u16,
    stats: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Haproxy {
    /// Starts haproxy in front of `servers` (named `b0`, `b1`, ... in order), balancing
    /// round-robin, and waits until it sees every server in the rotation up.
    pub fn start(servers: &[Server]) -> Haproxy {
        Haproxy::start_balancing(servers, "roundrobin")
    }

    /// As [`Haproxy::start`], with haproxy's `balance` algorithm `balance`.
    pub fn start_balancing(servers: &[Server], balance: &str) -> Haproxy {
        let dir = std::env::temp_dir().join(format!(
            "broker-haproxy-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let port = free_port();
        let stats = dir.join("stats.sock");
        let mut config = format!(
            "global\n  maxconn 4000\n  stats socket {} level admin\n\
             defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n\
             frontend zmq\n  bind 127.0.0.1:{port}\n  default_backend brokers\n\
             backend brokers\n  balance {balance}\n  option httpchk GET /readyz\n\
             \x20 default-server inter 100ms fall 1 rise 1\n",
            stats.display()
        );
        for (i, server) in servers.iter().enumerate() {
            config.push_str(&format!(
                "  server b{i} 127.0.0.1:{} check port {}{}\n",
                server.zmq,
                server.admin,
                if server.disabled { " disabled" } else { "" }
            ));
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy runs (scripts/setup installs it)");
        let haproxy = Haproxy {
            child,
            port,
            stats,
            _dir: TempDir(dir),
        };
        eventually("haproxy stats socket", EVENT_TIMEOUT, || {
            haproxy.statuses().is_some()
        });
        for (i, server) in servers.iter().enumerate() {
            if !server.disabled {
                haproxy.wait_status(i, "UP");
            }
        }
        haproxy
    }

    /// The address clients connect to.
    pub fn endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// One runtime API command; its answer.
    fn command(&self, line: &str) -> Option<String> {
        let mut stream = UnixStream::connect(&self.stats).ok()?;
        stream.write_all(format!("{line}\n").as_bytes()).ok()?;
        let mut answer = String::new();
        for l in BufReader::new(stream).lines().map_while(Result::ok) {
            answer.push_str(&l);
            answer.push('\n');
        }
        Some(answer)
    }

    /// Server name -> status ("UP", "DOWN", "MAINT", ...), from the stats socket.
    pub fn statuses(&self) -> Option<Vec<(String, String)>> {
        let answer = self.command("show stat")?;
        let mut rows = Vec::new();
        for line in answer.lines() {
            let cols: Vec<&str> = line.split(',').collect();
            if cols.len() > 17 && cols[0] == "brokers" && cols[1].starts_with('b') {
                rows.push((cols[1].to_owned(), cols[17].to_owned()));
            }
        }
        Some(rows)
    }

    /// Waits until haproxy reports server `server` with a status starting with `status`.
    pub fn wait_status(&self, server: usize, status: &str) {
        let name = format!("b{server}");
        eventually(
            &format!("haproxy sees {name} {status}"),
            EVENT_TIMEOUT,
            || {
                self.statuses().is_some_and(|rows| {
                    rows.iter()
                        .any(|(n, s)| *n == name && s.starts_with(status))
                })
            },
        );
    }

    /// Takes a server declared disabled into the rotation, and waits until it is up.
    pub fn enable(&self, server: usize) {
        let answer = self
            .command(&format!("set server brokers/b{server} state ready"))
            .expect("haproxy runtime API");
        assert!(answer.trim().is_empty(), "haproxy refused: {answer}");
        self.wait_status(server, "UP");
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
