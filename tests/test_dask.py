"""ebooklet.dask against a real cluster of two worker processes on loopback and the
session's S3 server: read_bag, write_bag, map_bag, their failures and conflicts, and no
credential in any task."""

from __future__ import annotations

import gc
import pickle
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip(
    "distributed", reason="dask[distributed] is not installed: pip install 'ebooklet-s3[dask]'"
)

import cloudpickle  # noqa: E402
import dask  # noqa: E402
import dask.bag  # noqa: E402
import orjson  # noqa: E402
from distributed import Client, Event, LocalCluster  # noqa: E402

import ebooklet  # noqa: E402
from ebooklet import dask as edask  # noqa: E402
from ebooklet import format as fmt  # noqa: E402
from ebooklet.connection import ConnectionSpec  # noqa: E402

N_KEYS = 100_000


@pytest.fixture(scope="module")
def client(s3_server: Any) -> Iterator[Client]:
    """Two worker processes of one thread each; they find the S3 credentials in their
    environment, as real workers would."""
    env = {
        "AWS_ACCESS_KEY_ID": s3_server.access_key_id,
        "AWS_SECRET_ACCESS_KEY": s3_server.access_key,
    }
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, env=env,
    ) as cluster, Client(cluster) as c:
        yield c
    # distributed leaves objects with weakref finalizers behind: run them now, not in
    # the middle of a later test (one decoding a deeply nested key ran one at its
    # recursion limit, where the finalizer's RecursionError failed that test)
    gc.collect()


def items(n: int, salt: str = "") -> list[tuple[str, dict]]:
    return [(f"k{i:06d}", {"i": i, "s": salt}) for i in range(n)]


def _blob(part: Any) -> list[bytes]:
    return [pickle.dumps(list(part))]


def collect(bag: Any) -> list:
    """A bag's items on the client, each partition sent as one blob: a distributed client
    takes seconds to receive 100,000 small tuples one by one."""
    return [item for blob in bag.map_partitions(_blob).compute() for item in pickle.loads(blob)]


def write(pairs: list, conn: Any, npartitions: int, **kw: Any) -> Any:
    """write_bag of ``pairs`` in ``npartitions`` partitions."""
    return edask.write_bag(dask.bag.from_sequence(pairs, npartitions=npartitions), conn, **kw)


def listing(conn: Any) -> dict[str, int]:
    return dict(conn.list(""))


def test_read_bag_is_the_database(client: Client, conn: Any, tmp_path: Any) -> None:
    with ebooklet.open(conn, tmp_path / "db.blt", "n", value_serializer="orjson") as db:
        db.update(items(N_KEYS))
        db.changes().push()
        expected = dict(db.items())
    bag = edask.read_bag(conn, npartitions=4)
    assert bag.npartitions == 4
    assert dict(collect(bag)) == expected
    assert len(expected) == N_KEYS
    some = ["k000007", "k054321", "absent"]
    assert dict(edask.read_bag(conn, keys=some).compute()) == {k: expected[k] for k in some[:2]}
    under = {k: v for k, v in expected.items() if k.startswith("k0999")}
    assert dict(edask.read_bag(conn, prefix="k0999").compute()) == under


def test_write_partitions_read_back_by_url(
    client: Client, conn: Any, public_url: str, tmp_path: Any
) -> None:
    bag = dask.bag.from_sequence(items(2000), npartitions=4)
    result = edask.write_bag(bag, conn, "n", value_serializer="pickle", message="from dask")
    assert (result.partitions, result.keys_pushed, result.seq) == (4, 2000, 1)
    assert result.packs == 4
    with pytest.raises(ebooklet.UntrustedSerializerError):
        edask.read_bag(public_url)  # a manifest names pickle, never imposes it
    back = edask.read_bag(public_url, value_serializer="pickle", npartitions=3).compute()
    assert dict(back) == dict(items(2000))
    with ebooklet.open(public_url, tmp_path / "r.blt", value_serializer="pickle") as db:
        assert dict(db.items()) == dict(items(2000))
        assert db.history()[0].message == "from dask"


def test_a_rewrite_uploads_only_changed_values(
    client: Client, conn: Any, public_url: str
) -> None:
    """Values equal to the head's for their key are neither uploaded nor re-indexed."""
    # values of 1 KiB: worth looking up in the index (see dask.LOOKUP_RECORD_BYTES)
    write(items(1000, "x" * 1000), conn, 4, value_serializer="orjson")
    changed = {k: {**v, "s": "new"} for k, v in items(1000, "x" * 1000) if v["i"] % 10 == 0}
    pairs = [(k, changed.get(k, v)) for k, v in items(1000, "x" * 1000)]
    before = listing(conn)
    result = write(pairs, conn, 4)
    assert (result.keys_pushed, result.values_uploaded, result.keys_unchanged) == (100, 100, 900)
    assert result.bytes_uploaded == sum(len(orjson.dumps(v)) for v in changed.values())
    packs = [{n: size for n, size in names.items() if n.startswith(".ebk/pack/")}
             for names in (before, listing(conn))]
    assert (sum(packs[1].values()) - sum(packs[0].values())) * 5 < sum(packs[0].values())
    assert dict(edask.read_bag(public_url, npartitions=2).compute()) == dict(pairs)
    assert ebooklet.check(conn).orphans == []
    # the same pairs again: nothing uploaded, nothing committed
    after, etag = listing(conn), conn.get("").etag
    again = write(pairs, conn, 5)
    assert (again.packs, again.values_uploaded, again.keys_unchanged) == (0, 0, 1000)
    assert not again.committed and again.requests["PUT"] == 0
    assert listing(conn) == after and conn.get("").etag == etag


def _explode(part: list) -> list:
    if any(key == "boom" for key, _ in part):
        raise ZeroDivisionError("partition failed on purpose")
    return part


def test_failed_partition_commits_nothing(client: Client, conn: Any, tmp_path: Any) -> None:
    write(items(100), conn, 2, value_serializer="orjson")
    before, etag = listing(conn), conn.get("").etag
    pairs = [*items(300, "new"), ("boom", {})]
    bag = dask.bag.from_sequence(pairs, npartitions=4).map_partitions(_explode)
    with pytest.raises(ZeroDivisionError):
        edask.write_bag(bag, conn)
    after = listing(conn)
    orphans = sorted(set(after) - set(before))
    assert orphans and all(name.startswith(".ebk/pack/") for name in orphans)
    assert {n: s for n, s in after.items() if n not in orphans} == before
    assert conn.get("").etag == etag
    assert ebooklet.check(conn).orphans == orphans
    with ebooklet.open(conn, tmp_path / "v.blt", "w") as db:
        assert db.vacuum().packs_removed == len(orphans)
        assert dict(db.items()) == dict(items(100))
    assert listing(conn) == before
    assert ebooklet.check(conn).orphans == []


def _wait_for_go(part: list, name: str) -> list:
    Event(f"{name}-started").set()
    assert Event(f"{name}-go").wait(60)
    return part


def _held_write(conn: Any, pairs: list, name: str, outcome: dict) -> threading.Thread:
    """write_bag of ``pairs`` in a thread, its partition held until ``<name>-go`` is set
    (its base head is read before): returns once the partition runs."""
    bag = dask.bag.from_sequence(pairs, npartitions=1).map_partitions(_wait_for_go, name)

    def run() -> None:
        try:
            outcome["result"] = edask.write_bag(bag, conn)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    assert Event(f"{name}-started").wait(60)
    return thread


def test_concurrent_writes_merge_or_conflict(client: Client, conn: Any, tmp_path: Any) -> None:
    write([("base", 0)], conn, 1, value_serializer="orjson")
    # different keys: both commit, nothing is lost
    first: dict = {}
    held = _held_write(conn, [("a", 1)], "merge", first)
    edask.write_bag(dask.bag.from_sequence([("b", 2)], npartitions=1), conn)
    Event("merge-go").set()
    held.join()
    assert "error" not in first and first["result"].seq == 3
    # the same key changed meanwhile: the loser raises, commits nothing
    second: dict = {}
    held = _held_write(conn, [("a", 10), ("c", 3)], "clash", second)
    edask.write_bag(dask.bag.from_sequence([("a", 20)], npartitions=1), conn)
    etag = conn.get("").etag
    Event("clash-go").set()
    held.join()
    assert isinstance(second.get("error"), ebooklet.ConflictError)
    assert second["error"].keys == ["a"]
    assert conn.get("").etag == etag
    with ebooklet.open(conn, tmp_path / "c.blt", "r") as db:
        assert dict(db.items()) == {"base": 0, "a": 20, "b": 2}
    manifest = fmt.decode_manifest(conn.get("").data)  # counts after merges and overwrites
    assert (manifest["n_keys"], manifest["n_bytes"]) == (3, len(b"0" b"20" b"2"))


def _secrets(s3_server: Any, make_conn: Any) -> tuple[Any, list[bytes]]:
    """A connection and the secrets that must never be pickled: distinctive fake keys on
    moto (which accepts any), the real ones elsewhere."""
    if s3_server.is_local:
        key_id, secret = "AKIADASKNEVERSHIP", "dask-secret-never-pickled"
        conn = make_conn(access_key_id=key_id, access_key=secret)
        return conn, [key_id.encode(), secret.encode()]
    return make_conn(), [s3_server.access_key_id.encode(), s3_server.access_key.encode()]


def _assert_clean(graph: Any, secrets: list[bytes]) -> None:
    tasks = dict(graph.__dask_graph__() if hasattr(graph, "__dask_graph__") else graph)
    assert tasks
    for task in [*tasks.values(), tasks]:
        data = cloudpickle.dumps(task)
        assert not any(secret in data for secret in secrets)


def test_no_credentials_in_tasks(
    client: Client, s3_server: Any, make_conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, secrets = _secrets(s3_server, make_conn)
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(conn)
    spec = conn.spec()
    assert isinstance(spec, ConnectionSpec) and not any(s in pickle.dumps(spec) for s in secrets)
    graphs: list = []

    def capture(dsk: Any, keys: Any, **kw: Any) -> Any:
        graphs.append(dsk)
        return client.get(dsk, keys, **kw)

    with dask.config.set(scheduler=capture):
        write(items(50), conn, 2, value_serializer="orjson")
        edask.map_bag(_plus_one, conn, conn, npartitions=2)
    assert len(graphs) == 2
    bag = edask.read_bag(conn, npartitions=2)
    for graph in [*graphs, bag.__dask_graph__()]:
        _assert_clean(graph, secrets)
    assert dict(bag.compute())["k000001"] == {"i": 2, "s": ""}


def _plus_one(key: str, value: dict) -> dict:
    return {**value, "i": value["i"] + 1}


def test_map_bag_to_a_new_database(
    client: Client, conn: Any, make_conn: Any, tmp_path: Any
) -> None:
    write(items(3000), conn, 3, value_serializer="orjson")
    target = make_conn(db_key=conn.db_key + "-mapped")
    result = edask.map_bag(_plus_one, conn, target, prefix="k001", message="plus one")
    assert result.keys_pushed == 1000
    with ebooklet.open(target, tmp_path / "t.blt", "r") as db:
        assert db.info().value_serializer == "orjson"
        expected = {k: _plus_one(k, v) for k, v in items(3000) if k.startswith("k001")}
        assert dict(db.items()) == expected


def test_bad_arguments_say_what_to_do(client: Client, conn: Any, public_url: str) -> None:
    bag = dask.bag.from_sequence([("a", b"1")], npartitions=1)
    with pytest.raises(ValueError, match="mode must be"):
        edask.write_bag(bag, conn, "r")
    with pytest.raises(ebooklet.ReadOnlyError, match="read-only"):
        edask.write_bag(bag, public_url)
    with pytest.raises(TypeError, match="dask.bag.Bag"):
        edask.write_bag([("a", b"1")], conn)
    with pytest.raises(ebooklet.RemoteNotFoundError, match="mode 'c'"):
        edask.write_bag(bag, conn, "w")
    with pytest.raises(ebooklet.SerializationError, match="pairs"):
        edask.write_bag(dask.bag.from_sequence([b"not a pair"], npartitions=1), conn)
    with pytest.raises(ebooklet.SerializationError, match="type int"):
        edask.write_bag(dask.bag.from_sequence([(1, b"v")], npartitions=1), conn)
    edask.write_bag(bag, conn)
    with pytest.raises(ValueError, match="not both"):
        edask.read_bag(conn, keys=["a"], prefix="a")
    with pytest.raises(ebooklet.SerializationError, match="type int"):
        edask.read_bag(conn, keys=[1])
    with pytest.raises(TypeError, match="prefix"):
        edask.read_bag(conn, prefix=b"a")
    with pytest.raises(ValueError, match="npartitions"):
        edask.read_bag(conn, npartitions=0)
    with pytest.raises(TypeError, match=r"pass \[key\]"):
        edask.read_bag(conn, keys="a")
    with pytest.raises(TypeError, match="remote must be"):
        edask.read_bag(42)


def test_local_schedulers_use_the_callers_connection(
    conn: Any, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks run in this process (no cluster) sign with the caller's keys, which the
    environment does not hold."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    with dask.config.set(scheduler="sync"):
        write(items(10), conn, 2, value_serializer="orjson")
        assert dict(edask.read_bag(conn).compute()) == dict(items(10))
        # a connection the caller no longer holds: the graph keeps it
        bag = edask.read_bag(conn.copy(timeout=29.0), npartitions=2)
        gc.collect()
        assert dict(bag.compute()) == dict(items(10))
        # and nothing keeps what a graph no longer needs
        kept = len(edask._CALLERS_HANDLES)
        for _ in range(3):
            edask.read_bag(conn)
        gc.collect()
        assert len(edask._CALLERS_HANDLES) == kept
        # another process (a bag's default scheduler) finds no credentials: says what to do
        with pytest.raises(ebooklet.AuthError, match=r"compute\(scheduler='threads'\)"):
            bag.compute(scheduler="processes", num_workers=1)
        # a key given twice: the last partition's value, the last in a partition
        before = Counter(conn.request_counts)
        result = write([("dup", 1), ("dup", 2), ("dup", 3), ("x", 0)], conn, 2)
        assert result.requests == Counter(conn.request_counts) - before  # each counted once
        assert dict(edask.read_bag(conn, keys=["dup"]).compute()) == {"dup": 3}
        # changed by an early partition, given its value again by a later one: unchanged
        monkeypatch.setattr(edask, "LOOKUP_RECORD_BYTES", 0)  # look up even tiny values
        result = write([("dup", 4), ("x", 9), ("dup", 3)], conn, 2)
        assert (result.keys_pushed, result.keys_unchanged) == (1, 1)
        assert dict(edask.read_bag(conn, keys=["dup", "x"]).compute()) == {"dup": 3, "x": 9}


def test_a_spec_names_a_profile_never_keys(s3_server: Any) -> None:
    where = {"db_key": "tests/profile/db", "bucket": s3_server.bucket,
             "endpoint_url": s3_server.endpoint_url}
    spec = ebooklet.S3Connection(**where, profile="no-such-profile").spec()
    assert spec.profile == "no-such-profile" and spec.writable
    with pytest.raises(ebooklet.AuthError, match="no-such-profile"):
        spec.connect().get("")
    with pytest.raises(ValueError, match="profile"):
        ebooklet.S3Connection("id", "secret", **where, profile="p")


def test_map_bag_onto_itself_bases_on_the_head_it_read(
    conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """map_bag(func, db, db): a commit landing after the source was read is a conflict,
    not an update lost under the new values (local scheduler: no cluster needed)."""
    from_delayed = dask.bag.from_delayed

    def then_another_writer(*args: Any, **kw: Any) -> Any:
        bag = from_delayed(*args, **kw)  # the source's head is read: now another writer
        monkeypatch.setattr(dask.bag, "from_delayed", from_delayed)
        write([("k000001", {"i": 99, "s": "other"})], conn, 1)
        return bag

    with dask.config.set(scheduler="sync"):
        write(items(10), conn, 1, value_serializer="orjson")
        monkeypatch.setattr(dask.bag, "from_delayed", then_another_writer)
        with pytest.raises(ebooklet.ConflictError) as raised:
            edask.map_bag(_plus_one, conn, conn)
        assert raised.value.keys == ["k000001"]
        assert dict(edask.read_bag(conn).compute())["k000001"] == {"i": 99, "s": "other"}


def test_a_claimed_byte_count_does_not_size_the_graph(
    conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest claiming a huge n_bytes makes at most MAX_PARTITIONS partitions (local
    scheduler: no cluster needed)."""
    with dask.config.set(scheduler="sync"):
        write(items(20), conn, 1, value_serializer="orjson")
        manifest = fmt.decode_manifest(conn.get("").data)
        conn.put("", fmt.encode_manifest({**manifest, "n_bytes": 1 << 40}))
        monkeypatch.setattr(edask, "MAX_PARTITIONS", 8)
        bag = edask.read_bag(conn)
        assert bag.npartitions == 8
        assert dict(bag.compute()) == dict(items(20))


def test_a_key_listed_in_another_shard_fails_the_read(conn: Any, small_shards: int) -> None:
    """A forged index lists a key in a shard it does not hash to: read_bag's index task
    raises IntegrityError instead of yielding it (sync scheduler: no cluster needed)."""
    with dask.config.set(scheduler="sync"):
        write(items(3 * small_shards), conn, 1, value_serializer="orjson")
        manifest = fmt.decode_manifest(conn.get("").data)
        assert manifest["n_shards"] >= 2
        first, second = (fmt.shard_name(manifest["shards"][i], i) for i in (0, 1))
        moved, entry = next(iter(fmt.decode_shard(conn.get(first).data).items()))
        entries = {**fmt.decode_shard(conn.get(second).data), moved: entry}
        manifest["shards"][1] = uuid.uuid4().hex
        conn.put(fmt.shard_name(manifest["shards"][1], 1), fmt.encode_shard(entries))
        conn.put("", fmt.encode_manifest(manifest))
        with pytest.raises(ebooklet.IntegrityError, match="belongs to shard 0"):
            edask.read_bag(conn).compute()
