"""HTML for notebooks: the ``_repr_html_`` of databases, changes, push results and history.

Jupyter calls ``_repr_html_`` to show an object; these functions build that HTML from
plain values, escaping every one (keys and messages come from other people's buckets).
Tables are cut at :data:`ROWS_SHOWN` rows, with a line saying how many were left out.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

ROWS_SHOWN = 50
"""At most this many rows of a table are shown in a notebook."""


def _cell(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def fields(title: str, pairs: Iterable[tuple[str, Any]]) -> str:
    """A two-column table of ``(name, value)`` under a bold ``title``."""
    rows = "".join(f"<tr><th style='text-align:left'>{_cell(k)}</th><td>{_cell(v)}</td></tr>" for k, v in pairs)
    return f"<div><b>{_cell(title)}</b><table>{rows}</table></div>"


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A table with ``headers``, at most :data:`ROWS_SHOWN` of ``rows`` (read lazily:
    the rest are counted, not kept), under a bold ``title``; an empty table says so."""
    head = "".join(f"<th>{_cell(h)}</th>" for h in headers)
    shown, more = [], 0
    for row in rows:
        if len(shown) < ROWS_SHOWN:
            shown.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>")
        else:
            more += 1
    if not shown:
        return f"<div><b>{_cell(title)}</b>: none</div>"
    tail = f"<p>… and {more} more</p>" if more else ""
    return f"<div><b>{_cell(title)}</b><table><tr>{head}</tr>{''.join(shown)}</table>{tail}</div>"
