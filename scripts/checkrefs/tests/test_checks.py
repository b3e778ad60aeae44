"""Unit tests: the checks on small hand-written objects, each failing for one reason."""

import unittest

from checkrefs.checks import run_checks
from checkrefs.exported import Exported
from checkrefs.relabel import relabel

SCRAPE = """\
# TYPE broker_workers gauge
broker_workers 2
# TYPE broker_inflight_seconds_total counter
broker_inflight_seconds_total 0
# TYPE broker_connections_refused_total counter
broker_connections_refused_total{reason="limit"} 0
"""


def deployment(namespace="ns-a"):
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "broker", "namespace": namespace},
            "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "broker"}},
                     "template": {"metadata": {"labels": {"app.kubernetes.io/name": "broker"}},
                                  "spec": {"containers": [{"name": "broker", "ports": [
                                      {"name": "zmq", "containerPort": 5555},
                                      {"name": "admin", "containerPort": 8000}]}]}}}}


def netpol(monitoring, namespace="ns-a"):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "broker", "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "broker"}},
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
                         "kubernetes.io/metadata.name": monitoring}}}], "ports": [{"port": 8000}]}]}}


def errors(render, standalone=()):
    return run_checks([("r.yaml", render)], [("s.yaml", list(standalone))], Exported(SCRAPE)).errors


class ChecksTest(unittest.TestCase):
    def test_a_consistent_install_passes(self):
        self.assertEqual(errors([deployment(), netpol("mon")]), [])

    def test_an_object_in_another_namespace_fails(self):
        found = errors([deployment(), netpol("mon", namespace="ns-b")])
        self.assertTrue(any("is in namespace ns-b, not the install's ns-a" in e for e in found), found)

    def test_a_secret_fails(self):
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "ns-a"}}
        self.assertTrue(any("renders a Secret" in e for e in errors([deployment(), netpol("mon"), secret])))

    def test_a_query_on_another_namespace_fails(self):
        rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                "metadata": {"name": "r", "namespace": "ns-a", "labels": {"release": "x"}},
                "spec": {"groups": [{"name": "g", "rules": [{"record": "x", "expr": 'broker_workers{namespace="ns-b"}'}]}]}}
        found = errors([deployment(), netpol("mon"), rule])
        self.assertTrue(any('selects namespace="ns-b"' in e for e in found), found)

    def test_a_label_value_the_broker_does_not_export_fails(self):
        rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                "metadata": {"name": "r", "namespace": "mon", "labels": {"release": "x"}},
                "spec": {"groups": [{"name": "g", "rules": [
                    {"record": "x", "expr": 'rate(broker_connections_refused_total{reason="limt"}[5m])'}]}]}}
        found = errors([deployment(), netpol("mon")], [rule])
        self.assertTrue(any("exports reason only as limit" in e for e in found), found)

    def test_monitoring_objects_outside_the_admitted_namespace_fail(self):
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "d", "namespace": "observability"}}
        found = errors([deployment(), netpol("mon")], [cm])
        self.assertTrue(any("lets in monitoring namespace mon" in e for e in found), found)


class RelabelTest(unittest.TestCase):
    def test_keep_and_replace_as_prometheus_does(self):
        configs = [{"source_labels": ["app"], "regex": "broker", "action": "keep"},
                   {"source_labels": ["__meta_ns"], "target_label": "namespace"}]
        self.assertEqual(relabel({"app": "broker", "__meta_ns": "a"}, configs),
                         {"app": "broker", "__meta_ns": "a", "namespace": "a"})
        self.assertIsNone(relabel({"app": "other"}, configs))


if __name__ == "__main__":
    unittest.main()
