"""`month_start` remembers the month it last computed (it runs for every metered request): the
answer must still be the calendar month of any time asked for, in any order, across month and
year ends."""

from __future__ import annotations

import calendar
import time

from hypothesis import given
from hypothesis import strategies as st

from ferroserve.gateway.store import month_start


def _month_start_uncached(now: float) -> float:
    t = time.gmtime(now)
    return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0, 0, 0, 0)))


def test_month_start_at_the_edges_of_months_and_years():
    new_year = calendar.timegm((2027, 1, 1, 0, 0, 0, 0, 0, 0))
    march = calendar.timegm((2028, 3, 1, 0, 0, 0, 0, 0, 0))  # after a leap February
    for now in (new_year - 0.001, new_year, new_year - 0.001, new_year + 31 * 86400 - 0.001, new_year + 31 * 86400,
                march - 0.5, march, march - 0.5, 0.0):
        assert month_start(now) == _month_start_uncached(now), now


@given(st.lists(st.floats(min_value=0, max_value=4e9), min_size=1, max_size=20))
def test_month_start_matches_the_calendar_in_any_order(times):
    for now in times:
        assert month_start(now) == _month_start_uncached(now), now
