"""The runtime is the standard library alone, on every CPython 3.7-3.13 (SPEC §0, §8).

- The server runs with `python -S -s -E`: no site-packages, no user site, no PYTHON* variables.
- Every CPython 3.7-3.13 that pyenv has starts the server and takes an upload in chunks, out of
  order and with a duplicate, byte-exact.
- Every runtime module (the .py files at the repository root) compiles on each of them.
- Runtime modules import nothing outside the standard library (checked with `ast` against
  `sys.stdlib_module_names`).
"""
from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import requests

from conftest import ROOT, ServerProcess, get_status, send_chunk, split_chunks, stop_all

OLDEST = (3, 7)
NEWEST = (3, 13)
INTERPRETER_NAME = re.compile(r"python(3)\.(\d+)$")
# Sent out of order and with a duplicate; the last index carries status=completed.
SAMPLE_CHUNKS = 8
SEND_ORDER = [0, 2, 1, 1, 3, 5, 4, 6, 7]


def runtime_modules():
    """The .py files at the repository root: what `python3 m1server.py` may import."""
    return sorted(glob.glob(os.path.join(ROOT, "*.py")))


def pyenv_roots():
    roots = [os.environ.get("PYENV_ROOT"), os.path.expanduser("~/.pyenv")]
    pyenv = shutil.which("pyenv")
    if pyenv:
        try:
            roots.append(subprocess.run([pyenv, "root"], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, timeout=10,
                                        universal_newlines=True).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    seen = []
    for root in roots:
        if root and os.path.isdir(root) and os.path.realpath(root) not in seen:
            seen.append(os.path.realpath(root))
    return seen


def pyenv_interpreters():
    """(version directory name, interpreter path) for each CPython 3.7-3.13 pyenv holds."""
    found = {}
    for root in pyenv_roots():
        for path in glob.glob(os.path.join(root, "versions", "3.*", "bin", "python3.*")):
            match = INTERPRETER_NAME.search(os.path.basename(path))
            if not match or not os.access(path, os.X_OK):
                continue
            version = (int(match.group(1)), int(match.group(2)))
            if OLDEST <= version <= NEWEST:
                name = os.path.basename(os.path.dirname(os.path.dirname(path)))
                found.setdefault(os.path.realpath(path), (name, path))
    return sorted(found.values(), key=lambda item: [int(p) if p.isdigit() else p
                                                    for p in re.split(r"[.]", item[0])])


INTERPRETERS = pyenv_interpreters()
INTERPRETER_PARAMS = ([pytest.param(path, id="cpython-" + name) for name, path in INTERPRETERS]
                      or [pytest.param(None, id="no-pyenv-interpreters")])


def need_interpreter(python):
    if python is None:
        pytest.skip("pyenv has no CPython %d.%d-%d.%d (looked in %s)"
                    % (OLDEST[0], OLDEST[1], NEWEST[0], NEWEST[1],
                       ", ".join(pyenv_roots()) or "~/.pyenv"))


class FlaggedServer(ServerProcess):
    """A ServerProcess whose interpreter runs with extra command-line flags."""

    def __init__(self, upload_dir, flags=(), **kw):
        super().__init__(upload_dir, **kw)
        self.flags = list(flags)

    def command(self, port=0):
        command = super().command(port)
        return command[:1] + self.flags + command[1:]


@pytest.fixture
def start_server(tmp_path):
    started = []

    def start(python, flags=()):
        srv = FlaggedServer(tmp_path / ("uploads%d" % len(started)), flags=flags, python=python,
                            env={"PYTHONDONTWRITEBYTECODE": "1"})
        # The interpreter under test must not pick up the test venv's paths.
        for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE"):
            srv.env.pop(name, None)
        started.append(srv)
        return srv.start()

    yield start
    stop_all(started)


def upload_out_of_order_with_duplicate(srv, file_id, source):
    """Send the source in SAMPLE_CHUNKS chunks in SEND_ORDER; check replies and the result."""
    chunks = split_chunks(source, SAMPLE_CHUNKS)
    last = len(chunks) - 1
    seen = set()
    with requests.Session() as session:
        for index in SEND_ORDER:
            response = send_chunk(session, srv.url, file_id, index, chunks[index],
                                  status="completed" if index == last else "uploading")
            assert response.status_code == 200, "chunk %d: %d %s\n%s" % (
                index, response.status_code, response.text, srv.log())
            data = response.json()["data"]
            assert data["chunkIndex"] == index, data
            if index in seen:
                assert data.get("duplicate") is True, data
            seen.add(index)
        assert data["status"] == "completed", data
        status = get_status(session, srv.url, file_id).json()["data"]
        assert status["exists"] is True and status["state"] == "completed", status
        assert status["fileSize"] == len(source), status
        served = session.get(srv.url + "/uploads/" + file_id + ".webm", timeout=30)
        assert served.status_code == 200 and served.content == source
    with open(os.path.join(srv.upload_dir, file_id + ".webm"), "rb") as f:
        assert f.read() == source


def test_server_runs_without_site_packages_user_site_or_python_env(start_server, sample_webm):
    # -B only because -E ignores PYTHONDONTWRITEBYTECODE: no __pycache__ in the repository.
    srv = start_server(sys.executable, flags=["-S", "-s", "-E", "-B"])
    upload_out_of_order_with_duplicate(srv, "isolated_stdlib_only", sample_webm)


@pytest.mark.parametrize("python", INTERPRETER_PARAMS)
def test_server_takes_an_upload_on_each_pyenv_cpython(start_server, sample_webm, python):
    need_interpreter(python)
    srv = start_server(python)
    upload_out_of_order_with_duplicate(srv, "portable_upload", sample_webm)
    version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                             stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    print("%s served the upload" % version)


COMPILE_ALL = """
import os, py_compile, sys
out = sys.argv[1]
for n, source in enumerate(sys.argv[2:]):
    py_compile.compile(source, cfile=os.path.join(out, "%d.pyc" % n), doraise=True)
"""


@pytest.mark.parametrize("python", INTERPRETER_PARAMS)
def test_runtime_modules_compile_on_each_pyenv_cpython(tmp_path, python):
    need_interpreter(python)
    modules = runtime_modules()
    assert os.path.join(ROOT, "m1server.py") in modules, "m1server.py missing at " + ROOT
    # Byte code goes to tmp_path (cfile=...), never to a __pycache__ in the repository.
    result = subprocess.run([python, "-c", COMPILE_ALL, str(tmp_path)] + modules,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stdout
    assert len(os.listdir(str(tmp_path))) == len(modules)


def imported_top_level_names(path):
    """Top-level module names a file imports, including importlib.import_module("x")."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "__import__"))):
            names.add(node.args[0].value.split(".")[0])
    return names


def test_runtime_modules_import_only_the_standard_library():
    if not hasattr(sys, "stdlib_module_names"):
        pytest.skip("sys.stdlib_module_names needs Python 3.10+")
    modules = runtime_modules()
    assert os.path.join(ROOT, "m1server.py") in modules, "m1server.py missing at " + ROOT
    local = {os.path.splitext(os.path.basename(p))[0] for p in modules}
    allowed = set(sys.stdlib_module_names) | local | {"__future__"}
    outside = {os.path.basename(p): sorted(imported_top_level_names(p) - allowed)
               for p in modules}
    outside = {name: found for name, found in outside.items() if found}
    assert not outside, "imports outside the standard library: %r" % outside



IMPORT_ALL = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
"""


@pytest.mark.parametrize("python", INTERPRETER_PARAMS)
def test_runtime_modules_import_on_each_pyenv_cpython(python):
    """Importing runs every module's top level (decorators, class bodies, constants), which
    compiling does not: e.g. functools.cache or typing.Protocol fail here on 3.7."""
    need_interpreter(python)
    names = [os.path.splitext(os.path.basename(p))[0] for p in runtime_modules()]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(name, None)
    result = subprocess.run([python, "-c", IMPORT_ALL] + names, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stdout


# Attribute or module names that exist only on CPython newer than 3.7 (STYLE.md, Portability),
# or were removed by 3.13. Catches what neither compiling nor importing on 3.7 runs into.
NEWER_THAN_37 = {
    "removeprefix": "str.removeprefix (3.9)", "removesuffix": "str.removesuffix (3.9)",
    "create_server": "socket.create_server (3.8)", "cached_property": "cached_property (3.8)",
    "guess_file_type": "mimetypes.guess_file_type (3.13)", "shlex.join": "shlex.join (3.8)",
    "functools.cache": "functools.cache (3.9)", "typing.Protocol": "typing.Protocol (3.8)",
    "typing.Literal": "typing.Literal (3.8)", "math.prod": "math.prod (3.8)",
    "is_relative_to": "PurePath.is_relative_to (3.9)", "randbytes": "random.randbytes (3.9)",
    "copy_file_range": None,   # allowed: looked up with getattr and a fallback
}
REMOVED_MODULES = {"cgi", "cgitb", "imghdr", "asynchat", "asyncore", "distutils", "smtpd",
                   "telnetlib", "pipes", "crypt", "nntplib", "sndhdr", "uu", "xdrlib"}


def dotted_name(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value)
        return base + "." + node.attr if base else node.attr
    return None


def test_runtime_modules_use_no_api_newer_than_python_37():
    problems = []
    for path in runtime_modules():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        imported_from = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    imported_from[alias.asname or alias.name] = node.module + "." + alias.name
        for node in ast.walk(tree):
            where = "%s:%d" % (os.path.basename(path), getattr(node, "lineno", 0))
            if isinstance(node, ast.Attribute):
                full = dotted_name(node) or node.attr
                for key in (node.attr, full, ".".join(full.split(".")[-2:])):
                    if NEWER_THAN_37.get(key):
                        problems.append("%s %s" % (where, NEWER_THAN_37[key]))
                        break
            elif isinstance(node, ast.Name) and NEWER_THAN_37.get(imported_from.get(node.id)):
                problems.append("%s %s" % (where, NEWER_THAN_37[imported_from[node.id]]))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                           else [node.module or ""])
                if isinstance(node, ast.ImportFrom):
                    for alias in node.names:
                        for key in (alias.name, "%s.%s" % (node.module, alias.name)):
                            if NEWER_THAN_37.get(key):
                                problems.append("%s %s" % (where, NEWER_THAN_37[key]))
                for module in modules:
                    if module.split(".")[0] in REMOVED_MODULES:
                        problems.append("%s imports %s (removed in 3.13)" % (where, module))
    assert not problems, "APIs not on every CPython 3.7-3.13:\n" + "\n".join(sorted(set(problems)))
