"""serverlog: the server's own log lines (one write each, escaped, with a traceback for
`exception`), and that a server's start imports neither `logging` nor `traceback`.

The logger is a few lines of plain Python with no server behind it, so it is called here in
process, with stderr replaced by a recorder of its writes; the servers in the other suites
log through it (test_operations reads their repair and sweep lines, test_edge checks every
log for tracebacks).
"""
from __future__ import annotations

import contextlib
import re
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
import serverlog  # noqa: E402  (the module under test)

LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (INFO|WARNING|ERROR) "
                  r"(m1server\.test): (.*)\Z")


class Recorder:
    """A stand-in for sys.stderr that keeps each write apart."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return len(text)

    def flush(self):
        pass


@contextlib.contextmanager
def recorded():
    """sys.stderr replaced by a Recorder within the test's body (pytest's capture puts its
    own in place around the body, so a fixture's replacement would not hold)."""
    outer, sys.stderr = sys.stderr, Recorder()
    try:
        yield sys.stderr
    finally:
        sys.stderr = outer


def lines_of(write):
    assert write.endswith("\n") and not write.endswith("\n\n")
    return write[:-1].split("\n")


@pytest.mark.parametrize("method, level", [("info", "INFO"), ("warning", "WARNING"),
                                           ("error", "ERROR")])
def test_a_log_line_is_time_level_name_and_the_formatted_message(method, level):
    with recorded() as stderr:
        getattr(serverlog.Logger("m1server.test"), method)("chunk %d of %s", 3, "u1")
    assert len(stderr.writes) == 1
    [line] = lines_of(stderr.writes[0])
    match = LINE.match(line)
    assert match, line
    assert match.group(2) == level and match.group(4) == "chunk 3 of u1"


def test_a_message_without_arguments_is_written_as_it_is():
    with recorded() as stderr:
        serverlog.Logger("m1server.test").warning("100% full")    # no args: no % formatting
    assert LINE.match(lines_of(stderr.writes[0])[0]).group(4) == "100% full"


def test_control_characters_in_a_message_are_escaped():
    with recorded() as stderr:
        serverlog.Logger("m1server.test").warning("from %s", "a\r\nFAKE ERROR x\x1b[2J\x7f")
    [line] = lines_of(stderr.writes[0])                # still one line: nothing was forged
    assert LINE.match(line).group(4) == "from a\\x0d\\x0aFAKE ERROR x\\x1b[2J\\x7f"


def test_exception_adds_the_traceback_escaped_in_the_same_write():
    log = serverlog.Logger("m1server.test")
    with recorded() as stderr:
        try:
            raise ValueError("bad\nline")
        except ValueError:
            log.exception("unexpected error on %s", "POST /x")
    assert len(stderr.writes) == 1                     # one write: no other line between
    lines = lines_of(stderr.writes[0])
    match = LINE.match(lines[0])
    assert match.group(2) == "ERROR" and match.group(4) == "unexpected error on POST /x"
    assert lines[1] == "Traceback (most recent call last):"
    assert any("test_exception_adds_the_traceback" in line for line in lines[2:])
    assert lines[-1] == "ValueError: bad\\x0aline"     # the exception's text is escaped too


def test_exception_outside_a_handler_writes_the_line_alone():
    with recorded() as stderr:
        serverlog.Logger("m1server.test").exception("nothing raised")
    assert len(lines_of(stderr.writes[0])) == 1


@pytest.mark.parametrize("timestamp, text", [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (1704067200.1234, "2024-01-01T00:00:00.123Z"),
    (1704067200.9999996, "2024-01-01T00:00:01.000Z"),       # rounds to the next second
    (1704067200.0009994, "2024-01-01T00:00:00.000Z"),       # truncated to the millisecond
])
def test_utc_iso_writes_milliseconds_as_datetime_would(timestamp, text):
    assert serverlog.utc_iso(timestamp) == text
