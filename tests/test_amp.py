"""The Guard under mixed precision: GradScaler (unscale before measuring, overflow skips are normal,
loss-scale collapse), bf16 autocast, float16 parameters, and the sync-free fused + scaler path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard
from gradguard.runlog import read_run
from nosync import NoSync


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)


def overflow(model: nn.Module) -> None:
    with torch.no_grad():
        model[2].weight.grad[0, 1] = math.inf  # what an fp16 overflow leaves in a scaled gradient


@pytest.mark.parametrize("user_unscales", [False, True])
def test_scaler_loop_equals_the_hand_written_unscale_then_clip_reference(user_unscales: bool) -> None:
    """Reference: scale → backward → unscale_ → clip_grad_norm_ → scaler.step → scaler.update."""
    overflow_at = {2, 5}
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    guard = gradguard.Guard(model, opt, clip="norm:0.5", on_spike="ignore")
    for step in range(9):
        x, y = batch(step)
        ref_opt.zero_grad(set_to_none=True)
        ref_scaler.scale((ref(x) - y).pow(2).mean()).backward()
        if step in overflow_at:
            overflow(ref)
        ref_scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_scaler.step(ref_opt)
        ref_scaler.update()

        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).pow(2).mean()
        scaler.scale(loss).backward()
        if step in overflow_at:
            overflow(model)
        if user_unscales:
            scaler.unscale_(opt)
        guard.step(loss, scaler=scaler)
        assert guard.last_step_skipped == (step in overflow_at)
        assert scaler.get_scale() == ref_scaler.get_scale()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert guard.skipped_steps == 2


def test_overflows_are_logged_as_normal_skips_and_a_collapsing_scale_is_an_event(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    guard = gradguard.Guard(model, opt, log_dir=tmp_path / "r", every=4, max_consecutive=10)
    for step in range(16):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).pow(2).mean()
        scaler.scale(loss).backward()
        if 2 <= step < 14:  # 12 overflows in a row: the scale halves 12 times, 256 → 1/16
            overflow(model)
        guard.step(loss, scaler=scaler)  # no abort: overflow skips are the scaler's business
    guard.close()
    log = read_run(tmp_path / "r")
    assert not log.events_of("nonfinite")
    assert [e["step"] for e in log.events_of("skip") if e["reason"] == "amp_overflow"] == list(range(2, 14))
    collapse = log.events_of("loss_scale_collapse")
    assert len(collapse) == 1
    # 10 overflows in a row (steps 2..11) or the scale below 1 (after step 10: 256 / 2**9): whichever first
    assert collapse[0]["step"] == 10 and collapse[0]["loss_scale"] == 0.5
    assert collapse[0]["recent_scales"][-1] == [10, 0.5]
    assert [r["loss_scale"] for r in log.metrics[:3]] == [256.0, 256.0, 128.0]


def test_a_nan_loss_under_a_scaler_is_an_anomaly_and_does_not_lower_the_scale(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    guard = gradguard.Guard(model, opt, log_dir=tmp_path / "r")
    for step in range(3):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).pow(2).mean()
        if step == 1:
            loss = loss + (torch.tensor(math.nan) - loss.detach())  # finite gradients, NaN loss
        scaler.scale(loss).backward()
        guard.step(loss, scaler=scaler)
        assert scaler.get_scale() == 2.0**8
    guard.close()
    log = read_run(tmp_path / "r")
    assert log.first_event("nonfinite")["step"] == 1
    assert [e["reason"] for e in log.events_of("skip")] == ["nonfinite"]


def test_fused_optimizer_with_a_scaler_never_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gradguard.clip, "_PIN_DEVICE_PATH", True)  # the GPU protocol, also on the CPU
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    guard = gradguard.Guard(model, opt, clip="auto", every=1000, weight_every=None)
    scales = []
    for step in range(6):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).pow(2).mean()
        scaler.scale(loss).backward()
        if step == 4:
            overflow(model)
        before = [p.detach().clone() for p in model.parameters()]
        with NoSync():
            guard.step(loss, scaler=scaler)
        moved = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert moved == (step != 4)
        scales.append(scaler.get_scale())
    assert scales == [256.0] * 4 + [128.0] * 2
    assert guard.skipped_steps == 0  # not known on the host before the flush …
    guard.flush()
    assert guard.skipped_steps == 1  # … and right after it


def test_bf16_autocast_trains_and_skips(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = gradguard.Guard(model, opt, clip="auto", log_dir=tmp_path / "r", every=5)
    losses = []
    x, y = batch(0)
    for step in range(30):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        loss = (out.float() - y).pow(2).mean()
        loss.backward()
        if step == 7:
            model[0].weight.grad[0, 0] = math.nan
        guard.step(loss)
        losses.append(float(loss.detach()))
    guard.close()
    assert losses[-1] < 0.7 * losses[0]
    log = read_run(tmp_path / "r")
    assert [e["step"] for e in log.events_of("skip")] == [7]


def test_float16_parameters_measure_norms_above_65504_and_clip_them() -> None:
    """torch's fp16 clip_grad_norm_ turns this norm into inf and zeroes every gradient."""
    model = nn.Linear(400, 400).half()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # updates of 0.0025 per element: fp16 holds them
    guard = gradguard.Guard(model, opt, clip="norm:1", on_spike="ignore", every=1)
    model.weight.grad = torch.full((400, 400), 300.0, dtype=torch.float16)  # norm 120 000 > 65504
    model.bias.grad = torch.zeros(400, dtype=torch.float16)
    before = model.weight.detach().clone()
    guard.step(torch.tensor(1.0))
    assert not guard.last_step_skipped
    step = (model.weight.detach().float() - before.float()).norm()
    assert float(step) == pytest.approx(1.0, rel=1e-2)  # lr × the clipped norm 1


def test_a_scaler_started_far_too_high_is_named_as_the_start_not_float16s_range(tmp_path: Path) -> None:
    """init_scale=1e30 overflows float16 on ordinary gradients: the finding names the start and its fix."""
    from gradguard.diagnose import diagnose

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1e30)
    guard = gradguard.Guard(model, opt, log_dir=tmp_path / "r", every=10)
    for step in range(120):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = (model(x).float() - y).pow(2).mean()
        scaler.scale(loss).backward()
        guard.step(loss, scaler=scaler)
    guard.close()
    log = read_run(tmp_path / "r")
    overflows = sum(r["amp_overflow"] for r in log.metrics)
    assert 60 < overflows < 120  # ~log2(1e30 / 65504): the scaler halved its way down, then steps got through
    finding = next(f for f in diagnose(tmp_path / "r") if f.id == "loss_scale_collapse")
    assert finding.severity == "warning" and finding.recommendation["init_scale"] == 2.0**16
    assert "started at 1e+30" in finding.message and "then steps got through" in finding.message
    assert "cannot hold" not in finding.message
