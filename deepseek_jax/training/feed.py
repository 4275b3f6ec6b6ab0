"""Batches put on the devices ahead of the step that reads them (``DevicePrefetch``): a background thread draws the
next host batch and hands it to ``Trainer.put_batch`` while the devices run the current step, so the host never
makes them wait for data (a double buffer with the default ``depth=2``).

The data position saved in a checkpoint must be that of the batches the steps consumed, not of those the thread
drew ahead: each batch travels with the data's ``state()`` (and a mixture's document shares) taken right after it
was drawn, and ``state()`` here answers with the last consumed batch's. A resumed run therefore reads the same
batches as one that never stopped."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetch:
    """``data`` (``next`` gives host batches; ``state`` / ``restore`` its position) fed through ``put`` by a
    thread, ``depth - 1`` batches queued beside the one being put. Other attributes are ``data``'s."""

    def __init__(self, data, put: Callable[[dict], Any], depth: int = 2):
        if depth < 2:
            raise ValueError(f"depth={depth}: a prefetch holds at least 2 batches (one in use, one ahead)")
        self.data, self.put, self.depth = data, put, depth
        self._queue: queue.Queue = queue.Queue(maxsize=depth - 1)
        self._stop = threading.Event()
        self._thread = None
        self._state = None
        self._shares: dict = {}

    def __getattr__(self, name):
        return getattr(self.data, name)

    def restore(self, state: dict) -> "DevicePrefetch":
        if self._thread is not None:
            raise RuntimeError("restore before the first batch: the prefetch thread has already drawn ahead")
        self.data.restore(state)
        return self

    def state(self) -> dict:
        """The data position after the last batch ``next`` returned."""
        return self._state if self._state is not None else self.data.state()

    def mixture_metrics(self) -> dict:
        return self._shares

    def _run(self) -> None:
        shares = getattr(self.data, "mixture_metrics", dict)
        try:
            while not self._stop.is_set():
                batch = next(self.data)
                item = (self.put(batch), self.data.state(), shares())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # the consumer raises it (a bad line's DataError, say)
            self._queue.put(_Failed(e))

    def __iter__(self) -> "DevicePrefetch":
        return self

    def __next__(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="device-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, _Failed):
            self._stop.set()
            raise item.error
        batch, self._state, self._shares = item
        return batch

    def close(self) -> None:
        """Stop the thread (a batch it holds is dropped), then close ``data`` where it can be."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.1)
        close = getattr(self.data, "close", None)
        if close is not None:
            close()
