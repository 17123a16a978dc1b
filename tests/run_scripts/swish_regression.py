"""Tabular regression with a hand-written "memory-efficient Swish" (the EfficientNet trick: a custom
autograd Function that saves only its input and recomputes the sigmoid in backward).

``--bug chain``: its backward returns the local derivative and forgets to multiply it by grad_output
(the chain rule), so the layers below follow a gradient that does not come from the loss: the loss sits
at the targets' variance. ``--bug none``: the correct backward. ``--clamp C``: the body's features pass
a gradient clamp (a custom Function whose backward is deliberately not linear) on their way to the head.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SwishFn(torch.autograd.Function):
    forget_chain_rule = False

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        local = s * (1 + x * (1 - s))
        if SwishFn.forget_chain_rule:
            return local
        return grad_output * local


class ClampGrad(torch.autograd.Function):
    bound = 0.0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output.clamp(-ClampGrad.bound, ClampGrad.bound)


class Swish(nn.Module):
    def forward(self, x):
        return SwishFn.apply(x)


class Regressor(nn.Module):
    def __init__(self, d_in, width=64, depth=3):
        super().__init__()
        layers, d = [], d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), Swish()]
            d = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        h = self.body(x)
        return self.head(ClampGrad.apply(h) if ClampGrad.bound > 0 else h)


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 8, generator=g)
    y = 10 * torch.sin(torch.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2 + 10 * x[:, 3] + 5 * x[:, 4]
    return (x - 0.5) / 0.29, ((y - y.mean()) / y.std()).unsqueeze(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bug", choices=["chain", "none"], default="chain")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clamp", type=float, default=0.0)
    args = p.parse_args()
    SwishFn.forget_chain_rule = args.bug == "chain"
    ClampGrad.bound = args.clamp
    torch.manual_seed(0)
    x, y = make_data(2048, 0)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = Regressor(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.MSELoss()
    for epoch in range(args.epochs):
        total = 0.0
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(xb)
        print(f"epoch {epoch} mse {total / len(x):.4f}")


if __name__ == "__main__":
    main()
