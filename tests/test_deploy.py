"""The deployment files stay true to the program: the systemd unit verifies, and the flags
and paths that deploy/ relies on exist."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

from conftest import ROOT, SERVER_PYTHON, need

UNIT = os.path.join(ROOT, "deploy", "m1server.service")
DOCKERFILE = os.path.join(ROOT, "deploy", "Dockerfile")


def help_text():
    return subprocess.run([SERVER_PYTHON, os.path.join(ROOT, "m1server.py"), "--help"],
                          stdout=subprocess.PIPE, check=True).stdout.decode()


def test_systemd_unit_verifies():
    tool = shutil.which("systemd-analyze")
    need(tool, "systemd-analyze is not installed")
    result = subprocess.run([tool, "verify", UNIT], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert result.returncode == 0, result.stdout.decode()


def test_unit_is_hardened_and_uses_real_flags():
    unit = open(UNIT, encoding="utf-8").read()
    for setting in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes",
                    "ReadWritePaths=/var/lib/m1server"):
        assert setting in unit
    command = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
    flags = set(re.findall(r"--[a-z-]+", command))
    assert flags and flags <= set(re.findall(r"--[a-z-]+", help_text()))


def test_dockerfile_runs_the_pyz_with_documented_settings():
    text = open(DOCKERFILE, encoding="utf-8").read()
    assert "COPY dist/m1server.pyz" in text
    assert re.search(r"^USER (?!root)", text, re.M)
    for name in re.findall(r"\b(M1_[A-Z_]+)=", text):
        assert name in help_text(), name
