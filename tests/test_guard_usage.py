"""Slips of a loop adopting ``guard.step(loss)``, said once at the user's line (``_guard/usage``): the loop's
own ``optimizer.step()`` kept (every step taken twice, a skipped NaN step applied anyway), ``guard.step``
called twice on one loss; and a ``scaler`` that is not a GradScaler refused with the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradguard import Guard
from gradguard.errors import GradGuardError
from gradguard.tune import tune


def _setup(opt: type = torch.optim.Adam) -> tuple[nn.Module, torch.optim.Optimizer, Guard]:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = opt(model.parameters(), lr=1e-2)
    return model, optimizer, Guard(model, optimizer, log_dir=None)


def _slips(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [
        w for w in caught if "outside guard.step()" in str(w.message) or "already stepped" in str(w.message)
    ]


def test_the_loops_own_optimizer_step_kept_is_said_once_at_its_line() -> None:
    model, optimizer, guard = _setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(6):
            optimizer.zero_grad()
            x = torch.randn(8, 4)
            if i == 3:
                x[0, 0] = float("nan")  # skipped by the guard, applied by the kept step
            loss = model(x).pow(2).mean()
            loss.backward()
            guard.step(loss)
            optimizer.step()  # the line the user forgot to remove
    (slip,) = _slips(caught)
    assert "Adam.step() was called outside guard.step()" in str(slip.message)
    assert slip.filename == __file__ and "a step the guard skipped is applied anyway" in str(slip.message)
    assert not torch.isfinite(model.weight).all()  # what it warns of: the NaN step reached the weights


def test_guard_step_twice_on_one_loss_is_said_once() -> None:
    model, optimizer, guard = _setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            optimizer.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            guard.step(loss)
            guard.step(loss)
    (slip,) = _slips(caught)
    assert "called again on the loss it already stepped" in str(slip.message) and slip.filename == __file__


def test_ordinary_loops_are_not_warned() -> None:
    """Accumulation (a step every 4 batches), an LBFGS closure, the in-memory tune's own steps."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, optimizer, guard = _setup()
        for i in range(8):
            loss = model(torch.randn(8, 4)).pow(2).mean() / 4
            loss.backward()
            if i % 4 == 3:
                guard.step(loss)
                optimizer.zero_grad()
        batches = [torch.randn(8, 4) for _ in range(4)]
        guard.tune(lambda x: model(x).pow(2).mean(), batches, steps=4)
        tune(model, optimizer, lambda x: model(x).pow(2).mean(), batches, steps=4)  # (the guard open)
        model, optimizer, guard = _setup(torch.optim.LBFGS)
        x = torch.randn(8, 4)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            return loss

        for _ in range(3):
            guard.step(closure)
    assert _slips(caught) == []


def test_monitor_only_whose_loop_steps_the_optimizer_is_not_warned() -> None:
    """``monitor_only=True``: guard.step measures, the loop steps (documented); it read "called outside"."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = Guard(model, optimizer, monitor_only=True, clip=None, on_nonfinite="warn", log_dir=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            optimizer.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            guard.step(loss)
            optimizer.step()  # the caller steps
    assert _slips(caught) == []


@pytest.mark.parametrize("bad", ["yes", True, 2.0**16])
def test_a_scaler_that_is_not_a_grad_scaler_is_refused_with_the_fix(bad: object) -> None:
    model, _, guard = _setup()
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    with pytest.raises(GradGuardError, match=r"scaler must be the torch\.amp\.GradScaler"):
        guard.step(loss, scaler=bad)  # type: ignore[arg-type]
