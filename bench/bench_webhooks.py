"""webhooks: chunk latency without webhooks vs with a receiver that never answers (issue 10).

A webhook receiver that accepts connections and never answers must not slow uploads: the
store's listener only commits a row to webhooks.sqlite3 (in the hasher's thread, off the
request path) and a fixed set of delivery threads waits on the dead receiver.

Three servers run side by side and get the same load at the same moments, so that noise from
the rest of the machine (other test suites on these 2 cores) hits all three alike:
  none      no --webhook-url
  hanging   --webhook-url to a socket that accepts and never answers (--webhook-timeout 10)
  answering --webhook-url to a stdlib receiver that answers 200 at once (for scale)
N recorder threads (as in bench_latency: a 250 KiB chunk every second each, their own
keep-alive connections) each send chunk k to all three servers back to back, the order
rotating from chunk to chunk; beside them, EVENTS_PER_S one-chunk uploads a second to each
server, each `completed` at once, so webhook events keep being queued (and deliveries keep
piling up at the dead receiver) all through the measurement. Rounds repeat this with fresh
servers; percentiles are taken over every acknowledgement of every round.
Reported per server: p50/p99/max of the recorders' acknowledgements and errors; for the
webhook servers, the deliveries still pending at the end and the server's thread count.

Alone: python bench/bench_webhooks.py [--quick] [--recorders N] [--rounds R]
(it is not in run.py's list; bench/README.md says how to add it).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import common as c

NAME = "webhooks"
KINDS = ("none", "hanging", "answering")
CHUNK_BYTES = 250 * c.KIB
EVENTS_PER_S = 10
EVENT_CHUNK_BYTES = 16 * c.KIB
FULL_CHUNKS, QUICK_CHUNKS = 10, 4
DEFAULT_RECORDERS = 30
SECRET = "bench-secret"
WORSE_LIMIT = 1.25          # "unchanged within noise": p99 at most this x the no-webhook one
JOIN_DEADLINE_S = 120.0


def run(ctx):
    chunks = QUICK_CHUNKS if ctx.quick else FULL_CHUNKS
    recorders = ctx.recorders[0] if ctx.recorders else DEFAULT_RECORDERS
    rounds = 1 if ctx.quick else max(1, ctx.rounds)
    pool = c.random_pool(8 * c.MIB)
    hanging, answering = HangingReceiver(), AnsweringReceiver()
    urls = {"none": None, "hanging": hanging.url, "answering": answering.url}
    latencies = dict((kind, []) for kind in KINDS)
    figures = dict((kind, {"errors": 0, "events": 0, "pending": [], "threads": [],
                           "round_p50_ms": [], "round_p99_ms": []}) for kind in KINDS)
    notes = []
    try:
        for round_number in range(rounds):
            with c.Workspace(NAME) as ws:
                servers = start_servers(ctx, ws, urls)
                try:
                    outcome = paired_load(servers, recorders, chunks, pool, round_number)
                finally:
                    for server in servers.values():
                        server.stop()
            for kind in KINDS:
                got = outcome[kind]
                latencies[kind] += got["latencies"]
                figure = figures[kind]
                figure["errors"] += len(got["errors"])
                figure["events"] += got["events"]
                figure["pending"].append(got.get("pending"))
                figure["threads"].append(got.get("threads"))
                figure["round_p50_ms"].append(pct(got["latencies"], 0.5))
                figure["round_p99_ms"].append(pct(got["latencies"], 0.99))
                notes.extend("%s: %s" % (kind, e) for e in got["errors"][:3])
                ctx.log("webhooks round %d %-9s p50 %s p99 %s errors %d pending %s threads %s"
                        % (round_number + 1, kind, ms(pct(got["latencies"], 0.5)),
                           ms(pct(got["latencies"], 0.99)), len(got["errors"]),
                           got.get("pending"), got.get("threads")))
    finally:
        hanging.close()
        answering.close()
    rows = []
    for kind in KINDS:
        figure = figures[kind]
        values = latencies[kind]
        figure.update(requests=len(values), p50_ms=pct(values, 0.5), p90_ms=pct(values, 0.9),
                      p99_ms=pct(values, 0.99), max_ms=max(values) if values else None)
        extra = ""
        if kind != "none":
            extra = ", pending at end %s, server threads %s" % (
                "/".join(str(v) for v in figure["pending"]),
                "/".join(str(v) for v in figure["threads"]))
        rows.append(["%s (%d recorders)" % (kind, recorders),
                     "p50 %s  p99 %s  max %s" % (ms(figure["p50_ms"]), ms(figure["p99_ms"]),
                                                 ms(figure["max_ms"])),
                     "errors %d, chunks %d, events %d%s" % (figure["errors"], len(values),
                                                            figure["events"], extra)])
    figures.update(recorders=recorders, chunks_each=chunks, rounds=rounds,
                   events_per_s=EVENTS_PER_S)
    # The target is the median over rounds of each round's ratio: one stall of one server
    # (another process got the core for half a second) moves a pooled p99 a lot, and lands on
    # a different server each round.
    for q in ("p50", "p99"):
        ratios = [dead / base for base, dead in zip(figures["none"]["round_%s_ms" % q],
                                                    figures["hanging"]["round_%s_ms" % q])
                  if base and dead]
        figures["%s_ratio_hanging_vs_none_per_round" % q] = ratios
        figures["%s_ratio_hanging_vs_none" % q] = c.median(ratios)
        rows.append(["%s hanging / none" % q, "median %s" % ratio_text(c.median(ratios)),
                     "per round: %s" % ", ".join(ratio_text(r) for r in ratios)])
    return {
        "title": "webhooks: chunk latency, no webhook vs a receiver that never answers",
        "figures": figures,
        "rows": rows,
        "targets": [c.target("p99 with a dead receiver / without webhooks (median of rounds)",
                             figures["p99_ratio_hanging_vs_none"], WORSE_LIMIT, "lower", "x"),
                    c.target("errors with a dead receiver", figures["hanging"]["errors"], 0,
                             "lower", "")],
        "notes": notes,
    }


def start_servers(ctx, ws, urls):
    servers = {}
    for kind in KINDS:
        extra = []
        if urls[kind]:
            extra = ["--webhook-url", urls[kind], "--webhook-secret", SECRET,
                     "--webhook-timeout", "10"]
        servers[kind] = c.ServerProcess("m1server", ws.sub(kind), ctx.python,
                                        extra_args=extra)
    for server in servers.values():
        server.start()
    return servers


def paired_load(servers, recorders, chunks, pool, round_number):
    """Each recorder sends chunk k to every server back to back (order rotating); returns per
    kind: latencies (ms), errors, events sent, and for webhook servers pending + threads."""
    out = dict((kind, {"latencies": [], "errors": []}) for kind in KINDS)
    plans = []
    for i in range(recorders):
        file_id = "bench_wh_%d_%d" % (round_number, i)
        plans.append(dict((kind, c.recording_requests(
            server.host, server.port, file_id, pool, chunks, CHUNK_BYTES, offset=i * 7919 * 13))
            for kind, server in servers.items()))
    connections = [dict((kind, c.Connection(server.host, server.port))
                        for kind, server in servers.items()) for _ in range(recorders)]
    for per_kind in connections:
        for kind, conn in per_kind.items():
            try:
                conn.connect()
            except OSError as exc:
                out[kind]["errors"].append("connect: %r" % exc)
    stop = threading.Event()
    streams = [EventStream(servers[kind], pool, "%d_%s" % (round_number, kind), stop)
               for kind in KINDS]
    for stream in streams:
        stream.start()
    start = time.perf_counter() + 0.2

    def recorder(i):
        first = start + float(i) / recorders
        for k in range(chunks):
            due = first + k
            if due > time.perf_counter():
                time.sleep(due - time.perf_counter())
            shift = (i + k) % len(KINDS)
            for kind in KINDS[shift:] + KINDS[:shift]:
                t0 = time.perf_counter()
                try:
                    response = connections[i][kind].request(plans[i][kind][k])
                except Exception as exc:
                    out[kind]["errors"].append("chunk %d: %r" % (k, exc))
                    continue
                elapsed = (time.perf_counter() - t0) * 1000.0
                if response.status != 200:
                    out[kind]["errors"].append("chunk %d: HTTP %d" % (k, response.status))
                else:
                    out[kind]["latencies"].append(elapsed)

    threads = [threading.Thread(target=recorder, args=(i,), daemon=True)
               for i in range(recorders)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + JOIN_DEADLINE_S + chunks
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    for stream in streams:
        stream.join(30)
    for per_kind in connections:
        for conn in per_kind.values():
            conn.close()
    stuck = sum(1 for t in threads if t.is_alive())
    for kind, stream in zip(KINDS, streams):
        out[kind]["events"] = stream.sent
        out[kind]["errors"] += stream.errors
        if stuck:
            out[kind]["errors"].append("%d recorder threads still blocked" % stuck)
        if kind != "none":
            out[kind]["pending"] = pending_deliveries(servers[kind])
            out[kind]["threads"] = thread_count(servers[kind].pid)
    return out


def pct(values, fraction):
    return c.percentile(values, fraction) if values else None


class EventStream(threading.Thread):
    """One-chunk uploads, each `completed` at once, EVENTS_PER_S a second: one webhook event
    each, for as long as the recorders run."""

    def __init__(self, server, pool, prefix, stop):
        threading.Thread.__init__(self, daemon=True)
        self.server, self.pool, self.prefix, self.stop = server, pool, prefix, stop
        self.sent = 0
        self.errors = []

    def run(self):
        conn = c.Connection(self.server.host, self.server.port)
        start = time.perf_counter()
        n = 0
        try:
            while not self.stop.is_set():
                due = start + n / float(EVENTS_PER_S)
                if due > time.perf_counter() and self.stop.wait(due - time.perf_counter()):
                    break
                payload = c.video_payload(self.pool, n * 4099, EVENT_CHUNK_BYTES, True)
                request = c.upload_request(self.server.host, self.server.port,
                                           "bench_evt_%s_%d" % (self.prefix, n), 0,
                                           "completed", payload)
                n += 1
                try:
                    response = conn.request(request)
                except Exception as exc:
                    self.errors.append("event upload: %r" % exc)
                    continue
                if response.status != 200:
                    self.errors.append("event upload: HTTP %d" % response.status)
                else:
                    self.sent += 1
        finally:
            conn.close()


def pending_deliveries(server):
    """Pending deliveries at the end (the listing shows at most 500)."""
    with c.Connection(server.host, server.port) as conn:
        response = conn.get("/api/video/webhooks/deliveries?state=pending&limit=500")
    if response.status != 200:
        return None
    return len(response.json()["data"]["deliveries"])


def thread_count(pid):
    try:
        with open("/proc/%d/status" % pid, "r", encoding="ascii") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class HangingReceiver:
    """Accepts connections and never answers (nor reads)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d/hook" % self.sock.getsockname()[1]

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


class AnsweringReceiver:
    """Answers every POST with 200 at once."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d/hook" % self.httpd.server_address[1]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def ratio_text(value):
    return "%.2fx" % value if value is not None else "n/a"


def ms(value):
    return "%.1f ms" % value if value is not None else "n/a"


def main(argv=None):
    """Run this benchmark alone, printed as run.py prints its table."""
    import run as bench_run
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of short recordings")
    parser.add_argument("--recorders", type=int, default=DEFAULT_RECORDERS)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (2-3)")
    parser.add_argument("--python", default=None)
    parser.add_argument("--out", default=os.path.join(c.BENCH_DIR, "out", "webhooks.json"))
    args = parser.parse_args(argv)
    ctx = bench_run.Context(args.quick, args.python or c.base_python(), args.rounds,
                            [args.recorders])
    return bench_run.run_alone(ctx, NAME, lambda: run(ctx), args.out)


if __name__ == "__main__":
    sys.exit(main())
