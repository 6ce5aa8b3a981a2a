"""The bare sink: the yardstick m1server's ingest is measured against (SPEC §9).

A standard-library HTTP/1.1 server that reads each POST body into a file of its own, fsyncs
it, and answers 200 with a small JSON body. It parses nothing: no multipart, no fields, no
ledger, no append. Whatever m1server does beyond this costs time, and the benchmarks report
m1server's speed as a ratio to this one, measured in the same run on the same machine.

It is given the habits a careful stdlib server would have (STYLE.md, performance habits), so
the yardstick is a fair one, not a slow one:
  - the response goes out as one write, and Nagle is off (no 40 ms delayed-ACK stalls);
  - the body is read into one reusable 1 MiB buffer, and written from a view of it;
  - fsync once per request, after the last write;
  - request_queue_size raised above socketserver's 5 (no SYN-retry stalls under bursts);
  - the body is read with `recv_into` on the socket once the handler's small read-ahead
    buffer is drained (`--read rfile` reads through the buffered `rfile.readinto` instead, to
    compare the two).

Usage: python3 bench/bare_sink.py --host 127.0.0.1 --port 0 --dir DIR [--read recv|rfile]
Prints `serving http://HOST:PORT/` once it accepts connections. Every body is kept as
DIR/sink-<n>.bin (the caller removes DIR). Stops on SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

READ_BUFFER_BYTES = 1 << 20          # one reusable buffer per request, as STYLE.md asks
RESPONSE_BODY = b'{"success": true, "data": {"message": "stored"}}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(RESPONSE_BODY)).encode("ascii") + b"\r\n\r\n" + RESPONSE_BODY)
NOT_FOUND_BODY = b'{"success": false, "error": {"code": "not_found", "message": "sink"}}'
NOT_FOUND = (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: "
             + str(len(NOT_FOUND_BODY)).encode("ascii") + b"\r\n\r\n" + NOT_FOUND_BODY)


class SinkServer(ThreadingHTTPServer):
    daemon_threads = True            # on 3.7 ThreadingMixIn never reaps non-daemon threads
    request_queue_size = 1024        # socketserver's default of 5 drops SYNs under bursts
    allow_reuse_address = True

    def __init__(self, address, directory, read_mode):
        super().__init__(address, SinkHandler)
        self.directory = directory
        self.read_mode = read_mode
        self.counter = itertools.count()
        self.counter_lock = threading.Lock()

    def next_path(self):
        with self.counter_lock:
            n = next(self.counter)
        return os.path.join(self.directory, "sink-%d.bin" % n)


class SinkHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60

    def do_POST(self):
        try:
            remaining = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self.wfile.write(NOT_FOUND)
            return
        fd = os.open(self.server.next_path(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if self.server.read_mode == "rfile":
                ok = self.copy_with_rfile(fd, remaining)
            else:
                ok = self.copy_with_recv(fd, remaining)
            os.fsync(fd)
        finally:
            os.close(fd)
        if not ok:                   # client went away mid-body
            self.close_connection = True
            return
        self.wfile.write(RESPONSE)   # one write: status line, headers and body together

    def do_GET(self):
        self.wfile.write(NOT_FOUND)

    def copy_with_rfile(self, fd, remaining):
        buffer = bytearray(READ_BUFFER_BYTES)
        view = memoryview(buffer)
        while remaining > 0:
            n = self.rfile.readinto(view[:min(remaining, READ_BUFFER_BYTES)])
            if not n:
                return False
            write_all(fd, view[:n])
            remaining -= n
        return True

    def copy_with_recv(self, fd, remaining):
        # The handler's rfile read ahead a little past the headers; take those bytes first
        # (read1 returns only what is buffered when anything is), then read the socket.
        if remaining > 0:
            head = self.rfile.read1(min(remaining, 65536))
            if not head:
                return False
            write_all(fd, head)
            remaining -= len(head)
        buffer = bytearray(READ_BUFFER_BYTES)
        view = memoryview(buffer)
        recv_into = self.connection.recv_into
        while remaining > 0:
            n = recv_into(view, min(remaining, READ_BUFFER_BYTES))
            if not n:
                return False
            write_all(fd, view[:n])
            remaining -= n
        return True

    def log_message(self, format, *args):
        pass                         # an access log would be extra work m1server is charged for


def write_all(fd, view):
    while len(view):
        written = os.write(fd, view)
        view = view[written:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--read", choices=("recv", "rfile"), default="recv")
    # Flags it does not know (m1server's limits) are ignored, so the suite can run the sink in
    # m1server's place to check its own clients: `run.py --server bench/bare_sink.py`.
    args, _ = parser.parse_known_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    server = SinkServer((args.host, args.port), args.dir, args.read)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    sys.stdout.write("serving http://%s:%d/\n" % (host, port))
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
