"""Real short Guard runs for the verdict tests: healthy runs of many kinds and runs that diverged.

Every run really trains (a few hundred milliseconds on a CPU) under :class:`gradguard.Guard` with
its defaults, as a user would; nothing is a hand-written log.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard

Batch = Callable[[int], torch.Tensor]  # step → the loss of that step's batch


def train(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_of: Callable[[int], torch.Tensor],
    steps: int,
    lr_of: Callable[[int], float] | None = None,
    **guard_kw: Any,
) -> Path:
    """Train ``steps`` steps under a Guard logging into ``path``; ``lr_of(step)`` sets the LR."""
    guard = gradguard.Guard(model, opt, log_dir=path, **guard_kw)
    for step in range(steps):
        if lr_of is not None:
            for group in opt.param_groups:
                group["lr"] = lr_of(step)
        loss = loss_of(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        guard.step(loss)
    guard.close()
    return path


def _tokens(seed: int, vocab: int, n: int = 4096) -> torch.Tensor:
    """A token stream with structure to learn: a noisy cycle through the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) % vocab
    noise = torch.randint(0, vocab, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.2, noise, base)


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int = 32, lstm: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body: nn.Module = (
            nn.LSTM(d, d, batch_first=True) if lstm else nn.Sequential(nn.Linear(d, d), nn.GELU())
        )
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = self.body(h)[0] if isinstance(self.body, nn.LSTM) else self.body(h)
        return self.head(h)


def _lm_loss(
    model: nn.Module, stream: torch.Tensor, vocab: int, batch: int = 8, seq: int = 16
) -> Callable[[int], torch.Tensor]:
    def loss_of(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step)
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=g)
        x = torch.stack([stream[s : s + seq] for s in starts])
        y = torch.stack([stream[s + 1 : s + seq + 1] for s in starts])
        return nn.functional.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))

    return loss_of


def _regression(seed: int = 0, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, d, generator=g)
    return x, x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)


def _mlp_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0
) -> Callable[[int], torch.Tensor]:
    def loss_of(step: int) -> torch.Tensor:
        i = (step * 32) % len(x)
        return nn.functional.mse_loss(model(x[i : i + 32]), scale * y[i : i + 32])

    return loss_of


def _mlp(seed: int = 0, d: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


# ------------------------------------------------------------------------------- healthy runs
def adam_lm(path: Path) -> Path:
    """A small LM (embedding → MLP → vocabulary) with Adam 3e-3."""
    torch.manual_seed(0)
    vocab = 64
    model = TinyLM(vocab)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return train(path, model, opt, _lm_loss(model, _tokens(0, vocab), vocab), 200)


def sgd_momentum(path: Path) -> Path:
    """An MLP regression with SGD(lr=0.01, momentum=0.9)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return train(path, model, opt, _mlp_loss(model, *_regression()), 200)


def rl_episodic(path: Path) -> Path:
    """A value function learnt on episodes that get longer as the agent improves (5 → 205 steps):
    the loss (summed over the episode) grows because the returns do, not because training failed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_of(step: int) -> torch.Tensor:
        length = 5 + step
        g = torch.Generator().manual_seed(step)
        states = torch.randn(length, 4, generator=g)
        returns = torch.arange(length, 0, -1, dtype=torch.float32)[:, None]  # reward 1 per step, γ = 1
        return ((model(states) - returns) ** 2).sum() / 100

    return train(path, model, opt, loss_of, 200)


def warmup(path: Path) -> Path:
    """Adam with a linear warm-up (1e-5 → 1e-3 over 50 steps), then a flat LR."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    return train(
        path, model, opt, _mlp_loss(model, *_regression()), 200, lr_of=lambda s: 1e-3 * min(1.0, (s + 1) / 50)
    )


def sparse_embeddings(path: Path) -> Path:
    """A bag-of-embeddings classifier over 5,000 rows (sparse=False): most rows get no gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.EmbeddingBag(5000, 16, mode="mean", sparse=False), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_of(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step)
        ids = (torch.rand(16, 8, generator=g) ** 3 * 5000).long()  # a few frequent rows, many rare ones
        labels = (ids[:, 0] < 100).long()
        return nn.functional.cross_entropy(model(ids), labels)

    return train(path, model, opt, loss_of, 200)


def lstm_lm(path: Path) -> Path:
    """A small LSTM language model with Adam 3e-3."""
    torch.manual_seed(0)
    vocab = 64
    model = TinyLM(vocab, lstm=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return train(path, model, opt, _lm_loss(model, _tokens(1, vocab), vocab), 150)


def char_lstm(
    path: Path, *, optimizer: str = "adam", lr: float = 2e-3, clip: str = "norm:5", steps: int = 120
) -> Path:
    """A small version of the rnn demo (a character LSTM LM with a projection, truncated BPTT, the
    loss summed over 20 time steps) under a Guard (about 2 s on a CPU). With Adam at 2e-3 and
    ``norm:5`` — the demo's ``adam+norm:5`` — the pre-clip norm surges ~10-20× over the first steps,
    then settles while the loss keeps falling."""
    from gradguard.demos import rnn

    sc = rnn.build(0, hidden=100, proj=50, batch=10, bptt=20)
    make = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    opt = make(sc.model.parameters(), lr=lr)
    batches = sc.batches()
    return train(
        path,
        sc.model,
        opt,
        lambda _: sc.loss_fn(sc.model, next(batches)),
        steps,
        clip=clip,
        max_consecutive=10**6,
    )


def adam_clipped_surge(path: Path) -> Path:
    """Adam + a fixed clip through an early norm surge that settles (:func:`char_lstm`): healthy."""
    return char_lstm(path)


HEALTHY = {
    "adam_lm": adam_lm,
    "sgd_momentum": sgd_momentum,
    "rl_episodic": rl_episodic,
    "warmup": warmup,
    "sparse_embeddings": sparse_embeddings,
    "lstm_lm": lstm_lm,
    "adam_clipped_surge": adam_clipped_surge,
}


# ------------------------------------------------------------------------------- diverged runs
def lm_diverges(path: Path) -> Path:
    """An LM under SGD with momentum at an LR far too high: the loss climbs from ~4.5 to hundreds
    within a few steps, every value finite when the run stops."""
    torch.manual_seed(0)
    vocab = 90
    model = TinyLM(vocab)
    opt = torch.optim.SGD(model.parameters(), lr=14.0, momentum=0.9)
    return train(path, model, opt, _lm_loss(model, _tokens(2, vocab), vocab), 11, clip="none")


def regression_diverges(path: Path) -> Path:
    """A regression (loss ~9 at the start) under SGD slightly past its stable LR: the loss grows
    geometrically to thousands and stays finite within the run."""
    x, y = _regression(3)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return train(path, model, opt, _mlp_loss(model, x, y), 14, clip="none")


def explodes(path: Path) -> Path:
    """SGD at lr 0.3 on an MLP: the norm climbs until float32 overflows (non-finite)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    return train(
        path,
        model,
        opt,
        _mlp_loss(model, *_regression(), scale=3.0),
        200,
        clip="none",
        on_nonfinite="skip",
        max_consecutive=10**6,
    )


DIVERGED = {"lm_diverges": lm_diverges, "regression_diverges": regression_diverges, "explodes": explodes}


def deep_classifier(path: Path, lr: float = 0.3, steps: int = 200) -> Path:
    """A 12-layer plain ReLU classifier (Kaiming init, no normalisation) under SGD with momentum 0.9
    and Guard's defaults (``clip="auto"``): at lr 0.3 auto keeps it finite and the loss stays near
    chance (ln 10); at 0.03 it trains."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 10, generator=g), torch.randn(2048, 32, generator=g)
    y = (x @ w + 0.5 * torch.randn(2048, 10, generator=g)).argmax(1)
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(32, 64), nn.ReLU()]
    for _ in range(10):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def loss_of(step: int) -> torch.Tensor:
        i = torch.randint(0, 2048, (64,), generator=g)
        return nn.functional.cross_entropy(model(x[i]), y[i])

    return train(path, model, opt, loss_of, steps)


def scheduled_classifier(
    path: Path, schedule: Callable[[torch.optim.Optimizer], Any], steps: int = 300, lr: float = 0.1
) -> Path:
    """A small classifier (10 classes) under SGD with momentum 0.9 and a torch scheduler stepped
    after every optimizer step, as a loop that steps it per batch does."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 10, generator=g), torch.randn(2048, 32, generator=g)
    y = (x @ w + 0.5 * torch.randn(2048, 10, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = schedule(opt)
    guard = gradguard.Guard(model, opt, log_dir=path, clip="none")
    for _ in range(steps):
        i = torch.randint(0, 2048, (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        guard.step(loss)
        scheduler.step()
    guard.close()
    return path


def half_weights(path: Path, dtype: torch.dtype = torch.bfloat16, steps: int = 300) -> Path:
    """A classifier whose parameters are cast to ``dtype`` (``model.to(torch.bfloat16)``, the input
    too) under AdamW 1e-4: Adam's steps of ~lr per element are below half an ulp of most weights."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 20, generator=g), torch.randn(2048, 32, generator=g)
    y = (x @ w).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 20)).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss_of(step: int) -> torch.Tensor:
        i = torch.randint(0, 2048, (64,), generator=g)
        return nn.functional.cross_entropy(model(x[i].to(dtype)).float(), y[i])

    return train(path, model, opt, loss_of, steps)


def bce_targets_255(path: Path, steps: int = 300, lr: float = 2e-3) -> Path:
    """Binary masks stored as 0/255 fed to ``binary_cross_entropy_with_logits`` without ``/ 255``: a
    target above 1 has no minimum (the loss falls as the logits grow), under AdamW and the script's
    own ``clip="norm:1.0"``, which keeps the run finite."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=g)
    masks = (x[:, :8] > 0).float() * 255.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def loss_of(step: int) -> torch.Tensor:
        i = torch.randint(0, 1024, (64,), generator=g)
        return nn.functional.binary_cross_entropy_with_logits(model(x[i]), masks[i])

    return train(path, model, opt, loss_of, steps, clip="norm:1.0")


def raw_features(path: Path, standardize: bool = False, steps: int = 100) -> Path:
    """A regression on tabular features in raw units (areas ~1e3-1e4, counts ~1-10) under SGD 0.01
    with momentum, as a tutorial trains a normalized one: the gradient norm at step 0 is ~1e6 and
    the run explodes at its first updates. ``standardize``: the fix (each feature's mean and std)."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([3000.0, 8000.0, 5.0, 2.0, 40.0, 1200.0])
    z = torch.randn(512, 6, generator=g)
    x = z * scales + 2 * scales
    y = (z @ torch.tensor([[1.0], [0.5], [-0.3], [0.2], [0.8], [-0.6]])) + 0.1 * torch.randn(
        512, 1, generator=g
    )
    if standardize:
        x = (x - x.mean(0)) / x.std(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def loss_of(step: int) -> torch.Tensor:
        i = (step * 32) % 512
        return nn.functional.mse_loss(model(x[i : i + 32]), y[i : i + 32])

    try:
        return train(path, model, opt, loss_of, steps, clip="none")
    except gradguard.NonFiniteError:  # the guard stopped the run after 10 skipped steps in a row
        return path


def endless_warmup(path: Path) -> Path:
    """A warm-up that never stops (warmup_steps set past the run's end): the LR keeps rising after
    the loss was best, and the loss climbs."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    return train(
        path, model, opt, _mlp_loss(model, *_regression()), 150, lr_of=lambda s: 2e-3 * (s + 1), clip="none"
    )
