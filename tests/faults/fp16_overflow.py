"""A model kept in float16 to save memory: an activation above 65504 overflows to inf in a Linear,
and inf - inf = NaN in the LayerNorm after it."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "module": "up", "op": "linear", "kind": "inf"}
VERDICT = {"id": "nonfinite_op", "cause": "dtype's max", "fix": "float32"}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 256)
        self.norm = nn.LayerNorm(256)
        self.down = nn.Linear(256, 1)

    def forward(self, x):
        return self.down(self.norm(self.up(x)))


torch.manual_seed(0)
model = Block().half()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
for step in range(6):
    x = torch.randn(8, 64)
    if step == 3:
        x = (torch.rand(8, 64) * 2 - 1) * 60000  # raw 16-bit sensor counts, never normalised
    x = x.half()
    loss = model(x).float().pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
