"""A tiny causal transformer language model trained with plain SGD at a learning rate of 100 (a typo
for 1e-2 in a config): one update moves the weights far past their own size, the attention logits
explode and the backward of scaled_dot_product_attention makes NaN. The causal mask leaves every
query at least one key: no row is fully masked, the learning rate is the fault."""

import torch
import torch.nn.functional as F
from torch import nn

EXPECTED = {"cause": "explosion"}
VERDICT = {"id": "explosion", "cause": "Gradient explosion", "fix": "learning rate"}


class CausalSelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TinyGPT(nn.Module):
    def __init__(self, vocab=50, d=32, heads=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.attn = CausalSelfAttention(d, heads)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        h = self.tok(idx)
        h = h + self.attn(h)
        return self.head(self.norm(h))


torch.manual_seed(0)
text = torch.randint(0, 50, (2000,))
model = TinyGPT()
optimizer = torch.optim.SGD(model.parameters(), lr=100.0)
for step in range(20):
    starts = torch.randint(0, len(text) - 17, (8,))
    x = torch.stack([text[s : s + 16] for s in starts])
    y = torch.stack([text[s + 1 : s + 17] for s in starts])
    loss = F.cross_entropy(model(x).reshape(-1, 50), y.reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
