"""TensorBoard and W&B sinks: the guard's records, at its flush cadence, read back from the real files."""

from __future__ import annotations

import math

import pytest
import torch

import gradguard
from gradguard import runlog
from gradguard.errors import GradGuardError
from gradguard.integrations.sinks import TensorBoardSink, WandbSink, attach

STEPS, EVERY, NAN_STEP = 20, 5, 7


def _train(guard: gradguard.Guard, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model(torch.randn(8, 4, generator=g)).pow(2).mean()
        if step == NAN_STEP:
            loss = loss * math.nan
        loss.backward()
        guard.step(loss)
    guard.close()


def _guard(tmp_path) -> tuple[gradguard.Guard, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, clip="norm:0.1", every=EVERY, log_dir=tmp_path / "run")
    return guard, model, opt


def test_listeners_get_each_flush_once_and_survive_removal(tmp_path):
    guard, model, opt = _guard(tmp_path)
    seen: list[list[int]] = []
    other: list[int] = []
    attach(guard, lambda records: seen.append([r["step"] for r in records]))
    handle = attach(guard, lambda records: other.extend(r["step"] for r in records))[0]
    handle.remove()
    _train(guard, model, opt)
    assert [s for batch in seen for s in batch] == list(range(STEPS))  # every step once, in order
    assert len(seen) <= STEPS // EVERY + 2  # at the flush cadence (a bad step may flush early), not per step
    assert other == []
    with pytest.raises(GradGuardError, match="at least one sink"):
        attach(guard)


def test_tensorboard_scalars_match_the_run_log(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    guard, model, opt = _guard(tmp_path)
    sink = TensorBoardSink(tmp_path / "tb")
    attach(guard, sink)
    _train(guard, model, opt)
    sink.close()

    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "gradguard/grad_norm",
        "gradguard/grad_norm_clipped",
        "gradguard/clip_rate",
        "gradguard/skipped",
    } <= tags
    assert "gradguard/layers/0/grad_norm" in tags
    run = runlog.read_run(tmp_path / "run")  # the source of truth
    norms = {e.step: e.value for e in acc.Scalars("gradguard/grad_norm")}
    for rec in run.metrics:
        if math.isfinite(rec["grad_norm"]):
            assert norms[rec["step"]] == pytest.approx(rec["grad_norm"], rel=1e-6)
    clipped = {e.step: e.value for e in acc.Scalars("gradguard/grad_norm_clipped")}
    assert all(v <= 0.1 * (1 + 1e-5) for s, v in clipped.items() if s != NAN_STEP)
    skipped = {e.step: e.value for e in acc.Scalars("gradguard/skipped")}
    assert [s for s, v in skipped.items() if v] == [NAN_STEP]
    assert acc.Scalars("gradguard/skipped_steps")[-1].value == 1


def test_tensorboard_sink_needs_one_target():
    with pytest.raises(GradGuardError, match="exactly one of log_dir"):
        TensorBoardSink()


def test_wandb_offline_run_gets_the_last_step(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    guard, model, opt = _guard(tmp_path)
    sink = WandbSink(project="gradguard-test", dir=str(tmp_path))
    attach(guard, sink)
    _train(guard, model, opt)
    summary = dict(sink.run.summary)
    sink.close()
    last = runlog.read_run(tmp_path / "run").metrics[-1]
    assert summary["gradguard/step"] == STEPS - 1
    assert summary["gradguard/grad_norm"] == pytest.approx(last["grad_norm"], rel=1e-6)
    assert summary["gradguard/skipped_steps"] == 1
    assert summary["gradguard/clip_rate"] == 1
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert wandb.run is None  # the sink finished the run it started
