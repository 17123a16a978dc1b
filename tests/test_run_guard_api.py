"""The public Guard API the zero-code runner is built on (no private pokes): ``before_step(loss,
scaler=...)`` measures unscaled gradients and leaves ``scaler.update()`` to the caller,
``before_step(clip=...)`` / ``record_clip`` put the caller's own clipping into the step's row, and
``before_step(fields=...)`` adds host fields to the step's record and events."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradguard import Guard
from gradguard._guard.callerclip import CallerClip
from gradguard.runlog import read_run
from nosync import NoSync


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
    for bad in (-1.0, math.nan):
        with pytest.raises(Exception, match="a number ≥ 0"):
            CallerClip().add(bad, torch.tensor(1.0))
    CallerClip().add(0.0, torch.tensor(1.0))  # (torch's clip_grad_norm_ takes 0: every gradient scaled to 0)


class _Log1p(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(x)


BAD_STEP = 4


def _monitored_loop(tmp_path: Path, **guard: object) -> tuple[Guard, list[bool | None], list[int]]:
    """A plain loop with a monitor-only guard that the caller steps; batch ``BAD_STEP`` is scaled
    up so that ``log1p`` inside the model gets inputs below -1 (NaN). Returns the guard, its
    ``last_step_nonfinite`` after each step and, after each step, how many ``nonfinite`` events the
    run log held before the caller's update."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _Log1p(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].bias.fill_(0.5)  # log1p's inputs stay above -1 on ordinary batches
        model[0].weight.mul_(0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    locates = guard.get("locate", True)
    g = Guard(
        model,
        opt,
        clip=None,
        on_nonfinite="warn",
        monitor_only=True,
        log_dir=tmp_path / "run",
        every=1000,
        **guard,
    )  # type: ignore[arg-type]
    seen, written = [], []
    for step in range(8):
        x = torch.rand(16, 4)
        if step == BAD_STEP:
            x = x * -1000.0
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), torch.zeros(16, 1))
        loss.backward()
        with NoSync() if not locates else contextlib.nullcontext():
            took = g.before_step(loss)
        assert took is True  # monitor only: the caller steps, bad step or not
        seen.append(g.last_step_nonfinite)
        written.append(len(read_run(tmp_path / "run", records=False).events_of("nonfinite")))
        opt.step()
    g.close()
    return g, seen, written


def test_a_monitor_only_guard_locates_a_nan_at_its_step_before_the_callers_update(tmp_path: Path) -> None:
    """The caller applies every step under ``monitor_only``: the bad one is replayed and located at
    once (before the caller's update makes the weights non-finite), not at the flush."""
    _, seen, written = _monitored_loop(tmp_path)
    assert seen[:BAD_STEP] == [False] * BAD_STEP and seen[BAD_STEP] is True
    assert written[BAD_STEP - 1] == 0 and written[BAD_STEP] == 1  # at its step, flush 1000 steps away
    first = read_run(tmp_path / "run").first_nonfinite()
    assert first is not None and first["step"] == BAD_STEP, first
    assert (first["phase"], first["module"], first["op"]) == ("forward", "1", "log1p"), first
    assert first["located_by"] == "replay" and first["policy"] == "warn"


def test_a_monitor_only_guard_without_locate_reads_nothing(tmp_path: Path) -> None:
    """``locate=False``: sync-free (``NoSync`` around every ``before_step``); the bad step is seen
    at the flush."""
    _, seen, written = _monitored_loop(tmp_path, locate=False)
    assert seen == [None] * 8 and written == [0] * 8
    first = read_run(tmp_path / "run").first_nonfinite()
    assert first is not None and first["step"] == BAD_STEP and first["located_by"] == "norm"


def test_under_warn_a_bad_step_the_caller_takes_is_located_then_still_reported(tmp_path: Path) -> None:
    """``before_step`` with ``on_nonfinite="warn"`` (what ``gradguard run --on-nonfinite warn``
    does): the host decides every step, so a bad step is located at once, before the caller's
    update; once replays are spent, later bad steps are still reported from their flags."""
    model, opt = _model()
    guard = Guard(model, opt, clip=None, on_nonfinite="warn", log_dir=tmp_path / "run", max_replays=1)
    for step in range(5):
        opt.zero_grad()
        loss = _backward(model, bad=step == 2)  # the NaN then lives in the weights: every later step is bad
        assert guard.before_step(loss) is True
        assert guard.last_step_nonfinite is (step >= 2)
        opt.step()
    guard.close()
    found = [(e["step"], e["located_by"]) for e in read_run(tmp_path / "run").events_of("nonfinite")]
    assert found == [(2, "replay"), (3, "norm"), (4, "norm")]
    first = read_run(tmp_path / "run").first_nonfinite()
    assert first is not None and (first["phase"], first["module"]) == ("backward", "0"), (
        first
    )  # inf·0 in grad


def test_under_warn_a_step_the_guard_took_on_the_host_is_reported(tmp_path: Path) -> None:
    """``guard.step`` with ``on_nonfinite="warn"`` and ``on_spike="skip"`` decides on the host and
    steps a bad step itself: it is reported from its flags (its update ran: no replay)."""
    model, opt = _model()
    guard = Guard(model, opt, clip=None, on_nonfinite="warn", on_spike="skip", log_dir=tmp_path / "run")
    for step in range(4):
        opt.zero_grad()
        guard.step(_backward(model, bad=step == 1))
    guard.close()
    found = [(e["step"], e["located_by"]) for e in read_run(tmp_path / "run").events_of("nonfinite")]
    assert found == [(1, "norm"), (2, "norm"), (3, "norm")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_under_run_clip_grad_norm_returns_and_clips_what_torch_does(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """Under the runner, ``clip_grad_norm_`` of float32 gradients computes torch's total norm with
    torch's own ops (its per-tensor norms kept for the step's measurement): the returned norm, the
    clipped gradients and the logged pre-clip norm are torch's to the last bit, for every dtype."""
    from gradguard.integrations.zerocode import ZeroCode

    def train(guarded: bool) -> tuple[list[float], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        norms = []
        with ZeroCode(out=tmp_path / f"run{guarded}", live=False) if guarded else contextlib.nullcontext():
            for _ in range(3):
                opt.zero_grad()
                x = torch.randn(16, 4, dtype=dtype)
                model(x).pow(2).mean().mul(50).backward()
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
                opt.step()
        return norms, [p.detach().clone() for p in model.parameters()]

    (ref, ref_w), (got, got_w) = train(False), train(True)
    assert got == ref
    assert all(torch.equal(a, b) for a, b in zip(ref_w, got_w))
    logged = [rec["grad_norm"] for rec in read_run(tmp_path / "runTrue").metrics]
    if dtype == torch.float32:
        assert logged == ref  # torch's own norm, as float32
    else:
        assert logged == pytest.approx(ref, rel=1e-2)
