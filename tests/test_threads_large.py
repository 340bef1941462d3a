"""Behaviours 11 and 12: one EBooklet shared by threads; large values in bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ebooklet
from conftest import S3Target

# --------------------------------------------------------------------------- threads

N_THREADS = 8
N_REMOTE = 400
HALF = N_REMOTE // 2  # keys r0..r199 are changed by the threads, r200..r399 only read
PER_THREAD = 60


def remote_value(i: int) -> dict:
    return {"remote": i, "pad": "r" * (i % 50)}


def run_threads(worker: Callable[[int], None], n: int = N_THREADS) -> None:
    """Run ``worker(t)`` in ``n`` threads started together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            barrier.wait()
            worker(t)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(n)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, to make races likely
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
    finally:
        sys.setswitchinterval(old)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_eight_threads_reading_and_writing_one_database(
    conn: Any, reader: Any, tmp_path: Path
) -> None:
    """Each thread writes its own keys, overwrites and deletes some remote keys of its
    own, and reads remote keys (fetched lazily, shards and values shared with the other
    threads); every read is checked as it happens, then the pushed result from a fresh
    copy."""
    remote = {f"r{i}": remote_value(i) for i in range(N_REMOTE)}
    with ebooklet.open(conn, tmp_path / "seed", "n", value_serializer="pickle") as db:
        db.update(remote)
        db.changes().push()

    expected = dict(remote)
    lock = threading.Lock()
    with ebooklet.open(conn, tmp_path / "db", "w", value_serializer="pickle") as db:

        def worker(t: int) -> None:
            mine: dict[str, Any] = {}
            for j in range(PER_THREAD):
                key = f"t{t}-{j}"
                db[key] = mine[key] = {"thread": t, "j": j}
                shared = f"r{HALF + (t * 37 + j * 11) % HALF}"  # read by all, changed by none
                assert db[shared] == remote[shared]
                own = f"r{(j * N_THREADS + t) % HALF}"  # remote keys only thread t changes
                if j % 3 == 0:
                    db[own] = mine[own] = {"changed by": t}
                elif j % 7 == 0 and own in db:
                    del db[own]
                    mine[own] = None
                assert db[key] == mine[key]
                if j % 10 == 0:
                    got = dict(db.get_items([f"t{t}-{k}" for k in range(j + 1)]))
                    assert got == {k: v for k, v in mine.items() if k.startswith(f"t{t}-")}
            for key, value in mine.items():
                assert db.get(key) == value
            with lock:
                for key, value in mine.items():
                    if value is None:
                        expected.pop(key, None)
                    else:
                        expected[key] = value

        run_threads(worker)
        assert len(db) == len(expected)
        assert dict(db.items()) == expected
        result = db.changes().push()
        assert result.committed
        assert list(db.changes().iter_changes()) == []

    with ebooklet.open(reader(conn), tmp_path / "fresh", "r", value_serializer="pickle") as fresh:
        assert len(fresh) == len(expected)
        run_threads(lambda t: [fresh[k] for k in sorted(expected)[t::N_THREADS]])
        assert dict(fresh.items()) == expected


# --------------------------------------------------------------------------- large values

MiB = 1 << 20
N_LARGE = 12
LARGE_SIZE = 32 * MiB
TOTAL = N_LARGE * LARGE_SIZE
PEAK_LIMIT = TOTAL // 2
"""Half the total data size. At its peak a push holds about 2 values (the value and
booklet's block read it is sliced from: 64 MiB) and a pull about 3 (the value,
booklet's header + value copy and its write buffer: 96 MiB), so values piling up
fail this bound while allocator noise does not. The peak is the step's process's
own (``VmHWM`` on Linux): ``ru_maxrss`` starts at the parent's peak after ``exec``,
so under a big pytest process it read ~246 MiB whatever the step did."""

LARGE_SCRIPT = r"""
import hashlib, json, random, resource, sys, time
import psutil
import ebooklet

args = json.loads(sys.argv[1])
conn = ebooklet.S3Connection(
    args["access_key_id"], args["access_key"], args["db_key"], args["bucket"],
    endpoint_url=args["endpoint_url"], region=args["region"],
)
scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere


def peak_rss():
    # Linux: VmHWM is this address space's peak; ru_maxrss would start at the peak of
    # the parent (pytest) that forked us, since exec carries it over.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure(step):
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    result = step()
    return {"growth": peak_rss() - before, "seconds": time.perf_counter() - start, "result": result}


out = {}
if args["phase"] == "write":  # one value in memory at a time
    with ebooklet.open(conn, args["path"], "n") as db:
        for i in range(args["n"]):
            value = random.Random(i).randbytes(args["size"])
            out[f"v{i}"] = hashlib.md5(value).hexdigest()
            db[f"v{i}"] = value
            del value
elif args["phase"] == "push":
    with ebooklet.open(conn, args["path"], "w") as db:
        out = measure(lambda: db.changes().push().keys_pushed)
elif args["phase"] == "pull":
    with ebooklet.open(conn, args["path"], "r") as db:
        out = measure(db.load_items)
        out["md5"] = {}
        for key in sorted(db.keys()):  # after the measurement: this holds whole values
            out["md5"][key] = hashlib.md5(db[key]).hexdigest()
print(json.dumps(out))
"""


def run_large_step(target: S3Target, db_key: str, phase: str, path: Path) -> dict:
    params = {
        "phase": phase, "path": str(path), "db_key": db_key, "n": N_LARGE, "size": LARGE_SIZE,
        "access_key_id": target.access_key_id, "access_key": target.access_key,
        "bucket": target.bucket, "endpoint_url": target.endpoint_url, "region": target.region,
    }
    done = subprocess.run(
        [sys.executable, "-c", LARGE_SCRIPT, json.dumps(params)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def large_run(s3_server: S3Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Write 12 x 32 MiB values, push them, and load them into a fresh copy, each step
    in its own process; yields what each step measured."""
    pytest.importorskip("resource")
    pytest.importorskip("psutil")
    prefix = f"tests/large-values-{uuid.uuid4().hex[:8]}/"
    tmp = tmp_path_factory.mktemp("large")
    try:
        written = run_large_step(s3_server, prefix + "db", "write", tmp / "writer")
        pushed = run_large_step(s3_server, prefix + "db", "push", tmp / "writer")
        pulled = run_large_step(s3_server, prefix + "db", "pull", tmp / "reader")
        print(
            f"\nlarge values: {N_LARGE} x {LARGE_SIZE // MiB} MiB; peak RSS growth "
            f"push {pushed['growth'] / MiB:.0f} MiB in {pushed['seconds']:.1f} s, "
            f"pull {pulled['growth'] / MiB:.0f} MiB in {pulled['seconds']:.1f} s",
            file=sys.stderr,
        )
        yield {"written": written, "push": pushed, "pull": pulled}
    finally:
        s3_server.delete_prefix(prefix)


def test_large_values_round_trip(large_run: dict) -> None:
    assert large_run["push"]["result"] == N_LARGE
    assert large_run["pull"]["result"] == N_LARGE
    assert large_run["pull"]["md5"] == large_run["written"]


def test_large_values_push_in_bounded_memory(large_run: dict) -> None:
    growth = large_run["push"]["growth"]
    assert growth < PEAK_LIMIT, f"push peak RSS grew by {growth / MiB:.0f} MiB"


def test_large_values_pull_in_bounded_memory(large_run: dict) -> None:
    growth = large_run["pull"]["growth"]
    assert growth < PEAK_LIMIT, f"pull peak RSS grew by {growth / MiB:.0f} MiB"


def test_large_values_of_mixed_sizes_pulled_through_reused_buffers(conn: Any, tmp_path: Path) -> None:
    """More large values than fit in flight at once, of sizes that make the pull reuse
    some download buffers and allocate others; each value must come out whole."""
    import random

    sizes = [9, 20, 9, 30, 10, 25, 9]  # MiB; each over remote.PART_SIZE (8 MiB)
    values = {f"big{i}": random.Random(i).randbytes(size << 20) for i, size in enumerate(sizes)}
    values["small"] = b"tiny"
    with ebooklet.open(conn, tmp_path / "writer", "n", value_serializer="bytes") as db:
        db.update(values)
        db.changes().push()
    with ebooklet.open(conn, tmp_path / "items", "r") as db:
        assert dict(db.items()) == values
    with ebooklet.open(conn, tmp_path / "load", "r") as db:
        assert db.load_items() == len(values)
    with ebooklet.open(None, tmp_path / "load", "r") as db:  # read back offline
        assert {k: db[k] for k in values} == values


def test_download_buffers_too_small_for_the_next_value_are_dropped() -> None:
    """Reused download buffers stay bounded: the smallest that fits is taken, and when
    none fits, the small ones are let go instead of piling up as values grow."""
    from ebooklet.remote import _buffer_for

    free = [bytearray(30), bytearray(10), bytearray(20)]
    assert len(_buffer_for(free, 15)) == 20
    assert sorted(map(len, free)) == [10, 30]
    fresh = _buffer_for(free, 40)  # grows as the bytes arrive: a claimed size is not allocated
    assert len(fresh) == 0 and free == []


def test_values_above_put_max_go_by_multipart_and_come_back_whole(
    conn: Any, s3_server: S3Target, db_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pack over ``PUT_MAX`` is uploaded in parts of ``PART_SIZE``, the footer in the
    last part, which also takes the tail of the value (no tiny last part); the value
    reads back whole, and no multipart upload is left open."""
    import random

    from ebooklet import remote

    monkeypatch.setattr(remote, "PUT_MAX", 2 * remote.PART_SIZE)  # 16 MiB instead of 64 MiB
    values = {
        "three parts": random.Random(1).randbytes(3 * remote.PART_SIZE - 5),
        "two parts": random.Random(2).randbytes(remote.PART_SIZE * 5 // 2),  # tail folded in
        "one put": random.Random(3).randbytes(remote.PART_SIZE + 1),
        "small": b"tiny",
    }
    with ebooklet.open(conn, tmp_path / "writer", "n", value_serializer="bytes") as db:
        db.update(values)
        db.changes().push()
    client = s3_server.client()
    etags = sorted(
        obj["ETag"].strip('"').partition("-")[2]
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=s3_server.bucket, Prefix=db_key + ".ebk/pack/"
        )
        for obj in page.get("Contents", [])
    )
    assert etags == ["", "", "2", "3"]  # multipart ETags end with "-<number of parts>"
    uploads = client.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=db_key)
    assert not uploads.get("Uploads")
    with ebooklet.open(conn, tmp_path / "reader", "r") as db:
        assert dict(db.items()) == values
