"""The tensors that enter a step without being made in it: targets, labels, state carried across steps.

A non-finite value that *enters* the step is the data's fault, not an op's; the verdict must say
which tensor it was (issue 12). Two kinds enter besides the model's input batch:

* **loss inputs**: tensors the loss code reads that neither the model nor a watched loss-code op
  made (a regression target, a soft label, a class-weight vector). :func:`entering_role` names
  them by where they enter (``target``, ``label``, ``loss input``) at the op's call, from
  references only (no device work); :func:`target_description` adds the integer target of a
  cross-entropy (how many of its entries are ``ignore_index``) on the anomaly path.
* **carried state**: a tensor the model (or the script) made in an earlier step and feeds back, an
  RNN's hidden state (``h = h.detach()``) or a buffer written in place between steps (a memory
  bank). :class:`CarriedState` keeps a weak identity of each forward's outputs and inputs — a weak
  reference to their *storage*, which lives exactly as long as a tensor (a detached copy, a view)
  shares it, so a freed block reused by a new batch is never mistaken for the old one — and
  :meth:`CarriedState.origin` says, on the anomaly path, whether a non-finite input is one of them.

Costs on a healthy step: per root forward, one ``untyped_storage()`` and one weak reference per
floating output and input tensor; per loss-code op, two attribute reads per floating input.
"""

from __future__ import annotations

import inspect
import math
import re
import weakref
from collections import deque
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter

__all__ = [
    "CarriedState",
    "entering_role",
    "is_mask_op",
    "model_argument",
    "number_operand",
    "scale_operand",
    "target_description",
    "target_of",
    "with_number",
]

#: Loss functions whose second argument (or ``target=``) is the target.
_LOSS_OPS = re.compile(
    r"(_loss|^cross_entropy|^binary_cross_entropy(_with_logits)?|^kl_div|^nll_loss\w*|^poisson_nll_loss"
    r"|^gaussian_nll_loss|^cosine_embedding_loss|^margin_ranking_loss)$"
)
#: Ops whose integer target may be all ``ignore_index`` (a mean over zero targets is 0 / 0).
_IGNORING = frozenset({"cross_entropy", "nll_loss", "nll_loss_nd", "nll_loss2d"})
#: Ops that commonly take an intentional ±inf mask (``scores + mask``, ``masked_fill``, ``where``).
_MASK_OPS = frozenset(
    {"add", "sub", "where", "masked_fill", "softmax", "log_softmax", "maximum", "minimum", "max", "min",
     "clamp", "scaled_dot_product_attention", "logsumexp", "amax", "amin"}
)  # fmt: skip
_KEPT_FORWARDS = 32  # forwards whose outputs / inputs are remembered (about two steps of a loop)


def is_mask_op(op: str) -> bool:
    """Whether ``op`` commonly takes a ±inf mask on purpose (an infinite leaf there is not bad data)."""
    return op in _MASK_OPS


#: Names of a model's forward arguments that carry the labels or the targets (the Hugging Face
#: ``labels=`` convention, nanoGPT's ``targets``, ``y``). ``tgt`` is a decoder's input, not a target.
_LABEL_ARGS = re.compile(r"^(labels?|\w+_labels|start_positions|end_positions)$")
_TARGET_ARGS = re.compile(r"^(targets?|y|y_true|gt|ground_truth)$")
_GENERIC_INPUTS = frozenset({"input", "inputs", "x", "args"})  # names that say no more than "the input"


def model_argument(
    module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], t: Tensor
) -> tuple[str, str | None]:
    """What ``t``, a tensor passed to the model's forward, is: ``(role, argument name)``, the role
    ``label`` or ``target`` by the argument's name, else ``input``; the name from ``kwargs`` or, for a
    positional argument, from the forward's signature (``None`` when it has none, or one that says no
    more than "the input": ``input``, ``x``). Host work: the anomaly path only."""
    name = next((k for k, v in kwargs.items() if _holds(v, t)), None)
    if name is None:
        position = next((i for i, v in enumerate(args) if _holds(v, t)), None)
        name = None if position is None else _positional_name(module, position)
    if name is None or name in _GENERIC_INPUTS:
        return "input", None
    role = "label" if _LABEL_ARGS.match(name) else "target" if _TARGET_ARGS.match(name) else "input"
    return role, name


def _holds(value: Any, t: Tensor) -> bool:
    """Whether ``value`` is ``t`` or a list / tuple / dict directly holding it."""
    if value is t:
        return True
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return any(v is t for v in items)


def _positional_name(module: Any, position: int) -> str | None:
    """The name of the forward's ``position``-th positional parameter (``None``: ``*args``, or no signature)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        return None
    for i, param in enumerate(params[: position + 1]):
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            return None  # ``*args`` (a wrapper's ``forward(*inputs)``) or keyword-only: no name for it
        if i == position:
            return param.name
    return None


def entering_role(op: str, args: Any, kwargs: Any, t: Tensor) -> str:
    """What ``t``, a tensor entering the loss code at ``op``, is: the ``target`` of a loss function,
    a floating ``label`` of a cross-entropy (soft labels), its ``class weights`` (``weight=``,
    ``pos_weight=``), or another ``loss input``."""
    if _LOSS_OPS.search(op):
        target = args[1] if len(args) > 1 else (kwargs or {}).get("target")
        if target is t:
            return "label" if op == "cross_entropy" else "target"
        weight = args[2] if len(args) > 2 else (kwargs or {}).get("weight")
        if weight is t or (kwargs or {}).get("pos_weight") is t:
            return "class weights"
    return "loss input"


#: Ops whose second operand may be a Python number that explains their failure (``logits / tau``).
_NUMBER_OPERAND_OPS = frozenset({"div", "true_divide", "floor_divide", "remainder", "fmod"})


def number_operand(op: str, args: Any, *, reflected: bool = False) -> dict[str, Any] | None:
    """A Python number as an operand of a division (``logits / tau`` with ``tau`` a float that reached
    0; ``reflected``: ``1.0 / r``, the number the numerator, ``__rtruediv__(r, 1.0)``), described as
    :mod:`gradguard.locate` describes a tensor (the op table's causes read it as they read a tensor's
    description; :func:`with_number` puts it in its place); ``None`` for any other call."""
    if op not in _NUMBER_OPERAND_OPS or not isinstance(args, tuple) or len(args) < 2:
        return None
    x = args[1]
    if type(x) not in (int, float):
        return None
    finite = math.isfinite(x)
    return {
        **({"numerator": 1} if reflected else {}),
        "shape": [],
        "dtype": f"python {type(x).__name__}",
        "nan": int(x != x),
        "posinf": int(x == math.inf),
        "neginf": int(x == -math.inf),
        "zeros": int(x == 0),
        "negative": int(x < 0),
        "unit": int(abs(x) == 1),
        **({"min": x, "max": x, "absmax": abs(x)} if finite else {}),
    }


def with_number(described: list[dict[str, Any]], number: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The op's inputs' descriptions with its Python number operand (:func:`number_operand`) in its
    place: first where it is the numerator (``1.0 / r``: then the tensor is the denominator the causes
    look for — it read "a value above the dtype's max"), else last (the divisor)."""
    if number is None:
        return described
    return [number, *described] if number.get("numerator") else [*described, number]


_SCALING_OPS = frozenset({"mul", "div", "true_divide"})


def scale_operand(op: str, args: Any, *, reflected: bool = False) -> float | None:
    """The factor a multiplication or division by a Python number applies (``gp_weight * penalty``:
    ``1e4``; ``loss / 4``: ``0.25``), or ``None`` (no Python number operand; a division by 0; a number
    divided by the tensor, ``reflected``: ``2.0 / x`` scales nothing)."""
    if op not in _SCALING_OPS or not isinstance(args, tuple) or len(args) != 2 or (reflected and op != "mul"):
        return None
    x = args[1]
    if type(x) not in (int, float) or not math.isfinite(x):
        return None
    if op == "mul":
        return float(x)
    return 1.0 / x if x != 0 else None


def target_of(op: str, args: Any, kwargs: Any) -> tuple[Tensor, int] | None:
    """The integer target of a cross-entropy / NLL call and its ``ignore_index`` (references, no
    device work), or ``None``."""
    if op not in _IGNORING:
        return None
    target = args[1] if len(args) > 1 else (kwargs or {}).get("target")
    if not isinstance(target, Tensor) or target.is_floating_point():
        return None
    ignore = (kwargs or {}).get("ignore_index", args[3] if op == "nll_loss" and len(args) > 3 else -100)
    return target, int(ignore) if isinstance(ignore, int) else -100


def target_description(target: Tensor, ignore_index: int) -> dict[str, Any]:
    """How many entries of an integer target are ``ignore_index`` (host reads: the anomaly path)."""
    return {
        "shape": list(target.shape),
        "dtype": str(target.dtype).replace("torch.", ""),
        "role": "target",
        "ignore_index": ignore_index,
        "ignored": int((target == ignore_index).sum()),
        "numel": target.numel(),
    }


#: One tensor a forward took or returned: a weak reference to its storage, its version, the step,
#: its role (``"input"`` or ``"output"``). A tuple: a few are made at every forward.
_Seen = tuple[weakref.ref[Any], int, int, str]


class CarriedState:
    """A weak identity of the last forwards' outputs and inputs, to tell carried state from data.

    :meth:`note` runs at each root forward (references only); :meth:`origin` runs on the anomaly
    path: a non-finite input that shares its storage with an earlier forward's *output* is state
    the model made and the script fed back (``h = h.detach()``); one that shares its storage with
    an earlier step's *input* and was written in place since (its version moved) is a buffer kept
    across steps (a memory bank, a running statistic). A tensor freed in between cannot match: the
    weak reference to its storage died with it.
    """

    def __init__(self, kept: int = _KEPT_FORWARDS) -> None:
        self._seen: deque[list[_Seen]] = deque(maxlen=kept)

    def note(self, inputs: list[Tensor], outputs: list[Tensor], step: int) -> None:
        """A forward at ``step`` took ``inputs`` and returned ``outputs`` (floating tensors)."""
        seen: list[_Seen] = []
        for role, tensors in (("input", inputs), ("output", outputs)):
            for t in tensors:
                if type(t) in _PLAIN and t.layout is _STRIDED:  # (each forward: _has_storage inline)
                    seen.append((_ref(t.untyped_storage()), t._version, step, role))
        if seen:
            self._seen.append(seen)

    def origin(self, t: Tensor, step: int) -> dict[str, Any] | None:
        """Where ``t`` (an input at ``step``) came from, if it is carried state (host work, no device
        read): ``{"carried": "output" | "buffer", "carried_from_step": k}``, else ``None``."""
        if not _has_storage(t):
            return None
        storage = t.untyped_storage()
        for seen in reversed(self._seen):
            for storage_ref, version, seen_at, role in seen:
                if storage_ref() is not storage:
                    continue
                if role == "output":
                    return {"carried": "output", "carried_from_step": seen_at}
                if seen_at < step and version != t._version:
                    return {"carried": "buffer", "carried_from_step": seen_at}
        return None


_PLAIN = (Tensor, Parameter)
_STRIDED = torch.strided  # (a layout is a singleton: compared by identity)
_ref = weakref.ref


def _has_storage(t: Tensor) -> bool:
    """Whether ``t`` is a plain strided tensor (its storage names it; not sparse, not a subclass)."""
    return type(t) in _PLAIN and t.layout is _STRIDED
