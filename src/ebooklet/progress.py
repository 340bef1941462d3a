"""Progress of long operations (push, pull, load_items, copy, vacuum).

Each takes a ``progress`` argument:

- ``None`` (the default): a tqdm bar on a terminal (stderr is a TTY), shown only once
  the operation has taken :data:`BAR_DELAY` seconds; nothing in scripts, pipes and logs.
- ``True``: a bar always (``tqdm.auto``: a widget in notebooks); needs the ``progress``
  extra.
- ``False``: nothing.
- a callable ``progress(done, total)``: called after each step with the units done so far
  and the total (``None`` until known: :meth:`Progress.set_total` tells it at once),
  from whichever thread did the step.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from .errors import EBookletError
from .serializers import DISTRIBUTION

ProgressArg = bool | Callable[[int, int | None], Any] | None
"""What the ``progress`` argument of a long operation may be (see the module docstring)."""

BAR_DELAY = 1.0
"""Seconds before a bar shown by default (on a terminal) appears."""


def _tqdm_available() -> bool:
    try:
        import tqdm  # noqa: F401 - only whether it can be imported
    except ImportError:
        return False
    return True


class Progress:
    """Reports the progress of one operation: ``update(n)`` after each step, ``close()``
    (or leave the ``with`` block) at the end.

    Args:
        how: the caller's ``progress`` argument.
        total: the units to do (``None``: unknown).
        unit: what a unit is (``"B"`` for bytes: shown scaled, as KiB, MiB...).
        desc: what the operation is, shown before the bar.

    Raises:
        EBookletError: ``how`` is ``True`` and tqdm is not installed.
        TypeError: ``how`` is none of the accepted kinds.
    """

    def __init__(self, how: ProgressArg, total: int | None, unit: str = "B", desc: str = ""):
        check(how)
        self.done = 0
        self.total = total
        self._lock = threading.Lock()
        self._callback: Callable[[int, int | None], Any] | None = None
        self._bar: Any = None
        if callable(how) and not isinstance(how, bool):
            self._callback = how
        elif how is True:
            self._bar = _bar(total, unit, desc, delay=0.0, notebook=True)
        elif how is None and sys.stderr is not None and sys.stderr.isatty() and _tqdm_available():
            self._bar = _bar(total, unit, desc, delay=BAR_DELAY, notebook=False)

    def update(self, n: int) -> None:
        """Count ``n`` more units done."""
        if not n:
            return
        with self._lock:
            self.done += n
            done = self.done
            if self._bar is not None:
                self._bar.update(n)
        if self._callback is not None:
            self._callback(done, self.total)

    def set_total(self, total: int) -> None:
        """The total became known (or grew): a callback is told at once."""
        with self._lock:
            self.total = total
            done = self.done
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()
        if self._callback is not None:
            self._callback(done, total)

    def close(self) -> None:
        """End the bar (a callback needs no ending)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check(how: Any) -> None:
    """Check a ``progress`` argument before the operation sends any request.

    Raises:
        TypeError: ``how`` is none of the accepted kinds.
        EBookletError: ``how`` is ``True`` and tqdm is not installed.
    """
    if how is True and not _tqdm_available():
        raise EBookletError(
            f"progress=True shows a tqdm bar, and tqdm is not installed: pip install "
            f'"{DISTRIBUTION}[progress]", or pass a callable(done, total) instead.'
        )
    if not (how is None or isinstance(how, bool) or callable(how)):
        raise TypeError(
            f"progress must be None, True, False or a callable(done, total), not {how!r}."
        )


def _bar(total: int | None, unit: str, desc: str, delay: float, notebook: bool) -> Any:
    if notebook:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    scale = unit == "B"
    return tqdm(total=total, unit=unit, desc=desc, delay=delay, unit_scale=scale,
                unit_divisor=1024 if scale else 1000, leave=False)
