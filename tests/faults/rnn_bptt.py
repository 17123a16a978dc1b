"""A vanilla RNN trained by backpropagation through time on long sequences with SGD at learning
rate 1 and no clipping: the gradients grow over steps until they overflow."""

import torch
from torch import nn

EXPECTED = {"cause": "explosion"}
VERDICT = {"id": "explosion", "cause": "Gradient explosion", "fix": "learning rate"}


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(4, 64, nonlinearity="relu", batch_first=True)
        self.out = nn.Linear(64, 1)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


torch.manual_seed(0)
model = Tagger()
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
for step in range(60):
    x = torch.randn(16, 100, 4)
    y = x[:, :, 0].sum(1, keepdim=True)
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
