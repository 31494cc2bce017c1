"""Masked-language-model pretraining of an encoder on Python source, then a small fine-tune.

    python examples/train_mlm.py                     # CPU, a few minutes
    python examples/train_mlm.py --device cuda --d-model 256 --layers 6 --steps 5000

1. Pretraining: fastattn.models.Encoder (bidirectional flash attention) learns to fill in
   masked characters of the standard library's source (the same text as train_gpt.py, read as
   bytes): 15% of the positions are chosen, 80% of those replaced by a mask token, 10% by a
   random byte, 10% left alone (BERT's recipe); the loss is on the chosen positions only.
   Reported: the masked-character accuracy on validation files.
2. Transfer: a downstream task with few labels: is this window of code intact, or does it have
   typos (--typos characters changed to other random printable ones)? The encoder plus a new
   linear head on mean-pooled states is fine-tuned on --ft-examples labelled windows from the
   training files, once starting from the pretrained weights and once from scratch (same
   initial weights, steps and data), and both are tested on windows of the validation files.
   Pretraining shows up as the accuracy gap.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import fastattn
from fastattn.models import Encoder, EncoderConfig
from fastattn.nn import Flash, Linear, Performer

import training  # examples/training.py: the loop pieces the examples share (not part of fastattn)
from train_gpt import stdlib_text  # the same text, read the same way

PAD, MASK = 256, 257  # bytes are 0..255; two extra ids
VOCAB = 258


def windows(data, batch: int, seq_len: int, generator):
    start = torch.randint(len(data) - seq_len, (batch,), generator=generator)
    return data[start[:, None] + torch.arange(seq_len)].long()  # (B, L)


def mask_tokens(x, generator, rate: float = 0.15):
    """BERT masking -> (inputs, labels with -100 where nothing is predicted)."""
    chosen = torch.rand(x.shape, generator=generator) < rate
    labels = torch.where(chosen, x, torch.full_like(x, -100))
    roll = torch.rand(x.shape, generator=generator)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(x, MASK), x)
    random_bytes = torch.randint(256, x.shape, generator=generator)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_bytes, inputs)
    return inputs, labels


def corrupted(data, n: int, seq_len: int, typos: int, generator):
    """-> windows (n, L) and labels (n,): half intact (0), half with ``typos`` positions changed
    to a different random printable character (1)."""
    x = windows(data, n, seq_len, generator)
    y = torch.randint(2, (n,), generator=generator)
    for i in torch.nonzero(y).flatten().tolist():
        pos = torch.randperm(seq_len, generator=generator)[:typos]
        shift = torch.randint(1, 95, (typos,), generator=generator)
        # printable ASCII is 32..126: move each chosen character by 1..94 within that range
        x[i, pos] = (x[i, pos].clamp(32, 126) - 32 + shift) % 95 + 32
    return x, y


class Classifier(nn.Module):
    """Encoder states, mean over positions, a linear layer -> 2 logits."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.d_model, 2)

    def forward(self, x):
        return self.head(self.encoder.encode(x).mean(1))  # (B, L, E) -> (B, E) -> (B, 2)


def train_loop(name, model, batches, loss_fn, args, steps, lr, device, tokens_per_step):
    opt = training.make_optimizer(model, lr, weight_decay=0.01)
    trainer = training.Trainer(model, opt, training.make_scheduler(opt, max(1, steps // 10), steps),
                               grad_clip=args.grad_clip, precision=args.precision)
    progress = training.Progress(steps, max(1, steps // 10), name=name)
    losses = []
    for step in range(1, steps + 1):
        loss, _ = trainer.step([next(batches) for _ in range(args.accum)], loss_fn)
        losses.append(loss)
        progress.update(step, loss, tokens=tokens_per_step * args.accum, lr=trainer.lr)
    return losses, progress


@torch.no_grad()
def mlm_accuracy(model, val, args, device) -> float:
    model.eval()
    g = torch.Generator().manual_seed(99)
    hit = total = 0
    for _ in range(args.val_batches):
        inputs, labels = mask_tokens(windows(val, args.batch, args.seq_len, g), g)
        logits, _ = model(inputs.to(device))
        keep = labels != -100
        hit += int((logits.argmax(-1).cpu()[keep] == labels[keep]).sum())
        total += int(keep.sum())
    model.train()
    return hit / max(total, 1)


@torch.no_grad()
def classify_accuracy(model, x, y, device) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 256].to(device)).argmax(-1).cpu() for i in range(0, len(y), 256)])
    model.train()
    return float((pred == y).float().mean())


def finetune(name, encoder, args, ft_x, ft_y, test_x, test_y, device) -> tuple[float, list]:
    torch.manual_seed(args.seed + 1)  # the same head initialisation for both runs
    model = Classifier(encoder).to(device)
    g = torch.Generator().manual_seed(args.seed + 2)  # the same batches for both runs

    def batches():
        while True:
            idx = torch.randint(len(ft_y), (args.ft_batch,), generator=g)
            yield ft_x[idx], ft_y[idx]

    def loss_fn(batch):
        x, y = (t.to(device) for t in batch)
        return training.cross_entropy(model(x), y), len(y)

    losses, _ = train_loop(name, model, batches(), loss_fn, args, args.ft_steps, args.ft_lr, device,
                           args.ft_batch * args.seq_len)
    return classify_accuracy(model, test_x, test_y, device), losses


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    training.add_common_args(p, attentions=("flash", "linear", "performer"), default_steps=400,
                             lr=2e-3)
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--d-model", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--val-batches", type=int, default=20)
    p.add_argument("--ft-examples", type=int, default=256, help="labelled windows for the fine-tune")
    p.add_argument("--ft-steps", type=int, default=150)
    p.add_argument("--ft-batch", type=int, default=32)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--typos", type=int, default=3, help="characters changed in a corrupted window")
    p.add_argument("--test-examples", type=int, default=1000)
    return training.parse_args(p, argv, tiny=dict(max_bytes=200_000, seq_len=32, batch=8, d_model=32, layers=1,
                                                  heads=2, val_batches=2, ft_examples=32, ft_steps=3, ft_batch=8,
                                                  test_examples=32))


def main(argv=None) -> dict:
    args = parse(argv)
    device = training.setup(args)
    train, val = stdlib_text(args.max_bytes)
    attention = {"flash": Flash(), "linear": Linear(), "performer": Performer(64)}[args.attention]
    cfg = EncoderConfig(vocab_size=VOCAB, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                        positional="learned", max_seq_len=args.seq_len, attention=attention,
                        pad_token_id=PAD, mask_token_id=MASK)
    encoder = Encoder(cfg).to(device)
    scratch = copy.deepcopy(encoder)  # the same initial weights, never pretrained
    print(f"Encoder: {training.count_parameters(encoder):,} parameters, attention={args.attention}, "
          f"backend={args.backend}, device={device}; {len(train):,} train / {len(val):,} validation bytes")
    g = torch.Generator().manual_seed(args.seed)

    def mlm_batches():
        while True:
            yield mask_tokens(windows(train, args.batch, args.seq_len, g), g)

    def mlm_loss(batch):
        inputs, labels = (t.to(device) for t in batch)
        logits, _ = encoder(inputs)
        return training.cross_entropy(logits, labels), int((labels != -100).sum())

    with fastattn.use_backend(args.backend):
        start = time.perf_counter()
        losses, progress = train_loop("mlm", encoder, mlm_batches(), mlm_loss, args, args.steps, args.lr, device,
                                      args.batch * args.seq_len)
        pretrain_s = time.perf_counter() - start
        acc = mlm_accuracy(encoder, val, args, device)
        print(f"pretraining: masked-character accuracy on validation files {acc:.4f}, "
              f"{progress.tokens_per_second:,.0f} tokens/s, {pretrain_s:.0f}s")

        dg = torch.Generator().manual_seed(args.seed + 3)
        ft_x, ft_y = corrupted(train, args.ft_examples, args.seq_len, args.typos, dg)
        test_x, test_y = corrupted(val, args.test_examples, args.seq_len, args.typos, dg)
        t0 = time.perf_counter()
        pre_acc, _ = finetune("finetune (pretrained)", encoder, args, ft_x, ft_y, test_x, test_y, device)
        scratch_acc, _ = finetune("finetune (scratch)", scratch, args, ft_x, ft_y, test_x, test_y, device)
        ft_s = time.perf_counter() - t0
    print(f"result: typo detection with {args.ft_examples} labelled windows, {args.ft_steps} steps: "
          f"pretrained {pre_acc:.4f} vs from scratch {scratch_acc:.4f} on {args.test_examples} held-out windows "
          f"(chance 0.5); pretraining {pretrain_s:.0f}s, fine-tunes {ft_s:.0f}s")
    return dict(losses=losses, mlm_accuracy=acc, pretrained=pre_acc, scratch=scratch_acc, pretrain_s=pretrain_s)


if __name__ == "__main__":
    main()
