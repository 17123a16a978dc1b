"""A keyword spotter whose front end compresses spectrogram energies with a hand-written
``torch.autograd.Function``: the forward clamps before the log (finite on silence), but the
backward was written as ``grad / x`` without the same clamp. A clip with a silent stretch has
energies of exactly 0, and the backward returns inf there; the weights of the layers below go
inf/NaN. The forward and the loss are finite at that step."""

import torch
from torch import nn

EXPECTED = {"phase": "backward", "module": "frontend", "op": "LogCompress.backward", "kind": "-inf"}
VERDICT = {"id": "nonfinite_op", "cause": "LogCompress", "fix": "LogCompress.backward"}


class LogCompress(torch.autograd.Function):
    @staticmethod
    def forward(ctx, energy):
        ctx.save_for_backward(energy)
        return torch.log(energy.clamp_min(1e-5))

    @staticmethod
    def backward(ctx, grad):
        (energy,) = ctx.saved_tensors
        return grad / energy  # the clamp of the forward is missing here


class FrontEnd(nn.Module):
    def __init__(self, bins=20):
        super().__init__()
        self.filters = nn.Linear(bins, bins, bias=False)  # a learnable filterbank: no offset

    def forward(self, spec):
        return LogCompress.apply(self.filters(spec).pow(2))


class KeywordSpotter(nn.Module):
    def __init__(self, bins=20, keywords=4):
        super().__init__()
        self.frontend = FrontEnd(bins)
        self.rnn = nn.GRU(bins, 32, batch_first=True)
        self.out = nn.Linear(32, keywords)

    def forward(self, spec):
        h, _ = self.rnn(self.frontend(spec))
        return self.out(h[:, -1])


def clips(steps, batch=8, frames=30, bins=20):
    g = torch.Generator().manual_seed(11)
    for step in range(steps):
        spec = torch.rand(batch, frames, bins, generator=g)
        if step == 3:
            spec[5, 10:] = 0.0  # the microphone cut out: silence
        yield spec, torch.randint(0, 4, (batch,), generator=g)


torch.manual_seed(0)
model = KeywordSpotter()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step, (spec, words) in enumerate(clips(6)):
    loss = nn.functional.cross_entropy(model(spec), words)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(step, loss.item())
