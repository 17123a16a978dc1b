"""Replay as faithful as the step: the pieces a replay needs beyond the model's inputs.

* **Autocast** (:func:`autocast_state`, :func:`under`): the autocast state a step's forward ran
  under (device type, dtype, weight cache), read once per forward (one C call while autocast is off
  everywhere) and restored around the replayed forward, so a float16-only overflow (attention
  scores under autocast, a large matmul) is reproduced instead of replaying finite in float32.
  Under a GradScaler the replay's backward starts from the gradient the step's own backward sent
  into the model's output, which already carries the step's loss scale.
* **Precision overflow** (:func:`float32_absmax`): an op born non-finite in float16 or bfloat16 is
  recomputed once in float32; a finite result there is the evidence that the dtype's range, not the
  values, is the fault.
* **Custom autograd Functions** (:func:`function_name`, :func:`function_source`): their autograd
  nodes are named by the user's class (``MyClampGrad.backward``) and point at its ``backward``.
* **The autograd graph an op built** (:func:`new_nodes`): the nodes created inside a functional
  wrapper (``multi_head_attention_forward``) or by a custom Function, which the torch-level watch
  never sees as calls of their own.
* **Inside a functional wrapper** (:func:`innermost_birth`): a wrapper (a Python function of
  ``torch.nn.functional``, or a fused attention kernel) born non-finite is run once more under a
  dispatch mode that names the innermost aten op that made the value (``_softmax`` of a fully
  masked row inside ``multi_head_attention_forward``).

Everything here runs on the anomaly path (a replay), except :func:`autocast_state` and
:func:`rng_state`, which the step capture reads at each forward. A rerun (of a wrapper, or of an
op in float32) works on copies of the step's tensors and leaves the RNG where it was: the replay
leaves no trace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import linecache
import math
import re
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "Autocast",
    "Inner",
    "autocast_state",
    "float32_absmax",
    "function_name",
    "function_source",
    "innermost_birth",
    "is_wrapper",
    "moves_only",
    "new_nodes",
    "reduced",
    "rng_state",
    "running_forward",
    "sequence_now",
    "set_rng_state",
    "under",
]


def _usable(device_type: str) -> bool:
    """Whether autocast can be on for ``device_type`` in this process (its backend is present)."""
    if not torch.amp.autocast_mode.is_autocast_available(device_type):
        return False
    if device_type == "cpu":
        return True
    if device_type == "mps":
        return bool(torch.backends.mps.is_available())
    module = getattr(torch, device_type, None)  # torch.cuda, torch.xpu, torch.hpu
    available = getattr(module, "is_available", None)
    try:
        return bool(available()) if callable(available) else False
    except Exception:  # a backend that cannot say: keep it (a few hundred ns a forward)
        return True


_DEVICE_TYPES = tuple(d for d in ("cuda", "cpu", "xpu", "mps", "hpu") if _usable(d))
_REDUCED = (torch.float16, torch.bfloat16)
_FUSED_WRAPPERS = frozenset({"scaled_dot_product_attention", "_native_multi_head_attention"})
MAX_NODES = 100_000  #: autograd nodes a replay hooks at most (a bound on the walk)


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """The CPU (and, where present, CUDA) RNG state, to replay a step with the same randomness."""
    state: dict[str, Any] = {"cpu": torch.default_generator.get_state()}
    if torch.cuda.is_initialized():  # (initialized implies available; the cheaper test, each forward)
        # torch.cuda.get_rng_state_all(), whose per-device Python (a lazy-init check, a device
        # object) costs each forward: initialized, CUDA holds one default generator per device
        state["cuda"] = [g.get_state() for g in torch.cuda.default_generators]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- autocast
@dataclasses.dataclass(frozen=True)
class Autocast:
    """The autocast state of one device type at a forward call."""

    device_type: str
    dtype: torch.dtype
    cache: bool

    def describe(self) -> dict[str, str]:
        return {"device_type": self.device_type, "dtype": str(self.dtype).replace("torch.", "")}


def autocast_state() -> tuple[Autocast, ...] | None:
    """The autocast state now (``None``: off on every device type). The healthy steps' cost: one
    C call while autocast is off, a few while it is on; no device work."""
    if not torch._C._is_any_autocast_enabled():
        return None
    cache = torch.is_autocast_cache_enabled()
    return tuple(
        _autocast(d, torch.get_autocast_dtype(d), cache)
        for d in _DEVICE_TYPES
        if torch.is_autocast_enabled(d)
    )


@functools.lru_cache(maxsize=64)
def _autocast(device_type: str, dtype: torch.dtype, cache: bool) -> Autocast:
    return Autocast(device_type, dtype, cache)  # one object per state: a forward allocates nothing


@contextlib.contextmanager
def under(state: tuple[Autocast, ...] | None) -> Iterator[None]:
    """Run the block under exactly ``state``: its autocast contexts entered, any other autocast that
    is on now (a replay started inside the user's own autocast block) switched off."""
    wanted = {a.device_type for a in state or ()}
    with contextlib.ExitStack() as stack:
        if torch._C._is_any_autocast_enabled():
            for d in _DEVICE_TYPES:
                if d not in wanted and torch.is_autocast_enabled(d):
                    stack.enter_context(torch.autocast(d, enabled=False))
        for a in state or ():
            stack.enter_context(torch.autocast(a.device_type, dtype=a.dtype, cache_enabled=a.cache))
        yield


def active() -> list[dict[str, str]]:
    """The autocast contexts on now, described (evidence of a precision overflow)."""
    return [a.describe() for a in autocast_state() or ()]


def reduced(dtype: torch.dtype) -> bool:
    """A 16-bit float (float16, bfloat16): its range or precision may be the fault."""
    return dtype in _REDUCED


def float32_absmax(func: Callable[..., Any], args: Any, kwargs: Any, name: str) -> float | None:
    """The largest magnitude of ``func``'s float outputs recomputed in float32 (autocast off, no
    grad, the RNG left where it was), or ``None`` when that is not finite too or cannot be computed
    (an in-place op is never rerun)."""
    if in_place(func, name, args, kwargs):
        return None

    def up(x: Any) -> Any:  # a copy: a rerun never writes into the step's tensors (running stats)
        return x.detach().float() if isinstance(x, Tensor) and reduced(x.dtype) else _copy(x)

    rng = rng_state()
    try:
        with torch.no_grad(), under(None):
            out = func(*tree_map(up, args), **tree_map(up, kwargs or {}))
    except Exception:  # an op that refuses float32 inputs: no evidence either way
        return None
    finally:
        set_rng_state(rng)
    outs = [o for o in tree_flatten(out)[0] if isinstance(o, Tensor) and o.is_floating_point()]
    if not outs or not all(bool(torch.isfinite(o).all()) for o in outs):
        return None
    return max(float(o.abs().max()) if o.numel() else 0.0 for o in outs)


# ----------------------------------------------------------------------------- custom Functions
def in_place(func: Any, name: str, args: Any, kwargs: Any) -> bool:
    """Whether the call writes into its input (``relu_``, ``x += y``, ``F.relu(x, inplace=True)``):
    such a call is never rerun."""
    if name.endswith("_") or name.startswith("__i") or (kwargs or {}).get("inplace"):
        return True
    if not isinstance(func, types.FunctionType):
        return False
    try:
        bound = inspect.signature(func).bind(*args, **(kwargs or {}))
    except (TypeError, ValueError):
        return False
    return bool(bound.arguments.get("inplace"))


def function_class(node: Any) -> type | None:
    """The user's ``torch.autograd.Function`` subclass behind an autograd node, or ``None``."""
    cls = getattr(node, "_forward_cls", None)
    return cls if isinstance(cls, type) else None


def function_name(cls: type, method: str = "backward") -> str:
    """``MyClampGrad.backward``: how a custom autograd Function's part is named in an answer."""
    return f"{cls.__name__}.{method}"


def running_forward() -> type | None:
    """The custom Function whose ``forward`` is running now (its frame holds the ``ctx`` node), or
    ``None``: an op born inside it is that Function's fault too (host frames only; anomaly path)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "forward":
            cls = function_class(frame.f_locals.get("ctx"))
            if cls is not None:
                return cls
        frame = frame.f_back  # type: ignore[assignment]
    return None


def function_source(cls: type, method: str = "backward") -> str | None:
    """``file:line`` of the Function's ``backward`` (or ``forward``): where its fix goes."""
    code = getattr(getattr(cls, method, None), "__code__", None)
    if code is None:
        return None
    line = code.co_firstlineno  # a decorator's line (``@staticmethod``): move on to the ``def``
    while line < code.co_firstlineno + 8 and not linecache.getline(
        code.co_filename, line
    ).lstrip().startswith("def "):
        line += 1
    if not linecache.getline(code.co_filename, line).lstrip().startswith("def "):
        line = code.co_firstlineno
    return f"{code.co_filename}:{line}"


# ----------------------------------------------------------------------------- the graph
_SHAPE_ONLY = re.compile(
    r"^(T|Transpose|Permute|View|UnsafeView|Reshape\w*|Expand|Squeeze|Unsqueeze|Slice|Select|Alias|Clone|"
    r"Split|SplitWithSizes|Unbind|Cat|Stack|Narrow|AsStrided|Chunk)Backward\d*$"
)


def moves_only(node: Any) -> bool:
    """A node that only moves or copies gradient values (a view, a transpose, a cat): it cannot make
    a finite gradient non-finite, so a replay does not spend a hook (host reads) on it."""
    return bool(_SHAPE_ONLY.match(node.name()))


def sequence_now() -> int:
    """The sequence number the next autograd node made on this thread gets (nodes made from now on
    have this one or a later one; ``0`` where no node can be made, e.g. under inference mode)."""
    try:
        with torch.enable_grad():
            node = (torch.zeros((), requires_grad=True) * 1).grad_fn
    except RuntimeError:
        return 0
    return int(node._sequence_nr()) + 1 if node is not None else 0


def new_nodes(root: Any, seen: set[int], keep: list[Any], since: int = 0) -> Iterator[Any]:
    """The autograd nodes reachable from ``root`` not seen yet and made since sequence number
    ``since`` (:func:`sequence_now`: not the graph of a tensor that entered the block), ``root``
    first, marking them seen (and keeping them alive in ``keep``, so an id is never reused);
    gradient accumulators are left out. Bounded by :data:`MAX_NODES` over one replay."""
    stack = [root]
    while stack and len(seen) < MAX_NODES:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        if type(node).__name__ == "AccumulateGrad" or node._sequence_nr() < since:
            continue
        yield node
        stack.extend(fn for fn, _ in getattr(node, "next_functions", ()) if fn is not None)


# ----------------------------------------------------------------------------- inside a wrapper
def is_wrapper(func: Any, name: str) -> bool:
    """A functional wrapper: a Python function of ``torch.nn.functional`` (its body is torch ops
    the watch does not see one by one) or a fused attention op."""
    if name in _FUSED_WRAPPERS:
        return True
    return isinstance(func, types.FunctionType) and str(getattr(func, "__module__", "")).startswith(
        "torch.nn.functional"
    )


@dataclasses.dataclass
class Inner:
    """The innermost aten op born non-finite inside a wrapper: its name, float inputs, bad outputs."""

    op: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    args: tuple[Any, ...] = ()  # its positional arguments (a Python number divisor: ``logits / tau``)


# ops that allocate without writing: their memory holds what the last tensor there left (a NaN the
# rerun's own earlier ops freed), filled by the op after them (``F.gumbel_softmax``'s ``exponential_``)
_ALLOCATIONS = frozenset(
    {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "empty_permuted"}
)


class _Births(TorchDispatchMode):
    """Classifies each aten op as the torch-level watch does: a non-finite output from finite inputs
    is a birth, unless a non-finite Python scalar wrote it (``masked_fill(-inf)``: intentional);
    a NaN from intentional infinities (softmax of an all ``-inf`` row) is a birth too."""

    def __init__(self) -> None:
        super().__init__()
        self.intentional: dict[int, Tensor] = {}  # id → tensor (kept alive: ids stay unique)
        self.first: Inner | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.first is None:
            self._judge(func, args, kwargs or {}, out)
        return out

    def _judge(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        if (
            func.overloadpacket.__name__ in _ALLOCATIONS
        ):  # uninitialised memory: whatever it holds is no birth
            return
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, Tensor) and o.is_floating_point()]
        bad = [o for o in outs if not bool(torch.isfinite(o).all())]
        if not bad:
            return
        leaves = tree_flatten((args, kwargs))[0]
        ins = [t for t in leaves if isinstance(t, Tensor) and t.is_floating_point()]
        bad_ins = [t for t in ins if not bool(torch.isfinite(t).all())]
        written = any(isinstance(v, float) and not math.isfinite(v) for v in leaves)
        all_intentional = all(id(t) in self.intentional for t in bad_ins)
        if (written and not bad_ins) or (bad_ins and all_intentional and not _has_nan(bad)):
            self.intentional.update((id(o), o) for o in bad)
        elif not bad_ins or (all_intentional and not any(_has_nan([t]) for t in bad_ins)):
            self.first = Inner(func.overloadpacket.__name__, ins, bad, tuple(args))


def _has_nan(ts: list[Tensor]) -> bool:
    return any(bool(torch.isnan(t).any()) for t in ts)


def innermost_birth(
    func: Callable[..., Any], args: Any, kwargs: Any, rng: dict[str, Any] | None
) -> Inner | None:
    """Run the wrapper once more (on copies of its tensors, no grad, from the RNG state ``rng`` it
    started from; the RNG left where it was, its inputs and buffers untouched: ``F.batch_norm``
    writes its running statistics) and name the innermost aten op that made its first non-finite
    value. The wrapper's own non-finite inputs are intentional (it was a birth: masks of -inf)."""
    if in_place(func, getattr(func, "__name__", ""), args, kwargs):
        return None
    args, kwargs = tree_map(_copy, (args, kwargs or {}))
    after = rng_state()
    mode = _Births()
    leaves = tree_flatten((args, kwargs))[0]
    mode.intentional.update(
        (id(t), t)
        for t in leaves
        if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    )
    try:
        if rng is not None:
            set_rng_state(rng)
        with torch.no_grad(), mode:
            func(*args, **kwargs)
    except Exception:  # the rerun is evidence only: the step's own call already returned
        return None
    finally:
        set_rng_state(after)
    return mode.first


def _copy(x: Any) -> Any:
    return x.detach().clone() if isinstance(x, Tensor) else x


def inner_name(aten: str, wrapper: str) -> str:
    """The name to report for an aten op found inside ``wrapper``: ``_softmax`` → ``softmax``; a
    fused attention kernel keeps the name of the call the user made."""
    if "attention" in aten:
        return wrapper
    return aten.lstrip("_")
