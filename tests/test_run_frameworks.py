"""``gradguard run`` on framework scripts: a script that builds a ``lightning.Trainer`` gets gradguard's
Lightning callback attached (zero code): its numbers reach the Trainer's loggers, Lightning's own
``gradient_clip_val`` stays and is logged, its checkpoints stay what a plain run writes; ``--clip``
replaces ``gradient_clip_val`` (said once). The healthy / diverging runs of the Lightning and HF
Trainer scripts themselves are in tests/test_run_scripts.py.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradguard.runlog import read_run

pytest.importorskip("lightning")

SCRIPT = Path(__file__).parent / "run_scripts" / "lightning_classifier.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gradguard", "run", "--no-report", "--out", str(tmp_path / "run"), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)


def test_a_lightning_trainer_gets_the_callback_and_its_loggers_the_numbers(tmp_path: Path) -> None:
    got = _run(tmp_path, str(SCRIPT), "--epochs", "1", "--csv-logs", "logs")
    assert got.returncode == 0, got.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "logs" / "spiral" / "version_0" / "metrics.csv").open()))
    norms = [float(r["gradguard/grad_norm"]) for r in rows if r.get("gradguard/grad_norm")]
    log = read_run(tmp_path / "run")
    assert norms == pytest.approx([r["grad_norm"] for r in log.metrics])  # the callback's numbers
    assert all(r["threshold"] == pytest.approx(0.46) for r in log.metrics)  # Lightning's clip, logged
    assert log.metrics[0]["clip_fraction"] in (0.0, 1.0)


def test_clip_on_the_command_line_replaces_gradient_clip_val(tmp_path: Path) -> None:
    got = _run(tmp_path, "--clip", "norm:0.2", str(SCRIPT), "--epochs", "1")
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stderr.count("replaces the script's Trainer(gradient_clip_val=0.46)") == 1
    log = read_run(tmp_path / "run")
    assert all(r["threshold"] == pytest.approx(0.2) for r in log.metrics)
    assert sum(r["clip_fraction"] for r in log.metrics) > 0
