"""s3client.py - a small S3 client on the standard library: AWS Signature Version 4 over
http.client, the object calls m1server needs, retries, and errors that say what went wrong.

What it does:
  * Signs every request with AWS Signature Version 4 (header auth) and builds presigned URLs
    (query auth), as the AWS SigV4 documentation describes. S3 paths are encoded once and never
    normalised (S3 keys may hold "//", "." and ".."); the generic form (normalised paths) is
    there for the published test suite, which is not S3-specific.
  * PutObject (bytes or a file region, with If-None-Match: * / If-Match: <etag> for conditional
    writes), GetObject (whole, a Range, or streamed), HeadObject, DeleteObject, ListObjectsV2
    with pagination, multipart uploads (create, upload part, upload part copy, complete, abort,
    list), HeadBucket-style probing.
  * Path-style (`http://host/bucket/key`) or virtual-hosted (`http://bucket.host/key`)
    addressing; credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN
    and the region from AWS_REGION.
  * Retries with exponential backoff and jitter on connection errors, timeouts, 5xx answers,
    429 and 503 SlowDown; the body is sent again from the start on each attempt. A request that
    may have taken effect before its answer was lost is retried too: callers make each of
    their writes safe to repeat (a conditional write that already happened answers 412).
    Each retry is logged (a warning with the operation, e.g. PutObject, and the attempt), and
    so is a request given up after the last attempt; `observer(operation, "retry" |
    "failure")`, when set, hears of both (m1server counts them in /metrics). Operation names
    are a fixed set (OPERATIONS), so they are safe as metric labels.
  * Every refusal becomes an S3Error with the HTTP status, S3's error code (NoSuchKey,
    AccessDenied, ...), its message and request id, parsed from the XML error body.

What it does not do: chunked (streaming) payload signing, checksums other than MD5/SHA-256,
bucket administration beyond creating one (tests), STS or instance-profile credentials, or
following redirects to another region.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.client
import os
import random
import re
import ssl
import threading
import time
import xml.etree.ElementTree as ElementTree
from urllib.parse import quote, unquote, urlsplit

import serverlog

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
DEFAULT_REGION = "us-east-1"
DEFAULT_TIMEOUT_S = 30.0               # per socket operation, not per request
DEFAULT_ATTEMPTS = 4                   # first try + 3 retries
BACKOFF_BASE_S = 0.1                   # 0.1, 0.2, 0.4 ... (full jitter), capped below
BACKOFF_MAX_S = 2.0
MAX_IDLE_CONNECTIONS = 16              # kept-alive connections per client
SEND_BLOCK_BYTES = 1 << 20             # file bodies are sent in blocks of this size
MAX_PRESIGN_S = 7 * 86400              # SigV4 presigned URLs last at most a week
MAX_LIST_KEYS = 1000                   # what ListObjectsV2 returns at most per page
RETRY_STATUSES = (429, 500, 502, 503, 504)
RETRY_CODES = ("SlowDown", "InternalError", "RequestTimeout", "ServiceUnavailable")
OPERATIONS = ("PutObject", "GetObject", "HeadObject", "DeleteObject", "ListObjectsV2",
              "CreateMultipartUpload", "UploadPart", "UploadPartCopy",
              "CompleteMultipartUpload", "AbortMultipartUpload", "ListMultipartUploads",
              "CreateBucket", "other")

log = serverlog.Logger("m1server.s3client")
S3_XML_NS = re.compile(r"^\{[^}]*\}")

# RFC 3986 unreserved characters: the only ones SigV4 leaves unencoded.
_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~"


class S3Error(Exception):
    """An S3 request that failed: `status` (None for a connection error), S3's `code`."""

    def __init__(self, status, code, message, method=None, key=None, request_id=None):
        self.status = status
        self.code = code or ("ConnectionError" if status is None else "HTTP%d" % status)
        self.message = message or ""
        self.method = method
        self.key = key
        self.request_id = request_id
        where = " %s %s" % (method, key) if method else ""
        Exception.__init__(self, "S3%s: %s %s%s" % (
            where, status if status is not None else "no answer", self.code,
            (": " + self.message) if self.message else ""))


class S3ConnectionError(S3Error):
    """No answer: refused, reset, timed out, DNS... after every retry."""

    def __init__(self, message, method=None, key=None):
        S3Error.__init__(self, None, "ConnectionError", message, method, key)


class S3ConfigError(ValueError):
    """Credentials or settings missing or malformed (found before any request is sent)."""


# ---------------------------------------------------------------------------------------------
# AWS Signature Version 4: pure functions (tested against the published vectors)
# ---------------------------------------------------------------------------------------------

def uri_encode(text, keep_slash=False):
    """SigV4's UriEncode: UTF-8, every byte outside the unreserved set as %XX (upper case)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return quote(text, safe=_UNRESERVED + ("/" if keep_slash else ""))


def normalize_path(path):
    """RFC 3986 dot-segment removal plus collapsing empty segments, for services that
    normalise (not S3). Keeps a trailing slash."""
    segments = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    normalized = "/" + "/".join(segments)
    if path.endswith("/") and segments:
        normalized += "/"
    return normalized


def canonical_uri(raw_path, normalize=False):
    """The path as the request sends it (raw, not yet percent-encoded), encoded once."""
    path = raw_path or "/"
    if normalize:
        path = normalize_path(path)
    return uri_encode(path, keep_slash=True)


def canonical_query(pairs):
    """Sorted `name=value` pairs, each side encoded; `pairs` hold decoded strings."""
    encoded = sorted((uri_encode(name), uri_encode(value)) for name, value in pairs)
    return "&".join("%s=%s" % pair for pair in encoded)


def parse_query(query):
    """'a=1&b&c=%20' -> [('a', '1'), ('b', ''), ('c', ' ')] (decoded, order kept)."""
    pairs = []
    for item in query.split("&") if query else []:
        name, _, value = item.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return pairs


def canonical_header_value(value):
    """Trim, and turn every run of whitespace (folded lines too) into one space."""
    return " ".join(str(value).split())


def canonical_headers(headers, signed_names):
    """(canonical header block, signed header list) for `headers`, a list of (name, value);
    repeated names are joined with commas in the order they came."""
    values = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered in signed_names:
            values.setdefault(lowered, []).append(canonical_header_value(value))
    names = sorted(values)
    block = "".join("%s:%s\n" % (name, ",".join(values[name])) for name in names)
    return block, ";".join(names)


def signing_key(secret_key, date, region, service):
    key = ("AWS4" + secret_key).encode("utf-8")
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def sign(method, path, query_pairs, headers, payload_hash, access_key, secret_key, region,
         service, amz_date, signed_names=None, normalize=False):
    """Sign one request. `headers` must already hold Host and X-Amz-Date (and the session
    token, if any); `signed_names` defaults to every header given. Returns a dict with the
    canonical request, the string to sign, the signature and the Authorization value."""
    if signed_names is None:
        signed_names = set(name.lower() for name, _ in headers)
    block, signed = canonical_headers(headers, set(signed_names))
    canonical_request = "\n".join([method, canonical_uri(path, normalize),
                                   canonical_query(query_pairs), block, signed, payload_hash])
    scope = "%s/%s/%s/aws4_request" % (amz_date[:8], region, service)
    string_to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(
        canonical_request.encode("utf-8")).hexdigest()])
    signature = hmac.new(signing_key(secret_key, amz_date[:8], region, service),
                         string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    authorization = "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        ALGORITHM, access_key, scope, signed, signature)
    return {"canonical_request": canonical_request, "string_to_sign": string_to_sign,
            "signature": signature, "authorization": authorization, "signed_headers": signed}


def presign(method, host, path, query_pairs, access_key, secret_key, region, service,
            amz_date, expires, session_token=None, payload_hash=UNSIGNED_PAYLOAD,
            normalize=False):
    """Query-string auth: the full query string (theirs + X-Amz-*) of a presigned URL."""
    if not 1 <= int(expires) <= MAX_PRESIGN_S:
        raise S3ConfigError("a presigned URL lasts 1 s to 7 days, not %r s" % expires)
    scope = "%s/%s/%s/aws4_request" % (amz_date[:8], region, service)
    auth = [("X-Amz-Algorithm", ALGORITHM), ("X-Amz-Credential", access_key + "/" + scope),
            ("X-Amz-Date", amz_date), ("X-Amz-Expires", str(int(expires))),
            ("X-Amz-SignedHeaders", "host")]
    if session_token:
        auth.append(("X-Amz-Security-Token", session_token))
    pairs = list(query_pairs) + auth
    signed = sign(method, path, pairs, [("host", host)], payload_hash, access_key, secret_key,
                  region, service, amz_date, normalize=normalize)
    return canonical_query(pairs) + "&X-Amz-Signature=" + signed["signature"]


def amz_date_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


# ---------------------------------------------------------------------------------------------
# Credentials and settings
# ---------------------------------------------------------------------------------------------

class Credentials:
    def __init__(self, access_key, secret_key, session_token=None):
        if not access_key or not secret_key:
            raise S3ConfigError("S3 needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        self.access_key = access_key
        self.secret_key = secret_key
        self.session_token = session_token or None

    @classmethod
    def from_environ(cls, environ=None):
        environ = os.environ if environ is None else environ
        return cls(environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY"),
                   environ.get("AWS_SESSION_TOKEN"))

    def __repr__(self):                  # never print the secret
        return "Credentials(%r, <secret>)" % self.access_key


def default_endpoint(region):
    return "https://s3.%s.amazonaws.com" % (region or DEFAULT_REGION)


class ObjectInfo:
    """One entry of a listing."""

    def __init__(self, key, size, etag, last_modified):
        self.key = key
        self.size = size
        self.etag = etag
        self.last_modified = last_modified      # seconds since the epoch (float)

    def __repr__(self):
        return "ObjectInfo(%r, %d)" % (self.key, self.size)


class ListPage:
    def __init__(self, objects, prefixes, next_token, truncated):
        self.objects = objects
        self.prefixes = prefixes
        self.next_token = next_token
        self.truncated = truncated


class Response:
    """A finished response: status, headers (lower-case names) and the whole body."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    @property
    def metadata(self):
        return {name[len("x-amz-meta-"):]: value for name, value in self.headers.items()
                if name.startswith("x-amz-meta-")}


class ObjectStream:
    """A GET whose body is read by the caller (media proxying, downloads). Close it."""

    def __init__(self, client, connection, response):
        self._client = client
        self._connection = connection
        self._response = response
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.getheaders()}

    def read(self, size=None):
        """Up to `size` bytes (all that is left when None); b"" at the end."""
        return self._response.read(None if size is None or size < 0 else size)

    def readinto(self, buffer):
        return self._response.readinto(buffer)

    def close(self):
        if self._connection is None:
            return
        if self._response.isclosed():
            self._client._release(self._connection)      # fully read: reuse it
        else:
            self._connection.close()                     # unread bytes: never reuse
        self._connection = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FileRegion:
    """A request body read from a file: `length` bytes from `offset` (resent on retries)."""

    def __init__(self, path, offset=0, length=None):
        self.path = path
        self.offset = offset
        self.length = os.path.getsize(path) - offset if length is None else length


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------

class S3Client:
    """One bucket on one endpoint. Thread-safe; keeps a few connections alive."""

    def __init__(self, bucket, endpoint=None, region=None, credentials=None,
                 addressing="path", timeout=DEFAULT_TIMEOUT_S, attempts=DEFAULT_ATTEMPTS,
                 service="s3"):
        if not bucket:
            raise S3ConfigError("no bucket given")
        if addressing not in ("path", "virtual"):
            raise S3ConfigError("addressing must be path or virtual, not %r" % addressing)
        self.bucket = bucket
        self.region = region or os.environ.get("AWS_REGION") or DEFAULT_REGION
        self.credentials = credentials or Credentials.from_environ()
        self.endpoint = (endpoint or default_endpoint(self.region)).rstrip("/")
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise S3ConfigError("endpoint must be http(s)://host[:port], not %r" % endpoint)
        self.scheme = parts.scheme
        self.addressing = addressing
        self.port = parts.port
        self.endpoint_host = parts.hostname
        if addressing == "virtual":
            self.host = "%s.%s" % (bucket, parts.hostname)
            self.base_path = parts.path.rstrip("/")
        else:
            self.host = parts.hostname
            self.base_path = parts.path.rstrip("/") + "/" + bucket
        default_port = 443 if self.scheme == "https" else 80
        self.host_header = self.host if self.port in (None, default_port) else \
            "%s:%d" % (self.host, self.port)
        self.timeout = timeout
        self.attempts = max(1, int(attempts))
        self.service = service
        self.observer = None              # observer(operation, "retry" | "failure")
        self._idle = []
        self._idle_lock = threading.Lock()

    # -- objects ----------------------------------------------------------------------------

    def put_object(self, key, body=b"", content_type=None, metadata=None, if_none_match=False,
                   if_match=None, sha256=None, content_md5=False):
        """Store `body` (bytes or FileRegion) at `key`; returns the new ETag.
        if_none_match: only when the key does not exist (412 otherwise);
        if_match: only when the current ETag is this one (412 otherwise)."""
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        for name, value in (metadata or {}).items():
            headers["x-amz-meta-" + name] = value
        if if_none_match:
            headers["If-None-Match"] = "*"
        if if_match:
            headers["If-Match"] = if_match
        if content_md5:
            headers["Content-MD5"] = base64.b64encode(_digest(body, "md5")).decode("ascii")
        response = self.request("PUT", key, headers=headers, body=body, payload_hash=sha256)
        return response.header("etag")

    def get_object(self, key, byte_range=None, if_match=None):
        """The whole object (or `byte_range` = (first, last) inclusive) as a Response."""
        headers = {}
        if byte_range is not None:
            headers["Range"] = "bytes=%d-%d" % byte_range
        if if_match:
            headers["If-Match"] = if_match
        return self.request("GET", key, headers=headers, expect=(200, 206))

    def open_object(self, key, byte_range=None):
        """Like get_object, but the body is read by the caller from an ObjectStream."""
        headers = {}
        if byte_range is not None:
            headers["Range"] = "bytes=%d-%d" % byte_range
        return self.request("GET", key, headers=headers, expect=(200, 206), stream=True)

    def head_object(self, key):
        """The object's headers as a Response (empty body); S3Error 404 when absent."""
        return self.request("HEAD", key)

    def delete_object(self, key, if_match=None):
        headers = {"If-Match": if_match} if if_match else {}
        self.request("DELETE", key, headers=headers, expect=(200, 204))

    def list_objects(self, prefix="", delimiter=None, start_after=None, continuation_token=None,
                     max_keys=None):
        """One page of ListObjectsV2."""
        query = [("list-type", "2"), ("prefix", prefix)]
        if delimiter:
            query.append(("delimiter", delimiter))
        if start_after:
            query.append(("start-after", start_after))
        if continuation_token:
            query.append(("continuation-token", continuation_token))
        if max_keys is not None:
            query.append(("max-keys", str(int(max_keys))))
        root = _xml(self.request("GET", None, query=query).body)
        objects = []
        for item in _children(root, "Contents"):
            objects.append(ObjectInfo(_text(item, "Key"), int(_text(item, "Size") or 0),
                                      _text(item, "ETag"), _parse_time(_text(item,
                                                                             "LastModified"))))
        prefixes = [_text(item, "Prefix") for item in _children(root, "CommonPrefixes")]
        truncated = (_text(root, "IsTruncated") or "").lower() == "true"
        return ListPage(objects, prefixes, _text(root, "NextContinuationToken"), truncated)

    def iter_objects(self, prefix="", start_after=None, page_size=None):
        """Every object under `prefix` (after `start_after`), page after page."""
        token = None
        while True:
            page = self.list_objects(prefix, start_after=None if token else start_after,
                                     continuation_token=token, max_keys=page_size)
            for item in page.objects:
                yield item
            if not page.truncated or not page.next_token:
                return
            token = page.next_token

    # -- multipart uploads ------------------------------------------------------------------

    def create_multipart_upload(self, key, content_type=None, metadata=None):
        headers = {"Content-Type": content_type} if content_type else {}
        for name, value in (metadata or {}).items():
            headers["x-amz-meta-" + name] = value
        root = _xml(self.request("POST", key, query=[("uploads", "")], headers=headers).body)
        return _text(root, "UploadId")

    def upload_part(self, key, upload_id, number, body, sha256=None):
        """Upload part `number` (1..10000); returns its ETag (keep it for complete)."""
        response = self.request("PUT", key, query=[("partNumber", str(number)),
                                                   ("uploadId", upload_id)],
                                body=body, payload_hash=sha256)
        return response.header("etag")

    def upload_part_copy(self, key, upload_id, number, source_key, byte_range=None):
        """Part `number` copied inside the store from `source_key` (bytes first..last)."""
        headers = {"x-amz-copy-source": "/%s/%s" % (self.bucket, uri_encode(source_key, True))}
        if byte_range is not None:
            headers["x-amz-copy-source-range"] = "bytes=%d-%d" % byte_range
        response = self.request("PUT", key, query=[("partNumber", str(number)),
                                                   ("uploadId", upload_id)], headers=headers)
        return _text(_xml(response.body), "ETag")

    def complete_multipart_upload(self, key, upload_id, parts, if_none_match=False):
        """`parts`: [(number, etag)] in order. Returns the final object's ETag."""
        body = "<CompleteMultipartUpload>%s</CompleteMultipartUpload>" % "".join(
            "<Part><PartNumber>%d</PartNumber><ETag>%s</ETag></Part>" % (number, _xml_escape(
                etag)) for number, etag in parts)
        headers = {"Content-Type": "application/xml"}
        if if_none_match:
            headers["If-None-Match"] = "*"
        response = self.request("POST", key, query=[("uploadId", upload_id)], headers=headers,
                                body=body.encode("utf-8"))
        return _text(_xml(response.body), "ETag")

    def abort_multipart_upload(self, key, upload_id):
        self.request("DELETE", key, query=[("uploadId", upload_id)], expect=(200, 204))

    def list_multipart_uploads(self, prefix=""):
        """[(key, upload_id, initiated seconds)] of the uploads in progress under `prefix`."""
        found = []
        key_marker = upload_marker = None
        while True:
            query = [("uploads", ""), ("prefix", prefix)]
            if key_marker:
                query += [("key-marker", key_marker), ("upload-id-marker", upload_marker or "")]
            root = _xml(self.request("GET", None, query=query).body)
            for item in _children(root, "Upload"):
                found.append((_text(item, "Key"), _text(item, "UploadId"),
                              _parse_time(_text(item, "Initiated"))))
            if (_text(root, "IsTruncated") or "").lower() != "true":
                return found
            key_marker = _text(root, "NextKeyMarker")
            upload_marker = _text(root, "NextUploadIdMarker")
            if not key_marker:
                return found

    # -- buckets, URLs ----------------------------------------------------------------------

    def create_bucket(self):
        body = b""
        if self.region != DEFAULT_REGION:
            body = ("<CreateBucketConfiguration><LocationConstraint>%s</LocationConstraint>"
                    "</CreateBucketConfiguration>" % self.region).encode("utf-8")
        self.request("PUT", None, body=body)

    def presigned_url(self, key, expires=3600, method="GET", now=None):
        """A URL anyone can use for `expires` seconds without credentials."""
        amz_date = now or amz_date_now()
        path = self._path(key)
        query = presign(method, self.host_header, path, [], self.credentials.access_key,
                        self.credentials.secret_key, self.region, self.service, amz_date,
                        expires, self.credentials.session_token)
        return "%s://%s%s?%s" % (self.scheme, self.host_header, uri_encode(path, True), query)

    # -- the one request path ---------------------------------------------------------------

    def request(self, method, key, query=(), headers=None, body=b"", payload_hash=None,
                expect=(200,), stream=False):
        """Send one signed request, retrying what may succeed on a second try; returns a
        Response (or an ObjectStream with stream=True); raises S3Error otherwise."""
        path = self._path(key)
        target = uri_encode(path, True)
        if query:
            target += "?" + "&".join(uri_encode(k) + "=" + uri_encode(v) for k, v in query)
        if payload_hash is None:
            payload_hash = _digest(body, "sha256").hex() if _length(body) else EMPTY_SHA256
        last_error = None
        for attempt in range(self.attempts):
            if attempt:
                self._report(method, key, query, headers, "retry", attempt, last_error)
                time.sleep(random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** attempt)))
            try:
                connection, response = self._send(method, path, target, query, headers or {},
                                                  body, payload_hash)
                if stream and response.status in expect:
                    return ObjectStream(self, connection, response)
                data = response.read()
            except (OSError, http.client.HTTPException) as error:
                last_error = S3ConnectionError("%s: %s" % (type(error).__name__, error),
                                               method, key)
                continue
            self._release(connection)
            status = response.status
            headers_read = {k.lower(): v for k, v in response.getheaders()}
            # CompleteMultipartUpload and copies may answer 200 with an <Error> in the body.
            if status in expect and not (status == 200 and _is_error_body(data)):
                return Response(status, headers_read, data)
            error = _error_from(status, data, method, key, headers_read)
            if status in RETRY_STATUSES or error.code in RETRY_CODES:
                last_error = error
                continue
            raise error
        self._report(method, key, query, headers, "failure", self.attempts, last_error)
        raise last_error

    def _report(self, method, key, query, headers, outcome, attempt, error):
        """Log a retry (before attempt `attempt` + 1) or a request given up, and tell the
        observer."""
        operation = operation_name(method, key, query, headers)
        if outcome == "retry":
            log.warning("S3 %s %s: attempt %d of %d failed (%s); trying again", operation,
                        key or "", attempt, self.attempts, error)
        else:
            log.warning("S3 %s %s: giving up after %d attempts (%s)", operation, key or "",
                        attempt, error)
        if self.observer is not None:
            try:
                self.observer(operation, outcome)
            except Exception:
                log.exception("the S3 request observer failed")

    def _path(self, key):
        if key is None:
            return self.base_path + "/"
        return self.base_path + "/" + key

    def _send(self, method, path, target, query, headers, body, payload_hash):
        amz_date = amz_date_now()
        send = [("Host", self.host_header), ("X-Amz-Date", amz_date),
                ("X-Amz-Content-SHA256", payload_hash)]
        if self.credentials.session_token:
            send.append(("X-Amz-Security-Token", self.credentials.session_token))
        send += list(headers.items())
        length = _length(body)
        if length or method in ("PUT", "POST"):
            send.append(("Content-Length", str(length)))
        signed = sign(method, path, query, send, payload_hash, self.credentials.access_key,
                      self.credentials.secret_key, self.region, self.service, amz_date)
        send.append(("Authorization", signed["authorization"]))
        connection = self._acquire()
        try:
            connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in send:
                connection.putheader(name, value)
            connection.endheaders()
            _send_body(connection, body)
            return connection, connection.getresponse()
        except BaseException:
            connection.close()
            raise

    def _acquire(self):
        with self._idle_lock:
            if self._idle:
                return self._idle.pop()
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _release(self, connection):
        with self._idle_lock:
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(connection)
                return
        connection.close()

    def close(self):
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def operation_name(method, key, query=(), headers=None):
    """The S3 API operation a request is (one of OPERATIONS), from its method and query."""
    names = set(name for name, _ in query)
    if key is None:
        if method == "PUT":
            return "CreateBucket"
        return "ListMultipartUploads" if "uploads" in names else "ListObjectsV2"
    if method == "PUT" and "partNumber" in names:
        copy = "x-amz-copy-source" in (headers or {})
        return "UploadPartCopy" if copy else "UploadPart"
    if method == "POST":
        return "CreateMultipartUpload" if "uploads" in names else "CompleteMultipartUpload"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in names else "DeleteObject"
    return {"PUT": "PutObject", "GET": "GetObject", "HEAD": "HeadObject"}.get(method, "other")


def _length(body):
    if isinstance(body, FileRegion):
        return body.length
    return len(body or b"")


def _blocks(body):
    """The bytes of a body (bytes, or a FileRegion read block by block), in order."""
    if not isinstance(body, FileRegion):
        if body:
            yield body
        return
    with open(body.path, "rb") as f:
        f.seek(body.offset)
        remaining = body.length
        while remaining > 0:
            block = f.read(min(remaining, SEND_BLOCK_BYTES))
            if not block:
                raise IOError("%s is shorter than expected" % body.path)
            yield block
            remaining -= len(block)


def _digest(body, algorithm):
    digest = hashlib.new(algorithm)
    for block in _blocks(body):
        digest.update(block)
    return digest.digest()


def _send_body(connection, body):
    for block in _blocks(body):
        connection.send(block)


def _error_from(status, data, method, key, headers):
    code = message = request_id = None
    if data:
        try:
            root = _parse_xml(data)
            code, message = _text(root, "Code"), _text(root, "Message")
            request_id = _text(root, "RequestId")
        except ElementTree.ParseError:
            message = data[:200].decode("utf-8", "replace").strip()
    if code is None:                       # HEAD answers have no body: name the status
        code = {301: "PermanentRedirect", 304: "NotModified", 400: "BadRequest",
                403: "AccessDenied", 404: "NotFound", 409: "Conflict",
                412: "PreconditionFailed", 416: "InvalidRange"}.get(status)
    return S3Error(status, code, message, method, key,
                   request_id or headers.get("x-amz-request-id"))


def _is_error_body(data):
    return b"<Error>" in data[:512]


def _parse_xml(data):
    """The document's root with S3's namespace removed from every tag."""
    root = ElementTree.fromstring(data)
    for element in root.iter():
        element.tag = S3_XML_NS.sub("", element.tag)
    return root


def _xml(data):
    """An answer's XML; an <Error> document (possible even with 200) raises S3Error."""
    root = _parse_xml(data)
    if root.tag == "Error":
        raise S3Error(200, _text(root, "Code"), _text(root, "Message"))
    return root


def _children(element, tag):
    return [child for child in element if child.tag == tag]


def _text(element, tag):
    child = element.find(tag)
    return None if child is None or child.text is None else child.text


def _xml_escape(text):
    return (text or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(
        '"', "&quot;")


def _parse_time(text):
    """'2024-01-01T00:00:00.000Z' -> epoch seconds (0.0 when absent)."""
    if not text:
        return 0.0
    match = re.match(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?", text)
    if not match:
        return 0.0
    moment = datetime.datetime(*[int(g) for g in match.groups()[:6]],
                               tzinfo=datetime.timezone.utc)
    return moment.timestamp() + float(match.group(7) or 0)


def split_storage_url(url):
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix'); S3ConfigError otherwise."""
    match = re.match(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?\Z", url or "")
    if not match:
        raise S3ConfigError("storage must look like s3://bucket/prefix, not %r" % url)
    prefix = (match.group(2) or "").strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise S3ConfigError("prefix %r has an empty, '.' or '..' segment" % prefix)
    return match.group(1), prefix
