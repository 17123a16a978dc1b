"""The terms of a loss (``ce + gp_weight * penalty``) as ``gradguard run``'s loss-code watch sees them
(:meth:`gradguard.locate.LossWatch.terms`, ``meta.json`` ``loss_terms``), and ``gradguard diagnose``'s
``loss_weight``: a term weighted to outweigh the rest of the loss in a run that did not train."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli_runs import gradguard_run
from gradguard.diagnose import diagnose, headline
from gradguard.locate import LossWatch
from gradguard.runlog import read_run

HERE = Path(__file__).parent
SCRIPT = HERE / "run_scripts" / "input_grad_penalty.py"


def _terms(code: str) -> dict | None:
    torch.manual_seed(0)
    out = torch.randn(8, 3, requires_grad=True) * 1
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    scope = {"torch": torch, "F": F, "out": out, "y": y}
    with LossWatch(made=[out]) as watch:
        exec(code, scope)
    return watch.terms(scope["loss"])


@pytest.mark.parametrize(
    ("code", "weights"),
    [
        ("ce = F.cross_entropy(out, y)\npen = out.pow(2).mean()\nloss = ce + 1e4 * pen", [None, 1e4]),
        (
            "loss = F.cross_entropy(out, y) + out.pow(2).mean() * 0.5 - out.abs().mean() / 4",
            [None, 0.5, 0.25],
        ),
        ("loss = sum([F.cross_entropy(out, y), out.pow(2).mean(), out.abs().mean()])", [None, None, None]),
    ],
)
def test_the_terms_of_a_sum_are_read_with_their_weights(code: str, weights: list) -> None:
    found = _terms(code)
    assert found is not None and [t["weight"] for t in found["terms"]] == weights
    assert all(t["value"].dim() == 0 for t in found["terms"])


@pytest.mark.parametrize(
    "code",
    [
        "loss = F.cross_entropy(out, y)",  # one term
        "loss = F.cross_entropy(out, y) / 4",  # an accumulation's scaling: one term
        "loss = (out + out.pow(2)).mean()",  # a sum of tensors before the reduction: not terms of the loss
    ],
)
def test_a_loss_that_is_not_a_sum_of_terms_has_none(code: str) -> None:
    assert _terms(code) is None


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return gradguard_run(tmp_path, SCRIPT, *args)


def test_a_penalty_weighted_1e4_for_1e_4_is_named_not_the_explosion_it_drives(tmp_path: Path) -> None:
    """Before: "explosion: clip at 680 or lr 5e-4", and every threshold and rate left the model at chance."""
    _run(tmp_path)
    top = headline(diagnose(tmp_path / "run"))
    assert top is not None and top.id == "loss_weight", top
    line = next(i for i, s in enumerate(SCRIPT.read_text().splitlines(), 1) if "penalty = grad_x" in s)
    assert f"1e+04 × the mean at {SCRIPT}:{line}" in top.message and "(98%)" in top.message
    assert "10 or less" in top.recommendation["text"]
    assert "explosion" not in {
        f.id for f in diagnose(tmp_path / "run")
    }  # a driver: its climb is not the rate's


def test_the_advised_weight_trains_and_reads_clean(tmp_path: Path) -> None:
    got = _run(tmp_path, "--gp-weight", "10")
    assert got.returncode == 0 and float(got.stdout.split()[-1].split("val_acc")[-1]) > 0.85, got.stdout
    terms = read_run(tmp_path / "run").meta["loss_terms"]["terms"]
    assert [t["weight"] for t in terms] == [None, 10.0]
    assert headline(diagnose(tmp_path / "run")) is None


PRODUCTS = HERE / "run_scripts" / "product_classifier.py"


@pytest.mark.parametrize(
    ("args", "op", "severity"),
    [
        # (its loss fell 0.9 → 0.70 toward the one-vs-rest prior while the accuracy stayed at chance: a warning)
        (("--head", "sigmoid", "--loss", "bce"), "binary_cross_entropy_with_logits", "warning"),
        (("--head", "softmax"), "cross_entropy", "warning"),  # learns the easy task, its loss stuck at 2.08
        (("--head", "logits"), None, None),
    ],
)
def test_a_logits_loss_given_probabilities_is_named(
    tmp_path: Path, args: tuple[str, ...], op: str | None, severity: str | None
) -> None:
    got = gradguard_run(tmp_path, PRODUCTS, *args)
    assert got.returncode == 0, got.stderr
    found = [f for f in diagnose(tmp_path / "run") if f.id == "loss_on_probabilities"]
    if op is None:
        assert found == [] and "loss_on_probabilities" not in read_run(tmp_path / "run").meta
        return
    (finding,) = found
    assert finding.severity == severity and f"`{op}` at {PRODUCTS}:" in finding.message
    assert "Remove the s" in finding.recommendation["text"]


def test_a_regression_that_predicts_its_targets_mean_is_said_with_the_inputs_scale(tmp_path: Path) -> None:
    """Load curves in raw MW into an LSTM: MSE at Var(y) for the whole run, "No findings"."""
    script = HERE / "run_scripts" / "load_forecaster.py"
    for args, said in (((), True), (("--scale-inputs",), False)):
        out = tmp_path / ("scaled" if args else "raw")
        assert gradguard_run(tmp_path, script, *args, out=out).returncode == 0
        (mse,) = read_run(out).meta["loss_functions"]
        assert mse["op"] == "mse_loss" and 0.8 < mse["target_variance"] < 1.25
        found = [f for f in diagnose(out) if f.id == "stalled"]
        assert bool(found) == said, found
        if said:
            assert "the variance of its targets" in found[0].message
            assert "standardize each input feature" in found[0].recommendation["text"]


TWO_LOSSES = """
import torch
from torch import nn

torch.manual_seed(0)
G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
D = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
bce = nn.BCEWithLogitsLoss()
for step in range(12):
    real = torch.randn(32, 2) * 0.5 + 2
    fake = G(torch.randn(32, 4))
    d_loss = bce(D(real), torch.ones(32, 1)) + bce(D(fake.detach()), torch.zeros(32, 1))
    opt_d.zero_grad(); d_loss.backward(); opt_d.step()
    g_loss = bce(D(fake), torch.ones(32, 1)) + 0.1 * (fake ** 2).mean()  # the generator's own loss
    opt_g.zero_grad(); g_loss.backward(); opt_g.step()

probe = nn.Linear(2, 5)  # then a classifier over the generator's samples, a third optimizer
opt_p = torch.optim.SGD(probe.parameters(), lr=0.1)
for step in range(6):
    x = G(torch.randn(32, 4)).detach()
    loss = nn.functional.cross_entropy(probe(x), torch.randint(0, 5, (32,)))
    opt_p.zero_grad(); loss.backward(); opt_p.step()
"""


def test_each_optimizer_of_a_run_is_described_by_its_own_loss(tmp_path: Path) -> None:
    """A GAN's generator and a later probe were described by the discriminator's loss (the run's first
    backward): the generator's penalty weight and the probe's 5 classes were not in their meta.json."""
    script = tmp_path / "gan.py"
    script.write_text(TWO_LOSSES)
    done = gradguard_run(tmp_path, script)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    d, g, p = (read_run(path, records=False).meta for path in (run, run / "optimizer1", run / "optimizer2"))
    assert d["loss_terms"]["source"].endswith("gan.py:14"), d["loss_terms"]
    assert g["loss_terms"]["source"].endswith("gan.py:16") and 0.1 in [
        t["weight"] for t in g["loss_terms"]["terms"]
    ]
    assert [(f["op"], f["classes"]) for f in p["loss_functions"]] == [("cross_entropy", 5)], p[
        "loss_functions"
    ]


GAN_NEAR_ZERO = """
import torch
from torch import nn

torch.manual_seed(0)
G = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
D = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
with torch.no_grad():
    D[2].weight.mul_(0.02)
    D[2].bias.fill_(0.05)  # the critic's logits start a little above 0: inside [0, 1] for a while
opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
bce = nn.BCEWithLogitsLoss()
for it in range(40):
    real = torch.randn(64, 2) + 2
    fake = G(torch.randn(64, 8))
    d_loss = bce(D(real), torch.ones(64, 1)) + bce(D(fake.detach()), torch.zeros(64, 1))
    opt_d.zero_grad(); d_loss.backward(); opt_d.step()
    g_loss = bce(D(fake), torch.ones(64, 1))
    opt_g.zero_grad(); g_loss.backward(); opt_g.step()
"""


def test_a_gans_logits_near_zero_early_are_not_called_probabilities(tmp_path: Path) -> None:
    """BCEWithLogits on a discriminator's raw outputs, still in [0, 1] at iteration 12: the late check meant
    for step 25 counted backward() calls (two per iteration) and came at iteration 12 — "given probabilities
    on every step checked … remove the sigmoid" (there is none), an error on a healthy GAN."""
    script = tmp_path / "gan.py"
    script.write_text(GAN_NEAR_ZERO)
    done = gradguard_run(tmp_path, script)
    assert done.returncode == 0, done.stderr
    for path in (tmp_path / "run", tmp_path / "run" / "optimizer1"):
        assert "loss_on_probabilities" not in read_run(path, records=False).meta


LOW_SIGNAL_CLICKS = """
import math
import torch
from torch import nn

torch.manual_seed(0)
n, d = 4096, 12
x = torch.randn(n, d)
clicked = (torch.rand(n) < torch.sigmoid(0.62 + 0.08 * x[:, 0])).float()  # prior 0.65, a weak feature
model = nn.Linear(d, 1)
with torch.no_grad():
    model.weight.mul_(0.01)
    model.bias.fill_(math.log(0.65 / 0.35))  # the bias starts at the prior's logit (0.62)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
loss_fn = nn.BCEWithLogitsLoss()
for step in range(120):
    i = torch.randint(0, n, (256,))
    loss = loss_fn(model(x[i]).squeeze(1), clicked[i])  # raw logits: no sigmoid
    opt.zero_grad(); loss.backward(); opt.step()
"""


def test_raw_logits_of_a_weak_signal_inside_zero_one_are_not_probabilities(tmp_path: Path) -> None:
    """A click model on weak features, its bias at the prior's logit: every raw logit stays in 0.55–0.85,
    inside [0, 1] by chance; it read "given probabilities … Remove the sigmoid" (an error, exit 1) though
    there is none. A sigmoid's outputs, pushed by training, reach an edge of [0, 1] (the product
    classifier's one-vs-rest head, above, is still named)."""
    script = tmp_path / "clicks.py"
    script.write_text(LOW_SIGNAL_CLICKS)
    done = gradguard_run(tmp_path, script)
    assert done.returncode == 0, done.stderr
    assert "loss_on_probabilities" not in read_run(tmp_path / "run", records=False).meta
