"""The demo page with auth on (issue 8): the page holds only a token for one upload (given in
its URL fragment, as an application's page would get it from its backend), records through
m1client.js, and plays the result through a `?token=` media URL. Chromium and Playwright as
in test_browser.py.
"""
from __future__ import annotations

import hashlib
import os

import requests

from _browser import (browser, page, playwright_driver,  # noqa: F401  (pytest fixtures)
                      recorded_bytes, upload_panel)
from conftest import wait_until

DEADLINE_S = 90.0
RETRY_WINDOW_MS = 3000          # m1client's EVENTS_RECONNECT_MS (1 s) plus a poll interval (2 s)
KEY = "browser-key-0123456789"


def test_demo_page_holding_only_a_token_records_uploads_and_plays(server_factory, page):
    srv = server_factory(env={"M1_API_KEY": KEY})
    key = {"Authorization": "Bearer " + KEY}
    file_id = "web_auth_1"
    token = requests.post(srv.url + "/api/video/tokens", headers=key, timeout=10, json={
        "fileId": file_id, "rights": ["upload", "read"], "expiresIn": 600}).json()["data"][
        "token"]
    page.goto("%s/#token=%s&fileId=%s" % (srv.url, token, file_id))
    page.wait_for_selector("#record:enabled")
    page.click("#record")
    page.wait_for_selector("#upload[data-file-id]")
    assert upload_panel(page)["fileId"] == file_id

    def status():
        return requests.get(srv.url + "/api/video/status/" + file_id, headers=key,
                            timeout=10).json()["data"]
    wait_until(lambda: status().get("nextChunkIndex", 0) >= 2, DEADLINE_S, 0.1,
               "2 chunks on the server while recording")
    page.click("#stop")
    page.wait_for_selector('#upload[data-state="completed"]', timeout=DEADLINE_S * 1000)
    data = status()
    assert data["state"] == "completed"
    with open(os.path.join(srv.upload_dir, file_id + ".webm"), "rb") as f:
        on_server = f.read()
    recorded = recorded_bytes(page)
    assert hashlib.sha256(on_server).digest() == hashlib.sha256(recorded).digest()

    # The recording plays from a URL carrying the token (a <video> sends no headers).
    item = '#recordings li[data-file-id="%s"] video' % file_id
    page.wait_for_function("(sel) => { const v = document.querySelector(sel);"
                           " return v && v.readyState >= 1; }", arg=item,
                           timeout=DEADLINE_S * 1000)
    source = page.get_attribute(item, "src")       # the remux once processing is done
    assert source.endswith(("/uploads/%s.webm?token=%s" % (file_id, token),
                            "/uploads/derived/%s/remux.webm?token=%s" % (file_id, token)))
    assert token not in srv.log()
    assert not page.problems, page.problems


def test_watch_upload_stops_when_its_token_expires(server_factory, page):
    # m1client.watchUpload over a WebSocket opened with a 2 s token: the server ends the
    # stream with `token_expired` (events.py); the client hands that event to the page and
    # stops, instead of retrying a token that can open nothing (WebSocket, SSE, then polling).
    srv = server_factory(env={"M1_API_KEY": KEY})
    key = {"Authorization": "Bearer " + KEY}
    file_id = "web_watch_1"
    token = requests.post(srv.url + "/api/video/tokens", headers=key, timeout=10, json={
        "fileId": file_id, "rights": ["read"], "expiresIn": 2}).json()["data"]["token"]
    page.goto(srv.url + "/")
    page.evaluate("""([url, fileId, token]) => import("/m1client.js").then((m) => {
        window.seen = [];
        m.watchUpload(url, fileId, (event, via) => window.seen.push(event.type + "/" + via),
                      { token, headers: { Authorization: "Bearer " + token } });
    })""", [srv.url, file_id, token])
    page.wait_for_function("() => window.seen.includes('token_expired/websocket')",
                           timeout=DEADLINE_S * 1000)
    assert page.evaluate("window.seen")[0] == "state/websocket"

    def event_requests():
        return srv.log().count("/api/video/events/" + file_id) + \
            srv.log().count("/api/video/status/" + file_id)
    # Stopped: no reconnect, no SSE, no polling. An absence needs a window: a client that
    # retried would ask again within EVENTS_RECONNECT_MS (1 s), then poll every 2 s; 3 s
    # holds both.
    before = event_requests()
    page.wait_for_timeout(RETRY_WINDOW_MS)
    assert event_requests() == before, srv.log()[-2000:]
    assert page.evaluate("window.seen")[-1] == "token_expired/websocket"
    assert not page.problems, page.problems
