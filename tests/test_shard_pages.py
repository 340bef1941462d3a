"""Index shards in pages (docs/format.md §3, issue 12): a cold read of one key downloads the
shard's directory and one page, not the whole shard; iteration still reads whole shards;
the local mirror keeps what was fetched; a hostile directory or page is refused.

Databases are pushed to the real moto_server; bytes are counted by the benchmark runner's
``CountingProxy`` (a TCP relay on loopback); hostile shards are PUT with boto3.
"""

from __future__ import annotations

import importlib.util
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import booklet
import pytest

import ebooklet
from ebooklet import IntegrityError, OfflineError
from ebooklet import format as fmt
from ebooklet import remote as remote_mod
from ebooklet.errors import CacheDamagedError
from test_hostile_remote import RECORD_SIZE, Bucket, shard_bytes, split_shard

ROOT = Path(__file__).resolve().parent.parent
INDEX_BUDGET = 64 << 10
"""Bytes of index (and HTTP headers) a cold read of one key may download beyond the value."""


def _counting_proxy(port: int) -> Any:
    """The benchmark runner's ``CountingProxy`` in front of the server at ``port``."""
    spec = importlib.util.spec_from_file_location("ebooklet_bench_run", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CountingProxy(port)


@pytest.fixture
def counting(s3_server: Any) -> Iterator[Any]:
    where = urlsplit(s3_server.endpoint_url)
    if where.scheme != "http" or where.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("the counting proxy relays only to a plain-http server on loopback")
    proxy = _counting_proxy(where.port)
    yield proxy
    proxy.close()


def push(conn: Any, path: Path, data: dict[str, str]) -> None:
    with ebooklet.open(conn, path, "n", value_serializer="str") as db:
        db.update(data)
        db.changes().push()


def test_cold_read_of_one_key_downloads_a_page_not_the_shard(
    conn: Any, s3_server: Any, db_key: str, boto3_client: Any, counting: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With full shards (4,096 keys each here), one ``db[k]`` of a fresh reader downloads
    at most :data:`INDEX_BUDGET` beyond the value (the directory and one page), in three
    GETs after the manifest; the same key then reads offline from the mirror, and
    iteration reads whole shards."""
    monkeypatch.setattr(fmt, "KEYS_PER_SHARD", 4096)
    data = {f"key-{i:07d}": f"value {i:05d} " + "x" * 80 for i in range(8192)}
    push(conn, tmp_path / "w.blt", data)
    bucket = Bucket(boto3_client, s3_server.bucket, db_key)
    manifest = bucket.manifest()
    assert manifest["n_shards"] == 2
    shard_size = len(bucket.get(fmt.shard_name(manifest["shards"][0], 0)))

    path = tmp_path / "r.blt"
    reader = s3_server.connection(db_key, endpoint_url=counting.endpoint_url)
    for key in ("key-0004321", "key-0000007"):
        with ebooklet.open(reader, path, "r") as db:
            counting.take()
            assert db[key] == data[key]
            down, _ = counting.take()
        beyond = down - len(data[key])
        print(f"cold read: {down:,} bytes down, {beyond:,} beyond the value; shard {shard_size:,}")
        assert beyond <= INDEX_BUDGET < shard_size // 4
    with ebooklet.open(None, path, "r") as db:
        assert db["key-0004321"] == data["key-0004321"]
    with ebooklet.open(reader, path, "r") as db:
        assert dict(db.items()) == data


def test_reads_of_many_keys_of_a_shard_end_in_one_whole_shard_get(
    conn: Any, make_conn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Random reads one by one across a shard fetch a page each only for the first
    :data:`remote.PAGES_BEFORE_WHOLE` pages, then the whole shard: a few index GETs, not
    one a page."""
    monkeypatch.setattr(fmt, "KEYS_PER_SHARD", 4096)
    data = {f"key-{i:07d}": f"value {i:05d}" for i in range(4096)}
    push(conn, tmp_path / "w.blt", data)
    keys = sorted(data)[::97]  # 43 keys spread over every page of the one shard
    reader = make_conn()
    with ebooklet.open(reader, tmp_path / "r.blt", "r") as db:
        before = reader.request_counts["GET"]
        assert [db[k] for k in keys] == [data[k] for k in keys]
        index_gets = reader.request_counts["GET"] - before - len(keys)  # one GET a value
    assert index_gets <= 1 + remote_mod.PAGES_BEFORE_WHOLE + 1  # directory, pages, whole shard


def test_paged_reads_match_whole_shards(
    conn: Any, public_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key read by page (pages of 4 records) gives what the whole shard gives, a key
    between or around the pages' keys is absent, and offline only what was read is known."""
    monkeypatch.setattr(fmt, "PAGE_RECORDS", 4)
    monkeypatch.setattr(remote_mod, "WHOLE_SHARD_RECORDS", 0)
    monkeypatch.setattr(remote_mod, "DIRECTORY_READ", 64)
    data = {f"k{i:03d}": f"v{i}" for i in range(0, 60, 2)}
    push(conn, tmp_path / "w.blt", data)
    path = tmp_path / "r.blt"
    with ebooklet.open(public_url, path, "r") as db:
        for key in ("k000", "k001", "k027", "k058", "k059", "a", "z"):
            assert db.get(key) == data.get(key)
        assert sorted(db) == sorted(data)
    with ebooklet.open(public_url, tmp_path / "r2.blt", "r") as db:
        assert db["k030"] == "v30"
    with ebooklet.open(None, tmp_path / "r2.blt", "r") as db:
        assert db["k030"] == "v30"
        with pytest.raises(OfflineError):
            db["k000"]


def test_shard_layout_round_trips() -> None:
    """A shard of exactly two full pages, of one page and one record, and empty."""
    entry = fmt.Entry(b"\1" * 16, 5, b"\2" * 16, 0, 3)
    for n in (0, 1, fmt.PAGE_RECORDS, 2 * fmt.PAGE_RECORDS, 2 * fmt.PAGE_RECORDS + 1):
        entries = {b"%06d" % i: entry for i in range(n)}
        raw = fmt.encode_shard(entries)
        assert fmt.decode_shard(raw) == entries
        directory = fmt.decode_shard_directory(raw)
        assert len(directory.pages) == -(-n // fmt.PAGE_RECORDS)
        assert directory.pages_end + fmt.DIRECTORY_TRAILER_SIZE < len(raw) or n == 0


def test_the_column_helpers_of_a_push_agree_with_their_one_value_forms() -> None:
    """What a push computes a column at a time equals the one-value rules: ``shards_of``
    and ``shard_of`` (the top bits of an 8-byte BLAKE2b, big-endian), ``md5s`` and ``md5``
    (small values, and a large one among them), and a pack footer filled by ``extend``
    or by ``add``."""
    import hashlib

    keys = [b"", b"k", b"key%09d" % 7, bytes(range(256)) * 3]
    for key in keys:
        assert fmt.key_hash(key) == int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
    for n_shards in (1, 2, 64, 1 << 20):
        assert fmt.shards_of(keys, n_shards) == [fmt.shard_of(k, n_shards) for k in keys]
    small, mixed = [b"", b"v" * 100, b"w" * 1023], [b"v", b"x" * 5000]
    for values in (small, mixed, []):
        assert fmt.md5s(values) == [hashlib.md5(v).digest() for v in values]
    one, many = fmt.PackFooter(), fmt.PackFooter()
    items = [(b"a", fmt.md5(b"1"), 5, 0, 1), (b"bb", fmt.md5(b"22"), 6, 1, 2)]
    for item in items:
        one.add(*item)
    many.extend(*zip(*items, strict=True))
    assert many.encode() == one.encode() == fmt.encode_pack_footer(items)
    assert list(many.entries(b"P" * 16)) == [fmt.Entry(m, ts, b"P" * 16, o, n) for _, m, ts, o, n in items]


# --------------------------------------------------------------------------- hostile shards


def _with_refs(change: Callable[[list[list[Any]]], None]) -> Callable[[bytes], bytes]:
    """A mutation of a shard's page entries ``[offset, length, md5]`` (its pages as they are)."""

    def mutate(shard: bytes) -> bytes:
        pages, keys, page_records, count = split_shard(shard)
        offsets = [sum(map(len, pages[:i])) for i in range(len(pages))]
        refs = [[o, len(p), fmt.md5(p)] for o, p in zip(offsets, pages, strict=True)]
        change(refs)
        return shard_bytes(pages, keys, page_records, count, [tuple(r) for r in refs])

    return mutate


def _swap_records(shard: bytes) -> bytes:
    """Page 1's first two records swapped (their keys too), its md5 made right."""
    pages, keys, page_records, count = split_shard(shard)
    page = pages[1]
    records = [page[i * RECORD_SIZE : (i + 1) * RECORD_SIZE] for i in range(page_records)]
    blob = page[page_records * RECORD_SIZE :]
    k = [struct.unpack_from("<II", r, 56) for r in records]
    key0, key1 = blob[k[0][0] : sum(k[0])], blob[k[1][0] : sum(k[1])]
    swapped = [records[1][:56] + struct.pack("<II", 0, k[1][1]),
               records[0][:56] + struct.pack("<II", k[1][1], k[0][1]), *records[2:]]
    pages[1] = b"".join(swapped) + key1 + key0 + blob[sum(k[1]) :]
    keys[1] = key1
    return shard_bytes(pages, keys, page_records, count)


def _swap_first_keys(shard: bytes) -> bytes:
    pages, keys, page_records, count = split_shard(shard)
    keys[0], keys[1] = keys[1], keys[0]
    return shard_bytes(pages, keys, page_records, count)


def _flip_page_byte(shard: bytes) -> bytes:
    """A byte of page 1 changed, the directory's md5 of it not."""
    pages, keys, page_records, count = split_shard(shard)
    refs = [(sum(map(len, pages[:i])), len(p), fmt.md5(p)) for i, p in enumerate(pages)]
    pages[1] = pages[1][:10] + bytes([pages[1][10] ^ 0xFF]) + pages[1][11:]
    return shard_bytes(pages, keys, page_records, count, refs)


def _directory_length(value: int) -> Callable[[bytes], bytes]:
    def mutate(shard: bytes) -> bytes:
        return shard[:-12] + struct.pack("<I8s", value, fmt.SHARD_MAGIC)

    return mutate


def _count(value: int) -> Callable[[bytes], bytes]:
    def mutate(shard: bytes) -> bytes:
        pages, keys, page_records, _ = split_shard(shard)
        return shard_bytes(pages, keys, page_records, value)

    return mutate


def _set(i: int, field: int, delta: int) -> Callable[[list[list[Any]]], None]:
    def change(refs: list[list[Any]]) -> None:
        refs[i][field] += delta

    return change


def _overlap(refs: list[list[Any]]) -> None:
    refs[1][0] = refs[0][0]


HOSTILE = {
    "page-offset-gap": (_with_refs(_set(1, 0, 1)), "must start at"),
    "pages-overlap": (_with_refs(_overlap), "must start at"),
    "page-too-short": (_with_refs(_set(1, 1, -100)), "must start at|hold its"),
    "page-longer-than-shard": (_with_refs(_set(2, 1, 1 << 20)), "pages end at"),
    "page-keys-unsorted": (_swap_records, "not in order"),
    "first-keys-unsorted": (_swap_first_keys, "not in order"),
    "page-md5-fails": (_flip_page_byte, "does not match the md5"),
    "directory-length-huge": (_directory_length(2**32 - 1), "claims a directory"),
    "directory-length-tiny": (_directory_length(3), "claims a directory"),
    "count-huge": (_count(2**32 - 1), "over the 65,536"),
    "count-past-pages": (_count(13), "more than its"),
}


@pytest.fixture
def paged(
    conn: Any, boto3_client: Any, s3_server: Any, db_key: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Bucket, dict[str, str]]:
    """12 keys pushed in pages of 4 (one shard of three pages); readers here read one key
    by its page (no whole small shard, a tiny tail read)."""
    monkeypatch.setattr(fmt, "PAGE_RECORDS", 4)
    monkeypatch.setattr(remote_mod, "WHOLE_SHARD_RECORDS", 0)
    monkeypatch.setattr(remote_mod, "DIRECTORY_READ", 64)
    data = {f"key{i:02d}": f"value {i}" for i in range(12)}
    push(conn, tmp_path / "w.blt", data)
    return Bucket(boto3_client, s3_server.bucket, db_key), data


@pytest.mark.parametrize("how", ["one key", "all keys"])
@pytest.mark.parametrize(("mutate", "message"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_directory_or_page_is_refused(
    mutate: Callable[[bytes], bytes], message: str, how: str, paged: tuple[Bucket, dict],
    public_url: str, tmp_path: Path,
) -> None:
    """A shard whose directory or page is damaged or crafted raises ``IntegrityError``,
    whether one key is read by its page (``key05``, in page 1) or the whole shard."""
    bucket, data = paged
    name = bucket.shard_name()
    original = bucket.get(name)
    bucket.put(name, mutate(original))
    with ebooklet.open(public_url, tmp_path / "r.blt", "r") as db, pytest.raises(IntegrityError, match=message):
        if how == "one key":
            db["key05"]
        else:
            dict(db.items())
    bucket.put(name, original)
    with ebooklet.open(public_url, tmp_path / "r2.blt", "r") as db:
        assert db["key05"] == data["key05"]


@pytest.mark.parametrize("piece", ["#dir", "#1"], ids=["directory", "page"])
def test_damaged_mirrored_piece_is_fetched_again(
    piece: str, paged: tuple[Bucket, dict], public_url: str, tmp_path: Path
) -> None:
    """A shard's directory or page damaged in the local mirror: offline, a typed
    ``CacheDamagedError``; online, fetched again with a warning, and then read quietly."""
    _, data = paged
    path = tmp_path / "r.blt"
    with ebooklet.open(public_url, path, "r") as db:
        assert db["key05"] == data["key05"]
    mirror = str(path) + ".remote_index"
    with booklet.open(mirror, "w", key_serializer="str", value_serializer=None) as b:
        name = next(k for k in b if k.endswith(piece))
        raw = bytearray(b[name])
        raw[5] ^= 0xFF
        b[name] = bytes(raw)
    with ebooklet.open(None, path, "r") as db, pytest.raises(CacheDamagedError, match="remote is not at fault"):
        db["key05"]
    with (
        ebooklet.open(public_url, path, "r") as db,
        pytest.warns(RuntimeWarning, match="cached index shard .* is damaged"),
    ):
        assert db["key05"] == data["key05"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ebooklet.open(None, path, "r") as db:
            assert db["key05"] == data["key05"]
