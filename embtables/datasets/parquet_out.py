"""Writing a dataset directory: Parquet parts of fixed-size row groups per split, built
in a temporary sibling directory that is renamed into place only when complete
(schema.json written last), so an interrupted conversion never looks finished.
Shared by every converter (Criteo, synthetic, sequence datasets)."""

from __future__ import annotations

import errno
import glob
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 65536
ROW_GROUPS_PER_PART = 16


class PartWriter:
    """Appends Arrow tables to ``root/split/part-NNNNN.parquet``; every row group holds
    exactly ``row_group_rows`` rows except the last of the split, and a new part starts
    every ``row_groups_per_part`` row groups."""

    def __init__(self, root: Path, split: str, schema: pa.Schema, *, row_group_rows: int = ROW_GROUP_ROWS,
                 row_groups_per_part: int = ROW_GROUPS_PER_PART, compression: str = "snappy",
                 use_dictionary: bool | list[str] = False):
        self.root, self.split, self.schema = Path(root), split, schema
        self.row_group_rows, self.row_groups_per_part = row_group_rows, row_groups_per_part
        self.use_dictionary = use_dictionary
        # Integer columns (ids) are delta-encoded and left uncompressed; the rest (floats) are
        # plain + `compression`. Measured on 800k Criteo rows against plain + snappy for all:
        # 31% less CPU to write, 44% less to read, files 29% smaller (a hashed 32-bit id takes
        # ~33 bits delta-packed; snappy on 64-bit ids mostly finds the zero high bytes).
        dictionary = set(schema.names) if use_dictionary is True else set(use_dictionary or ())
        ints = [f.name for f in schema if pa.types.is_integer(f.type) and f.name not in dictionary]
        self.column_encoding = dict.fromkeys(ints, "DELTA_BINARY_PACKED")
        self.compression = {f.name: "none" if f.name in self.column_encoding else compression for f in schema}
        # No min/max statistics for ids (hashed or frequency-ranked: useless for pruning;
        # ~10% of the write's CPU); floats and labels keep theirs.
        self.write_statistics = [f.name for f in schema if f.name not in self.column_encoding]
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._groups_in_part = 0
        self.files: list[str] = []  # relative to root
        self.rows = 0

    @property
    def total_rows(self) -> int:
        """Rows written or waiting to be (``rows`` counts written row groups only)."""
        return self.rows + self._pending_rows

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.row_group_rows:
            whole = pa.concat_tables(self._pending)
            self._emit(whole.slice(0, self.row_group_rows))
            rest = whole.slice(self.row_group_rows)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def _emit(self, table: pa.Table) -> None:
        if self._writer is None:
            rel = f"{self.split}/part-{len(self.files):05d}.parquet"
            (self.root / self.split).mkdir(parents=True, exist_ok=True)
            # no dictionary pages: ~30% faster to write
            self._writer = pq.ParquetWriter(self.root / rel, self.schema, compression=self.compression,
                                            use_dictionary=self.use_dictionary,
                                            column_encoding=self.column_encoding or None,
                                            write_statistics=self.write_statistics)
            self.files.append(rel)
        try:
            self._writer.write_table(table.cast(self.schema) if table.schema != self.schema else table,
                                     row_group_size=self.row_group_rows)
        except OSError as e:
            raise _named(e, self.root / self.files[-1]) from e
        self.rows += table.num_rows
        self._groups_in_part += 1
        if self._groups_in_part >= self.row_groups_per_part:
            self._writer.close()
            self._writer, self._groups_in_part = None, 0

    def close(self) -> None:
        if self._pending_rows:
            self._emit(pa.concat_tables(self._pending))
            self._pending, self._pending_rows = [], 0
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as e:
                raise _named(e, self.root / self.files[-1]) from e
            self._writer = None


def _named(e: OSError, path: Path) -> OSError:
    """pyarrow's write errors carry no file name (and often no errno): add both."""
    if e.filename is not None:
        return e
    code = e.errno
    if code is None and "No space left on device" in str(e):
        code = errno.ENOSPC
    return OSError(code, e.strerror or str(e), str(path))


_OWNER = ".owner"  # inside OUT.tmp-*: the host that writes it (removed just before the rename)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``OUT.tmp-PID-*`` / ``OUT.old-PID-*`` left by conversions into ``out`` whose
    process (on this host) is gone -- a SIGKILL, an out-of-memory kill, a power cut.
    Those of a live process, or of another host, are kept. Returns what was removed."""
    removed = []
    host = socket.gethostname()
    for p in out.parent.glob(f"{glob.escape(out.name)}.*-*-*"):
        kind, _, rest = p.name[len(out.name) + 1:].partition("-")
        pid_text = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid_text.isdigit() or not p.is_dir():
            continue
        try:
            owner = (p / _OWNER).read_text().strip()
        except OSError:
            owner = host  # no owner file: written here by an older version, or just before its rename
        if owner != host or _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _user_path_error(e: OSError, tmp: Path, out: Path) -> OSError:
    """The same error with the temporary directory's path replaced by the user's ``out``."""
    def fix(x):
        return None if x is None else str(x).replace(str(tmp), str(out))

    strerror = fix(e.strerror) or fix(str(e))
    new = type(e)(e.errno, strerror, fix(e.filename)) if e.errno is not None else type(e)(fix(str(e)))
    return new


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh ``OUT.tmp-PID-xxxx`` directory; on success rename it to ``OUT``; on any
    error remove it (errors name ``OUT``, not the temporary path). ``OUT`` must not exist
    unless ``overwrite``. Temporaries of dead earlier conversions into ``OUT`` are removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; a dataset is a directory "
                              "(remove it first)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(
            f"cannot create {out}: a part of {out.parent} is a file, not a directory") from None
    except OSError as e:
        raise type(e)(e.errno, f"cannot create {out}: {e.strerror}", e.filename) from None
    remove_stale_temporaries(out)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        (tmp / _OWNER).write_text(socket.gethostname())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise type(e)(e.errno, f"cannot write {out}: {e.strerror} (in {out.parent})") from None
    try:
        yield tmp
        (tmp / _OWNER).unlink()
        if out.exists():
            old = out.parent / f"{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _user_path_error(e, tmp, out) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def split_counts(rows: int, fractions: tuple[float, ...] | list[float]) -> list[int]:
    """Rows per split for a sequential split by fractions (train, valid, test): each split
    but the last gets ``round(rows * f)``, the last gets the rest (the Kaggle convention:
    the tail of the data is held out)."""
    fr = [float(f) for f in fractions]
    if any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    counts = [int(round(rows * f)) for f in fr[:-1]]
    counts = [min(c, rows - sum(counts[:i])) for i, c in enumerate(counts)]
    return counts + [rows - sum(counts)]
