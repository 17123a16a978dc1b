"""Test helper: run a command under real ``torchrun`` (gloo, CPU, 2 ranks) on a free local port.

One upstream failure is retried, and only that one: with torch 2.13's gloo, a rank can abort at
interpreter exit *after* its script has finished ("terminate called without an active exception",
the rank's exit code -6). A gloo worker thread drops its last finished collective late, and the
tensors that collective held then take the GIL while Python is being finalised (core dump: the
thread is in ``ProcessGroupGloo::runLoop`` → ``~AsyncWork`` → ``decref_pyobject`` →
``take_gil`` → ``pthread_exit``; described upstream in pytorch/pytorch#179291, fix abandoned).
The plain scripts abort the same way without gradguard: 3 of 30 runs of the plain DDP script on
this loaded 2-core machine, as often as under ``gradguard run`` (2 of 13). Any other failure,
and this one twice in a row, fails the test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["free_port", "torchrun"]

EXIT_ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _aborted_at_exit(proc: subprocess.CompletedProcess[str]) -> bool:
    """torchrun failed only because a rank hit the gloo abort at interpreter exit."""
    return proc.returncode != 0 and EXIT_ABORT in proc.stderr and "(exitcode: -6)" in proc.stderr


def torchrun(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    fresh: Sequence[Path] = (),
    nproc: int = 2,
) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --nproc-per-node 2 ARGS`` on 127.0.0.1 and a free port;
    the folders in ``fresh`` are emptied before each try (a retry starts from nothing)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", **(env or {})}
    for _ in range(2):
        for folder in fresh:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args,
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if not _aborted_at_exit(proc):
            return proc
    return proc
