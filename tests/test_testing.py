"""fastattn.testing: the docs/design.md error rule that the tests, ``fastattn check`` and the
benchmark suites share."""
import math

import pytest
import torch

from fastattn.testing import GRAD_FACTOR, assert_within_rule, check_rule, max_error

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("x, ref, want", [
    ([1.0, 2.0], [1.5, 2.0], 0.5),
    ([INF, -INF], [INF, -INF], 0.0),   # the same infinity is no error
    ([INF, 0.0], [-INF, 0.0], INF),    # the opposite one is
    ([NAN, 0.0], [1.0, 0.0], INF),     # NaN where the answer is finite
    ([1.0, 0.0], [INF, 0.0], INF),     # a finite value where the answer is infinite
    ([], [], 0.0),
], ids=["finite", "same-inf", "opposite-inf", "nan", "missed-inf", "empty"])
def test_max_error(x, ref, want):
    assert max_error(torch.tensor(x), torch.tensor(ref, dtype=torch.float64)) == want


def test_rule_bound_is_factor_times_torch_plus_rounding_plus_slack():
    oracle = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    base = torch.tensor([1 / 3 + 1e-3, 2 / 3], dtype=torch.float32)
    rounding = max_error(oracle.float(), oracle)
    result = check_rule(base.clone(), oracle, base, factor=GRAD_FACTOR)
    assert result.ok and math.isclose(result.bound, 3 * result.baseline + rounding + 1e-5)
    assert math.isclose(result.baseline, 1e-3, rel_tol=1e-4)
    just_out = oracle.float() + torch.tensor([2 * result.baseline + rounding + 2e-5, 0.0])
    assert check_rule(just_out, oracle, base, factor=GRAD_FACTOR).ok
    assert not check_rule(just_out, oracle, base).ok  # factor 2 by default
    with pytest.raises(AssertionError, match=r"dq: max error .* > 2 x torch's"):
        assert_within_rule("dq", just_out, oracle, base)


def test_rule_fails_nan_and_allows_rounding_to_bf16():
    oracle = torch.rand(64, dtype=torch.float64)
    exact_bf16 = oracle.bfloat16()  # torch as good as possible: its error is the rounding itself
    assert check_rule(exact_bf16, oracle, exact_bf16).ok
    assert not check_rule(exact_bf16.masked_fill(torch.arange(64) == 5, NAN), oracle, exact_bf16).ok


def test_pairwise_holds_every_pair_in_fewer_rows():
    """tests/helpers.pairwise, which the op tests' parameter matrices use."""
    import itertools

    from helpers import pairwise

    for axes in ([range(9), "abc", [False, True]], [range(5), range(3), range(2), range(2)]):
        rows = pairwise(*axes)
        assert len(rows) < math.prod(len(a) for a in axes)
        for i, j in itertools.combinations(range(len(axes)), 2):
            assert {(r[i], r[j]) for r in rows} == set(itertools.product(axes[i], axes[j]))
