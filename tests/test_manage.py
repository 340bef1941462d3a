"""Managing remote databases (issue 3): history, snapshots, diff, delete, copy,
remote connection groups, vacuum and integrity checks.

Every test runs against the session's S3 target (moto_server by default). Tests
that create extra buckets (versioned ones) or use made-up credentials only run
on moto. "Nothing left" claims are checked by listing the bucket and fetching
every object (every version, in versioned buckets), never by trusting reports.
"""

from __future__ import annotations

import hashlib
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import ebooklet
from ebooklet import format as fmt
from ebooklet.errors import (
    EBookletError,
    IntegrityError,
    LockedError,
    ReadOnlyError,
    RemoteExistsError,
    RemoteNotFoundError,
)
from ebooklet.lock import RemoteLock

# --------------------------------------------------------------------------- helpers


def push(conn: Any, path: Path, sets: dict | None = None, deletes: tuple = (), message: str | None = None,
         **kw: Any) -> Any:
    """Open ``path`` read-write (creating it), apply the edits, push, close."""
    kw.setdefault("value_serializer", "pickle")
    with ebooklet.open(conn, path, "c", **kw) as db:
        db.update(sets or {})
        for key in deletes:
            del db[key]
        return db.changes().push(message=message)


def sibling(db_key: str, name: str) -> str:
    """Another key in this test's prefix (cleaned up by the db_key fixture)."""
    return db_key.rpartition("/")[0] + "/" + name


def objects(s3: Any, prefix: str, bucket: str | None = None) -> dict[str, bytes]:
    """Every object under ``prefix``: key -> bytes (listed and fetched with boto3)."""
    client, bucket = s3.client(), bucket or s3.bucket
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return out


def all_versions(s3: Any, bucket: str, prefix: str) -> dict[tuple[str, str], bytes]:
    """Every version of every object under ``prefix`` (delete markers as b"")."""
    client = s3.client()
    out = {}
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []):
            body = client.get_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])["Body"]
            out[(v["Key"], v["VersionId"])] = body.read()
        for v in page.get("DeleteMarkers", []):
            out[(v["Key"], v["VersionId"])] = b""
    return out


def owned(keys: Any, db_key: str) -> set[str]:
    """The keys that belong to the database at ``db_key``: ``D`` and ``D.ebk/...``."""
    return {k for k in keys if k == db_key or k.startswith(db_key + fmt.PREFIX)}


def other_lock(conn_factory: Callable[..., Any]) -> RemoteLock:
    """The write lock, taken by another writer (another owner id)."""
    lock = RemoteLock(conn_factory(), "another-writer", "/elsewhere/db.blt")
    lock.acquire()
    return lock


HISTORY = [
    ({"a": "A1", "b": "B1", "gone": "G1"}, (), "first"),
    ({"a": "A2"}, ("gone",), "second"),
    ({"c": "C3"}, (), None),
]


@pytest.fixture
def three_commits(conn: Any, tmp_path: Path) -> Path:
    """This test's database with three commits (see HISTORY); returns the writer's path."""
    path = tmp_path / "writer.blt"
    for sets, deletes, message in HISTORY:
        push(conn, path, sets, deletes, message, value_serializer="str")
    return path


@pytest.fixture
def versioned(s3_server: Any, make_conn: Callable[..., Any]) -> Iterator[tuple[str, Any]]:
    """``(bucket, conn)``: a fresh versioned bucket (moto only) and a connection into it."""
    if not s3_server.is_local:
        pytest.skip("creates a versioned bucket: moto_server only")
    client = s3_server.client()
    bucket = f"ebk-versioned-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    try:
        yield bucket, make_conn(db_key="v/db", bucket=bucket)
    finally:
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            found = page.get("Versions", []) + page.get("DeleteMarkers", [])
            if found:
                client.delete_objects(
                    Bucket=bucket,
                    Delete={"Objects": [{"Key": v["Key"], "VersionId": v["VersionId"]} for v in found]},
                )
        client.delete_bucket(Bucket=bucket)


# --------------------------------------------------------------------------- history


def test_history_lists_every_commit_newest_first(three_commits: Path, reader: Any, tmp_path: Path) -> None:
    """seq, time, keys changed, bytes and message of each push; readable by public URL too."""
    with ebooklet.open(reader(), tmp_path / "reader.blt") as db:
        commits = db.history()
    assert [c.seq for c in commits] == [3, 2, 1]
    assert [c.message for c in commits] == [None, "second", "first"]
    assert [c.changed_keys for c in commits] == [1, 2, 3]
    assert [c.n_keys for c in commits] == [3, 2, 3]
    assert [c.n_bytes for c in commits] == [6, 4, 6]  # two-byte str values
    assert commits[0].timestamp > commits[1].timestamp > commits[2].timestamp
    assert commits[0].time.tzinfo is not None
    assert len({c.commit_id for c in commits}) == 3
    assert len({c.uuid for c in commits}) == 1


def test_every_commit_is_kept_as_a_commit_record(three_commits: Path, conn: Any, s3_server: Any,
                                                 db_key: str, tmp_path: Path) -> None:
    """``D.ebk/commit/<seq>-<commit id>`` holds each committed manifest; history(limit) stops early."""
    with ebooklet.open(conn, three_commits) as db:
        commits = db.history()
        assert [c.seq for c in db.history(limit=2)] == [3, 2]
        with pytest.raises(ValueError):
            db.history(limit=0)
    names = sorted(k for k in objects(s3_server, db_key + ".ebk/commit/"))
    assert names == sorted(db_key + fmt.commit_name(c.seq, c.commit_id) for c in commits)


def test_open_commit_is_a_read_only_snapshot(three_commits: Path, reader: Any, tmp_path: Path) -> None:
    """open(..., commit=seq) shows that commit; the local copy's head is not moved."""
    path = tmp_path / "snap.blt"
    with ebooklet.open(reader(), path, "r", commit=1) as snap:
        assert snap.commit == 1
        assert dict(snap.items()) == {"a": "A1", "b": "B1", "gone": "G1"}
        assert len(snap) == 3 and "c" not in snap
        with pytest.raises(ReadOnlyError):
            snap["a"] = "nope"
        snap.pull()  # a snapshot never moves
        assert snap["a"] == "A1"
        first_id = snap.history()[0].commit_id
    with ebooklet.open(reader(), path, "r") as head:
        assert head.commit is None
        assert dict(head.items()) == {"a": "A2", "b": "B1", "c": "C3"}
    with ebooklet.open(reader(), path, "r", commit=first_id) as snap:  # by commit id
        assert snap["gone"] == "G1"


@pytest.mark.parametrize(
    ("flag", "commit", "error"),
    [
        ("w", 1, ValueError),  # snapshots are read-only
        ("r", 0, ValueError),
        ("r", True, TypeError),
        ("r", 1.0, TypeError),
        ("r", 99, RemoteNotFoundError),  # never committed
        ("r", "f" * 32, RemoteNotFoundError),
    ],
)
def test_open_commit_rejects_bad_requests(three_commits: Path, conn: Any, tmp_path: Path, flag: str,
                                          commit: Any, error: type) -> None:
    with pytest.raises(error):
        ebooklet.open(conn, tmp_path / "snap.blt", flag, commit=commit)


def test_snapshot_refuses_a_file_with_unpushed_edits(three_commits: Path, conn: Any) -> None:
    """The edits would hide the snapshot's values; they stay pending, untouched."""
    with ebooklet.open(conn, three_commits, "w") as db:
        db["a"] = "local edit"
    with pytest.raises(EBookletError, match="unpushed edits"):
        ebooklet.open(conn, three_commits, "r", commit=1)
    with ebooklet.open(conn, three_commits, "w") as db:
        assert db["a"] == "local edit"
        assert [c.key for c in db.changes().iter_changes()] == ["a"]


def test_diff_lists_the_keys_that_differ(three_commits: Path, reader: Any, tmp_path: Path,
                                         s3_server: Any) -> None:
    """diff(a, b) compares two commits from their indexes alone: no value is downloaded."""
    if s3_server.is_local:
        s3_server.server.reset_request_counts()
    with ebooklet.open(reader(), tmp_path / "r.blt") as db:
        forward = db.diff(1, 3)
        assert [(d.kind, d.key) for d in forward] == [("modified", "a"), ("added", "c"), ("deleted", "gone")]
        assert forward[0].old_md5 == hashlib.md5(b"A1").hexdigest()
        assert forward[0].new_md5 == hashlib.md5(b"A2").hexdigest()
        assert [(d.kind, d.key) for d in db.diff(3, 1)] == [("modified", "a"), ("deleted", "c"), ("added", "gone")]
        assert db.diff(1) == forward  # default: the head
        assert db.diff(2, 2) == []
        with pytest.raises(RemoteNotFoundError):
            db.diff(7)
    if s3_server.is_local:
        assert not [p for m, p, _ in s3_server.server.iter_requests() if ".ebk/pack/" in p]


# --------------------------------------------------------------------------- delete


def test_delete_remote_removes_the_database_and_nothing_else(
    three_commits: Path, conn: Any, db_key: str, s3_server: Any, reader: Any, tmp_path: Path
) -> None:
    """D and D.ebk/* go; D2, D.old, D.ebkx stay; the local file keeps working offline."""
    client = s3_server.client()
    siblings = [db_key + "2", db_key + ".old", db_key + ".ebkx", db_key + "/x"]
    for key in siblings:
        client.put_object(Bucket=s3_server.bucket, Key=key, Body=b"not yours")
    prefix = db_key.rpartition("/")[0]
    before = owned(objects(s3_server, prefix), db_key)
    with ebooklet.open(conn, tmp_path / "copy.blt", "w") as db:
        assert db["a"] == "A2"  # now cached locally; "b" is not
        result = db.delete_remote()
        assert result.objects == len(before) and result.bytes > 0
        assert db.offline and db.remote is None
        assert db["a"] == "A2"
        with pytest.raises(KeyError):
            db["b"]  # never cached: gone with the remote
    left = objects(s3_server, prefix)
    assert owned(left, db_key) == set()
    assert {k: left[k] for k in siblings} == dict.fromkeys(siblings, b"not yours")
    with pytest.raises(RemoteNotFoundError):
        ebooklet.open(reader(), tmp_path / "fresh.blt", "r")


LOCKED_OPERATIONS = {
    "delete_remote": lambda db: db.delete_remote(),
    "vacuum": lambda db: db.vacuum(keep=1),
}


@pytest.mark.parametrize("operation", list(LOCKED_OPERATIONS))
def test_maintenance_refuses_while_another_writer_holds_the_lock(
    three_commits: Path, conn: Any, make_conn: Callable[..., Any], db_key: str, s3_server: Any,
    tmp_path: Path, operation: str,
) -> None:
    """Under the write lock: while another writer holds it, nothing is deleted or changed."""
    before = objects(s3_server, db_key)
    lock = other_lock(make_conn)
    try:
        with ebooklet.open(conn, tmp_path / "admin.blt", "r") as db, pytest.raises(LockedError):
            LOCKED_OPERATIONS[operation](db)
    finally:
        lock.release()
    after = objects(s3_server, db_key)
    assert set(after) == set(before)
    assert {k: v for k, v in after.items() if not k.endswith(fmt.LOCK_NAME)} == {
        k: v for k, v in before.items() if not k.endswith(fmt.LOCK_NAME)
    }


def test_delete_remote_in_a_versioned_bucket_removes_every_version(
    versioned: tuple[str, Any], make_conn: Callable[..., Any], s3_server: Any, tmp_path: Path
) -> None:
    bucket, conn = versioned
    client = s3_server.client()
    for body in (b"one", b"two"):
        client.put_object(Bucket=bucket, Key="v/db2", Body=body)
    path = tmp_path / "v.blt"
    push(conn, path, {"a": "secret-1"})
    push(conn, path, {"a": "secret-2"})
    assert len([k for k, _ in all_versions(s3_server, bucket, "v/db") if k == "v/db"]) == 2
    with ebooklet.open(conn, path, "w") as db:
        result = db.delete_remote()
    assert result.versions > result.objects
    left = all_versions(s3_server, bucket, "v/")
    assert sorted(left.values()) == [b"one", b"two"]
    assert {k for k, _ in left} == {"v/db2"}


# --------------------------------------------------------------------------- copy


def test_copy_remote_server_side_never_downloads_values(
    three_commits: Path, conn: Any, make_conn: Callable[..., Any], db_key: str, reader: Any,
    s3_server: Any, tmp_path: Path
) -> None:
    """Same endpoint and credentials: CopyObject; the copy is a database of its own."""
    target = make_conn(db_key=sibling(db_key, "copy"))
    if s3_server.is_local:
        s3_server.server.reset_request_counts()
    with ebooklet.open(conn, three_commits, "r") as db:
        result = db.copy_remote(target, message="backup")
        source_uuid = db.uuid
        again = db.copy_remote(target, overwrite=True, message="backup")  # same packs: skipped
    assert result.server_side and result.seq == 1 and result.objects_copied >= 2
    assert (again.seq, again.objects_copied, again.objects_skipped) == (2, 0, result.objects_copied)
    if s3_server.is_local:
        gets = [p for m, p, _ in s3_server.server.iter_requests() if m == "GET" and ".ebk/pack/" in p]
        assert gets == []
    with ebooklet.open(reader(target), tmp_path / "copy.blt") as copy:
        assert dict(copy.items()) == {"a": "A2", "b": "B1", "c": "C3"}
        assert copy.uuid == again.uuid != source_uuid
        assert [(c.seq, c.message) for c in copy.history()] == [(2, "backup"), (1, "backup")]
    assert ebooklet.check(target).ok


def test_copy_remote_streamed_checks_every_value(
    three_commits: Path, conn: Any, make_conn: Callable[..., Any], db_key: str, s3_server: Any,
    tmp_path: Path
) -> None:
    """Through this machine: values are md5-verified; a corrupt source commits nothing."""
    good = make_conn(db_key=sibling(db_key, "good"))
    with ebooklet.open(conn, three_commits, "r") as db:
        result = db.copy_remote(good, server_side=False)
    assert not result.server_side and result.bytes_copied > 0
    with ebooklet.open(good, tmp_path / "good.blt") as copy:
        assert dict(copy.items()) == {"a": "A2", "b": "B1", "c": "C3"}

    client = s3_server.client()
    pack = next(k for k in objects(s3_server, db_key + ".ebk/pack/"))
    data = bytearray(client.get_object(Bucket=s3_server.bucket, Key=pack)["Body"].read())
    data[0] ^= 0xFF  # a value's first byte
    client.put_object(Bucket=s3_server.bucket, Key=pack, Body=bytes(data))
    bad = make_conn(db_key=sibling(db_key, "bad"))
    with ebooklet.open(conn, three_commits, "r") as db, pytest.raises(IntegrityError, match="md5"):
        db.copy_remote(bad, server_side=False)
    assert owned(objects(s3_server, bad.db_key), bad.db_key) & {bad.db_key, bad.db_key + fmt.LOCK_NAME} == set()


def test_copy_remote_from_a_public_url(three_commits: Path, public_url: str, make_conn: Callable[..., Any],
                                       db_key: str, tmp_path: Path) -> None:
    """A public reader can copy a database it cannot list: streamed, every value checked."""
    target = make_conn(db_key=sibling(db_key, "mine"))
    with ebooklet.open(public_url, tmp_path / "pub.blt") as db:
        result = db.copy_remote(target)
    assert not result.server_side and result.objects_copied >= 2
    with ebooklet.open(target, tmp_path / "mine.blt") as copy:
        assert dict(copy.items()) == {"a": "A2", "b": "B1", "c": "C3"}
    assert ebooklet.check(target).ok


def test_copy_remote_across_credentials_streams(
    three_commits: Path, conn: Any, make_conn: Callable[..., Any], db_key: str, s3_server: Any,
    tmp_path: Path
) -> None:
    """Other credentials (moto accepts any) cannot CopyObject from us: the copy streams."""
    if not s3_server.is_local:
        pytest.skip("needs a second set of credentials: moto_server only")
    target = make_conn(db_key=sibling(db_key, "other"), access_key_id="AKIAOTHER", access_key="other-secret")
    with ebooklet.open(conn, three_commits, "r") as db:
        assert not db.copy_remote(target).server_side
        with pytest.raises(ValueError, match="server_side=True"):
            db.copy_remote(target, overwrite=True, server_side=True)
    with ebooklet.open(target, tmp_path / "other.blt") as copy:
        assert copy["a"] == "A2"


def test_copy_remote_streams_a_large_value_in_bounded_memory(
    conn: Any, make_conn: Callable[..., Any], db_key: str, tmp_path: Path
) -> None:
    """A 40 MiB value (a pack of its own) is copied part by part, never held whole."""
    big = uuid.uuid4().bytes * (40 << 16)  # 40 MiB, not all equal bytes
    path = tmp_path / "big.blt"
    push(conn, path, {"big": big, "small": b"x"}, value_serializer="bytes")
    source = make_conn(threads=2)
    target = make_conn(db_key=sibling(db_key, "bigcopy"), threads=2)
    with ebooklet.open(source, path, "r") as db:
        tracemalloc.start()
        try:
            result = db.copy_remote(target, server_side=False)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert result.bytes_copied > len(big)
    assert peak < len(big), f"peak {peak >> 20} MiB"
    with ebooklet.open(target, tmp_path / "bigcopy.blt") as copy:
        assert hashlib.md5(copy["big"]).digest() == hashlib.md5(big).digest()


def test_copy_remote_refuses_an_existing_database_unless_asked(
    three_commits: Path, conn: Any, make_conn: Callable[..., Any], db_key: str, s3_server: Any,
    tmp_path: Path
) -> None:
    target = make_conn(db_key=sibling(db_key, "taken"))
    push(target, tmp_path / "taken.blt", {"old": "value"}, message="theirs")
    before = objects(s3_server, target.db_key)
    with ebooklet.open(conn, three_commits, "r") as db:
        with pytest.raises(RemoteExistsError):
            db.copy_remote(target)
        assert objects(s3_server, target.db_key) == before
        result = db.copy_remote(target, overwrite=True)
    assert result.seq == 2
    with ebooklet.open(target, tmp_path / "check.blt") as copy:
        assert dict(copy.items()) == {"a": "A2", "b": "B1", "c": "C3"}
        assert [c.message for c in copy.history()][1:] == ["theirs"]


def test_copy_remote_rejects_bad_targets(three_commits: Path, conn: Any, make_conn: Callable[..., Any],
                                         db_key: str, public_url: str) -> None:
    with ebooklet.open(conn, three_commits, "r") as db:
        with pytest.raises(TypeError):
            db.copy_remote(public_url)
        with pytest.raises(ReadOnlyError):
            db.copy_remote(ebooklet.S3Connection(db_url=public_url))
        with pytest.raises(ValueError, match="onto itself"):
            db.copy_remote(make_conn())
        with pytest.raises(ValueError, match="onto itself"):
            db.copy_remote(make_conn(db_key=db_key + ".ebk/inside"))


def test_copy_object_uses_multipart_copy_above_the_single_copy_limit(conn: Any, s3_server: Any,
                                                                    make_conn: Callable[..., Any],
                                                                    db_key: str) -> None:
    """Objects over 5 GiB need UploadPartCopy; shown here with the limit lowered to 5 MiB."""
    data = uuid.uuid4().bytes * (6 << 16)  # 6 MiB
    conn.put(".ebk/pack/big", data)
    target = make_conn(db_key=sibling(db_key, "mp"))
    etag = target.copy_object(conn, ".ebk/pack/big", len(data), max_single=5 << 20, part_size=5 << 20)
    assert etag.strip('"').endswith("-2")
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=target.db_key + ".ebk/pack/big")
    assert body["Body"].read() == data


# --------------------------------------------------------------------------- connection groups


@pytest.fixture
def two_databases(make_conn: Callable[..., Any], db_key: str, tmp_path: Path) -> tuple[Any, Any]:
    a, b = make_conn(db_key=sibling(db_key, "a")), make_conn(db_key=sibling(db_key, "b"))
    with ebooklet.open(a, tmp_path / "a.blt", "c", value_serializer="orjson") as db:
        db.update({"x": 1, "y": 2})
        db.set_metadata({"owner": "team a"})
        db.changes().push()
    push(b, tmp_path / "b.blt", {"z": "zz"}, message="b1")
    return a, b


def test_group_entries_describe_each_database(two_databases: tuple[Any, Any], make_conn: Callable[..., Any],
                                              db_key: str, reader: Any, s3_server: Any,
                                              tmp_path: Path) -> None:
    a, b = two_databases
    group_conn = make_conn(db_key=sibling(db_key, "group"))
    with ebooklet.open(group_conn, tmp_path / "g.blt", "c", remote_conn_group=True) as group:
        uuid_a = group.add(a)
        uuid_b = group.add(reader(b))
        assert set(group) == {uuid_a, uuid_b} and len(group) == 2
        group.changes().push()
    with ebooklet.open(a, tmp_path / "a.blt") as db:
        last = db.history()[0]
    with ebooklet.open_rcg(reader(group_conn), tmp_path / "g2.blt") as group:
        entry = group[uuid_a]
        assert (entry["bucket"], entry["db_key"], entry["endpoint_url"]) == (a.bucket, a.db_key, a.endpoint_url)
        assert entry["n_keys"] == 2 and entry["n_bytes"] == last.n_bytes
        assert entry["last_commit"] == last.timestamp and entry["seq"] == 1
        assert entry["metadata"] == {"owner": "team a"}
        assert group[uuid_b]["n_keys"] == 1
        member = group.connection(uuid_a, s3_server.access_key_id, s3_server.access_key,
                                  endpoint_url=s3_server.endpoint_url, bucket=a.bucket)
        with ebooklet.open(member, tmp_path / "via-group.blt") as db:
            assert db["x"] == 1


def test_group_add_is_the_only_way_in(two_databases: tuple[Any, Any], make_conn: Callable[..., Any],
                                      db_key: str, tmp_path: Path) -> None:
    a, _ = two_databases
    with ebooklet.open_rcg(make_conn(db_key=sibling(db_key, "group")), tmp_path / "g.blt", "c") as group:
        for attempt in (lambda: group.set("k", {}), lambda: group.__setitem__("k", {}),
                        lambda: group.update({"k": {}})):
            with pytest.raises(TypeError, match="add"):
                attempt()
        with pytest.raises(RemoteNotFoundError):
            group.add(make_conn(db_key=sibling(db_key, "nothing-here")))
        assert len(group) == 0
        uuid_a = group.add(a)
        del group[uuid_a]
        assert uuid_a not in group
    with pytest.raises(EBookletError, match="not a remote connection group"):
        ebooklet.open_rcg(a, tmp_path / "a-as-group.blt", "r")
    with pytest.raises(ValueError):
        ebooklet.open_rcg(a, tmp_path / "x.blt", "c", value_serializer="pickle")


def test_groups_push_and_pull(two_databases: tuple[Any, Any], make_conn: Callable[..., Any],
                              db_key: str, tmp_path: Path) -> None:
    a, b = two_databases
    group_conn = make_conn(db_key=sibling(db_key, "group"))
    with ebooklet.open_rcg(group_conn, tmp_path / "g1.blt", "c") as group:
        uuid_a = group.add(a)
        group.changes().push()
    with ebooklet.open_rcg(group_conn, tmp_path / "g2.blt", "r") as follower:
        assert list(follower) == [uuid_a]
        with ebooklet.open_rcg(group_conn, tmp_path / "g1.blt", "w") as group:
            uuid_b = group.add(b)
            del group[uuid_a]
            group.changes().push()
        follower.pull()
        assert list(follower) == [uuid_b]


def test_no_credential_reaches_the_group_file_or_the_bucket(
    two_databases: tuple[Any, Any], make_conn: Callable[..., Any], s3_server: Any, db_key: str,
    tmp_path: Path
) -> None:
    """Grep the bytes of every local file and every object of the test for the secret."""
    if s3_server.is_local:  # moto's own secret ("testing") is too common a word to grep for
        key_id, secret = "AKIA" + uuid.uuid4().hex[:16].upper(), uuid.uuid4().hex + uuid.uuid4().hex
    else:
        key_id, secret = s3_server.access_key_id, s3_server.access_key
    creds = {"access_key_id": key_id, "access_key": secret}
    a, b = two_databases
    with ebooklet.open_rcg(make_conn(db_key=sibling(db_key, "group"), **creds), tmp_path / "g.blt", "c") as group:
        group.add(make_conn(db_key=a.db_key, **creds))
        group.add(make_conn(db_key=b.db_key, **creds))
        group.changes().push()
        assert secret not in repr(group) + repr(list(group.items()))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "g.blt" for p in files)
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
        assert key_id.encode() not in p.read_bytes(), p
    stored = objects(s3_server, db_key.rpartition("/")[0])
    assert stored
    for key, body in stored.items():
        assert secret.encode() not in body, key
        assert key_id.encode() not in body, key


# --------------------------------------------------------------------------- vacuum


def test_vacuum_keep_1_leaves_no_deleted_or_overwritten_value_downloadable(
    conn: Any, db_key: str, s3_server: Any, reader: Any, tmp_path: Path
) -> None:
    """Users delete secrets and expect them gone: list and fetch every object afterwards."""
    secret, gone_key, gone_value = (f"{name}-{uuid.uuid4().hex}" for name in ("S3CRET", "gone-key", "GONE"))
    path = tmp_path / "w.blt"
    keep = {f"k{i}": f"value {i}" for i in range(20)}
    first_k0 = f"first k0 {uuid.uuid4().hex}"
    push(conn, path, {**keep, "k0": first_k0, "password": secret, gone_key: gone_value}, message="oops")
    push(conn, path, {"password": "rotated"}, (gone_key,), message="fix")
    push(conn, path, {"k0": "value 0"}, message="later")
    prefix = db_key.rpartition("/")[0]
    assert any(secret.encode() in body for body in objects(s3_server, prefix).values())
    with ebooklet.open(conn, path, "w") as db:
        result = db.vacuum(keep=1)
    assert result.commits_kept == [3] and result.commits_removed == [2, 1]
    assert result.packs_rewritten >= 1 and result.bytes_reclaimed > 0
    assert result.packs_removed >= 1 and result.records_removed >= 2
    for key, body in objects(s3_server, prefix).items():
        for needle in (secret, gone_key, gone_value, first_k0):
            assert needle.encode() not in body, (needle, key)
    with ebooklet.open(reader(), tmp_path / "fresh.blt", value_serializer="pickle") as db:
        assert dict(db.items()) == {**keep, "password": "rotated"}
        assert [(c.seq, c.message) for c in db.history()] == [(3, "later")]
    report = ebooklet.check(conn)
    assert report.ok and report.orphans == []


def test_vacuum_keep_1_in_a_versioned_bucket_removes_old_versions(
    versioned: tuple[str, Any], s3_server: Any, tmp_path: Path
) -> None:
    bucket, conn = versioned
    secret = f"S3CRET-{uuid.uuid4().hex}"
    path = tmp_path / "v.blt"
    push(conn, path, {"password": secret, "other": "kept"})
    push(conn, path, {"password": "rotated"})
    with ebooklet.open(conn, path, "w") as db:
        db.vacuum(keep=1)
        assert db["password"] == "rotated" and db["other"] == "kept"
    versions = all_versions(s3_server, bucket, "v/db")
    assert not [key for (key, _), body in versions.items() if secret.encode() in body]
    assert len([key for key, _ in versions if key == "v/db"]) == 1  # only the current manifest


def test_vacuum_keep_n_keeps_those_commits_openable(conn: Any, reader: Any, tmp_path: Path) -> None:
    path = tmp_path / "w.blt"
    for i in range(4):
        push(conn, path, {f"k{i}": i, "counter": i}, message=f"c{i + 1}")
    with ebooklet.open(conn, path, "w") as db:
        result = db.vacuum(keep=2)
    assert result.commits_kept == [4, 3] and result.commits_removed == [2, 1]
    with ebooklet.open(reader(), tmp_path / "snap.blt", "r", commit=3, value_serializer="pickle") as snap:
        assert dict(snap.items()) == {"k0": 0, "k1": 1, "k2": 2, "counter": 2}
    with pytest.raises(RemoteNotFoundError, match="vacuum"):
        ebooklet.open(reader(), tmp_path / "snap2.blt", "r", commit=2)
    with ebooklet.open(reader(), tmp_path / "r.blt", value_serializer="pickle") as db:
        assert [c.message for c in db.history()] == ["c4", "c3"]
        assert [(d.kind, d.key) for d in db.diff(3, 4)] == [("modified", "counter"), ("added", "k3")]
    assert ebooklet.check(conn).orphans == []


def test_vacuum_older_than(conn: Any, tmp_path: Path) -> None:
    """Commits older than the cutoff go (never the head); with keep too, both must agree."""
    path = tmp_path / "w.blt"
    for i in range(4):
        push(conn, path, {"k": i})
    with ebooklet.open(conn, path, "w") as db:
        cutoff = db.history()[2].time  # commit 2
        assert db.vacuum(older_than=cutoff, keep=3).commits_kept == [4, 3, 2]
        assert db.vacuum(older_than=cutoff.isoformat()).commits_kept == [4, 3, 2]
        assert db.vacuum(older_than=timedelta(0), keep=2).commits_kept == [4, 3]
        assert db.vacuum(older_than=timedelta(0)).commits_kept == [4]
        assert db["k"] == 3


def test_vacuum_by_default_only_removes_what_no_commit_references(
    three_commits: Path, conn: Any, db_key: str, s3_server: Any, tmp_path: Path
) -> None:
    """Leftovers of interrupted pushes go; history stays; foreign objects are left alone."""
    client = s3_server.client()
    junk = {
        db_key + fmt.pack_name(b"\x01" * 16): b"an orphan pack",
        db_key + fmt.commit_name(9, "e" * 32): b"{}",
        db_key + fmt.shard_name("e" * 32, 0): b"an orphan shard",
        db_key + fmt.PREFIX + "probe-" + "f" * 32: b"probe",  # a writer crashed mid-probe
    }
    foreign = {db_key + ".ebk/notes.txt": b"mine", db_key + "2": b"sibling"}
    for key, body in {**junk, **foreign}.items():
        client.put_object(Bucket=s3_server.bucket, Key=key, Body=body)
    found = ebooklet.check(conn)
    assert found.ok
    assert {db_key + n for n in found.orphans} == {*junk, db_key + ".ebk/notes.txt"}
    with ebooklet.open(conn, three_commits, "w") as db:
        result = db.vacuum()
        assert [c.seq for c in db.history()] == [3, 2, 1]
    assert (result.packs_removed, result.shards_removed, result.records_removed) == (1, 1, 1)
    assert result.commits_removed == [] and result.packs_rewritten == 0
    assert result.unknown == [".ebk/notes.txt"]
    left = objects(s3_server, db_key)
    assert not set(junk) & set(left) and all(left[k] == v for k, v in foreign.items())
    assert ebooklet.check(conn).orphans == [".ebk/notes.txt"]


def test_vacuum_rewrites_mostly_dead_packs_and_relays_kept_commits(
    conn: Any, db_key: str, s3_server: Any, reader: Any, tmp_path: Path
) -> None:
    """keep=2: commit 1's pack is 90 % dead, so its live value moves; commit 2 stays openable."""
    path = tmp_path / "w.blt"
    old = {f"k{i}": f"old-{i}-{uuid.uuid4().hex}" * 40 for i in range(10)}
    push(conn, path, old, message="one")
    push(conn, path, {f"k{i}": f"new {i}" for i in range(1, 10)}, message="two")
    push(conn, path, {"extra": "x"}, message="three")
    with ebooklet.open(conn, path, "w") as db:
        result = db.vacuum(keep=2)
        assert db["k0"] == old["k0"]
    assert result.commits_kept == [3, 2] and result.packs_rewritten == 1
    with ebooklet.open(reader(), tmp_path / "snap.blt", "r", commit=2, value_serializer="pickle") as snap:
        assert snap["k0"] == old["k0"] and snap["k5"] == "new 5"
    with ebooklet.open(reader(), tmp_path / "r.blt", value_serializer="pickle") as db:
        assert [(c.seq, c.message) for c in db.history()] == [(3, "three"), (2, "two")]
    bodies = objects(s3_server, db_key)
    for i in range(1, 10):
        assert not [k for k, body in bodies.items() if old[f"k{i}"].encode() in body]
    report = ebooklet.check(conn)
    assert report.ok and report.orphans == []


def test_copies_opened_before_a_vacuum_read_the_values_it_moved(
    conn: Any, db_key: str, s3_server: Any, reader: Any, tmp_path: Path
) -> None:
    """vacuum(keep=1) rewrites a mostly dead pack and the index, then deletes the old
    ones: copies that read the manifest before find every value where it lies now, key
    by key or all at once, without reopening. A pack deleted behind ebooklet's back is
    still an error."""
    path = tmp_path / "w.blt"
    old = {f"k{i}": f"old-{i}-{uuid.uuid4().hex}" * 40 for i in range(10)}
    push(conn, path, old, message="one")
    push(conn, path, {f"k{i}": f"new {i}" for i in range(1, 10)}, message="two")
    expected = {"k0": old["k0"], **{f"k{i}": f"new {i}" for i in range(1, 10)}}
    with (
        ebooklet.open(reader(), tmp_path / "one.blt", value_serializer="pickle") as one_by_one,
        ebooklet.open(reader(), tmp_path / "all.blt", value_serializer="pickle") as all_at_once,
    ):
        assert one_by_one["k5"] == "new 5"  # its index shard is local now
        with ebooklet.open(conn, path, "w") as db:
            assert db.vacuum(keep=1).packs_rewritten == 1
        assert one_by_one["k0"] == old["k0"]  # from the rewritten pack
        assert dict(all_at_once.items()) == expected
    assert ebooklet.check(conn).ok
    with ebooklet.open(reader(), tmp_path / "late.blt", value_serializer="pickle") as late:
        assert late["k5"] == "new 5"
        pack = fmt.pack_name(late._replica.remote.entry(late._replica.codec.encode_key("k1")).pack)
        s3_server.client().delete_object(Bucket=s3_server.bucket, Key=db_key + pack)
        with pytest.raises(RemoteNotFoundError):
            late["k1"]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"keep": 0}, ValueError),
        ({"keep": True}, ValueError),
        ({"keep": "1"}, ValueError),
        ({"older_than": "last tuesday"}, ValueError),
        ({"older_than": [1]}, TypeError),
        ({"rewrite_below": 1.5}, ValueError),
    ],
)
def test_vacuum_rejects_bad_arguments(three_commits: Path, conn: Any, kwargs: dict, error: type) -> None:
    with ebooklet.open(conn, three_commits, "w") as db:
        with pytest.raises(error):
            db.vacuum(**kwargs)
        assert [c.seq for c in db.history()] == [3, 2, 1]


def test_snapshots_cannot_be_vacuumed_or_deleted(three_commits: Path, conn: Any, tmp_path: Path) -> None:
    with ebooklet.open(conn, tmp_path / "snap.blt", "r", commit=2) as snap:
        for operation in (snap.vacuum, snap.delete_remote):
            with pytest.raises(ReadOnlyError, match="snapshot"):
                operation()


def test_push_after_another_client_vacuumed_its_uploads_away(conn: Any, make_conn: Callable[..., Any],
                                                             reader: Any, tmp_path: Path) -> None:
    """A push that failed before committing journals its uploaded packs for reuse.

    Vacuum run by someone else deletes them (nothing references them); the next
    push must upload the value again rather than commit a reference to a missing pack.
    """
    path = tmp_path / "w.blt"
    push(conn, path, {"a": "1"})
    with ebooklet.open(conn, path, "w") as db:
        db["b"] = "the value"
        # the state a push interrupted between its uploads and its commit leaves behind
        replica = db._replica
        kb = replica.codec.encode_key("b")
        ts, raw = replica.cached("b")
        uploaded = replica.remote.upload_pack([(kb, raw, fmt.md5(raw), ts)])
        replica.log.record_pack(uploaded.pack, uploaded.footer)
    with ebooklet.open(make_conn(), tmp_path / "admin.blt", "r", value_serializer="pickle") as admin:
        assert admin.vacuum().packs_removed == 1
    push(conn, path)
    assert ebooklet.check(conn).ok
    with ebooklet.open(reader(), tmp_path / "r.blt", value_serializer="pickle") as db:
        assert db["b"] == "the value"


# --------------------------------------------------------------------------- check


def test_check_verifies_without_changing_anything(three_commits: Path, conn: Any, db_key: str,
                                                  s3_server: Any, reader: Any) -> None:
    remote = reader()
    report = ebooklet.check(remote)
    assert report.ok and report.seq == 3 and report.values_checked == 3
    assert report.orphans == ([] if isinstance(remote, ebooklet.S3Connection) else None)
    assert ebooklet.check(remote, sample=2, seed=1).values_checked == 2
    assert ebooklet.check(remote, sample=0.5).values_checked == 2

    client = s3_server.client()
    before = objects(s3_server, db_key)
    with ebooklet.open(conn, three_commits) as db:
        shard = db_key + fmt.shard_name_at(db._replica.remote.manifest, 0)
        entry = db._replica.remote.entry(b"b")  # a live value
    pack = db_key + fmt.pack_name(entry.pack)
    corrupt = bytearray(before[pack])
    corrupt[entry.offset] ^= 0xFF
    client.put_object(Bucket=s3_server.bucket, Key=pack, Body=bytes(corrupt))
    report = ebooklet.check(remote)
    assert not report.ok and len(report.corrupt) == 1 and "b'b'" in report.corrupt[0]
    client.delete_object(Bucket=s3_server.bucket, Key=shard)
    report = ebooklet.check(remote)
    assert not report.ok and report.missing == [shard[len(db_key):]]
    assert set(objects(s3_server, db_key)) == set(before) - {shard}
    with pytest.raises(ValueError):
        ebooklet.check(remote, sample=-1)


def test_check_of_nothing_is_not_found(conn: Any) -> None:
    with pytest.raises(RemoteNotFoundError):
        ebooklet.check(conn)
