"""Run an iterator a few items ahead in a background thread (the reader's batches, the
converter's input blocks), so I/O and decompression overlap the consumer's work."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


def prefetch(it: Iterator[T], depth: int, name: str) -> Iterator[T]:
    """Yield ``it``'s items, produced up to ``depth`` ahead by a daemon thread named
    ``name``. An error in ``it`` is raised in the consumer at its position; when the
    consumer stops early, the thread stops at its next item."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def work() -> None:
        try:
            for x in it:
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True, name=name)
    t.start()
    try:
        while (x := q.get()) is not done:
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        while t.is_alive():  # drain so the worker can see the stop flag
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        t.join()
