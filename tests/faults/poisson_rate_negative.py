"""A count regression (bike rentals per hour) with ``PoissonNLLLoss(log_input=False)`` on the raw output
of a linear head: the loss takes log(rate + eps) of the prediction itself, and a freshly initialised head
predicts negative rates — NaN at the first step. With ``log_input=True`` (the default) the raw output is a
log-rate, which may be any number."""

import torch
from torch import nn

EXPECTED = {"phase": "loss", "op": "poisson_nll_loss", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "log of a negative predicted rate", "fix": "log_input=True"}

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))
criterion = nn.PoissonNLLLoss(log_input=False)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(10):
    features = torch.randn(64, 6)
    counts = torch.poisson(torch.exp(features[:, :1]))
    loss = criterion(model(features), counts)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
