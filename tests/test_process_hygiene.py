"""The suite's own fixtures leave no process behind (issue 16).

Each test runs an inner pytest session (pytest's `pytester`, in a subprocess) with the real
tests/conftest.py loaded as a plugin, so the inner tests use the suite's own ServerProcess,
server_factory and `stopping`, and its session-end check. The inner fixtures start a real
m1server, write its pid to a file, then raise; afterwards the outer test looks for that pid.

- A function fixture on server_factory, and a module fixture written as the suite writes them
  (`with stopping(srv): srv.start(); ...`), that fail after their server started: the inner
  run reports the two errors, its end-of-session check finds nothing, and both servers are gone.
- A test that starts a server and never stops it, and one whose helper leaves an orphan (its
  parent exits first, as `make` can): the inner run passes its tests but fails, naming the
  leftover processes, which the check then kills.
"""
from __future__ import annotations

import os
import sys

import pytest

from conftest import live_processes, wait_until

pytest_plugins = ["pytester"]

TESTS = os.path.dirname(os.path.abspath(__file__))
GONE_DEADLINE_S = 15.0

RECORD = '''
import os
import subprocess
import sys

import pytest

from conftest import ServerProcess, server_factory, stopping  # noqa: F401  (the suite's own)

PIDS = {pids!r}


def record(pid):
    with open(PIDS, "a") as f:
        f.write("%d\\n" % pid)
'''

FAILING_FIXTURES = RECORD + '''

@pytest.fixture
def failing_after_start(server_factory):
    srv = server_factory()
    record(srv.proc.pid)
    raise RuntimeError("the fixture failed after its server started")


@pytest.fixture(scope="module")
def module_server_failing_after_start(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("module"))
    with stopping(srv):
        srv.start()
        record(srv.proc.pid)
        raise RuntimeError("the module fixture failed after its server started")
        yield srv


def test_with_a_failing_function_fixture(failing_after_start):
    pass


def test_with_a_failing_module_fixture(module_server_failing_after_start):
    pass
'''

LEAKING_TESTS = RECORD + '''
ORPHAN = ("import subprocess, sys; "
          "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
          "stdout=subprocess.DEVNULL); "
          "print(child.pid, flush=True)")      # and exits at once: the sleeper is an orphan


def test_starts_a_server_and_never_stops_it(tmp_path):
    srv = ServerProcess(tmp_path / "uploads").start()
    record(srv.proc.pid)


def test_leaves_an_orphan_whose_parent_exited():
    out = subprocess.run([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, check=True,
                         timeout=30)
    record(int(out.stdout))
'''


def run_inner(pytester, monkeypatch, source):
    """Run `source` as an inner session with the suite's conftest; returns (result, pids)."""
    pids = str(pytester.path / "pids.txt")
    monkeypatch.setenv("PYTHONPATH", TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.delenv("M1_TEST_STORAGE", raising=False)     # no SeaweedFS for these
    pytester.makepyfile(test_inner=source.format(pids=pids))
    result = pytester.runpytest_subprocess("-p", "conftest", "-p", "no:cacheprovider",
                                           timeout=120)
    with open(pids) as f:
        return result, [int(line) for line in f.read().split()]


def assert_gone(pids):
    wait_until(lambda: not set(pids) & set(live_processes()), timeout=GONE_DEADLINE_S,
               interval=0.1, message="processes %s to be gone" % pids)


@pytest.fixture(autouse=True)
def linux_proc():
    if not os.path.isdir("/proc/self"):
        pytest.skip("the end-of-session check reads /proc (Linux)")


def test_fixtures_failing_after_their_server_started_leave_no_process(pytester, monkeypatch):
    result, pids = run_inner(pytester, monkeypatch, FAILING_FIXTURES)
    result.assert_outcomes(errors=2)
    assert len(pids) == 2
    assert "still running" not in result.stdout.str()
    assert_gone(pids)


def test_the_session_end_check_fails_a_run_that_leaves_processes_and_stops_them(
        pytester, monkeypatch):
    result, pids = run_inner(pytester, monkeypatch, LEAKING_TESTS)
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED      # passed, yet the run fails
    text = result.stdout.str()
    assert "still running after it ended" in text
    server, orphan = pids
    assert "pid %d: %s" % (server, sys.executable) in text
    assert "pid %d: " % orphan in text                      # found by the session's mark
    assert_gone(pids)
