"""An angular loss, ``acos(cos_sim)``: when a prediction points exactly along its target the cosine
is 1 and the gradient of acos there is -1/sqrt(1 - 1) = -inf (then NaN in the weights)."""

import torch
from torch import nn

EXPECTED = {"phase": "backward", "module": None, "op": "acos", "kind": "-inf"}
VERDICT = {"id": "nonfinite_op", "cause": "±1", "fix": "x.clamp(-1 + 1e-6, 1 - 1e-6)"}

torch.manual_seed(0)
model = nn.Linear(3, 3, bias=False)
optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
for step in range(6):
    x = torch.randn(8, 3)
    target = torch.randn(8, 3)
    if step == 3:
        with torch.no_grad():
            model.weight.copy_(torch.eye(3))  # a perfect prediction: cosine exactly 1
        target = x.clone()
    pred = model(x)
    cos = (pred * target).sum(-1) / (pred.norm(dim=-1) * target.norm(dim=-1))
    loss = torch.acos(cos.clamp(-1.0, 1.0)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
