"""Streaming Parquet -> ``torchrec.datasets.utils.Batch`` reader.

The stream of one (epoch, rank):

1. The split's row groups in file order, or, with ``shuffle``, in an order permuted by
   ``(seed, epoch)`` (the same order on every rank).
2. Rank partition: the concatenated rows of (1) are cut into ``world_size`` contiguous
   slices; rank ``r`` gets ``N // W`` rows plus one of the ``N % W`` remainder rows when
   ``r < N % W``. The slices cover every row exactly once and each rank only reads the
   row groups of its own slice.
3. Shuffle windows: the rank's rows are cut into windows of ``shuffle_buffer`` rows and
   each window is permuted by ``(seed, epoch, rank, window)``. Batches are consecutive
   ``batch_size`` slices of the result, so any batch can be located (and ``start_batch``
   resumes the exact stream) by reading only the one or two windows it falls in.
4. Batch count, the same on every rank (DMP needs every rank to step equally):
   ``drop_last=False``: ``K = ceil((N // W) / batch_size)``; the last batch of a rank holds
   all its remaining rows (usually fewer than ``batch_size``; ``batch_size + 1`` in the
   rare case that a remainder row would otherwise need a batch of its own), so every row
   is read exactly once. With fewer rows than ranks, ``K = 1`` and the ranks without a
   row yield nothing (evaluation pads for them). ``drop_last=True``:
   ``K = (N // W) // batch_size`` full batches per rank; the other rows are skipped this epoch.

Memory: one window (``shuffle_buffer`` rows) plus one cached row group, plus
``prefetch`` ready batches. Array operations only (pyarrow -> numpy -> torch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.datasets.prefetch import prefetch
from embtables.datasets.schema import DatasetSchema, load_schema

DEFAULT_SHUFFLE_BUFFER = 262144  # 4 row groups of 64k rows


@dataclass(frozen=True)
class _RowGroup:
    file: Path
    index: int
    rows: int


def _row_groups(root: Path, schema: DatasetSchema, split: str,
                files: list[Path] | None = None) -> list[_RowGroup]:
    out = []
    for f in files if files is not None else schema.files(root, split):
        md = pq.ParquetFile(f).metadata
        out += [_RowGroup(f, i, md.row_group(i).num_rows) for i in range(md.num_row_groups)]
    return out


def rank_rows(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous slice of ``total`` rows."""
    base, rem = divmod(total, world_size)
    start = rank * base + min(rank, rem)
    return start, start + base + (1 if rank < rem else 0)


def batches_per_rank(total: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    base = total // world_size
    if drop_last:
        return base // batch_size
    if base == 0:  # fewer rows than ranks: one batch on the ranks that hold a row, none elsewhere
        return 1 if total else 0
    return math.ceil(base / batch_size)


def num_batches(root: str | Path, split: str = "train", batch_size: int = 1024, *, world_size: int = 1,
                drop_last: bool = False) -> int:
    """Batches every rank yields per epoch (the same on all ranks)."""
    schema = load_schema(root)
    total = sum(g.rows for g in _row_groups(Path(root), schema, split))
    return batches_per_rank(total, batch_size, world_size, drop_last)


def read_columns(root: str | Path, split: str, columns: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
    """Whole columns of a split as numpy (small columns only: labels, probabilities)."""
    schema = load_schema(root)
    tables = [pq.read_table(f, columns=list(columns)) for f in schema.files(root, split)]
    t = pa.concat_tables(tables) if tables else None
    return {c: (t.column(c).to_numpy() if t is not None else np.zeros(0)) for c in columns}


def read_label_prob(root: str | Path, split: str = "test") -> tuple[np.ndarray, np.ndarray | None]:
    """(labels, true probabilities or None) of a split, in file order, for oracle AUC."""
    schema = load_schema(root)
    cols = [schema.label] + ([schema.prob_column] if schema.prob_column else [])
    d = read_columns(root, split, cols)
    return d[schema.label], (d[schema.prob_column] if schema.prob_column else None)


class _Window:
    """Rows of one shuffle window as numpy arrays (+ Arrow list arrays for sequences)."""

    def __init__(self, dense: np.ndarray, cats: np.ndarray, labels: np.ndarray, seqs: list[pa.Array]):
        self.dense, self.cats, self.labels, self.seqs = dense, cats, labels, seqs

    def take(self, perm: np.ndarray) -> _Window:
        return _Window(self.dense[perm], self.cats[:, perm], self.labels[perm],
                       [s.take(pa.array(perm)) for s in self.seqs])


class BatchReader:
    """Iterable of ``Batch(dense_features, sparse_features, labels)`` over one split.

    See the module docstring for the stream definition. ``set_epoch(e, start_batch=k)``
    selects the epoch (and where to start); iterating again replays the same stream.
    """

    def __init__(self, root: str | Path, split: str = "train", batch_size: int = 1024, *,
                 shuffle: bool = False, seed: int = 0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, prefetch: int = 2,
                 start_batch: int = 0, epoch: int = 0, files: list[Path] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.root = Path(root)
        self.schema = load_schema(root)
        self.split = split
        self.batch_size = batch_size
        self.shuffle, self.seed = shuffle, seed
        self.shuffle_buffer = max(int(shuffle_buffer), batch_size)
        self.rank, self.world_size = rank, world_size
        self.drop_last, self.prefetch = drop_last, prefetch
        # ``files`` replaces the split's parts (same columns), e.g. a dataset's training
        # rows with negatives redrawn for this epoch.
        self.groups = _row_groups(self.root, self.schema, split, files)
        self.total_rows = sum(g.rows for g in self.groups)
        self.epoch, self.start_batch = epoch, start_batch
        s = self.schema
        self.dense_names = list(s.dense)
        self.cat_names = s.categorical_names
        self.seq_names = [q.name for q in s.sequences]
        self.keys = self.cat_names + self.seq_names
        self.columns = [s.label] + self.dense_names + self.cat_names + self.seq_names

    # ---- sizes ------------------------------------------------------------------
    @property
    def num_batches(self) -> int:
        """Batches per epoch on every rank."""
        return batches_per_rank(self.total_rows, self.batch_size, self.world_size, self.drop_last)

    def __len__(self) -> int:
        return max(self.num_batches - self.start_batch, 0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _batch_bounds(self) -> tuple[list[int], int]:
        """Row offsets (in the rank stream) where each batch starts, plus the end."""
        lo, hi = rank_rows(self.total_rows, self.rank, self.world_size)
        k, b = self.num_batches, self.batch_size
        starts = [i * b for i in range(k)]
        end = k * b if self.drop_last else hi - lo
        return starts, end

    # ---- reading ----------------------------------------------------------------
    def _segments(self) -> list[tuple[_RowGroup, int, int]]:
        """The rank's slice as (row group, lo, hi) pieces in stream order."""
        order = list(range(len(self.groups)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.groups)).tolist()
        lo, hi = rank_rows(self.total_rows, self.rank, self.world_size)
        segs, pos = [], 0
        for i in order:
            g = self.groups[i]
            a, b = max(lo, pos), min(hi, pos + g.rows)
            if b > a:
                segs.append((g, a - pos, b - pos))
            pos += g.rows
            if pos >= hi:
                break
        return segs

    def _read_rows(self, segs, start: int, stop: int, cache: dict) -> _Window:
        """Rows [start, stop) of the rank stream (unshuffled order)."""
        tables, pos = [], 0
        for g, a, b in segs:
            n = b - a
            if pos + n > start and pos < stop:
                key = (g.file, g.index)
                if key not in cache:
                    cache.clear()  # keep one row group: windows only step forward
                    cache[key] = pq.ParquetFile(g.file).read_row_group(g.index, columns=self.columns)
                lo, hi = max(start - pos, 0), min(stop - pos, n)
                tables.append(cache[key].slice(a + lo, hi - lo))
            pos += n
            if pos >= stop:
                break
        t = pa.concat_tables(tables)
        n = t.num_rows
        dense = np.empty((n, len(self.dense_names)), dtype=np.float32)
        for j, c in enumerate(self.dense_names):
            dense[:, j] = t.column(c).to_numpy()
        cats = np.empty((len(self.cat_names), n), dtype=np.int64)  # key-major, like KJT values
        for j, c in enumerate(self.cat_names):
            cats[j] = t.column(c).to_numpy()
        labels = t.column(self.schema.label).to_numpy().astype(np.float32, copy=False)
        seqs = [t.column(c).combine_chunks() for c in self.seq_names]
        return _Window(dense, cats, labels, seqs)

    def _window(self, segs, w: int, n_rows: int, cache: dict) -> _Window:
        ws = self.shuffle_buffer
        start, stop = w * ws, min((w + 1) * ws, n_rows)
        win = self._read_rows(segs, start, stop, cache)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self.epoch, self.rank, w]).permutation(stop - start)
            win = win.take(perm)
        return win

    def _make_batch(self, wins: list[tuple[_Window, int, int]]) -> Batch:
        parts = [(w.dense[a:b], w.cats[:, a:b], w.labels[a:b], [s.slice(a, b - a) for s in w.seqs])
                 for w, a, b in wins]
        if len(parts) == 1:
            dense, cats, labels, seqs = parts[0]
        else:
            dense = np.concatenate([p[0] for p in parts])
            cats = np.concatenate([p[1] for p in parts], axis=1)
            labels = np.concatenate([p[2] for p in parts])
            seqs = [pa.concat_arrays([p[3][i] for p in parts]) for i in range(len(self.seq_names))]
        n = len(labels)
        values = [torch.from_numpy(np.ascontiguousarray(cats).reshape(-1))]
        lengths = [torch.ones(len(self.cat_names) * n, dtype=torch.int32)]
        for s in seqs:
            offs = s.offsets.to_numpy()
            lengths.append(torch.from_numpy(np.diff(offs).astype(np.int32)))
            ids = s.values.slice(offs[0], offs[-1] - offs[0]).to_numpy().astype(np.int64)
            values.append(torch.from_numpy(ids))
        kjt = KeyedJaggedTensor(keys=self.keys, values=torch.cat(values) if len(values) > 1 else values[0],
                                lengths=torch.cat(lengths) if len(lengths) > 1 else lengths[0])
        return Batch(dense_features=torch.from_numpy(np.ascontiguousarray(dense)), sparse_features=kjt,
                     labels=torch.from_numpy(np.ascontiguousarray(labels)))

    def _generate(self) -> Iterator[Batch]:
        starts, end = self._batch_bounds()
        if not starts or self.start_batch >= len(starts) or end == 0:
            return
        segs = self._segments()
        n_rows = sum(b - a for _, a, b in segs)
        ws, cache = self.shuffle_buffer, {}
        cur_w, cur = -1, None
        prev_w, prev = -1, None
        for i in range(self.start_batch, len(starts)):
            a, b = starts[i], (starts[i + 1] if i + 1 < len(starts) else end)
            pieces = []
            for w in range(a // ws, (b - 1) // ws + 1):
                if w == cur_w:
                    win = cur
                elif w == prev_w:
                    win = prev
                else:
                    prev_w, prev = cur_w, cur
                    cur_w, cur = w, self._window(segs, w, n_rows, cache)
                    win = cur
                pieces.append((win, max(a, w * ws) - w * ws, min(b, (w + 1) * ws) - w * ws))
            yield self._make_batch(pieces)

    def __iter__(self) -> Iterator[Batch]:
        if self.prefetch <= 0:
            return self._generate()
        return prefetch(self._generate(), self.prefetch, "embtables-reader")
