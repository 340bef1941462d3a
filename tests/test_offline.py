"""Working offline (behaviour 9 of the core-engine issue).

With the endpoint unreachable, ``open`` works from the local files with an
``OfflineWarning`` and ``db.offline`` set; local reads, writes and cached values
work; what needs the network raises ``OfflineError`` and loses nothing; once the
endpoint is back, a push uploads the offline edits.

Each test runs its own moto server (``fresh_server``) and makes it unreachable in
one of two ways: ``paused`` (SIGSTOP: connections hang until a 1 s timeout, like a
dead network) or ``killed`` (connections refused at once).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ebooklet

DB_KEY = "offline/db"
KEYS = {f"k{i}": f"value {i}" for i in range(20)}
CACHED = ["k0", "k1", "k2", "k3", "k4"]


_made: list[ebooklet.S3Connection] = []


def remote_for(target: Any, kind: str, quick: bool = True) -> ebooklet.S3Connection:
    """A connection that gives up quickly (1 s timeout, no retries), or with ``quick=False``
    one with the default patience, for the steps before the outage (a server starting
    up may take over a second to answer its first writes); closed after the test."""
    params = {"timeout": 1, "retries": 0} if quick else {}
    if kind == "connection":
        conn = target.connection(DB_KEY, **params)
    else:
        conn = ebooklet.S3Connection(db_url=target.public_url(DB_KEY), **params)
    _made.append(conn)
    return conn


@pytest.fixture(autouse=True)
def _close_connections() -> Iterator[None]:
    yield
    while _made:
        _made.pop().close()


def cut_off(target: Any, outage: str) -> None:
    if outage == "paused":
        target.server.pause()
    else:
        target.server.kill()


def read_remote(target: Any, tmp_path: Path) -> dict:
    """Everything the remote holds, read through a brand-new local copy."""
    path = tmp_path / f"check-{time.time_ns()}.blt"
    with ebooklet.open(remote_for(target, "connection", quick=False), path) as db:
        return dict(db.items())


@pytest.fixture
def published(fresh_server: Any, tmp_path: Path) -> Any:
    """``fresh_server`` holding the database ``KEYS`` at ``DB_KEY``."""
    conn = remote_for(fresh_server, "connection", quick=False)
    with ebooklet.open(conn, tmp_path / "writer.blt", "n", value_serializer="str") as db:
        db.update(KEYS)
        db.changes().push()
    return fresh_server


def make_local_copy(target: Any, path: Path, kind: str) -> None:
    """A local copy of the database with the ``CACHED`` values (and its index shard)."""
    flag = "w" if kind == "connection" else "r"
    with ebooklet.open(remote_for(target, kind, quick=False), path, flag) as db:
        assert not db.offline
        assert dict(db.get_items(CACHED)) == {k: KEYS[k] for k in CACHED}


def open_offline(target: Any, path: Path, kind: str) -> ebooklet.EBooklet:
    flag = "w" if kind == "connection" else "r"
    with pytest.warns(ebooklet.OfflineWarning):
        db = ebooklet.open(remote_for(target, kind), path, flag)
    assert db.offline
    assert "offline" in repr(db)
    return db


@pytest.mark.parametrize("kind", ["connection", "public_url"])
@pytest.mark.parametrize("outage", ["paused", "killed"])
def test_open_offline_works_from_the_local_files(published, tmp_path, outage, kind):
    """Cached values, membership, ``len`` and iteration work offline; an uncached value
    raises ``OfflineError``; a writable copy takes local writes, and a push fails with
    ``OfflineError`` keeping them pending."""
    path = tmp_path / "copy.blt"
    make_local_copy(published, path, kind)
    cut_off(published, outage)

    with open_offline(published, path, kind) as db:
        for key in CACHED:
            assert db[key] == KEYS[key]
        assert "k7" in db and "missing" not in db  # from the locally kept index
        assert len(db) == len(KEYS)
        assert sorted(db) == sorted(KEYS)
        with pytest.raises(ebooklet.OfflineError):
            db["k7"]
        assert db.get("missing", "default") == "default"
        if kind == "public_url":
            return
        db["new"] = "written offline"
        db["k0"] = "edited offline"
        del db["k1"]
        assert (db["new"], db["k0"], "k1" in db) == ("written offline", "edited offline", False)
        assert len(db) == len(KEYS)
        with pytest.raises(ebooklet.OfflineError):
            db.changes().push()
        pending = {c.key: c.kind for c in db.changes().iter_changes()}
        assert pending == {"new": "added", "k0": "modified", "k1": "deleted"}

    with open_offline(published, path, kind) as db:  # the edits survive a reopen
        assert (db["new"], db["k0"], "k1" in db) == ("written offline", "edited offline", False)


@pytest.mark.parametrize("when", ["before_open", "after_open"])
def test_push_after_the_endpoint_comes_back_uploads_offline_edits(published, tmp_path, when):
    """Edits made while the endpoint is unreachable (opened offline, or losing the
    network while open) are pushed by the same database object once it is back."""
    path = tmp_path / "copy.blt"
    make_local_copy(published, path, "connection")
    if when == "before_open":
        cut_off(published, "paused")
        db = open_offline(published, path, "connection")
    else:
        db = ebooklet.open(remote_for(published, "connection"), path, "w")
        cut_off(published, "paused")
    with db:
        db["new"] = "written offline"
        del db["k1"]
        with pytest.raises(ebooklet.OfflineError):
            db.changes().push()
        published.server.resume()
        result = db.changes().push()
        assert result.committed and (result.keys_pushed, result.keys_deleted) == (1, 1)
        assert not db.offline
        assert db["k7"] == KEYS["k7"]  # uncached values can be fetched again
    expected = {k: v for k, v in KEYS.items() if k != "k1"} | {"new": "written offline"}
    assert read_remote(published, tmp_path) == expected


@pytest.mark.parametrize("flag", ["r", "w"])
def test_open_offline_without_a_local_copy_raises_offline_error(published, tmp_path, flag):
    """With nothing local to work from, an unreachable remote is a clear ``OfflineError``,
    and the attempt leaves nothing behind that stops a later open once back online."""
    path = tmp_path / "never-synced.blt"
    cut_off(published, "paused")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ebooklet.OfflineWarning)
        with pytest.raises(ebooklet.OfflineError):
            ebooklet.open(remote_for(published, "connection"), path, flag)
    published.server.resume()
    with ebooklet.open(remote_for(published, "connection", quick=False), path, flag) as db:
        assert not db.offline
        assert dict(db.items()) == KEYS


def test_a_cached_value_that_cannot_be_checked_offline_says_so(published, tmp_path):
    """A copy caches values, then adopts a newer head that rewrote their index shard
    (not fetched yet), then loses the remote: the cached values it returns cannot be
    checked against an md5, and the read says so with an OfflineWarning instead of
    serving them as verified."""
    path = tmp_path / "copy.blt"
    make_local_copy(published, path, "connection")
    with ebooklet.open(remote_for(published, "connection", quick=False), tmp_path / "w", "w") as db:
        db["k19"] = "changed"
        db.changes().push()
    with ebooklet.open(remote_for(published, "connection", quick=False), path, "r") as db:
        assert not db.offline  # adopts the new head; the shard of k0 is not local any more
    cut_off(published, "killed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ebooklet.open(remote_for(published, "connection"), path, "r") as db:
            assert db.offline
            assert db["k0"] == KEYS["k0"]
    assert any("cannot be checked" in str(w.message) for w in caught)
