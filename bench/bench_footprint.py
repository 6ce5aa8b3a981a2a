"""footprint: idle memory and start-up time of m1server (SPEC §9, issue 17).

Three ways m1server starts, each beside `python3 -m http.server` on the same interpreter (the
issue's yardstick: the standard library's own server, started the same way):
  script       `python3 m1server.py` with its bytecode cached, as on a user's machine after
               the first start: PYTHONDONTWRITEBYTECODE (which this machine sets) removed, the
               cache (a PYTHONPYCACHEPREFIX of the workspace) warmed by one start first;
  script cold  the same with PYTHONDONTWRITEBYTECODE=1, from a copy of the sources with no
               __pycache__ beside them: every module of the server compiled at every
               start (a read-only install), shown for comparison;
  pyz          dist/m1server.pyz, built into the workspace by tools/build_pyz.py with the
               server's interpreter (it carries its bytecode).
CPython never caches the bytecode of the script it runs as __main__, so m1server.py itself is
compiled at every start of the script; the pyz's __main__ is a three-line stub.

Idle RSS: VmRSS 0.3 s after the server accepted its first connection (no request served).
Start-up: from just before the exec (Popen) to the first TCP connection the server accepts,
found by trying to connect every millisecond to the port it was told to use. Median of 5, the
contenders interleaved. Shown too: `python -S -c pass`, `-c pass` and `-c "import http.server"`
run to exit (the gap between the first two is what this machine's site-packages start-up hooks
cost every process), the bare sink, and SPEC section 9's RSS baseline, `python3 -c "import
http.server; input()"`.

Targets (issue 17), for the script and for the pyz: start at most 1.5x `python3 -m
http.server`'s, idle RSS at most 4 MiB above it. SPEC section 9's: start at most 150 ms, idle
RSS at most 4 MiB above `import http.server` (the script).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import common as c

NAME = "footprint"
RUNS = 9                 # one start ranges over 30-50 ms here: a median of 5 moved by a third
SETTLE_S = 0.3
CONNECT_DEADLINE_S = 20.0
TARGET_RSS_DIFF_MIB = 4.0
TARGET_START_RATIO = 1.5          # issue 17: at most this x python3 -m http.server's start
TARGET_START_MS = 150.0           # SPEC section 9
BASELINE_CODE = ("import http.server, sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); "
                 "sys.stdin.readline()")
HTTP_SERVER = "python -m http.server"
SCRIPT, COLD, PYZ = "m1server.py", "m1server.py, cold (no bytecode)", "m1server.pyz"
BUILD_PYZ = os.path.join(c.ROOT, "tools", "build_pyz.py")
EXITING = (("python -S -c pass", "pass", ["-S"]), ("python -c pass", "pass", []),
           ("python -c 'import http.server'", "import http.server", []))


def run(ctx):
    starts = dict((label, []) for label, _, _ in EXITING)
    servers = (HTTP_SERVER, "bare sink", SCRIPT, COLD, PYZ)
    starts.update((label, []) for label in servers)
    rss = dict((label, []) for label in ("import http.server",) + servers)
    with c.Workspace(NAME) as ws:
        cold, warm = bytecode_envs(ws.sub("pycache"))
        pyz = build_pyz(ctx.python, os.path.join(ws.path, "m1server.pyz"))
        script = os.path.join(c.ROOT, "m1server.py")
        ways = {HTTP_SERVER: ("http.server", {}), "bare sink": ("bare", {}),
                SCRIPT: ("m1server", {"env": warm, "program": script}),
                COLD: ("m1server", {"env": cold, "program": copy_sources(ws.sub("cold"))}),
                PYZ: ("m1server", {"env": cold, "program": pyz})}
        time_server(ctx, "m1server", ws.sub("prime"), env=warm, program=script)  # the cache
        for i in range(RUNS):
            for label, code, flags in EXITING:
                starts[label].append(time_exit(ctx.python, code, flags))
            rss["import http.server"].append(baseline_rss(ctx.python))
            for label in servers:
                kind, options = ways[label]
                ms, idle = time_server(ctx, kind, ws.sub("%s-%d" % (kind, i)), **options)
                starts[label].append(ms)
                rss[label].append(idle)
    start_med = {k: c.median(v) for k, v in starts.items()}
    rss_med = {k: c.median([x for x in v if x]) if any(v) else None for k, v in rss.items()}
    ctx.log("footprint start " + ", ".join("%s %.0f ms" % (k, start_med[k]) for k in servers))
    rows = []
    for label in ("import http.server",) + servers:
        rows.append(["idle RSS, %s" % label, mib(rss_med[label]),
                     above(rss_med[label], rss_med[HTTP_SERVER], HTTP_SERVER)
                     if label != HTTP_SERVER else ""])
    for label, values in starts.items():
        suffix = " to exit" if label.startswith("python -") and label != HTTP_SERVER else \
            " to first accepted connection"
        detail = "runs: " + ", ".join("%.0f" % v for v in values)
        if label in (SCRIPT, COLD, PYZ):
            detail = "%.2fx %s; %s" % (start_med[label] / start_med[HTTP_SERVER], HTTP_SERVER,
                                       detail)
        rows.append(["start, %s%s" % (label, suffix), "%.0f ms" % start_med[label], detail])
    targets = []
    for label in (SCRIPT, PYZ):
        targets.append(c.target("footprint start %s / %s" % (label, HTTP_SERVER),
                                start_med[label] / start_med[HTTP_SERVER], TARGET_START_RATIO,
                                "lower", "x"))
        targets.append(c.target("footprint idle RSS %s above %s" % (label, HTTP_SERVER),
                                diff_mib(rss_med[label], rss_med[HTTP_SERVER]),
                                TARGET_RSS_DIFF_MIB, "lower", "MiB"))
    targets.append(c.target("footprint start %s (SPEC)" % SCRIPT, start_med[SCRIPT],
                            TARGET_START_MS, "lower", "ms"))
    targets.append(c.target("footprint idle RSS %s above import http.server (SPEC)" % SCRIPT,
                            diff_mib(rss_med[SCRIPT], rss_med["import http.server"]),
                            TARGET_RSS_DIFF_MIB, "lower", "MiB"))
    return {
        "title": "footprint: idle RSS and start-up, median of %d" % RUNS,
        "figures": {"start_ms_runs": starts, "start_ms_median": start_med,
                    "idle_rss_kib_runs": rss, "idle_rss_kib_median": rss_med},
        "rows": rows,
        "targets": targets,
        "notes": ["%s: bytecode cached by an earlier start (PYTHONDONTWRITEBYTECODE unset); "
                  "cold: PYTHONDONTWRITEBYTECODE=1, every module compiled at start; %s: "
                  "built by tools/build_pyz.py with the same interpreter" % (SCRIPT, PYZ)],
    }


def bytecode_envs(cache_dir):
    """(cold, warm) environments for the server: no bytecode at all, or a cache of its own."""
    cold = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cold.pop("PYTHONPYCACHEPREFIX", None)
    warm = dict(os.environ, PYTHONPYCACHEPREFIX=cache_dir)
    warm.pop("PYTHONDONTWRITEBYTECODE", None)
    return cold, warm


def copy_sources(directory):
    """The server's modules and static/ copied into `directory`, for the cold start: a
    checkout may hold a __pycache__ (py_compile writes one whatever PYTHONDONTWRITEBYTECODE
    says, and so does any Python run without that variable), which would make it warm."""
    for name in os.listdir(c.ROOT):
        if name.endswith(".py"):
            shutil.copy2(os.path.join(c.ROOT, name), directory)
    shutil.copytree(os.path.join(c.ROOT, "static"), os.path.join(directory, "static"))
    return os.path.join(directory, "m1server.py")


def build_pyz(python, output):
    """dist/m1server.pyz's build, into `output`, by the interpreter that will run it (the
    bytecode it carries is that interpreter's)."""
    done = subprocess.run([python, BUILD_PYZ, "--output", output], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=120)
    if done.returncode != 0:
        raise c.BenchError("tools/build_pyz.py failed:\n%s" % done.stdout.decode()[-2000:])
    return output


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


def time_server(ctx, kind, directory, env=None, program=None):
    """(ms from exec to the first accepted connection, idle VmRSS in KiB)."""
    server = c.ServerProcess(kind, directory, ctx.python, port=free_port(), env=env,
                             program=program)
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
        if kind != "http.server":          # it prints no URL line of ours (and buffers it)
            server.wait_serving()
        time.sleep(SETTLE_S)
        idle = c.rss_kib(server.pid)
    finally:
        server.stop()
    return elapsed, idle


def diff_mib(kib, baseline_kib):
    return (kib - baseline_kib) / 1024.0 if kib and baseline_kib else None


def above(kib, baseline_kib, what):
    diff = diff_mib(kib, baseline_kib)
    return "%+.1f MiB against %s" % (diff, what) if diff is not None else ""


def mib(kib):
    return "%.1f MiB" % (kib / 1024.0) if kib else "n/a"
