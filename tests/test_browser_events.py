"""The demo page shows what the *server* reports (issue 7): m1client.js follows the upload's
real-time events at /api/video/events/:fileId (WebSocket first), and polls
GET /api/video/status/:fileId when events are unavailable.

Debian's Chromium records its fake camera through the demo page against a real m1server with
its default processing (remux: a seekable copy and a poster, by ffmpeg). The page's server
panel (#server) keeps what it showed in data-* attributes: data-via (websocket, sse, polling),
data-bytes-received, data-phase and data-phases (the steps seen, in order) and
data-playback-url. Waits poll the page or the server with deadlines; nothing sleeps.
"""
from __future__ import annotations

import shutil

import requests

from _browser import (browser, page, playwright_driver,  # noqa: F401  (pytest fixtures)
                      upload_panel)
from conftest import need, wait_until

DEADLINE_S = 120.0            # recording, upload and ffmpeg on a shared machine
DEADLINE_MS = DEADLINE_S * 1000


def need_ffmpeg():
    need(shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None,
         "ffmpeg not installed (apt-get install ffmpeg)")


def status(srv, file_id):
    return requests.get(srv.url + "/api/video/status/" + file_id, timeout=10).json()["data"]


def server_panel(page):
    return page.eval_on_selector("#server", "(e) => ({...e.dataset, hidden: e.hidden})")


def record_until(page, srv, chunks):
    """Record through the demo page until `chunks` chunks were recorded, then press stop."""
    page.goto(srv.url + "/")
    page.wait_for_selector("#record:enabled")
    page.click("#record")
    page.wait_for_selector("#upload[data-file-id]")
    file_id = upload_panel(page)["fileId"]
    page.wait_for_function(
        "(n) => Number(document.querySelector('#upload').dataset.chunksRecorded || 0) >= n",
        arg=chunks, timeout=DEADLINE_MS)
    return file_id


def wait_for_phase(page, phase):
    page.wait_for_selector('#server[data-phase="%s"]' % phase, timeout=DEADLINE_MS)


def wait_for_player(page, file_id, src):
    """The recording's <video> in the list plays `src` (and has loaded its metadata)."""
    item = '#recordings li[data-file-id="%s"] video' % file_id
    page.wait_for_function(
        "([sel, src]) => { const v = document.querySelector(sel);"
        " return v && v.getAttribute('src') === src && v.readyState >= 1; }",
        arg=[item, src], timeout=DEADLINE_MS)
    return item


def test_demo_shows_server_bytes_then_processing_then_plays_the_remux(server_factory, page):
    need_ffmpeg()
    srv = server_factory()                                # processing: remux (the default)
    file_id = record_until(page, srv, 1)

    # While recording: bytes the server stored, from its chunk events over the WebSocket.
    page.wait_for_function(
        "() => { const s = document.querySelector('#server').dataset;"
        " return s.via === 'websocket' && Number(s.bytesReceived || 0) > 0; }",
        timeout=DEADLINE_MS)
    shown = server_panel(page)
    assert not shown["hidden"] and shown["phase"] == "uploading", shown
    assert page.is_enabled("#stop")                       # still recording
    text = page.text_content("#server-text")
    assert text.startswith("Saved on server: ") and "live" in text, text

    page.wait_for_function(
        "() => Number(document.querySelector('#upload').dataset.chunksRecorded || 0) >= 3",
        timeout=DEADLINE_MS)                              # ~3 s of video
    page.click("#stop")
    wait_for_phase(page, "ready")

    data = status(srv, file_id)
    assert data["state"] == "completed" and data["processing"]["state"] == "done", data
    remux = "/uploads/derived/%s/remux.webm" % file_id
    assert data["playbackUrl"] == remux, data
    shown = server_panel(page)
    # Every step, in order: the processing step comes from its progress events.
    assert shown["phases"] == "uploading saved processing ready", shown
    assert shown["via"] == "websocket", shown
    assert int(shown["bytesReceived"]) == data["fileSize"], (shown, data)
    assert shown["playbackUrl"] == remux, shown
    assert page.get_attribute("#processing", "aria-valuenow") == "100"
    assert "MB" in page.text_content("#server-text") or \
        "KB" in page.text_content("#server-text")

    # The list plays the seekable remux, with the poster.
    item = wait_for_player(page, file_id, remux)
    assert page.get_attribute(item, "poster") == "/uploads/derived/%s/poster.jpg" % file_id
    # The page's stream went to the events route.
    log = srv.log()
    assert "/api/video/events/%s" % file_id in log, log[-2000:]
    assert not page.problems, page.problems


def test_demo_falls_back_to_polling_when_events_are_refused_and_still_plays_the_remux(
        server_factory, page):
    need_ffmpeg()
    srv = server_factory(args=["--max-subscribers", "1"])
    # Hold the server's only event stream, so the page's WebSocket and EventSource get 503.
    holder = requests.get(srv.url + "/api/video/events/held_by_the_test", stream=True,
                          timeout=30)
    try:
        assert holder.status_code == 200, holder.text
        refused = requests.get(srv.url + "/api/video/events/another", timeout=10)
        assert refused.status_code == 503, refused.text       # the slot really is taken

        file_id = record_until(page, srv, 1)
        page.wait_for_function(
            "() => { const s = document.querySelector('#server').dataset;"
            " return s.via === 'polling' && Number(s.bytesReceived || 0) > 0; }",
            timeout=DEADLINE_MS)
        page.wait_for_function(
            "() => Number(document.querySelector('#upload').dataset.chunksRecorded || 0) >= 3",
            timeout=DEADLINE_MS)
        page.click("#stop")
        wait_for_phase(page, "ready")

        data = status(srv, file_id)
        remux = "/uploads/derived/%s/remux.webm" % file_id
        assert data["playbackUrl"] == remux, data
        shown = server_panel(page)
        assert shown["via"] == "polling", shown
        phases = shown["phases"].split()
        # Polling may miss the short processing step; never the order of what it saw.
        assert phases[0] == "uploading" and phases[-1] == "ready", shown
        assert phases == sorted(phases, key=["uploading", "saved", "processing",
                                             "ready"].index), shown
        assert int(shown["bytesReceived"]) == data["fileSize"], (shown, data)
        wait_for_player(page, file_id, remux)
        assert "checked every 2 s" in page.text_content("#server-text")

        # The page asked for events and was refused, then polled the status.
        log = srv.log()
        assert "GET /api/video/events/%s" % file_id in log and " 503 " in log, log[-3000:]
        assert "GET /api/video/status/%s" % file_id in log
        assert not page.problems, page.problems
    finally:
        holder.close()


def test_demo_closes_its_stream_after_completed_when_processing_is_off(server_factory, page):
    # One event stream at most: while the page holds it, another is refused (503).
    srv = server_factory(args=["--processing", "off", "--max-subscribers", "1"])
    file_id = record_until(page, srv, 2)
    page.wait_for_function("() => document.querySelector('#server').dataset.via"
                           " === 'websocket'", timeout=DEADLINE_MS)
    assert stream_slot_answer(srv) == 503                 # the page is watching
    page.click("#stop")
    wait_for_phase(page, "saved")
    page.wait_for_selector('#upload[data-state="completed"]', timeout=DEADLINE_MS)
    shown = server_panel(page)
    assert shown["via"] == "websocket" and shown["phases"] == "uploading saved", shown
    assert "playbackUrl" not in shown
    data = status(srv, file_id)
    assert "processing" not in data, data
    assert int(shown["bytesReceived"]) == data["fileSize"], (shown, data)
    # Nothing follows `completed` on this server, so the page lets go of its stream.
    wait_until(lambda: stream_slot_answer(srv) == 200, DEADLINE_S, 0.1,
               "the page to close its event stream")
    assert not page.problems, page.problems


def stream_slot_answer(srv):
    """The status an event stream request gets now (closed again at once)."""
    with requests.get(srv.url + "/api/video/events/probe_by_the_test", stream=True,
                      timeout=10) as reply:
        return reply.status_code
