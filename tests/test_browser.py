"""The browser recorder, proven in a real browser (issue 3): Debian's Chromium records its fake
camera and microphone through the demo page (GET /) and m1client.js, against a real m1server.

What each test shows is in its name. Every test compares the server's assembled file with the
exact bytes MediaRecorder handed to the page (captured by an init script, see _browser.py), so
"complete" means byte for byte, and the chunk count the server saw must equal the number of
chunks the page recorded. Waits poll with deadlines; nothing asserts how long anything took.
"""
from __future__ import annotations

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from _browser import (browser, page, playwright_driver,  # noqa: F401  (pytest fixtures)
                      ffprobe_streams, png_pixels, recorded_blob_sizes, recorded_bytes,
                      save_screenshot, stash_contents, upload_panel, video_and_audio)
from conftest import send_chunk, wait_until

DEADLINE_S = 90.0             # for anything the page or server must reach (shared machine)
API_ROUTES = "**/api/video/**"


# --- helpers --------------------------------------------------------------------------------

def status(srv, file_id):
    return requests.get(srv.url + "/api/video/status/" + file_id, timeout=10).json()["data"]


def chunks_on_server(srv, file_id):
    data = status(srv, file_id)
    return data.get("nextChunkIndex", 0) if data["exists"] else 0


def open_demo(page, srv):
    page.goto(srv.url + "/")
    page.wait_for_selector("#record:enabled")          # demo.js has loaded


def start_recording(page):
    page.click("#record")
    page.wait_for_selector("#upload[data-file-id]")
    return upload_panel(page)["fileId"]


def stashed_chunks(page, file_id):
    """Indexes of the chunks m1client keeps in IndexedDB for this upload."""
    return (stash_contents(page).get(file_id) or {}).get("chunks", [])


def panel_number(page, name):
    return int(upload_panel(page).get(name) or 0)


def unacknowledged(page):
    panel = upload_panel(page)
    return int(panel.get("chunksRecorded") or 0) - int(panel.get("chunksAcknowledged") or 0)


def wait_for_completed(page):
    page.wait_for_selector('#upload[data-state="completed"]', timeout=DEADLINE_S * 1000)


def media_file(srv, file_id, ext="webm"):
    with open(os.path.join(srv.upload_dir, "%s.%s" % (file_id, ext)), "rb") as f:
        return f.read()


def assert_same_bytes(on_server, recorded):
    assert len(on_server) == len(recorded) and \
        hashlib.sha256(on_server).digest() == hashlib.sha256(recorded).digest(), (
            "server file (%d bytes) differs from what the page recorded (%d bytes)"
            % (len(on_server), len(recorded)))


def assert_playable_video(path, chunks):
    video, audio = video_and_audio(ffprobe_streams(path))
    assert video["codec_name"] in ("vp8", "vp9", "av1", "h264"), video
    assert audio["codec_name"] == "opus", audio
    # MediaRecorder's fake camera gives ~20 frames per 1 s chunk; at least one per chunk is a
    # loose sanity bound that needs no clock.
    assert video["frames"] >= chunks and audio["frames"] >= chunks, (video, audio)
    return video, audio


def assert_complete_recording(srv, page, file_id, expect_chunks=None):
    """The server's upload is completed and is exactly what the page's MediaRecorder made."""
    data = status(srv, file_id)
    assert data["state"] == "completed", data
    recorded = recorded_bytes(page)
    nonempty = [size for size in recorded_blob_sizes(page) if size > 0]
    chunks = expect_chunks if expect_chunks is not None else len(nonempty)
    assert data["totalChunks"] == chunks, (data, nonempty)
    assert_same_bytes(media_file(srv, file_id), recorded)
    return data


def message(page):
    return page.eval_on_selector("#message", "(e) => ({text: e.textContent, kind: e.className,"
                                             " hidden: e.hidden})")


# --- the demo page ------------------------------------------------------------------------

def test_demo_page_streams_chunks_while_recording_then_shows_success_and_plays(
        server_factory, page):
    srv = server_factory()
    open_demo(page, srv)
    file_id = start_recording(page)

    # Chunks reach the server while the page is still recording.
    wait_until(lambda: chunks_on_server(srv, file_id) >= 3, DEADLINE_S, 0.1,
               "3 chunks on the server while recording")
    before_stop = status(srv, file_id)
    assert before_stop["state"] == "uploading" and page.is_enabled("#stop"), before_stop
    wait_until(lambda: panel_number(page, "chunksRecorded") >= 5, DEADLINE_S, 0.1,
               "about 5 s of recording (5 chunks of 1 s)")
    page.click("#stop")
    wait_for_completed(page)

    recorded_chunks = panel_number(page, "chunksRecorded")
    data = assert_complete_recording(srv, page, file_id, expect_chunks=recorded_chunks)
    assert before_stop["chunksReceived"] >= 3 and recorded_chunks > before_stop["chunksReceived"]
    assert data["mimeType"].startswith("video/webm"), data
    assert_playable_video(os.path.join(srv.upload_dir, file_id + ".webm"), recorded_chunks)

    shown = message(page)
    assert not shown["hidden"] and "success" in shown["kind"] and "Saved" in shown["text"], shown
    assert page.get_attribute("#progress", "aria-valuenow") == "100"

    # The new recording is listed and its <video> loads from GET /uploads/... (Range).
    item = '#recordings li[data-file-id="%s"] video' % file_id
    page.wait_for_function("(sel) => { const v = document.querySelector(sel);"
                           " return v && v.readyState >= 1; }", arg=item)
    # The original, or (once processing is done, which may be first) its seekable remux.
    assert page.get_attribute(item, "src") in (
        "/uploads/%s.webm" % file_id, "/uploads/derived/%s/remux.webm" % file_id)

    # The screenshot a person would look at, and the bar in it: full width, in the success
    # green of demo.css (--ok: #1f8a4c), with no unfilled track left at the right end.
    save_screenshot(page, "demo-after-recording.png")
    width, height, rows = png_pixels(page.locator("#progress").screenshot())
    middle = rows[height // 2]
    edge = max(4, height // 2 + 1)                       # skip the rounded ends
    for x in range(edge, width - edge):
        red, green, blue = middle[x]
        assert abs(red - 0x1f) <= 24 and abs(green - 0x8a) <= 24 and abs(blue - 0x4c) <= 24, (
            "progress bar pixel %d of %d is %r, not the completed green" % (x, width,
                                                                             middle[x]))
    assert not page.problems, page.problems


def test_demo_lists_uploads_made_elsewhere_from_the_server_listing(server_factory, page,
                                                                   sample_webm):
    srv = server_factory()
    with requests.Session() as session:                   # e.g. the command-line uploader
        reply = send_chunk(session, srv.url, "made_elsewhere", 0, sample_webm,
                           status="completed", mime_type="video/webm")
        assert reply.status_code == 200, reply.text
    open_demo(page, srv)
    item = '#recordings li[data-file-id="made_elsewhere"] video'
    page.wait_for_function("(sel) => { const v = document.querySelector(sel);"
                           " return v && v.readyState >= 1; }", arg=item)
    assert page.get_attribute(item, "src") in (       # the remux once processing is done
        "/uploads/made_elsewhere.webm", "/uploads/derived/made_elsewhere/remux.webm")
    assert page.is_hidden("#no-recordings")
    assert not page.problems, page.problems


def test_upload_after_stop_option_sends_nothing_until_stop(server_factory, page):
    srv = server_factory()
    open_demo(page, srv)
    page.check("#after-stop")
    file_id = start_recording(page)
    wait_until(lambda: panel_number(page, "chunksRecorded") >= 3, DEADLINE_S, 0.1,
               "3 chunks recorded")
    assert status(srv, file_id)["exists"] is False        # the seed's way: all after stop
    page.click("#stop")
    wait_for_completed(page)
    assert_complete_recording(srv, page, file_id)
    assert not page.problems, page.problems


# --- failures while recording ---------------------------------------------------------------

def test_refused_chunk_shows_a_clear_error_and_keeps_the_chunks_in_the_browser(
        server_factory, page):
    srv = server_factory(args=["--max-chunk-size", "1K"])   # every real chunk is refused (413)
    open_demo(page, srv)
    file_id = start_recording(page)
    page.wait_for_selector('#upload[data-state="failed"]')
    shown = message(page)
    assert "error" in shown["kind"] and "Upload failed" in shown["text"], shown
    assert "larger than 1024 bytes" in shown["text"], shown  # the server's own reason
    assert status(srv, file_id)["exists"] is False
    assert stash_contents(page)[file_id]["chunks"][:1] == [0]   # kept for a later visit
    page.click("#stop")
    page.wait_for_selector("#record:enabled")
    assert not page.problems, page.problems


def test_server_killed_and_restarted_while_recording_page_recovers_on_its_own(
        server_factory, page):
    srv = server_factory()
    port = srv.port
    open_demo(page, srv)
    file_id = start_recording(page)
    wait_until(lambda: chunks_on_server(srv, file_id) >= 2, DEADLINE_S, 0.1, "2 chunks")

    srv.kill()                                            # kill -9 mid-recording
    wait_until(lambda: unacknowledged(page) >= 2 and
               upload_panel(page).get("state") == "retrying", DEADLINE_S, 0.1,
               "2 chunks recorded while the server is down, and the page retrying")
    recorded_during_outage = panel_number(page, "chunksRecorded")
    srv.start(port=port)

    # Still recording: the page finds the server again by itself and catches up.
    wait_until(lambda: chunks_on_server(srv, file_id) >= recorded_during_outage, DEADLINE_S,
               0.1, "the page to catch up after the restart")
    assert page.is_enabled("#stop")
    page.click("#stop")
    wait_for_completed(page)

    recorded_chunks = panel_number(page, "chunksRecorded")
    assert_complete_recording(srv, page, file_id, expect_chunks=recorded_chunks)
    assert_playable_video(os.path.join(srv.upload_dir, file_id + ".webm"), recorded_chunks)
    # It resumed from the server's answer to GET /api/video/status, after the restart.
    assert "GET /api/video/status/%s" % file_id in srv.log()
    assert "success" in message(page)["kind"]
    assert not page.problems, page.problems


def test_page_reloaded_with_unacknowledged_chunks_finishes_the_upload_after_reload(
        server_factory, page):
    srv = server_factory()
    port = srv.port
    open_demo(page, srv)
    file_id = start_recording(page)
    wait_until(lambda: chunks_on_server(srv, file_id) >= 2, DEADLINE_S, 0.1, "2 chunks")

    srv.kill()                                            # a short outage ...
    wait_until(lambda: unacknowledged(page) >= 2, DEADLINE_S, 0.1, "2 unacknowledged chunks")
    page.click("#stop")                                   # ... the recording ends meanwhile

    def stashed_and_ended():
        entry = stash_contents(page).get(file_id)
        return entry if entry and entry["record"]["lastIndex"] is not None else None
    stashed = wait_until(stashed_and_ended, DEADLINE_S, 0.1, "the ended recording in IndexedDB")
    assert len(stashed["chunks"]) >= 2, stashed
    recorded_chunks = stashed["record"]["lastIndex"] + 1
    assert recorded_chunks == panel_number(page, "chunksRecorded")
    recorded = recorded_bytes(page)                       # gone from the page after reload

    # The page itself comes from this server, so it can only be reloaded once the server is
    # back; for this page the upload API stays unreachable until after the reload.
    page.route(API_ROUTES, lambda route: route.abort("connectionrefused"))
    srv.start(port=port)
    page.reload()
    finish = '#pending-list li[data-file-id="%s"] .finish-pending' % file_id
    page.wait_for_selector(finish)
    assert len(stash_contents(page)[file_id]["chunks"]) >= 2
    page.click(finish)                                    # still unreachable: it retries
    page.wait_for_selector('#upload[data-state="retrying"]')
    page.unroute(API_ROUTES)                              # the outage ends
    wait_for_completed(page)

    data = status(srv, file_id)
    assert data["state"] == "completed" and data["totalChunks"] == recorded_chunks, data
    assert_same_bytes(media_file(srv, file_id), recorded)
    assert stash_contents(page) == {}                     # nothing left behind
    page.wait_for_selector("#pending", state="hidden")
    assert not page.problems, page.problems


def test_page_reloaded_while_recording_keeps_what_was_recorded_and_finishes_it(
        server_factory, page):
    """A tab that dies mid-recording: the next load finishes the recording as far as it got
    (its last chunk is unknown, so the client closes the upload with an empty chunk)."""
    srv = server_factory()
    port = srv.port
    open_demo(page, srv)
    file_id = start_recording(page)
    wait_until(lambda: chunks_on_server(srv, file_id) >= 2, DEADLINE_S, 0.1, "2 chunks")
    srv.kill()
    wait_until(lambda: len(stashed_chunks(page, file_id)) >= 2, DEADLINE_S, 0.1,
               "2 chunks stashed while the server is down")
    stashed = stashed_chunks(page, file_id)               # only grows until the reload
    recorded = recorded_bytes(page)

    page.route(API_ROUTES, lambda route: route.abort("connectionrefused"))
    srv.start(port=port)
    page.reload()                                         # while still recording
    page.unroute(API_ROUTES)
    finish = '#pending-list li[data-file-id="%s"] .finish-pending' % file_id
    page.click(finish)
    wait_for_completed(page)

    data = status(srv, file_id)
    assert data["state"] == "completed", data
    kept = data["totalChunks"] - 1                        # minus the empty closing chunk
    assert kept >= max(stashed) + 1, (data, stashed)      # every chunk stashed before reload
    # MediaRecorder went on for a moment after the copy was taken: one is a prefix of the other.
    on_server = media_file(srv, file_id)
    assert on_server.startswith(recorded) or recorded.startswith(on_server), (
        "the server's file (%d bytes) and the page's recording (%d bytes) differ"
        % (len(on_server), len(recorded)))
    assert_playable_video(os.path.join(srv.upload_dir, file_id + ".webm"), kept)
    assert not page.problems, page.problems


# --- another origin -------------------------------------------------------------------------

SECOND_ORIGIN_PAGE = """<!doctype html>
<meta charset="utf-8"><title>another app</title>
<script type="module">
  import { M1Recorder } from "%(server)s/m1client.js";
  window.recordFor = async (milliseconds) => {
    const recorder = new M1Recorder({ serverUrl: "%(server)s", timeslice: 500 });
    const chunks = [];
    recorder.addEventListener("chunk", (event) => chunks.push(event.detail.index));
    await recorder.start();
    await new Promise((resolve) => setTimeout(resolve, milliseconds));
    const video = await recorder.stop();
    recorder.closeCamera();
    return { ...video, acknowledged: chunks };
  };
  window.ready = true;
</script>
"""


class _OtherOrigin:
    """A tiny stdlib static server on its own port (another origin) serving `self.body` at
    every path; the body may be set after the server starts."""

    def __init__(self):
        self.body = b""
        site = self

        class Serve(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(site.body)))
                self.end_headers()
                self.wfile.write(site.body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Serve)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def other_origin():
    site = _OtherOrigin()
    yield site
    site.close()


def test_page_on_a_second_origin_uploads_through_cors(server_factory, page, other_origin):
    # The allow-list names the other origin; that origin's page learns the server's URL once
    # the server runs.
    allowed = "http://127.0.0.1:%d" % other_origin.port
    srv = server_factory(args=["--cors-origin", allowed])
    other_origin.body = (SECOND_ORIGIN_PAGE % {"server": srv.url}).encode("utf-8")

    page.goto(allowed + "/")
    page.wait_for_function("window.ready === true")
    video = page.evaluate("(ms) => window.recordFor(ms)", 2500)
    file_id = video["fileId"]
    assert video["url"] == "%s/uploads/%s.webm" % (srv.url, file_id), video
    assert_complete_recording(srv, page, file_id, expect_chunks=video["chunks"])
    assert video["acknowledged"] == list(range(video["chunks"])), video
    # The upload was preflighted (XHR with a progress listener) and the preflight answered.
    assert '"OPTIONS /api/video/upload HTTP/1.1" 204' in srv.log()
    assert not page.problems, page.problems

    # The same page from an origin the list does not name gets nothing: the module itself is
    # refused (403, no Access-Control-Allow-Origin), and so would be every upload.
    refused = page.context.new_page()
    errors = []
    refused.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    refused.goto("http://localhost:%d/" % other_origin.port)
    wait_until(lambda: any("CORS" in e or "m1client.js" in e for e in errors), DEADLINE_S, 0.1,
               "the browser to refuse the module from a disallowed origin")
    assert refused.evaluate("window.ready === undefined")
    assert refused.evaluate("(url) => fetch(url).then(() => 'read', () => 'refused')",
                            srv.url + "/healthz") == "refused"
    refused.close()
