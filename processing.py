"""processing.py - after an upload completes: probe it, make it seekable, a poster, an MP4.

MediaRecorder's WebM has no duration and no cues, so players show no length and cannot seek,
and Safari cannot play VP8/VP9 at all. Once an upload is complete (the store's "completed"
event, sent after its sha256 is known), a background worker drives the `ffmpeg` and `ffprobe`
programs (subprocess, no Python packages) through the steps `--processing` asks for
(SPEC section 5):

    probe   ffprobe: duration, width, height, codecs, bit rate (a live WebM has no duration in
            its header, so it is measured by reading every packet: ffmpeg -c copy -f null)
    remux   + a seekable copy without re-encoding (`-c copy`) with duration and cues, in
            uploads/derived/<fileId>/remux.<ext> (WebM stays WebM; Matroska with H.264 becomes
            .mkv; fragmented MP4 becomes a plain MP4 with `+faststart`), and poster.jpg, a
            frame near the start; the default: cheap (disk-bound), and every upload seeks
    mp4     + video.mp4: H.264/AAC, `+faststart`, at most --max-height lines, quality
            --mp4-crf, for Safari and for size (CPU-bound: opt in on small machines)

It goes through the store's interface only, so the same code runs on a local folder and on
S3 (chunkstore.ChunkStore, s3store.S3Store): `store.media_file(upload)` gives a local file
holding the original (S3: a download into the temp dir), every program writes into a work
folder of its own under the store's temp dir, and the finished derivatives are handed over
with `store.put_derivative` (local: an fsynced rename into uploads/derived/<fileId>/; S3: a
PUT under the upload's generation) and served with `store.open_derivative` + send_media.

Where jobs live is chosen once, by what the store offers (open_queue): a store that can
change a job by compare-and-swap (S3Store.change_job) gets a SharedJobQueue, every other a
local JobQueue in SQLite. Both have the same methods; nothing else here knows which it has.

What it guarantees:
  * The original upload is only ever read; every derivative is written under a fixed name
    (DERIVATIVE_TYPES), first as a temporary `.<name>.<token>.part` in the job's work folder,
    and handed to the store only once all of the job's outputs are made, so a derivative that
    is served is whole; it is served only when its job is done and names it.
  * Local mode: jobs live in SQLite (uploads/jobs.sqlite3), so a job queued or running when
    the server crashed runs again after the restart; an ffmpeg orphaned by the crash is
    recognised by its pid and command line and killed first.
  * S3 mode: jobs live in the bucket (SharedJobQueue: a field of the upload's manifest plus a
    marker object), shared by every node: status agrees on all of them, one node claims each
    job (compare-and-swap), renews a lease (JOB_LEASE_S) while it runs, and a job whose node
    died is taken over by another once the lease has run out (by the same node at once when
    it restarts). A duplicate run after a race writes the same derivatives again: harmless.
  * Either way, a job cut short by MAX_INTERRUPTIONS crashes in a row is failed rather than
    retried for ever, and an upload that completed while the server was down between its
    sha256 and its job is found again at start-up (backfill).
  * At most --processing-workers jobs run at once per server, each within
    --processing-timeout seconds, its programs run under `nice` (below-normal priority on
    Windows) in their own session, and on shutdown or time-out the running ffmpeg is
    terminated, then killed after KILL_GRACE_S. A clean stop queues its job again.
  * ffmpeg and ffprobe open every input with the demuxer its media signature names (matroska,
    mov or ogg) and the file protocol only (input_args): an upload never chooses how it is
    read, and one without a signature (--allow-any-content) fails its job unprocessed.
  * A failure is recorded with the last lines ffmpeg wrote to stderr (server paths removed),
    shown in status as processing.error; input that is not really video fails that one job.
  * Without ffmpeg/ffprobe (not on PATH, or a --ffmpeg that does not exist) the server works
    exactly as before and status says processing.state "unavailable"; jobs are still queued,
    and run after a restart that finds ffmpeg (or, in S3 mode, on a node that has it).

What it does not do: it never changes the original, never re-encodes in `remux` mode, and does
not process uploads that completed before its queue (jobs.sqlite3, or the bucket's
processing.json) was first created. Nodes sharing a bucket should run the same --processing
flags: whichever node claims a job runs it its way. Leases are absolute times, so the nodes'
clocks must agree to well within JOB_LEASE_S (NTP does). Progress events are sent by the node
running the job; other nodes see progress in status only as of the last lease renewal.

Why a file of its own (jobs.sqlite3) rather than a table in m1.sqlite3: the ledger is the
uploads' crash journal, committed with synchronous=FULL on every chunk; job writes must never
queue behind (or delay) a chunk acknowledgement, and the queue versions its own schema with
its own PRAGMA user_version. Everything in it can be rebuilt by processing again, so it
commits with synchronous=NORMAL: a commit lost to power failure only makes a job run again.

Events for listeners (add_listener; the events bus connects here), sent from worker threads:
  {"type": "processing", "fileId", "progress": 0..1, "stage": "probe"|"remux"|"poster"|"mp4"}
  {"type": "ready", "fileId", "video": {...}, "derivatives": {kind: url}, "playbackUrl"}
  {"type": "failed", "fileId", "reason"}
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import uuid

import localdisk
import serverlog
import storage
from apierror import ApiError
from options import DEFAULT_FFPROBE

log = serverlog.Logger("m1server.processing")

# ---------------------------------------------------------------------------------------------
# Settings (the flags' defaults and parsers are in options.py; these are not flags)
# ---------------------------------------------------------------------------------------------

MP4_PRESET = "veryfast"                  # x264 speed/size trade-off for small machines
MP4_AUDIO_BITRATE = "128k"
POSTER_AT_S = 1.0                        # poster frame: 1 s in, or a quarter of a short video
POSTER_JPEG_QUALITY = "3"                # ffmpeg -q:v for mjpeg: 2 best .. 31 worst
NICE_INCREMENT = 10
KILL_GRACE_S = 3.0                       # SIGTERM -> SIGKILL for an ffmpeg being stopped
STOP_JOIN_S = 10.0                       # how long shutdown waits for a worker to let go
IDLE_POLL_S = 5.0                        # a worker re-reads the queue this often when idle
MAX_INTERRUPTIONS = 3                    # crashes during one job before it is failed
STDERR_TAIL_LINES = 8                    # ffmpeg's last stderr lines kept for the failure
MAX_ERROR_CHARS = 1000
PROGRESS_EVENT_INTERVAL_S = 0.5          # at most two "processing" events a second per job
JOBS_DB_NAME = "jobs.sqlite3"
DERIVED_DIR_NAME = "derived"
WORK_DIR_NAME = ".processing"            # in the store's temp dir: one folder per running job
JOB_LEASE_S = 60.0                       # shared queue: a job whose node stopped renewing its
                                         # lease this long is taken over (M1_TEST_PROCESSING_LEASE)
LEASE_RENEW_FRACTION = 1.0 / 3           # renewed every third of the lease while ffmpeg runs
NODE_ID_NAME = ".processing-node"        # in --dir: this node's id in the shared queue
PIDS_DIR_NAME = ".processing-pids"       # in --dir: the programs this node runs (shared queue)
SCHEMA_VERSION = 1
DB_BUSY_TIMEOUT_S = 30.0

# The only names ever served from uploads/derived/<fileId>/, with their content types.
DERIVATIVE_TYPES = {
    "remux.webm": "video/webm", "remux.mkv": "video/x-matroska", "remux.mp4": "video/mp4",
    "remux.mov": "video/quicktime", "remux.ogg": "video/ogg",
    "poster.jpg": "image/jpeg", "video.mp4": "video/mp4",
}
# Codecs a WebM may hold (Matroska with anything else stays Matroska).
WEBM_CODECS = frozenset(["vp8", "vp9", "av1", "opus", "vorbis"])
# How far each step moves processing.progress, per mode (each mode's weights sum to 1).
STAGE_WEIGHTS = {
    "probe": (("probe", 0.1), ("scan", 0.9)),
    "remux": (("probe", 0.05), ("remux", 0.85), ("poster", 0.1)),
    "mp4": (("probe", 0.02), ("remux", 0.13), ("poster", 0.05), ("mp4", 0.8)),
}
BEST_PLAYBACK = ("mp4", "remux")         # the derivative a player should prefer, in order


# ---------------------------------------------------------------------------------------------
# Routes: GET/HEAD /uploads/derived/<fileId>/<name>, with Range like the original
# ---------------------------------------------------------------------------------------------

def routes(processor):
    def get_derivative(handler, file_id, name):
        media = processor.open_derivative(file_id, name)
        if media is None:
            raise ApiError(404, "not_found", "no such derivative")
        handler.send_media(media, DERIVATIVE_TYPES[name])

    return ((r"/uploads/derived/([^/]+)/([^/]+)", {"GET": get_derivative,
                                                  "HEAD": get_derivative}),)


def derivative_url(file_id, name):
    return "/uploads/%s/%s/%s" % (DERIVED_DIR_NAME, file_id, name)


# ---------------------------------------------------------------------------------------------
# The processor: queue, workers, status
# ---------------------------------------------------------------------------------------------

class JobFailed(Exception):
    """This upload cannot be processed; the message is shown as processing.error."""


class JobInterrupted(Exception):
    """The server is stopping (or the upload was forgotten): leave the job for later."""


class Processor(storage.EventSource):
    """Processes completed uploads in the background. Thread-safe; one per server. Its
    listeners (add_listener) get the processing/ready/failed events of the module docstring,
    from a worker thread; they must return at once (exceptions are logged)."""

    def __init__(self, config, store):
        self.store = store
        self.mode = config.processing
        self.max_height = config.max_height
        self.crf = config.mp4_crf
        self.timeout = config.processing_timeout
        self.workers = config.processing_workers
        self.slow_transcode = getattr(config, "slow_transcode", False)   # tests only
        self.lease_s = getattr(config, "processing_lease", None) or JOB_LEASE_S
        self.work_root = os.path.join(store.temp_dir, WORK_DIR_NAME)
        self.ffmpeg, self.ffprobe, self.unavailable_reason = find_tools(
            config.ffmpeg, config.ffprobe)
        self._nice = _nice_prefix()
        self._listeners = []
        self._stopping = threading.Event()
        self._wakeup = threading.Condition()
        self._runs = {}                  # fileId -> JobRun of the jobs running now
        self._runs_lock = threading.Lock()
        self._threads = []
        self.queue = None
        if self.mode == "off":
            return
        try:
            self.queue = open_queue(store, self.lease_s)
        except (sqlite3.Error, OSError, RuntimeError, ApiError) as error:
            log.error("processing disabled: cannot open its queue: %s", error)
            self.unavailable_reason = "processing queue unusable: %s" % error
        if self.unavailable_reason:
            log.warning("processing unavailable: %s", self.unavailable_reason)
        store.add_listener(self._on_store_event)

    @property
    def available(self):
        return self.mode != "off" and self.queue is not None and not self.unavailable_reason

    # -- events (add_listener, _emit: storage.EventSource) ---------------------------------

    def _on_store_event(self, event):
        # Queued even without ffmpeg: a restart that finds it, or (shared queue) another
        # node, runs it; status says "unavailable" here meanwhile.
        if event.get("type") == "completed" and self.queue is not None and \
                not self._stopping.is_set():
            self.enqueue(event["fileId"])
        elif event.get("type") == "deleted" and self.queue is not None:
            self.forget(event["fileId"])        # stop its job, drop it and its derivatives

    # -- lifecycle ------------------------------------------------------------------------

    def start(self):
        """Recover jobs a crash left running, queue completed uploads that have no job yet
        (in the background: a shared queue reads the bucket), and start the workers. Call
        once, after the store's repair."""
        if self.queue is None:
            return
        shutil.rmtree(self.work_root, ignore_errors=True)    # what a crashed run left
        for file_id, pid, marker in self.queue.left_running():
            if pid:
                _kill_orphan(pid, marker, (self.ffmpeg, self.ffprobe))
            if self.queue.requeue_after_crash(file_id, MAX_INTERRUPTIONS):
                log.warning("processing %s: interrupted by a crash; queued again", file_id)
            else:
                log.error("processing %s: failed after %d interrupted runs", file_id,
                          MAX_INTERRUPTIONS)
        backfill = threading.Thread(target=self._backfill, name="m1-processing-backfill",
                                    daemon=True)
        backfill.start()
        self._threads.append(backfill)
        if not self.available:
            return
        for number in range(self.workers):
            thread = threading.Thread(target=self._work, name="m1-processing-%d" % number,
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def _backfill(self):
        try:
            added = self.queue.backfill(self.store)
        except ApiError as error:        # the store did not answer: the next start retries
            log.warning("processing: cannot look for completed uploads without a job: %s",
                        error.message)
            return
        except Exception:
            log.exception("processing: looking for completed uploads without a job failed")
            return
        if added:
            log.info("processing: queued %d completed upload(s) that had no job yet", added)
            with self._wakeup:
                self._wakeup.notify_all()

    def stop(self):
        """Stop taking jobs, terminate the running ffmpeg(s) and leave their jobs queued for
        the next start. Called on SIGTERM before the server waits for in-flight chunks."""
        self._stopping.set()
        with self._runs_lock:
            runs = list(self._runs.values())
        for run in runs:
            run.interrupt()
        with self._wakeup:
            self._wakeup.notify_all()
        deadline = time.monotonic() + STOP_JOIN_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        shutil.rmtree(self.work_root, ignore_errors=True)

    def close(self):
        """Close the queue (after stop(), once no request can read status any more)."""
        if self.queue is not None:
            self.queue.close()

    def enqueue(self, file_id):
        try:
            added = self.queue.add(file_id)
        except (sqlite3.Error, ApiError) as error:   # the backfill at a start catches up
            log.error("processing %s: could not queue its job: %s", file_id, error)
            return
        if added:
            with self._wakeup:
                self._wakeup.notify()

    def forget(self, file_id):
        """Drop an upload's job and derivatives (for DELETE): a running job is stopped."""
        with self._runs_lock:
            run = self._runs.get(file_id)
        if run is not None:
            run.forgotten = True
            run.interrupt()
        try:
            self.queue.forget(file_id)
        except (sqlite3.Error, ApiError) as error:
            log.warning("processing %s: could not drop its job: %s", file_id, error)

    # -- status (server.status_extras) ----------------------------------------------------

    def status_fields(self, upload):
        """`processing`, `video`, `derivatives` and `playbackUrl` for the status reply."""
        if self.mode == "off" or not upload.completed:
            return {}
        job = self.queue.job_of(upload) if self.queue is not None else None
        if job is None:
            if not self.available:
                return {"processing": {"state": "unavailable", "progress": 0.0,
                                       "error": self.unavailable_reason}}
            if upload.completed_at is None or upload.completed_at < self.queue.created_at:
                return {}                # completed before processing existed here
            return {"processing": {"state": "queued", "progress": 0.0}}
        state = job["state"]
        summary = {"state": state, "progress": 1.0 if state == "done" else 0.0}
        if state == "running" and job.get("stage"):     # another node's, as last renewed
            summary["progress"] = round(job.get("progress") or 0.0, 3)
            summary["stage"] = job["stage"]
        video = job["video"]
        with self._runs_lock:
            run = self._runs.get(upload.file_id)
        if state == "running" and run is not None:
            summary["progress"] = round(run.progress, 3)
            summary["stage"] = run.stage
            video = run.video
        if state in ("queued", "running") and not self.available:
            summary["state"] = "unavailable"
            summary["error"] = self.unavailable_reason
        if job["error"]:
            summary["error"] = job["error"]
        for key, column in (("startedAt", "started_at"), ("finishedAt", "finished_at")):
            if job[column] and state != "queued":
                summary[key] = serverlog.utc_iso(job[column])
        fields = {"processing": summary}
        if video:
            fields["video"] = video
        if state == "done" and job["derivatives"]:
            fields.update(_derivative_fields(upload.file_id, job["derivatives"]))
        return fields

    def open_derivative(self, file_id, name):
        """Derivative `name` of `file_id` to serve (store.open_derivative: Range, ETag, or a
        presigned redirect), or None unless a finished job made it. Only names of
        DERIVATIVE_TYPES ever reach the store, with a validated fileId."""
        if name not in DERIVATIVE_TYPES or self.queue is None or \
                not storage.valid_file_id(file_id):
            return None
        upload = self.store.status(file_id)
        if upload is None or not upload.completed:
            return None
        job = self.queue.job_of(upload)
        if job is None or job["state"] != "done" or name not in job["derivatives"].values():
            return None
        return self.store.open_derivative(upload, name)

    # -- the workers ----------------------------------------------------------------------

    def _work(self):
        while not self._stopping.is_set():
            try:
                file_id = self.queue.claim_next()
            except ApiError as error:    # the store did not answer: try at the next poll
                log.warning("processing queue read failed: %s", error.message)
                file_id = None
            except sqlite3.Error:
                log.exception("processing queue read failed")
                file_id = None
            if file_id is None:
                with self._wakeup:
                    if not self._stopping.is_set():
                        self._wakeup.wait(IDLE_POLL_S)
                continue
            try:
                self._run_job(file_id)
            except ApiError as error:    # the store did not answer: the job stays running,
                log.warning("processing %s: could not record the outcome (%s); it runs "
                            "again once its lease is found abandoned", file_id, error.message)
                self._stopping.wait(IDLE_POLL_S)
            except Exception:            # the queue itself failed: keep the worker alive
                log.exception("processing %s: could not record the outcome", file_id)
                self._stopping.wait(IDLE_POLL_S)

    def _run_job(self, file_id):
        run = JobRun(self, file_id)
        with self._runs_lock:
            self._runs[file_id] = run
        renewing = self._keep_lease(run)
        started = time.monotonic()
        try:
            derivatives = self._process(run)
        except JobInterrupted:
            if run.forgotten:
                self.queue.forget(file_id)
            elif run.lost:
                log.warning("processing %s: another node holds its lease now; left to it",
                            file_id)
            else:
                self.queue.requeue(file_id)
                log.info("processing %s: stopped; it will run again at the next start "
                         "(or on another node sharing the queue)", file_id)
        except ApiError as error:        # from the store: S3 did not answer, or the upload is gone
            if error.code == "upload_gone":
                self.queue.forget(file_id)
            else:                        # not the upload's fault: again later, not at once
                log.warning("processing %s: the store failed (%s); queued again", file_id,
                            error.message)
                self.queue.requeue(file_id)
                self._stopping.wait(IDLE_POLL_S)
        except JobFailed as failure:
            reason = str(failure)[:MAX_ERROR_CHARS]
            log.warning("processing %s failed: %s", file_id, reason)
            if self.queue.fail(file_id, reason, run.video):
                self._emit("failed", file_id, reason=reason)
        except Exception as error:
            reason = "internal error: %s" % error
            log.exception("processing %s: unexpected error", file_id)
            if self.queue.fail(file_id, reason[:MAX_ERROR_CHARS], run.video):
                self._emit("failed", file_id, reason=reason[:MAX_ERROR_CHARS])
        else:
            if not self.queue.finish(file_id, run.video, derivatives):
                log.warning("processing %s: finished, but the job was no longer this "
                            "node's (taken over by another, or the upload deleted)", file_id)
                return
            log.info("processing %s done in %.1fs (%s): %s", file_id,
                     time.monotonic() - started, self.mode,
                     ", ".join(sorted(derivatives.values())) or "probe only")
            self._emit("ready", file_id, video=run.video,
                       **_derivative_fields(file_id, derivatives))
        finally:
            renewing.set()
            run.remove_folder()
            self.queue.release(file_id)
            with self._runs_lock:
                self._runs.pop(file_id, None)

    def _keep_lease(self, run):
        """A shared queue's job has a lease: renew it (with the progress, for status on
        other nodes) every queue.renew_interval until the returned event is set. Losing it
        (another node took the job over, or the upload was deleted) stops the run."""
        done = threading.Event()
        interval = self.queue.renew_interval
        if interval is None:                 # a local queue: the server's own restart decides
            return done

        def renew():
            while not done.wait(interval):
                try:
                    outcome = self.queue.renew(run.file_id, run.progress, run.stage, run.video)
                except ApiError as error:    # the store is away: try again; the lease may run out
                    log.warning("processing %s: lease renewal failed: %s", run.file_id, error)
                    continue
                if outcome != "renewed" and not done.is_set():
                    run.forgotten = outcome == "gone"
                    run.lost = outcome == "lost"
                    run.interrupt()
                    return
        threading.Thread(target=renew, name="m1-processing-lease", daemon=True).start()
        return done

    def _process(self, run):
        """The steps of one job, in a work folder; the derivatives are handed to the store
        (put_derivative) only once all are made. Returns {kind: name} of them."""
        upload = self.store.status(run.file_id)
        if upload is None or not upload.completed:
            run.forgotten = True
            raise JobInterrupted()
        run.prepare_folder()
        with self.store.media_file(upload) as source:   # S3: a download into the temp dir
            derivatives = self._steps(run, upload, source)
        run.publish(upload, derivatives)
        return derivatives

    def _steps(self, run, upload, source):
        info = run.probe(source)
        video = video_facts(info, upload.bytes_appended)
        run.video = video
        run.advance("probe")
        derivatives = {}
        if self.mode == "probe":
            if video["durationSeconds"] is None:
                video["durationSeconds"] = run.measure_duration(source)
                _fill_bit_rate(video, upload.bytes_appended)
            run.advance("scan")
            return derivatives
        name, container = remux_target(upload.ext, info)
        remuxed = run.remux(source, name, container, upload.bytes_appended)
        derivatives["remux"] = name
        remux_info = run.probe(remuxed)
        duration = _duration_of(remux_info)
        if duration is None:
            duration = run.measure_duration(remuxed)
        if not duration:
            raise JobFailed("no audio or video frames could be read from the upload")
        video["durationSeconds"] = round(duration, 3)
        _fill_bit_rate(video, upload.bytes_appended)
        if _has_stream(info, "video"):
            run.poster(remuxed, duration)
            derivatives["poster"] = "poster.jpg"
        if self.mode == "mp4":
            run.transcode(remuxed, duration, info)
            derivatives["mp4"] = "video.mp4"
        return derivatives


class JobRun:
    """One run of one job: its work folder, its current program, its progress and deadline."""

    def __init__(self, processor, file_id):
        self.processor = processor
        self.file_id = file_id
        self.token = uuid.uuid4().hex[:12]
        self.folder = os.path.join(processor.work_root, "%s.%s" % (file_id, self.token))
        self.deadline = time.monotonic() + processor.timeout
        self.stage = "probe"
        self.progress = 0.0
        self.video = None
        self.forgotten = False           # the upload is gone: drop the job
        self.lost = False                # another node holds the job's lease now
        self.timed_out = False
        self._interrupted = False
        self._proc = None
        self._lock = threading.Lock()
        self._last_event = 0.0
        weights = STAGE_WEIGHTS[processor.mode]
        self._base = {}
        total = 0.0
        for stage, weight in weights:
            self._base[stage] = (total, weight)
            total += weight

    # -- files ----------------------------------------------------------------------------

    def part_path(self, name):
        return os.path.join(self.folder, ".%s.%s.part" % (name, self.token))

    def prepare_folder(self):
        """A fresh work folder in the store's temp dir (the same file system as local mode's
        derived/, so that handing a derivative over is a rename there)."""
        os.makedirs(self.folder)

    def check_output(self, name):
        part = self.part_path(name)
        if not os.path.exists(part) or os.path.getsize(part) == 0:
            raise JobFailed("ffmpeg wrote no %s" % name)
        return part

    def publish(self, upload, derivatives):
        """Hand every derivative to the store: local mode fsyncs and renames it into
        derived/<fileId>/, S3 uploads it. Either way a name that exists holds a whole file,
        and a run that repeats this (after a crash) writes the same names again."""
        for name in derivatives.values():
            with self._lock:
                if self._interrupted:
                    raise JobInterrupted()
            self.processor.store.put_derivative(upload, name, self.check_output(name),
                                                DERIVATIVE_TYPES[name])

    def remove_folder(self):
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- progress ---------------------------------------------------------------------------

    def advance(self, stage, fraction=1.0):
        """Step `stage` is `fraction` done: move progress (never backwards) and tell
        listeners, at most every PROGRESS_EVENT_INTERVAL_S unless a step just finished."""
        base, weight = self._base.get(stage, (self.progress, 0.0))
        self.stage = stage
        value = min(1.0, base + weight * max(0.0, min(1.0, fraction)))
        if value < self.progress:
            return
        self.progress = value
        now = time.monotonic()
        if fraction >= 1.0 or now - self._last_event >= PROGRESS_EVENT_INTERVAL_S:
            self._last_event = now
            self.processor._emit("processing", self.file_id, progress=round(value, 3),
                                 stage=stage)

    # -- the steps ------------------------------------------------------------------------

    def probe(self, path):
        output = self.run(self.processor.ffprobe, probe_args(path), "ffprobe", marker=path,
                          capture=True)
        try:
            info = json.loads(output.decode("utf-8", "replace") or "{}")
        except ValueError:
            raise JobFailed("ffprobe gave no readable answer")
        if not any(_has_stream(info, kind) for kind in ("video", "audio")):
            raise JobFailed("no audio or video stream found in the upload")
        return info

    def measure_duration(self, path):
        """A live WebM says nothing of its length: read every packet (no decoding)."""
        progress = _Progress()
        self.run(self.processor.ffmpeg, scan_args(path), "reading the packets", marker=path,
                 progress=progress)
        if progress.out_time_s is None or progress.out_time_s <= 0:
            raise JobFailed("no audio or video frames could be read from the upload")
        return round(progress.out_time_s, 3)

    def remux(self, source, name, container, source_size):
        part = self.part_path(name)

        def moved(progress):
            if progress.total_size and source_size:
                self.advance("remux", progress.total_size / float(source_size))

        self.run(self.processor.ffmpeg, remux_args(source, part, container), "remux",
                 marker=part, progress=_Progress(moved))
        self.advance("remux")
        return self.check_output(name)

    def poster(self, source, duration):
        part = self.part_path("poster.jpg")
        at = min(POSTER_AT_S, duration / 4.0)
        self.run(self.processor.ffmpeg, poster_args(source, part, at, self.processor.max_height),
                 "poster", marker=part)
        if at > 0 and not (os.path.exists(part) and os.path.getsize(part) > 0):
            self.run(self.processor.ffmpeg,           # no frame there: take the first one
                     poster_args(source, part, 0, self.processor.max_height), "poster",
                     marker=part)
        self.check_output("poster.jpg")
        self.advance("poster")

    def transcode(self, source, duration, info):
        part = self.part_path("video.mp4")
        processor = self.processor

        def encoded(progress):
            if progress.out_time_s is not None and duration:
                self.advance("mp4", progress.out_time_s / duration)

        args = mp4_args(source, part, processor.max_height, processor.crf,
                        has_video=_has_stream(info, "video"),
                        has_audio=_has_stream(info, "audio"),
                        realtime=processor.slow_transcode)
        self.stage = "mp4"
        self.run(processor.ffmpeg, args, "mp4", marker=part, progress=_Progress(encoded))
        self.check_output("video.mp4")
        self.advance("mp4")

    # -- running a program ------------------------------------------------------------------

    def run(self, program, args, step, marker, capture=False, progress=None):
        """Run ffmpeg/ffprobe (niced, own session) within the job's deadline; returns its
        stdout when `capture`, else feeds `-progress` lines to `progress`. Raises JobFailed
        with its last stderr lines, or JobInterrupted when the server stops meanwhile."""
        argv = self.processor._nice + [program] + args
        with self._lock:
            if self._interrupted:
                raise JobInterrupted()
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.timed_out = True
            else:
                log.info("processing %s: %s", self.file_id, _command_line(argv))
                try:
                    self._proc = _spawn(argv)
                except OSError as error:
                    raise JobFailed("cannot run %s: %s" % (program, error.strerror or error))
        if self.timed_out:
            raise JobFailed(self._timeout_message())
        proc = self._proc
        self.processor.queue.set_process(self.file_id, proc.pid, marker)
        tail = collections.deque(maxlen=STDERR_TAIL_LINES)
        reader = threading.Thread(target=_read_lines, args=(proc.stderr, tail), daemon=True)
        reader.start()
        timer = threading.Timer(remaining, self._time_out)
        timer.daemon = True
        timer.start()
        try:
            if capture:
                output = proc.stdout.read()
            else:
                output = b""
                for raw in proc.stdout:
                    if progress is not None:
                        progress.feed(raw)
            returncode = proc.wait()
        finally:
            timer.cancel()
            reader.join(KILL_GRACE_S)
            proc.stdout.close()
            proc.stderr.close()
            with self._lock:
                self._proc = None
        if self._interrupted:
            raise JobInterrupted()
        if self.timed_out:
            raise JobFailed(self._timeout_message())
        if returncode != 0:
            detail = _clean_stderr(tail, (self.folder, os.path.dirname(marker)))
            raise JobFailed("%s failed (%s exit status %s)%s" % (
                step, os.path.basename(program), returncode,
                ": " + detail if detail else ""))
        return output

    def _time_out(self):
        with self._lock:
            self.timed_out = True
            proc = self._proc
        if proc is not None:
            _terminate(proc)

    def _timeout_message(self):
        return "timed out after %gs (--processing-timeout)" % self.processor.timeout

    def interrupt(self):
        with self._lock:
            self._interrupted = True
            proc = self._proc
        if proc is not None:
            _terminate(proc)


class _Progress:
    """Reads ffmpeg's `-progress` blocks (key=value lines ending with progress=...)."""

    def __init__(self, on_block=None):
        self.on_block = on_block
        self.out_time_s = None
        self.total_size = None

    def feed(self, raw):
        key, _, value = raw.decode("ascii", "replace").strip().partition("=")
        if key == "out_time_us" and value.lstrip("-").isdigit():
            self.out_time_s = max(0, int(value)) / 1e6
        elif key == "total_size" and value.isdigit():
            self.total_size = int(value)
        elif key == "progress" and self.on_block is not None:
            self.on_block(self)


# ---------------------------------------------------------------------------------------------
# The job queues: where jobs live is chosen here, once, by what the store offers
# ---------------------------------------------------------------------------------------------

def open_queue(store, lease_s=JOB_LEASE_S):
    """The queue for `store`: a store that declares shared jobs (storage.Capabilities.
    shared_jobs: s3store.S3Store.change_job, by compare-and-swap) shares its jobs between
    every node on its bucket (SharedJobQueue); any other keeps them in SQLite in its upload
    folder (JobQueue). Both offer the same methods, so nothing else in this module knows
    which it has."""
    if store.capabilities.shared_jobs:
        return SharedJobQueue(store, store.root, lease_s)
    return JobQueue(os.path.join(store.root, JOBS_DB_NAME),
                    os.path.join(store.root, DERIVED_DIR_NAME))


# ---------------------------------------------------------------------------------------------
# The local queue: SQLite, its own file, one connection behind a lock, schema versioned
# ---------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    file_id      TEXT PRIMARY KEY,
    state        TEXT NOT NULL,            -- queued | running | done | failed
    queued_at    REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    interrupted  INTEGER NOT NULL DEFAULT 0,   -- runs in a row cut short by a crash
    pid          INTEGER,                  -- the program running for it (crash clean-up)
    marker       TEXT,                     -- an argument of that program's command line
    error        TEXT,                     -- why it failed (ffmpeg's last stderr lines)
    video        TEXT,                     -- JSON: durationSeconds, width, height, ...
    derivatives  TEXT                      -- JSON: {"remux": "remux.webm", ...}
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, queued_at);
CREATE TABLE IF NOT EXISTS queue_info (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_JOB_COLUMNS = ("file_id", "state", "queued_at", "started_at", "finished_at", "interrupted",
                "error", "video", "derivatives")


class JobQueue:
    """The jobs table. Threads never share the connection at the same time (one lock)."""

    renew_interval = None                # one server per folder: no lease to renew

    def __init__(self, path, derived_dir=None):
        self.path = path
        self.derived_dir = derived_dir
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=DB_BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError("%s has schema %d; this m1server knows up to %d"
                                   % (path, version, SCHEMA_VERSION))
            self._db.execute("PRAGMA synchronous=NORMAL")    # see the module docstring
            if version < SCHEMA_VERSION:                      # new (0) or older: set it up
                self._db.execute("PRAGMA journal_mode=WAL")  # persistent, once is enough
                with self._write() as db:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute("INSERT OR IGNORE INTO queue_info (key, value) VALUES (?, ?)",
                               ("created_at", repr(time.time())))
                    db.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)
            self.created_at = float(self._db.execute(
                "SELECT value FROM queue_info WHERE key = 'created_at'").fetchone()[0])
        except BaseException:
            self._db.close()
            raise

    @contextlib.contextmanager
    def _write(self):
        with self._lock:
            if self._db is None:
                raise sqlite3.ProgrammingError("the processing queue is closed")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self):
        with self._lock:
            if self._db is None:
                raise sqlite3.ProgrammingError("the processing queue is closed")
            yield self._db

    def add(self, file_id):
        """Queue a job unless the upload has one already; True when it was added."""
        with self._write() as db:
            return db.execute("INSERT OR IGNORE INTO jobs (file_id, state, queued_at) "
                              "VALUES (?, 'queued', ?)", (file_id, time.time())).rowcount > 0

    def backfill(self, store):
        """Queue the uploads completed since this queue was created that have no job (their
        "completed" event was lost to a crash, or came before ffmpeg was found)."""
        return self.add_missing([upload.file_id for upload in
                                 store.completed_since(self.created_at)])

    def add_missing(self, file_ids):
        """Queue every upload of `file_ids` that has no job, in one transaction; returns how
        many were added (start-up backfill: one query however many uploads there are)."""
        with self._write() as db:
            known = set(r[0] for r in db.execute("SELECT file_id FROM jobs"))
            now = time.time()
            missing = [f for f in file_ids if f not in known]
            db.executemany("INSERT INTO jobs (file_id, state, queued_at) VALUES (?, 'queued', ?)",
                           [(f, now + n * 1e-6) for n, f in enumerate(missing)])
            return len(missing)

    def claim_next(self):
        """The oldest queued job, now marked running; None when nothing waits."""
        with self._write() as db:
            row = db.execute("SELECT file_id FROM jobs WHERE state = 'queued' "
                             "ORDER BY queued_at LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', started_at = ?, finished_at = NULL, "
                       "error = NULL, pid = NULL, marker = NULL WHERE file_id = ?",
                       (time.time(), row[0]))
            return row[0]

    def set_process(self, file_id, pid, marker):
        with self._write() as db:
            db.execute("UPDATE jobs SET pid = ?, marker = ? WHERE file_id = ?",
                       (pid, marker, file_id))

    def finish(self, file_id, video, derivatives):
        """Record the outcome; True (a local job is never taken over by anyone else)."""
        with self._write() as db:
            db.execute("UPDATE jobs SET state = 'done', finished_at = ?, interrupted = 0, "
                       "pid = NULL, marker = NULL, error = NULL, video = ?, derivatives = ? "
                       "WHERE file_id = ?", (time.time(), _dumps(video), _dumps(derivatives),
                                             file_id))
        return True

    def fail(self, file_id, reason, video):
        with self._write() as db:
            db.execute("UPDATE jobs SET state = 'failed', finished_at = ?, interrupted = 0, "
                       "pid = NULL, marker = NULL, error = ?, video = ?, derivatives = NULL "
                       "WHERE file_id = ?", (time.time(), reason, _dumps(video), file_id))
        return True

    def release(self, file_id):
        """The run of `file_id` on this server is over (nothing to let go of here)."""

    def requeue(self, file_id):
        """A clean stop: the job runs again at the next start, and it was not its fault."""
        with self._write() as db:
            db.execute("UPDATE jobs SET state = 'queued', pid = NULL, marker = NULL "
                       "WHERE file_id = ?", (file_id,))

    def left_running(self):
        """(fileId, pid, marker) of jobs a crash left marked running."""
        with self._read() as db:
            return db.execute("SELECT file_id, pid, marker FROM jobs "
                              "WHERE state = 'running'").fetchall()

    def requeue_after_crash(self, file_id, limit):
        """Queue a job a crash interrupted; fail it instead after `limit` crashes in a row
        (a job that brings the machine down must not do so for ever). True when queued."""
        with self._write() as db:
            count = db.execute("SELECT interrupted FROM jobs WHERE file_id = ?",
                               (file_id,)).fetchone()[0] + 1
            if count >= limit:
                db.execute("UPDATE jobs SET state = 'failed', finished_at = ?, pid = NULL, "
                           "interrupted = ?, error = ? WHERE file_id = ?",
                           (time.time(), count, "interrupted by %d server crashes in a row; "
                            "not tried again" % count, file_id))
                return False
            db.execute("UPDATE jobs SET state = 'queued', pid = NULL, marker = NULL, "
                       "interrupted = ? WHERE file_id = ?", (count, file_id))
            return True

    def delete(self, file_id):
        with self._write() as db:
            db.execute("DELETE FROM jobs WHERE file_id = ?", (file_id,))

    def forget(self, file_id):
        """The upload is deleted: drop its row and whatever derivatives a run that raced the
        deletion put back into derived/<fileId>/ (the store's delete took the rest)."""
        self.delete(file_id)
        if self.derived_dir is not None and storage.valid_file_id(file_id):
            localdisk.remove_below(os.path.dirname(self.derived_dir),   # never through a link
                                   (DERIVED_DIR_NAME, file_id))

    def job_of(self, upload):
        return self.load(upload.file_id)

    def load(self, file_id):
        with self._read() as db:
            row = db.execute("SELECT %s FROM jobs WHERE file_id = ?" % ", ".join(_JOB_COLUMNS),
                             (file_id,)).fetchone()
        if row is None:
            return None
        job = dict(zip(_JOB_COLUMNS, row))
        job["video"] = json.loads(job["video"]) if job["video"] else None
        job["derivatives"] = json.loads(job["derivatives"]) if job["derivatives"] else {}
        return job

    def close(self):
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


# ---------------------------------------------------------------------------------------------
# The shared queue: jobs in the bucket, for every node that serves it
# ---------------------------------------------------------------------------------------------

class SharedJobQueue:
    """Jobs kept by the store for all nodes (S3): the job is the `job` field of the upload's
    manifest, changed only by compare-and-swap (store.change_job), and an empty marker object
    P/jobs/<fileId> exists while it is queued or running, so a worker finds work with one
    LIST per poll (store.job_markers). The job (JSON, camelCase like the manifest):

        state        queued | running | done | failed
        owner        {"node", "token"} of the run holding it (running only)
        leaseUntil   unix time; a running job whose lease has passed is taken over
        attempts     runs started; interrupted: runs in a row cut short by a crash
        queuedAt, startedAt, finishedAt, progress, stage, error, video, derivatives

    Every step is safe to repeat after a crash, on any node (docs/s3.md, "Processing"):
      add      marker first, then the job `queued` (only if there is none). A crash between
               leaves a marker without a job: a worker claims it all the same.
      claim    CAS queued (or running with a lost lease) -> running with our owner token and
               a lease: one CAS wins, so one node runs it; a loser re-reads and sees running.
      renew    CAS leaseUntil forward (only while the owner is us) every renew_interval.
      finish   derivatives are stored first (same names each run), then CAS done (only while
               the owner is us), then the marker goes. A crash before the CAS: the lease runs
               out and the job runs again; after it: the next poll drops the stale marker.
    Node clocks must agree to well within JOB_LEASE_S (NTP): leases are absolute times.
    The programs this node runs are recorded locally (PIDS_DIR_NAME), so a restart kills an
    ffmpeg its crash left behind, and its own jobs are taken over at once, not after the lease.
    """

    def __init__(self, store, root, lease_s=JOB_LEASE_S):
        self.store = store
        self.lease_s = float(lease_s)
        self.renew_interval = self.lease_s * LEASE_RENEW_FRACTION
        self.node = _node_id(os.path.join(root, NODE_ID_NAME))
        self.pid_dir = os.path.join(root, PIDS_DIR_NAME)
        os.makedirs(self.pid_dir, exist_ok=True)
        self.created_at = store.job_queue_created_at()
        self._claims = {}                # fileId -> owner token of the runs of this process
        self._busy = {}                  # fileId -> leaseUntil of another node's run of it:
                                         # not read again before then (one GET saved a poll)
        self._lock = threading.Lock()

    # -- queueing -------------------------------------------------------------------------

    def add(self, file_id):
        """Queue a job unless the upload has one already; True when it was added."""
        self.store.put_job_marker(file_id)       # first: a job that exists is always found
        created = {}

        def change(job):
            created["yes"] = job is None
            if job is not None:
                return None
            return {"state": "queued", "queuedAt": round(time.time(), 3), "attempts": 0,
                    "interrupted": 0}
        _, gone = self._change(file_id, change)
        if gone:
            self.store.drop_job_marker(file_id)
            return False
        return created.get("yes", False)

    def backfill(self, store):
        """As JobQueue.backfill, from the bucket (store.completed_since)."""
        added = 0
        for upload in store.completed_since(self.created_at):
            if store.job_of(upload) is None and self.add(upload.file_id):
                added += 1
        return added

    # -- claiming, the lease, the outcome -----------------------------------------------------

    def claim_next(self):
        """The oldest job waiting (or abandoned by its node), now running under our lease;
        None when there is none."""
        waiting = [file_id for file_id, _ in self.store.job_markers()]
        now = time.time()
        with self._lock:
            self._busy = dict((f, until) for f, until in self._busy.items()
                              if f in set(waiting) and until > now)
        for file_id in waiting:
            with self._lock:
                if file_id in self._claims or file_id in self._busy:
                    continue
            if self._claim(file_id):
                return file_id
        return None

    def _claim(self, file_id):
        token = uuid.uuid4().hex
        seen = {}

        def change(job):
            seen.clear()
            now = time.time()
            if job is None:                       # its marker was written, its job not yet
                job = {"state": "queued", "queuedAt": round(now, 3), "attempts": 0,
                       "interrupted": 0}
            if job.get("state") in ("done", "failed"):
                seen["finished"] = True
                return None
            if job.get("state") == "running":
                if not self._abandoned(job, now):
                    seen["busy"] = job.get("leaseUntil") or 0
                    return None
                count = job.get("interrupted", 0) + 1
                seen["taken_from"] = (job.get("owner") or {}).get("node")
                if count >= MAX_INTERRUPTIONS:
                    seen["gave_up"] = count
                    job.update(state="failed", finishedAt=round(now, 3), owner=None,
                               leaseUntil=None, interrupted=count, derivatives=None,
                               error="interrupted by %d server crashes in a row; not tried "
                                     "again" % count)
                    return job
                job["interrupted"] = count
            job.update(state="running", owner={"node": self.node, "token": token},
                       leaseUntil=round(now + self.lease_s, 3), startedAt=round(now, 3),
                       finishedAt=None, error=None, progress=0.0, stage="probe",
                       derivatives=None, attempts=job.get("attempts", 0) + 1)
            return job
        job, gone = self._change(file_id, change)
        if gone:
            self.store.drop_job_marker(file_id)   # deleted: its marker is all that is left
            return False
        if seen.get("finished") or seen.get("gave_up"):
            self.store.drop_job_marker(file_id)   # a crash came between the outcome and this
            if seen.get("gave_up"):
                log.error("processing %s: failed after %d interrupted runs", file_id,
                          seen["gave_up"])
            return False
        if "busy" in seen:
            with self._lock:
                self._busy[file_id] = seen["busy"]
            return False
        if (job.get("owner") or {}).get("token") != token:
            return False
        if seen.get("taken_from"):
            log.warning("processing %s: taken over from node %s (its lease ran out, or it "
                        "was this node before a crash); attempt %d", file_id,
                        seen["taken_from"], job["attempts"])
        with self._lock:
            self._claims[file_id] = token
        return True

    def _abandoned(self, job, now):
        """A running job nobody runs any more: its lease ran out, or it is this node's from
        before a restart (its token is not one of this process's runs)."""
        if (job.get("leaseUntil") or 0) < now:
            return True
        owner = job.get("owner") or {}
        with self._lock:
            return owner.get("node") == self.node and owner.get("token") not in \
                self._claims.values()

    def _ours(self, file_id):
        """A check for change(): the job is still held by our run of it."""
        with self._lock:
            token = self._claims.get(file_id)
        return lambda job: token is not None and job is not None and \
            job.get("state") == "running" and (job.get("owner") or {}).get("token") == token

    def renew(self, file_id, progress, stage, video):
        """Move our lease forward, with the progress for status on other nodes: "renewed",
        "lost" (another node holds the job now) or "gone" (the upload was deleted)."""
        ours = self._ours(file_id)

        def change(job):
            if not ours(job):
                return None
            job.update(leaseUntil=round(time.time() + self.lease_s, 3),
                       progress=round(progress, 3), stage=stage, video=video)
            return job
        job, gone = self._change(file_id, change)
        if gone:
            return "gone"
        with self._lock:
            token = self._claims.get(file_id)
        return "renewed" if job and (job.get("owner") or {}).get("token") == token else "lost"

    def _change(self, file_id, change):
        """store.change_job -> (the job afterwards, False), or (None, True) when the upload
        is gone (deleted)."""
        try:
            return self.store.change_job(file_id, change), False
        except ApiError as error:
            if error.code != "upload_gone":
                raise
            return None, True

    def _settle(self, file_id, **fields):
        """Our run's outcome, if the job is still ours; the marker goes either way (unless
        another node runs it now). True when recorded."""
        ours = self._ours(file_id)
        recorded = {}

        def change(job):
            recorded["yes"] = ours(job)
            if not recorded["yes"]:
                return None
            job.update(fields, finishedAt=round(time.time(), 3), owner=None, leaseUntil=None)
            return job
        job, gone = self._change(file_id, change)
        if gone:
            self.store.drop_job_marker(file_id)
            return False
        if job is None or job.get("state") in ("done", "failed"):
            self.store.drop_job_marker(file_id)
        return recorded.get("yes", False)

    def finish(self, file_id, video, derivatives):
        return self._settle(file_id, state="done", interrupted=0, error=None, video=video,
                            derivatives=derivatives, progress=1.0, stage=None)

    def fail(self, file_id, reason, video):
        return self._settle(file_id, state="failed", interrupted=0, error=reason,
                            video=video, derivatives=None, progress=0.0, stage=None)

    def requeue(self, file_id):
        """A clean stop: queued again (not counted as a crash), for any node; the marker
        stays."""
        ours = self._ours(file_id)

        def change(job):
            if not ours(job):
                return None
            job.update(state="queued", owner=None, leaseUntil=None, progress=0.0)
            return job
        try:
            self.store.change_job(file_id, change)
        except ApiError as error:
            if error.code != "upload_gone":
                raise

    def release(self, file_id):
        with self._lock:
            self._claims.pop(file_id, None)
        with contextlib.suppress(OSError):
            os.remove(os.path.join(self.pid_dir, file_id))

    def forget(self, file_id):
        """The upload is deleted: the store removed the job (with the manifest) and the
        derivatives (with the upload's generation); only the marker is left to drop."""
        self.store.drop_job_marker(file_id)

    # -- this node's programs (crash clean-up) ----------------------------------------------

    def set_process(self, file_id, pid, marker):
        path = os.path.join(self.pid_dir, file_id)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"pid": pid, "marker": marker}, f)
        os.replace(path + ".tmp", path)

    def left_running(self):
        """(fileId, pid, marker) of the programs this node ran when it crashed."""
        found = []
        for name in os.listdir(self.pid_dir):
            path = os.path.join(self.pid_dir, name)
            try:
                with open(path, encoding="utf-8") as f:
                    record = json.load(f)
                found.append((name, int(record["pid"]), str(record["marker"])))
            except (OSError, ValueError, KeyError, TypeError):   # a write a crash cut short
                with contextlib.suppress(OSError):
                    os.remove(path)
        return [entry for entry in found if storage.valid_file_id(entry[0])]

    def requeue_after_crash(self, file_id, limit):
        """The job itself is in the bucket, still `running` under this node's old token:
        the next claim takes it over at once and counts the crash (failing it at `limit`)."""
        with contextlib.suppress(OSError):
            os.remove(os.path.join(self.pid_dir, file_id))
        return True

    # -- status -------------------------------------------------------------------------------

    def job_of(self, upload):
        """The job as JobQueue.load gives it, from the manifest status already read."""
        job = self.store.job_of(upload)
        if job is None:
            return None
        return {"file_id": upload.file_id, "state": job.get("state"),
                "queued_at": job.get("queuedAt"), "started_at": job.get("startedAt"),
                "finished_at": job.get("finishedAt"), "interrupted": job.get("interrupted", 0),
                "error": job.get("error"), "video": job.get("video"),
                "derivatives": job.get("derivatives") or {}, "progress": job.get("progress"),
                "stage": job.get("stage"), "attempts": job.get("attempts", 0)}

    def close(self):
        """Nothing to close: the store owns the connection to the bucket."""


def _node_id(path):
    """This node's id in the shared queue, kept in its --dir so that it survives a restart."""
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
        if storage.valid_file_id(value):
            return value
    except OSError:
        pass
    value = uuid.uuid4().hex[:16]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return value


# ---------------------------------------------------------------------------------------------
# ffmpeg and ffprobe command lines (public: the benchmark runs the same ones by hand)
# ---------------------------------------------------------------------------------------------

_QUIET = ["-nostdin", "-hide_banner", "-loglevel", "error"]
_PROGRESS = ["-progress", "pipe:1", "-nostats"]
# The demuxer for each media signature of storage.MEDIA_SIGNATURES (see input_args).
DEMUXERS = {b"\x1a\x45\xdf\xa3": "matroska", b"ftyp": "mov", b"OggS": "ogg"}


def input_args(path):
    """How every program here opens a file: with the demuxer its media signature names, and
    the file protocol only. Left to itself, ffmpeg picks the demuxer from the bytes, and an
    upload is not to be believed (--allow-any-content lets anything in): an ffconcat script
    made it read another user's video, an HLS playlist a file outside the upload folder
    (issue #15). A file with no signature is not processed at all."""
    with open(path, "rb") as f:
        head = f.read(storage.SIGNATURE_BYTES)
    for at, magic in storage.MEDIA_SIGNATURES:
        if head[at:at + len(magic)] == magic:
            return ["-protocol_whitelist", "file", "-f", DEMUXERS[magic], "-i", path]
    raise JobFailed("the upload does not start with a WebM, MP4 or Ogg signature; it is "
                    "not processed")


def probe_args(path):
    return ["-hide_banner", "-loglevel", "error", "-print_format", "json", "-show_format",
            "-show_streams"] + input_args(path)


def scan_args(path):
    """Read every packet without decoding: the last timestamp is the true duration."""
    return _QUIET + input_args(path) + ["-map", "0:v?", "-map", "0:a?", "-c", "copy"] + \
        _PROGRESS + ["-f", "null", "-"]


def remux_args(source, target, container):
    """Same packets, new container: the muxer writes the duration and the cues (an index);
    MP4 gets its moov box in front (+faststart) so playback starts before the download ends."""
    args = _QUIET + ["-y"] + input_args(source) + ["-map", "0:v?", "-map", "0:a?", "-c",
                                                   "copy"]
    if container in ("mp4", "mov"):
        args += ["-movflags", "+faststart"]
    return args + _PROGRESS + ["-f", container, target]


def poster_args(source, target, at_seconds, max_height):
    return _QUIET + ["-y", "-ss", "%.3f" % at_seconds] + input_args(source) + [
        "-map", "0:v:0", "-frames:v", "1", "-vf", "scale=-1:'min(ih,%d)'" % max_height,
        "-q:v", POSTER_JPEG_QUALITY, "-f", "image2", "-update", "1", target]


def mp4_args(source, target, max_height, crf, has_video=True, has_audio=True,
             realtime=False):
    """H.264 (yuv420p, even sizes, at most max_height lines) + AAC, +faststart. Frames keep
    their own timestamps (-vsync vfr): MediaRecorder's frame rate varies."""
    args = _QUIET + ["-y"] + (["-re"] if realtime else []) + input_args(source)
    if has_video:
        args += ["-map", "0:v:0", "-c:v", "libx264", "-preset", MP4_PRESET, "-crf", str(crf),
                 "-pix_fmt", "yuv420p",
                 "-vf", "scale=-2:'trunc(min(ih,%d)/2)*2'" % max_height, "-vsync", "vfr"]
    if has_audio:
        args += ["-map", "0:a:0", "-c:a", "aac", "-b:a", MP4_AUDIO_BITRATE]
    return args + ["-movflags", "+faststart"] + _PROGRESS + ["-f", "mp4", target]


def remux_target(upload_ext, info):
    """(derivative name, ffmpeg muxer) for the seekable copy of an upload."""
    if upload_ext in ("mp4", "mov"):
        return "remux.%s" % upload_ext, upload_ext
    if upload_ext == "ogg":
        return "remux.ogg", "ogg"
    codecs = set(s.get("codec_name") for s in info.get("streams", [])
                 if s.get("codec_type") in ("video", "audio"))
    if codecs <= WEBM_CODECS:
        return "remux.webm", "webm"
    return "remux.mkv", "matroska"


def video_facts(info, size):
    """SPEC section 5's `video` object from ffprobe's JSON (None where unknown)."""
    video = _first_stream(info, "video")
    audio = _first_stream(info, "audio")
    width = height = None
    if video is not None:
        width, height = video.get("width"), video.get("height")
        if width and height and abs(_rotation(video)) in (90, 270):
            width, height = height, width        # a phone held upright
    facts = {"durationSeconds": _duration_of(info), "width": width, "height": height,
             "videoCodec": video.get("codec_name") if video else None,
             "audioCodec": audio.get("codec_name") if audio else None,
             "bitRate": _int_or_none(info.get("format", {}).get("bit_rate"))}
    if facts["durationSeconds"] is not None:
        facts["durationSeconds"] = round(facts["durationSeconds"], 3)
    _fill_bit_rate(facts, size)
    return facts


def find_tools(ffmpeg, ffprobe):
    """(ffmpeg path, ffprobe path, None) or (None, None, why processing is unavailable)."""
    found_ffmpeg = shutil.which(ffmpeg)
    if found_ffmpeg is None:
        return None, None, "ffmpeg not found (%r; install it or set --ffmpeg)" % ffmpeg
    found_ffprobe = shutil.which(ffprobe)
    if found_ffprobe is None and ffprobe == DEFAULT_FFPROBE:
        found_ffprobe = shutil.which(ffprobe, path=os.path.dirname(found_ffmpeg))
    if found_ffprobe is None:
        return None, None, "ffprobe not found (%r; install it or set --ffprobe)" % ffprobe
    return found_ffmpeg, found_ffprobe, None


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _derivative_fields(file_id, derivatives):
    urls = dict((kind, derivative_url(file_id, name)) for kind, name in derivatives.items())
    fields = {"derivatives": urls}
    for kind in BEST_PLAYBACK:
        if kind in urls:
            fields["playbackUrl"] = urls[kind]
            break
    return fields


def _first_stream(info, kind):
    for stream in info.get("streams", []):
        if stream.get("codec_type") == kind and \
                not stream.get("disposition", {}).get("attached_pic"):
            return stream
    return None


def _has_stream(info, kind):
    return _first_stream(info, kind) is not None


def _duration_of(info):
    """The container's duration when it states one (a live WebM does not)."""
    value = _float_or_none(info.get("format", {}).get("duration"))
    return value if value and value > 0 else None


def _fill_bit_rate(facts, size):
    if not facts.get("bitRate") and facts.get("durationSeconds"):
        facts["bitRate"] = int(size * 8 / facts["durationSeconds"])


def _rotation(stream):
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            return int(_float_or_none(side["rotation"]) or 0)
    return int(_float_or_none(stream.get("tags", {}).get("rotate")) or 0)


def _float_or_none(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int_or_none(value):
    number = _float_or_none(value)
    return int(number) if number is not None else None


def _dumps(value):
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _nice_prefix():
    """Run our programs below normal priority: `nice` where it exists (POSIX)."""
    nice = shutil.which("nice") if os.name == "posix" else None
    return [nice, "-n", str(NICE_INCREMENT)] if nice else []


def _spawn(argv):
    """Start a program in its own session (a Ctrl-C meant for the server does not reach it;
    the server stops it itself), below normal priority on Windows."""
    options = {}
    if os.name == "posix":
        options["start_new_session"] = True
    else:
        options["creationflags"] = getattr(subprocess, "BELOW_NORMAL_PRIORITY_CLASS", 0)
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **options)


def _terminate(proc):
    """SIGTERM (ffmpeg stops at once and closes its files), SIGKILL after KILL_GRACE_S."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(OSError):
        proc.terminate()
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()


def _kill_orphan(pid, marker, programs):
    """Kill a program a crashed server left running, if `pid` is still that program (its
    command line starts with one of `programs` and holds `marker`, the file it worked on):
    the pid may have been reused by anything since."""
    command = _command_of(pid)
    if command is None or not marker or marker not in command or \
            not any(command.startswith(p) for p in programs if p):
        return
    log.warning("killing ffmpeg/ffprobe %d left running by a crash", pid)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)     # its own session: pid is its process group
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_GRACE_S
    while _command_of(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.02)


def _command_of(pid):
    """The command line of a live process, or None (gone, a zombie, or unknowable here)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            text = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        return text or None                  # a zombie has an empty command line
    except OSError:
        pass
    if os.name != "posix" or os.path.isdir("/proc"):
        return None
    try:                                     # macOS and the BSDs have no /proc
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.decode("utf-8", "replace").strip() or None


def _read_lines(stream, tail):
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            tail.append(line)


def _clean_stderr(lines, folders):
    """ffmpeg's last lines for a client: no server paths, no control characters."""
    text = " | ".join(lines)
    for folder in sorted(set(f for f in folders if f), key=len, reverse=True):
        text = text.replace(folder.rstrip(os.sep) + os.sep, "")
    return "".join(c if c.isprintable() else "?" for c in text)[:MAX_ERROR_CHARS]


def _command_line(argv):
    return " ".join(shlex.quote(a) for a in argv)
