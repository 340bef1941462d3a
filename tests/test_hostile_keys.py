"""Keys a bucket holds are untrusted too (issue 10): every key decoded from the remote
index goes through one function that turns any failure of the key serializer, and any
unhashable key, into an :class:`ebooklet.IntegrityError`.

A real database is pushed to moto_server; a hostile key is planted in its index shard
(decoded with :func:`ebooklet.format.decode_shard`, extended, re-encoded and PUT back
with boto3, the manifest's ``n_keys`` fixed). A reader then lists, iterates, diffs,
pulls: each gives a typed ebooklet error, never ``UnicodeDecodeError``, ``TypeError``,
``RecursionError``, ``ValueError`` or an orjson error.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

import ebooklet
from ebooklet import IntegrityError
from ebooklet import format as fmt

# name: (key serializer, a good key, key bytes the serializer cannot turn into a key)
HOSTILE_KEYS = {
    "str_invalid_utf8": ("str", "k1", b"\xff\xfe"),
    "json_list": ("json", "k1", b"[1,2]"),
    "json_deep": ("json", "k1", b"[" * 60000),
    "json_long_int": ("json", "k1", b"9" * 6000),
    "orjson_dict": ("orjson", "k1", b'{"a":1}'),
    "orjson_garbage": ("orjson", "k1", b"not json"),
}
CASES = list(HOSTILE_KEYS)


class Index:
    """The test database's manifest and (single) index shard in the bucket."""

    def __init__(self, client: Any, bucket: str, db_key: str):
        self.client, self.bucket, self.db_key = client, bucket, db_key

    def _get(self, suffix: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.db_key + suffix)["Body"].read()

    def _put(self, suffix: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.db_key + suffix, Body=body)

    def plant(self, kb: bytes, present: bool = True) -> None:
        """Add key bytes ``kb`` to the head's shard (``present=False``: take them out),
        written under a new shard id so that no reader's cached shard hides the change."""
        manifest = orjson.loads(self._get(""))
        entries = fmt.decode_shard(self._get(fmt.shard_name(manifest["shards"][0], 0)))
        if present:
            entries[kb] = next(iter(entries.values()))
        else:
            del entries[kb]
        manifest["shards"][0] = uuid.uuid4().hex
        self._put(fmt.shard_name(manifest["shards"][0], 0), fmt.encode_shard(entries))
        manifest["n_keys"] = len(entries)
        self._put("", orjson.dumps(manifest))

    def edit_manifest(self, **fields: Any) -> None:
        manifest = orjson.loads(self._get(""))
        manifest.update(fields)
        self._put("", orjson.dumps(manifest))


@pytest.fixture
def index(boto3_client: Any, s3_server: Any, db_key: str) -> Index:
    return Index(boto3_client, s3_server.bucket, db_key)


def publish(conn: Any, tmp_path: Path, ks: str, data: dict, commits: int = 1) -> None:
    """Push ``data`` with key serializer ``ks`` (its last item in its own commit when
    ``commits`` is 2)."""
    items = list(data.items())
    with ebooklet.open(conn, tmp_path / "origin.blt", "n", key_serializer=ks, value_serializer="str") as db:
        for i, (key, value) in enumerate(items):
            db[key] = value
            if commits == 2 and i == len(items) - 2:
                db.changes().push()
        db.changes().push()


def typed(action: Callable[[], Any]) -> IntegrityError:
    """The IntegrityError ``action`` raises (any other exception fails the test)."""
    with pytest.raises(IntegrityError) as info:
        action()
    assert "cannot be decoded by key serializer" in str(info.value)
    return info.value


@pytest.mark.parametrize("case", CASES)
def test_listing_a_hostile_key_is_an_integrity_error(
    case: str, conn: Any, reader: Any, index: Index, tmp_path: Path
) -> None:
    """list(db), keys(), items() fail typed; the good key stays readable, also by ``in``."""
    ks, good, kb = HOSTILE_KEYS[case]
    publish(conn, tmp_path, ks, {good: "v1"})
    index.plant(kb)
    with ebooklet.open(reader(), tmp_path / "copy.blt", "r") as db:
        error = typed(lambda: list(db))
        assert repr(bytes(kb[:10]))[:-1] in str(error)
        assert repr(ks) in str(error)
        typed(lambda: list(db.keys()))
        typed(lambda: dict(db.items()))
        typed(lambda: list(db.values()))
        assert good in db
        assert db[good] == "v1"


@pytest.mark.parametrize("case", CASES)
def test_changes_and_pull_of_a_hostile_key_are_integrity_errors(
    case: str, conn: Any, make_conn: Callable[..., Any], index: Index, tmp_path: Path
) -> None:
    """A cached hostile key that the remote then deletes: iter_changes() and pull()."""
    ks, good, kb = HOSTILE_KEYS[case]
    publish(conn, tmp_path, ks, {good: "v1"})
    index.plant(kb)
    path = tmp_path / "copy.blt"
    with ebooklet.open(make_conn(), path, "r") as db:
        assert db.load_items() == 2  # caches the hostile key's value too
    index.plant(kb, present=False)
    with ebooklet.open(make_conn(), path, "r") as db:
        typed(lambda: list(db.changes().iter_changes()))
        typed(lambda: db.changes().pull())


@pytest.mark.parametrize("case", CASES)
def test_diff_with_a_hostile_key_is_an_integrity_error(
    case: str, conn: Any, reader: Any, index: Index, tmp_path: Path
) -> None:
    ks, good, kb = HOSTILE_KEYS[case]
    publish(conn, tmp_path, ks, {good: "v1", "k2": "v2"}, commits=2)
    index.plant(kb)
    with ebooklet.open(reader(), tmp_path / "copy.blt", "r") as db:
        typed(lambda: db.diff(1))


# --------------------------------------------------------------------------- the data file's header


class Doubled:
    """A custom serializer class (booklet records it as code 0)."""

    @staticmethod
    def dumps(value: Any) -> bytes:
        return orjson.dumps([value, value])

    @staticmethod
    def loads(data: bytes) -> Any:
        return orjson.loads(data)[0]


def local_db(path: Path, **serializers: Any) -> None:
    """A local-only database at ``path`` holding ``{"k": {"x": 1}}``."""
    with ebooklet.open(None, path, "n", **serializers) as db:
        db["k"] = {"x": 1}


def edit_meta(path: Path, **fields: Any) -> None:
    meta_path = Path(f"{path}.ebk.json")
    meta = orjson.loads(meta_path.read_bytes())
    meta.update(fields)
    meta_path.write_bytes(orjson.dumps(meta))


def test_deleted_sidecar_reads_with_the_headers_serializers(tmp_path: Path) -> None:
    """Deleting a damaged P.ebk.json (as its IntegrityError advises) keeps values decoded."""
    path = tmp_path / "db.blt"
    local_db(path, value_serializer="orjson")
    Path(f"{path}.ebk.json").unlink()
    with ebooklet.open(None, path, "r") as db:
        assert db["k"] == {"x": 1}
        assert list(db) == ["k"]
    with ebooklet.open(None, path, "w") as db:
        db["k2"] = [2]
    with ebooklet.open(None, path, "r") as db:
        assert dict(db.items()) == {"k": {"x": 1}, "k2": [2]}


@pytest.mark.parametrize(
    "field, name", [("value_serializer", "str"), ("value_serializer", None), ("key_serializer", "orjson")]
)
def test_sidecar_disagreeing_with_the_header_is_refused(tmp_path: Path, field: str, name: Any) -> None:
    path = tmp_path / "db.blt"
    local_db(path, value_serializer="orjson")
    edit_meta(path, **{field: name})
    with pytest.raises(ebooklet.SerializationError, match=f"records {field} .* in its header"):
        ebooklet.open(None, path, "r")


def test_arguments_disagreeing_with_the_header_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.blt"
    local_db(path, value_serializer="orjson")
    Path(f"{path}.ebk.json").unlink()
    with pytest.raises(ebooklet.SerializationError, match="in its header"):
        ebooklet.open(None, path, "r", value_serializer="json")
    with ebooklet.open(None, path, "n", value_serializer="str") as db:  # 'n' replaces P
        db["k"] = "five"
    with ebooklet.open(None, path, "r") as db:
        assert db["k"] == "five"


def test_custom_class_is_checked_against_the_header(tmp_path: Path) -> None:
    """A custom class (code 0 in the header) must be passed again once P.ebk.json is gone;
    a booklet serializer is refused for it, and a custom class for a named one."""
    path = tmp_path / "db.blt"
    local_db(path, value_serializer=Doubled)
    with ebooklet.open(None, path, "r", value_serializer=Doubled) as db:
        assert db["k"] == {"x": 1}
    Path(f"{path}.ebk.json").unlink()
    with pytest.raises(ebooklet.SerializationError, match="custom value_serializer class"):
        ebooklet.open(None, path, "r")
    with pytest.raises(ebooklet.SerializationError, match="in its header"):
        ebooklet.open(None, path, "r", value_serializer="orjson")
    with ebooklet.open(None, path, "r", value_serializer=Doubled) as db:
        assert db["k"] == {"x": 1}
    other = tmp_path / "named.blt"
    local_db(other, value_serializer="orjson")
    Path(f"{other}.ebk.json").unlink()
    with pytest.raises(ebooklet.SerializationError, match="in its header"):
        ebooklet.open(None, other, "r", value_serializer=Doubled)


def test_remote_manifest_disagreeing_with_the_header_is_refused(
    conn: Any, make_conn: Callable[..., Any], index: Index, tmp_path: Path
) -> None:
    """A manifest that changes its value serializer under a local copy is refused, not
    decoded with (the copy's cached bytes were written by the other one)."""
    with ebooklet.open(conn, tmp_path / "origin.blt", "n", value_serializer="orjson") as db:
        db["k"] = {"x": 1}
        db.changes().push()
    path = tmp_path / "copy.blt"
    for _ in range(2):  # the second open checks the header against the manifest: same
        with ebooklet.open(make_conn(), path, "r") as db:
            assert db["k"] == {"x": 1}
    index.edit_manifest(value_serializer="json")
    with pytest.raises(ebooklet.SerializationError, match="in its header"):
        ebooklet.open(make_conn(), path, "r")


def test_a_key_listed_in_another_shard_is_an_integrity_error(
    conn: Any, reader: Any, boto3_client: Any, s3_server: Any, db_key: str, tmp_path: Path,
    small_shards: int,
) -> None:
    """A forged index lists a key in a shard it does not hash to: a lookup (which goes to
    the key's own shard) would never find what keys() lists. Iterating raises; the keys
    in their right shards stay readable."""
    data = {f"k{i:05d}": f"v{i}" for i in range(3 * small_shards)}
    publish(conn, tmp_path, "str", data)
    index = Index(boto3_client, s3_server.bucket, db_key)
    manifest = orjson.loads(index._get(""))
    assert manifest["n_shards"] >= 2
    first, second = (fmt.shard_name(manifest["shards"][i], i) for i in (0, 1))
    moved, entry = next(iter(fmt.decode_shard(index._get(first)).items()))
    entries = fmt.decode_shard(index._get(second))
    entries[moved] = entry
    manifest["shards"][1] = uuid.uuid4().hex
    index._put(fmt.shard_name(manifest["shards"][1], 1), fmt.encode_shard(entries))
    index._put("", orjson.dumps(manifest))
    with ebooklet.open(reader(), tmp_path / "copy.blt", "r") as db:
        with pytest.raises(IntegrityError, match="belongs to shard 0"):
            list(db.keys())
        assert db[moved.decode()] == data[moved.decode()]
