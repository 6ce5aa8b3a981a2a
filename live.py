"""live.py - watching a recording while it is being made: the live media stream, the watch page
and the uploads dashboard (issue 18).

Routes:
  GET /uploads/<fileId>.<ext>?live=1   the upload's bytes so far, then each new in-order chunk's
                                       bytes as they are appended, in one open response
  GET /watch/<fileId>                  static/watch.html: plays that stream, then the processed
                                       video (static/watch.js)
  GET /dashboard                       static/dashboard.html: every upload, its state, play,
                                       download, delete, webhook deliveries (dashboard.js)

The live stream (HTTP/1.1 chunked transfer coding, RFC 9112 7.1; an HTTP/1.0 client gets the
same bytes with the end of the connection as the end of the body):
  * It starts with the upload's assembled prefix, then sends every byte the store appends, in
    order, exactly once: the body is always a prefix of the final file, and at completion it
    is the file. A media player reads it as a progressive download of a growing WebM or
    fragmented MP4 (what MediaRecorder writes); the watch page feeds it to MediaSource.
  * It ends with the terminating chunk, and a trailer `M1-Live-End` saying why: `completed`
    (every byte was sent), `deleted`, `idle` (no new chunk for --live-idle-timeout), `shutdown`
    (SIGTERM) or `token_expired` (the stream's read token expired, as events.py does). A
    failure after the 200 (the store stopped answering) closes the connection without the
    terminating chunk, so the client knows the body is cut short.
  * Range is ignored (RFC 9110 14.2 lets a server send the whole representation with a 200):
    a live body has no length to take a range of, and a <video> asks for `bytes=0-` first.
    The answer says `Accept-Ranges: none`; the plain URL (without ?live=1) keeps Range, ETag
    and If-None-Match. HEAD answers the headers a GET would get and holds no viewer slot.
  * A viewer wakes when the store tells (its "chunk", "completed" and "deleted" events, through
    store.add_listener), never by polling, in local mode. With a shared store (S3, several
    nodes) the node that stored a chunk wakes its own viewers at once; viewers on the other
    nodes see it at their next look at the bucket, every SHARED_POLL_S (so they run up to that
    much behind). One look serves every viewer of that upload on this node (_Feed), and so
    does one read of the new bytes.

Why a thread per viewer is fine here: each viewer holds its connection's handler thread, as
an event stream does, waiting in select() (no CPU while idle, no --timeout per-read limit).
Viewers are capped by --live-max-viewers (503 beyond, with Retry-After), which must stay below
--max-connections, so uploads always find a connection; a viewer that stops reading is cut
off after --timeout of a stalled write (the kernel send buffer is kept small), an idle upload
ends its streams after --live-idle-timeout, and a stopping server ends every stream at once.
bench/bench_live.py measures what a viewer costs (RSS) and how late bytes arrive.

What it does not do: seek inside a live stream, transcode, or keep a stream open for an
upload that does not exist yet (404: the watch page asks again). Credentials are checked by
auth.py before the route runs: the stream needs the `read` right for that fileId (`?token=`
works, as for any media URL); the pages are public, and the data they show is not.
"""
from __future__ import annotations

import re
import selectors
import socket
import threading
import time

import events
import options
import serverlog
import storage
from apierror import ApiError

log = serverlog.Logger("m1server.live")

# ---------------------------------------------------------------------------------------------
# Limits (the flags' defaults are in options.py; these are not flags)
# ---------------------------------------------------------------------------------------------

SHARED_POLL_S = 0.5                  # shared store: how often a watched upload is looked at
READ_BLOCK_BYTES = 256 << 10         # most bytes read from the store, and sent, at once
SEND_BUFFER_BYTES = 64 << 10         # kernel send buffer of a live connection
END_TRAILER = "M1-Live-End"

WATCH_PAGE = ("static/watch.html", "text/html; charset=utf-8")


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------

def routes(read_resource, static_file):
    """Route rows for m1server's table. `static_file(name, content_type, read_resource)` makes
    a handler for a shipped file (webclient.StaticFile). The live stream itself is reached
    through GET /uploads/... (httpapi.Handler.get_media calls serve_live)."""
    rows = [(re.escape(path), {"GET": static_file(name, content_type, read_resource),
                               "HEAD": static_file(name, content_type, read_resource)})
            for path, name, content_type in options.LIVE_PAGE_FILES]
    page = static_file(WATCH_PAGE[0], WATCH_PAGE[1], read_resource)

    def watch_page(handler, file_id):
        if not storage.valid_file_id(file_id):
            raise ApiError(404, "not_found", "no such upload: fileId must match "
                           "[A-Za-z0-9_-]{1,128}")
        page(handler)

    rows.append((r"/watch/([^/]+)", {"GET": watch_page, "HEAD": watch_page}))
    return tuple(rows)


def serve_live(handler, file_id, ext):
    """GET /uploads/<fileId>.<ext>?live=1: find the upload (404) -> HEAD: the headers ->
    join (503 past the cap) -> 200 and the bytes so far -> each new chunk's bytes -> the end."""
    store = handler.server.store
    upload = store.status(file_id) if storage.valid_file_id(file_id) else None
    if upload is None or ext != upload.ext:
        raise ApiError(404, "not_found", "no such video")
    stream = _LiveResponse(handler, storage.MEDIA_TYPES.get(ext, "application/octet-stream"))
    if handler.command == "HEAD":
        return stream.open()
    viewer = handler.server.live.join(file_id)
    try:
        stream.open()
        _Viewing(handler, viewer, upload, stream).run()
    finally:
        viewer.leave()


# ---------------------------------------------------------------------------------------------
# The hub: every viewer, grouped by upload; woken by the store's events
# ---------------------------------------------------------------------------------------------

class LiveHub:
    """The live viewers of one server. Thread-safe. `on_store_event` is a store listener."""

    def __init__(self, store, max_viewers, idle_timeout_s, shared):
        self.store = store
        self.max_viewers = max_viewers
        self.idle_timeout_s = idle_timeout_s
        # Local mode: every change is this process's own and comes as an event, so a viewer
        # waits for events alone. A shared store also changes under other nodes: look again.
        self.poll_s = SHARED_POLL_S if shared else None
        self.closed = False
        self._lock = threading.Lock()        # guards _feeds, _count and closed
        self._feeds = {}                     # fileId -> _Feed, while it has viewers
        self._count = 0

    @classmethod
    def from_config(cls, config, store, shared):
        """`shared`: other nodes change the store's uploads too (S3)."""
        return cls(store, config.live_max_viewers, config.live_idle_timeout, shared)

    @property
    def viewer_count(self):
        with self._lock:
            return self._count

    def join(self, file_id):
        """A new viewer of `file_id`; ApiError 503 past the cap or while stopping."""
        with self._lock:
            if self.closed:
                raise ApiError(503, "shutting_down", "server is shutting down; retry shortly",
                               {"Retry-After": "2"})
            if self._count >= self.max_viewers:
                raise ApiError(503, "too_many_viewers", "%d live viewers are watching "
                               "(--live-max-viewers); retry later, or play the video once it "
                               "is complete" % self._count, {"Retry-After": "5"})
            feed = self._feeds.get(file_id)
            if feed is None:
                feed = self._feeds[file_id] = _Feed(file_id)
            viewer = _Viewer(self, feed)
            feed.viewers.add(viewer)
            self._count += 1
        return viewer

    def _leave(self, viewer):
        with self._lock:
            feed = viewer.feed
            if viewer in feed.viewers:
                feed.viewers.discard(viewer)
                self._count -= 1
                if not feed.viewers:
                    del self._feeds[feed.file_id]
        viewer.close_sockets()

    def on_store_event(self, event):
        """A chunk was stored, an upload completed or was deleted: wake its viewers. Returns
        at once (the store calls this under the upload's lock)."""
        with self._lock:
            feed = self._feeds.get(event.get("fileId"))
            viewers = list(feed.viewers) if feed is not None else ()
        if feed is not None:
            feed.changed()
        for viewer in viewers:
            viewer.wake()

    def close(self):
        """Server shutdown (a stop hook): refuse new viewers, end every stream now."""
        with self._lock:
            self.closed = True
            viewers = [v for feed in self._feeds.values() for v in feed.viewers]
        for viewer in viewers:
            viewer.wake()


class _Feed:
    """What the viewers of one upload share: the last status read and the last block read, so
    that N viewers cost one store read per change, not N (on S3 each read is a request)."""

    def __init__(self, file_id):
        self.file_id = file_id
        self.viewers = set()                 # guarded by the hub's lock
        self._io_lock = threading.Lock()     # one store read at a time for this upload
        self._changes = 0                    # store events seen (an int: += under the GIL
        self._status = None                  # is not atomic, hence _changes_lock)
        self._status_changes = -1
        self._status_at = 0.0
        self._block = None                   # (created_at, offset, bytes)
        self._changes_lock = threading.Lock()

    def changed(self):
        with self._changes_lock:
            self._changes += 1

    def status(self, store, max_age_s):
        """The upload's state: the one read last, unless an event came since or it is older
        than `max_age_s` (None: only an event makes it old)."""
        with self._io_lock:
            with self._changes_lock:
                changes = self._changes
            fresh = self._status_changes == changes and (
                max_age_s is None or time.monotonic() - self._status_at < max_age_s)
            if not fresh:
                self._status = store.status(self.file_id)
                self._status_changes, self._status_at = changes, time.monotonic()
            return self._status

    def read(self, store, upload, offset, max_bytes):
        """store.read_appended, served from the last block when it holds `offset`."""
        with self._io_lock:
            block = self._block
            if block is not None and block[0] == upload.created_at and \
                    block[1] <= offset < block[1] + len(block[2]):
                start = offset - block[1]
                return block[2][start:start + max_bytes]
            data = store.read_appended(upload, offset, max_bytes)
            self._block = (upload.created_at, offset, data) if data else None
            return data


class _Viewer:
    """One viewer: a wake-up socket pair its connection thread waits on with the client's
    socket (as events.Subscription has)."""

    def __init__(self, hub, feed):
        self.hub = hub
        self.feed = feed
        self.wake_socket, self._wake_sender = socket.socketpair()
        self.wake_socket.setblocking(False)
        self._wake_sender.setblocking(False)

    def wake(self):
        try:
            self._wake_sender.send(b"\0")
        except OSError:
            pass                             # full (already awake) or closed (already gone)

    def drain(self):
        try:
            while self.wake_socket.recv(4096):
                pass
        except OSError:
            pass

    def leave(self):
        self.hub._leave(self)

    def close_sockets(self):
        self.wake_socket.close()
        self._wake_sender.close()


# ---------------------------------------------------------------------------------------------
# One live response
# ---------------------------------------------------------------------------------------------

class _LiveResponse:
    """The 200's headers and body framing: chunked for HTTP/1.1, close-delimited for 1.0."""

    def __init__(self, handler, content_type):
        self.handler = handler
        self.sock = handler.connection
        self.content_type = content_type
        self.chunked = handler.request_version != "HTTP/1.0"

    def open(self):
        handler = self.handler
        if handler.command != "HEAD":
            handler.close_connection = True  # the stream's end frees the thread
        headers = {"Content-Type": self.content_type, "Cache-Control": "no-store",
                   "Accept-Ranges": "none", "X-Accel-Buffering": "no"}
        if self.chunked:
            headers.update({"Transfer-Encoding": "chunked", "Trailer": END_TRAILER})
        handler.send_response(200)
        handler.send_headers(headers)
        if handler.command != "HEAD":
            events.limit_send_buffer(self.sock, SEND_BUFFER_BYTES)

    def send(self, data):
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.sock.sendall(data)

    def end(self, reason):
        if self.chunked:
            self.sock.sendall(b"0\r\n%s: %s\r\n\r\n" % (END_TRAILER.encode("ascii"),
                                                        reason.encode("ascii")))


class _Viewing:
    """One viewer's loop: send what the store has beyond what was sent, then wait for the next
    change (an event, a poll of a shared store), the client leaving, or a deadline."""

    def __init__(self, handler, viewer, upload, stream):
        self.handler = handler
        self.viewer = viewer
        self.hub = viewer.hub
        self.store = handler.server.store
        self.stream = stream
        self.created_at = upload.created_at   # a new upload under the same id is not this one
        self.sent = 0
        self.empty_reads = 0                  # reads that found nothing in a row
        self.chunks_seen = upload.chunks_received
        self.idle_until = time.monotonic() + self.hub.idle_timeout_s
        expires = getattr(getattr(handler, "grant", None), "expires", None)
        self.ends_at = (None if expires is None
                        else time.monotonic() + max(0.0, expires - time.time()))

    def run(self):
        selector = events.new_selector()
        selector.register(self.stream.sock, selectors.EVENT_READ, "client")
        selector.register(self.viewer.wake_socket, selectors.EVENT_READ, "wake")
        try:
            reason = self.follow(selector)
            if reason is not None:
                self.stream.end(reason)
        except (OSError, ConnectionError):
            return                           # the client left, died or stopped reading
        except ApiError as error:            # the store failed after the 200: cut it short
            log.warning("live stream of %s stopped: %s", self.viewer.feed.file_id,
                        error.message)
        except Exception:
            log.exception("live stream of %s failed", self.viewer.feed.file_id)
        finally:
            selector.close()

    def follow(self, selector):
        """Returns why the stream ends (the trailer's reason), or None when the client left."""
        feed = self.viewer.feed
        while True:
            if self.hub.closed:
                return "shutdown"
            upload = feed.status(self.store, self.hub.poll_s)
            if upload is None or upload.created_at != self.created_at:
                return "deleted"
            if upload.bytes_appended > self.sent:
                self.send_more(feed, upload)
                continue
            if upload.completed:
                return "completed"
            if upload.chunks_received != self.chunks_seen:   # an early chunk counts too
                self.chunks_seen = upload.chunks_received
                self.idle_until = time.monotonic() + self.hub.idle_timeout_s
            reason = self.wait(selector)
            if reason != "wake":
                return reason

    def send_more(self, feed, upload):
        data = feed.read(self.store, upload, self.sent, READ_BLOCK_BYTES)
        if not data:
            # The status said more; the store has none: the upload was deleted since (the
            # next status says so), or the store lost bytes (twice in a row: give up).
            if self.empty_reads:
                raise ApiError(503, "storage_unavailable", "the store holds fewer bytes "
                               "than its status says (%d)" % upload.bytes_appended)
            self.empty_reads += 1
            feed.changed()
            return
        self.empty_reads = 0
        self.stream.send(data)
        self.sent += len(data)
        self.idle_until = time.monotonic() + self.hub.idle_timeout_s

    def wait(self, selector):
        """Until something may have changed ("wake"), or a reason to end (None: client gone)."""
        now = time.monotonic()
        wake_at = min(t for t in (self.idle_until, self.ends_at,
                                  now + self.hub.poll_s if self.hub.poll_s else None)
                      if t is not None)
        for key, _ in selector.select(max(0.0, wake_at - now)):
            if key.data == "wake":
                self.viewer.drain()
            elif not self._client_still_there():
                return None
        now = time.monotonic()
        if self.ends_at is not None and now >= self.ends_at:
            return "token_expired"
        if now >= self.idle_until:
            return "idle"
        return "wake"

    def _client_still_there(self):
        """A viewer sends nothing after its request: readable means it went away (or sent
        bytes we ignore; the connection closes after the stream anyway)."""
        try:
            return bool(self.stream.sock.recv(4096))
        except socket.timeout:
            return True
        except OSError:
            return False
