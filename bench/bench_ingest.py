"""ingest: one client uploads a 256 MiB recording as 32 chunks of 8 MiB (SPEC §9, first target).

Three things write the same bytes to the same disk, each `rounds` times, interleaved (the
order rotates every round) so that drift in the disk's speed hits all three alike:
  raw disk   8 MiB os.write + fsync after each, into a file in the same directory: the ceiling
             the disk allows;
  bare sink  bench/bare_sink.py fed the identical HTTP requests: the yardstick (target: m1server
             at least 0.8x of it);
  m1server   POST /api/video/upload, multipart, keep-alive, requests built before the clock.
Throughput is payload bytes / wall time from the first byte sent to the last response, in MB/s
(10^6 bytes/s). After each m1server round the benchmark checks the assembled file: size in
the status, and its sha256 once the server reports it (waiting for the background hash also
keeps it from overlapping the next round).
"""
from __future__ import annotations

import hashlib
import os
import time

import common as c

NAME = "ingest"
CHUNK_BYTES = 8 * c.MIB
FULL_CHUNKS = 32                  # 256 MiB
QUICK_CHUNKS = 8                  # 64 MiB
TARGET_RATIO = 0.8
VERIFY_DEADLINE_S = 15.0


def run(ctx):
    chunks = QUICK_CHUNKS if ctx.quick else FULL_CHUNKS
    rounds = ctx.rounds
    total = chunks * CHUNK_BYTES
    pool = c.random_pool(total)
    expected = hashlib.sha256(c.EBML_SIGNATURE + pool[len(c.EBML_SIGNATURE):]).hexdigest()
    runs = {"disk": [], "bare": [], "m1server": []}
    checks = []
    with c.Workspace(NAME) as ws:
        upload_dir = ws.sub("m1")
        sink_dir = ws.sub("sink")
        with c.ServerProcess("m1server", upload_dir, ctx.python).start() as m1, \
                c.ServerProcess("bare", sink_dir, ctx.python).start() as bare:
            for rnd in range(rounds):
                file_id = "bench_ingest_%d" % rnd
                requests = c.recording_requests(m1.host, m1.port, file_id, pool, chunks,
                                                CHUNK_BYTES)
                bare_requests = c.retarget(requests, m1.port, bare.port)
                order = ["disk", "bare", "m1server"]
                order = order[rnd % 3:] + order[:rnd % 3]
                for what in order:
                    if what == "disk":
                        seconds = write_disk(os.path.join(upload_dir, "rawdisk.bin"), pool,
                                             chunks)
                    elif what == "bare":
                        seconds, _ = send_all(bare, bare_requests)
                        remove_files(sink_dir)
                    else:
                        seconds, last = send_all(m1, requests)
                        checks.append(verify(m1, file_id, last, expected, total))
                    runs[what].append(total / seconds / c.MB)
                    ctx.log("ingest round %d %-8s %7.1f MB/s" % (rnd + 1, what, runs[what][-1]))
                del requests, bare_requests
    med = {k: c.median(v) for k, v in runs.items()}
    ratio = med["m1server"] / med["bare"] if med["bare"] else None
    rows = [
        ["raw disk (8 MiB writes + fsync)", "%.1f MB/s" % med["disk"], fmt_runs(runs["disk"])],
        ["bare sink (stdlib, fsync, no parsing)", "%.1f MB/s" % med["bare"],
         fmt_runs(runs["bare"])],
        ["m1server POST /api/video/upload", "%.1f MB/s" % med["m1server"],
         fmt_runs(runs["m1server"])],
        ["m1server / bare sink", "%.2f" % ratio, "median of each"],
        ["m1server / raw disk", "%.2f" % (med["m1server"] / med["disk"]), ""],
    ]
    notes = [n for n in checks if n != "ok"]
    return {
        "title": "ingest: %d MiB as %d x 8 MiB chunks, one keep-alive client, median of %d"
                 % (total // c.MIB, chunks, rounds),
        "figures": {"payload_bytes": total, "chunk_bytes": CHUNK_BYTES, "rounds": rounds,
                    "mb_per_s_runs": runs, "mb_per_s_median": med,
                    "ratio_m1server_to_bare": ratio, "verification": checks},
        "rows": rows,
        "targets": [c.target("ingest m1server/bare sink", ratio, TARGET_RATIO, "higher", "x")],
        "notes": notes,
    }


def write_disk(path, pool, chunks):
    """The disk's own speed for this pattern: 8 MiB writes, fsync after each."""
    view = memoryview(pool)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        for i in range(chunks):
            piece = view[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]
            while len(piece):
                piece = piece[os.write(fd, piece):]
            os.fsync(fd)
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)
    return seconds


def send_all(server, requests):
    """Send every request on one keep-alive connection; returns (seconds, last response)."""
    with c.Connection(server.host, server.port) as conn:
        start = time.perf_counter()
        for i, request in enumerate(requests):
            response = conn.request(request)
            if response.status != 200:
                raise c.BenchError("%s answered %d to chunk %d: %r"
                                   % (server.kind, response.status, i, response.body[:300]))
        seconds = time.perf_counter() - start
    return seconds, response


def verify(server, file_id, last, expected, total):
    """The bytes the server assembled are the bytes sent (so the speed is for correct work)."""
    state = last.json().get("data", {}).get("status")
    if state != "completed":
        return "%s: last chunk answered status %r, not 'completed'" % (file_id, state)
    deadline = time.monotonic() + VERIFY_DEADLINE_S
    with c.Connection(server.host, server.port) as conn:
        while True:
            data = conn.get("/api/video/status/" + file_id).json().get("data", {})
            if data.get("fileSize") != total:
                return "%s: status fileSize %r, expected %d" % (file_id, data.get("fileSize"),
                                                                total)
            digest = data.get("sha256")
            if digest:
                digest = digest.split(":")[-1]
                return "ok" if digest == expected else "%s: sha256 %s, expected %s" % (
                    file_id, digest, expected)
            if time.monotonic() > deadline:
                return "%s: status had no sha256 after %.0f s" % (file_id, VERIFY_DEADLINE_S)
            time.sleep(0.05)


def remove_files(directory):
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))


def fmt_runs(values):
    return "runs: " + ", ".join("%.0f" % v for v in values)
