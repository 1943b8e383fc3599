"""cosine_schedule: lightly.utils.scheduler.cosine_schedule's exact semantics."""

import warnings

import pytest

from sslfast import cosine_schedule

CASES = [
    (step, max_steps, start, end, period)
    for max_steps in (0, 1, 2, 7, 100)
    for step in (0, 1, 3, max(max_steps - 2, 0), max(max_steps - 1, 0), max_steps)
    for start, end in ((0.996, 1.0), (1.0, 0.0), (0.5, 0.5))
    for period in (None, 1, 10)
]


def test_endpoints():
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(99, 100, 0.996, 1.0) == 1.0
    assert cosine_schedule(50, 101, 0.0, 1.0) == pytest.approx(0.5)
    assert cosine_schedule(5, 10, 0.0, 1.0, period=10) == pytest.approx(1.0)
    assert isinstance(cosine_schedule(3, 10, 0.0, 1.0), float)


@pytest.mark.parametrize("case", CASES)
def test_matches_lightly(case):
    scheduler = pytest.importorskip("lightly.utils.scheduler")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cosine_schedule(*case) == scheduler.cosine_schedule(*case)


def test_errors_and_warnings():
    with pytest.raises(ValueError, match="can't be negative"):
        cosine_schedule(-1, 10, 0.0, 1.0)
    with pytest.raises(ValueError, match="can't be negative"):
        cosine_schedule(1, -10, 0.0, 1.0)
    with pytest.raises(ValueError, match="Period"):
        cosine_schedule(1, 10, 0.0, 1.0, period=0)
    with pytest.warns(RuntimeWarning, match="exceeds max_steps"):
        assert cosine_schedule(11, 10, 0.0, 1.0) == 1.0
