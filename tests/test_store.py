"""The store protocol's verbs (ebooklet.store), called directly on an ``S3Connection``
against the real server, and the thread pool (ebooklet.workers) on its own."""

from __future__ import annotations

import inspect
import threading
import uuid
from typing import Any

import pytest

from ebooklet.connection import S3Connection
from ebooklet.errors import IntegrityError, PreconditionFailed, RemoteNotFoundError
from ebooklet.store import Fetched, IfMatch, MaintenanceStore, Mode, NotModified, Store
from ebooklet.workers import Workers

NAME = ".ebk/pack/store-test"


def _honoured(conn: Any) -> None:
    if not conn.conditional_writes():
        pytest.skip("this server ignores conditional writes")


# --------------------------------------------------------------------------- protocol


def test_a_connection_is_a_store_signed_or_anonymous() -> None:
    signed = S3Connection("id", "secret", "db", "bucket", endpoint_url="http://127.0.0.1:1")
    public = S3Connection(db_url="http://127.0.0.1:1/bucket/db")
    for conn in (signed, public):
        assert isinstance(conn, Store)
        assert isinstance(conn, MaintenanceStore)
        assert isinstance(conn.workers, Workers)
        assert conn.workers.threads == conn.threads == 16
    assert not hasattr(signed, "map") and not hasattr(signed, "submit")


VERBS = sorted(
    name
    for protocol in (Store, MaintenanceStore)
    for name, member in vars(protocol).items()
    if callable(member) and not name.startswith("_")
)
"""The methods of the store protocols."""


@pytest.mark.parametrize("name", VERBS)
def test_the_connection_implements_each_verb_with_the_protocols_signature(name: str) -> None:
    protocol = getattr(MaintenanceStore, name)
    assert inspect.signature(getattr(S3Connection, name)) == inspect.signature(protocol)


def test_the_protocols_attributes_and_properties_are_the_connections() -> None:
    public = S3Connection(db_url="http://127.0.0.1:1/bucket/db")
    assert set(Store.__annotations__) == {"db_key", "db_url", "timeout", "workers", "request_counts"}
    for name in Store.__annotations__:
        assert hasattr(public, name)
    assert isinstance(S3Connection.writable, property) and isinstance(Store.writable, property)


def test_a_precondition_must_be_a_mode_or_an_if_match(conn: Any) -> None:
    with pytest.raises(TypeError, match="precondition"):
        conn.put(NAME, b"x", precondition="create")


# --------------------------------------------------------------------------- put


def test_create_writes_a_new_object_and_refuses_an_existing_one(conn: Any) -> None:
    _honoured(conn)
    etag = conn.put(NAME, b"first", precondition=Mode.CREATE)
    with pytest.raises(PreconditionFailed, match="412"):
        conn.put(NAME, b"second", precondition=Mode.CREATE)
    assert conn.get(NAME) == Fetched(b"first", etag)


def test_if_match_writes_over_its_etag_only(conn: Any) -> None:
    _honoured(conn)
    etag = conn.put(NAME, b"first")
    with pytest.raises(PreconditionFailed, match="412"):
        conn.put(NAME, b"second", precondition=IfMatch('"0123456789abcdef0123456789abcdef"'))
    assert conn.get(NAME).data == b"first"
    new = conn.put(NAME, b"second", precondition=IfMatch(etag))
    assert new != etag and conn.get(NAME) == Fetched(b"second", new)


def test_if_match_on_a_missing_object_fails(conn: Any) -> None:
    _honoured(conn)
    with pytest.raises((PreconditionFailed, RemoteNotFoundError)):
        conn.put(NAME, b"x", precondition=IfMatch('"0123456789abcdef0123456789abcdef"'))


def test_overwrite_writes_whatever_is_there(conn: Any) -> None:
    conn.put(NAME, b"first", precondition=Mode.OVERWRITE)
    etag = conn.put(NAME, b"second")  # the default
    assert conn.get(NAME) == Fetched(b"second", etag)


def test_a_put_of_several_buffers_is_one_object(conn: Any) -> None:
    etag = conn.put(NAME, [b"abc", memoryview(b"def"), b""], content_type="application/json")
    assert conn.get(NAME) == Fetched(b"abcdef", etag)


# --------------------------------------------------------------------------- get


def test_get_is_conditional_on_an_etag(conn: Any) -> None:
    etag = conn.put(NAME, b"value")
    assert conn.get(NAME, etag) == NotModified(etag)
    assert conn.get(NAME, '"0123456789abcdef0123456789abcdef"') == Fetched(b"value", etag)
    with pytest.raises(RemoteNotFoundError, match="not found"):
        conn.get(NAME + "-missing")


def test_get_refuses_an_object_over_max_bytes(conn: Any) -> None:
    conn.put(NAME, b"x" * 100)
    assert conn.get(NAME, max_bytes=100).data == b"x" * 100
    with pytest.raises(IntegrityError, match="larger than 99"):
        conn.get(NAME, max_bytes=99)


def test_range_get(conn: Any) -> None:
    data = bytes(range(256)) * 4
    conn.put(NAME, data)
    assert conn.get_range(NAME, 5, 10) == data[5:15]
    assert conn.get_range(NAME, 0, len(data)) == data
    assert conn.get_range(NAME, 7, 0) == b""
    buffer = bytearray()
    view = conn.get_range(NAME, 100, 50, buffer)
    assert isinstance(view, memoryview) and bytes(view) == data[100:150]
    with pytest.raises(IntegrityError, match="truncated"):
        conn.get_range(NAME, len(data) - 5, 10)
    with pytest.raises(IntegrityError, match="truncated"):
        conn.get_range(NAME, len(data) + 5, 10)
    with pytest.raises(RemoteNotFoundError):
        conn.get_range(NAME + "-missing", 0, 10)


def test_tail_get(conn: Any) -> None:
    data = uuid.uuid4().bytes * 64
    conn.put(NAME, data)
    assert conn.get_tail(NAME, 10) == (data[-10:], len(data))
    assert conn.get_tail(NAME, len(data) * 2) == (data, len(data))
    with pytest.raises(RemoteNotFoundError):
        conn.get_tail(NAME + "-missing", 10)


# --------------------------------------------------------------------------- list, delete


def test_list_names_the_objects_under_a_prefix_with_their_sizes(conn: Any, make_conn: Any,
                                                                db_key: str) -> None:
    for i, size in enumerate((3, 0, 1000)):
        conn.put(f".ebk/pack/l{i}", b"x" * size)
    conn.put(".ebk/shard/s", b"y")
    make_conn(db_key=db_key + "x").put(".ebk/pack/other", b"z")  # another database's
    packs = [(".ebk/pack/l0", 3), (".ebk/pack/l1", 0), (".ebk/pack/l2", 1000)]
    assert sorted(conn.list(".ebk/pack/")) == packs
    assert sorted(conn.list(".ebk/")) == [*packs, (".ebk/shard/s", 1)]
    assert list(conn.list(".ebk/nothing/")) == []


def test_delete(conn: Any) -> None:
    conn.put(NAME, b"x")
    conn.delete(NAME)
    with pytest.raises(RemoteNotFoundError):
        conn.get(NAME)
    conn.delete(NAME)  # a missing object is fine


def test_delete_if_match(conn: Any) -> None:
    _honoured(conn)
    etag = conn.put(NAME, b"x")
    with pytest.raises(PreconditionFailed):
        conn.delete(NAME, IfMatch('"0123456789abcdef0123456789abcdef"'))
    assert conn.get(NAME).data == b"x"
    conn.delete(NAME, IfMatch(etag))
    assert list(conn.list(NAME)) == []


# --------------------------------------------------------------------------- multipart


def test_multipart_put(conn: Any) -> None:
    parts = [uuid.uuid4().bytes * (5 << 16), memoryview(uuid.uuid4().bytes * (5 << 16)), b"tail"]
    requests = conn.request_counts.copy()
    etag = conn.put_multipart(NAME, iter(parts))
    assert etag.strip('"').endswith("-3")
    assert conn.get(NAME) == Fetched(b"".join(parts), etag)
    sent = conn.request_counts - requests
    assert sent == {"POST": 2, "PUT": 3, "GET": 1}  # start, 3 parts, complete; the GET


def test_a_failed_multipart_put_is_aborted(conn: Any) -> None:
    def parts() -> Any:
        yield b"x" * (5 << 20)
        raise ValueError("the caller's parts broke")

    with pytest.raises(ValueError, match="broke"):
        conn.put_multipart(NAME, parts())
    assert conn.request_counts["DELETE"] == 1  # the abort
    assert list(conn.list(NAME)) == []


# --------------------------------------------------------------------------- capabilities


def test_capabilities(conn: Any, make_conn: Any) -> None:
    assert conn.writable
    assert not S3Connection(db_url="http://127.0.0.1:1/b/db").writable
    honoured = conn.conditional_writes()
    assert conn.knows_conditional_writes()
    assert make_conn().conditional_writes() is honoured  # one probe per bucket
    assert list(conn.list(".ebk/")) == []  # the probe object is gone


# --------------------------------------------------------------------------- workers


def _threads_of(workers: Workers, n: int) -> set[threading.Thread]:
    """The threads that ran ``n`` tasks at once on ``workers``."""
    barrier = threading.Barrier(n, timeout=10)

    def task(_: int) -> threading.Thread:
        barrier.wait()
        return threading.current_thread()

    return set(workers.map(task, range(n)))


def _ended(threads: set[threading.Thread]) -> bool:
    for thread in threads:
        thread.join(timeout=10)
    return not any(thread.is_alive() for thread in threads)


def test_workers_run_tasks_concurrently_in_order() -> None:
    workers = Workers(4, name=f"test-{uuid.uuid4().hex[:8]}")
    barrier = threading.Barrier(4, timeout=10)  # breaks unless 4 tasks run at once

    def task(i: int) -> int:
        barrier.wait()
        return i * i

    try:
        assert list(workers.map(task, range(4))) == [0, 1, 4, 9]
        assert workers.submit(pow, 2, 10).result(timeout=10) == 1024
    finally:
        workers.close()


def test_workers_start_lazily_once_and_run_a_single_item_in_place() -> None:
    workers = Workers(2, name=f"test-{uuid.uuid4().hex[:8]}")
    assert list(workers.map(lambda _: threading.current_thread(), [0])) == [threading.current_thread()]
    assert not [t for t in threading.enumerate() if t.name.startswith(workers.name)]  # none yet
    ran_on: list[threading.Thread] = []

    def call() -> None:  # 16 threads submit their first tasks at once
        ran_on.append(workers.submit(threading.current_thread).result(timeout=10))

    callers = [threading.Thread(target=call) for _ in range(16)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    try:
        assert len(ran_on) == 16 and len(set(ran_on)) <= 2  # one pool of 2 threads, not more
    finally:
        workers.close()


def test_workers_raise_a_tasks_exception() -> None:
    workers = Workers(2)
    try:
        with pytest.raises(ZeroDivisionError):
            list(workers.map(lambda i: 1 // i, [1, 0, 2]))
    finally:
        workers.close()


def test_closed_workers_end_their_threads_and_start_again_on_demand() -> None:
    workers = Workers(3)
    threads = _threads_of(workers, 3)
    assert len(threads) == 3
    workers.close()
    assert _ended(threads)
    again = _threads_of(workers, 3)
    assert not again & threads
    workers.close()
    assert _ended(again)


def test_closing_a_connection_closes_its_workers(make_conn: Any) -> None:
    conn = make_conn(threads=2)
    threads = _threads_of(conn.workers, 2)
    conn.close()
    assert _ended(threads)
