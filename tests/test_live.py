"""The live media stream (issue 18): GET /uploads/<fileId>.<ext>?live=1 over plain HTTP.

A LiveReader reads the stream on a raw socket in a thread of its own and keeps every byte of
the chunked body as it arrives, so a test can wait (polling with a deadline) for exactly the
bytes the server has appended. Every test here runs in S3 mode too (`make test-s3`); the last
one starts two nodes on one bucket itself.
"""
from __future__ import annotations

import hashlib
import socket
import threading

import pytest
import requests

from _http import connect
from conftest import (S3_BUCKET, BucketStorageView, get_status, s3_server_args, send_chunk,
                      split_chunks, wait_until)

CHUNK_DEADLINE_S = 1.0        # the issue: each chunk's bytes reach the viewer within a second
DEADLINE_S = 30.0             # anything else (starting, finishing, a shared machine)
API_KEY = "live-test-key-0123456789"


class LiveReader:
    """One live stream, read in a background thread: `body` grows as chunks arrive; `ended`
    is set with the trailer's reason once the terminating chunk came (`closed` without it)."""

    def __init__(self, url, path, headers=(), version="HTTP/1.1"):
        self.sock = connect(url, timeout=DEADLINE_S)
        head = ["GET %s %s" % (path, version), "Host: 127.0.0.1"] + list(headers)
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("ascii"))
        self.status, self.headers, self._rest = self._read_head()
        self.body = b""
        self.ended = None             # the M1-Live-End trailer's value
        self.closed = False
        self._lock = threading.Lock()
        self.chunked = self.headers.get("transfer-encoding") == "chunked"
        if self.status == 200:
            threading.Thread(target=self._read_body, daemon=True).start()

    def _read_head(self):
        data = b""
        while b"\r\n\r\n" not in data:
            more = self.sock.recv(65536)
            if not more:
                raise AssertionError("stream closed before its head: %r" % data)
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers, rest

    def _read_body(self):
        buffer = self._rest
        try:
            while True:
                if self.chunked:
                    buffer = self._consume(buffer)
                    if self.ended is not None:
                        return
                elif buffer:
                    with self._lock:
                        self.body += buffer
                    buffer = b""
                more = self.sock.recv(65536)
                if not more:
                    self.closed = True
                    return
                buffer += more
        except OSError:
            self.closed = True

    def _consume(self, buffer):
        """Take every whole chunk (and the terminating chunk with its trailer) off `buffer`."""
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                return buffer
            size = int(buffer[:line_end].split(b";")[0], 16)
            if size == 0:
                end = buffer.find(b"\r\n\r\n", line_end)
                if end < 0:
                    return buffer
                trailer = buffer[line_end + 2:end].decode("latin-1")
                name, _, value = trailer.partition(":")
                assert name.strip().lower() == "m1-live-end", trailer
                self.ended = value.strip()
                return b""
            if len(buffer) < line_end + 2 + size + 2:
                return buffer
            data = buffer[line_end + 2:line_end + 2 + size]
            assert buffer[line_end + 2 + size:line_end + 4 + size] == b"\r\n"
            with self._lock:
                self.body += data
            buffer = buffer[line_end + 4 + size:]

    def received(self):
        with self._lock:
            return self.body

    def wait_for(self, expected, timeout, what):
        wait_until(lambda: self.received() == expected or len(self.received()) > len(expected),
                   timeout, 0.005, what)
        assert self.received() == expected, "%s: got %d bytes, expected %d" % (
            what, len(self.received()), len(expected))

    def wait_end(self, timeout=DEADLINE_S):
        wait_until(lambda: self.ended is not None or self.closed, timeout, 0.01, "the end")
        return self.ended

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)     # wakes our reader thread, sends the FIN
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def readers():
    opened = []

    def open_reader(url, path, **kw):
        reader = LiveReader(url, path, **kw)
        opened.append(reader)
        return reader

    yield open_reader
    for reader in opened:
        reader.close()


def live_path(file_id, ext="webm", token=None):
    return "/uploads/%s.%s?live=1%s" % (file_id, ext, "&token=" + token if token else "")


def ok(response):
    assert response.status_code == 200, response.text
    return response.json()["data"]


def error_of(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == code, body


# --- the stream follows the upload --------------------------------------------------------------

def test_each_chunk_reaches_the_live_stream_and_it_ends_with_the_whole_file(
        server, session, sample_webm, readers):
    chunks = split_chunks(sample_webm, 6)
    ok(send_chunk(session, server.url, "live_1", 0, chunks[0]))
    reader = readers(server.url, live_path("live_1"))
    assert reader.status == 200, reader.headers
    assert reader.headers["content-type"] == "video/webm"
    assert reader.headers["transfer-encoding"] == "chunked"
    assert reader.headers["accept-ranges"] == "none" and "content-length" not in reader.headers
    reader.wait_for(chunks[0], DEADLINE_S, "the bytes the upload had")
    for index in range(1, len(chunks)):
        last = index == len(chunks) - 1
        ok(send_chunk(session, server.url, "live_1", index, chunks[index],
                      status="completed" if last else "uploading"))
        reader.wait_for(b"".join(chunks[:index + 1]), CHUNK_DEADLINE_S,
                        "chunk %d on the stream" % index)
    assert reader.wait_end() == "completed"
    status = ok(get_status(session, server.url, "live_1"))
    wait_until(lambda: ok(get_status(session, server.url, "live_1"))["sha256"], DEADLINE_S)
    digest = ok(get_status(session, server.url, "live_1"))["sha256"]
    assert hashlib.sha256(reader.received()).hexdigest() == digest
    assert reader.received() == session.get(server.url + status["url"]).content == sample_webm


def test_chunks_out_of_order_reach_the_stream_once_they_are_contiguous(
        server, session, sample_webm, readers):
    chunks = split_chunks(sample_webm, 4)
    ok(send_chunk(session, server.url, "live_order", 0, chunks[0]))
    reader = readers(server.url, live_path("live_order"))
    reader.wait_for(chunks[0], DEADLINE_S, "chunk 0")
    ok(send_chunk(session, server.url, "live_order", 2, chunks[2]))       # early: waits
    ok(send_chunk(session, server.url, "live_order", 1, chunks[1]))       # 1 and 2 go out
    reader.wait_for(b"".join(chunks[:3]), CHUNK_DEADLINE_S, "chunks 1 and 2")
    ok(send_chunk(session, server.url, "live_order", 3, chunks[3], status="completed"))
    assert reader.wait_end() == "completed" and reader.received() == sample_webm


def test_a_completed_upload_streams_whole_and_ends_at_once(server, session, sample_mp4,
                                                           readers):
    ok(send_chunk(session, server.url, "live_done", 0, sample_mp4, status="completed",
                  mime_type="video/mp4"))
    reader = readers(server.url, live_path("live_done", "mp4"))
    assert reader.headers["content-type"] == "video/mp4"
    assert reader.wait_end() == "completed" and reader.received() == sample_mp4


def test_deleting_the_upload_ends_its_live_stream(server, session, sample_webm, readers):
    chunks = split_chunks(sample_webm, 3)
    ok(send_chunk(session, server.url, "live_gone", 0, chunks[0]))
    reader = readers(server.url, live_path("live_gone"))
    reader.wait_for(chunks[0], DEADLINE_S, "chunk 0")
    assert session.delete(server.url + "/api/video/live_gone").status_code == 200
    assert reader.wait_end() == "deleted"
    assert reader.received() == chunks[0]


def test_idle_timeout_ends_the_stream_only_after_no_chunk_came_for_that_long(
        server_factory, session, sample_webm, readers):
    server = server_factory(args=["--live-idle-timeout", "2"])
    chunks = split_chunks(sample_webm, 8)
    ok(send_chunk(session, server.url, "live_idle", 0, chunks[0]))
    reader = readers(server.url, live_path("live_idle"))
    reader.wait_for(chunks[0], DEADLINE_S, "chunk 0")
    # At the edge: chunks keep coming, 0.5 s apart, for longer than the idle timeout (4 s in
    # all) and the stream stays open: each chunk starts the idle time anew ...
    stop = threading.Event()
    for index in range(1, len(chunks)):
        stop.wait(0.5)                                # the recorder's pace, not a wait for us
        ok(send_chunk(session, server.url, "live_idle", index, chunks[index]))
        reader.wait_for(b"".join(chunks[:index + 1]), DEADLINE_S, "chunk %d" % index)
        assert reader.ended is None, "ended after chunk %d" % index
    # ... past it: no chunk for 2 s ends the stream.
    assert reader.wait_end() == "idle"
    assert reader.received() == sample_webm


def test_head_and_range_on_the_live_url(server, session, sample_webm, readers):
    chunks = split_chunks(sample_webm, 2)
    ok(send_chunk(session, server.url, "live_head", 0, chunks[0]))
    head = session.head(server.url + live_path("live_head"), timeout=10)
    assert head.status_code == 200 and head.headers["Transfer-Encoding"] == "chunked"
    assert head.headers["Content-Type"] == "video/webm" and not head.content
    # A <video> asks for bytes=0- first, a seek for more: the live stream always starts at 0.
    reader = readers(server.url, live_path("live_head"), headers=["Range: bytes=100-"])
    assert reader.status == 200 and "content-range" not in reader.headers
    reader.wait_for(chunks[0], DEADLINE_S, "chunk 0 from byte 0")
    ok(send_chunk(session, server.url, "live_head", 1, chunks[1], status="completed"))
    assert reader.wait_end() == "completed" and reader.received() == sample_webm
    # The plain URL keeps its Range semantics.
    ranged = session.get(server.url + "/uploads/live_head.webm",
                         headers={"Range": "bytes=100-"}, timeout=10)
    assert ranged.status_code == 206 and ranged.content == sample_webm[100:]


def test_an_http_10_client_gets_a_body_ended_by_the_close(server, session, sample_webm,
                                                           readers):
    ok(send_chunk(session, server.url, "live_10", 0, sample_webm, status="completed"))
    reader = readers(server.url, live_path("live_10"), version="HTTP/1.0")
    assert reader.status == 200 and "transfer-encoding" not in reader.headers
    wait_until(lambda: reader.closed, DEADLINE_S, 0.01, "the close")
    assert reader.received() == sample_webm


def test_unknown_or_invalid_uploads_get_404_envelopes(server, session, sample_webm):
    error_of(session.get(server.url + live_path("nobody_here"), timeout=10), 404, "not_found")
    error_of(session.get(server.url + live_path("bad%20id"), timeout=10), 404, "not_found")
    ok(send_chunk(session, server.url, "live_ext", 0, sample_webm, status="completed"))
    error_of(session.get(server.url + live_path("live_ext", "mp4"), timeout=10), 404,
             "not_found")
    # live=anything else is the plain file
    plain = session.get(server.url + "/uploads/live_ext.webm?live=yes", timeout=10)
    assert plain.status_code == 200 and plain.headers["Content-Length"] == str(len(sample_webm))


def test_the_pages_are_served_and_a_bad_watch_id_is_a_404(server, session):
    for path in ("/watch/upload_1", "/dashboard"):
        page = session.get(server.url + path, timeout=10)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert "Content-Security-Policy" in page.headers
    for path in ("/watch.js", "/dashboard.js", "/ui.js"):
        script = session.get(server.url + path, timeout=10)
        assert script.status_code == 200 and "javascript" in script.headers["Content-Type"]
    error_of(session.get(server.url + "/watch/bad%20id", timeout=10), 404, "not_found")
    error_of(session.get(server.url + "/watch/" + "x" * 129, timeout=10), 404, "not_found")


# --- limits ---------------------------------------------------------------------------------

def test_viewer_cap_at_and_past_the_edge(server_factory, session, sample_webm, readers):
    server = server_factory(args=["--live-max-viewers", "2"])
    ok(send_chunk(session, server.url, "live_cap", 0, split_chunks(sample_webm, 2)[0]))
    first = readers(server.url, live_path("live_cap"))
    second = readers(server.url, live_path("live_cap"))
    assert first.status == second.status == 200                       # at the cap
    assert "\nm1_live_viewers 2\n" in session.get(server.url + "/metrics", timeout=10).text
    refused = session.get(server.url + live_path("live_cap"), timeout=10)
    error_of(refused, 503, "too_many_viewers")                         # past it
    assert refused.headers["Retry-After"] == "5"
    # HEAD holds no viewer slot; the plain media URL (local mode: served while it grows) is
    # not capped either.
    assert session.head(server.url + live_path("live_cap"), timeout=10).status_code == 200
    if server.storage.grows_in_place:
        assert session.get(server.url + "/uploads/live_cap.webm", timeout=10).status_code == 200
    first.close()                                                      # a viewer leaves
    wait_until(lambda: readers(server.url, live_path("live_cap")).status == 200, DEADLINE_S,
               0.05, "a free slot once a viewer left")


def test_viewer_cap_must_stay_below_the_connection_cap(server_factory):
    server = server_factory(args=["--max-connections", "8", "--live-max-viewers", "8"],
                            start=False)
    with pytest.raises(RuntimeError):
        server.start()
    assert "--live-max-viewers (8) must be below --max-connections (8)" in server.log()
    server.args[server.args.index("--live-max-viewers") + 1] = "7"     # at the edge: fine
    server.start()


def test_sigterm_ends_live_streams_and_the_server_stops(server, session, sample_webm,
                                                        readers):
    ok(send_chunk(session, server.url, "live_stop", 0, split_chunks(sample_webm, 2)[0]))
    reader = readers(server.url, live_path("live_stop"))
    reader.wait_for(split_chunks(sample_webm, 2)[0], DEADLINE_S, "chunk 0")
    assert server.stop() == 0
    assert reader.wait_end() == "shutdown"


# --- tokens ---------------------------------------------------------------------------------

def mint(session, url, body):
    reply = session.post(url + "/api/video/tokens", json=body, timeout=10,
                         headers={"Authorization": "Bearer " + API_KEY})
    assert reply.status_code == 200, reply.text
    return reply.json()["data"]["token"]


def test_live_stream_needs_a_read_token_for_that_upload(server_factory, session, sample_webm,
                                                        readers):
    server = server_factory(env={"M1_API_KEY": API_KEY})
    key = {"Authorization": "Bearer " + API_KEY}
    chunks = split_chunks(sample_webm, 2)
    reply = send_chunk(requests.Session(), server.url, "live_tok", 0, chunks[0])
    assert reply.status_code == 401
    session.headers.update(key)
    ok(send_chunk(session, server.url, "live_tok", 0, chunks[0]))
    bare = requests.get(server.url + live_path("live_tok"), timeout=10)
    error_of(bare, 401, "missing_credentials")
    other = mint(session, server.url, {"fileId": "live_other", "rights": ["read"]})
    error_of(requests.get(server.url + live_path("live_tok", token=other), timeout=10), 403,
             "token_wrong_file")
    upload_only = mint(session, server.url, {"fileId": "live_tok", "rights": ["upload"]})
    error_of(requests.get(server.url + live_path("live_tok", token=upload_only), timeout=10),
             403, "token_right_missing")
    read = mint(session, server.url, {"fileId": "live_tok", "rights": ["read"]})
    reader = readers(server.url, live_path("live_tok", token=read))
    assert reader.status == 200
    reader.wait_for(chunks[0], DEADLINE_S, "chunk 0 with a read token")
    ok(send_chunk(session, server.url, "live_tok", 1, chunks[1], status="completed"))
    assert reader.wait_end() == "completed" and reader.received() == sample_webm
    assert read not in server.log()                                   # the log redacts it


def test_a_stream_opened_with_a_token_ends_when_the_token_expires(server_factory, session,
                                                                   sample_webm, readers):
    server = server_factory(env={"M1_API_KEY": API_KEY})
    session.headers.update({"Authorization": "Bearer " + API_KEY})
    ok(send_chunk(session, server.url, "live_exp", 0, split_chunks(sample_webm, 2)[0]))
    token = mint(session, server.url, {"fileId": "live_exp", "rights": ["read"],
                                       "expiresIn": 2})
    reader = readers(server.url, live_path("live_exp", token=token))
    assert reader.status == 200
    assert reader.wait_end() == "token_expired"


# --- several nodes on one bucket ----------------------------------------------------------------

def test_s3_a_viewer_on_another_node_gets_each_chunk_within_a_second(
        server_factory, session, seaweed, sample_webm, readers):
    prefix = "live-%s" % hashlib.sha256(str(id(session)).encode()).hexdigest()[:8]
    args, env = s3_server_args(prefix, seaweed)
    args += ["--processing", "off", "--s3-part-size", "5M"]
    writer = server_factory(args=args, env=env)
    watcher = server_factory(args=args, env=env)
    watcher_view = BucketStorageView(seaweed.client(S3_BUCKET), prefix)
    # Big enough that parts get folded while the viewer reads (5 MiB parts): the stream
    # reads folded chunks and unfolded ones alike from their chunk objects. An empty chunk in
    # the middle, as MediaRecorder sometimes hands out.
    chunks = [sample_webm] + [bytes([i]) * (1 << 20) for i in range(1, 13)]
    chunks[3] = b""
    ok(send_chunk(session, writer.url, "live_nodes", 0, chunks[0]))
    reader = readers(watcher.url, live_path("live_nodes"))
    assert reader.status == 200, reader.headers
    reader.wait_for(chunks[0], DEADLINE_S, "chunk 0 on the other node")
    for index in range(1, len(chunks)):
        last = index == len(chunks) - 1
        ok(send_chunk(session, writer.url, "live_nodes", index, chunks[index],
                      status="completed" if last else "uploading"))
        # the watcher's node looks at the bucket every 0.5 s (live.SHARED_POLL_S)
        reader.wait_for(b"".join(chunks[:index + 1]), CHUNK_DEADLINE_S + 0.5,
                        "chunk %d on the other node" % index)
        if index == 9:
            # A viewer joining now starts with bytes folded into parts: read back from the
            # chunk objects (kept until completion) through the fold records.
            wait_until(lambda: len((watcher_view.manifest("live_nodes") or {}).get(
                "parts", [])) >= 1, DEADLINE_S, 0.05, "a folded part")
            joined = readers(watcher.url, live_path("live_nodes"))
            joined.wait_for(b"".join(chunks[:index + 1]), DEADLINE_S, "the folded prefix")
    assert reader.wait_end() == "completed"
    assert joined.wait_end() == "completed" and joined.received() == reader.received()
    assert reader.received() == session.get(writer.url + "/uploads/live_nodes.webm").content
    # A late viewer of the finished upload reads the assembled object.
    late = readers(watcher.url, live_path("live_nodes"))
    assert late.wait_end() == "completed" and late.received() == b"".join(chunks)
