"""tus in S3 mode with two nodes on one bucket (issue 9): any request of a tus upload may reach
any node, since every node reads the upload's record (P/tus/records/<id>.json) and bytes from
the bucket. Real server processes, real SeaweedFS (tests/seaweed.py).

- created and partly sent on A, HEAD and the rest on B: byte-exact, the same status on both;
- partials made on different nodes joined by a final created on the other one;
- termination on B of an upload made on A: 404 on both, nothing left in the bucket;
- an abandoned upload expires (the sweep of either node finds it through its open marker)
  and answers 410 on both;
- kill -9 of A mid-PATCH: tuspy resumes on B from HEAD's offset, byte-exact;
- two PATCHes of one upload at once on two nodes (claims are per process): the store's chunk
  indices let one of them win, the other fails with a clean tus 409, the bytes stay exact;
- one fileId created on both nodes at once: one 201, one 409 file_id_taken;
- in process: every leftover of a crash between two steps of the bucket table (markers
  without records, records without markers) is tidied by the sweep's calls.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest
import requests

import _tus
from _tus import TUS, OpenPatch, create, head, location, metadata, new_upload, patch
from conftest import (S3_BUCKET, SAMPLE_WEBM, BucketStorageView, get_status, need, s3_server_args,
                      wait_until)

PIECE = 16 << 10


class Pair:
    """Nodes A and B sharing s3://m1test/<prefix>, and a view of what the bucket holds."""

    def __init__(self, server_factory, seaweed, extra=(), b_extra=()):
        self.prefix = "tus2-%s" % os.urandom(4).hex()
        args, env = s3_server_args(self.prefix, seaweed)
        args += ["--tus-piece-size", str(PIECE)] + list(extra)
        self.a = server_factory(args=args, env=env)
        self.b = server_factory(args=args + list(b_extra), env=env)
        self.view = BucketStorageView(seaweed.client(S3_BUCKET), self.prefix)

    def tus_keys(self, folder):
        """Names under P/tus/<folder>/ (records/, open/, gone/)."""
        start = "%s/tus/%s/" % (self.prefix, folder)
        return sorted(info.key[len(start):] for info in self.view.client.iter_objects(start))


@pytest.fixture
def s():
    with requests.Session() as session:
        yield session


def status_of(s, srv, file_id):
    data = get_status(s, srv.url, file_id).json()["data"]
    return {key: data.get(key) for key in ("exists", "state", "fileSize", "sha256", "tus")}


def assert_complete_on_both(s, pair, file_id, source):
    """Byte-exact from either node, and both nodes tell the same (hashed) status."""
    digest = hashlib.sha256(source).hexdigest()
    for srv in (pair.a, pair.b):
        wait_until(lambda: status_of(s, srv, file_id)["sha256"], timeout=60, message="sha256")
        assert _tus.video_bytes(s, srv.url, file_id) == source
    first, second = status_of(s, pair.a, file_id), status_of(s, pair.b, file_id)
    assert first == second
    assert first["state"] == "completed" and first["fileSize"] == len(source)
    assert first["sha256"] == digest
    return first


# ---------------------------------------------------------------------------------------------
# One upload, two nodes
# ---------------------------------------------------------------------------------------------

def test_created_and_patched_on_a_finished_on_b(server_factory, seaweed, s, sample_webm):
    pair = Pair(server_factory, seaweed)
    file_id = "across_%s" % os.urandom(3).hex()
    path = new_upload(s, pair.a.url, len(sample_webm),
                      meta=metadata(fileId=file_id, filename="clip.webm"))
    assert pair.tus_keys("records") == [file_id + ".json"]
    assert pair.tus_keys("open") == [file_id]                 # open: the sweep looks at it
    first = patch(s, pair.a.url, path, 0, sample_webm[:60000])
    assert first.status_code == 204 and first.headers["Upload-Offset"] == "60000"
    answer = head(s, pair.b.url, path)
    assert answer.status_code == 200
    assert answer.headers["Upload-Offset"] == "60000"
    assert answer.headers["Upload-Length"] == str(len(sample_webm))
    assert answer.headers["Upload-Expires"] == first.headers["Upload-Expires"]
    assert status_of(s, pair.a, file_id) == status_of(s, pair.b, file_id)
    rest = patch(s, pair.b.url, path, 60000, sample_webm[60000:])
    assert rest.status_code == 204, rest.text
    assert rest.headers["Upload-Offset"] == str(len(sample_webm))
    assert head(s, pair.a.url, path).headers["Upload-Offset"] == str(len(sample_webm))
    status = assert_complete_on_both(s, pair, file_id, sample_webm)
    assert status["tus"] == {"uploadUrl": path, "uploadLength": len(sample_webm),
                             "filename": "clip.webm"}
    assert pair.tus_keys("open") == []                        # finished: nothing to sweep
    assert pair.view.early_chunks(file_id) == []


def test_one_file_id_created_on_both_nodes_at_once_is_given_once(server_factory, seaweed):
    """The record is created If-None-Match: *, so of two creations racing on two nodes one
    gets 201 and the other 409 file_id_taken, whichever comes first."""
    pair = Pair(server_factory, seaweed)
    for attempt in range(3):
        file_id = "race_%d_%s" % (attempt, os.urandom(3).hex())
        ready = threading.Barrier(2)
        answers = []

        def create_on(srv):
            with requests.Session() as session:
                ready.wait(10)
                answers.append(create(session, srv.url, 100, meta=metadata(fileId=file_id)))

        threads = [threading.Thread(target=create_on, args=(srv,)) for srv in (pair.a, pair.b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(r.status_code for r in answers) == [201, 409]
        refused = [r for r in answers if r.status_code == 409][0]
        assert refused.json()["error"]["code"] == "file_id_taken"
        assert refused.headers["Tus-Resumable"] == "1.0.0"
        assert pair.tus_keys("records").count(file_id + ".json") == 1


def test_partials_from_both_nodes_joined_by_a_final_on_the_other(server_factory, seaweed, s,
                                                                 sample_webm):
    pair = Pair(server_factory, seaweed)
    cut = [0, 70000, 150000, len(sample_webm)]
    makers = [pair.a, pair.b, pair.a]
    parts = []
    for i, srv in enumerate(makers):
        piece = sample_webm[cut[i]:cut[i + 1]]
        part = new_upload(s, srv.url, len(piece), concat="partial")
        assert patch(s, srv.url, part, 0, piece).status_code == 204
        parts.append(part)
    assert head(s, pair.b.url, parts[0]).headers["Upload-Concat"] == "partial"
    file_id = "joined_%s" % os.urandom(3).hex()
    final = create(s, pair.b.url, meta=metadata(fileId=file_id),
                   concat="final;" + " ".join(parts))
    assert location(final) == "/files/" + file_id
    answer = head(s, pair.a.url, "/files/" + file_id)
    assert answer.status_code == 200
    assert answer.headers["Upload-Offset"] == str(len(sample_webm))
    assert answer.headers["Upload-Concat"] == "final;" + " ".join(parts)
    assert patch(s, pair.a.url, "/files/" + file_id, 0, b"x").status_code == 403
    assert_complete_on_both(s, pair, file_id, sample_webm)
    # The partials are intact (usable again) until they expire; they are no videos.
    for part in parts:
        assert head(s, pair.a.url, part).status_code == 200
        assert get_status(s, pair.a.url, _tus.upload_id(part)).json()["data"]["exists"] is False
    again = create(s, pair.a.url, concat="final;" + " ".join(parts[:2]))
    assert _tus.video_bytes(s, pair.b.url, _tus.upload_id(location(again))) == \
        sample_webm[:cut[2]]


def test_termination_on_b_of_an_upload_made_on_a(server_factory, seaweed, s, sample_webm):
    pair = Pair(server_factory, seaweed)
    file_id = "gone_%s" % os.urandom(3).hex()
    path = new_upload(s, pair.a.url, len(sample_webm), meta=metadata(fileId=file_id))
    assert patch(s, pair.a.url, path, 0, sample_webm[:40000]).status_code == 204
    assert pair.view.holds(file_id)
    response = s.delete(pair.b.url + path, headers=TUS)
    assert response.status_code == 204
    assert response.headers["Tus-Resumable"] == "1.0.0"
    for srv in (pair.a, pair.b):
        assert head(s, srv.url, path).status_code == 404
        assert patch(s, srv.url, path, 40000, sample_webm[40000:]).status_code == 404
        assert get_status(s, srv.url, file_id).json()["data"]["exists"] is False
    assert not pair.view.holds(file_id)
    assert pair.tus_keys("records") == [] and pair.tus_keys("open") == []
    assert pair.tus_keys("gone") == []                        # terminated: no tombstone


def test_an_abandoned_upload_expires_and_is_410_on_both(server_factory, seaweed, s,
                                                        sample_webm):
    pair = Pair(server_factory, seaweed, extra=["--tus-expiry", "1"])
    path = new_upload(s, pair.a.url, len(sample_webm))
    file_id = _tus.upload_id(path)
    assert patch(s, pair.a.url, path, 0, sample_webm[:1000]).status_code == 204
    finished = new_upload(s, pair.b.url, len(sample_webm))
    assert patch(s, pair.b.url, finished, 0, sample_webm).status_code == 204
    # No request asks: a node's sweep finds it through its open marker and removes it.
    wait_until(lambda: not pair.view.holds(file_id), timeout=30, message="sweep")
    for srv in (pair.a, pair.b):
        answer = head(s, srv.url, path)
        assert answer.status_code == 410
        assert answer.headers["Tus-Resumable"] == "1.0.0"
        assert patch(s, srv.url, path, 1000, sample_webm[1000:]).status_code == 410
        assert head(s, srv.url, finished).status_code == 200    # finished: never expires
    assert pair.tus_keys("gone") == [file_id]                 # the tombstone
    assert pair.tus_keys("open") == []
    assert _tus.video_bytes(s, pair.a.url, _tus.upload_id(finished)) == sample_webm


# ---------------------------------------------------------------------------------------------
# A node dies mid-PATCH; two nodes PATCH one upload at once
# ---------------------------------------------------------------------------------------------

def test_kill_9_of_a_node_mid_patch_then_tuspy_resumes_on_the_other(server_factory, seaweed,
                                                                     s, sample_webm):
    try:
        from tusclient import client
    except ImportError:
        need(False, "tuspy is not installed (pip install -r requirements-test.txt)")
    pair = Pair(server_factory, seaweed)
    path = new_upload(s, pair.a.url, len(sample_webm), meta=metadata(filetype="video/webm"))
    request = OpenPatch(pair.a.url, path, 0, len(sample_webm))
    request.send(sample_webm[:100000])
    stored = 6 * PIECE                                  # the pieces filled so far are stored
    wait_until(lambda: _tus.offset_of(s, pair.b.url, path) == stored, timeout=30,
               message="pieces stored")
    pair.a.kill()                                       # kill -9 with the PATCH open
    request.close()
    uploader = client.TusClient(pair.b.url + "/files/").uploader(
        SAMPLE_WEBM, url=pair.b.url + path, chunk_size=40 << 10)
    assert uploader.offset == stored
    uploader.upload()
    file_id = _tus.upload_id(path)
    data = get_status(s, pair.b.url, file_id).json()["data"]
    assert data["state"] == "completed"
    wait_until(lambda: get_status(s, pair.b.url, file_id).json()["data"]["sha256"],
               timeout=60, message="sha256")
    assert get_status(s, pair.b.url, file_id).json()["data"]["sha256"] == \
        hashlib.sha256(sample_webm).hexdigest()
    assert _tus.video_bytes(s, pair.b.url, file_id) == sample_webm


@pytest.mark.parametrize("winner", ["a", "b"])
def test_two_patches_at_once_on_two_nodes_never_corrupt(server_factory, seaweed, s,
                                                        sample_webm, winner):
    """The same bytes sent by a client to A and (it thinks A is gone) to B, both requests
    open at once and both past their offset check. B cuts pieces of another size, so the two
    requests' next chunk differs: the one that stores it first wins and finishes, the other
    answers 409 with Tus-Resumable and stores nothing (claims are per process: only the
    store's chunk indices can decide between nodes)."""
    pair = Pair(server_factory, seaweed, b_extra=["--tus-piece-size", str(PIECE + PIECE // 2)])
    path = new_upload(s, pair.a.url, len(sample_webm))
    start = 3 * PIECE
    sent = {"a": 50000, "b": start + 1000}
    opened = {"a": OpenPatch(pair.a.url, path, 0, len(sample_webm))}
    opened["a"].send(sample_webm[:sent["a"]])
    # HEAD on B does not stop A's PATCH (another process): it reads the bucket.
    wait_until(lambda: _tus.offset_of(s, pair.b.url, path) == start, timeout=30,
               message="A's first pieces stored")
    opened["b"] = OpenPatch(pair.b.url, path, start, len(sample_webm) - start)
    opened["b"].send(sample_webm[start:sent["b"]])
    wait_until(lambda: _tus.incoming_bytes(pair.b.upload_dir) >= 1000, timeout=30,
               message="B receiving")                      # past its offset check
    answers = {}
    for name in (winner, "b" if winner == "a" else "a"):
        for at in range(sent[name], len(sample_webm), 8192):
            if not opened[name].send(sample_webm[at:at + 8192]):
                break                                      # it failed and stopped reading
        answers[name] = opened[name].response(timeout=60)
        opened[name].close()
    loser = answers["b" if winner == "a" else "a"]
    assert answers[winner].status == 204, answers[winner].body
    assert loser.status == 409, loser.body
    assert loser.headers["tus-resumable"] == "1.0.0"
    assert b'"offset_conflict"' in loser.body
    assert loser.headers["upload-offset"] == str(len(sample_webm))
    # HEAD on either node tells the true offset; the bytes are exact.
    for srv in (pair.a, pair.b):
        assert _tus.offset_of(s, srv.url, path) == len(sample_webm)
    assert_complete_on_both(s, pair, _tus.upload_id(path), sample_webm)


# ---------------------------------------------------------------------------------------------
# The bucket table: what a crash between two steps leaves is tidied (tus.py's docstring)
# ---------------------------------------------------------------------------------------------

def test_leftovers_of_a_crash_between_any_two_table_steps_are_tidied(seaweed, tmp_path,
                                                                    monkeypatch):
    """Each leftover is made by hand, as a crash would leave it; the sweep's own calls
    (expirable, purge_tombstones) tidy it. The grace of open markers is 0 here."""
    import s3store
    import tus
    from apierror import ApiError
    monkeypatch.setattr(tus, "MARKER_GRACE_S", 0.0)
    store = s3store.S3Store(seaweed.client(S3_BUCKET), "tidy-%s" % os.urandom(4).hex(),
                            str(tmp_path / "node"))
    try:
        table = tus.open_table(store)
        assert isinstance(table, tus._BucketTusTable)         # chosen by what the store has
        folder = store.json_folder(tus.BUCKET_FOLDER)

        def names(part):
            return sorted(name for name, _ in folder.list(part))

        def record(upload_id, kind="single"):
            return tus._Record.new(upload_id, kind, 100, None, None, None)

        # creation: marker written, crash before the record
        folder.put_marker(tus.OPEN + "no_record")
        # finishing: record done, crash before its marker went
        table.insert(record("finished"))
        folder.update(tus.RECORDS + "finished.json", table._get("finished"),
                      lambda data: data.update(done_at=1.0) or True)
        # expiry: tombstone written, crash before the record said so
        table.insert(record("not_expired"))
        folder.put_marker(tus.GONE + "not_expired")
        # expiry: record says expired, crash before the open marker went (and no tombstone)
        table.insert(record("expired"))
        folder.update(tus.RECORDS + "expired.json", table._get("expired"),
                      lambda data: data.update(expired_at=1.0) or True)
        # termination: record deleted, crash before its markers went
        table.insert(record("terminated"))
        folder.delete(tus.RECORDS + "terminated.json")
        folder.put_marker(tus.GONE + "terminated")
        table.insert(record("open_one", kind="partial"))       # and one that must stay

        with pytest.raises(ApiError) as taken:                 # a second creation: 409
            table.insert(record("open_one"))
        assert taken.value.status == 409 and taken.value.code == "file_id_taken"
        assert [r.id for r in table.expirable()] == ["not_expired", "open_one"]
        assert names(tus.OPEN) == ["not_expired", "open_one"]
        assert names(tus.GONE) == ["expired", "not_expired", "terminated"]
        table.purge_tombstones(before=time.time() + 60)        # every tombstone is "old"
        assert names(tus.GONE) == []
        assert table.get("expired") is None                    # purged with its tombstone
        assert table.get("not_expired").expired_at is None     # kept: it never expired
        assert table.get("open_one").open
        # and the normal way: expire, finish, delete leave no marker behind
        table.set_expired("open_one")
        assert table.get("open_one").expired_at and names(tus.GONE) == ["open_one"]
        table.set_done("not_expired")
        assert names(tus.OPEN) == []
        table.delete("open_one")
        assert names(tus.GONE) == [] and table.get("open_one") is None
    finally:
        store.close()
