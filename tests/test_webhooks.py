"""Webhooks (issue 10, SPEC §6): signed, retried, at-least-once notifications.

Each test runs the real server and a webhook receiver written here: a stdlib
ThreadingHTTPServer on 127.0.0.1 in a thread of the test process, answering from a script of
statuses and recording every request with its arrival time. Backoff is scaled down with the
test-only M1_TEST_WEBHOOK_TIME_SCALE (first retry 50 ms instead of 1 s), never waited for with
sleeps: every wait polls the deliveries listing or the receiver with a deadline.

The signature is checked with the documentation's own Python function (taken out of
docs/webhooks.md and run), and with its JavaScript one under Node when Node is installed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from conftest import (ROOT, SERVER_PROGRAM, SERVER_PYTHON, need, send_chunk, sqlite_files,
                      wait_until)

sys.path.insert(0, ROOT)
import options  # noqa: E402
import webhooks  # noqa: E402

SECRET = "test-secret-0123456789"
TIME_SCALE = 0.05
EBML = b"\x1a\x45\xdf\xa3"
# Processing off: these tests count deliveries, and a processed upload adds video.ready/failed
# (test_processing_results_are_sent_as_video_ready covers those).
ENV = {"M1_WEBHOOK_SECRET": SECRET, "M1_TEST_WEBHOOK_TIME_SCALE": str(TIME_SCALE),
       "M1_PROCESSING": "off"}
WAIT_S = 20.0


# ---------------------------------------------------------------------------------------------
# The receivers
# ---------------------------------------------------------------------------------------------

class Receiver:
    """A webhook endpoint: answers the n-th POST with script[n] (then `then`), records each
    request as (monotonic arrival time, path, headers, body). 3xx answers carry a Location."""

    def __init__(self, script=(), then=200, port=0):
        self.script = list(script)
        self.then = then
        self.requests = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                arrived = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.requests.append((arrived, self.path, dict(self.headers), body))
                    status = receiver.script.pop(0) if receiver.script else receiver.then
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/moved")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d/hook" % self.httpd.server_address[1]

    def received(self):
        with self._lock:
            return list(self.requests)

    def events(self):
        return [json.loads(body.decode("utf-8")) for _, _, _, body in self.received()]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class HangingReceiver:
    """Accepts connections and never answers (nor reads)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d/hang" % self.sock.getsockname()[1]

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def receivers():
    made = []

    def make(*args, **kw):
        kind = kw.pop("kind", Receiver)
        receiver = kind(*args, **kw)
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.close()


def free_port():
    """A port nobody listens on (a receiver that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The verification code of docs/webhooks.md, run as written there
# ---------------------------------------------------------------------------------------------

def readme_block(language):
    with open(os.path.join(ROOT, "docs", "webhooks.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Verifying the signature"):]
    return re.search(r"```%s\n(.*?)```" % language, section, re.S).group(1)


def readme_verify():
    namespace = {}
    exec(readme_block("python"), namespace)
    return namespace["verify"]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def start(server_factory, urls, *args, env=None):
    flags = []
    for url in urls:
        flags += ["--webhook-url", url]
    return server_factory(args=flags + list(args), env=dict(ENV, **(env or {})))


def upload(session, srv, file_id, chunks=2, finish=True):
    """A small WebM-signed upload in `chunks` chunks, the last one `completed` (unless not
    `finish`); returns the last reply's data."""
    data = None
    for index in range(chunks):
        body = (EBML if index == 0 else b"") + os.urandom(200)
        last = finish and index == chunks - 1
        response = send_chunk(session, srv.url, file_id, index, body,
                              status="completed" if last else "uploading")
        assert response.status_code == 200, response.text
        data = response.json()["data"]
    return data


def listing(session, srv, **params):
    response = session.get(srv.url + "/api/video/webhooks/deliveries", params=params,
                           timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def wait_deliveries(session, srv, predicate, message, timeout=WAIT_S):
    """Poll the listing until predicate(deliveries) holds; returns the deliveries."""
    def check():
        deliveries = listing(session, srv, limit=500)["deliveries"]
        return deliveries if predicate(deliveries) else None
    return wait_until(check, timeout=timeout, interval=0.05, message=message)


def of_type(deliveries, event_type):
    return [d for d in deliveries if d["type"] == event_type]


def run_cli(args, env=None):
    full = dict(os.environ)
    full.pop("M1_WEBHOOK_SECRET", None)
    full.update(env or {})
    return subprocess.run([SERVER_PYTHON, SERVER_PROGRAM, "--port", "0"] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30,
                          env=full)


# ---------------------------------------------------------------------------------------------
# Signed, once
# ---------------------------------------------------------------------------------------------

def test_completed_upload_is_notified_once_with_a_signature_that_verifies(
        server_factory, receivers, session):
    receiver = receivers()
    srv = start(server_factory, [receiver.url])
    file_id = "wh_once"
    upload(session, srv, file_id, chunks=2, finish=False)
    last = b"the last chunk"
    replies = []

    def send_last():
        with requests.Session() as s:
            replies.append(send_chunk(s, srv.url, file_id, 2, last, status="completed"))

    senders = [threading.Thread(target=send_last) for _ in range(3)]   # it arrives 3 times
    for t in senders:
        t.start()
    for t in senders:
        t.join(30)
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert sorted(bool(r.json()["data"].get("duplicate")) for r in replies) == \
        [False, True, True]

    deliveries = wait_deliveries(session, srv, lambda ds: any(
        d["state"] == "delivered" for d in ds), "the upload.completed delivery")
    assert len(deliveries) == 1, deliveries          # queued once, nothing else pending
    delivery = deliveries[0]
    assert (delivery["type"], delivery["fileId"], delivery["attempts"]) == \
        ("upload.completed", file_id, 1)
    (_, path, headers, body), = receiver.received()
    assert path == "/hook"
    event = json.loads(body.decode("utf-8"))
    assert list(event) == ["id", "type", "createdAt", "data"]
    assert event["id"] == delivery["eventId"] == headers["M1-Event-Id"]
    assert event["type"] == "upload.completed"
    status = session.get(srv.url + "/api/video/status/" + file_id).json()["data"]
    assert event["data"] == {"fileId": file_id, "size": status["fileSize"],
                             "sha256": status["sha256"], "mimeType": "video/webm",
                             "url": "/uploads/%s.webm" % file_id,
                             "completedAt": status["completedAt"]}
    assert headers["Content-Type"] == "application/json"

    verify = readme_verify()
    header = headers["M1-Signature"]
    assert re.match(r"t=\d+,v1=[0-9a-f]{64}\Z", header), header
    assert verify(SECRET.encode(), body, header)
    tampered = body.replace(b'"size":', b'"size":1')
    assert not verify(SECRET.encode(), tampered, header)
    assert not verify(b"another secret", body, header)
    old = webhooks.signature(SECRET.encode(), body, time.time() - 600)     # a replay
    assert not verify(SECRET.encode(), body, old)


def test_processing_results_are_sent_as_video_ready(server_factory, receivers, session,
                                                    sample_webm):
    need(shutil.which("ffmpeg") and shutil.which("ffprobe"), "ffmpeg is not installed")
    receiver = receivers()
    srv = start(server_factory, [receiver.url], env={"M1_PROCESSING": "remux"})
    reply = send_chunk(session, srv.url, "wh_ready", 0, sample_webm, status="completed")
    assert reply.status_code == 200, reply.text
    deliveries = wait_deliveries(session, srv, lambda ds: len(
        [d for d in ds if d["state"] == "delivered"]) == 2, "upload.completed and video.ready")
    assert sorted(d["type"] for d in deliveries) == ["upload.completed", "video.ready"]
    ready = [json.loads(body.decode("utf-8")) for _, _, _, body in receiver.received()
             if json.loads(body.decode("utf-8"))["type"] == "video.ready"][0]
    assert ready["data"]["derivatives"]["remux"] == "/uploads/derived/wh_ready/remux.webm"
    assert ready["data"]["video"]["videoCodec"] == "vp9"


def test_readme_javascript_verifies_the_same_signature(tmp_path):
    need(shutil.which("node"), "node is not installed (the JavaScript check of docs/webhooks.md)")
    body = json.dumps({"id": "evt_x", "type": "upload.completed", "createdAt": "now",
                       "data": {"fileId": "f"}}).encode()
    script = tmp_path / "verify.js"
    script.write_text(readme_block("js") + "\nconst [secret, header, body64] = "
                      "process.argv.slice(2);\nconsole.log(verify(secret, "
                      "Buffer.from(body64, 'base64'), header));\n", encoding="utf-8")

    def node(body_bytes, header, secret=SECRET):
        import base64
        out = subprocess.run(["node", str(script), secret, header,
                              base64.b64encode(body_bytes).decode()], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=30)
        return out.stdout.decode().strip()

    fresh = webhooks.signature(SECRET.encode(), body, time.time())
    assert node(body, fresh) == "true"
    assert node(body + b" ", fresh) == "false"
    assert node(body, fresh, secret="another secret") == "false"
    assert node(body, webhooks.signature(SECRET.encode(), body, time.time() - 600)) == "false"


# ---------------------------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------------------------

def test_503_twice_then_200_is_three_attempts_with_backoff_between(server_factory, receivers,
                                                                   session):
    receiver = receivers(script=[503, 503])
    srv = start(server_factory, [receiver.url])
    upload(session, srv, "wh_backoff")
    deliveries = wait_deliveries(session, srv, lambda ds: ds and ds[0]["state"] == "delivered",
                                 "delivery after two 503s")
    assert len(deliveries) == 1
    assert deliveries[0]["attempts"] == 3
    assert deliveries[0]["lastStatus"] == 200
    arrivals = [t for t, _, _, _ in receiver.received()]
    assert len(arrivals) == 3
    ids = set(json.loads(body)["id"] for _, _, _, body in receiver.received())
    assert len(ids) == 1                               # the same event every time
    attempts = [h["M1-Delivery-Attempt"] for _, _, h, _ in receiver.received()]
    assert attempts == ["1", "2", "3"]
    for n, (before, after) in enumerate(zip(arrivals, arrivals[1:]), start=1):
        shortest = webhooks.FIRST_RETRY_S * TIME_SCALE * 2 ** (n - 1) * \
            (1 - webhooks.JITTER_FRACTION)
        assert after - before >= shortest, (n, after - before, shortest)


def test_408_429_and_5xx_are_retried(server_factory, receivers, session):
    receiver = receivers(script=[408, 429, 500, 502])
    srv = start(server_factory, [receiver.url])
    upload(session, srv, "wh_retried")
    deliveries = wait_deliveries(session, srv, lambda ds: ds and ds[0]["state"] == "delivered",
                                 "delivery after four retryable answers")
    assert deliveries[0]["attempts"] == 5
    assert len(receiver.received()) == 5


@pytest.mark.parametrize("status", [400, 404, 410])
def test_other_4xx_fails_at_once_without_retry(server_factory, receivers, session, status):
    receiver = receivers(then=status)
    srv = start(server_factory, [receiver.url])
    upload(session, srv, "wh_4xx")
    deliveries = wait_deliveries(session, srv, lambda ds: ds and ds[0]["state"] == "failed",
                                 "the failed delivery")
    assert deliveries[0]["attempts"] == 1
    assert deliveries[0]["lastStatus"] == status
    assert deliveries[0]["lastError"].startswith("HTTP %d" % status)
    assert deliveries[0]["nextAttemptAt"] is None
    assert len(receiver.received()) == 1


def test_redirect_is_not_followed_and_recorded_as_a_failure(server_factory, receivers, session):
    receiver = receivers(then=302)
    srv = start(server_factory, [receiver.url])
    upload(session, srv, "wh_redirect")
    deliveries = wait_deliveries(session, srv, lambda ds: ds and ds[0]["state"] == "failed",
                                 "the redirected delivery")
    assert deliveries[0]["lastStatus"] == 302
    assert "redirect not followed" in deliveries[0]["lastError"]
    assert "/moved" in deliveries[0]["lastError"]
    assert [path for _, path, _, _ in receiver.received()] == ["/hook"]   # never /moved


@pytest.mark.parametrize("retry_for, attempts", [("0", 1), ("0.5", None)])
def test_a_failing_delivery_is_given_up_after_retry_for(server_factory, session, retry_for,
                                                        attempts):
    srv = start(server_factory, ["http://127.0.0.1:%d/down" % free_port()],
                "--webhook-retry-for", retry_for)
    upload(session, srv, "wh_give_up")
    deliveries = wait_deliveries(session, srv, lambda ds: ds and ds[0]["state"] == "failed",
                                 "the delivery given up")
    made = deliveries[0]["attempts"]
    assert made == attempts if attempts else made >= 2
    assert deliveries[0]["lastError"].startswith("gave up after %d attempts" % made)
    assert deliveries[0]["lastStatus"] is None


# ---------------------------------------------------------------------------------------------
# Durable: restarts
# ---------------------------------------------------------------------------------------------

def test_a_receiver_down_across_a_restart_gets_the_event_after_it(server_factory, receivers,
                                                                  session):
    port = free_port()
    srv = start(server_factory, ["http://127.0.0.1:%d/hook" % port])
    upload(session, srv, "wh_restart")
    pending = wait_deliveries(session, srv, lambda ds: ds and ds[0]["attempts"] >= 2,
                              "two refused attempts")[0]
    assert pending["state"] == "pending" and pending["lastError"], pending
    srv.kill()                                   # kill -9 while the delivery is pending
    receiver = receivers(port=port)
    srv.start(port=srv.port)
    session.close()
    delivered = wait_deliveries(session, srv, lambda ds: ds[0]["state"] == "delivered",
                                "the delivery after the restart")
    assert len(delivered) == 1                   # the start-up catch-up added no second one
    assert delivered[0]["eventId"] == pending["eventId"]
    assert delivered[0]["attempts"] > pending["attempts"]
    events = receiver.events()
    assert [e["id"] for e in events] == [pending["eventId"]]


def test_a_completion_while_webhooks_were_off_is_caught_up_at_start(server_factory,
                                                                    receivers, session,
                                                                    tmp_path):
    receiver = receivers()
    directory = tmp_path / "catchup"
    srv = server_factory(args=["--webhook-url", receiver.url], env=ENV,
                         upload_dir=directory)
    srv.stop()
    plain = server_factory(upload_dir=directory)         # no webhook: nothing is queued
    upload(session, plain, "wh_caught_up")
    wait_until(lambda: session.get(plain.url + "/api/video/status/wh_caught_up").json()[
        "data"]["sha256"], message="the sha256")
    plain.stop()
    session.close()
    again = server_factory(args=["--webhook-url", receiver.url], env=ENV,
                           upload_dir=directory)
    wait_until(lambda: receiver.received(), timeout=WAIT_S, message="the caught-up event")
    assert [(e["type"], e["data"]["fileId"]) for e in receiver.events()] == \
        [("upload.completed", "wh_caught_up")]
    assert len(listing(session, again)["deliveries"]) == 1


# ---------------------------------------------------------------------------------------------
# The other events
# ---------------------------------------------------------------------------------------------

def test_delete_sends_upload_deleted(server_factory, receivers, session):
    receiver = receivers()
    srv = start(server_factory, [receiver.url])
    upload(session, srv, "wh_delete")
    wait_until(lambda: receiver.received(), timeout=WAIT_S, message="upload.completed")
    assert session.delete(srv.url + "/api/video/wh_delete").status_code == 200
    wait_until(lambda: len(receiver.received()) == 2, timeout=WAIT_S, message="upload.deleted")
    deleted = receiver.events()[1]
    assert deleted["type"] == "upload.deleted"
    assert deleted["data"] == {"fileId": "wh_delete", "reason": "requested"}
    assert deleted["id"] != receiver.events()[0]["id"]


def test_expiry_sends_upload_failed_and_retention_upload_deleted(server_factory, receivers,
                                                                 session):
    receiver = receivers()
    srv = start(server_factory, [receiver.url], "--incomplete-ttl", "1", "--retention", "1",
                "--sweep-interval", "0.2")
    upload(session, srv, "wh_kept_short")                 # completed: retention removes it
    response = send_chunk(session, srv.url, "wh_abandoned", 0, EBML + b"never finished")
    assert response.status_code == 200

    def kinds():
        found = dict(((e["type"], e["data"]["fileId"]), e) for e in receiver.events())
        return found if len(found) == 3 else None
    found = wait_until(kinds, timeout=WAIT_S, message="three events")
    assert set(found) == {("upload.completed", "wh_kept_short"),
                          ("upload.deleted", "wh_kept_short"),
                          ("upload.failed", "wh_abandoned")}
    assert found[("upload.deleted", "wh_kept_short")]["data"]["reason"] == "retention"
    assert found[("upload.failed", "wh_abandoned")]["data"]["reason"] == "incomplete_expired"


def test_gc_queues_upload_failed_and_the_server_delivers_it(server_factory, receivers,
                                                            session, tmp_path):
    receiver = receivers()
    directory = tmp_path / "gc"
    plain = server_factory(upload_dir=directory)
    upload(session, plain, "wh_gc_abandoned", chunks=1, finish=False)
    plain.stop()
    session.close()
    result = subprocess.run([SERVER_PYTHON, SERVER_PROGRAM, "gc", "--dir", str(directory),
                             "--incomplete-ttl", "0.01", "--webhook-url", receiver.url] +
                            plain.storage_args,                # S3 mode: the same bucket
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30,
                            env=dict(plain.env, **ENV))
    assert result.returncode == 0, result.stdout
    assert b"wh_gc_abandoned" in result.stdout
    assert receiver.received() == []                   # gc queues; it does not deliver
    server_factory(args=["--webhook-url", receiver.url], env=ENV, upload_dir=directory)
    wait_until(lambda: receiver.received(), timeout=WAIT_S, message="upload.failed")
    assert [(e["type"], e["data"]["fileId"]) for e in receiver.events()] == \
        [("upload.failed", "wh_gc_abandoned")]


# ---------------------------------------------------------------------------------------------
# The deliveries routes
# ---------------------------------------------------------------------------------------------

def test_deliveries_listing_pages_filters_and_retry_sends_again(server_factory, receivers,
                                                                session):
    good = receivers()
    srv = start(server_factory, [good.url])
    upload(session, srv, "wh_list_a")
    upload(session, srv, "wh_list_b")
    wait_deliveries(session, srv, lambda ds: len(ds) == 2 and all(
        d["state"] == "delivered" for d in ds), "two deliveries")

    data = listing(session, srv, limit=1)
    assert data["enabled"] is True and data["receivers"] == [good.url]
    first, = data["deliveries"]
    assert first["fileId"] == "wh_list_b"                # newest first
    assert data["nextCursor"]
    data = listing(session, srv, limit=1, cursor=data["nextCursor"])
    assert [d["fileId"] for d in data["deliveries"]] == ["wh_list_a"]
    assert data["nextCursor"] is None
    assert len(listing(session, srv, state="delivered")["deliveries"]) == 2
    assert listing(session, srv, state="failed")["deliveries"] == []
    for params, code in (({"limit": "0"}, "invalid_limit"), ({"limit": "501"}, "invalid_limit"),
                         ({"cursor": "x"}, "invalid_cursor"), ({"state": "odd"}, "invalid_state")):
        response = session.get(srv.url + "/api/video/webhooks/deliveries", params=params)
        assert response.status_code == 400 and response.json()["error"]["code"] == code
    assert len(listing(session, srv, limit=500)["deliveries"]) == 2

    retry = session.post("%s/api/video/webhooks/deliveries/%d/retry" % (srv.url, first["id"]))
    assert retry.status_code == 202, retry.text
    assert retry.json()["data"]["state"] == "pending"
    wait_until(lambda: len(good.received()) == 3, timeout=WAIT_S, message="the retry")
    again = [body for _, _, _, body in good.received() if b"wh_list_b" in body]
    assert len(again) == 2 and again[0] == again[1]       # same id, same bytes
    wait_deliveries(session, srv, lambda ds: ds[0]["state"] == "delivered" and
                    ds[0]["attempts"] == 2, "the retried delivery recorded")

    missing = session.post(srv.url + "/api/video/webhooks/deliveries/999/retry")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad = session.post(srv.url + "/api/video/webhooks/deliveries/abc/retry")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_delivery_id"
    wrong = session.get(srv.url + "/api/video/webhooks/deliveries/1/retry")
    assert wrong.status_code == 405


def test_deliveries_listing_says_disabled_without_webhook_url(server, session):
    data = listing(session, server)
    assert data == {"enabled": False, "receivers": [], "deliveries": [], "nextCursor": None}
    response = session.post(server.url + "/api/video/webhooks/deliveries/1/retry")
    assert response.status_code == 404
    assert not os.path.exists(os.path.join(server.upload_dir, webhooks.DATABASE_NAME))


# ---------------------------------------------------------------------------------------------
# Isolation: a receiver that never answers
# ---------------------------------------------------------------------------------------------

def thread_count(pid):
    with open("/proc/%d/status" % pid, encoding="ascii") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_a_receiver_that_never_answers_delays_neither_uploads_nor_other_receivers(
        server_factory, receivers, session):
    need(os.path.exists("/proc/self/status"), "/proc/<pid>/status (Linux) to count threads")
    hanging = receivers(kind=HangingReceiver)
    good = receivers()
    srv = start(server_factory, [hanging.url, good.url], "--webhook-timeout", "1")
    session.get(srv.url + "/healthz")                   # this session's handler thread exists
    threads_before = thread_count(srv.proc.pid)
    uploads = 12
    for n in range(uploads):
        assert upload(session, srv, "wh_hang_%d" % n)["status"] == "completed"
    wait_until(lambda: len(good.received()) == uploads, timeout=WAIT_S,
               message="every event at the answering receiver")
    data = listing(session, srv, limit=500)
    to_hanging = [d for d in data["deliveries"] if d["url"] == hanging.url]
    assert len(to_hanging) == uploads
    assert all(d["state"] == "pending" for d in to_hanging)
    threads_after = thread_count(srv.proc.pid)
    # No thread per pending delivery: the same threads as before the uploads (the webhook
    # workers are started with the server), give or take a handler thread.
    assert threads_after <= threads_before + 1, (threads_before, threads_after)
    assert threads_after - threads_before < uploads
    timed_out = wait_deliveries(session, srv, lambda ds: any(
        "timed out" in (d["lastError"] or "") for d in ds if d["url"] == hanging.url),
        "an attempt cut off by --webhook-timeout")
    assert timed_out
    session.close()
    assert srv.stop() == 0                              # SIGTERM: a clean stop, at once
    assert "m1server stopped" in srv.log()


# ---------------------------------------------------------------------------------------------
# Start-up checks: flags and their edges
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["ftp://example.com/hook", "example.com/hook", "http:///x",
                                   "http://example.com:99999/", "file:///etc/passwd",
                                   "@/nonexistent/urls.txt"])
def test_start_refuses_a_webhook_url_that_is_not_http(value, tmp_path):
    result = run_cli(["--dir", str(tmp_path / "u"), "--webhook-url", value],
                     env={"M1_WEBHOOK_SECRET": SECRET})
    assert result.returncode == 2, result.stdout
    assert b"webhook" in result.stdout


def test_start_refuses_bad_urls_from_the_env_and_a_url_without_secret(tmp_path):
    result = run_cli(["--dir", str(tmp_path / "u")],
                     env={"M1_WEBHOOK_SECRET": SECRET, "M1_WEBHOOK_URL": "gopher://x/"})
    assert result.returncode == 2 and b"M1_WEBHOOK_URL" in result.stdout, result.stdout
    result = run_cli(["--dir", str(tmp_path / "u"), "--webhook-url", "http://127.0.0.1:9/"])
    assert result.returncode == 2 and b"--webhook-secret" in result.stdout, result.stdout
    result = run_cli(["--dir", str(tmp_path / "u"), "--webhook-workers", "0"])
    assert result.returncode == 2, result.stdout
    result = run_cli(["--dir", str(tmp_path / "u"), "--webhook-workers",
                      str(options.MAX_WEBHOOK_WORKERS + 1)])
    assert result.returncode == 2, result.stdout


def test_a_url_file_at_the_receiver_limit_starts_and_one_more_is_refused(server_factory,
                                                                         session, tmp_path):
    urls = ["http://127.0.0.1:%d/h%d" % (9, n) for n in range(options.MAX_WEBHOOK_RECEIVERS)]
    urls[0] = "http://user:pw@127.0.0.1:9/private"
    at_limit = tmp_path / "urls.txt"
    at_limit.write_text("# receivers\n\n" + "\n".join(urls) + "\n", encoding="utf-8")
    srv = start(server_factory, ["@%s" % at_limit])
    receivers_shown = listing(session, srv)["receivers"]
    assert len(receivers_shown) == options.MAX_WEBHOOK_RECEIVERS
    assert receivers_shown[0] == "http://user:***@127.0.0.1:9/private"
    srv.stop()
    past = tmp_path / "more.txt"
    past.write_text("\n".join(urls + ["http://127.0.0.1:9/one-more"]), encoding="utf-8")
    result = run_cli(["--dir", str(tmp_path / "u"), "--webhook-url", "@%s" % past],
                     env={"M1_WEBHOOK_SECRET": SECRET})
    assert result.returncode == 2 and b"at most" in result.stdout, result.stdout


def test_webhook_workers_accepts_1_to_the_limit():
    assert options.parse_webhook_workers("1") == 1
    assert options.parse_webhook_workers(str(options.MAX_WEBHOOK_WORKERS)) == options.MAX_WEBHOOK_WORKERS
    for value in ("0", str(options.MAX_WEBHOOK_WORKERS + 1), "two"):
        with pytest.raises(Exception):
            options.parse_webhook_workers(value)


def test_help_never_shows_the_secret():
    result = run_cli(["--help"], env={"M1_WEBHOOK_SECRET": "do-not-print-me"})
    assert result.returncode == 0
    assert b"do-not-print-me" not in result.stdout
    assert b"--webhook-url" in result.stdout


# ---------------------------------------------------------------------------------------------
# Unit: the schedule and the signature
# ---------------------------------------------------------------------------------------------

def test_backoff_doubles_from_one_second_to_one_hour_with_jitter_below_it():
    latest = [webhooks.retry_delay(n, rng=lambda: 0.0) for n in range(1, 15)]
    assert latest[:4] == [1.0, 2.0, 4.0, 8.0]
    assert latest[-1] == 3600.0 and max(latest) == 3600.0
    earliest = [webhooks.retry_delay(n, rng=lambda: 1.0) for n in range(1, 4)]
    assert earliest == [pytest.approx(0.8), pytest.approx(1.6), pytest.approx(3.2)]
    assert webhooks.retry_delay(10 ** 6) <= 3600.0


def test_signature_is_hmac_sha256_of_timestamp_dot_body():
    import hashlib
    import hmac
    header = webhooks.signature(b"k", b'{"a":1}', 1700000000.9)
    expected = hmac.new(b"k", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert header == "t=1700000000,v1=" + expected


def test_the_queue_is_made_in_one_transaction_and_reopened_without_a_write(tmp_path):
    # As the ledger (tests/test_chunkstore.py): a new queue's schema and version commit
    # together, and a queue at the current version is opened and closed without one write.
    import sqlite3
    path = str(tmp_path / webhooks.DATABASE_NAME)
    queue = webhooks._Queue(path)
    created = queue.created_at
    queue.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == webhooks.SCHEMA_VERSION
        tables = set(row[0] for row in db.execute("SELECT name FROM sqlite_master"))
        assert {"meta", "events", "deliveries", "deliveries_by_state"} <= tables
    finally:
        db.close()
    before = sqlite_files(tmp_path, webhooks.DATABASE_NAME)
    queue = webhooks._Queue(path)
    try:
        assert queue.created_at == created
    finally:
        queue.close()
    assert sqlite_files(tmp_path, webhooks.DATABASE_NAME) == before
