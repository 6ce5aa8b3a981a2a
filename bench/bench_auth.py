"""auth: what authentication costs per chunk (issue 8, "Measure").

The same load against three servers, interleaved in rounds so that machine noise hits all
alike: auth off; --api-key with each chunk carrying the key; --api-key with each chunk carrying
a token (HMAC verification, then the fileId and byte-budget check after the parse).

  latency:    one keep-alive connection sends CHUNKS chunks of 250 KiB (a MediaRecorder
              slice) one after another; p50/p99 per request, first byte sent to last byte of
              the response.
  throughput: one keep-alive connection sends 4 MiB chunks totalling THROUGHPUT_MB; MB/s of
              payload.

Run: python bench/bench_auth.py [--quick] [--rounds N]. Prints a table and JSON. Timings are
reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import common as c

KEY = "bench-key-0123456789abcdef"
CHUNK_BYTES = 250 * c.KIB
BIG_CHUNK_BYTES = 4 * c.MIB
MODES = ("off", "key", "token")


def with_header(request, name, value):
    head, sep, rest = request.partition(b"\r\n")
    return head + sep + ("%s: %s\r\n" % (name, value)).encode("ascii") + rest


def credential_for(server, mode, file_id):
    if mode == "off":
        return None
    if mode == "key":
        return KEY
    body = json.dumps({"fileId": file_id, "rights": ["upload", "read"]}).encode()
    with c.Connection(server.host, server.port) as conn:
        answer = conn.request(("POST /api/video/tokens HTTP/1.1\r\nHost: x\r\nAuthorization: "
                               "Bearer %s\r\nContent-Type: application/json\r\n"
                               "Content-Length: %d\r\n\r\n" % (KEY, len(body))).encode() + body)
    if answer.status != 200:
        raise c.BenchError("token request answered %d" % answer.status)
    return answer.json()["data"]["token"]


def send_recording(server, mode, file_id, pool, count, size):
    """-> list of per-request seconds, total seconds."""
    credential = credential_for(server, mode, file_id)
    requests = c.recording_requests(server.host, server.port, file_id, pool, count, size)
    if credential:
        requests = [with_header(r, "Authorization", "Bearer " + credential) for r in requests]
    took = []
    with c.Connection(server.host, server.port) as conn:
        started = time.perf_counter()
        for request in requests:
            t0 = time.perf_counter()
            answer = conn.request(request)
            took.append(time.perf_counter() - t0)
            if answer.status != 200:
                raise c.BenchError("%s: chunk answered %d %r" % (mode, answer.status,
                                                                 answer.body[:200]))
        total = time.perf_counter() - started
    return took, total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    chunks = 40 if args.quick else 200
    big_chunks = 8 if args.quick else 32
    pool = c.random_pool(16 * c.MIB)
    latencies = {mode: [] for mode in MODES}
    throughput = {mode: [] for mode in MODES}
    python = c.base_python()
    with c.Workspace("auth") as ws:
        servers = {}
        try:
            for mode in MODES:
                extra = [] if mode == "off" else ["--api-key", KEY]
                servers[mode] = c.ServerProcess("m1server", ws.sub(mode), python,
                                                extra_args=extra).start()
            for round_ in range(args.rounds):
                for mode in MODES:
                    took, _ = send_recording(servers[mode], mode, "lat_%s_%d" % (mode, round_),
                                             pool, chunks, CHUNK_BYTES)
                    latencies[mode].extend(took)
                    _, total = send_recording(servers[mode], mode, "tp_%s_%d" % (mode, round_),
                                              pool, big_chunks, BIG_CHUNK_BYTES)
                    throughput[mode].append(big_chunks * BIG_CHUNK_BYTES / total / c.MB)
                sys.stderr.write("round %d done\n" % (round_ + 1))
        finally:
            for server in servers.values():
                server.stop()
    figures = {}
    print("%-6s %10s %10s %14s" % ("auth", "p50 ms", "p99 ms", "MB/s (median)"))
    for mode in MODES:
        figures[mode] = {
            "p50_ms": c.percentile(latencies[mode], 0.50) * 1000,
            "p99_ms": c.percentile(latencies[mode], 0.99) * 1000,
            "throughput_mb_s": c.median(throughput[mode]),
            "requests": len(latencies[mode])}
        print("%-6s %10.2f %10.2f %14.1f" % (mode, figures[mode]["p50_ms"],
                                             figures[mode]["p99_ms"],
                                             figures[mode]["throughput_mb_s"]))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
