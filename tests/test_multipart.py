"""Unit tests for multipart.py: no server, just bytes in and a Form (or an error) out.

* The corpus in tests/data/multipart: NAME.body holds a raw body, NAME.json its boundary,
  optional limits/stream_names, and the expected parts or the expected error code. Every body
  is parsed whole, split in two at every position, and one byte per read, with small and
  default block sizes: where the reads fall must never change the result.
* Each limit at its edge (allowed) and one past it (refused).
* Property tests (hypothesis): random forms, encoded by the small encoder below, read back
  through random read sizes, equal what went in; a body cut before its close delimiter is an
  error, never a shorter form.
* boundary_from_content_type, the parser's contract with its callers, and its memory bound.
"""
from __future__ import annotations

import json
import os
import socket
import string
import sys
import tracemalloc

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import multipart  # noqa: E402  (after the path fix above)

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "multipart")
CORPUS = sorted(name[:-len(".json")] for name in os.listdir(CORPUS_DIR) if name.endswith(".json"))
BLOCK_SIZES = [7, 64, multipart.DEFAULT_BLOCK_SIZE]
LIMIT_CODES = {"too_many_parts", "field_too_large", "part_header_too_large", "file_too_large",
               "body_too_large"}
PROPERTY_SETTINGS = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# Helpers: a read_into over bytes, a file that records its writes, one parse as a summary


class Reader:
    """read_into over an in-memory body. No read crosses a position in `breaks`, so breaks
    {p} splits the body in two reads at p and breaks range(len) reads one byte at a time."""

    def __init__(self, body, breaks=()):
        self.body = body
        self.breaks = sorted(set(b for b in breaks if 0 < b < len(body)))
        self.position = 0
        self.asked = []               # len(view) of every call
        self.calls_after_end = 0

    def __call__(self, view):
        self.asked.append(len(view))
        if self.position >= len(self.body):
            self.calls_after_end += 1
            return 0
        stop = len(self.body)
        for point in self.breaks:
            if point > self.position:
                stop = point
                break
        count = min(len(view), stop - self.position)
        view[:count] = self.body[self.position:self.position + count]
        self.position += count
        return count


class RecordingFile:
    """A binary writable file that keeps a copy of every write (the views it is given are
    only valid during the call) and notes whether anyone closed it."""

    def __init__(self, name, filename, content_type):
        self.opened_with = (name, filename, content_type)
        self.chunks = []
        self.write_types = set()
        self.closed = False

    def write(self, view):
        self.write_types.add(type(view))
        self.chunks.append(bytes(view))
        return len(view)

    def close(self):
        self.closed = True

    def getvalue(self):
        return b"".join(self.chunks)


def parse_bytes(body, boundary, breaks=(), limits=None, stream_names=("file",),
                block_size=multipart.DEFAULT_BLOCK_SIZE):
    opened = []

    def open_file(name, filename, content_type):
        opened.append(RecordingFile(name, filename, content_type))
        return opened[-1]

    if isinstance(boundary, str):
        boundary = boundary.encode("ascii")
    form = multipart.parse(Reader(body, breaks), boundary, open_file, limits, stream_names,
                           block_size)
    return form, opened


def summarize(form, opened):
    """The form as comparable tuples: (kind, name, filename, content_type, bytes)."""
    summary = []
    files = iter(opened)
    for part in form.parts:
        if isinstance(part, multipart.FilePart):
            f = next(files)
            assert part.file is f and not f.closed
            assert part.size == len(f.getvalue())
            assert f.opened_with == (part.name, part.filename, part.content_type)
            summary.append(("file", part.name, part.filename, part.content_type, f.getvalue()))
        else:
            summary.append(("field", part.name, None, part.headers.get("content-type"),
                            part.value.encode("utf-8")))
    assert next(files, None) is None, "open_file was called for a part not in the form"
    assert form.fields == [p for p in form.parts if isinstance(p, multipart.Field)]
    assert form.files == [p for p in form.parts if isinstance(p, multipart.FilePart)]
    return summary


def outcome(body, boundary, **kwargs):
    """("parts", summary) or ("error", code): what one parse made of the body."""
    try:
        form, opened = parse_bytes(body, boundary, **kwargs)
    except multipart.MultipartError as error:
        expected_status = 413 if error.code in LIMIT_CODES else 400
        assert error.status == expected_status, (error.code, error.status)
        assert isinstance(error, multipart.LimitExceeded) == (expected_status == 413)
        assert error.message and str(error) == error.message
        return ("error", error.code)
    return ("parts", summarize(form, opened))


def read_patterns(body):
    """Where the reads fall: whole, byte by byte, and a few uneven splits."""
    return [(), range(len(body)), range(0, len(body), 5), range(3, len(body), 11)]


# --------------------------------------------------------------------------------------------
# The raw-body corpus


def load_case(name):
    with open(os.path.join(CORPUS_DIR, name + ".json"), "r", encoding="utf-8") as f:
        spec = json.load(f)
    with open(os.path.join(CORPUS_DIR, name + ".body"), "rb") as f:
        body = f.read()
    kwargs = {}
    if "limits" in spec:
        kwargs["limits"] = multipart.Limits(**spec["limits"])
    if "stream_names" in spec:
        kwargs["stream_names"] = tuple(spec["stream_names"])
    if "error" in spec:
        expected = ("error", spec["error"])
    else:
        parts = []
        for p in spec["parts"]:
            data = bytes.fromhex(p["hex"]) if "hex" in p else p["text"].encode("utf-8")
            parts.append((p["kind"], p["name"], p["filename"], p["content_type"], data))
        expected = ("parts", parts)
    return body, spec["boundary"], kwargs, expected


def test_corpus_has_the_cases_the_brief_asks_for():
    assert len(CORPUS) >= 25
    for name in CORPUS:
        assert os.path.isfile(os.path.join(CORPUS_DIR, name + ".body")), name


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("name", CORPUS)
def test_corpus_body_parses_the_same_split_at_every_position(name, block_size):
    body, boundary, kwargs, expected = load_case(name)
    assert outcome(body, boundary, block_size=block_size, **kwargs) == expected
    for position in range(1, len(body)):
        got = outcome(body, boundary, breaks=[position], block_size=block_size, **kwargs)
        assert got == expected, "split at %d of %d" % (position, len(body))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("name", CORPUS)
def test_corpus_body_parses_the_same_byte_by_byte(name, block_size):
    body, boundary, kwargs, expected = load_case(name)
    got = outcome(body, boundary, breaks=range(len(body)), block_size=block_size, **kwargs)
    assert got == expected


# --------------------------------------------------------------------------------------------
# A small encoder (what a browser does), used by the limit and property tests


def quote(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode_part(name, data, filename=None, content_type=None, extra_headers=()):
    disposition = "Content-Disposition: form-data; name=" + quote(name)
    if filename is not None:
        disposition += "; filename=" + quote(filename)
    lines = [disposition]
    if content_type is not None:
        lines.append("Content-Type: " + content_type)
    lines.extend(extra_headers)
    if isinstance(data, str):
        data = data.encode("utf-8")
    return "".join(line + "\r\n" for line in lines).encode("utf-8") + b"\r\n" + data


def encode_form(parts, boundary, preamble=b"", epilogue=b"", padding=b"", leading_crlf=True):
    """parts: encoded parts (encode_part). Returns the body."""
    boundary = boundary.encode("ascii") if isinstance(boundary, str) else boundary
    out = [preamble]
    if preamble or leading_crlf:
        out.append(b"\r\n")
    for part in parts:
        out.append(b"--" + boundary + padding + b"\r\n" + part + b"\r\n")
    out.append(b"--" + boundary + b"--" + epilogue)
    return b"".join(out)


def fields(*pairs):
    return [encode_part(name, value) for name, value in pairs]


def parses_every_way(body, boundary="b", **kwargs):
    """The single outcome of parsing `body` under every read pattern and block size."""
    first = outcome(body, boundary, **kwargs)
    for breaks in read_patterns(body):
        for block_size in BLOCK_SIZES:
            got = outcome(body, boundary, breaks=breaks, block_size=block_size, **kwargs)
            assert got == first, "reads split at %r, block size %d" % (breaks, block_size)
    return first


# --------------------------------------------------------------------------------------------
# Each limit at its edge, and one past it


@pytest.mark.parametrize("count, ok", [(3, True), (4, False)])
def test_max_parts_allows_exactly_the_limit_and_refuses_one_more(count, ok):
    body = encode_form(fields(*[("f%d" % i, "v") for i in range(count)]), "b")
    got = parses_every_way(body, limits=multipart.Limits(max_parts=3))
    assert got[0] == ("parts" if ok else "error")
    if not ok:
        assert got == ("error", "too_many_parts")


def test_default_max_parts_is_sixteen():
    assert multipart.MAX_PARTS == 16
    body = encode_form(fields(*[("f%d" % i, "v") for i in range(16)]), "b")
    assert len(parse_bytes(body, "b")[0].parts) == 16
    body = encode_form(fields(*[("f%d" % i, "v") for i in range(17)]), "b")
    assert outcome(body, "b") == ("error", "too_many_parts")


def test_zero_parts_limit_still_accepts_an_empty_form():
    assert parses_every_way(b"--b--", limits=multipart.Limits(max_parts=0)) == ("parts", [])


@pytest.mark.parametrize("value, ok", [("é" * 5, True), ("é" * 5 + "x", False),
                                       ("x" * 10, True), ("x" * 11, False)])
def test_max_field_bytes_counts_utf8_bytes_at_the_edge(value, ok):
    body = encode_form(fields(("note", value)), "b")
    got = parses_every_way(body, limits=multipart.Limits(max_field_bytes=10))
    assert got == (("parts", [("field", "note", None, None, value.encode())]) if ok
                   else ("error", "field_too_large"))


@pytest.mark.parametrize("extra, ok", [(0, True), (1, False)])
def test_default_max_field_bytes_at_the_edge(extra, ok):
    value = "v" * (multipart.MAX_FIELD_BYTES + extra)
    got = outcome(encode_form(fields(("note", value)), "b"), "b")
    assert got[0] == ("parts" if ok else "error")
    assert ok or got == ("error", "field_too_large")


def test_max_field_bytes_does_not_apply_to_file_parts():
    body = encode_form([encode_part("file", b"x" * 100, filename="a")], "b")
    got = parses_every_way(body, limits=multipart.Limits(max_field_bytes=10))
    assert got == ("parts", [("file", "file", "a", None, b"x" * 100)])


def header_block_bytes(part):
    """What max_part_header_bytes counts: every header line with its CRLF."""
    return part.index(b"\r\n\r\n") + 2


@pytest.mark.parametrize("padding", [b"", b" \t "])
@pytest.mark.parametrize("over, ok", [(0, True), (1, False)])
def test_max_part_header_bytes_at_the_edge(padding, over, ok):
    part = encode_part("file", b"data", filename="clip.webm", content_type="video/webm")
    limit = header_block_bytes(part) + len(padding)     # the padding counts too
    body = encode_form([part], "b", padding=padding)
    got = parses_every_way(body, limits=multipart.Limits(max_part_header_bytes=limit - over))
    assert got == (("parts", [("file", "file", "clip.webm", "video/webm", b"data")]) if ok
                   else ("error", "part_header_too_large"))


@pytest.mark.parametrize("over, ok", [(0, True), (1, False)])
def test_default_max_part_header_bytes_at_the_edge(over, ok):
    stub = encode_part("n", "v", extra_headers=["X-Filler: "])
    filler = multipart.MAX_PART_HEADER_BYTES - header_block_bytes(stub) + over
    part = encode_part("n", "v", extra_headers=["X-Filler: " + "y" * filler])
    assert header_block_bytes(part) == multipart.MAX_PART_HEADER_BYTES + over
    got = outcome(encode_form([part], "b"), "b")
    assert got == (("parts", [("field", "n", None, None, b"v")]) if ok
                   else ("error", "part_header_too_large"))


def test_headers_that_never_end_are_refused_as_soon_as_they_cannot_fit():
    body = b"--b\r\n" + b"X-Filler: " + b"y" * 10000
    reader = Reader(body, breaks=range(len(body)))
    with pytest.raises(multipart.LimitExceeded) as caught:
        multipart.parse(reader, b"b", RecordingFile,
                        multipart.Limits(max_part_header_bytes=100))
    assert caught.value.code == "part_header_too_large"
    # "--b", then 100 header bytes and the 3 bytes that could still start CRLF CRLF: one
    # byte more can no longer be a header block within the limit.
    assert reader.position == len(b"--b") + 100 + 4


@pytest.mark.parametrize("size, ok", [(10, True), (11, False)])
def test_max_file_bytes_at_the_edge_applies_to_each_file_part(size, ok):
    parts = [encode_part("file", b"a" * 10, filename="one"),
             encode_part("other", b"b" * size, filename="two")]
    got = parses_every_way(encode_form(parts, "b"), limits=multipart.Limits(max_file_bytes=10))
    assert got == (("parts", [("file", "file", "one", None, b"a" * 10),
                              ("file", "other", "two", None, b"b" * size)]) if ok
                   else ("error", "file_too_large"))


def test_max_file_bytes_none_means_unlimited():
    data = bytes(range(256)) * 4000
    body = encode_form([encode_part("file", data, filename="x")], "b")
    form, opened = parse_bytes(body, "b", limits=multipart.Limits(max_file_bytes=None))
    assert opened[0].getvalue() == data and form.files[0].size == len(data)


@pytest.mark.parametrize("epilogue", [b"", b"\r\nsome epilogue"])
@pytest.mark.parametrize("over, ok", [(0, True), (1, False)])
def test_max_body_bytes_at_the_edge_counts_every_byte(epilogue, over, ok):
    body = encode_form(fields(("a", "1")) + [encode_part("file", b"xyz", filename="f")], "b",
                       preamble=b"preamble", epilogue=epilogue)
    got = parses_every_way(body, limits=multipart.Limits(max_body_bytes=len(body) - over))
    assert got == (("parts", [("field", "a", None, None, b"1"),
                              ("file", "file", "f", None, b"xyz")]) if ok
                   else ("error", "body_too_large"))


def test_body_limit_stops_reading_one_byte_past_the_limit():
    body = encode_form(fields(("a", "1")), "b") + b"x" * (1 << 20)
    reader = Reader(body)
    limits = multipart.Limits(max_body_bytes=100)
    with pytest.raises(multipart.LimitExceeded) as caught:
        multipart.parse(reader, b"b", RecordingFile, limits)
    assert caught.value.code == "body_too_large" and caught.value.status == 413
    assert reader.position == 101


def test_limits_refuse_unbounded_memory_limits():
    for name in ("max_parts", "max_field_bytes", "max_part_header_bytes"):
        with pytest.raises(ValueError):
            multipart.Limits(**{name: None})
        with pytest.raises(ValueError):
            multipart.Limits(**{name: -1})
    with pytest.raises(ValueError):
        multipart.Limits(max_file_bytes=-1)
    limits = multipart.Limits()
    assert (limits.max_parts, limits.max_field_bytes, limits.max_part_header_bytes,
            limits.max_file_bytes, limits.max_body_bytes) == (16, 65536, 16384, None, None)


# --------------------------------------------------------------------------------------------
# Property tests: encode random forms, parse them back through random reads

BCHARS = string.ascii_letters + string.digits + "'()+_,-./:=? "
boundaries = st.text(alphabet=BCHARS, min_size=1, max_size=70).filter(lambda b: b[-1] != " ")
names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
filenames = st.none() | st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
content_types = st.sampled_from([None, "video/webm", "application/octet-stream",
                                 "text/plain; charset=utf-8"])
block_sizes = st.sampled_from([1, 3, 7, 64, 4096, multipart.DEFAULT_BLOCK_SIZE])
DELIMITER_LINE_BYTES = (b" ", b"\t", b"\r", b"\n")


def tricky_pieces(boundary):
    """Byte strings that look like (parts of) a delimiter for this boundary."""
    dash_boundary = b"--" + boundary
    pieces = [b"\r\n", b"\r", b"\n", b"-", b"--", b"\r\n--", dash_boundary,
              dash_boundary + b"--", b"\r\n" + dash_boundary + b"x",
              b"\r\n" + dash_boundary + b"-x"]
    pieces += [b"\r\n--" + boundary[:k] for k in range(len(boundary))]
    return pieces


def only_its_own_delimiter_ends(data, delimiter):
    """True when, followed by its delimiter, `data` holds no earlier delimiter: every match
    of CRLF--boundary inside it is followed by a byte that cannot start a delimiter line
    (the rule in multipart.py's docstring). A real client picks its boundary so this holds."""
    stream = data + delimiter + b"\r\n"
    at = stream.find(delimiter)
    while at < len(data):
        after = stream[at + len(delimiter):at + len(delimiter) + 2]
        if after == b"--" or after[:1] in DELIMITER_LINE_BYTES:
            return False
        at = stream.find(delimiter, at + 1)
    return True


@st.composite
def forms(draw):
    boundary = draw(boundaries).encode("ascii")
    pieces = tricky_pieces(boundary)
    binary = st.lists(st.binary(max_size=30) | st.sampled_from(pieces), max_size=8).map(b"".join)
    text = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
                    | st.sampled_from([p.decode("ascii") for p in pieces]),
                    max_size=6).map("".join)
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(names | st.just("file"))
        filename = draw(filenames)
        content_type = draw(content_types)
        is_file = filename is not None or name == "file"
        data = draw(binary) if is_file else draw(text).encode("utf-8")
        parts.append((name, filename, content_type, data))
    preamble = draw(st.sampled_from([b"", b"This is the preamble.", b"--", b"\r\n"])
                    | st.sampled_from(pieces))
    epilogue = draw(st.sampled_from([b"", b"\r\n", b"\r\nepilogue\r\n"]) | binary)
    padding = draw(st.sampled_from([b"", b" ", b"\t", b" \t  "]))
    leading_crlf = draw(st.booleans())
    return boundary, parts, preamble, epilogue, padding, leading_crlf


def expected_summary(parts):
    summary = []
    for name, filename, content_type, data in parts:
        kind = "file" if filename is not None or name == "file" else "field"
        summary.append((kind, name, filename, content_type, data))
    return summary


def encode_random_form(form):
    boundary, parts, preamble, epilogue, padding, leading_crlf = form
    delimiter = b"\r\n--" + boundary
    assume(only_its_own_delimiter_ends(b"\r\n" + preamble, delimiter))
    for _, _, _, data in parts:
        assume(only_its_own_delimiter_ends(data, delimiter))
    encoded = [encode_part(name, data, filename, content_type)
               for name, filename, content_type, data in parts]
    return encode_form(encoded, boundary, preamble, epilogue, padding, leading_crlf)


@PROPERTY_SETTINGS
@given(form=forms(), read_sizes=st.lists(st.integers(1, 97), min_size=1, max_size=8),
       block_size=block_sizes)
def test_random_forms_parse_back_to_what_was_encoded(form, read_sizes, block_size):
    body = encode_random_form(form)
    breaks, position, sizes = [], 0, iter(read_sizes * (len(body) + 1))
    while position < len(body):
        position += next(sizes)
        breaks.append(position)
    content_type = "multipart/form-data; boundary=%s" % quote(form[0].decode("ascii"))
    boundary = multipart.boundary_from_content_type(content_type)
    assert boundary == form[0]
    got = outcome(body, boundary, breaks=breaks, block_size=block_size)
    assert got == ("parts", expected_summary(form[1]))


@PROPERTY_SETTINGS
@given(form=forms(), cut=st.integers(0, 1 << 30), block_size=block_sizes)
def test_a_body_cut_before_its_close_delimiter_is_an_error_never_a_shorter_form(
        form, cut, block_size):
    body = encode_random_form(form)
    close_end = len(body) - len(form[3])          # the body without its epilogue
    assert body[:close_end].endswith(b"--" + form[0] + b"--")
    cut = cut % close_end
    got = outcome(body[:cut], form[0], breaks=range(0, cut, 13), block_size=block_size)
    assert got == ("error", "malformed_multipart")
    assert outcome(body[:close_end], form[0], block_size=block_size)[0] == "parts"


# --------------------------------------------------------------------------------------------
# boundary_from_content_type


@pytest.mark.parametrize("content_type, boundary", [
    ("multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
     b"----WebKitFormBoundary7MA4YWxkTrZu0gW"),
    ('multipart/form-data; boundary="gc0p4Jq0M2Yt08j34c0p ?:=/"', b"gc0p4Jq0M2Yt08j34c0p ?:=/"),
    ("Multipart/Form-Data; BOUNDARY=abc", b"abc"),
    ("multipart/form-data; charset=utf-8; boundary=abc", b"abc"),
    ('multipart/form-data;charset="utf-8";boundary="abc";x=y', b"abc"),
    ("  multipart/form-data ; boundary = abc ; ", b"abc"),
    ("multipart/form-data; boundary=----=_Part_0_1", b"----=_Part_0_1"),
    ('multipart/form-data; boundary="a\\bc"', b"abc"),
    ("multipart/form-data; boundary=" + "x" * 70, b"x" * 70),
    ("multipart/form-data; boundary=-", b"-"),
])
def test_boundary_from_content_type_reads_the_boundary(content_type, boundary):
    assert multipart.boundary_from_content_type(content_type) == boundary


@pytest.mark.parametrize("content_type", [
    "application/json", "text/plain", "text/plain; boundary=abc", "", None,
    "multipart/mixed; boundary=abc", "multipart/form-datax; boundary=abc",
    "application/x-www-form-urlencoded",
])
def test_boundary_from_content_type_refuses_other_media_types_with_415(content_type):
    with pytest.raises(multipart.MultipartError) as caught:
        multipart.boundary_from_content_type(content_type)
    assert (caught.value.code, caught.value.status) == ("not_multipart", 415)


@pytest.mark.parametrize("content_type", [
    "multipart/form-data",
    "multipart/form-data; charset=utf-8",
    "multipart/form-data; boundary=",
    'multipart/form-data; boundary=""',
    "multipart/form-data; boundary=" + "x" * 71,
    'multipart/form-data; boundary="' + "x" * 71 + '"',
    'multipart/form-data; boundary="abc "',
    'multipart/form-data; boundary="a@b"',
    'multipart/form-data; boundary="abc',
    "multipart/form-data; boundary=abc; boundary=abd",
    "multipart/form-data; boundary",
    "multipart/form-data boundary=abc",
    "multipart/form-data; boundary=a b",
])
def test_boundary_from_content_type_refuses_a_missing_or_invalid_boundary(content_type):
    with pytest.raises(multipart.MultipartError) as caught:
        multipart.boundary_from_content_type(content_type)
    assert (caught.value.code, caught.value.status) == ("malformed_multipart", 400)


# --------------------------------------------------------------------------------------------
# The contract with the caller


SEED_BODY = encode_form(fields(("fileId", "upload_1"), ("chunkIndex", "0"))
                        + [encode_part("file", b"\x1a\x45\xdf\xa3" * 1000, filename="blob",
                                       content_type="video/webm")], "b")


def test_errors_carry_status_code_and_message():
    error = multipart.MultipartError("bad")
    assert (error.status, error.code, error.message, str(error)) == (
        400, "malformed_multipart", "bad", "bad")
    error = multipart.MultipartError("nope", code="not_multipart", status=415)
    assert (error.status, error.code) == (415, "not_multipart")
    error = multipart.LimitExceeded("big", code="file_too_large")
    assert isinstance(error, multipart.MultipartError)
    assert (error.status, error.code) == (413, "file_too_large")


def test_file_parts_get_memoryview_slices_and_are_never_closed():
    form, opened = parse_bytes(SEED_BODY, "b", block_size=64)
    assert opened[0].write_types == {memoryview}
    assert not opened[0].closed
    assert form.files[0].file is opened[0]
    assert form.field_values("fileId") == ["upload_1"]
    assert form.field_values("missing") == []


def test_open_file_is_called_with_name_filename_and_content_type_in_body_order():
    calls = []

    def open_file(name, filename, content_type):
        calls.append((name, filename, content_type))
        return RecordingFile(name, filename, content_type)

    body = encode_form([encode_part("a", b"1", filename="x.bin"), encode_part("k", "v"),
                        encode_part("file", b"2", content_type="video/mp4")], "b")
    multipart.parse(Reader(body), b"b", open_file)
    assert calls == [("a", "x.bin", None), ("file", None, "video/mp4")]


def test_open_file_sees_every_earlier_part_in_the_form_it_was_given():
    form = multipart.Form()
    seen = []

    def open_file(name, filename, content_type):
        seen.append((name, [(f.name, f.value) for f in form.fields], len(form.files)))
        return RecordingFile(name, filename, content_type)

    body = encode_form([encode_part("fileId", "up_1"), encode_part("a", b"1", filename="x"),
                        encode_part("chunkIndex", "7"), encode_part("file", b"2")], "b")
    for breaks in ((), range(1, len(body))):            # however the body is split
        seen.clear()
        form.__init__()
        assert multipart.parse(Reader(body, breaks), b"b", open_file, form=form) is form
        assert seen == [("a", [("fileId", "up_1")], 0),
                        ("file", [("fileId", "up_1"), ("chunkIndex", "7")], 1)]


COMMON_BLOCKS = [
    b'\r\nContent-Disposition: form-data; name="fileId"',
    b'\r\nContent-Disposition: form-data; name="file"; filename="blob"',
    b'\r\nContent-Disposition: form-data; name="file"; filename="chunk"\r\n'
    b'Content-Type: video/webm;codecs="vp9, opus"',
    b'\r\nContent-Disposition: form-data; name=""; filename=""',
    b'\r\nContent-Disposition: form-data; name="caf\xc3\xa9"; filename="\xe2\x82\xac.webm"',
    b'\r\nContent-Disposition: form-data; name="a b;c=d"\r\nContent-Type: x',
]
NOT_COMMON_BLOCKS = [
    b'  \r\nContent-Disposition: form-data; name="x"',            # padding
    b'\r\ncontent-disposition: form-data; name="x"',              # another case
    b'\r\nContent-Disposition: form-data; name="x\\"y"',          # an escape
    b'\r\nContent-Disposition: form-data; name="x"; filename*=UTF-8\'\'a',
    b'\r\nContent-Disposition: form-data; name="\xff"',            # not UTF-8
    b'\r\nContent-Disposition: form-data; name="x"\r\nContent-Type: a \t',
    b'\r\nContent-Disposition: form-data; name="x"\r\nContent-Transfer-Encoding: base64',
]


@pytest.mark.parametrize("block", COMMON_BLOCKS)
def test_the_common_header_spelling_is_read_as_the_general_rules_read_it(block):
    parser = multipart._Parser(None, b"b", None, multipart.Limits(), (), 64, multipart.Form())
    common = multipart._common_part_headers(block)
    assert common is not None
    assert common == parser._part_headers(block)


@pytest.mark.parametrize("block", NOT_COMMON_BLOCKS)
def test_every_other_header_block_goes_the_general_way(block):
    assert multipart._common_part_headers(block) is None


def test_short_writes_are_continued_until_every_byte_is_written():
    class TrickleFile(RecordingFile):
        def write(self, view):
            return super().write(view[:3])

    data = bytes(range(256)) * 20
    body = encode_form([encode_part("file", data, filename="f")], "b")
    opened = []

    def open_file(*args):
        opened.append(TrickleFile(*args))
        return opened[-1]

    form = multipart.parse(Reader(body), b"b", open_file, block_size=100)
    assert opened[0].getvalue() == data and form.files[0].size == len(data)


def test_a_file_that_returns_none_from_write_is_taken_as_written():
    class QuietFile(RecordingFile):
        def write(self, view):
            super().write(view)

    opened = []

    def open_file(*args):
        opened.append(QuietFile(*args))
        return opened[-1]

    multipart.parse(Reader(SEED_BODY), b"b", open_file)
    assert opened[0].getvalue() == b"\x1a\x45\xdf\xa3" * 1000


def test_read_into_exceptions_propagate_unchanged():
    def read_into(view):
        raise socket.timeout("client went silent")

    with pytest.raises(socket.timeout):
        multipart.parse(read_into, b"b", RecordingFile)


def test_open_file_exceptions_propagate_unchanged():
    def open_file(*args):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as caught:
        multipart.parse(Reader(SEED_BODY), b"b", open_file)
    assert caught.value.errno == 28


def test_read_into_is_asked_for_at_most_one_block_and_read_to_the_end():
    body = SEED_BODY + b"\r\n" + b"epilogue " * 100
    reader = Reader(body)
    multipart.parse(reader, b"b", RecordingFile, block_size=64)
    assert max(reader.asked) <= 64
    assert reader.position == len(body) and reader.calls_after_end == 1


def test_read_into_claiming_more_than_the_view_is_a_programming_error():
    with pytest.raises(ValueError):
        multipart.parse(lambda view: len(view) + 1, b"b", RecordingFile)


@pytest.mark.parametrize("boundary", [b"", b"x" * 71, b"abc ", b"a\xffb", 42])
def test_parse_refuses_an_invalid_boundary_argument(boundary):
    with pytest.raises(ValueError):
        multipart.parse(Reader(b"--b--"), boundary, RecordingFile)


def test_parse_accepts_a_str_boundary():
    form, _ = parse_bytes(SEED_BODY, "b")
    assert [p.name for p in form.parts] == ["fileId", "chunkIndex", "file"]


@pytest.mark.parametrize("headers, says", [
    (b'Content-Disposition: form-data;\r\n name="a"', "folded"),
    (b'Content-Disposition: form-data; name="a"\nContent-Type: a/b', "CRLF"),
    (b'Content-Disposition: form-data; name="a"\rContent-Type: a/b', "CRLF"),
    (b'Content-Disposition: form-data; name="a"\r\nContent-Type: a\x00b', "control"),
    (b'Content-Disposition: form-data; name="a"\r\nContent-Type: a/b\r\ncontent-type: c/d',
     "twice"),
])
def test_refused_part_headers_say_why(headers, says):
    body = b"--b\r\n" + headers + b"\r\n\r\nvalue\r\n--b--"
    with pytest.raises(multipart.MultipartError) as caught:
        multipart.parse(Reader(body), b"b", RecordingFile)
    assert caught.value.code == "malformed_multipart"
    assert says in caught.value.message


def test_invalid_utf8_in_a_streamed_part_is_not_decoded():
    body = encode_form([encode_part("file", b"\xff\xfe\x00")], "b")
    assert parses_every_way(body) == ("parts", [("file", "file", None, None, b"\xff\xfe\x00")])


def test_a_part_opened_before_an_error_is_left_for_the_caller_to_clean_up():
    body = encode_form([encode_part("file", b"partial data", filename="f")], "b")[:-10]
    opened = []

    def open_file(*args):
        opened.append(RecordingFile(*args))
        return opened[-1]

    with pytest.raises(multipart.MultipartError) as caught:
        multipart.parse(Reader(body), b"b", open_file)
    assert caught.value.code == "malformed_multipart"
    assert len(opened) == 1 and not opened[0].closed


def test_parsing_a_256_mib_file_part_allocates_about_one_block():
    size = 256 * 1024 * 1024
    block = multipart.DEFAULT_BLOCK_SIZE
    head = b"--b\r\n" + encode_part("file", b"", filename="big.webm")
    tail = b"\r\n--b--\r\n"
    pattern = memoryview(bytes(range(251)) * (block // 251 + 2))
    total = len(head) + size + len(tail)

    class Generated:
        """read_into producing head + size bytes of a pattern + tail, without holding them."""

        def __init__(self):
            self.position = 0

        def __call__(self, view):
            if self.position < len(head):
                chunk = head[self.position:self.position + len(view)]
            elif self.position < len(head) + size:
                offset = (self.position - len(head)) % 251
                count = min(len(view), len(head) + size - self.position)
                chunk = pattern[offset:offset + count]
            else:
                start = self.position - len(head) - size
                chunk = tail[start:start + len(view)]
            view[:len(chunk)] = chunk
            self.position += len(chunk)
            return len(chunk)

    class CountingFile:
        def __init__(self):
            self.size = 0

        def write(self, view):
            self.size += len(view)
            return len(view)

    sink = CountingFile()
    tracemalloc.start()
    try:
        form = multipart.parse(Generated(), b"b", lambda *args: sink)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.size == size and form.files[0].size == size
    assert total > size
    assert peak < 2 * block, "peak %d bytes traced while parsing" % peak
