"""One router decides (``fastattn.backend.route``): the public functions, ``patch_sdpa`` and
context parallelism send the same inputs to the same implementation, on empty, unsupported
and supported inputs, and a patched torch never calls back into itself."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("triton")

import fastattn  # noqa: E402
import fastattn.distributed as fd  # noqa: E402
from fastattn import backend  # noqa: E402
from fastattn.ops.flash import op as flash_op  # noqa: E402
from fastattn.ops.flash.reference import attention_reference  # noqa: E402
from helpers import assert_close_rule  # noqa: E402

# name -> (q shape, dtype); k and v take q's shape. The kernels run on CUDA, or on CPU in the
# interpreter (tests/conftest.py sets it).
INPUTS = {
    "supported": ((1, 2, 8, 16), torch.float32),
    "float64": ((1, 2, 8, 16), torch.float64),          # no kernel takes float64
    "head-dim-640": ((1, 2, 8, 640), torch.float32),    # beyond every kernel's limit (flash: 576)
    "empty-Lq": ((1, 2, 0, 16), torch.float32),
    "empty-batch": ((0, 2, 8, 16), torch.float32),
}
# What the router answers for each, per backend ("raises": ValueError with the reasons).
EXPECTED = {
    "auto": {"supported": "kernel", "float64": "torch_sdpa", "head-dim-640": "torch_sdpa",
             "empty-Lq": "reference", "empty-batch": "reference"},
    "triton": {"supported": "kernel", "float64": "raises", "head-dim-640": "raises",
               "empty-Lq": "reference", "empty-batch": "reference"},
    "torch": {"supported": "reference", "float64": "reference", "head-dim-640": "reference",
              "empty-Lq": "reference", "empty-batch": "reference"},
}


def make(case, device):
    shape, dtype = INPUTS[case]
    return tuple(torch.randn(shape, device=device, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("case", list(INPUTS))
def test_route_table(case, name, device):
    q, k, v = make(case, device)
    with fastattn.use_backend(name):
        if EXPECTED[name][case] == "raises":
            with pytest.raises(ValueError, match="triton backend cannot take"):
                backend.route("op", "flash", q, k, v, torch_sdpa=True)
        else:
            assert backend.route("op", "flash", q, k, v, torch_sdpa=True).impl == EXPECTED[name][case]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the flash kernels' entry point."""
    calls = []
    launch = flash_op.flash_attn

    def counting(*args, **kwargs):
        calls.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(flash_op, "flash_attn", counting)
    return calls


@pytest.fixture
def single_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


CALLERS = {
    "flash_attention": lambda q, k, v: fastattn.flash_attention(q, k, v),
    "sdpa": lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v),
    "patched-torch-sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    "ring_attention": lambda q, k, v: fd.ring_attention(q, k, v),
}


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("case", list(INPUTS))
def test_callers_agree_with_the_router(case, caller, kernel_calls, single_rank_group, device):
    """Under "auto", every caller runs the kernels exactly when the router says so, and gives
    torch's answer (shape and values) otherwise, including on empty inputs."""
    q, k, v = make(case, device)
    with fastattn.patch_sdpa():
        out = CALLERS[caller](q, k, v)
    oracle = backend.TORCH_SDPA(q.double(), k.double(), v.double())
    assert out.shape == oracle.shape and out.dtype == q.dtype
    assert_close_rule("out", out, oracle, attention_reference(q, k, v))
    expect_kernel = EXPECTED["auto"][case] == "kernel"
    assert bool(kernel_calls) == expect_kernel, f"{caller} ran the kernels {len(kernel_calls)} times"


@pytest.mark.parametrize("caller", ["flash_attention", "sdpa", "patched-torch-sdpa"])
def test_triton_backend_raises_for_every_caller(caller):
    q, k, v = make("float64", "cpu")
    with fastattn.patch_sdpa(), fastattn.use_backend("triton"):
        with pytest.raises(ValueError, match="dtype torch.float64"):
            CALLERS[caller](q, k, v)


@pytest.mark.parametrize("lq,lk,b,h", [(0, 8, 1, 2), (8, 0, 1, 2), (8, 8, 0, 2), (8, 8, 1, 0)],
                         ids=["Lq0", "Lk0", "B0", "H0"])
@pytest.mark.parametrize("name", ["auto", "triton", "torch"])
def test_patched_sdpa_on_empty_inputs_returns_what_torch_returns(lq, lk, b, h, name, device):
    """Before: under patch_sdpa an empty query recursed forever (the fallback called the
    patched attribute, which called fastattn again)."""
    q = torch.randn(b, h, lq, 16, device=device)
    k, v = (torch.randn(b, h, lk, 16, device=device) for _ in range(2))
    with fastattn.patch_sdpa(), fastattn.use_backend(name):
        out = F.scaled_dot_product_attention(q, k, v)
    want = backend.TORCH_SDPA(q, k, v)
    assert out.shape == want.shape and torch.equal(out, want)


def test_nested_patch_blocks_restore_in_order():
    """Before: leaving an inner patch_sdpa() block restored torch's function while the outer
    block was still active."""
    with fastattn.patch_sdpa():
        with fastattn.patch_sdpa():
            assert fastattn.integrations.is_patched()
        assert fastattn.integrations.is_patched()
    assert not fastattn.integrations.is_patched()
    assert F.scaled_dot_product_attention is backend.TORCH_SDPA
