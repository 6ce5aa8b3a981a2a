"""Crash safety of the chunk store (SPEC §1: "a crash at any moment loses no acknowledged chunk
and never leaves duplicated or torn bytes; on restart the server repairs each upload to its last
consistent state, and the client resumes from nextChunkIndex").

Three attacks, all against the real server process on a real directory:
- deterministic crash points: `M1_TEST_CRASH_AT=<step>[:<n>]` makes the store `os._exit(70)`
  right after the n-th time it passes <step>. Every step is hit for a first, an in-order, an
  out-of-order, a draining (stashed chunk appended because an earlier one arrived) and a last
  chunk; the server then restarts on the same directory without the hook and must show a
  consistent state from which a resuming client finishes byte-exact;
- kill -9 at random moments while several clients upload, restart on the same port and
  directory, repeat; the seed is printed with every failure (M1_TEST_SEED=<seed> repeats the
  payloads, send orders and kill delays; where a kill lands still depends on timing);
- damage made by hand while the server is stopped (a torn tail, orphan files) is repaired
  on start-up.

What "consistent" means here, for an upload with source chunks c0..cN-1:
- the assembled file is exactly c0 + ... + c(k-1) where k is the status' nextChunkIndex, and the
  status' fileSize is its length: never a torn or a duplicated chunk;
- k is at least the contiguous prefix of chunks the client got a 200 for, and no acknowledged
  chunk is listed in missingChunks: an acknowledged chunk is never lost;
- uploads/temp/.incoming/ is empty and uploads/temp/<fileId>/ holds only whole early chunks
  (<n>.chunk, n >= k, equal to the source chunk).
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import threading
import time
import traceback

import pytest
import requests

from chunkstore import JOURNAL_FLUSH_BYTES, SLOW_DISK_JOURNAL_CHUNK_BYTES
from conftest import get_status, send_chunk, split_chunks, wait_until

CRASH_EXIT_CODE = 70          # the contract: the hook ends the process with os._exit(70)
CHUNKS = 6                    # sample.webm cut into this many chunks for the crash-point tests
LAST = CHUNKS - 1
EXT = ".webm"                 # no mimeType is sent, so the store picks the default extension
STASH_NAME = re.compile(r"^(\d+)\.chunk$")
EBML_MAGIC = b"\x1a\x45\xdf\xa3"


# ---------------------------------------------------------------------------------------------
# Helpers: paths on disk, the consistency check, resuming like a client does.

def data_path(upload_dir, file_id, ext=EXT):
    return os.path.join(upload_dir, file_id + ext)


def stash_dir(upload_dir, file_id):
    return os.path.join(upload_dir, "temp", file_id)


def incoming_dir(upload_dir):
    return os.path.join(upload_dir, "temp", ".incoming")


def listdir(path):
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def describe_difference(actual, expected):
    """A short, readable account of how two byte strings differ (never the bytes themselves)."""
    if actual is None:
        return "file missing, expected %d bytes" % len(expected)
    if actual == expected:
        return "equal"
    common = min(len(actual), len(expected))
    first = next((i for i in range(common) if actual[i] != expected[i]), common)
    return "got %d bytes, expected %d; first difference at offset %d" % (
        len(actual), len(expected), first)


def contiguous_prefix(indices):
    """How many chunks 0, 1, 2, ... are in `indices` without a gap."""
    k = 0
    while k in indices:
        k += 1
    return k


def status_data(session, base_url, file_id):
    response = get_status(session, base_url, file_id)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True, body
    return body["data"]


def assert_consistent(srv, file_id, chunks, acked, context, ext=EXT):
    """Check the upload's on-disk and reported state (see the module docstring); return k."""
    with requests.Session() as session:
        data = status_data(session, srv.url, file_id)
    where = "%s\nstatus: %r" % (context, data)
    k = data.get("nextChunkIndex", 0) if data.get("exists") else 0
    assert isinstance(k, int) and 0 <= k <= len(chunks), where
    expected = b"".join(chunks[:k])

    on_disk = read_bytes(data_path(srv.upload_dir, file_id, ext))
    if k == 0 and on_disk is None:
        on_disk = b""
    assert on_disk == expected, (
        "assembled file is not the source prefix of %d chunks (%s)\n%s"
        % (k, describe_difference(on_disk, expected), where))
    if data.get("exists"):
        assert data.get("fileSize") == len(expected), "fileSize disagrees with the file\n" + where

    acked_prefix = contiguous_prefix(acked)
    assert k >= acked_prefix, (
        "acknowledged chunks lost: client holds 200s for 0..%d, nextChunkIndex is %d\n%s"
        % (acked_prefix - 1, k, where))
    missing = set(data.get("missingChunks") or [])
    assert not missing & set(acked), (
        "acknowledged chunks %s listed as missing\n%s" % (sorted(missing & set(acked)), where))

    assert listdir(incoming_dir(srv.upload_dir)) == [], (
        "stray part files left in temp/.incoming: %s\n%s"
        % (listdir(incoming_dir(srv.upload_dir)), where))
    stashed = set()
    for name in listdir(stash_dir(srv.upload_dir, file_id)):
        match = STASH_NAME.match(name)
        assert match, "stray file temp/%s/%s\n%s" % (file_id, name, where)
        index = int(match.group(1))
        assert k <= index < len(chunks), (
            "temp chunk file %s left for an already appended chunk\n%s" % (name, where))
        content = read_bytes(os.path.join(stash_dir(srv.upload_dir, file_id), name))
        assert content == chunks[index], "stashed chunk %s is torn (%s)\n%s" % (
            name, describe_difference(content, chunks[index]), where)
        stashed.add(index)
    lost = sorted(i for i in acked if i >= k and i not in stashed)
    assert not lost, "acknowledged early chunks %s are neither appended nor stashed\n%s" % (
        lost, where)
    if "chunksReceived" in data:
        assert data["chunksReceived"] == k + len(stashed), (
            "chunksReceived should count the %d appended and %d stashed chunks\n%s"
            % (k, len(stashed), where))
    return k


def resume_and_finish(srv, file_id, chunks, acked, context, ext=EXT, mime_type=None):
    """Resume as a client does: from nextChunkIndex, one duplicate of the chunk before it."""
    with requests.Session() as session:
        data = status_data(session, srv.url, file_id)
        k = data.get("nextChunkIndex", 0) if data.get("exists") else 0
        last = len(chunks) - 1
        resend = ([k - 1] if k > 0 else []) + list(range(k, len(chunks)))
        reply = None
        for index in resend:
            status = "completed" if index == last else "uploading"
            response = send_chunk(session, srv.url, file_id, index, chunks[index], status=status,
                                  mime_type=mime_type)
            assert response.status_code == 200, "%s\nresending chunk %d: %d %s" % (
                context, index, response.status_code, response.text)
            reply = response.json()["data"]
            if index < k or index in acked:
                assert reply.get("duplicate") is True, (
                    "%s\nchunk %d was already stored, expected duplicate: true, got %r"
                    % (context, index, reply))
        assert reply is not None and reply["status"] == "completed", "%s\nlast reply %r" % (
            context, reply)
    assert_completed(srv, file_id, b"".join(chunks), context, ext)


def assert_completed(srv, file_id, source, context, ext=EXT):
    """The upload is completed and every view of it is the source, byte-exact."""
    with requests.Session() as session:
        data = status_data(session, srv.url, file_id)
        assert data.get("state") == "completed", "%s\nstatus %r" % (context, data)
        assert data.get("fileSize") == len(source), "%s\nstatus %r" % (context, data)
        on_disk = read_bytes(data_path(srv.upload_dir, file_id, ext))
        assert on_disk == source, "%s\nassembled file: %s" % (
            context, describe_difference(on_disk, source))
        served = session.get(srv.url + "/uploads/" + file_id + ext, timeout=30)
        assert served.status_code == 200, context
        assert served.content == source, "%s\nGET /uploads: %s" % (
            context, describe_difference(served.content, source))
        assert listdir(stash_dir(srv.upload_dir, file_id)) == [], "%s\nleft in temp: %s" % (
            context, listdir(stash_dir(srv.upload_dir, file_id)))
        assert listdir(incoming_dir(srv.upload_dir)) == [], context
        digest = "sha256" in data and data["sha256"]
        if not digest:
            digest = wait_until(lambda: status_data(session, srv.url, file_id).get("sha256"),
                                timeout=15, message="sha256 of %s (%s)" % (file_id, context))
        assert digest.split(":")[-1] == hashlib.sha256(source).hexdigest(), (
            "%s\nsha256 %r is not the hash of the source" % (context, digest))


def send_plan(srv, file_id, chunks, order, mime_type=None, file_first=False):
    """Send chunks in `order` until one fails to connect; return (acked, failed position)."""
    acked = set()
    with requests.Session() as session:
        for position, index in enumerate(order):
            status = "completed" if index == len(chunks) - 1 else "uploading"
            try:
                response = send_chunk(session, srv.url, file_id, index, chunks[index],
                                      status=status, mime_type=mime_type,
                                      file_first=file_first)
            except requests.ConnectionError:
                return acked, position
            assert response.status_code == 200, "chunk %d: %d %s\n%s" % (
                index, response.status_code, response.text, srv.log())
            acked.add(index)
    return acked, None


# ---------------------------------------------------------------------------------------------
# 1. Deterministic crash points.
#
# Each scenario: the order the client sends chunks in, the position in that order of the request
# the crash must land on, and the `step:n` hook settings that land there. Counting follows the
# contract: every chunk received into a part file passes `received`; an early chunk then
# `stashed`, `stash_recorded`; an appended chunk (arrived in order, or drained from the stash)
# `appended`, `append_recorded`, `cleaned`. The chunk that completes an upload is never
# journaled: its file is fsynced and its own transaction empties the journal and records the
# completion (test_crash_while_a_full_journal_is_synced has the steps `journal_*`).
# These requests send the file part first (the seed's order), so every chunk takes the part
# file; IN_PLACE_SCENARIOS send the text fields first, as the clients do.
SCENARIOS = [
    # The request that creates the upload.
    ("first_chunk", [0, 1, 2, 3, 4, 5], 0,
     ["received:1", "appended:1", "append_recorded:1", "cleaned:1"]),
    # An in-order chunk after an acknowledged one.
    ("in_order", [0, 1, 2, 3, 4, 5], 1,
     ["received:2", "appended:2", "append_recorded:2", "cleaned:2"]),
    # An early chunk, and an early chunk beside another stashed one.
    ("out_of_order", [0, 2, 1, 3, 4, 5], 1,
     ["received:2", "stashed:1", "stash_recorded:1"]),
    ("out_of_order_second", [0, 3, 2, 1, 4, 5], 2,
     ["stashed:2", "stash_recorded:2"]),
    # Chunk 1 makes stashed 2 and 3 contiguous: crash while appending stashed 2, then 3.
    ("drain_first_stashed", [0, 2, 3, 1, 4, 5], 3,
     ["appended:3", "append_recorded:3", "cleaned:3"]),
    ("drain_last_stashed", [0, 2, 3, 1, 4, 5], 3,
     ["appended:4", "append_recorded:4", "cleaned:4"]),
    # The last chunk (status=completed) arriving in order.
    ("last_chunk", [0, 1, 2, 3, 4, 5], 5,
     ["received:6", "appended:6", "append_recorded:6", "cleaned:6"]),
    # The last chunk arriving early, then the chunk that drains it and completes the upload.
    ("last_chunk_early", [0, 1, 2, 3, 5, 4], 4,
     ["stashed:1", "stash_recorded:1"]),
    ("completing_drain", [0, 1, 2, 3, 5, 4], 5,
     ["appended:5", "appended:6", "append_recorded:6", "cleaned:6"]),
]

# The text fields first: every in-order chunk, chunk 0 of the new upload too (its row is
# written in its commit), is written in place and passes `reserved`, `streaming` (after each
# block written: the first one is the only count a request's timing cannot move), `streamed`,
# `stream_recorded`; early chunks are stashed as above, and drained by `appended`, ...
IN_PLACE_SCENARIOS = [
    # The new upload's first chunk: a crash before its commit leaves a file with no row.
    ("in_place_first", [0, 1, 2, 3, 4, 5], 0,
     ["reserved:1", "streaming:1", "streamed:1", "stream_recorded:1"]),
    # Chunks 1.. are recorded in the file too (records_synced: its bytes and records synced,
    # the ledger's commit not yet made; chunk 0, a new upload, and the last never are).
    ("in_place", [0, 1, 2, 3, 4, 5], 1,
     ["reserved:2", "streamed:2", "records_synced:1", "stream_recorded:2"]),
    ("in_place_later", [0, 1, 2, 3, 4, 5], 3,
     ["reserved:4", "streamed:4", "records_synced:3", "stream_recorded:4"]),
    # Chunk 1 in place makes stashed 2 and 3 contiguous: crash after its record, then while
    # draining them.
    ("in_place_drain", [0, 2, 3, 1, 4, 5], 3,
     ["records_synced:1", "stream_recorded:2", "appended:1", "append_recorded:2", "cleaned:2"]),
    ("in_place_last", [0, 1, 2, 3, 4, 5], 5,
     ["reserved:6", "streamed:6", "stream_recorded:6"]),
    ("in_place_completing", [0, 2, 3, 4, 5, 1], 5,
     ["streamed:2", "records_synced:1", "stream_recorded:2", "appended:4", "cleaned:4"]),
]

# Every way of appending in order: small chunks journaled in the ledger (--journal-chunk-size
# as --help suggests for slow disks, which takes these ~35 KB chunks); recorded in their file
# with an unsynced commit (the default: chunk records); every chunk's file and commit synced
# (--no-xattr). Steps `journal_*` are passed only with the journal, `records_*` only with
# records, and a chunk through a part file (the file part first) is never recorded, so the
# part-file scenarios of --no-xattr would repeat those of records: left out.
JOURNAL_BYTES = SLOW_DISK_JOURNAL_CHUNK_BYTES
APPEND_MODES = {"journal": ["--journal-chunk-size", str(JOURNAL_BYTES)],
                "records": ["--journal-chunk-size", "0"],
                "fsync": ["--journal-chunk-size", "0", "--no-xattr"]}
CRASH_CASES = [pytest.param(name, order, position, hook, mode, file_first,
                            id="%s-%s-%s" % (mode, name, hook))
               for mode in APPEND_MODES
               for file_first, scenarios in ((True, SCENARIOS), (False, IN_PLACE_SCENARIOS))
               for name, order, position, hooks in scenarios for hook in hooks
               if (mode == "journal" or not hook.startswith("journal_")) and
               (mode == "records" or not hook.startswith("records_")) and
               not (mode == "fsync" and file_first)]


@pytest.mark.parametrize("name, order, position, hook, mode, file_first", CRASH_CASES)
def test_crash_at_step_restarts_consistent_and_resumes_byte_exact(
        server_factory, sample_webm, name, order, position, hook, mode, file_first):
    chunks = split_chunks(sample_webm, CHUNKS)
    file_id = "crash_" + name + "_" + hook.replace(":", "_")
    srv = server_factory(start=False, args=APPEND_MODES[mode])
    crash_and_resume(srv, file_id, chunks, order, position, hook, file_first)


# Small chunks, in order, until the upload's journal passes its flush size: the chunk after
# which it does syncs the file (journal_synced) and empties the journal (journal_cleared).
JOURNAL_CHUNK = 48 * 1024              # journaled (at most JOURNAL_BYTES)


@pytest.mark.parametrize("file_first", [True, False], ids=["part-file", "in-place"])
@pytest.mark.parametrize("hook", ["journal_synced:1", "journal_cleared:1"])
def test_crash_while_a_full_journal_is_synced(server_factory, sample_webm, hook, file_first):
    assert JOURNAL_CHUNK <= JOURNAL_BYTES
    count = JOURNAL_FLUSH_BYTES // JOURNAL_CHUNK + 3
    source = (sample_webm * (count * JOURNAL_CHUNK // len(sample_webm) + 1))
    chunks = [source[i * JOURNAL_CHUNK:(i + 1) * JOURNAL_CHUNK] for i in range(count)]
    position = JOURNAL_FLUSH_BYTES // JOURNAL_CHUNK      # the first chunk past the flush size
    assert (position + 1) * JOURNAL_CHUNK > JOURNAL_FLUSH_BYTES >= position * JOURNAL_CHUNK
    file_id = "crash_journal_flush_%s_%s" % (hook.replace(":", "_"), int(file_first))
    srv = server_factory(start=False, args=APPEND_MODES["journal"])
    crash_and_resume(srv, file_id, chunks, list(range(count)), position, hook, file_first)


def crash_and_resume(srv, file_id, chunks, order, position, hook, file_first):
    """Start with the crash hook, send `order` until the server dies (on request `position`,
    the contract's counting), restart twice (consistent, and repair is idempotent), resume."""
    srv.start(extra_env={"M1_TEST_CRASH_AT": hook})

    acked, failed_at = send_plan(srv, file_id, chunks, order, file_first=file_first)
    context = "M1_TEST_CRASH_AT=%s, order %s%s, acknowledged %s" % (
        hook, order, ", file part first" if file_first else "", sorted(acked))
    assert failed_at is not None, "%s: the hook never fired\n%s" % (context, srv.log())
    wait_until(lambda: not srv.alive(), timeout=10, message="the crashed server to exit")
    assert srv.proc.returncode == CRASH_EXIT_CODE, "%s: exit code %r\n%s" % (
        context, srv.proc.returncode, srv.log())
    assert failed_at == position, (
        "%s: the hook fired on request %d (chunk %d), the contract's counting puts it on "
        "request %d (chunk %d)" % (context, failed_at, order[failed_at], position,
                                   order[position]))

    srv.restart()                      # same port and directory, hook not set
    k = assert_consistent(srv, file_id, chunks, acked, context + " (after restart)")
    srv.restart()                      # repair is idempotent: a second start changes nothing
    again = assert_consistent(srv, file_id, chunks, acked, context + " (second restart)")
    assert again == k, "%s: nextChunkIndex %d after one restart, %d after two" % (
        context, k, again)
    resume_and_finish(srv, file_id, chunks, acked, context)


@pytest.mark.parametrize("hook", ["appended:1", "append_recorded:1", "cleaned:1", "appended:2"])
def test_crash_during_startup_repair_is_repaired_by_the_next_start(
        server_factory, sample_webm, hook):
    """Repair appends stashed chunks that became contiguous; a crash in the middle of that
    (the server dies again before it ever serves) must be repairable in turn."""
    chunks = split_chunks(sample_webm, CHUNKS)
    file_id = "crash_in_repair_" + hook.replace(":", "_")
    srv = server_factory(start=False)
    # Chunk 1 is appended and recorded, then the process dies before draining 2, 3, 4.
    srv.start(extra_env={"M1_TEST_CRASH_AT": "cleaned:2"})
    port = srv.port
    acked, failed_at = send_plan(srv, file_id, chunks, [0, 2, 3, 4, 1], file_first=True)
    assert failed_at == 4 and acked == {0, 2, 3, 4}, (failed_at, acked)
    wait_until(lambda: not srv.alive(), timeout=10, message="the crashed server to exit")

    with pytest.raises(RuntimeError):          # never prints "serving": it died repairing
        srv.start(port=port, extra_env={"M1_TEST_CRASH_AT": hook})
    assert srv.proc.returncode == CRASH_EXIT_CODE, "%s: exit code %r\n%s" % (
        hook, srv.proc.returncode, srv.log())

    srv.start(port=port)
    context = "crash at %s during start-up repair" % hook
    k = assert_consistent(srv, file_id, chunks, acked, context)
    assert k == 5, "%s: stashed 2, 3, 4 follow the appended prefix, nextChunkIndex %d" % (
        context, k)
    resume_and_finish(srv, file_id, chunks, acked, context)


@pytest.mark.parametrize("hook", ["appended:3", "cleaned:3"])
def test_crash_in_an_mp4_upload_repairs_the_mp4_file(server_factory, sample_mp4, hook):
    """Safari's uploads are .mp4 (mimeType video/mp4): repair must mend that file, not a
    .webm guess. Chunk 2 arrives early; chunk 1 drains it; the crash lands on that drain."""
    chunks = split_chunks(sample_mp4, CHUNKS)
    file_id = "crash_mp4_" + hook.replace(":", "_")
    srv = server_factory(start=False)
    srv.start(extra_env={"M1_TEST_CRASH_AT": hook})
    mime = "video/mp4"
    acked, failed_at = send_plan(srv, file_id, chunks, [0, 2, 1, 3, 4, 5], mime_type=mime,
                                 file_first=True)
    assert failed_at == 2, (failed_at, acked, srv.log())
    wait_until(lambda: not srv.alive(), timeout=10, message="the crashed server to exit")
    srv.restart()
    context = "mp4 upload, M1_TEST_CRASH_AT=%s" % hook
    assert_consistent(srv, file_id, chunks, acked, context, ext=".mp4")
    assert not os.path.exists(data_path(srv.upload_dir, file_id, ".webm")), context
    resume_and_finish(srv, file_id, chunks, acked, context, ext=".mp4", mime_type=mime)


# ---------------------------------------------------------------------------------------------
# 2. kill -9 at random moments under concurrent uploads.

KILL_ROUNDS = 15
KILL_DELAY_S = (0.05, 0.4)     # from "serving" to SIGKILL
LOOP_BUDGET_S = 60.0           # the kill loop stops early past this
CLIENT_DEADLINE_S = 45.0       # after the last restart, every client must be done by then
SERVER_BACK_S = 30.0           # a client waits this long for a restarted server
CLIENTS = 6
CHUNKS_PER_UPLOAD = 40
MAX_RANDOM_CHUNK = 64 * 1024
MAX_UPLOADS_PER_CLIENT = 6     # clients start new uploads while kills go on, up to this many
REQUEST_TIMEOUT = (3.0, 20.0)  # (connect, read) seconds


def random_payload(rng):
    """~40 chunks of 0..64 KiB; chunk 0 starts with the EBML signature and is never empty."""
    chunks = [EBML_MAGIC + rng.randbytes(rng.randint(0, MAX_RANDOM_CHUNK - len(EBML_MAGIC)))]
    for _ in range(CHUNKS_PER_UPLOAD - 1):
        chunks.append(rng.randbytes(rng.randint(0, MAX_RANDOM_CHUNK)))
    return chunks


def shuffled_order(rng, indices):
    """Mostly in order: some neighbours swapped, some chunks sent again later."""
    order = list(indices)
    for i in range(len(order) - 1):
        if rng.random() < 0.2:
            order[i], order[i + 1] = order[i + 1], order[i]
    for i in range(len(order) - 1, 0, -1):
        if rng.random() < 0.1:
            order.insert(i + 1, order[rng.randrange(0, i + 1)])
    return order


class ServerDown(Exception):
    pass


class Recorder(threading.Thread):
    """One client uploading its own random recordings through kills and restarts."""

    def __init__(self, number, srv, seed, kills_done):
        super().__init__(name="recorder-%d" % number, daemon=True)
        self.number = number
        self.srv = srv
        self.base_url = srv.url
        self.rng = random.Random("%d/%d" % (seed, number))
        self.kills_done = kills_done
        self.deadline = None          # set by the main thread once the kill loop ends
        self.uploads = {}             # fileId -> list of chunks
        self.failures = []
        self.interruptions = 0
        self.session = requests.Session()

    # The client's view of the server ---------------------------------------------------------
    def time_left(self):
        return self.deadline is None or time.monotonic() < self.deadline

    def wait_for_server(self):
        """Connection errors mean "server down": poll until it answers again."""
        self.interruptions += 1
        self.session.close()
        self.session = requests.Session()
        give_up = time.monotonic() + SERVER_BACK_S
        while time.monotonic() < give_up:
            try:
                if self.session.get(self.base_url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.02)
        raise ServerDown("server not back after %.0f s" % SERVER_BACK_S)

    def status(self, file_id):
        while self.time_left():
            try:
                response = get_status(self.session, self.base_url, file_id,
                                      timeout=REQUEST_TIMEOUT)
            except requests.RequestException:
                self.wait_for_server()
                continue
            if response.status_code != 200:
                raise AssertionError("status %s: %d %s" % (file_id, response.status_code,
                                                           response.text))
            return response.json()["data"]
        raise ServerDown("deadline passed while asking for status of " + file_id)

    # Invariants -------------------------------------------------------------------------------
    @staticmethod
    def check_not_lost(file_id, data, acked, acked_prefix, where):
        if data.get("state") == "completed" or data.get("status") == "completed":
            return
        next_index = data.get("nextChunkIndex", 0)
        assert next_index >= acked_prefix, (
            "%s %s: nextChunkIndex %d went below the acknowledged prefix %d"
            % (file_id, where, next_index, acked_prefix))
        missing = set(data.get("missingChunks") or []) & acked
        assert not missing, "%s %s: acknowledged chunks %s reported missing" % (
            file_id, where, sorted(missing))

    @staticmethod
    def resume_queue(data, acked, last):
        """Every chunk from nextChunkIndex on that got no 200, and the last chunk if it got
        none: it carries status=completed, which a crash may have kept from being recorded
        even though its bytes were appended (then nextChunkIndex is already past it)."""
        queue = [i for i in range(data.get("nextChunkIndex", 0), last + 1) if i not in acked]
        if last not in acked and last not in queue:
            queue.append(last)
        return queue

    # One upload -------------------------------------------------------------------------------
    def upload(self, file_id, chunks):
        last = len(chunks) - 1
        sizes = [len(c) for c in chunks]
        acked = set()
        acked_prefix = 0      # chunks below this were acknowledged (by a 200 or its nextChunkIndex)
        queue = shuffled_order(self.rng, range(len(chunks)))
        while True:
            if not self.time_left():
                raise AssertionError("%s not completed before the deadline; acknowledged %s"
                                     % (file_id, sorted(acked)))
            if not queue:
                data = self.status(file_id)
                self.check_not_lost(file_id, data, acked, acked_prefix, "status")
                if data.get("state") == "completed":
                    return
                queue = self.resume_queue(data, acked, last)
                assert queue, (
                    "%s is stuck at nextChunkIndex %r although every later chunk was "
                    "acknowledged: %r" % (file_id, data.get("nextChunkIndex"), data))
                continue
            index = queue.pop(0)
            status = "completed" if index == last else "uploading"
            try:
                response = send_chunk(self.session, self.base_url, file_id, index, chunks[index],
                                      status=status, timeout=REQUEST_TIMEOUT)
            except requests.RequestException:
                self.wait_for_server()
                data = self.status(file_id)
                self.check_not_lost(file_id, data, acked, acked_prefix, "status after restart")
                if data.get("state") == "completed":
                    return
                queue = shuffled_order(self.rng, self.resume_queue(data, acked, last))
                continue
            assert response.status_code == 200, "%s chunk %d: %d %s" % (
                file_id, index, response.status_code, response.text)
            data = response.json()["data"]
            assert data["chunkIndex"] == index and data["fileId"] == file_id, data
            acked.add(index)
            acked_prefix = max(acked_prefix, contiguous_prefix(acked))
            self.check_not_lost(file_id, data, acked, acked_prefix, "reply to chunk %d" % index)
            next_index = data["nextChunkIndex"]
            assert data["bytesReceived"] == sum(sizes[:next_index]), (
                "%s chunk %d: bytesReceived %d is not the size of chunks 0..%d"
                % (file_id, index, data["bytesReceived"], next_index - 1))
            acked_prefix = max(acked_prefix, next_index)
            if data["status"] == "completed":
                assert next_index == len(chunks) and data["bytesReceived"] == sum(sizes), data
                return

    def run(self):
        try:
            number = 0
            while number < MAX_UPLOADS_PER_CLIENT and (number == 0 or not self.kills_done.is_set()):
                file_id = "kill_c%d_u%d" % (self.number, number)
                chunks = random_payload(self.rng)
                self.uploads[file_id] = chunks
                self.upload(file_id, chunks)
                number += 1
        except Exception:  # noqa: BLE001 - every failure is reported by the main thread
            self.failures.append("%s:\n%s" % (self.name, traceback.format_exc()))
        finally:
            self.session.close()


def test_kill_9_at_random_moments_loses_no_acknowledged_chunk(server_factory):
    seed = int(os.environ.get("M1_TEST_SEED") or random.SystemRandom().randrange(2 ** 32))
    rng = random.Random(seed)
    srv = server_factory()
    port = srv.port
    kills_done = threading.Event()
    recorders = [Recorder(n, srv, seed, kills_done) for n in range(CLIENTS)]
    for recorder in recorders:
        recorder.start()

    kills = []
    loop_end = time.monotonic() + LOOP_BUDGET_S
    try:
        for _ in range(KILL_ROUNDS):
            if time.monotonic() > loop_end or not any(r.is_alive() for r in recorders):
                break
            delay = rng.uniform(*KILL_DELAY_S)
            time.sleep(delay)        # schedules the kill; nothing waits on it
            srv.kill()
            kills.append(round(delay, 3))
            wait_until(lambda: restarted(srv, port), timeout=20, interval=0.05,
                       message="the server to restart on port %d" % port)
    finally:
        kills_done.set()
        deadline = time.monotonic() + CLIENT_DEADLINE_S
        for recorder in recorders:
            recorder.deadline = deadline
        for recorder in recorders:
            recorder.join(max(0.0, deadline - time.monotonic()) + SERVER_BACK_S)

    context = "seed %d (rerun with M1_TEST_SEED=%d), kills after %s s" % (seed, seed, kills)
    hung = [r.name for r in recorders if r.is_alive()]
    assert not hung, "%s: clients still running: %s\n%s" % (context, hung, srv.log()[-4000:])
    failures = [f for r in recorders for f in r.failures]
    assert not failures, "%s\n%s\nserver log tail:\n%s" % (
        context, "\n".join(failures), srv.log()[-4000:])
    assert srv.alive(), context
    for recorder in recorders:
        for file_id, chunks in recorder.uploads.items():
            assert_completed(srv, file_id, b"".join(chunks), context)
    print("kill loop: %s; %d uploads; %d interruptions seen by clients" % (
        context, sum(len(r.uploads) for r in recorders),
        sum(r.interruptions for r in recorders)))


def restarted(srv, port):
    """Start the server again on its port; False (retry) if the port is not free yet."""
    try:
        srv.start(port=port)
    except RuntimeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# 3. and 4. Damage made by hand while the server is stopped.

@pytest.mark.parametrize("junk", ["random_bytes", "torn_next_chunk", "whole_next_chunk"])
def test_torn_tail_is_truncated_to_the_ledger_on_startup(server_factory, sample_webm, junk):
    chunks = split_chunks(sample_webm, CHUNKS)
    file_id = "torn_tail_" + junk
    srv = server_factory()
    acked, failed = send_plan(srv, file_id, chunks, [0, 1, 2, 4])
    assert failed is None and acked == {0, 1, 2, 4}
    assert srv.stop() is not None
    tail = {"random_bytes": random.Random(7).randbytes(5000),
            "torn_next_chunk": chunks[3][: len(chunks[3]) // 2],
            "whole_next_chunk": chunks[3]}[junk]
    with open(data_path(srv.upload_dir, file_id), "ab") as f:
        f.write(tail)

    srv.start(port=srv.port)
    prefix = b"".join(chunks[:3])
    on_disk = read_bytes(data_path(srv.upload_dir, file_id))
    assert on_disk == prefix, "not repaired on start-up: " + describe_difference(on_disk, prefix)
    k = assert_consistent(srv, file_id, chunks, acked, "torn tail " + junk)
    assert k == 3
    resume_and_finish(srv, file_id, chunks, acked, "torn tail " + junk)


def test_file_shorter_than_the_ledger_rolls_back_to_whole_chunks_never_zero_filled(
        server_factory, sample_webm):
    """Bytes the ledger counts are gone (a disk or file system that lost fsynced data, a
    restore from an older backup): the upload must go back to the whole chunks still on disk
    so the client resends the rest, never grow a hole of zeros where the lost bytes were."""
    chunks = split_chunks(sample_webm, CHUNKS)
    file_id = "lost_tail"
    srv = server_factory()
    acked, failed = send_plan(srv, file_id, chunks, [0, 1, 2, 4])
    assert failed is None
    srv.stop()
    with open(data_path(srv.upload_dir, file_id), "r+b") as f:
        f.truncate(len(chunks[0]) + len(chunks[1]) + len(chunks[2]) // 2)

    srv.start(port=srv.port)
    # Chunk 2 is lost beyond the server's control, so only 4 (stashed, intact) must survive.
    k = assert_consistent(srv, file_id, chunks, {4}, "file cut inside chunk 2")
    assert k <= 2
    resume_and_finish(srv, file_id, chunks, {4}, "file cut inside chunk 2")


def test_writes_lost_with_the_page_cache_come_back_from_the_journal(server_factory,
                                                                    sample_webm):
    """Small in-order chunks are acknowledged once the ledger holds their bytes (one fsync);
    their file is fsynced later. kill -9, then drop what the file had not synced (what a
    power cut does to unsynced writes): the restart writes them back from the journal."""
    chunks = split_chunks(sample_webm, CHUNKS)
    file_id = "lost_page_cache"
    srv = server_factory(args=APPEND_MODES["journal"])
    acked, failed = send_plan(srv, file_id, chunks, [0, 1, 2, 3])
    assert failed is None and acked == {0, 1, 2, 3}
    srv.kill()                                   # no clean stop: the journal stays
    with open(data_path(srv.upload_dir, file_id), "r+b") as f:
        f.truncate(len(chunks[0]) // 3)          # every chunk's write was unsynced
    srv.start(port=srv.port)
    k = assert_consistent(srv, file_id, chunks, acked, "unsynced writes lost")
    assert k == 4
    resume_and_finish(srv, file_id, chunks, acked, "unsynced writes lost")


@pytest.mark.parametrize("value, ok", [("256K", True), ("262145", False), ("0", True),
                                       ("-1", False), ("big", False)])
def test_journal_chunk_size_flag_at_and_past_its_limit(server_factory, value, ok):
    srv = server_factory(args=["--journal-chunk-size", value], start=False)
    if ok:
        srv.start()
        assert srv.alive()
    else:
        with pytest.raises(RuntimeError):
            srv.start()
        assert srv.proc.returncode == 2 and "journal-chunk-size" in srv.log(), srv.log()


def test_orphan_temp_chunk_without_ledger_row_is_removed_and_not_counted(
        server_factory, sample_webm):
    chunks = split_chunks(sample_webm, 10)
    file_id = "orphan_stash"
    srv = server_factory()
    acked, failed = send_plan(srv, file_id, chunks, [0, 1, 3])
    assert failed is None
    with requests.Session() as session:
        before = status_data(session, srv.url, file_id)
    srv.stop()
    orphan = os.path.join(stash_dir(srv.upload_dir, file_id), "7.chunk")
    with open(orphan, "wb") as f:        # not chunk 7's bytes: counting it would be a 409 later
        f.write(chunks[3])

    srv.start(port=srv.port)
    assert not os.path.exists(orphan), "orphan temp chunk survived start-up"
    with requests.Session() as session:
        after = status_data(session, srv.url, file_id)
    for field in ("nextChunkIndex", "chunksReceived", "fileSize", "missingChunks"):
        assert after.get(field) == before.get(field), (field, before, after)
    assert_consistent(srv, file_id, chunks, acked, "orphan 7.chunk")
    with requests.Session() as session:
        response = send_chunk(session, srv.url, file_id, 7, chunks[7])
        assert response.status_code == 200, response.text
        assert not response.json()["data"].get("duplicate"), response.json()
    resume_and_finish(srv, file_id, chunks, acked | {7}, "orphan 7.chunk")


def test_stale_part_files_and_temp_dirs_of_unknown_uploads_are_removed_on_startup(
        server_factory, sample_webm):
    chunks = split_chunks(sample_webm, CHUNKS)
    srv = server_factory()
    acked, _ = send_plan(srv, "known_upload", chunks, [0, 2])
    srv.stop()
    os.makedirs(incoming_dir(srv.upload_dir), exist_ok=True)
    stale_part = os.path.join(incoming_dir(srv.upload_dir), "stale-part-file")
    with open(stale_part, "wb") as f:
        f.write(chunks[1][:1000])
    unknown = stash_dir(srv.upload_dir, "never_recorded")
    os.makedirs(unknown)
    with open(os.path.join(unknown, "0.chunk"), "wb") as f:
        f.write(chunks[0])

    srv.start(port=srv.port)
    assert listdir(incoming_dir(srv.upload_dir)) == []
    assert not os.path.exists(os.path.join(unknown, "0.chunk"))
    with requests.Session() as session:
        data = status_data(session, srv.url, "never_recorded")
    assert data["exists"] is False, data
    assert_consistent(srv, "known_upload", chunks, acked, "stale files")
    resume_and_finish(srv, "known_upload", chunks, acked, "stale files")


# ---------------------------------------------------------------------------------------------
# The edges of the upload folder (issue 14): stray entries, links, a full disk

def make_victim(root):
    """A folder outside the upload folder, with a file in it, for links to point at."""
    victim = os.path.join(root, "victim")
    os.makedirs(victim)
    with open(os.path.join(victim, "precious"), "wb") as f:
        f.write(b"keep me")
    return victim


def assert_victim_untouched(victim):
    assert listdir(victim) == ["precious"], listdir(victim)
    assert read_bytes(os.path.join(victim, "precious")) == b"keep me"


def test_startup_sets_aside_every_stray_entry_and_link_and_always_starts(
        server_factory, sample_webm, tmp_path):
    chunks = split_chunks(sample_webm, CHUNKS)
    srv = server_factory()
    acked, _ = send_plan(srv, "known_upload", chunks, [0, 1, 3])
    acked_other, _ = send_plan(srv, "linked_video", chunks, [0])
    srv.stop()
    victim = make_victim(str(tmp_path))
    up, temp = srv.upload_dir, os.path.join(srv.upload_dir, "temp")
    os.makedirs(os.path.join(temp, ".incoming", "a_folder", "inside"))    # not a part file
    os.symlink(os.path.join(victim, "precious"), os.path.join(temp, ".incoming", "x.part"))
    os.makedirs(os.path.join(temp, ".deleting", "no-such-name"))          # not delete's name
    with open(os.path.join(temp, ".deleting", "stray-file"), "wb") as f:
        f.write(b"?")
    os.symlink(victim, os.path.join(temp, ".deleting", "known_upload-1.5-00ff00ff00ff00ff"))
    os.symlink(victim, os.path.join(temp, "unknown_upload"))               # temp/<id> links
    with open(os.path.join(temp, "a_stray_file"), "wb") as f:
        f.write(b"?")
    os.makedirs(os.path.join(temp, "known_upload", "a_folder"))           # not a chunk file
    os.symlink(os.path.join(victim, "precious"), os.path.join(temp, "known_upload", "5.chunk"))
    os.remove(data_path(up, "linked_video"))                               # <fileId>.<ext>
    os.symlink(os.path.join(victim, "precious"), data_path(up, "linked_video"))
    os.makedirs(os.path.join(up, "derived"))
    os.symlink(victim, os.path.join(up, "derived", "known_upload"))        # derived/<fileId>
    with open(os.path.join(up, "derived", "a_stray_file"), "wb") as f:
        f.write(b"?")

    srv.start(port=srv.port)
    assert_victim_untouched(victim)
    assert listdir(os.path.join(temp, ".incoming")) == []
    assert listdir(os.path.join(temp, ".deleting")) == []
    assert not os.path.islink(data_path(up, "linked_video"))
    set_aside = [name.split("-", 1)[1].rsplit("-", 1)[0]       # <time>-<path>-<random>
                 for name in listdir(os.path.join(up, "quarantine"))]
    assert sorted(set_aside) == sorted([
        "temp~.incoming~a_folder", "temp~.incoming~x.part", "temp~.deleting~no-such-name",
        "temp~.deleting~stray-file", "temp~.deleting~known_upload-1.5-00ff00ff00ff00ff",
        "temp~unknown_upload", "temp~a_stray_file", "temp~known_upload~a_folder",
        "temp~known_upload~5.chunk", "linked_video.webm", "derived~known_upload",
        "derived~a_stray_file"])
    assert "set aside" in srv.log() and "Traceback" not in srv.log()
    assert_consistent(srv, "known_upload", chunks, acked, "stray entries")
    resume_and_finish(srv, "known_upload", chunks, acked, "stray entries")
    # the video replaced by a link lost its bytes: the client is asked for them again
    with requests.Session() as session:
        assert status_data(session, srv.url, "linked_video")["nextChunkIndex"] == 0
    resume_and_finish(srv, "linked_video", chunks, set(), "a link for a video")
    assert_victim_untouched(victim)


@pytest.mark.parametrize("where", ["incoming", "deleting", "temp", "derived"])
def test_the_stores_own_folders_replaced_by_links_are_set_aside_at_start(
        server_factory, sample_webm, tmp_path, where):
    chunks = split_chunks(sample_webm, CHUNKS)
    srv = server_factory()
    acked, _ = send_plan(srv, "kept", chunks, [0, 2])
    srv.stop()
    victim = make_victim(str(tmp_path))
    path = {"incoming": incoming_dir(srv.upload_dir),
            "deleting": os.path.join(srv.upload_dir, "temp", ".deleting"),
            "temp": os.path.join(srv.upload_dir, "temp"),
            "derived": os.path.join(srv.upload_dir, "derived")}[where]
    if where == "temp":
        os.rename(path, os.path.join(str(tmp_path), "old_temp"))   # the stash goes with it
        acked = {0}
    else:
        import shutil
        shutil.rmtree(path, ignore_errors=True)
    os.symlink(victim, path)
    srv.start(port=srv.port)
    assert_victim_untouched(victim)
    assert os.path.isdir(path) and not os.path.islink(path)
    assert_consistent(srv, "kept", chunks, acked, "a link at " + where)
    resume_and_finish(srv, "kept", chunks, acked, "a link at " + where)
    assert_victim_untouched(victim)


def test_a_link_at_the_video_path_is_refused_with_a_json_error(server_factory, tmp_path):
    srv = server_factory()
    victim = make_victim(str(tmp_path))
    os.symlink(os.path.join(victim, "precious"), data_path(srv.upload_dir, "link_target"))
    with requests.Session() as session:
        response = send_chunk(session, srv.url, "link_target", 0, EBML_MAGIC + b"x" * 100)
    assert response.status_code == 500, response.text
    assert response.json()["error"]["code"] == "unsafe_path"
    assert_victim_untouched(victim)
    assert listdir(incoming_dir(srv.upload_dir)) == []


def test_a_full_disk_answers_507_never_500_and_keeps_no_torn_tail(server_factory, small_disk):
    """The issue's reproduction: 2 MiB chunks into a 20 MiB filesystem. Each chunk is on disk
    twice while it is appended, so the check counts it twice; the refusals are 507 and the
    video holds exactly the acknowledged chunks. Given room, the upload finishes."""
    import subprocess
    chunks = [EBML_MAGIC + os.urandom((2 << 20) - 4)] + [os.urandom(2 << 20) for _ in range(11)]
    srv = server_factory(args=["--min-free-disk", "0"], upload_dir=os.path.join(small_disk, "up"))
    refused = None
    with requests.Session() as session:
        for index, chunk in enumerate(chunks):
            response = send_chunk(session, srv.url, "filling", index, chunk)
            if response.status_code != 200:
                refused = index
                break
    assert refused is not None and refused >= 5, refused
    assert response.status_code == 507, response.text
    assert response.json()["error"]["code"] == "insufficient_storage"
    assert read_bytes(data_path(srv.upload_dir, "filling")) == b"".join(chunks[:refused])
    assert listdir(incoming_dir(srv.upload_dir)) == []
    subprocess.run(["mount", "-o", "remount,size=40m", "tmpfs", small_disk], check=True)
    resume_and_finish(srv, "filling", chunks, set(range(refused)), "room again")


def fill_the_disk_mid_body(srv, small_disk, request, receiving, what):
    """Send the head and 1 MiB of `request`, wait until `receiving()`, leave the disk 64 KiB,
    send the rest; the response."""
    import _http
    from conftest import leave_free
    head_end = request.index(b"\r\n\r\n") + 4 + (1 << 20)
    sock = _http.connect(srv.url)
    try:
        sock.sendall(request[:head_end])
        wait_until(receiving, message=what)
        leave_free(small_disk, 64 << 10)
        _http.send_quietly(sock, request[head_end:])
        return _http.read_response(sock)
    finally:
        sock.close()


def test_a_part_file_that_runs_out_of_room_while_received_answers_507(server_factory,
                                                                      small_disk):
    """The disk fills up (another program) while a chunk's body is being received: the part
    file's write fails, the answer is 507 and the part file is gone."""
    import _http
    from conftest import leave_free
    chunk = EBML_MAGIC + os.urandom((4 << 20) - 4)
    srv = server_factory(args=["--min-free-disk", "0"], upload_dir=os.path.join(small_disk, "up"))
    request = _http.upload_request(_http.chunk_parts("receiving", 0, chunk))
    response = fill_the_disk_mid_body(srv, small_disk, request, lambda: any(
        os.path.getsize(os.path.join(incoming_dir(srv.upload_dir), n))
        for n in listdir(incoming_dir(srv.upload_dir))), "the part file to fill")
    assert response.status == 507, response
    assert response.json()["error"]["code"] == "insufficient_storage"
    wait_until(lambda: listdir(incoming_dir(srv.upload_dir)) == [], message="no part file")
    leave_free(small_disk, 1 << 30)
    with requests.Session() as session:
        assert status_data(session, srv.url, "receiving")["exists"] is False
        assert send_chunk(session, srv.url, "receiving", 0, chunk).status_code == 200
    assert srv.alive() and "Traceback" not in srv.log()


def test_a_chunk_written_in_place_that_runs_out_of_room_answers_507_and_is_cut_off(
        server_factory, small_disk):
    """The disk fills up while a chunk's body is being written straight into the video (its
    text fields came first): the write fails, the answer is 507, the video is back to the
    acknowledged chunks and the tail is free for the chunk sent again."""
    import _http
    from conftest import leave_free
    first = EBML_MAGIC + os.urandom(1000)
    chunk = os.urandom(4 << 20)
    srv = server_factory(args=["--min-free-disk", "0"], upload_dir=os.path.join(small_disk, "up"))
    with requests.Session() as session:
        assert send_chunk(session, srv.url, "in_place", 0, first).status_code == 200
    parts = [("fileId", "in_place"), ("chunkIndex", "1"), ("status", "completed"),
             ("file", chunk, "blob", "application/octet-stream")]
    request = _http.upload_request(parts)
    video = data_path(srv.upload_dir, "in_place")

    def in_place():             # the bytes reach the video, and no part file exists
        return os.path.getsize(video) > len(first) and not listdir(incoming_dir(srv.upload_dir))

    response = fill_the_disk_mid_body(srv, small_disk, request, in_place,
                                      "the chunk's bytes to reach the video file")
    assert response.status == 507, response
    assert response.json()["error"]["code"] == "insufficient_storage"
    assert read_bytes(video) == first
    leave_free(small_disk, 1 << 30)
    with requests.Session() as session:
        assert status_data(session, srv.url, "in_place")["nextChunkIndex"] == 1
        reply = send_chunk(session, srv.url, "in_place", 1, chunk, status="completed")
        assert reply.status_code == 200 and reply.json()["data"]["status"] == "completed"
    assert read_bytes(video) == first + chunk
    assert srv.alive() and "Traceback" not in srv.log()


def test_readiness_never_writes_its_probe_through_a_link(server_factory, tmp_path):
    srv = server_factory()
    victim = make_victim(str(tmp_path))
    os.rmdir(incoming_dir(srv.upload_dir))
    os.symlink(victim, incoming_dir(srv.upload_dir))           # replaced while it runs
    response = requests.get(srv.url + "/readyz", timeout=30)
    assert response.status_code == 503, response.text
    assert response.json()["data"]["checks"]["uploadDirWritable"]["ok"] is False
    assert_victim_untouched(victim)
