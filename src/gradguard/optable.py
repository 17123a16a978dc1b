"""The op table: for each op that can turn finite values non-finite, why it does and how to fix it.

One owner for this knowledge (standard library only, no torch): :func:`gradguard.locate.explain`
names the reason of a located op from what its inputs held (:func:`reason`), and
``gradguard.diagnose`` gives the fix for the op a ``nonfinite`` event names (:func:`advice`).

Each :class:`OpEntry` says which ops it covers (a regular expression over the torch-level name,
``aten::`` prefix and overload removed), why they produce a NaN or an inf in general, the fix, and
the specific causes :func:`reason` checks against the inputs' descriptions (``zeros``,
``negative``, ``rows_all_neginf`` counts, as :mod:`gradguard.locate` describes a tensor).

Example:
    >>> reason("log", [{"zeros": 3}], "-inf")
    'log of 0'
    >>> advice("log", "log of 0")[1].split(":")[0]
    'clamp the input'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["NAN_INPUT", "OPS", "OpEntry", "advice", "lookup", "reason"]

Inputs = Sequence[Mapping[str, Any]]
"""Descriptions of an op's tensor inputs (``zeros``, ``negative``, ``nan``, ``rows_all_neginf``…)."""

NAN_INPUT = "a NaN was already in the input"
_DTYPE_MAX = "a value above the dtype's max ({:g})"
_AT_ZERO = "{op} at 0 (infinite or undefined derivative)"
_NEGATIVE = "{op} of a negative number"

# what the inputs held → whether a cause applies
_HOLDS: dict[str, Callable[[Inputs], bool]] = {
    "rows_all_neginf": lambda inputs: any(i.get("rows_all_neginf") for i in inputs),
    "zero_input": lambda inputs: bool(inputs and inputs[0].get("zeros")),
    "negative_input": lambda inputs: bool(inputs and inputs[0].get("negative")),
    "zero_denominator": lambda inputs: any(i.get("zeros") for i in inputs[1:] or inputs),
    "any_zero": lambda inputs: any(i.get("zeros") for i in inputs),
    "always": lambda inputs: True,
}


@dataclasses.dataclass(frozen=True)
class OpEntry:
    """What one family of ops does at its numerical edge.

    Attributes:
        pattern: the ops (torch-level names, e.g. ``log``, ``scaled_dot_product_attention``).
        why: why they produce a non-finite value, in general.
        fix: the specific fix.
        causes: ``(condition, reason)`` checked in order against the inputs (conditions: the keys
            of ``_HOLDS``); ``{op}`` in a reason is the op's name.
        otherwise: the reason when no cause holds and the value is not above the dtype's max.
    """

    pattern: re.Pattern[str]
    why: str
    fix: str
    causes: tuple[tuple[str, str], ...] = ()
    otherwise: str | None = None


def _entry(
    pattern: str, why: str, fix: str, *causes: tuple[str, str], otherwise: str | None = None
) -> OpEntry:
    return OpEntry(re.compile(pattern), why, fix, tuple(causes), otherwise)


_LOG = (
    "log of 0 (or of a negative number)",
    "clamp the input: torch.log(x.clamp_min(eps)); for probabilities use F.logsigmoid, log_softmax "
    "or BCEWithLogitsLoss",
)
_DIV = (
    "a zero denominator (a zero count, a zero standard deviation)",
    "divide by y.clamp_min(eps) (or y + eps), and guard empty counts",
)
_SQRT = (
    "sqrt (or a fractional power) at exactly 0: its gradient is infinite there",
    "use torch.sqrt(x + eps), or torch.linalg.vector_norm (finite gradient at 0 since torch 2.13)",
)
_EXP = (
    "exp of a large argument overflows",
    "work in log space (torch.logsumexp, log_softmax), clamp the argument, compute in float32",
)

OPS: tuple[OpEntry, ...] = (
    _entry(
        r"^(_?log_)?softmax$|^_softmax$|^_log_softmax$|attention",
        "a row whose entries are all -inf (every key masked) gives 0/0; very large logits overflow exp",
        "leave at least one key unmasked per row (or fill the mask with torch.finfo(dtype).min instead of "
        "-inf), and compute the softmax in float32",
        ("rows_all_neginf", "a row of all -inf (every key masked) gives 0/0"),
    ),
    _entry(
        r"^binary_cross_entropy$",
        "log of a probability that saturated at 0 or 1",
        "use torch.nn.BCEWithLogitsLoss on the logits (or F.logsigmoid) instead of sigmoid + BCELoss",
    ),
    _entry(r"^log(2|10)?$", *_LOG, ("zero_input", "log of 0"), ("negative_input", _NEGATIVE)),
    _entry(r"^log1p$|^xlogy$", *_LOG),
    _entry(r"^(div|reciprocal|rsqrt)$", *_DIV, ("zero_denominator", "division by zero")),
    _entry(r"^(div|true_divide|reciprocal|rsqrt|remainder|fmod|std|var)", *_DIV),
    _entry(r"^(sqrt|pow)$", *_SQRT, ("negative_input", _NEGATIVE), ("any_zero", _AT_ZERO)),
    _entry(r"^(hypot|norm|linalg_vector_norm|cdist|_cdist_backward)$", *_SQRT, ("any_zero", _AT_ZERO)),
    _entry(r"^exp(m1|2)?$", *_EXP, ("always", "exp overflow")),
    _entry(r"^(sinh|cosh|softplus)$", *_EXP),
    _entry(
        r"^ctc_loss$",
        "a target that cannot be aligned (longer than the input) gives an infinite loss",
        "use torch.nn.CTCLoss(zero_infinity=True) and check target lengths ≤ input lengths",
        otherwise="the target cannot be aligned to the input (impossible CTC target)",
    ),
    _entry(
        r"^atan2$",
        "atan2 at the origin (0, 0)",
        "add eps to one argument, or mask the origin out",
        ("any_zero", _AT_ZERO),
    ),
    _entry(
        r"^(acos|asin|atanh|acosh)$",
        "an argument outside the function's domain (e.g. |x| > 1 for acos)",
        "clamp the argument into the domain, e.g. x.clamp(-1 + eps, 1 - eps)",
    ),
    _entry(
        r"^where$",
        "torch.where evaluates both branches: the unselected one's NaN gradient still flows",
        "make the unselected branch safe too (apply where to the argument before the unsafe op)",
    ),
)
"""The table, first match wins."""


def _base(op: str) -> str:
    """``aten::log.default`` → ``log``."""
    return str(op).lower().removeprefix("aten::").split(".")[0]


def lookup(op: str | None) -> OpEntry | None:
    """The table's entry for ``op``, or ``None``."""
    name = _base(op or "")
    return next((e for e in OPS if name and e.pattern.search(name)), None)


def reason(op: str, inputs: Inputs, kind: str, dtype_max: float | None = None) -> str:
    """A one-line reason from the op and what its inputs held (the located op's ``evidence.reason``).

    Args:
        op: the op's torch-level name.
        inputs: descriptions of its tensor inputs.
        kind: ``"nan"``, ``"inf"`` or ``"-inf"``: what came out.
        dtype_max: the output dtype's largest finite value (an inf above it is an overflow).
    """
    if any(i.get("nan") for i in inputs):
        return NAN_INPUT
    entry = lookup(op)
    causes = entry.causes if entry is not None else ()
    for condition, text in causes:
        if _HOLDS[condition](inputs):
            return text.format(op=op)
    if dtype_max is not None and kind in ("inf", "-inf"):
        return _DTYPE_MAX.format(dtype_max)
    if entry is not None and entry.otherwise is not None:
        return entry.otherwise
    return f"{op} produced {kind} from finite inputs"


def advice(op: str | None, why: str | None = None, cause: str | None = None) -> tuple[str, str]:
    """Why ``op`` produced a non-finite value, and the specific fix.

    Args:
        op: the op a ``nonfinite`` event names.
        why: the event's own reason (``evidence.reason``) where it has one: it is kept as the reason.
        cause: the event's ``cause``, if any. An overflow or an input that was already NaN (in the
            reason or the cause) get their own fix, whatever the op.
    """
    text = f"{why or ''} {cause or ''}".lower()
    if "dtype's max" in text or "65504" in text or "float16" in text:
        return (
            str(why or "a value above float16's largest (65504)"),
            "compute this op in float32 (or autocast to bfloat16, whose range is float32's)",
        )
    if "already in the input" in text:
        return (
            str(why),
            "the op only passed it on: find where its input became non-finite (an earlier op, or the data)",
        )
    entry = lookup(op)
    if entry is not None:
        return str(why or entry.why), entry.fix
    return (
        str(why or "its inputs put it at a numerical edge"),
        "check the op's inputs at that line and keep them in range (clamp_min(eps), log-space, float32)",
    )
