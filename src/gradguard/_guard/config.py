"""The guard's settings, checked once at construction: each check a small function whose error says
what is wrong, the value, and how to fix it."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from gradguard._distributed import sharded
from gradguard.clip import Clipper, PerLayer
from gradguard.errors import GradGuardError
from gradguard.stats import check_norm_type

__all__ = [
    "ROLLBACK_SETTINGS",
    "GuardConfig",
    "OnExplosion",
    "OnNonFinite",
    "OnSpike",
    "check_choice",
    "check_distributed",
    "check_flag",
    "check_log_dir",
    "check_model",
    "check_monitor_only",
    "check_optimizer",
    "check_parameters",
    "check_snapshot_dir",
    "guarded_parameters",
    "is_fused",
    "layer_cadence",
    "momentum_sgd",
    "positive_int",
]

#: The settings of rollback snapshots: they act only where the guard keeps snapshots to restore
#: (:attr:`GuardConfig.snapshots`). ``gradguard run`` refuses them without a rollback policy, and leaves
#: them out of a monitor-only guard.
ROLLBACK_SETTINGS = (
    "snapshot_every",
    "snapshot_dir",
    "lr_backoff",
    "min_lr",
    "max_rollbacks",
    "rollback_window",
)

OnNonFinite = Literal["skip", "rollback", "raise", "warn"]
OnSpike = Literal["ignore", "warn", "clip", "skip"]
OnExplosion = Literal["ignore", "warn", "recover"]
_FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)

#: ``layer_every=None``: per-layer gradient norms every step for up to this many layers; a wider
#: model every ``ceil(layers / LAYER_BUDGET)`` steps, so a record carries at most about this many
#: layer norms a step on average (about 3 kB of JSON), whatever the model's width.
LAYER_BUDGET = 64


def layer_cadence(layers: int) -> int:
    """The default per-layer cadence for a model of ``layers`` layers (see :data:`LAYER_BUDGET`)."""
    return max(1, math.ceil(layers / LAYER_BUDGET))


@dataclass(frozen=True)
class GuardConfig:
    """The validated settings of a :class:`gradguard.Guard` (see its arguments)."""

    on_nonfinite: str
    on_spike: str
    spike_z: float
    norm_type: float
    every: int
    layer_every: int | None  # None: the default cadence for the model's width (see for_layers)
    weight_every: int | None
    snapshot_every: int
    max_consecutive: int
    lr_backoff: float | None
    loss_scale_floor: float
    max_replays: int
    monitor_only: bool
    min_lr: float
    max_rollbacks: int | None
    rollback_window: int
    on_explosion: str = "ignore"
    layers_auto: bool = False  # layer_every was chosen from the model's width

    @classmethod
    def checked(cls, **settings: Any) -> GuardConfig:
        """Check every setting (``GradGuardError`` on the first bad one) and return the config."""
        return cls(
            on_nonfinite=check_choice(settings["on_nonfinite"], "on_nonfinite", get_args(OnNonFinite)),
            on_spike=check_choice(settings["on_spike"], "on_spike", get_args(OnSpike)),
            spike_z=check_spike_z(settings["spike_z"]),
            norm_type=check_norm_type(settings["norm_type"]),
            every=positive_int(settings["every"], "every"),
            layer_every=optional_positive_int(settings["layer_every"], "layer_every"),
            weight_every=optional_positive_int(settings["weight_every"], "weight_every"),
            snapshot_every=positive_int(settings["snapshot_every"], "snapshot_every"),
            max_consecutive=positive_int(settings["max_consecutive"], "max_consecutive"),
            lr_backoff=check_lr_backoff(settings["lr_backoff"]),
            loss_scale_floor=check_loss_scale_floor(settings["loss_scale_floor"]),
            max_replays=positive_int(settings["max_replays"], "max_replays"),
            monitor_only=check_flag(settings["monitor_only"], "monitor_only"),
            min_lr=check_min_lr(settings["min_lr"]),
            max_rollbacks=optional_positive_int(settings["max_rollbacks"], "max_rollbacks"),
            rollback_window=positive_int(settings["rollback_window"], "rollback_window"),
            on_explosion=check_choice(
                settings.get("on_explosion", "ignore"), "on_explosion", get_args(OnExplosion)
            ),
        )

    @property
    def snapshots(self) -> bool:
        """Whether the guard keeps snapshots to restore: ``on_nonfinite="rollback"`` or
        ``on_explosion="recover"``."""
        return self.on_nonfinite == "rollback" or self.on_explosion == "recover"

    def for_layers(self, layers: int) -> GuardConfig:
        """The config with the default per-layer cadence (``layer_every=None``) chosen for a model
        of ``layers`` layers; chosen again when parameters join and the model grows wider."""
        if self.layer_every is not None and not self.layers_auto:
            return self
        return replace(self, layer_every=layer_cadence(layers), layers_auto=True)

    def layer_step(self, step: int) -> bool:
        """Whether ``step`` records per-layer gradient norms."""
        return step % (self.layer_every or 1) == 0

    def as_meta(self) -> dict[str, Any]:
        """The settings a run's ``meta.json`` records under ``config`` (besides the clipper)."""
        return {
            "on_nonfinite": self.on_nonfinite,
            "on_spike": self.on_spike,
            "on_explosion": self.on_explosion,
            "every": self.every,
            "layer_every": self.layer_every,
            **({"layer_every_auto": True} if self.layers_auto else {}),
            "weight_every": self.weight_every,
            "snapshot_every": self.snapshot_every,
            "lr_backoff": self.lr_backoff,
            "min_lr": self.min_lr,
            "max_rollbacks": self.max_rollbacks,
            "rollback_window": self.rollback_window,
            "max_consecutive": self.max_consecutive,
            "norm_type": self.norm_type,
            **({"monitor_only": True} if self.monitor_only else {}),
        }


def check_choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise GradGuardError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}.")
    return str(value)


def positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise GradGuardError(f"{name} must be a positive int; got {value!r}.")
    return value


def optional_positive_int(value: Any, name: str) -> int | None:
    return None if value is None else positive_int(value, name)


def check_lr_backoff(value: Any) -> float | None:
    if value is not None and not 0.0 < float(value) <= 1.0:
        raise GradGuardError(f"lr_backoff must be in (0, 1] or None; got {value!r}. 0.5 halves the LR.")
    return None if value is None else float(value)


def check_spike_z(value: Any) -> float:
    try:
        z = float(value)
    except (TypeError, ValueError):
        z = math.nan
    if isinstance(value, bool) or not (math.isfinite(z) and z > 0.0):
        raise GradGuardError(
            f"spike_z must be a finite number > 0; got {value!r}. A gradient norm more than spike_z "
            "standard deviations above its running mean is a spike; the default is 6.0 (lower: more spikes)."
        )
    return z


def check_min_lr(value: Any) -> float:
    return _nonnegative(
        value,
        "min_lr",
        "It is the learning rate below which a rollback loop stops the run (the default 1e-8; 0 never stops it).",
    )


def check_loss_scale_floor(value: Any) -> float:
    return _nonnegative(
        value,
        "loss_scale_floor",
        "Under a GradScaler, a scale below it is a loss_scale_collapse event (the default 1.0; 0 reports only "
        "overflows in a row).",
    )


def _nonnegative(value: Any, name: str, meaning: str) -> float:
    """A finite number ≥ 0 (not a bool), or a ``GradGuardError`` naming the setting, the value and what it is."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and number >= 0.0):
        raise GradGuardError(f"{name} must be a number >= 0; got {value!r}. {meaning}")
    return number


def check_flag(value: Any, name: str) -> bool:
    """A yes/no setting is a bool: ``exist_ok="no"`` is truthy, and appended a new run to an old log."""
    if not isinstance(value, bool):
        raise GradGuardError(f"{name} must be True or False; got {type(value).__name__} {value!r}.")
    return value


def check_snapshot_dir(value: Any) -> str | os.PathLike[str] | None:
    """``snapshot_dir`` is ``None`` or a directory path (``~`` expanded) that is not a file: checked at
    construction, not at the first snapshot, which would stop the training loop."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value.strip()):
        raise GradGuardError(
            f"snapshot_dir must be a directory path or None; got {type(value).__name__} {value!r}."
        )
    path = os.path.expanduser(value)
    if os.path.exists(path) and not os.path.isdir(path):
        raise GradGuardError(
            f"snapshot_dir {str(value)!r} is a file, not a directory: the rollback snapshot is written into "
            "snapshot_dir/snapshot.pt. Pass a directory (new or existing)."
        )
    return path


def check_log_dir(value: Any) -> Any:
    """``log_dir`` is ``None``, ``"auto"`` or a directory path (not empty text: that would write into
    the current directory); returned with a leading ``~`` expanded (``open`` does not: a ``./~`` folder)."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise GradGuardError(
            f"log_dir must be a directory path, 'auto' or None; got {type(value).__name__} {value!r}."
        )
    if isinstance(value, str) and not value.strip():
        raise GradGuardError(
            f"log_dir={value!r} is empty: it would write the run log into the current directory. Pass "
            "a directory path, log_dir='auto' (gradguard-runs/<time>-<name>), or None for no files."
        )
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise GradGuardError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    return model


def check_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise GradGuardError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    return optimizer


def check_monitor_only(config: GuardConfig, clipper: Clipper | None) -> None:
    """``monitor_only=True`` measures, logs and checks; it never clips, skips or steps."""
    if not config.monitor_only:
        return
    how = "Guard(model, optimizer, clip=None, on_nonfinite='warn', monitor_only=True)"
    if clipper is not None:
        raise GradGuardError(
            f"monitor_only=True never clips, but got clip={clipper!r}. Pass clip=None ({how}), or drop "
            "monitor_only to let gradguard clip."
        )
    if config.on_nonfinite not in ("warn", "raise"):
        raise GradGuardError(
            f"monitor_only=True never skips a step, so on_nonfinite must be 'warn' or 'raise'; got "
            f"{config.on_nonfinite!r} ({how}). Drop monitor_only to skip or roll back bad steps."
        )
    if config.on_spike in ("clip", "skip"):
        raise GradGuardError(
            f"monitor_only=True cannot act on spikes; got on_spike={config.on_spike!r}. Use 'warn' or 'ignore'."
        )
    if config.on_explosion == "recover":
        raise GradGuardError(
            "monitor_only=True cannot rewind the model, so on_explosion must be 'warn' or 'ignore'; got "
            "'recover'. Drop monitor_only to let gradguard recover from explosions."
        )


def guarded_parameters(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[nn.Module, list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """The user's root module (DDP unwrapped), the ``(name, parameter)`` pairs guarded from the
    first step (the model's parameters the optimizer holds that require grad), and those that wait
    (held, but frozen: they join at the first step they have a gradient)."""
    root = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    held = check_parameters(root, (p for g in optimizer.param_groups for p in g["params"]))
    # DDP's wrapper adds "module." to every name: name the layers after the user's model
    named = [(n, p) for n, p in root.named_parameters() if id(p) in held]
    guarded = [(n, p) for n, p in named if p.requires_grad]
    if not guarded:
        raise GradGuardError(
            f"{type(model).__name__} has no trainable parameter that the optimizer holds (all have "
            "requires_grad=False, or the optimizer trains none of them); there is nothing to guard. "
            "Unfreeze some parameters or guard the module that trains."
        )
    return root, guarded, [(n, p) for n, p in named if not p.requires_grad]


def check_parameters(root: nn.Module, held: Iterable[Tensor]) -> set[int]:
    """The ids of ``held`` (the optimizer's parameters), refused where one is not ``root``'s, is on
    the meta device (no values) or is complex (the guard measures real tensors)."""
    names = {id(p): n for n, p in root.named_parameters()}
    params = list(held)
    foreign = [p for p in params if id(p) not in names]
    if foreign:
        shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:3])
        raise GradGuardError(
            f"the optimizer holds {len(foreign)} parameter(s) that are not the model's (shapes {shapes}). "
            "Pass the model the optimizer trains (build it as `optimizer = Opt(model.parameters())`), "
            "or the root module that owns all of them."
        )
    _check_materialized(names, params)
    complex_ = [p for p in params if p.is_complex()]
    if complex_:
        p = complex_[0]
        raise GradGuardError(
            f"parameter {names[id(p)]!r} is complex ({p.dtype}, shape {tuple(p.shape)}); gradguard measures "
            f"real tensors only ({len(complex_)} complex parameter(s)). Store it as a real tensor "
            "(`nn.Parameter(torch.view_as_real(w))`, viewed back with `torch.view_as_complex` in forward), "
            "or leave complex parameters out of the guarded optimizer."
        )
    return {id(p) for p in params}


def _check_materialized(names: dict[int, str], params: list[Tensor]) -> None:
    """Refuse parameters on the meta device: shapes without values (a model built under
    ``with torch.device("meta"):`` and never materialized), which no step can measure."""
    meta = [p for p in params if p.is_meta]
    if meta:
        p = meta[0]
        raise GradGuardError(
            f"parameter {names[id(p)]!r} is on the meta device (shape {tuple(p.shape)}; {len(meta)} meta "
            "parameter(s)): it has a shape but no values (a model built under `with torch.device('meta'):` "
            "and not materialized), so there is nothing to train or measure. Materialize the model first, "
            "`model.to_empty(device='cpu')` (or 'cuda') then initialize it (`model.load_state_dict(state, "
            "assign=True)`, or each module's `reset_parameters()`), and build the optimizer and the Guard over "
            "the materialized parameters (to_empty makes new ones)."
        )


def check_distributed(params: Sequence[Tensor], config: GuardConfig, clipper: Clipper | None) -> list[bool]:
    """Which parameters FSDP2 shards; refuses the settings that need whole tensors on every rank."""
    mask = sharded(params)
    if any(mask) and config.on_nonfinite == "rollback":
        raise GradGuardError(
            "on_nonfinite='rollback' is not supported for FSDP2 (sharded DTensor parameters) yet; "
            "use 'skip' (every rank skips the same step) or checkpoint with torch.distributed.checkpoint."
        )
    if any(mask) and config.on_explosion == "recover":
        raise GradGuardError(
            "on_explosion='recover' is not supported for FSDP2 (sharded DTensor parameters) yet: it restores "
            "a snapshot of the whole model. Use on_explosion='warn' (every rank sees the same onset) and "
            "restart from a torch.distributed.checkpoint taken before it."
        )
    if any(mask) and isinstance(clipper, PerLayer):
        raise GradGuardError(
            "clip='layer:…' needs full-layer norms on every rank, which FSDP2 shards; use 'norm:…' or 'auto'."
        )
    return mask


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """All groups fused, and the optimizer honours ``grad_scale``/``found_inf`` (GradScaler protocol)."""
    return (
        isinstance(optimizer, _FUSED_OPTIMIZERS)
        and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        and all(g.get("fused") for g in optimizer.param_groups)
    )


def momentum_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """SGD with momentum in some group (its momentum buffers appear at its first step)."""
    return isinstance(optimizer, torch.optim.SGD) and any(
        g.get("momentum", 0) for g in optimizer.param_groups
    )
