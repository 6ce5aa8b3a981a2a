"""Browser test helpers: Debian's chromium driven by Playwright for Python, ffprobe, PNG pixels.

Facts these rest on (measured on the build machines):
- Playwright's own browser download is never used (no `playwright install`): Debian's
  /usr/bin/chromium is launched with `executable_path` and CHROMIUM_FLAGS below. `launch()`
  refuses `--user-data-dir` in its args (`launch_persistent_context()` takes one).
- The fake media devices (`--use-fake-device-for-media-stream`, `--use-fake-ui-...`) give a
  camera and a microphone that are really recorded and encoded; `http://127.0.0.1:<port>`
  counts as a secure context, so getUserMedia works there. Launch takes 0.3-0.8 s; a 4 s
  recording with its uploads about 4.5 s and a third of a core.
- Chromium records `video/webm;codecs=vp8,opus` by default, 640x480 at 20 fps, mono 48 kHz;
  only chunk 0 carries the WebM header (1A 45 DF A3), later chunks start mid-cluster, and a
  lost chunk is silent to ffprobe: only the server's index bookkeeping tells a complete
  recording from a damaged one. `MediaRecorder.mimeType` is empty until `start()`.
- A killed Chromium leaves an `org.chromium.Chromium.*` folder in its temp dir, so every test
  gets its own browser process with its own TMPDIR. The /usr/bin/chromium wrapper prints a
  harmless `[: ... unexpected operator` line; dbus errors in its log are harmless too.

Test modules import the fixtures by name:
    from _browser import playwright_driver, browser, page  # noqa: F401  (pytest fixtures)
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import tempfile
import zlib

import pytest

from conftest import ROOT, need

CHROMIUM = os.environ.get("M1_TEST_CHROMIUM") or "/usr/bin/chromium"
ARTIFACTS = os.path.join(ROOT, "test-artifacts")        # git-ignored
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]
VIEWPORT = {"width": 1000, "height": 1000}
PAGE_TIMEOUT_MS = 30000       # generous: the machine is shared, never a timing assertion

# Runs before any page script: keeps a copy of every Blob each MediaRecorder hands out, so a
# test can compare the server's file with exactly what the browser recorded.
CAPTURE_RECORDINGS = """
(() => {
  const Original = window.MediaRecorder;
  if (!Original) return;
  window.__recordings = [];
  window.MediaRecorder = class extends Original {
    constructor(...args) {
      super(...args);
      const blobs = [];
      window.__recordings.push(blobs);
      this.addEventListener("dataavailable", (event) => blobs.push(event.data));
    }
  };
})();
"""


def need_browser_tools():
    need(os.path.exists(CHROMIUM), "chromium not installed (apt-get install chromium)")
    need(shutil.which("ffprobe") is not None, "ffprobe not installed (apt-get install ffmpeg)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        need(False, "playwright for Python not installed (requirements-test.txt)")


@pytest.fixture(scope="module")
def playwright_driver():
    # One driver per test module: each module imports this fixture into its own namespace,
    # so a session-scoped one would start twice, and Playwright allows one per thread.
    need_browser_tools()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as driver:
        yield driver


@pytest.fixture
def browser(playwright_driver):
    # Its own TMPDIR, short: Chromium puts a Unix socket in it, and a socket path longer than
    # 107 bytes (pytest's tmp_path is deeper than that allows) makes Chromium abort at launch.
    own_tmp = tempfile.mkdtemp(prefix="m1-chromium-")
    env = dict(os.environ, TMPDIR=own_tmp)
    try:
        instance = playwright_driver.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                     args=CHROMIUM_FLAGS, env=env)
        try:
            yield instance
        finally:
            instance.close()                   # Chromium and its helpers, whatever failed
    finally:
        shutil.rmtree(own_tmp, ignore_errors=True)


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    try:
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        context.add_init_script(CAPTURE_RECORDINGS)
        tab = context.new_page()
        tab.problems = []                    # uncaught page errors, for assertion messages
        tab.on("pageerror", lambda error: tab.problems.append(str(error)))
        yield tab
    finally:
        context.close()


# --- reading the page -----------------------------------------------------------------------

def recorded_bytes(page, recording=0):
    """Everything MediaRecorder number `recording` of this page load handed out, joined."""
    data_url = page.evaluate("""async (n) => {
        const blobs = (window.__recordings || [])[n] || [];
        const reader = new FileReader();
        const done = new Promise((resolve) => { reader.onload = () => resolve(reader.result); });
        reader.readAsDataURL(new Blob(blobs));
        return await done;
    }""", recording)
    return base64.b64decode(data_url.split(",", 1)[1])


def recorded_blob_sizes(page, recording=0):
    return page.evaluate("(n) => ((window.__recordings || [])[n] || []).map((b) => b.size)",
                         recording)


def stash_contents(page):
    """The m1client IndexedDB stash: {fileId: {"record": ..., "chunks": [indexes]}}."""
    return page.evaluate("""() => new Promise((resolve, reject) => {
        const open = indexedDB.open("m1client");
        open.onerror = () => reject(open.error);
        open.onsuccess = () => {
            const db = open.result;
            if (!db.objectStoreNames.contains("uploads")) { resolve({}); return; }
            const tx = db.transaction(["uploads", "chunks"], "readonly");
            const out = {};
            tx.objectStore("uploads").getAll().onsuccess = (e) => {
                for (const r of e.target.result) out[r.fileId] = {record: r, chunks: []};
            };
            tx.objectStore("chunks").getAllKeys().onsuccess = (e) => {
                for (const [id, index] of e.target.result) {
                    (out[id] = out[id] || {record: null, chunks: []}).chunks.push(index);
                }
            };
            tx.oncomplete = () => { db.close(); resolve(out); };
        };
    })""")


def upload_panel(page):
    """The demo page's upload panel state (data-* attributes of #upload)."""
    return page.eval_on_selector("#upload", "(e) => ({...e.dataset})")


def save_screenshot(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    page.screenshot(path=path, full_page=True)
    return path


# --- media checks ---------------------------------------------------------------------------

def ffprobe_streams(path):
    """[{codec_type, codec_name, frames}] read by decoding every packet of `path`."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_entries",
         "stream=codec_type,codec_name,nb_read_frames", "-of", "json", path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert out.returncode == 0, out.stderr.decode("utf-8", "replace")
    return [{"codec_type": s.get("codec_type"), "codec_name": s.get("codec_name"),
             "frames": int(s.get("nb_read_frames") or 0)}
            for s in json.loads(out.stdout.decode("utf-8"))["streams"]]


def video_and_audio(streams):
    video = [s for s in streams if s["codec_type"] == "video"]
    audio = [s for s in streams if s["codec_type"] == "audio"]
    assert len(video) == 1 and len(audio) == 1, streams
    return video[0], audio[0]


# --- PNG pixels (stdlib only: enough of PNG for Chromium's 8-bit RGB/RGBA screenshots) --------

def png_pixels(data):
    """Decode a non-interlaced 8-bit RGB or RGBA PNG -> (width, height, rows of (r, g, b))."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    channels = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up = previous[x]
            corner = previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                line[x] = (line[x] + _paeth(left, up, corner)) & 0xFF
        rows.append([tuple(line[i:i + 3]) for i in range(0, stride, channels)])
        previous = line
    return width, height, rows


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c
