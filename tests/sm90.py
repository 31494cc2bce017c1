"""Compile the kernels for a GPU (default the H100/H200, sm_90; ``--arch N`` for another
compute capability: 75, 80, 86, 89, 90, 100, 120) exactly as their launchers launch them, on a
machine without a GPU, and read the machine code. These are compiler output (static counts),
not timings: they say what the GPU must issue, not how fast it runs.

How a kernel is compiled "as launched": each case calls the real launchers in
``fastattn/ops/<op>/op.py`` on CPU tensors of the case's shapes while ``JITFunction.run`` is
patched to record its arguments instead of launching (nothing runs; there is no GPU). Each
recorded launch then goes through Triton's own launch-time machinery for an sm_90 target: the
binder that ``JITFunction.run`` builds (``create_function_from_signature``) and
``JITFunction._pack_args``, for the target. So integers equal to 1 become constants, 16-aligned pointers and
multiples of 16 get ``tt.divisibility=16``, and the launcher's constexprs, num_warps and
num_stages are used, as on the GPU (CPU tensors from torch.empty are 16-aligned like CUDA ones).
A kernel under ``triton.autotune`` is compiled once per config that survives its pruning
(named ``<kernel>-cfg<i>``); a launcher asking ``torch.cuda.get_device_capability()`` gets the
target's (9, 0 for sm_90), and ``torch.cuda.get_device_properties()`` its shared memory per block
(``fastattn._env.ARCH_SHARED_BYTES``), so the launchers choose the target's tiles.
A launcher that decides on ``tensor.is_cuda`` sees CPU tensors, so gate GPU-only paths (TMA) on
the capability or on ``fastattn._env.interpreting()``, or this compiles the other path.

Per kernel it writes ``<name>.cubin/.ptx/.ttgir`` to ``--out`` (default: a temporary folder),
``<name>`` being ``<op>-<kernel>-<rest of the case name>`` (e.g. flash-fwd-bfloat16-d128-causal),
and reports:

- ``registers``: per thread (``cuobjdump -res-usage``); ``spill_stores``/``spill_loads``/
  ``stack``: bytes (the ``-v`` report of Triton's own ptxas run; for a binary from Triton's
  cache, ``ptxas -arch=<Triton's arch name: sm_90a, sm_100a, sm_120a, sm_80> -v`` on
  the ptx: the ptxas Triton compiles with, ``triton/backends/nvidia/bin/ptxas-blackwell`` from
  sm_90 on in triton 3.9 and ``bin/ptxas`` below, with its ``--regAllocOptLevel=2``);
- ``shared``: bytes of shared memory (``metadata.shared``) and ``fits`` (at most the target's
  per-block limit: 227 KB on sm_90);
- ``hgmma``/``hmma``/``utcmma``: SASS counts of Hopper warpgroup MMA (wgmma), of the older
  mma.sync and of Blackwell's tcgen05 MMA; ``mma``: which of them the kernel runs on ("fma"
  when none: Triton lowers the dots to FMA on sm_75), fp8 (QGMMA, QMMA) and int8 (IGMMA,
  IMMA) forms included; ``mma_forms``: each MMA form's count, with its operand types;
  ``utmaldg``/``ldgsts``: TMA tensor loads and cp.async loads; ``num_stages``, ``num_warps``;
- ``loops``: each innermost loop that holds MMA instructions (a backward ``BRA`` whose target
  dominates it, and the address range between them, holding no other such loop), in address order, with its SASS instruction count per
  iteration and ``per_row`` = that / the rows one iteration walks: ``BLOCK_N`` keys for a loop
  over keys, ``BLOCK_M`` queries for a loop over queries (dK/dV), ``BLOCK_C`` rows (linear);
  ``walks`` says which; ``per_pair`` (softmax-attention kernels) = instructions x num_warps /
  (BLOCK_M x BLOCK_N): warp instructions per (query, key) pair, the count that compares tiles
  and warp counts; ``blocks``: the launch's BLOCK_* constexprs.

Usage (TRITON_INTERPRET must be 0; the script sets it; tests/test_sm90_compile.py runs it in a
subprocess)::

    python tests/sm90.py flash-bfloat16-d128-causal          # one case, JSON on stdout
    python tests/sm90.py all --out DIR                       # every case, one JSON line each
    python tests/sm90.py flash-float16-d64-full --kernel dq  # one kernel of a case
    python tests/sm90.py baseline                            # rewrite tests/sm90_baseline.json
    python tests/sm90.py all --arch 89                       # every case for the RTX 4090 / L4
    python tests/sm90.py flash-bfloat16-d128-causal --arch 80 --kernel dq --tiles 64,64,4,2
                                                             # other tiles (M,N,warps,stages)
    python tests/sm90.py --serve      # stdin lines "<arch> <case>", one JSON line back each

Case names: ``flash-<dtype>-d<D>-<causal|full>`` (features off, the headline shapes: 16k
tokens per batch, hidden 2048: L=4096, H=2048/D, compiled at B=1, which gives B=4's binary;
see ``headline_shape``) and ``...-features`` (bias with its
gradient, ALiBi, softcap, dropout, a left window: the largest footprint, smaller L);
``decode-<dtype>-d<D>-<causal|full>[-features]`` (D up to 512) and
``decode-<dtype>-d576v512-mla-<causal|full>[-features]`` (MLA: paged, V a view of K's latent);
``sparse-<dtype>-d<D>-bs<block>-<causal|full>``;
``linear-<dtype>-m<M>-dv<Dv>-<causal|full>``; ``flash-<fp8|fp8e5m2|int8>-d<D>-<causal|full>``:
the low-precision forward (fp8 e4m3 or e5m2 q/k/v; int8 q/k with bf16 v), headline shapes.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
import types
from typing import Callable, NamedTuple, Optional

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import autotuner as triton_autotuner  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

from fastattn._env import ARCH_SHARED_BYTES  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # set_target changes it (--arch)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE = os.path.join(HERE, "sm90_baseline.json")
MMA_OPS = ("HGMMA", "HMMA", "UTCHMMA", "UTCQMMA",  # wgmma, mma.sync, tcgen05 (sm_100)
           "QGMMA", "IGMMA", "QMMA", "IMMA")  # wgmma and mma.sync of fp8 (Q) and int8 (I) operands


# ---------------------------------------------------------------------------------------
# Recording launches

class Launch(NamedTuple):
    """One ``kernel[grid](*args, **kwargs)`` call a launcher made (kwargs include the
    autotuner config's, if any); ``tag`` tells apart launches of one kernel in one case."""

    kernel: triton_jit.JITFunction
    args: tuple
    kwargs: dict
    grid: object
    tag: str


@contextlib.contextmanager
def recording(tag: str = ""):
    """Within the block, kernel launches are recorded into the yielded list instead of run.
    An autotuned kernel records one launch per config its pruning keeps, tagged ``cfg<i>``
    (its pre_hooks run, as before a real launch: they may set TMA block shapes). A launcher
    that asks ``torch.cuda.get_device_capability()`` (e.g. whether TMA is there) is told
    the target's capability, and ``torch.cuda.get_device_properties`` its shared memory per
    block and SM count (sm_90: (9, 0), 232448 bytes, 132 SMs: the H100's)."""
    launches = []
    config_tag = [""]

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid, "-".join(t for t in (tag, config_tag[0]) if t)))

    def record_configs(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for i, config in enumerate(self.prune_configs(kwargs)):
            if config.pre_hook is not None:
                config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
            config_tag[0] = f"cfg{i}"
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        config_tag[0] = ""
        self.nargs = None

    from fastattn.ops import _launch

    major, minor = TARGET.arch // 10, TARGET.arch % 10
    properties = types.SimpleNamespace(major=major, minor=minor, multi_processor_count=132,
                                       shared_memory_per_block_optin=ARCH_SHARED_BYTES[TARGET.arch])
    saved = (triton_jit.JITFunction.run, triton_autotuner.Autotuner.run, torch.cuda.get_device_capability,
             torch.cuda.get_device_properties)
    triton_jit.JITFunction.run = record
    triton_autotuner.Autotuner.run = record_configs
    torch.cuda.get_device_capability = lambda device=None: (major, minor)
    torch.cuda.get_device_properties = lambda device=None: properties
    _launch._device_arch.cache_clear()
    try:
        yield launches
    finally:
        (triton_jit.JITFunction.run, triton_autotuner.Autotuner.run, torch.cuda.get_device_capability,
         torch.cuda.get_device_properties) = saved
        _launch._device_arch.cache_clear()


def set_target(arch: int) -> None:
    """Compile for compute capability ``arch`` (major * 10 + minor, a key of
    ``fastattn._env.ARCH_SHARED_BYTES``) from now on."""
    global TARGET
    if arch not in ARCH_SHARED_BYTES:
        raise ValueError(f"--arch must be one of {sorted(ARCH_SHARED_BYTES)}, got {arch}")
    TARGET = GPUTarget("cuda", arch, 32)


@contextlib.contextmanager
def forced_tiles(kernel: str, tiles):
    """Within the block, softmax-attention launches of ``kernel`` ("fwd", "dkdv" or "dq")
    take ``tiles`` (a ``_launch.Tiles``) instead of their table's: to read other tiles."""
    from fastattn.ops import _launch

    saved, saved_lowp = _launch.candidates, _launch.lowp_candidates

    def candidates(head_dim, dtype, name, *args, **kwargs):
        return [tiles] if name == kernel else saved(head_dim, dtype, name, *args, **kwargs)

    def lowp_candidates(*args, **kwargs):  # the low-precision forward's
        return [tiles] if kernel == "fwd" else saved_lowp(*args, **kwargs)

    _launch.candidates, _launch.lowp_candidates = candidates, lowp_candidates
    try:
        yield
    finally:
        _launch.candidates, _launch.lowp_candidates = saved, saved_lowp


def compile_launch(launch: Launch):
    """The binary that ``launch`` would run on the target: Triton's binder and ``_pack_args``
    for the target's backend (the same calls ``JITFunction.run`` makes), then ``triton.compile``.
    Returns (compiled kernel, its options, the bound arguments, ptxas's ``-v`` report: what
    Triton's own ptxas run printed, or "" where the binary came from Triton's cache)."""
    kernel = launch.kernel
    backend = make_backend(TARGET)
    binder = triton_jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs)
    # What JITFunction.run adds to the launch's keyword arguments before binding them.
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas with -v: keep its report
    with contextlib.redirect_stdout(io.StringIO()) as report:
        compiled = triton.compile(src, target=TARGET, options=options.__dict__)
    return compiled, options, bound, report.getvalue()


# ---------------------------------------------------------------------------------------
# Reading the binary

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_instructions(sass: str) -> list[tuple[int, str, str, bool]]:
    """(address, opcode, text, predicated) of each SASS instruction; the opcode has its
    predicate and modifiers stripped (``@!P0 HGMMA.64x64x16.F32.BF16 ...`` -> ``HGMMA``)."""
    out = []
    for line in sass.splitlines():
        m = _INSTR.match(line)
        if m:
            text = re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(2))
            out.append((int(m.group(1), 16), text.split()[0].split(".")[0], text, text != m.group(2)))
    return out


def _branch_target(text: str) -> int:
    return int(re.findall(r"0x([0-9a-f]+)", text)[-1], 16)


def back_edges(instrs: list[tuple[int, str, str, bool]]) -> list[tuple[int, int]]:
    """(target, branch) addresses of the loop back edges: a BRA whose target dominates it in
    the control-flow graph. This leaves out the jumps back from out-of-line blocks (ptxas puts
    e.g. the retry of a barrier wait after the EXIT, and jumps back into the loop from there),
    which are backward branches but close no loop."""
    index = {addr: i for i, (addr, *_) in enumerate(instrs)}
    leaders = {0}
    for i, (_, op, text, _) in enumerate(instrs):
        if op == "BRA":
            leaders.add(index[_branch_target(text)])
        if op in ("BRA", "EXIT", "RET") and i + 1 < len(instrs):
            leaders.add(i + 1)
    starts = sorted(leaders)
    block_of = {}
    for b, first in enumerate(starts):
        for i in range(first, starts[b + 1] if b + 1 < len(starts) else len(instrs)):
            block_of[i] = b
    succs = []
    for b, first in enumerate(starts):
        last = (starts[b + 1] if b + 1 < len(starts) else len(instrs)) - 1
        _, op, text, predicated = instrs[last]
        out = set()
        if op == "BRA":
            out.add(block_of[index[_branch_target(text)]])
        if (op not in ("BRA", "EXIT", "RET") or predicated) and b + 1 < len(starts):
            out.add(b + 1)
        succs.append((last, out))
    preds = [set() for _ in starts]
    for b, (_, out) in enumerate(succs):
        for s in out:
            preds[s].add(b)
    everything = set(range(len(starts)))
    dom = [{0}] + [set(everything) for _ in starts[1:]]
    changed = True
    while changed:  # iterate dom(b) = {b} | intersection of dom(p) over predecessors p
        changed = False
        for b in range(1, len(starts)):
            new = set.intersection(*(dom[p] for p in preds[b])) | {b} if preds[b] else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    edges = []
    for b, (last, out) in enumerate(succs):
        addr, op, text, _ = instrs[last]
        for s in out:
            if op == "BRA" and s in dom[b] and instrs[starts[s]][0] == _branch_target(text) <= addr:
                edges.append((instrs[starts[s]][0], addr))
    return edges


def mma_loops(instrs: list[tuple[int, str, str, bool]]) -> list[dict]:
    """Innermost loops holding MMA instructions, in address order. A loop is a back edge (see
    ``back_edges``) and the address range from its target to it (back edges to one target
    are one loop, up to the last); innermost: it holds no other MMA-holding loop."""
    ends = {}
    for target, addr in back_edges(instrs):
        ends[target] = max(addr, ends.get(target, addr))
    loops = []
    for start, end in sorted(ends.items()):
        body = [op for addr, op, *_ in instrs if start <= addr <= end]
        if any(op in MMA_OPS for op in body):
            loops.append(dict(start=start, end=end, instructions=len(body),
                              hgmma=body.count("HGMMA"), hmma=body.count("HMMA")))
    inner = [a for a in loops
             if not any(b is not a and a["start"] <= b["start"] and b["end"] <= a["end"] for b in loops)]
    for loop in inner:
        loop["start"], loop["end"] = hex(loop["start"]), hex(loop["end"])
    return inner


def mma_kind(ops: list[str]) -> str:
    """Which instructions the products run on: "wgmma" (sm_90), "tcgen05" (sm_100),
    "mma.sync" (sm_80 and the others below sm_90, sm_120), or "fma" (none: a kernel without
    products, or Triton's FMA lowering, as on sm_75)."""
    if "HGMMA" in ops or "QGMMA" in ops or "IGMMA" in ops:
        return "wgmma"
    if "UTCHMMA" in ops or "UTCQMMA" in ops:
        return "tcgen05"
    return "mma.sync" if "HMMA" in ops or "QMMA" in ops or "IMMA" in ops else "fma"


def mma_forms(instrs: list[tuple[int, str, str, bool]]) -> dict:
    """How many MMA instructions of each form (opcode with its shape and operand types, e.g.
    ``QGMMA.64x128x32.F32.E4M3.E4M3``: fp8 e4m3 operands, fp32 accumulator) the kernel holds."""
    forms = {}
    for _, op, text, _ in instrs:
        if op in MMA_OPS:
            forms[text.split()[0]] = forms.get(text.split()[0], 0) + 1
    return forms


def _tool(*args) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr


def analyse(compiled, options, name: str, out_dir: str, step: Optional[tuple[str, int]],
            ptxas_report: str = "") -> dict:
    """Writes ``name``.cubin/.ptx/.ttgir into out_dir and reads them (see the module
    docstring). step: (what one loop iteration walks, how many rows), or None if unknown.
    ptxas_report: ptxas -v's output for this binary, if the compile kept it (else ptxas
    runs again on the ptx, with Triton's flags: the same binary)."""
    paths = {}
    for ext in ("cubin", "ptx", "ttgir"):
        paths[ext] = os.path.join(out_dir, f"{name}.{ext}")
        data = compiled.asm[ext]
        with open(paths[ext], "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
    res = _tool(os.path.join(BIN, "cuobjdump"), "-res-usage", paths["cubin"])
    ptxas = ptxas_report
    if "bytes spill stores" not in ptxas:
        ptxas = _tool(get_ptxas(TARGET.arch).path, f"-arch={sm_arch_from_capability(TARGET.arch)}", "-v",
                      "--regAllocOptLevel=2", paths["ptx"], "-o", os.devnull)
    sass = _tool(os.path.join(BIN, "cuobjdump"), "-sass", paths["cubin"])
    instrs = sass_instructions(sass)
    ops = [op for _, op, *_ in instrs]
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    loops = mma_loops(instrs)
    for loop in loops:
        loop["per_row"] = round(loop["instructions"] / step[1], 2) if step else None
    shared = compiled.metadata.shared
    return dict(
        name=name,
        registers=int(re.search(r"REG:(\d+)", res).group(1)),
        stack=int(frame.group(1)), spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)),
        shared=shared, fits=shared <= ARCH_SHARED_BYTES[TARGET.arch],
        hgmma=ops.count("HGMMA"), hmma=ops.count("HMMA"), utcmma=ops.count("UTCHMMA") + ops.count("UTCQMMA"),
        mma=mma_kind(ops), mma_forms=mma_forms(instrs),
        utmaldg=ops.count("UTMALDG"), ldgsts=ops.count("LDGSTS"),
        num_warps=options.num_warps, num_stages=options.num_stages,
        walks=step[0] if step else None, rows_per_iteration=step[1] if step else None,
        loops=loops, sass_instructions=len(instrs),
    )


# ---------------------------------------------------------------------------------------
# Cases: each calls launchers under ``recording`` and says, per kernel, its short name and
# the constexpr that one innermost-loop iteration advances by.

class Case(NamedTuple):
    op: str
    rest: str  # the case name after "<op>-"
    launch: Callable[[], list[Launch]]
    kernels: dict  # kernel function name -> (short name, (walks, step constexpr name))


def run_case(case: Case, out_dir: str, only: Optional[str] = None) -> list[dict]:
    """Compile and read every kernel launch of the case (only the kernel named ``only``,
    e.g. "dkdv" or "split-single", if given)."""
    results = []
    for launch in case.launch():
        fn_name = launch.kernel.fn.__name__
        short, (walks, step_name) = case.kernels.get(fn_name, (fn_name.removesuffix("_kernel"), (None, None)))
        kernel = short + (f"-{launch.tag}" if launch.tag else "")
        if only is not None and kernel != only:
            continue
        compiled, options, bound, ptxas_report = compile_launch(launch)
        step = (walks, bound[step_name]) if step_name in bound else None
        result = analyse(compiled, options, f"{case.op}-{kernel}-{case.rest}", out_dir, step, ptxas_report)
        result["blocks"] = {k: v for k, v in bound.items() if k.startswith("BLOCK_")}
        if "BLOCK_M" in bound and "BLOCK_N" in bound:
            # Warp instructions per (query, key) pair: comparable across tiles and warp counts.
            for loop in result["loops"]:
                loop["per_pair"] = round(loop["instructions"] * result["num_warps"]
                                         / (bound["BLOCK_M"] * bound["BLOCK_N"]), 3)
        results.append(result)
    if only is not None and not results:
        raise ValueError(f"case {case.op}-{case.rest} launches no kernel {only!r}")
    return results


SOFTMAX_KERNELS = {"fwd": ("key", "BLOCK_N"), "dkdv": ("query", "BLOCK_M"), "dq": ("key", "BLOCK_N")}


def _qkv(b, h, hkv, lq, lk, d, dtype, dv=None):
    """Contiguous (B, H, L, D) q, k, v (v's last dim ``dv``, default D); torch.empty: nothing
    touches them."""
    return (torch.empty(b, h, lq, d, dtype=dtype), torch.empty(b, hkv, lk, d, dtype=dtype),
            torch.empty(b, hkv, lk, dv or d, dtype=dtype))


def headline_shape(d: int) -> tuple[int, int, int]:
    """(B, L, H) compiled for the headline, 16k tokens per batch (B=4, L=4096) at hidden 2048.
    B is 1: the batch reaches the kernels only as a grid size and through the batch stride,
    H * L * D at any B, so the binary is B=4's (the same ttgir), while the backward launcher's
    rowsum(dO * O) on these CPU tensors costs a quarter."""
    return 1, 4096, max(1, 2048 // d)


def flash_launches(dtype, d, causal, features, dv=None):
    """The flash op's launches, forward and backward; ``dv``: v's head dim (default d)."""
    from fastattn.ops.flash import op

    if features:  # bias with gradient: a float32 (B, H, Lq, Lk) ds is written, so short rows
        b, length, h = 1, 512, headline_shape(d)[2]
    else:
        b, length, h = headline_shape(d)
    q, k, v = _qkv(b, h, h, length, length, d, dtype, dv)
    opts = dict(scale=d ** -0.5, window_right=0 if causal else None)
    if features:
        bias = torch.empty(1, 1, length, length, dtype=torch.float32)  # broadcast: its gradient is the dbias kernel's
        opts.update(bias=bias, alibi=torch.empty(h), seed=torch.zeros(1, dtype=torch.int64),
                    softcap=30.0, dropout_p=0.1, window_left=256)
    with recording() as launches:
        out, lse = op.flash_attn(q, k, v, **opts)
        do = torch.empty_like(out)
        op.flash_backward(do, q, k, v, out, lse, bias_grad=features, **opts)
    return _per_gradient(launches)


def _per_gradient(launches):
    """A dK/dV kernel launched once per gradient (GRAD_K xor GRAD_V) is read per launch,
    tagged ``dk`` or ``dv``."""
    return [launch._replace(tag="dk" if launch.kwargs["GRAD_K"] else "dv")
            if launch.kwargs.get("GRAD_K", True) != launch.kwargs.get("GRAD_V", True) else launch
            for launch in launches]


def _flash_cases():
    names = {"attn_fwd_kernel": "fwd", "attn_bwd_dkdv_kernel": "dkdv", "attn_bwd_dq_kernel": "dq",
             "attn_bwd_dbias_kernel": "dbias"}
    kernels = {fn: (short, SOFTMAX_KERNELS.get(short, (None, None))) for fn, short in names.items()}
    cases = _grid("flash", (16, 32, 40, 64, 80, 96, 128, 160, 256, 512), flash_launches, kernels)
    # Absorbed MLA: q/k 576 (512 latent + 64 rotary), v 512.
    mla = _grid("flash", (576,), lambda dtype, d, causal, features: flash_launches(dtype, d, causal, features, 512),
                kernels)
    cases.update({name.replace("-d576-", "-d576v512-"): case._replace(rest=case.rest.replace("-d576-", "-d576v512-"))
                  for name, case in mla.items()})
    return cases


def _grid(op, head_dims, launches, kernels):
    """Cases ``<op>-<dtype>-d<D>-<causal|full>[-features]`` over every dtype, head dim, causal
    and features on/off, each launching ``launches(dtype, d, causal, features)``."""
    cases = {}
    for dname, dtype in DTYPES.items():
        for d in head_dims:
            for causal in (True, False):
                for features in (False, True):
                    rest = f"{dname}-d{d}-{'causal' if causal else 'full'}" + ("-features" if features else "")
                    cases[f"{op}-{rest}"] = Case(op, rest, (
                        lambda dtype=dtype, d=d, causal=causal, features=features:
                        launches(dtype, d, causal, features)), kernels)
    return cases


def decode_launches(dtype, d, causal, features):
    """Append then split-KV decode (the launcher's own number of splits, then one split) of
    8 new tokens per sequence, GQA group 8 (64 query rows per kv head: the largest row block)."""
    from fastattn.ops.decode import op

    b, hkv, group, lnew, lmax = 4, 2, 8, 8, 4096
    q = torch.empty(b, hkv * group, lnew, d, dtype=dtype)
    k_cache, v_cache = (torch.empty(b, hkv, lmax, d, dtype=dtype) for _ in range(2))
    k_new, v_new = (torch.empty(b, hkv, lnew, d, dtype=dtype) for _ in range(2))
    seqlens = torch.full((b,), lmax - lnew, dtype=torch.int32)
    opts = dict(scale=d ** -0.5, window_right=0 if causal else None)
    if features:
        rot = torch.empty(lmax, d // 2, dtype=torch.float32)
        opts.update(alibi=torch.empty(hkv * group), softcap=30.0, window_left=1024, rotary_cos=rot,
                    rotary_sin=rot.clone())
    with recording() as launches:
        op.decode_attn(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, **opts)
    with recording("single") as single:
        op.decode_attn(q, k_cache, v_cache, seqlens, num_splits=1, **opts)
    return launches + single


def mla_decode_launches(dtype, causal, features):
    """Absorbed MLA decode: one latent kv head of 576 channels in pages of 64, V its first 512
    channels (read in place, a view), 64 query heads, one new token per sequence (appended with
    the values in the keys: v_new None), batch 8 at 4k context. Features: ALiBi, softcap, a
    left window (rotary would turn the values: MLA rotates k_new before the call)."""
    from fastattn.ops.decode import op

    b, hq, d, dv, page, lmax = 8, 64, 576, 512, 64, 4096
    q = torch.empty(b, hq, 1, d, dtype=dtype)
    pages = torch.empty(b * lmax // page, page, 1, d, dtype=dtype)
    table = torch.arange(b * lmax // page, dtype=torch.int32).view(b, lmax // page)
    k_new = torch.empty(b, 1, 1, d, dtype=dtype)
    seqlens = torch.full((b,), lmax - 1, dtype=torch.int32)
    opts = dict(scale=d ** -0.5, window_right=0 if causal else None, block_table=table)
    if features:
        opts.update(alibi=torch.empty(hq), softcap=30.0, window_left=1024)
    with recording() as launches:
        op.decode_attn(q, pages, pages[..., :dv], seqlens, k_new=k_new, v_new=k_new[..., :dv], **opts)
    with recording("single") as single:
        op.decode_attn(q, pages, pages[..., :dv], seqlens, num_splits=1, **opts)
    return launches + single


def _decode_cases():
    kernels = {"decode_split_kernel": ("split", ("key", "BLOCK_N")),
               "decode_merge_kernel": ("merge", (None, None)),
               "kv_append_kernel": ("append", (None, None))}
    cases = _grid("decode", (16, 40, 64, 80, 128, 256, 512), decode_launches, kernels)
    mla = _grid("decode", (576,), lambda dtype, d, causal, features: mla_decode_launches(dtype, causal, features),
                kernels)
    mla_name = (lambda name: name.replace("-d576-", "-d576v512-mla-"))  # noqa: E731
    cases.update({mla_name(name): case._replace(rest=mla_name(case.rest)) for name, case in mla.items()})
    return cases


def sparse_launches(dtype, d, block, causal):
    """Forward and backward on a local (banded) layout; headline shapes."""
    from fastattn import sparse
    from fastattn.ops.sparse import op

    b, length, h = headline_shape(d)
    q, k, v = _qkv(b, h, h, length, length, d, dtype)
    layout = sparse.local(length, 4 * block, block_size=block, causal=causal)
    crow, col, ccol, row, _ = layout.device_tensors(q.device)
    with recording() as launches:
        out, lse = op.sparse_attn(q, k, v, crow, col, ccol, row, block_size=block, scale=d ** -0.5, causal=causal)
        op.sparse_bwd(torch.empty_like(out), q, k, v, out, lse, crow, col, ccol, row, block, d ** -0.5, causal)
    return _per_gradient(launches)


def _sparse_cases():
    names = {"sparse_fwd_kernel": "fwd", "sparse_bwd_dkdv_kernel": "dkdv", "sparse_bwd_dq_kernel": "dq"}
    kernels = {fn: (short, SOFTMAX_KERNELS[short]) for fn, short in names.items()}
    cases = {}
    for dname, dtype in DTYPES.items():
        for d in (16, 64, 80, 128, 256):
            for block in (16, 64, 128):
                for causal in (True, False):
                    rest = f"{dname}-d{d}-bs{block}-{'causal' if causal else 'full'}"
                    cases[f"sparse-{rest}"] = Case("sparse", rest, (
                        lambda dtype=dtype, d=d, block=block, causal=causal:
                        sparse_launches(dtype, d, block, causal)), kernels)
    return cases


def linear_launches(dtype, m, dv, causal):
    """Forward and backward; causal with elu+1 features (fused), non-causal identity."""
    from fastattn.ops.linear import op

    b, length, h = 4, 4096, max(1, 2048 // max(m, dv))
    q, k = (torch.empty(b, h, length, m, dtype=dtype) for _ in range(2))
    v = torch.empty(b, h, length, dv, dtype=dtype)
    feature = "elu" if causal else "identity"
    with recording() as launches:
        out = op.linear_attn(q, k, v, feature=feature, causal=causal)
        den = torch.empty(b, h, length, dtype=torch.float32)
        op.linear_bwd(torch.empty_like(out), q, k, v, out, den, feature, causal, True)
    # The one backward kernel runs three times, for dQ, dK and dV (its GRAD constexpr).
    grads = ("dq", "dk", "dv")
    return [launch._replace(tag=grads[launch.kwargs["GRAD"]]) if "GRAD" in launch.kwargs else launch
            for launch in launches]


def _linear_cases():
    kernels = {f"linear_{n}_kernel": ("fwd" if n == "fwd" else "bwd", ("chunk row", "BLOCK_C"))
               for n in ("fwd", "bwd")}
    cases = {}
    for dname, dtype in DTYPES.items():
        for m, dv in ((16, 16), (64, 64), (96, 80), (128, 128), (256, 64), (256, 256)):
            for causal in (True, False):
                rest = f"{dname}-m{m}-dv{dv}-{'causal' if causal else 'full'}"
                cases[f"linear-{rest}"] = Case("linear", rest, (
                    lambda dtype=dtype, m=m, dv=dv, causal=causal: linear_launches(dtype, m, dv, causal)), kernels)
    return cases


def flex_launches(dtype, d):
    """Forward and backward of flex_attention with a causal document mask (eight documents, as
    ``document_block_mask`` builds it) and a learned relative-position bias as score_mod;
    headline shapes."""
    from fastattn.ops.flex import blocks as flex_blocks
    from fastattn.ops.flex import op

    b, length, h = headline_shape(d)
    q, k, v = _qkv(b, h, h, length, length, d, dtype)
    document_id = torch.repeat_interleave(torch.arange(8), length // 8)
    bias = torch.zeros(h, 2 * length)

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + length]

    blocks = flex_blocks.from_block_mask("sm90", flex_blocks.document_block_mask(document_id, causal=True), b, h,
                                         length, length, q.device)
    with recording() as launches:
        tr = op.prepare(q, v, relative_bias, blocks)
        out, lse = op.forward(q, k, v, tr, blocks, d ** -0.5)
        op.backward(torch.empty_like(out), q, k, v, out, lse, tr, blocks, d ** -0.5)
    return _per_gradient(launches)


def flex_varlen_launches(dtype, d):
    """Forward and backward of flex_attention_varlen over eight packed documents with a causal
    mask_mod and a learned relative-position bias as score_mod; headline shapes."""
    from fastattn.ops.flex import blocks as flex_blocks
    from fastattn.ops.flex import op

    _, length, h = headline_shape(d)
    q, k, v = _qkv(1, h, h, length, length, d, dtype)
    cu_seqlens = torch.arange(0, length + 1, length // 8, dtype=torch.int32)
    bias = torch.zeros(h, 2 * length)

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + length]

    blocks = flex_blocks.all_blocks(1, h, length, length, q.device, lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
    with recording() as launches:
        tr = op.prepare(q, v, relative_bias, blocks)
        out, lse = op.forward(q, k, v, tr, blocks, d ** -0.5, (cu_seqlens, cu_seqlens))
        op.backward(torch.empty_like(out), q, k, v, out, lse, tr, blocks, d ** -0.5, (cu_seqlens, cu_seqlens))
    return _per_gradient(launches)


def flex_arithmetic_launches(dtype, d):
    """Forward and backward of flex_attention with mods that use every construct the translator
    takes (integer floor/trunc division and remainders of negative positions, casts, where,
    clamp, minimum/maximum, sigmoid, exp, sqrt, powers, ~ and |): what compiled Triton refuses
    and the interpreter accepts shows here. Short sequences: the kernels' code does not depend
    on the length."""
    from helpers import arithmetic_mods
    from torch.nn.attention import flex_attention as torch_flex

    from fastattn.ops.flex import blocks as flex_blocks
    from fastattn.ops.flex import op

    b, length, h = 1, 512, 4
    q, k, v = _qkv(b, h, h, length, length, d, dtype)

    score_mod, mask_mod = arithmetic_mods()
    block_mask = torch_flex.create_block_mask(mask_mod, 1, 1, length, length, device="cpu")
    blocks = flex_blocks.from_block_mask("sm90", block_mask, b, h, length, length, q.device)
    with recording() as launches:
        tr = op.prepare(q, v, score_mod, blocks)
        out, lse = op.forward(q, k, v, tr, blocks, d ** -0.5)
        op.backward(torch.empty_like(out), q, k, v, out, lse, tr, blocks, d ** -0.5)
    return _per_gradient(launches)


def _flex_cases():
    names = {"flex_fwd_kernel": "fwd", "flex_bwd_dkdv_kernel": "dkdv", "flex_bwd_dq_kernel": "dq"}
    kernels = {fn: (short, SOFTMAX_KERNELS[short]) for fn, short in names.items()}
    return {f"flex-{dname}-d{d}-document-relbias": Case("flex", f"{dname}-d{d}-document-relbias", (
        lambda dtype=dtype, d=d: flex_launches(dtype, d)), kernels)
        for dname, dtype in DTYPES.items() for d in (64, 128, 256)} | {
        f"flex-{dname}-d{d}-varlen-causal-relbias": Case("flex", f"{dname}-d{d}-varlen-causal-relbias", (
            lambda dtype=dtype, d=d: flex_varlen_launches(dtype, d)), kernels)
        for dname, dtype in DTYPES.items() for d in (64, 128, 256)} | {
        f"flex-{dname}-d64-arithmetic": Case("flex", f"{dname}-d64-arithmetic", (
            lambda dtype=dtype: flex_arithmetic_launches(dtype, 64)), kernels)
        for dname, dtype in DTYPES.items()}


def lowp_launches(mode, d, causal):
    """The low-precision flash forward at the headline shapes: "fp8" ("fp8e5m2"), q/k/v
    float8_e4m3fn (float8_e5m2) with descales; "int8", int8 q/k (smoothed, per-token scales)
    with bf16 v. bf16 output."""
    from fastattn.ops.flash import op

    b, length, h = headline_shape(d)
    if mode.startswith("fp8"):
        q, k, v = _qkv(b, h, h, length, length, d, torch.float8_e5m2 if mode == "fp8e5m2" else torch.float8_e4m3fn)
        lowp = op.LowPrecision("fp8", torch.empty(b, h, 3), None, torch.bfloat16)
    else:
        q, k, _ = _qkv(b, h, h, length, length, d, torch.int8)
        v = torch.empty(b, h, length, d, dtype=torch.bfloat16)
        lowp = op.LowPrecision("int8", torch.empty(b, h, length, 2), torch.empty(b, h, length), torch.bfloat16)
    with recording() as launches:
        op.flash_attn(q, k, v, scale=d ** -0.5, window_right=0 if causal else None, lowp=lowp)
    return launches


def _lowp_cases():
    kernels = {"attn_fwd_kernel": ("fwd", SOFTMAX_KERNELS["fwd"])}
    return {f"flash-{mode}-d{d}-{'causal' if causal else 'full'}": Case(
        "flash", f"{mode}-d{d}-{'causal' if causal else 'full'}",
        lambda mode=mode, d=d, causal=causal: lowp_launches(mode, d, causal), kernels)
        for mode in ("fp8", "fp8e5m2", "int8") for d in (64, 128, 256) for causal in (True, False)}


CASES = {**_flash_cases(), **_decode_cases(), **_sparse_cases(), **_linear_cases(), **_flex_cases(), **_lowp_cases()}


def decode8_launches(dtype, d, dtype8, per_token):
    """``decode_launches``' shapes (4 sequences of 4096 slots, 8 new tokens, GQA group 8) over
    an 8-bit cache: the quantizing append, then the split kernels dequantizing in registers."""
    from fastattn.ops.decode import op

    b, hkv, group, lnew, lmax = 4, 2, 8, 8, 4096
    q = torch.empty(b, hkv * group, lnew, d, dtype=dtype)
    k_cache, v_cache = (torch.empty(b, hkv, lmax, d, dtype=dtype8) for _ in range(2))
    k_new, v_new = (torch.empty(b, hkv, lnew, d, dtype=dtype) for _ in range(2))
    scales = (torch.empty(b, hkv, lmax) if per_token else torch.empty(1) for _ in range(2))
    seqlens = torch.full((b,), lmax - lnew, dtype=torch.int32)
    opts = dict(scale=d ** -0.5, window_right=0, k_scale=next(scales), v_scale=next(scales))
    with recording() as launches:
        op.decode_attn(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, **opts)
    with recording("single") as single:
        op.decode_attn(q, k_cache, v_cache, seqlens, num_splits=1, **opts)
    return launches + single


def _decode8_cases():
    """``decode8-<dtype>-d<D>-<fp8|int8>-<token|tensor>``: 8-bit caches, per-token or per-tensor scales."""
    kernels = {"decode_split_kernel": ("split", ("key", "BLOCK_N")),
               "decode_merge_kernel": ("merge", (None, None)),
               "kv_append_kernel": ("append", (None, None))}
    cases = {}
    for dname in ("float16", "bfloat16"):
        for d in (64, 128, 256):
            for name8, dtype8 in (("fp8", torch.float8_e4m3fn), ("int8", torch.int8)):
                for kind in ("token", "tensor"):
                    rest = f"{dname}-d{d}-{name8}-{kind}"
                    cases[f"decode8-{rest}"] = Case("decode8", rest, (
                        lambda dtype=DTYPES[dname], d=d, dtype8=dtype8, kind=kind:
                        decode8_launches(dtype, d, dtype8, kind == "token")), kernels)
    return cases


CASES.update(_decode8_cases())

# The configs CI holds to the baseline: the headline flash kernels, features off.
HEADLINE = [f"flash-{dt}-d{d}-{c}" for dt in ("bfloat16", "float16") for d in (64, 128, 256)
            for c in ("causal", "full")]


def run(name: str, out_dir: str, only: Optional[str] = None) -> dict:
    kernels = run_case(CASES[name], out_dir, only)
    return {"case": name, "arch": TARGET.arch, "kernels": kernels, "fits": all(k["fits"] for k in kernels)}


def baseline_entry(kernel: dict) -> dict:
    """What the baseline records of a kernel: its loops' instructions per row."""
    return {"per_row": [loop["per_row"] for loop in kernel["loops"]]}


def serve() -> None:
    """Compile cases on request: each stdin line "<arch> <case>" gets one stdout line, the
    case's JSON or {"error": the traceback}. A test process keeps one server, so it pays the
    imports (about as long as one case's compile) once, not once per case."""
    replies, sys.stdout = sys.stdout, sys.stderr  # a stray print must not break the replies
    with tempfile.TemporaryDirectory() as out_dir:
        for line in sys.stdin:
            arch, name = line.split()
            try:
                set_target(int(arch))
                result = run(name, out_dir)
            except Exception:
                result = {"error": traceback.format_exc()[-3000:]}
            replies.write(json.dumps(result) + "\n")
            replies.flush()


def main(argv: list[str]) -> None:
    if argv == ["--serve"]:
        return serve()
    options = {}
    for flag in ("--out", "--kernel", "--arch", "--tiles"):
        if flag in argv:
            i = argv.index(flag)
            options[flag] = argv[i + 1]
            argv = argv[:i] + argv[i + 2:]
    out_dir, only = options.get("--out"), options.get("--kernel")
    set_target(int(options.get("--arch", "90")))
    tiles = contextlib.nullcontext()
    if "--tiles" in options:
        from fastattn.ops._launch import Tiles

        if only is None:
            sys.exit("--tiles needs --kernel (fwd, dkdv, dkdv-dk, dkdv-dv or dq)")
        tiles = forced_tiles(only.split("-")[0], Tiles(*map(int, options["--tiles"].split(","))))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, tiles:
        out_dir = out_dir or tmp
        if argv == ["baseline"]:
            if TARGET.arch != 90:
                sys.exit("the baseline is sm_90's")
            entries = {}
            for name in HEADLINE:
                for kernel in run(name, out_dir)["kernels"]:
                    entries[kernel["name"]] = baseline_entry(kernel)
            commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE,
                                    capture_output=True, text=True).stdout.strip()
            lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(entries.items())]
            with open(BASELINE, "w") as f:  # one kernel a line, so a diff shows what moved
                f.write(f'{{"triton": "{triton.__version__}", "commit": "{commit}",\n "kernels": {{\n')
                f.write(",\n".join(lines) + "\n}}\n")
            print(f"wrote {BASELINE} ({len(entries)} kernels)")
            return
        names = list(CASES) if argv == ["all"] else argv
        unknown = [n for n in names if n not in CASES]
        if unknown or not names:
            sys.exit(f"unknown case(s) {unknown}; known: 'all', 'baseline' or e.g. {HEADLINE[0]}")
        for name in names:
            print(json.dumps(run(name, out_dir, only)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
