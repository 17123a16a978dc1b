"""The runner's lookups: the root (model) a module call or a set of parameters belongs to, and the
session (guard) of an optimizer, of a clip call's parameters or of a model updated by hand, made
the first time it is needed (see :class:`~gradguard.integrations.zerocode.runner.ZeroCode`).

Each function takes the runner (``zc``, typed ``Any``: runner.py imports this module)."""

from __future__ import annotations

import shlex
import weakref
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gradguard._guard.config import ROLLBACK_SETTINGS
from gradguard.errors import GradGuardError
from gradguard.guard import Guard, open_guard_of
from gradguard.integrations._common import describe_optimizer, stepped
from gradguard.integrations.zerocode.sessions import (
    ManualUpdate,
    Root,
    Session,
    all_optimizers,
    covers,
)
from gradguard.locate import StepCapture, user_name_of, user_values


# ----------------------------------------------------------------------------- roots
def root_of(zc: Any, module: nn.Module) -> Root | None:
    """The root entry of a module called at the top level (made at its first call); ``None``
    for a module without parameters (a loss module)."""
    root = zc._roots.get(id(module))
    if root is not None and root.ref() is module:
        return root
    if module in zc._not_models:
        return None
    if next(module.parameters(), None) is None:
        zc._not_models.add(module)
        return None
    return new_root(zc, module)


def new_root(zc: Any, module: nn.Module) -> Root:
    root = Root(module)
    zc._roots[id(module)] = root  # (an entry whose module died is replaced here)
    zc._inner.update(m for m in module.modules() if m is not module)
    # capture from this very call on (a guard comes at the first step); every model watches its
    # loss code (one window open at a time: the runner closes it at every root forward)
    root.unused = root.new_capture(watch=True)
    return root


def root_owning(zc: Any, ids: set[int]) -> Root | None:
    """The smallest root (model) that owns every parameter in ``ids``."""
    best: tuple[int, Root | None] = (0, None)
    for root in zc._roots.values():
        model = root.model
        if model is None or root.ref() is None:
            continue
        owned = {id(p) for p in model.parameters()}
        if ids <= owned and (best[1] is None or len(owned) < best[0]):
            best = (len(owned), root)
    return best[1]


def kind_of(zc: Any, root: Root) -> str:
    """``"optimizer"`` when an optimizer holds the root's parameters, ``"none"`` when they are on the meta
    device (torch.func's skeleton, called with stacked weights: nothing of its own to measure), else
    ``"manual"``."""
    model = root.model
    if model is None:
        return "optimizer"
    if any(p.is_meta for p in model.parameters()):
        return "none"
    ids = {id(p) for p in model.parameters()}
    return "optimizer" if optimizers_holding(zc, ids) else "manual"


def has_gradients(root: Root) -> bool:
    """Whether a backward reached the root's model: a model no optimizer holds is updated by hand only
    where its parameters get gradients (a distillation teacher left trainable, its output detached, gets
    none: it read "updated by hand", "no gradient: was backward() called?" and "an optimizer built before
    the model was replaced", and became the run's main log)."""
    model = root.model
    return model is not None and any(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------- sessions
def session_of(zc: Any, optimizer: torch.optim.Optimizer) -> Session | None:
    """The optimizer's session; made at its first step (or clip). ``None``: not guarded."""
    session = zc.sessions.get(id(optimizer))
    if session is not None or optimizer in zc._unguarded:
        return session
    framework = zc.frameworks.guard_of(optimizer)
    if framework is not None:  # a Trainer's callback guards it
        framework.add_flush_callback(zc.live.flushed(framework, framework=True))
        return add(zc, id(optimizer), Session(framework, manual=False, framework=True))
    if _steps_complex(zc, optimizer) or _guarded_by_the_script(zc, optimizer):
        return None
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    root = root_owning(zc, ids) or union_root(zc, optimizer)
    if root is None:
        zc._unguarded.add(optimizer)
        if zc.transformed_calls:
            zc._say(
                f"{type(optimizer).__name__} steps tensors that torch.func calls a model with (functional_call "
                "inside vmap / grad: stacked ensemble weights), not the parameters of a model called directly, "
                "so it is not guarded; the script runs as without gradguard."
            )
            return None
        zc._say(
            f"{type(optimizer).__name__} steps parameters that no model called so far owns, so it is not guarded: "
            "if the script trains a model, this optimizer holds other parameters than that model's (built before "
            "the model was re-created, or over a copy of it), and the model's weights never change."
        )
        return None
    root.kind = "optimizer"
    previous = _rebuilt(zc, optimizer, ids)
    if previous is not None:
        return add(zc, id(optimizer), _succeed(zc, root, optimizer, previous))
    guard, _ = new_guard(zc, root, optimizer, dict(zc.options))
    return add(zc, id(optimizer), Session(guard, manual=False, first_step=zc.global_step))


def _steps_complex(zc: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer steps complex parameters (an FFT filter's, a complex layer's): the guard
    measures real tensors only (``Guard`` refuses them), so it is left unguarded, said once."""
    found = next((p for g in optimizer.param_groups for p in g["params"] if p.is_complex()), None)
    if found is None:
        return False
    zc._unguarded.add(optimizer)
    zc._say(
        f"{type(optimizer).__name__} steps complex parameters ({found.dtype}, shape {tuple(found.shape)}); "
        "gradguard measures real tensors only, so this optimizer is not guarded and its steps run as without "
        "gradguard. To guard it, store them as real tensors: nn.Parameter(torch.view_as_real(w)), viewed back "
        "with torch.view_as_complex in forward."
    )
    return True


def _guarded_by_the_script(zc: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the script guards the optimizer itself (its own ``gradguard.Guard``): gradguard run leaves
    it to that guard, said once — guarding it again logged the script's guard's post-clip norms as the
    pre-clip ones, under a clipper (``--clip norm:5``) that never clipped."""
    script_guard = open_guard_of(optimizer) if zc.defer else None
    if script_guard is None:
        return False
    zc._unguarded.add(optimizer)
    log = script_guard.run_dir
    where = (
        f"its run log is {log} (gradguard diagnose {shlex.quote(str(log))})"
        if log is not None
        else "it writes no run log (its log_dir is None: give it one to keep its log)"
    )
    zc._say(
        f"the script guards its {type(optimizer).__name__} itself with gradguard.Guard: gradguard run leaves "
        f"that optimizer to it (its clip, its policy, its log) and writes no log of it into {zc.out}; {where}. "
        "Run the script without gradguard run, or drop its Guard to let gradguard run guard it there."
    )
    return True


def _rebuilt(zc: Any, optimizer: torch.optim.Optimizer, ids: set[int]) -> Session | None:
    """The session of an earlier optimizer over exactly these parameters, whose steps began before this
    optimizer was built: the script built a new optimizer for the same model (one per epoch, a new
    learning rate, SGD after Adam). Not two optimizers built together over the same parameters (a
    Lookahead wrapper and its base optimizer, which step together: each keeps its session)."""
    built = zc._built_at.get(optimizer, 0)
    return next(
        (
            s
            for s in zc._order
            if not s.manual
            and not s.framework
            and s.param_ids == ids
            and s.guard.optimizer is not optimizer
            and s.first_step < built
        ),
        None,
    )


def _succeed(zc: Any, root: Root, optimizer: torch.optim.Optimizer, previous: Session) -> Session:
    """The new optimizer's session goes on with the earlier one's run: the same run directory, its
    steps numbered on, the clipper's and the spike rule's state carried over (not the snapshots: they
    hold the earlier optimizer's state). Each optimizer judged as a run of its own read the first
    steps of a fresh one on a trained model (per-batch losses of 2e-4 to 0.6) as a divergence."""
    old = previous.guard
    state = {**old.state_dict(), "recovery": None}
    old.close()
    zc.sessions.pop(next(k for k, v in zc.sessions.items() if v is previous), None)
    zc._order.remove(previous)
    options = {**zc.options, "exist_ok": True}
    guard, _ = new_guard(zc, root, optimizer, options, log_dir=old.run_dir, index=_index_of(old))
    guard.load_state_dict(state)
    return Session(guard, manual=False, first_step=zc.global_step)


def _index_of(guard: Guard) -> int:
    info = guard.writer.meta.get("optimizer") if guard.writer is not None else None
    index = info.get("index") if isinstance(info, dict) else None
    return index if isinstance(index, int) else 0


class Union(nn.Module):
    """The models (and free parameters) one optimizer steps where no model the script called owns
    them all: ``Adam(chain(enc.parameters(), dec.parameters()))``, a policy's network and a bare
    ``log_std``, the members of an ``nn.ModuleDict`` called one by one. Never called: it names the
    layers (by the script's own names) and holds the parameters the guard measures."""

    def __init__(self) -> None:
        super().__init__()
        self._free: dict[str, Tensor] = {}  # plain tensors an optimizer steps (an input image), by name

    def forward(self, *args: Any) -> Any:
        raise GradGuardError("gradguard's Union of a script's models is never called.")

    def add_free(self, name: str, t: Tensor) -> None:
        """A tensor the optimizer steps that no model holds: a parameter is registered; a plain tensor
        that requires grad (``x = img.clone().requires_grad_()``) is kept and named as one (wrapping it
        in ``nn.Parameter`` would make another tensor, which never gets its gradient)."""
        if isinstance(t, nn.Parameter):
            self.register_parameter(name, t)
        else:
            self._free[name] = t

    def named_parameters(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Any]]:
        yield from super().named_parameters(prefix, recurse, remove_duplicate)
        for name, t in self._free.items():
            yield (f"{prefix}.{name}" if prefix else name), t


def union_root(zc: Any, optimizer: torch.optim.Optimizer) -> Root | None:
    """A root for an optimizer whose parameters no called model owns alone: a module of the script
    that holds them all (an ``nn.ModuleDict`` called piece by piece), else the called models that
    hold some of them, and the rest as free parameters, in one :class:`Union` (kept among the
    roots: alive, and found by later lookups); free parameters alone where they have gradients (an
    input image optimised through a frozen network: style transfer, adversarial examples). ``None``
    when no called model holds any of them and they have no gradient (an optimizer over the
    parameters of a model the script replaced since).
    Its steps are measured, clipped and skipped like any; a bad step is located by the norms and
    the data (no one forward of the union is replayed)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = {id(p) for p in params}
    holder = _script_module_holding(ids)
    if holder is not None:  # an nn.ModuleDict (or a wrapper) the script built but calls piece by piece
        root = Root(holder)
        root.union = holder
        zc._roots[id(holder)] = root
        return root
    models = [
        m for r in zc._roots.values() if (m := r.model) is not None and ids & {id(p) for p in m.parameters()}
    ]
    models = [m for m in models if not any(m is not o and _inside(m, o) for o in models)]  # outermost only
    if not models and not any(p.grad is not None for p in params):
        return None  # (parameters of no model the script called, and no gradient: a stale optimizer)
    union = Union()
    for i, model in enumerate(models):
        union.add_module(_free_name(union, user_name_of(model, skip=3), f"model{i}"), model)
    owned = {id(p) for p in union.parameters()}
    for i, p in enumerate(p for p in params if id(p) not in owned):
        union.add_free(_free_name(union, user_name_of(p, skip=3), f"param{i}"), p)
    root = Root(union)
    root.union = union  # (the roots hold their modules weakly: this one nobody else holds)
    zc._roots[id(union)] = root
    return root


def _script_module_holding(ids: set[int]) -> nn.Module | None:
    """The smallest module among the script's variables that holds every parameter in ``ids``."""
    best: tuple[int, nn.Module | None] = (0, None)
    for _, value in user_values(skip=4):
        if isinstance(value, nn.Module) and not isinstance(value, Union):
            owned = {id(p) for p in value.parameters()}
            if ids <= owned and (best[1] is None or len(owned) < best[0]):
                best = (len(owned), value)
    return best[1]


def _inside(module: nn.Module, other: nn.Module) -> bool:
    return any(m is module for m in other.modules())


def _free_name(module: nn.Module, name: str | None, fallback: str) -> str:
    """``name`` if it is a free attribute name of ``module``, else ``fallback``."""
    if name and name.isidentifier() and not hasattr(module, name):
        return name
    return fallback


def manual_session(zc: Any, root: Root) -> Session | None:
    """The session of a model updated by hand: measured and located, never skipped."""
    model = root.model
    if model is None:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return None  # a frozen model (its input is what an optimizer trains: style transfer)
    options = {**zc.options, "clip": None, "monitor_only": True}
    if options.get("on_nonfinite") != "raise":
        options["on_nonfinite"] = "warn"
    if options.get("on_spike") in ("clip", "skip"):
        options["on_spike"] = "warn"
    for unused in ROLLBACK_SETTINGS:  # (a monitor-only guard never rolls back)
        options.pop(unused, None)
    stand_in = ManualUpdate(params)
    guard, _ = new_guard(zc, root, stand_in, options)
    zc._say(
        f"{type(model).__name__}'s parameters are updated by hand (no torch.optim optimizer steps "
        "them): each step is measured and a non-finite one is located, but gradguard cannot skip it."
    )
    return add(zc, id(stand_in), Session(guard, manual=True))


def session_of_root(zc: Any, root: Root) -> Session | None:
    """The hand-updated session of the root's model, if made already."""
    model = root.model
    return next((s for s in zc._order if s.manual and s.guard.model is model), None)


def manual_session_of(zc: Any, root: Root) -> Session | None:
    """The hand-updated session of the root's model, made if needed and kept on the root (its
    every backward asks)."""
    if root.session is None:
        root.session = session_of_root(zc, root) or manual_session(zc, root)
    return root.session


def clip_target(zc: Any, params: list[Tensor]) -> tuple[Session | None, bool]:
    """The session of a clip call's parameters (made if needed) and whether the call covers
    exactly its optimizer's gradients (:func:`~.sessions.covers`: its norm is then the guard's).

    A script clips the same parameters every step: the answer is kept per parameter list (by
    ids, checked against the first parameter itself: a dead one's id may be reused) and per size
    of the optimizer's groups; then a step costs one ``any`` over the gradients, not two sets."""
    key = tuple(map(id, params))
    hit = zc._clip_targets.get(key)
    if hit is not None and hit.ref() is params[0]:
        session = hit.session
        if hit.size == _size(session.guard.optimizer):
            return session, hit.same and any(p.grad is not None for p in params)
    session = session_for_params(zc, params)
    if session is None:
        return None, False
    optimizer = session.guard.optimizer
    if params:
        if len(zc._clip_targets) >= _MAX_CLIP_TARGETS:
            zc._clip_targets.clear()
        same = set(key) == {id(p) for g in optimizer.param_groups for p in g["params"]}
        zc._clip_targets[key] = ClipTarget(weakref.ref(params[0]), session, same, _size(optimizer))
    return session, covers(params, optimizer)


_MAX_CLIP_TARGETS = 16  # parameter lists kept (a script clips one or two)


class ClipTarget(NamedTuple):
    """A clip call's parameter list: its first parameter, its session, whether the list holds
    exactly the optimizer's parameters, and the optimizer's number of parameters then."""

    ref: weakref.ref[Tensor]
    session: Session
    same: bool
    size: int


def _size(optimizer: torch.optim.Optimizer) -> int:
    return sum(len(g["params"]) for g in optimizer.param_groups)


def session_for_params(zc: Any, params: list[Tensor]) -> Session | None:
    """The session whose model these parameters belong to (a clip call): made if needed."""
    ids = {id(p) for p in params}
    for session in zc._order:
        if ids & session.param_ids:
            return session
    for optimizer in optimizers_holding(zc, ids):
        found = session_of(zc, optimizer)
        if found is not None:
            return found
    root = root_owning(zc, ids)
    if root is None or root.kind == "optimizer":
        return None
    root.kind = "manual"
    return manual_session(zc, root)


def optimizers_holding(zc: Any, ids: set[int]) -> list[torch.optim.Optimizer]:
    """The optimizers that hold any of these parameters (one that has not stepped yet is
    known only from its creation, seen through ``add_param_group``)."""
    if zc.scan_existing:  # optimizers made before the runner started: looked for once
        zc.scan_existing = False
        zc._optimizers.update(all_optimizers())
    return [o for o in zc._optimizers if any(id(p) in ids for g in o.param_groups for p in g["params"])]


# ----------------------------------------------------------------------------- guards
def new_guard(
    zc: Any,
    root: Root,
    optimizer: torch.optim.Optimizer,
    options: dict[str, Any],
    *,
    log_dir: Any = None,
    index: int | None = None,
) -> tuple[Guard, StepCapture | None]:
    """A guard of ``root``'s model for ``optimizer`` (its run directory — the next one, or ``log_dir``
    as the ``index``-th optimizer's —, its capture)."""
    if log_dir is None:
        k, log_dir = zc._run_dirs, zc.next_run_dir()
    else:
        k = index if index is not None else 0
    locate = options.pop("locate", True)
    capture = (
        root.take_capture(watch=index is not None) if locate else None
    )  # (a successor watches the loss code)
    model = root.model
    assert model is not None
    guard = Guard(model, optimizer, log_dir=log_dir, name=zc.name, capture=capture, locate=locate, **options)
    if options.get("exist_ok"):  # --exist-ok: a resumed script's steps follow the log's
        guard.number_on_from_the_log()
    guard.add_flush_callback(zc.live.flushed(guard))
    describe(zc, guard, k, model, optimizer)
    return guard, capture


def describe(zc: Any, guard: Guard, k: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """meta.json of a new run dir: which optimizer it is; the root's lists its children."""
    kind = "manual update" if isinstance(optimizer, ManualUpdate) else type(optimizer).__name__
    root = zc._order[0].guard if zc._order else guard
    if isinstance(model, Union):  # the script's names of the models (and free parameters) it steps
        what = ", ".join(
            [n for n, _ in model.named_children()] + [n for n, _ in model.named_parameters(recurse=False)]
        )
    else:
        what = stepped(model, optimizer, user_name_of(model))
    describe_optimizer(guard, root, k, kind, what)
    if guard.writer is not None:  # (what diagnose tells the user to do differs: no closure to pass)
        guard.writer.update_meta(runner="gradguard run")


def add(zc: Any, key: int, session: Session) -> Session:
    zc.sessions[key] = session
    zc._order.append(session)
    return session
