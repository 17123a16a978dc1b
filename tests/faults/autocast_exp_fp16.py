"""A Poisson model of daily page views, trained under float16 autocast. The head predicts a log
rate and returns ``exp`` of it; its bias starts at the log of the mean count (about 10.3, a rate
of 30,000), as the usual recipe says. A batch of busy days pushes the log rate past 11.1, and
``exp`` of that is above float16's 65504: inf, then NaN in the loss. In float32 the same ``exp``
is finite, so the fix is the dtype, not the argument."""

import math

import torch
from torch import nn

EXPECTED = {"phase": "forward", "module": "head", "op": "exp", "kind": "inf"}
VERDICT = {"id": "nonfinite_op", "cause": "above the dtype's max", "fix": "float32"}


class RateHead(nn.Module):
    def __init__(self, d, mean_count):
        super().__init__()
        self.proj = nn.Linear(d, 1)
        nn.init.constant_(self.proj.bias, math.log(mean_count))

    def forward(self, h):
        return self.proj(h).squeeze(-1).exp()


class TrafficModel(nn.Module):
    def __init__(self, features=8, d=32, mean_count=30000.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, d), nn.ReLU())
        self.head = RateHead(d, mean_count)

    def forward(self, x):
        return self.head(self.body(x))


def days(steps, batch=32):
    g = torch.Generator().manual_seed(7)
    for step in range(steps):
        x = torch.randn(batch, 8, generator=g) * 0.3
        if step == 5:
            x[:4] += 4.0  # a holiday week: every feature far above its usual level
        counts = torch.poisson(torch.full((batch,), 30000.0), generator=g)
        yield x, counts


torch.manual_seed(0)
model = TrafficModel()
with torch.no_grad():
    model.head.proj.weight.fill_(0.08)  # more traffic on busier days
optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
for step, (x, counts) in enumerate(days(8)):
    with torch.autocast("cpu", dtype=torch.float16):
        rate = model(x)
    loss = nn.functional.poisson_nll_loss(rate.float(), counts, log_input=False)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(step, loss.item())
