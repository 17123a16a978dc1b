"""A stateful GRU over a stream of sensor counts, trained with truncated backpropagation: the hidden
state is carried from one chunk to the next (``h = h.detach()``). The model log-transforms the counts;
zero counts at step 3 make ``log`` -inf there, the state goes NaN, and every later chunk starts
from that NaN state. The first fault is the ``log`` at step 3; the steps after it are not bad data."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "module": "", "op": "log", "kind": "-inf"}
VERDICT = {"id": "nonfinite_op", "cause": "log of 0", "fix": "clamp the input"}


class StreamModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, counts, h):
        out, h = self.rnn(torch.log(counts), h)
        return self.head(out), h


torch.manual_seed(0)
stream = torch.randint(1, 50, (2, 8 * 20, 4)).float()
stream[1, 3 * 20 + 7, 1:3] = 0.0  # two sensors that reported nothing in chunk 3
model = StreamModel()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
h = None
for step in range(7):
    chunk = stream[:, step * 20 : (step + 1) * 20]
    pred, h = model(chunk[:, :-1], h)
    loss = nn.functional.mse_loss(pred, torch.log1p(chunk[:, 1:]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    h = h.detach()
