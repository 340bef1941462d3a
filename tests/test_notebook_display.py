"""What a notebook shows: the ``_repr_html_`` of changes, push results and history,
rendered from a real database on the test server and parsed back."""

from __future__ import annotations

from html.parser import HTMLParser

import ebooklet
from ebooklet import display


class _Cells(HTMLParser):
    """The text of every table cell, row by row; and whether any tag other than the
    table's own appeared (an unescaped key would add one)."""

    ALLOWED = {"div", "b", "table", "tr", "th", "td", "p"}

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self.foreign: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in self.ALLOWED:
            self.foreign.append(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_changes_push_result_and_history_render_as_tables(conn, tmp_path):
    with ebooklet.open(conn, tmp_path / "a.blt", "n") as db:
        db["plain"] = b"1"
        db["<script>alert(1)</script>"] = b"2"
        changes = db.changes()
        page = _Cells(changes._repr_html_())
        assert page.foreign == []  # the hostile key is text, not markup
        assert page.rows[0] == ["kind", "key", "local md5", "remote md5"]
        assert sorted(row[1] for row in page.rows[1:]) == sorted(
            [repr("plain"), repr("<script>alert(1)</script>")]
        )
        assert {row[0] for row in page.rows[1:]} == {"added"}
        assert "iter_changes" in repr(changes)

        result = changes.push(message="first <b>")
        shown = dict(_Cells(result._repr_html_()).rows[i][:2] for i in range(5))
        assert shown["keys pushed"] == "2"
        assert shown["commit id"] == result.commit_id

        db["plain"] = b"3"
        db.changes().push(message="second")
        history = db.history()
        assert isinstance(history, list)
        page = _Cells(history._repr_html_())
        assert page.foreign == []
        assert [row[0] for row in page.rows[1:]] == ["2", "1"]
        assert [row[-1] for row in page.rows[1:]] == ["second", "first <b>"]

        assert "none" in db.changes()._repr_html_()  # nothing pending


def test_long_tables_are_cut_and_say_how_many_rows_were_left_out():
    rows = ((i, f"key{i}") for i in range(display.ROWS_SHOWN + 7))
    page = display.table("t", ("n", "key"), rows)
    assert len(_Cells(page).rows) == 1 + display.ROWS_SHOWN
    assert "7 more" in page
