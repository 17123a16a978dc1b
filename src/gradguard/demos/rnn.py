"""The textbook recipe: an LSTM language model trained by truncated BPTT with SGD at lr = 1, clipped at 5.

Zaremba, Sutskever & Vinyals (2014) train an LSTM LM with plain SGD at learning rate 1 on a loss
summed over the 35 unrolled time steps (averaged over the batch) and rescale the gradient when
its norm exceeds 5; textbooks teach it as "clipping lets SGD run with a learning rate as large
as 1". Here the stage is a character-level model of English text that ships with Python (the
help topics of :mod:`pydoc_data.topics`, ~465k characters, 90 % train / 10 % held out).

Why an LSTM *with a projection* (LSTMP, Sak et al. 2014, as in the large LSTM LMs of
Jozefowicz et al. 2016): a plain LSTM's hidden state is bounded by ``tanh``, and a softmax
cross-entropy is Lipschitz in the logits, so unclipped SGD at lr = 1 blows the loss up to
hundreds of nats per character and then sits there with saturated gates — finite for ever
(measured: 40 steps at ~3000 nats/char, never NaN). With a projection the output path is a
product of two unbounded linear maps (``W_out · W_proj · h``) that feeds back through the
recurrence, so the same recipe really overflows float32: the gradient norm goes
10 → 2·10² → 10⁶ → … → inf within ~10 steps, on every seed. Clipped at 5, the same model
trains (bits per character well under the unigram entropy of the text).

Measured (``benchmarks/demo_probe.py``, seeds 0-2; seeds 3-5 agree): ``none`` is non-finite at
step 10; ``norm:5`` clips 99.6 % of the steps (the recipe is normalized SGD: the first norm is
~10) and reaches 2.85-2.98 bits/char on held-out text against a unigram entropy of 4.79;
Adam (lr 2e-3) reaches 2.95-3.01 with or without ``norm:5``. The stable window is narrow:
``norm:10`` (1× the first norm) goes non-finite at step 134-217, ``norm:20`` near step 65, and the
adaptive rules that follow the norms upward (``autoclip:10``, ``zclip``, ``Auto()``) all fail.
``auto`` (:class:`gradguard.clip.Auto` with ``first=0.5``: never above half the first norm)
trains like ``norm:5``: 2.85-2.98 bits/char, 99 % clipped, no non-finite step.

Through ``gradguard demo`` (one thread, the guard in the loop; seeds 0-2): ``none`` is non-finite
at step 11 (located: the norm grew ~1e14× from step 4, then the decoder's ``linear`` overflowed in
the forward pass); ``norm:5`` 2.89-3.02 bits/char; ``auto`` 2.85-2.98; Adam 2.96-3.01; ``norm:10``
non-finite at step 199-235 and ``norm:28`` (what ``gradguard diagnose`` recommended from the
``norm:5`` run before issue 15) at step 52-105.

Advice verified before it is given (issue 15): ``norm:5`` trains (the loss falls 132 → 59), so its
``over_clipping`` is an info with no threshold; the ``explosion`` of ``none`` estimates 200-220,
which :func:`gradguard.tune.tune` (12 candidates halving down from it, 60 steps each from the
fresh start) rejects — every candidate from ~6 up explodes within 7-33 steps — and the demo follows the verified
threshold instead: ``norm:3.1`` / ``norm:3.4`` / ``norm:3`` (seeds 0 / 1 / 2; half the tightest
candidate that exploded) train all 500 steps with no non-finite step, 2.76 / 2.77 / 2.76 bits per
character (``benchmarks/README.md``, ``advice.py``).

Learning-rate advice is verified the same way (session 13): the ``explosion`` of ``none`` also
advises lr=0.1 (1/10 of the rate it failed at); :func:`gradguard.tune.tune` over the candidates of
its ``gradguard tune --lr`` command (0.025, 0.05, 0.1, 0.2, no clipping, 60 steps) sees 0.05-0.2
explode on seeds 0-2 and verifies 0.025, which trains all 500 steps (3.83-3.91 bits/char, no
non-finite step). ``lr_too_high`` on ``norm:5`` (the decoder moves ~0.11 of its weight norm per
step) advises 0.09; at ``norm:5`` every candidate (0.022-0.18) trains and tune verifies 0.18, which
trains all 500 steps at 3.15-3.18 bits/char — slower than the recipe's own rate (2.99-3.02): the
verified rate is safe, not better (``benchmarks/demo_probe.py --advice``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard.demos._common import RunConfig, Scenario

__all__ = ["HPARAMS", "CharLSTM", "build", "configs", "corpus", "demo_configs"]

#: The chosen configuration (see the module docstring and ``benchmarks/demo_probe.py``).
HPARAMS: dict[str, Any] = {
    "embed": 32,
    "hidden": 200,
    "proj": 100,
    "layers": 1,
    "batch": 20,
    "bptt": 35,  # truncated-BPTT segment length (Zaremba et al.: 35)
    "init": 0.1,  # U(-0.1, 0.1) for every parameter (Zaremba et al., small model)
    "loss": "sum over time steps of the batch-mean cross-entropy (Zaremba et al.)",
    "lr": 1.0,
    "steps": 500,
    "eval_chars": 20_000,
}


def configs() -> list[RunConfig]:
    """The demo's configurations: the textbook recipe and the alternatives around it."""
    lr = HPARAMS["lr"]
    return [
        RunConfig("none", "none", "sgd", lr),
        RunConfig("norm:5", "norm:5", "sgd", lr),
        RunConfig("autoclip:10", "autoclip:10", "sgd", lr),
        RunConfig("zclip", "zclip", "sgd", lr),
        RunConfig("auto", "auto", "sgd", lr),
        RunConfig("adam", "none", "adam", 2e-3),
        RunConfig("adam+norm:5", "norm:5", "adam", 2e-3),
    ]


def demo_configs() -> list[RunConfig]:
    """What ``gradguard demo rnn`` runs, each through a :class:`gradguard.Guard` (``on_nonfinite="skip"``)."""
    lr = HPARAMS["lr"]
    return [
        RunConfig("none", "none", "sgd", lr, stop_at_nonfinite=True, note="SGD lr=1, no clipping"),
        RunConfig("norm:5", "norm:5", "sgd", lr, note="the textbook recipe"),
        RunConfig(
            "recommended",
            None,
            "sgd",
            lr,
            recommend_from=("norm:5", "none"),
            note="from diagnose, verified by tune",
        ),
        RunConfig("auto", "auto", "sgd", lr, note="gradguard's default"),
        RunConfig("adam", "none", "adam", 2e-3, note="Adam lr 2e-3, no clipping"),
        RunConfig("adam+norm:5", "norm:5", "adam", 2e-3, note="Adam lr 2e-3"),
    ]


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, Tensor, Tensor]:
    """``(alphabet, train ids, held-out ids)`` from the text of :mod:`pydoc_data.topics`."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    alphabet = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(alphabet)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(len(ids) * 0.9)
    return alphabet, ids[:split], ids[split:]


class CharLSTM(nn.Module):
    """Embedding → LSTM with a projection (``proj_size``) → linear decoder to the alphabet."""

    def __init__(self, vocab: int, embed: int, hidden: int, proj: int, layers: int, init: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True, proj_size=proj)
        self.decoder = nn.Linear(proj or hidden, vocab)
        for p in self.parameters():
            nn.init.uniform_(p, -init, init)

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        with warnings.catch_warnings():  # "LSTM with projections is not supported with oneDNN"
            warnings.simplefilter("ignore", UserWarning)
            out, state = self.lstm(self.embed(x), state)
        return self.decoder(out), state


def build(seed: int = 0, **overrides: Any) -> Scenario:
    """The ``rnn`` scenario for ``seed`` (weights and nothing else depend on it; the text is fixed).

    ``overrides`` replace entries of :data:`HPARAMS` (for probes).
    """
    hp = {**HPARAMS, **overrides}
    alphabet, train_ids, val_ids = corpus()
    vocab = len(alphabet)
    torch.manual_seed(seed)
    model = CharLSTM(vocab, hp["embed"], hp["hidden"], hp["proj"], hp["layers"], hp["init"])
    batch, bptt = hp["batch"], hp["bptt"]
    n_cols = len(train_ids) // batch
    streams = train_ids[: n_cols * batch].view(batch, n_cols)  # `batch` contiguous streams of text

    n_eval = min(hp["eval_chars"], len(val_ids) - 1) // 200 * 200
    val_x = val_ids[:n_eval].view(-1, 200)
    val_y = val_ids[1 : n_eval + 1].view(-1, 200)
    counts = torch.bincount(train_ids, minlength=vocab).double()
    unigram = counts / counts.sum()
    unigram_bpc = float(-(unigram[val_y.reshape(-1)].clamp_min(1e-12).log2()).mean())

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        pos = 0
        while True:
            if pos + bptt + 1 > n_cols:
                pos = 0
            yield streams[:, pos : pos + bptt], streams[:, pos + 1 : pos + bptt + 1]
            pos += bptt

    hidden: dict[str, tuple[Tensor, Tensor] | None] = {"state": None}

    def reset() -> None:
        hidden["state"] = None

    def loss_fn(m: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        x, y = b
        state = hidden["state"]
        if state is not None:  # truncated BPTT: carry the state, cut the graph
            state = (state[0].detach(), state[1].detach())
        logits, hidden["state"] = m(x, state)
        ce = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="none").view(x.shape)
        return ce.mean(0).sum()  # summed over time steps, averaged over the batch (Zaremba et al.)

    def evaluate(m: nn.Module) -> dict[str, float]:
        if not all(bool(torch.isfinite(p).all()) for p in m.parameters()):
            return {"bpc": math.nan}
        logits, _ = m(val_x)
        nats = F.cross_entropy(logits.reshape(-1, vocab), val_y.reshape(-1))
        return {"bpc": float(nats) / math.log(2)}

    return Scenario(
        name="rnn",
        seed=seed,
        model=model,
        batches=batches,
        loss_fn=loss_fn,
        evaluate=evaluate,
        metric="bpc",
        higher_is_better=False,
        baseline={"unigram_bpc": unigram_bpc},
        configs=configs(),
        steps=hp["steps"],
        loss_unit=f"nats per {bptt}-char segment",
        info={
            **hp,
            "vocab": vocab,
            "train_chars": len(train_ids),
            "params": sum(p.numel() for p in model.parameters()),
        },
        reset=reset,
    )
