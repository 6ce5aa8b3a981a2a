"""The storage contract (issue 14): the same answers and the same bytes from every backend.

storage.py holds the chunk rules as pure functions and the guarantees every store gives;
chunkstore.py (local disk) and s3store.py (a bucket: the SeaweedFS the suite starts) both
implement it. Here:
- the rules on their own (pure functions, no store);
- ONE table of chunk sequences (TABLE), each step with the answer it must get, run against
  both backends in process (their put_chunk) and over HTTP (a real server per backend): after
  each sequence, the upload's state and its assembled bytes;
- the races the table cannot write down: 8 chunks at once under a 1 MiB byte budget, and a
  retention sweep racing a chunk (on one node; on two nodes sharing a bucket);
- a regression test per defect of the issue that the table does not already hold (a deletion's
  reason, the budget race through a token over HTTP);
- read_appended (issue 18): the assembled prefix at any offset, while the upload grows (S3:
  from folded and unfolded chunk objects), after completion, and nothing once it is deleted.

Local-only defects (a full disk, links inside the upload folder, stray entries at start-up)
are in test_chunkstore.py and test_crash.py; S3 retries in test_s3store.py.
"""
from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time

import pytest
import requests

from conftest import (ROOT, S3_BUCKET, ServerProcess, get_status, s3_server_args,
                      send_chunk, wait_until)

sys.path.insert(0, ROOT)
import auth  # noqa: E402
import storage  # noqa: E402
from storage import DUPLICATE, EARLY, IN_ORDER, StoreError  # noqa: E402

EBML = b"\x1a\x45\xdf\xa3"
KiB = 1 << 10
MiB = 1 << 20
API_KEY = "contract-test-key-0123456789"

# ---------------------------------------------------------------------------------------------
# The rules, as pure functions
# ---------------------------------------------------------------------------------------------


def refused(call, *args):
    with pytest.raises(StoreError) as caught:
        call(*args)
    return caught.value.status, caught.value.code


@pytest.mark.parametrize("index, next_index, stored, last, highest, is_last, expected", [
    (0, 0, None, None, -1, False, IN_ORDER),
    (3, 1, None, None, 0, False, EARLY),
    (3, 1, None, None, 0, True, EARLY),                 # completion first
    (0, 2, True, None, 1, False, DUPLICATE),
    (2, 1, True, None, 2, False, DUPLICATE),            # waiting, sent again
    (2, 3, True, None, 2, True, DUPLICATE),             # the last, retried: may name it
    (4, 4, None, 5, 5, False, IN_ORDER),                # the gap before a known last
])
def test_classify_chunk_says_what_a_chunk_is(index, next_index, stored, last, highest,
                                             is_last, expected):
    assert storage.classify_chunk(index, next_index, stored, last, highest, is_last) == expected


@pytest.mark.parametrize("index, next_index, stored, last, highest, is_last, code", [
    (1, 3, False, None, 2, False, "chunk_conflict"),    # other bytes, assembled
    (5, 3, False, None, 5, False, "chunk_conflict"),    # other bytes, waiting
    (1, 3, True, None, 2, True, "completion_conflict"),  # the stale "completed" retry
    (1, 1, None, None, 3, True, "completion_conflict"),  # cannot be last: 3 was received
    (4, 3, None, 3, 3, False, "completion_conflict"),   # past the end
    (2, 2, None, 3, 3, True, "completion_conflict"),    # a second, different last chunk
])
def test_classify_chunk_refuses_with_409(index, next_index, stored, last, highest, is_last,
                                         code):
    assert refused(storage.classify_chunk, index, next_index, stored, last, highest,
                   is_last) == (409, code)


def test_classify_chunk_checks_the_bytes_before_the_completion():
    """Other bytes at an index are a conflict whatever their status says."""
    assert refused(storage.classify_chunk, 1, 3, False, 5, 3, True) == (409, "chunk_conflict")


def test_an_assembled_chunk_the_store_does_not_know_is_an_inconsistency_not_a_new_chunk():
    assert refused(storage.classify_chunk, 1, 3, None, None, 2, False) == \
        (500, "storage_inconsistent")


def test_check_completion_at_and_past_the_last_index():
    storage.check_completion(5, False, 5, 5)                     # at the edge
    storage.check_completion(5, True, 5, 5)
    assert refused(storage.check_completion, 6, False, 5, 5) == (409, "completion_conflict")


@pytest.mark.parametrize("mime, ext, recorded, assembled, expected", [
    (None, None, None, False, "webm"),                           # a new upload, no type
    ("video/mp4", None, None, False, "mp4"),
    (None, "mp4", "video/mp4", True, "mp4"),                     # later chunks need not say
    ("video/webm;codecs=vp9", "webm", "video/webm", True, "webm"),
    ("video/mp4", "webm", None, False, "mp4"),                   # first named, nothing yet
])
def test_choose_extension(mime, ext, recorded, assembled, expected):
    assert storage.choose_extension(mime, ext, recorded, assembled) == expected


@pytest.mark.parametrize("ext, recorded, assembled", [
    ("webm", "video/webm", False),                               # a type was named already
    ("webm", None, True),                                        # bytes are assembled
])
def test_choose_extension_refuses_another_container(ext, recorded, assembled):
    assert refused(storage.choose_extension, "video/mp4", ext, recorded, assembled) == \
        (409, "mime_type_conflict")


def test_budgets_at_and_past_the_edge_in_order():
    token = auth.Grant(False, {"fid": "x", "r": ["upload"], "max": 1000}).budget()
    limit = storage.upload_budget(900)
    storage.check_budgets(400, 500, [token, storage.upload_budget(1000)])   # exactly at both
    assert refused(storage.check_budgets, 400, 601, [token, limit]) == (403, "token_budget_spent")
    assert refused(storage.check_budgets, 400, 501, [token, limit]) == (413, "upload_too_large")
    storage.check_budgets(10 ** 12, 1, [None, storage.upload_budget(None)])   # no caps
    assert auth.Grant(True).budget() is None                     # the key has no budget


@pytest.mark.parametrize("completed_at, updated_at, expired", [
    (None, 899.0, True), (None, 900.0, False),                   # idle: ttl 100 at now 1000
    (499.0, 999.0, True), (500.0, 0.0, False),                   # completed: retention 500
])
def test_is_expired_at_and_past_the_edge(completed_at, updated_at, expired):
    assert storage.is_expired(completed_at, updated_at, 1000.0, 100, 500) is expired
    assert storage.is_expired(completed_at, updated_at, 1000.0, None, None) is False


def test_missing_chunks_are_listed_up_to_the_cap():
    assert storage.missing_chunks(2, None, [5]) == []
    assert storage.missing_chunks(2, 6, [4, 6]) == [2, 3, 5]
    assert len(storage.missing_chunks(0, 10 ** 6, [])) == storage.MAX_MISSING_LISTED


# ---------------------------------------------------------------------------------------------
# The table: one list of chunk sequences, the same answers from every backend
# ---------------------------------------------------------------------------------------------
# A step is (index, bytes, status, answer) or ("delete",). Bytes are named: "c3" is chunk 3's
# bytes, "x3" other bytes of the same length, "y3" other bytes of another length, "n3" the
# bytes of chunk 3 of a new upload under the same id, "e" no bytes at all. The answer is "ok"
# (stored), "dup" (acknowledged as a duplicate) or the (status, code) of the refusal. After
# the steps: the upload's state and the bytes it holds in order (None: no upload).

U, C = "uploading", "completed"
CONFLICT = (409, "chunk_conflict")
COMPLETION = (409, "completion_conflict")

TABLE = {
    "in_order": ([(0, "c0", U, "ok"), (1, "c1", U, "ok"), (2, "c2", C, "ok"),
                  (0, "c0", U, "dup"), (1, "c1", C, COMPLETION)],
                 C, ["c0", "c1", "c2"]),
    "every_chunk_twice": ([(0, "c0", U, "ok"), (0, "c0", U, "dup"), (1, "c1", U, "ok"),
                           (1, "c1", U, "dup"), (2, "c2", C, "ok"), (2, "c2", C, "dup")],
                          C, ["c0", "c1", "c2"]),
    "completion_first": ([(3, "c3", C, "ok"), (0, "c0", U, "ok"), (1, "c1", U, "ok"),
                          (2, "c2", U, "ok")],
                         C, ["c0", "c1", "c2", "c3"]),
    "empty_last_chunk": ([(0, "c0", U, "ok"), (1, "c1", U, "ok"), (2, "e", C, "ok")],
                         C, ["c0", "c1"]),
    "stale_completed_retry": ([(0, "c0", U, "ok"), (1, "c1", U, "ok"), (2, "c2", U, "ok"),
                               (1, "c1", C, COMPLETION), (3, "c3", C, "ok")],
                              C, ["c0", "c1", "c2", "c3"]),
    "gaps_filled_late": ([(0, "c0", U, "ok"), (3, "c3", U, "ok"), (5, "c5", C, "ok"),
                          (1, "c1", U, "ok"), (4, "c4", U, "ok"), (2, "c2", U, "ok")],
                         C, ["c0", "c1", "c2", "c3", "c4", "c5"]),
    "past_the_end": ([(0, "c0", U, "ok"), (1, "c1", U, "ok"), (2, "c2", C, "ok"),
                      (3, "c3", U, COMPLETION)],
                     C, ["c0", "c1", "c2"]),
    "conflicting_bytes": ([(0, "c0", U, "ok"), (1, "c1", U, "ok"), (1, "x1", U, CONFLICT),
                           (1, "y1", U, CONFLICT), (3, "c3", U, "ok"), (3, "x3", C, CONFLICT),
                           (2, "c2", U, "ok"), (3, "c3", C, "dup")],
                          C, ["c0", "c1", "c2", "c3"]),
    "second_different_last": ([(0, "c0", U, "ok"), (2, "c2", C, "ok"), (1, "c1", C, COMPLETION),
                               (3, "c3", C, COMPLETION), (1, "c1", U, "ok")],
                              C, ["c0", "c1", "c2"]),
    "unfinished": ([(0, "c0", U, "ok"), (1, "c1", U, "ok"), (3, "c3", U, "ok")],
                   U, ["c0", "c1"]),
    "delete_then_reupload": ([(0, "c0", U, "ok"), (1, "c1", U, "ok"), ("delete",),
                              (0, "n0", U, "ok"), (1, "n1", C, "ok")],
                             C, ["n0", "n1"]),
    "deleted_and_gone": ([(0, "c0", U, "ok"), (1, "c1", C, "ok"), ("delete",)], None, None),
}


def chunk_bytes(row, name):
    """The bytes a label names, the same every time for one row (seeded by its name)."""
    if name == "e":
        return b""
    kind, index = name[0], int(name[1:])
    seed = "%s:%s:%d" % (row, "n" if kind == "n" else "c", index)
    body = (seed.encode("ascii") * 40)[:180 + 17 * index]
    if kind == "x":
        body = bytes(b ^ 0x55 for b in body)
    elif kind == "y":
        body += b"+"
    return (EBML + body) if index == 0 else body


def run_row(backend, row, file_id):
    steps, final_state, final_bytes = TABLE[row]
    for number, step in enumerate(steps):
        if step[0] == "delete":
            assert backend.delete(file_id), (row, number)
            continue
        index, name, status, answer = step
        got = backend.put(file_id, index, chunk_bytes(row, name), status == C)
        assert got == answer, "%s, step %d %r: %r" % (row, number, step, got)
    state, held = backend.outcome(file_id)
    assert state == final_state, (row, state)
    if final_bytes is not None:
        assert held == b"".join(chunk_bytes(row, name) for name in final_bytes), row


# -- the backends, in process ------------------------------------------------------------------

class StoreBackend:
    """A store driven through its put_chunk, answers as the table writes them."""

    def __init__(self, store, read_bytes):
        self.store = store
        self.read_bytes = read_bytes              # (store, upload) -> bytes held in order

    def put(self, file_id, index, data, last, budget=None):
        path, f = self.store.new_part_file()
        with f:
            f.write(data)
        try:
            result = self.store.put_chunk(file_id, index, path, len(data), last,
                                          budget=budget)
        except StoreError as error:
            return error.status, error.code
        return "dup" if result.duplicate else "ok"

    def delete(self, file_id):
        return self.store.delete(file_id)

    def outcome(self, file_id):
        upload = self.store.status(file_id)
        if upload is None:
            return None, None
        return ("completed" if upload.completed else "uploading"), \
            self.read_bytes(self.store, upload)


def local_bytes(store, upload):
    with open(store.media_path(upload), "rb") as f:
        return f.read()[:upload.bytes_appended]


def bucket_bytes(store, upload):
    """The object once complete; before, the contiguous chunk objects (small uploads: no
    part is folded yet)."""
    if upload.completed:
        with store.media_file(upload) as path, open(path, "rb") as f:
            return f.read()
    m = upload.manifest
    prefix = "%s/uploads/%s/%s/c/" % (store.prefix, upload.file_id, m.generation)
    return b"".join(store.client.get_object(prefix + "%07d" % index).body
                    for index in range(upload.next_index))


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    stores = []

    def make(**kw):
        if request.param == "local":
            import chunkstore
            store = chunkstore.ChunkStore(str(tmp_path / ("local%d" % len(stores))), **kw)
        else:
            import s3store
            weed = request.getfixturevalue("seaweed")
            store = s3store.S3Store(weed.client(S3_BUCKET), backend.prefix,
                                    str(tmp_path / ("s3node%d" % len(stores))),
                                    part_bytes=5 * MiB, **kw)
        stores.append(store)
        return store

    backend = StoreBackend(None, local_bytes if request.param == "local" else bucket_bytes)
    backend.kind = request.param
    backend.prefix = "contract-%s" % os.urandom(4).hex()
    backend.make = make
    backend.store = make()
    yield backend
    for store in stores:
        store.close()


@pytest.mark.parametrize("row", sorted(TABLE))
def test_the_contract_table_in_process(backend, row):
    run_row(backend, row, "t_" + row)


# -- the backends, over HTTP -------------------------------------------------------------------

class HttpBackend:
    """A real server: the table's answers from the HTTP replies."""

    def __init__(self, srv):
        self.srv = srv
        self.session = requests.Session()

    def put(self, file_id, index, data, last):
        response = send_chunk(self.session, self.srv.url, file_id, index, data,
                              status=C if last else U)
        if response.status_code != 200:
            return response.status_code, response.json()["error"]["code"]
        return "dup" if response.json()["data"].get("duplicate") else "ok"

    def delete(self, file_id):
        return self.session.delete(self.srv.url + "/api/video/" + file_id).status_code == 200

    def outcome(self, file_id):
        data = get_status(self.session, self.srv.url, file_id).json()["data"]
        if not data["exists"]:
            return None, None
        return data["state"], self.srv.storage.received(file_id)


@pytest.fixture(scope="module")
def http_servers(tmp_path_factory):
    started = {}

    def get(kind):
        if kind not in started:
            directory = tmp_path_factory.mktemp("contract-" + kind)
            args, env = ["--storage", "local", "--processing", "off"], {}
            if kind == "s3":
                from conftest import BucketStorageView, s3_backend
                prefix = "contract-http-%s" % os.urandom(4).hex()
                args, env = s3_server_args(prefix)
                args += ["--processing", "off"]
            srv = ServerProcess(directory, args=args, env=env)
            if kind == "s3":
                srv.storage = BucketStorageView(s3_backend().client(S3_BUCKET), prefix)
            started[kind] = srv.start()
        return started[kind]

    yield get
    for srv in started.values():
        srv.stop()


@pytest.mark.parametrize("kind", ["local", "s3"])
@pytest.mark.parametrize("row", sorted(TABLE))
def test_the_contract_table_over_http(request, http_servers, kind, row):
    if kind == "s3":
        request.getfixturevalue("seaweed")
    backend = HttpBackend(http_servers(kind))
    try:
        run_row(backend, row, "h_" + row)
    finally:
        backend.session.close()


# ---------------------------------------------------------------------------------------------
# Races
# ---------------------------------------------------------------------------------------------

def test_eight_chunks_at_once_never_pass_a_one_mib_budget_together(backend):
    """The token's budget is checked under the upload's lock, counting the chunks stored
    meanwhile: 8 concurrent 512 KiB chunks under 1 MiB, exactly two get in."""
    budget = auth.Grant(False, {"fid": "race", "r": ["upload"], "max": MiB}).budget()
    chunk = EBML + os.urandom(512 * KiB - len(EBML))
    answers = [None] * 8
    start = threading.Barrier(8)

    def send(index):
        start.wait()
        answers[index] = backend.put("race", index, chunk, False, budget=budget)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert (answers.count("ok"), answers.count((403, "token_budget_spent"))) == (2, 6), answers
    assert backend.store.status("race").bytes_held == MiB


def age_upload(backend, file_id):
    """(now, incomplete_ttl) for a sweep that finds `file_id` idle, while any chunk stored
    from here on is recent. Local: the ledger is set back an hour. S3: LastModified has
    whole seconds, so the cut falls between the upload's last second and the next one."""
    if backend.kind == "local":
        db = sqlite3.connect(os.path.join(backend.store.root, "m1.sqlite3"))
        with db:
            db.execute("UPDATE uploads SET updated_at = updated_at - 7200 WHERE file_id = ?",
                       (file_id,))
        db.close()
        return time.time(), 3600.0
    cut = int(backend.store.status(file_id).updated_at) + 1.5
    wait_until(lambda: time.time() > cut + 1, timeout=5, message="the next whole second")
    return cut + 60.0, 60.0


def test_a_sweep_racing_a_chunk_never_deletes_the_acknowledged_chunk(backend):
    """The sweep lists an idle upload; before it deletes it, the client resumes and chunk 1
    is acknowledged. The sweep looks again under the upload's lock and keeps it."""
    assert backend.put("revived", 0, EBML + b"first", False) == "ok"
    now, ttl = age_upload(backend, "revived")
    store = backend.store
    list_expired = store.expired

    def expired_then_chunk(*args):
        ids = list_expired(*args)
        assert ids == ["revived"]
        assert backend.put("revived", 1, b"acknowledged", False) == "ok"    # a 200
        return ids

    store.expired = expired_then_chunk
    assert store.sweep(incomplete_ttl=ttl, now=now) == []
    upload = store.status("revived")
    assert upload is not None and upload.next_index == 2
    store.expired = list_expired
    assert store.sweep(incomplete_ttl=ttl, now=now) == []          # still fresh


def test_deletions_say_why_and_whether_the_upload_had_completed(backend):
    events = []
    backend.store.add_listener(lambda event: events.append(event))
    assert backend.put("asked", 0, EBML + b"done", True) == "ok"
    assert backend.put("idle", 0, EBML + b"waiting", False) == "ok"
    assert backend.delete("asked")
    now, ttl = age_upload(backend, "idle")
    assert backend.store.sweep(incomplete_ttl=ttl, now=now) == ["idle"]
    deleted = [(e["fileId"], e["reason"], e["completed"]) for e in events
               if e["type"] == "deleted"]
    assert deleted == [("asked", "requested", True), ("idle", "expired", False)]
    assert backend.store.status("idle") is None


@pytest.fixture
def two_nodes(backend):
    if backend.kind != "s3":
        pytest.skip("two nodes share a bucket only in S3 mode")
    return backend.store, backend.make()


def put_on(store, file_id, index, data):
    return StoreBackend(store, None).put(file_id, index, data, False)


def test_a_chunk_stored_on_another_node_after_the_sweep_looked_clears_its_mark(two_nodes):
    """Node A's sweep has marked the upload `expiring` and judged it idle; node B stores a
    chunk and acknowledges it before A sets `deleting`: B clears the mark, so A keeps it."""
    a, b = two_nodes
    assert put_on(a, "cross", 0, EBML + b"first") == "ok"
    snapshot = a._snapshot

    def judged_then_chunk(m):
        state = snapshot(m)
        if m.data.get("expiring"):
            assert put_on(b, "cross", 1, b"acknowledged by B") == "ok"
        return state

    a._snapshot = judged_then_chunk
    assert a.sweep(incomplete_ttl=0.0, now=time.time() + 3600) == []
    upload = b.status("cross")
    assert upload is not None and upload.next_index == 2
    assert "expiring" not in upload.manifest.data


def test_a_chunk_stored_while_another_node_deletes_starts_the_upload_afresh(two_nodes):
    """Node B has stored its chunk object when node A deletes the upload: the chunk went with
    the old upload, so B stores it again in a new one (as a chunk that arrives after a
    deletion does) before it answers 200. Nothing acknowledged is lost."""
    a, b = two_nodes
    assert put_on(a, "gone", 0, EBML + b"old") == "ok"
    store_chunk, deleted = b._store_chunk, []

    def stored_then_deleted(*args):
        result = store_chunk(*args)
        if not deleted:
            deleted.append(a.delete("gone"))
        return result

    b._store_chunk = stored_then_deleted
    assert put_on(b, "gone", 1, b"acknowledged by B") == "ok"
    assert deleted == [True]
    upload = a.status("gone")
    assert (upload.next_index, upload.stashed) == (0, [1])
    assert upload.created_at > 0 and upload.manifest.generation


# ---------------------------------------------------------------------------------------------
# Regressions over HTTP: the budget race through a real token
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["local", "s3"])
def test_eight_requests_at_once_with_a_one_mib_token_store_one_mib(request, server_factory,
                                                                  kind):
    args = ["--storage", "local"]
    env = {"M1_API_KEY": API_KEY}
    if kind == "s3":
        request.getfixturevalue("seaweed")
        args, s3_env = s3_server_args("budget-%s" % os.urandom(4).hex())
        env.update(s3_env)
    srv = server_factory(args=args + ["--processing", "off"], env=env)
    minted = requests.post(srv.url + "/api/video/tokens", timeout=10,
                           headers={"Authorization": "Bearer " + API_KEY},
                           json={"fileId": "budget_race", "rights": ["upload", "read"],
                                 "maxBytes": MiB})
    assert minted.status_code == 200, minted.text
    token = minted.json()["data"]["token"]
    chunk = EBML + os.urandom(512 * KiB - len(EBML))
    answers = [None] * 8
    start = threading.Barrier(8)

    def send(index):
        with requests.Session() as session:
            session.headers["Authorization"] = "Bearer " + token
            start.wait()
            response = send_chunk(session, srv.url, "budget_race", index, chunk)
            answers[index] = (response.status_code,
                              None if response.ok else response.json()["error"]["code"])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert (answers.count((200, None)), answers.count((403, "token_budget_spent"))) == (2, 6), \
        answers
    with requests.Session() as session:
        session.headers["Authorization"] = "Bearer " + token
        data = get_status(session, srv.url, "budget_race").json()["data"]
    assert data["chunksReceived"] == 2


# ---------------------------------------------------------------------------------------------
# read_appended (issue 18): the assembled prefix, while it grows and after
# ---------------------------------------------------------------------------------------------

def assert_reads(store, upload, expected):
    """read_appended at offsets across the chunk (and S3 part) boundaries, with small and
    large windows, gives exactly the bytes of `expected` (the prefix held so far)."""
    assert upload.bytes_appended == len(expected)
    offsets = sorted({0, 1, len(expected) // 3, len(expected) // 2, 5 * MiB - 3, 5 * MiB,
                      len(expected) - 1, len(expected), len(expected) + 10})
    for offset in offsets:
        for window in (1, 7000, 3 * MiB, 64 * MiB):
            got = store.read_appended(upload, offset, window)
            assert got == expected[offset:offset + window], (offset, window, len(got))


def test_read_appended_gives_the_assembled_prefix_while_it_grows_and_after(backend):
    store = backend.store
    chunks = [EBML + os.urandom(3000), os.urandom(2 * MiB), b"", os.urandom(2 * MiB + 11),
              os.urandom(2 * MiB), os.urandom(5000)]
    for index in (0, 1, 2, 4):                           # 3 is missing: 4 waits
        assert backend.put("grow", index, chunks[index], False) == "ok"
    assert_reads(store, store.status("grow"), b"".join(chunks[:3]))
    assert backend.put("grow", 3, chunks[3], False) == "ok"
    if backend.kind == "s3":                             # a part folded in the background
        wait_until(lambda: store.status("grow").manifest.parts, 60, 0.05, "a folded part")
    upload = store.status("grow")
    assert_reads(store, upload, b"".join(chunks[:5]))
    assert backend.put("grow", 5, chunks[5], True) == "ok"
    done = store.status("grow")
    assert done.completed
    assert_reads(store, done, b"".join(chunks))
    assert_reads(store, upload, b"".join(chunks[:5]))    # an older snapshot: still its prefix
    assert backend.delete("grow")
    assert store.read_appended(done, 0, 100) == b""      # gone
