"""``stalled``: a run that stayed finite and did not train, which no other rule explains.

The loss never got :data:`~gradguard.diagnose.rules._clipping.STALLED` below where it started (the
lowest median of its ten spans is within 20 % of its first steps) and its second half is flat (fell by no
more than the spread of its last quarter's losses: a run still learning slowly is not one), over
at least :data:`MIN_STEPS` steps. What the layers' update/weight ratios say decides the advice:

* steps large (median ≥ :data:`LARGE`, ~1e-3 is typical; under Adam and its kin ≥ :data:`CHANCE_LARGE`,
  whose steps are ~lr per element, so ``lr / rms(w)``: a small BERT from scratch at AdamW 1e-3 moves its
  0.02-initialised layers ~9e-3 a step while it learns, and its first 80 steps, on a plateau it
  leaves by step 400, read "lower the rate"): the loss bounces instead of descending —
  the learning rate is too high for the model (a 12-layer ReLU MLP at SGD 0.3 with momentum 0.9
  under ``clip="auto"``: clipped on 23 % of steps, ratios 0.009, the loss at chance for 315 steps;
  0.03, the rate that moves the layers ~1e-3 a step, trains to 0.73);
* steps tiny (median ≤ :data:`TINY`): the rate is too low to move the weights in this run (SGD at
  1e-5 on a freshly initialised model).

Between the two the ratios give no cause (a fine-tune already at its floor looks the same as a
model that cannot learn), and the rule says nothing — unless the loss sits at ``ln K``, the
cross-entropy of a uniform guess over K classes (:func:`chance_level`): a model that predicts nothing
from its input (a vanilla RNN on a copy task over a gap it cannot carry: ln 8 for 300 steps), whose
advice is the signal (inputs paired with their labels, no detach, a dependency the architecture can
carry) before the rate — and the rate first only at ten times the usual steps (:data:`CHANCE_LARGE`). It gives way to every rule with a cause
(the registry): it is the finding of last resort, the one that keeps a failed run from reading
"No findings".
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import fmt, layer_name, median, sig, still_falling
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import (
    STALLED,
    classes_used,
    failed_lr,
    lr_advice,
    ratio_lr,
    scale_free,
    update_ratios,
    with_lr,
)

MIN_STEPS = 50  # fewest recorded steps to call a run stalled
LARGE = 3e-3  # a median update/weight ratio this large or more: steps too large to settle
CHANCE_LARGE = 1e-2  # at a chance level, steps this large or more: the rate is blamed before the signal
TINY = 1e-5  # this small or less: steps too small to move the weights
#: parameters stored in a half type: a step below half an ulp of a weight (2⁻⁹ of it in bfloat16's 8
#: significant bits, 2⁻¹² in float16's 11) rounds back to the weight — a median ratio below it: lost
ROUNDED_AWAY = {"bfloat16": 2.0**-9, "float16": 2.0**-12}
_AIM = 1e-3  # the update/weight ratio the advised rate aims at (the rule of thumb)
_START = 5  # the losses whose median is where the run started
# a loss whose last quarter is within this share of its lowest level settled at a floor: large steps
# bounce a loss above its lowest (a deep plain classifier at SGD 0.3: 8.5 % above it); 80 % label noise
# under steps of 0.013 sat 0.4 % above its floor, and the rate advised (4e-3) did not move it
_SETTLED = 0.03
# a loss at or below this share of its very first value fell at once, to a floor (least squares: 5e6 →
# 198 at step 2); a deep plain classifier 2.77 → 2.08 (chance 2.30) fell from a bad init to chance
_FELL_AT_ONCE = 0.5
_SHRUNK = 1e-2  # a loss multiplied by this or less before backward(): its steps are that much smaller
_MEAN_LEVEL = 0.15  # an MSE within this fraction of its targets' variance sits at the mean's loss
_NO_GRADIENT = 0.9  # this share of the steps with a gradient norm of 0: no step had a gradient


@dataclasses.dataclass(frozen=True)
class Evidence:
    """Where the loss started, its lowest level (the least median of ten spans) and where it ended; the median update
    ratio over the layers; the share of clipped steps."""

    start: float
    low: float
    end: float
    noise: float
    moved: float
    clip_rate: float
    steps: int
    classes: int | None = None  # the loss sits at ln K: a uniform prediction over K classes
    variance: float | None = None  # an MSE sitting at its targets' variance: the targets' mean predicted


def detect(f: Facts, seen: Seen) -> Evidence | None:
    if f.went_bad or len(f.rows) < MIN_STEPS:  # (a climb the clipper held: the explosion rule's, or here)
        return None
    losses = f.loss_at(0, len(f.rows))
    if len(losses) < MIN_STEPS:
        return None
    start = max(median(losses[:_START]), _uniform(f))  # (a classifier starts from ln K at most: its first
    # steps may fall fast — an InfoNCE over 256 candidates, 5.5 → 4.9 in 5 steps, then its augmentations' floor)
    width = max(_START, len(losses) // 10)  # the lowest level: the least median of ten spans
    low = min(median(losses[i : i + width]) for i in range(0, len(losses), width))
    quarter = losses[-(len(losses) // 4) :]
    noise = statistics.pstdev(quarter)
    if not (start > 0 and low > (1 - STALLED) * start) or still_falling(losses):
        return None
    warm = max(3, len(f.rows) // 50)
    ratios = list(update_ratios(f, warm, len(f.rows)).values())
    moved = median(ratios) if ratios else math.nan
    end = median(quarter)
    classes = _chance(f, end)
    variance = _mean_level(f, end)
    if classes is None and variance is None and 0 < _FELL_AT_ONCE * losses[0] >= low:
        return None  # it fell from its very first loss within the first steps (least squares: 5e6 → 198 at
        # step 2, the noise floor), then had nothing left to learn: not a stall
    never = isinstance(f.log.meta.get("never_updated"), str) or _no_gradient(f) or bool(_dead_layers(f))
    chance = classes is not None or variance is not None
    if not (moved >= _large(f) or moved <= TINY or chance or _rounded_away(f, moved) or never):
        return None
    rate = sum(f.clipped) / len(f.clipped) if f.clip_kind != "none" else 0.0
    return Evidence(start, low, end, noise, moved, rate, len(f.rows), classes, variance)


def _uniform(f: Facts) -> float:
    """``ln K`` of the run's classification loss over K classes (:func:`classes_used`), the loss of a
    uniform guess where a model starts; 0 when none is known."""
    ks = classes_used(f)
    return math.log(max(ks)) if ks else 0.0


def _mean_level(f: Facts, loss: float) -> float | None:
    """The variance of the targets of the run's ``mse_loss`` (``meta.json`` ``loss_functions``, from
    ``gradguard run``) where the loss sits within :data:`_MEAN_LEVEL` of it: the loss of predicting the
    targets' mean (an LSTM fed load curves in raw MW, targets standardized: MSE 0.99 for the whole run,
    "No findings"; inputs scaled, 0.0009); ``None`` otherwise."""
    noted = f.log.meta.get("loss_functions")
    for entry in noted if isinstance(noted, list) else ():
        v = entry.get("target_variance") if isinstance(entry, dict) else None
        if isinstance(v, (int, float)) and v > 0 and loss >= (1 - _MEAN_LEVEL) * v:
            return float(v)  # (at it: the mean predicted; above it: worse than the mean)
    return None


def _rounded_away(f: Facts, moved: float) -> str | None:
    """The half type the parameters are stored in (``meta.json`` ``parameter_dtype``) where the
    median step is below half an ulp of the weights (:data:`ROUNDED_AWAY`): most updates round
    back to the weight they were added to. ``None`` otherwise."""
    dtype = f.log.meta.get("parameter_dtype")
    return dtype if isinstance(dtype, str) and moved < ROUNDED_AWAY.get(dtype, 0.0) else None


def _large(f: Facts) -> float:
    """The median update ratio from which the steps are too large: :data:`LARGE`, or
    :data:`CHANCE_LARGE` under an optimizer that normalizes its step."""
    return CHANCE_LARGE if scale_free(f) else LARGE


def _chance(f: Facts, loss: float) -> int | None:
    """:func:`chance_level` of ``loss``, where the run's loss can sit there: under ``gradguard run``
    (``meta.json`` ``loss_functions``) only a classification loss over that many classes (a GAN's BCE at
    1.1 is no "uniform guess over 3 classes", nor an InfoNCE over 255 candidates at ln 56)."""
    k = chance_level(loss)
    if k is None or not isinstance(f.log.meta.get("loss_functions"), list):
        return k
    return k if k in classes_used(f) else None


def chance_level(loss: float) -> int | None:
    """The number of classes ``K`` whose uniform prediction has this cross-entropy, ``ln K`` (within
    1 % and a quarter of the gap to ``ln (K + 1)``: the levels are told apart up to large K), for
    ``2 ≤ K ≤ 10⁶``; ``None`` when the loss is no such level."""
    if not (math.isfinite(loss) and math.log(2) * 0.99 <= loss <= math.log(1e6)):
        return None
    k = max(2, round(math.exp(loss)))
    for guess in (k - 1, k, k + 1):
        if guess < 2:
            continue
        level = math.log(guess)
        if abs(loss - level) <= min(0.01 * level, 0.25 * math.log((guess + 1) / guess)):
            return guess
    return None


def explain(f: Facts, ev: Evidence) -> Finding:
    lr = failed_lr(f)
    # at chance with steps only a few times the usual size, the signal is the suspect (labels shuffled
    # apart from their inputs, Adam 1e-3: ratio 3.5e-3, and 3e-4 stayed at chance), not the rate
    at_chance = ev.classes is not None or ev.variance is not None
    large = ev.moved >= (CHANCE_LARGE if at_chance else _large(f))
    tiny = ev.moved <= TINY
    clipped = f" while {f.clip_spec} clipped {ev.clip_rate:.0%} of them" if ev.clip_rate > 0 else ""
    chance = (
        f" It sits at ln {ev.classes} = {fmt(math.log(ev.classes))}, the cross-entropy of a uniform prediction "
        f"over {ev.classes} classes: the model predicts nothing from its input."
        if ev.classes is not None
        else f" It sits at the variance of its targets ({fmt(ev.variance)}), the error of predicting their mean: "
        f"the model explains {max(0.0, 1 - ev.end / ev.variance):.1%} of it — little or nothing from its input "
        "(unless the targets are mostly noise, a low signal-to-noise regression such as returns: then this is "
        "their floor)."
        if ev.variance is not None and ev.end <= (1 + _MEAN_LEVEL) * ev.variance
        else f" It sits at {fmt(ev.end / ev.variance)}× the variance of its targets ({fmt(ev.variance)}): worse than "
        "predicting their mean — the output cannot reach the targets' range (a sigmoid or tanh head on targets "
        "outside [0, 1] / [-1, 1], targets in other units than the output)."
        if ev.variance is not None
        else ""
    )
    moved = f"A step moved the layers by {fmt(ev.moved)} of their weight norm (median; ~1e-3 is typical)"
    if _no_gradient(f):
        return _without_gradients(f, ev, chance)
    dead = _dead_layers(f)
    if dead:
        return _cut_off(f, ev, dead, chance)
    never = f.log.meta.get("never_updated")
    if isinstance(never, str):
        return _never_updated(f, ev, never, chance)
    half = _rounded_away(f, ev.moved)
    if half is not None and not large:
        return _rounded(f, ev, half, chance, clipped)
    floor = large and not at_chance and ev.low < ev.start and ev.end <= (1 + _SETTLED) * ev.low
    if floor:
        cause = (
            f" {moved} — large, but the loss fell to {fmt(ev.low)} and settled there, not bouncing: a floor. Noisy "
            "labels, noisy targets or frozen features set a floor no rate moves; if the data allow a lower one, a "
            "lower rate may reach it (unverified)."
        )
    elif large:
        cause = f" {moved}: steps that large keep the loss bouncing instead of descending — the learning rate is too high for this model."
    elif tiny and _shrunk(f) is not None:
        factor, where = _shrunk(f) or (1.0, "")
        cause = (
            f" {moved}: steps that small do not move the weights — and the loss is multiplied by {fmt(factor)} "
            f"before backward(){where}: its gradients, and every step, are {fmt(1 / factor)}× smaller."
        )
    elif tiny:
        cause = (
            f" {moved}: steps that small do not move the weights in this run — the learning rate is too low."
        )
    else:
        cause = f" {moved}: the rate is not the obvious cause."
    message = (
        f"The run did not train: over {ev.steps} steps the loss stayed near where it started "
        f"({fmt(ev.start)} at the start, {fmt(ev.end)} over the last quarter, never below {fmt(ev.low)}){clipped}."
        f"{chance}{cause}"
    )
    evidence: dict[str, Any] = {
        "loss_start": sig(ev.start, 4),
        "loss_lowest": sig(ev.low, 4),
        "loss_end": sig(ev.end, 4),
        "loss_noise": sig(ev.noise, 3),
        "update_ratio_median": sig(ev.moved, 3),
        "typical_update_ratio": _AIM,
        "clip_rate": round(ev.clip_rate, 4),
        "lr": lr,
    }
    if ev.classes is not None:
        evidence["chance_classes"] = ev.classes
    if ev.variance is not None:
        evidence["target_variance"] = sig(ev.variance, 4)
    signal = _NO_SIGNAL if ev.variance is None else _NO_SIGNAL_REGRESSION
    if ev.variance is not None and ev.end > (1 + _MEAN_LEVEL) * ev.variance:
        signal = _OUT_OF_RANGE
    rec = _advice(f, lr, ev.moved, large) if large or tiny else {"text": signal}
    shrunk = _shrunk(f) if tiny else None
    if shrunk is not None:
        rec = {
            "verified": False,
            "text": f"Remove the factor {fmt(shrunk[0])} from the loss (MSELoss and CrossEntropyLoss already average "
            "over the batch: dividing by the dataset size again makes the gradients that much smaller); raising the "
            "learning rate by the same factor is equivalent under SGD only.",
        }
    return Finding("stalled", "info" if floor else "warning", f.steps[0], message, evidence, rec)


def _dead_layers(f: Facts) -> list[str]:
    """The layers whose gradient norm was exactly 0 on every recorded step while others' were not (a
    Dropout(p=1.0) — TF's keep_prob=1.0 — zeroing every activation after them, a multiplication by 0, weights
    that all started at 0): the signal never reached them."""
    zero, live = [], False
    for name in f.layers:
        norms = [g for g in f.layer(name, "grad_norm") if math.isfinite(g)]
        if len(norms) >= MIN_STEPS // 2 and all(g == 0 for g in norms):
            if not _bias_only(f, name):
                zero.append(name)
        elif any(g > 0 for g in norms):
            live = True
    return zero if live else []


def _bias_only(f: Facts, layer: str) -> bool:
    """Whether a layer's parameters (``meta.json`` ``parameters``: name → shape) are all vectors: a bias
    whose gradient is 0 by construction is healthy — a Linear's bias before a BatchNorm (the mean is
    subtracted), a hinge GAN critic's output bias while every sample is inside the margin (−1 + 1), the
    bias left in a layer whose weight spectral_norm moved to ``weight_orig``."""
    shapes = f.log.meta.get("parameters")
    if not isinstance(shapes, dict):
        return False
    own = [shape for n, shape in shapes.items() if n.rsplit(".", 1)[0] == layer]
    return bool(own) and all(isinstance(shape, list) and len(shape) <= 1 for shape in own)


def _cut_off(f: Facts, ev: Evidence, dead: list[str], chance: str) -> Finding:
    """Some layers' gradients were exactly 0 on every step: nothing reached them, they never learned."""
    names = ", ".join(layer_name(n) for n in dead[:5]) + (
        f" and {len(dead) - 5} more" if len(dead) > 5 else ""
    )
    zero_init = [n for n in dead if f.layer(n, "weight_norm")[0] == 0]
    if zero_init:
        why = (
            f"their weights were all 0 at the start ({', '.join(layer_name(n) for n in zero_init[:5])}: a weight norm "
            "of 0), so every unit computes the same and gets the same gradient — 0 here — and they never differ"
        )
        text = (
            "Initialise the weights, not only the biases, away from 0: torch's default init, or "
            "nn.init.kaiming_normal_(layer.weight, nonlinearity='relu') (nn.init.zeros_ is for biases)."
        )
    else:
        why = (
            "the signal is cut between them and the loss: a Dropout(p=1.0) (TF's keep_prob=1.0 passed as PyTorch's "
            "drop probability p) zeroing every activation, a multiplication by 0, a detach(), ReLUs that are all dead"
        )
        text = (
            "Find what zeroes the signal after these layers: nn.Dropout(p) takes the probability to DROP (keep_prob=0.9 "
            "is p=0.1); a mask or a factor that is 0; a .detach() or torch.no_grad() on the path; ReLUs whose inputs "
            "are all negative (a bias or a normalisation off)."
        )
    message = (
        f"The run did not train: over {ev.steps} steps the loss stayed near where it started ({fmt(ev.start)} at the "
        f"start, {fmt(ev.end)} over the last quarter).{chance} The gradients of {names} were exactly 0 on every step: "
        f"{why}."
    )
    evidence = {"loss_start": sig(ev.start, 4), "loss_end": sig(ev.end, 4), "zero_gradient_layers": dead[:20]}
    return Finding("stalled", "error", f.steps[0], message, evidence, {"verified": False, "text": text})


def _shrunk(f: Facts) -> tuple[float, str] | None:
    """The factor ≤ :data:`_SHRUNK` the loss was multiplied by before ``backward()`` (``meta.json``
    ``loss_scale``, from ``gradguard run``: ``loss / n_train``), and ``" (at line)"``; not an accumulation's
    ``1 / k`` (``accumulation``). ``None`` otherwise."""
    noted = f.log.meta.get("loss_scale")
    if not isinstance(noted, dict):
        return None
    factor = noted.get("factor")
    if not (isinstance(factor, (int, float)) and 0 < factor <= _SHRUNK):
        return None
    accumulation = f.log.meta.get("accumulation")
    k = accumulation.get("micro_batches") if isinstance(accumulation, dict) else None
    if isinstance(k, int) and abs(factor * k - 1) < 0.5:
        return None
    where = f" (at {noted['source']})" if noted.get("source") else ""
    return float(factor), where


def _no_gradient(f: Facts) -> bool:
    """Whether (nearly) every step was taken without a gradient: a global norm of 0 on at least
    :data:`_NO_GRADIENT` of the steps — ``zero_grad()`` between ``backward()`` and ``step()``."""
    norms = [f.norm[i] for i in f.rows if math.isfinite(f.norm[i])]
    return bool(norms) and sum(1 for g in norms if g == 0) >= _NO_GRADIENT * len(norms)


def _without_gradients(f: Facts, ev: Evidence, chance: str) -> Finding:
    """No step had a gradient when the optimizer stepped: the weights never moved."""
    zero = sum(1 for i in f.rows if f.norm[i] == 0)
    message = (
        f"The run did not train: over {ev.steps} steps the loss stayed near where it started "
        f"({fmt(ev.start)} at the start, {fmt(ev.end)} over the last quarter).{chance} {zero} of its {ev.steps} "
        "optimizer steps had no gradient (a norm of 0, no layer with a gradient): the optimizer stepped on "
        "gradients that were already cleared, so the weights never moved."
    )
    text = (
        "Call optimizer.zero_grad() before loss.backward() (at the top of the step, or after optimizer.step()), "
        "never between backward() and step(); and check that the loss is computed from the model's output "
        "without detach() or torch.no_grad()."
    )
    evidence = {"loss_start": sig(ev.start, 4), "loss_end": sig(ev.end, 4), "steps_without_gradient": zero}
    return Finding("stalled", "error", f.steps[0], message, evidence, {"verified": False, "text": text})


def _never_updated(f: Facts, ev: Evidence, names: str, chance: str) -> Finding:
    """The model's trainable parameters never changed (``meta.json`` ``never_updated``, from
    ``gradguard run``): no optimizer steps them — one built before the model or its head was replaced."""
    message = (
        f"The run did not train: over {ev.steps} steps the loss stayed near where it started "
        f"({fmt(ev.start)} at the start, {fmt(ev.end)} over the last quarter).{chance} The model's trainable "
        f"parameters ({names}) never changed: no optimizer steps them, and the script does not update them."
    )
    text = (
        "Build the optimizer over the model's parameters after the model is final: an optimizer made before "
        "the head was replaced (model.fc = nn.Linear(...)) or the model re-created holds the old parameters. "
        "Check with set(map(id, model.parameters())) & {id(p) for g in optimizer.param_groups for p in g['params']}."
    )
    evidence = {"loss_start": sig(ev.start, 4), "loss_end": sig(ev.end, 4), "never_updated": names}
    return Finding("stalled", "warning", f.steps[0], message, evidence, {"verified": False, "text": text})


def _rounded(f: Facts, ev: Evidence, dtype: str, chance: str, clipped: str) -> Finding:
    """The parameters are stored in a half type and the steps are below half an ulp of the weights."""
    message = (
        f"The run did not train: over {ev.steps} steps the loss stayed near where it started "
        f"({fmt(ev.start)} at the start, {fmt(ev.end)} over the last quarter){clipped}.{chance} The parameters are "
        f"stored in {dtype}, whose weights change only by steps of at least half an ulp (~{ROUNDED_AWAY[dtype]:.1g} "
        f"of a weight): a step moved the layers by {fmt(ev.moved)} of their weight norm (median), so most updates "
        f"round back to the weight they were added to."
    )
    evidence = {
        "loss_start": sig(ev.start, 4),
        "loss_end": sig(ev.end, 4),
        "update_ratio_median": sig(ev.moved, 3),
        "parameter_dtype": dtype,
        "rounded_below": ROUNDED_AWAY[dtype],
    }
    text = (
        f"Keep the weights in float32 and compute in {dtype}: model.float() and torch.autocast(device_type=..., "
        f"dtype=torch.{dtype}) around the forward (mixed precision); or an optimizer that keeps float32 master "
        "copies of the weights. A higher learning rate only lets the larger updates through."
    )
    return Finding("stalled", "warning", f.steps[0], message, evidence, {"verified": False, "text": text})


_NO_SIGNAL = (
    "Check that the signal reaches the output: each input paired with its own label (a shuffle applied to one "
    "and not the other), no detach() or no_grad on the path, the right tensor fed to the loss; then that the "
    "gradient reaches the early layers — a dependency longer than a vanilla RNN or a deep plain network "
    "carries (use an LSTM/GRU, residual connections, normalisation); then the learning rate "
    "(gradguard tune --lr)."
)


_OUT_OF_RANGE = (
    "Make the output able to reach the targets: drop a sigmoid / tanh head for a regression (a linear output), "
    "or rescale the targets into the head's range (y / y.max() for a sigmoid); standardize the targets "
    "(predict (y - mean) / std, and map back)."
)
_NO_SIGNAL_REGRESSION = (
    "Check the inputs' scale first: features in raw units (thousands: a load in MW, a price, pixel values "
    "0–255) saturate tanh / sigmoid units and LSTM gates, and the model falls back on the targets' mean — "
    "standardize each input feature (its mean and std from the training set). Then that the signal reaches "
    "the output: inputs paired with their targets, no detach() or no_grad on the path; then the learning rate "
    "(gradguard tune --lr)."
)


def _advice(f: Facts, lr: float | None, moved: float, large: bool) -> dict[str, Any]:
    """The rate that moves the layers ~1e-3 of their weights a step: lower (verified or not, as
    :func:`~gradguard.diagnose.rules._clipping.lr_advice` gives it), or higher."""
    estimate = None
    if lr is not None and math.isfinite(moved) and moved > 0:
        estimate = ratio_lr(lr, moved, _AIM) if large else sig(lr * _AIM / moved, 1)
    why = f"the rate that moves the layers ~{_AIM:g} of their weights a step"
    advice = lr_advice(f, estimate, why, higher=not large)
    verb = "Lower" if large else "Raise"
    rec = with_lr({}, advice)
    rec["text"] = f"{verb} the learning rate. {advice['text']}."
    return rec


RULE = Rule("stalled", detect, explain)
