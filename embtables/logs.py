"""Quiet logs for the libraries under embtables: one call, used by the `embtables` command,
by each rank of `embtables run --nproc N` and by each worker of a sweep, so that every
process prints the same. A leaf: imports nothing from embtables (nor torch)."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """TorchRec's and torch.fx's chatter down to errors, library warnings off, and TorchRec's
    pod size fixed to one host (else table_row_wise plans ask for it;
    ``TORCHREC_RESOLVED_POD_SIZE``, kept when already set)."""
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TORCHREC_RESOLVED_POD_SIZE", "1")
