"""Costs that must grow with the change, not the database (issue 12, the 10M run): the
base md5 of a new edit is looked up by searching the key's page in the local mirror's
copy of its shard, not by parsing the whole shard, however many shards there are beyond
what ``remote.SHARD_CACHE`` keeps parsed.

Parses are counted by wrapping ``format.decode_shard`` and ``format.decode_page`` (no
request or response is touched); databases are pushed to the real server.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ebooklet
from ebooklet import format as fmt
from ebooklet import local as local_mod
from ebooklet import remote as remote_mod

N_KEYS = 6000


class Parses:
    """How many times whole shards and single pages were parsed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.shards = self.pages = 0
        monkeypatch.setattr(fmt, "decode_shard", self._counted(fmt.decode_shard, "shards"))
        monkeypatch.setattr(fmt, "decode_page", self._counted(fmt.decode_page, "pages"))

    def _counted(self, parse: Callable[..., Any], name: str) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            setattr(self, name, getattr(self, name) + 1)
            return parse(*args, **kwargs)

        return counted


@pytest.fixture
def pushed(conn: Any, tmp_path: Path, small_shards: int, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A writer's copy of N_KEYS pushed keys over 8 shards of ``small_shards`` in pages of
    16 records, as large shards have many pages (their bytes in its mirror)."""
    monkeypatch.setattr(fmt, "PAGE_RECORDS", 16)
    path = tmp_path / "w.blt"
    with ebooklet.open(conn, path, "n", value_serializer="str") as db:
        db.update({f"k{i:05d}": f"v{i}" for i in range(N_KEYS)})
        db.changes().push()
    return path


def _changes(db: Any) -> dict[str, str]:
    return {c.key: c.kind for c in db.changes().iter_changes()}


def test_single_writes_search_pages_not_shards(
    pushed: Path, conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one shard kept parsed, writes of keys spread over every shard parse none of
    them (each base is a page search; once a shard's directory is known, only the key's
    page is read from the mirror), and each edit has the head's md5 as its base: the push
    sees modifications and additions, no conflict."""
    monkeypatch.setattr(remote_mod, "SHARD_CACHE", 1)
    keys = random.Random(7).sample(range(N_KEYS), 200)
    whole_reads = []
    get_shard = local_mod.IndexMirror.get_shard
    with ebooklet.open(conn, pushed, "w", value_serializer="str") as db:
        parses = Parses(monkeypatch)
        monkeypatch.setattr(
            local_mod.IndexMirror, "get_shard", lambda m, n: whole_reads.append(n) or get_shard(m, n)
        )
        for i in keys:
            db[f"k{i:05d}"] = "new"
        db["absent"] = "added"
        db["k"] = "before the first key"
        assert (parses.shards, parses.pages) == (0, 0)
        assert len(whole_reads) <= 8  # each shard's bytes read once (its directory), then pages
        kinds = _changes(db)
        assert kinds == {**{f"k{i:05d}": "modified" for i in keys}, "absent": "added", "k": "added"}
        assert parses.shards <= 3 * 8  # iter_changes: each shard a few times, not once a key (12,012)
        parses.shards = 0
        db.changes().push()
        assert parses.shards == 8  # each shard once, to rewrite it; its plan searched it
        assert db[f"k{keys[0]:05d}"] == "new"


def test_update_looks_bases_up_shard_by_shard(
    pushed: Path, conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """update() reads each shard's bytes from the mirror once per batch and parses none."""
    monkeypatch.setattr(remote_mod, "SHARD_CACHE", 1)
    keys = random.Random(8).sample(range(N_KEYS), 1000)
    with ebooklet.open(conn, pushed, "w", value_serializer="str") as db:
        parses = Parses(monkeypatch)
        db.update({f"k{i:05d}": "new" for i in keys} | {"zz": "added"})
        assert (parses.shards, parses.pages) == (0, 0)
        assert _changes(db) == {**{f"k{i:05d}": "modified" for i in keys}, "zz": "added"}


def test_dense_lookups_parse_the_shard_once(
    pushed: Path, conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a shard's pages were searched SEARCHES_BEFORE_PARSE times their number, the
    next lookup parses it whole and the following ones are answered from memory."""
    monkeypatch.setattr(remote_mod, "SEARCHES_BEFORE_PARSE", 5)
    with ebooklet.open(conn, pushed, "w", value_serializer="str") as db:
        parses = Parses(monkeypatch)
        for i in range(N_KEYS):
            db[f"k{i:05d}"] = "dense"
        assert parses.shards == 8  # N_KEYS keys of small_shards: each shard parsed once


def test_search_page_finds_what_decode_page_finds() -> None:
    """format.search_page agrees with decode_page for every key of every page and for keys
    between, before and after them."""
    rng = random.Random(3)
    entries = {
        f"key{i * 2:06d}".encode(): fmt.Entry(fmt.md5(b"%d" % i), i, fmt.new_id(), i * 10, i)
        for i in range(1000)
    }
    data = fmt.encode_shard(entries)
    directory = fmt.decode_shard_directory(data)
    whole = fmt.decode_shard(data)
    probes = list(entries) + [f"key{i * 2 + 1:06d}".encode() for i in range(1000)]
    probes += [b"", b"a", b"key", b"key999999", b"\xff"]
    rng.shuffle(probes)
    view = memoryview(data)
    for key in probes:
        page = directory.page_of(key)
        if page is None:
            assert key not in whole
            continue
        ref = directory.pages[page]
        found = fmt.search_page(view[ref.offset : ref.offset + ref.length], directory, page, [key])
        assert found == {key: whole.get(key)}


def test_an_update_of_most_keys_parses_each_shard_once(
    pushed: Path, conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch holding a third of a shard's keys or more parses it (a search a key would
    cost more than parsing every record once)."""
    with ebooklet.open(conn, pushed, "w", value_serializer="str") as db:
        parses = Parses(monkeypatch)
        db.update({f"k{i:05d}": "all" for i in range(N_KEYS)})
        assert parses.shards == 8
        assert db["k00001"] == "all"


def test_search_page_refuses_a_damaged_page() -> None:
    """A mirrored page whose bytes no longer match its directory's md5 (a damaged local
    file) is an IntegrityError, never a wrong entry or a miss."""
    entries = {f"key{i:04d}".encode(): fmt.Entry(fmt.md5(b"%d" % i), i, fmt.new_id(), i, 1) for i in range(50)}
    data = bytearray(fmt.encode_shard(entries))
    directory = fmt.decode_shard_directory(bytes(data))
    ref = directory.pages[0]
    page = bytearray(data[ref.offset : ref.offset + ref.length])
    page[len(page) // 2] ^= 0xFF
    with pytest.raises(ebooklet.IntegrityError, match="page 0 is truncated or corrupted"):
        fmt.search_page(bytes(page), directory, 0, [b"key0000"])
    with pytest.raises(ebooklet.IntegrityError, match="page 0 is truncated or corrupted"):
        fmt.search_page(bytes(page[:-1]), directory, 0, [b"key0000"])


def test_a_damaged_mirrored_shard_under_a_write_is_fetched_again(
    pushed: Path, conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of a shard damaged in the writer's mirror: the base of a new edit is not
    taken from it (the page's md5 fails); the shard is fetched again with a warning, and
    the edit is a modification of the head's value, as it is."""
    import booklet

    monkeypatch.setattr(remote_mod, "SHARD_CACHE", 1)
    mirror = str(pushed) + ".remote_index"
    with booklet.open(mirror, "w", key_serializer="str", value_serializer=None) as b:
        names = [k for k in b if "#" not in k and "-" in k]
        for name in names:
            raw = bytearray(b[name])
            raw[len(raw) // 3] ^= 0xFF
            b[name] = bytes(raw)
    assert names
    with (
        ebooklet.open(conn, pushed, "w", value_serializer="str") as db,
        pytest.warns(RuntimeWarning, match="is damaged"),
    ):
        db["k00001"] = "new"
        assert _changes(db) == {"k00001": "modified"}


def test_a_push_of_a_few_keys_a_shard_holds_a_batch_of_shards(
    pushed: Path, conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push of one key in each of 8 shards of 750 keys, in batches of 1,500 keys: the
    keys the shards hold count, not only those set, so the push goes in batches of two
    shards and keeps none of the new shards parsed in memory (each is in the mirror): a
    push of 1 % of a large database held every shard it rewrote."""
    import ebooklet.changes

    monkeypatch.setattr(ebooklet.changes, "PUSH_BATCH_KEYS", 1500)
    with ebooklet.open(conn, pushed, "w", value_serializer="str") as db:
        remote = db._replica.remote
        n_shards = remote.manifest["n_shards"]
        one_a_shard: dict[int, str] = {}
        for i in range(N_KEYS):
            kb = db._replica.codec.encode_key(f"k{i:05d}")
            one_a_shard.setdefault(fmt.shard_of(kb, n_shards), f"k{i:05d}")
        for key in one_a_shard.values():
            db[key] = "new"
        assert db.changes().push().keys_pushed == n_shards == 8
        parses = Parses(monkeypatch)
        for _, name in fmt.iter_shard_names(remote.manifest):
            remote.shard(name)
        assert parses.shards == n_shards
    with ebooklet.open(conn, pushed.with_name("r.blt"), value_serializer="str") as db:
        assert len(db) == N_KEYS
        assert all(db[key] == "new" for key in one_a_shard.values())
