"""Replay as faithful as the step (issue 12): autocast and GradScaler, custom autograd Functions,
functional wrappers. The fault scripts of these families (tests/faults/autocast_*, gradscaler_*,
custom_function_*, mha_*) run through ``gradguard run`` in tests/test_locate.py and
tests/test_verdict.py; here are the mechanisms, through the Guard and ``gradguard.locate``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard
from gradguard import _replay
from gradguard.locate import Locator, StepCapture, rng_state
from nosync import NoSync


def guard_events(
    model: nn.Module, opt: torch.optim.Optimizer, **kw: Any
) -> tuple[gradguard.Guard, list[dict]]:
    guard = gradguard.Guard(model, opt, every=100, **kw)
    events: list[dict] = []
    guard._event = events.append  # type: ignore[method-assign]  # keep the events in memory
    return guard, events


def located(events: list[dict]) -> dict:
    found = [e for e in events if e.get("type") == "nonfinite"]
    assert found, events
    return found[0]


# ----------------------------------------------------------------------------- autocast
class Attention(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-2, -1)
        return (scores.softmax(-1) @ self.v(x)).mean((1, 2))


def raw_batch(scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 6, 16, generator=g) * 30 + scale  # a large offset: q·k above 65504 in float16


def test_the_autocast_state_is_read_and_restored_exactly() -> None:
    assert _replay.autocast_state() is None
    with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
        state = _replay.autocast_state()
        with _replay.under(None):  # a replay of a step that ran without autocast, from inside one
            assert not torch.is_autocast_enabled("cpu")
    assert state == (_replay.Autocast("cpu", torch.float16, False),)
    with _replay.under(state):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float16
    assert not torch.is_autocast_enabled("cpu")


def _autocast_guard_run(keep_autocast: bool, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    if not keep_autocast:  # what the replay did before: the forward in float32
        monkeypatch.setattr(_replay, "autocast_state", lambda: None)
    torch.manual_seed(0)
    model = Attention()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard, events = guard_events(model, opt)
    for step in range(4):
        x = raw_batch(250.0) if step == 2 else torch.randn(4, 6, 16)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        guard.step(loss)
    return events


def test_an_fp16_only_overflow_under_autocast_is_replayed_under_autocast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    event = located(_autocast_guard_run(True, monkeypatch))
    assert (event["step"], event["phase"], event["op"], event["kind"], event["located_by"]) == (
        2, "forward", "matmul", "inf", "replay",
    )  # fmt: skip
    precision = event["evidence"]["precision"]
    assert precision["dtype"] == "float16" and precision["dtype_max"] == 65504.0
    assert 65504.0 < precision["float32_absmax"] < math.inf  # finite in float32: the dtype is the fault
    assert precision["autocast"] == [{"device_type": "cpu", "dtype": "float16"}]
    assert (
        "dtype's max" in event["evidence"]["reason"] and "autocast to float16" in event["evidence"]["reason"]
    )


def test_without_the_autocast_state_the_same_step_replays_finite(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: replayed in float32 the forward is finite, and no op is named (the old answer)."""
    event = located(_autocast_guard_run(False, monkeypatch))
    assert event.get("op") is None


def test_under_a_gradscaler_the_replay_backward_starts_from_the_scaled_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    capture = StepCapture(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    loss = out.float().sum()
    scaler.scale(loss).backward()
    assert capture.autocast == (_replay.Autocast("cpu", torch.float16, True),)
    (grad,) = capture.out_grads
    assert grad is not None and torch.all(grad.float() == 2.0**10)  # d(scale · sum)/d out
    capture.remove()


def test_a_scaler_step_whose_float16_forward_overflows_is_located_with_the_dtype_as_cause() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    guard, events = guard_events(model, opt)
    for step in range(4):
        x = torch.randn(8, 16) if step != 2 else torch.randint(30000, 60000, (8, 16)).float()
        with torch.autocast("cpu", dtype=torch.float16):
            pred = model(x)
        loss = F.mse_loss(pred.float(), torch.zeros(8, 1))
        opt.zero_grad()
        scaler.scale(loss).backward()
        guard.step(loss, scaler=scaler)  # steps the optimizer and updates the scaler
    event = located(events)
    assert (event["step"], event["phase"], event["module"], event["op"]) == (2, "forward", "0", "linear")
    assert event["evidence"]["precision"]["dtype"] == "float16"


def test_the_capture_adds_no_host_read_per_step_under_autocast() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    capture = StepCapture(model)
    x = torch.randn(4, 8)
    with NoSync(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            model(x).float().sum().backward()
    assert capture.autocast == (_replay.Autocast("cpu", torch.bfloat16, True),)
    capture.remove()


# ----------------------------------------------------------------------------- custom Functions
class ScaledDistance(torch.autograd.Function):
    """A hand-written distance whose backward divides by the distance it saved (0/0 at a == b)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = a - b
        dist = diff.pow(2).sum(-1).sqrt()
        ctx.save_for_backward(diff, dist)
        return dist

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff, dist = ctx.saved_tensors
        g = grad[:, None] * diff / dist[:, None]
        return g, -g


class ClampGradOK(torch.autograd.Function):
    """A correct straight-through clamp (no false alarm expected)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class NumpyLog(torch.autograd.Function):
    """A forward the torch-level watch cannot see into (numpy): log of 0 is -inf."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        with np.errstate(divide="ignore"):
            return torch.from_numpy(np.log(x.detach().numpy()))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.ste = nn.Identity()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ScaledDistance.apply(ClampGradOK.apply(self.enc(a)), ClampGradOK.apply(self.enc(b)))


def _def_line(fn: Any) -> int:
    return fn.__code__.co_firstlineno + 1  # the line after ``@staticmethod``


def test_a_custom_functions_wrong_backward_is_named_by_its_class() -> None:
    torch.manual_seed(0)
    model = Pair()
    a = torch.randn(3, 4)
    b = torch.cat([a[:1], torch.randn(2, 4)])  # the first pair is identical: distance 0
    with gradguard.locate(model) as loc:
        loss = model(a, b).mean()
        loss.backward()
    event = loc.event
    assert event is not None
    assert (event["phase"], event["module"], event["op"], event["kind"]) == (
        "backward", "", "ScaledDistance.backward", "nan",
    )  # fmt: skip
    assert event["source"].endswith(f"test_replay_fidelity.py:{_def_line(ScaledDistance.backward)}")
    assert event["evidence"]["function"] == "ScaledDistance"
    assert (
        "ScaledDistance's backward" in event["evidence"]["reason"] and "zero" in event["evidence"]["reason"]
    )


def test_a_correct_custom_function_raises_no_alarm() -> None:
    model = Pair()
    with gradguard.locate(model) as loc:
        model(torch.randn(3, 4), torch.randn(3, 4)).mean().backward()
    assert loc.event is None


def test_a_custom_functions_forward_that_the_watch_cannot_see_into_is_named_by_its_class() -> None:
    class Feat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return NumpyLog.apply(x.abs())

    model = nn.Sequential(nn.Linear(3, 3), Feat(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[0].bias[1] = 0.0
    with gradguard.locate(model) as loc:
        model(torch.randn(2, 3)).sum().backward()
    event = loc.event
    assert event is not None
    assert (event["phase"], event["module"], event["op"], event["kind"]) == (
        "forward",
        "1",
        "NumpyLog.forward",
        "-inf",
    )
    assert event["source"].endswith(f":{_def_line(NumpyLog.forward)}")


def test_a_custom_function_in_a_closures_loss_code_is_named_in_the_guards_replay() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard, events = guard_events(model, opt)
    for step in range(3):
        x = torch.randn(5, 4)

        def closure(x: torch.Tensor = x, same: bool = step == 2) -> torch.Tensor:
            opt.zero_grad()
            out = model(x)
            target = out.detach().clone() if same else torch.randn(5, 4)
            loss = ScaledDistance.apply(out, target).mean()
            loss.backward()
            return loss

        guard.step(closure)
    event = located(events)
    assert (event["step"], event["phase"], event["op"], event["located_by"]) == (
        2, "backward", "ScaledDistance.backward", "replay",
    )  # fmt: skip


# ----------------------------------------------------------------------------- functional wrappers
def _mha_model(dropout: float = 0.0) -> nn.Module:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, dropout=dropout, batch_first=True)
            self.out = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
            y, _ = self.mha(x, x, x, key_padding_mask=pad)
            return self.out(y).mean()

    torch.manual_seed(0)
    return M()


def _all_padding() -> tuple[torch.Tensor, torch.Tensor]:
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1] = True  # a sample whose keys are all padding
    return torch.randn(3, 5, 8), pad


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_a_fully_masked_row_inside_mha_is_the_softmax_with_the_masked_row_as_evidence(dropout: float) -> None:
    model = _mha_model(dropout)
    x, pad = _all_padding()
    rng = rng_state()
    birth, _ = Locator(model).replay(lambda: model(x, pad).backward(), rng)
    assert torch.equal(torch.get_rng_state(), rng["cpu"])  # the rerun of the wrapper left no trace
    assert birth is not None
    assert (birth.phase, birth.module, birth.op, birth.kind) == ("forward", "mha", "softmax", "nan")
    assert birth.evidence["inside"] == "multi_head_attention_forward"
    assert birth.evidence["inputs"][0]["rows_all_neginf"] >= 1
    assert "every key masked" in birth.evidence["reason"]


def test_a_wrapper_keeps_the_innermost_op_and_a_loss_keeps_its_own_name() -> None:
    """``poisson_nll_loss`` is a Python wrapper: its overflow is ``exp``; cross-entropy over only
    ignored targets stays ``cross_entropy`` (its inner ``nll_loss`` is the same fault)."""
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.bias.fill_(100.0)
    with gradguard.locate(model) as loc:
        loss = F.poisson_nll_loss(model(torch.zeros(4, 3)), torch.ones(4, 2))
    assert (loc.event["op"], loc.event["evidence"]["inside"], loc.event["kind"]) == (
        "exp",
        "poisson_nll_loss",
        "inf",
    )
    with gradguard.locate(model) as loc:
        loss = F.cross_entropy(model(torch.zeros(4, 3)), torch.full((4,), -100))
    assert not math.isfinite(loss.item()) and loc.event["op"] == "cross_entropy"
    assert loc.event["evidence"]["inner_op"].startswith("nll_loss")


def test_sdpa_gives_a_fully_masked_row_zeros_on_this_torch_and_nothing_is_reported() -> None:
    """torch ≥ 2.5 makes SDPA's fully masked rows 0 (forward and backward): no fault, no alarm."""
    q = torch.randn(2, 2, 4, 8, requires_grad=True)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[0] = False
    holder = nn.Linear(1, 1)
    with gradguard.locate(holder) as loc:
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        out.sum().backward()
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(q.grad).all())
    assert loc.event is None


def test_the_walk_over_an_ops_graph_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_replay, "MAX_NODES", 5)
    x = torch.randn(3, requires_grad=True)
    y = x
    for _ in range(20):
        y = y * 1.0001
    seen: set[int] = set()
    assert len(list(_replay.new_nodes(y.grad_fn, seen, []))) <= 5


def test_the_graph_of_a_tensor_that_entered_the_block_is_not_hooked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only nodes made inside the watch are hooked: an input's own history (another model's output,
    a previous step's graph) is not the model's and is not named after one of its modules."""
    hooked: list[Any] = []
    monkeypatch.setattr(Locator, "_hook_node", lambda self, node, *a: hooked.append(node))
    upstream = torch.randn(2, 4, requires_grad=True) * 3.0
    model = nn.Linear(4, 1)
    with gradguard.locate(model):
        model(upstream).sum()
    assert hooked and all(n is not upstream.grad_fn for n in hooked)


class LogFeatures(torch.autograd.Function):
    """A hand-written log feature map: its forward takes log of 0."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.log(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad / x


def test_an_op_born_inside_a_custom_functions_forward_names_the_op_and_the_function() -> None:
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight[0].zero_()
        model.bias[0] = 0.0
    with gradguard.locate(model) as loc:
        LogFeatures.apply(model(torch.randn(2, 3)).abs()).sum()
    event = loc.event
    assert event is not None and (event["op"], event["kind"]) == ("log", "-inf")
    assert event["evidence"]["function"].endswith("LogFeatures.forward")
    assert "log of 0" in event["evidence"]["reason"] and "LogFeatures.forward" in event["evidence"]["reason"]


def test_a_call_that_writes_into_its_input_is_never_rerun() -> None:
    x = torch.randn(3)
    assert _replay.in_place(F.relu, "relu", (x, True), {}) and _replay.in_place(
        F.dropout, "dropout", (x,), {"inplace": True}
    )
    assert _replay.in_place(torch.Tensor.add_, "add_", (x, x), {}) and not _replay.in_place(
        F.relu, "relu", (x,), {}
    )


def test_the_rerun_of_a_wrapper_never_writes_into_the_steps_tensors() -> None:
    """A wrapper that updates a buffer (``F.batch_norm``'s running statistics) is rerun on copies."""
    running = torch.zeros(3)

    def wrapper(x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        stats.add_(x.mean(0))
        return torch.log(x)

    inner = _replay.innermost_birth(wrapper, (torch.zeros(2, 3), running), {}, None)
    assert inner is not None and inner.op == "log" and bool((running == 0).all())


class Amplify(nn.Module):
    """A block with large activations: under autocast its float16 weight gradients overflow first."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * 1000.0)


def test_a_scaled_gradient_overflow_in_the_models_backward_is_replayed_from_the_scaled_gradient() -> None:
    """The loss was scaled by hand (2**16) but the guard was not given a scaler: the float16 backward
    overflows inside the model; the replay's backward starts from the gradient the step sent into
    the output (scaled), so it overflows at the same node, and the dtype is named as the cause."""
    torch.manual_seed(0)
    model = Amplify()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard, events = guard_events(model, opt)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(torch.randn(4, 8))
    loss = out.float().mean()
    (loss * 2.0**16).backward()
    guard.step(loss)
    event = located(events)
    assert (event["phase"], event["op"]) == ("backward", "linear") and event["kind"] in ("inf", "-inf")
    assert event["located_by"] == "replay" and event["module"] == "b"
    assert "dtype's max (65504)" in event["evidence"]["reason"]


def test_nodes_that_only_move_gradients_are_walked_but_not_hooked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A view, a transpose or a cat cannot make a finite gradient non-finite: the replay spends no
    hook (host reads in the backward) on them, and still walks past them to a custom Function."""
    hooked: list[str] = []
    monkeypatch.setattr(Locator, "_hook_node", lambda self, node, label, *a: hooked.append(label))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = ClampGradOK.apply(self.lin(x)).t().reshape(-1)
            return torch.cat([y, y]).exp()

    model = Model()
    with gradguard.locate(model):
        model(torch.randn(2, 4))
    assert "ClampGradOK.backward" in hooked and "exp" in hooked
    assert not {"t", "reshape", "view", "cat"} & set(hooked), hooked
