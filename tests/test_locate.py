"""The fault corpus (tests/faults/*.py): plain training scripts, each failing on torch 2.13 without
gradguard, each located correctly (phase, module, op, kind) with no change to the script."""

from __future__ import annotations

import ast
import contextlib
import math
import runpy
import warnings
from pathlib import Path

import pytest
import torch

import gradguard
from gradguard.diagnose import first_nonfinite
from gradguard.errors import NonFiniteError
from gradguard.integrations.zerocode import ZeroCode

FAULTS = sorted((Path(__file__).parent / "faults").glob("*.py"))


def expected_of(script: Path) -> dict:
    """The script's ``EXPECTED = {...}`` (read, not run)."""
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXPECTED":
            return ast.literal_eval(node.value)
    raise AssertionError(f"{script.name} has no EXPECTED")


def run_plain(script: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return runpy.run_path(str(script), run_name="__main__")


@pytest.mark.parametrize("script", FAULTS, ids=[p.stem for p in FAULTS])
def test_the_script_really_fails_without_gradguard(script: Path) -> None:
    g = run_plain(script)
    loss = g["loss"]
    params = list(g["model"].parameters())
    assert not math.isfinite(float(loss.detach())) or not all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("script", FAULTS, ids=[p.stem for p in FAULTS])
def test_the_first_nonfinite_value_is_located(script: Path, tmp_path: Path) -> None:
    expected = expected_of(script)
    with contextlib.suppress(NonFiniteError), ZeroCode(out=tmp_path / "run", name=script.stem, every=10):
        run_plain(script)  # an explosion ends in NonFiniteError: every later step is skipped
    event = first_nonfinite(tmp_path / "run")  # the root and every optimizer's child run
    assert event is not None
    got = {k: event.get(k) for k in expected}
    assert got == expected, event


# ----------------------------------------------------------------------------- replay leaves no trace
class _Feat(torch.nn.Module):
    def forward(self, x):
        return torch.log(x.abs())  # log(0) = -inf when a feature is exactly 0


def _bn_dropout_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(16, 16),
        _Feat(),
        torch.nn.Linear(16, 1),
    )


def _train(
    locate: bool, closure_form: bool, steps: int = 8, bad: int = 4
) -> tuple[dict, dict, torch.Tensor, list]:
    model = _bn_dropout_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    guard = gradguard.Guard(model, opt, clip="norm:1", locate=locate, every=100)
    events = []
    guard._event = events.append  # type: ignore[method-assign]  # keep the events in memory
    torch.manual_seed(123)
    for step in range(steps):
        x = torch.randn(16, 6)
        y = torch.randn(16, 1)
        if step == bad:
            with torch.no_grad():  # a batch on which the first layer's unit 3 outputs exactly 0 ...
                model[3].weight[3].zero_()
                model[3].bias[3] = 0.0

        def closure(x=x, y=y):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        if closure_form:
            guard.step(closure)
        else:
            guard.step(closure())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(opt.state.values())}
    return state, opt_state, torch.get_rng_state(), events


@pytest.mark.parametrize("closure_form", [True, False], ids=["closure", "captured-inputs"])
def test_replay_leaves_no_trace_with_dropout_and_batchnorm(closure_form: bool) -> None:
    """Parameters, BatchNorm buffers, optimizer state and the RNG stream equal a run without replay."""
    with_replay = _train(locate=True, closure_form=closure_form)
    without = _train(locate=False, closure_form=closure_form)
    for k in without[0]:
        assert torch.equal(with_replay[0][k], without[0][k]), k
    for i in without[1]:
        for k in without[1][i]:
            assert torch.equal(with_replay[1][i][k], without[1][i][k])
    assert torch.equal(with_replay[2], without[2])  # the RNG stream is where it would have been
    located = [e for e in with_replay[3] if e.get("type") == "nonfinite"]
    assert located and located[0]["located_by"] == "replay" and located[0]["step"] == 4
    assert (located[0]["phase"], located[0]["module"], located[0]["op"], located[0]["kind"]) == (
        "forward", "4", "log", "-inf",
    )  # fmt: skip
    assert all(e.get("located_by") == "norm" for e in without[3] if e.get("type") == "nonfinite")


def test_locate_context_manager_names_op_module_and_line() -> None:
    model = _bn_dropout_model().eval()
    with torch.no_grad():
        model[3].weight[5].zero_()
        model[3].bias[5] = 0.0
    with gradguard.locate(model) as loc:
        loss = model(torch.randn(4, 6)).sum()
        loss.backward()
    event = loc.event
    assert event is not None
    assert (event["phase"], event["module"], event["op"], event["kind"]) == ("forward", "4", "log", "-inf")
    assert event["source"].endswith("test_locate.py:" + str(_Feat.forward.__code__.co_firstlineno + 1))
    assert event["evidence"]["reason"] == "log of 0"


class _Held(torch.nn.Module):
    """A forward reading a tensor it did not make: a buffer, a plain attribute, or a NaN number."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.b, self.how = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1), how
        self.register_buffer("scale", torch.ones(8))
        self.shift = torch.zeros(8)  # a plain attribute, not a buffer
        if how == "buffer":
            self.scale[3] = float("nan")
        elif how == "attribute":
            self.shift[2] = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) * self.scale + self.shift
        if self.how == "number":
            h = h + float("nan")  # a NaN number the code wrote (never a mask: those are ±inf)
        return self.b(torch.relu(h))


@pytest.mark.parametrize(
    ("how", "tensor", "op", "said"),
    [
        ("buffer", "buffer", None, "the buffer scale already held nan"),
        ("attribute", "state", None, "a tensor the forward did not make already held nan"),
        ("number", "output", "add", "add was given a NaN number by the code"),
    ],
)
def test_a_nan_the_forward_read_but_did_not_make_is_located_in_the_forward(
    how: str, tensor: str, op: str | None, said: str
) -> None:
    """The model's output was NaN, yet the answer was "a NaN was already in the input (in backward: the
    forward was finite)" in the next module's backward: a NaN that enters through a buffer, a plain
    tensor attribute or a NaN number is the forward's, named."""
    model = _Held(how)
    with gradguard.locate(model) as loc:
        model(torch.randn(3, 4)).sum().backward()
    event = loc.event
    assert event is not None and (event["phase"], event["tensor"], event["op"]) == ("forward", tensor, op), (
        event
    )
    assert said in event["evidence"]["reason"]
    assert "forward was finite" not in event["evidence"]["reason"]


def test_without_a_replayable_backward_the_next_forward_is_instrumented() -> None:
    """No gradient of the output kept (a huge output): the failed step cannot replay its backward, so
    the guard instruments the model's next forward; the fault recurs there and is located by hooks."""
    from gradguard.locate import StepCapture

    class Dist(torch.nn.Module):
        def forward(self, d):
            return (d * d).sum(-1) ** 0.5  # infinite derivative at 0

    model = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), Dist())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, capture=StepCapture(model, max_output=0), every=100)
    events = []
    guard._event = events.append  # type: ignore[method-assign]
    x = torch.randn(4, 3)
    x[0] = 0.0  # a sample at the origin, in every batch
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = model(x).sum()
        loss.backward()
        guard.step(loss)
    guard.close()
    nonfinite = [e for e in events if e.get("type") == "nonfinite"]
    hooks = [e for e in nonfinite if e["located_by"] == "hooks"]
    assert nonfinite[0]["step"] == 0 and nonfinite[0]["located_by"] == "norm"
    assert hooks and hooks[0]["step"] == 0 and hooks[0]["seen_at_step"] == 1
    assert (hooks[0]["phase"], hooks[0]["module"], hooks[0]["op"]) == ("backward", "1", "pow")
    assert torch._C._len_torch_function_stack() == 0  # the instrumentation never outlives its forward


def test_a_loss_code_failure_that_recurs_steps_later_is_located_by_the_window_kept_on(tmp_path: Path) -> None:
    """Guard in code, a loss code that divides by 0 on every 7th batch (a bf16 `log(1 - sigmoid)` fails
    every 10-15 steps): the model replays clean, so the loss code's window is armed; the next step is
    clean, and a window of one step never saw the op (6 skipped steps read "a lone non-finite step")."""
    from gradguard.diagnose import diagnose

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gradguard.Guard(model, opt, on_nonfinite="skip", log_dir=tmp_path / "r", every=4)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    for step in range(30):
        opt.zero_grad(set_to_none=True)
        spread = y.std() * float(step % 7 != 3)  # 0 on steps 3, 10, 17, 24
        loss = ((model(x) - y) ** 2).mean() / spread
        loss.backward()
        guard.step(loss)
    guard.close()
    findings = diagnose(tmp_path / "r", write=False)
    op = next(f for f in findings if f.id == "nonfinite_op")
    assert op.step == 10 and op.evidence["op"] == "div", op.evidence  # (located at the step it recurred at)
    assert "bad_data" not in [f.id for f in findings]
    assert torch._C._len_torch_function_stack() == 0


def test_a_target_whose_logit_was_masked_to_minus_inf_is_the_cross_entropys_birth() -> None:
    """Rare tokens masked to -inf in the output, yet kept as targets: the loss is +inf. The -inf was written
    on purpose, so nothing was "born" and the verdict read "gradguard run could not replay this step"."""

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = torch.nn.Linear(8, 20)
            allowed = torch.ones(20, dtype=torch.bool)
            allowed[15:] = False
            self.register_buffer("allowed", allowed)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(x).masked_fill(~self.allowed, float("-inf"))

    model = LM()
    with gradguard.locate(model) as loc:
        loss = torch.nn.functional.cross_entropy(model(torch.randn(6, 8)), torch.tensor([1, 2, 3, 4, 17, 5]))
        loss.backward()
    event = loc.event
    assert event is not None and (event["op"], event["kind"]) == ("cross_entropy", "inf"), event
    assert "a target's logit is -inf" in event["evidence"]["reason"]
    with gradguard.locate(model) as fine:  # every target allowed: the masked -inf stays harmless
        torch.nn.functional.cross_entropy(
            model(torch.randn(6, 8)), torch.tensor([1, 2, 3, 4, 5, 6])
        ).backward()
    assert fine.event is None


# ----------------------------------------------------------------------------- the capture's tree walk
def test_the_captures_tensor_walk_matches_the_pytree_order_on_every_container() -> None:
    """The step capture walks outputs and arguments with its own fast walk (plain tuples, lists,
    dicts) and hands anything else to the pytree walk: the tensors and their order are pytree's
    (the kept output gradients are matched to the replayed outputs by position)."""
    from collections import OrderedDict, namedtuple

    from torch.utils._pytree import tree_flatten

    from gradguard.locate import _floats, _tensors

    Pair = namedtuple("Pair", "a b")
    t = [torch.randn(2) for _ in range(6)]
    ints = torch.arange(3)
    trees = [
        t[0],
        (t[0], (t[1], t[2])),  # an LSTM's (output, (h, c))
        [t[0], {"x": t[1], "y": [t[2], None, 3, "s"]}, ints],
        {"logits": t[3], "aux": (t[4],), "n": 2.0},
        Pair(t[0], Pair(t[1], t[2])),  # a namedtuple: the pytree walk
        OrderedDict(b=t[5], a=t[4]),
        ((t[0], 1), {"k": OrderedDict(z=t[1])}, torch.max(torch.stack(t[:2]), dim=0)),
        (torch.float32, torch.device("cpu"), slice(1, 2), None),
    ]
    for tree in trees:
        want = [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]
        got = _tensors(tree)
        assert len(got) == len(want) and all(a is b for a, b in zip(got, want)), tree
        floats = [x for x in want if x.is_floating_point()]
        assert [id(x) for x in _floats(tree)] == [id(x) for x in floats]


def test_a_guard_over_gradient_accumulation_finds_the_nan_in_an_earlier_micro_batch(tmp_path: Path) -> None:
    """guard.step after 3 micro-batches, the NaN in the first: the data, not an op of the last."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gradguard.Guard(model, opt, log_dir=tmp_path / "r")
    for step in range(4):
        opt.zero_grad()
        total = torch.zeros(())
        for micro in range(3):
            x = torch.randn(16, 8)
            if step == 2 and micro == 0:
                x[3, 1] = math.nan
            loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)) / 3
            loss.backward()
            total = total + loss.detach()
        guard.step(total)
    guard.close()
    first = first_nonfinite(tmp_path / "r")
    assert first is not None and first["step"] == 2 and first["phase"] == "data", first
    assert first["evidence"]["micro_batch"] == "1 of 3", first


class _Embedder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.proj(x)
        return e / e.norm(dim=-1, keepdim=True)  # an all-zero row after the ReLU: 0/0


def test_a_container_root_never_called_puts_its_members_forwards_in_the_forward_phase() -> None:
    """The root a guard was given may be a ``ModuleDict`` holding the models the step calls one by one
    (the error for an optimizer over several models asks for it): their forwards are the forward, not
    the data — a 0/0 in the embedder read "bad_data … the model is not at fault"."""
    embedder, head = _Embedder(), torch.nn.Linear(3, 2)
    with torch.no_grad():
        embedder.proj[0].weight.fill_(-1.0)
        embedder.proj[0].bias.fill_(-1.0)
    root = torch.nn.ModuleDict({"embedder": embedder, "head": head})
    with gradguard.locate(root) as loc:
        loss = torch.nn.functional.cross_entropy(
            head(embedder(torch.rand(5, 4))), torch.zeros(5, dtype=torch.long)
        )
        loss.backward()
    event = loc.event
    assert event is not None
    assert (event["phase"], event["module"], event["op"], event["kind"]) == (
        "forward",
        "embedder",
        "div",
        "nan",
    )


class _Gumbel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor, tau: float) -> torch.Tensor:
        return torch.nn.functional.gumbel_softmax(self.lin(x), tau=tau)


def test_a_python_number_divisor_at_zero_inside_a_functional_call_is_named_not_its_scratch_memory() -> None:
    """``F.gumbel_softmax(logits, tau=0)``: the division by the number 0 inside it, not the
    ``empty_like`` whose uninitialised memory (a NaN an earlier rerun freed) it fills next."""
    torch.manual_seed(0)
    model, x = _Gumbel(), torch.randn(100, 8)
    with gradguard.locate(model) as loc:
        model(x, 0.5).sum().backward()
    assert loc.event is None
    for _ in range(2):  # the second time the freed memory of the first one's NaN is there to pick up
        with gradguard.locate(model) as loc:
            model(x, 0.0).sum().backward()
        event = loc.event
        assert event is not None
        assert (event["op"], event["evidence"]["inside"]) == ("div", "gumbel_softmax")
        assert "Python number that reached 0" in event["evidence"]["reason"]
    _why, fix = gradguard.optable.advice(event["op"], event["evidence"]["reason"], event.get("cause"))
    assert "max(0.5" in fix, fix
    assert gradguard.events.op_called(event) == "`div` inside `gumbel_softmax`"


class _HandSoftmax(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.q(x) @ x.T
        return torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)


def test_a_line_that_computes_a_softmax_by_hand_is_told_to_use_torch_softmax() -> None:
    """Attention over raw-unit inputs with ``exp(s) / exp(s).sum()``: the exp's general fix, "clamp the
    argument before exp", left it NaN (rows of exp underflowed: 0 / 0); the event keeps the line's code,
    and the fix follows what the line does."""
    torch.manual_seed(0)
    model = _HandSoftmax()
    with gradguard.locate(model) as loc:
        model(torch.randn(6, 4) * 300).sum().backward()
    event = loc.event
    assert event is not None and event["evidence"]["code"].startswith(
        "return torch.exp(s) / torch.exp(s).sum("
    )
    _why, fix = gradguard.optable.advice(event["op"], event["evidence"]["reason"], None, event["evidence"])
    assert "torch.softmax" in fix and "clamp" not in fix.split(";")[0], fix
    for line, said in (
        ("return torch.mean(torch.log(torch.cosh(pred - target)))", "torch.logaddexp(r, -r)"),
        ("log_risk_set = torch.log(torch.cumsum(torch.exp(risk), dim=0))", "torch.logcumsumexp"),
        ("loss = -Beta(a, b).log_prob(yb).mean()", "a Beta target of exactly 0"),
        ("var = torch.exp(logvar)", None),
    ):
        hand = gradguard.optable.by_hand(line)
        assert said in hand if hand is not None and said else hand is said, (line, hand)


def test_a_number_divided_by_a_tensor_holding_zero_is_a_division_by_zero() -> None:
    """``1.0 / r`` (a pair potential with r = 0 on the diagonal) calls ``r.__rdiv__(1.0)``: the number
    was read as the divisor, and the zero in ``r`` as "a value above the dtype's max"."""
    r = torch.tensor([0.0, 1.0])
    with gradguard.locate(torch.nn.Identity()) as loc:
        _ = 1.0 / r
    assert loc.event is not None and loc.event["evidence"]["reason"] == "division by zero", loc.event
    assert gradguard._inputs.scale_operand("div", (r, 2.0), reflected=True) is None  # 2 / r scales nothing
    # a pair potential masks the diagonal after dividing (1 / r * (1 - eye)): a clamp_min(1e-6) left r**-6 to
    # blow up in the backward; the fix says to select before dividing
    _why, fix = gradguard.optable.advice("div", loc.event["evidence"]["reason"])
    assert "select before dividing" in fix, fix
