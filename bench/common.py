"""Shared pieces of the benchmark suite: server processes, a cheap HTTP client, request bodies.

The load clients here are deliberately thin: a raw keep-alive socket, requests built before
the clock starts, one `sendall` per request and a minimal response reader. On a 2-core
machine the client competes with the server for CPU, so every cycle the client spends is a
cycle taken from the thing being measured; `requests` or `http.client` would cost more.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
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
    """A server as a child process, stdout and stderr to a log file: `kind` is "m1server"
    (`program`: m1server.py, or the pyz), "bare" (bench/bare_sink.py) or "http.server"
    (`python3 -m http.server`, the footprint's baseline, serving `directory`)."""

    def __init__(self, kind, directory, python, port=0, extra_args=(), env=None, program=None):
        self.kind = kind
        self.program = program or SERVER_PROGRAM
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
        if self.kind == "http.server":
            return [self.python, "-m", "http.server", "--bind", "127.0.0.1",
                    str(self.requested_port)]
        if self.kind == "m1server":
            program, extra = self.program, SERVER_ARGS
        else:
            program, extra = BARE_SINK_PROGRAM, []
        return ([self.python, program, "--host", "127.0.0.1", "--port",
                 str(self.requested_port), "--dir", self.directory] + extra + self.extra_args)

    def spawn(self):
        """Start the process without waiting for it (footprint times this itself)."""
        if self.kind == "m1server" and not os.path.isfile(self.program):
            raise BenchError("m1server not found at " + self.program)
        os.makedirs(self.directory, exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         cwd=self.directory if self.kind == "http.server"
                                         else ROOT)
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

    def cpu_seconds(self):
        """CPU the server process has used so far (see cpu_seconds)."""
        return cpu_seconds(self.proc.pid)

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


@contextlib.contextmanager
def started_if(server):
    """`with started_if(server or None) as s`: a server that may be absent (s is None then),
    started for the block and stopped after it."""
    if not server:
        yield None
        return
    with server.start():
        yield server


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
        if self.sock is not None and self.dropped():
            self.close()                 # closed while idle (a keep-alive timeout): reopen
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

    def dropped(self):
        """True when the server closed this idle connection (it reads as at its end), as an
        HTTP client checks before it reuses one: the benchmarks take turns, and a connection
        may wait longer than a server's keep-alive timeout (5 s for m1server and Node)."""
        if hasattr(select, "poll"):             # no FD_SETSIZE limit (200 recorders)
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            if not poller.poll(0):
                return False
        elif not select.select([self.sock], [], [], 0)[0]:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

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
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return Response(status, headers, self._read_chunked())
        return Response(status, headers, body[:length])

    def _read_chunked(self):
        """A chunked response body (@tus/server sends its 201 and 204 replies so)."""
        data, body = self.pending, b""
        while True:
            while b"\r\n" not in data:
                data += self._more()
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(data) < size + 2:
                data += self._more()
            body += data[:size]
            data = data[size + 2:]
            if size == 0:
                self.pending = data
                return body

    def _more(self):
        more = self.sock.recv(65536)
        if not more:
            raise ConnectionError("server closed the connection mid-response")
        return more

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


def upload_request(host, port, file_id, index, status, payload, file_first=False):
    """One complete POST /api/video/upload request (request line, headers, multipart body),
    shaped as a browser's FormData would send it: the text fields, then the file part (or,
    with `file_first`, the file part first, as the seed's client sent it)."""
    dash = ("--" + BOUNDARY).encode("ascii")
    fields = []
    for name, value in (("fileId", file_id), ("chunkIndex", str(index)), ("status", status)):
        fields.append(dash + b"\r\nContent-Disposition: form-data; name=\"" + name.encode("ascii")
                      + b"\"\r\n\r\n" + value.encode("ascii") + b"\r\n")
    file_part = [dash + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"blob\""
                 b"\r\nContent-Type: video/webm\r\n\r\n", payload, b"\r\n"]
    parts = file_part + fields if file_first else fields + file_part
    tail = dash + b"--\r\n"
    length = sum(len(p) for p in parts) + len(tail)
    head = ("POST /api/video/upload HTTP/1.1\r\nHost: %s:%d\r\n"
            "Content-Type: multipart/form-data; boundary=%s\r\nContent-Length: %d\r\n\r\n"
            % (host, port, BOUNDARY, length)).encode("ascii")
    return b"".join([head] + parts + [tail])


def recording_requests(host, port, file_id, pool, count, size, offset=0, file_first=False):
    """The requests of one recording: `count` chunks of `size` bytes, the last `completed`."""
    requests = []
    for index in range(count):
        payload = video_payload(pool, offset + index * size, size, index == 0)
        status = "completed" if index == count - 1 else "uploading"
        requests.append(upload_request(host, port, file_id, index, status, payload,
                                       file_first))
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


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds, from /proc/<pid>/stat; None
    off Linux. Ticks are 10 ms, so a figure needs a few seconds of work to mean anything."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()   # the name may hold spaces
        return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """Sums a server process's CPU over the stretches of a run measured (`with meter:`)."""

    def __init__(self, server):
        self.server = server
        self.seconds = 0.0
        self.known = True
        self._before = None

    def start(self):
        self._before = self.server.cpu_seconds()
        return self

    def stop(self):
        after = self.server.cpu_seconds()
        if self._before is None or after is None:
            self.known = False
        else:
            self.seconds += after - self._before

    __enter__ = start

    def __exit__(self, *exc):
        self.stop()

    def per(self, amount):
        """CPU seconds per unit of `amount` (chunks, GB), or None when unknown."""
        return self.seconds / amount if self.known and amount else None


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


# --------------------------------------------------------------------------------------------
# The reference tus server: @tus/server + @tus/file-store on Node (issue 4, issue 17)
#
# Installed with npm into bench/out/tus-node/ (git-ignored; the project does not depend on it),
# versions pinned. Without node/npm, or offline, the benchmarks that compare with it say why
# in their rows and run the rest. It does not fsync.

TUS_NODE_PACKAGES = ("@tus/server@2.4.5", "@tus/file-store@2.1.1")
TUS_NODE_DIR = os.path.join(BENCH_DIR, "out", "tus-node")
TUS_NODE_SERVER = """
import http from 'node:http'
import { Server } from '@tus/server'
import { FileStore } from '@tus/file-store'
const datastore = new FileStore({ directory: process.argv[2] })
const tus = new Server({ path: '/files', datastore })
const server = http.createServer((req, res) => tus.handle(req, res))
server.listen(0, '127.0.0.1', () =>
  console.log(`@tus/server serving http://127.0.0.1:${server.address().port}/`))
"""
_tus_node_problem = []          # install_tus_node's answer, asked once per run


def install_tus_node():
    """npm-install the pinned packages into TUS_NODE_DIR once; None when ready, else why
    not (a sentence for the benchmark's rows)."""
    if _tus_node_problem:
        return _tus_node_problem[0]
    _tus_node_problem.append(_install_tus_node())
    return _tus_node_problem[0]


def _install_tus_node():
    if not shutil.which("node") or not shutil.which("npm"):
        return "@tus/server not run: node/npm not found"
    marker = os.path.join(TUS_NODE_DIR, "installed-" + "-".join(
        p.replace("/", "_") for p in TUS_NODE_PACKAGES))
    if os.path.exists(marker):
        return None
    os.makedirs(TUS_NODE_DIR, exist_ok=True)
    with open(os.path.join(TUS_NODE_DIR, "package.json"), "w", encoding="utf-8") as f:
        json.dump({"private": True, "type": "module"}, f)
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--no-save"]
                          + list(TUS_NODE_PACKAGES), cwd=TUS_NODE_DIR, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=600)
    if done.returncode != 0:
        return "@tus/server not run: npm install failed: %s" % done.stdout.decode()[-300:]
    with open(os.path.join(TUS_NODE_DIR, "server.mjs"), "w", encoding="utf-8") as f:
        f.write(TUS_NODE_SERVER)
    open(marker, "w").close()
    return None


class TusNodeServer(ServerProcess):
    """@tus/server on Node in `directory` (install_tus_node first)."""

    def __init__(self, directory):
        ServerProcess.__init__(self, "tus-node", directory, "node")

    def command(self):
        return ["node", os.path.join(TUS_NODE_DIR, "server.mjs"), self.directory]

    def spawn(self):
        os.makedirs(self.directory, exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=TUS_NODE_DIR)
        finally:
            log.close()
        return self


def tus_create_request(host, port, length, file_id):
    """A tus 1.0 creation POST for an upload of `length` bytes (metadata: fileId, filetype)."""
    meta = "fileId " + _b64(file_id) + ",filetype " + _b64("video/webm")
    return ("POST /files/ HTTP/1.1\r\nHost: %s:%d\r\nTus-Resumable: 1.0.0\r\n"
            "Upload-Length: %d\r\nUpload-Metadata: %s\r\nContent-Length: 0\r\n\r\n"
            % (host, port, length, meta)).encode("ascii")


def tus_patch_head(host, port, path, offset, size):
    """The head of a tus PATCH of `size` bytes at `offset` (the body follows it)."""
    return ("PATCH %s HTTP/1.1\r\nHost: %s:%d\r\nTus-Resumable: 1.0.0\r\n"
            "Upload-Offset: %d\r\nContent-Type: application/offset+octet-stream\r\n"
            "Content-Length: %d\r\n\r\n" % (path, host, port, offset, size)).encode("ascii")


def create_tus_upload(conn, length, file_id):
    """Create a tus upload on `conn`'s server; returns its path (/files/...)."""
    created = conn.request(tus_create_request(conn.host, conn.port, length, file_id))
    if created.status != 201:
        raise BenchError("tus server answered %d to the creation: %r"
                         % (created.status, created.body[:300]))
    path = created.headers["location"]
    return path[path.index("/files/"):] if "://" in path else path


def tus_patch_requests(conn, path, payload, patch_bytes):
    """Every PATCH of `payload` to the upload at `path`, `patch_bytes` each, prebuilt."""
    requests = []
    for offset in range(0, len(payload), patch_bytes):
        piece = payload[offset:offset + patch_bytes]
        requests.append(tus_patch_head(conn.host, conn.port, path, offset, len(piece)) + piece)
    return requests


def send_tus(server, payload, patch_bytes, file_id):
    """Create an upload and PATCH `payload` in `patch_bytes` requests, each head and body
    sent with its own sendall (no copy of a large body); (seconds from the creation's first
    byte to the last reply, upload path)."""
    view = memoryview(payload)
    with Connection(server.host, server.port) as conn:
        start = time.perf_counter()
        path = create_tus_upload(conn, len(payload), file_id)
        offset = 0
        while offset < len(payload):
            size = min(patch_bytes, len(payload) - offset)
            if conn.sock is None:
                conn.connect()
            conn.sock.sendall(tus_patch_head(server.host, server.port, path, offset, size))
            conn.sock.sendall(view[offset:offset + size])
            response = conn.read_response()
            check_tus_patch(server, response, offset)
            offset = int(response.headers["upload-offset"])
        return time.perf_counter() - start, path


def check_tus_patch(server, response, offset):
    if response.status != 204:
        raise BenchError("%s answered %d to a PATCH at %d: %r"
                         % (server.kind, response.status, offset, response.body[:300]))


def tus_offset(server, path):
    """The Upload-Offset a HEAD of the upload reports (None when it reports none)."""
    with Connection(server.host, server.port) as conn:
        head = conn.request(("HEAD %s HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n\r\n"
                             % path).encode("ascii"))
    value = head.headers.get("upload-offset")
    return int(value) if value is not None else None


def _b64(text):
    import base64
    return base64.b64encode(text.encode("ascii")).decode("ascii")
