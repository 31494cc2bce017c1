"""Small, plain training utilities shared by the examples (examples/*.py import it as
``training``, from beside them). Not part of the fastattn package.

Nothing here is specific to attention; it is the usual loop, written out so the examples stay
short and readable:

- ``make_optimizer``: AdamW with two parameter groups (matrices decay, biases/norms/1-d
  parameters do not), fused on CUDA.
- ``lr_lambda`` / ``make_scheduler``: linear warmup then cosine decay to ``min_ratio * lr``.
- ``Trainer``: one optimizer step over one or more micro-batches (gradient accumulation,
  weighted so it equals one big batch), autocast (bf16/fp16 on CUDA; fp16 with a GradScaler),
  gradient clipping, and ``save``/``load`` of a checkpoint (model, optimizer, scheduler,
  scaler, step, RNG state, anything extra).
- ``cross_entropy``: token loss with label smoothing and ignore_index=-100.
- ``Progress``: a one-line progress report with loss, learning rate, tokens/s and ETA.
- ``add_common_args`` / ``setup``: the flags every example shares (--attention, --backend,
  --device, --precision, --steps, --tiny, --seed).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["make_optimizer", "param_groups", "lr_lambda", "make_scheduler", "clip_gradients", "autocast",
           "cross_entropy", "Trainer", "Progress", "save_checkpoint", "load_checkpoint", "add_common_args",
           "setup", "parse_args", "peak_memory_mb", "reset_peak_memory", "count_parameters"]

PRECISIONS = ("fp32", "bf16", "fp16")


# --- optimizer and schedule ---------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: parameters with 2 or more dimensions (linear and embedding matrices,
    convolution kernels) get ``weight_decay``; biases, norm scales and other 1-d parameters
    (class tokens of shape (1, 1, E) included: fewer than 2 non-unit dimensions) get none.
    Tied parameters appear once."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if sum(s > 1 for s in p.shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (fused kernel when the parameters are on CUDA)."""
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             **({"fused": True} if on_cuda else {}))


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based):
    (step + 1) / warmup during the first ``warmup`` steps, then a half cosine from 1 down to
    ``min_ratio`` at step ``total``, and ``min_ratio`` after it."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= total:
        return min_ratio
    progress = (step - warmup) / max(1, total - warmup)  # 0 .. 1 over the decay
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                   min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup + cosine decay (``lr_lambda``); call ``scheduler.step()`` once per
    optimizer step (``Trainer.step`` does)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, warmup, total, min_ratio))


def clip_gradients(model: nn.Module, max_norm: Optional[float]) -> float:
    """Scale all gradients so their global L2 norm is at most ``max_norm`` (None or <= 0:
    no clipping). Returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None or max_norm <= 0:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def autocast(device: torch.device | str, precision: str = "fp32"):
    """``torch.autocast`` to bf16/fp16 on CUDA; a no-op for fp32 and on CPU (CPU autocast
    would only slow the examples down and the kernels run fp32 there)."""
    if precision not in PRECISIONS:
        raise ValueError(f"autocast: precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross entropy of logits (..., V) against targets (...), in fp32 (fp64 logits stay
    fp64), positions with target -100 ignored, with label smoothing (the target gets
    1 - eps + eps / V, every class eps / V)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, label_smoothing=label_smoothing)


# --- checkpoints --------------------------------------------------------------------------
def save_checkpoint(path: str, model: nn.Module, optimizer=None, scheduler=None, scaler=None, *,
                    step: int = 0, **extra) -> None:
    """Write model/optimizer/scheduler/scaler state, ``step``, the torch RNG state and
    ``extra`` (plain values) to ``path`` atomically (temporary file, then rename)."""
    state = {"model": model.state_dict(), "step": step, "extra": extra, "rng": torch.get_rng_state()}
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            state[name] = obj.state_dict()
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, model: nn.Module, optimizer=None, scheduler=None, scaler=None, *,
                    map_location=None) -> tuple[int, dict]:
    """Restore what ``save_checkpoint`` wrote into the given objects; returns (step, extra)."""
    state = torch.load(path, map_location=map_location, weights_only=False)
    model.load_state_dict(state["model"])
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and name in state:
            obj.load_state_dict(state[name])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["extra"]


# --- the step -----------------------------------------------------------------------------
class Trainer:
    """One optimizer step at a time.

    ``step(micro_batches, loss_fn)``: ``loss_fn(batch)`` returns ``(mean_loss, count)`` where
    count is how many items (tokens, examples) the mean is over. Each micro-batch runs forward
    and backward of ``mean_loss * count`` on its own (one graph alive at a time), then the
    summed gradients are divided by the total count, so accumulating k micro-batches gives
    the same gradient as one batch holding all of them (up to float rounding). Then unscale
    (fp16), clip, optimizer step, scheduler step, zero grads. Returns (mean loss, grad norm
    before clipping).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None, *,
                 grad_clip: Optional[float] = 1.0, precision: str = "fp32", device=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip = grad_clip
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.precision = precision if self.device.type == "cuda" else "fp32"
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step_count = 0

    def autocast(self):
        return autocast(self.device, self.precision)

    def step(self, micro_batches: Iterable, loss_fn: Callable) -> tuple[float, float]:
        self.model.train()
        loss_sum, total = 0.0, 0.0
        for batch in micro_batches:
            with self.autocast():
                loss, count = loss_fn(batch)
            count = float(count)
            # backward of loss * count, one micro-batch at a time (only one graph alive);
            # the gradients are divided by the total count below: sum_i count_i * mean_i / N
            # is the mean over the big batch, so the gradient equals the big batch's
            scaled = (loss if loss.dtype == torch.float64 else loss.float()) * count
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += float(loss.detach()) * count
            total += count
        total = total or 1.0
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(total)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = clip_gradients(self.model, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return loss_sum / total, norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, path: str, **extra) -> None:
        save_checkpoint(path, self.model, self.optimizer, self.scheduler, self.scaler, step=self.step_count, **extra)

    def load(self, path: str) -> dict:
        self.step_count, extra = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.scaler,
                                                 map_location=self.device)
        return extra


# --- reporting ----------------------------------------------------------------------------
class Progress:
    """Prints ``name step/total loss lr tok/s eta`` every ``every`` steps (and at the last)."""

    def __init__(self, total: int, every: int = 10, name: str = "train", file=None):
        self.total, self.every, self.name = total, max(1, every), name
        self.file = file or sys.stdout
        self.start = time.perf_counter()
        self.tokens = 0
        self.last = None

    def update(self, step: int, loss: float, tokens: int = 0, lr: Optional[float] = None, **more) -> None:
        """``step`` is 1-based (the number of steps done); ``tokens`` processed by this step."""
        self.tokens += tokens
        self.last = time.perf_counter()
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / step * (self.total - step)
        parts = [f"{self.name} {step:>{len(str(self.total))}}/{self.total}", f"loss {loss:.4f}"]
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        if self.tokens:
            parts.append(f"{rate:,.0f} tok/s")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in more.items()]
        parts.append(f"{elapsed:.0f}s (eta {eta:.0f}s)")
        print(" | ".join(parts), file=self.file, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def tokens_per_second(self) -> float:
        """Tokens over the time from the start to the last ``update`` (evaluation after the
        loop does not count)."""
        end = self.last if self.last is not None else time.perf_counter()
        return self.tokens / max(end - self.start, 1e-9)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> Optional[float]:
    """Peak CUDA memory allocated since ``reset_peak_memory`` in MiB; on CPU the process's
    peak resident set size (ru_maxrss: a high-water mark over the whole process, so it only
    grows), or None where unavailable."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, AttributeError):
        return None


# --- the flags every example shares -------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser, *, attentions=("flash",), default_steps: int = 300,
                    lr: float = 1e-3, checkpoint: bool = False, dtype: bool = False) -> argparse.ArgumentParser:
    """The flags the examples share; ``checkpoint`` adds --checkpoint (for examples that
    save, and resume, a checkpoint), ``dtype`` adds --dtype float32|float64."""
    parser.add_argument("--attention", default=attentions[0], choices=attentions,
                        help="attention of every layer (fastattn.nn.MultiHeadAttention)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                        help="fastattn.use_backend: kernels where they apply (auto), the plain-PyTorch "
                             "references (torch) or kernels only (triton; on CPU set TRITON_INTERPRET=1)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS,
                        help="autocast dtype on CUDA (CPU always trains in fp32)")
    if dtype:
        parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                            help="parameter dtype; float64 (with --backend torch) is the reference that the "
                                 "smoke tests hold the kernels' losses against")
    parser.add_argument("--steps", type=int, default=default_steps, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: steps // 10)")
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--tiny", action="store_true", help="a very small model and data (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=None)
    if checkpoint:
        parser.add_argument("--checkpoint", default=None, help="save here at the end; resume from it if it exists")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on CPU: on a shared, loaded machine small models "
                             "train several times faster on one thread than on oversubscribed cores)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None, tiny: Optional[dict] = None):
    """Parse; with --tiny, ``tiny`` replaces the defaults (flags given explicitly still win)."""
    args = parser.parse_args(argv)
    if args.tiny and tiny:
        saved = {k: parser.get_default(k) for k in tiny}
        parser.set_defaults(**tiny)
        try:
            args = parser.parse_args(argv)
        finally:
            parser.set_defaults(**saved)  # the parser is left as it was
    return args


def setup(args) -> torch.device:
    """Seed, threads and device from the common flags."""
    torch.manual_seed(args.seed)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    if args.log_every is None:
        args.log_every = max(1, args.steps // 20)
    if args.backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("note: --backend triton on CPU needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
    return device
