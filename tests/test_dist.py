"""The one-file build: `make dist` makes dist/m1server.pyz, which runs anywhere m1server.py runs.

(`make test` also runs the black-box suites against the pyz: see the Makefile's test-pyz.)
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

import pytest
import requests

from conftest import ROOT, SERVER_PYTHON, ServerProcess, get_status, send_chunk, split_chunks

BUILD = os.path.join(ROOT, "tools", "build_pyz.py")


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    target = str(tmp_path_factory.mktemp("dist") / "m1server.pyz")
    subprocess.run([sys.executable, BUILD, "--output", target], check=True,
                   stdout=subprocess.PIPE)
    return target


def pyenv_pythons():
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = {}
    for path in sorted(glob.glob(os.path.join(root, "versions", "3.*", "bin", "python3.*"))):
        name = os.path.basename(path)
        if name.count(".") != 1 or not name[len("python3."):].isdigit():
            continue
        minor = int(name[len("python3."):])
        if minor >= 7:
            found.setdefault("3.%d" % minor, path)
    return sorted(found.items(), key=lambda item: int(item[0].split(".")[1]))


def test_pyz_holds_every_runtime_module_and_static_file_and_nothing_else(pyz):
    names = {n for n in zipfile.ZipFile(pyz).namelist()
             if not n.endswith("/")}            # zipapp also lists folders, e.g. static/
    modules = {n for n in os.listdir(ROOT) if n.endswith(".py")}
    expected = modules | {n + "c" for n in modules} | {"__main__.py"}
    for folder, _, files in os.walk(os.path.join(ROOT, "static")):
        expected |= {os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/")
                     for f in files}
    assert names == expected


def test_pyz_modules_load_as_bytecode_on_the_python_that_built_it(pyz, tmp_path):
    # zipimport cannot cache bytecode: without the .pyc files every start compiles every
    # module. The pyz was built by sys.executable, so that interpreter must take the .pyc
    # (zipimport names a module's __file__ after the entry it loaded).
    out = subprocess.run(
        [sys.executable, "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "import m1server, chunkstore, multipart; "
         "print(m1server.__file__, chunkstore.__file__, multipart.__file__)", pyz],
        stdout=subprocess.PIPE, check=True, cwd=str(tmp_path)).stdout.decode().split()
    assert len(out) == 3 and all(name.endswith(".pyc") for name in out), out


def test_pyz_and_script_report_one_version(pyz):
    def version(program):
        return subprocess.run([SERVER_PYTHON, program, "--version"], stdout=subprocess.PIPE,
                              check=True).stdout.strip()
    assert version(pyz) == version(os.path.join(ROOT, "m1server.py"))
    assert version(pyz).startswith(b"m1server ")


def test_resources_are_read_from_inside_the_archive(pyz, tmp_path):
    # Moved away from the checkout, the pyz can only find its files inside itself.
    lonely = tmp_path / "elsewhere.pyz"
    lonely.write_bytes(open(pyz, "rb").read())
    out = subprocess.run(
        [SERVER_PYTHON, "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "import httpapi; sys.stdout.buffer.write(httpapi.read_resource('multipart.py'))",
         str(lonely)], stdout=subprocess.PIPE, check=True, cwd=str(tmp_path)).stdout
    assert out == open(os.path.join(ROOT, "multipart.py"), "rb").read()


@pytest.mark.parametrize("version,python", pyenv_pythons() or [pytest.param(
    None, None, marks=pytest.mark.skip(reason="pyenv has no CPython 3.7+ here"))])
def test_pyz_serves_uploads_on_every_cpython(pyz, tmp_path, sample_webm, version, python):
    server = ServerProcess(tmp_path / "up", python=python, program=pyz).start()
    try:
        with requests.Session() as session:
            chunks = split_chunks(sample_webm, 4)
            for i in (2, 0, 1, 3, 1):
                reply = send_chunk(session, server.url, "pyz_" + version.replace(".", "_"), i,
                                   chunks[i], status="completed" if i == 3 else "uploading")
                assert reply.status_code == 200, reply.text
            data = get_status(session, server.url, "pyz_" + version.replace(".", "_")).json()
            assert data["data"]["state"] == "completed"
            video = session.get(server.url + data["data"]["url"])
            assert video.content == sample_webm
    finally:
        assert server.stop() == 0
