"""Behaviour 10: bad input raises a clear typed error and loses nothing.

Every test that provokes an error afterwards reads the data back (locally and from a
fresh copy) to show that local edits and the remote database survived it.
"""

from __future__ import annotations

import datetime
import http.client
import json
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ebooklet
from conftest import LOCAL_REGION, S3Target
from ebooklet import (
    AuthError,
    FormatVersionError,
    IntegrityError,
    OfflineError,
    OfflineWarning,
    ReadOnlyError,
    RemoteNotFoundError,
    SerializationError,
)
from ebooklet.server import LocalS3Server, find_free_port

VALUES = {f"k{i}": {"n": i, "text": "x" * i} for i in range(20)}
LOCAL_SUFFIXES = ("", ".local_hash", ".remote_index", ".ebk.json")
"""The local files of a database at path ``P`` are ``P + suffix``."""


# --------------------------------------------------------------------------- helpers


def seed(remote: Any, path: Path, values: dict = VALUES, serializer: str = "pickle") -> dict:
    """Create the database with ``values`` and push it; returns a copy of ``values``."""
    with ebooklet.open(remote, path, "n", value_serializer=serializer) as db:
        db.update(values)
        assert db.changes().push().committed
    return dict(values)


def read_back(remote: Any, path: Path) -> dict:
    """Every item of the database, read through ``remote`` into ``path`` (read-only);
    the test's own database, so whatever serializer it records is allowed."""
    with ebooklet.open(remote, path, "r", trust_serializers=True) as db:
        return dict(db.items())


def local_files(path: Path) -> dict[str, bytes]:
    """The bytes of every local file of the database at ``path``."""
    return {
        suffix: Path(f"{path}{suffix}").read_bytes()
        for suffix in LOCAL_SUFFIXES
        if Path(f"{path}{suffix}").exists()
    }


def remote_objects(target: S3Target, db_key: str) -> dict[str, bytes]:
    """The bytes of every object of the database (its lock and probes left out)."""
    client = target.client()
    found = {}
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=db_key)
    for page in pages:
        for obj in page.get("Contents", []):
            key = obj["Key"]
            owned = key == db_key or key.startswith(db_key + ".ebk/")
            if owned and not key.endswith(".ebk/lock") and "/probe-" not in key:
                found[key] = client.get_object(Bucket=target.bucket, Key=key)["Body"].read()
    return found


def with_pending_edit(conn: Any, path: Path) -> None:
    """Leave one unpushed edit (``k1``) in the local copy at ``path``."""
    with ebooklet.open(conn, path, "w") as db:
        db["k1"] = "edited"


def assert_pending_edit_survives(conn: Any, path: Path, tmp_path: Path, values: dict) -> None:
    """The edit left by :func:`with_pending_edit` is still pending and pushes fine."""
    with ebooklet.open(conn, path, "w") as db:
        assert db["k1"] == "edited"
        assert [(c.kind, c.key) for c in db.changes().iter_changes()] == [("modified", "k1")]
        assert db.changes().push().keys_pushed == 1
    assert read_back(conn, tmp_path / f"check-{uuid.uuid4().hex[:6]}") == {**values, "k1": "edited"}


def put_object(target: S3Target, key: str, body: bytes) -> None:
    target.client().put_object(Bucket=target.bucket, Key=key, Body=body)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("flag", ["x", "rw", "", "R", None, 1, b"r"])
def test_bad_flag_is_a_value_error(conn: Any, tmp_path: Path, flag: Any) -> None:
    with pytest.raises(ValueError, match="flag"):
        ebooklet.open(conn, tmp_path / "db", flag)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("file_path", [123, None, 1.5, ["db"]])
def test_bad_file_path_is_a_type_error(conn: Any, file_path: Any) -> None:
    with pytest.raises(TypeError, match="file_path"):
        ebooklet.open(conn, file_path, "c")


@pytest.mark.parametrize("remote", [1, b"http://127.0.0.1/b/db", {"bucket": "b"}, object()])
def test_bad_remote_is_a_type_error(tmp_path: Path, remote: Any) -> None:
    with pytest.raises(TypeError, match="remote"):
        ebooklet.open(remote, tmp_path / "db", "c")
    assert list(tmp_path.iterdir()) == []


GOOD_CONNECTION = dict(
    access_key_id="id", access_key="secret", db_key="a/db", bucket="bkt",
    endpoint_url="http://127.0.0.1:9",
)
STR_ERR, NUM_ERR = TypeError, (TypeError, ValueError)
BAD_CONNECTION = [
    # (changed arguments, expected error, word the message must contain)
    (dict(access_key_id=1), STR_ERR, "access_key_id"),
    (dict(access_key=b"secret"), STR_ERR, "access_key"),
    (dict(access_key=None), ValueError, "access_key"),
    (dict(db_key=5), STR_ERR, "db_key"),
    (dict(db_key=""), ValueError, "db_key"),
    (dict(db_key="a/db/"), ValueError, "db_key"),
    (dict(db_key="/a/db"), ValueError, "db_key"),
    (dict(bucket=["bkt"]), STR_ERR, "bucket"),
    (dict(bucket=None), ValueError, "bucket"),
    (dict(endpoint_url=9000), STR_ERR, "endpoint_url"),
    (dict(endpoint_url="ftp://127.0.0.1"), ValueError, "endpoint_url"),
    (dict(endpoint_url="127.0.0.1:9000"), ValueError, "endpoint_url"),
    (dict(db_url="s3://bkt/a/db"), ValueError, "db_url"),
    (dict(region=1), STR_ERR, "region"),
    (dict(threads=0), NUM_ERR, "threads"),
    (dict(threads=2.5), NUM_ERR, "threads"),
    (dict(threads="4"), NUM_ERR, "threads"),
    (dict(retries=-1), NUM_ERR, "retries"),
    (dict(timeout=0), NUM_ERR, "timeout"),
    (dict(timeout="30"), NUM_ERR, "timeout"),
    (dict(session_token=5), STR_ERR, "session_token"),
    (dict(access_key_id=None, access_key=None, session_token="token"), ValueError, "session_token"),
]


@pytest.mark.parametrize(
    "changes, error, word", BAD_CONNECTION, ids=[next(iter(c)) + "=" + repr(next(iter(c.values())))
                                                  for c, _, _ in BAD_CONNECTION]
)
def test_s3connection_rejects_bad_arguments(changes: dict, error: Any, word: str) -> None:
    with pytest.raises(error, match=word) as info:
        ebooklet.S3Connection(**{**GOOD_CONNECTION, **changes})
    assert "secret" not in str(info.value).replace("access_key", "")


def test_s3connection_needs_a_location() -> None:
    with pytest.raises(ValueError, match="db_url"):
        ebooklet.S3Connection()
    with pytest.raises(ValueError, match="db_url"):
        ebooklet.S3Connection("id", "secret")


# --------------------------------------------------------------------------- read-only


@pytest.mark.parametrize("flag", ["w", "c", "n"])
@pytest.mark.parametrize("form", ["url", "db_url connection"])
def test_public_url_with_a_write_flag_is_read_only(
    s3_server: S3Target, conn: Any, db_key: str, tmp_path: Path, flag: str, form: str
) -> None:
    """Refused before anything is touched: even 'n' keeps the existing local copy."""
    values = seed(conn, tmp_path / "db")
    with_pending_edit(conn, tmp_path / "db")
    before_local, before_remote = local_files(tmp_path / "db"), remote_objects(s3_server, db_key)
    remote = conn.db_url if form == "url" else ebooklet.S3Connection(db_url=conn.db_url)
    with pytest.raises(ReadOnlyError, match="read|'r'"):
        ebooklet.open(remote, tmp_path / "db", flag)
    assert local_files(tmp_path / "db") == before_local
    assert remote_objects(s3_server, db_key) == before_remote
    assert_pending_edit_survives(conn, tmp_path / "db", tmp_path, values)


WRITE_OPS: dict[str, Callable[[Any], Any]] = {
    "setitem": lambda db: db.__setitem__("k1", 0),
    "set": lambda db: db.set("new", 0),
    "update": lambda db: db.update({"k1": 0, "new": 0}),
    "setdefault": lambda db: db.setdefault("new", 0),
    "delitem": lambda db: db.__delitem__("k1"),
    "pop": lambda db: db.pop("k1"),
    "popitem": lambda db: db.popitem(),
    "clear": lambda db: db.clear(),
    "set_timestamp": lambda db: db.set_timestamp("k1", 1_000_000),
    "set_metadata": lambda db: db.set_metadata({"a": 1}),
    "prune": lambda db: db.prune(),
    "get_local_hash": lambda db: db.get_local_hash(),
    "push": lambda db: db.changes().push(),
    "discard": lambda db: db.changes().discard(),
}


def test_every_write_on_a_read_only_database_is_refused(
    s3_server: S3Target, conn: Any, db_key: str, reader: Any, tmp_path: Path
) -> None:
    values = seed(conn, tmp_path / "writer")
    before_remote = remote_objects(s3_server, db_key)
    with ebooklet.open(reader(conn), tmp_path / "ro", "r", value_serializer="pickle") as db:
        assert not db.writable
        for name, op in WRITE_OPS.items():
            with pytest.raises(ReadOnlyError):
                op(db)
                pytest.fail(f"{name} wrote on a read-only database")
        assert dict(db.items()) == values
        assert list(db.changes().iter_changes()) == []
    assert remote_objects(s3_server, db_key) == before_remote
    assert read_back(reader(conn), tmp_path / "again") == values


# --------------------------------------------------------------------------- serializers

BAD_WRITES: dict[str, Callable[[Any], Any]] = {
    "setitem new key": lambda db: db.__setitem__("new", object()),
    "setitem remote key": lambda db: db.__setitem__("k1", {1, 2}),
    "set": lambda db: db.set("new", object()),
    "update with one bad value": lambda db: db.update({"good": 1, "k1": object()}),
    "setdefault": lambda db: db.setdefault("new", object()),
    "int key with str key serializer": lambda db: db.__setitem__(5, 1),
    "bytes key with str key serializer": lambda db: db.update({"good": 1, b"k": 1}),
}


@pytest.mark.parametrize("write", BAD_WRITES.values(), ids=BAD_WRITES.keys())
def test_unencodable_key_or_value_writes_nothing(
    s3_server: S3Target, conn: Any, db_key: str, tmp_path: Path, write: Callable
) -> None:
    values = seed(conn, tmp_path / "db", serializer="json")
    before_remote = remote_objects(s3_server, db_key)
    with ebooklet.open(conn, tmp_path / "db", "w") as db:
        with pytest.raises(SerializationError, match="serializer") as info:
            write(db)
        assert isinstance(info.value, TypeError)  # also catchable as a TypeError
        assert "new" not in db and "good" not in db
        assert db["k1"] == values["k1"]
        assert len(db) == len(values)
        assert list(db.changes().iter_changes()) == []
        assert not db.changes().push().committed
    assert remote_objects(s3_server, db_key) == before_remote
    assert read_back(conn, tmp_path / "fresh") == values


LONG_KEY = "k" * 70_000  # keys are at most 65,535 bytes in the local file
NAIVE = datetime.datetime(2024, 1, 1)  # no timezone
BAD_ARGUMENTS = {
    "key too long": (lambda db: db.__setitem__(LONG_KEY, 1), ValueError, "at most"),
    "update with one key too long": (lambda db: db.update({"good": 1, LONG_KEY: 2}), ValueError, "at most"),
    "naive datetime": (lambda db: db.set("new", 1, timestamp=NAIVE), ValueError, "timezone"),
    "ISO string without zone": (lambda db: db.set("new", 1, timestamp="2024-01-01T00:00"), ValueError, "timezone"),
    "negative timestamp": (lambda db: db.set("new", 1, timestamp=-1), ValueError, "range"),
    "float timestamp": (lambda db: db.set("new", 1, timestamp=1.5), TypeError, "timestamp"),
    "set_timestamp naive": (lambda db: db.set_timestamp("k1", NAIVE), ValueError, "timezone"),
}


@pytest.mark.parametrize(("write", "error", "word"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_key_length_or_timestamp_writes_nothing(
    conn: Any, tmp_path: Path, write: Callable, error: type, word: str
) -> None:
    values = seed(conn, tmp_path / "db", serializer="json")
    with ebooklet.open(conn, tmp_path / "db", "w") as db:
        stamp = db.get_timestamp("k1")
        with pytest.raises(error, match=word) as info:
            write(db)
        assert len(str(info.value)) < 300  # the long key is not spelt out
        assert "new" not in db and "good" not in db and LONG_KEY not in db
        assert db["k1"] == values["k1"] and db.get_timestamp("k1") == stamp
        assert list(db.changes().iter_changes()) == []


def test_a_value_too_long_for_the_local_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ebooklet.format, "VALUE_MAX", 100)  # 4 GiB - 1 byte in truth
    with ebooklet.open(None, tmp_path / "db", "n", value_serializer="bytes") as db:
        with pytest.raises(ValueError, match="Split it"):
            db["big"] = b"x" * 101
        db["small"] = b"x" * 100
        assert list(db.keys()) == ["small"]
        assert [c.key for c in db.changes().iter_changes()] == ["small"]


# --------------------------------------------------------------------------- local damage


@pytest.mark.parametrize("suffix", LOCAL_SUFFIXES, ids=lambda s: s or "data file")
def test_corrupted_local_file_is_an_integrity_error(
    s3_server: S3Target, conn: Any, db_key: str, tmp_path: Path, suffix: str
) -> None:
    """Open fails with IntegrityError; the remote is untouched and readable elsewhere;
    removing the damaged file, as the message says, gives a working copy again."""
    path = tmp_path / "db"
    values = seed(conn, path)
    with_pending_edit(conn, path)
    before_remote = remote_objects(s3_server, db_key)
    damaged = Path(f"{path}{suffix}")
    with damaged.open("r+b") as f:
        f.write(b"\xde\xad\xbe\xef" * 64)

    # A damaged journal is moved aside by the first open that finds it (kept, see
    # test_local_damage.py), so only that open fails.
    for flag in ("r",) if suffix == ".local_hash" else ("r", "w"):
        with pytest.raises(IntegrityError, match=damaged.name):
            ebooklet.open(conn, path, flag)
    assert remote_objects(s3_server, db_key) == before_remote
    assert read_back(conn, tmp_path / "fresh") == values

    damaged.unlink(missing_ok=True)
    if suffix == "":  # the unpushed value went with the data file; the pushed one is back
        with pytest.warns(RuntimeWarning, match="lost"):
            ebooklet.open(conn, path, "r").close()
        assert read_back(conn, path) == values
        return
    with ebooklet.open(conn, path, "w", value_serializer="pickle") as db:  # no lock was left behind by the failures
        if suffix == ".local_hash":
            assert db.get_local_hash() == 1  # rebuilt from the data file, as advised
    assert_pending_edit_survives(conn, path, tmp_path, values)


def test_newer_local_metadata_is_a_format_version_error(conn: Any, tmp_path: Path) -> None:
    path = tmp_path / "db"
    values = seed(conn, path)
    meta = Path(f"{path}.ebk.json")
    record = json.loads(meta.read_bytes())
    meta.write_text(json.dumps({**record, "version": record["version"] + 1}))
    with pytest.raises(FormatVersionError, match="upgrade"):
        ebooklet.open(conn, path, "r")
    assert read_back(conn, tmp_path / "fresh") == values


# --------------------------------------------------------------------------- remote damage


def the_object(target: S3Target, db_key: str, kind: str) -> str:
    """The one pack or index shard (``kind``) of a small database."""
    prefix = f"{db_key}.ebk/{kind}/"
    keys = [
        o["Key"]
        for o in target.client().list_objects_v2(Bucket=target.bucket, Prefix=prefix)["Contents"]
    ]
    assert len(keys) == 1, keys
    return keys[0]


def flip_first_byte(body: bytes) -> bytes:
    return bytes([body[0] ^ 0xFF]) + body[1:]


def flip_middle_byte(body: bytes) -> bytes:
    i = len(body) // 2
    return body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1 :]


REMOTE_DAMAGE = {
    # the first byte of a pack is the first value; a shard's checksum covers all of it
    ("pack", "flipped"): flip_first_byte,
    ("pack", "truncated"): lambda body: body[:10],
    ("index", "flipped"): flip_middle_byte,
    ("index", "truncated"): lambda body: body[: len(body) // 2],
}


@pytest.mark.parametrize("kind, damage", REMOTE_DAMAGE, ids=["-".join(k) for k in REMOTE_DAMAGE])
def test_corrupted_remote_object_is_an_integrity_error_and_nothing_is_cached(
    s3_server: S3Target, conn: Any, db_key: str, reader: Any, tmp_path: Path,
    kind: str, damage: str,
) -> None:
    values = seed(conn, tmp_path / "writer")
    key = the_object(s3_server, db_key, kind)
    good = remote_objects(s3_server, db_key)[key]
    put_object(s3_server, key, REMOTE_DAMAGE[kind, damage](good))
    with ebooklet.open(reader(conn), tmp_path / "reader", "r", value_serializer="pickle") as db:
        with pytest.raises(IntegrityError, match="corrupt|truncated"):
            dict(db.items())
        with pytest.raises(IntegrityError):
            db.load_items()
        put_object(s3_server, key, good)  # repaired: the same open copy now reads it all,
        assert dict(db.items()) == values  # so nothing damaged was kept locally
    assert read_back(reader(conn), tmp_path / "reader") == values


def _drop_shards(body: bytes) -> bytes:
    manifest = json.loads(body)
    del manifest["shards"]
    return json.dumps(manifest).encode()


def _newer(body: bytes) -> bytes:
    manifest = json.loads(body)
    return json.dumps({**manifest, "version": manifest["version"] + 1}).encode()


MANIFEST_DAMAGE = {
    "garbage": (lambda body: b"\x00\xffnot json at all", IntegrityError),
    "truncated": (lambda body: body[: len(body) // 2], IntegrityError),
    "empty": (lambda body: b"", IntegrityError),
    "foreign json": (lambda body: b'{"hello": "world"}', IntegrityError),
    "missing field": (_drop_shards, IntegrityError),
    "newer format": (_newer, FormatVersionError),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE.values(), ids=MANIFEST_DAMAGE.keys())
def test_bad_manifest_is_refused_and_never_overwritten(
    s3_server: S3Target, conn: Any, db_key: str, reader: Any, tmp_path: Path,
    damage: tuple[Callable[[bytes], bytes], type],
) -> None:
    """Readers and writers refuse the manifest; a writer's push does not replace it;
    once it is repaired the writer's pending edit is still there and pushes."""
    make_bad, error = damage
    path = tmp_path / "writer"
    values = seed(conn, path)
    good = remote_objects(s3_server, db_key)[db_key]
    bad = make_bad(good)
    with ebooklet.open(conn, path, "w") as db:
        db["k1"] = "edited"
        put_object(s3_server, db_key, bad)
        with pytest.raises(error):
            db.changes().push()
    assert remote_objects(s3_server, db_key)[db_key] == bad
    for remote, flag in ((reader(conn), "r"), (conn, "w")):
        with pytest.raises(error):
            ebooklet.open(remote, tmp_path / "fresh", flag)
        with pytest.raises(error):
            ebooklet.open(remote, path, flag)
    assert remote_objects(s3_server, db_key)[db_key] == bad
    put_object(s3_server, db_key, good)
    assert_pending_edit_survives(conn, path, tmp_path, values)


# --------------------------------------------------------------------------- credentials


def _enforce_auth(server: LocalS3Server) -> None:
    """From now on moto checks every request's signature and IAM permissions."""
    http_conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        http_conn.request("POST", "/moto-api/reset-auth", body=b"0")
        assert http_conn.getresponse().status == 200
    finally:
        http_conn.close()


@pytest.fixture(scope="module")
def auth_target(s3_server: S3Target) -> Iterator[S3Target]:
    """A target that checks credentials: the external endpoint, or a private moto server
    with an IAM user allowed ``s3:*`` and authentication enforced (moto's
    ``/moto-api/reset-auth``; by default moto accepts any key)."""
    if not s3_server.is_local:
        yield s3_server
        return
    import boto3

    with LocalS3Server(region=LOCAL_REGION) as server:
        server.create_bucket("auth-test", public=False)
        iam = boto3.client(
            "iam", endpoint_url=server.endpoint_url, region_name=LOCAL_REGION,
            aws_access_key_id=server.access_key_id, aws_secret_access_key=server.access_key,
        )
        iam.create_user(UserName="ebooklet")
        iam.put_user_policy(
            UserName="ebooklet",
            PolicyName="s3",
            PolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
            }),
        )
        key = iam.create_access_key(UserName="ebooklet")["AccessKey"]
        _enforce_auth(server)
        yield S3Target(
            endpoint_url=server.endpoint_url, access_key_id=key["AccessKeyId"],
            access_key=key["SecretAccessKey"], bucket="auth-test", region=LOCAL_REGION,
            public_base_url=None, is_local=True, server=server,
        )


BAD_CREDENTIALS = {
    "wrong secret": dict(access_key="not-the-secret-key"),
    "unknown key id": dict(access_key_id="AKIAEBOOKLETNOSUCHID", access_key="whatever"),
}


@pytest.mark.parametrize("flag", ["r", "w", "c"])
@pytest.mark.parametrize("bad", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
def test_wrong_credentials_are_an_auth_error(
    auth_target: S3Target, db_key: str, tmp_path: Path, flag: str, bad: dict
) -> None:
    good_conn = auth_target.connection(db_key)
    path = tmp_path / "db"
    values = seed(good_conn, path)
    with_pending_edit(good_conn, path)
    before_local = local_files(path)
    bad_conn = auth_target.connection(db_key, **bad)
    for where in (path, tmp_path / "fresh"):
        with pytest.raises(AuthError, match="access denied") as info:
            ebooklet.open(bad_conn, where, flag)
        assert bad["access_key"] not in str(info.value)
    assert local_files(path) == before_local
    assert_pending_edit_survives(good_conn, path, tmp_path, values)


def test_credentials_from_boto3s_chain_are_refreshed(
    auth_target: S3Target, db_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials found by boto3's chain (here a profile's ``credential_process``,
    as SSO and role credentials are) are asked for again as they near expiry: a
    rotated key is used by the next request, without reopening anything."""
    creds = tmp_path / "creds.json"

    def issue(secret: str) -> None:
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
        creds.write_text(json.dumps({
            "Version": 1, "AccessKeyId": auth_target.access_key_id, "SecretAccessKey": secret,
            "Expiration": expiry.isoformat(),  # within botocore's refresh window: asked each time
        }))

    config = tmp_path / "aws-config"
    config.write_text(f"[profile ebk-test]\ncredential_process = cat {creds}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_PROFILE", "ebk-test")
    issue(auth_target.access_key)
    chain = auth_target.connection(db_key, access_key_id=None, access_key=None)
    path = tmp_path / "db"
    values = seed(chain, path)
    with ebooklet.open(chain, path, "w") as db:
        issue("a-revoked-secret")
        db["k1"] = "edited"
        with pytest.raises(AuthError, match="access denied"):
            db.changes().push()  # signed with the new, wrong key: the chain was asked again
        issue(auth_target.access_key)
        assert db.changes().push().keys_pushed == 1
    assert read_back(chain, tmp_path / "check") == {**values, "k1": "edited"}


# --------------------------------------------------------------------------- missing things


@pytest.mark.parametrize("flag", ["r", "w", "c", "n"])
def test_missing_bucket_is_remote_not_found(
    make_conn: Callable[..., Any], tmp_path: Path, flag: str
) -> None:
    bucket = f"ebooklet-no-such-bucket-{uuid.uuid4().hex[:12]}"
    with pytest.raises(RemoteNotFoundError, match=bucket):
        ebooklet.open(make_conn(bucket=bucket), tmp_path / "db", flag)
    assert not (tmp_path / "db").exists()


def test_missing_bucket_by_public_url_is_remote_not_found(
    s3_server: S3Target, tmp_path: Path
) -> None:
    if not s3_server.is_local:
        pytest.skip("an external store answers anonymous requests for unknown buckets its own way")
    url = f"{s3_server.endpoint_url}/ebooklet-no-such-bucket-{uuid.uuid4().hex[:12]}/a/db"
    with pytest.raises(RemoteNotFoundError, match="does not exist|not found"):
        ebooklet.open(url, tmp_path / "db", "r")


@pytest.mark.parametrize(
    "flag, how", [("r", "reader"), ("w", "connection")], ids=["r", "w"]
)
def test_missing_database_is_remote_not_found_and_creates_nothing(
    s3_server: S3Target, conn: Any, db_key: str, reader: Any, tmp_path: Path, flag: str, how: str
) -> None:
    remote = reader(conn) if how == "reader" else conn
    with pytest.raises(RemoteNotFoundError, match="'c'"):
        ebooklet.open(remote, tmp_path / "db", flag)
    assert not (tmp_path / "db").exists()
    assert remote_objects(s3_server, db_key) == {}
    with ebooklet.open(conn, tmp_path / "db", "c", value_serializer="pickle") as db:
        assert len(db) == 0  # the failed open left nothing in the way


@pytest.mark.parametrize("bad", ["wrong secret", "missing bucket"])
def test_failed_open_n_keeps_the_local_copy(
    auth_target: S3Target, db_key: str, tmp_path: Path, bad: str
) -> None:
    good_conn = auth_target.connection(db_key)
    path = tmp_path / "db"
    seed(good_conn, path)
    with_pending_edit(good_conn, path)
    before = local_files(path)
    changes = (
        BAD_CREDENTIALS["wrong secret"]
        if bad == "wrong secret"
        else dict(bucket=f"ebooklet-no-such-bucket-{uuid.uuid4().hex[:12]}")
    )
    with pytest.raises((AuthError, RemoteNotFoundError)):
        ebooklet.open(auth_target.connection(db_key, **changes), path, "n")
    assert local_files(path) == before


# --------------------------------------------------------------------------- unreachable


@pytest.mark.parametrize("flag", ["r", "w"])
def test_unreachable_endpoint_without_local_copy_is_an_offline_error(
    make_conn: Callable[..., Any], tmp_path: Path, flag: str
) -> None:
    """The database may well exist: say the remote is unreachable (OfflineError, a
    ConnectionError), not that it is missing, and do not warn first that the open
    works offline from local files: there are none."""
    dead = make_conn(endpoint_url=f"http://127.0.0.1:{find_free_port()}", retries=0, timeout=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OfflineWarning)
        with pytest.raises(OfflineError, match="reach") as info:
            ebooklet.open(dead, tmp_path / "db", flag)
    assert isinstance(info.value, ConnectionError)
    assert not isinstance(info.value, RemoteNotFoundError)
    assert not (tmp_path / "db").exists()


# --------------------------------------------------------------------------- commit retries


def test_a_push_that_gives_up_is_a_conflict_error_without_keys() -> None:
    """Code written for ``except ConflictError`` still catches a push that lost every
    commit try; the error names no key and says what to do."""
    with pytest.raises(ebooklet.ConflictError) as info:
        raise ebooklet.CommitRetryError(8)
    assert info.value.keys == [] and info.value.attempts == 8
    assert "8 tries" in str(info.value) and "push again" in str(info.value)


ERRORS_WITH_ATTRIBUTES = [
    ebooklet.errors.ConflictError(["a", b"b"]),
    ebooklet.errors.LockedError({"host": "h", "pid": 1}, "locked by h"),
    ebooklet.errors.UntrustedSerializerError("pickle", "value_serializer", "not trusted"),
    ebooklet.errors.CommitRetryError(5),
    ebooklet.errors.VacuumConflictError(),
]


@pytest.mark.parametrize("error", ERRORS_WITH_ATTRIBUTES, ids=lambda e: type(e).__name__)
def test_errors_cross_a_pickle_whole(error: Exception) -> None:
    """An error raised in a worker process (db.map's pool, a Dask worker) reaches the
    caller as the same type, message, attributes and notes."""
    import pickle

    error.add_note("while reading key 'k'")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error) and copy.args == error.args
    assert copy.__notes__ == ["while reading key 'k'"]
    assert vars(copy) == vars(error)


def test_every_error_class_with_its_own_init_crosses_a_pickle() -> None:
    """No error class is left out of the test above."""
    own_init = {
        cls for cls in vars(ebooklet.errors).values()
        if isinstance(cls, type) and issubclass(cls, ebooklet.errors.EBookletError)
        and "__init__" in vars(cls)
    }
    assert own_init == {type(e) for e in ERRORS_WITH_ATTRIBUTES}
