"""The budgeted mix solver: exact against brute force, bounds, determinism, errors, and a realistic instance."""

from __future__ import annotations

import itertools
import math
import random
import time

import numpy as np
import pytest

from qtool.errors import UsageError
from qtool.sensitivity.solve import Choice, Solution, feasible_range, solve


def random_instance(rng: random.Random, n_tensors: int, n_cands: int) -> dict[str, list[Choice]]:
    """Small random instance; costs rounded to 1/8 and bytes drawn from a short range so ties and dominated
    candidates both occur."""
    items = {}
    for t in range(n_tensors):
        items[f"t{t}"] = [Choice(f"c{j}", rng.randrange(0, 400, rng.choice([1, 2, 8])), rng.randrange(0, 80) / 8)
                          for j in range(n_cands)]
    return items


def brute_force(items: dict[str, list[Choice]], budget: int) -> float:
    best = math.inf
    for combo in itertools.product(*items.values()):
        if sum(c.bytes for c in combo) <= budget:
            best = min(best, math.fsum(c.cost for c in combo))
    return best


def check_consistent(items: dict[str, list[Choice]], sol: Solution, budget: int) -> None:
    """The picks exist, the totals are theirs, the budget holds, and the bound is below the cost."""
    assert set(sol.picks) == set(items)
    chosen = [next(c for c in items[t] if c.name == sol.picks[t]) for t in items]
    assert sol.bytes == sum(c.bytes for c in chosen) <= budget
    assert sol.cost == pytest.approx(math.fsum(c.cost for c in chosen), rel=1e-12, abs=1e-12)
    assert sol.lower_bound <= sol.cost


def test_matches_brute_force_and_heuristic_stays_sound():
    rng = random.Random(1234)
    for _ in range(200):
        items = random_instance(rng, rng.randint(2, 6), rng.randint(2, 4))
        lo, hi = feasible_range(items)
        budget = rng.randint(lo, hi)
        best = brute_force(items, budget)

        sol = solve(items, budget)
        check_consistent(items, sol, budget)
        assert sol.optimal
        assert sol.cost == pytest.approx(best, rel=1e-9, abs=1e-9)

        # greedy + local search alone: feasible, never better than the optimum, and its LP bound holds for it
        heur = solve(items, budget, exact_limit=0)
        check_consistent(items, heur, budget)
        assert heur.cost >= best - 1e-9
        assert heur.lower_bound <= best + 1e-9
        if heur.optimal:
            assert heur.cost == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_exact_dp_alone_matches_brute_force(monkeypatch):
    """With the local search switched off the DP starts from the greedy's weaker incumbent and must still find
    the optimum (on the instances above the local search often leaves it nothing to do)."""
    import qtool.sensitivity.solve as solve_module

    monkeypatch.setattr(solve_module, "_local_search", lambda fronts, picks, budget: picks)
    rng = random.Random(4321)
    for _ in range(100):
        items = random_instance(rng, rng.randint(3, 6), rng.randint(2, 4))
        lo, hi = feasible_range(items)
        budget = rng.randint(lo, hi)
        sol = solve(items, budget)
        check_consistent(items, sol, budget)
        assert sol.optimal
        assert sol.cost == pytest.approx(brute_force(items, budget), rel=1e-9, abs=1e-9)


def test_larger_budget_never_costs_more():
    rng = random.Random(7)
    for _ in range(10):
        items = random_instance(rng, 5, 4)
        lo, hi = feasible_range(items)
        costs = [solve(items, b).cost for b in range(lo, hi + 2, max(1, (hi - lo) // 40))]
        assert all(later <= earlier + 1e-12 for earlier, later in zip(costs, costs[1:]))


def test_dominated_candidates_never_picked():
    items = {
        "a": [Choice("small", 10, 5.0), Choice("same_bytes_worse", 10, 6.0), Choice("big", 30, 1.0),
              Choice("bigger_same_cost", 40, 1.0), Choice("bigger_worse", 50, 2.0)],
        "b": [Choice("x", 20, 3.0), Choice("y", 25, 3.0), Choice("z", 40, 0.5)],
    }
    dominated = {"same_bytes_worse", "bigger_same_cost", "bigger_worse", "y"}
    lo, hi = feasible_range(items)
    assert (lo, hi) == (30, 70)
    for budget in range(lo, hi + 30):
        assert not dominated & set(solve(items, budget).picks.values())

    rng = random.Random(99)
    for _ in range(50):
        items = random_instance(rng, 4, 4)
        lo, hi = feasible_range(items)
        sol = solve(items, rng.randint(lo, hi))
        for t, name in sol.picks.items():
            pick = next(c for c in items[t] if c.name == name)
            assert not any(c.bytes <= pick.bytes and c.cost < pick.cost for c in items[t])
            assert not any(c.bytes < pick.bytes and c.cost <= pick.cost for c in items[t])


def test_ties_are_deterministic_under_shuffling():
    # identical tensors and twin candidates: many optimal mixes, exactly one is returned whatever the order
    base = {f"t{t}": [Choice("q4_b", 40, 1.0), Choice("q4_a", 40, 1.0), Choice("q2", 20, 3.0), Choice("q8", 80, 0.0)]
            for t in range(6)}
    lo, hi = feasible_range(base)
    rng = random.Random(5)
    for budget in (lo, lo + 20, lo + 70, (lo + hi) // 2, hi - 1, hi):
        for exact_limit in (2_000_000, 0):
            want = solve(base, budget, exact_limit=exact_limit)
            assert "q4_b" not in want.picks.values()  # of identical twins the smaller name stays
            for _ in range(5):
                names = list(base)
                rng.shuffle(names)
                shuffled = {t: rng.sample(base[t], len(base[t])) for t in names}
                got = solve(shuffled, budget, exact_limit=exact_limit)
                assert got == want


def test_budget_outside_the_feasible_range():
    items = {"a": [Choice("q2", 40_000_000, 3.0), Choice("q8", 60_000_000, 0.5)],
             "b": [Choice("q2", 48_200_000, 2.0), Choice("q8", 70_500_000, 0.25)]}
    assert feasible_range(items) == (88_200_000, 130_500_000)
    with pytest.raises(UsageError, match="feasible") as err:
        solve(items, 80_000_000)
    assert "80.0 MB" in str(err.value) and "88.2 MB" in str(err.value) and "130.5 MB" in str(err.value)

    above = solve(items, 10**12)  # more than the cheapest mix needs: not an error, the cheapest mix
    assert above.picks == {"a": "q8", "b": "q8"} and above.optimal and above.lower_bound == above.cost
    assert solve(items, 88_200_000).picks == {"a": "q2", "b": "q2"}


def test_malformed_input():
    with pytest.raises(ValueError, match="blk.3.attn_q"):
        solve({"blk.0.ffn_up": [Choice("q4_k", 10, 1.0)], "blk.3.attn_q": []}, 100)
    with pytest.raises(ValueError, match="blk.3.attn_q"):
        feasible_range({"blk.3.attn_q": []})
    with pytest.raises(ValueError, match="cost"):
        solve({"t": [Choice("q4_k", 10, -1.0)]}, 100)
    assert solve({}, 0) == Solution(picks={}, bytes=0, cost=0.0, optimal=True, lower_bound=0.0)


GGUF_BPW = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "q8_0": 8.5}


def realistic_instance(seed: int, n_tensors: int, bpw: dict[str, float]) -> dict[str, list[Choice]]:
    """Llama-like linears: bytes = bits-per-weight x params (whole 256-weight blocks), cost ~ 2^(-2 bits) x a
    log-normal per-tensor sensitivity x params."""
    rng = np.random.default_rng(seed)
    shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
    items = {}
    for i in range(n_tensors):
        rows, cols = shapes[i % len(shapes)]
        params, sens = rows * cols, float(rng.lognormal(0.0, 1.0))
        items[f"blk.{i // len(shapes)}.{i % len(shapes)}"] = [
            Choice(name, int(bits * 256) // 8 * (params // 256), sens * params * 2.0 ** (-2 * bits))
            for name, bits in bpw.items()]
    return items


@pytest.mark.parametrize("frac", [0.15, 0.5, 0.85])
def test_realistic_instance_is_fast_and_tight(frac):
    items = realistic_instance(0, 250, GGUF_BPW)
    lo, hi = feasible_range(items)
    budget = int(lo + frac * (hi - lo))
    for exact_limit in (2_000_000, 0):  # full solver, and greedy + local search alone
        t0 = time.perf_counter()
        sol = solve(items, budget, exact_limit=exact_limit)
        elapsed = time.perf_counter() - t0
        check_consistent(items, sol, budget)
        assert elapsed < 2.0
        assert (sol.cost - sol.lower_bound) / sol.cost < 0.01


def test_scale_300_tensors_8_candidates():
    bpw = dict(GGUF_BPW, iq2_xs=2.3125, iq3_xxs=3.0625)
    items = realistic_instance(1, 300, bpw)
    lo, hi = feasible_range(items)
    budget = (lo + hi) // 2
    t0 = time.perf_counter()
    sol = solve(items, budget)
    assert time.perf_counter() - t0 < 2.0
    check_consistent(items, sol, budget)
    assert (sol.cost - sol.lower_bound) / sol.cost < 0.01
