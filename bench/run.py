"""Run m1server's benchmark suite (`make bench`): the SPEC §9 targets, measured as ratios.

    python bench/run.py                  every benchmark, full sizes (< 10 min on 2 cores)
    python bench/run.py --quick          small sizes (< 1 min)
    python bench/run.py --only ingest    one benchmark (comma-separate several)
    python bench/run.py --only latency --recorders 200

Prints a table on stdout (progress goes to stderr) and writes every figure, the machine and
the date to bench/out/results.json. A missed target is reported as MISS and does not change
the exit status: benchmarks report, tests assert. The exit status is 1 only when a benchmark
could not run (server missing or crashed, a request refused, a deadline passed).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import common as c
import bench_edge
import bench_finish
import bench_footprint
import bench_ingest
import bench_latency
import bench_live
import bench_memory
import bench_parser
import bench_small_chunks

BENCHMARKS = [bench_ingest, bench_parser, bench_memory, bench_latency, bench_small_chunks,
              bench_finish, bench_footprint, bench_edge, bench_live]
BY_NAME = dict((m.NAME, m) for m in BENCHMARKS)
DEFAULT_OUT = os.path.join(c.BENCH_DIR, "out", "results.json")
FULL_RECORDERS = [50, 200]
QUICK_RECORDERS = [50]
BUSY_CORES = 0.2                 # other processes using this much CPU mark a benchmark noisy


class Context:
    """What every benchmark is given: sizes, the interpreter, and a progress logger."""

    def __init__(self, quick, python, rounds, recorders):
        self.quick = quick
        self.python = python
        self.rounds = rounds
        self.recorders = recorders

    def log(self, message):
        sys.stderr.write("  .. %s\n" % message)
        sys.stderr.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description="m1server benchmarks (SPEC §9)")
    parser.add_argument("--only", action="append", default=[],
                        help="benchmark(s) to run: " + ", ".join(BY_NAME))
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--recorders", type=int, action="append", default=[],
                        help="latency: recorder count (repeatable; default 50 and 200, "
                             "50 with --quick)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="ingest and latency: interleaved rounds, median reported "
                             "(default 3)")
    parser.add_argument("--python", default=None,
                        help="interpreter for the servers and baselines (default: the real "
                             "interpreter behind this one, outside any venv)")
    parser.add_argument("--server", default=None,
                        help="server program to run (default: m1server.py at the repo root)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="results JSON (default %(default)s)")
    args = parser.parse_args(argv)

    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error("unknown benchmark %s; choose from %s" % (", ".join(unknown),
                                                               ", ".join(BY_NAME)))
    selected = [m for m in BENCHMARKS if not names or m.NAME in names]
    if args.server:
        c.SERVER_PROGRAM = os.path.abspath(args.server)
    recorders = args.recorders or (QUICK_RECORDERS if args.quick else FULL_RECORDERS)
    ctx = Context(args.quick, args.python or c.base_python(), max(1, args.rounds), recorders)

    results = new_results(ctx)
    failed = []
    started = time.perf_counter()
    for module in selected:
        sys.stderr.write("== %s\n" % module.NAME)
        sys.stderr.flush()
        cpu_before = cpu_snapshot()
        t0 = time.perf_counter()
        try:
            outcome = module.run(ctx)
        except Exception as exc:
            detail = str(exc) if isinstance(exc, c.BenchError) else traceback.format_exc()
            sys.stderr.write("!! %s could not run: %s\n" % (module.NAME, detail))
            outcome = {"title": module.NAME, "error": detail, "rows": [], "targets": [],
                       "notes": [], "figures": {}}
            failed.append(module.NAME)
        outcome["seconds"] = time.perf_counter() - t0
        outcome["foreign_cpu"] = foreign_cpu(cpu_before, cpu_snapshot(), outcome["seconds"])
        add_outcome(results, module.NAME, outcome)
    results["seconds"] = time.perf_counter() - started
    results["could_not_run"] = failed
    write_results(results, args.out)
    return 1 if failed else 0


def run_alone(ctx, name, work, out, measure_cpu=True):
    """One benchmark run on its own (`python bench/bench_<name>.py`): time `work()` (which
    returns its outcome), then print and write the results as main() does."""
    cpu_before = cpu_snapshot()
    started = time.perf_counter()
    outcome = work()
    outcome["seconds"] = time.perf_counter() - started
    outcome["foreign_cpu"] = (foreign_cpu(cpu_before, cpu_snapshot(), outcome["seconds"])
                              if measure_cpu else None)
    results = new_results(ctx)
    add_outcome(results, name, outcome)
    results["seconds"] = outcome["seconds"]
    results["could_not_run"] = []
    write_results(results, out)
    return 0


def new_results(ctx):
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "mode": "quick" if ctx.quick else "full",
            "machine": machine(ctx.python),
            "server_program": c.SERVER_PROGRAM,
            "server_source": source_identity(),
            "benchmarks": {}, "targets": []}


def add_outcome(results, name, outcome):
    results["benchmarks"][name] = outcome
    results["targets"].extend(dict(t, benchmark=name) for t in outcome["targets"])


def write_results(results, out):
    """The table on stdout, the whole results as JSON in `out`."""
    print_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    print("\nresults: %s" % os.path.abspath(out))


def source_identity():
    """Which code was measured: git HEAD, whether the tree was dirty, and a hash of each
    top-level .py file beside the server program (it may be uncommitted work)."""
    import hashlib
    identity = {"git_head": None, "dirty": None, "files": {}}
    try:
        identity["git_head"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=c.ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, timeout=10).stdout.decode().strip() or None
        identity["dirty"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=c.ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    folder = os.path.dirname(c.SERVER_PROGRAM)
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.endswith((".py", ".pyz")) and os.path.isfile(path):
                with open(path, "rb") as f:
                    identity["files"][name] = hashlib.sha256(f.read()).hexdigest()[:16]
    return identity


def cpu_snapshot():
    """(CPU seconds the whole machine was busy, CPU seconds this run and its reaped children
    used). The difference over a benchmark is other people's work, which on a 2-core machine
    skews every figure; it is reported beside each benchmark. Linux only (None elsewhere)."""
    try:
        import resource
        with open("/proc/stat", "r", encoding="ascii") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
    except (ImportError, OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / float(hz)       # minus idle and iowait
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        own += usage.ru_utime + usage.ru_stime
    return busy, own


def foreign_cpu(before, after, seconds):
    """Average cores used by processes outside this run (kernel flush threads included)."""
    if before is None or after is None or seconds <= 0:
        return None
    foreign = (after[0] - before[0]) - (after[1] - before[1])
    return round(max(0.0, foreign) / seconds, 2)


def machine(python):
    try:
        version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                                 stdout=subprocess.PIPE, timeout=30).stdout.decode().strip()
    except (OSError, subprocess.SubprocessError):
        version = None
    return {"nproc": os.cpu_count(), "python": python, "python_version": version,
            "runner_python_version": platform.python_version(),
            "platform": platform.platform(), "machine": platform.machine(),
            "hostname": platform.node()}


def print_table(results):
    m = results["machine"]
    print("m1server benchmarks (%s run), %s, %s cores, CPython %s, %.0f s"
          % (results["mode"], results["date"][:19] + "Z", m["nproc"], m["python_version"],
             results["seconds"]))
    for name, outcome in results["benchmarks"].items():
        busy = outcome.get("foreign_cpu")
        print("\n%s  [%.0f s%s]" % (outcome["title"], outcome["seconds"],
                                   "; NOISY: other processes used %.2f cores meanwhile" % busy
                                   if busy is not None and busy >= BUSY_CORES else ""))
        if "error" in outcome:
            print("  COULD NOT RUN: %s" % outcome["error"].strip().splitlines()[-1])
            continue
        width = max([len(r[0]) for r in outcome["rows"]] + [10])
        vwidth = max([len(r[1]) for r in outcome["rows"]] + [10])
        for row in outcome["rows"]:
            print("  %-*s  %-*s  %s" % (width, row[0], vwidth, row[1], row[2]))
        for note in outcome["notes"]:
            print("  note: %s" % note)
    print("\ntargets (SPEC §9, issue 17)")
    for t in results["targets"]:
        relation = ">=" if t["better"] == "higher" else "<="
        value = "n/a" if t["value"] is None else fmt(t["value"])
        print("  %-4s  %-56s %10s %s %s %s" % (t["verdict"], t["name"], value, relation,
                                              fmt(t["limit"]), t["unit"]))
    for name in results["could_not_run"]:
        print("  FAIL  %s could not run" % name)


def fmt(value):
    if isinstance(value, float):
        return "%.3f" % value if abs(value) < 10 else "%.1f" % value
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
