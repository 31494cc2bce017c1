"""The correctness rule of docs/design.md, shared by the tests, ``fastattn check`` and the
benchmark suites. Needs only torch (no Triton), so it imports on any machine.

A result ``got`` in dtype T passes against a float64 ``oracle`` when

    max_error(got, oracle) <= factor * max_error(baseline, oracle) + rounding + 1e-5

where ``baseline`` is plain PyTorch's answer in the same dtype T, ``factor`` is 2 for outputs
and 3 for gradients, and ``rounding`` is the error of merely rounding the oracle to T, which
no implementation that stores in T can beat. On large tensors the rounding is far below
torch's error; on small bf16 outputs torch's max error can be as small as that rounding by
luck, and twice it is then out of reach of any kernel.

Example::

    from fastattn.testing import assert_within_rule
    assert_within_rule("out", fastattn.flash_attention(q, k, v),
                       attention_reference(q.double(), k.double(), v.double()),
                       attention_reference(q, k, v))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
SLACK = 1e-5

__all__ = ["OUTPUT_FACTOR", "GRAD_FACTOR", "RuleCheck", "max_error", "check_rule", "assert_within_rule"]


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |x - ref| in float64 over tensors of the same (or broadcastable) shape.

    Where ``x`` and ``ref`` are the same infinity the error is 0; a NaN or an infinity in
    ``x`` where ``ref`` is finite (or the other way round) counts as an infinite error.
    Empty tensors give 0.0. Raises RuntimeError when the shapes do not broadcast.
    """
    x64, ref64 = x.detach().double(), ref.detach().double()
    both_inf = torch.isinf(x64) & torch.isinf(ref64) & (x64.sign() == ref64.sign())
    diff = (x64 - ref64).abs().masked_fill(both_inf, 0.0)
    return diff.nan_to_num(nan=float("inf"), posinf=float("inf")).max().item() if diff.numel() else 0.0


@dataclass(frozen=True)
class RuleCheck:
    """One application of the rule: ``error`` of the result, ``baseline`` error of plain
    PyTorch in the same dtype, ``rounding`` of the oracle to that dtype, and ``factor``."""
    error: float
    baseline: float
    rounding: float
    factor: float

    @property
    def bound(self) -> float:
        """The largest error that passes."""
        return self.factor * self.baseline + self.rounding + SLACK

    @property
    def ok(self) -> bool:
        """True when ``error <= bound`` (an infinite error never passes)."""
        return self.error <= self.bound

    def __str__(self) -> str:
        return (f"max error {self.error:.3e} {'<=' if self.ok else '>'} {self.factor:g} x torch's "
                f"{self.baseline:.3e} + rounding {self.rounding:.3e} + {SLACK:g}")


def check_rule(got: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor, *,
               factor: float = OUTPUT_FACTOR) -> RuleCheck:
    """Measure ``got`` (dtype T) against the float64 ``oracle``, with ``baseline`` (plain
    PyTorch in dtype T) as the yardstick. Pass ``factor=GRAD_FACTOR`` for gradients.
    Nothing is raised for a failure: read ``.ok``."""
    return RuleCheck(error=max_error(got, oracle), baseline=max_error(baseline, oracle),
                     rounding=max_error(oracle.detach().to(got.dtype), oracle), factor=factor)


def assert_within_rule(name: str, got: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor, *,
                       factor: float = OUTPUT_FACTOR) -> None:
    """``check_rule`` that raises AssertionError naming ``name`` and the numbers on failure."""
    result = check_rule(got, oracle, baseline, factor=factor)
    if not result.ok:
        raise AssertionError(f"{name}: {result}")
