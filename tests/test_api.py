"""Black-box tests of the seed upload API (SPEC §1) and the limits and flags of SPEC §8.

Each test starts its own m1server on a free port with its own upload directory and talks to it
over HTTP exactly as a client would. Stored bytes are checked only where the contract names
them (uploads/<fileId>.<ext>, uploads/temp/<fileId>/), through `srv.storage` (conftest), which
reads the bucket instead when the suite runs in S3 mode (M1_TEST_STORAGE=s3, `make test-s3`).
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import _http
from conftest import (SERVER_PROGRAM, SERVER_PYTHON, STORAGE, get_status, metric, send_chunk,
                      split_chunks, wait_until)

ISO_MILLIS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SUCCESS_MESSAGE = "Video chunk uploaded successfully"
CONTRACT_FLAGS = ("--host", "--port", "--dir", "--max-chunk-size", "--max-upload-size",
                  "--max-parts", "--timeout", "--max-connections", "--min-free-disk",
                  "--allow-any-content", "--version")


# --- helpers --------------------------------------------------------------------------------

def sha256(data):
    return hashlib.sha256(data).hexdigest()


def new_id(tag="t"):
    return "upload_%s_%s" % (tag, os.urandom(6).hex())


def stored_media(srv, file_id, ext="webm"):
    """The assembled file as stored (local: uploads/<id>.<ext>; S3: the completed object),
    or None."""
    return srv.storage.media(file_id, ext)


def ok_data(response):
    """Assert a 200 success envelope and return its data."""
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["success"] is True, body
    return body["data"]


def assert_error(response, status, code):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()
    assert body["success"] is False, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text


def assert_raw_error(response, status, code):
    assert response.status == status, response
    assert (response.header("content-type") or "").startswith("application/json"), response
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == code, body


def upload_all(session, srv, file_id, chunks, mime_type=None):
    """Send chunks in order, the last one with status completed; return the last data."""
    data = None
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        data = ok_data(send_chunk(session, srv.url, file_id, index, chunk,
                                  status="completed" if last else "uploading",
                                  mime_type=mime_type))
    return data


def status_data(session, srv, file_id):
    return ok_data(get_status(session, srv.url, file_id))


def wait_for_sha256(session, srv, file_id):
    def digest():
        value = status_data(session, srv, file_id).get("sha256")
        return value and value.lower().replace("sha256:", "")
    return wait_until(digest, timeout=15, message="sha256 in the status of " + file_id)


def temp_dir_empty(srv, file_id):
    """No chunk waits for earlier ones (local: uploads/temp/<id>/; S3: chunk objects)."""
    return not srv.storage.early_chunks(file_id)


def assert_assembled(session, srv, file_id, expected, ext="webm"):
    """The assembled file equals `expected` on disk, over HTTP and in the status."""
    assert stored_media(srv, file_id, ext) == expected
    served = session.get("%s/uploads/%s.%s" % (srv.url, file_id, ext), timeout=30)
    assert served.status_code == 200
    assert served.content == expected
    status = status_data(session, srv, file_id)
    assert status["exists"] is True
    assert status["fileSize"] == len(expected)
    assert status.get("state") == "completed", status
    assert wait_for_sha256(session, srv, file_id) == sha256(expected)
    assert temp_dir_empty(srv, file_id)


def run_server_cli(*args, env=None):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([SERVER_PYTHON, SERVER_PROGRAM] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=30, env=full_env)


# --- seed shapes ----------------------------------------------------------------------------

def test_first_chunk_answers_the_seed_success_envelope(server, session, sample_webm):
    file_id = new_id("shape")
    response = send_chunk(session, server.url, file_id, 0, sample_webm[:4096])
    data = ok_data(response)
    assert response.json()["success"] is True
    assert data["message"] == SUCCESS_MESSAGE
    assert data["fileId"] == file_id
    assert type(data["chunkIndex"]) is int and data["chunkIndex"] == 0
    assert data["status"] == "uploading"
    assert data["bytesReceived"] == 4096
    assert data["nextChunkIndex"] == 1
    assert "duplicate" not in data or data["duplicate"] is False


def test_last_chunk_answers_status_completed(server, session, sample_webm):
    file_id = new_id("done")
    chunks = split_chunks(sample_webm, 2)
    first = ok_data(send_chunk(session, server.url, file_id, 0, chunks[0]))
    assert first["status"] == "uploading"
    last = ok_data(send_chunk(session, server.url, file_id, 1, chunks[1], status="completed"))
    assert last["status"] == "completed"
    assert type(last["chunkIndex"]) is int and last["chunkIndex"] == 1
    assert last["message"] == SUCCESS_MESSAGE
    assert last["bytesReceived"] == len(sample_webm)


def test_status_of_an_existing_upload_has_the_seed_keys(server, session, sample_webm):
    file_id = new_id("status")
    ok_data(send_chunk(session, server.url, file_id, 0, sample_webm[:5000]))
    response = get_status(session, server.url, file_id)
    data = ok_data(response)
    assert data["fileId"] == file_id
    assert data["exists"] is True
    assert type(data["fileSize"]) is int and data["fileSize"] == 5000
    assert ISO_MILLIS_Z.match(data["lastModified"]), data["lastModified"]
    assert data["state"] == "uploading"
    assert data["nextChunkIndex"] == 1


def test_status_of_an_unknown_valid_id_is_200_with_exists_false(server, session):
    data = ok_data(get_status(session, server.url, "never_uploaded_42"))
    assert data["fileId"] == "never_uploaded_42"
    assert data["exists"] is False


def test_healthz_answers_ok(server, session):
    response = session.get(server.url + "/healthz", timeout=10)
    assert ok_data(response)["status"] == "ok"


# --- assembly -------------------------------------------------------------------------------

def test_webm_in_order_grows_while_uploading_and_assembles_byte_exact(server, session,
                                                                      sample_webm):
    file_id = new_id("webm")
    chunks = split_chunks(sample_webm, 8)
    appended = 0
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        data = ok_data(send_chunk(session, server.url, file_id, index, chunk,
                                  status="completed" if last else "uploading"))
        appended += len(chunk)
        assert data["chunkIndex"] == index
        assert data["status"] == ("completed" if last else "uploading")
        assert data["bytesReceived"] == appended
        if server.storage.grows_in_place:
            assert len(stored_media(server, file_id)) == appended, \
                "file must grow as chunks arrive in order"
        assert temp_dir_empty(server, file_id), "an in-order chunk must not stay in temp/"
    assert_assembled(session, server, file_id, sample_webm)


def test_mp4_with_mime_type_assembles_an_mp4_file(server, session, sample_mp4):
    file_id = new_id("mp4")
    data = upload_all(session, server, file_id, split_chunks(sample_mp4, 6),
                      mime_type="video/mp4")
    assert data["status"] == "completed"
    assert_assembled(session, server, file_id, sample_mp4, ext="mp4")
    assert stored_media(server, file_id, "webm") is None


def test_mime_type_with_codecs_parameter_picks_webm(server, session, sample_webm):
    file_id = new_id("codecs")
    upload_all(session, server, file_id, split_chunks(sample_webm, 3),
               mime_type="video/webm;codecs=vp9,opus")
    assert_assembled(session, server, file_id, sample_webm)


def test_shuffled_chunks_sent_twice_assemble_once(server, session, sample_webm):
    file_id = new_id("shuffle")
    chunks = split_chunks(sample_webm, 8)
    last = len(chunks) - 1
    order = list(range(len(chunks))) * 2
    random.Random(1234).shuffle(order)
    seen = set()
    for index in order:
        response = send_chunk(session, server.url, file_id, index, chunks[index],
                              status="completed" if index == last else "uploading")
        data = ok_data(response)
        assert data["chunkIndex"] == index
        if index in seen:
            assert data.get("duplicate") is True, data
        else:
            assert not data.get("duplicate"), data
            seen.add(index)
    assert data["status"] == "completed"
    assert_assembled(session, server, file_id, sample_webm)


def test_same_index_with_other_bytes_is_a_conflict(server, session, sample_webm):
    file_id = new_id("conflict")
    chunks = split_chunks(sample_webm, 6)
    ok_data(send_chunk(session, server.url, file_id, 0, chunks[0]))
    ok_data(send_chunk(session, server.url, file_id, 1, chunks[1]))
    ok_data(send_chunk(session, server.url, file_id, 4, chunks[4]))       # waits in temp/
    before_file = stored_media(server, file_id)
    before_status = status_data(session, server, file_id)

    other = bytes(b ^ 0xFF for b in chunks[1])
    assert_error(send_chunk(session, server.url, file_id, 1, other), 409, "chunk_conflict")
    assert_error(send_chunk(session, server.url, file_id, 1, chunks[1] + b"x"), 409,
                 "chunk_conflict")
    assert_error(send_chunk(session, server.url, file_id, 4, chunks[4][:-1]), 409,
                 "chunk_conflict")

    assert stored_media(server, file_id) == before_file
    after_status = status_data(session, server, file_id)
    for key in ("fileSize", "nextChunkIndex", "state", "chunksReceived"):
        assert after_status.get(key) == before_status.get(key), key
    # the original bytes still complete the upload
    for index in (2, 3, 5):
        ok_data(send_chunk(session, server.url, file_id, index, chunks[index],
                           status="completed" if index == 5 else "uploading"))
    assert_assembled(session, server, file_id, sample_webm)


def test_completed_with_a_gap_stays_uploading_until_the_gap_is_filled(server, session,
                                                                      sample_webm):
    file_id = new_id("gap")
    chunks = split_chunks(sample_webm, 5)
    for index in (0, 1, 3):
        ok_data(send_chunk(session, server.url, file_id, index, chunks[index]))
    data = ok_data(send_chunk(session, server.url, file_id, 4, chunks[4], status="completed"))
    assert data["status"] == "uploading"
    assert data["missingChunks"] == [2]
    assert data["nextChunkIndex"] == 2

    status = status_data(session, server, file_id)
    assert status["state"] == "uploading"
    assert status["missingChunks"] == [2]
    assert status["nextChunkIndex"] == 2
    assert status["totalChunks"] == 5
    assert status["fileSize"] == len(chunks[0]) + len(chunks[1])
    assert "sha256" not in status or status["sha256"] is None

    data = ok_data(send_chunk(session, server.url, file_id, 2, chunks[2]))
    assert data["status"] == "completed"
    assert not data.get("missingChunks")
    assert_assembled(session, server, file_id, sample_webm)


def test_empty_chunk_in_the_middle_is_accepted(server, session, sample_webm):
    file_id = new_id("empty")
    chunks = split_chunks(sample_webm, 4)
    chunks.insert(2, b"")
    data = upload_all(session, server, file_id, chunks)
    assert data["status"] == "completed"
    assert_assembled(session, server, file_id, sample_webm)


# --- checksum field -------------------------------------------------------------------------

def test_correct_checksum_is_accepted(server, session, sample_webm):
    file_id = new_id("sum")
    chunk = sample_webm[:3000]
    ok_data(send_chunk(session, server.url, file_id, 0, chunk,
                       checksum="sha256:" + sha256(chunk)))
    ok_data(send_chunk(session, server.url, file_id, 1, sample_webm[3000:], status="completed",
                       checksum="sha256:" + sha256(sample_webm[3000:]).upper()))
    assert_assembled(session, server, file_id, sample_webm)


def test_wrong_checksum_is_refused_and_nothing_is_stored(server, session, sample_webm):
    file_id = new_id("badsum")
    chunk = sample_webm[:3000]
    wrong = "sha256:" + sha256(chunk + b"!")
    assert_error(send_chunk(session, server.url, file_id, 0, chunk, checksum=wrong), 400,
                 "checksum_mismatch")
    assert status_data(session, server, file_id)["exists"] is False
    assert stored_media(server, file_id) is None
    assert temp_dir_empty(server, file_id)
    # an early chunk with a wrong checksum is not stashed either
    assert_error(send_chunk(session, server.url, file_id, 3, b"abc",
                            checksum="sha256:" + sha256(b"abd")), 400, "checksum_mismatch")
    assert temp_dir_empty(server, file_id)
    # the same chunk with the right checksum is then a first arrival, not a duplicate
    data = ok_data(send_chunk(session, server.url, file_id, 0, chunk,
                              checksum="sha256:" + sha256(chunk)))
    assert not data.get("duplicate")
    if server.storage.grows_in_place:
        assert stored_media(server, file_id) == chunk


@pytest.mark.parametrize("checksum", [
    "abc", "sha256:", "sha256:xyz", "sha256:" + "0" * 63, "sha256:" + "0" * 65,
    "sha256:" + "g" * 64, "md5:" + "0" * 32, "0" * 64, "sha256: " + "0" * 64,
])
def test_malformed_checksum_is_invalid_checksum(server, session, sample_webm, checksum):
    file_id = new_id("malsum")
    assert_error(send_chunk(session, server.url, file_id, 0, sample_webm[:100],
                            checksum=checksum), 400, "invalid_checksum")
    assert status_data(session, server, file_id)["exists"] is False


# --- concurrency ----------------------------------------------------------------------------

def test_concurrent_duplicate_sends_across_uploads_store_each_chunk_once(server, sample_webm):
    uploads = [new_id("conc%d" % n) for n in range(8)]
    chunks = split_chunks(sample_webm, 8)
    last = len(chunks) - 1
    local = threading.local()
    results = {}                       # (file_id, index) -> list of data dicts
    results_lock = threading.Lock()

    def send(file_id, index):
        if not hasattr(local, "session"):
            local.session = requests.Session()
        response = send_chunk(local.session, server.url, file_id, index, chunks[index],
                              status="completed" if index == last else "uploading")
        data = ok_data(response)
        with results_lock:
            results.setdefault((file_id, index), []).append(data)

    def upload(file_id, seed):
        order = list(range(len(chunks)))
        random.Random(seed).shuffle(order)
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(send, file_id, index) for index in order for _ in range(3)]
            for future in futures:
                future.result()

    with ThreadPoolExecutor(max_workers=len(uploads)) as outer:
        for future in [outer.submit(upload, file_id, n) for n, file_id in enumerate(uploads)]:
            future.result()

    with requests.Session() as session:
        for file_id in uploads:
            for index in range(len(chunks)):
                answers = results[(file_id, index)]
                assert len(answers) == 3
                firsts = [a for a in answers if not a.get("duplicate")]
                assert len(firsts) == 1, (file_id, index, answers)
            assert_assembled(session, server, file_id, sample_webm)


def test_a_stalled_chunk_of_one_upload_does_not_block_other_uploads(server, session,
                                                                    sample_webm):
    stalled_id, other_id = new_id("stalled"), new_id("free")
    chunks = split_chunks(sample_webm, 4)
    request = _http.upload_request(_http.chunk_parts(stalled_id, 1, chunks[1]), close=True)
    half = len(request) - len(chunks[1]) // 2 - 200
    sock = _http.connect(server.url, timeout=20)
    try:
        sock.sendall(request[:half])
        # while that body is stalled: the same upload's chunk 0 and a whole other upload go on
        ok_data(send_chunk(session, server.url, stalled_id, 0, chunks[0], timeout=10))
        upload_all(session, server, other_id, chunks)
        assert_assembled(session, server, other_id, sample_webm)
        sock.sendall(request[half:])
        response = _http.read_response(sock, timeout=20)
    finally:
        sock.close()
    assert response.status == 200, response
    assert response.json()["data"]["chunkIndex"] == 1
    for index in (2, 3):
        ok_data(send_chunk(session, server.url, stalled_id, index, chunks[index],
                           status="completed" if index == 3 else "uploading"))
    assert_assembled(session, server, stalled_id, sample_webm)


def test_two_uploads_interleaved_from_threads_both_finish(server, sample_webm, sample_mp4):
    barrier = threading.Barrier(2, timeout=30)
    webm_id, mp4_id = new_id("il_webm"), new_id("il_mp4")

    def run(file_id, media, mime_type):
        with requests.Session() as session:
            chunks = split_chunks(media, 10)
            for index, chunk in enumerate(chunks):
                barrier.wait()
                last = index == len(chunks) - 1
                ok_data(send_chunk(session, server.url, file_id, index, chunk,
                                   status="completed" if last else "uploading",
                                   mime_type=mime_type))

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(run, webm_id, sample_webm, None),
                   pool.submit(run, mp4_id, sample_mp4, "video/mp4")]
        for future in futures:
            future.result()
    with requests.Session() as session:
        assert_assembled(session, server, webm_id, sample_webm)
        assert_assembled(session, server, mp4_id, sample_mp4, ext="mp4")


# --- one write: in-order chunks whose text fields come first (local disk) --------------------

in_place_only = pytest.mark.skipif(STORAGE != "local", reason="chunks are written in place, "
                                   "straight into the video file, on local disk only")


def video_path(srv, file_id, ext="webm"):
    return os.path.join(srv.upload_dir, "%s.%s" % (file_id, ext))


def in_place_upload(srv, file_id, size=4000):
    """Chunk 0 of a new upload (it creates the upload), and the raw request of chunk 1 with
    its text fields before its `size`-byte file part."""
    first = b"\x1a\x45\xdf\xa3" + os.urandom(996)
    with requests.Session() as session:
        ok_data(send_chunk(session, srv.url, file_id, 0, first))
    chunk = os.urandom(size)
    parts = [("fileId", file_id), ("chunkIndex", "1"), ("status", "completed"),
             ("file", chunk, "blob", "application/octet-stream")]
    return first, chunk, _http.upload_request(parts)


@in_place_only
def test_in_order_chunks_are_written_in_place_when_their_fields_come_first(server):
    chunks = [b"\x1a\x45\xdf\xa3" + os.urandom(30000)] + [os.urandom(30000) for _ in range(4)]
    for file_first, expected in ((False, 5), (True, 0)):     # chunk 0 too: a new upload
        file_id = new_id("order")
        before = metric(server, "m1_chunks_in_place_total")
        with requests.Session() as session:
            for index, chunk in enumerate(chunks):
                ok_data(send_chunk(session, server.url, file_id, index, chunk,
                                   status="completed" if index == 4 else "uploading",
                                   file_first=file_first))
        assert metric(server, "m1_chunks_in_place_total") - before == expected, file_first
        assert stored_media(server, file_id) == b"".join(chunks)


@pytest.mark.parametrize("value", ["1", "0"])
def test_upload_state_cache_flag_at_and_past_its_limit(server_factory, value):
    """One upload in memory (the least): interleaved uploads still assemble right, each one
    read from the ledger again; none is refused at start."""
    srv = server_factory(args=["--upload-state-cache", value], start=False)
    if value == "0":
        with pytest.raises(RuntimeError):
            srv.start()
        assert srv.proc.returncode == 2 and "upload-state-cache" in srv.log(), srv.log()
        return
    srv.start()
    uploads = {new_id("cache"): [b"\x1a\x45\xdf\xa3" + os.urandom(500), os.urandom(500),
                                 os.urandom(500)] for _ in range(3)}
    with requests.Session() as session:
        for index in range(3):
            for file_id, chunks in uploads.items():       # each one pushes the last out
                ok_data(send_chunk(session, srv.url, file_id, index, chunks[index],
                                   status="completed" if index == 2 else "uploading"))
        for file_id, chunks in uploads.items():
            assert ok_data(get_status(session, srv.url, file_id))["state"] == "completed"
            assert stored_media(srv, file_id) == b"".join(chunks)


@in_place_only
def test_a_twin_of_a_chunk_being_written_in_place_waits_then_is_a_duplicate(server):
    file_id = new_id("twin")
    first, chunk, request = in_place_upload(server, file_id, size=1 << 20)
    half = request.index(b"\r\n\r\n") + 4 + len(request) // 2
    incoming = os.path.join(server.upload_dir, "temp", ".incoming")
    sock = _http.connect(server.url)
    answers = []
    try:
        sock.sendall(request[:half])
        wait_until(lambda: os.path.getsize(video_path(server, file_id)) > len(first),
                   message="chunk 1's bytes in the video")
        twin = threading.Thread(target=lambda: answers.append(requests.post(
            server.url + "/api/video/upload", data=request.split(b"\r\n\r\n", 1)[1],
            headers=dict(_http.multipart_headers()), timeout=30)))
        twin.start()
        # the twin is received into a part file (the tail is taken), then waits for it
        wait_until(lambda: [n for n in os.listdir(incoming)
                            if os.path.getsize(os.path.join(incoming, n)) >= len(chunk)],
                   message="the twin received whole, waiting")
        assert not answers
        sock.sendall(request[half:])
        first_answer = _http.read_response(sock)
    finally:
        sock.close()
    twin.join(30)
    assert first_answer.status == 200, first_answer
    assert first_answer.json()["data"].get("duplicate") is None
    twin_data = ok_data(answers[0])
    assert twin_data["duplicate"] is True and twin_data["status"] == "completed"
    assert stored_media(server, file_id) == first + chunk


@in_place_only
def test_a_field_after_the_file_part_takes_the_part_file_path(server):
    """The chunk was reserved with the fields before it; a checksum after the file part
    changes what the chunk is, so it is decided as any part file (never trusted unchecked)."""
    file_id = new_id("late")
    first, chunk, _ = in_place_upload(server, file_id)
    before = metric(server, "m1_chunks_in_place_total")
    for checksum, status in (("sha256:" + "0" * 64, 400), ("sha256:" + sha256(chunk), 200)):
        parts = [("fileId", file_id), ("chunkIndex", "1"), ("status", "completed"),
                 ("file", chunk, "blob", "application/octet-stream"), ("checksum", checksum)]
        response = _http.exchange(server.url, _http.upload_request(parts))
        assert response.status == status, response
        if status == 400:
            assert response.json()["error"]["code"] == "checksum_mismatch"
            assert open(video_path(server, file_id), "rb").read() == first
    assert metric(server, "m1_chunks_in_place_total") == before
    assert stored_media(server, file_id) == first + chunk
    assert os.listdir(os.path.join(server.upload_dir, "temp", ".incoming")) == []


@in_place_only
def test_a_client_that_leaves_mid_chunk_leaves_no_bytes_and_frees_the_tail(server):
    file_id = new_id("gone")
    first, chunk, request = in_place_upload(server, file_id, size=1 << 20)
    sock = _http.connect(server.url)
    try:
        sock.sendall(request[:len(request) // 2])
        wait_until(lambda: os.path.getsize(video_path(server, file_id)) > len(first),
                   message="chunk 1's bytes in the video")
    finally:
        sock.close()                                      # gone, mid-body
    wait_until(lambda: os.path.getsize(video_path(server, file_id)) == len(first),
               message="the bytes cut off again")
    response = _http.exchange(server.url, request)
    assert response.status == 200 and response.json()["data"]["status"] == "completed"
    assert stored_media(server, file_id) == first + chunk


@in_place_only
def test_chunk_zero_written_in_place_must_start_with_a_media_signature(server):
    file_id = new_id("sig")
    with requests.Session() as session:
        ok_data(send_chunk(session, server.url, file_id, 1, b"later", status="completed"))
        assert_error(send_chunk(session, server.url, file_id, 0, b"NOT A VIDEO, NO EBML"),
                     415, "unsupported_media_type")
        assert os.path.getsize(video_path(server, file_id)) == 0
        done = ok_data(send_chunk(session, server.url, file_id, 0, b"\x1a\x45\xdf\xa3 ok"))
    assert done["status"] == "completed"
    assert stored_media(server, file_id) == b"\x1a\x45\xdf\xa3 ok" + b"later"


# --- shutdown -------------------------------------------------------------------------------

def test_sigterm_during_uploads_exits_0_and_keeps_acknowledged_chunks(server_factory,
                                                                      sample_webm):
    srv = server_factory()
    file_id = new_id("sigterm")
    media = sample_webm * 6
    chunks = split_chunks(media, 48)
    acknowledged = []
    failures = []
    started = threading.Event()

    def uploader():
        with requests.Session() as session:
            for index, chunk in enumerate(chunks):
                try:
                    response = send_chunk(session, srv.url, file_id, index, chunk, timeout=20)
                except requests.RequestException:
                    return                            # the server has gone: stop sending
                if response.status_code == 200:
                    acknowledged.append(index)
                    if index >= 3:
                        started.set()
                elif response.status_code == 503:
                    return
                else:
                    failures.append((index, response.status_code, response.text))
                    return

    thread = threading.Thread(target=uploader, daemon=True)
    thread.start()
    assert started.wait(30), "uploads did not start:\n" + srv.log()
    code = srv.stop(timeout=20)
    thread.join(30)
    assert code == 0, srv.log()
    assert not failures, failures
    assert acknowledged == list(range(len(acknowledged)))

    srv.restart()
    with requests.Session() as session:
        status = status_data(session, srv, file_id)
    kept = status["nextChunkIndex"]
    assert kept >= len(acknowledged), (status, len(acknowledged))
    expected = b"".join(chunks[:kept])
    assert status["fileSize"] == len(expected)
    if srv.storage.grows_in_place:
        assert stored_media(srv, file_id) == expected
    with requests.Session() as session:       # the rest completes it, byte-exact
        for index in range(kept, len(chunks)):
            ok_data(send_chunk(session, srv.url, file_id, index, chunks[index],
                               status="completed" if index == len(chunks) - 1 else "uploading"))
        assert_assembled(session, srv, file_id, media)


# --- limits ---------------------------------------------------------------------------------

def test_max_chunk_size_accepts_exactly_the_limit_and_refuses_one_byte_more(server_factory,
                                                                             sample_webm):
    srv = server_factory(args=["--max-chunk-size", "1K"])
    file_id = new_id("chunklim")
    with requests.Session() as session:
        ok_data(send_chunk(session, srv.url, file_id, 0, sample_webm[:1024]))
        assert_error(send_chunk(session, srv.url, file_id, 1, sample_webm[1024:2049]), 413,
                     "chunk_too_large")
        status = status_data(session, srv, file_id)
        assert status["fileSize"] == 1024 and status["nextChunkIndex"] == 1
        assert temp_dir_empty(srv, file_id)
        ok_data(send_chunk(session, srv.url, file_id, 1, sample_webm[1024:2048],
                           status="completed"))
        assert stored_media(srv, file_id) == sample_webm[:2048]


def test_max_chunk_size_env_twin(server_factory, sample_webm):
    srv = server_factory(env={"M1_MAX_CHUNK_SIZE": "1K"})
    file_id = new_id("envlim")
    with requests.Session() as session:
        assert_error(send_chunk(session, srv.url, file_id, 0, sample_webm[:2048]), 413,
                     "chunk_too_large")
        ok_data(send_chunk(session, srv.url, file_id, 0, sample_webm[:1024]))


def test_max_upload_size_accepts_the_limit_and_refuses_past_it(server_factory, sample_webm):
    srv = server_factory(args=["--max-upload-size", "4K"])
    file_id = new_id("uplim")
    with requests.Session() as session:
        ok_data(send_chunk(session, srv.url, file_id, 0, sample_webm[:2048]))
        ok_data(send_chunk(session, srv.url, file_id, 1, sample_webm[2048:4096]))
        assert_error(send_chunk(session, srv.url, file_id, 2, b"x"), 413, "upload_too_large")
        # early chunks count too
        assert_error(send_chunk(session, srv.url, file_id, 5, b"y"), 413, "upload_too_large")
        ok_data(send_chunk(session, srv.url, file_id, 2, b"", status="completed"))
        assert stored_media(srv, file_id) == sample_webm[:4096]
        # the limit is per upload, not per server
        other = new_id("uplim2")
        ok_data(send_chunk(session, srv.url, other, 0, sample_webm[:4096], status="completed"))


def test_max_parts_accepts_n_parts_and_refuses_n_plus_1(server_factory, sample_webm):
    srv = server_factory(args=["--max-parts", "5"])
    file_id = new_id("parts")
    five = _http.chunk_parts(file_id, 0, sample_webm[:500], mime_type="video/webm")
    assert len(five) == 5
    response = _http.exchange(srv.url, _http.upload_request(five))
    assert response.status == 200, response
    six = _http.chunk_parts(file_id, 1, b"abc", mime_type="video/webm") + [("note", "x")]
    assert_raw_error(_http.exchange(srv.url, _http.upload_request(six)), 413, "too_many_parts")
    with requests.Session() as session:
        assert status_data(session, srv, file_id)["nextChunkIndex"] == 1


def test_max_connections_answers_503_beyond_the_limit_then_recovers(server_factory):
    # one address holds all four (--max-connections-per-client is half otherwise)
    srv = server_factory(args=["--max-connections", "4", "--max-connections-per-client", "4"])
    # the server accepts in arrival order, so these four are taken before the fifth
    idle = [_http.connect(srv.url) for _ in range(4)]
    try:
        response = _http.request(srv.url, "GET", "/healthz")
        assert_raw_error(response, 503, "server_busy")
        for sock in idle[:2]:
            sock.close()

        def served():
            return _http.request(srv.url, "GET", "/healthz").status == 200
        wait_until(served, timeout=15, interval=0.1, message="a slot after closing two")
    finally:
        for sock in idle:
            sock.close()


def test_timeout_cuts_a_stalled_body_and_releases_the_thread(server_factory, sample_webm):
    srv = server_factory(args=["--timeout", "1", "--max-connections", "2",
                               "--max-connections-per-client", "2"])
    request = _http.upload_request(_http.chunk_parts(new_id("slow"), 0, sample_webm[:20000]))
    stalled = [_http.connect(srv.url, timeout=15) for _ in range(2)]
    try:
        for sock in stalled:
            sock.sendall(request[:len(request) // 2])
        for sock in stalled:
            response = _http.read_response(sock, timeout=15)   # raises if never cut off
            if response.status is not None:
                assert_raw_error(response, 408, "request_timeout")
            assert _http.wait_closed(sock, timeout=15) == b""
    finally:
        for sock in stalled:
            sock.close()

    def served():
        return _http.request(srv.url, "GET", "/healthz").status == 200
    wait_until(served, timeout=15, interval=0.1, message="the server serves again")
    file_id = new_id("after")
    with requests.Session() as session:
        ok_data(send_chunk(session, srv.url, file_id, 0, sample_webm[:100]))


def test_min_free_disk_too_high_refuses_with_507_and_writes_nothing(server_factory,
                                                                   sample_webm):
    srv = server_factory(args=["--min-free-disk", "100000G"])
    file_id = new_id("disk")
    with requests.Session() as session:
        assert_error(send_chunk(session, srv.url, file_id, 0, sample_webm[:1000]), 507,
                     "insufficient_storage")
        assert status_data(session, srv, file_id)["exists"] is False
    for directory, _, names in os.walk(srv.upload_dir):
        assert file_id not in directory
        for name in names:
            assert file_id not in name
            assert os.path.basename(directory) != ".incoming", (directory, name)


def test_min_free_disk_zero_accepts(server_factory, sample_webm):
    srv = server_factory(args=["--min-free-disk", "0"])
    with requests.Session() as session:
        file_id = new_id("disk0")
        upload_all(session, srv, file_id, split_chunks(sample_webm, 2))
        assert_assembled(session, srv, file_id, sample_webm)


def test_allow_any_content_accepts_a_chunk_0_without_a_media_signature(server_factory):
    srv = server_factory(args=["--allow-any-content"])
    with requests.Session() as session:
        file_id = new_id("any")
        ok_data(send_chunk(session, srv.url, file_id, 0, b"plain text, not a video",
                           status="completed"))
        assert stored_media(srv, file_id) == b"plain text, not a video"


def test_chunk_0_without_a_media_signature_is_refused_by_default(server, session):
    assert_error(send_chunk(session, server.url, new_id("txt"), 0, b"plain text"), 415,
                 "unsupported_media_type")


# --- command line ---------------------------------------------------------------------------

def test_help_lists_every_flag_of_the_contract():
    result = run_server_cli("--help")
    text = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, text
    missing = [flag for flag in CONTRACT_FLAGS if flag not in text]
    assert not missing, text
    for name in ("M1_PORT", "M1_DIR", "M1_MAX_CHUNK_SIZE"):
        assert name in text, "--help should name the environment twins"


def test_version_prints_a_version():
    result = run_server_cli("--version")
    text = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, text
    assert re.search(r"\d+\.\d+", text), text
    assert "Traceback" not in text


# --- conflicts about the end of an upload and its type --------------------------------------

def test_chunk_beyond_the_last_index_is_a_completion_conflict(server, session, sample_webm):
    file_id = new_id("beyond")
    chunks = split_chunks(sample_webm, 3)
    upload_all(session, server, file_id, chunks)
    assert_error(send_chunk(session, server.url, file_id, 3, b"more"), 409,
                 "completion_conflict")
    # a retry of a chunk it already has is still a plain duplicate
    data = ok_data(send_chunk(session, server.url, file_id, 2, chunks[2], status="completed"))
    assert data.get("duplicate") is True and data["status"] == "completed"
    assert_assembled(session, server, file_id, sample_webm)


def test_a_second_different_last_index_is_a_completion_conflict(server, session, sample_webm):
    file_id = new_id("twolast")
    chunks = split_chunks(sample_webm, 6)
    ok_data(send_chunk(session, server.url, file_id, 0, chunks[0]))
    ok_data(send_chunk(session, server.url, file_id, 3, chunks[3], status="completed"))
    assert_error(send_chunk(session, server.url, file_id, 4, chunks[4], status="completed"),
                 409, "completion_conflict")
    assert_error(send_chunk(session, server.url, file_id, 4, chunks[4]), 409,
                 "completion_conflict")
    assert status_data(session, server, file_id)["missingChunks"] == [1, 2]


def test_completed_below_a_chunk_already_received_is_a_completion_conflict(server, session,
                                                                           sample_webm):
    file_id = new_id("below")
    chunks = split_chunks(sample_webm, 6)
    ok_data(send_chunk(session, server.url, file_id, 0, chunks[0]))
    ok_data(send_chunk(session, server.url, file_id, 5, chunks[5]))
    assert_error(send_chunk(session, server.url, file_id, 3, chunks[3], status="completed"),
                 409, "completion_conflict")
    status = status_data(session, server, file_id)
    assert status["state"] == "uploading" and status["fileSize"] == len(chunks[0])


def test_a_different_mime_type_later_is_a_mime_type_conflict(server, session, sample_mp4):
    file_id = new_id("mimes")
    chunks = split_chunks(sample_mp4, 3)
    ok_data(send_chunk(session, server.url, file_id, 0, chunks[0], mime_type="video/mp4"))
    assert_error(send_chunk(session, server.url, file_id, 1, chunks[1], mime_type="video/webm"),
                 409, "mime_type_conflict")
    ok_data(send_chunk(session, server.url, file_id, 1, chunks[1], mime_type="video/mp4"))
    ok_data(send_chunk(session, server.url, file_id, 2, chunks[2], status="completed"))
    assert_assembled(session, server, file_id, sample_mp4, ext="mp4")


# --- playback -------------------------------------------------------------------------------

def test_assembled_file_is_served_with_ranges_and_its_status_url(server, session, sample_webm):
    file_id = new_id("range")
    upload_all(session, server, file_id, split_chunks(sample_webm, 3))
    url = "%s/uploads/%s.webm" % (server.url, file_id)
    full = session.get(url, timeout=10)
    assert full.status_code == 200 and full.content == sample_webm
    assert full.headers["Content-Type"].startswith("video/webm")
    part = session.get(url, headers={"Range": "bytes=100-199"}, timeout=10)
    assert part.status_code == 206 and part.content == sample_webm[100:200]
    assert part.headers["Content-Range"] == "bytes 100-199/%d" % len(sample_webm)
    tail = session.get(url, headers={"Range": "bytes=-50"}, timeout=10)
    assert tail.status_code == 206 and tail.content == sample_webm[-50:]
    past = session.get(url, headers={"Range": "bytes=%d-" % (len(sample_webm) + 10)},
                       timeout=10)
    assert past.status_code == 416
    play = status_data(session, server, file_id)["url"]
    played = session.get(requests.compat.urljoin(server.url + "/", play), timeout=10)
    assert played.status_code == 200 and played.content == sample_webm


# --- valid multipart bodies in the less common spellings (RFC 7578 / RFC 2046) --------------

VIDEO_HEAD = b"\x1a\x45\xdf\xa3" + bytes(range(256))
BOUNDARY = _http.BOUNDARY
LOOKS_LIKE_A_BOUNDARY = (VIDEO_HEAD + b"\r\n--" + BOUNDARY.encode()[:-1] + b"X--" +
                         BOUNDARY.encode() + b"\r\n--" + BOUNDARY.encode() + b"-\r\n-\r")


def seed_parts(file_id, data=VIDEO_HEAD, file_part=None):
    first = file_part or ("file", data, "blob", "application/octet-stream")
    return [first, ("fileId", file_id), ("chunkIndex", "0"), ("status", "completed")]


@pytest.mark.parametrize("content_type,wrap,file_part,data", [
    ('multipart/form-data; boundary="%s"' % BOUNDARY, None, None, VIDEO_HEAD),
    ("multipart/form-data; boundary=%s; charset=utf-8" % BOUNDARY, None, None, VIDEO_HEAD),
    ("multipart/form-data; charset=utf-8; boundary=%s" % BOUNDARY, None, None, VIDEO_HEAD),
    ("Multipart/Form-Data; BOUNDARY=%s" % BOUNDARY, None, None, VIDEO_HEAD),
    (None, lambda body: b"a preamble\r\n" + body + b"an epilogue\r\n", None, VIDEO_HEAD),
    (None, None, _http.part("file", VIDEO_HEAD, headers=[
        'content-disposition: form-data; name="file"; filename="b"',
        "content-type: video/webm"]), VIDEO_HEAD),
    (None, None, ("file", VIDEO_HEAD), VIDEO_HEAD),
    (None, None, None, LOOKS_LIKE_A_BOUNDARY),
], ids=["quoted-boundary", "boundary-then-param", "param-then-boundary", "mixed-case",
        "preamble-epilogue", "lowercase-part-headers", "file-without-filename",
        "bytes-that-look-like-a-boundary"])
def test_valid_multipart_spellings_are_accepted(server, session, content_type, wrap,
                                                file_part, data):
    file_id = new_id("form")
    body = _http.multipart_body(seed_parts(file_id, data, file_part))
    if wrap is not None:
        body = wrap(body)
    headers = [("Content-Type", content_type or "multipart/form-data; boundary=" + BOUNDARY)]
    response = _http.exchange(server.url, _http.build_request(
        "POST", "/api/video/upload", headers, body))
    assert response.status == 200, response
    assert response.json()["data"]["status"] == "completed"
    assert stored_media(server, file_id) == data


def test_sigterm_mid_body_finishes_that_chunk_then_exits_0(server_factory, sample_webm):
    srv = server_factory()
    file_id = new_id("midbody")
    chunks = split_chunks(sample_webm, 2)
    body = _http.multipart_body(_http.chunk_parts(file_id, 0, chunks[0]))
    request = _http.build_request("POST", "/api/video/upload", _http.multipart_headers() + [
        ("Expect", "100-continue")], body)
    head = request[:len(request) - len(body)]
    sock = _http.connect(srv.url, timeout=20)
    try:
        sock.sendall(head)
        interim = _http.read_response(sock)          # the handler is now reading this body
        assert interim.status == 100, interim
        sock.sendall(body[:len(body) // 2])
        srv.proc.send_signal(signal.SIGTERM)
        sock.sendall(body[len(body) // 2:])
        response = _http.read_response(sock, timeout=20)
    finally:
        sock.close()
    assert response.status == 200, response
    assert srv.stop(timeout=20) == 0, srv.log()
    srv.restart()
    with requests.Session() as session:
        status = status_data(session, srv, file_id)
        assert status["fileSize"] == len(chunks[0]) and status["nextChunkIndex"] == 1
        ok_data(send_chunk(session, srv.url, file_id, 1, chunks[1], status="completed"))
        assert_assembled(session, srv, file_id, sample_webm)


def test_timeout_is_per_read_so_a_slow_but_moving_upload_succeeds(server_factory, sample_webm):
    srv = server_factory(args=["--timeout", "2"])
    file_id = new_id("trickle")
    request = _http.upload_request(_http.chunk_parts(file_id, 0, sample_webm[:60000],
                                                     status="completed"))
    pieces = split_chunks(request, 6)
    sock = _http.connect(srv.url, timeout=20)
    try:
        for n, piece in enumerate(pieces):
            if n:
                time.sleep(0.5)            # the client's pace, not a wait: 2.5 s in all > 2 s
            sock.sendall(piece)
        response = _http.read_response(sock, timeout=20)
    finally:
        sock.close()
    assert response.status == 200, response
    assert stored_media(srv, file_id) == sample_webm[:60000]
