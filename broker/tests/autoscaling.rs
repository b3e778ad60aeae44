//! The autoscaling signal, evaluated by a real Prometheus (Debian's, which scripts/setup
//! installs) scraping real brokers, with the exact query strings of the rendered manifests:
//! the prometheus-adapter rule behind the HPA and the KEDA ScaledObject's trigger.
//!
//! Brokers (2 workers each, `sleep` handler, admission at its defaults, the production pod's
//! memory limit) are labelled as the PodMonitor's relabelling labels pods (`namespace`,
//! `pod`): two in namespace `broker` at 10 ms a request under an open-loop load of half their
//! capacity, two in `broker-over` at 10 ms under three times theirs, two in `broker-slow` at
//! 1 s a request under three times theirs, and two in `broker-brief` under a brief half load.
//! The test checks that at half capacity the signal (offered load per worker) reads 0.5 within
//! 15 % and the HPA formula keeps the replicas; that at three times capacity, where admission
//! keeps the queue short and refuses the rest, the formula still asks for at least three times
//! the replicas in one step, for the fast and the slow handler; and that once the load stops
//! the signal falls back within the query window.
//!
//! The Grafana dashboard (deploy/monitoring/dashboards/broker.json) is evaluated on the same
//! Prometheus: every query of every panel, for the half-load and the overloaded namespace, must
//! return data; the overloaded namespace's panels are then drawn from range queries with
//! matplotlib (deploy/monitoring/dashboards/render.py) into target/dashboard/broker.png, which
//! docs/img/dashboard.png is a copy of.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::deploy::{production_pod, rendered_object, repo};
use common::{eventually, free_port, Broker};
use serde_yaml::Value;

/// Service time of one request (the `sleep` handler's milliseconds).
const SERVICE_MS: u64 = 10;
/// The slow handler's.
const SLOW_MS: u64 = 1000;
const WORKERS: u64 = 2;
/// Requests per second one broker can serve at `service_ms`.
fn capacity(service_ms: u64) -> f64 {
    WORKERS as f64 * 1000.0 / service_ms as f64
}

/// The HPA's Pods metric name and its AverageValue target, from the production render.
fn hpa_metric() -> (String, f64) {
    let hpa = rendered_object("production", "HorizontalPodAutoscaler");
    let metric = &hpa["spec"]["metrics"][0]["pods"];
    let name = metric["metric"]["name"]
        .as_str()
        .expect("metric name")
        .to_owned();
    let target = metric["target"]["averageValue"]
        .as_str()
        .expect("averageValue");
    let target = match target.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().expect("milli quantity") / 1000.0,
        None => target.parse().expect("quantity"),
    };
    (name, target)
}

/// The prometheus-adapter rule's metricsQuery that serves `metric` (from its Helm values).
fn adapter_query(metric: &str) -> String {
    let text =
        std::fs::read_to_string(repo().join("deploy/monitoring/prometheus-adapter-values.yaml"))
            .expect("adapter values");
    let values: Value = serde_yaml::from_str(&text).expect("yaml");
    values["rules"]["custom"]
        .as_sequence()
        .expect("rules.custom")
        .iter()
        .find(|rule| rule["name"]["as"] == metric)
        .and_then(|rule| rule["metricsQuery"].as_str())
        .unwrap_or_else(|| panic!("no adapter rule serves {metric}"))
        .to_owned()
}

/// The query prometheus-adapter runs for the pods of `namespace`, grouped per pod.
fn adapter_pods_query(template: &str, namespace: &str, pods: &[&str]) -> String {
    template
        .replace(
            "<<.LabelMatchers>>",
            &format!("namespace=\"{namespace}\",pod=~\"{}\"", pods.join("|")),
        )
        .replace("<<.GroupBy>>", "pod")
}

/// The KEDA trigger's query and threshold, from the production-keda render.
fn keda_trigger() -> (String, f64) {
    let scaled = rendered_object("production-keda", "ScaledObject");
    let trigger = scaled["spec"]["triggers"]
        .as_sequence()
        .expect("triggers")
        .iter()
        .find(|t| t["type"] == "prometheus")
        .expect("a prometheus trigger");
    assert_eq!(
        trigger["metricType"], "Value",
        "a cluster-wide value, not per pod"
    );
    let meta = &trigger["metadata"];
    (
        meta["query"].as_str().expect("query").to_owned(),
        meta["threshold"]
            .as_str()
            .expect("threshold")
            .parse()
            .expect("number"),
    )
}

/// Prometheus on loopback scraping `targets` (admin address, namespace, pod) every second.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(targets: &[(SocketAddr, &str, &str)]) -> Prometheus {
        let dir = std::env::temp_dir().join(format!(
            "broker-prom-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: broker\n    static_configs:\n",
        );
        for (addr, namespace, pod) in targets {
            config.push_str(&format!(
                "      - targets: ['{addr}']\n        labels: {{namespace: '{namespace}', pod: '{pod}'}}\n"
            ));
        }
        let path = dir.join("prometheus.yml");
        std::fs::write(&path, config).expect("write prometheus.yml");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus runs (scripts/setup installs Debian's package)");
        let prometheus = Prometheus { child, port, dir };
        let addr = SocketAddr::from(([127, 0, 0, 1], prometheus.port));
        eventually("prometheus ready", Duration::from_secs(30), || {
            // Not listening yet is not an answer.
            std::net::TcpStream::connect(addr).is_ok()
                && common::http_request(addr, "GET", "/-/ready").0 == 200
        });
        prometheus
    }

    /// The API's `data.result` for `endpoint` (query or query_range) with `params`.
    fn api(&self, endpoint: &str, query: &str, params: &str) -> Vec<serde_json::Value> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = common::http_request(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            "GET",
            &format!("/api/v1/{endpoint}?query={encoded}{params}"),
        );
        assert_eq!(status, 200, "{query}: {body}");
        let response: serde_json::Value = serde_json::from_str(&dechunk(&body))
            .unwrap_or_else(|e| panic!("{query}: {e}: {body}"));
        response["data"]["result"]
            .as_array()
            .expect("a result")
            .clone()
    }

    /// A range query from `start` to now, one point a second: each series with its values.
    fn query_range(&self, query: &str, start: SystemTime) -> Vec<serde_json::Value> {
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
        let params = format!(
            "&start={}&end={}&step=1",
            secs(start),
            secs(SystemTime::now())
        );
        self.api("query_range", query, &params)
    }

    /// An instant query: each series' labels and value.
    fn query(&self, query: &str) -> Vec<(serde_json::Value, f64)> {
        self.api("query", query, "")
            .iter()
            .map(|sample| {
                let value = sample["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (sample["metric"].clone(), value)
            })
            .collect()
    }

    /// The mean over the series `query` returns (NaN when it returns none).
    fn mean(&self, query: &str) -> f64 {
        let values: Vec<f64> = self.query(query).into_iter().map(|(_, v)| v).collect();
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// The body of an HTTP/1.1 response as sent: Prometheus sends large answers in chunks
/// (`Transfer-Encoding: chunked`), each a hex length line, the data and CRLF, until length 0.
fn dechunk(body: &str) -> String {
    if body.starts_with('{') {
        return body.to_owned();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16)
            .unwrap_or_else(|_| panic!("not a chunked body: {body:.200}"));
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// Every query of every panel of the Grafana dashboard, for `namespace`: (panel, unit,
/// target line, [(query, legend)]), with the dashboard's variables as Grafana would fill them
/// (`$__rate_interval` at least four scrape intervals: 4 s here).
type Panel = (String, String, Option<f64>, Vec<(String, String)>);

fn dashboard_panels(namespace: &str) -> Vec<Panel> {
    let path = repo().join("deploy/monitoring/dashboards/broker.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|panel| {
            let defaults = &panel["fieldConfig"]["defaults"];
            let line = defaults["thresholds"]["steps"]
                .as_array()
                .and_then(|steps| steps.iter().find_map(|s| s["value"].as_f64()));
            let targets = panel["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .map(|t| {
                    let expr = t["expr"].as_str().expect("expr");
                    (
                        expr.replace("$namespace", namespace)
                            .replace("$__rate_interval", "4s"),
                        t["legendFormat"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect();
            (
                panel["title"].as_str().expect("title").to_owned(),
                defaults["unit"].as_str().unwrap_or("short").to_owned(),
                line,
                targets,
            )
        })
        .collect()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An open-loop load of `rate` requests/s of `service_ms` for `secs` on `brokers`, in the
/// background; each request's client deadline is ten service times (at least a second).
fn load(brokers: &[&Broker], service_ms: u64, rate: f64, secs: u64) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_broker"));
    command.arg("bench");
    for broker in brokers {
        command.args(["--endpoint", &broker.front]);
    }
    command
        .args([
            "--rate",
            &rate.to_string(),
            "--duration",
            &format!("{secs}s"),
        ])
        .args(["--clients", "8", "--window", "512"])
        .args(["--timeout", &format!("{}ms", (10 * service_ms).max(1000))])
        .args(["--first-frame", &service_ms.to_string(), "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("broker bench runs")
}

/// Draws the dashboard's panels for `namespace` since `start` into target/dashboard/broker.png
/// (deploy/monitoring/dashboards/render.py, with the tools venv's matplotlib).
fn render_dashboard(prometheus: &Prometheus, namespace: &str, start: SystemTime) {
    let panels: Vec<serde_json::Value> = dashboard_panels(namespace)
        .into_iter()
        .map(|(title, unit, line, queries)| {
            let targets: Vec<serde_json::Value> = queries
                .iter()
                .map(|(query, legend)| {
                    let result = prometheus.query_range(query, start);
                    assert!(!result.is_empty(), "{title:?} has no range data: {query}");
                    serde_json::json!({"legendFormat": legend, "result": result})
                })
                .collect();
            serde_json::json!({"title": title, "unit": unit, "threshold": line, "targets": targets})
        })
        .collect();
    let dir = repo().join("target/dashboard");
    std::fs::create_dir_all(&dir).expect("target/dashboard");
    let data = dir.join("broker-data.json");
    let title = format!("Broker, namespace {namespace}: 2 pods at 3x their capacity");
    let document = serde_json::json!({"title": title, "panels": panels});
    std::fs::write(&data, document.to_string()).expect("write the data");
    let png = dir.join("broker.png");
    let _ = std::fs::remove_file(&png);
    let python = repo().join("target/tools/venv/bin/python3");
    let output = Command::new(&python)
        .arg(repo().join("deploy/monitoring/dashboards/render.py"))
        .args([&data, &png])
        .output()
        .expect("the tools venv's python runs (scripts/setup makes it)");
    assert!(
        output.status.success(),
        "render.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let size = std::fs::metadata(&png).expect("the PNG is written").len();
    assert!(size > 10_000, "the PNG is only {size} bytes");
    eprintln!("dashboard drawn: {} ({size} bytes)", png.display());
}

/// ceil(current x value / target): the replicas the HPA (and KEDA's HPA) asks for.
fn desired(current: u32, value: f64, target: f64) -> u32 {
    (f64::from(current) * value / target).ceil() as u32
}

#[test]
#[ignore = "75 s, nearly all of it waiting on Prometheus's window: scripts/test runs it \
            (--include-ignored) alongside the other tests"]
fn the_signal_sees_load_and_overload_and_falls_back_when_it_stops() {
    let (metric, target) = hpa_metric();
    let adapter = adapter_query(&metric);
    let (keda_query, threshold) = keda_trigger();
    // The queries' rate window: it must fill before the signal is exact, and empty before it
    // falls to zero. The three sets run side by side so the test takes one window and a bit.
    let window = Duration::from_secs(60);
    let limit = production_pod().memory_limit.to_string();
    let args = [
        "--workers",
        "2",
        "--handler",
        "sleep",
        "--memory-limit",
        &limit,
    ];
    let start = || -> Vec<Broker> { (0..2).map(|_| Broker::start(&args)).collect() };
    let (half, over, slow, brief) = (start(), start(), start(), start());
    let pods = [
        ("broker", "h-0"),
        ("broker", "h-1"),
        ("broker-over", "o-0"),
        ("broker-over", "o-1"),
        ("broker-slow", "s-0"),
        ("broker-slow", "s-1"),
        ("broker-brief", "b-0"),
        ("broker-brief", "b-1"),
    ];
    let admins = [&half, &over, &slow, &brief].map(|pair| [pair[0].admin, pair[1].admin]);
    let targets: Vec<(SocketAddr, &str, &str)> = admins
        .iter()
        .flatten()
        .zip(pods.iter())
        .map(|(addr, (namespace, pod))| (*addr, *namespace, *pod))
        .collect();
    let prometheus = Prometheus::start(&targets);
    let wall_start = SystemTime::now();
    let half_query = adapter_pods_query(&adapter, "broker", &["h-0", "h-1"]);
    let over_query = adapter_pods_query(&adapter, "broker-over", &["o-0", "o-1"]);
    let slow_query = adapter_pods_query(&adapter, "broker-slow", &["s-0", "s-1"]);
    let brief_query = adapter_pods_query(&adapter, "broker-brief", &["b-0", "b-1"]);

    // Half the capacity of two brokers for a window and more; three times it on the second
    // pair and on the slow pair; half on the last pair for 10 s only.
    let started = Instant::now();
    let long = window.as_secs() + 15;
    let fast = capacity(SERVICE_MS);
    let mut half_load = load(&[&half[0], &half[1]], SERVICE_MS, fast, long);
    let mut over_load = load(&[&over[0], &over[1]], SERVICE_MS, 6.0 * fast, long);
    let slow_rate = 6.0 * capacity(SLOW_MS);
    let mut slow_load = load(&[&slow[0], &slow[1]], SLOW_MS, slow_rate, long);
    let mut brief_load = load(&[&brief[0], &brief[1]], SERVICE_MS, fast, 10);
    assert!(brief_load.wait().is_ok());
    let brief_stopped = Instant::now();

    // Half load, once the window is full of it: rate x service time / workers = 0.5.
    let expected = 0.5;
    while started.elapsed() < window + Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(500)); // waiting for the window to fill
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let per_pod = loop {
        let per_pod = prometheus.query(&half_query);
        let within = per_pod.len() == 2
            && per_pod
                .iter()
                .all(|(_, v)| (v - expected).abs() <= 0.15 * expected);
        if within || Instant::now() >= deadline {
            break per_pod;
        }
        std::thread::sleep(Duration::from_millis(200)); // between Prometheus queries
    };
    // Three times the capacity, once the window is full of it: admission keeps the queue short
    // and refuses the rest, and the refused requests count, so the signal reads about 3 and the
    // HPA formula asks for at least three times the replicas in one step.
    for (what, query) in [("10 ms", &over_query), ("1 s", &slow_query)] {
        eventually(
            &format!("the {what} overload is seen"),
            Duration::from_secs(10),
            || desired(2, prometheus.mean(query), target) >= 6,
        );
        let signal = prometheus.mean(query);
        eprintln!(
            "after {:?}: 3x load of {what} requests: adapter {signal:.2} per worker, HPA asks \
             for {}",
            started.elapsed(),
            desired(2, signal, target)
        );
    }
    let half_signal = prometheus.mean(&half_query);
    let keda_value = prometheus.mean(&keda_query);
    eprintln!(
        "after {:?}: half load: adapter per pod {:?}, KEDA {keda_value:.3}",
        started.elapsed(),
        per_pod
            .iter()
            .map(|(_, v)| format!("{v:.3}"))
            .collect::<Vec<_>>()
    );
    assert!(
        per_pod.len() == 2
            && per_pod
                .iter()
                .all(|(_, v)| (v - expected).abs() <= 0.15 * expected),
        "the adapter's signal reads the half load within 15 %: {per_pod:?}"
    );
    assert!(
        (keda_value - expected).abs() <= 0.15 * expected,
        "KEDA reads {keda_value}"
    );
    assert_eq!(
        desired(2, half_signal, target),
        2,
        "the HPA keeps 2 replicas at half load"
    );
    assert_eq!(desired(2, keda_value, threshold), 2, "so does KEDA");

    // The dashboard: every panel's every query returns data for a loaded namespace.
    for namespace in ["broker", "broker-over"] {
        for (title, _, _, queries) in dashboard_panels(namespace) {
            for (query, _) in queries {
                assert!(
                    !prometheus.query(&query).is_empty(),
                    "dashboard panel {title:?} shows nothing for {namespace}: {query}"
                );
            }
        }
    }
    render_dashboard(&prometheus, "broker-over", wall_start);

    // The brief load ended a window ago: its signal is back to nothing.
    eventually(
        "the signal falls back within the query window",
        (window + Duration::from_secs(5)).saturating_sub(brief_stopped.elapsed()),
        || {
            let v = prometheus.mean(&brief_query);
            v.is_finite() && v < 0.01
        },
    );
    eprintln!(
        "fell back {:?} after its load stopped",
        brief_stopped.elapsed()
    );
    assert!(half_load.wait().is_ok());
    assert!(over_load.wait().is_ok());
    assert!(slow_load.wait().is_ok());
}
