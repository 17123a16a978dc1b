"""A digit classifier on raw 8-bit pixel values (0–255) with the loss written by hand as
``-log(softmax(logits))``: the logits are large from the first step, the softmax of the wrong classes
underflows to exactly 0 in float32, and the log of it is -inf. Clamping the probability keeps the loss
finite but leaves those classes without a gradient; ``log_softmax`` computes it in log space."""

import torch
from torch import nn

EXPECTED = {"phase": "loss", "op": "log", "kind": "-inf"}
VERDICT = {
    "id": "nonfinite_op",
    "cause": "softmax (or sigmoid) output that underflowed",
    "fix": "F.log_softmax",
}


def hand_written_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, dim=1)
    return -torch.log(probs).gather(1, target.unsqueeze(1)).mean()


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
for step in range(10):
    pixels = torch.randint(0, 256, (32, 64)).float()  # raw grey levels, not scaled to [0, 1]
    labels = torch.randint(0, 10, (32,))
    loss = hand_written_nll(model(pixels), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
