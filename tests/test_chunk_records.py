"""Chunk records (chunkstore.py's docstring, "Chunk records"): a small in-order chunk written in
place is recorded in its video file's extended attribute, synced with its bytes, and in a
ledger commit that is not synced; a power cut that takes such commits loses no acknowledged
chunk, because repair records them again from the file.

The first half drives ChunkStore in this process (what is written, when the ledger syncs,
what repair makes of every kind of record); the second runs the real server, kills it, and
takes from the ledger's WAL what a power cut takes (its writes after the last synced commit),
then checks the restart with test_crash.py's consistency check.
"""
from __future__ import annotations

import binascii
import errno
import os
import sys

import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chunkstore  # noqa: E402
from chunkstore import (RECORD, RECORD_CHUNK_BYTES, RECORDS_MAGIC, RECORDS_MAX,  # noqa: E402
                        RECORDS_XATTR, ChunkStore)
from conftest import send_chunk, split_chunks  # noqa: E402
# The `store` fixture (a ChunkStore with the defaults: records on) and a chunk through a part
# file, as test_chunkstore.py has them.
from test_chunkstore import EBML, put, store  # noqa: E402,F401
from test_crash import (APPEND_MODES, assert_consistent, data_path,  # noqa: E402
                        resume_and_finish, send_plan)

pytestmark = pytest.mark.skipif(not hasattr(os, "setxattr"),
                                reason="extended attributes are Linux's (os.setxattr)")


def in_place(store, file_id, index, data, last=False):
    writer = store.reserve_append(file_id, index, last)
    assert writer is not None, "chunk %d was not written in place" % index
    writer.write(memoryview(data))
    return writer.commit(len(data))


def records_of(path):
    """The records the file's attribute holds, parsed here (not by the module under test)."""
    try:
        value = os.getxattr(path, RECORDS_XATTR)
    except OSError as error:
        assert error.errno == errno.ENODATA, error
        return None
    assert value[:len(RECORDS_MAGIC)] == RECORDS_MAGIC
    body = value[len(RECORDS_MAGIC):]
    assert len(body) % RECORD.size == 0
    return [RECORD.unpack(body[at:at + RECORD.size]) for at in range(0, len(body), RECORD.size)]


def synchronous(store):
    """The ledger's synchronous setting of its last commit (FULL: it was synced)."""
    return store._ledger._group._synchronous


def chunk(index, size=1000):
    return bytes([index % 251]) * size


def started(store, file_id):
    """An upload whose chunk 0 is stored (its row: a synced commit)."""
    put(store, file_id, 0, EBML + bytes(96))
    assert synchronous(store) == "FULL"
    return 100


def forget_commits_after(store_path, file_id, next_index):
    """What a power cut does to the ledger's unsynced commits, done by hand on a closed ledger:
    the upload back at chunk `next_index`, its rows after it gone."""
    import sqlite3
    db = sqlite3.connect(os.path.join(store_path, chunkstore.LEDGER_NAME), isolation_level=None)
    try:
        length = db.execute("SELECT COALESCE(SUM(size), 0) FROM chunks WHERE file_id = ? AND "
                            "idx < ?", (file_id, next_index)).fetchone()[0]
        db.execute("DELETE FROM chunks WHERE file_id = ? AND idx >= ?", (file_id, next_index))
        db.execute("UPDATE uploads SET next_index = ?, bytes_appended = ? WHERE file_id = ?",
                   (next_index, length, file_id))
    finally:
        db.close()


# -- what is written, and when the ledger syncs ---------------------------------------------

def test_small_in_order_chunks_are_recorded_in_their_file_and_committed_unsynced(store):
    offset = started(store, "a")
    expected = []
    for index in (1, 2, 3):
        data = chunk(index, 700 + index)
        result = in_place(store, "a", index, data)
        assert result.upload.next_index == index + 1
        expected.append((index, offset, len(data), binascii.crc32(data)))
        offset += len(data)
        assert synchronous(store) == "NORMAL"
        assert records_of(data_path(store.root, "a")) == expected
    assert store._ledger.load("a").bytes_appended == offset


def test_records_are_bounded_and_the_chunk_after_them_commits_synced(store):
    started(store, "a")
    for index in range(1, RECORDS_MAX + 1):
        in_place(store, "a", index, chunk(index))
    path = data_path(store.root, "a")
    full = records_of(path)
    assert [r[0] for r in full] == list(range(1, RECORDS_MAX + 1))
    in_place(store, "a", RECORDS_MAX + 1, chunk(RECORDS_MAX + 1))
    assert synchronous(store) == "FULL"        # its commit syncs every one before it too
    assert records_of(path) == full            # not rewritten: the ledger has them all
    in_place(store, "a", RECORDS_MAX + 2, chunk(RECORDS_MAX + 2))
    assert synchronous(store) == "NORMAL"
    assert [r[0] for r in records_of(path)] == [RECORDS_MAX + 2]


@pytest.mark.parametrize("what", ["first", "last", "large", "typed"])
def test_a_chunk_whose_commit_writes_more_than_a_replay_would_commits_synced(store, what):
    if what == "first":                        # a new upload's row
        in_place(store, "a", 0, EBML + bytes(96))
        index = 0
    else:
        started(store, "a")
        in_place(store, "a", 1, chunk(1))      # records: [1]
        index = 2
        if what == "last":
            in_place(store, "a", 2, chunk(2), last=True)
        elif what == "large":
            in_place(store, "a", 2, chunk(2, RECORD_CHUNK_BYTES + 1))
        else:                                  # the first chunk to name a type
            writer = store.reserve_append("a", 2, False, mime_type="video/webm")
            assert writer is None              # it takes the part file, synced
            put(store, "a", 2, chunk(2))
    assert synchronous(store) == "FULL"
    assert store._ledger.load("a").next_index == index + 1
    records = records_of(data_path(store.root, "a"))
    assert records is None or [r[0] for r in records] == [1]


def test_at_the_size_limit_a_chunk_is_recorded_and_past_it_not(store):
    started(store, "a")
    in_place(store, "a", 1, chunk(1, RECORD_CHUNK_BYTES))
    assert synchronous(store) == "NORMAL"
    in_place(store, "a", 2, chunk(2, RECORD_CHUNK_BYTES + 1))
    assert synchronous(store) == "FULL"
    assert [r[:3] for r in records_of(data_path(store.root, "a"))] == [
        (1, 100, RECORD_CHUNK_BYTES)]


def test_an_upload_read_again_from_the_ledger_commits_its_next_chunk_synced(tmp_path):
    """Records that are not in memory (the state cache let the upload go) are not known: the
    next chunk must not overwrite them with a list that lacks them, so its commit syncs."""
    store = ChunkStore(str(tmp_path / "up"), state_cache=1)
    try:
        started(store, "a")
        started(store, "b")                    # "a" leaves the cache
        for index in (1, 2):                   # each upload's turn lets the other go
            for file_id in ("a", "b"):
                in_place(store, file_id, index, chunk(index))
                assert synchronous(store) == "FULL"
        for index in (3, 4):                   # "b" alone: its records are known again
            in_place(store, "b", index, chunk(index))
            assert synchronous(store) == "NORMAL"
        assert [r[0] for r in records_of(data_path(store.root, "b"))] == [3, 4]
        assert records_of(data_path(store.root, "a")) is None
    finally:
        store.close()


def test_a_filesystem_without_extended_attributes_turns_records_off(store, monkeypatch,
                                                                     capsys):
    started(store, "a")

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOTSUP, "Operation not supported")
    monkeypatch.setattr(os, "setxattr", refuse)
    in_place(store, "a", 1, chunk(1))
    assert synchronous(store) == "FULL" and not store.chunk_records
    in_place(store, "a", 2, chunk(2))
    assert synchronous(store) == "FULL"
    assert store._ledger.load("a").next_index == 3
    assert records_of(data_path(store.root, "a")) is None
    assert capsys.readouterr().err.count("keep no extended attributes") == 1


def test_no_xattr_keeps_no_records(tmp_path):
    store = ChunkStore(str(tmp_path / "up"), chunk_records=False)
    try:
        started(store, "a")
        in_place(store, "a", 1, chunk(1))
        assert synchronous(store) == "FULL"
        assert records_of(data_path(store.root, "a")) is None
    finally:
        store.close()


def test_a_failed_commit_takes_the_chunk_out_of_the_records_again(store, monkeypatch):
    started(store, "a")
    in_place(store, "a", 1, chunk(1))
    before = records_of(data_path(store.root, "a"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store._ledger, "record_append", full)
    writer = store.reserve_append("a", 2, False)
    writer.write(memoryview(chunk(2)))
    with pytest.raises(Exception):
        writer.commit(len(chunk(2)))
    monkeypatch.undo()
    assert records_of(data_path(store.root, "a")) == before
    assert os.path.getsize(data_path(store.root, "a")) == before[-1][1] + before[-1][2]
    in_place(store, "a", 2, chunk(2))
    assert [r[0] for r in records_of(data_path(store.root, "a"))] == [1, 2]


# -- repair --------------------------------------------------------------------------------

def recorded_then_lost(tmp_path, count=4, kept=1):
    """An upload with chunks 1..count recorded (unsynced commits), the store closed, and the
    ledger then put back at chunk `kept` (a power cut's loss). Returns (root, data of
    0..count)."""
    root = str(tmp_path / "up")
    store = ChunkStore(root)
    chunks = [EBML + bytes(96)] + [chunk(i, 500 + i) for i in range(1, count + 1)]
    try:
        put(store, "a", 0, chunks[0])
        for index in range(1, count + 1):
            in_place(store, "a", index, chunks[index])
    finally:
        store.close()
    forget_commits_after(root, "a", kept)
    return root, chunks


def repaired(root, capsys=None):
    store = ChunkStore(root)
    try:
        store.repair()
        upload = store._ledger.load("a")
        with open(data_path(root, "a"), "rb") as f:
            return upload, f.read()
    finally:
        store.close()


def test_repair_records_again_the_chunks_the_ledger_lost(tmp_path, capsys):
    root, chunks = recorded_then_lost(tmp_path)
    upload, data = repaired(root)
    assert (upload.next_index, upload.bytes_appended) == (5, len(b"".join(chunks)))
    assert data == b"".join(chunks)
    assert "4 chunk(s) the ledger had lost recorded again" in capsys.readouterr().err
    upload, _ = repaired(root)                 # once: nothing left to do
    assert upload.next_index == 5
    assert "recorded again" not in capsys.readouterr().err


def test_a_file_with_all_its_records_is_replayed_whole(tmp_path):
    """RECORDS_MAX records, the most a file keeps (and _read_records reads), all lost from
    the ledger: every one is recorded again."""
    root, chunks = recorded_then_lost(tmp_path, count=RECORDS_MAX)
    assert len(records_of(data_path(root, "a"))) == RECORDS_MAX
    upload, data = repaired(root)
    assert upload.next_index == RECORDS_MAX + 1 and data == b"".join(chunks)


def test_a_record_whose_bytes_do_not_match_ends_the_replay_and_its_tail_is_cut(tmp_path):
    root, chunks = recorded_then_lost(tmp_path)
    at = len(b"".join(chunks[:3])) + 10         # inside chunk 3: its bytes never made it
    with open(data_path(root, "a"), "r+b") as f:
        f.seek(at)
        f.write(b"\xff")
    upload, data = repaired(root)
    assert upload.next_index == 3
    assert data == b"".join(chunks[:3])


def test_a_record_past_the_files_end_ends_the_replay(tmp_path):
    root, chunks = recorded_then_lost(tmp_path)
    os.truncate(data_path(root, "a"), len(b"".join(chunks[:4])) - 1)
    upload, data = repaired(root)
    assert upload.next_index == 3 and data == b"".join(chunks[:3])


@pytest.mark.parametrize("value", [b"", b"junk", RECORDS_MAGIC + b"x" * 5,
                                   RECORDS_MAGIC + RECORD.pack(1, 100, 501, 0) * (RECORDS_MAX + 1),
                                   RECORDS_MAGIC + RECORD.pack(1, 100, RECORD_CHUNK_BYTES + 1, 0)])
def test_records_this_server_did_not_write_are_not_used(tmp_path, capsys, value):
    root, chunks = recorded_then_lost(tmp_path)
    os.setxattr(data_path(root, "a"), RECORDS_XATTR, value)
    upload, data = repaired(root)
    assert upload.next_index == 1 and data == chunks[0]       # the tail cut, as without them
    if value[:len(RECORDS_MAGIC)] == RECORDS_MAGIC or value == b"junk":
        assert "not used" in capsys.readouterr().err


def test_records_that_do_not_continue_the_ledger_are_not_used(tmp_path):
    root, chunks = recorded_then_lost(tmp_path)
    path = data_path(root, "a")
    records = records_of(path)
    os.setxattr(path, RECORDS_XATTR, RECORDS_MAGIC + b"".join(      # chunk 1's missing
        RECORD.pack(*record) for record in records[1:]))
    upload, data = repaired(root)
    assert upload.next_index == 1 and data == chunks[0]


def test_records_the_ledger_has_already_are_skipped(tmp_path):
    root, chunks = recorded_then_lost(tmp_path, kept=3)     # the ledger kept chunks 1, 2
    upload, data = repaired(root)
    assert upload.next_index == 5 and data == b"".join(chunks)


# -- the real server, and a power cut the ledger's WAL feels -------------------------------

def wal_length(srv):
    return os.path.getsize(os.path.join(srv.upload_dir, chunkstore.LEDGER_NAME + "-wal"))


def cut_power(srv, synced_wal_length):
    """After a kill -9: the ledger's WAL loses what was written after its last synced commit
    (SQLite then keeps the commits before it; its index, -shm, is rebuilt at the next open)."""
    ledger = os.path.join(srv.upload_dir, chunkstore.LEDGER_NAME)
    with open(ledger + "-wal", "r+b") as f:
        f.truncate(synced_wal_length)
    if os.path.exists(ledger + "-shm"):
        os.remove(ledger + "-shm")


def test_a_power_cut_that_takes_the_ledgers_unsynced_commits_loses_no_acked_chunk(
        server_factory, sample_webm):
    chunks = split_chunks(sample_webm, 6)
    srv = server_factory(args=APPEND_MODES["records"])
    acked, failed = send_plan(srv, "cut", chunks, [0])      # its row: a synced commit
    synced = wal_length(srv)
    more, failed = send_plan(srv, "cut", chunks, [1, 2, 3, 4])
    assert failed is None and more == {1, 2, 3, 4}
    assert wal_length(srv) > synced            # their commits were written, not synced
    assert [r[0] for r in records_of(data_path(srv.upload_dir, "cut"))] == [1, 2, 3, 4]
    srv.kill()
    cut_power(srv, synced)
    srv.start(port=srv.port)
    k = assert_consistent(srv, "cut", chunks, acked | more, "WAL cut after chunk 0")
    assert k == 5
    assert "recorded again from the video file's records" in srv.log()
    resume_and_finish(srv, "cut", chunks, acked | more, "WAL cut after chunk 0")


def test_a_power_cut_past_the_records_bound_loses_no_acked_chunk(server_factory, sample_webm):
    """Chunk RECORDS_MAX + 1 commits synced (the records are full); the cut takes what came
    after it, which the next records name."""
    count = RECORDS_MAX + 6
    chunks = split_chunks(sample_webm, count)
    srv = server_factory(args=APPEND_MODES["records"])
    acked, failed = send_plan(srv, "bound", chunks, list(range(RECORDS_MAX + 2)))
    assert failed is None
    synced = wal_length(srv)
    path = data_path(srv.upload_dir, "bound")
    assert [r[0] for r in records_of(path)] == list(range(1, RECORDS_MAX + 1))
    more, failed = send_plan(srv, "bound", chunks, list(range(RECORDS_MAX + 2, count - 1)))
    assert failed is None
    assert [r[0] for r in records_of(path)] == list(range(RECORDS_MAX + 2, count - 1))
    srv.kill()
    cut_power(srv, synced)
    srv.start(port=srv.port)
    k = assert_consistent(srv, "bound", chunks, acked | more, "WAL cut past the bound")
    assert k == count - 1
    resume_and_finish(srv, "bound", chunks, acked | more, "WAL cut past the bound")


def test_no_xattr_server_keeps_no_records_and_stores_every_chunk(server_factory, sample_webm):
    chunks = split_chunks(sample_webm, 4)
    srv = server_factory(args=APPEND_MODES["fsync"])
    acked, failed = send_plan(srv, "plain", chunks, [0, 1, 2, 3])
    assert failed is None
    assert records_of(data_path(srv.upload_dir, "plain")) is None
    with requests.Session() as session:
        reply = send_chunk(session, srv.url, "plain", 3, chunks[3], status="completed")
    assert reply.ok and reply.json()["data"]["duplicate"] is True


def test_a_clean_stop_leaves_every_commit_in_the_ledger_file(server_factory, sample_webm):
    """SQLite's last connection checkpoints the WAL into the ledger file (synced) as it
    closes, so after a stop nothing depends on the video files' records any more: a copy
    of the folder that drops extended attributes loses nothing."""
    import sqlite3
    chunks = split_chunks(sample_webm, 5)
    srv = server_factory(args=APPEND_MODES["records"])
    acked, failed = send_plan(srv, "stopped", chunks, [0, 1, 2, 3])
    assert failed is None and records_of(data_path(srv.upload_dir, "stopped"))
    srv.stop()
    ledger = os.path.join(srv.upload_dir, chunkstore.LEDGER_NAME)
    assert not os.path.exists(ledger + "-wal") or os.path.getsize(ledger + "-wal") == 0
    db = sqlite3.connect("file:%s?mode=ro" % ledger, uri=True)
    try:
        assert db.execute("SELECT next_index FROM uploads WHERE file_id = 'stopped'"
                          ).fetchone() == (4,)
    finally:
        db.close()
