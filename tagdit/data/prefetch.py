"""Run an iterable in a background thread, a few items ahead of the loop that consumes it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_ITEM, _ERROR, _DONE = range(3)


def prefetch(iterable: Iterable[T], depth: int = 2, name: str = "prefetch") -> Iterator[T]:
    """The items of `iterable`, produced in a daemon thread up to `depth` items ahead.

    An exception raised while producing is re-raised in the consumer. Closing the returned generator
    (leaving the loop, an error, `close()`) stops the producer after its current item, closes the
    source iterator in the producer's thread, and waits for the thread to end.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        it = iter(iterable)
        try:
            for item in it:
                q.put((_ITEM, item))
                if stop.is_set():
                    return
            q.put((_DONE, None))
        except BaseException as e:  # re-raised in the consumer
            q.put((_ERROR, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            kind, item = q.get()
            if kind == _DONE:
                return
            if kind == _ERROR:
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
