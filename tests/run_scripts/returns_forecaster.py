"""Next-day return forecasting from tabular features: heavy-tailed targets, SGD with momentum and
"gradient clipping at 1.0". ``--clip-where before`` (the default) calls clip_grad_norm_ right after
zero_grad(), before loss.backward(): it clips nothing, and the outlier batches explode the run.
``--clip-where after`` is the usual order."""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Forecaster(nn.Module):
    def __init__(self, d_in, hidden=64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x):
        return self.net(x).squeeze(-1)


def make_data(n=8192, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    signal = 0.5 * x[:, 0] - 0.3 * x[:, 1] * x[:, 2]
    u = torch.rand(n, generator=g)
    noise = torch.sign(u - 0.5) * ((1 - (2 * (u - 0.5)).abs()).clamp_min(1e-6) ** -0.7 - 1)  # heavy tails
    return TensorDataset(x, signal + noise)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--clip-where", choices=["before", "after"], default="before")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = make_data()
    loader = DataLoader(data, batch_size=64, shuffle=True)
    model = Forecaster(data.tensors[0].shape[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    steps = 0
    for epoch in range(args.epochs):
        total = 0.0
        for x, y in loader:
            optimizer.zero_grad()
            if args.clip_where == "before":
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if args.clip_where == "after":
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            steps += 1
            total += loss.item()
        print(f"epoch {epoch} mean loss {total / len(loader):.4f}")
    print(f"optimizer steps {steps}")


if __name__ == "__main__":
    main()
