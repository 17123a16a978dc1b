"""A product-category classifier (tabular features, 20 categories) with a configurable head.

``--head softmax`` ends the model in nn.Softmax and trains it with CrossEntropyLoss (which applies
log_softmax itself); ``--head sigmoid --loss bce`` puts a sigmoid before BCEWithLogitsLoss on a one-vs-rest
target; ``--head softmax --loss nll`` feeds probabilities to NLLLoss. ``--head logits`` is the usual model."""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, 16, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, 16, generator=g), y


class Classifier(nn.Module):
    def __init__(self, classes, head):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, classes))
        self.head = {"softmax": nn.Softmax(dim=1), "sigmoid": nn.Sigmoid(), "logits": nn.Identity()}[head]

    def forward(self, x):
        return self.head(self.body(x))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--head", choices=["softmax", "sigmoid", "logits"], default="softmax")
    parser.add_argument("--loss", choices=["ce", "bce", "nll"], default="ce")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    classes = 20
    x, y = make_data(4096, classes, 0)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = Classifier(classes, args.head)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if args.loss == "ce":
        criterion = nn.CrossEntropyLoss()
    elif args.loss == "bce":
        criterion = lambda out, y: nn.functional.binary_cross_entropy_with_logits(  # noqa: E731
            out, nn.functional.one_hot(y, classes).float()
        )
    else:
        criterion = nn.NLLLoss()
    for epoch in range(args.epochs):
        correct = 0
        for xb, yb in loader:
            optimizer.zero_grad()
            out = model(xb)
            loss = criterion(out, yb)
            loss.backward()
            optimizer.step()
            correct += (out.argmax(1) == yb).sum().item()
        print(f"epoch {epoch} loss {loss.item():.4f} accuracy {correct / len(x):.3f}")


if __name__ == "__main__":
    main()
