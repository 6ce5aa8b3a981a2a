"""webhooks.py - signed, retried notifications to the application's backend (SPEC §6, issue 10).

When an upload completes, fails or is deleted (and, once processing is wired in, when a video
is ready or failed), m1server POSTs a JSON event to every `--webhook-url`:

    {"id": "evt_...", "type": "upload.completed", "createdAt": "2024-...Z", "data": {...}}
    M1-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

What it guarantees:
  * At least once. An event and one delivery row per URL are committed (fsync) to
    `<dir>/webhooks.sqlite3` before the first attempt; a delivery leaves `pending` only when a
    receiver answered 2xx (`delivered`) or it can no longer succeed (`failed`). Pending
    deliveries resume after a restart or a crash, at the time they were due.
  * A stable event `id`: every attempt of every delivery of one event sends the same body, so
    receivers drop duplicates by id. `upload.completed` has an id derived from the upload and
    its completion time, so publishing it twice (start-up catch-up, below) queues it once.
  * Retries with exponential backoff on connection errors, timeouts, 5xx, 408 and 429: the
    n-th retry waits min(1 h, 1 s x 2^(n-1)) minus up to 20 % jitter, for up to
    `--webhook-retry-for` (24 h) after the event. Other 4xx, 3xx (redirects are never followed)
    and anything else are final failures. Each attempt takes at most `--webhook-timeout`.
  * Isolation: each URL has its own `--webhook-workers` threads (2), started once; a pending
    delivery is a row on disk and an entry in its URL's in-memory heap, never a thread. A slow
    or dead receiver only delays its own deliveries; uploads never wait for any receiver
    (the store's listener writes one row and returns; "chunk" events are ignored).
  * Catch-up: the store fires "completed" after it recorded the sha256; a crash between the
    two would lose the event, so at start-up every upload completed within the retry window
    (and after this queue was created) that has no `upload.completed` event gets one.

The event its reasons come from (the store's own events, storage.EventSource.add_listener):
  completed                          -> upload.completed {fileId, size, sha256, mimeType, url,
                                                          completedAt}
  deleted, reason "requested"        -> upload.deleted {fileId, reason: "requested"}
  deleted, reason "expired", complete-> upload.deleted {fileId, reason: "retention"}
  deleted, reason "expired", not yet -> upload.failed {fileId, reason: "incomplete_expired"}
  publish("video.ready"|"video.failed", fileId, data) from the processing module.

What it does not do: follow redirects, honour Retry-After, guarantee order between events
(retries reorder them; use createdAt), or keep history forever (finished deliveries older
than HISTORY_S are pruned). An `upload.deleted`/`upload.failed` is queued just after the
store committed the deletion; a crash in that instant loses that one notification (the store
keeps no tombstone to catch up from). DNS lookups are not bounded by the attempt timeout.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import heapq
import hmac
import json
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from urllib.parse import parse_qs, unquote, urlsplit

import httphead
import serverlog
import storage
from apierror import ApiError
from options import unique

log = serverlog.Logger("m1server.webhooks")

# ---------------------------------------------------------------------------------------------
# Constants (the tunable ones are flags: httpapi.py's OPTIONS table, defaults in options.py)
# ---------------------------------------------------------------------------------------------

EVENT_TYPES = ("upload.completed", "upload.failed", "upload.deleted", "video.ready",
               "video.failed")
DATABASE_NAME = "webhooks.sqlite3"
SCHEMA_VERSION = 1
SIGNATURE_HEADER = "M1-Signature"
USER_AGENT = "m1server-webhooks/1"

FIRST_RETRY_S = 1.0                 # the first retry waits about this long...
MAX_RETRY_DELAY_S = 3600.0          # ...then twice as long each time, up to this
JITTER_FRACTION = 0.2               # each wait is shortened by up to this fraction, at random
MAX_RESPONSE_HEAD_BYTES = 64 << 10  # we read the status line and headers, never the body
MAX_ERROR_CHARS = 300
HISTORY_S = 7 * 86400               # finished deliveries are kept this long (at least 2 x
PRUNE_INTERVAL_S = 3600.0           # the retry window), pruned at most this often
MAX_IDLE_WAIT_S = 60.0              # a worker re-reads the clock at least this often
STOP_GRACE_S = 1.0                  # SIGTERM waits this long for attempts in flight
DATABASE_BUSY_TIMEOUT_S = 30.0
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 500
STATES = ("pending", "delivered", "failed")
RETRY_STATUSES = (408, 429)         # besides every 5xx
# Tests only: M1_TEST_WEBHOOK_TIME_SCALE=0.05 multiplies FIRST_RETRY_S and MAX_RETRY_DELAY_S.
TIME_SCALE_ENV = "M1_TEST_WEBHOOK_TIME_SCALE"


# ---------------------------------------------------------------------------------------------
# Settings read from the environment (tests only)
# ---------------------------------------------------------------------------------------------

def time_scale(environ):
    """The test-only factor on backoff waits (1 in production)."""
    value = float(environ.get(TIME_SCALE_ENV) or 1.0)
    if value <= 0:
        raise ValueError("%s must be more than 0" % TIME_SCALE_ENV)
    return value


# ---------------------------------------------------------------------------------------------
# Signing (the README shows the receiver's side)
# ---------------------------------------------------------------------------------------------

def signature(secret, body, timestamp):
    """The M1-Signature header value for `body` (bytes) sent at `timestamp` (unix seconds)."""
    t = str(int(timestamp))
    mac = hmac.new(secret, t.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return "t=%s,v1=%s" % (t, mac)


def new_event_id(event_type, file_id, key=None):
    """evt_<32 hex>: random, or derived from (type, fileId, key) so that the same key always
    names the same event."""
    if key is None:
        return "evt_" + uuid.uuid4().hex
    return "evt_" + hashlib.sha256("\0".join((event_type, file_id or "", key)).encode(
        "utf-8")).hexdigest()[:32]


def retry_delay(attempts, first=FIRST_RETRY_S, cap=MAX_RETRY_DELAY_S, rng=random.random):
    """Seconds to wait after the `attempts`-th failed attempt: first x 2^(attempts-1), at most
    `cap`, minus up to JITTER_FRACTION of it at random (so receivers that come back are not hit
    by every sender at the same instant)."""
    base = min(cap, first * (2.0 ** min(attempts - 1, 62)))
    return base * (1.0 - JITTER_FRACTION * rng())


# ---------------------------------------------------------------------------------------------
# The public face: Webhooks (publish, the store listener, the admin operations)
# ---------------------------------------------------------------------------------------------

class Webhooks:
    """Queues events durably and delivers them in the background. Thread-safe.

    `publish(event_type, file_id, data)` is the one way in (the store listener and the
    processing module both use it). With no --webhook-url it is disabled: publish does
    nothing and opens nothing.
    """

    def __init__(self, config, store, environ=os.environ):
        self.urls = unique(config.webhook_urls)
        self.enabled = bool(self.urls)
        self._store = store
        self._secret = (config.webhook_secret or "").encode("utf-8")
        self._timeout = config.webhook_timeout
        self._retry_for = config.webhook_retry_for
        scale = time_scale(environ)
        self._first_retry, self._max_retry = FIRST_RETRY_S * scale, MAX_RETRY_DELAY_S * scale
        self._history = max(HISTORY_S, 2 * self._retry_for)
        self._stopping = threading.Event()
        self._threads = []
        self._receivers = dict((url, _Receiver(url)) for url in self.urls)
        self._queue = None
        if not self.enabled:
            return
        self._queue = _Queue(os.path.join(config.dir, DATABASE_NAME))
        self._queue.prune(time.time() - self._history)
        dropped = self._queue.fail_unconfigured(self.urls)
        if dropped:
            log.warning("%d pending webhook deliveries to URLs no longer configured marked "
                        "failed", dropped)
        for delivery_id, url, due in self._queue.pending():
            self._receivers[url].schedule(due, delivery_id)
        # Listen before the store's repair runs, so nothing it completes is missed; then catch
        # up on completions whose event a crash may have cut off.
        store.add_listener(self.on_store_event)
        self._catch_up()

    # -- the way in -----------------------------------------------------------------------

    def publish(self, event_type, file_id, data, key=None):
        """Queue `event_type` about `file_id` for every URL; returns the event id (None when
        disabled). Durable when it returns. With a `key`, the id is derived from (type,
        fileId, key), and publishing the same again is a no-op."""
        if event_type not in EVENT_TYPES:
            raise ValueError("unknown webhook event type %r" % event_type)
        if not self.enabled:
            return None
        now = time.time()
        event_id = new_event_id(event_type, file_id, key)
        payload = {"fileId": file_id} if file_id is not None else {}
        payload.update(data)
        body = json.dumps({"id": event_id, "type": event_type, "createdAt": serverlog.utc_iso(now),
                           "data": payload}, separators=(",", ":")).encode("utf-8")
        try:
            queued = self._queue.add_event(event_id, event_type, file_id, now, body, self.urls,
                                           now + self._retry_for)
        except _Closed:
            log.warning("webhooks stopped: %s for %s not queued", event_type, file_id)
            return None
        for delivery_id, url in queued:
            self._receivers[url].schedule(now, delivery_id)
        if queued:
            log.info("webhook %s %s queued for %d URL(s)", event_type, event_id, len(queued))
        if now - self._queue.last_pruned > PRUNE_INTERVAL_S:
            self._queue.prune(now - self._history)
        return event_id

    def on_store_event(self, event):
        """The store listener (add_listener): "chunk" costs nothing; the others queue one event."""
        kind = event["type"]
        if kind == "completed":
            upload = self._store.status(event["fileId"])
            if upload is not None and upload.completed_at is not None:
                self._publish_completed(upload)
        elif kind == "deleted":
            reason = event.get("reason", "requested")
            if reason == "expired" and not event.get("completed", True):
                self.publish("upload.failed", event["fileId"], {
                    "reason": "incomplete_expired",
                    "message": "no chunk arrived for longer than --incomplete-ttl before the "
                               "upload was complete; it was removed"})
            else:
                self.publish("upload.deleted", event["fileId"], {
                    "reason": "retention" if reason == "expired" else reason})

    def _publish_completed(self, upload):
        self.publish("upload.completed", upload.file_id, {
            "size": upload.bytes_appended, "sha256": upload.sha256,
            "mimeType": upload.mime_type or storage.MEDIA_TYPES.get(upload.ext),
            "url": "/uploads/%s.%s" % (upload.file_id, upload.ext),
            "completedAt": serverlog.utc_iso(upload.completed_at)}, key=repr(upload.completed_at))

    def _catch_up(self):
        since = max(self._queue.created_at, time.time() - self._retry_for)
        # An event is published after its upload completed, so its created_at >= since.
        known = self._queue.event_ids("upload.completed", since)
        for upload in self._store.completed_since(since):
            if new_event_id("upload.completed", upload.file_id,
                            repr(upload.completed_at)) not in known:
                log.warning("webhooks: catching up on upload.completed for %s", upload.file_id)
                self._publish_completed(upload)

    # -- delivery threads -----------------------------------------------------------------

    def start(self, workers):
        """Start `workers` delivery threads per URL (the only threads this module makes)."""
        for number, receiver in enumerate(self._receivers.values()):
            for k in range(workers):
                thread = threading.Thread(target=self._work, args=(receiver,), daemon=True,
                                          name="m1-webhook-%d-%d" % (number, k))
                thread.start()
                self._threads.append(thread)

    def close(self):
        """Stop the threads (an attempt in flight is abandoned after STOP_GRACE_S and stays
        pending: it is made again after the restart) and close the queue."""
        self._stopping.set()
        for receiver in self._receivers.values():
            receiver.wake_all()
        deadline = time.monotonic() + STOP_GRACE_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._queue is not None:
            self._queue.close()

    def _work(self, receiver):
        while True:
            delivery_id = receiver.next_due(self._stopping)
            if delivery_id is None:
                return
            try:
                due = self._attempt(receiver, delivery_id)
            except _Closed:
                receiver.finished(delivery_id)
                return
            except Exception:          # logged once; tried again later, still pending
                log.exception("webhook delivery %d failed unexpectedly", delivery_id)
                due = time.time() + retry_delay(5, self._first_retry, self._max_retry)
            receiver.finished(delivery_id, due)

    def _attempt(self, receiver, delivery_id):
        """One attempt of one delivery, its outcome committed; returns when to try again (None:
        finished, or nothing to do)."""
        row = self._queue.due(delivery_id)
        now = time.time()
        if row is None or row["next_attempt_at"] > now + 0.001:
            return None                # finished meanwhile, or retried for a later time
        attempt = row["attempts"] + 1
        headers = {SIGNATURE_HEADER: signature(self._secret, row["body"], now),
                   "M1-Event-Id": row["event_id"], "M1-Event-Type": row["type"],
                   "M1-Delivery-Attempt": str(attempt)}
        started = time.monotonic()
        result = post(receiver.url, row["body"], headers, self._timeout)
        took_ms = (time.monotonic() - started) * 1000
        shown = redact(receiver.url)
        if result.delivered:
            self._queue.finish(delivery_id, "delivered", attempt, result.status, None)
            log.info("webhook %s %s to %s delivered (attempt %d, HTTP %d, %.0f ms)",
                     row["type"], row["event_id"], shown, attempt, result.status, took_ms)
            return None
        due = time.time() + retry_delay(attempt, self._first_retry, self._max_retry)
        if result.retry and due <= row["give_up_at"]:
            self._queue.reschedule(delivery_id, attempt, result.status, result.error, due)
            log.warning("webhook %s %s to %s: %s (attempt %d); next attempt in %.1f s",
                        row["type"], row["event_id"], shown, result.error, attempt,
                        due - time.time())
            return due
        error = result.error
        if result.retry:
            error = "gave up after %d attempts: %s" % (attempt, error)
        self._queue.finish(delivery_id, "failed", attempt, result.status, error)
        log.warning("webhook %s %s to %s failed: %s", row["type"], row["event_id"], shown,
                    error)
        return None

    # -- the admin operations (GET .../deliveries, POST .../deliveries/:id/retry) ----------

    def deliveries(self, limit, before=None, state=None):
        if not self.enabled:
            return []
        return self._queue.page(limit, before, state)

    def retry(self, delivery_id):
        """Send delivery `delivery_id` again now, with a fresh retry window: a failed or
        delivered one becomes pending; a pending one is moved up. Returns the delivery."""
        row = self._queue.get(delivery_id) if self.enabled else None
        if row is None:
            raise ApiError(404, "not_found", "no webhook delivery %d" % delivery_id)
        receiver = self._receivers.get(row["url"])
        if receiver is None:
            raise ApiError(409, "receiver_not_configured",
                           "delivery %d goes to a URL this server is no longer configured "
                           "with" % delivery_id)
        now = time.time()
        if not receiver.schedule_unless_busy(now, delivery_id, lambda: self._queue.requeue(
                delivery_id, now, now + self._retry_for)):
            raise ApiError(409, "attempt_in_progress",
                           "delivery %d is being attempted right now; retry shortly"
                           % delivery_id, {"Retry-After": "1"})
        log.info("webhook delivery %d queued again by request", delivery_id)
        return self._queue.get(delivery_id)


class _Closed(Exception):
    """The queue was closed (the server is stopping)."""


class _Receiver:
    """One URL's due-time heap of delivery ids, shared by that URL's worker threads.

    A delivery id being attempted is "busy": it is pushed again only by `finished` (the retry
    its attempt scheduled), so a second entry that falls due meanwhile (the retry route on a
    delivery that was also due) is dropped instead of being sent twice at once.
    """

    def __init__(self, url):
        self.url = url
        self._heap = []              # (due unix time, delivery id); stale entries are skipped
        self._busy = set()           # delivery ids being attempted
        self._cond = threading.Condition()

    def schedule(self, due, delivery_id):
        with self._cond:
            heapq.heappush(self._heap, (due, delivery_id))
            self._cond.notify()

    def schedule_unless_busy(self, due, delivery_id, before):
        """Call `before()` and schedule, unless the delivery is being attempted (False)."""
        with self._cond:
            if delivery_id in self._busy:
                return False
            before()
            heapq.heappush(self._heap, (due, delivery_id))
            self._cond.notify()
            return True

    def next_due(self, stopping):
        """Block until a delivery is due and claim it; None once `stopping` is set."""
        with self._cond:
            while not stopping.is_set():
                wait = MAX_IDLE_WAIT_S
                while self._heap:
                    due, delivery_id = self._heap[0]
                    if due > time.time():
                        wait = min(wait, due - time.time())
                        break
                    heapq.heappop(self._heap)
                    if delivery_id not in self._busy:
                        self._busy.add(delivery_id)
                        return delivery_id
                self._cond.wait(max(wait, 0.001))
            return None

    def finished(self, delivery_id, due=None):
        """The attempt is over; `due`: when to try again."""
        with self._cond:
            self._busy.discard(delivery_id)
            if due is not None:
                heapq.heappush(self._heap, (due, delivery_id))
                self._cond.notify()

    def wake_all(self):
        with self._cond:
            self._cond.notify_all()


# ---------------------------------------------------------------------------------------------
# One attempt: a minimal HTTP/1.1 POST with one deadline for the whole exchange
# ---------------------------------------------------------------------------------------------

class Result:
    def __init__(self, status=None, error=None, delivered=False, retry=False):
        self.status = status          # the HTTP status, None when none came back
        self.error = error            # what went wrong, for lastError
        self.delivered = delivered
        self.retry = retry


def post(url, body, headers, timeout):
    """POST `body` to `url`; the status line and headers are read, the body never is, and the
    whole exchange (connect, TLS, send, response head) must finish within `timeout`."""
    parts = urlsplit(url)
    host = parts.hostname
    secure = parts.scheme.lower() == "https"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    lines = ["POST %s HTTP/1.1" % target, "Host: %s" % parts.netloc.rpartition("@")[2],
             "User-Agent: " + USER_AGENT, "Content-Type: application/json",
             "Content-Length: %d" % len(body), "Connection: close"]
    if parts.username is not None:
        credentials = "%s:%s" % (unquote(parts.username), unquote(parts.password or ""))
        lines.append("Authorization: Basic " + base64.b64encode(
            credentials.encode("utf-8")).decode("ascii"))
    lines += ["%s: %s" % item for item in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            if secure:
                import ssl                     # only when an https URL is used (start-up cost)
                sock.settimeout(_left(deadline))
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            sock.settimeout(_left(deadline))
            sock.sendall(request)
            status, reason, location = _read_status(sock, deadline)
        finally:
            sock.close()
    except socket.timeout:
        return Result(error="timed out after %g s" % timeout, retry=True)
    except _BadResponse as error:
        return Result(error="bad response: %s" % error, retry=True)
    except (OSError, ValueError) as error:      # refused, reset, DNS, TLS (ssl.SSLError)
        return Result(error=_describe(error), retry=True)
    text = ("HTTP %d %s" % (status, reason)).strip()[:MAX_ERROR_CHARS]
    if 200 <= status < 300:
        return Result(status, delivered=True)
    if 300 <= status < 400:
        return Result(status, error=("%s: redirect not followed (Location: %s)"
                                     % (text, location or "none"))[:MAX_ERROR_CHARS])
    return Result(status, error=text, retry=status >= 500 or status in RETRY_STATUSES)


class _BadResponse(Exception):
    pass


def _read_status(sock, deadline):
    """Read response heads until a final (non-1xx) one; returns (status, reason, Location)."""
    data = b""
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_RESPONSE_HEAD_BYTES:
                raise _BadResponse("response head longer than %d bytes"
                                   % MAX_RESPONSE_HEAD_BYTES)
            sock.settimeout(_left(deadline))
            more = sock.recv(65536)
            if not more:
                if not data:
                    raise _BadResponse("connection closed without a response")
                raise _BadResponse("connection closed mid-response")
            data += more
            continue
        head, data = data[:end].decode("latin-1"), data[end + 4:]
        lines = head.split("\r\n")
        fields = lines[0].split(" ", 2)
        status = httphead.number(fields[1], 3) if len(fields) >= 2 else None
        if not fields[0].startswith("HTTP/") or status is None or len(fields[1]) != 3:
            # (a receiver's '²' passed str.isdigit() and then broke int(): one number parser)
            raise _BadResponse("not an HTTP status line: %r" % lines[0][:100])
        if 100 <= status < 200:
            continue                    # 100 Continue, 103 Early Hints: the answer follows
        location = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "location":
                location = value.strip()[:200]
        return status, (fields[2] if len(fields) > 2 else ""), location


def _left(deadline):
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("attempt deadline passed")
    return left


def _describe(error):
    if isinstance(error, socket.gaierror):
        return "DNS lookup failed: %s" % (error.strerror or error)
    name = type(error).__name__
    return ("%s: %s" % (name, getattr(error, "strerror", None) or error))[:MAX_ERROR_CHARS]


def redact(url):
    """The URL with a password in it replaced by ***, for logs and the deliveries listing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc="%s:***@%s" % (user.partition(":")[0], host)).geturl()


# ---------------------------------------------------------------------------------------------
# Routes: GET /api/video/webhooks/deliveries, POST /api/video/webhooks/deliveries/:id/retry
# (admin routes: they will require the API key once auth lands)
# ---------------------------------------------------------------------------------------------

def routes():
    return [
        (r"/api/video/webhooks/deliveries", {"GET": list_deliveries, "HEAD": list_deliveries}),
        (r"/api/video/webhooks/deliveries/([^/]+)/retry", {"POST": retry_delivery}),
    ]


def list_deliveries(handler):
    """Recent deliveries, newest first: ?limit=1..500 (50), ?cursor= (nextCursor of the page
    before), ?state=pending|delivered|failed."""
    hooks = handler.server.webhooks
    query = parse_qs(urlsplit(handler.path).query)
    limit = httphead.number(query.get("limit", [str(DEFAULT_LIST_LIMIT)])[-1], 6)
    if limit is None or not 1 <= limit <= MAX_LIST_LIMIT:
        raise ApiError(400, "invalid_limit", "limit must be 1..%d" % MAX_LIST_LIMIT)
    before = query.get("cursor", [None])[-1]
    if before is not None:
        before = httphead.number(before)
        if before is None:
            raise ApiError(400, "invalid_cursor", "cursor is not one this server gave out")
    state = query.get("state", [None])[-1]
    if state is not None and state not in STATES:
        raise ApiError(400, "invalid_state", "state must be one of %s" % ", ".join(STATES))
    enabled = hooks is not None and hooks.enabled
    page = hooks.deliveries(limit + 1, before, state) if enabled else []
    more = len(page) > limit
    page = page[:limit]
    handler.send_json(200, {"success": True, "data": {
        "enabled": enabled, "receivers": [redact(url) for url in hooks.urls] if enabled else [],
        "deliveries": [delivery_json(row) for row in page],
        "nextCursor": str(page[-1]["id"]) if more else None}})


def retry_delivery(handler, delivery_id):
    number = httphead.number(delivery_id)
    if number is None:
        raise ApiError(400, "invalid_delivery_id", "a delivery id is a whole number")
    hooks = handler.server.webhooks
    if hooks is None or not hooks.enabled:
        raise ApiError(404, "not_found", "webhooks are off (no --webhook-url)")
    row = hooks.retry(number)
    handler.send_json(202, {"success": True, "data": delivery_json(row)})


def delivery_json(row):
    def when(value):
        return None if value is None else serverlog.utc_iso(value)
    return {"id": row["id"], "eventId": row["event_id"], "type": row["type"],
            "fileId": row["file_id"], "url": redact(row["url"]), "state": row["state"],
            "attempts": row["attempts"], "lastStatus": row["last_status"],
            "lastError": row["last_error"], "lastAttemptAt": when(row["last_attempt_at"]),
            "nextAttemptAt": when(row["next_attempt_at"]) if row["state"] == "pending"
            else None,
            "giveUpAt": when(row["give_up_at"]), "createdAt": when(row["created_at"]),
            "updatedAt": when(row["updated_at"])}


# ---------------------------------------------------------------------------------------------
# The queue: <dir>/webhooks.sqlite3, one connection behind a lock
# ---------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id         TEXT PRIMARY KEY,      -- evt_<32 hex>, the same in every attempt
    type       TEXT NOT NULL,
    file_id    TEXT,
    created_at REAL NOT NULL,
    body       BLOB NOT NULL          -- the exact bytes every attempt sends and signs
);
CREATE TABLE IF NOT EXISTS deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused, even after pruning
    event_id        TEXT NOT NULL REFERENCES events (id),
    url             TEXT NOT NULL,
    state           TEXT NOT NULL,    -- pending | delivered | failed
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,             -- when pending: when the next attempt is due
    give_up_at      REAL NOT NULL,    -- no retry is scheduled after this
    last_status     INTEGER,
    last_error      TEXT,
    last_attempt_at REAL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    UNIQUE (event_id, url)
);
CREATE INDEX IF NOT EXISTS deliveries_by_state ON deliveries (state, updated_at);
CREATE INDEX IF NOT EXISTS events_by_type ON events (type, created_at);
"""

_DELIVERY_COLUMNS = ("d.id, d.event_id, e.type, e.file_id, d.url, d.state, d.attempts, "
                     "d.next_attempt_at, d.give_up_at, d.last_status, d.last_error, "
                     "d.last_attempt_at, d.created_at, d.updated_at")


class _Queue:
    """Events and their deliveries. Its own file, not a table in m1.sqlite3: SQLite has one
    writer per file, and delivery bookkeeping (a commit per attempt, bursts of them when a
    receiver comes back) must never hold the lock a chunk's ledger commit waits for. It also
    keeps its own schema version, and deleting it only forgets notifications, never uploads.
    Every write is one committed transaction (WAL, synchronous=FULL: on disk when it returns).
    """

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=DATABASE_BUSY_TIMEOUT_S,
                                   isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self.last_pruned = 0.0
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError("%s has schema %d; this m1server knows up to %d"
                                   % (path, version, SCHEMA_VERSION))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        if version < SCHEMA_VERSION:         # one transaction, one sync (chunkstore's _Ledger)
            self._db.executescript("BEGIN IMMEDIATE;\n%sPRAGMA user_version=%d;\nCOMMIT;"
                                   % (_SCHEMA, SCHEMA_VERSION))
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('created_at', ?)",
                       (repr(time.time()),))
            self.created_at = float(db.execute(
                "SELECT value FROM meta WHERE key = 'created_at'").fetchone()[0])

    @contextlib.contextmanager
    def _read(self):
        with self._lock:
            if self._db is None:
                raise _Closed()
            yield self._db

    @contextlib.contextmanager
    def _write(self):
        with self._read() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def add_event(self, event_id, event_type, file_id, now, body, urls, give_up_at):
        """Insert the event and a pending delivery per URL; [(delivery id, url)] queued, or []
        when an event with this id exists already."""
        with self._write() as db:
            if db.execute("INSERT OR IGNORE INTO events (id, type, file_id, created_at, body) "
                          "VALUES (?, ?, ?, ?, ?)", (event_id, event_type, file_id, now,
                                                     body)).rowcount == 0:
                return []
            queued = []
            for url in urls:
                cursor = db.execute(
                    "INSERT INTO deliveries (event_id, url, state, next_attempt_at, give_up_at, "
                    "created_at, updated_at) VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                    (event_id, url, now, give_up_at, now, now))
                queued.append((cursor.lastrowid, url))
            return queued

    def pending(self):
        with self._read() as db:
            return [tuple(r) for r in db.execute(
                "SELECT id, url, next_attempt_at FROM deliveries WHERE state = 'pending'")]

    def due(self, delivery_id):
        """What an attempt needs, or None when the delivery is no longer pending."""
        with self._read() as db:
            return db.execute(
                "SELECT d.event_id, e.type, e.body, d.attempts, d.next_attempt_at, "
                "d.give_up_at FROM deliveries d JOIN events e ON e.id = d.event_id "
                "WHERE d.id = ? AND d.state = 'pending'", (delivery_id,)).fetchone()

    def reschedule(self, delivery_id, attempts, status, error, due):
        now = time.time()
        with self._write() as db:
            db.execute("UPDATE deliveries SET attempts = ?, last_status = ?, last_error = ?, "
                       "last_attempt_at = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?",
                       (attempts, status, error, now, due, now, delivery_id))

    def finish(self, delivery_id, state, attempts, status, error):
        now = time.time()
        with self._write() as db:
            db.execute("UPDATE deliveries SET state = ?, attempts = ?, last_status = ?, "
                       "last_error = ?, last_attempt_at = ?, next_attempt_at = NULL, "
                       "updated_at = ? WHERE id = ?",
                       (state, attempts, status, error, now, now, delivery_id))

    def requeue(self, delivery_id, due, give_up_at):
        with self._write() as db:
            db.execute("UPDATE deliveries SET state = 'pending', next_attempt_at = ?, "
                       "give_up_at = ?, updated_at = ? WHERE id = ?",
                       (due, give_up_at, due, delivery_id))

    def fail_unconfigured(self, urls):
        now = time.time()
        with self._write() as db:
            marks = ",".join("?" * len(urls))
            return db.execute(
                "UPDATE deliveries SET state = 'failed', next_attempt_at = NULL, updated_at = ?, "
                "last_error = 'URL no longer configured' WHERE state = 'pending' AND url NOT IN "
                "(%s)" % marks, [now] + list(urls)).rowcount

    def get(self, delivery_id):
        with self._read() as db:
            return db.execute("SELECT %s FROM deliveries d JOIN events e ON e.id = d.event_id "
                              "WHERE d.id = ?" % _DELIVERY_COLUMNS, (delivery_id,)).fetchone()

    def page(self, limit, before, state):
        where, params = [], []
        if before is not None:
            where.append("d.id < ?")
            params.append(before)
        if state is not None:
            where.append("d.state = ?")
            params.append(state)
        sql = "SELECT %s FROM deliveries d JOIN events e ON e.id = d.event_id" % \
            _DELIVERY_COLUMNS
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._read() as db:
            return db.execute(sql + " ORDER BY d.id DESC LIMIT ?", params + [limit]).fetchall()

    def event_ids(self, event_type, since):
        with self._read() as db:
            return set(r[0] for r in db.execute(
                "SELECT id FROM events WHERE type = ? AND created_at >= ?", (event_type, since)))

    def prune(self, before):
        with self._write() as db:
            db.execute("DELETE FROM deliveries WHERE state != 'pending' AND updated_at < ?",
                       (before,))
            db.execute("DELETE FROM events WHERE created_at < ? AND NOT EXISTS (SELECT 1 FROM "
                       "deliveries d WHERE d.event_id = events.id)", (before,))
        self.last_pruned = time.time()

    def close(self):
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
