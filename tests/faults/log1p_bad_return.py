"""Log returns as features, ``log1p(r)``: a bad tick (a price recorded as a negative correction)
makes a return below -100 %, and log1p of a number below -1 is NaN. Clamping to eps, the fix for
log(x), would turn every negative return into ~0: the data is what to repair."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "op": "log1p", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "log1p of a number below -1", "fix": "x > -1"}


class ReturnsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(10, 1)

    def forward(self, returns):
        return self.head(torch.log1p(returns))


torch.manual_seed(0)
model = ReturnsModel()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
for step in range(8):
    returns = 0.02 * torch.randn(32, 10)
    if step == 4:
        returns[7, 3] = -1.3  # a bad tick
    target = torch.randn(32, 1)
    loss = nn.functional.mse_loss(model(returns), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
