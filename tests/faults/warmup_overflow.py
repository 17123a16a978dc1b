"""A linear warm-up to a peak learning rate copied from a large-batch recipe (SGD, peak 2.0) onto a
small regression MLP: the first steps at a tiny learning rate train fine, then the norm climbs as the
learning rate keeps rising, and the weights overflow float32 before the warm-up ends."""

import torch
from torch import nn

EXPECTED = {"phase": "optimizer", "kind": "inf"}
VERDICT = {"id": "explosion", "cause": "Gradient explosion", "fix": "learning rate"}


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.out = nn.Linear(128, 1)

    def forward(self, x):
        return self.out(self.body(x))


torch.manual_seed(0)
features = torch.randn(1024, 16)
targets = features @ torch.randn(16, 1) + 0.1 * torch.randn(1024, 1)
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(features, targets), batch_size=32, shuffle=True
)
model = Regressor()
optimizer = torch.optim.SGD(model.parameters(), lr=2.0, momentum=0.9)
warmup = 100
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
step = 0
for epoch in range(10):
    for x, y in loader:
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
