"""connections.py - who may hold one of the server's connections, and for how long.

ThreadingHTTPServer gives every connection a thread, and the socket's timeout (--timeout)
bounds each read, not a request: 256 sockets sending one header byte every 20 s, or 256 idle
keep-alive connections, held every slot (issue #15). This table of connection slots is the one
place that decides who gets a slot and when a slot is taken back.

What it guarantees:
  * Admission (`admit`, on the accept thread, which it never blocks): at most --max-connections
    open, and at most --max-connections-per-client from one client address. When either is
    full, the connection idle longest between keep-alive requests (of that address, or of
    anyone) is closed to make room; only when none is idle is the new one refused: 503
    server_busy (server full) or 429 too_many_connections (that address). The caller writes
    the refusal without blocking and hands the socket to `linger`, which closes it later.
  * Deadlines, kept by one watchdog thread every TICK_S:
      head   the request line and header fields: --header-timeout from accept (first request)
             or from the request line (a later request on a keep-alive connection)
      idle   a keep-alive connection waiting for its next request: --idle-timeout
      body   a request body arrives at --min-body-rate bytes/s at least, measured over each
             --body-rate-window from its first read
    A connection past one is shut for reading: the handler's blocked read returns at once as
    the end of the stream, and `cut_reason` says why (the handler answers 408, or closes an
    idle connection without a word).
  * While the handler runs (route, response, an event stream, a long tus PATCH) no deadline
    applies but the body rate while a body is being read: a long response is never cut for
    its length, and the per-read --timeout stays the bound on a silent client.

What it does not do: bound how long a response takes to write (the socket's timeout bounds each
write), or tell apart clients behind one proxy: they share its address, so raise
--max-connections-per-client to --max-connections there (docs/security.md, "The HTTP
edge").
"""
from __future__ import annotations

import socket
import threading
import time

DEFAULT_HEADER_TIMEOUT_S = 10.0     # request line + header fields, whatever the pace
DEFAULT_IDLE_TIMEOUT_S = 5.0        # between requests on a keep-alive connection
DEFAULT_MIN_BODY_RATE = 1024        # bytes/s a request body must keep up (0: no minimum)
DEFAULT_BODY_RATE_WINDOW_S = 20.0   # ... measured over windows this long
AUTO = "auto"                       # --max-connections-per-client: half of --max-connections
TICK_S = 0.2                        # how often the watchdog looks (deadline precision)
REFUSAL_LINGER_S = 1.0              # a refused socket is read and discarded this long
MAX_LINGERING = 1024                # refused sockets lingering at once; beyond, closed at once
LINGER_READ_BYTES = 65536

HEAD, IDLE, BUSY = "head", "idle", "busy"
CUT_REASONS = {
    HEAD: "the request head took longer than %gs (--header-timeout)",
    IDLE: "idle longer than %gs between requests (--idle-timeout)",
    "body": "the body arrived slower than %d bytes/s (--min-body-rate)",
}


def resolve_per_client(value, max_connections):
    """The per-address cap for a server of `max_connections`; ValueError when above it."""
    if value == AUTO:
        return max(1, max_connections // 2)
    if value > max_connections:
        raise ValueError("--max-connections-per-client (%d) must not be above "
                         "--max-connections (%d)" % (value, max_connections))
    return value


class Limits:
    def __init__(self, max_connections, per_client, header_timeout=DEFAULT_HEADER_TIMEOUT_S,
                 idle_timeout=DEFAULT_IDLE_TIMEOUT_S, min_body_rate=DEFAULT_MIN_BODY_RATE,
                 body_rate_window=DEFAULT_BODY_RATE_WINDOW_S):
        self.max_connections = max_connections
        self.per_client = per_client
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.min_body_rate = min_body_rate
        self.body_rate_window = body_rate_window


class Slot:
    """One open connection. `state`/`deadline` change under the table's lock."""
    __slots__ = ("sock", "client", "state", "deadline", "idle_since", "body", "mark_at",
                 "mark_bytes", "cut_reason", "evicted")

    def __init__(self, sock, client, deadline):
        self.sock = sock
        self.client = client
        self.state = HEAD
        self.deadline = deadline
        self.idle_since = None
        self.body = None              # the request body being read (m1server._Body)
        self.mark_at = self.mark_bytes = 0
        self.cut_reason = None        # set once the watchdog shut it for reading
        self.evicted = False          # closed to make room: no longer counted


class Connections:
    def __init__(self, limits, clock=time.monotonic):
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._slots = {}              # socket -> Slot
        self._open = 0                # slots not evicted
        self._per_client = {}         # address -> slots not evicted
        self._lingering = []          # (socket, close at)
        self._stopped = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="m1-watchdog", daemon=True)

    def start(self):
        self._watchdog.start()

    def stop(self):
        self._stopped.set()
        with self._lock:
            lingering, self._lingering = self._lingering, []
        for sock, _ in lingering:
            _close(sock)

    def count(self):
        with self._lock:
            return self._open

    # -- the accept thread ------------------------------------------------------------------

    def admit(self, sock, client):
        """None when admitted, else (status, code, message) to refuse the connection with.
        Makes room by closing an idle keep-alive connection when it can."""
        limits = self.limits
        with self._lock:
            victims = []
            if self._per_client.get(client, 0) >= limits.per_client:
                victim = self._longest_idle(client)
                if victim is None and self._open >= limits.max_connections:
                    return (503, "server_busy", "too many connections; retry shortly")
                if victim is None:
                    return (429, "too_many_connections", "too many connections from your "
                            "address (--max-connections-per-client %d)" % limits.per_client)
                victims.append(self._evict(victim))
            if self._open >= limits.max_connections:
                victim = self._longest_idle(None)
                if victim is None:
                    return (503, "server_busy", "too many connections; retry shortly")
                victims.append(self._evict(victim))
            self._slots[sock] = Slot(sock, client, self._clock() + limits.header_timeout)
            self._open += 1
            self._per_client[client] = self._per_client.get(client, 0) + 1
        for victim in victims:
            _shut(victim.sock, socket.SHUT_RDWR)  # its handler reads the end and leaves
        return None

    def linger(self, sock):
        """Close a refused socket after REFUSAL_LINGER_S, reading what the client still sends
        meanwhile: closing with unread bytes resets the connection, and the client may lose
        the refusal (RFC 9112 9.6). Done by the watchdog, never on the accept thread."""
        _shut(sock, socket.SHUT_WR)
        with self._lock:
            if len(self._lingering) < MAX_LINGERING and not self._stopped.is_set():
                self._lingering.append((sock, self._clock() + REFUSAL_LINGER_S))
                return
        _close(sock)

    def release(self, sock):
        """The connection ended (its handler is done)."""
        with self._lock:
            slot = self._slots.pop(sock, None)
            if slot is not None and not slot.evicted:
                self._uncount(slot)

    def slot_of(self, sock):
        with self._lock:
            return self._slots[sock]

    # -- the handler's thread: where a connection stands ------------------------------------

    def await_request(self, slot, first):
        """Before reading a request line: the first one is under the head deadline set at
        accept; a later one waits idle."""
        if first:
            return
        with self._lock:
            slot.body = None
            slot.state = IDLE
            slot.idle_since = self._clock()
            slot.deadline = slot.idle_since + self.limits.idle_timeout

    def head_started(self, slot):
        """A request line arrived: the rest of the head is due within --header-timeout."""
        with self._lock:
            if slot.state == IDLE:
                slot.state = HEAD
                slot.deadline = self._clock() + self.limits.header_timeout

    def serving(self, slot):
        """The head is read: no deadline while the handler runs. False when the watchdog
        cut the connection first (the head arrived as it did)."""
        with self._lock:
            if slot.cut_reason is not None:
                return False
            slot.state = BUSY
            slot.deadline = None
            return True

    def body_started(self, slot, body):
        """`body` (with `length` and `remaining`) is being read: watch its rate."""
        with self._lock:
            slot.mark_at, slot.mark_bytes = self._clock(), 0
            slot.body = body

    # -- the watchdog -----------------------------------------------------------------------

    def _watch(self):
        while not self._stopped.wait(TICK_S):
            self.sweep()

    def sweep(self):
        """One look (the watchdog's, every TICK_S): shut every connection past a deadline
        for reading, and close the lingering sockets that are due."""
        now = self._clock()
        with self._lock:
            overdue = [slot for slot in self._slots.values() if self._overdue(slot, now)]
        for slot in overdue:
            _shut(slot.sock, socket.SHUT_RD)
        self._linger_step(now)

    def _overdue(self, slot, now):
        """Whether `slot` is past a deadline; notes why in slot.cut_reason (lock held)."""
        limits = self.limits
        if slot.cut_reason is not None or slot.evicted:
            return False
        if slot.deadline is not None and now >= slot.deadline:
            timeout = limits.header_timeout if slot.state == HEAD else limits.idle_timeout
            slot.cut_reason = CUT_REASONS[slot.state] % timeout
            return True
        body = slot.body
        if body is None or not limits.min_body_rate or not body.remaining or \
                now - slot.mark_at < limits.body_rate_window:
            return False
        received = body.length - body.remaining
        if received - slot.mark_bytes < limits.min_body_rate * (now - slot.mark_at):
            slot.cut_reason = CUT_REASONS["body"] % limits.min_body_rate
            return True
        slot.mark_at, slot.mark_bytes = now, received
        return False

    def _linger_step(self, now):
        with self._lock:
            lingering, self._lingering = self._lingering, []
        keep = []
        for sock, close_at in lingering:
            if now < close_at and _drained_open(sock):
                keep.append((sock, close_at))
            else:
                _close(sock)
        with self._lock:
            self._lingering.extend(keep)

    # -- helpers (lock held) ------------------------------------------------------------------

    def _longest_idle(self, client):
        idle = [s for s in self._slots.values() if s.state == IDLE and not s.evicted and
                s.cut_reason is None and (client is None or s.client == client)]
        return min(idle, key=lambda s: s.idle_since) if idle else None

    def _evict(self, slot):
        slot.evicted = True
        slot.cut_reason = "closed to make room"
        self._uncount(slot)
        return slot

    def _uncount(self, slot):
        self._open -= 1
        left = self._per_client[slot.client] - 1
        if left:
            self._per_client[slot.client] = left
        else:
            del self._per_client[slot.client]


def _shut(sock, how):
    """shutdown() on the socket itself: for a TLS socket, ssl.SSLSocket.shutdown would also
    drop its TLS state, and the handler's 408 would then go out unencrypted."""
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass                          # already closed or reset: nothing left to wake


def _drained_open(sock):
    """Read what a lingering socket holds without waiting; False once the client closed."""
    try:
        sock.setblocking(False)
        return bool(sock.recv(LINGER_READ_BYTES))
    except BlockingIOError:
        return True
    except OSError:
        return False


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass
