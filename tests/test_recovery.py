"""``on_explosion``: real training runs whose gradient norm explodes while finite, rescued by the guard.

Each run really trains (a too-high learning rate, a warm-up that overshoots, data whose scale runs
away); without the option the same run goes non-finite. Also: the bound (``max_rollbacks``), the
state_dict round trip in the middle of a recovery, the events, the settings, and no added host read.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradguard
import guard_runs
from gradguard import events
from gradguard.errors import GradGuardError
from gradguard.runlog import read_run
from nosync import NoSync


def final_loss(run: Path) -> float:
    losses = [r["loss"] for r in read_run(run).metrics]
    return sum(losses[-20:]) / 20


def nonfinite_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_run(run).metrics if r["nonfinite"]]


# ----------------------------------------------------------------------------- rescued runs
@pytest.mark.parametrize(
    "settings",
    [
        {"lr": 0.3},  # too high from the start: ~15 healthy steps, then the norm climbs to inf at 46
        {"lr": 0.05, "lr_at": {60: 0.4}},  # a warm-up that overshoots: explodes after 60, inf at 83
    ],
    ids=["too_high_lr", "lr_jump"],
)
def test_an_explosion_while_finite_is_rewound_and_the_run_trains_to_the_end(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    plain = guard_runs.train(tmp_path / "plain", locate=False, steps=90, **settings)
    assert nonfinite_steps(plain)  # without the option the run is lost (by step 90)

    run = guard_runs.train(tmp_path / "recover", on_explosion="recover", **settings)
    assert nonfinite_steps(run) == []
    assert final_loss(run) < 1.0  # it trains: the loss starts at 5.5
    log = read_run(run)
    (explosion,) = log.events_of("explosion")
    assert explosion["action"] == "recover" and explosion["recoveries"] == 1
    assert explosion["to_step"] + 1 < explosion["onset_step"] < explosion["step"]  # rewound to before it
    assert explosion["peak_norm"] > 10 * explosion["baseline_norm"]
    # SGD: from the restored state on, auto's bound (no step longer than half the Polyak step)
    assert (explosion["clip"], explosion["polyak"], explosion["max_norm"]) == ("auto", 0.5, None)
    (rollback,) = log.events_of("rollback")
    assert (rollback["step"], rollback["to_step"]) == (explosion["step"], explosion["to_step"])
    rewound = next(r for r in log.metrics if r["step"] == explosion["step"])
    assert rewound["skipped"]  # the step that confirmed it was not taken
    after = [r for r in log.metrics if r["step"] > explosion["step"]]
    assert all(r["clip_coef"] <= 1.0 for r in after)
    assert all(r["threshold"] * r["lr"] * r["grad_norm"] <= 0.5 * r["loss"] * (1 + 1e-5) for r in after)
    assert log.meta["config"]["on_explosion"] == "recover"


def test_the_sync_free_path_recovers_at_the_flush(tmp_path: Path) -> None:
    """``on_nonfinite="warn"`` never reads the device: the onset is seen in the flushed records."""
    x, y = guard_runs.data()
    model = guard_runs.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    guard = gradguard.Guard(
        model, opt, clip=None, on_nonfinite="warn", on_explosion="recover", every=5, log_dir=tmp_path / "r"
    )
    assert guard._sync_free()
    for step in range(120):
        i = (step * 16) % 64
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x[i : i + 16]), y[i : i + 16])
        loss.backward()
        guard.step(loss)
    guard.close()
    log = read_run(tmp_path / "r")
    (explosion,) = log.events_of("explosion")
    assert explosion["step"] % 5 == 4  # the last step of a flush
    assert explosion["to_step"] + 1 < explosion["onset_step"]
    assert final_loss(tmp_path / "r") < 1.0 and all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- a data-driven explosion
def runaway(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A regression batch whose scale runs away from step 20 on (×2 a step): the gradient norm
    climbs whatever the weights, so every recovery is followed by another explosion."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=g) * (2.0 ** max(0, step - 19))
    return x, x.sum(1, keepdim=True)


def train_runaway(guard: gradguard.Guard, model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = runaway(step)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)


def test_on_explosion_warn_logs_the_onset_once_and_changes_nothing(tmp_path: Path) -> None:
    norms = []
    for policy in ("ignore", "warn"):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        guard = gradguard.Guard(
            model, opt, clip=None, on_explosion=policy, log_dir=tmp_path / policy, every=10
        )
        train_runaway(guard, model, opt, range(30))
        guard.close()
        norms.append([r["grad_norm"] for r in read_run(tmp_path / policy).metrics])
    assert norms[0] == norms[1]
    (explosion,) = read_run(tmp_path / "warn").events_of("explosion")
    assert (explosion["action"], explosion["onset_step"], explosion["step"]) == ("warn", 20, 23)
    assert read_run(tmp_path / "warn").events_of("rollback") == []


def test_max_rollbacks_bounds_the_recoveries_and_the_run_stops_restored(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gradguard.Guard(
        model, opt, clip=None, on_explosion="recover", max_rollbacks=2, log_dir=tmp_path / "r", every=10
    )
    with pytest.raises(gradguard.NonFiniteError, match="3 rollbacks within 1000 steps"):
        train_runaway(guard, model, opt, range(100))
    snapshot = guard._recovery.snapshot
    assert snapshot is not None
    assert all(torch.equal(v, snapshot["model"][k]) for k, v in model.state_dict().items())  # restored
    guard.close()
    log = read_run(tmp_path / "r")
    explosions = log.events_of("explosion")
    assert [e["recoveries"] for e in explosions] == [1, 2, 2]
    assert [e["polyak"] for e in explosions] == [0.5, 0.25, 0.25]  # halved by the second; the third stops
    abort = log.first_event("abort")
    assert (
        abort is not None
        and abort["reason"] == events.ABORT_MAX_ROLLBACKS
        and abort["step"] == explosions[-1]["step"]
    )
    assert "explode" in abort["message"] and log.meta["aborted"] is True


def test_a_climb_the_clipper_holds_is_not_an_explosion(tmp_path: Path) -> None:
    """The watch sees the norm the step applied: a clip that holds it (``auto`` on an RNN whose raw
    norm climbs 10× while it learns) is no explosion to rewind."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gradguard.Guard(
        model, opt, clip="norm:0.5", on_explosion="recover", log_dir=tmp_path / "r", every=10
    )
    train_runaway(guard, model, opt, range(30))
    guard.close()
    log = read_run(tmp_path / "r")
    assert max(r["grad_norm"] for r in log.metrics) > 1000 * min(r["grad_norm"] for r in log.metrics)
    assert log.events_of("explosion") == [] and guard._explosions.recoveries == 0


def test_the_recovery_bound_follows_the_learning_rate(tmp_path: Path) -> None:
    """SGD moves the weights by lr × the clipped gradient: after a recovery no step is longer than
    ``polyak`` × the Polyak step loss / ‖g‖, whatever the learning rate does — raised 4× (a warm-up
    still under way) or lowered 40×: the threshold moves with it (a fixed threshold would not)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gradguard.Guard(model, opt, clip=None, on_explosion="recover", log_dir=tmp_path / "r", every=1)
    train_runaway(guard, model, opt, range(26))
    assert guard._explosions.recoveries == 1
    for lr, steps in ((4e-3, range(26, 29)), (1e-4, range(29, 32))):
        for group in opt.param_groups:
            group["lr"] = lr
        train_runaway(guard, model, opt, steps)
    guard.close()
    log = read_run(tmp_path / "r")
    explosions = log.events_of("explosion")
    assert explosions[0]["polyak"] == 0.5 and explosions[0]["max_norm"] is None
    taken = [r for r in log.metrics if r["step"] > explosions[0]["step"] and not r["skipped"]]
    assert {r["lr"] for r in taken} == {1e-3, 4e-3, 1e-4}
    for r in taken:
        polyak = max(e["polyak"] for e in explosions if e["step"] < r["step"])
        assert r["threshold"] * r["lr"] * r["grad_norm"] <= polyak * r["loss"] * (1 + 1e-5)
    low = min(r["threshold"] for r in taken if r["lr"] == 1e-4)
    assert low > 10 * max(r["threshold"] for r in taken if r["lr"] == 4e-3)


def _records(steps: range, norm: float, loss: float, coef: float = math.nan) -> list[dict[str, Any]]:
    return [
        {
            "step": s,
            "grad_norm": norm,
            "clip_coef": coef,
            "loss": loss,
            "nonfinite": False,
            "amp_overflow": False,
        }
        for s in steps
    ]


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("later_loss, relapses", [(3.0, True), (0.5, False), (1.9, False)])
def test_a_loss_that_diverges_after_a_recovery_calls_a_tighter_one(
    later_loss: float, relapses: bool, optimizer: str
) -> None:
    """After a rewind the bound may still let through steps that are too long: the norm stays
    bounded, the loss wanders above where it was rewound to. A window of PROBE steps whose loss rose
    by more than its magnitude is a further recovery (the bound halved); a falling loss is not.
    SGD's bound is auto's Polyak fraction; Adam's a clip at the healthy median norm; SGD with
    momentum gets both (its update is longer than the Polyak cap sees)."""
    from gradguard._guard.explosion import PROBE, TIGHTEN, Explosions
    from gradguard._guard.recovery import Recovery

    model = nn.Linear(2, 1)
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters())
        if optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9 if optimizer == "momentum" else 0.0)
    )
    polyak = None if optimizer == "adam" else 0.5
    cap = None if optimizer == "sgd" else 1.0  # the healthy median (60 steps of norm 1)

    def bound() -> tuple[float | None, float | None]:
        return (None if explosions.bound is None else explosions.bound.polyak), explosions.cap

    recovery = Recovery(
        model,
        opt,
        {},
        every=10,
        lr_backoff=None,
        snapshot_dir=None,
        active=True,
        max_rollbacks=5,
        keep_earlier=True,
    )
    explosions = Explosions("recover", recovery)
    explosions.initial_snapshot(0)
    found = explosions.see_records(_records(range(60), 1.0, 1.0) + _records(range(60, 70), 1e4, 1.0))
    assert found is not None and found.onset == 60
    explosions.respond(found, 69)
    assert bound() == (polyak, cap)
    after = _records(range(70, 73), 5.0, 1.0, coef=0.2) + _records(
        range(73, 70 + PROBE), 5.0, later_loss, coef=0.2
    )
    found = explosions.see_records(after)
    assert (found is not None) == relapses
    if found is not None:
        assert found.onset == 70  # the first step after the rewind
        explosions.respond(found, found.at)
        assert explosions.recoveries == 2
        assert bound() == tuple(None if b is None else b * TIGHTEN for b in (polyak, cap))


def test_the_state_dict_in_the_middle_of_a_recovery_resumes_identically() -> None:
    def make() -> tuple[nn.Module, torch.optim.Optimizer, gradguard.Guard]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        guard = gradguard.Guard(model, opt, clip=None, on_explosion="recover", max_rollbacks=None, every=7)
        return model, opt, guard

    model, opt, guard = make()
    train_runaway(guard, model, opt, range(26))
    assert guard._explosions.recoveries == 1  # the recovery's threshold holds the norm from here on
    state = copy.deepcopy({"guard": guard.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()})
    train_runaway(guard, model, opt, range(26, 90))  # the data's scale overflows: non-finite steps recover
    expected = ([p.detach().clone() for p in model.parameters()], _polyak(guard), guard.skipped_steps)

    model2, opt2, guard2 = make()
    train_runaway(guard2, model2, opt2, range(3))  # a guard that has seen other steps
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    guard2.load_state_dict(_saved_and_loaded(state["guard"]))
    train_runaway(guard2, model2, opt2, range(26, 90))
    assert guard2._explosions.recoveries == guard._explosions.recoveries > 1
    got = ([p.detach().clone() for p in model2.parameters()], _polyak(guard2), guard2.skipped_steps)
    assert got[1:] == expected[1:]
    for a, b in zip(got[0], expected[0], strict=True):
        assert torch.equal(a, b)


def _polyak(guard: gradguard.Guard) -> float:
    bound = guard._explosions.bound
    assert bound is not None and bound.polyak is not None
    return bound.polyak


def _saved_and_loaded(state: dict[str, Any]) -> dict[str, Any]:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded: dict[str, Any] = torch.load(buf, weights_only=True)
    return loaded


# ----------------------------------------------------------------------------- settings, host reads
def test_the_setting_is_checked() -> None:
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        GradGuardError, match="on_explosion must be one of 'ignore', 'warn', 'recover'; got 'rewind'"
    ):
        gradguard.Guard(model, opt, on_explosion="rewind")  # type: ignore[arg-type]
    with pytest.raises(GradGuardError, match="monitor_only=True cannot rewind"):
        gradguard.Guard(model, opt, clip=None, on_nonfinite="warn", monitor_only=True, on_explosion="recover")
    guard = gradguard.Guard(model, opt, on_explosion="warn")
    assert guard.on_explosion == "warn" and guard.state_dict()["explosion"]["cap"] is None
    guard.close()  # (one open guard per optimizer)
    assert gradguard.Guard(model, opt).on_explosion == "ignore"


def _backward_of_step_3(guard: gradguard.Guard, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    train_runaway(guard, model, opt, range(3))  # the initial snapshot and the optimizer state exist
    x, y = runaway(3)
    opt.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()


def test_watching_adds_no_host_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host-decided path: the step's one read brings the norm with the skip flag; sync-free: none."""
    import gradguard.guard as guard_module

    monkeypatch.setattr(
        gradguard.clip, "_PIN_DEVICE_PATH", True
    )  # a device's reads (a CPU also reads the coef)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gradguard.Guard(model, opt, on_explosion="recover", every=1000, weight_every=None)
    _backward_of_step_3(guard, model, opt)
    inner, reads = guard_module.read_step, []
    with NoSync() as ns:

        def named_read(row: torch.Tensor) -> dict[str, float]:
            reads.append(row)
            with ns.allow():
                return inner(row)

        monkeypatch.setattr(guard_module, "read_step", named_read)
        guard.step()
    assert len(reads) == 1  # and no other host read (NoSync raises on any)

    guard.close()  # (one open guard per optimizer)
    free = gradguard.Guard(
        model, opt, on_explosion="recover", on_nonfinite="warn", every=1000, weight_every=None
    )
    _backward_of_step_3(free, model, opt)
    with NoSync():
        free.step()
    assert free._sync_free()


def test_the_recovery_bound_adds_no_host_read() -> None:
    """After a recovery (seen at the flush on the sync-free path) auto's bound runs on the device."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gradguard.Guard(
        model, opt, clip=None, on_explosion="recover", on_nonfinite="warn", every=1000, weight_every=None
    )
    train_runaway(guard, model, opt, range(24))
    guard.flush()
    assert guard._explosions.bound is not None
    x, y = runaway(3)
    opt.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    with NoSync():
        guard.step(nn.functional.mse_loss(model(x), y).detach())


# ----------------------------------------------------------------------------- torch.distributed
@pytest.mark.parametrize("mode", ["ddp", "ddp-warn"])
def test_every_rank_sees_the_same_onset_and_rewinds_alike(tmp_path: Path, mode: str) -> None:
    """Real torchrun (gloo, 2 ranks, each its own half of the batch): the decision rests on the
    all-reduced norms, so both ranks rewind at the same steps and stay bit-identical."""
    from torchrun import torchrun

    worker = Path(__file__).with_name("explosion_worker.py")
    proc = torchrun(str(worker), mode, str(tmp_path), timeout=180, fresh=[tmp_path])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["sync_free"] == (mode == "ddp-warn")
    assert ranks[0]["recoveries"] == ranks[1]["recoveries"] >= 2
    assert ranks[0]["skipped"] == ranks[1]["skipped"]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):  # "warn" applies a non-finite step
        assert all(torch.allclose(x, y, rtol=0, atol=0, equal_nan=True) for x, y in zip(a, b, strict=True))
    explosions = read_run(tmp_path / "run").events_of("explosion")  # rank 0's log
    assert len(explosions) == ranks[0]["recoveries"] and all(e["action"] == "recover" for e in explosions)


def test_a_scheduler_that_undoes_the_lr_backoff_is_said_one_that_keeps_it_is_not() -> None:
    """LambdaLR / OneCycleLR compute the rate from their base rates: the back-off lasted one step, silently."""
    import warnings

    for make, undone in (
        (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0), True),
        (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=100), False),
    ):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        schedule = make(opt)
        guard = gradguard.Guard(model, opt, on_nonfinite="rollback", snapshot_every=1, lr_backoff=0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(8):
                x = torch.randn(8, 4)
                if step == 4:
                    x[0, 0] = float("nan")
                opt.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                guard.step(loss)
                schedule.step()
        said = [w for w in caught if "set the rate back" in str(w.message)]
        assert len(said) == int(undone) and (not said or said[0].filename == __file__), (undone, said)
