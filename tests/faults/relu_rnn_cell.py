"""A hand-written Elman RNN cell with ReLU (no gating), unrolled over 60 time steps to count ones in
a bit stream, trained with SGD at learning rate 0.05 and no clipping. Every value is float32 and
every op is ordinary: the recurrent weights grow a little each update until the unrolled product
overflows — an explosion over steps, not one op at a numerical edge."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "module": "rec", "op": "linear", "kind": "-inf"}
VERDICT = {"id": "explosion", "cause": "float32", "fix": "Lower the learning rate"}


class ReLURNN(nn.Module):
    def __init__(self, hidden=48):
        super().__init__()
        self.inp = nn.Linear(1, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)
        nn.init.eye_(self.rec.weight)  # the identity init of IRNNs (Le et al., 2015)

    def forward(self, bits):
        h = torch.zeros(bits.shape[0], self.rec.out_features)
        for t in range(bits.shape[1]):
            h = torch.relu(self.inp(bits[:, t : t + 1]) + self.rec(h))
        return self.out(h)


torch.manual_seed(0)
model = ReLURNN()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range(80):
    bits = (torch.rand(32, 60) < 0.5).float()
    count = bits.sum(1, keepdim=True)
    loss = nn.functional.mse_loss(model(bits), count)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
