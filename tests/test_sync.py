"""Syncing a local copy with its remote: behaviours 1-5 of issue 2 and the mapping API.

1. round trip by connection and by public URL, with ``len``/iteration/``in`` answered
   from the index alone;
2. lazy reads and coalesced range GETs;
3. pushes that send only what changed (md5 dedup, touched index shards, one manifest PUT);
4. remote priority (changes and deletions made elsewhere win over an untouched cache);
5. conflicts, how to resolve them, and what ``iter_changes`` reports;

plus recorded serializers, non-str keys, metadata, timestamps, ``setdefault``/``pop``/
``update``, ``clear``, flag ``'n'`` and commit messages.

Every read-side test takes the ``reader`` fixture, so it runs once through an
``S3Connection`` and once through the database's public URL.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import booklet
import pytest

import ebooklet
from ebooklet import ConflictError
from ebooklet import format as fmt

# --------------------------------------------------------------------------- helpers


def open_db(remote: Any, path: Path, flag: str = "r", **kw: Any) -> ebooklet.EBooklet:
    return ebooklet.open(remote, path, flag, **kw)


def push_new(conn: Any, path: Path, data: dict, **kw: Any) -> ebooklet.changes.PushResult:
    """Create (or replace) the remote database with exactly ``data``."""
    with open_db(conn, path, "n", **kw) as db:
        db.update(data)
        return db.changes().push()


def push_edits(
    conn: Any, path: Path, sets: dict | None = None, deletes: Iterable = (), **kw: Any
) -> ebooklet.changes.PushResult:
    """Open the local copy at ``path`` read-write, apply the edits, push and close."""
    with open_db(conn, path, "w", **kw) as db:
        db.update(sets or {})
        for key in deletes:
            del db[key]
        return db.changes().push()


def gets(db: ebooklet.EBooklet) -> int:
    """GET requests sent so far through this database's connection."""
    return db.remote.request_counts["GET"]


def local_keys(path: Path) -> set:
    """Keys held in the local data file (a plain booklet file), read after closing."""
    with booklet.open(str(path), "r") as f:
        return set(f.keys())


def remote_manifest(s3_server: Any, db_key: str) -> tuple[dict, bytes]:
    """The head manifest of the database, read with plain boto3: ``(dict, raw bytes)``."""
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=db_key)["Body"].read()
    return json.loads(body), body


def remote_objects(s3_server: Any, db_key: str, kind: str) -> set[str]:
    """Object keys under ``<db_key>.ebk/<kind>/`` (kind: pack, index, commit)."""
    paginator = s3_server.client().get_paginator("list_objects_v2")
    prefix = f"{db_key}.ebk/{kind}/"
    return {
        obj["Key"]
        for page in paginator.paginate(Bucket=s3_server.bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
    }


def shard_names(manifest: dict) -> list[str]:
    """Names of the non-empty index shards a manifest lists."""
    return [f"{commit}-{i}" for i, commit in enumerate(manifest["shards"]) if commit is not None]


def small_values(n: int, prefix: str = "k", tag: bytes = b"v") -> dict[str, bytes]:
    return {f"{prefix}{i:05d}": tag + b"-%d" % i for i in range(n)}


SAMPLE = {
    "int": 1,
    "list": [1, 2, 3],
    "nested": {"a": [1.5, None, True], "b": "text"},
    "bytes": b"\x00\x01\x02" * 100,
    "unicode key \u00e9\u4e2d": "unicode value \u2603",
    "big": "x" * 300_000,
    "empty": "",
}


# --------------------------------------------------------------------------- 1. round trip


def test_round_trip_reads_identical_values(conn: Any, reader: Any, tmp_path: Path) -> None:
    """Values written and pushed read back identically from a fresh local file."""
    push_new(conn, tmp_path / "w.blt", SAMPLE, value_serializer="pickle")
    with open_db(reader(conn), tmp_path / "r.blt", value_serializer="pickle") as db:
        assert not db.writable
        for key, value in SAMPLE.items():
            assert db[key] == value
        assert dict(db.items()) == SAMPLE
        assert db.get("missing", "dflt") == "dflt"
        with pytest.raises(KeyError):
            db["missing"]
    # a second fresh reader sees the same thing through items() alone
    with open_db(reader(conn), tmp_path / "r2.blt", value_serializer="pickle") as db:
        assert dict(db.items()) == SAMPLE


def test_len_iter_contains_need_no_value_download(
    conn: Any, reader: Any, s3_server: Any, db_key: str, tmp_path: Path, small_shards: int
) -> None:
    """len, iteration and ``in`` are answered from the manifest and index shards only."""
    data = small_values(5000)  # more than one index shard
    push_new(conn, tmp_path / "w.blt", data)
    manifest, _ = remote_manifest(s3_server, db_key)
    n_shards = len(shard_names(manifest))
    assert n_shards >= 2

    rpath = tmp_path / "r.blt"
    with open_db(reader(conn), rpath) as db:
        assert gets(db) == 1  # the manifest
        assert len(db) == len(data) == manifest["n_keys"]
        assert gets(db) == 1
        assert "k00007" in db
        assert "nope" not in db
        assert sorted(db) == sorted(data)
        assert set(db.keys()) == set(data)
        # one GET per index shard, none for values
        assert gets(db) == 1 + n_shards
        assert db["k00007"] == data["k00007"]
        assert gets(db) == 2 + n_shards  # now one range GET
    assert local_keys(rpath) == {"k00007"}


# --------------------------------------------------------------------------- 2. lazy reads


def test_lazy_read_fetches_only_the_key_asked(conn: Any, reader: Any, tmp_path: Path) -> None:
    """Reading a key downloads that value alone, once; later reads come from the cache."""
    data = small_values(200)
    push_new(conn, tmp_path / "w.blt", data)
    rpath = tmp_path / "r.blt"
    with open_db(reader(conn), rpath) as db:
        before = gets(db)
        assert db["k00001"] == data["k00001"]
        assert gets(db) == before + 2  # the key's index shard, then one range GET
        assert db["k00001"] == data["k00001"]
        assert db.get("k00001") == data["k00001"]
        assert gets(db) == before + 2  # cached
        assert db["k00002"] == data["k00002"]
        assert gets(db) == before + 3  # shard cached: one range GET
        # only k00003 was still missing
        assert db.load_items(["k00001", "k00002", "k00003"]) == 1
        assert db.load_items(["k00003"]) == 0
    assert local_keys(rpath) == {"k00001", "k00002", "k00003"}


def _load(db: ebooklet.EBooklet, keys: list | None) -> dict:
    db.load_items(keys)
    return {k: db[k] for k in (keys if keys is not None else list(db))}


def _get_items(db: ebooklet.EBooklet, keys: list | None) -> dict:
    return dict(db.get_items(keys if keys is not None else list(db)))


def _items(db: ebooklet.EBooklet, keys: list | None) -> dict:
    return dict(db.items(keys))


def _values(db: ebooklet.EBooklet, keys: list | None) -> dict:
    keys_ = keys if keys is not None else list(db)
    return dict(zip(keys_, db.values(keys_), strict=True))


BULK_READS: dict[str, Callable[[ebooklet.EBooklet, list | None], dict]] = {
    "load_items": _load,
    "get_items": _get_items,
    "items": _items,
    "values": _values,
}


@pytest.mark.parametrize("subset", ["all", "every_third"])
@pytest.mark.parametrize("bulk", list(BULK_READS))
def test_bulk_reads_coalesce_ranges_per_pack(
    conn: Any,
    reader: Any,
    s3_server: Any,
    db_key: str,
    tmp_path: Path,
    bulk: str,
    subset: str,
) -> None:
    """Reading many keys costs about one GET per pack, not one per key."""
    wpath = tmp_path / "w.blt"
    data: dict[str, bytes] = {}
    for batch in range(3):  # three pushes: three packs
        part = small_values(200, prefix=f"b{batch}-", tag=b"batch%d" % batch)
        data.update(part)
        if batch == 0:
            push_new(conn, wpath, part)
        else:
            push_edits(conn, wpath, part)
    packs = remote_objects(s3_server, db_key, "pack")
    assert len(packs) == 3
    manifest, _ = remote_manifest(s3_server, db_key)
    n_shards = len(shard_names(manifest))

    keys = None if subset == "all" else sorted(data)[::3]
    expected = data if keys is None else {k: data[k] for k in keys}
    with open_db(reader(conn), tmp_path / "r.blt") as db:
        before = gets(db)
        assert BULK_READS[bulk](db, keys) == expected
        value_gets = gets(db) - before - n_shards
        assert 1 <= value_gets <= len(packs), value_gets
        # everything is cached now: reading again sends nothing
        before = gets(db)
        assert BULK_READS[bulk](db, keys) == expected
        assert gets(db) == before


def test_bulk_read_api_semantics(conn: Any, reader: Any, tmp_path: Path) -> None:
    """get_items/items/values/keys with ``keys=`` skip or default missing keys, keep order."""
    data = small_values(50)
    push_new(conn, tmp_path / "w.blt", data)
    asked = ["k00010", "missing", "k00003"]
    with open_db(reader(conn), tmp_path / "r.blt") as db:
        assert list(db.get_items(asked, default=b"?")) == [
            ("k00010", data["k00010"]),
            ("missing", b"?"),
            ("k00003", data["k00003"]),
        ]
        assert list(db.keys(asked)) == ["k00010", "k00003"]
        assert list(db.items(asked)) == [("k00010", data["k00010"]), ("k00003", data["k00003"])]
        assert list(db.values(asked)) == [data["k00010"], data["k00003"]]
        assert sorted(db.values()) == sorted(data.values())


def test_items_mixes_cached_stale_edited_and_remote_values(
    conn: Any, make_conn: Any, tmp_path: Path
) -> None:
    """items() of a copy holding up-to-date, stale and missing values plus local edits
    yields every key once with its current value, even when the loop writes."""
    data = small_values(300)
    push_new(conn, tmp_path / "w.blt", data)
    rpath = tmp_path / "r.blt"
    with open_db(make_conn(), rpath, "w") as db:
        db.load_items(list(data)[:200])  # cached
    newer = {k: b"newer" for k in list(data)[100:150]}  # cached copies become stale
    push_edits(conn, tmp_path / "w.blt", newer, deletes=["k00000"])
    expected = {**data, **newer, "local": b"edit", "k00001": b"edited"}
    del expected["k00000"]
    with open_db(make_conn(), rpath, "w") as db:
        db["local"], db["k00001"] = b"edit", b"edited"
        assert dict(db.items()) == expected
        seen = []
        for key, value in db.items():  # writing while iterating, as with a dict's values
            seen.append(key)
            assert value == expected[key]
            db[key] = value + b"!"
        assert sorted(seen) == sorted(expected)
        assert dict(db.items()) == {k: v + b"!" for k, v in expected.items()}


def test_a_write_in_the_items_loop_wins_over_the_download_of_a_later_key(
    conn: Any, make_conn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key written or deleted in the loop before items() reaches it keeps the loop's
    edit: its remote value, downloaded afterwards, neither replaces the edit in the local
    file nor is yielded."""
    monkeypatch.setattr(ebooklet.reads, "_CHUNK_BYTES", 1)  # one download per value
    data = small_values(20)
    push_new(conn, tmp_path / "w.blt", data)
    with open_db(make_conn(), tmp_path / "r.blt", "w") as db:
        seen = {}
        for key, value in db.items():
            if not seen:  # the first key: the two below come last, in pack order
                db["k00019"] = b"mine"
                del db["k00018"]
            seen[key] = value
        assert seen == {**{k: v for k, v in data.items() if k != "k00018"}, "k00019": b"mine"}
        assert db["k00019"] == b"mine"
        assert "k00018" not in db
        assert dict(db.items()) == seen
        db.changes().push()
    with open_db(make_conn(), tmp_path / "fresh.blt") as db:
        assert dict(db.items()) == seen


# --------------------------------------------------------------------------- 3. push cost


def test_push_sends_only_changed_values(conn: Any, tmp_path: Path) -> None:
    """A push uploads the bytes of new and modified values only, and counts deletions."""
    data = small_values(100)
    first = push_new(conn, tmp_path / "w.blt", data)
    assert first.keys_pushed == 100
    assert first.bytes_uploaded == sum(len(v) for v in data.values())

    changes = {"k00001": b"changed one", "k00002": b"changed two!", "new": b"brand new"}
    result = push_edits(conn, tmp_path / "w.blt", changes, deletes=["k00050"])
    assert result.committed
    assert result.keys_pushed == 3
    assert result.keys_deleted == 1
    assert result.bytes_uploaded == sum(len(v) for v in changes.values())
    assert result.seq == first.seq + 1


def test_a_push_reuses_the_packs_an_interrupted_push_uploaded(
    conn: Any, make_conn: Any, tmp_path: Path
) -> None:
    """A push journals each pack it uploads (one record: the pack's footer); after it
    dies before committing, the next push, in a new process reading the journal back,
    uploads none of those values again."""
    path = tmp_path / "w.blt"
    push_new(conn, path, {"first": b"1"})
    data = small_values(300)
    with open_db(conn, path, "w") as db:
        db.update(data)
        # what a push killed between its pack uploads and its commit leaves behind
        replica = db._replica
        stored = list(replica.stored_values([replica.codec.encode_key(k) for k in data]))
        for half in (stored[:150], stored[150:]):
            done = replica.remote.upload_pack([(kb, raw, fmt.md5(raw), ts) for kb, ts, raw in half])
            replica.log.record_pack(done.pack, done.footer)
    with open_db(conn, path, "w") as db:
        assert len(db._replica.log.uploads) == 300
        result = db.changes().push()
        assert result.keys_pushed == 300
        assert result.bytes_uploaded == 0
        assert db._replica.log.uploads == {}
    with open_db(make_conn(), tmp_path / "r.blt") as db:
        assert dict(db.items()) == {"first": b"1", **data}


def test_push_dedups_identical_values(conn: Any, make_conn: Any, tmp_path: Path) -> None:
    """Equal values (same md5) are uploaded once, within a push and across pushes."""
    blob = b"the same bytes " * 1000
    other = b"something else"
    result = push_new(conn, tmp_path / "w.blt", {"a": blob, "b": blob, "c": other})
    assert result.keys_pushed == 3
    assert result.bytes_uploaded == len(blob) + len(other)

    again = push_edits(conn, tmp_path / "w.blt", {"d": blob, "e": other})
    assert again.committed
    assert again.keys_pushed == 2
    assert again.bytes_uploaded == 0

    with open_db(make_conn(), tmp_path / "r.blt") as db:
        assert dict(db.items()) == {"a": blob, "b": blob, "c": other, "d": blob, "e": other}


def test_push_dedups_against_the_shard_it_rewrites_not_the_whole_index(
    conn: Any, tmp_path: Path, small_shards: int
) -> None:
    """A push reads only the shards it rewrites: a value already in the remote is not
    uploaded again when its key goes to the same shard, and is when only another shard
    holds it (a push never scans the whole index)."""
    path = tmp_path / "w.blt"
    data = small_values(3000)
    push_new(conn, path, data)
    with open_db(conn, path, "w") as db:
        n_shards = db._replica.remote.manifest["n_shards"]
        assert n_shards >= 2
        shard = {k: fmt.shard_of(db._replica.codec.encode_key(k), n_shards) for k in data}
    same = next(k for k in data if k != "k00000" and shard[k] == shard["k00000"])
    other = next(k for k in data if shard[k] != shard["k00000"])
    again = push_edits(conn, path, {same: data["k00000"]})
    assert again.committed
    assert again.bytes_uploaded == 0
    elsewhere = push_edits(conn, path, {other: data["k00000"]})
    assert elsewhere.bytes_uploaded == len(data["k00000"])
    with open_db(conn, tmp_path / "r.blt") as db:
        assert dict(db.items()) == {**data, same: data["k00000"], other: data["k00000"]}


def test_a_push_streams_batches_of_shards(
    conn: Any, make_conn: Any, tmp_path: Path, small_shards: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With batches smaller than the push (``changes.PUSH_BATCH_KEYS``), a push uploads
    batch after batch, and a shard count that grows splits the shards: every value,
    count and duplicate comes out as with one batch."""
    monkeypatch.setattr(ebooklet.changes, "PUSH_BATCH_KEYS", 700)
    path = tmp_path / "w.blt"
    data = small_values(2500)
    data.update({f"dup{i}": b"the same value" for i in range(40)})
    first = push_new(conn, path, data)
    assert first.keys_pushed == len(data)
    assert first.bytes_uploaded < sum(len(v) for v in data.values())
    more = small_values(3000, prefix="m")
    result = push_edits(conn, path, more, deletes=["k00001", "k00002"])
    assert result.keys_pushed == 3000 and result.keys_deleted == 2
    with open_db(make_conn(), tmp_path / "r.blt") as db:
        expected = {**data, **more}
        del expected["k00001"], expected["k00002"]
        assert len(db) == len(expected)
        assert dict(db.items()) == expected


def remote_index(s3_server: Any, db_key: str) -> tuple[dict, dict[int, dict[bytes, tuple]]]:
    """The head manifest and each index shard's keys -> (md5, timestamp, length), read
    with plain boto3 (pack ids and offsets left out: they differ between two pushes)."""
    manifest, _ = remote_manifest(s3_server, db_key)
    client = s3_server.client()
    shards = {}
    for i, name in fmt.iter_shard_names(manifest):
        body = client.get_object(Bucket=s3_server.bucket, Key=db_key + name)["Body"].read()
        shards[i] = {k: (e.md5, e.timestamp, e.length) for k, e in fmt.decode_shard(body).items()}
    return manifest, shards


@pytest.mark.parametrize("interrupted", [False, True])
def test_a_push_of_many_batches_reads_its_values_by_one_scan(
    s3_server: Any, make_conn: Any, db_key: str, tmp_path: Path, small_shards: int,
    monkeypatch: pytest.MonkeyPatch, interrupted: bool,
) -> None:
    """A push of several batches that sets most of the data file reads its values by one
    scan, set aside by batch in a temporary file (``changes._ValueSpill``; a scan cut
    short by a write leaves the rest to lookups): the remote it makes holds the same
    shards, keys, md5s, timestamps and sizes as a push of one batch from the same file,
    every value reads back, and equal values of a shard go up once."""
    import shutil

    from ebooklet._booklet_io import ScanInterrupted
    from ebooklet.replica import Replica

    data = small_values(3000)
    data.update({f"dup{i}": b"the same value" for i in range(40)})
    with open_db(None, tmp_path / "local.blt", "n") as db:
        db.update(data)
    for name in ("one", "many"):
        for f in tmp_path.glob("local.blt*"):
            shutil.copy(f, tmp_path / (name + f.name[len("local") :]))
    spills = []
    monkeypatch.setattr(ebooklet.changes, "PUSH_BATCH_KEYS", 10**9)
    with open_db(make_conn(db_key + "-one"), tmp_path / "one.blt", "w") as db:
        one = db.changes().push()
    monkeypatch.setattr(ebooklet.changes, "PUSH_BATCH_KEYS", 700)
    monkeypatch.setattr(ebooklet.remote, "PACK_SIZE", 8 << 10)
    spill = ebooklet.changes._ValueSpill
    monkeypatch.setattr(ebooklet.changes, "_ValueSpill", lambda *a: spills.append(spill(*a)) or spills[-1])
    if interrupted:
        scan = Replica.scan

        def cut_short(self: Replica, include_value: bool = True) -> Any:
            for i, record in enumerate(scan(self, include_value)):
                if i == 1000:
                    raise ScanInterrupted("written to during a scan")
                yield record

        monkeypatch.setattr(Replica, "scan", cut_short)
    with open_db(make_conn(db_key + "-many"), tmp_path / "many.blt", "w") as db:
        many = db.changes().push()
    assert len(spills) == 1
    assert (many.keys_pushed, many.bytes_uploaded) == (one.keys_pushed, one.bytes_uploaded)
    assert many.bytes_uploaded < sum(map(len, data.values()))  # duplicates went up once a shard
    head_one, shards_one = remote_index(s3_server, db_key + "-one")
    head_many, shards_many = remote_index(s3_server, db_key + "-many")
    assert shards_many == shards_one
    assert (head_many["n_keys"], head_many["n_bytes"]) == (head_one["n_keys"], head_one["n_bytes"])
    assert head_many["n_shards"] >= 4
    with open_db(make_conn(db_key + "-many"), tmp_path / "r.blt") as db:
        assert dict(db.items()) == data


def test_push_rewrites_only_touched_shards_with_one_manifest_put(
    conn: Any, s3_server: Any, db_key: str, tmp_path: Path, small_shards: int
) -> None:
    """Changing one key uploads one pack, one index shard, one commit record, one manifest."""
    wpath = tmp_path / "w.blt"
    push_new(conn, wpath, small_values(9000))
    old, _ = remote_manifest(s3_server, db_key)
    assert old["n_shards"] >= 4
    objects_before = {k: remote_objects(s3_server, db_key, k) for k in ("pack", "index", "commit")}

    result = push_edits(conn, wpath, {"k00042": b"new value"})
    new, _ = remote_manifest(s3_server, db_key)
    changed = [
        i for i, (a, b) in enumerate(zip(old["shards"], new["shards"], strict=True)) if a != b
    ]
    assert len(changed) == 1
    assert new["seq"] == old["seq"] + 1
    assert new["parent"] == {"seq": old["seq"], "commit_id": old["commit_id"]}
    assert new["n_keys"] == old["n_keys"] == 9000

    created = {
        k: remote_objects(s3_server, db_key, k) - before for k, before in objects_before.items()
    }
    assert {k: len(v) for k, v in created.items()} == {"pack": 1, "index": 1, "commit": 1}
    # every PUT is one of those new objects, plus exactly one manifest PUT
    assert result.requests["PUT"] == sum(len(v) for v in created.values()) + 1


def test_first_push_in_a_new_process_costs_five_requests_plus_packs(
    conn: Any, s3_server: Any, db_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that has never seen the bucket learns whether it honours conditional
    writes while taking the lock (one more PUT, answered 412), leaves no probe object,
    keeps the answer beside the local copy, and pushes in 1 GET + pack + shard +
    commit record + manifest."""
    from ebooklet import connection

    monkeypatch.setattr(connection, "_CONDITIONAL_WRITES", {})
    path = tmp_path / "w.blt"
    with open_db(conn, path, "n") as db:
        assert conn.request_counts["PUT"] == 2  # the lock, then the same lock again: 412
        db.update(small_values(100))
        result = db.changes().push()
        assert dict(result.requests) == {"GET": 1, "PUT": 4}
    honoured = json.loads(path.with_name(path.name + ".ebk.json").read_bytes())["conditional_writes"]
    assert honoured is True or (honoured is False and not s3_server.is_local)
    listing = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=db_key)
    assert not [o["Key"] for o in listing.get("Contents", []) if "probe" in o["Key"]]

    monkeypatch.setattr(connection, "_CONDITIONAL_WRITES", {})  # a new process
    again = conn.copy()
    with open_db(again, path, "w"):
        assert again.request_counts["PUT"] == 1  # the answer was kept: no probe


def test_push_without_changes_sends_no_put(
    conn: Any, s3_server: Any, db_key: str, tmp_path: Path
) -> None:
    """Nothing to push (or only values equal to the remote's): no PUT, no commit."""
    data = small_values(20)
    wpath = tmp_path / "w.blt"
    push_new(conn, wpath, data)
    _, raw_before = remote_manifest(s3_server, db_key)
    with open_db(conn, wpath, "w") as db:
        nothing = db.changes().push()
        assert not nothing.committed
        assert nothing.requests["PUT"] == 0
        db["k00003"] = data["k00003"]  # set to the value it already has remotely
        same = db.changes().push()
        assert not same.committed
        assert same.requests["PUT"] == 0
    assert remote_manifest(s3_server, db_key)[1] == raw_before


def test_settled_edit_leaves_no_phantom_remote_change(conn: Any, tmp_path: Path) -> None:
    """Setting a key to the value it already has remotely is a no-op once pushed."""
    data = small_values(5)
    wpath = tmp_path / "w.blt"
    push_new(conn, wpath, data)
    with open_db(conn, wpath, "w") as db:
        db["k00003"] = data["k00003"]
        db.changes().push()
        assert list(db.changes().iter_changes()) == []
        before = gets(db)
        assert db["k00003"] == data["k00003"]
        assert gets(db) == before  # still cached: nothing to download


def test_push_message_is_recorded(conn: Any, s3_server: Any, db_key: str, tmp_path: Path) -> None:
    with open_db(conn, tmp_path / "w.blt", "n") as db:
        db["a"] = b"1"
        result = db.changes().push(message="first import")
    manifest, _ = remote_manifest(s3_server, db_key)
    assert manifest["message"] == "first import"
    assert manifest["commit_id"] == result.commit_id
    assert manifest["seq"] == result.seq == 1
    commits = remote_objects(s3_server, db_key, "commit")
    assert len(commits) == 1
    record = s3_server.client().get_object(Bucket=s3_server.bucket, Key=commits.pop())
    assert json.loads(record["Body"].read())["message"] == "first import"


# --------------------------------------------------------------------------- 4. remote priority


def test_open_reader_sees_remote_changes_after_pull(conn: Any, reader: Any, tmp_path: Path) -> None:
    """A reader keeps its snapshot until pull(); then changed keys read new, deleted keys go."""
    wpath, rpath = tmp_path / "w.blt", tmp_path / "r.blt"
    data = small_values(30)
    push_new(conn, wpath, data)
    with open_db(reader(conn), rpath) as rdb:
        assert dict(rdb.items()) == data  # everything cached locally
        push_edits(conn, wpath, {"k00001": b"remote edit"}, deletes=["k00002"])
        assert rdb["k00001"] == data["k00001"]  # the reader's snapshot
        rdb.pull()
        assert rdb["k00001"] == b"remote edit"
        with pytest.raises(KeyError):
            rdb["k00002"]
        assert "k00002" not in rdb
        assert "k00002" not in set(rdb)
        assert len(rdb) == len(data) - 1
        assert rdb.get("k00002") is None
    assert "k00002" not in local_keys(rpath)


def test_reopened_copy_prefers_remote_for_untouched_keys(
    conn: Any, make_conn: Any, tmp_path: Path
) -> None:
    """A second copy's remote edits win over a stale cache; the copy's own edits stay."""
    apath, bpath = tmp_path / "a.blt", tmp_path / "b.blt"
    data = small_values(30)
    push_new(conn, apath, data)
    with open_db(make_conn(), bpath, "w") as b:
        assert b.load_items() == 30  # cache every value in copy B
        b["mine"] = b"local only"
    push_edits(conn, apath, {"k00001": b"remote edit"}, deletes=["k00002"])

    with open_db(make_conn(), bpath, "w") as b:
        assert b["k00001"] == b"remote edit"
        assert "k00002" not in b
        with pytest.raises(KeyError):
            b["k00002"]
        assert "k00002" not in list(b)
        assert b["mine"] == b"local only"
        assert len(b) == len(data) - 1 + 1
        result = b.changes().push()
        assert result.keys_pushed == 1
    with open_db(conn, apath, "r") as a:
        assert a["mine"] == b"local only"
        assert len(a) == len(data)


# --------------------------------------------------------------------------- 5. conflicts


DELETE = object()
"""An edit that deletes the key."""

BASE = {"k1": b"base 1", "k2": b"base 2", "k3": b"base 3"}


def _edit(db: ebooklet.EBooklet, key: str, value: Any) -> None:
    if value is DELETE:
        del db[key]
    else:
        db[key] = value


def _conflict_setup(
    conn: Any,
    make_conn: Any,
    tmp_path: Path,
    key: str = "k1",
    b_value: Any = b"B's edit",
    a_value: Any = b"A's edit",
) -> tuple[Path, Any]:
    """Copy B edits ``key`` (conflicting) and k2 (not); copy A edits ``key`` and pushes first.

    The remote starts as :data:`BASE`. Returns B's local path and connection.
    """
    apath, bpath = tmp_path / "a.blt", tmp_path / "b.blt"
    push_new(conn, apath, BASE)
    bconn = make_conn()
    with open_db(bconn, bpath, "w") as b:
        _edit(b, key, b_value)
        b["k2"] = b"B's k2"
    with open_db(conn, apath, "w") as a:
        _edit(a, key, a_value)
        assert a.changes().push().committed
    return bpath, bconn


CONFLICTS = {
    "both_modify": ("k1", b"B's edit", b"A's edit"),
    "local_delete_remote_modify": ("k1", DELETE, b"A's edit"),
    "local_modify_remote_delete": ("k1", b"B's edit", DELETE),
    "both_add": ("k9", b"B's edit", b"A's edit"),
}


@pytest.mark.parametrize("scenario", list(CONFLICTS))
def test_conflict_raises_and_commits_nothing(
    conn: Any, make_conn: Any, s3_server: Any, db_key: str, tmp_path: Path, scenario: str
) -> None:
    key, b_value, a_value = CONFLICTS[scenario]
    bpath, bconn = _conflict_setup(conn, make_conn, tmp_path, key, b_value, a_value)
    _, raw_before = remote_manifest(s3_server, db_key)
    commits_before = remote_objects(s3_server, db_key, "commit")
    with open_db(bconn, bpath, "w") as b:
        with pytest.raises(ConflictError) as info:
            b.changes().push()
        assert info.value.keys == [key]
        assert repr(key) in str(info.value)
        assert remote_manifest(s3_server, db_key)[1] == raw_before
        assert remote_objects(s3_server, db_key, "commit") == commits_before
        # the local edits are still there and still pending
        assert b.get(key, DELETE) == b_value
        assert b["k2"] == b"B's k2"
        kinds = {c.key: c.kind for c in b.changes().iter_changes()}
        assert kinds == {key: "conflict", "k2": "modified"}
        # pushing only the other key works and leaves the conflict pending
        assert b.changes().push(["k2"]).keys_pushed == 1
        with pytest.raises(ConflictError):
            b.changes().push()
    with open_db(make_conn(), tmp_path / "r.blt") as r:
        assert r["k2"] == b"B's k2"
        assert r.get(key, DELETE) == a_value


def _keep_local(b: ebooklet.EBooklet) -> None:
    b.changes().push(force=True)


def _discard(b: ebooklet.EBooklet) -> None:
    assert b.changes().discard(["k1"]) == 1
    b.changes().push()


def _pull_force(b: ebooklet.EBooklet) -> None:
    b.pull(["k1"], force=True)
    b.changes().push()


@pytest.mark.parametrize(
    ("resolve", "k1"),
    [(_keep_local, b"B's edit"), (_discard, b"A's edit"), (_pull_force, b"A's edit")],
    ids=["push_force", "discard", "pull_force"],
)
def test_conflict_resolution(
    conn: Any,
    make_conn: Any,
    reader: Any,
    tmp_path: Path,
    resolve: Callable[[ebooklet.EBooklet], None],
    k1: bytes,
) -> None:
    """push(force=True) keeps the local value; discard/pull(force=True) keep the remote."""
    bpath, bconn = _conflict_setup(conn, make_conn, tmp_path)
    with open_db(bconn, bpath, "w") as b:
        resolve(b)
        assert b["k1"] == k1
        assert list(b.changes().iter_changes()) == []
    with open_db(reader(conn), tmp_path / "r.blt") as r:
        assert dict(r.items()) == {"k1": k1, "k2": b"B's k2", "k3": BASE["k3"]}


def test_iter_changes_reports_every_kind(conn: Any, make_conn: Any, tmp_path: Path) -> None:
    apath, bpath = tmp_path / "a.blt", tmp_path / "b.blt"
    data = {k: f"base {k}".encode() for k in "abcdefgh"}
    push_new(conn, apath, data)
    bconn = make_conn()
    with open_db(bconn, bpath, "w") as b:
        b.load_items()  # B caches every value
        b["a"] = b"B's a"  # also changed by A: conflict
        b["b"] = b"same on both"  # A makes the same change: not a conflict
        b["c"] = b"B's c"  # modified
        del b["d"]  # deleted
        b["new"] = b"B's new"  # added
    push_edits(conn, apath, {"a": b"A's a", "b": b"same on both", "e": b"A's e"}, deletes=["f"])
    md5 = lambda v: hashlib.md5(v).hexdigest()  # noqa: E731
    with open_db(bconn, bpath, "w") as b:
        changes = {c.key: c for c in b.changes().iter_changes()}
        assert {k: c.kind for k, c in changes.items()} == {
            "a": "conflict",
            "c": "modified",
            "d": "deleted",
            "new": "added",
            "e": "remote_changed",
            "f": "remote_deleted",
        }
        assert changes["a"][2:] == (md5(b"B's a"), md5(b"A's a"), md5(data["a"]))
        assert changes["c"][2:] == (md5(b"B's c"), md5(data["c"]), md5(data["c"]))
        assert changes["d"][2:] == (None, md5(data["d"]), md5(data["d"]))
        assert changes["new"][2:] == (md5(b"B's new"), None, None)
        assert changes["e"].remote_md5 == md5(b"A's e")
        assert changes["f"].remote_md5 is None
        # remote priority for the untouched keys, local edits for the others
        assert b["e"] == b"A's e"
        assert "f" not in b
        assert b["c"] == b"B's c"


# --------------------------------------------------------------------------- serializers and keys


@pytest.mark.parametrize(
    ("key_serializer", "value_serializer", "data"),
    [
        ("str", "pickle", {"a": {"x": (1, 2)}, "b": [None, 1.5]}),
        ("str", "orjson", {"a": {"x": [1, 2]}, "b": [None, 1.5]}),
        ("uint4", "json", {0: "zero", 7: [7], 2**32 - 1: {"max": True}}),
        ("pickle", "pickle", {("t", 1): b"tuple key", 3.5: {"f": 1}, None: "none"}),
        ("int8", None, {-5: b"neg", 10**12: b"big"}),
    ],
    ids=["str-pickle", "str-orjson", "uint4-json", "pickle-pickle", "int8-bytes"],
)
def test_serializers_are_recorded_and_keys_need_not_be_str(
    conn: Any,
    reader: Any,
    tmp_path: Path,
    key_serializer: str,
    value_serializer: str | None,
    data: dict,
) -> None:
    """A reader opening someone else's database gives no serializer and gets decoded data;
    a serializer that can run code (pickle) must be allowed by name."""
    wpath = tmp_path / "w.blt"
    push_new(conn, wpath, data, key_serializer=key_serializer, value_serializer=value_serializer)
    allowed = {key_serializer, value_serializer} - ebooklet.serializers.SAFE
    with open_db(reader(conn), tmp_path / "r.blt", trust_serializers=allowed) as db:
        assert len(db) == len(data)
        assert set(db) == set(data)
        for key, value in data.items():
            assert key in db
            assert db[key] == value
        assert dict(db.items()) == data
    # the writer reopens without serializers too, and deletes a non-str key
    victim = next(iter(data))
    push_edits(conn, wpath, deletes=[victim])
    with open_db(reader(conn), tmp_path / "r2.blt", trust_serializers=allowed) as db:
        assert victim not in db
        assert set(db) == set(data) - {victim}


# --------------------------------------------------------------------------- metadata, timestamps


def test_metadata_is_pushed_with_the_data(
    conn: Any, reader: Any, s3_server: Any, db_key: str, tmp_path: Path
) -> None:
    wpath = tmp_path / "w.blt"
    push_new(conn, wpath, {"a": b"1"})
    meta = {"title": "test db", "tags": ["x", "y"], "n": 3}
    with open_db(conn, wpath, "w") as db:
        db.set_metadata(meta)
        assert db.get_metadata() == meta
        with open_db(reader(conn), tmp_path / "before.blt") as r:
            assert r.get_metadata() is None  # not pushed yet
        result = db.changes().push()  # a metadata-only push still commits
        assert result.committed
        assert result.keys_pushed == 0
    assert remote_manifest(s3_server, db_key)[0]["metadata"] == meta
    with open_db(reader(conn), tmp_path / "after.blt") as r:
        assert r.get_metadata() == meta
        assert r["a"] == b"1"
    # later data pushes keep the metadata
    push_edits(conn, wpath, {"b": b"2"})
    with open_db(reader(conn), tmp_path / "later.blt") as r:
        assert r.get_metadata() == meta


def test_timestamps_round_trip(conn: Any, reader: Any, tmp_path: Path) -> None:
    """Explicit and implicit timestamps are pushed and read back without fetching values."""
    wpath = tmp_path / "w.blt"
    with open_db(conn, wpath, "n", value_serializer="pickle") as db:
        db.set("old", "o", timestamp=1_600_000_000_000_000)
        db.set("iso", "i", timestamp="2021-06-01T00:00:00+00:00")
        db["now"] = "n"
        expected = dict(db.timestamps())
        assert expected["old"] == 1_600_000_000_000_000
        assert expected["iso"] == 1_622_505_600_000_000
        db.changes().push()
    with open_db(reader(conn), tmp_path / "r.blt", value_serializer="pickle") as r:
        before = gets(r)
        assert dict(r.timestamps()) == expected
        assert r.get_timestamp("old") == expected["old"]
        assert r.get_timestamp("missing") is None
        assert gets(r) - before == 1  # the one index shard, no values
        assert r.get_timestamp("iso", include_value=True) == (expected["iso"], "i")
        assert sorted(r.timestamps(include_value=True)) == sorted(
            (k, expected[k], v) for k, v in {"old": "o", "iso": "i", "now": "n"}.items()
        )


def test_set_timestamp_is_pushed(conn: Any, reader: Any, tmp_path: Path) -> None:
    wpath = tmp_path / "w.blt"
    with open_db(conn, wpath, "n", value_serializer="pickle") as db:
        db.set("k", "v", timestamp=1_600_000_000_000_000)
        db.changes().push()
    with open_db(conn, wpath, "w") as db:
        db.set_timestamp("k", 1_700_000_000_000_000)
        assert [c.kind for c in db.changes().iter_changes()] == ["modified"]
        assert db.changes().push().committed
        assert db.get_timestamp("k") == 1_700_000_000_000_000
    with open_db(reader(conn), tmp_path / "r.blt", value_serializer="pickle") as r:
        assert r.get_timestamp("k") == 1_700_000_000_000_000
        assert r["k"] == "v"


# --------------------------------------------------------------------------- mapping methods


def test_setdefault_pop_update_on_remote_data(conn: Any, reader: Any, tmp_path: Path) -> None:
    wpath = tmp_path / "w.blt"
    push_new(conn, wpath, {"a": 1, "b": 2, "c": 3}, value_serializer="pickle")
    with open_db(conn, wpath, "w") as db:
        assert db.setdefault("a", 100) == 1  # existing remote key: unchanged
        assert db.setdefault("z", 26) == 26
        assert db.pop("b") == 2
        assert db.pop("b", "gone") == "gone"
        with pytest.raises(KeyError):
            db.pop("b")
        db.update({"c": 30, "d": 4}, e=5)
        db.update([("f", 6)])
        kinds = Counter(c.kind for c in db.changes().iter_changes())
        assert kinds == Counter({"added": 4, "deleted": 1, "modified": 1})
        result = db.changes().push()
        assert (result.keys_pushed, result.keys_deleted) == (5, 1)
    expected = {"a": 1, "c": 30, "d": 4, "e": 5, "f": 6, "z": 26}
    with open_db(reader(conn), tmp_path / "r.blt", value_serializer="pickle") as r:
        assert dict(r.items()) == expected
        assert len(r) == len(expected)


@pytest.mark.parametrize("reopen", [False, True], ids=["same_session", "reopened"])
def test_clear_then_push_empties_the_remote(
    conn: Any, reader: Any, s3_server: Any, db_key: str, tmp_path: Path, reopen: bool
) -> None:
    """clear() empties the local view at once and the remote at the next push."""
    wpath = tmp_path / "w.blt"
    push_new(conn, wpath, small_values(50))
    db = open_db(conn, wpath, "w")
    try:
        db.clear()
        if reopen:
            db.close()
            db = open_db(conn, wpath, "w")
        assert len(db) == 0
        assert list(db) == []
        assert "k00001" not in db
        with open_db(reader(conn), tmp_path / "before.blt") as r:
            assert len(r) == 50  # nothing changes remotely before the push
        result = db.changes().push()
        assert result.committed
    finally:
        db.close()
    manifest, _ = remote_manifest(s3_server, db_key)
    assert manifest["n_keys"] == 0
    with open_db(reader(conn), tmp_path / "after.blt") as r:
        assert len(r) == 0
        assert list(r) == []
        assert "k00001" not in r


@pytest.mark.parametrize("reopen", [False, True], ids=["same_session", "reopened"])
def test_flag_n_replaces_the_remote_only_at_push(
    conn: Any, reader: Any, tmp_path: Path, reopen: bool
) -> None:
    """'n' starts empty locally; readers see the old database until the next push.

    With ``reopened`` the new database is closed unpushed and reopened 'w' (without
    serializer arguments) before the push.
    """
    old = small_values(40, prefix="old")
    push_new(conn, tmp_path / "w.blt", old)
    old_reader = tmp_path / "old_reader.blt"
    with open_db(reader(conn), old_reader) as r:
        assert dict(r.items()) == old  # cached by a reader that will reopen later

    new = {1: {"fresh": True}, 2: [2]}
    npath = tmp_path / "new.blt"
    db = open_db(conn, npath, "n", key_serializer="uint4", value_serializer="pickle")
    try:
        assert len(db) == 0
        assert list(db) == []
        db.update(new)
        if reopen:
            db.close()
            db = open_db(conn, npath, "w")
            assert dict(db.items()) == new
            assert len(db) == len(new)
        with open_db(reader(conn), tmp_path / "mid.blt") as r:
            assert dict(r.items()) == old
        assert db.changes().push().committed
    finally:
        db.close()

    with open_db(reader(conn), tmp_path / "after.blt", value_serializer="pickle") as r:
        assert dict(r.items()) == new
    # the reader with a cache of the old database follows the replacement
    with open_db(reader(conn), old_reader, value_serializer="pickle") as r:
        assert dict(r.items()) == new
        assert 1 in r
    assert local_keys(old_reader) <= set(new)  # the old cache was dropped


def test_a_push_raises_the_collectors_threshold_while_it_runs(conn: Any, tmp_path: Path) -> None:
    """While a push runs, the cyclic collector's first threshold is at least
    ``changes.PUSH_GC_THRESHOLD`` (collecting every 700 allocations was a fifth of an
    initial push's CPU time); it is put back afterwards, also when the push fails, and a
    collector the application turned off (threshold 0) stays off."""
    import gc

    before = gc.get_threshold()
    seen: list[int] = []

    def progress(done: int, total: int | None) -> None:
        seen.append(gc.get_threshold()[0])

    def failing(done: int, total: int | None) -> None:
        seen.append(gc.get_threshold()[0])
        raise KeyboardInterrupt

    with open_db(conn, tmp_path / "w.blt", "n") as db:
        db.update(small_values(50))
        with pytest.raises(KeyboardInterrupt):
            db.changes().push(progress=failing)
        assert gc.get_threshold() == before
        db.changes().push(progress=progress)
        assert gc.get_threshold() == before
        assert len(seen) >= 2 and min(seen) >= ebooklet.changes.PUSH_GC_THRESHOLD
        seen.clear()
        db["more"] = b"x"
        gc.set_threshold(0)
        try:
            db.changes().push(progress=progress)
            assert gc.get_threshold()[0] == 0
        finally:
            gc.set_threshold(*before)
    assert seen and set(seen) == {0}


def test_the_value_spill_holds_its_buffer_in_all_not_a_buffer_a_batch(
    conn: Any, make_conn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The values a push of many batches sets aside wait in memory ``SPILL_BUFFER``
    bytes in all, shared by its batches (it was that much a batch: 76 MiB for the 305
    batches of a push of 10M keys), and the push is whole."""
    import tracemalloc

    data = {f"k{i:05d}": bytes([i % 251]) * 4000 + i.to_bytes(4, "little") for i in range(3000)}
    with open_db(None, tmp_path / "w.blt", "n") as db:
        db.update(data)
    monkeypatch.setattr(fmt, "KEYS_PER_SHARD", 64)  # 64 shards: a batch of 100 keys is 2
    monkeypatch.setattr(ebooklet.changes, "PUSH_BATCH_KEYS", 100)
    monkeypatch.setattr(ebooklet.changes, "SPILL_BUFFER", 256 << 10)
    monkeypatch.setattr(ebooklet.changes, "SPILL_BATCH_MIN", 1 << 10)
    spill, peaks = ebooklet.changes._ValueSpill, []

    def measured(*args: Any) -> Any:
        tracemalloc.start()
        try:
            return spill(*args)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(ebooklet.changes, "_ValueSpill", measured)
    with open_db(conn, tmp_path / "w.blt", "w") as db:
        assert db.changes().push().keys_pushed == len(data)
    assert len(peaks) == 1
    assert peaks[0] < 4 << 20  # the scan's reads, and 256 KiB; with 256 KiB a batch, 7.7 MiB
    with open_db(make_conn(), tmp_path / "r.blt") as db:
        assert dict(db.items()) == data
