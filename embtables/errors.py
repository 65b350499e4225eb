"""How errors reach the user: which exceptions are user mistakes (shown as their message,
no traceback; `embtables --debug ...` shows it anyway), one clear line for the rest (the
traceback goes to a log file), and :func:`clip` for offending values quoted in messages.

A leaf: imports nothing from embtables, so every layer may use it (torch's checkpoint
exception is looked up only when an error is being described, and only if torch is loaded).
"""

from __future__ import annotations

import errno
import sys
import tempfile
import time
import traceback
from pathlib import Path

MAX_QUOTED = 200


def clip(value: object, limit: int = MAX_QUOTED) -> str:
    """A value quoted in a message: a string as its ``repr``, anything else as ``str``,
    cut to ``limit`` characters with the full length stated (a 10 MB field in a bad row
    must not become 10 MB of error message)."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value):,} characters in all)"
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters in all)"


def _checkpoint_exception_type() -> type | None:
    # torch's CheckpointException derives from BaseException, so `except Exception` misses it
    mod = sys.modules.get("torch.distributed.checkpoint.api")
    return getattr(mod, "CheckpointException", None)


def _root_cause(e: BaseException) -> BaseException:
    """The first error a rank reported inside torch's CheckpointException, else ``e``."""
    cls = _checkpoint_exception_type()
    if cls is not None and isinstance(e, cls):
        for _rank, (inner, _trace) in sorted(e.failures.items()):
            return _root_cause(inner)
    return e


def _enospc(e: BaseException) -> OSError | None:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model it is loaded into."""


def is_user_error(e: BaseException) -> bool:
    # ValueError covers ConfigError, BadRowError, BudgetTooSmall, ShardingError/PlanDoesNotFit
    # and SearchInfeasible; a LaunchError is not here because its message is another rank's
    # traceback (it goes to the log file).
    e = _root_cause(e)
    if _enospc(e) is not None or _checkpoint_exception_type() is not None and isinstance(
            e, _checkpoint_exception_type()):
        return True
    return isinstance(e, (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError,
                          NotADirectoryError, PermissionError, KeyError, TrainingDiverged, CheckpointError))


def describe(e: BaseException) -> str:
    """The message the CLI prints for ``e`` (after ``error: ``)."""
    root = _root_cause(e)
    full = _enospc(root)
    if full is not None:
        if full.filename is None:
            return "no space left on device (while writing a file the library did not name)"
        return f"no space left on device while writing {full.filename}"
    text = str(root) or type(root).__name__
    if root is not e:
        ranks = sorted(getattr(e, "failures", {}) or {})
        text = f"checkpoint {'rank ' + str(ranks[0]) + ': ' if ranks else ''}{type(root).__name__}: {text}"
    elif isinstance(root, KeyError):
        text = f"missing key {text}"
    if _fbgemm_failed(root):
        text = f"FBGEMM does not load ({one_line(text)}); `embtables doctor` says what to reinstall"
    return text


def _fbgemm_failed(e: BaseException) -> bool:
    if not isinstance(e, (ImportError, OSError)) or isinstance(e, FileNotFoundError) and e.filename:
        return False
    if getattr(e, "name", None) == "fbgemm_gpu" or "fbgemm" in str(e).lower():
        return True
    return any("fbgemm_gpu" in frame.filename for frame in traceback.extract_tb(e.__traceback__))


def needs_log(e: BaseException) -> bool:
    """Whether the traceback holds more than the printed line: not a plain user mistake, or
    an error another rank reported through torch's CheckpointException."""
    return not is_user_error(e) or _root_cause(e) is not e


def one_line(text: str) -> str:
    """The first and last lines of a multi-line message (a traceback in a LaunchError)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else text
    return f"{lines[0]} ... {lines[-1]}"


def write_log(e: BaseException, argv: list[str] | None = None) -> Path | None:
    """The full traceback of ``e`` in a log file under the temp directory; its path."""
    name = f"embtables-error-{time.strftime('%Y%m%d-%H%M%S')}-{id(e) % 10**6}.log"
    path = Path(tempfile.gettempdir()) / name
    try:
        with open(path, "w") as f:
            f.write(f"embtables {' '.join(argv or sys.argv[1:])}\n\n")
            f.write("".join(traceback.format_exception(e)))
    except OSError:
        return None
    return path
