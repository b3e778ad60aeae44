//! The production Deployment as `kubectl kustomize deploy/overlays/production` renders it:
//! the container's environment (downward-API values resolved as the kubelet would), ports,
//! probes, resources and grace period, so tests run the binary exactly as the pod would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kubectl() -> PathBuf {
    let venv = repo().join("target/tools/venv/bin/kubectl");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("kubectl")
    }
}

/// The Deployment object an overlay renders.
pub fn rendered_deployment(overlay: &str) -> Value {
    rendered_object(overlay, "Deployment")
}

/// The first object of `kind` an overlay renders.
pub fn rendered_object(overlay: &str, kind: &str) -> Value {
    rendered(overlay)
        .into_iter()
        .find(|doc| doc["kind"] == kind)
        .unwrap_or_else(|| panic!("{overlay} renders no {kind}"))
}

/// Every object an overlay renders.
pub fn rendered(overlay: &str) -> Vec<Value> {
    let output = Command::new(kubectl())
        .arg("kustomize")
        .arg(repo().join("deploy/overlays").join(overlay))
        .output()
        .expect("kubectl runs (scripts/setup installs it)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("utf8");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("yaml"))
        .collect()
}

pub fn secs(value: &Value, default: u64) -> Duration {
    Duration::from_secs(value.as_u64().unwrap_or(default))
}

fn quantity_text(quantity: &Value) -> String {
    match quantity {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("quantity {other:?}"),
    }
}

/// Kubernetes CPU quantity in millicores ("2", "500m").
pub fn millicores(quantity: &Value) -> u64 {
    let text = quantity_text(quantity);
    match text.strip_suffix('m') {
        Some(m) => m.parse().expect("millicores"),
        None => (text.parse::<f64>().expect("cores") * 1000.0) as u64,
    }
}

/// Kubernetes memory quantity in bytes ("256Mi", "1Gi", "1000").
pub fn bytes(quantity: &Value) -> u64 {
    let text = quantity_text(quantity);
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().expect("memory quantity number");
    number
        * match unit {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "k" => 1000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            other => panic!("memory unit {other}"),
        }
}

/// The first container of the production pod.
pub struct Pod {
    pub spec: Value,
    pub container: Value,
    pub env: HashMap<String, String>,
    pub ports: HashMap<String, u16>,
    pub grace: Duration,
    pub memory_limit: u64,
}

/// The production pod: its container, environment (resource references resolved as the
/// kubelet does), named ports, grace period and memory limit.
pub fn production_pod() -> Pod {
    pod("production")
}

/// The pod of `overlay`'s Deployment (see [`production_pod`]).
pub fn pod(overlay: &str) -> Pod {
    let deployment = rendered_deployment(overlay);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = pod["containers"][0].clone();
    let limits = &container["resources"]["limits"];
    let ports = container["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("named port").to_owned(),
                p["containerPort"].as_u64().expect("port") as u16,
            )
        })
        .collect();
    let mut env = HashMap::new();
    for var in container["env"].as_sequence().expect("env") {
        let name = var["name"].as_str().expect("env name").to_owned();
        let value = if let Some(v) = var.get("value") {
            v.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| serde_yaml::to_string(v).expect("value").trim().to_owned())
        } else {
            let field = &var["valueFrom"]["resourceFieldRef"];
            match field["resource"].as_str() {
                Some("limits.cpu") => {
                    let divisor = millicores(&field["divisor"]).max(1);
                    // The kubelet rounds up, and never below 1.
                    millicores(&limits["cpu"])
                        .div_ceil(divisor)
                        .max(1)
                        .to_string()
                }
                Some("limits.memory") => {
                    let divisor = field.get("divisor").map_or(1, bytes).max(1);
                    bytes(&limits["memory"]).div_ceil(divisor).to_string()
                }
                other => panic!("resourceFieldRef {other:?} is not one the test knows"),
            }
        };
        env.insert(name, value);
    }
    Pod {
        spec: pod.clone(),
        memory_limit: bytes(&limits["memory"]),
        grace: secs(&pod["terminationGracePeriodSeconds"], 30),
        container,
        env,
        ports,
    }
}
