"""A word-level language model trainer in the style of the classic PyTorch example: a corpus turned
into a dictionary and batchified columns, truncated backpropagation through time with detached
hidden states, a hand-written SGD update (``p.data.add_(p.grad, alpha=-lr)``, no optimizer),
``clip_grad_norm_``, the learning rate divided by 4 when validation stops improving, the best model
saved whole with ``torch.save(model, f)`` and loaded back with ``torch.load`` for the test.

``--diverge``: a learning rate far too high and no real clipping: the gradients explode and the
loss becomes NaN.

``--nan-at K``: batch K of the first epoch has every target padded (``ignore_index``): the mean
loss over zero tokens is 0/0, NaN, and the hand-written update writes it into the weights.
"""

import argparse
import math

import torch
import torch.nn as nn
import word_lm_model

SENTENCES = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog met on the road",
    "the road was long and the night was cold",
    "the dog ran and the cat sat",
    "a long night on a cold road",
    "the mat was on the log",
    "a dog and a cat ran on the long road",
]


class Dictionary:
    def __init__(self):
        self.word2idx = {}
        self.idx2word = []

    def add_word(self, word):
        if word not in self.word2idx:
            self.idx2word.append(word)
            self.word2idx[word] = len(self.idx2word) - 1
        return self.word2idx[word]

    def __len__(self):
        return len(self.idx2word)


class Corpus:
    def __init__(self, seed):
        self.dictionary = Dictionary()
        g = torch.Generator().manual_seed(seed)
        order = torch.randint(len(SENTENCES), (240,), generator=g).tolist()
        lines = [SENTENCES[i] for i in order]
        self.train = self.tokenize(lines[:180])
        self.valid = self.tokenize(lines[180:210])
        self.test = self.tokenize(lines[210:])

    def tokenize(self, lines):
        ids = []
        for line in lines:
            for word in [*line.split(), "<eos>"]:
                ids.append(self.dictionary.add_word(word))
        return torch.tensor(ids, dtype=torch.int64)


def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    return data.view(bsz, -1).t().contiguous()


def repackage_hidden(h):
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def get_batch(source, i, bptt):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].view(-1)


def main():
    parser = argparse.ArgumentParser(description="word-level LSTM language model")
    parser.add_argument("--model", type=str, default="LSTM")
    parser.add_argument("--emsize", type=int, default=32)
    parser.add_argument("--nhid", type=int, default=32)
    parser.add_argument("--nlayers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=20)
    parser.add_argument("--clip", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--bptt", type=int, default=12)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--seed", type=int, default=1111)
    parser.add_argument("--log-interval", type=int, default=4)
    parser.add_argument("--save", type=str, default="model.pt")
    parser.add_argument("--diverge", action="store_true")
    parser.add_argument("--nan-at", type=int, default=None, help="pad every target of this batch")
    args = parser.parse_args()
    if args.diverge:
        args.lr, args.clip = 3000.0, 1e9
    torch.manual_seed(args.seed)
    corpus = Corpus(args.seed)
    eval_batch_size = 4
    train_data = batchify(corpus.train, args.batch_size)
    val_data = batchify(corpus.valid, eval_batch_size)
    test_data = batchify(corpus.test, eval_batch_size)
    ntokens = len(corpus.dictionary)
    model = word_lm_model.RNNModel(
        args.model, ntokens, args.emsize, args.nhid, args.nlayers, args.dropout, args.tied
    )
    criterion = nn.NLLLoss()

    def evaluate(data_source):
        model.eval()
        total_loss = 0.0
        hidden = model.init_hidden(eval_batch_size)
        with torch.no_grad():
            for i in range(0, data_source.size(0) - 1, args.bptt):
                data, targets = get_batch(data_source, i, args.bptt)
                output, hidden = model(data, hidden)
                hidden = repackage_hidden(hidden)
                total_loss += len(data) * criterion(output, targets).item()
        return total_loss / (len(data_source) - 1)

    def train(epoch, lr):
        model.train()
        total_loss = 0.0
        hidden = model.init_hidden(args.batch_size)
        for batch, i in enumerate(range(0, train_data.size(0) - 1, args.bptt)):
            data, targets = get_batch(train_data, i, args.bptt)
            if epoch == 1 and batch == args.nan_at:
                targets = torch.full_like(targets, criterion.ignore_index)
            model.zero_grad()
            hidden = repackage_hidden(hidden)
            output, hidden = model(data, hidden)
            loss = criterion(output, targets)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
            total_loss += loss.item()
            print(f"| epoch {epoch:3d} | batch {batch:3d} | loss {loss.item():8.4f} | norm {norm.item():.6f}")
            if batch % args.log_interval == 0 and batch > 0:
                cur_loss = total_loss / args.log_interval
                print(
                    f"| epoch {epoch:3d} | lr {lr:05.2f} | loss {cur_loss:5.2f} | ppl {math.exp(min(cur_loss, 50)):8.2f}"
                )
                total_loss = 0.0

    lr = args.lr
    best_val_loss = None
    for epoch in range(1, args.epochs + 1):
        train(epoch, lr)
        val_loss = evaluate(val_data)
        print(f"| end of epoch {epoch:3d} | valid loss {val_loss:5.2f}")
        if not best_val_loss or val_loss < best_val_loss:
            with open(args.save, "wb") as f:
                torch.save(model, f)
            best_val_loss = val_loss
        else:
            lr /= 4.0
    with open(args.save, "rb") as f:
        model = torch.load(f, weights_only=False)
        model.rnn.flatten_parameters()
    test_loss = evaluate(test_data)
    print(f"| End of training | test loss {test_loss:5.2f}")


if __name__ == "__main__":
    main()
