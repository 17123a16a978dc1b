"""The public Guard API the zero-code runner is built on (no private pokes): ``before_step(loss,
scaler=...)`` measures unscaled gradients and leaves ``scaler.update()`` to the caller,
``before_step(clip=...)`` / ``record_clip`` put the caller's own clipping into the step's row, and
``before_step(fields=...)`` adds host fields to the step's record and events."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradguard import Guard
from gradguard._guard.callerclip import CallerClip
from gradguard.runlog import read_run


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _backward(
    model: nn.Module, scaler: torch.amp.GradScaler | None = None, bad: bool = False
) -> torch.Tensor:
    x = torch.randn(16, 4)
    if bad:
        x[0, 0] = float("inf")
    loss = nn.functional.mse_loss(model(x), torch.zeros(16, 1))
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss.detach()


def _norm(model: nn.Module) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))


def test_before_step_with_a_scaler_measures_unscaled_and_leaves_update_to_the_caller(tmp_path: Path) -> None:
    model, opt = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    guard = Guard(model, opt, clip=None, log_dir=tmp_path / "run", every=1)
    opt.zero_grad()
    loss = _backward(model, scaler)
    true_norm = _norm(model) / 256.0
    assert guard.before_step(loss, scaler=scaler)
    assert float(guard.last_grad_norm) == pytest.approx(true_norm, rel=1e-6)
    scaler.step(opt)  # the caller steps (already unscaled: GradScaler does not unscale again)
    scaler.update()
    opt.zero_grad()
    scale = scaler.get_scale()
    _backward(model, scaler)
    for p in model.parameters():  # an fp16-style overflow: a finite loss, an inf gradient
        p.grad = torch.full_like(p, math.inf)
    assert not guard.before_step(torch.tensor(1.0), scaler=scaler)
    assert scaler.get_scale() == scale  # not updated by the guard: the caller's scaler.update() is
    guard.close()
    log = read_run(tmp_path / "run")
    assert [r["amp_overflow"] for r in log.metrics] == [False, True]
    assert log.metrics[0]["loss_scale"] == 256.0
    assert not log.first_nonfinite()  # an overflow is the scaler's business, not a non-finite step


def test_the_callers_clips_and_fields_go_into_the_steps_record_and_events(tmp_path: Path) -> None:
    model, opt = _model()
    guard = Guard(model, opt, clip=None, log_dir=tmp_path / "run", every=10)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    seen = []
    for step in range(2):
        opt.zero_grad()
        loss = _backward(model, bad=step == 1)
        n1 = torch.nn.utils.get_total_norm([p.grad for p in first])
        n2 = torch.nn.utils.get_total_norm([p.grad for p in second])
        seen.append((_norm(model), float(n1), float(n2)))
        clip = CallerClip()
        clip.add(0.1, n1)
        if guard.before_step(loss, clip=clip, fields={"global_step": 10 + step}):
            assert guard.record_clip(5.0, n2)  # a second clip call of the same step
            opt.step()
    guard.close()
    log = read_run(tmp_path / "run")
    rec, (total, n1, n2) = log.metrics[0], seen[0]
    assert rec["grad_norm"] == pytest.approx(total, rel=1e-6)  # the guard's own, over both groups
    assert rec["threshold"] == pytest.approx(math.hypot(0.1, 5.0))
    assert rec["clip_fraction"] == ((n1 > 0.1) + (n2 > 5.0)) / 2
    clipped = math.hypot(min(n1, 0.1), min(n2, 5.0))
    assert rec["clip_coef"] == pytest.approx(clipped / total, rel=1e-4)
    assert [r["global_step"] for r in log.metrics] == [10, 11]
    event = log.first_nonfinite()
    assert event is not None and event["global_step"] == 11


def test_one_clip_call_over_every_gradient_logs_torchs_own_norm(tmp_path: Path) -> None:
    model, opt = _model()
    guard = Guard(model, opt, clip=None, log_dir=tmp_path / "run")
    opt.zero_grad()
    loss = _backward(model)
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    clip = CallerClip()
    clip.add(0.05, norm, covers_all=True)
    guard.before_step(loss, clip=clip)
    guard.close()
    rec = read_run(tmp_path / "run").metrics[0]
    assert rec["grad_norm"] == float(norm)  # to the last bit
    assert rec["clip_coef"] == pytest.approx(0.05 / (float(norm) + 1e-6))
    assert rec["clip_fraction"] == 1.0


def test_a_bad_clip_threshold_is_refused() -> None:
    with pytest.raises(Exception, match="positive number"):
        CallerClip().add(-1.0, torch.tensor(1.0))
