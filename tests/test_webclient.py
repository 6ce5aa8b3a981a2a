"""GET / and GET /m1client.js (webclient.py): the right bytes, types and caching headers, also
when m1server runs as a single zipapp file; and m1client.js is one self-contained ES module."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import requests

from conftest import ROOT, ServerProcess, need

STATIC = {
    "/": ("static/index.html", "text/html"),
    "/m1client.js": ("static/m1client.js", "text/javascript"),
    "/demo.js": ("static/demo.js", "text/javascript"),
    "/demo.css": ("static/demo.css", "text/css"),
}


def shipped(name):
    with open(os.path.join(ROOT, name), "rb") as f:
        return f.read()


@pytest.mark.parametrize("path", sorted(STATIC))
def test_static_file_is_served_with_its_type_etag_and_no_cache(server, path):
    name, media_type = STATIC[path]
    response = requests.get(server.url + path, timeout=10)
    assert response.status_code == 200
    assert response.content == shipped(name)
    assert response.headers["Content-Type"] == media_type + "; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert re.match(r'^"[0-9a-f]{16,}"$', response.headers["ETag"])


def test_unchanged_file_revalidates_with_304(server):
    etag = requests.get(server.url + "/m1client.js", timeout=10).headers["ETag"]
    for sent in (etag, "W/" + etag, '"nope", ' + etag, "*"):
        again = requests.get(server.url + "/m1client.js", headers={"If-None-Match": sent},
                             timeout=10)
        assert again.status_code == 304, sent
        assert again.content == b"" and again.headers["ETag"] == etag
    changed = requests.get(server.url + "/m1client.js", headers={"If-None-Match": '"old"'},
                           timeout=10)
    assert changed.status_code == 200 and changed.content == shipped("static/m1client.js")


def test_head_gives_the_headers_without_the_body(server):
    response = requests.head(server.url + "/", timeout=10)
    assert response.status_code == 200 and response.content == b""
    assert int(response.headers["Content-Length"]) == len(shipped("static/index.html"))


def test_demo_page_has_a_content_security_policy(server):
    policy = requests.get(server.url + "/", timeout=10).headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "media-src 'self' blob:" in policy


@pytest.mark.parametrize("path", ["/index.html", "/static/m1client.js", "/static/index.html",
                                  "/m1client.js/", "/../webclient.py", "/webclient.py"])
def test_nothing_else_is_served_from_disk(server, path):
    assert requests.get(server.url + path, timeout=10).status_code == 404


def test_other_methods_are_405(server):
    response = requests.post(server.url + "/", data=b"x", timeout=10)
    assert response.status_code == 405 and "GET" in response.headers["Allow"]


def test_static_files_are_served_from_the_zipapp_build(tmp_path):
    """The files ship inside the program: `make dist`'s zipapp has no static/ folder to open."""
    pyz = str(tmp_path / "m1server.pyz")
    built = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_pyz.py"),
                            "--output", pyz], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=120)
    assert built.returncode == 0, built.stdout.decode("utf-8", "replace")
    with zipfile.ZipFile(pyz) as archive:
        assert {name for _, (name, _) in STATIC.items()} <= set(archive.namelist())
    srv = ServerProcess(tmp_path / "uploads", program=pyz).start()
    try:
        for path, (name, _) in STATIC.items():
            response = requests.get(srv.url + path, timeout=10)
            assert response.status_code == 200 and response.content == shipped(name), path
    finally:
        srv.stop()


def test_m1client_is_one_module_with_no_imports_and_the_documented_exports():
    source = shipped("static/m1client.js").decode("utf-8")
    assert not re.search(r"^\s*import\b|\bimport\s*\(|\brequire\s*\(", source, re.MULTILINE)
    need(shutil.which("node") is not None, "node not installed")
    script = ("import(process.argv[1]).then((m) => console.log(Object.keys(m).sort().join(' ')))")
    result = subprocess.run(["node", "--input-type=module", "-e", script,
                             "file://" + os.path.join(ROOT, "static", "m1client.js")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    exports = set(result.stdout.decode().split())
    assert {"M1Recorder", "M1Upload", "M1UploadError", "pickMimeType", "findPendingUploads",
            "resumePendingUpload", "discardPendingUpload", "getStatus", "newFileId",
            "backoffDelay"} <= exports, exports


def test_metrics_name_the_static_routes_as_written(server):
    requests.get(server.url + "/m1client.js", timeout=10)
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert 'route="/m1client.js"' in metrics and "m1client\\\\." not in metrics, metrics
