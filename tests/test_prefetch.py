"""The background reader of training batches: same items, same order, errors where they happen."""

from __future__ import annotations

import threading

import pytest

from meddx.data.prefetch import prefetched


def test_yields_every_item_in_order() -> None:
    assert list(prefetched(range(50), depth=3)) == list(range(50))


def test_a_reading_error_is_raised_at_its_item() -> None:
    def items():
        yield 1
        yield 2
        raise OSError("store file vanished")

    seen = []
    with pytest.raises(OSError, match="vanished"):
        for item in prefetched(items()):
            seen.append(item)
    assert seen == [1, 2]


def test_stopping_early_stops_the_reader() -> None:
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    for item in prefetched(items(), depth=2):
        if item == 3:
            break
    assert not any(t.name == "meddx-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(produced) < 10  # read at most a few ahead, never the whole epoch
