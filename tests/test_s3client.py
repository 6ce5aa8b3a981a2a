"""s3client.py against a real S3 server (SeaweedFS on loopback, the session's `seaweed`
fixture) and against a tiny misbehaving stub for retries: every call m1server's S3 store
makes, conditional writes, pagination, multipart uploads, presigned URLs, and the errors a
misconfigured or unreachable store produces.
"""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import s3client
from conftest import S3_BUCKET


@pytest.fixture
def bucket(seaweed):
    return seaweed.client(S3_BUCKET)


@pytest.fixture
def prefix():
    return "client-%s/" % os.urandom(4).hex()


def test_put_get_head_delete_round_trip_with_an_awkward_key(bucket, prefix):
    key = prefix + "a b/c+d$e\u00e9=&?.webm"
    data = os.urandom(100000)
    etag = bucket.put_object(key, data, content_type="video/webm",
                             metadata={"sha256": hashlib.sha256(data).hexdigest()})
    assert etag.strip('"') == hashlib.md5(data).hexdigest()
    got = bucket.get_object(key)
    assert got.body == data and got.metadata["sha256"] == hashlib.sha256(data).hexdigest()
    assert bucket.get_object(key, byte_range=(10, 19)).body == data[10:20]
    head = bucket.head_object(key)
    assert int(head.header("content-length")) == len(data) and head.body == b""
    with bucket.open_object(key, (1000, 1999)) as stream:
        assert stream.read() == data[1000:2000]
    bucket.delete_object(key)
    with pytest.raises(s3client.S3Error) as caught:
        bucket.get_object(key)
    assert caught.value.status == 404 and caught.value.code == "NoSuchKey"


def test_file_bodies_are_sent_from_disk_with_their_hash(bucket, prefix, tmp_path):
    path = tmp_path / "part"
    data = os.urandom(3 << 20)
    path.write_bytes(b"xx" + data + b"yy")
    bucket.put_object(prefix + "f", s3client.FileRegion(str(path), 2, len(data)),
                      sha256=hashlib.sha256(data).hexdigest())
    assert bucket.get_object(prefix + "f").body == data


def test_if_none_match_creates_once_and_if_match_swaps_only_the_current_version(bucket,
                                                                               prefix):
    key = prefix + "manifest.json"
    first = bucket.put_object(key, b"v1", if_none_match=True)
    with pytest.raises(s3client.S3Error) as caught:
        bucket.put_object(key, b"v1 again", if_none_match=True)
    assert caught.value.status == 412
    second = bucket.put_object(key, b"v2", if_match=first)
    with pytest.raises(s3client.S3Error) as caught:
        bucket.put_object(key, b"v3", if_match=first)          # stale: someone swapped it
    assert caught.value.status == 412
    assert bucket.get_object(key).body == b"v2" and second != first


def test_listing_pages_through_every_key_in_order(bucket, prefix):
    keys = [prefix + "k%02d" % n for n in range(7)]
    for key in reversed(keys):
        bucket.put_object(key, b"x" * len(key))
    assert [info.key for info in bucket.iter_objects(prefix, page_size=3)] == keys
    assert [info.key for info in bucket.iter_objects(prefix, start_after=keys[4],
                                                     page_size=2)] == keys[5:]
    page = bucket.list_objects(prefix, max_keys=3)
    assert page.truncated and page.next_token and len(page.objects) == 3
    assert all(info.size == len(info.key) and info.last_modified > 0 for info in page.objects)
    page = bucket.list_objects(prefix.rstrip("/"), delimiter="/")
    assert page.prefixes == [prefix] and not page.objects


def test_multipart_upload_with_a_copied_part_and_a_small_last_part(bucket, prefix):
    source = os.urandom(6 << 20)
    bucket.put_object(prefix + "source", source)
    key = prefix + "video.webm"
    upload_id = bucket.create_multipart_upload(key, content_type="video/webm")
    assert (key, upload_id) in [(k, u) for k, u, _ in bucket.list_multipart_uploads(prefix)]
    first = os.urandom(5 << 20)
    parts = [(1, bucket.upload_part(key, upload_id, 1, first)),
             (2, bucket.upload_part_copy(key, upload_id, 2, prefix + "source",
                                         (0, (5 << 20) - 1))),
             (3, bucket.upload_part(key, upload_id, 3, b"the end"))]
    etag = bucket.complete_multipart_upload(key, upload_id, parts, if_none_match=True)
    assert etag
    assert bucket.get_object(key).body == first + source[:5 << 20] + b"the end"
    # completing again, or over an existing object, is refused: finishing is safe to repeat
    with pytest.raises(s3client.S3Error) as caught:
        bucket.complete_multipart_upload(key, upload_id, parts, if_none_match=True)
    assert caught.value.status in (404, 412)


def test_aborted_multipart_upload_is_gone(bucket, prefix):
    key = prefix + "abandoned"
    upload_id = bucket.create_multipart_upload(key)
    bucket.upload_part(key, upload_id, 1, b"abc")
    bucket.abort_multipart_upload(key, upload_id)
    assert upload_id not in [u for _, u, _ in bucket.list_multipart_uploads(prefix)]


def test_presigned_url_works_without_credentials_and_not_when_tampered(bucket, prefix):
    bucket.put_object(prefix + "p.webm", b"presigned bytes")
    url = bucket.presigned_url(prefix + "p.webm", expires=60)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"presigned bytes"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url.replace("X-Amz-Expires=60", "X-Amz-Expires=61"), timeout=10)
    assert caught.value.code == 403


def test_wrong_secret_is_a_clear_403(seaweed):
    wrong = seaweed.client(S3_BUCKET, credentials=s3client.Credentials(
        "m1testaccesskey", "not-the-secret"), attempts=1)
    with pytest.raises(s3client.S3Error) as caught:
        wrong.list_objects(max_keys=1)
    assert caught.value.status == 403
    assert caught.value.code in ("SignatureDoesNotMatch", "AccessDenied")
    assert caught.value.code in str(caught.value)


def test_unknown_access_key_is_a_clear_403(seaweed):
    unknown = seaweed.client(S3_BUCKET, credentials=s3client.Credentials("nobody", "x"),
                             attempts=1)
    with pytest.raises(s3client.S3Error) as caught:
        unknown.get_object("anything")
    assert caught.value.status == 403 and caught.value.code == "InvalidAccessKeyId"


def test_missing_bucket_is_no_such_bucket(seaweed):
    with pytest.raises(s3client.S3Error) as caught:
        seaweed.client("m1-no-such-bucket").list_objects(max_keys=1)
    assert caught.value.status == 404 and caught.value.code == "NoSuchBucket"


def test_nothing_listening_is_a_connection_error_after_the_retries():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]               # closed again: nothing listens there
    client = s3client.S3Client(S3_BUCKET, endpoint="http://127.0.0.1:%d" % port,
                               credentials=s3client.Credentials("a", "b"), attempts=3)
    with pytest.raises(s3client.S3ConnectionError) as caught:
        client.get_object("k")
    assert caught.value.status is None and "ConnectionRefused" in str(caught.value)


# --- retries against a stub that fails on purpose -------------------------------------------

class _FlakyS3(BaseHTTPRequestHandler):
    """Answers the first `failures` requests badly (503 SlowDown, or a dropped connection),
    then 200; records every body it received."""
    protocol_version = "HTTP/1.1"

    def do_PUT(self):
        server = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with server.lock:
            server.bodies.append(body)
            attempt = len(server.bodies)
        if attempt <= server.failures:
            if server.mode == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            error = (b"<?xml version='1.0'?><Error><Code>SlowDown</Code>"
                     b"<Message>Please reduce your request rate.</Message></Error>")
            self.send_response(503)
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        self.send_response(200)
        self.send_header("ETag", '"%s"' % hashlib.md5(body).hexdigest())
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        error = (b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist."
                 b"</Message><RequestId>r-42</RequestId></Error>")
        self.send_response(404)
        self.send_header("Content-Length", str(len(error)))
        self.end_headers()
        self.wfile.write(error)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    servers = []

    def start(mode, failures):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyS3)
        server.daemon_threads = True
        server.mode, server.failures = mode, failures
        server.bodies, server.lock = [], threading.Lock()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        client = s3client.S3Client("bucket", endpoint="http://127.0.0.1:%d" %
                                   server.server_address[1],
                                   credentials=s3client.Credentials("a", "b"), attempts=4)
        return server, client

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode", ["slowdown", "drop"])
def test_retries_resend_the_whole_body_after_5xx_or_a_dropped_connection(flaky, tmp_path,
                                                                         mode):
    server, client = flaky(mode, failures=2)
    path = tmp_path / "body"
    data = os.urandom(2 << 20)
    path.write_bytes(data)
    etag = client.put_object("k", s3client.FileRegion(str(path)))
    assert etag.strip('"') == hashlib.md5(data).hexdigest()
    assert server.bodies[-1] == data and len(server.bodies) == 3


def test_gives_up_after_the_last_attempt_with_the_last_error(flaky):
    server, client = flaky("slowdown", failures=10)
    with pytest.raises(s3client.S3Error) as caught:
        client.put_object("k", b"data")
    assert caught.value.status == 503 and caught.value.code == "SlowDown"
    assert "reduce your request rate" in str(caught.value)
    assert len(server.bodies) == 4


def test_client_errors_are_not_retried_and_carry_the_request_id(flaky):
    server, client = flaky("slowdown", failures=0)
    with pytest.raises(s3client.S3Error) as caught:
        client.get_object("k")
    error = caught.value
    assert (error.status, error.code, error.request_id) == (404, "NoSuchKey", "r-42")
    assert "NoSuchKey" in str(error) and "does not exist" in str(error)
