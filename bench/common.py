"""Shared pieces of the benchmark suite: server processes, a cheap HTTP client, request bodies.

The load clients here are deliberately thin: a raw keep-alive socket, requests built before
the clock starts, one `sendall` per request and a minimal response reader. On a 2-core
machine the client competes with the server for CPU, so every cycle the client spends is a
cycle taken from the thing being measured; `requests` or `http.client` would cost more.
"""
from __future__ import annotations

import json
import math
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
SERVER_PROGRAM = os.path.join(ROOT, "m1server.py")
BARE_SINK_PROGRAM = os.path.join(BENCH_DIR, "bare_sink.py")

# The server flags the brief fixes for every benchmark: room for one 256 MiB chunk and an
# 880 MiB upload, and no free-disk guard (the benchmark's own files would trip it).
# Every client of a benchmark comes from one address (127.0.0.1), where real users have one
# each: the per-address cap (half of --max-connections) would count them all together.
SERVER_ARGS = ["--max-chunk-size", "512M", "--max-upload-size", "2G", "--min-free-disk", "0",
               "--processing", "off",     # random payloads are not video: no ffprobe per upload
               "--max-connections-per-client", "256"]

START_DEADLINE_S = 20.0
STOP_DEADLINE_S = 15.0
SOCKET_TIMEOUT_S = 60.0
URL_LINE = re.compile(r"serving http://([^/:\s]+):(\d+)")

EBML_SIGNATURE = b"\x1a\x45\xdf\xa3"     # WebM/Matroska magic: chunk 0 must start with it
BOUNDARY = "m1benchBoundary7d0c5a1e9f3b2468"
KIB = 1024
MIB = 1024 * 1024
MB = 1000 * 1000                       # throughput is reported in MB/s = 10^6 bytes/s


class BenchError(Exception):
    """A benchmark could not run (as opposed to: it ran and missed its target)."""


def base_python():
    """The real interpreter behind the running one (a venv's python runs site hooks that add
    start-up time; a pyenv shim is a shell script). The server must run exactly as a user
    runs `python3 m1server.py`, on the same CPython as the baseline it is compared with."""
    if sys.prefix == sys.base_prefix:                      # not in a venv
        return sys.executable
    base = getattr(sys, "_base_executable", None)
    if base and os.path.isfile(base) and not base.startswith(sys.prefix):
        return base
    return os.path.realpath(sys.executable)                # a venv's python is a symlink


# --------------------------------------------------------------------------------------------
# Server processes

class ServerProcess:
    """m1server or the bare sink as a child process; stdout and stderr go to a log file."""

    def __init__(self, kind, directory, python, port=0, extra_args=(), env=None):
        self.kind = kind
        self.env = env                        # None: this process's environment
        self.directory = directory
        self.python = python
        self.requested_port = port
        self.extra_args = list(extra_args)
        self.proc = None
        self.host = None
        self.port = None
        self.log_path = os.path.join(os.path.dirname(directory.rstrip("/")) or ".",
                                     "%s-%s.log" % (os.path.basename(directory), kind))

    def command(self):
        if self.kind == "m1server":
            program, extra = SERVER_PROGRAM, SERVER_ARGS
        else:
            program, extra = BARE_SINK_PROGRAM, []
        return ([self.python, program, "--host", "127.0.0.1", "--port",
                 str(self.requested_port), "--dir", self.directory] + extra + self.extra_args)

    def spawn(self):
        """Start the process without waiting for it (footprint times this itself)."""
        if self.kind == "m1server" and not os.path.isfile(SERVER_PROGRAM):
            raise BenchError("m1server.py not found at " + SERVER_PROGRAM)
        os.makedirs(self.directory, exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=ROOT, env=self.env)
        finally:
            log.close()
        return self

    def start(self):
        self.spawn()
        self.wait_serving()
        return self

    def wait_serving(self, deadline_s=START_DEADLINE_S):
        deadline = time.monotonic() + deadline_s
        while True:
            match = URL_LINE.search(self.log_text())
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                return
            if self.proc.poll() is not None:
                raise BenchError("%s exited with %s before serving:\n%s"
                                 % (self.kind, self.proc.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError("%s did not print its URL within %.0f s:\n%s"
                                 % (self.kind, deadline_s, self.log_tail()))
            time.sleep(0.005)

    @property
    def pid(self):
        return self.proc.pid

    def log_text(self):
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, lines=30):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        """SIGTERM (the server finishes in-flight chunks), then kill after a deadline."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_DEADLINE_S)
        return self.proc.returncode if self.proc else None

    def kill(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait(STOP_DEADLINE_S)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Workspace:
    """A temporary directory on the same file system as the repository (so m1server, the bare
    sink and the raw-disk write all hit the same disk), removed afterwards."""

    def __init__(self, prefix):
        parent = os.environ.get("M1_BENCH_TMP") or None
        self.path = tempfile.mkdtemp(prefix="m1bench-%s-" % prefix, dir=parent)

    def sub(self, name):
        path = os.path.join(self.path, name)
        os.makedirs(path, exist_ok=True)
        return path

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


# --------------------------------------------------------------------------------------------
# The client

class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body.decode("utf-8"))


class Connection:
    """One keep-alive HTTP/1.1 connection on a raw socket.

    `request(data)` sends prebuilt request bytes with one sendall and reads one response.
    When the server answers `Connection: close` (or speaks HTTP/1.0), the next request opens a
    new connection; `connects` counts them, so a server that drops keep-alive shows up.
    """

    def __init__(self, host, port, timeout=SOCKET_TIMEOUT_S):
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock = None
        self.pending = b""
        self.connects = 0

    def connect(self):
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.pending = b""
        self.connects += 1

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def request(self, data):
        if self.sock is None:
            self.connect()
        try:
            self.sock.sendall(data)
            response = self.read_response()
        except Exception:
            self.close()
            raise
        if response.headers.get("connection", "").lower() == "close" or response.status < 0:
            self.close()
        return response

    def get(self, path):
        return self.request(("GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n"
                             % (path, self.host, self.port)).encode("ascii"))

    def read_response(self):
        data = self.pending
        recv = self.sock.recv
        while True:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                break
            more = recv(65536)
            if not more:
                raise ConnectionError("server closed the connection before a response")
            data += more
        head = data[:end].decode("latin-1").split("\r\n")
        parts = head[0].split(" ", 2)
        status = int(parts[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = data[end + 4:]
        while len(body) < length:
            more = recv(max(65536, length - len(body)))
            if not more:
                raise ConnectionError("server closed the connection mid-response")
            body += more
        self.pending = body[length:]
        if parts[0] == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
            headers["connection"] = "close"
        return Response(status, headers, body[:length])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------
# Many long-lived responses read at once (event streams, live streams)

class SocketReader:
    """Sockets read by one selector thread of this process: `on_data(n, data, now)` for every
    recv() of socket number n, time-stamped when recv() returns, before any parsing."""

    def __init__(self, socks, on_data):
        self.socks = list(socks)
        self.on_data = on_data
        self.selector = selectors.DefaultSelector()
        for n, sock in enumerate(self.socks):
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, n)
        self.stopping = False
        self.thread = threading.Thread(target=self._read_loop, daemon=True)
        self.thread.start()

    def _read_loop(self):
        while not self.stopping:
            for key, _ in self.selector.select(0.1):
                try:
                    data = key.fileobj.recv(262144)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                now = time.perf_counter()
                if not data:
                    self.selector.unregister(key.fileobj)
                    continue
                self.on_data(key.data, data, now)

    def close(self):
        self.stopping = True
        self.thread.join(5)
        for sock in self.socks:
            sock.close()
        self.selector.close()


# --------------------------------------------------------------------------------------------
# Request bodies

def random_pool(size):
    """Incompressible bytes to cut payloads from (os.urandom is fast enough: ~1 GB/s)."""
    return os.urandom(size)


def video_payload(pool, offset, size, first):
    """`size` bytes of the pool from `offset` (wrapping), starting with the EBML signature when
    this is chunk 0, so the server's signature check passes as it does for a real WebM."""
    if size == 0:
        return b""
    offset %= len(pool)
    if offset + size <= len(pool):
        data = pool[offset:offset + size]
    else:
        data = b"".join(_wrap(pool, offset, size))
    if first:
        data = EBML_SIGNATURE + data[len(EBML_SIGNATURE):]
    return data


def _wrap(pool, offset, size):
    while size > 0:
        piece = pool[offset:offset + size]
        yield piece
        size -= len(piece)
        offset = 0


def upload_request(host, port, file_id, index, status, payload):
    """One complete POST /api/video/upload request (request line, headers, multipart body),
    shaped as a browser's FormData would send it."""
    dash = ("--" + BOUNDARY).encode("ascii")
    fields = []
    for name, value in (("fileId", file_id), ("chunkIndex", str(index)), ("status", status)):
        fields.append(dash + b"\r\nContent-Disposition: form-data; name=\"" + name.encode("ascii")
                      + b"\"\r\n\r\n" + value.encode("ascii") + b"\r\n")
    file_head = (dash + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"blob\""
                 b"\r\nContent-Type: video/webm\r\n\r\n")
    tail = b"\r\n" + dash + b"--\r\n"
    length = sum(len(f) for f in fields) + len(file_head) + len(payload) + len(tail)
    head = ("POST /api/video/upload HTTP/1.1\r\nHost: %s:%d\r\n"
            "Content-Type: multipart/form-data; boundary=%s\r\nContent-Length: %d\r\n\r\n"
            % (host, port, BOUNDARY, length)).encode("ascii")
    return b"".join([head] + fields + [file_head, payload, tail])


def recording_requests(host, port, file_id, pool, count, size, offset=0):
    """The requests of one recording: `count` chunks of `size` bytes, the last `completed`."""
    requests = []
    for index in range(count):
        payload = video_payload(pool, offset + index * size, size, index == 0)
        status = "completed" if index == count - 1 else "uploading"
        requests.append(upload_request(host, port, file_id, index, status, payload))
    return requests


def retarget(requests, old_port, new_port):
    """The same requests for a server on another port (only the Host header changes)."""
    old = (":%d\r\n" % old_port).encode("ascii")
    new = (":%d\r\n" % new_port).encode("ascii")
    return [r.replace(old, new, 1) for r in requests]


# --------------------------------------------------------------------------------------------
# Process memory

def proc_status_kib(pid, field):
    """A `VmRSS`/`VmHWM`-style line of /proc/<pid>/status in KiB, or None off Linux."""
    try:
        with open("/proc/%d/status" % pid, "r", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def ps_rss_kib(pid):
    """Current RSS from `ps` (macOS and BSDs have no /proc)."""
    try:
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=10).stdout
        return int(out.decode().strip() or 0) or None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def rss_kib(pid):
    value = proc_status_kib(pid, "VmRSS")
    return value if value is not None else ps_rss_kib(pid)


# --------------------------------------------------------------------------------------------
# Figures

def percentile(values, fraction):
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, int(math.ceil(fraction * len(ordered))))
    return ordered[min(rank, len(ordered)) - 1]


def percentile_or_none(values, fraction):
    """percentile(), or None for no values (a figure that could not be measured)."""
    return percentile(values, fraction) if values else None


def format_ms(value):
    return "n/a" if value is None else "%.2f ms" % value


def median(values):
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return None
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def target(name, value, limit, better="higher", unit=""):
    """One §9 target: `value` compared with `limit`; never raises, never fails the run."""
    if value is None:
        verdict = "N/A"
    elif better == "higher":
        verdict = "PASS" if value >= limit else "MISS"
    else:
        verdict = "PASS" if value <= limit else "MISS"
    return {"name": name, "value": value, "limit": limit, "better": better, "unit": unit,
            "verdict": verdict}
