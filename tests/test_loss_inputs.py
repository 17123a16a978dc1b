"""Every input of the loss code, state carried across steps, births inside ``optimizer.step()`` (issue 12).

* the loss-code watch describes the located op's inputs (the fix follows the evidence);
* a non-finite target or label is the data's fault, and the event says which tensor;
* a non-finite model input that the model itself made in an earlier step is carried state;
* a NaN written by the optimizer from finite gradients is reported at that step, with the
  optimizer and the parameters;
* several optimizers on one model: each one's loss code is watched with its own budget.

The fault scripts live in tests/faults/ (their location and verdict are checked by test_locate.py
and test_verdict.py); here: the fields a reader needs from them, and the unit behaviour.
"""

from __future__ import annotations

import contextlib
import math
import runpy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard
from gradguard._guard.births import OptimizerBirths
from gradguard._inputs import CarriedState, entering_role
from gradguard.errors import NonFiniteError
from gradguard.integrations.zerocode import ZeroCode
from gradguard.locate import LossWatch
from gradguard.runlog import read_run
from nosync import NoSync

FAULTS = Path(__file__).parent / "faults"


def _run(script: str, tmp_path: Path) -> list[dict]:
    """Run a fault script under the zero-code runner; its ``nonfinite`` events, in step order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(NonFiniteError), ZeroCode(out=tmp_path / "run", name=script, every=10):
            runpy.run_path(str(FAULTS / f"{script}.py"), run_name="__main__")
    return sorted(read_run(tmp_path / "run").events_of("nonfinite"), key=lambda e: e["step"])


# ----------------------------------------------------------------------------- evidence at loss-code ops
def test_a_loss_code_op_is_described_like_a_replayed_one(tmp_path: Path) -> None:
    first = _run("ce_all_ignored", tmp_path)[0]
    assert first["located_by"] == "watch" and first["op"] == "cross_entropy"
    logits, target = first["evidence"]["inputs"]
    assert logits["nan"] == 0 and target["ignored"] == target["numel"] == 24


def test_a_backward_birth_is_described_by_its_forward_ops_inputs(tmp_path: Path) -> None:
    first = _run("acos_cosine", tmp_path)[0]
    assert first["phase"] == "backward" and first["op"] == "acos"
    assert first["evidence"]["inputs"][0]["unit"] > 0
    assert first["evidence"]["reason"].startswith("acos of ±1")


def _watched(fn) -> dict | None:
    """Run ``fn(made)`` under a loss watch whose model output is ``made``; the watch's answer."""
    made = torch.randn(4, 3, requires_grad=True) * 1.0
    with LossWatch(made=[made]) as watch:
        fn(made)
    return watch.answer()


def test_an_intentional_mask_is_not_data_and_the_fully_masked_softmax_is_the_birth() -> None:
    mask = torch.zeros(4, 3)
    mask[2] = -math.inf  # a row with every key masked, made before the loss code

    found = _watched(lambda scores: torch.softmax(scores + mask, dim=-1).sum().backward())
    assert found is not None and found["op"] == "softmax" and found["phase"] == "loss"


def test_a_nan_target_is_data_and_names_the_tensor() -> None:
    target = torch.randn(4, 3)
    target[1, 1] = math.nan
    found = _watched(lambda out: nn.functional.mse_loss(out, target).backward())
    assert found is not None and found["phase"] == "data" and found["tensor"] == "target"
    assert found["evidence"]["consumer"] == "mse_loss" and found["evidence"]["input"]["nan"] == 1


class _Distance(torch.autograd.Function):
    """A hand-written distance whose backward divides by the distance: 0 / 0 where it is 0."""

    @staticmethod
    def forward(ctx, a, b):
        d = (a - b).pow(2).sum(-1).sqrt()
        ctx.save_for_backward(a, b, d)
        return d

    @staticmethod
    def backward(ctx, g):
        a, b, d = ctx.saved_tensors
        grad = g.unsqueeze(-1) * (a - b) / d.unsqueeze(-1)
        return grad, -grad


def test_a_custom_functions_backward_in_the_loss_code_is_named_by_its_class() -> None:
    found = _watched(lambda out: _Distance.apply(out, out.detach()).mean().backward())
    assert found is not None and (found["phase"], found["op"]) == ("backward", "_Distance.backward")
    assert found["evidence"]["function"] == "_Distance" and found["source"].endswith(
        f"test_loss_inputs.py:{_Distance.backward.__code__.co_firstlineno + 1}"
    )
    assert "saved tensors hold 4 zero(s)" in found["evidence"]["reason"]


def test_the_role_of_a_tensor_entering_the_loss_code() -> None:
    logits, labels, weights = torch.randn(2, 3), torch.rand(2, 3), torch.rand(3)
    assert entering_role("cross_entropy", (logits, labels), {}, labels) == "label"
    assert entering_role("mse_loss", (logits,), {"target": labels}, labels) == "target"
    assert entering_role("mul", (logits, weights), {}, weights) == "loss input"


@pytest.mark.parametrize(("script", "tensor", "consumer"), [("target_nan", "target", "mse_loss"),
                                                            ("soft_label_inf", "label", "cross_entropy")])  # fmt: skip
def test_a_non_finite_target_or_label_is_reported_as_data(
    tmp_path: Path, script: str, tensor: str, consumer: str
) -> None:
    first = _run(script, tmp_path)[0]
    assert (first["phase"], first["tensor"], first["op"]) == ("data", tensor, None)
    assert first["evidence"]["consumer"] == consumer and "forward was finite" not in str(first)


# ----------------------------------------------------------------------------- carried state
def test_a_state_fed_back_from_an_earlier_step_is_carried_state(tmp_path: Path) -> None:
    found = _run("rnn_state_carried", tmp_path)
    assert found[0]["step"] == 3 and found[0]["op"] == "log"
    state = [e for e in found if e.get("tensor") == "state"]
    assert state and state[0]["step"] == 4 and state[0]["phase"] == "data"
    assert state[0]["evidence"]["carried"] == "output" and state[0]["evidence"]["carried_from_step"] == 3


def test_a_memory_bank_written_in_place_between_steps_is_carried_state(tmp_path: Path) -> None:
    first = _run("memory_bank_nan", tmp_path)[0]
    assert (first["step"], first["phase"], first["tensor"]) == (4, "data", "state")
    assert first["evidence"]["carried"] == "buffer" and first["evidence"]["carried_from_step"] == 3
    assert first["evidence"]["consumer"] == "matmul"


def test_carried_state_is_told_by_storage_not_by_address() -> None:
    carried = CarriedState()
    out = torch.randn(64, 64)
    buffer = torch.zeros(8)
    carried.note([buffer], [out], step=0)
    h = out.detach()[:, :4]  # a detached view: the same storage
    assert carried.origin(h, step=1) == {"carried": "output", "carried_from_step": 0}
    del out, h
    fresh = torch.randn(64, 64)  # may reuse the freed block: never the old output
    assert carried.origin(fresh, step=1) is None
    assert carried.origin(buffer, step=1) is None  # the same buffer, unchanged: not carried
    buffer.add_(1.0)  # written in place between steps (a memory bank)
    assert carried.origin(buffer, step=1) == {"carried": "buffer", "carried_from_step": 0}


# ----------------------------------------------------------------------------- births in optimizer.step()
def test_adam_eps_zero_is_reported_at_the_step_that_wrote_the_nan(tmp_path: Path) -> None:
    first = _run("adam_eps_zero", tmp_path)[0]
    assert (first["step"], first["phase"], first["located_by"]) == (0, "optimizer", "check")
    assert first["optimizer"] == "Adam" and first["parameters"] == ["emb.weight"]
    assert first["evidence"]["hyperparameters"]["eps"] == 0.0
    assert "optimizer.step()" in first["evidence"]["reason"]


def test_a_hand_written_optimizer_is_named_and_flagged_custom(tmp_path: Path) -> None:
    first = _run("custom_optimizer_zero_norm", tmp_path)[0]
    assert (first["step"], first["phase"], first["optimizer"]) == (0, "optimizer", "NormalizedSGD")
    assert first["evidence"]["custom_optimizer"] is True
    assert all(".ff." in name for name in first["parameters"])


class _DivideByNorm(torch.optim.SGD):
    """SGD whose step normalises the update: 0 / 0 for a parameter with a zero gradient."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * p.grad / p.grad.norm())


def test_a_guard_reports_an_optimizer_birth_without_a_host_read_on_the_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = _DivideByNorm(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, clip=None, on_nonfinite="warn", log_dir=tmp_path / "g", every=100)
    for step in range(3):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean() * (0.0 if step == 1 else 1.0)  # step 1: zero grads
        loss.backward()
        with NoSync():
            guard.step(loss)  # sync-free ("warn"): the check after the step reads nothing
    guard.close()
    born = [e for e in read_run(tmp_path / "g").events_of("nonfinite") if e.get("located_by") == "check"]
    assert len(born) == 1 and born[0]["step"] == 1 and born[0]["optimizer"] == "_DivideByNorm"
    assert born[0]["parameters"] == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_a_nan_passed_on_from_non_finite_gradients_is_not_an_optimizer_birth() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    births = OptimizerBirths(opt, [("w", p)])
    for step, grad in enumerate([torch.ones(3), torch.full((3,), math.nan)]):
        births.begin(step)
        p.grad = grad
        opt.step()
    records = [{"step": 0, "nonfinite": False}, {"step": 1, "nonfinite": True}]
    assert births.found(records) == []
    births.close()


def test_a_callers_step_checked_after_its_record_was_flushed_still_knows_its_gradients() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    births = OptimizerBirths(opt, [("w", p)])
    births.begin(0)  # before_step: the record of step 0 is flushed before the caller steps
    assert births.found([{"step": 0, "nonfinite": True}]) == []
    p.grad = torch.full((3,), math.nan)
    opt.step()  # the caller's step, with the NaN gradient ("warn" never skips)
    assert births.found([]) == []  # passed on from the gradients: not the optimizer's birth
    births.close()


def _taken_steps(n: int) -> list[dict]:
    return [{"step": s, "nonfinite": False, "skipped": False} for s in range(n)]


def test_the_anomaly_path_check_adds_no_device_op_to_a_healthy_step() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = _DivideByNorm([p], lr=0.1)
    births = OptimizerBirths(opt, [("w", p)], bad_steps_applied=False)
    for step in range(3):
        births.begin(step)
        p.grad = torch.ones(3) if step < 2 else torch.zeros(3)  # step 2: 0 / 0 inside the step
        with NoSync(watch=[p]) as watch:
            opt.step()
        assert watch.reads == [1]  # the optimizer's own update: nothing of the check
    assert births.found(_taken_steps(3)) == []  # the flush reads nothing of the weights either
    born = births.at_bad_step(3, list)  # step 3 is non-finite: the anomaly path reads the weights
    assert [(e["step"], e["optimizer"], e["parameters"]) for e in born] == [(2, "_DivideByNorm", ["w"])]
    births.close()


def test_a_value_the_script_writes_between_steps_is_not_the_optimizers() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    births = OptimizerBirths(opt, [("w", p)], bad_steps_applied=False)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    with torch.no_grad():
        p[0] = math.nan  # the script, between steps
    assert births.at_bad_step(3, lambda: _taken_steps(3)) == []
    births.close()


def test_a_healthy_run_has_no_birth_and_no_data_event(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.GRU(3, 8, batch_first=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    h = None
    with ZeroCode(out=tmp_path / "run", name="healthy", every=5):
        for _ in range(12):
            out, h = model(torch.randn(2, 5, 3), h)
            loss = nn.functional.mse_loss(out, torch.randn(2, 5, 8))
            opt.zero_grad()
            loss.backward()
            opt.step()
            h = h.detach()
    assert read_run(tmp_path / "run").events_of("nonfinite") == []


# ----------------------------------------------------------------------------- several optimizers
def test_the_second_optimizers_loss_code_is_watched(tmp_path: Path) -> None:
    first = _run("actor_critic_zero_std", tmp_path)[0]
    assert (first["op"], first["located_by"], first["evidence"]["reason"]) == (
        "div",
        "watch",
        "division by zero",
    )


@pytest.mark.parametrize("step_of_fault", [3, 40])
def test_a_loss_that_overflowed_before_the_backward_did_is_the_loss_codes(
    step_of_fault: int, tmp_path: Path
) -> None:
    """mse_loss of a finite output overflows to inf; its finite gradient then overflows in the
    model's backward. The first non-finite value is the loss's, not the backward's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gradguard.Guard(model, opt, log_dir=tmp_path / "r", on_nonfinite="skip")
    for step in range(step_of_fault + 1):
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        if step == step_of_fault:
            x = x * 1e21  # out ~1e20: finite; its square is not, nor its gradient times the hidden layer
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
    guard.close()
    (event,) = read_run(tmp_path / "r").events_of("nonfinite")
    assert math.isinf(float(event["loss"])) and event["step"] == step_of_fault
    assert event["phase"] == "loss", event
    assert "in backward: the forward was finite" not in str(event.get("evidence"))


class _WithLoss(nn.Module):
    """A model that takes its labels and returns its loss: Hugging Face's ``labels=``, nanoGPT's ``targets``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> dict:
        y = targets if targets is not None else labels
        return {"loss": nn.functional.mse_loss(self.net(x).squeeze(-1), y)}


@pytest.mark.parametrize("passed", ["labels=", "positional targets"])
def test_a_nan_label_passed_to_the_model_is_named_the_label_by_its_argument(
    passed: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = _WithLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gradguard.Guard(model, opt, log_dir=tmp_path / "r", on_nonfinite="skip")
    for step in range(6):
        x, y = torch.randn(8, 4), torch.randn(8)
        if step == 4:
            y[3] = math.nan
        opt.zero_grad(set_to_none=True)
        loss = model(x, labels=y)["loss"] if passed == "labels=" else model(x, y)["loss"]
        loss.backward()
        guard.step(loss)
    guard.close()
    (event,) = read_run(tmp_path / "r").events_of("nonfinite")
    name = "labels" if passed == "labels=" else "targets"
    assert event["phase"] == "data" and event["step"] == 4
    assert event["tensor"] == ("label" if name == "labels" else "target")
    assert event["evidence"]["argument"] == name and event["evidence"]["input"]["shape"] == [8]
    assert f"the `{name}` passed to the model hold non-finite values" == event["evidence"]["reason"]


def test_a_replayed_forward_names_no_source_line_outside_the_model(tmp_path: Path) -> None:
    """An ``nn.Sequential`` has no line of the user's inside: the replay's caller (here the line of
    ``guard.step``; under Lightning, its hook dispatch) is not where the op ran, so no source."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with torch.no_grad():
        model[1].weight.fill_(1e3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    guard = gradguard.Guard(model, opt, on_nonfinite="skip", log_dir=tmp_path / "r")
    for step in range(4):
        x = torch.randn(8, 4) * (
            1e36 if step == 3 else 1.0
        )  # finite input and hidden; the second linear overflows
        opt.zero_grad(set_to_none=True)
        loss = model(x).pow(2).mean()
        loss.backward()
        guard.step(loss)
    guard.close()
    (event,) = read_run(tmp_path / "r").events_of("nonfinite")
    assert event["phase"] == "forward" and event["op"] == "linear" and event["module"] == "1", event
    assert event["source"] is None


def test_a_loss_code_op_that_keeps_failing_is_located_in_code_and_the_abort_names_its_fix(
    tmp_path: Path,
) -> None:
    """``guard.step(loss)`` cannot replay the loss code: after a step whose model replayed clean, the
    next step runs with the loss code watched, and the recurring ``log(0)`` is named (event and abort)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.ReLU())  # a rate through a ReLU: 0s
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gradguard.Guard(model, opt, log_dir=tmp_path / "r", on_nonfinite="skip", max_consecutive=4)
    with pytest.raises(NonFiniteError) as stopped:
        for _ in range(10):
            x, y = torch.randn(32, 4), torch.poisson(torch.full((32, 1), 2.0))
            rate = model(x)
            loss = (rate - y * torch.log(rate)).mean()  # Poisson NLL by hand: log(0) where the ReLU is 0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            guard.step(loss)
    guard.close()
    located = _located_ops(tmp_path / "r")
    assert located and located[0]["op"] == "log" and located[0]["phase"] == "loss", located
    assert located[0]["located_by"] == "hooks" and located[0]["step"] == 0
    assert located[0]["source"].endswith(f"test_loss_inputs.py:{_line_of('y * torch.log(rate)')}")
    assert "came from `log`" in str(stopped.value) and "Lower the learning rate" not in str(stopped.value)
    assert torch._C._len_torch_function_stack() == 0  # no watch left on the mode stack


def _located_ops(run: Path) -> list[dict]:
    """The ``nonfinite`` events of a run that name an op (located), in file order."""
    return [e for e in read_run(run).events_of("nonfinite") if e.get("op")]


def _line_of(text: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(
        i for i, line in enumerate(lines, 1) if text in line and "def " not in line and "_line_of" not in line
    )


def test_a_gradient_penalty_sqrt_at_zero_is_located_in_code_after_its_nested_backward(tmp_path: Path) -> None:
    """WGAN-GP: the penalty's ``torch.autograd.grad`` runs a backward inside the loss code; the
    penalty's ``sqrt`` of a zero gradient (a critic input that is all masked) then makes the main
    backward NaN. The loss code's ops after that nested backward are watched too."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt = torch.optim.Adam(critic.parameters(), lr=1e-4)
    guard = gradguard.Guard(critic, opt, log_dir=tmp_path / "r", on_nonfinite="skip")
    for step in range(6):
        real, fake = torch.randn(8, 6), torch.randn(8, 6)
        mask = torch.ones(8, 6)
        if step >= 3:
            mask[2] = 0.0  # a sensor offline for the whole sample: its gradient is exactly 0
        alpha = torch.rand(8, 1)
        x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        grads = torch.autograd.grad(critic(x_hat * mask).sum(), x_hat, create_graph=True)[0]
        penalty = ((torch.sqrt(torch.sum(grads**2, dim=1)) - 1) ** 2).mean()
        loss = critic(fake * mask).mean() - critic(real * mask).mean() + 10.0 * penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        guard.step(loss)
    guard.close()
    located = _located_ops(tmp_path / "r")
    assert located and located[0]["op"] == "sqrt" and located[0]["phase"] == "backward", located
    assert located[0]["step"] == 3 and located[0]["source"].endswith(
        f"test_loss_inputs.py:{_line_of('torch.sqrt(torch.sum(grads')}"
    )
