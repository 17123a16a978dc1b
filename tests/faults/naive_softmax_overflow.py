"""A hand-written softmax, ``exp(x) / exp(x).sum()``, without subtracting the max: logits above ~88
overflow exp in float32 and inf / inf = NaN."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "module": "classifier", "op": "exp", "kind": "inf"}
VERDICT = {"id": "nonfinite_op", "cause": "exp overflow", "fix": "log space"}


class NaiveSoftmaxClassifier(nn.Module):
    def forward(self, logits):
        e = torch.exp(logits)
        return e / e.sum(dim=-1, keepdim=True)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(10, 4)
        self.classifier = NaiveSoftmaxClassifier()

    def forward(self, x):
        return self.classifier(self.body(x))


torch.manual_seed(0)
model = Model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(6):
    x = torch.randn(8, 10) * (200 if step == 3 else 1)  # a batch of outliers at step 3
    y = torch.randint(0, 4, (8,))
    probs = model(x)
    loss = -torch.log(probs[torch.arange(8), y] + 1e-9).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
