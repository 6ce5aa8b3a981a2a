"""The hardened HTTP edge (issue #15): framing, deadlines, connection caps, numbers, echoes.

Every test sends the raw bytes it describes over a socket (tests/_http.py) to a real server
and checks the answer: the JSON envelope with the right status, the connection closed after
a framing error, and no traceback in the server's log (checked after every test, for every
server it used). Deadlines are set short with their flags and waited for by reading with a
deadline; nothing here asserts how long something took.
"""
from __future__ import annotations

import base64
import email.utils
import errno
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests

import _http
from _tus import OFFSET_TYPE, TUS, location, metadata
from conftest import ROOT, SERVER_PROGRAM, SERVER_PYTHON, ServerProcess, need, send_chunk, \
    wait_until
from test_bad_input import assert_json_error

sys.path.insert(0, ROOT)
import httpapi  # noqa: E402  (the module under test, for its read buffer's size)
import metrics  # noqa: E402  (the module under test, for its label bound)

KEY = "edge-test-key-0123456789abcdef"
VIDEO = b"\x1a\x45\xdf\xa3" + bytes(range(200))
SMUGGLED = b"GET /smuggled-%s HTTP/1.1\r\nHost: x\r\n\r\n"


# --- servers: two for the module, more from `start`; none may log a traceback --------------

# Deadlines far past a test's length, for tests about the caps: on a loaded machine the
# default --header-timeout or --idle-timeout could otherwise end a held connection mid-test.
PATIENT = ("--header-timeout", "120", "--idle-timeout", "120")


def module_server(tmp_path_factory, name, env=None):
    srv = ServerProcess(tmp_path_factory.mktemp(name) / "uploads", args=["--processing", "off"],
                        env=env)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    yield from module_server(tmp_path_factory, "edge")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    yield from module_server(tmp_path_factory, "edge_keyed", {"M1_API_KEY": KEY})


@pytest.fixture(autouse=True)
def no_traceback(request):
    yield
    for name in ("plain", "keyed"):
        if name in request.fixturenames:
            log = request.getfixturevalue(name).log()
            assert "Traceback" not in log, log[-4000:]


@pytest.fixture
def start(server_factory):
    """start(*flags) -> a server of its own; its log is checked for tracebacks afterwards."""
    started = []

    def make(*flags, **kw):
        srv = server_factory(args=["--processing", "off"] + list(flags), **kw)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        assert "Traceback" not in srv.log(), srv.log()[-4000:]


def upload_to(srv, file_id, data=VIDEO, headers=None):
    with requests.Session() as session:
        session.headers.update(headers or {})
        reply = send_chunk(session, srv.url, file_id, 0, data, status="completed")
    assert reply.status_code == 200, reply.text
    return reply


def connect_from(url, source):
    """A connection from another loopback address (127.0.0.2 ...): another client."""
    try:
        sock = socket.create_connection(_http.address(url), timeout=_http.DEFAULT_TIMEOUT_S,
                                        source_address=(source, 0))
    except OSError as error:
        if error.errno in (errno.EADDRNOTAVAIL, errno.EINVAL):
            pytest.skip("cannot connect from %s here (Linux routes all of 127/8)" % source)
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def ask(sock, method="GET", path="/healthz", headers=(), body=b"", close=False):
    """One request on an open connection (keep-alive unless `close`), its response."""
    _http.send_quietly(sock, _http.build_request(method, path, headers, body, close=close))
    return _http.read_response(sock)


def closes_after(response, sock):
    """The server closed the connection after `response` (nothing more came)."""
    return response.closed or _http.wait_closed(sock) == b""


def exchange_open(url, data):
    """Send raw bytes, read one response, and say whether the server then closed."""
    sock = _http.connect(url)
    try:
        _http.send_quietly(sock, data)
        response = _http.read_response(sock)
        return response, closes_after(response, sock)
    finally:
        sock.close()


def settled_log(srv):
    """The server's log once every line written before now has been read back: a request
    sent now is logged after them."""
    tag = os.urandom(4).hex()
    assert _http.request(srv.url, "GET", "/healthz?settle=" + tag).status == 200
    return wait_until(lambda: tag in srv.log() and srv.log(), message="the log to settle")


def close_all(socks):
    for sock in socks:
        sock.close()


def wait_readable(sock, seconds):
    return bool(select.select([sock], [], [], seconds)[0])


# --- availability: metrics labels -------------------------------------------------------------

def test_unknown_methods_are_counted_under_one_label(plain):
    names = ["X" + os.urandom(2).hex() * 1000 for _ in range(30)]       # 4 KB each
    for name in names:
        assert_json_error(_http.request(plain.url, name, "/healthz"), 501, "not_implemented")
    text = requests.get(plain.url + "/metrics", timeout=10).text
    assert not any(name[:64] in text for name in names)
    found = re.search(r'm1_http_requests_total\{method="other",route="none",status="501"\} '
                      r'(\d+)', text)
    assert found and int(found.group(1)) >= len(names), text[-2000:]
    assert len(text) < 64 * 1024


def test_every_counter_keeps_a_bounded_number_of_label_sets():
    counted = metrics.Metrics(("GET",))
    for n in range(metrics.MAX_SERIES + 500):
        counted.count("m1_chunks_stored_total", upload=str(n))
    counted.observe_request("none", "BREW", 999, 0.01)
    text = counted.render([])
    assert text.count("m1_chunks_stored_total{") == metrics.MAX_SERIES + 1
    assert 'm1_chunks_stored_total{upload="other"} 500' in text
    assert 'method="other",route="none",status="other"' in text


# --- availability: deadlines ------------------------------------------------------------------

def test_a_slow_head_within_the_header_timeout_is_served(start):
    srv = start("--header-timeout", "3")
    request = _http.build_request("GET", "/healthz")
    sock = _http.connect(srv.url)
    try:
        for piece in (request[:8], request[8:20]):  # 0.6 s of pauses in all
            sock.sendall(piece)
            assert not wait_readable(sock, 0.3)     # nothing answered yet
        sock.sendall(request[20:])
        assert _http.read_response(sock).status == 200
    finally:
        sock.close()


def dribble(sock, data, pace_s=0.2):
    """Send `data` a byte at a time, never silent for long, until the server answers;
    returns how many bytes were sent."""
    for sent in range(len(data)):
        if wait_readable(sock, pace_s) or not _http.send_quietly(sock, data[sent:sent + 1]):
            return sent
    return len(data)


def test_a_head_dribbled_past_the_header_timeout_is_cut_with_408(start):
    srv = start("--header-timeout", "1")           # --timeout (each read) stays 30 s
    request = _http.build_request("GET", "/healthz", [("X-Pad", "p" * 200)])
    sock = _http.connect(srv.url, timeout=15)
    try:
        sent = dribble(sock, request)                # 240 bytes at 5/s: 48 s if never cut
        response = _http.read_response(sock)
        body = assert_json_error(response, 408, "request_timeout")
        assert "--header-timeout" in body["error"]["message"] and sent < len(request)
        assert closes_after(response, sock)
    finally:
        sock.close()
    assert requests.get(srv.url + "/healthz", timeout=10).status_code == 200


def test_the_header_timeout_also_bounds_a_later_request_on_a_keep_alive_connection(start):
    srv = start("--header-timeout", "1")
    sock = _http.connect(srv.url, timeout=15)
    try:
        assert ask(sock).status == 200
        request = _http.build_request("GET", "/healthz", [("X-Pad", "p" * 200)])
        line_end = request.index(b"\r\n") + 2
        sock.sendall(request[:line_end])             # the request line at once
        dribble(sock, request[line_end:])            # then the fields, a byte at a time
        assert_json_error(_http.read_response(sock), 408, "request_timeout")
    finally:
        sock.close()


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(start):
    srv = start("--idle-timeout", "1")
    sock = _http.connect(srv.url, timeout=15)
    try:
        assert ask(sock).status == 200
        assert ask(sock).status == 200               # asked again at once: still open
        assert _http.wait_closed(sock, timeout=15) == b""     # then closed without a word
    finally:
        sock.close()


def slow_upload(url, file_id, pace_bytes, pace_s=0.25, size=24000):
    """A chunk upload whose body arrives `pace_bytes` every `pace_s`; its response."""
    body = _http.multipart_body(_http.chunk_parts(file_id, 0, VIDEO + b"\0" * size))
    head = _http.build_request("POST", "/api/video/upload", _http.multipart_headers() + [
        ("Content-Length", str(len(body)))], b"", content_length=False)
    sock = _http.connect(url, timeout=20)
    try:
        sock.sendall(head)
        for at in range(0, len(body), pace_bytes):
            if wait_readable(sock, pace_s) or \
                    not _http.send_quietly(sock, body[at:at + pace_bytes]):
                break
        return _http.read_response(sock, timeout=20)
    finally:
        sock.close()


def test_a_body_slower_than_the_minimum_rate_is_cut_with_408(start):
    srv = start("--min-body-rate", "2K", "--body-rate-window", "1")
    response = slow_upload(srv.url, "edge_slow_body", pace_bytes=100)     # 400 B/s
    body = assert_json_error(response, 408, "request_timeout")
    assert "--min-body-rate" in body["error"]["message"]
    status = requests.get(srv.url + "/api/video/status/edge_slow_body", timeout=10).json()
    assert status["data"]["exists"] is False


def test_a_body_at_four_times_the_minimum_rate_is_stored(start):
    srv = start("--min-body-rate", "2K", "--body-rate-window", "1")
    response = slow_upload(srv.url, "edge_paced_body", pace_bytes=2048)   # 8 KiB/s, 3 s
    assert response.status == 200, response


def test_a_tus_patch_slower_than_the_minimum_rate_keeps_what_arrived(start):
    srv = start("--min-body-rate", "2K", "--body-rate-window", "1", "--tus-piece-size", "1K")
    with requests.Session() as s:
        created = s.post(srv.url + "/files/", headers=dict(TUS, **{"Upload-Length": "30000"}),
                         timeout=10)
        path = location(created)
    data = VIDEO + b"\0" * (30000 - len(VIDEO))
    head = _http.build_request("PATCH", path, [
        ("Tus-Resumable", "1.0.0"), ("Upload-Offset", "0"), ("Content-Type", OFFSET_TYPE),
        ("Content-Length", str(len(data)))], b"", content_length=False)
    sock = _http.connect(srv.url, timeout=20)
    try:
        sock.sendall(head)
        for at in range(0, len(data), 100):
            if wait_readable(sock, 0.25) or not _http.send_quietly(sock, data[at:at + 100]):
                break
        response = _http.read_response(sock, timeout=20)
    finally:
        sock.close()
    assert response.status == 204, response              # a PATCH that broke off (tus.py)
    offset = int(response.header("upload-offset"))
    assert 0 < offset < len(data)
    answer = requests.head(srv.url + path, headers=TUS, timeout=10)
    assert int(answer.headers["Upload-Offset"]) == offset


# --- availability: connection caps ------------------------------------------------------------

def test_one_address_past_its_cap_gets_429_while_another_is_served(start):
    srv = start("--max-connections", "8", "--max-connections-per-client", "2", *PATIENT)
    held = [_http.connect(srv.url) for _ in range(2)]   # mid-head: not idle, cannot make room
    try:
        wait_until(lambda: _http.request(srv.url, "GET", "/healthz").status == 429,
                   message="the cap reached (the accept thread admits in order)")
        refused = _http.request(srv.url, "GET", "/healthz")
        assert_json_error(refused, 429, "too_many_connections")
        assert refused.header("retry-after") == "1"
        assert ask(held[1]).status == 200              # 2 of 2 were let in
        other = connect_from(srv.url, "127.0.0.2")
        try:
            assert ask(other, close=True).status == 200
        finally:
            other.close()
    finally:
        close_all(held)


@pytest.mark.parametrize("cap,per_client", [(8, 2), (3, 3)],
                         ids=["address-at-its-cap", "server-full"])
def test_the_longest_idle_keep_alive_is_closed_to_make_room(start, cap, per_client):
    """Either cap reached with idle connections: the next client is served, by closing the
    one idle longest (of that address, or of anyone)."""
    srv = start("--max-connections", str(cap), "--max-connections-per-client", str(per_client),
                *PATIENT)
    idle = []
    try:
        for _ in range(per_client):
            idle.append(_http.connect(srv.url))
            assert ask(idle[-1]).status == 200           # now idle between requests
        # (once its handler is back to waiting: a moment after the answer went out)
        wait_until(lambda: _http.request(srv.url, "GET", "/healthz").status == 200,
                   message="a slot made by closing an idle connection")
        wait_until(lambda: any(wait_readable(sock, 0) for sock in idle),
                   message="an idle connection closed")
        closed = [sock for sock in idle if wait_readable(sock, 0.2)]
        assert len(closed) == 1 and _http.wait_closed(closed[0]) == b""
        assert all(ask(sock).status == 200 for sock in idle if sock not in closed)
    finally:
        close_all(idle)


def test_a_full_server_with_no_idle_connection_answers_503(start):
    srv = start("--max-connections", "3", "--max-connections-per-client", "3", *PATIENT)
    busy = [_http.connect(srv.url) for _ in range(3)]    # mid-head, none idle
    try:
        wait_until(lambda: _http.request(srv.url, "GET", "/healthz").status == 503,
                   message="a full server with no idle connection")
        assert_json_error(_http.request(srv.url, "GET", "/healthz"), 503, "server_busy")
    finally:
        close_all(busy)


def test_refusing_connections_never_holds_up_the_accept_loop(start):
    """Refused clients that send a body and never read nor close: the old accept thread
    lingered 0.2 s on each, so the last of 100 was answered after 20 s, past the deadline
    of 10 s below, and the next client waited as long."""
    srv = start("--max-connections", "2", "--max-connections-per-client", "2", *PATIENT)
    held = [_http.connect(srv.url) for _ in range(2)]
    refused = []
    try:
        wait_until(lambda: _http.request(srv.url, "GET", "/healthz").status == 503,
                   message="the cap reached")
        request = _http.build_request("POST", "/api/video/upload", body=b"x" * 60000)
        for _ in range(100):
            sock = _http.connect(srv.url)
            _http.send_quietly(sock, request)
            refused.append(sock)
        wait_until(lambda: wait_readable(refused[-1], 0), timeout=10,
                   message="the last refused client answered")
        assert_json_error(_http.read_response(refused[-1]), 503, "server_busy")
        close_all(held)
        wait_until(lambda: _http.request(srv.url, "GET", "/healthz", timeout=10).status == 200,
                   timeout=20, message="a new client served after the refusals")
    finally:
        close_all(held + refused)


# --- availability: Expect: 100-continue -------------------------------------------------------

def send_head(url, method, path, headers, length):
    sock = _http.connect(url)
    sock.sendall(_http.build_request(method, path, headers + [
        ("Content-Length", str(length)), ("Expect", "100-continue")], b"",
        content_length=False))
    return sock


@pytest.mark.parametrize("path,headers,length,status,code", [
    ("/api/video/upload", [], 1000, 401, "missing_credentials"),
    ("/api/video/upload", [("Authorization", "Bearer " + KEY)], 200 << 20, 413,
     "body_too_large"),
    ("/nowhere", [("Authorization", "Bearer " + KEY)], 1000, 404, "not_found"),
], ids=["no-credentials", "too-large", "no-route"])
def test_expect_100_continue_refused_before_any_100(keyed, path, headers, length, status,
                                                    code):
    sock = send_head(keyed.url, "POST", path, _http.multipart_headers() + headers, length)
    try:
        response = _http.read_response(sock)           # the first thing that comes back
        assert_json_error(response, status, code)
    finally:
        sock.close()


def test_expect_100_continue_is_answered_once_everything_passed(keyed):
    body = _http.multipart_body(_http.chunk_parts("edge_expect", 0, VIDEO, "completed"))
    sock = send_head(keyed.url, "POST", "/api/video/upload", _http.multipart_headers() + [
        ("Authorization", "Bearer " + KEY)], len(body))
    try:
        interim = _http.read_response(sock)
        assert interim.status == 100, interim
        sock.sendall(body)
        final = _http.read_response(sock)
        assert final.status == 200 and final.json()["data"]["status"] == "completed", final
    finally:
        sock.close()


# --- parsing: numbers -------------------------------------------------------------------------

DIGITS_5000 = "9" * 5000


@pytest.mark.parametrize("value", [b"\xb2", b"1\xb3", DIGITS_5000.encode(), b"+5", b"0x10",
                                   b"", b"5 5"],
                         ids=["superscript-2", "one-superscript-3", "5000-digits", "plus",
                              "hex", "empty", "two-words"])
@pytest.mark.parametrize("method,path", [("GET", "/healthz"),
                                         ("POST", "/api/video/upload"),
                                         ("GET", "/api/video")])
def test_a_content_length_that_is_not_ascii_digits_is_400_on_every_route(plain, keyed, method,
                                                                         path, value):
    for srv in (plain, keyed):                         # before any credential is looked at
        request = _http.build_request(method, path, [("Content-Length", value)], b"",
                                      content_length=False, close=False)
        response, closed = exchange_open(srv.url, request)
        assert_json_error(response, 400, "bad_content_length")
        assert closed


@pytest.fixture(scope="module")
def stored(plain):
    """fileId of a completed upload on the plain server, with its ETag."""
    upload_to(plain, "edge_media")
    etag = requests.head(plain.url + "/uploads/edge_media.webm", timeout=10).headers["ETag"]
    return "edge_media", etag


@pytest.mark.parametrize("value", ["bytes=0-" + DIGITS_5000, "bytes=" + DIGITS_5000 + "-",
                                   "bytes=-" + DIGITS_5000, "bytes=\u00b2-",
                                   "bytes=0-\u00b9"])
def test_a_range_with_unreadable_numbers_is_ignored(plain, stored, value):
    response = _http.request(plain.url, "GET", "/uploads/edge_media.webm", [
        ("Range", value.encode("latin-1"))])
    assert response.status == 200 and response.body == VIDEO, response


@pytest.mark.parametrize("path,code", [
    ("/api/video?limit=%C2%B2", "invalid_limit"),
    ("/api/video?limit=" + DIGITS_5000, "invalid_limit"),
    ("/api/video/webhooks/deliveries?limit=%C2%B2", "invalid_limit"),
    ("/api/video/webhooks/deliveries?limit=" + DIGITS_5000, "invalid_limit"),
    ("/api/video/webhooks/deliveries?cursor=%C2%B2", "invalid_cursor"),
    ("/api/video/webhooks/deliveries?cursor=" + DIGITS_5000, "invalid_cursor"),
])
def test_query_numbers_must_be_ascii_digits(plain, path, code):
    assert_json_error(_http.request(plain.url, "GET", path), 400, code)


@pytest.mark.parametrize("delivery", ["%C2%B2", DIGITS_5000, "\xb2"])
def test_a_delivery_id_must_be_ascii_digits(plain, delivery):
    response = _http.request(plain.url, "POST",
                             "/api/video/webhooks/deliveries/%s/retry" % delivery)
    assert_json_error(response, 400, "invalid_delivery_id")


@pytest.mark.parametrize("name,value,code", [
    ("Upload-Offset", b"\xb2", "invalid_upload_offset"),
    ("Upload-Offset", DIGITS_5000.encode(), "invalid_upload_offset"),
    ("Upload-Length", b"\xb9", "invalid_upload_length"),
    ("Upload-Length", DIGITS_5000.encode(), "invalid_upload_length"),
])
def test_tus_numbers_must_be_ascii_digits(plain, keyed, name, value, code):
    with requests.Session() as s:
        path = location(s.post(plain.url + "/files/", headers=dict(TUS, **{
            "Upload-Length": "100"}), timeout=10))
    headers = [("Tus-Resumable", "1.0.0"), ("Content-Type", OFFSET_TYPE), (name, value)]
    if name == "Upload-Length":
        headers.append(("Upload-Offset", "0"))
        response = _http.request(plain.url, "PATCH", path, headers, body=b"")
        assert_json_error(response, 400, code)
        response = _http.request(keyed.url, "POST", "/files/", [
            ("Authorization", "Bearer " + KEY), ("Tus-Resumable", "1.0.0"), (name, value)])
    else:
        response = _http.request(plain.url, "PATCH", path, headers, body=b"")
    assert_json_error(response, 400, code)


def test_a_chunk_index_in_superscript_digits_is_400(plain):
    parts = _http.chunk_parts("edge_superscript", 0, VIDEO)
    parts[2] = ("chunkIndex", "\u00b2")
    assert_json_error(_http.exchange(plain.url, _http.upload_request(parts)), 400,
                      "invalid_chunk_index")


# --- parsing: a non-ASCII fileId with a valid token -------------------------------------------

@pytest.fixture(scope="module")
def token(keyed):
    reply = requests.post(keyed.url + "/api/video/tokens", json={
        "fileId": "edge_token_file", "rights": ["upload", "read"]},
        headers={"Authorization": "Bearer " + KEY}, timeout=10)
    assert reply.status_code == 200, reply.text
    upload_to(keyed, "edge_token_file", headers={"Authorization": "Bearer " + KEY})
    return reply.json()["data"]["token"]


@pytest.mark.parametrize("spelling", ["vid%C3%A9o", "vid\xe9o", "%E2%82%AC", "a%00b"])
@pytest.mark.parametrize("method,template,status,code", [
    ("GET", "/api/video/status/%s", 400, "invalid_file_id"),
    ("GET", "/uploads/%s.webm", 404, "not_found"),
    ("GET", "/api/video/events/%s", 400, "invalid_file_id"),
    ("HEAD", "/files/%s", 404, None),
], ids=["status", "media", "events", "tus-head"])
def test_a_non_ascii_file_id_with_a_valid_token_is_400_or_404(keyed, token, method, template,
                                                              status, code, spelling):
    headers = [("Authorization", "Bearer " + token), ("Tus-Resumable", "1.0.0")]
    if method == "HEAD":                              # no body to read: requests reads it
        answer = requests.head(keyed.url + template % spelling, headers=dict(headers),
                               timeout=10)
        assert answer.status_code == status
        return
    response = _http.request(keyed.url, method, template % spelling, headers)
    assert_json_error(response, status, code)
    by_query = _http.request(keyed.url, method, (template % spelling) + "?token=" + token)
    assert_json_error(by_query, status, code)


# --- parsing: framing (RFC 9112) --------------------------------------------------------------

def smuggling(method, path, framing, version="HTTP/1.1"):
    """A request whose body, read by the wrong framing, holds a second request."""
    tag = os.urandom(4).hex().encode()
    body = b"0\r\n\r\n" + SMUGGLED % tag
    lines = [b"%s %s %s" % (method, path, version.encode()), b"Host: 127.0.0.1"] + framing
    return b"\r\n".join(lines) + b"\r\n\r\n" + body, "/smuggled-" + tag.decode()


@pytest.mark.parametrize("method,path,framing,status,code", [
    (b"GET", b"/healthz", [b"Transfer-Encoding: chunked"], 411, "length_required"),
    (b"DELETE", b"/api/video/nothing", [b"Transfer-Encoding: chunked"], 411,
     "length_required"),
    (b"GET", b"/healthz", [b"Transfer-Encoding: gzip, chunked"], 501, "not_implemented"),
    (b"POST", b"/api/video/upload", [b"Content-Length: 5", b"Transfer-Encoding: chunked"],
     411, "length_required"),
    (b"GET", b"/healthz", [b"Content-Length: 0", b"Content-Length: 5"], 400,
     "bad_content_length"),
    (b"GET", b"/healthz", [b"Content-Length: 0, 5"], 400, "bad_content_length"),
    (b"POST", b"/api/video/upload", [b"Content-Length: 44", b"Content-Length: 45"], 400,
     "bad_content_length"),
], ids=["te-on-get", "te-on-delete", "te-gzip", "te-and-cl", "cl-twice-differing",
        "cl-list-differing", "cl-differing-on-post"])
def test_ambiguous_framing_is_refused_and_the_connection_closed(plain, method, path, framing,
                                                                 status, code):
    request, smuggled = smuggling(method, path, framing)
    response, closed = exchange_open(plain.url, request)
    assert_json_error(response, status, code)
    assert closed and response.header("connection") == "close"
    assert smuggled not in settled_log(plain)


def test_transfer_encoding_on_http_1_0_is_400(plain):
    request, smuggled = smuggling(b"POST", b"/api/video/upload",
                                  [b"Transfer-Encoding: chunked"], version="HTTP/1.0")
    response, closed = exchange_open(plain.url, request)
    assert_json_error(response, 400, "bad_request")
    assert closed and smuggled not in settled_log(plain)


def test_identical_repeated_content_lengths_are_one_length(plain):
    body = _http.multipart_body(_http.chunk_parts("edge_two_lengths", 0, VIDEO, "completed"))
    for lengths in ([str(len(body))] * 2, ["%d, %d" % (len(body), len(body))]):
        request = _http.build_request("POST", "/api/video/upload", _http.multipart_headers() +
                                      [("Content-Length", v) for v in lengths], body,
                                      content_length=False)
        assert _http.exchange(plain.url, request).status == 200


@pytest.mark.parametrize("head,code", [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n", "malformed_header"),
    (b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", "malformed_header"),
    (b"GET /healthz HTTP/1.1\r\nHost\t: x\r\n\r\n", "malformed_header"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", "folded_header"),
    (b"GET /healthz HTTP/1.1\r\n Host: x\r\n\r\n", "folded_header"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", "malformed_header"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", "bad_request"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", "bad_request"),
    (b"GET /healthz HTTP/1.1\r\nNoColon\r\nHost: x\r\n\r\n", "malformed_header"),
    (b"GET /healthz HTTP/1.1\r\nX-A: b\r\n\r\n", "invalid_host"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "invalid_host"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nhost: x\r\n\r\n", "invalid_host"),
    (b"GET /healthz HTTP/1.0\r\nHost: x\r\nHost: y\r\n\r\n", "invalid_host"),
    (b"GET /healthz HTTP/1.1\r\nHost: evil.example/path\r\n\r\n", "invalid_host"),
    (b"GET /healthz HTTP/1.1\r\nHost: a@b\r\n\r\n", "invalid_host"),
    (b"GET /healthz HTTP/1.1\r\nHost: x:port\r\n\r\n", "invalid_host"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", "incomplete_head"),
    (b"GET /healthz HTTP/1.1\r\nHost: x", "incomplete_head"),
    (b"GET /healthz\x7f HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    (b"G(T /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    (b"GET  /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
], ids=["space-before-colon", "host-space-before-colon", "tab-before-colon", "obs-fold",
        "fold-before-first", "control-char", "bare-cr", "bare-lf", "no-colon", "no-host",
        "two-hosts", "two-hosts-cased", "two-hosts-1.0", "host-with-path", "host-with-at",
        "host-port-letters", "cut-after-fields", "cut-inside-field", "del-in-target",
        "method-not-token", "double-space"])
def test_a_malformed_head_is_400_and_the_connection_closed(plain, head, code):
    response = _http.exchange(plain.url, head, shutdown_write=True)
    assert_json_error(response, 400, code)
    assert response.header("connection") == "close"


def test_a_reply_head_is_one_status_line_and_well_formed_fields(plain):
    """The head send_response/send_headers write by hand: HTTP/1.1, the reason phrase,
    Server, a Date in RFC 9110's IMF-fixdate (GMT) near now, CRLF line ends only, the
    security headers, and nothing after the body."""
    sock = _http.connect(plain.url)
    try:
        before = time.time()
        response = ask(sock, "GET", "/no-such-route")
        after = time.time()
    finally:
        sock.close()
    head = response.raw[:response.raw.index(b"\r\n\r\n")]
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"\n" not in head.replace(b"\r\n", b"")
    assert b"\r" not in head.replace(b"\r\n", b"")
    assert response.header("server").startswith("m1server/")
    date = response.header("date")
    assert re.match(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|"
                    r"Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT$", date), date
    stamp = email.utils.parsedate_to_datetime(date).timestamp()
    assert int(before) <= stamp <= after
    assert response.header("x-content-type-options") == "nosniff"
    assert response.header("content-length") == str(len(response.body))
    assert response.json()["success"] is False
    assert response.raw.endswith(response.body)


def test_a_reply_that_closes_the_connection_says_so(plain):
    response = _http.exchange(plain.url, _http.build_request("GET", "/healthz", close=True))
    assert response.status == 200
    assert response.header("connection") == "close"


def test_an_http_1_0_request_without_host_is_served(plain):
    assert _http.exchange(plain.url, b"GET /healthz HTTP/1.0\r\n\r\n").status == 200


def test_a_head_cut_short_is_never_served(plain):
    """Once a request ended at the end of the stream: a proxy must never see it served."""
    tag = os.urandom(4).hex()
    head = ("DELETE /api/video/edge_cut_%s HTTP/1.1\r\nHost: x\r\n" % tag).encode()
    assert_json_error(_http.exchange(plain.url, head, shutdown_write=True), 400,
                      "incomplete_head")


@pytest.mark.parametrize("flag,limit,build,past_status", [
    ("--max-headers", "10", lambda n: [("X-H%d" % i, "v") for i in range(n - 2)], 431),
])
def test_header_count_at_and_past_its_limit(start, flag, limit, build, past_status):
    srv = start(flag, limit)
    assert _http.request(srv.url, "GET", "/healthz", build(int(limit))).status == 200
    past = _http.request(srv.url, "GET", "/healthz", build(int(limit) + 1))
    assert_json_error(past, past_status, "header_too_large")


def test_header_bytes_and_request_line_at_and_past_their_limit(start):
    srv = start("--max-header-size", "1K")
    # field bytes: "Host: 127.0.0.1\r\n" (17) + "Connection: close\r\n" (19) + the pad line
    fill = 1024 - 17 - 19 - len("X-Pad: \r\n")
    assert _http.request(srv.url, "GET", "/healthz", [("X-Pad", "p" * fill)]).status == 200
    past = _http.request(srv.url, "GET", "/healthz", [("X-Pad", "p" * (fill + 1))])
    assert_json_error(past, 431, "header_too_large")
    line = 1024 - len("GET  HTTP/1.1")
    path = "/healthz?" + "q" * (line - len("/healthz?"))
    assert _http.request(srv.url, "GET", path).status == 200
    assert_json_error(_http.request(srv.url, "GET", path + "q"), 414, "uri_too_long")


# --- parsing: what is echoed ------------------------------------------------------------------

def test_folded_upload_metadata_is_refused_before_anything_is_stored(plain):
    meta = metadata(filename="a.webm").encode()
    response, closed = exchange_open(plain.url, _http.build_request("POST", "/files/", [
        ("Tus-Resumable", "1.0.0"), ("Upload-Length", "10"),
        ("Upload-Metadata", meta + b",\r\n fileId " + base64.b64encode(b"edge_fold"))]))
    assert_json_error(response, 400, "folded_header")
    assert requests.get(plain.url + "/api/video/status/edge_fold",
                        timeout=10).json()["data"]["exists"] is False


@pytest.mark.parametrize("value,code", [
    (b"content-type,\r\n tus-resumable", "folded_header"),
    (b"content-type,\x0btus-resumable", "malformed_header"),
    (b"content-type\x00", "malformed_header"),
])
def test_a_preflight_asking_for_folded_or_controlled_headers_is_refused(plain, value, code):
    response = _http.request(plain.url, "OPTIONS", "/api/video/upload", [
        ("Origin", "http://app.example"), ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", value)])
    assert_json_error(response, 400, code)
    assert b"tus-resumable" not in response.raw.lower()


# --- parsing: If-None-Match and If-Range on a video -------------------------------------------

@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("value,matches", [
    ("*", True), ("{etag}", True), ('"nope", {etag}', True), ('"a,b", {etag}', True),
    ("W/{etag}", True), ('"nope"', False), ("W/\"nope\", \"other\"", False),
    ("garbage", False), ("{etag}x", False),
])
def test_if_none_match_follows_rfc_9110(plain, stored, method, value, matches):
    _, etag = stored
    response = _http.request(plain.url, method, "/uploads/edge_media.webm",
                             [("If-None-Match", value.format(etag=etag))])
    assert response.status == (304 if matches else 200), response
    if matches:
        assert response.body == b"" and response.header("etag") == etag


def test_if_none_match_over_two_header_lines_is_one_list(plain, stored):
    _, etag = stored
    response = _http.request(plain.url, "GET", "/uploads/edge_media.webm", [
        ("If-None-Match", '"nope"'), ("If-None-Match", etag)])
    assert response.status == 304


@pytest.mark.parametrize("if_range,status", [("{etag}", 206), ("W/{etag}", 200),
                                             ('"other"', 200)])
def test_if_range_compares_strongly(plain, stored, if_range, status):
    _, etag = stored
    response = _http.request(plain.url, "GET", "/uploads/edge_media.webm", [
        ("Range", "bytes=0-3"), ("If-Range", if_range.format(etag=etag))])
    assert response.status == status
    assert response.body == (VIDEO[:4] if status == 206 else VIDEO)


# --- parsing: tokens in the access log --------------------------------------------------------

@pytest.mark.parametrize("name", ["%74oken", "t%6Fken", "%74%6F%6B%65%6E", "token"])
def test_a_token_under_a_percent_encoded_name_is_redacted_in_the_log(keyed, token, name):
    path = "/api/video/status/edge_token_file?%s=%s" % (name, token)
    assert _http.request(keyed.url, "GET", path).status == 200      # accepted as credential
    wait_until(lambda: name + "=REDACTED" in keyed.log(), message="the redacted log line")
    assert token not in keyed.log()
    assert token.split(".")[2] not in keyed.log()


# --- processing input -------------------------------------------------------------------------

def test_uploads_without_a_media_signature_are_never_processed(start, sample_webm, tmp_path):
    need(shutil.which("ffmpeg") and shutil.which("ffprobe"), "ffmpeg/ffprobe not installed")
    srv = start("--allow-any-content", "--processing", "remux")
    outside = os.path.join(os.path.dirname(srv.upload_dir), "outside.mkv")
    with open(outside, "wb") as f:
        f.write(sample_webm)
    upload_to(srv, "edge_victim", sample_webm)
    scripts = {
        "edge_concat": b"ffconcat version 1.0\nfile edge_victim.webm\n",
        "edge_hls": b"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:5\n#EXTINF:4.0,\n"
                    b"../outside.mkv\n#EXT-X-ENDLIST\n",
    }
    for file_id, script in scripts.items():
        upload_to(srv, file_id, script)
    with requests.Session() as s:
        def settled(file_id):
            data = s.get(srv.url + "/api/video/status/" + file_id, timeout=10).json()["data"]
            return data if data.get("processing", {}).get("state") in ("done", "failed") \
                else None
        assert wait_until(lambda: settled("edge_victim"), timeout=90,
                          message="the real video processed")["processing"]["state"] == "done"
        for file_id in scripts:
            data = wait_until(lambda: settled(file_id), timeout=90, message=file_id)
            assert data["processing"]["state"] == "failed", data
            assert "signature" in data["processing"].get("error", ""), data
            assert not data.get("derivatives"), data


# --- operations -------------------------------------------------------------------------------

def run_cli(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([SERVER_PYTHON, SERVER_PROGRAM] + list(args), cwd=ROOT, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)


def test_gc_with_a_bad_setting_prints_one_line(tmp_path):
    empty = tmp_path / "key"
    empty.write_text("")
    (tmp_path / "uploads").mkdir()
    for args in (["--api-key-file", str(empty)],
                 ["--max-connections", "4", "--max-connections-per-client", "5"],
                 ["--tls-cert", str(tmp_path / "cert.pem")]):
        done = run_cli("gc", "--dir", str(tmp_path / "uploads"), *args)
        stderr = done.stderr.decode()
        assert done.returncode == 2 and "Traceback" not in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("m1server gc: ")
        assert not os.path.exists(tmp_path / "uploads" / "m1.sqlite3")


def test_serve_checks_tls_files_before_opening_the_store(tmp_path):
    folder = tmp_path / "uploads"
    done = run_cli("--port", "0", "--dir", str(folder), "--tls-cert", str(tmp_path / "no.pem"),
                   "--tls-key", str(tmp_path / "no.key"))
    stderr = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "--tls-cert" in stderr
    assert not os.path.exists(folder)                      # nothing opened, nothing made


@pytest.mark.parametrize("value", ["ftp://x.example", "https://", "https://a.example/?q=1",
                                   "https://a b.example", "video.example"])
def test_a_malformed_public_url_is_refused_at_start(tmp_path, value):
    done = run_cli("--port", "0", "--dir", str(tmp_path), "--public-url", value)
    assert done.returncode == 2 and b"--public-url" in done.stderr, done.stderr
    assert b"Traceback" not in done.stderr


# --- interop: absolute URLs -------------------------------------------------------------------

def tus_create(url, headers):
    return _http.request(url, "POST", "/files/", [("Tus-Resumable", "1.0.0"),
                                                  ("Upload-Length", "10")] + headers)


def test_tus_location_is_absolute_from_the_host_header(plain):
    response = tus_create(plain.url, [("Host", "video.example:8443")])
    assert response.status == 201
    assert re.match(r"http://video\.example:8443/files/tus_[0-9a-f]+\Z",
                    response.header("location")), response.headers
    # not a proxy's word without --trust-proxy
    forwarded = tus_create(plain.url, [("X-Forwarded-Host", "evil.example"),
                                       ("X-Forwarded-Proto", "https")])
    assert forwarded.header("location").startswith("http://127.0.0.1/files/")


def test_json_bodies_keep_relative_urls(plain):
    """docs/security.md, "The HTTP edge": a URL in a JSON body is a path, resolved against
    the server that was called."""
    created = requests.post(plain.url + "/files/", data=VIDEO, headers=dict(TUS, **{
        "Upload-Length": str(len(VIDEO)), "Content-Type": OFFSET_TYPE}), timeout=10)
    file_id = location(created).rsplit("/", 1)[1]
    data = requests.get(plain.url + "/api/video/status/" + file_id, timeout=10).json()["data"]
    assert data["url"] == "/uploads/%s.webm" % file_id
    assert data["tus"]["uploadUrl"] == "/files/" + file_id


def test_tus_location_follows_the_proxy_with_trust_proxy(start):
    srv = start("--trust-proxy")
    response = tus_create(srv.url, [("X-Forwarded-Host", "a.example, video.example"),
                                    ("X-Forwarded-Proto", "https")])
    assert response.header("location").startswith("https://video.example/files/")
    bad = tus_create(srv.url, [("X-Forwarded-Host", "evil.example/x"),
                               ("X-Forwarded-Proto", "gopher")])
    assert bad.header("location").startswith("http://127.0.0.1/files/")


def test_tus_location_starts_with_the_public_url(start):
    srv = start("--public-url", "https://video.example/m1/")
    response = tus_create(srv.url, [("Host", "internal:3001")])
    assert response.header("location").startswith("https://video.example/m1/files/tus_")


# --- show: a normal upload while the slots are held -------------------------------------------

SLOW_SOCKETS = IDLE_SOCKETS = 256


def test_an_upload_is_served_while_256_slow_and_256_idle_sockets_are_held(start):
    """The issue's load: 256 sockets inside a head (one address) and 256 idle keep-alive
    connections (another), then a normal upload from a third address. Every timeout is set
    past the test's length, so that the caps and the closing of idle connections, not a
    deadline, are what keep a slot for the upload. Bounded: 512 sockets, all closed at the
    end; the read deadline of the upload (30 s) is the only clock."""
    srv = start("--timeout", "300", "--header-timeout", "300", "--idle-timeout", "300")
    held = []
    try:
        for _ in range(SLOW_SOCKETS):
            sock = connect_from(srv.url, "127.0.0.2")
            _http.send_quietly(sock, b"GET /healthz HTTP/1.1\r\nX-Slow: ")
            held.append(sock)
        for _ in range(IDLE_SOCKETS):
            sock = connect_from(srv.url, "127.0.0.3")
            held.append(sock)
            _http.send_quietly(sock, _http.build_request("GET", "/healthz", close=False))
            _http.read_response(sock)           # served, refused, or closed: all fine
        upload_to(srv, "edge_under_load")
    finally:
        close_all(held)


# --- the read buffer: a small chunk's head and body in one read (httpapi.READ_BUFFER_BYTES) --

def request_of_length(file_id, total):
    """A fields-first, in-order chunk 0 whose request (head and body) is `total` bytes."""
    size = total
    for _ in range(3):          # Content-Length's digits change with the size: settle them
        data = VIDEO + b"\0" * (size - len(VIDEO))
        parts = [("fileId", file_id), ("chunkIndex", "0"), ("status", "completed"),
                 ("file", data, "blob", "video/webm")]
        raw = _http.upload_request(parts)
        size += total - len(raw)
    assert len(raw) == total
    return raw, data


def test_the_read_buffer_takes_a_small_request_whole():
    """What the handler relies on: the read that brings a head in brings the whole of a
    request up to its rfile's buffer with it (the parser then writes the chunk at once)."""
    raw, _ = request_of_length("edge_buffer_whole", httpapi.READ_BUFFER_BYTES)
    left, right = socket.socketpair()
    try:
        left.sendall(raw)
        rfile = right.makefile("rb", httpapi.Handler.rbufsize)
        head = rfile.readline()
        assert head.startswith(b"POST ")
        assert len(rfile.peek()) == len(raw) - len(head)     # all buffered, no read left
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize("extra", [-1, 0, 1, 70000])
@pytest.mark.parametrize("apart", [False, True], ids=["one_send", "head_then_body"])
def test_requests_at_and_past_the_read_buffer_are_stored_whole(plain, extra, apart):
    file_id = "edge_buffer_%d_%s" % (extra + 1, "apart" if apart else "whole")
    raw, data = request_of_length(file_id, httpapi.READ_BUFFER_BYTES + extra)
    sock = _http.connect(plain.url)
    try:
        if apart:
            cut = raw.index(b"\r\n\r\n") + 4
            sock.sendall(raw[:cut])
            sock.sendall(raw[cut:])
        else:
            sock.sendall(raw)
        response = _http.read_response(sock)
    finally:
        sock.close()
    assert response.status == 200, response
    assert response.json()["data"]["status"] == "completed"
    stored = requests.get(plain.url + "/uploads/%s.webm" % file_id, timeout=30)
    assert stored.status_code == 200 and stored.content == data
