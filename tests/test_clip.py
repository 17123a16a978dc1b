"""Tests of gradguard.clip: oracles (torch, the papers' rules in plain Python), invariants, faults,
no host sync, state round trips and bad input."""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard
import gradguard.clip as C
from adaptive_cases import ADAPTIVE, assert_same_numbers, bound, norms_and_losses, params_with_grads, tau_of
from gradguard.errors import GradGuardError, NonFiniteError
from nosync import HostSyncError, NoSync

NORM_TYPES = [2.0, 1.0, math.inf, 0.5, 3.0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# gradguard vs torch after clipping: torch computes the float16/bfloat16 coefficient in that dtype
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
NORM_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FAST = settings(max_examples=30, deadline=None)

shapes = st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=1, max_size=5)


# ----------------------------------------------------------------------------- helpers
def make_params(shape_list, dtype=torch.float32, seed=0, scale=1.0, none_every=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, s in enumerate(shape_list):
        p = torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device))
        if not (none_every and i % none_every == 0):
            p.grad = (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
        params.append(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        if p.grad is not None:
            q.grad = p.grad.clone()
        out.append(q)
    return out


def grads(params):
    return [p.grad for p in params if p.grad is not None]


def ref_total(gs, p=2.0) -> float:
    """Exact global p-norm in float64 (empty tensors contribute 0)."""
    norms = [float(torch.linalg.vector_norm(g.double(), p)) for g in gs if g.numel() > 0]
    return float(torch.linalg.vector_norm(torch.tensor(norms, dtype=torch.float64), p)) if norms else 0.0


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical values, NaN included."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.isnan(), b.isnan())
        and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    )


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def set_global_norm(params, target: float, step: int, bad: float | None = None) -> None:
    """Fresh random gradients (a function of `step` only) scaled to a global 2-norm `target`;
    `bad` (nan / inf / -inf) goes into one element of the second tensor."""
    g = torch.Generator().manual_seed(1000 + step)
    raw = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    n = math.sqrt(sum(float(r.square().sum()) for r in raw))
    for p, r in zip(params, raw):
        p.grad = (r * (target / n)).to(p.dtype)
    if bad is not None:
        params[1].grad.view(-1)[0] = bad


def norm_sequence(
    n=100, seed=0, spikes=(30, 31, 55, 80, 81, 82), growth_from: int | None = None
) -> list[float]:
    rng = random.Random(seed)
    seq = [math.exp(rng.gauss(0.0, 0.3)) for _ in range(n)]
    for s in spikes:
        if s < n:
            seq[s] *= 50.0
    if growth_from is not None:
        seq = [v * 1.08 ** max(0, i - growth_from) for i, v in enumerate(seq)]
    return seq


def drive(clipper, params, seq, bad_at: dict[int, float] | None = None):
    """Run `clipper` over steps with given global norms; return (returned norm, post-clip norm) per step."""
    out = []
    for i, target in enumerate(seq):
        set_global_norm(params, target, i, (bad_at or {}).get(i))
        ret = clipper(params)
        out.append((float(ret), ref_total(grads(params))))
    return out


def coef(norm: float, tau: float) -> float:
    if not math.isfinite(norm) or math.isnan(tau):
        return 1.0
    return min(1.0, tau / (norm + 1e-6))


# ----------------------------------------------------------------------------- plain-Python references
class RefAutoClip:
    """Seetharaman et al. 2020: τ_t = p-th percentile (numpy linear) of the past finite norms, current included."""

    def __init__(self, percentile, window=None):
        self.p, self.window, self.hist = percentile, window, []

    def tau(self, g):
        if math.isfinite(g):
            self.hist.append(g)
        h = self.hist if self.window is None else self.hist[-self.window :]
        return float(np.percentile(h, self.p)) if h else math.nan


class RefZClip:
    """bluorion-com/ZClip zclip.py (mode="zscore", clip_option="adaptive_scaling"), non-finite norms skipped."""

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-6, max_norm=None):
        self.alpha, self.z_thresh, self.warmup, self.eps, self.max_norm = (
            alpha,
            z_thresh,
            warmup,
            eps,
            max_norm,
        )
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var = 0.0

    def tau(self, g):
        t = math.inf
        if not math.isfinite(g):
            pass
        elif self.mean is None:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
        else:
            std = self.var**0.5
            z = (g - self.mean) / (std + self.eps)
            clip_val = None
            if z > self.z_thresh:
                eta = z / self.z_thresh
                clip_val = self.mean + (self.z_thresh * std) / eta
            eff = clip_val if clip_val is not None else g
            self.mean = self.alpha * self.mean + (1 - self.alpha) * eff
            self.var = self.alpha * self.var + (1 - self.alpha) * (eff - self.mean) ** 2
            t = clip_val if clip_val is not None else math.inf
        return min(t, self.max_norm) if self.max_norm is not None else t


class RefAuto(RefZClip):
    """ZClip, with τ capped at growth × the mean of the warm-up norms once the warm-up is done."""

    def __init__(self, growth=10.0, **kw):
        super().__init__(**kw)
        self.growth, self.anchor = growth, None

    def tau(self, g):
        t = super().tau(g)
        if self.anchor is None and self.mean is not None:
            self.anchor = self.mean
        return min(t, self.growth * self.anchor) if self.anchor is not None else t


def ref_agc(params, lam=0.01, eps=1e-3, exclude=()):
    """Brock et al. 2021, unit by unit in float64; returns the clipped gradients."""
    out = []
    for p in params:
        if p.grad is None:
            out.append(None)
            continue
        g = p.grad.detach().double().clone()
        if any(p is e for e in exclude):
            out.append(g)
            continue
        w = p.detach().double()
        units = [(w, g)] if g.ndim <= 1 else [(w[i], g[i]) for i in range(g.shape[0])]
        for wu, gu in units:
            wn = max(float(wu.norm()), eps)
            gn = float(gu.norm())
            if math.isfinite(gn) and gn > lam * wn:
                gu.mul_(lam * wn / max(gn, 1e-6))
        out.append(g)
    return out


# ----------------------------------------------------------------------------- 1. torch oracles
@FAST
@given(
    shape_list=shapes,
    dtype=st.sampled_from(DTYPES),
    p=st.sampled_from(NORM_TYPES),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 1.0, 20.0]),
    frac=st.sampled_from([0.0, 0.1, 0.5, 0.999, 2.0, math.inf]),
    none_every=st.sampled_from([0, 2]),
    form=st.sampled_from(["list", "generator", "single", "tensor_max_norm"]),
    foreach=st.sampled_from([None, False]),
)
def test_clip_grad_norm_matches_torch(shape_list, dtype, p, seed, scale, frac, none_every, form, foreach):
    ours = make_params(shape_list, dtype, seed, scale, 0 if form == "single" else none_every)
    if form == "single":
        ours = ours[:1]
    theirs = clone_params(ours)
    total = ref_total(grads(ours), p)
    max_norm = frac * total if math.isfinite(frac) else math.inf

    def args(ps):
        if form == "generator":
            return (q for q in ps)
        if form == "single":
            return ps[0]
        return ps

    mn = torch.tensor(max_norm) if form == "tensor_max_norm" else max_norm
    # torch refuses the inf norm of an empty tensor, which holds nothing to clip
    nonempty = [q for q in theirs if q.grad is None or q.grad.numel() > 0]
    want = torch.nn.utils.clip_grad_norm_(nonempty, mn, p, foreach=foreach)
    got = gradguard.clip_grad_norm_(args(ours), mn, p, foreach=foreach)
    assert got.dtype == (torch.float64 if dtype == torch.float64 and grads(ours) else torch.float32)
    if not math.isfinite(float(want)):
        return  # torch overflowed (float16): covered by the fault tests
    assert float(got) == pytest.approx(float(want), rel=NORM_RTOL[dtype], abs=1e-6)
    for a, b in zip(ours, theirs):
        if a.grad is None:
            assert b.grad is None
            continue
        torch.testing.assert_close(a.grad, b.grad, rtol=GRAD_RTOL[dtype], atol=1e-6 * max(1.0, total))


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_tensor_max_norm_any_one_element_shape(shape):
    ps = make_params([[3, 4], [], [5]], seed=1, scale=10.0)
    theirs = clone_params(ps)
    got = gradguard.clip_grad_norm_(ps, torch.full(shape, 0.5))
    want = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for a, b in zip(ps, theirs):
        torch.testing.assert_close(a.grad, b.grad)
    n = C.Norm(torch.tensor([0.5]))
    n(theirs)
    assert ref_total(grads(theirs)) == pytest.approx(0.5, rel=1e-5)


@FAST
@given(
    shape_list=shapes,
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    value=st.sampled_from([0.0, 0.01, 0.5, 2.0, math.inf]),
    none_every=st.sampled_from([0, 2]),
    foreach=st.sampled_from([None, False]),
)
def test_clip_grad_value_matches_torch(shape_list, dtype, seed, value, none_every, foreach):
    ours = make_params(shape_list, dtype, seed, 1.0, none_every)
    theirs = clone_params(ours)
    want_max = max((float(g.abs().max()) for g in grads(ours) if g.numel()), default=0.0)
    if grads(theirs):  # torch raises on an empty list of gradients
        torch.nn.utils.clip_grad_value_(theirs, value, foreach=foreach)
    got = gradguard.clip_grad_value_(ours, value, foreach=foreach)
    assert float(got) == want_max
    for a, b in zip(ours, theirs):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)


def test_clip_grad_value_single_tensor_and_empty():
    w = torch.nn.Parameter(torch.zeros(3))
    assert float(gradguard.clip_grad_value_(w, 1.0)) == 0.0  # no gradient
    w.grad = torch.tensor([-3.0, 0.5, 2.0])
    assert float(gradguard.clip_grad_value_(w, 1.0)) == 3.0
    assert w.grad.tolist() == [-1.0, 0.5, 1.0]
    e = torch.nn.Parameter(torch.zeros(0))
    e.grad = torch.zeros(0)
    assert float(gradguard.clip_grad_value_([e, w], 1.0)) == 1.0


def test_clip_grad_norm_no_grads_returns_zero():
    ps = make_params([[2, 3]], none_every=1)
    assert float(gradguard.clip_grad_norm_(ps, 1.0)) == 0.0
    assert float(gradguard.clip_grad_norm_([], 1.0)) == 0.0
    assert float(torch.nn.utils.clip_grad_norm_([], 1.0)) == 0.0


def test_error_if_nonfinite():
    ps = make_params([[3], [2, 2]])
    gradguard.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)  # finite: no error
    ps[1].grad[0, 1] = math.nan
    before = [g.clone() for g in grads(ps)]
    with pytest.raises(NonFiniteError, match=r"nan.*error_if_nonfinite=False.*gradguard\.locate"):
        gradguard.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    assert all(same(a, b) for a, b in zip(grads(ps), before))
    with pytest.raises(HostSyncError), NoSync():  # the opt-in check is a documented sync
        gradguard.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)


# ----------------------------------------------------------------------------- 2. AGC
class AGCNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.conv = torch.nn.Conv2d(4, 5, 3)
        self.lin = torch.nn.Linear(5, 6)
        self.fc = torch.nn.Linear(6, 3)
        self.scale = torch.nn.Parameter(torch.ones(()))


def agc_net(seed=0, zero_weight=False):
    torch.manual_seed(seed)
    net = AGCNet()
    if zero_weight:
        torch.nn.init.zeros_(net.lin.weight)
    g = torch.Generator().manual_seed(seed + 1)
    for p in net.parameters():
        # unit scales spread over 4 decades, so some units clip and some do not
        unit = torch.logspace(-5, -1, p.shape[0] if p.ndim else 1, dtype=torch.float64)
        unit = unit[torch.randperm(unit.numel(), generator=g)]
        s = unit.reshape(-1, *([1] * (p.ndim - 1))) if p.ndim else unit[0]
        p.grad = (
            torch.randn(p.shape, generator=g, dtype=torch.float64) * s * p.detach().abs().mean()
        ).float()
        if zero_weight and p is net.lin.weight:
            p.grad = torch.randn(p.shape, generator=g) * 1e-4
    return net


@pytest.mark.parametrize("lam", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("zero_weight", [False, True])
@pytest.mark.parametrize("exclude", ["none", "fc"])
def test_agc_matches_paper_loop(lam, zero_weight, exclude):
    net = agc_net(zero_weight=zero_weight)
    params = list(net.parameters())
    ex = list(net.fc.parameters()) if exclude == "fc" else []
    want = ref_agc(params, lam, 1e-3, ex)
    pre = ref_total(grads(params))
    got = gradguard.clip_grad_agc_(net.parameters(), lam, exclude=ex)
    assert float(got) == pytest.approx(pre, rel=1e-5)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad.double(), w, rtol=2e-6, atol=1e-12)
    for p in ex:
        assert same(p.grad, next(w for q, w in zip(params, want) if q is p).float())
    # the data exercise both branches: some units clipped, some untouched (λ = 1: none clipped)
    before = agc_net(zero_weight=zero_weight)
    ratios = [
        (p.grad.double() / q.grad.double()).nan_to_num(nan=1.0)
        for p, q in zip(params, before.parameters())
        if p.ndim >= 2
    ]
    flat = torch.cat([r.flatten() for r in ratios])
    if lam < 1:
        assert (flat < 1 - 1e-6).any() and (flat == 1).any()
    else:
        assert (flat == 1).all()


def test_agc_zero_weight_floor_is_lambda_eps():
    lin = torch.nn.Linear(4, 3, bias=False)
    torch.nn.init.zeros_(lin.weight)
    lin.weight.grad = torch.ones(3, 4)
    gradguard.clip_grad_agc_([lin.weight], 0.01, eps=1e-3)
    assert lin.weight.grad.norm(dim=1).tolist() == pytest.approx([1e-5] * 3, rel=1e-4)


def test_agc_clipper_named_exclude_and_tensor_exclude():
    a, b = agc_net(), agc_net()
    want = ref_agc(list(a.parameters()), 0.01, 1e-3, list(a.fc.parameters()))
    C.AGC(exclude=["fc"])(a.named_parameters())
    C.AGC(exclude=list(b.fc.parameters()))(b.parameters())
    for p, q, w in zip(a.parameters(), b.parameters(), want):
        torch.testing.assert_close(p.grad.double(), w, rtol=2e-6, atol=1e-12)
        assert same(p.grad, q.grad)
    c = agc_net()
    C.AGC(exclude=["f"])(c.named_parameters())  # a prefix is a module name, not a string prefix
    assert not same(c.fc.weight.grad, agc_net().fc.weight.grad)


# (rtol, atol) against the float64 loop; float16's atol is one subnormal step
AGC_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 1e-12),
    torch.float16: (2e-3, 6e-8),
    torch.bfloat16: (1.6e-2, 1e-12),
}
AGC_SHAPES = [(6, 5), (4, 3, 2, 2), (7,), (), (0,), (0, 3), (3, 0), (2, 0, 4), (1, 9), (5, 1, 1, 3, 2)]


def agc_mixed_params(dtypes: str, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    kinds = [torch.float32] if dtypes == "f32" else list(AGC_TOL)
    params = []
    for i, shape in enumerate(AGC_SHAPES * 2):
        dt = kinds[i % len(kinds)]
        p = torch.nn.Parameter((torch.randn(shape, generator=g, dtype=torch.float64) * 0.5).to(dt))
        units = max(shape[0], 1) if len(shape) >= 2 else 1
        # unit scales over four decades: some units are clipped, some are not
        s = torch.logspace(-5, -1, units, dtype=torch.float64)[torch.randperm(units, generator=g)]
        s = s.reshape(-1, *([1] * (len(shape) - 1))) if len(shape) >= 2 else s[0]
        p.grad = (torch.randn(shape, generator=g, dtype=torch.float64) * s * 10).to(dt)
        params.append(p)
    params[3].grad = None  # no gradient
    with torch.no_grad():
        params[10].zero_()  # a zero weight: the λ·eps floor
    return params


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtypes", ["f32", "mixed"])
@pytest.mark.parametrize("seed", [0, 1])
def test_agc_batched_matches_plain_loop_over_dtypes_ranks_and_empties(dtypes, seed, foreach, monkeypatch):
    """The grouped coefficients (one concatenation per dtype, one foreach multiply) against the paper's
    loop, unit by unit, in one call: ranks 0–5, empty tensors, float16/bfloat16/float32/float64, a
    missing gradient, excluded tensors, a zero weight and a non-finite unit. `foreach=False`: the
    per-tensor path of devices without foreach kernels."""
    if not foreach:
        monkeypatch.setattr(C, "_FOREACH_DEVICES", frozenset())
    params = agc_mixed_params(dtypes, seed)
    excluded = [params[5], params[16]]
    pre = ref_total(grads(params))
    before = [None if p.grad is None else p.grad.clone() for p in params]
    want = ref_agc(params, 0.01, 1e-3, excluded)
    got = gradguard.clip_grad_agc_(params, 0.01, 1e-3, exclude=excluded)
    assert got.dtype == torch.float32 and got.shape == ()
    assert float(got) == pytest.approx(pre, rel=1e-5)
    n_clipped = n_kept = 0
    for p, w, b in zip(params, want, before):
        if w is None:
            assert p.grad is None
            continue
        rtol, atol = AGC_TOL[p.dtype]
        torch.testing.assert_close(p.grad.double(), w.to(p.dtype).double(), rtol=rtol, atol=atol)
        units = [(p.grad, b)] if p.ndim <= 1 else list(zip(p.grad, b))
        for u, ub in units:
            if ub.numel():
                n_kept += same(u, ub)
                n_clipped += not same(u, ub)
    assert n_clipped > 5 and n_kept > 5
    for p, b in zip(excluded, (before[5], before[16])):
        assert same(p.grad, b)
    # a non-finite unit: left untouched, the other units of its tensor clipped as usual, the norm NaN
    params = agc_mixed_params(dtypes, seed)
    params[11].grad[1, 0, 0, 1] = math.nan
    want = ref_agc(params, 0.01, 1e-3)
    bad_before = params[11].grad.clone()
    assert math.isnan(float(gradguard.clip_grad_agc_(params, 0.01, 1e-3)))
    assert same(params[11].grad[1], bad_before[1])
    for p, w in zip(params, want):
        if w is not None:
            rtol, atol = AGC_TOL[p.dtype]
            torch.testing.assert_close(
                p.grad.double(), w.to(p.dtype).double(), rtol=rtol, atol=atol, equal_nan=True
            )


def test_agc_empty_and_all_excluded():
    assert float(gradguard.clip_grad_agc_([])) == 0.0
    ps = make_params([[0], [0, 4]])
    assert float(gradguard.clip_grad_agc_(ps)) == 0.0
    ps = make_params([[3, 4], [5]], scale=100.0)
    before = [g.clone() for g in grads(ps)]
    got = gradguard.clip_grad_agc_(ps, exclude=ps)
    assert float(got) == pytest.approx(ref_total(before), rel=1e-6)
    assert all(same(a, b) for a, b in zip(grads(ps), before))


# ----------------------------------------------------------------------------- 3. adaptive clippers
def check_against(clipper, ref_tau: Callable[[float], float], seq, bad_at=None, params=None):
    params = params if params is not None else list(small_model().parameters())
    res = drive(clipper, params, seq, bad_at)
    n_clipped = 0
    for i, ((ret, post), g) in enumerate(zip(res, seq)):
        bad = (bad_at or {}).get(i)
        tau = ref_tau(bad if bad is not None else g)
        if bad is not None:
            assert not math.isfinite(ret)
            continue
        assert ret == pytest.approx(g, rel=1e-5)
        want = g * coef(g, tau)
        assert post == pytest.approx(want, rel=2e-5), (i, g, tau, post)
        n_clipped += int(want < g * (1 - 1e-5))
    return n_clipped


@pytest.mark.parametrize("percentile", [10.0, 50.0, 90.0, 100.0])
@pytest.mark.parametrize("window", [1000, 7])
def test_autoclip_matches_percentile_rule(percentile, window):
    ref = RefAutoClip(percentile, window)
    n = check_against(C.AutoClip(percentile, window=window), ref.tau, norm_sequence())
    if percentile < 100:
        assert n > 0


@pytest.mark.parametrize("z_thresh", [2.5, 1.5])
@pytest.mark.parametrize("warmup", [25, 1, 5])
def test_zclip_matches_reference_package(z_thresh, warmup):
    ref = RefZClip(z_thresh=z_thresh, warmup=warmup)
    n = check_against(C.ZClip(z_thresh=z_thresh, warmup=warmup), ref.tau, norm_sequence())
    assert n >= 3  # the spikes


def test_zclip_options_match_reference():
    ref = RefZClip(alpha=0.9, z_thresh=2.0, warmup=10, eps=1e-3, max_norm=3.0)
    clipper = C.ZClip(alpha=0.9, z_thresh=2.0, warmup=10, eps=1e-3, max_norm=3.0)
    check_against(clipper, ref.tau, norm_sequence(growth_from=50))
    assert float(clipper.mean) == pytest.approx(ref.mean, rel=1e-6)
    assert float(clipper.std) == pytest.approx(ref.var**0.5, rel=1e-5)


def test_zclip_constant_warmup_norms():
    ref = RefZClip(warmup=5)
    seq = [1.0] * 10 + [1.5, 1.0, 1.0, 20.0, 1.0]
    assert check_against(C.ZClip(warmup=5), ref.tau, seq) >= 2


def norm_stream(n: int, seed: int, bad_at: dict[int, float]) -> list[float]:
    """Log-normal norms with ties (repeats), an 8x spike every 9th step and non-finite values at `bad_at`."""
    rng = random.Random(seed)
    out: list[float] = []
    for i in range(n):
        v = out[-1] if out and i % 11 == 5 and math.isfinite(out[-1]) else math.exp(rng.gauss(0.0, 0.4))
        out.append(bad_at.get(i, v * (8.0 if i % 9 == 4 else 1.0)))
    return out


@pytest.mark.parametrize("window", [1, 2, 7, 64])
@pytest.mark.parametrize("percentile", [0.5, 10.0, 37.5, 50.0, 99.9, 100.0])
def test_autoclip_threshold_is_the_percentile_of_the_window(percentile, window):
    """threshold() step by step, from count 0 through count < window to many wrap-arounds, with non-finite
    steps (the first one before any finite norm): numpy's linear percentile of the finite norms in the
    window, and bit for bit torch.nanquantile of that window (the former implementation)."""
    bad_at = {0: math.nan, 3: math.inf, window: -math.inf, window + 1: math.nan, 2 * window + 3: math.inf}
    seq = norm_stream(3 * window + 25, window, bad_at)
    clipper = C.AutoClip(percentile, window=window)
    hist: list[float] = []
    for i, v in enumerate(seq):
        norm = torch.tensor(v, dtype=torch.float64 if i % 3 == 0 else torch.float32)
        tau = clipper.threshold(norm)
        assert tau.shape == () and tau.dtype == torch.float32
        if math.isfinite(v):
            hist.append(float(torch.tensor(v, dtype=torch.float32)))
        h = hist[-window:]
        if not h:
            assert math.isnan(float(tau))
            continue
        assert float(tau) == pytest.approx(float(np.percentile(h, percentile)), rel=1e-6), i
        window_now = torch.full((window,), math.nan)
        window_now[: len(h)] = torch.tensor(h)
        assert same(tau, torch.nanquantile(window_now, percentile / 100.0)), i
    assert int(clipper.state_dict()["count"]) == len(hist)


def test_autoclip_float64_norm_beyond_float32_is_non_finite():
    clipper = C.AutoClip(50.0, window=3)
    clipper.threshold(torch.tensor(2.0))
    tau = clipper.threshold(torch.tensor(1e39, dtype=torch.float64))  # inf in the float32 history: skipped
    assert float(tau) == 2.0 and int(clipper.state_dict()["count"]) == 1


def test_autoclip_load_refuses_a_history_of_another_window():
    state = C.AutoClip(window=5).state_dict()
    state["window"] = 6
    with pytest.raises(GradGuardError, match=r"history has shape \(5,\), expected \(6,\).*same window"):
        C.AutoClip().load_state_dict(state)


@pytest.mark.parametrize("warmup", [1, 2, 25])
def test_zclip_and_auto_thresholds_match_reference_step_by_step(warmup):
    """threshold() and the statistics after every step, through the warm-up (non-finite norms in it, on its
    last step and after it), spikes and ties, against the plain-Python rules."""
    bad_at = {1: math.nan, warmup - 1: math.inf, warmup + 2: -math.inf, warmup + 9: math.nan, 60: math.inf}
    seq = norm_stream(90, warmup, bad_at)
    z, ref = C.ZClip(warmup=warmup), RefZClip(warmup=warmup)
    a, ref_a = C.Auto(warmup=warmup, growth=3.0), RefAuto(warmup=warmup, growth=3.0)
    finite_taus = {"z": 0, "a": 0}
    for i, v in enumerate(seq):
        for name, clipper, r in (("z", z, ref), ("a", a, ref_a)):
            x = torch.tensor(v, dtype=torch.float64 if i % 2 else torch.float32)
            tau, want = float(clipper.threshold(x)), r.tau(float(x))  # the reference sees the same value
            if math.isinf(want):
                assert tau == want, (name, i, v)
            else:
                assert tau == pytest.approx(want, rel=1e-6), (name, i, v)
                finite_taus[name] += 1
            if r.mean is not None:
                assert float(clipper.mean) == pytest.approx(r.mean, rel=1e-12)
                assert float(clipper.std) == pytest.approx(r.var**0.5, rel=1e-9, abs=1e-12)
    assert finite_taus["z"] >= 2  # spikes were clipped
    # Auto's cap is finite from the step that ends the warm-up on, non-finite steps included
    end = next(i for i in range(len(seq)) if sum(map(math.isfinite, seq[: i + 1])) == warmup)
    assert finite_taus["a"] == len(seq) - end


def test_zclip_loads_a_hand_written_state():
    """The state_dict format: [μ, σ², count] in float64; a count above the warm-up is "after the warm-up",
    a negative variance reads as 0."""
    state = {"version": 1, "alpha": 0.9, "z_thresh": 2.0, "warmup": 3, "eps": 1e-6, "max_norm": None}
    ref = RefZClip(alpha=0.9, z_thresh=2.0, warmup=3)
    ref.buffer, ref.mean, ref.var = [2.0] * 3, 2.0, 0.25
    for stats in ([2.0, 0.25, 3.0], [2.0, 0.25, 7.0]):
        z = C.ZClip()
        z.load_state_dict({**state, "stats": torch.tensor(stats, dtype=torch.float64)})
        r = RefZClip(alpha=0.9, z_thresh=2.0, warmup=3)
        r.buffer, r.mean, r.var = list(ref.buffer), ref.mean, ref.var
        for v in [2.1, 1.9, 9.0, math.nan, 2.0, 30.0]:
            want = r.tau(v)
            got = float(z.threshold(torch.tensor(v)))
            assert got == want if math.isinf(want) else got == pytest.approx(want, rel=1e-6)
    z = C.ZClip()
    z.load_state_dict({**state, "stats": torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)})
    assert float(z.std) == 0.0
    assert float(z.threshold(torch.tensor(2.5))) == 2.0  # σ = 0: any rise is a spike, τ = μ


def slow_growth(n=200, rate=1.02, start=5, sigma=0.3, seed=0) -> list[float]:
    """Noisy norms growing slowly enough that ZClip's EMA follows them (no z-score spike)."""
    rng = random.Random(seed)
    return [math.exp(rng.gauss(0.0, sigma)) * rate ** max(0, i - start) for i in range(n)]


@pytest.mark.parametrize("growth", [10.0, 3.0])
def test_auto_matches_capped_zclip(growth):
    seq = slow_growth()
    ref = RefAuto(growth=growth, warmup=5)
    check_against(C.Auto(growth=growth, warmup=5), ref.tau, seq)
    # the data make the cap bind where ZClip alone would not clip
    auto, zclip = RefAuto(growth=growth, warmup=5), RefZClip(warmup=5)
    capped = [i for i, g in enumerate(seq) if auto.tau(g) < min(zclip.tau(g), g)]
    assert len(capped) > 20


def test_norm_clipper_matches_fixed_threshold():
    check_against(C.Norm(2.0), lambda g: 2.0, norm_sequence())
    check_against(C.Norm(torch.tensor(2.0)), lambda g: 2.0, norm_sequence())


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("named", [True, False])
def test_per_layer_matches_loop(p, named):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(12, 4),
        torch.nn.Linear(4, 2),
    )
    scales = {0: 10.0, 3: 0.01, 4: 3.0}
    for i, m in enumerate(net):
        for q in m.parameters(recurse=False):
            q.grad = torch.randn_like(q) * scales[i]
    net[3].bias.grad = None  # a tensor without a gradient
    max_norm = 1.0
    groups: dict[str, list[torch.Tensor]] = {}
    for name, q in net.named_parameters():
        if q.grad is not None:
            groups.setdefault(name.rpartition(".")[0] if named else name, []).append(q)
    want = {}
    for qs in groups.values():
        ln = ref_total([q.grad for q in qs], p)
        for q in qs:
            want[id(q)] = q.grad.double() * coef(ln, max_norm)
    pre = ref_total(grads(net.parameters()), p)
    got = C.PerLayer(max_norm, p)(net.named_parameters() if named else net.parameters())
    assert float(got) == pytest.approx(pre, rel=1e-5)
    for q in net.parameters():
        if q.grad is not None:
            torch.testing.assert_close(q.grad.double(), want[id(q)], rtol=1e-5, atol=1e-9)
    assert float(C.PerLayer(1.0)([torch.nn.Parameter(torch.ones(2))])) == 0.0


def test_value_clipper_matches_torch_and_passes_norm_through():
    ps = make_params([[3, 3], [4]], scale=2.0)
    theirs = clone_params(ps)
    torch.nn.utils.clip_grad_value_(theirs, 0.5)
    want_max = max(float(g.abs().max()) for g in grads(ps))
    assert float(C.Value(0.5)(ps)) == want_max
    for a, b in zip(ps, theirs):
        assert torch.equal(a.grad, b.grad)
    ps2 = make_params([[3, 3], [4]], scale=2.0)
    n = torch.tensor(7.0)
    assert C.Value(0.5)(ps2, norm=n) is n
    for a, b in zip(ps2, theirs):
        assert torch.equal(a.grad, b.grad)


# ----------------------------------------------------------------------------- 4. invariants
def norm_of(params, p=2.0):
    return ref_total(grads(params), p)


def cosine(a, b):
    x = torch.cat([g.double().flatten() for g in a])
    y = torch.cat([g.double().flatten() for g in b])
    return float(x @ y / (x.norm() * y.norm()))


@FAST
@given(
    shape_list=shapes,
    dtype=st.sampled_from([torch.float32, torch.float64]),
    p=st.sampled_from(NORM_TYPES),
    seed=st.integers(0, 2**31 - 1),
    frac=st.sampled_from([0.01, 0.3, 0.99, 1.5, 10.0]),
)
def test_norm_clipping_invariants(shape_list, dtype, p, seed, frac):
    ps = make_params(shape_list, dtype, seed, scale=5.0)
    before = [g.clone() for g in grads(ps)]
    total = norm_of(ps, p)
    if total == 0.0:
        return
    tau = frac * total
    gradguard.clip_grad_norm_(ps, tau, p)
    after = [g.clone() for g in grads(ps)]
    assert norm_of(ps, p) <= tau * (1 + 1e-5)
    if tau >= total * (1 + 1e-6):
        assert all(same(a, b) for a, b in zip(after, before))  # untouched below the threshold
    else:
        assert norm_of(ps, p) == pytest.approx(tau * total / (total + 1e-6), rel=1e-5)  # torch's 1e-6
    assert cosine(after, before) == pytest.approx(1.0, abs=1e-6)  # direction kept
    gradguard.clip_grad_norm_(ps, tau, p)  # idempotent, up to the 1e-6 that torch adds to the norm
    for a, b in zip(grads(ps), after):
        torch.testing.assert_close(a, b, rtol=2e-6 + 2e-6 / tau, atol=0.0)


def clipper_factories():
    return {
        "Norm": lambda: C.Norm(1.0),
        "AutoClip": lambda: C.AutoClip(10.0),
        "ZClip": lambda: C.ZClip(warmup=5),
        "Auto": lambda: C.Auto(warmup=5),
        "PerLayer": lambda: C.PerLayer(1.0),
        "Value": lambda: C.Value(0.05),
        "AGC": lambda: C.AGC(0.01),
    }


@pytest.mark.parametrize("name", list(clipper_factories()))
def test_clipper_invariants(name):
    clipper = clipper_factories()[name]()
    params = list(small_model().parameters())
    seq = norm_sequence(40)
    for i, g in enumerate(seq):
        set_global_norm(params, g, i)
        before = [q.grad.clone() for q in params]
        clipper(params)
        after = [q.grad.clone() for q in params]
        post = norm_of(params)
        assert math.isfinite(post) and post > 0
        if name in ("Norm", "AutoClip", "ZClip", "Auto"):
            assert post <= g * (1 + 1e-5)
            assert cosine(after, before) == pytest.approx(1.0, abs=1e-6)
        if name == "Norm":
            assert post <= 1.0 * (1 + 1e-5)
            if g < 1.0:
                assert all(same(a, b) for a, b in zip(after, before))
        if name == "PerLayer":
            for a, b in zip(after, before):  # each tensor scaled, never flipped or grown
                assert a.norm() <= b.norm() * (1 + 1e-6) and float(a.flatten() @ b.flatten()) >= 0
        if name == "Value":
            assert max(float(a.abs().max()) for a in after) <= float(torch.tensor(0.05))
        if name in ("Norm", "Value", "PerLayer", "AGC"):  # stateless: idempotent
            clipper(params)
            for a, b in zip((q.grad for q in params), after):
                torch.testing.assert_close(a, b, rtol=4e-6, atol=0.0)


# ----------------------------------------------------------------------------- 5. faults
BADS = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", BADS)
@pytest.mark.parametrize("name", ["Norm", "AutoClip", "ZClip", "Auto", "clip_grad_norm_"])
def test_nonfinite_norm_leaves_grads_untouched(bad, name):
    params = list(small_model().parameters())
    clipper = clipper_factories()[name]() if name != "clip_grad_norm_" else None
    for i in range(8):  # past the warm-up, with a state
        set_global_norm(params, 1.0 + i, i)
        if clipper is not None:
            clipper(params)
    set_global_norm(params, 100.0, 99, bad)
    before = [q.grad.clone() for q in params]
    ret = clipper(params) if clipper is not None else gradguard.clip_grad_norm_(params, 1.0)
    assert math.isnan(float(ret)) if math.isnan(bad) else float(ret) == math.inf
    assert all(same(q.grad, b) for q, b in zip(params, before))
    # torch, for the record: every gradient becomes NaN or 0
    theirs = clone_params([torch.nn.Parameter(q.detach()) for q in params])
    for t, b in zip(theirs, before):
        t.grad = b.clone()
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert any(not same(t.grad, b) for t, b in zip(theirs, before))


@pytest.mark.parametrize("bad", BADS)
def test_nonfinite_per_layer_and_agc_touch_only_the_bad_unit(bad):
    net = agc_net()
    params = list(net.parameters())
    net.lin.weight.grad[2, 1] = bad
    want = ref_agc(params, 0.01)  # its unit is skipped: non-finite norm
    before = net.lin.weight.grad.clone()
    ret = gradguard.clip_grad_agc_(params, 0.01)
    assert not math.isfinite(float(ret))
    assert same(net.lin.weight.grad[2], before[2])  # the bad unit: untouched, not NaN-filled
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad.double(), w, rtol=2e-6, atol=1e-12, equal_nan=True)
    # per-layer: the bad layer is untouched, the others clipped as usual
    net = agc_net()
    for q in net.parameters():
        q.grad = q.grad * 1e6
    net.lin.weight.grad[0, 0] = bad
    lin_before = [q.grad.clone() for q in net.lin.parameters()]
    ret = C.PerLayer(1.0)(net.named_parameters())
    assert not math.isfinite(float(ret))
    assert all(same(q.grad, b) for q, b in zip(net.lin.parameters(), lin_before))
    assert ref_total([q.grad for q in net.conv.parameters()]) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("bad", BADS)
def test_value_clipping_hides_nothing_in_its_return(bad):
    ps = make_params([[3], [2, 2]])
    ps[1].grad[0, 0] = bad
    ret = float(gradguard.clip_grad_value_(ps, 0.5))
    assert math.isnan(ret) if math.isnan(bad) else ret == math.inf
    got = float(ps[1].grad[0, 0])
    assert math.isnan(got) if math.isnan(bad) else got == math.copysign(0.5, bad)  # as torch does


def test_float16_norm_above_65504_clips_correctly():
    g = torch.full((100,), 1e4, dtype=torch.float16)  # norm 1e5
    ours = torch.nn.Parameter(torch.zeros(100, dtype=torch.float16))
    ours.grad = g.clone()
    theirs = torch.nn.Parameter(torch.zeros(100, dtype=torch.float16))
    theirs.grad = g.clone()
    assert float(torch.nn.utils.clip_grad_norm_(theirs, 1.0)) == math.inf
    assert float(theirs.grad.abs().max()) == 0.0  # torch zeroes everything
    got = gradguard.clip_grad_norm_(ours, 1.0)
    assert float(got) == pytest.approx(1e5, rel=1e-6)
    assert float(ours.grad.double().norm()) == pytest.approx(1.0, rel=2e-3)
    assert torch.allclose(ours.grad, torch.full_like(ours.grad, 0.1), rtol=2e-3)
    for clipper in [C.Norm(1.0), C.AutoClip(), C.ZClip(warmup=1), C.Auto(warmup=1)]:
        ours.grad = g.clone()
        assert float(clipper(ours)) == pytest.approx(1e5, rel=1e-6)
        assert torch.isfinite(ours.grad).all() and float(ours.grad.double().norm()) > 0


@pytest.mark.parametrize("name", [*clipper_factories(), "clip_grad_norm_"])
def test_float32_overflowing_norm_never_zeroes_or_nans(name):
    ps = make_params([[3, 3], [5]])
    ps[0].grad[1, 1] = 1e30  # the squared sum overflows float32: the one-pass norm is inf
    before = [g.clone() for g in grads(ps)]
    clipper = None if name == "clip_grad_norm_" else clipper_factories()[name]()
    ret = gradguard.clip_grad_norm_(ps, 1.0) if clipper is None else clipper(ps)
    for g, b in zip(grads(ps), before):
        assert torch.isfinite(g).all()
        assert (g != 0).sum() == (b != 0).sum()  # nothing turned into zeros
    if name in ("Norm", "AutoClip", "ZClip", "Auto"):
        assert float(ret) == math.inf  # a clipper on its own measures in float32 (the Guard re-measures)
        assert all(same(g, b) for g, b in zip(grads(ps), before))  # documented: left untouched
    if name == "clip_grad_norm_":  # the function re-measures an overflowed tensor: measured and clipped
        assert float(ret) == pytest.approx(ref_total(before), rel=1e-6)
        assert ref_total(grads(ps)) == pytest.approx(1.0, rel=1e-5)
    theirs = clone_params(ps)
    for t, b in zip(theirs, before):
        t.grad = b.clone()
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert float(theirs[1].grad.abs().max()) == 0.0  # torch: all zeros


def test_max_norm_inf_never_writes_nan_over_inf_grads():
    ps = make_params([[3], [4]])
    ps[0].grad[0] = math.inf
    before = [g.clone() for g in grads(ps)]
    gradguard.clip_grad_norm_(ps, math.inf)
    assert all(same(g, b) for g, b in zip(grads(ps), before))


def state_equal(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and same(x, y)):
                return False
        elif x != y:
            return False
    return True


STATEFUL = {
    "AutoClip": lambda: C.AutoClip(10.0),
    "AutoClip-window": lambda: C.AutoClip(50.0, window=5),
    "ZClip": lambda: C.ZClip(warmup=5),
    "Auto": lambda: C.Auto(warmup=5, growth=3.0),
}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("bad_step", [2, 4, 20])  # mid-warm-up, the last warm-up step, after it
@pytest.mark.parametrize("name", list(STATEFUL))
def test_nonfinite_step_does_not_poison_state(name, bad_step, bad):
    seq = norm_sequence(40, growth_from=25)
    seen, clean = STATEFUL[name](), STATEFUL[name]()
    params = list(small_model().parameters())
    out_seen, out_clean = [], []
    for i, g in enumerate(seq):
        if i == bad_step:
            set_global_norm(params, g, 500, bad)
            state_before = seen.state_dict()
            seen(params)
            assert state_equal(seen.state_dict(), state_before), "a non-finite step changed the state"
        set_global_norm(params, g, i)
        out_seen.append(seen(params).clone())
        out_seen.append(torch.cat([q.grad.flatten() for q in params]))
        set_global_norm(params, g, i)
        out_clean.append(clean(params).clone())
        out_clean.append(torch.cat([q.grad.flatten() for q in params]))
    assert all(same(a, b) for a, b in zip(out_seen, out_clean))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_reference_thresholds_skip_nonfinite_steps(bad):
    """The rule tests above, with non-finite steps mixed in at fixed places."""
    bad_at = {3: bad, 26: bad, 31: bad, 70: bad}
    check_against(C.AutoClip(10.0, window=9), RefAutoClip(10.0, 9).tau, norm_sequence(), bad_at)
    check_against(C.ZClip(), RefZClip().tau, norm_sequence(), bad_at)
    check_against(C.Auto(), RefAuto().tau, norm_sequence(growth_from=40), bad_at)


# ----------------------------------------------------------------------------- 6. no host sync
def meta_model_params():
    params = []
    for i, (shape, dt) in enumerate(
        [((4, 3), torch.float32), ((4,), torch.float32), ((2, 3, 3, 3), torch.float16), ((5,), torch.float64)]
    ):
        p = torch.nn.Parameter(torch.empty(shape, device="meta", dtype=dt))
        p.grad = torch.empty(shape, device="meta", dtype=dt)
        params.append((f"m{i // 2}.p{i}", p))
    return params


def every_clip_call():
    return {
        "clip_grad_norm_": lambda ps: gradguard.clip_grad_norm_(ps, 1.0),
        "clip_grad_norm_-p": lambda ps: torch.stack(
            [gradguard.clip_grad_norm_(ps, 1.0, p) for p in NORM_TYPES]
        ),
        "clip_grad_norm_-tensor": lambda ps: gradguard.clip_grad_norm_(ps, torch.tensor(1.0, device="meta")),
        "clip_grad_norm_-foreach": lambda ps: gradguard.clip_grad_norm_(ps, 1.0, foreach=True),
        "clip_grad_norm_-loop": lambda ps: gradguard.clip_grad_norm_(ps, 1.0, foreach=False),
        "clip_grad_value_": lambda ps: gradguard.clip_grad_value_(ps, 1.0),
        "get_total_norm": lambda ps: C.get_total_norm([p.grad for p in ps], 2.0, foreach=True),
        "get_total_norm-p": lambda ps: torch.stack(
            [C.get_total_norm([p.grad for p in ps], p) for p in NORM_TYPES]
        ),
        "clip_grads_with_norm_": lambda ps: (
            C.clip_grads_with_norm_(ps, 1.0, torch.empty((), device="meta")),
            ps[0].grad,
        )[1],
        "clip_grad_agc_": lambda ps: gradguard.clip_grad_agc_(ps, 0.01, exclude=ps[-1:]),
        "coefficient": lambda ps: C.coefficient(
            torch.empty((), device="meta"), torch.empty(1, device="meta")
        ),
    }


@pytest.mark.parametrize("name", list(every_clip_call()))
def test_clip_functions_run_on_meta_without_sync(name):
    named = meta_model_params()
    ps = [p for _, p in named]
    with NoSync(watch=[p.grad for p in ps]) as ns:
        out = every_clip_call()[name](ps)
    assert out.device.type == "meta"
    assert ns.h2d == []


SPECS = [
    "norm:5",
    "value:1",
    "agc:0.01",
    "agc",
    "autoclip:10",
    "autoclip",
    "zclip",
    "zclip:3",
    "layer:1",
    "auto",
]


@pytest.mark.parametrize(
    "spec", [*SPECS, "autoclip-window", "zclip-max", "agc-named", "layer-named", "norm-tensor"]
)
@pytest.mark.parametrize("with_norm", [False, True])
def test_every_clipper_runs_on_meta_without_sync(spec, with_norm):
    named = meta_model_params()
    ps = [p for _, p in named]
    extra = {
        "autoclip-window": C.AutoClip(10.0, window=3),
        "zclip-max": C.ZClip(warmup=2, max_norm=1.0),
        "agc-named": C.AGC(exclude=["m1"]),
        "layer-named": C.PerLayer(1.0),
        "norm-tensor": C.Norm(torch.tensor(1.0, device="meta")),
    }
    clipper = extra[spec] if spec in extra else C.from_spec(spec)
    assert clipper is not None
    arg = named if spec.endswith("-named") else ps
    norm = torch.empty((), device="meta") if with_norm else None
    clipper(arg, norm=norm)  # first call: state moves to the device (a one-time copy)
    with NoSync(watch=[p.grad for p in ps]) as ns:
        for _ in range(30):  # through any warm-up
            out = clipper(arg, norm=norm)
        state = clipper.state_dict()
    assert out.device.type == "meta"
    assert ns.h2d == []
    for v in state.values():
        assert not isinstance(v, torch.Tensor) or v.device.type == "meta"


def real_grads_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    m(torch.randn(4, 5)).square().sum().backward()
    for q in m.parameters():
        q.grad.mul_(100.0)  # so that every clipper clips
    return m


def test_clip_grad_norm_reads_each_grad_twice():
    m = real_grads_model()
    gs = [q.grad for q in m.parameters()]
    for foreach in [None, False]:
        with NoSync(watch=gs) as ns:
            gradguard.clip_grad_norm_(m.parameters(), 0.1, foreach=foreach)
        assert ns.reads == [2] * len(gs), ns.read_ops  # one norm pass + one scale pass
        assert ns.writes == [1] * len(gs)
        assert ns.h2d == [] and ns.syncs == []
    with NoSync(watch=gs) as ns:
        gradguard.clip_grad_norm_(m.parameters(), torch.tensor(0.1))
    assert ns.reads == [2] * len(gs)


def test_decomposed_api_reads_each_grad_once_and_equals_clip_grad_norm_():
    m = real_grads_model()
    gs = [q.grad for q in m.parameters()]
    before = [g.clone() for g in gs]
    for foreach in [None, False]:
        with NoSync(watch=gs) as ns:
            total = C.get_total_norm(gs, 2.0, foreach=foreach)
        assert ns.reads == [1] * len(gs) and ns.writes == [0] * len(gs), ns.read_ops
        with NoSync(watch=gs) as ns:
            C.clip_grads_with_norm_(m.parameters(), 0.1, total, foreach=foreach)
        assert ns.reads == [1] * len(gs) and ns.writes == [1] * len(gs), ns.read_ops
        assert ns.syncs == [] and ns.h2d == []
        decomposed = [g.clone() for g in gs]
        for g, b in zip(gs, before):
            g.copy_(b)
        assert same(gradguard.clip_grad_norm_(m.parameters(), 0.1, foreach=foreach), total)
        assert all(same(g, d) for g, d in zip(gs, decomposed))
        for g, b in zip(gs, before):
            g.copy_(b)


# reads of each gradient by `clipper(params, norm=measured)`: the scale pass only, except
# Value (clamp_min + clamp_max, as torch), PerLayer (needs per-tensor norms), AGC (needs per-unit norms)
READS_WITH_NORM = {
    "norm:5": 1,
    "autoclip": 1,
    "zclip": 1,
    "auto": 1,
    "value:1": 2,
    "layer:1": 2,
    "agc": 2,
}


@pytest.mark.parametrize("spec", list(READS_WITH_NORM))
def test_clipper_with_norm_reads_each_grad_once(spec):
    m = real_grads_model()
    clipper = C.from_spec(spec)
    assert clipper is not None
    for _ in range(30):  # through any warm-up, so the clipping branch runs
        gs = [q.grad for q in m.parameters()]
        norm = gradguard.stats.grad_stats(m.parameters()).total
        with NoSync(watch=gs) as ns:
            clipper(m.parameters(), norm=norm)
        assert ns.reads == [READS_WITH_NORM[spec]] * len(gs), ns.read_ops
        assert ns.syncs == []
        for q in m.parameters():
            q.grad.mul_(1.3)


# ----------------------------------------------------------------------------- 7. state round trip
ROUND_TRIP = {
    "Norm": lambda: C.Norm(2.0),
    "Value": lambda: C.Value(0.1),
    "AGC": lambda: C.AGC(0.05),
    "PerLayer": lambda: C.PerLayer(1.0),
    "AutoClip": lambda: C.AutoClip(10.0),
    "AutoClip-window": lambda: C.AutoClip(30.0, window=6),
    "ZClip": lambda: C.ZClip(warmup=10),
    "ZClip-max": lambda: C.ZClip(warmup=3, max_norm=5.0, alpha=0.9),
    "Auto": lambda: C.Auto(warmup=10, growth=4.0),
}


@pytest.mark.parametrize("stop_at", [5, 30])  # inside and after the warm-up
@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_state_round_trip_equals_not_stopping(name, stop_at):
    seq = norm_sequence(60, growth_from=35)
    bad_at = {stop_at - 1: math.nan, 40: math.inf}
    a = ROUND_TRIP[name]()
    params = list(small_model().parameters())

    def step(clipper, i):
        set_global_norm(params, seq[i], i, bad_at.get(i))
        ret = clipper(params)
        return ret.clone(), [q.grad.clone() for q in params]

    for i in range(stop_at):
        step(a, i)
    state = a.state_dict()
    assert state["version"] == 1
    for v in state.values():
        assert v is None or isinstance(v, (torch.Tensor, int, float, str))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = ROUND_TRIP[name]()
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert state_equal(b.state_dict(), state)
    for i in range(stop_at, len(seq)):
        ra, ga = step(a, i)
        rb, gb = step(b, i)
        assert same(ra, rb), (i, ra, rb)
        assert all(same(x, y) for x, y in zip(ga, gb)), i


def test_load_state_dict_refuses_other_versions():
    c = C.ZClip()
    state = c.state_dict()
    state["version"] = 99
    with pytest.raises(GradGuardError, match=r"version 99.*reads version 1.*start the clipper fresh"):
        c.load_state_dict(state)


# ----------------------------------------------------------------------------- 8. bad input
BAD_NUMBERS = [-1.0, math.nan, "x", None]


@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_bad_thresholds(bad):
    ps = make_params([[2]])
    for call, name in [
        (lambda: gradguard.clip_grad_norm_(ps, bad), "max_norm"),
        (lambda: gradguard.clip_grad_value_(ps, bad), "clip_value"),
        (lambda: C.Norm(bad), "max_norm"),
        (lambda: C.Value(bad), "clip_value"),
        (lambda: C.PerLayer(bad), "max_norm"),
        (lambda: C.AGC(bad), "clip_factor"),
        (lambda: C.AGC(0.01, eps=bad), "eps"),
        (lambda: gradguard.clip_grad_agc_(ps, bad), "clip_factor"),
        (lambda: C.ZClip(z_thresh=bad), "z_thresh"),
        *([] if bad is None else [(lambda: C.ZClip(max_norm=bad), "max_norm")]),  # None: no cap
        (lambda: C.Auto(growth=bad), "growth"),
    ]:
        with pytest.raises(GradGuardError, match=name) as e:
            call()
        assert repr(bad) in str(e.value) or str(bad) in str(e.value), str(e.value)


def test_bad_threshold_messages_say_how_to_fix():
    with pytest.raises(GradGuardError, match=r"max_norm must be .*≥ 0, got -1.*e\.g\. 1\.0"):
        gradguard.clip_grad_norm_(make_params([[2]]), -1)
    with pytest.raises(
        GradGuardError, match=r"max_norm must be a number or a 1-element tensor, got shape \(2,\)"
    ):
        gradguard.clip_grad_norm_(make_params([[2]]), torch.ones(2))
    with pytest.raises(GradGuardError, match="clip_factor"):
        C.AGC(math.inf)


@pytest.mark.parametrize("pct", [0, -5, 100.1, math.nan, "ten", None])
def test_autoclip_percentile_outside_range(pct):
    with pytest.raises(GradGuardError, match=r"percentile must be in \(0, 100\].*autoclip:10"):
        C.AutoClip(pct)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: C.AutoClip(window=0), r"window must be a positive int, got 0"),
        (lambda: C.AutoClip(window=2.5), r"window must be a positive int"),
        (lambda: C.ZClip(alpha=1.0), r"alpha must be in \(0, 1\), got 1\.0.*0\.97"),
        (lambda: C.ZClip(alpha=0.0), r"alpha must be in \(0, 1\)"),
        (lambda: C.ZClip(alpha=math.nan), r"alpha must be in \(0, 1\)"),
        (lambda: C.ZClip(z_thresh=0.0), r"z_thresh must be > 0.*2\.5"),
        (lambda: C.ZClip(warmup=0), r"warmup must be a positive int, got 0.*25"),
        (lambda: C.ZClip(warmup=True), r"warmup must be a positive int"),
        (lambda: C.Auto(growth=0.5), r"growth must be ≥ 1, got 0\.5"),
        (lambda: C.Norm(1.0, norm_type=0), r"norm_type must be > 0"),
        (lambda: C.PerLayer(1.0, norm_type="fro"), r"norm_type must be a number"),
        (lambda: gradguard.clip_grad_norm_(make_params([[2]]), 1.0, -2), r"norm_type must be > 0"),
    ],
)
def test_bad_options(make, match):
    with pytest.raises(GradGuardError, match=match):
        make()


def mixed_device_params():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2, device="meta"))
    a.grad, b.grad = torch.ones(2), torch.ones(2, device="meta")
    return [a, b]


@pytest.mark.parametrize(
    "call",
    [
        lambda ps: gradguard.clip_grad_norm_(ps, 1.0),
        lambda ps: gradguard.clip_grad_value_(ps, 1.0),
        lambda ps: gradguard.clip_grad_agc_(ps),
        *[(lambda ps, s=s: C.from_spec(s)(ps)) for s in SPECS],
    ],
)
def test_mixed_devices_are_refused(call):
    with pytest.raises(GradGuardError, match=r"several devices \['cpu', 'meta'\].*Call it once per device"):
        call(mixed_device_params())


@pytest.mark.parametrize(
    "call",
    [
        lambda ps: gradguard.clip_grad_norm_(ps, 1.0),
        lambda ps: gradguard.clip_grad_value_(ps, 1.0),
        lambda ps: gradguard.clip_grad_agc_(ps),
        *[(lambda ps, s=s: C.from_spec(s)(ps)) for s in SPECS],
    ],
)
def test_sparse_grads_are_refused(call):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(GradGuardError, match=r"sparse.*\.to_dense\(\).*sparse=False"):
        call(list(emb.parameters()))


@pytest.mark.parametrize(
    ("spec", "kind", "attrs"),
    [
        ("norm:5", C.Norm, {"max_norm": 5.0}),
        (" NORM: 2.5 ", C.Norm, {"max_norm": 2.5}),
        ("value:1", C.Value, {"clip_value": 1.0}),
        ("agc:0.01", C.AGC, {"clip_factor": 0.01}),
        ("agc:0.05", C.AGC, {"clip_factor": 0.05}),
        ("agc", C.AGC, {"clip_factor": 0.01, "eps": 1e-3}),
        ("autoclip:10", C.AutoClip, {"percentile": 10.0}),
        ("autoclip:25", C.AutoClip, {"percentile": 25.0}),
        ("autoclip", C.AutoClip, {"percentile": 10.0, "window": 1000}),
        ("zclip", C.ZClip, {"z_thresh": 2.5, "alpha": 0.97, "warmup": 25, "max_norm": None}),
        ("zclip:3", C.ZClip, {"z_thresh": 3.0}),
        ("layer:1", C.PerLayer, {"max_norm": 1.0}),
        ("auto", C.Auto, {"growth": 10.0, "z_thresh": 2.5, "warmup": 25}),
        (5, C.Norm, {"max_norm": 5.0}),
        (0.5, C.Norm, {"max_norm": 0.5}),
        ("5", C.Norm, {"max_norm": 5.0}),
    ],
)
def test_from_spec_accepted_forms(spec, kind, attrs):
    clipper = C.from_spec(spec)
    assert type(clipper) is kind
    for k, v in attrs.items():
        assert getattr(clipper, k) == v
    assert kind.__name__ in repr(clipper)


def test_from_spec_none_and_passthrough():
    assert C.from_spec("none") is None
    assert C.from_spec(" None ") is None
    assert C.from_spec(None) is None
    z = C.ZClip()
    assert C.from_spec(z) is z


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("bogus", r"unknown clip spec 'bogus'\. Accepted: norm:MAX_NORM.*autoclip"),
        ("", r"unknown clip spec ''"),
        ("norm", r"clip spec 'norm': it needs a number after a colon\. Accepted"),
        ("norm:", r"clip spec 'norm:': it needs a number after a colon"),
        ("layer", r"clip spec 'layer': it needs a number"),
        ("value", r"clip spec 'value': it needs a number"),
        ("auto:3", r"unknown clip spec 'auto:3'"),
        ("none:1", r"unknown clip spec 'none:1'"),
        ("norm:abc", r"'abc' is not a number\. Accepted: norm:MAX_NORM"),
        ("norm:-1", r"max_norm must be .*≥ 0, got -1\.0"),
        ("norm:nan", r"max_norm must be .*got nan"),
        ("-3", r"max_norm must be .*got -3\.0"),
        ("autoclip:0", r"percentile must be in \(0, 100\]"),
        ("autoclip:101", r"percentile must be in \(0, 100\]"),
        ("zclip:0", r"z_thresh must be > 0"),
        ("agc:-1", r"clip_factor must be .*ratio of a unit's gradient norm to its weight norm.*0\.01"),
        ("value:-1", r"clip_value must be"),
        (True, r"clip must be a spec string, a number or a gradguard\.clip\.Clipper, got True"),
        (object, r"clip must be a spec string"),
        ([5], r"clip must be a spec string"),
    ],
)
def test_from_spec_bad(spec, match):
    with pytest.raises(GradGuardError, match=match):
        C.from_spec(spec)


# ----------------------------------------------------------------------------- 9. what a clipper did: clip_
def ref_unit_fraction(params, lam=0.01, eps=1e-3, exclude=()):
    """AGC's units clipped / units (excluded tensors are not units), unit by unit in float64."""
    clipped = units = 0
    for p in params:
        if p.grad is None or any(p is e for e in exclude):
            continue
        g, w = p.grad.double(), p.detach().double()
        for wu, gu in [(w, g)] if g.ndim <= 1 else [(w[i], g[i]) for i in range(g.shape[0])]:
            gn = float(gu.norm())
            units += 1
            clipped += math.isfinite(gn) and gn > lam * max(float(wu.norm()), eps)
    return clipped / units


def check_fraction(got: torch.Tensor, want: float, device="cpu") -> None:
    assert got.shape == () and got.dtype == torch.float32 and got.device.type == device
    assert float(got) == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("lam", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("exclude", ["none", "fc"])
def test_agc_fraction_is_the_units_clipped(lam, exclude):
    net = agc_net()
    ex_names = ["fc"] if exclude == "fc" else []
    want = ref_unit_fraction(list(net.parameters()), lam, 1e-3, list(net.fc.parameters()) if ex_names else [])
    assert (0 < want < 1) if lam < 1 else want == 0
    check_fraction(C.AGC(lam, exclude=ex_names).clip_(net.named_parameters()), want)


def test_value_fraction_is_the_elements_clamped():
    ps = make_params([[3, 3], [4], [0]], scale=2.0)
    ps[1].grad[0] = math.nan  # passes through value clipping: not clamped
    want = sum(int((g.abs() > 0.5).sum()) for g in grads(ps)) / sum(g.numel() for g in grads(ps))
    assert 0 < want < 1
    theirs = clone_params(ps)
    torch.nn.utils.clip_grad_value_(theirs, 0.5)
    check_fraction(C.Value(0.5).clip_(ps), want)
    assert all(same(a.grad, b.grad) for a, b in zip(ps, theirs))
    check_fraction(C.Value(0.5).clip_(ps), 0.0)  # clamped already


@pytest.mark.parametrize("named", [True, False])
def test_per_layer_fraction_is_the_layers_clipped(named):
    net = agc_net()
    for q in net.conv.parameters():
        q.grad = q.grad * 1e6  # the conv layer clips, the others do not
    # layers: emb, conv, lin, fc and the root (scale); without names, each of the 8 tensors
    want = 1 / 5 if named else 2 / 8
    check_fraction(C.PerLayer(1.0).clip_(net.named_parameters() if named else net.parameters()), want)


@pytest.mark.parametrize("spec", ["norm:1", "zclip", "auto", "autoclip"])
def test_norm_clipper_fraction_is_one_when_it_scaled(spec):
    clipper = C.from_spec(spec)
    params = list(small_model().parameters())
    for i, g in enumerate(norm_sequence(40)):
        set_global_norm(params, g, i)
        before = [q.grad.clone() for q in params]
        frac = clipper.clip_(params)
        scaled = not all(same(q.grad, b) for q, b in zip(params, before))
        check_fraction(frac, float(scaled))


ZERO_THRESHOLD = {
    "norm:0": lambda: C.Norm(0.0),
    "agc:0": lambda: C.AGC(0.0),
    "layer:0": lambda: C.PerLayer(0.0),
    "value:0": lambda: C.Value(0.0),
}


@pytest.mark.parametrize("spec", list(ZERO_THRESHOLD))
def test_a_threshold_of_zero_zeroes_everything_and_says_so(spec):
    """Clippers built with a threshold of 0 zero every gradient (from_spec refuses their specs;
    see tests/test_faults.py): their effect is visible as a coefficient of 0 and a clip fraction of 1."""
    net = agc_net()
    clipper = ZERO_THRESHOLD[spec]()
    check_fraction(clipper.clip_(net.named_parameters() if clipper.takes_names else net.parameters()), 1.0)
    assert all(float(q.grad.abs().max()) == 0.0 for q in net.parameters())
    if isinstance(clipper, C.NormClipper):
        norm = torch.tensor(3.0)
        coef = C.coefficient(norm, clipper.threshold(norm))
        assert float(coef) == 0.0 and float(C.fraction_clipped(coef)) == 1.0


def test_nonfinite_units_are_not_counted_as_clipped():
    net = agc_net()
    net.lin.weight.grad[2, 1] = math.nan
    want = ref_unit_fraction(list(net.parameters()))
    check_fraction(C.AGC().clip_(net.parameters()), want)
    net = agc_net()
    net.lin.weight.grad[0, 0] = math.inf
    check_fraction(C.PerLayer(1e-12).clip_(net.named_parameters()), 4 / 5)  # every layer but lin
    check_fraction(C.fraction_clipped(C.coefficient(torch.tensor(math.nan), 1.0)), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficient_is_the_clamped_formula_bit_for_bit(dtype):
    """``min(1, τ / (‖g‖ + 1e-6))`` clamped at 0, 1 where the norm or τ is not finite (the formula
    with ``clamp`` and ``where``), bit for bit: for number and tensor thresholds, with the guard's
    shortcuts (its 1e-6-or-NaN ``finite_eps``, ``nonnegative`` for a checked threshold, ``out``),
    on zero, tiny, huge, infinite, NaN and negative norms and thresholds, ±0 included."""
    values = [0.0, -0.0, 1e-45, 1e-9, 0.5, 1.0, 3.0, 1e30, 3.4e38, math.inf, -math.inf, math.nan, -1.0]
    eps, zero, one = (torch.tensor(v, dtype=dtype) for v in (1e-6, 0.0, 1.0))

    def bits(t: torch.Tensor) -> int:
        return int(t.view(torch.int32 if t.dtype == torch.float32 else torch.int64))

    for n in values:
        norm = torch.tensor(n, dtype=dtype)
        finite_eps = torch.where(torch.isfinite(norm), eps, torch.tensor(math.nan, dtype=dtype))
        for tau in values:
            constant = torch.tensor(tau, dtype=dtype)
            for threshold in (tau, constant):  # (a number divides as torch's reciprocal · τ: its own bits)
                raw = (threshold / (norm + eps)).clamp(zero, one)
                want = bits(torch.where(norm * raw * zero == zero, raw, one))
                assert bits(C.coefficient(norm, threshold)) == want, (n, tau)
            assert bits(C.coefficient(norm, constant, finite_eps=finite_eps)) == want, (n, tau)
            if n >= 0 and tau >= 0:  # (the promise: never negative; NaN passes)
                into = torch.full((), -7.0, dtype=dtype)
                got = C.coefficient(norm, constant, finite_eps=finite_eps, nonnegative=True, out=into)
                assert got is into and bits(into) == want, (n, tau)
    nan_tau = torch.tensor(math.nan)
    assert C.coefficient(torch.tensor(2.0), nan_tau) == 1.0


def test_the_host_coefficient_is_the_float32_coefficient_bit_for_bit():
    """A CPU step's coefficient on host floats (:func:`gradguard.clip.host_coefficient`) is bit for bit
    the float32 tensor :func:`~gradguard.clip.coefficient` (with the guard's ``finite_eps``): on the
    edge values above and on 20,000 random pairs of float32 norms and thresholds whose ratios span
    the rounding of ``+`` and ``/`` (float64 thresholds too: rounded to float32 first)."""
    edges = [0.0, -0.0, 1e-45, 1e-9, 0.5, 1.0, 3.0, 1e30, 3.4e38, math.inf, -math.inf, math.nan, -1.0]
    g = torch.Generator().manual_seed(0)
    norms = torch.exp(torch.empty(20_000).uniform_(-30, 30, generator=g)).tolist()
    taus = (torch.tensor(norms) * torch.exp(torch.empty(20_000).uniform_(-3, 3, generator=g))).tolist()
    eps = torch.tensor(1e-6)
    pairs = [(n, t) for n in edges for t in edges] + list(zip(norms, taus))
    pairs += [(n, t * (1 + 1e-9)) for n, t in zip(norms[:2000], taus[:2000])]  # not float32: rounded first
    for n, t in pairs:
        norm = torch.tensor(n, dtype=torch.float32)  # the norm as the row holds it
        finite_eps = torch.where(torch.isfinite(norm), eps, torch.tensor(math.nan))
        for nonnegative in (False, True) if n >= 0 and t >= 0 else (False,):
            want = C.coefficient(
                norm, torch.tensor(t, dtype=torch.float64), finite_eps=finite_eps, nonnegative=nonnegative
            )
            got = torch.tensor(
                C.host_coefficient(float(norm), t, nonnegative=nonnegative), dtype=torch.float32
            )
            assert got.view(torch.int32) == want.view(torch.int32) or (got.isnan() and want.isnan()), (n, t)


@pytest.mark.parametrize("spec", [*SPECS, "norm:0"])
def test_clip_and_call_clip_the_same(spec):
    """clip_ clips exactly as the call does (and keeps the same state)."""
    make = ZERO_THRESHOLD.get(spec, lambda: C.from_spec(spec))
    a, b = make(), make()
    pa, pb = list(small_model().parameters()), list(small_model().parameters())
    for i, g in enumerate(norm_sequence(40)):
        set_global_norm(pa, g, i)
        set_global_norm(pb, g, i)
        a(pa)
        b.clip_(pb)
        assert all(same(x.grad, y.grad) for x, y in zip(pa, pb)), i
    assert state_equal(a.state_dict(), b.state_dict())


def test_clip_fraction_when_there_is_nothing_to_clip():
    empty = [torch.nn.Parameter(torch.ones(2))]  # no gradient
    for spec in SPECS:
        check_fraction(C.from_spec(spec).clip_(empty), 0.0)
    check_fraction(C.AGC().clip_(make_params([[0, 3]])), 0.0)  # no units
    ps = make_params([[2, 3]], scale=100.0)
    check_fraction(C.AGC(exclude=ps).clip_(ps), 0.0)  # every unit excluded


@pytest.mark.parametrize(
    "spec", [*SPECS, "autoclip-window", "zclip-max", "agc-named", "layer-named", "norm-tensor"]
)
@pytest.mark.parametrize("with_norm", [False, True])
def test_clip_fraction_runs_on_meta_without_sync(spec, with_norm):
    named = meta_model_params()
    ps = [p for _, p in named]
    extra = {
        "autoclip-window": C.AutoClip(10.0, window=3),
        "zclip-max": C.ZClip(warmup=2, max_norm=1.0),
        "agc-named": C.AGC(exclude=["m1"]),
        "layer-named": C.PerLayer(1.0),
        "norm-tensor": C.Norm(torch.tensor(1.0, device="meta")),
    }
    clipper = extra[spec] if spec in extra else C.from_spec(spec)
    arg = named if spec.endswith("-named") else ps
    norm = torch.empty((), device="meta") if with_norm else None
    clipper.clip_(arg, norm=norm)  # first call: state moves to the device (a one-time copy)
    with NoSync(watch=[p.grad for p in ps]) as ns:
        for _ in range(30):  # through any warm-up
            out = clipper.clip_(arg, norm=norm)
    assert out.device.type == "meta" and out.shape == () and out.dtype == torch.float32
    assert ns.h2d == []


# reads of each gradient by `clipper.clip_(params, norm=measured)`: as the call (READS_WITH_NORM), plus
# one for Value (the count of the elements clamped)
@pytest.mark.parametrize("spec", list(READS_WITH_NORM))
def test_clip_fraction_reads_each_grad_as_the_call_does(spec):
    m = real_grads_model()
    clipper = C.from_spec(spec)
    for _ in range(30):
        gs = [q.grad for q in m.parameters()]
        norm = gradguard.stats.grad_stats(m.parameters()).total
        with NoSync(watch=gs) as ns:
            clipper.clip_(m.parameters(), norm=norm)
        assert ns.reads == [READS_WITH_NORM[spec] + (spec == "value:1")] * len(gs), ns.read_ops
        assert ns.syncs == []
        for q in m.parameters():
            q.grad.mul_(1.3)


def test_a_clipper_written_before_clip_reports_nan():
    class Legacy(C.Clipper):  # defines only the call, as clippers did before clip_ existed
        def __call__(self, parameters, norm=None):
            return gradguard.clip_grad_norm_(parameters, 1.0)

    ps = make_params([[3]], scale=10.0)
    assert math.isnan(float(Legacy().clip_(ps)))
    assert float(ps[0].grad.norm()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(NotImplementedError, match=r"must define clip_\(parameters, norm=None\)"):
        C.Clipper().clip_(ps)


# ----------------------------------------------------------------------------- 10. a clipper as data; the registry
CONFIGS = {
    "norm:5": {"kind": "norm", "max_norm": 5.0, "norm_type": 2.0},
    "value:1": {"kind": "value", "clip_value": 1.0},
    "agc": {"kind": "agc", "clip_factor": 0.01, "eps": 1e-3, "exclude": []},
    "autoclip:25": {"kind": "autoclip", "percentile": 25.0, "window": 1000},
    "zclip:3": {"kind": "zclip", "alpha": 0.97, "z_thresh": 3.0, "warmup": 25, "eps": 1e-6, "max_norm": None},
    "layer:1": {"kind": "layer", "max_norm": 1.0, "norm_type": 2.0},
    "auto": {
        "kind": "auto",
        "alpha": 0.97,
        "z_thresh": 2.5,
        "warmup": 25,
        "eps": 1e-6,
        "max_norm": None,
        "growth": 10.0,
        "first": 0.5,
        "polyak": 0.5,  # issue 15: the learning-rate-aware cap (tests/test_auto.py)
        "ramp": True,  # issue 15: the cap ramps up over the warm-up (tests/test_auto.py)
        "trust": None,  # issue 15: the per-layer trust cap is opt-in (tests/test_auto.py)
    },
}


@pytest.mark.parametrize("spec", list(CONFIGS))
def test_config_is_json_data_that_rebuilds_the_clipper(spec):
    clipper = C.from_spec(spec)
    config = clipper.config()
    assert config == CONFIGS[spec]
    assert clipper.kind == config["kind"] == spec.partition(":")[0]
    assert C.CLIPPERS[clipper.kind] is type(clipper)
    rebuilt = C.from_spec(json.loads(json.dumps(config)))
    assert type(rebuilt) is type(clipper) and rebuilt.config() == config
    assert type(clipper).from_config(config).config() == config
    assert repr(rebuilt) == repr(clipper)
    pa, pb = list(small_model().parameters()), list(small_model().parameters())
    for i, g in enumerate(norm_sequence(40)):  # the same clipper: the same clipping
        set_global_norm(pa, g, i)
        set_global_norm(pb, g, i)
        assert same(clipper(pa), rebuilt(pb))
        assert all(same(x.grad, y.grad) for x, y in zip(pa, pb))


def test_config_of_options_and_of_what_is_not_data():
    c = C.ZClip(alpha=0.9, z_thresh=2.0, warmup=3, eps=1e-3, max_norm=4.0)
    assert state_equal(C.from_spec(c.config()).state_dict(), c.state_dict())
    assert C.Auto().config()["first"] is None
    assert C.Norm(torch.tensor(2.5)).config() == {"kind": "norm", "max_norm": 2.5, "norm_type": 2.0}
    assert C.Norm(torch.tensor(2.5, device="meta")).config()["max_norm"] is None
    assert C.Norm(1.0, norm_type=math.inf).config()["norm_type"] == math.inf
    lin = torch.nn.Linear(2, 2)
    agc = C.AGC(exclude=["fc", lin.weight])  # a tensor is not data: its name is unknown here
    assert agc.config()["exclude"] == ["fc"]
    with pytest.raises(GradGuardError, match=r"unknown kind 'bogus'\. Known: norm, value, agc"):
        C.from_spec({"kind": "bogus"})


@pytest.mark.parametrize(
    ("config", "match"),
    [
        # a key no constructor takes: ZClip's (the spike clipper's) bare TypeError before
        (
            {"kind": "zclip", "version": 1},
            r"unknown key 'version'\. The zclip clipper's keys are 'kind', 'alpha'",
        ),
        # auto's keys include ZClip's (its **zclip), and a misspelt one is named
        ({"kind": "auto", "z_thres": 2.0}, r"unknown key 'z_thres' \(did you mean 'z_thresh'\?\).*'growth'"),
        ({"kind": "norm"}, r"no 'max_norm', which the norm clipper needs.*e\.g\. norm:5"),
    ],
)
def test_a_config_dict_with_a_key_the_clipper_does_not_take_is_refused_with_its_keys(config, match):
    with pytest.raises(GradGuardError, match=match):
        C.from_spec(config)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(GradGuardError, match=match):
        gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), clip=config)


class TensorNorm(C.Clipper):
    """A clipper as a new file would define it: each tensor's gradient norm clipped to ``max_norm``."""

    kind = "mykind"
    usage = "mykind:MAX_NORM (each tensor's norm)"

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm
        self.calls = 0

    @classmethod
    def from_arg(cls, arg):
        return cls(C.spec_number(arg))

    def config(self):
        return {**super().config(), "max_norm": self.max_norm}

    def clip_(self, parameters, norm=None):
        self.calls += 1
        gs = gradguard.stats.grads_of(parameters)
        coefs = C.coefficient(gradguard.stats.tensor_norms(gs), self.max_norm)
        for g, c in zip(gs, coefs.unbind()):
            g.mul_(c.to(g.dtype))
        return C.fraction_clipped(coefs)


def test_a_new_clipper_is_a_class_and_one_registry_line(monkeypatch, tmp_path):
    monkeypatch.setitem(C.CLIPPERS, TensorNorm.kind, TensorNorm)  # the one line
    clipper = C.from_spec("mykind:3")
    assert isinstance(clipper, TensorNorm) and clipper.max_norm == 3.0
    assert C.from_spec(clipper.config()).config() == {"kind": "mykind", "max_norm": 3.0}
    with pytest.raises(
        GradGuardError,
        match=r"clip spec 'mykind': it needs a number after a colon\. Accepted: .*mykind:MAX_NORM",
    ):
        C.from_spec("mykind")
    with pytest.raises(GradGuardError, match=r"clip spec 'mykind:x': 'x' is not a number"):
        C.from_spec("mykind:x")
    ps = make_params([[3, 3], [4]], scale=10.0)
    pre = ref_total(grads(ps))
    assert float(clipper(ps)) == pytest.approx(pre, rel=1e-6)  # the call: the base class's, via clip_
    assert all(float(g.norm()) == pytest.approx(3.0, rel=1e-5) for g in grads(ps))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, clip="mykind:3", log_dir=tmp_path)
    assert isinstance(guard.clipper, TensorNorm)
    before = [q.detach().clone() for q in model.parameters()]
    for _ in range(5):
        opt.zero_grad()
        x = torch.randn(8, 6)
        loss = model(x).square().mean() * 100.0
        loss.backward()
        guard.step(loss)
    guard.close()
    assert guard.clipper.calls == 5
    assert all(not torch.equal(q, b) for q, b in zip(model.parameters(), before))


def test_every_kind_is_in_the_accepted_forms():
    with pytest.raises(GradGuardError) as e:
        C.from_spec("bogus")
    for cls in C.CLIPPERS.values():
        assert cls.usage in str(e.value)


# ----------------------------------------------------------------------------- 11. HostZClip: ZClip's rule on the host
def test_host_zclip_flags_the_steps_zclip_flags_on_device():
    """The guard's spike warning (on_spike="warn") runs ZClip's rule on the host at flush; it flags
    the same steps as ZClip on device, with the same statistics."""
    g = torch.Generator().manual_seed(0)
    norms = (1 + 0.1 * torch.randn(300, generator=g, dtype=torch.float64)).tolist()
    for i in (40, 41, 90, 200):
        norms[i] *= 20
    norms[120] = math.nan
    for z in (2.5, 6.0):
        device = gradguard.ZClip(z_thresh=z)
        host = C.HostZClip(z)
        dev_flags = [
            bool(torch.isfinite(device.threshold(torch.tensor(n, dtype=torch.float64)))) for n in norms
        ]
        host_flags = [host.observe(n) for n in norms]
        assert host_flags == dev_flags
        assert host.mean == pytest.approx(float(device.mean), rel=1e-9)
    assert sum(dev_flags) >= 3


@pytest.mark.parametrize(("z_thresh", "warmup", "eps"), [(2.5, 25, 1e-6), (1.0, 1, 1e-9), (1.5, 5, 1e-3)])
def test_host_and_device_zclip_follow_the_reference_for_3000_steps(z_thresh, warmup, eps):
    """One rule, two arithmetics: over 3000 steps (spikes, ties, non-finite norms, a constant stretch),
    the device thresholds and the host spike flags match the plain-Python rule."""
    rng = random.Random(warmup)
    seq = [math.exp(rng.gauss(0.0, 0.3)) * (30.0 if i % 97 == 50 else 1.0) for i in range(3000)]
    for i in range(0, 3000, 211):
        seq[i] = [math.nan, math.inf, -math.inf][i % 3]
    seq[1000:1100] = [1.0] * 100
    ref = RefZClip(z_thresh=z_thresh, warmup=warmup, eps=eps)
    device, host = (
        C.ZClip(z_thresh=z_thresh, warmup=warmup, eps=eps),
        C.HostZClip(z_thresh, warmup=warmup, eps=eps),
    )
    spikes = 0
    for i, v in enumerate(seq):
        want = ref.tau(v)
        got = float(device.threshold(torch.tensor(v, dtype=torch.float64)))
        assert got == want if math.isinf(want) else got == pytest.approx(want, rel=1e-6), i
        assert host.observe(v) == math.isfinite(want), i
        spikes += math.isfinite(want)
    assert host.mean == pytest.approx(ref.mean, rel=1e-9) and host.var == pytest.approx(ref.var, rel=1e-6)
    assert host.seen == warmup and spikes >= 30


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_host_zclip_divides_by_zero_as_the_device_does(eps, monkeypatch):
    """σ = 0 and g = μ make z = 0/eps or 0/0 and τ − μ = 0/0: IEEE on device, the same on the host
    (where Python would raise ZeroDivisionError)."""
    monkeypatch.setattr(C, "_PIN_DEVICE_PATH", True)  # the device's rule, on the CPU
    seq = [1.0, 1.0, 1.0, 1.0, 2.0, 1.0, -math.inf, 1.0, 3.0]
    device, host = C.ZClip(warmup=3, eps=eps), C.HostZClip(2.5, warmup=3, eps=eps)
    flags = [bool(torch.isfinite(device.threshold(torch.tensor(v, dtype=torch.float64)))) for v in seq]
    assert [host.observe(v) for v in seq] == flags
    assert flags[4] and flags[8]
    assert [host.mean, host.var] == device._state[0, :2].tolist()


def test_host_zclip_state():
    host = C.HostZClip(2.5, warmup=3)
    for v in [1.0, 1.2, math.nan, 0.9, 1.1, 5.0]:
        host.observe(v)
    state = host.state_dict()
    assert state == {"version": 1, "host": True, "mean": host.mean, "var": host.var, "seen": 3}
    assert all(isinstance(state[k], float) for k in ("mean", "var")) and isinstance(state["seen"], int)
    a, b = C.HostZClip(2.5, warmup=3), C.HostZClip(2.5, warmup=3)
    a.load_state_dict(json.loads(json.dumps(state)))
    for v in [1.0, 9.0, 1.05, math.inf, 30.0, 1.0]:  # resuming equals not stopping
        assert a.observe(v) == host.observe(v)
    assert a.state_dict() == host.state_dict()
    b.load_state_dict(C.ZClip().state_dict())  # a device ZClip's state (on_spike changed): start afresh
    assert b.state_dict() == {"version": 1, "host": True, "mean": 0.0, "var": 0.0, "seen": 0}
    b.load_state_dict({"host": True, "mean": 2.0, "var": -1.0, "seen": 99})  # clamped like the device's
    assert (b.var, b.seen) == (0.0, 3)
    assert b.observe(2.5) and not b.observe(2.0)  # σ = 0: any rise is a spike


# ----------------------------------------------------------------------------- the rules on host floats
@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_on_a_cpu_norm_the_rules_run_on_host_floats_with_the_device_rules_numbers(name):
    """ZClip's and auto's rules run on host floats on a CPU norm (no device op: a few µs against ~20-35
    small tensor ops) and give the device rule's thresholds and state (float64 both: equal up to the
    rounding of the device's fused multiply-add, 1e-12), for every cap (Polyak with a float or tensor
    learning rate, the ramp, the growth, first-norm and trust caps, ``max_norm``), non-finite norms
    and losses ≤ 0 or NaN. AutoClip's window on the host gives the device's thresholds bit for bit."""
    ps = params_with_grads(0)
    host, device = bound(name, ps), bound(name, ps)
    taus = []
    exact = name.startswith("autoclip")
    for norm, loss in norms_and_losses(1):
        a, b = tau_of(host, norm, loss, device_path=False), tau_of(device, norm, loss, device_path=True)
        assert not exact or (math.isnan(a) and math.isnan(b)) or a == b
        assert_same_numbers(a, b)
        taus.append(a)
    clipped = sum(math.isfinite(t) for t in taus)
    assert clipped >= (
        3 if name.startswith("zclip") else 20
    )  # the rules bind: the comparison means something
    assert not exact or len(set(taus)) > 10  # the percentile moves
    ha, da = host.state_dict(), device.state_dict()
    assert ha.keys() == da.keys()
    for k in ha:
        if isinstance(ha[k], torch.Tensor):
            for x, y in zip(ha[k].reshape(-1).tolist(), da[k].reshape(-1).tolist()):
                assert_same_numbers(x, y)
        else:
            assert ha[k] == da[k], k


class _DeviceOps(TorchDispatchMode):
    """The ops that launch a kernel (no views, no host reads, no tensor made from a number)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not func.is_view and name not in (
            "aten.detach.default",
            "aten.lift_fresh.default",
            "aten._local_scalar_dense.default",
        ):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["zclip", "auto-sgd", "auto-sgd-tensor-lr", "auto-adamw", "autoclip"])
def test_on_a_cpu_norm_a_step_of_the_rules_issues_one_op(name):
    """The point of the host floats: one op a step on the CPU, the threshold made from the host
    number (the pinned device path of the same step issues 20-35)."""
    ps = params_with_grads(0)
    clipper = bound(name, ps)
    for norm, loss in norms_and_losses(2, 30):
        tau_of(clipper, norm, loss, device_path=False)
    norm, loss = torch.tensor(1.5), torch.tensor(2.0)
    with _DeviceOps() as ops:
        clipper.observe_loss(loss)
        clipper.threshold(norm)
    # the threshold made from the host number (AutoClip's: the lerp of the two values picked)
    assert ops.names == (["aten.lerp.Tensor"] if name == "autoclip" else ["aten.scalar_tensor.default"])
    C._PIN_DEVICE_PATH = True
    try:
        with _DeviceOps() as pinned:
            clipper.observe_loss(loss)
            clipper.threshold(norm)
    finally:
        C._PIN_DEVICE_PATH = False
    assert len(pinned.names) >= 10


@pytest.mark.parametrize("name", ["zclip", "auto-sgd", "auto-trust", "autoclip-window-7"])
def test_the_state_moves_between_host_floats_and_device_tensors_without_a_change(name):
    """Host steps, device steps, a save and a load in between, ``mean`` read on the way: the same
    thresholds and final state as a run on the device path alone."""
    ps = params_with_grads(3)
    mixed, device = bound(name, ps), bound(name, ps)
    for i, (norm, loss) in enumerate(norms_and_losses(4, 60)):
        on_device = (i // 7) % 2 == 1  # 7 steps on the host, 7 on the device, …
        assert_same_numbers(
            tau_of(mixed, norm, loss, device_path=on_device), tau_of(device, norm, loss, device_path=True)
        )
        if i == 30:  # saved while held on the host (a host step just ran), loaded into a fresh clipper
            state = mixed.state_dict()
            mixed = bound(name, ps)
            mixed.load_state_dict(state)
        if i == 40 and isinstance(mixed, C.ZClip) and isinstance(device, C.ZClip):
            assert_same_numbers(float(mixed.mean), float(device.mean))
    ms, ds = mixed.state_dict(), device.state_dict()
    for key in ("stats", "history", "count"):
        if key in ms:
            for x, y in zip(ms[key].reshape(-1).tolist(), ds[key].reshape(-1).tolist()):
                assert_same_numbers(x, y)


def test_in_a_compiled_region_the_rules_take_the_device_path():
    """Inside ``torch.compile`` a host read would break the graph: the rule runs on tensors there, and
    its thresholds are the eager (host) ones."""
    torch._dynamo.reset()
    ps = params_with_grads(5)
    eager, compiled = bound("auto-sgd", ps), bound("auto-sgd", ps)
    seen: list[bool] = []

    def threshold(c: C.NormClipper, norm: torch.Tensor) -> torch.Tensor:
        seen.append(C._reads_on_host(norm))  # (run while tracing)
        return c.threshold(norm)

    step = torch.compile(threshold, backend="eager")
    for norm, loss in norms_and_losses(6, 30):
        for c in (eager, compiled):
            c.observe_loss(torch.tensor(loss))
        a = float(threshold(eager, torch.tensor(norm)))
        b = float(step(compiled, torch.tensor(norm)))
        assert_same_numbers(a, b)
    assert seen[0] is True and False in seen  # eager on the host; traced: the device path
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: C.HostZClip(0.0), r"z_thresh must be > 0, got 0\.0"),
        (lambda: C.HostZClip(-1.0), r"z_thresh must be a finite number ≥ 0"),
        (lambda: C.HostZClip(2.5, alpha=1.0), r"alpha must be in \(0, 1\)"),
        (lambda: C.HostZClip(2.5, warmup=0), r"warmup must be a positive int"),
        (lambda: C.HostZClip(2.5, eps=math.nan), r"eps must be a finite number"),
    ],
)
def test_host_zclip_bad_options(make, match):
    with pytest.raises(GradGuardError, match=match):
        make()


def test_the_host_arithmetic_takes_minima_and_quotients_as_torch_does():
    """NaN wins a minimum (as ``torch.minimum``); x/0 is ±inf or NaN (as ``torch.div``)."""
    specials = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1.5, -2.0]
    for a in specials:
        for b in specials:
            t = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
            for got, want in (
                (C._FloatArith.minimum(a, b), torch.minimum(*t)),
                (C._FloatArith.div(a, b), torch.div(*t)),
            ):
                assert (math.isnan(got) and bool(want.isnan())) or got == float(want), (a, b)


def test_autoclip_on_the_host_rounds_a_float64_norm_to_float32_as_the_device_path():
    """A float64 norm enters the window as float32 (one beyond float32's range is inf there: not
    counted) — on the host as on the device, bit for bit."""
    norms = [1.0 + 1e-9 * i for i in range(12)] + [3.3e38, 3.5e38, 1e39, 2.0, math.nan, 0.7]
    host, device = C.AutoClip(percentile=50, window=8), C.AutoClip(percentile=50, window=8)
    for v in norms:
        C._PIN_DEVICE_PATH = True
        try:
            want = float(device.threshold(torch.tensor(v, dtype=torch.float64)))
        finally:
            C._PIN_DEVICE_PATH = False
        got = float(host.threshold(torch.tensor(v, dtype=torch.float64)))
        assert (math.isnan(got) and math.isnan(want)) or got == want, v
    assert host.state_dict()["count"] == device.state_dict()["count"] == len(norms) - 3  # 3.5e38, 1e39, NaN


def test_a_threshold_beyond_float32s_range_is_inf_on_the_host_as_on_the_device():
    """The float64 rule can give a finite τ above float32's largest (a Polyak cap over a tiny norm, ZClip
    over float64 norms): the threshold is then inf on both paths (the host once refused to make it)."""
    for device_path in (False, True):
        ps = params_with_grads(0)
        auto = bound("auto-sgd", ps)
        assert tau_of(auto, 1e-39, 1.0, device_path=device_path) == math.inf  # 0.5·1/(0.3·1e-39) > 3.4e38
        zclip = C.ZClip(warmup=3)
        C._PIN_DEVICE_PATH = device_path
        try:
            got = [
                float(zclip.threshold(torch.tensor(v, dtype=torch.float64)))
                for v in (1e39, 1.1e39, 0.9e39, 1e42)
            ]
        finally:
            C._PIN_DEVICE_PATH = False
        assert got == [math.inf] * 4, (device_path, got)


def test_a_loaded_zclip_state_out_of_range_is_clamped_on_both_paths():
    """A saved state with a negative mean, a negative or NaN count: clamped at load (a mean ≥ 0, a count
    in [0, warmup], NaN → 0), so the host path (which would index the table from its end) and the
    device path (which would fail) both run it, with the same thresholds."""
    for stats in ([-1.0, 2.0, -3.0], [1.0, 0.5, math.nan], [1.0, 0.25, 99.0]):
        taus = []
        for device_path in (False, True):
            z = C.ZClip(warmup=3)
            state = z.state_dict() | {"stats": torch.tensor(stats, dtype=torch.float64)}
            z.load_state_dict(state)
            loaded = z.state_dict()["stats"].tolist()
            assert loaded[0] >= 0 and 0 <= loaded[2] <= 3, loaded
            taus.append([tau_of(z, v, 1.0, device_path=device_path) for v in (1.0, 1.2, 9.0, 1.1)])
        assert taus[0] == taus[1], stats
