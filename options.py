"""options.py - the flags of m1server's optional features: each default and parser, and the
checks of their settings, readable without importing the feature.

`--help` lists every flag and every start parses them all (httpapi.py's OPTIONS table), but a
start imports a feature module (tus, processing, events, websocket, webhooks, auth, live) only when
it is enabled or first used (httpapi.Features). So what the table needs of a feature lives
here: a default is a named constant, a parser a plain function, and the feature module imports
what it uses of them from here. It holds no state and imports no feature.

What it does not do: hold the server's own settings (httpapi.py's, beside the table) or check
anything a feature decides at run time.
"""
from __future__ import annotations

import argparse
import re
from urllib.parse import parse_qs, unquote_plus, urlsplit

# ---------------------------------------------------------------------------------------------
# events.py, websocket.py: real-time events (SPEC section 6)
# ---------------------------------------------------------------------------------------------

AUTO = "auto"                        # --max-subscribers default: half of --max-connections
DEFAULT_HEARTBEAT_S = 15.0           # the SSE spec suggests a comment every 15 s for proxies
DEFAULT_QUEUE_EVENTS = 256           # per subscriber; a 1 s recorder fills it in 4 minutes
DEFAULT_HISTORY_EVENTS = 128         # per watched upload, for Last-Event-ID resumption
DEFAULT_WS_MAX_MESSAGE_BYTES = 16 << 10     # what a client may send us; events only flow out


def parse_auto_count(text):
    """A cap on long-lived streams (--max-subscribers, --live-max-viewers): `auto` or a whole
    number of at least 1."""
    if str(text).strip().lower() == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a whole number or auto: %r" % text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def resolve_stream_cap(value, max_connections, flag, auto_divisor, what):
    """The cap `flag` sets (`auto`: max_connections // auto_divisor, at least 1); ValueError
    when it would leave uploads no room: every `what` holds a connection."""
    if value == AUTO:
        return max(1, max_connections // auto_divisor)
    if value >= max_connections:
        raise ValueError("%s (%d) must be below --max-connections (%d): every %s holds a "
                         "connection, and uploads need some left"
                         % (flag, value, max_connections, what))
    return value


def resolve_max_subscribers(value, max_connections):
    """The subscriber cap for these flags; ValueError when it would leave uploads no room."""
    return resolve_stream_cap(value, max_connections, "--max-subscribers", 2, "event stream")


# ---------------------------------------------------------------------------------------------
# live.py: an upload's bytes as they arrive (issue 18)
# ---------------------------------------------------------------------------------------------

LIVE_AUTO_VIEWERS_DIVISOR = 8            # 32 viewers with the default 256 connections
DEFAULT_LIVE_IDLE_TIMEOUT_S = 60.0       # no new chunk this long: the recording is over or stuck
# Its pages: URL path -> (file shipped inside the program, Content-Type)
LIVE_PAGE_FILES = (
    ("/watch.js", "static/watch.js", "text/javascript; charset=utf-8"),
    ("/dashboard", "static/dashboard.html", "text/html; charset=utf-8"),
    ("/dashboard.js", "static/dashboard.js", "text/javascript; charset=utf-8"),
)


def resolve_max_viewers(value, max_connections):
    """The viewer cap for --live-max-viewers; ValueError when it would leave uploads no room."""
    return resolve_stream_cap(value, max_connections, "--live-max-viewers",
                              LIVE_AUTO_VIEWERS_DIVISOR, "live viewer")


def wants_live(path):
    """GET/HEAD /uploads/<fileId>.<ext>?live=1: the request `path` asks for the live stream."""
    query = urlsplit(path).query
    return bool(query) and parse_qs(query).get("live", [""])[-1] == "1"


# ---------------------------------------------------------------------------------------------
# tus.py: the tus 1.0 protocol (SPEC section 4)
# ---------------------------------------------------------------------------------------------

DEFAULT_TUS_EXPIRY_S = 24 * 3600         # an unfinished upload idle this long is removed
DEFAULT_TUS_PIECE_BYTES = 8 << 20        # a PATCH is stored in pieces (chunks) of this size
DEFAULT_TUS_MAX_METADATA_BYTES = 4 << 10     # Upload-Metadata as sent, base64 included
DEFAULT_TUS_MAX_PARTIALS = 128           # partial uploads in one final upload
# The tus headers a page may read (CORS Access-Control-Expose-Headers of every answer)
TUS_EXPOSED_HEADERS = ("Upload-Offset", "Upload-Length", "Upload-Defer-Length",
                       "Upload-Metadata", "Upload-Concat", "Upload-Expires", "Location",
                       "Tus-Resumable", "Tus-Version", "Tus-Extension", "Tus-Max-Size",
                       "Tus-Checksum-Algorithm")

# ---------------------------------------------------------------------------------------------
# processing.py: probe, remux, poster, MP4 (SPEC section 5)
# ---------------------------------------------------------------------------------------------

PROCESSING_MODES = ("off", "probe", "remux", "mp4")
DEFAULT_PROCESSING_MODE = "remux"        # seekable + poster for every upload, no re-encoding
DEFAULT_FFMPEG = "ffmpeg"                # looked up on PATH
DEFAULT_FFPROBE = "ffprobe"              # on PATH, else beside ffmpeg
DEFAULT_MAX_HEIGHT = 720                 # lines of the MP4 and the poster (never upscaled)
DEFAULT_MP4_CRF = 23                     # x264 constant rate factor: 0 lossless .. 51 worst
DEFAULT_JOB_TIMEOUT_S = 7200.0           # one job, all its steps (a long recording, mp4 mode)
DEFAULT_PROCESSING_WORKERS = 1           # jobs at once: the machines are small
MIN_MAX_HEIGHT = 16
MAX_CRF = 51


def parse_processing_mode(text):
    value = str(text).strip().lower()
    if value not in PROCESSING_MODES:
        raise argparse.ArgumentTypeError("processing mode must be one of %s"
                                         % ", ".join(PROCESSING_MODES))
    return value


def parse_height(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a whole number of lines: %r" % text)
    if value < MIN_MAX_HEIGHT:
        raise argparse.ArgumentTypeError("must be at least %d lines" % MIN_MAX_HEIGHT)
    return value


def parse_crf(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a whole number: %r" % text)
    if not 0 <= value <= MAX_CRF:
        raise argparse.ArgumentTypeError("CRF must be 0..%d (lower is better quality)"
                                         % MAX_CRF)
    return value


# ---------------------------------------------------------------------------------------------
# webhooks.py: signed events to the application's backend (SPEC section 6)
# ---------------------------------------------------------------------------------------------

DEFAULT_WEBHOOK_RETRY_FOR_S = 86400.0    # --webhook-retry-for: give up this long after the event
DEFAULT_WEBHOOK_TIMEOUT_S = 10.0         # --webhook-timeout: one attempt, connect to status line
DEFAULT_WEBHOOK_WORKERS = 2              # --webhook-workers: attempts in flight at once per URL
MAX_WEBHOOK_WORKERS = 16
MAX_WEBHOOK_RECEIVERS = 32               # URLs; threads = URLs x workers, fixed at start-up


def parse_webhook_urls(text):
    """One --webhook-url value -> a tuple of URLs. `@/path/file` reads one URL a line (blank
    lines and `#` comments skipped); the env twin may hold several separated by spaces."""
    text = str(text).strip()
    if text.startswith("@"):
        path = text[1:]
        try:
            with open(path, "r", encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError) as error:
            raise argparse.ArgumentTypeError("cannot read webhook URLs from %s: %s"
                                             % (path, getattr(error, "strerror", None)
                                                or error))
        urls = [line for line in lines if line and not line.startswith("#")]
        if not urls:
            raise argparse.ArgumentTypeError("no webhook URL in %s" % path)
    else:
        urls = text.split()
        if not urls:
            raise argparse.ArgumentTypeError("empty webhook URL")
    return tuple(check_webhook_url(url) for url in urls)


def check_webhook_url(url):
    """An absolute http:// or https:// URL with a host; anything else is refused."""
    try:
        parts = urlsplit(url)
        port = parts.port                      # ValueError on a bad port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname \
            or any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise argparse.ArgumentTypeError(
            "webhook URL must be an absolute http:// or https:// URL, not %r" % url[:200])
    if port == 0:
        raise argparse.ArgumentTypeError("webhook URL has port 0: %r" % url[:200])
    return url


def parse_webhook_workers(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_WEBHOOK_WORKERS:
        raise argparse.ArgumentTypeError("must be a whole number 1..%d" % MAX_WEBHOOK_WORKERS)
    return value


def unique(urls):
    seen = []
    for url in urls:
        if url not in seen:
            seen.append(url)
    return seen


def webhook_problem(config):
    """What is wrong with the webhook settings as a whole (None: nothing), checked at start-up
    before anything is opened."""
    urls = unique(config.webhook_urls)
    if urls and not config.webhook_secret:
        return ("--webhook-url needs --webhook-secret (or M1_WEBHOOK_SECRET): every webhook "
                "is signed")
    if len(urls) > MAX_WEBHOOK_RECEIVERS:
        return "at most %d webhook URLs (got %d)" % (MAX_WEBHOOK_RECEIVERS, len(urls))
    return None


# ---------------------------------------------------------------------------------------------
# auth.py: what every response carries, auth on or off (SPEC section 6)
# ---------------------------------------------------------------------------------------------

SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"),
                    ("Referrer-Policy", "no-referrer"))     # URLs may carry ?token=
HSTS_VALUE = "max-age=31536000"          # sent over HTTPS only (--tls-cert)
# A query parameter as it may appear in a logged line: separator, name, "=", value.
QUERY_PARAMETER_PATTERN = re.compile(r"([?&;])([^=&;?\s\"]*)=([^&;\s\"]*)")


def redact(text):
    """The access log never shows a token: `?token=abc` -> `?token=REDACTED`. The name is
    compared once percent-decoded, as parse_qs (and so `credential`) reads it: `?%74oken=`
    is a token too."""
    return QUERY_PARAMETER_PATTERN.sub(_redact_parameter, text)


def _redact_parameter(match):
    if unquote_plus(match.group(2)).strip().lower() != "token":
        return match.group(0)
    return match.group(1) + match.group(2) + "=REDACTED"
