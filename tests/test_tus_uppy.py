"""Uppy with its tus plugin uploads sample.webm from a page in headless Chromium, unchanged.

The page is served by a plain static server on another port, so every tus request is
cross-origin and goes through the CORS preflight and exposed headers, as on a real site.
Uppy is npm's prebuilt browser bundle (tests/js, `npm ci`); Chromium is Debian's, driven by
Playwright for Python without `playwright install` (the facts: tests/_browser.py).
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

import _tus
from conftest import ROOT, SAMPLE_WEBM, get_status, need

CHROMIUM = os.environ.get("M1_TEST_CHROMIUM") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
UPPY_BUNDLE = os.path.join(ROOT, "tests", "js", "node_modules", "uppy", "dist", "uppy.min.js")
PAGE_TIMEOUT_MS = 60000          # generous: the machine is shared; never a timing assertion

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>Uppy to m1server</title>
<script src="uppy.min.js"></script>
<script>
  // The whole app: add sample.webm to Uppy, upload it with the tus plugin, report the result.
  window.uploadWithUppy = async (endpoint, options) => {
    const blob = await (await fetch('sample.webm')).blob()
    const uppy = new Uppy.Uppy({ autoProceed: false })
      .use(Uppy.Tus, Object.assign({ endpoint, retryDelays: [0, 200, 500, 1000] }, options))
    uppy.addFile({ name: 'sample.webm', type: 'video/webm', data: blob })
    const result = await uppy.upload()
    return {
      successful: result.successful.map((file) => file.response.uploadURL),
      failed: result.failed.map((file) => String(file.error)),
    }
  }
</script>
"""


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def site(tmp_path):
    """A static site (page, Uppy bundle, sample.webm) on its own port: another origin."""
    need(os.path.isfile(UPPY_BUNDLE), "Uppy is not installed (cd tests/js && npm ci)")
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "index.html").write_text(PAGE, encoding="utf-8")
    shutil.copy(UPPY_BUNDLE, str(folder / "uppy.min.js"))
    shutil.copy(SAMPLE_WEBM, str(folder / "sample.webm"))
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(_QuietHandler, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield "http://127.0.0.1:%d/" % server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def page():
    need(os.path.exists(CHROMIUM), "chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "playwright for Python is not installed (requirements-test.txt)")
    # Its own short TMPDIR: Chromium leaves folders there when killed, and puts a Unix socket
    # in it whose path must stay under 108 bytes.
    own_tmp = tempfile.mkdtemp(prefix="m1-uppy-")
    try:
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_FLAGS,
                                             env=dict(os.environ, TMPDIR=own_tmp))
            try:
                tab = browser.new_page()
                tab.set_default_timeout(PAGE_TIMEOUT_MS)
                yield tab
            finally:
                browser.close()
    finally:
        shutil.rmtree(own_tmp, ignore_errors=True)


@pytest.mark.parametrize("options", [{}, {"chunkSize": 64 << 10}], ids=["one-patch", "chunked"])
def test_uppy_uploads_sample_webm_from_a_page_in_headless_chromium(server_factory, site, page,
                                                                   sample_webm, options):
    srv = server_factory()
    page.goto(site)
    result = page.evaluate("([endpoint, options]) => uploadWithUppy(endpoint, options)",
                           [srv.url + "/files/", options])
    assert result["failed"] == [], result
    [upload_url] = result["successful"]
    assert upload_url.startswith(srv.url + "/files/")
    file_id = _tus.upload_id(upload_url)
    with requests.Session() as s:
        status = get_status(s, srv.url, file_id).json()["data"]
        assert status["state"] == "completed"
        assert status["tus"]["filename"] == "sample.webm"
        assert status["mimeType"] == "video/webm"
        assert _tus.video_bytes(s, srv.url, file_id) == sample_webm
    assert hashlib.sha256(sample_webm).hexdigest() == hashlib.sha256(
        _tus.read_file(_tus.media_file(srv.upload_dir, file_id))).hexdigest()
    # The browser really went cross-origin: its preflights reached the tus endpoint.
    assert '"OPTIONS /files/' in srv.log()
