"""chunkstore.py - the storage contract on a local folder: numbered chunks in, one byte-exact
file per upload out.

ChunkStore implements storage.Store, whose docstring lists what every store guarantees and
the rules (storage.classify_chunk and its neighbours) it decides by. Here, on local disk:
  * The assembled file `<root>/<fileId>.<ext>` grows as contiguous chunks arrive, so it is
    there while the user records; a chunk that arrives early waits in
    `<root>/temp/<fileId>/<index>.chunk`.
  * A chunk is durable (fsync, the ledger's commit, or its file's records: "Chunk records"
    below) before `put_chunk` returns.
  * A crash between any two steps below loses no acknowledged chunk and leaves no torn or
    duplicated bytes: `repair()` (run at start-up) brings every upload back to its last
    consistent state.
  * The folder is handled as localdisk.py says: a full disk answers 507 and leaves nothing
    half-written (each step's undo is named below), links are never followed, and repair sets
    aside what it does not recognise instead of stopping.

What it does not do: HTTP, multipart parsing, or limits other than the upload's size. The
caller hands it a finished part file (written into `incoming_dir`) and a validated request,
or, for the next chunk of an upload, writes the bytes straight into the upload's tail as they
arrive (`reserve_append`, below).

The ledger is SQLite (`<root>/m1.sqlite3`, WAL, synchronous=FULL but for the commits of
chunks their file records: "Chunk records" below). Its writes go through
one connection, and writers that arrive together share one commit (_GroupCommit); a writer
returns only once its statements are committed, so every step below reads as if it had its
own transaction. It is both the metadata store and the crash journal; its invariant is:

    the first `bytes_appended` bytes of the assembled file, with the bytes of the journal's
    rows written over it at their offsets, are chunks 0 .. next_index-1; and every chunk
    row with idx >= next_index has its bytes in temp/<fileId>/<idx>.chunk.

Every step below keeps that invariant true on disk at every instant, which is the whole
crash-safety argument:

  In-order chunk (index == next_index)            Early chunk (index > next_index)
  1. received: part file written (not ledger)     1. received
  2. appended: bytes written after                2. stashed: part file fsynced, renamed to
     bytes_appended, file fsynced (a crash here      temp/<id>/<idx>.chunk, dirs fsynced
     leaves a tail that repair truncates)         3. stash_recorded: chunk row committed
  3. append_recorded: ledger moves next_index        (a crash before it leaves a file with no
     and bytes_appended in one transaction           row: repair deletes it, the client was
  4. cleaned: the source file is removed             never told 200)
     (a leftover source is deleted by repair)

  In-order chunk written in place (reserve_append: one write of its bytes, no part file)
  1. reserved: under the lock, the rules accept the chunk whatever its bytes; the upload's
     tail (a writer slot: one per upload) is taken and the lock released; the file is opened
     at bytes_appended, a torn tail cut off
  2. streaming: each block of the file part is written after bytes_appended as it arrives
     (a crash here leaves a tail that repair truncates, as after step 2 above)
  3. streamed: chunk 0's signature was checked on its first bytes; the file is fsynced
     (or, a small chunk, its bytes kept for the journal), and the checksum checked on the
     digest taken while writing (past INLINE_DIGEST_BYTES, while the fsync runs); still only
     a tail
  4. stream_recorded: under the lock again, the rules asked once more with what the upload
     holds now (a last index, a budget), then the same transaction as append_recorded; the
     tail is freed
That is the in-order chunk's argument with step 1 left out: the bytes go where step 2 put
them, and the ledger's commit is still what makes them count. The lock is never held while
the bytes arrive (a slow sender is cut off by the edge's deadlines, then aborts). Meanwhile
early chunks of the upload are stashed as usual (and appended after the commit), and a chunk
of the same index (a retry on another connection) waits for the tail, at most writer_wait_s
(503 chunk_in_progress after that), then is decided against what the writer left: a
duplicate once it committed. Any failure before stream_recorded (a parse error, a client
gone, a budget, a checksum, a full disk, the upload deleted meanwhile: 409 upload_deleted)
cuts the tail back to bytes_appended and frees the slot. A new upload's chunk 0 goes in
place too: its file is created at reserved, and its row (id, type, creation time) is
written by stream_recorded's transaction with the chunk; an abort removes the file (unless
an early chunk gave the upload a row meanwhile), and a crash before stream_recorded leaves a
video file the ledger does not know, never acknowledged, which repair sets aside (the
quarantine: a ledger lost by hand would look the same). reserve_append says None, and the
chunk takes the part file, for everything else: an early chunk, a duplicate, a first
mimeType to record for an upload the ledger has, or anything the rules refuse (put_chunk
then refuses it, in the rules' order).

Chunk records (on by default where the folder's files keep extended attributes; off with
--no-xattr). An in-order chunk in place waits for two syncs above: its file's at streamed,
then the WAL's at stream_recorded, and each is a flush of the disk's cache (150-250 us here).
So a small one (at most RECORD_CHUNK_BYTES, not an upload's first nor its last) is instead
recorded twice: in the file's own extended attribute RECORDS_XATTR, which lists (index,
offset, size, crc32) of each such chunk of the upload since its last synced commit, and in
the usual transaction, committed without a sync (synchronous=NORMAL). Its steps:
  3. streamed: as above, but the file not fsynced yet
  4. records_synced: under the lock, after the rules were asked again, the records with
     this chunk's are set on the file, and one fsync makes its bytes and the attribute
     durable together (POSIX: fsync covers a file's data and metadata)
  5. stream_recorded: the transaction, committed unsynced; then the client is told 200
A power cut may take unsynced commits (SQLite keeps a prefix of them, never a torn one),
so the ledger may then end before chunks the file's records name: repair records those
again, in order, each only where it continues the ledger's consistent length and its bytes
match its crc32 (a crash before records_synced's fsync returned may leave a record whose
bytes never reached the disk: it fails that check, and the tail is cut as before). A chunk
replayed from step 4 was never acknowledged; it counts now, as its bytes were durable and
the rules had accepted it. The invariant then reads: the ledger's chunks, followed by the
chunks the records name that continue them. A file keeps at most RECORDS_MAX records: the
chunk after them (or any chunk whose records are not in memory, after a restart or
--upload-state-cache let them go) commits synced, which makes every earlier commit durable
too, and the next record list starts empty. A failure after the attribute was set (a full
disk at the commit) cuts the bytes off, writes the records back without the chunk, and
fsyncs again. Everything else (a new upload's row, a type, a stash, the last chunk, a
deletion, the journal) commits synced as before.

A write that fails before its step's commit (a full disk: ENOSPC, or SQLite's "database or
disk is full") is undone at once as repair would undo it after a crash: the tail after
bytes_appended is cut (steps 2-3, and 1-3 in place), the renamed chunk file removed (stashed -
stash_recorded). The part file is removed in every case, so nothing of a refused chunk stays.

The ledger is read once per upload, not per chunk: an upload's UploadState (and how many of its
bytes the journal holds) is kept in memory, for at most --upload-state-cache uploads (the
least recently used are read again when needed). One process owns the folder (m1.lock), so
the store's own commits are the only changes; memory is updated under the upload's lock right
after each commit it mirrors, and repair starts from the ledger alone. An in-order chunk costs
one write transaction and no read.

With --journal-chunk-size set (off by default), a small in-order chunk (at most that many
bytes) costs one fsync instead of two: in step 2 its bytes are written but the file is not
fsynced, and step 3's transaction also keeps a copy of them in the `journal` table, so the
ledger's commit is what makes the chunk durable. Readers see the file as written (the page
cache) at once. The journal is emptied, once the file is fsynced: by the transaction of a
chunk whose append fsyncs the file anyway (a large chunk, or the one that completes the
upload, which is never journaled), or in two steps when an upload's journal passes
JOURNAL_FLUSH_BYTES and when the store closes:
journal_synced (file fsynced; a crash here leaves rows that repair writes again, the same
bytes at the same offsets), then journal_cleared.
repair() writes every journal row back at its offset before anything else, so a power cut
that lost the file's unsynced writes loses no acknowledged chunk. Each row is one chunk, so
the journal of an upload holds at most JOURNAL_FLUSH_BYTES + one chunk.

A chunk sent with status=completed records the last index in the same transaction as the
chunk (step 3 / stash_recorded); the append that completes the upload records completed_at
(and the sha256, when the running digest is known) in its own transaction too: one commit
for the last chunk. A new file or temp folder has its parent directory fsynced, so its name
survives a power cut as well as its bytes. If the disk still loses fsynced bytes
(or an old backup is restored), repair rolls the ledger back to the whole chunks the file
holds, and the client is asked for the rest; it never pads a hole with zeros.

Feature modules may keep their own tables in the ledger file (ledger_read/ledger_write: the
`ledger_tables` capability); they never touch the uploads and chunks tables, so the invariant
above stays the store's alone. A feature that needs a second store (tus's partial uploads)
asks for a `sibling`. Processing reads the assembled file (`media_file`) and writes only under
derived/<fileId>/ (`put_derivative`), which `delete` and `repair` already handle, so the
argument above is unchanged.
"""
from __future__ import annotations

import binascii
import collections
import contextlib
import copy
import errno
import os
import queue
import re
import sqlite3
import stat
import struct
import threading
import time

import localdisk
import serverlog
from localdisk import FileMedia, UnsafePath, UploadFolder, fsync_dir, open_file, writing
from storage import (DUPLICATE, IN_ORDER, MEDIA_TYPES, SIGNATURE_BYTES, Capabilities,
                     ChunkResult, Store, StoreError, TailWriter, UploadState, Workers,
                     check_budgets, check_chunk_bytes, check_chunk_fields, check_chunk_request,
                     check_derivative_name, new_sha256, read_blocks, sha256_file, valid_file_id)

log = serverlog.Logger("m1server.store")

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

SCHEMA_VERSION = 2                       # 2: the journal table (small chunks' bytes)
LEDGER_NAME = "m1.sqlite3"
DELETING_DIR_NAME = ".deleting"          # inside temp/: uploads being deleted (the intent)
DERIVED_DIR_NAME = "derived"             # derivatives of processing, one folder per upload
LEDGER_BUSY_TIMEOUT_S = 30.0
LEDGER_GROUP_MAX = 64                    # writers whose statements share one commit, at most
COPIES_WHILE_STORING = 2                 # a chunk's part file and its copy in the video
# Small in-order chunks may be journaled (see the docstring). The journal writes a chunk's
# bytes twice more (the WAL, then the ledger file at a checkpoint), which pays only while the
# fsync saved costs more than those copies. Off by default: since chunks are written in place
# (issue 17), journaling a 16 KiB chunk cost ~90-150 us more CPU than its fsync saved and no
# wall time on a disk with a write cache (docs/performance.md); it pays where fsync is slow
# (SD cards, spinning disks). 250 KiB chunks from 200 recorders once went from a p99 of 8 ms
# to 1.5 s journaled (checkpoints stall every writer), hence the limit.
DEFAULT_JOURNAL_CHUNK_BYTES = 0          # in-order chunks up to this size: one fsync (journal)
SLOW_DISK_JOURNAL_CHUNK_BYTES = 64 << 10  # what --help suggests where fsync is slow
MAX_JOURNAL_CHUNK_BYTES = 256 << 10      # the most --journal-chunk-size may say
JOURNAL_FLUSH_BYTES = 1 << 20            # an upload's journaled bytes past this: sync the file
DEFAULT_STATE_CACHE = 1024               # uploads whose state is kept in memory between chunks
DEFAULT_WRITER_WAIT_S = 30.0             # a chunk sent again waits this long for its twin
# A chunk written in place is hashed as it arrives up to this many bytes; the rest of a larger
# one is read back and hashed while its fsync waits for the disk (sha256 is as slow as the
# disk here: hashed in line, it held 8 MiB chunks to 0.73x a server that hashes nothing).
INLINE_DIGEST_BYTES = 1 << 20            # (>= MAX_JOURNAL_CHUNK_BYTES: a journaled one in line)
WRITER_RETRY_AFTER_S = 1                 # Retry-After of chunk_in_progress (503)
# A small in-order chunk written in place may be recorded twice (see the docstring, "Chunk
# records"): in a ledger transaction that is not synced, and in its video file's extended
# attribute, which the file's own fsync makes durable with the bytes. One sync per chunk.
RECORDS_XATTR = "user.m1server.chunks"
RECORDS_MAGIC = b"m1r1"
RECORD = struct.Struct("<QQQI")          # chunk index, offset, size, crc32 of its bytes
RECORDS_MAX = 32                         # records a file keeps; the next chunk's commit syncs
RECORDS_BYTES_MAX = len(RECORDS_MAGIC) + RECORDS_MAX * RECORD.size     # the attribute's size
RECORD_CHUNK_BYTES = 64 << 10            # chunks up to this size may be recorded (crc32 inline)
NO_XATTR_ERRNOS = {getattr(errno, name) for name in ("ENOTSUP", "EOPNOTSUPP", "ENOSYS")
                   if hasattr(errno, name)}  # a filesystem that keeps none: records off
# temp/.deleting/<fileId>-<repr(created_at)>-<random hex>: what `delete` names its intent
DELETION_NAME = re.compile(r"(?P<id>[A-Za-z0-9_-]{1,128})-(?P<created>[0-9][0-9.e+]*)-"
                           r"[0-9a-f]{8,64}\Z")


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------

class ChunkStore(Store):
    """Chunks of many uploads into one file each, crash-safe. Thread-safe."""

    # One server owns the folder (m1.lock): every change is its own. Feature tables go in
    # its ledger file.
    capabilities = Capabilities(ledger_tables=True)

    def __init__(self, root, allow_any_content=False, max_upload_bytes=None, crash_at=None,
                 journal_chunk_bytes=DEFAULT_JOURNAL_CHUNK_BYTES, min_free_bytes=None,
                 state_cache=DEFAULT_STATE_CACHE, writer_wait_s=DEFAULT_WRITER_WAIT_S,
                 chunk_records=True):
        Store.__init__(self, UploadFolder(root, min_free_bytes, COPIES_WHILE_STORING),
                       allow_any_content, max_upload_bytes, crash_at)
        self.journal_chunk_bytes = journal_chunk_bytes
        self.writer_wait_s = writer_wait_s
        self.deleting_dir = os.path.join(self.temp_dir, DELETING_DIR_NAME)
        self.derived_dir = os.path.join(self.root, DERIVED_DIR_NAME)
        self.folder.prepare((self.temp_dir, self.deleting_dir))
        # Chunk records (the docstring): where the folder's files keep an extended attribute
        # (Linux and most of its filesystems; not FAT, nor tmpfs before Linux 6.6). The first
        # file that refuses one turns them off (_TailWriter.sync_with_records).
        self.chunk_records = chunk_records and hasattr(os, "setxattr")
        self._ledger = _Ledger(os.path.join(self.root, LEDGER_NAME))
        # The ledger is the truth; this mirrors it for the uploads in use, so that a chunk
        # costs no ledger read. Written only under the upload's lock, after the commit it
        # mirrors (one process owns the folder: m1.lock), and emptied by repair.
        self._cache = _StateCache(state_cache)
        self._writers = {}        # fileId -> its _TailWriter; read and changed under its lock
        # Completing must take constant time whatever the length (SPEC section 1): the file's
        # sha256 is taken as its bytes are written (the running digest, in _cache) or, when
        # that is not known, computed off the request path; status shows it once known.
        self._hasher = Workers("m1-hasher", 1, self._hash_in_background)

    # -- receiving ------------------------------------------------------------------------

    def put_chunk(self, file_id, index, part_path, size, is_last, mime_type=None,
                  checksum=None, budget=None):
        """Store chunk `index` of `file_id` from `part_path` (consumed: moved or removed).

        Returns a ChunkResult once the chunk is durable; raises StoreError when refused. A
        chunk whose twin is being written in place waits for it (at most writer_wait_s),
        then is decided against what that one left: a duplicate, a conflict, or (when it
        was aborted) the chunk to store.
        """
        try:
            check_chunk_request(file_id, index, part_path, mime_type, checksum,
                                self.allow_any_content)
            self._crash.passed("received")
            deadline = time.monotonic() + self.writer_wait_s
            while True:
                with self._locks.held(file_id):
                    writer = self._writers.get(file_id)
                    if writer is None or writer.index != index:
                        return self._put_locked(file_id, index, part_path, size, is_last,
                                                mime_type, budget)
                self._wait_for(writer, deadline)
        finally:
            self.discard(part_path)   # no-op when the chunk was moved or already removed

    def reserve_append(self, file_id, index, is_last, mime_type=None, checksum=None,
                       budget=None):
        """The upload's tail for chunk `index`, to write its bytes in place (a _TailWriter),
        when it is the next chunk of its upload (chunk 0 of a new one: its row is written
        with the chunk's), nothing is being written in place for it already, and the rules
        accept it whatever its bytes; else None (the part file and put_chunk: an early
        chunk; a duplicate; a first mimeType to record for an upload the ledger has; anything
        the rules refuse)."""
        try:
            check_chunk_fields(file_id, index, mime_type, checksum)
        except StoreError:
            return None                      # put_chunk refuses it, in the rules' order
        with self._locks.held(file_id):
            upload = self._state(file_id)
            new = upload is None
            if new:
                upload = UploadState.unknown(file_id)
            if file_id in self._writers or index != upload.next_index:
                return None
            try:
                _, ext = self.decide(upload, index, None, 0, is_last, mime_type, budget)
            except StoreError:
                return None
            if new:                          # where its file will be: its type is known now
                upload = _typed(upload, mime_type, ext)
            elif ext != upload.ext or (mime_type is not None and upload.mime_type is None):
                return None
            fd, created = self._open_tail(upload)
            writer = _TailWriter(self, upload, index, is_last, mime_type, checksum,
                                 (budget, self._upload_budget), fd, created)
            self._writers[file_id] = writer
        self._crash.passed("reserved")
        return writer

    def _wait_for(self, writer, deadline):
        """Wait until `writer` frees its upload's tail; 503 chunk_in_progress at `deadline`."""
        if not writer.done.wait(max(0.0, deadline - time.monotonic())):
            raise StoreError(503, "chunk_in_progress",
                             "chunk %d of %s is still being received on another connection; "
                             "send it again shortly" % (writer.index, writer.file_id),
                             {"Retry-After": str(WRITER_RETRY_AFTER_S)})

    def _put_locked(self, file_id, index, part_path, size, is_last, mime_type, budget):
        """Read the upload once, decide by the contract's rules, then take the steps."""
        upload = self._state(file_id) or UploadState.unknown(file_id)
        kind, ext = self.decide(upload, index, self._stored_as(upload, index, part_path, size),
                                size, is_last, mime_type, budget)
        if kind == DUPLICATE:
            if is_last and upload.last_index is None:
                self._ledger.set_last_index(file_id, index)
                upload = self._reload(file_id)
        else:
            upload = self._record_type(upload, mime_type, ext)
            # The last index is recorded in the same transaction as the chunk itself, so no
            # crash can leave a stored last chunk that the ledger does not know is the last.
            last = index if is_last else None
            if kind == IN_ORDER:
                small = self._may_journal(is_last) and size <= self.journal_chunk_bytes
                upload = self._append(upload, index, part_path, size, last, journal=small)
            else:
                upload = self._stash(upload, index, part_path, size, last)
        return self._after_chunk(upload, index, kind, size)

    def _may_journal(self, is_last):
        """Whether an in-order chunk up to --journal-chunk-size may be journaled: not when
        the journal is off, nor for a last chunk, which completes the upload (that needs the
        file fsynced anyway, and its commit then empties the journal)."""
        return self.journal_chunk_bytes > 0 and not is_last

    def _after_chunk(self, upload, index, kind, size):
        """Under the lock, once a chunk is stored (or acknowledged): the stashed chunks it made
        contiguous are appended, a complete upload completes, and listeners hear of it."""
        upload = self._append_stashed_run(upload)
        # A chunk that is not a duplicate and leaves the upload complete completed it (the
        # append that did so may have recorded the completion, and the sha256, in its own
        # transaction).
        hashed = False
        if upload.completed and (upload.completed_at is None or kind != DUPLICATE):
            upload = self._complete(upload)
            hashed = upload.sha256 is not None
        if kind != DUPLICATE:
            self._emit("chunk", upload.file_id, index=index, size=size,
                       bytesReceived=upload.bytes_appended, nextChunkIndex=upload.next_index)
        if hashed:
            self._emit_completed(upload)
        return ChunkResult(upload.file_id, index, kind == DUPLICATE, upload)

    def _stored_as(self, upload, index, part_path, size):
        """What the store holds at `index`: None (nothing), True (these bytes), False (other
        bytes). Only a chunk the ledger knows costs a read of it."""
        if index >= upload.next_index and index not in upload.stashed:
            return None
        known_size, offset = self._ledger.chunk_at(upload.file_id, index)
        if known_size != size:
            return False
        if offset is not None:
            return localdisk.same_region(self.media_path(upload), offset, part_path, size)
        return localdisk.same_region(self._stash_path(upload.file_id, index), 0, part_path,
                                     size)

    def _record_type(self, upload, mime_type, ext):
        """A new upload gets its row; the first chunk that names a mimeType records it."""
        if upload.created_at is None:
            with writing("recording the upload"):
                self._ledger.create(upload.file_id, mime_type, ext)
        elif upload.mime_type is None and mime_type is not None:
            with writing("recording the upload's type"):
                self._ledger.set_mime_type(upload.file_id, mime_type, ext)
        else:
            return upload
        return self._reload(upload.file_id)

    # -- what the store knows of an upload: the ledger, mirrored in memory -----------------

    def _state(self, file_id):
        """The upload's UploadState (None: unknown), under its lock: from memory, or read
        from the ledger once."""
        upload = self._cache.upload(file_id)
        if upload is None:
            upload = self._ledger.load(file_id)
            if upload is not None:
                self._cache.put(file_id, upload)
        return upload

    def _reload(self, file_id):
        """Under the upload's lock, after a ledger write that memory does not follow."""
        upload = self._ledger.load(file_id)
        if upload is None:
            self._cache.drop(file_id)
        else:
            self._cache.put(file_id, upload)
        return upload

    def _journaled(self, file_id):
        """Bytes of the upload's chunks in the journal (under its lock): known, or read once."""
        journaled = self._cache.journaled(file_id)
        if journaled is None:
            journaled = self._ledger.journal_bytes(file_id)
            self._cache.set_journaled(file_id, journaled)
        return journaled

    # -- the steps (see the module docstring for why this order is crash-safe) --------------

    def _open_tail(self, upload):
        """The upload's video file opened for writing at its consistent length, a torn tail
        (an earlier failed write's) cut off: (fd, whether it was created now)."""
        fd = open_file(self.media_path(upload), os.O_RDWR | os.O_CREAT,    # (read: _TailWriter)
                       "the upload's video file")
        try:
            length = os.fstat(fd).st_size
            if length != upload.bytes_appended:     # (fstat costs less than ftruncate)
                os.ftruncate(fd, upload.bytes_appended)
            os.lseek(fd, upload.bytes_appended, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        # An empty file may have been created now: its name is synced (at most once more).
        return fd, length == 0

    def _append(self, upload, index, source_path, size, last_index=None, journal=False):
        """Append `source_path` after the upload's consistent prefix, durable, then record it;
        returns the upload after it. journal: a small chunk, written without an fsync of the
        file; its bytes go into the ledger's transaction instead (one fsync in all, see the
        module docstring). A failure before the record cuts the tail back to the consistent
        prefix."""
        offset = upload.bytes_appended
        data = digest = None
        if journal:
            with open(source_path, "rb") as f:
                data = f.read(size)
            digest = self._running_digest(upload)     # the bytes are in memory: hash them
            if digest is not None:
                digest.update(data)
        fd, created = self._open_tail(upload)
        try:
            with writing("appending chunk %d" % index, undo=lambda: os.ftruncate(fd, offset)):
                if data is None:
                    localdisk.copy_into(source_path, fd, size)
                    os.fsync(fd)
                else:
                    localdisk.write_all(fd, memoryview(data))
                if created:
                    fsync_dir(self.root)    # the file's name must survive a power cut too
                self._crash.passed("appended")
                upload = self._record_append(upload, index, size, last_index, data,
                                             digest=digest)
        finally:
            os.close(fd)
        self._crash.passed("append_recorded")
        os.remove(source_path)
        self._crash.passed("cleaned")
        return self._sync_full_journal(upload)

    def _record_append(self, upload, index, size, last_index, journal, record_type=False,
                       digest=None, records=None):
        """One ledger transaction: chunk `index` (`size` bytes at the consistent length) is
        appended, with its bytes when they are `journal`ed; returns the upload after it, which
        memory now mirrors. The chunk that completes the upload records that too, when its
        file was fsynced (no journal is left then): no second transaction for it, and, when
        `digest` (the running sha256 of the file with this chunk, None: not known) is given,
        its sha256 with it: no hasher. record_type: the upload's mime type and extension are
        written first (a new upload, created_at None: its row). records: the chunk records
        its file keeps now (the attribute's value), this chunk's among them: the transaction
        is not synced (None: it is, and the file needs none)."""
        now = time.time()
        create = upload.created_at is None
        journaled = 0 if create else self._journaled(upload.file_id)
        if create:
            upload = UploadState((upload.file_id, upload.mime_type, upload.ext, 0, 0, None,
                                  now, now, None, None), [])
        after = _appended(upload, size, now, last_index)
        completes = journal is None and after.completed
        if completes:
            after.completed_at = now
            after.sha256 = digest.hexdigest() if digest is not None else None
        self._ledger.record_append(upload.file_id, index, size, upload.bytes_appended, now,
                                   last_index, journal, index in upload.stashed, journaled,
                                   completed=completes, sha256=after.sha256,
                                   new_type=(upload.mime_type, upload.ext)
                                   if record_type or create else None, create=create,
                                   synced=records is None)
        upload = after
        self._cache.put(upload.file_id, upload,
                        0 if journal is None else journaled + len(journal),
                        digest=None if completes else digest,
                        records=RECORDS_MAGIC if records is None else records)
        return upload

    def _running_digest(self, upload):
        """A copy of the sha256 of the upload's assembled bytes, to go on with (a new one
        when it has none), or None when it is not known: the upload was read from the
        ledger, or a chunk was appended by a kernel copy. Then the hasher reads the file
        once it completes."""
        if upload.bytes_appended == 0:
            return new_sha256()
        digest = self._cache.digest(upload.file_id)
        return None if digest is None else digest.copy()

    def _sync_full_journal(self, upload):
        if self._journaled(upload.file_id) > JOURNAL_FLUSH_BYTES:
            self._sync_journaled(upload)
        return upload

    def _commit_in_place(self, writer, size, journal, sync_here):
        """_TailWriter.commit's step under the lock: decide again with what the upload holds
        now (a last index or a budget may have changed while the bytes arrived), record,
        free the tail, and go on as for any stored chunk. sync_here: the file is synced
        here, with the chunk's record when it may have one (chunk records)."""
        with self._locks.held(writer.file_id):
            if writer.cancelled:
                raise StoreError(409, "upload_deleted", "upload %s was deleted while chunk %d "
                                 "was being received" % (writer.file_id, writer.index))
            upload = self._state(writer.file_id)
            if upload is None and writer.new:
                upload = UploadState.unknown(writer.file_id)     # still new: its row comes now
            if upload is None or upload.next_index != writer.index or \
                    upload.bytes_appended != writer.offset:
                raise StoreError(500, "storage_inconsistent", "the tail of %s moved while "
                                 "chunk %d was written in place" % (writer.file_id,
                                                                    writer.index))
            _, ext = self.decide(upload, writer.index, None, size, writer.is_last,
                                 writer.mime_type, writer.budgets[0])
            if ext != writer.ext:            # the bytes are in that extension's file
                raise StoreError(409, "mime_type_conflict", "upload is %s, this chunk says "
                                 "%s" % (upload.ext, writer.mime_type))
            # A new upload's row (or, when an early chunk created it meanwhile with no type,
            # the type this chunk names) goes into the chunk's own transaction.
            typed = _typed(upload, upload.mime_type or writer.mime_type, ext)
            record_type = (typed.mime_type, typed.ext) != (upload.mime_type, upload.ext)
            records = None
            if sync_here:
                records = writer.sync_with_records(
                    self._records_with(writer, upload, size, record_type))
                if records is not None:
                    self._crash.passed("records_synced")
            upload = self._record_append(typed, writer.index, size,
                                         writer.index if writer.is_last else None, journal,
                                         record_type=record_type,
                                         digest=writer.running_digest, records=records)
            writer.recorded()                 # from here on, nothing may cut these bytes off
            self._crash.passed("stream_recorded")
            return self._after_chunk(self._sync_full_journal(upload), writer.index, IN_ORDER,
                                     size)

    def _records_with(self, writer, upload, size, record_type):
        """The upload's chunk records (the attribute's value) with this chunk's added, when
        its commit may go unsynced (the docstring, "Chunk records"); None when it must be
        synced: the records are not known (the upload was read from the ledger since its
        last synced commit), RECORDS_MAX are kept already, or the commit writes more than a
        replay would (a type, journaled bytes to forget, an early chunk's row)."""
        records = self._cache.records(writer.file_id)
        if records is None or len(records) >= RECORDS_BYTES_MAX or record_type or \
                writer.index in upload.stashed or self._journaled(writer.file_id):
            return None
        return records + RECORD.pack(writer.index, writer.offset, size, writer.crc)

    def _free_tail(self, writer):
        """The upload's tail is free again (the writer's abort). A new upload's writer made
        its file: removed unless the upload got its row meanwhile (an early chunk); with no
        row, nothing else may name it. Not when a delete cancelled the writer: it moved the
        file away, and what is at the path now is a newer upload's."""
        with self._locks.held(writer.file_id):
            try:
                if writer.new and not writer.cancelled and self._state(writer.file_id) is None:
                    self.discard(writer.path)
            finally:
                self._release(writer)

    def _release(self, writer):
        """Under the upload's lock: forget the writer, wake whoever waits for its tail."""
        if self._writers.get(writer.file_id) is writer:
            del self._writers[writer.file_id]
        writer.done.set()

    def _sync_journaled(self, upload):
        """fsync the file, then forget its journal (both steps may be repeated). The chunks are
        durable either way, so a full disk only postpones it (logged)."""
        path = self.media_path(upload)
        try:
            if os.path.lexists(path):
                localdisk.fsync_path(path, "the upload's video file")
            self._crash.passed("journal_synced")
            self._ledger.clear_journal(upload.file_id)
        except (OSError, sqlite3.DatabaseError) as error:
            if not localdisk.is_disk_full(error):
                raise
            log.warning("%s: journal kept until there is room on the disk: %s",
                        upload.file_id, error)
            return
        self._cache.set_journaled(upload.file_id, 0)
        self._crash.passed("journal_cleared")

    def _stash(self, upload, index, part_path, size, last_index=None):
        """Keep an early chunk in temp/<id>/ until the chunks before it arrive; returns the
        upload after it. A failure before the record removes the renamed file (it has no
        row)."""
        file_id = upload.file_id
        target = self._stash_path(file_id, index)
        with writing("keeping chunk %d for later" % index,
                     undo=lambda: self.discard(target)):
            localdisk.fsync_path(part_path, "a part file")
            self.folder.own_dir(self.temp_dir, "the temp folder")
            folder = os.path.join(self.temp_dir, file_id)
            self.folder.own_dir(folder, "the upload's temp folder", create=True)
            os.replace(part_path, target)
            fsync_dir(folder)
            self._crash.passed("stashed")
            self._ledger.record_stash(file_id, index, size, last_index)
        self._crash.passed("stash_recorded")
        return self._reload(file_id)

    def _append_stashed_run(self, upload):
        """Append every stashed chunk that is now contiguous; return the upload afterwards. A
        full disk stops the run: those chunks stay, durable, in temp/ for the next try."""
        while upload.stashed and upload.stashed[0] == upload.next_index:
            index = upload.next_index
            path = self._stash_path(upload.file_id, index)
            try:
                upload = self._append(upload, index, path, os.lstat(path).st_size)
            except StoreError as error:
                if error.status != 507:
                    raise
                log.warning("%s: chunk %d waits in temp/ for room on the disk",
                            upload.file_id, index)
                break
        return upload

    def _complete(self, upload):
        """Under the lock, once the upload holds every chunk: the completion recorded (unless
        the chunk that completed it recorded it in its own transaction), temp/ emptied, the
        file handed to the hasher (unless that transaction recorded its sha256 too)."""
        if upload.completed_at is None:
            self._sync_journaled(upload)    # the whole file on disk before anyone reads it back
            self._ledger.set_completed(upload.file_id)
            upload = self._reload(upload.file_id)     # before the hasher reads it
        self.folder.remove_tree(os.path.join(self.temp_dir, upload.file_id))
        if upload.sha256 is None:
            self._hasher.submit(upload.file_id)
        log.info("upload %s completed: %d chunks, %d bytes", upload.file_id,
                 upload.next_index, upload.bytes_appended)
        return upload

    # -- reading --------------------------------------------------------------------------

    def status(self, file_id):
        """The UploadState of `file_id`, or None when the store has never seen it. (Memory
        when it has the upload, which it updates only after the ledger; never filled from
        here, where the upload's lock is not held.)"""
        return self._cache.upload(file_id) or self._ledger.load(file_id)

    def media_path(self, upload):
        return os.path.join(self.root, upload.file_id + "." + upload.ext)

    def _stash_path(self, file_id, index):
        return os.path.join(self.temp_dir, file_id, "%d.chunk" % index)

    def _hash_in_background(self, file_id):
        """The hasher's work: the digest of the upload that completed, kept only for that
        upload (not a newer one that took its id after a deletion)."""
        upload = self.status(file_id)
        if upload is None or upload.completed_at is None or upload.sha256 is not None:
            return
        digest = sha256_file(self.media_path(upload), upload.bytes_appended)
        # Under the upload's lock, like the chunk events: the hasher is handed the upload
        # before the last chunk's event is sent, and "completed" must not overtake it.
        with self._locks.held(file_id):
            if not self._ledger.set_sha256(file_id, upload.completed_at, digest):
                return
            self._emit_completed(self._reload(file_id))

    def _emit_completed(self, upload):
        """Under the upload's lock, once its sha256 is recorded: after its last chunk's event."""
        self._emit("completed", upload.file_id, size=upload.bytes_appended,
                   sha256=upload.sha256, ext=upload.ext, mimeType=upload.mime_type)

    def open_media(self, upload):
        """The assembled file to serve: its consistent prefix, even while it grows; None
        when there are no bytes yet."""
        if upload is None or upload.bytes_appended == 0:
            return None
        return FileMedia(self.media_path(upload), upload.bytes_appended, upload.updated_at)

    @contextlib.contextmanager
    def media_file(self, upload):
        """A local file holding the assembled video, for tools such as ffprobe."""
        yield self.media_path(upload)

    def list_uploads(self, limit, after=None):
        """Up to `limit` uploads, newest first, after the (created_at, file_id) cursor `after`.
        Keyset pagination: uploads created meanwhile never shift the pages that follow."""
        uploads = (self._ledger.load(file_id) for file_id in self._ledger.page(limit, after))
        return [upload for upload in uploads if upload is not None]   # deleted meanwhile

    def counts(self):
        """(uploads in progress, uploads completed)."""
        return self._ledger.counts()

    def completed_since(self, since):
        """Uploads completed at or after `since` (unix time) whose sha256 is known, oldest
        first: what a listener that must not miss a "completed" event (one a crash cut off
        between recording the sha256 and emitting) catches up from at start-up."""
        return [self._ledger.load(file_id) for file_id in self._ledger.completed_ids(since)]

    def check_storage(self):
        """Readiness of the storage backend (the upload folder checks say the rest)."""
        return {"ok": True, "backend": "local"}

    # -- derivatives ------------------------------------------------------------------------

    def put_derivative(self, upload, name, path, content_type=None):
        """Keep a derivative (poster.jpg, remux.webm, ...): `path` is moved, durably, to
        derived/<fileId>/<name>."""
        check_derivative_name(name)
        folder = os.path.join(self.derived_dir, upload.file_id)
        with writing("keeping derivative %s" % name):
            self.folder.own_dir(self.derived_dir, "the derivatives folder", create=True)
            self.folder.own_dir(folder, "the upload's derivatives folder", create=True)
            localdisk.fsync_path(path, "a derivative")
            os.replace(path, os.path.join(folder, name))
            fsync_dir(folder)

    def open_derivative(self, upload, name):
        """A derivative to serve, like open_media; None when there is none (or when a link
        stands in its way: logged)."""
        if not name or os.path.basename(name) != name or name in (".", ".."):
            return None
        folder = os.path.join(self.derived_dir, upload.file_id)
        path = os.path.join(folder, name)
        try:
            if not (self.folder.own_dir(self.derived_dir, "the derivatives folder") and
                    self.folder.own_dir(folder, "the upload's derivatives folder")):
                return None
            info = os.lstat(path)
        except (UnsafePath, FileNotFoundError):
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        return FileMedia(path, info.st_size, info.st_mtime)

    # -- deletion, retention ----------------------------------------------------------------

    def delete(self, file_id, unless=None, reason="requested"):
        """Remove an upload and every trace of it; False when it is unknown (or when
        `unless(upload)`, checked under the upload's lock, says to keep it). The "deleted"
        event says why (`reason`: "requested", or "expired" from `sweep`) and whether the
        upload had completed.

        Crash-safe in three steps: (1) its file, temp chunks and derivatives are moved into
        temp/.deleting/<fileId>-<created_at>-<random>/ (which records the intent, and which
        upload it was), (2) its ledger rows are deleted, (3) that folder is removed.
        repair() finishes a deletion cut short anywhere after (1). A chunk of it still being
        received into a part file arrives after the deletion and starts afresh; one being
        written in place is refused (409 upload_deleted), and starts afresh when sent again.
        The sweep (`unless`) never deletes an upload that a chunk is being written into.
        """
        with self._locks.held(file_id):
            upload = self._ledger.load(file_id)    # as expired() read it (not a hot path)
            writer = self._writers.get(file_id)
            if upload is None or (unless is not None and (writer is not None or
                                                          unless(upload))):
                return False
            if writer is not None:
                writer.cancelled = True       # its commit refuses; its fd is the moved file's
                self._release(writer)
            self.folder.own_dir(self.deleting_dir, "the deletion folder")
            trash = os.path.join(self.deleting_dir, "%s-%r-%s" % (
                file_id, upload.created_at, os.urandom(8).hex()))
            os.makedirs(trash)
            fsync_dir(self.deleting_dir)
            for name, path in self._traces(upload):
                if os.path.lexists(path):
                    os.replace(path, os.path.join(trash, name))   # a link moves, itself
            fsync_dir(trash)
            self._ledger.delete(file_id)
            self._cache.drop(file_id)
            self.folder.remove_tree(trash)
        log.info("upload %s deleted", file_id)
        self._emit("deleted", file_id, reason=reason, completed=upload.completed)
        return True

    def _traces(self, upload):
        """(name, path) of everything on disk that belongs to `upload`: never a path that
        goes through a link (a folder of the store's replaced by one is left out, logged)."""
        traces = [("media", self.media_path(upload))]
        for name, folder in (("temp", self.temp_dir), ("derived", self.derived_dir)):
            with contextlib.suppress(UnsafePath):
                if self.folder.own_dir(folder, "the store's %s folder" % name):
                    traces.append((name, os.path.join(folder, upload.file_id)))
        return traces

    def expired(self, now, incomplete_ttl=None, retention=None):
        """Ids of uploads idle and incomplete for longer than `incomplete_ttl` seconds, and of
        completed uploads older than `retention` seconds (None: keep them)."""
        return self._ledger.expired(None if incomplete_ttl is None else now - incomplete_ttl,
                                    None if retention is None else now - retention)

    # -- start-up repair ------------------------------------------------------------------

    def repair(self):
        """Bring every upload back to its last consistent state after a crash; returns a count
        of the uploads it had to mend. Runs before the server accepts connections. What it
        does not recognise it sets aside (localdisk's quarantine), so it always finishes."""
        mended = 0
        self._cache.clear()                   # the ledger is the truth at start-up
        self.folder.make_own_dirs((self.temp_dir, self.incoming_dir, self.deleting_dir))
        if os.path.lexists(self.derived_dir):
            self.folder.make_own_dirs((self.derived_dir,))
        self.folder.clear_incoming()                               # never acknowledged
        for name in os.listdir(self.deleting_dir):                # a deletion cut short
            if self._finish_deletion(name):
                mended += 1
        known = set()
        for file_id in self._ledger.all_ids():
            known.add(file_id)
            try:
                with self._locks.held(file_id):
                    if self._repair_upload(file_id):
                        mended += 1
            except (OSError, StoreError, sqlite3.DatabaseError):
                log.exception("repair: %s is left as it is (repaired at the next start)",
                              file_id)
        self._set_aside_unknown_media(known)
        self._clear_strays(self.temp_dir, known, (localdisk.INCOMING_DIR_NAME,
                                                  DELETING_DIR_NAME))
        if os.path.isdir(self.derived_dir):
            self._clear_strays(self.derived_dir, known)
        return mended

    def _set_aside_unknown_media(self, known):
        """A video file of an upload the ledger does not know: a new upload's first chunk
        written in place whose commit (which writes the row) a crash cut off, so never
        acknowledged. Set aside, not removed: a ledger lost by hand would look the same."""
        for name in os.listdir(self.root):
            file_id, dot, ext = name.rpartition(".")
            if dot and ext in MEDIA_TYPES and valid_file_id(file_id) and file_id not in known:
                self.folder.quarantine(os.path.join(self.root, name),
                                       "a video file the ledger does not know")

    def _clear_strays(self, folder, known, own=()):
        """Folders of unknown uploads (and work folders a crash left, e.g. processing's) are
        removed; links and files that have no business here are set aside."""
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name in own or name in known and not os.path.islink(path):
                continue
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                self.folder.quarantine(path, "not a folder the store made")
                continue
            what = "folder of unknown upload" if valid_file_id(name) else "leftover"
            log.warning("repair: removing %s %s", what, path)
            self.folder.remove_tree(path)

    def _finish_deletion(self, name):
        """repair(): a deletion cut short. The folder name says which upload (id and creation
        time), so a newer upload with the same id is never touched. An entry with another
        name (or a link) was not made by `delete`: it is set aside."""
        path = os.path.join(self.deleting_dir, name)
        match = DELETION_NAME.match(name)
        if match is None or not stat.S_ISDIR(os.lstat(path).st_mode):
            self.folder.quarantine(path, "not a deletion the store began")
            return False
        upload = self._ledger.load(match.group("id"))
        if upload is not None and repr(upload.created_at) == match.group("created"):
            log.warning("repair: finishing the deletion of %r", upload.file_id)
            for _, trace in self._traces(upload):      # what step (1) had not moved yet
                self.folder.remove_tree(trace)
            self._ledger.delete(upload.file_id)
        self.folder.remove_tree(path)
        return True

    def _repair_upload(self, file_id):
        upload = self._ledger.load(file_id)
        path = self.media_path(upload)
        if os.path.islink(path):
            self.folder.quarantine(path, "a link where the upload's video belongs")
        self._replay_journal(upload, path)
        replayed = self._replay_records(self._ledger.load(file_id), path)
        mended = self._repair_length(self._ledger.load(file_id), path) or replayed
        upload = self._ledger.load(file_id)
        mended = self._repair_stash(upload) or mended
        before = upload.next_index
        upload = self._append_stashed_run(self._reload(file_id))
        mended = mended or upload.next_index != before
        if upload.completed:
            if upload.completed_at is None or upload.next_index != before:
                upload = self._complete(upload)
            elif upload.sha256 is None:
                self._hasher.submit(file_id)
        return mended

    def _repair_length(self, upload, path):
        """The file back to the ledger's consistent length: a torn tail is cut; a file that
        lost bytes rolls the ledger back to the whole chunks it still holds."""
        actual = os.lstat(path).st_size if os.path.lexists(path) else 0
        if actual > upload.bytes_appended:
            log.warning("repair: %s: cutting %d torn bytes after %d", upload.file_id,
                        actual - upload.bytes_appended, upload.bytes_appended)
            localdisk.truncate(path, upload.bytes_appended, "the upload's video file")
            return True
        if actual < upload.bytes_appended:
            # The disk lost bytes it had fsynced (or an old backup was restored). Go back to
            # the whole chunks the file still holds, so the client resends the rest; never
            # leave a hole the next append would fill with zeros.
            index, offset = self._ledger.rollback_to_length(upload.file_id, actual)
            log.error("repair: %s: file has %d bytes but the ledger said %d; chunks from %d "
                      "on must be sent again", upload.file_id, actual, upload.bytes_appended,
                      index)
            os.close(open_file(path, os.O_WRONLY | os.O_CREAT, "the upload's video file"))
            localdisk.truncate(path, offset, "the upload's video file")
            return True
        return False

    def _repair_stash(self, upload):
        """temp/<id>/ holds exactly the stashed chunks the ledger knows, as regular files."""
        mended = False
        folder = os.path.join(self.temp_dir, upload.file_id)
        on_disk = []
        if os.path.lexists(folder):
            if stat.S_ISDIR(os.lstat(folder).st_mode):
                on_disk = os.listdir(folder)
            else:
                self.folder.quarantine(folder, "not the upload's temp folder")
        stashed = set(upload.stashed)
        for name in on_disk:
            path = os.path.join(folder, name)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                self.folder.quarantine(path, "not a chunk file")
            elif _chunk_file_index(name) not in stashed:
                # appended already, or renamed in but never recorded (never acknowledged)
                self.discard(path)
            else:
                continue
            mended = True
        for index in stashed:
            if not os.path.isfile(self._stash_path(upload.file_id, index)):
                log.error("repair: %s: stashed chunk %d has no file; forgetting it so the "
                          "client sends it again", upload.file_id, index)
                self._ledger.forget_chunk(upload.file_id, index)
                mended = True
        return mended

    def _replay_records(self, upload, path):
        """Chunks the video file's records name after the ledger's consistent length (a
        power cut took the commits that were not synced) are recorded again, in order, each
        only once its bytes are there and match its crc32; the first that does not fit ends
        the replay (the tail after it is then cut as any other)."""
        if upload.completed or not os.path.isfile(path):   # (a link: set aside already)
            return False
        replayed = 0
        fd = open_file(path, os.O_RDONLY, "the upload's video file")
        try:
            for index, offset, size, crc in _read_records(fd, upload.file_id):
                if index < upload.next_index:
                    continue                     # the ledger has it (a synced commit since)
                if index != upload.next_index or offset != upload.bytes_appended or \
                        index in upload.stashed or upload.last_index is not None and \
                        index >= upload.last_index:
                    break
                data = os.pread(fd, size, offset)
                if len(data) != size or binascii.crc32(data) != crc:
                    break
                self._ledger.record_append(upload.file_id, index, size, offset, time.time())
                upload = self._ledger.load(upload.file_id)
                replayed += 1
        finally:
            os.close(fd)
        if replayed:
            log.warning("repair: %s: %d chunk(s) the ledger had lost recorded again from the "
                        "video file's records", upload.file_id, replayed)
        return replayed > 0

    def _replay_journal(self, upload, path):
        """Write the journaled chunks back at their offsets (the file's unsynced writes may
        be lost), fsync, forget the journal. A row that would leave a hole before it (the
        file lost more than its journal holds) is not written: the rollback that follows
        then goes back to the whole chunks the file has, as for any other loss."""
        rows = self._ledger.journal(upload.file_id)
        if not rows:
            return
        written = 0
        if os.path.lexists(path):
            fd = open_file(path, os.O_RDWR, "the upload's video file")
            try:
                length = os.fstat(fd).st_size
                for offset, data in rows:
                    if offset > length:
                        break
                    os.lseek(fd, offset, os.SEEK_SET)
                    localdisk.write_all(fd, memoryview(data))
                    length = max(length, offset + len(data))
                    written += 1
                os.fsync(fd)
            finally:
                os.close(fd)
        self._crash.passed("journal_synced")
        self._ledger.clear_journal(upload.file_id)
        if written:
            log.info("repair: %s: wrote %d journaled chunk(s) back into the file",
                     upload.file_id, written)

    def close(self):
        """Stop the hasher, sync the files whose chunks are still journaled, close."""
        self._hasher.stop()
        for file_id in self._ledger.journaled_ids():
            with self._locks.held(file_id):
                upload = self._ledger.load(file_id)
                if upload is not None:
                    self._sync_journaled(upload)
        self._ledger.close()

    # -- room in the ledger file for feature modules' own tables (tus) ---------------------

    def ledger_read(self):
        """A context manager lending a connection to the ledger file for reads of a feature's
        own tables (one thread at a time per connection)."""
        return self._ledger._connection()

    def ledger_write(self):
        """A context manager: one committed (fsynced) transaction on a feature's own tables."""
        return self._ledger._write()

    def sibling(self, name, allow_any_content=True):
        """A second store of its own in <root>/<name>/ (tus keeps partial uploads there: no
        media signature rule, no listing, no events of the main store)."""
        return ChunkStore(os.path.join(self.root, name), allow_any_content=allow_any_content,
                          max_upload_bytes=self.max_upload_bytes,
                          min_free_bytes=self.folder.min_free_bytes,
                          chunk_records=self.chunk_records)

    # -- live reading (issue 18, live.py): the growing file, read while it grows ----------
    # (read-only; s3store.S3Store.read_appended is the other backend's)

    def read_appended(self, upload, offset, max_bytes):
        """Bytes of the assembled prefix from `offset`: at most `max_bytes`, and never past
        `upload.bytes_appended`, the consistent length of that snapshot (bytes beyond it may be
        a torn tail that the next append truncates). b"" when there is nothing there, or the
        file is gone (deleted since the snapshot). Readers see appended bytes at once, synced
        or still journaled: both are in the page cache."""
        count = min(max_bytes, upload.bytes_appended - offset)
        if count <= 0:
            return b""
        try:
            fd = open_file(self.media_path(upload), os.O_RDONLY, "the upload's video file")
        except FileNotFoundError:
            return b""
        try:
            parts = []
            while count > 0:
                if hasattr(os, "pread"):          # no shared file position
                    block = os.pread(fd, count, offset)
                else:                             # Windows
                    os.lseek(fd, offset, os.SEEK_SET)
                    block = os.read(fd, count)
                if not block:
                    break
                parts.append(block)
                offset += len(block)
                count -= len(block)
            return b"".join(parts)
        finally:
            os.close(fd)
    # -- end of live reading --------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The ledger: SQLite, one connection per thread at a time (a small pool), schema versioned
# ---------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    file_id        TEXT PRIMARY KEY,
    mime_type      TEXT,              -- as the first chunk that named one gave it
    ext            TEXT NOT NULL,     -- extension of the assembled file
    next_index     INTEGER NOT NULL DEFAULT 0,  -- chunks 0..next_index-1 are in the file
    bytes_appended INTEGER NOT NULL DEFAULT 0,  -- the file's consistent length
    last_index     INTEGER,           -- known once a chunk came with status=completed
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL,
    completed_at   REAL,
    sha256         TEXT               -- of the assembled file, computed after completion
);
CREATE TABLE IF NOT EXISTS chunks (
    file_id TEXT NOT NULL,
    idx     INTEGER NOT NULL,
    size    INTEGER NOT NULL,
    offset  INTEGER,                  -- where it starts in the file; NULL while stashed
    PRIMARY KEY (file_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS uploads_by_age ON uploads (created_at, file_id);
CREATE TABLE IF NOT EXISTS journal (  -- small chunks' bytes until their file is fsynced
    file_id TEXT NOT NULL,
    idx     INTEGER NOT NULL,
    offset  INTEGER NOT NULL,         -- where they belong in the file
    data    BLOB NOT NULL,
    PRIMARY KEY (file_id, idx)
);
"""

_UPLOAD_COLUMNS = ("file_id, mime_type, ext, next_index, bytes_appended, last_index, "
                   "created_at, updated_at, completed_at, sha256")


class _GroupCommit:
    """The ledger's one writing connection, whose commits are shared (group commit).

    A commit waits for the disk (synchronous=FULL: the WAL is fsynced), and SQLite lets one
    writer in at a time, so with one commit per chunk the ledger was a queue in front of the
    disk: when a sync took 10-25 ms (a checkpoint, other files' syncs), 200 recorders' chunks
    waited behind each other for seconds and never caught up. Here a writer that finishes its
    statements while others are already waiting to write leaves the transaction open and
    waits; the last of those (not of any that arrive later) commits for all, so a slow sync
    makes the next commit carry more writers instead of the queue longer. Alone, a writer
    commits at once as before.

    Each writer that joins an open transaction runs inside a SAVEPOINT, so its failure undoes
    only its own statements (it raises; the others still commit). A failed COMMIT (a full
    disk) is rolled back and raised in every writer of that transaction: none of them was
    committed. A writer never returns before the commit that holds its statements.

    A writer that needs no sync (a chunk its file records: the docstring, "Chunk records")
    joins a transaction that is open, as any writer; else it opens its own with
    synchronous=NORMAL and commits at once, for there is no sync to share: nobody joins it.
    A later synced commit makes it durable too (the WAL is written in order)."""

    def __init__(self, db):
        self._db = db
        self._lock = threading.Lock()            # the connection and its open transaction
        self._committed = threading.Condition(self._lock)
        self._arrivals = threading.Lock()        # guards _arrived
        self._arrived = 0        # writers that have asked for _lock, ever
        self._entered = 0        # writers that have had it (under _lock)
        self._open = None        # the _Batch of the open transaction, if one is open
        self._synchronous = "FULL"   # the connection's, as _Ledger._open set it

    @contextlib.contextmanager
    def transaction(self, synced=True):
        with self._arrivals:
            self._arrived += 1
        with self._lock:
            self._entered += 1
            if self._db is None:
                raise sqlite3.ProgrammingError("the ledger is closed")
            batch = self._open
            joined = batch is not None
            if joined:
                try:
                    self._db.execute("SAVEPOINT writer")
                except sqlite3.Error:
                    self._leave(batch)           # nothing of its own to undo
                    raise
            else:
                synchronous = "FULL" if synced else "NORMAL"
                if synchronous != self._synchronous:    # (never inside a transaction)
                    self._db.execute("PRAGMA synchronous=" + synchronous)
                    self._synchronous = synchronous
                self._db.execute("BEGIN IMMEDIATE")
                batch = self._open = _Batch()
            try:
                yield self._db
            except BaseException:
                self._undo(batch, joined)
                raise
            if joined:
                try:
                    self._db.execute("RELEASE writer")
                except sqlite3.Error as error:   # in doubt: nobody's statements commit
                    self._rollback(batch, error)
                    raise
            batch.writers += 1
            if not joined and synced:
                # The transaction waits for the writers that are waiting now, not for those
                # that come later: they would keep it open as long as they kept coming.
                with self._arrivals:
                    batch.until = self._arrived
            if self._entered < batch.until and batch.writers < LEDGER_GROUP_MAX:
                while not batch.done:            # the last of them commits
                    self._committed.wait()
            else:
                self._commit(batch)
            if batch.error is not None:
                raise copy.copy(batch.error)     # each writer of the batch raises its own

    def _undo(self, batch, joined):
        """The writer's statements failed: undo them, and if it was the last writer of an
        open transaction that others wait on, commit theirs."""
        try:
            if not joined:                     # it opened the transaction: nobody else is in
                self._rollback(batch, None)
                return
            self._db.execute("ROLLBACK TO writer")
            self._db.execute("RELEASE writer")
        except sqlite3.Error as error:         # the transaction is in doubt: nobody commits
            self._rollback(batch, error)
            return
        self._leave(batch)

    def _leave(self, batch):
        """A writer leaves without statements in `batch`: if it was the last one that the
        others waited for, it commits theirs."""
        if batch.writers and self._entered >= batch.until:
            self._commit(batch)

    def _commit(self, batch):
        """COMMIT the open transaction; a failure is the batch's error, raised by each."""
        try:
            self._db.execute("COMMIT")
        except BaseException as error:
            self._rollback(batch, error)
            return
        self._settle(batch, None)

    def _rollback(self, batch, error):
        # A COMMIT that failed (a full disk) may leave the transaction open: the connection is
        # reused only with none.
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
        self._settle(batch, error)

    def _settle(self, batch, error):
        batch.error, batch.done = error, True
        self._open = None
        self._committed.notify_all()

    def close(self):
        with self._lock:
            if self._open is not None:       # writers still wait on it: they are told
                self._rollback(self._open, sqlite3.ProgrammingError("the ledger is closed"))
            if self._db is not None:
                self._db.close()
                self._db = None


class _Batch:
    """One transaction of _GroupCommit: how many writers it holds, and how it ended."""

    def __init__(self):
        self.writers = 0
        self.until = 0           # it commits once this many writers have had the lock
        self.done = False
        self.error = None


class _Ledger:
    """The uploads and chunks tables. Every write is committed (fsynced) before it returns."""

    def __init__(self, path):
        self.path = path
        self._pool = queue.LifoQueue()
        with self._connection() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError("%s has schema %d; this m1server knows up to %d"
                                   % (path, version, SCHEMA_VERSION))
            db.execute("PRAGMA journal_mode=WAL")
            if version < SCHEMA_VERSION:
                # One transaction, so one sync (each statement on its own commits and syncs:
                # five syncs at a new folder's first start); at the current version, none.
                db.executescript("BEGIN IMMEDIATE;\n%sPRAGMA user_version=%d;\nCOMMIT;"
                                 % (_SCHEMA, SCHEMA_VERSION))
        self._group = _GroupCommit(self._open())   # the one connection that writes

    def _open(self):
        db = sqlite3.connect(self.path, timeout=LEDGER_BUSY_TIMEOUT_S, isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA synchronous=FULL")     # a commit is on disk before it returns
        return db

    @contextlib.contextmanager
    def _connection(self):
        """Borrow a connection: threads never share one at the same time."""
        try:
            db = self._pool.get_nowait()
        except queue.Empty:
            db = self._open()
        try:
            yield db
        finally:
            self._pool.put(db)

    def _write(self, synced=True):
        """A context manager: the caller's statements, committed (fsynced, unless `synced`
        is False) before it exits; writers that arrive together share one commit
        (_GroupCommit)."""
        return self._group.transaction(synced)

    def load(self, file_id):
        """The upload's UploadState (with its stashed chunks and their bytes), or None."""
        with self._connection() as db:
            row = db.execute("SELECT %s FROM uploads WHERE file_id = ?" % _UPLOAD_COLUMNS,
                             (file_id,)).fetchone()
            if row is None:
                return None
            stashed = db.execute("SELECT idx, size FROM chunks WHERE file_id = ? AND idx >= ? "
                                 "ORDER BY idx", (file_id, row[3])).fetchall()
        return UploadState(row, [index for index, _ in stashed],
                           sum(size for _, size in stashed))

    def all_ids(self):
        with self._connection() as db:
            return [r[0] for r in db.execute("SELECT file_id FROM uploads")]

    def chunk_at(self, file_id, index):
        """(size, offset) of a stored chunk; offset is None while it is stashed."""
        with self._connection() as db:
            return db.execute("SELECT size, offset FROM chunks WHERE file_id = ? AND idx = ?",
                              (file_id, index)).fetchone()

    def page(self, limit, after):
        with self._connection() as db:
            if after is None:
                rows = db.execute("SELECT file_id FROM uploads ORDER BY created_at DESC, "
                                  "file_id DESC LIMIT ?", (limit,))
            else:
                rows = db.execute("SELECT file_id FROM uploads WHERE created_at < ? OR "
                                  "(created_at = ? AND file_id < ?) ORDER BY created_at DESC, "
                                  "file_id DESC LIMIT ?", (after[0], after[0], after[1], limit))
            return [r[0] for r in rows]

    def counts(self):
        with self._connection() as db:
            return db.execute("SELECT COALESCE(SUM(completed_at IS NULL), 0), "
                              "COALESCE(SUM(completed_at IS NOT NULL), 0) FROM uploads"
                              ).fetchone()

    def expired(self, idle_before, completed_before):
        """Ids of incomplete uploads idle since before `idle_before` and of uploads completed
        before `completed_before` (None: neither)."""
        with self._connection() as db:
            ids = []
            if idle_before is not None:
                ids += [r[0] for r in db.execute(
                    "SELECT file_id FROM uploads WHERE completed_at IS NULL AND updated_at < ?",
                    (idle_before,))]
            if completed_before is not None:
                ids += [r[0] for r in db.execute(
                    "SELECT file_id FROM uploads WHERE completed_at < ?", (completed_before,))]
            return ids

    def delete(self, file_id):
        with self._write() as db:
            db.execute("DELETE FROM journal WHERE file_id = ?", (file_id,))
            db.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))
            db.execute("DELETE FROM uploads WHERE file_id = ?", (file_id,))

    def create(self, file_id, mime_type, ext):
        now = time.time()
        with self._write() as db:
            db.execute("INSERT INTO uploads (file_id, mime_type, ext, created_at, updated_at) "
                       "VALUES (?, ?, ?, ?, ?)", (file_id, mime_type, ext, now, now))

    def set_mime_type(self, file_id, mime_type, ext):
        with self._write() as db:
            db.execute("UPDATE uploads SET mime_type = ?, ext = ? WHERE file_id = ?",
                       (mime_type, ext, file_id))

    def record_stash(self, file_id, index, size, last_index=None):
        with self._write() as db:
            db.execute("INSERT INTO chunks (file_id, idx, size) VALUES (?, ?, ?)",
                       (file_id, index, size))
            db.execute("UPDATE uploads SET updated_at = ?, last_index = COALESCE(?, last_index) "
                       "WHERE file_id = ?", (time.time(), last_index, file_id))

    def record_append(self, file_id, index, size, offset, now, last_index=None, journal=None,
                      stashed=False, journaled=1, completed=False, new_type=None, create=False,
                      sha256=None, synced=True):
        """One transaction: the chunk's offset and the upload's new consistent length (and,
        for the last chunk, that it is the last; `completed`: that the upload completed, at
        `now`, with its `sha256` when known). new_type: (mime_type, ext) to record first, in
        the upload's new row when `create`. With `journal` (the chunk's bytes, whose
        file was not fsynced) they are kept in the journal; without, the file was fsynced, so
        the upload's journal is emptied (when it holds anything: `journaled` bytes).
        `stashed`: the chunk has its row already (it waited in temp/). synced False: the
        commit is not waited on to reach the disk (the chunk's file records it)."""
        with self._write(synced) as db:
            if create:
                db.execute("INSERT INTO uploads (file_id, mime_type, ext, created_at, "
                           "updated_at) VALUES (?, ?, ?, ?, ?)",
                           (file_id, new_type[0], new_type[1], now, now))
            elif new_type is not None:
                db.execute("UPDATE uploads SET mime_type = ?, ext = ? WHERE file_id = ?",
                           (new_type[0], new_type[1], file_id))
            if journal is not None:
                db.execute("INSERT INTO journal (file_id, idx, offset, data) VALUES "
                           "(?, ?, ?, ?)", (file_id, index, offset, sqlite3.Binary(journal)))
            elif journaled:
                db.execute("DELETE FROM journal WHERE file_id = ?", (file_id,))
            if stashed:
                db.execute("UPDATE chunks SET offset = ? WHERE file_id = ? AND idx = ?",
                           (offset, file_id, index))
            else:
                db.execute("INSERT INTO chunks (file_id, idx, size, offset) VALUES (?, ?, ?, ?)",
                           (file_id, index, size, offset))
            db.execute("UPDATE uploads SET next_index = ?, bytes_appended = ?, updated_at = ?, "
                       "last_index = COALESCE(?, last_index), completed_at = COALESCE(?, "
                       "completed_at), sha256 = COALESCE(?, sha256) WHERE file_id = ?",
                       (index + 1, offset + size, now, last_index, now if completed else None,
                        sha256, file_id))

    def journal_bytes(self, file_id):
        """Bytes of the upload's journaled chunks."""
        with self._connection() as db:
            return db.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM journal "
                              "WHERE file_id = ?", (file_id,)).fetchone()[0]

    def journal(self, file_id):
        """[(offset, bytes)] of the upload's journaled chunks, in file order."""
        with self._connection() as db:
            return [(offset, bytes(data)) for offset, data in db.execute(
                "SELECT offset, data FROM journal WHERE file_id = ? ORDER BY offset",
                (file_id,))]

    def journaled_ids(self):
        with self._connection() as db:
            return [r[0] for r in db.execute("SELECT DISTINCT file_id FROM journal")]

    def clear_journal(self, file_id):
        with self._write() as db:
            db.execute("DELETE FROM journal WHERE file_id = ?", (file_id,))

    def rollback_to_length(self, file_id, length):
        """Forget the appended chunks that do not lie wholly within `length` bytes; returns
        the new (next_index, bytes_appended)."""
        with self._write() as db:
            next_index, appended = db.execute(
                "SELECT next_index, bytes_appended FROM uploads WHERE file_id = ?",
                (file_id,)).fetchone()
            row = db.execute("SELECT idx, offset FROM chunks WHERE file_id = ? AND idx < ? AND "
                             "offset + size > ? ORDER BY idx LIMIT 1",
                             (file_id, next_index, length)).fetchone()
            if row is None:
                return next_index, appended
            index, offset = row
            db.execute("DELETE FROM chunks WHERE file_id = ? AND idx >= ? AND idx < ?",
                       (file_id, index, next_index))
            db.execute("UPDATE uploads SET next_index = ?, bytes_appended = ?, last_index = "
                       "last_index, completed_at = NULL, sha256 = NULL WHERE file_id = ?",
                       (index, offset, file_id))
            return index, offset

    def forget_chunk(self, file_id, index):
        with self._write() as db:
            db.execute("DELETE FROM chunks WHERE file_id = ? AND idx = ?", (file_id, index))

    def set_last_index(self, file_id, index):
        with self._write() as db:
            db.execute("UPDATE uploads SET last_index = ?, updated_at = ? WHERE file_id = ?",
                       (index, time.time(), file_id))

    def set_completed(self, file_id):
        with self._write() as db:
            db.execute("UPDATE uploads SET completed_at = ? WHERE file_id = ?",
                       (time.time(), file_id))

    def set_sha256(self, file_id, completed_at, digest):
        """True when the upload that completed at `completed_at` took the digest."""
        with self._write() as db:
            return db.execute("UPDATE uploads SET sha256 = ? WHERE file_id = ? AND "
                              "completed_at = ? AND sha256 IS NULL",
                              (digest, file_id, completed_at)).rowcount == 1

    def close(self):
        self._group.close()
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    def completed_ids(self, since):
        with self._connection() as db:
            return [r[0] for r in db.execute(
                "SELECT file_id FROM uploads WHERE completed_at >= ? AND sha256 IS NOT NULL "
                "ORDER BY completed_at", (since,))]


# ---------------------------------------------------------------------------------------------
# A chunk written in place, and the uploads' state in memory
# ---------------------------------------------------------------------------------------------

class _TailWriter(TailWriter):
    """Chunk `index` of an upload written in place, after its consistent prefix, as the
    parser hands its bytes over (reserve_append; the steps are in the module docstring). It
    holds the upload's tail, not its lock: whoever else wants to append in order waits on
    `done`, set once the tail is free again."""

    def __init__(self, store, upload, index, is_last, mime_type, checksum, budgets, fd,
                 created):
        self.file_id = upload.file_id
        self.new = upload.created_at is None      # no row yet: the commit writes it
        self.ext = upload.ext                     # the file the bytes go into
        self.index = index
        self.offset = upload.bytes_appended       # where its bytes begin
        self.is_last = is_last
        self.mime_type = mime_type
        self.budgets = budgets                    # (the caller's, the store's)
        self.cancelled = False                    # set (under the lock) by delete
        self.done = threading.Event()
        self.written = 0
        self._store = store
        self.path = store.media_path(upload)
        self._checksum = checksum
        self._held = upload.bytes_held            # what the budgets count besides this chunk
        self._fd = fd
        self._created = created
        self._finished = False
        self._head = b"" if index == 0 and not store.allow_any_content else None
        self._digest = new_sha256() if checksum is not None else None     # the checksum's
        self.running_digest = store._running_digest(upload)    # the file's, with this chunk
        self._digests = [d for d in (self._digest, self.running_digest) if d is not None]
        self._hashed = 0                          # bytes of the chunk the digests have seen
        # A small chunk's bytes, kept for the journal until it outgrows it (then: fsync).
        self._journal = bytearray() if store._may_journal(is_last) else None
        # A chunk that may be recorded in its file (chunk records): the crc32 of its bytes,
        # until it outgrows RECORD_CHUNK_BYTES (None then, and for a chunk never recorded:
        # a new upload's, whose row must be synced, and the last one, which completes).
        self.crc = 0 if store.chunk_records and not self.new and not is_last else None
        self.records = None                       # the file's attribute, once this set it

    def write(self, view):
        with writing("receiving chunk %d" % self.index, undo=self.abort):
            if self._finished:
                raise ValueError("the chunk was committed or aborted already")
            count = len(view)
            check_budgets(self._held, self.written + count, self.budgets)
            if self._head is not None and len(self._head) < SIGNATURE_BYTES:
                self._head += bytes(view[:SIGNATURE_BYTES - len(self._head)])
                if len(self._head) == SIGNATURE_BYTES:   # as soon as the first bytes are in
                    check_chunk_bytes(0, self._head, None, None, False)
            localdisk.write_all(self._fd, view)
            self._store._crash.passed("streaming")
            if self.crc is not None:
                self.crc = (binascii.crc32(view, self.crc)
                            if self.written + count <= RECORD_CHUNK_BYTES else None)
            if self._hashed == self.written and self._hashed < INLINE_DIGEST_BYTES:
                inline = view[:INLINE_DIGEST_BYTES - self._hashed]
                for digest in self._digests:
                    digest.update(inline)
                self._hashed += len(inline)
            self.written += count
            if self._journal is not None:
                if self.written <= self._store.journal_chunk_bytes:
                    self._journal += view
                else:
                    self._journal = None
        return count

    def commit(self, size):
        """Durable (fsync, or the journal), checked, recorded: the ChunkResult. A refusal
        (checksum, a rule that changed meanwhile, a full disk) cuts the bytes off first."""
        with writing("storing chunk %d" % self.index, undo=self.abort):
            if self._finished or size != self.written:
                raise ValueError("commit(%d) of a chunk written with %d bytes%s" % (
                    size, self.written, ", already finished" if self._finished else ""))
            journal = bytes(self._journal) if self._journal is not None else None
            # A chunk that may be recorded in its file is synced later, under the lock, with
            # its record (sync_with_records); it was hashed whole as it arrived.
            sync_later = journal is None and self.crc is not None and not self._created
            if journal is None and not sync_later:      # not kept by the ledger: sync
                if self._hashed < self.written and self._digests:
                    self._sync_while_hashing_the_rest()
                else:
                    os.fsync(self._fd)
            # chunk 0's signature again: it may be shorter than SIGNATURE_BYTES (no _head:
            # no signature to check, so the rules are asked as if any content were allowed)
            check_chunk_bytes(self.index, self._head, self._digest and
                              self._digest.hexdigest(), self._checksum,
                              allow_any_content=self._head is None)
            if self._created:
                fsync_dir(self._store.root)     # the file's name must survive a power cut
            self._store._crash.passed("streamed")
            return self._store._commit_in_place(self, size, journal, sync_later)

    def _sync_while_hashing_the_rest(self):
        """fsync in a thread of its own while this one reads back the chunk's bytes past
        INLINE_DIGEST_BYTES (from the page cache: just written) into the digests. Both wait
        outside the GIL, so a large chunk's hash costs no time beyond its fsync's. Read
        through the writer's own descriptor, never the path: a delete meanwhile moved the
        file (and a new upload of the same id may be there now)."""
        sync = _FsyncInThread(self._fd)
        try:
            with self._reading() as f:
                f.seek(self.offset + self._hashed)
                for block in read_blocks(f, self.written - self._hashed,
                                         localdisk.COPY_BLOCK_BYTES):
                    for digest in self._digests:
                        digest.update(block)
                    self._hashed += len(block)
            if self._hashed < self.written:
                raise OSError("%s: the video file ended before chunk %d's bytes did"
                              % (self.file_id, self.index))
        finally:
            sync.wait()                           # and raises what fsync raised

    def sync_with_records(self, records):
        """Under the lock, for a chunk that commit() left unsynced: `records` (the value of
        the file's chunk records, this chunk's last; None: not recorded) set on the file,
        then one fsync for the bytes and the attribute together. Returns the records set, or
        None: the commit must be synced (also when the file refused them)."""
        if records is not None:
            try:
                os.setxattr(self._fd, RECORDS_XATTR, records)
                self.records = records
            except OSError as error:
                records = None
                if error.errno in NO_XATTR_ERRNOS and self._store.chunk_records:
                    self._store.chunk_records = False
                    log.info("%s: its files keep no extended attributes (%s): the ledger is "
                             "synced for every chunk", self._store.root, error.strerror)
        os.fsync(self._fd)
        return records

    def _reading(self):
        """The tail's file for reading, through the writer's descriptor (left open)."""
        return open(self._fd, "rb", buffering=0, closefd=False)

    def to_part_file(self):
        """The bytes written so far, copied into a part file (its path) and cut off here; the
        tail is freed. For a form whose fields after the file part change what the chunk is:
        put_chunk decides it then, as any chunk received into a part file."""
        path, f = self._store.new_part_file()
        try:
            # From the writer's own descriptor, never the path (see _sync_while_hashing_the_rest)
            with f, self._reading() as tail:
                localdisk.copy_from(tail, f.fileno(), self.written, self.offset, self.path)
        except BaseException:
            self._store.discard(path)
            self.abort()
            raise
        self.abort()
        return path

    def recorded(self):
        """Under the lock, right after the ledger's commit: the tail is the chunk's now."""
        self._finished = True
        os.close(self._fd)
        self._store._release(self)

    def abort(self):
        """Cut the bytes off (the tail is the writer's: no lock needed for that) and free the
        tail. Nothing after commit or a first abort."""
        if self._finished:
            return
        self._finished = True
        try:
            os.ftruncate(self._fd, self.offset)
            if self.records is not None:
                # The file's attribute records this chunk, and the fsync made it durable: a
                # power cut could bring both back. The records before it, durable again.
                os.setxattr(self._fd, RECORDS_XATTR, self.records[:-RECORD.size])
                os.fsync(self._fd)
        except OSError as error:
            log.warning("%s: could not cut chunk %d's bytes off (repair will): %s",
                        self.file_id, self.index, error)
        finally:
            os.close(self._fd)
            self._store._free_tail(self)


class _FsyncInThread:
    """os.fsync(fd) on a thread of its own; wait() joins it and raises what fsync raised."""

    def __init__(self, fd):
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(fd,), daemon=True,
                                        name="m1-fsync")
        self._thread.start()

    def _run(self, fd):
        try:
            os.fsync(fd)
        except BaseException as error:        # handed to the waiting thread
            self._error = error

    def wait(self):
        self._thread.join()
        if self._error is not None:
            raise self._error


_KEEP = object()      # _StateCache.put: leave the running digest as it is


class _StateCache:
    """The last UploadState (and journaled bytes, None: not known; the running sha256 of
    its assembled bytes, None: not known; the chunk records its file keeps since its last
    synced commit, None: not known) of the uploads used most recently, at most `capacity`
    of them. Its own lock keeps the dict whole; keeping it true to the ledger is the store's
    part (written under the upload's lock, after the commit)."""

    def __init__(self, capacity):
        self.capacity = capacity
        # fileId -> [UploadState, journaled, sha256 of its first bytes_appended bytes, records]
        self._entries = collections.OrderedDict()
        self._lock = threading.Lock()

    def upload(self, file_id):
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is None:
                return None
            self._entries.move_to_end(file_id)
            return entry[0]

    def journaled(self, file_id):
        with self._lock:
            entry = self._entries.get(file_id)
            return None if entry is None else entry[1]

    def digest(self, file_id):
        """The sha256 object of the upload's assembled bytes (never to be updated in place:
        copy it), or None when it is not known."""
        with self._lock:
            entry = self._entries.get(file_id)
            return None if entry is None else entry[2]

    def records(self, file_id):
        """The chunk records the upload's file keeps since its last synced commit (the
        attribute's value, RECORDS_MAGIC for none), or None when they are not known."""
        with self._lock:
            entry = self._entries.get(file_id)
            return None if entry is None else entry[3]

    def put(self, file_id, upload, journaled=None, digest=_KEEP, records=None):
        """The upload's state now; `journaled` and `records` None keep what was known,
        and `digest` left out keeps the running sha256 (the bytes did not change)."""
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is not None:
                entry[0] = upload
                if journaled is not None:
                    entry[1] = journaled
                if digest is not _KEEP:
                    entry[2] = digest
                if records is not None:
                    entry[3] = records
                self._entries.move_to_end(file_id)
                return
            self._entries[file_id] = [upload, journaled, None if digest is _KEEP else digest,
                                      records]
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def set_journaled(self, file_id, journaled):
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is not None:
                entry[1] = journaled

    def drop(self, file_id):
        with self._lock:
            self._entries.pop(file_id, None)

    def clear(self):
        with self._lock:
            self._entries.clear()


def _typed(upload, mime_type, ext):
    """The upload with this mime type and extension (its other fields as they are)."""
    return UploadState((upload.file_id, mime_type, ext, upload.next_index,
                        upload.bytes_appended, upload.last_index, upload.created_at,
                        upload.updated_at, upload.completed_at, upload.sha256),
                       upload.stashed, upload.stashed_bytes)


def _appended(upload, size, now, last_index):
    """The upload once its next chunk (`size` bytes, from temp/ or not) is appended at `now`:
    what record_append wrote, without reading it back."""
    index = upload.next_index
    stashed, stashed_bytes = upload.stashed, upload.stashed_bytes
    if stashed[:1] == [index]:
        stashed, stashed_bytes = stashed[1:], stashed_bytes - size
    row = (upload.file_id, upload.mime_type, upload.ext, index + 1, upload.bytes_appended + size,
           upload.last_index if last_index is None else last_index, upload.created_at, now,
           upload.completed_at, upload.sha256)
    return UploadState(row, stashed, stashed_bytes)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _read_records(fd, file_id):
    """The chunk records of an open video file ([] when it has none). A value this module
    did not write (its size, magic or count) is reported and read as none."""
    try:
        value = os.getxattr(fd, RECORDS_XATTR)
    except (AttributeError, OSError):         # no attribute, or none on this system
        return []
    count, rest = divmod(len(value) - len(RECORDS_MAGIC), RECORD.size)
    if not value.startswith(RECORDS_MAGIC) or rest or count > RECORDS_MAX:
        log.warning("repair: %s: its video file's chunk records are not this server's (%d "
                    "bytes); not used", file_id, len(value))
        return []
    records = [RECORD.unpack_from(value, len(RECORDS_MAGIC) + i * RECORD.size)
               for i in range(count)]
    if any(size > RECORD_CHUNK_BYTES for _, _, size, _ in records):
        log.warning("repair: %s: a chunk record names a chunk larger than any recorded; "
                    "not used", file_id)
        return []
    return records


def _chunk_file_index(name):
    stem, dot, suffix = name.partition(".")
    if dot and suffix == "chunk" and stem.isdigit():
        return int(stem)
    return None

