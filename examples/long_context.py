"""Long-range retrieval with exact, block-sparse and linear attention, side by side.

The task: a sequence of random filler tokens holds key-value pairs ("k v") at random positions
in its first quarter; it ends with a QUERY marker and one of those keys. The model must output
the key's value at the last position, i.e. read a token at least L * 3/4 positions back (1536
or more at the default L = 2048). With one pair (the default) it only has to find the value
token; with --pairs > 1 it must also match the key, associative recall, which this small model
does not learn in a CPU budget (flash, 4 pairs, 2000 steps at 128 tokens: accuracy 0.27, about
what guessing among the four stored values gives). Every model is the same small bidirectional
encoder (fastattn.models.Encoder, an MLM head read at the last position); only the attention of
its layers changes:

    flash      exact softmax attention (fastattn.flash_attention)
    sparse     block-sparse local window + global blocks (fastattn.sparse.longformer, the last
               block global, so the query can see the whole sequence)
    local      block-sparse local window only: the control, it cannot see the pairs
    linear     linear attention, elu+1 features (fastattn.linear_attention)
    performer  FAVOR+ random features (fastattn.performer_attention)

    python examples/long_context.py                       # all of them, one after another
    python examples/long_context.py --attention sparse --seq-len 16384 --steps 500   # a GPU

Training is a length curriculum: --warm-steps steps at --warm-len tokens (cheap: the model
learns what to look for), then --steps steps at --seq-len; accuracy is measured at both lengths.
For what was learned at 128 tokens to hold at 2048 the positional encoding must not change with
distances the model never saw. Learned absolute positions leave every position past 128
untrained; full RoPE rotates every channel by the offset, so a content match learned over
offsets below 128 is scrambled at 1500. Hence partial RoPE (--rope-dim, default half of each
head): the rotated channels give order, the others match content at any distance. Measured on
CPU, flash, default config: accuracy at 128 / 2048 tokens 0.96 / 0.97; with full RoPE
(--rope-dim 16) 0.76 / 0.36; without the curriculum (--warm-steps 0) 0.08 at 2048.

Each attention trains in its own process so the memory column is that run's own: the peak
CUDA memory allocated on a GPU, on CPU the growth of the process's peak resident set size
over its size before training (rough: it includes the allocator's caching). On CPU with
--backend auto the kernels do not run (they need CUDA or TRITON_INTERPRET=1): the plain
PyTorch fallbacks do, so CPU times compare those, not the Triton kernels.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import torch

import fastattn
from fastattn import sparse
from fastattn.models import Encoder, EncoderConfig
from fastattn.nn import Flash, Linear, Performer, Sparse

import training  # examples/training.py: the loop pieces the examples share (not part of fastattn)

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


def make_layout(kind: str, window: int, block_size: int):
    """A builder (Lq, Lk) -> layout, one per length (cached), for the curriculum's lengths."""
    @functools.lru_cache(maxsize=None)
    def build(lq: int, lk: int):
        if kind == "sparse":  # the query (last token) is global: it sees, and is seen by, all
            return sparse.longformer(lq, window, global_tokens=(lq - 1,), block_size=block_size)
        return sparse.local(lq, window, block_size=block_size)
    return build


def build_model(args, vocab: Vocab) -> Encoder:
    if args.attention in ("sparse", "local"):
        layout = make_layout(args.attention, args.window, args.block_size)
        attention = Sparse(layout)  # a builder (Lq, Lk) -> layout: one layout per curriculum length
        for length in sorted({args.warm_len, args.seq_len}):
            print(f"layout at L={length}: density {layout(length, length).density:.3f}")
    else:
        attention = {"flash": Flash(), "linear": Linear(), "performer": Performer(args.features)}[args.attention]
    cfg = EncoderConfig(vocab_size=vocab.size, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                        max_seq_len=max(args.seq_len, args.warm_len), attention=attention,
                        positional=args.positional,
                        rope_dim=args.rope_dim or args.d_model // args.heads // 2, pad_token_id=PAD,
                        mask_token_id=MASK)
    return Encoder(cfg)


def last_logits(model: Encoder, tokens):
    """The MLM head on the last position only: (B, V)."""
    h = model.encode(tokens)[:, -1]
    act = torch.nn.functional.relu if model.config.activation == "relu" else torch.nn.functional.gelu
    return model.mlm_decoder(model.mlm_norm(act(model.mlm_dense(h))))


@torch.no_grad()
def accuracy(model, args, vocab, device, n: int, seq_len: int) -> float:
    model.eval()
    g = torch.Generator().manual_seed(10_000 + args.seed)  # held-out: a stream training never sees
    correct = 0
    for start in range(0, n, args.batch):
        tokens, labels = make_batch(min(args.batch, n - start), seq_len, args.pairs, vocab, g)
        tokens, labels = tokens.to(device), labels.to(device)
        correct += int((last_logits(model, tokens).argmax(-1) == labels[:, -1]).sum())
    model.train()
    return correct / n


def train_one(args) -> dict:
    if args.warmup is None:  # the learning-rate warmup: a tenth of all steps, both stages
        args.warmup = max(1, (args.warm_steps + args.steps) // 10)
    device = training.setup(args)
    vocab = Vocab(args.keys, args.values, args.filler)
    model = build_model(args, vocab).to(device, getattr(torch, args.dtype))
    print(f"{args.attention}: {training.count_parameters(model):,} parameters, {args.warm_steps} steps at "
          f"L={args.warm_len} then {args.steps} at L={args.seq_len}, backend={args.backend}, device={device}")
    total = args.warm_steps + args.steps
    opt = training.make_optimizer(model, args.lr, weight_decay=0.01)
    trainer = training.Trainer(model, opt, training.make_scheduler(opt, args.warmup, total),
                               grad_clip=args.grad_clip, precision=args.precision)
    g = torch.Generator().manual_seed(args.seed)
    base = training.peak_memory_mb(device)
    training.reset_peak_memory(device)
    losses = []

    def loss_fn(batch):
        tokens, labels = (t.to(device) for t in batch)
        return training.cross_entropy(last_logits(model, tokens), labels[:, -1]), tokens.shape[0]

    def train(steps: int, seq_len: int, name: str):
        """``steps`` optimizer steps at ``seq_len``; returns (seconds, tokens/s)."""
        progress = training.Progress(steps, max(1, steps // 10), name=name)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            micro = [make_batch(args.batch, seq_len, args.pairs, vocab, g) for _ in range(args.accum)]
            loss, _ = trainer.step(micro, loss_fn)
            losses.append(loss)
            progress.update(step, loss, tokens=args.batch * args.accum * seq_len, lr=trainer.lr)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, progress.tokens_per_second

    with fastattn.use_backend(args.backend):
        warm_s, _ = train(args.warm_steps, args.warm_len, f"{args.attention}@{args.warm_len}")
        warm_acc = accuracy(model, args, vocab, device, args.eval_examples, args.warm_len)
        print(f"{args.attention}: held-out accuracy at L={args.warm_len}: {warm_acc:.3f}")
        training.reset_peak_memory(device)  # on CUDA the memory column is the long stage's own
        long_s, tokens_per_s = train(args.steps, args.seq_len, f"{args.attention}@{args.seq_len}")
        acc = accuracy(model, args, vocab, device, args.eval_examples, args.seq_len)
    peak = training.peak_memory_mb(device)
    memory = peak if device.type == "cuda" else (peak - base if peak is not None and base is not None else None)
    result = dict(attention=args.attention, accuracy=acc, warm_accuracy=warm_acc, warm_s=warm_s,
                  train_s=long_s, step_s=long_s / max(args.steps, 1), memory_mb=memory,
                  tokens_per_s=tokens_per_s, losses=losses, first_loss=losses[0], last_loss=losses[-1],
                  chance=1.0 / args.values, device=str(device), backend=args.backend)
    print(f"{args.attention}: held-out accuracy at L={args.seq_len}: {acc:.3f} (chance {1 / args.values:.3f}), "
          f"{long_s / max(args.steps, 1):.2f} s/step at L={args.seq_len}, "
          f"memory {memory if memory is None else round(memory)} MiB")
    return result


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    training.add_common_args(p, attentions=("all",) + ATTENTIONS, default_steps=30, lr=2e-3,
                             dtype=True)
    p.add_argument("--seq-len", type=int, default=2048, help="the length trained last and evaluated")
    p.add_argument("--warm-len", type=int, default=128, help="the curriculum's first, short length")
    p.add_argument("--warm-steps", type=int, default=400, help="steps at --warm-len before --steps at --seq-len")
    p.add_argument("--positional", default="rope", choices=("rope", "learned", "none"))
    p.add_argument("--rope-dim", type=int, default=None,
                   help="channels per head that RoPE rotates (default: half the head)")
    p.add_argument("--pairs", type=int, default=1, help="key-value pairs stored per sequence")
    p.add_argument("--keys", type=int, default=16)
    p.add_argument("--values", type=int, default=16)
    p.add_argument("--filler", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=16, help="sparse/local: tokens each side (block-rounded)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--features", type=int, default=64, help="performer random features")
    p.add_argument("--eval-examples", type=int, default=256)
    p.add_argument("--json", default=None, help="write the result here (used by --attention all)")
    tiny = dict(seq_len=128, warm_len=64, warm_steps=4, batch=8, d_model=32, heads=2, layers=2, block_size=16,
                window=16, eval_examples=16)
    return training.parse_args(p, argv, tiny=tiny)


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
    print(f"\nretrieval at the last of L tokens from the first quarter; {args.warm_steps} steps at "
          f"L={args.warm_len}, then {args.steps} at L={args.seq_len}; device={results[0]['device']}, "
          f"backend={args.backend}")
    acc_short, acc_long = f"acc@{args.warm_len}", f"acc@{args.seq_len}"
    print(f"{'attention':<10} {acc_short:>8} {acc_long:>9} {'warm s':>7} {'long s':>7} {'s/step':>7} "
          f"{'tok/s':>8} {'memory MiB':>11} {'final loss':>10}")
    for r in results:
        mem = "-" if r["memory_mb"] is None else f"{r['memory_mb']:.0f}"
        print(f"{r['attention']:<10} {r['warm_accuracy']:>8.3f} {r['accuracy']:>9.3f} {r['warm_s']:>7.1f} "
              f"{r['train_s']:>7.1f} {r['step_s']:>7.2f} {r['tokens_per_s']:>8,.0f} {mem:>11} "
              f"{r['last_loss']:>10.3f}")
    print(f"chance accuracy {results[0]['chance']:.3f}")
    return results


if __name__ == "__main__":
    main()
