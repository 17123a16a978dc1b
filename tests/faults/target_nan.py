"""A regression target with a missing value: the features are clean, but one price in the CSV was
empty and parsed as NaN. The model's input is finite; the NaN enters the step through the target."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EXPECTED = {"phase": "data", "module": None, "op": None, "kind": "nan", "tensor": "target"}
VERDICT = {"id": "bad_data", "cause": "the target", "fix": "torch.isfinite"}


class PriceModel(nn.Module):
    def __init__(self, n_features):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_features, 32), nn.GELU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.body(x).squeeze(-1)


torch.manual_seed(0)
features = torch.randn(96, 6)
prices = features @ torch.linspace(0.5, 2.0, 6) + 0.1 * torch.randn(96)
prices[70] = float("nan")  # an empty cell in the price column
loader = DataLoader(TensorDataset(features, prices), batch_size=16, shuffle=False)

model = PriceModel(6)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
criterion = nn.MSELoss()
for epoch in range(1):
    for x, y in loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if not torch.isfinite(loss):
            break
