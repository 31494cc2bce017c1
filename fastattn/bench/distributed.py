"""Context-parallel attention: communication volume, causal load balance, measured time.

    python -m fastattn.bench.distributed [--quick] [--world 2 4] [--seq 1024 2048] [--threads 1]
    python -m fastattn.bench.distributed --overlap [--world 4] [--seq 2048 4096]

Three tables:
1. Simulation of ring attention per step for one layer: bytes each rank sends (K/V forward;
   K/V plus the fp32 dK/dV accumulator backward) and, for Ulysses, the all-to-all bytes.
2. Causal work per rank (query-key pairs actually attended, counted from the same per-step
   block schedule the implementation runs) for the contiguous and zig-zag layouts: max/mean
   is the slowdown from imbalance (1.0 is perfect).
3. Measured time: W processes on this machine with gloo (loopback), ring (contiguous and
   zig-zag) and Ulysses, forward and forward+backward, vs one process running
   ``fastattn.flash_attention`` on the full sequence. On a CPU without TRITON_INTERPRET the
   ring's local attention is the pure-PyTorch reference (it needs the LSE, which torch's CPU
   SDPA does not return), while Ulysses and the single process need no LSE and run torch's
   fused CPU SDPA: compare ring layouts with each other, not with those two. With GPUs the
   same code runs the kernels on NCCL (this script spawns CPU ranks only).

It does not plug into ``fastattn bench`` (its cases need a process group per world size).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


# ---------------------------------------------------------------------------------------
# Simulation (no processes).

def comm_per_step(b, hq, hkv, seq_len, d, world, *, dtype_bytes=2) -> dict:
    """Bytes one rank sends per ring step, and Ulysses bytes per layer, for one layer."""
    local = seq_len // world
    kv = 2 * b * hkv * local * d * dtype_bytes  # K and V shard
    dkv = 2 * b * hkv * local * d * 4           # fp32 dK/dV accumulator
    # Ulysses: each all-to-all keeps 1/W of the shard and sends the rest.
    shard_q, shard_kv = b * hq * local * d * dtype_bytes, b * hkv * local * d * dtype_bytes
    a2a = (world - 1) / world
    return {
        "ring_fwd_step": kv, "ring_fwd_steps": world - 1,
        "ring_bwd_step": kv + dkv, "ring_bwd_steps": world,  # W-1 K/V sends, W dK/dV sends
        "ring_fwd_total": kv * (world - 1), "ring_bwd_total": kv * (world - 1) + dkv * world,
        "ulysses_fwd_total": a2a * (2 * shard_q + 2 * shard_kv),           # q, k, v in; out back
        "ulysses_bwd_total": a2a * (2 * shard_q + 2 * shard_kv),           # dout in; dq, dk, dv back
    }


def causal_work(seq_len: int, world: int, zigzag: bool) -> list[int]:
    """Attended query-key pairs per rank for causal ring attention, from the schedule that
    ``fastattn.distributed.ring`` runs (a diagonal block counts its lower triangle)."""
    from fastattn.distributed.ring import Schedule

    local = seq_len // world
    sched = Schedule(world, local, local, zigzag=zigzag, band=(None, 0), positional=True)
    work = []
    for rank in range(world):
        total = 0
        for step in range(sched.steps):
            for piece in sched.pieces(rank, (rank - step) % world):
                lq = len(range(local)[piece.q])
                lk = len(range(local)[piece.k])
                total += lq * (lq + 1) // 2 if piece.right == 0 else lq * lk  # a diagonal piece: its lower triangle
        work.append(total)
    return work


def simulation_tables(worlds, seq_len, b=1, hq=32, hkv=8, d=128) -> str:
    lines = [f"Communication per rank, one layer: B={b} Hq={hq} Hkv={hkv} L={seq_len} D={d}, bf16 K/V",
             f"{'W':>3} {'fwd/step MB':>12} {'fwd steps':>9} {'bwd/step MB':>12} {'bwd steps':>9} "
             f"{'ring fwd+bwd MB':>16} {'ulysses fwd+bwd MB':>19}"]
    for w in worlds:
        c = comm_per_step(b, hq, hkv, seq_len, d, w)
        mb = 1 / 2**20
        lines.append(f"{w:>3} {c['ring_fwd_step'] * mb:>12.2f} {c['ring_fwd_steps']:>9} "
                     f"{c['ring_bwd_step'] * mb:>12.2f} {c['ring_bwd_steps']:>9} "
                     f"{(c['ring_fwd_total'] + c['ring_bwd_total']) * mb:>16.2f} "
                     f"{(c['ulysses_fwd_total'] + c['ulysses_bwd_total']) * mb:>19.2f}")
    lines += ["", f"Causal work per rank (attended pairs, L={seq_len}); imbalance = max / mean",
              f"{'W':>3} {'layout':>10} {'min':>12} {'max':>12} {'imbalance':>9}"]
    for w in worlds:
        for zigzag in (False, True):
            work = causal_work(seq_len, w, zigzag)
            lines.append(f"{w:>3} {'zig-zag' if zigzag else 'contiguous':>10} {min(work):>12} {max(work):>12} "
                         f"{max(work) / statistics.mean(work):>9.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Measurement (W CPU processes on gloo).

def _time(fn, reps):
    fn()
    dist.barrier()
    samples = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _gloo_rank(rank, world, init_file, body, configs, reps, threads, results):
    """One spawned rank: joins the gloo group, runs ``body(rank, world, configs, reps)`` and
    puts rank 0's rows on ``results``."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = body(rank, world, configs, reps)
        if rank == 0:
            results.put(rows)
    finally:
        dist.destroy_process_group()


def _bench_worker(rank, world, configs, reps):
    import fastattn.distributed as fd

    rows = []
    for b, hq, hkv, length, d in configs:
        q, k, v = (torch.randn(b, h, length, d) for h in (hq, hkv, hkv))
        for name, method, zigzag in (("ring-contiguous", "ring", False), ("ring-zigzag", "ring", True),
                                     ("ulysses", "ulysses", False)):
            if method == "ulysses" and (hq % world or hkv % world):
                continue
            cp = fd.context_parallel(method=method, zigzag=zigzag)
            ql, kl, vl = (cp.shard(t).clone().requires_grad_() for t in (q, k, v))
            do = torch.randn_like(ql)

            def fwd():
                with torch.no_grad():
                    cp(ql, kl, vl, causal=True)

            def fwd_bwd():
                torch.autograd.grad(cp(ql, kl, vl, causal=True), (ql, kl, vl), do)

            t_f, t_fb = _time(fwd, reps), _time(fwd_bwd, reps)
            # The slowest rank sets the pace: report the max over ranks.
            both = torch.tensor([t_f, t_fb])
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            rows.append((f"b{b}-h{hq}:{hkv}-l{length}-d{d}", name, both[0].item(), both[1].item()))
    return rows


def _single_process(configs, reps, threads):
    import fastattn

    torch.set_num_threads(threads)
    rows = []
    for b, hq, hkv, length, d in configs:
        q, k, v = (torch.randn(b, h, length, d, requires_grad=True) for h in (hq, hkv, hkv))
        do = torch.randn_like(q)

        def fwd():
            with torch.no_grad():
                fastattn.flash_attention(q, k, v, causal=True)

        def fwd_bwd():
            torch.autograd.grad(fastattn.flash_attention(q, k, v, causal=True), (q, k, v), do)

        samples = {}
        for key, fn in (("f", fwd), ("fb", fwd_bwd)):
            fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            samples[key] = statistics.median(ts)
        rows.append((f"b{b}-h{hq}:{hkv}-l{length}-d{d}", "flash_attention", samples["f"], samples["fb"]))
    return rows


def _time_interleaved(fns, reps):
    """Median ms of each of ``fns``, run in turn within every repetition, so that the load of a
    shared machine drifting over the run weighs on all of them alike."""
    for fn in fns:
        fn()
    samples = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, samples):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(ts) for ts in samples]


class _NoComm:
    """A stand-in ring that sends nothing: every step computes on the rank's own K/V (the same
    shapes, so the same work), which times the ring's compute alone."""

    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def start(self, tensors, tag, ahead=1):
        return list(tensors), None

    @staticmethod
    def wait(pending):
        pass


def _overlap_worker(rank, world, configs, reps):
    """Ring forward (zig-zag, causal) against its compute alone, its K/V transfers alone, and
    all-gathering K/V first then computing the same blocks (no overlap)."""
    from fastattn.distributed import ring as ring_mod

    rows = []
    for b, hq, hkv, length, d in configs:
        local = length // world
        q, k, v = (torch.randn(b, h, local, d) for h in (hq, hkv, hkv))
        the_ring = ring_mod._Ring(None)
        f = ring_mod.features("bench", q, scale=None, softcap=None, alibi_slopes=None, dropout_p=0.0)
        sched = ring_mod.Schedule(world, local, local, zigzag=True, band=(None, 0), positional=True)

        def ring_fwd():
            ring_mod._ring_forward(the_ring, q, k, v, f, sched, False)

        def compute():
            ring_mod._ring_forward(_NoComm(rank, world), q, k, v, f, sched, False)

        def transfers():
            kv = (k, v)
            for _ in range(sched.steps - 1):
                kv, pending = the_ring.start(kv, 0)
                the_ring.wait(pending)

        def gather_then_compute():
            for t in (k, v):
                dist.all_gather([torch.empty_like(t) for _ in range(world)], t)
            compute()

        times = torch.tensor(_time_interleaved((ring_fwd, compute, transfers, gather_then_compute), reps))
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        rows.append((f"b{b}-h{hq}:{hkv}-l{length}-d{d}", sched.steps, *times.tolist()))
    return rows


def measure_ranks(world, configs, reps=5, threads=1, timeout=600, worker=None):
    """Spawn ``world`` gloo ranks and time every method; rows (config, impl, fwd ms, fwd+bwd ms),
    or with ``worker=_overlap_worker`` (config, steps, ring, compute, transfers, gather+compute ms)."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = mp.spawn(_gloo_rank, args=(world, os.path.join(tmp, "rdv"), worker or _bench_worker, configs,
                                           reps, threads, results),
                         nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        while not procs.join(timeout=5):
            if time.monotonic() > deadline:
                for p in procs.processes:
                    p.kill()
                raise TimeoutError(f"{world}-rank benchmark did not finish in {timeout} s")
    return results.get()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq", type=int, nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--overlap", action="store_true",
                        help="only the overlap table: ring forward vs its compute alone, its transfers "
                             "alone, and all-gather of K/V then the same compute")
    args = parser.parse_args(argv)
    if args.overlap:
        seqs = args.seq or [2048, 4096]
        configs = [(1, 8, 8, length, 64) for length in seqs]
        print(f"Ring overlap on CPU with gloo, fp32, causal zig-zag forward, {args.threads} torch thread(s) per "
              f"process, {os.cpu_count()} cores; median ms, slowest rank")
        print(f"{'config':>22} {'W':>3} {'steps':>5} {'ring':>8} {'compute':>8} {'transfers':>9} "
              f"{'ring/step':>9} {'compute/step':>12} {'gather+compute':>14} {'speedup':>7}")
        for world in args.world:
            for name, steps, ring, compute, transfers, gathered in measure_ranks(
                    world, configs, reps=args.reps, threads=args.threads, worker=_overlap_worker):
                print(f"{name:>22} {world:>3} {steps:>5} {ring:>8.1f} {compute:>8.1f} {transfers:>9.1f} "
                      f"{ring / steps:>9.1f} {compute / steps:>12.1f} {gathered:>14.1f} {gathered / ring:>7.2f}")
        return
    print(simulation_tables([2, 4, 8, 16], 32768))
    seqs = args.seq or ([512] if args.quick else [512, 1024, 2048])
    configs = [(1, 8, 4, length, 64) for length in seqs]
    print(f"\nMeasured on CPU with gloo, fp32, causal, {args.threads} torch thread(s) per process, "
          f"{os.cpu_count()} cores; median ms, slowest rank")
    print(f"{'config':>22} {'W':>3} {'impl':>16} {'fwd ms':>10} {'fwd+bwd ms':>11}")
    for row in _single_process(configs, args.reps, args.threads):
        print(f"{row[0]:>22} {1:>3} {row[1]:>16} {row[2]:>10.1f} {row[3]:>11.1f}")
    for world in args.world:
        for row in measure_ranks(world, configs, reps=args.reps, threads=args.threads):
            print(f"{row[0]:>22} {world:>3} {row[1]:>16} {row[2]:>10.1f} {row[3]:>11.1f}")


if __name__ == "__main__":
    main()
