"""Small tus 1.0 client helpers for the tests (requests for whole requests, raw sockets where a
test must hold a PATCH open or break it off).

They send exactly what the protocol says and nothing else, so a test reads as the protocol
exchange it checks.
"""
from __future__ import annotations

import base64
import hashlib
import os
import socket
from urllib.parse import urlsplit

import requests

from _http import connect, read_response

TUS = {"Tus-Resumable": "1.0.0"}
OFFSET_TYPE = "application/offset+octet-stream"


def metadata(**values):
    """Upload-Metadata for {key: str or bytes}; a value of None sends the key alone."""
    items = []
    for key, value in values.items():
        if value is None:
            items.append(key)
            continue
        raw = value.encode("utf-8") if isinstance(value, str) else value
        items.append("%s %s" % (key, base64.b64encode(raw).decode("ascii")))
    return ",".join(items)


def create(session, base, length=None, defer=False, meta=None, concat=None, body=None,
           headers=None):
    sent = dict(TUS)
    if length is not None:
        sent["Upload-Length"] = str(length)
    if defer:
        sent["Upload-Defer-Length"] = "1"
    if meta is not None:
        sent["Upload-Metadata"] = meta
    if concat is not None:
        sent["Upload-Concat"] = concat
    if body is not None:
        sent["Content-Type"] = OFFSET_TYPE
    sent.update(headers or {})
    return session.post(base + "/files/", headers=sent, data=body, timeout=30)


def location(response):
    """The path of a created upload. Its Location is an absolute URL on the server the
    request went to (as tusd answers; checkers built on curl follow only that)."""
    assert response.status_code == 201, (response.status_code, response.text)
    url = urlsplit(response.headers["Location"])
    assert url.scheme in ("http", "https") and url.netloc == urlsplit(response.url).netloc, \
        response.headers["Location"]
    return url.path


def new_upload(session, base, length=None, **kw):
    return location(create(session, base, length=length, **kw))


def patch(session, base, path, offset, data, headers=None, method="PATCH"):
    sent = dict(TUS, **{"Upload-Offset": str(offset), "Content-Type": OFFSET_TYPE})
    sent.update(headers or {})
    return session.request(method, base + path, headers=sent, data=data, timeout=30)


def head(session, base, path, headers=None):
    sent = dict(TUS)
    sent.update(headers or {})
    return session.head(base + path, headers=sent, timeout=30)


def offset_of(session, base, path):
    response = head(session, base, path)
    assert response.status_code == 200, response.status_code
    return int(response.headers["Upload-Offset"])


def upload_id(path):
    return path.rsplit("/", 1)[1]


def checksum(name, data):
    if name == "crc32":
        import zlib
        digest = (zlib.crc32(data) & 0xFFFFFFFF).to_bytes(4, "big")
    else:
        digest = hashlib.new(name, data).digest()
    return "%s %s" % (name, base64.b64encode(digest).decode("ascii"))


def media_file(upload_dir, file_id, ext="webm"):
    return os.path.join(str(upload_dir), "%s.%s" % (file_id, ext))


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def video_bytes(session, base, file_id, ext="webm"):
    response = session.get("%s/uploads/%s.%s" % (base, file_id, ext), timeout=30)
    assert response.status_code == 200, response.status_code
    return response.content


class OpenPatch:
    """A PATCH sent by hand over a raw socket, so a test can send part of the body, hold the
    request open, break it off, and read the answer when there is one."""

    def __init__(self, base, path, offset, length, headers=None):
        self.sock = connect(base, timeout=30)
        lines = ["PATCH %s HTTP/1.1" % path, "Host: 127.0.0.1",
                 "Tus-Resumable: 1.0.0", "Upload-Offset: %d" % offset,
                 "Content-Type: " + OFFSET_TYPE, "Content-Length: %d" % length]
        lines += ["%s: %s" % item for item in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))

    def send(self, data):
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def response(self, timeout=30):
        return read_response(self.sock, timeout=timeout)

    def close(self):
        """Break the request off: the client went away mid-body."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def incoming_bytes(upload_dir):
    """Bytes of the part files the server is receiving into right now."""
    folder = os.path.join(str(upload_dir), "temp", ".incoming")
    total = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        try:
            total += os.path.getsize(os.path.join(folder, name))
        except OSError:
            pass
    return total


def session():
    return requests.Session()
