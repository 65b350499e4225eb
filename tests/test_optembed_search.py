"""OptEmbed's evolutionary search: determinism, ranges, operators, budget-aware mode."""

from __future__ import annotations

import numpy as np
import pytest

from embtables.embeddings import FeatureSpec
from embtables.embeddings.optembed import plan_optembed
from embtables.experiments.optembed_search import EvolutionarySearch, SearchInfeasible

NF, DIM = 26, 16
TARGET = np.array([4, 16, 8, 12] * 6 + [16, 4])


def fitness(c: tuple[int, ...]) -> float:
    """A smooth landscape with a known optimum (TARGET)."""
    return 1.0 - float(np.abs(np.array(c) - TARGET).sum()) / 1000


def search(seed: int = 0, **kw) -> EvolutionarySearch:
    args = dict(population=20, mutation_num=10, crossover_num=10, parents=10, iterations=15,
                mutation_prob=0.1)
    args.update(kw)
    return EvolutionarySearch(NF, DIM, 4, seed=seed, **args)


def test_search_is_deterministic_under_a_seed(tmp_path):
    a = search(seed=3).run(fitness, progress=False)
    b = search(seed=3).run(fitness, progress=False)
    c = search(seed=4).run(fitness, progress=False)
    assert a.dims == b.dims and a.history == b.history and a.fitness == b.fitness
    assert c.history != a.history
    # Resumable: stopping after 5 generations and going on gives the same result.
    path = tmp_path / "state.json"
    search(seed=3, iterations=5).run(fitness, state_path=path, progress=False)
    resumed = search(seed=3).run(fitness, state_path=path, progress=False)
    assert resumed.dims == a.dims and resumed.history == a.history


def test_searched_dims_are_candidate_widths_and_improve():
    s = search(seed=0, iterations=30)
    seen = []
    r = s.run(lambda c: seen.append(c) or fitness(c), progress=False)
    for c in [r.dims, *seen]:
        assert len(c) == NF and all(1 <= d <= DIM and d % 4 == 0 for d in c)
    first_gen_best = max(fitness(c) for c in seen[:20])
    assert r.fitness >= first_gen_best and r.fitness == max(fitness(c) for c in seen)
    assert len(seen) == len(set(seen))  # evaluated candidates are cached, never re-evaluated


def test_operators_leave_parents_alone_and_cross_over_the_fields():
    s = search()
    rng = np.random.default_rng(0)
    a, b = tuple([4] * NF), tuple([16] * NF)
    for _ in range(50):
        child = s.crossover(a, b, rng)
        point = child.index(16)
        # Fields [0, point) from a, the rest from b; the point ranges over all fields,
        # not over the widths (the reference code draws it from 1..dim).
        assert child == a[:point] + b[point:] and 1 <= point < NF
        s.mutate(a, rng)
    assert a == tuple([4] * NF) and b == tuple([16] * NF)
    points = {s.crossover(a, b, rng).index(16) for _ in range(400)}
    assert max(points) > DIM  # reaches fields beyond index dim
    mutants = [s.mutate(a, rng) for _ in range(200)]
    changed = np.mean([sum(x != y for x, y in zip(m, a, strict=True)) for m in mutants])
    assert 26 * 0.1 * 0.75 * 0.5 < changed < 26 * 0.1 * 0.75 * 1.5  # p=0.1, 3 of 4 widths differ


def test_budget_aware_search_never_exceeds_the_budget():
    feats = [FeatureSpec(f"C{i}", 1000 * (i + 1)) for i in range(NF)]
    kept = [50 * (i + 1) for i in range(NF)]

    def cost(c: tuple[int, ...]) -> int:
        return plan_optembed(feats, DIM, list(c), kept).bytes

    full = cost(tuple([DIM] * NF))
    budget = int(full * 0.45)
    evaluated = []
    s = search(seed=1, iterations=10, cost=cost, budget=budget)
    r = s.run(lambda c: evaluated.append(c) or fitness(c), progress=False)
    assert cost(r.dims) <= budget
    assert evaluated and all(cost(c) <= budget for c in evaluated)
    # Independent check of the cost: (kept + 1) * width * 4 bytes + int32 keys + 3 int64 per field.
    assert cost(r.dims) == (sum((k + 1) * d * 4 for k, d in zip(kept, r.dims, strict=True))
                            + sum(kept) * 4 + NF * 24)
    with pytest.raises(SearchInfeasible, match="narrowest"):
        search(cost=cost, budget=cost(tuple([4] * NF)) - 1)
