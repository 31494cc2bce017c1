"""A small Vision Transformer on scikit-learn's handwritten digits (8x8 images, no download).

    pip install scikit-learn          # or: pip install -e .[examples]
    python examples/train_vit.py                      # CPU, about a minute or two
    python examples/train_vit.py --attention linear   # any fastattn.nn attention
    python examples/train_vit.py --backend torch      # the plain-PyTorch references

1797 images of the digits 0-9, split 80/20 (stratified, fixed seed) into train and test. Each
8x8 image is cut into 4x4 patches (4 tokens + a class token; --patch 2 gives 16, which needs
more steps) and fed to fastattn.models.ViT (bidirectional flash attention). --augment (random
one-pixel shifts), --dropout and --label-smoothing help longer runs; the short default run
does best without them. The result is the accuracy on the 360 held-out test images.
"""
from __future__ import annotations

import argparse
import time

import torch

import fastattn
from fastattn.models import ViT, ViTConfig
from fastattn.nn import Flash, Linear, Performer

import training  # examples/training.py: the loop pieces the examples share (not part of fastattn)


def load_digits(device, seed: int = 0):
    """-> (x_train (N, 1, 8, 8) in [0, 1], y_train (N,)), (x_test, y_test)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split
    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # pixel values 0..16
    y = torch.tensor(data.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed,
                                           stratify=y.numpy())
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return ((x[train_idx].to(device), y[train_idx].to(device)), (x[test_idx].to(device), y[test_idx].to(device)))


def augment(x, generator: torch.Generator):
    """Shift every image by -1, 0 or +1 pixel in each direction (zero fill)."""
    b = x.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))  # (B, 1, 10, 10)
    dy, dx = torch.randint(0, 3, (2, b), generator=generator)
    out = torch.empty_like(x)
    for i in range(b):  # small images: a Python loop is cheap here
        out[i] = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
    return out


@torch.no_grad()
def evaluate(model, x, y, batch: int = 512) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch])[0].argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    model.train()
    return correct / len(y)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    training.add_common_args(p, attentions=("flash", "linear", "performer"), default_steps=500,
                             lr=5e-3, checkpoint=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=4, choices=(1, 2, 4, 8))
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--augment", action="store_true", help="random one-pixel shifts (helps with more steps)")
    return training.parse_args(p, argv, tiny=dict(d_model=32, layers=1, heads=2, batch=32, patch=4))


def main(argv=None) -> dict:
    args = parse(argv)
    device = training.setup(args)
    (x_train, y_train), (x_test, y_test) = load_digits(device, args.seed)
    attention = {"flash": Flash(), "linear": Linear(), "performer": Performer(32)}[args.attention]
    cfg = ViTConfig(image_size=8, patch_size=args.patch, channels=1, num_classes=10, d_model=args.d_model,
                    n_layers=args.layers, n_heads=args.heads, dropout=args.dropout, attention=attention)
    model = ViT(cfg).to(device)
    print(f"ViT: {training.count_parameters(model):,} parameters, {cfg.num_patches} patches + class token, "
          f"attention={args.attention}, backend={args.backend}, device={device}; "
          f"{len(y_train)} train / {len(y_test)} test images")
    opt = training.make_optimizer(model, args.lr, weight_decay=0.05)
    trainer = training.Trainer(model, opt, training.make_scheduler(opt, args.warmup, args.steps),
                               grad_clip=args.grad_clip, precision=args.precision)
    g = torch.Generator().manual_seed(args.seed)
    progress = training.Progress(args.steps, args.log_every, name="vit")
    losses = []

    def loss_fn(batch):
        x, y = batch
        logits, _ = model(x)
        return training.cross_entropy(logits, y, args.label_smoothing), len(y)

    start = time.perf_counter()
    with fastattn.use_backend(args.backend):
        order = torch.randperm(len(y_train), generator=g)
        pos = 0
        for step in range(1, args.steps + 1):
            micro = []
            for _ in range(args.accum):
                if pos + args.batch > len(order):  # a new epoch
                    order, pos = torch.randperm(len(y_train), generator=g), 0
                idx = order[pos:pos + args.batch].to(device)
                pos += args.batch
                x = augment(x_train[idx], g) if args.augment else x_train[idx]
                micro.append((x, y_train[idx]))
            loss, _ = trainer.step(micro, loss_fn)
            losses.append(loss)
            progress.update(step, loss, tokens=args.batch * args.accum * (cfg.num_patches + 1), lr=trainer.lr)
        train_s = time.perf_counter() - start
        train_acc, test_acc = evaluate(model, x_train, y_train), evaluate(model, x_test, y_test)
    print(f"result: test accuracy {test_acc:.4f} ({round(test_acc * len(y_test))}/{len(y_test)}), "
          f"train accuracy {train_acc:.4f}, {train_s:.0f}s training, {progress.tokens_per_second:,.0f} tokens/s")
    if args.checkpoint:
        trainer.save(args.checkpoint, test_accuracy=test_acc)
    return dict(losses=losses, test_accuracy=test_acc, train_accuracy=train_acc, train_s=train_s)


if __name__ == "__main__":
    main()
