"""Serving: an embedding module's TorchRec tables as TorchRec's quantized inference modules.

``quantize_tables(module, "int4")`` swaps ``module.tables`` (an ``EmbeddingBagCollection`` or
``EmbeddingCollection``) for ``torchrec.quant``'s collections of the same tables, built by
``torchrec.inference.modules.quantize_embeddings``: each row is quantized on its own with an
fp16 scale and bias (row-wise, FBGEMM's fused n-bit format), or stored as fp16. The remap and
the combine of the method are untouched, and so are its dense parameters (fp32). The
quantized modules run on CPU with fbgemm-gpu-cpu.

Storage. FBGEMM's inference tables store one row as ``[scale fp16 | bias fp16 | packed codes]``
padded to ``row_alignment`` bytes (TorchRec's default 16), and each table's block padded to a
128-byte cache line. ``storage_bytes(tables)`` reads what the storage buffers hold, padding
included; ``EmbeddingMethod.table_bytes()`` (and so ``memory_bytes()``) reports it for
quantized tables. ``row_bytes`` is the same size by hand, for planning and for tests.
"""

from __future__ import annotations

import math

import torch
import torchrec
from torch import nn
from torchrec.inference.modules import quantize_embeddings
from torchrec.quant import embedding_modules as quant_modules

#: ``--dtype`` -> the torch dtype TorchRec's quantize_embeddings takes for it. ``fp32`` keeps
#: the rows as they are in the same inference kernels (a baseline for speed).
SERVING_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "fp16": torch.float16,
    "int8": torch.qint8, "int4": torch.quint4x2, "int2": torch.quint2x4,
}
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}
SCALE_BIAS_BYTES = 4  # one fp16 scale + one fp16 bias per row (integer types only)
DEFAULT_ROW_ALIGNMENT = quant_modules.DEFAULT_ROW_ALIGNMENT  # 16 bytes in TorchRec 1.8
TABLE_ALIGNMENT = 128  # FBGEMM pads each table's block of rows to a cache line

QUANT_COLLECTIONS = (quant_modules.EmbeddingBagCollection, quant_modules.EmbeddingCollection)


class NotQuantizable(ValueError):
    """The module's tables cannot be served quantized (named in the message)."""


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(SERVING_DTYPES)}, got {dtype!r}")
    return SERVING_DTYPES[dtype]


def check_alignment(row_alignment: int) -> int:
    if row_alignment < 1 or row_alignment & (row_alignment - 1):
        raise ValueError(f"--row-alignment must be a power of two >= 1 (bytes), got {row_alignment}")
    return row_alignment


def row_bytes(dim: int, dtype: str, row_alignment: int = DEFAULT_ROW_ALIGNMENT) -> int:
    """Bytes of one stored row of width ``dim``: the codes (``dim * bits / 8``), plus the
    per-row scale and bias for integer types, rounded up to ``row_alignment``."""
    raw = dim * BITS[dtype] // 8 + (SCALE_BIAS_BYTES if dtype.startswith("int") else 0)
    return -(-raw // row_alignment) * row_alignment


def table_storage_bytes(rows: int, dim: int, dtype: str, row_alignment: int = DEFAULT_ROW_ALIGNMENT) -> int:
    """Bytes one table occupies in FBGEMM's storage: its padded rows, the block rounded
    up to a cache line."""
    return -(-rows * row_bytes(dim, dtype, row_alignment) // TABLE_ALIGNMENT) * TABLE_ALIGNMENT


def is_quantized(tables: nn.Module | None) -> bool:
    return isinstance(tables, QUANT_COLLECTIONS)


def _kernels(tables: nn.Module) -> list[nn.Module]:
    return list(tables._emb_modules)  # the FBGEMM IntNBit table-batched modules (not registered)


def storage_bytes(tables: nn.Module) -> int:
    """Bytes the quantized tables' storage buffers hold (device, host and UVM placements),
    row and table padding included."""
    total = 0
    for k in _kernels(tables):
        for name in ("weights_dev", "weights_host", "weights_uvm"):
            t = getattr(k, name, None)
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def stored_rows(tables: nn.Module) -> dict[str, torch.Tensor]:
    """Table name -> its stored rows as a ``[rows, row_bytes]`` uint8 view of the storage
    (padding included), read from the kernels themselves."""
    out: dict[str, torch.Tensor] = {}
    for k in _kernels(tables):
        for (name, *_), (rows, _, _) in zip(k.embedding_specs, k.split_embedding_weights_with_scale_bias(0),
                                            strict=True):
            out[name] = rows
    return out


def quantize_tables(module: nn.Module, dtype: str, row_alignment: int = DEFAULT_ROW_ALIGNMENT) -> nn.Module:
    """Swap ``module.tables`` for TorchRec's quantized collections, in place; returns ``module``.

    ``module`` is an embtables method. What it declares decides (``EmbeddingMethod``):
    a table-free method (``has_tables=False``, e.g. DHE: hashes -> MLP) has nothing to
    quantize and is returned unchanged, its dense parameters fp32; a method declaring
    ``quantizable_tables=False`` is refused, naming it."""
    qdtype = check_dtype(dtype)
    check_alignment(row_alignment)
    if not getattr(module, "has_tables", True):
        return module
    check_quantizable(module, dtype)
    holder = nn.Module()
    holder.tables = module.tables
    kinds = [torchrec.EmbeddingBagCollection, torchrec.EmbeddingCollection]
    quant_modules.quant_prep_customize_row_alignment(holder, kinds, row_alignment)
    quantize_embeddings(
        holder, qdtype, inplace=True, additional_qconfig_spec_keys=[torchrec.EmbeddingCollection],
        additional_mapping={torchrec.EmbeddingCollection: quant_modules.EmbeddingCollection})
    # TorchRec keeps the staging copies it filled the kernels' storage from: a second copy
    # of every table (in memory and in a saved artefact). Serving reads only the storage.
    holder.tables._table_name_to_quantized_weights = None
    module.tables = holder.tables
    module.serving_dtype = dtype
    module.row_alignment = row_alignment
    return module


def check_quantizable(module: nn.Module, dtype: str) -> None:
    """Raise ``NotQuantizable`` (naming the method and what to do) if ``quantize_tables``
    would refuse ``module`` at ``dtype``; reads only the table shapes, so a module built on
    the meta device can be checked before anything trains."""
    check_dtype(dtype)
    name = getattr(module, "method_name", type(module).__name__)
    if not getattr(module, "quantizable_tables", True):
        raise NotQuantizable(
            f"{name}: its tables cannot be served quantized (it declares quantizable_tables=False: its "
            "forward reads the table weights itself, outside TorchRec's lookup); serve the trained run "
            "(embtables predict RUN_DIR) or train another method")
    tables = module.tables
    if is_quantized(tables):
        raise NotQuantizable(f"{name}: its tables are quantized already")
    if type(tables) not in (torchrec.EmbeddingBagCollection, torchrec.EmbeddingCollection):
        raise NotQuantizable(
            f"{name}: its tables are a {type(tables).__name__}, not an unsharded TorchRec "
            "EmbeddingBagCollection / EmbeddingCollection (a DistributedModelParallel-sharded model: "
            "quantize the unsharded module)")
    if dtype.startswith("int"):
        # FBGEMM packs a quantized row's codes in 2-byte units: width x bits must be a multiple of 16.
        configs = (tables.embedding_bag_configs() if isinstance(tables, torchrec.EmbeddingBagCollection)
                   else tables.embedding_configs())
        narrow = sorted({c.embedding_dim for c in configs
                         if c.embedding_dim * BITS[dtype] % 16})
        if narrow:
            ok = [d for d in ("int8", "int4", "int2") if all(w * BITS[d] % 16 == 0 for w in narrow)]
            raise NotQuantizable(
                f"{name}: tables {narrow[0]} wide cannot be stored as {dtype} (FBGEMM's row-wise {dtype} "
                f"needs widths that are multiples of {16 // BITS[dtype]}); "
                + (f"use --dtype {' or '.join(ok)}" if ok else "use --dtype fp16"))


def quantization_step(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """Per row, the step between two codes of row-wise quantization: (max - min) / (2^bits - 1)
    (FBGEMM rounds the scale to fp16). fp16: the float's own spacing, at most |w| * 2^-10."""
    if dtype == "fp16":
        return weight.abs().amax(dim=1).clamp_min(2**-14) * 2.0**-10
    w = weight.float()
    return (w.amax(dim=1) - w.amin(dim=1)) / (2 ** BITS[dtype] - 1)


def describe_bytes(nbytes: int, fp32_bytes: int) -> str:
    pct = 100.0 * nbytes / fp32_bytes if fp32_bytes else math.nan
    return f"{nbytes:,} bytes ({pct:.1f} % of fp32)"
