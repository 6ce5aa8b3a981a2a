"""examples/nextjs builds (`npm ci && next build`, telemetry off) and its page records and
uploads to m1server in a real browser, from another origin (the seed's :3000 -> :3001).

Installing Next.js from npm takes a while, so this runs only with M1_TEST_NEXTJS=1 (.ci/run
sets it; locally: `M1_TEST_NEXTJS=1 make test`). The install is cached outside the repository
(never node_modules or .next in it), keyed by the lock file's hash, in M1_NEXTJS_CACHE
(default ~/.cache/m1server/nextjs); `npm ci` runs again only when the lock file changes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess

import pytest
import requests

from _browser import (browser, page, playwright_driver,  # noqa: F401  (pytest fixtures)
                      recorded_bytes)
from conftest import ROOT, need, run_group, stop_group, wait_until

EXAMPLE = os.path.join(ROOT, "examples", "nextjs")
SOURCES = ("package.json", "package-lock.json", "app")
INSTALL_TIMEOUT_S = 600
BUILD_TIMEOUT_S = 300
DEADLINE_S = 90.0

pytestmark = pytest.mark.skipif(os.environ.get("M1_TEST_NEXTJS") != "1",
                                reason="set M1_TEST_NEXTJS=1 to build the Next.js example")


def npm_env(**extra):
    env = dict(os.environ, NEXT_TELEMETRY_DISABLED="1", npm_config_audit="false",
               npm_config_fund="false", npm_config_update_notifier="false")
    env.update(extra)
    return env


def prepared_example():
    """A copy of the example with its dependencies installed (`npm ci`), reused while the
    lock file is unchanged. Returns its directory."""
    need(shutil.which("node") and shutil.which("npm"), "node and npm not installed")
    with open(os.path.join(EXAMPLE, "package-lock.json"), "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()[:16]
    cache = os.environ.get("M1_NEXTJS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "m1server", "nextjs")
    work = os.path.join(cache, key)
    os.makedirs(work, exist_ok=True)
    for name in SOURCES:                       # the sources are always the repository's own
        target = os.path.join(work, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        source = os.path.join(EXAMPLE, name)
        (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, target)
    installed = os.path.join(work, "node_modules", ".m1-installed")
    if not os.path.exists(installed):
        run(["npm", "ci"], work, INSTALL_TIMEOUT_S)
        open(installed, "w").close()
    return work


def run(command, cwd, timeout, **env):
    code, output = run_group(command, timeout, cwd=cwd, env=npm_env(**env))
    assert code == 0, "%s failed:\n%s" % (" ".join(command), output[-4000:])
    return output


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_nextjs_example_builds_and_records_to_m1server(server_factory, page):
    work = prepared_example()
    app_port = free_port()
    app_origin = "http://127.0.0.1:%d" % app_port
    srv = server_factory(args=["--cors-origin", app_origin])    # only the app may upload

    # NEXT_PUBLIC_* is written into the page at build time.
    output = run([os.path.join("node_modules", ".bin", "next"), "build"], work,
                 BUILD_TIMEOUT_S, NEXT_PUBLIC_M1_SERVER_URL=srv.url)
    assert "Compiled successfully" in output or "Generating static pages" in output, output

    app = subprocess.Popen([os.path.join("node_modules", ".bin", "next"), "start", "-p",
                            str(app_port), "-H", "127.0.0.1"], cwd=work, env=npm_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        wait_until(lambda: _answers(app_origin), DEADLINE_S, 0.2, "next start to serve")
        page.goto(app_origin + "/")
        page.wait_for_selector("#record:enabled")          # m1client.js loaded cross-origin
        page.click("#record")
        page.wait_for_selector("#progress[data-file-id]")
        file_id = page.get_attribute("#progress", "data-file-id")
        wait_until(lambda: _chunks(srv, file_id) >= 2, DEADLINE_S, 0.1,
                   "chunks on the server while recording")
        page.click("#stop")
        page.wait_for_selector('#progress[data-state="completed"]', timeout=DEADLINE_S * 1000)

        data = requests.get(srv.url + "/api/video/status/" + file_id, timeout=10).json()["data"]
        assert data["state"] == "completed", data
        with open(os.path.join(srv.upload_dir, file_id + ".webm"), "rb") as f:
            assert f.read() == recorded_bytes(page)
        assert page.get_attribute("#message", "class") == "success"
        assert page.get_attribute("#progress", "aria-valuenow") == "100"
        assert '"OPTIONS /api/video/upload HTTP/1.1" 204' in srv.log()
        assert not page.problems, page.problems
    finally:
        stop_group(app)                                      # next start and its workers


def _answers(url):
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _chunks(srv, file_id):
    data = requests.get(srv.url + "/api/video/status/" + file_id, timeout=10).json()["data"]
    return data.get("nextChunkIndex", 0) if data["exists"] else 0
