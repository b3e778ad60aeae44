//! Kubelet conformance: reads the Deployment that `kubectl kustomize deploy/overlays/production`
//! renders, starts the real binary with exactly its args and env, polls its probes as a kubelet
//! would (paths, ports, periods, timeouts, thresholds), and checks the pod contract: started
//! within the startup budget; on SIGTERM under load, failing the next readiness probe while
//! requests are still served; exit 0 well before terminationGracePeriodSeconds with every
//! request answered. A change to a probe, a port or a timing that breaks the contract fails here.
//! Readiness tolerates one failed answer: shedding for memory makes /readyz 503, and only
//! shedding that lasts the probe's failure threshold takes the pod out of its Services (the
//! readiness state kept as the kubelet keeps it, from the real probes of the real binary).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::deploy::{production_pod, secs};
use common::{free_port, Broker, Client, EVENT_TIMEOUT};
use nix::sys::signal::Signal;
use serde_yaml::Value;
use shared::protocol::Reply;
use shared::ErrorCode;

#[derive(Debug)]
enum Action {
    Http {
        path: String,
        port: u16,
    },
    /// The command, run with the container's environment (as the kubelet's exec does).
    Exec {
        argv: Vec<String>,
        env: Vec<(String, String)>,
    },
}

/// A probe as declared, with its port remapped to where the test runs the binary.
#[derive(Debug)]
struct Probe {
    action: Action,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    failure_threshold: u64,
}

impl Probe {
    fn parse(
        spec: &Value,
        ports: &HashMap<String, u16>,
        remap: &HashMap<u16, u16>,
        env: &HashMap<String, String>,
    ) -> Probe {
        let action = if let Some(http) = spec.get("httpGet") {
            let port = match &http["port"] {
                Value::String(name) => *ports
                    .get(name)
                    .unwrap_or_else(|| panic!("no port named {name}")),
                Value::Number(n) => n.as_u64().expect("port") as u16,
                other => panic!("probe port {other:?}"),
            };
            Action::Http {
                path: http["path"].as_str().unwrap_or("/").to_owned(),
                port: *remap
                    .get(&port)
                    .unwrap_or_else(|| panic!("probe port {port} is not a container port")),
            }
        } else if let Some(exec) = spec.get("exec") {
            let mut argv: Vec<String> = exec["command"]
                .as_sequence()
                .expect("exec command")
                .iter()
                .map(|a| a.as_str().expect("string arg").to_owned())
                .collect();
            assert_eq!(
                argv[0], "broker",
                "the image has only the broker binary (no shell)"
            );
            argv[0] = env!("CARGO_BIN_EXE_broker").to_owned();
            for arg in argv.iter_mut() {
                for (from, to) in remap {
                    *arg = arg.replace(&format!(":{from}"), &format!(":{to}"));
                }
            }
            Action::Exec {
                argv,
                env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            }
        } else {
            panic!("unsupported probe {spec:?}")
        };
        Probe {
            action,
            initial_delay: secs(&spec["initialDelaySeconds"], 0),
            period: secs(&spec["periodSeconds"], 10),
            timeout: secs(&spec["timeoutSeconds"], 1),
            failure_threshold: spec["failureThreshold"].as_u64().unwrap_or(3),
        }
    }

    /// Probes every period until one passes, as the kubelet runs a startup probe; fails with
    /// `what` once the failure threshold is reached. Returns the failures before the pass.
    fn until_success(&self, what: &str) -> u64 {
        let mut failures = 0;
        while !self.run() {
            failures += 1;
            assert!(
                failures < self.failure_threshold,
                "{what} ({failures} failures)"
            );
            thread::sleep(self.period);
        }
        failures
    }

    /// One probe, kubelet semantics: HTTP 200-399 within the timeout, or exit 0.
    fn run(&self) -> bool {
        match &self.action {
            Action::Http { path, port } => http_status(*port, path, self.timeout)
                .is_some_and(|(code, _)| (200..=399).contains(&code)),
            Action::Exec { argv, env } => {
                let mut child = Command::new(&argv[0])
                    .args(&argv[1..])
                    .env_clear()
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("exec probe starts");
                let deadline = Instant::now() + self.timeout;
                loop {
                    if let Some(status) = child.try_wait().expect("wait") {
                        return status.success();
                    }
                    if Instant::now() >= deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        return false;
                    }
                    thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

/// The container's `args` (none if it declares none).
fn container_args(container: &Value) -> Vec<String> {
    container["args"]
        .as_sequence()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().expect("arg").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A GET as the kubelet's prober sends it: (status, body) within `timeout`, or None (no
/// connection, or no answer in time: a failed probe).
fn http_status(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    let deadline = Instant::now() + timeout;
    stream.set_read_timeout(Some(timeout)).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: pod\r\nUser-Agent: kube-probe/1.30\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 1024];
    // Connection: close, so the answer ends at EOF.
    while Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(_) => return None,
        }
    }
    let text = String::from_utf8_lossy(&response);
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Some((code, body))
}

/// A pod's readiness as the kubelet keeps it: it turns unready after `failure_threshold`
/// failed probes in a row and ready after `success_threshold` passed ones.
struct KubeletReadiness {
    ready: bool,
    failures: u64,
    successes: u64,
    failure_threshold: u64,
    success_threshold: u64,
}

impl KubeletReadiness {
    /// For `probe`, declared by `spec` (which also gives the success threshold).
    fn new(probe: &Probe, spec: &Value) -> KubeletReadiness {
        KubeletReadiness {
            ready: false,
            failures: 0,
            successes: 0,
            failure_threshold: probe.failure_threshold,
            success_threshold: spec["successThreshold"].as_u64().unwrap_or(1),
        }
    }

    /// Records one probe result; returns the readiness after it.
    fn observe(&mut self, passed: bool) -> bool {
        if passed {
            self.failures = 0;
            self.successes += 1;
            if self.successes >= self.success_threshold {
                self.ready = true;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.failures >= self.failure_threshold {
                self.ready = false;
            }
        }
        self.ready
    }
}

fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {endpoint}"))
}

#[test]
fn production_deployment_contract_holds_for_the_real_binary() {
    let pod = production_pod();
    let container = &pod.container;
    let grace = pod.grace;
    let ports = pod.ports;
    let mut env = pod.env;

    // The ports the binary binds must be the ports the manifest declares and probes.
    let front = env.get("BROKER_FRONTEND").expect("BROKER_FRONTEND set");
    let admin = env.get("BROKER_ADMIN").expect("BROKER_ADMIN set");
    assert_eq!(
        port_of(front),
        ports["zmq"],
        "BROKER_FRONTEND port vs containerPort zmq"
    );
    assert_eq!(
        port_of(admin),
        ports["admin"],
        "BROKER_ADMIN port vs containerPort admin"
    );
    let workers: usize = env["BROKER_WORKERS"].parse().expect("workers");
    assert!(workers >= 1);

    // Timing contract: the drain fits in the grace period with room to spare.
    let delay = humantime::parse_duration(&env["BROKER_SHUTDOWN_DELAY"]).expect("delay");
    let drain = humantime::parse_duration(&env["BROKER_DRAIN_TIMEOUT"]).expect("drain");
    assert!(
        delay >= Duration::from_secs(2),
        "a shutdown delay lets endpoints update first"
    );
    assert!(
        delay + drain + Duration::from_secs(3) <= grace,
        "delay {delay:?} + drain {drain:?} + margin > grace {grace:?}"
    );

    // Run where the test can: same ports by role, on loopback.
    let (zmq_host, admin_host) = (free_port(), free_port());
    let remap = HashMap::from([(ports["zmq"], zmq_host), (ports["admin"], admin_host)]);
    env.insert(
        "BROKER_FRONTEND".into(),
        format!("tcp://127.0.0.1:{zmq_host}"),
    );
    env.insert("BROKER_ADMIN".into(), format!("127.0.0.1:{admin_host}"));
    let startup = Probe::parse(&container["startupProbe"], &ports, &remap, &env);
    let readiness = Probe::parse(&container["readinessProbe"], &ports, &remap, &env);
    let liveness = Probe::parse(&container["livenessProbe"], &ports, &remap, &env);
    // One slow or failed answer must not take the pod out of its Services; a terminating
    // pod's endpoints are removed by the endpoints controller, so readiness need not be quick
    // for the drain (docs/kubernetes.md, section 5): unready must still come before the exit.
    assert!(
        readiness.failure_threshold >= 2,
        "one failed readiness probe would remove the endpoint"
    );
    assert!(
        readiness.timeout >= Duration::from_secs(2),
        "a 1 s probe timeout fails on one slow answer under load"
    );
    assert!(
        liveness.period * liveness.failure_threshold as u32 >= Duration::from_secs(20),
        "liveness is tolerant"
    );

    let args = container_args(container);
    // Flags and env both name the endpoints; the env (remapped above) is the manifest's choice,
    // so the args must not override it.
    assert!(!args.iter().any(|a| a == "--frontend" || a == "--admin"));
    let env_pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut broker = Broker::spawn_exact(&arg_refs, &env_pairs, zmq_host, admin_host);

    // Startup: probe on schedule until success, within the declared budget.
    let started = Instant::now();
    thread::sleep(startup.initial_delay);
    let failures =
        startup.until_success("startup probe failed its threshold: the kubelet would kill the pod");
    eprintln!(
        "started after {:?} ({failures} failed startup probes)",
        started.elapsed()
    );
    assert!(readiness.run(), "ready once started");
    assert!(liveness.run(), "live once started");

    // Load: clients send until told the broker is draining.
    let stop = Arc::new(AtomicBool::new(false));
    let ok_after_term = Arc::new(AtomicU64::new(0));
    let term_sent = Arc::new(AtomicBool::new(false));
    let endpoint = format!("tcp://127.0.0.1:{zmq_host}");
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            let (endpoint, stop, ok_after_term, term_sent) = (
                endpoint.clone(),
                Arc::clone(&stop),
                Arc::clone(&ok_after_term),
                Arc::clone(&term_sent),
            );
            thread::spawn(move || {
                let client = Client::dealer(&endpoint, true);
                let (mut sent, mut answered) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) && sent < 1_000_000 {
                    client.send(&[b"kubelet"]);
                    sent += 1;
                    let Some(frames) = client.try_recv(EVENT_TIMEOUT) else {
                        break;
                    };
                    answered += 1;
                    match shared::protocol::parse_reply(frames).expect("well-formed") {
                        Reply::Ok(_) if term_sent.load(Ordering::Relaxed) => {
                            ok_after_term.fetch_add(1, Ordering::Relaxed);
                        }
                        Reply::Ok(_) => {}
                        Reply::Err {
                            code: ErrorCode::Draining,
                            ..
                        } => break,
                        Reply::Err { code, message } => panic!("ERR {code} {message}"),
                    }
                    // Pace the load so probes and the coordinator share two cores fairly.
                    thread::sleep(Duration::from_millis(1));
                }
                (sent, answered)
            })
        })
        .collect();
    // Let the load reach the broker before the signal.
    common::eventually("load flowing", EVENT_TIMEOUT, || {
        common::ok_count(&broker) >= 100
    });

    term_sent.store(true, Ordering::Relaxed);
    let term = Instant::now();
    broker.signal(Signal::SIGTERM);
    // The kubelet's next readiness probe may come at any moment of its period: by then the
    // probe must fail.
    common::eventually(
        "readiness fails within one probe period of SIGTERM",
        readiness.period,
        || !readiness.run(),
    );
    // Liveness keeps passing until exit; requests are still served during the delay.
    while term.elapsed() < delay.saturating_sub(Duration::from_millis(500)) {
        assert!(liveness.run(), "liveness failed during the shutdown delay");
        thread::sleep(liveness.period.min(Duration::from_millis(500)));
    }
    assert!(
        ok_after_term.load(Ordering::Relaxed) > 0,
        "no request served after SIGTERM (during the delay)"
    );

    let status = broker.wait_exit(grace);
    let took = term.elapsed();
    stop.store(true, Ordering::Relaxed);
    assert!(status.success(), "exit {status:?}");
    assert!(
        took + Duration::from_secs(5) < grace,
        "exit took {took:?}, grace {grace:?}"
    );
    let (mut sent, mut answered) = (0, 0);
    for loader in loaders {
        let (s, a) = loader.join().expect("loader");
        sent += s;
        answered += a;
    }
    assert_eq!(sent, answered, "every request got exactly one reply");
    common::assert_all_answered(&broker);
    eprintln!(
        "SIGTERM to exit {took:?} (grace {grace:?}); {sent} requests, {} OK after SIGTERM",
        ok_after_term.load(Ordering::Relaxed)
    );
}

/// Shedding as the kubelet sees it: the production pod, with a small memory limit so that
/// requests held by a slow handler push it past the guard's threshold. /readyz answers 503
/// ("shedding") while it sheds; the kubelet keeps the pod ready through the first failed probes
/// and takes it out only at the failure threshold, and puts it back once shedding stops.
#[test]
fn only_sustained_shedding_takes_the_pod_out_of_its_services() {
    // 85 % of 100 MiB is 85 MiB: the process at rest (about 9 MiB) plus some 76 requests of
    // 1 MiB held (the in-flight byte limit raised to let them in). Shedding stops new work and
    // ends below 75 %, once about 10 are answered: the two workers answer one each per 4 s, so
    // shedding lasts some 20 s, past three probe periods (5 s). Two requests per connection
    // keep each within the half of --max-connection-bytes (4 MiB) that admission gives work.
    const LIMIT: &str = "100MiB";
    const CONNECTIONS: usize = 45;
    const PER_CONNECTION: usize = 2;
    let pod = production_pod();
    let (zmq_host, admin_host) = (free_port(), free_port());
    let remap = HashMap::from([
        (pod.ports["zmq"], zmq_host),
        (pod.ports["admin"], admin_host),
    ]);
    let mut env = pod.env.clone();
    env.insert(
        "BROKER_FRONTEND".into(),
        format!("tcp://127.0.0.1:{zmq_host}"),
    );
    env.insert("BROKER_ADMIN".into(), format!("127.0.0.1:{admin_host}"));
    env.insert("BROKER_MEMORY_LIMIT".into(), LIMIT.into());
    env.insert("BROKER_MAX_INFLIGHT_BYTES".into(), "96MiB".into());
    env.insert("BROKER_HANDLER".into(), "sleep".into());
    // What is tested is the memory guard, not queue management: on a busy machine the load may
    // take longer to arrive than the first 4 s requests take to finish, and the queue (by then
    // standing) would shed what it holds before memory reaches the threshold.
    env.insert("BROKER_QUEUE_TARGET".into(), "60s".into());
    env.insert("BROKER_QUEUE_INTERVAL".into(), "60s".into());
    let env_pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let args = container_args(&pod.container);
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let broker = Broker::spawn_exact(&arg_refs, &env_pairs, zmq_host, admin_host);
    let startup = Probe::parse(&pod.container["startupProbe"], &pod.ports, &remap, &env);
    let spec = &pod.container["readinessProbe"];
    let readiness = Probe::parse(spec, &pod.ports, &remap, &env);
    let Action::Http { path, port } = &readiness.action else {
        panic!("the readiness probe is an HTTP GET")
    };
    startup.until_success("startup probe failed its threshold");
    let mut kubelet = KubeletReadiness::new(&readiness, spec);
    assert!(kubelet.observe(readiness.run()), "ready once started");

    // Requests that hold memory: 4 s of sleep and about 1 MiB each, read back by this thread.
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let (endpoint, stop) = (broker.front.clone(), Arc::clone(&stop));
        thread::spawn(move || {
            let clients: Vec<Client> = (0..CONNECTIONS)
                .map(|_| Client::dealer(&endpoint, true))
                .collect();
            // Just under --max-message-bytes (1 MiB, envelope included).
            let body = vec![b'm'; (1 << 20) - 4096];
            // One request in the air at a time, each sent once the broker has read the one
            // before (held or answered), until it sheds: memory climbs a request at a time on
            // any machine. All at once, on a busy machine, libzmq's buffers of dozens of
            // half-arrived megabytes spiked the resident size past the threshold while fewer
            // requests were held than keep it there, and shedding ended at once.
            let scrape = || {
                http_status(admin_host, "/metrics", Duration::from_secs(2))
                    .map(|(_, text)| text)
                    .unwrap_or_default()
            };
            // Requests the broker has read: held, or answered OK or overloaded (one scrape;
            // a failed scrape reads 0, and the wait goes on).
            let read = || {
                let text = scrape();
                [
                    "broker_inflight_requests",
                    "broker_requests_total{outcome=\"ok\"}",
                    "broker_requests_total{outcome=\"overloaded\"}",
                ]
                .iter()
                .map(|name| common::sample(&text, name))
                .filter(|v| !v.is_nan())
                .sum::<f64>()
            };
            'send: for client in &clients {
                for _ in 0..PER_CONNECTION {
                    if common::sample(&scrape(), "broker_memory_shedding") == 1.0 {
                        break 'send;
                    }
                    let before = read();
                    client.send(&[b"4000", &body]);
                    let deadline = Instant::now() + EVENT_TIMEOUT;
                    while read() < before + 1.0 {
                        assert!(Instant::now() < deadline, "a request was not read");
                        thread::sleep(Duration::from_millis(5)); // between scrapes
                    }
                }
            }
            let mut replies = 0;
            while replies < CONNECTIONS * PER_CONNECTION && !stop.load(Ordering::Relaxed) {
                for client in &clients {
                    if client.try_recv(Duration::from_millis(20)).is_some() {
                        replies += 1;
                    }
                }
            }
        })
    };
    // The loader sends a request at a time: on a busy machine that takes a while.
    let deadline = Instant::now() + 3 * EVENT_TIMEOUT;
    while common::metric(&broker, "broker_memory_shedding") != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the memory guard did not shed within {:?}: resident {} MiB, {} MiB \
             of requests held, {} connections reset\n{}",
            3 * EVENT_TIMEOUT,
            common::metric(&broker, "process_resident_memory_bytes") / 1048576.0,
            common::metric(&broker, "broker_inflight_bytes") / 1048576.0,
            common::metric(
                &broker,
                "broker_connections_reset_total{reason=\"oversized\"}"
            ),
            broker
                .http_get("/metrics")
                .1
                .lines()
                .filter(|l| l.starts_with("broker_requests"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        thread::sleep(Duration::from_millis(50)); // between scrapes
    }

    // The kubelet's probes, on the manifest's period: the first failures keep the pod in its
    // Services; the threshold-th takes it out.
    let mut failed_in_a_row = 0;
    let deadline = Instant::now() + readiness.period * (kubelet.failure_threshold as u32 + 2);
    while kubelet.ready {
        assert!(
            Instant::now() < deadline,
            "still ready after {failed_in_a_row} failed probes while shedding"
        );
        let answer = http_status(*port, path, readiness.timeout);
        let passed = answer
            .as_ref()
            .is_some_and(|(code, _)| (200..=399).contains(code));
        if !passed {
            failed_in_a_row += 1;
            let (code, body) = answer.expect("the broker answers /readyz while shedding");
            assert_eq!(code, 503);
            assert!(body.contains("shedding"), "/readyz says why: {body}");
        }
        if kubelet.observe(passed) {
            assert!(
                failed_in_a_row < kubelet.failure_threshold,
                "ready after {failed_in_a_row} failures"
            );
            thread::sleep(readiness.period); // the kubelet's probe period
        }
    }
    assert_eq!(
        failed_in_a_row, kubelet.failure_threshold,
        "out of the Services at the failure threshold, not before"
    );
    eprintln!("unready after {failed_in_a_row} failed probes while shedding");

    // Shedding ends as the held requests are answered: the next passing probe puts it back.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !kubelet.observe(readiness.run()) {
        assert!(
            Instant::now() < deadline,
            "not ready again within 60 s (shedding {})",
            common::metric(&broker, "broker_memory_shedding")
        );
        thread::sleep(readiness.period); // the kubelet's probe period
    }
    assert_eq!(common::metric(&broker, "broker_memory_shedding"), 0.0);
    stop.store(true, Ordering::Relaxed);
    loader.join().expect("loader");
}

/// The CURVE overlay as a kubelet would run it: the Secret's keys projected as files where the
/// volume is mounted, the env pointing into them, the startup probe (with the container's env)
/// passing over CURVE, an application key served and a plaintext client refused. No overlay
/// renders the Secret (applying would overwrite the real keys); the example of its layout
/// (deploy/examples) must not start a broker: its values are not keys.
#[test]
fn production_curve_pod_starts_from_its_secret_and_refuses_plaintext() {
    use client::security::SecretKey;
    use shared::curve::encode_key;

    const OVERLAY: &str = "production-curve";
    let pod = common::deploy::pod(OVERLAY);
    let objects = common::deploy::rendered(OVERLAY);
    assert!(
        objects.iter().all(|o| o["kind"] != "Secret"),
        "{OVERLAY} renders a Secret"
    );
    let example = common::deploy::repo().join("deploy/examples/curve-secret.yaml.example");
    let secret: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&example).expect("the example Secret"))
            .expect("the example is YAML");
    let volume = pod.spec["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["secret"].is_mapping())
        .expect("a Secret volume");
    assert_eq!(volume["secret"]["secretName"], secret["metadata"]["name"]);
    let mount = pod.container["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the Secret volume is mounted");
    assert_eq!(mount["readOnly"], true);
    // With subPath the kubelet never updates the file: keys could not rotate.
    assert!(
        mount.get("subPath").is_none(),
        "mounted whole, so updates reach it"
    );
    let mount_path = mount["mountPath"].as_str().expect("mountPath");
    let files: Vec<String> = secret["stringData"]
        .as_mapping()
        .expect("stringData")
        .keys()
        .map(|k| k.as_str().expect("key").to_owned())
        .collect();

    // Where the test projects the Secret, and the env remapped to it. Every file the env
    // names must be a key of the Secret.
    let dir = std::env::temp_dir().join(format!("broker-kubelet-curve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut env = pod.env.clone();
    for (name, value) in env.iter_mut() {
        if let Some(file) = value.strip_prefix(&format!("{mount_path}/")) {
            assert!(
                files.iter().any(|f| f == file),
                "{name} names {file}, not in the Secret"
            );
            *value = dir.join(file).to_str().expect("path").to_owned();
        }
    }
    for needed in [
        "BROKER_CURVE_SECRET_KEY_FILE",
        "BROKER_CURVE_ALLOW_KEYS",
        "BROKER_CURVE_KEY_FILE",
    ] {
        assert!(
            env[needed].starts_with(dir.to_str().expect("path")),
            "{needed} in the Secret"
        );
    }
    let (zmq_host, admin_host) = (free_port(), free_port());
    let remap = HashMap::from([
        (pod.ports["zmq"], zmq_host),
        (pod.ports["admin"], admin_host),
    ]);
    env.insert(
        "BROKER_FRONTEND".into(),
        format!("tcp://127.0.0.1:{zmq_host}"),
    );
    env.insert("BROKER_ADMIN".into(), format!("127.0.0.1:{admin_host}"));
    let env_pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let project = |values: &dyn Fn(&str) -> String| {
        for file in &files {
            std::fs::write(dir.join(file), values(file)).expect("project");
        }
    };

    // The example as shipped: exit 2, naming the flag, before anything binds.
    project(&|file| {
        secret["stringData"][file]
            .as_str()
            .expect("text")
            .to_owned()
    });
    let mut example = Broker::spawn_exact(&[], &env_pairs, zmq_host, admin_host);
    assert_eq!(
        example.wait_exit(EVENT_TIMEOUT).code(),
        Some(2),
        "{}",
        example.stderr_text()
    );
    assert!(example.stderr_text().contains("--curve-secret-key-file"));

    // Real keys, as docs/kubernetes.md makes them.
    let pair = || zmq::CurveKeyPair::new().expect("libzmq with CURVE");
    let (server, probe, app) = (pair(), pair(), pair());
    let keygen = |p: &zmq::CurveKeyPair| {
        format!(
            "public-key = \"{}\"\nsecret-key = \"{}\"\n",
            encode_key(&p.public_key),
            encode_key(&p.secret_key)
        )
    };
    project(&|file| match file {
        "server.key" => keygen(&server),
        "server.pub" => encode_key(&server.public_key) + "\n",
        "probe.key" => keygen(&probe),
        "allow-keys" => format!(
            "# probe\n{}\n# app\n{}\n",
            encode_key(&probe.public_key),
            encode_key(&app.public_key)
        ),
        other => panic!("the test does not know what {other} holds"),
    });
    let args = container_args(&pod.container);
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let broker = Broker::spawn_exact(&arg_refs, &env_pairs, zmq_host, admin_host);
    let startup = Probe::parse(&pod.container["startupProbe"], &pod.ports, &remap, &env);
    startup.until_success("startup probe never passed over CURVE");
    let security = client::Security::Curve {
        server: server.public_key,
        public: app.public_key,
        secret: SecretKey(app.secret_key),
    };
    let policy = client::RetryPolicy {
        timeout: EVENT_TIMEOUT,
        ..client::RetryPolicy::default()
    };
    let mut app_client =
        client::Client::with_security(std::slice::from_ref(&broker.front), policy, security)
            .expect("client");
    assert_eq!(
        app_client.request(&[b"hello"]).expect("served"),
        [b"hello".to_vec()]
    );
    let plain = Client::dealer(&broker.front, true);
    plain.send(&[b"plaintext"]);
    // `mechanism` if the broker notices first, `handshake` if the client hangs up first.
    let refused = |reason: &str| {
        let name = format!("broker_connections_refused_total{{reason=\"{reason}\"}}");
        common::metric(&broker, &name)
    };
    common::eventually("plaintext refused", EVENT_TIMEOUT, || {
        refused("mechanism") + refused("handshake") >= 1.0
    });
    assert_eq!(plain.try_recv(Duration::from_millis(300)), None);
    let _ = std::fs::remove_dir_all(&dir);
}
