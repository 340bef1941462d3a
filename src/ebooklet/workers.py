"""The thread pool parallel transfers run on: :class:`Workers`.

A connection owns one (``S3Connection.workers``); the layers above run their parallel
GETs and PUTs on it. It knows nothing of S3, objects or the database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Workers:
    """A pool of ``threads`` worker threads, started at its first task.

    Args:
        threads: how many tasks run at once.
        name: the prefix of the threads' names.
    """

    def __init__(self, threads: int, name: str = "ebooklet"):
        self.threads = threads
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        pool = self._pool
        if pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=self.name)
                pool = self._pool
        return pool

    def map(self, func: Callable, items: Iterable) -> Iterator:
        """Run ``func`` over ``items`` on the pool; the results come in order (a single
        item runs on the calling thread).

        Must not be called from a task already running on this pool (it could wait for
        itself). A task's exception is raised when its result is reached.
        """
        items = list(items)
        if len(items) <= 1:
            return iter([func(i) for i in items])
        return self._executor().map(func, items)

    def submit(self, func: Callable, *args: Any) -> Future:
        """Run ``func(*args)`` on the pool; its :class:`~concurrent.futures.Future`."""
        return self._executor().submit(func, *args)

    def close(self) -> None:
        """Stop the threads once their tasks are done, without waiting for them; a later
        task starts a new pool."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"Workers(threads={self.threads})"
