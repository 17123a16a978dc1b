"""A policy that recovers the pre-squash action with ``atanh`` (the log-probability of a tanh-squashed
Gaussian): an action clipped to the bounds by the environment comes back as exactly 1.0, and
atanh(1) is inf."""

import math

import torch
from torch import nn

EXPECTED = {"phase": "forward", "op": "atanh", "kind": "inf"}
VERDICT = {"id": "nonfinite_op", "cause": "atanh of ±1", "fix": "x.clamp(-1 + eps, 1 - eps)"}


class Policy(nn.Module):
    def __init__(self):
        super().__init__()
        self.mu = nn.Linear(4, 2)
        self.log_std = nn.Parameter(torch.zeros(2))

    def forward(self, obs, action):
        u = torch.atanh(action)  # the action before tanh
        z = (u - self.mu(obs)) / self.log_std.exp()
        log_prob = -0.5 * z.pow(2) - self.log_std - 0.5 * math.log(2 * math.pi)
        return log_prob.sum(-1) - torch.log(1 - action.pow(2) + 1e-6).sum(-1)


torch.manual_seed(0)
model = Policy()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(8):
    obs = torch.randn(16, 4)
    action = torch.tanh(torch.randn(16, 2))
    if step == 5:
        action[3, 1] = 1.0  # the environment clipped this action to its bound
    advantage = torch.randn(16)
    loss = -(model(obs, action) * advantage).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
