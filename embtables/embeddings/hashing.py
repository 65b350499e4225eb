"""A well-mixed, stable 64-bit hash in plain torch int64 ops (CPU and GPU alike).

``mix64`` is the splitmix64 / murmur3-fmix64-style finaliser (Stafford's "Mix13"):
xor-shift, multiply, xor-shift, multiply, xor-shift. Torch has no uint64 arithmetic,
so it runs on signed int64: multiplication wraps modulo 2**64 exactly like unsigned
multiplication, and a *logical* right shift is emulated as an arithmetic shift
followed by a mask that clears the sign-extended high bits.

Salts are derived from the feature *name* (blake2b, not Python's randomised
``hash()``) and the probe index, so row assignments are identical across
processes, machines and releases; ``tests/test_embeddings_hashing.py`` pins golden values.
"""

from __future__ import annotations

import hashlib

import torch

MASK64 = (1 << 64) - 1
INT63 = (1 << 63) - 1
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_GOLDEN = 0x9E3779B97F4A7C15


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    c &= MASK64
    return c - (1 << 64) if c >> 63 else c


_C1_S, _C2_S = _signed(_C1), _signed(_C2)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    # `>>` on int64 is arithmetic (copies the sign bit); masking the top s bits
    # away makes it the logical shift the finaliser needs.
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """Bijective 64-bit finaliser on int64 bits (as uint64); new int64 tensor. Narrower
    integer ids (int32) are widened first, so an id hashes the same in either dtype."""
    x = x.to(torch.int64)
    x = x ^ _srl(x, 30)
    x = x * _C1_S
    x = x ^ _srl(x, 27)
    x = x * _C2_S
    return x ^ _srl(x, 31)


def mix64_int(x: int) -> int:
    """Pure-Python reference of ``mix64`` on unsigned 64-bit ints (returns unsigned)."""
    x &= MASK64
    x ^= x >> 30
    x = (x * _C1) & MASK64
    x ^= x >> 27
    x = (x * _C2) & MASK64
    return x ^ (x >> 31)


def name_key(name: str) -> int:
    """Stable unsigned 64-bit key of a feature name."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def salt(name: str, probe: int = 0) -> int:
    """Salt of (feature name, probe index), as a signed int64 ready for torch ops."""
    return _signed(mix64_int(name_key(name) ^ mix64_int((probe + 1) * _GOLDEN)))


def hash_ids(ids: torch.Tensor, salt_value: int) -> torch.Tensor:
    """Full 64-bit hash of int64 ids under a salt (any bit pattern, may be negative)."""
    return mix64(ids.to(torch.int64) ^ salt_value)


def hash_to_rows(ids: torch.Tensor, salt_value: int, rows: int) -> torch.Tensor:
    """Ids -> rows in ``[0, rows)``: the top 63 hash bits modulo ``rows``."""
    return (hash_ids(ids, salt_value) & INT63) % rows
