"""The README and docs/ stay true to the program (issue 16).

- docs/configuration.md lists every flag of the real `--help` (the server and its `upload`,
  `gc` and `token` tools), one table row per flag, and nothing `--help` does not have; each
  server flag's row names the env twin `--help` shows.
- Every `M1_*` environment variable the code reads (runtime modules, tests, benchmarks,
  tools) is on that page; the test-only ones (`M1_TEST_*`) in its "Test-only knobs" section.
- Every relative link in README.md and docs/*.md points at a file that exists, and its
  `#anchor` at a heading of that file (GitHub's heading ids).
- The README's commands work: `make run` serves the demo page, and its curl examples of the
  seed API, run as written against a real server, get the answers the README shows.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import requests

from conftest import (ROOT, SAMPLE_WEBM, START_DEADLINE_S, STORAGE, URL_LINE, metric, need,
                      read_bytes, stop_group)

CONFIGURATION = os.path.join(ROOT, "docs", "configuration.md")
README = os.path.join(ROOT, "README.md")
TOOLS = ("upload", "gc", "token")
CODE_GLOBS = ("*.py", "tests/*.py", "bench/*.py", "tools/*.py", "static/*.js", "Makefile",
              ".ci/run", "deploy/*")
ENV_NAME = re.compile(r"\bM1_[A-Z0-9_]*[A-Z0-9]\b")
HELP_FLAG = re.compile(r"^  (?:-\w, )?(--[a-z0-9][a-z0-9-]*)")    # argparse's option lines
DOC_ROW = re.compile(r"^\| `(--[a-z0-9][a-z0-9-]*)` \|([^|]*)\|")
LINK = re.compile(r"\]\(([^)\s]+)\)")
TEST_ONLY_HEADING = "## Test-only knobs"
CURL_TIMEOUT_S = 30


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# --- --help against docs/configuration.md ----------------------------------------------------

def help_text(*argv):
    """The real --help, with no M1_* variable set (they would change the defaults shown)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("M1_")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "m1server.py")] + list(argv) +
                         ["--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=env, timeout=60, check=True)
    return out.stdout.decode("utf-8")


def help_flags(*argv):
    """{flag: its help text} for every option --help lists (its lines up to the next one)."""
    flags, current = {}, None
    for line in help_text(*argv).splitlines():
        match = HELP_FLAG.match(line)
        if match:
            current = match.group(1)
            flags[current] = line
        elif current and line.startswith("    "):
            flags[current] += " " + line.strip()
        else:
            current = None
    return flags


def documented_flags():
    """{section: {flag: env column}}: rows under "## Server flags" are the server's, rows
    under "### `m1server.py <tool> ..." that tool's."""
    sections, section = {}, None
    for line in read_text(CONFIGURATION).splitlines():
        if line.startswith("## "):
            section = "server" if line == "## Server flags" else None
        tool = re.match(r"^### `m1server\.py (\w+)", line)
        if tool:
            section = tool.group(1)
        match = DOC_ROW.match(line)
        if match:
            assert section is not None, "a flag row outside a flag section: " + line
            rows = sections.setdefault(section, {})
            assert match.group(1) not in rows, "listed twice: " + match.group(1)
            rows[match.group(1)] = match.group(2)
    return sections


@pytest.fixture(scope="module")
def server_help():
    return help_flags()


def test_every_server_flag_of_help_is_in_configuration_md_and_no_other(server_help):
    documented = documented_flags().get("server", {})
    missing = sorted(set(server_help) - set(documented))
    stale = sorted(set(documented) - set(server_help))
    assert not missing, "flags of --help missing from docs/configuration.md: %s" % missing
    assert not stale, "docs/configuration.md lists flags --help does not have: %s" % stale


def test_every_server_flag_row_names_the_env_twin_help_shows(server_help):
    documented = documented_flags()["server"]
    for flag, text in server_help.items():
        twin = re.search(r"\[env (M1_[A-Z0-9_]+)", text)
        if twin:
            assert "`%s" % twin.group(1) in documented[flag], \
                "%s: docs/configuration.md should name its env twin %s" % (flag, twin.group(1))


@pytest.mark.parametrize("tool", TOOLS)
def test_every_flag_of_a_tool_is_in_configuration_md_and_no_other(server_help, tool):
    """A tool that takes the server's flags documents only its own; gc has none."""
    own = set(help_flags(tool))
    if tool != "upload":                      # gc and token parse the server's flags too
        assert set(server_help) <= own
        own -= set(server_help)
    documented = set(documented_flags().get(tool, {}))
    assert own == documented, ("`m1server.py %s --help` and its table in "
                               "docs/configuration.md differ: missing %s, not in --help %s"
                               % (tool, sorted(own - documented), sorted(documented - own)))


# --- M1_* variables --------------------------------------------------------------------------

def env_names_in_code():
    """{name: [files]} for every M1_* name the code spells out."""
    names = {}
    for pattern in CODE_GLOBS:
        for path in glob.glob(os.path.join(ROOT, pattern)):
            if not os.path.isfile(path) or path == os.path.abspath(__file__):
                continue
            for name in set(ENV_NAME.findall(read_text(path))):
                names.setdefault(name, []).append(os.path.relpath(path, ROOT))
    return names


def test_every_m1_variable_the_code_reads_is_documented():
    page = read_text(CONFIGURATION)
    test_only = page[page.index(TEST_ONLY_HEADING):]
    names = env_names_in_code()
    assert "M1_API_KEY" in names and "M1_TEST_CRASH_AT" in names       # the scan sees the code
    missing = sorted("%s (%s)" % (n, ", ".join(f)) for n, f in names.items()
                     if not re.search(r"\b%s\b" % n, page))
    assert not missing, "M1_* variables missing from docs/configuration.md: %s" % missing
    misplaced = sorted(n for n in names if n.startswith("M1_TEST_")
                       and not re.search(r"\b%s\b" % n, test_only))
    assert not misplaced, "test-only variables belong under %r: %s" % (TEST_ONLY_HEADING,
                                                                        misplaced)


# --- links -----------------------------------------------------------------------------------

def heading_ids(path):
    """GitHub's ids for a file's headings: lower case, punctuation dropped, spaces to '-',
    a repeated id numbered -1, -2, ..."""
    ids, seen, fenced = set(), {}, False
    for line in read_text(path).splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"^#{1,6} (.+?)\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            ids.add(slug if count == 0 else "%s-%d" % (slug, count))
    return ids


def relative_links(path):
    text = re.sub(r"```.*?```", "", read_text(path), flags=re.S)       # code is not a link
    return [link for link in LINK.findall(text)
            if not re.match(r"^[a-z]+:", link) and not link.startswith("#")]


def markdown_pages():
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves_to_a_file_and_a_heading(page):
    broken = []
    for link in relative_links(page) + ["#" + a for a in re.findall(r"\]\(#([^)]+)\)",
                                                                    read_text(page))]:
        target, _, anchor = link.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
        if not os.path.exists(path):
            broken.append(link + " (no such file)")
        elif anchor and anchor not in heading_ids(path):
            broken.append(link + " (no such heading)")
    assert not broken, "%s: broken links: %s" % (os.path.relpath(page, ROOT), broken)


def test_readme_points_to_every_docs_page():
    readme_links = {os.path.normpath(link.partition("#")[0]) for link in relative_links(README)}
    pages = {os.path.join("docs", os.path.basename(p))
             for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))}
    assert pages <= readme_links, "README.md has no link to %s" % sorted(pages - readme_links)


# --- the README's commands -------------------------------------------------------------------

def test_make_run_serves_the_demo_page(tmp_path):
    """`make run` as the README says, with the port and folder moved by their env twins."""
    need(shutil.which("make"), "make is not installed")
    env = dict(os.environ, M1_PORT="0", M1_DIR=str(tmp_path / "uploads"))
    proc = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)       # make and its python: one group
    try:
        url = read_url(proc)
        page = requests.get(url + "/", timeout=10)
        assert page.status_code == 200
        assert page.headers["Content-Type"].startswith("text/html")
        assert page.content == read_bytes(os.path.join(ROOT, "static", "index.html"))
    finally:
        stop_group(proc)
        proc.stdout.close()


def read_url(proc):
    """The URL of the server's "serving" line, read straight from the pipe (make echoes the
    command first; a buffered readline could sit on both lines while select waits)."""
    import selectors
    output, deadline = b"", time.monotonic() + START_DEADLINE_S
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(deadline - time.monotonic()):
                break
            block = os.read(proc.stdout.fileno(), 4096)
            if not block:
                break
            output += block
            match = URL_LINE.search(output.decode("utf-8", "replace"))
            if match:
                return match.group(1)
    raise AssertionError("make run did not serve:\n" + output.decode("utf-8", "replace"))


def readme_section(title):
    text = read_text(README)
    start = text.index("\n## %s\n" % title)
    end = text.find("\n## ", start + 1)
    return text[start:end]


def readme_blocks(section, language):
    return re.findall(r"```%s\n(.*?)```" % language, section, re.S)


def test_readme_seed_api_curl_examples_answer_as_the_readme_shows(server, tmp_path):
    """Each ```sh block of "The seed API", run by sh in a folder holding tests/data, with
    the README's URL pointed at a real server."""
    need(shutil.which("curl"), "curl is not installed (the README's examples use it)")
    section = readme_section("The seed API")
    os.makedirs(str(tmp_path / "tests" / "data"))
    shutil.copy(SAMPLE_WEBM, str(tmp_path / "tests" / "data"))
    answers = []
    for block in readme_blocks(section, "sh"):
        script = block.replace("http://127.0.0.1:3001", server.url)
        run = subprocess.run(["sh", "-e", "-c", script], cwd=str(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             timeout=CURL_TIMEOUT_S)
        assert run.returncode == 0, (block, run.stderr.decode())
        assert b"Warning" not in run.stderr, (block, run.stderr.decode())   # curl's, e.g. -F ;
        answers.append(run.stdout.decode())
    shown = [json.loads(block) for block in readme_blocks(section, "json")]
    upload_shown, status_shown, error_shown = shown
    first, last, status = (json.loads(a) for a in answers[:3])
    assert first == upload_shown
    assert last["data"]["status"] == "completed"
    assert set(status["data"]) >= set(status_shown["data"])
    sample = read_bytes(SAMPLE_WEBM)
    for key in ("fileId", "exists", "fileSize", "state", "chunksReceived", "nextChunkIndex",
                "missingChunks", "totalChunks", "mimeType", "url"):
        assert status["data"][key] == status_shown["data"][key], key
    assert status["data"]["fileSize"] == len(sample)
    assert (tmp_path / "head.bin").read_bytes() == sample[:1024]
    if STORAGE == "local":      # the fields come before the file: both chunks go in place
        assert metric(server, "m1_chunks_in_place_total") == 2
    bad = requests.get(server.url + "/api/video/status/bad.id", timeout=10).json()
    assert bad == error_shown
