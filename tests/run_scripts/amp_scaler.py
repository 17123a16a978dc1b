"""The AMP recipe of the PyTorch docs: autocast + GradScaler, scaler.step / scaler.update, on CPU
(bfloat16 autocast; GradScaler("cpu")); exits with code 3 when asked (to check the exit code is kept)."""

import sys

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
scaler = torch.amp.GradScaler("cpu")
x, y = torch.randn(128, 20), torch.randn(128, 1)
for epoch in range(30):
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    loss = nn.functional.mse_loss(out.float(), y)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
print(f"final loss {loss.item():.6f}")
if "--exit-3" in sys.argv:
    sys.exit(3)
