"""Self-attention with a hand-written padding mask: a sequence that is all padding masks every key
of its rows, and softmax over a row of -inf gives NaN."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "module": "attn", "op": "softmax", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "every key masked", "fix": "leave at least one key unmasked"}


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x, pad):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(pad[:, None, :], float("-inf"))
        return scores.softmax(dim=-1) @ v


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.attn = Attention(16)
        self.head = nn.Linear(16, 2)

    def forward(self, tokens, pad):
        return self.head(self.attn(self.emb(tokens), pad).mean(1))


torch.manual_seed(0)
model = Model()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(8):
    tokens = torch.randint(1, 50, (4, 6))
    lengths = torch.tensor([6, 4, 0 if step == 5 else 3, 5])  # an empty sequence at step 5
    pad = torch.arange(6)[None, :] >= lengths[:, None]
    labels = torch.randint(0, 2, (4,))
    loss = nn.functional.cross_entropy(model(tokens, pad), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(step, float(loss))
