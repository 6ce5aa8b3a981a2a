"""chunkstore.py - the file-append module: numbered chunks in, one byte-exact file per upload out.

What it guarantees (SPEC section 1, "Chunk semantics"):
  * The assembled file `<root>/<fileId>.<ext>` is always chunk 0 + chunk 1 + ... each exactly
    once, whatever order the chunks arrive in and however often each is sent.
  * Contiguous chunks are appended as soon as they arrive, so the file grows while the user
    records; a chunk that arrives early waits in `<root>/temp/<fileId>/<index>.chunk`.
  * A chunk is durable (fsync) before `put_chunk` returns, so the caller may answer 200.
  * A crash between any two steps loses no acknowledged chunk and leaves no torn or duplicated
    bytes: `repair()` (run at start-up) brings every upload back to its last consistent state.
  * One lock per fileId serialises the decisions and appends of one upload; different uploads
    never wait for each other (apart from SQLite's own short write lock).

What it does not do: HTTP, multipart parsing, or limits other than the upload's total size.
The caller hands it a finished part file (written into `incoming_dir`) and a validated request.

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

Feature modules may keep their own tables in the ledger file (ledger_read/ledger_write); they
never touch the uploads and chunks tables, so the invariant above stays the store's alone. A
feature that needs a second store (tus's partial uploads) asks for a `sibling`.
Storage backends (s3store.py has the same interface) serve media through `open_media` and give
processing a local file (`media_file`) and a place for derivatives (`put_derivative`,
`open_derivative`). These only read the assembled file or write under derived/<fileId>/, which
`delete` and `repair` already handle, so the argument above is unchanged.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import re
import shutil
import sqlite3
import threading
import time

from apierror import ApiError

log = logging.getLogger("m1server.store")

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

SCHEMA_VERSION = 2                       # 2: the journal table (small chunks' bytes)
LEDGER_NAME = "m1.sqlite3"
TEMP_DIR_NAME = "temp"
INCOMING_DIR_NAME = ".incoming"          # inside temp/: part files being received
DELETING_DIR_NAME = ".deleting"          # inside temp/: uploads being deleted (the intent)
DERIVED_DIR_NAME = "derived"             # derivatives of processing, one folder per upload
FILE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")
MAX_CHUNK_INDEX = 1000000                # 11.5 days of 1 s MediaRecorder slices
MAX_MISSING_LISTED = 1000                # longest missingChunks list a reply carries
COPY_BLOCK_BYTES = 1 << 20               # buffer for copies when the kernel cannot copy
LEDGER_BUSY_TIMEOUT_S = 30.0
# Small in-order chunks are journaled (see the docstring). The journal writes a chunk's bytes
# twice more (the WAL, then the ledger file at a checkpoint), which pays only while the fsync
# saved costs more than those copies: measured, 16 KiB chunks gained 1.2x; 250 KiB chunks from
# 200 recorders went from a p99 of 8 ms to 1.5 s (checkpoints stall every writer).
DEFAULT_JOURNAL_CHUNK_BYTES = 64 << 10   # in-order chunks up to this size: one fsync (journal)
MAX_JOURNAL_CHUNK_BYTES = 256 << 10      # the most --journal-chunk-size may say
JOURNAL_FLUSH_BYTES = 1 << 20            # an upload's journaled bytes past this: sync the file

# Chunk 0 must start with one of these (SPEC section 1): what MediaRecorder writes.
MEDIA_SIGNATURES = (
    (0, b"\x1a\x45\xdf\xa3"),            # EBML: WebM / Matroska
    (4, b"ftyp"),                        # ISO BMFF: MP4 / MOV (Safari)
    (0, b"OggS"),                        # Ogg
)
SIGNATURE_BYTES = 8

# mimeType (its type/subtype, parameters ignored) -> extension of the assembled file.
EXTENSIONS = {
    "video/webm": "webm", "audio/webm": "webm",
    "video/mp4": "mp4", "audio/mp4": "mp4",
    "video/x-matroska": "mkv", "audio/x-matroska": "mkv",
    "video/quicktime": "mov",
    "video/ogg": "ogg", "audio/ogg": "ogg",
}
DEFAULT_EXTENSION = "webm"
MEDIA_TYPES = {"webm": "video/webm", "mp4": "video/mp4", "mkv": "video/x-matroska",
               "mov": "video/quicktime", "ogg": "video/ogg"}
MIME_TYPE_PATTERN = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*\Z")
MAX_MIME_TYPE_CHARS = 255


class StoreError(ApiError):
    """A refusal of the store (the HTTP edge turns it into the JSON error envelope)."""


# ---------------------------------------------------------------------------------------------
# Public helpers used by the HTTP layer
# ---------------------------------------------------------------------------------------------

def valid_file_id(file_id):
    return isinstance(file_id, str) and FILE_ID_PATTERN.match(file_id) is not None


def extension_for(mime_type):
    """The file extension a MediaRecorder mimeType asks for; StoreError if we do not know it."""
    if mime_type is None:
        return None
    base = mime_type.split(";", 1)[0].strip().lower()
    if len(mime_type) > MAX_MIME_TYPE_CHARS or not MIME_TYPE_PATTERN.match(base):
        raise StoreError(400, "invalid_mime_type", "mimeType is not a media type: %r"
                         % mime_type[:80])
    if base not in EXTENSIONS:
        raise StoreError(415, "unsupported_media_type",
                         "mimeType %s is not a video type this server stores" % base)
    return EXTENSIONS[base]


def check_chunk_request(file_id, index, part_path, mime_type, checksum, allow_any_content,
                        sha256=None):
    """What every store checks before it stores a chunk (StoreError otherwise): a valid id
    and index, a known mimeType, a media signature on chunk 0, and the checksum field.
    `sha256` is the chunk's digest when the caller has it already (else computed if needed)."""
    if not valid_file_id(file_id):
        raise StoreError(400, "invalid_file_id", "fileId must match [A-Za-z0-9_-]{1,128}")
    if not 0 <= index <= MAX_CHUNK_INDEX:
        raise StoreError(400, "invalid_chunk_index", "chunkIndex must be 0..%d" % MAX_CHUNK_INDEX)
    extension_for(mime_type)
    if index == 0 and not allow_any_content:
        with open(part_path, "rb") as f:
            if not has_media_signature(f.read(SIGNATURE_BYTES)):
                raise StoreError(415, "unsupported_media_type",
                                 "chunk 0 does not start with a WebM, MP4 or Ogg signature")
    if checksum is not None:
        algorithm, _, expected = checksum.partition(":")
        if algorithm != "sha256" or not re.match(r"[0-9a-fA-F]{64}\Z", expected):
            raise StoreError(400, "invalid_checksum", "checksum must be sha256:<64 hex>")
        if (sha256 or _sha256_file(part_path)) != expected.lower():
            raise StoreError(400, "checksum_mismatch",
                             "the chunk's sha256 differs from the checksum field")


def has_media_signature(head):
    return any(head[at:at + len(magic)] == magic for at, magic in MEDIA_SIGNATURES)


class ChunkResult:
    """What one accepted chunk did to its upload (the fields of the seed's 200 reply)."""

    def __init__(self, file_id, index, duplicate, upload):
        self.file_id = file_id
        self.index = index
        self.duplicate = duplicate
        self.upload = upload          # UploadState after the chunk


class UploadState:
    """A snapshot of one upload, read from the ledger."""

    def __init__(self, row, stashed):
        (self.file_id, self.mime_type, self.ext, self.next_index, self.bytes_appended,
         self.last_index, self.created_at, self.updated_at, self.completed_at,
         self.sha256) = row
        self.stashed = stashed        # sorted indices waiting in temp/, all >= next_index

    @property
    def completed(self):
        return self.last_index is not None and self.next_index == self.last_index + 1

    @property
    def chunks_received(self):
        return self.next_index + len(self.stashed)

    def missing_chunks(self):
        """Indices not yet received below the last one; [] while the last index is unknown."""
        if self.last_index is None:
            return []
        waiting = set(self.stashed)
        missing = []
        for index in range(self.next_index, self.last_index + 1):
            if index not in waiting:
                missing.append(index)
                if len(missing) == MAX_MISSING_LISTED:
                    break
        return missing


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------

class EventSource:
    """Listeners of a source of events: ChunkStore here, S3Store in s3store.py, processing's
    Processor. A source sets self._listeners = [] in its __init__."""

    def add_listener(self, listener):
        """Call `listener(event)` after each change, with event a dict such as
        {"type": "chunk", "fileId": ..., "index": 3, "size": ..., "bytesReceived": ...} or
        {"type": "completed", "fileId": ..., "size": ..., "sha256": ..., "ext": ...} or
        {"type": "deleted", "fileId": ..., "reason": "requested"|"expired", "completed": bool}.
        "chunk" events of one upload come in the order the chunks were stored (they are sent
        under the upload's lock); "completed" follows once the file's sha256 is known.
        Listeners must return at once (queue the work); an exception is logged and ignored."""
        self._listeners.append(listener)

    def _emit(self, event_type, file_id, **data):
        event = dict(data, type=event_type, fileId=file_id)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed on %s", event_type)


class ChunkStore(EventSource):
    """Chunks of many uploads into one file each, crash-safe. Thread-safe."""

    shared = False       # one server owns the folder (m1.lock): every change is its own

    def __init__(self, root, allow_any_content=False, max_upload_bytes=None, crash_at=None,
                 journal_chunk_bytes=DEFAULT_JOURNAL_CHUNK_BYTES):
        self.root = os.path.abspath(root)
        self.journal_chunk_bytes = journal_chunk_bytes
        self.temp_dir = os.path.join(self.root, TEMP_DIR_NAME)
        self.incoming_dir = os.path.join(self.temp_dir, INCOMING_DIR_NAME)
        self.deleting_dir = os.path.join(self.temp_dir, DELETING_DIR_NAME)
        self.derived_dir = os.path.join(self.root, DERIVED_DIR_NAME)
        self.allow_any_content = allow_any_content
        self.max_upload_bytes = max_upload_bytes
        self._crash = _CrashPoint(crash_at)
        self._locks = _KeyedLocks()
        for path in (self.root, self.temp_dir, self.incoming_dir, self.deleting_dir):
            os.makedirs(path, exist_ok=True)
        self._ledger = _Ledger(os.path.join(self.root, LEDGER_NAME))
        self._listeners = []
        self._hasher = _BackgroundHasher(self)

    # -- receiving ------------------------------------------------------------------------

    def new_part_file(self):
        """A fresh file in incoming_dir for the parser to stream one chunk into."""
        path = os.path.join(self.incoming_dir, os.urandom(16).hex() + ".part")
        return path, open(path, "w+b")

    def discard(self, path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    def put_chunk(self, file_id, index, part_path, size, is_last, mime_type=None,
                  checksum=None):
        """Store chunk `index` of `file_id` from `part_path` (consumed: moved or removed).

        Returns a ChunkResult once the chunk is durable; raises StoreError when refused.
        """
        try:
            self._check_request(file_id, index, part_path, mime_type, checksum)
            self._crash.passed("received")
            with self._locks.held(file_id):
                return self._put_locked(file_id, index, part_path, size, is_last, mime_type)
        finally:
            self.discard(part_path)   # no-op when the chunk was moved or already removed

    def _check_request(self, file_id, index, part_path, mime_type, checksum):
        check_chunk_request(file_id, index, part_path, mime_type, checksum,
                            self.allow_any_content)

    def _put_locked(self, file_id, index, part_path, size, is_last, mime_type):
        upload = self._ledger.load(file_id)
        known_size = self._ledger.chunk_size(file_id, index) if upload else None
        duplicate = known_size is not None
        if duplicate and not self._same_bytes(upload, index, known_size, part_path, size):
            raise StoreError(409, "chunk_conflict",
                             "chunk %d was already received with other bytes" % index)
        self._check_completion(upload, index, is_last)
        ext = self._check_mime_type(upload, mime_type)
        if not duplicate:
            self._check_upload_size(upload, size)
            if upload is None:
                self._ledger.create(file_id, mime_type, ext)
                upload = self._ledger.load(file_id)
            elif upload.mime_type is None and mime_type is not None:
                self._ledger.set_mime_type(file_id, mime_type, ext)
                upload = self._ledger.load(file_id)
            # The last index is recorded in the same transaction as the chunk itself, so no
            # crash can leave a stored last chunk that the ledger does not know is the last.
            last = index if is_last else None
            if index == upload.next_index:
                small = 0 < self.journal_chunk_bytes and size <= self.journal_chunk_bytes
                self._append(upload, index, part_path, size, last, journal=small)
            else:
                self._stash(file_id, index, part_path, size, last)
        elif is_last and upload.last_index is None:
            self._ledger.set_last_index(file_id, index)
        upload = self._append_stashed_run(file_id)
        if upload.completed and upload.completed_at is None:
            upload = self._complete(upload)
        if not duplicate:
            self._emit("chunk", file_id, index=index, size=size,
                       bytesReceived=upload.bytes_appended, nextChunkIndex=upload.next_index)
        return ChunkResult(file_id, index, duplicate, upload)

    # -- decisions ------------------------------------------------------------------------

    def _check_completion(self, upload, index, is_last):
        last = upload.last_index if upload else None
        if last is not None and index > last:
            raise StoreError(409, "completion_conflict",
                             "chunk %d is past the last chunk %d" % (index, last))
        if is_last and last is not None and index != last:
            raise StoreError(409, "completion_conflict",
                             "the last chunk is already %d, not %d" % (last, index))
        if is_last and upload and upload.stashed and upload.stashed[-1] > index:
            raise StoreError(409, "completion_conflict",
                             "chunk %d cannot be the last: chunk %d was received"
                             % (index, upload.stashed[-1]))

    def _check_mime_type(self, upload, mime_type):
        wanted = extension_for(mime_type)
        if upload is None:
            return wanted or DEFAULT_EXTENSION
        if wanted is None or wanted == upload.ext:
            return upload.ext
        if upload.mime_type is None and upload.next_index == 0:
            return wanted                # nothing assembled yet: the first type given wins
        raise StoreError(409, "mime_type_conflict",
                         "upload is %s, this chunk says %s" % (upload.ext, mime_type))

    def _check_upload_size(self, upload, size):
        if self.max_upload_bytes is None:
            return
        so_far = 0 if upload is None else upload.bytes_appended + self._ledger.stashed_bytes(
            upload.file_id)
        if so_far + size > self.max_upload_bytes:
            raise StoreError(413, "upload_too_large",
                             "upload would be %d bytes; the limit is %d"
                             % (so_far + size, self.max_upload_bytes))

    def _same_bytes(self, upload, index, known_size, part_path, size):
        if known_size != size:
            return False
        if index < upload.next_index:
            offset = self._ledger.chunk_offset(upload.file_id, index)
            return _same_region(self.media_path(upload), offset, part_path, size)
        return _same_region(self._stash_path(upload.file_id, index), 0, part_path, size)

    # -- the steps (see the module docstring for why this order is crash-safe) --------------

    def _append(self, upload, index, source_path, size, last_index=None, journal=False):
        """Append `source_path` after the upload's consistent prefix, durable, then record it.
        journal: a small chunk, written without an fsync of the file; its bytes go into the
        ledger's transaction instead (one fsync in all, see the module docstring)."""
        offset = upload.bytes_appended
        data = None
        if journal:
            with open(source_path, "rb") as f:
                data = f.read(size)
        path = self.media_path(upload)
        created = not os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | _O_BINARY, 0o644)
        try:
            os.ftruncate(fd, offset)     # drop a torn tail an earlier failed write left
            os.lseek(fd, offset, os.SEEK_SET)
            if data is None:
                _copy_into(source_path, fd, size)
                os.fsync(fd)
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.root)        # the file's name must survive a power cut too
        self._crash.passed("appended")
        journaled = self._ledger.record_append(upload.file_id, index, size, offset, last_index,
                                               journal=data)
        self._crash.passed("append_recorded")
        os.remove(source_path)
        self._crash.passed("cleaned")
        if journaled > JOURNAL_FLUSH_BYTES:
            self._sync_journaled(upload)

    def _sync_journaled(self, upload):
        """fsync the file, then forget its journal (both steps may be repeated)."""
        path = self.media_path(upload)
        if os.path.exists(path):
            fd = os.open(path, os.O_RDONLY | _O_BINARY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._crash.passed("journal_synced")
        self._ledger.clear_journal(upload.file_id)
        self._crash.passed("journal_cleared")

    def _stash(self, file_id, index, part_path, size, last_index=None):
        """Keep an early chunk in temp/<id>/ until the chunks before it arrive."""
        with open(part_path, "rb+") as f:
            os.fsync(f.fileno())
        folder = os.path.join(self.temp_dir, file_id)
        if not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
            fsync_dir(self.temp_dir)    # the folder's name must survive a power cut too
        os.replace(part_path, self._stash_path(file_id, index))
        fsync_dir(folder)
        self._crash.passed("stashed")
        self._ledger.record_stash(file_id, index, size, last_index)
        self._crash.passed("stash_recorded")

    def _append_stashed_run(self, file_id):
        """Append every stashed chunk that is now contiguous; return the upload afterwards."""
        while True:
            upload = self._ledger.load(file_id)
            if not upload.stashed or upload.stashed[0] != upload.next_index:
                return upload
            index = upload.next_index
            path = self._stash_path(file_id, index)
            self._append(upload, index, path, os.path.getsize(path))

    def _complete(self, upload):
        self._sync_journaled(upload)    # the whole file on disk before anyone reads it back
        self._ledger.set_completed(upload.file_id)
        shutil.rmtree(os.path.join(self.temp_dir, upload.file_id), ignore_errors=True)
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

    def record_sha256(self, file_id, completed_at, digest):
        """Store the digest of the upload that completed at `completed_at` (not of a newer
        upload that took its id after a deletion)."""
        # Under the upload's lock, like the chunk events: the hasher is handed the upload
        # before the last chunk's event is sent, and "completed" must not overtake it.
        with self._locks.held(file_id):
            if not self._ledger.set_sha256(file_id, completed_at, digest):
                return
            upload = self._ledger.load(file_id)
            self._emit("completed", file_id, size=upload.bytes_appended, sha256=digest,
                       ext=upload.ext, mimeType=upload.mime_type)

    # -- listing, deletion, retention -------------------------------------------------------

    def list_uploads(self, limit, after=None):
        """Up to `limit` uploads, newest first, after the (created_at, file_id) cursor `after`.
        Keyset pagination: uploads created meanwhile never shift the pages that follow."""
        uploads = (self._ledger.load(file_id) for file_id in self._ledger.page(limit, after))
        return [upload for upload in uploads if upload is not None]   # deleted meanwhile

    def counts(self):
        """(uploads in progress, uploads completed)."""
        return self._ledger.counts()

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
            trash = os.path.join(self.deleting_dir, "%s-%r-%s" % (
                file_id, upload.created_at, os.urandom(8).hex()))
            os.makedirs(trash)
            fsync_dir(self.deleting_dir)
            for name, path in self._traces(upload):
                if os.path.lexists(path):
                    os.replace(path, os.path.join(trash, name))
            fsync_dir(trash)
            self._ledger.delete(file_id)
            shutil.rmtree(trash, ignore_errors=True)
        log.info("upload %s deleted", file_id)
        self._emit("deleted", file_id, reason=reason, completed=upload.completed)
        return True

    def _traces(self, upload):
        """(name, path) of everything on disk that belongs to `upload`."""
        return (("media", self.media_path(upload)),
                ("temp", os.path.join(self.temp_dir, upload.file_id)),
                ("derived", os.path.join(self.derived_dir, upload.file_id)))

    def _finish_deletion(self, name):
        """repair(): a deletion cut short. The folder name says which upload (id and creation
        time), so a newer upload with the same id is never touched."""
        file_id, created_at = name.split("-")[0:-2], name.split("-")[-2]
        file_id = "-".join(file_id)
        upload = self._ledger.load(file_id)
        if upload is not None and repr(upload.created_at) == created_at:
            log.warning("repair: finishing the deletion of %r", file_id)
            for _, path in self._traces(upload):      # what step (1) had not moved yet
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                elif os.path.lexists(path):
                    os.remove(path)
            self._ledger.delete(file_id)
        shutil.rmtree(os.path.join(self.deleting_dir, name), ignore_errors=True)

    def expired(self, now, incomplete_ttl=None, retention=None):
        """Ids of uploads idle and incomplete for longer than `incomplete_ttl` seconds, and of
        completed uploads older than `retention` seconds (None: keep them)."""
        return self._ledger.expired(*self._cutoffs(now, incomplete_ttl, retention))

    @staticmethod
    def _cutoffs(now, incomplete_ttl, retention):
        return (None if incomplete_ttl is None else now - incomplete_ttl,
                None if retention is None else now - retention)

    def sweep(self, incomplete_ttl=None, retention=None, now=None):
        """Delete what `expired` names; returns the deleted ids (each one logged)."""
        deleted = []
        now = time.time() if now is None else now

        def revived(upload):       # a chunk arrived since the list was read: keep it
            return upload.file_id not in self._ledger.expired_among(
                [upload.file_id], *self._cutoffs(now, incomplete_ttl, retention))

        for file_id in self.expired(now, incomplete_ttl, retention):
            if self.delete(file_id, unless=revived, reason="expired"):
                log.info("retention: removed %s", file_id)
                deleted.append(file_id)
        return deleted

    # -- start-up repair ------------------------------------------------------------------

    def repair(self):
        """Bring every upload back to its last consistent state after a crash; returns a count
        of the uploads it had to mend. Runs before the server accepts connections."""
        mended = 0
        for name in os.listdir(self.incoming_dir):
            self.discard(os.path.join(self.incoming_dir, name))   # never acknowledged
        for name in os.listdir(self.deleting_dir):                # a deletion cut short
            self._finish_deletion(name)
            mended += 1
        known = set()
        for file_id in self._ledger.all_ids():
            known.add(file_id)
            with self._locks.held(file_id):
                if self._repair_upload(file_id):
                    mended += 1
        for name in os.listdir(self.temp_dir):
            if name not in (INCOMING_DIR_NAME, DELETING_DIR_NAME) and name not in known:
                # Not a fileId (no dot in those): work files a crash left, e.g. processing's.
                what = "temp chunks of unknown upload" if valid_file_id(name) else "leftover"
                log.warning("repair: removing %s %r", what, name)
                shutil.rmtree(os.path.join(self.temp_dir, name), ignore_errors=True)
        if os.path.isdir(self.derived_dir):
            for name in os.listdir(self.derived_dir):
                if name not in known:
                    log.warning("repair: removing derivatives of unknown upload %r", name)
                    shutil.rmtree(os.path.join(self.derived_dir, name), ignore_errors=True)
        return mended

    def _repair_upload(self, file_id):
        upload = self._ledger.load(file_id)
        path = self.media_path(upload)
        mended = self._replay_journal(upload, path)
        actual = os.path.getsize(path) if os.path.exists(path) else 0
        if actual > upload.bytes_appended:
            log.warning("repair: %s: cutting %d torn bytes after %d", file_id,
                        actual - upload.bytes_appended, upload.bytes_appended)
            with open(path, "r+b") as f:
                f.truncate(upload.bytes_appended)
                os.fsync(f.fileno())
            mended = True
        elif actual < upload.bytes_appended:
            # The disk lost bytes it had fsynced (or an old backup was restored). Go back to
            # the whole chunks the file still holds, so the client resends the rest; never
            # leave a hole the next append would fill with zeros.
            index, offset = self._ledger.rollback_to_length(file_id, actual)
            log.error("repair: %s: file has %d bytes but the ledger said %d; chunks from %d "
                      "on must be sent again", file_id, actual, upload.bytes_appended, index)
            with open(path, "r+b") if os.path.exists(path) else open(path, "wb") as f:
                f.truncate(offset)
                os.fsync(f.fileno())
            upload = self._ledger.load(file_id)
            mended = True
        folder = os.path.join(self.temp_dir, file_id)
        on_disk = os.listdir(folder) if os.path.isdir(folder) else []
        stashed = set(upload.stashed)
        for name in on_disk:
            index = _chunk_file_index(name)
            if index is None or index not in stashed:
                # appended already, or renamed in but never recorded (never acknowledged)
                self.discard(os.path.join(folder, name))
                mended = True
        for index in stashed:
            if not os.path.exists(self._stash_path(file_id, index)):
                log.error("repair: %s: stashed chunk %d has no file; forgetting it so the "
                          "client sends it again", file_id, index)
                self._ledger.forget_chunk(file_id, index)
                mended = True
        before = upload.next_index
        upload = self._append_stashed_run(file_id)
        mended = mended or upload.next_index != before
        if upload.completed:
            if upload.completed_at is None:
                upload = self._complete(upload)
            elif upload.sha256 is None:
                self._hasher.submit(file_id)
        return mended

    def _replay_journal(self, upload, path):
        """Write the journaled chunks back at their offsets (the file's unsynced writes may
        be lost), fsync, forget the journal. A row that would leave a hole before it (the
        file lost more than its journal holds) is not written: the rollback below then
        goes back to the whole chunks the file has, as for any other loss."""
        rows = self._ledger.journal(upload.file_id)
        if not rows:
            return False
        written = 0
        if os.path.exists(path):
            with open(path, "r+b") as f:
                length = os.fstat(f.fileno()).st_size
                for offset, data in rows:
                    if offset > length:
                        break
                    f.seek(offset)
                    f.write(data)
                    length = max(length, offset + len(data))
                    written += 1
                f.flush()
                os.fsync(f.fileno())
        self._crash.passed("journal_synced")
        self._ledger.clear_journal(upload.file_id)
        if written:
            log.info("repair: %s: wrote %d journaled chunk(s) back into the file",
                     upload.file_id, written)
        return False

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
        media signature rule, no listing, no events of the main store); s3store.S3Store has
        the same method, so a feature asks the store it has for one."""
        return ChunkStore(os.path.join(self.root, name), allow_any_content=allow_any_content,
                          max_upload_bytes=self.max_upload_bytes)
    # -- added for features beside the core (read-only: the crash-safety argument holds) --

    def completed_ids(self, since=0.0):
        """fileIds of the uploads completed at or after `since` (a time.time()) whose sha256
        is known, i.e. whose "completed" event was sent; oldest first. Processing uses it at
        start-up to find uploads whose event it missed (a crash right after the event)."""
        return self._ledger.completed_ids(since)

    def completed_since(self, since):
        """Uploads completed at or after `since` (unix time) whose sha256 is known, oldest
        first: what a listener that must not miss a "completed" event (one a crash cut off
        between recording the sha256 and emitting) catches up from at start-up."""
        return [self._ledger.load(file_id) for file_id in self._ledger.completed_ids(since)]
    # -- the storage interface shared with s3store.S3Store ----------------------------------

    def open_media(self, upload):
        """The assembled file to serve: its consistent prefix, even while it grows; None
        when there are no bytes yet."""
        if upload is None or upload.bytes_appended == 0:
            return None
        return FileMedia(self.media_path(upload), upload.bytes_appended, upload.updated_at)

    def check_storage(self):
        """Readiness of the storage backend (the upload folder checks say the rest)."""
        return {"ok": True, "backend": "local"}

    @contextlib.contextmanager
    def media_file(self, upload):
        """A local file holding the assembled video, for tools such as ffprobe."""
        yield self.media_path(upload)

    def put_derivative(self, upload, name, path, content_type=None):
        """Keep a derivative (poster.jpg, remux.webm, ...): `path` is moved, durably, to
        derived/<fileId>/<name>."""
        if not name or os.path.basename(name) != name or name in (".", ".."):
            raise StoreError(400, "invalid_name", "not a derivative name: %r" % name)
        folder = os.path.join(self.derived_dir, upload.file_id)
        os.makedirs(folder, exist_ok=True)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(path, os.path.join(folder, name))
        fsync_dir(folder)

    def open_derivative(self, upload, name):
        """A derivative to serve, like open_media; None when there is none."""
        path = os.path.join(self.derived_dir, upload.file_id, os.path.basename(name))
        if not name or os.path.basename(name) != name or not os.path.isfile(path):
            return None
        stat = os.stat(path)
        return FileMedia(path, stat.st_size, stat.st_mtime)

    def bytes_held(self, file_id):
        """Bytes an upload holds: appended plus early chunks waiting in temp/ (what
        max_upload_bytes counts; auth.py's token byte budget counts the same). Read-only."""
        upload = self._ledger.load(file_id)
        return 0 if upload is None else upload.bytes_appended + self._ledger.stashed_bytes(
            file_id)

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
            fd = os.open(self.media_path(upload), os.O_RDONLY | _O_BINARY)
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
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def load(self, file_id):
        with self._connection() as db:
            row = db.execute("SELECT %s FROM uploads WHERE file_id = ?" % _UPLOAD_COLUMNS,
                             (file_id,)).fetchone()
            if row is None:
                return None
            stashed = [r[0] for r in db.execute(
                "SELECT idx FROM chunks WHERE file_id = ? AND idx >= ? ORDER BY idx",
                (file_id, row[3]))]
        return UploadState(row, stashed)

    def all_ids(self):
        with self._connection() as db:
            return [r[0] for r in db.execute("SELECT file_id FROM uploads")]

    def chunk_size(self, file_id, index):
        with self._connection() as db:
            row = db.execute("SELECT size FROM chunks WHERE file_id = ? AND idx = ?",
                             (file_id, index)).fetchone()
        return None if row is None else row[0]

    def chunk_offset(self, file_id, index):
        with self._connection() as db:
            return db.execute("SELECT offset FROM chunks WHERE file_id = ? AND idx = ?",
                              (file_id, index)).fetchone()[0]

    def stashed_bytes(self, file_id):
        with self._connection() as db:
            return db.execute(
                "SELECT COALESCE(SUM(c.size), 0) FROM chunks c JOIN uploads u USING (file_id) "
                "WHERE c.file_id = ? AND c.idx >= u.next_index", (file_id,)).fetchone()[0]

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
        return self.expired_among(None, idle_before, completed_before)

    def expired_among(self, file_ids, idle_before, completed_before):
        """Expired uploads, among `file_ids` (None: all)."""
        only = "" if file_ids is None else " AND file_id IN (%s)" % ",".join("?" * len(file_ids))
        params = list(file_ids or [])
        with self._connection() as db:
            ids = []
            if idle_before is not None:
                ids += [r[0] for r in db.execute(
                    "SELECT file_id FROM uploads WHERE completed_at IS NULL AND updated_at < ?"
                    + only, [idle_before] + params)]
            if completed_before is not None:
                ids += [r[0] for r in db.execute(
                    "SELECT file_id FROM uploads WHERE completed_at < ?" + only,
                    [completed_before] + params)]
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
# Helpers: locks, hashing, copying, crash points
# ---------------------------------------------------------------------------------------------

class _KeyedLocks:
    """One lock per key, created on first use and dropped when nobody holds or waits for it."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks = {}      # key -> [lock, number of holders and waiters]

    @contextlib.contextmanager
    def held(self, key):
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]


class _BackgroundHasher:
    """Computes the sha256 of completed uploads off the request path, one at a time.

    Completing an upload must take constant time whatever its length (SPEC section 1), so the
    whole-file digest is computed here afterwards; status shows it once it is known.
    """

    def __init__(self, store):
        self._store = store
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="m1-hasher", daemon=True)
        self._thread.start()

    def submit(self, file_id):
        self._queue.put(file_id)

    def _run(self):
        while True:
            file_id = self._queue.get()
            if file_id is None:
                return
            try:
                upload = self._store.status(file_id)
                if upload is not None and upload.completed_at is not None and \
                        upload.sha256 is None:
                    digest = _sha256_file(self._store.media_path(upload),
                                          upload.bytes_appended)
                    self._store.record_sha256(file_id, upload.completed_at, digest)
            except Exception:          # logged once; status simply shows no sha256
                log.exception("hashing %s failed", file_id)

    def stop(self):
        self._queue.put(None)
        self._thread.join(5)


class _CrashPoint:
    """Test-only: `M1_TEST_CRASH_AT=step[:n]` exits the process at the n-th pass of a step,
    so tests can crash the store deterministically between any two steps."""

    def __init__(self, spec):
        self.step, self.count = None, 0
        if spec:
            step, _, nth = spec.partition(":")
            self.step, self.count = step, int(nth or 1)
        self._guard = threading.Lock()

    def passed(self, step):
        if step != self.step:
            return
        with self._guard:
            self.count -= 1
            if self.count == 0:
                os._exit(70)


_O_BINARY = getattr(os, "O_BINARY", 0)     # Windows: no newline translation


def _sha256_file(path, length=None):
    digest = hashlib.sha256()
    buffer = bytearray(COPY_BLOCK_BYTES)
    view = memoryview(buffer)
    remaining = length
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            n = f.readinto(view if remaining is None else view[:min(remaining, len(buffer))])
            if not n:
                break
            digest.update(view[:n])
            if remaining is not None:
                remaining -= n
    return digest.hexdigest()


def _copy_into(source_path, fd, size):
    """Copy `size` bytes of `source_path` to the current position of `fd`."""
    with open(source_path, "rb") as src:
        copied = 0
        kernel_copy = getattr(os, "copy_file_range", None)
        while kernel_copy is not None and copied < size:
            try:
                n = kernel_copy(src.fileno(), fd, size - copied)
            except OSError:           # other filesystem, old kernel: copy in user space
                break
            if n == 0:
                break
            copied += n
        src.seek(copied)
        buffer = bytearray(min(COPY_BLOCK_BYTES, max(size - copied, 1)))
        while copied < size:
            n = src.readinto(buffer)
            if not n:
                break
            _write_all(fd, memoryview(buffer)[:n])
            copied += n
    if copied != size:
        raise IOError("chunk file %s is shorter than %d bytes" % (source_path, size))


def _write_all(fd, view):
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _same_region(path, offset, part_path, size):
    """True when `size` bytes of `path` at `offset` equal the whole of `part_path`."""
    with open(path, "rb") as stored, open(part_path, "rb") as incoming:
        stored.seek(offset)
        remaining = size
        while remaining > 0:
            step = min(remaining, COPY_BLOCK_BYTES)
            if stored.read(step) != incoming.read(step):
                return False
            remaining -= step
    return True


def fsync_dir(path):
    """Make a rename durable (POSIX). Windows cannot open directories; NTFS journals renames."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chunk_file_index(name):
    stem, dot, suffix = name.partition(".")
    if dot and suffix == "chunk" and stem.isdigit():
        return int(stem)
    return None


class FileMedia:
    """A file to serve: size, ETag and mtime for the headers, and `open_range` to send bytes
    (sendfile(2) where the OS has it). `redirect_url` is for backends that send the client
    elsewhere (s3store with --s3-presign); a file never does."""

    redirect_url = None

    def __init__(self, path, size, mtime):
        self.path = path
        self.size = size                  # may be less than the file: its consistent prefix
        self.mtime = mtime
        self.etag = '"%x-%x"' % (size, int(mtime * 1000))

    def open_range(self, start, count):
        return _FileRange(open(self.path, "rb"), start, count)


class _FileRange:
    def __init__(self, f, start, count):
        self._file = f
        self._start = start
        self._count = count

    def send(self, sock, wfile):
        wfile.flush()
        try:
            sock.sendfile(self._file, self._start, self._count)
            return
        except (AttributeError, NotImplementedError):
            pass
        self._file.seek(self._start)
        remaining = self._count
        while remaining > 0:
            block = self._file.read(min(remaining, COPY_BLOCK_BYTES))
            if not block:
                break
            wfile.write(block)
            remaining -= len(block)

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
