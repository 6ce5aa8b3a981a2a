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
  indices let one of them win, the other fails with a clean tus 409, the bytes stay exact.
"""
from __future__ import annotations

import hashlib
import os

import pytest
import requests

import _tus
from _tus import TUS, OpenPatch, create, head, location, metadata, new_upload, patch
from conftest import (S3_BUCKET, SHARED, BucketStorageView, get_status, need, s3_server_args,
                      wait_until)

SAMPLE = os.path.join(SHARED, "data", "sample.webm")
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
        SAMPLE, url=pair.b.url + path, chunk_size=40 << 10)
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
