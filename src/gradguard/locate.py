"""Find where the first non-finite value was born: phase, module, op, tensor role, source line.

Healthy steps pay little here: the :class:`gradguard.Guard` only keeps references to the
step's inputs, RNG state and the gradient that reaches the model's output (:class:`StepCapture`).
When a step goes non-finite, the guard *replays* it under full
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
* ``phase`` follows the root module (or, for a root never called itself — a ``ModuleDict`` of the
  models a step calls — its members' outermost calls): before its forward ``data``, inside it
  ``forward``, after it ``loss``, then ``backward``. NaN and ±inf are checked separately (``kind``).

Replay leaves no trace: :meth:`Locator.replay` restores buffers, RNG streams and ``.grad``.
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
import linecache
import math
import os
import re
import sys
import sysconfig
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack, _pop_mode, _push_mode
from torch.utils._pytree import tree_flatten

from gradguard import _inputs, _replay, events, optable, runtable
from gradguard._replay import rng_state, set_rng_state  # (the replay's RNG, owned there)

__all__ = [
    "Birth",
    "Locator",
    "LossWatch",
    "StepCapture",
    "explosion",
    "in_transform",
    "keep_out_of_pickles",
    "locate",
    "replaying",
    "rng_state",
    "set_rng_state",
]

_TORCH_DIR = os.path.dirname(torch.__file__)
_is_compiling = torch.compiler.is_compiling  # looked up once: the capture's hooks ask at every forward
in_transform = torch._C._functorch.peek_interpreter_stack  # vmap / grad: wrapper tensors (no storage)
_REPLAYS = [0]  # replays under way (Locator.replay): their model calls and backward are not the script's


def replaying() -> bool:
    """Whether a replay (:meth:`Locator.replay`) is running: the zero-code runner's hooks ignore its
    model calls and its ``backward()`` (a hand-updated model counted each replay as a step)."""
    return _REPLAYS[0] > 0


_graph_task = torch._C._current_graph_task_id  # -1 outside a backward
_grad_enabled = torch.is_grad_enabled  # (likewise)
_any_autocast = torch._C._is_any_autocast_enabled
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_USER_DIRS_IN_PKG = (os.path.join(_PKG_DIR, "demos"),)
_STDLIB = sysconfig.get_paths()["stdlib"]
_INTENTIONAL = "intentional"
_REPLAYED = "_replayed_step"  # the function a capture's replay runs the model in: user_source stops there
_MAX_RERUNS = 16  # births per replay whose op is rerun for evidence (inside a wrapper, in float32)
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


_REFLECTED = re.compile(r"^__r[a-z]+__$")


def reflected(func: Any) -> bool:
    """Whether ``func`` is a reflected operator (``__rtruediv__``: ``1.0 / r`` calls it as ``(r, 1.0)``)."""
    return _reflected_name(getattr(func, "__name__", "") or "")


@functools.lru_cache(maxsize=1024)
def _reflected_name(name: str) -> bool:  # (the loss-code watch asks at every op it sees: once per name)
    return bool(_REFLECTED.match(name))


_OP_NAMES: dict[Any, str] = {}  # func → op_name(func), for the loss watch's per-op path


def _op_name_kept(func: Any) -> str:
    """:func:`op_name`, remembered (a few hundred distinct functions in a process)."""
    try:
        name = _OP_NAMES.get(func)
    except TypeError:  # an unhashable callable
        return op_name(func)
    if name is None:
        name = op_name(func)
        if len(_OP_NAMES) < 4096:
            _OP_NAMES[func] = name
    return name


def node_op_name(node: Any) -> str:
    """``SqrtBackward0`` → ``sqrt``, ``NllLossBackward0`` → ``nll_loss`` (an autograd node or its name)."""
    name = node if isinstance(node, str) else (node.name() if hasattr(node, "name") else type(node).__name__)
    base = re.sub(r"Backward\d*$", "", name)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", base).lower()


def user_source(skip: int = 2) -> str | None:
    """``file:line`` of the innermost frame in the user's code (not torch, not gradguard's core, not the stdlib);
    ``None`` past a capture's replay (:data:`_REPLAYED`): what called it is not where the script ran the model."""
    frame = sys._getframe(skip)
    while frame is not None:
        fn = frame.f_code.co_filename
        if frame.f_code.co_name == _REPLAYED and fn.startswith(_PKG_DIR):
            return (
                None  # a replay of a captured forward: outside it is gradguard's caller (a framework's hook)
            )
        if users(fn):
            return f"{fn}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return None


_CODE_CHARS = 160


def with_code(evidence: dict[str, Any], source: str | None) -> dict[str, Any]:
    """``evidence`` with ``code``: the text of the ``file:line`` the op ran at (at most
    :data:`_CODE_CHARS` characters), where it can be read — the fix can then follow what the line
    does (a hand-written softmax, a log of a cumsum of exps), and the log says it without the script."""
    file, _, line = (source or "").rpartition(":")
    text = linecache.getline(file, int(line)).strip() if file and line.isdigit() else ""
    return {**evidence, "code": text[:_CODE_CHARS]} if text else evidence


def users(filename: str) -> bool:
    """Whether a frame's file is the user's code: not torch, not gradguard's core, not the stdlib."""
    return not (
        filename.startswith(_TORCH_DIR)
        or (filename.startswith(_PKG_DIR) and not filename.startswith(_USER_DIRS_IN_PKG))
        or filename.startswith(_STDLIB)
        or filename.startswith("<frozen")
    )


def user_values(skip: int = 2) -> Iterator[tuple[str, Any]]:
    """The ``(name, value)`` pairs of the user's frames, innermost first: each frame's locals, then its
    globals (names starting with ``_`` and ``self`` left out)."""
    frame = sys._getframe(skip)
    while frame is not None:
        if users(frame.f_code.co_filename):
            for scope in (frame.f_locals, frame.f_globals):
                for name, value in list(scope.items()):
                    if not name.startswith("_") and name != "self":
                        yield name, value
        frame = frame.f_back  # type: ignore[assignment]


def user_name_of(value: object, skip: int = 2) -> str | None:
    """The name the user's code gave ``value``: a local, else a global, of the innermost user frame
    holding it (``netD`` for a GAN's discriminator built as an ``nn.Sequential``); ``None`` if none."""
    return next((name for name, v in user_values(skip + 1) if v is value), None)


#: Leaves that hold no tensor: skipped without asking the pytree registry.
_ATOMS = frozenset({int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, slice})


def _tensors(tree: Any, into: list[Tensor] | None = None) -> list[Tensor]:
    """The tensors of ``tree`` in :func:`~torch.utils._pytree.tree_flatten`'s order. Plain tuples,
    lists and dicts (an RNN's ``(output, (h, c))``, an op's arguments) are walked here, a few
    hundred nanoseconds where the pytree walk costs tens of microseconds; any other container
    (a namedtuple, a ``ModelOutput``, a registered node) goes to the pytree walk."""
    found = [] if into is None else into
    kind = type(tree)
    if kind is Tensor or isinstance(tree, Tensor):
        found.append(tree)
    elif kind is tuple or kind is list:
        for item in tree:
            if type(item) is Tensor:  # (the usual item: no call)
                found.append(item)
            else:
                _tensors(item, found)
    elif kind is dict:
        for item in tree.values():
            _tensors(item, found)
    elif kind not in _ATOMS:
        found.extend(t for t in tree_flatten(tree)[0] if isinstance(t, Tensor))
    return found


def _floats(tree: Any) -> list[Tensor]:
    """The floating (and complex) tensors of ``tree``, in order."""
    if type(tree) is Tensor:  # the usual model output: no walk
        return [tree] if tree.is_floating_point() or tree.is_complex() else []
    return [t for t in _tensors(tree) if t.is_floating_point() or t.is_complex()]


def _waiting(t: Tensor) -> bool:
    """Whether ``t``, an output the capture keeps, still waits for its gradient in ``.grad`` (a
    leaf, or a large output, never does: its keeper is a hook)."""
    return t.retains_grad and t.grad is None


#: Outputs up to this many elements in all keep their gradient through ``retain_grad()`` (a C++
#: hook, ~7 µs a step cheaper than a Python one on a CPU, but torch stores a *copy* of the
#: gradient); larger ones through a Python pre-hook on their node (a reference, no copy: a 7M-element
#: output's copy cost +2.6 ms a step against +0.17 for the hook, benchmarks/capture_cost.py).
RETAIN_MAX = 2**14


def _readable(t: Tensor) -> Tensor:
    """``t``'s values as a dense tensor the checks below can read: detached; a DTensor gathered
    whole; a sparse tensor (an ``nn.Embedding(sparse=True)`` gradient) as its coalesced values."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    if t.layout is torch.sparse_coo:
        t = t.coalesce()._values()
    return t


def _kinds(t: Tensor) -> list[str]:
    """Which non-finite kinds ``t`` holds (host reads; the anomaly path only)."""
    t = _readable(t)
    out = []
    if bool(torch.isnan(t).any()):
        out.append("nan")
    if bool((t == math.inf).any()):
        out.append("inf")
    if bool((t == -math.inf).any()):
        out.append("-inf")
    return out


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(_readable(t)).all())


_PICKING_LOSSES = frozenset({"cross_entropy", "nll_loss", "nll_loss_nd", "nll_loss2d"})


def _picked_masked(name: str, out_kinds: list[str]) -> bool:
    """A classification loss that came out +inf from logits masked to -inf on purpose: it picked a
    target whose class the mask excludes (rare tokens masked, yet kept as targets) — the loss's own
    birth, not the mask's (the intentional -inf passes through a softmax finite, never to +inf)."""
    return name in _PICKING_LOSSES and "inf" in out_kinds


def _describe(t: Tensor) -> dict[str, Any]:
    """A few numbers that explain a tensor: shape, dtype, non-finite counts, zeros, range."""
    d = _readable(t)
    d = d.float() if d.is_floating_point() else d
    info: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
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


def _saved(node: Any) -> dict[str, dict[str, Any]]:
    """What an autograd node saved from its forward, described: a built-in node's ``_saved_*``
    tensors, a custom Function's ``ctx.saved_tensors``."""
    if _replay.function_class(node) is not None:
        try:
            tensors = node.saved_tensors
        except RuntimeError:  # freed already
            return {}
        return {f"saved_tensors[{i}]": _describe(t) for i, t in enumerate(tensors) if isinstance(t, Tensor)}
    return {
        attr[len("_saved_") :]: _describe(v)
        for attr in dir(node)
        if attr.startswith("_saved_") and isinstance(v := getattr(node, attr, None), Tensor)
    }


def _target_birth(op: str, target: dict[str, Any], source: str | None, order: int) -> Birth:
    """A loss op's saved target held NaN/±inf (a missing value in a regression target, a NaN label): the
    data entering the loss code, as the loss-code watch names it, not the op that received it."""
    kind = "nan" if target.get("nan") else "inf" if target.get("posinf") else "-inf"
    evidence = {
        "consumer": op,
        "input": target,
        "reason": f"the target entering the loss code (at {op}) already held {kind}",
    }
    return Birth("data", None, None, "target", kind, source, order, evidence)


def _custom_reason(cls: str, kind: str, saved: list[dict[str, Any]]) -> str:
    """Why a custom Function's backward is blamed, with what its saved tensors held."""
    zeros = sum(d.get("zeros", 0) for d in saved)
    what = f"; its saved tensors hold {zeros} zero(s) (a division by a saved zero?)" if zeros else ""
    return (f"the custom autograd Function {cls}'s backward returned {kind} from finite incoming gradients"
            f"{what}")  # fmt: skip


def _precision_overflow(
    func: Any, name: str, args: Any, kwargs: Any, dtype: torch.dtype
) -> tuple[str, dict[str, Any]] | None:
    """For an op born non-finite in a 16-bit float: its reason and evidence if the same op in
    float32 is finite (the dtype's range is the fault, under autocast or not), else ``None``."""
    fp32 = _replay.float32_absmax(func, args, kwargs, name) if _replay.reduced(dtype) else None
    if fp32 is None:
        return None
    amp = _replay.active()
    dtype_name, dmax = str(dtype).replace("torch.", ""), float(torch.finfo(dtype).max)
    under = f", under autocast to {amp[0]['dtype']}" if amp else ""
    reason = (
        f"a value above the dtype's max ({dmax:g}) in {dtype_name}{under}: the same {name} in float32 is "
        f"finite (largest magnitude {fp32:.4g})"
    )
    return reason, {"dtype": dtype_name, "dtype_max": dmax, "float32_absmax": fp32, "autocast": amp}


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
            "evidence": with_code(self.evidence, self.source),
        }


class _OpWatch(TorchFunctionMode):
    """Sees every torch-level call: ``on_backward(args)`` for ``backward()``, ``on_op`` after the others."""

    def __enter__(self) -> Any:
        _warn_from_the_caller()
        return super().__enter__()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if (
            name in _SKIP_FUNCS or in_transform() is not None
        ):  # (inside vmap / grad: wrapper tensors, not read)
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


# ----------------------------------------------------------------------------- warnings of watched calls
_WATCH_CODES: set[Any] = set()  # the watches' __torch_function__ code objects (filled below)
_OVERRIDES = os.path.normcase(torch.overrides.__file__)
_TORCH_DIR = os.path.normcase(os.path.dirname(torch.__file__)) + os.sep
_ORIGINAL_WARN = warnings.warn


def _warn(message: Any, category: Any = None, stacklevel: int = 1, source: Any = None, **kwargs: Any) -> None:
    """``warnings.warn`` whose ``stacklevel`` skips a watch's call: a torch function called through
    a watch (``F.mse_loss`` warning of a broadcast, ``stacklevel=2``) warned at the watch's line, in
    gradguard's file, and its "once per location" then hid the same warning from every other line.
    The frames of the watch, torch's dispatch to it and the function's first entry are skipped, so
    the warning names the line it names without gradguard (and its registry is that line's module)."""
    level = max(1, int(stacklevel))
    here = sys._getframe(1)  # the function that warned
    target: Any = here
    inner = set()
    for _ in range(level - 1):
        if target is None:
            break
        inner.add(target.f_code)
        target = target.f_back
    skip = 0
    if target is not None and target.f_code in _WATCH_CODES:
        while target is not None and target.f_code in _WATCH_CODES:
            target, skip = target.f_back, skip + 1
        while target is not None and os.path.normcase(target.f_code.co_filename) == _OVERRIDES:
            target, skip = target.f_back, skip + 1
        if target is not None and target.f_code in inner:  # the function's first entry (which dispatched)
            target, skip = target.f_back, skip + 1
        _note(message, category, target)
    _ORIGINAL_WARN(message, category, level + 1 + skip, source, **kwargs)  # (3.12's skip_file_prefixes)


#: the torch warnings raised in watched calls (the loss code), by text: ``{text: "file:line"}``, at most
#: :data:`_NOTED_MAX` (a broadcast in ``mse_loss``, an implicit softmax dim: often the bug of a run that
#: does not train). The zero-code runner writes them into ``meta.json`` (``loss_code_warnings``).
WATCHED_WARNINGS: dict[str, str] = {}
_NOTED_MAX = 8


def _note(message: Any, category: Any, frame: Any) -> None:
    """Keep a watched call's warning, with the script's line that made it (the first frame above
    ``frame`` outside torch: ``criterion(out, y)``, not ``torch/nn/modules/loss.py``)."""
    if len(WATCHED_WARNINGS) >= _NOTED_MAX:
        return
    kind = type(message) if isinstance(message, Warning) else (category or UserWarning)
    text = f"{kind.__name__}: {message}"[:300]
    while frame is not None and os.path.normcase(frame.f_code.co_filename).startswith(_TORCH_DIR):
        frame = frame.f_back
    WATCHED_WARNINGS.setdefault(
        text, f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else ""
    )


_THIS_FILE = os.path.normcase(__file__)
_ORIGINAL_SHOW = warnings.showwarning


def _show(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """``warnings.showwarning`` for a warning torch raised in C++ (``TORCH_WARN``: ``torch.tensor(t)``'s
    "To copy construct…") during a watched call: Python names the innermost Python frame, a watch's
    ``__torch_function__`` in this file. It is shown (and kept, as :func:`_warn` keeps a Python one)
    at the script's line that called torch, as without gradguard."""
    if os.path.normcase(filename) == _THIS_FILE:
        frame = sys._getframe(1)
        while frame is not None and (
            os.path.normcase(frame.f_code.co_filename) in (_THIS_FILE, _OVERRIDES)
            or os.path.normcase(frame.f_code.co_filename).startswith(_TORCH_DIR)
            or frame.f_code.co_filename == warnings.__file__
        ):
            frame = frame.f_back  # type: ignore[assignment]
        if frame is not None:
            _note(message, category, frame)
            filename, lineno, line = frame.f_code.co_filename, frame.f_lineno, None
    _ORIGINAL_SHOW(message, category, filename, lineno, file, line)


def _warn_from_the_caller() -> None:
    """Route ``warnings.warn`` through :func:`_warn` and the C++ warnings' display through :func:`_show`
    (once each, unless the script replaced them; pass-throughs outside a watch's call)."""
    if warnings.warn is _ORIGINAL_WARN:
        warnings.warn = _warn  # type: ignore[assignment]
    if warnings.showwarning is _ORIGINAL_SHOW:
        warnings.showwarning = _show


class _Mode(_OpWatch):
    """The :class:`Locator`'s watch. Before a functional wrapper (``multi_head_attention_forward``,
    SDPA) it notes the RNG state, so the wrapper can be rerun as it ran (see :meth:`Locator._inner`)."""

    def __init__(self, loc: Locator) -> None:
        super().__init__()
        self.loc = loc

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        self.loc._wrapper_rng = rng_state() if _replay.is_wrapper(func, name) else None
        return super().__torch_function__(func, types, args, kwargs)

    def on_backward(self, args: Any) -> None:
        if self.loc.phase != "backward":  # the graph's nodes no op of the watch made (a custom Function's)
            self.loc._hook_graph(_floats(args[:1]), None, None)
        self.loc.phase = "backward"
        if args and isinstance(args[0], Tensor) and args[0].numel() == 1:
            self.loc.loss = args[0]  # what the block differentiates: the loss

    def on_op(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        self.loc._after_op(func, args, kwargs, out)


class Locator:
    """Full instrumentation of a model for one block of code (a replayed step, or a notebook cell).

    Costs a host read per op output and per autograd node: use it on anomalies only.

    Args:
        model: the root module (the block calls it; its input is the step's data).
        names: the module whose ``named_modules()`` and ``named_parameters()`` name the modules and
            parameters in the answer, where it holds ``model`` (a LightningModule holding the
            ``self.net`` its step calls); else (``None``, or a module inside ``model``: DDP's
            ``.module``) ``model`` itself.
    """

    def __init__(self, model: nn.Module, names: nn.Module | None = None) -> None:
        self.model = model
        # (a wrapper the guard's model sits inside, DDP's or torch.compile's, names itself)
        outer = names if names is not None and any(m is model for m in names.modules()) else model
        self._names = {id(m): name for name, m in outer.named_modules()}
        self._params = {name: p for name, p in outer.named_parameters()}
        self._buffers = {name: b for name, b in outer.named_buffers() if b.is_floating_point()}
        self._reset()

    def _reset(self) -> None:
        self.phase = "data"
        self.stack: list[str] = []
        self.order = 0
        self.births: list[Birth] = []
        self.backward_birth: Birth | None = None
        self._taint: dict[int, tuple[weakref.ref[Tensor], frozenset[int]]] = {}
        self._hooked: list[Any] = []  # nodes kept alive while their hooks may fire
        self._seen_nodes: set[int] = set()  # ids of the nodes in _hooked (hooked, or walked past)
        self._first_node = 0  # the sequence number of the first autograd node made in the watch
        self._wrapper_rng: dict[str, Any] | None = None  # the RNG before the current wrapper call
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
            self._classify(name, args, kwargs, bad_outs, func)
        if self.phase != "backward" or _graph_task() == -1:
            # (outside any backward: also after a nested one, a gradient penalty's autograd.grad in
            # the loss code, whose later ops — sqrt of the gradient's norm — the main backward runs)
            self._hook_graph(outs, name, None)

    def _hook_graph(self, outs: list[Tensor], name: str | None, source: str | None) -> None:
        """Hook the autograd nodes the op made: its output's node (named by the op) and the nodes
        behind it that no watched call made: a functional wrapper's inner ops (each by its own
        name: ``softmax`` inside ``multi_head_attention_forward``), a custom Function's node
        (``MyClampGrad.backward``, its source the Function's ``backward``). Nodes that only move
        gradients (views, transposes, cat) are walked past, not hooked: they cannot be a birth."""
        for o in outs:
            root = o.grad_fn
            if root is None or not o.requires_grad or id(root) in self._seen_nodes:
                continue
            if source is None:
                source = user_source(3)
            for node in _replay.new_nodes(root, self._seen_nodes, self._hooked, self._first_node):
                if _replay.moves_only(node):
                    continue
                custom = _replay.function_class(node)
                if custom is not None:
                    label, where = _replay.function_name(custom), _replay.function_source(custom)
                else:
                    label, where = (name if node is root and name else node_op_name(node)), source
                self._hook_node(node, label, self._module(), where, self.phase)

    def _classify(self, name: str, args: Any, kwargs: Any, bad_outs: list[Tensor], func: Any = None) -> None:
        leaves = tree_flatten((args, kwargs))[0]
        scalar_written = any(isinstance(v, float) and math.isinf(v) for v in leaves)
        nan_written = any(isinstance(v, float) and math.isnan(v) for v in leaves)
        inputs = [t for t in leaves if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]
        bad_inputs = [t for t in inputs if not _finite(t)]
        in_taint: set[int] = set()
        for t in bad_inputs:
            taint = self._taint_of(t)
            in_taint |= taint if taint is not None else self._untracked(t)
        out_kinds = sorted({k for o in bad_outs for k in _kinds(o)})
        in_nan = any("nan" in _kinds(t) for t in bad_inputs)
        kind = "nan" if "nan" in out_kinds else out_kinds[0]
        if scalar_written and not nan_written and not bad_inputs:
            taint = frozenset({-1})  # written on purpose: masked_fill(-inf), full(-inf)
        elif nan_written and not bad_inputs:  # the code wrote a NaN (h + nan, full(nan)): never a mask
            ev = {
                "inputs": [_describe(t) for t in inputs[:4]],
                "reason": f"{name} was given a NaN number by the code",
            }
            taint = frozenset(
                {self._birth(self.phase, self._module(), name, "output", kind, user_source(4), ev)}
            )
        elif not bad_inputs or (
            in_taint <= {-1} and (("nan" in out_kinds and not in_nan) or _picked_masked(name, out_kinds))
        ):
            source = user_source(4)
            op, evidence = self._evidence(name, func, args, kwargs, inputs, bad_outs, kind)
            phase = self.phase if self.phase != "backward" else "backward"
            taint = frozenset({self._birth(phase, self._module(), op, "output", kind, source, evidence)})
        else:
            taint = frozenset(in_taint)
        for o in bad_outs:
            self._set_taint(o, taint)
            if self.first_output is None:
                self.first_output = o

    def _evidence(self, name: str, func: Any, args: Any, kwargs: Any, inputs: list[Tensor], bad_outs: list[Tensor],
                  kind: str) -> tuple[str, dict[str, Any]]:  # fmt: skip
        """The op to name for a birth and what explains it: the innermost op of a functional wrapper
        (with the wrapper as evidence), its inputs, the reason; a 16-bit float result that is
        finite in float32 is a precision overflow (the dtype's range is the fault). Only the first
        :data:`_MAX_RERUNS` births are rerun (the answer is the earliest; the replay stays bounded)."""
        op, extra, operands = name, dict[str, Any](), args
        func = func if len(self.births) < _MAX_RERUNS else None
        inner = self._inner(func, name, args, kwargs)
        if inner is not None:
            inputs, operands = inner.inputs, inner.args
            op = name if "loss" in inner.op else _replay.inner_name(inner.op, name)
            extra = {"inside": name, "inner_op": inner.op} if op != name else {"inner_op": inner.op}
        number = _inputs.number_operand(  # ``x / self.temperature``: the number that reached 0
            _replay.inner_name(inner.op, name) if inner else op,
            operands,
            reflected=inner is None and reflected(func),
        )
        ev_inputs = _inputs.with_number([_describe(t) for t in inputs[:4]], number)
        dtype = bad_outs[0].dtype
        dmax = float(torch.finfo(dtype).max) if dtype.is_floating_point else None
        reason = explain(op, ev_inputs, kind, dmax)
        overflow = _precision_overflow(func, name, args, kwargs, dtype) if func is not None else None
        if overflow is not None:
            reason, extra["precision"] = overflow
        custom = _replay.running_forward()
        if custom is not None:  # born inside a custom autograd Function's forward: its fault too
            extra["function"] = f"{custom.__qualname__}.forward"
            reason += f" (inside the custom autograd Function {custom.__name__}.forward)"
        return op, {"inputs": ev_inputs, "reason": reason, **extra}

    def _inner(self, func: Any, name: str, args: Any, kwargs: Any) -> _replay.Inner | None:
        """For a functional wrapper born non-finite: the innermost op that made the value (the
        wrapper rerun once from the RNG state it started from), else ``None``."""
        if func is None or not _replay.is_wrapper(func, name):
            return None
        return _replay.innermost_birth(func, args, kwargs, self._wrapper_rng)

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
        for name, b in self._buffers.items():
            if t is b or (t.data_ptr() == b.data_ptr() and t.shape == b.shape):
                ev = {"buffer": name, **_describe(b), "reason": f"the buffer {name} already held {_kinds(b)[0]} "
                      "before this forward (state kept across steps: a running statistic a bad batch updated, "
                      "or a value the code set)"}  # fmt: skip
                idx = self._birth("forward", name.rpartition(".")[0], None, "buffer", _kinds(b)[0], None, ev)
                self._set_taint(t, frozenset({idx}))
                return {idx}
        custom = _replay.function_class(t.grad_fn)
        if custom is not None:  # a custom Function's forward made it with no op the watch saw
            op = _replay.function_name(custom, "forward")
            ev = {"function": custom.__qualname__, "output": _describe(t),
                  "reason": f"the custom autograd Function {custom.__name__}'s forward returned {_kinds(t)[0]}"}  # fmt: skip
            idx = self._birth(self.phase, self._module(), op, "output", _kinds(t)[0],
                              _replay.function_source(custom, "forward"), ev)  # fmt: skip
            self._set_taint(t, frozenset({idx}))
            return {idx}
        # a constant or an attribute the forward did not make, holding NaN (±inf alone: a mask built before
        # the forward, an attention mask, as masked_fill(-inf) inside it)
        if self.phase == "forward" and t.grad_fn is None and "nan" in _kinds(t):
            ev = {"input": _describe(t), "reason": f"a tensor the forward did not make already held {_kinds(t)[0]} "
                  "(a plain tensor attribute of a module, a global, or a constant built from a NaN)"}  # fmt: skip
            idx = self._birth("forward", self._module(), None, "state", _kinds(t)[0], user_source(5), ev)
            self._set_taint(t, frozenset({idx}))
            return {idx}
        return set()

    # ------------------------------------------------------------------ module hooks
    def _pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        name = self._names.get(id(module))
        if name is None or in_transform() is not None:  # a forward inside vmap / grad: left alone
            return
        if self._outermost(module):
            self.phase = "forward"
            for t in _floats((args, kwargs)):
                if self._taint_of(t) is None and not _finite(t):
                    idx = self._data_birth(module, args, kwargs, t)
                    self._set_taint(t, frozenset({idx}))
        self.stack.append(name)

    def _data_birth(self, module: nn.Module, args: Any, kwargs: Any, t: Tensor) -> int:
        """A non-finite tensor passed to the model: the data, named by its argument (``labels=``: the label)."""
        role, ev = _data_evidence(module, args, kwargs, t)
        return self._birth("data", None, None, role, _kinds(t)[0], user_source(4), ev)

    def _post(self, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if self._names.get(id(module)) is None or in_transform() is not None:
            return
        if self.phase != "backward":  # nodes made in this module by no watched call: a custom Function's
            outs = _floats(out)
            self._hook_graph(outs, None, None)
            for o in outs:  # a custom Function's output born in this module, opaque to the watch
                if _replay.function_class(o.grad_fn) is None or self._taint_of(o) is not None:
                    continue
                if not _finite(o):
                    self._set_taint(o, frozenset(self._untracked(o)))
        if self.stack:
            self.stack.pop()
        if self._outermost(module):
            self.phase = "loss"

    def _outermost(self, module: nn.Module) -> bool:
        """Whether ``module`` is the forward's outermost call: the root, or a member called while no
        watched module is (a ``ModuleDict`` root that is never called itself: the embedder and the
        head the step calls one after the other are both the forward, not the data)."""
        return module is self.model or not self.stack

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
            saved = _saved(node)
            ev_inputs = list(saved.values())
            kind = "nan" if "nan" in kinds else kinds[0]
            op = name if name else node_op_name(node)
            target = saved.get("target")
            if target is not None and any(target.get(k) for k in ("nan", "posinf", "neginf")):
                self.backward_birth = _target_birth(
                    op, target, source, self.order
                )  # the data's, not the op's
                return
            dtype = next(g.dtype for g in returned if not _finite(g))
            dmax = float(torch.finfo(dtype).max) if _replay.reduced(dtype) else None
            why = explain(op, ev_inputs, kind, dmax)
            custom = _replay.function_class(node)
            if custom is not None:
                why = _custom_reason(custom.__name__, kind, ev_inputs)
            evidence = {
                "node": node.name(),
                "saved": saved,
                "reason": why + " (in backward: the forward was finite)",
            }
            if custom is not None:
                evidence["function"] = custom.__qualname__
            self.backward_birth = Birth("backward", module, op, "grad", kind, source, self.order, evidence)

        node.register_hook(hook)  # lives as long as the graph: it fires in the backward after the watch

    # ------------------------------------------------------------------ run
    @contextlib.contextmanager
    def watch(self) -> Iterator[Locator]:
        """Instrument the block: module hooks, the function mode and node hooks; removed on exit."""
        self._reset()
        self._first_node = _replay.sequence_now()
        for module in self.model.modules():
            if isinstance(module, torch.jit.ScriptModule):  # no Python hooks: its ops are opaque to the watch
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, with_kwargs=True, always_call=True))
        mode = _Mode(self)
        mode.__enter__()
        try:
            yield self
        finally:
            _leave(mode)  # wherever it is: an armed window over the loss code may end under another mode
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._hooked.clear()
            self._seen_nodes.clear()

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
        _REPLAYS[0] += 1
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
            _REPLAYS[0] -= 1
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

    It also notes the loss (what ``backward()`` is called on); after ``backward()`` only ops run
    under grad mode are kept (a second loss on the same forward, another optimizer's), not
    clipping (``no_grad``); the window closes at the next step or forward.

    Evidence, as the replay gives it: the answer describes the located op's inputs (for a backward
    node, its forward op's inputs: zeros, negatives, ±1, fully masked rows; a cross-entropy's
    ignored targets) so the reason and fix come from what the op saw. A tensor *entering* the loss
    code — neither the model's output (``made``) nor made by a watched op nor a parameter, e.g. a
    regression target or a soft label — is noted at its op (two attribute reads per input); if it
    held NaN/±inf the answer is the data's (``phase: "data"``, ``tensor``: ``target``, ``label`` or
    ``loss input``; see :mod:`gradguard._inputs`), not the op that received it.

    Args:
        limit: loss-code ops kept per window (the budget of one forward's loss code, or of one
            optimizer's when several step the model: see :meth:`StepCapture.release`).
        made: the model's output tensors (what the loss code gets from the model, not the data).
        grad_only: keep only ops run under grad mode (a window opened at an optimizer step, whose
            own ops run under ``no_grad``).
    """

    def __init__(self, limit: int = 64, made: list[Tensor] | None = None, *, grad_only: bool = False) -> None:
        super().__init__()
        self.limit = limit
        self.grad_only = grad_only  # keep only ops under grad mode (not an optimizer's own step)
        self.entries: list[_Watched] = []  # the loss-code ops, then the backward nodes, in order
        self.loss: Tensor | None = None
        self.done = False  # backward() was called: the loss code is over
        self._sums: list[float] | Tensor | None = None  # after compact(): one sum per kept tensor
        self._handles: list[Any] = []
        self._pid = os.getpid()
        self._made = {id(t) for t in made or ()}  # tensors the model or a watched op made
        self.entered: Tensor | None = None  # the non-finite tensor that entered (after answer())
        self._functions: set[int] = set()  # custom Function nodes hooked (ids; the graph keeps them alive)

    def on_backward(self, args: Any) -> None:
        if args and isinstance(args[0], Tensor):
            self.loss = args[0]
            if not self.done and os.getpid() == self._pid:
                self._hook_functions([args[0]])
        self.done = True

    def _hook_functions(self, ins: list[Tensor]) -> None:
        """Hook the node of a custom ``torch.autograd.Function`` whose output reaches the loss code
        (``Function.apply`` never reaches the watch's dispatch): its backward is watched as an op of
        its own, ``Cls.backward``, at its ``def backward`` line (one attribute read per input)."""
        for t in ins:
            node: Any = t.grad_fn
            cls = _replay.function_class(node) if node is not None else None
            if cls is None or id(node) in self._functions:
                continue
            self._functions.add(id(node))
            try:  # what its backward will read (references, kept until the window ends)
                saved = [s for s in node.saved_tensors if isinstance(s, Tensor) and s.is_floating_point()]
            except RuntimeError:  # freed already, or a Function that saved nothing readable
                saved = []
            entry = _Watched(_replay.function_name(cls), _replay.function_source(cls), "loss", [], saved)
            entry.function = cls.__qualname__
            self._handles.append(node.register_hook(self._node_hook(entry)))

    def on_op(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        if len(self.entries) >= self.limit or os.getpid() != self._pid:
            return  # a forked child (a DataLoader worker) inherits the mode: it watches nothing there
        if self.grad_only and not torch.is_grad_enabled():
            return
        outs = _floats(out)
        if not outs or (self.done and not torch.is_grad_enabled()):
            return  # integer data; after backward(), clipping (a no_grad block)
        op = _op_name_kept(func)
        source = user_source(2)
        ins = _floats((args, kwargs))
        entry = _Watched(op, source, "loss", outs, ins)
        entry.entering = self._entering(op, args, kwargs, ins)
        self._hook_functions(ins)
        entry.target = _inputs.target_of(op, args, kwargs)
        back = reflected(func)
        entry.number = _inputs.number_operand(op, args, reflected=back)
        entry.scale = _inputs.scale_operand(op, args, reflected=back)
        self.entries.append(entry)
        for o in outs:
            self._made.add(id(o))
            node = o.grad_fn
            if node is not None and o.requires_grad:
                self._handles.append(node.register_hook(self._node_hook(entry)))

    def terms(self, loss: Tensor) -> dict[str, Any] | None:
        """The additive terms of ``loss`` (``ce + gp_weight * penalty``), from the ops that made it:
        ``{"source": the sum's line, "terms": [...]}``, each term's value (a detached device scalar:
        nothing is read), the Python number it was multiplied by (``weight``), its op and line; ``None``
        when the loss is not a sum of scalar terms the watch saw."""
        made = {id(o): e for e in self.entries if e.phase == "loss" and e.unchanged() for o in e._outs}
        top = made.get(id(loss))
        if top is None or top.op not in _ADDITIONS or top.n_in != 2:
            return None
        found: list[dict[str, Any]] = []
        todo, sums = list(top._ins), 1
        while todo and len(found) < _TERMS_MAX:
            t = todo.pop(0)
            e = made.get(id(t))
            if e is not None and e.op in _ADDITIONS and e.n_in == 2 and sums < _TERMS_MAX:
                todo[:0], sums = list(e._ins), sums + 1
            elif t.numel() == 1:
                inner = made.get(id(e._ins[0])) if e is not None and e.scale is not None and e._ins else None
                found.append(
                    {
                        "value": t.detach().reshape(()),
                        "weight": e.scale if e is not None else None,
                        "op": (inner or e).op if e is not None else "input",
                        "source": (inner or e).source if e is not None else None,
                    }
                )
            else:
                return None
        return {"source": top.source, "terms": found} if len(found) >= 2 and not todo else None

    def probability_inputs(self) -> list[dict[str, Any]]:
        """The logits losses of the loss code given probabilities: per ``cross_entropy`` (rows in [0, 1]
        summing to 1: a softmax before it), ``binary_cross_entropy_with_logits`` (all in [0, 1]: a
        sigmoid before it) and ``nll_loss`` (all ≥ 0: probabilities, not log-probabilities), its op,
        line and a device flag (nothing is read: :class:`~gradguard.integrations.zerocode.runner.ZeroCode`
        reads the flags at the end of the run)."""
        found = []
        for e in self.entries:
            check = _PROBABILITY_CHECKS.get(e.op)
            if (
                e.phase != "loss"
                or check is None
                or not e._ins
                or not e.unchanged()
                or e._ins[0].numel() == 0
            ):
                continue
            with torch.no_grad():
                flag = check(e._ins[0].detach())
            found.append({"op": e.op, "source": e.source, "flag": flag})
        return found

    def scale_of(self, loss: Tensor) -> tuple[float, str | None] | None:
        """The Python-number factor the last op applied to ``loss`` (``loss / accumulation_steps``: 0.25)
        and that op's line; 1.0 for an op that scales nothing; ``None`` when the watch did not see ``loss``
        made or a tensor scaled it."""
        made = next((e for e in self.entries if e.phase == "loss" and any(o is loss for o in e._outs)), None)
        if made is None or (made.scale is None and made.op in ("mul", "div", "true_divide")):
            return None  # (not seen, or scaled by a tensor: a token count, a mask's sum — unknown)
        return (made.scale, made.source) if made.scale is not None else (1.0, None)

    def criteria(self) -> list[dict[str, Any]]:
        """The loss functions of the loss code (``cross_entropy``, ``mse_loss``…): each op, its line and,
        for a classification loss, its number of classes (the input's class dimension); for ``mse_loss``, the
        variance of its target (a device scalar, read at the end of the run)."""
        found = []
        for e in self.entries:
            if e.phase != "loss" or e.op not in _CRITERIA or not e._ins:
                continue
            x = e._ins[0]
            classes = (
                (x.shape[1] if x.dim() > 1 else x.shape[0]) if e.op in _CLASSIFIERS and x.dim() else None
            )
            entry: dict[str, Any] = {"op": e.op, "source": e.source, "classes": classes}
            scaled = next(
                (w for w in self.entries if w.scale is not None and any(o is x for o in w._outs)), None
            )
            if e.op in _CLASSIFIERS and scaled is not None and abs(scaled.scale or 0) >= _LOGIT_SCALE:
                entry["logit_scale"] = scaled.scale  # (logits / temperature: 1000 for 0.001)
                entry["scaled_at"] = scaled.source
            if e.op == "mse_loss" and len(e._ins) > 1 and e._ins[1].numel() > 1:
                with (
                    torch.no_grad()
                ):  # the targets' variance: the loss of predicting their mean (a device scalar)
                    target = e._ins[1].detach().float()
                    entry["target_variance"] = (target - target.mean()).pow(2).mean()
            found.append(entry)
        return found

    def leaves(self) -> list[Tensor]:
        """The floating tensors that entered the loss code (while the references are kept)."""
        return [t for e in self.entries if e.entering for t, r in zip(e._ins, e.entering) if r is not None]

    def _entering(self, op: str, args: Any, kwargs: Any, ins: list[Tensor]) -> tuple[str | None, ...] | None:
        """The role of each input that enters the loss code here (``None``: made in the step), or
        ``None`` when all were made in the step (the usual op: no allocation)."""
        made = self._made
        fresh = [id(t) not in made and t.grad_fn is None and not t.requires_grad for t in ins]
        if not any(fresh):
            return None
        return tuple(_inputs.entering_role(op, args, kwargs, t) if f else None for t, f in zip(ins, fresh))

    def _node_hook(self, forward: _Watched) -> Callable[..., None]:
        def hook(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]) -> None:
            returned = [g for g in grad_inputs if g is not None]
            if returned and len(self.entries) < 2 * self.limit and self._sums is None:
                incoming = [g for g in grad_outputs if g is not None]
                entry = _Watched(forward.op, forward.source, "backward", returned, incoming)
                entry.forward = forward
                self.entries.append(entry)

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
        """The first loss-code op (or its backward node) that made a non-finite value from finite
        inputs — or from intentional infinities only (a NaN out of ±inf, e.g. a softmax over a row
        a mask filled with -inf) — or the first non-finite tensor that entered the loss code."""
        if not self.entries:
            return None
        sums = self._host_sums()  # host sync: the anomaly path only
        i = 0
        for e in self.entries:
            if not e.judged:
                continue
            outs, ins = sums[i : i + e.n_out], sums[i + e.n_out : i + e.n_out + e.n_in]
            i += e.n_out + e.n_in
            # a non-finite input entered only where it went on into the op's output: a DataLoader indexing a
            # dataset tensor that holds one NaN row made every rank's batch "a loss input that held nan"
            passed_on = not outs or any(not math.isfinite(s) for s in outs)
            entered = e.bad_entering(ins) if passed_on else None
            if entered is not None:
                self.entered = e._ins[entered] if entered < len(e._ins) else None
                return e.data_event(entered, ins[entered])
            bad = [s for s in outs if not math.isfinite(s)]
            if bad and (all(math.isfinite(s) for s in ins) or e.nan_from_infinities(bad[0], ins)):
                return e.event(bad[0], underflow=self._underflow_origin(e))
        return None

    def _underflow_origin(self, e: _Watched) -> str | None:
        """Where a division's zero denominator came from, where it is an ``exp`` (or ``exp2``) of the loss
        code whose output holds zeros, a few ops up (``K = exp(-C / eps)`` then ``a / (K @ v)``: a plain-domain
        Sinkhorn, a softmax written by hand): ``"exp at train.py:31"``; ``None`` otherwise. The fix is then the
        exp's (log space), not an eps on the denominator (which left that run finite and untrained).
        Host reads: the anomaly path only."""
        producers = _UNDERFLOWING.get("div" if e.op in _DIVISIONS else e.op)
        if e.phase != "loss" or producers is None or not e._ins:
            return None
        made = {id(o): w for w in self.entries if w is not e for o in w._outs}
        todo, seen = [e._ins[-1] if e.op in ("div", "true_divide") else e._ins[0]], set()
        for _ in range(8):  # a few ops up: a matmul, a sum, a squeeze between the exp and the division
            if not todo:
                return None
            t = todo.pop(0)
            w = made.get(id(t))
            if w is None or id(w) in seen or not w.unchanged():
                continue
            seen.add(id(w))
            if w.op in producers and any(bool((o == 0).any()) for o in w._outs):
                return f"{w.op} at {w.source}" if w.source else w.op
            todo.extend(w._ins)
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


_DIVISIONS = frozenset({"div", "true_divide", "reciprocal", "rsqrt"})
#: an op whose zero input may come from an op that underflowed to 0 a few ops up: those ops
#: (LossWatch._underflow_origin; "div" stands for every division)
_UNDERFLOWING = {
    "div": ("exp", "exp2"),
    "log": ("softmax", "_softmax", "sigmoid"),
    "log2": ("softmax", "_softmax", "sigmoid"),
    "log10": ("softmax", "_softmax", "sigmoid"),
}


def _unit_interval(x: Tensor) -> Tensor:
    return ((x >= 0) & (x <= 1)).all()


def _distributions(x: Tensor) -> Tensor:
    """Rows (the class dimension, 1; 0 for one unbatched row) in [0, 1] that sum to 1."""
    rows = x.float().sum(dim=1 if x.dim() > 1 else 0)
    return _unit_interval(x) & ((rows - 1).abs() <= 1e-3).all()


#: the device check of each logits loss whose input reads as probabilities (LossWatch.probability_inputs)
def _sigmoid_outputs(x: Tensor) -> Tensor:
    """``[all in [0, 1], some at an edge of it]``: a sigmoid's outputs once training pushed them (the bug's
    model drives its inner logits toward ±inf, its outputs to 0 or 1: a one-vs-rest head's negatives near
    0); raw logits of a weak signal sit in a band inside [0, 1] by chance, away from both edges (a click
    model's prior bias: 0.55–0.85)."""
    flat = x.float().reshape(-1)
    edge = (flat.min() <= _SIGMOID_EDGE) | (flat.max() >= 1 - _SIGMOID_EDGE)
    return torch.stack([_unit_interval(flat), edge])


_SIGMOID_EDGE = 0.05
_PROBABILITY_CHECKS: dict[str, Callable[[Tensor], Tensor]] = {
    "cross_entropy": _distributions,
    "binary_cross_entropy_with_logits": _sigmoid_outputs,
    "nll_loss": lambda x: (x >= 0).all(),
}
_CLASSIFIERS = frozenset({"cross_entropy", "nll_loss", "nll_loss_nd", "nll_loss2d"})
_CRITERIA = _CLASSIFIERS | frozenset(
    {
        "binary_cross_entropy", "binary_cross_entropy_with_logits", "mse_loss", "l1_loss", "smooth_l1_loss",
        "huber_loss", "kl_div", "ctc_loss", "poisson_nll_loss", "gaussian_nll_loss", "cosine_embedding_loss",
        "margin_ranking_loss", "triplet_margin_loss", "hinge_embedding_loss", "multilabel_soft_margin_loss",
    }
)  # fmt: skip
_LOGIT_SCALE = 50.0  # a classification loss's logits multiplied by this much or more (÷ a temperature ≤ 0.02)
_ADDITIONS = frozenset({"add", "sub"})  # (``a + b``, ``a - b``, ``sum([a, b])``, ``torch.add``)
_TERMS_MAX = 8  # the terms of a loss followed (LossWatch.terms)

_WATCH_CODES.update(
    cls.__dict__["__torch_function__"].__code__
    for cls in (_OpWatch, _Mode, LossWatch)
    if "__torch_function__" in cls.__dict__
)


def _sum(t: Tensor) -> Tensor:
    """A float32 sum on the device: non-finite when ``t`` holds a NaN or an infinity (the kind tells which)."""
    d = _readable(t)
    return d.sum(dtype=torch.float32) if d.is_floating_point() else d.abs().sum().float()


class _Watched:
    """One op of the loss code (or one autograd node of its backward), by reference.

    ``entering``: per input, its role if it entered the loss code here (see :class:`LossWatch`);
    ``target``: a cross-entropy's integer target and ``ignore_index``; ``forward``: for a backward
    node, the forward op that made it (whose inputs explain a non-finite gradient).
    """

    __slots__ = (
        "_ins", "_outs", "entering", "forward", "function", "judged", "n_in", "n_out", "number", "op", "phase",
        "scale", "source", "target", "versions",
    )  # fmt: skip

    def __init__(
        self, op: str, source: str | None, phase: str, outs: list[Tensor], ins: list[Tensor]
    ) -> None:
        self.op, self.source, self.phase = op, source, phase
        self._outs, self._ins = outs, ins
        self.n_out, self.n_in = len(outs), len(ins)
        self.versions = [t._version for t in (*outs, *ins)]
        self.judged = True
        self.entering: tuple[str | None, ...] | None = None
        self.target: tuple[Tensor, int] | None = None
        self.number: dict[str, Any] | None = None  # a Python number operand (``logits / tau``), described
        self.scale: float | None = None  # the factor of a multiplication or division by a Python number
        self.forward: _Watched | None = None
        self.function: str | None = None  # a custom autograd Function's class (its backward is the op)

    def tensors(self) -> list[Tensor]:
        return [*self._outs, *self._ins]

    def unchanged(self) -> bool:
        """No watched tensor was written in place since the op (its values are the op's)."""
        return [t._version for t in self.tensors()] == self.versions

    def drop(self) -> None:
        self._outs, self._ins = [], []
        self.target = None

    def bad_entering(self, ins: list[float]) -> int | None:
        """The index of the first input that entered the loss code here non-finite (an infinite
        one at an op that takes ±inf masks on purpose is left alone), or ``None``."""
        if self.entering is None or self.phase != "loss":
            return None
        for k, (role, total) in enumerate(zip(self.entering, ins)):
            intentional = not math.isnan(total) and _inputs.is_mask_op(self.op)  # a ±inf mask
            if role is not None and not math.isfinite(total) and not intentional:
                return k
        return None

    def nan_from_infinities(self, out: float, ins: list[float]) -> bool:
        """A loss-code op that made NaN from inputs holding ±inf but no NaN (a softmax over a row a
        mask filled with -inf): a birth of its own, as in the replay."""
        return self.phase == "loss" and math.isnan(out) and not any(map(math.isnan, ins))

    def data_event(self, k: int, total: float) -> dict[str, Any]:
        """The answer for a non-finite tensor that entered the loss code as this op's input ``k``."""
        role = self.entering[k] if self.entering is not None else "loss input"
        kind = events.kind_of(total)
        evidence: dict[str, Any] = {"consumer": self.op, "argument": k}
        if k < len(self._ins):
            evidence["input"] = _describe(self._ins[k])  # host reads: the anomaly path
        evidence["reason"] = f"the {role} entering the loss code (at {self.op}) already held {kind}"
        return {
            "phase": "data",
            "module": None,
            "op": None,
            "tensor": role,
            "kind": kind,
            "source": self.source,
            "evidence": evidence,
        }

    def describe(self) -> list[dict[str, Any]]:
        """What the op's inputs held (a backward node: its forward op's), as the replay describes
        them; ``[]`` once the references were dropped (host reads: the anomaly path)."""
        op = self.forward if self.forward is not None else self
        if (not op._ins and op.n_in) or not op.unchanged():
            return []
        described = _inputs.with_number([_describe(t) for t in op._ins[:4]], op.number)
        if op.target is not None:
            described.append(_inputs.target_description(*op.target))
        return described

    def event(self, total: float, *, underflow: str | None = None) -> dict[str, Any]:
        """The ``nonfinite`` event's fields; ``underflow``: where the division's zero denominator came
        from (:meth:`LossWatch._underflow_origin`), said in its input's description."""
        suffix = " (in backward: the forward was finite)" if self.phase == "backward" else ""
        kind = events.kind_of(total)
        inputs = self.describe()
        if underflow is not None and inputs:
            inputs[-1 if self.op in ("div", "true_divide") and len(inputs) > 1 else 0]["underflow"] = (
                underflow
            )
        function = self.forward.function if self.forward is not None else self.function
        if function is not None:  # a custom Function's backward: named by class, its saved tensors
            evidence: dict[str, Any] = {"saved": inputs, "function": function}
            evidence["reason"] = _custom_reason(function.rsplit(".", 1)[-1], kind, inputs) + suffix
        elif inputs or (self.forward or self).n_in == 0:
            # an inf from finite inputs is an overflow only in a reduced dtype (fp16 under autocast);
            # in float32 it is the op's own edge (an impossible CTC target, exp's overflow has its cause)
            dtype = self._outs[0].dtype if self._outs and self.phase == "loss" else None
            dmax = float(torch.finfo(dtype).max) if dtype in (torch.float16, torch.bfloat16) else None
            why = explain(self.op, inputs, kind, dmax)
            if underflow is not None and "underflow" in why:
                why = f"{why} ({underflow})"
            evidence = {"inputs": inputs, "reason": why + suffix}
            entering = (self.forward or self).entering
            if entering and entering[0] is not None:  # its input came into the step from outside (a target)
                evidence["input_entering"] = entering[0]
        else:
            why = f"{self.op} in the loss code made a non-finite value from finite inputs"
            evidence = {"reason": why + suffix}
        return {
            "phase": self.phase,
            "module": None,
            "op": self.op,
            "tensor": "output" if self.phase == "loss" else "grad",
            "kind": kind,
            "source": self.source,
            "evidence": with_code(evidence, self.source),
        }


class StepCapture:
    """What a replay of a step needs, kept by hooks on the root module (references, no copies).

    * at the root's forward call (pre): the root's inputs and the RNG state (a replay runs the same
      forward); forwards under ``no_grad`` (evaluation) are not kept;
    * when it returns (post): a weak identity of its inputs and outputs (:class:`CarriedState`), a
      keeper of the gradient that will flow into the root's output (a replay runs the model's
      backward from it, without the user's loss code; the rules: :meth:`_keep_grads_of`); outputs
      above ``max_output`` elements are not kept (their gradient may be large): a replay then
      checks the forward only; and, with ``watch_loss``, a :class:`LossWatch` over the loss code until the
      next forward or the step (the zero-code runner, which has no loss function to replay), for
      the first ``max_windows`` forwards of a step (gradient accumulation), and not at all while
      steps run more forwards than that (an RL rollout: its loss code follows the last of
      hundreds of forwards, and watching them all would cost more than the step).

    With ``hooks=True`` (the guard's own use) the capture hooks the root module; the hooks are kept
    out of anything pickled or deep-copied while they are on (:func:`keep_out_of_pickles`):
    ``torch.save(model)`` writes what it writes without gradguard. With ``hooks=False`` the caller
    (the zero-code runner, through torch's global module hooks) calls :meth:`pre`,
    :meth:`post_with_kwargs` and :meth:`before_backward` itself: nothing is put on the module at
    all, and the keepers wait for the backward (the last ``max_windows`` forwards before it).

    A healthy step's cost (a 2×32 MLP, one thread, ``benchmarks/capture_cost.py``): 10 Python
    calls and one C++ hook, ~28 µs in situ (~33 before issue 16's last pass): torch's hooked
    ``Module.__call__`` with two hooks ~5–8, the keeper ~12 (``retain_grad``, torch's copy of the
    gradient, the ``.grad`` reset), the carried-state note ~3–6, the RNG read ~1–2; the run's
    only capture asks no weak set for its length and walks none.

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
        self.inputs: tuple[Any, Any, dict[str, Any] | None] | None = None  # (rng None: a compiled forward)
        # the inputs of the step's earlier forwards (gradient accumulation: its first micro-batches)
        self._earlier: list[tuple[tuple[Any, Any, dict[str, Any] | None], Any]] = []
        self.autocast: tuple[_replay.Autocast, ...] | None = None  # the forward's autocast state
        self._kept: list[Tensor] = []  # the last forward's outputs whose gradient is kept (out_grads)
        self._retained: list[Tensor] = []  # ... those whose retain_grad() the capture turned on
        self._arrived: dict[int, tuple[Tensor | None, bool]] = {}  # what the Python keepers saw, by output
        self.watches: list[LossWatch] = []  # the loss-code windows of this step, oldest first
        self.replaying = False
        self._active: LossWatch | None = None
        self._pending: list[LossWatch] = []  # closed windows whose mode could not be left yet
        self._hooks = hooks
        self._outs: list[Any] = []  # the last forwards' outputs, until their backward (hooks=False)
        self._pins = 0  # pinned(): a release waits
        self._release_due = False
        self._forwards = 0  # grad-enabled forwards this step
        self._backwards: int | None = None  # backward() calls this step (None: not told, Guard in code)
        self._last_forwards = 0  # ... and in the step before
        self.steps = 0  # steps released so far: the index of the step being captured
        self._watcher_steps: int | None = None  # the watching sibling's steps at this one's last release
        self.carried = _inputs.CarriedState()  # last forwards' inputs and outputs, weakly (carried state)
        self._made: list[weakref.ref[Tensor]] = []  # the last watched forward's outputs
        self._removed = False
        self._group = _CAPTURES.setdefault(root, weakref.WeakSet())  # the model's captures
        self._group.add(self)
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
        if _is_compiling():  # traced into the user's compiled forward: what Dynamo traces, no more
            self._pre_compiled(args, kwargs)
            return
        if in_transform() is not None:
            return  # a forward inside vmap / grad (per-sample gradients) is not the step's: wrapper tensors
        if self._active is not None or self._pending:
            self._stop_watch(compact=True)  # a new forward: the last window was not the step's last
        if _grad_enabled():
            if self._kept and self._hooks:
                self._next_forward()
            if self._forwards and self.inputs is not None and len(self._earlier) < self.max_windows:
                self._earlier.append((self.inputs, self.autocast))  # an earlier micro-batch of the step
            self.inputs = (args, kwargs, rng_state())
            # the replay's forward runs under the same autocast state (off: no call)
            self.autocast = _replay.autocast_state() if _any_autocast() else None
            self._forwards += 1

    def _pre_compiled(self, args: Any, kwargs: Any) -> None:
        """The inputs of a forward traced by torch.compile: kept as an attribute store (a side effect
        Dynamo replays at each call), without the RNG state (a host read there would split the
        user's graph, and a compiled forward draws its randomness its own way): a replay runs the
        same inputs eagerly."""
        if torch.is_grad_enabled():
            self.inputs = (args, kwargs, None)
            self.autocast = None

    def post(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.replaying or not _grad_enabled() or _is_compiling() or in_transform() is not None:
            return
        made = _floats(out)
        inputs = self.inputs
        if inputs is None:
            self.carried.note([], made, self.steps)
        else:  # the call's floating arguments (the usual ``model(x)``: no walk)
            took, named = inputs[0], inputs[1]
            self.carried.note(
                _floats(took[0] if len(took) == 1 and not named else (took, named)), made, self.steps
            )
        if self._hooks:
            self._keep_grads_of(made)
        else:  # the gradient keepers wait for the backward (before_backward)
            self._outs = [*self._outs[1 - self.max_windows :], out]
        if self.watch_loss and self._may_watch() and not isinstance(_top_mode(), _OpWatch):
            # (not inside gradguard's own instrumentation: an armed forward, whose forward hook
            # leaves its mode after this one runs)
            self._made = [weakref.ref(t) for t in made]
            self._active = LossWatch(made=made)
            self._active.__enter__()

    def _may_watch(self) -> bool:
        """Whether this forward's loss code is watched: the first ``max_windows`` forwards of a
        step, unless the last step ran more than that (a rollout: its loss code comes after
        forwards too many to watch)."""
        return len(self.watches) < self.max_windows and self._last_forwards <= self.max_windows

    def before_backward(self) -> None:
        """A backward starts (the zero-code runner): keep the gradient that reaches the outputs of
        the root's last forwards since the last backward (at most ``max_windows``; an RL rollout
        calls the model hundreds of times a step, and only its last calls get a keeper)."""
        self._backwards = (self._backwards or 0) + 1
        outs, self._outs = self._outs, []
        if not outs:
            return
        self._drop_kept()
        for out in outs[:-1]:
            for i, t in enumerate(t for t in _floats(out) if t.requires_grad):
                self._keep_late(i, t, retained=False)
        self._keep_grads_of(_floats(outs[-1]))

    def _keep_grads_of(self, floats: list[Tensor]) -> None:
        """Keep the gradient that reaches the floating outputs ``floats`` of the root's last forward
        (read as :attr:`out_grads`), from the forward's end to the next forward or the release.

        Each output that is not a leaf gets ``retain_grad()`` (a C++ hook: a Python hook on the
        output's node costs twice as much a step) and is held until then: its ``.grad`` is the
        gradient (a copy torch makes). Outputs above :data:`RETAIN_MAX` elements in all get the
        Python pre-hook on their node instead (the gradient by reference: a copy of a large output
        costs more than the hook); they are held too (at most ``max_output`` elements, until the
        optimizer step, with their gradient). The rules, and what they imply:

        * an output that several backwards reach (``retain_graph``, two losses on one output) holds
          the *sum* of what reached it: what the parameters accumulated, which the replay's
          backward then reproduces (a large output's pre-hook keeps the last one, as before);
        * with several forwards (two forwards, one loss), the gradient that arrives last wins, as
          it did when every output had a Python hook: a forward whose outputs are still waiting
          for their gradient when the next forward starts gets that hook then
          (:meth:`_next_forward`); outputs whose gradient came already are let go before the next
          forward runs (their graph is not held through it);
        * the user's output shows the gradient as ``.grad`` from its backward to the release (or
          the next forward), which sets ``.grad`` back to ``None``: the tensor is left as it was,
          no memory held after the step. An output whose ``retain_grad()`` the user turned on
          before is read and left alone; one the user turns on after the forward shares the
          capture's (read its ``.grad`` before the optimizer step);
        * a leaf the model returns as it is (its ``.grad`` is its own, accumulated over steps) gets
          a tensor hook.
        """
        if len(floats) == 1:  # the usual model: one output (no walk)
            outs = floats if floats[0].requires_grad else []
            size = floats[0].numel() if outs else 0
        else:
            outs = [t for t in floats if t.requires_grad]
            size = sum(map(Tensor.numel, outs))
        if not outs or size > self.max_output:
            return
        self._kept = outs
        for i, t in enumerate(outs):
            if t.is_leaf:
                t.register_hook(functools.partial(self._arrive_leaf, i))
            elif size > RETAIN_MAX and not t.retains_grad:
                self._keep_late(i, t, retained=False)  # a large output: its gradient by reference
            elif not t.retains_grad:
                t.retain_grad()
                self._retained.append(t)

    def _next_forward(self) -> None:
        """A grad-enabled forward starts (hooks on the root): let go of the last forward's outputs.
        Those still waiting for their gradient get a Python pre-hook on their node, whose arrival
        wins when it comes after the new forward's own (:meth:`_arrive`)."""
        mine = {id(t) for t in self._retained}
        waiting = [(i, t, id(t) in mine) for i, t in enumerate(self._kept) if _waiting(t)]
        self._drop_kept()
        for i, t, retained in waiting:
            self._keep_late(i, t, retained=retained)

    def _keep_late(self, i: int, t: Tensor, *, retained: bool) -> None:
        """The keeper of an earlier forward's output ``t`` (the ``i``-th): a pre-hook on its node;
        ``retained``: the capture turned its ``retain_grad()`` on (the hook sets ``.grad`` back)."""
        if t.grad_fn is not None:
            ref = weakref.ref(t) if retained else None
            t.grad_fn.register_prehook(functools.partial(self._arrive, i, t.output_nr, ref))

    @property
    def out_grads(self) -> list[Tensor | None]:
        """The gradient that reached each kept output of the root's last forward (``None``: none
        reached it; empty: no output kept), or one that arrived later at an earlier forward's
        output. A read of references (no device work)."""
        grads: list[Tensor | None] = []
        for i, t in enumerate(self._kept):
            own = t.grad if t.retains_grad else None  # (a leaf's or a large output's: by its hook)
            late = self._arrived.get(i)
            grads.append(late[0] if late is not None and (own is None or late[1]) else own)
        return grads

    def _drop_kept(self) -> None:
        """Let go of the kept outputs, their ``.grad`` back to ``None`` where the capture set it."""
        for t in self._retained:
            t.grad = None
        self._kept, self._retained = [], []
        if self._arrived:
            self._arrived = {}

    def post_with_kwargs(self, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        """:meth:`post` for a caller that sees the keyword arguments only when the call returns."""
        if self.inputs is not None and kwargs and not self.replaying and torch.is_grad_enabled():
            self.inputs = (self.inputs[0], kwargs, self.inputs[2])
        self.post(module, args, out)

    def _arrive(
        self, i: int, k: int, ref: weakref.ref[Tensor] | None, grads: tuple[Tensor | None, ...]
    ) -> None:
        """An earlier forward's ``i``-th output got its gradient (``None``: its node ran without
        one): kept, with whether it came after the last forward's own (then it is the later one)."""
        t = ref() if ref is not None else None
        if t is not None:
            t.grad = None  # (its retain_grad() hook ran first: the user's tensor as it was)
        if i < len(self._kept) and k < len(grads):
            self._arrived[i] = (grads[k], not _waiting(self._kept[i]))

    def _arrive_leaf(self, i: int, grad: Tensor) -> None:
        if i < len(self._kept):
            self._arrived[i] = (grad, True)

    def _stop_watch(self, *, compact: bool = False) -> None:
        """Close the open loss-code window: leave its mode, keep it (compacted) for the step's answer.

        Called from inside the watch's own dispatch (a hook that runs within ``backward()``, which
        the watch itself dispatched), the mode is not on the stack and cannot be left there: it
        stays, passing every op through, and is left at the next chance (:meth:`_leave_pending`).
        """
        if self._active is None and not self._pending:
            return  # the usual step (no loss watch): nothing open, nothing waiting
        self._leave_pending()
        active, self._active = self._active, None
        if active is None:
            return
        active.done = True
        if not _leave(active):
            self._pending.append(active)
        active.close()
        self.carried.note(active.leaves(), [], self.steps)  # a buffer kept across steps: a memory bank
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

    def loss_terms(self, loss: Tensor) -> dict[str, Any] | None:
        """The additive terms of ``loss`` as the open loss-code window saw them (:meth:`LossWatch.terms`)."""
        return self._active.terms(loss) if self._active is not None else None

    def probability_inputs(self) -> list[dict[str, Any]]:
        """The open loss-code window's logits losses given probabilities (:meth:`LossWatch.probability_inputs`)."""
        return self._active.probability_inputs() if self._active is not None else []

    def criteria(self) -> list[dict[str, Any]]:
        """The open loss-code window's loss functions (:meth:`LossWatch.criteria`)."""
        return self._active.criteria() if self._active is not None else []

    def loss_scale(self, loss: Tensor) -> tuple[float, str | None] | None:
        """The factor the open loss-code window's last op applied to ``loss`` (:meth:`LossWatch.scale_of`)."""
        return self._active.scale_of(loss) if self._active is not None else None

    def loss_code_done(self) -> None:
        """``backward()`` was called: the open window keeps no more ops (its backward nodes still report)."""
        if self._active is not None:
            self._active.done = True

    def stop_watching(self, *, compact: bool = True) -> None:
        """Leave the loss watch's mode now (another model's forward starts; the loss code is over)."""
        self._stop_watch(compact=compact)

    def end_step(self) -> LossWatch | None:
        """At the optimizer step: stop watching the loss code; return the step's last watch.

        With several optimizers, the open window (the watching capture's, of this model or of
        another model the loss code called: a GAN's discriminator) held this optimizer's loss code:
        it closes too, and :meth:`loss_watch_answer` reads it."""
        if self._active is not None or self._pending:
            self._stop_watch()
        if len(self._group.data) > 1 or len(_CAPTURES.data) > 1:  # type: ignore[attr-defined]
            for other in _live_captures(self):  # (the usual run, one model, one capture: no call)
                other._stop_watch()
        return self.watches[-1] if self.watches else None  # self.watch (its loss: this optimizer's)

    def _siblings(self) -> list[StepCapture]:
        """The other live captures of the same model (one per optimizer that steps it)."""
        return [c for c in self._group if c is not self and not c._removed]

    def _continue_watching(self) -> None:
        """After one optimizer's step, when several step this model: the loss code that follows may
        be the next optimizer's (an actor-critic's second loss, a GAN's generator loss on the same
        forward). The watching capture opens a new window for it — each optimizer's loss code has
        its own budget — that keeps only grad-mode ops (the optimizer's own step runs under
        ``no_grad``); the model's next forward or the next step closes it."""
        siblings = self._siblings()
        if not siblings:
            return
        watcher = self if self.watch_loss else next((c for c in siblings if c.watch_loss), None)
        if watcher is None or watcher._active is not None or watcher.replaying:
            return
        if watcher is not self:  # its closed windows were read at this step
            idle, self._watcher_steps = watcher.steps == self._watcher_steps, watcher.steps
            if idle:  # its optimizer sat out a whole step of this one (a second training phase): let go
                watcher.watches = []  # (else its window budget runs out, and no loss code is watched)
            for w in watcher.watches:  # keep sums only: its own step may still read them
                w.compact()
        made = [t for t in (r() for r in watcher._made) if t is not None]
        if made and watcher._may_watch() and not isinstance(_top_mode(), _OpWatch):
            watcher._active = LossWatch(made=made, grad_only=True)
            watcher._active.__enter__()

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
        if self._active is not None or self._pending:
            self._stop_watch()
        self.inputs = None
        if self._earlier:
            self._earlier = []
        if self._kept:
            self._drop_kept()
        if self.watches:
            self.watches = []
        if self._outs:
            self._outs = []
        self._last_forwards, self._forwards = self._forwards, 0
        if self._backwards is not None:
            self._backwards = 0
        self.steps += 1
        if not self._removed and len(self._group.data) > 1:  # type: ignore[attr-defined]
            self._continue_watching()  # (the usual model, one optimizer: no sibling, no call)

    def remove(self) -> None:
        self._removed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.release()

    def forget(self) -> None:
        """In a forked child: leave the watch's mode, drop every reference; no device work (a
        forked child may not touch the parent's CUDA context)."""
        self._removed = True
        for watch in (self._active, *self._pending):
            if watch is not None:
                _leave(watch)
        self._active, self._pending = None, []
        self.inputs, self.watches, self._outs = None, [], []
        self._kept, self._retained, self._arrived = [], [], {}

    def unfinished_nonfinite(self) -> bool:
        """At the script's end, after a forward whose optimizer step never came (timm's ``if not
        math.isfinite(loss_value): sys.exit(1)``): close the loss-code window and say whether that
        forward's outputs or its loss code hold a non-finite value (host reads: once, at the end)."""
        if self.inputs is None or self._removed:
            return False
        self.end_step()
        outs = [*self._kept, *(t for ref in self._made if (t := ref()) is not None)]
        return any(not _finite(t) for t in outs) or self.loss_watch_answer() is not None

    def loss_watch_answer(self) -> dict[str, Any] | None:
        """The first non-finite birth any loss-code window of this step saw (host reads): this
        capture's, then those of the model's other captures (the watching one, when several
        optimizers step the model), then those of other models' captures not released yet (a GAN's
        generator loss runs in a window opened by the discriminator's forward)."""
        others = sorted(_live_captures(self), key=lambda c: c.root is not self.root)
        for watch in [*self.watches, *(w for c in others for w in c.watches)]:
            found = watch.answer()
            if found is not None and watch.entered is not None:
                self._name_carried_loss_input(found, watch.entered)
            if found is not None:
                return found
        return None

    def _name_carried_loss_input(self, found: dict[str, Any], t: Tensor) -> None:
        """A non-finite tensor that entered the loss code and is state from an earlier step (the
        model's own earlier output used as a target, a memory bank written in place between steps)
        is named so, as a carried model input is."""
        origin = self.carried.origin(t, self.steps)
        if origin is None:
            return
        k = origin["carried_from_step"]
        how = (
            f"the model's own output at step {k}, used as {found['tensor']}"
            if origin["carried"] == "output"
            else f"a tensor kept across steps (a memory bank, a running buffer) and written in place since step {k}"
        )
        found["tensor"] = "state"
        why = f"the state carried into this step's loss code is non-finite: {how}"
        found["evidence"].update(origin, reason=why)

    def replay(self, loc: Locator) -> tuple[Birth | dict[str, Any] | None, str]:
        """Replay the captured step: the model's forward from its inputs, its backward from the kept
        output gradient; the loss code (not replayable) from the loss watch.

        Returns:
            ``(answer, how)``: a :class:`Birth`, the loss watch's answer (a dict), or ``None``.
        """
        assert self.inputs is not None
        earlier = self._replay_earlier(loc)
        if earlier is not None:
            return earlier, "replay"
        args, kwargs, rng = self.inputs
        out_grads = list(self.out_grads)
        # an output the loss did not use (an RNN's final state) has no gradient: the others replay
        backward = any(g is not None for g in out_grads)
        grads_ok = backward and all(_finite(g) for g in out_grads if g is not None)

        def _replayed_step() -> Any:
            # the step's autocast state, and gradients on as its forward had them: a replay started in
            # the script's clip_grad_norm_ (a no_grad function) ran the forward without a graph, so no
            # backward was replayed (and a reentrant checkpoint said "Gradients will be None")
            with torch.enable_grad(), _replay.under(self.autocast):
                out = self.root(*args, **kwargs)
            outs = [t for t in _tensors(out) if t.requires_grad]
            if grads_ok and len(outs) == len(out_grads):
                used = [(t, g) for t, g in zip(outs, out_grads) if g is not None]
                torch.autograd.backward([t for t, _ in used], [g for _, g in used])
            return out

        self.replaying = True
        try:
            birth, _ = loc.replay(_replayed_step, rng)
        finally:
            self.replaying = False
        if isinstance(birth, Birth) and birth.phase == "data" and birth.tensor == "input":
            birth.source = None  # the line that called the replay, not where the script passed the batch
            self._name_carried_state(birth, args, kwargs)
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

    def bad_input(self) -> dict[str, Any] | None:
        """The first non-finite tensor the step's forwards were given (earlier micro-batches first),
        as a ``data`` event's fields, without a replay: where replays are off (torch.distributed),
        which rank's batch held it. Host reads: the anomaly path."""
        batches = [inputs for inputs, _ in self._earlier] + ([self.inputs] if self.inputs is not None else [])
        for k, (args, kwargs, _) in enumerate(batches):
            t = next((t for t in _floats((args, kwargs)) if not _finite(t)), None)
            if t is None:
                continue
            role, evidence = _data_evidence(self.root, args, kwargs, t)
            if len(batches) > 1:
                _in_micro_batch(evidence, k, len(batches), self._backwards)
            return {"phase": "data", "module": None, "op": None, "tensor": role, "kind": _kinds(t)[0],
                    "source": None, "evidence": evidence}  # fmt: skip
        return None

    def _replay_earlier(self, loc: Locator) -> Birth | None:
        """Gradient accumulation: the step's earlier micro-batches are not the one replayed below. One
        whose input holds a non-finite value (host reads: the anomaly path) has its forward replayed
        instead: the answer is that input, named with its micro-batch."""
        n = len(self._earlier) + 1
        for k, ((args, kwargs, rng), autocast) in enumerate(self._earlier):
            if all(_finite(t) for t in _floats((args, kwargs))):
                continue

            def _replayed_step(args: Any = args, kwargs: Any = kwargs, autocast: Any = autocast) -> Any:
                with torch.enable_grad(), _replay.under(autocast):  # (as the step's forward ran)
                    return self.root(*args, **kwargs)

            self.replaying = True
            try:
                birth, _ = loc.replay(_replayed_step, rng)
            finally:
                self.replaying = False
            if isinstance(birth, Birth) and birth.phase == "data":
                birth.source = None  # (the replay's caller, not the script's line)
                _in_micro_batch(birth.evidence, k, n, self._backwards)
                return birth
        return None

    def _name_carried_state(self, birth: Birth, args: Any, kwargs: Any) -> None:
        """A non-finite model input that is state carried from an earlier step (an output fed back,
        a buffer written in place between steps) is named so: ``tensor: "state"``, and the step it
        came from (host reads: the anomaly path)."""
        for t in _floats((args, kwargs)):
            origin = self.carried.origin(t, self.steps) if not _finite(t) else None
            if origin is None:
                continue
            birth.tensor = "state"
            k = origin["carried_from_step"]
            how = (
                f"the model's own output at step {k}, fed back as its input"
                if origin["carried"] == "output"
                else f"a tensor kept across steps and written in place since step {k}"
            )
            birth.evidence.update(origin, reason=f"the state carried into this step is non-finite: {how}")
            return


#: The live captures of each model (several optimizers on one model: one capture each).
_CAPTURES: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[StepCapture]] = weakref.WeakKeyDictionary()


def _live_captures(but: StepCapture) -> list[StepCapture]:
    """Every live capture of every model, but ``but``."""
    return [c for group in list(_CAPTURES.values()) for c in group if c is not but and not c._removed]


def _data_evidence(module: nn.Module, args: Any, kwargs: Any, t: Tensor) -> tuple[str, dict[str, Any]]:
    """A non-finite tensor passed to the model: its role (by its argument: ``labels=`` is the label)
    and a ``data`` event's evidence (host reads: the anomaly path)."""
    role, name = _inputs.model_argument(module, args, kwargs, t)
    what = f"the `{name}` passed to the model hold" if name is not None else "the input batch holds"
    evidence: dict[str, Any] = {"input": _describe(t), "reason": f"{what} non-finite values"}
    if name is not None:
        evidence["argument"] = name
    return role, evidence


def _in_micro_batch(evidence: dict[str, Any], k: int, n: int, backwards: int | None) -> None:
    """Name the forward (``k`` of the step's ``n``, from 0) a data event's tensor came in: a micro-batch
    of gradient accumulation where the step had several ``backward()`` calls, one of several model
    calls of one loss where it had one (two views of a batch), either where that was not counted."""
    evidence["micro_batch"] = f"{k + 1} of {n}"
    if backwards is not None and backwards >= 2:
        what = f"micro-batch {k + 1} of the step's {n}: gradient accumulation"
    elif backwards == 1:
        what = f"model call {k + 1} of the step's {n}"
    else:
        what = f"forward {k + 1} of the step's {n}: a micro-batch of gradient accumulation or one of several model calls"
    evidence["reason"] = f"{evidence['reason']} ({what})"


def _top_mode() -> Any:
    """The innermost torch function mode on the stack (``None``: none), e.g. an open loss watch."""
    depth = torch._C._len_torch_function_stack()
    return torch._C._get_function_stack_at(depth - 1) if depth else None


def _leave(mode: TorchFunctionMode) -> bool:
    """Take ``mode`` off the torch function mode stack wherever it is (the modes above it stay, in
    order). ``False``: it is not on the stack now (its own dispatch is running)."""
    if _top_mode() is mode:  # the usual case: it is the innermost
        _pop_mode()
        return True
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
