"""Read the next batches in a background thread while the model trains on this one.

``DataLoader(num_workers=0)`` reads a batch only when the loop asks for it, so reading the
tensor store and collating (about 40 ms per batch of 32 on the 2-core machine) adds to
every step. Worker processes (``num_workers>0``) cost more than they save there: they
compete for the same two cores and pass every tensor through shared memory. A thread is
enough, because reading files, safetensors' deserialisation and NumPy's stacking spend
most of their time outside the GIL.

Example:
    >>> list(prefetched(iter(range(5))))  # in a training loop: for batch in prefetched(loader): ...
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order while a thread reads up to ``depth`` of them ahead.

    An exception raised while reading is raised here, at the item where it happened. When
    the consumer stops early (``break``, an error, garbage collection), the thread stops too.
    ``iter(items)`` is called here, in the caller's thread; for runs that repeat exactly, give
    a shuffling ``DataLoader`` its own generator (as ``DistributedSampler`` has), so that the
    thread never draws from torch's global random state while the model does.
    """
    iterator = iter(items)
    ready: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            put(error)
            return
        put(_END)

    thread = threading.Thread(target=read, name="meddx-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
