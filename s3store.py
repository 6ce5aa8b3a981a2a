"""s3store.py - the storage contract on S3-compatible object storage, shared by any number of
nodes.

S3Store implements storage.Store (the guarantees and the chunk rules every store shares are
there; chunkstore.ChunkStore is the local backend) with no state but the bucket: every node
answers every request from what the bucket holds, so several m1server processes behind a load
balancer need no sticky sessions. docs/s3.md has the whole
design; in short, for an upload <id> under the prefix P:

  P/uploads/<id>/manifest.json       the upload's metadata; created with If-None-Match: *,
                                     changed only by compare-and-swap (If-Match: <etag>)
  P/uploads/<id>/<gen>/c/<index>     one object per chunk, created with If-None-Match: *,
                                     its sha256 in x-amz-meta-sha256; kept until the upload
                                     completes (live viewers read the growing upload from them)
  P/uploads/<id>/<gen>/f/<a>-<b>     the (size, sha256) of chunks a..b-1 once folded, so a
                                     duplicate is still recognised after its object is gone
  P/uploads/<id>/<gen>/<id>.<ext>    the assembled video (a multipart upload until complete)
  P/uploads/<id>/<gen>/derived/...   derivatives of processing
  P/jobs/<id>                        empty; a processing job is queued or running (its state is
                                     the manifest's `job` field: processing.SharedJobQueue)
  P/processing.json                  when processing first used this prefix
  P/index/<inverted ms>-<id>         empty; lists uploads newest first
  P/done/<id>                        empty; counts completed uploads
  P/tus/..., P/tus-partials/...      tus.py's records (json_folder: JSON objects changed by
                                     the same compare-and-swap as manifests) and its partial
                                     uploads (sibling: a second S3Store under that prefix)

<gen> is a random generation named in the manifest: a deleted upload's stray objects can never
be mistaken for a later upload with the same id.

What it guarantees (SPEC section 1 over S3):
  * A chunk is acknowledged only after its object exists (S3 answered 200 to the PUT).
  * Duplicates and conflicts are decided from the bucket: the chunk object's sha256, or the fold
    record once the object is gone.
  * Contiguous bytes are folded in the background, by whichever node sees them, into parts of a
    fixed size P (>= 5 MiB, S3's minimum) cut at byte offsets, not at chunk boundaries: two
    nodes folding the same part upload the same bytes. A part that lies inside one chunk is
    copied inside the store (UploadPartCopy); other parts are read and uploaded.
  * A chunk object is deleted only once the upload is complete (the assembled object holds its
    bytes): until then the chunk objects are the only readable copy of the growing upload
    (read_appended, for live viewers). Listings of an upload's chunks start after the folded
    ones (ListObjectsV2 start-after), so a long recording stays as cheap to list as a short one.
  * When the last chunk is in, finishing is the tail part (< P bytes) and the completion:
    constant time, whatever the length. Small uploads (<= P) are one PutObject instead.
  * Every step can be repeated by any node, in any order after a crash: the next request for
    the upload (a chunk, a status) or the sweep finishes what a dead node left.
  * Listeners get ChunkStore's events of what this node did, in the same order: one "chunk"
    per new chunk, and "completed" after the chunk that completed the upload.
  * A deletion by the retention sweep never takes a chunk that any node acknowledged: the
    sweep marks the manifest `expiring` (compare-and-swap), reads the upload's chunks again,
    and sets `deleting` only while its mark is still there; a node that stores a new chunk
    reads the manifest after its PUT and clears such a mark, or, finding `deleting`, starts
    the chunk afresh as a chunk that comes after a deletion does (delete, _after_store).
  * Every retried or abandoned request is logged with its operation and attempt
    (s3client.py) and reported to observe_storage's callback (/metrics counts them).

What it does not do: serve an upload's bytes by Range before it is complete (a multipart upload
cannot be read until it is completed; read_appended reads the chunk objects instead); pass single
events between nodes (each node emits the events
of what it did; events.StoreRelay shows other nodes' changes as `state` events); the local
ledger (m1.sqlite3) is not used at all. Part files stay local temp files.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import s3client
import serverlog
from localdisk import UploadFolder
from s3client import FileRegion, S3ConnectionError, S3Error
from storage import (DEFAULT_EXTENSION, DUPLICATE, MEDIA_TYPES, Capabilities, ChunkResult,
                     KeyedLocks, Media, MediaRange, Store, StoreError, UploadState, Workers,
                     check_chunk_request, check_completion, check_derivative_name,
                     choose_extension, extension_for, is_complete, is_expired, sha256_file,
                     valid_file_id)

log = serverlog.Logger("m1server.s3store")

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

MIN_PART_BYTES = 5 << 20               # S3's smallest part (all but the last)
DEFAULT_PART_BYTES = 8 << 20           # P: the size of every part but the last
FOLD_VANISHED_RETRIES = 20             # passes a fold restarts when another node got there first
_AGAIN = object()                      # _fold_pass: a step was taken; look again
MAX_PARTS = 10000                      # S3's most parts per upload
FOLD_WORKERS = 2                       # background threads folding chunks into parts
CAS_ATTEMPTS = 30                      # compare-and-swap tries before giving up (503)
COUNTS_TTL_S = 10.0                    # /metrics and /readyz reuse a count this long
HASH_GRACE_S = 30.0                    # another node may still be hashing an upload it finished
PRESIGN_EXPIRES_S = 900                # --s3-presign: how long a redirect URL works
READY_TIMEOUT_S = 5.0                  # the readiness probe's own timeout (one attempt)
STREAM_BLOCK_BYTES = 256 << 10         # media proxying: bytes per read from the store
ORPHAN_GRACE_S = 3600.0                # gc leaves unreferenced objects younger than this
ORPHAN_SCAN_INTERVAL_S = 86400.0       # a sweep looks for orphans (a full listing) this often
INDEX_SPAN_MS = 10 ** 13               # index keys: INDEX_SPAN_MS - 1 - created ms, 13 digits
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SHA256_META = "sha256"                 # x-amz-meta-sha256 on every chunk object
RECORD_CACHE_SIZE = 256                # fold records kept in memory (they never change)
PARALLEL_REQUESTS = 4                  # chunk GETs / DELETEs of one fold in flight at once
DONE_MARKER_SLACK_S = 60.0             # done/ markers are written just after completedAt

# What an S3 error means for the client of m1server (apierror envelope).
DENIED_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "InvalidToken", "ExpiredToken", "AllAccessDisabled", "AuthorizationHeaderMalformed")


def storage_error(error, bucket):
    """Translate an S3Error into the StoreError the HTTP edge sends (never a traceback)."""
    if isinstance(error, S3ConnectionError) or error.status is None or error.status >= 500 or \
            error.status == 429:
        return StoreError(503, "storage_unavailable",
                          "the object store did not answer (%s); try again shortly"
                          % error.code, {"Retry-After": "5"})
    if error.status == 403 or error.code in DENIED_CODES:
        return StoreError(502, "storage_denied", "the object store refused m1server's "
                          "credentials for bucket %s (%s)" % (bucket, error.code))
    if error.code == "NoSuchBucket":
        return StoreError(502, "storage_bucket_missing",
                          "the object store has no bucket %s" % bucket)
    return StoreError(502, "storage_error", "the object store answered %s %s"
                      % (error.status, error.code))


def open_store(config):
    """The S3Store m1server's Config asks for (--storage s3://bucket/prefix and --s3-*)."""
    bucket, prefix = s3client.split_storage_url(config.storage)
    region = config.s3_region or os.environ.get("AWS_REGION") or \
        os.environ.get("AWS_DEFAULT_REGION") or s3client.DEFAULT_REGION
    addressing = config.s3_addressing
    if addressing == "auto":
        addressing = "path" if config.s3_endpoint else "virtual"
    client = s3client.S3Client(bucket, endpoint=config.s3_endpoint or None, region=region,
                               credentials=s3client.Credentials.from_environ(),
                               addressing=addressing)
    return S3Store(client, prefix, config.dir, allow_any_content=config.allow_any_content,
                   max_upload_bytes=config.max_upload_bytes, part_bytes=config.s3_part_size,
                   presign=config.s3_presign, crash_at=config.crash_at,
                   one_shot=config.one_shot, min_free_bytes=config.min_free_disk_bytes)


# ---------------------------------------------------------------------------------------------
# The manifest: one JSON object per upload, changed only by compare-and-swap
# ---------------------------------------------------------------------------------------------

class Manifest:
    """A manifest as read (its data and the ETag it had). Fields, all JSON:
    fileId, generation, createdAt (seconds, whole ms), updatedAt, mimeType, ext, partBytes,
    uploadId (the multipart upload, once the first part is folded), parts [{n, etag, from, to,
    end, endOffset}] (part n holds bytes [from, to); chunks < end are wholly in parts and chunk
    `end` starts at byte endOffset), records [[a, b]] (fold records written), lastIndex,
    completedAt, size, etag (the final object's), sha256, deleting, job (processing's, set
    only through change_job)."""

    def __init__(self, data, etag):
        self.data = data
        self.etag = etag

    file_id = property(lambda self: self.data["fileId"])
    generation = property(lambda self: self.data["generation"])
    created_at = property(lambda self: self.data["createdAt"])
    updated_at = property(lambda self: self.data["updatedAt"])
    mime_type = property(lambda self: self.data.get("mimeType"))
    ext = property(lambda self: self.data["ext"])
    part_bytes = property(lambda self: self.data["partBytes"])
    upload_id = property(lambda self: self.data.get("uploadId"))
    parts = property(lambda self: self.data.get("parts", []))
    records = property(lambda self: self.data.get("records", []))
    last_index = property(lambda self: self.data.get("lastIndex"))
    completed_at = property(lambda self: self.data.get("completedAt"))
    size = property(lambda self: self.data.get("size"))
    final_etag = property(lambda self: self.data.get("etag"))
    sha256 = property(lambda self: self.data.get("sha256"))
    deleting = property(lambda self: bool(self.data.get("deleting")))

    @property
    def completed(self):
        return self.completed_at is not None

    @property
    def folded_chunks(self):
        """Chunks 0 .. folded_chunks-1 are wholly in recorded parts (their objects go once
        the upload is complete)."""
        return self.parts[-1]["end"] if self.parts else 0

    @property
    def folded_offset(self):
        """Where chunk `folded_chunks` starts in the assembled file."""
        return self.parts[-1]["endOffset"] if self.parts else 0

    @property
    def cursor(self):
        """Bytes already in parts."""
        return self.parts[-1]["to"] if self.parts else 0

    @property
    def created_ms(self):
        return int(round(self.created_at * 1000))


class ObjectUploadState(UploadState):
    """storage.UploadState, with the manifest it was read from."""

    def __init__(self, row, stashed, stashed_bytes, manifest):
        UploadState.__init__(self, row, stashed, stashed_bytes)
        self.manifest = manifest


class _Progress:
    """What the bucket holds for an incomplete upload: the contiguous run of chunk objects
    after the folded ones, and the chunks waiting beyond it."""

    def __init__(self, manifest, chunks):
        last = manifest.last_index
        index, offset = manifest.folded_chunks, manifest.folded_offset
        self.run = []                     # [(index, offset, ObjectInfo)] from folded_chunks on
        while index in chunks and (last is None or index <= last):
            self.run.append((index, offset, chunks[index]))
            offset += chunks[index].size
            index += 1
        self.next_index = index
        self.bytes = offset               # bytes of chunks 0 .. next_index-1
        self.stashed = sorted(i for i in chunks
                              if i > index and (last is None or i <= last))
        self.stashed_bytes = sum(chunks[i].size for i in self.stashed)
        self.updated_at = max([manifest.updated_at] + [info.last_modified
                                                       for info in chunks.values()])

    def complete(self, manifest):
        return is_complete(self.next_index, manifest.last_index)


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------

class S3Store(Store):
    """Chunks of many uploads into one object each, on a bucket shared by many nodes."""

    # Other nodes change uploads too (events.StoreRelay relays it); tus's records and
    # processing's jobs live in the bucket, where every node sees them.
    capabilities = Capabilities(shared=True, shared_records=True, shared_jobs=True)

    def __init__(self, client, prefix, root, allow_any_content=False, max_upload_bytes=None,
                 part_bytes=DEFAULT_PART_BYTES, presign=False, crash_at=None,
                 one_shot=False, min_free_bytes=None):
        # Part files are local: a chunk is on this disk once (its part file) while stored.
        Store.__init__(self, UploadFolder(root, min_free_bytes, copies=1), allow_any_content,
                       max_upload_bytes, crash_at)
        self.client = client
        self.bucket = client.bucket
        self.prefix = prefix.strip("/")
        self.part_bytes = choose_part_bytes(part_bytes, max_upload_bytes)
        self.presign = presign
        self._probe = s3client.S3Client(
            client.bucket, endpoint=client.endpoint, region=client.region,
            credentials=client.credentials, addressing=client.addressing,
            timeout=READY_TIMEOUT_S, attempts=1)
        self._fold_locks = KeyedLocks()       # one upload's folding on this node
        self._records = {}                    # fold record cache: key -> [(size, sha256)]
        self._records_lock = threading.Lock()
        self._counts = (0.0, None)
        self.one_shot = one_shot              # `gc`: one sweep does everything, then exit
        # A full listing of the bucket: not at every node's start-up, only in a one-shot gc.
        self._last_orphan_scan = None if one_shot else time.monotonic()
        self._folder = Workers("m1-fold", FOLD_WORKERS, self._fold_in_background)
        self._hasher = Workers("m1-s3-hash", 1, self._hash_in_background)

    # -- keys -------------------------------------------------------------------------------

    def _key(self, *parts):
        return "/".join(([self.prefix] if self.prefix else []) + list(parts))

    def _manifest_key(self, file_id):
        return self._key("uploads", file_id, MANIFEST_NAME)

    def _generation_prefix(self, m):
        return self._key("uploads", m.file_id, m.generation) + "/"

    def _chunk_prefix(self, m):
        return self._generation_prefix(m) + "c/"

    def _chunk_key(self, m, index):
        return self._chunk_prefix(m) + "%07d" % index

    def _record_key(self, m, first, end):
        return self._generation_prefix(m) + "f/%07d-%07d" % (first, end)

    def _final_key(self, m):
        return self._generation_prefix(m) + "%s.%s" % (m.file_id, m.ext)

    def _derived_key(self, m, name):
        return self._generation_prefix(m) + "derived/" + name

    def _index_key(self, created_ms, file_id):
        return self._key("index", "%013d-%s" % (INDEX_SPAN_MS - 1 - created_ms, file_id))

    def _done_key(self, file_id):
        return self._key("done", file_id)

    # -- receiving --------------------------------------------------------------------------

    def put_chunk(self, file_id, index, part_path, size, is_last, mime_type=None,
                  checksum=None, budget=None):
        """Store chunk `index` of `file_id` from `part_path` (removed afterwards). Returns a
        ChunkResult once the chunk object exists in the bucket; raises StoreError."""
        try:
            digest = sha256_file(part_path)     # every chunk object carries it (duplicates)
            check_chunk_request(file_id, index, part_path, mime_type, checksum,
                                self.allow_any_content, sha256=digest)
            with self._storage_errors(), self._locks.held(file_id):
                for _ in range(CAS_ATTEMPTS):
                    try:
                        return self._put_locked(file_id, index, part_path, size, digest,
                                                is_last, mime_type, budget)
                    except _DeletedMeanwhile:
                        continue            # the chunk comes after the deletion: afresh
                raise StoreError(503, "storage_contention",
                                 "upload %s was deleted again and again meanwhile" % file_id)
        finally:
            self.discard(part_path)

    def _put_locked(self, file_id, index, part_path, size, digest, is_last, mime_type,
                    budget):
        manifest = self._load_live(file_id)
        if manifest is None:
            self.decide(UploadState.unknown(file_id), index, None, size, is_last, mime_type,
                        budget)                     # refused before anything is created
            manifest = self._create(file_id, mime_type)
        chunks = self._chunks(manifest)
        upload = self._state(manifest, _Progress(manifest, chunks))
        known = self._known_chunk(manifest, chunks, index)
        if known is None and index < upload.next_index:
            manifest = self._check_alive(manifest)  # its object went with a deletion?
        kind, _ = self.decide(upload, index, None if known is None else known == (size, digest),
                              size, is_last, mime_type, budget)
        duplicate = kind == DUPLICATE
        manifest = self._record_type(manifest, mime_type)
        if not duplicate:
            duplicate = self._store_chunk(manifest, index, part_path, size, digest)
            chunks[index] = s3client.ObjectInfo(self._chunk_key(manifest, index), size, None,
                                                time.time())
        self._crash.passed("chunk_stored")
        manifest = self._after_store(manifest, stored=not duplicate)
        if index < manifest.folded_chunks and not duplicate:
            duplicate = self._settle_folded_chunk(manifest, index, size, digest)
        if is_last:
            manifest = self._record_last_index(manifest, index)
        progress = _Progress(manifest, chunks)
        if manifest.last_index is not None and not progress.complete(manifest) and \
                not manifest.completed:
            # Another node may have stored the last missing chunk while we stored ours, each
            # listing before the other's PUT: listing again after our PUT means that of two
            # such racing nodes, at least the later one sees every chunk and finishes.
            chunks = self._chunks(manifest)
            chunks.setdefault(index, s3client.ObjectInfo("", size, None, time.time()))
            progress = _Progress(manifest, chunks)
        announce = not duplicate                 # a new chunk: one "chunk" event
        if manifest.completed:
            upload = self._state(manifest, None)
        elif progress.complete(manifest):
            # The chunk's event goes before finishing, which emits "completed": a listener
            # sees every chunk, then completed, as in local mode.
            if announce:
                self._emit_chunk(file_id, index, size, progress.bytes, progress.next_index)
                announce = False
            upload = self._finished_state(file_id)
        else:
            if progress.bytes - manifest.cursor >= manifest.part_bytes:
                self._folder.submit(file_id)
            upload = self._state(manifest, progress)
        if announce:
            self._emit_chunk(file_id, index, size, upload.bytes_appended, upload.next_index)
        return ChunkResult(file_id, index, duplicate, upload)

    def _after_store(self, m, stored):
        """The manifest, read again after the chunk PUT: a fold by another node may have moved
        on meanwhile (the listing taken before is consistent with it). A deletion that won
        meanwhile took our chunk with it (_DeletedMeanwhile: start afresh); a sweep's
        `expiring` mark is cleared, so that it cannot delete the chunk we acknowledge."""
        m = self._check_alive(m)
        if stored and m.data.get("expiring"):
            m = self._update(m, _revive, touch=False)
            if m.deleting:
                self._finish_delete(m)
                raise _DeletedMeanwhile()
        return m

    def _check_alive(self, m):
        """The upload's manifest now; _DeletedMeanwhile when `m`'s upload is gone or going
        (a deletion found cut short is finished first)."""
        fresh = self._load_live(m.file_id)
        if fresh is None or fresh.generation != m.generation:
            raise _DeletedMeanwhile()
        return fresh

    def _emit_chunk(self, file_id, index, size, bytes_received, next_index):
        self._emit("chunk", file_id, index=index, size=size, bytesReceived=bytes_received,
                   nextChunkIndex=next_index)

    def _store_chunk(self, m, index, part_path, size, digest):
        """PUT the chunk object If-None-Match: *; returns True when it was there already with
        the same bytes (a duplicate that raced us), False when we stored it."""
        for _ in range(CAS_ATTEMPTS):
            try:
                self.client.put_object(self._chunk_key(m, index), FileRegion(part_path, 0, size),
                                       content_type="application/octet-stream",
                                       metadata={SHA256_META: digest}, if_none_match=True,
                                       sha256=digest)
                return False
            except S3Error as error:
                if error.status not in (409, 412):
                    raise
            stored = self._head_chunk(m, index)
            if stored is None:
                continue                    # a racing write did not commit: try again
            if stored != (size, digest):
                raise StoreError(409, "chunk_conflict",
                                 "chunk %d was already received with other bytes" % index)
            return True
        raise StoreError(503, "storage_contention", "chunk %d: too many racing writes" % index)

    def _settle_folded_chunk(self, m, index, size, digest):
        """Chunk `index` was folded while we stored it. Either the fold took our object, or it
        took an earlier copy whose object was deleted before our PUT (ours is a stray: a
        duplicate, or a conflict). The fold record decides the bytes; as chunk objects stay
        until completion, a fold of an incomplete upload can only have taken ours."""
        if self._folded_chunk(m, index) != (size, digest):
            self._delete_quietly(self._chunk_key(m, index))
            raise StoreError(409, "chunk_conflict",
                             "chunk %d was already received with other bytes" % index)
        if not m.completed or self._head_chunk(m, index) is None:
            return False
        self._delete_quietly(self._chunk_key(m, index))
        return True

    # -- decisions the bucket records --------------------------------------------------------

    def _record_type(self, m, mime_type):
        """The first chunk that names a mimeType records it (decide has checked it). The
        extension names the final object, so it may change only before any byte of that
        object exists: the change below asks the rule again against what it finds."""
        if mime_type is None or m.mime_type is not None:
            return m

        def change(data):
            started = data.get("uploadId") or data.get("parts") or data.get("completedAt")
            wanted = choose_extension(mime_type, data["ext"], data.get("mimeType"),
                                      bool(started))
            if data.get("mimeType") is not None:
                return False
            data["mimeType"], data["ext"] = mime_type, wanted
            return True
        return self._update(m, change)

    def _record_last_index(self, m, index):
        def change(data):
            # another node may have recorded a last index since we read the manifest
            check_completion(index, True, data.get("lastIndex"), -1)
            if data.get("lastIndex") == index:
                return False
            data["lastIndex"] = index
            return True
        return self._update(m, change)

    # -- reading ----------------------------------------------------------------------------

    def status(self, file_id):
        """The upload's state from the bucket (None when unknown). An upload whose chunks
        are all in but that is not assembled yet (its node died) is finished here."""
        if not valid_file_id(file_id):
            return None
        with self._storage_errors():
            manifest = self._load_live(file_id)
            if manifest is None:
                return None
            if manifest.completed:
                self._hash_if_forgotten(manifest)
                return self._state(manifest, None)
            chunks = self._chunks(manifest)
            manifest = self._reload(manifest)
            if manifest.completed:
                return self._state(manifest, None)
            progress = _Progress(manifest, chunks)
            if not progress.complete(manifest):
                return self._state(manifest, progress)
            try:
                return self._finished_state(file_id)
            except StoreError as error:
                if error.code == "upload_gone":
                    return None
                raise

    def _finished_state(self, file_id):
        """Finish an upload whose chunks are all in; its state afterwards."""
        manifest = self._finish(file_id)
        if manifest is None or manifest.deleting:
            raise StoreError(409, "upload_gone", "upload %s was deleted meanwhile" % file_id)
        if manifest.completed:
            return self._state(manifest, None)
        return self._snapshot(manifest)       # not whole after all (a chunk vanished?)

    def _state(self, m, progress):
        if m.completed:
            next_index, size, stashed, waiting = m.last_index + 1, m.size, [], 0
            updated = m.completed_at
        else:
            next_index, size, stashed = progress.next_index, progress.bytes, progress.stashed
            updated, waiting = progress.updated_at, progress.stashed_bytes
        row = (m.file_id, m.mime_type, m.ext, next_index, size, m.last_index, m.created_at,
               updated, m.completed_at, m.sha256)
        return ObjectUploadState(row, stashed, waiting, m)

    def open_media(self, upload):
        """The assembled video to serve (or a redirect to it); None while it is incomplete
        or empty: an unfinished multipart upload cannot be read."""
        m = upload.manifest if upload is not None else None
        if m is None or not m.completed or not m.size:
            return None
        key = self._final_key(m)
        redirect = self.client.presigned_url(key, PRESIGN_EXPIRES_S) if self.presign else None
        return ObjectMedia(self, key, m.size, m.final_etag, m.completed_at, redirect)

    # -- live reading (issue 18, live.py): the growing upload, from its chunk objects -------
    # (read-only; chunkstore.ChunkStore.read_appended is the local backend's)

    def read_appended(self, upload, offset, max_bytes):
        """Bytes of the assembled prefix from `offset`: at most `max_bytes`, never past
        `upload.bytes_appended` (the contiguous chunks of that snapshot). Before completion
        they come from the chunk objects (kept until then; a multipart upload cannot be read),
        after it from the assembled object. b"" when the upload is gone (deleted since the
        snapshot). Costs: the chunk GETs holding the bytes (PARALLEL_REQUESTS at a time), one
        LIST when the bytes lie past the folded chunks, and a fold record GET (cached) when
        they lie before."""
        end = min(upload.bytes_appended, offset + max_bytes)
        m = upload.manifest
        if offset >= end:
            return b""
        with self._storage_errors():
            data = self._read_range(m, offset, end)
            if data is not None:
                return data
            # Chunk objects went: the upload completed meanwhile (they go at completion), or
            # it was deleted. Read the assembled object, or nothing.
            fresh = self._load(m.file_id)
            if fresh is None or fresh.deleting or fresh.generation != m.generation or \
                    not fresh.completed:
                return b""
            return self._read_range(fresh, offset, end) or b""

    def _read_range(self, m, offset, end):
        """Bytes [offset, end) of the upload `m` describes; None when the objects holding
        them are gone (completion removes the chunk objects, deletion everything)."""
        if m.completed:
            pieces = [(self._final_key(m), offset, end - 1)]
        else:
            pieces = [(self._chunk_key(m, index), max(offset, start) - start,
                       min(end, start + size) - start - 1)
                      for index, start, size in self._chunk_layout(m, offset, end)
                      if size > 0]
        try:
            data = b"".join(_in_parallel(
                lambda piece: self.client.get_object(piece[0], piece[1:]).body, pieces))
        except S3Error as error:
            if error.status != 404:
                raise
            return None
        return data if len(data) == end - offset else None

    def _chunk_layout(self, m, offset, end):
        """(index, start, size) of the chunks holding bytes [offset, end), in order: folded
        chunks from their fold records (a record wholly before `offset` is skipped unread:
        each part says where the chunk after it starts), the rest from a listing."""
        if offset < m.folded_offset:
            starts = {0: 0}
            for part in m.parts:
                starts[part["end"]] = part["endOffset"]
            for first, after in m.records:
                if after in starts and starts[after] <= offset:
                    continue
                position = starts[first]
                for index, (size, _) in enumerate(self._record(m, first, after), first):
                    if position >= end:
                        return
                    if position + size > offset:
                        yield index, position, size
                    position += size
        if end > m.folded_offset:
            for index, start, info in _Progress(m, self._chunks(m)).run:
                if start >= end:
                    return
                if start + info.size > offset:
                    yield index, start, info.size
    # -- end of live reading ----------------------------------------------------------------

    def list_uploads(self, limit, after=None):
        """Up to `limit` uploads, newest first, after the (created_at, file_id) cursor."""
        with self._storage_errors():
            start = None
            if after is not None:
                start = self._index_key(int(round(after[0] * 1000)), after[1])
            found = []
            for manifest in self._indexed_uploads(start):
                found.append(self._snapshot(manifest))
                if len(found) >= limit:
                    break
            return found

    def _snapshot(self, m):
        if m.completed:
            return self._state(m, None)
        return self._state(m, _Progress(m, self._chunks(m)))

    def _indexed_uploads(self, start_after=None, stale=None):
        """The manifests the index names, newest first; index entries that name no upload
        (a creation that lost its race, a deletion cut short) go to `stale`."""
        prefix = self._key("index") + "/"
        for info in self.client.iter_objects(prefix, start_after=start_after):
            name = info.key[len(prefix):]
            inverted, _, file_id = name.partition("-")
            manifest = self._load(file_id) if valid_file_id(file_id) else None
            if manifest is None or manifest.deleting or \
                    INDEX_SPAN_MS - 1 - manifest.created_ms != int(inverted or -1):
                if stale is not None:
                    stale.append((info, manifest))
                continue
            yield manifest

    def counts(self):
        """(uploads in progress, uploads completed) in the bucket, at most COUNTS_TTL_S old."""
        taken, value = self._counts
        if value is not None and time.monotonic() - taken < COUNTS_TTL_S:
            return value
        with self._storage_errors():
            total = sum(1 for _ in self.client.iter_objects(self._key("index") + "/"))
            done = sum(1 for _ in self.client.iter_objects(self._key("done") + "/"))
        value = (max(0, total - done), done)
        self._counts = (time.monotonic(), value)
        return value

    def check_storage(self):
        """Readiness: the bucket answers a signed listing with these credentials."""
        try:
            self._probe.list_objects(self._key("index") + "/", max_keys=1)
            return {"ok": True, "backend": "s3", "bucket": self.bucket}
        except S3Error as error:
            translated = storage_error(error, self.bucket)
            return {"ok": False, "backend": "s3", "bucket": self.bucket,
                    "code": translated.code, "error": translated.message}

    # -- deletion, retention ----------------------------------------------------------------

    def delete(self, file_id, unless=None, reason="requested"):
        """Remove an upload everywhere; False when unknown (or when `unless(upload)`, asked
        under the upload's lock, says to keep it). Emits "deleted" with `reason` and whether
        it had completed. Crash-safe: the manifest is first marked `deleting` (the intent,
        _mark_deleting), then the multipart upload is aborted and every object of its
        generation deleted, then the index entries, the manifest last. Whoever reads a
        `deleting` manifest finishes the deletion."""
        if not valid_file_id(file_id):
            return False
        with self._storage_errors(), self._locks.held(file_id):
            manifest = self._load(file_id)
            if manifest is not None and not manifest.deleting:
                manifest = self._mark_deleting(manifest, unless)
            if manifest is None:
                return False
            self._finish_delete(manifest)
        log.info("upload %s deleted", file_id)
        self._emit("deleted", file_id, reason=reason, completed=manifest.completed)
        return True

    def _mark_deleting(self, m, unless):
        """Set `deleting` by compare-and-swap; the manifest afterwards, or None to keep the
        upload. With `unless` (the sweep's second look) in two steps, so that no chunk a node
        acknowledges is deleted: an `expiring` mark first (a node that stores a new chunk
        clears it, _after_store), then the upload is read again and asked `unless`, and
        `deleting` is set only while the mark is still there."""
        try:
            if unless is None:
                return self._update(m, _mark_deleting)
            token = uuid.uuid4().hex
            m = self._update(m, lambda data: _mark_expiring(data, token), touch=False)
            if unless(self._snapshot(m)):
                self._update(m, lambda data: _unmark_expiring(data, token), touch=False)
                return None
            m = self._update(m, lambda data: _expire(data, token))
        except StoreError as error:
            if error.code == "upload_gone":
                return None
            raise
        return m if m.deleting else None

    def _finish_delete(self, m):
        if m.upload_id:
            try:
                self.client.abort_multipart_upload(self._final_key(m), m.upload_id)
            except S3Error as error:
                if error.status != 404:
                    raise
        _in_parallel(self._delete_quietly,
                     [info.key for info in self.client.iter_objects(self._generation_prefix(m))])
        self._delete_quietly(self._index_key(m.created_ms, m.file_id))
        self._delete_quietly(self._done_key(m.file_id))
        try:
            self.client.delete_object(self._manifest_key(m.file_id), if_match=m.etag)
        except S3Error as error:
            if error.status not in (404, 412):    # gone, or a newer upload: not ours to delete
                raise

    def expired(self, now, incomplete_ttl=None, retention=None):
        """Ids of the uploads storage.is_expired names; deletions and creations that a dead
        node left half done are finished or removed on the way."""
        with self._storage_errors():
            ids = []
            stale = []
            for m in self._indexed_uploads(stale=stale):
                if m.completed or incomplete_ttl is not None:
                    state = self._snapshot(m)
                    if is_expired(state.completed_at, state.updated_at, now, incomplete_ttl,
                                  retention):
                        ids.append(m.file_id)
            for info, manifest in stale:
                if manifest is None or manifest.deleting:
                    if manifest is not None:
                        self._finish_delete(manifest)
                    elif info.last_modified < now - ORPHAN_GRACE_S:
                        self._delete_quietly(info.key)   # its upload never got a manifest
            return ids

    def sweep(self, incomplete_ttl=None, retention=None, now=None):
        """Delete expired uploads (storage.Store.sweep: each re-checked under its lock),
        finish what crashed nodes left (every node may run this: each step is safe to
        repeat), and once every ORPHAN_SCAN_INTERVAL_S remove orphaned objects (at once in
        `m1server.py gc`)."""
        now = time.time() if now is None else now
        deleted = Store.sweep(self, incomplete_ttl, retention, now)
        self.finish_abandoned()
        if self._last_orphan_scan is None or \
                time.monotonic() - self._last_orphan_scan > ORPHAN_SCAN_INTERVAL_S:
            self._last_orphan_scan = time.monotonic()
            with self._storage_errors():
                self.collect_orphans(now)
        return deleted

    def finish_abandoned(self):
        """Every upload with all chunks in but not assembled is finished; backlogs of unfolded
        bytes are folded; completed uploads without a sha256 are hashed. Returns a count of
        the uploads it had to work on."""
        worked = 0
        with self._storage_errors():
            for m in list(self._indexed_uploads()):
                if m.completed:
                    if m.sha256 is None:
                        self._hasher.submit(m.file_id)
                        worked += 1
                    continue
                try:
                    progress = _Progress(m, self._chunks(m))
                    if progress.complete(m):
                        self._finish(m.file_id)
                        worked += 1
                    elif progress.bytes - m.cursor >= m.part_bytes:
                        self._folder.submit(m.file_id)
                        worked += 1
                except (S3Error, StoreError) as error:     # one upload must not stop the rest
                    log.warning("finishing %s failed (retried later): %s", m.file_id, error)
        return worked

    def collect_orphans(self, now):
        """Objects of generations no manifest names (a deletion raced by a chunk upload),
        chunk objects of completed uploads (a node died before its cleanup) and multipart
        uploads no manifest names, older than ORPHAN_GRACE_S, are removed."""
        prefix = self._key("uploads") + "/"
        manifests = {}
        removed = 0
        for info in list(self.client.iter_objects(prefix)):
            rest = info.key[len(prefix):].split("/")
            if len(rest) < 3 or info.last_modified > now - ORPHAN_GRACE_S:
                continue
            file_id, generation = rest[0], rest[1]
            if file_id not in manifests:
                manifests[file_id] = self._load(file_id) if valid_file_id(file_id) else None
            m = manifests[file_id]
            if m is None or m.generation != generation or \
                    (m.completed and len(rest) == 4 and rest[2] == "c"):
                self._delete_quietly(info.key)
                removed += 1
        for key, upload_id, initiated in self.client.list_multipart_uploads(prefix):
            rest = key[len(prefix):].split("/")
            if initiated > now - ORPHAN_GRACE_S or not rest or not valid_file_id(rest[0]):
                continue
            m = manifests.get(rest[0]) or self._load(rest[0])
            if m is None or m.upload_id != upload_id or m.completed:
                with contextlib.suppress(S3Error):
                    self.client.abort_multipart_upload(key, upload_id)
                    removed += 1
        if removed:
            log.warning("gc: removed %d orphaned object(s) or multipart upload(s)", removed)
        return removed

    # -- start-up ---------------------------------------------------------------------------

    def repair(self):
        """Start-up: part files of requests cut short are removed (localdisk: what is not a
        part file is set aside); the bucket is scanned in the background (starting must stay
        fast) for uploads a dead node left unfinished."""
        self.folder.make_own_dirs((self.temp_dir, self.incoming_dir))
        self.folder.clear_incoming()
        if self.one_shot:
            return 0                              # gc's sweep scans, in the foreground

        def scan():
            try:
                worked = self.finish_abandoned()
                if worked:
                    log.warning("repair: took over %d upload(s) left unfinished", worked)
            except StoreError as error:            # the store is down or refuses us
                log.warning("repair: cannot scan the bucket (the sweep will retry): %s",
                            error.message)
            except Exception:
                log.exception("repair: scanning the bucket failed (the sweep will retry)")

        threading.Thread(target=scan, name="m1-s3-repair", daemon=True).start()
        return 0

    def observe_storage(self, callback):
        """callback(operation, outcome) for each request s3client retried or gave up on."""
        self.client.observer = callback

    def close(self):
        self._folder.stop()
        self._hasher.stop()
        self.client.close()
        self._probe.close()

    # -- room in the bucket for feature modules (tus.py): a second store, shared records -----

    def sibling(self, name, allow_any_content=True):
        """A second store beside this one, under P/<name>/ in the same bucket (its local
        part files in <root>/<name>/), as ChunkStore.sibling: tus keeps partial uploads
        there. It has its own client, so each store closes its own."""
        client = s3client.S3Client(self.bucket, endpoint=self.client.endpoint,
                                   region=self.client.region,
                                   credentials=self.client.credentials,
                                   addressing=self.client.addressing)
        client.observer = self.client.observer
        return S3Store(client, self._key(name), os.path.join(self.root, name),
                       allow_any_content=allow_any_content,
                       max_upload_bytes=self.max_upload_bytes, part_bytes=self.part_bytes,
                       min_free_bytes=self.folder.min_free_bytes)

    def json_folder(self, name):
        """Small JSON records and empty markers under P/<name>/, shared by every node
        (JsonFolder, at the end of this module). Only a store that has this method can keep
        a feature's records where every node sees them."""
        return JsonFolder(self, self._key(name) + "/")

    # -- processing (the interface the processing module uses in both modes) ----------------

    @contextlib.contextmanager
    def media_file(self, upload):
        """A local file holding the assembled video, for tools such as ffprobe: here a
        download into the temp folder, removed afterwards."""
        media = self.open_media(upload)
        if media is None:
            raise StoreError(404, "not_found", "upload %s is not complete" % upload.file_id)
        path = os.path.join(self.temp_dir, "%s.%s.download" % (uuid.uuid4().hex, upload.ext))
        try:
            with self._storage_errors(), open(path, "wb") as f:
                self._read_object(media.key, f.write)
            yield path
        finally:
            self.discard(path)

    def put_derivative(self, upload, name, path, content_type=None):
        """Store a derivative (poster.jpg, remux.webm, ...) of a completed upload."""
        with self._storage_errors():
            self.client.put_object(self._derived_key(upload.manifest,
                                                     check_derivative_name(name)),
                                   FileRegion(path), content_type=content_type)

    def open_derivative(self, upload, name):
        """A derivative to serve, like open_media; None when there is none."""
        key = self._derived_key(upload.manifest, check_derivative_name(name))
        with self._storage_errors():
            try:
                head = self.client.head_object(key)
            except S3Error as error:
                if error.status == 404:
                    return None
                raise
        size = int(head.header("content-length") or 0)
        redirect = self.client.presigned_url(key, PRESIGN_EXPIRES_S) if self.presign else None
        return ObjectMedia(self, key, size, head.header("etag"), upload.manifest.completed_at,
                           redirect)

    # -- processing jobs shared through the bucket (processing.SharedJobQueue's storage) ----
    #
    # A store that offers change_job shares its processing queue between nodes (processing.py
    # picks its queue by that, in one place). The job itself is the `job` field of the
    # upload's manifest, changed by compare-and-swap like every other field, so a status read
    # (which reads the manifest anyway) sees it without another request. While a job is
    # queued or running, an empty marker P/jobs/<fileId> lets workers find work with one
    # LIST per poll. The policy (states, leases, retries) is processing.py's; these only
    # store. P/processing.json holds when the shared queue was first used (its createdAt).

    def job_of(self, upload):
        """The `job` field of the manifest `upload` was read from (a copy), or None."""
        job = upload.manifest.data.get("job") if upload is not None else None
        return copy.deepcopy(job) if job is not None else None

    def change_job(self, file_id, change):
        """Compare-and-swap the job of a completed upload: `change(job)` gets a copy of the
        job (None when there is none) and returns the new job, or None to leave it as it is.
        It may be called again after a lost race, with what the winner wrote. Returns the job
        as stored afterwards; StoreError upload_gone when the upload is gone or deleting."""
        def edit(data):
            if data.get("deleting") or data.get("completedAt") is None:
                raise StoreError(409, "upload_gone", "upload %s is gone" % file_id)
            new = change(copy.deepcopy(data.get("job")))
            if new is None:
                return False
            data["job"] = new
            return True
        with self._storage_errors():
            manifest = self._load(file_id)
            if manifest is None:
                raise StoreError(409, "upload_gone", "upload %s is gone" % file_id)
            return copy.deepcopy(self._update(manifest, edit).data.get("job"))

    def put_job_marker(self, file_id):
        with self._storage_errors():
            self.client.put_object(self._job_marker_key(file_id), b"")

    def drop_job_marker(self, file_id):
        with self._storage_errors():
            self._delete_quietly(self._job_marker_key(file_id))

    def job_markers(self):
        """[(fileId, when the marker was written)] of the queued and running jobs, oldest
        first: one LIST (a page per 1000 jobs)."""
        prefix = self._key("jobs") + "/"
        with self._storage_errors():
            found = [(info.key[len(prefix):], info.last_modified)
                     for info in self.client.iter_objects(prefix)]
        return sorted((f for f in found if valid_file_id(f[0])), key=lambda f: (f[1], f[0]))

    def job_queue_created_at(self):
        """When processing first used this bucket prefix (P/processing.json, created once
        with If-None-Match: *, so every node reads the same time). Never written into a
        bucket that is missing (some stores create one on PutObject)."""
        key = self._key("processing.json")
        with self._storage_errors():
            for _ in range(CAS_ATTEMPTS):
                try:
                    body = self.client.get_object(key).body
                    return float(json.loads(body.decode("utf-8"))["createdAt"])
                except S3Error as error:
                    if error.status != 404 or error.code == "NoSuchBucket":
                        raise
                try:
                    self.client.put_object(key, _json({"createdAt": round(time.time(), 3)}),
                                           content_type="application/json",
                                           if_none_match=True)
                except S3Error as error:
                    if error.status not in (409, 412):
                        raise
        raise StoreError(503, "storage_contention", "cannot read %s" % key)

    def completed_since(self, since):
        """Uploads completed at or after `since` whose sha256 is known (as ChunkStore's),
        oldest first: the `done/` markers written since then (one LIST), then their
        manifests (a GET each, a few at a time). Processing's start-up backfill."""
        prefix = self._key("done") + "/"
        with self._storage_errors():
            ids = [info.key[len(prefix):] for info in self.client.iter_objects(prefix)
                   if info.last_modified >= since - DONE_MARKER_SLACK_S]
            found = [m for m in _in_parallel(self._load, [f for f in ids if valid_file_id(f)])
                     if m is not None and not m.deleting and m.completed and m.sha256 and
                     m.completed_at >= since]
        return [self._state(m, None) for m in sorted(found, key=lambda m: m.completed_at)]

    def _job_marker_key(self, file_id):
        return self._key("jobs", file_id)

    # -- the manifest: load, create, compare-and-swap ---------------------------------------

    def _load(self, file_id):
        found = load_json(self.client, self._manifest_key(file_id))
        return None if found is None else Manifest(*found)

    def _load_live(self, file_id):
        """The manifest, or None; a deletion found cut short is finished first."""
        manifest = self._load(file_id)
        if manifest is not None and manifest.deleting:
            self._finish_delete(manifest)
            return None
        return manifest

    def _reload(self, manifest):
        return self._load(manifest.file_id) or manifest

    def _create(self, file_id, mime_type):
        """A new upload: its index entry, then its manifest (If-None-Match: *). When another
        node created it first, theirs is used and our index entry removed (it would name a
        creation time no manifest has)."""
        created_ms = int(time.time() * 1000)
        ext = extension_for(mime_type) or DEFAULT_EXTENSION
        data = {"version": MANIFEST_VERSION, "fileId": file_id,
                "generation": uuid.uuid4().hex[:16], "createdAt": created_ms / 1000.0,
                "updatedAt": created_ms / 1000.0, "mimeType": mime_type, "ext": ext,
                "partBytes": self.part_bytes, "uploadId": None, "parts": [], "records": [],
                "lastIndex": None, "completedAt": None, "size": None, "etag": None,
                "sha256": None}
        index_key = self._index_key(created_ms, file_id)
        self.client.put_object(index_key, b"")
        etag = create_json(self.client, self._manifest_key(file_id), data)
        if etag is not None:
            return Manifest(data, etag)
        self._delete_quietly(index_key)
        manifest = self._load_live(file_id)
        if manifest is None:
            return self._create(file_id, mime_type)
        return manifest

    def _update(self, manifest, change, touch=True):
        """Compare-and-swap: `change(data)` edits a copy and returns True to write it (False:
        nothing to do). A lost race re-reads and asks `change` again, so every change must be
        written as "make it so" against whatever is there (update_json, at the end). With
        `touch`, updatedAt says now (retention's marks leave it: it is what they judge by)."""
        if manifest is None:
            raise StoreError(409, "upload_gone", "the upload was deleted meanwhile")

        def stamped(data):
            if not change(data):
                return False
            if touch:
                data["updatedAt"] = round(time.time(), 3)
            return True
        found = update_json(self.client, self._manifest_key(manifest.file_id),
                            (manifest.data, manifest.etag), stamped)
        if found is None:
            raise StoreError(409, "upload_gone", "the upload was deleted meanwhile")
        return Manifest(*found)

    # -- chunk objects and fold records -----------------------------------------------------

    def _chunks(self, m):
        """index -> ObjectInfo of the chunk objects of the upload's generation, from chunk
        `m.folded_chunks` on (the folded ones' objects stay until completion, unlisted)."""
        prefix = self._chunk_prefix(m)
        after = self._chunk_key(m, m.folded_chunks - 1) if m.folded_chunks else None
        found = {}
        for info in self.client.iter_objects(prefix, start_after=after):
            name = info.key[len(prefix):]
            if name.isdigit():
                found[int(name)] = info
        return found

    def _head_chunk(self, m, index):
        """(size, sha256) of a chunk object, None when it does not exist."""
        try:
            head = self.client.head_object(self._chunk_key(m, index))
        except S3Error as error:
            if error.status == 404:
                return None
            raise
        return int(head.header("content-length") or 0), head.metadata.get(SHA256_META)

    def _known_chunk(self, m, chunks, index):
        """(size, sha256) of chunk `index` as the bucket knows it, or None."""
        if index < m.folded_chunks or (m.completed and index <= m.last_index):
            return self._folded_chunk(m, index)
        if index in chunks:
            known = self._head_chunk(m, index)
            if known is not None:
                return known
            fresh = self._reload(m)                 # folded and deleted since our listing
            if index < fresh.folded_chunks:
                return self._folded_chunk(fresh, index)
        return None

    def _folded_chunk(self, m, index):
        for first, end in m.records:
            if first <= index < end:
                return tuple(self._record(m, first, end)[index - first])
        raise StoreError(500, "storage_inconsistent",
                         "upload %s: no fold record holds chunk %d" % (m.file_id, index))

    def _record(self, m, first, end):
        key = self._record_key(m, first, end)
        with self._records_lock:
            if key in self._records:
                return self._records[key]
        entries = json.loads(self.client.get_object(key).body.decode("utf-8"))
        with self._records_lock:
            if len(self._records) >= RECORD_CACHE_SIZE:
                self._records.pop(next(iter(self._records)))
            self._records[key] = entries
        return entries

    def _write_record(self, m, first, end, entries):
        """The sizes and hashes of chunks first..end-1, before their objects may go. The same
        (first, end) always gets the same content, so a second write is harmless."""
        self.client.put_object(self._record_key(m, first, end), _json(entries),
                               content_type="application/json")

    def _delete_quietly(self, key):
        try:
            self.client.delete_object(key)
        except S3Error as error:
            if error.status != 404:
                raise

    # -- folding: chunk objects -> fixed-size parts -> the assembled object -----------------

    def _fold_in_background(self, file_id):
        try:
            self._fold(file_id, finish=False)
        except (S3Error, StoreError) as error:
            log.warning("folding %s stopped (the next chunk or the sweep resumes it): %s",
                        file_id, error)

    def _finish(self, file_id):
        """Fold everything that is left, tail included, and complete the object (inline:
        the client is told `completed` only once the video exists)."""
        return self._fold(file_id, finish=True)

    def _fold(self, file_id, finish):
        """Fold whole parts while there are enough contiguous bytes; with `finish`, also the
        tail and the completion. Each pass re-reads the bucket, so any node may run it at any
        time, even twice at once: every write is conditional or idempotent."""
        with self._fold_locks.held(file_id):
            vanished = 0
            while True:
                try:
                    manifest = self._fold_pass(file_id, finish)
                except S3Error as error:
                    # A chunk object this pass read is gone: another node folded it (and
                    # deleted it) since we listed. Re-read the bucket and go on from there.
                    if error.status != 404 or vanished >= FOLD_VANISHED_RETRIES:
                        raise
                    vanished += 1
                    continue
                if manifest is not _AGAIN:
                    return manifest

    def _fold_pass(self, file_id, finish):
        """One pass of _fold: returns the manifest when there is nothing more to do, or
        _AGAIN after a step (so the caller looks again)."""
        manifest = self._load(file_id)
        if manifest is None or manifest.deleting or manifest.completed:
            return manifest
        chunks = self._chunks(manifest)
        manifest = self._reload(manifest)
        if manifest.completed or manifest.deleting:
            return _AGAIN
        progress = _Progress(manifest, chunks)
        cursor, part = manifest.cursor, manifest.part_bytes
        whole = progress.complete(manifest)
        if finish and whole and not manifest.parts and progress.bytes <= part:
            self._put_whole(manifest, progress)
        elif progress.bytes - cursor >= part:
            self._fold_part(manifest, progress, cursor, cursor + part)
        elif finish and whole and progress.bytes > cursor:
            self._fold_part(manifest, progress, cursor, progress.bytes)
        elif finish and whole:
            self._complete(manifest, progress)
        else:
            return manifest
        return _AGAIN

    def _put_whole(self, m, progress):
        """A small upload (<= P bytes): one PutObject of all its chunks, If-None-Match."""
        entries, pieces = [], []
        for index, _, info in progress.run:
            response = self.client.get_object(info.key)
            digest = hashlib.sha256(response.body).hexdigest()
            if digest != response.metadata.get(SHA256_META):
                raise StoreError(500, "storage_inconsistent", "chunk object %s does not hold "
                                 "the bytes it was stored with" % info.key)
            entries.append([len(response.body), digest])
            pieces.append(response.body)
        body = b"".join(pieces)
        last = m.last_index
        self._write_record(m, 0, last + 1, entries)
        key = self._final_key(m)
        try:
            etag = self.client.put_object(key, body, content_type=MEDIA_TYPES.get(m.ext),
                                          if_none_match=True)
        except S3Error as error:
            if error.status not in (409, 412):
                raise
            etag = self._existing_final(m, len(body))
        self._crash.passed("object_written")
        sha256 = hashlib.sha256(body).hexdigest()

        def change(data):
            if data.get("completedAt") is not None or data["generation"] != m.generation:
                return False
            data.update(completedAt=round(time.time(), 3), size=len(body), etag=etag,
                        sha256=sha256, records=[[0, last + 1]])
            return True
        done = self._update(m, change)
        self._after_completion(done, emit=done.sha256 == sha256 and done.final_etag == etag)

    def _fold_part(self, m, progress, start, end):
        """Part n = bytes [start, end) of the upload, from the chunk objects holding them."""
        number = len(m.parts) + 1
        if number > MAX_PARTS:
            raise StoreError(413, "upload_too_large", "upload needs more than %d parts"
                             % MAX_PARTS)
        if not m.upload_id:
            m = self._start_multipart(m)
            return                                  # the manifest changed: look again
        key = self._final_key(m)
        pieces = [(i, off, info) for i, off, info in progress.run
                  if off < end and off + info.size > start]
        hashes = {}
        if len(pieces) == 1 and pieces[0][2].size > 0:
            index, offset, info = pieces[0]
            etag = self.client.upload_part_copy(key, m.upload_id, number, info.key,
                                                (start - offset, end - offset - 1))
        else:
            def read(piece):
                index, offset, info = piece
                lo, hi = max(start, offset), min(end, offset + info.size)
                whole = lo == offset and hi == offset + info.size
                response = self.client.get_object(info.key, None if whole else
                                                  (lo - offset, hi - offset - 1))
                if whole:
                    digest = hashlib.sha256(response.body).hexdigest()
                    if digest != response.metadata.get(SHA256_META):
                        raise StoreError(500, "storage_inconsistent", "chunk object %s does "
                                         "not hold the bytes it was stored with" % info.key)
                    hashes[index] = digest
                return response.body
            data = b"".join(_in_parallel(read, pieces))
            if len(data) != end - start:
                raise StoreError(500, "storage_inconsistent", "part %d of %s: read %d bytes, "
                                 "expected %d" % (number, m.file_id, len(data), end - start))
            etag = self.client.upload_part(key, m.upload_id, number, data,
                                           sha256=hashlib.sha256(data).hexdigest())
        self._crash.passed("part_uploaded")
        first = m.folded_chunks
        folded = [(i, off, info) for i, off, info in progress.run if off + info.size <= end]
        new_end = folded[-1][0] + 1 if folded else first
        end_offset = folded[-1][1] + folded[-1][2].size if folded else m.folded_offset
        if new_end > first:
            entries = []
            for index, _, info in folded:
                digest = hashes.get(index)
                if digest is None:
                    stored = self._head_chunk(m, index)
                    if stored is None:
                        return                      # folded by another node meanwhile
                    digest = stored[1]
                entries.append([info.size, digest])
            self._write_record(m, first, new_end, entries)
        entry = {"n": number, "etag": etag, "from": start, "to": end, "end": new_end,
                 "endOffset": end_offset}

        def change(data):
            if data.get("uploadId") != m.upload_id or len(data.get("parts", [])) != number - 1:
                return False                        # another node recorded this part first
            data["parts"] = data.get("parts", []) + [entry]
            if new_end > first:
                data["records"] = data.get("records", []) + [[first, new_end]]
            return True
        self._update(m, change)
        self._crash.passed("part_recorded")     # chunk objects stay until completion

    def _start_multipart(self, m):
        key = self._final_key(m)
        upload_id = self.client.create_multipart_upload(key, content_type=MEDIA_TYPES.get(m.ext))

        def change(data):
            if data.get("uploadId"):
                return False
            data["uploadId"] = upload_id
            return True
        updated = self._update(m, change)
        if updated.upload_id != upload_id:          # another node's won: ours is not needed
            with contextlib.suppress(S3Error):
                self.client.abort_multipart_upload(key, upload_id)
        return updated

    def _complete(self, m, progress):
        """Every byte is in a part: complete the multipart upload (If-None-Match: *), record
        it, then remove what is no longer needed."""
        key, total, last = self._final_key(m), progress.bytes, m.last_index
        first = m.folded_chunks
        if first <= last:                           # trailing empty chunks: no part holds them
            entries = []
            for index in range(first, last + 1):
                stored = self._head_chunk(m, index)
                if stored is None:
                    return                          # another node completed and cleaned up
                entries.append(list(stored))
            self._write_record(m, first, last + 1, entries)
        parts = [(part["n"], part["etag"]) for part in m.parts]
        try:
            etag = self.client.complete_multipart_upload(key, m.upload_id, parts,
                                                         if_none_match=True)
        except S3Error as error:
            if error.status not in (404, 409, 412):
                raise
            etag = self._existing_final(m, total)   # completed already (by us or another)
        self._crash.passed("object_completed")

        def change(data):
            if data.get("completedAt") is not None or data["generation"] != m.generation:
                return False
            data.update(completedAt=round(time.time(), 3), size=total, etag=etag)
            if first <= last:
                data["records"] = data.get("records", []) + [[first, last + 1]]
            return True
        done = self._update(m, change)
        self._after_completion(done, emit=False)
        self._hasher.submit(m.file_id)

    def _existing_final(self, m, size):
        """The final object a conditional write found: it must be this upload's."""
        try:
            head = self.client.head_object(self._final_key(m))
        except S3Error as error:
            if error.status == 404:
                raise StoreError(503, "storage_unavailable", "upload %s: the object store "
                                 "lost the multipart upload before it was complete"
                                 % m.file_id, {"Retry-After": "5"})
            raise
        if int(head.header("content-length") or -1) != size:
            raise StoreError(500, "storage_inconsistent", "upload %s: the assembled object "
                             "has %s bytes, expected %d" % (m.file_id,
                                                            head.header("content-length"), size))
        return head.header("etag")

    def _after_completion(self, m, emit):
        self._crash.passed("completion_recorded")
        self.client.put_object(self._done_key(m.file_id), b"")
        self._drop_chunk_objects(m)
        log.info("upload %s completed: %d chunks, %d bytes", m.file_id, m.last_index + 1,
                 m.size)
        if emit:
            self._emit_completed(m)

    def _drop_chunk_objects(self, m):
        """A completed upload's chunk objects (the assembled object holds their bytes). Done
        after completion, and again by the hasher: a node that died between the two leaves
        them, and the hasher runs again for an upload with no sha256."""
        _in_parallel(self._delete_quietly,
                     [info.key for info in self.client.iter_objects(self._chunk_prefix(m))])

    def _emit_completed(self, m):
        self._emit("completed", m.file_id, size=m.size, sha256=m.sha256, ext=m.ext,
                   mimeType=m.mime_type)

    # -- the assembled file's sha256, computed after completion -----------------------------

    def _hash_if_forgotten(self, m):
        if m.sha256 is None and time.time() - m.completed_at > HASH_GRACE_S:
            self._hasher.submit(m.file_id)

    def _hash_in_background(self, file_id):
        try:
            m = self._load(file_id)
            if m is None or not m.completed or m.sha256 is not None:
                return
            digest = hashlib.sha256()
            self._read_object(self._final_key(m), digest.update)
            value = digest.hexdigest()

            def change(data):
                if data.get("sha256") or data["generation"] != m.generation:
                    return False
                data["sha256"] = value
                return True
            done = self._update(m, change)
            self._drop_chunk_objects(done)
            if done.sha256 == value:
                self._emit_completed(done)
        except (S3Error, StoreError) as error:
            log.warning("hashing %s failed (retried on a later status): %s", file_id, error)

    def _read_object(self, key, consume):
        """consume(block) for the whole object at `key`, a block at a time."""
        with self.client.open_object(key) as stream:
            for block in iter(lambda: stream.read(STREAM_BLOCK_BYTES), b""):
                consume(block)

    # -- errors -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _storage_errors(self):
        """S3's failures, as the StoreError the HTTP edge answers with (one place)."""
        try:
            yield
        except S3Error as error:
            log.warning("object store: %s", error)
            raise storage_error(error, self.bucket)


# ---------------------------------------------------------------------------------------------
# Serving the assembled object
# ---------------------------------------------------------------------------------------------

class ObjectMedia(Media):
    """A completed upload's object: size, ETag, mtime for the headers; `open_range` streams
    bytes from the store, or `redirect_url` sends the client to a presigned URL instead."""

    def __init__(self, store, key, size, etag, mtime, redirect_url=None):
        self.store = store
        self.key = key
        self.size = size
        self.etag = '"%s"' % (etag or "").strip('"')
        self.mtime = mtime
        self.redirect_url = redirect_url

    def open_range(self, start, count):
        """Start reading bytes [start, start+count) (errors come out here, before any header
        is sent); the returned reader's send() copies them to the client."""
        with self.store._storage_errors():
            stream = self.store.client.open_object(self.key, (start, start + count - 1))
        return _StreamRange(stream, start, count, self.key)


class _StreamRange(MediaRange):
    def send(self, sock, wfile):
        remaining = self._count
        while remaining > 0:
            try:
                block = self._source.read(min(remaining, STREAM_BLOCK_BYTES))
            except OSError as error:
                block = b""
                log.warning("object store stopped sending %s: %s", self._name, error)
            if not block:
                # the status line is out: all we can do is cut the connection short
                raise ConnectionAbortedError("object store sent %d bytes less than promised"
                                             % remaining)
            wfile.write(block)
            remaining -= len(block)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def choose_part_bytes(wanted, max_upload_bytes):
    """P: at least S3's minimum, and large enough that MAX_PARTS parts hold the largest
    upload (rounded up to whole MiB)."""
    part = max(int(wanted or DEFAULT_PART_BYTES), MIN_PART_BYTES)
    if max_upload_bytes:
        needed = -(-int(max_upload_bytes) // MAX_PARTS)
        part = max(part, -(-needed // (1 << 20)) << 20)
    return part


def _in_parallel(work, items):
    """[work(item) for item in items], up to PARALLEL_REQUESTS at a time (many small GETs or
    DELETEs are latency, not bandwidth); the first exception is raised."""
    items = list(items)
    if len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(PARALLEL_REQUESTS, len(items))) as pool:
        return list(pool.map(work, items))


def _mark_deleting(data):
    if data.get("deleting"):
        return False
    data["deleting"] = True
    return True


def _mark_expiring(data, token):
    """The sweep's first step: a mark that any node storing a new chunk clears (_revive)."""
    if data.get("deleting") or data.get("expiring") == token:
        return False
    data["expiring"] = token
    return True


def _unmark_expiring(data, token):
    if data.get("expiring") != token:
        return False
    del data["expiring"]
    return True


def _expire(data, token):
    """The sweep's last step: `deleting`, only while its own mark is still there."""
    if data.get("deleting") or data.get("expiring") != token:
        return False
    del data["expiring"]
    data["deleting"] = True
    return True


def _revive(data):
    """A new chunk was stored: a sweep's `expiring` mark must not turn into `deleting`."""
    if data.get("deleting") or not data.get("expiring"):
        return False
    del data["expiring"]
    return True


class _DeletedMeanwhile(Exception):
    """put_chunk: the upload was deleted while this chunk was being stored; start afresh."""


def _json(data):
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# JSON objects changed by compare-and-swap: the manifest's mechanics, for any small record
# ---------------------------------------------------------------------------------------------

def load_json(client, key):
    """(data, ETag) of the JSON object at `key`, or None when there is none."""
    try:
        response = client.get_object(key)
    except S3Error as error:
        if error.status == 404 and error.code in ("NoSuchKey", "NotFound"):
            return None
        raise
    return json.loads(response.body.decode("utf-8")), response.header("etag")


def create_json(client, key, data):
    """Write `data` at `key` only if nothing is there (If-None-Match: *): its ETag, or None
    when the key exists (another request, maybe on another node, created it first)."""
    try:
        return client.put_object(key, _json(data), content_type="application/json",
                                 if_none_match=True)
    except S3Error as error:
        if error.status not in (409, 412):
            raise
    return None


def update_json(client, key, found, change):
    """Compare-and-swap on `found` = (data, ETag) as read: `change(data)` edits a copy and
    returns True to write it (If-Match: ETag), False when there is nothing to do. A lost race
    (412, or 409 for a concurrent conditional write) re-reads and asks `change` again, so
    every change must say "make it so" against whatever is there. Returns (data, ETag)
    afterwards, or None when the object is gone; 503 after CAS_ATTEMPTS lost races."""
    for _ in range(CAS_ATTEMPTS):
        if found is None:
            return None
        data = copy.deepcopy(found[0])
        if not change(data):
            return found
        try:
            etag = client.put_object(key, _json(data), content_type="application/json",
                                     if_match=found[1])
            return data, etag
        except S3Error as error:
            if error.status not in (409, 412):
                raise
        found = load_json(client, key)
    raise StoreError(503, "storage_contention", "too many nodes changed %s at once" % key)


class JsonFolder:
    """JSON records and empty markers under one key prefix, for a feature module's shared
    state (tus.py's records). Records are created if absent and changed by compare-and-swap
    (the functions above); markers are empty objects whose LastModified is their data, so a
    sweep can find what it must look at with one listing instead of reading every record.
    S3's failures come out as StoreError, like every S3Store call."""

    def __init__(self, store, prefix):
        self._store = store
        self.prefix = prefix

    def get(self, name):
        """(data, ETag) of record `name`, or None."""
        with self._store._storage_errors():
            return load_json(self._store.client, self.prefix + name)

    def create(self, name, data):
        """True when the record was created; False when `name` exists already."""
        with self._store._storage_errors():
            return create_json(self._store.client, self.prefix + name, data) is not None

    def update(self, name, found, change):
        """update_json on record `name` as read (`found`); None once it is gone."""
        with self._store._storage_errors():
            return update_json(self._store.client, self.prefix + name, found, change)

    def put_marker(self, name):
        with self._store._storage_errors():
            self._store.client.put_object(self.prefix + name, b"")

    def delete(self, name, if_match=None):
        """Remove `name` (record or marker); absent is fine. With `if_match`, only while it
        still has that ETag (False when it changed meanwhile)."""
        with self._store._storage_errors():
            try:
                self._store.client.delete_object(self.prefix + name, if_match=if_match)
            except S3Error as error:
                if error.status == 412:
                    return False
                if error.status != 404:
                    raise
        return True

    def list(self, folder):
        """[(name, LastModified)] of the objects under `folder` (a prefix ending in /)."""
        start = self.prefix + folder
        with self._store._storage_errors():
            return [(info.key[len(start):], info.last_modified)
                    for info in self._store.client.iter_objects(start)]
