"""Test helper: adaptive clippers (ZClip, auto, AutoClip) in every configuration that changes their
rule's path, and a run's stream of norms and losses to feed them — shared by the checks that hold one
path of a rule to another (host floats, device tensors, the Triton kernel of ``gradguard._rule_kernel``)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch

import gradguard.clip as C

__all__ = ["ADAPTIVE", "assert_same_numbers", "bound", "norms_and_losses", "params_with_grads", "tau_of"]


def params_with_grads(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((4, 3), (3,), (2, 4))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps


#: adaptive norm clippers and the optimizer each is bound to (None: used on its own)
ADAPTIVE: dict[str, tuple[Callable[[], C.NormClipper], Callable[[list], torch.optim.Optimizer] | None]] = {
    "zclip": (lambda: C.ZClip(warmup=5), None),
    "zclip-max_norm": (lambda: C.ZClip(warmup=5, max_norm=1.3), None),
    "auto-sgd": (lambda: C.Auto(**C.Auto.SPEC, warmup=5), lambda ps: torch.optim.SGD(ps, lr=0.3)),
    "auto-sgd-tensor-lr": (
        lambda: C.Auto(**C.Auto.SPEC, warmup=5),
        lambda ps: torch.optim.SGD(ps, lr=torch.tensor(0.3), momentum=0.9),
    ),
    "auto-adamw": (lambda: C.Auto(**C.Auto.SPEC, warmup=5), lambda ps: torch.optim.AdamW(ps)),
    "auto-trust": (
        lambda: C.Auto(**C.Auto.SPEC, trust=0.1, warmup=5),
        lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9),
    ),
    "auto-first": (lambda: C.Auto(first=0.5, warmup=5), lambda ps: torch.optim.SGD(ps, lr=0.3)),
    "auto-unbound": (lambda: C.Auto(**C.Auto.SPEC, warmup=5), None),
    "autoclip": (lambda: C.AutoClip(percentile=10), None),
    "autoclip-window-7": (lambda: C.AutoClip(percentile=35, window=7), None),  # the ring wraps
}


def norms_and_losses(seed: int, n: int = 90) -> list[tuple[float, float]]:
    """A run's norms (log-normal, with spikes, a NaN, an inf, a zero) and losses (one NaN, a zero,
    a negative one)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        norm = math.exp(rng.gauss(0.0, 0.4)) * (25.0 if i % 17 == 16 else 1.0)
        loss = rng.uniform(0.1, 3.0)
        out.append((norm, loss))
    out[7], out[11], out[13] = (math.nan, 1.0), (math.inf, 1.0), (0.0, 1.0)
    out[20], out[21], out[22] = (1.0, math.nan), (1.0, 0.0), (1.0, -0.5)
    return out


def bound(name: str, ps: list[torch.nn.Parameter]) -> C.NormClipper:
    make, optimizer = ADAPTIVE[name]
    clipper = make()
    if optimizer is not None:
        clipper.attach(optimizer(ps))
    return clipper


def tau_of(clipper: C.NormClipper, norm: float, loss: float, *, device_path: bool) -> float:
    C._PIN_DEVICE_PATH = device_path
    try:
        clipper.observe_loss(torch.tensor(loss))
        return float(clipper.threshold(torch.tensor(norm)))
    finally:
        C._PIN_DEVICE_PATH = False


def assert_same_numbers(a: float, b: float) -> None:
    assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=0.0)
