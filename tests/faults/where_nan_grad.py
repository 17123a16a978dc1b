"""``torch.where(x > 0, sqrt(x), 0)``: the forward picks the safe branch, but the backward of the
unselected ``sqrt`` divides the zero gradient by sqrt(x) = NaN for negative x, and 0 / NaN = NaN."""

import torch
from torch import nn

EXPECTED = {"phase": "backward", "module": "feat", "op": "sqrt", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "torch.where", "fix": "make the unsafe op's input safe"}


class SafeSqrt(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, torch.sqrt(x), torch.zeros_like(x))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.feat = SafeSqrt()
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        return self.head(self.feat(self.lin(x)))


torch.manual_seed(0)
model = Model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(5):
    x = torch.randn(32, 5)
    loss = model(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
