"""serverlog - the server's own log lines, on stderr.

Every module logs through a Logger named after it (`log = serverlog.Logger("m1server.store")`),
and each event is one line in the access log's style:

    2024-01-01T00:00:00.000Z WARNING m1server.store: repair: u1: cutting 512 torn bytes after 4096

UTC to the millisecond, the level, the logger's name, and the message with its control
characters escaped (a message may quote what a client sent, and a forged line break would
forge a log line). `exception` adds the traceback of the exception being handled: its frames
a line each as Python prints them, and the exception's own text (which may quote a client)
escaped into one line.

Why not the standard library's `logging`: the server needs none of what it configures (every
line goes to stderr, INFO and above), and importing it, with the traceback and tokenize
modules it pulls in, cost 6-9 ms at every start on the reference machine, about a fifth of all
m1server adds to `python3 -m http.server`'s start (issue 17, docs/performance.md). Here the
traceback module is imported by the first `exception` only.
"""
from __future__ import annotations

import math
import sys
import time

# C0 controls and DEL as \xNN: what a log line or an echoed path may never hold raw.
_CONTROL_CHARS = {c: "\\x%02x" % c for c in list(range(32)) + [127]}


def printable(text):
    """`text` with its control characters escaped (log injection; the access log too:
    http.server escapes nothing on 3.7)."""
    return str(text).translate(_CONTROL_CHARS)


def utc_iso(timestamp):
    """2024-01-01T00:00:00.000Z, as the seed's lastModified: the moment datetime would make
    of `timestamp` (microseconds rounded half to even), written with time.strftime, which
    costs every access log line half as much."""
    fraction, whole = math.modf(timestamp)
    micros = round(fraction * 1e6)
    if micros >= 1000000:
        whole, micros = whole + 1, micros - 1000000
    return time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(whole)) + "%03dZ" % (micros // 1000)


class Logger:
    """log.info / warning / error(message, *args): one line, `message % args` as the
    logging module would format it; log.exception: at ERROR, with the traceback."""

    def __init__(self, name):
        self.name = name

    def info(self, message, *args):
        self._write("INFO", message, args)

    def warning(self, message, *args):
        self._write("WARNING", message, args)

    def error(self, message, *args):
        self._write("ERROR", message, args)

    def exception(self, message, *args):
        self._write("ERROR", message, args, with_traceback=True)

    def _write(self, level, message, args, with_traceback=False):
        text = str(message) % args if args else str(message)
        lines = ["%s %s %s: %s" % (utc_iso(time.time()), level, self.name, printable(text))]
        error = sys.exc_info()[1] if with_traceback else None
        if error is not None:
            import traceback                  # only once something went wrong
            for chunk in traceback.format_exception(type(error), error, error.__traceback__):
                if chunk.startswith("  File "):   # a frame: its lines quote the source
                    lines.extend(printable(line) for line in chunk.rstrip("\n").split("\n"))
                else:                             # the exception's text (a client's?): 1 line
                    lines.append(printable(chunk.strip("\n")))
        sys.stderr.write("\n".join(lines) + "\n")      # one write: lines never interleave
