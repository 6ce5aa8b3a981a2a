"""Unit tests of chunkstore.py on its own: chunk semantics, limits, and start-up repair.

The black-box suites prove the same things through HTTP; these pin the store's own contract
(what put_chunk decides and what repair() mends) without a server in between.
"""
from __future__ import annotations

import os
import sys
import time

import pytest

from conftest import sqlite_files

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chunkstore  # noqa: E402
from chunkstore import ChunkStore  # noqa: E402
import storage  # noqa: E402
from storage import StoreError  # noqa: E402

EBML = b"\x1a\x45\xdf\xa3"


@pytest.fixture
def store(tmp_path):
    s = ChunkStore(str(tmp_path / "up"))
    yield s
    s.close()


def put(store, file_id, index, data, last=False, mime_type=None, checksum=None):
    path, f = store.new_part_file()
    with f:
        f.write(data)
    return store.put_chunk(file_id, index, path, len(data), is_last=last, mime_type=mime_type,
                           checksum=checksum)


def assembled(store, file_id):
    upload = store.status(file_id)
    with open(store.media_path(upload), "rb") as f:
        return f.read()


def chunks_of(count, size=100):
    first = EBML + os.urandom(size - 4)
    return [first] + [os.urandom(size) for _ in range(count - 1)]


def test_in_order_chunks_grow_the_file_as_they_arrive(store):
    parts = chunks_of(3)
    for i, part in enumerate(parts):
        result = put(store, "a", i, part, last=i == 2)
        assert assembled(store, "a") == b"".join(parts[:i + 1])
        assert result.upload.next_index == i + 1
    assert result.upload.completed


def test_reverse_order_assembles_and_removes_temp_chunks(store):
    parts = chunks_of(5)
    for i in reversed(range(5)):
        result = put(store, "r", i, parts[i], last=i == 4)
    assert result.upload.completed
    assert assembled(store, "r") == b"".join(parts)
    assert not os.path.exists(os.path.join(store.temp_dir, "r"))
    assert os.listdir(store.incoming_dir) == []


def test_duplicate_chunk_is_acknowledged_once(store):
    parts = chunks_of(3)
    put(store, "d", 0, parts[0])
    put(store, "d", 2, parts[2], last=True)
    assert put(store, "d", 0, parts[0]).duplicate          # appended already
    assert put(store, "d", 2, parts[2], last=True).duplicate   # still stashed
    put(store, "d", 1, parts[1])
    assert assembled(store, "d") == b"".join(parts)


@pytest.mark.parametrize("stashed", [False, True])
def test_same_index_with_other_bytes_is_a_conflict(store, stashed):
    parts = chunks_of(3)
    put(store, "c", 0, parts[0])
    index = 2 if stashed else 0
    if stashed:
        put(store, "c", 2, parts[2])
    other = bytearray(parts[index])
    other[-1] ^= 1
    with pytest.raises(StoreError) as caught:
        put(store, "c", index, bytes(other))
    assert (caught.value.status, caught.value.code) == (409, "chunk_conflict")
    with pytest.raises(StoreError):
        put(store, "c", index, parts[index] + b"x")       # other length
    assert assembled(store, "c") == parts[0]


def test_completed_with_a_gap_waits_for_the_gap(store):
    parts = chunks_of(4)
    put(store, "g", 0, parts[0])
    put(store, "g", 2, parts[2])
    result = put(store, "g", 3, parts[3], last=True)
    assert not result.upload.completed
    assert result.upload.missing_chunks() == [1]
    result = put(store, "g", 1, parts[1])
    assert result.upload.completed and result.upload.missing_chunks() == []
    assert assembled(store, "g") == b"".join(parts)


@pytest.mark.parametrize("case", ["past_last", "other_last", "last_below_received"])
def test_completion_conflicts_are_refused(store, case):
    parts = chunks_of(4)
    put(store, "x", 0, parts[0])
    if case == "last_below_received":
        put(store, "x", 3, parts[3])
        attempt = (2, parts[2], True)
    else:
        put(store, "x", 2, parts[2], last=True)
        attempt = (3, parts[3], False) if case == "past_last" else (1, parts[1], True)
    with pytest.raises(StoreError) as caught:
        put(store, "x", attempt[0], attempt[1], last=attempt[2])
    assert (caught.value.status, caught.value.code) == (409, "completion_conflict")


def test_empty_chunks_are_stored(store):
    put(store, "e", 0, EBML)
    put(store, "e", 1, b"")
    result = put(store, "e", 2, b"end", last=True)
    assert result.upload.completed and assembled(store, "e") == EBML + b"end"


@pytest.mark.parametrize("head,ok", [(EBML + b"rest", True), (b"\0\0\0\x18ftypmp42", True),
                                     (b"OggS\0\x02", True), (b"hello world", False),
                                     (b"", False), (b"\x1a\x45\xdf", False)])
def test_chunk_zero_needs_a_media_signature(store, head, ok):
    if ok:
        put(store, "s", 0, head)
        return
    with pytest.raises(StoreError) as caught:
        put(store, "s", 0, head)
    assert caught.value.status == 415
    assert store.status("s") is None


def test_allow_any_content_skips_the_signature_check(tmp_path):
    s = ChunkStore(str(tmp_path / "any"), allow_any_content=True)
    try:
        assert put(s, "t", 0, b"plain text", last=True).upload.completed
    finally:
        s.close()


@pytest.mark.parametrize("mime,ext", [(None, "webm"), ("video/webm;codecs=vp9,opus", "webm"),
                                      ("video/mp4", "mp4"), ("VIDEO/MP4; codecs=avc1", "mp4"),
                                      ("video/x-matroska;codecs=avc1", "mkv"),
                                      ("audio/ogg", "ogg"), ("video/quicktime", "mov")])
def test_extension_follows_the_mime_type(store, mime, ext):
    put(store, "m", 0, EBML, mime_type=mime)
    assert store.status("m").ext == ext
    assert os.path.exists(os.path.join(store.root, "m." + ext))


@pytest.mark.parametrize("mime,status,code", [("text/plain", 415, "unsupported_media_type"),
                                              ("application/json", 415,
                                               "unsupported_media_type"),
                                              ("video", 400, "invalid_mime_type"),
                                              ("vid eo/webm", 400, "invalid_mime_type"),
                                              ("video/" + "w" * 300, 400,
                                               "invalid_mime_type")])
def test_bad_mime_types_are_refused(store, mime, status, code):
    with pytest.raises(StoreError) as caught:
        put(store, "m", 0, EBML, mime_type=mime)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_a_later_chunk_cannot_change_the_container(store):
    put(store, "k", 0, EBML, mime_type="video/webm")
    with pytest.raises(StoreError) as caught:
        put(store, "k", 1, b"x", mime_type="video/mp4")
    assert caught.value.code == "mime_type_conflict"
    put(store, "k", 1, b"x", mime_type="video/webm;codecs=vp8")      # same container: fine


def test_upload_size_limit_at_and_past_the_edge(tmp_path):
    s = ChunkStore(str(tmp_path / "lim"), max_upload_bytes=300)
    try:
        put(s, "u", 0, EBML + b"a" * 96)
        put(s, "u", 2, b"c" * 100)                     # stashed bytes count too
        put(s, "u", 1, b"b" * 100)                     # exactly 300: accepted
        with pytest.raises(StoreError) as caught:
            put(s, "u", 3, b"d")                       # 301: refused
        assert (caught.value.status, caught.value.code) == (413, "upload_too_large")
        assert s.status("u").bytes_appended == 300
    finally:
        s.close()


def test_checksum_is_verified(store):
    import hashlib
    data = EBML + b"payload"
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    put(store, "h", 0, data, checksum=good)
    for bad, code in (("sha256:" + "0" * 64, "checksum_mismatch"),
                      ("md5:abc", "invalid_checksum"), ("sha256:xyz", "invalid_checksum")):
        with pytest.raises(StoreError) as caught:
            put(store, "h", 1, b"more", checksum=bad)
        assert caught.value.code == code
    assert store.status("h").next_index == 1


def test_chunk_index_limits(store):
    put(store, "i", storage.MAX_CHUNK_INDEX, b"z")           # at the edge: accepted
    with pytest.raises(StoreError) as caught:
        put(store, "i", storage.MAX_CHUNK_INDEX + 1, b"z")
    assert caught.value.code == "invalid_chunk_index"


def test_missing_list_is_capped(store):
    put(store, "big", 0, EBML)
    result = put(store, "big", 5000, b"z", last=True)
    missing = result.upload.missing_chunks()
    assert len(missing) == storage.MAX_MISSING_LISTED
    assert missing[:2] == [1, 2]


@pytest.mark.parametrize("bad_id", ["", "../x", "a/b", "a.b", "x" * 129, "caf\u00e9"])
def test_invalid_file_ids_never_reach_the_disk(store, bad_id):
    with pytest.raises(StoreError) as caught:
        put(store, bad_id, 0, EBML)
    assert caught.value.code == "invalid_file_id"
    assert sorted(os.listdir(store.root)) == sorted(["m1.sqlite3", "temp"] + [
        n for n in os.listdir(store.root) if n.startswith("m1.sqlite3-")])


def test_sha256_is_computed_after_completion(store):
    import hashlib
    import time
    parts = chunks_of(3)
    put(store, "z", 0, parts[0])
    put(store, "z", 1, parts[1])
    put(store, "z", 2, parts[2], last=True)
    deadline = time.monotonic() + 10
    while store.status("z").sha256 is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.status("z").sha256 == hashlib.sha256(b"".join(parts)).hexdigest()


# -- repair -------------------------------------------------------------------------------

def reopen(store):
    store.close()
    fresh = ChunkStore(store.root)
    fresh.repair()
    return fresh


def test_repair_cuts_a_torn_tail(store):
    parts = chunks_of(2)
    put(store, "t", 0, parts[0])
    with open(store.media_path(store.status("t")), "ab") as f:
        f.write(b"torn write")
    store = reopen(store)
    try:
        assert assembled(store, "t") == parts[0]
        put(store, "t", 1, parts[1], last=True)
        assert assembled(store, "t") == b"".join(parts)
    finally:
        store.close()


def test_repair_removes_unrecorded_and_already_appended_chunk_files(store):
    parts = chunks_of(3)
    put(store, "f", 0, parts[0])
    folder = os.path.join(store.temp_dir, "f")
    os.makedirs(folder, exist_ok=True)
    for name in ("0.chunk", "7.chunk", "junk"):          # appended / never recorded / stray
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"x")
    with open(os.path.join(store.incoming_dir, "half.part"), "wb") as f:
        f.write(b"x")
    os.makedirs(os.path.join(store.temp_dir, "unknown_upload"))
    store = reopen(store)
    try:
        assert os.listdir(folder) == []
        assert os.listdir(store.incoming_dir) == []
        assert not os.path.exists(os.path.join(store.temp_dir, "unknown_upload"))
        assert store.status("f").chunks_received == 1
    finally:
        store.close()


def test_repair_appends_stashed_chunks_that_became_contiguous(store):
    parts = chunks_of(3)
    put(store, "p", 1, parts[1])
    put(store, "p", 2, parts[2], last=True)
    # Simulate a crash right after chunk 0 was recorded, before chunks 1-2 were appended:
    # append and record chunk 0 by hand, exactly as the store's first two steps do.
    store._ledger.record_append("p", 0, len(parts[0]), 0, time.time())
    with open(os.path.join(store.root, "p.webm"), "wb") as f:
        f.write(parts[0])
    store = reopen(store)
    try:
        upload = store.status("p")
        assert upload.completed
        assert assembled(store, "p") == b"".join(parts)
    finally:
        store.close()


def test_newer_schema_is_refused(tmp_path):
    import sqlite3
    root = tmp_path / "new"
    ChunkStore(str(root)).close()
    db = sqlite3.connect(str(root / "m1.sqlite3"))
    db.execute("PRAGMA user_version=%d" % (chunkstore.SCHEMA_VERSION + 1))
    db.commit()
    db.close()
    with pytest.raises(RuntimeError):
        ChunkStore(str(root))


def test_listeners_see_chunks_in_order_then_completed_with_sha256(store):
    import hashlib
    import time
    events = []
    store.add_listener(events.append)
    store.add_listener(lambda event: 1 / 0)          # a broken listener harms nothing
    parts = chunks_of(3)
    put(store, "ev", 1, parts[1])
    put(store, "ev", 0, parts[0])
    put(store, "ev", 0, parts[0])                    # duplicate: no event
    put(store, "ev", 2, parts[2], last=True)
    deadline = time.monotonic() + 10
    while not any(e["type"] == "completed" for e in events) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [(e["type"], e.get("index")) for e in events] == [
        ("chunk", 1), ("chunk", 0), ("chunk", 2), ("completed", None)]
    assert events[1]["bytesReceived"] == len(parts[0]) + len(parts[1])
    assert events[-1]["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    assert events[-1]["size"] == sum(map(len, parts))


# --- small chunks: one fsync, bytes journaled in the ledger until the file is synced --------

JOURNAL_BYTES = chunkstore.SLOW_DISK_JOURNAL_CHUNK_BYTES    # the journal on


def journal_rows(store, file_id):
    return store._ledger.journal(file_id)


def test_journal_takes_in_order_chunks_up_to_its_size_and_not_one_byte_more(tmp_path):
    limit = 4096
    store = ChunkStore(str(tmp_path / "up"), journal_chunk_bytes=limit)
    try:
        at_edge = EBML + b"a" * (limit - len(EBML))
        put(store, "j", 0, at_edge)                                 # exactly the limit
        assert journal_rows(store, "j") == [(0, at_edge)]
        put(store, "j", 1, b"b" * limit)                            # still journaled
        assert [offset for offset, _ in journal_rows(store, "j")] == [0, limit]
        put(store, "j", 2, b"c" * (limit + 1))                      # one byte more: fsynced,
        assert journal_rows(store, "j") == []                       # and the file with it
        put(store, "j", 4, b"e" * 10)                               # early: stashed, never
        assert journal_rows(store, "j") == []                       # journaled
        assert assembled(store, "j") == at_edge + b"b" * limit + b"c" * (limit + 1)
    finally:
        store.close()


def test_journal_off_fsyncs_every_chunk(tmp_path):
    store = ChunkStore(str(tmp_path / "up"), journal_chunk_bytes=0)
    try:
        put(store, "off", 0, EBML + b"x")
        put(store, "off", 1, b"")
        assert journal_rows(store, "off") == []
    finally:
        store.close()


def test_journal_is_synced_and_emptied_past_its_flush_size(tmp_path, monkeypatch):
    monkeypatch.setattr(chunkstore, "JOURNAL_FLUSH_BYTES", 10000)
    store = ChunkStore(str(tmp_path / "up"), journal_chunk_bytes=4000)
    try:
        put(store, "f", 0, EBML + b"0" * 3996)
        put(store, "f", 1, b"1" * 4000)
        assert len(journal_rows(store, "f")) == 2                  # 8000: at most 10000
        put(store, "f", 2, b"2" * 2000)                            # 10000: not past it
        assert len(journal_rows(store, "f")) == 3
        put(store, "f", 3, b"3")                                   # 10001: past it, synced
        assert journal_rows(store, "f") == []
    finally:
        store.close()


def test_the_journal_is_off_by_default(tmp_path):
    store = ChunkStore(str(tmp_path / "up"))
    try:
        assert store.journal_chunk_bytes == chunkstore.DEFAULT_JOURNAL_CHUNK_BYTES == 0
        put(store, "plain", 0, EBML + b"small")
        put(store, "plain", 1, b"also small")
        assert journal_rows(store, "plain") == []
        assert assembled(store, "plain") == EBML + b"smallalso small"
    finally:
        store.close()


def test_completion_and_close_empty_the_journal(tmp_path):
    root = str(tmp_path / "up")
    store = ChunkStore(root, journal_chunk_bytes=JOURNAL_BYTES)
    put(store, "done", 0, EBML + b"d")
    put(store, "done", 1, b"e", last=True)
    assert journal_rows(store, "done") == []                       # completed: synced
    put(store, "open", 0, EBML + b"o")
    assert len(journal_rows(store, "open")) == 1
    store.close()                                                  # a clean stop syncs
    store = ChunkStore(root, journal_chunk_bytes=JOURNAL_BYTES)
    try:
        assert journal_rows(store, "open") == []
    finally:
        store.close()


def test_repair_writes_journaled_chunks_back_into_a_file_that_lost_them(tmp_path):
    """What a power cut does to writes that were never fsynced: the file keeps only what
    reached the disk (here: nothing after chunk 0, then garbage). The ledger's journal,
    committed before the 200, has the bytes: repair puts them back, byte-exact."""
    root = str(tmp_path / "up")
    store = ChunkStore(root, journal_chunk_bytes=1000)
    parts = [EBML + b"0" * 2000, b"1" * 500, b"2" * 700]
    put(store, "cut", 0, parts[0])                                 # 2004 bytes: fsynced
    put(store, "cut", 1, parts[1])                                 # journaled
    put(store, "cut", 2, parts[2])                                 # journaled
    path = store.media_path(store.status("cut"))
    store._ledger.close()                                          # "power cut": no close()
    store._hasher.stop()
    with open(path, "r+b") as f:
        f.truncate(len(parts[0]) + 100)                            # lost most of the tail,
        f.seek(len(parts[0]))                                      # and what is left is junk
        f.write(b"\0" * 100)
    store = ChunkStore(root)
    try:
        store.repair()
        upload = store.status("cut")
        assert upload.next_index == 3 and upload.bytes_appended == 3204
        assert assembled(store, "cut") == b"".join(parts)
        assert journal_rows(store, "cut") == []
    finally:
        store.close()


def test_repair_never_fills_a_hole_before_a_journaled_chunk(tmp_path):
    # The file lost more than its journal holds (bytes that had been fsynced): writing the
    # journal at its offset would leave zeros before it. Repair rolls back instead.
    root = str(tmp_path / "up")
    store = ChunkStore(root, journal_chunk_bytes=1000)
    parts = [EBML + b"0" * 2000, b"1" * 2000, b"2" * 300]
    for index, data in enumerate(parts):
        put(store, "hole", index, data)                            # 0, 1 fsynced; 2 journaled
    path = store.media_path(store.status("hole"))
    store._ledger.close()
    store._hasher.stop()
    with open(path, "r+b") as f:
        f.truncate(len(parts[0]) + 10)                             # chunk 1 torn, 2 gone
    store = ChunkStore(root)
    try:
        store.repair()
        upload = store.status("hole")
        assert (upload.next_index, upload.bytes_appended) == (1, len(parts[0]))
        assert assembled(store, "hole") == parts[0]
        assert journal_rows(store, "hole") == []
    finally:
        store.close()


def test_a_new_ledger_is_made_in_one_transaction_and_a_current_one_is_not_written(tmp_path):
    # A new folder's schema and version commit together (one sync, not one per statement):
    # a ledger at the current version is opened, served from and closed without one write,
    # so a restart syncs nothing before it listens.
    import sqlite3
    root = tmp_path / "ledger"
    store = ChunkStore(str(root))
    put(store, "kept", 0, EBML + b"one")
    store.close()
    db = sqlite3.connect(str(root / "m1.sqlite3"))
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == chunkstore.SCHEMA_VERSION
        tables = set(row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'index')"))
        assert {"uploads", "chunks", "journal", "uploads_by_age"} <= tables
    finally:
        db.close()
    before = sqlite_files(root, "m1.sqlite3")
    store = ChunkStore(str(root))
    try:
        assert assembled(store, "kept") == EBML + b"one"
    finally:
        store.close()
    assert sqlite_files(root, "m1.sqlite3") == before


def test_a_version_1_ledger_gains_the_journal(tmp_path):
    import sqlite3
    root = tmp_path / "old"
    store = ChunkStore(str(root))
    put(store, "old", 0, EBML + b"v1")
    store.close()
    db = sqlite3.connect(str(root / "m1.sqlite3"))
    db.execute("DROP TABLE journal")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = ChunkStore(str(root), journal_chunk_bytes=JOURNAL_BYTES)
    try:
        put(store, "old", 1, b"more")
        assert assembled(store, "old") == EBML + b"v1more"
        assert journal_rows(store, "old") == [(6, b"more")]
    finally:
        store.close()
    db = sqlite3.connect(str(root / "m1.sqlite3"))
    assert db.execute("PRAGMA user_version").fetchone()[0] == chunkstore.SCHEMA_VERSION == 2
    db.close()


# -- a full disk (issue 14): 507 and nothing half-written, whichever write runs out of room ----

def scan_free_space(disk, store, file_id, index, data, last=False):
    """Try to store chunk `index` with 0, 4 KiB, 8 KiB ... free on the disk (after its part
    file is written) until it is stored. Every refusal must be a 507 that changed nothing;
    returns the messages of the disk-full warnings logged on the way."""
    from conftest import leave_free
    before = store.status(file_id)
    causes = []
    for free in range(0, 4 * len(data) + (256 << 10), 4096):
        path, f = store.new_part_file()
        with f:
            f.write(data)
        leave_free(disk, free)
        try:
            result = store.put_chunk(file_id, index, path, len(data), is_last=last)
        except StoreError as error:
            assert (error.status, error.code) == (507, "insufficient_storage"), error.message
            causes.append(error.message)
            assert_unchanged(store, file_id, before)
            continue
        finally:
            leave_free(disk, 1 << 30)                 # room again for the checks
        assert result.index == index and not result.duplicate
        return causes
    raise AssertionError("chunk %d was never stored" % index)


def assert_unchanged(store, file_id, before):
    now = store.status(file_id)
    if before is None:
        assert now is None or (now.next_index, now.stashed) == (0, [])
        return
    assert (now.next_index, now.bytes_appended, now.stashed) == \
        (before.next_index, before.bytes_appended, before.stashed)
    media = store.media_path(now)
    assert not os.path.exists(media) or os.path.getsize(media) == now.bytes_appended
    assert os.listdir(store.incoming_dir) == []
    folder = os.path.join(store.temp_dir, file_id)
    held = sorted(int(n.split(".")[0]) for n in os.listdir(folder)) if os.path.isdir(folder) \
        else []
    assert held == now.stashed


def test_a_full_disk_refuses_each_kind_of_chunk_with_507_and_keeps_nothing_of_it(
        small_disk, capsys):
    store = ChunkStore(os.path.join(small_disk, "up"))
    try:
        small = EBML + os.urandom(32 << 10)            # journaled: its bytes go to the ledger
        large = os.urandom(300 << 10)                  # fsynced file, small ledger write
        early = os.urandom(600 << 10)                  # stashed, later larger than the room
        scan_free_space(small_disk, store, "full", 0, small)
        scan_free_space(small_disk, store, "full", 1, large)
        scan_free_space(small_disk, store, "full", 3, early, last=True)
        scan_free_space(small_disk, store, "full", 2, large)
        # chunk 3 is appended now, or still waits in temp/ if the disk was full for it (its
        # retry drains it: a duplicate, answered as one)
        assert put(store, "full", 3, early, last=True).duplicate
        upload = store.status("full")
        assert upload.completed
        assert assembled(store, "full") == small + large + large + early
    finally:
        store.close()
    lines = capsys.readouterr().err.splitlines()       # serverlog: "<time> LEVEL name: text"
    messages = [line.split(" ", 1)[1] for line in lines]
    assert "WARNING m1server.store: full: chunk 3 waits in temp/ for room on the disk" in \
        messages                                                          # the drain paused
    logged = " ".join(m for m in messages if "disk full" in m)
    for step in ("appending chunk 0", "appending chunk 1", "keeping chunk 3 for later"):
        assert step in logged, step
    assert "No space left on device" in logged                 # the file ran out of room
    assert "database or disk is full" in logged                # the ledger's commit did
    fresh = ChunkStore(os.path.join(small_disk, "up"))
    try:
        assert fresh.repair() == 0                             # nothing left to mend
    finally:
        fresh.close()


def test_room_for_counts_both_copies_and_other_chunks_being_received(tmp_path):
    import shutil
    free = shutil.disk_usage(str(tmp_path)).free
    store = ChunkStore(str(tmp_path / "up"), min_free_bytes=free // 2)
    try:
        share = free // 8                       # x2 copies: a quarter of the disk each
        with store.room_for(share):
            with pytest.raises(StoreError) as caught:
                with store.room_for(share + (64 << 20)):
                    pass                        # the first one's reservation counts too
            assert (caught.value.status, caught.value.code) == (507, "insufficient_storage")
        with store.room_for(share):             # released: room again
            pass
    finally:
        store.close()


# -- links inside the upload folder (issue 14): never written, renamed into or deleted through --

@pytest.fixture
def victim(tmp_path):
    """Somewhere outside the upload folder that a link points at: it must stay as it is."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "precious").write_bytes(b"keep me")
    return str(folder)


def assert_untouched(victim):
    assert sorted(os.listdir(victim)) == ["precious"]
    with open(os.path.join(victim, "precious"), "rb") as f:
        assert f.read() == b"keep me"


def refused_as_unsafe(call, *args, **kw):
    with pytest.raises(StoreError) as caught:
        call(*args, **kw)
    assert (caught.value.status, caught.value.code) == (500, "unsafe_path")


def test_a_link_at_the_video_path_is_never_written_through(store, victim):
    os.symlink(os.path.join(victim, "precious"), os.path.join(store.root, "lnk.webm"))
    refused_as_unsafe(put, store, "lnk", 0, EBML + b"first chunk")
    assert_untouched(victim)
    assert os.listdir(store.incoming_dir) == []


def test_a_link_at_an_uploads_temp_folder_is_never_written_into(store, victim):
    put(store, "tl", 0, EBML + b"first")
    os.symlink(victim, os.path.join(store.temp_dir, "tl"))
    refused_as_unsafe(put, store, "tl", 2, b"early chunk")
    assert_untouched(victim)
    assert put(store, "tl", 1, b"in order").upload.next_index == 2   # the rest still works


def test_a_link_at_the_incoming_folder_is_refused_and_replaced_at_repair(store, victim):
    os.rmdir(store.incoming_dir)
    os.symlink(victim, store.incoming_dir)
    refused_as_unsafe(store.new_part_file)
    store = reopen(store)
    try:
        assert_untouched(victim)
        assert not os.path.islink(store.incoming_dir)
        assert put(store, "afterwards", 0, EBML + b"x").upload.next_index == 1
        assert any("incoming" in name for name in os.listdir(os.path.join(store.root,
                                                                          "quarantine")))
    finally:
        store.close()


def test_a_link_at_the_deletion_folder_is_never_renamed_into(store, victim):
    put(store, "dl", 0, EBML + b"x")
    os.rmdir(store.deleting_dir)
    os.symlink(victim, store.deleting_dir)
    refused_as_unsafe(store.delete, "dl")
    assert_untouched(victim)
    assert store.status("dl") is not None and os.path.exists(os.path.join(store.root, "dl.webm"))


@pytest.mark.parametrize("where", ["derived", "derived/<id>"])
def test_links_at_the_derivatives_folders_are_never_written_or_deleted_through(
        store, victim, tmp_path, where):
    put(store, "dv", 0, EBML + b"x", last=True)
    upload = store.status("dv")
    if where == "derived":
        os.symlink(victim, store.derived_dir)
    else:
        os.makedirs(store.derived_dir)
        os.symlink(victim, os.path.join(store.derived_dir, "dv"))
    poster = tmp_path / "poster.jpg"
    poster.write_bytes(b"jpeg")
    refused_as_unsafe(store.put_derivative, upload, "poster.jpg", str(poster))
    assert store.open_derivative(upload, "precious") is None
    assert store.delete("dv")
    assert_untouched(victim)


def test_repair_sets_links_aside_and_never_acts_on_their_targets(store, victim):
    put(store, "kept", 0, EBML + b"first")
    put(store, "kept", 2, b"early")
    os.symlink(os.path.join(victim, "precious"), os.path.join(store.temp_dir, "kept", "4.chunk"))
    os.symlink(victim, os.path.join(store.temp_dir, "unknown_upload"))
    os.makedirs(store.derived_dir)
    os.symlink(victim, os.path.join(store.derived_dir, "kept"))
    os.symlink(victim, os.path.join(store.derived_dir, "unknown_upload"))
    store = reopen(store)
    try:
        assert_untouched(victim)
        upload = store.status("kept")
        assert (upload.next_index, upload.stashed) == (1, [2])
        set_aside = os.listdir(os.path.join(store.root, "quarantine"))
        assert len(set_aside) == 4 and all(os.path.islink(os.path.join(
            store.root, "quarantine", name)) for name in set_aside)
    finally:
        store.close()
