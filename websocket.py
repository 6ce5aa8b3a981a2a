"""websocket.py - the server side of RFC 6455 (WebSocket) on the standard library alone.

What it does:
  * The opening handshake (RFC 6455 4.2): checks a client's request and computes
    `Sec-WebSocket-Accept`; a request that is not a valid handshake raises HandshakeError, an
    ApiError the HTTP edge answers with the JSON 400 envelope (with `Sec-WebSocket-Version: 13`
    when the version was the problem, 4.4).
  * Frames (5.2): server frames are sent unmasked; client frames must be masked (5.1), use no
    reserved bits or opcodes (no extension is ever negotiated), and control frames must be whole
    and at most 125 bytes (5.5). Fragmented messages are reassembled, with control frames
    allowed between their fragments (5.4); text must be UTF-8 (8.1).
  * Limits: a frame or message longer than `max_message_bytes` is refused with close code 1009
    as soon as its header says so, before its payload is read, so memory per connection stays
    bounded by that limit.
  * Ping/pong (5.5.2-3): every ping is answered with a pong carrying its payload; any frame
    from the client counts as a sign of life (`last_heard`), which the caller's keepalive uses.
  * The closing handshake (7.1): a Close from the client is answered with the same code and
    the connection ends; `close()` sends ours and waits (bounded) for the client's answer;
    `fail()` sends a Close with the error's code and lets the client read it before the
    socket goes away (it drains what the client still sends, bounded, so closing does not
    reset the connection under the client's feet).

What it does not do: the client side, extensions (permessage-deflate offers are ignored, as
9.1 allows), subprotocols, or threads: one WebSocket belongs to one thread, which reads when
the socket is readable and writes with the socket's timeout as the bound on a stalled peer.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import socket
import struct
import time

from apierror import ApiError
from options import DEFAULT_WS_MAX_MESSAGE_BYTES

# ---------------------------------------------------------------------------------------------
# Constants (RFC 6455 section numbers in the comments)
# ---------------------------------------------------------------------------------------------

ACCEPT_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"     # 1.3, 4.2.2
PROTOCOL_VERSION = "13"                                   # 4.1, 4.4
DEFAULT_MAX_MESSAGE_BYTES = DEFAULT_WS_MAX_MESSAGE_BYTES    # --ws-max-message (options.py)
CLOSE_TIMEOUT_S = 2.0                    # how long we wait for the client's Close answer
CLOSE_DRAIN_BYTES = 1 << 20              # most we read and discard after failing a connection
RECV_BYTES = 65536

OP_CONTINUATION = 0x0                    # 5.2
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)
MAX_CONTROL_PAYLOAD = 125                # 5.5

# Close codes (7.4.1). 1005 and 1006 are never sent; they only report what happened.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
MAX_CLOSE_REASON_BYTES = MAX_CONTROL_PAYLOAD - 2


def valid_close_code(code):
    """May a peer send this code in a Close frame (7.4.1, 7.4.2, and IANA's 1012-1014)?"""
    return (1000 <= code <= 1003 or 1007 <= code <= 1014) or 3000 <= code <= 4999


# ---------------------------------------------------------------------------------------------
# The opening handshake (4.2)
# ---------------------------------------------------------------------------------------------

class HandshakeError(ApiError):
    """The request asked for a WebSocket but is not a valid opening handshake: JSON 400."""

    def __init__(self, message, headers=None):
        ApiError.__init__(self, 400, "bad_websocket_handshake", message, headers)


def wants_upgrade(headers):
    """Does the request ask to switch to WebSocket (an `Upgrade` header naming it)?"""
    return "websocket" in _tokens(headers.get_all("Upgrade"))


def check_handshake(method, request_version, headers):
    """Check a client's opening handshake (4.2.1); returns its Sec-WebSocket-Key.

    `headers` is http.server's message object (repeated fields are seen with get_all).
    Raises HandshakeError for anything a conforming client would not send."""
    if method != "GET":
        raise HandshakeError("a WebSocket handshake must be a GET request")
    if _http_version(request_version) < (1, 1):
        raise HandshakeError("a WebSocket handshake needs HTTP/1.1 or later")
    if not headers.get("Host"):
        raise HandshakeError("the handshake has no Host header")
    if "upgrade" not in _tokens(headers.get_all("Connection")):
        raise HandshakeError("the handshake's Connection header must include Upgrade")
    if "websocket" not in _tokens(headers.get_all("Upgrade")):
        raise HandshakeError("the handshake's Upgrade header must include websocket")
    versions = [v.strip() for v in headers.get_all("Sec-WebSocket-Version") or []]
    if versions != [PROTOCOL_VERSION]:
        raise HandshakeError("Sec-WebSocket-Version must be %s" % PROTOCOL_VERSION,
                             {"Sec-WebSocket-Version": PROTOCOL_VERSION})
    keys = headers.get_all("Sec-WebSocket-Key") or []
    key = keys[0].strip() if len(keys) == 1 else ""
    try:
        nonce = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        nonce = b""
    if len(nonce) != 16:
        raise HandshakeError("Sec-WebSocket-Key must be one base64-encoded 16-byte value")
    return key


def accept_key(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (4.2.2 step 5.4)."""
    digest = hashlib.sha1((key + ACCEPT_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def handshake_headers(key):
    """The headers of the 101 Switching Protocols answer (no extension, no subprotocol)."""
    return {"Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Accept": accept_key(key)}


# ---------------------------------------------------------------------------------------------
# Frames (5.2)
# ---------------------------------------------------------------------------------------------

class ProtocolError(Exception):
    """The client broke RFC 6455; the connection is failed with `code` (7.1.7).

    `skip` is how many bytes at the head of the decoder's buffer (including ones not yet
    received) belong to the offending frame, so the closing handshake can still find the
    client's Close after it; None when the frame's length is unknown."""

    def __init__(self, code, reason, skip=0):
        Exception.__init__(self, reason)
        self.code = code
        self.reason = reason
        self.skip = skip


class Frame:
    __slots__ = ("fin", "opcode", "payload")

    def __init__(self, fin, opcode, payload):
        self.fin = fin
        self.opcode = opcode
        self.payload = payload


def encode_frame(opcode, payload, fin=True):
    """One server frame: never masked (5.1), the shortest length encoding (5.2)."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", first, size)
    elif size < 65536:
        header = struct.pack("!BBH", first, 126, size)
    else:
        header = struct.pack("!BBQ", first, 127, size)
    return header + payload


def close_payload(code, reason=""):
    reason_bytes = reason.encode("utf-8")[:MAX_CLOSE_REASON_BYTES]
    return struct.pack("!H", code) + reason_bytes


def unmask(payload, mask):
    """XOR the payload with the 4-byte masking key (5.3), as one big-integer operation."""
    size = len(payload)
    if size == 0:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little")


class FrameDecoder:
    """Client frames from a byte stream, fed as it arrives.

    Each header is checked as soon as it is complete, before its payload is waited for, so a
    frame over the limit is refused without ever being buffered; the buffer holds at most one
    frame of at most `max_payload` bytes plus what one recv() brought."""

    def __init__(self, max_payload):
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._skip = 0

    def feed(self, data):
        if self._skip:
            dropped = min(self._skip, len(data))
            data = data[dropped:]
            self._skip -= dropped
        self._buffer += data

    def skip(self, count):
        """Discard the next `count` bytes (those buffered first, then ones still to come)."""
        dropped = min(count, len(self._buffer))
        del self._buffer[:dropped]
        self._skip = count - dropped

    def next_frame(self):
        """The next complete frame, or None until more bytes arrive; ProtocolError if the
        client broke the framing rules."""
        buf = self._buffer
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        fin, reserved, opcode = bool(first & 0x80), first & 0x70, first & 0x0F
        masked, length = bool(second & 0x80), second & 0x7F
        offset = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length = struct.unpack_from("!H", buf, 2)[0]
            offset = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length = struct.unpack_from("!Q", buf, 2)[0]
            offset = 10
            if length >> 63:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "frame length has its top bit set",
                                    skip=None)
        frame_end = offset + (4 if masked else 0) + length
        if reserved:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set but no extension "
                                "was negotiated", skip=frame_end)
        if opcode not in DATA_OPCODES and opcode not in CONTROL_OPCODES:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "unknown opcode 0x%x" % opcode,
                                skip=frame_end)
        if not masked:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "client frames must be masked",
                                skip=frame_end)
        if opcode in CONTROL_OPCODES and (not fin or length > MAX_CONTROL_PAYLOAD):
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frames must be unfragmented "
                                "and at most 125 bytes", skip=frame_end)
        if length > self.max_payload:
            raise ProtocolError(CLOSE_TOO_BIG, "frame of %d bytes exceeds the %d-byte limit"
                                % (length, self.max_payload), skip=frame_end)
        if len(buf) < frame_end:
            return None
        mask = bytes(buf[offset:offset + 4])
        payload = unmask(bytes(buf[offset + 4:frame_end]), mask)
        del buf[:frame_end]
        return Frame(fin, opcode, payload)


# ---------------------------------------------------------------------------------------------
# One connection after the handshake
# ---------------------------------------------------------------------------------------------

class ConnectionClosed(Exception):
    """The WebSocket ended: `code` is the close code sent or received (1006: no Close)."""

    def __init__(self, code, reason="", by_peer=True):
        Exception.__init__(self, "%s %s" % (code, reason))
        self.code = code
        self.reason = reason
        self.by_peer = by_peer


class WebSocket:
    """A server-side WebSocket on a connected socket whose handshake is done.

    `receive()` is called when the socket is readable; `send_texts()`, `ping()` and `close()`
    write with the socket's timeout as the limit for a peer that stopped reading. `pending`
    is whatever the HTTP reader had already buffered after the handshake."""

    def __init__(self, sock, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, pending=b""):
        self.sock = sock
        self.max_message_bytes = max_message_bytes
        self.closed = False
        self.last_heard = time.monotonic()      # any frame from the client proves it lives
        self._decoder = FrameDecoder(max_message_bytes)
        self._decoder.feed(pending)
        self._message_opcode = None             # TEXT or BINARY while a message is fragmented
        self._fragments = []
        self._message_bytes = 0

    # -- sending ------------------------------------------------------------------------------

    def send_texts(self, texts):
        """Send text messages, all in one write."""
        self.sock.sendall(b"".join(encode_frame(OP_TEXT, t.encode("utf-8")) for t in texts))

    def ping(self, payload=b""):
        self.sock.sendall(encode_frame(OP_PING, payload))

    # -- receiving ----------------------------------------------------------------------------

    def receive(self, data=None):
        """Read once from the socket (or take `data`), answer pings, note pongs, reassemble
        messages. Returns the complete messages as (opcode, payload) pairs, payload a str for
        text. Raises ConnectionClosed once the connection is over (the peer closed it, we
        failed it for a protocol error, or the TCP connection ended)."""
        if data is None:
            try:
                data = self.sock.recv(RECV_BYTES)
            except OSError:
                data = b""
            if not data:
                self.closed = True
                raise ConnectionClosed(CLOSE_ABNORMAL, "connection dropped without a Close")
        self._decoder.feed(data)
        self.last_heard = time.monotonic()
        messages = []
        try:
            while True:
                frame = self._decoder.next_frame()
                if frame is None:
                    return messages
                message = self._on_frame(frame)
                if message is not None:
                    messages.append(message)
        except ProtocolError as error:
            self.fail(error.code, error.reason, error.skip)

    def _on_frame(self, frame):
        if frame.opcode == OP_PING:
            self.sock.sendall(encode_frame(OP_PONG, frame.payload))      # 5.5.3
            return None
        if frame.opcode == OP_PONG:
            return None                                                  # last_heard is set
        if frame.opcode == OP_CLOSE:
            self._on_close(frame.payload)
        return self._on_data(frame)

    def _on_close(self, payload):
        """The client started the closing handshake: answer with its code (5.5.1), done."""
        if len(payload) == 1:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a Close payload cannot be one byte")
        code, reason = CLOSE_NO_STATUS, ""
        if payload:
            code = struct.unpack("!H", payload[:2])[0]
            if not valid_close_code(code):
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "invalid close code %d" % code)
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not UTF-8")
        answer = close_payload(code) if code != CLOSE_NO_STATUS else b""
        self.closed = True
        try:
            self.sock.sendall(encode_frame(OP_CLOSE, answer))
        except OSError:
            pass
        raise ConnectionClosed(code, reason, by_peer=True)

    def _on_data(self, frame):
        """Reassemble fragmented messages (5.4): TEXT/BINARY starts one, CONTINUATION adds to
        it, FIN ends it; control frames may come in between (handled above)."""
        if frame.opcode == OP_CONTINUATION:
            if self._message_opcode is None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation frame with no message "
                                    "to continue")
        elif self._message_opcode is not None:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message before the fragmented one "
                                "was finished")
        else:
            self._message_opcode = frame.opcode
        self._message_bytes += len(frame.payload)
        if self._message_bytes > self.max_message_bytes:
            raise ProtocolError(CLOSE_TOO_BIG, "message exceeds the %d-byte limit"
                                % self.max_message_bytes)
        self._fragments.append(frame.payload)
        if not frame.fin:
            return None
        opcode, payload = self._message_opcode, b"".join(self._fragments)
        self._message_opcode, self._fragments, self._message_bytes = None, [], 0
        if opcode == OP_TEXT:
            try:
                return opcode, payload.decode("utf-8")                   # 8.1
            except UnicodeDecodeError:
                raise ProtocolError(CLOSE_INVALID_DATA, "text message is not valid UTF-8")
        return opcode, payload

    # -- closing ------------------------------------------------------------------------------

    def close(self, code=CLOSE_NORMAL, reason="", timeout=CLOSE_TIMEOUT_S):
        """Start the closing handshake (7.1.2): send our Close, then read (discarding data)
        until the client's Close arrives, the connection ends, or `timeout` passes. The caller
        then closes the TCP connection, as the server should (7.1.1)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(encode_frame(OP_CLOSE, close_payload(code, reason)))
        except OSError:
            return
        self._await_close(time.monotonic() + timeout)

    def fail(self, code, reason, skip=0):
        """_Fail the WebSocket Connection_ (7.1.7): send a Close with `code`, stop acting on
        the client's frames, and wait (bounded) for its Close so that it reads ours before the
        socket closes. Always raises ConnectionClosed."""
        self.closed = True
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        try:
            self.sock.settimeout(CLOSE_TIMEOUT_S)
            self.sock.sendall(encode_frame(OP_CLOSE, close_payload(code, reason)))
            if skip is None:
                _drain(self.sock, deadline)
            else:
                self._decoder.skip(skip)
                self._await_close(deadline)
        except OSError:
            pass
        raise ConnectionClosed(code, reason, by_peer=False)

    def abort(self, code, reason):
        """Give up on a client that stopped answering: send a Close if the socket takes it at
        once, and wait for nothing (the caller closes the connection)."""
        self.closed = True
        try:
            self.sock.settimeout(0)
            self.sock.send(encode_frame(OP_CLOSE, close_payload(code, reason)))
        except OSError:
            pass

    def _await_close(self, deadline):
        """Read frames until the client's Close (or the end, or the deadline)."""
        self._decoder.max_payload = max(self._decoder.max_payload, CLOSE_DRAIN_BYTES)
        drained = 0
        try:
            while True:
                frame = self._decoder.next_frame()
                while frame is not None:
                    if frame.opcode == OP_CLOSE:
                        return
                    frame = self._decoder.next_frame()
                left = deadline - time.monotonic()
                if left <= 0 or drained > CLOSE_DRAIN_BYTES:
                    return
                self.sock.settimeout(left)
                data = self.sock.recv(RECV_BYTES)
                if not data:
                    return
                drained += len(data)
                self._decoder.feed(data)
        except ProtocolError:
            _drain(self.sock, deadline)
        except OSError:
            return


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _tokens(values):
    """The lower-cased comma-separated tokens of repeated header fields ("a, b" -> {a, b});
    a protocol's version after '/' is ignored (`websocket/13` -> websocket)."""
    found = set()
    for value in values or []:
        for token in value.split(","):
            token = token.strip().lower().split("/", 1)[0]
            if token:
                found.add(token)
    return found


def _http_version(text):
    try:
        major, minor = text.split("/", 1)[1].split(".", 1)
        return int(major), int(minor)
    except (IndexError, ValueError):
        return 0, 9


def _drain(sock, deadline):
    """Stop sending, then read and discard what the client still sends (bounded in bytes and
    time), so closing the socket does not reset the connection before the client has read
    our Close frame (a close with unread data sends RST, RFC 1122 4.2.2.13)."""
    try:
        sock.shutdown(socket.SHUT_WR)
        drained = 0
        while drained < CLOSE_DRAIN_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            sock.settimeout(left)
            data = sock.recv(RECV_BYTES)
            if not data:
                return
            drained += len(data)
    except OSError:
        return
