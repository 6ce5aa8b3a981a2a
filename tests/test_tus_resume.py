"""tus PATCHes that break off, race, get taken over, and servers that die mid-PATCH.

What must stay true whatever happens (tus.py's docstring): HEAD's Upload-Offset is a length
at which the stored file is exactly a prefix of what the client sent, no byte is ever torn or
interleaved, and the client can always finish from there byte-exact.
"""
from __future__ import annotations

import hashlib
import os

import pytest
import requests

import _tus
from _tus import OpenPatch, create, head, metadata, new_upload, patch
from conftest import STORAGE, get_status, need, wait_until

PIECE = 16 << 10

# The store's crash points (M1_TEST_CRASH_AT) during a PATCH's 3rd piece, and how many pieces
# a restarted server still has: chunkstore.py's steps locally, s3store.py's in the bucket.
PATCH_CRASHES = {
    "local": [
        ("received", 2),           # the 3rd piece reached the store, which died before its lock
        ("appended", 2),           # written and fsynced, not in the ledger: repair cuts it
        ("append_recorded", 3),    # in the ledger: kept, its part file removed by repair
        ("cleaned", 3),
    ],
    "s3": [
        ("chunk_stored", 3),       # the chunk object exists (S3 said 200): kept
    ],
}[STORAGE]
# ... and while a final upload's 2nd partial is appended.
CONCAT_CRASHES = {"local": ["appended:2", "append_recorded:2"], "s3": ["chunk_stored:2"]}[STORAGE]


def piece_server(server_factory, *extra, start=True):
    return server_factory(args=["--tus-piece-size", str(PIECE)] + list(extra), start=start)


def received(srv, s, path):
    """Bytes of the open PATCH the server has read: stored so far plus the piece in progress."""
    data = get_status(s, srv.url, _tus.upload_id(path)).json()["data"]
    return data["fileSize"] + _tus.incoming_bytes(srv.upload_dir)


def assert_prefix(srv, s, path, source):
    """HEAD's offset names a byte-exact prefix of `source`, which is all the file holds."""
    offset = _tus.offset_of(s, srv.url, path)
    stored = srv.storage.received(_tus.upload_id(path))
    assert len(stored) == offset, (len(stored), offset)
    assert stored == source[:offset]
    return offset


def finish(srv, s, path, source, offset):
    response = patch(s, srv.url, path, offset, source[offset:])
    assert response.status_code == 204, response.text
    assert response.headers["Upload-Offset"] == str(len(source))
    file_id = _tus.upload_id(path)
    assert get_status(s, srv.url, file_id).json()["data"]["state"] == "completed"
    assert _tus.video_bytes(s, srv.url, file_id) == source


def patch_logged(srv, path, status):
    return '"PATCH %s HTTP/1.1" %d' % (path, status) in srv.log()


# ---------------------------------------------------------------------------------------------
# A PATCH that breaks off keeps what arrived
# ---------------------------------------------------------------------------------------------

def test_patch_that_breaks_off_keeps_the_bytes_that_arrived(server_factory, sample_webm):
    srv = piece_server(server_factory)
    with requests.Session() as s:
        path = new_upload(s, srv.url, len(sample_webm))
        sent = 100000                                   # 6 whole pieces and a part of one
        request = OpenPatch(srv.url, path, 0, len(sample_webm))
        request.send(sample_webm[:sent])
        request.close()                                 # the client went away mid-body
        wait_until(lambda: patch_logged(srv, path, 204), timeout=20, message="PATCH ended")
        assert assert_prefix(srv, s, path, sample_webm) == sent
        data = get_status(s, srv.url, _tus.upload_id(path)).json()["data"]
        assert data["chunksReceived"] == 7              # stored piece by piece
        assert data["state"] == "uploading"
        finish(srv, s, path, sample_webm, sent)


def test_broken_off_patch_with_a_checksum_keeps_nothing(server_factory, sample_webm):
    """A checksum covers the whole body: a part of it cannot be checked, so none is kept."""
    srv = piece_server(server_factory)
    with requests.Session() as s:
        path = new_upload(s, srv.url, len(sample_webm))
        request = OpenPatch(srv.url, path, 0, len(sample_webm),
                            {"Upload-Checksum": _tus.checksum("sha1", sample_webm)})
        request.send(sample_webm[:100000])
        request.close()
        wait_until(lambda: patch_logged(srv, path, 204), timeout=20, message="PATCH ended")
        assert assert_prefix(srv, s, path, sample_webm) == 0
        finish(srv, s, path, sample_webm, 0)


def test_a_first_patch_too_short_to_judge_is_dropped_when_it_breaks_off(server_factory,
                                                                        sample_webm):
    srv = piece_server(server_factory)
    with requests.Session() as s:
        path = new_upload(s, srv.url, len(sample_webm))
        request = OpenPatch(srv.url, path, 0, len(sample_webm))
        request.send(sample_webm[:3])                  # not enough to see a signature
        request.close()
        wait_until(lambda: patch_logged(srv, path, 204), timeout=20, message="PATCH ended")
        assert assert_prefix(srv, s, path, sample_webm) in (0, 3)
        finish(srv, s, path, sample_webm, _tus.offset_of(s, srv.url, path))


# ---------------------------------------------------------------------------------------------
# SPEC section 4: a new request for the upload stops an open PATCH; never interleaved
# ---------------------------------------------------------------------------------------------

def open_patch_with(srv, s, path, source, count):
    """A PATCH for all of `source` that has sent `count` bytes, all read by the server, and
    then stays silent, as a client whose connection died without a FIN."""
    request = OpenPatch(srv.url, path, 0, len(source))
    request.send(source[:count])
    wait_until(lambda: received(srv, s, path) == count, timeout=20, message="bytes read")
    return request


def test_head_stops_an_open_patch_which_keeps_its_bytes(server_factory, sample_webm):
    srv = piece_server(server_factory, "--timeout", "120")
    with requests.Session() as s:
        path = new_upload(s, srv.url, len(sample_webm))
        request = open_patch_with(srv, s, path, sample_webm, 50000)
        # Far sooner than the server's 120 s timeout would have cut the silent PATCH off.
        answer = s.head(srv.url + path, headers=_tus.TUS, timeout=20)
        assert answer.status_code == 200
        assert answer.headers["Upload-Offset"] == "50000"
        stopped = request.response()
        assert stopped.status == 204 and stopped.header("Upload-Offset") == "50000"
        assert stopped.header("Connection") == "close"
        request.close()
        assert assert_prefix(srv, s, path, sample_webm) == 50000
        finish(srv, s, path, sample_webm, 50000)


def test_two_patches_at_once_never_interleave(server_factory, sample_webm):
    srv = piece_server(server_factory, "--timeout", "120")
    with requests.Session() as s:
        path = new_upload(s, srv.url, len(sample_webm))
        first = open_patch_with(srv, s, path, sample_webm, 40000)
        # A second PATCH from offset 0 takes the upload over: the first stops and keeps its
        # 40000 bytes, so the second no longer matches the offset and changes nothing.
        second = patch(s, srv.url, path, 0, sample_webm)
        assert second.status_code == 409
        assert second.headers["Upload-Offset"] == "40000"
        assert first.response().header("Upload-Offset") == "40000"
        first.close()
        assert assert_prefix(srv, s, path, sample_webm) == 40000
        # The same race with the right offset: the newer PATCH wins and appends after it.
        third = open_patch_with_offset(srv, s, path, sample_webm, 40000, 90000)
        fourth = patch(s, srv.url, path, 40000, sample_webm[40000:])
        assert fourth.status_code == 409                 # the third stored 50000 more first
        third.close()
        assert assert_prefix(srv, s, path, sample_webm) == 90000
        finish(srv, s, path, sample_webm, 90000)


def open_patch_with_offset(srv, s, path, source, offset, until):
    request = OpenPatch(srv.url, path, offset, len(source) - offset)
    request.send(source[offset:until])
    wait_until(lambda: received(srv, s, path) == until, timeout=20, message="bytes read")
    return request


def test_delete_stops_an_open_patch(server_factory, sample_webm):
    srv = piece_server(server_factory, "--timeout", "120")
    with requests.Session() as s:
        path = new_upload(s, srv.url, len(sample_webm))
        request = open_patch_with(srv, s, path, sample_webm, 30000)
        assert s.delete(srv.url + path, headers=_tus.TUS, timeout=20).status_code == 204
        request.close()
        assert head(s, srv.url, path).status_code == 404
        assert not srv.storage.holds(_tus.upload_id(path))


def test_sigterm_stops_open_patches_which_keep_their_bytes(server_factory, sample_webm):
    srv = piece_server(server_factory, "--timeout", "120")
    with requests.Session() as s:
        path = new_upload(s, srv.url, len(sample_webm))
        request = open_patch_with(srv, s, path, sample_webm, 60000)
        assert srv.stop(timeout=20) == 0
        reply = request.response()
        assert reply.status == 204 and reply.header("Upload-Offset") == "60000"
        request.close()
        srv.start(port=0)
        assert assert_prefix(srv, s, path, sample_webm) == 60000
        finish(srv, s, path, sample_webm, 60000)


# ---------------------------------------------------------------------------------------------
# kill -9 mid-PATCH
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("step,kept_pieces", PATCH_CRASHES)
def test_crash_at_each_step_of_a_patch_resumes_byte_exact(server_factory, sample_webm, step,
                                                          kept_pieces):
    srv = piece_server(server_factory, start=False)
    srv.start(extra_env={"M1_TEST_CRASH_AT": "%s:3" % step})
    with requests.Session() as s:
        path = new_upload(s, srv.url, len(sample_webm))
        with pytest.raises(requests.ConnectionError):
            patch(s, srv.url, path, 0, sample_webm)
        srv.proc.wait(20)
        assert srv.proc.returncode == 70                 # died at the crash point
        srv.restart()
        assert assert_prefix(srv, s, path, sample_webm) == kept_pieces * PIECE
        assert os.listdir(os.path.join(srv.upload_dir, "temp", ".incoming")) == []
        finish(srv, s, path, sample_webm, kept_pieces * PIECE)


def test_kill_9_while_patches_stream_then_resume_byte_exact(server_factory, sample_webm):
    """kill -9 at several moments of one upload: right after bytes were sent (mid-read or
    mid-store), each time HEAD after the restart names a byte-exact prefix."""
    srv = piece_server(server_factory)
    with requests.Session() as s:
        path = new_upload(s, srv.url, len(sample_webm), meta=metadata(filetype="video/webm"))
        offset = 0
        for stop_at in (45000, 100001, 170000):
            request = OpenPatch(srv.url, path, offset, len(sample_webm) - offset)
            for at in range(offset, stop_at, 4096):
                request.send(sample_webm[at:min(at + 4096, stop_at)])
            srv.kill()
            request.close()
            srv.restart()
            now = assert_prefix(srv, s, path, sample_webm)
            assert offset <= now <= stop_at
            offset = now
        finish(srv, s, path, sample_webm, offset)


# ---------------------------------------------------------------------------------------------
# A crash while a final upload is being concatenated
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", CONCAT_CRASHES)
def test_crash_during_concatenation_is_finished_at_restart(server_factory, sample_webm, step):
    srv = server_factory(start=False)
    srv.start(extra_env={"M1_TEST_CRASH_AT": step})
    cut = [0, 50000, 120000, len(sample_webm)]
    with requests.Session() as s:
        parts = []
        for i in range(3):
            piece = sample_webm[cut[i]:cut[i + 1]]
            part = new_upload(s, srv.url, len(piece), concat="partial")
            assert patch(s, srv.url, part, 0, piece).status_code == 204
            parts.append(part)
        file_id = "joined_%s" % step.replace(":", "_")
        with pytest.raises(requests.ConnectionError):
            create(s, srv.url, meta=metadata(fileId=file_id),
                   concat="final;" + " ".join(parts))
        srv.proc.wait(20)
        srv.restart()
        answer = head(s, srv.url, "/files/" + file_id)
        assert answer.status_code == 200
        assert answer.headers["Upload-Offset"] == str(len(sample_webm))
        assert _tus.video_bytes(s, srv.url, file_id) == sample_webm
        assert "finished concatenating" in srv.log()


def test_a_piece_the_store_refuses_mid_patch_ends_it_with_nothing_stored(server_factory):
    """Pieces are stored while the body still arrives; the store's refusal of the first one
    (not a video) reaches the client as 415 and nothing of the PATCH is kept."""
    srv = piece_server(server_factory)
    with requests.Session() as s:
        junk = b"%PDF-1.7" + os.urandom(200000)
        path = new_upload(s, srv.url, len(junk))
        response = patch(s, srv.url, path, 0, junk)
        assert response.status_code == 415
        assert response.json()["error"]["code"] == "unsupported_media_type"
        assert assert_prefix(srv, s, path, junk) == 0
        assert os.listdir(os.path.join(srv.upload_dir, "temp", ".incoming")) == []


def peak_rss_kib(pid):
    with open("/proc/%d/status" % pid, encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_large_patch_streams_with_bounded_memory(server_factory):
    """A 64 MiB PATCH never sits in memory: the server's peak RSS grows by far less than it
    (a server that buffered the body would grow by at least 64 MiB)."""
    need(os.path.exists("/proc/self/status"), "peak RSS is read from /proc (Linux)")
    srv = server_factory()
    size = 64 << 20
    body = b"\x1a\x45\xdf\xa3" + os.urandom(size - 4)
    with requests.Session() as s:
        warm = new_upload(s, srv.url, 1 << 20)           # the same code paths, warmed up
        assert patch(s, srv.url, warm, 0, body[:1 << 20]).status_code == 204
        before = peak_rss_kib(srv.proc.pid)
        path = new_upload(s, srv.url, size)
        assert patch(s, srv.url, path, 0, body).status_code == 204
        grown = peak_rss_kib(srv.proc.pid) - before
        assert grown < 24 * 1024, "peak RSS grew by %d KiB for a 64 MiB PATCH" % grown
        file_id = _tus.upload_id(path)
        wait_until(lambda: get_status(s, srv.url, file_id).json()["data"]["sha256"],
                   timeout=60, message="sha256")
        assert get_status(s, srv.url, file_id).json()["data"]["sha256"] == \
            hashlib.sha256(body).hexdigest()
