"""httphead.py - a request's head (request line and header fields), read strictly (RFC 9112).

Every request passes through here before anything routes it or reads its body. A proxy in
front of m1server and m1server itself must agree on where a request ends, or one client's
body becomes another request ("request smuggling"); http.server's own parser (the email
package) tolerates what a proxy may read differently, so the head is read here, in one pass
over its lines, and refused when it is ambiguous.

What it guarantees, for `read_request_line` + `parse_head` (each refusal is a HeadError with the
status to answer; after any of them the caller closes the connection, because where the next
request starts is no longer known):
  * Lines end with CRLF; a bare CR or LF inside the head is 400 (RFC 9112 2.2). A head cut short
    by the end of the stream is never served (400 incomplete_head), whatever it held so far.
  * The request line is `method SP target SP HTTP/1.x`: a token method, a target without
    spaces or control characters, HTTP/1.0 or 1.1 (1.2+ is read as 1.1, RFC 9110 2.5; 2.0+ is
    505; HTTP/0.9 is 400). Longer than the limit: 414.
  * A field line is `name ":" OWS value OWS` with a token name: whitespace before the colon is
    400 (RFC 9112 5.1); a line starting with SP or HTAB (obs-fold) is 400 (RFC 9112 5.2);
    control characters in a value (anything below 0x20 but HTAB, and 0x7F) are 400
    (RFC 9110 5.5). So no value that reaches a handler can carry a line break into a reply.
  * More than `max_fields` fields or `max_bytes` bytes of them: 431.
  * Framing (RFC 9112 6): this server decodes no transfer coding, so any Transfer-Encoding is
    refused (411 for chunked, asking for a Content-Length; 501 for another coding; 400 on
    HTTP/1.0, where it means faulty framing). Content-Length is ASCII digits, at most
    MAX_NUMBER_DIGITS; repeated (or a list) only with one value: otherwise 400.
  * Host (RFC 9112 3.2): exactly one on HTTP/1.1 and at most one on 1.0, `host[:port]` with a
    DNS name, IPv4 or [IPv6] host (or empty): otherwise 400.
  * `number()` is the one way a number is read from a request anywhere in m1server: ASCII
    digits only (str.isdigit() accepts '²', which int() refuses) and a length cap (int() of
    thousands of digits is slow, and refused on 3.11+).

What it does not do: trailers, absolute-form targets beyond passing them on (routing takes the
path of whatever target it is given), HTTP/2, or decoding percent-escapes (routing does).
"""
from __future__ import annotations

import http.client
import re

from apierror import ApiError

# The methods m1server routes (Handler.do_*); any other is answered 501, and counted in
# metrics as "other": a method name is the client's to choose, a label set must stay bounded.
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
DEFAULT_MAX_HEAD_BYTES = 64 << 10     # request line, and header fields together (--max-header-size)
DEFAULT_MAX_FIELDS = 100              # header field lines (--max-headers); http.server's own cap
MAX_NUMBER_DIGITS = 18                # below 2**63: every size and offset fits
MAX_LEADING_EMPTY_LINES = 4           # CRLFs before a request line are skipped (RFC 9112 2.2)

_TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# What a field value may hold (RFC 9110 5.5): visible ASCII, SP, HTAB, and obs-text.
_VALUE_BYTES = bytes(range(0x20, 0x7F)) + b"\t" + bytes(range(0x80, 0x100))
_TARGET_BYTES = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
_DIGITS = "0123456789"
HOST_PATTERN = re.compile(r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9._-]{0,253})(?::[0-9]{0,5})?\Z")
# Fields the framing and connection checks look at, by lower-cased name.
_WATCHED = {b"content-length", b"transfer-encoding", b"host", b"connection", b"expect"}


class HeadError(ApiError):
    """A head that cannot be served; `cut_short` when the stream ended inside it."""

    def __init__(self, status, code, message, cut_short=False):
        ApiError.__init__(self, status, code, message)
        self.cut_short = cut_short


class RequestHead:
    """What the request line and the header fields say, checked."""

    def __init__(self, method, target, version, headers, content_length, keep_alive,
                 expect_continue, host):
        self.method = method                  # a token, e.g. "GET"
        self.target = target                  # as sent ("//" in front reduced to "/")
        self.version = version                # "HTTP/1.0" or "HTTP/1.1"
        self.headers = headers                # http.client.HTTPMessage, as http.server's
        self.content_length = content_length  # int, or None when absent
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.host = host                      # the Host field, "" when absent


def number(text, max_digits=MAX_NUMBER_DIGITS):
    """A non-negative integer written in ASCII digits (at most `max_digits`), else None."""
    if not text or len(text) > max_digits or text.strip(_DIGITS):
        return None
    return int(text)


def read_request_line(rfile, max_bytes):
    """The request line without its CRLF, or None when the client closed before sending one
    (a keep-alive connection ending). 414 when longer than `max_bytes`."""
    for _ in range(MAX_LEADING_EMPTY_LINES + 1):
        line = _read_line(rfile, max_bytes, 414, "uri_too_long", "request line")
        if line is None:
            return None
        if line:
            return line
    raise HeadError(400, "bad_request", "empty lines instead of a request line")


def parse_head(request_line, rfile, max_bytes=DEFAULT_MAX_HEAD_BYTES,
               max_fields=DEFAULT_MAX_FIELDS):
    """Parse the request line, read and check the header fields -> RequestHead."""
    method, target, version = _parse_request_line(request_line)
    headers, watched = _read_fields(rfile, max_bytes, max_fields)
    content_length = _framing(version, watched)
    host = _host(version, watched.get(b"host", ()))
    connection = _tokens(watched.get(b"connection", ()))
    if "close" in connection:
        keep_alive = False
    else:
        keep_alive = version == "HTTP/1.1" or "keep-alive" in connection
    expect = watched.get(b"expect", ())
    expect_continue = version == "HTTP/1.1" and len(expect) == 1 and \
        expect[0].lower() == "100-continue"
    return RequestHead(method, target, version, headers, content_length, keep_alive,
                       expect_continue, host)


def printable(value):
    """True when `value` (a header value to echo) has no control character at all, HTAB
    included: what is echoed into a reply can never break its lines."""
    return not value.encode("latin-1", "replace").translate(None, _TARGET_BYTES + b" ")


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------

def _read_line(rfile, max_bytes, status, code, what):
    """One CRLF-terminated line without the CRLF; None at a clean end of stream."""
    line = rfile.readline(max_bytes + 2)
    if not line:
        return None
    if not line.endswith(b"\r\n"):
        if len(line) > max_bytes:
            raise HeadError(status, code, "%s longer than %d bytes" % (what, max_bytes))
        if not line.endswith(b"\n"):
            raise HeadError(400, "incomplete_head", "the connection ended inside the "
                            "request head", cut_short=True)
        raise HeadError(400, "bad_request", "a line of the head ends with a bare LF")
    line = line[:-2]
    if b"\r" in line:
        raise HeadError(400, "bad_request", "a bare CR inside the request head")
    return line


def _parse_request_line(line):
    parts = line.split(b" ")
    if len(parts) != 3:
        if len(parts) == 2:
            raise HeadError(400, "bad_request", "HTTP/0.9 requests are not supported")
        raise HeadError(400, "bad_request", "the request line is not 'method target version'")
    method, target, version = parts
    if not method or method.translate(None, _TCHARS):
        raise HeadError(400, "bad_request", "the method is not a token")
    if not target or target.translate(None, _TARGET_BYTES):
        raise HeadError(400, "bad_request", "the request target holds a control character")
    if len(version) != 8 or not version.startswith(b"HTTP/") or version[6:7] != b"." or \
            not version[5:6].isdigit() or not version[7:8].isdigit():
        raise HeadError(400, "bad_request", "the version is not HTTP/<digit>.<digit>")
    major, minor = version[5] - 48, version[7] - 48
    if major >= 2:
        raise HeadError(505, "http_version_not_supported", "HTTP/%d is not supported here; "
                        "use HTTP/1.1" % major)
    if major == 0:
        raise HeadError(400, "bad_request", "HTTP/0.9 requests are not supported")
    target = target.decode("latin-1")
    if target.startswith("//"):                  # "//host/path" would read as a host
        target = "/" + target.lstrip("/")
    return method.decode("ascii"), target, "HTTP/1.0" if minor == 0 else "HTTP/1.1"


def _read_fields(rfile, max_bytes, max_fields):
    """The field lines up to the empty line -> (HTTPMessage, {watched name: [values]})."""
    headers = http.client.HTTPMessage()
    watched = {}
    left = max_bytes
    while True:
        # a line fits when its CRLF does too (the empty line that ends the block always does)
        line = _read_line(rfile, max(0, left - 2), 431, "header_too_large",
                          "the header fields are")
        if line is None:
            raise HeadError(400, "incomplete_head", "the connection ended inside the "
                            "request head", cut_short=True)
        if not line:
            return headers, watched
        left -= len(line) + 2
        if len(headers) >= max_fields:
            raise HeadError(431, "header_too_large", "more than %d header fields" % max_fields)
        if line[:1] in (b" ", b"\t"):
            raise HeadError(400, "folded_header", "a folded header line (obs-fold) is not "
                            "accepted (RFC 9112 5.2)")
        colon = line.find(b":")
        name = line[:colon]
        if colon < 1 or name.translate(None, _TCHARS):
            raise HeadError(400, "malformed_header", "a header line is not 'name: value' "
                            "with a token name and no space before the colon")
        value = line[colon + 1:].strip(b" \t")
        if value.translate(None, _VALUE_BYTES):
            raise HeadError(400, "malformed_header", "a control character in the value of "
                            "header %s" % name[:64].decode("ascii"))
        text = value.decode("latin-1")
        headers[name.decode("ascii")] = text
        lower = name.lower()
        if lower in _WATCHED:
            watched.setdefault(lower, []).append(text)


def _framing(version, watched):
    """RFC 9112 6.1-6.3: the body's length, or None without a body; HeadError otherwise."""
    codings = watched.get(b"transfer-encoding")
    if codings is not None:
        if version == "HTTP/1.0":
            raise HeadError(400, "bad_request", "Transfer-Encoding on an HTTP/1.0 request")
        if _tokens(codings) == {"chunked"}:
            raise HeadError(411, "length_required", "send the body with a Content-Length "
                            "(chunked is not accepted)")
        raise HeadError(501, "not_implemented", "no transfer coding is supported; send the "
                        "body with a Content-Length")
    lengths = watched.get(b"content-length")
    if lengths is None:
        return None
    values = set(number(item.strip()) for value in lengths for item in value.split(","))
    if len(values) != 1 or None in values:
        raise HeadError(400, "bad_content_length",
                        "Content-Length must be one non-negative integer")
    return values.pop()


def _host(version, values):
    if len(values) > 1 or (not values and version == "HTTP/1.1"):
        raise HeadError(400, "invalid_host", "an HTTP/1.1 request needs exactly one Host "
                        "header (RFC 9112 3.2)")
    host = values[0] if values else ""
    if not HOST_PATTERN.match(host):
        raise HeadError(400, "invalid_host", "the Host header is not host[:port]")
    return host


def _tokens(values):
    return set(token.strip().lower() for value in values for token in value.split(","))
