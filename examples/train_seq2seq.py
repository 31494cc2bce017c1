"""An encoder-decoder that reads numbers spelled out in English and writes their digits.

    python examples/train_seq2seq.py                  # CPU, a couple of minutes
    python examples/train_seq2seq.py --max-number 999999 --steps 6000 --device cuda

    "forty two thousand seven hundred five"  ->  "42705"

Source tokens are words (zero .. nineteen, twenty .. ninety, hundred, thousand), target tokens
are digits; both share one vocabulary with pad/bos/eos. The numbers 0 .. --max-number are
split at random (fixed seed) into training numbers and --test held-out numbers that training
never sees, so a correct answer needs the composition rules, not memory. The model is
fastattn.models.EncoderDecoder: bidirectional encoder, causal decoder with cross-attention
over the encoder output (flash attention by default; keys of the cross-attention projected
once during generation, self-attention keys in a KV cache). The result: exact-match accuracy
of greedy and of beam-search decoding on the held-out numbers.
"""
from __future__ import annotations

import argparse
import time

import torch

import fastattn
from fastattn.models import EncoderDecoder, EncoderDecoderConfig
from fastattn.nn import Flash, Linear

import training  # examples/training.py: the loop pieces the examples share (not part of fastattn)

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
SPECIAL = ["<pad>", "<bos>", "<eos>"]
WORDS = ONES + TENS[2:] + ["hundred", "thousand"]
DIGITS = list("0123456789")
VOCAB = SPECIAL + WORDS + DIGITS
INDEX = {t: i for i, t in enumerate(VOCAB)}
PAD, BOS, EOS = 0, 1, 2


def spell(n: int) -> list[str]:
    """English words for 0 <= n < 1_000_000, without "and": 1205 -> one thousand two hundred five."""
    if n == 0:
        return ["zero"]

    def below_thousand(m):
        words = []
        if m >= 100:
            words += [ONES[m // 100], "hundred"]
            m %= 100
        if m >= 20:
            words.append(TENS[m // 10])
            m %= 10
            if m:
                words.append(ONES[m])
        elif m:
            words.append(ONES[m])
        return words
    thousands, rest = divmod(n, 1000)
    return (below_thousand(thousands) + ["thousand"] if thousands else []) + below_thousand(rest)


def encode(numbers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """numbers -> src (B, Ls) word ids padded, tgt (B, Lt) = [bos, digits], labels (B, Lt) =
    [digits, eos] with -100 at padding."""
    srcs = [[INDEX[w] for w in spell(int(n))] for n in numbers]
    outs = [[INDEX[d] for d in str(int(n))] for n in numbers]
    ls, lt = max(map(len, srcs)), max(map(len, outs)) + 1
    src = torch.full((len(srcs), ls), PAD)
    tgt = torch.full((len(srcs), lt), PAD)
    labels = torch.full((len(srcs), lt), -100)
    for i, (s, o) in enumerate(zip(srcs, outs)):
        src[i, :len(s)] = torch.tensor(s)
        tgt[i, :len(o) + 1] = torch.tensor([BOS] + o)
        labels[i, :len(o) + 1] = torch.tensor(o + [EOS])
    return src, tgt, labels


def to_text(tokens) -> str:
    """Generated ids (starting with bos) -> the digits before eos."""
    out = []
    for t in tokens.tolist()[1:]:
        if t in (EOS, PAD):
            break
        out.append(VOCAB[t])
    return "".join(out)


@torch.no_grad()
def exact_match(model, numbers, device, num_beams: int, batch: int = 250) -> tuple[float, list]:
    model.eval()
    hits, wrong = 0, []
    for i in range(0, len(numbers), batch):
        chunk = numbers[i:i + batch]
        src, _, _ = encode(chunk)
        out = model.generate(src.to(device), max_new_tokens=8, num_beams=num_beams)
        for n, row in zip(chunk.tolist(), out):
            text = to_text(row)
            hits += text == str(n)
            if text != str(n) and len(wrong) < 5:
                wrong.append((" ".join(spell(n)), text))
    model.train()
    return hits / len(numbers), wrong


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    training.add_common_args(p, attentions=("flash", "linear"), default_steps=800, lr=3e-3)
    p.add_argument("--max-number", type=int, default=99_999)
    p.add_argument("--test", type=int, default=500, help="held-out numbers")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2, help="encoder layers (decoder: the same)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    return training.parse_args(p, argv, tiny=dict(d_model=32, layers=1, heads=2, batch=16, test=20, beams=2))


def main(argv=None) -> dict:
    args = parse(argv)
    device = training.setup(args)
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(args.max_number + 1, generator=g)
    test, train = perm[:args.test], perm[args.test:]
    print(f"task: spelled-out numbers 0..{args.max_number:,} -> digits; {len(train):,} training numbers, "
          f"{len(test):,} held out. e.g. {' '.join(spell(int(test[0])))!r} -> {int(test[0])}")
    attention = {"flash": Flash(), "linear": Linear()}[args.attention]
    cfg = EncoderDecoderConfig(vocab_size=len(VOCAB), d_model=args.d_model, n_layers=args.layers,
                               n_heads=args.heads, positional="learned", max_seq_len=16, attention=attention,
                               pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    model = EncoderDecoder(cfg).to(device)
    print(f"EncoderDecoder: {training.count_parameters(model):,} parameters, {args.layers}+{args.layers} layers, "
          f"attention={args.attention}, backend={args.backend}, device={device}")
    opt = training.make_optimizer(model, args.lr, weight_decay=0.01)
    trainer = training.Trainer(model, opt, training.make_scheduler(opt, args.warmup, args.steps),
                               grad_clip=args.grad_clip, precision=args.precision)
    progress = training.Progress(args.steps, args.log_every, name="seq2seq")
    losses = []

    def loss_fn(batch):
        src, tgt, labels = (t.to(device) for t in batch)
        logits, _ = model(src, tgt)
        return training.cross_entropy(logits, labels, args.label_smoothing), int((labels != -100).sum())

    with fastattn.use_backend(args.backend):
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            micro = []
            for _ in range(args.accum):
                numbers = train[torch.randint(len(train), (args.batch,), generator=g)]
                micro.append(encode(numbers))
            loss, _ = trainer.step(micro, loss_fn)
            losses.append(loss)
            progress.update(step, loss, tokens=sum(int((b[2] != -100).sum()) + b[0].numel() for b in micro),
                            lr=trainer.lr)
        train_s = time.perf_counter() - start
        t0 = time.perf_counter()
        greedy, wrong = exact_match(model, test, device, num_beams=1)
        greedy_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        beam, _ = exact_match(model, test, device, num_beams=args.beams)
        beam_s = time.perf_counter() - t0
    print(f"result: held-out exact match greedy {greedy:.4f} ({greedy_s:.1f}s), beam search (k={args.beams}) "
          f"{beam:.4f} ({beam_s:.1f}s); {train_s:.0f}s training")
    for words, got in wrong:
        print(f"  miss: {words!r} -> {got!r}")
    return dict(losses=losses, greedy=greedy, beam=beam, train_s=train_s)


if __name__ == "__main__":
    main()
