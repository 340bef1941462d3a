"""The pending edits hold a bounded amount in memory (issue 12): beyond ``local.SPILL_EDITS``
an :class:`EditMap` moves them to a temporary database and still behaves as a dict, and
a journal of many edits is replayed, compacted, pushed and read back whole.

``local.SPILL_EDITS`` is made small for each test; the end-to-end test pushes to the real
server.
"""

from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import ebooklet
from ebooklet import format as fmt
from ebooklet import local
from ebooklet.local import ChangeLog, Edit, EditMap


@pytest.fixture
def spill(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(local, "SPILL_EDITS", 40)
    return 40


def _md5(i: int) -> bytes:
    return fmt.md5(b"%d" % i)


def _check_same(edits: EditMap, model: dict[bytes, Edit], checked: dict[bytes, bytes], pool: list[bytes]) -> None:
    """``edits`` holds what ``model`` does (and ``checked``), by every way of reading it."""
    assert len(edits) == len(model)
    assert sorted(edits) == sorted(model)
    assert dict(edits.items()) == model
    assert sorted(map(repr, edits.values())) == sorted(map(repr, model.values()))
    for key in pool:
        assert (key in edits) == (key in model)
        assert edits.get(key) == model.get(key)
        assert edits.checked_md5(key) == checked.get(key)
    for n_shards in (1, 4, 64):
        groups = list(edits.by_shard(n_shards))
        assert [n for n, _ in groups] == sorted({fmt.shard_of(k, n_shards) for k in model})
        for number, group in groups:
            assert all(fmt.shard_of(k, n_shards) == number for k, _ in group)
        assert sorted(repr(p) for _, group in groups for p in group) == sorted(map(repr, model.items()))


def test_a_spilling_map_behaves_as_a_dict(spill: int) -> None:
    """Random sets, overrides, deletes, checks and clears, against a plain dict."""
    rng = random.Random(12)
    pool = [b"key-%d" % i for i in range(6 * spill)]
    edits, model, checked = EditMap(), {}, {}
    for step in range(3000):
        key = rng.choice(pool)
        roll = rng.random()
        if roll < 0.55:
            edit = Edit(rng.choice([None, _md5(step)]), rng.choice([None, _md5(-step)]), rng.random() < 0.2)
            edits[key] = edit
            model[key] = edit
        elif roll < 0.75:
            assert edits.pop(key, None) == model.pop(key, None)
            checked.pop(key, None)
        elif roll < 0.95:  # half the time the md5 of the key's edit (the usual case)
            same = key in model and model[key].md5 is not None and rng.random() < 0.5
            md5_ = model[key].md5 if same else _md5(step)
            edits.mark_checked(key, md5_)
            if key in model:
                checked[key] = md5_
        elif roll < 0.96:
            edits.clear()
            model.clear()
            checked.clear()
        if step % 300 == 299:
            _check_same(edits, model, checked, pool)
    with pytest.raises(KeyError):
        del edits[b"never"]
    assert edits.keys_based_on(_md5(-1)) == [k for k, e in model.items() if e.base == _md5(-1)]


def test_checked_md5s_survive_a_spill_and_a_reload(spill: int, tmp_path: Path) -> None:
    """A value this process wrote stays trusted once its edit is spilled; a journal read
    again keeps it only where the key's edit still has that md5; a pushed edit forgets it."""
    path = tmp_path / "x.local_hash"
    log = ChangeLog(path)
    keys = [b"k%d" % i for i in range(5 * spill)]
    for i, key in enumerate(keys):
        log.hold_edit(key, _md5(i), None)
        log.edits.mark_checked(key, _md5(i))
    log.flush()
    reader = ChangeLog(path, writable=False)
    for i, key in enumerate(keys):
        reader.edits.mark_checked(key, _md5(i))
    log.record_edits([(keys[0], _md5(-1), None), (keys[-1], None, None)])
    log.flush()
    assert reader.reload()
    assert reader.edits.checked_md5(keys[0]) is None
    assert reader.edits.checked_md5(keys[-1]) is None
    assert all(reader.edits.checked_md5(k) == _md5(i) for i, k in enumerate(keys[1:-1], 1))
    assert all(log.edits.checked_md5(k) == _md5(i) for i, k in enumerate(keys))
    log.pushed(keys[:3], metadata=False)
    assert log.edits.checked_md5(keys[1]) is None and len(log.edits) == len(keys) - 3
    log.close()
    reader.close()


def test_a_replay_is_bounded_and_compaction_streams(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Opening a journal of 20,000 edits holds about SPILL_EDITS of them in Python memory
    (a dict of them all takes ~4.5 MiB); a compaction writes the same edits back, and
    ``pushed(None)`` forgets them all."""
    monkeypatch.setattr(local, "SPILL_EDITS", 1000)
    path = tmp_path / "x.local_hash"
    log = ChangeLog(path)
    expected = {b"key-%06d" % i: (_md5(i), None) for i in range(20_000)}
    log.record_edits((k, m, b) for k, (m, b) in expected.items())
    log.close()
    tracemalloc.start()
    try:
        log = ChangeLog(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 2**20  # a 1 MiB read buffer, SPILL_EDITS edits, a Bloom filter
    assert {k: (e.md5, e.base) for k, e in log.edits.items()} == expected
    log.compact()
    log.close()
    log = ChangeLog(path, expect_closed=True)
    assert {k: (e.md5, e.base) for k, e in log.edits.items()} == expected
    log.pushed(None, metadata=False)
    assert not log.edits
    log.close()
    assert not ChangeLog(path, expect_closed=True).edits


def test_a_replay_keeps_the_last_edit_of_each_key(spill: int, tmp_path: Path) -> None:
    """A journal whose keys are edited again, cleaned and edited anew across many spills
    reads back as the writer held it (the replay replaces spilled edits in bulk), and
    the map it gives behaves as a dict afterwards."""
    rng = random.Random(5)
    path = tmp_path / "x.local_hash"
    log = ChangeLog(path)
    pool = [b"key-%d" % i for i in range(8 * spill)]
    for step in range(1500):
        key = rng.choice(pool)
        if rng.random() < 0.8:
            log.record_edits([(key, rng.choice([None, _md5(step)]), rng.choice([None, _md5(-step)]))])
        else:
            log.mark_clean([key])
    model = dict(log.edits.items())
    log.flush()  # not closed: a close may compact the journal to one record a key
    replayed = ChangeLog(path, writable=False)
    _check_same(replayed.edits, model, {}, pool + [b"never"])
    for key in pool[::3]:
        replayed.edits[key] = model[key] = Edit(_md5(1), None, False)
    _check_same(replayed.edits, model, {}, pool)
    replayed.close()
    log.close()


def test_more_edits_than_memory_holds_are_pushed_whole(
    conn: Any, make_conn: Any, tmp_path: Path, small_shards: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database of more keys than SPILL_EDITS, written, closed, reopened (the replay
    spills), edited again, pushed, and read back whole by a fresh copy."""
    monkeypatch.setattr(local, "SPILL_EDITS", 300)
    expected = {f"k{i:05d}": f"v{i}" for i in range(3000)}
    path = tmp_path / "w.blt"
    with ebooklet.open(conn, path, "n", value_serializer="str") as db:
        for key, value in expected.items():
            db[key] = value
    with ebooklet.open(conn, path, "w", value_serializer="str") as db:
        assert db["k00007"] == "v7" and len(db) == 3000
        for i in range(0, 3000, 7):
            expected[f"k{i:05d}"] = db[f"k{i:05d}"] = f"w{i}"
        del db["k00001"], expected["k00001"]
        db.changes().push()
        assert not list(db.changes().iter_changes())
    with ebooklet.open(make_conn(), tmp_path / "r.blt", "r", value_serializer="str") as db:
        assert dict(db.items()) == expected


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts the open files in /proc")
def test_closing_a_database_releases_the_temporary_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() lets the spilled edits' temporary database go (its file, which can be
    hundreds of MB) even while the closed object is still referenced, as ``db`` stays
    bound after a ``with`` block in a notebook; the edits stay pending in the journal."""
    monkeypatch.setattr(local, "SPILL_EDITS", 100)
    monkeypatch.setattr(local, "SPILL_CACHE_KIB", 64)  # past it, SQLite writes its file
    before = len(os.listdir("/proc/self/fd"))
    with ebooklet.open(None, tmp_path / "w.blt", "n", value_serializer="str") as db:
        db.update({f"k{i}": "v" for i in range(5000)})
        assert len(os.listdir("/proc/self/fd")) > before
    assert len(os.listdir("/proc/self/fd")) == before
    with ebooklet.open(None, tmp_path / "w.blt", "w", value_serializer="str") as again:
        assert again.info().pending_edits == 5000
    del db
