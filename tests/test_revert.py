"""``db.revert(seq)``: a past state back as a new commit, against the test server."""

from __future__ import annotations

import pytest

import ebooklet
from ebooklet import EBookletError, ReadOnlyError, RemoteNotFoundError


def _three_commits(conn, path):
    with ebooklet.open(conn, path, "n", value_serializer="orjson") as db:
        db.update({"a": 1, "b": 2, "c": 3})
        db.set_metadata({"v": 1})
        db.changes().push(message="one")
        db["a"] = 10
        del db["b"]
        db["d"] = 4
        db.set_metadata({"v": 2})
        db.changes().push(message="two")
        at_two = {k: db.get_timestamp(k) for k in ("a", "c", "d")}
        db["c"] = 30
        db.changes().push(message="three")
        return at_two


def test_revert_restores_a_past_state_as_a_new_commit(conn, tmp_path, make_conn):
    _three_commits(conn, tmp_path / "w.blt")
    with ebooklet.open(conn, tmp_path / "w.blt", "w") as db:
        result = db.revert(1)
        assert result.committed and result.seq == 4
        assert dict(db.items()) == {"a": 1, "b": 2, "c": 3}
        assert db.get_metadata() == {"v": 1}
        assert [c.message for c in db.history()] == ["revert to 1", "three", "two", "one"]
        assert list(db.changes().iter_changes()) == []
    with ebooklet.open(make_conn(), tmp_path / "fresh.blt", "r") as reader:  # what others see
        assert dict(reader.items()) == {"a": 1, "b": 2, "c": 3}
        assert reader.get_metadata() == {"v": 1}


def test_revert_keeps_the_timestamps_of_then(conn, tmp_path):
    then = _three_commits(conn, tmp_path / "w.blt")
    with ebooklet.open(conn, tmp_path / "w.blt", "w") as db:
        db.revert(2, message="back to two")
        assert db.history(limit=1)[0].message == "back to two"
        assert dict(db.items()) == {"a": 10, "c": 3, "d": 4}
        assert db.get_timestamp("c") == then["c"]


def test_revert_to_the_head_commits_nothing(conn, tmp_path):
    _three_commits(conn, tmp_path / "w.blt")
    with ebooklet.open(conn, tmp_path / "w.blt", "w") as db:
        assert not db.revert(3).committed
        assert len(db.history()) == 3


def test_revert_refuses_pending_edits_unknown_commits_and_readers(conn, tmp_path, public_url):
    _three_commits(conn, tmp_path / "w.blt")
    with ebooklet.open(conn, tmp_path / "w.blt", "w") as db:
        db["x"] = 1
        with pytest.raises(EBookletError, match="unpushed edits"):
            db.revert(1)
        assert db["x"] == 1  # nothing lost
        db.changes().discard()
        with pytest.raises(RemoteNotFoundError):
            db.revert(99)
        assert dict(db.items()) == {"a": 10, "c": 30, "d": 4}
    with ebooklet.open(public_url, tmp_path / "r.blt", "r") as reader, pytest.raises(ReadOnlyError):
        reader.revert(1)
