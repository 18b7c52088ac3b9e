"""Depth cuts: which body segments each module holds.

ResNet-32 with K in {1, 2, 4, 8, 16} uses the paper's cut table (DESIGN §3);
any other integer K is balanced by MACs (contiguous, minimising the maximum), or with ``cuts.balance: memory``
any K by the activation bytes the units save (the memory model, DESIGN §4.1);
an explicit list names the units to cut after.
"""

from __future__ import annotations

import re

from ..errors import PartitionError
from ..graph.build import OpGraph
from .memory import op_graph_bytes

# cut after block b of stage s; (0, 0) is the stem. The final (3, 4) cut is the head boundary.
RESNET32_CUTS: dict[int, list[tuple[int, int]]] = {
    1: [],
    2: [(2, 1)],
    4: [(1, 2), (2, 1), (3, 0)],
    8: [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)],
    16: [(0, 0)] + [(s, b) for s in (1, 2, 3) for b in range(5)][:-1],
}


def _unit_name(stage: int, block: int) -> str:
    return "stem" if stage == 0 else f"s{stage}.b{block}"


def balanced_split(costs: list[int], k: int) -> list[int]:
    """Split ``costs`` into ``k`` contiguous non-empty runs minimising the largest sum.

    Returns:
        the start index of each run (first is 0).
    """
    n = len(costs)
    if not 1 <= k <= n:
        raise PartitionError(f"cannot split {n} pieces into {k} parts")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # dp[j][i]: best max cost splitting the first i pieces into j parts, from row dp[j-1] (``prev``).
    # dp[j-1][s] grows with s and the last run prefix[i] - prefix[s] shrinks, so the best s sits at
    # their crossing, which only moves right as i grows: O(k·n) instead of O(k·n²) (n, k ≤ 4096).
    # Ties go to the smallest s, as a scan over every s would pick.
    first = list(range(n + 1))  # first[s]: the smallest t with prefix[t] == prefix[s] (zero-cost pieces)
    for s in range(1, n + 1):
        if prefix[s] == prefix[s - 1]:
            first[s] = first[s - 1]
    inf = float("inf")
    prev = [inf] * (n + 1)
    prev[0] = 0
    arg = [[0] * (n + 1) for _ in range(k + 1)]
    for j in range(1, k + 1):
        cur = [inf] * (n + 1)
        s = j - 1  # the first s with prev[s] >= prefix[i] - prefix[s]
        for i in range(j, n - (k - j) + 1):
            while s < i and prev[s] < prefix[i] - prefix[s]:
                s += 1
            best, besti = inf, j - 1
            if s > j - 1:  # left of the crossing the last run decides: smallest at s - 1
                best, besti = prefix[i] - prefix[s - 1], max(j - 1, first[s - 1])
            if s < i and prev[s] < best:
                best, besti = prev[s], s
            cur[i], arg[j][i] = best, besti
        prev = cur
    starts, i = [], n
    for j in range(k, 0, -1):
        s = arg[j][i]
        starts.append(s)
        i = s
    return sorted(starts)


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def name_ranges(names: list[str], limit: int = 40) -> str:
    """``names`` for a message, runs of consecutive numbers shortened: ``stem, s1.b0..s1.b2, s2.b0..s2.b3``
    (at most ``limit`` entries, then ``...``)."""
    runs: list[list] = []  # [prefix, first, last, first name, last name]
    for nm in names:
        m = _NUMBERED.match(nm)
        if m and runs and runs[-1][0] == m[1] and runs[-1][2] == int(m[2]) - 1:
            runs[-1][2], runs[-1][4] = int(m[2]), nm
        else:
            runs.append([m[1], int(m[2]), int(m[2]), nm, nm] if m else [None, 0, -1, nm, nm])
    parts = [r[3] if r[3] == r[4] else (f"{r[3]}, {r[4]}" if r[2] == r[1] + 1 else f"{r[3]}..{r[4]}")
             for r in runs]
    return ", ".join(parts[:limit]) + (", ..." if len(parts) > limit else "")


def module_segments(og: OpGraph, depth: int | list, template: str | None, balance: str = "macs") -> list[list[int]]:
    """Resolve ``cuts.depth`` into lists of body-segment indices, one list per module.

    Args:
        og: the op graph.
        depth: ``cuts.depth`` of the spec (K or cut points).
        template: the model template name, if any.

    Raises:
        PartitionError: K larger than the number of body segments, cut points that are
            unknown, out of range, duplicated or out of order.
    """
    body = og.body_segments
    n = len(body)
    if isinstance(depth, int):
        if depth > n:
            raise PartitionError(f"K={depth} is larger than the {n} units that can be cut "
                                 f"({', '.join(s.name for s in body[:6])}{', ...' if n > 6 else ''}); use K ≤ {n}")
        if balance == "memory":
            starts = balanced_split([op_graph_bytes(og, s.nodes) for s in body], depth)
        elif template == "resnet32" and depth in RESNET32_CUTS:
            names = [_unit_name(s, b) for s, b in RESNET32_CUTS[depth]]
            index = {s.name: s.index for s in body}
            ends = [index[nm] for nm in names]
            starts = [0] + [e + 1 for e in ends]
        else:
            starts = balanced_split([sum(og.node(v)["macs"] for v in s.nodes) for s in body], depth)
    else:
        by_name = {u: s.index for s in og.segments for u in s.units}
        n_units = sum(len(s.units) for s in og.segments)
        unit_seg = [s.index for s in og.segments for _ in s.units]
        ends = []
        for i, c in enumerate(depth):
            if isinstance(c, int):
                if not 0 <= c < n_units:
                    raise PartitionError(f"cut point {c} is out of range: unit indices run 0..{n_units - 1}")
                seg = unit_seg[c]
            elif c in by_name:
                seg = by_name[c]
            else:
                raise PartitionError(f"cut point '{c}' names no unit; units that can be cut after: "
                                     f"{name_ranges([s.name for s in body])}")
            if seg >= n:
                raise PartitionError(f"cut point {c!r} is inside the classifier; cut before it")
            if seg == n - 1:
                if i != len(depth) - 1:
                    raise PartitionError(f"cut point {c!r} is the last body unit (the final-head boundary) but "
                                         "is not the last cut; list cut points in network order")
                continue  # the head boundary is implied by local.final_head.mode
            if ends and seg <= ends[-1]:
                raise PartitionError(f"cut point {c!r} does not come after the previous one ({depth[i - 1]!r}); "
                                     "list cut points in network order, each once, and not two in the same unit")
            ends.append(seg)
        starts = [0] + [e + 1 for e in ends]
    bounds = starts + [n]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
