"""Adam with ``eps=0``: an embedding row that no batch has used yet has m = v = 0, and its update is
0 / 0 = NaN, written into the weights by the optimizer step; the NaN shows up in the loss only
when a later batch uses that row."""

import torch
from torch import nn

EXPECTED = {"phase": "optimizer", "module": "emb", "op": None, "kind": "nan", "tensor": "param"}
VERDICT = {"id": "nonfinite_op", "cause": "inside Adam.step()", "fix": "eps > 0"}


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, tokens):
        return self.head(self.emb(tokens).mean(1))


torch.manual_seed(0)
model = Model()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=0.0)
for step in range(6):
    tokens = torch.randint(0, 10, (8, 5)) + (10 if step == 3 else 0)  # rows 10-19 first used at step 3
    loss = model(tokens).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
