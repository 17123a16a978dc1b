"""torch.compile under the Guard (CPU): a compiled model, a compiled training step and a compiled
optimizer step train as their eager twins do; the guard adds no graph break to the user's compiled
region; a NaN step of a compiled model is still located (the replay runs eagerly, under
``torch.compiler.set_stance("force_eager")``: it instruments the model with hooks and a dispatch
mode, which a compiled forward would trace).

Most tests compile with ``backend="aot_eager"``: Dynamo captures the same graphs (and breaks) as with
the default inductor backend, and AOTAutograd traces the backward, without inductor's C++ code
generation (seconds instead of a minute on a CPU). One slow test runs the default backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import gradguard

BACKEND = "aot_eager"
STEPS = 4


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Any:
    """Each test compiles from scratch (no graph, guard or counter left by another test)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(step: int, bad: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    if step == bad:
        x[0, 0] = math.nan  # a bad input batch: the data is non-finite
    return x, y


def graph_breaks() -> int:
    """Graph breaks Dynamo met since the last reset (each a split of a compiled region)."""
    return sum(counters["graph_break"].values())


class Run:
    """A model, its optimizer and (``guarded``) a Guard, trained for a few steps in one of the ways
    users compile: ``"eager"``, ``"model"`` (the guard guards ``torch.compile(model)``), ``"inner"``
    (the guard guards the model, the forward goes through ``torch.compile(model)``), ``"step"`` (a
    compiled function runs forward, loss and backward), ``"optimizer"`` (``opt.step =
    torch.compile(opt.step)``)."""

    def __init__(
        self, how: str, *, guarded: bool = True, fused: bool = False, backend: str = BACKEND
    ) -> None:
        self.model = make_model()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2, fused=fused or None)
        forward: nn.Module = (
            torch.compile(self.model, backend=backend) if how in ("model", "inner") else self.model
        )
        root = forward if how == "model" else self.model
        if how == "optimizer":
            self.opt.step = torch.compile(self.opt.step, backend=backend)  # type: ignore[method-assign]
        self.records: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.guard = gradguard.Guard(root, self.opt, clip="norm:1", every=1) if guarded else None
        if self.guard is not None:
            self.guard.add_flush_callback(self.records.extend)
            self.guard._event = self.events.append  # type: ignore[method-assign]  # the events, in memory

        def loss_and_backward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
            return loss

        self.train: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
            torch.compile(loss_and_backward, backend=backend) if how == "step" else loss_and_backward
        )

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.train(x, y)
        if self.guard is not None:
            self.guard.step(loss)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()

    def fit(self, steps: int = STEPS, bad: int | None = None) -> Run:
        for i in range(steps):
            self.step(*batch(i, bad))
        if self.guard is not None:
            self.guard.close()
        return self

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def breaks_of(how: str, *, guarded: bool, fused: bool = False) -> int:
    torch._dynamo.reset()
    counters.clear()
    Run(how, guarded=guarded, fused=fused).fit()
    return graph_breaks()


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- same training
@pytest.mark.parametrize("how", ["model", "inner", "step", "optimizer"])
def test_a_compiled_model_step_or_optimizer_trains_under_the_guard_as_the_eager_one(how: str) -> None:
    eager = Run("eager").fit()
    compiled = Run(how).fit()
    assert compiled.guard is not None and compiled.guard.step_count == STEPS
    assert_close(compiled.params(), eager.params())
    for got, want in zip(compiled.records, eager.records, strict=True):
        assert got["step"] == want["step"] and got["skipped"] is False
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach-host-decided", "fused-found-inf"])
def test_a_compiled_optimizer_step_skips_a_nan_step_as_the_eager_one(fused: bool) -> None:
    """The guard steps the optimizer through ``opt.step`` (compiled here); a fused optimizer reads the
    clip and the skip from ``grad_scale`` / ``found_inf`` inside the compiled step."""
    eager = Run("eager", fused=fused).fit(bad=2)
    compiled = Run("optimizer", fused=fused).fit(bad=2)
    assert [r["skipped"] for r in compiled.records] == [False, False, True, False]
    assert [r["skipped"] for r in eager.records] == [False, False, True, False]
    assert_close(compiled.params(), eager.params())


# ----------------------------------------------------------------------------- no graph break added
@pytest.mark.parametrize("how", ["model", "optimizer"])
def test_the_guard_adds_no_graph_break_to_the_users_compiled_region(how: str) -> None:
    assert breaks_of(how, guarded=True) == breaks_of(how, guarded=False)


def test_the_guard_adds_no_graph_break_to_a_compiled_fused_optimizer_step() -> None:
    assert breaks_of("optimizer", guarded=True, fused=True) == breaks_of(
        "optimizer", guarded=False, fused=True
    )


@pytest.mark.parametrize("how", ["inner", "step"])
def test_the_guards_capture_adds_no_graph_break_inside_a_compiled_forward(how: str) -> None:
    """The capture's hooks, traced into the user's compiled forward, return at once (a host RNG read
    there would split the graph); the guard still trains and skips as the eager one does."""
    assert breaks_of(how, guarded=True) == breaks_of(how, guarded=False)


# ----------------------------------------------------------------------------- locate
def test_a_nan_step_of_a_compiled_model_is_skipped_and_located_by_an_eager_replay() -> None:
    run = Run("model").fit(steps=STEPS + 1, bad=2)
    assert [r["skipped"] for r in run.records] == [False, False, True, False, False]
    nonfinite = [e for e in run.events if e["type"] == "nonfinite"]
    assert len(nonfinite) == 1
    event = nonfinite[0]
    assert (event["step"], event["phase"], event["tensor"], event["kind"]) == (2, "data", "input", "nan")
    assert event["located_by"] == "replay"
    # the replay left the compiler as it found it: the next steps ran compiled, without a new graph break
    assert graph_breaks() == 0


@pytest.mark.parametrize("how", ["step", "optimizer"])
def test_a_nan_step_of_a_compiled_training_or_optimizer_step_is_skipped_and_reported(how: str) -> None:
    run = Run(how).fit(steps=STEPS + 1, bad=2)
    assert [r["skipped"] for r in run.records] == [False, False, True, False, False]
    nonfinite = [e for e in run.events if e["type"] == "nonfinite"]
    assert [e["step"] for e in nonfinite] == [2]
    assert nonfinite[0]["phase"] == "data"


@pytest.mark.slow
def test_the_default_inductor_backend_trains_and_locates_a_nan_step() -> None:
    """The compiled code inductor generates (C++ on a CPU), not only the captured graphs."""
    eager = Run("eager").fit(steps=STEPS + 1, bad=2)
    compiled = Run("model", backend="inductor").fit(steps=STEPS + 1, bad=2)
    assert [r["skipped"] for r in compiled.records] == [False, False, True, False, False]
    assert_close(compiled.params(), eager.params())
    event = next(e for e in compiled.events if e["type"] == "nonfinite")
    assert (event["phase"], event["located_by"]) == ("data", "replay")


# ----------------------------------------------------------------------------- a clipper in a compiled step
CLIPPERS: dict[str, Callable[[], gradguard.clip.Clipper]] = {
    "norm": lambda: gradguard.clip.from_spec("norm:1"),
    "value": lambda: gradguard.clip.from_spec("value:0.1"),
    "agc": lambda: gradguard.clip.from_spec("agc:0.01"),
    "autoclip": lambda: gradguard.clip.from_spec("autoclip:10"),
    "zclip": lambda: gradguard.clip.ZClip(warmup=5),
    "auto": lambda: gradguard.clip.Auto(**gradguard.clip.Auto.SPEC, warmup=5),
    "auto-trust": lambda: gradguard.clip.Auto(**gradguard.clip.Auto.SPEC, warmup=5, trust=0.1),
}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("name", list(CLIPPERS))
def test_every_clipper_compiles_whole_in_a_users_step_and_clips_as_in_eager(
    name: str, tensor_lr: bool
) -> None:
    """A clipper called inside the user's ``torch.compile(..., fullgraph=True)`` step traces with no
    graph break (on the CPU the adaptive rules run on host floats in eager code; traced, on tensors)
    and trains as the eager step does: SGD with momentum and a float or a tensor learning rate (the
    Polyak and trust caps read it), a spike every 11 steps."""

    def train(compiled: bool) -> list[torch.Tensor]:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.05) if tensor_lr else 0.05, momentum=0.9)
        clipper = CLIPPERS[name]()
        clipper.attach(opt)

        def clip(loss: torch.Tensor) -> torch.Tensor:
            clipper.observe_loss(loss)
            return clipper.clip_(list(model.parameters()))

        step = torch.compile(clip, backend=BACKEND, fullgraph=True) if compiled else clip
        for i in range(24):
            x, y = batch(i)
            opt.zero_grad()
            loss = F.cross_entropy(model(x * (30.0 if i % 11 == 10 else 1.0)), y)
            loss.backward()
            step(loss.detach())
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    assert_close(train(True), train(False))
    assert graph_breaks() == 0
