"""A point-cloud generator trained with an entropic optimal-transport (Sinkhorn) loss written in the
plain domain: ``K = exp(-C / eps)`` with eps = 0.01 underflows to 0 wherever the squared distance is
above ~1 (exp of less than -103 is 0 in float32), so a row of ``K @ v`` is 0 and ``a / (K @ v)`` is
inf at the first step. Clamping that denominator (the division's usual fix) leaves a finite run that
does not train; the log-domain iteration (logsumexp) does."""

import torch
from torch import nn

EXPECTED = {"phase": "loss", "op": "div"}  # the first inf comes out of a / (K @ v), in the loss code
VERDICT = {"id": "nonfinite_op", "cause": "an exp underflowed to 0", "fix": "log space"}


def sinkhorn(x: torch.Tensor, y: torch.Tensor, eps: float = 0.01, iters: int = 20) -> torch.Tensor:
    cost = torch.cdist(x, y) ** 2
    n, m = x.shape[1], y.shape[1]
    a, b = torch.full(x.shape[:2], 1.0 / n), torch.full(y.shape[:2], 1.0 / m)
    kernel = torch.exp(-cost / eps)
    v = torch.full(y.shape[:2], 1.0 / m)
    for _ in range(iters):
        u = a / (kernel @ v.unsqueeze(-1)).squeeze(-1)
        v = b / (kernel.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1)
    plan = u.unsqueeze(-1) * kernel * v.unsqueeze(1)
    return (plan * cost).sum((1, 2)).mean()


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 32 * 2))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(20):
    z = torch.randn(16, 8)
    angles = torch.rand(16, 32) * 6.2832
    target = torch.stack([angles.cos(), angles.sin()], -1) * 2.0  # circles of radius 2
    points = model(z).view(16, 32, 2)
    loss = sinkhorn(points, target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
