"""``gradguard run`` and the plain script as a subprocess, for the tests that compare them (one helper)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def gradguard_run(
    cwd: Path, script: Path, *args: str, out: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``gradguard run --out OUT --no-report SCRIPT ARGS`` in ``cwd`` (``OUT``: ``cwd/run`` by default;
    ``env``: in place of :data:`ENV`)."""
    cmd = [
        sys.executable,
        "-m",
        "gradguard",
        "run",
        "--out",
        str(out or cwd / "run"),
        "--no-report",
        str(script),
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=300)


def plain_run(
    cwd: Path, script: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python SCRIPT ARGS`` in ``cwd``."""
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
