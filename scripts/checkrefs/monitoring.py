"""The monitoring side of the checks, mixed into Checker: the prometheus-adapter rule, the
PrometheusRules (runbook_url to a section of docs/runbook.md, promtool tests for every alert),
the Grafana dashboards (every query on an exported metric, scoped by the dashboard's
$namespace), one autoscaling signal and one target everywhere, no Secret in a render, and no
reference from one install to another namespace than its own and its monitoring namespace."""

import json
import re
from pathlib import Path

import yaml

from .adapter import adapter_rules, adapter_served
from .objects import meta, ns_of, ref
from .promql import promql_metrics, promql_selectors

ALERT_ANNOTATIONS = ("summary", "description", "runbook_url")
# `<service>.<namespace>.svc` in a URL or a host name.
SVC_RE = re.compile(r"(?<![\w.-])([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.svc\b")
NAMESPACE_MATCHER_RE = re.compile(r'\bnamespace\s*(=~|!~|!=|=)\s*"([^"]*)"')


def runbook_anchors(path):
    """GitHub's anchors for the headings of a Markdown file."""
    anchors = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            text = re.sub(r"[`*_]", "", m.group(1)).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def strings(node, path=""):
    """(path, value) of every string in a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def dashboards(docs):
    """(ConfigMap, file name, dashboard) for every Grafana dashboard in ConfigMaps."""
    for obj in docs:
        if obj.get("kind") != "ConfigMap":
            continue
        for key, text in (obj.get("data") or {}).items():
            if key.endswith(".json"):
                yield obj, key, json.loads(text)


def install_namespaces(render):
    """The install's namespace (its Deployment's) and its monitoring namespace (the one its
    NetworkPolicy lets in to the admin port), None where the render has none."""
    namespace = next((ns_of(o) for o in render if o.get("kind") == "Deployment"), None)
    monitoring = None
    for np in (o for o in render if o.get("kind") == "NetworkPolicy"):
        for rule in (np.get("spec") or {}).get("ingress") or []:
            if any(p.get("port") in (8000, "admin") for p in rule.get("ports") or []):
                for peer in rule.get("from") or []:
                    labels = (peer.get("namespaceSelector") or {}).get("matchLabels") or {}
                    monitoring = labels.get("kubernetes.io/metadata.name", monitoring)
    return namespace, monitoring


class MonitoringChecks:
    """Checks on monitoring objects; the Checker provides fail/ok and check_metric_names."""

    # -- standalone inputs (once each) ----------------------------------------------------
    def check_standalone(self, label, docs):
        for rule in adapter_rules(docs):
            where = f"{label}: prometheus-adapter rule"
            self.check_metric_names(where, "adapter seriesQuery", rule.get("seriesQuery", ""))
            self.check_metric_names(where, "adapter metricsQuery", rule.get("metricsQuery", ""))
            self.signals.append((where, "adapter metricsQuery", promql_metrics(rule.get("metricsQuery", ""))))
            if not adapter_served(rule):
                self.fail(where, f"adapter rule {rule.get('seriesQuery')!r} serves no metric "
                                 f"(name.matches does not match its series)")
        objs = [d for d in docs if "kind" in d]
        for obj in objs:
            if obj.get("kind") == "PrometheusRule":
                self.check_prometheus_rule(label, obj)
        for cm, key, dashboard in dashboards(objs):
            self.check_dashboard(f"{label}: {ref(cm)} {key}", dashboard)

    # -- PrometheusRules -------------------------------------------------------------------
    def check_prometheus_rule(self, label, obj):
        where = f"{label}: {ref(obj)}"
        if "release" not in (meta(obj).get("labels") or {}):
            self.fail(where, "no `release` label: kube-prometheus-stack's default ruleSelector "
                             "does not load it")
        anchors = runbook_anchors(self.runbook) if self.runbook else None
        for group in (obj.get("spec") or {}).get("groups") or []:
            for rule in group.get("rules") or []:
                name = rule.get("alert") or rule.get("record")
                self.check_metric_names(where, f"rule {name}", str(rule.get("expr", "")), allow_kube=True)
                if "alert" not in rule:
                    continue
                self.alerts.setdefault(name, where)
                annotations = rule.get("annotations") or {}
                missing = [a for a in ALERT_ANNOTATIONS if not annotations.get(a)]
                if not rule.get("for"):
                    self.fail(where, f"alert {name} has no `for:`")
                if not (rule.get("labels") or {}).get("severity"):
                    self.fail(where, f"alert {name} has no severity label")
                if missing:
                    self.fail(where, f"alert {name} lacks annotations: {', '.join(missing)}")
                url = str(annotations.get("runbook_url", ""))
                if url and not re.match(r"https?://[^#\s]+#[\w-]+$", url):
                    self.fail(where, f"alert {name}: runbook_url {url!r} is not an http(s) URL with a "
                                     f"#section")
                elif url and anchors is not None and url.rsplit("#", 1)[1] not in anchors:
                    self.fail(where, f"alert {name}: runbook_url section #{url.rsplit('#', 1)[1]} is not a "
                                     f"heading of {self.runbook}")
                self.ok()

    def check_rule_tests(self):
        fires, quiet = set(), set()
        for path in sorted(Path(self.rule_tests).glob("*.yaml")):
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for test in doc.get("tests") or []:
                for case in test.get("alert_rule_test") or []:
                    (fires if case.get("exp_alerts") else quiet).add(case.get("alertname"))
        for alert, where in self.alerts.items():
            if alert not in fires:
                self.fail(where, f"alert {alert} has no promtool test in {self.rule_tests} where it fires")
            if alert not in quiet:
                self.fail(where, f"alert {alert} has no promtool test in {self.rule_tests} where it stays quiet")
            self.ok()
        for name in sorted((fires | quiet) - set(self.alerts)):
            self.fail(str(self.rule_tests), f"promtool tests test alert {name}, which no rule defines")

    # -- dashboards ------------------------------------------------------------------------
    def check_dashboard(self, where, dashboard):
        variables = {v.get("name") for v in (dashboard.get("templating") or {}).get("list") or []}
        if "namespace" not in variables:
            self.fail(where, "has no `namespace` variable: its panels would mix every install")
        for panel in dashboard.get("panels") or []:
            what = f"panel {panel.get('title')!r}"
            targets = panel.get("targets") or []
            if not targets:
                self.fail(where, f"{what} has no query")
            for target in targets:
                expr = str(target.get("expr", ""))
                self.check_metric_names(where, what, expr, allow_kube=True)
                for metric, matchers in promql_selectors(expr):
                    if matchers.get("namespace") != ("=", "$namespace"):
                        self.fail(where, f"{what}: {metric or 'a selector'} is not scoped by "
                                         f'namespace="$namespace"')
                    else:
                        self.ok()
            steps = (((panel.get("fieldConfig") or {}).get("defaults") or {}).get("thresholds") or {}).get("steps")
            line = ((((panel.get("fieldConfig") or {}).get("defaults") or {}).get("custom") or {})
                    .get("thresholdsStyle") or {}).get("mode") == "line"
            if line and steps:
                # The panel that draws the autoscaling signal against its target.
                for target in targets:
                    self.signals.append((where, what, promql_metrics(str(target.get("expr", "")))))
                values = [s.get("value") for s in steps if s.get("value") is not None]
                self.targets.append((where, f"{what} target line", values[0] if values else None))

    # -- renders ---------------------------------------------------------------------------
    def check_no_secret(self, label, render):
        for obj in render:
            if obj.get("kind") == "Secret":
                self.fail(f"{label}: {ref(obj)}", "an overlay renders a Secret: `kubectl apply -k` would "
                                                  "overwrite the real one (create it out of band)")
        self.ok()

    def check_namespaces(self, label, render, standalone):
        """Everything in an install refers to its own namespace, or to its monitoring namespace
        (where the monitoring objects given with --with live, if any)."""
        namespace, monitoring = install_namespaces(render)
        if namespace is None:
            return
        for obj in render:
            where = f"{label}: {ref(obj)}"
            if meta(obj).get("namespace") != namespace:
                self.fail(where, f"is in namespace {meta(obj).get('namespace')}, not the install's {namespace}")
            for path, value in strings(obj):
                for op, ns in NAMESPACE_MATCHER_RE.findall(value):
                    if op == "=" and ns != namespace:
                        self.fail(where, f'{path} selects namespace="{ns}"; the install is in {namespace}')
                for m in SVC_RE.finditer(value):
                    if m.group(3) not in (namespace, monitoring):
                        self.fail(where, f"{path} names {m.group(0)}, in namespace {m.group(3)}: neither the "
                                         f"install's ({namespace}) nor its monitoring namespace ({monitoring})")
            nsel = (obj.get("spec") or {}).get("namespaceSelector") if obj.get("kind") == "PodMonitor" else None
            if nsel and (nsel.get("any") or set(nsel.get("matchNames") or []) - {namespace}):
                self.fail(where, f"namespaceSelector {nsel} reaches beyond the install's namespace {namespace}")
            self.ok()
        for so in (o for o in render if o.get("kind") == "ScaledObject"):
            for trig in (so.get("spec") or {}).get("triggers") or []:
                address = str((trig.get("metadata") or {}).get("serverAddress", ""))
                m = SVC_RE.search(address)
                if trig.get("type") == "prometheus" and (not m or m.group(3) != monitoring):
                    self.fail(f"{label}: {ref(so)}", f"serverAddress {address!r} is not a Service in the "
                                                     f"monitoring namespace {monitoring} (the Prometheus the "
                                                     f"NetworkPolicy lets scrape the pods)")
                else:
                    self.ok()
        homes = {ns_of(o) for o in standalone if "kind" in o and meta(o).get("namespace")}
        if homes and monitoring not in homes:
            self.fail(f"{label}", f"the NetworkPolicy lets in monitoring namespace {monitoring}, but the "
                                  f"monitoring objects are in {', '.join(sorted(homes))}")

    # -- once, after every input -----------------------------------------------------------
    def finish(self):
        if self.rule_tests is not None:
            self.check_rule_tests()
        # One signal: the adapter rule, the KEDA query and the dashboard compute it from the
        # same metrics, so switching the signal in one place and not another fails here.
        if self.signals:
            first_where, first_what, first = self.signals[0]
            for where, what, names in self.signals[1:]:
                if names != first:
                    self.fail(where, f"{what} computes the autoscaling signal from {', '.join(sorted(names))}; "
                                     f"{first_what} ({first_where}) from {', '.join(sorted(first))}")
                else:
                    self.ok()
        values = {float(v) for _, _, v in self.targets if v is not None}
        if len(values) > 1:
            self.fail("autoscaling target", "differs: " + "; ".join(
                f"{what} {float(v):g} ({where})" for where, what, v in self.targets))
        elif values:
            self.ok()
