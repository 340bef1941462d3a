"""One shard cache (issue 11): diff, vacuum, copy and reads share the database's
``RemoteIndex``, so an index shard is fetched once, whoever reads it first, and what
maintenance fetched or wrote is in the local mirror for the next read.

Requests are counted on the local moto server (skipped against an external target).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ebooklet
from ebooklet import format as fmt

vacuum_mod = sys.modules["ebooklet.maintenance.vacuum"]  # the package exports its function
N_KEYS = 6000


def shard_gets(s3_server: Any) -> list[str]:
    """Paths of the index-shard GETs since the last reset."""
    return [p for m, p, _ in s3_server.server.iter_requests() if m == "GET" and ".ebk/index/" in p]


def push(conn: Any, path: Path, sets: dict | None = None, deletes: tuple = ()) -> None:
    with ebooklet.open(conn, path, "c", value_serializer="pickle") as db:
        db.update(sets or {})
        for key in deletes:
            del db[key]
        db.changes().push()


@pytest.fixture
def local_server(s3_server: Any) -> Any:
    if not s3_server.is_local:
        pytest.skip("counts requests on the local server")
    return s3_server


@pytest.fixture
def two_commits(conn: Any, tmp_path: Path, small_shards: int) -> Path:
    """Commit 1 writes N_KEYS keys over several shards; commit 2 changes every shard."""
    path = tmp_path / "w.blt"
    push(conn, path, {f"k{i}": i for i in range(N_KEYS)})
    push(conn, path, {f"k{i}": -i for i in range(0, N_KEYS, 7)})
    return path


def test_shards_a_diff_fetched_serve_later_reads(
    two_commits: Path, conn: Any, local_server: Any, tmp_path: Path
) -> None:
    """After diff, reopening and reading every key fetches no index shard."""
    path = tmp_path / "r.blt"
    with ebooklet.open(conn, path, "c", value_serializer="pickle") as db:
        local_server.server.reset_request_counts()
        assert len(db.diff(1, 2)) == len(range(7, N_KEYS, 7))  # k0 keeps its value
        fetched = shard_gets(local_server)
        assert len(fetched) == len(set(fetched)) >= 4
    local_server.server.reset_request_counts()
    with ebooklet.open(conn, path, "r", value_serializer="pickle") as db:
        assert [db[f"k{i}"] for i in range(0, N_KEYS, 97)] == [
            -i if i % 7 == 0 else i for i in range(0, N_KEYS, 97)
        ]
    assert shard_gets(local_server) == []


def test_a_diff_after_reads_fetches_only_the_shards_not_read(
    two_commits: Path, conn: Any, local_server: Any, tmp_path: Path
) -> None:
    """Reads fetched the head's shards: diff(1, 2) fetches commit 1's alone, and a second
    diff nothing (shards evicted from memory come back from the mirror)."""
    with ebooklet.open(conn, tmp_path / "r.blt", "c", value_serializer="pickle") as db:
        head = db.history()[0].commit_id
        assert len(list(db.keys())) == N_KEYS
        local_server.server.reset_request_counts()
        db.diff(1, 2)
        assert [p for p in shard_gets(local_server) if head in p] == []
        local_server.server.reset_request_counts()
        db.diff(1, 2)
        assert shard_gets(local_server) == []


def test_vacuum_over_more_shards_than_the_memory_cache_reads_each_once(
    two_commits: Path, conn: Any, local_server: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With room for 2 parsed shards, vacuum reads every shard of the kept commits once
    (evicted ones come back from the mirror); the shards it rewrote are local after it.
    It cuts the moved values into packs of ``remote.PACK_SIZE`` as tuned here."""
    import ebooklet.remote

    monkeypatch.setattr(ebooklet.remote, "SHARD_CACHE", 2)
    monkeypatch.setattr(ebooklet.remote, "PACK_SIZE", 1024)
    push(conn, two_commits, deletes=tuple(f"k{i}" for i in range(N_KEYS) if i % 10))
    with ebooklet.open(conn, two_commits, "w", value_serializer="pickle") as db:
        local_server.server.reset_request_counts()
        result = db.vacuum(keep=1)
        assert result.packs_rewritten >= 1
        fetched = shard_gets(local_server)
        assert len(fetched) == len(set(fetched))
    assert len(list(conn.list(fmt.PREFIX + "pack/"))) > 1
    local_server.server.reset_request_counts()
    with ebooklet.open(conn, two_commits, "r", value_serializer="pickle") as db:
        assert [db[f"k{i}"] for i in range(0, N_KEYS, 10)] == [
            -i if i % 7 == 0 else i for i in range(0, N_KEYS, 10)
        ]
    assert shard_gets(local_server) == []


def test_a_vacuum_that_loses_its_commit_raises_vacuum_conflict_error(
    two_commits: Path, conn: Any, make_conn: Callable[..., Any], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another writer breaks the lock and commits while vacuum works: vacuum raises
    VacuumConflictError (a ConflictError with no keys), deletes nothing, and the next
    vacuum succeeds."""
    push(conn, two_commits, deletes=tuple(f"k{i}" for i in range(N_KEYS) if i % 10))
    choose = vacuum_mod._packs_to_rewrite
    interfered: list[bool] = []

    def then_another_writer_commits(*args: Any) -> set[bytes]:
        chosen = choose(*args)
        if not interfered:
            interfered.append(True)
            other = make_conn()
            ebooklet.break_lock(other)
            push(other, tmp_path / "other.blt", {"other": 1})
        return chosen

    monkeypatch.setattr(vacuum_mod, "_packs_to_rewrite", then_another_writer_commits)
    with ebooklet.open(conn, two_commits, "w", value_serializer="pickle") as db:
        before = dict(conn.list(fmt.PREFIX))
        with pytest.raises(ebooklet.VacuumConflictError, match="Run vacuum again") as info:
            db.vacuum(keep=1)
        assert isinstance(info.value, ebooklet.ConflictError) and info.value.keys == []
        assert set(before) - {fmt.LOCK_NAME} <= set(dict(conn.list(fmt.PREFIX)))
    with ebooklet.open(conn, tmp_path / "again.blt", "w", value_serializer="pickle") as db:
        assert db.vacuum(keep=1).commits_kept == [4]
        assert db["other"] == 1 and db["k10"] == 10
    assert ebooklet.check(conn).ok
