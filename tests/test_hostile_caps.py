"""Caps on what a bucket can make a reader hold, local caches repaired, group entries checked
(issue 10: a reader trusts nothing a bucket says).

A small real database is pushed to moto_server, then made hostile by PUTting objects into
the bucket with boto3 (or by writing a group's entries through the plain database API, as
whoever can write the group could), and read back by public URL or connection:

- index shards: more records than :data:`format.MAX_SHARD_RECORDS`, or keys that share
  bytes (each record a copy of a large slice), are refused; the largest shard a reader
  accepts keeps a read under :data:`RSS_BOUND` (measured in a child process); a writer
  refuses to push a shard readers would refuse;
- a damaged shard in the local mirror ``P.remote_index`` is fetched again online, and
  offline gives :class:`CacheDamagedError`, which blames the cache, not the remote;
- remote connection group entries of the wrong shape give ``IntegrityError``, and an
  entry cannot make the caller's keys sign for a bucket the caller did not choose.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import booklet
import pytest

import ebooklet
from ebooklet import IntegrityError, UntrustedEndpointError
from ebooklet import format as fmt
from ebooklet.errors import CacheDamagedError, ShardLimitError
from test_hostile_remote import Bucket, shard_bytes

RSS_BOUND = 400 << 20
"""Peak resident memory of a child reading one key through the largest index shard a
reader accepts (measured at about 300 MiB; docs/format.md §10)."""
BASE = {"a": "alpha", "b": "bravo", "c": "charlie"}
RECORD = struct.Struct("<16sq16sQQII")


@pytest.fixture
def remote(conn: Any, boto3_client: Any, s3_server: Any, db_key: str, tmp_path: Path) -> Bucket:
    """:data:`BASE` pushed to this test's db_key (one index shard)."""
    with ebooklet.open(conn, tmp_path / "origin.blt", "n", value_serializer="str") as db:
        db.update(BASE)
        db.changes().push()
    return Bucket(boto3_client, s3_server.bucket, db_key)


def raw_shard(entry: fmt.Entry, keys: list[tuple[int, int]], blob: bytes) -> bytes:
    """An index shard of one page whose records all point at ``entry``, with keys at
    ``(offset, length)`` of ``blob`` as given (not necessarily as a writer lays them out)."""
    page = b"".join(RECORD.pack(*entry, k_off, k_len) for k_off, k_len in keys) + blob
    first = blob[keys[0][0] : sum(keys[0])]
    return shard_bytes([page], [first], max(len(keys), fmt.PAGE_RECORDS), len(keys))


def contiguous(keys: list[bytes]) -> tuple[list[tuple[int, int]], bytes]:
    """Where each of ``keys`` lies in a key blob written as :func:`format.encode_shard` does."""
    spans, at = [], 0
    for key in keys:
        spans.append((at, len(key)))
        at += len(key)
    return spans, b"".join(keys)


def replace_shard(remote: Bucket, make: Callable[[fmt.Entry], bytes]) -> None:
    """Replace the database's shard by ``make(entry of key "a")``."""
    name = remote.shard_name()
    entry = fmt.decode_shard(remote.get(name))[b"a"]
    remote.put(name, make(entry))


def read_a(url: str, path: Path) -> Any:
    with ebooklet.open(url, path, "r") as db:
        return db["a"]


# --------------------------------------------------------------------------- index shard caps


def test_shard_over_the_record_cap_is_refused(remote: Bucket, public_url: str, tmp_path: Path) -> None:
    """A shard may claim at most 65,536 records (four times what writers put in one):
    a reader used to accept 3.9 M records (2 GiB of RSS for one ``db[k]``)."""
    keys = [b"a"] + [b"k%08d" % i for i in range(fmt.MAX_SHARD_RECORDS)]
    replace_shard(remote, lambda e: raw_shard(e, *contiguous(keys)))
    with pytest.raises(IntegrityError, match="65,537 records, over the 65,536"):
        read_a(public_url, tmp_path / "copy.blt")


def test_shard_with_the_most_records_is_read(remote: Bucket, public_url: str, tmp_path: Path) -> None:
    """The cap refuses nothing a writer could make: a shard of exactly 65,536 records reads."""
    keys = [b"a"] + [b"k%08d" % i for i in range(fmt.MAX_SHARD_RECORDS - 1)]
    replace_shard(remote, lambda e: raw_shard(e, *contiguous(keys)))
    assert read_a(public_url, tmp_path / "copy.blt") == "alpha"


@pytest.mark.parametrize(
    "spans",
    [[(0, 1), (0, 2)], [(0, 1), (2, 1)], [(1, 1), (0, 1)]],
    ids=["overlapping", "gap", "backwards"],
)
def test_shard_keys_must_follow_each_other(
    spans: list[tuple[int, int]], remote: Bucket, public_url: str, tmp_path: Path
) -> None:
    """Keys lie one after the other in the key blob: records that share key bytes would
    each copy a slice of up to 64 KiB (65,536 of them: 4 GiB from a 68 MiB shard)."""
    replace_shard(remote, lambda e: raw_shard(e, spans, b"abc"[: max(o + n for o, n in spans)]))
    with pytest.raises(IntegrityError, match="where the previous key ended"):
        read_a(public_url, tmp_path / "copy.blt")


CHILD = r"""
import os, sys, ebooklet
path = os.path.join(sys.argv[2], "copy.blt")
try:
    with ebooklet.open(sys.argv[1], path, "r", value_serializer="str") as db:
        value = db["a"]
except ebooklet.IntegrityError:
    value = "IntegrityError"
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(value, hwm << 10)
"""
HOSTILE_RECORDS = 1 << 20
"""Records of the hostile shard (8-byte keys overlapping in a random blob, 64 MiB): the
largest that fits under the byte cap; the old reader held some 600 MiB for it."""


def largest_accepted(entry: fmt.Entry) -> bytes:
    """65,536 records and 64 MiB of 1 KiB keys (68 MiB): the worst shard a reader accepts."""
    width = fmt.SHARD_KEY_BYTES // fmt.MAX_SHARD_RECORDS
    keys = [b"k%08d" % i + b"." * (width - 9) for i in range(fmt.MAX_SHARD_RECORDS - 1)]
    return raw_shard(entry, *contiguous([b"a", *keys]))


def overlapping(entry: fmt.Entry) -> bytes:
    """:data:`HOSTILE_RECORDS` records whose 8-byte keys overlap in a random blob."""
    spans = [(HOSTILE_RECORDS + 8, 1)] + [(i, 8) for i in range(HOSTILE_RECORDS)]
    return raw_shard(entry, spans, os.urandom(HOSTILE_RECORDS + 8) + b"a")


@pytest.mark.parametrize(
    ("make", "expected"),
    [(largest_accepted, "alpha"), (overlapping, "IntegrityError")],
    ids=["largest-accepted", "overlapping-1M"],
)
def test_one_read_through_a_large_shard_bounds_memory(
    make: Callable[[fmt.Entry], bytes], expected: str, remote: Bucket, public_url: str,
    tmp_path: Path,
) -> None:
    """One ``db[k]`` by public URL, in a fresh process, peaks under :data:`RSS_BOUND`: through
    the worst shard a reader accepts, and on a hostile one of a million records."""
    replace_shard(remote, make)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, public_url, str(tmp_path)], capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(ebooklet.__file__).resolve().parent.parent)),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    value, peak = done.stdout.split()
    print(f"{make.__name__}: peak RSS {int(peak) / 2**20:.0f} MiB")
    assert value == expected and int(peak) < RSS_BOUND


def test_writer_refuses_a_shard_readers_would_refuse(
    conn: Any, make_conn: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push whose shard would hold more key bytes than readers accept raises
    ``ShardLimitError`` (a ``ValueError``) before committing: the remote keeps its head.
    (The cap is lowered for the test; at the real one it takes 64 MiB of keys.)"""
    with ebooklet.open(conn, tmp_path / "w.blt", "n", value_serializer="str") as db:
        db["small"] = "v"
        db.changes().push()
        monkeypatch.setattr(fmt, "SHARD_KEY_BYTES", 1 << 16)
        for i in range(3):
            db[f"{i}" + "k" * 30_000] = "v"
        with pytest.raises(ShardLimitError, match="readers accept") as caught:
            db.changes().push()
        assert isinstance(caught.value, ValueError)
    with ebooklet.open(make_conn(), tmp_path / "r.blt", "r") as db:
        assert list(db) == ["small"]


# --------------------------------------------------------------------------- damaged local mirror


def damage_mirror_shard(path: Path) -> None:
    """Flip one byte of the (only) shard cached in ``path``'s ``.remote_index``."""
    with booklet.open(str(path) + ".remote_index", "w", key_serializer="str", value_serializer=None) as b:
        name = next(k for k in b if k.startswith("shard:"))
        raw = bytearray(b[name])
        raw[20] ^= 0xFF
        b[name] = bytes(raw)


def test_damaged_cached_shard_is_fetched_again(remote: Bucket, reader: Any, tmp_path: Path) -> None:
    """A shard damaged in the local mirror made every read say the remote was damaged,
    and was never fetched again. Now it is replaced by a fresh copy, with a warning."""
    path = tmp_path / "copy.blt"
    with ebooklet.open(reader(), path, "r") as db:
        assert dict(db.items()) == BASE
    damage_mirror_shard(path)
    with ebooklet.open(reader(), path, "r") as db:
        with pytest.warns(RuntimeWarning, match="cached index shard .* is damaged"):
            assert db["a"] == "alpha"
        assert sorted(db) == sorted(BASE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ebooklet.open(reader(), path, "r") as db:
            assert db["b"] == "bravo"


def test_damaged_cached_shard_offline_blames_the_cache(remote: Bucket, public_url: str, tmp_path: Path) -> None:
    """Offline, the damaged shard cannot be replaced: a typed ``CacheDamagedError`` names
    the local file and says the remote is not at fault (no ``ebooklet.check()`` advice)."""
    path = tmp_path / "copy.blt"
    with ebooklet.open(public_url, path, "r") as db:
        assert db["a"] == "alpha"
    damage_mirror_shard(path)
    with (
        ebooklet.open(None, path, "r") as db,
        pytest.raises(CacheDamagedError, match="remote_index is damaged") as caught,
    ):
        db["b"]
    message = str(caught.value)
    assert "remote is not at fault" in message and "check()" not in message
    assert isinstance(caught.value, IntegrityError)


# --------------------------------------------------------------------------- group entries


def write_group(conn: Any, path: Path, entries: dict[str, Any]) -> None:
    """Publish a group whose entries are ``entries`` as given, written through the plain
    database API (as anyone who can write the group can)."""
    with ebooklet.open_rcg(conn, path, "n"):
        pass
    with ebooklet.open(conn, path, "w", value_serializer="orjson") as db:
        for uuid, entry in entries.items():
            db[uuid] = entry
        db.changes().push()


UUID = "0123456789abcdef0123456789abcdef"
MALFORMED = {
    "str": "hello",
    "list": [1, 2],
    "db_url int": {"db_url": 5},
    "db_url file": {"db_url": "file:///etc/passwd"},
    "bucket int": {"bucket": 5, "db_key": "k", "endpoint_url": None},
    "no location": {"region": "us-east-1"},
    "n_keys str": {"db_url": "https://example.com/db", "n_keys": "many"},
}


@pytest.mark.parametrize("entry", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_group_entry_is_an_integrity_error(
    entry: Any, conn: Any, public_url: str, s3_server: Any, tmp_path: Path
) -> None:
    """An entry rewritten to anything but the shape ``add()`` writes used to raise
    ``AttributeError``/``TypeError`` from ``connection()`` (or be returned as is)."""
    write_group(conn, tmp_path / "w.blt", {UUID: entry})
    with ebooklet.open_rcg(public_url, tmp_path / "r.blt", "r") as group:
        for use in (
            lambda: group[UUID],
            lambda: group.get(UUID),
            lambda: list(group.values()),
            lambda: group.connection(UUID),
            lambda: group.connection(UUID, s3_server.access_key_id, s3_server.access_key),
        ):
            with pytest.raises(IntegrityError, match="entry .* of this remote connection group"):
                use()


def test_group_entry_cannot_choose_the_bucket(
    conn: Any, s3_server: Any, tmp_path: Path
) -> None:
    """An entry naming another bucket on the caller's own endpoint would have the caller's
    keys sign for it (a confused deputy): refused unless the caller passes ``bucket=``."""
    other = "ebooklet-other-" + UUID[:8]
    entry = {"bucket": other, "db_key": "db", "endpoint_url": s3_server.endpoint_url,
             "db_url": None, "region": s3_server.region}
    own = UUID[::-1]
    write_group(conn, tmp_path / "w.blt", {UUID: entry, own: dict(entry, bucket=s3_server.bucket)})
    keys = (s3_server.access_key_id, s3_server.access_key)
    with ebooklet.open_rcg(conn, tmp_path / "r.blt", "r") as group:
        with pytest.raises(UntrustedEndpointError, match=f"names the bucket '{other}'"):
            group.connection(UUID, *keys)
        assert group.connection(UUID, *keys, bucket=other).bucket == other
        assert group.connection(own, *keys).bucket == s3_server.bucket


def test_group_entry_cannot_choose_the_region(conn: Any, s3_server: Any, tmp_path: Path) -> None:
    """On AWS the region picks the host: an entry's region other than the group's is
    refused unless the caller passes ``region=`` (or chooses the endpoint itself)."""
    entry = {"bucket": s3_server.bucket, "db_key": "db", "endpoint_url": s3_server.endpoint_url,
             "db_url": None, "region": "eu-west-3"}
    write_group(conn, tmp_path / "w.blt", {UUID: entry})
    keys = (s3_server.access_key_id, s3_server.access_key)
    with ebooklet.open_rcg(conn, tmp_path / "w.blt", "r") as group:
        with pytest.raises(UntrustedEndpointError, match="names the region 'eu-west-3'"):
            group.connection(UUID, *keys)
        assert group.connection(UUID, *keys, region="eu-west-3").region == "eu-west-3"


def test_contiguous_keys_are_what_writers_make() -> None:
    """The helpers above lay keys out as :func:`format.encode_shard` does."""
    spans, blob = contiguous([b"a", b"bc"])
    entry = fmt.Entry(b"\0" * 16, 1, b"\1" * 16, 0, 1)
    assert raw_shard(entry, spans, blob) == fmt.encode_shard({b"a": entry, b"bc": entry})


def _forged_pages(forge: Callable[[list[list[Any]], list[bytes]], None]) -> bytes:
    """A shard of two pages of five records (keys k00..k09), whose first page's records
    (``[md5, ts, pack, offset, length]``, then the key's ``offset, length`` in the key
    blob if not where the keys put them) and keys ``forge`` changes in place; the
    directory keeps the first keys and holds each page's new md5."""
    pages = []
    for page in (0, 1):
        keys = [b"k%02d" % i for i in range(5 * page, 5 * page + 5)]
        rows = [[b"\0" * 16, 1, b"\1" * 16, 100 * i, 100] for i in range(5)]
        if page == 0:
            forge(rows, keys)
        spans, blob = contiguous(keys)
        records = (RECORD.pack(*row[:5], *(row[5:] or span)) for row, span in zip(rows, spans, strict=True))
        pages.append(b"".join(records) + blob)
    return shard_bytes(pages, [b"k00", b"k05"], 5, 10)


def _set(i: int, field: int, value: Any) -> Callable[[list[list[Any]], list[bytes]], None]:
    def forge(rows: list[list[Any]], keys: list[bytes]) -> None:
        rows[i][field] = value
    return forge


def _junk_after_keys(rows: list[list[Any]], keys: list[bytes]) -> None:
    keys[4] += b"junk"
    rows[4] += [12, 3]


def _key(i: int, key: bytes) -> Callable[[list[list[Any]], list[bytes]], None]:
    def forge(rows: list[list[Any]], keys: list[bytes]) -> None:
        keys[i] = key
    return forge


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        (_set(2, 1, -1), "a timestamp -1 outside"),
        (_set(4, 1, fmt.TIMESTAMP_END), "outside 0 <= t < 2"),
        (_set(3, 4, fmt.VALUE_MAX + 1), "beyond what can exist"),
        (_set(0, 3, fmt.MAX_OBJECT_SIZE - 99), "beyond what can exist"),
        (_key(2, b"k01"), "not in order"),  # a key twice
        (_key(2, b"k04"), "not in order"),
        (_key(4, b"k05"), "at or past the next page's first"),
        (_key(1, b"k01" * 22000), "outside its .* key blob or too long"),
        (lambda rows, keys: rows[2].extend([7, 3]), "a key at 7, not at 6"),
        (_junk_after_keys, "holds bytes after its last key"),
    ],
)
def test_a_page_refuses_each_forged_record(forge: Callable, message: str) -> None:
    """A page whose checksums match (a hostile writer recomputes them) is refused for any
    record out of range or out of order, naming the check; an honest one decodes."""
    assert len(fmt.decode_shard(_forged_pages(lambda rows, keys: None))) == 10
    with pytest.raises(IntegrityError, match=message):
        fmt.decode_shard(_forged_pages(forge))
