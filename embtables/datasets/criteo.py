"""Criteo click logs -> Parquet parts + schema.json.

Inputs: the official files (Kaggle ``train.txt``, Terabyte ``day_N``: tab-separated, no
header, ``label``, 13 integer columns, 26 hex-string columns, empty field = missing), plain
or gzip (detected by magic bytes), and the CSV/TSV-with-header variant (header
``label,I1..I13,C1..C26``; this variant writes dense values as floats, so its dense columns
are parsed as numbers, ``1.0`` and ``2.5`` alike, while an official file's dense columns
must be integers: ``1.5`` there is a bad row), including Kaggle's CSV ``Id,Label,I1,...``
(its ``Id`` column is dropped). Header names match case-insensitively.

How it runs: the input (mapped, or decompressed as a stream for gzip) is cut into blocks of
whole lines (``block_mb``); a read-ahead thread parses each block with pyarrow's CSV reader
and explicit column types (no Python per line; 8-digit hex categoricals as
``fixed_size_binary(8)``), the main thread validates and decodes the previous block, and a
writer thread counts distinct ids and writes Parquet: three stages in flight. A block that
fails to parse or to validate, or that holds bytes a clean Criteo block never holds
(space, ``x``/``X``, NUL, anything above ``f``, which pyarrow would silently accept as
``" 5"`` or ``0x5``), is re-scanned line by line to find the exact bad
lines and why; the good lines are parsed again the fast way. (We feed pyarrow one block at a
time rather than one ``open_csv`` stream because only then do we know which lines a failing
block holds, and can go on after skipping them.) With ``workers > 1`` several blocks are
parsed and transformed at once, one thread each, and taken in file order.

Bad rows (``on_bad_row``): ``column_count``, ``bad_label`` (not 0/1), ``bad_dense``
(non-numeric, or non-integer in an official file), ``bad_categorical`` (not a hex id below
2**63), ``bad_encoding`` (not UTF-8). ``error`` stops at the first one with file, line number
and text; ``skip`` drops them and counts them per reason in schema.json. Empty lines are
ignored. A split the user asked for that gets no rows (an empty or header-only input,
every row skipped as bad) is an error. Output goes to ``OUT.tmp-*`` and is renamed to
``OUT`` only when complete (see :func:`~embtables.datasets.parquet_out.atomic_output_dir`).

Categorical modes: ``raw`` stores the hex value as int64 (missing -> 0); ``vocab`` stores ids
by descending frequency: 0 = OOV (values seen fewer than ``min_count`` times, or unseen when
mapping with another dataset's vocabulary), 1 = missing, 2.. = kept values. The vocabulary is
saved in ``OUT/vocab/C*.parquet`` (columns ``raw``, ``count``; id = 2 + row), counted over all
converted rows (as the DLRM reference preprocessing does), or taken from ``vocab_from``.
Distinct counts (``cardinality``, missing not counted) are exact in both modes (sets of int64:
8 bytes per distinct id).
"""

from __future__ import annotations

import mmap
import os
import queue
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from embtables import faults
from embtables.datasets.criteo_format import (
    CAT_NAMES,
    DENSE_NAMES,
    DENSE_TRANSFORMS,
    LABEL,
    NUM_CAT,
    NUM_DENSE,
    RAW_MISSING_ID,
    arrow_array,
    arrow_dense_transform,
    np_column,
    np_values,
    parse_hex,
)
from embtables.datasets.parquet_out import PartWriter, atomic_output_dir, split_counts
from embtables.datasets.prefetch import prefetch
from embtables.datasets.schema import CategoricalFeature, DatasetSchema, load_schema
from embtables.errors import clip

COLUMNS = [LABEL] + DENSE_NAMES + CAT_NAMES
NUM_COLUMNS = len(COLUMNS)
ID_COLUMN = "id"  # Kaggle's CSV (`Id,Label,I1,...,C26`) numbers its rows in a first column
BAD_REASONS = ("column_count", "bad_label", "bad_dense", "bad_categorical", "bad_encoding")
VOCAB_DIR = "vocab"
OOV_ID = 0
VOCAB_MISSING_ID = 1
FIRST_VOCAB_ID = 2
SPLITS = ("train", "valid", "test")
T = TypeVar("T")

_INT_RE = re.compile(r"-?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
_HEX_RE = re.compile(r"[0-9a-fA-F]{1,16}\Z")


class BadRowError(ValueError):
    """A bad input row under ``on_bad_row="error"``; the message names file, line, text
    (cut to 200 characters, with the full length stated)."""

    def __init__(self, path: Path, line: int, reason: str, detail: str, text: str):
        self.path, self.line, self.reason, self.detail, self.text = path, line, reason, detail, text
        super().__init__(f"{path}:{line}: bad row ({reason}: {detail}): {clip(text)} "
                         "(use --on-bad-row skip to drop and count such rows)")


class EmptySplitError(ValueError):
    """A split the user asked for came out with no rows."""


@dataclass(frozen=True)
class _Format:
    delimiter: str
    header: bool
    id_column: bool = False  # the Kaggle CSV's leading `Id` column, dropped

    @property
    def columns(self) -> list[str]:
        return [ID_COLUMN, *COLUMNS] if self.id_column else COLUMNS

    @property
    def dense_type(self) -> pa.DataType:  # the header variant writes dense values as floats
        return pa.float64() if self.header else pa.int64()


# ---- input ----------------------------------------------------------------------------


def _open(path: Path) -> tuple[pa.NativeFile, pa.NativeFile]:
    """(decompressed stream, raw file whose tell() is the compressed position)."""
    if path.is_dir():
        raise IsADirectoryError(f"input {path} is a directory, not a Criteo file")
    raw = pa.OSFile(str(path), "rb")
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        return _GzipStream(pa.CompressedInputStream(raw, "gzip"), path), raw
    return raw, raw


class _GzipStream:
    """A decompressing stream whose read errors name the file (pyarrow's say only
    "Truncated compressed stream")."""

    def __init__(self, stream: pa.NativeFile, path: Path):
        self.stream, self.path = stream, path

    def read(self, n: int) -> bytes:
        try:
            return self.stream.read(n)
        except OSError as e:
            raise ValueError(f"{self.path}: truncated or corrupt gzip file ({e})") from None

    def close(self) -> None:
        self.stream.close()


def _detect_format(path: Path) -> _Format:
    stream, raw = _open(path)
    try:
        head = stream.read(1 << 16)
    finally:
        stream.close()
        raw.close()
    first = head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")
    delimiter = "\t" if "\t" in first else ","
    names = [f.strip().lower() for f in first.split(delimiter)]  # Kaggle capitalises: Label, I1
    if names and names[0] in (LABEL, ID_COLUMN):
        expected = [c.lower() for c in COLUMNS]
        if names == expected:
            return _Format(delimiter, True)
        if names == [ID_COLUMN, *expected]:
            return _Format(delimiter, True, id_column=True)
        raise ValueError(f"{path}:1: header {clip(first)} is not the Criteo header "
                         f"{delimiter.join(COLUMNS)!r} (nor Kaggle's, with a first column Id)")
    return _Format(delimiter, False)


@dataclass
class _Block:
    """A run of whole lines of one file."""

    data: pa.Buffer | bytes  # a zero-copy slice of the mapped file, or decompressed bytes
    first_line: int  # file line number of its first line
    nlines: int
    pos: int  # (compressed) bytes of the file consumed so far, for progress
    suspicious: bool  # holds bytes a clean Criteo block never holds (see _suspicious)


def _suspicious(src, start: int, end: int) -> bool:
    """Bytes a clean block never holds but pyarrow would accept (" 5", "0x5", "0X5"), or a
    NUL (which the categorical fast path reads as padding). ``src`` is bytes or an mmap:
    both have a memchr-speed ``find``."""
    if end <= start:
        return False
    if np.frombuffer(src, dtype=np.uint8, count=end - start, offset=start).max() > 0x66:
        return True
    return any(src.find(c, start, end) >= 0 for c in (b" ", b"X", b"\0"))


def _count_newlines(src, start: int, end: int) -> int:
    # 256 KiB at a time: the comparison's mask stays in cache (measured ~2x faster than
    # one mask of a 16 MiB block)
    b = np.frombuffer(src, dtype=np.uint8, count=end - start, offset=start)
    return sum(int(np.count_nonzero(b[i : i + (1 << 18)] == 0x0A)) for i in range(0, len(b), 1 << 18))


def _header_end(src, size: int, fmt: _Format) -> tuple[int, int]:
    """(byte offset of the first data line, its line number)."""
    if not fmt.header:
        return 0, 1
    nl = src.find(b"\n", 0, size)
    return (size if nl < 0 else nl + 1), 2


def _mapped(path: Path) -> mmap.mmap | None:
    """The whole (uncompressed) file mapped read-only, or None for gzip or an empty file.
    Mapping instead of reading saves three copies of every byte (read, carry + chunk,
    slicing), ~10% of the conversion's CPU: blocks handed to pyarrow are zero-copy slices."""
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b" or os.fstat(f.fileno()).st_size == 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _blocks(path: Path, fmt: _Format, block_bytes: int) -> Iterator[_Block]:
    """The file's data lines in blocks of about ``block_bytes`` (a line longer than that
    is one block), with their line numbers."""
    mm = _mapped(path)
    if mm is None:
        yield from _stream_blocks(path, fmt, block_bytes)
        return
    size = len(mm)
    buf = pa.py_buffer(mm)
    page = mmap.PAGESIZE
    try:
        start, line = _header_end(mm, size, fmt)
        released = 0
        while start < size:
            end = min(start + block_bytes, size)
            if end < size:
                cut = mm.rfind(b"\n", start, end)
                if cut < 0:  # a line longer than a block: take it whole
                    cut = mm.find(b"\n", end)
                end = size if cut < 0 else cut + 1
            nlines = _count_newlines(mm, start, end) + (mm[end - 1] != 0x0A)
            yield _Block(buf.slice(start, end - start), line, nlines, end, _suspicious(mm, start, end))
            line += nlines
            # Drop our mapping of pages a few blocks back so RSS stays bounded by the blocks
            # in flight, not the file size (re-reading a dropped page would just fault it
            # back in from the page cache, so this is safe even if one is still in use).
            keep_from = max(0, start - 4 * block_bytes) // page * page
            if keep_from > released:
                mm.madvise(mmap.MADV_DONTNEED, released, keep_from - released)
                released = keep_from
            start = end
    finally:
        del buf
        try:
            mm.close()
        except BufferError:  # a slice is still referenced somewhere: the GC closes it
            pass


def _stream_blocks(path: Path, fmt: _Format, block_bytes: int) -> Iterator[_Block]:
    """Blocks of a gzip file, decompressed as a stream."""
    stream, raw = _open(path)
    try:
        carry, line = b"", 1
        if fmt.header:
            while b"\n" not in carry:
                chunk = stream.read(1 << 16)
                if not chunk:
                    break
                carry += chunk
            carry = carry.split(b"\n", 1)[1] if b"\n" in carry else b""
            line = 2
        while True:
            chunk = stream.read(block_bytes)
            if not chunk:
                if carry.strip(b"\r\n"):
                    block = carry + b"\n"
                    yield _Block(block, line, 1, raw.tell(), _suspicious(block, 0, len(block)))
                return
            buf = carry + chunk if carry else chunk
            cut = buf.rfind(b"\n")
            if cut < 0:
                carry = buf
                continue
            block, carry = buf[: cut + 1], buf[cut + 1 :]
            nlines = block.count(b"\n")
            yield _Block(block, line, nlines, raw.tell(), _suspicious(block, 0, len(block)))
            line += nlines
    finally:
        stream.close()
        raw.close()


def _count_lines(path: Path, fmt: _Format, block_bytes: int, bar: tqdm, stop: threading.Event | None = None) -> int:
    """Data lines of a file (for sequential fraction splits), header excluded; gives up
    (returns -1) when ``stop`` is set."""
    mm = _mapped(path)
    if mm is not None:
        try:
            start, _ = _header_end(mm, len(mm), fmt)
            n, page = 0, mmap.PAGESIZE
            for s in range(start, len(mm), block_bytes):
                if stop is not None and stop.is_set():
                    return -1
                e = min(s + block_bytes, len(mm))
                n += _count_newlines(mm, s, e)
                mm.madvise(mmap.MADV_DONTNEED, s // page * page, e // page * page - s // page * page)
                bar.update(e - s)
            return n + (mm[-1] != 0x0A) if len(mm) > start else 0
        finally:
            mm.close()
    n, last = 0, 0
    stream, raw = _open(path)
    try:
        tail = b""
        while True:
            chunk = stream.read(block_bytes)
            if not chunk or (stop is not None and stop.is_set()):
                break
            n += chunk.count(b"\n")
            tail = chunk[-1:]
            pos = raw.tell()
            bar.update(pos - last)
            last = pos
    finally:
        stream.close()
        raw.close()
    if tail and tail != b"\n":
        n += 1
    return n - (1 if fmt.header else 0)


# ---- parsing ----------------------------------------------------------------------------


@dataclass
class _Parsed:
    label: np.ndarray  # float32
    dense: list[np.ndarray]  # float32 per dense column
    cats: list[np.ndarray]  # raw int64 ids per categorical column (missing -> 0)
    lines: np.ndarray  # file line number of each row
    bad: dict[str, int] = field(default_factory=dict)  # skipped rows of this block per reason
    examples: list[str] = field(default_factory=list)  # "file:line: reason: detail" of the first few


# Criteo's categoricals are 8 hex digits or empty. Parsed as fixed-width binary they land
# back to back with no offsets, and an empty field's slot is zero-filled, which decodes to
# the missing id (see parse_hex_fixed8): ~15% less CPU than variable-width binary for the
# parse plus the decode. A file with other widths (1-16 digits are legal) fails this
# parse, and from then on its blocks are parsed as variable-width binary.
_CAT_FIXED8 = pa.binary(8)
# pyarrow parses a block in chunks of this many bytes, one Arrow chunk per column each, and
# we decode chunk by chunk. Measured: parsing a block as one 16 MiB chunk takes ~2x the CPU
# of 1 MiB chunks (the tokenised fields of a chunk no longer fit in cache).
_PARSE_CHUNK = 1 << 20


def _arrow_parse(block: pa.Buffer | bytes, fmt: _Format, cat_type: pa.DataType = _CAT_FIXED8) -> pa.Table:
    """One block, on the calling thread only: pyarrow's own threads measured slower here,
    competing with the validating and writing threads for the same cores."""
    types = {LABEL: fmt.dense_type}
    types.update({n: fmt.dense_type for n in DENSE_NAMES})
    types.update({n: cat_type for n in CAT_NAMES})  # validated as hex below; binary skips a UTF-8 pass
    return pacsv.read_csv(
        pa.BufferReader(block),
        read_options=pacsv.ReadOptions(column_names=fmt.columns, use_threads=False, block_size=_PARSE_CHUNK),
        parse_options=pacsv.ParseOptions(delimiter=fmt.delimiter, quote_char=False, double_quote=False,
                                         escape_char=False, newlines_in_values=False, ignore_empty_lines=True),
        convert_options=pacsv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=True,
                                             quoted_strings_can_be_null=False, check_utf8=False,
                                             include_columns=COLUMNS),
    )


def _validate(t: pa.Table, fmt: _Format, transform: str | None) -> _Parsed | None:
    """The parsed block's rows, or None if any is bad. ``transform=None`` validates the
    dense values but does not transform them (the vocabulary pass needs only the ids)."""
    t = t.combine_chunks()
    lab = t.column(LABEL)
    if lab.null_count:
        return None
    y = np_column(lab)
    if not ((y == 0) | (y == 1)).all():
        return None
    dense = []
    for n in DENSE_NAMES:
        col = t.column(n)
        if fmt.header:  # floats: "1e999" parses to inf; nothing non-finite is stored
            vals = col.drop_null()
            if len(vals) and not pc.all(pc.is_finite(vals)).as_py():
                return None
        if transform is not None:
            dense.append(arrow_dense_transform(col, transform))
    cats = []
    for n in CAT_NAMES:
        ids, ok = parse_hex(t.column(n))
        if not ok.all():
            return None
        cats.append(ids)
    return _Parsed(y.astype(np.float32), dense, cats, np.zeros(0, np.int64))


def _classify(line: bytes, fmt: _Format) -> tuple[str, str] | None:
    """Why a line is bad (reason, detail), or None. The strict rules the fast path enforces."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return "bad_encoding", f"invalid UTF-8 at byte {e.start}"
    fields = text.rstrip("\r").split(fmt.delimiter)
    if len(fields) != len(fmt.columns):
        hint = (" (Kaggle's CSV with a first column Id is read when its header line Id,Label,I1,... is there)"
                if len(fields) == NUM_COLUMNS + 1 and not fmt.header else "")
        return "column_count", f"expected {len(fmt.columns)} fields, got {len(fields)}{hint}"
    if fmt.id_column:
        fields = fields[1:]
    lab = fields[0]
    good_label = lab in ("0", "1") or (fmt.header and _FLOAT_RE.match(lab) is not None and float(lab) in (0.0, 1.0))
    if not good_label:
        return "bad_label", f"label {clip(lab)} is not 0 or 1"
    for name, v in zip(DENSE_NAMES, fields[1 : 1 + NUM_DENSE], strict=True):
        if v == "":
            continue
        if fmt.header:
            if _FLOAT_RE.match(v) is None or not np.isfinite(float(v)):
                return "bad_dense", f"{name}={clip(v)} is not a number"
        elif _INT_RE.match(v) is None or len(v) > 20 or not -(2**63) <= int(v) < 2**63:
            return "bad_dense", f"{name}={clip(v)} is not an integer"
    for name, v in zip(CAT_NAMES, fields[1 + NUM_DENSE :], strict=True):
        if v != "" and (_HEX_RE.match(v) is None or int(v, 16) >= 2**63):
            return "bad_categorical", f"{name}={clip(v)} is not a hex id below 2**63"
    return None


class _Parser:
    """Block -> validated rows, with the slow line-by-line path for failing blocks.
    Stateless, so blocks can be parsed by several threads at once; what a block skipped
    comes back in its :class:`_Parsed` and is merged in file order by the caller."""

    def __init__(self, fmt: _Format, transform: str | None, on_bad_row: str):
        self.fmt, self.transform, self.on_bad_row = fmt, transform, on_bad_row
        self.fixed8 = True  # a hint only (racing threads at worst parse one block twice)

    def arrow(self, blk: _Block) -> tuple[pa.Table | None, bool]:
        """The typed pyarrow parse of a clean-looking block, unvalidated: (table or None if
        it fails, whether the categoricals had to be parsed as variable-width binary)."""
        if blk.suspicious:
            return None, False
        if self.fixed8:
            try:
                return _arrow_parse(blk.data, self.fmt, _CAT_FIXED8), False
            except ValueError:  # other widths, or a bad row: try the general type
                pass
        try:
            return _arrow_parse(blk.data, self.fmt, pa.binary()), True
        except ValueError:
            return None, False

    def finish(self, path: Path, blk: _Block, fast: tuple[pa.Table | None, bool]) -> _Parsed:
        """Validate :meth:`arrow`'s table, or find the bad lines the slow way."""
        t, wide = fast
        if t is not None:
            try:
                # fewer rows than lines: empty lines, which would shift row -> line numbers
                p = _validate(t, self.fmt, self.transform) if t.num_rows == blk.nlines else None
            except ValueError:
                p = None
            if p is not None:
                if wide:  # a clean block that is not all 8-digit: don't try fixed width again
                    self.fixed8 = False
                p.lines = np.arange(blk.first_line, blk.first_line + len(p.label), dtype=np.int64)
                return p
        return self._slow(path, blk.data, blk.first_line)

    def parse(self, path: Path, blk: _Block) -> _Parsed:
        return self.finish(path, blk, self.arrow(blk))

    def _slow(self, path: Path, block: pa.Buffer | bytes, first_line: int) -> _Parsed:
        good, good_lines = [], []
        bad = dict.fromkeys(BAD_REASONS, 0)
        examples: list[str] = []
        lines = (block.to_pybytes() if isinstance(block, pa.Buffer) else block).split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for i, line in enumerate(lines):
            if line in (b"", b"\r"):
                continue
            why = _classify(line, self.fmt)
            if why is None:
                good.append(line)
                good_lines.append(first_line + i)
                continue
            text = line.decode("utf-8", errors="backslashreplace")  # cut to 200 characters when shown
            if self.on_bad_row == "error":
                raise BadRowError(path, first_line + i, why[0], why[1], text)
            bad[why[0]] += 1
            if len(examples) < 20:
                examples.append(f"{path}:{first_line + i}: {why[0]}: {why[1]}")
        if not good:
            return _Parsed(np.zeros(0, np.float32), [np.zeros(0, np.float32)] * NUM_DENSE,
                           [np.zeros(0, np.int64)] * NUM_CAT, np.zeros(0, np.int64), bad, examples)
        p = _validate(_arrow_parse(b"\n".join(good) + b"\n", self.fmt, cat_type=pa.binary()), self.fmt,
                      self.transform)
        if p is None or len(p.label) != len(good):  # would be a bug: the line rules disagree with pyarrow
            raise RuntimeError(f"{path}: lines {good_lines[0]}-{good_lines[-1]} pass the line checks "
                               "but not pyarrow's parse")
        p.lines = np.asarray(good_lines, dtype=np.int64)
        p.bad, p.examples = bad, examples
        return p


# ---- threads -----------------------------------------------------------------------------


def _ordered_map(fn, items: Iterator, workers: int) -> Iterator:
    """``map(fn, items)`` on ``workers`` threads, results in input order, at most
    ``2 * workers`` items in flight (bounded memory). With several workers each block is
    parsed *and transformed* on its own thread (pyarrow and numpy release the GIL), so the
    hex/dense/table work runs in parallel too, not only pyarrow's parse; on 2 cores that
    measured no faster than one block at a time (and ~10 % more CPU), so it is opt-in.
    An error is raised when its item's turn comes, so the first bad row in file order is
    the one reported."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="criteo-parse")
    pending: deque = deque()
    try:
        for x in items:
            pending.append(pool.submit(fn, x))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)


def _parsed_blocks(path: Path, fmt: _Format, parser: _Parser, block_bytes: int, workers: int,
                   then: Callable[[_Parsed, _Block], T]) -> Iterator[T]:
    """``then(parsed block, block)`` for every block of ``path``, in file order.

    One worker: a read-ahead thread cuts and parses blocks while this thread validates and
    finishes the previous one (with the writer thread, three stages in flight: measured 16%
    faster than parsing each block on pyarrow's threads and then validating it). Several
    workers: each parses, validates and finishes whole blocks."""
    blocks = _blocks(path, fmt, block_bytes)
    if workers <= 1:
        for blk, fast in prefetch(((blk, parser.arrow(blk)) for blk in blocks), 2, "criteo-parse"):
            yield then(parser.finish(path, blk, fast), blk)
    else:
        yield from _ordered_map(lambda blk: then(parser.parse(path, blk), blk),
                                prefetch(blocks, 2, "criteo-read"), workers)


class _Worker:
    """A thread applying ``fn`` to queued items in order (Parquet writing, distinct counts);
    its first error is raised in the caller at the next ``put`` or at exit."""

    def __init__(self, fn, depth: int = 2):
        self.fn, self.q = fn, queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, daemon=True, name="criteo-write")

    def _run(self) -> None:
        while (x := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.fn(x)
                except BaseException as e:
                    self.error = e

    def put(self, item) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def __enter__(self) -> _Worker:
        self.t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.q.put(None)
        self.t.join()
        if self.error is not None and exc[0] is None:
            raise self.error


# ---- counting -----------------------------------------------------------------------------


class _Batched:
    """Buffers incoming id arrays and hashes them ``batch`` values at a time (measured:
    ~30% less CPU than one hash pass per block, and fewer partial results to merge)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.raw: list[pa.Array] = []
        self.raw_n = 0

    def add(self, ids: np.ndarray) -> None:
        self.raw.append(arrow_array(ids))
        self.raw_n += len(ids)
        if self.raw_n >= self.batch:
            self._flush()

    def _flush(self) -> None:
        if self.raw:
            ids = pa.chunked_array(self.raw, pa.int64())
            self.raw, self.raw_n = [], 0
            self._hash(ids)

    def _hash(self, ids: pa.ChunkedArray) -> None:
        raise NotImplementedError


class _Distinct(_Batched):
    """Exact distinct int64 values of a stream; partial results are merged lazily
    (amortised, so the cost stays near one hash per value)."""

    def __init__(self, batch: int = 1 << 18, merge_min: int = 1 << 20) -> None:
        super().__init__(batch)
        self.merge_min = merge_min
        self.values = np.zeros(0, np.int64)
        self.pending: list[pa.Array] = []
        self.pending_n = 0

    def _hash(self, ids: pa.ChunkedArray) -> None:
        u = pc.unique(ids)
        self.pending.append(u)
        self.pending_n += len(u)
        if self.pending_n > max(len(self.values), self.merge_min):
            self._merge()

    def _merge(self) -> None:
        if self.pending:
            self.values = np_values(pc.unique(pa.chunked_array([arrow_array(self.values), *self.pending], pa.int64())))
            self.pending, self.pending_n = [], 0

    def count(self, exclude: int | None = None) -> int:
        self._flush()
        self._merge()
        return int(len(self.values) - (1 if exclude is not None and (self.values == exclude).any() else 0))


class _Counts(_Batched):
    """Exact value -> count over a stream (vocab pass)."""

    def __init__(self, batch: int = 1 << 18, merge_min: int = 1 << 20) -> None:
        super().__init__(batch)
        self.merge_min = merge_min
        self.keys = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_n = 0

    def _hash(self, ids: pa.ChunkedArray) -> None:
        vc = pc.value_counts(ids)
        k, c = np_values(vc.field("values")), np_values(vc.field("counts")).astype(np.int64)
        self.pending.append((k, c))
        self.pending_n += len(k)
        if self.pending_n > max(len(self.keys), self.merge_min):
            self._merge()

    def _merge(self) -> None:
        if self.pending:
            keys = np.concatenate([self.keys] + [k for k, _ in self.pending])
            counts = np.concatenate([self.counts] + [c for _, c in self.pending])
            self.keys, inv = np.unique(keys, return_inverse=True)
            self.counts = np.bincount(inv, weights=counts, minlength=len(self.keys)).astype(np.int64)
            self.pending, self.pending_n = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._flush()
        self._merge()
        return self.keys, self.counts


@dataclass
class _Vocab:
    """Kept raw values in id order (id = FIRST_VOCAB_ID + position) and their counts."""

    raw: np.ndarray
    count: np.ndarray

    def __post_init__(self) -> None:
        # pandas' Index keeps a hash table of its values: measured 5-6x faster per id than
        # a binary search in the sorted values for vocabularies up to ~100k, 2x at 2M.
        # (Imported here: raw-mode conversions never pay for importing pandas.)
        import pandas as pd

        self._index = pd.Index(self.raw)
        # Build the hash table now, on one thread: with --workers N the lookups run on
        # several threads at once, and pandas builds it lazily on first use, unlocked.
        self._index.get_indexer(self.raw[:1])

    @property
    def num_embeddings(self) -> int:
        return FIRST_VOCAB_ID + len(self.raw)

    def map(self, ids: np.ndarray) -> np.ndarray:
        """Raw ids (0 = missing) -> vocabulary ids."""
        pos = self._index.get_indexer(ids)
        out = np.where(pos >= 0, pos + FIRST_VOCAB_ID, OOV_ID).astype(np.int64, copy=False)
        out[ids == RAW_MISSING_ID] = VOCAB_MISSING_ID
        return out

    @classmethod
    def build(cls, keys: np.ndarray, counts: np.ndarray, min_count: int) -> _Vocab:
        keep = (counts >= min_count) & (keys != RAW_MISSING_ID)
        k, c = keys[keep], counts[keep]
        order = np.lexsort((k, -c))  # most frequent first, ties by value: deterministic
        return cls(k[order], c[order])

    def save(self, path: Path) -> None:
        pq.write_table(pa.table({"raw": self.raw, "count": self.count}), path)

    @classmethod
    def load(cls, path: Path) -> _Vocab:
        t = pq.read_table(path)
        return cls(np_column(t.column("raw")).copy(), np_column(t.column("count")).copy())


# ---- conversion ---------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _normalise_sources(sources) -> tuple[list[tuple[Path, str | None]], str]:
    """[(file, fixed split or None)], split method."""
    if isinstance(sources, dict):
        unknown = set(sources) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split names {sorted(unknown)}; use {SPLITS}")
        files = [(Path(f), s) for s in SPLITS for f in sources.get(s, []) or []]
        method = "file"
    else:
        if isinstance(sources, (str, Path)):
            sources = [sources]
        files = [(Path(f), None) for f in sources]
        method = "fraction"
    if not files:
        raise ValueError("no input files")
    for f, _ in files:
        if f.is_dir():
            raise IsADirectoryError(f"input {f} is a directory, not a Criteo file (give the files in it)")
        if not f.is_file():
            raise FileNotFoundError(f"input file {f} not found")
    return files, method


def convert_criteo(
    sources, out: str | Path, *, cat_mode: str = "vocab", min_count: int = 1, vocab_from: str | Path | None = None,
    dense_transform: str = "log1p", split: tuple[float, ...] = (0.8, 0.1, 0.1), random_split: bool = False,
    seed: int = 0, on_bad_row: str = "error", overwrite: bool = False, progress: bool = True,
    name: str | None = None, block_mb: float = 16.0, workers: int | None = None,
) -> DatasetSchema:
    """Convert Criteo files to ``out`` (Parquet parts + schema.json); returns the schema.

    ``sources``: a list of files, split into train/valid/test by ``split`` fractions of
    their lines (sequential: the tail is held out; or at random per line with
    ``random_split``/``seed``), or a dict ``{"train": [...], "valid": [...], "test": [...]}``
    (split by file). ``workers``: blocks parsed and validated at once, one thread each
    (default 1: the three-stage pipeline described in the module docstring; memory grows
    by about ``6 * block_mb`` MB per worker).
    """
    if cat_mode not in ("raw", "vocab"):
        raise ValueError(f"cat_mode must be 'raw' or 'vocab', got {cat_mode!r}")
    if dense_transform not in DENSE_TRANSFORMS:
        raise ValueError(f"dense_transform must be one of {DENSE_TRANSFORMS}, got {dense_transform!r}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if vocab_from is not None and cat_mode != "vocab":
        raise ValueError("vocab_from needs cat_mode='vocab'")
    files, method = _normalise_sources(sources)
    if method == "fraction":
        fr = tuple(float(f) for f in split)
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
            raise ValueError(f"split must be 3 non-negative fractions summing to 1, got {split}")
        method = "random" if random_split else "fraction"
    block_bytes = max(int(block_mb * (1 << 20)), 1 << 16)
    workers = max(1, 1 if workers is None else int(workers))
    fmts = [_detect_format(f) for f, _ in files]
    sizes = [f.stat().st_size for f, _ in files]

    def bar(desc: str, position: int = 0) -> tqdm:
        return tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                    disable=not progress, smoothing=0.1, position=position)

    # Sequential fraction split: boundaries on input line positions, so every file's lines
    # are counted first. The count runs on its own thread, overlapping the first blocks'
    # parse (the cores are not yet busy then); rows wait for it only to be routed.
    counting, stop_counting = None, threading.Event()
    if method == "fraction":
        def count_all() -> list[int]:
            with bar("count lines", position=1) as b:
                return [_count_lines(f, fmt, block_bytes, b, stop_counting) for (f, _), fmt in zip(files, fmts, strict=True)]

        counter = ThreadPoolExecutor(1, thread_name_prefix="criteo-count")
        counting = counter.submit(count_all)
        counter.shutdown(wait=False)
    positions: tuple[list[int], np.ndarray | None] | None = None  # (first line position per file, split bounds)

    def line_positions() -> tuple[list[int], np.ndarray | None]:
        nonlocal positions
        if positions is None:
            if counting is None:
                positions = [0] * len(files), None
            else:
                counts = counting.result()
                positions = np.cumsum([0] + counts[:-1]).tolist(), np.cumsum([0] + split_counts(sum(counts), split))
        return positions

    try:
        vocabs: list[_Vocab] | None = None
        if cat_mode == "vocab" and vocab_from is not None:
            vocabs = _load_vocabs(Path(vocab_from))
        elif cat_mode == "vocab":
            counters = [_Counts() for _ in range(NUM_CAT)]
            with bar("vocab pass") as b:
                for (f, _), fmt in zip(files, fmts, strict=True):
                    parser, last = _Parser(fmt, None, on_bad_row), 0  # ids only: no dense transform
                    for p, pos in _parsed_blocks(f, fmt, parser, block_bytes, workers, lambda p, blk: (p, blk.pos)):
                        for k in range(NUM_CAT):
                            counters[k].add(p.cats[k])
                        b.update(pos - last)
                        last = pos
            vocabs = [_Vocab.build(*c.result(), min_count) for c in counters]

        pa_schema = pa.schema([(LABEL, pa.float32())] + [(n, pa.float32()) for n in DENSE_NAMES]
                              + [(n, pa.int64()) for n in CAT_NAMES])
        distinct = [_Distinct() for _ in range(NUM_CAT)]
        bad = dict.fromkeys(BAD_REASONS, 0)
        examples: list[str] = []
        with atomic_output_dir(out, overwrite) as tmp:
            split_names = list(SPLITS) if method != "file" else [s for s in SPLITS if any(x == s for _, x in files)]
            writers = {s: PartWriter(tmp, s, pa_schema) for s in split_names}
            total_rows = 0

            def consume(item) -> None:  # runs in the writer thread, overlapping the next parse
                raw_cats, pieces = item
                for k in range(NUM_CAT):
                    distinct[k].add(raw_cats[k])
                for s, t in pieces:
                    writers[s].write(t)
                faults.hit("convert_block", str(out))  # a block's rows are handed to the writers

            with bar("convert") as b, _Worker(consume) as sink:
                for fi, ((f, fixed), fmt) in enumerate(zip(files, fmts, strict=True)):
                    parser, last = _Parser(fmt, dense_transform, on_bad_row), 0
                    data_start = 2 if fmt.header else 1

                    def to_table(p: _Parsed, blk: _Block):
                        table = None
                        if len(p.label):
                            cats = p.cats if vocabs is None else [v.map(c) for v, c in zip(vocabs, p.cats, strict=True)]
                            table = pa.Table.from_arrays([arrow_array(a) for a in [p.label, *p.dense, *cats]],
                                                         schema=pa_schema)
                        return p, table, blk.pos

                    for p, table, pos in _parsed_blocks(f, fmt, parser, block_bytes, workers, to_table):
                        for r in BAD_REASONS:
                            bad[r] += p.bad.get(r, 0)
                        examples += p.examples[: max(0, 20 - len(examples))]
                        n = len(p.label)
                        if n:
                            if method == "file":
                                sink.put((p.cats, [(fixed, table)]))
                            else:
                                line_offsets, bounds = line_positions()
                                g = line_offsets[fi] + (p.lines - data_start)  # input line position
                                if method == "fraction":
                                    which = np.searchsorted(bounds, g, side="right") - 1
                                else:
                                    u = (_splitmix64(g ^ np.int64(fi << 48) ^ np.int64(seed * 0x9E3779B1))
                                         >> np.uint64(11)).astype(np.float64) / float(1 << 53)
                                    which = np.searchsorted(np.cumsum(split)[:-1], u, side="right")
                                pieces = []
                                for si, s in enumerate(SPLITS):
                                    sel = which == si
                                    if sel.all():
                                        pieces.append((s, table))
                                    elif sel.any():
                                        if method == "fraction":  # contiguous: slice, no copy
                                            idx = np.flatnonzero(sel)
                                            pieces.append((s, table.slice(int(idx[0]), len(idx))))
                                        else:
                                            pieces.append((s, table.filter(arrow_array(sel))))
                                sink.put((p.cats, pieces))
                            total_rows += n
                        b.update(pos - last)
                        last = pos
                        b.set_postfix(rows=f"{total_rows:,}", refresh=False)
            _check_rows(files, method, split, {s: w.total_rows for s, w in writers.items()}, bad, examples)
            with ThreadPoolExecutor(2, thread_name_prefix="criteo-finish") as pool:  # the last merges overlap the last writes
                cardinalities = pool.map(lambda d: d.count(exclude=RAW_MISSING_ID), distinct)
                for w in writers.values():
                    w.close()
                cardinalities = list(cardinalities)
            if vocabs is not None:
                (tmp / VOCAB_DIR).mkdir()
                for name_k, v in zip(CAT_NAMES, vocabs, strict=True):
                    v.save(tmp / VOCAB_DIR / f"{name_k}.parquet")
            cats = [CategoricalFeature(n, cardinalities[k], mode=cat_mode,
                                       num_embeddings=None if vocabs is None else vocabs[k].num_embeddings)
                    for k, n in enumerate(CAT_NAMES)]
            extra = {
                "source": "criteo",
                "files": [{"path": str(f), "split": fixed, "header": fmt.header, "id_column": fmt.id_column,
                           "delimiter": "tab" if fmt.delimiter == "\t" else fmt.delimiter}
                          for (f, fixed), fmt in zip(files, fmts, strict=True)],
                "split_method": method, "split": list(split) if method != "file" else None,
                "seed": seed if method == "random" else None,
                "cat_mode": cat_mode, "dense_transform": dense_transform,
                "missing_id": RAW_MISSING_ID if cat_mode == "raw" else VOCAB_MISSING_ID,
                "bad_rows": bad, "bad_row_examples": examples, "on_bad_row": on_bad_row,
            }
            if vocabs is not None:
                extra["vocab"] = {"dir": VOCAB_DIR, "oov_id": OOV_ID, "missing_id": VOCAB_MISSING_ID,
                                  "first_id": FIRST_VOCAB_ID,
                                  "min_count": _vocab_min_count(vocab_from) if vocab_from else min_count,
                                  "from": str(vocab_from) if vocab_from else None,
                                  "kept": [len(v.raw) for v in vocabs]}
            schema = DatasetSchema(name=name or "criteo", dense=list(DENSE_NAMES), categorical=cats,
                                   splits={s: w.files for s, w in writers.items()},
                                   rows={s: w.rows for s, w in writers.items()}, extra=extra)
            schema.save(tmp)
        return schema
    finally:  # stop an unfinished line count (an error, or no row was ever routed)
        stop_counting.set()


def _check_rows(files, method: str, split, rows: dict[str, int], bad: dict[str, int],
                examples: list[str]) -> None:
    """Refuse a conversion that leaves a split the user asked for with no rows (by file: a
    split given files; by fraction: a split with a fraction above 0)."""
    asked = [s for s in rows if method == "file" or float(split[SPLITS.index(s)]) > 0]
    empty = [s for s in asked if rows[s] == 0]
    if not empty:
        return
    inputs = ", ".join(str(f) for f, _ in files)
    total = sum(rows.values())
    nbad = sum(bad.values())
    if total == 0 and nbad:
        reasons = ", ".join(f"{r} {n:,}" for r, n in bad.items() if n)
        raise EmptySplitError(f"{inputs}: every row was bad ({reasons}); nothing to convert. "
                              f"First: {examples[0]}")
    if total == 0:
        raise EmptySplitError(f"{inputs}: no data rows (the input is empty or holds only a header line)")
    if method == "file":
        which = ", ".join(str(f) for f, s in files if s in empty)
        raise EmptySplitError(f"split {'/'.join(empty)}: its files ({which}) hold no good rows"
                              + (f" ({nbad:,} bad rows skipped)" if nbad else ""))
    fractions = ", ".join(f"{s} {float(split[SPLITS.index(s)]):g}" for s in empty)
    raise EmptySplitError(
        f"split {'/'.join(empty)} got none of the {total:,} rows converted (fraction: {fractions}); "
        "give more rows, or a fraction of 0 for a split you do not want (e.g. --split 0.9,0,0.1)")


def _load_vocabs(root: Path) -> list[_Vocab]:
    schema = load_schema(root)
    info = schema.extra.get("vocab")
    if not info:
        raise ValueError(f"{root}: dataset has no vocabulary (was it converted with --cat-mode vocab?)")
    return [_Vocab.load(root / info["dir"] / f"{n}.parquet") for n in CAT_NAMES]


def _vocab_min_count(root) -> int:
    return int(load_schema(root).extra["vocab"]["min_count"])

