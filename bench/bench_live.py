"""live: how late a chunk's bytes reach live viewers, and what a live viewer costs (issue 18).

Latency: one recorder uploads CHUNKS chunks of CHUNK_BYTES to one fileId, one every PACE_S,
while V viewers (1 and 50) read GET /uploads/<fileId>.webm?live=1. For every chunk and every
viewer: (time the viewer had received the chunk's last byte) minus (time the chunk's 200
arrived at the recorder). It can be negative: the server wakes its viewers when the chunk is
durable, just before it writes the 200. p50/p99 are nearest-rank over every (chunk, viewer)
pair. The viewers are raw sockets read by one selector thread of this process, which parses
the chunked body and stamps an arrival when recv() returns: with 50 viewers that thread works
through 50 sockets per chunk, and that is in the figure, as it would be for 50 real clients
sharing the machine's cores with the server. Local storage only: the S3 mode's delay is its
poll interval (live.SHARED_POLL_S) plus the requests of one look, see docs/live.md.

RSS per viewer: a fresh server's VmRSS, then VmRSS with IDLE_VIEWERS viewers waiting on an
upload in progress (each has read the bytes so far), difference / IDLE_VIEWERS. Each viewer
holds a handler thread; its stack is virtual memory, mostly never touched.

Every loop is bounded in count and in time (DEADLINE_S). Run alone: python bench/bench_live.py
[--quick] [--python PATH]; bench/run.py lists it as `live`.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import common as c
from common import format_ms as ms, percentile_or_none as pct

NAME = "live"
CHUNK_BYTES = 64 * c.KIB
PACE_S = 0.05
FULL_CHUNKS = 100
QUICK_CHUNKS = 30
VIEWER_COUNTS = (1, 50)
IDLE_VIEWERS = 50
SETTLE_S = 0.5
DEADLINE_S = 60.0
SERVER_ARGS = ["--live-max-viewers", "120", "--max-connections", "256",
               "--live-idle-timeout", "300", "--processing", "off"]


def run(ctx):
    chunks = QUICK_CHUNKS if ctx.quick else FULL_CHUNKS
    pool = c.random_pool(4 * c.MIB)
    figures, rows, notes = {"latency": {}}, [], []
    for count in VIEWER_COUNTS:
        result = measure_latency(ctx, count, chunks, pool)
        figures["latency"]["viewers_%d" % count] = result
        ctx.log("live x%d: 200 -> bytes at the viewer p50 %.2f p99 %.2f ms"
                % (count, result["p50_ms"], result["p99_ms"]))
        rows.append(["%d viewer%s: chunk 200 -> its bytes" % (count, "s" if count > 1 else ""),
                     "p50 %s  p99 %s" % (ms(result["p50_ms"]), ms(result["p99_ms"])),
                     "%d chunks of %d KiB, %d arrivals; chunk round trip p50 %s"
                     % (chunks, CHUNK_BYTES // c.KIB, result["arrivals"],
                        ms(result["rtt_p50_ms"]))])
        if result["lost"]:
            notes.append("x%d: %d (chunk, viewer) arrivals never came" % (count, result["lost"]))
    per = idle_rss(ctx)
    figures["rss_kib_per_viewer"] = per
    ctx.log("live RSS per viewer: %.1f KiB" % per)
    rows.append(["RSS per waiting viewer", "%.1f KiB" % per,
                 "%d viewers of an upload in progress, fresh server" % IDLE_VIEWERS])
    return {"title": "live: chunk 200 -> bytes at live viewers, RSS per viewer",
            "figures": figures, "rows": rows, "targets": [], "notes": notes}


# --------------------------------------------------------------------------------------------
# Latency

def measure_latency(ctx, count, chunks, pool):
    requests = None
    with c.Workspace(NAME) as ws:
        server = c.ServerProcess("m1server", ws.sub("srv"), ctx.python,
                                 extra_args=SERVER_ARGS).start()
        try:
            requests = c.recording_requests(server.host, server.port, "bench_live", pool,
                                            chunks + 1, CHUNK_BYTES)
            with c.Connection(server.host, server.port) as conn:
                expect_ok(conn.request(requests[0]))            # chunk 0: the stream exists
                viewers = Viewers(server, "bench_live", count)
                try:
                    viewers.wait_for(CHUNK_BYTES)
                    acked = []
                    for data in requests[1:]:
                        sent = time.perf_counter()
                        expect_ok(conn.request(data))
                        acked.append((sent, time.perf_counter()))
                        time.sleep(PACE_S)
                    arrivals = viewers.wait_for((chunks + 1) * CHUNK_BYTES)
                finally:
                    viewers.close()
        finally:
            server.stop()
    latencies, lost = [], 0
    for marks in arrivals:
        for index, (_, ack) in enumerate(acked, 1):
            arrived = first_at(marks, (index + 1) * CHUNK_BYTES)
            if arrived is None:
                lost += 1
            else:
                latencies.append((arrived - ack) * 1000.0)
    rtt = [(ack - sent) * 1000.0 for sent, ack in acked]
    return {"viewers": count, "chunks": chunks, "arrivals": len(latencies), "lost": lost,
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99),
            "max_ms": max(latencies) if latencies else None,
            "rtt_p50_ms": pct(rtt, 0.5), "rtt_p99_ms": pct(rtt, 0.99)}


def expect_ok(response):
    if response.status != 200:
        raise c.BenchError("chunk refused: %d %r" % (response.status, response.body[:200]))


def first_at(marks, total):
    """The first time a viewer had received `total` body bytes (marks: [(bytes, time)])."""
    for received, at in marks:
        if received >= total:
            return at
    return None


class Viewers:
    """`count` raw live viewers of one fileId, read by one selector thread; each keeps
    (body bytes so far, time) after every recv."""

    def __init__(self, server, file_id, count):
        self.marks = [[] for _ in range(count)]
        self.parsers = [ChunkedBody() for _ in range(count)]
        self.reader = c.SocketReader([open_live(server, file_id) for _ in range(count)],
                                     self.on_data)

    def on_data(self, n, data, now):
        self.parsers[n].feed(data)
        self.marks[n].append((self.parsers[n].body_bytes, now))

    def wait_for(self, total):
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if all(p.body_bytes >= total for p in self.parsers):
                break
            time.sleep(0.02)
        return [list(m) for m in self.marks]

    def close(self):
        self.reader.close()


class ChunkedBody:
    """Counts the body bytes of a chunked HTTP/1.1 response fed in pieces (head skipped)."""

    def __init__(self):
        self.buffer = b""
        self.in_head = True
        self.left = 0                    # bytes of the current chunk (and its CRLF) to come
        self.body_bytes = 0

    def feed(self, data):
        self.buffer += data
        while True:
            if self.in_head:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                if b" 200 " not in self.buffer[:end].split(b"\r\n", 1)[0]:
                    raise c.BenchError("live stream refused: %r" % self.buffer[:200])
                self.buffer, self.in_head = self.buffer[end + 4:], False
            elif self.left:
                take = min(self.left, len(self.buffer))
                self.body_bytes += max(0, min(take, self.left - 2))   # the CRLF is not body
                self.left -= take
                self.buffer = self.buffer[take:]
                if not self.buffer:
                    return
            else:
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(self.buffer[:end].split(b";")[0], 16)
                if size == 0:
                    return                   # the end (and its trailer)
                self.buffer, self.left = self.buffer[end + 2:], size + 2


def open_live(server, file_id):
    sock = socket.create_connection((server.host, server.port), timeout=c.SOCKET_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(("GET /uploads/%s.webm?live=1 HTTP/1.1\r\nHost: %s:%d\r\n\r\n"
                  % (file_id, server.host, server.port)).encode("ascii"))
    return sock


# --------------------------------------------------------------------------------------------
# RSS per viewer

def idle_rss(ctx):
    with c.Workspace(NAME) as ws:
        server = c.ServerProcess("m1server", ws.sub("srv"), ctx.python,
                                 extra_args=SERVER_ARGS).start()
        try:
            pool = c.random_pool(CHUNK_BYTES)
            first = c.recording_requests(server.host, server.port, "bench_idle", pool, 2,
                                         CHUNK_BYTES)[0]
            with c.Connection(server.host, server.port) as conn:
                expect_ok(conn.request(first))
            probe = Viewers(server, "bench_idle", 1)          # first-use imports, buffers
            probe.wait_for(CHUNK_BYTES)
            probe.close()
            time.sleep(SETTLE_S)
            before = c.rss_kib(server.pid)
            viewers = Viewers(server, "bench_idle", IDLE_VIEWERS)
            try:
                viewers.wait_for(CHUNK_BYTES)
                time.sleep(SETTLE_S)
                after = c.rss_kib(server.pid)
            finally:
                viewers.close()
        finally:
            server.stop()
    if before is None or after is None:
        raise c.BenchError("no RSS reading on this platform")
    return (after - before) / float(IDLE_VIEWERS)


# --------------------------------------------------------------------------------------------

def main(argv=None):
    import run as runner
    parser = argparse.ArgumentParser(description="m1server live stream latency and RSS")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--python", default=None)
    parser.add_argument("--out", default=os.path.join(c.BENCH_DIR, "out", "live.json"))
    args = parser.parse_args(argv)
    ctx = runner.Context(args.quick, args.python or c.base_python(), 1, [])
    return runner.run_alone(ctx, NAME, lambda: run(ctx), args.out)


if __name__ == "__main__":
    sys.exit(main())
