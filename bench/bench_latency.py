"""latency: N simulated recorders, each sending a 250 KiB chunk every second (SPEC §9).

Each recorder is a thread with its own keep-alive connection and its own fileId, as a browser
tab recording with MediaRecorder's one-second timeslice would be. Recorder i starts i/N of a
second after the first, so the load is spread as independent users' would be, and then sends
chunk k at start + k seconds (or at once, if the previous answer came late). Chunk 0 starts
with the EBML signature; the last says `completed`. The clock runs from the first byte of a
request to the last byte of its response; every request is prebuilt and connections are open
before the first send, so the figure is the server's acknowledgement time plus loopback.

Reported per run: p50, p99, max (ms), errors (non-200, resets, timeouts, a last chunk not
answered `completed`), reconnects, and the server's CPU seconds per GB of chunk payload
(utime + stime from /proc/<pid>/stat over the load). The three servers take turns for
`--rounds` rounds (3; one with --quick), the order turning each round: the bare sink's own
CPU per GB swings by 1.5x from run to run here (the kernel's share of its fsyncs), so the
CPU ratio is each round's m1server / bare sink, and its median is reported; latencies are
the worst round's. The same load goes, in the same run, to
the bare sink and to @tus/server (each recorder a tus upload created before the clock, then
one 250 KiB PATCH a second; it does not fsync). Targets (200 recorders): p99 under 20 ms, no
errors, and server CPU per byte at most 1.5x the bare sink's (issue 17).
"""
from __future__ import annotations

import threading
import time

import common as c

NAME = "latency"
CHUNK_BYTES = 250 * c.KIB
INTERVAL_S = 1.0
FULL_CHUNKS = 10
QUICK_CHUNKS = 3
TARGET_P99_MS = 20.0
TARGET_CPU_RATIO = 1.5          # issue 17: server CPU per byte at most this x the bare sink's
CPU_TARGET_RECORDERS = 200
LABELS = {"bare": "bare sink", "m1server": "m1server", "tus": "@tus/server"}
KINDS = ("bare", "m1server", "tus")
LATE_DEADLINE_S = 30.0          # a run stops sending this long after its last scheduled chunk
JOIN_DEADLINE_S = 90.0


def run(ctx):
    chunks = QUICK_CHUNKS if ctx.quick else FULL_CHUNKS
    pool = c.random_pool(8 * c.MIB)
    figures = {}
    rows = []
    targets = []
    notes = []
    tus_note = c.install_tus_node()
    if tus_note:
        notes.append(tus_note)
    rounds = 1 if ctx.quick else ctx.rounds
    kinds = [kind for kind in KINDS if not (kind == "tus" and tus_note)]
    for recorders in ctx.recorders:
        key = "%d_recorders" % recorders
        figures[key] = {}
        runs = {kind: [] for kind in kinds}
        for number in range(rounds):
            # The order turns each round, so the disk's drift does not favour one server.
            for kind in kinds[number % len(kinds):] + kinds[:number % len(kinds)]:
                with c.Workspace("%s-%d" % (NAME, recorders)) as ws:
                    server = c.TusNodeServer(ws.sub(kind)) if kind == "tus" else \
                        c.ServerProcess(kind, ws.sub(kind), ctx.python)
                    with server.start():
                        result = load(server, recorders, chunks, pool)
                runs[kind].append(result)
                ctx.log("latency %3d recorders %-8s round %d: p50 %.1f ms p99 %.1f ms max "
                        "%.1f ms errors %d CPU %s" % (
                            recorders, kind, number + 1, result["p50_ms"] or -1,
                            result["p99_ms"] or -1, result["max_ms"] or -1, result["errors"],
                            per_gb(result["cpu_s_per_gb"])))
        for kind in KINDS:
            if kind not in runs:
                rows.append(["%d recorders, %s" % (recorders, LABELS[kind]), "not run", ""])
                continue
            result = combined(runs[kind])
            figures[key][kind] = result
            rows.append(["%d recorders, %s" % (recorders, LABELS[kind]),
                         "p50 %s  p99 %s  max %s" % (ms(result["p50_ms"]), ms(result["p99_ms"]),
                                                     ms(result["max_ms"])),
                         "CPU %s; errors %d, requests %d, connects %d"
                         % (per_gb(result["cpu_s_per_gb"]), result["errors"],
                            result["requests"], result["connects"])])
            notes.extend("%d recorders, %s: %s" % (recorders, kind, e)
                         for e in result["error_samples"])
        m1, bare = figures[key]["m1server"], figures[key]["bare"]
        # Each round's ratio (the two ran minutes apart at most), then their median.
        ratios = [a["cpu_s_per_gb"] / b["cpu_s_per_gb"]
                  for a, b in zip(runs["m1server"], runs["bare"])
                  if a["cpu_s_per_gb"] and b["cpu_s_per_gb"]]
        cpu_ratio = c.median(ratios) if ratios else None
        figures[key]["cpu_ratio_m1server_to_bare"] = cpu_ratio
        figures[key]["cpu_ratios_by_round"] = ratios
        rows.append(["%d recorders, m1server / bare sink" % recorders,
                     "CPU per byte %s" % ("%.2fx" % cpu_ratio if cpu_ratio else "n/a"),
                     "median of %d round%s%s" % (len(ratios), "" if len(ratios) == 1 else "s",
                                                 ": " + ", ".join("%.2fx" % r for r in ratios)
                                                 if len(ratios) > 1 else "")])
        targets.append(c.target("latency p99, %d recorders" % recorders, m1["p99_ms"],
                                TARGET_P99_MS, "lower", "ms"))
        targets.append(c.target("latency errors, %d recorders" % recorders, m1["errors"], 0,
                                "lower", ""))
        if recorders == CPU_TARGET_RECORDERS:
            targets.append(c.target("latency CPU per byte m1server/bare sink, %d recorders"
                                    % recorders, cpu_ratio, TARGET_CPU_RATIO, "lower", "x"))
    return {
        "title": "latency: recorders x %d chunks of 250 KiB, one per second each" % chunks,
        "figures": figures,
        "rows": rows,
        "targets": targets,
        "notes": notes,
    }


def combined(results):
    """One server's rounds as one figure: the median CPU per GB, the worst round's p50, p99
    and max (a target met in every round), the errors and requests of all rounds."""
    first = dict(results[0])
    if len(results) == 1:
        return first
    first["rounds"] = results
    for name in ("requests", "ok", "errors", "connects"):
        first[name] = sum(r[name] for r in results)
    first["error_samples"] = sorted(set(e for r in results for e in r["error_samples"]))[:5]
    per_gb_values = [r["cpu_s_per_gb"] for r in results if r["cpu_s_per_gb"] is not None]
    first["cpu_s_per_gb"] = c.median(per_gb_values) if per_gb_values else None
    for name in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms"):
        values = [r[name] for r in results if r[name] is not None]
        first[name] = max(values) if values else None
    return first


def load(server, recorders, chunks, pool):
    connections = [c.Connection(server.host, server.port) for _ in range(recorders)]
    latencies = []                    # list.append is atomic under the GIL
    errors = []
    check_completed = server.kind == "m1server"
    for conn in connections:          # every connection is open before the clock starts
        try:
            conn.connect()
        except OSError as exc:
            errors.append("connect: %r" % exc)
    recorder_requests = [requests_of(server, conn, recorders, i, chunks, pool)
                         for i, conn in enumerate(connections)]
    cpu = c.CpuMeter(server).start()
    start = time.perf_counter() + 0.2
    stop_sending = start + INTERVAL_S + chunks * INTERVAL_S + LATE_DEADLINE_S

    def recorder(i):
        conn = connections[i]
        requests = recorder_requests[i]
        first = start + INTERVAL_S * i / recorders
        for k, request in enumerate(requests):
            now = time.perf_counter()
            if now > stop_sending:
                errors.append("chunk %d not sent: run deadline passed" % k)
                continue
            due = first + k * INTERVAL_S
            if due > now:
                time.sleep(due - now)
            t0 = time.perf_counter()
            try:
                response = conn.request(request)
            except Exception as exc:                       # reset, timeout, closed
                errors.append("chunk %d: %r" % (k, exc))
                continue
            elapsed = time.perf_counter() - t0
            if response.status != (204 if server.kind == "tus-node" else 200):
                errors.append("chunk %d: HTTP %d %r" % (k, response.status,
                                                        response.body[:200]))
            elif check_completed and k == len(requests) - 1 \
                    and b'"completed"' not in response.body:
                errors.append("last chunk not completed: %r" % response.body[:200])
            else:
                latencies.append(elapsed)

    threads = [threading.Thread(target=recorder, args=(i,), daemon=True)
               for i in range(recorders)]
    for t in threads:
        t.start()
    join_deadline = time.monotonic() + JOIN_DEADLINE_S + chunks * INTERVAL_S
    for t in threads:
        t.join(max(0.0, join_deadline - time.monotonic()))
    stuck = sum(1 for t in threads if t.is_alive())
    if stuck:
        errors.append("%d recorder threads still blocked at the deadline" % stuck)
    wall = time.perf_counter() - start
    cpu.stop()
    for conn in connections:
        conn.close()
    payload_gb = recorders * chunks * CHUNK_BYTES / 1e9
    result = {"recorders": recorders, "chunks_each": chunks, "chunk_bytes": CHUNK_BYTES,
              "requests": recorders * chunks, "ok": len(latencies), "errors": len(errors),
              "connects": sum(conn.connects for conn in connections),
              "wall_s": wall, "error_samples": sorted(set(errors))[:5],
              "cpu_s": cpu.seconds if cpu.known else None,
              "cpu_s_per_gb": cpu.per(payload_gb)}
    if latencies:
        ms_values = [x * 1000.0 for x in latencies]
        result.update(p50_ms=c.percentile(ms_values, 0.50), p90_ms=c.percentile(ms_values, 0.90),
                      p99_ms=c.percentile(ms_values, 0.99), max_ms=max(ms_values),
                      mean_ms=sum(ms_values) / len(ms_values))
    else:
        result.update(p50_ms=None, p90_ms=None, p99_ms=None, max_ms=None, mean_ms=None)
    return result


def requests_of(server, conn, recorders, i, chunks, pool):
    """Recorder i's prebuilt requests: seed API chunks, or (@tus/server) PATCHes of an upload
    created now, on the recorder's own connection, before the clock starts."""
    file_id = "bench_rec_%d_%d" % (recorders, i)
    if server.kind != "tus-node":
        return c.recording_requests(server.host, server.port, file_id, pool, chunks,
                                    CHUNK_BYTES, offset=i * 7919 * 13)
    payload = c.video_payload(pool, i * 7919 * 13, chunks * CHUNK_BYTES, True)
    path = c.create_tus_upload(conn, len(payload), file_id)
    return c.tus_patch_requests(conn, path, payload, CHUNK_BYTES)


def per_gb(value):
    return "%.1f s/GB" % value if value is not None else "n/a"


def ms(value):
    return "%.1f ms" % value if value is not None else "n/a"
