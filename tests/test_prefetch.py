import threading
import time

import pytest

from tagdit.data.prefetch import prefetch


def test_prefetch_yields_everything_in_order():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))


def test_prefetch_reraises_the_producers_error_in_the_consumer():
    def source():
        yield 1
        raise ValueError("bad shard")

    it = prefetch(source())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad shard"):
        next(it)


def test_closing_stops_the_producer_and_closes_the_source():
    closed, produced = threading.Event(), []

    def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    before = threading.active_count()
    it = prefetch(endless(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert closed.is_set() and threading.active_count() == before
    n = len(produced)
    time.sleep(0.1)
    assert len(produced) == n <= 3 + 2 + 1  # taken + queue depth + the one in hand
