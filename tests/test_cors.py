"""CORS (cors.py, `--cors-origin`): what a browser on another origin is told, over real HTTP.

A browser sends `Origin` on cross-origin requests (and on same-origin POSTs) and asks first
with a preflight (`OPTIONS` + `Access-Control-Request-Method`) before an upload that has a
progress listener. These tests send exactly those headers with `requests`; test_browser.py
shows the same against a real browser.
"""
from __future__ import annotations

import os
import subprocess

import pytest
import requests

from conftest import SERVER_PROGRAM, SERVER_PYTHON, send_chunk

APP = "http://app.example:3000"
OTHER = "https://other.example"


def preflight(srv, path="/api/video/upload", origin=APP, method="POST", headers=None):
    sent = {"Origin": origin, "Access-Control-Request-Method": method}
    sent.update(headers or {})
    return requests.options(srv.url + path, headers=sent, timeout=10)


def run_cli(*args, env=None):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([SERVER_PYTHON, SERVER_PROGRAM] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=30, env=full_env)


@pytest.fixture
def listed(server_factory):
    return server_factory(args=["--cors-origin", APP + ",https://b.example"])


# --- the default: every origin (no authentication yet) --------------------------------------

def test_default_preflight_allows_any_origin_with_the_route_methods(server):
    response = preflight(server, headers={"Access-Control-Request-Headers": "content-type"})
    assert response.status_code == 204, response.text
    h = response.headers
    assert h["Access-Control-Allow-Origin"] == "*"
    assert "POST" in h["Access-Control-Allow-Methods"].split(", ")
    assert h["Access-Control-Allow-Headers"].lower() == "content-type"
    assert int(h["Access-Control-Max-Age"]) > 0
    assert "Vary" not in h and "Access-Control-Allow-Credentials" not in h


def test_default_answers_carry_allow_origin_and_exposed_headers(server, sample_webm):
    with requests.Session() as session:
        session.headers["Origin"] = OTHER
        ok = send_chunk(session, server.url, "cors_default", 0, sample_webm,
                        status="completed")
        assert ok.status_code == 200
        assert ok.headers["Access-Control-Allow-Origin"] == "*"
        media = session.get(server.url + "/uploads/cors_default.webm",
                            headers={"Range": "bytes=0-9"}, timeout=10)
        assert media.status_code == 206
        exposed = [v.strip() for v in media.headers["Access-Control-Expose-Headers"].split(",")]
        assert {"Content-Range", "Content-Length", "ETag"} <= set(exposed)
        error = session.get(server.url + "/no/such/route", timeout=10)
        assert error.status_code == 404
        assert error.headers["Access-Control-Allow-Origin"] == "*"   # a page can read why


def test_requests_without_origin_get_no_cors_headers(server):
    response = requests.get(server.url + "/healthz", timeout=10)
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    plain = requests.options(server.url + "/api/video/upload", timeout=10)
    assert plain.status_code == 204 and "POST" in plain.headers["Allow"]
    assert "Access-Control-Allow-Origin" not in plain.headers


def test_preflight_echoes_the_headers_a_client_asks_for(server):
    asked = "tus-resumable, upload-offset, authorization"
    response = preflight(server, path="/api/video/status/x", method="GET",
                         headers={"Access-Control-Request-Headers": asked})
    assert response.headers["Access-Control-Allow-Headers"] == asked
    # (a control character never gets this far: httphead.py refuses it, tests/test_edge.py)
    garbage = preflight(server, headers={"Access-Control-Request-Headers": "a b, (c)"})
    allowed = garbage.headers["Access-Control-Allow-Headers"]
    assert "Content-Type" in allowed and "(c)" not in allowed


def test_preflight_from_a_public_page_to_a_private_server_is_allowed(server):
    response = preflight(server, headers={"Access-Control-Request-Private-Network": "true"})
    assert response.headers["Access-Control-Allow-Private-Network"] == "true"


# --- an allow-list ------------------------------------------------------------------------

def test_listed_origin_is_echoed_with_vary(listed):
    response = preflight(listed)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert "Origin" in response.headers["Vary"]
    health = requests.get(listed.url + "/healthz", headers={"Origin": "https://b.example"},
                          timeout=10)
    assert health.headers["Access-Control-Allow-Origin"] == "https://b.example"
    assert health.headers["Vary"] == "Origin"


def test_unlisted_origin_gets_a_bare_preflight_and_403_on_requests(listed, sample_webm):
    response = preflight(listed, origin=OTHER)
    assert response.status_code == 204
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    with requests.Session() as session:
        session.headers["Origin"] = OTHER
        refused = send_chunk(session, listed.url, "cors_refused", 0, sample_webm)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in refused.headers
    # nothing was stored
    status = requests.get(listed.url + "/api/video/status/cors_refused", timeout=10).json()
    assert status["data"]["exists"] is False


def test_allow_list_never_blocks_the_servers_own_pages_or_non_browsers(listed, sample_webm):
    with requests.Session() as session:
        session.headers["Origin"] = listed.url          # the demo page at GET / posts like this
        own = send_chunk(session, listed.url, "cors_own", 0, sample_webm)
        assert own.status_code == 200, own.text
    with requests.Session() as session:                  # curl, servers: no Origin at all
        plain = send_chunk(session, listed.url, "cors_plain", 0, sample_webm)
        assert plain.status_code == 200, plain.text


def test_null_origin_needs_to_be_listed(server_factory):
    listed = server_factory(args=["--cors-origin", APP])
    refused = requests.get(listed.url + "/healthz", headers={"Origin": "null"}, timeout=10)
    assert refused.status_code == 403
    allowed = server_factory(args=["--cors-origin", "null"])
    ok = requests.get(allowed.url + "/healthz", headers={"Origin": "null"}, timeout=10)
    assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == "null"


def test_env_twin_sets_the_allow_list(server_factory):
    srv = server_factory(env={"M1_CORS_ORIGIN": APP})
    assert preflight(srv).headers["Access-Control-Allow-Origin"] == APP
    assert "Access-Control-Allow-Origin" not in preflight(srv, origin=OTHER).headers


@pytest.mark.parametrize("value", ["http://app.example:3000/", "app.example", "http://a/b",
                                   "*,http://a.example", ","])
def test_malformed_allow_list_is_refused_at_start(value):
    result = run_cli("--cors-origin", value, "--port", "0")
    text = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 2, text
    assert "--cors-origin" in text and "Traceback" not in text


def test_help_documents_the_flag():
    text = run_cli("--help").stdout.decode("utf-8", "replace")
    assert "--cors-origin" in text and "M1_CORS_ORIGIN" in text
