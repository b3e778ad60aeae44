"""The mutation self-test: each mutation breaks one reference in a copy of the inputs, and
the checks must fail on it with the expected words (and pass on the inputs as given), so a
check that cannot fail is found."""

import copy
import json
import re
from pathlib import Path

from .adapter import adapter_rules
from .checks import run_checks
from .monitoring import dashboards
from .objects import meta

PROG = "check-references"


def find(docs, kind, name=None):
    for d in docs:
        if d.get("kind") == kind and (name is None or meta(d).get("name") == name):
            return d
    raise LookupError(kind)


def container(docs):
    return find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_var(docs, name):
    return next(e for e in container(docs)["env"] if e["name"] == name)


def netpol_rule_port(docs, number):
    for rule in find(docs, "NetworkPolicy")["spec"]["ingress"]:
        for p in rule.get("ports") or []:
            if p.get("port") == number:
                return p
    raise LookupError(number)


def prom_rule(docs, alert):
    for d in docs:
        if d.get("kind") == "PrometheusRule":
            for g in d["spec"]["groups"]:
                for r in g["rules"]:
                    if r.get("alert") == alert:
                        return r
    raise LookupError(alert)


def replace_in_expr(docs, alert, old, new):
    rule = prom_rule(docs, alert)
    if old not in rule["expr"]:
        raise LookupError(f"{old!r} in {alert}")
    rule["expr"] = rule["expr"].replace(old, new)


def find_scrape(docs):
    return next(d for d in docs if "scrape_configs" in d)["scrape_configs"][0]


def adapter_rule(docs):
    return adapter_rules(docs)[0]


def dashboard_edit(docs, edit):
    cm, key, dash = next(dashboards(docs))
    edit(dash)
    cm["data"][key] = json.dumps(dash)


# (description, needs: "hpa" | "keda" | "standalone", mutate(docs), expected text in a failure)
MUTATIONS = [
    ("HPA metric renamed", "hpa",
     lambda d: find(d, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"].update(
         name="broker_concurrency"),
     "metric broker_concurrency is not served"),
    ("NetworkPolicy admin port changed (8000 -> 8001)", "hpa",
     lambda d: netpol_rule_port(d, 8000).update(port=8001),
     "port 8001 is not a container port"),
    ("PodMonitor port name changed (admin -> metrics)", "hpa",
     lambda d: find(d, "PodMonitor")["spec"]["podMetricsEndpoints"][0].update(port="metrics"),
     "endpoint port metrics is not a container port"),
    ("KEDA target renamed", "keda",
     lambda d: find(d, "ScaledObject")["spec"]["scaleTargetRef"].update(name="broker-v2"),
     "scaleTargetRef Deployment/broker-v2"),
    ("HPA target renamed", "hpa",
     lambda d: find(d, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].update(name="broker-v2"),
     "scaleTargetRef Deployment/broker-v2"),
    ("Service targetPort renamed (zmq -> zeromq)", "hpa",
     lambda d: find(d, "Service", "broker")["spec"]["ports"][0].update(targetPort="zeromq"),
     "targetPort zeromq is not a container port"),
    ("headless Service selector changed", "hpa",
     lambda d: find(d, "Service", "broker-pods")["spec"]["selector"].update({"app.kubernetes.io/name": "brokers"}),
     "matches no pod template"),
    ("container port admin renamed (probes, monitor, BROKER_ADMIN lose it)", "hpa",
     lambda d: next(p for p in container(d)["ports"] if p["name"] == "admin").update(name="http"),
     "no container port is named admin"),
    ("readiness probe port renamed", "hpa",
     lambda d: container(d)["readinessProbe"]["httpGet"].update(port="health"),
     "readinessProbe port health is not a container port"),
    ("startup probe endpoint on a port the container does not declare", "hpa",
     lambda d: container(d)["startupProbe"]["exec"]["command"].__setitem__(3, "tcp://127.0.0.1:5556"),
     "startupProbe connects to port 5556"),
    ("BROKER_FRONTEND on another port than containerPort zmq", "hpa",
     lambda d: env_var(d, "BROKER_FRONTEND").update(value="tcp://0.0.0.0:6000"),
     "BROKER_FRONTEND port 6000 != containerPort zmq"),
    ("admin port exposed on the client Service again", "hpa",
     lambda d: find(d, "Service", "broker")["spec"]["ports"].append(
         {"name": "admin", "port": 8000, "targetPort": "admin", "protocol": "TCP"}),
     "exposes both the client port"),
    ("NetworkPolicy podSelector no longer matches", "hpa",
     lambda d: find(d, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].update({"app.kubernetes.io/name": "x"}),
     "podSelector matches no pod template"),
    ("PodMonitor without the release label", "hpa",
     lambda d: find(d, "PodMonitor")["metadata"]["labels"].pop("release"),
     "no `release` label"),
    ("spec.replicas set under an HPA", "hpa",
     lambda d: find(d, "Deployment")["spec"].update(replicas=3),
     "sets spec.replicas"),
    ("CPU request below the limit the workers are counted from", "hpa",
     lambda d: container(d)["resources"]["requests"].update(cpu="500m"),
     "request must equal limit"),
    ("CPU metric added to the HPA", "hpa",
     lambda d: find(d, "HorizontalPodAutoscaler")["spec"]["metrics"].append(
         {"type": "Resource",
          "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}),
     "scales on CPU"),
    ("scale-up limited to +100 % per period", "hpa",
     lambda d: [p.update(value=100)
                for p in find(d, "HorizontalPodAutoscaler")["spec"]["behavior"]["scaleUp"]["policies"]
                if p["type"] == "Percent"],
     "at 3x capacity the HPA formula asks for"),
    ("HPA and ScaledObject in one render", "keda",
     lambda d: d.append({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                         "metadata": {"name": "broker", "namespace": find(d, "Deployment")["metadata"]["namespace"]},
                         "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "broker"},
                                  "minReplicas": 2, "maxReplicas": 10}}),
     "scaled by more than one autoscaler"),
    ("KEDA query on a metric the broker does not export", "keda",
     lambda d: find(d, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(
         query='sum(rate(broker_busy_seconds_total{namespace="broker"}[1m]))'
               ' / sum(broker_workers{namespace="broker"})'),
     "uses metric broker_busy_seconds_total"),
    ("KEDA query in another namespace", "keda",
     lambda d: find(d, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(
         query=re.sub(r'namespace="[^"]*"', 'namespace="brokers"',
                      find(d, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"], count=1)),
     'selects namespace="brokers"'),
    ("KEDA serverAddress in another namespace than the monitoring one", "keda",
     lambda d: find(d, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(
         serverAddress="http://prometheus-operated.observability.svc:9090"),
     "is not a Service in the monitoring namespace"),
    ("KEDA ignoreNullValues back to true", "keda",
     lambda d: find(d, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(ignoreNullValues="true"),
     "without ignoreNullValues"),
    ("NetworkPolicy lets in another monitoring namespace than the monitoring objects'", "hpa",
     lambda d: find(d, "NetworkPolicy")["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"].update(
         {"kubernetes.io/metadata.name": "observability"}),
     "the NetworkPolicy lets in monitoring namespace observability"),
    ("an object in another namespace than the install's", "hpa",
     lambda d: find(d, "Service", "broker-pods")["metadata"].update(namespace="elsewhere"),
     "is in namespace elsewhere"),
    ("PodMonitor reaching into another namespace", "hpa",
     lambda d: find(d, "PodMonitor")["spec"].update(namespaceSelector={"matchNames": ["elsewhere"]}),
     "reaches beyond the install's namespace"),
    ("install alert on another namespace", "hpa",
     lambda d: prom_rule(d, "BrokerMetricsAbsent").update(expr='absent(broker_workers{namespace="elsewhere"})'),
     'selects namespace="elsewhere"'),
    ("a Secret in an overlay", "hpa",
     lambda d: d.append({"apiVersion": "v1", "kind": "Secret",
                         "metadata": {"name": "broker-curve", "namespace": find(d, "Deployment")["metadata"]["namespace"]},
                         "stringData": {"server.key": "x"}}),
     "an overlay renders a Secret"),
    ("readiness fails the pod on one slow answer", "hpa",
     lambda d: container(d)["readinessProbe"].update(failureThreshold=1),
     "readinessProbe failureThreshold 1"),
    ("KEDA trigger back to AverageValue", "keda",
     lambda d: find(d, "ScaledObject")["spec"]["triggers"][0].update(metricType="AverageValue"),
     "metricType AverageValue"),
    ("KEDA cooldownPeriod with minReplicaCount > 0", "keda",
     lambda d: find(d, "ScaledObject")["spec"].update(cooldownPeriod=300),
     "cooldownPeriod does nothing"),
    ("adapter rule serves another name", "standalone",
     lambda d: adapter_rule(d).update(name=dict(adapter_rule(d)["name"], **{"as": "broker_concurrency"})),
     "metric broker_demand_per_worker is not served"),
    ("adapter query on a metric the broker does not export", "standalone",
     lambda d: adapter_rule(d).update(metricsQuery=adapter_rule(d)["metricsQuery"].replace(
         "broker_demand_seconds_total", "broker_inflight_second_total")),
     "uses metric broker_inflight_second_total"),
    ("alert expression on a metric the broker does not export", "standalone",
     lambda d: prom_rule(d, "BrokerWorkersStuck").update(expr="max by (namespace, pod) (broker_worker_stuck) > 0"),
     "uses metric broker_worker_stuck"),
    ("alert on an HPA name that is not the render's", "hpa",
     lambda d: replace_in_expr(d, "BrokerAutoscalerBlind", "broker|keda-hpa-broker", "broker-hpa"),
     "does not match the autoscaler"),
    ("alert without a runbook_url", "standalone",
     lambda d: prom_rule(d, "BrokerOverloaded")["annotations"].pop("runbook_url"),
     "lacks annotations: runbook_url"),
    ("runbook_url to a section docs/runbook.md does not have", "standalone",
     lambda d: prom_rule(d, "BrokerOverloaded")["annotations"].update(
         runbook_url=prom_rule(d, "BrokerOverloaded")["annotations"]["runbook_url"] + "-typo"),
     "is not a heading of"),
    ("alert on a label value the broker does not export", "standalone",
     lambda d: replace_in_expr(d, "BrokerConnectionsRefusedAtCap", 'reason="limit"', 'reason="limt"'),
     'exports reason only as'),
    ("dashboard panel on a metric the broker does not export", "standalone",
     lambda d: dashboard_edit(d, lambda dash: dash["panels"][0]["targets"][0].update(
         expr='sum(rate(broker_request_total{namespace="$namespace"}[1m]))')),
     "uses metric broker_request_total"),
    ("dashboard panel on a fixed namespace", "standalone",
     lambda d: dashboard_edit(d, lambda dash: dash["panels"][0]["targets"][0].update(
         expr=dash["panels"][0]["targets"][0]["expr"].replace("$namespace", "broker"))),
     'is not scoped by namespace="$namespace"'),
    ("dashboard target line off the autoscaler's target", "standalone",
     lambda d: dashboard_edit(d, lambda dash: next(
         p for p in dash["panels"] if "thresholds" in p["fieldConfig"]["defaults"])[
             "fieldConfig"]["defaults"]["thresholds"]["steps"][1].update(value=1.0)),
     "autoscaling target: differs"),
    ("KEDA signal switched but not the adapter's", "keda",
     lambda d: find(d, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(
         query=find(d, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"].replace(
             "broker_demand_seconds_total", "broker_worker_busy_seconds_total")),
     "computes the autoscaling signal from"),
    ("scrape job keeps another port name", "standalone",
     lambda d: next(r for r in find_scrape(d)["relabel_configs"]
                    if r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]).update(regex="metrics"),
     "makes 0 targets"),
    ("scrape job without the pod label", "standalone",
     lambda d: find_scrape(d)["relabel_configs"].pop(),
     "target labels namespace="),
    ("scrape job keeps every pod of the namespace", "standalone",
     lambda d: find_scrape(d)["relabel_configs"].pop(0),
     "also scrapes pods that are not the broker's"),
    ("alert added without promtool tests", "standalone",
     lambda d: find(d, "PrometheusRule")["spec"]["groups"][0]["rules"].append(
         {"alert": "BrokerUntested", "expr": "broker_draining > 0", "for": "5m", "labels": {"severity": "info"},
          "annotations": {"summary": "s", "description": "d",
                          "runbook_url": "https://example.com/runbook.md#brokeroverloaded"}}),
     "alert BrokerUntested has no promtool test"),
]


def pick(renders, needs):
    """The render with that kind of autoscaler and the widest replica range."""
    kind = {"hpa": "HorizontalPodAutoscaler", "keda": "ScaledObject"}.get(needs)
    if kind is None:
        return renders[0][0]
    best = None
    for path, docs in renders:
        for d in docs:
            if d.get("kind") == kind:
                spec = d.get("spec") or {}
                top = spec.get("maxReplicas", spec.get("maxReplicaCount", 0))
                if best is None or top > best[0]:
                    best = (top, path)
    return best and best[1]


def self_test(renders, standalone, exported, rule_tests, runbook, out=print):
    """Applies each mutation to a copy of the inputs and requires the checks to fail on it
    with the expected words, and to pass on the inputs as given. Returns the exit code."""
    def check(mutated_renders, mutated_standalone):
        return run_checks(mutated_renders, mutated_standalone, exported, rule_tests, runbook).errors

    errors = check(renders, standalone)
    if errors:
        out(f"{PROG}: self-test: FAIL: the unmutated inputs do not pass:")
        for line in errors:
            out(f"    {line}")
        return 1
    out(f"{PROG}: self-test: unmutated inputs pass")
    failures = 0
    for description, needs, mutate, expected in MUTATIONS:
        target = pick(renders, needs)
        if target is None:
            out(f"{PROG}: self-test: FAIL: no input for mutation '{description}' (needs {needs})")
            failures += 1
            continue
        if needs == "standalone":
            mutated_standalone = copy.deepcopy(standalone)
            docs = [d for _, ds in mutated_standalone for d in ds]
            mutated_renders = [(p, ds) for p, ds in renders if p == target]
        else:
            mutated_standalone = standalone
            mutated_renders = [(p, copy.deepcopy(ds)) for p, ds in renders if p == target]
            docs = mutated_renders[0][1]
        try:
            mutate(docs)
        except (LookupError, KeyError, IndexError, StopIteration) as e:
            out(f"{PROG}: self-test: FAIL: mutation '{description}' does not apply ({e!r})")
            failures += 1
            continue
        errors = check(mutated_renders, mutated_standalone)
        if any(expected in line for line in errors):
            out(f"{PROG}: self-test: caught '{description}' ({Path(target).name}):")
            for line in errors:
                out(f"    {line}")
        else:
            out(f"{PROG}: self-test: FAIL: '{description}' not caught (expected a failure containing "
                f"{expected!r}); failures were:")
            for line in errors or ["(none)"]:
                out(f"    {line}")
            failures += 1
    if failures:
        out(f"{PROG}: self-test: {failures} of {len(MUTATIONS)} mutations not caught")
        return 1
    out(f"{PROG}: self-test: passed, all {len(MUTATIONS)} mutations caught")
    return 0
