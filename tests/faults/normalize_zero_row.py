"""Hand-written L2 normalisation, ``x / x.norm(dim=-1, keepdim=True)``: an all-zero row (a ReLU
feature that died for one sample) divides 0 by 0."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "module": "embed", "op": "div", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "division by zero", "fix": "F.normalize"}


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 8)

    def forward(self, x):
        h = torch.relu(self.proj(x))
        return h / h.norm(dim=-1, keepdim=True)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = Embed()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.embed(x))


torch.manual_seed(0)
model = Model()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
for step in range(6):
    x = torch.randn(8, 5)
    if step == 3:
        with torch.no_grad():
            x[0] = 0.0
            model.embed.proj.bias.clamp_(max=0.0)  # relu(0·w + b≤0) = 0: an all-zero row
    loss = nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,)))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
