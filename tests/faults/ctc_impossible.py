"""CTC with a target longer than the input can align to: the loss is inf (zero_infinity=False)."""

import torch
from torch import nn

EXPECTED = {"phase": "loss", "module": None, "op": "ctc_loss", "kind": "inf"}
VERDICT = {"id": "nonfinite_op", "cause": "cannot be aligned", "fix": "zero_infinity=True"}

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 6))
ctc = nn.CTCLoss(blank=0)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(6):
    frames = torch.randn(10, 2, 12)  # (time, batch, features)
    log_probs = model(frames).log_softmax(-1)
    target_len = 14 if step == 2 else 4  # a transcript longer than the audio at step 2
    targets = torch.randint(1, 6, (2, target_len))
    loss = ctc(log_probs, targets, torch.full((2,), 10), torch.full((2,), target_len))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
