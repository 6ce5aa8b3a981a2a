"""RFC 6455 at /api/video/events/<fileId>: the handshake, frames, ping/pong, closing, limits.

The ordinary client is the `websockets` package (PyPI); a bare client (`RawWebSocket`) sends
what a library will not: unmasked frames, reserved bits, odd close codes, frames over the limit,
and a client that never answers pings.
"""
from __future__ import annotations

import json
import struct

import pytest
import requests
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect as ws_connect

import _http
from _events_clients import (OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
                             RawWebSocket, accept_for, encode_client_frame,
                             events_path)
from conftest import ServerProcess, stopping, wait_until

MAX_MESSAGE = 1024                     # --ws-max-message for these servers


@pytest.fixture(scope="module")
def ws_server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("ws"),
                        args=["--ws-max-message", "1K", "--allow-any-content"])
    with stopping(srv):
        srv.start()
        yield srv


@pytest.fixture(scope="module")
def heartbeat_server(tmp_path_factory):
    """Pings every 0.3 s, and a per-read --timeout of 1 s that must not cut healthy streams."""
    srv = ServerProcess(tmp_path_factory.mktemp("hb"),
                        args=["--event-heartbeat", "0.3", "--timeout", "1",
                              "--allow-any-content"])
    with stopping(srv):
        srv.start()
        yield srv


def ws_url(srv, file_id):
    return srv.url.replace("http://", "ws://") + events_path(file_id)


def open_raw(srv, file_id="edges", **kw):
    ws = RawWebSocket(srv.url, events_path(file_id), **kw)
    assert ws.status == 101, ws.headers
    state = ws.recv_json()
    assert state["type"] == "state" and state["fileId"] == file_id
    return ws


def assert_closed_with(ws, code):
    """The server sends Close(code) first, then ends the TCP connection after our answer."""
    got, reason = ws.expect_close()
    assert got == code, (got, reason)
    try:
        ws.send_close(got)
    except OSError:
        pass                         # it may already have given up on us; the code was read
    ws.read_to_eof()
    ws.close()


# --- the opening handshake -------------------------------------------------------------------

def test_handshake_answers_101_with_the_rfc_example_accept_key(ws_server):
    ws = RawWebSocket(ws_server.url, events_path("hs"), key="dGhlIHNhbXBsZSBub25jZQ==")
    assert ws.status == 101
    assert ws.headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="   # RFC 1.3
    assert ws.headers["upgrade"].lower() == "websocket"
    assert "upgrade" in ws.headers["connection"].lower()
    assert "sec-websocket-extensions" not in ws.headers      # permessage-deflate not offered
    state = ws.recv_json()
    assert state == {"type": "state", "fileId": "hs", "status": {
        "fileId": "hs", "exists": False, "fileSize": 0, "lastModified": None}}
    ws.close()


def test_accept_key_matches_the_rfc_formula_for_random_keys(ws_server):
    key = "x3JJHMbDL1EzLkh9GBhXDw=="
    ws = RawWebSocket(ws_server.url, events_path("hs2"), key=key)
    assert ws.headers["sec-websocket-accept"] == accept_for(key)
    ws.close()


GOOD = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]


def without(name, headers=GOOD):
    return [(n, v) for n, v in headers if n != name]


def replaced(name, value, headers=GOOD):
    return without(name, headers) + [(name, value)]


@pytest.mark.parametrize("headers, version", [
    (without("Sec-WebSocket-Key"), "HTTP/1.1"),
    (replaced("Sec-WebSocket-Key", "c2hvcnQ="), "HTTP/1.1"),          # 5 bytes, not 16
    (replaced("Sec-WebSocket-Key", "not base64 at all!!"), "HTTP/1.1"),
    (GOOD + [("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAA==")], "HTTP/1.1"),   # two keys
    (replaced("Connection", "keep-alive"), "HTTP/1.1"),
    (without("Sec-WebSocket-Version"), "HTTP/1.1"),
    (GOOD, "HTTP/1.0"),
], ids=["no-key", "short-key", "garbage-key", "two-keys", "no-connection-upgrade",
        "no-version", "http-1.0"])
def test_bad_handshake_is_refused_with_json_400(ws_server, headers, version):
    response = _http.request(ws_server.url, "GET", events_path("bad"), headers=headers,
                             version=version)
    assert response.status == 400, response
    assert response.json()["error"]["code"] == "bad_websocket_handshake"
    assert requests.get(ws_server.url + "/healthz", timeout=10).status_code == 200


def test_unsupported_version_is_refused_with_400_naming_version_13(ws_server):
    response = _http.request(ws_server.url, "GET", events_path("bad"),
                             headers=replaced("Sec-WebSocket-Version", "8"))
    assert response.status == 400
    assert response.header("sec-websocket-version") == "13"               # RFC 4.4
    assert response.json()["error"]["code"] == "bad_websocket_handshake"


def test_handshake_for_an_invalid_file_id_is_refused_with_400(ws_server):
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(ws_url(ws_server, "bad.id"), open_timeout=10)
    assert refused.value.response.status_code == 400
    assert json.loads(refused.value.response.body)["error"]["code"] == "invalid_file_id"


# --- messages, fragments, control frames -----------------------------------------------------

def test_library_client_receives_the_state_first(ws_server):
    with ws_connect(ws_url(ws_server, "lib"), open_timeout=10) as ws:
        state = json.loads(ws.recv(timeout=10))
        assert state["type"] == "state" and state["status"]["exists"] is False


def test_fragmented_message_with_a_ping_between_fragments_is_reassembled(ws_server):
    ws = open_raw(ws_server)
    ws.send_frame(OP_TEXT, '{"type":', fin=False)
    ws.send_frame(OP_PING, b"between")                      # control frames may interleave
    ws.send_frame(OP_CONTINUATION, ' "sta', fin=False)
    ws.send_frame(OP_CONTINUATION, 'te"}', fin=True)
    assert ws.recv_frame() == (True, OP_PONG, b"between")
    assert ws.recv_json()["type"] == "state"                # the reassembled request
    ws.send_close(1000)
    assert ws.expect_close()[0] == 1000
    ws.read_to_eof()
    ws.close()


def test_library_fragmented_message_is_reassembled(ws_server):
    with ws_connect(ws_url(ws_server, "frag"), open_timeout=10) as ws:
        ws.recv(timeout=10)
        ws.send(['{"ty', 'pe": "st', 'ate"}'])                # an iterable: one fragment each
        assert json.loads(ws.recv(timeout=10))["type"] == "state"


def test_ping_is_answered_with_a_pong_carrying_its_payload(ws_server):
    with ws_connect(ws_url(ws_server, "ping"), open_timeout=10) as ws:
        ws.recv(timeout=10)
        assert ws.ping(b"payload-123").wait(10)
    raw = open_raw(ws_server, "ping")
    raw.send_frame(OP_PING, b"x" * 125)                     # the largest control payload
    assert raw.recv_frame() == (True, OP_PONG, b"x" * 125)
    raw.close()


def test_unknown_request_gets_an_error_event_and_the_stream_stays_open(ws_server):
    with ws_connect(ws_url(ws_server, "unknown"), open_timeout=10) as ws:
        ws.recv(timeout=10)
        ws.send('{"type": "subscribe-everything"}')
        reply = json.loads(ws.recv(timeout=10))
        assert reply["type"] == "error" and reply["code"] == "unknown_request"
        ws.send('{"type": "state"}')
        assert json.loads(ws.recv(timeout=10))["type"] == "state"


# --- closing ---------------------------------------------------------------------------------

def test_close_handshake_echoes_the_clients_code(ws_server):
    ws = open_raw(ws_server)
    ws.send_close(4001, b"done watching")
    assert ws.expect_close() == (4001, "")
    ws.read_to_eof()                                        # then the server closes TCP
    ws.close()


def test_close_without_a_code_is_answered_with_an_empty_close(ws_server):
    ws = open_raw(ws_server)
    ws.send_close(None)
    assert ws.expect_close() == (None, "")
    ws.read_to_eof()
    ws.close()


def test_library_close_completes_cleanly(ws_server):
    ws = ws_connect(ws_url(ws_server, "bye"), open_timeout=10, close_timeout=10)
    ws.recv(timeout=10)
    ws.close(code=4002, reason="bye")
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 4002


# --- protocol errors: the close code says which rule was broken ------------------------------

def frames_for(case):
    """Frames that break one RFC 6455 rule, and the close code the server must answer."""
    text = b'{"type": "state"}'
    return {
        "unmasked": ([(OP_TEXT, text, {"masked": False})], 1002),
        "reserved-bit": ([(OP_TEXT, text, {"rsv": 4})], 1002),
        "reserved-opcode": ([(0x3, text, {})], 1002),
        "reserved-control-opcode": ([(0xB, b"", {})], 1002),
        "fragmented-ping": ([(OP_PING, b"a", {"fin": False})], 1002),
        "ping-over-125": ([(OP_PING, b"p" * 126, {})], 1002),
        "lone-continuation": ([(OP_CONTINUATION, text, {})], 1002),
        "text-inside-fragmented": ([(OP_TEXT, b"{", {"fin": False}), (OP_TEXT, text, {})],
                                   1002),
        "close-code-999": ([(OP_CLOSE, struct.pack("!H", 999), {})], 1002),
        "close-code-1005": ([(OP_CLOSE, struct.pack("!H", 1005), {})], 1002),
        "close-code-2999": ([(OP_CLOSE, struct.pack("!H", 2999), {})], 1002),
        "close-one-byte": ([(OP_CLOSE, b"\x03", {})], 1002),
        "close-reason-not-utf8": ([(OP_CLOSE, struct.pack("!H", 1000) + b"\xff", {})], 1007),
        "text-not-utf8": ([(OP_TEXT, b"\xff\xfe\xfd", {})], 1007),
        "text-not-utf8-across-fragments": ([(OP_TEXT, b"\xe2\x82", {"fin": False}),
                                            (OP_CONTINUATION, b"x", {})], 1007),
        "binary": ([(OP_BINARY, b"\x00\x01", {})], 1003),
        "frame-over-limit": ([(OP_TEXT, b"x" * (MAX_MESSAGE + 1), {})], 1009),
        "fragments-over-limit": ([(OP_TEXT, b"x" * 600, {"fin": False}),
                                  (OP_CONTINUATION, b"x" * 600, {})], 1009),
        "huge-length-header-only": ([(OP_BINARY, b"", {"length": 1 << 40})], 1009),
    }[case]


PROTOCOL_CASES = ["unmasked", "reserved-bit", "reserved-opcode", "reserved-control-opcode",
                  "fragmented-ping", "ping-over-125", "lone-continuation",
                  "text-inside-fragmented", "close-code-999", "close-code-1005",
                  "close-code-2999", "close-one-byte", "close-reason-not-utf8", "text-not-utf8",
                  "text-not-utf8-across-fragments", "binary", "frame-over-limit",
                  "fragments-over-limit", "huge-length-header-only"]


@pytest.mark.parametrize("case", PROTOCOL_CASES)
def test_protocol_error_closes_with_its_code(ws_server, case):
    frames, code = frames_for(case)
    ws = open_raw(ws_server, "err")
    for opcode, payload, kw in frames:
        ws.send_frame(opcode, payload, **kw)
    assert_closed_with(ws, code)
    assert requests.get(ws_server.url + "/healthz", timeout=10).status_code == 200


def test_message_exactly_at_the_limit_is_accepted(ws_server):
    with ws_connect(ws_url(ws_server, "edge"), open_timeout=10) as ws:
        ws.recv(timeout=10)
        ws.send(" " * (MAX_MESSAGE - len('{"type":"state"}')) + '{"type":"state"}')
        assert json.loads(ws.recv(timeout=10))["type"] == "state"


def test_library_message_over_the_limit_is_refused_with_1009(ws_server):
    with ws_connect(ws_url(ws_server, "big"), open_timeout=10, max_size=None) as ws:
        ws.recv(timeout=10)
        ws.send("x" * (MAX_MESSAGE + 1))
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


# --- keepalive -------------------------------------------------------------------------------

def test_server_pings_and_a_client_that_answers_outlives_the_read_timeout(heartbeat_server):
    """--timeout is 1 s per read; ten pings (about 3 s) later the stream is still served."""
    ws = open_raw(heartbeat_server, "alive")
    for expected in range(1, 11):
        fin, opcode, payload = ws.recv_frame()
        assert opcode == OP_PING, (opcode, payload)
        ws.send_frame(OP_PONG, payload)
    ws.send_frame(OP_TEXT, '{"type": "state"}')
    assert ws.recv_json()["type"] == "state"
    ws.close()


def test_client_that_never_answers_pings_is_closed_with_1011(heartbeat_server):
    ws = open_raw(heartbeat_server, "dead")
    pings = 0
    while True:
        fin, opcode, payload = ws.recv_frame()          # never answered
        if opcode == OP_PING:
            pings += 1
            continue
        assert opcode == OP_CLOSE
        assert struct.unpack("!H", payload[:2])[0] == 1011
        break
    assert pings >= 1
    ws.read_to_eof()
    ws.close()
    wait_until(lambda: requests.get(heartbeat_server.url + "/healthz", timeout=10).ok)


def test_library_client_with_its_own_keepalive_stays_connected(heartbeat_server):
    with ws_connect(ws_url(heartbeat_server, "lib_alive"), open_timeout=10,
                    ping_interval=0.2, ping_timeout=5) as ws:
        ws.recv(timeout=10)
        for _ in range(10):                          # its pings answered, ours answered too
            assert ws.ping().wait(10)
            ws.send('{"type": "state"}')
            assert json.loads(ws.recv(timeout=10))["type"] == "state"


def test_frames_sent_with_the_handshake_are_not_lost(ws_server):
    """A client should wait for the 101 before sending, but one that does not is served."""
    sock = _http.connect(ws_server.url)
    request = _http.build_request("GET", events_path("eager"), headers=GOOD, close=False)
    sock.sendall(request + encode_client_frame(OP_PING, b"early"))
    sock.settimeout(10)
    data = b""
    while b"early" not in data:
        more = sock.recv(65536)
        assert more, data
        data += more
    assert data.startswith(b"HTTP/1.1 101")
    assert b"\x8a\x05early" in data                              # the pong
    sock.close()
