"""Document classification with attention pooling: a learned query attends over the token
embeddings through ``nn.MultiheadAttention`` (dropout on the attention weights, weights returned
for inspection), with a key padding mask built from the lengths. A document that is empty after
preprocessing (length 0) masks every key: the softmax inside the attention gives NaN for it,
and the whole batch's loss and gradients go NaN."""

import torch
from torch import nn
from torch.utils.data import DataLoader

EXPECTED = {"phase": "forward", "module": "pool.attn", "op": "softmax", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "every key masked", "fix": "leave at least one key unmasked"}


class AttentionPool(nn.Module):
    def __init__(self, d, heads=4):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.attn = nn.MultiheadAttention(d, heads, dropout=0.1, batch_first=True)

    def forward(self, tokens, padding):
        q = self.query.expand(tokens.shape[0], -1, -1)
        pooled, weights = self.attn(q, tokens, tokens, key_padding_mask=padding)
        return pooled.squeeze(1)


class DocClassifier(nn.Module):
    def __init__(self, vocab=200, d=32, classes=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.pool = AttentionPool(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.pool(self.embed(ids), ids == 0))


def collate(docs):
    longest = max(1, max(len(d) for d, _ in docs))
    ids = torch.zeros(len(docs), longest, dtype=torch.long)
    for i, (d, _) in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d, dtype=torch.long)
    return ids, torch.tensor([label for _, label in docs])


g = torch.Generator().manual_seed(2)
corpus = []
for i in range(48):
    length = int(torch.randint(3, 12, (1,), generator=g))
    if i == 29:
        length = 0  # every token was a stop word: nothing left after preprocessing
    corpus.append((torch.randint(1, 200, (length,), generator=g).tolist(), i % 5))

torch.manual_seed(0)
model = DocClassifier()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
for step, (ids, labels) in enumerate(DataLoader(corpus, batch_size=8, collate_fn=collate)):
    loss = nn.functional.cross_entropy(model(ids), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(step, loss.item())
