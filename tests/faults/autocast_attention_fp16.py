"""A small transformer trained under float16 autocast: the hand-written attention scores
``q @ k.T`` are computed in float16, and a batch of unnormalised features makes them larger
than 65504. They overflow to inf, and the softmax of a row holding inf is NaN. In float32 the
same scores are finite: only the replay under the step's autocast state reproduces it."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "module": "block.attn", "op": "matmul", "kind": "inf"}
VERDICT = {"id": "nonfinite_op", "cause": "above the dtype's max", "fix": "float32"}


class SelfAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        return scores.softmax(dim=-1) @ v


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = SelfAttention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Classifier(nn.Module):
    def __init__(self, features=12, d=32, classes=3):
        super().__init__()
        self.embed = nn.Linear(features, d)
        self.block = Block(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.block(self.embed(x)).mean(1))


def batches(steps):
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(8, 10, 12, generator=g)
        if step == 4:
            x = x * 40.0 + 250.0  # a shard of raw sensor counts that was never standardised
        yield x, torch.randint(0, 3, (8,), generator=g)


torch.manual_seed(0)
model = Classifier()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step, (x, y) in enumerate(batches(7)):
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(step, loss.item())
