"""events.py - real-time progress of uploads: an in-process event bus, served at
`/api/video/events/<fileId>` as a WebSocket (websocket.py) or as Server-Sent Events.

Who publishes: the chunk store (through `store.add_listener`: `chunk` for every chunk stored,
`completed` once the file's sha256 is known) and, through `EventBus.processing/ready/failed`,
later stages such as processing. Who listens: browsers, dashboards, other tabs.

What it guarantees:
  * Publishing never waits for a subscriber. It appends a shared, already-encoded event to
    each subscriber's queue (a deque; O(subscribers of that upload)) and wakes the
    subscriber's connection thread through a socket pair. A queue that is full loses its
    oldest event and counts it, so a client that stops reading costs at most --event-queue
    events of memory and tells the client how many it missed (a `missed` event).
  * Events of one upload reach each subscriber in the order they were published: one lock per
    upload orders them (the store publishes chunk events under the upload's own lock, so in the
    order the chunks were stored).
  * A subscriber first receives the upload's current state (`state`: the status reply's data),
    then every later event. It registers before it reads the state, so no event falls between
    the two; events the state already reflects are skipped, so none is counted twice.
  * Every event carries an id `<epoch>-<seq>`. The last --event-history events of every upload
    someone watches are kept (for HISTORY_TTL_S after its last subscriber left); a reconnect
    that names the last id it saw (SSE's `Last-Event-ID` header, or `?lastEventId=`) receives
    exactly the events after it. When they are no longer kept, or the id comes from another
    server process (another epoch), it receives the current state instead: a client treats a
    `state` event as a full refresh.
  * A connection waiting for events never pins the server: streams are capped
    (--max-subscribers, 503 beyond, kept below --max-connections so uploads always find a
    connection), idle streams carry a heartbeat (an SSE comment, a WebSocket ping), a
    WebSocket that leaves a ping unanswered until the next one is due is closed (1011), a peer
    that stops reading is cut off after --timeout of a stalled write, and a stopping server
    ends every stream at once (WebSocket close 1001). --timeout's per-read limit does not
    apply to a healthy idle stream: its thread waits in select(), not in a read.
  * A stream opened with a token (auth.py) ends when the token expires: the events before
    the expiry, then a `token_expired` event, then the end (WebSocket close 1008). The client
    reconnects with a fresh token and resumes from the last event id it saw.

Several nodes on one bucket (a store whose capabilities say `shared`, s3store.py): each node
publishes the events of what it did itself, and a StoreRelay reads the status of every upload
watched on this node every RELAY_POLL_S; a change that no event of this node explains, seen
at two polls in a row, goes out as a `state` event (the status, as at the start of a stream).
So a watcher on node B follows an upload whose chunks go to node A, in steps of 1-2 s, and no
`state` is added when this node did the work itself. Cost: one status read (S3: a GET, and a
LIST while the upload is incomplete) per watched upload per node per RELAY_POLL_S.

What it does not do: keep events across a restart (a new process starts a new epoch, and
reconnects get the state), pass single events (chunk, processing progress) between server
processes, or check credentials.
"""
from __future__ import annotations

import binascii
import collections
import itertools
import json
import os
import re
import selectors
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

import serverlog
import storage
import websocket
from options import DEFAULT_HISTORY_EVENTS, DEFAULT_QUEUE_EVENTS
from apierror import ApiError

log = serverlog.Logger("m1server.events")

# ---------------------------------------------------------------------------------------------
# Limits (the flags' defaults are in options.py; these are not flags)
# ---------------------------------------------------------------------------------------------

HISTORY_TTL_S = 300.0                # an upload nobody watches keeps its history this long
MAX_IDLE_TOPICS = 256                # and at most this many such uploads keep one
SEND_BUFFER_BYTES = 16 << 10         # kernel send buffer of an event connection
SSE_RETRY_MS = 2000                  # how long EventSource waits before reconnecting
RELAY_POLL_S = 1.0                   # shared storage: a watched upload's status read this often

EVENT_ID_PATTERN = re.compile(r"([0-9a-f]{1,16})-([0-9]{1,18})\Z")
RESERVED_FIELDS = ("type", "id", "fileId")


# ---------------------------------------------------------------------------------------------
# The bus
# ---------------------------------------------------------------------------------------------

class Event:
    """One published event, encoded once and shared by every queue and the history."""
    __slots__ = ("seq", "id", "type", "index", "text")

    def __init__(self, seq, event_id, event_type, index, text):
        self.seq = seq
        self.id = event_id
        self.type = event_type
        self.index = index            # the chunk index of a chunk event (to skip reflected ones)
        self.text = text              # the JSON sent to clients


class EventBus:
    """Per-upload publish/subscribe with bounded queues and a short history. Thread-safe."""

    def __init__(self, max_subscribers, queue_events=DEFAULT_QUEUE_EVENTS,
                 history_events=DEFAULT_HISTORY_EVENTS):
        self.max_subscribers = max_subscribers
        self.queue_events = queue_events
        self.history_events = history_events
        self.epoch = binascii.hexlify(os.urandom(4)).decode("ascii")
        self.closed = False
        self._next_seq = itertools.count(1).__next__   # one C call: atomic under the GIL
        # The bus lock guards the topics and the subscriber set. It is never held while a
        # topic lock is taken, and a topic lock is never held while taking it.
        self._lock = threading.Lock()
        self._topics = {}
        self._subscriptions = set()
        self._waker = _Waker()

    @classmethod
    def from_config(cls, config):
        return cls(config.max_subscribers, config.event_queue, config.event_history)

    @property
    def subscriber_count(self):
        with self._lock:
            return len(self._subscriptions)

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, file_id, event_type, **fields):
        """Send an event to the subscribers of `file_id`; returns its id, or None when nobody
        watches that upload (then nothing is kept). Never blocks on a subscriber."""
        for name in RESERVED_FIELDS:
            if name in fields:
                raise ValueError("%r is set by the bus, not by the publisher" % name)
        return self._publish(file_id, event_type, fields, explained=True)

    def relay_state(self, file_id, status):
        """StoreRelay: a `state` event for what another node did (it explains nothing that
        happened on this node)."""
        return self._publish(file_id, "state", {"status": status}, explained=False)

    def _publish(self, file_id, event_type, fields, explained):
        with self._lock:
            topic = self._topics.get(file_id)
        if topic is None:
            return None
        with topic.lock:
            seq = self._next_seq()
            event_id = "%s-%d" % (self.epoch, seq)
            body = {"type": event_type, "id": event_id, "fileId": file_id}
            body.update(fields)
            event = Event(seq, event_id, event_type,
                          fields.get("index") if event_type == "chunk" else None,
                          json.dumps(body, separators=(",", ":")))
            if len(topic.history) >= self.history_events:
                topic.complete_after = topic.history.popleft().seq
            topic.history.append(event)
            if explained:                    # for StoreRelay: this node knows of a change
                topic.explained = True
            to_wake = [s for s in topic.subscribers if s._push(event)]
        if to_wake:
            self._waker.wake(to_wake)
        return event_id

    def processing(self, file_id, progress, **extra):
        """Processing advanced: `progress` from 0 to 1 (clamped)."""
        progress = min(1.0, max(0.0, float(progress)))
        return self.publish(file_id, "processing", progress=round(progress, 4), **extra)

    def ready(self, file_id, urls, **extra):
        """Processing finished: `urls` maps each derivative's name to its URL."""
        return self.publish(file_id, "ready", urls=dict(urls), **extra)

    def failed(self, file_id, reason, **extra):
        """The upload or its processing failed, for `reason` (a sentence for people)."""
        return self.publish(file_id, "failed", reason=str(reason), **extra)

    def on_store_event(self, event):
        """store.add_listener target: chunk and completed events of the chunk store."""
        fields = dict((k, v) for k, v in event.items() if k not in RESERVED_FIELDS)
        if event["type"] == "completed":
            ext = fields.pop("ext", None)
            if ext is not None:
                fields["url"] = "/uploads/%s.%s" % (event["fileId"], ext)
                fields["mimeType"] = fields.get("mimeType") or storage.MEDIA_TYPES.get(ext)
        self.publish(event["fileId"], event["type"], **fields)

    # -- what StoreRelay reads ----------------------------------------------------------------

    def watched(self):
        """The topics somebody subscribes to now."""
        with self._lock:
            return [topic for topic in self._topics.values() if topic.holders > 0]

    def observed(self, file_id, status):
        """A stream was just sent `status` as its state: the relay's starting point."""
        with self._lock:
            topic = self._topics.get(file_id)
        if topic is not None:
            with topic.lock:
                if topic.known is None:
                    topic.known = status_facts(status)

    # -- subscribing --------------------------------------------------------------------------

    def subscribe(self, file_id, last_event_id=None):
        """Register a subscriber of `file_id`. Returns (subscription, replay): replay is the
        list of kept events after `last_event_id` when the stream can resume from it, else
        None (send the current state first). ApiError 503 past the cap or when stopping."""
        subscription = Subscription(self, file_id, self.queue_events)
        try:
            with self._lock:
                if self.closed:
                    raise ApiError(503, "shutting_down", "server is shutting down; retry "
                                   "shortly", {"Retry-After": "2"})
                if len(self._subscriptions) >= self.max_subscribers:
                    raise ApiError(503, "too_many_subscribers",
                                   "%d event streams are open (--max-subscribers); retry "
                                   "later or poll the status" % len(self._subscriptions),
                                   {"Retry-After": "5"})
                topic = self._topics.get(file_id)
                if topic is None:
                    self._forget_idle_topics(time.monotonic())
                    topic = self._topics[file_id] = _Topic(file_id, self._next_seq())
                topic.holders += 1
                self._subscriptions.add(subscription)
        except ApiError:
            subscription._close_sockets()
            raise
        subscription.topic = topic
        resume_after = self._resume_point(last_event_id)
        with topic.lock:
            replay = None
            newest = topic.history[-1].seq if topic.history else topic.complete_after
            if resume_after is not None and topic.complete_after <= resume_after <= newest:
                replay = [e for e in topic.history if e.seq > resume_after]
            topic.subscribers.append(subscription)
        return subscription, replay

    def _resume_point(self, last_event_id):
        match = EVENT_ID_PATTERN.match((last_event_id or "").strip())
        if match is None or match.group(1) != self.epoch:
            return None
        return int(match.group(2))

    def _unsubscribe(self, subscription):
        topic = subscription.topic
        if topic is None:
            return
        with topic.lock:
            if subscription in topic.subscribers:
                topic.subscribers.remove(subscription)
        with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.discard(subscription)
                topic.holders -= 1
                if topic.holders == 0:
                    topic.idle_since = time.monotonic()

    def _forget_idle_topics(self, now):
        """Drop the history of uploads nobody has watched for HISTORY_TTL_S, and keep at most
        MAX_IDLE_TOPICS unwatched ones (oldest go first). Bus lock held."""
        idle = [t for t in self._topics.values() if t.holders == 0]
        idle.sort(key=lambda t: t.idle_since)
        excess = len(idle) - MAX_IDLE_TOPICS
        for position, topic in enumerate(idle):
            if position < excess or now - topic.idle_since > HISTORY_TTL_S:
                del self._topics[topic.file_id]

    def close(self):
        """Server shutdown: refuse new subscribers and wake every stream so that it ends now."""
        with self._lock:
            self.closed = True
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription._wake()


class StoreRelay:
    """Shared storage: publishes a `state` event when a watched upload's status changes in a
    way no event of this node explains (another node stored chunks, completed, processed or
    deleted it); see the module docstring. A daemon thread; `describe(file_id)` returns the
    status reply of GET /api/video/status/<fileId>."""

    def __init__(self, bus, describe, interval=RELAY_POLL_S):
        self._bus = bus
        self._describe = describe
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="m1-events-relay", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stopping.wait(self._interval):
            for topic in self._bus.watched():
                try:
                    status = self._describe(topic.file_id)
                except ApiError as error:        # the store did not answer: next time
                    log.warning("events relay: status of %s: %s", topic.file_id,
                                error.message)
                    continue
                except Exception:
                    log.exception("events relay: status of %s failed", topic.file_id)
                    continue
                if self.changed_elsewhere(topic, status):
                    self._bus.relay_state(topic.file_id, status)

    @staticmethod
    def changed_elsewhere(topic, status):
        """Whether `status` shows a change of `topic` that this node did not publish: seen
        at two polls in a row with no event of this node in between. (One poll is not
        enough: it may land between this node storing a chunk and publishing its event.)"""
        facts = status_facts(status)
        with topic.lock:
            if topic.explained or topic.known is None:
                topic.known, topic.explained, topic.pending = facts, False, False
                return False
            if facts == topic.known:
                topic.pending = False
                return False
            if not topic.pending:
                topic.pending = True
                return False
            topic.known, topic.pending = facts, False
            return True

    def stop(self):
        self._stopping.set()
        self._thread.join(5)


def status_facts(status):
    """What a status reply says happened, in the terms this node's events speak of: the
    bytes and chunks received, completion (once its sha256 is known, when `completed` is
    sent), processing's state, and whether the upload exists at all."""
    processing = (status.get("processing") or {}).get("state")
    return (bool(status.get("exists")), status.get("fileSize"), status.get("chunksReceived"),
            status.get("state") == "completed" and bool(status.get("sha256")),
            {"running": 1, "done": 2, "failed": 2}.get(processing, 0))


class _Waker:
    """Wakes subscriber threads on behalf of publishers, from a thread of its own.

    A chunk's event is published on the upload's request thread before its 200 is written.
    Waking 200 subscriber threads right there makes them compete with that thread for the GIL
    before the 200 is out; handed over here, the wake-ups start only when the request thread
    next lets go of the GIL (see bench/bench_events.py for the figures)."""

    def __init__(self):
        self._ready = threading.Condition(threading.Lock())
        self._pending = []
        self._thread = None

    def wake(self, subscriptions):
        with self._ready:
            self._pending.extend(subscriptions)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="m1-events-waker",
                                                daemon=True)
                self._thread.start()
            self._ready.notify()

    def _run(self):
        while True:
            with self._ready:
                while not self._pending:
                    self._ready.wait()
                batch, self._pending = self._pending, []
            for subscription in batch:
                subscription._wake()


class _Topic:
    """One upload's subscribers and recent events; its lock orders the upload's events."""

    def __init__(self, file_id, start_seq):
        self.file_id = file_id
        self.lock = threading.Lock()
        self.subscribers = []            # guarded by self.lock
        self.history = collections.deque()
        self.complete_after = start_seq  # every event of this upload after it is in history
        self.holders = 0                 # subscriptions (guarded by the bus lock)
        self.idle_since = time.monotonic()
        # StoreRelay's view (guarded by self.lock): the status facts last seen or sent, an
        # event published since the last poll, and a change seen once and not explained.
        self.known = None
        self.explained = False
        self.pending = False


class Subscription:
    """One subscriber: a bounded queue, a count of what it lost, and a wake-up socket pair
    that its connection thread waits on together with the client's socket."""

    def __init__(self, bus, file_id, queue_events):
        self.bus = bus
        self.file_id = file_id
        self.topic = None
        self.queue_events = queue_events
        self.missed = 0                  # events dropped from this queue so far
        self._queue = collections.deque()
        self._unreported = 0             # dropped since the last take()
        self._signaled = False
        self._reflected_chunks = None    # (next_index, stashed) of the state sent first
        self._reflected_completed = False
        self.wake_socket, self._wake_sender = socket.socketpair()
        self.wake_socket.setblocking(False)
        self._wake_sender.setblocking(False)

    def _push(self, event):
        """Queue an event (topic lock held); True when the connection must be woken."""
        if len(self._queue) >= self.queue_events:
            self._queue.popleft()
            self.missed += 1
            self._unreported += 1
        self._queue.append(event)
        if self._signaled:
            return False
        self._signaled = True
        return True

    def _wake(self):
        try:
            self._wake_sender.send(b"\0")
        except OSError:
            pass                         # full (already awake) or closed (already gone)

    def take(self):
        """The queued events, oldest first, and how many were dropped since the last call."""
        try:
            while self.wake_socket.recv(4096):
                pass
        except OSError:
            pass                         # drained
        with self.topic.lock:
            events = list(self._queue)
            self._queue.clear()
            dropped, self._unreported = self._unreported, 0
            self._signaled = False
        return [e for e in events if not self._already_in_state(e)], dropped

    def note_state(self, upload):
        """The state sent first reflects `upload` (an UploadState or None): the chunk and
        completed events it already shows will be skipped."""
        if upload is None:
            return
        self._reflected_chunks = (upload.next_index, frozenset(upload.stashed))
        self._reflected_completed = upload.completed and upload.sha256 is not None

    def _already_in_state(self, event):
        # Events published after registration and reflected in the state form a prefix of
        # this upload's events (the state was read after registration, and the store orders
        # ledger changes and events alike), so each filter ends at its first miss.
        if event.type == "chunk" and self._reflected_chunks is not None:
            next_index, stashed = self._reflected_chunks
            if event.index is not None and (event.index < next_index or event.index in stashed):
                return True
            self._reflected_chunks = None
        elif event.type == "completed" and self._reflected_completed:
            self._reflected_completed = False
            return True
        elif event.type == "deleted":            # a new upload of that id starts from zero
            self._reflected_chunks, self._reflected_completed = None, False
        return False

    def close(self):
        self.bus._unsubscribe(self)
        self._close_sockets()

    def _close_sockets(self):
        self.wake_socket.close()
        self._wake_sender.close()


# ---------------------------------------------------------------------------------------------
# GET /api/video/events/<fileId>
# ---------------------------------------------------------------------------------------------

def routes():
    return ((r"/api/video/events/([^/]+)", {"GET": get_events}),)


def get_events(handler, file_id):
    """validate -> (WebSocket: check the handshake) -> subscribe (503 past the cap) -> read the
    state -> answer 101 or 200 -> stream until the client leaves, dies, or the server stops."""
    server = handler.server
    if not storage.valid_file_id(file_id):
        raise ApiError(400, "invalid_file_id", "fileId must match [A-Za-z0-9_-]{1,128}")
    upgrade = websocket.wants_upgrade(handler.headers)
    if upgrade:
        key = websocket.check_handshake(handler.command, handler.request_version,
                                        handler.headers)
        if handler.body_pending:
            raise websocket.HandshakeError("a WebSocket handshake has no body")
    subscription, replay = server.events.subscribe(file_id, _last_event_id(handler))
    try:
        if replay is None:
            first = [(None, state_text(handler, file_id, subscription))]
        else:
            first = [(e.id, e.text) for e in replay]
        if upgrade:
            stream = _WebSocketStream(handler, key, server.config.ws_max_message)
        else:
            stream = _SseStream(handler)
        stream.open()
        _Session(handler, file_id, subscription, stream).run(first)
    finally:
        subscription.close()


def state_text(handler, file_id, subscription=None):
    """The `state` event: what GET /api/video/status/<fileId> would answer as `data`."""
    upload = handler.server.store.status(file_id)
    status = handler.describe(file_id, upload)
    if subscription is not None:
        subscription.note_state(upload)
        handler.server.events.observed(file_id, status)
    return json.dumps({"type": "state", "fileId": file_id, "status": status},
                      separators=(",", ":"))


def _last_event_id(handler):
    """EventSource sends Last-Event-ID when it reconnects; other clients may use the query."""
    value = handler.headers.get("Last-Event-ID")
    if value is None:
        values = parse_qs(urlsplit(handler.path).query).get("lastEventId")
        value = values[0] if values else None
    return value


class _Session:
    """One event stream's loop: wait for events, the client, or the next heartbeat."""

    def __init__(self, handler, file_id, subscription, stream):
        self.handler = handler
        self.file_id = file_id
        self.subscription = subscription
        self.stream = stream
        self.heartbeat_s = handler.server.config.event_heartbeat
        # A stream opened with a token ends when the token expires (auth.py): a token is
        # checked once, at the handshake, so without this a stream would outlive it.
        expires = getattr(getattr(handler, "grant", None), "expires", None)
        self.ends_at = (None if expires is None
                        else time.monotonic() + max(0.0, expires - time.time()))

    def run(self, first):
        bus = self.subscription.bus
        selector = new_selector()
        selector.register(self.stream.sock, selectors.EVENT_READ, "client")
        selector.register(self.subscription.wake_socket, selectors.EVENT_READ, "wake")
        try:
            self.stream.send(first)
            self.stream.receive_buffered(self.on_client_messages)
            next_beat = time.monotonic() + self.heartbeat_s
            while not bus.closed:
                wake_at = next_beat if self.ends_at is None else min(next_beat, self.ends_at)
                for key, _ in selector.select(max(0.0, wake_at - time.monotonic())):
                    if key.data == "wake":
                        self.deliver()
                    elif not self.stream.receive(self.on_client_messages):
                        return
                if self.ends_at is not None and time.monotonic() >= self.ends_at:
                    return self.end_for_expired_token()
                if time.monotonic() >= next_beat:
                    if not self.stream.heartbeat():
                        return
                    next_beat = time.monotonic() + self.heartbeat_s
            self.deliver()
            self.stream.close(websocket.CLOSE_GOING_AWAY, "server shutting down")
        except (OSError, websocket.ConnectionClosed):
            return                       # the client left, died or stopped reading
        except Exception:
            # The 101/200 is out: an error envelope would corrupt the stream. Log, end it.
            log.exception("event stream for %s failed", self.file_id)
        finally:
            selector.close()

    def end_for_expired_token(self):
        """What happened before the expiry is delivered, then a `token_expired` event, then
        the stream ends (WebSocket: close 1008, policy). A client reconnects with a new
        token, resuming after the last event id it saw."""
        self.deliver()
        notice = {"type": "token_expired", "fileId": self.file_id}
        self.stream.send([(None, json.dumps(notice, separators=(",", ":")))])
        self.stream.close(websocket.CLOSE_POLICY, "token expired")

    def deliver(self):
        events, dropped = self.subscription.take()
        items = [(e.id, e.text) for e in events]
        if dropped:
            notice = {"type": "missed", "fileId": self.file_id, "count": dropped,
                      "total": self.subscription.missed}
            items.insert(0, (None, json.dumps(notice, separators=(",", ":"))))
        if items:
            self.stream.send(items)

    def on_client_messages(self, messages):
        """WebSocket clients may ask for a fresh state: {"type": "state"}."""
        for opcode, payload in messages:
            if opcode != websocket.OP_TEXT:
                self.stream.ws.fail(websocket.CLOSE_UNSUPPORTED_DATA,
                                    "only text messages are understood")
            try:
                request = json.loads(payload)
            except ValueError:
                request = None
            if isinstance(request, dict) and request.get("type") == "state":
                self.stream.send([(None, state_text(self.handler, self.file_id))])
            else:
                error = {"type": "error", "fileId": self.file_id, "code": "unknown_request",
                         "message": 'the only request is {"type": "state"}'}
                self.stream.send([(None, json.dumps(error, separators=(",", ":")))])


class _SseStream:
    """Server-Sent Events (HTML Living Standard, 9.2): UTF-8 text, one event per block ended by
    a blank line. `id:` lines make EventSource send Last-Event-ID when it reconnects; lines
    starting with ':' are comments, which keep an idle connection open through proxies. The
    body ends when the connection closes (no Content-Length)."""

    def __init__(self, handler):
        self.handler = handler
        self.sock = handler.connection

    def open(self):
        limit_send_buffer(self.sock)
        self.handler.close_connection = True
        self.handler.send_response(200)
        self.handler.send_headers({"Content-Type": "text/event-stream; charset=utf-8",
                                   "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self.sock.sendall(b"retry: %d\n\n" % SSE_RETRY_MS)

    def send(self, items):
        parts = []
        for event_id, text in items:
            if event_id:
                parts.append("id: %s\n" % event_id)
            parts.append("data: %s\n\n" % text)          # JSON has no raw newlines
        self.sock.sendall("".join(parts).encode("utf-8"))

    def receive_buffered(self, on_messages):
        pass

    def receive(self, on_messages):
        """An SSE client sends nothing after its request; readable means it went away."""
        try:
            return bool(self.sock.recv(4096))
        except OSError:
            return False

    def heartbeat(self):
        self.sock.sendall(b": keep-alive\n\n")
        return True

    def close(self, code, reason):
        pass                             # the server closes the connection: EventSource retries


class _WebSocketStream:
    """Events as WebSocket text messages; a ping per heartbeat, and a client that has not
    answered the last ping by the next one is closed (1011)."""

    def __init__(self, handler, key, max_message_bytes):
        self.handler = handler
        self.key = key
        self.max_message_bytes = max_message_bytes
        self.sock = handler.connection
        self.ws = None
        self._ping_sent_at = None
        self._pings = 0

    def open(self):
        limit_send_buffer(self.sock)
        self.handler.close_connection = False
        self.handler.send_response(101)
        self.handler.send_headers(websocket.handshake_headers(self.key))
        self.handler.close_connection = True    # no HTTP after the WebSocket ends
        self.ws = websocket.WebSocket(self.sock, self.max_message_bytes,
                                      _already_buffered(self.handler))

    def send(self, items):
        self.ws.send_texts([text for _, text in items])

    def receive_buffered(self, on_messages):
        on_messages(self.ws.receive(b""))

    def receive(self, on_messages):
        on_messages(self.ws.receive())
        return True

    def heartbeat(self):
        if self._ping_sent_at is not None and self.ws.last_heard < self._ping_sent_at:
            self.ws.abort(websocket.CLOSE_INTERNAL_ERROR, "ping timeout")
            return False
        self._pings += 1
        self._ping_sent_at = time.monotonic()
        self.ws.ping(b"%d" % self._pings)
        return True

    def close(self, code, reason):
        self.ws.close(code, reason)


def _already_buffered(handler):
    """Bytes http.server's reader took from the socket after the request's headers (a client
    should wait for our 101 before sending frames, but need not): read without waiting."""
    sock = handler.connection
    try:
        sock.settimeout(0)
        return handler.rfile.read1(65536) or b""
    except (OSError, ValueError):
        return b""
    finally:
        sock.settimeout(handler.timeout)


def limit_send_buffer(sock, size=SEND_BUFFER_BYTES):
    """A stream's kernel buffer bounds what a client that stops reading can hold up (live.py's
    streams too)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except OSError:
        pass


def new_selector():
    """poll() where there is one (no extra descriptor, no FD_SETSIZE limit), else select();
    live.py's streams wait on one too."""
    if hasattr(selectors, "PollSelector"):
        return selectors.PollSelector()
    return selectors.SelectSelector()
