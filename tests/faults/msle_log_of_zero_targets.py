"""A squared log error written as ``mse_loss(log(pred), log(hours))`` on targets with 0 hours (a job that
took none): the log of the data's own zeros is -inf. A clamp_min(eps) on it made those samples dominate
the loss (log(1e-8) = -18: a test RMSLE of 0.93); log1p, the MSLE's own form, trained (0.74)."""

import torch
from torch import nn
from torch.nn import functional as F

EXPECTED = {"phase": "loss", "op": "log", "kind": "-inf"}
VERDICT = {"id": "nonfinite_op", "cause": "log of 0", "fix": "torch.log1p(y)"}

torch.manual_seed(0)
x = torch.rand(64, 4)
hours = (x.sum(1) * 3).round()
hours[:4] = 0.0  # jobs that took no time
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for step in range(6):
    pred = F.softplus(model(x)).squeeze(-1)
    loss = F.mse_loss(torch.log(pred), torch.log(hours))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
