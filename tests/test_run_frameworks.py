"""``gradguard run`` on framework scripts: a script that builds a ``lightning.Trainer`` gets gradguard's
Lightning callback attached (zero code): its numbers reach the Trainer's loggers, Lightning's own
``gradient_clip_val`` stays and is logged, its checkpoints stay what a plain run writes; ``--clip``
replaces ``gradient_clip_val`` (said once). A ``transformers.Trainer``'s LR scheduler does not
advance on a step the guard skipped: its schedule is that of a run that never took that step. The
healthy / diverging runs of the Lightning and HF Trainer scripts themselves are in
tests/test_run_scripts.py.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gradguard.runlog import read_run

SCRIPTS = Path(__file__).parent / "run_scripts"
SCRIPT = SCRIPTS / "lightning_classifier.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def lightning() -> None:
    pytest.importorskip("lightning")


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gradguard", "run", "--no-report", "--out", str(tmp_path / "run"), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.usefixtures("lightning")
def test_a_lightning_trainer_gets_the_callback_and_its_loggers_the_numbers(tmp_path: Path) -> None:
    got = _run(tmp_path, str(SCRIPT), "--epochs", "1", "--csv-logs", "logs")
    assert got.returncode == 0, got.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "logs" / "spiral" / "version_0" / "metrics.csv").open()))
    norms = [float(r["gradguard/grad_norm"]) for r in rows if r.get("gradguard/grad_norm")]
    log = read_run(tmp_path / "run")
    assert norms == pytest.approx([r["grad_norm"] for r in log.metrics])  # the callback's numbers
    assert all(r["threshold"] == pytest.approx(0.46) for r in log.metrics)  # Lightning's clip, logged
    assert log.metrics[0]["clip_fraction"] in (0.0, 1.0)


@pytest.mark.usefixtures("lightning")
def test_clip_on_the_command_line_replaces_gradient_clip_val(tmp_path: Path) -> None:
    got = _run(tmp_path, "--clip", "norm:0.2", str(SCRIPT), "--epochs", "1")
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stderr.count("replaces the script's Trainer(gradient_clip_val=0.46)") == 1
    log = read_run(tmp_path / "run")
    assert all(r["threshold"] == pytest.approx(0.2) for r in log.metrics)
    assert sum(r["clip_fraction"] for r in log.metrics) > 0


@pytest.mark.usefixtures("lightning")
def test_lightnings_value_clip_is_logged_too(tmp_path: Path) -> None:
    """``gradient_clip_algorithm="value"``: the summary read "clipping none (clip rate 0)" while Lightning
    clamped every step; the row now holds the fraction of elements it clamped."""
    got = _run(tmp_path, str(SCRIPT), "--epochs", "1", "--clip", "0.01", "--clip-algorithm", "value")
    assert got.returncode == 0, got.stderr[-3000:]
    assert "the script called clip_grad_value_(clip_value=0.01)" in got.stderr
    log = read_run(tmp_path / "run")
    fractions = [r["clip_fraction"] for r in log.metrics]
    assert all(0 < f <= 1 for f in fractions) and all(
        r["threshold"] is None or r["threshold"] == float("inf") for r in log.metrics
    )


def _lrs(stdout: str) -> list[float]:
    """The learning rate hf_trainer.py printed for each step (the one that step used)."""
    return [float(x) for x in re.findall(r" lr (\S+)$", stdout, re.MULTILINE)]


def test_a_skipped_hf_trainer_step_does_not_advance_its_lr_schedule(tmp_path: Path) -> None:
    """hf_trainer.py (warm-up 2 steps, then linear decay over 12) with a NaN loss at step 5: the guard
    skips that step and the Trainer's scheduler holds, as on an fp16 overflow; from then on the LR
    is the plain run's one step behind — the schedule of a run that never took that step."""
    pytest.importorskip("transformers")
    hf = str(SCRIPTS / "hf_trainer.py")
    (tmp_path / "plain").mkdir()
    plain = subprocess.run(
        [sys.executable, hf], cwd=tmp_path / "plain", env=ENV, capture_output=True, text=True, timeout=600
    )
    got = _run(tmp_path, hf, "--nan-at", "5")
    assert plain.returncode == got.returncode == 0, got.stderr[-3000:]
    ref, lrs = _lrs(plain.stdout), _lrs(got.stdout)
    assert len(ref) == len(lrs) == 12 and ref[0] < ref[2] > ref[-1]  # warm-up, then decay
    # the Trainer logs step s (1-based) with the LR it used; guard step 5 is the Trainer's step 6
    assert lrs == ref[:6] + ref[5:11]
    assert lrs[6] == ref[5] != ref[6]  # held on the step after the skip
    assert "12 steps, 1 skipped" in got.stderr
    log = read_run(tmp_path / "run")
    assert [r["step"] for r in log.metrics if r["skipped"]] == [5]
    assert [r["lr"] for r in log.metrics] == pytest.approx(lrs)  # the guard logs the LR each step used


LIGHTNING_DDP = """
import lightning as L
import torch
from torch import nn


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    trainer = L.Trainer(
        strategy="ddp", devices=2, accelerator="cpu", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=16))
    print("fit done on rank", trainer.global_rank)
"""


@pytest.mark.usefixtures("lightning")
def test_a_trainer_that_starts_its_own_ranks_is_not_guarded_half_and_does_not_hang(tmp_path: Path) -> None:
    """``Trainer(strategy="ddp", devices=2)`` run as ``gradguard run train.py`` (no torchrun): Lightning
    starts rank 1 as a plain ``python train.py``; rank 0's guard waited in a broadcast for a rank that
    has no guard while rank 1 waited in Lightning's barrier: a silent hang. Now gradguard says so,
    names the torchrun command, and the script runs to its end unguarded."""
    script = tmp_path / "train.py"
    script.write_text(LIGHTNING_DDP)
    got = _run(tmp_path, str(script))
    assert got.returncode == 0, got.stderr[-3000:]
    assert "fit done on rank 0" in got.stdout
    assert (
        "starts its other 1 process(es) itself" in got.stderr
        and "torchrun --nproc-per-node 2 -m gradguard run" in got.stderr
    )


@pytest.mark.usefixtures("lightning")
def test_hf_trainers_gradient_accumulation_is_not_called_summed(tmp_path: Path) -> None:
    """HF Trainer (gradient_accumulation_steps=2) normalises its micro-batch losses itself (the token
    count of the whole batch, or loss / steps in its backward): the loss code shows no factor, and a
    diverging run read "each optimizer step follows 2 backward() calls whose losses are not divided by 2"."""
    pytest.importorskip("transformers")
    got = _run(tmp_path, str(SCRIPTS / "hf_trainer.py"), "--max-steps", "4")
    assert got.returncode == 0, got.stderr[-3000:]
    meta = read_run(tmp_path / "run", records=False).meta
    assert meta["steps"] == 4 and "accumulation" not in meta, meta.get("accumulation")
