"""metrics.py - counters and a latency histogram, rendered in the Prometheus text format.

What it guarantees: every update is thread-safe and O(1) (a dict update under one lock), so
counting never slows the chunk path; `render()` writes the text exposition format 0.0.4
(https://prometheus.io/docs/instrumenting/exposition_formats/): HELP and TYPE lines, label
values escaped, histogram buckets cumulative with `+Inf`, `_sum` and `_count`.
Every label set is bounded, since label values come from requests and each new one is a
series kept for the life of the process (issue #15: 3,000 made-up method names grew it by
58 MiB): a request's route is a label of the routing table (or "none"), its method one of the
`methods` given (or "other"), its status a three-digit code (or "other"); and no counter holds
more than MAX_SERIES label sets: past that, new ones are counted together under "other".
What it does not do: persist anything (counters restart at zero with the process, as
Prometheus expects) or push anywhere.
"""
from __future__ import annotations

import threading

# Request durations (seconds): an fsync'd chunk takes ~1 ms here, a 64 MiB one a second or so.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)

COUNTERS = {
    "m1_http_requests_total": "HTTP requests answered, by route, method and status.",
    "m1_chunk_bytes_received_total": "Bytes of new chunks stored (duplicates not counted).",
    "m1_chunks_stored_total": "New chunks stored.",
    "m1_chunks_duplicate_total": "Chunks received again with the same bytes.",
    "m1_chunks_in_place_total": "New chunks written straight into the video file as they "
                                "arrived (the form's text fields came first): one write.",
    "m1_uploads_completed_total": "Uploads that became complete in this process.",
    "m1_uploads_deleted_total": "Uploads deleted (by request or retention).",
    "m1_s3_retries_total": "Requests to the object store tried again, by S3 operation.",
    "m1_s3_failures_total": "Requests to the object store given up after every retry, by "
                            "S3 operation.",
}
# What observe_storage reports, and the labels it may carry: a fixed set (s3client.OPERATIONS).
STORAGE_OUTCOMES = {"retry": "m1_s3_retries_total", "failure": "m1_s3_failures_total"}
HISTOGRAM = ("m1_http_request_duration_seconds",
             "Time from the request line to the response, by route.")
MAX_SERIES = 1000                # label sets per counter (routes x methods x statuses < 1000)
OTHER = "other"


class Metrics:
    def __init__(self, methods=()):
        self._methods = frozenset(methods)       # request methods counted by name
        self._lock = threading.Lock()
        self._counters = {}          # (name, ((label, value), ...)) -> number
        self._series = {}            # name -> label sets it holds
        self._histograms = {}        # route -> [bucket counts..., sum, count]

    def count(self, name, amount=1, **labels):
        key = (name, tuple(sorted(labels.items())) if labels else ())
        with self._lock:
            self._add(key, amount)

    def _add(self, key, amount):
        """Under the lock: `amount` more for the series `key` (folded into OTHER once its
        counter holds MAX_SERIES label sets)."""
        if key not in self._counters:
            name = key[0]
            if self._series.get(name, 0) >= MAX_SERIES:
                key = (name, tuple((label, OTHER) for label, _ in key[1]))
            self._series[name] = self._series.get(name, 0) + (key not in self._counters)
        self._counters[key] = self._counters.get(key, 0) + amount

    def observe_request(self, route, method, status, seconds):
        """`route` is a routing-table label (a fixed set); method and status are folded."""
        status = status if isinstance(status, int) and 100 <= status <= 599 else OTHER
        key = ("m1_http_requests_total", (   # the labels in sorted order, as count() keys them
            ("method", method if method in self._methods else OTHER), ("route", route),
            ("status", str(status))))
        with self._lock:                     # one lock for the counter and the histogram
            self._add(key, 1)
            row = self._histograms.get(route)
            if row is None:
                row = self._histograms[route] = [0] * (len(DURATION_BUCKETS) + 2)
            for i, bound in enumerate(DURATION_BUCKETS):
                if seconds <= bound:
                    row[i] += 1
                    break
            row[-2] += seconds
            row[-1] += 1

    def on_store_event(self, event):
        """A store listener (add_listener): counts what the store did."""
        if event["type"] == "chunk":
            with self._lock:
                self._add(("m1_chunks_stored_total", ()), 1)
                self._add(("m1_chunk_bytes_received_total", ()), event["size"])
        elif event["type"] == "completed":
            self.count("m1_uploads_completed_total")
        elif event["type"] == "deleted":
            self.count("m1_uploads_deleted_total")

    def on_storage_request(self, operation, outcome):
        """The store's observe_storage callback: a request to S3 was retried or given up.
        `operation` comes from s3client's fixed set, so the label set stays bounded."""
        name = STORAGE_OUTCOMES.get(outcome)
        if name is not None:
            self.count(name, operation=operation)

    def render(self, gauges):
        """The exposition text; `gauges` is [(name, help, value)] read at scrape time."""
        with self._lock:
            counters = dict(self._counters)
            histograms = {route: list(row) for route, row in self._histograms.items()}
        lines = []
        for name, text in sorted(COUNTERS.items()):
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s counter" % name]
            series = sorted((k, v) for k, v in counters.items() if k[0] == name)
            if not series and name != "m1_http_requests_total":
                lines.append("%s 0" % name)
            for (_, labels), value in series:
                lines.append("%s%s %s" % (name, _labels(labels), _number(value)))
        name, text = HISTOGRAM
        lines += ["# HELP %s %s" % (name, text), "# TYPE %s histogram" % name]
        for route, row in sorted(histograms.items()):
            cumulative = 0
            for bound, hits in zip(DURATION_BUCKETS, row):
                cumulative += hits
                lines.append("%s_bucket%s %d" % (name, _labels(
                    (("le", _number(bound)), ("route", route))), cumulative))
            lines.append("%s_bucket%s %d" % (name, _labels((("le", "+Inf"), ("route", route))),
                                             row[-1]))
            lines.append("%s_sum%s %s" % (name, _labels((("route", route),)), repr(row[-2])))
            lines.append("%s_count%s %d" % (name, _labels((("route", route),)), row[-1]))
        for gauge, text, value in gauges:
            lines += ["# HELP %s %s" % (gauge, text), "# TYPE %s gauge" % gauge,
                      "%s %s" % (gauge, _number(value))]
        return "\n".join(lines) + "\n"


def _labels(pairs):
    if not pairs:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (k, _escape(v)) for k, v in pairs)


def _escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value):
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return str(value)
