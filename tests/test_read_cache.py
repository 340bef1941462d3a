"""Reads of remote values already checked this session (``Reads`` trusts a cached copy
it checked against the current head's index, and then reads it without checking it
again): every way the cached copy or the head can change sends the next read back to
the index. Each test reads a key twice first, so that the second read is the trusted
one, then changes something and reads again.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

import ebooklet


def push(conn: Any, path: Path, sets: dict | None = None, deletes: tuple = (), flag: str = "w") -> None:
    with ebooklet.open(conn, path, flag, value_serializer="pickle") as db:
        db.update(sets or {})
        for key in deletes:
            del db[key]
        db.changes().push()


def read_twice(db: ebooklet.EBooklet, *keys: str) -> None:
    for key in keys:
        assert db[key] == db[key]


VALUES = {f"k{i}": f"value {i}" for i in range(10)}


def test_a_refreshed_head_reads_a_remotely_changed_value_anew(conn: Any, reader: Any, tmp_path: Path) -> None:
    push(conn, tmp_path / "w.blt", VALUES, flag="n")
    with ebooklet.open(reader(conn), tmp_path / "r.blt", value_serializer="pickle") as db:
        read_twice(db, "k1", "k2")
        push(conn, tmp_path / "w.blt", {"k1": "changed"}, deletes=("k2",))
        assert db["k1"] == "value 1"  # the head this copy holds
        list(db.changes().iter_changes())  # refreshes the head, downloads nothing
        assert db["k1"] == "changed"
        assert db.get("k2") is None
        assert db["k3"] == "value 3"


def test_a_vacuum_that_moved_the_packs_reads_the_new_head(conn: Any, reader: Any, tmp_path: Path) -> None:
    """A read that finds its pack gone takes the new head: values trusted under the old
    one are checked against it again."""
    old = {f"k{i}": f"old-{i}-{uuid.uuid4().hex}" * 40 for i in range(10)}
    push(conn, tmp_path / "w.blt", old, flag="n")
    with ebooklet.open(reader(conn), tmp_path / "r.blt", value_serializer="pickle") as db:
        read_twice(db, "k0", "k5")
        push(conn, tmp_path / "w.blt", {f"k{i}": f"new {i}" for i in range(1, 10)})
        with ebooklet.open(conn, tmp_path / "w.blt", "w") as writer:
            assert writer.vacuum(keep=1).packs_rewritten == 1
        assert db["k3"] == "new 3"  # its pack is gone: the new head is read
        assert db["k5"] == "new 5"
        assert db["k0"] == old["k0"]  # moved to another pack, the cached copy still holds
        assert db["k0"] == old["k0"]


def test_a_write_then_a_discard_reads_the_remote_value_again(conn: Any, tmp_path: Path) -> None:
    push(conn, tmp_path / "w.blt", VALUES, flag="n")
    with ebooklet.open(conn, tmp_path / "w.blt", "w") as db:
        read_twice(db, "k1", "k2", "k3")
        db["k1"] = "local"
        del db["k2"]
        db.set_timestamp("k3", 1_000_000)
        assert db["k1"] == "local" and "k2" not in db and db.get("k2") is None
        assert db.changes().discard() == 3
        assert db["k1"] == "value 1" and db["k2"] == "value 2" and db["k3"] == "value 3"
        assert db["k1"] == "value 1" and db.get_timestamp("k3") != 1_000_000


def test_a_pull_reads_what_it_brought(conn: Any, reader: Any, tmp_path: Path) -> None:
    push(conn, tmp_path / "w.blt", VALUES, flag="n")
    with ebooklet.open(reader(conn), tmp_path / "r.blt", value_serializer="pickle") as db:
        read_twice(db, "k1", "k2", "k3")
        push(conn, tmp_path / "w.blt", {"k1": "changed", "k3": "theirs"}, deletes=("k2",))
        db.changes().pull()
        assert db["k1"] == "changed" and db["k3"] == "theirs"
        assert db["k1"] == "changed" and db["k3"] == "theirs"
        with pytest.raises(KeyError):
            db["k2"]


def test_clear_hides_the_trusted_values(conn: Any, tmp_path: Path) -> None:
    push(conn, tmp_path / "w.blt", VALUES, flag="n")
    with ebooklet.open(conn, tmp_path / "w.blt", "w") as db:
        read_twice(db, "k1")
        db.clear()
        assert db.get("k1") is None and "k1" not in db
        db.changes().discard()
        assert db["k1"] == "value 1"


def test_get_value_reads_what_booklet_reads(tmp_path: Path) -> None:
    """The data file read by ``pread`` (:func:`ebooklet._booklet_io.get_value`) gives what
    booklet's ``get`` gives: small and large values, deleted and absent keys, chains of
    records sharing a bucket, records still in booklet's write buffer."""
    import booklet

    from ebooklet._booklet_io import get_value

    with booklet.open(tmp_path / "raw.blt", "n", key_serializer="str", value_serializer=None, n_buckets=7) as book:
        values = {f"k{i}": bytes([i % 256]) * (i * 37 % 2000) for i in range(300)}
        for key, value in values.items():
            book[key] = value
        book.sync()
        for i in range(0, 300, 7):
            del book[f"k{i}"]
        book["buffered"] = b"not synced yet"
        for key in [*values, "buffered", "absent"]:
            assert get_value(book, key.encode()) == book.get(key), key
