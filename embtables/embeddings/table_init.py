"""Seeded table initialisation: the same starting row for the same (seed, feature, id) in
every method.

Rows are drawn block by block from ``torch.Generator``s seeded by (module seed, key), where
the key of a block holding one logical feature's rows is that feature's name. A method that
stores a feature collisionlessly (``full``; ``hash``, ``qr``, ``unified`` at budget 1) lays the
same draws out in its own tables (at a row offset in a shared table, or a column slice of
them), so it starts from exactly ``full``'s rows, U(+-sqrt(1/cardinality)) per feature,
whatever the other features are. Compressed tables key their draws by the table's own name.

``registry.build`` takes one number from the caller's torch RNG and builds the module
with that RNG forked and seeded by it (``EmbeddingBag``'s constructor draws a normal init
that the seeded init overwrites; some methods draw dense parameters of their own), so
building any method moves the caller's RNG by exactly one draw: the dense layers a model
builds next start from the same state for every method.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Rows drawn per generator call: bounds the fp32 scratch memory of a huge table, and is
# fixed so that every layout draws a feature's rows in the same pieces.
CHUNK_ROWS = 65536


@dataclass(frozen=True)
class RowBlock:
    """``rows`` table rows from ``row0`` on hold draws keyed by ``key``: ``width``-wide rows
    U(-bound, bound), of which the table keeps columns [col0, col0 + table width)."""

    key: str
    row0: int
    rows: int
    width: int
    bound: float
    col0: int = 0


@dataclass(frozen=True)
class SeededInit:
    """A table's init as data: the blocks that cover its rows (bound to a seed by ``_make_tables``)."""

    blocks: tuple[RowBlock, ...]

    def bind(self, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
        rows = sum(b.rows for b in self.blocks)

        def init(w: torch.Tensor) -> torch.Tensor:
            if type(w) not in (torch.Tensor, nn.Parameter) or w.shape[0] != rows:
                # TorchRec's sharded modules re-run init_fn on their local shards (ShardedTensor
                # or a slice of rows); sharding.shard_model then loads the unsharded weights
                # back, so these values are never used: TorchRec's default uniform init.
                torch.nn.init.uniform_(
                    w, -max(b.bound for b in self.blocks), max(b.bound for b in self.blocks)
                )
                return w
            fill_blocks(w, self.blocks, seed)
            return w

        return init


def feature_init(key: str, rows: int, width: int, bound: float | None = None) -> SeededInit:
    """One block over a whole table, U(+-sqrt(1/rows)) unless ``bound`` is given (TorchRec's default
    bound)."""
    return SeededInit((RowBlock(key, 0, rows, width, math.sqrt(1 / rows) if bound is None else bound),))


def key_seed(seed: int, key: str) -> int:
    """A stable 63-bit generator seed for (seed, key) (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def module_seed() -> int:
    """The one number a module takes from the caller's torch RNG."""
    return int(torch.randint(0, 2**62, (1,)))


def fill_blocks(w: torch.Tensor, blocks: Sequence[RowBlock], seed: int) -> None:
    covered = sum(b.rows for b in blocks)
    if covered != w.shape[0]:
        raise ValueError(f"table init blocks cover {covered} rows, the table has {w.shape[0]}")
    width = w.shape[1]
    with torch.no_grad():
        for b in blocks:
            if b.col0 + width > b.width:
                raise ValueError(
                    f"table init block {b.key!r}: columns {b.col0}..{b.col0 + width} exceed its "
                    f"draw width {b.width}"
                )
            g = torch.Generator().manual_seed(key_seed(seed, b.key))
            for r in range(0, b.rows, CHUNK_ROWS):
                n = min(CHUNK_ROWS, b.rows - r)
                draw = torch.empty(n, b.width).uniform_(-b.bound, b.bound, generator=g)
                w[b.row0 + r : b.row0 + r + n].copy_(draw[:, b.col0 : b.col0 + width])


@dataclass(frozen=True)
class ReshapedFeatureInit:
    """``full``'s rows of one feature (``ids`` x ``dim``, keyed by the feature's name) stored
    as ``ids * dim / width`` rows of a narrower ``width`` (TT-Rec keeps its plain features in
    chunk-wide rows: id i owns rows i*m .. i*m+m-1), so the same id starts from the same vector."""

    key: str
    ids: int
    dim: int

    def bind(self, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
        bound = math.sqrt(1 / self.ids)
        whole = RowBlock(self.key, 0, self.ids, self.dim, bound)

        def init(w: torch.Tensor) -> torch.Tensor:
            if type(w) not in (torch.Tensor, nn.Parameter) or w.numel() != self.ids * self.dim:
                torch.nn.init.uniform_(w, -bound, bound)  # a local shard: see SeededInit.bind
                return w
            fill_blocks(w.view(self.ids, self.dim), [whole], seed)
            return w

        return init
