"""Read ahead: run a generator in a background thread behind a bounded queue."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


class _Failure:
    """An exception raised in the worker, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(gen: Iterator[T], depth: int) -> Iterator[T]:
    """Yield gen's items, computed up to `depth` ahead in a daemon thread (depth 0: in this thread)."""
    if depth <= 0:
        yield from gen
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in gen:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            put(_Failure(err))
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name="polyfid-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=10.0)
