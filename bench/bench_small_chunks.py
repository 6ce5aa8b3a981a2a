"""small_chunks: 10,000 chunks of 16 KiB to one upload, as fast as one client can (SPEC §9).

Per-request overhead dominates here: routing, multipart parsing, the per-fileId lock, the
ledger update and an fsync per chunk. One keep-alive client sends prebuilt requests back to
back. The bare sink (one file + fsync per request) gets the same requests. To keep the disk's
drifting speed from favouring either side, the two alternate in blocks of 1,000 chunks (the
m1server upload continues across blocks, so it is still one upload of 10,000 chunks); each
side's chunks/s is its chunks over its own summed time. Target: m1server at least 0.7x the
bare sink. `--quick` sends 1,000.
"""
from __future__ import annotations

import time

import common as c

NAME = "small_chunks"
CHUNK_BYTES = 16 * c.KIB
FULL_CHUNKS = 10000
QUICK_CHUNKS = 1000
BLOCK = 1000
TARGET_RATIO = 0.7
RUN_DEADLINE_S = 240.0


def run(ctx):
    count = QUICK_CHUNKS if ctx.quick else FULL_CHUNKS
    block = min(BLOCK, count // 2) if ctx.quick else BLOCK
    pool = c.random_pool(8 * c.MIB)
    file_id = "bench_small_chunks"
    seconds = {"bare": 0.0, "m1server": 0.0}
    final = None
    with c.Workspace(NAME) as ws:
        with c.ServerProcess("m1server", ws.sub("m1"), ctx.python).start() as m1, \
                c.ServerProcess("bare", ws.sub("sink"), ctx.python).start() as bare:
            requests = c.recording_requests(m1.host, m1.port, file_id, pool, count, CHUNK_BYTES)
            bare_requests = c.retarget(requests, m1.port, bare.port)
            deadline = time.monotonic() + RUN_DEADLINE_S
            with c.Connection(m1.host, m1.port) as m1_conn, \
                    c.Connection(bare.host, bare.port) as bare_conn:
                for begin in range(0, count, block):
                    if time.monotonic() > deadline:
                        raise c.BenchError("small_chunks passed its %.0f s deadline at chunk %d"
                                           % (RUN_DEADLINE_S, begin))
                    spent, _ = send_block(bare_conn, bare_requests, begin, block)
                    seconds["bare"] += spent
                    spent, final = send_block(m1_conn, requests, begin, block)
                    seconds["m1server"] += spent
                connects = {"bare": bare_conn.connects, "m1server": m1_conn.connects}
                status = m1_conn.get("/api/video/status/" + file_id).json().get("data", {})
    rate = {k: count / v for k, v in seconds.items()}
    ratio = rate["m1server"] / rate["bare"]
    notes = []
    if final is None or b'"completed"' not in final.body:
        notes.append("last chunk was not answered 'completed': %r"
                     % (final.body[:200] if final else None))
    if status.get("fileSize") != count * CHUNK_BYTES:
        notes.append("status fileSize %r, expected %d" % (status.get("fileSize"),
                                                          count * CHUNK_BYTES))
    ctx.log("small_chunks bare %.0f/s m1server %.0f/s" % (rate["bare"], rate["m1server"]))
    return {
        "title": "small_chunks: %d x 16 KiB to one upload, one keep-alive client" % count,
        "figures": {"chunks": count, "chunk_bytes": CHUNK_BYTES, "block": block,
                    "seconds": seconds, "chunks_per_s": rate, "ratio_m1server_to_bare": ratio,
                    "connects": connects, "final_status": status},
        "rows": [
            ["bare sink", "%.0f chunks/s" % rate["bare"], "%.2f s" % seconds["bare"]],
            ["m1server", "%.0f chunks/s" % rate["m1server"], "%.2f s; %.2f ms per chunk"
             % (seconds["m1server"], 1000.0 * seconds["m1server"] / count)],
            ["m1server / bare sink", "%.2f" % ratio, ""],
        ],
        "targets": [c.target("small_chunks m1server/bare sink", ratio, TARGET_RATIO, "higher",
                             "x")],
        "notes": notes,
    }


def send_block(conn, requests, begin, block):
    start = time.perf_counter()
    response = None
    for i in range(begin, min(begin + block, len(requests))):
        response = conn.request(requests[i])
        if response.status != 200:
            raise c.BenchError("chunk %d answered %d: %r" % (i, response.status,
                                                             response.body[:300]))
    return time.perf_counter() - start, response
