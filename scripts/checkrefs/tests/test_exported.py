"""Unit tests: reading names and label values from a scrape, and the binary that must exist."""

import unittest
from pathlib import Path

from checkrefs.exported import ExportError, Exported, scrape_binary

SCRAPE = """\
# HELP broker_requests_total Replies sent.
# TYPE broker_requests_total counter
broker_requests_total{outcome="ok"} 3
broker_requests_total{outcome="overloaded"} 0
# TYPE broker_request_duration_seconds histogram
broker_request_duration_seconds_bucket{le="0.5"} 1
broker_request_duration_seconds_sum 0.1
broker_request_duration_seconds_count 1
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 8077312
"""


class ExportedTest(unittest.TestCase):
    def test_histograms_are_their_three_series(self):
        names = Exported(SCRAPE).names
        self.assertEqual(names, {"broker_requests_total", "broker_request_duration_seconds_bucket",
                                 "broker_request_duration_seconds_sum", "broker_request_duration_seconds_count",
                                 "process_resident_memory_bytes"})

    def test_label_values_come_from_the_samples(self):
        exported = Exported(SCRAPE)
        self.assertEqual(exported.label_values("broker_requests_total", "outcome"), {"ok", "overloaded"})
        self.assertIsNone(exported.label_values("broker_requests_total", "reason"))

    def test_a_scrape_without_types_is_an_error(self):
        with self.assertRaises(ExportError):
            Exported("broker_workers 2\n")

    def test_a_missing_binary_is_named(self):
        with self.assertRaisesRegex(ExportError, "does not exist: build it first"):
            scrape_binary(Path("/nonexistent/broker"))


if __name__ == "__main__":
    unittest.main()
