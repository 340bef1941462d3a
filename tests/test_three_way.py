"""The three-way rule (:func:`ebooklet.local.three_way`) and its callers agreeing on it.

The pure function is tested by properties with no server; ``iter_changes`` and
``push`` are tested against the real moto server to report and do what it decides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ebooklet

T0 = 1_600_000_000_000_000
T1 = 1_700_000_000_000_000


def _kinds(db: Any) -> list[str]:
    return [c.kind for c in db.changes().iter_changes()]


def test_retimed_edit_equal_to_the_remote_is_settled_by_both(conn: Any, tmp_path: Path) -> None:
    """Two writers give a key the same new timestamp: the second one's edit already equals
    the remote (value and timestamp), so iter_changes lists nothing and push commits
    nothing, and the edit is gone."""
    first, second = tmp_path / "first.blt", tmp_path / "second.blt"
    with ebooklet.open(conn, first, "n", value_serializer="pickle") as db:
        db.set("k", "v", timestamp=T0)
        db.changes().push()
    with ebooklet.open(conn, second, "w", value_serializer="pickle") as db:
        assert db["k"] == "v"  # cached with T0
    with ebooklet.open(conn, first, "w") as db:
        db.set_timestamp("k", T1)
        assert db.changes().push().committed
    with ebooklet.open(conn, second, "w") as db:
        db.set_timestamp("k", T1)
        assert _kinds(db) == []
        result = db.changes().push()
        assert not result.committed
        assert _kinds(db) == []
        assert db.get_timestamp("k") == T1
        assert db["k"] == "v"


def test_retimed_edit_to_the_remote_timestamp_lists_nothing(conn: Any, tmp_path: Path) -> None:
    """set_timestamp() to the timestamp the key already has remotely is no change."""
    path = tmp_path / "w.blt"
    with ebooklet.open(conn, path, "n", value_serializer="pickle") as db:
        db.set("k", "v", timestamp=T0)
        db.changes().push()
    with ebooklet.open(conn, path, "w") as db:
        db.set_timestamp("k", T0)
        assert _kinds(db) == []
        assert not db.changes().push().committed


def test_retimed_edit_to_another_timestamp_is_listed_and_pushed(
    conn: Any, reader: Any, tmp_path: Path
) -> None:
    """A retimed edit whose timestamp differs from the remote's is a modification, listed
    and pushed, even though the value equals the remote's."""
    path = tmp_path / "w.blt"
    with ebooklet.open(conn, path, "n", value_serializer="pickle") as db:
        db.set("k", "v", timestamp=T0)
        db.changes().push()
    with ebooklet.open(conn, path, "w") as db:
        db.set_timestamp("k", T1)
        assert _kinds(db) == ["modified"]
        result = db.changes().push()
        assert (result.committed, result.keys_pushed) == (True, 1)
        assert _kinds(db) == []
    with ebooklet.open(reader(conn), tmp_path / "r.blt", value_serializer="pickle") as r:
        assert r.get_timestamp("k") == T1
