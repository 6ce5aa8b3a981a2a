"""cors.py - Cross-Origin Resource Sharing: which web pages may talk to m1server from a browser.

A page served from another origin (the seed's Next.js app on http://localhost:3000 uploading
to m1server on :3001) may only read m1server's answers when the answers say so (the Fetch
standard, "CORS protocol"). An upload with a progress listener is not a "simple" request, so
the browser first asks with a preflight: `OPTIONS` with `Origin`,
`Access-Control-Request-Method` and `Access-Control-Request-Headers`.

What this module guarantees, for the allow-list given with `--cors-origin`:
  * `*` (the default while auth is off) lets every origin read and upload; answers carry
    `Access-Control-Allow-Origin: *`. With `--api-key`, m1server.Config turns a `*` into an
    empty list (same-origin only) unless `--cors-allow-any-with-auth` is given: a key-guarded
    server names the pages it serves (auth.py, README "Security").
  * A list (`https://app.example,http://localhost:3000`) lets exactly those origins in: their
    requests are answered with their own origin echoed and `Vary: Origin`. A request from an
    origin not on the list, and not the server's own origin, is refused with 403
    `origin_not_allowed` before anything runs; its preflight is answered without any
    `Access-Control-Allow-*` header, so the browser refuses it too.
  * Requests without `Origin` (curl, servers, same-origin GETs) are never affected.

What it does not do: credentials (cookies) are never allowed, since m1server does not use them;
the `Origin` check is no authentication (any non-browser client can send any `Origin`). Use
`--api-key` and tokens for that (SPEC section 6).
"""
from __future__ import annotations

import argparse
import re

from apierror import ApiError

DEFAULT_ORIGINS = "*"             # auth off: a recorder on any page may upload (README)
PREFLIGHT_MAX_AGE_S = 600         # browsers cache a preflight this long (Chrome caps at 7200)
# Response headers a page's script may read besides the CORS-safelisted ones.
EXPOSED_HEADERS = ("Content-Length", "Content-Range", "Accept-Ranges", "ETag", "Location",
                   "Retry-After")
# Request headers allowed when a preflight asks for none in particular.
ALLOWED_HEADERS = ("Authorization", "Content-Type", "Range", "If-Range", "If-None-Match")

ORIGIN_PATTERN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+\Z")    # scheme://host[:port]
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"                              # RFC 9110 5.6.2
# What a preflight may have echoed: tokens, commas and spaces only (never a control character,
# so never a line break: browsers send "content-type,tus-resumable").
HEADER_LIST_PATTERN = re.compile(_TOKEN + r"( *, *" + _TOKEN + r")*\Z")


def parse_origins(text):
    """`--cors-origin` value -> tuple of origins: '*', or a comma-separated list of
    `scheme://host[:port]` (no path, no trailing slash), `null` allowed for sandboxed pages."""
    origins = tuple(part.strip() for part in str(text).split(",") if part.strip())
    if not origins:
        raise argparse.ArgumentTypeError("give '*' or at least one origin")
    for origin in origins:
        if origin in ("*", "null"):
            continue
        if not ORIGIN_PATTERN.match(origin.lower()):
            raise argparse.ArgumentTypeError(
                "not an origin: %r (write scheme://host[:port], e.g. http://localhost:3000, "
                "with no path or trailing slash)" % origin)
    if "*" in origins and len(origins) > 1:
        raise argparse.ArgumentTypeError("'*' already allows every origin; give it alone")
    return tuple(o if o in ("*", "null") else o.lower() for o in origins)


def origin_allowed(origins, origin, host):
    """Whether `origin` may talk to this server: listed, or '*', or the server's own origin
    (browsers send Origin on same-origin POSTs too, e.g. from the demo page at GET /)."""
    if "*" in origins or origin in origins:
        return True
    own = origin.split("://", 1)[-1]
    return bool(host) and own == host.strip().lower()


def check_origin(origins, command, headers):
    """Refuse (403) a non-preflight request from an origin the allow-list does not name."""
    origin = headers.get("Origin")
    if origin is None or command == "OPTIONS" or origin_allowed(origins, origin.lower(),
                                                                headers.get("Host")):
        return
    raise ApiError(403, "origin_not_allowed",
                   "requests from %s are not allowed (--cors-origin)" % origin[:200])


def response_headers(origins, headers, exposed=EXPOSED_HEADERS):
    """CORS headers for every answer (also errors, so a page can read why it was refused)."""
    origin = headers.get("Origin")
    out = {}
    if "*" not in origins:
        out["Vary"] = "Origin"       # the answer differs by Origin: caches must key on it
    if origin is None or not origin_allowed(origins, origin.lower(), headers.get("Host")):
        return out
    out["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
    out["Access-Control-Expose-Headers"] = ", ".join(exposed)
    return out


def preflight_headers(origins, headers, methods):
    """The extra headers of a preflight answer (Fetch standard, "CORS-preflight fetch");
    none for an origin that is not allowed, which makes the browser refuse the request."""
    origin = headers.get("Origin")
    if origin is None or not origin_allowed(origins, origin.lower(), headers.get("Host")):
        return {}
    wanted = (headers.get("Access-Control-Request-Headers") or "").strip()
    out = {"Access-Control-Allow-Methods": ", ".join(methods),
           # Echo the headers the page asked for (a tus client asks for Tus-Resumable, ...):
           # the origin check above is the gate, not the header names.
           "Access-Control-Allow-Headers": wanted if HEADER_LIST_PATTERN.match(wanted)
           else ", ".join(ALLOWED_HEADERS),
           "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S)}
    if (headers.get("Access-Control-Request-Private-Network") or "").lower() == "true":
        out["Access-Control-Allow-Private-Network"] = "true"   # a public page -> localhost
    return out
