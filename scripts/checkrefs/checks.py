"""The checks: every reference between the objects of one render (workloads, Services,
autoscalers, NetworkPolicies, monitors, scrape jobs), collected in a Checker that counts what
it checked and words each failure. The monitoring side (rules, dashboards, namespaces, the
signal) is the MonitoringChecks mixin in monitoring.py."""

import copy
import math
import re
from fractions import Fraction
from pathlib import Path

from .adapter import adapter_resources, adapter_rules, adapter_served
from .monitoring import MonitoringChecks
from .objects import (WORKLOAD_KINDS, Workload, fmt_q, meta, ns_of, quantity, ref, selector_empty,
                      selector_matches)
from .promql import matcher_accepts, promql_metrics, promql_selectors
from .relabel import pod_targets, relabel


class Checker(MonitoringChecks):
    def __init__(self, exported, rule_tests=None, runbook=None):
        self.exported = exported
        self.rule_tests = rule_tests
        self.runbook = runbook
        self.errors = []
        self.checked = 0
        self.alerts = {}  # alert name -> where it is defined
        self.signals = []  # (where, what, metric names) of every autoscaling signal query
        self.targets = []  # (where, what, target value) of every autoscaler

    def fail(self, where, message):
        line = f"{where}: {message}"
        if line not in self.errors:
            self.errors.append(line)

    def ok(self, n=1):
        self.checked += n

    # -- metric names --------------------------------------------------------------------
    def known_metric(self, name, allow_kube):
        return name in self.exported.names or (allow_kube and name.startswith("kube_"))

    def check_metric_names(self, where, what, expr, allow_kube=False):
        """Every metric the expression selects is exported, and every label value it matches on
        a broker series is one the broker exports (a misspelt reason matches nothing)."""
        for name in sorted(promql_metrics(expr)):
            if self.known_metric(name, allow_kube):
                self.ok()
            else:
                self.fail(where, f"{what} uses metric {name}, which the broker does not export "
                                 f"(its /metrics)")
        for name, matchers in promql_selectors(expr):
            for label, (op, value) in matchers.items():
                values = self.exported.label_values(name, label) if name else None
                if values is None or op in ("!=", "!~"):
                    continue
                if any(matcher_accepts(op, value, v) for v in values):
                    self.ok()
                else:
                    self.fail(where, f"{what} matches {name}{{{label}{op}\"{value}\"}}, but the broker "
                                     f"exports {label} only as {', '.join(sorted(values))}")

    # -- one render ----------------------------------------------------------------------
    def check_render(self, label, render, standalone, prometheus_configs=()):
        objs = render + standalone
        self.check_no_secret(label, render)
        self.check_namespaces(label, render, standalone)
        workloads = [Workload(o) for o in render if o.get("kind") in WORKLOAD_KINDS]
        by_kind = {}
        for o in objs:
            by_kind.setdefault(o.get("kind"), []).append(o)
        rules = adapter_rules(standalone)

        def w(obj):
            return f"{label}: {ref(obj)}"

        def pods_selected(namespace, selector, empty_matches_all=False):
            if selector_empty(selector) and not empty_matches_all:
                return []
            return [wl for wl in workloads if wl.namespace == namespace
                    and (selector_empty(selector) or selector_matches(selector, wl.labels))]

        # Workloads: own selector, ports, probes, env, downward API, resources.
        for wl in workloads:
            where = w(wl.obj)
            sel = (wl.obj.get("spec") or {}).get("selector")
            if sel is not None and not selector_matches(sel, wl.labels):
                self.fail(where, "spec.selector does not match the pod template labels")
            self.check_workload(where, wl)

        # Autoscalers.
        scaled = {}  # (namespace, deployment) -> [autoscaler refs]
        autoscaler_names = []  # (namespace, HPA name as kube-state-metrics reports it)
        for hpa in by_kind.get("HorizontalPodAutoscaler", []):
            target = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
            wl = self.check_scale_target(w(hpa), ns_of(hpa), target, workloads, default_kind=None)
            if wl:
                scaled.setdefault((wl.namespace, wl.name), []).append(ref(hpa))
            autoscaler_names.append((ns_of(hpa), meta(hpa).get("name")))
            self.check_hpa(w(hpa), hpa, rules)
        for so in by_kind.get("ScaledObject", []):
            spec = so.get("spec") or {}
            wl = self.check_scale_target(w(so), ns_of(so), spec.get("scaleTargetRef") or {},
                                         workloads, default_kind="Deployment")
            if wl:
                scaled.setdefault((wl.namespace, wl.name), []).append(ref(so))
            hpa_name = ((spec.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {}).get("name")
            autoscaler_names.append((ns_of(so), hpa_name or f"keda-hpa-{meta(so).get('name')}"))
            self.check_scaled_object(w(so), so)
        for (namespace, name), owners in scaled.items():
            if len(owners) > 1:
                self.fail(f"{label}: Deployment {namespace}/{name}",
                          f"scaled by more than one autoscaler: {', '.join(owners)}")
            wl = next(x for x in workloads if (x.namespace, x.name) == (namespace, name))
            if (wl.obj.get("spec") or {}).get("replicas") is not None:
                self.fail(w(wl.obj), f"sets spec.replicas while {owners[0]} manages it: every apply "
                                     f"resets the replica count")
            self.ok()

        # Services.
        for svc in by_kind.get("Service", []):
            self.check_service(w(svc), svc, workloads)

        # NetworkPolicies: selectors and ports.
        policies = by_kind.get("NetworkPolicy", [])
        for np in policies:
            spec = np.get("spec") or {}
            selected = pods_selected(ns_of(np), spec.get("podSelector"), empty_matches_all=True)
            if not selected:
                self.fail(w(np), "podSelector matches no pod template")
                continue
            self.ok()
            for i, rule in enumerate(spec.get("ingress") or []):
                for p in rule.get("ports") or []:
                    port = p.get("port")
                    if port is None:
                        continue
                    end = p.get("endPort")
                    hit = any(
                        (wl.resolve(port) is not None)
                        or (end and isinstance(port, int) and any(port <= n <= end for n in wl.port_numbers()))
                        for wl in selected
                    )
                    if hit:
                        self.ok()
                    else:
                        self.fail(w(np), f"ingress[{i}] port {port} is not a container port of the pods it "
                                         f"selects ({selected[0].describe_ports()})")

        def ingress_allows(wl, port_name, port_number):
            """True if no NetworkPolicy isolates the pod for ingress, or one lets this port in."""
            isolating = []
            for np in policies:
                spec = np.get("spec") or {}
                types = spec.get("policyTypes") or ["Ingress"]
                if ns_of(np) != wl.namespace or "Ingress" not in types:
                    continue
                sel = spec.get("podSelector") or {}
                if not (selector_empty(sel) or selector_matches(sel, wl.labels)):
                    continue
                isolating.append(np)
                for rule in spec.get("ingress") or []:
                    ports = rule.get("ports")
                    if not ports:
                        return True
                    for p in ports:
                        port, end = p.get("port"), p.get("endPort")
                        if port is None or port == port_number or (port_name and port == port_name):
                            return True
                        if end and isinstance(port, int) and port <= port_number <= end:
                            return True
            return not isolating

        # Pod and Service monitors.
        for mon in by_kind.get("PodMonitor", []) + by_kind.get("ServiceMonitor", []):
            self.check_monitor(w(mon), mon, workloads, by_kind.get("Service", []), ingress_allows)

        # Scrape configs for Prometheus without the operator: same targets as the PodMonitor.
        def scraped_ports(wl):
            names = set()
            for mon in by_kind.get("PodMonitor", []):
                spec = mon.get("spec") or {}
                nsel = spec.get("namespaceSelector") or {}
                if (nsel.get("any") or wl.namespace in (nsel.get("matchNames") or [ns_of(mon)])) \
                        and selector_matches(spec.get("selector") or {}, wl.labels):
                    names |= {ep.get("port") for ep in spec.get("podMetricsEndpoints") or []}
            return names or {"admin"}

        for path, config in prometheus_configs:
            self.check_scrape_config(f"{label}: {Path(path).name}", config, workloads, scraped_ports)

        # Services are reachable through the policies too (the zmq port from clients).
        for svc in by_kind.get("Service", []):
            spec = svc.get("spec") or {}
            for wl in pods_selected(ns_of(svc), spec.get("selector") and {"matchLabels": spec["selector"]}):
                for p in spec.get("ports") or []:
                    resolved = wl.resolve(p.get("targetPort", p.get("port")))
                    if resolved and not ingress_allows(wl, *resolved):
                        self.fail(w(svc), f"port {p.get('name') or p.get('port')}: no NetworkPolicy lets "
                                          f"traffic in to container port {resolved[1]} of {wl.name}")

        # PodDisruptionBudgets.
        for pdb in by_kind.get("PodDisruptionBudget", []):
            if pods_selected(ns_of(pdb), (pdb.get("spec") or {}).get("selector")):
                self.ok()
            else:
                self.fail(w(pdb), "selector matches no pod template")

        # Namespace and autoscaler matchers in queries must match this render.
        namespaces = {wl.namespace for wl in workloads}
        for so in by_kind.get("ScaledObject", []):
            for trig in (so.get("spec") or {}).get("triggers") or []:
                query = (trig.get("metadata") or {}).get("query")
                if query:
                    self.check_query_matchers(w(so), "KEDA query", query, {ns_of(so)}, autoscaler_names)
        for rule_obj in [o for o in render if o.get("kind") == "PrometheusRule"]:
            self.check_prometheus_rule(label, rule_obj)
            for group in (rule_obj.get("spec") or {}).get("groups") or []:
                for rule in group.get("rules") or []:
                    what = f"rule {rule.get('alert') or rule.get('record')}"
                    self.check_query_matchers(f"{label}: {ref(rule_obj)}", what, str(rule.get("expr", "")),
                                              namespaces, autoscaler_names)

    def check_scrape_config(self, where, config, workloads, scraped_ports):
        """A pod-role scrape job must give exactly one target per broker pod, on the port the
        PodMonitor scrapes, labelled namespace and pod; and none for other pods."""
        jobs = [j for j in config.get("scrape_configs") or []
                if any(sd.get("role") == "pod" for sd in j.get("kubernetes_sd_configs") or [])]
        if not jobs:
            self.fail(where, "no scrape job with kubernetes_sd_configs role pod")
            return
        for job in jobs:
            jw = f"{where}: job {job.get('job_name')}"
            namespaces = set()
            for sd in job.get("kubernetes_sd_configs") or []:
                names = (sd.get("namespaces") or {}).get("names")
                namespaces = None if namespaces is None or not names else namespaces | set(names)
            decoy = copy.copy(workloads[0]) if workloads else None
            if decoy:
                decoy.labels = {"app.kubernetes.io/name": "other-app"}
                decoy.name = "other-app"
            for wl in workloads + ([decoy] if decoy else []):
                if namespaces is not None and wl.namespace not in namespaces:
                    if wl is not decoy:
                        self.fail(jw, f"does not discover namespace {wl.namespace} of {wl.name}")
                    continue
                pod = f"{wl.name}-5d8f7c9b6-x7k2p"
                for ip in ("10.1.2.3", "fd00::2a"):
                    try:
                        kept = [t for t in (relabel(t, job.get("relabel_configs"))
                                            for t in pod_targets(wl, pod, ip)) if t is not None]
                    except (ValueError, re.error, KeyError) as e:
                        self.fail(jw, f"relabel_configs: {e}")
                        return
                    if wl is decoy:
                        if kept:
                            self.fail(jw, f"also scrapes pods that are not the broker's "
                                          f"(a pod labelled {decoy.labels})")
                        else:
                            self.ok()
                        continue
                    host = f"[{ip}]" if ":" in ip else ip
                    want = {f"{host}:{num}" for _, n, num, _ in wl.ports() if n in scraped_ports(wl)}
                    if len(kept) != 1:
                        self.fail(jw, f"makes {len(kept)} targets for a pod of {wl.name} (want 1, on port "
                                      f"{'/'.join(sorted(scraped_ports(wl)))})")
                        break
                    t = kept[0]
                    if t.get("__address__") not in want:
                        self.fail(jw, f"scrapes {t.get('__address__')} for a pod of {wl.name} at {ip} (want "
                                      f"{', '.join(sorted(want)) or 'port ' + '/'.join(sorted(scraped_ports(wl)))})")
                    elif t.get("namespace") != wl.namespace or t.get("pod") != pod:
                        self.fail(jw, f"target labels namespace={t.get('namespace')!r} pod={t.get('pod')!r}, "
                                      f"want the pod's namespace and name (the adapter rule needs both)")
                    else:
                        self.ok()

    def check_query_matchers(self, where, what, expr, namespaces, autoscaler_names):
        for _metric, matchers in promql_selectors(expr):
            ns = matchers.get("namespace")
            if ns and ns[0] == "=" and ns[1] not in namespaces:
                self.fail(where, f"{what} selects namespace=\"{ns[1]}\"; the broker runs in "
                                 f"{', '.join(sorted(namespaces)) or 'no namespace'}")
            hpa = matchers.get("horizontalpodautoscaler")
            if hpa and hpa[0] in ("=", "=~"):
                for namespace, name in autoscaler_names:
                    if ns and not matcher_accepts(ns[0], ns[1], namespace):
                        continue
                    if matcher_accepts(hpa[0], hpa[1], name):
                        self.ok()
                    else:
                        self.fail(where, f"{what} selects horizontalpodautoscaler{hpa[0]}\"{hpa[1]}\", "
                                         f"which does not match the autoscaler {namespace}/{name}")

    def check_workload(self, where, wl):
        names = [c.get("name") for c in wl.containers]
        for c in wl.containers:
            cname = c.get("name")
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or [] if p.get("name")}
            env = {e.get("name"): e for e in c.get("env") or []}
            # The broker's own endpoints against the declared ports.
            for var, port_name in (("BROKER_FRONTEND", "zmq"), ("BROKER_ADMIN", "admin")):
                if var not in env:
                    continue
                value = str(env[var].get("value", ""))
                m = re.search(r":(\d+)$", value)
                if not m:
                    self.fail(where, f"container {cname}: {var}={value!r} has no port")
                elif port_name not in ports:
                    self.fail(where, f"container {cname}: {var} is set but no container port is named {port_name}")
                elif int(m.group(1)) != ports[port_name]:
                    self.fail(where, f"container {cname}: {var} port {m.group(1)} != containerPort "
                                     f"{port_name} ({ports[port_name]})")
                else:
                    self.ok()
            # Readiness must survive one slow answer: the pod leaves every Service only after
            # failureThreshold failures in a row (docs/kubernetes.md, section 5).
            readiness = c.get("readinessProbe")
            if readiness:
                if readiness.get("failureThreshold", 3) < 2:
                    self.fail(where, f"container {cname}: readinessProbe failureThreshold "
                                     f"{readiness.get('failureThreshold')}: one slow or shed answer takes the "
                                     f"pod out of every Service")
                else:
                    self.ok()
            # Probes.
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(probe_name)
                if not probe:
                    continue
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    if handler in probe:
                        port = probe[handler].get("port")
                        if wl.resolve(port) is None:
                            self.fail(where, f"container {cname}: {probe_name} port {port} is not a "
                                             f"container port ({wl.describe_ports()})")
                        else:
                            self.ok()
                for arg in (probe.get("exec") or {}).get("command") or []:
                    m = re.fullmatch(r"tcp://[^:/]+:(\d+)", str(arg))
                    if m:
                        if int(m.group(1)) in wl.port_numbers():
                            self.ok()
                        else:
                            self.fail(where, f"container {cname}: {probe_name} connects to port "
                                             f"{m.group(1)}, not a container port ({wl.describe_ports()})")
            # Downward API resources.
            for var, e in env.items():
                field = (e.get("valueFrom") or {}).get("resourceFieldRef")
                if not field:
                    continue
                target_name = field.get("containerName") or cname
                target = next((x for x in wl.containers if x.get("name") == target_name), None)
                if target is None:
                    self.fail(where, f"container {cname}: {var} reads resources of container "
                                     f"{target_name}, which does not exist ({', '.join(names)})")
                    continue
                kind, _, resource = str(field.get("resource", "")).partition(".")
                res = target.get("resources") or {}
                value = (res.get(kind) or {}).get(resource)
                if value is None:
                    self.fail(where, f"container {cname}: {var} reads {kind}.{resource}, which container "
                                     f"{target_name} does not set (the kubelet would pass the node's capacity)")
                    continue
                request = quantity((res.get("requests") or {}).get(resource))
                limit = quantity((res.get("limits") or {}).get(resource))
                if kind == "limits" and request != limit:
                    self.fail(where, f"container {target_name}: {var} is sized from limits.{resource} "
                                     f"({(res.get('limits') or {}).get(resource)}) but requests.{resource} is "
                                     f"{(res.get('requests') or {}).get(resource)}: request must equal limit")
                else:
                    self.ok()
        # prometheus.io/port annotation.
        port = wl.annotations.get("prometheus.io/port")
        if port is not None:
            if str(port).isdigit() and int(port) in wl.port_numbers():
                self.ok()
            else:
                self.fail(where, f"annotation prometheus.io/port={port} is not a container port "
                                 f"({wl.describe_ports()})")

    def check_scale_target(self, where, namespace, target, workloads, default_kind):
        kind = target.get("kind") or default_kind
        name = target.get("name")
        api = target.get("apiVersion") or ("apps/v1" if kind == "Deployment" else None)
        for wl in workloads:
            if (wl.namespace, wl.name, wl.obj.get("kind")) == (namespace, name, kind) \
                    and (api is None or api.split("/")[0] == str(wl.obj.get("apiVersion")).split("/")[0]):
                self.ok()
                return wl
        self.fail(where, f"scaleTargetRef {kind}/{name} ({api}) does not exist in namespace {namespace}")
        return None

    def check_scale_up(self, where, behavior, target_value, min_replicas, max_replicas):
        """At 3x capacity the signal reads at least 3, so the HPA formula asks for
        ceil(current x 3 / target) replicas (at most the maximum). From every replica count
        between the minimum and the maximum, one scale-up period must let that through."""
        if not target_value:
            return
        up = (behavior or {}).get("scaleUp")
        if up is None:  # the HPA's default: +100 % or +4 pods per 15 s, whichever is more
            up = {"selectPolicy": "Max", "policies": [{"type": "Percent", "value": 100},
                                                      {"type": "Pods", "value": 4}]}
        select = up.get("selectPolicy", "Max")
        policies = up.get("policies") or []
        lo, hi = max(int(min_replicas or 1), 1), int(max_replicas or 1)
        for current in range(lo, hi):
            need = min(math.ceil(current * Fraction(3) / target_value), hi)
            proposals = []
            for p in policies:
                if p.get("type") == "Percent":
                    proposals.append(math.ceil(current * (1 + Fraction(p.get("value", 0), 100))))
                elif p.get("type") == "Pods":
                    proposals.append(current + p.get("value", 0))
            if select == "Disabled" or not proposals:
                allowed = current
            else:
                allowed = min(hi, (min if select == "Min" else max)(proposals))
            if allowed < need:
                self.fail(where, f"scaleUp lets {current} replicas grow to {allowed} in one period, but at "
                                 f"3x capacity the HPA formula asks for {need} (ceil({current} x 3 / "
                                 f"{fmt_q(target_value)}))")
                return
        self.ok()

    def check_hpa(self, where, hpa, rules):
        spec = hpa.get("spec") or {}
        served = {}
        for rule in rules:
            for name in adapter_served(rule):
                served.setdefault(name, []).append(rule)
        targets = []
        for metric in spec.get("metrics") or []:
            mtype = metric.get("type")
            if mtype == "Resource" and (metric.get("resource") or {}).get("name") == "cpu" \
                    or mtype == "ContainerResource" and (metric.get("containerResource") or {}).get("name") == "cpu":
                self.fail(where, "scales on CPU: the broker scales on concurrency per worker only "
                                 "(a CPU target would override it)")
                continue
            if mtype not in ("Pods", "Object"):
                continue
            body = metric.get("pods" if mtype == "Pods" else "object") or {}
            name = (body.get("metric") or {}).get("name")
            if name not in served:
                self.fail(where, f"{mtype} metric {name} is not served by any prometheus-adapter rule "
                                 f"(served: {', '.join(sorted(served)) or 'none'})")
                continue
            need = "pod" if mtype == "Pods" else str((body.get("describedObject") or {}).get("kind", "")).lower()
            if not any(need in adapter_resources(r) for r in served[name]):
                self.fail(where, f"{mtype} metric {name}: its adapter rule maps no `{need}` resource")
                continue
            self.ok()
            target = body.get("target") or {}
            targets.append(quantity(target.get("averageValue") or target.get("value")))
            self.targets.append((where, f"HPA target for {name}", targets[-1]))
        if targets:
            self.check_scale_up(where, spec.get("behavior"), min(t for t in targets if t) if any(targets) else None,
                                spec.get("minReplicas", 1), spec.get("maxReplicas"))

    def check_scaled_object(self, where, so):
        spec = so.get("spec") or {}
        min_replicas = spec.get("minReplicaCount", 0)
        if "cooldownPeriod" in spec and min_replicas > 0:
            self.fail(where, f"cooldownPeriod does nothing with minReplicaCount {min_replicas} "
                             f"(KEDA applies it only when scaling to zero)")
        thresholds = []
        for trig in spec.get("triggers") or []:
            ttype = trig.get("type")
            md = trig.get("metadata") or {}
            if ttype in ("cpu", "memory"):
                self.fail(where, f"has a {ttype} trigger: the broker scales on concurrency per worker only")
                continue
            if ttype != "prometheus":
                continue
            self.check_metric_names(where, "KEDA query", str(md.get("query", "")))
            self.signals.append((where, "KEDA query", promql_metrics(str(md.get("query", "")))))
            if str(md.get("ignoreNullValues", "true")).lower() != "false":
                self.fail(where, "prometheus trigger without ignoreNullValues: \"false\": an empty result "
                                 "(nothing scraped) would read as 0 and scale down to the minimum")
            else:
                self.ok()
            if trig.get("metricType", "AverageValue") != "Value":
                self.fail(where, f"prometheus trigger has metricType {trig.get('metricType', 'AverageValue')}: "
                                 f"the threshold would be divided by the pod count; use Value with a "
                                 f"per-worker query")
            thresholds.append(quantity(md.get("threshold")))
            self.targets.append((where, "KEDA threshold", quantity(md.get("threshold"))))
        behavior = ((spec.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {}).get("behavior")
        if thresholds and all(thresholds):
            self.check_scale_up(where, behavior, min(thresholds), max(min_replicas, 1),
                                spec.get("maxReplicaCount", 100))
        if not (behavior or {}).get("scaleDown", {}).get("policies"):
            self.fail(where, "advanced.horizontalPodAutoscalerConfig.behavior has no scaleDown policies: "
                             "KEDA would scale down at the HPA's default pace")

    def check_service(self, where, svc, workloads):
        spec = svc.get("spec") or {}
        if spec.get("type") == "ExternalName":
            return
        selector = spec.get("selector")
        if not selector:
            self.fail(where, "has no selector")
            return
        selected = [wl for wl in workloads if wl.namespace == ns_of(svc)
                    and all(wl.labels.get(k) == v for k, v in selector.items())]
        if not selected:
            self.fail(where, f"selector {selector} matches no pod template")
            return
        self.ok()
        exposes = set()
        for p in spec.get("ports") or []:
            target = p.get("targetPort", p.get("port"))
            for wl in selected:
                resolved = wl.resolve(target)
                if resolved is None:
                    self.fail(where, f"port {p.get('name') or p.get('port')}: targetPort {target} is not a "
                                     f"container port of {wl.name} ({wl.describe_ports()})")
                else:
                    exposes.add(resolved[0])
                    self.ok()
        if "zmq" in exposes and "admin" in exposes:
            self.fail(where, "exposes both the client port (zmq) and the admin port: clients must not "
                             "reach /metrics and the probes")

    def check_monitor(self, where, mon, workloads, services, ingress_allows):
        spec = mon.get("spec") or {}
        if "release" not in (meta(mon).get("labels") or {}):
            self.fail(where, "no `release` label: kube-prometheus-stack selects monitors by "
                             "release=<helm release name> (set it in the overlay)")
        nsel = spec.get("namespaceSelector") or {}
        if nsel.get("any"):
            namespaces = None
        else:
            namespaces = set(nsel.get("matchNames") or [ns_of(mon)])
        selector = spec.get("selector") or {}
        if mon.get("kind") == "PodMonitor":
            selected = [wl for wl in workloads if (namespaces is None or wl.namespace in namespaces)
                        and not selector_empty(selector) and selector_matches(selector, wl.labels)]
            if not selected:
                self.fail(where, f"selector {selector} in namespaces {sorted(namespaces or ['*'])} "
                                 f"matches no pod template")
                return
            self.ok()
            for ep in spec.get("podMetricsEndpoints") or []:
                # `port` is a container port name; `targetPort` (deprecated) a name or number.
                port = ep.get("port", ep.get("targetPort"))
                for wl in selected:
                    if "port" in ep:
                        resolved = wl.resolve(port) if port in wl.port_names() else None
                    else:
                        resolved = wl.resolve(port)
                    if resolved is None:
                        self.fail(where, f"endpoint port {port} is not a container port of {wl.name} "
                                         f"({wl.describe_ports()})")
                    elif not ingress_allows(wl, *resolved):
                        self.fail(where, f"no NetworkPolicy lets Prometheus in to port {port} of {wl.name}")
                    else:
                        self.ok()
        else:
            svcs = [s for s in services if (namespaces is None or ns_of(s) in namespaces)
                    and selector_matches(selector, meta(s).get("labels"))]
            if not svcs:
                self.fail(where, f"selector {selector} matches no Service")
                return
            for ep in spec.get("endpoints") or []:
                port = ep.get("port")
                if any(port == p.get("name") for s in svcs for p in (s.get("spec") or {}).get("ports") or []):
                    self.ok()
                else:
                    self.fail(where, f"endpoint port {port} is not a port name of the Services it selects")


def run_checks(renders, standalone, exported, rule_tests=None, runbook=None):
    checker = Checker(exported, rule_tests, runbook)
    standalone_docs, prometheus_configs = [], []
    for path, docs in standalone:
        prometheus_configs += [(path, d) for d in docs if "scrape_configs" in d]
        checker.check_standalone(Path(path).name, docs)
        standalone_docs += docs
    for path, docs in renders:
        checker.check_render(Path(path).name, docs, standalone_docs, prometheus_configs)
    checker.finish()
    return checker

