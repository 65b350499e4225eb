"""The Criteo column layout and the value conventions shared by the synthetic
generator and the converter (so that synth -> TSV -> convert reproduces synth exactly).

Conventions (both paths use these functions, never their own copies):

* Dense: raw values are integer counts (some negative, some missing). Stored value =
  ``log1p(max(x, 0))`` with missing -> 0, computed in float64 and cast to float32
  (``dense_transform="none"`` stores ``x`` itself, missing -> 0).
* Categorical, ``raw`` mode: the 64-bit integer of the hex string; a missing (empty)
  field is :data:`RAW_MISSING_ID` = 0. Criteo's values are 32-bit hashes written as 8 hex
  digits, so a literal ``00000000`` would share id 0 with "missing" (not seen in the
  public data; documented). Synthetic ids start at 1 for the same reason.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NUM_DENSE = 13
NUM_CAT = 26
DENSE_NAMES = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
CAT_NAMES = [f"C{i}" for i in range(1, NUM_CAT + 1)]
LABEL = "label"
PROB = "prob"
RAW_MISSING_ID = 0
DENSE_TRANSFORMS = ("log1p", "none")

# Cardinalities of the Criteo Kaggle (Display Advertising Challenge) categoricals, as
# listed by the DLRM reference implementation; the synthetic generator scales these.
CRITEO_KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]


def dense_transform(values: np.ndarray, missing: np.ndarray | None, transform: str = "log1p") -> np.ndarray:
    """Raw dense values (int64 or float64) -> stored float32. ``missing`` marks empty fields."""
    if transform not in DENSE_TRANSFORMS:
        raise ValueError(f"dense transform must be one of {DENSE_TRANSFORMS}, got {transform!r}")
    x = values.astype(np.float64, copy=True)
    if missing is not None:
        x[missing] = 0.0
    if transform == "log1p":
        np.maximum(x, 0.0, out=x)  # negative counts -> 0 (DLRM convention)
        np.log1p(x, out=x)
    return x.astype(np.float32)


def single_array(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous Arrow array; a one-chunk column is taken as is (``combine_chunks``
    copies even then)."""
    if isinstance(arr, pa.ChunkedArray):
        return arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    return arr


# pyarrow's Array.to_numpy() and pa.array(ndarray) import pandas on their first use (~0.5 s
# of a conversion that never needs it), so the converter's hot path reads and builds
# primitive arrays through their buffers with these instead.
_NP_OF_ARROW = {pa.int64(): np.int64, pa.int32(): np.int32, pa.uint64(): np.uint64, pa.float64(): np.float64,
                pa.float32(): np.float32}


def np_values(arr: pa.Array) -> np.ndarray:
    """A primitive Arrow array's values as a read-only numpy view (zero copy). A null's
    slot holds whatever the builder left there: mask it with :func:`np_nulls`."""
    dt = np.dtype(_NP_OF_ARROW[arr.type])
    if len(arr) == 0:
        return np.zeros(0, dt)
    return np.frombuffer(arr.buffers()[1], dtype=dt, count=len(arr), offset=arr.offset * dt.itemsize)


def np_nulls(arr: pa.Array) -> np.ndarray | None:
    """Boolean mask of an Arrow array's nulls, or None when it has none."""
    if not arr.null_count:
        return None
    bits = np.frombuffer(arr.buffers()[0], dtype=np.uint8)
    return ~np.unpackbits(bits, bitorder="little", count=arr.offset + len(arr))[arr.offset :].view(bool)


def arrow_array(a: np.ndarray) -> pa.Array:
    """A null-free primitive Arrow array over a numpy array's memory (zero copy when
    contiguous); ``bool`` is bit-packed."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        bits = pa.py_buffer(np.packbits(a, bitorder="little"))
        return pa.Array.from_buffers(pa.bool_(), len(a), [None, bits])
    return pa.Array.from_buffers(pa.from_numpy_dtype(a.dtype), len(a), [None, pa.py_buffer(a)])


def np_column(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A null-free primitive column as one numpy array (a copy only when chunked)."""
    chunks = _chunks(arr)
    if len(chunks) == 1:
        return np_values(chunks[0])
    return np.concatenate([np_values(c) for c in chunks]) if chunks else np.zeros(0, _NP_OF_ARROW[arr.type])


def _chunks(arr: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]


def arrow_dense_transform(arr: pa.Array | pa.ChunkedArray, transform: str = "log1p") -> np.ndarray:
    """Same as :func:`dense_transform` for a nullable Arrow int64/float64 column (chunk by
    chunk into one output: no concatenated copy of the input)."""
    out = np.empty(len(arr), np.float32)
    at = 0
    for c in _chunks(arr):
        out[at : at + len(c)] = dense_transform(np_values(c), np_nulls(c), transform)
        at += len(c)
    return out


_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i
_HEX_CHARS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def parse_hex(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Nullable Arrow string/binary column of hex strings -> (int64 ids, ok mask).

    Vectorised: left-pad every value to 8 (or 16) digits with pyarrow, then read the
    fixed-width digit matrix with a lookup table and view nibble pairs as big-endian
    integers. Null -> :data:`RAW_MISSING_ID`. ``ok`` is False for non-hex text, empty
    strings that are not null, more than 16 digits, or values >= 2**63.
    """
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.int64), np.ones(0, bool)
    if pa.types.is_fixed_size_binary(arr.type) and arr.type.byte_width == 8:
        ids = parse_hex_fixed8(arr)
        if ids is not None:
            return ids, np.ones(n, bool)
    if isinstance(arr, pa.ChunkedArray) and arr.num_chunks > 1:
        parts = [parse_hex(c) for c in arr.chunks]
        return np.concatenate([i for i, _ in parts]), np.concatenate([ok for _, ok in parts])
    arr = single_array(arr)
    if pa.types.is_fixed_size_binary(arr.type):
        arr = arr.cast(pa.binary())
    fast = _parse_hex8(arr)
    if fast is not None:
        return fast
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        arr = arr.cast(pa.string() if pa.types.is_binary(arr.type) else pa.large_string(), safe=False)
    null = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None
    lengths = pc.binary_length(arr).fill_null(1).to_numpy(zero_copy_only=False)
    maxlen = int(lengths.max())
    ok = (lengths >= 1) & (lengths <= 16)
    width = 8 if maxlen <= 8 else 16
    if maxlen > 16:  # invalid anyway; truncate them out of the way so the matrix stays fixed-width
        arr = pc.if_else(pa.array(lengths <= 16), arr, pa.scalar("0", arr.type))
    padded = pc.utf8_lpad(arr.fill_null("0"), width, "0")
    if padded.offset or pa.types.is_large_string(padded.type):
        padded = padded.cast(pa.string())
    padded = pa.concat_arrays([padded]) if padded.offset else padded
    bufs = padded.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=padded.offset * 4)
    data = np.frombuffer(bufs[2], dtype=np.uint8)[offsets[0] : offsets[0] + n * width]
    if offsets[-1] - offsets[0] != n * width:  # an empty string or oversize value slipped in
        lens = np.diff(offsets)
        ok &= lens == width
        last_byte = max(len(np.frombuffer(bufs[2], np.uint8)) - 1, 0)
        idx = (offsets[:-1, None] + np.arange(width)[None, :]).clip(max=last_byte)
        mat = np.frombuffer(bufs[2], dtype=np.uint8)[idx]
    else:
        mat = data.reshape(n, width)
    nib = _HEX_LUT[mat]
    ok &= (nib != 255).all(axis=1)
    nib = np.where(nib == 255, 0, nib).astype(np.uint8) if not ok.all() else nib
    packed = np.ascontiguousarray((nib[:, 0::2] << 4) | nib[:, 1::2])
    if width == 8:
        ids = packed.view(">u4").reshape(n).astype(np.int64)
    else:
        u = packed.view(">u8").reshape(n)
        ok &= u < np.uint64(1 << 63)
        ids = u.astype(np.int64)
    if null is not None:
        ids[null] = RAW_MISSING_ID
        ok |= null
    ids[~ok] = RAW_MISSING_ID
    return ids, ok


# Two ASCII characters read as one little-endian uint16 -> the byte they spell in lower-case
# hex, or 0xFFFF. A 128 KiB table (stays in L2): one gather per two digits decodes and
# validates at once, ~2.5x faster than bit-twiddling whole uint64 words in numpy.
_HEX_PAIR_LUT = np.full(1 << 16, 0xFFFF, dtype=np.uint16)
for _hi, _a in enumerate(b"0123456789abcdef"):
    for _lo, _b in enumerate(b"0123456789abcdef"):
        _HEX_PAIR_LUT[_a | (_b << 8)] = (_hi << 4) | _lo


# The same with two NUL bytes -> 0: the zero-filled slot of a null in a fixed-width column
# decodes to RAW_MISSING_ID with no mask. The converter sends blocks holding a NUL byte to
# its line-by-line path, so a NUL pair here can only be such a slot.
_HEX_PAIR_LUT_NUL0 = _HEX_PAIR_LUT.copy()
_HEX_PAIR_LUT_NUL0[0] = 0


def parse_hex_fixed8(arr: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """``fixed_size_binary(8)`` column of lower-case hex digits (nulls zero-filled, as
    pyarrow's CSV reader and builders write them) -> int64 ids, null -> 0; None if any
    value is not lower-case hex (the caller takes the general path)."""
    out = np.empty(len(arr), np.int64)
    at = 0
    for c in _chunks(arr):
        n = len(c)
        if n == 0:
            continue
        chars = np.frombuffer(c.buffers()[1], dtype="<u2", count=4 * n, offset=8 * c.offset)
        pairs = np.take(_HEX_PAIR_LUT_NUL0, chars)  # measured ~1.8x faster than LUT[chars]
        if pairs.max() > 0xFF:
            return None
        out[at : at + n] = pairs.astype(np.uint8).view(">u4")
        at += n
    return out


def _parse_hex8(arr: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """Fast path for Criteo's case: every non-null value is exactly 8 hex digits. The
    values then lie back to back in the data buffer, and each pair of digits is one
    lookup in :data:`_HEX_PAIR_LUT`. Returns None when the column does not fit this case."""
    if not (pa.types.is_string(arr.type) or pa.types.is_binary(arr.type)):
        return None
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    first, last = int(offsets[0]), int(offsets[-1])
    valid = None
    if arr.null_count:  # validity bitmap -> bools, cheaper than is_null().to_numpy()
        bits = np.frombuffer(bufs[0], dtype=np.uint8)
        valid = np.unpackbits(bits, bitorder="little", count=arr.offset + n)[arr.offset :].view(bool)
    lens = np.diff(offsets)
    if last - first == 8 * n and (lens == 8).all():
        packed_nulls = True  # null slots hold 8 bytes too (e.g. arrays built by format_hex)
    else:
        packed_nulls = False
        nvalid = n if valid is None else int(valid.sum())
        if (valid is None or last - first != 8 * nvalid
                or not np.array_equal(lens, valid.view(np.uint8) * np.int32(8))):
            return None
    if last == first:
        return np.zeros(n, np.int64), np.ones(n, bool)
    chars = np.frombuffer(bufs[2], dtype=np.uint8, count=last - first, offset=first)
    pairs = np.take(_HEX_PAIR_LUT, chars.view("<u2"))
    if pairs.max() > 0xFF:  # not lower-case hex (upper case, junk): general path
        return None
    val = pairs.astype(np.uint8).view(">u4")  # 4 bytes per value, first digit most significant
    if valid is None:
        return val.astype(np.int64), np.ones(n, bool)
    if packed_nulls:
        ids = val.astype(np.int64)
        ids[~valid] = RAW_MISSING_ID
        return ids, np.ones(n, bool)
    ids = np.full(n, RAW_MISSING_ID, dtype=np.int64)
    ids[valid] = val.astype(np.int64)
    return ids, np.ones(n, bool)


def format_hex(ids: np.ndarray) -> pa.Array:
    """int64 ids (< 2**32) -> Arrow string column of 8 lower-case hex digits; the missing
    id becomes null (an empty TSV field)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 32):
        raise ValueError("format_hex writes 8-digit (32-bit) ids only")
    u = ids.astype(">u4").view(np.uint8).reshape(-1, 4)
    chars = np.empty((len(ids), 8), dtype=np.uint8)
    chars[:, 0::2] = _HEX_CHARS[u >> 4]
    chars[:, 1::2] = _HEX_CHARS[u & 15]
    offsets = np.arange(0, 8 * len(ids) + 1, 8, dtype=np.int32)
    mask = ids == RAW_MISSING_ID
    validity = pa.array(~mask).buffers()[1] if mask.any() else None
    return pa.Array.from_buffers(
        pa.string(), len(ids), [validity, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes())],
        null_count=int(mask.sum()),
    )
