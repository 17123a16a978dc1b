"""A linear warm-up + decay written as a LambdaLR, sized for 50 steps (a wrong count of steps per
epoch) but stepped every batch of a 1,000-step run: the factor ``(total - step) / (total - warmup)``
reaches 0 at step 50 and goes on below it. The learning rate is negative from step 51: SGD climbs
the loss, ever faster (loss 1.0 at step 50, 60 at step 65), until the logits overflow. No clipping
threshold and no lower (positive) rate changes that; sizing the schedule to the run does."""

import torch
import torch.nn.functional as F
from torch import nn

EXPECTED = {"cause": "explosion"}  # the climb ends in an overflow of the logits
VERDICT = {"id": "lr_schedule", "cause": "went negative at step 51", "fix": "len(train_loader)"}

torch.manual_seed(0)
centers = torch.randn(10, 32) * 0.35
y_all = torch.randint(0, 10, (1600,))
x_all = centers[y_all] + torch.randn(1600, 32)
model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
epochs, batches_per_epoch = 40, 25
total_steps = 50  # the bug: the run takes epochs * batches_per_epoch = 1000 steps
warmup = total_steps // 10


def factor(step: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return (total_steps - step) / max(1, total_steps - warmup)


scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
for epoch in range(epochs):
    for b in range(batches_per_epoch):
        i = torch.randint(0, 1600, (64,))
        loss = F.cross_entropy(model(x_all[i]), y_all[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
