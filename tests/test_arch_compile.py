"""The kernels as compiled for each GPU architecture the launchers have tiles for, read without
a GPU (tests/sm90.py --arch N: the launchers see the target's capability and shared memory, so
they choose its tiles). Static compiler output, not timings.

For each target: every kernel the launchers launch for the headline flash configs (bf16, d64,
d128 and d256, causal, forward and backward; fp16 on sm_75, which has no bf16) and with every
feature on, and the largest footprints of the other ops (sm_100: flash's, ``fits_cases``), fits
the target's shared memory per block (Triton refuses a launch that does not: OutOfResources).
The headline flash kernels do not spill, except on sm_75, where Triton lowers the products to
FMA and every tile spills: there each kernel is held to ``SM75_SPILLS``, the fewest spill bytes
any tile gave.

sm_90's cases are tests/test_sm90_compile.py's (shared through its results folder, compiled
once per run). Time: about 10 s per flash case per target on one core (sm_75 more); the
whole grid is a command, not a test::

    python tests/sm90.py all --arch 89
"""
import pytest

from test_sm90_compile import case_result, kernel_results, results_dir  # noqa: F401 (a fixture)

pytest.importorskip("triton")

ARCHS = (75, 80, 89, 90, 100, 120)
KERNELS = ("fwd", "dkdv", "dq")


def _dtype(arch: int) -> str:
    return "float16" if arch < 80 else "bfloat16"


def headline_cases(arch: int) -> list[str]:
    return [f"flash-{_dtype(arch)}-d{d}-causal" for d in (64, 128, 256)]


def fits_cases(arch: int) -> list[str]:
    """Every feature on at each headline head dim, fp32's largest, and the other ops' largest
    footprints (tests/test_sm90_compile.py's FITS_CASES). sm_100 takes sm_90's feature tiles
    and the other ops' tiles (``_launch._tier``), which sm_90's cases check: there only the
    largest flash footprints, whose tcgen05 lowering is sm_100's own (its compile is the
    slowest: ``python tests/sm90.py all --arch 100`` reads the rest)."""
    dt = _dtype(arch)
    if arch == 100:
        return [f"flash-{dt}-d{d}-causal-features" for d in (128, 256)]
    return ([f"flash-{dt}-d{d}-causal-features" for d in (64, 128, 256)]
            + ["flash-float32-d256-causal-features", f"decode-{dt}-d256-causal-features",
               "sparse-float16-d128-bs128-causal", f"linear-{dt}-m256-dv256-causal"]
            + mla_decode_cases(arch))


def mla_decode_cases(arch: int) -> list[str]:
    """Absorbed MLA decode (q/k 576, v 512 read in place from the paged latent) on the GPUs
    its tiles were chosen for (``_launch._DECODE_WIDE``)."""
    return ["decode-bfloat16-d576v512-mla-causal"] if arch in (80, 89, 90, 120) else []


# The bar on sm_75: spill bytes (stores) per headline kernel and head dim with 16 x 16 tiles, the
# fewest any tile gave (tests/sm90.py --arch 75 --tiles; benchmarks/results/static-per-arch.md).
# At d256 dK/dV's dK launch spills 2032, its dV launch none.
SM75_SPILLS = {("fwd", 64): 0, ("fwd", 128): 0, ("fwd", 256): 0,
               ("dkdv", 64): 0, ("dkdv", 128): 540, ("dkdv", 256): 2032,
               ("dq", 64): 0, ("dq", 128): 340, ("dq", 256): 2028}


# (arch, case) -> why it does not fit today; each is an xfail(strict=True), so the test turns red
# (XPASS) once it is fixed.
KNOWN_FAILURES: dict = {}


def _params(cases):
    return [pytest.param(arch, case, id=f"sm{arch}-{case}",
                         marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[arch, case])]
                         if (arch, case) in KNOWN_FAILURES else [])
            for arch in ARCHS for case in cases(arch)]


@pytest.mark.parametrize("arch,case", _params(lambda arch: headline_cases(arch) + fits_cases(arch)))
def test_every_kernel_fits_shared_memory(results_dir, arch, case):  # noqa: F811
    result = case_result(results_dir, case, arch)
    assert result["kernels"], f"{case} compiled no kernel"
    too_big = {k["name"]: k["shared"] for k in result["kernels"] if not k["fits"]}
    assert not too_big, f"sm_{arch}: shared memory (bytes) over the per-block limit: {too_big}"


@pytest.mark.parametrize("arch,case", _params(mla_decode_cases))
def test_mla_decode_spills_nothing_and_runs_on_tensor_cores(results_dir, arch, case):  # noqa: F811
    """Its kernels (compiled for the fits check already) spill nothing, and the split-KV
    kernel's products run on the tensor cores (mma.sync: wgmma's 64-row tiles spill at 576)."""
    for k in case_result(results_dir, case, arch)["kernels"]:
        assert k["spill_stores"] == 0, f"{k['name']} on sm_{arch}: spills {k['spill_stores']} bytes"
        if "-split-" in k["name"]:
            assert k["hmma"] > 0, f"{k['name']} on sm_{arch}: its products run on {k['mma']}"


@pytest.mark.parametrize("arch,case", _params(headline_cases))
@pytest.mark.parametrize("kernel", KERNELS)
def test_headline_spills(results_dir, arch, case, kernel):  # noqa: F811
    d = int(case.split("-d")[1].split("-")[0])
    for k in kernel_results(results_dir, case, kernel, arch):
        bar = SM75_SPILLS[k["name"].split("-")[1], d] if arch < 80 else 0
        assert k["spill_stores"] <= bar, (
            f"{k['name']} on sm_{arch}: {k['registers']} registers, spills {k['spill_stores']} bytes "
            f"stored / {k['spill_loads']} loaded (at most {bar})")


# The low-precision forward at the headline shape (d128, causal), one case per target: fp8 q/k/v
# on sm_89 (mma.sync QMMA) and sm_90 (wgmma QGMMA), both products with e4m3 operands; the INT8
# q.k on sm_80 (IMMA, int8 operands, int32 accumulator). A form of that name must be there.
LOWP_CASES = {80: ("flash-int8-d128-causal", "IMMA.16832.S8.S8"),
              89: ("flash-fp8-d128-causal", "QMMA.16832.F32.E4M3.E4M3"),
              90: ("flash-fp8-d128-causal", "QGMMA.64x128x32.F32.E4M3.E4M3")}


@pytest.mark.parametrize("arch", sorted(LOWP_CASES), ids=lambda arch: f"sm{arch}-{LOWP_CASES[arch][0]}")
def test_low_precision_forward(results_dir, arch):  # noqa: F811
    case, form = LOWP_CASES[arch]
    (k,) = case_result(results_dir, case, arch)["kernels"]
    assert any(f.startswith(form) for f in k["mma_forms"]), f"{k['name']} on sm_{arch}: no {form}: {k['mma_forms']}"
    assert k["fits"] and k["spill_stores"] == 0, (
        f"{k['name']} on sm_{arch}: shared {k['shared']} B, {k['registers']} registers, spills {k['spill_stores']} B")
