"""A Lightning classifier the way the Lightning docs and bug-report templates write one: a
``LightningModule`` with ``training_step`` / ``validation_step`` / ``configure_optimizers`` (Adam and a
StepLR scheduler), ``DataLoader``s over a synthetic two-spirals set, ``Trainer(gradient_clip_val=...)``,
the total gradient norm printed from ``on_before_optimizer_step`` (Lightning's ``grad_norm`` utility,
before Lightning clips), the losses printed by a small callback, and ``trainer.save_checkpoint``.

``--diverge``: a hand-written log-softmax (``torch.log(torch.softmax(...))``) and a learning rate far
too high without clipping: the logits grow until a probability underflows to 0, ``log(0)`` is -inf
and the loss and gradients become non-finite.
"""

import argparse
import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def two_spirals(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 3 * math.pi
    label = torch.randint(0, 2, (n,), generator=g)
    sign = label.float() * 2 - 1
    x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1) / 5
    return x + 0.05 * torch.randn(n, 2, generator=g), label


class SpiralNet(L.LightningModule):
    def __init__(self, hidden=64, lr=3e-3, naive_log_softmax=False):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(2, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        logits = self(x)
        if self.hparams.naive_log_softmax:
            logp = torch.log(torch.softmax(logits * 50, dim=-1))
            return F.nll_loss(logp, y)
        return F.cross_entropy(logits, y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def on_before_optimizer_step(self, optimizer):
        norms = grad_norm(self, norm_type=2)
        print(f"step {self.global_step} norm {norms['grad_2.0_norm_total'].item():.4f}")

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class PrintLosses(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        print(f"epoch {trainer.current_epoch} batch {batch_idx} loss {outputs['loss'].item():.6f}")

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            print(f"epoch {trainer.current_epoch} val_loss {trainer.callback_metrics['val_loss'].item():.6f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--clip", type=float, default=0.46)
    parser.add_argument("--clip-algorithm", choices=["norm", "value"], default="norm")
    parser.add_argument("--csv-logs", default=None, help="log the metrics with a CSVLogger into this folder")
    parser.add_argument("--diverge", action="store_true")
    args = parser.parse_args()

    L.seed_everything(7, verbose=False)
    x, y = two_spirals(512, seed=0)
    train = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=128)

    lr, clip = args.lr, args.clip
    if args.diverge:
        lr, clip = 5.0, None
    model = SpiralNet(lr=lr, naive_log_softmax=args.diverge)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=clip,
        gradient_clip_algorithm=args.clip_algorithm,
        logger=CSVLogger(args.csv_logs, name="spiral") if args.csv_logs else False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PrintLosses()],
    )
    trainer.fit(model, train, val)
    trainer.save_checkpoint("spiral.ckpt")
    if args.diverge and not all(torch.isfinite(p).all() for p in model.parameters()):
        raise SystemExit("the weights are not finite")


if __name__ == "__main__":
    main()
