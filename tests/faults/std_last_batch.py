"""Per-batch feature standardisation written by hand in the model, on a dataset of 65 rows with a
batch size of 8: the last batch of the epoch holds one row, whose unbiased standard deviation is
0 / 0 (n - 1 = 0). Every full batch trains fine."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "module": "scale", "op": "std", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "single value", "fix": "drop_last=True"}


class Standardize(nn.Module):
    def forward(self, x):
        return (x - x.mean(0)) / (x.std(0) + 1e-5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = Standardize()
        self.mlp = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.mlp(self.scale(x))


torch.manual_seed(0)
rows = torch.randn(65, 6) * torch.tensor([1.0, 10.0, 100.0, 0.1, 5.0, 50.0])
prices = rows[:, :1] * 0.3 + rows[:, 1:2] * 0.01
data = torch.utils.data.TensorDataset(rows, prices)
loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
model = Net()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for x, y in loader:
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
