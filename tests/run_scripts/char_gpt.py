"""A character-level GPT trainer in the style of the popular minimal-GPT repositories: a config read from
the command line, a causal self-attention transformer with weight tying, AdamW with decay / no-decay
groups, a warm-up + cosine learning rate set by hand every iteration, gradient accumulation, a
GradScaler (a no-op unless ``--amp``), ``clip_grad_norm_``, periodic evaluation, a checkpoint
(``ckpt.pt``: state dicts) saved and resumed with ``--init-from resume``, and ``--compile``.

``--diverge``: a learning rate far too high for AdamW, without clipping: within a few dozen
iterations the loss climbs by orders of magnitude while every value stays finite (a divergence
without NaN, which ``gradguard diagnose`` reports as an error); left running, the weights keep
growing.
"""

import argparse
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

TEXT = """\
First Citizen: Before we proceed any further, hear me speak.
All: Speak, speak.
First Citizen: You are all resolved rather to die than to famish?
All: Resolved. resolved.
First Citizen: First, you know Caius Marcius is chief enemy to the people.
All: We know't, we know't.
First Citizen: Let us kill him, and we'll have corn at our own price. Is't a verdict?
All: No more talking on't; let it be done: away, away!
Second Citizen: One word, good citizens.
First Citizen: We are accounted poor citizens, the patricians good. What authority surfeits on would
relieve us: if they would yield us but the superfluity, while it were wholesome, we might guess they
relieved us humanely; but they think we are too dear: the leanness that afflicts us, the object of our
misery, is as an inventory to particularise their abundance; our sufferance is a gain to them.
"""


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head = n_head
        self.dropout = dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd, dropout):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, dropout):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                drop=nn.Dropout(dropout),
                h=nn.ModuleList([Block(n_embd, n_head, dropout) for _ in range(n_layer)]),
                ln_f=nn.LayerNorm(n_embd),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        params = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def get_args():
    p = argparse.ArgumentParser(description="train a tiny character-level GPT")
    p.add_argument("--out-dir", default="out-char")
    p.add_argument("--init-from", default="scratch", choices=["scratch", "resume"])
    p.add_argument("--max-iters", type=int, default=24)
    p.add_argument("--eval-interval", type=int, default=8)
    p.add_argument("--eval-iters", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--gradient-accumulation-steps", type=int, default=2)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=3e-4)
    p.add_argument("--warmup-iters", type=int, default=4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast and a GradScaler")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--diverge", action="store_true", help="a learning rate far too high, no clipping")
    p.add_argument("--exit-code", type=int, default=0, help="exit with this code at the end")
    args = p.parse_args()
    if args.diverge:
        args.learning_rate = args.min_lr = 30.0
        args.grad_clip = 0.0
        args.weight_decay = 0.0
    return args


def main():
    args = get_args()
    torch.manual_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    chars = sorted(set(TEXT))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in TEXT], dtype=torch.long)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}

    def get_batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - args.block_size - 1, (args.batch_size,))
        x = torch.stack([d[i : i + args.block_size] for i in ix])
        y = torch.stack([d[i + 1 : i + 1 + args.block_size] for i in ix])
        return x, y

    model_args = dict(
        vocab_size=len(chars),
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=args.dropout,
    )
    iter_num, best_val_loss = 0, 1e9
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    checkpoint = None
    if args.init_from == "resume":
        checkpoint = torch.load(ckpt_path, map_location="cpu")
        model_args = checkpoint["model_args"]
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        torch.set_rng_state(checkpoint["rng_state"])
        print(f"resuming from iteration {iter_num}")
    model = GPT(**model_args)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    optimizer = model.configure_optimizers(args.weight_decay, args.learning_rate, (0.9, 0.95))
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    checkpoint = None
    scaler = torch.amp.GradScaler("cpu", enabled=args.amp)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp)
    raw_model = model
    if args.compile:
        model = torch.compile(model, backend=args.compile_backend)

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(args.eval_iters)
            for k in range(args.eval_iters):
                X, Y = get_batch(split)
                with ctx:
                    _, loss = model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean()
        model.train()
        return out

    def get_lr(it):
        if it < args.warmup_iters:
            return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
        ratio = (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio)))
        return args.min_lr + coeff * (args.learning_rate - args.min_lr)

    X, Y = get_batch("train")
    while iter_num < args.max_iters:
        lr = get_lr(iter_num)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        if iter_num % args.eval_interval == 0 and iter_num > 0:
            losses = estimate_loss()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if losses["val"] < best_val_loss:
                best_val_loss = float(losses["val"])
                checkpoint = {
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "model_args": model_args,
                    "iter_num": iter_num,
                    "best_val_loss": best_val_loss,
                    "rng_state": torch.get_rng_state(),
                }
                print(f"saving checkpoint to {args.out_dir}")
                torch.save(checkpoint, ckpt_path)
        for micro_step in range(args.gradient_accumulation_steps):
            with ctx:
                logits, loss = model(X, Y)
                loss = loss / args.gradient_accumulation_steps
            X, Y = get_batch("train")
            scaler.scale(loss).backward()
        norm = None
        if args.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lossf = loss.item() * args.gradient_accumulation_steps
        shown = f", norm {norm.item():.6f}" if norm is not None else ""
        print(f"iter {iter_num}: loss {lossf:.4f}{shown}, lr {lr:.3e}")
        iter_num += 1
    torch.save(raw_model.state_dict(), os.path.join(args.out_dir, "final.pt"))
    print(f"done at iteration {iter_num}")
    raise SystemExit(args.exit_code)


if __name__ == "__main__":
    main()
