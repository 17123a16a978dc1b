"""Real run directories for the diagnose, report and CLI tests: tiny models trained under the Guard.

Every run here really happens (a too-high learning rate that really diverges, a threshold that
really clips every step, a batch that really holds a NaN); nothing is a hand-written log.
Each function trains for about a second on a CPU and returns the run directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard

STEPS = 200


def data(seed: int = 0, n: int = 64, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    return x, x @ w + 0.1 * torch.randn(n, 1, generator=g)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def deep_sigmoid(seed: int = 0, depth: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(8, 32), nn.Sigmoid()]
    for _ in range(depth - 2):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    layers.append(nn.Linear(32, 1))
    return nn.Sequential(*layers)


def train(
    path: Path,
    *,
    lr: float = 0.05,
    clip: Any = "none",
    steps: int = STEPS,
    model: nn.Module | None = None,
    lr_at: dict[int, float] | None = None,
    nan_at: int | None = None,
    log_zero_from: int | None = None,
    **guard_kw: Any,
) -> Path:
    """SGD on a small regression problem under ``gradguard.Guard`` (on_nonfinite="skip").

    Args:
        lr_at: ``{step: lr}`` learning-rate changes (a warm-up that overshoots).
        nan_at: the input batch of this step holds a NaN (bad data).
        log_zero_from: from this step on, the loss adds ``log`` of a value that is exactly 0 on
            one sample (an op at its numerical edge, every step).
    """
    x, y = data()
    model = model if model is not None else mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    kw: dict[str, Any] = {"every": 10, "weight_every": 5, "max_consecutive": 10**6, **guard_kw}
    guard = gradguard.Guard(model, opt, clip=clip, on_nonfinite="skip", log_dir=path, **kw)
    for step in range(steps):
        if lr_at and step in lr_at:
            for group in opt.param_groups:
                group["lr"] = lr_at[step]
        i = (step * 16) % 64
        xb, yb = x[i : i + 16].clone(), y[i : i + 16]
        if nan_at is not None and step == nan_at:
            xb[3, 2] = math.nan
        out = model(xb)
        loss = nn.functional.mse_loss(out, yb)
        if log_zero_from is not None and step >= log_zero_from:
            loss = loss + 1e-3 * torch.log(out[0, 0].abs() * 0.0)  # log(0) = -inf, its gradient NaN
        opt.zero_grad(set_to_none=True)
        loss.backward()
        guard.step(loss)
    guard.close()
    return path


def healthy(path: Path) -> Path:
    """SGD lr 0.05: the loss falls from 5.5 to 0.05, the norm settles near 0.5."""
    return train(path, lr=0.05)


def too_high_lr(path: Path) -> Path:
    """SGD lr 0.3: about 15 healthy steps, then the norm climbs to float32's limit and goes inf."""
    return train(path, lr=0.3)


def lr_jump(path: Path) -> Path:
    """lr 0.05 for 60 steps, then 0.4 (a warm-up that overshoots): explodes a few steps later."""
    return train(path, lr=0.05, lr_at={60: 0.4})


def over_clipped(path: Path, max_norm: float = 0.01) -> Path:
    """``clip="norm:0.01"``: every step is clipped, the loss barely moves."""
    return train(path, lr=0.05, clip=f"norm:{max_norm}")


def nan_in_data(path: Path) -> Path:
    """A NaN in the input batch of step 100 of an otherwise healthy run."""
    return train(path, lr=0.05, nan_at=100)


def finite_divergence(path: Path) -> Path:
    """A linear model at lr 1.2 with ``clip="zclip"``: the loss climbs to ~1e20 and stays finite.

    (ZClip follows a steady climb with its EMA. ``"auto"`` caps τ at half the first norm and keeps
    this run bounded, so it no longer makes this example.)
    """
    torch.manual_seed(0)
    return train(path, lr=1.2, clip="zclip", model=nn.Linear(8, 1))


def vanishing(path: Path) -> Path:
    """A 10-layer sigmoid MLP: the gradient shrinks ~10× per layer toward the input."""
    return train(path, lr=0.1, model=deep_sigmoid(), steps=100)


def log_of_zero(path: Path) -> Path:
    """From step 30 on, the loss takes ``log(0)`` on one sample: every step is non-finite."""
    return train(path, lr=0.05, log_zero_from=30, steps=60)


def loss_scale_collapse(path: Path) -> Path:
    """A GradScaler whose scaled gradients overflow for 12 steps in a row (what fp16 does)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    guard = gradguard.Guard(model, opt, log_dir=path, every=4, max_consecutive=10)
    for step in range(16):
        g = torch.Generator().manual_seed(500 + step)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).pow(2).mean()
        scaler.scale(loss).backward()
        if 2 <= step < 14:
            with torch.no_grad():
                model[2].weight.grad[0, 1] = math.inf
        guard.step(loss, scaler=scaler)
    guard.close()
    return path
