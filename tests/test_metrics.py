"""CL metrics on hand-made accuracy matrices (NaN = task not seen yet)."""
import math

import pytest

from cl_runner.evaluate import average_accuracy, backward_transfer, forgetting, forward_transfer, summary

N = float("nan")
R = [[90.0, N, N],
     [60.0, 80.0, N],
     [70.0, 50.0, 95.0]]


def test_average_accuracy_uses_last_row():
    assert average_accuracy(R) == pytest.approx((70 + 50 + 95) / 3)


def test_bwt():
    # (70 - 90) + (50 - 80), over the two earlier tasks
    assert backward_transfer(R) == pytest.approx(-25.0)


def test_forgetting_takes_max_over_earlier_rows():
    # task 0: max(90, 60) - 70 = 20; task 1: max(80) - 50 = 30
    assert forgetting(R) == pytest.approx(25.0)


def test_forgetting_ignores_unseen_entries_instead_of_zero_padding():
    # a zero-padded implementation would read the NaN above the diagonal as 0 and miss nothing here,
    # but a negative accuracy change must not be hidden by NaN either: all-improving matrix -> <= 0
    up = [[50.0, N], [60.0, 90.0]]
    assert forgetting(up) == pytest.approx(-10.0)
    assert backward_transfer(up) == pytest.approx(10.0)


def test_single_row_has_no_bwt_or_forgetting():
    one = [[97.0, 98.0, 99.0]]
    assert average_accuracy(one) == pytest.approx(98.0)
    assert math.isnan(backward_transfer(one)) and math.isnan(forgetting(one))


def test_forward_transfer():
    before, random_init = [N, 60.0, 70.0], [N, 50.0, 50.0]
    assert forward_transfer(before, random_init) == pytest.approx(15.0)


def test_summary_names():
    s = summary(R, R)
    assert set(s) >= {"final/avg_acc", "final/avg_acc_til", "final/bwt", "final/forgetting"}
