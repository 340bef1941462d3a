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


def test_a_database_shows_what_it_is_and_holds(conn, tmp_path, public_url):
    with ebooklet.open(conn, tmp_path / "a.blt", "n", value_serializer="orjson") as db:
        db.update({"a": 1, "b": 2})
        db.changes().push()
        db["c"] = 3
        info = db.info()
        assert (info.commit, info.n_keys, info.pending_edits, info.state) == (1, 3, 1, "online")
        assert info.value_serializer == "orjson" and info.key_serializer == "str"
        assert info.write_lock is True and info.uuid == db.uuid
        assert info.n_bytes == 2 and info.commit_time.tzinfo is not None
        cells = dict(row[:2] for row in _Cells(db._repr_html_()).rows)
        assert cells["pending edits"] == "1" and cells["n keys"] == "3"
        assert cells["write lock"] == "True"
    assert "closed" in db._repr_html_()
    with ebooklet.open(public_url, tmp_path / "r.blt", "r") as reader:
        info = reader.info()
        assert (info.commit, info.n_keys, info.pending_edits, info.write_lock) == (1, 2, 0, False)
        assert info.remote == public_url
    with ebooklet.open(None, tmp_path / "local.blt", "n") as local:
        assert (local.info().remote, local.info().commit, local.info().n_bytes) == (None, None, None)
