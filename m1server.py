#!/usr/bin/env python3
"""m1server - a video chunk upload server on the Python standard library alone.

Browsers record with MediaRecorder and send each Blob as a numbered chunk while they record;
m1server stores every chunk, appends them in order into one file per upload
(`uploads/<fileId>.webm`), survives retries, reorders and crashes, and tells the client exactly
where the upload stands. Run it with `python3 m1server.py` (see `--help`).

A chunk travels through the code in this order, and so can you when reading it:
  socket -> this file (limits, routing, one JSON error envelope)
         -> multipart.py (fields, and the file part streamed to a part file)
         -> chunkstore.py (lock per upload, ledger, append, fsync) -> disk.

This file is ordered top-down: settings, errors, the HTTP server, the request handler (routing,
then one method per route), then helpers, then `main`.
"""
from __future__ import annotations

import argparse
import datetime
import email.utils
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import chunkstore
import multipart
import processing
from apierror import ApiError
from chunkstore import ChunkStore

VERSION = "0.1.0"

# ---------------------------------------------------------------------------------------------
# Settings: every limit is a named constant here and a flag (with an M1_* twin) below
# ---------------------------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3001
DEFAULT_DIR = "uploads"
DEFAULT_MAX_CHUNK_BYTES = 64 << 20         # one MediaRecorder slice is ~20 KB-2 MB
DEFAULT_MAX_UPLOAD_BYTES = 4 << 30         # one recording, all chunks together
DEFAULT_MAX_PARTS = 16                     # the seed's form has 4-6 parts
DEFAULT_TIMEOUT_S = 30.0                   # a client silent this long mid-request is cut off
DEFAULT_MAX_CONNECTIONS = 256              # open connections; more get 503 at once
DEFAULT_MIN_FREE_DISK_BYTES = 256 << 20    # never fill the disk past this
BODY_OVERHEAD_BYTES = 1 << 20              # room for fields and delimiters beside the chunk
REQUEST_QUEUE_SIZE = 1024                  # listen backlog (socketserver's 5 drops bursts)
SHUTDOWN_GRACE_S = 30.0                    # how long SIGTERM waits for in-flight chunks
LINGER_DRAIN_BYTES = 1 << 20               # unread body we swallow so the client sees errors
LINGER_TIMEOUT_S = 2.0
RECV_DRAIN_BYTES = 1 << 20                 # >= the header reader's buffer (8 KiB), see _Body

UPLOAD_STATUSES = ("uploading", "completed")
CHUNK_INDEX_PATTERN = re.compile(r"[0-9]{1,7}\Z")
REQUIRED_FIELDS = ("fileId", "chunkIndex", "status")
OPTIONAL_FIELDS = ("mimeType", "checksum")


def parse_size(text):
    """'1048576', '512K', '64M', '4G' (powers of 1024) -> bytes."""
    match = re.match(r"\s*([0-9]+)\s*([KMGT]?)i?B?\s*\Z", str(text), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError("not a size: %r (use e.g. 512K, 64M, 4G)" % text)
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(match.group(1)) << (10 * power)


def parse_seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number of seconds: %r" % text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def parse_count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a whole number: %r" % text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_port(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("not a TCP port: %r" % text)
    return value


def parse_flag(text):
    return str(text).strip().lower() in ("1", "true", "yes", "on")


# (flag, type, default, help). The env twin of --max-chunk-size is M1_MAX_CHUNK_SIZE.
OPTIONS = (
    ("--host", str, DEFAULT_HOST, "address to listen on (a public address prints a warning: "
     "there is no authentication yet)"),
    ("--port", parse_port, DEFAULT_PORT, "TCP port; 0 picks a free one"),
    ("--dir", str, DEFAULT_DIR, "upload folder: assembled videos, temp/ chunks, m1.sqlite3"),
    ("--max-chunk-size", parse_size, DEFAULT_MAX_CHUNK_BYTES,
     "largest chunk accepted (413 beyond)"),
    ("--max-upload-size", parse_size, DEFAULT_MAX_UPLOAD_BYTES,
     "largest upload, all chunks together (413 beyond)"),
    ("--max-parts", parse_count, DEFAULT_MAX_PARTS, "most parts in one multipart body"),
    ("--timeout", parse_seconds, DEFAULT_TIMEOUT_S,
     "seconds a client may stay silent mid-request or idle between requests"),
    ("--max-connections", parse_count, DEFAULT_MAX_CONNECTIONS,
     "open connections served at once (503 beyond)"),
    ("--min-free-disk", parse_size, DEFAULT_MIN_FREE_DISK_BYTES,
     "free disk space kept in reserve (507 when a chunk would eat into it)"),
    ("--allow-any-content", parse_flag, False,
     "accept a chunk 0 that is not WebM, MP4 or Ogg"),
    # Video processing after an upload completes (processing.py, SPEC section 5).
    ("--processing", processing.parse_mode, processing.DEFAULT_MODE,
     "after upload: off, probe (metadata), remux (+ seekable copy and poster, no "
     "re-encoding) or mp4 (+ H.264/AAC MP4)"),
    ("--ffmpeg", str, processing.DEFAULT_FFMPEG, "ffmpeg program (name on PATH or path)"),
    ("--ffprobe", str, processing.DEFAULT_FFPROBE,
     "ffprobe program (name on PATH or path; default also looks beside ffmpeg)"),
    ("--max-height", processing.parse_height, processing.DEFAULT_MAX_HEIGHT,
     "most lines of the MP4 and the poster (never upscaled)"),
    ("--mp4-crf", processing.parse_crf, processing.DEFAULT_MP4_CRF,
     "MP4 quality, x264 CRF 0-51 (lower: better and bigger)"),
    ("--processing-timeout", parse_seconds, processing.DEFAULT_JOB_TIMEOUT_S,
     "seconds one processing job may take before ffmpeg is stopped and the job fails"),
    ("--processing-workers", parse_count, processing.DEFAULT_WORKERS,
     "processing jobs run at once"),
)


def env_name(flag):
    return "M1_" + flag[2:].upper().replace("-", "_")


def build_parser(environ):
    parser = argparse.ArgumentParser(
        prog="m1server.py",
        description="Video chunk upload server (standard library only). Every option can "
                    "also be set with the environment variable shown beside it.",
        epilog="Sizes take a byte count or a K, M, G suffix (powers of 1024). "
               "Example: python3 m1server.py --port 3001 --dir ./uploads --max-chunk-size 64M")
    parser.add_argument("--version", action="version", version="m1server " + VERSION)
    for flag, kind, default, text in OPTIONS:
        name = env_name(flag)
        if name in environ:
            default = kind(environ[name]) if kind is not parse_flag else parse_flag(
                environ[name])
        shown = _format_default(default)
        if kind is parse_flag:
            parser.add_argument(flag, action="store_true", default=default,
                                help="%s [env %s=1]" % (text, name))
        else:
            parser.add_argument(flag, type=kind, default=default,
                                help="%s [env %s, default %s]" % (text, name, shown))
    return parser


def _format_default(value):
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1024 and \
            value % 1024 == 0:
        for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
            if value % (1 << shift) == 0:
                return "%d%s" % (value >> shift, suffix)
    return str(value)


class Config:
    """Everything the server was told; passed around as one object, never read from globals."""

    def __init__(self, args):
        self.host = args.host
        self.port = args.port
        self.dir = os.path.abspath(args.dir)
        self.max_chunk_bytes = args.max_chunk_size
        self.max_upload_bytes = args.max_upload_size
        self.max_parts = args.max_parts
        self.timeout = args.timeout
        self.max_connections = args.max_connections
        self.min_free_disk_bytes = args.min_free_disk
        self.allow_any_content = args.allow_any_content
        self.crash_at = os.environ.get("M1_TEST_CRASH_AT")    # tests only, see chunkstore
        self.processing = args.processing
        self.ffmpeg = args.ffmpeg
        self.ffprobe = args.ffprobe
        self.max_height = args.max_height
        self.mp4_crf = args.mp4_crf
        self.processing_timeout = args.processing_timeout
        self.processing_workers = args.processing_workers
        # tests only: transcode at the input's own pace (ffmpeg -re), so a test can act on it
        self.slow_transcode = os.environ.get("M1_TEST_SLOW_TRANSCODE") == "1"


# ---------------------------------------------------------------------------------------------
# Errors: one type, turned into the JSON envelope in one place (Handler.send_error_json)
# ---------------------------------------------------------------------------------------------

HttpError = ApiError          # what handlers raise; lower layers raise ApiError subclasses


class IncompleteBody(Exception):
    """The client closed the connection before sending Content-Length bytes."""


# What http.server's own send_error(status) calls mean, as stable machine codes.
BUILTIN_ERROR_CODES = {
    400: "bad_request", 404: "not_found", 408: "request_timeout", 414: "uri_too_long",
    431: "header_too_large", 501: "not_implemented", 505: "http_version_not_supported",
}
# multipart.py's codes, renamed where the HTTP edge knows better what the limit protects.
MULTIPART_CODES = {"file_too_large": "chunk_too_large", "not_multipart": "unsupported_media_type"}


# ---------------------------------------------------------------------------------------------
# The HTTP server: threads, a connection cap, and a graceful stop
# ---------------------------------------------------------------------------------------------

class M1Server(ThreadingHTTPServer):
    daemon_threads = True            # 3.7's ThreadingMixIn never reaps non-daemon threads
    request_queue_size = REQUEST_QUEUE_SIZE

    def __init__(self, config, store):
        self.config = config
        self.store = store
        self.processor = processing.Processor(config, store)
        self.routes = compile_routes(CORE_ROUTES + processing.routes(self.processor))
        self.status_extras = []      # functions(upload) -> dict of extra status fields
        self.status_extras.append(self.processor.status_fields)
        self.stopping = False
        self._connections = set()
        self._in_flight = 0
        self._counts = threading.Condition()
        ThreadingHTTPServer.__init__(self, (config.host, config.port), Handler)

    def process_request(self, request, client_address):
        """Refuse connections past --max-connections with a 503 instead of queueing them."""
        with self._counts:
            full = len(self._connections) >= self.config.max_connections
            if not full:
                self._connections.add(request)
        if full:
            _refuse_connection(request, 503, "server_busy",
                               "too many connections; retry shortly", retry_after=1)
            self.shutdown_request(request)
            return
        ThreadingHTTPServer.process_request(self, request, client_address)

    def shutdown_request(self, request):
        with self._counts:
            self._connections.discard(request)
        ThreadingHTTPServer.shutdown_request(self, request)

    def request_started(self):
        with self._counts:
            self._in_flight += 1

    def request_finished(self):
        with self._counts:
            self._in_flight -= 1
            self._counts.notify_all()

    def wait_for_in_flight(self, timeout):
        """Block until no request is being handled, or `timeout` passes; True when idle."""
        deadline = time.monotonic() + timeout
        with self._counts:
            while self._in_flight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._counts.wait(left)
        return True

    def handle_error(self, request, client_address):
        logging.getLogger("m1server").exception("connection from %s failed", client_address[0])


# ---------------------------------------------------------------------------------------------
# The request handler
# ---------------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    server_version = "m1server/" + VERSION
    protocol_version = "HTTP/1.1"          # keep-alive: a recorder sends a chunk a second
    disable_nagle_algorithm = True         # headers + body must not wait for a delayed ACK

    def setup(self):
        self.timeout = self.server.config.timeout      # per read, see StreamRequestHandler
        BaseHTTPRequestHandler.setup(self)
        self.started = time.monotonic()

    # Every method http.server knows goes through one dispatcher; unknown ones get 501.
    def do_GET(self):
        self.dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def parse_request(self):
        self.started = time.monotonic()
        if not BaseHTTPRequestHandler.parse_request(self):
            return False
        if self.request_version == "HTTP/0.9":           # "GET /path" with no version
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return False
        return True

    def dispatch(self):
        """Route the request and turn every failure into the JSON envelope (never a traceback)."""
        self.body_pending = self.command in ("POST", "PUT", "PATCH") or \
            self.headers.get("Content-Length", "0").strip() not in ("", "0")
        self.server.request_started()
        try:
            if self.server.stopping:
                self.close_connection = True
                raise HttpError(503, "shutting_down", "server is shutting down; retry shortly",
                                {"Retry-After": "2"})
            handler, args = self.route()
            handler(*args)
        except ApiError as error:
            self.send_error_json(error)
        except socket.timeout:
            self.send_error_json(HttpError(408, "request_timeout",
                                           "client sent nothing for %gs" % self.timeout))
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True                 # the client left; nobody to tell
        except Exception:
            logging.getLogger("m1server").exception("unexpected error on %s %s",
                                                    self.command, _printable(self.path))
            self.send_error_json(HttpError(500, "internal_error",
                                           "unexpected server error (logged)"))
        finally:
            self.server.request_finished()

    def route(self):
        """Find the function for this path and method in the server's routing table; returns
        (bound function, decoded path groups)."""
        path = urlsplit(self.path).path
        for pattern, methods in self.server.routes:
            match = pattern.match(path)
            if not match:
                continue
            if self.command == "OPTIONS":
                return self.options_preflight, (sorted(methods) + ["OPTIONS"],)
            function = methods.get(self.command)
            if function is None:
                allowed = ", ".join(sorted(methods) + ["OPTIONS"])
                raise HttpError(405, "method_not_allowed",
                                "%s is not allowed here; use %s" % (self.command, allowed),
                                {"Allow": allowed})
            return functools.partial(function, self), tuple(unquote(g) for g in match.groups())
        raise HttpError(404, "not_found", "no such route: %s" % _printable(path)[:200])

    # -- POST /api/video/upload : validate headers -> parse -> store -> reply ---------------

    def post_chunk(self):
        config, store = self.server.config, self.server.store
        boundary = self.check_upload_headers()
        length = self.content_length()
        body_limit = config.max_chunk_bytes + BODY_OVERHEAD_BYTES
        if length > body_limit:
            raise HttpError(413, "body_too_large",
                            "body of %d bytes exceeds the %d-byte limit (--max-chunk-size %d)"
                            % (length, body_limit, config.max_chunk_bytes))
        self.check_free_disk(length)
        form, part_paths = self.read_form(boundary, length)
        try:
            fields, chunk = self.chunk_fields(form)
            result = store.put_chunk(
                fields["fileId"], fields["chunkIndex"], chunk.file.name, chunk.size,
                is_last=fields["status"] == "completed", mime_type=fields.get("mimeType"),
                checksum=fields.get("checksum"))
        finally:
            for path in part_paths:
                store.discard(path)
        self.send_json(200, {"success": True, "data": chunk_reply(result)})

    def check_upload_headers(self):
        if "Transfer-Encoding" in self.headers:
            raise HttpError(411, "length_required",
                            "send the chunk with a Content-Length (chunked is not accepted)")
        try:
            return multipart.boundary_from_content_type(self.headers.get("Content-Type", ""))
        except multipart.MultipartError as error:
            raise _multipart_http_error(error)

    def content_length(self):
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise HttpError(411, "length_required", "a Content-Length header is required")
        if len(set(v.strip() for v in values)) != 1 or not values[0].strip().isdigit():
            raise HttpError(400, "bad_content_length",
                            "Content-Length must be one non-negative integer")
        return int(values[0])

    def check_free_disk(self, length):
        free = shutil.disk_usage(self.server.config.dir).free
        if free - length < self.server.config.min_free_disk_bytes:
            raise HttpError(507, "insufficient_storage",
                            "not enough free disk for this chunk (--min-free-disk)")

    def read_form(self, boundary, length):
        """Stream the body through the parser; the chunk's bytes go to a part file on disk.
        Returns the form and the paths of the part files (the caller removes them)."""
        config, store = self.server.config, self.server.store
        opened = []                      # (path, file) for every part file the parser opened

        def open_part_file(name, filename, content_type):
            path, f = store.new_part_file()
            opened.append((path, f))
            return f

        body = _Body(self.rfile, self.connection, length)
        limits = multipart.Limits(max_parts=config.max_parts,
                                  max_file_bytes=config.max_chunk_bytes, max_body_bytes=length)
        parsed = False
        try:
            form = multipart.parse(body.read_into, boundary, open_part_file, limits)
            parsed = True
        except multipart.MultipartError as error:
            raise _multipart_http_error(error)
        except IncompleteBody:
            raise HttpError(400, "incomplete_body",
                            "the body ended before Content-Length bytes arrived")
        finally:
            for path, f in opened:
                f.close()
                if not parsed:
                    store.discard(path)
        self.body_pending = False
        return form, [path for path, _ in opened]

    def chunk_fields(self, form):
        """The seed's fields, each exactly once, validated; returns (fields, file part)."""
        fields = {}
        for name in REQUIRED_FIELDS + OPTIONAL_FIELDS:
            values = form.field_values(name)
            if len(values) > 1:
                raise HttpError(400, "duplicate_field", "field %s was sent %d times"
                                % (name, len(values)))
            if values:
                fields[name] = values[0]
            elif name in REQUIRED_FIELDS:
                raise HttpError(400, "missing_field", "field %s is required" % name)
        chunks = [part for part in form.files if part.name == "file"]
        if not chunks:
            raise HttpError(400, "missing_field", "field file (the chunk's bytes) is required")
        if len(chunks) > 1:
            raise HttpError(400, "duplicate_field", "field file was sent %d times"
                            % len(chunks))
        if not chunkstore.valid_file_id(fields["fileId"]):
            raise HttpError(400, "invalid_file_id", "fileId must match [A-Za-z0-9_-]{1,128}")
        index = fields["chunkIndex"]
        if not CHUNK_INDEX_PATTERN.match(index) or int(index) > chunkstore.MAX_CHUNK_INDEX:
            raise HttpError(400, "invalid_chunk_index", "chunkIndex must be an integer "
                            "0..%d written in digits" % chunkstore.MAX_CHUNK_INDEX)
        fields["chunkIndex"] = int(index)
        if fields["status"] not in UPLOAD_STATUSES:
            raise HttpError(400, "invalid_status", "status must be uploading or completed")
        return fields, chunks[0]

    # -- GET /api/video/status/:fileId -------------------------------------------------------

    def get_status(self, file_id):
        if not chunkstore.valid_file_id(file_id):
            raise HttpError(400, "invalid_file_id", "fileId must match [A-Za-z0-9_-]{1,128}")
        upload = self.server.store.status(file_id)
        data = status_reply(file_id, upload)
        if upload is not None:
            for extra in self.server.status_extras:      # e.g. processing, video
                data.update(extra(upload))
        self.send_json(200, {"success": True, "data": data})

    # -- GET /uploads/<fileId>.<ext> : the assembled video, with Range ---------------------

    def get_media(self, name):
        file_id, dot, ext = name.rpartition(".")
        upload = self.server.store.status(file_id) if chunkstore.valid_file_id(file_id) \
            else None
        if upload is None or not dot or ext != upload.ext or upload.bytes_appended == 0:
            raise HttpError(404, "not_found", "no such video")
        # the consistent prefix, even while it grows
        self.send_file(self.server.store.media_path(upload), upload.bytes_appended,
                       upload.updated_at,
                       chunkstore.MEDIA_TYPES.get(ext, "application/octet-stream"))

    def send_file(self, path, size, mtime, content_type):
        """The first `size` bytes of `path` with Range (206/416), ETag, If-None-Match,
        If-Range and Last-Modified: the original video and its derivatives alike."""
        etag = '"%x-%x"' % (size, int(mtime * 1000))
        headers = {"Accept-Ranges": "bytes", "ETag": etag,
                   "Last-Modified": email.utils.formatdate(mtime, usegmt=True),
                   "Content-Type": content_type, "Cache-Control": "no-cache"}
        if self.headers.get("If-None-Match") == etag:
            return self.send_plain(304, headers)
        start, end = 0, size - 1
        status = 200
        wanted = self.headers.get("Range")
        if wanted and self.headers.get("If-Range", etag) == etag:
            byte_range = parse_range(wanted, size)
            if byte_range == "unsatisfiable":
                headers["Content-Range"] = "bytes */%d" % size
                raise HttpError(416, "range_not_satisfiable", "range outside 0..%d" % size,
                                headers)
            if byte_range is not None:
                start, end = byte_range
                status = 206
                headers["Content-Range"] = "bytes %d-%d/%d" % (start, end, size)
        headers["Content-Length"] = str(end - start + 1)
        self.send_response(status)
        self.send_headers(headers)
        if self.command != "HEAD":
            with open(path, "rb") as f:
                _send_file_range(self.connection, self.wfile, f, start, end - start + 1)

    # -- GET /healthz, OPTIONS ----------------------------------------------------------------

    def get_health(self):
        self.send_json(200, {"success": True, "data": {"status": "ok", "version": VERSION}})

    def options_preflight(self, methods):
        self.send_plain(204, {
            "Allow": ", ".join(methods),
            "Access-Control-Allow-Methods": ", ".join(methods),
            "Access-Control-Allow-Headers": "Content-Type, Range",
            "Access-Control-Max-Age": "600",
            "Content-Length": "0"})

    # -- responses ------------------------------------------------------------------------

    def send_json(self, status, payload, headers=None):
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        headers = dict(headers or {})
        headers.update({"Content-Type": "application/json; charset=utf-8",
                        "Content-Length": str(len(body)), "Cache-Control": "no-store"})
        if self.body_pending:              # unread body: the connection cannot be reused
            self.close_connection = True
        self.send_headers(headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_plain(self, status, headers):
        self.send_response(status)
        headers.setdefault("Content-Length", "0")
        self.send_headers(headers)

    def send_headers(self, headers):
        if "Origin" in self.headers:
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Expose-Headers",
                             "Content-Length, Content-Range, ETag")
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def send_error_json(self, error):
        """The single way out for every failure: the SPEC's JSON envelope."""
        self.send_json(error.status, {"success": False, "error": {
            "code": error.code, "message": error.message}}, error.headers)
        if self.close_connection and getattr(self, "body_pending", False):
            _linger(self.connection)

    def send_error(self, code, message=None, explain=None):
        """http.server calls this for what it refuses itself (bad request line, too long
        headers, unknown method, timeouts); answer those with the JSON envelope too."""
        self.close_connection = True
        self.body_pending = False
        self.request_version = "HTTP/1.1"  # always send a status line, even for garbage
        if not hasattr(self, "headers"):
            self.headers = {}
        status = int(code)
        phrase = message or HTTPStatus(status).phrase
        try:
            self.send_json(status, {"success": False, "error": {
                "code": BUILTIN_ERROR_CODES.get(status, "bad_request"),
                "message": _printable(phrase)}})
        except OSError:
            pass                           # the client is gone; nothing left to tell it

    # -- logging: one line per request, control characters escaped ---------------------------

    def log_request(self, code="-", size="-"):
        took = (time.monotonic() - getattr(self, "started", time.monotonic())) * 1000
        self.log_message('"%s" %s %.1fms', getattr(self, "requestline", ""),
                         getattr(code, "value", code), took)

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s %s\n" % (_utc_iso(time.time()), self.client_address[0],
                                         _printable(fmt % args)))


# The routing table: path pattern -> {method: function(handler, *decoded path groups)}.
# Feature modules add their own rows (see M1Server.__init__); OPTIONS is answered for all.
CORE_ROUTES = (
    (r"/api/video/upload", {"POST": Handler.post_chunk}),
    (r"/api/video/status/([^/]+)", {"GET": Handler.get_status, "HEAD": Handler.get_status}),
    (r"/uploads/([^/]+)", {"GET": Handler.get_media, "HEAD": Handler.get_media}),
    (r"/healthz", {"GET": Handler.get_health, "HEAD": Handler.get_health}),
)


def compile_routes(rows):
    return [(re.compile(pattern + r"\Z"), dict(methods)) for pattern, methods in rows]


# ---------------------------------------------------------------------------------------------
# Replies (the SPEC's JSON shapes)
# ---------------------------------------------------------------------------------------------

def chunk_reply(result):
    upload = result.upload
    data = {"message": "Video chunk uploaded successfully", "fileId": result.file_id,
            "chunkIndex": result.index,
            "status": "completed" if upload.completed else "uploading",
            "bytesReceived": upload.bytes_appended, "nextChunkIndex": upload.next_index}
    missing = upload.missing_chunks()
    if missing:
        data["missingChunks"] = missing
    if result.duplicate:
        data["duplicate"] = True
    return data


def status_reply(file_id, upload):
    if upload is None:
        return {"fileId": file_id, "exists": False, "fileSize": 0, "lastModified": None}
    data = {"fileId": file_id, "exists": True, "fileSize": upload.bytes_appended,
            "lastModified": _utc_iso(upload.updated_at),
            "state": "completed" if upload.completed else "uploading",
            "chunksReceived": upload.chunks_received, "nextChunkIndex": upload.next_index,
            "missingChunks": upload.missing_chunks(),
            "mimeType": upload.mime_type or chunkstore.MEDIA_TYPES[upload.ext],
            "url": "/uploads/%s.%s" % (file_id, upload.ext),
            "createdAt": _utc_iso(upload.created_at)}
    if upload.last_index is not None:
        data["totalChunks"] = upload.last_index + 1
    if upload.completed:
        data["completedAt"] = _utc_iso(upload.completed_at)
        data["sha256"] = upload.sha256       # None for a moment while it is being computed
    return data


def parse_range(value, size):
    """One `bytes=` range (RFC 9110 14.1.2) -> (start, end); None to ignore; or 'unsatisfiable'.
    Several ranges are answered with the whole file, which the RFC allows."""
    match = re.match(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*\Z", value)
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":                          # suffix: the last N bytes
        if int(last) == 0:
            return "unsatisfiable"
        return max(0, size - int(last)), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def read_resource(name):
    """Bytes of a file shipped beside this module (e.g. "static/index.html"), also when the
    program runs from a zipapp, where there is no real file to open."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    loader = globals().get("__loader__")
    if loader is not None and hasattr(loader, "get_data"):
        return loader.get_data(path)
    with open(path, "rb") as f:
        return f.read()


class _Body:
    """Reads exactly Content-Length bytes of a request body into the parser's buffer.

    http.server read the headers through a buffered reader that may already hold the first
    body bytes. One read1() of at least the reader's buffer size hands those over and leaves
    the reader empty (or finishes the body); after that we read the socket with recv_into,
    which stays fast for large bodies where the buffered reader did not (STYLE.md).
    Each read waits at most the socket timeout: a silent client raises socket.timeout.
    """

    def __init__(self, rfile, sock, length):
        self._rfile = rfile
        self._sock = sock
        self.remaining = length
        self._buffered = None

    def read_into(self, view):
        if self.remaining == 0:
            return 0
        want = min(len(view), self.remaining)
        if self._buffered is None:
            self._buffered = memoryview(self._rfile.read1(min(self.remaining,
                                                               RECV_DRAIN_BYTES)))
            if not self._buffered:
                raise IncompleteBody()
        if self._buffered:
            n = min(want, len(self._buffered))
            view[:n] = self._buffered[:n]
            self._buffered = self._buffered[n:]
        else:
            n = self._sock.recv_into(view, want)
            if n == 0:
                raise IncompleteBody()
        self.remaining -= n
        return n


def _multipart_http_error(error):
    return HttpError(error.status, MULTIPART_CODES.get(error.code, error.code), error.message)


def _send_file_range(sock, wfile, f, offset, count):
    """Send `count` bytes of `f` from `offset`: sendfile(2) where the OS has it."""
    wfile.flush()
    try:
        sock.sendfile(f, offset, count)
    except (AttributeError, NotImplementedError):
        f.seek(offset)
        while count > 0:
            block = f.read(min(count, 1 << 20))
            if not block:
                break
            wfile.write(block)
            count -= len(block)


def _refuse_connection(sock, status, code, message, retry_after=None):
    """Answer a connection we will not serve (accept thread): one write, then close."""
    body = json.dumps({"success": False, "error": {"code": code, "message": message}}).encode()
    head = ["HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase),
            "Content-Type: application/json; charset=utf-8",
            "Content-Length: %d" % len(body), "Connection: close"]
    if retry_after:
        head.append("Retry-After: %d" % retry_after)
    try:
        sock.settimeout(1.0)
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body)
        _linger(sock, timeout=0.2)
    except OSError:
        pass


def _linger(sock, timeout=LINGER_TIMEOUT_S):
    """Half-close and swallow what the client is still sending, so that closing does not
    reset the connection before the client has read our error reply (RFC 9112 9.6)."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        drained = 0
        while drained < LINGER_DRAIN_BYTES and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass


_CONTROL_CHARS = {c: "\\x%02x" % c for c in list(range(32)) + [127]}


def _printable(text):
    """Escape control characters (log injection); 3.7 on some boxes does not do it."""
    return str(text).translate(_CONTROL_CHARS)


def _utc_iso(timestamp):
    """2024-01-01T00:00:00.000Z, as the seed's lastModified."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)


class _LogFormatter(logging.Formatter):
    """Server log lines share the access log's UTC timestamps and escaping."""

    def format(self, record):
        line = "%s %s %s: %s" % (_utc_iso(record.created), record.levelname, record.name,
                                 _printable(record.getMessage()))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _configure_logging():
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


# ---------------------------------------------------------------------------------------------
# main: configure, repair, serve, stop cleanly
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = build_parser(os.environ).parse_args(argv)
    config = Config(args)
    _configure_logging()
    store = ChunkStore(config.dir, allow_any_content=config.allow_any_content,
                       max_upload_bytes=config.max_upload_bytes, crash_at=config.crash_at)
    mended = store.repair()
    if mended:
        logging.getLogger("m1server").warning("repaired %d upload(s) after a crash", mended)
    try:
        server = M1Server(config, store)
    except OSError as error:
        sys.stderr.write("m1server: cannot listen on %s:%s: %s\n"
                         % (config.host, config.port, error.strerror or error))
        store.close()
        return 2
    if not _is_loopback(config.host):
        sys.stderr.write("WARNING: listening on %s with no authentication: anyone who can "
                         "reach this address can upload and read videos.\n" % config.host)

    def stop(signum, frame):
        if not server.stopping:
            server.stopping = True
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.processor.start()
    host, port = server.server_address[:2]
    shown = "[%s]" % host if ":" in host else host
    print("m1server %s serving http://%s:%d/ (uploads in %s)" % (VERSION, shown, port,
                                                                config.dir), flush=True)
    server.serve_forever(poll_interval=0.25)
    server.processor.stop()          # ffmpeg stopped now; its job runs again at the next start
    finished = server.wait_for_in_flight(SHUTDOWN_GRACE_S)
    server.server_close()
    store.close()
    server.processor.close()
    sys.stderr.write("m1server stopped%s\n" % ("" if finished else
                                               " (some requests were still running)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
