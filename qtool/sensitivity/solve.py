"""The multiple-choice knapsack behind `qtool sensitivity`: one candidate per tensor, least cost within a byte budget.

Every tensor has candidates (a quant type each) with exact bytes and a predicted cost (quality loss); `solve`
picks one per tensor so that the summed cost is least while the summed bytes stay <= budget. The problem is
NP-hard in general, but the instances are friendly (a few hundred tensors, <= 8 candidates each):

1. Per tensor, dominated candidates (more bytes, not less cost) are dropped; the rest form a frontier whose cost
   falls as bytes grow. Its lower convex hull gives upgrade segments of falling cost-per-byte gain.
2. LP relaxation: start every tensor at its smallest candidate and take hull segments in order of gain (a heap
   merge of the per-tensor sequences). The first segment that does not fit, taken fractionally, gives the LP
   optimum, a proven lower bound; skipping non-fitting segments gives a feasible greedy solution.
3. Improve: a best-improvement local search over single moves (any tensor to any frontier candidate) and pair
   moves (one tensor down, one up) runs until no move lowers the cost. If the result meets the LP bound it is
   optimal; otherwise an exact DP over byte totals, pruned by that result plus LP bounds (branch and bound), runs
   while tensors x states stays <= `exact_limit` and, when it completes, gives the optimum. When it does not,
   the local-search result stands, marked optimal=False, with the LP bound telling how far from optimal at worst.
   Realistic instances (hundreds of tensors, k-quant sizes) end optimal in well under a second.

Determinism: tensors are processed in name order and candidates in (bytes, cost, name) order, so the answer
never depends on dict order. Among equally good choices the earlier one in that order wins (the smaller name
among identical candidates, the fewer bytes among equal-cost mixes, the earlier tensor among equal moves).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from qtool.errors import UsageError


@dataclass(frozen=True)
class Choice:
    """One candidate of one tensor."""

    name: str  # candidate name, e.g. "q4_k"
    bytes: int  # exact bytes on disk
    cost: float  # predicted cost (>= 0)


@dataclass(frozen=True)
class Solution:
    """The picked mix, its totals, and how good it is proven to be."""

    picks: dict[str, str]  # tensor -> candidate name
    bytes: int  # sum of picked bytes
    cost: float  # sum of picked costs
    optimal: bool  # proven optimal (exact DP, LP bound met, or the budget allows every cheapest pick)
    lower_bound: float  # proven lower bound on the optimal cost (LP relaxation), <= cost


_REL_TOL = 1e-12  # a move must lower the cost by more than this fraction of it: stops float ping-pong
_MAX_MOVES = 10_000  # bound on local-search moves; each strictly improves, and a few suffice from the greedy


# ---------------------------------------------------------------------------------------------------------------
# preparation


def _frontier(tensor: str, choices: list[Choice]) -> list[Choice]:
    """The undominated candidates, bytes ascending and cost strictly descending.

    A candidate with more (or equal) bytes and no lower cost than another can never be in a better solution, so it
    is dropped before anything else; of identical (bytes, cost) twins the smaller name stays.
    """
    if not choices:
        raise ValueError(f"tensor {tensor!r} has no candidates")
    names = set()
    for c in choices:
        if c.name in names:
            raise ValueError(f"tensor {tensor!r}: candidate {c.name!r} appears twice")
        names.add(c.name)
        if isinstance(c.bytes, bool) or not isinstance(c.bytes, (int, np.integer)) or c.bytes < 0:
            raise ValueError(f"tensor {tensor!r}: candidate {c.name!r} needs a whole number of bytes >= 0, got {c.bytes!r}")
        if not (math.isfinite(c.cost) and c.cost >= 0):
            raise ValueError(f"tensor {tensor!r}: candidate {c.name!r} needs a finite cost >= 0, got {c.cost!r}")
    out: list[Choice] = []
    for c in sorted(choices, key=lambda c: (c.bytes, c.cost, c.name)):
        if not out or c.cost < out[-1].cost:
            out.append(c)
    return out


def _hull(front: list[Choice]) -> list[int]:
    """Indices of the lower convex hull of a frontier's (bytes, cost) points, left to right.

    Along the hull the gain per byte of each upgrade falls, which is what makes taking upgrades greedily by gain
    the LP optimum. Collinear middle points are dropped so gains fall strictly.
    """
    hull: list[int] = []
    for i, p in enumerate(front):
        while len(hull) >= 2:
            a, b = front[hull[-2]], front[hull[-1]]
            # b is not strictly below the line a-p: slope(a, b) >= slope(a, p)
            if (b.cost - a.cost) * (p.bytes - a.bytes) >= (p.cost - a.cost) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _prepare(items: dict[str, list[Choice]]) -> tuple[list[str], list[list[Choice]]]:
    names = sorted(items)
    return names, [_frontier(t, list(items[t])) for t in names]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def feasible_range(items: dict[str, list[Choice]]) -> tuple[int, int]:
    """(bytes of the smallest mix, bytes of the largest useful mix).

    The largest useful mix is every tensor's cheapest candidate (the smaller one among equal costs): more budget
    than that cannot lower the cost any further.
    """
    _, fronts = _prepare(items)
    return sum(f[0].bytes for f in fronts), sum(f[-1].bytes for f in fronts)


# ---------------------------------------------------------------------------------------------------------------
# step 1: LP relaxation and greedy


def _greedy(fronts: list[list[Choice]], hulls: list[list[int]], budget: int) -> tuple[list[int], float]:
    """Greedy picks (frontier indices) and the LP lower bound.

    Upgrades along each tensor's hull are merged by gain (cost saved per byte) through a heap keyed by (-gain,
    tensor index), so equal gains go to the earlier tensor. The first upgrade that does not fit ends the LP:
    the bound is the cost so far minus the leftover bytes spent at that upgrade's gain. The greedy then keeps
    taking upgrades of other tensors that still fit; a tensor whose next upgrade did not fit stops there.
    """
    picks = [0] * len(fronts)  # frontier index; hull position 0 is frontier index 0 (the smallest candidate)
    pos = [0] * len(fronts)  # position along the hull
    used = sum(f[0].bytes for f in fronts)
    cost = math.fsum(f[0].cost for f in fronts)
    lp_bound = None

    def push(heap, t):
        h = hulls[t]
        if pos[t] + 1 < len(h):
            a, b = fronts[t][h[pos[t]]], fronts[t][h[pos[t] + 1]]
            heapq.heappush(heap, (-(a.cost - b.cost) / (b.bytes - a.bytes), t))

    heap: list[tuple[float, int]] = []
    for t in range(len(fronts)):
        push(heap, t)
    while heap:
        neg_gain, t = heapq.heappop(heap)
        a, b = fronts[t][hulls[t][pos[t]]], fronts[t][hulls[t][pos[t] + 1]]
        if used + b.bytes - a.bytes > budget:
            if lp_bound is None:
                lp_bound = cost + neg_gain * (budget - used)
            continue
        used += b.bytes - a.bytes
        cost += b.cost - a.cost
        pos[t] += 1
        picks[t] = hulls[t][pos[t]]
        push(heap, t)
    if lp_bound is None:  # every upgrade fitted: the greedy is the LP optimum and integral
        lp_bound = cost
    return picks, lp_bound


# ---------------------------------------------------------------------------------------------------------------
# step 2a: exact DP


def _segments(fronts: list[list[Choice]], hulls: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every hull upgrade as (tensor, bytes, cost saved), ordered by gain (saved per byte), ties by tensor."""
    rows = []
    for t, (f, h) in enumerate(zip(fronts, hulls)):
        for a, b in zip(h, h[1:]):
            saved, extra = f[a].cost - f[b].cost, f[b].bytes - f[a].bytes
            rows.append((-saved / extra, t, extra, saved))
    rows.sort()
    return (np.array([r[1] for r in rows], dtype=np.int64), np.array([r[2] for r in rows], dtype=np.float64),
            np.array([r[3] for r in rows], dtype=np.float64))


def _lp_saving(seg_b: np.ndarray, seg_s: np.ndarray, room: np.ndarray) -> np.ndarray:
    """The most cost the LP can save with `room` extra bytes (per entry), given upgrades in order of gain."""
    if not len(seg_b):
        return np.zeros(len(room))
    cum_b = np.concatenate(([0.0], np.cumsum(seg_b)))
    cum_s = np.concatenate(([0.0], np.cumsum(seg_s)))
    whole = np.searchsorted(cum_b, room, side="right") - 1  # upgrades that fit entirely
    nxt = np.minimum(whole, len(seg_b) - 1)
    part = np.where(whole < len(seg_b), (room - cum_b[whole]) * (seg_s[nxt] / seg_b[nxt]), 0.0)
    return cum_s[whole] + part


def _exact_dp(fronts: list[list[Choice]], hulls: list[list[int]], budget: int, limit: int,
              incumbent: list[int]) -> list[int] | None:
    """Optimal picks by DP over byte totals, or None when the states would exceed `limit`.

    Bytes are counted above each tensor's smallest candidate. After each tensor only Pareto states are kept
    (a byte total whose cost is strictly below that of every smaller total), stored sparsely as sorted arrays;
    their number is at most the number of distinct reachable byte totals (<= capacity / GCD + 1), so no dense
    table and hence no GCD division is needed. States that cannot beat the incumbent (their cost plus the LP
    bound of the remaining tensors in the remaining bytes exceeds the incumbent's cost) are dropped too: this
    branch-and-bound pruning is what makes the DP fit realistic instances. The DP gives up once tensors x states
    would pass `limit`, which bounds both time and the back-pointer memory. If no state survives, nothing beats
    the incumbent, which is then optimal.
    """
    n = len(fronts)
    cap = budget - sum(f[0].bytes for f in fronts)
    upper = math.fsum(f[j].cost for f, j in zip(fronts, incumbent))
    slack = 1e-9 * upper + 1e-300  # keeps states whose bound ties the incumbent up to float rounding
    seg_t, seg_b, seg_s = _segments(fronts, hulls)
    rest = np.cumsum([0.0] + [f[0].cost for f in reversed(fronts)])[::-1]  # rest[i]: base cost of tensors i..
    st_bytes = np.zeros(1, dtype=np.int64)
    st_cost = np.zeros(1, dtype=np.float64)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for i, f in enumerate(fronts):
        extra = np.array([c.bytes - f[0].bytes for c in f], dtype=np.int64)
        costs = np.array([c.cost for c in f], dtype=np.float64)
        nb = (st_bytes[:, None] + extra[None, :]).ravel()
        nc = (st_cost[:, None] + costs[None, :]).ravel()
        idx = np.flatnonzero(nb <= cap)  # row-major: parent state first, then candidate
        nb, nc = nb[idx], nc[idx]
        order = np.lexsort((nc, nb))  # by bytes, then cost; stable, so ties keep the row-major order
        nb, nc, idx = nb[order], nc[order], idx[order]
        keep = np.ones(len(nc), dtype=bool)
        keep[1:] = nc[1:] < np.minimum.accumulate(nc)[:-1]
        later = seg_t > i
        bound = nc + rest[i + 1] - _lp_saving(seg_b[later], seg_s[later], (cap - nb).astype(np.float64))
        keep &= bound <= upper + slack
        st_bytes, st_cost, idx = nb[keep], nc[keep], idx[keep]
        if n * len(st_bytes) > limit:
            return None
        if not len(st_bytes):
            return list(incumbent)
        back.append((idx // len(f), idx % len(f)))  # (parent state, candidate)
    # the last Pareto state has the most bytes within the budget and the lowest cost
    picks = [0] * n
    state = len(st_bytes) - 1
    for t in range(n - 1, -1, -1):
        parent, choice = back[t]
        picks[t] = int(choice[state])
        state = int(parent[state])
    return picks


# ---------------------------------------------------------------------------------------------------------------
# step 2b: local search


def _padded(fronts: list[list[Choice]]) -> tuple[np.ndarray, np.ndarray]:
    """Frontiers as (tensors x max candidates) arrays; padding has infinite bytes and cost so no move picks it."""
    k = max(len(f) for f in fronts)
    b = np.full((len(fronts), k), np.inf)
    c = np.full((len(fronts), k), np.inf)
    for t, f in enumerate(fronts):
        b[t, : len(f)] = [x.bytes for x in f]  # float64 is exact for totals below 2**53 bytes
        c[t, : len(f)] = [x.cost for x in f]
    return b, c


def _best_single(db: np.ndarray, dc: np.ndarray, slack: float, tol: float) -> tuple[int, int] | None:
    """The single move (tensor, candidate) that fits and saves the most cost, or None."""
    gain = np.where(db <= slack, dc, np.inf)
    i = int(np.argmin(gain))  # first minimum: earliest tensor, then earliest candidate
    if not gain.flat[i] < -tol:
        return None
    return divmod(i, db.shape[1])


def _best_pair(db: np.ndarray, dc: np.ndarray, slack: float, tol: float) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The best pair of moves of two different tensors: one frees bytes, the other spends them on a larger saving.

    Only upgrades that do not fit alone and downgrades (fewer bytes, hence more cost on a frontier) are paired;
    an upgrade that fits alone would have been taken as a single move.
    """
    k = db.shape[1]
    up = np.flatnonzero((dc < -tol).ravel() & (db > slack).ravel())
    down = np.flatnonzero((db < 0).ravel())
    if not len(up) or not len(down):
        return None
    dbf, dcf = db.ravel(), dc.ravel()
    total = dcf[up][:, None] + dcf[down][None, :]
    fits = dbf[up][:, None] + dbf[down][None, :] <= slack
    same = (up // k)[:, None] == (down // k)[None, :]
    total = np.where(fits & ~same, total, np.inf)
    i = int(np.argmin(total))
    u, d = divmod(i, len(down))
    if not total[u, d] < -tol:
        return None
    return divmod(int(up[u]), k), divmod(int(down[d]), k)


def _local_search(fronts: list[list[Choice]], picks: list[int], budget: int) -> list[int]:
    """Best-improvement local search from `picks` over single and pair moves, until none lowers the cost.

    Each step recomputes every move's byte and cost change against the current picks (vectorised) and applies
    the best single move, or else the best pair; a move must save more than a 1e-12 fraction of the cost.
    """
    b, c = _padded(fronts)
    picks = list(picks)
    rows = np.arange(len(fronts))
    for _ in range(_MAX_MOVES):
        cur_b, cur_c = b[rows, picks], c[rows, picks]
        slack = budget - cur_b.sum()
        tol = _REL_TOL * cur_c.sum()
        db, dc = b - cur_b[:, None], c - cur_c[:, None]
        single = _best_single(db, dc, slack, tol)
        if single is not None:
            moves = [single]
        else:
            pair = _best_pair(db, dc, slack, tol)
            if pair is None:
                break
            moves = list(pair)
        for t, j in moves:
            picks[t] = j
    return picks


# ---------------------------------------------------------------------------------------------------------------
# the solver


def _solution(names, fronts, picks, lower_bound: float, optimal: bool) -> Solution:
    chosen = [f[j] for f, j in zip(fronts, picks)]
    cost = _cost(fronts, picks)
    return Solution(picks={t: ch.name for t, ch in zip(names, chosen)}, bytes=sum(ch.bytes for ch in chosen), cost=cost,
                    optimal=optimal, lower_bound=min(lower_bound, cost))


def _cost(fronts, picks) -> float:
    return math.fsum(f[j].cost for f, j in zip(fronts, picks))


def _meets_bound(cost: float, lower_bound: float) -> bool:
    return cost <= lower_bound or math.isclose(cost, lower_bound, rel_tol=_REL_TOL, abs_tol=0.0)


def solve(items: dict[str, list[Choice]], budget: int, *, exact_limit: int = 2_000_000) -> Solution:
    """Pick one candidate per tensor: least total cost with total bytes <= budget.

    `exact_limit` bounds the exact DP's work (tensors x surviving states); 0 leaves only greedy + local search.

    Raises UsageError when even the smallest mix exceeds the budget (the message gives the feasible range), and
    ValueError for malformed input (a tensor without candidates, negative bytes or cost, duplicate names).
    A budget above the largest useful mix is not an error: the answer is every tensor's cheapest candidate.
    """
    names, fronts = _prepare(items)
    # byte totals are whole, so a fractional budget allows what its floor allows
    budget = int(budget) if isinstance(budget, (int, np.integer)) else math.floor(budget)
    lo, hi = sum(f[0].bytes for f in fronts), sum(f[-1].bytes for f in fronts)
    if budget < lo:
        raise UsageError(f"budget {_mb(budget)} ({budget} bytes) is below the smallest mix this candidate set allows "
                         f"({_mb(lo)}, {lo} bytes); feasible: {_mb(lo)} – {_mb(hi)} ({lo}–{hi} bytes)")
    if not fronts or budget >= hi:
        cheapest = [len(f) - 1 for f in fronts]
        lb = math.fsum(f[-1].cost for f in fronts)
        return _solution(names, fronts, cheapest, lb, optimal=True)
    hulls = [_hull(f) for f in fronts]
    picks, lower_bound = _greedy(fronts, hulls, budget)
    if _meets_bound(_cost(fronts, picks), lower_bound):
        return _solution(names, fronts, picks, lower_bound, optimal=True)
    picks = _local_search(fronts, picks, budget)
    if _meets_bound(_cost(fronts, picks), lower_bound):
        return _solution(names, fronts, picks, lower_bound, optimal=True)
    exact = _exact_dp(fronts, hulls, budget, exact_limit, picks)
    if exact is not None:
        return _solution(names, fronts, exact, lower_bound, optimal=True)
    return _solution(names, fronts, picks, lower_bound, optimal=False)
