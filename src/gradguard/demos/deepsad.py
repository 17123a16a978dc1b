"""Deep SAD (Ruff et al., ICLR 2020) on scikit-learn's bundled digits: explosion, over-clipping, a fix.

The user's story: a pretrained Deep SAD detector starts training and the loss (sometimes the
features) turns NaN; ``clip_grad_norm_(max_norm=5)`` stops the NaN but "the gradients vanish"
(every step is clipped, training stalls); a threshold read off the typical gradient norms
(their ``max_norm=100``) trains stably.

Set-up, as in the paper and its reference code:

* data: ``sklearn.datasets.load_digits`` (1797 8×8 images, no download). Normal class 0; 60 % of
  it is the (unlabeled) training set, plus 5 *labeled* anomalies drawn from the other classes;
  test = the other 40 % of class 0 against every remaining image of the other classes.
  Features standardized with the mean and standard deviation of the training normals (the
  reference code's ``StandardScaler`` fitted on the training set).
* network: bias-free MLP encoder 64 → 128 → 64 → 64 with leaky ReLU (no bias anywhere, so the
  trivial "map everything to c" solution is out of reach), mirrored into a bias-free autoencoder.
* pretraining: the autoencoder, Adam (lr 1e-3), MSE, 300 steps; then the centre
  ``c`` = mean embedding of the training normals, with coordinates ``|c_j| < 0.1`` pushed to ±0.1.
* Deep SAD loss per sample: ``‖φ(x) − c‖²`` (unlabeled) and ``η (‖φ(x) − c‖² + 1e-6)^(−1)``
  (labeled anomaly, η = 1), averaged over the batch of 32.
* training: SGD, lr 0.0225, momentum 0.9, weight decay 1e-6 (the story's first optimizer), 400 steps.
* metric: ROC-AUC of the score ``‖φ(x) − c‖²`` on the test set.

Measured (``benchmarks/demo_probe.py``; seeds 0-2, and 0-7 where said):

* ``none``: the loss overflows at step 20, 13, 42 (seeds 0-7: steps 10-42, 8 of 8 diverge).
* ``norm:5``: finite, 89-96 % of the steps clipped, the loss stalls at 0.45-0.75 (seeds 0-7:
  0.22-1.4; 84-97 % clipped, 58 % on one seed) — yet the test ROC-AUC (0.96-0.98) does not suffer.
* the threshold recommended from the healthy start of the unclipped run (median of its first
  finite norms, :func:`gradguard.demos._common.healthy_median`: 89, 115, 72): 2-8 % clipped,
  loss 0.013-0.019, ROC-AUC 0.98 (seeds 0-7: 7 of 8; on one seed τ = 89 is too loose).
* the story's ``norm:100``: 2-6 % clipped, loss 0.011-0.017 (8 of 8 seeds).
* ``zclip`` and ``Auto()`` behave as ``none`` when the explosion starts inside their 25-step
  warm-up (seeds 0, 1); after it (seed 2) their threshold, 124-857, is too loose: finite, loss ~9e3.
  ``auto`` (``Auto(first=0.5)``: never above half the first norm, here 44-91) clips 2-12 % of
  the steps, loss 0.008-0.010, ROC-AUC 0.92-0.98, no non-finite step (seeds 0-7: 2-12 %).

Through ``gradguard demo`` (one thread, the guard in the loop; seeds 0-2): ``none`` non-finite
at step 20, 13, 42 (located: an explosion from step 17, 8, 34); ``norm:5`` 89-96 % clipped,
diagnosed ``over_clipping``, loss 0.45-0.75; the threshold ``diagnose`` recommends from it (62,
54, 43) clips 6-14 %, loss 0.006-0.010 (58-126× lower), no non-finite step; Adam (lr 1e-3, no
clipping) stays finite, loss 0.11-0.13, ROC-AUC 0.994-0.997.

Learning-rate advice is verified too (session 13, ``benchmarks/demo_probe.py --advice``): the
``explosion`` of ``none`` advises lr=0.002 (1/10 of 0.0225); tune over its candidates
(0.0005-0.004, no clipping, 60 steps) verifies 0.004 on seeds 0-2, which trains all 400 steps
unclipped (loss 0.0055-0.0068, ROC-AUC 0.976-0.994).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard.demos._common import RunConfig, Scenario, roc_auc

__all__ = ["HPARAMS", "Autoencoder", "Encoder", "build", "configs", "demo_configs", "pretrained"]

HPARAMS: dict[str, Any] = {
    "normal_class": 0,
    "train_fraction": 0.6,
    "labeled_anomalies": 5,
    "hidden": (128, 64),
    "rep_dim": 64,
    "eta": 1.0,
    "batch": 32,
    "ae_lr": 1e-3,
    "ae_steps": 300,
    "lr": 0.0225,
    "momentum": 0.9,
    "weight_decay": 1e-6,
    "steps": 400,
}


def _sgd() -> dict[str, Any]:
    """The scenario's optimizer settings (SGD with momentum and weight decay, from :data:`HPARAMS`)."""
    return {
        "optimizer": "sgd",
        "lr": HPARAMS["lr"],
        "momentum": HPARAMS["momentum"],
        "weight_decay": HPARAMS["weight_decay"],
    }


def configs(recommended: float | None = None) -> list[RunConfig]:
    """The demo's configurations; ``recommended`` adds ``norm:<recommended>`` (see :func:`healthy_median`)."""
    kw = _sgd()
    out = [RunConfig(spec, spec, **kw) for spec in ("none", "norm:5", "autoclip:10", "zclip", "auto")]
    if recommended is not None:
        out.append(RunConfig(f"norm:{recommended:.3g} (recommended)", f"norm:{recommended}", **kw))
    return out


def demo_configs() -> list[RunConfig]:
    """What ``gradguard demo deepsad`` runs, each through a :class:`gradguard.Guard` (``on_nonfinite="skip"``).

    The recommended configuration takes its threshold from ``gradguard.diagnose`` of the
    ``norm:5`` run (its ``over_clipping`` finding), as the user of the story would; when that run
    is not diagnosed as over-clipped, from the diagnosis of the unclipped run.
    """
    kw = _sgd()
    return [
        RunConfig("none", "none", **kw, stop_at_nonfinite=True, note="SGD+momentum, no clipping"),
        RunConfig("norm:5", "norm:5", **kw, note="the story's first fix"),
        RunConfig(
            "recommended",
            None,
            **kw,
            recommend_from=("norm:5", "none"),
            note="from diagnose, verified by tune",
        ),
        RunConfig("auto", "auto", **kw, note="gradguard's default"),
        RunConfig(
            "adam",
            "none",
            "adam",
            1e-3,
            weight_decay=HPARAMS["weight_decay"],
            note="Adam lr 1e-3, no clipping",
        ),
    ]


class Encoder(nn.Module):
    """Bias-free MLP ``φ``: Linear → leaky ReLU blocks, then a linear code layer."""

    def __init__(self, x_dim: int, hidden: tuple[int, ...], rep_dim: int) -> None:
        super().__init__()
        dims = (x_dim, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(dims))
        self.code = nn.Linear(dims[-1], rep_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden:
            x = F.leaky_relu(layer(x))
        return self.code(x)


class Autoencoder(nn.Module):
    """The encoder and its mirror image (bias-free), for pretraining."""

    def __init__(self, x_dim: int, hidden: tuple[int, ...], rep_dim: int) -> None:
        super().__init__()
        self.encoder = Encoder(x_dim, hidden, rep_dim)
        dims = (rep_dim, *hidden[::-1])
        self.decoder_hidden = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(dims))
        self.reconstruction = nn.Linear(dims[-1], x_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        z = self.encoder(x)
        for layer in self.decoder_hidden:
            z = F.leaky_relu(layer(z))
        return self.reconstruction(z)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the deepsad demo trains on scikit-learn's bundled digits: pip install 'gradguard[demo]'"
        ) from e
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float64), y


def _split(seed: int, hp: dict[str, Any]) -> dict[str, Tensor]:
    x, y = _digits()
    rng = np.random.default_rng(seed)
    normal = np.flatnonzero(y == hp["normal_class"])
    other = np.flatnonzero(y != hp["normal_class"])
    rng.shuffle(normal)
    rng.shuffle(other)
    n_train = int(len(normal) * hp["train_fraction"])
    n_lab = hp["labeled_anomalies"]
    train_normal, test_normal = normal[:n_train], normal[n_train:]
    labeled, test_anomalies = other[:n_lab], other[n_lab:]
    mean = x[train_normal].mean(0)
    std = x[train_normal].std(0)
    std[std == 0] = 1.0  # constant pixels: left as is, like sklearn's StandardScaler

    def tf(a: np.ndarray) -> Tensor:
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    return {
        "x_train": tf(np.concatenate([x[train_normal], x[labeled]])),
        # semi-supervised targets as in the reference code: 0 unlabeled, -1 labeled anomaly
        "s_train": torch.tensor([0.0] * len(train_normal) + [-1.0] * n_lab),
        "x_test": tf(np.concatenate([x[test_normal], x[test_anomalies]])),
        "y_test": torch.tensor([0] * len(test_normal) + [1] * len(test_anomalies)),
    }


def _batches(n: int, batch: int, seed: int) -> Iterator[Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


@functools.lru_cache(maxsize=8)
def pretrained(seed: int, key: tuple[tuple[str, Any], ...] = ()) -> tuple[dict[str, Tensor], Tensor, float]:
    """Pretrain the autoencoder for ``seed``: ``(encoder state_dict, centre c, final AE loss)`` (cached)."""
    hp = {**HPARAMS, **dict(key)}
    data = _split(seed, hp)
    torch.manual_seed(seed)
    ae = Autoencoder(data["x_train"].shape[1], tuple(hp["hidden"]), hp["rep_dim"])
    opt = torch.optim.Adam(ae.parameters(), lr=hp["ae_lr"], weight_decay=hp["weight_decay"])
    it = _batches(len(data["x_train"]), hp["batch"], seed)
    loss = torch.zeros(())
    for _ in range(hp["ae_steps"]):
        xb = data["x_train"][next(it)]
        loss = F.mse_loss(ae(xb), xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        c = ae.encoder(data["x_train"][data["s_train"] == 0]).mean(0)
        eps = 0.1  # Deep SAD: push near-zero coordinates of c away from 0
        c[(c.abs() < eps) & (c < 0)] = -eps
        c[(c.abs() < eps) & (c >= 0)] = eps
    state = {k: v.detach().clone() for k, v in ae.encoder.state_dict().items()}
    return state, c, float(loss.detach())


def build(seed: int = 0, **overrides: Any) -> Scenario:
    """The ``deepsad`` scenario for ``seed``: a pretrained encoder, its centre c, the data split.

    ``overrides`` replace entries of :data:`HPARAMS` (for probes).
    """
    hp = {**HPARAMS, **overrides}
    data = _split(seed, hp)
    key = tuple(sorted((k, v) for k, v in overrides.items()))
    state, c, ae_loss = pretrained(seed, key)
    model = Encoder(data["x_train"].shape[1], tuple(hp["hidden"]), hp["rep_dim"])
    model.load_state_dict(state)
    c = c.clone()
    x_train, s_train = data["x_train"], data["s_train"]
    eta = hp["eta"]

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for idx in _batches(len(x_train), hp["batch"], seed + 1):
            yield x_train[idx], s_train[idx]

    def loss_fn(m: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        x, s = b
        dist = ((m(x) - c) ** 2).sum(dim=1)
        losses = torch.where(s == 0, dist, eta * ((dist + 1e-6) ** s))
        return losses.mean()

    def evaluate(m: nn.Module) -> dict[str, float]:
        scores = ((m(data["x_test"]) - c) ** 2).sum(dim=1)
        return {"roc_auc": roc_auc(scores, data["y_test"])}

    return Scenario(
        name="deepsad",
        seed=seed,
        model=model,
        batches=batches,
        loss_fn=loss_fn,
        evaluate=evaluate,
        metric="roc_auc",
        higher_is_better=True,
        baseline={"ae_loss": ae_loss, "roc_auc_chance": 0.5},
        configs=configs(),
        steps=hp["steps"],
        loss_unit="mean Deep SAD loss",
        info={**hp, "train_size": len(x_train), "test_size": len(data["y_test"]), "c_norm": float(c.norm())},
    )
