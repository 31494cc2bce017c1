"""Long-range retrieval with exact, block-sparse and linear attention, side by side.

The task: a sequence of random filler tokens holds a few key-value pairs ("k v") at random
positions in its first quarter; it ends with a QUERY marker and one of those keys. The model
must output the key's value at the last position, i.e. read a token about L * 3/4 positions
back. Every model is the same small bidirectional encoder (fastattn.models.Encoder, an MLM head
read at the last position); only the attention of its layers changes:

    flash      exact softmax attention (fastattn.flash_attention)
    sparse     block-sparse local window + global blocks (fastattn.sparse.longformer, the last
               block global, so the query can see the whole sequence)
    local      block-sparse local window only: the control, it cannot see the pairs
    linear     linear attention, elu+1 features (fastattn.linear_attention)
    performer  FAVOR+ random features (fastattn.performer_attention)

    python examples/long_context.py                       # all of them, one after another
    python examples/long_context.py --attention sparse --seq-len 4096 --steps 2000   # a GPU

Each attention trains in its own process so the memory column is that run's own: the peak
CUDA memory allocated on a GPU, on CPU the growth of the process's peak resident set size
over its size before training (rough: it includes the allocator's caching). On CPU with
--backend auto the kernels do not run (they need CUDA or TRITON_INTERPRET=1): the plain
PyTorch fallbacks do, so CPU times compare those, not the Triton kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import fastattn
from fastattn import sparse, training
from fastattn.models import Encoder, EncoderConfig

ATTENTIONS = ("flash", "sparse", "local", "linear", "performer")
PAD, MASK, QUERY = 0, 1, 2  # special tokens; keys, values and filler follow


class Vocab:
    def __init__(self, n_keys: int, n_values: int, n_filler: int):
        self.keys = torch.arange(3, 3 + n_keys)
        self.values = torch.arange(3 + n_keys, 3 + n_keys + n_values)
        self.filler = (3 + n_keys + n_values, 3 + n_keys + n_values + n_filler)
        self.size = 3 + n_keys + n_values + n_filler


def make_batch(batch: int, seq_len: int, n_pairs: int, vocab: Vocab, generator: torch.Generator):
    """-> tokens (B, L), labels (B, L): -100 except the last position, which holds the value
    of the queried key."""
    g = generator
    tokens = torch.randint(*vocab.filler, (batch, seq_len), generator=g)
    early = seq_len // 4
    labels = torch.full((batch, seq_len), -100)
    for b in range(batch):
        # distinct keys, random values, at distinct even offsets (so pairs never overlap)
        keys = vocab.keys[torch.randperm(len(vocab.keys), generator=g)[:n_pairs]]
        values = vocab.values[torch.randint(len(vocab.values), (n_pairs,), generator=g)]
        slots = torch.randperm(early // 2, generator=g)[:n_pairs] * 2
        tokens[b, slots], tokens[b, slots + 1] = keys, values
        pick = int(torch.randint(n_pairs, (1,), generator=g))
        tokens[b, -2], tokens[b, -1] = QUERY, keys[pick]
        labels[b, -1] = values[pick]
    return tokens, labels


def build_model(args, vocab: Vocab) -> Encoder:
    options = None
    attention = args.attention
    if attention in ("sparse", "local"):
        if attention == "sparse":  # the query (last token) is global: it sees, and is seen by, all
            layout = sparse.longformer(args.seq_len, args.window, global_tokens=(args.seq_len - 1,),
                                       block_size=args.block_size)
        else:
            layout = sparse.local(args.seq_len, args.window, block_size=args.block_size)
        options = {"layout": layout}
        attention = "sparse"
        print(f"layout: density {layout.density:.2f}\n{layout.picture()}")
    elif attention == "performer":
        options = {"num_features": args.features}
    cfg = EncoderConfig(vocab_size=vocab.size, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                        max_seq_len=args.seq_len, attention=attention, attention_options=options,
                        positional="learned", pad_token_id=PAD, mask_token_id=MASK)
    return Encoder(cfg)


def last_logits(model: Encoder, tokens):
    """The MLM head on the last position only: (B, V)."""
    h = model.encode(tokens)[:, -1]
    act = torch.nn.functional.relu if model.config.activation == "relu" else torch.nn.functional.gelu
    return model.mlm_decoder(model.mlm_norm(act(model.mlm_dense(h))))


@torch.no_grad()
def accuracy(model, args, vocab, device, n: int) -> float:
    model.eval()
    g = torch.Generator().manual_seed(10_000 + args.seed)  # held-out: a stream training never sees
    correct = 0
    for start in range(0, n, args.batch):
        tokens, labels = make_batch(min(args.batch, n - start), args.seq_len, args.pairs, vocab, g)
        tokens, labels = tokens.to(device), labels.to(device)
        correct += int((last_logits(model, tokens).argmax(-1) == labels[:, -1]).sum())
    model.train()
    return correct / n


def train_one(args) -> dict:
    device = training.setup(args)
    vocab = Vocab(args.keys, args.values, args.filler)
    model = build_model(args, vocab).to(device)
    print(f"{args.attention}: {training.count_parameters(model):,} parameters, L={args.seq_len}, "
          f"backend={args.backend}, device={device}")
    opt = training.make_optimizer(model, args.lr, weight_decay=0.01)
    trainer = training.Trainer(model, opt, training.make_scheduler(opt, args.warmup, args.steps),
                               grad_clip=args.grad_clip, precision=args.precision)
    g = torch.Generator().manual_seed(args.seed)
    base = training.peak_memory_mb(device)
    training.reset_peak_memory(device)
    progress = training.Progress(args.steps, args.log_every, name=args.attention)
    losses = []

    def loss_fn(batch):
        tokens, labels = (t.to(device) for t in batch)
        return training.cross_entropy(last_logits(model, tokens), labels[:, -1]), tokens.shape[0]

    with fastattn.use_backend(args.backend):
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            micro = [make_batch(args.batch, args.seq_len, args.pairs, vocab, g) for _ in range(args.accum)]
            loss, _ = trainer.step(micro, loss_fn)
            losses.append(loss)
            progress.update(step, loss, tokens=args.batch * args.accum * args.seq_len, lr=trainer.lr)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - start
        acc = accuracy(model, args, vocab, device, args.eval_examples)
    peak = training.peak_memory_mb(device)
    memory = peak if device.type == "cuda" else (peak - base if peak is not None and base is not None else None)
    result = dict(attention=args.attention, accuracy=acc, train_s=train_s, memory_mb=memory,
                  tokens_per_s=progress.tokens_per_second, first_loss=losses[0], last_loss=losses[-1],
                  chance=1.0 / args.values, device=str(device), backend=args.backend)
    print(f"{args.attention}: held-out accuracy {acc:.3f} (chance {1 / args.values:.3f}), "
          f"train {train_s:.1f}s, memory {memory if memory is None else round(memory)} MiB")
    return result


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    training.add_common_args(p, attentions=("all",) + ATTENTIONS, default_steps=200, lr=2e-3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--pairs", type=int, default=1, help="key-value pairs stored per sequence")
    p.add_argument("--keys", type=int, default=16)
    p.add_argument("--values", type=int, default=16)
    p.add_argument("--filler", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=16, help="sparse/local: tokens each side (block-rounded)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--features", type=int, default=64, help="performer random features")
    p.add_argument("--eval-examples", type=int, default=1000)
    p.add_argument("--json", default=None, help="write the result here (used by --attention all)")
    return training.parse_args(p, argv, tiny=dict(seq_len=64, batch=8, d_model=32, layers=2, block_size=16,
                                                  window=16, eval_examples=64))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.attention != "all":
        result = train_one(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)
        return [result]
    # one process per attention: separate memory high-water marks, no shared allocator state
    results = []
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        for name in ATTENTIONS:
            out = os.path.join(tmp, f"{name}.json")
            rest = [a for i, a in enumerate(argv) if a != "--attention" and (i == 0 or argv[i - 1] != "--attention")]
            subprocess.run([sys.executable, os.path.abspath(__file__), *rest, "--attention", name, "--json", out],
                           check=True)
            with open(out) as f:
                results.append(json.load(f))
    print(f"\nretrieval over L={args.seq_len} (pairs in the first quarter, query at the end), "
          f"{args.steps} steps, device={results[0]['device']}, backend={args.backend}")
    print(f"{'attention':<10} {'accuracy':>8} {'train s':>8} {'tok/s':>9} {'memory MiB':>11} {'final loss':>10}")
    for r in results:
        mem = "-" if r["memory_mb"] is None else f"{r['memory_mb']:.0f}"
        print(f"{r['attention']:<10} {r['accuracy']:>8.3f} {r['train_s']:>8.1f} {r['tokens_per_s']:>9,.0f} "
              f"{mem:>11} {r['last_loss']:>10.3f}")
    print(f"chance accuracy {results[0]['chance']:.3f}")
    return results


if __name__ == "__main__":
    main()
