"""The ``fastattn`` command: ``bench``, ``check`` and ``info``.

    fastattn bench [--quick] [--suite flash ...] [--impl fastattn ...] [--out DIR]
    fastattn check          # every kernel against its reference on this device
    fastattn info           # device, versions, which backends run here and why not

The benchmark suites ship in the package (``fastattn.bench``, a module per suite with
``cases(device, quick)``), so ``bench`` runs from any folder after any install.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from fastattn import bench  # the suites' names only: their modules load when run

REPO = Path(__file__).resolve().parent.parent  # the source checkout, when run from one


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _environment() -> dict:
    """Device, versions and git commit (of a source checkout), recorded beside every result."""
    import torch

    import fastattn

    env = {"device": _device(), "fastattn": fastattn.__version__, "python": platform.python_version(),
           "torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "interpreter": os.environ.get("TRITON_INTERPRET", "0")}
    if env["device"] == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["git_commit"] = None  # an installed wheel has none; its site-packages may sit in another repo
    if (REPO / ".git").exists():
        try:
            env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                               text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return env


def _progress(i: int, n: int, label: str, started: float) -> None:
    """One self-overwriting line: a bar, the count, the elapsed time, the current case."""
    width = 30
    done = int(width * i / n) if n else width
    elapsed = time.perf_counter() - started
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {elapsed:5.0f}s {label[:70]:70}")
    sys.stderr.flush()


def _bench(args) -> int:
    from fastattn.bench import report
    from fastattn.bench.common import ceilings, run_case

    device = _device()
    cases = [c for s in args.suite or bench.SUITES for c in bench.suite(s).cases(device, quick=args.quick)]
    if args.impl:
        cases = [c for c in cases if any(i in c.impl for i in args.impl)]
    out = Path(args.out or f"bench-results/{time.strftime('%Y%m%d-%H%M%S')}")
    environment = _environment()
    environment["ceilings"] = limits = ceilings(device, quick=args.quick)
    rows, skipped, wrong = [], [], []
    started = time.perf_counter()
    for i, case in enumerate(cases):
        _progress(i, len(cases), f"{case.suite} {case.config} {case.impl}", started)
        if args.time_budget is not None and i and time.perf_counter() - started > args.time_budget:
            skipped.append({"suite": case.suite, "config": case.config, "impl": case.impl,
                            "error": f"not run: the {args.time_budget:g} s time budget was spent"})
            continue
        try:
            if case.check is not None:
                case.check()
        except AssertionError as e:  # a wrong answer is never timed, and fails the run
            wrong.append({"suite": case.suite, "config": case.config, "impl": case.impl, "error": str(e)[:300]})
            continue
        try:
            rows.append(run_case(case, device, warmup=args.warmup, reps=args.reps, limits=limits))
        except Exception as e:  # a peer that cannot run this config is reported, not fatal
            skipped.append({"suite": case.suite, "config": case.config, "impl": case.impl,
                            "error": f"{type(e).__name__}: {str(e)[:300]}"})
    _progress(len(cases), len(cases), "done", started)
    sys.stderr.write("\n")
    print(report.table(rows))
    for s in skipped:
        print(f"skipped {s['suite']} {s['config']} {s['impl']}: {s['error'][:150]}")
    for w in wrong:
        print(f"WRONG ANSWER {w['suite']} {w['config']} {w['impl']}: {w['error']}")
    written = report.write(rows, skipped + [{**w, "wrong": True} for w in wrong], environment, out)
    print(f"\nceilings measured in this run: matmul {limits['matmul_tflops']:.3g} TFLOP/s "
          f"({limits['matmul_dtype']}, n={limits['matmul_n']}), copy {limits['copy_gbps']:.3g} GB/s")
    print(f"wrote {', '.join(str(p) for p in written)}")
    print(f"device {environment['device']}{' ' + environment['gpu'] if 'gpu' in environment else ''}, "
          f"torch {environment['torch']}, triton {environment['triton']}, commit {environment['git_commit']}")
    return 1 if wrong or not rows else 0


def _check_cases(device):
    """name -> function(dtype) returning (fastattn function, args, kwargs): one call per kernel
    family and feature. Tensors in args/kwargs are inputs; the check copies them per run."""
    import torch

    import fastattn

    def qkv(dtype, hq=4, hkv=2, lq=70, lk=90, d=64):
        return (torch.randn(1, hq, lq, d, device=device, dtype=dtype),
                torch.randn(1, hkv, lk, d, device=device, dtype=dtype),
                torch.randn(1, hkv, lk, d, device=device, dtype=dtype))

    def cache_call(dtype):
        q, k_new, v_new = qkv(dtype, lq=3, lk=3)
        caches = [torch.randn(2, 2, 96, 64, device=device, dtype=dtype) for _ in range(2)]
        lens = torch.tensor([40, 77], device=device, dtype=torch.int32)
        return fastattn.attention_with_kvcache, (q.expand(2, -1, -1, -1).contiguous(), *caches, lens), \
            dict(k_new=k_new.expand(2, -1, -1, -1).contiguous(), v_new=v_new.expand(2, -1, -1, -1).contiguous())

    flash = fastattn.flash_attention
    return {
        "flash": lambda dt: (flash, qkv(dt), {}),
        "flash causal": lambda dt: (flash, qkv(dt), dict(causal=True)),
        "flash window": lambda dt: (flash, qkv(dt), dict(window=(16, 4))),
        "flash softcap+alibi": lambda dt: (flash, qkv(dt), dict(softcap=5.0, alibi_slopes=torch.rand(4, device=device))),
        "flash bias": lambda dt: (flash, qkv(dt), dict(attn_bias=torch.randn(1, 4, 70, 90, device=device, dtype=dt))),
        "sparse local causal": lambda dt: (fastattn.sparse_attention, qkv(dt, lq=96, lk=96),
                                           dict(layout=fastattn.sparse.local(96, 32, block_size=16), causal=True)),
        "linear causal": lambda dt: (fastattn.linear_attention, qkv(dt, lq=64, lk=64), dict(causal=True)),
        "linear": lambda dt: (fastattn.linear_attention, qkv(dt), {}),
        "decode with cache": cache_call,
    }


def _check(args) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    import fastattn
    from fastattn.testing import check_rule

    device = _device()
    failures = 0

    def run(fn, call_args, kwargs, convert, backend):
        copy = lambda x: convert(x.clone()) if isinstance(x, torch.Tensor) else x  # noqa: E731
        with fastattn.use_backend(backend):
            return fn(*(copy(a) for a in call_args), **{n: copy(x) for n, x in kwargs.items()})

    as64 = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    for name, make in _check_cases(device).items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            fn, call_args, kwargs = make(dtype)
            got = run(fn, call_args, kwargs, lambda t: t, "triton")
            result = check_rule(got, run(fn, call_args, kwargs, as64, "torch"),
                                run(fn, call_args, kwargs, lambda t: t, "torch"))
            failures += not result.ok
            print(f"{name:22} {str(dtype)[6:]:9} error {result.error:.2e} (torch {result.baseline:.2e}) "
                  f"{'ok' if result.ok else 'FAIL'}")
    print("all kernels match their references" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


def _info(args) -> int:
    import torch

    from fastattn import backend

    env = _environment()
    for key, value in env.items():
        print(f"{key:12} {value}")
    probe = torch.zeros(1, 1, 1, 16, device=env["device"])
    reasons = backend.refusals("flash", probe, probe, probe)
    print(f"{'kernels':12} {'available' if not reasons else 'not here: ' + '; '.join(reasons)}")
    print(f"{'backend':12} {backend.current_backend()} (kernels where they apply, pure PyTorch otherwise)")
    peers = {"torch SDPA": True}
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        peers["FlexAttention"] = env["device"] == "cuda" or "needs CUDA for compiled speed"
    except ImportError:
        peers["FlexAttention"] = "not in this torch"
    for name, module in (("flash-attn", "flash_attn"), ("flash-linear-attention", "fla"),
                         ("performer-pytorch", "performer_pytorch"), ("linformer", "linformer")):
        peers[name] = importlib.util.find_spec(module) is not None or "not installed"
    for name, status in peers.items():
        print(f"{'peer':12} {name}: {'available' if status is True else status}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastattn", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the benchmark suites")
    b.add_argument("--quick", action="store_true", help="fewer, smaller sizes")
    b.add_argument("--suite", action="append", choices=bench.SUITES + bench.SELECTIONS,
                   help="only this suite (repeatable); 'headline': the GPU check's set (fastattn.bench.headline)")
    b.add_argument("--impl", action="append", help="only implementations whose name contains this")
    b.add_argument("--out", help="output folder (default bench-results/<time>)")
    b.add_argument("--reps", type=int, default=10, help="timed repetitions per case")
    b.add_argument("--warmup", type=int, default=3, help="untimed calls per case before timing")
    b.add_argument("--time-budget", type=float, help="seconds: start no case after this but the first (the "
                   "rest are reported as skipped), so a run with a deadline still writes its results")
    sub.add_parser("check", help="every kernel against its reference on this device")
    sub.add_parser("info", help="device, versions, available backends and peers")
    args = parser.parse_args(argv)
    return {"bench": _bench, "check": _check, "info": _info}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
