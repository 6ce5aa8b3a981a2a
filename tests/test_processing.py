"""Video processing (processing.py, SPEC section 5, issue 6) against real ffmpeg and ffprobe.

Black-box tests start the real server, upload the shared 4 s MediaRecorder-style WebM (VP9 +
Opus, no duration, no cues) in chunks, wait for `processing.state`, and then check the
derivatives with ffprobe/ffmpeg themselves and by reading bytes (MP4 boxes, JPEG markers,
Matroska element ids). Tests that need ffmpeg call conftest.need (skip locally, fail in CI).

Under M1_TEST_STORAGE=s3 (`make test-s3`) the same tests run with every server storing in the
bucket: what they read back from storage goes through `srv.storage` (derivatives, the
original) and the helpers below; the few that are about local files only say so and skip.

Slow-on-purpose jobs use M1_TEST_SLOW_TRANSCODE=1, which makes the server's MP4 transcode read
its input at the input's own pace (ffmpeg -re): the 4 s sample then takes at least 4 s of wall
time in the "mp4" stage whatever the machine's speed, so a test that polls for that stage can
act during it. Nothing here asserts on timing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests

from conftest import ROOT, STORAGE, get_status, need, send_chunk, split_chunks, wait_until

sys.path.insert(0, ROOT)
import options  # noqa: E402
import processing  # noqa: E402  (the module under test, for its pure functions)
from chunkstore import ChunkStore  # noqa: E402

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")
WEBM_MIME = "video/webm;codecs=vp9,opus"
SAMPLE_SECONDS = 4.0                 # tests/data/README.md: 4 s, 320x240
SAMPLE_SIZE = (320, 240)
SAMPLE_FPS = 25
DURATION_TOLERANCE_S = 0.2           # the "within 0.2 s of the true length"
PROCESS_DEADLINE_S = 90.0            # generous: the machine is shared
SLOW = {"M1_TEST_SLOW_TRANSCODE": "1"}
EBML_ID = b"\x1a\x45\xdf\xa3"
CLUSTER_ID = b"\x1f\x43\xb6\x75"
CUES_ID = b"\x1c\x53\xbb\x6b"


def need_ffmpeg():
    need(FFMPEG is not None and FFPROBE is not None,
         "ffmpeg/ffprobe not installed (apt-get install ffmpeg; .ci/run installs it)")


def new_id(prefix):
    return "%s_%s" % (prefix, uuid.uuid4().hex[:10])


# ---------------------------------------------------------------------------------------------
# Helpers: upload, wait, inspect media
# ---------------------------------------------------------------------------------------------

def upload(session, srv, file_id, data, chunks=8, mime_type=WEBM_MIME):
    """Send `data` as MediaRecorder would: numbered chunks, the last one `completed`."""
    pieces = split_chunks(data, chunks)
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        reply = send_chunk(session, srv.url, file_id, index, piece,
                           status="completed" if last else "uploading", mime_type=mime_type)
        assert reply.status_code == 200, reply.text
    assert reply.json()["data"]["status"] == "completed"


def status_of(session, srv, file_id):
    reply = get_status(session, srv.url, file_id)
    assert reply.status_code == 200, reply.text
    return reply.json()["data"]


def wait_for_state(session, srv, file_id, states=("done", "failed"),
                   deadline=PROCESS_DEADLINE_S, store_may_be_down=False):
    """Poll the status until processing reaches one of `states`. store_may_be_down: an S3
    store that has just come back may still answer some requests with 500s for a moment
    (a restarted SeaweedFS lists before its volumes serve reads), and the server's answer to
    that is a 503 storage_unavailable, which then means "not yet"."""
    def reached():
        if store_may_be_down:
            reply = get_status(session, srv.url, file_id)
            if reply.status_code == 503 and \
                    reply.json()["error"]["code"] == "storage_unavailable":
                return None
        data = status_of(session, srv, file_id)
        return data if data.get("processing", {}).get("state") in states else None
    try:
        return wait_until(reached, timeout=deadline, interval=0.05,
                          message="%s to reach %s" % (file_id, "/".join(states)))
    except AssertionError:
        raise AssertionError("%s\nlast status: %s\nserver log:\n%s" % (
            file_id, get_status(session, srv.url, file_id).text, srv.log()[-4000:]))


def wait_for_stage(session, srv, file_id, stage):
    def reached():
        data = status_of(session, srv, file_id)
        processing_ = data.get("processing", {})
        assert processing_.get("state") not in ("done", "failed"), data
        return processing_.get("state") == "running" and processing_.get("stage") == stage
    wait_until(reached, timeout=PROCESS_DEADLINE_S, interval=0.05,
               message="%s to run stage %s" % (file_id, stage))


def download(session, srv, url, path=None):
    reply = session.get(srv.url + url, timeout=30)
    assert reply.status_code == 200, (url, reply.status_code, reply.text[:300])
    if path is not None:
        with open(path, "wb") as f:
            f.write(reply.content)
    return reply


def ffprobe(path, *extra):
    out = subprocess.run([FFPROBE, "-v", "error", "-print_format", "json", "-show_format",
                          "-show_streams"] + list(extra) + [str(path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    return json.loads(out.stdout.decode())


def packets(path, *extra):
    out = subprocess.run([FFPROBE, "-v", "error"] + list(extra) + [
        "-show_entries", "packet=stream_index,pts_time,duration_time,flags", "-of", "json",
        str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    return json.loads(out.stdout.decode()).get("packets", [])


def true_duration(path):
    """From the packets themselves: last packet's end minus first packet's start."""
    found = packets(path)
    starts = [float(p["pts_time"]) for p in found]
    ends = [float(p["pts_time"]) + float(p.get("duration_time") or 0) for p in found]
    return max(ends) - min(starts)


MAX_STREAM_SHIFT_S = 0.010           # under a frame: 40 ms video, 20 ms Opus


def assert_same_packets(copied, source):
    """A remux carries exactly the source's packets: same streams, flags and durations, and
    each stream's timestamps shifted by at most one constant. (ffmpeg 5.1's Matroska muxer
    moves the video 7 ms against an Opus track with a pre-skip, whatever -avoid_negative_ts
    says; that is a fraction of a frame, far below what anyone can see.)"""
    assert len(copied) == len(source)
    shifts = {}
    for new, old in zip(sorted(copied, key=_packet_order), sorted(source, key=_packet_order)):
        assert (new["stream_index"], new["flags"], new.get("duration_time")) == \
            (old["stream_index"], old["flags"], old.get("duration_time")), (new, old)
        shifts.setdefault(new["stream_index"], set()).add(
            round(float(new["pts_time"]) - float(old["pts_time"]), 3))
    for stream, found in shifts.items():
        assert len(found) == 1 and abs(found.pop()) <= MAX_STREAM_SHIFT_S, (stream, found)


def _packet_order(packet):
    return packet["stream_index"], float(packet["pts_time"])


def frame_hashes(path, *before_input, frames=None):
    """md5 of each decoded video picture, in order (ffmpeg's framemd5 muxer)."""
    limit = ["-frames:v", str(frames)] if frames else []
    out = subprocess.run([FFMPEG, "-v", "error"] + list(before_input) + [
        "-i", str(path), "-map", "0:v:0"] + limit + ["-f", "framemd5", "-"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    return [line.split(",")[-1].strip() for line in out.stdout.decode().splitlines()
            if not line.startswith("#")]


def codecs(info, kind):
    return [s["codec_name"] for s in info["streams"] if s["codec_type"] == kind]


def video_size(info):
    stream = [s for s in info["streams"] if s["codec_type"] == "video"][0]
    return stream["width"], stream["height"]


def top_level_boxes(path):
    """The ISO BMFF top-level box types in file order, read from the bytes (ISO 14496-12 4.2:
    32-bit size + type; size 1 means a 64-bit size follows; size 0 runs to the end)."""
    names = []
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        offset = 0
        while offset + 8 <= end:
            f.seek(offset)
            size, kind = struct.unpack(">I4s", f.read(8))
            if size == 1:
                size = struct.unpack(">Q", f.read(8))[0]
            elif size == 0:
                size = end - offset
            assert size >= 8, "box %r at %d has size %d" % (kind, offset, size)
            names.append(kind.decode("latin-1"))
            offset += size
        assert offset == end, "boxes do not tile the file"
    return names


def jpeg_size(data):
    """(width, height) from a JPEG's start-of-frame marker (ITU T.81 B.2.2)."""
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9", "not a whole JPEG"
    at = 2
    while at < len(data):
        assert data[at] == 0xFF, "bad marker at %d" % at
        marker = data[at + 1]
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height
        at += 2 + length
    raise AssertionError("no start-of-frame marker")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def assert_original_untouched(session, srv, file_id, data, ext="webm"):
    assert sha256(srv.storage.media(file_id, ext) or b"") == sha256(data), \
        "the original changed in storage"
    assert sha256(download(session, srv, "/uploads/%s.%s" % (file_id, ext)).content) == \
        sha256(data)


def our_programs(upload_dir):
    """Live ffmpeg/ffprobe processes working on files under `upload_dir` (Linux /proc)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                argv = f.read().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        command = " ".join(argv)
        # the program itself, not any "ff" in the line (an S3 prefix in hex may have one)
        if os.path.basename(argv[0]).startswith("ff") and str(upload_dir) in command:
            found.append((int(name), command))
    return found


def part_files(upload_dir):
    """Part files left anywhere in the folder (jobs write theirs in temp/.processing/)."""
    found = []
    for directory, _, names in os.walk(str(upload_dir)):
        found.extend(os.path.join(directory, n) for n in names if n.endswith(".part"))
    return found


def in_bucket(srv):
    return hasattr(srv.storage, "client")          # conftest.BucketStorageView


def _derived_prefix(srv, file_id):
    manifest = srv.storage.manifest(file_id)
    if manifest is None:
        return None
    return "%s/uploads/%s/%s/derived/" % (srv.storage.prefix, file_id, manifest["generation"])


def stored_derivatives(srv, file_id):
    """Names kept as derivatives of `file_id`: in derived/<fileId>/, or in the bucket under
    the upload's generation (s3store.py's layout)."""
    if not in_bucket(srv):
        folder = os.path.join(srv.upload_dir, "derived", file_id)
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    prefix = _derived_prefix(srv, file_id)
    if prefix is None:
        return []
    return sorted(info.key[len(prefix):] for info in srv.storage.client.iter_objects(prefix))


def store_stray_derivative(srv, file_id, name, data):
    """Put a file that no job made beside the derivatives (the route must not serve it)."""
    if not in_bucket(srv):
        with open(os.path.join(srv.upload_dir, "derived", file_id, name), "wb") as f:
            f.write(data)
    else:
        srv.storage.client.put_object(_derived_prefix(srv, file_id) + name, data)


def queue_exists(srv):
    """Whether processing ever opened its queue for this server's uploads."""
    if not in_bucket(srv):
        return os.path.exists(os.path.join(srv.upload_dir, "jobs.sqlite3"))
    return any(srv.storage.client.iter_objects(srv.storage.prefix + "/processing.json"))


def same_uploads(server_factory, srv, **kw):
    """Another server on `srv`'s uploads: its folder, and in S3 mode its bucket prefix."""
    if not in_bucket(srv):
        return server_factory(upload_dir=srv.upload_dir, **kw)
    at = srv.args.index("--storage")
    later = server_factory(upload_dir=srv.upload_dir, args=srv.args[at:at + 4] +
                           list(kw.pop("args", [])), env=dict(srv.env, **kw.pop("env", {})),
                           **kw)
    later.storage = srv.storage
    return later


def corrupt_webm(sample):
    """A valid EBML signature followed by garbage: passes the upload's signature check."""
    return EBML_ID + bytes((i * 7919 + 13) % 251 for i in range(60000))


# ---------------------------------------------------------------------------------------------
# Remux, poster, MP4
# ---------------------------------------------------------------------------------------------

def test_mediarecorder_webm_gets_a_seekable_remux_with_its_true_duration_and_a_poster(
        server_factory, session, sample_webm, tmp_path):
    need_ffmpeg()
    srv = server_factory()                                    # default: --processing remux
    file_id = new_id("remux")
    upload(session, srv, file_id, sample_webm)
    data = wait_for_state(session, srv, file_id)
    assert data["processing"]["state"] == "done", data
    assert data["processing"]["progress"] == 1.0

    original = tmp_path / "original.webm"
    original.write_bytes(sample_webm)
    real = true_duration(original)
    assert abs(real - SAMPLE_SECONDS) <= DURATION_TOLERANCE_S
    assert "duration" not in ffprobe(original)["format"], "the sample should have no duration"
    video = data["video"]
    assert abs(video["durationSeconds"] - real) <= DURATION_TOLERANCE_S, video
    assert (video["width"], video["height"]) == SAMPLE_SIZE
    assert (video["videoCodec"], video["audioCodec"]) == ("vp9", "opus")
    assert video["bitRate"] > 0

    urls = data["derivatives"]
    assert set(urls) == {"remux", "poster"}
    assert urls["remux"] == "/uploads/derived/%s/remux.webm" % file_id
    assert data["playbackUrl"] == urls["remux"]

    remux = tmp_path / "remux.webm"
    reply = download(session, srv, urls["remux"], remux)
    assert reply.headers["Content-Type"] == "video/webm"
    info = ffprobe(remux)
    assert abs(float(info["format"]["duration"]) - real) <= DURATION_TOLERANCE_S, info["format"]
    assert codecs(info, "video") == ["vp9"] and codecs(info, "audio") == ["opus"]
    body = remux.read_bytes()
    assert body[:4] == EBML_ID
    assert body.rfind(CUES_ID) > body.find(CLUSTER_ID) > 0, "no Cues element after the clusters"
    assert_same_packets(packets(remux), packets(original))

    # It seeks: `-ss 2` on the remux decodes the picture that a full decode shows at 2 s.
    seeked = frame_hashes(remux, "-ss", "2", frames=1)
    everything = frame_hashes(original)
    assert len(seeked) == 1 and seeked[0] in everything
    assert abs(everything.index(seeked[0]) / SAMPLE_FPS - 2.0) <= 1.0 / SAMPLE_FPS

    poster = download(session, srv, urls["poster"])
    assert poster.headers["Content-Type"] == "image/jpeg"
    assert jpeg_size(poster.content) == SAMPLE_SIZE
    assert_original_untouched(session, srv, file_id, sample_webm)
    assert part_files(srv.upload_dir) == []


@pytest.mark.parametrize("max_height, expected", [(240, (320, 240)), (120, (160, 120))],
                         ids=["max-height-at-the-video", "max-height-below-it"])
def test_mp4_mode_makes_an_h264_aac_mp4_with_moov_before_mdat_within_max_height(
        server_factory, session, sample_webm, tmp_path, max_height, expected):
    need_ffmpeg()
    srv = server_factory(args=["--processing", "mp4", "--max-height", str(max_height)])
    file_id = new_id("mp4")
    upload(session, srv, file_id, sample_webm)
    data = wait_for_state(session, srv, file_id)
    assert data["processing"]["state"] == "done", data
    urls = data["derivatives"]
    assert set(urls) == {"remux", "poster", "mp4"}
    assert data["playbackUrl"] == urls["mp4"] == "/uploads/derived/%s/video.mp4" % file_id

    mp4 = tmp_path / "video.mp4"
    assert download(session, srv, urls["mp4"], mp4).headers["Content-Type"] == "video/mp4"
    info = ffprobe(mp4)
    assert codecs(info, "video") == ["h264"] and codecs(info, "audio") == ["aac"]
    assert video_size(info) == expected
    assert abs(float(info["format"]["duration"]) - SAMPLE_SECONDS) <= DURATION_TOLERANCE_S
    boxes = top_level_boxes(mp4)
    assert "moov" in boxes and "mdat" in boxes and boxes.index("moov") < boxes.index("mdat"), \
        boxes
    decoded = subprocess.run([FFMPEG, "-v", "error", "-i", str(mp4), "-f", "null", "-"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert decoded.returncode == 0 and not decoded.stderr.strip(), decoded.stderr.decode()
    assert jpeg_size(download(session, srv, urls["poster"]).content) == expected
    assert (data["video"]["width"], data["video"]["height"]) == SAMPLE_SIZE  # the upload's own
    assert_original_untouched(session, srv, file_id, sample_webm)


def test_fragmented_mp4_upload_is_remuxed_into_a_faststart_mp4(server_factory, session,
                                                                sample_mp4, tmp_path):
    need_ffmpeg()
    srv = server_factory()
    file_id = new_id("safari")
    upload(session, srv, file_id, sample_mp4, chunks=4, mime_type="video/mp4")
    data = wait_for_state(session, srv, file_id)
    assert data["processing"]["state"] == "done", data
    assert data["derivatives"]["remux"] == "/uploads/derived/%s/remux.mp4" % file_id
    assert (data["video"]["videoCodec"], data["video"]["audioCodec"]) == ("h264", "aac")
    remux = tmp_path / "remux.mp4"
    download(session, srv, data["derivatives"]["remux"], remux)
    original = tmp_path / "original.mp4"
    original.write_bytes(sample_mp4)
    assert "moof" in top_level_boxes(original)
    boxes = top_level_boxes(remux)
    assert "moof" not in boxes and boxes.index("moov") < boxes.index("mdat"), boxes
    info = ffprobe(remux)
    assert abs(float(info["format"]["duration"]) - true_duration(original)) <= \
        DURATION_TOLERANCE_S
    assert_original_untouched(session, srv, file_id, sample_mp4, ext="mp4")


def test_probe_mode_measures_a_live_webm_and_writes_no_derivatives(server_factory, session,
                                                                    sample_webm):
    need_ffmpeg()
    srv = server_factory(args=["--processing", "probe"])
    file_id = new_id("probe")
    upload(session, srv, file_id, sample_webm)
    data = wait_for_state(session, srv, file_id)
    assert data["processing"]["state"] == "done", data
    assert abs(data["video"]["durationSeconds"] - SAMPLE_SECONDS) <= DURATION_TOLERANCE_S
    assert (data["video"]["width"], data["video"]["height"]) == SAMPLE_SIZE
    assert "derivatives" not in data and "playbackUrl" not in data
    assert session.get(srv.url + "/uploads/derived/%s/remux.webm" % file_id).status_code == 404
    assert stored_derivatives(srv, file_id) == []


def test_processing_off_adds_nothing_and_earlier_uploads_stay_unprocessed(server_factory,
                                                                          session, sample_webm):
    srv = server_factory(args=["--processing", "off"])
    file_id = new_id("off")
    upload(session, srv, file_id, sample_webm)
    data = status_of(session, srv, file_id)
    assert "processing" not in data and "video" not in data
    assert not queue_exists(srv)
    assert not os.path.exists(os.path.join(srv.upload_dir, "derived"))
    assert stored_derivatives(srv, file_id) == []
    srv.stop()
    # Turned on later, processing leaves uploads that completed before its queue existed alone.
    later = same_uploads(server_factory, srv)
    data = status_of(session, later, file_id)
    assert "processing" not in data and "video" not in data
    assert_original_untouched(session, later, file_id, sample_webm)


# ---------------------------------------------------------------------------------------------
# Derivatives are served like the original, and nothing else is
# ---------------------------------------------------------------------------------------------

def test_derivatives_are_served_with_range_and_only_by_their_fixed_names(server_factory,
                                                                         session, sample_webm):
    need_ffmpeg()
    srv = server_factory()
    file_id = new_id("serve")
    upload(session, srv, file_id, sample_webm)
    data = wait_for_state(session, srv, file_id)
    url = srv.url + data["derivatives"]["remux"]
    whole = session.get(url).content
    part = session.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole[100:200]
    assert part.headers["Content-Range"] == "bytes 100-199/%d" % len(whole)
    head = session.head(url)
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(whole))
    assert head.headers["Accept-Ranges"] == "bytes"
    assert session.get(url, headers={"If-None-Match": head.headers["ETag"]}).status_code == 304
    past = session.get(url, headers={"Range": "bytes=%d-" % len(whole)})
    assert past.status_code == 416 and past.json()["error"]["code"] == "range_not_satisfiable"

    store_stray_derivative(srv, file_id, "notes.txt", b"not a derivative")
    for path in ("/uploads/derived/%s/video.mp4" % file_id,          # not made in remux mode
                 "/uploads/derived/%s/notes.txt" % file_id,          # not a derivative name
                 "/uploads/derived/%s/..%%2F%s.webm" % (file_id, file_id),
                 "/uploads/derived/..%%2F%s/remux.webm" % file_id,
                 "/uploads/derived/%%2E%%2E/m1.sqlite3",
                 "/uploads/derived/%s/remux.webm" % new_id("other"),
                 "/uploads/derived/%s/%%2Eremux.webm.x.part" % file_id,
                 "/uploads/derived/%s/" % file_id):
        reply = session.get(srv.url + path)
        assert reply.status_code == 404, (path, reply.status_code)
        assert reply.json()["success"] is False


# ---------------------------------------------------------------------------------------------
# Crashes, shutdown, limits, the worker pool
# ---------------------------------------------------------------------------------------------

def make_live_webm(path, seconds, size="160x120"):
    """A MediaRecorder-like WebM (VP8 + Opus, live: no duration, no cues) from ffmpeg's
    test sources."""
    made = subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i",
                           "testsrc2=size=%s:rate=25" % size, "-f", "lavfi", "-i",
                           "sine=frequency=440:sample_rate=48000", "-t", str(seconds),
                           "-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8",
                           "-b:v", "300k", "-c:a", "libopus", "-live", "1", "-f", "webm",
                           str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=120)
    assert made.returncode == 0, made.stderr.decode()
    return path.read_bytes()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc/<pid>/cmdline (Linux)")
def test_a_program_left_running_by_a_crash_is_killed_only_if_it_is_still_ours(tmp_path):
    """processing._kill_orphan, on real processes: the pid a crashed server recorded is
    killed when its command line is still the program and names the job's file; a pid
    reused by anything else is left alone."""
    marker = str(tmp_path / "crash_job.webm")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    ours = subprocess.Popen(sleeper + [marker], start_new_session=True)
    other = subprocess.Popen(sleeper + ["not-the-job"], start_new_session=True)
    try:
        processing._kill_orphan(other.pid, marker, (sys.executable,))   # reused pid
        processing._kill_orphan(ours.pid, marker, ("/usr/bin/ffmpeg",))  # another program
        assert ours.poll() is None and other.poll() is None
        processing._kill_orphan(ours.pid, marker, ("", sys.executable))
        assert ours.wait(10) == -9
        assert other.poll() is None
    finally:
        for proc in (ours, other):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def test_server_killed_during_a_transcode_runs_the_job_again_after_restart(
        server_factory, session, tmp_path):
    need_ffmpeg()
    # 20 s of video transcoded at its own pace, so the crash comes in the middle of it. The
    # orphaned ffmpeg dies by itself at its next -progress write (SIGPIPE: its reader is gone),
    # often before the new server looks, so whether the server had to kill it is not asserted
    # here: test_a_program_left_running_by_a_crash_is_killed_only_if_it_is_still_ours does.
    recording = make_live_webm(tmp_path / "long.webm", 20)
    srv = server_factory(args=["--processing", "mp4"], env=SLOW)
    file_id = new_id("crash")
    upload(session, srv, file_id, recording)
    wait_for_stage(session, srv, file_id, "mp4")
    srv.kill()                                            # kill -9 in the middle of ffmpeg
    if os.path.isdir("/proc"):
        assert our_programs(srv.upload_dir), "the transcode should outlive the kill -9"
    srv.start(port=srv.port, extra_env={"M1_TEST_SLOW_TRANSCODE": "0"})
    assert "interrupted by a crash; queued again" in srv.log()
    data = wait_for_state(session, srv, file_id)
    assert data["processing"]["state"] == "done", data
    mp4 = tmp_path / "video.mp4"
    download(session, srv, data["derivatives"]["mp4"], mp4)
    info = ffprobe(mp4)
    assert codecs(info, "video") == ["h264"] and codecs(info, "audio") == ["aac"]
    assert abs(float(info["format"]["duration"]) - 20.0) <= DURATION_TOLERANCE_S
    assert_original_untouched(session, srv, file_id, recording)
    assert part_files(srv.upload_dir) == []
    if os.path.isdir("/proc"):
        assert our_programs(srv.upload_dir) == []


def test_sigterm_stops_ffmpeg_and_the_job_finishes_after_the_next_start(
        server_factory, session, sample_webm):
    need_ffmpeg()
    srv = server_factory(args=["--processing", "mp4"], env=SLOW)
    file_id = new_id("term")
    upload(session, srv, file_id, sample_webm)
    wait_for_stage(session, srv, file_id, "mp4")
    assert srv.stop() == 0
    assert "will run again at the next start" in srv.log()
    if os.path.isdir("/proc"):
        assert our_programs(srv.upload_dir) == []
    assert part_files(srv.upload_dir) == []
    srv.start(port=srv.port)
    data = wait_for_state(session, srv, file_id)
    assert data["processing"]["state"] == "done", data
    assert "interrupted by a crash" not in srv.log()      # a clean stop is not a crash
    assert_original_untouched(session, srv, file_id, sample_webm)


def test_job_past_its_time_limit_fails_and_its_ffmpeg_is_stopped(server_factory, session,
                                                                 sample_webm):
    need_ffmpeg()
    srv = server_factory(args=["--processing", "mp4", "--processing-timeout", "1.5"],
                         env=SLOW)                        # the transcode alone takes >= 4 s
    file_id = new_id("slow")
    upload(session, srv, file_id, sample_webm)
    data = wait_for_state(session, srv, file_id)
    assert data["processing"]["state"] == "failed", data
    assert "timed out after 1.5s" in data["processing"]["error"], data
    if os.path.isdir("/proc"):
        assert our_programs(srv.upload_dir) == []
    assert part_files(srv.upload_dir) == []
    assert_original_untouched(session, srv, file_id, sample_webm)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_worker_pool_runs_at_most_processing_workers_jobs_at_once(
        server_factory, session, sample_webm, workers):
    need_ffmpeg()
    srv = server_factory(args=["--processing", "mp4", "--processing-workers", str(workers)],
                         env=SLOW)
    ids = [new_id("pool%d" % n) for n in range(2)]
    for file_id in ids:
        upload(session, srv, file_id, sample_webm)

    def all_finished():
        data = [status_of(session, srv, f)["processing"] for f in ids]
        return all(p["state"] in ("done", "failed") for p in data) and data
    # Two status reads are not one snapshot (a job may end and the next start between them),
    # so the overlap is judged afterwards from each job's own start and finish times.
    jobs = wait_until(all_finished, timeout=PROCESS_DEADLINE_S, interval=0.05,
                      message="both jobs to finish")
    assert [p["state"] for p in jobs] == ["done", "done"]
    spans = sorted((p["startedAt"], p["finishedAt"]) for p in jobs)
    overlapped = spans[1][0] < spans[0][1]      # ISO 8601 UTC strings compare as times
    assert overlapped == (workers == 2), spans  # each job transcodes >= 4 s


def test_uploads_completed_while_ffmpeg_was_missing_are_processed_after_a_restart(
        server_factory, session, sample_webm, tmp_path):
    need_ffmpeg()
    srv = server_factory(args=["--ffmpeg", str(tmp_path / "no-ffmpeg-here")])
    file_id = new_id("later")
    upload(session, srv, file_id, sample_webm)
    assert status_of(session, srv, file_id)["processing"]["state"] == "unavailable"
    srv.stop()
    found = same_uploads(server_factory, srv)             # ffmpeg on PATH this time
    data = wait_for_state(session, found, file_id)
    assert data["processing"]["state"] == "done", data


# ---------------------------------------------------------------------------------------------
# Without ffmpeg, and with input that is not video
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["path-without-ffmpeg", "missing-ffmpeg-flag"])
def test_without_ffmpeg_uploads_work_and_status_says_unavailable(server_factory, session,
                                                                 sample_webm, tmp_path, how):
    if how == "path-without-ffmpeg":
        empty = tmp_path / "empty-bin"
        empty.mkdir()
        srv = server_factory(env={"PATH": str(empty)})
    else:
        srv = server_factory(args=["--ffmpeg", str(tmp_path / "nowhere" / "ffmpeg")])
    file_id = new_id("noff")
    upload(session, srv, file_id, sample_webm)
    data = status_of(session, srv, file_id)
    assert data["state"] == "completed" and data["fileSize"] == len(sample_webm)
    assert data["processing"]["state"] == "unavailable", data
    assert "ffmpeg not found" in data["processing"]["error"]
    assert "derivatives" not in data
    assert_original_untouched(session, srv, file_id, sample_webm)
    assert "processing unavailable: ffmpeg not found" in srv.log()


@pytest.mark.parametrize("kind", ["ebml-then-garbage", "truncated-header"])
def test_corrupt_upload_ends_failed_with_ffmpegs_reason_and_harms_nothing_else(
        server_factory, session, sample_webm, kind):
    need_ffmpeg()
    srv = server_factory(args=["--processing", "mp4"])
    bad = corrupt_webm(sample_webm) if kind == "ebml-then-garbage" else sample_webm[:300]
    bad_id, good_id = new_id("bad"), new_id("good")
    upload(session, srv, bad_id, bad, chunks=3)
    upload(session, srv, good_id, sample_webm)
    data = wait_for_state(session, srv, bad_id)
    assert data["processing"]["state"] == "failed", data
    error = data["processing"]["error"]
    assert error.startswith("ffprobe failed"), error
    if kind == "ebml-then-garbage":
        assert "Invalid data found when processing input" in error, error
    assert srv.upload_dir not in error, "server paths must not reach clients"
    assert "derivatives" not in data and "playbackUrl" not in data
    assert session.get(srv.url + "/uploads/derived/%s/remux.webm" % bad_id).status_code == 404
    assert_original_untouched(session, srv, bad_id, bad)
    assert wait_for_state(session, srv, good_id)["processing"]["state"] == "done"
    assert "processing %s failed" % bad_id in srv.log()


def test_a_newer_queue_schema_disables_processing_but_not_uploads(server_factory, session,
                                                                  sample_webm, tmp_path):
    need_ffmpeg()
    if STORAGE == "s3":
        pytest.skip("jobs.sqlite3 is local mode's queue; in S3 mode jobs live in the bucket")
    directory = tmp_path / "future"
    directory.mkdir()
    db = sqlite3.connect(str(directory / "jobs.sqlite3"))
    db.execute("PRAGMA user_version=%d" % (processing.SCHEMA_VERSION + 1))
    db.close()
    srv = server_factory(upload_dir=directory)
    file_id = new_id("future")
    upload(session, srv, file_id, sample_webm)
    data = status_of(session, srv, file_id)
    assert data["processing"]["state"] == "unavailable"
    assert "schema" in data["processing"]["error"]


@pytest.mark.parametrize("args", [["--mp4-crf", "52"], ["--mp4-crf", "-1"],
                                  ["--max-height", "15"], ["--processing", "gif"],
                                  ["--processing-workers", "0"],
                                  ["--processing-timeout", "0"]])
def test_processing_flags_refuse_values_past_their_edges(args, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "m1server.py"), "--port", "0",
                           "--dir", str(tmp_path)] + args, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=30)
    assert proc.returncode == 2, proc.stderr.decode()
    assert args[0] in proc.stderr.decode()


def test_processing_flags_accept_values_at_their_edges(server_factory, session):
    srv = server_factory(args=["--mp4-crf", "0", "--max-height", "16",
                               "--processing-workers", "1", "--processing", "mp4"])
    assert session.get(srv.url + "/healthz").status_code == 200
    srv = server_factory(args=["--mp4-crf", "51"], env={"M1_PROCESSING": "probe",
                                                        "M1_MAX_HEIGHT": "16"})
    assert session.get(srv.url + "/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------
# The events hook, in-process (what the events bus will connect to)
# ---------------------------------------------------------------------------------------------

def _settings(mode="remux"):
    """What Processor reads from m1server's Config."""
    settings = type("Settings", (), {})()
    settings.processing = mode
    settings.ffmpeg, settings.ffprobe = "ffmpeg", "ffprobe"
    settings.max_height = options.DEFAULT_MAX_HEIGHT
    settings.mp4_crf = options.DEFAULT_MP4_CRF
    settings.processing_timeout = 60.0
    settings.processing_workers = 1
    return settings


def _store_upload(store, file_id, data, chunks=4):
    pieces = split_chunks(data, chunks)
    for index, piece in enumerate(pieces):
        path, f = store.new_part_file()
        with f:
            f.write(piece)
        store.put_chunk(file_id, index, path, len(piece), is_last=index == len(pieces) - 1,
                        mime_type=WEBM_MIME)


def test_listeners_get_processing_progress_then_ready_or_failed(tmp_path, sample_webm):
    need_ffmpeg()
    store = ChunkStore(str(tmp_path / "uploads"))
    processor = processing.Processor(_settings(), store)
    events = []
    finished = threading.Event()

    def listen(event):
        events.append(event)
        if event["type"] in ("ready", "failed") and \
                len([e for e in events if e["type"] in ("ready", "failed")]) == 2:
            finished.set()
    processor.add_listener(listen)
    processor.add_listener(lambda event: 1 / 0)          # a broken listener harms nothing
    processor.start()
    try:
        _store_upload(store, "good", sample_webm)
        _store_upload(store, "bad", corrupt_webm(sample_webm), chunks=2)
        assert finished.wait(PROCESS_DEADLINE_S), events
    finally:
        processor.stop()
        processor.close()
        store.close()
    good = [e for e in events if e["fileId"] == "good"]
    progress = [e["progress"] for e in good if e["type"] == "processing"]
    assert progress and progress == sorted(progress) and 0 <= progress[0] and \
        progress[-1] == 1.0, progress
    assert set(e["stage"] for e in good if e["type"] == "processing") <= {"probe", "remux",
                                                                          "poster"}
    ready = good[-1]
    assert ready["type"] == "ready"
    assert ready["playbackUrl"] == "/uploads/derived/good/remux.webm"
    assert ready["derivatives"] == {"remux": "/uploads/derived/good/remux.webm",
                                    "poster": "/uploads/derived/good/poster.jpg"}
    assert abs(ready["video"]["durationSeconds"] - SAMPLE_SECONDS) <= DURATION_TOLERANCE_S
    bad = [e for e in events if e["fileId"] == "bad" and e["type"] == "failed"]
    assert len(bad) == 1 and "Invalid data found" in bad[0]["reason"]


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext, codec_names, expected", [
    ("webm", ["vp8", "opus"], ("remux.webm", "webm")),
    ("webm", ["vp9", "vorbis"], ("remux.webm", "webm")),
    ("mkv", ["av1", "opus"], ("remux.webm", "webm")),
    ("webm", ["h264", "opus"], ("remux.mkv", "matroska")),     # Chrome's x-matroska;avc1
    ("mkv", ["h264", "pcm_s16le"], ("remux.mkv", "matroska")),
    ("mp4", ["h264", "aac"], ("remux.mp4", "mp4")),
    ("mov", ["h264", "aac"], ("remux.mov", "mov")),
    ("ogg", ["theora", "vorbis"], ("remux.ogg", "ogg")),
])
def test_remux_keeps_a_container_that_can_hold_the_codecs(ext, codec_names, expected):
    info = {"streams": [{"codec_type": "video" if n in ("vp8", "vp9", "av1", "h264", "theora")
                         else "audio", "codec_name": n} for n in codec_names]}
    name, container = processing.remux_target(ext, info)
    assert (name, container) == expected
    assert name in processing.DERIVATIVE_TYPES


def test_video_facts_swap_sides_of_an_upright_phone_video_and_fill_the_bit_rate():
    info = {"format": {"duration": "10.0"}, "streams": [
        {"codec_type": "video", "codec_name": "h264", "width": 1920, "height": 1080,
         "side_data_list": [{"rotation": -90}]},
        {"codec_type": "audio", "codec_name": "aac"}]}
    facts = processing.video_facts(info, 1250000)
    assert facts == {"durationSeconds": 10.0, "width": 1080, "height": 1920,
                     "videoCodec": "h264", "audioCodec": "aac", "bitRate": 1000000}
    live = processing.video_facts({"format": {}, "streams": [
        {"codec_type": "video", "codec_name": "vp8", "width": 640, "height": 480}]}, 1000)
    assert live["durationSeconds"] is None and live["bitRate"] is None
    assert live["audioCodec"] is None


def test_progress_lines_and_stderr_are_read_safely():
    seen = []
    progress = processing._Progress(lambda p: seen.append((p.out_time_s, p.total_size)))
    for line in (b"out_time_us=N/A\n", b"total_size=N/A\n", b"progress=continue\n",
                 b"out_time_us=-5000\n", b"progress=continue\n",
                 b"out_time_us=2500000\n", b"total_size=1024\n", b"progress=end\n"):
        progress.feed(line)
    assert seen == [(None, None), (0.0, None), (2.5, 1024)]
    text = processing._clean_stderr(["/srv/up/derived/x/.remux.webm.1.part: bad\x1b[0m",
                                     "/srv/up/x.webm: Invalid data"],
                                    ["/srv/up/derived/x", "/srv/up"])
    assert text == ".remux.webm.1.part: bad?[0m | x.webm: Invalid data"
