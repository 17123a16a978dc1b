"""Tests of gradguard.Guard: skip = the step never happened, rollback, raise/warn/abort, spikes,
no host sync and one pass, state round trip, a SIGKILLed run, bad input."""

from __future__ import annotations

import collections
import io
import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradguard
from gradguard._guard import apply as applying
from gradguard._guard import measure as measuring
from gradguard.diagnose import diagnose, headline
from gradguard.errors import GradGuardError, NonFiniteError
from gradguard.runlog import read_run
from nosync import HostSyncError, NoSync

BAD = [math.nan, math.inf, -math.inf]
BAD_IDS = ["nan", "inf", "-inf"]


# ----------------------------------------------------------------------------- helpers
def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)


OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd-momentum-wd-forloop": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, weight_decay=1e-2, foreach=False
    ),
    "sgd-momentum-wd-foreach": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, weight_decay=1e-2, foreach=True
    ),
    "sgd-momentum-wd-fused": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, weight_decay=1e-2, fused=True
    ),
    "adam-forloop": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw-forloop": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adagrad-fused": lambda p: torch.optim.Adagrad(p, lr=1e-2, fused=True),
}


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        k: {n: (v.clone() if isinstance(v, torch.Tensor) else v) for n, v in s.items()}
        for k, s in opt.state.items()
    }
    return params, state


def assert_bit_identical(a: tuple[list[torch.Tensor], dict], b: tuple[list[torch.Tensor], dict]) -> None:
    pa, sa = a
    pb, sb = b
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y) or (
            (x.isnan() == y.isnan()).all() and torch.equal(x.nan_to_num(), y.nan_to_num())
        )
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for n in sa[k]:
            va, vb = sa[k][n], sb[k][n]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), f"optimizer state {n!r} changed"
            else:
                assert va == vb


def train(
    guard: gradguard.Guard,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    *,
    fault: Callable[[int, nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """The plain loop of the README; ``fault(step, model, loss) -> loss`` may inject a bad value."""
    losses = []
    for step in steps:
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).pow(2).mean()
        if fault is not None:
            loss = fault(step, model, loss)
        loss.backward()
        if fault is not None:
            fault(step, model, None)  # type: ignore[arg-type]
        guard.step(loss)
        losses.append(float(loss.detach()))
    return losses


def grad_fault(at: int, value: float) -> Callable:
    """One element of one gradient becomes ``value`` after backward, at step ``at``."""

    def fault(step, model, loss):
        if loss is None and step == at:
            with torch.no_grad():
                model[2].weight.grad[3, 5] = value
        return loss

    return fault


def loss_fault(at: int, value: float) -> Callable:
    """The loss becomes ``value`` (its gradients stay finite: ``loss + (value - loss.detach())``)."""

    def fault(step, model, loss):
        if loss is not None and step == at:
            return loss + (torch.tensor(value) - loss.detach())
        return loss

    return fault


# ----------------------------------------------------------------------------- skip
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("where", ["grad", "loss"])
@pytest.mark.parametrize("value", BAD, ids=BAD_IDS)
def test_skip_leaves_params_and_state_bit_identical_and_training_goes_on_as_without_the_batch(
    opt_name: str, where: str, value: float
) -> None:
    at = 4
    fault = grad_fault(at, value) if where == "grad" else loss_fault(at, value)
    # the guarded run, with a fault at step `at`
    model = make_model()
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    guard = gradguard.Guard(model, opt, clip="norm:1.0", on_nonfinite="skip", every=3)
    train(guard, model, opt, range(at), fault=fault)
    before = snapshot(model, opt)
    train(guard, model, opt, range(at, at + 1), fault=fault)
    assert_bit_identical(before, snapshot(model, opt))
    assert guard.last_step_skipped
    train(guard, model, opt, range(at + 1, at + 4), fault=fault)
    guard.close()
    assert guard.skipped_steps == 1
    # reference: the same run with a plain loop that never saw batch `at`
    ref = make_model()
    ref_opt = OPTIMIZERS[opt_name](list(ref.parameters()))
    for step in [s for s in range(at + 4) if s != at]:
        x, y = batch(step)
        ref_opt.zero_grad(set_to_none=True)
        (ref(x) - y).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "opt_name", ["sgd-momentum-wd-fused", "adamw-fused", "adam-foreach", "sgd-momentum-wd-forloop"]
)
def test_skipping_the_very_first_step_then_training_equals_a_fresh_optimizer(opt_name: str) -> None:
    """torch's fused SGD leaves empty_like momentum buffers when its first step is skipped via found_inf."""
    model = make_model()
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    guard = gradguard.Guard(model, opt, clip=None, on_nonfinite="skip", on_spike="ignore")
    train(guard, model, opt, range(3), fault=grad_fault(0, math.nan))
    ref = make_model()
    ref_opt = OPTIMIZERS[opt_name](list(ref.parameters()))
    plain_steps(ref, ref_opt, (1, 2))
    assert_finite_and_equal(model, ref)


def plain_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: Sequence[int]) -> None:
    """torch's plain loop (no guard) over the batches of ``steps``: the reference a guarded run must equal."""
    for step in steps:
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        (model(x) - y).pow(2).mean().backward()
        opt.step()


def assert_finite_and_equal(model: nn.Module, ref: nn.Module) -> None:
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reset", ["each parameter's state", "the state dict"])
def test_a_skipped_step_right_after_the_user_resets_fused_sgds_momentum_trains_as_torch(reset: str) -> None:
    """A user resets the optimizer's state (``opt.state[p] = {}`` for each parameter: the same dict,
    as many entries; or a new state dict), then the next step is non-finite and skipped: fused SGD's
    next step is again a first momentum step, which the guard takes on the host (torch's fused kernel
    would leave ``empty_like`` buffers behind a skipped first step). Then training equals torch's
    plain loop with the same reset and the bad step left out."""

    def reset_state(opt: torch.optim.Optimizer) -> None:
        if reset == "the state dict":
            opt.state = collections.defaultdict(dict)
        else:
            for p in list(opt.state):
                opt.state[p] = {}

    model, ref = make_model(), make_model()
    opt = OPTIMIZERS["sgd-momentum-wd-fused"](list(model.parameters()))
    ref_opt = OPTIMIZERS["sgd-momentum-wd-fused"](list(ref.parameters()))
    guard = gradguard.Guard(model, opt, clip=None, on_nonfinite="skip", on_spike="ignore")
    train(guard, model, opt, range(3))
    reset_state(opt)
    train(guard, model, opt, range(3, 6), fault=grad_fault(3, math.nan))
    plain_steps(ref, ref_opt, (0, 1, 2))
    reset_state(ref_opt)
    plain_steps(ref, ref_opt, (4, 5))  # (step 3 was skipped)
    assert_finite_and_equal(model, ref)


@pytest.mark.parametrize("value", BAD, ids=BAD_IDS)
def test_a_nonfinite_weight_makes_the_loss_nonfinite_and_the_step_is_skipped(
    tmp_path: Path, value: float
) -> None:
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gradguard.Guard(model, opt, on_nonfinite="skip", log_dir=tmp_path / "run", every=100)
    train(guard, model, opt, range(3))
    with torch.no_grad():
        model[4].weight[0, 0] = value  # the head: no tanh after it to saturate an inf
    before = snapshot(model, opt)
    train(guard, model, opt, range(3, 4))
    assert_bit_identical(before, snapshot(model, opt))
    guard.close()
    ev = read_run(tmp_path / "run").first_event("nonfinite")
    assert ev is not None and ev["step"] == 3
    # located by replaying the step: the weight was non-finite before the forward, and the script wrote it
    # there (its version counter moved between optimizer steps): not the optimizer's birth
    assert (ev["phase"], ev["module"], ev["tensor"], ev["located_by"]) == (
        "script",
        "4",
        "param",
        "replay",
    )
    assert ev["kind"] in ("nan", "inf", "-inf")


def test_a_nonfinite_weight_hidden_by_a_saturating_layer_is_reported_at_the_weight_cadence(
    tmp_path: Path,
) -> None:
    """tanh(inf) = 1: the loss and every gradient stay finite, only the weight norms show it."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gradguard.Guard(model, opt, log_dir=tmp_path / "run", every=4, weight_every=5)
    train(guard, model, opt, range(3))
    with torch.no_grad():
        model[0].weight[0, 0] = math.inf
    train(guard, model, opt, range(3, 12))
    guard.close()
    log = read_run(tmp_path / "run")
    assert not any(r["nonfinite"] for r in log.metrics)
    events = log.events_of("nonfinite")
    assert [(e["step"], e["tensor"], e["kind"], e["module"]) for e in events] == [(5, "param", "inf", "0")]


def test_events_name_step_kind_and_phase_for_each_fault(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gradguard.Guard(model, opt, log_dir=tmp_path / "r", every=4)
    faults = {
        2: grad_fault(2, math.inf),
        5: grad_fault(5, -math.inf),
        7: loss_fault(7, -math.inf),
        9: loss_fault(9, math.nan),
    }

    def fault(step, model, loss):
        return faults[step](step, model, loss) if step in faults else loss

    train(guard, model, opt, range(11), fault=fault)
    guard.close()
    log = read_run(tmp_path / "r")
    nonfinite = {e["step"]: e for e in log.events_of("nonfinite")}
    assert sorted(nonfinite) == [2, 5, 7, 9]
    assert (nonfinite[2]["phase"], nonfinite[2]["kind"], nonfinite[2]["tensor"]) == (
        "backward",
        "inf",
        "grad",
    )
    assert nonfinite[2]["layers"] == ["2"]  # only the layer whose gradient holds the inf
    assert (nonfinite[5]["phase"], nonfinite[5]["kind"]) == ("backward", "inf")
    assert (nonfinite[7]["phase"], nonfinite[7]["kind"]) == ("loss", "-inf")
    assert (nonfinite[9]["phase"], nonfinite[9]["kind"]) == ("loss", "nan")
    assert sorted(e["step"] for e in log.events_of("skip")) == [2, 5, 7, 9]
    skipped = [r["step"] for r in log.metrics if r["skipped"]]
    assert skipped == [2, 5, 7, 9]
    assert [r["step"] for r in log.metrics] == list(range(11))


# ----------------------------------------------------------------------------- no host sync, one pass
def _reads_of_optimizer_step(opt_name: str) -> list[int]:
    model = make_model()
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    for step in range(2):  # state exists
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        (model(x) - y).pow(2).mean().backward()
        if step == 1:
            with NoSync(watch=[p.grad for p in model.parameters()]) as ns, ns.allow():
                opt.step()
            return ns.reads
        opt.step()
    raise AssertionError


@pytest.mark.parametrize("clip", ["auto", "norm:1", "autoclip", "zclip", "none"])
@pytest.mark.parametrize("opt_name", ["adamw-fused", "sgd-momentum-wd-fused", "adam-fused", "adagrad-fused"])
def test_fused_path_makes_no_host_read_and_reads_each_gradient_once(
    opt_name: str, clip: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU protocol (``grad_scale`` / ``found_inf``), pinned on the CPU where the host branch is cheaper."""
    monkeypatch.setattr(gradguard.clip, "_PIN_DEVICE_PATH", True)
    model = make_model()
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    guard = gradguard.Guard(model, opt, clip=clip, on_nonfinite="skip", every=1000, weight_every=None)
    train(guard, model, opt, range(3))  # warm: optimizer state exists
    x, y = batch(3)
    opt.zero_grad(set_to_none=True)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    with NoSync(watch=grads) as ns:
        guard.step(loss)
    optimizer_reads = _reads_of_optimizer_step(opt_name)
    assert [r - o for r, o in zip(ns.reads, optimizer_reads)] == [1] * len(grads), ns.read_ops
    assert all(ops[0] == "aten._foreach_norm.Scalar" for ops in ns.read_ops)


@pytest.mark.parametrize("clip", ["auto", "norm:1", "none"])
@pytest.mark.parametrize("opt_name", ["adamw-foreach", "sgd-momentum-wd-forloop", "adam-forloop"])
def test_unfused_path_makes_exactly_one_named_host_read(
    opt_name: str, clip: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device path (pinned on the CPU, where the coefficient of 1 would be read and not applied)."""
    monkeypatch.setattr(gradguard.clip, "_PIN_DEVICE_PATH", True)
    model = make_model()
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    guard = gradguard.Guard(model, opt, clip=clip, on_nonfinite="skip", every=1000, weight_every=None)
    train(guard, model, opt, range(3))
    x, y = batch(3)
    opt.zero_grad(set_to_none=True)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    decided = []
    with NoSync(watch=grads) as ns:
        inner = guard._decide

        def decide(skip):
            with ns.allow():
                decided.append(inner(skip))
            return decided[-1]

        guard._decide = decide  # type: ignore[method-assign]
        opt_step = opt.step

        def step_allowed():  # the optimizer's own reads (Adam's step count on CPU) are not gradguard's
            with ns.allow():
                return opt_step()

        opt.step = step_allowed  # type: ignore[method-assign]
        guard.step(loss)
    assert decided == [False]
    extra = 2 if clip != "none" else 1  # the norm pass, and the scale pass when clipping
    optimizer_reads = _reads_of_optimizer_step(opt_name)
    assert [r - o for r, o in zip(ns.reads, optimizer_reads)] == [extra] * len(grads), ns.read_ops


@pytest.fixture
def guards_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guard over meta tensors, where any host read raises (outside the dispatcher too): the check
    that a step's device path reads nothing. A user's meta model is refused (it cannot train):
    lifted here, for the instrument only."""
    monkeypatch.setattr("gradguard._guard.config._check_materialized", lambda names, params: None)


@pytest.mark.usefixtures("guards_on_meta")
def test_warn_mode_is_sync_free_for_any_optimizer_and_runs_on_meta() -> None:
    """On the meta device any host read raises outside the dispatcher too."""
    with torch.device("meta"):
        model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    guard = gradguard.Guard(model, opt, clip="auto", on_nonfinite="warn", every=1000, weight_every=1)
    for _ in range(3):
        x = torch.randn(8, 6, device="meta")
        opt.zero_grad(set_to_none=True)
        loss = model(x).pow(2).mean()
        loss.backward()
        with NoSync(watch=[p.grad for p in model.parameters()]):
            guard.step(loss)
    assert guard.step_count == 3


@pytest.mark.usefixtures("guards_on_meta")
def test_the_one_host_read_is_real_an_unfused_skip_guard_refuses_meta() -> None:
    """The counterpart: the unfused skip path does read the device (so the meta test can fail)."""
    with torch.device("meta"):
        model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, on_nonfinite="skip", every=1000)
    loss = model(torch.randn(8, 6, device="meta")).pow(2).mean()
    loss.backward()
    with pytest.raises((RuntimeError, NotImplementedError, HostSyncError)), NoSync():
        guard.step(loss)


@pytest.mark.parametrize(
    "opt_name",
    ["adamw-fused", "sgd-momentum-wd-fused", "adam-fused", "adagrad-fused", "adamw-foreach", "adam-forloop"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", ["norm:1", "auto"])
def test_the_cpu_host_reads_give_the_device_paths_bits(
    opt_name: str, dtype: torch.dtype, clip: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU a fused step is taken by a host branch (cheaper than the kernel's ``grad_scale`` /
    ``found_inf``), a clip coefficient of 1 is not applied, and the step's flags, threshold and
    coefficient are made on host numbers and written into its row (``Measurement.host``): weights,
    gradients, optimizer state and the log are those of the device path, through clipped, unclipped
    and skipped steps (the first one too; a NaN and an infinite loss, an infinite loss of finite
    gradients)."""

    def run(pinned: bool, log_dir: Path) -> tuple[tuple[list[torch.Tensor], dict], list, list, str]:
        monkeypatch.setattr(gradguard.clip, "_PIN_DEVICE_PATH", pinned)
        model = make_model().to(dtype)
        opt = OPTIMIZERS[opt_name](list(model.parameters()))
        guard = gradguard.Guard(model, opt, clip=clip, every=3, weight_every=2, log_dir=log_dir)
        assert guard._apply.on_cpu == (not pinned)  # type: ignore[union-attr]
        assert isinstance(guard._apply, applying.Fused) == opt_name.endswith("fused")
        grads = []
        for step in range(32):  # past auto's warm-up (25), to a spike it clips
            x, y = (t.to(dtype) for t in batch(step))
            opt.zero_grad(set_to_none=True)
            loss = (model(x) - y).pow(2).mean() * {0: math.nan, 5: math.inf, 30: 1e4}.get(step, 1.0)
            loss.backward()
            guard.step(loss if step != 9 else loss.detach() + math.inf)  # (9: only the loss is infinite)
            grads.append([p.grad.clone() for p in model.parameters()])
        guard.close()
        log = read_run(log_dir)
        state = {i: dict(s) for i, s in opt.state_dict()["state"].items()}  # by index: two models
        return (snapshot(model, opt)[0], state), grads, log.metrics, json.dumps(log.events, default=str)

    tested, test_on_host = [], measuring._Probe.test_on_host
    monkeypatch.setattr(
        measuring._Probe, "test_on_host", lambda *a: tested.append(test_on_host(*a)) or tested[-1]
    )
    device, host = run(True, tmp_path / "device"), run(False, tmp_path / "host")
    assert [v is None for v in tested] == [True] * 32 + [False] * 32  # the host path taken (not pinned)
    assert_bit_identical(device[0], host[0])
    for a, b in zip(device[1], host[1], strict=True):
        assert all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(a, b, strict=True))
    assert json.dumps(device[2], default=str) == json.dumps(host[2], default=str)
    assert device[3].replace("device", "") == host[3].replace("host", "")
    coefs = [r["clip_coef"] for r in host[2] if not r["skipped"]]
    assert sum(r["skipped"] for r in host[2]) == 3 and min(coefs) < 1 and max(coefs) == 1
    assert len({r["threshold"] for r in host[2]}) > 2 or clip != "auto"  # (its rule ran)


@pytest.mark.parametrize("pinned", [False, True], ids=["host", "device-path"])
def test_a_threshold_changed_every_step_is_logged_as_set(
    pinned: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A norm threshold the script sets every step (a schedule) is each step's own in the log: the
    row's constants, made per threshold and cached by its identity, never hand a later threshold an
    earlier one's (the cache is cleared every 64 constants; found by review in session 17: 1–7 of
    200–2,000 steps logged an older threshold)."""
    monkeypatch.setattr(gradguard.clip, "_PIN_DEVICE_PATH", pinned)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, clip="norm:1", every=10, log_dir=tmp_path / "run", locate=False)
    for step in range(300):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        guard.clipper.max_norm = 0.001 * (step + 1)  # type: ignore[union-attr]
        guard.step()
    guard.close()
    logged = [(r["step"], r["threshold"]) for r in read_run(tmp_path / "run").metrics]
    assert logged == [(i, torch.tensor(0.001 * (i + 1)).item()) for i in range(300)]


def test_last_step_skipped_is_right_on_the_fused_path() -> None:
    model = make_model()
    opt = OPTIMIZERS["adamw-fused"](list(model.parameters()))
    guard = gradguard.Guard(model, opt, on_nonfinite="skip")
    flags = []
    for step in range(4):
        train(guard, model, opt, range(step, step + 1), fault=grad_fault(2, math.nan))
        flags.append(guard.last_step_skipped)
    assert flags == [False, False, True, False]


# ----------------------------------------------------------------------------- policies
def test_rollback_restores_exactly_the_snapshot_and_backs_off_the_lr(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = gradguard.Guard(
        model,
        opt,
        on_nonfinite="rollback",
        snapshot_every=3,
        lr_backoff=0.5,
        log_dir=tmp_path / "r",
        snapshot_dir=tmp_path / "snap",
    )
    states = {}
    for step in range(8):
        train(guard, model, opt, range(step, step + 1))
        states[step] = (
            {k: v.clone() for k, v in model.state_dict().items()},
            [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()],
        )
    # snapshots were taken after steps 0, 3, 6: corrupt a weight, then the next step rolls back to 6
    with torch.no_grad():
        model[4].weight[0, 0] = math.nan
    train(guard, model, opt, range(8, 9))
    for k, v in model.state_dict().items():
        assert torch.equal(v, states[6][0][k])
    for p, buf in zip(model.parameters(), states[6][1]):
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    # a second rollback compounds the back-off
    with torch.no_grad():
        model[4].weight[0, 0] = math.inf
    train(guard, model, opt, range(9, 10))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    train(guard, model, opt, range(10, 12))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    guard.close()
    log = read_run(tmp_path / "r")
    assert [(e["step"], e["to_step"]) for e in log.events_of("rollback")] == [(8, 6), (9, 6)]
    assert [e["lr"] for e in log.events_of("lr_backoff")] == pytest.approx([0.05, 0.025])
    on_disk = torch.load(tmp_path / "snap" / "snapshot.pt", weights_only=True)
    assert on_disk["step"] == 10  # taken 3+ steps after the one it rolled back to
    for k, v in on_disk["model"].items():
        assert torch.equal(v, guard._recovery.snapshot["model"][k])
    assert not list((tmp_path / "snap").glob("*.tmp"))


def test_raise_policy_flushes_the_log_then_raises(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gradguard.Guard(model, opt, on_nonfinite="raise", log_dir=tmp_path / "r", every=100)
    with pytest.raises(NonFiniteError, match=r"step 5: the loss is nan.*on_nonfinite='skip'"):
        train(guard, model, opt, range(10), fault=loss_fault(5, math.nan))
    log = read_run(tmp_path / "r")
    assert [r["step"] for r in log.metrics] == list(range(6))  # flushed before raising
    assert log.first_event("nonfinite")["step"] == 5


def test_the_raised_error_carries_where_the_first_non_finite_value_was_born(tmp_path: Path) -> None:
    """It said "step 4: the loss is nan" while its run log already named the op and the line."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, on_nonfinite="raise", log_dir=tmp_path / "r")
    with pytest.raises(NonFiniteError) as raised:
        for step in range(8):
            x = torch.randn(8, 6)
            if step == 4:
                x[2, 1] = math.nan  # a missing feature
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,)))
            loss.backward()
            guard.step(loss)
    assert raised.value.located is not None and raised.value.located["phase"] == "data"
    assert "step 4: the loss is nan. The first non-finite value (step 4) was already in the input" in str(
        raised.value
    )


def test_warn_policy_takes_the_step_and_logs_it(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gradguard.Guard(model, opt, clip=None, on_nonfinite="warn", log_dir=tmp_path / "r", every=4)
    train(guard, model, opt, range(6), fault=grad_fault(3, math.nan))
    guard.close()
    assert not torch.isfinite(model[2].weight).all()  # warn really took the step
    log = read_run(tmp_path / "r")
    assert log.first_event("nonfinite")["step"] == 3
    assert not log.events_of("skip")


def test_an_abort_over_weights_that_are_huge_but_finite_does_not_call_them_non_finite() -> None:
    """Weights of 1e28 (a run past its overflow): their norm overflows float32, the weights do not."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, on_nonfinite="skip", max_consecutive=3)
    with torch.no_grad():
        model[0].weight.fill_(1e28)

    def bad(step, model, loss):
        return loss if loss is None else loss * math.inf

    with pytest.raises(NonFiniteError, match="consecutive skipped steps") as stopped:
        train(guard, model, opt, range(5), fault=bad)
    assert "non-finite: use on_nonfinite='rollback'" not in str(stopped.value)


@pytest.mark.parametrize("opt_name", ["adam-forloop", "adamw-fused"])
def test_abort_after_n_consecutive_bad_steps_with_the_log_flushed(tmp_path: Path, opt_name: str) -> None:
    model = make_model()
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    guard = gradguard.Guard(
        model, opt, on_nonfinite="skip", max_consecutive=4, log_dir=tmp_path / "r", every=5
    )
    train(guard, model, opt, range(3))
    with torch.no_grad():
        model[0].bias[0] = math.nan  # every later step is bad
    with pytest.raises(NonFiniteError, match=r"consecutive skipped steps.*weights themselves are non-finite"):
        train(guard, model, opt, range(3, 30))
    log = read_run(tmp_path / "r")
    abort = log.first_event("abort")
    # unfused: decided at the 4th bad step; fused (sync-free): at the next flush after it
    assert abort["step"] == 6 if opt_name == "adam-forloop" else abort["step"] == 9
    assert log.meta["aborted"] is True
    assert [r["step"] for r in log.metrics] == list(range(abort["step"] + 1))


class _LogOfZero(nn.Module):
    """A model whose forward takes the log of a value that is 0: every step is non-finite."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.lin(x) * 0.0)


def test_an_abort_names_the_located_op_and_its_fix_not_the_learning_rate(tmp_path: Path) -> None:
    """Ten bad steps in a row from an op at its edge: the learning rate is not the cause, and the
    error says what is (the op, its reason, its fix); a run stopped without a located op keeps
    the usual advice (above)."""
    model = _LogOfZero()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, clip=None, max_consecutive=3, log_dir=tmp_path / "r")
    with pytest.raises(NonFiniteError) as raised:
        for _ in range(5):
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).mean()
            loss.backward()
            guard.step(loss)
    text = str(raised.value)
    assert "came from `log`" in text and "log of 0" in text and "clamp" in text, text
    assert "learning rate" not in text, text


def test_an_abort_after_a_nan_born_in_the_optimizer_names_its_hyperparameter(tmp_path: Path) -> None:
    """AdamW with eps=0 and a branch that never gets a gradient: its update is 0 / 0 from step 0, the
    weights go NaN and every later step is skipped. The abort said "Lower the learning rate or clip
    harder"; it names the optimizer's birth and eps."""
    torch.manual_seed(0)
    trunk, unused = nn.Linear(4, 8), nn.Linear(8, 1)
    model = nn.ModuleDict({"trunk": trunk, "unused": unused})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=0.0)
    guard = gradguard.Guard(model, opt, clip=None, max_consecutive=3, log_dir=tmp_path / "r")
    with pytest.raises(NonFiniteError) as raised:
        for _ in range(8):
            opt.zero_grad()
            loss = trunk(torch.randn(8, 4)).pow(2).mean() + 0.0 * unused(torch.randn(2, 8)).sum()
            loss.backward()
            guard.step(loss)
    text = str(raised.value)
    assert "born inside AdamW.step()" in text and "set eps > 0" in text, text
    assert "Lower the learning rate" not in text, text


def test_a_parameter_non_finite_before_the_first_step_is_said_at_once_and_is_the_verdict(
    tmp_path: Path,
) -> None:
    """An embedding filled from a pretrained table with an off-by-one leaves one row NaN; it is first
    read at step 4. The verdict was "nan was born inside optimizer.step() … lower the learning rate":
    the guard says at its start which parameter already holds NaN, and the step that reads it is that
    parameter's initialisation, not an optimizer step."""
    torch.manual_seed(0)
    table = torch.full((11, 4), float("nan"))
    table[:10] = torch.randn(10, 4)  # row 10 never filled
    emb, head = nn.Embedding.from_pretrained(table, freeze=False), nn.Linear(4, 1)
    model = nn.Sequential(emb, nn.Flatten(), head)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.warns(RuntimeWarning, match=r"0.weight already holds NaN or inf before the first step"):
        guard = gradguard.Guard(model, opt, clip=None, log_dir=tmp_path / "r")
    assert read_run(tmp_path / "r").meta["nonfinite_at_start"] == ["0.weight"]
    for step in range(6):
        ids = torch.randint(0, 10, (8, 1)) if step != 4 else torch.full((8, 1), 10)
        opt.zero_grad()
        loss = model(ids).pow(2).mean()
        loss.backward()
        guard.step(loss)
    guard.close()
    top = headline(diagnose(tmp_path / "r"))
    assert top is not None and "non-finite before the first step" in top.message, top
    assert "learning rate" not in top.message and "optimizer.step()" not in top.message


def test_a_skipped_step_that_poisoned_batchnorm_says_the_weights_were_kept_but_not_the_buffers(
    tmp_path: Path,
) -> None:
    """A NaN batch through BatchNorm in train mode: the guard skips the step (the weights are kept),
    but the forward already updated the running statistics with NaN, and every eval is NaN after.
    "Skipped, parameters untouched" was the whole story; the buffers are named, with how to restore
    them (rollback does: they are in the snapshot)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gradguard.Guard(model, opt, clip=None, log_dir=tmp_path / "r")
    with pytest.warns(RuntimeWarning, match=r"wrote NaN/inf into the buffers 1.running_mean, 1.running_var"):
        for step in range(6):
            x = torch.randn(16, 4)
            if step == 3:
                x[2, 1] = float("nan")
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            guard.step(loss)
    guard.close()
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the weights were kept
    (said,) = [e for e in read_run(tmp_path / "r").events if e["type"] == "buffers"]
    assert said["step"] == 3 and said["skipped"] is True
    top = headline(diagnose(tmp_path / "r"))
    assert top is not None and top.id == "bad_data" and "1.running_mean" in top.message
    assert "on_nonfinite='rollback' restores them" in top.recommendation["text"]


def test_an_abort_after_a_runaway_update_names_the_learning_rate_before_the_op(tmp_path: Path) -> None:
    """SGD at lr 50: step 0's update moves the layer many times its own norm, the softmax saturates and
    the hand-written log of its probability is -inf on every step. The abort named only the log's clamp,
    which left a dead run; the update that made the values comes first."""
    torch.manual_seed(0)
    model = nn.Linear(8, 5)
    opt = torch.optim.SGD(model.parameters(), lr=50.0)
    guard = gradguard.Guard(model, opt, clip=None, max_consecutive=3, log_dir=tmp_path / "r", weight_every=1)
    with pytest.raises(NonFiniteError) as raised:
        for _ in range(8):
            x, y = torch.randn(16, 8) * 3, torch.randint(0, 5, (16,))
            probs = torch.softmax(model(x), dim=-1)
            loss = -probs.gather(1, y[:, None]).log().mean()
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
    text = str(raised.value)
    assert "The update of step 0 moved layer" in text and "learning rate is far too high" in text, text
    assert text.index("learning rate is far too high") < text.index("came from `log`")


def test_spike_policies_skip_clip_and_warn(tmp_path: Path) -> None:
    def spike(step, model, loss):
        if loss is None and step == 40:
            for p in model.parameters():
                p.grad.mul_(1e4)
        return loss

    results = {}
    for policy in ("skip", "clip", "warn"):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = gradguard.Guard(model, opt, clip=None, on_spike=policy, log_dir=tmp_path / policy, every=10)
        train(guard, model, opt, range(40))
        before = [p.detach().clone() for p in model.parameters()]
        train(guard, model, opt, range(40, 41), fault=spike)
        moved = sum(float((p.detach() - b).norm()) for p, b in zip(model.parameters(), before))
        guard.close()
        results[policy] = (moved, read_run(tmp_path / policy))
    assert results["skip"][0] == 0.0
    skip = results["skip"][1].events_of("skip")
    assert [(e["step"], e["reason"]) for e in skip] == [(40, "spike")]
    clip_rec = results["clip"][1].metrics[40]
    assert clip_rec["spike"] and clip_rec["clip_coef"] < 1e-2
    assert 0 < results["clip"][0] < results["warn"][0] / 50
    assert [e["step"] for e in results["warn"][1].events_of("spike")] == [40]
    assert not any(r["spike"] for r in results["warn"][1].metrics[:40])


def test_finite_gradients_whose_float32_norm_overflows_are_clipped_not_skipped(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, clip="norm:1", log_dir=tmp_path / "r")

    def huge(step, model, loss):
        if loss is None and step == 1:
            model[2].weight.grad[0, 0] = 3e30  # finite; its square overflows float32
        return loss

    train(guard, model, opt, range(1), fault=huge)
    before = [p.detach().clone() for p in model.parameters()]
    train(guard, model, opt, range(1, 2), fault=huge)
    step_norm = math.sqrt(
        sum(float((p - b).double().pow(2).sum()) for p, b in zip(model.parameters(), before))
    )
    assert not guard.last_step_skipped
    assert step_norm == pytest.approx(0.1, rel=1e-3)  # lr × clipped norm 1
    guard.close()
    log = read_run(tmp_path / "r")
    assert log.metrics[1]["grad_norm"] == pytest.approx(3e30, rel=1e-5)
    assert log.first_event("overflow")["step"] == 1 and not log.events_of("nonfinite")
    assert log.first_event("overflow")["note"].endswith("measured exactly and clipped")
    unclipped = gradguard.Guard(model, opt, clip="none", log_dir=tmp_path / "none")
    train(unclipped, model, opt, range(1, 2), fault=huge)
    unclipped.close()
    note = read_run(tmp_path / "none").first_event("overflow")["note"]
    assert "not clipped (no threshold)" in note  # the note says what happened, not "clipped"


def test_closure_form_recomputes_and_returns_the_loss() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gradguard.Guard(model, opt, clip="norm:1")
    x, y = batch(0)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    first = float(guard.step(closure))
    second = float(guard.step(closure))
    assert second < first and guard.step_count == 2


# ----------------------------------------------------------------------------- caller steps
def _backward(
    model: nn.Module, opt: torch.optim.Optimizer, step: int, fault: Callable | None = None
) -> torch.Tensor:
    x, y = batch(step)
    opt.zero_grad(set_to_none=True)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    if fault is not None:
        fault(step, model, None)
    return loss


def test_before_step_clips_in_place_and_on_a_skip_leaves_the_gradients_as_they_are(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = gradguard.Guard(model, opt, clip="norm:0.1", log_dir=tmp_path / "r", every=4)
    for step in range(4):
        loss = _backward(model, opt, step, grad_fault(2, math.nan))
        grads = [p.grad.clone() for p in model.parameters()]
        before = snapshot(model, opt)
        if guard.before_step(loss):
            norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
            assert norm == pytest.approx(0.1, rel=1e-4)  # clipped in place
            opt.step()
        else:
            assert step == 2
            assert_bit_identical(before, snapshot(model, opt))  # the guard itself never steps
            for p, g in zip(model.parameters(), grads):  # left as they are: the caller must not step
                assert p.grad is not None and torch.equal(p.grad.nan_to_num(), g.nan_to_num())
    guard.close()
    assert (guard.step_count, guard.skipped_steps) == (4, 1)
    log = read_run(tmp_path / "r")
    assert [e["step"] for e in log.events_of("skip")] == [2]
    assert log.first_event("nonfinite")["step"] == 2


def _layer_stats(run: Path) -> list[dict[str, dict[str, float]]]:
    return [
        {name: {k: v for k, v in stats.items() if k != "grad_norm"} for name, stats in r["layers"].items()}
        for r in read_run(run).metrics
    ]


def test_before_step_then_the_callers_step_logs_the_update_ratio_of_guard_step(tmp_path: Path) -> None:
    """The weight norms and update ratios of a ``before_step`` step are measured after the caller's
    ``optimizer.step()`` (a step post-hook): the same numbers as ``guard.step`` on the same data."""
    runs = {}
    for how in ("step", "before_step"):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        run = tmp_path / how
        guard = gradguard.Guard(model, opt, clip="norm:0.5", log_dir=run, every=4, weight_every=2)
        for step in range(6):
            loss = _backward(model, opt, step)
            if how == "step":
                guard.step(loss)
            elif guard.before_step(loss):
                opt.step()
        guard.close()
        runs[how] = _layer_stats(run)
    assert runs["before_step"] == runs["step"]
    ratios = [stats["update_ratio"] for rec in runs["step"][::2] for stats in rec.values()]
    assert len(ratios) == 3 * 3 and all(r > 0 for r in ratios)


def test_before_step_without_the_callers_step_drops_its_post_step_work(tmp_path: Path) -> None:
    """A caller that does not step: the next call (or close) drops the work; its record has no weight
    stats, the records around it are whole, and a step of the optimizer later measures nothing."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gradguard.Guard(model, opt, clip="norm:0.5", log_dir=tmp_path / "r", every=2, weight_every=1)
    for step in range(5):
        assert guard.before_step(_backward(model, opt, step))
        if step not in (1, 4):  # no step after steps 1 and 4 (the last: dropped at close)
            opt.step()
    guard.close()
    opt.step()  # after close: not the guard's
    records = read_run(tmp_path / "r").metrics
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert [all("update_ratio" in stats for stats in r["layers"].values()) for r in records] == [
        True,
        False,
        True,
        True,
        False,
    ]
    assert not opt._optimizer_step_post_hooks  # the guard's hook left with it


def test_before_step_snapshots_the_state_after_the_callers_step() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = gradguard.Guard(model, opt, clip="norm:0.5", on_nonfinite="rollback", snapshot_every=2)
    for step in range(3):
        if guard.before_step(_backward(model, opt, step)):
            opt.step()
    snap = guard._recovery.snapshot
    assert snap is not None and snap["step"] == 2
    assert all(torch.equal(snap["model"][k], v) for k, v in model.state_dict().items())  # after step 2
    guard.close()


@pytest.mark.usefixtures("guards_on_meta")
def test_before_step_in_monitor_only_warn_mode_reads_nothing_on_the_host() -> None:
    """Nothing is ever skipped in monitor-only ``warn`` mode without ``locate``: ``before_step``
    answers without a host read (with ``locate``, a step's row is read while replays are left, so
    that a bad step is located before the caller's update makes it unreplayable: issue 13)."""
    with torch.device("meta"):
        model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(
        model, opt, clip=None, on_nonfinite="warn", monitor_only=True, every=1000, weight_every=1,
        locate=False,
    )  # fmt: skip
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model(torch.randn(8, 6, device="meta")).pow(2).mean().backward()
        with NoSync(watch=[p.grad for p in model.parameters()]):
            assert guard.before_step(None) is True
            opt.step()  # the caller steps; the update ratio is measured after it
    assert guard.step_count == 3


def test_monitor_only_measures_and_logs_but_never_clips_skips_or_steps(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gradguard.Guard(
        model, opt, clip=None, on_nonfinite="warn", monitor_only=True, log_dir=tmp_path / "r", every=3
    )
    for step in range(5):
        loss = _backward(model, opt, step, grad_fault(3, math.inf))
        grads = [p.grad.clone() for p in model.parameters()]
        before = snapshot(model, opt)
        if step % 2:
            assert guard.before_step(loss)  # never a skip, step 3 (non-finite) included
        else:
            guard.step(loss)
        assert_bit_identical(before, snapshot(model, opt))  # not stepped
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # not clipped
        if step != 3:
            opt.step()  # the caller steps
    guard.close()
    log = read_run(tmp_path / "r")
    assert log.meta["config"]["monitor_only"] is True
    assert not any(r["skipped"] for r in log.metrics) and not log.events_of("skip")
    assert [e["step"] for e in log.events_of("nonfinite")] == [3]
    assert guard.skipped_steps == 0


def test_monitor_only_with_raise_raises_on_a_bad_step() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gradguard.Guard(
        model, opt, clip="none", on_nonfinite="raise", on_spike="ignore", monitor_only=True
    )
    guard.step(_backward(model, opt, 0))
    with pytest.raises(NonFiniteError, match="step 1: the gradient norm is nan"):
        guard.step(_backward(model, opt, 1, grad_fault(1, math.nan)))


def test_monitor_only_refuses_settings_that_touch_the_step() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GradGuardError, match="never clips, but got clip=Norm"):
        gradguard.Guard(model, opt, clip="norm:1", on_nonfinite="warn", monitor_only=True)
    with pytest.raises(GradGuardError, match="on_nonfinite must be 'warn' or 'raise'; got 'skip'"):
        gradguard.Guard(model, opt, clip=None, monitor_only=True)
    with pytest.raises(GradGuardError, match="cannot act on spikes; got on_spike='clip'"):
        gradguard.Guard(model, opt, clip=None, on_nonfinite="warn", on_spike="clip", monitor_only=True)


# ----------------------------------------------------------------------------- state
def test_a_state_saved_over_another_architecture_is_refused_before_anything_is_loaded() -> None:
    """A checkpoint from before a Dropout was added (the Sequential's indices shifted): loaded silently, it
    failed with torch's "Missing key(s)" at the first rollback, mid-training."""
    torch.manual_seed(0)
    old = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(old.parameters(), lr=0.1)
    guard = gradguard.Guard(old, opt, on_nonfinite="rollback", snapshot_every=1)
    for _ in range(3):
        opt.zero_grad()
        loss = old(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        guard.step(loss)
    state = guard.state_dict()
    new = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 1))
    resumed = gradguard.Guard(new, torch.optim.SGD(new.parameters(), lr=0.1), on_nonfinite="rollback")
    before = resumed.state_dict()
    with pytest.raises(GradGuardError, match=r"another model \(missing 3.bias, 3.weight; unexpected 2.bias"):
        resumed.load_state_dict(state)
    assert resumed.state_dict()["step_count"] == before["step_count"] == 0  # nothing was loaded


def _state_after_three_steps(model: nn.Module, opt: torch.optim.Optimizer, **options: Any) -> dict[str, Any]:
    guard = gradguard.Guard(model, opt, **options)
    for _ in range(3):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        guard.step(loss)
    return guard.state_dict()


def test_a_state_of_another_optimizer_or_clipper_is_refused_before_anything_is_loaded() -> None:
    """An AdamW-era rollback state loaded into a guard over SGD was accepted; the first rollback loaded
    AdamW's groups into SGD and the next step died in torch's sgd.py ("KeyError: 'momentum'"). An
    AutoClip's state in a ZClip guard raised a bare KeyError: 'alpha' after the step count was loaded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    adamw = _state_after_three_steps(
        model, torch.optim.AdamW(model.parameters(), lr=1e-3), on_nonfinite="rollback", snapshot_every=1
    )
    sgd = gradguard.Guard(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), on_nonfinite="rollback"
    )
    with pytest.raises(GradGuardError, match=r"rollback snapshot of another optimizer .*this SGD"):
        sgd.load_state_dict(adamw)
    assert sgd.state_dict()["step_count"] == 0
    autoclip = _state_after_three_steps(
        model, torch.optim.SGD(model.parameters(), lr=0.1), clip="autoclip:10"
    )
    zclip = gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), clip="zclip")
    with pytest.raises(GradGuardError, match="saved by the AutoClip clipper; this guard clips with ZClip"):
        zclip.load_state_dict(autoclip)
    assert zclip.state_dict()["step_count"] == 0  # nothing was loaded (it was 3, then KeyError)
    same = gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), clip="autoclip:10")
    same.load_state_dict(autoclip)
    assert same.state_dict()["step_count"] == 3


def test_state_dict_round_trip_resumes_exactly(tmp_path: Path) -> None:
    def run(stop_at: int | None) -> list[torch.Tensor]:
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        guard = gradguard.Guard(model, opt, clip="autoclip:10", on_spike="clip", spike_z=2.0)
        fault = grad_fault(7, math.nan)
        if stop_at is None:
            train(guard, model, opt, range(60), fault=fault)
            return [p.detach() for p in model.parameters()]
        train(guard, model, opt, range(stop_at), fault=fault)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        model2 = make_model(seed=1)
        opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
        guard2 = gradguard.Guard(model2, opt2, clip="autoclip:10", on_spike="clip", spike_z=2.0)
        model2.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
        guard2.load_state_dict(saved["guard"])
        assert guard2.step_count == stop_at and guard2.skipped_steps == 1
        train(guard2, model2, opt2, range(stop_at, 60), fault=fault)
        return [p.detach() for p in model2.parameters()]

    straight = run(None)
    resumed = run(31)
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)
    fresh = make_model()
    with pytest.raises(GradGuardError, match="version"):
        gradguard.Guard(fresh, torch.optim.SGD(fresh.parameters(), lr=1)).load_state_dict({"version": 99})


_MEMORY_CHILD = """
import gc, sys, tracemalloc
import torch
from torch import nn
import gradguard, gradguard._guard.anomaly
gradguard._guard.anomaly.HISTORY = 64  # the bounded host history turns over quickly
model = nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
guard = gradguard.Guard(model, opt, clip="auto", every=50, weight_every=10)
x = torch.randn(4, 4)

def steps(n):
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        loss = model(x).pow(2).mean()
        loss.backward()
        guard.step(loss)

def guard_bytes():  # what gradguard's own code holds (allocated by a line of gradguard; torch's caches aside)
    gc.collect()  # reference cycles (torch's pytree helpers) are garbage, not growth
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/gradguard/*")])
    return sum(stat.size for stat in snap.statistics("filename"))

steps(100)
tracemalloc.start(1)
steps(200)  # past the history (64 steps) and a few flushes: everything traced has turned over once
steps(1000)  # torch's and Python's own caches settle (the first 1000 steps hold 7-16 kB more)
sizes = [guard_bytes()]
for _ in range(3):  # each snapshot right after a flush (step 1300, 2300, …): the same point of the cycle
    steps(1000)
    sizes.append(guard_bytes())
print(*(b - a for a, b in zip(sizes, sizes[1:])), guard.monitor.pending)
"""


def test_memory_stays_flat_over_many_steps() -> None:
    """1000 more steps allocate nothing that stays (a fresh process: no other test's state)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    *growth, pending = map(int, out.stdout.split())
    assert pending == 0
    # a leak of 8 bytes a step shows 8 kB in every interval; what is held at a flush moves by a few kB
    assert sorted(growth)[1] < 8_000, f"grew by {growth} bytes over three intervals of 1000 steps"


# ----------------------------------------------------------------------------- crash
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_a_sigkilled_run_leaves_a_readable_log(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import math, sys, time, torch, gradguard
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = gradguard.Guard(model, opt, log_dir={str(run)!r}, every=5)
        for step in range(100000):
            opt.zero_grad(set_to_none=True)
            loss = model(torch.randn(8, 4)).pow(2).mean()
            if step == 3:
                loss = loss * math.nan
            loss.backward()
            guard.step(loss)
            if step == 12:
                print("ready", flush=True)
            time.sleep(0.002)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    log = read_run(run)
    steps = [r["step"] for r in log.metrics]
    assert len(steps) >= 10 and steps == list(range(len(steps)))
    assert log.first_event("nonfinite")["step"] == 3
    assert json.loads((run / "meta.json").read_text())["config"]["on_nonfinite"] == "skip"


# ----------------------------------------------------------------------------- bad input
def test_frozen_parameters_and_parameters_without_grads_are_measured_as_documented(tmp_path: Path) -> None:
    model = make_model()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    guard = gradguard.Guard(model, opt, log_dir=tmp_path / "r", every=2)
    assert guard.run_dir == tmp_path / "r"
    x, y = batch(0)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    model[2].weight.grad = None  # a parameter without a gradient this step
    guard.step(loss)
    guard.close()
    rec = read_run(tmp_path / "r").metrics[0]
    assert set(rec["layers"]) == {"2", "4"}  # the frozen layer is not measured
    assert rec["layers"]["2"]["grad_norm"] > 0  # its bias still has a gradient
    expected = math.sqrt(
        sum(float(p.grad.double().norm()) ** 2 for p in model.parameters() if p.grad is not None)
    )
    assert rec["grad_norm"] == pytest.approx(expected, rel=1e-5)


def test_bad_input_gets_clear_errors() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        GradGuardError, match=r"on_nonfinite must be one of 'skip', 'rollback', 'raise', 'warn'; got 'ignore'"
    ):
        gradguard.Guard(model, opt, on_nonfinite="ignore")  # type: ignore[arg-type]
    with pytest.raises(GradGuardError, match="on_spike must be one of"):
        gradguard.Guard(model, opt, on_spike="stop")  # type: ignore[arg-type]
    with pytest.raises(GradGuardError, match="unknown clip spec 'norm5'"):
        gradguard.Guard(model, opt, clip="norm5")
    with pytest.raises(GradGuardError, match="every must be a positive int; got 0"):
        gradguard.Guard(model, opt, every=0)
    with pytest.raises(GradGuardError, match=r"spike_z must be a finite number > 0; got -1\. .*default is 6"):
        gradguard.Guard(model, opt, spike_z=-1)
    with pytest.raises(GradGuardError, match="lr_backoff"):
        gradguard.Guard(model, opt, lr_backoff=2.0)
    other = nn.Linear(3, 3)
    with pytest.raises(GradGuardError, match=r"2 parameter\(s\) that are not the model's"):
        gradguard.Guard(model, torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1))
    with torch.device(
        "meta"
    ):  # built without values and never materialized: a raw torch error at the first step
        unmade = make_model()
    with pytest.raises(
        GradGuardError, match=r"parameter '0\.weight' is on the meta device .*Materialize the model first"
    ):
        gradguard.Guard(unmade, torch.optim.SGD(unmade.parameters(), lr=0.1))
    frozen = make_model().requires_grad_(False)
    with pytest.raises(GradGuardError, match="no trainable parameter"):
        gradguard.Guard(frozen, torch.optim.SGD(frozen.parameters(), lr=0.1))
    with pytest.raises(GradGuardError, match=r"must be a torch\.optim\.Optimizer"):
        gradguard.Guard(model, "adam")  # type: ignore[arg-type]
    guard = gradguard.Guard(model, opt)
    guard.close()
    with pytest.raises(GradGuardError, match="closed"):
        guard.step(torch.tensor(1.0))


def test_only_the_parameters_the_optimizer_holds_are_guarded() -> None:
    """A GAN-style model with two optimizers: each guard measures its own part."""
    model = make_model()
    opt = torch.optim.SGD(model[4].parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt)
    assert guard._index.layers == ["4"]


def test_the_spike_warnings_of_warn_are_the_steps_zclip_flags_on_device(tmp_path: Path) -> None:
    """on_spike="warn" runs ZClip's rule on the host at flush (clip.HostZClip); it flags the same
    steps as a device ZClip fed the same norms."""
    torch.manual_seed(0)
    model = nn.Linear(6, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gradguard.Guard(
        model, opt, clip=None, on_spike="warn", spike_z=2.5, log_dir=tmp_path / "r", every=7
    )
    g = torch.Generator().manual_seed(0)
    for step in range(150):
        opt.zero_grad(set_to_none=True)
        model(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
        if step in (40, 41, 90, 120):
            for p in model.parameters():
                p.grad.mul_(20.0)
        guard.step()
    guard.close()
    log = read_run(tmp_path / "r")
    device = gradguard.ZClip(z_thresh=2.5)
    dev_flags = [
        bool(torch.isfinite(device.threshold(torch.tensor(r["grad_norm"], dtype=torch.float64))))
        for r in log.metrics
    ]
    assert [r["spike"] for r in log.metrics] == dev_flags
    assert [e["step"] for e in log.events_of("spike")] == [s for s, f in enumerate(dev_flags) if f]
    assert sum(dev_flags) >= 3


def test_a_step_without_any_gradient_is_said_once() -> None:
    """``loss.backward()`` forgotten: the record's norm of 0 would read as a converged model."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt)
    with pytest.warns(RuntimeWarning, match=r"step 0: no guarded parameter has a gradient") as caught:
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            guard.step(model(torch.randn(8, 6)).pow(2).mean())  # no backward
    said = [w for w in caught if "no guarded parameter" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__  # at the user's line, not gradguard's
    guard.close()


def test_a_guard_measures_and_clips_gradients_made_with_create_graph(tmp_path: Path) -> None:
    """``loss.backward(create_graph=True)`` then ``guard.step``: the measurement raised inside the user's
    loop ("a view was created in no_grad mode and is being modified inplace")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, clip="norm:1", log_dir=tmp_path / "r")
    for _ in range(3):
        x = torch.randn(16, 4)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        loss.backward(create_graph=True)
        guard.step(loss)
        for p in model.parameters():
            p.grad = None
    guard.close()
    assert guard.step_count == 3 and guard.last_step_skipped is False
