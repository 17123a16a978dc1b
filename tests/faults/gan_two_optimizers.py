"""A GAN on raw 1-D readings. The discriminator (its own Adam, created first) is trained with the
stable BCE-with-logits loss, but the generator's loss is the minimax one of the original paper
written out by hand, log(1 - sigmoid(D(G(z)))). The discriminator's logits on real data reach ~90;
once the generator's samples reach the real ones, sigmoid rounds to exactly 1.0 in float32 and
log(1 - 1) = -inf in the generator's loss: a NaN in the second optimizer's step."""

import torch
from torch import nn

EXPECTED = {"phase": "loss", "op": "log", "kind": "-inf"}
VERDICT = {"id": "nonfinite_op", "cause": "log of 0", "fix": "BCEWithLogitsLoss"}


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1))  # logits

    def forward(self, x):
        return self.net(x)


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, z):
        return self.net(z)


torch.manual_seed(0)
disc, gen = Discriminator(), Generator()
opt_d = torch.optim.Adam(disc.parameters(), lr=0.05)
opt_g = torch.optim.Adam(gen.parameters(), lr=0.05)
model = gen
for step in range(200):
    real = 60.0 + 5.0 * torch.randn(64, 1)  # raw readings, never normalised
    fake = gen(torch.randn(64, 4))
    d_real, d_fake = disc(real), disc(fake.detach())
    bce = nn.functional.binary_cross_entropy_with_logits
    d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()
    loss = torch.log(1 - torch.sigmoid(disc(fake))).mean()
    opt_g.zero_grad()
    loss.backward()
    opt_g.step()
