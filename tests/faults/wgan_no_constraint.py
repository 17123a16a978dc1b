"""A Wasserstein GAN on a 2-D toy distribution, written from the paper's loss but without its
Lipschitz constraint (no weight clipping, no gradient penalty, no spectral norm): the critic's
objective D(fake) - D(real) has no lower bound, so the critic scales its outputs up step after step
until they overflow float32."""

import torch
from torch import nn

EXPECTED = {"cause": "explosion"}
VERDICT = {"id": "unbounded_loss", "cause": "no lower bound", "fix": "gradient penalty"}


class Critic(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1)
        )

    def forward(self, x):
        return self.net(x)


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, z):
        return self.net(z)


def real_batch(n):
    angle = torch.rand(n) * 6.2832
    return torch.stack([angle.cos(), angle.sin()], 1) * 2 + 0.05 * torch.randn(n, 2)


torch.manual_seed(0)
critic, generator = Critic(), Generator()
model = critic
opt_c = torch.optim.SGD(critic.parameters(), lr=0.05, momentum=0.9)
opt_g = torch.optim.RMSprop(generator.parameters(), lr=5e-4)
for step in range(400):
    real = real_batch(64)
    fake = generator(torch.randn(64, 8)).detach()
    loss = critic(fake).mean() - critic(real).mean()
    opt_c.zero_grad()
    loss.backward()
    opt_c.step()
    if step % 5 == 4:
        g_loss = -critic(generator(torch.randn(64, 8))).mean()
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
