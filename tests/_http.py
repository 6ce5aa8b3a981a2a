"""Raw-socket HTTP helpers for the black-box tests.

`requests` normalises what it sends (it fixes Content-Length, drops dot segments, refuses
odd methods), so the tests that feed the server broken HTTP build the bytes themselves here:
a request is written as given, and the first response is read back by hand.

These helpers never retry and never sleep; a read that waits longer than its timeout raises
`socket.timeout`, so a server that hangs fails the test instead of hanging it.
"""
from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

CRLF = b"\r\n"
DEFAULT_TIMEOUT_S = 10.0


class RawResponse:
    """One HTTP response as read off the wire (`status` is None when nothing came back)."""

    def __init__(self, status=None, reason="", headers=None, body=b"", raw=b"", closed=False):
        self.status = status
        self.reason = reason
        self.headers = headers or {}      # lower-cased name -> last value
        self.body = body
        self.raw = raw
        self.closed = closed              # the server closed the connection after it

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "RawResponse(%r, %r, %r)" % (self.status, self.headers, self.raw[:300])


def address(url):
    parts = urlsplit(url)
    return parts.hostname, parts.port


def connect(url, timeout=DEFAULT_TIMEOUT_S):
    sock = socket.create_connection(address(url), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send_quietly(sock, data):
    """Send `data`; a server that answers early and closes may reset us mid-send."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def _recv(sock, size=65536):
    try:
        return sock.recv(size)
    except ConnectionResetError:
        return b""


def read_response(sock, timeout=DEFAULT_TIMEOUT_S):
    """Read one response: the head, then Content-Length bytes (or up to EOF without one)."""
    sock.settimeout(timeout)
    raw = b""
    while b"\r\n\r\n" not in raw:
        data = _recv(sock)
        if not data:
            return RawResponse(raw=raw, closed=True) if not raw else _parse(raw, closed=True)
        raw += data
    head, _, rest = raw.partition(b"\r\n\r\n")
    response = _parse_head(head)
    length = response.header("content-length")
    closed = False
    if response.status is not None and (response.status < 200 or response.status in (204, 304)):
        length = "0"                      # no body, whatever the headers say (RFC 9112 6.3)
        # bytes already read past this head belong to the next response: keep them for it
        if rest:
            raise AssertionError("bytes after an interim response: %r" % rest[:200])
    if length is not None and length.strip().isdigit():
        need = int(length)
        while len(rest) < need:
            data = _recv(sock)
            if not data:
                closed = True
                break
            rest += data
        body = rest[:need]
    else:
        while True:
            data = _recv(sock)
            if not data:
                closed = True
                break
            rest += data
        body = rest
    response.body = body
    response.raw = raw if len(raw) > len(head) + 4 + len(body) else head + b"\r\n\r\n" + body
    response.closed = closed
    return response


def _parse_head(head):
    lines = head.split(CRLF)
    status_line = lines[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    response = RawResponse(raw=head)
    if len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1].isdigit():
        response.status = int(parts[1])
        response.reason = parts[2] if len(parts) > 2 else ""
    for line in lines[1:]:
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            response.headers[name.strip().lower()] = value.strip()
    return response


def _parse(raw, closed):
    """A reply without a blank line after its head (e.g. an HTTP/0.9 body)."""
    if raw.startswith(b"HTTP/"):
        response = _parse_head(raw)
    else:
        response = RawResponse()
        response.body = raw
    response.raw = raw
    response.closed = closed
    return response


def wait_closed(sock, timeout=DEFAULT_TIMEOUT_S):
    """Read until the server closes; return everything it sent meanwhile."""
    sock.settimeout(timeout)
    got = b""
    while True:
        data = _recv(sock)
        if not data:
            return got
        got += data


def exchange(url, data, timeout=DEFAULT_TIMEOUT_S, shutdown_write=False):
    """Open a connection, send raw bytes, read one response, close."""
    sock = connect(url, timeout)
    try:
        send_quietly(sock, data)
        if shutdown_write:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        return read_response(sock, timeout)
    finally:
        sock.close()


def build_request(method, path, headers=(), body=b"", content_length=True, host="127.0.0.1",
                  version="HTTP/1.1", close=True):
    """Bytes of one request; `headers` is a list of (name, value) pairs sent as given."""
    if isinstance(path, str):
        path = path.encode("latin-1")
    lines = [method.encode("latin-1") + b" " + path + b" " + version.encode("latin-1")]
    names = {name.lower() for name, _ in headers}
    if "host" not in names:
        lines.append(b"Host: " + host.encode("latin-1"))
    if content_length and body is not None and "content-length" not in names and (
            body or method in ("POST", "PUT")):
        lines.append(b"Content-Length: " + str(len(body)).encode("ascii"))
    if close and "connection" not in names:
        lines.append(b"Connection: close")
    for name, value in headers:
        if isinstance(value, str):
            value = value.encode("latin-1")
        lines.append(name.encode("latin-1") + b": " + value)
    return CRLF.join(lines) + CRLF + CRLF + (body or b"")


def request(url, method, path, headers=(), body=b"", timeout=DEFAULT_TIMEOUT_S, **kw):
    return exchange(url, build_request(method, path, headers, body, **kw), timeout=timeout)


# --- multipart/form-data bodies (RFC 7578) ---------------------------------------------------

BOUNDARY = "m1testboundary7MA4YWxkTrZu0gW"


def _as_bytes(value):
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def part(name, value, filename=None, content_type=None, headers=None):
    """One part as a tuple for `multipart_body`; `headers` replaces the generated ones."""
    return (name, value, filename, content_type, headers)


def multipart_body(parts, boundary=BOUNDARY, close=True):
    """Encode parts; each is (name, value[, filename[, content_type[, raw header lines]]])."""
    out = []
    delimiter = b"--" + _as_bytes(boundary)
    for item in parts:
        item = tuple(item) + (None,) * (5 - len(item))
        name, value, filename, content_type, raw_headers = item
        out.append(delimiter + CRLF)
        if raw_headers is not None:
            for line in raw_headers:
                out.append(_as_bytes(line) + CRLF)
        else:
            disposition = b'Content-Disposition: form-data; name="' + _as_bytes(name) + b'"'
            if filename is not None:
                disposition += b'; filename="' + _as_bytes(filename) + b'"'
            out.append(disposition + CRLF)
            if content_type is not None:
                out.append(b"Content-Type: " + _as_bytes(content_type) + CRLF)
        out.append(CRLF + _as_bytes(value) + CRLF)
    if close:
        out.append(delimiter + b"--" + CRLF)
    return b"".join(out)


def chunk_parts(file_id, index, data, status="uploading", mime_type=None, checksum=None):
    """The parts of one valid seed upload request, the file part first (the seed's client's
    order; the server then receives the chunk into a part file)."""
    parts = [("file", data, "blob", "application/octet-stream"),
             ("fileId", file_id), ("chunkIndex", str(index)), ("status", status)]
    if mime_type is not None:
        parts.append(("mimeType", mime_type))
    if checksum is not None:
        parts.append(("checksum", checksum))
    return parts


def multipart_headers(boundary=BOUNDARY):
    return [("Content-Type", "multipart/form-data; boundary=" + boundary)]


def upload_request(parts, boundary=BOUNDARY, headers=None, **kw):
    """Bytes of a POST /api/video/upload with the given parts."""
    body = multipart_body(parts, boundary)
    return build_request("POST", "/api/video/upload",
                         multipart_headers(boundary) if headers is None else headers,
                         body, **kw)


def parse_response(raw):
    """Parse one complete response already read off the wire (e.g. by `wait_closed`)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return _parse(raw, closed=True)
    response = _parse_head(head)
    length = response.header("content-length")
    response.body = rest[:int(length)] if length and length.strip().isdigit() else rest
    response.raw = raw
    response.closed = True
    return response
