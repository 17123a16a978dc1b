"""A normalisation layer whose mean and std are buffers computed once from the training table; one
row has a missing value (NaN), so the column's mean is NaN and so is every forward from step 0.
Each batch is finite: the NaN is in the model's state, not in the data it is given."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "tensor": "buffer", "kind": "nan"}
VERDICT = {
    "id": "nonfinite_op",
    "cause": "the buffer 'norm.mean', non-finite before the first step, already held nan",
    "fix": "statistics of a table with a missing value (torch.nanmean",
}


class Standardize(nn.Module):
    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", table.mean(0))
        self.register_buffer("std", table.std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Regressor(nn.Module):
    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.norm = Standardize(table)
        self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


torch.manual_seed(0)
table = torch.randn(500, 6) * 3 + 10
table[123, 4] = float("nan")  # a missing value in the table the statistics came from
clean = torch.nan_to_num(table, nan=10.0)  # the batches are cleaned; the statistics were not
targets = clean[:, :1] * 0.5
model = Regressor(table)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(6):
    i = torch.randint(0, 500, (32,))
    loss = nn.functional.mse_loss(model(clean[i]), targets[i])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
