"""Pretrain an encoder (BatchNorm inside) with SGD, then fit a linear probe on its frozen features
with Adam: a corrupt sample (NaN) in the 12th pretraining batch makes that step non-finite. The
guard skips the step and keeps the weights, but the forward already wrote NaN into BatchNorm's
running statistics; in eval mode the encoder's features are NaN for every probe batch. The probe's
"bad data" is the encoder's poisoned buffers, not its preprocessing."""

import torch
from torch import nn

EXPECTED = {"phase": "data", "kind": "nan"}
VERDICT = {
    "id": "bad_data",
    "cause": "Another optimizer's model read them later",
    "fix": "Restore those buffers",
}


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


torch.manual_seed(0)
encoder = Encoder()
pretrain = torch.optim.SGD(encoder.parameters(), lr=0.05, momentum=0.9)
for step in range(30):
    x = torch.randn(64, 16)
    if step == 12:
        x[3, 5] = float("nan")  # one corrupt sample
    noisy = x + 0.1 * torch.randn_like(x)
    loss = nn.functional.mse_loss(encoder(noisy), encoder(x).detach())  # a toy consistency objective
    pretrain.zero_grad()
    loss.backward()
    pretrain.step()

encoder.eval()
for p in encoder.parameters():
    p.requires_grad_(False)
model = nn.Linear(8, 3)  # the probe
probe_opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for step in range(8):
    x = torch.randn(64, 16)
    y = torch.randint(0, 3, (64,))
    with torch.no_grad():
        features = encoder(x)
    loss = nn.functional.cross_entropy(model(features), y)
    probe_opt.zero_grad()
    loss.backward()
    probe_opt.step()
    print(f"probe step {step} loss {loss.item():.4f}")
