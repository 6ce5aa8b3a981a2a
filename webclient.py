"""webclient.py - the browser side of m1server: the demo recorder page and m1client.js.

Routes (SPEC section 2):
  GET /              static/index.html, the demo page: camera preview, record/stop, progress,
                     recordings to play (its script is static/demo.js, its style demo.css)
  GET /m1client.js   static/m1client.js, the browser client of SPEC section 7: one
                     dependency-free ES module that records and uploads while it records
  GET /ui.js         static/ui.js, small helpers the demo shares with live.py's pages

What it guarantees: the files are the program's own (read with m1server.read_resource, so they
are served from a zipapp too, where there is no real file to open), read once on first use,
served with the right Content-Type (a module script must be JavaScript or the browser refuses
it), an ETag, and `Cache-Control: no-cache`: browsers revalidate each time and get a 304 while
the server version is unchanged, and see a new version at once. `HEAD` works too.

What it does not do: serve any other file. There is no directory lookup at all, so no path a
client sends can reach the disk; only the names in STATIC_FILES exist.
"""
from __future__ import annotations

import re
import threading

# URL path -> (file shipped inside the program, Content-Type)
STATIC_FILES = (
    ("/", "static/index.html", "text/html; charset=utf-8"),
    ("/m1client.js", "static/m1client.js", "text/javascript; charset=utf-8"),
    ("/demo.js", "static/demo.js", "text/javascript; charset=utf-8"),
    ("/demo.css", "static/demo.css", "text/css; charset=utf-8"),
    ("/ui.js", "static/ui.js", "text/javascript; charset=utf-8"),
)
CACHE_CONTROL = "no-cache"      # revalidate every time (cheap with the ETag)
# The demo page loads only its own files and talks only to its own server.
PAGE_POLICY = ("default-src 'self'; media-src 'self' blob:; img-src 'self' data: blob:; "
               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def routes(read_resource):
    """Route rows for m1server's table; `read_resource(name)` returns a shipped file's bytes."""
    return tuple((re.escape(path), {"GET": StaticFile(name, content_type, read_resource),
                                    "HEAD": StaticFile(name, content_type, read_resource)})
                 for path, name, content_type in STATIC_FILES)


class StaticFile:
    """One file shipped with the program, loaded on first request and kept in memory."""

    def __init__(self, name, content_type, read_resource):
        self.name = name
        self.content_type = content_type
        self._read_resource = read_resource
        self._loaded = None                  # (body, etag) once read
        self._lock = threading.Lock()

    def load(self):
        with self._lock:
            if self._loaded is None:
                body = self._read_resource(self.name)
                import hashlib     # at the first page served, not at every start (storage.py)
                self._loaded = (body, '"%s"' % hashlib.sha256(body).hexdigest()[:32])
            return self._loaded

    def __call__(self, handler):
        body, etag = self.load()
        headers = {"Content-Type": self.content_type, "ETag": etag,
                   "Cache-Control": CACHE_CONTROL, "X-Content-Type-Options": "nosniff"}
        if self.content_type.startswith("text/html"):
            headers["Content-Security-Policy"] = PAGE_POLICY
        headers["Content-Length"] = str(len(body))   # also on a 304 (RFC 9110 8.6)
        if etag_matches(handler.headers.get("If-None-Match"), etag):
            return handler.send_plain(304, headers)
        handler.send_response(200)
        handler.send_headers(headers)
        if handler.command != "HEAD":
            handler.wfile.write(body)


def etag_matches(if_none_match, etag):
    """RFC 9110 13.1.2: weak comparison against a list of entity tags, or `*`."""
    if not if_none_match:
        return False
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in tags or any((tag[2:] if tag.startswith("W/") else tag) == etag
                              for tag in tags)
