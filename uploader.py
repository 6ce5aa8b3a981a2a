"""uploader.py - `python3 m1server.py upload FILE --server URL`: a resumable command-line uploader.

It sends FILE to an m1server as the browser does, with the seed API: numbered chunks, each a
`multipart/form-data` POST to /api/video/upload with a sha256 checksum, the last one with
status=completed. Before sending it asks GET /api/video/status/<fileId> and starts at
`nextChunkIndex` at byte `fileSize` (the server's assembled length), so running it again after
an interruption (network, server restart, Ctrl-C), even with another --chunk-size, never
resends a chunk the server acknowledged. A finished upload is checked against the file by
size and sha256. Transient failures (connection errors, 408,
429, 5xx) are retried with exponential backoff and jitter; anything else stops it with a clear
message and exit status 1.

With --follow it uploads a file that is still being written (a camera's recording): it sends
each full chunk as soon as it is on disk and, once the file has stopped growing for
--follow-idle seconds, the rest as the last chunk.

Standard library only (urllib). It does not hold more than one chunk in memory.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
import uuid

DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_RETRIES = 10                 # attempts per request before giving up
BACKOFF_FIRST_S = 0.5                # first wait; doubles each retry
BACKOFF_MAX_S = 30.0
REQUEST_TIMEOUT_S = 120.0
FOLLOW_POLL_S = 0.2                  # how often --follow looks at the file's size
DEFAULT_FOLLOW_IDLE_S = 5.0
RETRYABLE_STATUSES = (408, 429, 500, 502, 503, 504, 507)


class UploadFailed(Exception):
    """A failure the user must act on; its message is printed as is."""


def main(argv, prog="m1server.py upload", parse_size=None):
    args = _parser(prog, parse_size).parse_args(argv)
    try:
        upload = Upload(args.file, args.server, file_id=args.file_id,
                        chunk_bytes=args.chunk_size, mime_type=args.mime_type,
                        retries=args.retries, progress=Progress(sys.stderr, args.quiet),
                        token=args.token or os.environ.get("M1_TOKEN"))
        result = upload.run(follow=args.follow, follow_idle=args.follow_idle)
    except UploadFailed as error:
        sys.stderr.write("\nupload failed: %s\n" % error)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted; run the same command again to resume\n")
        return 130
    print(json.dumps(result))
    return 0


def _parser(prog, parse_size):
    parser = argparse.ArgumentParser(
        prog=prog, description="Upload a video file to an m1server in resumable chunks. Run "
        "the same command again after an interruption and it resumes where the server is.")
    parser.add_argument("file", help="the video file to send")
    parser.add_argument("--server", required=True, help="the server's base URL, e.g. "
                        "http://127.0.0.1:3001")
    parser.add_argument("--file-id", help="the upload's id (default: derived from the file's "
                        "path and inode, so a rerun resumes the same upload)")
    parser.add_argument("--chunk-size", type=parse_size or int, default=DEFAULT_CHUNK_BYTES,
                        help="bytes per chunk, e.g. 1M (default 4M); must not exceed the "
                        "server's --max-chunk-size")
    parser.add_argument("--mime-type", help="the video's type (default: from the file name: "
                        ".webm video/webm, .mp4 video/mp4, .mkv, .mov, .ogg)")
    parser.add_argument("--follow", action="store_true",
                        help="the file is still being written: upload as it grows and finish "
                        "once it has not grown for --follow-idle seconds")
    parser.add_argument("--follow-idle", type=float, default=DEFAULT_FOLLOW_IDLE_S,
                        help="seconds without growth that mean the writer is done (default 5)")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                        help="attempts per request before giving up (default 10)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--token", help="credential for a server with --api-key: a token "
                        "with upload and read rights for this fileId (or the key); prefer "
                        "the env M1_TOKEN, flags show in ps")
    return parser


MIME_TYPES = {".webm": "video/webm", ".mp4": "video/mp4", ".m4v": "video/mp4",
              ".mkv": "video/x-matroska", ".mov": "video/quicktime", ".ogg": "video/ogg",
              ".ogv": "video/ogg"}


def default_file_id(path):
    """Stable across runs for the same file: its name, plus a hash of where it lives."""
    st = os.stat(path)
    where = "%s|%d|%d" % (os.path.realpath(path), st.st_dev, st.st_ino)
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(os.path.basename(path))[0])[:80]
    return "cli_%s_%s" % (stem or "video", hashlib.sha1(where.encode()).hexdigest()[:12])


class Upload:
    def __init__(self, path, server, file_id=None, chunk_bytes=DEFAULT_CHUNK_BYTES,
                 mime_type=None, retries=DEFAULT_RETRIES, progress=None, token=None):
        if not os.path.isfile(path):
            raise UploadFailed("%s is not a file" % path)
        if chunk_bytes < 1:
            raise UploadFailed("--chunk-size must be at least 1 byte")
        self.path = path
        self.server = server.rstrip("/")
        self.file_id = file_id or default_file_id(path)
        if not re.match(r"[A-Za-z0-9_-]{1,128}\Z", self.file_id):
            raise UploadFailed("--file-id must match [A-Za-z0-9_-]{1,128}")
        self.chunk_bytes = chunk_bytes
        self.mime_type = mime_type or MIME_TYPES.get(os.path.splitext(path)[1].lower())
        self.retries = max(1, retries)
        self.progress = progress or Progress(None, True)
        self.sent_chunks = 0             # chunks this run actually sent (resume leaves some out)
        self.token = token               # sent as Authorization: Bearer (auth.py)

    def run(self, follow=False, follow_idle=DEFAULT_FOLLOW_IDLE_S):
        status = self.status()
        if status.get("state") == "completed":
            return self._finished(status, already=True)
        self._check_server_limits()
        # Resume where the server's file ends: chunk numbers continue from nextChunkIndex,
        # bytes from fileSize, whatever chunk size the earlier run used.
        index, offset = status.get("nextChunkIndex", 0), status.get("fileSize", 0)
        self.progress.start(self.file_id, offset, self._size())
        with open(self.path, "rb") as f:
            while True:
                f.seek(offset)
                data, last = self._next_chunk(f, offset, follow, follow_idle)
                reply = self._send(index, data, last)
                self.sent_chunks += 1
                self.progress.update(reply.get("bytesReceived", 0), self._size(), index)
                if reply.get("status") == "completed":
                    break
                if last:
                    raise UploadFailed("the server still misses chunks %s after the last one"
                                       % reply.get("missingChunks"))
                index, offset = reply["nextChunkIndex"], reply["bytesReceived"]
        return self._finished(self.status(), already=False)

    def _check_server_limits(self):
        """Refuse a --chunk-size the server would refuse (it says its limits in /healthz)."""
        limits = self._request("GET", "/healthz").get("limits") or {}
        largest = limits.get("maxChunkBytes")
        if largest is not None and self.chunk_bytes > largest:
            raise UploadFailed("--chunk-size %d is over the server's limit of %d bytes "
                               "(HTTP 413 chunk_too_large); use --chunk-size %d or less"
                               % (self.chunk_bytes, largest, largest))

    def _size(self):
        return os.path.getsize(self.path)

    def _next_chunk(self, f, start, follow, follow_idle):
        """(bytes of the chunk at `start`, whether it is the last). With follow, it waits for
        the writer to add a whole chunk, or to stop."""
        if not follow:
            data = f.read(self.chunk_bytes)
            return data, start + len(data) >= self._size()
        last_size, last_growth = -1, time.monotonic()
        while True:
            size = self._size()
            if size != last_size:
                last_size, last_growth = size, time.monotonic()
            if size - start >= self.chunk_bytes:
                return f.read(self.chunk_bytes), False
            if time.monotonic() - last_growth >= follow_idle:
                return f.read(self.chunk_bytes), True      # the writer stopped: the rest
            time.sleep(FOLLOW_POLL_S)

    def _finished(self, status, already):
        changed = status.get("fileSize") != self._size()
        if not changed and status.get("sha256"):
            changed = status["sha256"] != _sha256_of(self.path)
        if changed:
            raise UploadFailed("the server's copy (%s bytes) differs from %s (%d bytes): the "
                               "file changed since it was uploaded (use another --file-id)"
                               % (status.get("fileSize"), self.path, self._size()))
        self.progress.done(already)
        return {"fileId": self.file_id, "fileSize": status.get("fileSize"),
                "url": self.server + status.get("url", ""), "chunksSent": self.sent_chunks,
                "alreadyComplete": already}

    # -- HTTP, with retries --------------------------------------------------------------

    def status(self):
        return self._request("GET", "/api/video/status/" + self.file_id)

    def _send(self, index, data, last):
        fields = [("fileId", self.file_id), ("chunkIndex", str(index)),
                  ("status", "completed" if last else "uploading"),
                  ("checksum", "sha256:" + hashlib.sha256(data).hexdigest())]
        if self.mime_type:
            fields.append(("mimeType", self.mime_type))
        body, content_type = encode_form(fields, data)
        return self._request("POST", "/api/video/upload", body, content_type)

    def _request(self, method, path, body=None, content_type=None):
        for attempt in range(1, self.retries + 1):
            request = urllib.request.Request(self.server + path, data=body, method=method)
            if content_type:
                request.add_header("Content-Type", content_type)
            if self.token:
                request.add_header("Authorization", "Bearer " + self.token)
            try:
                with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                    return json.loads(response.read().decode("utf-8"))["data"]
            except urllib.error.HTTPError as error:
                reason = _error_text(error)
                if error.code not in RETRYABLE_STATUSES:
                    raise UploadFailed("%s %s: HTTP %d %s" % (method, path, error.code, reason))
            except (urllib.error.URLError, http.client.HTTPException, OSError,
                    ValueError) as error:
                reason = str(getattr(error, "reason", error))
            if attempt == self.retries:
                raise UploadFailed("%s %s failed %d times, last: %s" % (method, path,
                                                                       attempt, reason))
            wait = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (attempt - 1))
            wait *= random.uniform(0.5, 1.0)          # jitter: clients do not retry in step
            self.progress.note("retrying in %.1fs (%s)" % (wait, reason))
            time.sleep(wait)     # then the same request again: a chunk that did arrive
        raise UploadFailed("no attempt made")   # is acknowledged as a duplicate


def _sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _error_text(error):
    try:
        payload = json.loads(error.read().decode("utf-8"))
        return "%s: %s" % (payload["error"]["code"], payload["error"]["message"])
    except Exception:
        return error.reason


def encode_form(fields, data):
    """A multipart/form-data body (RFC 7578) with the text `fields` and the chunk as `file`."""
    boundary = "m1-" + uuid.uuid4().hex
    head = []
    for name, value in fields:
        head.append('--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                    % (boundary, name, value))
    head.append('--%s\r\nContent-Disposition: form-data; name="file"; filename="blob"\r\n'
                'Content-Type: application/octet-stream\r\n\r\n' % boundary)
    tail = "\r\n--%s--\r\n" % boundary
    body = "".join(head).encode("utf-8") + data + tail.encode("ascii")
    return body, "multipart/form-data; boundary=" + boundary


class Progress:
    """A progress bar on a terminal; plain lines (one per chunk) anywhere else."""

    def __init__(self, stream, quiet):
        self.stream = None if quiet else stream
        self.tty = bool(self.stream) and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.monotonic()
        self.first = 0

    def start(self, file_id, resumed_at, size):
        self.first = resumed_at
        self._line("uploading %s (%d bytes)%s" % (file_id, size, (
            ", resuming at byte %d" % resumed_at) if resumed_at else ""))

    def update(self, done, size, index):
        rate = (done - self.first) / max(time.monotonic() - self.started, 1e-6) / 1e6
        if self.tty:
            width = 30
            filled = width if not size else int(width * min(done, size) / size)
            self.stream.write("\r[%s%s] %5.1f%% %7.2f MB/s chunk %d" % (
                "#" * filled, "." * (width - filled), 100.0 * done / size if size else 100.0,
                rate, index))
            self.stream.flush()
        else:
            self._line("chunk %d acknowledged: %d/%d bytes" % (index, done, size))

    def note(self, text):
        self._line(text)

    def done(self, already):
        self._line("already complete on the server" if already else "upload complete")

    def _line(self, text):
        if self.stream:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()
