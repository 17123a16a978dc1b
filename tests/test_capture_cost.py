"""The per-step capture of ``locate`` (``StepCapture``): what its output-gradient keeper keeps, and
that a healthy step stays cheap (issue 16).

The keeper is ``retain_grad()`` on the root's outputs (a C++ hook) held until the next forward or the
release; the rules it keeps are in ``StepCapture._keep_grads_of``'s docstring and tested here one by
one: one backward, two backwards through one output (the sum), two forwards and one loss (the
gradient that arrives last, as when every output had a Python hook), a finished forward let go
before the next one, the user's tensor left as it was, the zero-code runner's path."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest
import torch
from torch import nn

from gradguard import _inputs
from gradguard.locate import StepCapture


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))


def test_one_forward_one_backward_keeps_the_gradient_and_leaves_the_output_as_it_was() -> None:
    model = _model()
    capture = StepCapture(model)
    out = model(_x())
    (out * 3).sum().backward()
    (grad,) = capture.out_grads
    assert grad is not None and torch.equal(grad, torch.full((5, 3), 3.0))
    capture.end_step()
    capture.release()
    assert capture.out_grads == [] and out.grad is None  # nothing held after the step
    capture.remove()


def test_two_backwards_through_one_output_keep_the_sum() -> None:
    """What the parameters accumulated: the replay's backward reproduces their gradient."""
    model = _model()
    capture = StepCapture(model)
    out = model(_x())
    (out * 2).sum().backward(retain_graph=True)
    (out * 5).sum().backward()
    (grad,) = capture.out_grads
    assert grad is not None and torch.equal(grad, torch.full((5, 3), 7.0))
    capture.remove()


def test_two_forwards_one_loss_keep_the_gradient_that_arrives_last() -> None:
    """The engine runs the later forward's nodes first: the first forward's gradient arrives last
    (what a Python hook on every output kept), even when the script drops that output."""
    model = _model()
    capture = StepCapture(model)
    x = _x()
    loss = (model(x) * 2).sum() + (model(x) * 5).sum()  # the first output is dropped at once
    loss.backward()
    (grad,) = capture.out_grads
    assert grad is not None and torch.equal(grad, torch.full((5, 3), 2.0))
    capture.remove()


def test_a_held_first_output_is_left_as_it_was() -> None:
    model = _model()
    capture = StepCapture(model)
    first, second = model(_x()), model(_x(2))
    ((first * 2).sum() + (second * 5).sum()).backward()
    assert first.grad is None  # its keeper became a Python hook, which set .grad back
    assert torch.equal(capture.out_grads[0], torch.full((5, 3), 2.0))
    capture.remove()


def test_gradient_accumulation_keeps_the_last_forwards_gradient() -> None:
    model = _model()
    capture = StepCapture(model)
    first = model(_x())
    (first * 2).sum().backward()
    second = model(_x(2))
    assert first.grad is None  # let go when the next forward started
    (second * 5).sum().backward()
    assert torch.equal(capture.out_grads[0], torch.full((5, 3), 5.0))
    capture.remove()


def test_a_discarded_forward_then_a_used_one_keep_the_used_ones_gradient() -> None:
    model = _model()
    capture = StepCapture(model)
    model(_x())  # a grad-enabled forward nobody backpropagates
    (model(_x(2)) * 5).sum().backward()
    assert torch.equal(capture.out_grads[0], torch.full((5, 3), 5.0))
    capture.remove()


def test_a_finished_forward_is_not_held_through_the_next() -> None:
    """The graph of a forward whose backward ran is let go before the next forward runs."""
    model = _model()
    capture = StepCapture(model)
    out = model(_x())
    out.sum().backward()
    gone = weakref.ref(out)
    del out
    assert gone() is not None  # held until the next forward (or the release)
    capture.pre(model, (_x(),), {})  # the next forward starts
    gc.collect()
    assert gone() is None
    capture.remove()


def test_the_users_own_retain_grad_before_the_capture_is_left_alone() -> None:
    model = _model()
    model.register_forward_hook(lambda m, a, o: o.retain_grad())  # the user's, before the capture's
    capture = StepCapture(model)
    out = model(_x())
    (out * 4).sum().backward()
    assert torch.equal(capture.out_grads[0], torch.full((5, 3), 4.0))
    capture.release()
    assert out.grad is not None and torch.equal(out.grad, torch.full((5, 3), 4.0))  # still the user's
    capture.remove()


def test_a_retain_grad_the_user_turns_on_after_the_forward_is_the_captures() -> None:
    """The documented limit: it shares the capture's, and is read before the optimizer step."""
    model = _model()
    capture = StepCapture(model)
    out = model(_x())
    out.retain_grad()
    (out * 4).sum().backward()
    assert out.grad is not None and torch.equal(out.grad, torch.full((5, 3), 4.0))
    capture.release()
    assert out.grad is None
    capture.remove()


def test_a_leaf_output_keeps_a_tensor_hook() -> None:
    class Identity(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w

    model = Identity()
    capture = StepCapture(model)
    (model(_x()) * 6).sum().backward()
    assert torch.equal(capture.out_grads[0], torch.full((3,), 6.0))
    capture.remove()


def test_an_output_above_max_output_is_not_kept() -> None:
    model = _model()
    capture = StepCapture(model, max_output=10)
    out = model(_x())
    out.sum().backward()
    assert capture.out_grads == [] and not out.retains_grad
    capture.remove()


def test_the_zero_code_runners_path_keeps_the_gradient_at_the_backward() -> None:
    """``hooks=False``: the runner calls pre / post_with_kwargs / before_backward itself."""
    model = _model()
    capture = StepCapture(model, hooks=False)

    def forward(x: torch.Tensor) -> torch.Tensor:
        capture.pre(model, (x,), {})
        out = model(x)
        capture.post_with_kwargs(model, (x,), {}, out)
        return out

    first, second = forward(_x()), forward(_x(2))
    capture.before_backward()
    ((first * 2).sum() + (second * 5).sum()).backward()
    assert torch.equal(capture.out_grads[0], torch.full((5, 3), 2.0))  # the last to arrive, as before
    capture.release()
    out = forward(_x(3))
    capture.before_backward()
    (out * 3).sum().backward()
    assert torch.equal(capture.out_grads[0], torch.full((5, 3), 3.0))
    capture.release()
    assert out.grad is None
    capture.remove()


def test_a_forward_under_no_grad_keeps_the_last_training_forward() -> None:
    model = _model()
    capture = StepCapture(model)
    out = model(_x())
    (out * 2).sum().backward()
    with torch.no_grad():
        model(_x(2))  # evaluation: not kept, and the training forward's gradient stays
    assert torch.equal(capture.out_grads[0], torch.full((5, 3), 2.0))
    capture.remove()


def test_the_carried_state_note_still_matches_by_storage_and_never_a_freed_tensor() -> None:
    carried = _inputs.CarriedState()
    out = torch.randn(3)
    carried.note([torch.randn(2)], [out], step=0)
    assert carried.origin(out.detach(), step=1) == {"carried": "output", "carried_from_step": 0}
    del out
    gc.collect()
    assert carried.origin(torch.randn(3), step=1) is None


# ----------------------------------------------------------------------------- cost
_COUNT_CALLS = """
import sys, torch
from torch import nn
from gradguard.locate import StepCapture
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
capture = StepCapture(model)
x = torch.randn(5, 4)
def step():
    model(x).sum().backward()
    capture.end_step()
    capture.release()
calls = []
def profile(frame, event, arg):
    if event == "call" and "gradguard" in frame.f_code.co_filename:
        calls.append(frame.f_code.co_name)
step()
sys.setprofile(profile)
step()
sys.setprofile(None)
print(" ".join(calls))
"""


def test_a_healthy_step_calls_few_python_functions_of_the_capture() -> None:
    """One forward, one backward, the optimizer step's end_step and release, the process's only
    capture (a fresh interpreter): the capture's Python work is 10 calls (30 before issue 16's
    work, then 16; the keeper is a C++ hook: none in the backward; no weak-set ``len`` or
    sibling walk for the only capture). A deterministic measure of its cost."""
    done = subprocess.run([sys.executable, "-c", _COUNT_CALLS], capture_output=True, text=True, check=True)
    calls = done.stdout.split()
    assert len(calls) <= 10, calls
    assert "pre" in calls and "release" in calls
    assert not any(name.startswith("_arrive") for name in calls)  # no Python hook in the backward


def test_a_large_output_keeps_its_gradient_by_reference_through_a_node_hook(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above ``RETAIN_MAX`` elements the keeper is a Python pre-hook on the output's node (torch's
    ``retain_grad`` would copy the gradient every step: +2.6 ms on a 7M-element output): the same
    rules (the gradient that arrives last, accumulation, a discarded forward), the output never
    made to retain, its ``.grad`` never read (no non-leaf warning), nothing held after the step."""
    import importlib
    import warnings

    monkeypatch.setattr(importlib.import_module("gradguard.locate"), "RETAIN_MAX", 0)
    model = _model()
    capture = StepCapture(model)
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(x)
        (out * 3).sum().backward()
        assert not out.retains_grad
        assert torch.equal(capture.out_grads[0], torch.full((5, 3), 3.0))
        capture.end_step()
        capture.release()
        assert capture.out_grads == []
        ((model(x) * 2).sum() + (model(x) * 5).sum()).backward()  # two forwards, one loss
        assert torch.equal(capture.out_grads[0], torch.full((5, 3), 2.0))
        capture.release()
        (model(x) * 2).sum().backward()  # accumulation: the last forward's
        (model(_x(2)) * 5).sum().backward()
        assert torch.equal(capture.out_grads[0], torch.full((5, 3), 5.0))
        capture.release()
        model(x)  # a discarded forward, then a used one
        (model(_x(2)) * 4).sum().backward()
        assert torch.equal(capture.out_grads[0], torch.full((5, 3), 4.0))
    capture.remove()
