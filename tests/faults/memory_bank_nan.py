"""Contrastive learning against a memory bank: each step's embeddings are standardised and written
into a queue of negatives, in place, after the step. One batch holds a single sample repeated (a
sampler bug), so the standard deviation of its keys is 0 and (k - mean) / std writes NaN into the
queue. That step's loss was finite; the next step's loss reads the queue, and the NaN enters the
step through the memory bank, not through the batch."""

import torch
import torch.nn.functional as F
from torch import nn

EXPECTED = {"phase": "data", "module": None, "op": None, "kind": "nan", "tensor": "state"}
VERDICT = {"id": "bad_data", "cause": "the state carried from step 3", "fix": "reset the state"}


class Encoder(nn.Module):
    def __init__(self, dim=8, width=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, dim))

    def forward(self, x):
        return self.net(x)


torch.manual_seed(0)
model = Encoder()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
bank = F.normalize(torch.randn(32, 8), dim=1)  # 32 negatives, refreshed 16 at a time
temperature = 0.1
for step in range(6):
    x = torch.randn(16, 8)
    if step == 3:
        x[:] = x[0]  # the sampler returned one sample sixteen times
    q = model(x)
    logits = F.normalize(q, dim=1) @ bank.T / temperature
    loss = torch.logsumexp(logits, dim=1).mean() - logits.mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        keys = (q - q.mean(0)) / q.std(0)
        bank[(step % 2) * 16 : (step % 2) * 16 + 16] = keys
