"""The op table: for each op that can turn finite values non-finite, why it does and how to fix it.

One owner for this knowledge (standard library only, no torch): :func:`gradguard.locate.explain`
names the reason of a located op from what its inputs held (:func:`reason`), and
``gradguard.diagnose`` gives the fix for the op a ``nonfinite`` event names (:func:`advice`).

Each :class:`OpEntry` says which ops it covers (a regular expression over the torch-level name,
``aten::`` prefix and overload removed), why they produce a NaN or an inf in general, the fix, and
the specific causes :func:`reason` checks against the inputs' descriptions (``zeros``,
``negative``, ``unit``, ``rows_all_neginf`` counts, as :mod:`gradguard.locate` describes a tensor),
each with its own fix: :func:`advice` picks the fix from the evidence (the reason the replay gave:
a zero denominator, a fully masked row, log of 0, an argument at ±1, a value above the dtype's
maximum, a negative base to a fractional power), not from the op's name alone.

Example:
    >>> reason("log", [{"zeros": 3}], "-inf")
    'log of 0'
    >>> advice("log", "log of 0")[1].split(":")[0]
    'clamp the input'
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "CUSTOM_FUNCTION",
    "MASKED_NAN",
    "NAN_INPUT",
    "OPS",
    "Cause",
    "OpEntry",
    "advice",
    "at_domain_edge",
    "lookup",
    "masked_nan",
    "optimizer_fix",
    "reason",
]

Inputs = Sequence[Mapping[str, Any]]
"""Descriptions of an op's tensor inputs (``zeros``, ``negative``, ``nan``, ``rows_all_neginf``…)."""

NAN_INPUT = "a NaN was already in the input"
CUSTOM_FUNCTION = re.compile(r"^[A-Za-z_][\w]*\.(forward|backward)$")
"""A located custom ``torch.autograd.Function`` is named ``Class.forward`` or ``Class.backward``."""
MASKED_NAN = "its forward output held NaN that the forward then discarded (torch.where or a mask)"
"""The reason of a backward op whose forward made a NaN that was selected away (see :func:`masked_nan`)."""
_WHERE_FIX = (
    "torch.where (or a mask) evaluates both branches, and the discarded branch's NaN still reaches the "
    "gradient: make the unsafe op's input safe before it, e.g. torch.sqrt(torch.where(x > 0, x, 1)) "
    "instead of torch.where(x > 0, torch.sqrt(x), 0)"
)
_AUTOCAST_FIX = (
    "run this op outside autocast so it computes in float32 (with torch.autocast(device_type, enabled=False): "
    "on .float() inputs), or autocast to bfloat16, whose range is float32's; keep a GradScaler for fp16 gradients"
)
_DTYPE_FIX = (
    "compute this op in float32 (or autocast to bfloat16, whose range is float32's), or scale its input "
    "down (normalise the data; keep a GradScaler for fp16 gradients)"
)
_WIDE_FIX = (
    "float32 (or bfloat16: the same range) is already the widest range here, so a wider dtype cannot help: the op's "
    "inputs are near 3.4e38 — a sum or product of exponentials: compute it in log space "
    "(torch.logsumexp(x, dim) for log(exp(x).sum(dim)), log_softmax, log-probabilities added instead of "
    "probabilities multiplied), or scale its inputs down"
)
_DTYPE_MAX = "a value above the dtype's max ({:g})"
_AT_ZERO = "{op} at 0 (infinite or undefined derivative)"
_NEGATIVE = "{op} of a negative number"

# what the inputs held → whether a cause applies
_HOLDS: dict[str, Callable[[Inputs], bool]] = {
    "rows_all_neginf": lambda inputs: any(i.get("rows_all_neginf") for i in inputs),
    "zero_input": lambda inputs: bool(inputs and inputs[0].get("zeros")),
    "negative_input": lambda inputs: bool(inputs and inputs[0].get("negative")),
    "unit_input": lambda inputs: bool(inputs and inputs[0].get("unit")),
    "zero_denominator": lambda inputs: any(i.get("zeros") for i in inputs[1:] or inputs),
    "underflowed_denominator": lambda inputs: any(i.get("zeros") and i.get("underflow") for i in inputs),
    "underflowed_input": lambda inputs: bool(
        inputs and inputs[0].get("zeros") and inputs[0].get("underflow")
    ),
    "any_zero": lambda inputs: any(i.get("zeros") for i in inputs),
    # the divisor is a Python number the code passed, and it was 0 (``logits / tau``, ``tau=0``)
    "zero_number": lambda inputs: any(
        str(i.get("dtype", "")).startswith("python") and i.get("zeros") for i in inputs[1:]
    ),
    "neginf_input": lambda inputs: bool(inputs and inputs[0].get("neginf")),
    "all_ignored": lambda inputs: any(i.get("numel") and i.get("ignored") == i.get("numel") for i in inputs),
    # the first input has elements beyond ±1 (|x| > 1: outside atanh's domain) or at / below -1 (log1p)
    "beyond_unit": lambda inputs: bool(inputs and inputs[0].get("absmax", 0.0) > 1.0),
    "at_minus_one": lambda inputs: bool(
        inputs and inputs[0].get("unit") and inputs[0].get("min", 0.0) <= -1.0
    ),
    "below_minus_one": lambda inputs: bool(inputs and inputs[0].get("min", 0.0) < -1.0),
    # the second input (a target) holds negative values: kl_div's target is a probability (log-probabilities
    # given as the target: t·log t of a negative t is NaN)
    "negative_target": lambda inputs: len(inputs) > 1 and bool(inputs[1].get("negative")),
    # an input with no elements: a mean over an empty selection (no positive anchor, no valid token) is 0/0
    "empty_input": lambda inputs: any(0 in (i.get("shape") or [1]) for i in inputs),
    "always": lambda inputs: True,
}


_NAN_ONLY = {"negative_input", "beyond_unit", "below_minus_one"}
"""Conditions that can only explain a NaN (a negative number under a root, a log or a fractional power)."""


@dataclasses.dataclass(frozen=True)
class Cause:
    """One specific cause of an op's failure: when it applies, the reason, and its own fix.

    Attributes:
        condition: a key of ``_HOLDS``, checked against the descriptions of the op's inputs.
        reason: the reason in words (``{op}`` is the op's name); also how :func:`advice` recognises
            the cause in an event's ``evidence.reason``.
        fix: the fix for this cause (``None``: the entry's general fix).
    """

    condition: str
    reason: str
    fix: str | None = None


@dataclasses.dataclass(frozen=True)
class OpEntry:
    """What one family of ops does at its numerical edge.

    Attributes:
        pattern: the ops (torch-level names, e.g. ``log``, ``scaled_dot_product_attention``).
        why: why they produce a non-finite value, in general.
        fix: the general fix (when the evidence names no specific cause).
        causes: the specific causes, checked in order against the inputs; the fix follows the
            evidence (``(op, evidence) → fix``), not the op's name alone.
        otherwise: the reason when no cause holds (before an overflow: the op makes its own inf there).
    """

    pattern: re.Pattern[str]
    why: str
    fix: str
    causes: tuple[Cause, ...] = ()
    otherwise: str | None = None

    def cause_of(self, why: str, op: str = "") -> Cause | None:
        """The cause whose reason ``why`` states (an event's ``evidence.reason``), or ``None``."""
        text = why.lower()
        return next((c for c in self.causes if c.reason.format(op=op).lower() in text), None)


def _entry(pattern: str, why: str, fix: str, *causes: Cause, otherwise: str | None = None) -> OpEntry:
    return OpEntry(re.compile(pattern), why, fix, tuple(causes), otherwise)


_LOG = (
    "log of 0 (or of a negative number)",
    "clamp the input: torch.log(x.clamp_min(eps)); for probabilities use F.logsigmoid, log_softmax "
    "or BCEWithLogitsLoss",
)
_DIV = (
    "a zero denominator (a zero count, a zero standard deviation, an all-zero row's norm)",
    "divide by y.clamp_min(eps) (or y + eps) and guard empty counts (a batch with nothing to average); "
    "for x / x.norm() use F.normalize(x, dim=-1, eps=1e-12); where the denominator is the target (a relative "
    "error such as MAPE on days with 0 sales) mask those samples (y != 0) or use a bounded error (WAPE, sMAPE): "
    "an eps makes them dominate the loss; where a mask multiplies the result afterwards (1 / r * (1 - eye)), "
    "select before dividing (the valid pairs only, torch.triu_indices; or torch.where(mask, r, 1) as the "
    "denominator): 0 · inf is NaN, and a clamped 1 / eps still blows up its powers and gradients",
)
_SQRT = (
    "sqrt (or a fractional power) at exactly 0: its gradient is infinite there",
    "use torch.sqrt(x + eps), or torch.linalg.vector_norm (finite gradient at 0 since torch 2.13)",
)
_EXP = (
    "exp of a large argument overflows",
    "clamp the argument before exp where its value itself is used (a variance: logvar.clamp(max=20)); where the "
    "exp feeds a normalisation work in log space instead — torch.softmax / log_softmax for exp(x) / "
    "exp(x).sum() (they subtract the max; a clamp leaves rows of 0 / 0), torch.logsumexp for "
    "log(exp(x).sum()), torch.logcumsumexp for log(cumsum(exp(x))); and check the inputs' scale (features "
    "in raw units, thousands, make huge scores)",
)
_EMPTY_MEAN = (
    "a mean over no elements (an empty selection: a batch with no positive anchor, no valid token, an empty "
    "mask) is 0 / 0",
    "skip the term when the selection is empty (if mask.any(): ...), or average by a count that cannot be 0: "
    "loss(pred[mask], target[mask], reduction='sum') / mask.sum().clamp_min(1)",
)
_LOG1P_FIX = (
    "log1p needs x > -1: find why a value reached -1 or below (a return or a rate below -100 %, a ratio "
    "computed the wrong way round) and repair or drop it; only where -1 is a legitimate edge, clamp "
    "it: torch.log1p(x.clamp_min(-1 + eps))"
)
_UNIT_FIX = (
    "clamp the argument strictly inside (-1, 1): x.clamp(-1 + eps, 1 - eps) (a tanh-squashed action or a "
    "correlation of exactly ±1 is common)"
)
_FRACTIONAL_NEGATIVE = (
    "a negative base to a fractional power is NaN: clamp the base first, x.clamp_min(0) ** p (or "
    "x.abs() ** p * x.sign() where the sign matters)"
)
_POW_AT_ZERO = (
    "a negative power at 0 is infinite and a fractional one has an infinite gradient there: add eps to "
    "the base, (x + eps) ** p or x.clamp_min(eps) ** p (focal loss: (1 - p).clamp_min(eps) ** gamma)"
)

OPS: tuple[OpEntry, ...] = (
    _entry(
        r"^(_?log_)?softmax$|^_softmax$|^_log_softmax$|attention|^logsumexp$",
        "very large logits overflow exp (a learning rate too high, fp16 scores), or a row whose entries "
        "are all -inf (every key masked) gives 0/0",
        "keep the logits in range: compute the softmax in float32, scale the scores, and lower the learning "
        "rate if the logits grew over the steps",
        Cause(
            "rows_all_neginf",
            "a row of all -inf (every key masked) gives 0/0",
            "leave at least one key unmasked per row (or fill the mask with torch.finfo(dtype).min instead "
            "of -inf, and zero the fully masked rows' output)",
        ),
    ),
    _entry(
        r"^masked_fill_?$",
        "a mask filled with -inf on purpose: a row where every entry is masked then reduces to -inf (logsumexp, "
        "max) or to 0/0 (softmax)",
        "fill with torch.finfo(x.dtype).min instead of -inf, and leave out the rows with nothing unmasked (a "
        "sample with no negative or no key in the batch)",
    ),
    _entry(
        r"^binary_cross_entropy$",
        "log of a probability that saturated at 0 or 1",
        "use torch.nn.BCEWithLogitsLoss on the logits (or F.logsigmoid) instead of sigmoid + BCELoss",
    ),
    _entry(
        r"^(cross_entropy|nll_loss|nll_loss_nd|nll_loss2d)$",
        "every target is ignored (ignore_index): the mean over zero targets is 0 / 0",
        "skip a batch with no valid target (if (target != ignore_index).any()), or average with "
        "reduction='sum' / (target != ignore_index).sum().clamp_min(1)",
        Cause("all_ignored", "every target is ignored (ignore_index): the mean over zero targets is 0 / 0"),
        Cause(
            "neginf_input",
            "a target's logit is -inf (masked out on purpose): the loss of a class the mask excludes is +inf",
            "keep every class that can be a target unmasked: map the excluded classes to <unk> (or to "
            "ignore_index) in the targets, or mask with a large finite negative (torch.finfo(logits.dtype).min) "
            "instead of -inf",
        ),
    ),
    _entry(
        r"^log(2|10)?$",
        *_LOG,
        Cause(
            "underflowed_input",
            "log of 0: a softmax (or sigmoid) output that underflowed to 0",
            "take the log in log space: F.log_softmax(logits, dim) for torch.log(torch.softmax(logits, dim)) "
            "(F.logsigmoid for a sigmoid, or BCEWithLogitsLoss / CrossEntropyLoss on the logits); a clamp keeps "
            "it finite but its gradient stays 0 where the probability underflowed",
        ),
        Cause("zero_input", "log of 0"),
        Cause(
            "negative_input",
            _NEGATIVE,
            "the argument is negative: find why (a difference that should be "
            "positive, a missing abs or softplus), then clamp it, torch.log(x.clamp_min(eps))",
        ),
    ),
    _entry(
        r"^log1p$",
        "log1p of -1 (-inf) or of a number below -1 (NaN): log(1 + x) needs x > -1",
        _LOG1P_FIX,
        Cause("below_minus_one", "log1p of a number below -1 (log of a negative 1 + x)", _LOG1P_FIX),
        Cause("at_minus_one", "log1p of -1 (log of 0)", _LOG1P_FIX),
    ),
    _entry(
        r"^(mse_loss|l1_loss|smooth_l1_loss|huber_loss|binary_cross_entropy(_with_logits)?|mean|nanmean|"
        r"cosine_embedding_loss|soft_margin_loss)$",
        _EMPTY_MEAN[0],
        _EMPTY_MEAN[1],
        Cause("empty_input", *_EMPTY_MEAN),
    ),
    _entry(
        r"^poisson_nll_loss$",
        "log of a non-positive predicted rate: with log_input=False the loss takes log(input + eps) of the "
        "prediction itself, and raw outputs go negative",
        "give it log-rates: PoissonNLLLoss(log_input=True) (the default) on the raw output, or keep "
        "log_input=False and make the rate positive (F.softplus(output), output.exp())",
        Cause(
            "negative_input",
            "log of a negative predicted rate (log_input=False on an output that goes below 0)",
            "give it log-rates: PoissonNLLLoss(log_input=True) (the default) on the raw output, or keep "
            "log_input=False and make the rate positive (F.softplus(output), output.exp())",
        ),
    ),
    _entry(r"^xlogy$", *_LOG),
    _entry(
        r"^kl_div$",
        "kl_div of a target with negative values (t · log t of t < 0 is NaN) or exactly 0 with log_target=True",
        "give kl_div what it expects: kl_div(log_probs, probs), or kl_div(log_probs, log_probs_teacher, "
        "log_target=True) when the target is a log-probability",
        Cause(
            "negative_target",
            "kl_div's target holds negative values: log-probabilities passed as probabilities",
            "pass log_target=True when the target is a log-probability (F.kl_div(F.log_softmax(s, -1), "
            "F.log_softmax(t, -1), log_target=True, reduction='batchmean')), or softmax the teacher's logits",
        ),
    ),
    _entry(
        r"^(div|reciprocal|rsqrt)$",
        *_DIV,
        Cause(
            "underflowed_denominator",
            "division by zero: the denominator is 0 because an exp underflowed to 0",
            "work in log space (torch.logsumexp, log_softmax; a log-domain Sinkhorn): exp of an argument below "
            "about -103 is 0 in float32 (-C / eps with a small eps), and an eps on the denominator only "
            "hides it; or make the argument's scale smaller (a larger eps or temperature)",
        ),
        Cause(
            "zero_number",
            "division by zero: the divisor is a Python number that reached 0 (a temperature annealed to 0, a range "
            "or a count read with .item())",
            "keep the number away from 0 — a range or std read with .item(): max(span, 1e-8), or keep it a tensor "
            "and divide by span.clamp_min(eps); a temperature or tau annealed to a floor: max(0.5, tau0 * exp(-r * "
            "step)) for Gumbel-softmax (Jang et al. stop at 0.5: far below it the samples are one-hot and the "
            "gradient vanishes), max(T, 0.05) for a softmax temperature, exp(log_t) for a learned one",
        ),
        Cause("zero_denominator", "division by zero"),
    ),
    _entry(
        r"^(std|var)(_mean)?$",
        "the unbiased std or var of a single value (n - 1 = 0 degrees of freedom) is 0 / 0: a batch or a "
        "group of one (the last batch of an epoch)",
        "use correction=0 (unbiased=False), or give every group at least 2 values (DataLoader(..., "
        "drop_last=True) for a last batch of one)",
    ),
    _entry(r"^(div|true_divide|reciprocal|rsqrt|remainder|fmod|std|var)", *_DIV),
    _entry(
        r"^pow$",
        "a fractional power of a negative number (NaN), or a negative or fractional power at exactly 0 "
        "(an infinite value or gradient)",
        _POW_AT_ZERO,
        Cause("negative_input", "a negative base to a fractional power", _FRACTIONAL_NEGATIVE),
        Cause(
            "any_zero",
            "pow at 0 (a negative power is infinite there, a fractional one has an infinite gradient)",
            _POW_AT_ZERO,
        ),
    ),
    _entry(
        r"^sqrt$",
        *_SQRT,
        Cause(
            "negative_input",
            _NEGATIVE,
            "clamp the argument: torch.sqrt(x.clamp_min(eps)) — a variance "
            "computed as E[x²] − E[x]² can come out slightly negative (prefer torch.var)",
        ),
        Cause("any_zero", _AT_ZERO),
    ),
    _entry(
        r"^hypot$",
        "hypot at the origin (0, 0): its gradient x / hypot(x, y) is 0 / 0",
        "add eps under the root, torch.sqrt(x * x + y * y + eps), or mask the points at the origin out",
        Cause("any_zero", _AT_ZERO),
    ),
    _entry(r"^(norm|linalg_vector_norm|cdist|_cdist_backward)$", *_SQRT, Cause("any_zero", _AT_ZERO)),
    _entry(r"^exp(m1|2)?$", *_EXP, Cause("always", "exp overflow")),
    _entry(r"^(sinh|cosh)$", *_EXP, Cause("always", "{op} overflow")),
    _entry(r"^softplus$", *_EXP),
    _entry(
        r"^(lgamma|digamma|polygamma|mvlgamma)$",
        "lgamma / digamma at 0 (or a negative integer) are infinite: a Gamma, Beta or Dirichlet parameter "
        "(a concentration, a rate) that reached 0",
        "keep the parameter positive and away from 0: F.softplus(x) + eps (or x.clamp_min(eps)) for "
        "concentrations and rates",
    ),
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
        Cause("any_zero", _AT_ZERO),
    ),
    _entry(
        r"^(acos|asin)$",
        "an argument at ±1 (the edge of the domain, where the derivative 1/sqrt(1 - x²) is infinite) or "
        "outside it",
        "clamp the argument strictly inside the domain, x.clamp(-1 + 1e-6, 1 - 1e-6) (a cosine of exactly "
        "±1 is common: identical or opposite vectors)",
        Cause("unit_input", "{op} of ±1 (infinite derivative at the edge of the domain)"),
    ),
    _entry(
        r"^(atanh|erfinv)$",
        "an argument at ±1 (infinite) or beyond (NaN): the domain is (-1, 1)",
        _UNIT_FIX,
        Cause("unit_input", "{op} of ±1 (infinite at the edge of the domain)"),
        Cause("beyond_unit", "{op} of a number beyond ±1 (outside the domain)"),
    ),
    _entry(
        r"^acosh$",
        "an argument below 1 (outside the function's domain), or at 1 (an infinite derivative)",
        "clamp the argument into the domain: x.clamp_min(1 + eps)",
    ),
    _entry(
        r"^where$",
        "torch.where evaluates both branches: the unselected one's NaN gradient still flows",
        _WHERE_FIX,
    ),
    _entry(
        r"^(logdet|linalg_logdet)$",
        "logdet of a matrix whose determinant is negative (NaN) or 0 (-inf): a weight matrix (a normalizing "
        "flow's 1×1 convolution, an invertible linear layer) that changed sign or became singular",
        "take torch.linalg.slogdet(W) (sign and log|det|: use log|det| as the flow's log-determinant), or "
        "parametrize W so it stays invertible (Glow's LU form W = P·L·(U + diag(s)) with log|det| = sum(log|s|))",
    ),
    _entry(
        r"^(cholesky|linalg_cholesky|linalg_cholesky_ex|cholesky_solve|cholesky_inverse)$",
        "a matrix that is not positive-definite (a GP kernel matrix whose noise or jitter went to 0 or below)",
        "keep it positive-definite: a positive noise term, softplus(raw) + 1e-4 (not a raw parameter that can "
        "go negative), plus jitter on the diagonal, K + 1e-6·I",
    ),
    _entry(
        r"^(inverse|linalg_inv|linalg_solve|det|linalg_det)$",
        "a singular (or nearly singular) matrix: its inverse or solution overflows",
        "keep the matrix invertible (add λ·I, a parametrization that stays invertible), or solve a least-squares "
        "problem with torch.linalg.lstsq / pinv instead of inverting",
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
    for cause in causes:
        if cause.condition in _NAN_ONLY and kind != "nan":
            continue
        if _HOLDS[cause.condition](inputs):
            return cause.reason.format(op=_base(op)) + _rounded_to_zero(cause.condition, inputs)
    if entry is not None and entry.otherwise is not None:
        return (
            entry.otherwise
        )  # the op's own non-finite result (an impossible CTC alignment), not an overflow
    if dtype_max is not None and kind in ("inf", "-inf"):
        return _DTYPE_MAX.format(dtype_max)
    return f"{op} produced {kind} from finite inputs"


_ROUNDED = "mantissa rounds"
_MANTISSA = {"bfloat16": (8, "0.4%"), "float16": (11, "0.05%")}  # bits, and how close to 1 rounds to 1


def _rounded_to_zero(condition: str, inputs: Inputs) -> str:
    """For a 0 in a low-precision input that did not underflow (a bf16 ``1 - sigmoid(x)``: ``p`` rounds
    to exactly 1): why the 0 is there, which float32 would not have made."""
    if condition not in ("zero_input", "zero_denominator") or not inputs:
        return ""
    held = [i for i in inputs if i.get("zeros") and not i.get("underflow")]
    dtype = next((str(i.get("dtype")) for i in held if str(i.get("dtype")) in _MANTISSA), None)
    if dtype is None:
        return ""
    bits, close = _MANTISSA[dtype]
    return (
        f" — a {dtype} input, whose {bits}-bit {_ROUNDED} a difference of near-equal values to exactly 0 "
        f"(1 - p for p within {close} of 1): compute this in float32 (outside autocast) or in log space"
    )


_TORCH_OPTIMIZERS = frozenset(
    {"SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "Adafactor", "ASGD", "LBFGS", "NAdam", "RAdam",
     "RMSprop", "Rprop", "SparseAdam", "Muon"}
)  # fmt: skip


_FP16_TINY = 2.0**-24  # float16's smallest subnormal (~6e-8): an eps below half of it rounds to 0


def optimizer_fix(
    name: str | None, hyper: Mapping[str, Any], lr: float | None = None, dtype: str | None = None
) -> str:
    """The fix for a NaN born inside ``optimizer.step()`` from finite gradients, from what its
    hyperparameters say (``hyper``: the group's numbers; ``lr``: the rate logged at that step): a
    non-finite learning rate (a schedule that divided by zero); ``eps = 0``; LBFGS without a line
    search; a hand-written optimizer; otherwise its eps, then the learning rate."""
    inside = f"{name}.step()" if name else "optimizer.step()"
    if lr is not None and not math.isfinite(lr):
        return (
            f"the learning rate itself was {lr} at that step: a schedule that divided by zero (warmup_steps=0, "
            "a 0/0 in a LambdaLR) or a rate computed from a NaN; make the schedule finite at every step"
        )
    eps = hyper.get("eps")
    if dtype == "float16" and isinstance(eps, (int, float)) and 0 < eps < _FP16_TINY / 2:
        return (
            f"the parameters are stored in float16, where {name or 'the optimizer'}'s eps={eps:g} rounds to 0 (float16 "
            "holds nothing below ~6e-8): keep the weights in float32 and compute in float16 under torch.autocast "
            "with a GradScaler (mixed precision), or, for a model kept in float16, eps=1e-4 or more"
        )
    if eps == 0:
        return (
            f"set eps > 0 in {name or 'the optimizer'} (e.g. eps=1e-8): with eps=0 a parameter whose second "
            "moment is still 0 (an embedding row no batch has used, a branch with no gradient) gets 0 / 0"
        )
    if name == "LBFGS" and "line_search_fn" in hyper and hyper["line_search_fn"] is None:
        return (
            "LBFGS without a line search takes its full quasi-Newton step at lr, whatever the curvature it "
            "estimated; on a minibatch loss that estimate is noise: use line_search_fn='strong_wolfe' on full "
            "batches (LBFGS is a full-batch method), or a much lower lr (100× lower, not 10×)"
        )
    if name is not None and name not in _TORCH_OPTIMIZERS:
        return (
            f"{name} is not a torch.optim optimizer: guard the divisions and roots in its step "
            "(norm.clamp_min(eps), sqrt(v) + eps) — a zero gradient or a zero norm gives 0 / 0 there"
        )
    shown = ", ".join(f"{k}={v}" for k, v in list(hyper.items())[:6])
    return (
        f"check {inside}'s hyperparameters{f' ({shown})' if shown else ''}: an eps of 0 or a tiny one "
        "divides by zero; else lower the learning rate"
    )


def at_domain_edge(op: str | None, why: str | None) -> bool:
    """Whether a located op's reason (``evidence.reason``) names one of the op's own specific causes
    other than an overflow: a division by zero, log of 0, an argument at ±1 — values no clipping or
    learning rate keeps the op from (an exp overflow, a value above the dtype's max: they can)."""
    entry = lookup(op)
    found = entry.cause_of(str(why or ""), _base(op or "")) if entry is not None else None
    return found is not None and "overflow" not in found.reason


# lines that compute by hand what torch computes in log space: (what the line does, its fix). Matched on
# the located op's line (a nonfinite event's ``evidence.code``): the exp family's general fix, "clamp the
# argument before exp", leaves these NaN (rows of exp underflowed to 0: 0 / 0, log(0)) or unable to learn.
_BY_HAND = (
    (
        re.compile(r"\blog\w*\(.*cumsum\(.*exp\(|\blog\w*\(.*exp\(.*\)\.cumsum\("),
        "compute the log of a cumulative sum of exps in log space: torch.logcumsumexp(x, dim) (a Cox partial "
        "likelihood's risk sets: logcumsumexp over the risk scores sorted by time); a clamp before exp "
        "still underflows to log(0)",
    ),
    (
        re.compile(r"\blog\w*\(.*cosh\("),
        "log(cosh(r)) overflows for |r| > 89: use torch.logaddexp(r, -r) - math.log(2), the same value and "
        "finite for any r (and scale the targets: residuals in the thousands are large for any loss)",
    ),
    (
        re.compile(r"\blog\w*\(.*exp\(.*\)\.sum\(|\blog\w*\(\s*torch\.sum\(\s*torch\.exp\("),
        "compute the log of a sum of exps in log space: torch.logsumexp(x, dim)",
    ),
    (
        re.compile(r"\.log_prob\("),
        "a value on the edge of the distribution's support, or a parameter at its edge: a Beta target of exactly 0 "
        "or 1 (squeeze the targets inside, (y * (n - 1) + 0.5) / n, or y.clamp(1e-4, 1 - 1e-4)), a Gamma, "
        "LogNormal or Exponential target of 0, a scale or concentration that reached 0 (F.softplus(raw) + 1e-4 "
        "for the parameters); torch.distributions' validate_args=True names which",
    ),
    (
        re.compile(r"exp\(.*\)\s*/.*\bsum\("),
        "this line is a hand-written softmax: use torch.softmax(x, dim) (or F.log_softmax for a log): it "
        "subtracts each row's max first; a clamp before exp still leaves rows of 0 / 0",
    ),
)


_LOG_OF_DATA = (
    "a log of the data's own zeros (a target of 0: an MSLE, log-counts, log-durations) — use torch.log1p(y) "
    "(and log1p of the predictions: MSLE is (log1p(p) - log1p(y))²); a clamp_min(eps) makes those samples "
    "dominate the loss (log(1e-8) = -18)"
)


def _data_log(op: str | None, why: str | None, evidence: Mapping[str, Any]) -> str | None:
    """The fix for a log of 0 whose input came into the step from outside it (``input_entering``: a
    target the loss code logs), or ``None``."""
    at_zero = _base(op or "") in ("log", "log2", "log10") and "log of 0" in str(why or "")
    return _LOG_OF_DATA if at_zero and evidence.get("input_entering") else None


def by_hand(code: str | None) -> str | None:
    """The fix for a line that computes by hand what torch has in log space (:data:`_BY_HAND`), or ``None``."""
    return next((fix for pattern, fix in _BY_HAND if code and pattern.search(code)), None)


def advice(
    op: str | None,
    why: str | None = None,
    cause: str | None = None,
    evidence: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """Why ``op`` produced a non-finite value, and the specific fix.

    Args:
        op: the op a ``nonfinite`` event names.
        why: the event's own reason (``evidence.reason``) where it has one: it is kept as the reason.
            A reason that names no specific cause (``"log in the loss code made a non-finite value
            from finite inputs"``: the loss code's watch does not describe the inputs) gets the op's
            usual cause added, so the user reads what to look for.
        cause: the event's ``cause``, if any. An overflow, a NaN masked out in the forward, or an
            input that was already NaN (in the reason or the cause) get their own fix, whatever the op.
        evidence: the event's ``evidence``: its ``code`` (the op's line) where the line computes by hand
            what torch has in log space (:func:`by_hand`) gives that function as the fix; its
            ``input_entering`` (the op's input came into the step from outside it: a target, data) makes
            a log of 0 a log of the data's zeros (``log1p``), not of a value the model made.
    """
    text = f"{why or ''} {cause or ''}".lower()
    overflow = "dtype's max" in text or "65504" in text or "float16" in text
    if overflow and _ROUNDED not in text:  # (a 0 that a low-precision dtype rounded to is not an overflow)
        fix = _AUTOCAST_FIX if "under autocast" in text else _WIDE_FIX if "e+38)" in text else _DTYPE_FIX
        return (str(why or "a value above float16's largest (65504)"), fix)
    if MASKED_NAN.lower() in text:
        return str(why), _WHERE_FIX
    if "already in the input" in text:
        return (
            str(why),
            "the op only passed it on: find where its input became non-finite (an earlier op, or the data)",
        )
    if op is not None and CUSTOM_FUNCTION.match(op):
        return str(why or f"the custom autograd Function {op} made a non-finite value"), _custom_fix(op)
    entry = lookup(op)
    evidence = evidence or {}
    hand = by_hand(evidence.get("code")) or _data_log(op, why, evidence)
    if hand is not None:
        return str(why or (entry.why if entry is not None else f"{op} made a non-finite value")), hand
    if entry is not None:
        found = entry.cause_of(str(why or ""), _base(op or ""))
        if found is not None:
            return str(why), found.fix or entry.fix
        return (f"{why}; the usual cause: {entry.why}" if why else entry.why), entry.fix
    return (
        str(why or "its inputs put it at a numerical edge"),
        "check the op's inputs at that line and keep them in range (clamp_min(eps), log-space, float32)",
    )


def _custom_fix(op: str) -> str:
    """The fix for a custom ``torch.autograd.Function`` (``op`` is ``Class.forward`` / ``Class.backward``)."""
    return (
        f"fix {op} (your torch.autograd.Function, at its source line): it computes by hand a non-finite "
        "value where the built-in ops would not — guard its divisions and roots against the zeros it saved "
        "(x / d.clamp_min(eps)), or drop the hand-written backward and let autograd derive it; check it with "
        "torch.autograd.gradcheck on double inputs, including the edge case (two equal points, a zero norm)"
    )


def masked_nan(phase: str | None, evidence: Mapping[str, Any] | None) -> bool:
    """Whether a backward op's own forward output held NaN while the loss stayed finite: the forward
    NaN was selected away (``torch.where``, a mask, indexing), but its gradient is 0 × NaN = NaN.

    Args:
        phase: the event's phase.
        evidence: the event's ``evidence`` (``saved``: the backward node's saved tensors, described).
    """
    saved = evidence.get("saved") if phase == "backward" and isinstance(evidence, Mapping) else None
    if not isinstance(saved, Mapping):
        return False
    return any(isinstance(d, Mapping) and (d.get("nan") or 0) > 0 for d in saved.values())
