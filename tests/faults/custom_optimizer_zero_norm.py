"""A hand-written "normalized SGD" (each parameter moves by lr along its gradient's direction,
g / ||g||) on a ReZero network, whose residual gates start at 0. At the first step the branches
behind a closed gate get an all-zero gradient, and g / ||g|| = 0 / 0 writes NaN into their weights
inside ``optimizer.step()``; the loss only turns NaN at the next step, once the gates open."""

import torch
from torch import nn

EXPECTED = {"phase": "optimizer", "module": "blocks.0.ff.0", "op": None, "kind": "nan", "tensor": "param"}
VERDICT = {"id": "nonfinite_op", "cause": "born inside NormalizedSGD.step()", "fix": "guard the divisions"}


class NormalizedSGD(torch.optim.Optimizer):
    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.add_(p.grad / p.grad.norm(), alpha=-group["lr"])


class ReZeroBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + self.gate * self.ff(x)


class Net(nn.Module):
    def __init__(self, width=16, depth=3):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(ReZeroBlock(width) for _ in range(depth))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


torch.manual_seed(0)
model = Net()
optimizer = NormalizedSGD(model.parameters(), lr=0.01)
for step in range(4):
    x = torch.randn(32, 8)
    y = x[:, :1] * 2 - x[:, 1:2]
    loss = nn.functional.smooth_l1_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
