"""The rules, and the precedence between them: the one place that says which rules run, in which
order, and which rule gives way to which.

Every rule is a module of this package holding ``RULE = Rule(name, detect, explain)``:
``detect(facts, seen)`` returns the rule's evidence (or ``None``: nothing to report) and
``explain(facts, evidence)`` turns it into a :class:`~gradguard.diagnose.Finding`.

:data:`REGISTRY` lists the rules in report order (findings of equal severity are reported in this
order) and declares, as data, how they depend on each other:

* ``needs``: the rules whose conclusions this rule reads through ``seen`` (they are evaluated
  first; ``seen`` refuses any other);
* ``yields_to``: ``{rule: severities}``: this rule is not evaluated, and reports nothing, when that
  rule found something of one of these severities.

Adding a rule is one new module here plus one line in :data:`REGISTRY` (``entry("module")``); a
rule defined elsewhere is registered with ``entry(Rule(...))`` or ``entry("package.module")``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gradguard.diagnose.finding import SEVERITIES, Finding
from gradguard.errors import GradGuardError

if TYPE_CHECKING:
    from gradguard.diagnose.facts import Facts

__all__ = ["REGISTRY", "Entry", "Rule", "Seen", "entry", "evaluate", "finding_ids", "headline", "order"]

ANY = SEVERITIES
"""``yields_to`` severities: whatever the other rule found."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule.

    Attributes:
        name: the rule's name (unique in the registry).
        detect: ``detect(facts, seen) -> evidence | None``.
        explain: ``explain(facts, evidence) -> Finding``.
        finding: the id of the findings it reports (default: ``name``); several rules may report
            one id (``over_clipping`` is a fixed threshold's, an adaptive clipper's, or a zero one's).
    """

    name: str
    detect: Callable[[Facts, Seen], Any]
    explain: Callable[[Facts, Any], Finding]
    finding: str = ""

    @property
    def id(self) -> str:
        return self.finding or self.name


@dataclasses.dataclass(frozen=True)
class Entry:
    """A rule in the registry, with the rules it reads (``needs``) and gives way to (``yields_to``)."""

    rule: Rule
    needs: tuple[str, ...] = ()
    yields_to: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)

    @property
    def after(self) -> tuple[str, ...]:
        """The rules evaluated before this one."""
        return (*self.needs, *self.yields_to)


def entry(
    rule: str | Rule, *, needs: Sequence[str] = (), yields_to: Mapping[str, Sequence[str]] | None = None
) -> Entry:
    """A registry entry: ``rule`` is a :class:`Rule`, or the module holding ``RULE`` (a module of
    this package by its short name, any other by its dotted name)."""
    if isinstance(rule, str):
        module = rule if "." in rule else f"{__name__}.{rule}"
        rule = importlib.import_module(module).RULE
    assert isinstance(rule, Rule)
    return Entry(rule, tuple(needs), dict(yields_to or {}))


class Seen:
    """What the rules evaluated so far concluded, as far as the asking rule declared it ``needs``."""

    def __init__(self, done: Mapping[str, tuple[Any, Finding | None]], allowed: Sequence[str]) -> None:
        self._done = done
        self._allowed = set(allowed)

    def _get(self, name: str) -> tuple[Any, Finding | None]:
        if name not in self._allowed:
            raise GradGuardError(
                f"a rule read rule {name!r} without declaring it: add needs=({name!r},) to its registry entry."
            )
        return self._done.get(name, (None, None))

    def evidence(self, name: str) -> Any:
        """What rule ``name`` detected (``None``: nothing, or it gave way)."""
        return self._get(name)[0]

    def finding(self, name: str) -> Finding | None:
        """The finding of rule ``name``, or ``None``."""
        return self._get(name)[1]


def finding_ids(registry: Sequence[Entry] | None = None) -> tuple[str, ...]:
    """The finding ids the registry can report, in report order."""
    return tuple(dict.fromkeys(e.rule.id for e in (REGISTRY if registry is None else registry)))


def order(registry: Sequence[Entry]) -> list[Entry]:
    """The entries in evaluation order: registry order, except that a rule runs after those it names.

    Raises:
        GradGuardError: a rule names one that is not registered, or two rules wait for each other.
    """
    names = [e.rule.name for e in registry]
    for e in registry:
        unknown = [n for n in e.after if n not in names]
        if unknown:
            raise GradGuardError(f"diagnose rule {e.rule.name!r} names unregistered rule(s) {unknown}.")
    done: list[Entry] = []
    waiting = list(registry)
    while waiting:
        ready = next((e for e in waiting if all(n in {d.rule.name for d in done} for n in e.after)), None)
        if ready is None:
            raise GradGuardError(f"diagnose rules wait for each other: {[e.rule.name for e in waiting]}.")
        done.append(ready)
        waiting.remove(ready)
    return done


def _gives_way(e: Entry, done: Mapping[str, tuple[Any, Finding | None]]) -> bool:
    for other, severities in e.yields_to.items():
        found = done.get(other, (None, None))[1]
        if found is not None and found.severity in severities:
            return True
    return False


def evaluate(facts: Facts, registry: Sequence[Entry] | None = None) -> list[Finding]:
    """Every rule of the registry over ``facts``: the findings, most severe first, then in report order."""
    entries = REGISTRY if registry is None else registry
    done: dict[str, tuple[Any, Finding | None]] = {}
    for e in order(entries):
        if _gives_way(e, done):
            continue
        evidence = e.rule.detect(facts, Seen(done, e.needs))
        done[e.rule.name] = (evidence, None if evidence is None else e.rule.explain(facts, evidence))
    ids = finding_ids(entries)
    findings = [found for _, found in done.values() if found is not None]
    return sorted(findings, key=lambda f: _rank(f, ids))


def _rank(finding: Finding, ids: Sequence[str]) -> tuple[int, int]:
    severity = SEVERITIES.index(finding.severity) if finding.severity in SEVERITIES else len(SEVERITIES)
    return severity, ids.index(finding.id) if finding.id in ids else len(ids)


# ============================================================================================
# The registry: every rule, in report order, and the precedence between them (the one place)
# ============================================================================================

_CAUSES = (
    "target_network",
    "bad_data",
    "unbounded_loss",
    "weight_decay",
    "optimizer_setting",
    "logit_scale",
    "optimizer_setting",
    "gradients_not_zeroed",
    "lr_schedule",
    "custom_backward",
    "loss_weight",
    "clip_before_backward",
    "loss_on_probabilities",
    "logit_scale",
    "explosion",
    "sudden_growth",
    "nonfinite_op",
    "divergence",
    "over_clipping",
    "adaptive_clipping",
    "zeroed_gradients",
    "lr_too_high",
    "weight_growth",
    "vanishing",
    "loss_scale_collapse",
    "loss_code_warning",
)
"""The rules whose warning or error explains a run that did not train (``stalled`` gives way to them)."""

_DRIVERS: dict[str, Sequence[str]] = {
    "weight_decay": ("error",),
    "optimizer_setting": ("error",),
    "gradients_not_zeroed": ("error",),
    "lr_schedule": ("error",),
    "custom_backward": ("error",),
    "loss_weight": ("error",),
    "clip_before_backward": ("error",),
    "loss_on_probabilities": ("error",),
    "logit_scale": ("error",),
    "unbounded_loss": ("error",),
    "target_network": ("error",),
}
"""Settings that drive a run's growth whatever the learning rate or threshold (and an objective with no
lower bound): where one is the error, the growth it causes is not reported again (with a threshold's or
a rate's advice that cannot fix it: label smoothing of 10 made targets of -9, and "max_norm=8 or
lr=0.005" beside the headline both failed)."""

REGISTRY: list[Entry] = [
    # the headline (the first error of this list) is decided here, in this order:
    # 1. a model no optimizer steps (a target network, an EMA teacher) whose hand-written update blew it up:
    #    the targets it feeds are not the dataset's;
    entry("target_network"),
    #    a tensor entering the step was non-finite: the data (or the carried state), not the model;
    entry("bad_data", yields_to={"target_network": ("error",)}),
    # 2. an objective with no lower bound (a WGAN critic without its Lipschitz constraint) explains the
    #    explosion it drives;
    entry("unbounded_loss"),
    #    (and a weight decay that multiplies the weights by a factor far from 1 at every step: a typo such
    #    as 5e2 for 5e-4 drives an explosion no clipping stops);
    entry("weight_decay"),
    #    (and an optimizer hyperparameter outside its working range: momentum 1, RMSprop alpha 1, Adam with an
    #    AdamW config's weight_decay);
    entry("optimizer_setting"),
    #    (and gradients never zeroed between steps: each step applies the running sum);
    entry("gradients_not_zeroed"),
    #    (and a learning rate that went negative, or a schedule that collapsed it to nothing mid-run);
    entry("lr_schedule"),
    #    (and a custom autograd Function whose backward is not linear in its gradient: the chain rule
    #    forgotten, the layers below follow a "gradient" that is not the loss's);
    entry("custom_backward"),
    #    (and a term of the loss weighted to outweigh the rest of it: a penalty at 1e4 for 1e-4);
    entry("loss_weight"),
    #    (and the script's clip_grad_norm_ called before backward(): it clipped nothing);
    entry("clip_before_backward"),
    #    (and a loss that takes logits given probabilities: a softmax before CrossEntropyLoss);
    entry("loss_on_probabilities"),
    #    (and logits divided by a temperature of 0.02 or less before a classification loss);
    entry("logit_scale"),
    # 3. an explosion (norms growing over steps) explains the overflow it ends in;
    #    (a schedule that raised the rate right before the climb is its cause: lr_too_high reads it);
    #    (a weight decay or gradients that are never zeroed drive it: their advice, not a threshold's, is
    #    the answer, and the climb they cause is not reported again as an explosion or a divergence);
    entry("explosion", needs=("divergence", "lr_too_high"), yields_to=_DRIVERS),
    #    (an explosion the guard caught and rolled back, on_explosion="recover": the rate that made it is
    #    still the run's);
    entry("recovered_explosion", yields_to={"explosion": ANY, **_DRIVERS}),
    #    (and growth too fast for the norms to show: a float32 overflow, an update as large as the weights);
    entry("sudden_growth", yields_to={"explosion": ANY, **_DRIVERS}),
    # 4. otherwise an op that made a NaN/inf from finite inputs is the fault, with that op's fix;
    entry(
        "nonfinite_op",
        needs=("bad_data",),
        yields_to={"explosion": ("error",), "sudden_growth": ("error",), **_DRIVERS},
    ),
    # 5. then a run that diverged while finite, and the rest.
    entry("divergence", yields_to=_DRIVERS),
    entry("over_clipping"),
    entry("adaptive_clipping", yields_to={"explosion": ANY}),
    entry("zeroed_gradients"),
    entry("lr_too_high", yields_to={"optimizer_setting": ANY, "logit_scale": ANY}),
    entry("weight_growth"),
    #    (gradients that look vanishing in a model a too-high first step wrecked are that rate's);
    entry("vanishing", needs=("lr_too_high",), yields_to={"optimizer_setting": ANY}),
    entry("loss_scale_collapse"),
    #    (torch warned in the loss code: a broadcast, an implicit dim — what was computed is not the loss meant);
    entry("loss_code_warning"),
    # 6. a finite run that did not train and that no rule above explains (the last resort: a failed
    #    run never reads "No findings").
    entry("stalled", yields_to={name: ("error", "warning") for name in _CAUSES}),
    entry("incomplete_log"),
]
"""Every rule, in report order, with its dependencies (see the module docstring). The headline
verdict (:func:`headline`) is the first finding of severity ``error`` in this order."""


def headline(findings: Sequence[Finding]) -> Finding | None:
    """The verdict a user reads first: the first ``error`` of ``findings`` (as :func:`evaluate` sorts
    them: severity, then registry order), or ``None`` when nothing went wrong."""
    return next((f for f in findings if f.severity == "error"), None)
