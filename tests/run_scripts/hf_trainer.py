"""A Hugging Face ``Trainer`` fine-tuning script the way the examples write one, shrunk to run in
seconds on a CPU: a tiny GPT-2 built from a config (no download), a character-level "tokenizer", a
``Dataset`` of fixed-length blocks, ``TrainingArguments`` with ``max_grad_norm`` and gradient
accumulation, a callback that prints the logged loss and pre-clip ``grad_norm`` every step, and
``trainer.save_model``.

``--diverge``: a learning rate far too high and no clipping: the weights blow up and the loss
becomes non-finite.

``--nan-at K``: the loss of step K is NaN (a forward hook multiplies it by NaN).
"""

import argparse

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
    "of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season "
    "of Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair."
)


class CharBlocks(Dataset):
    def __init__(self, text, block_size):
        self.vocab = sorted(set(text))
        ids = torch.tensor([self.vocab.index(c) for c in text])
        n = (len(ids) - 1) // block_size
        self.blocks = ids[: n * block_size].view(n, block_size)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        block = self.blocks[i]
        return {"input_ids": block, "labels": block.clone()}


class PrintLogs(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            print(
                f"step {state.global_step} loss {logs['loss']:.4f} norm {logs['grad_norm']:.4f} "
                f"lr {logs['learning_rate']:.8e}"
            )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.05)
    parser.add_argument("--output-dir", default="hf-out")
    parser.add_argument("--diverge", action="store_true")
    parser.add_argument("--nan-at", type=int, default=None, help="a NaN loss at this step")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = CharBlocks(TEXT, block_size=32)
    config = GPT2Config(
        vocab_size=len(data.vocab),
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    lr, max_grad_norm = args.lr, args.max_grad_norm
    if args.diverge:
        lr, max_grad_norm = 1e4, 0.0
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=lr,
        max_grad_norm=max_grad_norm,
        warmup_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=data, callbacks=[PrintLogs()])
    trainer.remove_callback(PrinterCallback)
    if args.nan_at is not None:

        def nan_loss(module, inputs, out):
            if module.training and trainer.state.global_step == args.nan_at:
                out.loss = out.loss * float("nan")
            return out

        model.register_forward_hook(nan_loss)
    trainer.train()
    trainer.save_model(args.output_dir)
    if args.diverge and not all(torch.isfinite(p).all() for p in model.parameters()):
        raise SystemExit("the weights are not finite")


if __name__ == "__main__":
    main()
