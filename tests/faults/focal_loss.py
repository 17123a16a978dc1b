"""Focal loss with gamma = 0.5, ``-(1 - p) ** 0.5 * log(p)``: a sample the model gets exactly right
(p = 1 in float32) puts the fractional power at 0, whose gradient is infinite (inf · 0 = NaN)."""

import torch
from torch import nn

EXPECTED = {"phase": "backward", "module": None, "op": "pow", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "pow at 0", "fix": "(1 - p).clamp_min(eps) ** gamma"}


def focal_loss(logits, target, gamma=0.5):
    p = torch.softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    return (-((1 - p) ** gamma) * torch.log(p.clamp_min(1e-12))).mean()


torch.manual_seed(0)
model = nn.Linear(4, 3)
optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
for step in range(6):
    x = torch.randn(8, 4)
    target = torch.randint(0, 3, (8,))
    if step == 3:
        x[0] = 40.0 * model.weight[0].detach().sign()  # a confident, correct sample: p rounds to 1
        target[0] = 0
    loss = focal_loss(model(x), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
