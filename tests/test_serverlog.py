"""serverlog: the server's own log lines (one write each, escaped, with a traceback for
`exception`), and the one way an unexpected error leaves a real server: a 500 JSON error to
the client, one ERROR line with its traceback in the log, nothing half-written on disk.

The logger is a few lines of plain Python with no server behind it, so it is first called
in process, with stderr replaced by a recorder of its writes; the servers of the other
suites log through it too (test_operations reads their repair and sweep lines, test_edge
checks every log for tracebacks, test_features that a start imports neither `logging` nor
`traceback`). The unexpected error is made on purpose, inside the store, by
`M1_TEST_CRASH_AT=<step>:<n>:raise`: nothing a client sends can cause one.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys

import pytest
import requests

from conftest import ROOT, get_status, send_chunk, wait_until

sys.path.insert(0, ROOT)
import chunkstore  # noqa: E402
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
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    assert moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000) \
        == text                                         # what datetime makes of it
    assert serverlog.utc_iso(timestamp) == text


@pytest.mark.parametrize("step", ["streaming", "streamed", "records_synced"])
def test_an_unexpected_error_is_a_500_one_logged_traceback_and_no_bytes_kept(
        server_factory, step):
    """`streaming`: while chunk 1's bytes are written into the video in place; `streamed`:
    once they are all written, before the ledger records them; `records_synced`: once they
    and the file's chunk records were synced. Every time the bytes are cut off again (and the
    chunk taken out of the records), and the client's retry is stored as if the first try
    never happened."""
    srv = server_factory(start=False)
    srv.start(extra_env={"M1_TEST_CRASH_AT": step + ":1:raise"})
    first, second = b"\x1a\x45\xdf\xa3" + bytes(300), bytes(range(256)) * 4
    with requests.Session() as session:          # chunk 0 through a part file: no such step
        assert send_chunk(session, srv.url, "boom", 0, first, file_first=True).ok
        failed = send_chunk(session, srv.url, "boom", 1, second)    # in place: the step
        assert failed.status_code == 500
        assert failed.json() == {"success": False, "error": {
            "code": "internal_error", "message": "unexpected server error (logged)"}}
        status = get_status(session, srv.url, "boom").json()["data"]
        assert (status["fileSize"], status["nextChunkIndex"]) == (len(first), 1)
        if step == "records_synced":            # the records name no chunk again
            assert os.getxattr(os.path.join(srv.upload_dir, "boom.webm"),
                               chunkstore.RECORDS_XATTR) == chunkstore.RECORDS_MAGIC
        retried = send_chunk(session, srv.url, "boom", 1, second)
        assert retried.ok and retried.json()["data"]["bytesReceived"] == len(first + second)
    with open(os.path.join(srv.upload_dir, "boom.webm"), "rb") as f:
        assert f.read() == first + second
    wait_until(lambda: "RuntimeError: M1_TEST_CRASH_AT" in srv.log(), timeout=10,
               message="the traceback in the log")
    lines = srv.log().splitlines()
    errors = [n for n, line in enumerate(lines) if " ERROR " in line]
    assert len(errors) == 1, lines
    assert lines[errors[0]].endswith(" ERROR m1server: unexpected error on POST "
                                     "/api/video/upload"), lines[errors[0]]
    assert lines[errors[0] + 1] == "Traceback (most recent call last):"
    assert sum("Traceback" in line for line in lines) == 1
