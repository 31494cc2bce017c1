"""A character-level GPT trained on the Python standard library's own source code.

    python examples/train_gpt.py                        # CPU, a few minutes
    python examples/train_gpt.py --device cuda --d-model 384 --layers 6 --seq-len 512 \\
        --batch 64 --steps 5000                         # a GPU
    python examples/train_gpt.py --attention linear     # causal linear attention instead
    python examples/train_gpt.py --docs                 # documents of long-tailed lengths, padded
    python examples/train_gpt.py --docs --pack          # the same documents packed in one row
    python examples/train_gpt.py --cp 2                 # context parallel: 2 processes, one sequence
    python examples/train_gpt.py --cp 2 --docs --pack   # the packed stream shared out across 2 processes

The text is every ``.py`` file under the directory of the running interpreter's ``os`` module
(sorted by path, so the split is the same on every run of one Python installation): always
available offline. Files are read as UTF-8 bytes, so the vocabulary is the 256 byte values
(Python sources are nearly all ASCII: one byte per character). The last 10% of the files are
the validation set: code the model never saw.

The model is fastattn.models.GPT: causal flash attention, rotary positions (RoPE) and grouped
query attention (--kv-heads of the --heads share keys and values). After training it reports
the validation loss (nats and bits per character) and the training throughput, then samples
from a prompt with the KV cache (fastattn.nn.KVCache + fastattn.attention_with_kvcache) and
checks that greedy decoding with the cache gives the same tokens as recomputing the whole
sequence each step, timing both.

With ``--cp N`` it trains on N processes (gloo on CPU, NCCL with one GPU each): every rank
draws the same batches and holds a zig-zag shard of every sequence, RoPE at the tokens' global
positions; attention is ring attention across the ranks (``fastattn.nn.ContextParallelAttention``)
and DistributedDataParallel averages the gradients over them, so the steps are one process's.
With ``--docs --pack`` each rank holds a contiguous share of the packed stream (uneven
shares, documents crossing ranks; ``fastattn.distributed.varlen_attention``), RoPE at each
token's position in its document. Rank 0 then evaluates and samples with the trained weights in
one process.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastattn
from fastattn.models import GPT, GPTConfig
from fastattn.nn import ContextParallelAttention, Flash, Linear, Performer
from fastattn.nn.positional import packed_positions

import training  # examples/training.py: the loop pieces the examples share (not part of fastattn)


def stdlib_text(max_bytes: int, val_fraction: float = 0.1):
    """-> (train bytes, validation bytes) as uint8 tensors from the standard library sources."""
    root = os.path.dirname(os.__file__)
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    paths.sort()
    n_val = max(1, int(len(paths) * val_fraction))
    # the validation files are the last ones; spread the byte budget 9:1 over the two sides
    def read(files, budget):
        chunks, size = [], 0
        for p in files:
            with open(p, "rb") as f:
                data = f.read()
            chunks.append(data[:budget - size])
            size += len(chunks[-1])
            if size >= budget:
                break
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    train = read(paths[:-n_val], int(max_bytes * (1 - val_fraction)))
    val = read(paths[-n_val:], int(max_bytes * val_fraction))
    return train, val


def doc_lengths(n: int, seq_len: int, generator) -> list[int]:
    """``n`` document lengths from a long-tailed (log-normal) distribution in [8, seq_len]:
    most are short, a few fill the context, as in real corpora."""
    lengths = torch.empty(n).log_normal_(math.log(seq_len / 6), 1.0, generator=generator)
    return lengths.clamp(8, seq_len).long().tolist()


def get_docs(data, batch: int, seq_len: int, generator, device, pack: bool):
    """``batch`` documents (windows of long-tailed lengths) as a batch: padded, x and y (B, Lmax)
    with targets -100 past each document's end; or packed, x and y (1, total) plus
    ``cu_seqlens`` (each document's targets stay inside it). Returns (x, y, cu_seqlens or None)."""
    lengths = doc_lengths(batch, seq_len, generator)
    starts = torch.randint(len(data) - seq_len - 1, (batch,), generator=generator).tolist()
    windows = [data[s:s + n + 1].long() for s, n in zip(starts, lengths)]  # n inputs + their targets
    if pack:
        x = torch.cat([w[:-1] for w in windows])[None]  # (1, total)
        y = torch.cat([w[1:] for w in windows])[None]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        return x.to(device), y.to(device), cu.to(device)
    lmax = max(lengths)
    x = torch.zeros(batch, lmax, dtype=torch.long)
    y = torch.full((batch, lmax), -100, dtype=torch.long)  # padding predicts nothing
    for i, w in enumerate(windows):
        x[i, :len(w) - 1], y[i, :len(w) - 1] = w[:-1], w[1:]
    return x.to(device), y.to(device), None


def get_batch(data, batch: int, seq_len: int, generator, device):
    """Random windows: x (B, L) and the next-character targets y (B, L)."""
    start = torch.randint(len(data) - seq_len - 1, (batch,), generator=generator)
    idx = start[:, None] + torch.arange(seq_len + 1)  # (B, L + 1)
    chunk = data[idx].long()
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


@torch.no_grad()
def validation_loss(model, val, args, device, batches: int) -> float:
    """Mean next-character loss over ``batches`` fixed windows of the validation text."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(batches):
        x, y = get_batch(val, args.batch, args.seq_len, g, device)
        logits, _ = model(x)
        total += float(training.cross_entropy(logits, y))
    model.train()
    return total / batches


def decode(tokens) -> str:
    return bytes(tokens.tolist()).decode("utf-8", errors="replace")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    training.add_common_args(p, attentions=("flash", "linear", "performer"), default_steps=800,
                             lr=3e-3, checkpoint=True,
                             dtype=True)
    p.add_argument("--max-bytes", type=int, default=4_000_000, help="how much of the stdlib to read")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2, help="GQA: key/value heads (heads must be a multiple)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--val-batches", type=int, default=20)
    p.add_argument("--docs", action="store_true",
                   help="train on documents of long-tailed lengths (<= --seq-len) instead of full windows")
    p.add_argument("--pack", action="store_true",
                   help="with --docs: pack each batch's documents into one row (cu_seqlens, no padding)")
    p.add_argument("--cp", type=int, default=1,
                   help="context parallelism: train on this many processes, each holding a zig-zag shard of "
                        "every sequence (ring attention; --seq-len must be a multiple of 2 * cp), or with "
                        "--docs --pack a contiguous share of the packed stream")
    p.add_argument("--prompt", default="def __init__(self")
    p.add_argument("--sample-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    return training.parse_args(p, argv, tiny=dict(max_bytes=200_000, seq_len=32, batch=8, d_model=32, layers=1,
                                                  heads=2, kv_heads=1, val_batches=2, sample_tokens=8))


def _cp_rank(rank, argv, world, init_file, results):
    """One process of a ``--cp`` run; rank 0 sends main's result back."""
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # one log, rank 0's
    result = main(argv, cp_rank=(rank, world, init_file))
    if rank == 0:
        results.put(result)


def _spawn_cp(argv, world: int) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_cp_rank, args=(argv, world, os.path.join(tmp, "rendezvous"), results), nprocs=world)
    return results.get()


def main(argv=None, cp_rank=None) -> dict:
    """Train, evaluate, sample. ``cp_rank``: (rank, world, rendezvous file) inside a ``--cp`` run."""
    args = parse(argv)
    if args.cp > 1 and cp_rank is None:
        if (args.docs and not args.pack) or args.checkpoint:
            raise ValueError("train_gpt: --cp takes neither --checkpoint nor padded --docs (pack them: --docs --pack)")
        if not args.docs and args.seq_len % (2 * args.cp):
            raise ValueError(f"train_gpt: --seq-len {args.seq_len} must be a multiple of 2 * --cp = {2 * args.cp}")
        return _spawn_cp(argv, args.cp)
    device = training.setup(args)
    cp = None
    if cp_rank is not None:
        import fastattn.distributed as fd

        rank, world, init_file = cp_rank
        if device.type == "cuda":
            device = torch.device("cuda", rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                                rank=rank, world_size=world)
        # The ring on a group of its own, apart from the gradients' all-reduce.
        cp = fd.context_parallel(dist.new_group(list(range(world))), method="ring")
    train, val = stdlib_text(args.max_bytes)
    print(f"data: {len(train):,} train / {len(val):,} validation bytes of standard library source "
          f"({os.path.dirname(os.__file__)})")
    attention = {"flash": Flash(), "linear": Linear(), "performer": Performer(64)}[args.attention]
    if cp is not None:
        attention = ContextParallelAttention(cp)
    cfg = GPTConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                    n_kv_heads=args.kv_heads, positional="rope", dropout=args.dropout, attention=attention,
                    max_seq_len=max(args.seq_len, 1024))
    model = GPT(cfg).to(device, getattr(torch, args.dtype))
    kind = args.attention if cp is None else f"ring over {args.cp} ranks"
    print(f"GPT: {training.count_parameters(model):,} parameters, {args.layers} layers, {args.heads} heads / "
          f"{args.kv_heads} kv heads, RoPE, attention={kind}, backend={args.backend}, device={device}")
    opt = training.make_optimizer(model, args.lr, weight_decay=0.1)
    # Under --cp DDP averages the gradients over the ranks; loss_fn scales each rank's loss so that
    # the average is the gradient of the whole batch's mean.
    trained = model if cp is None else torch.nn.parallel.DistributedDataParallel(model)
    trainer = training.Trainer(trained, opt, training.make_scheduler(opt, args.warmup, args.steps),
                               grad_clip=args.grad_clip, precision=args.precision)
    start_step = 0
    if args.checkpoint and os.path.exists(args.checkpoint):
        trainer.load(args.checkpoint)
        start_step = trainer.step_count
        print(f"resumed from {args.checkpoint} at step {start_step}")
    g = torch.Generator().manual_seed(args.seed + start_step)
    progress = training.Progress(args.steps, args.log_every, name="gpt")
    losses = []

    def loss_fn(batch):
        x, y, cu = batch
        count = int((y != -100).sum())  # the whole batch's targets
        if cp is None:
            logits, _ = model(x, cu_seqlens=cu)
            return training.cross_entropy(logits, y, args.label_smoothing), count
        if cu is None:  # this rank's zig-zag shard of every sequence, at its global positions
            positions = cp.positions(x.shape[1], device)[None]
            x, y = cp.shard(x, dim=1), cp.shard(y, dim=1)
        else:  # packed: this rank's contiguous share of the stream, at its documents' positions
            positions = cp.shard_packed(packed_positions(cu, x.shape[1]), dim=1)
            x, y = cp.shard_packed(x, dim=1), cp.shard_packed(y, dim=1)
        logits, _ = trained(x, cu_seqlens=cu, offset=positions)
        local = training.cross_entropy(logits, y, args.label_smoothing) * int((y != -100).sum())  # summed
        # DDP averages the ranks' gradients and the trainer divides by count: the ranks' sums
        # times W / count make that the whole batch's mean, whatever each rank's share.
        return local * cp.world_size / count, count

    def next_batch():
        if args.docs:
            return get_docs(train, args.batch, args.seq_len, g, device, args.pack)
        return (*get_batch(train, args.batch, args.seq_len, g, device), None)

    with fastattn.use_backend(args.backend):
        start = time.perf_counter()
        training.reset_peak_memory(device)
        for step in range(start_step + 1, args.steps + 1):
            micro = [next_batch() for _ in range(args.accum)]
            loss, _ = trainer.step(micro, loss_fn)
            if cp is not None:  # the whole batch's loss: the ranks' sums over the count, times W, averaged
                total = torch.tensor(loss, dtype=torch.float64)
                dist.all_reduce(total)
                loss = total.item() / cp.world_size
            losses.append(loss)
            # real (predicted) tokens only: padding is work, not progress
            progress.update(step, loss, tokens=sum(int((y != -100).sum()) for _, y, _ in micro), lr=trainer.lr)
        train_s = time.perf_counter() - start
        peak_mb = training.peak_memory_mb(device)
        if cp is not None:  # evaluate and sample in one process, with the trained weights
            single = GPT(dataclasses.replace(cfg, attention=Flash())).to(device, getattr(torch, args.dtype))
            single.load_state_dict(model.state_dict())
            model = single
            dist.destroy_process_group()
            if cp_rank[0] > 0:
                return {}
        if args.docs:
            what = "CUDA max allocated" if device.type == "cuda" else "CPU peak RSS of the process"
            print(f"documents ({'packed' if args.pack else 'padded'}): {progress.tokens_per_second:,.0f} real "
                  f"tokens/s, peak memory {peak_mb or 0:.1f} MiB ({what})")
        val_loss = validation_loss(model, val, args, device, args.val_batches)
        print(f"result: validation loss {val_loss:.4f} nats/char ({val_loss / math.log(2):.3f} bits/char; "
              f"uniform over 256 bytes would be {math.log(256):.2f}), training {progress.tokens_per_second:,.0f} "
              f"tokens/s, {train_s:.0f}s")
        if args.checkpoint:
            trainer.save(args.checkpoint, val_loss=val_loss)

        # sampling with the KV cache; then greedy with and without the cache must agree
        prompt = torch.tensor(list(args.prompt.encode()), dtype=torch.long, device=device)[None]
        gen = torch.Generator(device=device).manual_seed(args.seed)
        sample = model.generate(prompt, args.sample_tokens, temperature=args.temperature, top_k=40, generator=gen)
        print(f"sample (temperature {args.temperature}, top-k 40, KV cache):\n{'-' * 60}\n"
              f"{decode(sample[0])}\n{'-' * 60}")
        timings = {}
        outs = {}
        for use_cache in (True, False):
            t0 = time.perf_counter()
            outs[use_cache] = model.generate(prompt, args.sample_tokens, use_cache=use_cache)
            timings[use_cache] = time.perf_counter() - t0
        same = torch.equal(outs[True], outs[False])
        print(f"greedy {args.sample_tokens} tokens: KV cache {timings[True]:.2f}s, recompute {timings[False]:.2f}s "
              f"(cache used: {model.can_cache()}); same tokens: {same}")
    return dict(losses=losses, val_loss=val_loss, tokens_per_s=progress.tokens_per_second, train_s=train_s,
                cache_matches=same, sample=decode(sample[0]), peak_mb=peak_mb)


if __name__ == "__main__":
    main()
