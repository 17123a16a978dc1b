"""PyTorch's own clip tests, transcribed against gradguard's functions.

The behaviours torch's test suite checks for ``torch.nn.utils`` (``test_clip_grad_norm``,
``test_clip_grad_value``, their foreach variants, ``test_clip_grad_norm_error_if_nonfinite``,
``test_clip_grad_norm_multi_device``, the decomposed ``get_total_norm`` / ``clip_grads_with_norm_``,
empty parameter lists, generator inputs, norm types 0.5 / 1 / 1.5 / 2 / 4 / inf), written here from
those behaviours. Each torch test body runs against both libraries (the ``lib`` parameter), and
the results of the two are compared on the same input.

The deliberate differences (the README's table "Drop-in parity with torch.nn.utils") are asserted
as differences: what torch does, and what gradguard does instead (section "documented
differences").
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from itertools import product
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

import gradguard
import gradguard.clip as C
from gradguard.errors import GradGuardError, NonFiniteError

TU: ModuleType = torch.nn.utils
LIBS = {"torch": TU, "gradguard": C}
FOREACH = [None, False, True]
NORM_TYPES = [0.5, 1, 1.5, 2, 4, "inf"]  # torch's test: [0.5, 1.5, 2, 4, 'inf']; 1 added
MAX_NORM = 2.0


@pytest.fixture(params=list(LIBS))
def lib(request: pytest.FixtureRequest) -> ModuleType:
    """The library under test: torch.nn.utils or gradguard.clip (same names, same signatures)."""
    return LIBS[request.param]


def is_gradguard(lib: ModuleType) -> bool:
    return lib is C


# ----------------------------------------------------------------------------- helpers (torch's)
def linear(grads: tuple[torch.Tensor, torch.Tensor]) -> nn.Linear:
    """torch's test model: ``nn.Linear(10, 10)`` (of the gradients' dtype) whose weight and bias
    gradients are ``grads``."""
    torch.manual_seed(0)
    layer = nn.Linear(10, 10).to(grads[0].dtype)
    for p, g in zip(layer.parameters(), grads):
        p.grad = g.clone().view_as(p)
    return layer


def large_grads() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(1.0, 101).view(10, 10), torch.ones(10).div(1000)


def small_grads() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(10, 10, generator=g).div(10000), torch.ones(10).div(500)


def compute_norm(layer: nn.Module, norm_type: float | str) -> torch.Tensor:
    """torch's reference: the p-norm of all gradients, element by element."""
    p = float(norm_type)
    if p == math.inf:
        return max(q.grad.abs().max() for q in layer.parameters())
    total = sum(q.grad.abs().pow(p).sum() for q in layer.parameters())
    return torch.as_tensor(total).pow(1.0 / p)


def scale_of(layer: nn.Module, grads: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """torch's ``compare_scaling``: every element was scaled by the same factor; that factor."""
    scale = torch.cat([q.grad.div(g.view_as(q.grad)).view(-1) for q, g in zip(layer.parameters(), grads)])
    torch.testing.assert_close(scale.std(), torch.tensor(0.0), atol=1e-6, rtol=0)
    return scale[0]


def grads_of(params: Any) -> list[torch.Tensor]:
    return [q.grad.clone() for q in params if q.grad is not None]


def param(grad: list[float] | torch.Tensor, dtype: torch.dtype = torch.float32) -> nn.Parameter:
    g = torch.as_tensor(grad, dtype=dtype)
    p = nn.Parameter(torch.ones_like(g))
    p.grad = g.clone()
    return p


def caught_error(call: Callable[[], Any]) -> BaseException:
    with pytest.raises(Exception) as info:
        call()
    return info.value


# ----------------------------------------------------------------------------- torch's test_clip_grad_norm
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_clips_large_gradients_to_max_norm(lib, foreach, norm_type):
    grads = large_grads()
    layer = linear(grads)
    norm_before = compute_norm(layer, norm_type)
    norm = lib.clip_grad_norm_(layer.parameters(), MAX_NORM, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(layer, norm_type)
    torch.testing.assert_close(norm, norm_before)
    torch.testing.assert_close(norm_after, torch.tensor(MAX_NORM))
    assert norm_after <= norm_before
    scale_of(layer, grads)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_leaves_small_gradients_unchanged(lib, foreach, norm_type):
    grads = small_grads()
    layer = linear(grads)
    norm_before = compute_norm(layer, norm_type)
    norm = lib.clip_grad_norm_(layer.parameters(), MAX_NORM, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(layer, norm_type)
    torch.testing.assert_close(norm, norm_before)
    torch.testing.assert_close(norm_before, norm_after)
    assert norm_after <= MAX_NORM
    torch.testing.assert_close(scale_of(layer, grads), torch.tensor(1.0))


@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_grad_norm_accepts_a_single_tensor(lib, foreach):
    g = torch.arange(1.0, 101).view(10, 10)
    p1, p2 = param(g), param(g)
    for norm_type in NORM_TYPES:
        lib.clip_grad_norm_(p1, MAX_NORM, norm_type=norm_type, foreach=foreach)
        lib.clip_grad_norm_([p2], MAX_NORM, norm_type=norm_type, foreach=foreach)
        torch.testing.assert_close(p1.grad, p2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_grad_norm_warns_on_an_exhausted_generator(lib, foreach):
    layer = linear(large_grads())
    params = layer.parameters()
    for _ in params:
        pass
    with pytest.warns(
        UserWarning, match=r"`parameters` is an empty generator, no gradient clipping will occur\."
    ):
        norm = lib.clip_grad_norm_(params, MAX_NORM, foreach=foreach)
    assert float(norm) == 0.0


def test_the_generator_warning_names_the_callers_line_and_starts_with_torchs_text():
    messages = {}
    for name, lib in LIBS.items():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            lib.clip_grad_norm_((q for q in ()), MAX_NORM)
        assert len(w) == 1 and w[0].filename == __file__, (name, w[0].filename)
        messages[name] = str(w[0].message)
    assert messages["gradguard"].startswith(messages["torch"])
    assert "list(model.parameters())" in messages["gradguard"]  # and says how to fix it


def test_a_list_or_a_used_iterator_does_not_warn(lib):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(lib.clip_grad_norm_([], MAX_NORM)) == 0.0
        assert float(lib.clip_grad_norm_(iter([]), MAX_NORM)) == 0.0  # torch: generators only


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_gradguard_and_torch_clip_the_same(foreach, norm_type):
    for grads in (large_grads(), small_grads()):
        ours, theirs = linear(grads), linear(grads)
        got = C.clip_grad_norm_(ours.parameters(), MAX_NORM, norm_type, foreach=foreach)
        want = TU.clip_grad_norm_(theirs.parameters(), MAX_NORM, norm_type, foreach=foreach)
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_a_tensor_max_norm_clips_as_a_float_does(lib, dtype, norm_type):
    grads = tuple(g.to(dtype) for g in large_grads())
    a, b = linear(grads), linear(grads)
    na = lib.clip_grad_norm_(a.parameters(), MAX_NORM, norm_type)
    nb = lib.clip_grad_norm_(b.parameters(), torch.tensor(MAX_NORM), norm_type)
    torch.testing.assert_close(na, nb, rtol=0, atol=0)
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x.grad, y.grad)


# ----------------------------------------------------------------------------- the decomposed API
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_get_total_norm_then_clip_grads_with_norm_is_clip_grad_norm_(lib, foreach, norm_type):
    for grads in (large_grads(), small_grads()):
        whole, parts = linear(grads), linear(grads)
        norm = lib.clip_grad_norm_(whole.parameters(), MAX_NORM, norm_type, foreach=foreach)
        total = lib.get_total_norm([q.grad for q in parts.parameters()], norm_type, foreach=foreach)
        assert lib.clip_grads_with_norm_(parts.parameters(), MAX_NORM, total, foreach=foreach) is None
        torch.testing.assert_close(total, norm, rtol=0, atol=0)
        for a, b in zip(whole.parameters(), parts.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_get_total_norm_matches_torch(foreach, norm_type):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(s, generator=g) * 10 for s in [(3, 4), (5,), (), (2, 2, 2)]]
    want = TU.get_total_norm(tensors, norm_type, foreach=foreach)
    got = C.get_total_norm(tensors, norm_type, foreach=foreach)
    assert got.dtype == want.dtype and got.shape == want.shape == ()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        C.get_total_norm(tensors[0], norm_type), TU.get_total_norm(tensors[0], norm_type)
    )
    gen_got = C.get_total_norm((t for t in tensors), norm_type)  # a generator is read once, no warning
    torch.testing.assert_close(gen_got, got)


@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_grads_with_norm_matches_torch(foreach):
    for total in [0.5, 3.0, 100.0]:
        ours, theirs = linear(large_grads()), linear(large_grads())
        C.clip_grads_with_norm_(ours.parameters(), MAX_NORM, torch.tensor(total), foreach=foreach)
        TU.clip_grads_with_norm_(theirs.parameters(), MAX_NORM, torch.tensor(total), foreach=foreach)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad, b.grad)


def test_clip_grads_with_norm_takes_a_host_number_for_the_norm():
    """torch needs a tensor (its clamp refuses a float); gradguard also takes a number."""
    ours, theirs = linear(large_grads()), linear(large_grads())
    C.clip_grads_with_norm_(ours.parameters(), MAX_NORM, 100.0)
    TU.clip_grads_with_norm_(theirs.parameters(), MAX_NORM, torch.tensor(100.0))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert isinstance(
        caught_error(lambda: TU.clip_grads_with_norm_(theirs.parameters(), 1.0, 100.0)), TypeError
    )


# ----------------------------------------------------------------------------- no_grad
@pytest.mark.parametrize("name", ["clip_grad_norm_", "decomposed", "clip_grad_value_"])
def test_clipping_after_create_graph_is_not_recorded(lib, name):
    w = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on the reference cycle of create_graph
        w.pow(3).sum().backward(create_graph=True)
    assert w.grad is not None and w.grad.requires_grad
    grad_fn = w.grad.grad_fn
    if name == "clip_grad_norm_":
        out = lib.clip_grad_norm_([w], 1.0)
    elif name == "decomposed":
        out = lib.get_total_norm([w.grad])
        lib.clip_grads_with_norm_([w], 1.0, out)
    else:
        out = lib.clip_grad_value_([w], 1.0)
    assert out is None or not out.requires_grad  # the returned norm is not in the graph
    assert w.grad.grad_fn is grad_fn  # the in-place clip was not recorded
    w.grad = None


# ----------------------------------------------------------------------------- torch's test_clip_grad_value
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("with_bias_grad", [True, False])
def test_clip_grad_value(lib, foreach, with_bias_grad):
    clip_value = 2.5
    grad_w = torch.arange(-50.0, 50).view(10, 10).div_(5)
    grad_b = torch.ones(10).mul_(2)
    layer = nn.Linear(10, 10)
    layer.weight.grad = grad_w.clone()
    layer.bias.grad = grad_b.clone() if with_bias_grad else None
    lib.clip_grad_value_(layer.parameters(), clip_value, foreach=foreach)
    for q in filter(lambda q: q.grad is not None, layer.parameters()):
        assert q.grad.max() <= clip_value and q.grad.min() >= -clip_value
    assert layer.bias.grad is not None or not with_bias_grad
    twin = nn.Linear(10, 10)
    twin.weight.grad = grad_w.clone()
    twin.bias.grad = grad_b.clone() if with_bias_grad else None
    other = C if lib is TU else TU
    other.clip_grad_value_(twin.parameters(), clip_value, foreach=foreach)
    for a, b in zip(layer.parameters(), twin.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)  # bit-identical to the other library


@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_grad_value_accepts_a_single_tensor(lib, foreach):
    g = torch.arange(-50.0, 50).view(10, 10).div_(5)
    p1, p2 = param(g), param(g)
    lib.clip_grad_value_(p1, 2.5, foreach=foreach)
    lib.clip_grad_value_([p2], 2.5, foreach=foreach)
    assert torch.equal(p1.grad, p2.grad)


def test_clip_grad_value_of_a_generator_does_not_warn(lib):
    layer = linear(large_grads())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib.clip_grad_value_((q for q in layer.parameters()), 2.5)
    assert float(layer.weight.grad.max()) == 2.5


# ----------------------------------------------------------------------------- torch's error_if_nonfinite test
NORMS_POS = [0.1, 1, 2, 3.5, math.inf]
NORMS_NEG = [-0.1, -1, -2, -3.5]
NORMS_EXCEPT_0 = [*NORMS_POS, *NORMS_NEG]
NORMS_ALL = [*NORMS_EXCEPT_0, 0]
# (grad_only_one_elem, prefix_finite_grad_param, scalars, norms_nonfinite, norms_finite), as torch's test
NONFINITE_CASES = [
    (False, False, [math.inf, -math.inf], NORMS_EXCEPT_0, [0]),
    (False, True, [math.inf, -math.inf], NORMS_POS, [*NORMS_NEG, 0]),
    (True, False, [math.inf, -math.inf], NORMS_POS, [*NORMS_NEG, 0]),
    (True, True, [math.inf, -math.inf], NORMS_POS, [*NORMS_NEG, 0]),
    (False, False, [math.nan], NORMS_EXCEPT_0, [0]),
    (False, True, [math.nan], NORMS_EXCEPT_0, [0]),
    (True, False, [math.nan], NORMS_EXCEPT_0, [0]),
    (True, True, [math.nan], NORMS_EXCEPT_0, [0]),
    (False, False, [2e22, -2e22], [], NORMS_ALL),
    (False, True, [2e22, -2e22], [], NORMS_ALL),
    (True, False, [2e22, -2e22], [], NORMS_ALL),
    (True, True, [2e22, -2e22], [], NORMS_ALL),
    (False, False, [2e200, -2e200], [3.5, 2, -2, -3.5], [math.inf, 1, 0.1, 0, -1, -0.1]),
    (False, True, [2e200, -2e200], [3.5, 2], [*NORMS_NEG, math.inf, 1, 0.1, 0]),
    (True, False, [2e200, -2e200], [3.5, 2], [*NORMS_NEG, math.inf, 1, 0.1, 0]),
    (True, True, [2e200, -2e200], [3.5, 2], [*NORMS_NEG, math.inf, 1, 0.1, 0]),
]


def gen_parameters(
    scalar: float, grad_only_one_elem: bool, prefix_finite_grad_param: bool
) -> list[nn.Parameter]:
    """torch's test parameters: float64, their gradients made by backward."""
    p = nn.Parameter(torch.ones(10, dtype=torch.float64))
    (p[1] if grad_only_one_elem else p).mul(scalar).sum().backward()
    if not prefix_finite_grad_param:
        return [p]
    prefix = nn.Parameter(torch.ones(1, dtype=torch.float64))
    prefix.mul(1).sum().backward()
    return [prefix, p]


def nonfinite_runs() -> list[tuple[float, float, bool, bool, bool]]:
    runs = []
    for one_elem, prefix, scalars, nonfinite, finite in NONFINITE_CASES:
        for norm_type, scalar in product(nonfinite, scalars):
            runs.append((norm_type, scalar, one_elem, prefix, True))
        for norm_type, scalar in product(finite, scalars):
            runs.append((norm_type, scalar, one_elem, prefix, False))
    return runs


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("error_if_nonfinite", [False, True])
def test_clip_grad_norm_error_if_nonfinite(lib, foreach, error_if_nonfinite):
    for norm_type, scalar, one_elem, prefix, nonfinite in nonfinite_runs():
        params = gen_parameters(scalar, one_elem, prefix)
        before = grads_of(params)
        call = functools.partial(
            lib.clip_grad_norm_, params, 1, norm_type, error_if_nonfinite=error_if_nonfinite, foreach=foreach
        )
        where = (norm_type, scalar, one_elem, prefix)
        if is_gradguard(lib) and norm_type <= 0:  # documented: refused, whatever the gradients
            with pytest.raises(GradGuardError, match=rf"norm_type must be > 0 \(or inf\), got {norm_type}"):
                call()
            assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(grads_of(params), before))
            continue
        if nonfinite and error_if_nonfinite:
            with pytest.raises(
                RuntimeError, match=f"The total norm of order {float(norm_type)} for gradients"
            ):
                call()
            after = grads_of(params)
            assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(after, before)), where
        else:
            norm = call()
            assert math.isfinite(float(norm)) != nonfinite, where
            if nonfinite and is_gradguard(lib):  # documented: left untouched, where torch scales
                assert all(
                    torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(grads_of(params), before)
                )


def test_error_if_nonfinite_message_starts_with_torchs_word_for_word():
    for grad, p in [([1.0, math.nan], 2.0), ([math.inf, 1.0], math.inf), ([1.0, -math.inf], 1.0)]:
        theirs = caught_error(functools.partial(TU.clip_grad_norm_, [param(grad)], 1.0, p, True))
        ours = caught_error(functools.partial(C.clip_grad_norm_, [param(grad)], 1.0, p, True))
        total = caught_error(functools.partial(C.get_total_norm, [torch.tensor(grad)], p, True))
        assert type(theirs) is RuntimeError
        assert isinstance(ours, RuntimeError) and isinstance(ours, NonFiniteError)
        assert str(ours).startswith(str(theirs)), (str(ours), str(theirs))
        assert str(total).startswith(str(theirs))
        assert "untouched" in str(ours) and "gradguard.locate" in str(ours)  # gradguard's note after it


# ----------------------------------------------------------------------------- empty input
def test_empty_parameter_lists(lib):
    assert float(lib.clip_grad_norm_([], MAX_NORM)) == 0.0
    assert float(lib.get_total_norm([])) == 0.0
    assert lib.clip_grads_with_norm_([], MAX_NORM, torch.tensor(5.0)) is None
    no_grads = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 2))]
    assert float(lib.clip_grad_norm_(no_grads, MAX_NORM)) == 0.0
    assert all(q.grad is None for q in no_grads)
    assert lib.clip_grad_norm_([], MAX_NORM).dtype == TU.clip_grad_norm_([], MAX_NORM).dtype == torch.float32


# ----------------------------------------------------------------------------- torch's multi-device test
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_clip_grad_norm_multi_device():
    """torch gathers the norms on the first device; gradguard refuses (documented difference)."""

    def two_device_model() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Module()
        m.layer1 = nn.Linear(10, 10).to("cuda:0")
        m.layer2 = nn.Linear(10, 10).to("cuda:1")
        for q in m.parameters():
            q.grad = torch.ones_like(q)
        return m

    theirs = two_device_model()
    ref = [q.grad.cpu() for q in theirs.parameters()]
    norm = TU.clip_grad_norm_(theirs.parameters(), 1.0)
    want = math.sqrt(sum(g.numel() for g in ref))
    assert float(norm) == pytest.approx(want, rel=1e-6)
    ours = two_device_model()
    with pytest.raises(GradGuardError, match=r"several devices.*Call it once per device"):
        C.clip_grad_norm_(ours.parameters(), 1.0)
    assert all(torch.equal(q.grad.cpu(), g) for q, g in zip(ours.parameters(), ref))


# ----------------------------------------------------------------------------- documented differences
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("name", ["clip_grad_norm_", "clip_grads_with_norm_"])
def test_difference_a_nonfinite_norm_leaves_the_gradients_untouched(bad, name):
    grads = [[3.0, bad, 1.0], [2.0, -2.0]]
    ours, theirs = [param(g) for g in grads], [param(g) for g in grads]
    if name == "clip_grad_norm_":
        got, want = C.clip_grad_norm_(ours, 1.0), TU.clip_grad_norm_(theirs, 1.0)
        assert torch.equal(got.isnan(), want.isnan()) and (got.isnan() or got == want)
    else:
        total = torch.tensor(bad)
        C.clip_grads_with_norm_(ours, 1.0, total)
        TU.clip_grads_with_norm_(theirs, 1.0, total)
    t = theirs[1].grad
    assert bool((t == 0).all()) or bool(t.isnan().all())  # torch: zeroed (τ/inf) or NaN-filled
    assert ours[1].grad.tolist() == [2.0, -2.0]  # gradguard: untouched
    assert ours[0].grad[0] == 3.0


def test_difference_float16_and_bfloat16_norms_are_float32():
    h_ours, h_theirs = param([6e4, 6e4], torch.float16), param([6e4, 6e4], torch.float16)
    want = TU.clip_grad_norm_([h_theirs], 1.0)
    got = C.clip_grad_norm_([h_ours], 1.0)
    assert want.dtype == torch.float16 and float(want) == math.inf  # 8.5e4 > 65504
    assert float(h_theirs.grad.abs().max()) == 0.0  # and torch zeroed the gradients
    assert got.dtype == torch.float32 and float(got) == pytest.approx(6e4 * math.sqrt(2), rel=1e-3)
    assert float(h_ours.grad.double().norm()) == pytest.approx(1.0, rel=2e-3)
    b = torch.ones(4, dtype=torch.bfloat16)
    assert TU.get_total_norm([b]).dtype == torch.bfloat16
    assert C.get_total_norm([b]).dtype == torch.float32
    assert (
        C.get_total_norm([b.double(), b]).dtype == TU.get_total_norm([b.double(), b]).dtype == torch.float64
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("foreach", FOREACH)
def test_difference_gradients_whose_squares_overflow_float32_are_measured_and_clipped(dtype, foreach):
    grad = [1e20, 1.0, -3e19]
    ours, theirs = param(grad, dtype), param(grad, dtype)
    want = TU.clip_grad_norm_([theirs], 1.0, foreach=foreach)
    got = C.clip_grad_norm_([ours], 1.0, foreach=foreach)
    exact = float(torch.tensor(grad, dtype=dtype).double().norm())
    assert float(want) == math.inf and float(theirs.grad.abs().max()) == 0.0  # torch: inf, zeroed
    assert float(got) == pytest.approx(exact, rel=1e-6)  # gradguard: the true norm, and clipped
    assert float(ours.grad.double().norm()) == pytest.approx(1.0, rel=1e-2)


def test_difference_the_total_of_many_large_norms_does_not_overflow():
    many = [torch.tensor([1e19, -1e19]) for _ in range(10)]  # each norm finite in float32
    assert float(TU.get_total_norm(many)) == math.inf
    assert float(C.get_total_norm(many)) == pytest.approx(math.sqrt(20) * 1e19, rel=1e-6)


@pytest.mark.parametrize("norm_type", [0, -1, -2.5, -math.inf, math.nan, "foo"])
def test_difference_norm_types_that_are_not_norms_are_refused(norm_type):
    ours = param([3.0, 0.0, 4.0])
    try:  # torch: 0 counts the non-zero elements, p < 0 gives at most the smallest one, NaN fills NaN
        TU.clip_grad_norm_([param([3.0, 0.0, 4.0])], 1.0, norm_type)
        torch_accepts = True
    except ValueError:
        torch_accepts = False  # "foo": a bare ValueError
    assert torch_accepts == (norm_type != "foo")
    with pytest.raises(GradGuardError, match=r"norm_type must be .*got .*Use 2\.0"):
        C.clip_grad_norm_([ours], 1.0, norm_type)
    with pytest.raises(GradGuardError, match="norm_type"):
        C.get_total_norm([ours.grad], norm_type)
    assert ours.grad.tolist() == [3.0, 0.0, 4.0]


def test_norm_types_torch_accepts_as_text_or_bool_are_accepted_too():
    for norm_type in ["inf", "2", True, 1]:
        ours, theirs = param([3.0, 0.0, 4.0]), param([3.0, 0.0, 4.0])
        got = C.clip_grad_norm_([ours], 1.0, norm_type)  # type: ignore[arg-type]
        want = TU.clip_grad_norm_([theirs], 1.0, norm_type)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_difference_negative_or_nan_thresholds_are_refused(bad):
    theirs = param([3.0, -4.0])
    TU.clip_grad_norm_([theirs], bad)  # torch: flips the gradients' sign (-1) or NaN-fills them
    assert bool((theirs.grad * torch.tensor([3.0, -4.0]) <= 0).all()) or bool(theirs.grad.isnan().all())
    ours = param([3.0, -4.0])
    for call, name in [
        (lambda: C.clip_grad_norm_([ours], bad), "max_norm"),
        (lambda: C.clip_grads_with_norm_([ours], bad, torch.tensor(5.0)), "max_norm"),
        (lambda: C.clip_grad_value_([ours], bad), "clip_value"),
    ]:
        with pytest.raises(GradGuardError, match=rf"{name} must be .*got {bad}"):
            call()
    assert ours.grad.tolist() == [3.0, -4.0]


def test_a_threshold_of_zero_keeps_torchs_behaviour_in_the_functions(lib):
    w, v = param([3.0, -4.0]), param([3.0, -4.0])
    lib.clip_grad_norm_([w], 0.0)
    lib.clip_grad_value_([v], 0.0)
    assert w.grad.abs().max() == 0.0 and v.grad.abs().max() == 0.0


def test_difference_complex_gradients_are_refused():
    c = nn.Parameter(torch.ones(2, dtype=torch.complex64))
    c.grad = torch.tensor([3 + 4j, 0j])
    assert float(TU.clip_grad_norm_([c], 1.0)) == 5.0  # torch measures |z|
    c.grad = torch.tensor([3 + 4j, 0j])
    match = r"complex gradient of shape \(2,\) and dtype torch.complex64.*view_as_real"
    with pytest.raises(GradGuardError, match=match):
        C.clip_grad_norm_([c], 1.0)
    with pytest.raises(GradGuardError, match=r"complex tensor of shape \(2,\)"):
        C.get_total_norm([c.grad])
    assert c.grad.tolist() == [3 + 4j, 0j]


def test_difference_sparse_and_integer_input_get_a_clear_error():
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    assert isinstance(caught_error(lambda: TU.clip_grad_norm_(emb.parameters(), 0.1)), NotImplementedError)
    with pytest.raises(GradGuardError, match=r"sparse.*to_dense"):
        C.clip_grad_norm_(emb.parameters(), 0.1)
    assert isinstance(caught_error(lambda: TU.get_total_norm([torch.arange(3)])), RuntimeError)
    with pytest.raises(GradGuardError, match=r"dtype torch.int64.*\.float\(\)"):
        C.get_total_norm([torch.arange(3)])


def test_difference_the_inf_norm_of_an_empty_tensor_is_zero():
    e, w = param(torch.zeros(0)), param([1.0, -5.0])
    assert "infinity norm on an empty tensor" in str(
        caught_error(lambda: TU.clip_grad_norm_([e, w], 1.0, "inf"))
    )
    assert float(C.clip_grad_norm_([e, w], 1.0, "inf")) == 5.0


def test_difference_clip_grad_value_returns_the_pre_clip_max_abs():
    ours, theirs = param([3.0, -7.0, 0.5]), param([3.0, -7.0, 0.5])
    assert TU.clip_grad_value_([theirs], 1.0) is None
    got = C.clip_grad_value_([ours], 1.0)
    assert float(got) == 7.0 and torch.equal(ours.grad, theirs.grad)
    none = [nn.Parameter(torch.ones(2))]
    assert isinstance(caught_error(lambda: TU.clip_grad_value_(none, 1.0)), RuntimeError)  # torch: no grads
    assert float(C.clip_grad_value_(none, 1.0)) == 0.0


def test_difference_foreach_true_on_meta_runs():
    w = nn.Parameter(torch.ones(2, device="meta"))
    w.grad = torch.ones(2, device="meta")
    err = caught_error(lambda: TU.clip_grad_norm_([w], 1.0, foreach=True))
    assert "foreach=True was passed, but can't use the foreach API on meta tensors" in str(err)
    assert C.clip_grad_norm_([w], 1.0, foreach=True).device.type == "meta"


def test_the_functions_are_public_and_take_torchs_signatures():
    import inspect

    for name in ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_"]:
        ours, theirs = inspect.signature(getattr(C, name)), inspect.signature(getattr(TU, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        for p in ours.parameters.values():
            assert p.default == theirs.parameters[p.name].default, (name, p.name)
    assert gradguard.clip_grad_norm_ is C.clip_grad_norm_
