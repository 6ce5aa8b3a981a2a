"""memory: peak RSS of m1server after one 1 MiB chunk vs one 256 MiB chunk (SPEC §9).

A streaming server holds a bounded buffer whatever the chunk size, so the two peaks should be
close: the target is a difference of at most 16 MiB. Each size gets a fresh server process
(peak RSS never goes down, so one process cannot measure both). The figure is VmHWM from
/proc/<pid>/status, read after the 200 and after the server has reported the upload's sha256
(so background work after completion is counted too). Off Linux it falls back to sampling
`ps -o rss=` every 10 ms during the upload, which can miss a short spike.
"""
from __future__ import annotations

import threading
import time

import common as c

NAME = "memory"
SMALL_BYTES = 1 * c.MIB
LARGE_BYTES = 256 * c.MIB
TARGET_DIFF_MIB = 16.0
SETTLE_DEADLINE_S = 15.0


def run(ctx):
    pool = c.random_pool(LARGE_BYTES)
    figures = {}
    notes = []
    with c.Workspace(NAME) as ws:
        for label, size in (("1MiB", SMALL_BYTES), ("256MiB", LARGE_BYTES)):
            peak, idle, source, note = one_upload(ctx, ws.sub(label), pool, size)
            figures[label] = {"chunk_bytes": size, "peak_rss_kib": peak, "idle_rss_kib": idle,
                              "source": source}
            if note:
                notes.append("%s: %s" % (label, note))
            ctx.log("memory %-6s chunk: peak %s KiB (%s)" % (label, peak, source))
    small = figures["1MiB"]["peak_rss_kib"]
    large = figures["256MiB"]["peak_rss_kib"]
    diff_mib = (large - small) / 1024.0 if small and large else None
    figures["difference_mib"] = diff_mib
    rows = [
        ["idle RSS after start", mib(figures["1MiB"]["idle_rss_kib"]), ""],
        ["peak RSS, one 1 MiB chunk", mib(small), figures["1MiB"]["source"]],
        ["peak RSS, one 256 MiB chunk", mib(large), figures["256MiB"]["source"]],
        ["difference", "%.1f MiB" % diff_mib if diff_mib is not None else "n/a", ""],
    ]
    return {
        "title": "memory: peak RSS, fresh server per chunk size",
        "figures": figures,
        "rows": rows,
        "targets": [c.target("memory 256 MiB - 1 MiB chunk peak", diff_mib, TARGET_DIFF_MIB,
                             "lower", "MiB")],
        "notes": notes,
    }


def one_upload(ctx, directory, pool, size):
    file_id = "bench_memory_%d" % size
    note = None
    with c.ServerProcess("m1server", directory, ctx.python).start() as server:
        idle = c.rss_kib(server.pid)
        request = c.upload_request(server.host, server.port, file_id, 0, "completed",
                                   c.video_payload(pool, 0, size, True))
        sampler = PeakSampler(server.pid)
        if c.proc_status_kib(server.pid, "VmHWM") is None:
            sampler.start()
        with c.Connection(server.host, server.port) as conn:
            response = conn.request(request)
            del request
            if response.status != 200:
                raise c.BenchError("m1server answered %d to a %d-byte chunk: %r"
                                   % (response.status, size, response.body[:300]))
            if not wait_for_sha256(conn, file_id):
                note = "no sha256 in status within %.0f s" % SETTLE_DEADLINE_S
        peak = c.proc_status_kib(server.pid, "VmHWM")
        source = "VmHWM"
        if peak is None:
            sampler.stop()
            peak, source = sampler.peak, "ps samples"
    return peak, idle, source, note


def wait_for_sha256(conn, file_id):
    deadline = time.monotonic() + SETTLE_DEADLINE_S
    while time.monotonic() < deadline:
        data = conn.get("/api/video/status/" + file_id).json().get("data", {})
        if data.get("sha256"):
            return True
        time.sleep(0.05)
    return False


class PeakSampler(threading.Thread):
    """Polls RSS where there is no VmHWM; bounded by `stop()` and by a 120 s deadline."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.done = threading.Event()

    def run(self):
        deadline = time.monotonic() + 120
        while not self.done.is_set() and time.monotonic() < deadline:
            self.peak = max(self.peak, c.rss_kib(self.pid) or 0)
            self.done.wait(0.01)

    def stop(self):
        self.done.set()
        if self.is_alive():
            self.join(5)
        self.peak = max(self.peak, c.rss_kib(self.pid) or 0)


def mib(kib):
    return "%.1f MiB" % (kib / 1024.0) if kib else "n/a"
