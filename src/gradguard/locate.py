"""Find where the first non-finite value was born: phase, module, op, tensor role, source line.

Healthy steps pay nothing here: the :class:`gradguard.Guard` only keeps references to the
step's inputs and RNG state. When a step goes non-finite, the guard *replays* it under full
instrumentation (:class:`Locator`), or you run a block of your own under it::

    with gradguard.locate(model) as loc:
        loss = loss_fn(model(x), y)
        loss.backward()
    print(loc.event)     # {"phase": "forward", "module": "attn", "op": "softmax", "kind": "nan", ...}

How an answer is found:

* **Forward** (and the data and loss code around the model): a :class:`TorchFunctionMode` sees
  every torch-level call with its user-facing name (``softmax``, ``log``, ``div``, ``linear``…) and
  checks its outputs. Each non-finite tensor carries a *taint*: the op where its value was born.
  An op whose inputs are all finite and whose output is not is a birth (``log`` of 0, ``exp``
  overflow, ``0/0``, an fp16 ``linear`` above 65504). A value written on purpose (a non-finite
  Python scalar argument, as in ``masked_fill(mask, -inf)`` or ``torch.full(..., -inf)``) is
  *intentional*: it is not a fault, and a NaN born from intentional infinities (a softmax over a
  row that is all ``-inf``) is a birth of its own. Otherwise the output inherits its inputs'
  taint, so a NaN that followed an overflow is blamed on the overflow. The answer for a
  non-finite loss is the earliest birth in the loss's taint.
* **Backward**: every autograd node created during the forward gets a hook; the answer is the
  first node that *returned* a non-finite gradient from finite incoming gradients, named by the
  forward op that created it (``sqrt`` for ``SqrtBackward0``, ``pow`` for ``x ** 0.5``), with the
  module and source line of that forward call and the node's saved inputs as evidence.
* **Data** and **optimizer**: a non-finite model input, or a non-finite parameter before the
  forward (born in an earlier optimizer step), is the root of everything it touches.
* ``phase`` follows the root module: before its forward ``data``, inside it ``forward``, after
  it ``loss``, then ``backward``. NaN and ±inf are checked separately (``kind``).

Replay leaves no trace: :meth:`Locator.replay` restores buffers, RNG streams and ``.grad``.
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
import math
import os
import re
import sys
import sysconfig
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack, _pop_mode, _push_mode
from torch.utils._pytree import tree_flatten

from gradguard import optable, runtable

__all__ = [
    "Birth",
    "Locator",
    "LossWatch",
    "StepCapture",
    "explosion",
    "keep_out_of_pickles",
    "locate",
    "rng_state",
    "set_rng_state",
]

_TORCH_DIR = os.path.dirname(torch.__file__)
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_USER_DIRS_IN_PKG = (os.path.join(_PKG_DIR, "demos"),)
_STDLIB = sysconfig.get_paths()["stdlib"]
_INTENTIONAL = "intentional"
_SKIP_FUNCS = frozenset(
    {"__get__", "__set__", "__repr__", "__format__", "__bool__", "__len__", "dim", "size"}
)
_BACKWARD_FUNCS = frozenset({"backward"})
_DUNDER = re.compile(r"^__(?:r|i)?([a-z_]+?)__$")
_DUNDER_NAMES = {
    "truediv": "div",
    "floordiv": "floor_divide",
    "matmul": "matmul",
    "neg": "neg",
    "getitem": "index",
}


def op_name(func: Any) -> str:
    """The torch-level name of a function: ``torch.Tensor.__truediv__`` → ``div``, ``F.softmax`` → ``softmax``."""
    name = getattr(func, "__name__", None) or repr(func)
    m = _DUNDER.match(name)
    if m:
        base = m.group(1)
        return _DUNDER_NAMES.get(base, base)
    return name.rstrip("_") if name.endswith("_") and not name.startswith("_") else name


def node_op_name(node: Any) -> str:
    """``SqrtBackward0`` → ``sqrt``, ``NllLossBackward0`` → ``nll_loss`` (an autograd node or its name)."""
    name = node if isinstance(node, str) else (node.name() if hasattr(node, "name") else type(node).__name__)
    base = re.sub(r"Backward\d*$", "", name)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", base).lower()


def user_source(skip: int = 2) -> str | None:
    """``file:line`` of the innermost frame in the user's code (not torch, not gradguard's core, not the stdlib)."""
    frame = sys._getframe(skip)
    while frame is not None:
        fn = frame.f_code.co_filename
        internal = (
            fn.startswith(_TORCH_DIR)
            or (fn.startswith(_PKG_DIR) and not fn.startswith(_USER_DIRS_IN_PKG))
            or fn.startswith(_STDLIB)
            or fn.startswith("<frozen")
        )
        if not internal:
            return f"{fn}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return None


def rng_state() -> dict[str, Any]:
    """The CPU (and, where present, CUDA) RNG state, to replay a step with the same randomness."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _floats(tree: Any) -> list[Tensor]:
    return [
        t
        for t in tree_flatten(tree)[0]
        if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())
    ]


def _kinds(t: Tensor) -> list[str]:
    """Which non-finite kinds ``t`` holds (host reads; the anomaly path only)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    out = []
    if bool(torch.isnan(t).any()):
        out.append("nan")
    if bool((t == math.inf).any()):
        out.append("inf")
    if bool((t == -math.inf).any()):
        out.append("-inf")
    return out


def _finite(t: Tensor) -> bool:
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return bool(torch.isfinite(t).all())


def _describe(t: Tensor) -> dict[str, Any]:
    """A few numbers that explain a tensor: shape, dtype, non-finite counts, zeros, range."""
    d = t.detach()
    if hasattr(d, "full_tensor"):
        d = d.full_tensor()
    d = d.float() if d.is_floating_point() else d
    info: dict[str, Any] = {"shape": list(d.shape), "dtype": str(t.dtype).replace("torch.", "")}
    if d.numel() == 0 or not d.is_floating_point():
        return info
    finite = d[torch.isfinite(d)]
    info.update(
        nan=int(torch.isnan(d).sum()),
        posinf=int((d == math.inf).sum()),
        neginf=int((d == -math.inf).sum()),
        zeros=int((d == 0).sum()),
        negative=int((d < 0).sum()),
        unit=int((d.abs() == 1).sum()),
    )
    if finite.numel():
        info.update(min=float(finite.min()), max=float(finite.max()), absmax=float(finite.abs().max()))
    if d.ndim >= 2:  # rows that are entirely -inf (a fully masked attention row)
        rows = (d == -math.inf).all(dim=-1)
        if bool(rows.any()):
            info["rows_all_neginf"] = int(rows.sum())
    return info


def explain(op: str, inputs: list[dict[str, Any]], kind: str, dtype_max: float | None = None) -> str:
    """A one-line reason from the op and what its inputs held (see :func:`gradguard.optable.reason`)."""
    return optable.reason(op, inputs, kind, dtype_max)


@dataclass
class Birth:
    """Where a non-finite value was born (the fields of a ``nonfinite`` event, plus evidence)."""

    phase: str
    module: str | None
    op: str | None
    tensor: str
    kind: str
    source: str | None
    order: int
    evidence: dict[str, Any] = field(default_factory=dict)

    def event(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "module": self.module,
            "op": self.op,
            "tensor": self.tensor,
            "kind": self.kind,
            "source": self.source,
            "evidence": self.evidence,
        }


class _OpWatch(TorchFunctionMode):
    """Sees every torch-level call: ``on_backward(args)`` for ``backward()``, ``on_op`` after the others."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _SKIP_FUNCS:
            return func(*args, **kwargs)
        if name in _BACKWARD_FUNCS or func is torch.autograd.backward:
            self.on_backward(args)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        try:
            self.on_op(func, args, kwargs, out)
        except Exception:  # instrumentation must never break the user's op (e.g. a no_grad view)
            self.failed_ops += 1
        return out

    failed_ops = 0

    def on_backward(self, args: Any) -> None:
        raise NotImplementedError

    def on_op(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        raise NotImplementedError


class _Mode(_OpWatch):
    def __init__(self, loc: Locator) -> None:
        super().__init__()
        self.loc = loc

    def on_backward(self, args: Any) -> None:
        self.loc.phase = "backward"
        if args and isinstance(args[0], Tensor) and args[0].numel() == 1:
            self.loc.loss = args[0]  # what the block differentiates: the loss

    def on_op(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        self.loc._after_op(func, args, kwargs, out)


class Locator:
    """Full instrumentation of a model for one block of code (a replayed step, or a notebook cell).

    Costs a host read per op output and per autograd node: use it on anomalies only.

    Args:
        model: the root module (its ``named_modules()`` name the modules in the answer).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._names = {id(m): name for name, m in model.named_modules()}
        self._params = {name: p for name, p in model.named_parameters()}
        self._reset()

    def _reset(self) -> None:
        self.phase = "data"
        self.stack: list[str] = []
        self.order = 0
        self.births: list[Birth] = []
        self.backward_birth: Birth | None = None
        self._taint: dict[int, tuple[weakref.ref[Tensor], frozenset[int]]] = {}
        self._hooked: list[Any] = []  # nodes kept alive while their hooks may fire
        self._handles: list[Any] = []
        self.first_output: Tensor | None = None
        self.loss: Tensor | None = None

    # ------------------------------------------------------------------ taint bookkeeping
    def _taint_of(self, t: Tensor) -> frozenset[int] | None:
        entry = self._taint.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1]

    def _set_taint(self, t: Tensor, taint: frozenset[int]) -> None:
        self._taint[id(t)] = (weakref.ref(t), taint)

    def _birth(self, phase: str, module: str | None, op: str | None, tensor: str, kind: str, source: str | None,
               evidence: dict[str, Any]) -> int:  # fmt: skip
        self.births.append(Birth(phase, module, op, tensor, kind, source, self.order, evidence))
        return len(self.births) - 1

    def _module(self) -> str | None:
        return self.stack[-1] if self.stack else None

    # ------------------------------------------------------------------ forward
    def _after_op(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        self.order += 1
        outs = _floats(out)
        if not outs:
            return
        name = op_name(func)
        bad_outs = [o for o in outs if not _finite(o)]
        if bad_outs:
            self._classify(name, args, kwargs, bad_outs)
        if self.phase != "backward":
            source = None
            for o in outs:
                node = o.grad_fn
                if node is not None and o.requires_grad and not any(n is node for n in self._hooked[-8:]):
                    if source is None:
                        source = user_source(3)
                    self._hook_node(node, name, self._module(), source, self.phase)

    def _classify(self, name: str, args: Any, kwargs: Any, bad_outs: list[Tensor]) -> None:
        leaves = tree_flatten((args, kwargs))[0]
        scalar_written = any(isinstance(v, float) and not math.isfinite(v) for v in leaves)
        inputs = [t for t in leaves if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]
        bad_inputs = [t for t in inputs if not _finite(t)]
        in_taint: set[int] = set()
        for t in bad_inputs:
            taint = self._taint_of(t)
            in_taint |= taint if taint is not None else self._untracked(t)
        out_kinds = sorted({k for o in bad_outs for k in _kinds(o)})
        in_nan = any("nan" in _kinds(t) for t in bad_inputs)
        kind = "nan" if "nan" in out_kinds else out_kinds[0]
        if scalar_written and not bad_inputs:
            taint = frozenset({-1})  # written on purpose: masked_fill(-inf), full(-inf)
        elif not bad_inputs or ("nan" in out_kinds and not in_nan and in_taint <= {-1}):
            source = user_source(4)
            ev_inputs = [_describe(t) for t in inputs[:4]]
            dtype = bad_outs[0].dtype
            dmax = float(torch.finfo(dtype).max) if dtype.is_floating_point else None
            evidence = {"inputs": ev_inputs, "reason": explain(name, ev_inputs, kind, dmax)}
            phase = self.phase if self.phase != "backward" else "backward"
            taint = frozenset({self._birth(phase, self._module(), name, "output", kind, source, evidence)})
        else:
            taint = frozenset(in_taint)
        for o in bad_outs:
            self._set_taint(o, taint)
            if self.first_output is None:
                self.first_output = o

    def _untracked(self, t: Tensor) -> set[int]:
        """A non-finite tensor we did not see born: a parameter (optimizer phase) or an input (data)."""
        for name, p in self._params.items():
            if t is p or (t.data_ptr() == p.data_ptr() and t.shape == p.shape):
                owner = name.rpartition(".")[0]
                kind = _kinds(p)[0]
                ev = {"parameter": name, **_describe(p), "reason": "the parameter was already non-finite before this "
                      "forward: an earlier optimizer step wrote it"}  # fmt: skip
                idx = self._birth("optimizer", owner, None, "param", kind, None, ev)
                self._set_taint(t, frozenset({idx}))
                return {idx}
        return set()

    # ------------------------------------------------------------------ module hooks
    def _pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        name = self._names.get(id(module))
        if name is None:
            return
        if module is self.model:
            self.phase = "forward"
            for t in _floats((args, kwargs)):
                if self._taint_of(t) is None and not _finite(t):
                    kind = _kinds(t)[0]
                    ev = {"input": _describe(t), "reason": "the input batch holds non-finite values"}
                    idx = self._birth("data", None, None, "input", kind, user_source(3), ev)
                    self._set_taint(t, frozenset({idx}))
        self.stack.append(name)

    def _post(self, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if self._names.get(id(module)) is None:
            return
        if self.stack:
            self.stack.pop()
        if module is self.model:
            self.phase = "loss"

    # ------------------------------------------------------------------ backward
    def _hook_node(self, node: Any, name: str, module: str | None, source: str | None, phase: str) -> None:
        def hook(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]) -> None:
            self.phase = "backward"
            if self.backward_birth is not None:
                return
            returned = [g for g in grad_inputs if g is not None]
            incoming = [g for g in grad_outputs if g is not None]
            if not returned or all(_finite(g) for g in returned) or not all(_finite(g) for g in incoming):
                return
            kinds = sorted({k for g in returned for k in _kinds(g)})
            saved = {
                attr[len("_saved_") :]: _describe(v)
                for attr in dir(node)
                if attr.startswith("_saved_") and isinstance(v := getattr(node, attr, None), Tensor)
            }
            ev_inputs = list(saved.values())
            kind = "nan" if "nan" in kinds else kinds[0]
            op = name if name else node_op_name(node)
            evidence = {
                "node": node.name(),
                "saved": saved,
                "reason": explain(op, ev_inputs, kind) + " (in backward: the forward was finite)",
            }
            self.backward_birth = Birth("backward", module, op, "grad", kind, source, self.order, evidence)

        node.register_hook(hook)  # lives as long as the graph: it fires in the backward after the watch
        self._hooked.append(node)

    # ------------------------------------------------------------------ run
    @contextlib.contextmanager
    def watch(self) -> Iterator[Locator]:
        """Instrument the block: module hooks, the function mode and node hooks; removed on exit."""
        self._reset()
        for module in self.model.modules():
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, with_kwargs=True, always_call=True))
        mode = _Mode(self)
        try:
            with mode:
                yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._hooked.clear()

    def answer(self, loss: Tensor | None = None, loss_nonfinite: bool | None = None) -> Birth | None:
        """The birth that explains the failure.

        Args:
            loss: the loss tensor of the block, if known (its taint names the forward birth).
            loss_nonfinite: whether the loss was non-finite (``None``: unknown).
        """
        if loss is not None and loss_nonfinite is None:
            loss_nonfinite = not _finite(loss)
        forward: Birth | None = None
        if loss is not None and loss_nonfinite:
            taint: frozenset[int] | set[int] = self._taint_of(loss) or set()
            roots = [self.births[i] for i in taint if i >= 0]
            forward = min(roots, key=lambda b: b.order) if roots else None
        if forward is None and loss_nonfinite is not False and self.births:
            candidates = [b for b in self.births if b.phase != "backward"]
            forward = candidates[0] if candidates else None
        if forward is not None and loss_nonfinite is not False:
            return forward
        if self.backward_birth is not None:
            return self.backward_birth
        data_or_params = [b for b in self.births if b.phase in ("data", "optimizer")]
        return data_or_params[0] if data_or_params else forward

    def replay(
        self,
        fn: Callable[[], Any],
        rng: dict[str, Any] | None = None,
        *,
        grads: list[nn.Parameter] | None = None,
    ) -> tuple[Birth | None, Any]:
        """Run ``fn`` (a step's forward, loss and backward) under instrumentation, leaving no trace.

        Buffers (BatchNorm running statistics…), the RNG streams and the parameters' ``.grad`` are
        what they were before the call; ``rng`` is the RNG state to replay with (the state the
        original step started from).

        Returns:
            ``(birth, result)``: the answer (or ``None``) and what ``fn`` returned.
        """
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        params = grads if grads is not None else list(self.model.parameters())
        saved_grads = [p.grad for p in params]
        rng_after = rng_state()
        result: Any = None
        try:
            if rng is not None:
                set_rng_state(rng)
            for p in params:
                p.grad = None
            with self.watch():
                result = fn()
            if self.loss is not None:  # fn called backward() on a loss: judge by it
                loss: Tensor | None = self.loss
            else:  # fn returned the model's output: a birth that never reached it was harmless
                outs = _floats(result)
                loss = outs[0] if outs else None
            birth = self.answer(loss)
        finally:
            with torch.no_grad():
                for n, b in self.model.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])
            for p, g in zip(params, saved_grads):
                p.grad = g
            set_rng_state(rng_after)
        return birth, result

    @property
    def event(self) -> dict[str, Any] | None:
        """The answer as the fields of a ``nonfinite`` event (``located_by="replay"``), or ``None``."""
        loss = self.loss if self.loss is not None else self.first_output
        birth = self.answer(loss)
        if birth is None:
            return None
        return {"type": "nonfinite", **birth.event(), "located_by": "replay"}


@contextlib.contextmanager
def locate(model: nn.Module) -> Iterator[Locator]:
    """Instrument a block of code and say where its first non-finite value came from.

    Expensive (a host read per op): for debugging one step, e.g. in a notebook.

    Example:
        >>> import torch, gradguard
        >>> model = torch.nn.Linear(3, 1)
        >>> with gradguard.locate(model) as loc:
        ...     loss = (model(torch.ones(2, 3)) * 0).sum() + torch.tensor(-1.0).sqrt()
        >>> loc.event["op"], loc.event["kind"], loc.event["phase"], loc.event["evidence"]["reason"]
        ('sqrt', 'nan', 'loss', 'sqrt of a negative number')
    """
    loc = Locator(model)
    with loc.watch():
        yield loc


def explosion(
    history: list[tuple[int, float, dict[str, float]]], *, growth: float = 100.0
) -> dict[str, Any] | None:
    """Whether the steps before a failure were an explosion: a norm that grew by orders of magnitude.

    An explosion has no single bad op (values grow over steps until they overflow), so its answer
    is the step where the climb started and the layer whose norm grew first
    (:func:`gradguard.runtable.explosion_onset`, the definition ``gradguard diagnose`` uses too),
    not the op where the overflow finally landed.

    Args:
        history: ``(step, global grad norm, {layer: grad norm})`` of the steps before the failure,
            oldest first (non-finite norms are ignored).
        growth: the peak of the last steps over the median of the early steps that makes it one.

    Returns:
        ``{"cause": "explosion", "first_spike_step", "module", "baseline_norm", "peak_norm", "growth"}``
        or ``None``.
    """
    finite = [(s, g, layers) for s, g, layers in history if math.isfinite(g)]
    if len(finite) < 2:
        return None
    head = finite[: max(1, len(finite) // 2)]
    base = sorted(g for _, g, _ in head)[len(head) // 2]
    peak = max(g for _, g, _ in finite[-5:])
    if not base > 0 or peak < growth * base:
        return None
    names = dict.fromkeys(name for _, _, layers in history for name in layers)
    onset = runtable.explosion_onset(
        [s for s, _, _ in history],
        [g for _, g, _ in history],
        {name: [layers.get(name, math.nan) for _, _, layers in history] for name in names},
    )
    return {
        "cause": "explosion",
        "first_spike_step": onset.step,
        "module": onset.layer.name if onset.layer is not None else None,
        "baseline_norm": base,
        "peak_norm": peak,
        "growth": peak / base,
    }


class LossWatch(_OpWatch):
    """A light watch over the code between the model's forward and ``backward()`` (the loss code).

    For the zero-code runner, which cannot replay the user's loss function. On a healthy step it
    costs a Python call per op and keeps *references*: each of the first ``limit`` loss-code ops
    (its name, source line, float inputs and outputs with their version counters) and, through a
    hook on each autograd node those ops create, the gradients that node received and returned.
    Nothing is read and no device op runs. :meth:`answer` reads them on an anomalous step and names
    the first op (forward) or node (backward) that produced a non-finite value from finite inputs.

    :meth:`compact` (a window that is not its step's last, e.g. an earlier micro-batch of gradient
    accumulation) turns the references into one small device tensor of sums (a few device ops, no
    host read) so the window no longer keeps its tensors alive. A tensor changed in place after its
    op was watched (its version moved) is not judged.

    It also notes the loss (what ``backward()`` is called on); after ``backward()`` the ops that
    follow (clipping, logging) are not the loss code and are not kept.
    """

    def __init__(self, limit: int = 64) -> None:
        super().__init__()
        self.limit = limit
        self.entries: list[_Watched] = []  # the loss-code ops, then the backward nodes, in order
        self.loss: Tensor | None = None
        self.done = False  # backward() was called: the loss code is over
        self._sums: list[float] | Tensor | None = None  # after compact(): one sum per kept tensor
        self._handles: list[Any] = []
        self._pid = os.getpid()

    def on_backward(self, args: Any) -> None:
        if args and isinstance(args[0], Tensor):
            self.loss = args[0]
        self.done = True

    def on_op(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        if self.done or len(self.entries) >= self.limit or os.getpid() != self._pid:
            return  # a forked child (a DataLoader worker) inherits the mode: it watches nothing there
        outs = _float_outputs(out)
        if not outs:
            return  # indexing, integer data: nothing that can turn non-finite
        op = op_name(func)
        source = user_source(2)
        self.entries.append(_Watched(op, source, "loss", outs, _float_inputs(args, kwargs)))
        for o in outs:
            node = o.grad_fn
            if node is not None and o.requires_grad:
                self._handles.append(node.register_hook(self._node_hook(op, source)))

    def _node_hook(self, op: str, source: str | None) -> Callable[..., None]:
        def hook(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]) -> None:
            returned = [g for g in grad_inputs if g is not None]
            if returned and len(self.entries) < 2 * self.limit and self._sums is None:
                incoming = [g for g in grad_outputs if g is not None]
                self.entries.append(_Watched(op, source, "backward", returned, incoming))

        return hook

    def compact(self) -> None:
        """Keep one device sum per watched tensor instead of the tensor (no host read)."""
        if self._sums is not None:
            return
        self.close()
        tensors = [t for e in self.entries for t in e.tensors() if e.unchanged()]
        for e in self.entries:
            e.judged = e.unchanged()
            e.drop()
        self._sums = torch.stack([_sum(t) for t in tensors]) if tensors else []

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def answer(self) -> dict[str, Any] | None:
        """The first loss-code op (or its backward node) that made a non-finite value from finite inputs."""
        if not self.entries:
            return None
        sums = self._host_sums()  # host sync: the anomaly path only
        i = 0
        for e in self.entries:
            if not e.judged:
                continue
            outs, ins = sums[i : i + e.n_out], sums[i + e.n_out : i + e.n_out + e.n_in]
            i += e.n_out + e.n_in
            bad = [s for s in outs if not math.isfinite(s)]
            if bad and all(math.isfinite(s) for s in ins):
                return e.event(bad[0])
        return None

    def _host_sums(self) -> list[float]:
        if self._sums is None:
            for e in self.entries:
                e.judged = e.unchanged()
            tensors = [t for e in self.entries if e.judged for t in e.tensors()]
            if not tensors:
                return []
            return torch.stack([_sum(t) for t in tensors]).tolist()  # host sync: anomaly path
        sums = self._sums
        return sums.tolist() if isinstance(sums, Tensor) else list(sums)  # host sync: anomaly path


def _float_outputs(out: Any) -> list[Tensor]:
    """:func:`_floats` of an op's output, without a tree walk for the usual single tensor."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    return _floats(out)


def _float_inputs(args: Any, kwargs: Any) -> list[Tensor]:
    """:func:`_floats` of an op's arguments, without a tree walk when they are flat."""
    if kwargs or any(isinstance(a, (list, tuple, dict)) for a in args):
        return _floats((args, kwargs))
    return [a for a in args if isinstance(a, Tensor) and (a.is_floating_point() or a.is_complex())]


def _sum(t: Tensor) -> Tensor:
    """A float32 sum on the device: non-finite when ``t`` holds a NaN or an infinity (the kind tells which)."""
    d = t.detach()
    if hasattr(d, "full_tensor"):
        d = d.full_tensor()
    return d.sum(dtype=torch.float32) if d.is_floating_point() else d.abs().sum().float()


class _Watched:
    """One op of the loss code (or one autograd node of its backward), by reference."""

    __slots__ = ("_ins", "_outs", "judged", "n_in", "n_out", "op", "phase", "source", "versions")

    def __init__(
        self, op: str, source: str | None, phase: str, outs: list[Tensor], ins: list[Tensor]
    ) -> None:
        self.op, self.source, self.phase = op, source, phase
        self._outs, self._ins = outs, ins
        self.n_out, self.n_in = len(outs), len(ins)
        self.versions = [t._version for t in (*outs, *ins)]
        self.judged = True

    def tensors(self) -> list[Tensor]:
        return [*self._outs, *self._ins]

    def unchanged(self) -> bool:
        """No watched tensor was written in place since the op (its values are the op's)."""
        return [t._version for t in self.tensors()] == self.versions

    def drop(self) -> None:
        self._outs, self._ins = [], []

    def event(self, total: float) -> dict[str, Any]:
        suffix = " (in backward: the forward was finite)" if self.phase == "backward" else ""
        return {
            "phase": self.phase,
            "module": None,
            "op": self.op,
            "tensor": "output" if self.phase == "loss" else "grad",
            "kind": "nan" if math.isnan(total) else ("inf" if total > 0 else "-inf"),
            "source": self.source,
            "evidence": {
                "reason": f"{self.op} in the loss code made a non-finite value from finite inputs{suffix}"
            },
        }


class StepCapture:
    """What a replay of a step needs, kept by hooks on the root module (references, no copies).

    * at the root's forward call (pre): the root's inputs and the RNG state (a replay runs the same
      forward); forwards under ``no_grad`` (evaluation) are not kept;
    * when it returns (post): a reference to the gradient that will flow into the root's output (a
      replay runs the model's backward from it, without the user's loss code); outputs above
      ``max_output`` elements are not kept (their gradient may be large): a replay then checks the
      forward only; and, with ``watch_loss``, a :class:`LossWatch` over the loss code until the
      next forward or the step (the zero-code runner, which has no loss function to replay), for
      the first ``max_windows`` forwards of a step (gradient accumulation), and not at all while
      steps run more forwards than that (an RL rollout: its loss code follows the last of
      hundreds of forwards, and watching them all would cost more than the step).

    With ``hooks=True`` (the guard's own use) the capture hooks the root module; the hooks are kept
    out of anything pickled or deep-copied while they are on (:func:`keep_out_of_pickles`):
    ``torch.save(model)`` writes what it writes without gradguard. With ``hooks=False`` the caller
    (the zero-code runner, through torch's global module hooks) calls :meth:`pre`,
    :meth:`post_with_kwargs` and :meth:`before_backward` itself: nothing is put on the module at
    all, and only the last forward before a backward gets a gradient keeper.

    Args:
        root: the model (what a replay runs).
        watch_loss: watch the loss code (a Python call per loss-code op; see :class:`LossWatch`).
        max_output: the largest output (in elements) whose gradient is kept.
        hooks: register the forward hooks on ``root``.
        max_windows: loss-code windows watched per step.
    """

    def __init__(
        self,
        root: nn.Module,
        *,
        watch_loss: bool = False,
        max_output: int = 2**24,
        hooks: bool = True,
        max_windows: int = 8,
    ) -> None:
        self.root = root
        self.watch_loss = watch_loss
        self.max_output = max_output
        self.max_windows = max_windows
        self.inputs: tuple[Any, Any, dict[str, Any]] | None = None
        self.out_grads: list[Tensor | None] = []
        self.watches: list[LossWatch] = []  # the loss-code windows of this step, oldest first
        self.replaying = False
        self._active: LossWatch | None = None
        self._pending: list[LossWatch] = []  # closed windows whose mode could not be left yet
        self._hooks = hooks
        self._outs: list[Any] = []  # the last forwards' outputs, until their backward (hooks=False)
        self._pins = 0  # pinned(): a release waits
        self._release_due = False
        self._forwards = 0  # grad-enabled forwards this step
        self._last_forwards = 0  # ... and in the step before
        self._handles: list[Any] = []
        if hooks:
            self._handles = [
                root.register_forward_pre_hook(self.pre, with_kwargs=True),
                root.register_forward_hook(self.post),
                keep_out_of_pickles(type(root)),
            ]

    @property
    def watch(self) -> LossWatch | None:
        """The loss watch of the window that ended last (``None``: none this step)."""
        return self.watches[-1] if self.watches else None

    def pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self.replaying:
            return
        self._stop_watch(compact=True)  # a new forward: the last window was not the step's last
        if torch.is_grad_enabled():
            self.inputs = (args, kwargs, rng_state())
            self._forwards += 1

    def post(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.replaying or not torch.is_grad_enabled():
            return
        if self._hooks:
            self.out_grads = []
            self._keep_grads_of(out)
        else:  # the gradient keepers wait for the backward (before_backward)
            self._outs = [*self._outs[1 - self.max_windows :], out]
        if self.watch_loss and self._may_watch() and not isinstance(_top_mode(), _OpWatch):
            # (not inside gradguard's own instrumentation: an armed forward, whose forward hook
            # leaves its mode after this one runs)
            self._active = LossWatch()
            self._active.__enter__()

    def _may_watch(self) -> bool:
        """Whether this forward's loss code is watched: the first ``max_windows`` forwards of a
        step, unless the last step ran more than that (a rollout: its loss code comes after
        forwards too many to watch)."""
        return len(self.watches) < self.max_windows and self._last_forwards <= self.max_windows

    def before_backward(self) -> None:
        """A backward starts (the zero-code runner): keep the gradient that reaches the outputs of
        the root's last forwards (at most ``max_windows``; an RL rollout calls the model hundreds
        of times a step, and only its last calls get a hook)."""
        outs, self._outs = self._outs, []
        if outs:
            self.out_grads = []
        for out in outs:
            self._keep_grads_of(out)

    def _keep_grads_of(self, out: Any) -> None:
        """Hook the output's tensors: the gradient each receives lands in :attr:`out_grads` (the
        last forward's count; with several forwards, the last gradient to arrive wins)."""
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.requires_grad]
        self.out_grads = [None] * len(outs)
        if outs and sum(t.numel() for t in outs) <= self.max_output:
            for i, t in enumerate(outs):
                t.register_hook(functools.partial(self._keep, i))

    def post_with_kwargs(self, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        """:meth:`post` for a caller that sees the keyword arguments only when the call returns."""
        if self.inputs is not None and kwargs and not self.replaying and torch.is_grad_enabled():
            self.inputs = (self.inputs[0], kwargs, self.inputs[2])
        self.post(module, args, out)

    def _keep(self, i: int, grad: Tensor) -> None:
        if i < len(self.out_grads):
            self.out_grads[i] = grad

    def _stop_watch(self, *, compact: bool = False) -> None:
        """Close the open loss-code window: leave its mode, keep it (compacted) for the step's answer.

        Called from inside the watch's own dispatch (a hook that runs within ``backward()``, which
        the watch itself dispatched), the mode is not on the stack and cannot be left there: it
        stays, passing every op through, and is left at the next chance (:meth:`_leave_pending`).
        """
        self._leave_pending()
        active, self._active = self._active, None
        if active is None:
            return
        active.done = True
        if not _leave(active):
            self._pending.append(active)
        active.close()
        if compact:
            active.compact()
        self.watches.append(active)

    def _leave_pending(self) -> None:
        self._pending = [w for w in self._pending if not _leave(w)]

    @property
    def watching(self) -> bool:
        """Whether a loss-code window is open (its watch is on the mode stack)."""
        return self._active is not None

    def loss_code_over(self) -> bool:
        """Whether the open window saw its ``backward()`` (the loss code is over)."""
        return self._active is not None and self._active.done

    def loss_code_done(self) -> None:
        """``backward()`` was called: the open window keeps no more ops (its backward nodes still report)."""
        if self._active is not None:
            self._active.done = True

    def stop_watching(self, *, compact: bool = True) -> None:
        """Leave the loss watch's mode now (another model's forward starts; the loss code is over)."""
        self._stop_watch(compact=compact)

    def end_step(self) -> LossWatch | None:
        """At the optimizer step: stop watching the loss code; return the step's last watch."""
        self._stop_watch()
        return self.watch

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Keep the step's references through the block (a :meth:`release` in it waits for its end):
        for a caller that replays the step after the guard is done with it."""
        self._pins += 1
        try:
            yield
        finally:
            self._pins -= 1
            if self._pins == 0 and self._release_due:
                self.release()

    def release(self) -> None:
        """Drop the references to the step's inputs, gradients and loss-code tensors (after its step)."""
        if self._pins:
            self._release_due = True
            return
        self._release_due = False
        self._stop_watch()
        self.inputs = None
        self.out_grads = []
        self.watches = []
        self._outs = []
        self._last_forwards, self._forwards = self._forwards, 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.release()

    def forget(self) -> None:
        """In a forked child: leave the watch's mode, drop every reference; no device work (a
        forked child may not touch the parent's CUDA context)."""
        for watch in (self._active, *self._pending):
            if watch is not None:
                _leave(watch)
        self._active, self._pending = None, []
        self.inputs, self.out_grads, self.watches, self._outs = None, [], [], []

    def loss_watch_answer(self) -> dict[str, Any] | None:
        """The first non-finite birth any loss-code window of this step saw (host reads)."""
        for watch in self.watches:
            found = watch.answer()
            if found is not None:
                return found
        return None

    def replay(self, loc: Locator) -> tuple[Birth | dict[str, Any] | None, str]:
        """Replay the captured step: the model's forward from its inputs, its backward from the kept
        output gradient; the loss code (not replayable) from the loss watch.

        Returns:
            ``(answer, how)``: a :class:`Birth`, the loss watch's answer (a dict), or ``None``.
        """
        assert self.inputs is not None
        args, kwargs, rng = self.inputs
        out_grads = list(self.out_grads)
        backward = bool(out_grads) and all(g is not None for g in out_grads)
        grads_ok = backward and all(_finite(g) for g in out_grads if g is not None)

        def forward_backward() -> Any:
            out = self.root(*args, **kwargs)
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.requires_grad]
            if grads_ok and len(outs) == len(out_grads):
                torch.autograd.backward(outs, out_grads)
            return out

        self.replaying = True
        try:
            birth, _ = loc.replay(forward_backward, rng)
        finally:
            self.replaying = False
        if birth is not None and birth.phase == "backward" and not grads_ok:
            birth = None  # no faithful backward was replayed
        if birth is not None:
            return birth, "replay"
        found = self.loss_watch_answer()
        if found is not None:
            return found, "watch"
        if backward and not grads_ok:
            return (
                None,
                "the model's output was finite: the loss code made the loss or its gradient non-finite",
            )
        return None, "replay"


def _top_mode() -> Any:
    """The innermost torch function mode on the stack (``None``: none), e.g. an open loss watch."""
    stack = _get_current_function_mode_stack()
    return stack[-1] if stack else None


def _leave(mode: TorchFunctionMode) -> bool:
    """Take ``mode`` off the torch function mode stack wherever it is (the modes above it stay, in
    order). ``False``: it is not on the stack now (its own dispatch is running)."""
    if not any(m is mode for m in _get_current_function_mode_stack()):
        return False
    above = []
    while _top_mode() is not mode:
        above.append(_pop_mode())
    _pop_mode()
    for m in reversed(above):
        _push_mode(m)
    return True


# ----------------------------------------------------------------------------- no trace in pickles
_HOOK_DICTS = {
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "_backward_pre_hooks": (),
    "_backward_hooks": (),
}
_KEPT_OUT: dict[type, int] = {}  # class → captures alive on instances of it


def _ours(hook: Any) -> bool:
    """Whether a hook was defined in gradguard (a function, a bound method, a partial of one)."""
    fn = getattr(hook, "func", hook)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # a bound method
    return str(getattr(fn, "__module__", "")).split(".")[0] == "gradguard"


def _reduce_without_gradguard(module: nn.Module) -> Any:
    """``module.__reduce_ex__(2)`` with gradguard's hooks left out of the state (copy and pickle)."""
    rv = module.__reduce_ex__(2)
    state = rv[2] if isinstance(rv, tuple) and len(rv) > 2 else None
    if not isinstance(state, dict):
        return rv
    for name, companions in _HOOK_DICTS.items():
        hooks = state.get(name)
        if not hooks or not any(_ours(h) for h in hooks.values()):
            continue
        ours = {k for k, h in hooks.items() if _ours(h)}
        state[name] = type(hooks)((k, h) for k, h in hooks.items() if k not in ours)
        for companion in companions:
            extra = state.get(companion)
            if extra:
                state[companion] = type(extra)((k, v) for k, v in extra.items() if k not in ours)
    return rv


class _KeptOut:
    """The handle of :func:`keep_out_of_pickles`: ``remove()`` ends it."""

    def __init__(self, cls: type) -> None:
        self.cls: type | None = cls

    def remove(self) -> None:
        cls, self.cls = self.cls, None
        if cls is None or cls not in _KEPT_OUT:
            return
        _KEPT_OUT[cls] -= 1
        if _KEPT_OUT[cls] == 0:
            del _KEPT_OUT[cls]
            if copyreg.dispatch_table.get(cls) is _reduce_without_gradguard:
                del copyreg.dispatch_table[cls]


def keep_out_of_pickles(cls: type) -> _KeptOut:
    """While the handle lives, pickling or deep-copying an instance of ``cls`` leaves out the hooks
    gradguard put on it: ``torch.save(model)`` writes the bytes a run without gradguard writes, the
    file loads where gradguard is not installed, and a copy (an EMA model) carries no capture.

    Through :data:`copyreg.dispatch_table` (which :mod:`pickle`, ``torch.save`` and :mod:`copy`
    consult before the class's own ``__reduce_ex__``); a class that has an entry there already is
    left alone.
    """
    handle = _KeptOut(cls)
    if cls in _KEPT_OUT:
        _KEPT_OUT[cls] += 1
    elif cls not in copyreg.dispatch_table:
        _KEPT_OUT[cls] = 1
        copyreg.dispatch_table[cls] = _reduce_without_gradguard
    else:
        handle.cls = None
    return handle
