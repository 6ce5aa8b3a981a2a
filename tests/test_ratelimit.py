"""Rate limits (issue 8, auth.RateLimiter) and the older limits, checked again under auth.

The rates are tiny (one request per 100 s) so that refilling never happens during a test,
however slow the machine: the outcome depends on counts only, never on timing. A second
client is a second source address (127.0.0.2, also loopback on Linux).
"""
from __future__ import annotations

import http.client
import json

import pytest
import requests

import _http
from conftest import send_chunk, wait_until

KEY = "rate-key-0123456789"
AUTH = {"Authorization": "Bearer " + KEY}


def get_from(srv, source, path="/healthz", headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10,
                                            source_address=(source, 0))
    try:
        connection.request("GET", path, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), json.loads(answer.read() or b"{}")
    finally:
        connection.close()


def second_address_works():
    try:
        http.client.HTTPConnection("127.0.0.1", 9, source_address=("127.0.0.2", 0),
                                   timeout=1).connect()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return True


def test_a_burst_past_the_request_limit_gets_429_and_another_client_is_unaffected(
        server_factory):
    if not second_address_works():
        pytest.skip("this system cannot send from 127.0.0.2")
    srv = server_factory(args=["--rate-limit", "0.01", "--rate-burst", "3"])
    answers = [get_from(srv, "127.0.0.1") for _ in range(5)]
    assert [a[0] for a in answers] == [200, 200, 200, 429, 429]
    status, headers, body = answers[3]
    assert body["error"]["code"] == "rate_limited"
    assert int(headers["Retry-After"]) >= 1
    for _ in range(3):
        assert get_from(srv, "127.0.0.2")[0] == 200
    assert get_from(srv, "127.0.0.2")[0] == 429


def test_a_client_past_its_byte_allowance_gets_429_before_its_body_is_read(
        server_factory, sample_webm):
    if not second_address_works():
        pytest.skip("this system cannot send from 127.0.0.2")
    srv = server_factory(args=["--rate-limit-bytes", "1", "--rate-burst-bytes", "100K"])
    session = requests.Session()
    chunks = [sample_webm[i * 60000:(i + 1) * 60000] for i in range(3)]
    assert send_chunk(session, srv.url, "rl_bytes", 0, chunks[0]).status_code == 200
    assert send_chunk(session, srv.url, "rl_bytes", 1, chunks[1]).status_code == 200  # debt
    refused = send_chunk(session, srv.url, "rl_bytes", 2, chunks[2])
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    status = session.get(srv.url + "/api/video/status/rl_bytes", timeout=10).json()["data"]
    assert status["nextChunkIndex"] == 2                 # nothing of the refused chunk stored
    assert get_from(srv, "127.0.0.1")[0] == 200          # bodiless requests still pass
    assert get_from(srv, "127.0.0.2")[0] == 200


def test_rate_limit_applies_before_auth_so_key_guessing_is_throttled(server_factory):
    srv = server_factory(args=["--rate-limit", "0.01", "--rate-burst", "2"],
                         env={"M1_API_KEY": KEY})
    wrong = {"Authorization": "Bearer guess"}
    codes = [requests.get(srv.url + "/api/video", headers=wrong, timeout=10).status_code
             for _ in range(3)]
    assert codes == [401, 401, 429]


def test_connection_limit_still_answers_503_under_auth(server_factory):
    # one address holds all three (--max-connections-per-client is half otherwise)
    srv = server_factory(args=["--max-connections", "3", "--max-connections-per-client", "3"],
                         env={"M1_API_KEY": KEY})
    idle = [_http.connect(srv.url) for _ in range(3)]
    try:
        response = _http.request(srv.url, "GET", "/api/video", headers=list(AUTH.items()))
        assert response.status == 503
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: _http.request(srv.url, "GET", "/api/video", headers=list(
        AUTH.items())).status == 200, timeout=15, interval=0.1, message="a free slot")


def test_disk_reserve_still_answers_507_to_a_token_upload(server_factory, sample_webm):
    srv = server_factory(args=["--min-free-disk", "1000000G"], env={"M1_API_KEY": KEY})
    token = requests.post(srv.url + "/api/video/tokens", json={"fileId": "rl_disk"},
                          headers=AUTH, timeout=10).json()["data"]["token"]
    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + token
    answer = send_chunk(session, srv.url, "rl_disk", 0, sample_webm[:4096])
    assert answer.status_code == 507
