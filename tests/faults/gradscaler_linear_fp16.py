"""Mixed-precision regression with ``torch.autocast(float16)`` and a ``GradScaler``: the last shard
of the dataset holds raw 16-bit ADC counts (tens of thousands, never standardised), and the first Linear's
float16 output overflows 65504. The loss is inf from then on; the scaler skips those steps, so
the weights stay finite while the run learns nothing. In float32 the same layer is finite: the
replay must run the forward under the step's autocast state (and its backward from the scaled
gradient) to see it."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EXPECTED = {"phase": "forward", "module": "net.0", "op": "linear", "kind": "inf"}
VERDICT = {"id": "nonfinite_op", "cause": "above the dtype's max", "fix": "float32"}


class Regressor(nn.Module):
    def __init__(self, features=16, hidden=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


g = torch.Generator().manual_seed(3)
clean = torch.randn(96, 16, generator=g)
raw = torch.randint(30000, 60000, (32, 16), generator=g).float()  # the last shard: raw ADC counts
features = torch.cat([clean, raw])
targets = features[:, :4].mean(-1) / features[:, :4].abs().mean().clamp_min(1)
loader = DataLoader(TensorDataset(features, targets), batch_size=16, shuffle=False)

torch.manual_seed(0)
model = Regressor()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
scaler = torch.amp.GradScaler("cpu")
for step, (x, y) in enumerate(loader):
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        pred = model(x)
    loss = nn.functional.mse_loss(pred.float(), y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    print(step, loss.item(), scaler.get_scale())
