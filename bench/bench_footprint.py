"""footprint: idle memory and start-up time of m1server (SPEC §9).

Idle RSS: VmRSS of a freshly started server (no request served yet), read 0.3 s after it
printed its URL, against a process on the same interpreter that has imported http.server and
waits on stdin (`python3 -c "import http.server; input()"`, the spec's baseline). Target: at
most 4 MiB above the baseline.

Bytecode: m1server runs "cold" (PYTHONDONTWRITEBYTECODE=1, every module compiled at every
start: a read-only install, or a machine that sets that variable, as this one does) and "warm"
(a bytecode cache primed by one earlier start, in a PYTHONPYCACHEPREFIX of the workspace: any
install that may write __pycache__, after its first start, and dist/m1server.pyz, which
carries its bytecode). The targets are judged on the warm figures, which is how a deployed
server starts; the cold ones are shown beside them. Compiling costs both time and memory (the
compiler's arenas stay in the process), so the two differ in RSS too.

Start-up: from just before the exec (Popen) to the first TCP connection the server accepts,
found by trying to connect every millisecond to the port it was told to use; against the
same interpreter running `-c pass` and `-c "import http.server"` to exit, and the bare sink
to its first connection. Median of 5 each. Target: at most 150 ms. `python -S -c pass` (no
site module) is shown too: the gap to `-c pass` is what the interpreter's site-packages
start-up hooks (.pth files) cost every process on this machine, the server included.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time

import common as c

NAME = "footprint"
RUNS = 5
SETTLE_S = 0.3
CONNECT_DEADLINE_S = 20.0
TARGET_RSS_DIFF_MIB = 4.0
TARGET_START_MS = 150.0
BASELINE_CODE = ("import http.server, sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); "
                 "sys.stdin.readline()")


def run(ctx):
    starts = {"python -S -c pass": [], "python -c pass": [],
              "python -c 'import http.server'": [], "bare sink": [], "m1server": [],
              "m1server, cold (no bytecode)": []}
    rss = {"baseline": [], "m1server": [], "m1server, cold (no bytecode)": []}
    with c.Workspace(NAME) as ws:
        cold, warm = bytecode_envs(ws.sub("pycache"))
        time_server(ctx, "m1server", ws.sub("prime"), env=warm)     # fills the cache
        for i in range(RUNS):
            starts["python -S -c pass"].append(time_exit(ctx.python, "pass", ["-S"]))
            starts["python -c pass"].append(time_exit(ctx.python, "pass"))
            starts["python -c 'import http.server'"].append(time_exit(ctx.python,
                                                                      "import http.server"))
            rss["baseline"].append(baseline_rss(ctx.python))
            ms, _ = time_server(ctx, "bare", ws.sub("sink%d" % i))
            starts["bare sink"].append(ms)
            ms, idle = time_server(ctx, "m1server", ws.sub("m1_%d" % i), env=warm)
            starts["m1server"].append(ms)
            rss["m1server"].append(idle)
            ms, idle = time_server(ctx, "m1server", ws.sub("cold_%d" % i), env=cold)
            starts["m1server, cold (no bytecode)"].append(ms)
            rss["m1server, cold (no bytecode)"].append(idle)
    start_med = {k: c.median(v) for k, v in starts.items()}
    rss_med = {k: c.median([x for x in v if x]) if any(v) else None for k, v in rss.items()}
    diff_mib = ((rss_med["m1server"] - rss_med["baseline"]) / 1024.0
                if rss_med["m1server"] and rss_med["baseline"] else None)
    ctx.log("footprint m1server start %.0f ms, idle RSS %s KiB (baseline %s KiB)"
            % (start_med["m1server"], rss_med["m1server"], rss_med["baseline"]))
    rows = [
        ["idle RSS, python + import http.server", mib(rss_med["baseline"]), ""],
        ["idle RSS, m1server (warm)", mib(rss_med["m1server"]), ""],
        ["idle RSS difference (warm)", "%.1f MiB" % diff_mib if diff_mib is not None
         else "n/a", ""],
        ["idle RSS, m1server cold (no bytecode)",
         mib(rss_med["m1server, cold (no bytecode)"]), ""],
    ]
    for label, values in starts.items():
        suffix = " to first accepted connection" if label.startswith(("bare", "m1server")) \
            else " to exit"
        rows.append(["start, %s%s" % (label, suffix), "%.0f ms" % start_med[label],
                     "runs: " + ", ".join("%.0f" % v for v in values)])
    return {
        "title": "footprint: idle RSS and start-up, median of %d" % RUNS,
        "figures": {"start_ms_runs": starts, "start_ms_median": start_med,
                    "idle_rss_kib_runs": rss, "idle_rss_kib_median": rss_med,
                    "idle_rss_difference_mib": diff_mib},
        "rows": rows,
        "targets": [
            c.target("footprint idle RSS above http.server import", diff_mib,
                     TARGET_RSS_DIFF_MIB, "lower", "MiB"),
            c.target("footprint start to first accepted connection", start_med["m1server"],
                     TARGET_START_MS, "lower", "ms"),
        ],
        "notes": ["m1server (warm): bytecode cached by an earlier start, as any install "
                  "that may write __pycache__ and dist/m1server.pyz; cold: "
                  "PYTHONDONTWRITEBYTECODE=1, every module compiled at start"],
    }


def bytecode_envs(cache_dir):
    """(cold, warm) environments for the server: no bytecode at all, or a cache of its own."""
    cold = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cold.pop("PYTHONPYCACHEPREFIX", None)
    warm = dict(os.environ, PYTHONPYCACHEPREFIX=cache_dir)
    warm.pop("PYTHONDONTWRITEBYTECODE", None)
    return cold, warm


def time_exit(python, code, flags=()):
    start = time.perf_counter()
    subprocess.run([python] + list(flags) + ["-c", code], check=True, stdin=subprocess.DEVNULL,
                   timeout=CONNECT_DEADLINE_S)
    return (time.perf_counter() - start) * 1000.0


def baseline_rss(python):
    proc = subprocess.Popen([python, "-c", BASELINE_CODE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()
        time.sleep(SETTLE_S)
        return c.rss_kib(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(CONNECT_DEADLINE_S)
        proc.stdout.close()


def free_port():
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
    finally:
        probe.close()


def time_server(ctx, kind, directory, env=None):
    """(ms from exec to the first accepted connection, idle VmRSS in KiB)."""
    server = c.ServerProcess(kind, directory, ctx.python, port=free_port(), env=env)
    start = time.perf_counter()
    server.spawn()
    try:
        deadline = time.monotonic() + CONNECT_DEADLINE_S
        while True:
            try:
                probe = socket.create_connection(("127.0.0.1", server.requested_port), 1.0)
            except OSError:
                if not server.alive():
                    raise c.BenchError("%s exited during start-up:\n%s"
                                       % (kind, server.log_tail()))
                if time.monotonic() > deadline:
                    raise c.BenchError("%s accepted no connection within %.0f s"
                                       % (kind, CONNECT_DEADLINE_S))
                time.sleep(0.001)
                continue
            elapsed = (time.perf_counter() - start) * 1000.0
            probe.close()
            break
        server.wait_serving()
        time.sleep(SETTLE_S)
        idle = c.rss_kib(server.pid)
    finally:
        server.stop()
    return elapsed, idle


def mib(kib):
    return "%.1f MiB" % (kib / 1024.0) if kib else "n/a"
