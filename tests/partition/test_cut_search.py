"""The cut search: ``balanced_split`` (``gndgl_compiler.partition.cuts``) chooses the same cuts as
the O(k·n²) min-max dynamic programme it replaced, on random cost lists (hypothesis), and is fast
at the schema's limits (4096 units).
"""

from __future__ import annotations

import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


# ----------------------------------------------------------------------------- the cut search


def _reference_split(costs: list[int], k: int) -> list[int]:
    """The O(k·n²) min-max DP that ``balanced_split`` replaced (first minimiser on ties)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    dp = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[0] * (n + 1) for _ in range(k + 1)]
    dp[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(j - 1, i):
                v = max(dp[j - 1][s], prefix[i] - prefix[s])
                if v < dp[j][i]:
                    dp[j][i], arg[j][i] = v, s
    starts, i = [], n
    for j in range(k, 0, -1):
        i = arg[j][i]
        starts.append(i)
    return sorted(starts)


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(st.lists(st.one_of(st.just(0), st.integers(0, 5), st.integers(0, 10**9)), min_size=1, max_size=14)
       .flatmap(lambda c: st.tuples(st.just(c), st.integers(1, len(c)))))
def test_balanced_split_matches_the_quadratic_dp(case):
    from gndgl_compiler.partition.cuts import balanced_split
    costs, k = case
    assert balanced_split(costs, k) == _reference_split(costs, k)


def test_balanced_split_is_fast_at_the_schema_limits():
    """4096 units cut K=1024 ways (or 2048 partitions over 4096 workers) used to take O(k·n²): hours."""
    from gndgl_compiler.partition.cuts import balanced_split
    t0 = time.monotonic()
    starts = balanced_split([100 + i % 7 for i in range(4094)], 1024)
    assert len(starts) == 1024 and starts[0] == 0
    assert len(balanced_split([3] * 2049, 1000)) == 1000
    assert time.monotonic() - t0 < 20
