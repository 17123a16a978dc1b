"""Tests of the Guard's private parts (gradguard._guard), the record fields and the event constructors:
counters, apply strategies chosen at construction, recovery, the device row, the events of a flush,
and the guard's promises that rest on them (state_dict does no I/O, locating a step never flushes)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard
from gradguard import events, monitor, record
from gradguard._guard import apply as applying
from gradguard._guard import measure as measuring
from gradguard._guard.anomaly import Anomalies, flagged_nonfinite, weights_nonfinite
from gradguard._guard.clipping import Clipping, ClipPlan
from gradguard._guard.config import GuardConfig, layer_cadence
from gradguard._guard.counters import Counters
from gradguard._guard.flush import FlushEvents, LossScaleWatch
from gradguard._guard.measure import Constants, Measurement, Meter
from gradguard._guard.params import GuardedParams
from gradguard._guard.poststep import AfterStep
from gradguard._guard.recovery import Recovery
from gradguard._guard.row import device_row, host_values
from gradguard._guard.runmeta import clip_config
from gradguard.clip import Norm, ZClip, from_spec
from gradguard.errors import GradGuardError
from gradguard.runlog import read_run
from gradguard.stats import LayerIndex, tensor_norms, uniform_norms
from nosync import NoSync


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def backward(model: nn.Module, opt: torch.optim.Optimizer, step: int, bad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
    opt.zero_grad(set_to_none=True)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    if bad:
        with torch.no_grad():
            model[2].weight.grad[0, 0] = math.nan
    return loss


def config(**kw: Any) -> GuardConfig:
    settings: dict[str, Any] = {
        "on_nonfinite": "skip",
        "on_spike": "warn",
        "spike_z": 6.0,
        "norm_type": 2.0,
        "every": 50,
        "layer_every": 1,
        "weight_every": 50,
        "snapshot_every": 100,
        "max_consecutive": 10,
        "lr_backoff": None,
        "loss_scale_floor": 1.0,
        "max_replays": 3,
        "monitor_only": False,
        "min_lr": 1e-8,
        "max_rollbacks": 5,
        "rollback_window": 1000,
        **kw,
    }
    return GuardConfig.checked(**settings)


def rec(step: int, **flags: Any) -> dict[str, Any]:
    """A host record with every column (flags False, numbers finite) and ``flags`` set."""
    row: dict[str, Any] = {name: (False if name in record.FLAGS else 1.0) for name in record.SCALARS}
    row["loss_scale"] = math.nan
    return {"step": step, **row, **flags}


# ----------------------------------------------------------------------------- record, events
def test_record_fields_are_defined_once_and_the_monitor_re_exports_them() -> None:
    assert monitor.SCALARS is record.SCALARS
    assert record.SCALARS[-1] == "clip_fraction" and len(record.SCALARS) == 13
    assert all(record.SCALARS[record.COLUMN[name]] == name for name in record.SCALARS)
    assert set(record.SCALARS) > record.FLAGS


def test_each_event_type_has_one_constructor_with_todays_fields() -> None:
    assert events.skip(3, events.SKIP_AMP_OVERFLOW) == {"type": "skip", "step": 3, "reason": "amp_overflow"}
    assert events.skip(3, events.SKIP_SPIKE, grad_norm=2.0)["grad_norm"] == 2.0
    assert events.spike(4, 9.0, "warn") == {"type": "spike", "step": 4, "grad_norm": 9.0, "action": "warn"}
    assert events.rollback(5, 2) == {"type": "rollback", "step": 5, "to_step": 2}
    assert events.lr_backoff(5, 0.5, 0.1) == {"type": "lr_backoff", "step": 5, "factor": 0.5, "lr": 0.1}
    assert events.abort(6, 10, True) == {
        "type": "abort",
        "step": 6,
        "consecutive": 10,
        "weights_nonfinite": True,
    }
    bounded = events.abort(6, 0, False, reason=events.ABORT_MIN_LR, message="m", lr=1e-8)
    assert (bounded["reason"], bounded["message"], bounded["lr"]) == ("min_lr", "m", 1e-8)
    assert events.layers(3, ["0.weight"], ["0"]) == {
        "type": "layers",
        "step": 3,
        "parameters": ["0.weight"],
        "added": ["0"],
    }
    assert set(events.overflow(7, 1e39, clipped=True)) == {"type", "step", "grad_norm", "note"}
    collapse = events.loss_scale_collapse(8, 0.5, 1.0, 3, [(7, 1.0), (8, 0.5)])
    assert (collapse["type"], collapse["floor"], collapse["consecutive_overflows"]) == (
        "loss_scale_collapse",
        1.0,
        3,
    )
    nonfinite = events.nonfinite(
        9, phase="loss", tensor="output", kind="nan", located_by="norm", policy="skip"
    )
    assert list(nonfinite)[:9] == [
        "type",
        "step",
        "phase",
        "module",
        "op",
        "tensor",
        "kind",
        "source",
        "located_by",
    ]
    assert nonfinite["policy"] == "skip" and nonfinite["module"] is None
    assert [events.kind_of(v) for v in (math.nan, math.inf, -math.inf)] == ["nan", "inf", "-inf"]
    assert {e["type"] for e in (nonfinite, collapse, events.rollback(0, 0))} <= set(events.TYPES)


def test_the_nonfinite_event_of_a_step_from_its_flags() -> None:
    vals = rec(3, loss=-math.inf, loss_nonfinite=True, nonfinite=True)
    event = flagged_nonfinite(3, vals, {"0": 1.0, "2": math.nan}, "skip")
    assert (event["phase"], event["tensor"], event["kind"], event["layers"]) == (
        "loss",
        "output",
        "-inf",
        ["2"],
    )
    grads = flagged_nonfinite(4, rec(4, grad_nan=True, nonfinite=True), {}, "warn")
    assert (grads["phase"], grads["kind"], grads["layers_nonfinite"]) == ("backward", "nan", 0)
    weights = weights_nonfinite(5, {"0": 1.0, "2": math.inf}, "skip")
    assert weights is not None and (weights["module"], weights["tensor"], weights["kind"]) == (
        "2",
        "param",
        "inf",
    )
    assert weights_nonfinite(5, {"0": 1.0}, "skip") is None


# ----------------------------------------------------------------------------- counters
def test_counters_change_in_one_place_whichever_path_learns_of_the_step() -> None:
    c = Counters()
    c.taken()
    c.skipped()
    c.skipped()
    c.overflowed()  # an AMP overflow: skipped, but neither counts nor breaks a run of bad steps
    assert (c.skipped_steps, c.consecutive) == (3, 2)
    c.taken()
    assert c.consecutive == 0
    for _ in range(4):
        c.advance()
    assert c.step_count == 4
    flushed = Counters()
    for r in [rec(0), rec(1, skipped=True), rec(2, skipped=True, amp_overflow=True), rec(3, skipped=True)]:
        flushed.learn(r)
    assert (flushed.skipped_steps, flushed.consecutive) == (3, 2)
    flushed.learn(rec(4, skipped=True, **{record.DECIDED: True}))  # the host counted it already
    assert flushed.skipped_steps == 3


def test_counters_after_pending_records_leave_the_counters_alone_and_round_trip() -> None:
    c = Counters(step_count=5, skipped_steps=1, consecutive=1)
    later = c.after([rec(5, skipped=True), rec(6, skipped=True)])
    assert (later.skipped_steps, later.consecutive) == (3, 3) and (c.skipped_steps, c.consecutive) == (1, 1)
    fresh = Counters()
    fresh.load_state_dict(later.state_dict())
    assert fresh == later


# ----------------------------------------------------------------------------- apply strategies
@pytest.mark.parametrize(
    ("settings", "fused", "expected"),
    [
        ({}, False, applying.HostDecided),
        ({}, True, applying.Fused),
        ({"on_nonfinite": "rollback"}, True, applying.HostDecided),
        ({"on_nonfinite": "raise"}, True, applying.HostDecided),
        ({"on_nonfinite": "warn"}, False, applying.NeverSkip),
        ({"on_nonfinite": "warn", "on_spike": "skip"}, False, applying.HostDecided),
        ({"on_nonfinite": "warn", "monitor_only": True}, False, applying.Observe),
        ({"on_nonfinite": "raise", "monitor_only": True}, True, applying.HostDecided),
    ],
)
def test_the_apply_strategy_is_chosen_once_from_the_settings(
    settings: dict[str, Any], fused: bool, expected: type
) -> None:
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    chosen = applying.choose(config(**settings), opt, fused=fused, momentum_sgd=False)
    assert type(chosen) is expected


def test_a_guard_picks_its_strategies_at_construction() -> None:
    model = make_model()
    fused = gradguard.Guard(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True))
    assert isinstance(fused._apply, applying.Fused) and fused._sync_free()
    assert fused._apply.on_cpu  # float32 CPU parameters: the host branch (apply._fused_step)
    plain = gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(plain._apply, applying.HostDecided) and plain._apply.steps and not plain._sync_free()
    external = plain._apply_external  # before_step: decided on the host, the caller steps
    assert isinstance(external, applying.HostDecided) and not external.steps and external.clips
    monitor_only = gradguard.Guard(
        model, torch.optim.SGD(model.parameters(), lr=0.1), clip=None, on_nonfinite="warn", monitor_only=True
    )
    assert (
        isinstance(monitor_only._apply, applying.Observe)
        and type(monitor_only._apply_external) is applying.Observe
    )


class _Opt:
    """An optimizer stand-in that counts its steps."""

    def __init__(self) -> None:
        self.steps = 0
        self.state: dict[Any, Any] = {}

    def step(self) -> None:
        self.steps += 1


def _planned(skip: bool, scaler: Any = None) -> tuple[applying.Planned, list[str]]:
    calls: list[str] = []
    grads = [torch.ones(3)]
    planned = applying.Planned(
        grads, torch.tensor(0.5), torch.tensor(skip), scaler, lambda: calls.append("clip")
    )
    return planned, calls


def test_host_decided_reads_once_clips_and_steps_a_taken_step_only() -> None:
    opt = _Opt()
    host = applying.HostDecided(opt)  # type: ignore[arg-type]
    reads: list[bool] = []

    def decide(p: applying.Planned) -> bool:
        reads.append(bool(p.skip))
        return reads[-1]

    taken, calls = _planned(False)
    assert host(taken, decide) == applying.Outcome(False, on_host=True)
    assert calls == ["clip"] and opt.steps == 1 and torch.equal(taken.grads[0], torch.full((3,), 0.5))
    skipped, calls = _planned(True)
    assert host(skipped, decide) == applying.Outcome(True, on_host=True)
    assert calls == [] and opt.steps == 1 and reads == [False, True]
    external = applying.HostDecided(opt, steps=False)  # type: ignore[arg-type]
    assert external(_planned(False)[0], decide).skipped is False and opt.steps == 1


def test_sync_free_strategies_never_call_decide_and_hand_the_device_flag_back() -> None:
    opt = _Opt()

    def decide(p: applying.Planned) -> bool:
        raise AssertionError("no host read")

    never = applying.NeverSkip(opt, fused=False, under_scaler=applying.HostDecided(opt))  # type: ignore[arg-type]
    planned, calls = _planned(False)
    outcome = never(planned, decide)
    assert outcome.skipped is planned.skip and not outcome.on_host and calls == ["clip"] and opt.steps == 1
    assert applying.Observe()(planned, decide).skipped is planned.skip and opt.steps == 1


def test_never_skip_hands_a_scaler_step_to_its_under_scaler_strategy() -> None:
    opt = _Opt()
    seen: list[str] = []

    class Under:
        sync_free = False

        def __call__(self, step: applying.Planned, decide: Any) -> applying.Outcome:
            seen.append("under")
            return applying.Outcome(True, on_host=True)

    never = applying.NeverSkip(opt, fused=False, under_scaler=Under())  # type: ignore[arg-type]
    assert never(_planned(False, scaler=object())[0], lambda p: False).on_host and seen == ["under"]


def test_fused_momentum_sgd_decides_its_first_step_on_the_host() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    params = list(model.parameters())
    decided: list[bool] = []
    fused = applying.Fused(opt, momentum_sgd=True, host=applying.HostDecided(opt))

    def step() -> applying.Outcome:
        backward(model, opt, 0)
        planned = applying.Planned([p.grad for p in params], None, torch.tensor(False), None, lambda: None)  # type: ignore[misc]
        return fused(planned, lambda p: decided.append(bool(p.skip)) or False)  # type: ignore[func-returns-value]

    assert step().on_host and decided == [False]  # no momentum buffers yet
    assert not step().on_host and decided == [False]  # now the kernel decides


# ----------------------------------------------------------------------------- recovery
def test_recovery_snapshot_rollback_backoff_and_its_state_dict_round_trip(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    clipper = gradguard.AutoClip()
    rec_ = Recovery(
        model,
        opt,
        {"clipper": clipper, "spike": None},
        every=2,
        lr_backoff=0.5,
        snapshot_dir=tmp_path,
        active=True,
    )
    assert rec_.rollback(0) == [events.skip(0, events.SKIP_NO_SNAPSHOT)]
    backward(model, opt, 0)
    opt.step()
    rec_.after_good_step(0)  # due: the first good step
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for step in (1, 2):
        backward(model, opt, step)
        opt.step()
        rec_.after_good_step(step)  # step 1: not due; step 2: due
    assert rec_.snapshot_step == 2 and torch.load(tmp_path / "snapshot.pt", weights_only=True)["step"] == 2
    state = rec_.state_dict()
    other = Recovery(
        model,
        opt,
        {"clipper": clipper, "spike": None},
        every=2,
        lr_backoff=0.5,
        snapshot_dir=None,
        active=True,
    )
    other.load_state_dict(state)
    assert other.snapshot_step == 2 and other.snapshot is not None
    backward(model, opt, 3)
    opt.step()
    done = other.rollback(3)
    assert [e["type"] for e in done] == ["rollback", "lr_backoff"] and done[0]["to_step"] == 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert not all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())  # step 2's, not step 0's
    with pytest.raises(GradGuardError, match="recovery state has version 7"):
        other.load_state_dict({"version": 7})


def test_recovery_bounds_end_a_rollback_loop_and_survive_its_state_dict() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec_ = Recovery(
        model, opt, {}, every=1, lr_backoff=0.5, snapshot_dir=None, active=True, max_rollbacks=2, window=10
    )
    assert rec_.limit(0) is None  # no snapshot: nothing to roll back to
    rec_.take(0)
    for step in (1, 2):
        assert rec_.limit(step) is None
        rec_.rollback(step)
    limit = rec_.limit(3)  # a 3rd rollback within 10 steps
    assert limit is not None and limit.reason == events.ABORT_MAX_ROLLBACKS
    assert limit.fields == {"lr": 0.025, "to_step": 0, "rollbacks": 3, "window": 10, "max_rollbacks": 2}
    assert rec_.limit(12) is None  # the window moved on
    other = Recovery(model, opt, {}, every=1, lr_backoff=0.5, snapshot_dir=None, active=True, max_rollbacks=2)
    other.load_state_dict(rec_.state_dict())
    assert other.rollbacks == [1, 2] and other.limit(3) is not None
    floor = Recovery(model, opt, {}, every=1, lr_backoff=0.5, snapshot_dir=None, active=True, min_lr=0.02)
    floor.take(0)
    limit = floor.limit(5)  # 0.025 * 0.5 < 0.02
    assert limit is not None and limit.reason == events.ABORT_MIN_LR and "below min_lr=0.02" in limit.why
    assert [e["type"] for e in floor.rollback(5, back_off=False)] == ["rollback"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)  # the run stops: no back-off
    floor.forget()  # the optimizer changed: the next good step takes a new snapshot
    assert floor.snapshot is None and floor.limit(6) is None
    floor.after_good_step(6)
    assert floor.snapshot_step == 6


def test_the_recovery_bounds_and_the_layer_cadence_are_checked_settings() -> None:
    with pytest.raises(GradGuardError, match="min_lr must be a number >= 0; got -1"):
        config(min_lr=-1)
    with pytest.raises(GradGuardError, match="min_lr must be a number >= 0; got 'x'"):
        config(min_lr="x")
    with pytest.raises(GradGuardError, match="max_rollbacks must be a positive int; got 0"):
        config(max_rollbacks=0)
    with pytest.raises(GradGuardError, match="rollback_window must be a positive int"):
        config(rollback_window=0)
    assert config(max_rollbacks=None).max_rollbacks is None
    assert [layer_cadence(n) for n in (1, 64, 65, 128, 129, 2500)] == [1, 1, 2, 2, 3, 40]
    auto = config(layer_every=None).for_layers(200)
    assert (auto.layer_every, auto.layers_auto, auto.for_layers(10).layer_every) == (4, True, 1)
    assert config(layer_every=3).for_layers(2500).layer_every == 3  # asked for: kept
    assert auto.as_meta()["layer_every_auto"] is True and "layer_every_auto" not in config().as_meta()


def test_parameters_wait_until_their_first_gradient_then_join() -> None:
    model = make_model()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt.add_param_group({"params": [model[2].weight]})
    changes: list[int] = []
    guarded = GuardedParams(model, opt, on_change=lambda: changes.append(1))
    assert guarded.names == ["2.weight"] and [n for n, _ in guarded.waiting] == ["0.weight", "0.bias"]
    assert guarded.joining() == [] and changes == []
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    assert [n for n, _ in guarded.joining()] == ["0.weight"]
    assert guarded.names == ["2.weight", "0.weight"] and guarded.params[-1] is model[0].weight
    opt.add_param_group({"params": [model[2].bias]})
    assert guarded.joining() == [] and changes == [1]  # waits for its gradient
    model[2].bias.grad = torch.zeros_like(model[2].bias)
    assert [n for n, _ in guarded.joining()] == ["2.bias"]
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(GradGuardError, match="not the model's"):
        guarded.joining()


def test_the_monitor_grows_its_layers_after_flushing_the_pending_records() -> None:
    written: list[list[dict[str, Any]]] = []
    mon = monitor.Monitor(["a"], every=10, on_flush=written.append)
    row = torch.zeros(len(record.SCALARS))
    mon.record(0, row, torch.tensor([1.0]))
    mon.add_layers(["b"])
    assert mon.pending == 0 and written[0][0]["layers"] == {"a": {"grad_norm": 1.0}}
    mon.record(1, row, torch.tensor([2.0, 3.0]), absent=(1,))
    assert mon.flush()[0]["layers"] == {"a": {"grad_norm": 2.0}, "b": {"grad_norm": None}}


def test_the_monitors_last_row_is_the_step_recorded_last_also_on_its_flush_step() -> None:
    """``Monitor.last_row()``: the row written last (the demos read each step's record through it),
    also on the step whose record filled the buffer and flushed it, and after new layers none."""
    mon = monitor.Monitor(["a"], every=2, on_flush=lambda rs: None)
    assert mon.last_row() is None
    loss = record.COLUMN["loss"]
    for step in range(5):
        row = torch.zeros(len(record.SCALARS))
        row[loss] = 10.0 + step
        mon.record(step, row, torch.tensor([1.0]))
        last = mon.last_row()
        assert last is not None and float(last[loss]) == 10.0 + step, (step, mon.pending)
    mon.add_layers(["b"])
    assert mon.last_row() is None


def test_a_held_row_waits_for_what_is_measured_after_its_step() -> None:
    """``held``: a full buffer waits for :meth:`Monitor.complete` (the update ratios measured after
    the caller's step); a row never completed goes out as it is at the next record or flush."""
    written: list[list[dict[str, Any]]] = []
    mon = monitor.Monitor(["a"], every=2, on_flush=written.append)
    row = torch.zeros(len(record.SCALARS))
    mon.record(0, row, torch.tensor([1.0]))
    mon.record(1, row, torch.tensor([1.0]), held=True)
    assert mon.pending == 2 and not written  # full, but held
    mon.complete({"update_ratio": torch.tensor([0.5])})
    assert [r["layers"]["a"] for r in written[0]] == [
        {"grad_norm": 1.0},
        {"grad_norm": 1.0, "update_ratio": 0.5},
    ]
    mon.record(2, row, held=True)
    mon.record(3, row, held=True)  # step 2 never completed: released as it is
    mon.complete({"update_ratio": torch.tensor([0.25])})
    assert [r["step"] for r in written[1]] == [2, 3] and "layers" not in written[1][0]
    assert written[1][1]["layers"] == {"a": {"update_ratio": 0.25}}
    mon.record(4, row, held=True)
    mon.flush()  # written as it is; a later complete finds nothing to complete
    mon.complete({"update_ratio": torch.tensor([1.0])})
    assert mon.pending == 0 and "layers" not in written[2][0]


def test_after_step_runs_its_work_once_after_the_next_step_and_can_be_dropped() -> None:
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    after, ran = AfterStep(opt), []
    after.arm(lambda: ran.append(1))
    opt.step()
    opt.step()
    assert ran == [1] and not after.armed
    after.arm(lambda: ran.append(2))
    after.drop()
    opt.step()
    assert ran == [1] and len(opt._optimizer_step_post_hooks) == 1
    after.close()
    assert not opt._optimizer_step_post_hooks


def test_an_inactive_recovery_takes_no_snapshot() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec_ = Recovery(model, opt, {}, every=1, lr_backoff=None, snapshot_dir=None, active=False)
    rec_.after_good_step(0)
    assert rec_.snapshot is None


def test_an_explosion_recovery_keeps_two_snapshots_and_picks_one_from_before_the_onset() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw: dict[str, Any] = {"lr_backoff": None, "snapshot_dir": None, "active": True, "keep_earlier": True}
    rec_ = Recovery(model, opt, {}, every=2, **kw)
    calm = [True]
    rec_.healthy = lambda: calm[0]
    rec_.take(-1)  # the initial state
    for step in range(12):
        rec_.after_good_step(step)  # due every max(every, MIN_GAP) = 5 steps
    assert (rec_.earlier["step"], rec_.snapshot["step"]) == (4, 9)  # type: ignore[index]
    calm[0] = False  # the norm climbs: a due snapshot waits
    rec_.after_good_step(20)
    assert rec_.snapshot["step"] == 9  # type: ignore[index]
    assert rec_.before(11)["step"] == 9 and rec_.before(10)["step"] == 4  # type: ignore[index]
    assert rec_.before(5) is None  # step 4's state gave the norm of step 5: not from before
    snap = rec_.before(10)
    assert snap is not None
    rec_.keep_until(snap, 21)  # rewound to it: the newer one (from the climb) is dropped
    assert (rec_.snapshot, rec_.earlier, rec_.snapshot_step) == (snap, None, 21)
    state = rec_.state_dict()
    assert state["earlier"] is None and state["snapshot"]["step"] == 4


def explosion_series(n_flat: int = 30) -> list[float]:
    g = torch.Generator().manual_seed(0)
    flat = (1.0 + 0.2 * torch.rand(n_flat, generator=g)).tolist()
    return flat + [4.0 * 3.0**i for i in range(8)]


def test_the_explosion_watch_confirms_the_runtables_onset_sustain_steps_after_it() -> None:
    from gradguard._guard.explosion import ExplosionWatch
    from gradguard.runtable import SUSTAIN, climb_onset

    norms = explosion_series()
    watch = ExplosionWatch()
    found = [watch.add(100 + i, v) for i, v in enumerate(norms)]
    k = climb_onset(norms, ends_in_trouble=False)
    assert k == 30
    first = next(i for i, f in enumerate(found) if f is not None)
    assert first == k + SUSTAIN
    explosion = found[first]
    assert explosion is not None
    assert (explosion.onset, explosion.at, explosion.healthy) == (100 + k, 100 + first, k)
    assert explosion.baseline == pytest.approx(sorted(norms[:k])[k // 2 - 1 : k // 2 + 1][0], rel=0.2)
    # a lone spike, and a non-finite step without a climb, are not explosions; the watch calms down
    lone = ExplosionWatch()
    assert [lone.add(i, v) for i, v in enumerate([1.0] * 10 + [50.0] + [1.0] * 5)] == [None] * 16
    assert lone.calm and lone.add(16, math.nan) is None and lone.calm
    # a climb that ends non-finite is one at once, before it was held SUSTAIN steps
    short = ExplosionWatch()
    for i, v in enumerate([1.0] * 10 + [20.0]):
        short.add(i, v)
    assert not short.calm
    hit = short.add(11, math.inf)
    assert hit is not None and hit.onset == 10


def test_a_new_level_of_the_norm_is_not_an_explosion_and_the_watch_settles_on_it() -> None:
    from gradguard._guard.explosion import SETTLE, ExplosionWatch

    watch = ExplosionWatch()
    norms = [1.0] * 20 + [5.0] * (SETTLE + 5) + [5.0 * 4**i for i in range(6)]
    found = [watch.add(i, v) for i, v in enumerate(norms)]
    assert found[: 20 + SETTLE] == [None] * (20 + SETTLE)  # ×5 and held: a new level
    assert watch.calm or found[20 + SETTLE + 1] is None
    hit = next(f for f in found if f is not None)
    assert hit.onset >= 20 + SETTLE + 5 and hit.baseline == pytest.approx(5.0)  # measured from the new level
    # restart: norms after the state rewound to are forgotten; the restored scale stands for missing ones
    watch.restart(30, healthy=7.0)  # the new level began at step 20: 11 norms are kept
    assert (watch.steps, watch.seeded, watch.calm) == (list(range(20, 31)), 0, True)
    fresh = ExplosionWatch()
    fresh.restart(-1, healthy=7.0)
    assert (fresh.steps, fresh.norms, fresh.seeded) == ([-3, -2, -1], [7.0] * 3, 3)
    state = fresh.state_dict()
    other = ExplosionWatch()
    other.load_state_dict(state)
    assert (other.steps, other.norms, other.seeded) == (fresh.steps, fresh.norms, 3)


def test_on_explosion_is_a_checked_setting_and_recover_keeps_snapshots() -> None:
    with pytest.raises(GradGuardError, match="on_explosion must be one of 'ignore', 'warn', 'recover'; got"):
        config(on_explosion="x")
    assert config().on_explosion == "ignore" and not config().snapshots
    assert config(on_explosion="recover").snapshots and config(on_nonfinite="rollback").snapshots
    assert config(on_explosion="warn").as_meta()["on_explosion"] == "warn"


# ----------------------------------------------------------------------------- the row, the flush
def test_the_host_derives_what_the_device_row_left_to_it() -> None:
    """A usual step's row leaves to the host what follows from its own numbers
    (:data:`record.DERIVED`): which of the loss and the norm is not finite, and a norm clipper's
    clip fraction; a value written explicitly (a rescue, a caller's clip) is kept as it is."""
    consts = Constants()
    meter = Meter([torch.nn.Parameter(torch.ones(2))], 2.0, LayerIndex(["w"]), None)
    clipping = Clipping(Norm(0.5), None, False, [], consts)
    cases = [(1.0, 2.0), (math.nan, 2.0), (1.0, math.inf), (math.inf, math.nan), (1.0, 0.1)]
    for loss, g in cases:
        meter.params[0].grad = torch.full((2,), g)
        into = torch.full((len(record.SCALARS),), 7.0)
        m = meter.measure(torch.tensor(loss), lambda device, n, into=into: (into, None))
        plan = clipping.plan(m)
        row = device_row(m, plan, m.bad, consts.false(m.device), consts)
        assert row is into and plan.coef is m.column("clip_coef")
        vals = host_values(row)
        norm = vals["grad_norm"]
        loss_bad, grad_bad = not math.isfinite(loss), not math.isfinite(norm)
        want = (float(loss_bad), float(grad_bad), float(math.isnan(norm)))
        assert (vals["loss_nonfinite"], vals["grad_nonfinite"], vals["grad_nan"]) == want, (loss, g)
        assert vals["nonfinite"] == vals["skipped"] == float(loss_bad or grad_bad)
        assert vals["clip_fraction"] == float(vals["clip_coef"] < 1.0) and vals["threshold"] == 0.5
    written = [1.0, 2.0, 1.0, 0.5, 1.0] + [record.DERIVED] * 3 + [0.0] * 3 + [math.nan, 0.25]
    record.derive(written)
    assert written[4:8] == [1.0, 0.0, 0.0, 0.0] and written[-1] == 0.25


def test_the_device_row_is_in_record_column_order() -> None:
    consts = Constants()
    dev = torch.device("cpu")
    t, f = torch.tensor(True), torch.tensor(False)
    m = Measurement(
        dev, [], [], torch.zeros(0), torch.tensor(3.0), torch.tensor([2.0, 3.0]),
        torch.tensor([False, True]), t, t,
    )  # fmt: skip
    plan = ClipPlan(torch.tensor(0.25), torch.tensor(0.75), f, torch.tensor(1.0))
    vals = host_values(device_row(m, plan, t, f, consts))
    assert list(vals) == list(record.SCALARS)
    assert (vals["loss"], vals["grad_norm"], vals["clip_coef"], vals["threshold"]) == (2.0, 3.0, 0.25, 0.75)
    assert (vals["nonfinite"], vals["loss_nonfinite"], vals["grad_nonfinite"], vals["grad_nan"]) == (
        1,
        0,
        1,
        1,
    )
    assert (vals["skipped"], vals["spike"], vals["amp_overflow"]) == (1, 0, 0)
    assert math.isnan(vals["loss_scale"]) and vals["clip_fraction"] == 1.0
    unclipped = host_values(device_row(m, ClipPlan(None, None, f, None), f, f, consts))
    assert math.isnan(unclipped["clip_coef"]) and unclipped["threshold"] == math.inf
    assert math.isnan(unclipped["clip_fraction"])


def test_the_row_stores_a_clip_fraction_of_any_form_and_can_be_made_in_place() -> None:
    """A norm clipper's fraction is the 0-D bool ``coef < 1`` (stored 1.0 / 0.0), another's a float
    (an in-place clipper's, or the recovery's ``fraction_clipped``), none NaN; ``m.row`` (the
    monitor's next row) receives the row itself."""
    consts = Constants()
    dev = torch.device("cpu")
    f = torch.tensor(False)
    m = Measurement(dev, [], [], torch.zeros(0), torch.tensor(3.0), torch.tensor([2.0, 3.0]), torch.tensor([False, False]), f, f)  # fmt: skip
    coef, tau = torch.tensor(0.25), torch.tensor(0.75)
    clipping = Clipping(Norm(0.75), None, False, [], consts)
    assert clipping.fraction(coef) is not None and clipping.fraction(coef).dtype == torch.bool  # type: ignore[union-attr]
    for fraction, want in ((clipping.fraction(coef), 1.0), (clipping.fraction(torch.tensor(1.0)), 0.0), (torch.tensor(0.375), 0.375)):  # fmt: skip
        vals = host_values(device_row(m, ClipPlan(coef, tau, f, fraction), f, f, consts))
        assert vals["clip_fraction"] == want and math.isnan(vals["loss_scale"]), fraction
        assert (vals["nonfinite"], vals["skipped"], vals["clip_coef"]) == (0.0, 0.0, 0.25)
    into = torch.full((len(record.SCALARS),), -1.0)
    m.row = into
    row = device_row(m, ClipPlan(None, None, f, None), f, f, consts)
    assert row.data_ptr() == into.data_ptr() and math.isnan(host_values(into)["clip_fraction"])


def test_a_step_made_in_the_monitors_next_rows_is_recorded_without_a_copy() -> None:
    """``next_rows``: the views of the buffers the next record keeps; a row made there is recorded
    as it is (the same as a copied one); while a full buffer waits for a held row there are none."""
    written: list[list[dict[str, Any]]] = []
    mon = monitor.Monitor(["a", "b"], every=2, on_flush=written.append, reduce=lambda rows: rows[:, :2] * 2)
    row, norms = mon.next_rows(torch.device("cpu"), 3)
    assert row is not None and norms is not None and norms.dtype == torch.float64 and norms.shape == (3,)
    first_row = row.data_ptr()
    row.copy_(torch.arange(len(record.SCALARS), dtype=torch.float32))
    norms.copy_(torch.tensor([1.0, 2.0, 3.0]))
    with _Ops() as ops:
        mon.record(0, row, norms)
    assert ops.count == 0  # nothing copied
    mon.record(
        1, torch.zeros(len(record.SCALARS)), torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64), held=True
    )
    assert mon.next_rows(torch.device("cpu"), 3) == (None, None)  # full, waiting for the held row
    mon.complete({})
    (first, second) = written[0]
    assert first["grad_norm"] == 1.0 and first["layers"] == {"a": {"grad_norm": 2.0}, "b": {"grad_norm": 4.0}}
    assert second["grad_norm"] == 0.0 and second["layers"]["b"] == {"grad_norm": 10.0}
    row, _ = mon.next_rows(torch.device("cpu"), 3)  # after the flush: the first row again
    assert row is not None and row.data_ptr() == first_row


def _flush_events(**kw: Any) -> tuple[FlushEvents, Counters]:
    model = make_model()
    counters = Counters()
    anomalies = Anomalies(model, list(model.parameters()), None, max_replays=3, can_replay=True)
    return FlushEvents(config(**kw), counters, anomalies), counters


def test_the_events_of_a_flush_in_step_order_and_the_steps_counted() -> None:
    derive, counters = _flush_events(on_spike="warn")
    found = derive(
        [
            rec(0, spike=True),
            rec(1, nonfinite=True, grad_nonfinite=True, skipped=True, layers={"2": {"grad_norm": math.inf}}),
            rec(2, skipped=True, nonfinite=True, **{record.DECIDED: True}),
            rec(3, layers={"0": {"weight_norm": math.nan}}),
            rec(4, layers={"0": {"weight_norm": math.nan}}),  # reported once
        ]
    )
    assert [(e["type"], e["step"]) for e in found] == [
        ("spike", 0),
        ("nonfinite", 1),
        ("skip", 1),
        ("nonfinite", 3),
    ]
    assert found[1]["layers"] == ["2"] and found[3]["tensor"] == "param"
    assert (counters.skipped_steps, counters.consecutive) == (1, 0)
    assert derive([rec(1, nonfinite=True, skipped=True)])[0]["type"] == "skip"  # step 1's nonfinite: once


def test_a_loss_scale_collapse_is_reported_once_per_collapse() -> None:
    watch = LossScaleWatch(floor=1.0, max_overflows=3)
    scales = [(8.0, True), (4.0, True), (2.0, True), (1.0, True), (2.0, False), (0.5, False)]
    found = [watch.check(rec(i, loss_scale=s, amp_overflow=o)) for i, (s, o) in enumerate(scales)]
    assert [e["step"] if e else None for e in found] == [None, None, 2, None, None, 5]
    assert found[2] is not None and found[2]["recent_scales"] == [(0, 8.0), (1, 4.0), (2, 2.0)]


# ----------------------------------------------------------------------------- promises of the guard
def test_state_dict_writes_nothing_and_counts_the_steps_still_on_the_device(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # sync-free: learnt at flush
    guard = gradguard.Guard(model, opt, log_dir=tmp_path / "r", every=100)
    for step in range(6):
        guard.step(backward(model, opt, step, bad=step in (3, 4)))
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text()
    state = guard.state_dict()
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == metrics == ""  # nothing flushed
    assert guard.monitor.pending == 6 and guard.skipped_steps == 0
    assert (state["step_count"], state["skipped_steps"], state["consecutive"]) == (6, 2, 0)
    guard.flush()
    assert guard.state_dict()["skipped_steps"] == guard.skipped_steps == 2
    guard.close()


def test_locating_a_bad_step_flushes_nothing_mid_step(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # host-decided: the bad step is located at once
    guard = gradguard.Guard(model, opt, log_dir=tmp_path / "r", every=100)
    for step in range(5):
        guard.step(backward(model, opt, step, bad=step == 4))
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == ""
    assert guard.monitor.pending == 5
    guard.close()
    ev = read_run(tmp_path / "r").first_event("nonfinite")
    assert ev["step"] == 4 and ev["located_by"] in ("replay", "norm")


def test_meta_records_the_clipper_as_data_and_its_repr(tmp_path: Path) -> None:
    model = make_model()
    guard = gradguard.Guard(
        model, torch.optim.SGD(model.parameters(), lr=0.1), clip="norm:2", log_dir=tmp_path / "r"
    )
    guard.close()
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["config"]["clip"] == clip_config(guard.clipper)
    assert meta["config"]["clip_repr"] == repr(guard.clipper)
    assert isinstance(meta["config"]["clip"], dict) and meta["config"]["clip"]["kind"] == "norm"
    assert clip_config(None) is None


@pytest.mark.parametrize(
    ("clip", "expected"),
    [("norm:1e-3", [1.0] * 4), ("norm:1e6", [0.0] * 4), (None, [math.nan] * 4), ("value:1e6", [0.0] * 4)],
)
def test_the_clip_fraction_column_says_what_the_clipper_did(
    tmp_path: Path, clip: str | None, expected: list
) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gradguard.Guard(model, opt, clip=clip, log_dir=tmp_path / "r", every=2)
    for step in range(4):
        guard.step(backward(model, opt, step))
    guard.close()
    got = [r["clip_fraction"] for r in read_run(tmp_path / "r").metrics]
    assert got == pytest.approx(expected, nan_ok=True)


def test_a_value_clipper_reports_the_fraction_of_elements_it_clamped(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gradguard.Guard(model, opt, clip="value:1e-3", log_dir=tmp_path / "r", every=2)
    loss = backward(model, opt, 0)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    expected = float((grads.abs() > 1e-3).float().mean())
    guard.step(loss)
    guard.close()
    assert read_run(tmp_path / "r").metrics[0]["clip_fraction"] == pytest.approx(expected)


# ----------------------------------------------------------------------------- the per-step cost
@pytest.mark.parametrize("p", [2.0, 1.0, 0.5, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_rows_reduce_to_the_layer_norms_each_row_gives_alone(p: float, dtype: torch.dtype) -> None:
    """The monitor reduces a flush's rows of per-tensor norms at once: each row bit for bit what it
    gives alone (the p of ``exact_in_rows``), NaN and inf included."""
    names = [f"l{i % 7}.w{i}" for i in range(40)]  # tensors of a layer apart from each other
    index = LayerIndex(names)
    g = torch.Generator().manual_seed(0)
    rows = torch.rand(13, 40, generator=g) * 10.0 ** torch.randint(-30, 30, (13, 40), generator=g)
    rows[rows > 1e28] = math.inf
    rows[2, 5] = math.nan
    rows = rows.to(dtype)
    together = index.reduce(rows, p)
    assert LayerIndex.exact_in_rows(p) and together.shape == (13, len(index.layers))
    for r in range(13):
        alone = index.reduce(rows[r], p)
        assert torch.equal(together[r].nan_to_num(7.0), alone.nan_to_num(7.0))
    assert not LayerIndex.exact_in_rows(3.0)  # pow(1/3) rounds by where an element falls: per step


def test_the_monitor_reduces_per_tensor_norms_at_the_flush_as_each_step_would() -> None:
    """A layer step records its per-tensor norms (one copy); the flush reduces all rows at once. A
    tensor that joins an existing layer widens the rows; the rows before it count it 0."""
    index = LayerIndex(["a.w", "a.b", "b.w"])
    mon = monitor.Monitor(["a", "b"], every=10, reduce=lambda rows: index.reduce(rows))
    row = torch.zeros(len(record.SCALARS))
    mon.record(0, row, torch.tensor([3.0, 4.0, 1.0], dtype=torch.float64))
    mon.record(1, row)  # not a layer step
    mon.record(2, row, torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), absent=(0,))
    index = LayerIndex(["a.w", "a.b", "b.w", "b.b"])  # b.b joined layer b
    mon.record(3, row, torch.tensor([6.0, 8.0, 3.0, 4.0], dtype=torch.float64))
    got = [r.get("layers") for r in mon.flush()]
    assert got == [
        {"a": {"grad_norm": 5.0}, "b": {"grad_norm": 1.0}},
        None,
        {"a": {"grad_norm": None}, "b": {"grad_norm": 2.0}},
        {"a": {"grad_norm": 10.0}, "b": {"grad_norm": 5.0}},
    ]


def test_a_fixed_norm_threshold_is_a_constant_equal_to_the_clippers_own() -> None:
    norm = Norm(0.5)
    clipping = Clipping(norm, None, False, [], Constants())
    total = torch.tensor(2.0)
    m = Measurement(total.device, [], [], total.reshape(1), total, torch.tensor([1.0, 2.0]),
                    torch.tensor([False, False]), torch.tensor(False), torch.tensor(False))  # fmt: skip
    first, second = clipping.plan(m), clipping.plan(m)
    assert first.threshold is second.threshold  # made once
    want = norm.threshold(total)
    assert (
        first.threshold is not None
        and first.threshold.dtype == want.dtype
        and torch.equal(first.threshold, want)
    )
    norm.max_norm = 0.25  # a changed threshold is a new constant
    assert float(clipping.plan(m).threshold) == 0.25  # type: ignore[arg-type]


class _Ops(TorchDispatchMode):
    """Counts the device ops (no views, no host reads) outside the optimizer's own step."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        if not (self.paused or func.is_view or name.startswith("profiler") or name in _NOT_COUNTED):
            self.count += 1
        return func(*args, **(kwargs or {}))


_NOT_COUNTED = {"aten.detach.default", "aten.lift_fresh.default", "aten._local_scalar_dense.default"}


@pytest.mark.parametrize(
    ("fused", "clip", "on_nonfinite", "budget"),
    [
        (True, "norm:1", "skip", 19),
        (False, "norm:1", "skip", 19),
        (False, "norm:1", "warn", 19),
        (True, None, "skip", 13),
        (False, None, "warn", 13),
    ],
)
def test_a_guarded_step_issues_few_device_ops(
    fused: bool, clip: str | None, on_nonfinite: str, budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixed cost of a step: each small device op costs ~3-5 µs of dispatch on a CPU and a kernel
    launch on a GPU. Counted in a warm layer step, outside the optimizer's own step: the norms and
    flags (10 ops: the float64 norms made in the record's row), the clip coefficient
    (``clip.coefficient``: 4 with the norm's own flag) and fraction (``coef < 1``: 1), the row (3, made in the record's row:
    no copy), the clip or ``grad_scale`` (1)."""
    monkeypatch.setattr(gradguard.clip, "_PIN_DEVICE_PATH", True)  # fused: the GPU's grad_scale / found_inf
    assert _guard_ops(fused, warm=3, clip=clip, on_nonfinite=on_nonfinite) <= budget


def _guard_ops(fused: bool, warm: int, **guard_kw: Any) -> int:
    """The device ops of one guarded AdamW step after ``warm`` steps (a layer step), outside the
    optimizer's own step."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused or None, foreach=None if fused else True)
    guard = gradguard.Guard(model, opt, layer_every=1, **guard_kw)
    ops, step = _Ops(), opt.step

    def optimizer_step(*args: Any, **kwargs: Any) -> Any:
        ops.paused = True
        try:
            return step(*args, **kwargs)
        finally:
            ops.paused = False

    opt.step = optimizer_step  # type: ignore[method-assign]
    for i in range(warm):
        guard.step(backward(model, opt, i))
    loss = backward(model, opt, warm)
    with ops:
        guard.step(loss)
    guard.close()
    return ops.count


@pytest.mark.parametrize(("clip", "budget"), [("norm:1", 7), ("auto", 7), ("zclip", 7), ("autoclip:10", 9)])
@pytest.mark.parametrize("fused", [False, True])
def test_on_the_cpu_a_guarded_step_issues_fewer_ops_than_clip_grad_norm(
    clip: str, budget: int, fused: bool
) -> None:
    """On the CPU (not pinned) a step's small numbers are made on the host: its flags, the adaptive
    rules (``auto``, the default, ``zclip``, AutoClip), its threshold and clip coefficient, written
    into its row (``Measurement.host``). A warm layer step past ZClip's warm-up then issues 6 ops
    (AutoClip 8: its lerp) outside the optimizer's own step — the norms, the global norm, ``[loss,
    norm]`` in the row — where ``clip_grad_norm_`` issues 8; before session 16 ``auto`` issued 47,
    before session 17 14 (``norm:1`` 12). A budget of one more: a step whose coefficient is < 1
    scales. Pinned to the device path the counts are those of the budget test above."""
    count = _guard_ops(fused, warm=30, clip=clip)  # past ZClip's warm-up (25): its rule's full row
    assert count <= budget, count


def test_a_cpu_steps_test_on_the_host_writes_the_probe_the_op_makes() -> None:
    """A CPU step's non-finite test on the host (``_Probe.test_on_host``) writes the probe that
    ``base + values·0`` makes (the flags, the clip coefficient's 1e-6-or-NaN) and returns the values;
    pinned to the device path (tests, a compiled region) it returns ``None``."""
    edges = [0.0, -0.0, 2.5, -3.0, 3.4e38, math.inf, -math.inf, math.nan]
    probe = measuring._Probe(torch.device("cpu"))
    for loss in edges:
        for total in edges:
            values = torch.tensor([loss, total])
            got = probe.test_on_host(values)
            assert got is not None and [math.isnan(v) or v for v in got] == [
                math.isnan(v) or v for v in values.tolist()
            ]
            want = torch.addcmul(probe.base, values, probe.zero)
            assert torch.equal(probe.out.isnan(), want.isnan()) and torch.equal(
                probe.out.nan_to_num(), want.nan_to_num()
            )
    with NoSync():  # (it pins the device path)
        assert probe.test_on_host(torch.tensor([1.0, 2.0])) is None


def _meter(params: list[torch.Tensor], p: float = 2.0) -> Meter:
    return Meter(params, p, LayerIndex([f"l{i}.weight" for i in range(len(params))]), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_a_meter_of_one_dtype_measures_as_tensor_norms_without_its_checks(
    dtype: torch.dtype, p: float
) -> None:
    """The Meter's per-step norms (one dtype on a CPU: the checks and grouping made once) are bit for
    bit what :func:`gradguard.stats.tensor_norms` gives; after ``model.half()`` it groups again."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in ((3, 4), (4,), (0,), (7, 2))]
    for w in params:
        w.grad = torch.randn(w.shape, generator=g).to(dtype) * 5
    meter = _meter(params, p)
    grads = [w.grad for w in params]
    assert torch.equal(meter.tensor_norms(grads), tensor_norms(grads, p))  # type: ignore[arg-type]
    other = torch.float64 if dtype != torch.float64 else torch.float32
    assert uniform_norms(params, math.inf) is None and uniform_norms([params[0], params[1].to(other)]) is None
    for w in params:  # the parameters change dtype after the meter was made
        w.data, w.grad = w.data.to(other), w.grad.to(other)  # type: ignore[union-attr]
    grads = [w.grad for w in params]
    assert torch.equal(meter.tensor_norms(grads), tensor_norms(grads, p))  # type: ignore[arg-type]


def test_a_meter_uses_norms_its_caller_computed_only_where_they_are_its_own() -> None:
    """``measure(known=(grads, norms))`` (the script's own clip under ``gradguard run``): the caller's
    norms of the same gradient objects, float32 on the torch path, stand in for the meter's read;
    anything else is ignored and the gradients are read as usual."""
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    for w in params:
        w.grad = torch.randn(w.shape)
    meter, grads = _meter(params), [w.grad for w in params]
    theirs = torch.stack(torch._foreach_norm(grads, 2.0))  # type: ignore[arg-type]
    assert meter.measure(torch.tensor(1.0), known=(grads, theirs)).norms is theirs  # type: ignore[arg-type]
    wrong = torch.tensor([7.0, 7.0])
    for known in (
        ([g.clone() for g in grads], wrong),  # other gradient objects
        (grads[:1], wrong[:1]),  # not all of them
        (grads, wrong.double()),  # not float32
        (grads, wrong[:1]),  # not one norm per gradient
    ):
        m = meter.measure(torch.tensor(1.0), known=known)  # type: ignore[arg-type]
        assert torch.equal(m.norms, theirs)


def test_the_coefficient_takes_the_steps_finiteness_test_and_a_fixed_thresholds_promise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``clip.coefficient`` gets the step's 1e-6-or-NaN (``finite_eps``, made by its one non-finite
    test) where that test is of the very norm it reads (a float32 norm, this rank's flags alone),
    whatever the threshold (a NaN one gives 1 either way); ``nonnegative`` for a fixed ``Norm``
    number's constant and the thresholds ≥ 0 by construction (ZClip's, auto's, AutoClip's); ``out``, the row's ``clip_coef``, where the step's row is made in place. The
    coefficient is the plain one's, bit for bit."""
    import gradguard._guard.clipping as clipping_mod

    seen: list[dict[str, Any]] = []
    real = clipping_mod.coefficient

    def spy(norm: torch.Tensor, threshold: Any, **kw: Any) -> torch.Tensor:
        seen.append(kw)
        return real(norm, threshold, **kw)

    monkeypatch.setattr(clipping_mod, "coefficient", spy)

    def measured(total: torch.Tensor, *, local: bool = True, row: torch.Tensor | None = None) -> Measurement:
        values = torch.stack([torch.tensor(1.0), total.float()])
        if row is not None:
            values = row[:2].copy_(values)
        base = torch.tensor([[0.0, 0.0], [0.0, 1e-6]])
        probe = torch.addcmul(base, values, torch.tensor(0.0)) if local else None
        flags = None if local else torch.isnan(values * 0)
        return Measurement(total.device, [], [], total.reshape(1), total, values, flags, None,
                           torch.isnan(values * 0).any(), row=row, local_flags=local, probe=probe,
                           values_in_row=row is not None)  # fmt: skip

    def check(clipping: Clipping, m: Measurement, finite_eps: bool, nonnegative: bool) -> None:
        plan = clipping.plan(m)
        kw = seen[-1]
        assert (kw["finite_eps"] is not None, kw["nonnegative"]) == (finite_eps, nonnegative)
        assert plan.coef is not None and plan.threshold is not None
        assert torch.equal(plan.coef, real(m.total, plan.threshold))

    fixed = Clipping(Norm(0.5), None, False, [], Constants())
    for total in (2.0, 0.1, math.inf, math.nan):
        check(fixed, measured(torch.tensor(total)), True, True)
    wide = torch.tensor(2.0, dtype=torch.float64)
    check(fixed, measured(wide), False, True)  # flagged after a float32 cast
    check(fixed, measured(torch.tensor(2.0), local=False), False, True)  # holds other ranks' copies too
    spiky = Clipping(Norm(0.5), ZClip(), True, [], Constants())  # a spike threshold may be inf / NaN
    check(spiky, measured(torch.tensor(2.0)), True, False)
    auto = Clipping(from_spec("auto"), None, False, [], Constants())  # ≥ 0 by construction
    check(auto, measured(torch.tensor(2.0)), True, True)
    check(Clipping(None, ZClip(), True, [], Constants()), measured(torch.tensor(2.0)), True, True)

    class Shifted(ZClip):  # a subclass's own threshold promises nothing
        def threshold(self, norm: torch.Tensor) -> torch.Tensor:
            return super().threshold(norm) - 1.0

    check(Clipping(Shifted(), None, False, [], Constants()), measured(torch.tensor(2.0)), True, False)
    m = measured(torch.tensor(2.0), row=torch.zeros(len(record.SCALARS)))
    assert fixed.plan(m).coef is m.column("clip_coef") and seen[-1]["out"] is m.column("clip_coef")
    assert m.row is not None and float(m.row[record.COLUMN["clip_coef"]]) == pytest.approx(0.25)


@pytest.mark.parametrize("pinned", [False, True], ids=["host", "device-path"])
def test_an_adaptive_clipper_learns_nothing_from_a_bad_step_with_finite_gradients(
    pinned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step the guard finds bad reaches the clipper as a NaN norm (``Measurement.observed``), also
    when its gradients are finite (here the loss handed to the step is NaN): ZClip's statistics do not
    move — on the CPU, where the flag is read on the host, as on the device path."""
    monkeypatch.setattr(gradguard.clip, "_PIN_DEVICE_PATH", pinned)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    zclip = ZClip(warmup=3)
    guard = gradguard.Guard(model, opt, clip=zclip, on_nonfinite="skip", locate=False)
    for i in range(5):
        guard.step(backward(model, opt, i))
    before = zclip.state_dict()["stats"]
    backward(model, opt, 5)  # finite gradients
    guard.step(torch.tensor(math.nan))
    assert torch.equal(zclip.state_dict()["stats"], before)
    guard.step(backward(model, opt, 6))  # a good step moves them
    assert not torch.equal(zclip.state_dict()["stats"], before)
    guard.close()


def test_a_users_clipper_that_writes_into_its_norm_changes_nothing_the_guard_measured() -> None:
    """A user's norm clipper gets a norm of its own (gradguard's own rules, which only read it, may get
    the measured total itself on the CPU): writing into it leaves the step's logged norm alone."""

    class Halving(gradguard.clip.NormClipper):
        kind = "halving"

        def threshold(self, norm: torch.Tensor) -> torch.Tensor:
            norm.mul_(0.5)  # (a user's clipper may do anything with what it is handed)
            return torch.tensor(1e9)

    norms = {}
    for clip in (Halving(), None):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = gradguard.Guard(model, opt, clip=clip, locate=False)
        guard.step(backward(model, opt, 0))
        norms[clip is None] = float(guard.last_grad_norm)  # type: ignore[arg-type]
        guard.close()
    assert norms[False] == norms[True]
