"""storage.py - the storage contract: what every chunk store promises, and the rules they share.

m1server keeps its uploads in one of two backends: chunkstore.ChunkStore (a local folder and a
SQLite ledger) and s3store.S3Store (a bucket that many nodes share). This module is what sits
above both, so that a rule is written once and a backend is a new file, not a new branch in
every handler (STYLE.md, "Shape follows the data"):

  * the vocabulary: valid ids and indices, media types and signatures, UploadState,
    ChunkResult, StoreError, Budget;
  * the chunk rules, as pure functions over plain values: classify_chunk, check_completion,
    choose_extension, check_budgets, is_expired, missing_chunks. A backend reads what it holds
    (a ledger row, a manifest and a listing), asks these, then writes; tests/test_contract.py
    calls them directly and runs one table of chunk sequences against both backends;
  * Store, the base class: every method a backend implements, each with its guarantee, and
    Capabilities, what a backend offers beyond that, declared once by the backend class;
  * what both backends use to work: KeyedLocks, CrashPoint, EventSource, Media and MediaRange.

What every store guarantees (SPEC section 1, "Chunk semantics"):
  1. The assembled video is chunk 0 + chunk 1 + ... + chunk last, each exactly once, whatever
     order the chunks arrive in and however often each is sent.
  2. put_chunk returns only once the chunk is durable (local disk: fsync and the ledger's
     commit, or the ledger's commit alone, or the file's fsync with the chunk's record in
     it; S3: the object exists), so the caller may answer 200.
  3. A chunk sent again with the same bytes is a duplicate: acknowledged, not stored twice, and
     it changes nothing but, at most, the last index (a retried last chunk). The same index
     with other bytes is 409 chunk_conflict.
  4. A chunk sent with status=completed names the last index. Once known it never changes:
     a chunk past it, or another last chunk, is 409 completion_conflict; and a chunk cannot be
     the last while a later one was received (check_completion).
  5. No acknowledged chunk is ever lost, and no crash leaves torn or duplicated bytes: each
     backend writes in an order that its repair (local) or any node (S3) can finish from any
     point. The steps are in chunkstore.py's and s3store.py's docstrings, and a test-only crash
     point (CrashPoint, M1_TEST_CRASH_AT) stops the process after any of them.
  6. One lock per fileId (KeyedLocks) serialises the decisions and writes of one upload on a
     node; different uploads never wait for each other. Limits on an upload's size (the
     --max-upload-size limit, a token's byte budget) are checked inside that lock, so chunks
     that race each other are counted together. The lock is never held while bytes arrive
     from the network: a chunk written in place (reserve_append) holds the upload's tail
     instead, a slot that keeps every other chunk of that index waiting or on its own path.
  7. A deletion says why ("requested", or "expired" from the sweep) and re-checks, under the
     upload's lock, that the upload is still to be deleted: a chunk acknowledged while a sweep
     runs is never deleted with its upload.

The stale "completed" retry. A client that recorded chunks 0, 1, 2 and then retried chunk 1
with status=completed (it had thought 1 was the last, then recorded longer) sends a chunk that
is already stored, so it is a duplicate; but taking its status would record 1 as the last index
below chunks already received, and the upload could never complete. The answer, on every
backend: 409 completion_conflict ("chunk 1 cannot be the last: chunk 2 was received"), and
nothing changes. It is the rule for any chunk that claims to be the last below one received, so
a duplicate is not an exception to it; the client's next chunk, sent as the last, completes.

What it does not do: store anything. Its only I/O is reading a part file's first bytes and
digest (check_chunk_request); local folders are localdisk.py's, buckets s3store.py's.
"""
from __future__ import annotations

import os
import queue
import re
import threading
import time

import serverlog
from apierror import ApiError

log = serverlog.Logger("m1server.store")

# ---------------------------------------------------------------------------------------------
# Constants: the vocabulary every backend shares
# ---------------------------------------------------------------------------------------------

FILE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")
MAX_CHUNK_INDEX = 1000000                # 11.5 days of 1 s MediaRecorder slices
MAX_MISSING_LISTED = 1000                # longest missingChunks list a reply carries
HASH_BLOCK_BYTES = 1 << 20               # buffer for hashing a file

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

# What classify_chunk says a chunk is to its upload.
IN_ORDER = "in_order"      # index == next_index: it extends the assembled run now
EARLY = "early"            # index > next_index: kept apart until the chunks before it arrive
DUPLICATE = "duplicate"    # stored already with the same bytes: acknowledged, not stored again

DELETE_REASONS = ("requested", "expired")


class StoreError(ApiError):
    """A refusal of the store (the HTTP edge turns it into the JSON error envelope)."""


# ---------------------------------------------------------------------------------------------
# Ids, media types, the checks of a chunk request
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


def has_media_signature(head):
    return any(head[at:at + len(magic)] == magic for at, magic in MEDIA_SIGNATURES)


def check_chunk_request(file_id, index, part_path, mime_type, checksum, allow_any_content,
                        sha256=None):
    """What every store checks before it takes its lock (StoreError otherwise): a valid id
    and index, a known mimeType, a media signature on chunk 0, and the checksum field.
    `sha256` is the chunk's digest when the caller has it already (else computed if needed)."""
    check_chunk_fields(file_id, index, mime_type, checksum)
    head = None
    if index == 0 and not allow_any_content:
        with open(part_path, "rb") as f:
            head = f.read(SIGNATURE_BYTES)
    if checksum is not None and sha256 is None:
        sha256 = sha256_file(part_path)
    check_chunk_bytes(index, head, sha256, checksum, allow_any_content)


def check_chunk_fields(file_id, index, mime_type, checksum):
    """The checks of a chunk request that need none of its bytes: a valid id and index, a
    known mimeType, a checksum field of the form sha256:<64 hex>."""
    if not valid_file_id(file_id):
        raise StoreError(400, "invalid_file_id", "fileId must match [A-Za-z0-9_-]{1,128}")
    if not 0 <= index <= MAX_CHUNK_INDEX:
        raise StoreError(400, "invalid_chunk_index", "chunkIndex must be 0..%d" % MAX_CHUNK_INDEX)
    extension_for(mime_type)
    if checksum is not None:
        algorithm, _, expected = checksum.partition(":")
        if algorithm != "sha256" or not re.match(r"[0-9a-fA-F]{64}\Z", expected):
            raise StoreError(400, "invalid_checksum", "checksum must be sha256:<64 hex>")


def check_chunk_bytes(index, head, sha256, checksum, allow_any_content):
    """The checks of a chunk's bytes, once check_chunk_fields passed: chunk 0 starts with a
    media signature (`head`: its first SIGNATURE_BYTES bytes, or all of a shorter chunk),
    and its hex `sha256` is the one the checksum field names (None: no checksum field)."""
    if index == 0 and not allow_any_content and not has_media_signature(head):
        raise StoreError(415, "unsupported_media_type",
                         "chunk 0 does not start with a WebM, MP4 or Ogg signature")
    if checksum is not None and sha256 != checksum.partition(":")[2].lower():
        raise StoreError(400, "checksum_mismatch",
                         "the chunk's sha256 differs from the checksum field")


def check_derivative_name(name):
    """A derivative's name (poster.jpg, remux.webm): one plain file name, or 400."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise StoreError(400, "invalid_name", "not a derivative name: %r" % name)
    return name


def new_sha256():
    """A new sha256 digest. hashlib is imported by the first digest, not by every start: it
    sets up OpenSSL's digests, 0.7 MiB of a start's memory here (SPEC section 9)."""
    import hashlib
    return hashlib.sha256()


def sha256_file(path, length=None):
    """The hex sha256 of a local file (of its first `length` bytes when given)."""
    digest = new_sha256()
    with open(path, "rb") as f:
        for block in read_blocks(f, length):
            digest.update(block)
    return digest.hexdigest()


def read_blocks(f, size=None, block_bytes=HASH_BLOCK_BYTES):
    """The next `size` bytes of the binary file `f` (to its end: None), as views of one
    reused buffer (each valid until the next); fewer bytes when the file ends first."""
    buffer = memoryview(bytearray(block_bytes if size is None else
                                  max(1, min(size, block_bytes))))
    remaining = size
    while remaining is None or remaining > 0:
        n = f.readinto(buffer if remaining is None else buffer[:min(remaining, len(buffer))])
        if not n:
            return
        yield buffer[:n]
        if remaining is not None:
            remaining -= n


# ---------------------------------------------------------------------------------------------
# The chunk rules: pure functions over plain values, the same for every backend
# ---------------------------------------------------------------------------------------------

def classify_chunk(index, next_index, stored, last_index, highest_received, is_last):
    """What chunk `index` is to an upload whose chunks 0..next_index-1 are assembled, whose
    last index is `last_index` (None: not known yet) and whose highest received chunk
    (assembled or waiting) is `highest_received` (-1: none). `stored` says what the store
    holds at `index`: None (nothing), True (the same bytes), False (other bytes).

    Returns IN_ORDER, EARLY or DUPLICATE. Raises 409 chunk_conflict for other bytes, then 409
    completion_conflict for a chunk the completion rules refuse (check_completion): a
    duplicate too, so that a stale retry of a "last" chunk changes nothing."""
    if stored is False:
        raise StoreError(409, "chunk_conflict",
                         "chunk %d was already received with other bytes" % index)
    check_completion(index, is_last, last_index, highest_received)
    if stored:
        return DUPLICATE
    if index < next_index:       # every assembled chunk is known to the store that holds it
        raise StoreError(500, "storage_inconsistent",
                         "chunk %d is assembled but the store does not know it" % index)
    return IN_ORDER if index == next_index else EARLY


def check_completion(index, is_last, last_index, highest_received):
    """The completion rules (SPEC section 1): the last index, once known, is final; nothing is
    stored past it; and a chunk cannot be the last while a later one was received."""
    if last_index is not None and index > last_index:
        raise StoreError(409, "completion_conflict",
                         "chunk %d is past the last chunk %d" % (index, last_index))
    if is_last and last_index is not None and index != last_index:
        raise StoreError(409, "completion_conflict",
                         "the last chunk is already %d, not %d" % (last_index, index))
    if is_last and highest_received > index:
        raise StoreError(409, "completion_conflict",
                         "chunk %d cannot be the last: chunk %d was received"
                         % (index, highest_received))


def is_complete(next_index, last_index):
    return last_index is not None and next_index == last_index + 1


def choose_extension(mime_type, ext, recorded_mime_type, assembled_any):
    """The extension of an upload's assembled file after a chunk that names `mime_type`
    (None: it names none). `ext` is the upload's extension (None: a new upload) and
    `recorded_mime_type` the type it recorded (None: no chunk named one yet). The first type
    named wins while nothing is assembled; after that, another container is 409."""
    wanted = extension_for(mime_type)
    if ext is None:
        return wanted or DEFAULT_EXTENSION
    if wanted is None or wanted == ext:
        return ext
    if recorded_mime_type is None and not assembled_any:
        return wanted
    raise StoreError(409, "mime_type_conflict",
                     "upload is %s, this chunk says %s" % (ext, mime_type))


class Budget:
    """A cap on the bytes one upload holds (assembled and waiting), and the refusal past it:
    --max-upload-size (upload_budget) or a token's maxBytes (auth.Grant.budget). put_chunk
    checks every budget it is given under the upload's lock (check_budgets)."""

    def __init__(self, max_bytes, status, code, message):
        self.max_bytes = max_bytes       # None: no cap
        self.status = status
        self.code = code
        self.message = message           # "... %d ... %d" % (total, max_bytes)

    def check(self, total_bytes):
        if self.max_bytes is not None and total_bytes > self.max_bytes:
            raise StoreError(self.status, self.code,
                             self.message % (total_bytes, self.max_bytes))


def upload_budget(max_upload_bytes):
    """--max-upload-size as a Budget."""
    return Budget(max_upload_bytes, 413, "upload_too_large",
                  "upload would be %d bytes; the limit is %d")


def check_budgets(held_bytes, size, budgets):
    """A new chunk of `size` bytes on an upload holding `held_bytes`: each budget in turn
    (None entries skipped) must have room, or it refuses. Duplicates are never checked."""
    for budget in budgets:
        if budget is not None:
            budget.check(held_bytes + size)


def is_expired(completed_at, updated_at, now, incomplete_ttl, retention):
    """Retention (--incomplete-ttl, --retention): an incomplete upload idle for longer than
    `incomplete_ttl` seconds, or one completed longer than `retention` seconds ago (None: kept
    for ever)."""
    if completed_at is not None:
        return retention is not None and completed_at < now - retention
    return incomplete_ttl is not None and updated_at < now - incomplete_ttl


def missing_chunks(next_index, last_index, waiting):
    """Indices not yet received below the last one ([] while the last index is unknown), at
    most MAX_MISSING_LISTED of them. `waiting`: the indices received beyond the run."""
    if last_index is None:
        return []
    waiting = set(waiting)
    missing = []
    for index in range(next_index, last_index + 1):
        if index not in waiting:
            missing.append(index)
            if len(missing) == MAX_MISSING_LISTED:
                break
    return missing


# ---------------------------------------------------------------------------------------------
# What a store answers with
# ---------------------------------------------------------------------------------------------

class UploadState:
    """A snapshot of one upload, as its store reads it (a ledger row, or a manifest and a
    listing): `row` is (file_id, mime_type, ext, next_index, bytes_appended, last_index,
    created_at, updated_at, completed_at, sha256); `stashed` the sorted indices received
    beyond the assembled run (all > next_index) and `stashed_bytes` their size in all."""

    def __init__(self, row, stashed, stashed_bytes=0):
        (self.file_id, self.mime_type, self.ext, self.next_index, self.bytes_appended,
         self.last_index, self.created_at, self.updated_at, self.completed_at,
         self.sha256) = row
        self.stashed = stashed
        self.stashed_bytes = stashed_bytes

    @classmethod
    def unknown(cls, file_id):
        """An upload the store does not hold yet, as the rules see it: nothing received, no
        extension, no creation time."""
        return cls((file_id, None, None, 0, 0, None, None, None, None, None), [])

    @property
    def completed(self):
        return is_complete(self.next_index, self.last_index)

    @property
    def chunks_received(self):
        return self.next_index + len(self.stashed)

    @property
    def highest_received(self):
        """The highest index received, assembled or waiting (-1: none)."""
        return self.stashed[-1] if self.stashed else self.next_index - 1

    @property
    def bytes_held(self):
        """What the upload's budgets count: assembled bytes and those waiting."""
        return self.bytes_appended + self.stashed_bytes

    def missing_chunks(self):
        return missing_chunks(self.next_index, self.last_index, self.stashed)


class ChunkResult:
    """What one accepted chunk did to its upload (the fields of the seed's 200 reply)."""

    def __init__(self, file_id, index, duplicate, upload):
        self.file_id = file_id
        self.index = index
        self.duplicate = duplicate
        self.upload = upload          # UploadState after the chunk


class Media:
    """Something to serve (open_media, open_derivative): size, ETag and mtime for the headers,
    and open_range(start, count) -> a MediaRange whose send(sock, wfile) writes those bytes.
    `redirect_url` is set when the client is sent elsewhere instead (S3 with --s3-presign)."""

    redirect_url = None

    def open_range(self, start, count):
        raise NotImplementedError


class MediaRange:
    """`count` bytes from `start` being sent from a Media's `source` (a file, a stream); a
    context manager that closes the source. `name` says what it is, for the log."""

    def __init__(self, source, start, count, name):
        self._source = source
        self._start = start
        self._count = count
        self._name = name

    def send(self, sock, wfile):
        raise NotImplementedError

    def close(self):
        self._source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TailWriter:
    """One chunk written in place at the end of its upload (Store.reserve_append). The
    multipart parser writes the file part into it as the bytes arrive (`write`, as into a
    file); then exactly one of these ends it and frees the upload's tail:
      commit(size) -> ChunkResult  the chunk is durable and recorded, as put_chunk's answer;
                                   StoreError when refused (its bytes are cut off again)
      abort()                      its bytes are cut off again (a parse error, a client that
                                   left, a refusal of the handler's)
      to_part_file() -> path       its bytes moved into a part file, for put_chunk (a field
                                   after the file part changed what the chunk is)
    `write` raises StoreError as soon as the bytes break a rule (chunk 0's signature, a
    budget, a full disk), and has then aborted. abort after commit, or twice, does nothing,
    so a caller may always abort in a `finally`."""

    def write(self, view):
        raise NotImplementedError

    def commit(self, size):
        raise NotImplementedError

    def abort(self):
        raise NotImplementedError

    def to_part_file(self):
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# The base class: the methods every backend implements, each with its guarantee
# ---------------------------------------------------------------------------------------------

class EventSource:
    """Listeners of a source of events: every Store, and processing's Processor. A source sets
    self._listeners = [] in its __init__."""

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


class Capabilities:
    """What a backend offers beyond the Store methods, declared once on its class and read once
    where the server is wired together (m1server.M1Server, tus.open_table,
    processing.open_queue): nothing probes a store for a method.

      shared         other nodes change the same uploads (events.StoreRelay shows their work)
      ledger_tables  ledger_read/ledger_write lend the store's SQLite ledger to a feature's own
                     tables (tus's records, local mode)
      shared_records json_folder keeps a feature's JSON records where every node sees them
                     (tus's records, S3)
      shared_jobs    job_of, change_job, put_job_marker, drop_job_marker, job_markers and
                     job_queue_created_at keep processing jobs for every node (S3)
    """

    def __init__(self, shared=False, ledger_tables=False, shared_records=False,
                 shared_jobs=False):
        self.shared = shared
        self.ledger_tables = ledger_tables
        self.shared_records = shared_records
        self.shared_jobs = shared_jobs


class Store(EventSource):
    """The storage contract. A backend sets `folder` (a localdisk.UploadFolder: the local
    folder where part files are received) and implements the methods below that raise
    NotImplementedError; the rest are written here once.

    Receiving
      new_part_file()      -> (path, file): an unbuffered file in the incoming folder for one
                              chunk's bytes; never through a link.
      discard(path)        a part file no longer needed (absent is fine).
      room_for(nbytes)     a context manager around receiving and storing a chunk: 507
                           insufficient_storage unless the local disk has room for what the
                           chunk occupies meanwhile, reserved until it exits.
      put_chunk(file_id, index, part_path, size, is_last, mime_type=None, checksum=None,
                budget=None) -> ChunkResult once the chunk is durable; StoreError when
                           refused (the rules above; `budget`: a Budget, e.g. a token's,
                           checked with --max-upload-size under the upload's lock). The part
                           file is consumed. A chunk that completes the upload returns
                           `completed` in constant time, whatever the upload's length.
      reserve_append(file_id, index, is_last, mime_type=None, checksum=None, budget=None)
                           -> a TailWriter, or None. Asked before the chunk's bytes arrive
                           (the form's text fields came first): when the chunk is the next
                           one of its upload (chunk 0 of a new one too) and the rules need
                           none of its bytes to accept it, the upload's tail is reserved for
                           it, so its bytes are written once, in place, as they arrive. None:
                           receive them into a part file and put_chunk it, which refuses
                           what the rules refuse, in their order (this base class always
                           says None: S3 keeps that path).
      decide(upload, index, stored, size, is_last, mime_type, budget) -> (kind, ext): the
                           rules above in their order, written here once; each backend's
                           put_chunk calls it under the lock with what it read.
    Reading
      status(file_id)      -> UploadState, or None for an upload the store does not hold.
      open_media(upload)   -> Media of the assembled video (local: its consistent prefix,
                              even while it grows; S3: once complete), or None.
      read_appended(upload, offset, max_bytes) -> bytes of the assembled prefix from
                              `offset`, at most `max_bytes`, never past
                              `upload.bytes_appended` (that snapshot's consistent length);
                              b"" when the upload is gone. While it grows too (live.py's
                              stream): local, the video file; S3, the chunk objects (kept
                              until completion), then the assembled object.
      media_file(upload)   a context manager yielding a local path of the whole video (for
                           ffprobe); S3 downloads it, and removes the copy afterwards.
      list_uploads(limit, after=None) -> newest first after the (created_at, file_id) cursor.
      counts()             -> (uploads in progress, uploads completed).
      completed_since(since) -> UploadStates completed at or after `since` whose sha256 is
                              known (their "completed" event was sent), oldest first.
      check_storage()      -> readiness of the backend, {"ok": bool, "backend": ...}.
    Derivatives (processing)
      put_derivative(upload, name, path, content_type=None)  `path` is taken over, durably.
      open_derivative(upload, name) -> Media, or None.
    Deleting and retention
      delete(file_id, unless=None, reason="requested") -> False when unknown (or when
                           unless(upload), checked under the upload's lock, says to keep it);
                           emits "deleted" with the reason and whether it had completed.
      expired(now, incomplete_ttl, retention) -> ids the retention rules name (is_expired).
      sweep(incomplete_ttl=None, retention=None, now=None) -> the ids it deleted.
    Life
      repair()             at start-up, before serving: back to a consistent state after any
                           crash; logs and sets aside (never follows) what it does not know.
      close()              finish background work and release what the store holds.
      sibling(name, allow_any_content=True) -> a second store of the same kind beside this
                           one (tus's partial uploads).
      observe_storage(callback) callback(operation, outcome) for each retried ("retry") or
                           abandoned ("failure") request to a remote backend (metrics).
    Events: add_listener (EventSource).
    Capabilities (see Capabilities): the optional methods a backend declares it has.
    """

    capabilities = Capabilities()

    def __init__(self, folder, allow_any_content=False, max_upload_bytes=None, crash_at=None):
        self.folder = folder
        self.root = folder.root
        self.temp_dir = folder.temp_dir
        self.incoming_dir = folder.incoming_dir
        self.allow_any_content = allow_any_content
        self.max_upload_bytes = max_upload_bytes
        self._upload_budget = upload_budget(max_upload_bytes)
        self._crash = CrashPoint(crash_at)
        self._locks = KeyedLocks()        # one upload's decisions and writes on this node
        self._listeners = []

    # -- receiving (the local folder, the same for every backend) ---------------------------

    def new_part_file(self):
        return self.folder.new_part_file()

    def discard(self, path):
        self.folder.discard(path)

    def room_for(self, nbytes):
        return self.folder.room_for(nbytes)

    def put_chunk(self, file_id, index, part_path, size, is_last, mime_type=None,
                  checksum=None, budget=None):
        raise NotImplementedError

    def reserve_append(self, file_id, index, is_last, mime_type=None, checksum=None,
                       budget=None):
        return None

    def decide(self, upload, index, stored, size, is_last, mime_type, budget):
        """The contract's rules for one chunk, as each backend asks them under the upload's
        lock: `upload` is its UploadState as the backend reads it (UploadState.unknown for a
        new one), `stored` what the backend holds at `index` (see classify_chunk). Returns
        (kind, ext): what the chunk is, and the extension the upload has after it. A new chunk
        must fit every budget: the caller's (a token's) first, then --max-upload-size."""
        kind = classify_chunk(index, upload.next_index, stored, upload.last_index,
                              upload.highest_received, is_last)
        ext = choose_extension(mime_type, upload.ext, upload.mime_type, upload.next_index > 0)
        if kind != DUPLICATE:
            check_budgets(upload.bytes_held, size, (budget, self._upload_budget))
        return kind, ext

    # -- reading ----------------------------------------------------------------------------

    def status(self, file_id):
        raise NotImplementedError

    def open_media(self, upload):
        raise NotImplementedError

    def read_appended(self, upload, offset, max_bytes):
        raise NotImplementedError

    def media_file(self, upload):
        raise NotImplementedError

    def list_uploads(self, limit, after=None):
        raise NotImplementedError

    def counts(self):
        raise NotImplementedError

    def completed_since(self, since):
        raise NotImplementedError

    def check_storage(self):
        raise NotImplementedError

    def put_derivative(self, upload, name, path, content_type=None):
        raise NotImplementedError

    def open_derivative(self, upload, name):
        raise NotImplementedError

    # -- deleting and retention -------------------------------------------------------------

    def delete(self, file_id, unless=None, reason="requested"):
        raise NotImplementedError

    def expired(self, now, incomplete_ttl=None, retention=None):
        raise NotImplementedError

    def sweep(self, incomplete_ttl=None, retention=None, now=None):
        """Delete what `expired` names, each one only if it is still expired when its lock is
        held (a chunk may have arrived since the list was read); returns the deleted ids."""
        now = time.time() if now is None else now

        def revived(upload):
            return not is_expired(upload.completed_at, upload.updated_at, now,
                                  incomplete_ttl, retention)

        deleted = []
        for file_id in self.expired(now, incomplete_ttl, retention):
            if self.delete(file_id, unless=revived, reason="expired"):
                log.info("retention: removed %s", file_id)
                deleted.append(file_id)
        return deleted

    # -- life -------------------------------------------------------------------------------

    def repair(self):
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    def sibling(self, name, allow_any_content=True):
        raise NotImplementedError

    def observe_storage(self, callback):
        """Local disk has no remote requests to retry: nothing to report."""


# ---------------------------------------------------------------------------------------------
# What backends use to work: locks, background workers, crash points, names
# ---------------------------------------------------------------------------------------------

class KeyedLocks:
    """One lock per key, created on first use and dropped when nobody holds or waits for it."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks = {}      # key -> [lock, number of holders and waiters]

    def held(self, key):
        """A context manager: the key's lock, held inside it."""
        return _Held(self, key)

    def _enter(self, key):
        with self._guard:
            entry = self._locks.get(key)
            if entry is None:
                entry = self._locks[key] = [threading.Lock(), 0]
            entry[1] += 1
        try:
            entry[0].acquire()
        except BaseException:                # interrupted while waiting: not a holder
            self._leave(key, entry)
            raise
        return entry

    def _leave(self, key, entry):
        with self._guard:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[key]


class _Held:
    """KeyedLocks.held's context manager (a class: it runs for every chunk, and a generator
    context manager costs four times as much)."""

    __slots__ = ("_owner", "_key", "_entry")

    def __init__(self, owner, key):
        self._owner, self._key = owner, key

    def __enter__(self):
        self._entry = self._owner._enter(self._key)

    def __exit__(self, kind, error, traceback):
        self._entry[0].release()
        self._owner._leave(self._key, self._entry)
        return False


class Workers:
    """A few daemon threads working through upload ids off the request path (hashing a
    completed upload, folding chunks into parts); an id already waiting is not queued twice,
    and a failure is logged, never raised."""

    def __init__(self, name, count, work):
        self._work = work
        self._queue = queue.Queue()
        self._pending = set()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name="%s-%d" % (name, n),
                                          daemon=True) for n in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, file_id):
        with self._lock:
            if file_id in self._pending:
                return
            self._pending.add(file_id)
        self._queue.put(file_id)

    def _run(self):
        while True:
            file_id = self._queue.get()
            if file_id is None:
                return
            with self._lock:
                self._pending.discard(file_id)
            try:
                self._work(file_id)
            except Exception:
                log.exception("background work on %s failed", file_id)

    def stop(self, timeout=5.0):
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class CrashPoint:
    """Test-only: `M1_TEST_CRASH_AT=step[:n]` exits the process at the n-th pass of a step,
    so tests can crash a store deterministically between any two of its steps.
    `step:n:raise` raises RuntimeError there instead, once: an unexpected error, which the
    request it happens in answers with a 500 (and the server logs with its traceback)."""

    def __init__(self, spec):
        self.step, self.count, self.raises = None, 0, False
        if spec:
            parts = spec.split(":")
            self.raises = len(parts) > 2 and parts[2] == "raise"
            self.step, self.count = parts[0], int(parts[1] or 1) if len(parts) > 1 else 1
        self._guard = threading.Lock()

    def passed(self, step):
        if step != self.step:
            return
        with self._guard:
            self.count -= 1
            if self.count != 0:
                return
        if self.raises:
            raise RuntimeError("M1_TEST_CRASH_AT: an unexpected error at %s" % step)
        os._exit(70)
