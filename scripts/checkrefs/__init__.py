"""check-references: checks every reference between the objects of rendered Kubernetes
manifests, and between them and what the broker binary exports (scripts/check-references is
the entry point; `python3 -m unittest discover -s scripts/checkrefs/tests` runs its tests).

Each RENDER (`kubectl kustomize` of one overlay) is checked as one set of objects, together
with the standalone files given with --with (the rendered deploy/monitoring, the
prometheus-adapter Helm values, the scrape job for Prometheus without the operator):

- autoscalers: targets exist, one autoscaler per Deployment, no `spec.replicas` under one, the
  HPA's metric served by an adapter rule, no CPU metric, the scale-up policy lets the HPA
  formula's answer at 3x capacity through in one step, KEDA on `metricType: Value` with
  `ignoreNullValues: "false"`; one signal (the same metrics in the adapter rule, the KEDA query
  and the dashboard) and one target (HPA, KEDA, dashboard line);
- metrics: every metric name and label value in adapter queries, KEDA queries, alert rules and
  dashboard panels is one the running broker exports (kube_* allowed in rules and dashboards);
- namespaces: every object is in the install's namespace, every PromQL namespace matcher is
  it, every `<svc>.<ns>.svc` name is in it or in the monitoring namespace (the one the
  NetworkPolicy lets in to the admin port, where the monitoring objects live), KEDA's
  serverAddress is in the monitoring namespace, the PodMonitor does not reach beyond;
- Services, NetworkPolicies, PodMonitors (with a `release` label), the scrape job (run through
  its relabelling on the rendered pods), probes, ports, downward-API resources;
- alerts: `for`, severity, summary, description and a runbook_url to a section of
  docs/runbook.md; with --rule-tests, promtool tests that see each fire and stay quiet;
- no Secret in any render.

--self-test applies mutations to copies of the inputs and requires each to be caught.
"""
