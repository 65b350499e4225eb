"""OptEmbed stage 2: evolutionary search of one width per field.

A candidate is a tuple of widths (one per field, multiples of ``step`` in [step, dim]);
its fitness is the validation AUC of the supernet evaluated at those widths (the
caller's ``fitness`` function). Generation 0 is ``population`` random candidates; each
iteration sorts the population by fitness, then breeds the next generation from the
best ``parents``: ``mutation_num`` mutants (each field re-drawn with probability
``mutation_prob``) and ``crossover_num`` children (one crossover point over the fields).

Deliberately unlike the reference code: candidates are immutable tuples (a parent is
never mutated in place), the crossover point is drawn over the *fields*, widths are
stored as widths (no index + 1 to forget when counting parameters), and evaluated
candidates are cached (a duplicate costs nothing).

Budget-aware mode (beyond the paper): with ``cost`` and ``budget``, a candidate over the
budget is infeasible. Generated candidates are repaired (the field whose narrowing saves
most drops one step) until feasible, so only feasible candidates are ever evaluated or
returned. Deterministic under ``seed``; ``state_path`` makes it resumable per iteration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

Candidate = tuple[int, ...]


class SearchInfeasible(ValueError):
    """Even the narrowest candidate is over the budget."""


@dataclass
class SearchResult:
    dims: Candidate
    fitness: float
    evaluations: int
    history: list[dict[str, Any]] = field(default_factory=list)


class EvolutionarySearch:
    def __init__(
        self,
        num_fields: int,
        dim: int,
        step: int = 4,
        *,
        population: int = 20,
        mutation_num: int = 10,
        crossover_num: int = 10,
        parents: int = 10,
        iterations: int = 30,
        mutation_prob: float = 0.1,
        seed: int = 0,
        cost: Callable[[Candidate], int] | None = None,
        budget: int | None = None,
    ) -> None:
        if step < 1 or dim % step:
            raise ValueError(f"search: step {step} must divide dim {dim}")
        self.nf, self.dim, self.step = num_fields, dim, step
        self.choices = list(range(step, dim + 1, step))
        self.population, self.mutation_num, self.crossover_num = population, mutation_num, crossover_num
        self.parents, self.iterations, self.mutation_prob = parents, iterations, mutation_prob
        self.seed = seed
        self.cost, self.budget = cost, budget
        if budget is not None:
            if cost is None:
                raise ValueError("search: a budget needs a cost function")
            narrow = (step,) * num_fields
            if cost(narrow) > budget:
                raise SearchInfeasible(
                    f"even the narrowest candidate (every field {step} wide) costs {cost(narrow)} bytes, "
                    f"over the budget {budget}: prune more rows "
                    "(raise embedding.optembed.alpha or threshold_lr) or raise embedding.budget")

    # ---- operators (pure given the RNG; never modify their inputs) -----------------------
    def feasible(self, cand: Candidate) -> bool:
        return self.budget is None or self.cost(cand) <= self.budget  # type: ignore[misc]

    def repair(self, cand: Candidate) -> Candidate:
        """Narrow fields, the one that saves most bytes first, until within budget."""
        if self.feasible(cand):
            return cand
        c = list(cand)
        while not self.feasible(tuple(c)):
            base = self.cost(tuple(c))  # type: ignore[misc]
            best, gain = -1, -1
            for i in range(self.nf):
                if c[i] > self.step:
                    trial = c.copy()
                    trial[i] -= self.step
                    g = base - self.cost(tuple(trial))  # type: ignore[misc]
                    if g > gain:
                        best, gain = i, g
            c[best] -= self.step  # best >= 0: the all-narrow candidate is feasible (checked)
        return tuple(c)

    def random_candidate(self, rng: np.random.Generator) -> Candidate:
        return self.repair(tuple(int(x) for x in rng.choice(self.choices, size=self.nf)))

    def mutate(self, parent: Candidate, rng: np.random.Generator) -> Candidate:
        redraw = rng.random(self.nf) < self.mutation_prob
        fresh = rng.choice(self.choices, size=self.nf)
        return self.repair(tuple(int(f) if r else p for p, r, f in zip(parent, redraw, fresh, strict=True)))

    def crossover(self, a: Candidate, b: Candidate, rng: np.random.Generator) -> Candidate:
        """Fields [0, point) from a, [point, nf) from b; point drawn over the fields."""
        if self.nf < 2:
            return a
        point = int(rng.integers(1, self.nf))
        return self.repair(a[:point] + b[point:])

    def next_generation(self, ranked: list[Candidate], rng: np.random.Generator) -> list[Candidate]:
        top = ranked[: max(1, self.parents)]
        out = [self.mutate(top[int(rng.integers(len(top)))], rng) for _ in range(self.mutation_num)]
        for _ in range(self.crossover_num):
            i, j = (int(x) for x in rng.choice(len(top), size=2, replace=len(top) < 2))
            out.append(self.crossover(top[i], top[j], rng))
        return out

    # ---- the loop ------------------------------------------------------------------------
    def run(self, fitness: Callable[[Candidate], float], state_path: Path | None = None,
            progress: bool = True, save: bool = True) -> SearchResult:
        """``state_path``: resume from it if present; rewrite it after every generation
        (``save=False``: read only, for ranks other than 0)."""
        st = self._load(state_path)
        if st is None:
            rng = np.random.default_rng(self.seed)
            st = {"iteration": 0, "cache": {}, "history": [],
                  "population": [self.random_candidate(rng) for _ in range(self.population)]}
        else:
            rng = np.random.default_rng()
            rng.bit_generator.state = st["rng"]
        cache: dict[Candidate, float] = st["cache"]
        bar = tqdm(total=self.iterations, initial=st["iteration"], desc="search", unit="gen",
                   disable=not progress, dynamic_ncols=True)
        while st["iteration"] < self.iterations:
            pop: list[Candidate] = st["population"]
            for c in pop:
                if c not in cache:
                    cache[c] = float(fitness(c))
            # Sort by fitness, ties by the candidate itself: deterministic.
            ranked = sorted(dict.fromkeys(pop), key=lambda c: (-_finite(cache[c]), c))
            best = max(cache, key=lambda c: (_finite(cache[c]), tuple(-x for x in c)))
            st["history"].append({"iteration": st["iteration"], "best_fitness": cache[best],
                                  "generation_best": cache[ranked[0]], "generation_worst": cache[ranked[-1]],
                                  "evaluations": len(cache), "best_dims": list(best)})
            st["population"] = self.next_generation(ranked, rng)
            st["iteration"] += 1
            st["rng"] = rng.bit_generator.state
            if save:
                self._save(state_path, st)
            bar.set_postfix(best_auc=f"{cache[best]:.4f}", evals=len(cache))
            bar.update(1)
        bar.close()
        best = max(cache, key=lambda c: (_finite(cache[c]), tuple(-x for x in c)))
        return SearchResult(best, cache[best], len(cache), st["history"])

    def _save(self, path: Path | None, st: dict[str, Any]) -> None:
        if path is None:
            return
        data = {**st, "cache": [[list(c), f] for c, f in st["cache"].items()],
                "population": [list(c) for c in st["population"]], "seed": self.seed}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)

    def _load(self, path: Path | None) -> dict[str, Any] | None:
        if path is None or not path.exists():
            return None
        data = json.loads(path.read_text())
        if data.get("seed") != self.seed:
            return None
        data["cache"] = {tuple(c): f for c, f in data["cache"]}
        data["population"] = [tuple(c) for c in data["population"]]
        return data


def _finite(x: float) -> float:
    return x if x is not None and math.isfinite(x) else -math.inf
