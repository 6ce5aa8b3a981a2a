"""parser: the multipart parser alone on an in-memory body with one 8 MiB file part (SPEC §9).

The measurement itself lives in bench/bench_multipart.py (written beside the parser); this
runs it as a subprocess on the server's interpreter, `bench_multipart.py --json`, and reads
the JSON object it prints (at least {"mb_per_s": float}). Target: at least 1000 MB/s.
"""
from __future__ import annotations

import json
import os
import subprocess

import common as c

NAME = "parser"
PROGRAM = os.path.join(c.BENCH_DIR, "bench_multipart.py")
TARGET_MB_PER_S = 1000.0
DEADLINE_S = 300.0


def run(ctx):
    if not os.path.isfile(PROGRAM):
        raise c.BenchError("bench/bench_multipart.py not found")
    command = [ctx.python, PROGRAM, "--json"] + (["--quick"] if ctx.quick and
                                                 accepts_quick() else [])
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, cwd=c.ROOT, timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        raise c.BenchError("bench_multipart.py ran past %.0f s" % DEADLINE_S)
    stdout = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        raise c.BenchError("bench_multipart.py exited %d:\n%s%s" % (
            done.returncode, stdout[-2000:], done.stderr.decode("utf-8", "replace")[-2000:]))
    figures = parse_json(stdout)
    rate = figures.get("mb_per_s")
    if not isinstance(rate, (int, float)):
        raise c.BenchError("bench_multipart.py printed no mb_per_s: %r" % stdout[-500:])
    ctx.log("parser %.0f MB/s" % rate)
    rows = [["multipart parser, one 8 MiB file part in memory", "%.0f MB/s" % rate,
             ", ".join("%s=%s" % (k, v) for k, v in sorted(figures.items())
                       if k != "mb_per_s" and not isinstance(v, (dict, list)))[:120]]]
    return {
        "title": "parser: bench/bench_multipart.py --json",
        "figures": figures,
        "rows": rows,
        "targets": [c.target("parser throughput", rate, TARGET_MB_PER_S, "higher", "MB/s")],
        "notes": [],
    }


def accepts_quick():
    """Pass --quick along only if bench_multipart.py mentions it (it is another helper's)."""
    try:
        with open(PROGRAM, "r", encoding="utf-8") as f:
            return "--quick" in f.read()
    except OSError:
        return False


def parse_json(stdout):
    """The JSON object: the whole output, or failing that its last line that parses."""
    try:
        value = json.loads(stdout)
        if isinstance(value, dict):
            return value
    except ValueError:
        pass
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise c.BenchError("bench_multipart.py printed no JSON object: %r" % stdout[-500:])
