//! CURVE on the front socket (`--curve-secret-key-file`, `--curve-allow-keys`) with the real
//! binary and real CURVE clients over TCP: an authorized client is served (the retrying
//! client, `broker probe`, `broker bench`); a wrong server key, an unknown client key and a
//! plaintext client are each refused, counted by reason, and never reach a worker; rotating
//! the allow file admits a new key and cuts off a removed one without a restart; settings
//! that cannot work exit 2.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use client::security::{Key, SecretKey};
use client::{Client, RetryPolicy, Security};
use common::{eventually, metric, Broker, EVENT_TIMEOUT};
use shared::curve::encode_key;

/// A key pair, as `broker keygen` writes it and as the client flags read it.
struct Pair {
    public: Key,
    file: PathBuf,
}

/// A directory of keys for one test.
struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn new(name: &str) -> Keys {
        let dir = std::env::temp_dir().join(format!("broker-curve-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("key dir");
        Keys { dir }
    }

    /// A new pair made by `broker keygen`, so its output format is what is tested.
    fn pair(&self, name: &str) -> Pair {
        let output = Command::new(env!("CARGO_BIN_EXE_broker"))
            .arg("keygen")
            .output()
            .expect("keygen runs");
        assert!(output.status.success(), "keygen failed");
        let text = String::from_utf8(output.stdout).expect("utf-8");
        let file = self.dir.join(name);
        std::fs::write(&file, &text).expect("key file");
        let public = shared::curve::parse_key_text(&text, "public", name).expect("public key");
        Pair { public, file }
    }

    /// Writes the allow file listing `keys`, atomically (write, then rename), as the kubelet
    /// updates a Secret.
    fn allow(&self, keys: &[&Pair]) -> PathBuf {
        let text: String = keys
            .iter()
            .map(|p| format!("# {}\n{}\n", p.file.display(), encode_key(&p.public)))
            .collect();
        self.write("allow", &text)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        let staged = self.dir.join(format!(".{name}.new"));
        std::fs::write(&staged, text).expect("write");
        std::fs::rename(&staged, &path).expect("rename");
        path
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn security(server: &Pair, client: &Pair) -> Security {
    Security::Curve {
        server: server.public,
        public: client.public,
        secret: SecretKey(
            shared::curve::read_key_file(&client.file, "secret").expect("secret key"),
        ),
    }
}

fn client(broker: &Broker, security: Security, timeout: Duration) -> Client {
    let policy = RetryPolicy {
        timeout,
        retries: 0,
        ..RetryPolicy::default()
    };
    Client::with_security(std::slice::from_ref(&broker.front), policy, security).expect("client")
}

fn refused(broker: &Broker, reason: &str) -> f64 {
    metric(
        broker,
        &format!("broker_connections_refused_total{{reason=\"{reason}\"}}"),
    )
}

/// Every reply the broker sent, whatever its outcome: a refused client must add none.
fn replies(broker: &Broker) -> f64 {
    broker
        .http_get("/metrics")
        .1
        .lines()
        .filter(|l| l.starts_with("broker_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn curve_broker(server: &Pair, allow: Option<&Path>) -> Broker {
    let mut args = vec![
        "--workers",
        "2",
        "--curve-secret-key-file",
        server.file.to_str().expect("path"),
    ];
    if let Some(allow) = allow {
        args.extend(["--curve-allow-keys", allow.to_str().expect("path")]);
    }
    Broker::start(&args)
}

#[test]
fn authorized_clients_are_served_and_every_other_client_is_refused_and_counted() {
    let keys = Keys::new("refusals");
    let (server, alice, mallory) = (
        keys.pair("server"),
        keys.pair("alice"),
        keys.pair("mallory"),
    );
    let broker = curve_broker(&server, Some(&keys.allow(&[&alice])));
    let public = encode_key(&server.public);
    broker.wait_for_log(&format!("public key {public}"), EVENT_TIMEOUT);

    let mut served = client(&broker, security(&server, &alice), EVENT_TIMEOUT);
    for body in ["one", "two"] {
        assert_eq!(
            served.request(&[body.as_bytes()]).expect("served"),
            [body.as_bytes().to_vec()]
        );
    }
    // The health request works over CURVE too, as does `broker probe` (flags from env).
    let probe = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["probe", "--endpoint", &broker.front])
        .env("BROKER_CURVE_SERVER_KEY", &public)
        .env("BROKER_CURVE_KEY_FILE", &alice.file)
        .output()
        .expect("probe runs");
    assert_eq!(probe.status.code(), Some(0), "{probe:?}");
    let before = replies(&broker);
    assert_eq!(before, 2.0, "two work requests answered");

    let quick = Duration::from_millis(500);
    // An unknown client key: the ZAP handler refuses it.
    let mut unknown = client(&broker, security(&server, &mallory), quick);
    assert!(unknown.request(&[b"let me in"]).is_err());
    eventually("unknown key counted", EVENT_TIMEOUT, || {
        refused(&broker, "client_key") >= 1.0
    });
    // The wrong server key: the handshake cannot be decrypted.
    let mut wrong = client(&broker, security(&mallory, &alice), quick);
    assert!(wrong.request(&[b"let me in"]).is_err());
    eventually("wrong server key counted", EVENT_TIMEOUT, || {
        refused(&broker, "server_key") >= 1.0
    });
    // Plaintext: the mechanisms do not match. If the broker notices first it is `mechanism`;
    // if the client notices first and hangs up, `handshake` (libzmq cannot tell them apart).
    let plain = common::Client::dealer(&broker.front, true);
    plain.send(&[b"let me in"]);
    eventually("plaintext counted", EVENT_TIMEOUT, || {
        refused(&broker, "mechanism") + refused(&broker, "handshake") >= 1.0
    });
    assert_eq!(
        plain.try_recv(quick),
        None,
        "a plaintext client got a reply"
    );

    // None of them reached a worker or got any reply; the authorized client is unaffected.
    assert_eq!(replies(&broker), before);
    assert_eq!(
        served.request(&[b"still"]).expect("served"),
        [b"still".to_vec()]
    );
    broker.wait_for_log("refused", EVENT_TIMEOUT);

    // `broker probe` fails on each and says which key to fix.
    let probe = |server_key: Option<&str>, key_file: Option<&Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_broker"));
        command.args(["probe", "--endpoint", &broker.front, "--timeout", "2s"]);
        if let Some(key) = server_key {
            command.args(["--curve-server-key", key]);
        }
        if let Some(file) = key_file {
            command.arg("--curve-key-file").arg(file);
        }
        let output = command.output().expect("probe runs");
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let text = probe(Some(&public), Some(&mallory.file));
    assert!(text.contains("not in --curve-allow-keys"), "{text}");
    let text = probe(Some(&encode_key(&mallory.public)), Some(&alice.file));
    assert!(text.contains("--curve-server-key"), "{text}");
    let text = probe(None, None);
    assert!(text.contains("CURVE"), "{text}");
}

#[test]
fn rotating_the_allow_file_admits_new_keys_and_cuts_off_removed_ones_without_a_restart() {
    let keys = Keys::new("rotation");
    let (server, old, new) = (keys.pair("server"), keys.pair("old"), keys.pair("new"));
    let allow = keys.allow(&[&old]);
    let broker = curve_broker(&server, Some(&allow));
    let quick = Duration::from_millis(500);

    let mut old_client = client(&broker, security(&server, &old), EVENT_TIMEOUT);
    assert_eq!(
        old_client.request(&[b"a"]).expect("served"),
        [b"a".to_vec()]
    );
    let mut new_client = client(&broker, security(&server, &new), quick);
    assert!(new_client.request(&[b"b"]).is_err(), "not allowed yet");

    // A broken update changes nothing: the old keys stay in force, the error is counted.
    keys.write("allow", "this is not a key\n");
    eventually("bad reload counted", EVENT_TIMEOUT, || {
        metric(&broker, "broker_curve_key_reloads_total{result=\"error\"}") >= 1.0
    });
    assert_eq!(
        old_client.request(&[b"c"]).expect("still served"),
        [b"c".to_vec()]
    );

    // Rotate: the new key in, the old one out.
    keys.allow(&[&new]);
    eventually("new keys in force", EVENT_TIMEOUT, || {
        metric(&broker, "broker_curve_key_reloads_total{result=\"ok\"}") >= 1.0
    });
    let mut new_client = client(&broker, security(&server, &new), EVENT_TIMEOUT);
    assert_eq!(
        new_client.request(&[b"d"]).expect("admitted now"),
        [b"d".to_vec()]
    );
    // The old key's open connection is reset, and reconnecting is refused.
    eventually("old connection revoked", EVENT_TIMEOUT, || {
        metric(
            &broker,
            "broker_connections_reset_total{reason=\"revoked\"}",
        ) == 1.0
    });
    let mut old_client = client(&broker, security(&server, &old), quick);
    assert!(
        old_client.request(&[b"e"]).is_err(),
        "a removed key is refused"
    );
    eventually("removed key refused", EVENT_TIMEOUT, || {
        refused(&broker, "client_key") >= 2.0
    });
    assert_eq!(metric(&broker, "broker_curve_allowed_keys"), 1.0);
    broker.wait_for_log(
        "allowed client keys reloaded: 1 in force, 1 removed",
        EVENT_TIMEOUT,
    );
}

#[test]
fn replies_still_being_handled_when_a_key_is_revoked_are_counted_as_reset() {
    let keys = Keys::new("revoke-inflight");
    let (server, gone, stays) = (keys.pair("server"), keys.pair("gone"), keys.pair("stays"));
    let allow = keys.allow(&[&gone, &stays]);
    let broker = Broker::start(&[
        "--workers",
        "2",
        "--handler",
        "sleep",
        "--curve-secret-key-file",
        server.file.to_str().expect("path"),
        "--curve-allow-keys",
        allow.to_str().expect("path"),
    ]);
    let mut waiting = client(&broker, security(&server, &gone), Duration::from_secs(8));
    let request = std::thread::spawn(move || waiting.request(&[b"3000"]));
    eventually("request in flight", EVENT_TIMEOUT, || {
        metric(&broker, "broker_inflight_requests") == 1.0
    });
    keys.allow(&[&stays]);
    eventually("connection revoked", EVENT_TIMEOUT, || {
        metric(
            &broker,
            "broker_connections_reset_total{reason=\"revoked\"}",
        ) == 1.0
    });
    // The handler finishes after the reset: its reply has nowhere to go, for a known reason.
    eventually("late reply dropped", EVENT_TIMEOUT, || {
        metric(&broker, "broker_replies_dropped_total{reason=\"reset\"}") == 1.0
    });
    assert_eq!(
        metric(
            &broker,
            "broker_replies_dropped_total{reason=\"peer_gone\"}"
        ),
        0.0
    );
    let answer = request.join().expect("client thread");
    assert!(answer.is_err(), "a revoked client got {answer:?}");
}

#[test]
fn bench_runs_over_curve() {
    let keys = Keys::new("bench");
    let (server, client_pair) = (keys.pair("server"), keys.pair("client"));
    let broker = curve_broker(&server, Some(&keys.allow(&[&client_pair])));
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args([
            "bench",
            "--endpoint",
            &broker.front,
            "--clients",
            "2",
            "--requests",
            "2000",
        ])
        .args(["--curve-server-key", &encode_key(&server.public)])
        .arg("--curve-key-file")
        .arg(&client_pair.file)
        .arg("--json")
        .output()
        .expect("bench runs");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("bench prints JSON");
    assert_eq!(report["ok"], 2000, "{report}");
    // A second broker that does not allow this client: the other one's replies must not hide
    // it (a DEALER sends only where its handshake succeeded).
    let other = keys.pair("other");
    let other_allow = keys.write("other-allow", &format!("{}\n", encode_key(&other.public)));
    let strict = curve_broker(&server, Some(&other_allow));
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args([
            "bench",
            "--endpoint",
            &broker.front,
            "--endpoint",
            &strict.front,
        ])
        .args(["--clients", "4", "--requests", "400"])
        .args(["--curve-server-key", &encode_key(&server.public)])
        .arg("--curve-key-file")
        .arg(&client_pair.file)
        .output()
        .expect("bench runs");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{} refused the connection", strict.front)),
        "{stderr}"
    );
    // Without keys, the same bench is refused and says so with its exit code.
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args([
            "bench",
            "--endpoint",
            &broker.front,
            "--requests",
            "10",
            "--duration",
            "1s",
        ])
        .args(["--timeout", "1s"])
        .output()
        .expect("bench runs");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
}

#[test]
fn curve_settings_that_cannot_work_exit_2_before_binding() {
    let keys = Keys::new("settings");
    let server = keys.pair("server");
    let secret = server.file.to_str().expect("path").to_owned();
    let public_only = keys.write("public-only", &format!("{}\n", "public-key = \"x\""));
    let empty = keys.write("empty", "# nobody yet\n");
    let garbage = keys.write("garbage", "hello\n");
    let missing = keys.dir.join("missing").to_str().expect("path").to_owned();
    // Reading either would block or never end: refused as not a regular file.
    let fifo = keys.dir.join("fifo").to_str().expect("path").to_owned();
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let cases: Vec<Vec<String>> = vec![
        vec!["--curve-secret-key-file".into(), fifo.clone()],
        vec!["--curve-secret-key-file".into(), "/dev/zero".into()],
        vec![
            "--curve-secret-key-file".into(),
            secret.clone(),
            "--curve-allow-keys".into(),
            fifo,
        ],
        vec!["--curve-allow-keys".into(), secret.clone()],
        vec!["--curve-secret-key-file".into(), missing.clone()],
        vec![
            "--curve-secret-key-file".into(),
            public_only.to_str().expect("path").into(),
        ],
        vec![
            "--curve-secret-key-file".into(),
            secret.clone(),
            "--curve-allow-keys".into(),
            missing.clone(),
        ],
        vec![
            "--curve-secret-key-file".into(),
            secret.clone(),
            "--curve-allow-keys".into(),
            empty.to_str().expect("path").into(),
        ],
        vec![
            "--curve-secret-key-file".into(),
            secret,
            "--curve-allow-keys".into(),
            garbage.to_str().expect("path").into(),
        ],
    ];
    for args in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut broker = Broker::spawn(&args, &[]);
        let status = broker.wait_exit(EVENT_TIMEOUT);
        let stderr = broker.stderr_text();
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains("--curve-"), "names the flag: {stderr}");
        assert!(
            broker.log_lines().is_empty(),
            "nothing started: {:?}",
            broker.log_lines()
        );
    }

    // The tools too: a CURVE setting that cannot work is a usage error, not a failed probe.
    let pair = server.file.to_str().expect("path");
    let key = encode_key(&server.public);
    let tool_cases: [&[&str]; 5] = [
        &["--curve-server-key", "abc", "--curve-key-file", pair],
        &["--curve-server-key", &key],
        &["--curve-key-file", pair],
        &["--curve-server-key", &key, "--curve-key-file", &missing],
        &[
            "--curve-server-key-file",
            "/dev/zero",
            "--curve-key-file",
            pair,
        ],
    ];
    for tool in ["probe", "bench"] {
        for args in tool_cases {
            let output = Command::new(env!("CARGO_BIN_EXE_broker"))
                .args([tool, "--endpoint", "tcp://127.0.0.1:9"])
                .args(args)
                .output()
                .expect("tool runs");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{tool} {args:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        }
    }
}
