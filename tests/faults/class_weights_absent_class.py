"""A tabular classifier with inverse-frequency class weights, ``1 / counts`` normalised by their sum, computed
on a time-ordered training split in which the rarest class has no sample yet: its weight is 1/0 = inf, and
inf / inf makes every weight NaN. The features and the labels are fine; the loss's ``weight=`` is not."""

import torch
from torch import nn

EXPECTED = {"phase": "data", "tensor": "class weights", "kind": "nan"}
VERDICT = {"id": "bad_data", "cause": "class weights", "fix": "clamp_min(1)"}

torch.manual_seed(0)
n_classes = 5
features = torch.randn(512, 12)
labels = torch.randint(0, n_classes - 1, (512,))  # class 4 only appears after the split date
counts = torch.bincount(labels, minlength=n_classes).float()
weights = 1.0 / counts
weights = weights / weights.sum()

model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, n_classes))
criterion = nn.CrossEntropyLoss(weight=weights)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for epoch in range(2):
    for i in range(0, 512, 128):
        x, y = features[i : i + 128], labels[i : i + 128]
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
