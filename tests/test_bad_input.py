"""Bad input never breaks m1server (SPEC §1 "Errors", the contract's error table).

One server runs for the whole module. An upload is completed on it first; after every bad
request the server must still answer GET /healthz and that upload must still be byte-exact on
disk. Each bad request must get the exact status, `Content-Type: application/json`, the error
envelope with the contract's code, and no traceback text. Requests are written byte by byte
with raw sockets (tests/_http.py) because `requests` cannot send most of them.
"""
from __future__ import annotations

import hashlib
import os

import pytest
import requests

import _http
from conftest import ServerProcess, get_status, send_chunk, split_chunks, stopping, wait_until

# A chunk 0 that passes the media-signature check (WebM starts with the EBML magic).
VIDEO = b"\x1a\x45\xdf\xa3" + bytes(range(64))
MISSING = object()
SQLITE_MAGIC = b"SQLite format 3"


# --- the module's server and its completed upload --------------------------------------------

@pytest.fixture(scope="module")
def bad_server(tmp_path_factory):
    # Processing off: its derivatives and queue appear in the upload dir in the background,
    # and these tests compare the dir's files before and after each bad request.
    srv = ServerProcess(tmp_path_factory.mktemp("bad_input") / "uploads",
                        args=["--processing", "off"])
    with stopping(srv):
        srv.start()
        yield srv


@pytest.fixture(scope="module")
def completed_upload(bad_server, sample_webm):
    """fileId of an upload finished before any bad request is sent."""
    file_id = "bad_input_survivor"
    chunks = split_chunks(sample_webm, 4)
    with requests.Session() as session:
        for index, chunk in enumerate(chunks):
            response = send_chunk(session, bad_server.url, file_id, index, chunk,
                                  status="completed" if index == len(chunks) - 1 else "uploading")
            assert response.status_code == 200, response.text
        assert response.json()["data"]["status"] == "completed"
    return file_id


@pytest.fixture(scope="module")
def stashed_chunk(bad_server):
    """An early chunk waiting in uploads/temp/<fileId>/ (S3 mode: as a chunk object) with
    chunk 0 never sent."""
    file_id = "bad_input_stash"
    with requests.Session() as session:
        response = send_chunk(session, bad_server.url, file_id, 1, b"early chunk bytes")
        assert response.status_code == 200, response.text
    assert bad_server.storage.early_chunks(file_id) == [1]
    return file_id


@pytest.fixture(autouse=True)
def server_survives(bad_server, completed_upload, sample_webm):
    yield
    assert bad_server.alive(), bad_server.log()
    health = requests.get(bad_server.url + "/healthz", timeout=10)
    assert health.status_code == 200, health.text
    assert bad_server.storage.media(completed_upload) == sample_webm


def test_completed_upload_is_served_before_any_bad_input(bad_server, completed_upload,
                                                         sample_webm):
    """The baseline; the module's last test checks it again after all the bad input."""
    served = requests.get("%s/uploads/%s.webm" % (bad_server.url, completed_upload), timeout=10)
    assert served.status_code == 200 and served.content == sample_webm


# --- helpers ---------------------------------------------------------------------------------

def assert_json_error(response, statuses, codes):
    """The contract's error envelope with one of `statuses` and one of `codes`."""
    statuses = (statuses,) if isinstance(statuses, int) else tuple(statuses)
    codes = (codes,) if isinstance(codes, str) else tuple(codes)
    assert b"Traceback" not in response.raw and b'File "' not in response.raw, response.raw
    assert response.status in statuses, response
    content_type = response.header("content-type") or ""
    assert content_type.split(";")[0].strip() == "application/json", response
    body = response.json()
    assert body["success"] is False, body
    assert body["error"]["code"] in codes, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body


def upload_dir_snapshot(srv):
    """Every file under the upload dir except the ledger's own files."""
    found = set()
    for directory, _, names in os.walk(srv.upload_dir):
        for name in names:
            if not name.startswith("m1.sqlite3"):
                found.add(os.path.relpath(os.path.join(directory, name), srv.upload_dir))
    return found


def outside_snapshot(srv):
    parent = os.path.dirname(os.path.abspath(srv.upload_dir))
    return set(os.listdir(parent)) | set(os.listdir(os.path.dirname(parent)))


def upload(_extra=(), _order=("file", "fileId", "chunkIndex", "status"), **fields):
    """A request builder: the seed's four fields, overridden or removed (MISSING) by name."""
    def build(file_id):
        values = {"file": VIDEO, "fileId": file_id, "chunkIndex": "0", "status": "uploading"}
        values.update(fields)
        parts = []
        for name in _order:
            value = values[name]
            if value is MISSING:
                continue
            if name == "file":
                parts.append(("file", value, "blob", "application/octet-stream"))
            else:
                parts.append((name, value))
        for name, value in values.items():
            if name not in _order:
                parts.append((name, value))
        parts.extend(_extra)
        return _http.upload_request(parts)
    return build


def raw_upload(body_of, headers):
    """A request builder with a hand-made body (from the fileId) and exact headers."""
    def build(file_id):
        body = body_of(file_id)
        return _http.build_request("POST", "/api/video/upload", headers(body), body,
                                   content_length=False)
    return build


def seed_body(file_id, boundary=_http.BOUNDARY, close=True):
    return _http.multipart_body(_http.chunk_parts(file_id, 0, VIDEO), boundary, close=close)


def with_length(content_type="multipart/form-data; boundary=" + _http.BOUNDARY, extra=()):
    def headers(body):
        result = [("Content-Length", str(len(body)))]
        if content_type is not None:
            result.append(("Content-Type", content_type))
        return result + list(extra)
    return headers


def B(*cases):
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


INVALID_FILE_IDS = B(
    ("dotdot-slash", "../x"), ("dotdot-pct2F", "..%2F"), ("pct2e-pct2e", "%2e%2e"),
    ("empty", ""), ("129-chars", "a" * 129), ("space", "a b"), ("unicode", "vid\u00e9o"),
    ("nul", "a\x00b"), ("slash", "a/b"), ("backslash", "a\\b"), ("dot-inside", "a.b"),
    ("dot", "."), ("dotdot", ".."), ("trailing-newline", "abc\n"),
    ("arabic-digit", "ab\u0663"), ("fullwidth", "\uff41\uff42"), ("abs-path", "/etc/passwd"),
)

INVALID_CHUNK_INDEXES = B(
    ("minus-1", "-1"), ("fraction", "1.5"), ("letters", "abc"), ("empty", ""),
    ("huge", "99999999999999999999999999"), ("over-max", "1000001"), ("leading-space", " 1"),
    ("plus", "+1"), ("hex", "0x1"), ("trailing-newline", "1\n"), ("arabic-one", "\u0661"),
    ("underscore", "1_0"), ("exponent", "1e3"),
)

INVALID_STATUSES = B(("done", "done"), ("empty", ""), ("padded", " uploading"),
                     ("upper", "COMPLETED"))

BAD_UPLOADS = B(
    # missing and duplicated fields
    ("missing-file", upload(file=MISSING), 400, "missing_field"),
    ("missing-fileId", upload(fileId=MISSING), 400, "missing_field"),
    ("missing-chunkIndex", upload(chunkIndex=MISSING), 400, "missing_field"),
    ("missing-status", upload(status=MISSING), 400, "missing_field"),
    ("two-fileId", upload(_extra=[("fileId", "another_id")]), 400, "duplicate_field"),
    ("two-file", upload(_extra=[("file", VIDEO, "blob2", "video/webm")]), 400,
     "duplicate_field"),
    ("two-chunkIndex", upload(_extra=[("chunkIndex", "0")]), 400, "duplicate_field"),
    # field contents
    ("fileId-invalid-utf8", upload(fileId=b"abc\xff\xfe"), 400, "invalid_encoding"),
    ("fileId-1MiB", upload(fileId="a" * (1 << 20)), (400, 413),
     ("invalid_file_id", "field_too_large")),
    ("chunk0-not-video", upload(file=b"hello, this is plain text"), 415,
     "unsupported_media_type"),
    ("mime-text-plain", upload(mimeType="text/plain"), 415, "unsupported_media_type"),
    ("mime-pdf", upload(mimeType="application/pdf"), 415, "unsupported_media_type"),
    ("mime-avi", upload(mimeType="video/x-msvideo"), 415, "unsupported_media_type"),
    ("mime-malformed", upload(mimeType="not a mime type"), 400, "invalid_mime_type"),
    ("checksum-malformed", upload(checksum="sha256:nothex"), 400, "invalid_checksum"),
    ("too-many-parts", upload(_extra=[("note%d" % n, "x") for n in range(20)]), 413,
     "too_many_parts"),
    # multipart framing
    ("content-type-json", raw_upload(lambda fid: b'{"fileId": "%s"}' % fid.encode(),
                                     with_length("application/json")), 415,
     "unsupported_media_type"),
    ("content-type-text", raw_upload(seed_body, with_length("text/plain")), 415,
     "unsupported_media_type"),
    ("content-type-urlencoded", raw_upload(
        lambda fid: b"fileId=" + fid.encode() + b"&chunkIndex=0&status=uploading",
        with_length("application/x-www-form-urlencoded")), 415, "unsupported_media_type"),
    ("content-type-missing", raw_upload(seed_body, with_length(None)), 415,
     "unsupported_media_type"),
    ("boundary-missing", raw_upload(seed_body, with_length("multipart/form-data")), 400,
     "malformed_multipart"),
    ("boundary-empty", raw_upload(seed_body, with_length("multipart/form-data; boundary=")),
     400, "malformed_multipart"),
    ("boundary-wrong", raw_upload(lambda fid: seed_body(fid, "somethingElse123"),
                                  with_length()), 400, "malformed_multipart"),
    ("no-close-delimiter", raw_upload(lambda fid: seed_body(fid, close=False), with_length()),
     400, "malformed_multipart"),
    ("truncated-in-file-part", raw_upload(lambda fid: seed_body(fid)[:120], with_length()),
     400, "malformed_multipart"),
    ("empty-body", raw_upload(lambda fid: b"", with_length()), 400, "malformed_multipart"),
    ("part-without-disposition", upload(_extra=[_http.part(
        "x", "y", headers=["Content-Type: text/plain"])]), 400, "malformed_multipart"),
    ("disposition-without-name", upload(_extra=[_http.part(
        "x", "y", headers=["Content-Disposition: form-data"])]), 400, "malformed_multipart"),
    ("part-header-100KiB", upload(_extra=[_http.part("x", "y", headers=[
        'Content-Disposition: form-data; name="x"', "X-Pad: " + "p" * (100 * 1024)])]), 413,
     "part_header_too_large"),
    # Content-Length
    ("no-content-length", raw_upload(seed_body, lambda body: [
        ("Content-Type", "multipart/form-data; boundary=" + _http.BOUNDARY)]), 411,
     "length_required"),
    ("transfer-encoding-chunked", raw_upload(
        lambda fid: b"%x\r\n%s\r\n0\r\n\r\n" % (len(seed_body(fid)), seed_body(fid)),
        lambda body: [("Transfer-Encoding", "chunked"),
                      ("Content-Type", "multipart/form-data; boundary=" + _http.BOUNDARY)]),
     411, "length_required"),
    ("chunked-and-length", raw_upload(
        lambda fid: b"%x\r\n%s\r\n0\r\n\r\n" % (len(seed_body(fid)), seed_body(fid)),
        with_length(extra=[("Transfer-Encoding", "chunked")])), (400, 411),
     ("length_required", "bad_request", "bad_content_length")),
    ("content-length-negative", raw_upload(seed_body, lambda body: [
        ("Content-Length", "-5"),
        ("Content-Type", "multipart/form-data; boundary=" + _http.BOUNDARY)]), 400,
     "bad_content_length"),
    ("content-length-letters", raw_upload(seed_body, lambda body: [
        ("Content-Length", "abc"),
        ("Content-Type", "multipart/form-data; boundary=" + _http.BOUNDARY)]), 400,
     "bad_content_length"),
    ("content-length-plus", raw_upload(seed_body, lambda body: [
        ("Content-Length", "+%d" % len(body)),
        ("Content-Type", "multipart/form-data; boundary=" + _http.BOUNDARY)]), 400,
     "bad_content_length"),
    ("content-length-twice-differing", raw_upload(seed_body, lambda body: [
        ("Content-Length", str(len(body))), ("Content-Length", str(len(body) + 1)),
        ("Content-Type", "multipart/form-data; boundary=" + _http.BOUNDARY)]), 400,
     "bad_content_length"),
    ("content-length-smaller-than-body", raw_upload(seed_body, lambda body: [
        ("Content-Length", str(len(body) - 40)),
        ("Content-Type", "multipart/form-data; boundary=" + _http.BOUNDARY)]), 400,
     "malformed_multipart"),
)


def send_bad_upload(srv, build, file_id):
    before, outside = upload_dir_snapshot(srv), outside_snapshot(srv)
    response = _http.exchange(srv.url, build(file_id))
    # nothing stored: no new file anywhere under the upload dir (part files included), none
    # beside it
    wait_until(lambda: upload_dir_snapshot(srv) == before, timeout=5,
               message="the upload dir back to its state before the bad request")
    assert outside_snapshot(srv) == outside
    return response


_case_numbers = iter(range(1, 10 ** 6))


def fresh_id():
    return "case%d_%s" % (next(_case_numbers), os.urandom(3).hex())


# --- multipart field values -----------------------------------------------------------------

@pytest.mark.parametrize("file_id", INVALID_FILE_IDS)
def test_invalid_file_id_is_refused(bad_server, file_id):
    response = send_bad_upload(bad_server, upload(fileId=file_id), fresh_id())
    assert_json_error(response, 400, "invalid_file_id")


@pytest.mark.parametrize("chunk_index", INVALID_CHUNK_INDEXES)
def test_invalid_chunk_index_is_refused(bad_server, chunk_index):
    file_id = fresh_id()
    response = send_bad_upload(bad_server, upload(chunkIndex=chunk_index), file_id)
    assert_json_error(response, 400, "invalid_chunk_index")
    with requests.Session() as session:
        assert get_status(session, bad_server.url, file_id).json()["data"]["exists"] is False


@pytest.mark.parametrize("status", INVALID_STATUSES)
def test_invalid_status_is_refused(bad_server, status):
    file_id = fresh_id()
    response = send_bad_upload(bad_server, upload(status=status), file_id)
    assert_json_error(response, 400, "invalid_status")


@pytest.mark.parametrize("build,status,code", BAD_UPLOADS)
def test_bad_upload_request_is_refused(bad_server, build, status, code):
    file_id = fresh_id()
    response = send_bad_upload(bad_server, build, file_id)
    assert_json_error(response, status, code)
    with requests.Session() as session:
        assert get_status(session, bad_server.url, file_id).json()["data"]["exists"] is False


# --- HTTP framing that needs its own choreography -------------------------------------------

def test_content_length_larger_than_body_then_eof_is_answered_not_hung(bad_server):
    body = seed_body(fresh_id())
    request = _http.build_request("POST", "/api/video/upload", _http.multipart_headers() + [
        ("Content-Length", str(len(body) + 5000))], body, content_length=False)
    response = _http.exchange(bad_server.url, request, timeout=15, shutdown_write=True)
    assert_json_error(response, 400, "incomplete_body")


def test_huge_content_length_is_refused_before_the_body_is_sent(bad_server):
    headers = _http.multipart_headers() + [("Content-Length", str(10 * 1024 ** 3))]
    request = _http.build_request("POST", "/api/video/upload", headers, b"",
                                  content_length=False)
    sock = _http.connect(bad_server.url, timeout=10)
    try:
        sock.sendall(request)                   # headers only; the 10 GiB never follow
        response = _http.read_response(sock, timeout=10)
    finally:
        sock.close()
    assert_json_error(response, 413, ("body_too_large", "chunk_too_large", "upload_too_large"))


# --- GET paths that must not escape the upload dir ------------------------------------------

TRAVERSAL_PATHS = [
    "/uploads/../m1.sqlite3", "/uploads/%2e%2e/m1.sqlite3", "/uploads/..%2Fm1.sqlite3",
    "/uploads/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/uploads/..\\m1.sqlite3",
    "/uploads/../../../../etc/passwd", "/uploads/m1.sqlite3", "/uploads/m1.sqlite3-wal",
    "/uploads/temp/.incoming/", "/uploads/temp/", "/uploads/", "/uploads/.",
    "/uploads/bad_input_survivor.webm%00.txt", "/uploads/bad_input_survivor.webm/..",
    "/api/video/status/..%2F..%2Fetc", "/api/video/status/../../etc/passwd",
    "/api/video/status/%2e%2e", "/api/video/status/a%00b", "//etc/passwd",
    "/uploads/%252e%252e/m1.sqlite3", "/api/video/status/" + "a" * 129,
    "/api/video/status/vid\u00e9o", "/api/video/status/a.b",
]


@pytest.mark.parametrize("path", TRAVERSAL_PATHS)
def test_traversal_in_get_paths_serves_nothing_outside_the_videos(bad_server, path):
    response = _http.request(bad_server.url, "GET", path)
    assert_json_error(response, (400, 404), ("not_found", "invalid_file_id", "bad_request"))
    assert SQLITE_MAGIC not in response.body and b"root:" not in response.body


def test_stashed_chunk_files_are_not_served(bad_server, stashed_chunk):
    for path in ("/uploads/temp/%s/1.chunk" % stashed_chunk,
                 "/uploads/temp/%s/" % stashed_chunk,
                 "/uploads/temp%%2F%s%%2F1.chunk" % stashed_chunk):
        response = _http.request(bad_server.url, "GET", path)
        assert_json_error(response, (400, 404), ("not_found", "invalid_file_id", "bad_request"))
        assert b"early chunk bytes" not in response.body


# --- routes and methods ---------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/nope", "/api/nope", "/api/videos", "/api/video/status/a/b", "/favicon.ico.x",
                                  "/uploads/never_uploaded.webm"])
def test_unknown_route_or_file_is_404(bad_server, path):
    assert_json_error(_http.request(bad_server.url, "GET", path), 404, "not_found")


@pytest.mark.parametrize("method,path,allowed", [
    ("PUT", "/api/video/upload", "POST"), ("DELETE", "/healthz", "GET"),
    ("GET", "/api/video/upload", "POST"), ("POST", "/healthz", "GET"),
    ("POST", "/api/video/status/some_id", "GET"),
])
def test_wrong_method_is_405_with_allow(bad_server, method, path, allowed):
    response = _http.request(bad_server.url, method, path, body=b"")
    assert_json_error(response, 405, "method_not_allowed")
    allow = [m.strip() for m in (response.header("allow") or "").split(",")]
    assert allowed in allow, response.headers


@pytest.mark.parametrize("method", ["BREW", "FOO"])
def test_unknown_method_is_501(bad_server, method):
    response = _http.request(bad_server.url, method, "/api/video/upload")
    assert_json_error(response, 501, "not_implemented")


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    b"GET / FTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/x.y\r\nHost: x\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"\x00\x01\x02 binary\r\n\r\n",
    b"hello world\r\n\r\n",
], ids=["four-words", "not-http", "bad-version", "one-word", "binary", "http09-non-get"])
def test_malformed_request_line_is_400(bad_server, raw):
    assert_json_error(_http.exchange(bad_server.url, raw), 400, "bad_request")


def test_http09_style_get_gets_no_traceback(bad_server):
    response = _http.exchange(bad_server.url, b"GET /nope\r\n\r\n")
    assert b"Traceback" not in response.raw and b'File "' not in response.raw
    if response.status is not None:
        assert_json_error(response, (400, 404, 505), ("bad_request", "not_found",
                                                      "http_version_not_supported"))


def test_header_line_over_64_kib_is_431(bad_server):
    request = _http.build_request("GET", "/healthz", [("X-Big", "a" * (70 * 1024))])
    assert_json_error(_http.exchange(bad_server.url, request), 431, "header_too_large")


def test_more_than_100_headers_is_431(bad_server):
    headers = [("X-H%d" % n, "v") for n in range(120)]
    request = _http.build_request("GET", "/healthz", headers)
    assert_json_error(_http.exchange(bad_server.url, request), 431, "header_too_large")


def test_request_line_over_64_kib_is_414(bad_server):
    request = _http.build_request("GET", "/api/video/status/" + "a" * (70 * 1024))
    assert_json_error(_http.exchange(bad_server.url, request), 414, "uri_too_long")


# --- slow and idle clients (separate servers with a short --timeout) ------------------------

def test_client_stalling_mid_request_is_cut_off(server_factory):
    srv = server_factory(args=["--timeout", "1"])
    body = seed_body(fresh_id())
    request = _http.build_request("POST", "/api/video/upload", _http.multipart_headers(), body)
    head_only = request[:request.index(b"\r\n") + 10]           # inside the headers
    half_body = request[:len(request) - len(body) // 2]          # inside the body
    for partial in (head_only, half_body):
        sock = _http.connect(srv.url, timeout=15)
        try:
            sock.sendall(partial)
            response = _http.read_response(sock, timeout=15)    # raises if never cut off
            if response.status is not None:
                assert_json_error(response, 408, "request_timeout")
        finally:
            sock.close()
    assert requests.get(srv.url + "/healthz", timeout=10).status_code == 200


def test_hundreds_of_idle_connections_are_cut_or_refused(server_factory):
    srv = server_factory(args=["--timeout", "2"])
    idle = []
    try:
        for _ in range(300):
            idle.append(_http.connect(srv.url, timeout=20))
        # a new client is answered at once, served or refused, never left hanging
        # (all from one address: past --max-connections-per-client, 429)
        response = _http.request(srv.url, "GET", "/healthz", timeout=10)
        if response.status != 200:
            assert_json_error(response, (429, 503), ("too_many_connections", "server_busy"))
        for sock in idle:
            got = _http.wait_closed(sock, timeout=20)    # raises if a connection is never cut
            if got:
                response = _http.parse_response(got)
                assert_json_error(response, (408, 429, 503), ("request_timeout", "server_busy",
                                                              "too_many_connections"))
    finally:
        for sock in idle:
            sock.close()

    def served():
        return _http.request(srv.url, "GET", "/healthz").status == 200
    wait_until(served, timeout=15, interval=0.1, message="the server serves a new client")


def test_survivor_upload_is_still_byte_exact_at_the_end(bad_server, completed_upload,
                                                        sample_webm):
    with requests.Session() as session:
        served = session.get("%s/uploads/%s.webm" % (bad_server.url, completed_upload),
                             timeout=10)
        assert served.status_code == 200 and served.content == sample_webm
        status = get_status(session, bad_server.url, completed_upload).json()["data"]
    assert status["state"] == "completed" and status["fileSize"] == len(sample_webm)
    digest = (status.get("sha256") or "").lower().replace("sha256:", "")
    assert digest == hashlib.sha256(sample_webm).hexdigest()


# --- a refused request's body is never read as the next request -----------------------------

SMUGGLED = b"GET /smuggled-%s HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("method,path,headers,status", [
    ("POST", "/api/video/upload", [("Content-Type", "application/json")], 415),
    ("POST", "/api/video/upload", [("Content-Type", "text/plain")], 415),
    ("PUT", "/api/video/upload", [("Content-Type", "text/plain")], 405),
    ("POST", "/nope", [("Content-Type", "text/plain")], 404),
    ("POST", "/api/video/upload", [("Transfer-Encoding", "chunked"),
                                   ("Content-Type", "text/plain")], 411),
], ids=["415-json", "415-text", "405", "404", "411-chunked"])
def test_refused_request_body_is_not_answered_as_a_request(bad_server, method, path, headers,
                                                           status):
    tag = os.urandom(4).hex().encode()
    if any(name == "Transfer-Encoding" for name, _ in headers):
        body = b"0\r\n\r\n" + SMUGGLED % tag
        request = _http.build_request(method, path, headers, body, content_length=False,
                                      close=False)
    else:
        body = SMUGGLED % tag
        request = _http.build_request(method, path, headers, body, close=False)
    sock = _http.connect(bad_server.url, timeout=10)
    try:
        _http.send_quietly(sock, request)
        first = _http.read_response(sock)
        assert_json_error(first, status, first.json()["error"]["code"])
        if not first.closed:
            # still open: the next thing on it must be the answer to our next request
            _http.send_quietly(sock, _http.build_request("GET", "/healthz"))
            second = _http.read_response(sock)
            assert second.status in (None, 200), second
    finally:
        sock.close()
    assert ("/smuggled-" + tag.decode()) not in bad_server.log()


def test_control_characters_are_escaped_in_the_access_log(bad_server):
    tag = os.urandom(4).hex()
    request = _http.build_request("GET", b"/esc-" + tag.encode() + b"\x1b[31m\x07",
                                  [("User-Agent", b"ua\x1b[2J")])
    response = _http.exchange(bad_server.url, request)
    assert_json_error(response, (400, 404), ("not_found", "bad_request"))
    line = wait_until(lambda: [l for l in bad_server.log().splitlines() if tag in l],
                      timeout=5, message="the access-log line")
    assert "\x1b" not in line[0] and "\x07" not in line[0], line
