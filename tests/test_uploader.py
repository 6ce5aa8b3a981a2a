"""Black-box tests of the command-line uploader (issue 5, SPEC §7):
`python3 m1server.py upload FILE --server URL [--file-id] [--chunk-size] [--follow] ...`.

The uploader runs as a subprocess exactly as a user runs it, against a real server started by
the conftest fixtures. Results are checked where a user would look: its JSON line on stdout,
its messages on stderr and exit status, the server's status and metrics, and the assembled
file (over HTTP and on disk). Interruptions are deterministic: the store's crash hook
(M1_TEST_CRASH_AT) or a kill -9 once the uploader reports a given chunk acknowledged; every
wait polls with a deadline.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
import requests

from conftest import (ROOT, SERVER_PROGRAM, SERVER_PYTHON, STORAGE, get_status, kill_running,
                      metric, wait_until)

UPLOAD_TIMEOUT_S = 60
CRASH_EXIT_CODE = 70
EBML = b"\x1a\x45\xdf\xa3"


# --- helpers --------------------------------------------------------------------------------

def new_id(tag="cli"):
    return "%s_%s" % (tag, os.urandom(5).hex())


def clean_env():
    """The environment without M1_* settings: the uploader sees only its flags."""
    return {k: v for k, v in os.environ.items() if not k.startswith("M1_")}


def upload_command(path, server_url, *args):
    return [SERVER_PYTHON, SERVER_PROGRAM, "upload", str(path), "--server", server_url] + [
        str(a) for a in args]


def run_upload(path, server_url, *args):
    return subprocess.run(upload_command(path, server_url, *args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=clean_env(), cwd=ROOT,
                          timeout=UPLOAD_TIMEOUT_S, universal_newlines=True)


def result_of(done):
    """The JSON line a successful run prints on stdout."""
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


def assert_failed_clearly(done, *fragments):
    """Exit 1, one "upload failed: ..." message naming the cause, never a traceback."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert "upload failed: " in done.stderr, done.stderr
    message = done.stderr.split("upload failed: ", 1)[1]
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (fragment, done.stderr)
    assert done.stdout == ""


def write(path, data):
    with open(str(path), "wb") as f:
        f.write(data)
    return str(path)


def read(path):
    with open(str(path), "rb") as f:
        return f.read()


def status_of(srv, file_id):
    response = get_status(requests, srv.url, file_id)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def assert_byte_exact(srv, result, data, ext="webm"):
    """The server's copy equals `data`: the reported size and URL, HTTP and disk."""
    file_id = result["fileId"]
    assert result["fileSize"] == len(data)
    assert result["url"] == "%s/uploads/%s.%s" % (srv.url, file_id, ext)
    response = requests.get(result["url"], timeout=30)
    assert response.status_code == 200 and response.content == data
    assert read(os.path.join(srv.upload_dir, "%s.%s" % (file_id, ext))) == data
    status = status_of(srv, file_id)
    assert status["state"] == "completed" and status["fileSize"] == len(data)
    return status


def chunk_count(size, chunk_size):
    return max(1, -(-size // chunk_size))


def free_port():
    """A port nothing listens on (bound, then released)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


class LineReader:
    """Collects a subprocess's stream line by line in a thread, so a test can poll it."""

    def __init__(self, stream):
        self.lines = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream):
        for raw in stream:
            with self._lock:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def snapshot(self):
        with self._lock:
            return list(self.lines)

    def text(self):
        self._thread.join(10)
        return "\n".join(self.snapshot())


WRITER = r"""
import sys, time
source, target, piece, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
start = int(sys.argv[5])
with open(source, "rb") as f:
    data = f.read()
with open(target, "ab") as out:
    for at in range(start, len(data), piece):
        out.write(data[at:at + piece])
        out.flush()
        time.sleep(pause)       # a camera writes a little at a time
"""


def follow_upload(srv, tmp_path, data, chunk_size, piece, pause, first):
    """Write `first` bytes of `data`, start a writer process for the rest (a piece every
    `pause` s), start the uploader with --follow while the writer runs; returns
    (uploader result, writer was still running when the uploader started)."""
    source = write(tmp_path / "source.webm", data)
    target = write(tmp_path / "recording.webm", data[:first])
    writer = subprocess.Popen([sys.executable, "-c", WRITER, source, target, str(piece),
                               str(pause), str(first)], env=clean_env())
    uploader = None
    try:
        wait_until(lambda: os.path.getsize(target) > first or writer.poll() is not None,
                   message="the writer to start appending")
        uploader = subprocess.Popen(
            upload_command(target, srv.url, "--follow", "--follow-idle", "1",
                           "--chunk-size", chunk_size, "--file-id", new_id("follow")),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(), cwd=ROOT,
            universal_newlines=True)
        writing = writer.poll() is None
        out, err = uploader.communicate(timeout=UPLOAD_TIMEOUT_S)
        writer.wait(UPLOAD_TIMEOUT_S)
    finally:
        kill_running(uploader, writer)         # only left running when something failed
    assert writer.returncode == 0
    assert read(target) == data
    done = subprocess.CompletedProcess(uploader.args, uploader.returncode, out, err)
    return result_of(done), writing, err


# --- a whole upload --------------------------------------------------------------------------

def test_the_form_sends_its_text_fields_before_the_file_part():
    """The server writes a chunk straight into the video only when it has the fields first."""
    sys.path.insert(0, ROOT)
    import multipart
    import uploader
    fields = [("fileId", "up_1"), ("chunkIndex", "3"), ("status", "uploading"),
              ("checksum", "sha256:" + "0" * 64)]
    body, content_type = uploader.encode_form(fields, b"the chunk")
    chunks = []

    def read_into(view, data=[body]):
        count = min(len(view), len(data[0]))
        view[:count], data[0] = data[0][:count], data[0][count:]
        return count

    form = multipart.parse(read_into, multipart.boundary_from_content_type(content_type),
                           lambda *args: _Collect(chunks))
    assert [part.name for part in form.parts] == [name for name, _ in fields] + ["file"]
    assert b"".join(chunks) == b"the chunk"


class _Collect:
    def __init__(self, into):
        self._into = into

    def write(self, view):
        self._into.append(bytes(view))
        return len(view)


def test_uploads_the_sample_byte_exact_with_one_progress_line_per_chunk(
        server, tmp_path, sample_webm):
    path = write(tmp_path / "sample.webm", sample_webm)
    file_id = new_id()
    in_place = metric(server, "m1_chunks_in_place_total")
    done = run_upload(path, server.url, "--file-id", file_id, "--chunk-size", "64K")
    result = result_of(done)
    chunks = chunk_count(len(sample_webm), 64 << 10)
    assert result["fileId"] == file_id
    assert result["chunksSent"] == chunks == 4
    # its text fields come first, so every chunk (the first one, which creates the upload,
    # too) is written straight into the video (local disk; S3 receives every chunk into a file)
    assert metric(server, "m1_chunks_in_place_total") - in_place == (
        chunks if STORAGE == "local" else 0)
    assert result["alreadyComplete"] is False
    status = assert_byte_exact(server, result, sample_webm)
    assert status["totalChunks"] == chunks and status["mimeType"] == "video/webm"
    # not a terminal: plain lines, one per acknowledged chunk, then a closing line
    acknowledged = [line for line in done.stderr.splitlines() if "acknowledged" in line]
    assert len(acknowledged) == chunks, done.stderr
    for index, line in enumerate(acknowledged):
        assert line.startswith("chunk %d acknowledged" % index), line
    assert acknowledged[-1].endswith("%d/%d bytes" % (len(sample_webm), len(sample_webm)))
    assert "\r" not in done.stderr and "upload complete" in done.stderr


def test_a_second_run_on_a_completed_upload_sends_nothing(server, tmp_path, sample_webm):
    path = write(tmp_path / "sample.webm", sample_webm)
    file_id = new_id()
    first = result_of(run_upload(path, server.url, "--file-id", file_id, "--chunk-size", "32K"))
    stored = metric(server, "m1_chunks_stored_total")
    assert first["chunksSent"] == stored == chunk_count(len(sample_webm), 32 << 10)

    done = run_upload(path, server.url, "--file-id", file_id, "--chunk-size", "32K", "--quiet")
    again = result_of(done)
    assert again["chunksSent"] == 0 and again["alreadyComplete"] is True
    assert done.stderr == ""                               # --quiet
    assert metric(server, "m1_chunks_stored_total") == stored
    assert metric(server, "m1_chunks_duplicate_total") == 0
    assert_byte_exact(server, again, sample_webm)


def test_without_file_id_a_rerun_finds_the_same_upload(server, tmp_path, sample_webm):
    path = write(tmp_path / "camera one.webm", sample_webm)
    first = result_of(run_upload(path, server.url, "--quiet"))
    assert re.match(r"[A-Za-z0-9_-]{1,128}\Z", first["fileId"]), first
    again = result_of(run_upload(path, server.url, "--quiet"))
    assert again["fileId"] == first["fileId"] and again["alreadyComplete"] is True
    assert_byte_exact(server, again, sample_webm)


def test_an_mp4_is_stored_as_mp4_from_its_file_name(server, tmp_path, sample_mp4):
    path = write(tmp_path / "safari.mp4", sample_mp4)
    result = result_of(run_upload(path, server.url, "--chunk-size", "100K", "--quiet"))
    status = assert_byte_exact(server, result, sample_mp4, ext="mp4")
    assert status["mimeType"] == "video/mp4"


def test_a_size_that_is_a_multiple_of_the_chunk_size_needs_no_empty_chunk(
        server, tmp_path, sample_webm):
    data = sample_webm[:4 * 16384]
    path = write(tmp_path / "even.webm", data)
    result = result_of(run_upload(path, server.url, "--chunk-size", "16K", "--quiet"))
    assert result["chunksSent"] == 4
    assert assert_byte_exact(server, result, data)["totalChunks"] == 4


# --- interruptions -----------------------------------------------------------------------------

def test_an_interrupted_upload_resumes_without_resending_acknowledged_chunks(
        server_factory, tmp_path, sample_webm):
    path = write(tmp_path / "sample.webm", sample_webm)
    file_id = new_id("resume")
    total = chunk_count(len(sample_webm), 16 << 10)
    srv = server_factory(start=False)
    srv.start(extra_env={"M1_TEST_CRASH_AT": "streamed:4"})   # dies writing chunk 3 in place

    done = run_upload(path, srv.url, "--file-id", file_id, "--chunk-size", "16K",
                      "--retries", "1")
    assert_failed_clearly(done, "POST /api/video/upload")
    assert [line for line in done.stderr.splitlines() if "acknowledged" in line] == [
        "chunk %d acknowledged: %d/%d bytes" % (i, (i + 1) * 16384, len(sample_webm))
        for i in range(3)]
    wait_until(lambda: not srv.alive(), message="the crashed server to exit")
    assert srv.proc.returncode == CRASH_EXIT_CODE

    srv.restart()                                   # same port and folder, no crash hook
    resume_at = status_of(srv, file_id)["nextChunkIndex"]
    assert resume_at == 3                           # chunk 3 was never acknowledged
    done = run_upload(path, srv.url, "--file-id", file_id, "--chunk-size", "16K")
    result = result_of(done)
    assert result["chunksSent"] == total - resume_at
    assert "resuming at byte %d" % (resume_at * 16384) in done.stderr
    assert_byte_exact(srv, result, sample_webm)
    assert metric(srv, "m1_chunks_duplicate_total") == 0          # nothing sent twice
    assert metric(srv, "m1_chunks_stored_total") == total - resume_at


def test_the_uploader_retries_through_a_server_kill_and_restart(server, tmp_path, sample_webm):
    path = write(tmp_path / "sample.webm", sample_webm)
    file_id = new_id("retry")
    uploader = subprocess.Popen(
        upload_command(path, server.url, "--file-id", file_id, "--chunk-size", "2K",
                       "--retries", "20"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(), cwd=ROOT)
    progress = LineReader(uploader.stderr)
    try:
        wait_until(lambda: any(line.startswith("chunk 3 acknowledged")
                               for line in progress.snapshot()),
                   timeout=30, message="the uploader to report chunk 3")
        server.kill()                                   # kill -9 mid-upload
        assert uploader.poll() is None, "the uploader finished before the kill:\n" + \
            progress.text()
        seen = len(progress.snapshot())
        wait_until(lambda: any(line.startswith("retrying")
                               for line in progress.snapshot()[seen:]),
                   timeout=30, message="the uploader to retry against the dead server")
        server.start(port=server.port)                  # same port and folder
        out, _ = uploader.communicate(timeout=UPLOAD_TIMEOUT_S)
    finally:
        kill_running(uploader)
    err = progress.text()
    done = subprocess.CompletedProcess(uploader.args, uploader.returncode,
                                       out.decode("utf-8"), err)
    result = result_of(done)
    assert result["chunksSent"] >= chunk_count(len(sample_webm), 2048) - 4
    assert_byte_exact(server, result, sample_webm)
    assert "Traceback" not in err


# --- --follow: a file another process is still writing ------------------------------------------

def test_follow_uploads_a_file_while_another_process_writes_it(server, tmp_path, sample_webm):
    result, writing, err = follow_upload(server, tmp_path, sample_webm, "16K", piece=7000,
                                         pause=0.1, first=7000)
    assert writing, "the uploader must start while the writer still writes"
    assert result["chunksSent"] == chunk_count(len(sample_webm), 16 << 10)
    assert_byte_exact(server, result, sample_webm)


def test_follow_with_a_size_multiple_of_the_chunk_size_ends_with_an_empty_last_chunk(
        server, tmp_path, sample_webm):
    data = sample_webm[:4 * 16384]
    result, writing, err = follow_upload(server, tmp_path, data, "16K", piece=8192,
                                         pause=0.1, first=8192)
    assert writing
    assert result["chunksSent"] == 5                # 4 full chunks, then an empty last one
    status = assert_byte_exact(server, result, data)
    assert status["totalChunks"] == 5 and status["chunksReceived"] == 5


# --- failures: exit 1 with a clear message -------------------------------------------------------

def test_an_unreachable_server_fails_with_a_clear_message(tmp_path, sample_webm):
    path = write(tmp_path / "sample.webm", sample_webm)
    done = run_upload(path, "http://127.0.0.1:%d" % free_port(), "--retries", "1")
    assert_failed_clearly(done, "GET /api/video/status/", "refused")


def test_a_file_that_is_not_a_video_is_refused_with_415(server, tmp_path):
    path = write(tmp_path / "notes.txt", b"these are meeting notes, not a video\n" * 50)
    file_id = new_id("text")
    done = run_upload(path, server.url, "--file-id", file_id, "--retries", "3")
    assert_failed_clearly(done, "415", "unsupported_media_type")
    assert "retrying" not in done.stderr                  # a 415 is final
    assert status_of(server, file_id)["exists"] is False


def test_a_chunk_size_over_the_servers_limit_is_refused_with_413(server_factory, tmp_path,
                                                                sample_webm):
    srv = server_factory(args=["--max-chunk-size", "64K"])
    path = write(tmp_path / "sample.webm", sample_webm)
    file_id = new_id("big")
    done = run_upload(path, srv.url, "--file-id", file_id, "--chunk-size", "128K",
                      "--retries", "3")
    assert_failed_clearly(done, "413", "chunk_too_large")
    assert "retrying" not in done.stderr
    assert status_of(srv, file_id)["exists"] is False


def test_a_chunk_far_over_the_servers_limit_reports_the_413(server_factory, tmp_path):
    srv = server_factory(args=["--max-chunk-size", "64K"])
    path = write(tmp_path / "long.webm", EBML + bytes(24 << 20))
    done = run_upload(path, srv.url, "--chunk-size", "24M", "--retries", "2")
    assert_failed_clearly(done, "413")
    assert "retrying" not in done.stderr


def test_a_file_that_grew_after_its_upload_completed_is_reported_as_changed(
        server, tmp_path, sample_webm):
    path = write(tmp_path / "sample.webm", sample_webm)
    file_id = new_id("grown")
    result_of(run_upload(path, server.url, "--file-id", file_id, "--quiet"))
    with open(path, "ab") as f:
        f.write(b"more bytes")
    done = run_upload(path, server.url, "--file-id", file_id)
    assert_failed_clearly(done, "changed")
    assert_byte_exact(server, {"fileId": file_id, "fileSize": len(sample_webm),
                               "url": "%s/uploads/%s.webm" % (server.url, file_id)},
                      sample_webm)


def test_a_file_changed_in_place_after_its_upload_is_reported_as_changed(
        server, tmp_path, sample_webm):
    path = write(tmp_path / "sample.webm", sample_webm)
    file_id = new_id("edited")
    result_of(run_upload(path, server.url, "--file-id", file_id, "--quiet"))
    wait_until(lambda: status_of(server, file_id).get("sha256"), message="the sha256")
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"EDIT")
    done = run_upload(path, server.url, "--file-id", file_id)
    assert_failed_clearly(done, "changed")


def test_resuming_with_another_chunk_size_never_completes_a_corrupt_upload(
        server_factory, tmp_path, sample_webm):
    path = write(tmp_path / "sample.webm", sample_webm)
    file_id = new_id("sizes")
    srv = server_factory(start=False)
    srv.start(extra_env={"M1_TEST_CRASH_AT": "streamed:5"})     # dies writing chunk 4
    done = run_upload(path, srv.url, "--file-id", file_id, "--chunk-size", "10000",
                      "--retries", "1")
    assert done.returncode == 1
    wait_until(lambda: not srv.alive(), message="the crashed server to exit")
    srv.restart()
    assert status_of(srv, file_id)["fileSize"] == 40000
    run_upload(path, srv.url, "--file-id", file_id, "--chunk-size", "20000")
    status = status_of(srv, file_id)
    if status["state"] == "completed":
        assert requests.get(srv.url + status["url"], timeout=30).content == sample_webm
    assert status["state"] == "completed"


def test_a_missing_file_fails_with_a_clear_message(server, tmp_path):
    done = run_upload(tmp_path / "nowhere.webm", server.url)
    assert done.returncode != 0
    assert "nowhere.webm" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("file_id", ["bad id", "dot.ted", "x" * 129, "semi;colon"])
def test_an_invalid_file_id_fails_before_anything_is_sent(server, tmp_path, sample_webm,
                                                         file_id):
    path = write(tmp_path / "sample.webm", sample_webm)
    done = run_upload(path, server.url, "--file-id", file_id)
    assert_failed_clearly(done, "--file-id")
    assert "/api/video" not in server.log()


class FakeServer:
    """Answers every request with the same raw bytes, then closes (not an m1server)."""

    def __init__(self, reply):
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(65536)
                    if not data:
                        break
                    head += data
                conn.sendall(self.reply)

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("reply", [
    b"NONSENSE\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"su",
], ids=["bad-status-line", "truncated-body"])
def test_a_broken_reply_is_retried_and_reported_without_a_traceback(tmp_path, sample_webm,
                                                                     reply):
    fake = FakeServer(reply)
    try:
        path = write(tmp_path / "sample.webm", sample_webm)
        done = run_upload(path, fake.url, "--retries", "2")
    finally:
        fake.close()
    assert_failed_clearly(done, "GET /api/video/status/")
