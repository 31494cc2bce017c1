"""Linear-attention suite: time and memory against sequence length for fastattn's linear
(elu+1) and Performer (FAVOR+) attention, causal and not, against exact attention
(fastattn.flash_attention and torch SDPA), to show where linear attention overtakes them;
and the memory of the chunked causal fallback against a cumulative-sum implementation,
which materialises a (B, H, L, M, Dv) tensor.

On a GPU: bf16, 16k tokens per batch (B = 16384 / L), 16 heads of 64, the kernels. On a CPU:
fp32, B = 1, 4 heads of 64, and fastattn runs its pure-PyTorch fallbacks (the chunked
reference; TRITON_INTERPRET=1 would time the interpreter instead, which means nothing).

    python -m fastattn.bench.linear            # the time + memory table (CPU or CUDA)
    python -m fastattn.bench.linear --quick
    python -m fastattn.bench.linear --clock cpu  # single-threaded CPU time, for a busy machine
    fastattn bench --suite linear          # timings through the common runner

Memory: ``fastattn.bench.common.peak_memory_mb`` of a no-grad forward (the allocator's peak on
CUDA; the resident-set high-water mark on CPU).

FLOPs: exact attention as docs/design.md (4 B H L^2 D, half causal). Linear attention:
4 B H L M Dv (phi(K)^T V and phi(Q) S) plus, causal, 2 B H L C (M + Dv) / 2 for the masked
chunk-local quadratic form (C = chunk length, 64).
"""
from __future__ import annotations

import argparse
import importlib.util
import math

import torch
import torch.nn.functional as F

import fastattn
from fastattn.bench.common import Case, attention_flops, measure, peak_memory_mb
from fastattn.testing import assert_within_rule
from fastattn.ops.linear import reference as linear_ref

SUITE = "linear"
CHUNK = 64


def linear_flops(b, h, l, m, dv, *, causal=False, backward=False) -> float:
    fwd = 4.0 * b * h * l * m * dv
    if causal:
        fwd += b * h * l * CHUNK * (m + dv)
    return fwd * 3.5 if backward else fwd


def peak_mb(fn, device) -> float:
    with torch.no_grad():
        return peak_memory_mb(fn, device)


def _performer_pytorch(d, m, causal, device):
    """performer-pytorch's FastAttention, if that package is installed (else None)."""
    if importlib.util.find_spec("performer_pytorch") is None:
        return None
    from performer_pytorch import FastAttention

    attn = FastAttention(dim_heads=d, nb_features=m, causal=causal).to(device)
    return lambda q, k, v: attn(q, k, v)


def _fla(causal, device):
    """flash-linear-attention's chunked causal linear attention (identity features, its own
    normaliser), if installed: Triton kernels for CUDA only, so None elsewhere."""
    if not causal or torch.device(device).type != "cuda" or importlib.util.find_spec("fla") is None:
        return None
    from fla.ops.linear_attn import chunk_linear_attn

    # It takes (B, L, H, D); the transposes are views.
    return lambda q, k, v: chunk_linear_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             normalize=True)[0].transpose(1, 2)


def _linformer_layer(h, l, d, m, device, dtype):
    """The linformer package's LinformerSelfAttention (k = m projected rows), if installed. It is
    a whole layer: its time includes its q/k/v/out projections (fastattn-linformer's does not)."""
    if importlib.util.find_spec("linformer") is None:
        return None
    from linformer import LinformerSelfAttention

    layer = LinformerSelfAttention(dim=h * d, seq_len=l, k=m, heads=h, dim_head=d).to(device, dtype)
    # (B, H, L, D) -> (B, L, H*D): the layer's input is the token sequence
    return lambda q, k, v: layer(q.transpose(1, 2).reshape(q.shape[0], l, h * d))


def impls(h, l, d, m, causal, device, dtype, projection):
    """name -> f(q, k, v). Exact attention, linear (elu+1), Performer, Linformer (non-causal,
    P = m rows, the same budget as Performer's m features), and the foils and peers."""
    out = {
        "fastattn-linear": lambda q, k, v: fastattn.linear_attention(q, k, v, causal=causal),
        "fastattn-performer": lambda q, k, v: fastattn.performer_attention(q, k, v, projection.to(q.dtype),
                                                                           causal=causal),
        "fastattn-flash": lambda q, k, v: fastattn.flash_attention(q, k, v, causal=causal),
        "torch-sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }
    if causal:
        out["cumsum-linear"] = lambda q, k, v: linear_ref.linear_attention_cumsum(
            linear_ref.elu_features(q), linear_ref.elu_features(k), v)
    else:
        e = torch.randn(m, l, device=device, generator=torch.Generator(device).manual_seed(0)) / math.sqrt(l)
        out["fastattn-linformer"] = lambda q, k, v: fastattn.linformer_attention(q, k, v, e.to(q.dtype), e.to(q.dtype))
        layer = _linformer_layer(h, l, d, m, device, dtype)
        if layer is not None:
            out["linformer-layer"] = layer
    peers = {"performer-pytorch": _performer_pytorch(d, m, causal, device), "fla-linear": _fla(causal, device)}
    out.update({name: f for name, f in peers.items() if f is not None})
    return out


def _checker(f, d, dtype, device):
    """Before timing a fastattn function: on a small instance (L = 128) its error vs the same
    call in float64 on the torch backend (the references) passes the docs/design.md rule
    (fastattn.testing) against that reference in the benchmark dtype; raises AssertionError
    when it does not."""
    def check():
        q, k, v = (torch.randn(1, 2, 128, d, device=device, dtype=dtype) for _ in range(3))
        with fastattn.use_backend("torch"):
            oracle = f(q.double(), k.double(), v.double())
            base = f(q, k, v)
        assert_within_rule("fastattn", f(q, k, v), oracle, base)
    return check


def configs(device, quick):
    """(b, h, l, d, m, causal): m = Performer features."""
    if torch.device(device).type == "cuda":
        lengths = [1024, 4096, 16384] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
        return [(max(1, 16384 // l), 16, l, 64, 128, c) for l in lengths for c in (False, True)]
    lengths = [256, 1024, 4096] if quick else [256, 512, 1024, 2048, 4096, 8192]
    return [(1, 4, l, 64, 64, c) for l in lengths for c in (False, True)]


def _too_big(impl, b, h, l, d, m, dtype):
    """Skip what would not fit or take minutes: the cumsum's (L, M, Dv) tensor, exact
    attention's L x L scores on the CPU math path."""
    itemsize = torch.finfo(dtype).bits // 8
    if impl == "cumsum-linear":
        return b * h * l * d * d * itemsize > 2 * 2**30
    return False


def _inputs(b, h, l, d, device, dtype, grad):
    return [torch.randn(b, h, l, d, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)]


def cases(device, quick=False, config_list=None):
    # config_list: tuples as configs() returns, to run instead of this suite's own (bench.headline)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    out = []
    for b, h, l, d, m, causal in (config_list if config_list is not None else configs(device, quick)):
        name = f"b{b}-h{h}-l{l}-d{d}-m{m}" + ("-causal" if causal else "")
        q, k, v = _inputs(b, h, l, d, device, dtype, True)
        do = torch.randn_like(q)
        projection = fastattn.performer_projection(m, d, generator=torch.Generator().manual_seed(0),
                                                   device=device)
        params = {"seq_len": l, "head_dim": d, "features": m, "causal": causal}
        for impl, f in impls(h, l, d, m, causal, device, dtype, projection).items():
            if _too_big(impl, b, h, l, d, m, dtype):
                continue
            exact = impl in ("fastattn-flash", "torch-sdpa")
            if exact:
                flops = attention_flops(b, h, l, l, d, causal=causal)
            elif "linformer" in impl:  # exact attention over the m projected keys
                flops = attention_flops(b, h, l, m, d)
            else:
                flops = linear_flops(b, h, l, d if impl.endswith("linear") else m, d, causal=causal)
            check = _checker(f, d, dtype, device) if impl in ("fastattn-linear", "fastattn-performer") else None
            out.append(Case(SUITE + "-fwd", name, impl, lambda f=f, q=q, k=k, v=v: f(q, k, v),
                            flops=flops, params=params, check=check))
            if impl not in ("cumsum-linear", "linformer-layer"):  # the layer's own weights take the gradient
                out.append(Case(SUITE + "-fwdbwd", name, impl,
                                lambda f=f, q=q, k=k, v=v, do=do: torch.autograd.grad(f(q, k, v), (q, k, v), do),
                                flops=flops * 3.5, params=params))
    return out


def _cpu_time_ms(fn, reps=5, max_seconds=3.0) -> list[float]:
    """Process CPU time per call in ms: on a machine shared with other jobs, wall time
    measures the load; CPU time of a single-threaded run measures the work."""
    import time

    fn()
    samples, start = [], time.perf_counter()
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        samples.append((time.process_time() - t0) * 1e3)
        if len(samples) >= 3 and time.perf_counter() - start > max_seconds:
            break
    return samples


def table(device, quick=False, reps=5, clock="wall"):
    """Forward time and memory against sequence length, one row per (length, causal, impl).
    ``clock="cpu"``: CPU time (meaningful on a CPU device only; run single-threaded)."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    rows = []
    for b, h, l, d, m, causal in configs(device, quick):
        q, k, v = _inputs(b, h, l, d, device, dtype, False)
        projection = fastattn.performer_projection(m, d, generator=torch.Generator().manual_seed(0),
                                                   device=device)
        for impl, f in impls(h, l, d, m, causal, device, dtype, projection).items():
            if _too_big(impl, b, h, l, d, m, dtype):
                rows.append(dict(seq_len=l, causal=causal, impl=impl, median_ms=math.nan, peak_mb=math.nan,
                                 note="skipped: (L, M, Dv) tensor > 2 GB"))
                continue
            with torch.no_grad():
                if clock == "cpu":
                    samples = _cpu_time_ms(lambda: f(q, k, v), reps=reps)
                else:
                    samples = measure(lambda: f(q, k, v), device, warmup=1, reps=reps, max_seconds=3.0)
            samples.sort()
            rows.append(dict(seq_len=l, causal=causal, impl=impl, median_ms=samples[len(samples) // 2],
                             peak_mb=peak_mb(lambda: f(q, k, v), device), note=""))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: single-threaded process CPU time (for a CPU shared with other jobs)")
    args = parser.parse_args(argv)
    if args.clock == "cpu":
        torch.set_num_threads(1)
    rows = table(args.device, args.quick, clock=args.clock)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"clock {args.clock}, forward only")
    print(f"{'L':>6} {'causal':>6} {'impl':20} {'median ms':>10} {'peak MB':>9}")
    for r in rows:
        print(f"{r['seq_len']:>6} {str(r['causal']):>6} {r['impl']:20} {r['median_ms']:>10.2f} "
              f"{r['peak_mb']:>9.1f} {r['note']}")


if __name__ == "__main__":
    main()
