"""chunkstore.py - the storage contract on a local folder: numbered chunks in, one byte-exact
file per upload out.

ChunkStore implements storage.Store, whose docstring lists what every store guarantees and
the rules (storage.classify_chunk and its neighbours) it decides by. Here, on local disk:
  * The assembled file `<root>/<fileId>.<ext>` grows as contiguous chunks arrive, so it is
    there while the user records; a chunk that arrives early waits in
    `<root>/temp/<fileId>/<index>.chunk`.
  * A chunk is durable (fsync, or the ledger's commit) before `put_chunk` returns.
  * A crash between any two steps below loses no acknowledged chunk and leaves no torn or
    duplicated bytes: `repair()` (run at start-up) brings every upload back to its last
    consistent state.
  * The folder is handled as localdisk.py says: a full disk answers 507 and leaves nothing
    half-written (each step's undo is named below), links are never followed, and repair sets
    aside what it does not recognise instead of stopping.

What it does not do: HTTP, multipart parsing, or limits other than the upload's size. The
caller hands it a finished part file (written into `incoming_dir`) and a validated request.

The ledger is SQLite (`<root>/m1.sqlite3`, WAL, synchronous=FULL). It is both the metadata
store and the crash journal; its invariant is:

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

A write that fails before its step's commit (a full disk: ENOSPC, or SQLite's "database or
disk is full") is undone at once as repair would undo it after a crash: the tail after
bytes_appended is cut (steps 2-3), the renamed chunk file removed (stashed - stash_recorded).
The part file is removed in every case, so nothing of a refused chunk stays.

A small in-order chunk (at most --journal-chunk-size bytes) costs one fsync instead of two:
in step 2 its bytes are written but the file is not fsynced, and step 3's transaction also
keeps a copy of them in the `journal` table, so the ledger's commit is what makes the chunk
durable. Readers see the file as written (the page cache) at once. The journal is emptied,
in two steps, once the file is fsynced: when an upload's journal passes JOURNAL_FLUSH_BYTES,
when it completes, when a large chunk's append fsyncs the file anyway (in that chunk's own
transaction), and when the store closes: journal_synced (file fsynced; a crash here leaves
rows that repair writes again, the same bytes at the same offsets), then journal_cleared.
repair() writes every journal row back at its offset before anything else, so a power cut
that lost the file's unsynced writes loses no acknowledged chunk. Each row is one chunk, so
the journal of an upload holds at most JOURNAL_FLUSH_BYTES + one chunk.

A chunk sent with status=completed records the last index in the same transaction as the
chunk (step 3 / stash_recorded). A new file or temp folder has its parent directory fsynced,
so its name survives a power cut as well as its bytes. If the disk still loses fsynced bytes
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

import contextlib
import logging
import os
import queue
import re
import sqlite3
import stat
import threading
import time

import localdisk
from localdisk import FileMedia, UnsafePath, UploadFolder, fsync_dir, open_file, writing
from storage import (DUPLICATE, IN_ORDER, Capabilities, ChunkResult, Store, StoreError,
                     UploadState, Workers, check_chunk_request, check_derivative_name,
                     sha256_file, valid_file_id)

log = logging.getLogger("m1server.store")

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

SCHEMA_VERSION = 2                       # 2: the journal table (small chunks' bytes)
LEDGER_NAME = "m1.sqlite3"
DELETING_DIR_NAME = ".deleting"          # inside temp/: uploads being deleted (the intent)
DERIVED_DIR_NAME = "derived"             # derivatives of processing, one folder per upload
LEDGER_BUSY_TIMEOUT_S = 30.0
COPIES_WHILE_STORING = 2                 # a chunk's part file and its copy in the video
# Small in-order chunks are journaled (see the docstring). The journal writes a chunk's bytes
# twice more (the WAL, then the ledger file at a checkpoint), which pays only while the fsync
# saved costs more than those copies: measured, 16 KiB chunks gained 1.2x; 250 KiB chunks from
# 200 recorders went from a p99 of 8 ms to 1.5 s (checkpoints stall every writer).
DEFAULT_JOURNAL_CHUNK_BYTES = 64 << 10   # in-order chunks up to this size: one fsync (journal)
MAX_JOURNAL_CHUNK_BYTES = 256 << 10      # the most --journal-chunk-size may say
JOURNAL_FLUSH_BYTES = 1 << 20            # an upload's journaled bytes past this: sync the file
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
                 journal_chunk_bytes=DEFAULT_JOURNAL_CHUNK_BYTES, min_free_bytes=None):
        Store.__init__(self, UploadFolder(root, min_free_bytes, COPIES_WHILE_STORING),
                       allow_any_content, max_upload_bytes, crash_at)
        self.journal_chunk_bytes = journal_chunk_bytes
        self.deleting_dir = os.path.join(self.temp_dir, DELETING_DIR_NAME)
        self.derived_dir = os.path.join(self.root, DERIVED_DIR_NAME)
        self.folder.prepare((self.temp_dir, self.deleting_dir))
        self._ledger = _Ledger(os.path.join(self.root, LEDGER_NAME))
        # Completing must take constant time whatever the length (SPEC section 1): the file's
        # sha256 is computed off the request path, and status shows it once it is known.
        self._hasher = Workers("m1-hasher", 1, self._hash_in_background)

    # -- receiving ------------------------------------------------------------------------

    def put_chunk(self, file_id, index, part_path, size, is_last, mime_type=None,
                  checksum=None, budget=None):
        """Store chunk `index` of `file_id` from `part_path` (consumed: moved or removed).

        Returns a ChunkResult once the chunk is durable; raises StoreError when refused.
        """
        try:
            check_chunk_request(file_id, index, part_path, mime_type, checksum,
                                self.allow_any_content)
            self._crash.passed("received")
            with self._locks.held(file_id):
                return self._put_locked(file_id, index, part_path, size, is_last, mime_type,
                                        budget)
        finally:
            self.discard(part_path)   # no-op when the chunk was moved or already removed

    def _put_locked(self, file_id, index, part_path, size, is_last, mime_type, budget):
        """Read the upload once, decide by the contract's rules, then take the steps."""
        upload = self._ledger.load(file_id) or UploadState.unknown(file_id)
        kind, ext = self.decide(upload, index, self._stored_as(upload, index, part_path, size),
                                size, is_last, mime_type, budget)
        if kind == DUPLICATE:
            if is_last and upload.last_index is None:
                self._ledger.set_last_index(file_id, index)
        else:
            upload = self._record_type(upload, mime_type, ext)
            # The last index is recorded in the same transaction as the chunk itself, so no
            # crash can leave a stored last chunk that the ledger does not know is the last.
            last = index if is_last else None
            if kind == IN_ORDER:
                small = 0 < self.journal_chunk_bytes and size <= self.journal_chunk_bytes
                self._append(upload, index, part_path, size, last, journal=small)
            else:
                self._stash(file_id, index, part_path, size, last)
        upload = self._append_stashed_run(file_id)
        if upload.completed and upload.completed_at is None:
            upload = self._complete(upload)
        if kind != DUPLICATE:
            self._emit("chunk", file_id, index=index, size=size,
                       bytesReceived=upload.bytes_appended, nextChunkIndex=upload.next_index)
        return ChunkResult(file_id, index, kind == DUPLICATE, upload)

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
        return self._ledger.load(upload.file_id)

    # -- the steps (see the module docstring for why this order is crash-safe) --------------

    def _append(self, upload, index, source_path, size, last_index=None, journal=False):
        """Append `source_path` after the upload's consistent prefix, durable, then record it.
        journal: a small chunk, written without an fsync of the file; its bytes go into the
        ledger's transaction instead (one fsync in all, see the module docstring). A failure
        before the record cuts the tail back to the consistent prefix."""
        offset = upload.bytes_appended
        data = None
        if journal:
            with open(source_path, "rb") as f:
                data = f.read(size)
        path = self.media_path(upload)
        created = not os.path.lexists(path)
        fd = open_file(path, os.O_WRONLY | os.O_CREAT, "the upload's video file")
        try:
            with writing("appending chunk %d" % index, undo=lambda: os.ftruncate(fd, offset)):
                os.ftruncate(fd, offset)     # drop a torn tail an earlier failed write left
                os.lseek(fd, offset, os.SEEK_SET)
                if data is None:
                    localdisk.copy_into(source_path, fd, size)
                    os.fsync(fd)
                else:
                    localdisk.write_all(fd, memoryview(data))
                if created:
                    fsync_dir(self.root)    # the file's name must survive a power cut too
                self._crash.passed("appended")
                journaled = self._ledger.record_append(upload.file_id, index, size, offset,
                                                       last_index, journal=data)
        finally:
            os.close(fd)
        self._crash.passed("append_recorded")
        os.remove(source_path)
        self._crash.passed("cleaned")
        if journaled > JOURNAL_FLUSH_BYTES:
            self._sync_journaled(upload)

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
        self._crash.passed("journal_cleared")

    def _stash(self, file_id, index, part_path, size, last_index=None):
        """Keep an early chunk in temp/<id>/ until the chunks before it arrive. A failure
        before the record removes the renamed file (it has no row)."""
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

    def _append_stashed_run(self, file_id):
        """Append every stashed chunk that is now contiguous; return the upload afterwards. A
        full disk stops the run: those chunks stay, durable, in temp/ for the next try."""
        while True:
            upload = self._ledger.load(file_id)
            if not upload.stashed or upload.stashed[0] != upload.next_index:
                return upload
            index = upload.next_index
            path = self._stash_path(file_id, index)
            try:
                self._append(upload, index, path, os.lstat(path).st_size)
            except StoreError as error:
                if error.status != 507:
                    raise
                log.warning("%s: chunk %d waits in temp/ for room on the disk", file_id,
                            index)
                return upload

    def _complete(self, upload):
        self._sync_journaled(upload)    # the whole file on disk before anyone reads it back
        self._ledger.set_completed(upload.file_id)
        self.folder.remove_tree(os.path.join(self.temp_dir, upload.file_id))
        self._hasher.submit(upload.file_id)
        log.info("upload %s completed: %d chunks, %d bytes", upload.file_id,
                 upload.next_index, upload.bytes_appended)
        return self._ledger.load(upload.file_id)

    # -- reading --------------------------------------------------------------------------

    def status(self, file_id):
        """The UploadState of `file_id`, or None when the store has never seen it."""
        return self._ledger.load(file_id)

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
            upload = self._ledger.load(file_id)
            self._emit("completed", file_id, size=upload.bytes_appended, sha256=digest,
                       ext=upload.ext, mimeType=upload.mime_type)

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
        received arrives after the deletion and starts afresh.
        """
        with self._locks.held(file_id):
            upload = self._ledger.load(file_id)
            if upload is None or (unless is not None and unless(upload)):
                return False
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
        self._clear_strays(self.temp_dir, known, (localdisk.INCOMING_DIR_NAME,
                                                  DELETING_DIR_NAME))
        if os.path.isdir(self.derived_dir):
            self._clear_strays(self.derived_dir, known)
        return mended

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
        mended = self._repair_length(upload, path)
        upload = self._ledger.load(file_id)
        mended = self._repair_stash(upload) or mended
        before = upload.next_index
        upload = self._append_stashed_run(file_id)
        mended = mended or upload.next_index != before
        if upload.completed:
            if upload.completed_at is None:
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
                          min_free_bytes=self.folder.min_free_bytes)

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


class _Ledger:
    """The uploads and chunks tables. Every write is one committed transaction (fsynced)."""

    def __init__(self, path):
        self.path = path
        self._pool = queue.LifoQueue()
        self._write_lock = threading.Lock()
        with self._connection() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError("%s has schema %d; this m1server knows up to %d"
                                   % (path, version, SCHEMA_VERSION))
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            db.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)

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

    @contextlib.contextmanager
    def _write(self):
        # Writers queue on a Python lock rather than on SQLite's busy handler, which sleeps
        # in steps of up to 100 ms instead of waking when the lock is free (measured: with
        # 200 recorders, p99 chunk latency went to seconds).
        with self._write_lock, self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed (a full disk) may leave the transaction open: a
                # connection goes back to the pool only with none.
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

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

    def record_append(self, file_id, index, size, offset, last_index=None, journal=None):
        """One transaction: the chunk's offset and the upload's new consistent length (and,
        for the last chunk, that it is the last). With `journal` (the chunk's bytes, whose
        file was not fsynced) they are kept in the journal; without, the file was fsynced, so
        the upload's journal is emptied. Returns the bytes the upload's journal holds."""
        with self._write() as db:
            if journal is None:
                db.execute("DELETE FROM journal WHERE file_id = ?", (file_id,))
            else:
                db.execute("INSERT INTO journal (file_id, idx, offset, data) VALUES "
                           "(?, ?, ?, ?)", (file_id, index, offset, sqlite3.Binary(journal)))
            # (no UPSERT: SQLite before 3.24 still ships on embedded systems)
            moved = db.execute("UPDATE chunks SET offset = ? WHERE file_id = ? AND idx = ?",
                               (offset, file_id, index)).rowcount
            if not moved:
                db.execute("INSERT INTO chunks (file_id, idx, size, offset) VALUES (?, ?, ?, ?)",
                           (file_id, index, size, offset))
            db.execute("UPDATE uploads SET next_index = ?, bytes_appended = ?, updated_at = ?, "
                       "last_index = COALESCE(?, last_index) WHERE file_id = ?",
                       (index + 1, offset + size, time.time(), last_index, file_id))
            if journal is None:
                return 0
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
# Helpers
# ---------------------------------------------------------------------------------------------

def _chunk_file_index(name):
    stem, dot, suffix = name.partition(".")
    if dot and suffix == "chunk" and stem.isdigit():
        return int(stem)
    return None

