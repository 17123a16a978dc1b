"""nn.MultiheadAttention with need_weights=True (the default) and a key_padding_mask that masks
every key of one sample: the attention weights of that sample are NaN. The NaN is born in the
softmax inside ``F.multi_head_attention_forward`` (a row of all -inf); the wrapper is only where
the user called it."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "module": "mha", "op": "softmax", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "every key masked", "fix": "leave at least one key unmasked"}


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 1)

    def forward(self, x, mask):
        y, attn = self.mha(x, x, x, key_padding_mask=mask)
        return self.out(y).squeeze(-1).mean(1)


torch.manual_seed(0)
model = Model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(6):
    x = torch.randn(3, 5, 16)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    if step == 3:
        mask[1] = True  # a sample whose keys are all padding
    loss = (model(x, mask) - 1).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
