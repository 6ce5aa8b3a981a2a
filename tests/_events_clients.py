"""Event-stream clients for the tests, written from the specs (not from the server's code).

  * SseClient: a plain Server-Sent Events reader on http.client, parsing the stream as the
    HTML Living Standard (9.2.6) says an EventSource does: `field: value` lines, one leading
    space dropped, comments (':') ignored but counted (they are the heartbeat), a blank line
    dispatches, the last event id persists across events.
  * RawWebSocket: a deliberately bare RFC 6455 client on a socket, for the protocol edges a
    polite library will not produce (unmasked frames, reserved bits, odd close codes, frames
    over the limit, a client that never answers pings or never reads).

The `websockets` package (PyPI) is the ordinary WebSocket client of the tests; these exist for
what it refuses to do. Every read has a timeout; nothing here sleeps or retries.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import struct
from urllib.parse import urlsplit

TIMEOUT_S = 15.0
ACCEPT_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"       # RFC 6455 1.3


def events_path(file_id, last_event_id=None):
    path = "/api/video/events/" + file_id
    if last_event_id:
        path += "?lastEventId=" + last_event_id
    return path


# ---------------------------------------------------------------------------------------------
# Server-Sent Events
# ---------------------------------------------------------------------------------------------

class SseEvent:
    def __init__(self, event_id, data, event_type="message"):
        self.id = event_id
        self.data = data
        self.type = event_type

    def json(self):
        return json.loads(self.data)

    def __repr__(self):
        return "SseEvent(id=%r, data=%r)" % (self.id, self.data[:200])


class SseClient:
    """GET an event stream with http.client and read events one by one."""

    def __init__(self, base_url, file_id, last_event_id=None, headers=None, timeout=TIMEOUT_S):
        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        sent = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last_event_id is not None:
            sent["Last-Event-ID"] = last_event_id
        sent.update(headers or {})
        self.conn.request("GET", events_path(file_id), headers=sent)
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.last_event_id = last_event_id or ""
        self.comments = 0
        self.retry_ms = None
        self.ended = False

    def body_json(self):
        return json.loads(self.response.read().decode("utf-8"))

    def next_event(self):
        """The next dispatched event, or None when the stream ended (9.2.6)."""
        data, event_type = [], ""
        while True:
            raw = self.response.readline()
            if not raw:
                self.ended = True
                return None
            line = raw.decode("utf-8").rstrip("\r\n")
            if line == "":
                if not data:
                    continue             # nothing to dispatch (e.g. after retry:)
                return SseEvent(self.last_event_id, "\n".join(data), event_type or "message")
            if line.startswith(":"):
                self.comments += 1
                continue
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "id" and "\0" not in value:
                self.last_event_id = value
            elif name == "event":
                event_type = value
            elif name == "retry" and value.isdigit():
                self.retry_ms = int(value)

    def next_json(self):
        event = self.next_event()
        assert event is not None, "the event stream ended early"
        return event.json()

    def read_comment(self):
        """Read until the next comment line (a heartbeat); returns False if the stream ends."""
        before = self.comments
        while self.comments == before:
            raw = self.response.readline()
            if not raw:
                return False
            if raw.startswith(b":"):
                self.comments += 1
        return True

    def close(self):
        self.response.close()            # the response holds the socket open otherwise
        self.conn.close()


# ---------------------------------------------------------------------------------------------
# A bare WebSocket client
# ---------------------------------------------------------------------------------------------

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA


def accept_for(key):
    return base64.b64encode(hashlib.sha1((key + ACCEPT_GUID).encode()).digest()).decode()


def encode_client_frame(opcode, payload, fin=True, masked=True, rsv=0, length=None):
    """A client frame; `length` overrides the header's length (to lie about it)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    size = len(payload) if length is None else length
    mask_bit = 0x80 if masked else 0
    if size < 126:
        header = struct.pack("!BB", first, mask_bit | size)
    elif size < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return header + payload
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawWebSocket:
    def __init__(self, base_url, path, key="dGhlIHNhbXBsZSBub25jZQ==", headers=(),
                 timeout=TIMEOUT_S, rcvbuf=None):
        parts = urlsplit(base_url)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((parts.hostname, parts.port))
        self.key = key
        lines = ["GET %s HTTP/1.1" % path, "Host: %s:%d" % (parts.hostname, parts.port),
                 "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: " + key,
                 "Sec-WebSocket-Version: 13"]
        lines += ["%s: %s" % pair for pair in headers]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.buffer = b""
        head = self._read_until(b"\r\n\r\n")
        status_line, _, rest = head.partition("\r\n")
        self.status = int(status_line.split(" ")[1])
        self.headers = {}
        for line in rest.split("\r\n"):
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def _read_until(self, marker):
        while marker not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            self.buffer += data
        head, _, self.buffer = self.buffer.partition(marker)
        return head.decode("latin-1")

    def _read_exactly(self, count):
        while len(self.buffer) < count:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            self.buffer += data
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def send_frame(self, opcode, payload=b"", **kw):
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        self.sock.sendall(encode_client_frame(opcode, payload, **kw))

    def send_close(self, code=None, reason=b""):
        payload = b"" if code is None else struct.pack("!H", code) + reason
        self.send_frame(OP_CLOSE, payload)

    def recv_frame(self):
        """(fin, opcode, payload) of the next server frame; EOFError when the server closed."""
        first, second = self._read_exactly(2)
        assert not second & 0x80, "server frames must not be masked"
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", self._read_exactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", self._read_exactly(8))[0]
        return bool(first & 0x80), first & 0x0F, self._read_exactly(size)

    def recv_json(self, answer_pings=True):
        """The next text message as JSON (pings are answered and skipped)."""
        while True:
            fin, opcode, payload = self.recv_frame()
            if opcode == OP_PING and answer_pings:
                self.send_frame(OP_PONG, payload)
                continue
            assert opcode == OP_TEXT and fin, (opcode, payload[:100])
            return json.loads(payload.decode("utf-8"))

    def expect_close(self):
        """Skip data frames until the server's Close; return (code, reason)."""
        while True:
            fin, opcode, payload = self.recv_frame()
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return code, payload[2:].decode("utf-8", "replace")

    def read_to_eof(self):
        """Read until the server closes the TCP connection (raises socket.timeout if never)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return
            if not data:
                return

    def close(self):
        self.sock.close()
