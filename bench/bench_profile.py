#!/usr/bin/env python3
"""profile: where the CPU of one 16 KiB chunk request goes, end to end (issue 17).

    python bench/bench_profile.py                  # 2,000 chunks of 16 KiB, profiled
    python bench/bench_profile.py --chunk-kib 250  # a recorder's chunk (make bench's recorders)
    python bench/bench_profile.py --chunks 5000 --top 40
    python bench/bench_profile.py --file-first     # the seed's field order (file part first)
    python bench/bench_profile.py --chunk-kib 250 --per-upload 10   # make bench's recorders

The server runs in this process, as `python3 m1server.py` would build it (the same flags as
the other benchmarks), but its one connection is served on the main thread under cProfile
instead of on a thread of its own: cProfile sees only the thread that enabled it. The client
is a child process (so it takes none of this process's GIL): one keep-alive connection, the
prebuilt requests of bench/common.py sent back to back, one upload (or, --per-upload N,
recordings of N chunks, each completed before the next begins).

Printed: CPU per request in the serving thread (thread_time, measured once without the
profiler, which inflates every Python call), then the profiled time grouped by where it goes
(HTTP head parsing, multipart, the store's Python, SQLite, system calls, ...), then the top
functions by their own time. Figures of a profile are shares, not speeds; the speeds are
`make bench`'s.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c  # noqa: E402

sys.path.insert(0, c.ROOT)

CHUNK_BYTES = 16 * c.KIB
DEFAULT_CHUNKS = 2000
CLIENT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import common as c
host, port, count, size, file_first, per_upload = sys.argv[2], int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1", int(sys.argv[7])
pool = c.random_pool(8 * c.MIB)
requests = []
for first in range(0, count, per_upload):      # recordings of per_upload chunks each
    requests += c.recording_requests(host, port, "bench_profile_%d" % first, pool,
                                     min(per_upload, count - first), size,
                                     offset=first * size, file_first=file_first)
with c.Connection(host, port) as conn:
    for i, request in enumerate(requests):
        response = conn.request(request)
        if response.status != 200:
            sys.exit("chunk %d: %d %r" % (i, response.status, response.body[:200]))
"""

# The steps of one request, in the order the bytes travel: (label, file, function), timed
# inclusively (cProfile's cumulative time). A step this version of the code lacks is skipped.
STEPS = (
    ("read the request head (http.server + email)", "http/server.py", "parse_request"),
    ("read the request head (httphead)", "httpapi.py", "read_head"),
    ("dispatch: CORS, rate limit, route, auth, handler", "httpapi.py", "dispatch"),
    ("  body through the parser (into the video, or a part file)", "httpapi.py", "read_form"),
    ("  the chunk made durable (ChunkReceiver.store)", "httpapi.py", "store"),
    ("  the seed's fields checked", "httpapi.py", "chunk_fields"),
    ("  store.put_chunk", "chunkstore.py", "put_chunk"),
    ("    checks before the lock", "storage.py", "check_chunk_request"),
    ("    ledger reads (load, chunk_at)", "chunkstore.py", "load"),
    ("    the append (write, journal commit)", "chunkstore.py", "_append"),
    ("      the ledger's transaction", "chunkstore.py", "record_append"),
    ("  the JSON reply", "httpapi.py", "send_json"),
    ("access log and metrics", "httpapi.py", "log_request"),
)

# Where a function's own time goes, by the file (or built-in) it is in. First match wins.
GROUPS = (
    ("system calls: fsync", ("posix.fsync", "posix.fdatasync")),
    ("system calls: socket", ("recv_into", "method 'recv'", "sendall", "method 'send'",
                              "readinto", "read1")),
    ("system calls: files", ("posix.", "io.open", "method 'write'", "method 'close'",
                             "method 'read'")),
    ("SQLite", ("sqlite3",)),
    ("HTTP head (http.server, email, httphead)", ("http/server.py", "email/", "http/client.py",
                                                  "httphead.py")),
    ("multipart parser", ("multipart.py",)),
    ("store (chunkstore, storage, localdisk)", ("chunkstore.py", "storage.py", "localdisk.py")),
    ("handler (httpapi, auth, cors, connections)", ("httpapi.py", "auth.py", "cors.py",
                                                     "connections.py")),
    ("logging and metrics", ("serverlog.py", "metrics.py")),
    ("JSON", ("json/", "_json")),
    ("threads and locks", ("threading.py", "acquire", "release", "queue.py")),
    ("socketserver", ("socketserver.py", "socket.py")),
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS)
    parser.add_argument("--chunk-kib", type=int, default=CHUNK_BYTES // c.KIB,
                        help="chunk size in KiB (default 16; 250 is a recorder's chunk)")
    parser.add_argument("--per-upload", type=int, default=0, metavar="N",
                        help="chunks per upload: recordings of N chunks, each a new fileId, "
                             "as make bench's recorders send 10 (default: one upload)")
    parser.add_argument("--top", type=int, default=25, help="functions listed by own time")
    parser.add_argument("--file-first", action="store_true",
                        help="send the file part before the text fields (the seed's order)")
    parser.add_argument("--server-args", default="", help="extra server flags, one string")
    parser.add_argument("--wall", action="store_true",
                        help="profile wall time (default: the thread's CPU time, which leaves "
                             "out waiting for the disk and the client)")
    args = parser.parse_args(argv)
    unprofiled, _, (user, system) = serve_once(args, profile=False)
    per_request, profile, _ = serve_once(args, profile=True)
    print("one %d KiB chunk request (%s first), %d requests, %s, CPython %s"
          % (args.chunk_kib, "file part" if args.file_first else "text fields", args.chunks,
             "%d per upload" % args.per_upload if args.per_upload else "one upload",
             sys.version.split()[0]))
    print("  CPU of the serving thread per request: %.0f us (without the profiler); "
          "%.0f us profiled" % (unprofiled * 1e6, per_request * 1e6))
    if user is not None:
        print("    of which user %.0f us, system %.0f us (the kernel: copies, the disk, fsync)"
              % (user * 1e6, system * 1e6))
    stats = pstats.Stats(profile)
    total = sum(entry[2] for entry in stats.stats.values())
    print("\nprofiled %s time of each step, inclusive, per request:"
          % ("wall" if args.wall else "CPU"))
    for label, seconds in steps(stats):
        print("  %6.0f us  %s" % (1e6 * seconds / args.chunks, label))
    print("\nprofiled own %s time by where it goes (%% of %.2f s):"
          % ("wall" if args.wall else "CPU", total))
    for name, seconds, functions in grouped(stats):
        print("  %5.1f%%  %6.0f us/request  %s" % (100.0 * seconds / total,
                                                  1e6 * seconds / args.chunks, name))
        print("                           %s" % ", ".join(functions[:4]))
    print("\ntop %d functions by own time:" % args.top)
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


def serve_once(args, profile):
    """Serve one client's connection of args.chunks requests on this thread; returns (CPU
    seconds of this thread per request, the cProfile.Profile or None, (user, system) seconds
    per request or (None, None))."""
    import httpapi as m1server
    directory = tempfile.mkdtemp(prefix="m1bench-profile-")
    flags = ["--host", "127.0.0.1", "--port", "0", "--dir", directory] + c.SERVER_ARGS + \
        args.server_args.split()
    config = m1server.Config(m1server.build_parser({}).parse_args(flags))
    store = m1server.open_store(config)
    store.repair()
    server = m1server.M1Server(config, store)
    host, port = server.server_address[:2]
    client = subprocess.Popen([sys.executable, "-c", CLIENT, c.BENCH_DIR, host, str(port),
                               str(args.chunks), str(args.chunk_kib * c.KIB),
                               "1" if args.file_first else "0",
                               str(args.per_upload or args.chunks)])
    try:
        server.socket.settimeout(60)
        request, address = server.get_request()
        profiler = None
        if profile:
            profiler = cProfile.Profile() if args.wall else cProfile.Profile(time.thread_time)
        started, usage = time.thread_time(), thread_usage()
        if profiler is not None:
            profiler.enable()
        serve_connection(server, request, address)
        if profiler is not None:
            profiler.disable()
        spent, after = time.thread_time() - started, thread_usage()
        if client.wait(60) != 0:
            raise c.BenchError("the client failed")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        server.server_close()
        store.close()
        c.shutil.rmtree(directory, ignore_errors=True)
    split = (None, None) if usage is None else \
        ((after[0] - usage[0]) / args.chunks, (after[1] - usage[1]) / args.chunks)
    return spent / args.chunks, profiler, split


def thread_usage():
    """(user, system) CPU seconds of this thread, or None where RUSAGE_THREAD is missing."""
    try:
        import resource
        usage = resource.getrusage(resource.RUSAGE_THREAD)
    except (ImportError, AttributeError, OSError):
        return None
    return usage.ru_utime, usage.ru_stime


def serve_connection(server, request, address):
    """What the server's thread for one connection does, on this thread (admitted as the
    accept loop would: connections.py keeps its deadlines)."""
    connections = getattr(server, "connections", None)
    if connections is not None and connections.admit(request, address[0]) is not None:
        raise c.BenchError("the server refused the profiled connection")
    quiet = open(os.devnull, "w")
    stderr, sys.stderr = sys.stderr, quiet        # the access log still runs, unseen
    try:
        server.finish_request(request, address)
    finally:
        sys.stderr = stderr
        quiet.close()
        server.shutdown_request(request)


def steps(stats):
    found = []
    for label, filename, function in STEPS:
        seconds = sum(entry[3] for (name, _, func), entry in stats.stats.items()
                      if name.endswith(filename) and func == function)
        if seconds:
            found.append((label, seconds))
    return found


def grouped(stats):
    """[(group, own seconds, its heaviest functions)], heaviest group first."""
    sums, members = {}, {}
    for (filename, line, function), entry in stats.stats.items():
        where = "%s %s" % (filename, function)
        name = next((group for group, marks in GROUPS
                     if any(mark in where for mark in marks)), "other")
        sums[name] = sums.get(name, 0.0) + entry[2]
        members.setdefault(name, []).append((entry[2], "%s:%s(%s)" % (
            os.path.basename(filename), line, function) if filename != "~" else function))
    return [(name, seconds, [label for _, label in sorted(members[name], reverse=True)])
            for name, seconds in sorted(sums.items(), key=lambda item: -item[1])]


if __name__ == "__main__":
    threading.current_thread().name = "m1-profiled"
    sys.exit(main())
