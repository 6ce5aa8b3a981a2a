"""Authentication and authorization (issue 8, SPEC section 6, auth.py).

The matrix: every route x every kind of credential answers exactly as auth.py's docstring
says, and no refused request changes anything on disk. Then tokens in query parameters for
playback, WebSocket (the `websockets` package) and SSE, never shown in the access log; the
token CLI; CORS under auth; security headers.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from conftest import (ROOT, SAMPLE_WEBM, ServerProcess, read_bytes, send_chunk, stopping,
                      wait_until)

sys.path.insert(0, ROOT)
import auth  # noqa: E402  (the server's own module, to mint expired tokens)

KEY = "test-key-0123456789"
SECRET = "test-secret-abcdef"
MINE, OTHER = "rec_mine", "rec_other"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One server with auth on, two uploads and a token of every kind. The server is stopped
    whatever fails once it started (a failed setup used to leave it running)."""
    srv = ServerProcess(tmp_path_factory.mktemp("auth"),
                        args=["--webhook-url", "http://127.0.0.1:9/hook"],
                        env={"M1_API_KEY": KEY, "M1_SECRET": SECRET,
                             "M1_WEBHOOK_SECRET": "whsec"})
    with stopping(srv), requests.Session() as session:
        srv.start()
        session.headers["Authorization"] = "Bearer " + KEY
        data = read_bytes(SAMPLE_WEBM)
        chunk0, chunk5 = data[:40000], data[40000:50000]
        for file_id in (MINE, OTHER):
            assert send_chunk(session, srv.url, file_id, 0, chunk0).status_code == 200
        signer = auth.Signer(SECRET)
        both = ["upload", "read"]
        tokens = {
            "none": None,
            "wrong_key": "not-the-key",
            "key": KEY,
            "this": mint(srv.url, fileId=MINE, rights=both),
            "other": mint(srv.url, fileId=OTHER, rights=both),
            "expired": signer.mint(both, 3600, MINE, now=time.time() - 7200)[0],
            "tampered": tamper(mint(srv.url, fileId=MINE, rights=both)),
            "read_only": mint(srv.url, fileId=MINE, rights=["read"]),
            "upload_only": mint(srv.url, fileId=MINE, rights=["upload"]),
            "budget": mint(srv.url, fileId=MINE, rights=both, maxBytes=len(chunk0)),
        }
        yield {"server": srv, "tokens": tokens, "chunk5": chunk5, "chunk0": chunk0}


def mint(url, **body):
    answer = requests.post(url + "/api/video/tokens", json=body,
                           headers={"Authorization": "Bearer " + KEY}, timeout=10)
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert set(data) >= {"token", "expiresAt"} and data.get("fileId") == body.get("fileId")
    return data["token"]


def tamper(token):
    """Change one byte of the payload: {"fid":"rec_mine"...} now names another upload."""
    version, payload, signature = token.split(".")
    raw = auth.unb64url(payload).replace(MINE.encode(), OTHER.encode())
    return ".".join((version, auth.b64url(raw), signature))


def metadata(**values):
    return ",".join("%s %s" % (k, base64.b64encode(v.encode()).decode())
                    for k, v in values.items())


# Each route: (name, method, path, extra headers, body, rule, status when allowed)
ROUTES = [
    ("upload", "POST", "/api/video/upload", None, "chunk5", "upload", 200),
    ("status", "GET", "/api/video/status/" + MINE, None, None, "read", 200),
    ("media", "GET", "/uploads/%s.webm" % MINE, None, None, "read", 200),
    ("derived", "GET", "/uploads/derived/%s/poster.jpg" % MINE, None, None, "read", 404),
    ("events", "GET", "/api/video/events/" + MINE, None, None, "read", 200),
    ("list", "GET", "/api/video", None, None, "key", 200),
    ("delete", "DELETE", "/api/video/rec_absent", None, None, "key", 404),
    ("healthz", "GET", "/healthz", None, None, "public", 200),
    ("demo", "GET", "/", None, None, "public", 200),
    ("m1client", "GET", "/m1client.js", None, None, "public", 200),
    ("readyz", "GET", "/readyz", None, None, "key", 200),
    ("metrics", "GET", "/metrics", None, None, "key", 200),
    ("webhooks", "GET", "/api/video/webhooks/deliveries", None, None, "key", 200),
    ("webhook_retry", "POST", "/api/video/webhooks/deliveries/999/retry", None, None, "key",
     404),
    ("tokens", "POST", "/api/video/tokens", {"Content-Type": "application/json"},
     json.dumps({"fileId": MINE}).encode(), "key", 200),
    ("tus_create", "POST", "/files/", {"Tus-Resumable": "1.0.0", "Upload-Length": "100",
                                       "Upload-Metadata": metadata(fileId=MINE)},
     None, "upload", 409),
    ("tus_head", "HEAD", "/files/" + MINE, {"Tus-Resumable": "1.0.0"}, None, "upload", 404),
    ("tus_patch", "PATCH", "/files/" + MINE,
     {"Tus-Resumable": "1.0.0", "Upload-Offset": "40000",
      "Content-Type": "application/offset+octet-stream"}, b"x" * 10, "upload-budget", 404),
    ("tus_delete", "DELETE", "/files/" + MINE, {"Tus-Resumable": "1.0.0"}, None, "key", 404),
]
CREDENTIALS = ["none", "wrong_key", "key", "this", "other", "expired", "tampered",
               "read_only", "upload_only", "budget"]


def expected(rule, allowed, credential, route):
    """(status, error code or None) the matrix cell must answer."""
    if rule == "public" or credential == "key":
        return allowed, None
    fixed = {"none": (401, "missing_credentials"), "wrong_key": (401, "invalid_api_key"),
             "expired": (401, "token_expired"), "tampered": (401, "token_signature_invalid")}
    if credential in fixed:
        return fixed[credential]
    if rule == "key":
        return 403, "key_required"
    if credential == "other":
        return 403, "token_wrong_file"
    if rule == "read":
        return (403, "token_right_missing") if credential == "upload_only" else (allowed, None)
    if credential == "read_only":
        return 403, "token_right_missing"
    if credential == "budget" and route in ("upload", "tus_patch"):
        return 403, "token_budget_spent"
    return allowed, None


def snapshot(directory):
    """Every file under the upload folder with its size (SQLite's shared-memory index aside:
    readers map it)."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name.endswith("-shm"):
                continue
            path = os.path.join(root, name)
            try:
                found[os.path.relpath(path, directory)] = os.path.getsize(path)
            except FileNotFoundError:
                pass
    return found


def call(env, route, credential):
    name, method, path, headers, body, _, _ = route
    srv = env["server"]
    headers = dict(headers or {})
    token = env["tokens"][credential]
    if token is not None:
        headers["Authorization"] = "Bearer " + token
    if body == "chunk5":
        # chunk 5 (early: stashed) is stored once, then answered as a duplicate; the spent
        # budget tries a chunk not yet held (a retry of a held one passes, see below)
        index = "6" if credential == "budget" else "5"
        fields = {"fileId": MINE, "chunkIndex": index, "status": "uploading"}
        return requests.post(srv.url + path, data=fields, headers=headers, timeout=30,
                             files={"file": ("blob", env["chunk5"], "video/webm")})
    with requests.request(method, srv.url + path, headers=headers, data=body, timeout=30,
                          stream=True) as answer:
        if name != "events" or answer.status_code != 200:
            answer.content                 # an open event stream is left unread
        return answer


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("route", ROUTES, ids=[r[0] for r in ROUTES])
def test_route_answers_each_credential_as_specified_and_refusals_change_nothing(
        env, route, credential):
    status, code = expected(route[5].replace("-budget", ""), route[6], credential, route[0])
    before = snapshot(env["server"].upload_dir)
    answer = call(env, route, credential)
    assert answer.status_code == status, (answer.status_code, answer.text[:300])
    if code is not None:
        if route[1] != "HEAD":                     # a HEAD answer has no body to read
            assert answer.json()["error"]["code"] == code
        assert snapshot(env["server"].upload_dir) == before
    if status == 401:
        assert answer.headers["WWW-Authenticate"].startswith('Bearer realm="m1server"')
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["Referrer-Policy"] == "no-referrer"


def test_tokens_in_query_parameters_play_stream_and_never_reach_the_log(env):
    srv, token = env["server"], env["tokens"]["this"]
    # playback: what <video src="/uploads/x.webm?token=..."> asks, a Range request
    media = requests.get("%s/uploads/%s.webm?token=%s" % (srv.url, MINE, token),
                         headers={"Range": "bytes=0-99"}, timeout=10)
    assert media.status_code == 206 and media.content == env["chunk0"][:100]
    assert media.headers["Content-Type"] == "video/webm"
    # SSE (EventSource cannot set headers)
    with requests.get("%s/api/video/events/%s?token=%s" % (srv.url, MINE, token),
                      stream=True, timeout=10) as sse:
        assert sse.status_code == 200
        assert sse.headers["Content-Type"].startswith("text/event-stream")
        first = b""
        while True:
            line = sse.raw.readline()
            assert line, "stream ended before its first event"
            first += line
            if line.startswith(b"data:"):
                break
        assert b'"fileId":"%s"' % MINE.encode() in first.replace(b" ", b"")
    # WebSocket
    ws_url = srv.url.replace("http://", "ws://") + "/api/video/events/%s?token=%s" % (
        MINE, token)
    with ws_connect(ws_url, open_timeout=10) as ws:
        state = json.loads(ws.recv(timeout=10))
        assert state["fileId"] == MINE
    # a token for another upload is refused at the handshake
    other = srv.url.replace("http://", "ws://") + "/api/video/events/%s?token=%s" % (
        MINE, env["tokens"]["other"])
    with pytest.raises(Exception) as refused:
        ws_connect(other, open_timeout=10)
    assert "403" in str(refused.value)
    wait_until(lambda: srv.log().count("token=REDACTED") >= 4, message="access log lines")
    for credential in ("this", "other"):
        assert env["tokens"][credential] not in srv.log()
        assert env["tokens"][credential].split(".")[2] not in srv.log()


def test_key_is_not_accepted_in_the_query_string(env):
    srv = env["server"]
    answer = requests.get("%s/api/video?token=%s" % (srv.url, KEY), timeout=10)
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "malformed_token"


def test_token_for_a_prefix_covers_matching_ids_only_and_tus_needs_a_named_id(env):
    srv = env["server"]
    token = mint(srv.url, fileIdPrefix="cam7_", rights=["upload", "read"], maxBytes=1 << 20)
    bearer = {"Authorization": "Bearer " + token}
    session = requests.Session()
    session.headers.update(bearer)
    assert send_chunk(session, srv.url, "cam7_a", 0, env["chunk0"]).status_code == 200
    refused = send_chunk(session, srv.url, "cam8_a", 0, env["chunk0"])
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "token_wrong_file"
    tus = {"Tus-Resumable": "1.0.0", "Upload-Length": "1000"}
    tus.update(bearer)
    unnamed = requests.post(srv.url + "/files/", headers=tus, timeout=10)
    assert unnamed.status_code == 403 and unnamed.json()["error"]["code"] == "token_wrong_file"
    named = requests.post(srv.url + "/files/", timeout=10, headers=dict(
        tus, **{"Upload-Metadata": metadata(fileId="cam7_tus", filetype="video/webm")}))
    assert named.status_code == 201, named.text
    over = requests.post(srv.url + "/files/", timeout=10, headers=dict(
        tus, **{"Upload-Length": str(2 << 20),
                "Upload-Metadata": metadata(fileId="cam7_big")}))
    assert over.status_code == 403 and over.json()["error"]["code"] == "token_budget_spent"
    concat = requests.post(srv.url + "/files/", timeout=10,
                           headers=dict(tus, **{"Upload-Concat": "partial"}))
    assert concat.status_code == 403


def test_a_retried_chunk_already_stored_passes_a_spent_budget(env):
    srv = env["server"]
    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + env["tokens"]["budget"]
    again = send_chunk(session, srv.url, MINE, 0, env["chunk0"])
    assert again.status_code == 200 and again.json()["data"].get("duplicate") is True


def test_token_cli_mints_what_the_server_accepts(env):
    srv = env["server"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "m1server.py"), "token",
                          "--file-id", MINE, "--rights", "read", "--expires-in", "10m"],
                         env=dict(os.environ, M1_API_KEY=KEY, M1_SECRET=SECRET),
                         stdout=subprocess.PIPE, check=True, timeout=30).stdout
    data = json.loads(out)["data"]
    assert data["fileId"] == MINE and data["rights"] == ["read"]
    answer = requests.get(srv.url + "/api/video/status/" + MINE, timeout=10,
                          headers={"Authorization": "Bearer " + data["token"]})
    assert answer.status_code == 200


def test_token_request_is_validated(env):
    srv = env["server"]
    key = {"Authorization": "Bearer " + KEY}
    for body, code in ((b"{", "invalid_json"), (b'{"rights":["read"]}', "invalid_token_request"),
                       (b'{"fileId":"a/b"}', "invalid_file_id"),
                       (b'{"fileId":"a","rights":["admin"]}', "invalid_rights"),
                       (b'{"fileId":"a","expiresIn":0}', "invalid_expires_in"),
                       (b'{"fileId":"a","expiresIn":%d}' % (auth.MAX_EXPIRES_IN_S + 1),
                        "invalid_expires_in"),
                       (b'{"fileId":"a","maxBytes":-1}', "invalid_max_bytes")):
        answer = requests.post(srv.url + "/api/video/tokens", data=body, headers=key,
                               timeout=10)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == code
    longest = requests.post(srv.url + "/api/video/tokens", headers=key, timeout=10,
                            json={"fileId": "a", "expiresIn": auth.MAX_EXPIRES_IN_S})
    assert longest.status_code == 200
    too_big = requests.post(srv.url + "/api/video/tokens", headers=key, timeout=10,
                            data=b" " * (auth.MAX_TOKEN_REQUEST_BYTES + 1))
    assert too_big.status_code == 413


def test_cors_star_is_dropped_under_auth_unless_allowed(server_factory):
    origin = {"Origin": "https://elsewhere.example"}
    guarded = server_factory(env={"M1_API_KEY": KEY})
    answer = requests.get(guarded.url + "/healthz", headers=origin, timeout=10)
    assert answer.status_code == 403 and "Access-Control-Allow-Origin" not in answer.headers
    own = requests.get(guarded.url + "/healthz", timeout=10,
                       headers={"Origin": guarded.url})
    assert own.status_code == 200
    allowed = server_factory(args=["--cors-allow-any-with-auth"], env={"M1_API_KEY": KEY})
    answer = requests.get(allowed.url + "/healthz", headers=origin, timeout=10)
    assert answer.headers["Access-Control-Allow-Origin"] == "*"


def test_auth_off_by_default_answers_as_before(server_factory):
    srv = server_factory()
    answer = requests.get(srv.url + "/api/video", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    minted = requests.post(srv.url + "/api/video/tokens", json={"fileId": "a"}, timeout=10)
    assert minted.status_code == 404


def test_api_key_from_a_file(server_factory, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    srv = server_factory(args=["--api-key-file", str(key_file)])
    assert requests.get(srv.url + "/api/video", timeout=10).status_code == 401
    assert requests.get(srv.url + "/api/video", timeout=10, headers={
        "Authorization": "Bearer " + KEY}).status_code == 200
    assert KEY not in srv.log()


def test_cli_uploader_sends_its_token_and_a_token_for_another_upload_fails(env, tmp_path):
    srv = env["server"]
    path = tmp_path / "clip.webm"
    data = read_bytes(SAMPLE_WEBM)
    path.write_bytes(data)
    token = mint(srv.url, fileId="cli_auth", rights=["upload", "read"])
    clean = {k: v for k, v in os.environ.items() if not k.startswith("M1_")}

    def upload(file_id, credential):
        return subprocess.run([sys.executable, os.path.join(ROOT, "m1server.py"), "upload",
                               str(path), "--server", srv.url, "--file-id", file_id,
                               "--chunk-size", "64K", "--retries", "1", "--quiet"],
                              env=dict(clean, M1_TOKEN=credential), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=120, universal_newlines=True)
    done = upload("cli_auth", token)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fileId"] == "cli_auth"
    status = requests.get(srv.url + "/api/video/status/cli_auth?token=" + token,
                          timeout=10).json()["data"]
    assert status["state"] == "completed" and status["fileSize"] == len(data)
    refused = upload("cli_auth_other", token)
    assert refused.returncode == 1 and "403" in refused.stderr


def test_public_address_warns_loudly_without_auth_and_about_clear_text_with_it(
        server_factory):
    bare = server_factory(args=["--host", "0.0.0.0"])
    assert "WARNING: listening on 0.0.0.0 with no authentication" in bare.log()
    keyed = server_factory(args=["--host", "0.0.0.0"], env={"M1_API_KEY": KEY})
    assert "with no authentication" not in keyed.log()
    assert "WARNING: listening on 0.0.0.0 without TLS" in keyed.log()
    assert KEY not in keyed.log()


def test_byte_budget_counts_early_chunks_waiting_for_their_turn(env):
    srv = env["server"]
    chunk = env["chunk5"]                             # 10000 bytes
    token = mint(srv.url, fileId="budget_gap", rights=["upload"], maxBytes=2 * len(chunk))
    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + token
    for index in (3, 4):                              # early: stashed, not yet appended
        assert send_chunk(session, srv.url, "budget_gap", index, chunk).status_code == 200
    third = send_chunk(session, srv.url, "budget_gap", 5, chunk)
    assert third.status_code == 403 and third.json()["error"]["code"] == "token_budget_spent"
    again = send_chunk(session, srv.url, "budget_gap", 4, chunk)     # a retry: no new bytes
    assert again.status_code == 200


def test_an_event_stream_ends_when_its_token_expires_and_a_key_stream_does_not(env):
    """A token is checked when a stream opens; the stream must not outlive it."""
    srv = env["server"]
    file_id = "rec_expiring"
    token = mint(srv.url, fileId=file_id, rights=["read"], expiresIn=2)
    expires = json.loads(auth.unb64url(token.split(".")[1]))["exp"]
    base = srv.url.replace("http://", "ws://") + "/api/video/events/" + file_id
    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + KEY
    with ws_connect(base + "?token=" + token, open_timeout=10) as by_token, \
            ws_connect(base, open_timeout=10,
                       additional_headers={"Authorization": "Bearer " + KEY}) as by_key, \
            requests.get("%s/api/video/events/%s?token=%s" % (srv.url, file_id, token),
                         stream=True, timeout=10) as sse:
        assert json.loads(by_token.recv(timeout=10))["type"] == "state"
        assert json.loads(by_key.recv(timeout=10))["type"] == "state"
        assert sse.status_code == 200
        if time.time() < expires - 0.5:      # an event before the expiry still arrives first
            assert send_chunk(session, srv.url, file_id, 0, env["chunk0"]).status_code == 200
            assert json.loads(by_token.recv(timeout=10))["type"] == "chunk"
        seen = []
        while True:                          # then token_expired, then close 1008
            try:
                seen.append(json.loads(by_token.recv(timeout=10))["type"])
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1008
                break
        assert seen[-1] == "token_expired" and time.time() >= expires - 1
        sse_types = []
        for line in sse.iter_lines():        # ends: the server closed the stream
            if line.startswith(b"data:"):
                sse_types.append(json.loads(line[5:])["type"])
        assert sse_types[0] == "state" and sse_types[-1] == "token_expired"
        by_key.send(json.dumps({"type": "state"}))      # the key's stream goes on
        while json.loads(by_key.recv(timeout=10))["type"] != "state":
            pass                             # the chunk event comes first, when one was sent
    refused = requests.get("%s/api/video/events/%s?token=%s" % (srv.url, file_id, token),
                           timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "token_expired"
