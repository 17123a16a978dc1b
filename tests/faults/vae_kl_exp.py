"""A VAE's KL term, ``-0.5 * (1 + logvar - mu**2 - logvar.exp())``: an encoder that outputs a large
log-variance for one sample overflows ``exp`` to inf in float32."""

import torch
from torch import nn

EXPECTED = {"phase": "loss", "module": None, "op": "exp", "kind": "inf"}
VERDICT = {"id": "nonfinite_op", "cause": "exp overflow", "fix": "clamp the argument before exp"}


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(10, 8)
        self.dec = nn.Linear(4, 10)

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar.clamp(max=20)).exp()
        return self.dec(z), mu, logvar


torch.manual_seed(0)
model = VAE()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(6):
    x = torch.randn(16, 10)
    if step == 3:
        x[0] = 25.0  # an outlier sample: the encoder's log-variance lands near 100
        with torch.no_grad():
            model.enc.weight[4:].fill_(0.4)
    recon, mu, logvar = model(x)
    kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1).mean()
    loss = nn.functional.mse_loss(recon, x) + kl
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
