"""Black-box tests of running m1server for months (issue 5, SPEC §2 and §8): listing, deletion,
retention (background sweep and `m1server.py gc`), health, readiness and Prometheus metrics.

Each test starts its own server with its own upload folder. Where the contract names a place
on disk (uploads/<fileId>.<ext>, temp/<fileId>/, temp/.deleting/, derived/<fileId>/,
m1.sqlite3) the tests look there too: "every trace gone" means on disk and in the ledger.
Uploads are made "old" by editing the ledger while the server is stopped, never by waiting.

A few races cannot be timed through HTTP (listing vs deletion, the retention sweep vs a client
resuming, the background hasher vs a deletion); those are driven in-process against
chunkstore.ChunkStore with the interleaving forced, at the end of the file.
"""
from __future__ import annotations

import base64
import glob
import hashlib
import json
import math
import os
import re
import sqlite3
import subprocess
import sys
import threading
import uuid

import pytest
import requests

import _http
from conftest import (ROOT, SERVER_PROGRAM, SERVER_PYTHON, get_status, send_chunk,
                      split_chunks, wait_until)

sys.path.insert(0, ROOT)
import chunkstore  # noqa: E402

ISO_MILLIS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
MAX_LIST_LIMIT = 500                 # m1server.MAX_LIST_LIMIT
EBML = b"\x1a\x45\xdf\xa3"
HOUR = 3600.0
STATUS_FIELDS = ("fileId", "exists", "fileSize", "lastModified", "state", "chunksReceived",
                 "nextChunkIndex", "missingChunks", "mimeType", "url")
CLI_TIMEOUT_S = 30


# --- helpers --------------------------------------------------------------------------------

def new_id(tag="op"):
    return "%s_%s" % (tag, os.urandom(5).hex())


def ok_data(response):
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["success"] is True, body
    return body["data"]


def assert_error(response, status, code):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == code, body
    assert body["error"]["message"]


def status_of(session, srv, file_id):
    return ok_data(get_status(session, srv.url, file_id))


def listing(session, srv, **params):
    return session.get(srv.url + "/api/video", params=params, timeout=30)


def send_all(session, srv, file_id, chunks, order=None, complete=True):
    """Send `chunks` (the last with status=completed when `complete`); returns the replies."""
    replies = []
    last = len(chunks) - 1
    for index in (range(len(chunks)) if order is None else order):
        status = "completed" if complete and index == last else "uploading"
        replies.append(ok_data(send_chunk(session, srv.url, file_id, index, chunks[index],
                                          status=status)))
    return replies


def make_complete(session, srv, file_id, data, pieces=3):
    send_all(session, srv, file_id, split_chunks(data, pieces))
    return wait_until(lambda: status_of(session, srv, file_id).get("sha256"),
                      message="the sha256 of %s" % file_id)


def make_incomplete(session, srv, file_id, data, stashed=True):
    """Chunk 0 appended and, with `stashed`, chunk 2 waiting in temp/<fileId>/."""
    chunks = split_chunks(data, 4)
    send_all(session, srv, file_id, chunks, order=[0, 2] if stashed else [0], complete=False)
    return chunks


def ledger_path(upload_dir):
    return os.path.join(str(upload_dir), "m1.sqlite3")


def ledger_rows(upload_dir, file_id):
    """(rows in uploads, rows in chunks) for `file_id`, read through a read-only connection."""
    db = sqlite3.connect("file:%s?mode=ro" % ledger_path(upload_dir), uri=True, timeout=30)
    try:
        uploads = db.execute("SELECT COUNT(*) FROM uploads WHERE file_id = ?",
                             (file_id,)).fetchone()[0]
        chunks = db.execute("SELECT COUNT(*) FROM chunks WHERE file_id = ?",
                            (file_id,)).fetchone()[0]
    finally:
        db.close()
    return uploads, chunks


def files_of(upload_dir, file_id):
    """Every path on disk that belongs to `file_id`."""
    root = str(upload_dir)
    found = [p for p in glob.glob(os.path.join(root, glob.escape(file_id) + ".*"))]
    for path in (os.path.join(root, "temp", file_id), os.path.join(root, "derived", file_id)):
        if os.path.lexists(path):
            found.append(path)
    deleting = os.path.join(root, "temp", ".deleting")
    if os.path.isdir(deleting):
        found += [os.path.join(deleting, n) for n in os.listdir(deleting)
                  if n.rsplit("-", 2)[0] == file_id]
    return found


def assert_no_trace(srv, session, file_id):
    assert status_of(session, srv, file_id)["exists"] is False
    assert files_of(srv.upload_dir, file_id) == []
    assert ledger_rows(srv.upload_dir, file_id) == (0, 0)


def assert_present(srv, session, file_id):
    assert status_of(session, srv, file_id)["exists"] is True
    assert ledger_rows(srv.upload_dir, file_id)[0] == 1


def age(upload_dir, file_ids, seconds):
    """Move every timestamp of these uploads `seconds` into the past (server stopped)."""
    db = sqlite3.connect(ledger_path(upload_dir), timeout=30)
    try:
        with db:
            for file_id in file_ids:
                changed = db.execute(
                    "UPDATE uploads SET created_at = created_at - ?, updated_at = updated_at - ?,"
                    " completed_at = completed_at - ? WHERE file_id = ?",
                    (seconds, seconds, seconds, file_id)).rowcount
                assert changed == 1, file_id
    finally:
        db.close()


def clean_env():
    """The environment without M1_* settings, so only the flags a test passes apply."""
    return {k: v for k, v in os.environ.items() if not k.startswith("M1_")}


def run_cli(*args):
    return subprocess.run([SERVER_PYTHON, SERVER_PROGRAM] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
                          cwd=ROOT, timeout=CLI_TIMEOUT_S, universal_newlines=True)


def run_gc(upload_dir, *args):
    """`m1server.py gc --dir D ...`; returns (exit code, deleted ids or None, stderr)."""
    done = run_cli("gc", "--dir", upload_dir, *args)
    deleted = None
    if done.returncode == 0:
        deleted = json.loads(done.stdout.strip().splitlines()[-1])["deleted"]
    return done.returncode, deleted, done.stderr


def no_server_errors(srv):
    log = srv.log()
    assert "Traceback" not in log, log
    assert not re.search(r'" 500 ', log), log


# --- GET /api/video ---------------------------------------------------------------------------

def test_listing_is_newest_first_and_each_item_carries_the_status_fields(
        server_factory, session, sample_webm):
    # processing off: a running job's progress would change between the listing and the
    # status request compared with it below
    server = server_factory(args=["--processing", "off"])
    first, second, third = new_id("a"), new_id("b"), new_id("c")
    make_complete(session, server, first, sample_webm)
    make_incomplete(session, server, second, sample_webm)
    make_incomplete(session, server, third, sample_webm, stashed=False)

    data = ok_data(listing(session, server))
    assert [item["fileId"] for item in data["uploads"]] == [third, second, first]
    assert data["nextCursor"] is None
    for item in data["uploads"]:
        for field in STATUS_FIELDS:
            assert field in item, (field, item)
        assert item["exists"] is True
        assert ISO_MILLIS_Z.match(item["lastModified"]), item
        assert item["url"] == "/uploads/%s.webm" % item["fileId"]
        # the same description GET /api/video/status/<fileId> gives
        assert item == status_of(session, server, item["fileId"])
    by_id = {item["fileId"]: item for item in data["uploads"]}
    assert by_id[first]["state"] == "completed" and by_id[first]["fileSize"] == len(sample_webm)
    assert by_id[second]["state"] == "uploading" and by_id[second]["chunksReceived"] == 2
    assert by_id[third]["nextChunkIndex"] == 1


def test_listing_limit_accepts_1_to_500_and_refuses_the_rest(server, session, sample_webm):
    ids = [new_id("l%d" % i) for i in range(2)]
    for file_id in ids:
        make_incomplete(session, server, file_id, sample_webm, stashed=False)

    one = ok_data(listing(session, server, limit=1))
    assert [item["fileId"] for item in one["uploads"]] == [ids[1]]
    assert one["nextCursor"]
    most = ok_data(listing(session, server, limit=MAX_LIST_LIMIT))
    assert [item["fileId"] for item in most["uploads"]] == ids[::-1]
    assert most["nextCursor"] is None
    for bad in ("0", str(MAX_LIST_LIMIT + 1), "abc", "-1", "1.5", "99999999999999999999"):
        assert_error(listing(session, server, limit=bad), 400, "invalid_limit")
    no_server_errors(server)


def test_listing_limit_in_non_ascii_digits_is_refused_as_invalid_limit(server, session):
    assert_error(listing(session, server, limit="\u00b2"), 400, "invalid_limit")


def _b64(raw):
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


@pytest.mark.parametrize("cursor", [
    "garbage!!", "abc", "%%%", "\u00e9t\u00e9", _b64(b"\xff\xfe"), _b64(b'{"a": 1}'),
    _b64(b"[1, 2, 3]"), _b64(b'["yesterday", "x"]'), _b64(b'[1.5, "bad id!"]'), _b64(b"7"),
    _b64(b"null"), _b64(b'[1.5, ["x"]]')])
def test_listing_refuses_a_cursor_it_never_gave_out(server, session, cursor):
    assert_error(listing(session, server, cursor=cursor), 400, "invalid_cursor")
    no_server_errors(server)


def walk(session, srv, limit, between_pages=None):
    """Follow nextCursor to the end; returns the fileIds in the order served."""
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        data = ok_data(listing(session, srv, **params))
        assert len(data["uploads"]) <= limit
        seen += [item["fileId"] for item in data["uploads"]]
        cursor = data["nextCursor"]
        pages += 1
        assert pages < 100, "pagination does not end"
        if cursor is None:
            return seen
        if between_pages is not None:
            between_pages(pages)


def test_pagination_walks_every_upload_exactly_once(server, session, sample_webm):
    ids = [new_id("p%d" % i) for i in range(7)]
    for file_id in ids:
        make_incomplete(session, server, file_id, sample_webm, stashed=False)
    newest_first = ids[::-1]
    for limit in (1, 2, 3, 7, 8):
        assert walk(session, server, limit) == newest_first, limit


def test_pagination_is_stable_while_uploads_are_added(server, session, sample_webm):
    ids = [new_id("s%d" % i) for i in range(6)]
    for file_id in ids:
        make_incomplete(session, server, file_id, sample_webm, stashed=False)
    added = []

    def add_two(page):
        for _ in range(2):
            added.append(new_id("new%d" % page))
            make_incomplete(session, server, added[-1], sample_webm, stashed=False)

    assert walk(session, server, 2, between_pages=add_two) == ids[::-1]
    assert len(added) == 4
    # a new walk sees the newcomers first, then the rest, each once
    assert walk(session, server, 4) == added[::-1] + ids[::-1]


# --- DELETE /api/video/<fileId> --------------------------------------------------------------

def test_delete_removes_the_file_temp_chunks_derivatives_and_ledger_rows(
        server, session, sample_webm):
    file_id = new_id("del")
    make_complete(session, server, file_id, sample_webm)
    derived = os.path.join(server.upload_dir, "derived", file_id)
    os.makedirs(derived, exist_ok=True)       # processing may have made it
    with open(os.path.join(derived, "poster.jpg"), "wb") as f:
        f.write(b"\xff\xd8 fake poster")
    assert ledger_rows(server.upload_dir, file_id) == (1, 3)
    assert len(files_of(server.upload_dir, file_id)) == 2

    response = session.delete(server.url + "/api/video/" + file_id)
    data = ok_data(response)
    assert data["fileId"] == file_id and data["deleted"] is True
    assert_no_trace(server, session, file_id)
    assert_error(session.get(server.url + "/uploads/%s.webm" % file_id), 404, "not_found")
    assert file_id not in [u["fileId"] for u in ok_data(listing(session, server))["uploads"]]
    assert os.listdir(os.path.join(server.upload_dir, "temp", ".deleting")) == []
    assert_error(session.delete(server.url + "/api/video/" + file_id), 404, "not_found")


def test_delete_of_an_unknown_id_is_404_and_an_invalid_id_is_400(server, session):
    assert_error(session.delete(server.url + "/api/video/never_seen_" + new_id()), 404,
                 "not_found")
    for bad in ("bad.id", "a" * 129, "sp%20ace", "semi%3Bcolon", "%C3%A9"):
        assert_error(session.delete(server.url + "/api/video/" + bad), 400, "invalid_file_id")
    no_server_errors(server)


def test_delete_works_for_an_upload_whose_file_id_is_upload(server, session, sample_webm):
    make_incomplete(session, server, "upload", sample_webm, stashed=False)
    assert status_of(session, server, "upload")["exists"] is True
    ok_data(session.delete(server.url + "/api/video/upload"))
    assert_no_trace(server, session, "upload")


def test_delete_of_an_upload_with_stashed_early_chunks_removes_them(
        server, session, sample_webm):
    file_id = new_id("stash")
    chunks = split_chunks(sample_webm, 5)
    send_all(session, server, file_id, chunks, order=[0, 2, 4], complete=True)
    temp = os.path.join(server.upload_dir, "temp", file_id)
    assert sorted(os.listdir(temp)) == ["2.chunk", "4.chunk"]
    assert status_of(session, server, file_id)["missingChunks"] == [1, 3]

    ok_data(session.delete(server.url + "/api/video/" + file_id))
    assert_no_trace(server, session, file_id)


def test_upload_again_with_the_same_id_after_delete_is_byte_exact(server, session, sample_webm):
    file_id = new_id("again")
    make_complete(session, server, file_id, sample_webm[:5000] + sample_webm[::-1], pieces=4)
    ok_data(session.delete(server.url + "/api/video/" + file_id))

    digest = make_complete(session, server, file_id, sample_webm, pieces=6)
    assert digest == hashlib.sha256(sample_webm).hexdigest()
    status = status_of(session, server, file_id)
    assert status["fileSize"] == len(sample_webm) and status["totalChunks"] == 6
    assert session.get(server.url + status["url"]).content == sample_webm
    with open(os.path.join(server.upload_dir, file_id + ".webm"), "rb") as f:
        assert f.read() == sample_webm


def test_delete_while_a_chunk_is_in_flight_stays_consistent(server, session, sample_webm):
    """Headers and half the body of chunk 2 are in; DELETE runs; then the body finishes. The
    chunk must then start a fresh upload or be refused cleanly, never a 500, and the upload
    must be finishable again byte-exact."""
    file_id = new_id("inflight")
    chunks = split_chunks(sample_webm, 4)
    send_all(session, server, file_id, chunks, order=[0, 1], complete=False)
    incoming = os.path.join(server.upload_dir, "temp", ".incoming")
    assert os.listdir(incoming) == []

    request = _http.upload_request(_http.chunk_parts(file_id, 2, chunks[2]), close=True)
    half = len(request) // 2
    sock = _http.connect(server.url)
    try:
        sock.sendall(request[:half])
        wait_until(lambda: os.listdir(incoming), message="the part file of the in-flight chunk")
        deleted = ok_data(session.delete(server.url + "/api/video/" + file_id))
        assert deleted == {"fileId": file_id, "deleted": True}
        assert status_of(session, server, file_id)["exists"] is False
        assert files_of(server.upload_dir, file_id) == []
        sock.sendall(request[half:])
        reply = _http.read_response(sock)
    finally:
        sock.close()

    assert reply.status is not None and reply.status < 500, reply
    assert reply.header("content-type", "").startswith("application/json"), reply
    status = status_of(session, server, file_id)
    if reply.status == 200:                 # the chunk started a fresh upload
        data = reply.json()["data"]
        assert data["chunkIndex"] == 2 and data["nextChunkIndex"] == 0, data
        assert status["exists"] is True and status["chunksReceived"] == 1
        assert status["nextChunkIndex"] == 0 and status["fileSize"] == 0
        assert ledger_rows(server.upload_dir, file_id) == (1, 1)
    else:                                    # refused cleanly: nothing of it stays
        assert reply.json()["success"] is False
        assert status["exists"] is False
        assert ledger_rows(server.upload_dir, file_id) == (0, 0)
    assert wait_until(lambda: os.listdir(incoming) == [], message="part files removed")
    send_all(session, server, file_id, chunks)
    wait_until(lambda: status_of(session, server, file_id).get("sha256"), message="sha256")
    assert session.get(server.url + "/uploads/%s.webm" % file_id).content == sample_webm
    assert status_of(session, server, file_id)["sha256"] == hashlib.sha256(
        sample_webm).hexdigest()
    no_server_errors(server)
    assert server.alive()


# --- deletion crash-safety: temp/.deleting/ is the intent repair finishes ---------------------

def test_a_deletion_cut_short_is_finished_by_startup_repair(server, session, sample_webm):
    file_id, keep = new_id("cut"), new_id("keep")
    make_incomplete(session, server, file_id, sample_webm)      # file + temp/<id>/2.chunk
    make_complete(session, server, keep, sample_webm)
    assert server.stop() == 0
    # Step (1) of a deletion, cut short: the file is in the trash, temp/<id>/ not yet moved.
    trash = os.path.join(server.upload_dir, "temp", ".deleting",
                         trash_name(server.upload_dir, file_id))
    os.makedirs(trash)
    os.replace(os.path.join(server.upload_dir, file_id + ".webm"), os.path.join(trash, "media"))
    assert ledger_rows(server.upload_dir, file_id) == (1, 2)

    server.restart()
    assert_no_trace(server, session, file_id)
    assert os.listdir(os.path.join(server.upload_dir, "temp", ".deleting")) == []
    assert "finishing the deletion" in server.log()
    assert session.get(server.url + "/uploads/%s.webm" % keep).content == sample_webm


def test_a_deletion_cut_before_the_file_moved_still_removes_the_file(
        server, session, sample_webm):
    file_id = new_id("cut0")
    make_complete(session, server, file_id, sample_webm)
    assert server.stop() == 0
    os.makedirs(os.path.join(server.upload_dir, "temp", ".deleting",
                             trash_name(server.upload_dir, file_id)))
    server.restart()
    assert_no_trace(server, session, file_id)


def trash_name(upload_dir, file_id):
    """The folder ChunkStore.delete() makes first: <fileId>-<created_at>-<random>."""
    db = sqlite3.connect(os.path.join(upload_dir, "m1.sqlite3"))
    try:
        (created_at,) = db.execute("SELECT created_at FROM uploads WHERE file_id = ?",
                                   (file_id,)).fetchone()
    finally:
        db.close()
    return "%s-%r-%s" % (file_id, created_at, uuid.uuid4().hex)


def test_a_stale_deletion_folder_never_touches_a_newer_upload_with_that_id(
        server, session, sample_webm):
    """A deletion whose last step (removing its folder) failed leaves the folder behind; the
    upload made later under the same id must survive the next start-up."""
    file_id = new_id("again")
    make_complete(session, server, file_id, sample_webm)
    stale = trash_name(server.upload_dir, file_id)
    ok_data(session.delete(server.url + "/api/video/" + file_id))
    make_complete(session, server, file_id, sample_webm)
    assert server.stop() == 0
    os.makedirs(os.path.join(server.upload_dir, "temp", ".deleting", stale))
    server.restart()
    assert session.get(server.url + "/uploads/%s.webm" % file_id).content == sample_webm
    assert os.listdir(os.path.join(server.upload_dir, "temp", ".deleting")) == []


# --- retention: `m1server.py gc`, the background sweep, the directory lock --------------------

@pytest.fixture
def aged_uploads(server, session, sample_webm):
    """Five uploads, then the server stopped; `old_*` are two hours older than they are."""
    ids = {name: new_id(name) for name in ("old_incomplete", "old_stashed", "new_incomplete",
                                           "old_completed", "new_completed")}
    make_incomplete(session, server, ids["old_incomplete"], sample_webm, stashed=False)
    make_incomplete(session, server, ids["old_stashed"], sample_webm)
    make_incomplete(session, server, ids["new_incomplete"], sample_webm)
    make_complete(session, server, ids["old_completed"], sample_webm)
    make_complete(session, server, ids["new_completed"], sample_webm)
    assert server.stop() == 0
    age(server.upload_dir, [ids["old_incomplete"], ids["old_stashed"], ids["old_completed"]],
        2 * HOUR)
    return ids


def test_gc_removes_exactly_the_expired_incomplete_uploads_then_old_completed_ones(
        server, session, aged_uploads):
    ids = aged_uploads
    directory = server.upload_dir
    assert os.path.isdir(os.path.join(directory, "temp", ids["old_stashed"]))

    code, deleted, err = run_gc(directory, "--incomplete-ttl", "1h")
    assert code == 0, err
    assert sorted(deleted) == sorted([ids["old_incomplete"], ids["old_stashed"]])
    for name in ("old_incomplete", "old_stashed"):
        assert files_of(directory, ids[name]) == [] and ledger_rows(directory, ids[name]) == (0, 0)
        assert "retention: removed %s" % ids[name] in err
    for name in ("new_incomplete", "old_completed", "new_completed"):
        assert ledger_rows(directory, ids[name])[0] == 1, name
        assert os.path.exists(os.path.join(directory, ids[name] + ".webm")), name

    code, deleted, err = run_gc(directory, "--incomplete-ttl", "1h", "--retention", "1h")
    assert code == 0, err
    assert deleted == [ids["old_completed"]]
    assert files_of(directory, ids["old_completed"]) == []
    assert ledger_rows(directory, ids["old_completed"]) == (0, 0)

    code, deleted, err = run_gc(directory, "--incomplete-ttl", "1h", "--retention", "1h")
    assert (code, deleted) == (0, []), err

    server.restart()
    listed = [u["fileId"] for u in ok_data(listing(session, server))["uploads"]]
    assert sorted(listed) == sorted([ids["new_incomplete"], ids["new_completed"]])
    assert status_of(session, server, ids["new_incomplete"])["chunksReceived"] == 2


@pytest.mark.parametrize("ttl", ["0", "off", "OFF", "0s"])
def test_gc_with_incomplete_ttl_0_or_off_keeps_everything(server, aged_uploads, ttl):
    code, deleted, err = run_gc(server.upload_dir, "--incomplete-ttl", ttl)
    assert (code, deleted) == (0, []), err
    for file_id in aged_uploads.values():
        assert ledger_rows(server.upload_dir, file_id)[0] == 1


def test_gc_refuses_while_a_server_runs_on_the_folder(server_factory, session, sample_webm):
    srv = server_factory(args=["--incomplete-ttl", "off"])
    file_id = new_id("busy")
    make_incomplete(session, srv, file_id, sample_webm)
    code, deleted, err = run_gc(srv.upload_dir, "--incomplete-ttl", "1s", "--retention", "1s")
    assert code == 2, err
    assert "a server is running" in err
    assert_present(srv, session, file_id)
    assert srv.alive()


def test_gc_on_a_missing_folder_exits_2(tmp_path):
    code, deleted, err = run_gc(tmp_path / "nowhere")
    assert code == 2 and "does not exist" in err


def test_a_second_server_on_the_same_folder_refuses_to_start(server):
    done = run_cli("--host", "127.0.0.1", "--port", "0", "--dir", server.upload_dir)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "another m1server is using" in done.stderr
    assert "serving" not in done.stdout
    assert server.alive()


def test_background_sweep_removes_old_incomplete_uploads_and_logs_it(
        server, server_factory, session, aged_uploads):
    ids = aged_uploads
    srv = server_factory(args=["--incomplete-ttl", "1h", "--sweep-interval", "0.2"],
                         upload_dir=server.upload_dir)
    gone = (ids["old_incomplete"], ids["old_stashed"])
    wait_until(lambda: all(not status_of(session, srv, i)["exists"]
                           and files_of(srv.upload_dir, i) == [] for i in gone),
               message="the sweep to remove the expired incomplete uploads")
    for file_id in gone:
        assert files_of(srv.upload_dir, file_id) == []
        assert ledger_rows(srv.upload_dir, file_id) == (0, 0)
        wait_until(lambda: "retention: removed %s" % file_id in srv.log(),
                   message="the log line of the removal")
    for name in ("new_incomplete", "old_completed", "new_completed"):
        assert_present(srv, session, ids[name])


def test_background_sweep_with_retention_removes_old_completed_and_ttl_off_keeps_incomplete(
        server, server_factory, session, aged_uploads):
    ids = aged_uploads
    srv = server_factory(args=["--incomplete-ttl", "off", "--retention", "1h",
                               "--sweep-interval", "0.2"], upload_dir=server.upload_dir)
    # (its rows go before its trash folder: wait for both)
    wait_until(lambda: not status_of(session, srv, ids["old_completed"])["exists"]
               and files_of(srv.upload_dir, ids["old_completed"]) == [],
               message="the sweep to remove the old completed upload")
    # that sweep ran, and with --incomplete-ttl off it kept every incomplete upload
    for name in ("old_incomplete", "old_stashed", "new_incomplete", "new_completed"):
        assert_present(srv, session, ids[name])
    assert files_of(srv.upload_dir, ids["old_completed"]) == []


def test_background_sweep_runs_again_every_interval(server_factory, session, sample_webm):
    """Not only at start-up: an upload left idle for longer than a 1.5 s TTL is removed by a
    later sweep, while a completed one stays."""
    srv = server_factory(args=["--incomplete-ttl", "1.5", "--sweep-interval", "0.2"])
    done = new_id("done")
    make_complete(session, srv, done, sample_webm)
    idle = new_id("idle")
    make_incomplete(session, srv, idle, sample_webm, stashed=False)
    wait_until(lambda: not status_of(session, srv, idle)["exists"]
               and files_of(srv.upload_dir, idle) == [], timeout=15,
               message="a later sweep to remove the idle upload")
    assert files_of(srv.upload_dir, idle) == []
    assert_present(srv, session, done)


@pytest.mark.parametrize("args, fragment", [
    (["--incomplete-ttl", "5x"], "not a duration"),
    (["--incomplete-ttl=-1h"], "not a duration"),
    (["--retention", "soon"], "not a duration"),
    (["--retention", "1w"], "not a duration"),
    (["--sweep-interval", "0"], "more than 0"),
    (["--sweep-interval", "often"], "not a number"),
])
@pytest.mark.parametrize("tool", ["serve", "gc"])
def test_invalid_duration_exits_2_with_a_usage_message(tmp_path, args, fragment, tool):
    directory = tmp_path / "uploads"
    prefix = ["gc"] if tool == "gc" else ["--port", "0"]
    done = run_cli(*(prefix + ["--dir", directory] + args))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "usage:" in done.stderr and fragment in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# --- /healthz, /readyz -------------------------------------------------------------------------

def test_healthz_answers_ok(server, session):
    data = ok_data(session.get(server.url + "/healthz"))
    assert data["status"] == "ok"


def test_readyz_answers_200_with_its_checks(server, session):
    data = ok_data(session.get(server.url + "/readyz"))
    assert data["status"] == "ready"
    checks = data["checks"]
    for name in ("uploadDirWritable", "freeDisk", "metadataStore"):
        assert checks[name]["ok"] is True, checks
    assert checks["freeDisk"]["freeBytes"] > checks["freeDisk"]["minFreeBytes"] > 0


def test_readyz_answers_503_when_free_disk_is_below_the_minimum(server_factory, session):
    srv = server_factory(args=["--min-free-disk", "100000G"])
    response = session.get(srv.url + "/readyz")
    assert response.status_code == 503, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["success"] is False
    checks = body["data"]["checks"]
    assert checks["freeDisk"]["ok"] is False
    assert checks["freeDisk"]["minFreeBytes"] == 100000 << 30
    assert checks["uploadDirWritable"]["ok"] is True and checks["metadataStore"]["ok"] is True
    assert ok_data(session.get(srv.url + "/healthz"))["status"] == "ok"   # alive, not ready


def test_readyz_503_carries_the_error_envelope(server_factory, session):
    srv = server_factory(args=["--min-free-disk", "100000G"])
    body = session.get(srv.url + "/readyz").json()
    assert body["error"]["code"] and body["error"]["message"]


# --- /metrics: a parser of the Prometheus text exposition format 0.0.4 -------------------------

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
METRIC_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
LABEL_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


class Exposition:
    """Parsed exposition text: families by name, each {type, help, samples}; samples are
    (sample name, labels dict, value)."""

    def __init__(self):
        self.families = {}

    def family(self, name):
        return self.families.setdefault(name, {"type": None, "help": None, "samples": []})

    def value(self, name, **labels):
        """The value of one series; None when absent."""
        for family in self.families.values():
            for sample, sample_labels, value in family["samples"]:
                if sample == name and sample_labels == labels:
                    return value
        return None

    def series(self, name):
        return [(labels, value) for family in self.families.values()
                for sample, labels, value in family["samples"] if sample == name]


def parse_float(text):
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    if text == "NaN":
        return math.nan
    if not re.match(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z", text):
        raise ValueError("not a sample value: %r" % text)
    return float(text)


def parse_labels(text, at):
    """Parse `{name="value",...}` starting at text[at] == '{'; returns (labels, next index)."""
    labels = {}
    at += 1
    while True:
        if text[at:at + 1] == "}":
            return labels, at + 1
        match = LABEL_NAME.match(text, at)
        if not match:
            raise ValueError("bad label name at %d" % at)
        name = match.group(0)
        at = match.end()
        if text[at:at + 2] != '="':
            raise ValueError("expected =\" after label %s" % name)
        at += 2
        value = []
        while True:
            if at >= len(text):
                raise ValueError("unterminated value of label %s" % name)
            char = text[at]
            if char == "\\":
                escaped = text[at + 1:at + 2]
                if escaped not in LABEL_ESCAPES:
                    raise ValueError("bad escape \\%s in label %s" % (escaped, name))
                value.append(LABEL_ESCAPES[escaped])
                at += 2
            elif char == '"':
                at += 1
                break
            elif char == "\n":
                raise ValueError("raw newline in label %s" % name)
            else:
                value.append(char)
                at += 1
        if name in labels:
            raise ValueError("label %s given twice" % name)
        labels[name] = "".join(value)
        if text[at:at + 1] == ",":
            at += 1
        elif text[at:at + 1] != "}":
            raise ValueError("expected , or } after label %s" % name)


def family_of(sample_name, exposition):
    if sample_name in exposition.families:
        return sample_name
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample_name[:-len(suffix)]
        if sample_name.endswith(suffix) and exposition.families.get(base, {}).get("type") in (
                "histogram", "summary"):
            return base
    raise ValueError("sample %s has no # TYPE line before it" % sample_name)


def parse_exposition(text):
    """Parse (and check the grammar of) Prometheus text format 0.0.4; ValueError on a fault.
    Checks: names, label syntax and escapes, values, one TYPE per family before its samples,
    each family's lines in one group, no series twice, counters >= 0, histograms whole."""
    exposition = Exposition()
    grouping = {"current": None, "finished": set()}
    seen = set()

    def enter(name):
        """Lines of family `name` start or continue; its earlier group must be this one."""
        if name != grouping["current"]:
            if name in grouping["finished"]:
                raise ValueError("lines of %s are not grouped together" % name)
            if grouping["current"] is not None:
                grouping["finished"].add(grouping["current"])
            grouping["current"] = name

    if text and not text.endswith("\n"):
        raise ValueError("the exposition must end with a newline")
    for number, line in enumerate(text.split("\n")[:-1], 1):
        try:
            if not line.strip():
                continue
            if line.startswith("#"):
                words = line[1:].strip().split(None, 2)
                if len(words) >= 2 and words[0] in ("HELP", "TYPE"):
                    name = words[1]
                    if not METRIC_NAME.fullmatch(name):
                        raise ValueError("bad metric name %r" % name)
                    enter(name)
                    family = exposition.family(name)
                    if words[0] == "TYPE":
                        if len(words) != 3 or words[2] not in METRIC_TYPES:
                            raise ValueError("bad TYPE line")
                        if family["type"] is not None or family["samples"]:
                            raise ValueError("second or late TYPE for %s" % name)
                        family["type"] = words[2]
                    else:
                        if family["help"] is not None:
                            raise ValueError("second HELP for %s" % name)
                        family["help"] = words[2] if len(words) == 3 else ""
                continue                       # any other # line is a comment
            match = METRIC_NAME.match(line)
            if not match:
                raise ValueError("bad metric name")
            name, at = match.group(0), match.end()
            labels = {}
            if line[at:at + 1] == "{":
                labels, at = parse_labels(line, at)
            rest = line[at:]
            if not rest.startswith(" "):
                raise ValueError("no space before the value")
            parts = rest.split()
            if len(parts) not in (1, 2):
                raise ValueError("expected a value and an optional timestamp")
            value = parse_float(parts[0])
            if len(parts) == 2 and not re.match(r"-?\d+\Z", parts[1]):
                raise ValueError("bad timestamp %r" % parts[1])
            base = family_of(name, exposition)
            enter(base)
            key = (name, tuple(sorted(labels.items())))
            if key in seen:
                raise ValueError("series %s%s given twice" % key)
            seen.add(key)
            exposition.families[base]["samples"].append((name, labels, value))
        except ValueError as error:
            raise ValueError("line %d %r: %s" % (number, line, error))
    check_families(exposition)
    return exposition


def check_families(exposition):
    for name, family in exposition.families.items():
        if family["type"] == "counter":
            for _, _, value in family["samples"]:
                if not value >= 0:
                    raise ValueError("counter %s is %r" % (name, value))
        if family["type"] == "histogram":
            check_histogram(name, family["samples"])


def check_histogram(name, samples):
    """Buckets cumulative in increasing `le`, ending at +Inf == _count, with a _sum."""
    groups = {}
    for sample, labels, value in samples:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        group = groups.setdefault(rest, {"buckets": [], "sum": None, "count": None})
        if sample == name + "_bucket":
            if "le" not in labels:
                raise ValueError("%s bucket without le" % name)
            group["buckets"].append((parse_float(labels["le"]), value))
        elif sample == name + "_sum":
            group["sum"] = value
        elif sample == name + "_count":
            group["count"] = value
        else:
            raise ValueError("%s is not a histogram sample of %s" % (sample, name))
    for rest, group in groups.items():
        bounds = [bound for bound, _ in group["buckets"]]
        counts = [count for _, count in group["buckets"]]
        if not bounds or bounds[-1] != math.inf:
            raise ValueError("%s%s: buckets do not end at +Inf" % (name, rest))
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError("%s%s: le not increasing" % (name, rest))
        if counts != sorted(counts):
            raise ValueError("%s%s: buckets not cumulative: %s" % (name, rest, counts))
        if group["count"] is None or group["sum"] is None:
            raise ValueError("%s%s: _count or _sum missing" % (name, rest))
        if counts[-1] != group["count"]:
            raise ValueError("%s%s: +Inf bucket %s != _count %s" % (name, rest, counts[-1],
                                                                    group["count"]))


def scrape(srv):
    """GET /metrics on a connection of its own; returns the parsed exposition."""
    response = requests.get(srv.url + "/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse_exposition(response.text)


def test_the_exposition_parser_reads_escapes_and_refuses_malformed_text():
    text = ("# HELP x_total A counter\\nwith an escaped newline.\n"
            "# TYPE x_total counter\n"
            'x_total{path="C:\\\\dir",quote="say \\"hi\\"",nl="a\\nb",} 3 1700000000000\n'
            "x_total 1.5e3\n"
            "# a comment\n\n"
            "# TYPE h histogram\n"
            'h_bucket{le="0.5"} 1\nh_bucket{le="+Inf"} 2\nh_sum 0.75\nh_count 2\n'
            "# TYPE g gauge\ng NaN\ng{x=\"-\"} -Inf\n")
    parsed = parse_exposition(text)
    assert parsed.value("x_total", path="C:\\dir", quote='say "hi"', nl="a\nb") == 3
    assert parsed.value("x_total") == 1500
    assert parsed.families["h"]["type"] == "histogram"
    assert math.isnan(parsed.value("g")) and parsed.value("g", x="-") == -math.inf
    bad = [
        'x{a="b} 1\n',                                  # unterminated label value
        'x{a="\\t"} 1\n',                               # unknown escape
        "x{a=b} 1\n",                                   # unquoted label value
        "x\n",                                          # no value
        "x 1 2 3\n",                                    # too many fields
        "x one\n",                                      # not a number
        "1x 1\n",                                       # bad name
        "# TYPE x counter\nx 1\n# TYPE x counter\n",    # TYPE twice
        "# TYPE x counter\n# TYPE y gauge\ny 1\nx 1\n",  # x after y, without ever grouping
        "# TYPE x counter\nx 1\n# TYPE y gauge\ny 1\nx 2\n",   # x not grouped
        "# TYPE x counter\nx 1\nx 2\n",                  # series twice
        "# TYPE x counter\nx -1\n",                      # counter below zero
        "# TYPE x wobbly\n",                             # unknown type
        "x 1\n",                                         # sample without TYPE
        "# TYPE x counter\nx 1",                         # no final newline
        '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',
        '# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n',
        '# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 3\n',
    ]
    for text in bad:
        with pytest.raises(ValueError):
            parse_exposition(text)


def test_metrics_parse_as_prometheus_text_and_count_what_happened(server_factory, sample_webm):
    srv = server_factory()
    fresh = scrape(srv)
    for name in ("m1_chunks_stored_total", "m1_chunks_duplicate_total",
                 "m1_chunk_bytes_received_total", "m1_uploads_completed_total",
                 "m1_uploads_deleted_total"):
        assert fresh.families[name]["type"] == "counter" and fresh.value(name) == 0, name
    assert fresh.families["m1_http_request_duration_seconds"]["type"] == "histogram"
    for gauge in ("m1_uploads_active", "m1_uploads_completed", "m1_disk_free_bytes"):
        assert fresh.families[gauge]["type"] == "gauge", gauge

    session = requests.Session()
    done, open_ = new_id("done"), new_id("open")
    chunks = split_chunks(sample_webm, 4)
    posts, new_bytes = 0, 0
    for index in (0, 2, 1, 3):             # chunk 2 arrives early and waits in temp/
        ok_data(send_chunk(session, srv.url, done, index, chunks[index],
                           status="completed" if index == 3 else "uploading"))
        posts, new_bytes = posts + 1, new_bytes + len(chunks[index])
    duplicates = 0
    for index in (2, 0):                   # the same bytes again: acknowledged, not stored
        assert ok_data(send_chunk(session, srv.url, done, index, chunks[index]))["duplicate"]
        posts, duplicates = posts + 1, duplicates + 1
    other = sample_webm[:777]
    ok_data(send_chunk(session, srv.url, open_, 0, other))
    posts, new_bytes = posts + 1, new_bytes + len(other)
    assert_error(send_chunk(session, srv.url, done, 1, b"other bytes"), 409, "chunk_conflict")
    statuses = 3
    for file_id in (done, open_, new_id("never")):
        ok_data(get_status(session, srv.url, file_id))

    def completed_counted():
        scraped = scrape(srv)
        return scraped if scraped.value("m1_uploads_completed_total") == 1 else None

    metrics = wait_until(completed_counted, message="m1_uploads_completed_total to reach 1")
    assert metrics.value("m1_chunks_stored_total") == posts - duplicates == 5
    assert metrics.value("m1_chunks_duplicate_total") == duplicates
    assert metrics.value("m1_chunk_bytes_received_total") == new_bytes
    upload = {"route": "/api/video/upload", "method": "POST"}
    assert metrics.value("m1_http_requests_total", status="200", **upload) == posts
    assert metrics.value("m1_http_requests_total", status="409", **upload) == 1
    assert metrics.value("m1_http_requests_total", route="/api/video/status/:id",
                         method="GET", status="200") == statuses
    duration = "m1_http_request_duration_seconds"
    assert metrics.value(duration + "_count", route="/api/video/upload") == posts + 1
    assert metrics.value(duration + "_sum", route="/api/video/upload") > 0
    assert metrics.value(duration + "_bucket", route="/api/video/upload", le="+Inf") == posts + 1
    assert metrics.value(duration + "_count", route="/api/video/status/:id") == statuses
    assert metrics.value("m1_uploads_active") == 1
    assert metrics.value("m1_uploads_completed") == 1
    assert metrics.value("m1_disk_free_bytes") > 0

    # an unknown route, on a connection of its own, is counted under route "none"
    assert_error(requests.get(srv.url + "/no/such/route", timeout=30), 404, "not_found")
    ok_data(session.delete(srv.url + "/api/video/" + open_))
    metrics = scrape(srv)
    assert metrics.value("m1_http_requests_total", route="none", method="GET",
                         status="404") == 1
    assert metrics.value(duration + "_count", route="none") == 1
    assert metrics.value("m1_http_requests_total", route="/api/video/:id", method="DELETE",
                         status="200") == 1
    assert metrics.value("m1_uploads_deleted_total") == 1
    assert metrics.value("m1_uploads_active") == 0
    assert metrics.value("m1_uploads_completed") == 1
    # every request so far is in the totals, and the histogram counts the same requests
    requests_by_route = {}
    for labels, value in metrics.series("m1_http_requests_total"):
        requests_by_route[labels["route"]] = requests_by_route.get(labels["route"], 0) + value
    counts = {labels["route"]: value
              for labels, value in metrics.series(duration + "_count")}
    assert requests_by_route == counts
    session.close()


def test_unknown_route_on_a_keep_alive_connection_is_counted_under_none(server, session):
    """The route label must not leak from the previous request on the same connection."""
    ok_data(session.get(server.url + "/healthz"))
    assert_error(session.get(server.url + "/no/such/route"), 404, "not_found")
    metrics = scrape(server)
    assert metrics.value("m1_http_requests_total", route="none", method="GET",
                         status="404") == 1
    assert metrics.value("m1_http_requests_total", route="/healthz", method="GET",
                         status="404") is None


# --- races forced in-process (ChunkStore directly): the HTTP layer cannot time them ----------

@pytest.fixture
def store(tmp_path):
    s = chunkstore.ChunkStore(str(tmp_path / "store"))
    yield s
    s.close()


def put(store, file_id, index, data, last=False):
    path, f = store.new_part_file()
    with f:
        f.write(data)
    return store.put_chunk(file_id, index, path, len(data), is_last=last)


def test_listing_never_returns_an_upload_deleted_while_the_page_is_read(store):
    for name in ("a", "b", "c"):
        put(store, name, 0, EBML + b"x" * 10)
    read_page = store._ledger.page

    def page_then_delete(limit, after):
        ids = read_page(limit, after)
        store.delete(ids[0])               # a DELETE request lands between the two reads
        return ids

    store._ledger.page = page_then_delete
    uploads = store.list_uploads(10)
    assert None not in uploads
    assert [u.file_id for u in uploads] == ["b", "a"]


def test_retention_never_deletes_an_upload_that_a_chunk_just_revived(store):
    put(store, "resumed", 0, EBML + b"x" * 10)
    db = sqlite3.connect(os.path.join(store.root, "m1.sqlite3"))
    with db:
        db.execute("UPDATE uploads SET updated_at = updated_at - 7200")
    db.close()
    list_expired = store._ledger.expired

    def expired_then_chunk(idle_before, completed_before):
        ids = list_expired(idle_before, completed_before)
        assert ids == ["resumed"]
        put(store, "resumed", 1, b"acknowledged")        # the client resumes: a 200
        return ids

    store._ledger.expired = expired_then_chunk
    store.sweep(incomplete_ttl=HOUR)
    upload = store.status("resumed")
    assert upload is not None and upload.next_index == 2


def test_sha256_after_delete_and_reupload_is_that_of_the_new_file(store):
    store._hasher.stop()                       # hold the hasher: it is busy elsewhere
    put(store, "same", 0, EBML + b"old" * 10, last=True)   # completed: hash queued
    assert store.delete("same")
    fresh = [EBML + b"new" * 10, b"tail" * 5]
    put(store, "same", 0, fresh[0])            # the same id starts again, incomplete
    store._hasher._queue.put(None)
    store._hasher._run()                       # the hasher reaches the queued id now
    store._hasher._thread = threading.Thread(target=store._hasher._run, daemon=True)
    store._hasher._thread.start()
    put(store, "same", 1, fresh[1], last=True)
    digest = wait_until(lambda: store.status("same").sha256, message="the sha256")
    assert digest == hashlib.sha256(b"".join(fresh)).hexdigest()
