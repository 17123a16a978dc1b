"""Tests of gradguard.stats: oracles (torch, float64 loops), faults, no host sync, and the NoSync helper."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguard.stats as S
from gradguard.errors import GradGuardError
from nosync import HostSyncError, NoSync

NORM_TYPES = [2.0, 1.0, math.inf, 0.5, 3.0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# relative tolerance of a norm against an exact float64 reference, by gradient dtype
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# ... and against torch, which rounds float16/bfloat16 norms to the gradient dtype
TORCH_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FAST = settings(max_examples=40, deadline=None)

shapes = st.lists(st.lists(st.integers(0, 5), max_size=3), max_size=6)


def make(shape_list, dtype, seed, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype).to(device) for s in shape_list
    ]


def ref_norm(t: torch.Tensor, p: float) -> float:
    """Exact p-norm in float64; 0 for an empty tensor (for inf too)."""
    if t.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(t.to(torch.float64), p))


def ref_total(norms: list[float], p: float) -> float:
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.tensor(norms, dtype=torch.float64), p))


def close(a: float, b: float, rtol: float, atol: float = 1e-30) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= atol + rtol * abs(b)


def params_with_grads(shape_list, dtype, seed, none_every=0, scale=1.0):
    grads = make(shape_list, dtype, seed, scale)
    params = []
    for i, g in enumerate(grads):
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=dtype))
        if not (none_every and i % none_every == 0):
            p.grad = g
        params.append(p)
    return params


# ----------------------------------------------------------------------------- oracles
@FAST
@given(
    shape_list=shapes,
    dtype=st.sampled_from(DTYPES),
    p=st.sampled_from(NORM_TYPES),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    foreach=st.sampled_from([None, False]),
)
def test_tensor_norms_match_float64_reference(shape_list, dtype, p, seed, scale, foreach):
    ts = make(shape_list, dtype, seed, scale)
    got = S.tensor_norms(ts, p, foreach=foreach)
    assert got.shape == (len(ts),)
    assert got.dtype == (torch.float64 if dtype == torch.float64 and ts else torch.float32)
    for g, t in zip(got.tolist(), ts):
        assert close(g, ref_norm(t, p), RTOL[dtype]), (g, ref_norm(t, p), t.shape)


@FAST
@given(
    shape_list=shapes,
    dtype=st.sampled_from(DTYPES),
    p=st.sampled_from(NORM_TYPES),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    none_every=st.sampled_from([0, 2, 3]),
    form=st.sampled_from(["list", "generator"]),
)
def test_grad_stats_matches_torch_get_total_norm(shape_list, dtype, p, seed, scale, none_every, form):
    params = params_with_grads(shape_list, dtype, seed, none_every, scale)
    grads = [q.grad for q in params if q.grad is not None]
    stats = S.grad_stats(params if form == "list" else (q for q in params), p)
    assert stats.norm_type == p
    assert stats.norms.shape == (len(grads),)
    # torch refuses the inf norm of an empty tensor; an empty tensor adds nothing to any p-norm
    want = torch.nn.utils.get_total_norm([g for g in grads if g.numel() > 0], p)
    if math.isfinite(float(want)):
        assert close(float(stats.total), float(want), TORCH_RTOL[dtype], atol=1e-6), (stats.total, want)
    exact = ref_total([ref_norm(g, p) for g in grads], p)
    assert close(float(stats.total), exact, RTOL[dtype] * 10), (stats.total, exact)
    assert close(float(S.total_norm(stats.norms, p)), float(stats.total), 0.0)
    assert not bool(stats.nonfinite) and not bool(stats.any_nan)
    assert not stats.nan.any() and not stats.inf.any()


@pytest.mark.parametrize("p", NORM_TYPES)
def test_single_tensor_and_no_grads(p):
    w = torch.nn.Parameter(torch.ones(3, 4))
    empty = S.grad_stats(w, p)  # no gradient at all: torch gives 0
    assert empty.norms.numel() == 0 and float(empty.total) == 0.0
    assert float(torch.nn.utils.get_total_norm([], p)) == 0.0
    w.grad = torch.full((3, 4), 2.0)
    one = S.grad_stats(w, p)
    assert close(float(one.total), float(torch.nn.utils.get_total_norm(w.grad, p)), 1e-6)
    assert S.grad_stats([], p).norms.numel() == 0
    assert S.tensor_norms([], p).shape == (0,)
    assert float(S.total_norm(torch.zeros(0), p)) == 0.0


@pytest.mark.parametrize("p", NORM_TYPES)
def test_zero_size_tensors_have_norm_zero(p):
    ts = [torch.randn(3), torch.empty(0), torch.empty(2, 0, dtype=torch.float16), torch.randn(2, 2)]
    got = S.tensor_norms(ts, p).tolist()
    assert got[1] == 0.0 and got[2] == 0.0
    assert close(got[0], ref_norm(ts[0], p), 1e-6) and close(got[3], ref_norm(ts[3], p), 1e-6)
    assert S.exact_norms(ts, p).tolist()[1:3] == [0.0, 0.0]
    assert S.tensor_norms([torch.empty(0)], p).tolist() == [0.0]


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("foreach", [None, False])
def test_mixed_dtypes_keep_input_order(p, foreach):
    dtypes = [torch.float16, torch.float64, torch.float32, torch.bfloat16, torch.float32, torch.float16]
    ts = [(torch.arange(1.0, 2.0 + i) * (i + 1)).to(dt) for i, dt in enumerate(dtypes)]
    ts.insert(3, torch.empty(0, dtype=torch.float32))  # an empty tensor in a group (the inf path)
    got = S.tensor_norms(ts, p, foreach=foreach)
    assert got.dtype == torch.float64
    for g, t in zip(got.tolist(), ts):
        assert close(g, ref_norm(t, p), 1e-6), (g, ref_norm(t, p), t.dtype)
    no64 = [t for t in ts if t.dtype != torch.float64]
    assert S.tensor_norms(no64, p).dtype == torch.float32


def test_foreach_and_loop_agree():
    ts = make([[3, 4], [5], [], [2, 2, 2]], torch.float32, 0)
    for p in NORM_TYPES:
        torch.testing.assert_close(S.tensor_norms(ts, p, foreach=True), S.tensor_norms(ts, p, foreach=False))


# ----------------------------------------------------------------------------- faults
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORM_TYPES)
def test_one_nonfinite_element_is_flagged_in_its_tensor_only(bad, dtype, p):
    params = params_with_grads([[4, 3], [5], [2, 2]], dtype, 1)
    params[1].grad[2] = bad
    st_ = S.grad_stats(params, p)
    norms = st_.norms.tolist()
    assert math.isfinite(norms[0]) and math.isfinite(norms[2])
    if math.isnan(bad):
        assert math.isnan(norms[1]) and math.isnan(float(st_.total))
        assert st_.nan.tolist() == [False, True, False] and bool(st_.any_nan)
    else:
        assert norms[1] == math.inf and float(st_.total) == math.inf
        assert st_.inf.tolist() == [False, True, False] and not bool(st_.any_nan)
    assert bool(st_.nonfinite)


def test_float16_norm_above_65504_is_measured():
    g = torch.full((100,), 1e4, dtype=torch.float16)  # norm 1e5 > float16 max
    assert float(torch.nn.utils.get_total_norm([g])) == math.inf  # why gradguard accumulates in fp32
    (n,) = S.tensor_norms([g]).tolist()
    assert n == pytest.approx(1e5, rel=1e-6)
    st_ = S.grad_stats(torch.nn.Parameter(torch.zeros(100, dtype=torch.float16)), 2.0)
    assert float(st_.total) == 0.0
    many = [torch.full((100,), 6e4, dtype=torch.float16) for _ in range(50)]
    total = float(S.total_norm(S.tensor_norms(many)))
    assert total == pytest.approx(float(6e4 * 10 * math.sqrt(50)), rel=1e-3)  # 6e4 rounds in fp16


def test_total_of_many_large_finite_norms_does_not_overflow():
    many = [torch.tensor([1e19, -1e19]) for _ in range(10)]  # each norm finite in float32
    norms = S.tensor_norms(many)
    assert torch.isfinite(norms).all()
    assert float(S.total_norm(norms)) == pytest.approx(math.sqrt(20) * 1e19, rel=1e-6)
    assert float(torch.nn.utils.get_total_norm(many)) == math.inf  # torch's float32 total overflows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_overflow_is_inf_one_pass_and_exact_in_exact_norms(dtype):
    t = torch.ones(10, dtype=dtype)
    t[3] = 1e30
    assert S.tensor_norms([t]).tolist() == [math.inf]  # the documented one-pass limit
    want = math.sqrt(float(t[3].double()) ** 2 + 9)
    for p in [2.0, 1.0, 3.0]:
        (got,) = S.exact_norms([t], p).tolist()
        assert math.isfinite(got) and got == pytest.approx(float(t[3].double()), rel=1e-6)
    assert S.exact_norms([t]).tolist()[0] == pytest.approx(want, rel=1e-12)
    assert S.exact_norms([t], math.inf).tolist() == [float(t[3].double())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [None, False])
def test_wide_norms_measure_float32_overflow_in_one_read(dtype, foreach):
    t = torch.ones(10, dtype=dtype)
    t[3] = 1e30 if dtype != torch.float16 else 6e4
    for p in [2.0, 1.0, 3.0, 0.5, math.inf]:
        (got,) = S.tensor_norms([t], p, foreach=foreach, wide=True).tolist()
        assert got == pytest.approx(ref_norm(t, p), rel=1e-6), p
    assert S.tensor_norms([t], wide=True).dtype == torch.float32  # same dtype as the narrow path
    with NoSync(watch=[t]) as ns:
        S.tensor_norms([t], foreach=foreach, wide=True)
    assert ns.reads == [1], ns.read_ops  # one read: no second pass
    inf = torch.tensor([1.0, math.inf, 1e30])
    nan = torch.tensor([1.0, math.nan, 1e30])
    got = S.tensor_norms([inf, nan], wide=True).tolist()  # a real inf or NaN stays what it is
    assert got[0] == math.inf and math.isnan(got[1])


def test_wide_norms_beyond_float32_range_are_inf():
    t = torch.full((4,), 3e38)  # finite elements, but the norm itself (6e38) is beyond float32
    assert S.tensor_norms([t], wide=True).tolist() == [math.inf]
    assert S.tensor_norms([t.double()], wide=True).tolist()[0] == pytest.approx(6e38)


@FAST
@given(
    shape_list=shapes,
    dtype=st.sampled_from(DTYPES),
    p=st.sampled_from(NORM_TYPES),
    seed=st.integers(0, 2**31 - 1),
    foreach=st.sampled_from([None, False]),
)
def test_wide_norms_match_float64_reference(shape_list, dtype, p, seed, foreach):
    ts = make(shape_list, dtype, seed)
    got = S.tensor_norms(ts, p, foreach=foreach, wide=True)
    assert got.dtype == (torch.float64 if dtype == torch.float64 and ts else torch.float32)
    for g, t in zip(got.tolist(), ts):
        assert close(g, ref_norm(t, p), RTOL[dtype]), (g, ref_norm(t, p), t.shape)


def test_exact_norms_float64_beyond_squared_range():
    t = torch.tensor([1e200, -1e200, 3.0], dtype=torch.float64)
    assert S.tensor_norms([t]).tolist() == [math.inf]
    assert S.exact_norms([t]).tolist()[0] == pytest.approx(math.sqrt(2) * 1e200, rel=1e-12)


@FAST
@given(
    shape_list=shapes,
    dtype=st.sampled_from(DTYPES),
    p=st.sampled_from(NORM_TYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_exact_norms_match_float64_reference(shape_list, dtype, p, seed):
    ts = make(shape_list, dtype, seed)
    got = S.exact_norms(ts, p)
    assert got.dtype == torch.float64
    for g, t in zip(got.tolist(), ts):
        assert close(g, ref_norm(t, p), 1e-9), (g, ref_norm(t, p))


@pytest.mark.parametrize("p", NORM_TYPES)
def test_exact_norms_keep_real_nonfinite(p):
    a = torch.tensor([1.0, math.inf, 2.0])
    b = torch.tensor([1.0, math.nan, 2.0])
    c = torch.tensor([-math.inf, 1e30])
    d = torch.zeros(3)
    got = S.exact_norms([a, b, c, d], p).tolist()
    assert got[0] == math.inf and math.isnan(got[1]) and got[2] == math.inf and got[3] == 0.0


# ----------------------------------------------------------------------------- layers, ratios
def loop_layer_norms(names, norms, p, present=None):
    rows = present if present is not None else range(len(names))
    layers = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
    out = {name: [] for name in layers}
    for norm, i in zip(norms, rows):
        out[names[i].rpartition(".")[0]].append(norm)
    return [ref_total(out[name], p) for name in layers]


@pytest.mark.parametrize("p", NORM_TYPES)
def test_layer_index_matches_loop(p):
    names = ["enc.0.weight", "enc.0.bias", "enc.1.weight", "head.weight", "enc.0.extra", "scale"]
    idx = S.LayerIndex(names)
    assert idx.layers == ["enc.0", "enc.1", "head", ""]
    norms = [3.0, 4.0, 1.0, 2.0, 12.0, 7.0]
    got = idx.reduce(torch.tensor(norms), p).tolist()
    for g, w in zip(got, loop_layer_norms(names, norms, p)):
        assert close(g, w, 1e-6)
    present = [1, 3, 4]
    got = idx.reduce(torch.tensor([4.0, 2.0, 12.0]), p, present).tolist()
    want = loop_layer_norms(names, [4.0, 2.0, 12.0], p, present)
    assert [close(g, w, 1e-6) for g, w in zip(got, want)] == [True] * 4
    assert got[1] == 0.0 and got[3] == 0.0  # layers without a gradient


def test_layer_index_empty_present_does_not_shadow_all():
    idx = S.LayerIndex(["a.w", "b.w"])
    assert idx.reduce(torch.zeros(0), 2.0, present=[]).tolist() == [0.0, 0.0]
    assert idx.reduce(torch.tensor([3.0, 4.0])).tolist() == [3.0, 4.0]


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_layer_index_nonfinite(p):
    idx = S.LayerIndex(["a.w", "a.b", "b.w"])
    got = idx.reduce(torch.tensor([1.0, math.nan, 2.0]), p).tolist()
    assert math.isnan(got[0]) and got[1] == 2.0
    got = idx.reduce(torch.tensor([math.inf, 1.0, 2.0]), p).tolist()
    assert got == [math.inf, 2.0]


def test_layer_name_and_update_ratios():
    assert S.layer_name("encoder.0.weight") == "encoder.0"
    assert S.layer_name("bias") == ""
    r = S.update_ratios(torch.tensor([1.0, 2.0, 1e-6]), torch.tensor([10.0, 0.0, 1.0]))
    assert r.tolist() == pytest.approx([0.1, 2.0 / 1e-12, 1e-6])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [0, -1.0, math.nan, -math.inf, "fro", None, "two"])
def test_bad_norm_type(bad):
    with pytest.raises(GradGuardError, match=r"norm_type .*Use 2\.0"):
        S.check_norm_type(bad)
    with pytest.raises(GradGuardError, match="norm_type"):
        S.grad_stats([torch.nn.Parameter(torch.ones(2))], bad)
    with pytest.raises(GradGuardError, match="norm_type"):
        S.tensor_norms([torch.ones(2)], bad)


def test_check_norm_type_accepts_numbers_and_inf():
    assert S.check_norm_type(2) == 2.0
    assert S.check_norm_type("inf") == math.inf
    assert S.check_norm_type(0.5) == 0.5


def test_mixed_devices_are_refused():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2, device="meta"))
    a.grad, b.grad = torch.ones(2), torch.ones(2, device="meta")
    with pytest.raises(GradGuardError, match=r"several devices.*'cpu'.*'meta'.*Call it once per device"):
        S.grad_stats([a, b])
    with pytest.raises(GradGuardError, match="several devices"):
        S.tensor_norms([a.grad, b.grad])


def test_sparse_grads_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse
    with pytest.raises(
        GradGuardError, match=r"sparse_coo gradient of shape \(10, 3\).*to_dense\(\).*sparse=False"
    ):
        S.grad_stats(emb.parameters())


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_tensors_are_refused_naming_shape_dtype_and_fix(dtype):
    w = torch.nn.Parameter(torch.ones(2, 3, dtype=dtype))
    w.grad = torch.ones(2, 3, dtype=dtype)
    match = rf"complex gradient of shape \(2, 3\) and dtype {dtype}.*real.*view_as_real.*clip_grad_norm_"
    with pytest.raises(GradGuardError, match=match):
        S.grad_stats([w])
    with pytest.raises(GradGuardError, match=r"complex parameter of shape \(2, 3\)"):
        S.check_tensors([w], what="parameter")
    with pytest.raises(GradGuardError, match=r"complex tensor of shape \(2, 3\)"):
        S.check_tensors([torch.ones(2), w.grad])


def test_integer_tensors_are_refused():
    with pytest.raises(GradGuardError, match=r"tensor of shape \(3,\) and dtype torch.int64.*\.float\(\)"):
        S.check_tensors([torch.arange(3)])


# ----------------------------------------------------------------------------- no host sync
def meta_params(dtypes=(torch.float32, torch.float16, torch.float64, torch.bfloat16)):
    params = []
    for i, dt in enumerate(dtypes):
        p = torch.nn.Parameter(torch.empty(3, i + 2, device="meta", dtype=dt))
        p.grad = torch.empty(3, i + 2, device="meta", dtype=dt)
        params.append(p)
    return params


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("foreach", [None, False])
def test_every_stats_function_runs_on_meta(p, foreach):
    params = meta_params()
    grads = [q.grad for q in params]
    with NoSync(watch=grads) as ns:
        norms = S.tensor_norms(grads, p, foreach=foreach)
        total = S.total_norm(norms, p)
        gs = S.grad_stats(params, p, foreach=foreach)
        flags = [gs.nan, gs.inf, gs.nonfinite, gs.any_nan]
        ex = S.exact_norms(grads, p)
        idx = S.LayerIndex(["a.w", "a.b", "b.w", "c.w"])
        layers = idx.reduce(norms, p)
        some = idx.reduce(norms[:2], p, present=[1, 3])
        ratios = S.update_ratios(norms, norms)
    for t in [norms, total, gs.norms, gs.total, *flags, ex, layers, some, ratios]:
        assert t.device.type == "meta"
    assert norms.shape == (4,) and layers.shape == (3,) and some.shape == (3,)
    assert ns.h2d == []


def test_grad_stats_reads_each_gradient_once():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model[0].half()
    model[2].double()
    for q in model.parameters():  # three dtype groups
        q.grad = torch.randn_like(q)
    grads = [q.grad for q in model.parameters()]
    for foreach in [None, False]:
        with NoSync(watch=grads) as ns:
            S.grad_stats(model.parameters(), foreach=foreach)
        assert ns.reads == [1] * len(grads), ns.read_ops
        assert ns.writes == [0] * len(grads)
        assert ns.h2d == []
    with NoSync(watch=grads) as ns:
        S.exact_norms(grads)
    assert all(r >= 2 for r in ns.reads)  # the thorough path pays extra reads, by design


# ----------------------------------------------------------------------------- the NoSync helper
@pytest.mark.parametrize(
    "host_read",
    [
        lambda t: t.sum().item(),
        lambda t: float(t.sum()),
        lambda t: int(t.sum()),
        lambda t: bool(t.sum() > 0),
        lambda t: torch.equal(t, t),
        lambda t: t.nonzero(),
        lambda t: t[t > 0],
        lambda t: torch.unique(t),
        lambda t: t.masked_select(t > 0),
        lambda t: t.to("meta").cpu(),
        lambda t: t.allclose(t),
    ],
)
def test_nosync_refuses_host_reads(host_read):
    t = torch.randn(5)
    with pytest.raises(HostSyncError), NoSync():
        host_read(t)


def test_nosync_reports_a_swallowed_sync_and_allows_a_named_one():
    t = torch.randn(3)
    with pytest.raises(HostSyncError, match="swallowed"), NoSync(), contextlib.suppress(Exception):
        t.sum().item()
    with NoSync() as ns, ns.allow():
        assert float(t.sum()) == pytest.approx(float(t.sum()))
    assert ns.syncs == []


def test_nosync_records_or_refuses_host_to_device_copies():
    with NoSync() as ns:
        torch.ones(3).to("meta")
        torch.ones(3) + 1  # CPU work is no copy
    assert len(ns.h2d) == 1 and "cpu -> meta" in ns.h2d[0]
    with pytest.raises(HostSyncError, match="host-to-device"), NoSync(h2d="raise"):
        torch.ones(3).to("meta")


def test_nosync_counts_reads_and_writes_per_tensor_views_included():
    a, b, c = torch.randn(4, 3), torch.randn(3), torch.randn(2)
    out = torch.empty(3)
    with NoSync(watch=[a, b, c, out]) as ns:
        v = a[1:]  # a view: no data moved, not counted
        v.t().sum()  # read of a through a view
        torch._foreach_mul_([a, b], 2.0)  # one op reading and writing both
        torch.add(b, 1.0, out=out)  # out= is written, not read
        b.detach().view(3, 1)
    assert ns.reads == [2, 2, 0, 0], ns.read_ops
    assert ns.writes == [1, 1, 0, 1]
    assert ns.read_ops[0] == ["aten.sum.default", "aten._foreach_mul_.Scalar"]
    ns.reset()
    assert ns.reads == [0, 0, 0, 0] and ns.writes == [0, 0, 0, 0]


def test_nosync_on_meta_tensors():
    m = torch.empty(4, device="meta")
    with NoSync(watch=[m]) as ns:
        (m * 2).sum()
    assert ns.reads == [1]
    with pytest.raises(HostSyncError), NoSync():
        bool((m > 0).any())
