"""A custom autograd Function whose backward is not linear in its incoming gradient (the chain rule
forgotten): checked once per Function by ``gradguard run`` (:class:`gradguard._backcheck.BackwardCheck`),
named by ``gradguard diagnose`` (``custom_backward``) in a run that did not train — and nothing the
script computes or prints changes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from cli_runs import gradguard_run, plain_run
from gradguard._backcheck import BackwardCheck
from gradguard.diagnose import diagnose, headline
from gradguard.runlog import read_run

HERE = Path(__file__).parent
SCRIPT = HERE / "run_scripts" / "swish_regression.py"


class Right(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)


class NoChainRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 1 - x.tanh() ** 2


class Noisy(torch.autograd.Function):
    """Linear, but prints and draws random numbers in its backward: the check must change neither."""

    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, g):
        print("backward of Noisy")
        return g * 3 + 0 * torch.rand_like(g)


class Recomputes(torch.autograd.Function):
    """A hand-written checkpoint: its backward runs a nested ``backward()`` into the weights."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        with torch.no_grad():
            return x @ weight

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            out = x @ weight
            torch.autograd.backward(out, g)
        return x.grad, None


def _checked(fn: type, *, check: bool) -> tuple[BackwardCheck, list[torch.Tensor]]:
    torch.manual_seed(0)
    weight = torch.randn(5, 5, requires_grad=True)
    x = torch.randn(7, 5, requires_grad=True)
    out = fn.apply(x @ weight, weight) if fn is Recomputes else fn.apply(x @ weight)
    loss = (out**2).sum()
    checker = BackwardCheck()
    if check:
        checker.watch(loss)
    loss.backward()
    return checker, [x.grad, weight.grad, torch.random.get_rng_state()]


@pytest.mark.parametrize("fn", [Right, NoChainRule, Noisy, Recomputes])
def test_the_check_changes_no_gradient_no_rng_state_and_no_output(
    fn: type, capsys: pytest.CaptureFixture[str]
) -> None:
    _, plain = _checked(fn, check=False)
    printed = capsys.readouterr().out
    _, checked = _checked(fn, check=True)
    assert capsys.readouterr().out == printed
    for a, b in zip(plain, checked, strict=True):
        assert torch.equal(a, b)


def test_a_backward_that_forgets_the_chain_rule_is_reported_a_linear_one_is_not() -> None:
    reported = {fn: _checked(fn, check=True)[0].report() for fn in (Right, NoChainRule, Noisy, Recomputes)}
    assert reported[Right] == reported[Noisy] == reported[Recomputes] == []  # (Recomputes: not judged)
    (found,) = reported[NoChainRule]
    assert found["function"] == "NoChainRule.backward" and found["deviation"] == 0.5
    assert found["source"].endswith(f"test_backcheck.py:{NoChainRule.backward.__code__.co_firstlineno + 1}")


def _run(
    tmp_path: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    plain, run = plain_run(tmp_path, SCRIPT, *args), gradguard_run(tmp_path, SCRIPT, *args)
    assert run.returncode == plain.returncode == 0, run.stderr
    assert run.stdout == plain.stdout
    return plain, run


def test_a_regression_whose_swish_forgets_the_chain_rule_is_named_with_its_line(tmp_path: Path) -> None:
    """Before: the loss sat at Var(y) = 1.0 for 192 steps under Adam and diagnose said "No findings"."""
    plain, _ = _run(tmp_path, "--bug", "chain")
    assert float(plain.stdout.split()[-1]) > 0.9  # it did not train
    top = headline(diagnose(tmp_path / "run"))
    assert top is not None and top.id == "custom_backward", top
    assert "SwishFn.backward" in top.message and "not linear" in top.message
    line = next(
        i for i, s in enumerate(SCRIPT.read_text().splitlines(), 1) if "def backward(ctx, grad_output)" in s
    )
    assert f"swish_regression.py:{line}" in top.message
    assert "grad_output" in top.recommendation["text"] and "gradcheck" in top.recommendation["text"]


def test_a_deliberately_clamped_gradient_in_a_run_that_trained_is_noted_not_blamed(tmp_path: Path) -> None:
    plain, _ = _run(tmp_path, "--bug", "none", "--clamp", "1e-3")
    assert float(plain.stdout.split()[-1]) < 0.1  # it trained
    noted = read_run(tmp_path / "run").meta["nonlinear_backward"]
    assert [n["function"] for n in noted] == ["ClampGrad.backward"]
    found = diagnose(tmp_path / "run")
    assert headline(found) is None and "custom_backward" not in {f.id for f in found}, found


class FreesItsCache(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.cache = (x, torch.sigmoid(x))
        return x * ctx.cache[1]

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.cache
        ctx.cache = None  # frees what the forward kept: a second call would fail
        return g * s * (1 + x * (1 - s))


class Counts(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        Counts.calls += 1
        return g


class Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        with torch.enable_grad():
            y = torch.zeros_like(g, requires_grad=True)
            (solved,) = torch.autograd.grad((y * 2 - g).pow(2).sum(), y)
        return g * 2 + 0 * solved


def test_a_backward_with_side_effects_is_never_called_again() -> None:
    """A backward that frees its cache crashed the run (TypeError on the second call); one that counts its
    calls, logs, or solves an adjoint with autograd.grad changed the script's output or crashed it."""
    from gradguard._backcheck import pure

    assert pure(Right) and pure(NoChainRule)
    assert not any(pure(fn) for fn in (FreesItsCache, Counts, Adjoint, Noisy, Recomputes))
    for fn in (FreesItsCache, Counts, Adjoint):
        x = torch.randn(6, requires_grad=True)
        loss = fn.apply(x * 1).sum()
        checker = BackwardCheck()
        checker.watch(loss)
        loss.backward()  # (FreesItsCache: a TypeError if the check had called it first)
        assert checker.report() == []
    assert Counts.calls == 1
