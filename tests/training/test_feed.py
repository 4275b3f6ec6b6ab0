"""training/feed.py's DevicePrefetch: batches drawn ahead by a thread, the data position that of the batches
consumed, errors raised where the batch is asked for."""

from __future__ import annotations

import threading
import time

import pytest

from deepseek_jax.data.corpus import DataError
from deepseek_jax.training.feed import DevicePrefetch


class _Counter:
    """Batches 0, 1, 2...; ``fail_at``: raise a DataError there."""

    def __init__(self, fail_at=None):
        self.i, self.fail_at, self.drawn_by = 0, fail_at, set()

    def __next__(self):
        self.drawn_by.add(threading.current_thread().name)
        if self.i == self.fail_at:
            raise DataError(f"bad batch {self.i}")
        self.i += 1
        return {"x": self.i - 1}

    def state(self):
        return {"i": self.i}

    def restore(self, state):
        self.i = state["i"]
        return self


def test_state_is_that_of_the_batches_consumed_while_the_thread_draws_ahead():
    data = _Counter()
    feed = DevicePrefetch(data, lambda b: ("put", b["x"]))
    assert feed.state() == {"i": 0}
    assert [next(feed) for _ in range(3)] == [("put", 0), ("put", 1), ("put", 2)]
    deadline = time.time() + 10
    while data.i < 5 and time.time() < deadline:  # one queued, one held by the thread
        time.sleep(0.01)
    assert data.i == 5 and feed.state() == {"i": 3}
    assert data.drawn_by == {"device-prefetch"}
    feed.close()
    resumed = DevicePrefetch(_Counter(), lambda b: b["x"]).restore(feed.state())
    assert [next(resumed) for _ in range(2)] == [3, 4]
    resumed.close()
    with pytest.raises(RuntimeError, match="restore before the first batch"):
        resumed.restore({"i": 0})


def test_a_data_error_is_raised_by_next():
    feed = DevicePrefetch(_Counter(fail_at=2), lambda b: b["x"])
    assert [next(feed), next(feed)] == [0, 1]
    with pytest.raises(DataError, match="bad batch 2"):
        next(feed)
    feed.close()
