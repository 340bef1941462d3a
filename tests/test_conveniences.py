"""The conveniences of everyday use (issue 13): per-key facts without the value
(``stat``), ``keys/items/values(prefix=...)``, the remote side of a conflict
(``get_remote``), evicting the local cache (``evict``) and datetime timestamps."""

from __future__ import annotations

import hashlib
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import booklet
import pytest

import ebooklet
from ebooklet import KeyStat

T0 = 1_700_000_000_000_000  # µs


def push(conn: Any, path: Path, sets: dict, flag: str = "w", timestamp: Any = None) -> None:
    with ebooklet.open(conn, path, flag) as db:
        for key, value in sets.items():
            db.set(key, value, timestamp)
        db.changes().push()


def md5(raw: bytes) -> str:
    return hashlib.md5(raw).hexdigest()


def pack_gets(s3_server: Any, db_key: str) -> int:
    """Requests for this test's packs (value downloads) since the last reset."""
    return sum(1 for m, p, _ in s3_server.server.iter_requests() if db_key in p and ".ebk/pack/" in p)


def reset(s3_server: Any) -> None:
    if not s3_server.is_local:
        pytest.skip("counts requests of the local moto_server")
    s3_server.server.reset_request_counts()


def cached_keys(path: Path) -> set:
    """The keys whose values the (closed) data file holds."""
    with booklet.open(str(path), "r") as book:
        return set(book.keys())


# --------------------------------------------------------------------------- stat


def test_stat_reads_the_index_not_the_value(
    conn: Any, reader: Any, db_key: str, s3_server: Any, tmp_path: Path
) -> None:
    push(conn, tmp_path / "w.blt", {"a": b"x" * 1000, "b": b"yy"}, flag="n", timestamp=T0)
    reset(s3_server)
    with ebooklet.open(reader(conn), tmp_path / "r.blt") as db:
        stat = db.stat("a")
        assert stat == KeyStat(size=1000, md5=md5(b"x" * 1000), timestamp=T0, local=False)
        assert stat.time == datetime.fromtimestamp(T0 / 1e6, timezone.utc)
        assert db.stat("b", remote=True) == (2, md5(b"yy"), T0, False)
        with pytest.raises(KeyError):
            db.stat("missing")
    assert pack_gets(s3_server, db_key) == 0
    assert cached_keys(tmp_path / "r.blt") == set()


def test_stat_of_a_local_edit_and_of_the_head_under_it(conn: Any, tmp_path: Path) -> None:
    push(conn, tmp_path / "w.blt", {"a": b"remote", "b": b"gone"}, flag="n", timestamp=T0)
    with ebooklet.open(conn, tmp_path / "w.blt", "w") as db:
        db.set("a", b"local!!", T0 + 5)
        del db["b"]
        db["c"] = b"new"
        assert db.stat("a") == (7, md5(b"local!!"), T0 + 5, True)
        assert db.stat("a", remote=True) == (6, md5(b"remote"), T0, False)
        with pytest.raises(KeyError):
            db.stat("b")
        assert db.stat("b", remote=True).md5 == md5(b"gone")
        assert db.stat("c").local and db.stat("c").size == 3
        with pytest.raises(KeyError):
            db.stat("c", remote=True)


# --------------------------------------------------------------------------- prefix


PREFIXED = {"user/1": b"u1", "user/2": b"u2", "usex": b"x", "item/1": b"i1", "ünï/1": b"n1", "ün": b"n"}


def test_keys_and_items_by_prefix_download_no_other_value(
    conn: Any, reader: Any, tmp_path: Path
) -> None:
    push(conn, tmp_path / "w.blt", PREFIXED, flag="n")
    with ebooklet.open(reader(conn), tmp_path / "r.blt") as db:
        assert sorted(db.keys(prefix="user/")) == ["user/1", "user/2"]
        assert sorted(db.keys(prefix="ünï")) == ["ünï/1"]
        assert sorted(db.keys(prefix="")) == sorted(PREFIXED)
        assert list(db.keys(prefix="nothing")) == []
        assert sorted(db.items(prefix="user/")) == [("user/1", b"u1"), ("user/2", b"u2")]
        assert sorted(db.values(prefix="ün")) == [b"n", b"n1"]
        assert sorted(db.keys(["user/1", "usex", "user/9"], prefix="user/")) == ["user/1"]
        assert list(db.items(["usex", "user/2"], prefix="user/")) == [("user/2", b"u2")]
    assert cached_keys(tmp_path / "r.blt") == {"user/1", "user/2", "ünï/1", "ün"}


def test_prefix_sees_the_local_edits(conn: Any, tmp_path: Path) -> None:
    push(conn, tmp_path / "w.blt", PREFIXED, flag="n")
    with ebooklet.open(conn, tmp_path / "w.blt", "w") as db:
        del db["user/1"]
        db["user/3"] = b"u3"
        db["user/2"] = b"changed"
        db["other"] = b"o"
        assert sorted(db.keys(prefix="user/")) == ["user/2", "user/3"]
        assert sorted(db.items(prefix="user/")) == [("user/2", b"changed"), ("user/3", b"u3")]


def test_prefix_is_refused_where_encodings_do_not_keep_it(conn: Any, tmp_path: Path) -> None:
    with ebooklet.open(conn, tmp_path / "s.blt", "n") as db:
        db["abc"] = b"1"
        with pytest.raises(TypeError, match="prefix must be str"):
            list(db.keys(prefix=b"a"))
    with ebooklet.open(None, tmp_path / "b.blt", "n", key_serializer=None) as db:
        db[b"ab"] = b"1"
        db[b"b"] = b"2"
        assert list(db.keys(prefix=b"a")) == [b"ab"]
    with ebooklet.open(None, tmp_path / "i.blt", "n", key_serializer="uint4") as db:
        db[12] = b"1"
        with pytest.raises(TypeError, match="do not keep prefixes"):
            list(db.keys(prefix=1))
        with pytest.raises(TypeError, match="do not keep prefixes"):
            list(db.items(prefix="1"))


# --------------------------------------------------------------------------- remote side


def test_get_remote_is_the_remote_side_of_a_conflict(
    conn: Any, db_key: str, s3_server: Any, tmp_path: Path
) -> None:
    push(conn, tmp_path / "a.blt", {"k": b"base", "same": b"s"}, flag="n")
    with ebooklet.open(conn, tmp_path / "b.blt", "w") as mine:
        assert mine["k"] == b"base"
        mine["k"] = b"mine"
    push(conn, tmp_path / "a.blt", {"k": b"theirs"})
    with ebooklet.open(conn, tmp_path / "b.blt", "w") as db:
        [change] = db.changes().iter_changes()
        assert (change.kind, change.key) == ("conflict", "k")
        assert change.remote_md5 == md5(b"theirs") == db.stat("k", remote=True).md5
        assert db.get_remote("k") == b"theirs"
        assert db["k"] == b"mine"  # the local edit stays, in the file too
        assert db.stat("k") == (4, md5(b"mine"), db.get_timestamp("k"), True)
        assert db.get_remote("same") == b"s"
        assert db.get_remote("missing", "dflt") == "dflt"
        [change] = db.changes().iter_changes()
        assert change.kind == "conflict"
    with ebooklet.open(conn, tmp_path / "b.blt", "w") as db:
        assert db["k"] == b"mine"
        assert db.get_remote("k") == b"theirs"
        db.clear()  # the next push replaces the remote: the head is still there
        assert db.get_remote("same") == b"s" and "same" not in db


# --------------------------------------------------------------------------- evict


VALUES = {f"k{i}": f"value {i}".encode() for i in range(5)}


def test_evict_is_never_a_remote_deletion(
    conn: Any, reader: Any, db_key: str, s3_server: Any, tmp_path: Path
) -> None:
    push(conn, tmp_path / "w.blt", VALUES, flag="n")
    path = tmp_path / "e.blt"
    with ebooklet.open(conn, path, "w") as db:
        assert db.load_items() == 5
        assert db["k0"] == db["k0"]  # trusted by the read cache from here on
        db["k2"] = b"local"
        assert db.evict(["k1", "k2", "nope"]) == 1  # k2 is a local edit
        assert db.evict() == 3
        assert db.evict() == 0
        assert db["k2"] == b"local"
        assert [c.key for c in db.changes().iter_changes()] == ["k2"]
        result = db.changes().push()
        assert result.keys_deleted == 0 and result.keys_pushed == 1
    assert cached_keys(path) == {"k2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "values cached from the remote were deleted"
        with ebooklet.open(conn, path, "w") as db:
            reset(s3_server)
            assert db["k0"] == b"value 0"  # read anew: downloaded
            assert pack_gets(s3_server, db_key) == 1
            assert dict(db.items()) == {**VALUES, "k2": b"local"}
            assert list(db.changes().iter_changes()) == []
    with ebooklet.open(reader(conn), tmp_path / "r.blt") as db:
        assert dict(db.items()) == {**VALUES, "k2": b"local"}


def test_evict_sends_a_trusted_read_back_to_the_remote(
    conn: Any, db_key: str, s3_server: Any, tmp_path: Path
) -> None:
    push(conn, tmp_path / "w.blt", VALUES, flag="n")
    with ebooklet.open(conn, tmp_path / "r.blt", "r") as db:
        assert db["k3"] == db["k3"] == b"value 3"
        assert db.evict(["k3"]) == 1
        reset(s3_server)
        assert db["k3"] == b"value 3"
        assert db.get("k3") == b"value 3"
        assert pack_gets(s3_server, db_key) == 1


# --------------------------------------------------------------------------- datetimes


def test_timestamps_as_datetimes(conn: Any, tmp_path: Path) -> None:
    moment = datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)
    push(conn, tmp_path / "w.blt", {"a": b"1", "b": b"2"}, flag="n", timestamp=moment)
    with ebooklet.open(conn, tmp_path / "r.blt", "w") as db:
        got = db.get_timestamp("a", as_datetime=True)  # from the remote entry
        assert got == moment and got.tzinfo is not None and got.utcoffset().total_seconds() == 0
        assert db.get_timestamp("a") == int(moment.timestamp()) * 1_000_000 + 123456
        db.set("b", b"local", "2030-06-01T00:00:00.000001+02:00")
        later = datetime(2030, 5, 31, 22, 0, 0, 1, tzinfo=timezone.utc)
        assert db.get_timestamp("b", include_value=True, as_datetime=True) == (later, b"local")
        assert db.get_timestamp("nope", as_datetime=True, default="none") == "none"
        assert sorted(db.timestamps(as_datetime=True)) == [("a", moment), ("b", later)]
        assert sorted(db.timestamps(include_value=True, as_datetime=True)) == [
            ("a", moment, b"1"), ("b", later, b"local")
        ]
