"""httpapi.py - m1server's HTTP API: settings, the server, the request handler, and main().

Browsers record with MediaRecorder and send each Blob as a numbered chunk while they record;
m1server stores every chunk, appends them in order into one file per upload
(`uploads/<fileId>.webm`), survives retries, reorders and crashes, and tells the client exactly
where the upload stands. `python3 m1server.py` runs main() below (see `--help`).

A chunk travels through the code in this order, and so can you when reading it:
  socket -> connections.py (who may hold a connection, and the deadlines it is held to)
         -> httphead.py (the request line and header fields, read strictly: RFC 9112)
         -> this file (limits, routing, one JSON error envelope)
         -> multipart.py (the fields, and the file part streamed into the video in
            place, or to a part file)
         -> chunkstore.py (lock per upload, ledger, append, fsync) -> disk
            (storage.py is the contract it keeps, and s3store.py keeps it on S3).

This file is ordered top-down: settings, errors, the HTTP server, the request handler (routing,
then one method per route), then helpers, then `main`.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import email.utils
import functools
import http.client
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import chunkstore
import connections
import cors
import httphead
import localdisk
import multipart
import options
import serverlog
import storage
import webclient
from apierror import ApiError
from metrics import Metrics
from chunkstore import ChunkStore

VERSION = "0.1.0"
log = serverlog.Logger("m1server")

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
DEFAULT_INCOMPLETE_TTL_S = 7 * 86400       # an upload idle this long without finishing is removed
DEFAULT_RETENTION_S = 0                    # 0: completed uploads are kept forever
DEFAULT_SWEEP_INTERVAL_S = 600.0           # how often retention runs in the background
DEFAULT_STORAGE = "local"                  # or s3://bucket/prefix (s3store.py)
DEFAULT_S3_PART_BYTES = 8 << 20            # S3: size of every part of the assembled object
DEFAULT_LIST_LIMIT = 50                    # GET /api/video page size
MAX_LIST_LIMIT = 500
LINGER_DRAIN_BYTES = 1 << 20               # unread body we swallow so the client sees errors
LINGER_TIMEOUT_S = 2.0
READ_BUFFER_BYTES = 32 << 10               # a connection's read buffer, see Handler.rbufsize
RECV_DRAIN_BYTES = 1 << 20                 # >= READ_BUFFER_BYTES, see _Body
REFUSAL_RETRY_AFTER_S = 1                  # Retry-After of a refused connection (503, 429)

UPLOAD_STATUSES = ("uploading", "completed")
# Every JSON reply's encoder, made once: json.dumps with any option builds a new one per call.
_JSON = json.JSONEncoder(separators=(",", ":"))
CHUNK_INDEX_DIGITS = 7                     # storage.MAX_CHUNK_INDEX has 7
REQUIRED_FIELDS = ("fileId", "chunkIndex", "status")
OPTIONAL_FIELDS = ("mimeType", "checksum")
SEED_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS       # in the order their errors are checked


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


def parse_duration(text):
    """'90', '90s', '30m', '24h', '7d' -> seconds; '0' or 'off' -> 0 (disabled)."""
    if str(text).strip().lower() == "off":
        return 0
    match = re.match(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*\Z", str(text), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError("not a duration: %r (use e.g. 90s, 30m, 24h, 7d)"
                                         % text)
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2).lower()]
    return float(match.group(1)) * unit


def parse_count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a whole number: %r" % text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_count_or_auto(text):
    if str(text).strip().lower() == connections.AUTO:
        return connections.AUTO
    return parse_count(text)


def parse_port(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("not a TCP port: %r" % text)
    return value


def parse_rate(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (off) or more")
    return value


def parse_public_url(text):
    """--public-url: '' (off) or scheme://host[:port][/path], without query or fragment."""
    value = str(text).strip().rstrip("/")
    if not value:
        return ""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or parts.query or parts.fragment or \
            not parts.netloc or not httphead.HOST_PATTERN.match(parts.netloc):
        raise argparse.ArgumentTypeError("not a public URL: %r (write e.g. "
                                         "https://video.example.com)" % text)
    return value


def parse_flag(text):
    return str(text).strip().lower() in ("1", "true", "yes", "on")


def parse_storage(text):
    value = str(text).strip()
    if value != "local" and not value.startswith("s3://"):
        raise argparse.ArgumentTypeError("storage is local or s3://bucket/prefix, not %r" % text)
    return value


def parse_addressing(text):
    value = str(text).strip().lower()
    if value not in ("auto", "path", "virtual"):
        raise argparse.ArgumentTypeError("addressing is path, virtual or auto, not %r" % text)
    return value


def parse_journal_size(text):
    value = parse_size(text)
    if value > chunkstore.MAX_JOURNAL_CHUNK_BYTES:
        raise argparse.ArgumentTypeError("the journal takes chunks of at most %s bytes"
                                         % chunkstore.MAX_JOURNAL_CHUNK_BYTES)
    return value


def parse_part_size(text):
    value = parse_size(text)
    if value < 5 << 20:
        raise argparse.ArgumentTypeError("S3 parts are at least 5M (S3's minimum)")
    return value


# (flag, type, default, help). The env twin of --max-chunk-size is M1_MAX_CHUNK_SIZE.
OPTIONS = (
    ("--host", str, DEFAULT_HOST, "address to listen on (a public address without --api-key "
     "prints a warning)"),
    ("--port", parse_port, DEFAULT_PORT, "TCP port; 0 picks a free one"),
    ("--dir", str, DEFAULT_DIR, "upload folder: assembled videos, temp/ chunks, m1.sqlite3"),
    ("--max-chunk-size", parse_size, DEFAULT_MAX_CHUNK_BYTES,
     "largest chunk accepted (413 beyond)"),
    ("--max-upload-size", parse_size, DEFAULT_MAX_UPLOAD_BYTES,
     "largest upload, all chunks together (413 beyond)"),
    ("--max-parts", parse_count, DEFAULT_MAX_PARTS, "most parts in one multipart body"),
    ("--timeout", parse_seconds, DEFAULT_TIMEOUT_S,
     "seconds a client may stay silent mid-request (each read and write)"),
    ("--max-connections", parse_count, DEFAULT_MAX_CONNECTIONS,
     "open connections served at once (503 beyond, once no idle keep-alive connection can "
     "be closed to make room)"),
    # The HTTP edge: deadlines and caps per connection (connections.py, httphead.py).
    ("--max-connections-per-client", parse_count_or_auto, connections.AUTO,
     "open connections from one client address (429 beyond); auto is half of "
     "--max-connections; behind a proxy every client has its address: set it to "
     "--max-connections there"),
    ("--header-timeout", parse_seconds, connections.DEFAULT_HEADER_TIMEOUT_S,
     "seconds a client may take to send a request line and its headers, however it paces "
     "them (408 beyond)"),
    ("--idle-timeout", parse_seconds, connections.DEFAULT_IDLE_TIMEOUT_S,
     "seconds a keep-alive connection may wait for its next request before it is closed"),
    ("--min-body-rate", parse_size, connections.DEFAULT_MIN_BODY_RATE,
     "bytes per second a request body must arrive at, over each --body-rate-window (408 "
     "below; 0: no minimum)"),
    ("--body-rate-window", parse_seconds, connections.DEFAULT_BODY_RATE_WINDOW_S,
     "seconds over which --min-body-rate is measured"),
    ("--max-header-size", parse_size, httphead.DEFAULT_MAX_HEAD_BYTES,
     "longest request line (414 beyond), and most bytes of header fields (431 beyond)"),
    ("--max-headers", parse_count, httphead.DEFAULT_MAX_FIELDS,
     "most header fields in one request (431 beyond)"),
    ("--public-url", parse_public_url, "",
     "the URL clients reach this server at, e.g. https://video.example.com: the absolute "
     "URLs it answers (tus Location) start with it (default: built from the request's Host)"),
    ("--trust-proxy", parse_flag, False,
     "build absolute URLs from X-Forwarded-Host and X-Forwarded-Proto (only behind a proxy "
     "that sets both)"),
    ("--min-free-disk", parse_size, DEFAULT_MIN_FREE_DISK_BYTES,
     "free disk space kept in reserve (507 when a chunk would eat into it)"),
    ("--allow-any-content", parse_flag, False,
     "accept a chunk 0 that is not WebM, MP4 or Ogg"),
    ("--journal-chunk-size", parse_journal_size, chunkstore.DEFAULT_JOURNAL_CHUNK_BYTES,
     "in-order chunks up to this size cost one fsync, not two: their bytes are journaled in "
     "m1.sqlite3 until the video file is synced (at most 256K; 0, the default: fsync the "
     "file every chunk; worth %dK where fsync is slow, as on SD cards)"
     % (chunkstore.SLOW_DISK_JOURNAL_CHUNK_BYTES >> 10)),
    ("--no-xattr", parse_flag, False,
     "sync m1.sqlite3 for every chunk, instead of keeping a small in-order chunk's record "
     "in its video file's extended attributes, synced with its bytes (one sync per chunk, "
     "not two; the default where the filesystem keeps them)"),
    ("--upload-state-cache", parse_count, chunkstore.DEFAULT_STATE_CACHE,
     "uploads whose state (and running sha256) the local store keeps in memory between "
     "chunks (the least recently used beyond it are read from m1.sqlite3 again, and hashed "
     "from the file once complete)"),
    ("--incomplete-ttl", parse_duration, DEFAULT_INCOMPLETE_TTL_S,
     "remove uploads idle and unfinished this long (0 keeps them)"),
    ("--retention", parse_duration, DEFAULT_RETENTION_S,
     "remove completed uploads this long after they completed (0 keeps them)"),
    ("--sweep-interval", parse_seconds, DEFAULT_SWEEP_INTERVAL_S,
     "seconds between background retention sweeps"),
    ("--cors-origin", cors.parse_origins, cors.DEFAULT_ORIGINS,
     "origins whose pages may upload and read from a browser: '*' or a comma-separated list "
     "such as http://localhost:3000 (see cors.py)"),
    ("--max-subscribers", options.parse_auto_count, options.AUTO,
     "event streams (WebSocket or SSE) open at once, 503 beyond; auto is half of "
     "--max-connections, and it must stay below it"),
    ("--event-heartbeat", parse_seconds, options.DEFAULT_HEARTBEAT_S,
     "seconds between keep-alives on an event stream (SSE comment, WebSocket ping); a "
     "WebSocket that has not answered one ping when the next is due is closed"),
    ("--event-queue", parse_count, options.DEFAULT_QUEUE_EVENTS,
     "events held for a subscriber that reads slowly; beyond it the oldest are dropped "
     "and counted"),
    ("--event-history", parse_count, options.DEFAULT_HISTORY_EVENTS,
     "recent events kept per watched upload, so that a reconnect (Last-Event-ID) resumes"),
    ("--live-max-viewers", options.parse_auto_count, options.AUTO,
     "live streams (GET /uploads/<id>.<ext>?live=1) open at once, 503 beyond; auto is an "
     "eighth of --max-connections, and it must stay below it"),
    ("--live-idle-timeout", parse_seconds, options.DEFAULT_LIVE_IDLE_TIMEOUT_S,
     "a live stream ends when its upload gets no new chunk for this many seconds"),
    ("--ws-max-message", parse_size, options.DEFAULT_WS_MAX_MESSAGE_BYTES,
     "largest WebSocket frame or message a client may send (closed with 1009 beyond)"),
    ("--tus-expiry", parse_duration, options.DEFAULT_TUS_EXPIRY_S,
     "an unfinished tus upload idle this long expires: removed, 410 Gone (0 keeps them)"),
    ("--tus-piece-size", parse_size, options.DEFAULT_TUS_PIECE_BYTES,
     "a tus PATCH is stored (durable) in pieces of this size"),
    ("--tus-max-metadata", parse_size, options.DEFAULT_TUS_MAX_METADATA_BYTES,
     "longest tus Upload-Metadata header (431 beyond)"),
    ("--tus-max-partials", parse_count, options.DEFAULT_TUS_MAX_PARTIALS,
     "most partial uploads one tus final upload may join (400 beyond)"),
    # Video processing after an upload completes (processing.py, SPEC section 5).
    ("--processing", options.parse_processing_mode, options.DEFAULT_PROCESSING_MODE,
     "after upload: off, probe (metadata), remux (+ seekable copy and poster, no "
     "re-encoding) or mp4 (+ H.264/AAC MP4)"),
    ("--ffmpeg", str, options.DEFAULT_FFMPEG, "ffmpeg program (name on PATH or path)"),
    ("--ffprobe", str, options.DEFAULT_FFPROBE,
     "ffprobe program (name on PATH or path; default also looks beside ffmpeg)"),
    ("--max-height", options.parse_height, options.DEFAULT_MAX_HEIGHT,
     "most lines of the MP4 and the poster (never upscaled)"),
    ("--mp4-crf", options.parse_crf, options.DEFAULT_MP4_CRF,
     "MP4 quality, x264 CRF 0-51 (lower: better and bigger)"),
    ("--processing-timeout", parse_seconds, options.DEFAULT_JOB_TIMEOUT_S,
     "seconds one processing job may take before ffmpeg is stopped and the job fails"),
    ("--processing-workers", parse_count, options.DEFAULT_PROCESSING_WORKERS,
     "processing jobs run at once"),
    ("--webhook-url", options.parse_webhook_urls, (),
     "POST signed events (upload.completed, ...) to this http(s) URL; repeatable; @FILE reads "
     "one URL a line; the env twin takes URLs separated by spaces"),
    ("--webhook-secret", str, None, "key of the M1-Signature HMAC on every webhook (required "
     "with --webhook-url; prefer the env twin: flags show in ps)"),
    ("--webhook-timeout", parse_seconds, options.DEFAULT_WEBHOOK_TIMEOUT_S,
     "seconds one webhook attempt may take, connect to response"),
    ("--webhook-retry-for", parse_duration, options.DEFAULT_WEBHOOK_RETRY_FOR_S,
     "retry a failing webhook with backoff for this long (0: one attempt)"),
    ("--webhook-workers", options.parse_webhook_workers, options.DEFAULT_WEBHOOK_WORKERS,
     "webhook attempts in flight at once per URL (threads, fixed at start-up)"),
    ("--storage", parse_storage, DEFAULT_STORAGE,
     "where videos live: local (in --dir) or s3://bucket/prefix on S3-compatible storage, "
     "shared by every node (credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
     "AWS_SESSION_TOKEN)"),
    ("--s3-endpoint", str, "", "S3 endpoint URL, e.g. http://127.0.0.1:8333 (default: AWS)"),
    ("--s3-region", str, "", "region requests are signed for (default: AWS_REGION or "
     "us-east-1)"),
    ("--s3-addressing", parse_addressing, "auto",
     "path (host/bucket/key) or virtual (bucket.host/key); auto: path with --s3-endpoint, "
     "virtual on AWS"),
    ("--s3-presign", parse_flag, False,
     "serve videos by redirecting to a presigned S3 URL instead of proxying the bytes"),
    ("--s3-part-size", parse_part_size, DEFAULT_S3_PART_BYTES,
     "size of every part of an assembled S3 object but the last (at least 5M)"),
    # Authentication, TLS and rate limits (auth.py, SPEC section 6; README "Security").
    ("--api-key", str, None, "turn auth on: every route but /healthz and the demo files "
     "needs Authorization: Bearer <this key> or a token (prefer the env twin or "
     "--api-key-file: flags show in ps)"),
    ("--api-key-file", str, None, "read the API key from this file (first line)"),
    ("--secret", str, None, "key that signs tokens (default: derived from the API key, so "
     "a new key revokes every token)"),
    ("--cors-allow-any-with-auth", parse_flag, False,
     "keep --cors-origin '*' when auth is on (otherwise only listed origins and the "
     "server's own pages may call it from a browser)"),
    ("--tls-cert", str, None, "serve HTTPS with this PEM certificate chain (with --tls-key)"),
    ("--tls-key", str, None, "PEM private key of --tls-cert"),
    ("--rate-limit", parse_rate, 0.0, "requests per second per client address (429 beyond; "
     "0: no limit)"),
    ("--rate-burst", parse_rate, 0.0, "requests a client may send at once before "
     "--rate-limit applies (default: one second's worth)"),
    ("--rate-limit-bytes", parse_size, 0, "request body bytes per second per client "
     "address (429 beyond; 0: no limit)"),
    ("--rate-burst-bytes", parse_size, 0, "body bytes a client may send at once before "
     "--rate-limit-bytes applies (default: one second's worth)"),
)
SECRET_OPTIONS = ("--webhook-secret", "--api-key", "--secret")     # --help never shows their values


def env_name(flag):
    return "M1_" + flag[2:].upper().replace("-", "_")


def build_parser(environ):
    parser = argparse.ArgumentParser(
        prog="m1server.py",
        description="Video chunk upload server (standard library only). Every option can "
                    "also be set with the environment variable shown beside it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sizes take a byte count or a K, M, G suffix (powers of 1024); durations take "
               "seconds or an s, m, h, d suffix.\n"
               "Example: python3 m1server.py --port 3001 --dir ./uploads --max-chunk-size 64M\n\n"
               "Tools in the same file (each has --help):\n"
               "  m1server.py upload FILE --server URL   resumable command-line uploader\n"
               "  m1server.py gc [--dir DIR ...]          one retention sweep, server stopped\n"
               "  m1server.py token --file-id ID ...      mint an upload/read token (auth)")
    parser.add_argument("--version", action="version", version="m1server " + VERSION)
    for flag, kind, default, text in OPTIONS:
        name = env_name(flag)
        if name in environ:
            try:
                default = kind(environ[name]) if kind is not parse_flag else parse_flag(
                    environ[name])
            except argparse.ArgumentTypeError as error:
                parser.error("%s: %s" % (name, error))
        shown = _format_default(default)
        if flag in SECRET_OPTIONS:
            shown = "set" if default else "none"
        if kind is parse_flag:
            parser.add_argument(flag, action="store_true", default=default,
                                help="%s [env %s=1]" % (text, name))
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=kind, action=_Repeated, default=default,
                                help="%s [env %s]" % (text, name))
        else:
            parser.add_argument(flag, type=kind, default=default,
                                help="%s [env %s, default %s]" % (text, name, shown))
    return parser


class _Repeated(argparse.Action):
    """A flag given any number of times (each value a tuple); the flags replace the env twin."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, (() if current is self.default else current) + values)


def _format_default(value):
    if isinstance(value, float) and value >= 3600 and value % 3600 == 0:
        return "%dd" % (value // 86400) if value % 86400 == 0 else "%dh" % (value // 3600)
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
        self.max_connections_per_client = connections.resolve_per_client(
            args.max_connections_per_client, args.max_connections)
        self.header_timeout = args.header_timeout
        self.idle_timeout = args.idle_timeout
        self.min_body_rate = args.min_body_rate
        self.body_rate_window = args.body_rate_window
        self.max_header_bytes = args.max_header_size
        self.max_headers = args.max_headers
        self.public_url = args.public_url
        self.trust_proxy = args.trust_proxy
        self.min_free_disk_bytes = args.min_free_disk
        self.allow_any_content = args.allow_any_content
        self.journal_chunk_bytes = args.journal_chunk_size
        self.chunk_records = not args.no_xattr
        self.upload_state_cache = args.upload_state_cache
        self.incomplete_ttl = args.incomplete_ttl or None      # None: keep
        self.retention = args.retention or None
        self.sweep_interval = args.sweep_interval
        self.cors_origins = args.cors_origin
        self.max_subscribers = options.resolve_max_subscribers(args.max_subscribers,
                                                              args.max_connections)
        self.event_heartbeat = args.event_heartbeat
        self.event_queue = args.event_queue
        self.event_history = args.event_history
        self.ws_max_message = args.ws_max_message
        self.live_max_viewers = options.resolve_max_viewers(args.live_max_viewers,
                                                            args.max_connections)
        self.live_idle_timeout = args.live_idle_timeout
        self.tus_expiry_s = args.tus_expiry or None           # None: tus uploads never expire
        self.tus_piece_bytes = max(1, args.tus_piece_size)
        self.tus_max_metadata_bytes = args.tus_max_metadata
        self.tus_max_partials = args.tus_max_partials
        self.webhook_urls = args.webhook_url
        self.webhook_secret = args.webhook_secret
        self.webhook_timeout = args.webhook_timeout
        self.webhook_retry_for = args.webhook_retry_for
        self.webhook_workers = args.webhook_workers
        self.storage = args.storage
        self.s3_endpoint = args.s3_endpoint
        self.s3_region = args.s3_region
        self.s3_addressing = args.s3_addressing
        self.s3_presign = args.s3_presign
        self.s3_part_size = args.s3_part_size
        self.one_shot = False              # `gc`: one sweep, then exit
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
        # tests only: a shorter lease on shared (S3) processing jobs, so a takeover is quick
        # (None: processing.JOB_LEASE_S)
        lease = os.environ.get("M1_TEST_PROCESSING_LEASE")
        self.processing_lease = float(lease) if lease else None
        self.api_key = args.api_key
        if args.api_key_file:
            with open(args.api_key_file, encoding="utf-8") as f:
                self.api_key = f.readline().strip()
            if not self.api_key:
                raise ValueError("--api-key-file %s is empty" % args.api_key_file)
        self.secret = args.secret
        if self.api_key and "*" in self.cors_origins and not args.cors_allow_any_with_auth:
            self.cors_origins = ()       # same-origin only: auth on, nobody listed (auth.py)
        if bool(args.tls_cert) != bool(args.tls_key):
            raise ValueError("give both --tls-cert and --tls-key")
        self.tls_cert, self.tls_key = args.tls_cert, args.tls_key
        self.rate_limit, self.rate_burst = args.rate_limit, args.rate_burst
        self.rate_limit_bytes, self.rate_burst_bytes = args.rate_limit_bytes, \
            args.rate_burst_bytes


# ---------------------------------------------------------------------------------------------
# Errors: one type, turned into the JSON envelope in one place (Handler.send_error_json)
# ---------------------------------------------------------------------------------------------

HttpError = ApiError          # what handlers raise; lower layers raise ApiError subclasses


class IncompleteBody(Exception):
    """The client closed the connection before sending Content-Length bytes."""


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
        self.metrics = Metrics(httphead.METHODS)
        store.add_listener(self.metrics.on_store_event)
        store.observe_storage(self.metrics.on_storage_request)
        self.routes = compile_routes(CORE_ROUTES + webclient.routes(read_resource) +
                                     FEATURE_ROUTES)
        self.cors_exposed_headers = cors.EXPOSED_HEADERS + options.TUS_EXPOSED_HEADERS
        self.stop_hooks = []         # run on SIGTERM before in-flight requests
        self.features = Features(self)
        self.webhooks = None         # webhooks.Webhooks, set by serve() when --webhook-url
        self.live = None             # live.LiveHub, once a live stream or page was asked for
        self.guard, self.rate_limiter = OPEN_GUARD, NO_RATE_LIMIT
        if config.api_key or config.secret or config.rate_limit or config.rate_limit_bytes:
            self.features.get("auth")
        store.add_listener(self.features.on_store_event)
        self.stopping = False
        self.connections = connections.Connections(connections.Limits(
            config.max_connections, config.max_connections_per_client, config.header_timeout,
            config.idle_timeout, config.min_body_rate, config.body_rate_window))
        self._in_flight = 0
        self._counts = threading.Condition()
        ThreadingHTTPServer.__init__(self, (config.host, config.port), Handler)
        self.connections.start()

    def server_bind(self):
        """HTTPServer.server_bind without its socket.getfqdn(host): a reverse name lookup
        nothing here reads (server_name is for CGI), which loads the name-service libraries
        (0.6 MiB of an idle server, 2 ms of every start here) and, where DNS is slow or
        broken, holds the start until it times out."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def describe(self, file_id, upload):
        """The status fields of one upload, with those feature modules add (tus, processing:
        loaded here when the upload may have some)."""
        data = status_reply(file_id, upload)
        if upload is not None:
            for extra in self.features.status_extras(upload):
                data.update(extra(upload))
        return data

    def status_of(self, file_id):
        """What GET /api/video/status/<fileId> answers as `data`."""
        return self.describe(file_id, self.store.status(file_id))

    def stop(self):
        """SIGTERM/SIGINT: run the stop hooks (they end requests that would otherwise wait,
        such as event streams), then stop accepting connections."""
        for hook in self.stop_hooks:
            try:
                hook()
            except Exception:
                log.exception("stop hook %r failed", hook)
        self.shutdown()

    def forward_processing_event(self, event):
        """Processing's progress, ready and failed events go to event subscribers too (once
        anyone subscribed), and ready/failed to webhooks as video.ready / video.failed."""
        fields = {k: v for k, v in event.items() if k not in ("type", "fileId")}
        bus = self.features.loaded("events")
        if bus is not None:
            bus.publish(event["fileId"], event["type"], **fields)
        if self.webhooks is not None and event["type"] in ("ready", "failed"):
            self.webhooks.publish("video." + event["type"], event["fileId"], fields)

    def process_request(self, request, client_address):
        """Admit the connection (connections.py: the caps, making room by closing an idle
        one), or refuse it at once, 503 or 429, without blocking the accept loop."""
        refusal = self.connections.admit(request, client_address[0])
        if refusal is not None:
            _refuse_connection(request, *refusal)
            self.connections.linger(request)        # closed by the watchdog, not here
            return
        ThreadingHTTPServer.process_request(self, request, client_address)

    def shutdown_request(self, request):
        self.connections.release(request)
        ThreadingHTTPServer.shutdown_request(self, request)

    def server_close(self):
        self.connections.stop()
        ThreadingHTTPServer.server_close(self)

    def open_connections(self):
        return self.connections.count()

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
        if isinstance(sys.exc_info()[1], (ssl.SSLError, socket.timeout, ConnectionError)):
            log.info("connection from %s failed: %s", client_address[0], sys.exc_info()[1])
            return                       # a failed TLS handshake, a silent client: no traceback
        log.exception("connection from %s failed", client_address[0])


# ---------------------------------------------------------------------------------------------
# The optional features, each loaded when it is enabled or first used
# ---------------------------------------------------------------------------------------------

class Features:
    """tus, processing, events (and websocket), auth and webhooks are imported and set up the
    first time they are needed, so a plain start pays for none of them (SPEC section 9's
    footprint; their flags are parsed without them: options.py). When each one loads:
      auth        at start with --api-key/--api-key-file/--secret or a rate limit; else its
                  token route (which then answers that auth is off). Until then every
                  request passes OPEN_GUARD and NO_RATE_LIMIT, which is what auth.py does
                  when it is off.
      webhooks    at start with --webhook-url (serve(): it listens before repair); else its
                  deliveries routes.
      events      its route (a subscription); events before it had nobody to go to.
      live        a live stream (?live=1) or its pages (/watch/, /dashboard); before it, no
                  viewer had to be woken.
      tus         its routes, or the first status or listing (its fields in them).
      processing  at start when the store holds a completed upload (a job may wait; the
                  backfill looks); else at the first completed upload, its route, or a status
                  of a completed upload; never with --processing off.
    A feature's route rows stand in the table as FEATURE_ROUTES, whose functions load it when
    a request that passed routing and auth calls them. Loading is serialised by one lock;
    once loaded, a feature is read without it."""

    def __init__(self, server):
        self._server = server
        self._lock = threading.RLock()
        self._loaded = {}
        self.serving = False          # serve() started the workers: start a late one now

    def loaded(self, name):
        """The feature's object when it is loaded, else None (never loads it)."""
        return self._loaded.get(name)

    def get(self, name):
        feature = self._loaded.get(name)
        if feature is not None:
            return feature
        with self._lock:
            if name not in self._loaded:
                log.info("loading %s", name)
                self._loaded[name] = getattr(self, "_load_" + name)()
            return self._loaded[name]

    def start(self):
        """serve(), once the store is repaired: processing loads now when a job may wait for
        it (the store holds a completed upload, or other nodes share the queue); a feature
        loaded from here on starts its workers at once."""
        store = self._server.store
        if self.processing_wanted() and (store.capabilities.shared or store.counts()[1] > 0):
            self.get("processing")
        with self._lock:
            self.serving = True
            processor = self.loaded("processing")
        if processor is not None:
            processor.start()

    def processing_wanted(self):
        return self._server.config.processing != "off"

    def status_extras(self, upload):
        """The functions(upload) -> extra status fields, for this upload."""
        extras = [self.get("tus").status_fields]
        if upload.completed and self.processing_wanted():
            extras.append(self.get("processing").status_fields)
        return extras

    def on_store_event(self, event):
        """A store listener: the first completed upload loads processing (on the hasher's
        thread, not a request's), which queues it."""
        if event["type"] == "completed" and self.loaded("processing") is None and \
                self.processing_wanted():
            self.get("processing").enqueue(event["fileId"])

    def route_function(self, name, pattern, method):
        """The feature's own function for a row of FEATURE_ROUTES (the feature loaded)."""
        rows = self.get(name + "_routes")
        return rows[pattern][method]

    # -- the loaders ------------------------------------------------------------------------

    def _load_auth(self):
        import auth
        server, config = self._server, self._server.config
        server.guard = auth.Guard(config.api_key, config.secret)
        server.rate_limiter = auth.RateLimiter(config.rate_limit, config.rate_burst,
                                               config.rate_limit_bytes, config.rate_burst_bytes)
        return auth

    def _load_events(self):
        import events
        server = self._server
        bus = events.EventBus.from_config(server.config)
        server.store.add_listener(bus.on_store_event)
        server.events = bus                   # what events.py's route reads
        server.stop_hooks.append(bus.close)
        if server.store.capabilities.shared:  # several nodes: what the others did, too
            relay = events.StoreRelay(bus, server.status_of)
            server.stop_hooks.append(relay.stop)
        return bus

    def _load_live(self):
        import live
        server = self._server
        hub = live.LiveHub.from_config(server.config, server.store,
                                       server.store.capabilities.shared)
        server.store.add_listener(hub.on_store_event)
        server.stop_hooks.append(hub.close)     # SIGTERM ends the long-lived responses
        server.live = hub
        return live

    def _load_tus(self):
        import tus
        # tus works through the store in both modes (its records: the ledger, or the bucket)
        return tus.TusEndpoint(self._server.config, self._server.store, IncompleteBody)

    def _load_processing(self):
        import processing
        server = self._server
        # processing picks its own queue the same way (processing.open_queue)
        processor = processing.Processor(server.config, server.store)
        processor.add_listener(server.forward_processing_event)
        if self.serving:             # else serve() starts it (Features.start)
            processor.start()
        return processor

    def _load_webhooks(self):
        import webhooks
        return webhooks.Webhooks(self._server.config, self._server.store)

    # -- their route rows -------------------------------------------------------------------

    def _load_auth_routes(self):
        return self._rows(self.get("auth").routes(self._server.guard, Handler.read_small_body,
                                       self._server.config.max_upload_bytes, serverlog.utc_iso))

    def _load_events_routes(self):
        self.get("events")
        import events
        return self._rows(events.routes())

    def _load_live_routes(self):
        return self._rows(self.get("live").routes(read_resource, webclient.StaticFile))

    def _load_tus_routes(self):
        import tus
        return self._rows(tus.routes(self.get("tus")))

    def _load_processing_routes(self):
        import processing
        return self._rows(processing.routes(self.get("processing")))

    def _load_webhooks_routes(self):
        if self._server.webhooks is None:
            self._server.webhooks = self.get("webhooks")
        import webhooks
        return self._rows(webhooks.routes())

    @staticmethod
    def _rows(rows):
        return dict((pattern, dict(methods)) for pattern, methods in rows)


class _OpenGuard:
    """What auth.Guard is with auth off: nothing to check (auth.py loads when it is on)."""

    enabled = False

    def authorize(self, handler, label, groups):
        return None

    def check_chunk(self, handler, file_id):
        return None


class _NoRateLimit:
    enabled = False

    def admit(self, client, body_bytes):
        pass


OPEN_GUARD = _OpenGuard()
NO_RATE_LIMIT = _NoRateLimit()


# ---------------------------------------------------------------------------------------------
# The request handler
# ---------------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    server_version = "m1server/" + VERSION
    protocol_version = "HTTP/1.1"          # keep-alive: a recorder sends a chunk a second
    disable_nagle_algorithm = True         # headers + body must not wait for a delayed ACK
    # The head is read through a buffer of this size (socketserver's default is 8 KiB): the
    # read that brings the head in brings a small chunk's whole body with it, so the parser
    # sees it in one piece and writes it with one write. 256 connections hold 8 MiB at most.
    rbufsize = READ_BUFFER_BYTES

    def setup(self):
        self.timeout = self.server.config.timeout      # per read, see StreamRequestHandler
        self.slot = self.server.connections.slot_of(self.request)   # its deadlines
        self.requests_read = 0
        BaseHTTPRequestHandler.setup(self)
        if isinstance(self.connection, ssl.SSLSocket):
            # here, in this thread, not in the accept loop; within --header-timeout
            self.connection.do_handshake()
        self.started = time.monotonic()

    # Every method of httphead.METHODS goes through one dispatcher; any other gets 501.
    def do_GET(self):
        self.dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # -- one request: read its head strictly (httphead.py) under deadlines, then dispatch ---

    def handle_one_request(self):
        """Serve one request of the connection (http.server's handle() loops over this while
        the connection stays open)."""
        self.registered = False
        try:
            if not self.read_head():
                return
            if self.command not in httphead.METHODS:
                return self.send_error_json(HttpError(
                    501, "not_implemented", "method %s is not implemented here"
                    % self.command[:20]))
            getattr(self, "do_" + self.command)()
        finally:
            if self.registered:
                self.server.request_finished()

    def read_head(self):
        """Read and check the request line and header fields (httphead.py) within
        --idle-timeout and --header-timeout (connections.py). False when there is nothing to
        serve: the client left or idled out (nothing to answer), or its head was refused
        (answered, and the connection is closed: its framing is unknown)."""
        config, table, slot = self.server.config, self.server.connections, self.slot
        self.close_connection = True                # until the head asks for keep-alive
        self.command, self.request_version, self.requestline = None, "HTTP/1.1", ""
        self.headers, self.body_pending = http.client.HTTPMessage(), False
        table.await_request(slot, first=self.requests_read == 0)
        try:
            line = httphead.read_request_line(self.rfile, config.max_header_bytes)
            if line is None:
                return False
            table.head_started(slot)
            self.begin_request(line)
            head = httphead.parse_head(line, self.rfile, config.max_header_bytes,
                                       config.max_headers)
            if not table.serving(slot):              # the deadline passed as it arrived
                raise socket.timeout(slot.cut_reason)
        except httphead.HeadError as error:
            if error.cut_short and slot.cut_reason:
                error = HttpError(408, "request_timeout", slot.cut_reason)
            self.refuse_head(error)
            return False
        except socket.timeout:
            if self.requestline:                     # a head had begun: say why it ends
                self.refuse_head(HttpError(408, "request_timeout", slot.cut_reason or
                                           "client sent nothing for %gs" % self.timeout))
            return False
        except ConnectionError:
            return False                             # the client left; nobody to tell
        self.take_head(head)
        return True

    def take_head(self, head):
        """What http.server's own parser used to set, from the checked head."""
        self.requests_read += 1
        self.head = head
        self.command, self.path, self.request_version = head.method, head.target, head.version
        self.headers = head.headers
        self.close_connection = not head.keep_alive
        self.body_pending = bool(head.content_length)   # no Transfer-Encoding gets this far

    def begin_request(self, line):
        # A request counts as in flight from its request line on (before any 100 Continue),
        # so a SIGTERM arriving now waits for it instead of cutting it off.
        self.requestline = line.decode("latin-1")
        self.started = time.monotonic()
        self.route_label = "none"                      # until route() matches one
        self.server.request_started()
        self.registered = True

    def refuse_head(self, error):
        self.close_connection = True
        self.body_pending = True           # a body of unknown length may follow: drain it
        try:
            self.send_error_json(error)
        except OSError:
            pass                           # the client is gone; nothing left to tell it

    def dispatch(self):
        """Route the request and turn every failure into the JSON envelope (never a traceback)."""
        try:
            if self.server.stopping:
                self.close_connection = True     # finish this request, then let go
            cors.check_origin(self.server.config.cors_origins, self.command, self.headers)
            self.server.rate_limiter.admit(self.client_address[0],
                                           self.head.content_length or 0)
            handler, args = self.route()
            # auth.py: from the request line and headers only, before any body byte is read
            self.grant = self.server.guard.authorize(self, self.route_label, args)
            handler(*args)
        except ApiError as error:
            self.send_error_json(error)
        except socket.timeout:
            self.send_error_json(HttpError(408, "request_timeout", self.slot.cut_reason or
                                           "client sent nothing for %gs" % self.timeout))
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True                 # the client left; nobody to tell
        except Exception as error:
            full = localdisk.disk_full_error(error)       # ENOSPC, SQLite's "disk is full"
            if full is not None:
                return self.send_error_json(full)
            log.exception("unexpected error on %s %s", self.command, options.redact(self.path))
            self.send_error_json(HttpError(500, "internal_error",
                                           "unexpected server error (logged)"))

    def route(self):
        """Find the function for this path and method in the server's routing table; returns
        (bound function, decoded path groups)."""
        path = urlsplit(self.path).path
        allowed = set()          # methods of every route this path matches (for 405, OPTIONS)
        for pattern, methods, label in self.server.routes:
            match = pattern.match(path)
            if not match:
                continue
            self.route_label = label
            function = methods.get(self.command)
            if function is not None:
                return functools.partial(function, self), tuple(
                    unquote(g) for g in match.groups())
            allowed.update(methods)
        if not allowed:
            raise HttpError(404, "not_found",
                            "no such route: %s" % serverlog.printable(path)[:200])
        allowed = sorted(allowed) + ["OPTIONS"]
        if self.command == "OPTIONS":
            return self.options_preflight, (allowed,)
        raise HttpError(405, "method_not_allowed", "%s is not allowed here; use %s"
                        % (self.command, ", ".join(allowed)), {"Allow": ", ".join(allowed)})

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
        with store.room_for(length):              # 507 unless the disk has room (--min-free-disk)
            receiver = ChunkReceiver(self)
            try:
                form = self.read_form(boundary, length, receiver.open_file)
                fields, chunk = self.chunk_fields(form)
                result = receiver.store(fields, chunk)
            finally:
                receiver.close()
        if result.duplicate:
            self.server.metrics.count("m1_chunks_duplicate_total")
        if receiver.in_place:
            self.server.metrics.count("m1_chunks_in_place_total")
        self.send_json(200, {"success": True, "data": chunk_reply(result)})

    def check_upload_headers(self):
        try:
            return multipart.boundary_from_content_type(self.headers.get("Content-Type", ""))
        except multipart.MultipartError as error:
            raise _multipart_http_error(error)

    def content_length(self):
        """The body's length (checked by httphead.py: one value, digits); 411 without it
        (a Transfer-Encoding was refused before any route ran)."""
        if self.head.content_length is None:
            raise HttpError(411, "length_required", "a Content-Length header is required")
        return self.head.content_length

    def open_body(self, length):
        """The request body, to be read now. A client that sent Expect: 100-continue is told
        to go on only here, after the route, the credentials and the declared length were
        accepted (RFC 9110 10.1.1); a refusal before this point reaches it unsent."""
        if self.head.expect_continue and length:
            self.head.expect_continue = False
            self.handle_expect_100()
        body = _Body(self.rfile, self.connection, length, self.slot)
        self.server.connections.body_started(self.slot, body)     # --min-body-rate
        return body

    def handle_expect_100(self):
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")      # an interim reply: no fields
        return True

    def absolute_url(self, path):
        """`path` as the absolute URL a client follows (tus Location): --public-url, else
        the request's own Host (RFC 9112 3.2, checked by httphead.py), or, with
        --trust-proxy, the X-Forwarded-Host/-Proto the proxy in front set."""
        config = self.server.config
        if config.public_url:
            return config.public_url + path
        scheme, host = "https" if config.tls_cert else "http", self.head.host
        if config.trust_proxy:
            forwarded = _last_item(self.headers.get_all("X-Forwarded-Host"))
            if forwarded and httphead.HOST_PATTERN.match(forwarded):
                host = forwarded
            proto = (_last_item(self.headers.get_all("X-Forwarded-Proto")) or "").lower()
            if proto in ("http", "https"):
                scheme = proto
        if not host:                                 # HTTP/1.0 without Host: our address
            address, port = self.server.server_address[:2]
            host = "%s:%d" % ("[%s]" % address if ":" in address else address, port)
        return "%s://%s%s" % (scheme, host, path)

    def read_small_body(self, limit):
        """A small request body (JSON) read whole; 413 past `limit` bytes."""
        length = self.content_length()
        if length > limit:
            raise HttpError(413, "body_too_large", "the body may be at most %d bytes" % limit)
        buffer = bytearray(length)
        body, view, got = self.open_body(length), memoryview(buffer), 0
        try:
            while got < length:
                got += body.read_into(view[got:])
        except IncompleteBody:
            raise HttpError(400, "incomplete_body",
                            "the body ended before Content-Length bytes arrived")
        self.body_pending = False
        return bytes(buffer)

    def check_free_disk(self, length):
        """507 unless the disk has room for `length` bytes now (the store's rule; tus)."""
        with self.server.store.room_for(length):
            pass

    def read_form(self, boundary, length, open_file):
        """Stream the body through the parser, each file part into what open_file(name,
        filename, content_type) returns for it (it may look at the parts before: the form is
        filled as the parser goes). Returns the form; the caller closes and removes what
        open_file opened, also when this raises."""
        config = self.server.config
        body = self.open_body(length)
        limits = multipart.Limits(max_parts=config.max_parts,
                                  max_file_bytes=config.max_chunk_bytes, max_body_bytes=length)
        form = multipart.Form()
        try:
            # A buffer no bigger than the body: a small chunk's request then allocates (and
            # zero-fills) a few KiB, not the parser's whole default block.
            multipart.parse(body.read_into, boundary,
                            lambda *part: open_file(form, *part), limits,
                            block_size=max(1, min(multipart.DEFAULT_BLOCK_SIZE, length)),
                            form=form)
        except multipart.MultipartError as error:
            raise _multipart_http_error(error)
        except IncompleteBody:
            raise HttpError(400, "incomplete_body",
                            "the body ended before Content-Length bytes arrived")
        self.body_pending = False
        return form

    def chunk_fields(self, form):
        """The seed's fields, each exactly once, validated; returns (fields, file part)."""
        fields = self.seed_fields(form)
        chunks = [part for part in form.files if part.name == "file"]
        if not chunks:
            raise HttpError(400, "missing_field", "field file (the chunk's bytes) is required")
        if len(chunks) > 1:
            raise HttpError(400, "duplicate_field", "field file was sent %d times"
                            % len(chunks))
        return fields, chunks[0]

    def seed_fields(self, form):
        """The seed's text fields of `form`, each exactly once, validated (HttpError else):
        {name: value}, chunkIndex an int."""
        fields, sent = {}, {}
        for field in form.fields:                  # one pass: this runs twice per chunk
            if field.name in SEED_FIELDS:
                sent[field.name] = sent.get(field.name, 0) + 1
                fields.setdefault(field.name, field.value)
        for name in SEED_FIELDS:
            if sent.get(name, 0) > 1:
                raise HttpError(400, "duplicate_field", "field %s was sent %d times"
                                % (name, sent[name]))
            if name not in fields and name in REQUIRED_FIELDS:
                raise HttpError(400, "missing_field", "field %s is required" % name)
        if not storage.valid_file_id(fields["fileId"]):
            raise HttpError(400, "invalid_file_id", "fileId must match [A-Za-z0-9_-]{1,128}")
        index = httphead.number(fields["chunkIndex"], CHUNK_INDEX_DIGITS)
        if index is None or index > storage.MAX_CHUNK_INDEX:
            raise HttpError(400, "invalid_chunk_index", "chunkIndex must be an integer "
                            "0..%d written in digits" % storage.MAX_CHUNK_INDEX)
        fields["chunkIndex"] = index
        if fields["status"] not in UPLOAD_STATUSES:
            raise HttpError(400, "invalid_status", "status must be uploading or completed")
        return fields

    # -- GET /api/video/status/:fileId -------------------------------------------------------

    def get_status(self, file_id):
        if not storage.valid_file_id(file_id):
            raise HttpError(400, "invalid_file_id", "fileId must match [A-Za-z0-9_-]{1,128}")
        upload = self.server.store.status(file_id)
        self.send_json(200, {"success": True, "data": self.describe(file_id, upload)})

    def describe(self, file_id, upload):
        return self.server.describe(file_id, upload)

    # -- GET /api/video?limit=&cursor= , DELETE /api/video/:fileId -------------------------

    def get_uploads(self):
        query = parse_qs(urlsplit(self.path).query)
        limit = httphead.number(query.get("limit", [str(DEFAULT_LIST_LIMIT)])[-1], 6)
        if limit is None or not 1 <= limit <= MAX_LIST_LIMIT:
            raise HttpError(400, "invalid_limit", "limit must be 1..%d" % MAX_LIST_LIMIT)
        after = None
        if "cursor" in query:
            after = decode_cursor(query["cursor"][-1])
        page = self.server.store.list_uploads(limit + 1, after)
        more = len(page) > limit
        page = page[:limit]
        self.send_json(200, {"success": True, "data": {
            "uploads": [self.describe(upload.file_id, upload) for upload in page],
            "nextCursor": encode_cursor(page[-1]) if more else None}})

    def delete_upload(self, file_id):
        if not storage.valid_file_id(file_id):
            raise HttpError(400, "invalid_file_id", "fileId must match [A-Za-z0-9_-]{1,128}")
        if not self.server.store.delete(file_id):
            raise HttpError(404, "not_found", "no upload %s" % file_id)
        self.send_json(200, {"success": True, "data": {"fileId": file_id, "deleted": True}})

    # -- GET /uploads/<fileId>.<ext> : the assembled video, with Range ---------------------

    def get_media(self, name):
        store = self.server.store
        file_id, dot, ext = name.rpartition(".")
        if options.wants_live(self.path):    # ?live=1: the bytes as they arrive (live.py)
            return self.server.features.get("live").serve_live(self, file_id, ext)
        upload = store.status(file_id) if storage.valid_file_id(file_id) else None
        media = store.open_media(upload) if upload is not None and dot and ext == upload.ext \
            else None
        if media is None:
            raise HttpError(404, "not_found", "no such video")
        self.send_media(media, storage.MEDIA_TYPES.get(ext, "application/octet-stream"))

    def send_media(self, media, content_type):
        """A stored video with Range (206/416), ETag, If-None-Match, If-Range and
        Last-Modified: the original and its derivatives alike, from disk or S3."""
        if media.redirect_url:                # --s3-presign: the store serves it
            return self.send_plain(307, {"Location": media.redirect_url,
                                         "Cache-Control": "no-store"})
        size, mtime, etag = media.size, media.mtime, media.etag
        headers = {"Accept-Ranges": "bytes", "ETag": etag,
                   "Last-Modified": email.utils.formatdate(mtime, usegmt=True),
                   "Content-Type": content_type, "Cache-Control": "no-cache"}
        if etag_list_matches(self.headers.get_all("If-None-Match"), etag):
            return self.send_plain(304, headers)         # GET and HEAD only route here
        start, end = 0, size - 1
        status = 200
        wanted = self.headers.get("Range")
        # If-Range compares strongly (RFC 9110 13.1.5): only this exact, strong ETag lets
        # the Range apply; a date or another tag gets the whole file, which is always right.
        if wanted and self.headers.get("If-Range", etag) == etag and not etag.startswith("W/"):
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
        # Opened before the status line: a store that cannot serve it still gets a JSON error.
        body = media.open_range(start, end - start + 1) if self.command != "HEAD" else None
        self.send_response(status)
        self.send_headers(headers)
        if body is not None:
            with body:
                body.send(self.connection, self.wfile)

    # -- GET /healthz, OPTIONS ----------------------------------------------------------------

    def get_health(self):
        """Liveness: the process answers."""
        config = self.server.config
        self.send_json(200, {"success": True, "data": {
            "status": "ok", "version": VERSION,
            "limits": {"maxChunkBytes": config.max_chunk_bytes,
                       "maxUploadBytes": config.max_upload_bytes}}})

    def get_ready(self):
        """Readiness: the upload folder is writable, free disk is above the reserve, the
        metadata store and the storage backend answer. 503 with the failed checks otherwise."""
        checks = readiness_checks(self.server.config, self.server.store)
        failed = sorted(name for name, check in checks.items() if not check["ok"])
        data = {"status": "not_ready" if failed else "ready", "checks": checks}
        if not failed:
            return self.send_json(200, {"success": True, "data": data})
        self.send_json(503, {"success": False, "error": {
            "code": "not_ready", "message": "failed checks: " + ", ".join(failed)},
            "data": data})

    def get_metrics(self):
        store, config = self.server.store, self.server.config
        gauges = [
            ("m1_disk_free_bytes", "Free bytes on the upload folder's disk.",
             shutil.disk_usage(config.dir).free),
            ("m1_connections_open", "Open client connections.", self.server.open_connections()),
            ("m1_live_viewers", "Live streams open (live.py).",
             self.server.live.viewer_count if self.server.live is not None else 0),
        ]
        try:
            active, completed = store.counts()
            gauges[:0] = [("m1_uploads_active", "Uploads not yet complete.", active),
                          ("m1_uploads_completed", "Completed uploads on disk.", completed)]
        except ApiError:         # the object store is down: the rest (its retries) still counts
            pass
        body = self.server.metrics.render(gauges).encode("utf-8")
        self.send_response(200)
        self.send_headers({"Content-Type": "text/plain; version=0.0.4; charset=utf-8",
                           "Content-Length": str(len(body)), "Cache-Control": "no-store"})
        if self.command != "HEAD":
            self.wfile.write(body)

    def options_preflight(self, methods):
        headers = {"Allow": ", ".join(methods), "Content-Length": "0"}
        headers.update(cors.preflight_headers(self.server.config.cors_origins, self.headers,
                                              methods))
        self.send_plain(204, headers)

    # -- responses ------------------------------------------------------------------------

    def send_json(self, status, payload, headers=None):
        body = _JSON.encode(payload).encode("utf-8")
        self.send_response(status)
        headers = dict(headers or {})
        headers.update({"Content-Type": "application/json; charset=utf-8",
                        "Content-Length": str(len(body)), "Cache-Control": "no-store"})
        if self.body_pending:              # unread body: the connection cannot be reused
            self.close_connection = True
        self.send_headers(headers, b"" if self.command == "HEAD" else body)

    def send_plain(self, status, headers):
        self.send_response(status)
        headers.setdefault("Content-Length", "0")
        self.send_headers(headers)

    def send_response(self, code, message=None):
        """Begin a reply: its access log line, then its status line and the Server and Date
        fields, kept until send_headers writes the whole head. (http.server's own version
        encodes and buffers each field line apart; one join at the end costs less.)"""
        self.log_request(code)
        if message is None:
            message = self.responses.get(code, ("",))[0]
        self._head_lines = ["%s %d %s" % (self.protocol_version, code, message),
                            "Server: " + self.version_string(), "Date: " + _HTTP_DATE.now()]

    def send_headers(self, headers, body=b""):
        """End the head that send_response began and write it in one piece, with a small
        `body` in the same write (a second small write would wait for the client's delayed
        ACK). The fields: CORS, the caller's `headers`, the security headers it did not
        set, HSTS over TLS, and Connection: close when the connection ends after this."""
        lines = self._head_lines
        for name, value in cors.response_headers(self.server.config.cors_origins,
                                                 self.headers,
                                                 self.server.cors_exposed_headers).items():
            lines.append("%s: %s" % (name, value))
        for name, value in headers.items():
            lines.append("%s: %s" % (name, value))
        for name, value in options.SECURITY_HEADERS:
            if name not in headers:
                lines.append("%s: %s" % (name, value))
        if self.server.config.tls_cert:        # browsers keep to https for this host
            lines.append("Strict-Transport-Security: " + options.HSTS_VALUE)
        if self.close_connection:
            lines.append("Connection: close")
        lines.append("\r\n")                   # the empty line that ends the head
        self.wfile.write("\r\n".join(lines).encode("latin-1") + body)

    def send_error_json(self, error):
        """The single way out for every failure: the SPEC's JSON envelope."""
        self.send_json(error.status, {"success": False, "error": {
            "code": error.code, "message": error.message}}, error.headers)
        if self.close_connection and getattr(self, "body_pending", False):
            _linger(self.connection)

    # -- logging: one line per request, control characters escaped ---------------------------

    def log_request(self, code="-", size="-"):
        took = time.monotonic() - getattr(self, "started", time.monotonic())
        status = getattr(code, "value", code)
        self.server.metrics.observe_request(getattr(self, "route_label", "none"),
                                            self.command or "-", status, took)
        self.log_message('"%s" %s %.1fms', getattr(self, "requestline", ""), status,
                         took * 1000)

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s %s\n" % (serverlog.utc_iso(time.time()),
                                         self.client_address[0],
                                         serverlog.printable(options.redact(fmt % args))))


class ChunkReceiver:
    """Where one POST /api/video/upload's file part goes, and how it is stored.

    When the form's text fields came before the file part (m1client.js, the CLI uploader and
    the docs' curl examples send them so) and the chunk is the next one of its upload, the
    store reserves that upload's tail (store.reserve_append) and the parser writes the bytes
    straight into the video file: one write, no part file. Otherwise (the file part first, as
    the seed's client sent it; an early chunk, a duplicate, S3) the bytes go to
    a part file and store.put_chunk takes it from there. Either way `close()` leaves nothing
    behind: a reserved tail is aborted (a no-op once committed), part files are removed."""

    def __init__(self, handler):
        self._handler = handler
        self._store = handler.server.store
        self._writer = None          # the store's TailWriter, when the chunk goes in place
        self._reserved_for = None    # the fields it was reserved with
        self._parts = []             # (path, file) of every part file opened
        self.in_place = False

    def open_file(self, form, name, filename, content_type):
        """multipart.parse's open_file: the seed's file part in place when the store takes it
        there, anything else (and another file part) into a part file."""
        if name == "file" and self._writer is None and not self._parts:
            self._writer = self._reserve(form)
            if self._writer is not None:
                return self._writer
        return self._part_file()

    def _reserve(self, form):
        """The upload's tail for this chunk, or None: the fields so far must already be what
        the seed's form needs (the whole form is checked again once it is in)."""
        try:
            fields = self._handler.seed_fields(form)
            budget = self._handler.server.guard.check_chunk(self._handler, fields["fileId"])
        except ApiError:
            return None             # refused after the parse, in the usual order
        self._reserved_for = fields
        return self._store.reserve_append(
            fields["fileId"], fields["chunkIndex"], is_last=fields["status"] == "completed",
            mime_type=fields.get("mimeType"), checksum=fields.get("checksum"), budget=budget)

    def _part_file(self):
        path, f = self._store.new_part_file()
        self._parts.append((path, f))
        return f

    def store(self, fields, chunk):
        """The chunk stored (durable) once the whole form is in: a ChunkResult."""
        if chunk.file is self._writer and fields == self._reserved_for:
            self.in_place = True
            return self._writer.commit(chunk.size)
        budget = self._handler.server.guard.check_chunk(self._handler, fields["fileId"])
        if chunk.file is self._writer:       # a field after the file part: today's path
            path = self._writer.to_part_file()
            self._parts.append((path, None))
        else:
            path = chunk.file.name
        for _, f in self._parts:
            if f is not None:
                f.close()
        return self._store.put_chunk(
            fields["fileId"], fields["chunkIndex"], path, chunk.size,
            is_last=fields["status"] == "completed", mime_type=fields.get("mimeType"),
            checksum=fields.get("checksum"), budget=budget)

    def close(self):
        if self._writer is not None:
            self._writer.abort()
        for path, f in self._parts:
            if f is not None:
                f.close()
            self._store.discard(path)


# The routing table: path pattern -> {method: function(handler, *decoded path groups)}.
# Feature modules add their own rows (see M1Server.__init__); OPTIONS is answered for all.
CORE_ROUTES = (
    (r"/api/video/upload", {"POST": Handler.post_chunk}),
    (r"/api/video/status/([^/]+)", {"GET": Handler.get_status, "HEAD": Handler.get_status}),
    (r"/uploads/([^/]+)", {"GET": Handler.get_media, "HEAD": Handler.get_media}),
    (r"/api/video", {"GET": Handler.get_uploads, "HEAD": Handler.get_uploads}),
    (r"/api/video/([^/]+)", {"DELETE": Handler.delete_upload}),
    (r"/healthz", {"GET": Handler.get_health, "HEAD": Handler.get_health}),
    (r"/readyz", {"GET": Handler.get_ready, "HEAD": Handler.get_ready}),
    (r"/metrics", {"GET": Handler.get_metrics, "HEAD": Handler.get_metrics}),
)


class FeatureRoute:
    """A route of an optional feature, as the table holds it before the feature is loaded:
    the feature's own function for (pattern, method), found (and the feature loaded) when a
    request that passed routing and auth calls it."""

    def __init__(self, feature, pattern, method):
        self.feature, self.pattern, self.method = feature, pattern, method

    def __call__(self, handler, *groups):
        function = handler.server.features.route_function(self.feature, self.pattern,
                                                          self.method)
        return function(handler, *groups)


def feature_rows(feature, *rows):
    return tuple((pattern, dict((method, FeatureRoute(feature, pattern, method))
                                for method in methods)) for pattern, methods in rows)


# The optional features' rows, behind the core's: the patterns and methods each feature's
# routes() gives (tests/test_features.py holds them equal), so that routing, 404/405 and
# auth's rules (by route label) need no feature loaded.
FEATURE_ROUTES = (
    feature_rows("auth", (r"/api/video/tokens", ("POST",))) +
    feature_rows("events", (r"/api/video/events/([^/]+)", ("GET",))) +
    feature_rows("live", *[(re.escape(path), ("GET", "HEAD"))
                           for path, _, _ in options.LIVE_PAGE_FILES] +
                 [(r"/watch/([^/]+)", ("GET", "HEAD"))]) +
    feature_rows("tus", (r"/files/?", httphead.METHODS), (r"/files/(.+)", httphead.METHODS)) +
    feature_rows("processing", (r"/uploads/derived/([^/]+)/([^/]+)", ("GET", "HEAD"))) +
    feature_rows("webhooks", (r"/api/video/webhooks/deliveries", ("GET", "HEAD")),
                 (r"/api/video/webhooks/deliveries/([^/]+)/retry", ("POST",))))


def compile_routes(rows):
    """(regex, methods, label); the label names the route in metrics: /api/video/status/:1"""
    compiled = []
    for pattern, methods in rows:
        label, count = pattern, 0
        while "(" in label:
            count += 1
            start = label.index("(")
            label = label[:start] + (":id" if count == 1 else ":id%d" % count) + \
                label[label.index(")", start) + 1:]
        label = label.replace("\\", "")         # an escaped "." reads as "." (/m1client.js)
        compiled.append((re.compile(pattern + r"\Z"), dict(methods), label))
    return compiled


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
            "lastModified": serverlog.utc_iso(upload.updated_at),
            "state": "completed" if upload.completed else "uploading",
            "chunksReceived": upload.chunks_received, "nextChunkIndex": upload.next_index,
            "missingChunks": upload.missing_chunks(),
            "mimeType": upload.mime_type or storage.MEDIA_TYPES[upload.ext],
            "url": "/uploads/%s.%s" % (file_id, upload.ext),
            "createdAt": serverlog.utc_iso(upload.created_at)}
    if upload.last_index is not None:
        data["totalChunks"] = upload.last_index + 1
    if upload.completed:
        data["completedAt"] = serverlog.utc_iso(upload.completed_at)
        data["sha256"] = upload.sha256       # None for a moment while it is being computed
    return data


def encode_cursor(upload):
    raw = json.dumps([upload.created_at, upload.file_id]).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(text):
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        created_at, file_id = json.loads(raw.decode("utf-8"))
        if not isinstance(created_at, (int, float)) or not storage.valid_file_id(file_id):
            raise ValueError
        return float(created_at), file_id
    except (ValueError, TypeError, binascii.Error):
        raise HttpError(400, "invalid_cursor", "cursor is not one this server gave out")


def readiness_checks(config, store):
    checks = {}
    try:
        probe, f = store.new_part_file()       # where chunks are received; never via a link
        with f:
            f.write(b"ok")
        store.discard(probe)
        checks["uploadDirWritable"] = {"ok": True}
    except OSError as error:
        checks["uploadDirWritable"] = {"ok": False, "error": error.strerror or str(error)}
    except ApiError as error:                  # a link stands where the folder should be
        checks["uploadDirWritable"] = {"ok": False, "error": error.message}
    free = shutil.disk_usage(config.dir).free
    checks["freeDisk"] = {"ok": free >= config.min_free_disk_bytes, "freeBytes": free,
                          "minFreeBytes": config.min_free_disk_bytes}
    try:
        store.counts()
        checks["metadataStore"] = {"ok": True}
    except Exception as error:            # reported, not raised: readiness says why
        checks["metadataStore"] = {"ok": False, "error": str(error)}
    try:
        checks["storage"] = store.check_storage()
    except Exception as error:
        checks["storage"] = {"ok": False, "error": str(error)}
    return checks


def parse_range(value, size):
    """One `bytes=` range (RFC 9110 14.1.2) -> (start, end); None to ignore; or 'unsatisfiable'.
    Several ranges are answered with the whole file, which the RFC allows; so is a range
    whose numbers have more digits than any size (httphead.number)."""
    match = re.match(r"[ \t]*bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*\Z", value)
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = (httphead.number(group) if group else -1 for group in match.groups())
    if first is None or last is None:
        return None
    if first == -1:                          # suffix: the last N bytes
        if last == 0:
            return "unsatisfiable"
        return max(0, size - last), size - 1
    if last != -1 and last < first:
        return None
    if first >= size:
        return "unsatisfiable"
    return first, size - 1 if last == -1 else min(last, size - 1)


def etag_list_matches(values, etag):
    """If-None-Match (RFC 9110 13.1.2): `*`, or a list of entity-tags of which one matches
    `etag` by the weak comparison (W/ ignored on both sides). A list that cannot be read
    matches nothing, so the file is sent whole, which is never wrong."""
    if not values:
        return False
    text = ",".join(values).strip()
    if text == "*":
        return True
    tags, at = set(), 0
    while at < len(text):                    # 1#entity-tag; an opaque-tag may hold commas
        if text[at] in " \t,":
            at += 1
            continue
        if text.startswith("W/", at):
            at += 2
        end = text.find('"', at + 1) if text.startswith('"', at) else -1
        if end < 0 or text[end + 1:end + 2] not in ("", " ", "\t", ","):
            return False
        tags.add(text[at:end + 1])
        at = end + 1
    return (etag[2:] if etag.startswith("W/") else etag) in tags


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
    Each read waits at most the socket timeout: a silent client raises socket.timeout; so
    does one the watchdog cut off for sending too slowly (connections.py: its read ends as
    if the stream had, and `slot.cut_reason` says why).
    """

    def __init__(self, rfile, sock, length, slot=None):
        self._rfile = rfile
        self._sock = sock
        self.length = self.remaining = length
        self._slot = slot
        self._buffered = None

    def read_into(self, view):
        if self.remaining == 0:
            return 0
        want = min(len(view), self.remaining)
        if self._buffered is None:
            self._buffered = memoryview(self._rfile.read1(min(self.remaining,
                                                               RECV_DRAIN_BYTES)))
            if not self._buffered:
                self._ended()
        if self._buffered:
            n = min(want, len(self._buffered))
            view[:n] = self._buffered[:n]
            self._buffered = self._buffered[n:]
        else:
            n = self._sock.recv_into(view, want)
            if n == 0:
                self._ended()
        self.remaining -= n
        return n

    def _ended(self):
        if self._slot is not None and self._slot.cut_reason is not None:
            raise socket.timeout(self._slot.cut_reason)
        raise IncompleteBody()


def _last_item(values):
    """The last comma-separated item of a repeated header: what the nearest proxy added."""
    return values[-1].rsplit(",", 1)[-1].strip() if values else None


def _multipart_http_error(error):
    return HttpError(error.status, MULTIPART_CODES.get(error.code, error.code), error.message)


def _refuse_connection(sock, status, code, message):
    """Answer a connection we will not serve, on the accept thread: one write that never
    waits (a new socket's send buffer takes these few hundred bytes; if it cannot, or the
    socket speaks TLS, the client sees the connection close instead)."""
    body = json.dumps({"success": False, "error": {"code": code, "message": message}}).encode()
    head = ["HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase),
            "Content-Type: application/json; charset=utf-8",
            "Content-Length: %d" % len(body), "Connection: close",
            "Retry-After: %d" % REFUSAL_RETRY_AFTER_S]
    try:
        sock.setblocking(False)
        sock.send(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body)
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


class _HttpDate:
    """The Date field's value (RFC 9110 6.6.1, as http.server writes it), formatted once a
    second instead of once a reply."""

    def __init__(self):
        self._cached = (None, "")          # (whole second, its text), replaced as one

    def now(self):
        second = int(time.time())
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (second, email.utils.formatdate(second, usegmt=True))
        return cached[1]


_HTTP_DATE = _HttpDate()


def _is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


# ---------------------------------------------------------------------------------------------
# main: configure, repair, serve, stop cleanly
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    """`m1server.py [options]` serves; `m1server.py upload|gc ...` run a tool instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "upload":
        import uploader                      # only the uploader needs urllib.request
        return uploader.main(argv[1:], parse_size=parse_size)
    if argv and argv[0] == "gc":
        return collect_garbage(argv[1:])
    if argv and argv[0] == "token":
        return mint_token(argv[1:])
    return serve(argv)


def configure(parser, argv, name, serving=False):
    """Every setting parsed and checked (TLS files loaded, when serving) before anything is
    opened: (config, TLS context or None), or (None, None) once one line on stderr has said
    what is wrong."""
    args = parser.parse_args(argv)             # a malformed flag: argparse's usage line
    try:
        config = Config(args)
        problem = options.webhook_problem(config)
        if problem:
            raise ValueError(problem)
        context = tls_context(config) if serving and config.tls_cert else None
    except (ValueError, OSError) as error:       # ssl.SSLError is an OSError
        sys.stderr.write("%s: %s\n" % (name, error))
        return None, None
    return config, context


def serve(argv):
    config, context = configure(build_parser(os.environ), argv, "m1server", serving=True)
    if config is None:
        return 2
    os.makedirs(config.dir, exist_ok=True)
    dir_lock = _lock_upload_dir(config.dir)
    if dir_lock is None:
        sys.stderr.write("m1server: another m1server is using %s\n" % config.dir)
        return 2
    store = open_store(config)
    if store is None:
        return 2
    hooks = open_webhooks(config, store)         # listens before repair: it misses nothing
    mended = store.repair()
    if mended:
        log.warning("repaired %d upload(s) after a crash", mended)
    try:
        server = M1Server(config, store)
    except OSError as error:
        sys.stderr.write("m1server: cannot listen on %s:%s: %s\n"
                         % (config.host, config.port, error.strerror or error))
        store.close()
        if hooks is not None:
            hooks.close()
        return 2
    server.webhooks = hooks
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True,
                                            do_handshake_on_connect=False)
    if not _is_loopback(config.host) and not server.guard.enabled:
        sys.stderr.write("WARNING: listening on %s with no authentication: anyone who can "
                         "reach this address can upload and read videos. Set --api-key "
                         "(M1_API_KEY).\n" % config.host)
    elif not _is_loopback(config.host) and not config.tls_cert:
        sys.stderr.write("WARNING: listening on %s without TLS: the API key and tokens "
                         "travel in clear text unless a TLS proxy is in front.\n"
                         % config.host)

    def stop(signum, frame):
        if not server.stopping:
            server.stopping = True
            threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stopped = threading.Event()
    _start_sweeper(store, config, stopped)
    server.features.start()
    if hooks is not None:
        hooks.start(config.webhook_workers)
    host, port = server.server_address[:2]
    shown = "[%s]" % host if ":" in host else host
    print("m1server %s serving %s://%s:%d/ (uploads in %s%s)" % (
        VERSION, "https" if config.tls_cert else "http", shown, port, config.dir,
        ", auth on" if server.guard.enabled else ""), flush=True)
    server.serve_forever(poll_interval=0.25)
    stopped.set()
    tus, processor = server.features.loaded("tus"), server.features.loaded("processing")
    if tus is not None:
        tus.interrupt_all()          # open tus PATCHes store what they have and reply
    if processor is not None:
        processor.stop()             # ffmpeg stopped now; its job runs again at the next start
    finished = server.wait_for_in_flight(SHUTDOWN_GRACE_S)
    server.server_close()
    if tus is not None:
        tus.close()
    store.close()
    if processor is not None:
        processor.close()
    if server.webhooks is not None:
        server.webhooks.close()      # after the store: a late "completed" is still queued
    sys.stderr.write("m1server stopped%s\n" % ("" if finished else
                                               " (some requests were still running)"))
    return 0


def open_webhooks(config, store):
    """webhooks.Webhooks when --webhook-url names a receiver, else None (not imported)."""
    if not options.unique(config.webhook_urls):
        return None
    import webhooks
    return webhooks.Webhooks(config, store)


def tls_context(config):
    """Server-side TLS with the ssl module's modern defaults, TLS 1.2 at least."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_COMPRESSION", 0)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except OSError as error:
        raise ValueError("cannot use --tls-cert/--tls-key: %s" % error)
    return context


def mint_token(argv):
    """`m1server.py token --file-id ID ...`: print a token as POST /api/video/tokens would
    (same --api-key/--secret and their env twins as the server), without a server."""
    import auth
    parser = build_parser(os.environ)
    parser.prog = "m1server.py token"
    parser.description = "Mint an upload/read token, signed like the server's (auth.py)."
    scope = parser.add_argument_group("token")
    scope.add_argument("--file-id", help="the one upload the token is for")
    scope.add_argument("--file-id-prefix", help="or: every fileId starting with this")
    scope.add_argument("--rights", default="upload,read", help="upload, read or upload,read")
    scope.add_argument("--expires-in", type=parse_duration, default=auth.DEFAULT_EXPIRES_IN_S,
                       help="lifetime (e.g. 3600, 30m, 24h; default 1h)")
    scope.add_argument("--max-bytes", type=parse_size, default=None,
                       help="byte budget of the upload (default --max-upload-size)")
    args = parser.parse_args(argv)
    try:
        config = Config(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if not (config.api_key or config.secret):
        parser.error("give --api-key, --api-key-file or --secret (or M1_API_KEY, M1_SECRET)")
    body = {"rights": [r for r in args.rights.split(",") if r.strip()],
            "expiresIn": int(args.expires_in)}
    if args.file_id is not None:
        body["fileId"] = args.file_id
    if args.file_id_prefix is not None:
        body["fileIdPrefix"] = args.file_id_prefix
    body["maxBytes"] = config.max_upload_bytes if args.max_bytes is None else args.max_bytes
    try:
        file_id, prefix, rights, expires_in, max_bytes = auth.token_request(
            json.dumps(body).encode(), config.max_upload_bytes)
    except ApiError as error:
        parser.error(error.message)
    guard = auth.Guard(config.api_key, config.secret)
    token, expires = guard.signer.mint(rights, expires_in, file_id, prefix, max_bytes)
    data = {"token": token, "expiresAt": serverlog.utc_iso(expires), "rights": rights,
            "maxBytes": max_bytes}
    data["fileId" if file_id is not None else "fileIdPrefix"] = file_id or prefix
    print(json.dumps({"success": True, "data": data}))
    return 0


def collect_garbage(argv):
    """`m1server.py gc`: apply --incomplete-ttl and --retention once, then exit."""
    parser = build_parser(os.environ)
    parser.prog = "m1server.py gc"
    parser.description = ("Remove expired uploads from --dir once (what the server's "
                          "background sweep does), then exit. Refuses while a server uses "
                          "the folder: the server's own sweep does it then.")
    config, _ = configure(parser, argv, "m1server gc")
    if config is None:
        return 2
    config.one_shot = True
    if not os.path.isdir(config.dir):
        sys.stderr.write("m1server gc: %s does not exist\n" % config.dir)
        return 2
    dir_lock = _lock_upload_dir(config.dir)
    if dir_lock is None:
        sys.stderr.write("m1server gc: a server is running on %s; its background sweep "
                         "removes expired uploads\n" % config.dir)
        return 2
    store = open_store(config)
    if store is None:
        return 2
    hooks = open_webhooks(config, store)         # queues the events; the server delivers them
    try:
        store.repair()
        deleted = store.sweep(config.incomplete_ttl, config.retention)
    finally:
        store.close()
        if hooks is not None:
            hooks.close()
    print(json.dumps({"deleted": deleted}))
    return 0


def open_store(config):
    """The storage backend --storage names: the local folder, or S3 (s3store.py). None, with
    the reason on stderr, when the settings cannot work."""
    if config.storage == "local":
        return ChunkStore(config.dir, allow_any_content=config.allow_any_content,
                          max_upload_bytes=config.max_upload_bytes, crash_at=config.crash_at,
                          journal_chunk_bytes=config.journal_chunk_bytes,
                          min_free_bytes=config.min_free_disk_bytes,
                          state_cache=config.upload_state_cache,
                          writer_wait_s=config.timeout, chunk_records=config.chunk_records)
    import s3client                       # only S3 mode needs http.client, hmac, xml
    import s3store
    try:
        return s3store.open_store(config)
    except s3client.S3ConfigError as error:
        sys.stderr.write("m1server: --storage %s: %s\n" % (config.storage, error))
        return None


def _start_sweeper(store, config, stopped):
    """Retention in the background: once at start, then every --sweep-interval seconds."""
    if config.incomplete_ttl is None and config.retention is None:
        return

    def sweep_forever():
        while True:
            try:
                store.sweep(config.incomplete_ttl, config.retention)
            except ApiError as error:          # e.g. the object store is down: say so, retry
                log.warning("retention sweep failed: %s", error.message)
            except Exception:
                log.exception("retention sweep failed")
            if stopped.wait(config.sweep_interval):
                return

    threading.Thread(target=sweep_forever, name="m1-sweeper", daemon=True).start()


def _lock_upload_dir(directory):
    """Hold an exclusive lock on <dir>/m1.lock for the life of the process, so that two
    servers (or a server and `gc`) never repair or delete under each other. Returns the open
    lock file, or None when another process holds it. Where the OS has no such lock, the
    lock is not taken and a warning is logged."""
    f = open(os.path.join(directory, "m1.lock"), "a+b")
    try:
        import fcntl
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        try:
            import msvcrt
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except ImportError:
            log.warning("no file locking here: run one server per upload folder")
        except OSError:
            f.close()
            return None
    except OSError:
        f.close()
        return None
    return f


if __name__ == "__main__":
    sys.exit(main())
