"""Many processes on one local copy (issue 16, docs/processes.md).

Real processes started with ``multiprocessing``'s ``spawn`` method, against the real
server: readers open one path at once (a barrier proves it), fetch cold values into one
cache without downloading them twice (moto's request log counts the value GETs), survive
a reader killed in the middle of writing values, share the copy with one writer, and
``db.map`` runs a function over the database on a process pool. Children get the
connection's parameters (an ``S3Connection`` refuses pickling).

What these tests check is local-file concurrency, not the server: they run on one server
only (moto), and are skipped when ``EBOOKLET_TEST_FRESH_SERVER`` or
``EBOOKLET_TEST_ENDPOINT`` is set (the second CI run, on SeaweedFS).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import booklet
import pytest

import ebooklet
import ebooklet._booklet_io

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("EBOOKLET_TEST_FRESH_SERVER") or os.environ.get("EBOOKLET_TEST_ENDPOINT")),
    reason="local-file concurrency: run on one server only (moto)",
)

SPAWN = multiprocessing.get_context("spawn")
WAIT = 60  # seconds a child or a barrier waits at most


def value(i: int) -> str:
    return f"value {i};" * 20


def spec(s3_server: Any, db_key: str) -> dict:
    """The parameters of a connection to this test's database, for a child."""
    return {
        "access_key_id": s3_server.access_key_id, "access_key": s3_server.access_key,
        "db_key": db_key, "bucket": s3_server.bucket, "endpoint_url": s3_server.endpoint_url,
        "region": s3_server.region,
    }


def create(conn: Any, tmp_path: Path, n: int) -> dict[str, str]:
    items = {f"k{i:03d}": value(i) for i in range(n)}
    with ebooklet.open(conn, tmp_path / "creator.blt", "n", value_serializer="str") as db:
        db.update(items)
        db.changes().push()
    return items


def pack_gets(s3_server: Any, db_key: str) -> int:
    """Value downloads of this test's database since the last reset."""
    return sum(1 for m, p, _ in s3_server.server.iter_requests() if db_key in p and ".ebk/pack/" in p)


def run(target: Any, *args: Any) -> Any:
    process = SPAWN.Process(target=target, args=args)
    process.start()
    return process


def join(processes: list[Any], exitcode: int = 0) -> None:
    for process in processes:
        process.join(WAIT)
        assert process.exitcode == exitcode, f"{process} exited with {process.exitcode}"


# --------------------------------------------------------------------------- children


def hold_and_read(conn_spec: dict, path: str, barrier: Any, results: Any) -> None:
    """Open the copy, wait until every reader has it open, read every value, wait again."""
    with ebooklet.open(ebooklet.S3Connection(**conn_spec), path, "r") as db:
        barrier.wait(WAIT)
        read = dict(db.items())
        barrier.wait(WAIT)  # all of them still open here
    results.put(read)


def read_keys(conn_spec: dict, path: str, keys: list[str], barrier: Any, results: Any) -> None:
    """Open the copy, start with the others, read ``keys`` one by one (cold ones downloaded)."""
    with ebooklet.open(ebooklet.S3Connection(**conn_spec), path, "r") as db:
        barrier.wait(WAIT)
        results.put({key: db[key] for key in keys})


def killed_writing(conn_spec: dict, path: str) -> None:
    """Fetch every value, and die by SIGKILL in the middle of writing them to the copy:
    half of the batch's bytes reach the file (a torn record), the rest never does."""

    def torn(fd: int, buffers: list) -> None:
        data = b"".join(bytes(b) for b in buffers)
        os.write(fd, data[: len(data) // 2 + 7])
        os.kill(os.getpid(), signal.SIGKILL)

    ebooklet._booklet_io._write_all = torn  # the crash, at the write of fetched values
    with ebooklet.open(ebooklet.S3Connection(**conn_spec), path, "r") as db:
        db.load_items()


def read_one(conn_spec: dict, path: str, key: str, results: Any) -> None:
    with ebooklet.open(ebooklet.S3Connection(**conn_spec), path, "r", timeout=WAIT) as db:
        results.put(db.get(key))


def open_writer_when_told(conn_spec: dict, path: str, ready: Any, go: Any, results: Any) -> None:
    """Open the copy with flag 'w' when told (imports done first), report its changes."""
    ready.set()
    go.wait(WAIT)
    with ebooklet.open(ebooklet.S3Connection(**conn_spec), path, "w", timeout=WAIT) as db:
        results.put(([(c.key, c.kind) for c in db.changes().iter_changes()], db["k001"]))


def double_length(key: str, value: str) -> int:
    return 2 * len(value)


def fail_on_k007(key: str, value: str) -> int:
    if key == "k007":
        raise ValueError("no k007 here")
    return 1


# --------------------------------------------------------------------------- tests


def test_readers_hold_one_copy_open_at_once(conn: Any, s3_server: Any, db_key: str, tmp_path: Path) -> None:
    """Four reader processes each hold the copy open while the others open and read it:
    the barrier breaks unless all four are open at the same time."""
    items = create(conn, tmp_path, 30)
    path = str(tmp_path / "copy.blt")
    with ebooklet.open(conn, path, "r") as db:
        db.load_items(progress=False)
    barrier, results = SPAWN.Barrier(4), SPAWN.Queue()
    children = [run(hold_and_read, spec(s3_server, db_key), path, barrier, results) for _ in range(4)]
    reads = [results.get(timeout=WAIT) for _ in children]
    join(children)
    assert reads == [items] * 4


def test_cold_values_fetched_by_four_processes_are_downloaded_once(
    conn: Any, s3_server: Any, db_key: str, tmp_path: Path
) -> None:
    """Four processes read disjoint and overlapping cold keys of one new copy at once:
    every value is right, and each is downloaded once or close to it (a process waits
    for a value another one is downloading, then finds it cached)."""
    if not s3_server.is_local:
        pytest.skip("counts the requests of the local moto_server")
    items = create(conn, tmp_path, 50)
    path = str(tmp_path / "copy.blt")
    with ebooklet.open(conn, path, "r") as db:  # the index shard, but no value, is local
        assert db.stat("k000").size == len(value(0))
    common = [f"k{i:03d}" for i in range(10)]
    plans = []
    for child in range(4):
        keys = common + [f"k{i:03d}" for i in range(10 + 10 * child, 20 + 10 * child)]
        random.Random(child).shuffle(keys)
        plans.append(keys)
    s3_server.server.reset_request_counts()
    barrier, results = SPAWN.Barrier(4), SPAWN.Queue()
    children = [run(read_keys, spec(s3_server, db_key), path, keys, barrier, results) for keys in plans]
    reads = [results.get(timeout=WAIT) for _ in children]
    join(children)
    for read in reads:
        assert read == {key: items[key] for key in read} and len(read) == 20
    downloads = pack_gets(s3_server, db_key)
    print("value downloads by four processes of 50 distinct keys:", downloads)
    assert 50 <= downloads <= 53, downloads
    s3_server.server.reset_request_counts()
    with ebooklet.open(conn, path, "r") as db:
        assert dict(db.items()) == items
    assert pack_gets(s3_server, db_key) == 0


def test_a_reader_killed_writing_values_leaves_a_cache_the_others_use(
    conn: Any, s3_server: Any, db_key: str, tmp_path: Path
) -> None:
    """A reader killed with SIGKILL halfway through writing fetched values leaves a torn
    record at the end of the data file: a reader that had the copy open meanwhile, and a
    fresh opener, read every value right; the next write repairs the file first, so that
    plain booklet reads it (the index whole, nothing appended after the torn record)."""
    items = create(conn, tmp_path, 40)
    path = str(tmp_path / "copy.blt")
    with ebooklet.open(conn, path, "r") as db:
        for key in list(items)[:5]:
            assert db[key] == items[key]
    with ebooklet.open(conn, path, "r") as other:
        size = os.path.getsize(path)
        child = run(killed_writing, spec(s3_server, db_key), path)
        join([child], exitcode=-signal.SIGKILL)
        assert os.path.getsize(path) > size  # the torn batch
        with open(path, "rb") as file:  # marked "not closed cleanly": the next write repairs it
            assert file.read(37)[33:37] == b"\xff" * 4
        assert dict(other.items()) == items
        for key in random.Random(1).sample(list(items), 10):
            assert other[key] == items[key]
    with ebooklet.open(conn, path, "r") as fresh:
        assert dict(fresh.items()) == items
    with booklet.open(path, "r") as book:
        assert dict(book.items()) == items


def test_a_writer_shares_the_copy_with_readers(
    conn: Any, make_conn: Any, s3_server: Any, db_key: str, tmp_path: Path
) -> None:
    """One writer at a time (a second one waits ``timeout``, then LockTimeoutError);
    readers open beside it and see its edits once flushed (``sync()``, a full write
    buffer, ``close()``), never before; the remote's head otherwise."""
    items = create(conn, tmp_path, 10)
    path = str(tmp_path / "copy.blt")
    results = SPAWN.Queue()
    with ebooklet.open(conn, path, "w") as writer:
        writer["k001"] = "edited"
        with pytest.raises(booklet.LockTimeoutError, match="one writer at a time"):
            ebooklet.open(make_conn(), path, "w", timeout=0.5)
        join([run(read_one, spec(s3_server, db_key), path, "k001", results)])
        assert results.get(timeout=WAIT) == items["k001"]  # not flushed: the head's value
        writer.sync()
        join([run(read_one, spec(s3_server, db_key), path, "k001", results)])
        assert results.get(timeout=WAIT) == "edited"
        del writer["k002"]
        writer["k003"] = "again"
        writer.sync()
        with ebooklet.open(make_conn(), path, "r") as reader:
            assert (reader.get("k002"), reader["k003"]) == (None, "again")
            writer["k003"] = "and again"
            writer.sync()
            assert reader["k003"] == "and again"  # its journal view catches up
            assert reader["k004"] == items["k004"]
    with ebooklet.open(conn, path, "w", timeout=0) as writer:  # the lock was given back
        assert writer["k003"] == "and again"


def test_flag_n_clear_and_prune_need_the_copy_alone(conn: Any, tmp_path: Path) -> None:
    """A write that moves or drops the data file's records raises LockTimeoutError while
    another process (here: another open) has the copy open."""
    create(conn, tmp_path, 5)
    path = str(tmp_path / "copy.blt")
    with ebooklet.open(conn, path, "r"):
        with ebooklet.open(conn, path, "w") as writer:
            with pytest.raises(booklet.LockTimeoutError, match="another process"):
                writer.clear()
            with pytest.raises(booklet.LockTimeoutError, match="another process"):
                writer.prune()
            assert writer["k001"] == value(1)
        with pytest.raises(booklet.LockTimeoutError, match="alone"):
            ebooklet.open(conn, path, "n")
    with ebooklet.open(conn, path, "w") as writer:
        writer.prune()


def test_map_runs_on_a_process_pool(conn: Any, tmp_path: Path) -> None:
    """``db.map`` with two processes returns every key's result; a function that raises
    reaches the caller with its own type and a note naming the key."""
    items = create(conn, tmp_path, 12)
    with ebooklet.open(conn, tmp_path / "copy.blt", "r") as db:
        assert db.map(double_length, processes=2) == {k: 2 * len(v) for k, v in items.items()}
        assert db.map(double_length, keys=["k003", "nope"], processes=2) == {"k003": 2 * len(items["k003"])}
        with pytest.raises(ValueError, match="no k007") as raised:
            db.map(fail_on_k007, processes=2)
        assert "k007" in raised.value.__notes__[-1]
        with pytest.raises(ValueError, match="1 or more"):
            db.map(double_length, processes=0)
        with pytest.raises(TypeError, match="processes"):
            db.map(double_length, processes=1.5)


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="counts sockets in /proc (Linux)")
def test_threads_of_one_process_overlap_their_downloads(fresh_server: Any, tmp_path: Path) -> None:
    """Four threads reading four cold keys have four requests in flight at once (the
    server frozen meanwhile): no lock of the copy is held across a download."""
    conn = fresh_server.connection("threads/db", threads=8)
    items = create(conn, tmp_path, 8)
    path = tmp_path / "copy.blt"
    with ebooklet.open(fresh_server.connection("threads/db", threads=8), path, "r") as db:
        assert db.stat("k000").size > 0  # the shard is local: only values are fetched
        port = int(fresh_server.endpoint_url.rsplit(":", 1)[1])
        fresh_server.server.pause()
        try:
            threads = [threading.Thread(target=db.get, args=(f"k00{i}",)) for i in range(4)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 10
            while connections_to(port) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            in_flight = connections_to(port)
        finally:
            fresh_server.server.resume()
        for thread in threads:
            thread.join(WAIT)
        assert in_flight >= 4
        assert {f"k00{i}": db[f"k00{i}"] for i in range(4)} == {f"k00{i}": items[f"k00{i}"] for i in range(4)}


def connections_to(port: int) -> int:
    """This process's TCP connections to ``port`` on loopback (Linux: /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[9] in inodes:
                count += 1
    return count


def test_a_writer_opening_while_a_snapshot_caches_values_finds_no_edit(
    conn: Any, s3_server: Any, db_key: str, tmp_path: Path
) -> None:
    """A snapshot reader (``commit=``) writes its values to the copy only while no writer
    has it, and records the data file's state after them (they are not the head's): a
    writer that opened right then (its writer lock taken between the reader's check and
    its record) found the snapshot's value as an edit made outside ebooklet, to push."""
    items = create(conn, tmp_path, 3)
    with ebooklet.open(conn, tmp_path / "creator.blt", "w") as db:
        db["k001"] = "new"
        db.changes().push()
    path = str(tmp_path / "copy.blt")
    with ebooklet.open(conn, path, "r"):
        pass  # the copy's head: commit 2
    ready, go, results = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    child = run(open_writer_when_told, spec(s3_server, db_key), path, ready, go, results)
    assert ready.wait(WAIT)
    writer_lock = ebooklet.local.FileLock(ebooklet.local.lock_paths(path)[1])

    def writer_opens() -> None:  # as the snapshot writes its value: a writer opens
        go.set()
        deadline = time.monotonic() + 1
        while writer_lock.acquire(0):  # not yet taken by the writer (or held by the reader)
            writer_lock.release()
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)

    try:
        with ebooklet.open(conn, path, "r", commit=1) as snap:
            snap._replica.data.before_write = writer_opens
            assert snap["k001"] == items["k001"]
        join([child])
        # the snapshot's cached value is older than the head, not a local edit
        assert results.get(timeout=WAIT) == ([("k001", "remote_changed")], "new")
    finally:
        writer_lock.close()


MAP_IN_MAIN = """
import ebooklet
def size(key, value):  # in __main__ of `python -c`, as in a notebook: workers cannot import it
    return len(value)
with ebooklet.open(None, "db", "n", key_serializer="str", value_serializer="str") as db:
    db.update({"a": "x", "b": "yy"})
    db.map(size, processes=1)
"""


def test_map_of_a_function_the_workers_cannot_import_raises(tmp_path: Path) -> None:
    """A function defined in ``__main__`` without a file (a notebook, ``python -c``)
    cannot be loaded by a spawned worker: map() raises that error, with a note saying
    what to do; it waited forever (each worker died getting its task), and a lambda
    failed only after every value was loaded."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(ebooklet.__file__).parents[1]))
    child = subprocess.run(
        [sys.executable, "-c", MAP_IN_MAIN], cwd=tmp_path, capture_output=True, env=env, timeout=30
    )
    err = child.stderr.decode()
    assert child.returncode == 1, err[-3000:]
    assert "AttributeError: Can't get attribute 'size'" in err and "define it in a module" in err
    with ebooklet.open(None, tmp_path / "db", "r") as db:
        with pytest.raises(Exception, match="local object|lambda") as caught:
            db.map(lambda key, value: 1, processes=1)
        assert "define it in a module" in caught.value.__notes__[0]


def test_a_replaced_remote_does_not_delete_a_copy_open_elsewhere(
    conn: Any, make_conn: Any, tmp_path: Path
) -> None:
    """The remote was replaced by another database (a new uuid): an open that finds the
    copy's data file open elsewhere (another process, here a writer whose edit is not
    flushed yet) refuses, and leaves the file; it deleted the file from under the writer,
    whose edit, flushed there afterwards, was lost with it."""
    create(conn, tmp_path, 3)
    path = tmp_path / "copy.blt"
    with ebooklet.open(conn, path, "w", lock="push") as writer:
        writer["k001"] = "pending"  # in memory: not flushed yet
        with ebooklet.open(make_conn(), tmp_path / "other.blt", "n", value_serializer="str") as other:
            other["x"] = "another database"
            other.changes().push()
        inode = os.stat(path).st_ino
        with pytest.raises(ebooklet.EBookletError, match="open in another process"):
            ebooklet.open(make_conn(), path, "r")
        writer.sync()
        assert os.stat(path).st_ino == inode
    with booklet.open(str(path)) as book:
        assert book["k001"] == "pending"
