"""AUP against hand-computed cases (formula in vllm_dapd/depbench/aup.py)."""

import math

import pytest
from hypothesis import given, strategies as st

from vllm_dapd.depbench.aup import aup, weight


def test_one_token_per_step_at_100_scores_100():
    assert aup([(1.0, 100.0)], y_max=100.0) == pytest.approx(100.0)


def test_flat_curve_is_a_rectangle_plus_trapezoids():
    # rho 1 -> 2 -> 4 at accuracy 100 (= y_max, W = 1): 100 + 100 + 200
    assert aup([(2.0, 100.0), (1.0, 100.0), (4.0, 100.0)], y_max=100.0) == pytest.approx(400.0)


def test_weight_discounts_accuracy_below_the_best():
    # y_max 100; points (1, 90), (3, 88): W(90) = e^-0.3, W(88) = e^-0.36
    w90, w88 = math.exp(-0.3), math.exp(-0.36)
    expected = 1 * 90 + 0.5 * 2 * (88 * w88 + 90 * w90)
    assert aup([(1, 90), (3, 88)], y_max=100) == pytest.approx(expected)
    assert weight(100, 100) == 1.0 and weight(120, 100) == 1.0  # capped at 1


def test_points_more_than_five_below_the_first_are_dropped():
    # (2, 50) is dropped: the curve joins (1, 80) to (4, 78) directly
    w80, w78 = math.exp(-3 * 0.2), math.exp(-3 * 0.22)
    expected = 80 + 0.5 * 3 * (78 * w78 + 80 * w80)
    assert aup([(1, 80), (2, 50), (4, 78)], y_max=100) == pytest.approx(expected)


def test_first_point_term_is_unweighted():
    # the first term is rho_1 y_1 even when y_1 < y_max (the blog's formula)
    assert aup([(1, 50)], y_max=100) == pytest.approx(50.0)


def test_bad_points_name_the_field():
    with pytest.raises(ValueError, match="points"):
        aup([], y_max=100)
    with pytest.raises(ValueError, match="points"):
        aup([(0.0, 50)], y_max=100)


@given(st.lists(st.tuples(st.floats(1, 10), st.floats(0, 100)), min_size=1, max_size=8))
def test_adding_a_faster_point_at_best_accuracy_never_lowers_aup(pts):
    y_max = 100.0
    base = aup(pts, y_max)
    rho_last = max(r for r, _ in pts)
    y1 = min(pts)[1]
    assert aup(pts + [(rho_last + 1, max(y1, 100.0))], y_max) >= base - 1e-9
