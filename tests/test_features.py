"""A start imports only what is enabled (issue 17): tus, processing, events and websocket,
webhooks and auth load when their flag or route is first used (httpapi.Features), and
`--help` still lists every flag (options.py holds what it needs of them).

Which modules a server imported is read from its own log: PYTHONPROFILEIMPORTTIME=1 (what
`python -X importtime` sets) makes CPython write one line per module as it imports it, to
stderr, which the test server's log keeps. The suites of each feature prove it works once
loaded; these prove when it loads.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

import _http
from conftest import ROOT, SERVER_PYTHON, SERVER_PROGRAM, send_chunk, wait_until

sys.path.insert(0, ROOT)
import httpapi  # noqa: E402

FEATURES = ("tus", "processing", "events", "websocket", "webhooks", "auth", "live",
            "s3client", "s3store")
IMPORT_TIME = {"PYTHONPROFILEIMPORTTIME": "1"}
# Standard modules a plain start does without: logging and traceback (serverlog.py: traceback
# only once one is logged); encodings.idna and unicodedata, which http.server's own
# server_bind loads for its socket.getfqdn (a reverse name lookup M1Server.server_bind skips).
NOT_AT_START = ("logging", "traceback", "encodings.idna", "unicodedata")


def imported(text):
    """The modules an importtime log names: the last field of each `import time:` line."""
    return set(line.rsplit("|", 1)[-1].strip() for line in text.splitlines()
               if line.startswith("import time:"))


def features_in(text):
    return sorted(set(FEATURES) & imported(text))


def wait_for_features(srv, expected):
    """The features `srv` has imported, once they are `expected`: the server writes a
    module's importtime line before it answers, but the test reads the log on a thread of
    its own, so the answer can arrive before the line does."""
    wait_until(lambda: features_in(srv.log()) == expected, timeout=10,
               message="features %s loaded" % expected)
    return features_in(srv.log())


@pytest.fixture
def plain(server_factory):
    srv = server_factory(start=False, args=["--processing", "remux"])
    srv.start(extra_env=IMPORT_TIME)
    return srv


def test_a_plain_start_imports_no_feature_module(plain):
    assert "chunkstore" in imported(plain.log())       # the log does list what it imports
    assert features_in(plain.log()) == []
    with requests.Session() as session:                # the seed API needs none of them
        assert send_chunk(session, plain.url, "plain", 0, b"\x1a\x45\xdf\xa3 one").ok
        assert session.get(plain.url + "/healthz", timeout=10).ok
        assert session.get(plain.url + "/uploads/plain.webm", timeout=10).ok
    assert features_in(plain.log()) == []
    assert set(NOT_AT_START) & imported(plain.log()) == set()


def test_help_lists_every_flag_without_importing_a_feature():
    done = subprocess.run([SERVER_PYTHON, SERVER_PROGRAM, "--help"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=dict(os.environ, **IMPORT_TIME),
                          timeout=60)
    assert done.returncode == 0
    for flag in ("--tus-expiry", "--processing", "--max-subscribers", "--webhook-url",
                 "--api-key", "--ws-max-message", "--storage"):
        assert flag in done.stdout.decode()
    assert features_in(done.stderr.decode()) == []


def test_each_feature_loads_when_its_route_is_first_used(plain):
    url = plain.url
    created = requests.post(url + "/files/", timeout=30, headers={
        "Tus-Resumable": "1.0.0", "Upload-Length": "10"})
    assert created.status_code == 201, created.text
    assert wait_for_features(plain, ["tus"]) == ["tus"]
    sock = _http.connect(url)
    try:
        sock.sendall(b"GET /api/video/events/watched HTTP/1.1\r\nHost: x\r\n"
                     b"Accept: text/event-stream\r\n\r\n")
        wait_until(lambda: "events" in imported(plain.log()), message="events loaded")
    finally:
        sock.close()
    assert requests.post(url + "/api/video/tokens", json={}, timeout=30).status_code == 404
    assert requests.get(url + "/api/video/webhooks/deliveries", timeout=30).ok
    assert requests.get(url + "/watch/rec_1", timeout=30).ok
    everything = ["auth", "events", "live", "tus", "webhooks", "websocket"]
    try:
        wait_for_features(plain, everything)
    except AssertionError:
        raise AssertionError("%s\n%s" % (features_in(plain.log()), plain.log()[-3000:]))


def test_processing_loads_with_the_first_completed_upload_and_at_a_start_after_it(plain):
    with requests.Session() as session:
        done = send_chunk(session, plain.url, "done", 0, b"\x1a\x45\xdf\xa3 all",
                          status="completed")
        assert done.json()["data"]["status"] == "completed"
    wait_until(lambda: "processing" in imported(plain.log()), message="processing loaded")
    status = wait_until(lambda: requests.get(plain.url + "/api/video/status/done",
                                             timeout=30).json()["data"].get("processing"),
                        message="the upload's processing state")
    assert status["state"] in ("queued", "running", "done", "failed", "unavailable")
    plain.stop()
    plain.start(extra_env=IMPORT_TIME)                # a job may wait: loaded at start
    assert "processing" in features_in(plain.log().rsplit("serving http", 1)[0])


def test_auth_and_webhooks_load_at_start_when_their_flags_are_set(server_factory):
    srv = server_factory(start=False, args=["--api-key", "k" * 32, "--webhook-url",
                                            "http://127.0.0.1:9/hook", "--webhook-secret",
                                            "s" * 32])
    srv.start(extra_env=IMPORT_TIME)
    assert set(features_in(srv.log())) == {"auth", "webhooks"}


def test_feature_routes_are_the_features_own_rows():
    """FEATURE_ROUTES stands for each feature's routes() until it is loaded: the same
    patterns, the same methods."""
    import auth
    import events
    import live
    import processing
    import tus
    import webhooks

    class Anything:
        def __getattr__(self, name):
            return lambda *args: None

    own = {"auth": auth.routes(Anything(), None, 0, None), "events": events.routes(),
           "tus": tus.routes(Anything()), "processing": processing.routes(Anything()),
           "webhooks": webhooks.routes(), "live": live.routes(None, lambda *args: None)}
    standing = {}
    for pattern, methods in httpapi.FEATURE_ROUTES:
        feature = next(iter(methods.values())).feature
        standing.setdefault(feature, []).append((pattern, sorted(methods)))
    assert standing == {name: [(pattern, sorted(methods)) for pattern, methods in rows]
                        for name, rows in own.items()}
