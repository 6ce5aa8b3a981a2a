"""processing: the time to process a 60 s 720p recording in each mode, against the same
ffmpeg commands run by hand, and the server's peak RSS meanwhile (issue 6, "Measure").

    python bench/bench_processing.py                 # probe, remux and mp4; about 3-5 min
    python bench/bench_processing.py --quick         # a 10 s recording
    python bench/bench_processing.py --modes remux --rounds 3

The recording is made once with ffmpeg as MediaRecorder writes one: 1280x720, 30 fps, VP8 (or
--codec vp9) + Opus, a live WebM (no duration, no cues), 1 s clusters. For each mode a fresh
server (`--processing MODE`, everything else as SPEC §9's benchmarks run it) receives it as
1 s chunks on one keep-alive connection; the job's time is the server's own
`processing.finishedAt - startedAt` (ms resolution) and includes its probe, its remux, its
poster and its MP4, whichever the mode runs, plus the Python between them.

"By hand" replays the very command lines the server logged for that job (so the flags, the
`nice` prefix and the order are the same), each output written to a scratch folder instead of
the server's, one after the other, timed from the first start to the last exit (odd rounds run them before
the server, with the previous round's commands, so neither side always goes second). The ratio
server / by hand should be about 1: what the server adds is its bookkeeping, not ffmpeg work.
On a shared machine wall time swings with other people's load, so the CPU seconds of the
ffmpeg/ffprobe processes are compared too (server: its reaped children, /proc/<pid>/stat
cutime+cstime; by hand: RUSAGE_CHILDREN), with the server's own CPU during the job.

Memory: the server's RSS (VmRSS) is sampled every 20 ms while the job runs; the report gives
the highest sample and the server's VmHWM before and after the job (the upload itself is in
VmHWM before). ffmpeg's own peak (sampled the same way, children of the server) is shown for
context: it is a separate process and does not count toward the server's RSS.

As a module of bench/run.py (NAME, run(ctx)) it can be listed in BENCHMARKS later; it is not,
for now, since a full run costs minutes of CPU that the SPEC §9 figures do not need.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c  # noqa: E402

NAME = "processing"
MODES = ("probe", "remux", "mp4")
RECORDING_SECONDS = 60
QUICK_SECONDS = 10
RECORDING_SIZE = "1280x720"
RECORDING_FPS = 30
VIDEO_BITRATE = "2500k"             # Chrome's MediaRecorder default for 720p is ~2.5 Mb/s
JOB_DEADLINE_S = 900.0
SAMPLE_INTERVAL_S = 0.02
COMMAND_LINE = re.compile(r"INFO m1server\.processing: processing (\S+): (.+)$")
PART_NAME = re.compile(r"\.([a-z0-9]+\.[a-z0-9]+)\.[0-9a-f]+\.part$")


def run(ctx):
    seconds = QUICK_SECONDS if ctx.quick else RECORDING_SECONDS
    modes = getattr(ctx, "modes", None) or MODES
    rounds = getattr(ctx, "processing_rounds", 1)
    codec = getattr(ctx, "codec", "vp8")
    figures = {"recording": {}, "modes": {}}
    rows, notes, targets = [], [], []
    with c.Workspace(NAME) as ws:
        path = os.path.join(ws.path, "recording.webm")
        ctx.log("making a %d s %s %s+opus live WebM" % (seconds, RECORDING_SIZE, codec))
        made = make_recording(path, seconds, codec)
        figures["recording"] = made
        payload = open(path, "rb").read()
        for mode in modes:
            results = []
            previous = None
            for number in range(rounds):
                # Odd rounds run "by hand" first (the previous round's commands), so that
                # neither side always runs second on a machine whose load drifts.
                result = measure_mode(ctx, ws, mode, number, payload, seconds,
                                      previous if number % 2 else None)
                previous = result.pop("argvs")
                results.append(result)
                ctx.log("%-5s round %d: wall server %.2f s / by hand %.2f s = %.2f; ffmpeg CPU "
                        "%.2f s / %.2f s = %.2f; server's own CPU %.2f s; RSS peak %.1f MiB"
                        % (mode, number + 1, result["server_s"], result["by_hand_s"],
                           result["ratio"], result["server_ffmpeg_cpu_s"],
                           result["by_hand_cpu_s"], result["cpu_ratio"],
                           result["server_own_cpu_s"], result["server_rss_peak_kib"] / 1024.0))
            summary = summarise(results)
            figures["modes"][mode] = {"rounds": results, "median": summary}
            rows.append([
                "%s (%d round%s)" % (mode, rounds, "" if rounds == 1 else "s"),
                "server %.2f s / by hand %.2f s = %.2f" % (
                    summary["server_s"], summary["by_hand_s"], summary["ratio"]),
                "ffmpeg CPU %.2f s / %.2f s = %.2f; server's own CPU %.2f s; "
                "server RSS peak %.1f MiB (HWM %.1f -> %.1f MiB); ffmpeg peak %.0f MiB; "
                "%d command(s)" % (summary["server_ffmpeg_cpu_s"], summary["by_hand_cpu_s"],
                                   summary["cpu_ratio"], summary["server_own_cpu_s"],
                                   summary["server_rss_peak_kib"] / 1024.0,
                                   summary["server_hwm_before_kib"] / 1024.0,
                                   summary["server_hwm_after_kib"] / 1024.0,
                                   summary["ffmpeg_rss_peak_kib"] / 1024.0,
                                   results[-1]["commands"])])
            targets.append(c.target("%s: server / by hand, wall (about 1)" % mode,
                                    summary["ratio"], 1.1, "lower", "x"))
            targets.append(c.target("%s: server / by hand, ffmpeg CPU (about 1)" % mode,
                                    summary["cpu_ratio"], 1.1, "lower", "x"))
    notes.append("recording: %.1f MiB, %s, made in %.1f s" % (
        made["bytes"] / c.MIB, made["codec"], made["encode_s"]))
    return {"title": "processing: a %d s %s recording, server vs the same ffmpeg commands "
                     "by hand" % (seconds, RECORDING_SIZE),
            "figures": figures, "rows": rows, "targets": targets, "notes": notes}


def make_recording(path, seconds, codec):
    """What Chrome's MediaRecorder writes: live WebM (no duration, no cues), VP8/VP9 + Opus."""
    video = ["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8"] if codec == "vp8" \
        else ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1"]
    started = time.perf_counter()
    made = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
         "testsrc2=size=%s:rate=%d" % (RECORDING_SIZE, RECORDING_FPS), "-f", "lavfi", "-i",
         "sine=frequency=440:sample_rate=48000", "-t", str(seconds)] + video +
        ["-b:v", VIDEO_BITRATE, "-c:a", "libopus", "-b:a", "128k", "-live", "1",
         "-cluster_time_limit", "1000", "-f", "webm", path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if made.returncode != 0:
        raise c.BenchError("ffmpeg could not make the recording: %s"
                           % made.stderr.decode(errors="replace")[-500:])
    return {"seconds": seconds, "size": RECORDING_SIZE, "codec": codec + "+opus",
            "bytes": os.path.getsize(path), "encode_s": time.perf_counter() - started}


def measure_mode(ctx, ws, mode, number, payload, seconds, hand_first):
    directory = ws.sub("%s-%d" % (mode, number))
    file_id = "bench_processing_%s_%d" % (mode, number)
    scratch = ws.sub("%s-%d-by-hand" % (mode, number))
    if hand_first:
        by_hand_s, by_hand_cpu_s = replay(hand_first, scratch)
    server = c.ServerProcess("m1server", directory, ctx.python,
                             extra_args=["--processing", mode])
    with server.start():
        upload(server, file_id, payload, seconds)
        hwm_before = c.proc_status_kib(server.pid, "VmHWM") or 0
        own_before, children_before = proc_cpu(server.pid)
        status, peak, ffmpeg_peak = wait_processed(server, file_id)
        own_after, children_after = proc_cpu(server.pid)
        hwm_after = c.proc_status_kib(server.pid, "VmHWM") or 0
        log_text = server.log_text()
    processing = status["processing"]
    if processing["state"] != "done":
        raise c.BenchError("%s: processing ended %s: %s" % (mode, processing["state"],
                                                           processing.get("error")))
    server_s = iso_seconds(processing["finishedAt"]) - iso_seconds(processing["startedAt"])
    commands = logged_commands(log_text, file_id)
    if not hand_first:
        by_hand_s, by_hand_cpu_s = replay(commands, scratch)
    server_ffmpeg_cpu_s = children_after - children_before
    return {"server_s": server_s, "by_hand_s": by_hand_s, "ratio": server_s / by_hand_s,
            "server_ffmpeg_cpu_s": server_ffmpeg_cpu_s, "by_hand_cpu_s": by_hand_cpu_s,
            "cpu_ratio": server_ffmpeg_cpu_s / max(by_hand_cpu_s, 0.01),
            "server_own_cpu_s": own_after - own_before, "hand_first": bool(hand_first),
            "argvs": commands, "commands": len(commands), "server_rss_peak_kib": peak,
            "server_hwm_before_kib": hwm_before, "server_hwm_after_kib": hwm_after,
            "ffmpeg_rss_peak_kib": ffmpeg_peak, "video": status.get("video"),
            "derivative_bytes": derivative_sizes(directory, file_id)}


def upload(server, file_id, payload, count):
    """The recording as `count` chunks (one a second), as a recorder sends it."""
    size = -(-len(payload) // count)
    with c.Connection(server.host, server.port) as conn:
        for index in range(count):
            piece = payload[index * size:(index + 1) * size]
            status = "completed" if index == count - 1 else "uploading"
            reply = conn.request(c.upload_request(server.host, server.port, file_id, index,
                                                  status, piece))
            if reply.status != 200:
                raise c.BenchError("chunk %d refused: %s" % (index, reply.body[:200]))


def wait_processed(server, file_id):
    """Poll status until the job ends, sampling RSS of the server and its ffmpeg meanwhile."""
    deadline = time.monotonic() + JOB_DEADLINE_S
    peak = ffmpeg_peak = 0
    last_status = 0.0
    with c.Connection(server.host, server.port) as conn:
        while True:
            peak = max(peak, c.rss_kib(server.pid) or 0)
            for child in children(server.pid):
                ffmpeg_peak = max(ffmpeg_peak, c.proc_status_kib(child, "VmRSS") or 0)
            now = time.monotonic()
            if now - last_status >= 0.1:
                last_status = now
                data = conn.get("/api/video/status/" + file_id).json()["data"]
                if data.get("processing", {}).get("state") in ("done", "failed"):
                    return data, peak, ffmpeg_peak
            if now > deadline:
                raise c.BenchError("processing of %s passed %.0f s" % (file_id,
                                                                      JOB_DEADLINE_S))
            time.sleep(SAMPLE_INTERVAL_S)


def children(pid):
    """Child processes of every thread of `pid` (ffmpeg is started by a worker thread, and
    Linux lists a child under the thread that forked it)."""
    found = []
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return found
    for task in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                found.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            pass
    return found


def logged_commands(log_text, file_id):
    commands = []
    for line in log_text.splitlines():
        match = COMMAND_LINE.search(line)
        if match and match.group(1) == file_id and not match.group(2).startswith("done "):
            argv = shlex.split(match.group(2))
            if any(os.path.basename(a) in ("ffmpeg", "ffprobe") for a in argv[:4]):
                commands.append(argv)
    if not commands:
        raise c.BenchError("no ffmpeg command lines for %s in the server log" % file_id)
    return commands


def proc_cpu(pid):
    """(CPU seconds of `pid` itself, CPU seconds of its reaped children) from
    /proc/<pid>/stat (utime+stime, cutime+cstime); (0, 0) off Linux."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0, 0.0
    tick = float(os.sysconf("SC_CLK_TCK"))
    return ((int(fields[11]) + int(fields[12])) / tick,
            (int(fields[13]) + int(fields[14])) / tick)


def replay(commands, scratch):
    """Run the server's commands again, outputs (and the later inputs that read them) moved
    to `scratch`; returns (wall seconds from the first start to the last exit, CPU seconds of
    those processes)."""
    derived = {}
    argvs = []
    for argv in commands:
        moved = []
        for arg in argv:
            part = PART_NAME.search(arg)
            if part:
                derived[os.path.join(os.path.dirname(arg), part.group(1))] = \
                    os.path.join(scratch, part.group(1))
                arg = os.path.join(scratch, part.group(1))
            else:
                arg = derived.get(arg, arg)
            moved.append(arg)
        argvs.append(moved)
    import resource
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    for argv in argvs:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        if done.returncode != 0:
            raise c.BenchError("by hand: %s failed: %s" % (" ".join(argv[:6]),
                                                          done.stderr.decode()[-300:]))
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (cpu_after.ru_utime - cpu_before.ru_utime +
                  cpu_after.ru_stime - cpu_before.ru_stime)


def derivative_sizes(directory, file_id):
    folder = os.path.join(directory, "derived", file_id)
    if not os.path.isdir(folder):
        return {}
    return dict((n, os.path.getsize(os.path.join(folder, n))) for n in os.listdir(folder))


def summarise(results):
    keys = ("server_s", "by_hand_s", "ratio", "server_ffmpeg_cpu_s", "by_hand_cpu_s",
            "cpu_ratio", "server_own_cpu_s", "server_rss_peak_kib", "server_hwm_before_kib",
            "server_hwm_after_kib", "ffmpeg_rss_peak_kib")
    return dict((k, c.median([r[k] for r in results])) for k in keys)


def iso_seconds(text):
    """'2024-01-01T00:00:00.123Z' -> seconds since the epoch (ms resolution)."""
    import calendar
    base, _, millis = text.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + int(millis or 0) / 1e3


# ---------------------------------------------------------------------------------------------
# Standalone

def main(argv=None):
    import run as suite
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a %d s recording" % QUICK_SECONDS)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per mode (median)")
    parser.add_argument("--codec", choices=("vp8", "vp9"), default="vp8")
    parser.add_argument("--python", default=None, help="interpreter for the server")
    parser.add_argument("--out", default=os.path.join(c.BENCH_DIR, "out", "processing.json"))
    args = parser.parse_args(argv)
    ctx = suite.Context(args.quick, args.python or c.base_python(), 1, [])
    ctx.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    ctx.processing_rounds = max(1, args.rounds)
    ctx.codec = args.codec
    return suite.run_alone(ctx, NAME, lambda: run(ctx), args.out)


if __name__ == "__main__":
    sys.exit(main())
