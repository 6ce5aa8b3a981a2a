"""Unit tests of chunkstore.py's in-place path (reserve_append and its writer) and of the
uploads' state it keeps in memory, without a server in between.

The HTTP suites (test_api.py, test_crash.py) prove the same through the real server; these
pin what the store promises: the next chunk of an upload is written once, into the video
file, while the upload's lock is free; everything else keeps the part-file path; every
failure cuts the bytes off and frees the tail; a twin of the chunk waits for it.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chunkstore  # noqa: E402
from chunkstore import (INLINE_DIGEST_BYTES, MAX_JOURNAL_CHUNK_BYTES,  # noqa: E402
                        SLOW_DISK_JOURNAL_CHUNK_BYTES, ChunkStore)
from storage import Budget, StoreError  # noqa: E402
from conftest import wait_until  # noqa: E402

EBML = b"\x1a\x45\xdf\xa3"


@pytest.fixture
def store(tmp_path):
    # The journal on (off by default): these tests follow small chunks into it and out.
    s = ChunkStore(str(tmp_path / "up"), writer_wait_s=5.0,
                   journal_chunk_bytes=SLOW_DISK_JOURNAL_CHUNK_BYTES)
    yield s
    s.close()


def put(store, file_id, index, data, last=False, mime_type=None):
    path, f = store.new_part_file()
    with f:
        f.write(data)
    return store.put_chunk(file_id, index, path, len(data), is_last=last, mime_type=mime_type)


def stream(writer, data, block=7):
    """Write `data` as the parser would: in pieces, as memoryviews."""
    view = memoryview(data)
    for at in range(0, len(data), block):
        assert writer.write(view[at:at + block]) == len(view[at:at + block])


def on_disk(store, file_id):
    with open(store.media_path(store.status(file_id)), "rb") as f:
        return f.read()


def started(store, file_id, first=EBML + b"chunk zero"):
    """An upload the ledger has, with chunk 0 stored (through the part file)."""
    put(store, file_id, 0, first)
    return first


def ledger_row(store, file_id):
    upload = store._ledger.load(file_id)
    return (upload.next_index, upload.bytes_appended, upload.last_index, upload.stashed,
            upload.stashed_bytes, upload.completed_at, upload.updated_at, upload.ext)


def remembered(store, file_id):
    upload = store._cache.upload(file_id)
    return (upload.next_index, upload.bytes_appended, upload.last_index, upload.stashed,
            upload.stashed_bytes, upload.completed_at, upload.updated_at, upload.ext)


# -- the in-place path --------------------------------------------------------------------

def test_next_chunk_is_written_into_the_video_file_as_it_arrives(store):
    first = started(store, "a")
    writer = store.reserve_append("a", 1, True)
    assert writer is not None
    stream(writer, b"x" * 50)
    # the bytes are in the file already, past its consistent length; no part file exists
    assert os.path.getsize(store.media_path(store.status("a"))) == len(first) + 50
    assert store.status("a").bytes_appended == len(first)
    assert os.listdir(store.incoming_dir) == []
    result = writer.commit(50)
    assert not result.duplicate and result.upload.completed
    assert on_disk(store, "a") == first + b"x" * 50
    writer.abort()                                   # after commit: nothing
    assert on_disk(store, "a") == first + b"x" * 50


def test_the_lock_is_free_while_the_bytes_arrive(store):
    started(store, "free")
    writer = store.reserve_append("free", 1, False)
    stream(writer, b"half")
    put(store, "free", 3, b"early")                 # takes the lock: it does not wait
    assert store.status("free").stashed == [3]
    stream(writer, b" and the rest")
    writer.commit(len(b"half and the rest"))
    put(store, "free", 2, b"two", last=False)
    assert store.status("free").next_index == 4


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "part-file"])
def test_bytes_past_the_consistent_length_are_cut_before_the_next_chunk(store, in_place,
                                                                        monkeypatch):
    """A tail the ledger does not count (a write whose cut failed, or bytes added by hand)
    is cut off when the next chunk opens the file, by either path; a file of the right
    length is not truncated at all."""
    first = started(store, "tail")
    with open(store.media_path(store.status("tail")), "ab") as f:
        f.write(b"bytes nobody acknowledged")
    if in_place:
        writer = store.reserve_append("tail", 1, False)
        stream(writer, b"chunk one")
        writer.commit(len(b"chunk one"))
    else:
        put(store, "tail", 1, b"chunk one")
    assert on_disk(store, "tail") == first + b"chunk one"
    truncated = []
    real_ftruncate = os.ftruncate
    monkeypatch.setattr(os, "ftruncate",
                        lambda fd, length: truncated.append(length) or real_ftruncate(fd, length))
    writer = store.reserve_append("tail", 2, True)
    stream(writer, b"two")
    writer.commit(3)
    assert truncated == []                          # the length was right: no ftruncate
    assert on_disk(store, "tail") == first + b"chunk one" + b"two"


def test_reserve_says_none_where_the_part_file_path_applies(store):
    assert store.reserve_append("new", 1, False) is None          # early, no row yet
    assert store.reserve_append("new", 0, False, mime_type="text/plain") is None  # refused
    started(store, "b")
    assert store.reserve_append("b", 0, False) is None            # a duplicate
    assert store.reserve_append("b", 2, False) is None            # early
    assert store.reserve_append("b", 1, False, mime_type="video/mp4") is None  # first type
    assert store.reserve_append("b", 1, False, mime_type="text/plain") is None  # refused
    assert store.reserve_append("bad id!", 1, False) is None
    put(store, "b", 5, b"five", last=True)
    assert store.reserve_append("b", 6, False) is None            # past the last chunk
    writer = store.reserve_append("b", 1, False)
    assert writer is not None
    assert store.reserve_append("b", 1, False) is None            # the tail is taken
    writer.abort()
    assert store.reserve_append("b", 1, False) is not None


def ledger_connections(store):
    """The ledger's connections: its one writer and the pooled readers."""
    pool = store._ledger._pool
    readers = [pool.get_nowait() for _ in range(pool.qsize())]
    for db in readers:
        pool.put(db)
    return [store._ledger._group._db] + readers


def traced(store):
    """The SQL statements the store's ledger connections run from now on."""
    statements = []
    for db in ledger_connections(store):
        db.set_trace_callback(statements.append)
    return statements


def untraced(store):
    for db in ledger_connections(store):
        db.set_trace_callback(None)


def test_a_new_uploads_first_chunk_is_written_in_place_and_its_row_with_it(store):
    started(store, "other")                            # the pool has its connection
    statements = traced(store)
    writer = store.reserve_append("fresh", 0, False, mime_type="video/mp4")
    assert writer is not None
    stream(writer, EBML + b"first chunk")
    assert store.status("fresh") is None               # no row until the commit
    path = os.path.join(store.root, "fresh.mp4")       # its type picked the file
    with open(path, "rb") as f:
        assert f.read() == EBML + b"first chunk"
    result = writer.commit(15)
    assert (result.upload.next_index, result.upload.bytes_appended) == (1, 15)
    assert [s for s in statements if s.upper().startswith("COMMIT")] == ["COMMIT"]
    row = store._ledger.load("fresh")
    assert (row.mime_type, row.ext, row.next_index, row.bytes_appended) == (
        "video/mp4", "mp4", 1, 15)
    assert row.created_at == result.upload.created_at is not None
    assert on_disk(store, "fresh") == EBML + b"first chunk"
    assert os.listdir(store.incoming_dir) == []        # no part file was made


def test_an_aborted_first_chunk_leaves_no_file_and_no_row(store):
    writer = store.reserve_append("gone", 0, False)
    stream(writer, EBML + b"half")
    writer.abort()
    assert store.status("gone") is None
    assert not os.path.lexists(os.path.join(store.root, "gone.webm"))
    bad = store.reserve_append("gone", 0, False)
    with pytest.raises(StoreError):
        stream(bad, b"NOT A VIDEO AT ALL", block=8)    # refused on its first bytes
    assert not os.path.lexists(os.path.join(store.root, "gone.webm"))
    again = store.reserve_append("gone", 0, False)
    stream(again, EBML + b"whole")
    assert again.commit(9).upload.next_index == 1


def test_an_early_chunk_that_creates_the_row_meanwhile_takes_the_first_chunks_type(store):
    writer = store.reserve_append("race", 0, False, mime_type="video/mp4")
    stream(writer, EBML + b"zero")
    put(store, "race", 2, b"two", last=True)           # no type named: the row says webm
    assert store.status("race").ext == "webm"
    result = writer.commit(8)
    assert (result.upload.ext, result.upload.mime_type, result.upload.stashed) == (
        "mp4", "video/mp4", [2])
    assert ledger_row(store, "race")[-1] == "mp4"
    done = put(store, "race", 1, b"one")               # appends 1 and the stashed 2
    assert done.upload.completed
    assert on_disk(store, "race") == EBML + b"zero" + b"one" + b"two"
    assert not os.path.lexists(os.path.join(store.root, "race.webm"))


def test_repair_sets_aside_a_video_file_the_ledger_does_not_know(tmp_path):
    root = str(tmp_path / "up")
    store = ChunkStore(root)
    started(store, "kept")
    writer = store.reserve_append("cut", 0, False)      # a crash before its commit:
    stream(writer, EBML + b"never acknowledged")        # the file, and no row
    store._writers.clear()
    os.close(writer._fd)
    store.close()
    with open(os.path.join(root, "notes.txt"), "wb") as f:
        f.write(b"not a video name: left alone")
    store = ChunkStore(root)
    try:
        store.repair()
        assert sorted(os.listdir(root)) == sorted(
            ["kept.webm", "notes.txt", "quarantine"] +
            [n for n in os.listdir(root) if n.startswith(("m1.", "temp"))])
        set_aside = os.listdir(os.path.join(root, "quarantine"))
        assert len(set_aside) == 1 and "cut.webm" in set_aside[0]
        assert on_disk(store, "kept") == EBML + b"chunk zero"
        writer = store.reserve_append("cut", 0, False)  # the client sends it again
        stream(writer, EBML + b"again")
        assert writer.commit(9).upload.next_index == 1
    finally:
        store.close()


def test_an_aborted_chunk_leaves_the_upload_as_it_was(store):
    first = started(store, "c")
    before = ledger_row(store, "c")
    writer = store.reserve_append("c", 1, False)
    stream(writer, os.urandom(300))
    writer.abort()
    writer.abort()
    assert on_disk(store, "c") == first
    assert ledger_row(store, "c") == before
    again = store.reserve_append("c", 1, False)          # the tail is free again
    stream(again, b"second try")
    again.commit(10)
    assert on_disk(store, "c") == first + b"second try"


def test_chunk_zero_signature_is_checked_on_its_first_bytes(store):
    put(store, "z", 1, b"one")                        # the row exists, chunk 0 has not come
    writer = store.reserve_append("z", 0, False)
    assert writer is not None
    with pytest.raises(StoreError) as caught:
        stream(writer, b"NOT A VIDEO AT ALL", block=8)
    assert caught.value.status == 415
    assert os.path.getsize(store.media_path(store.status("z"))) == 0
    assert store.status("z").next_index == 0
    ok = store.reserve_append("z", 0, False)
    stream(ok, EBML + b"fine")
    assert ok.commit(8).upload.next_index == 2


def test_a_short_chunk_zero_is_checked_at_the_commit(store):
    put(store, "short", 1, b"one")
    writer = store.reserve_append("short", 0, False)
    stream(writer, b"abc")
    with pytest.raises(StoreError) as caught:
        writer.commit(3)
    assert caught.value.status == 415
    assert store.status("short").next_index == 0


def test_checksum_is_taken_while_writing(store):
    first = started(store, "sum")
    data = os.urandom(1000)
    wrong = "sha256:" + "0" * 64
    writer = store.reserve_append("sum", 1, False, checksum=wrong)
    stream(writer, data, block=333)
    with pytest.raises(StoreError) as caught:
        writer.commit(len(data))
    assert caught.value.code == "checksum_mismatch"
    assert on_disk(store, "sum") == first
    right = "sha256:" + hashlib.sha256(data).hexdigest().upper()
    writer = store.reserve_append("sum", 1, False, checksum=right)
    stream(writer, data, block=333)
    writer.commit(len(data))
    assert on_disk(store, "sum") == first + data


def test_a_budget_refuses_as_soon_as_it_is_passed(store):
    first = started(store, "budget")
    budget = Budget(len(first) + 100, 403, "token_budget", "upload would be %d of %d")
    writer = store.reserve_append("budget", 1, False, budget=budget)
    stream(writer, b"y" * 100)                         # exactly the budget
    with pytest.raises(StoreError) as caught:
        writer.write(memoryview(b"!"))
    assert caught.value.code == "token_budget"
    assert on_disk(store, "budget") == first
    writer = store.reserve_append("budget", 1, False, budget=budget)
    stream(writer, b"y" * 100)
    assert writer.commit(100).upload.bytes_appended == len(first) + 100


def test_a_rule_that_changed_meanwhile_is_asked_again_at_the_commit(store):
    started(store, "rule")
    writer = store.reserve_append("rule", 1, True)       # says: chunk 1 is the last
    stream(writer, b"one")
    put(store, "rule", 3, b"three", last=True)          # meanwhile: chunk 3 is the last
    with pytest.raises(StoreError) as caught:
        writer.commit(3)
    assert caught.value.code == "completion_conflict"
    assert store.status("rule").next_index == 1
    writer = store.reserve_append("rule", 1, False)
    stream(writer, b"one")
    writer.commit(3)
    put(store, "rule", 2, b"two")
    assert store.status("rule").completed


def test_early_chunks_that_arrive_meanwhile_are_appended_after_the_commit(store):
    first = started(store, "early")
    writer = store.reserve_append("early", 1, False)
    stream(writer, b"[1]")
    put(store, "early", 3, b"[3]", last=True)
    put(store, "early", 2, b"[2]")
    assert store.status("early").next_index == 1
    result = writer.commit(3)
    assert result.upload.completed
    assert on_disk(store, "early") == first + b"[1][2][3]"


def test_a_twin_of_the_chunk_in_flight_waits_then_is_a_duplicate(store):
    started(store, "twin")
    writer = store.reserve_append("twin", 1, False)
    stream(writer, b"same bytes")
    answers = []
    twin = threading.Thread(target=lambda: answers.append(put(store, "twin", 1, b"same bytes")))
    twin.start()
    wait_until(lambda: store._locks._locks == {} and twin.is_alive(), timeout=5,
               message="the twin waiting outside the lock")
    assert not answers
    writer.commit(10)
    twin.join(5)
    assert answers[0].duplicate
    assert store.status("twin").next_index == 2


def test_a_twin_with_other_bytes_is_a_conflict_once_the_first_committed(store):
    started(store, "other")
    writer = store.reserve_append("other", 1, False)
    stream(writer, b"first bytes")
    errors = []

    def send_twin():
        try:
            put(store, "other", 1, b"other bytes")
        except StoreError as error:
            errors.append(error)

    twin = threading.Thread(target=send_twin)
    twin.start()
    wait_until(lambda: twin.is_alive() and store._locks._locks == {}, timeout=5,
               message="the twin waiting")
    writer.commit(11)
    twin.join(5)
    assert errors[0].code == "chunk_conflict"


def test_a_twin_is_stored_when_the_first_one_aborts(store):
    first = started(store, "abort")
    writer = store.reserve_append("abort", 1, False)
    stream(writer, b"cut short")
    answers = []
    twin = threading.Thread(target=lambda: answers.append(put(store, "abort", 1, b"whole")))
    twin.start()
    wait_until(lambda: twin.is_alive() and store._locks._locks == {}, timeout=5,
               message="the twin waiting")
    writer.abort()
    twin.join(5)
    assert not answers[0].duplicate
    assert on_disk(store, "abort") == first + b"whole"


def test_a_twin_waits_at_most_writer_wait(tmp_path):
    store = ChunkStore(str(tmp_path / "wait"), writer_wait_s=0.2)
    try:
        started(store, "slow")
        writer = store.reserve_append("slow", 1, False)
        with pytest.raises(StoreError) as caught:
            put(store, "slow", 1, b"twin")
        assert caught.value.status == 503 and caught.value.code == "chunk_in_progress"
        assert caught.value.headers == {"Retry-After": "1"}
        assert os.listdir(store.incoming_dir) == []
        stream(writer, b"done")
        writer.commit(4)
        assert put(store, "slow", 1, b"done").duplicate
    finally:
        store.close()


def test_a_cancelled_first_chunk_never_removes_the_file_of_the_upload_after_it(store):
    """A new upload's chunk 0 in place; an early chunk gives the upload its row; a delete
    cancels the writer and moves its file; a new chunk 0 of the same id makes a new file at
    the same path. The cancelled writer's abort must leave that file alone."""
    cancelled = store.reserve_append("again", 0, False, mime_type="video/webm")
    stream(cancelled, EBML + b"first try")
    put(store, "again", 2, b"early")                  # the upload's row, with no type
    assert store.delete("again")
    fresh = store.reserve_append("again", 0, False, mime_type="video/webm")
    assert fresh is not None
    stream(fresh, EBML + b"second try")
    with pytest.raises(StoreError) as caught:
        cancelled.commit(len(EBML + b"first try"))
    assert caught.value.code == "upload_deleted"
    fresh.commit(len(EBML + b"second try"))
    assert on_disk(store, "again") == EBML + b"second try"


def test_to_part_file_copies_the_writers_own_bytes(store):
    """A field after the file part turns a chunk written in place into a part file: its
    bytes come from the writer's own file, even when a delete moved that file and a new
    upload of the same id has a file at the path."""
    started(store, "moved")
    data = os.urandom(3000)
    writer = store.reserve_append("moved", 1, False)
    stream(writer, data, block=1000)
    assert store.delete("moved")
    other = started(store, "moved", first=EBML + os.urandom(5000))    # same id, same path
    path = writer.to_part_file()
    try:
        with open(path, "rb") as f:
            assert f.read() == data
    finally:
        store.discard(path)
    assert on_disk(store, "moved") == other          # the new upload's file is untouched


@pytest.mark.parametrize("size", [5, INLINE_DIGEST_BYTES + 5], ids=["small", "read-back"])
def test_an_upload_deleted_meanwhile_refuses_the_chunk(store, size):
    """Also a chunk large enough to be read back for its hash: it reads its own (moved)
    file, never the path, where a new upload of the same id may already be."""
    started(store, "gone")
    writer = store.reserve_append("gone", 1, False)
    stream(writer, os.urandom(size), block=1 << 20)
    assert store.delete("gone")
    with pytest.raises(StoreError) as caught:
        writer.commit(size)
    assert caught.value.status == 409 and caught.value.code == "upload_deleted"
    assert store.status("gone") is None
    again = started(store, "gone")                      # sent again: a fresh upload
    assert on_disk(store, "gone") == again


def test_the_sweep_keeps_an_upload_a_chunk_is_being_written_into(store):
    started(store, "busy")
    writer = store.reserve_append("busy", 1, False)
    assert store.delete("busy", unless=lambda upload: False, reason="expired") is False
    writer.abort()
    assert store.delete("busy", unless=lambda upload: False, reason="expired") is True


def test_a_small_chunk_is_journaled_and_a_large_one_fsynced(tmp_path):
    store = ChunkStore(str(tmp_path / "j"), journal_chunk_bytes=64)
    try:
        first = started(store, "j")
        writer = store.reserve_append("j", 1, False)
        stream(writer, b"s" * 64)                      # exactly the journal's limit
        writer.commit(64)
        assert store._ledger.journal("j") == [(0, first), (len(first), b"s" * 64)]
        writer = store.reserve_append("j", 2, False)
        stream(writer, b"L" * 65)                      # one past it: the file is fsynced
        writer.commit(65)
        assert store._ledger.journal("j") == []
        assert on_disk(store, "j") == first + b"s" * 64 + b"L" * 65
    finally:
        store.close()


# -- the state in memory ------------------------------------------------------------------

def test_memory_mirrors_the_ledger_after_every_kind_of_step(store):
    started(store, "m")
    checks = []

    def check():
        checks.append(remembered(store, "m") == ledger_row(store, "m"))

    put(store, "m", 3, b"three")
    check()
    writer = store.reserve_append("m", 1, False)
    stream(writer, b"one")
    writer.commit(3)
    check()
    put(store, "m", 1, b"one")                          # duplicate
    check()
    put(store, "m", 4, b"four", last=True)
    check()
    put(store, "m", 2, b"two")                          # appends 2, 3, 4 and completes
    check()
    wait_until(lambda: store.status("m").sha256 is not None, timeout=10,
               message="the background sha256")
    check()
    assert checks == [True] * len(checks)


def test_an_in_order_chunk_reads_nothing_from_the_ledger(store):
    started(store, "quiet")
    statements = traced(store)
    writer = store.reserve_append("quiet", 1, False)
    stream(writer, b"bytes")
    writer.commit(5)
    assert not [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert [s for s in statements if s.startswith(("INSERT", "UPDATE"))]


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "part-file"])
def test_the_last_chunk_records_the_completion_in_its_own_transaction(store, in_place):
    """The chunk that completes an upload is fsynced, not journaled, and its one commit also
    empties the journal and records completed_at (and the sha256, when the bytes were hashed
    as they came): no second transaction, no read."""
    started(store, "done")                             # chunk 0: small, journaled
    assert ledger_journal_rows(store, "done") == 1
    submitted = []
    store._hasher.submit = submitted.append            # the hasher's own commit stays out
    statements = traced(store)
    if in_place:
        writer = store.reserve_append("done", 1, True)
        stream(writer, b"the end")
        result = writer.commit(7)
    else:
        result = put(store, "done", 1, b"the end", last=True)
    untraced(store)
    assert result.upload.completed and result.upload.completed_at is not None
    assert [s for s in statements if s.upper().startswith("COMMIT")] == ["COMMIT"], statements
    assert not [s for s in statements if s.lstrip().upper().startswith("SELECT")], statements
    assert ledger_journal_rows(store, "done") == 0
    row = store._ledger.load("done")
    assert (row.completed_at, row.next_index, row.last_index) == (result.upload.completed_at,
                                                                  2, 1)
    if in_place:       # hashed as it was written: the sha256 is in that transaction too
        assert submitted == []
        assert row.sha256 == result.upload.sha256 == hashlib.sha256(
            EBML + b"chunk zero" + b"the end").hexdigest()
    else:              # a kernel copy from the part file: the hasher reads the file
        assert submitted == ["done"] and row.sha256 is None


def ledger_journal_rows(store, file_id):
    with store._ledger._connection() as db:
        return db.execute("SELECT COUNT(*) FROM journal WHERE file_id = ?",
                          (file_id,)).fetchone()[0]


def test_one_upload_in_memory_still_stores_every_upload_right(tmp_path):
    store = ChunkStore(str(tmp_path / "one"), state_cache=1)
    try:
        firsts = {name: started(store, name) for name in ("p", "q")}
        for index in (1, 2):
            for name in ("p", "q"):                    # each one pushes the other out
                writer = store.reserve_append(name, index, index == 2)
                stream(writer, b"%s%d" % (name.encode(), index))
                writer.commit(2)
        for name in ("p", "q"):
            assert store.status(name).completed
            assert on_disk(store, name) == firsts[name] + b"%s1%s2" % ((name.encode(),) * 2)
        assert len(store._cache._entries) == 1
    finally:
        store.close()


def test_repair_starts_from_the_ledger_not_from_memory(tmp_path):
    root = str(tmp_path / "r")
    store = ChunkStore(root)
    first = started(store, "r")
    db = sqlite3.connect(os.path.join(root, "m1.sqlite3"))
    with db:
        db.execute("UPDATE uploads SET last_index = 0 WHERE file_id = 'r'")
    db.close()
    assert not store.status("r").completed            # memory: as the store left it
    store.repair()
    assert store.status("r").completed                # the ledger's truth
    assert on_disk(store, "r") == first
    store.close()


# --- the running sha256: hashed as the bytes are written, known at completion -------------

def in_place_chunks(store, file_id, chunks, abort_at=None, complete=True):
    """Send `chunks` in order through the in-place path (the last one completes, when
    `complete`); the chunk at `abort_at` is first streamed halfway and aborted. Returns the
    last ChunkResult."""
    result = None
    for index, chunk in enumerate(chunks):
        last = complete and index == len(chunks) - 1
        if index == abort_at:
            cut = store.reserve_append(file_id, index, last)
            stream(cut, chunk[:len(chunk) // 2] + b"garbage", block=4096)
            cut.abort()
        writer = store.reserve_append(file_id, index, last)
        assert writer is not None, index
        stream(writer, chunk, block=4096)
        result = writer.commit(len(chunk))
    return result


def varied_chunks():
    """Small (journaled) and large (fsynced) chunks, chunk 0 with the signature."""
    sizes = [100, 70 << 10, 5, 0, 200 << 10, 3000]
    chunks = [os.urandom(size) for size in sizes]
    chunks[0] = EBML + chunks[0]
    return chunks


@pytest.mark.parametrize("abort_at", [None, 0, 2, 4, 5], ids=lambda a: "abort-%s" % a)
def test_the_sha256_of_an_upload_written_in_place_is_known_at_completion(tmp_path, abort_at):
    store = ChunkStore(str(tmp_path / "up"))
    events = []
    store.add_listener(events.append)
    submitted = []
    store._hasher.submit = submitted.append
    try:
        chunks = varied_chunks()
        result = in_place_chunks(store, "h", chunks, abort_at=abort_at)
        expected = hashlib.sha256(b"".join(chunks)).hexdigest()
        assert result.upload.sha256 == expected          # in the last chunk's reply
        assert store._ledger.load("h").sha256 == expected
        assert submitted == []                           # the file is never read again
        assert on_disk(store, "h") == b"".join(chunks)
        assert [e["type"] for e in events][-2:] == ["chunk", "completed"]
        assert events[-1]["sha256"] == expected and events[-1]["size"] == sum(map(len, chunks))
    finally:
        store.close()


@pytest.mark.parametrize("size, read_back", [
    (INLINE_DIGEST_BYTES, 0),                    # at the limit: hashed as it arrived
    (INLINE_DIGEST_BYTES + 1, 1),                # past it: the last byte read back
    (3 * INLINE_DIGEST_BYTES + 12345, 2 * INLINE_DIGEST_BYTES + 12345),
], ids=["at-the-limit", "one-past", "large"])
@pytest.mark.parametrize("with_checksum", [False, True], ids=["no-checksum", "checksum"])
def test_a_large_chunk_is_hashed_past_the_inline_limit_while_it_syncs(
        store, monkeypatch, size, read_back, with_checksum):
    """The bytes past INLINE_DIGEST_BYTES are hashed at commit, read back from the file
    while its fsync runs in another thread: the checksum and the running sha256 see every
    byte exactly once, in order."""
    first = started(store, "big")
    data = os.urandom(size)
    read = []

    class Counted:
        """The writer's read-back file, counting the bytes it reads."""

        def __init__(self, *args, **kwargs):
            self._file = open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

        def seek(self, offset):
            return self._file.seek(offset)

        def readinto(self, view):
            read.append(self._file.readinto(view))
            return read[-1]
    monkeypatch.setattr(chunkstore, "open", Counted, raising=False)
    synced_in = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced_in.append(
        threading.current_thread().name) or real_fsync(fd))
    checksum = "sha256:" + hashlib.sha256(data).hexdigest() if with_checksum else None
    writer = store.reserve_append("big", 1, True, checksum=checksum)
    stream(writer, data, block=(256 << 10) + 7)
    result = writer.commit(size)
    assert sum(read) == read_back
    assert synced_in[0] == ("m1-fsync" if read_back else threading.current_thread().name)
    assert result.upload.sha256 == hashlib.sha256(first + data).hexdigest()
    assert on_disk(store, "big") == first + data


def test_a_journaled_chunk_is_always_hashed_in_line():
    """A journaled chunk is never read back (it is not fsynced at commit), so the largest
    one --journal-chunk-size allows must fit within the bytes hashed as they arrive."""
    assert MAX_JOURNAL_CHUNK_BYTES <= INLINE_DIGEST_BYTES


def test_a_checksum_that_fails_past_the_inline_limit_cuts_the_chunk(store):
    first = started(store, "bad")
    data = os.urandom(INLINE_DIGEST_BYTES + 100)
    wrong = bytearray(data)
    wrong[-1] ^= 1                               # differs in a byte that is read back
    checksum = "sha256:" + hashlib.sha256(bytes(wrong)).hexdigest()
    writer = store.reserve_append("bad", 1, False, checksum=checksum)
    stream(writer, data, block=1 << 20)
    with pytest.raises(StoreError) as caught:
        writer.commit(len(data))
    assert caught.value.code == "checksum_mismatch"
    assert on_disk(store, "bad") == first
    assert store.reserve_append("bad", 1, False) is not None     # the tail is free again


def test_an_fsync_that_fails_in_its_thread_is_raised_and_the_chunk_cut(store, monkeypatch):
    import errno
    first = started(store, "full")
    data = os.urandom(INLINE_DIGEST_BYTES + 100)
    writer = store.reserve_append("full", 1, False)
    stream(writer, data, block=1 << 20)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StoreError) as caught:
        writer.commit(len(data))
    assert caught.value.status == 507
    monkeypatch.undo()
    assert on_disk(store, "full") == first
    assert store.status("full").next_index == 1


@pytest.mark.parametrize("break_with", ["cache", "restart", "part-file"])
def test_without_a_running_sha256_the_hasher_reads_the_file(tmp_path, break_with):
    """Memory forgot the upload, a restart, or a chunk copied from a part file by the kernel:
    the digest is not known, and the hasher computes it from the file after completion."""
    root = str(tmp_path / "up")
    store = ChunkStore(root, state_cache=1)
    chunks = varied_chunks()
    try:
        in_place_chunks(store, "k", chunks[:3], complete=False)
        if break_with == "cache":
            started(store, "other")                      # pushes "k" out of memory
        elif break_with == "restart":
            store.close()
            store = ChunkStore(root, state_cache=1)
            store.repair()
        else:
            put(store, "k", 3, chunks[3])                # small: read, so hashed
            put(store, "k", 4, chunks[4])                # large: a kernel copy
        first = 5 if break_with == "part-file" else 3
        for index in range(first, len(chunks)):
            writer = store.reserve_append("k", index, index == len(chunks) - 1)
            stream(writer, chunks[index], block=4096)
            result = writer.commit(len(chunks[index]))
        assert result.upload.completed and result.upload.sha256 is None
        expected = hashlib.sha256(b"".join(chunks)).hexdigest()
        wait_until(lambda: store.status("k").sha256 == expected, timeout=10,
                   message="the hasher's sha256")
    finally:
        store.close()
