"""Real tus clients written elsewhere, unchanged, upload tests/data/sample.webm byte-exact:
tuspy (PyPI, pinned in requirements-test.txt) and tus-js-client under Node (npm, pinned in
tests/js/package.json + package-lock.json, installed by .ci/run with `npm ci`), including a
resume after the server was killed (kill -9) and restarted midway.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import threading

import pytest
import requests

import _tus
from conftest import ROOT, SAMPLE_WEBM, get_status, need, stop_all, wait_until

JS_DIR = os.path.join(ROOT, "tests", "js")
CLIENT_DEADLINE_S = 60


def assert_uploaded(srv, upload_url, source):
    """The upload behind `upload_url` is complete in the seed world and byte-exact."""
    file_id = _tus.upload_id(upload_url)
    with requests.Session() as s:
        status = get_status(s, srv.url, file_id).json()["data"]
        assert status["state"] == "completed"
        assert status["fileSize"] == len(source)
        assert _tus.video_bytes(s, srv.url, file_id) == source
        digest = wait_until(lambda: get_status(s, srv.url, file_id).json()["data"]["sha256"],
                            message="sha256")
    assert digest == hashlib.sha256(source).hexdigest()
    return status


# ---------------------------------------------------------------------------------------------
# tuspy
# ---------------------------------------------------------------------------------------------

def tuspy():
    try:
        from tusclient import client
    except ImportError:
        need(False, "tuspy is not installed (pip install -r requirements-test.txt)")
    return client


@pytest.mark.parametrize("chunk_size,checksum", [(None, False), (48 << 10, True)])
def test_tuspy_uploads_sample_webm_byte_exact(server_factory, sample_webm, chunk_size,
                                              checksum):
    client = tuspy()
    srv = server_factory()
    options = {"chunk_size": chunk_size} if chunk_size else {}
    uploader = client.TusClient(srv.url + "/files/").uploader(
        SAMPLE_WEBM, metadata={"filename": "sample.webm", "filetype": "video/webm"},
        upload_checksum=checksum, **options)
    uploader.upload()
    status = assert_uploaded(srv, uploader.url, sample_webm)
    assert status["tus"]["filename"] == "sample.webm"
    if chunk_size:
        assert status["chunksReceived"] == -(-len(sample_webm) // chunk_size)


def test_tuspy_resumes_after_kill_9_and_restart(server_factory, sample_webm, tmp_path):
    client = tuspy()
    from tusclient.storage import filestorage
    srv = server_factory(args=["--tus-piece-size", "16K"])
    storage = filestorage.FileStorage(str(tmp_path / "tuspy-urls.json"))
    first = client.TusClient(srv.url + "/files/").uploader(
        SAMPLE_WEBM, chunk_size=32 << 10, store_url=True, url_storage=storage,
        metadata={"filename": "sample.webm"})
    first.upload(stop_at=100000)
    sent = first.offset
    assert 100000 <= sent < len(sample_webm)
    srv.kill()                                           # kill -9 midway
    srv.restart()
    # A new uploader finds the upload by the file's fingerprint and asks HEAD where it stands.
    second = client.TusClient(srv.url + "/files/").uploader(
        SAMPLE_WEBM, chunk_size=32 << 10, store_url=True, url_storage=storage)
    assert second.url == first.url
    assert second.offset == sent
    second.upload()
    assert_uploaded(srv, second.url, sample_webm)


# ---------------------------------------------------------------------------------------------
# tus-js-client under Node
# ---------------------------------------------------------------------------------------------

class NodeUpload:
    """tests/js/tus_upload.mjs running tus-js-client; its JSON event lines in a queue."""

    def __init__(self, endpoint, options):
        node = shutil.which("node")
        need(node is not None, "node is not installed")
        need(os.path.isdir(os.path.join(JS_DIR, "node_modules", "tus-js-client")),
             "tus-js-client is not installed (cd tests/js && npm ci)")
        self.events = queue.Queue()
        self.seen = []
        self.proc = subprocess.Popen(
            [node, os.path.join(JS_DIR, "tus_upload.mjs"), endpoint, SAMPLE_WEBM,
             json.dumps(options)], cwd=JS_DIR, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            threading.Thread(target=self._pump, daemon=True).start()
        except BaseException:
            self.stop()
            raise

    def _pump(self):
        for line in self.proc.stdout:
            text = line.decode("utf-8", "replace").strip()
            try:
                event = json.loads(text)
            except ValueError:
                event = {"event": "output", "text": text}
            self.events.put(event)
        self.events.put({"event": "exit"})

    def wait_for(self, name):
        while True:
            try:
                event = self.events.get(timeout=CLIENT_DEADLINE_S)
            except queue.Empty:
                raise AssertionError("no %r from tus-js-client; saw %r" % (name, self.seen))
            self.seen.append(event)
            if event["event"] == name:
                return event
            if event["event"] in ("error", "exit"):
                raise AssertionError("tus-js-client failed: %r" % self.seen)

    def say(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def node_upload():
    started = []

    def start(endpoint, **options):
        upload = NodeUpload(endpoint, options)
        started.append(upload)
        return upload

    yield start
    stop_all(started)


@pytest.mark.parametrize("options", [
    {},                                                  # the whole file in one PATCH
    {"chunkSize": 40000},
    {"chunkSize": 64 << 10, "uploadDataDuringCreation": True, "overridePatchMethod": True},
    {"chunkSize": 70000, "uploadLengthDeferred": True},
    {"parallelUploads": 3},                              # concatenation: 3 partials + final
], ids=["single-patch", "chunked", "creation-with-upload+override", "defer-length",
        "parallel-concatenation"])
def test_tus_js_client_uploads_sample_webm_byte_exact(server_factory, node_upload, sample_webm,
                                                      options):
    srv = server_factory()
    upload = node_upload(srv.url + "/files/", **options)
    done = upload.wait_for("success")
    status = assert_uploaded(srv, done["url"], sample_webm)
    assert status["tus"]["filename"] == "sample.webm"
    if options.get("parallelUploads"):
        created = [e["location"] for e in upload.seen if e["event"] == "created"]
        assert len(created) == 4                         # three partials, then the final
        assert all("tuspart_" in path for path in created[:3])


def test_tus_js_client_resumes_after_kill_9_and_restart(server_factory, node_upload,
                                                        sample_webm):
    srv = server_factory(args=["--tus-piece-size", "16K"])
    upload = node_upload(srv.url + "/files/", chunkSize=32 << 10, pauseAt=100000)
    paused = upload.wait_for("paused")                   # about to send a PATCH
    srv.kill()                                           # kill -9 midway
    upload.say("go")
    retry = upload.wait_for("retry")                     # the PATCH found no server
    assert retry["retry"] is True
    srv.restart()                                        # same port, same directory
    done = upload.wait_for("success")
    assert done["url"] == paused["url"]                  # resumed, not started again
    assert_uploaded(srv, done["url"], sample_webm)
    # tus-js-client asked HEAD where to go on, and went on from there.
    assert '"HEAD /files/%s HTTP/1.1" 200' % _tus.upload_id(done["url"]) in srv.log()
