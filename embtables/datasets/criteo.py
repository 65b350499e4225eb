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

import contextlib
import mmap
import os
import queue
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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


def _count_lines(path: Path, fmt: _Format, block_bytes: int, bar: tqdm,
                 stop: threading.Event | None = None) -> int:
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
                                         escape_char=False, newlines_in_values=False,
                                         ignore_empty_lines=True),
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
    good_label = lab in ("0", "1") or (fmt.header and _FLOAT_RE.match(lab) is not None
                                       and float(lab) in (0.0, 1.0))
    if not good_label:
        return "bad_label", f"label {clip(lab)} is not 0 or 1"
    return _classify_dense(fields[1 : 1 + NUM_DENSE], fmt) or _classify_cats(fields[1 + NUM_DENSE :])


def _classify_dense(fields: list[str], fmt: _Format) -> tuple[str, str] | None:
    """Why a line's dense fields are bad, or None (numbers in a header file, else integers)."""
    for name, v in zip(DENSE_NAMES, fields, strict=True):
        if v == "":
            continue
        if fmt.header:
            if _FLOAT_RE.match(v) is None or not np.isfinite(float(v)):
                return "bad_dense", f"{name}={clip(v)} is not a number"
        elif _INT_RE.match(v) is None or len(v) > 20 or not -(2**63) <= int(v) < 2**63:
            return "bad_dense", f"{name}={clip(v)} is not an integer"
    return None


def _classify_cats(fields: list[str]) -> tuple[str, str] | None:
    """Why a line's categorical fields are bad (not a hex id below 2**63), or None."""
    for name, v in zip(CAT_NAMES, fields, strict=True):
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
            merged = pa.chunked_array([arrow_array(self.values), *self.pending], pa.int64())
            self.values = np_values(pc.unique(merged))
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


# ---- options --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriteoOptions:
    """How :func:`convert_criteo` converts; each field is the CLI flag of the same name
    (``cat_mode`` is ``--cat-mode``). Checked when built: a bad value is a ``ValueError``
    naming the flag."""

    cat_mode: str = "vocab"
    """``--cat-mode``: ``raw`` stores the hex value as int64 (missing -> 0); ``vocab`` ids by
    descending frequency (0 = OOV, 1 = missing, 2.. = kept values)."""
    min_count: int = 1
    """``--min-count``: vocab mode, values seen fewer times get the OOV id."""
    vocab_from: str | Path | None = None
    """``--vocab-from``: vocab mode, reuse the vocabulary of this converted dataset."""
    dense_transform: str = "log1p"
    """``--dense-transform``: ``log1p`` (missing/negative -> 0 then log1p) or ``none``."""
    split: tuple[float, ...] = (0.8, 0.1, 0.1)
    """``--split``: train, valid, test fractions of the rows (ignored when split by file)."""
    random_split: bool = False
    """``--random-split``: rows go to splits at random (seeded by ``seed``), not the tail."""
    seed: int = 0
    """``--seed``: the seed of ``random_split``."""
    on_bad_row: str = "error"
    """``--on-bad-row``: ``error`` stops at the first bad row; ``skip`` drops and counts it."""
    overwrite: bool = False
    """``--overwrite``: replace the output directory if it exists."""
    progress: bool = True
    """progress bars (``--quiet`` turns them off)."""
    name: str | None = None
    """``--name``: the dataset name in schema.json (default ``criteo``)."""
    block_mb: float = 16.0
    """``--block-mb``: megabytes parsed per block (at least 64 KiB are)."""
    workers: int | None = None
    """``--workers``: blocks parsed at once, one thread each (None: 1)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "split", tuple(self.split))  # a list given is kept as a tuple
        if self.cat_mode not in ("raw", "vocab"):
            raise ValueError(f"--cat-mode must be 'raw' or 'vocab', got {self.cat_mode!r}")
        if self.dense_transform not in DENSE_TRANSFORMS:
            raise ValueError(f"--dense-transform must be one of {DENSE_TRANSFORMS}, "
                             f"got {self.dense_transform!r}")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"--on-bad-row must be 'error' or 'skip', got {self.on_bad_row!r}")
        if self.min_count < 1:
            raise ValueError(f"--min-count must be >= 1, got {self.min_count}")
        if self.vocab_from is not None and self.cat_mode != "vocab":
            raise ValueError("--vocab-from needs --cat-mode vocab")
        fr = tuple(float(f) for f in self.split)
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
            raise ValueError(f"--split must be 3 non-negative fractions summing to 1, got {self.split}")
        if not self.block_mb > 0:
            raise ValueError(f"--block-mb must be > 0, got {self.block_mb}")
        if self.workers is not None and int(self.workers) < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")

    @property
    def block_bytes(self) -> int:
        return max(int(self.block_mb * (1 << 20)), 1 << 16)

    @property
    def worker_count(self) -> int:
        return 1 if self.workers is None else int(self.workers)


# ---- conversion -----------------------------------------------------------------------------

_PA_SCHEMA = pa.schema([(LABEL, pa.float32())] + [(n, pa.float32()) for n in DENSE_NAMES]
                       + [(n, pa.int64()) for n in CAT_NAMES])


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


@dataclass(frozen=True)
class _Inputs:
    """The input files, each with its fixed split (by file) or None, and its format."""

    files: list[tuple[Path, str | None]]
    fmts: list[_Format]
    method: str  # "file", "fraction" (sequential) or "random"
    total_bytes: int

    @property
    def split_names(self) -> list[str]:
        if self.method != "file":
            return list(SPLITS)
        return [s for s in SPLITS if any(x == s for _, x in self.files)]

    def each(self) -> Iterator[tuple[int, Path, str | None, _Format]]:
        for fi, ((f, fixed), fmt) in enumerate(zip(self.files, self.fmts, strict=True)):
            yield fi, f, fixed, fmt


def _read_inputs(sources, opts: CriteoOptions) -> _Inputs:
    """Check the input files, find each one's format and the split method."""
    files, method = _normalise_sources(sources)
    if method == "fraction" and opts.random_split:
        method = "random"
    fmts = [_detect_format(f) for f, _ in files]
    return _Inputs(files, fmts, method, sum(f.stat().st_size for f, _ in files))


def _bar(inputs: _Inputs, opts: CriteoOptions, desc: str, position: int = 0) -> tqdm:
    return tqdm(total=inputs.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not opts.progress, smoothing=0.1, position=position)


class _LinePositions:
    """Where each file's lines sit in the whole input, and the split bounds on those
    positions (sequential fraction split only: every file's lines are counted first).

    The count runs on its own thread, started here, overlapping the vocabulary pass and
    the first blocks' parse (the cores are not yet busy then); rows wait for it only to be
    routed. :meth:`stop` ends an unfinished count."""

    def __init__(self, inputs: _Inputs, opts: CriteoOptions):
        self._nfiles, self._split = len(inputs.files), opts.split
        self._stop = threading.Event()
        self._counting: Future[list[int]] | None = None
        self._positions: tuple[list[int], np.ndarray | None] | None = None
        if inputs.method == "fraction":
            counter = ThreadPoolExecutor(1, thread_name_prefix="criteo-count")
            self._counting = counter.submit(self._count_all, inputs, opts)
            counter.shutdown(wait=False)

    def _count_all(self, inputs: _Inputs, opts: CriteoOptions) -> list[int]:
        with _bar(inputs, opts, "count lines", position=1) as b:
            return [_count_lines(f, fmt, opts.block_bytes, b, self._stop) for _, f, _, fmt in inputs.each()]

    def get(self) -> tuple[list[int], np.ndarray | None]:
        """(first line position per file, split bounds or None); waits for the count."""
        if self._positions is None:
            if self._counting is None:
                self._positions = [0] * self._nfiles, None
            else:
                counts = self._counting.result()
                bounds = np.cumsum([0] + split_counts(sum(counts), self._split))
                self._positions = np.cumsum([0] + counts[:-1]).tolist(), bounds
        return self._positions

    def stop(self) -> None:
        """End an unfinished count and wait for its thread: a process that exits on an error
        while the thread is still inside a read can abort at interpreter exit."""
        self._stop.set()
        if self._counting is not None:
            with contextlib.suppress(Exception):
                self._counting.exception(timeout=60)


def _count_vocab(inputs: _Inputs, opts: CriteoOptions) -> list[_Vocab]:
    """The vocabulary pass: every categorical value counted over all rows, then the kept
    values (seen at least ``min_count`` times) ordered by count."""
    counters = [_Counts() for _ in range(NUM_CAT)]
    with _bar(inputs, opts, "vocab pass") as b:
        for _, f, _, fmt in inputs.each():
            parser, last = _Parser(fmt, None, opts.on_bad_row), 0  # ids only: no dense transform
            blocks = _parsed_blocks(f, fmt, parser, opts.block_bytes, opts.worker_count,
                                    lambda p, blk: (p, blk.pos))
            for p, pos in blocks:
                for k in range(NUM_CAT):
                    counters[k].add(p.cats[k])
                b.update(pos - last)
                last = pos
    return [_Vocab.build(*c.result(), opts.min_count) for c in counters]


def _vocabularies(inputs: _Inputs, opts: CriteoOptions) -> list[_Vocab] | None:
    """Vocab mode: another dataset's vocabulary (``vocab_from``), or one counted over the
    inputs; raw mode: None."""
    if opts.cat_mode != "vocab":
        return None
    if opts.vocab_from is not None:
        return _load_vocabs(Path(opts.vocab_from))
    return _count_vocab(inputs, opts)


class _Router:
    """Cuts a block's table into the pieces each split gets."""

    def __init__(self, inputs: _Inputs, opts: CriteoOptions, positions: _LinePositions):
        self.method, self.split, self.seed = inputs.method, opts.split, opts.seed
        self.positions = positions

    def pieces(self, fi: int, fixed: str | None, fmt: _Format, lines: np.ndarray,
               table: pa.Table) -> list[tuple[str | None, pa.Table]]:
        """``(split, rows)`` pieces of ``table``, the rows of file ``fi`` at ``lines``."""
        if self.method == "file":
            return [(fixed, table)]
        which = self._which(fi, fmt, lines)
        pieces: list[tuple[str | None, pa.Table]] = []
        for si, s in enumerate(SPLITS):
            sel = which == si
            if sel.all():
                pieces.append((s, table))
            elif sel.any():
                if self.method == "fraction":  # contiguous: slice, no copy
                    idx = np.flatnonzero(sel)
                    pieces.append((s, table.slice(int(idx[0]), len(idx))))
                else:
                    pieces.append((s, table.filter(arrow_array(sel))))
        return pieces

    def _which(self, fi: int, fmt: _Format, lines: np.ndarray) -> np.ndarray:
        """The split index of each row."""
        line_offsets, bounds = self.positions.get()
        g = line_offsets[fi] + (lines - (2 if fmt.header else 1))  # input line position
        if self.method == "fraction":
            return np.searchsorted(bounds, g, side="right") - 1
        u = (_splitmix64(g ^ np.int64(fi << 48) ^ np.int64(self.seed * 0x9E3779B1))
             >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        return np.searchsorted(np.cumsum(self.split)[:-1], u, side="right")


@dataclass
class _Written:
    """What the conversion pass wrote and counted: part writers per split, distinct raw
    ids per categorical, rows skipped per reason and the first examples."""

    writers: dict[str, PartWriter]
    distinct: list[_Distinct] = field(default_factory=lambda: [_Distinct() for _ in range(NUM_CAT)])
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_REASONS, 0))
    examples: list[str] = field(default_factory=list)
    total_rows: int = 0

    def add_skipped(self, p: _Parsed) -> None:
        for r in BAD_REASONS:
            self.bad[r] += p.bad.get(r, 0)
        self.examples += p.examples[: max(0, 20 - len(self.examples))]

    def consume(self, item: tuple[list[np.ndarray], list[tuple[str, pa.Table]]], out: str | Path) -> None:
        """A block's raw ids and split pieces (runs in the writer thread, overlapping the
        next parse)."""
        raw_cats, pieces = item
        for k in range(NUM_CAT):
            self.distinct[k].add(raw_cats[k])
        for s, t in pieces:
            self.writers[s].write(t)
        faults.hit("convert_block", str(out))  # a block's rows are handed to the writers

    def close(self) -> list[int]:
        """Close the part files; the distinct ids per categorical (missing not counted)."""
        with ThreadPoolExecutor(2, thread_name_prefix="criteo-finish") as pool:  # overlap the last writes
            cardinalities = pool.map(lambda d: d.count(exclude=RAW_MISSING_ID), self.distinct)
            for w in self.writers.values():
                w.close()
            return list(cardinalities)


def _to_table(p: _Parsed, blk: _Block, vocabs: list[_Vocab] | None) -> tuple[_Parsed, pa.Table | None, int]:
    """A parsed block as an Arrow table (categoricals mapped when ``vocabs``), on the
    parsing thread."""
    table = None
    if len(p.label):
        cats = p.cats if vocabs is None else [v.map(c) for v, c in zip(vocabs, p.cats, strict=True)]
        table = pa.Table.from_arrays([arrow_array(a) for a in [p.label, *p.dense, *cats]], schema=_PA_SCHEMA)
    return p, table, blk.pos


def _convert_pass(tmp: Path, out: str | Path, inputs: _Inputs, opts: CriteoOptions,
                  vocabs: list[_Vocab] | None, router: _Router) -> _Written:
    """Parse, transform, route and write every row to Parquet parts under ``tmp``."""
    written = _Written({s: PartWriter(tmp, s, _PA_SCHEMA) for s in inputs.split_names})
    with _bar(inputs, opts, "convert") as b, _Worker(lambda item: written.consume(item, out)) as sink:
        for fi, f, fixed, fmt in inputs.each():
            parser, last = _Parser(fmt, opts.dense_transform, opts.on_bad_row), 0
            blocks = _parsed_blocks(f, fmt, parser, opts.block_bytes, opts.worker_count,
                                    lambda p, blk: _to_table(p, blk, vocabs))
            for p, table, pos in blocks:
                written.add_skipped(p)
                if len(p.label):
                    sink.put((p.cats, router.pieces(fi, fixed, fmt, p.lines, table)))
                    written.total_rows += len(p.label)
                b.update(pos - last)
                last = pos
                b.set_postfix(rows=f"{written.total_rows:,}", refresh=False)
    return written


def _save_vocabs(tmp: Path, vocabs: list[_Vocab] | None) -> None:
    if vocabs is not None:
        (tmp / VOCAB_DIR).mkdir()
        for name_k, v in zip(CAT_NAMES, vocabs, strict=True):
            v.save(tmp / VOCAB_DIR / f"{name_k}.parquet")


def _schema_extra(inputs: _Inputs, opts: CriteoOptions, vocabs: list[_Vocab] | None,
                  written: _Written) -> dict:
    """schema.json's ``extra``: inputs, split, modes, bad rows and vocabulary."""
    method = inputs.method
    extra = {
        "source": "criteo",
        "files": [{"path": str(f), "split": fixed, "header": fmt.header, "id_column": fmt.id_column,
                   "delimiter": "tab" if fmt.delimiter == "\t" else fmt.delimiter}
                  for _, f, fixed, fmt in inputs.each()],
        "split_method": method, "split": list(opts.split) if method != "file" else None,
        "seed": opts.seed if method == "random" else None,
        "cat_mode": opts.cat_mode, "dense_transform": opts.dense_transform,
        "missing_id": RAW_MISSING_ID if opts.cat_mode == "raw" else VOCAB_MISSING_ID,
        "bad_rows": written.bad, "bad_row_examples": written.examples, "on_bad_row": opts.on_bad_row,
    }
    if vocabs is not None:
        vocab_from = opts.vocab_from
        extra["vocab"] = {"dir": VOCAB_DIR, "oov_id": OOV_ID, "missing_id": VOCAB_MISSING_ID,
                          "first_id": FIRST_VOCAB_ID,
                          "min_count": _vocab_min_count(vocab_from) if vocab_from else opts.min_count,
                          "from": str(vocab_from) if vocab_from else None,
                          "kept": [len(v.raw) for v in vocabs]}
    return extra


def _dataset_schema(inputs: _Inputs, opts: CriteoOptions, vocabs: list[_Vocab] | None,
                    written: _Written, cardinalities: list[int]) -> DatasetSchema:
    cats = [CategoricalFeature(n, cardinalities[k], mode=opts.cat_mode,
                               num_embeddings=None if vocabs is None else vocabs[k].num_embeddings)
            for k, n in enumerate(CAT_NAMES)]
    return DatasetSchema(name=opts.name or "criteo", dense=list(DENSE_NAMES), categorical=cats,
                         splits={s: w.files for s, w in written.writers.items()},
                         rows={s: w.rows for s, w in written.writers.items()},
                         extra=_schema_extra(inputs, opts, vocabs, written))


def convert_criteo(sources, out: str | Path, options: CriteoOptions | None = None, **fields) -> DatasetSchema:
    """Convert Criteo files to ``out`` (Parquet parts + schema.json); returns the schema.

    ``sources``: a list of files, split into train/valid/test by ``split`` fractions of
    their lines (sequential: the tail is held out; or at random per line with
    ``random_split``/``seed``), or a dict ``{"train": [...], "valid": [...], "test": [...]}``
    (split by file). The options come as a :class:`CriteoOptions` or as its fields by
    keyword (``cat_mode="raw", min_count=3``), not both. ``workers``: blocks parsed and
    validated at once, one thread each (default 1: the three-stage pipeline described in
    the module docstring; memory grows by about ``6 * block_mb`` MB per worker).

    The passes: check the inputs, count their lines (sequential split, on a thread), the
    vocabulary pass (vocab mode), the conversion pass (parse, route, write parts), then
    close the parts and write the vocabulary and schema.json; all under ``OUT.tmp-*``,
    renamed to ``out`` when complete.
    """
    if options is not None and fields:
        raise TypeError("give convert_criteo either options=CriteoOptions(...) or its fields "
                        f"by keyword, not both (got {sorted(fields)})")
    opts = options if options is not None else CriteoOptions(**fields)
    inputs = _read_inputs(sources, opts)
    positions = _LinePositions(inputs, opts)
    try:
        vocabs = _vocabularies(inputs, opts)
        with atomic_output_dir(out, opts.overwrite) as tmp:
            written = _convert_pass(tmp, out, inputs, opts, vocabs, _Router(inputs, opts, positions))
            rows = {s: w.total_rows for s, w in written.writers.items()}
            _check_rows(inputs.files, inputs.method, opts.split, rows, written.bad, written.examples)
            cardinalities = written.close()
            _save_vocabs(tmp, vocabs)
            schema = _dataset_schema(inputs, opts, vocabs, written, cardinalities)
            schema.save(tmp)
        return schema
    finally:  # stop an unfinished line count (an error, or no row was ever routed)
        positions.stop()


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

