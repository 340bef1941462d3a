"""A remote database never chooses code to run (issue 10, point 1 and two items of point 9).

A hostile database is a real one pushed to moto and then given a hostile manifest: its
values (or keys) are stored as raw bytes, and the manifest, rewritten with boto3, claims
that they are pickles, or zstd frames. The pickle payload makes a marker directory when
it is decoded, so "no code ran" is the marker's absence. Every read-side test runs by
connection and by public URL (``reader`` fixture). See docs/security.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import ebooklet
from ebooklet import serializers
from ebooklet.errors import (
    DecompressionLimitError,
    SerializationError,
    UntrustedEndpointError,
    UntrustedSerializerError,
)

BENIGN = {"a": [1, 2, 3]}


class _Plant:
    """Unpickling it makes the directory ``path``: the proof that pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.path,))


def rewrite_manifest(s3_server: Any, db_key: str, **changes: Any) -> None:
    """Replace fields of the head manifest, as whoever can write the bucket could."""
    client = s3_server.client()
    manifest = json.loads(client.get_object(Bucket=s3_server.bucket, Key=db_key)["Body"].read())
    manifest.update(changes)
    client.put_object(Bucket=s3_server.bucket, Key=db_key, Body=json.dumps(manifest).encode())


def publish(conn: Any, path: Path, items: dict[bytes, bytes], metadata: Any = None) -> None:
    """Push ``items`` as raw bytes (bytes keys and values), with ``metadata``."""
    with ebooklet.open(conn, path, "n", key_serializer=None, value_serializer=None) as db:
        db.update(items)
        if metadata is not None:
            db.set_metadata(metadata)
        assert db.changes().push().committed


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


@pytest.fixture
def hostile_values(s3_server: Any, conn: Any, db_key: str, tmp_path: Path, marker: Path) -> None:
    """A database whose manifest says its values are pickles: one plants the marker."""
    publish(conn, tmp_path / "publisher", {b"plant": pickle.dumps(_Plant(marker)),
                                           b"plain": pickle.dumps(BENIGN)})
    rewrite_manifest(s3_server, db_key, key_serializer="str", value_serializer="pickle")


@pytest.fixture
def hostile_keys(s3_server: Any, conn: Any, db_key: str, tmp_path: Path, marker: Path) -> None:
    """A database whose manifest says its keys are pickles: one key plants the marker."""
    publish(conn, tmp_path / "publisher", {pickle.dumps(_Plant(marker)): b"v", pickle.dumps(7): b"w"})
    rewrite_manifest(s3_server, db_key, key_serializer="pickle", value_serializer=None)


# --------------------------------------------------------------------------- refused


READS = {
    "getitem": lambda db: db["plant"],
    "items": lambda db: dict(db.items()),
    "get_timestamp": lambda db: db.get_timestamp("plant", include_value=True),
}


@pytest.mark.parametrize("read", READS.values(), ids=READS.keys())
def test_a_manifest_naming_pickle_values_runs_nothing(
    hostile_values: None, reader: Any, tmp_path: Path, marker: Path, read: Any
) -> None:
    with pytest.raises(UntrustedSerializerError, match="value_serializer='pickle'") as info, \
            ebooklet.open(reader(), tmp_path / "reader") as db:
        read(db)
    assert (info.value.serializer, info.value.field) == ("pickle", "value_serializer")
    assert "trust_serializers" in str(info.value)
    assert not marker.exists()


KEY_READS = {
    "list": lambda db: list(db),
    "keys": lambda db: list(db.keys()),
    "items": lambda db: list(db.items()),
}


@pytest.mark.parametrize("read", KEY_READS.values(), ids=KEY_READS.keys())
def test_a_manifest_naming_pickle_keys_runs_nothing(
    hostile_keys: None, reader: Any, tmp_path: Path, marker: Path, read: Any
) -> None:
    with pytest.raises(UntrustedSerializerError, match="key_serializer='pickle'"), \
            ebooklet.open(reader(), tmp_path / "reader") as db:
        read(db)
    assert not marker.exists()


@pytest.mark.parametrize("field", ["value_serializer", "key_serializer"])
def test_another_serializer_passed_is_refused_not_overridden(
    request: pytest.FixtureRequest, reader: Any, tmp_path: Path, marker: Path, field: str
) -> None:
    """open(url, value_serializer='orjson') over a pickle manifest: neither is used."""
    request.getfixturevalue("hostile_values" if field == "value_serializer" else "hostile_keys")
    expected = f"records {field} 'pickle'.*'orjson' was passed"
    with pytest.raises(SerializationError, match=expected) as info, \
            ebooklet.open(reader(), tmp_path / "reader", **{field: "orjson"}) as db:
        list(db.items())
    assert not isinstance(info.value, UntrustedSerializerError)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["pickle_zstd", "zstd", "orjson_zstd", "wkb"])
def test_every_serializer_outside_the_safe_list_needs_consent(
    s3_server: Any, conn: Any, db_key: str, reader: Any, tmp_path: Path, name: str
) -> None:
    assert name not in serializers.SAFE
    publish(conn, tmp_path / "publisher", {b"k": b"v"})
    rewrite_manifest(s3_server, db_key, key_serializer="str", value_serializer=name)
    with pytest.raises(UntrustedSerializerError, match=name):
        ebooklet.open(reader(), tmp_path / "reader").close()


def test_safe_serializers_need_no_consent(conn: Any, reader: Any, tmp_path: Path) -> None:
    with ebooklet.open(conn, tmp_path / "w", "n", key_serializer="uint4", value_serializer="orjson") as db:
        db[7] = BENIGN
        db.changes().push()
    with ebooklet.open(reader(), tmp_path / "reader") as db:
        assert dict(db.items()) == {7: BENIGN}


def test_a_hostile_group_runs_nothing(
    s3_server: Any, conn: Any, db_key: str, reader: Any, tmp_path: Path, marker: Path
) -> None:
    """open_rcg(url) on a group whose manifest names pickle values or keys."""
    tag = {"ebooklet": "remote_conn_group", "version": 1}
    publish(conn, tmp_path / "publisher", {b"u1": pickle.dumps(_Plant(marker))}, metadata=tag)
    for fields in ({"value_serializer": "pickle"}, {"key_serializer": "pickle"}):
        rewrite_manifest(s3_server, db_key, **{"key_serializer": "str", "value_serializer": "orjson", **fields})
        for trust in (False, True):  # a group is never decoded with anything but its own
            with pytest.raises(SerializationError, match="pickle"), \
                    ebooklet.open_rcg(reader(), tmp_path / f"g{trust}", trust_serializers=trust) as group:
                list(group.items())
    assert not marker.exists()


# --------------------------------------------------------------------------- allowed


@pytest.mark.parametrize("consent", [{"value_serializer": "pickle"}, {"trust_serializers": {"pickle"}},
                                     {"trust_serializers": "pickle"}, {"trust_serializers": True}],
                         ids=["passed", "trusted-set", "trusted-name", "trusted-all"])
def test_with_consent_pickle_values_decode_and_the_choice_is_remembered(
    hostile_values: None, reader: Any, tmp_path: Path, consent: dict
) -> None:
    path = tmp_path / "reader"
    with ebooklet.open(reader(), path, **consent) as db:
        assert db["plain"] == BENIGN
    with ebooklet.open(reader(), path) as db:  # remembered in reader.ebk.json for this remote
        assert db["plain"] == BENIGN
    with pytest.raises(UntrustedSerializerError):  # not for another local copy
        ebooklet.open(reader(), tmp_path / "other")


def test_pickle_keys_decode_with_consent(hostile_keys: None, reader: Any, tmp_path: Path, marker: Path) -> None:
    with ebooklet.open(reader(), tmp_path / "reader", key_serializer="pickle") as db:
        assert 7 in set(db)  # the caller asked for pickle: the plant runs, by the caller's choice
    assert marker.exists()


def test_remembered_consent_does_not_follow_the_path_to_another_remote(
    s3_server: Any, make_conn: Any, db_key: str, tmp_path: Path, marker: Path
) -> None:
    """A local copy allowed pickle for database A; the same path opened on B asks again."""
    a, b = make_conn(db_key=db_key + "-a"), make_conn(db_key=db_key + "-b")
    with ebooklet.open(a, tmp_path / "a-writer", "n", value_serializer="pickle") as db:
        db["plain"] = BENIGN
        db.changes().push()
    publish(b, tmp_path / "b-writer", {b"plant": pickle.dumps(_Plant(marker))})
    rewrite_manifest(s3_server, b.db_key, key_serializer="str", value_serializer="pickle")
    path = tmp_path / "reader"
    with ebooklet.open(s3_server.public_url(a.db_key), path, value_serializer="pickle") as db:
        assert db["plain"] == BENIGN
    with pytest.raises(UntrustedSerializerError), \
            ebooklet.open(s3_server.public_url(b.db_key), path) as db:
        db["plant"]
    assert not marker.exists()


def test_the_users_own_database_keeps_working(conn: Any, tmp_path: Path) -> None:
    """Created with pickle: reopened without the serializer (by connection, and local
    only); a fresh copy of the same remote asks for it; passing another one is refused."""
    path = tmp_path / "mine"
    with ebooklet.open(conn, path, "n", value_serializer="pickle") as db:
        db["a"] = BENIGN
        db.changes().push()
    with ebooklet.open(conn, path, "w") as db:
        db["b"] = (1, 2)
        db.changes().push()
    with ebooklet.open(None, path, "r") as db:
        assert db["b"] == (1, 2)
    with pytest.raises(UntrustedSerializerError):
        ebooklet.open(conn, tmp_path / "second-machine")
    with ebooklet.open(conn, tmp_path / "second-machine", value_serializer="pickle") as db:
        assert dict(db.items()) == {"a": BENIGN, "b": (1, 2)}
    for remote in (conn, None):
        with pytest.raises(SerializationError, match="'orjson' was passed"):
            ebooklet.open(remote, path, "r", value_serializer="orjson")


def test_a_local_database_refuses_another_serializer(tmp_path: Path) -> None:
    with ebooklet.open(None, tmp_path / "db", "n", value_serializer="pickle") as db:
        db["a"] = BENIGN
    with pytest.raises(SerializationError, match="records value_serializer 'pickle'"):
        ebooklet.open(None, tmp_path / "db", "w", value_serializer="orjson")
    with ebooklet.open(None, tmp_path / "db", "w") as db:
        assert db["a"] == BENIGN


def test_bad_trust_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not booklet serializer names"):
        ebooklet.open(None, tmp_path / "db", "n", trust_serializers={"os.system"})
    with pytest.raises(TypeError, match="trust_serializers"):
        ebooklet.open(None, tmp_path / "db", "n", trust_serializers=3)


# --------------------------------------------------------------------------- zstd bombs


BOMB_SIZE = 1 << 30
"""What the bombs inflate to (they are about 32 KiB each)."""
RSS_SLACK = 32 << 20
"""Peak RSS growth allowed beyond what the limit lets through (chunk buffers, allocator)."""

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import ebooklet
    from ebooklet.errors import DecompressionLimitError
    url, path, key = sys.argv[1:4]
    with ebooklet.open(url, path, value_serializer="zstd") as db:
        db.load_items([key])  # downloaded first: what is measured is the decoding
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            outcome = "decoded %d bytes" % len(db[key])
        except DecompressionLimitError as exc:
            outcome = "refused: %s" % exc
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"outcome": outcome, "growth": (peak - before) * 1024}))
    """
)


def zstd_bomb(declare_size: bool) -> bytes:
    """One zstd frame of :data:`BOMB_SIZE` zero bytes, made without holding them."""
    zstandard = pytest.importorskip("zstandard")
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=declare_size)
    stream = compressor.compressobj(size=BOMB_SIZE if declare_size else -1)
    chunk = bytes(1 << 20)
    parts = [stream.compress(chunk) for _ in range(BOMB_SIZE // len(chunk))]
    return b"".join([*parts, stream.flush()])


@pytest.mark.parametrize("declared", [True, False], ids=["size-declared", "size-not-declared"])
def test_a_zstd_bomb_is_stopped_at_the_limit(
    s3_server: Any, conn: Any, db_key: str, public_url: str, tmp_path: Path, declared: bool
) -> None:
    """Measured in a child process: a bomb that declares its size allocates nothing; one
    that does not is inflated up to INFLATE_LIMIT (256 MiB) and no further."""
    bomb = zstd_bomb(declared)
    assert len(bomb) < 64 << 10
    publish(conn, tmp_path / "publisher", {b"bomb": bomb})
    rewrite_manifest(s3_server, db_key, key_serializer="str", value_serializer="zstd")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, public_url, str(tmp_path / "reader"), "bomb"],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )
    result = json.loads(out.stdout)
    assert result["outcome"].startswith("refused"), result
    assert "INFLATE_LIMIT" in result["outcome"]
    bound = RSS_SLACK + (0 if declared else serializers.INFLATE_LIMIT)
    assert result["growth"] < bound, result


def test_a_value_under_the_limit_inflates(conn: Any, reader: Any, tmp_path: Path) -> None:
    pytest.importorskip("zstandard")
    value = {"x": list(range(1000))}
    with ebooklet.open(conn, tmp_path / "w", "n", value_serializer="orjson_zstd") as db:
        db["k"] = value
        db.changes().push()
    with ebooklet.open(reader(), tmp_path / "reader", value_serializer="orjson_zstd") as db:
        assert db["k"] == value


def test_inflate_limit_is_read_at_each_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    zstandard = pytest.importorskip("zstandard")
    frame = zstandard.ZstdCompressor().compress(bytes(4096))
    assert serializers.inflate(frame) == bytes(4096)
    monkeypatch.setattr(serializers, "INFLATE_LIMIT", 4095)
    with pytest.raises(DecompressionLimitError, match="4,095"):
        serializers.inflate(frame)


# --------------------------------------------------------------------------- group endpoints


class Listener:
    """A loopback socket that records every byte sent to it, and answers nothing."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.received = b""
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            with client:
                client.settimeout(1)
                with contextlib.suppress(OSError):
                    self.received += client.recv(65536)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener() -> Any:
    server = Listener()
    yield server
    server.close()


def test_a_group_entry_cannot_send_credentials_elsewhere(
    make_conn: Any, db_key: str, reader: Any, tmp_path: Path, listener: Listener
) -> None:
    """The entry names a loopback endpoint of ours: nothing may reach it, with keys
    given or with boto3's chain (``kw`` but no keys)."""
    group_conn = make_conn(db_key=db_key + "-group")
    entry = {"uuid": "u1", "bucket": "b", "db_key": "victim/db", "endpoint_url": listener.url,
             "db_url": None, "region": "us-east-1"}
    with ebooklet.open(group_conn, tmp_path / "publisher", "n", value_serializer="orjson") as db:
        db.set_metadata({"ebooklet": "remote_conn_group", "version": 1})
        db["u1"] = entry
        db.changes().push()
    key_id, secret = "AKIAHOSTILETEST00001", "not-a-real-secret-but-ours"
    with ebooklet.open_rcg(reader(group_conn), tmp_path / "group") as group:
        for args in ((key_id, secret), ()):
            with pytest.raises(UntrustedEndpointError, match="endpoint_url=") as info:
                member = group.connection("u1", *args, retries=0, timeout=2)
                ebooklet.open(member, tmp_path / "member").close()
            assert listener.url in str(info.value)
    assert (listener.connections, listener.received) == (0, b"")


def test_a_group_entry_on_the_groups_own_endpoint_is_allowed(
    make_conn: Any, db_key: str, s3_server: Any, tmp_path: Path, listener: Listener
) -> None:
    """Signed group connection, member on the same endpoint: allowed; an explicit
    endpoint_url= is the caller's choice and wins over the entry's."""
    member_conn = make_conn(db_key=db_key + "-member")
    with ebooklet.open(member_conn, tmp_path / "member-writer", "n") as db:
        db["k"] = b"v"
        db.changes().push()
    group_conn = make_conn(db_key=db_key + "-group")
    with ebooklet.open_rcg(group_conn, tmp_path / "group", "c") as group:
        uuid = group.add(member_conn)
        conn = group.connection(uuid, s3_server.access_key_id, s3_server.access_key)
        with ebooklet.open(conn, tmp_path / "member") as db:
            assert db["k"] == b"v"
        conn = group.connection(uuid, s3_server.access_key_id, s3_server.access_key,
                                endpoint_url=listener.url)
        assert conn.endpoint_url == listener.url


# --------------------------------------------------------------------------- the bytes default


@pytest.mark.parametrize("write", [lambda db: db.__setitem__("k", {"a": 1}),
                                   lambda db: db.update({"k": "text"})], ids=["setitem", "update"])
def test_the_bytes_default_says_how_to_choose_another_serializer(tmp_path: Path, write: Any) -> None:
    with ebooklet.open(None, tmp_path / "db", "n") as db:
        with pytest.raises(SerializationError) as info:
            write(db)
        assert len(db) == 0
    message = str(info.value)
    assert "value_serializer=None" in message
    assert "value_serializer='orjson'" in message and "'pickle'" in message
