"""tus.py - the tus 1.0 resumable upload protocol at /files/, on top of the chunk store.

What it is: a tus 1.0.0 server (https://tus.io/protocols/resumable-upload) with the core
protocol (HEAD, PATCH, OPTIONS) and the extensions creation, creation-with-upload,
creation-defer-length, termination, checksum (sha1, md5, sha256, sha512, crc32), expiration
and concatenation, so that tus clients written elsewhere (tus-js-client, Uppy, tuspy) upload
to m1server unchanged.

The design in one sentence: a tus upload IS a chunk-store upload. Its URL is
/files/<fileId>, and every PATCH (or the part of it that arrived) is stored through the store
interface as the upload's next chunk index: chunkstore.py appends it to uploads/<fileId>.<ext>
(local mode), s3store.py keeps it in the bucket (--storage s3://...). So a tus upload shares the
seed API's fileId namespace, status, playback and events, and the store's crash-safety argument
covers its bytes unchanged: tus adds no second way of writing a video, and no `if s3` either.

What it guarantees:
  * HEAD's Upload-Offset is always the store's consistent length: the file's first Upload-Offset
    bytes are exactly the bytes the client sent, after any crash (the store repairs the rest).
  * A PATCH streams its body into part files of at most --tus-piece-size bytes (one reusable
    1 MiB buffer: memory stays flat whatever the size) and stores each full piece as the next
    chunk, durable (fsync; in S3 mode: the chunk object exists) before the 204. A PATCH that
    breaks off (connection closed or reset, client silent for --timeout, taken over, server
    stopping) stores the bytes that did arrive and never a torn piece.
  * One PATCH at a time per upload, never interleaved: a request for an upload takes its
    *claim* first (per process; between nodes the store decides, see "S3 mode" below). SPEC
    section 4: a new HEAD, PATCH or DELETE for an upload whose earlier PATCH is still open
    stops that PATCH (its socket is shut for reading), which stores what it received and lets
    go, so resuming never waits on a dead connection. Claims are held across network reads;
    the store's own per-upload lock is only held inside each store call.
  * With Upload-Checksum nothing is stored until the whole body arrived and matched (460 and
    nothing appended otherwise; a body that breaks off is dropped whole, it cannot be checked).
  * Unfinished uploads expire --tus-expiry after their last activity (Upload-Expires says
    when; 0 turns expiration off); a sweep thread deletes them and keeps a tombstone so they
    answer 410 Gone.

Where tus keeps what is not bytes (its records: kind, length, metadata, times, tombstones) is
chosen once, by what the store offers (open_table): the local store lends its ledger file
(table tus_uploads); a store that keeps shared JSON records in its bucket (S3Store.json_folder)
gets them there, so that every node serves every tus request. Partial uploads live in the
store's `sibling` (a second store: --dir/tus-partials/, or P/tus-partials/ in the bucket).

S3 mode: the records in the bucket, under the store's prefix P:
    P/tus/records/<id>.json   the record (JSON); created with If-None-Match: * (409
                              file_id_taken when it exists), changed only by compare-and-swap
                              (If-Match: ETag; a lost race re-reads and decides again)
    P/tus/open/<id>           empty marker while the record is open (can expire, or is a
                              final not yet concatenated): the sweep lists these, and GETs
                              only their records - finished uploads cost it nothing
    P/tus/gone/<id>           empty tombstone marker; its LastModified is when the upload
                              expired, and the purge goes by it
  Why a crash between any two steps is harmless (each step is also safe to repeat):
    * creation writes the open marker BEFORE the record: a record never exists unseen by the
      sweep. A marker whose record is absent (crash, or a creation that lost its race) or no
      longer open is deleted by the sweep once MARKER_GRACE_S old (younger: the creation may
      be in flight).
    * finishing (set_done) and expiry change the record first and delete the open marker
      after; a crash leaves a marker the sweep removes, as above.
    * expiry writes the tombstone marker BEFORE the record says expired, so every expired
      record has one (the sweep also re-creates it for an expired record whose open marker it
      still finds); a tombstone marker whose record is not expired (a crash before the change,
      or the name used again) is simply deleted by the purge.
    * the purge deletes the record (If-Match: the ETag it read, so a record changed meanwhile
      stays) before the tombstone marker; termination deletes the record before its markers.
      Markers without a record are removed later; a record is never left without a way back.
  Between nodes: claims (one request per upload at a time, the takeover of SPEC section 4) are
  per process. A HEAD on node B does not stop a PATCH open on node A; two PATCHes of one upload
  on two nodes are decided by the store's chunk indices: the first to store chunk n wins (the
  same bytes again are a duplicate, harmless), the other's chunk n is a chunk_conflict, which
  ends that PATCH with 409 offset_conflict (and the upload's real Upload-Offset); HEAD on any
  node then says where the upload stands. Two nodes' sweeps may expire the same upload at
  once: every step is idempotent.

Decisions (and why):
  * Upload-Metadata: `fileId` names the upload (it must match the seed's fileId rule, 400
    otherwise; one is generated when absent; 409 when taken). `filetype` picks the extension
    as the seed's mimeType does (415 for a type the server does not store); without it, a
    known extension on `filename` does; `application/octet-stream` counts as absent.
  * SPEC section 1's chunk-0 media signature applies: the first bytes of an upload must be
    WebM, MP4 or Ogg (415) unless --allow-any-content. A partial upload of a concatenation is
    only a piece of a file, so partials are not videos: they live in a chunk store of their
    own (uploads/tus-partials/, no signature rule, never listed, no events), and the rule is
    applied to the final upload, whose chunk 0 is the first partial. Their ids are generated.
  * A final upload is built at once (concatenation-unfinished is not offered): partial i is
    stored as chunk i of the final, read through the partials store's media_file (local: the
    file itself, hard-linked into the incoming folder; S3: a download to a temp file), so a
    partial stays reusable and deletable; each chunk durable, a crash midway is resumed at
    start-up (by any node in S3 mode). Partials are kept (they may be reused) until they
    expire.
  * Checksums: sha1, md5 (when the interpreter allows it), sha256, sha512 from hashlib, and
    crc32 from zlib, whose Base64 value is that of the 4-byte big-endian CRC-32.
  * Terminated uploads are forgotten (404); expired ones keep a tombstone (410) for
    TOMBSTONE_KEEP_S.
  * The status fields of a finished upload are remembered per upload (STATUS_CACHE_SIZE):
    in S3 mode reading the record was a GET on every status and on every upload of a listing.
  * Location is an absolute URL (handler.absolute_url: --public-url, else the request's
    checked Host, or X-Forwarded-Host/-Proto with --trust-proxy), as tusd answers: the
    protocol allows a path, but checkers built on curl or Hurl follow only a URL. The
    status field `tus.uploadUrl` stays a path (JSON bodies keep relative URLs:
    docs/security.md, "The HTTP edge").

What it does not do: concatenation-unfinished, checksum-trailer, the challenge extension,
GET downloads of /files/<id> (the video plays at /uploads/<fileId>.<ext>), chunked request
bodies (411, refused by httphead.py for every route), or expire uploads made with the seed
API. In S3 mode: no claims across nodes (above), no server-side copy for concatenation (a
partial passes through the node once), and the partials' own store is never swept for
orphans by `gc` (only their expiry removes them).
"""
from __future__ import annotations

import base64
import contextlib
import email.utils
import functools
import hashlib
import json
import os
import queue
import re
import shutil
import socket
import sqlite3
import threading
import time
import uuid
import zlib
from urllib.parse import unquote, urlsplit

import httphead
import options
import serverlog
import storage
from apierror import ApiError
from storage import StoreError

log = serverlog.Logger("m1server.tus")

# ---------------------------------------------------------------------------------------------
# Constants (the limits that are flags: httpapi.py's OPTIONS table, defaults in options.py)
# ---------------------------------------------------------------------------------------------

TUS_VERSION = "1.0.0"
SUPPORTED_VERSIONS = (TUS_VERSION,)
EXTENSIONS = ("creation", "creation-with-upload", "creation-defer-length", "termination",
              "checksum", "expiration", "concatenation")
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
COLLECTION_PATH = "/files/"

SWEEP_INTERVAL_S = 60.0                  # at most this long between expiry sweeps
TOMBSTONE_KEEP_S = 7 * 24 * 3600.0       # how long an expired upload still answers 410
STATUS_CACHE_SIZE = 4096                 # finished uploads whose status fields are remembered
TAKEOVER_WAIT_S = 30.0                   # how long a request waits for an upload's claim
BLOCK_BYTES = 1 << 20                    # the one receive buffer of a PATCH
PARTIALS_DIR_NAME = "tus-partials"       # the partial uploads' store: --dir/tus-partials
                                         # (local), P/tus-partials/ (S3)
# What the store answers when another request stored this upload's chunk first (only a
# request on another node can: claims serialise one node's requests).
STORE_CONFLICTS = ("chunk_conflict", "completion_conflict")

METADATA_KEY_PATTERN = re.compile(r"[!-+\--~]+\Z")       # printable ASCII but space, comma
BASE64_PATTERN = re.compile(r"[A-Za-z0-9+/]*={0,2}\Z")

# Headers a browser page may read (CORS) and send (preflight).
EXPOSED_HEADERS = options.TUS_EXPOSED_HEADERS
ALLOWED_REQUEST_HEADERS = ("Authorization, Content-Type, Origin, X-Requested-With, "
                           "X-Request-ID, X-HTTP-Method-Override, Tus-Resumable, "
                           "Upload-Length, Upload-Offset, Upload-Metadata, "
                           "Upload-Defer-Length, Upload-Concat, Upload-Checksum")
METHODS = ("POST", "HEAD", "PATCH", "DELETE", "OPTIONS")


class _Crc32:
    """zlib.crc32 behind the hashlib interface; digest() is the 4-byte big-endian CRC."""

    def __init__(self):
        self._value = 0

    def update(self, data):
        self._value = zlib.crc32(data, self._value)

    def digest(self):
        return self._value.to_bytes(4, "big")


def _checksum_algorithms():
    """name -> factory of a hashlib-like object, for the algorithms this interpreter has."""
    algorithms = {}
    for name in ("sha1", "md5", "sha256", "sha512"):
        try:
            hashlib.new(name)
        except ValueError:             # e.g. md5 on a FIPS build
            continue
        algorithms[name] = functools.partial(hashlib.new, name)
    algorithms["crc32"] = _Crc32
    return algorithms


CHECKSUMS = _checksum_algorithms()


# ---------------------------------------------------------------------------------------------
# Wiring: the routes m1server.py adds to its table
# ---------------------------------------------------------------------------------------------

def routes(endpoint):
    """Rows for m1server's routing table. Every method goes to one dispatcher per path, which
    applies X-HTTP-Method-Override and answers tus's own 405s and OPTIONS."""
    return (
        (r"/files/?", {method: endpoint.on_collection for method in httphead.METHODS}),
        (r"/files/(.+)", {method: endpoint.on_upload for method in httphead.METHODS}),
    )


# ---------------------------------------------------------------------------------------------
# The endpoint
# ---------------------------------------------------------------------------------------------

class TusEndpoint:
    """The tus protocol over a store (chunkstore.ChunkStore or s3store.S3Store).
    A request body is read through handler.open_body (m1server._Body); `body_broke_off` is
    the exception it raises when the body ends early."""

    def __init__(self, config, store, body_broke_off):
        self.config = config
        self.store = store
        self._broke_off_errors = (body_broke_off, socket.timeout, ConnectionError)
        self.table = open_table(store)
        self.claims = _Claims(TAKEOVER_WAIT_S)
        self._partials = None
        self._partials_guard = threading.Lock()
        self._status_cache = {}                # (fileId, created_at) -> status fields
        self._status_guard = threading.Lock()
        # Before serving, so that a final is whole when asked for; a store that cannot be read
        # now (S3 down, wrong key) must not stop the server: the sweep tries again.
        self._finals_pending = not self._resume_concatenations()
        store.add_listener(self._on_store_event)
        expiry = config.tus_expiry_s
        self._sweeper = _Sweeper(self, min(SWEEP_INTERVAL_S, expiry / 2) if expiry
                                 else SWEEP_INTERVAL_S)     # tombstones are purged regardless
        self.extensions = [name for name in EXTENSIONS if expiry or name != "expiration"]

    # -- dispatch ---------------------------------------------------------------------------

    def on_collection(self, handler):
        with _tus_errors():
            method = _effective_method(handler)
            if method == "OPTIONS":
                return self.options(handler)
            _check_version(handler)
            if method != "POST":
                raise _method_not_allowed(method, "POST, OPTIONS")
            return self.create(handler)

    def on_upload(self, handler, upload_id):
        with _tus_errors():
            method = _effective_method(handler)
            if method == "OPTIONS":
                return self.options(handler)
            _check_version(handler)
            action = {"HEAD": self.head, "PATCH": self.patch,
                      "DELETE": self.terminate}.get(method)
            if action is None:
                raise _method_not_allowed(method, "HEAD, PATCH, DELETE, OPTIONS")
            return action(handler, upload_id)

    # -- OPTIONS: what this server offers, and the CORS preflight ---------------------------

    def options(self, handler):
        handler.send_plain(204, {
            "Tus-Resumable": TUS_VERSION,
            "Tus-Version": ",".join(SUPPORTED_VERSIONS),
            "Tus-Extension": ",".join(self.extensions),
            "Tus-Max-Size": str(self.config.max_upload_bytes),
            "Tus-Checksum-Algorithm": ",".join(CHECKSUMS),
            "Allow": ", ".join(METHODS),
            "Access-Control-Allow-Methods": ", ".join(METHODS),
            "Access-Control-Allow-Headers": ALLOWED_REQUEST_HEADERS,
            "Access-Control-Max-Age": "86400"})

    # -- HEAD: where an upload stands ---------------------------------------------------------

    def head(self, handler, upload_id):
        with self.claims.held(upload_id, _Holder()):    # stops an open PATCH (SPEC section 4)
            resource = self._resource(upload_id)
        headers = self._upload_headers(resource)
        headers["Cache-Control"] = "no-store"
        record = resource.record
        if record.metadata and httphead.printable(record.metadata):
            # checked when stored (a folded or controlled value never gets past httphead.py),
            # and again here: an echoed value must never break the reply's lines
            headers["Upload-Metadata"] = record.metadata
        if record.kind == "partial":
            headers["Upload-Concat"] = "partial"
        elif record.kind == "final":
            headers["Upload-Concat"] = record.concat
        if record.length is None:
            headers["Upload-Defer-Length"] = "1"
        else:
            headers["Upload-Length"] = str(record.length)
        handler.send_plain(200, headers)

    # -- PATCH: validate headers -> claim -> check offset -> stream and store -> reply ---------

    def patch(self, handler, upload_id):
        if _media_type(handler.headers.get("Content-Type")) != OFFSET_CONTENT_TYPE:
            raise ApiError(415, "unsupported_media_type",
                           "a PATCH body must be Content-Type: " + OFFSET_CONTENT_TYPE)
        claimed_offset = _number_header(handler, "Upload-Offset", required=True)
        new_length = _number_header(handler, "Upload-Length")
        checksum = _parse_checksum(handler.headers.get("Upload-Checksum"))
        size = _body_length(handler)
        holder = _Holder(handler.connection)
        with self.claims.held(upload_id, holder):
            resource = self._resource(upload_id)
            if resource.record.kind == "final":
                raise ApiError(403, "final_upload", "a final upload of a concatenation "
                               "cannot be patched")
            if claimed_offset != resource.offset:
                raise ApiError(409, "offset_mismatch",
                               "Upload-Offset is %d but the upload is at %d"
                               % (claimed_offset, resource.offset),
                               {"Upload-Offset": str(resource.offset)})
            if new_length is not None:
                resource = self._set_length(resource, new_length)
            self._check_room(handler, resource, size)
            resource, broke_off = self._receive(handler, resource, size, checksum, holder)
        if broke_off:
            handler.close_connection = True
        handler.send_plain(204, self._upload_headers(resource))

    # -- POST: creation, creation-with-upload, creation-defer-length, concatenation -----------

    def create(self, handler):
        concat = _parse_concat(handler.headers.get("Upload-Concat"))
        metadata, values = self._parse_metadata(handler.headers.get("Upload-Metadata"))
        if concat is not None and concat[0] == "final":
            return self._create_final(handler, concat, metadata, values)
        length = self._creation_length(handler)
        kind = "partial" if concat == ("partial",) else "single"
        upload_id, mime_type = self._identity(kind, values)
        size = _body_length(handler, default=0)
        if size and _media_type(handler.headers.get("Content-Type")) != OFFSET_CONTENT_TYPE:
            raise ApiError(415, "unsupported_media_type", "a body sent with the creation "
                           "request must be Content-Type: " + OFFSET_CONTENT_TYPE)
        checksum = _parse_checksum(handler.headers.get("Upload-Checksum")) if size else None
        if length is not None and size > length:
            raise ApiError(413, "upload_too_large", "the body is longer than Upload-Length")
        record = _Record.new(upload_id, kind, length, metadata, values.get("filename"),
                             mime_type)
        holder = _Holder(handler.connection)
        with self.claims.held(upload_id, holder):
            self.table.insert(record)                     # durable before the 201
            resource = self._resource(upload_id)
            try:
                self._check_room(handler, resource, size)
                if size or length == 0:
                    resource, broke_off = self._receive(handler, resource, size, checksum,
                                                        holder)
                    handler.close_connection = handler.close_connection or broke_off
            except ApiError:                              # never told the client: undo it all
                self._forget(record)
                raise
        headers = self._upload_headers(resource)
        headers["Location"] = handler.absolute_url(COLLECTION_PATH + upload_id)
        if not size:
            headers.pop("Upload-Offset", None)
        handler.send_plain(201, headers)

    def _create_final(self, handler, concat, metadata, values):
        for name in ("Upload-Length", "Upload-Defer-Length"):
            if name in handler.headers:
                raise ApiError(400, "invalid_concat", "a final upload takes no " + name)
        if _body_length(handler, default=0):
            raise ApiError(400, "invalid_concat", "a final upload takes no body")
        _, partial_ids, raw = concat
        if len(partial_ids) > self.config.tus_max_partials:
            raise ApiError(400, "too_many_partials", "a final upload may join at most %d "
                           "partial uploads (--tus-max-partials)"
                           % self.config.tus_max_partials)
        upload_id, mime_type = self._identity("final", values)
        holders = [(partial_id, _Holder()) for partial_id in partial_ids]
        taken = []
        try:
            total = 0
            for partial_id, holder in holders:
                if partial_id not in taken and \
                        not self.claims.hold_unless_patching(partial_id, holder):
                    raise ApiError(400, "partial_unfinished",
                                   "partial upload %s is still receiving" % partial_id)
                taken.append(partial_id)
                total += self._finished_partial_length(partial_id)
            if total > self.config.max_upload_bytes:
                raise _too_large(total, self.config.max_upload_bytes)
            record = _Record.new(upload_id, "final", total, metadata, values.get("filename"),
                                 mime_type, concat=raw, parts=partial_ids)
            with self.claims.held(upload_id, _Holder()):
                self.table.insert(record)
                try:
                    self._concatenate(record)
                except ApiError:
                    self._forget(record)
                    raise
                for partial_id in set(partial_ids):
                    self.table.touch(partial_id)          # used: not abandoned
                resource = self._resource(upload_id)
        finally:
            for partial_id, holder in holders:
                if partial_id in taken:
                    self.claims.release(partial_id, holder)
        headers = self._upload_headers(resource)
        headers["Location"] = handler.absolute_url(COLLECTION_PATH + upload_id)
        handler.send_plain(201, headers)

    # -- DELETE: termination ----------------------------------------------------------------

    def terminate(self, handler, upload_id):
        with self.claims.held(upload_id, _Holder()):
            resource = self._resource(upload_id)
            self._forget(resource.record)
        log.info("tus upload %s terminated", upload_id)
        handler.send_plain(204, {"Tus-Resumable": TUS_VERSION})

    # -- status extras (GET /api/video/status/:fileId) ---------------------------------------

    def status_fields(self, upload):
        """The `tus` field of a status (and of every upload of a listing page). A finished
        upload's fields never change (its record is written before its first byte), so they
        are remembered per upload (fileId and creation time: a new upload with the same id
        is another key). In S3 mode that saves a GET per status of a finished upload, which
        measured as much as the rest of the status (docs/s3.md, "tus")."""
        key = (upload.file_id, upload.created_at)
        with self._status_guard:
            fields = self._status_cache.get(key)
        if fields is not None:
            return fields
        record = self.table.get(upload.file_id)
        if record is None or record.kind == "partial" or record.expired_at is not None:
            fields = {}
        else:
            fields = {"tus": {"uploadUrl": COLLECTION_PATH + record.id,
                              "uploadLength": record.length, "filename": record.filename}}
        if upload.completed:
            with self._status_guard:
                if len(self._status_cache) >= STATUS_CACHE_SIZE:
                    self._status_cache.pop(next(iter(self._status_cache)))
                self._status_cache[key] = fields
        return fields

    def _on_store_event(self, event):
        """An upload deleted outside tus (DELETE /api/video/:fileId, the retention sweep)
        answers 410 Gone at its tus URL rather than an offset of 0. One short transaction,
        on the deleting thread (deletions are rare)."""
        if event.get("type") == "deleted":
            self.table.set_expired(event["fileId"])

    # -- shutdown -----------------------------------------------------------------------------

    def interrupt_all(self):
        """Stop every open PATCH (each stores what it received): for a prompt SIGTERM."""
        self.claims.stop_all()

    def close(self):
        self._sweeper.stop()
        with self._partials_guard:
            if self._partials is not None:
                self._partials.close()

    # ---------------------------------------------------------------------------------------
    # Steps
    # ---------------------------------------------------------------------------------------

    def _resource(self, upload_id):
        """The upload behind /files/<upload_id> (claim held), or 404/410; expires it if due."""
        record = self.table.get(upload_id) if storage.valid_file_id(upload_id) else None
        if record is None:
            raise ApiError(404, "not_found", "no such upload")
        if record.expired_at is not None:
            raise ApiError(410, "upload_expired", "this upload expired and was removed")
        upload = self._store_for(record).status(upload_id)
        if upload is None and record.done_at is not None:
            # Finished, then deleted where no event reached us (`m1server.py gc`).
            self.table.set_expired(upload_id)
            raise ApiError(410, "upload_expired", "this upload was removed")
        resource = _Resource(record, upload, self.config.tus_expiry_s)
        if resource.expires_at is not None and resource.expires_at <= time.time():
            self._expire(record)
            raise ApiError(410, "upload_expired", "this upload expired and was removed")
        if record.done_at is None and resource.finished:
            self.table.set_done(upload_id)    # completed, but a crash came before we noted it
        return resource

    def _upload_headers(self, resource):
        headers = {"Tus-Resumable": TUS_VERSION}
        if resource.offset is not None:
            headers["Upload-Offset"] = str(resource.offset)
        if resource.expires_at is not None:
            headers["Upload-Expires"] = email.utils.formatdate(resource.expires_at,
                                                               usegmt=True)
        return headers

    def _set_length(self, resource, length):
        """creation-defer-length: the first PATCH that knows the length says it, once."""
        record = resource.record
        if record.length is not None:
            if record.length != length:
                raise ApiError(400, "length_already_set",
                               "Upload-Length is %d and cannot change" % record.length)
            return resource
        if length < resource.offset:
            raise ApiError(400, "invalid_length",
                           "Upload-Length is below the %d bytes received" % resource.offset)
        if length > self.config.max_upload_bytes:
            raise _too_large(length, self.config.max_upload_bytes)
        self.table.set_length(record.id, length)
        return self._resource(record.id)

    def _check_room(self, handler, resource, size):
        end = resource.offset + size
        if resource.record.length is not None and end > resource.record.length:
            raise ApiError(413, "upload_too_large",
                           "%d bytes at offset %d go past Upload-Length %d"
                           % (size, resource.offset, resource.record.length))
        if end > self.config.max_upload_bytes:
            raise _too_large(end, self.config.max_upload_bytes)
        handler.check_free_disk(size)

    def _receive(self, handler, resource, size, checksum, holder):
        """Stream `size` body bytes into pieces and store them as the upload's next chunks.
        Returns (resource afterwards, True when the body broke off before its end)."""
        record = resource.record
        store = self._store_for(record)
        digest = CHECKSUMS[checksum[0]]() if checksum else None
        body = handler.open_body(size)
        buffer = bytearray(min(BLOCK_BYTES, max(size, 1)))
        view = memoryview(buffer)
        pieces = _Pieces(self, store, resource)
        broke_off = False
        conflict = None
        try:
            while body.remaining and not holder.stopped:
                room = pieces.room()
                try:
                    n = body.read_into(view[:min(len(buffer), room)])
                except self._broke_off_errors:
                    broke_off = True
                    break
                pieces.write(view[:n])
                if digest is not None:
                    digest.update(view[:n])
                if pieces.room() == 0:
                    # Without a checksum a full piece is stored now (durable progress); with
                    # one it waits until the whole body is checked.
                    pieces.piece_full(store_now=digest is None)
            broke_off = broke_off or body.remaining > 0
            if not broke_off:
                handler.body_pending = False             # the connection can be reused
            if digest is not None:
                if broke_off:
                    pieces.discard()                     # cannot be checked: keep nothing
                elif digest.digest() != checksum[1]:
                    pieces.discard()
                    raise ApiError(460, "checksum_mismatch",
                                   "the body's %s differs from Upload-Checksum; nothing "
                                   "was stored" % checksum[0])
            pieces.store_rest(broke_off)
        except StoreError as error:
            if error.code not in STORE_CONFLICTS:
                raise
            conflict = error
        finally:
            pieces.discard()
        resource = self._resource(record.id)
        if conflict is not None:
            # Only another request can have stored other bytes at our chunk index: one on
            # another node (claims are per process). What is stored is what it stored.
            log.warning("tus upload %s: PATCH lost a race (%s); the upload is at offset %s",
                        record.id, conflict.message, resource.offset)
            raise ApiError(409, "offset_conflict", "another request stored bytes of this "
                           "upload at this offset meanwhile; HEAD says where it stands",
                           {"Upload-Offset": str(resource.offset or 0)})
        if broke_off:
            log.info("tus upload %s: PATCH broke off; stored up to offset %d", record.id,
                     resource.offset)
        return resource, broke_off

    def _store_piece(self, store, resource, index, path, size, is_last):
        return store.put_chunk(resource.record.id, index, path, size, is_last=is_last,
                               mime_type=resource.record.mime_type).upload

    def _concatenate(self, record):
        """Append partial i as chunk i of the final upload, from where a crash left it. The
        partial's bytes come through the store interface (media_file: the file itself in
        local mode, hard-linked; a download to a temp file on S3), so a partial stays intact
        and reusable."""
        partials = self._partial_store()
        upload = self.store.status(record.id)
        start = upload.next_index if upload is not None else 0
        for index in range(start, len(record.parts)):
            partial = partials.status(record.parts[index])
            if partial is None:
                raise ApiError(400, "partial_missing",
                               "partial upload %s is gone" % record.parts[index])
            if partial.bytes_appended:
                with partials.media_file(partial) as source:
                    path = _link_or_copy(source, self.store)
            else:                                  # an empty partial has no media to read
                path, f = self.store.new_part_file()
                f.close()
            self.store.put_chunk(record.id, index, path, partial.bytes_appended,
                                 is_last=index == len(record.parts) - 1,
                                 mime_type=record.mime_type)
        self.table.set_done(record.id)

    def _resume_concatenations(self):
        """Finish the finals a crash cut short; False when the store did not answer (5xx:
        S3 down or refusing us), so that it is tried again later."""
        try:
            records = self.table.unfinished_finals()
        except StoreError as error:
            log.warning("tus: cannot look for unfinished concatenations now (%s); the sweep "
                        "tries again", error.message)
            return False
        done = True
        for record in records:
            try:
                self._concatenate(record)
                log.warning("tus: finished concatenating %s after a restart", record.id)
            except ApiError as error:
                if error.status >= 500:            # the store, not the upload: try later
                    log.warning("tus: final upload %s not finished yet (%s)", record.id,
                                error.message)
                    done = False
                    continue
                log.error("tus: final upload %s cannot be finished (%s); removing it",
                          record.id, error.message)
                self._forget(record)
        return done

    def _forget(self, record):
        """Termination (or an undone creation): bytes and row go, 404 from now on."""
        self._store_for(record).delete(record.id)
        self.table.delete(record.id)

    def _expire(self, record):
        self._store_for(record).delete(record.id)
        self.table.set_expired(record.id)
        log.info("tus upload %s expired", record.id)

    def sweep(self):
        """Remove the unfinished uploads that expired; forget old tombstones; finish the
        concatenations start-up could not."""
        now = time.time()
        if self._finals_pending:
            self._finals_pending = not self._resume_concatenations()
        for record in self.table.expirable():
            holder = _Holder()
            if not self.claims.try_hold(record.id, holder):
                continue                                   # a request is using it
            try:
                with contextlib.suppress(ApiError):        # 410 once expired: the point
                    self._resource(record.id)
            finally:
                self.claims.release(record.id, holder)
        self.table.purge_tombstones(now - TOMBSTONE_KEEP_S)

    # -- parsing what the client sent ---------------------------------------------------------

    def _creation_length(self, handler):
        length = _number_header(handler, "Upload-Length")
        defer = handler.headers.get("Upload-Defer-Length")
        if defer is not None and defer.strip() != "1":
            raise ApiError(400, "invalid_defer_length", "Upload-Defer-Length must be 1")
        if (length is None) == (defer is None):
            raise ApiError(400, "missing_length",
                           "send exactly one of Upload-Length and Upload-Defer-Length: 1")
        if length is not None and length > self.config.max_upload_bytes:
            raise _too_large(length, self.config.max_upload_bytes)
        return length

    def _parse_metadata(self, raw):
        """Upload-Metadata -> (the header as sent, or None; {key: decoded bytes})."""
        if raw is None or not raw.strip():
            return None, {}
        if len(raw) > self.config.tus_max_metadata_bytes:
            raise ApiError(431, "metadata_too_large",
                           "Upload-Metadata is %d bytes; the limit is %d (--tus-max-metadata)"
                           % (len(raw), self.config.tus_max_metadata_bytes))
        values = {}
        for item in raw.split(","):
            key, _, value = item.strip().partition(" ")
            value = value.strip()
            if not METADATA_KEY_PATTERN.match(key) or key in values or \
                    len(value) % 4 or not BASE64_PATTERN.match(value):
                raise ApiError(400, "invalid_metadata", "Upload-Metadata must be unique "
                               "'key base64value' pairs separated by commas")
            values[key] = base64.b64decode(value)
        return raw.strip(), values

    def _identity(self, kind, values):
        """The upload's id and mimeType from its metadata (see the module docstring)."""
        mime_type = _mime_type(values)
        if kind == "partial":
            return self._new_id("tuspart_"), None
        wanted = values.get("fileId")
        if wanted is None:
            return self._new_id("tus_"), mime_type
        file_id = wanted.decode("ascii", "replace")
        if not storage.valid_file_id(file_id):
            raise ApiError(400, "invalid_file_id", "metadata fileId must match "
                           "[A-Za-z0-9_-]{1,128}")
        record = self.table.get(file_id)
        if self.store.status(file_id) is not None or (record is not None and
                                                       record.expired_at is None):
            raise ApiError(409, "file_id_taken", "an upload named %s exists" % file_id)
        if record is not None:
            self.table.delete(file_id)               # an expired one: the name is free again
        return file_id, mime_type

    def _new_id(self, prefix):
        return prefix + uuid.uuid4().hex

    def _finished_partial_length(self, partial_id):
        resource = self._resource(partial_id)
        if resource.record.kind != "partial":
            raise ApiError(400, "not_partial", "%s is not a partial upload" % partial_id)
        if resource.record.length is None or resource.offset != resource.record.length:
            raise ApiError(400, "partial_unfinished",
                           "partial upload %s is not finished" % partial_id)
        return resource.record.length

    # -- the two stores ------------------------------------------------------------------------

    def _store_for(self, record):
        return self._partial_store() if record.kind == "partial" else self.store

    def _partial_store(self):
        """Partial uploads' own store, the main store's sibling (uploads/tus-partials/, or
        P/tus-partials/ in the bucket), opened (and repaired) on first use, before any
        request of this process touches it."""
        with self._partials_guard:
            if self._partials is None:
                self._partials = self.store.sibling(PARTIALS_DIR_NAME, allow_any_content=True)
                if self._partials.repair():
                    log.warning("repaired partial uploads after a crash")
            return self._partials


# ---------------------------------------------------------------------------------------------
# A PATCH body in pieces
# ---------------------------------------------------------------------------------------------

class _Pieces:
    """Part files of at most --tus-piece-size bytes, stored in order as the next chunks.

    Without a checksum each full piece is stored as soon as it is full (durable progress), by
    a helper thread, so the network read goes on while the store copies and fsyncs it; at
    most one more full piece waits for that thread, which bounds the temporary disk to three
    pieces. With a checksum, pieces wait until the whole body has been checked. Either way the
    pieces are stored one at a time in order (index, offset), and the caller's claim is not
    released before the last store call has returned (`finish`/`discard` join the thread).
    The store copies a piece into the upload's file, so a piece is whole or absent there."""

    def __init__(self, endpoint, store, resource):
        self._endpoint = endpoint
        self._store = store
        self.resource = resource
        self._limit = endpoint.config.tus_piece_bytes
        self._offset = resource.offset
        self._index = resource.upload.next_index if resource.upload is not None else 0
        self._waiting = []            # (path, size) received, not yet stored
        self._file = None
        self._path = None
        self._size = 0
        self._behind = None           # queue of full pieces for the storing thread
        self._thread = None
        self._error = None            # what the storing thread raised, re-raised here

    def room(self):
        return self._limit - self._size

    def write(self, block):
        self._raise_behind_error()
        if self._file is None:
            self._path, self._file = self._store.new_part_file()
            self._size = 0
        while block:                     # straight to the file: no copy in a buffer
            written = os.write(self._file.fileno(), block)
            block = block[written:]
            self._size += written

    def _close_current(self):
        if self._file is not None:
            self._file.close()
            self._waiting.append((self._path, self._size))
            self._file = None
            self._size = 0

    def piece_full(self, store_now):
        self._close_current()
        if not store_now:
            return
        if self._thread is None:
            self._behind = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._store_behind, daemon=True,
                                            name="m1-tus-store")
            self._thread.start()
        while self._waiting:
            self._behind.put(self._waiting.pop(0))     # waits while one piece is queued

    def _store_behind(self):
        while True:
            piece = self._behind.get()
            if piece is None:
                return
            if self._error is not None:
                self._store.discard(piece[0])
                continue
            try:
                self._store_one(piece[0], piece[1], broke_off=False)
            except BaseException as error:            # handed to the receiving thread
                self._error = error
                self._store.discard(piece[0])

    def _join_behind(self):
        if self._thread is not None:
            self._behind.put(None)
            self._thread.join()
            self._thread = None

    def _raise_behind_error(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def store_rest(self, broke_off):
        self._join_behind()
        self._raise_behind_error()
        self._close_current()
        while self._waiting:
            path, size = self._waiting.pop(0)
            if not self._store_one(path, size, broke_off):
                break
        length = self.resource.record.length
        if not broke_off and length is not None and self._offset == length and \
                not self._finished():
            # The length became known when nothing was left to send (defer-length), or the
            # upload is empty: an empty last chunk completes it in the store.
            path, f = self._store.new_part_file()
            f.close()
            self._store_one(path, 0, broke_off)

    def _finished(self):
        upload = self._store.status(self.resource.record.id)
        return upload is not None and upload.completed

    def _store_one(self, path, size, broke_off):
        """Store one piece as the next chunk; False when a broken-off PATCH's piece had to be
        dropped (the rest of that PATCH is dropped with it)."""
        length = self.resource.record.length
        if size == 0 and (length is None or self._offset != length):
            self._store.discard(path)
            return True
        is_last = length is not None and self._offset + size == length
        try:
            self._endpoint._store_piece(self._store, self.resource, self._index, path, size,
                                        is_last)
        except StoreError as error:
            if not broke_off:
                raise
            # The client is gone: what we cannot store (a beginning too short to show its
            # media signature, say) it sends again from HEAD's offset.
            log.info("tus upload %s: dropped %d bytes of a broken-off PATCH: %s",
                     self.resource.record.id, size, error.message)
            self._store.discard(path)
            self.discard()
            return False
        self._index += 1
        self._offset += size
        return True

    def discard(self):
        """Drop every piece not yet stored (after the storing thread has finished)."""
        if self._thread is not None:
            self._error = self._error or _Discarded()
            self._join_behind()
        if self._file is not None:
            self._file.close()
            self._store.discard(self._path)
            self._file = None
        while self._waiting:
            self._store.discard(self._waiting.pop()[0])


class _Discarded(Exception):
    """Tells the storing thread to drop the pieces still queued."""


# ---------------------------------------------------------------------------------------------
# Claims: one request at a time per upload, and the takeover of SPEC section 4
# ---------------------------------------------------------------------------------------------

class _Holder:
    """Who holds an upload's claim: an open PATCH (stoppable through its socket) or a short
    request (HEAD, DELETE, a creation, the sweep), which simply finishes."""

    def __init__(self, sock=None):
        self._sock = sock
        self.is_patch = sock is not None
        self.stopped = False

    def stop(self):
        self.stopped = True
        if self._sock is not None:
            # Wakes a recv blocked on a dead connection at once (it returns 0, "body ended"),
            # so the PATCH stores what it received and lets go.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RD)


class _Claims:
    def __init__(self, wait_s):
        self._wait_s = wait_s
        self._changed = threading.Condition()
        self._holders = {}

    @contextlib.contextmanager
    def held(self, upload_id, holder):
        """Stop whoever holds `upload_id`, wait for them to let go, and hold it; 423 (which
        tus clients retry) if that takes longer than TAKEOVER_WAIT_S."""
        deadline = time.monotonic() + self._wait_s
        with self._changed:
            while upload_id in self._holders:
                self._holders[upload_id].stop()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(423, "upload_locked", "the upload is busy; retry",
                                   {"Retry-After": "1"})
                self._changed.wait(left)
            self._holders[upload_id] = holder
        try:
            yield holder
        finally:
            self.release(upload_id, holder)

    def hold_unless_patching(self, upload_id, holder):
        """Hold `upload_id` once short requests on it are done; False at once (without
        stopping it) when a PATCH is open on it."""
        deadline = time.monotonic() + self._wait_s
        with self._changed:
            while upload_id in self._holders:
                left = deadline - time.monotonic()
                if self._holders[upload_id].is_patch or left <= 0:
                    return False
                self._changed.wait(left)
            self._holders[upload_id] = holder
            return True

    def try_hold(self, upload_id, holder):
        with self._changed:
            if upload_id in self._holders:
                return False
            self._holders[upload_id] = holder
            return True

    def release(self, upload_id, holder):
        with self._changed:
            if self._holders.get(upload_id) is holder:
                del self._holders[upload_id]
                self._changed.notify_all()

    def stop_all(self):
        with self._changed:
            for holder in list(self._holders.values()):
                holder.stop()


# ---------------------------------------------------------------------------------------------
# The tus table: where the records live is picked once, by what the store offers
# ---------------------------------------------------------------------------------------------

def open_table(store):
    """The one choice point between the two homes of the tus records: a store that declares
    shared records (storage.Capabilities.shared_records: S3Store.json_folder) holds them in
    its bucket, where every node sees them; otherwise they are a table in the store's ledger
    file (ledger_tables). Both tables have the same methods, so the endpoint does not know
    which it has."""
    if store.capabilities.shared_records:
        return _BucketTusTable(store.json_folder(BUCKET_FOLDER))
    return _TusTable(store)


_FIELDS = ("id", "kind", "length", "metadata", "filename", "mime_type", "concat", "parts",
           "created_at", "touched_at", "done_at", "expired_at")


class _Record:
    """One tus upload's record (a row of tus_uploads, or a JSON object in the bucket)."""

    def __init__(self, fields):
        for name in _FIELDS:
            setattr(self, name, fields.get(name))
        self.parts = self.parts or []

    @classmethod
    def new(cls, upload_id, kind, length, metadata, filename, mime_type, concat=None,
            parts=None):
        now = time.time()
        name = filename.decode("utf-8", "replace") if filename is not None else None
        return cls({"id": upload_id, "kind": kind, "length": length, "metadata": metadata,
                    "filename": name, "mime_type": mime_type, "concat": concat,
                    "parts": parts, "created_at": now, "touched_at": now})

    @classmethod
    def from_row(cls, row):
        fields = dict(zip(_FIELDS, row))
        fields["parts"] = json.loads(fields["parts"]) if fields["parts"] else []
        return cls(fields)

    def row(self):
        return tuple(getattr(self, name) if name != "parts" else
                     (json.dumps(self.parts) if self.parts else None) for name in _FIELDS)

    def to_json(self):
        return {name: getattr(self, name) for name in _FIELDS}

    @property
    def open(self):
        """Still something the sweep must look at: an upload that can expire, or a final
        not yet concatenated."""
        return self.done_at is None and self.expired_at is None


# -- in the ledger file beside the store's own tables (local mode) ----------------------------

SCHEMA_FEATURE = "tus"
SCHEMA_VERSION = 1
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS feature_schema (
        feature TEXT PRIMARY KEY,
        version INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS tus_uploads (
        id          TEXT PRIMARY KEY,  -- /files/<id>; the fileId (a generated one for partials)
        kind        TEXT NOT NULL,     -- single | partial | final
        length      INTEGER,           -- Upload-Length; NULL while deferred
        metadata    TEXT,              -- Upload-Metadata as the client sent it (validated)
        filename    TEXT,
        mime_type   TEXT,              -- from filetype (or filename), as the seed's mimeType
        concat      TEXT,              -- a final's Upload-Concat as sent
        parts       TEXT,              -- a final's partial ids, JSON
        created_at  REAL NOT NULL,
        touched_at  REAL NOT NULL,     -- creation, or last use as a partial of a final
        done_at     REAL,              -- completed (single) or concatenated (final)
        expired_at  REAL               -- set: a tombstone answering 410 Gone
    ) WITHOUT ROWID""",
)
_COLUMNS = ", ".join(_FIELDS)


class _TusTable:
    def __init__(self, store):
        self._store = store
        with store.ledger_write() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            row = db.execute("SELECT version FROM feature_schema WHERE feature = ?",
                             (SCHEMA_FEATURE,)).fetchone()
            if row is not None and row[0] > SCHEMA_VERSION:
                raise RuntimeError("the ledger's tus table has schema %d; this m1server "
                                   "knows up to %d" % (row[0], SCHEMA_VERSION))
            if row is None:
                db.execute("INSERT INTO feature_schema (feature, version) VALUES (?, ?)",
                           (SCHEMA_FEATURE, SCHEMA_VERSION))

    def get(self, upload_id):
        with self._store.ledger_read() as db:
            row = db.execute("SELECT %s FROM tus_uploads WHERE id = ?" % _COLUMNS,
                             (upload_id,)).fetchone()
        return None if row is None else _Record.from_row(row)

    def _select(self, where, args=()):
        with self._store.ledger_read() as db:
            return [_Record.from_row(row) for row in db.execute(
                "SELECT %s FROM tus_uploads WHERE %s" % (_COLUMNS, where), args)]

    def expirable(self):
        return self._select("done_at IS NULL AND expired_at IS NULL AND kind != 'final'")

    def unfinished_finals(self):
        return self._select("kind = 'final' AND done_at IS NULL AND expired_at IS NULL")

    def _update(self, sql, args):
        with self._store.ledger_write() as db:
            db.execute(sql, args)

    def insert(self, record):
        try:
            self._insert(record)
        except sqlite3.IntegrityError:              # two creations raced for one fileId
            raise _taken(record.id)

    def _insert(self, record):
        self._update("INSERT INTO tus_uploads (%s) VALUES (%s)"
                     % (_COLUMNS, ", ".join("?" * len(_FIELDS))), record.row())

    def set_length(self, upload_id, length):
        self._update("UPDATE tus_uploads SET length = ? WHERE id = ? AND length IS NULL",
                     (length, upload_id))

    def touch(self, upload_id):
        self._update("UPDATE tus_uploads SET touched_at = ? WHERE id = ?",
                     (time.time(), upload_id))

    def set_done(self, upload_id):
        self._update("UPDATE tus_uploads SET done_at = ? WHERE id = ? AND kind != 'partial'",
                     (time.time(), upload_id))

    def set_expired(self, upload_id):
        self._update("UPDATE tus_uploads SET expired_at = ? WHERE id = ? AND expired_at IS NULL",
                     (time.time(), upload_id))

    def delete(self, upload_id):
        self._update("DELETE FROM tus_uploads WHERE id = ?", (upload_id,))

    def purge_tombstones(self, before):
        self._update("DELETE FROM tus_uploads WHERE expired_at < ?", (before,))


def _taken(upload_id):
    return ApiError(409, "file_id_taken", "an upload named %s exists" % upload_id)


# -- in the bucket, shared by every node (S3 mode) --------------------------------------------

BUCKET_FOLDER = "tus"                    # P/tus/ in the bucket
RECORDS = "records/"                     # P/tus/records/<id>.json: the record
OPEN = "open/"                           # P/tus/open/<id>: empty, while the record is open
GONE = "gone/"                           # P/tus/gone/<id>: empty, a tombstone (when it expired)
MARKER_GRACE_S = 600.0                   # an open marker without an open record is this old
                                         # before the sweep removes it (a creation in flight)


class _BucketTusTable:
    """The tus table as objects in the bucket (layout and why each step may be repeated after
    a crash: the module docstring, "S3 mode"). Same methods as _TusTable."""

    def __init__(self, folder):
        self._folder = folder

    def _get(self, upload_id):
        return self._folder.get(RECORDS + upload_id + ".json")

    def get(self, upload_id):
        found = self._get(upload_id)
        return None if found is None else _Record(found[0])

    def _open_records(self):
        """The open records, found through their markers (one listing, one GET per open
        upload: finished and expired uploads cost nothing). Markers left by a crash, or by
        a lost creation race, are tidied here once MARKER_GRACE_S old."""
        records = []
        for upload_id, modified in self._folder.list(OPEN):
            found = self._get(upload_id)
            record = None if found is None else _Record(found[0])
            if record is not None and record.open:
                records.append(record)
            elif modified < time.time() - MARKER_GRACE_S:
                if record is not None and record.expired_at is not None:
                    self._folder.put_marker(GONE + upload_id)    # set_expired cut short
                self._folder.delete(OPEN + upload_id)
        return records

    def expirable(self):
        return [record for record in self._open_records() if record.kind != "final"]

    def unfinished_finals(self):
        return [record for record in self._open_records() if record.kind == "final"]

    def insert(self, record):
        # The marker first: whatever happens after it, the sweep finds this record.
        self._folder.put_marker(OPEN + record.id)
        if not self._folder.create(RECORDS + record.id + ".json", record.to_json()):
            raise _taken(record.id)                  # its marker is tidied by the sweep

    def _change(self, upload_id, change):
        """Compare-and-swap on the record (re-read and asked again on a lost race); the
        record afterwards, or None when there is none."""
        found = self._get(upload_id)
        if found is not None:
            found = self._folder.update(RECORDS + upload_id + ".json", found, change)
        return None if found is None else _Record(found[0])

    def set_length(self, upload_id, length):
        def change(data):
            if data["length"] is not None:
                return False
            data["length"] = length
            return True
        self._change(upload_id, change)

    def touch(self, upload_id):
        def change(data):
            data["touched_at"] = time.time()
            return True
        self._change(upload_id, change)

    def set_done(self, upload_id):
        def change(data):
            if data["kind"] == "partial" or data["done_at"] is not None:
                return False
            data["done_at"] = time.time()
            return True
        record = self._change(upload_id, change)
        if record is not None and not record.open:
            self._folder.delete(OPEN + upload_id)

    def set_expired(self, upload_id):
        found = self._get(upload_id)
        if found is None or found[0]["expired_at"] is not None:
            return
        # The tombstone marker before the record says so: a record marked expired always has
        # one (a marker whose record is not expired is dropped by the purge).
        self._folder.put_marker(GONE + upload_id)

        def change(data):
            if data["expired_at"] is not None:
                return False
            data["expired_at"] = time.time()
            return True
        if self._folder.update(RECORDS + upload_id + ".json", found, change) is not None:
            self._folder.delete(OPEN + upload_id)

    def delete(self, upload_id):
        # The record first: markers without a record are removed by the sweep and purge.
        self._folder.delete(RECORDS + upload_id + ".json")
        self._folder.delete(OPEN + upload_id)
        self._folder.delete(GONE + upload_id)

    def purge_tombstones(self, before):
        for upload_id, modified in self._folder.list(GONE):
            if modified >= before:
                continue
            found = self._get(upload_id)
            if found is not None and found[0]["expired_at"] is not None and \
                    not self._folder.delete(RECORDS + upload_id + ".json", if_match=found[1]):
                continue                             # changed meanwhile: the next sweep looks
            self._folder.delete(GONE + upload_id)


class _Resource:
    """A tus upload as a request sees it: its row and its chunk-store state."""

    def __init__(self, record, upload, expiry_s):
        self.record = record
        self.upload = upload                  # storage.UploadState, None before any byte
        if record.kind == "final":
            self.offset = record.length if upload is not None and upload.completed else None
        else:
            self.offset = upload.bytes_appended if upload is not None else 0
        if record.kind == "partial":
            self.finished = False             # partials expire even when complete
        elif record.kind == "final":
            self.finished = self.offset is not None
        else:
            self.finished = upload is not None and upload.completed
        if self.finished or record.done_at is not None or record.kind == "final" or \
                expiry_s is None:
            self.expires_at = None
        else:
            active = max(record.touched_at, upload.updated_at if upload is not None else 0)
            self.expires_at = active + expiry_s


class _Sweeper:
    """A daemon thread that calls endpoint.sweep() every `interval` seconds."""

    def __init__(self, endpoint, interval):
        self._endpoint = endpoint
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="m1-tus-sweep", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stopping.wait(self._interval):
            try:
                self._endpoint.sweep()
            except StoreError as error:    # the store is down or refuses us (S3 mode)
                log.warning("tus expiry sweep: %s; the next sweep tries again", error.message)
            except Exception:              # logged once; the next sweep tries again
                log.exception("tus expiry sweep failed")

    def stop(self):
        self._stopping.set()
        self._thread.join(5)


# ---------------------------------------------------------------------------------------------
# Helpers: headers in, errors out
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _tus_errors():
    """Every tus answer carries Tus-Resumable, refusals included."""
    try:
        yield
    except ApiError as error:
        error.headers.setdefault("Tus-Resumable", TUS_VERSION)
        raise


def _effective_method(handler):
    """X-HTTP-Method-Override, when present, is the request's method (tus 1.0 core)."""
    override = handler.headers.get("X-HTTP-Method-Override")
    return override.strip().upper() if override else handler.command


def _check_version(handler):
    version = handler.headers.get("Tus-Resumable")
    if version is None or version.strip() not in SUPPORTED_VERSIONS:
        raise ApiError(412, "unsupported_version",
                       "send Tus-Resumable: %s" % TUS_VERSION,
                       {"Tus-Version": ",".join(SUPPORTED_VERSIONS)})


def _method_not_allowed(method, allowed):
    return ApiError(405, "method_not_allowed", "%s is not allowed here; use %s"
                    % (method[:20], allowed), {"Allow": allowed})


def _media_type(value):
    return (value or "").split(";", 1)[0].strip().lower()


def _number_header(handler, name, required=False):
    value = handler.headers.get(name)
    if value is None:
        if required:
            raise ApiError(400, "missing_" + name.lower().replace("-", "_"),
                           "the %s header is required" % name)
        return None
    number = httphead.number(value)
    if number is None:
        raise ApiError(400, "invalid_" + name.lower().replace("-", "_"),
                       "%s must be a non-negative integer" % name)
    return number


def _body_length(handler, default=None):
    # A Transfer-Encoding never gets here: httphead.py refuses it for every route.
    if default is not None and "Content-Length" not in handler.headers:
        return default
    return handler.content_length()


def _parse_checksum(value):
    """Upload-Checksum 'name base64' -> (name, digest bytes); None when absent; 400 if bad."""
    if value is None:
        return None
    name, _, encoded = value.strip().partition(" ")
    if name not in CHECKSUMS:
        raise ApiError(400, "unsupported_checksum", "Upload-Checksum algorithm must be one "
                       "of " + ", ".join(CHECKSUMS))
    encoded = encoded.strip()
    if not encoded or len(encoded) % 4 or not BASE64_PATTERN.match(encoded):
        raise ApiError(400, "invalid_checksum", "Upload-Checksum must be 'name base64'")
    return name, base64.b64decode(encoded)


def _parse_concat(value):
    """Upload-Concat -> None, ("partial",) or ("final", [partial ids], value as sent)."""
    if value is None:
        return None
    value = value.strip()
    if value == "partial":
        return ("partial",)
    kind, semicolon, urls = value.partition(";")
    if kind.strip() != "final" or not semicolon or not urls.split():
        raise ApiError(400, "invalid_concat",
                       "Upload-Concat must be 'partial' or 'final;<url> <url> ...'")
    ids = []
    for url in urls.split():
        path = urlsplit(url).path
        if not path.startswith(COLLECTION_PATH):
            raise ApiError(400, "invalid_concat", "not an upload URL of this server: %s"
                           % url[:200])
        ids.append(unquote(path[len(COLLECTION_PATH):]))
    return ("final", ids, value)


def _mime_type(values):
    """The seed's mimeType for metadata filetype (or a known filename extension)."""
    filetype = values.get("filetype", b"").decode("ascii", "replace").strip()
    if filetype and filetype.lower() != "application/octet-stream":
        storage.extension_for(filetype)           # 400 / 415 for what we do not store
        return filetype
    filename = values.get("filename", b"").decode("utf-8", "replace")
    ext = filename.rpartition(".")[2].lower() if "." in filename else ""
    return storage.MEDIA_TYPES.get(ext)


def _too_large(size, limit):
    return ApiError(413, "upload_too_large", "upload of %d bytes exceeds Tus-Max-Size %d "
                    "(--max-upload-size)" % (size, limit))


def _link_or_copy(source, store):
    """A new name in the store's incoming folder for `source`'s bytes (which put_chunk
    consumes): a hard link where the file system has them, else a copy."""
    path, f = store.new_part_file()
    f.close()
    os.remove(path)
    try:
        os.link(source, path)
    except OSError:
        shutil.copyfile(source, path)
    return path
