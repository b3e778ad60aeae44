"""Unit tests: metric names and matchers found in PromQL expressions."""

import unittest

from checkrefs.promql import matcher_accepts, promql_metrics, promql_selectors


class PromqlTest(unittest.TestCase):
    def test_metric_names_skip_functions_keywords_and_labels(self):
        expr = ('sum by (namespace, le) (rate(broker_request_duration_seconds_bucket{outcome="ok"}[5m]))'
                ' / on (namespace) group_left sum(broker_workers) > 0.5 and on (namespace) vector(1)')
        self.assertEqual(promql_metrics(expr), {"broker_request_duration_seconds_bucket", "broker_workers"})

    def test_adapter_templates_are_not_metrics(self):
        expr = "sum by (<<.GroupBy>>) (rate(broker_inflight_seconds_total{<<.LabelMatchers>>}[1m]))"
        self.assertEqual(promql_metrics(expr), {"broker_inflight_seconds_total"})

    def test_selectors_give_each_matcher(self):
        found = promql_selectors('absent(broker_workers{namespace="ns-a", pod=~"b-.*"})')
        self.assertEqual(found, [("broker_workers", {"namespace": ("=", "ns-a"), "pod": ("=~", "b-.*")})])

    def test_matchers_are_anchored_like_prometheus(self):
        self.assertTrue(matcher_accepts("=~", "broker|keda-hpa-broker", "keda-hpa-broker"))
        self.assertFalse(matcher_accepts("=~", "broker", "broker-v2"))
        self.assertTrue(matcher_accepts("!=", "a", "b"))
        self.assertFalse(matcher_accepts("!~", "a.*", "abc"))


if __name__ == "__main__":
    unittest.main()
