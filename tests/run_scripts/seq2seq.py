"""A seq2seq loop in the style of the PyTorch NLP tutorial: a GRU encoder and decoder with teacher
forcing, two optimizers, gradient clipping by the script itself; the task is reversing digit strings."""

import random
import sys

import torch
from torch import nn

random.seed(0)
torch.manual_seed(0)
VOCAB, SOS, HIDDEN = 12, 10, 32


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, HIDDEN)
        self.gru = nn.GRU(HIDDEN, HIDDEN, batch_first=True)

    def forward(self, x):
        return self.gru(self.embedding(x))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, HIDDEN)
        self.gru = nn.GRU(HIDDEN, HIDDEN, batch_first=True)
        self.out = nn.Linear(HIDDEN, VOCAB)

    def forward(self, y_in, hidden):
        out, hidden = self.gru(self.embedding(y_in), hidden)
        return self.out(out), hidden


encoder, decoder = Encoder(), Decoder()
enc_opt = torch.optim.Adam(encoder.parameters(), lr=3e-3)
dec_opt = torch.optim.Adam(decoder.parameters(), lr=3e-3)
criterion = nn.CrossEntropyLoss()
n_iters = int(sys.argv[1]) if len(sys.argv) > 1 else 60
for it in range(n_iters):
    x = torch.randint(0, 10, (16, 6))
    y = x.flip(1)
    y_in = torch.cat([torch.full((16, 1), SOS), y[:, :-1]], dim=1)  # teacher forcing
    enc_opt.zero_grad()
    dec_opt.zero_grad()
    _, hidden = encoder(x)
    logits, _ = decoder(y_in, hidden)
    loss = criterion(logits.reshape(-1, VOCAB), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
    torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
    enc_opt.step()
    dec_opt.step()
    if it % 20 == 0:
        print(f"iter {it} loss {loss.item():.4f}")
print(f"final loss {loss.item():.6f}")
