"""``gradguard run``: unmodified scripts under the guard through the real command line.

Tutorial-shaped scripts (tests/run_scripts/) train exactly as they do without gradguard, keep their
output and exit code, and leave a run directory; fault scripts (tests/faults/) get their first
non-finite value located and reported on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradguard.runlog import read_run

HERE = Path(__file__).parent
SCRIPTS = HERE / "run_scripts"
FAULTS = HERE / "faults"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def gradguard(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gradguard", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def plain(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=ENV, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("script", "args", "optimizers"),
    [("mnist_like.py", ["--epochs", "1"], 1), ("seq2seq.py", ["40"], 2), ("amp_scaler.py", [], 1)],
)
def test_tutorial_scripts_train_exactly_as_without_gradguard(
    tmp_path: Path, script: str, args: list[str], optimizers: int
) -> None:
    path = SCRIPTS / script
    ref = plain(path, *args, cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    got = gradguard("run", "--out", str(tmp_path / "run"), "--no-report", str(path), *args, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert got.stdout == ref.stdout  # the script's own output, and the same training
    assert "gradguard:" not in got.stdout and "gradguard:" in got.stderr
    log = read_run(tmp_path / "run")
    assert log.metrics and not log.events_of("nonfinite")
    assert log.meta["argv"]  # the run directory records the command line
    extra = [tmp_path / "run" / f"optimizer{k}" for k in range(1, optimizers)]
    assert all((d / "metrics.jsonl").exists() for d in extra)


def test_the_script_exit_code_and_failures_are_kept(tmp_path: Path) -> None:
    got = gradguard(
        "run",
        "--out",
        str(tmp_path / "a"),
        "--no-report",
        str(SCRIPTS / "amp_scaler.py"),
        "--exit-3",
        cwd=tmp_path,
    )
    assert got.returncode == 3
    crash = tmp_path / "crash.py"
    crash.write_text("import torch\nraise RuntimeError('boom from the script')\n")
    got = gradguard("run", "--out", str(tmp_path / "b"), str(crash), cwd=tmp_path)
    assert got.returncode == 1 and "boom from the script" in got.stderr
    assert "no optimizer step was seen" in got.stderr
    got = gradguard("run", str(tmp_path / "missing.py"), cwd=tmp_path)
    assert got.returncode == 2 and "no such script" in got.stderr
    got = gradguard("run", "--on-nonfinite", "ignore", str(crash), cwd=tmp_path)
    assert got.returncode == 2 and "invalid choice" in got.stderr


@pytest.mark.parametrize("fault", ["masked_attention", "data_nan", "where_nan_grad", "zero_count"])
def test_a_fault_script_is_located_and_reported(tmp_path: Path, fault: str) -> None:
    got = gradguard("run", "--out", str(tmp_path / "run"), str(FAULTS / f"{fault}.py"), cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    expected = next(
        json.loads(line.split("=", 1)[1].strip().replace("None", "null"))
        for line in (FAULTS / f"{fault}.py").read_text().splitlines()
        if line.startswith("EXPECTED")
    )
    event = read_run(tmp_path / "run").first_nonfinite()
    assert {k: event.get(k) for k in expected} == expected
    assert f"first non-finite value at step {event['step']}" in got.stderr
    if expected.get("op"):
        assert f"op={expected['op']}" in got.stderr
    assert (tmp_path / "run" / "report.html").exists()
