#!/usr/bin/env python3
"""tus: throughput of a 256 MiB upload through m1server's tus endpoint, in one PATCH and in
8 MiB PATCHes, beside the seed API (32 x 8 MiB POST chunks) and beside a reference tus server,
@tus/server + @tus/file-store on Node, fed the same bytes the same two ways (issue 4, Measure).

    python bench/bench_tus.py                # 256 MiB, 3 interleaved rounds (~1-2 min)
    python bench/bench_tus.py --quick        # 64 MiB
    python bench/bench_tus.py --rounds 5 --python ~/.pyenv/versions/3.7.16/bin/python3.7

Not listed in run.py (that table is the SPEC section 9 targets); it has run.py's module shape
(NAME, run(ctx)) so it can be. Figures go to stdout and bench/out/tus.json.

How it measures, as bench_ingest.py does: one client on a raw keep-alive socket, request heads
built before the clock, the body sent from memory with sendall; MB/s = payload bytes / wall time
from the creation POST's first byte to the last PATCH's response. Every contender runs once per
round, the order rotating, and the median is reported (the disk here drifts). Each upload is
checked afterwards (HEAD offset, and for m1server the sha256 it computes), so the figure is for
correct work. m1server fsyncs every piece before answering; @tus/server does not fsync.

@tus/server is installed with npm into bench/out/tus-node/ (git-ignored; the project does not
depend on it), versions pinned in common.py. Without node/npm, or offline, its rows
say why and the rest still runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c  # noqa: E402

NAME = "tus"
PATCH_BYTES = 8 * c.MIB
FULL_BYTES = 256 * c.MIB
QUICK_BYTES = 64 * c.MIB
VERIFY_DEADLINE_S = 30.0


def run(ctx):
    total = QUICK_BYTES if ctx.quick else FULL_BYTES
    payload = c.video_payload(c.random_pool(total), 0, total, True)
    expected = hashlib.sha256(payload).hexdigest()
    names = ["seed API, 8 MiB POSTs", "m1server tus, 1 PATCH", "m1server tus, 8 MiB PATCHes",
             "@tus/server, 1 PATCH", "@tus/server, 8 MiB PATCHes"]
    runs = {name: [] for name in names}
    load_before = _load_average()
    checks, notes = [], []
    with c.Workspace(NAME) as ws:
        node_note = c.install_tus_node()
        with c.ServerProcess("m1server", ws.sub("m1"), ctx.python).start() as m1:
            node = c.TusNodeServer(ws.sub("node")).start() if node_note is None else None
            if node_note:
                notes.append(node_note)
            try:
                for rnd in range(ctx.rounds):
                    order = names[rnd % len(names):] + names[:rnd % len(names)]
                    for name in order:
                        if name.startswith("@tus") and node is None:
                            continue
                        server = node if name.startswith("@tus") else m1
                        file_id = "bench_tus_%d_%d" % (rnd, names.index(name))
                        if name.startswith("seed"):
                            requests = c.recording_requests(m1.host, m1.port, file_id,
                                                            payload, total // PATCH_BYTES,
                                                            PATCH_BYTES)
                            seconds, url = send_seed(m1, requests), None
                        else:
                            size = total if "1 PATCH" in name else PATCH_BYTES
                            seconds, url = c.send_tus(server, payload, size, file_id)
                        runs[name].append(total / seconds / c.MB)
                        ctx.log("tus round %d %-28s %7.1f MB/s" % (rnd + 1, name,
                                                                   runs[name][-1]))
                        checks.append(verify(server, name, url, file_id, total, expected))
            finally:
                if node is not None:
                    node.stop()
    med = {name: c.median(values) if values else None for name, values in runs.items()}
    seed = med[names[0]]
    rows = []
    for name in names:
        if med[name] is None:
            rows.append([name, "not run", node_note or ""])
            continue
        ratio = " (%.2fx seed API)" % (med[name] / seed) if seed and name != names[0] else ""
        rows.append([name, "%.1f MB/s%s" % (med[name], ratio),
                     "runs: " + ", ".join("%.0f" % v for v in runs[name])])
    for mine, theirs in ((names[1], names[3]), (names[2], names[4])):
        if med[mine] and med[theirs]:
            rows.append(["%s / %s" % (mine, theirs.split(",")[0]),
                         "%.2f" % (med[mine] / med[theirs]), "median of each"])
    notes += [check for check in checks if check != "ok"]
    load = (load_before, _load_average())
    if load[0] is not None:
        notes.append("1-minute load average %.1f before, %.1f after, on %d cores: figures "
                     "from a busy machine swing widely" % (load[0], load[1], os.cpu_count()))
    return {"title": "tus: %d MiB, one keep-alive client, median of %d rounds"
                     % (total // c.MIB, ctx.rounds),
            "figures": {"payload_bytes": total, "patch_bytes": PATCH_BYTES,
                        "rounds": ctx.rounds, "mb_per_s_runs": runs,
                        "mb_per_s_median": med, "verification": checks,
                        "load_average": load},
            "rows": rows, "targets": [], "notes": notes}


# ---------------------------------------------------------------------------------------------
# Clients

def send_seed(server, requests):
    with c.Connection(server.host, server.port) as conn:
        start = time.perf_counter()
        for i, request in enumerate(requests):
            response = conn.request(request)
            if response.status != 200:
                raise c.BenchError("seed API answered %d to chunk %d: %r"
                                   % (response.status, i, response.body[:300]))
        return time.perf_counter() - start


def verify(server, name, path, file_id, total, expected):
    """HEAD says the upload is whole; m1server's background sha256 matches the payload."""
    if path is not None:
        offset = c.tus_offset(server, path)
        if offset != total:
            return "%s: HEAD offset %r, expected %d" % (name, offset, total)
    if server.kind != "m1server":
        return "ok"
    with c.Connection(server.host, server.port) as conn:
        deadline = time.monotonic() + VERIFY_DEADLINE_S
        while True:
            data = conn.get("/api/video/status/" + file_id).json().get("data", {})
            if data.get("sha256"):
                return "ok" if data["sha256"] == expected else "%s: sha256 differs" % name
            if time.monotonic() > deadline:
                return "%s: no sha256 after %.0f s" % (name, VERIFY_DEADLINE_S)
            time.sleep(0.05)


def _load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# Standalone

class _Context:
    def __init__(self, quick, python, rounds):
        self.quick = quick
        self.python = python
        self.rounds = rounds

    def log(self, message):
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB instead of 256 MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--python", default=None, help="interpreter that runs m1server")
    args = parser.parse_args(argv)
    ctx = _Context(args.quick, args.python or c.base_python(), max(1, args.rounds))
    result = run(ctx)
    print(result["title"])
    for label, value, detail in result["rows"]:
        print("  %-44s %-30s %s" % (label, value, detail))
    for note in result["notes"]:
        print("  note: " + note)
    os.makedirs(os.path.join(c.BENCH_DIR, "out"), exist_ok=True)
    with open(os.path.join(c.BENCH_DIR, "out", "tus.json"), "w", encoding="utf-8") as f:
        json.dump(dict(result, python=ctx.python, date=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime()),
                       nproc=os.cpu_count()), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
