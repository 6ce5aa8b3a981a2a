"""A streaming multipart/form-data parser (RFC 7578 on top of RFC 2046 §5.1).

What it is
----------
`parse()` reads one request body through a `read_into(view)` callable, splits it into parts,
streams every file part into a writable file object as the bytes arrive, and returns a `Form`
holding the small text fields decoded as UTF-8. Standard library only, CPython 3.7-3.13.

The shape of a body with boundary "b" (RFC 2046 §5.1.1):

    preamble                          ignored
    CRLF --b [padding] CRLF           delimiter line; the CRLF in front belongs to the delimiter
    Content-Disposition: form-data; name="x"; filename="y.webm" CRLF
    Content-Type: video/webm CRLF
    CRLF                              blank line: end of this part's headers
    ...the part's bytes...
    CRLF --b [padding] CRLF           the next part begins
    ...
    CRLF --b--                        close delimiter
    epilogue                          read and discarded

So a part's bytes end exactly where the next "CRLF--b" begins; the parser only has to find
that one byte string, which `bytearray.find` does at memory speed.

What it guarantees
------------------
* Bounded memory. The parser owns one buffer (one block plus room for one part's headers);
  file parts go to their file a buffer at a time and are never held whole; in-memory fields
  are capped by `Limits.max_field_bytes` and their number by `Limits.max_parts`. With the
  defaults the worst case is 1 MiB + 16 KiB of buffer plus 16 x 64 KiB of field values.
* Every limit raises `LimitExceeded` (HTTP 413) as soon as the limit is passed; nothing is
  ever silently cut short. Exactly the limit is allowed, one byte (or part) more is not.
* A body that ends before its close delimiter raises `MultipartError`; a truncated upload
  never comes back as a shorter, valid-looking part.
* Malformed input raises `MultipartError` (400) with a stable `code`. Exceptions raised by
  the caller's `read_into` and `open_file` and by the files' `write` propagate unchanged;
  ValueError means the caller broke the contract (a bad argument, or read_into claiming
  more bytes than the view holds).

Decisions on what to tolerate (each one is tested)
--------------------------------------------------
* Accepted: a preamble; a body that starts directly with "--b" (no CRLF before it; the
  parser behaves as if the body began with CRLF); transport padding (spaces and tabs) after
  a delimiter; no CRLF after the close delimiter; any epilogue; header names in any case;
  parameter values quoted (with backslash escapes) or bare.
* "CRLF--b" followed by anything other than "--", a space, a tab, CR or LF is not a
  delimiter: the boundary was only the prefix of some longer text, and those bytes are part
  data (Go's mime/multipart and Werkzeug read it the same way). Once a space, tab, CR or LF
  follows, it is a delimiter line and must be padding then CRLF, or the body is malformed.
* Refused: line ends other than CRLF inside part headers and on delimiter lines (RFC 2046
  and RFC 7578 require CRLF and every browser, curl and requests send it; accepting bare LF
  is how two parsers come to disagree about where a part starts); folded header lines
  (obsolete, RFC 7230 §3.2.4 lets a recipient reject them); a header given twice in one part;
  control characters in header values; a Content-Disposition that is not "form-data" or has
  no name; a Content-Transfer-Encoding other than 7bit/8bit/binary (RFC 7578 §4.7: senders
  must not use one, and bytes we cannot decode are better refused than stored encoded).

What it does not do
-------------------
* It does not read `filename*` (RFC 5987; RFC 7578 §4.2 forbids senders to use it). A part
  that has one is still streamed as a file; its `filename` is the plain `filename=` or None.
* It does not undo the %22/%0D/%0A escapes browsers put in names and filenames (HTML spec):
  a literal "%22" could not be told apart. Names come back as sent.
* It does not sanitise filenames: never join one into a path.
* It does not decode field values in any charset but UTF-8 (`_charset_` and charset
  parameters are not honoured), and does not descend into nested multipart/mixed parts.
* It does not know about Content-Length, sockets or timeouts: `read_into` is the caller's,
  bounded by Content-Length, and its exceptions propagate. It never closes or removes the
  files `open_file` returned; on an error the caller cleans up what it opened.
"""
from __future__ import annotations

import re

__all__ = [
    "DEFAULT_BLOCK_SIZE", "MAX_PARTS", "MAX_FIELD_BYTES", "MAX_PART_HEADER_BYTES",
    "MultipartError", "LimitExceeded", "Limits", "Field", "FilePart", "Form",
    "boundary_from_content_type", "parse",
]

# --------------------------------------------------------------------------------------------
# Limits (each one is overridable through `Limits`, and by the server's flags)

DEFAULT_BLOCK_SIZE = 1 << 20          # bytes asked of read_into per call
MAX_PARTS = 16                        # parts in one body
MAX_FIELD_BYTES = 64 * 1024           # one in-memory (non-file) field value
MAX_PART_HEADER_BYTES = 16 * 1024     # all header lines of one part together
MAX_BOUNDARY_LENGTH = 70              # RFC 2046 §5.1.1: 1 to 70 characters

# --------------------------------------------------------------------------------------------
# Errors: one small family, mapped to the JSON error envelope at the HTTP edge


class MultipartError(Exception):
    """The body is not well-formed multipart/form-data. `.status` is the HTTP status to
    answer with, `.code` a stable machine-readable code, `.message` a sentence for humans."""

    status = 400
    code = "malformed_multipart"

    def __init__(self, message, code=None, status=None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class LimitExceeded(MultipartError):
    """A configured limit was passed (HTTP 413). The parser always passes a specific code:
    too_many_parts, field_too_large, part_header_too_large, file_too_large, body_too_large."""

    status = 413
    code = "too_large"


class Limits:
    """The bounds `parse` enforces, each allowed exactly and refused one past:

    max_parts              parts in the body
    max_field_bytes        bytes of one in-memory field value (before decoding)
    max_part_header_bytes  one part's header block: the padding after its boundary plus every
                           header line with its CRLF
    max_file_bytes         bytes of each streamed file part, on its own (None: unlimited)
    max_body_bytes         every byte read, preamble and epilogue included (None: unlimited)

    The first three bound the parser's memory, so they must be numbers."""

    __slots__ = ("max_parts", "max_field_bytes", "max_part_header_bytes",
                 "max_file_bytes", "max_body_bytes")

    def __init__(self, max_parts=MAX_PARTS, max_field_bytes=MAX_FIELD_BYTES,
                 max_part_header_bytes=MAX_PART_HEADER_BYTES, max_file_bytes=None,
                 max_body_bytes=None):
        for name, value, optional in (("max_parts", max_parts, False),
                                      ("max_field_bytes", max_field_bytes, False),
                                      ("max_part_header_bytes", max_part_header_bytes, False),
                                      ("max_file_bytes", max_file_bytes, True),
                                      ("max_body_bytes", max_body_bytes, True)):
            if value is None and optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError("%s must be a non-negative int, not %r" % (name, value))
        self.max_parts = max_parts
        self.max_field_bytes = max_field_bytes
        self.max_part_header_bytes = max_part_header_bytes
        self.max_file_bytes = max_file_bytes
        self.max_body_bytes = max_body_bytes

    def __repr__(self):
        return "Limits(%s)" % ", ".join("%s=%r" % (n, getattr(self, n)) for n in self.__slots__)


# --------------------------------------------------------------------------------------------
# What a parse returns


class Field:
    """A form field kept in memory: `.value` is its bytes decoded as UTF-8 (strict);
    `.headers` maps lower-cased header names to values."""

    __slots__ = ("name", "value", "headers")

    def __init__(self, name, value, headers):
        self.name = name
        self.value = value
        self.headers = headers

    def __repr__(self):
        return "Field(name=%r, value=%r)" % (self.name, _shorten(self.value))


class FilePart:
    """A part streamed into the object `open_file` returned (`.file`); `.size` counts the
    bytes written to it. `.filename` is None for a part streamed only because of its name."""

    __slots__ = ("name", "filename", "content_type", "size", "file", "headers")

    def __init__(self, name, filename, content_type, file, headers):
        self.name = name
        self.filename = filename
        self.content_type = content_type
        self.size = 0
        self.file = file
        self.headers = headers

    def __repr__(self):
        return "FilePart(name=%r, filename=%r, content_type=%r, size=%d)" % (
            self.name, self.filename, self.content_type, self.size)


class Form:
    """Every part of one body: `.parts` in body order, split into `.fields` and `.files`."""

    __slots__ = ("parts", "fields", "files")

    def __init__(self):
        self.parts = []
        self.fields = []
        self.files = []

    def field_values(self, name):
        """Every value sent for the field `name`, in body order (a field may repeat)."""
        return [field.value for field in self.fields if field.name == name]

    def _add(self, part):
        self.parts.append(part)
        (self.files if isinstance(part, FilePart) else self.fields).append(part)

    def __repr__(self):
        return "Form(%r)" % (self.parts,)


# --------------------------------------------------------------------------------------------
# Public entry points


def boundary_from_content_type(content_type):
    """The boundary of a `multipart/form-data` Content-Type header value, as bytes.

    Raises MultipartError: not_multipart (415) for any other media type, malformed_multipart
    (400) when the boundary parameter is missing, given twice, or not 1-70 RFC 2046 bchars
    ending in a non-space (quoted, with backslash escapes, or bare)."""
    match = _MEDIA_TYPE.match(content_type or "")
    if not match or match.group(1).lower() != "multipart/form-data":
        raise MultipartError("Content-Type must be multipart/form-data", code="not_multipart",
                             status=415)
    parameters = _parse_parameters(content_type, match.end(), "Content-Type")
    boundary = parameters.get("boundary")
    if boundary is None:
        raise MultipartError("multipart/form-data Content-Type has no boundary parameter")
    if not _BOUNDARY.match(boundary):
        raise MultipartError("the multipart boundary must be 1 to 70 letters, digits or "
                             "'()+_,-./:=? characters, not ending in a space (RFC 2046)")
    return boundary.encode("ascii")


def parse(read_into, boundary, open_file, limits=None, stream_names=("file",),
          block_size=DEFAULT_BLOCK_SIZE, form=None):
    """Parse one multipart/form-data body and return its `Form`.

    read_into(view) fills up to len(view) bytes of the memoryview and returns how many; 0
    means the body has ended. open_file(name, filename, content_type) returns a binary
    writable file for a part that has a filename parameter or whose name is in stream_names;
    the parser writes the part's bytes to it as memoryview slices that are valid only during
    the call (a file that keeps one must copy it), and never closes it. Every other part is a
    Field, held in memory and decoded as UTF-8.

    `form`: the Form to fill (default: a new one), so that open_file can look at the parts
    that came before its own: when it is called, every earlier part is in the form, whole
    (a server that receives the text fields first can decide where the file's bytes go)."""
    if isinstance(boundary, str):
        boundary = boundary.encode("ascii")
    if not isinstance(boundary, bytes) or not _BOUNDARY.match(boundary.decode("latin-1")):
        raise ValueError("boundary must be 1-70 RFC 2046 characters, as returned by "
                         "boundary_from_content_type, not %r" % (boundary,))
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError("block_size must be a positive int, not %r" % (block_size,))
    if limits is None:
        limits = Limits()
    parser = _Parser(read_into, boundary, open_file, limits, stream_names, block_size,
                     Form() if form is None else form)
    return parser.run()


# --------------------------------------------------------------------------------------------
# The parser: a small state machine over one reusable buffer
#
# The buffer holds the unread bytes in [start, end). Each state consumes what it can from
# there and returns True to run again, or False when it needs more bytes; then `_fill` reads
# the next block behind them. The states, in the order the bytes travel:
#
#   _read_preamble       skip to the first delimiter
#   _read_part_headers   the delimiter line's padding and the part's headers, up to CRLF CRLF
#   _read_part_body      the part's bytes, up to the next delimiter
#   _read_epilogue       after the close delimiter: read to the end and discard
#
# Only in the epilogue may the body end; anywhere else the end of the body is an error.

_DASH = ord("-")
_DELIMITER_LINE_START = frozenset(b" \t\r\n")   # after "CRLF--b": a delimiter line, for sure
_HEADERS_END = b"\r\n\r\n"

# What the bytes after a match of "CRLF--b" in the buffer make of it.
_NEED_MORE = "need more bytes"
_NOT_A_DELIMITER = "not a delimiter"
_PART = "part delimiter"
_CLOSE = "close delimiter"


class _Parser:

    def __init__(self, read_into, boundary, open_file, limits, stream_names, block_size, form):
        self.read_into = read_into
        self.open_file = open_file
        self.limits = limits
        self.stream_names = stream_names
        self.block_size = block_size
        # RFC 2046 §5.1.1: "The boundary delimiter MUST occur at the beginning of a line",
        # so the delimiter we search for includes the CRLF before "--boundary".
        self.delimiter = b"\r\n--" + boundary
        # Room for one block behind whatever must stay in the buffer while more is read:
        # a possible partial delimiter (plus the two bytes that tell a close delimiter), or
        # one whole header block (headers are parsed in one piece once CRLF CRLF is in).
        self.capacity = block_size + max(len(self.delimiter) + 2,
                                         limits.max_part_header_bytes + len(_HEADERS_END))
        self.buffer = bytearray(self.capacity)
        self.view = memoryview(self.buffer)
        # Pretend the body began with CRLF, so that a body opening with "--b" (the usual
        # case: an empty preamble) needs no special case. These two bytes were not read,
        # so they are not counted in body_bytes.
        self.buffer[0:2] = b"\r\n"
        self.start = 0          # first unconsumed byte
        self.end = 2            # one past the last byte read
        self.scan = 0           # where the next search may begin (bytes before are settled)
        self.body_bytes = 0     # bytes read_into returned so far
        self.parts_started = 0
        self.part = None        # the Field or FilePart being read
        self.field_value = bytearray()
        self.form = form
        self.state = self._read_preamble

    def run(self):
        while True:
            while self.state():
                pass
            if self._fill() == 0:
                return self._end_of_body()

    # ---- reading ---------------------------------------------------------------------------

    def _fill(self):
        """Read the next block into the buffer behind the unconsumed bytes; return its size."""
        if self.start == self.end:
            self.start = self.end = self.scan = 0
        elif self.start > 0 and self.capacity - self.end < self.block_size:
            # Move the few unconsumed bytes to the front (a partial delimiter or a header block
            # in progress). A copy through bytes keeps overlapping ranges safe.
            kept = bytes(self.view[self.start:self.end])
            self.buffer[0:len(kept)] = kept
            self.scan -= self.start
            self.start, self.end = 0, len(kept)
        want = min(self.block_size, self.capacity - self.end)
        max_body = self.limits.max_body_bytes
        if max_body is not None:
            # Ask for at most one byte past the limit: enough to know it was passed.
            want = min(want, max_body - self.body_bytes + 1)
        count = self.read_into(self.view[self.end:self.end + want])
        if not 0 <= count <= want:
            raise ValueError("read_into returned %r for a view of %d bytes" % (count, want))
        self.body_bytes += count
        if max_body is not None and self.body_bytes > max_body:
            raise LimitExceeded("the request body is larger than %d bytes" % max_body,
                                code="body_too_large")
        self.end += count
        return count

    def _end_of_body(self):
        if self.state == self._read_epilogue:
            return self.form
        if self.state == self._read_preamble:
            where = "before its first boundary delimiter"
        elif self.state == self._read_part_headers:
            where = "inside the headers of part %d" % self.parts_started
        else:
            where = "inside part %d, before its closing boundary delimiter" % self.parts_started
        raise MultipartError("the multipart body ended " + where)

    # ---- finding delimiters ----------------------------------------------------------------

    def _find_delimiter(self):
        """Search the unread bytes for the next real delimiter.

        Returns (position, kind) with kind _PART or _CLOSE; or (position, None) when more
        bytes are needed, in which case every byte before `position` is known not to begin
        a delimiter and may be consumed."""
        delimiter = self.delimiter
        while True:
            at = self.buffer.find(delimiter, self.scan, self.end)
            if at < 0:
                # A delimiter may still begin within the last len(delimiter) - 1 bytes.
                return max(self.scan, self.end - len(delimiter) + 1), None
            kind = self._classify(at)
            if kind is _NOT_A_DELIMITER:
                self.scan = at + 1      # e.g. "CRLF--bX": the boundary was a prefix of data
            elif kind is _NEED_MORE:
                return at, None
            else:
                return at, kind

    def _classify(self, at):
        after = at + len(self.delimiter)
        if after >= self.end:
            return _NEED_MORE
        byte = self.buffer[after]
        if byte == _DASH:
            if after + 1 >= self.end:
                return _NEED_MORE
            return _CLOSE if self.buffer[after + 1] == _DASH else _NOT_A_DELIMITER
        return _PART if byte in _DELIMITER_LINE_START else _NOT_A_DELIMITER

    def _enter_delimiter(self, at, kind):
        after = at + len(self.delimiter)
        if kind is _CLOSE:
            self.start = self.scan = after + 2
            self.state = self._read_epilogue
            return
        self.parts_started += 1
        if self.parts_started > self.limits.max_parts:
            raise LimitExceeded("the form has more than %d parts" % self.limits.max_parts,
                                code="too_many_parts")
        self.start = self.scan = after
        self.state = self._read_part_headers

    # ---- the states ------------------------------------------------------------------------

    def _read_preamble(self):
        at, kind = self._find_delimiter()
        self.start = self.scan = at         # the preamble is dropped as it is read
        if kind is None:
            return False
        self._enter_delimiter(at, kind)
        return True

    def _read_part_headers(self):
        # [start, end) begins just after "--b": padding, CRLF, header lines, CRLF CRLF.
        limit = self.limits.max_part_header_bytes
        at = self.buffer.find(_HEADERS_END, self.scan, self.end)
        # The header bytes are at - start: the padding plus each header line with its CRLF
        # (the first CRLF ends the delimiter line, the last belongs to the blank line).
        if at < 0:
            if self.end - self.start > limit + len(_HEADERS_END) - 1:
                raise self._headers_too_large()
            self.scan = max(self.start, self.end - len(_HEADERS_END) + 1)
            return False
        if at - self.start > limit:
            raise self._headers_too_large()
        block = bytes(self.view[self.start:at])
        self.start = self.scan = at + len(_HEADERS_END)
        self._begin_part(block)
        self.state = self._read_part_body
        return True

    def _read_part_body(self):
        at, kind = self._find_delimiter()
        self._take(self.start, at)          # bytes before `at` are this part's, either way
        self.start = self.scan = at
        if kind is None:
            return False
        self._finish_part()
        self._enter_delimiter(at, kind)
        return True

    def _read_epilogue(self):
        self.start = self.scan = self.end   # RFC 2046: the epilogue is to be ignored
        return False

    # ---- parts -----------------------------------------------------------------------------

    def _headers_too_large(self):
        return LimitExceeded("the headers of part %d are larger than %d bytes"
                             % (self.parts_started, self.limits.max_part_header_bytes),
                             code="part_header_too_large")

    def _begin_part(self, block):
        name, filename, named_file, headers = \
            _common_part_headers(block) or self._part_headers(block)
        if named_file or name in self.stream_names:
            content_type = headers.get("content-type")
            file = self.open_file(name, filename, content_type)
            self.part = FilePart(name, filename, content_type, file, headers)
        else:
            self.part = Field(name, None, headers)
            self.field_value = bytearray()

    def _part_headers(self, block):
        """One part's header block, read by the rules of the module docstring: (name,
        filename or None, whether a filename parameter of either kind was given, headers)."""
        lines = block.split(b"\r\n")
        if lines[0].strip(b" \t"):
            raise MultipartError("unexpected bytes after the boundary of part %d: a delimiter "
                                 "line must end with optional spaces or tabs and CRLF"
                                 % self.parts_started)
        headers = _parse_part_headers(lines[1:], self.parts_started)
        disposition = headers.get("content-disposition")
        if disposition is None:
            raise MultipartError("part %d has no Content-Disposition header (RFC 7578 §4.2)"
                                 % self.parts_started)
        match = _DISPOSITION_TYPE.match(disposition)
        if not match or match.group(1).lower() != "form-data":
            raise MultipartError("part %d: Content-Disposition must be form-data"
                                 % self.parts_started)
        parameters = _parse_parameters(disposition, match.end(), "Content-Disposition")
        name = parameters.get("name")
        if name is None:
            raise MultipartError("part %d has no name parameter (RFC 7578 §4.2)"
                                 % self.parts_started)
        encoding = headers.get("content-transfer-encoding")
        if encoding is not None and encoding.lower() not in ("7bit", "8bit", "binary"):
            raise MultipartError("part %d: Content-Transfer-Encoding %s is not supported "
                                 "(RFC 7578 §4.7)" % (self.parts_started, _shorten(encoding)))
        filename = parameters.get("filename")
        return name, filename, filename is not None or "filename*" in parameters, headers

    def _take(self, begin, end):
        """Bytes [begin, end) of the buffer are confirmed data of the current part."""
        count = end - begin
        if count <= 0:
            return
        part = self.part
        if isinstance(part, FilePart):
            max_file = self.limits.max_file_bytes
            if max_file is not None and part.size + count > max_file:
                raise LimitExceeded("file part %r is larger than %d bytes"
                                    % (_shorten(part.name), max_file), code="file_too_large")
            _write_all(part.file, self.view[begin:end])
            part.size += count
        else:
            max_field = self.limits.max_field_bytes
            if len(self.field_value) + count > max_field:
                raise LimitExceeded("field %r is larger than %d bytes"
                                    % (_shorten(part.name), max_field), code="field_too_large")
            self.field_value += self.view[begin:end]

    def _finish_part(self):
        part = self.part
        if isinstance(part, Field):
            try:
                part.value = self.field_value.decode("utf-8")
            except UnicodeDecodeError:
                raise MultipartError("field %r is not valid UTF-8" % _shorten(part.name),
                                     code="invalid_encoding") from None
            self.field_value = bytearray()
        self.form._add(part)
        self.part = None


def _write_all(file, view):
    """Write every byte of `view`: a raw (unbuffered) file may take only some per call."""
    while view:
        written = file.write(view)
        if written is None or written >= len(view):
            return                      # None: a file-like object that does not report
        if written <= 0:
            raise OSError("the part file accepted no bytes")
        view = view[written:]


# --------------------------------------------------------------------------------------------
# Headers and parameters (RFC 7578 §4, RFC 7230 §3.2, RFC 7231 §3.1.1.1, RFC 6266 §4.1)

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"                 # RFC 7230 §3.2.6 tchar
_HEADER_NAME = re.compile(_TOKEN.encode("ascii"))
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")      # CTL except HTAB
_MEDIA_TYPE = re.compile(r"[ \t]*(%s/%s)" % (_TOKEN, _TOKEN))
_DISPOSITION_TYPE = re.compile(r"[ \t]*(%s)" % _TOKEN)
# One parameter: ; name = value, where value is a quoted-string (with backslash escapes) or
# bare. Bare values are any run without whitespace, controls, ';', '"' or '\': a little wider
# than a token, so that e.g. boundary=----=_Part_1 is read as its sender meant.
# An empty parameter (a stray or trailing ';') is allowed.
_PARAMETER = re.compile(
    r'[ \t]*;[ \t]*(?:(%s)[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^\x00-\x20\x7f;"\\]+)))?[ \t]*'
    % _TOKEN, re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
# RFC 2046 §5.1.1: bchars, 1 to 70 of them, the last not a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,%d}[0-9A-Za-z'()+_,\-./:=?]\Z"
                       % (MAX_BOUNDARY_LENGTH - 1))


# The header block browsers, curl and requests send for nearly every part, in their spelling:
# what _part_headers would read from it, found with one match (a request's parts cost a few
# microseconds each instead of tens). Anything else (another case, padding, escapes, other
# headers) goes the general way; so does a block this match reads but UTF-8 does not.
_COMMON_HEADERS = re.compile(
    rb'\r\nContent-Disposition: (form-data; name="([^"\\\x00-\x1f\x7f]*)"'
    rb'(?:; filename="([^"\\\x00-\x1f\x7f]*)")?)'
    rb'(?:\r\nContent-Type: ([!-~](?:[ -~]*[!-~])?))?\Z')


def _common_part_headers(block):
    """(name, filename, whether a filename was given, headers) of a header block in the
    common spelling, or None to read it the general way."""
    match = _COMMON_HEADERS.match(block)
    if match is None:
        return None
    disposition, name, filename, content_type = match.groups()
    try:
        headers = {"content-disposition": disposition.decode("utf-8")}
        name = name.decode("utf-8")
        filename = filename.decode("utf-8") if filename is not None else None
    except UnicodeDecodeError:
        return None
    if content_type is not None:
        headers["content-type"] = content_type.decode("ascii")
    return name, filename, filename is not None, headers


def _parse_part_headers(lines, part_number):
    """Header lines (bytes, CRLF already split off) -> {lower-cased name: value}."""
    headers = {}
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise MultipartError("part %d: folded header lines are not accepted "
                                 "(obsolete, RFC 7230 §3.2.4)" % part_number)
        if b"\r" in line or b"\n" in line:
            raise MultipartError("part %d: header lines must end with CRLF" % part_number)
        name, colon, value = line.partition(b":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise MultipartError("part %d: malformed header line" % part_number)
        try:
            text = value.decode("utf-8").strip(" \t")
        except UnicodeDecodeError:
            raise MultipartError("part %d: header %s is not valid UTF-8"
                                 % (part_number, name.decode("ascii")),
                                 code="invalid_encoding") from None
        if _CONTROL.search(text):
            raise MultipartError("part %d: header %s contains control characters"
                                 % (part_number, name.decode("ascii")))
        key = name.decode("ascii").lower()
        if key in headers:
            # Two values would make us guess which one the sender meant; two parsers that
            # guess differently is how one request gets read two ways.
            raise MultipartError("part %d: header %s is given twice" % (part_number, key))
        headers[key] = text
    return headers


def _parse_parameters(text, position, header):
    """The ';'-separated parameters of a header value, from `position` to the end:
    {lower-cased name: unescaped value}. A parameter given twice is malformed."""
    parameters = {}
    while position < len(text):
        match = _PARAMETER.match(text, position)
        if not match or match.end() == position:
            raise MultipartError("cannot parse the parameters of %s" % header)
        position = match.end()
        name, quoted, bare = match.groups()
        if name is None:
            continue
        name = name.lower()
        if name in parameters:
            raise MultipartError("%s parameter %s is given twice" % (header, name))
        parameters[name] = bare if quoted is None else _QUOTED_PAIR.sub(r"\1", quoted)
    return parameters


def _shorten(text, limit=60):
    """A value cut for an error message (a message never echoes kilobytes of input)."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + "..."
