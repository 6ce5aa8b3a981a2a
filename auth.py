"""auth.py - who may do what: the API key, scoped upload tokens, rate limits, security headers.

The model is a video platform's direct upload (SPEC section 6): the application's backend holds
the API key and hands a browser a short-lived, narrow *token* for one upload; the browser never
sees the key.

What it guarantees, when the server runs with --api-key (M1_API_KEY, --api-key-file):
  * Every request is checked from its request line and headers alone, before any body byte is
    read (m1server.Handler.dispatch calls Guard.authorize between routing and the route's
    function). A refused request therefore never reaches the store: nothing changes on disk.
  * Credentials: `Authorization: Bearer <key or token>`, or `?token=<token>` where a client
    cannot set headers (`<video src>`, WebSocket, EventSource). The key is never accepted in
    the query string (URLs end up in logs and browser history).
  * The key is compared in constant time (hmac.compare_digest over SHA-256 digests, so the
    key's length does not leak either); token signatures likewise.
  * Tokens are stateless: `v1.<payload>.<signature>`, base64url, where payload is compact JSON
    {"fid": fileId | "pfx": fileIdPrefix, "r": ["upload", "read"], "exp": unix seconds,
    "max": byte budget or absent} and signature = HMAC-SHA256(secret, "v1." + payload). The
    secret is --secret (M1_SECRET), or derived from the key (HKDF, RFC 5869, with HMAC-SHA256),
    so changing the key revokes every token.
  * 401 (credentials missing or not valid; with WWW-Authenticate, RFC 6750):
      missing_credentials, invalid_api_key, malformed_token, token_signature_invalid
      (a changed byte), token_expired.
    403 (valid, but not for this): key_required (a token on a key-only route),
      token_wrong_file (another fileId), token_right_missing (no upload/read right),
      token_budget_spent (the upload would pass the token's byte budget).
  * What needs what (ROUTE_RULES): /healthz and the static demo files (/, /m1client.js,
    /demo.js, /demo.css, /ui.js, and live.py's /watch/<id>, /watch.js, /dashboard,
    /dashboard.js: the program's own code, no data) are public; so is every OPTIONS
    (a browser preflight never carries credentials). Status, media, derived files and events
    need a token with `read` for that fileId. The seed upload needs `upload`: the right is
    checked before the body, the fileId after the multipart parse (check_chunk), and the
    budget by the store itself, under the upload's lock (check_chunk hands it over). tus
    creation needs `upload` and an Upload-Metadata fileId the token covers (a token never gets
    a generated id, and cannot create concatenation parts); tus HEAD/PATCH need `upload` for
    /files/<id>; tus DELETE (termination), listing, deletion, webhook admin, /readyz, /metrics
    and minting tokens need the key.
  * Byte budget: the upload's total size may not pass `max`. For the seed API, bytes already
    held (appended and early chunks) + the new chunk's size, counted by the store under the
    upload's lock (storage.Budget), so chunks sent at the same time cannot pass it together;
    a chunk already stored (a retry) is let through. For tus, Upload-Length at creation and
    offset + Content-Length of a PATCH, from the headers.
  * Rate limits (RateLimiter): a token bucket per client address on requests and on request
    body bytes (Content-Length, charged before reading); 429 with Retry-After; a bucket may go
    into debt for one large body, so a chunk bigger than the burst still passes, then waits.

A token is checked when a request starts; an event stream it opened is ended by events.py
when it expires (a `token_expired` event, then the end of the stream).

What it does not do: revoke single tokens before they expire (rotate --secret or the key to
revoke all), identify users, trust X-Forwarded-For (behind a proxy, every client shares the
proxy's bucket: rate-limit at the proxy instead), or encrypt (use --tls-cert or a TLS proxy).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import threading
import time
from urllib.parse import parse_qs, urlsplit

import httphead
import storage
from apierror import ApiError

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

TOKEN_VERSION = "v1"
RIGHTS = ("upload", "read")
DEFAULT_EXPIRES_IN_S = 3600
MAX_EXPIRES_IN_S = 7 * 86400           # a token lives at most a week
MAX_TOKEN_CHARS = 2048                 # longer bearer values are refused unparsed
MAX_TOKEN_REQUEST_BYTES = 4096         # body of POST /api/video/tokens
HKDF_SALT = b"m1server"
HKDF_INFO = b"m1server token signing key v1"
REALM = "m1server"
MAX_TRACKED_CLIENTS = 10000            # rate-limit buckets kept; full, idle ones are dropped

# What each route needs, by the route label m1server.compile_routes gives it.
PUBLIC, KEY, READ, UPLOAD, TUS_CREATE, TUS_UPLOAD = ("public", "key", "read", "upload",
                                                     "tus-create", "tus-upload")
ROUTE_RULES = {
    "/healthz": PUBLIC, "/": PUBLIC, "/m1client.js": PUBLIC, "/demo.js": PUBLIC,
    "/demo.css": PUBLIC, "/ui.js": PUBLIC,
    "/watch/:id": PUBLIC, "/watch.js": PUBLIC, "/dashboard": PUBLIC, "/dashboard.js": PUBLIC,
    "/api/video/upload": UPLOAD,
    "/api/video/status/:id": READ,
    "/uploads/:id": READ,                       # <fileId>.<ext>, also ?live=1 (live.py)
    "/uploads/derived/:id/:id2": READ,
    "/api/video/events/:id": READ,
    "/files/?": TUS_CREATE,
    "/files/:id": TUS_UPLOAD,
}
# Everything not named above (listing, deletion, webhooks admin, /readyz, /metrics, tokens,
# and any route added later) needs the key: a new route is closed until someone opens it.


def parse_rights(text):
    rights = tuple(sorted(set(r.strip() for r in str(text).split(",") if r.strip())))
    if not rights or any(r not in RIGHTS for r in rights):
        raise ValueError("rights must be upload, read or upload,read")
    return rights


def b64url(raw):
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def unb64url(text):
    if not re.match(r"[A-Za-z0-9_-]*\Z", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def derive_secret(api_key):
    """HKDF-SHA256 (RFC 5869) extract-and-expand of the key into a 32-byte signing secret."""
    prk = hmac.new(HKDF_SALT, api_key.encode("utf-8"), hashlib.sha256).digest()
    return hmac.new(prk, HKDF_INFO + b"\x01", hashlib.sha256).digest()


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------

class Grant:
    """What a request's credential allows: the key (everything) or one token's scope."""

    def __init__(self, is_key, payload=None):
        self.is_key = is_key
        self.file_id = (payload or {}).get("fid")
        self.prefix = (payload or {}).get("pfx")
        self.rights = tuple((payload or {}).get("r", ()))
        self.expires = (payload or {}).get("exp")
        self.max_bytes = (payload or {}).get("max")

    def covers(self, file_id):
        if self.is_key:
            return True
        if self.file_id is not None:      # bytes: compare_digest refuses non-ASCII str
            return hmac.compare_digest(self.file_id.encode("utf-8"),
                                       file_id.encode("utf-8", "replace"))
        return self.prefix is not None and file_id.startswith(self.prefix)

    def require_right(self, right):
        if not self.is_key and right not in self.rights:
            raise ApiError(403, "token_right_missing",
                           "this token does not carry the %s right" % right)

    def require(self, right, file_id):
        """403 unless this credential has `right` on `file_id`."""
        if self.is_key:
            return
        self.require_right(right)
        if not self.covers(file_id):
            raise ApiError(403, "token_wrong_file",
                           "this token is not valid for upload %s" % file_id[:128])

    def budget(self):
        """The token's byte budget as the store checks it (None for the key: no cap)."""
        if self.is_key or self.max_bytes is None:
            return None
        return storage.Budget(self.max_bytes, 403, "token_budget_spent",
                              "the upload would reach %d bytes; this token allows %d")

    def require_budget(self, total_bytes):
        budget = self.budget()
        if budget is not None:
            budget.check(total_bytes)


class Signer:
    """Mints and verifies tokens with one secret."""

    def __init__(self, secret):
        self._secret = secret if isinstance(secret, bytes) else secret.encode("utf-8")

    def _sign(self, signed_part):
        return hmac.new(self._secret, signed_part.encode("ascii"), hashlib.sha256).digest()

    def mint(self, rights, expires_in, file_id=None, prefix=None, max_bytes=None, now=None):
        """-> (token, expiry as unix seconds)."""
        now = time.time() if now is None else now
        payload = {"fid": file_id} if file_id is not None else {"pfx": prefix}
        payload["r"] = list(rights)
        payload["exp"] = int(now + expires_in)
        if max_bytes is not None:
            payload["max"] = int(max_bytes)
        body = b64url(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        signed_part = TOKEN_VERSION + "." + body
        return signed_part + "." + b64url(self._sign(signed_part)), payload["exp"]

    def verify(self, token, now=None):
        """-> Grant, or 401: malformed_token, token_signature_invalid, token_expired. The
        signature is checked before the payload is believed (or even parsed)."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_VERSION or len(token) > MAX_TOKEN_CHARS:
            raise _unauthorized("malformed_token", "the token is not one this server mints")
        try:
            signature = unb64url(parts[2])
        except (ValueError, binascii.Error):
            raise _unauthorized("malformed_token", "the token is not one this server mints")
        if not hmac.compare_digest(signature, self._sign(parts[0] + "." + parts[1])):
            raise _unauthorized("token_signature_invalid",
                                "the token's signature does not match (changed or forged)")
        try:
            payload = json.loads(unb64url(parts[1]).decode("utf-8"))
            if not isinstance(payload, dict) or not isinstance(payload.get("exp"), int):
                raise ValueError
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise _unauthorized("malformed_token", "the token's payload cannot be read")
        if (time.time() if now is None else now) >= payload["exp"]:
            raise _unauthorized("token_expired", "the token has expired; ask for a new one")
        return Grant(False, payload)


def _unauthorized(code, message):
    error = "invalid_request" if code == "missing_credentials" else "invalid_token"
    return ApiError(401, code, message, {
        "WWW-Authenticate": 'Bearer realm="%s", error="%s"' % (REALM, error)})


def token_request(body, max_upload_bytes):
    """The JSON body of POST /api/video/tokens (SPEC section 6), validated ->
    (file_id, prefix, rights, expires_in, max_bytes)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    file_id, prefix = data.get("fileId"), data.get("fileIdPrefix")
    if (file_id is None) == (prefix is None):
        raise ApiError(400, "invalid_token_request", "give exactly one of fileId and "
                       "fileIdPrefix")
    if file_id is not None and not (isinstance(file_id, str) and
                                    storage.valid_file_id(file_id)):
        raise ApiError(400, "invalid_file_id", "fileId must match [A-Za-z0-9_-]{1,128}")
    if prefix is not None and not (isinstance(prefix, str) and
                                   storage.valid_file_id(prefix)):
        raise ApiError(400, "invalid_file_id", "fileIdPrefix must match [A-Za-z0-9_-]{1,128}")
    rights = data.get("rights", ["upload", "read"])
    if not isinstance(rights, list) or not rights or \
            any(not isinstance(r, str) or r not in RIGHTS for r in rights):
        raise ApiError(400, "invalid_rights", "rights must be a non-empty list of "
                       "\"upload\" and \"read\"")
    expires_in = data.get("expiresIn", DEFAULT_EXPIRES_IN_S)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) or \
            not 1 <= expires_in <= MAX_EXPIRES_IN_S:
        raise ApiError(400, "invalid_expires_in", "expiresIn must be 1..%d seconds"
                       % MAX_EXPIRES_IN_S)
    max_bytes = data.get("maxBytes", max_upload_bytes)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ApiError(400, "invalid_max_bytes", "maxBytes must be a whole number >= 0")
    return file_id, prefix, sorted(set(rights)), expires_in, max_bytes


# ---------------------------------------------------------------------------------------------
# The guard: one check per request, from the headers
# ---------------------------------------------------------------------------------------------

class Guard:
    """Decides, from a request's line and headers, whether it may run. `enabled` is False
    without an API key: then every request is allowed, as before this module existed."""

    def __init__(self, api_key=None, secret=None):
        self.enabled = bool(api_key)
        self._key_digest = hashlib.sha256(api_key.encode("utf-8")).digest() if api_key \
            else None
        if secret:
            self.signer = Signer(secret)
        elif api_key:
            self.signer = Signer(derive_secret(api_key))
        else:
            self.signer = None

    def credential(self, headers, query):
        """-> Grant for the request's credential; 401 when it has none or a bad one."""
        value = None
        authorization = headers.get("Authorization")
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise _unauthorized("invalid_credentials",
                                    "use Authorization: Bearer <key or token>")
            value = value.strip()
            digest = hashlib.sha256(value.encode("utf-8", "replace")).digest()
            if hmac.compare_digest(digest, self._key_digest):
                return Grant(True)
            if not value.startswith(TOKEN_VERSION + "."):
                raise _unauthorized("invalid_api_key", "the API key is not valid")
        else:
            values = query.get("token")
            if not values:
                raise _unauthorized("missing_credentials", "send Authorization: Bearer "
                                    "<key or token> (or ?token= for media and events)")
            value = values[-1]
        return self.signer.verify(value)

    def authorize(self, handler, label, groups):
        """The one check in m1server's dispatch, before the route's function runs. Returns the
        Grant (None when auth is off), stored as handler.grant for check_chunk."""
        if not self.enabled or handler.command == "OPTIONS":
            return None                          # a preflight never carries credentials
        rule = ROUTE_RULES.get(label, KEY)
        if rule == PUBLIC:
            return None
        if label.startswith("/files") and _effective_method(handler) == "OPTIONS":
            return None
        grant = self.credential(handler.headers,
                                parse_qs(urlsplit(handler.path).query))
        if grant.is_key:
            return grant
        if rule == KEY:
            raise ApiError(403, "key_required", "this route needs the API key, not a token")
        if rule in (READ, TUS_UPLOAD):
            _check_path_id(label, _file_id_of(label, groups))
        if rule == READ:
            grant.require("read", _file_id_of(label, groups))
        elif rule == UPLOAD:
            grant.require_right("upload")        # fileId and budget: check_chunk
        elif rule == TUS_CREATE:
            self._tus_create(handler, grant)
        elif rule == TUS_UPLOAD:
            self._tus_upload(handler, grant, groups[0])
        return grant

    def check_chunk(self, handler, file_id):
        """Seed upload, after the multipart parse and before the store: the token covers this
        fileId. Returns its byte budget (a storage.Budget, or None) for put_chunk, which
        checks it under the upload's lock, counting the chunks stored meanwhile."""
        grant = getattr(handler, "grant", None)
        if grant is None or grant.is_key:
            return None
        grant.require("upload", file_id)
        return grant.budget()

    def _tus_create(self, handler, grant):
        grant.require_right("upload")
        if _effective_method(handler) != "POST":
            return                               # tus answers 405 itself
        if handler.headers.get("Upload-Concat") is not None:
            raise ApiError(403, "key_required", "concatenation needs the API key")
        file_id = _metadata_file_id(handler.headers.get("Upload-Metadata"))
        if file_id is None:
            raise ApiError(403, "token_wrong_file", "with a token, Upload-Metadata must name "
                           "the fileId the token was minted for")
        grant.require("upload", file_id)
        length = _header_number(handler.headers.get("Upload-Length"))
        body = _header_number(handler.headers.get("Content-Length")) or 0
        grant.require_budget(max(length or 0, body))

    def _tus_upload(self, handler, grant, file_id):
        method = _effective_method(handler)
        if method not in ("HEAD", "PATCH"):
            raise ApiError(403, "key_required", "%s of a tus upload needs the API key"
                           % method[:20])
        grant.require("upload", file_id)
        if method == "PATCH":
            upload = handler.server.store.status(file_id)
            offset = upload.bytes_appended if upload else 0
            grant.require_budget(offset + (_header_number(
                handler.headers.get("Content-Length")) or 0))


def _file_id_of(label, groups):
    if label == "/uploads/:id":
        return groups[0].rpartition(".")[0] or groups[0]
    return groups[0]


def _check_path_id(label, file_id):
    """The fileId of a path is checked before a token is held against it, with the answer
    the route itself gives an invalid one: a file or tus URL that cannot exist is 404, an
    API path's id is 400 invalid_file_id."""
    if storage.valid_file_id(file_id):
        return
    if label.startswith(("/uploads", "/files")):
        raise ApiError(404, "not_found", "no such upload")
    raise ApiError(400, "invalid_file_id", "fileId must match [A-Za-z0-9_-]{1,128}")


def _effective_method(handler):
    override = handler.headers.get("X-HTTP-Method-Override")     # tus honours it
    return override.strip().upper() if override else handler.command


def _header_number(value):
    return httphead.number(value or "")


def _metadata_file_id(raw):
    for item in (raw or "").split(","):
        key, _, value = item.strip().partition(" ")
        if key == "fileId":
            try:
                return base64.b64decode(value.strip(), validate=True).decode("ascii")
            except (ValueError, binascii.Error, UnicodeDecodeError):
                return None
    return None


# ---------------------------------------------------------------------------------------------
# POST /api/video/tokens (key only, see ROUTE_RULES)
# ---------------------------------------------------------------------------------------------

def routes(guard, read_body, max_upload_bytes, format_time):
    def post_token(handler):
        if not guard.enabled:
            raise ApiError(404, "auth_disabled", "tokens need --api-key: auth is off")
        fields = token_request(read_body(handler, MAX_TOKEN_REQUEST_BYTES), max_upload_bytes)
        file_id, prefix, rights, expires_in, max_bytes = fields
        token, expires = guard.signer.mint(rights, expires_in, file_id, prefix, max_bytes)
        data = {"token": token, "expiresAt": format_time(expires), "rights": rights,
                "maxBytes": max_bytes}
        data["fileId" if file_id is not None else "fileIdPrefix"] = file_id or prefix
        handler.send_json(200, {"success": True, "data": data})

    return ((r"/api/video/tokens", {"POST": post_token}),)


# ---------------------------------------------------------------------------------------------
# Rate limits: a token bucket per client, on requests and on body bytes
# ---------------------------------------------------------------------------------------------

class _Bucket:
    __slots__ = ("level", "stamp")

    def __init__(self, level, stamp):
        self.level = level
        self.stamp = stamp


class RateLimiter:
    """Per-client token buckets. `rate` per second refills up to `burst`; a request is let in
    while the bucket is above zero and then pays its cost (so it may go into debt)."""

    def __init__(self, requests_per_s=0, request_burst=0, bytes_per_s=0, byte_burst=0,
                 clock=time.monotonic):
        self.buckets = []          # (name, rate, burst, {client: _Bucket})
        if requests_per_s > 0:
            self.buckets.append(("requests", requests_per_s,
                                 max(1.0, request_burst or requests_per_s), {}))
        if bytes_per_s > 0:
            self.buckets.append(("bytes", bytes_per_s, max(1.0, byte_burst or bytes_per_s), {}))
        self._clock = clock
        self._lock = threading.Lock()

    @property
    def enabled(self):
        return bool(self.buckets)

    def admit(self, client, body_bytes):
        """429 rate_limited with Retry-After when `client` has spent its allowance."""
        if not self.buckets:
            return
        now = self._clock()
        with self._lock:
            states = []
            for name, rate, burst, table in self.buckets:
                if name == "bytes" and not body_bytes:
                    continue
                bucket = table.get(client)
                if bucket is None:
                    if len(table) >= MAX_TRACKED_CLIENTS:
                        self._forget_idle(table, rate, burst, now)
                    bucket = table[client] = _Bucket(burst, now)
                bucket.level = min(burst, bucket.level + (now - bucket.stamp) * rate)
                bucket.stamp = now
                if bucket.level <= 0 or name == "requests" and bucket.level < 1:
                    need = 1 - bucket.level
                    wait = max(1, int(math.ceil(need / rate)))
                    raise ApiError(429, "rate_limited", "too many %s from this client; retry "
                                   "in %d s" % (name, wait), {"Retry-After": str(wait)})
                states.append((name, bucket))
            for name, bucket in states:
                bucket.level -= 1 if name == "requests" else body_bytes

    @staticmethod
    def _forget_idle(table, rate, burst, now):
        for client in [c for c, b in table.items() if b.level + (now - b.stamp) * rate >= burst]:
            del table[client]
        if len(table) >= MAX_TRACKED_CLIENTS:         # all busy: forget the oldest
            del table[min(table, key=lambda c: table[c].stamp)]
