"""Knowledge distillation with a softmax temperature annealed linearly to a floor the code forgot
(``tau = 1 - step / ANNEAL`` with no ``max``): the logits are divided by a temperature that shrinks
every step, the gradient grows as 1/tau (a climb of the norm), and at step 12 tau is exactly 0.0 — a
Python float, not a tensor — so ``logits / tau`` is a division by zero. The climb is the lead-up;
the division is the fault, and no threshold or learning rate stops it."""

import torch
import torch.nn.functional as F
from torch import nn

EXPECTED = {"phase": "loss", "op": "div", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "division by zero", "fix": "clamp_min(eps)"}

ANNEAL = 12

torch.manual_seed(0)
x_all, y_all = torch.randn(512, 16), torch.randint(0, 5, (512,))
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 5))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for step in range(16):
    i = torch.randint(0, 512, (32,))
    tau = 1.0 - step / ANNEAL
    loss = F.cross_entropy(model(x_all[i]) / tau, y_all[i])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
