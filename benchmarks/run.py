#!/usr/bin/env python
"""Benchmarks: ebooklet against plain boto3 on the same S3 server, in the same run.

    python benchmarks/run.py             # the full run (about 5-10 minutes)
    python benchmarks/run.py --quick     # smaller sizes, under two minutes
    python benchmarks/run.py --quick --tiny --out /tmp/x.json   # seconds (smoke test)

Every workload gets its own ``moto_server`` (:class:`ebooklet.server.LocalS3Server`,
a separate process on loopback; moto keeps everything in memory, so a fresh one per
workload keeps them independent). Each step of a workload (setup, the ebooklet side,
the boto3 side) runs in a fresh Python subprocess, which reports its peak RSS
(Linux ``VmHWM``, else ``resource.getrusage``). HTTP requests are counted per phase from the server's
access log: before and after every timed phase the child asks this process, over a
pipe, for the server's ``request_counts()`` since the previous question, so setup
and bookkeeping requests never leak into a phase.

The boto3 references use one client with ``max_pool_connections=threads`` and the
``when_required`` checksum settings, and a thread pool of the same size as
ebooklet's ``S3Connection(threads=...)``.

Results: a table on stdout and JSON in ``benchmarks/results/<date>.json`` (or
``--out``). ``--profile DIR`` writes a cProfile file per ebooklet phase (main
thread only).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import gc
import importlib.util
import json
import math
import os
import platform
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_SRC = HERE.parent / "src"
if importlib.util.find_spec("ebooklet") is None and (_SRC / "ebooklet").is_dir():
    sys.path.insert(0, str(_SRC))

MiB = 1 << 20
BUCKET = "ebooklet-bench"
DB_KEY = "bench/db"

# Sizes of each mode. small_*: the many-small-values database (also read cold and
# changed incrementally); large_*: the large values; local_*: the local-only run.
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(
        small_n=20_000, small_size=1024, random_keys=200, change_fraction=0.01,
        large_n=8, large_size=32 * MiB, local_n=100_000, local_size=100,
        scale_sizes=[10_000, 100_000, 1_000_000], scale_size=100, scale_update_n=100_000,
        scale_get_n=100_000, previous_n=100_000, previous_size=100,
        dask_n=100_000, dask_size=1024, dask_partitions=8,
        proc_n=20_000, proc_size=100, proc_passes=20,
    ),
    "quick": dict(
        small_n=5_000, small_size=1024, random_keys=200, change_fraction=0.01,
        large_n=4, large_size=16 * MiB, local_n=30_000, local_size=100,
        scale_sizes=[10_000, 100_000], scale_size=100, scale_update_n=100_000,
        scale_get_n=100_000, previous_n=100_000, previous_size=100,
        dask_n=30_000, dask_size=1024, dask_partitions=4,
        proc_n=10_000, proc_size=100, proc_passes=10,
    ),
    "tiny": dict(
        small_n=300, small_size=1024, random_keys=20, change_fraction=0.05,
        large_n=2, large_size=1 * MiB, local_n=2_000, local_size=100,
        scale_sizes=[500, 2_000], scale_size=100, scale_update_n=1_000,
        scale_get_n=1_000, previous_n=2_000, previous_size=100,
        dask_n=2_000, dask_size=1024, dask_partitions=2,
        proc_n=500, proc_size=100, proc_passes=2,
    ),
}


# =============================================================================
# The child side: one step of one workload, in its own process.
# =============================================================================


class Ctx:
    """What a workload step gets: where the server is, sizes, and timed phases."""

    def __init__(self, spec: dict, proto_in: Any, proto_out: Any):
        self.spec = spec
        self.sizes: dict[str, Any] = spec["sizes"]
        self.threads: int = spec["threads"]
        self.endpoint: str = spec["endpoint"]
        self.workdir = Path(spec["workdir"])
        self.profile_dir = Path(spec["profile_dir"]) if spec.get("profile_dir") else None
        self.db_key: str = spec.get("db_key", DB_KEY)
        self.name = f"{spec['workload']}.{spec['step']}"
        self.phases: dict[str, dict] = {}
        self.metrics: dict[str, Any] = {}
        self._in, self._out = proto_in, proto_out
        self._client: Any = None

    # ---- talking to the parent

    def _server_counts(self) -> dict:
        """Requests the server logged since the previous call (asks the parent)."""
        self._out.write("@counts\n")
        self._out.flush()
        return json.loads(self._in.readline())

    @contextlib.contextmanager
    def phase(self, name: str, profile: bool = True) -> Iterator[dict]:
        """Time a phase and count the requests it sent; yields its result dict.

        A phase timed several times (the local reads) keeps its fastest run."""
        record: dict[str, Any] = {}
        self._server_counts()  # drop whatever came before
        profiler = None
        if profile and self.profile_dir is not None:
            profiler = cProfile.Profile()
            profiler.enable()
        cpu = time.process_time()
        start = time.perf_counter()
        try:
            yield record
        finally:
            seconds = time.perf_counter() - start
            record["client_cpu"] = time.process_time() - cpu
            if profiler is not None:
                profiler.disable()
                self.profile_dir.mkdir(parents=True, exist_ok=True)
                profiler.dump_stats(str(self.profile_dir / f"{self.name}.{name}.prof"))
            counts = self._server_counts()
            record.update(seconds=seconds, peak_rss_after=_peak_rss(), **counts)
            if name not in self.phases or seconds < self.phases[name]["seconds"]:
                self.phases[name] = record

    # ---- S3 access

    def conn(self, **kw: Any) -> Any:
        import ebooklet

        kw.setdefault("threads", self.threads)
        return ebooklet.S3Connection(
            "testing", "testing", self.db_key, BUCKET, endpoint_url=self.endpoint, **kw
        )

    def client(self) -> Any:
        """A plain boto3 client, pool sized for the thread pool, warmed up."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
                region_name="us-east-1",
                config=Config(
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    max_pool_connections=self.threads,
                    s3={"addressing_style": "path"},
                ),
            )
            self._client.head_bucket(Bucket=BUCKET)  # resolve endpoints, open a connection
        return self._client

    def pool_map(self, func: Callable, items: list) -> list:
        with ThreadPoolExecutor(self.threads) as pool:
            return list(pool.map(func, items))

    def listing(self, prefix: str = DB_KEY) -> dict[str, tuple[str, int]]:
        """``key -> (etag, size)`` of every object under ``prefix``."""
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=prefix
        ):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = (obj["ETag"], obj["Size"])
        return out

    def path(self, name: str) -> str:
        return str(self.workdir / name)


# ---------------------------------------------------------------- data


def small_items(n: int, size: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """``n`` keys with random values of ``size`` bytes (deterministic)."""
    rng = random.Random(seed)
    return [(f"key{i:07d}", rng.randbytes(size)) for i in range(n)]


def random_keys(n_keys: int, k: int, seed: int = 2) -> list[str]:
    return [f"key{i:07d}" for i in random.Random(seed).sample(range(n_keys), k)]


def large_value(i: int, size: int) -> bytes:
    return random.Random(1000 + i).randbytes(size)


def load_small_db(ctx: Ctx, path: str) -> None:
    """Setup: write the small-values database and push it (not timed)."""
    import ebooklet

    s = ctx.sizes
    with ebooklet.open(ctx.conn(), path, "n") as db:
        db.update(small_items(s["small_n"], s["small_size"]))
        db.changes().push()


# ---------------------------------------------------------------- workloads


def small_push_ebooklet(ctx: Ctx) -> None:
    import ebooklet

    items = small_items(ctx.sizes["small_n"], ctx.sizes["small_size"])
    db = ebooklet.open(ctx.conn(), ctx.path("writer.blt"), "n")
    try:
        with ctx.phase("local_write"):
            for key, value in items:
                db[key] = value
            db.sync()
        with ctx.phase("push") as ph:
            result = db.changes().push()
            ph["bytes_uploaded"] = result.bytes_uploaded
    finally:
        db.close()
    listing = ctx.listing()
    ctx.metrics["packs"] = sum(".ebk/pack/" in k for k in listing)
    ctx.metrics["shards"] = sum(".ebk/index/" in k for k in listing)
    ctx.metrics["bucket_bytes"] = sum(size for _, size in listing.values())


def boto3_puts(ctx: Ctx, items: list[tuple[str, bytes]], name: str) -> None:
    """The two boto3 references for uploading ``items``: the floor (one PUT of all the
    bytes, as ``boto3/<name>``) and what naive code does (one PUT per item, pooled)."""
    client = ctx.client()
    blob = b"".join(v for _, v in items)
    with ctx.phase("one_put"):
        client.put_object(Bucket=BUCKET, Key=f"boto3/{name}", Body=blob)
    del blob

    def put(item: tuple[str, bytes]) -> None:
        client.put_object(Bucket=BUCKET, Key=f"boto3/{item[0]}", Body=item[1])

    with ctx.phase("many_puts"):
        ctx.pool_map(put, items)


def small_push_boto3(ctx: Ctx) -> None:
    boto3_puts(ctx, small_items(ctx.sizes["small_n"], ctx.sizes["small_size"]), "all")


def cold_read_setup(ctx: Ctx) -> None:
    s = ctx.sizes
    load_small_db(ctx, ctx.path("writer.blt"))
    items = dict(small_items(s["small_n"], s["small_size"]))
    client = ctx.client()
    client.put_object(Bucket=BUCKET, Key="boto3/all", Body=b"".join(items.values()))
    wanted = random_keys(s["small_n"], s["random_keys"])
    ctx.pool_map(
        lambda k: client.put_object(Bucket=BUCKET, Key=f"boto3/{k}", Body=items[k]), wanted
    )


def cold_read_ebooklet(ctx: Ctx) -> None:
    import ebooklet

    s = ctx.sizes
    wanted = random_keys(s["small_n"], s["random_keys"])
    # Each phase includes opening a fresh local file (one manifest GET) and closing it.
    with (
        ctx.phase("random_keys") as ph,
        ebooklet.open(ctx.conn(), ctx.path("some.blt"), "r") as db,
    ):
        ph["bytes"] = sum(len(db[k]) for k in wanted)
    with (
        ctx.phase("read_all_items") as ph,
        ebooklet.open(ctx.conn(), ctx.path("all.blt"), "r") as db,
    ):
        ph["bytes"] = sum(len(v) for _, v in db.items())
    with (
        ctx.phase("read_all_load_items") as ph,
        ebooklet.open(ctx.conn(), ctx.path("loaded.blt"), "r") as db,
    ):
        db.load_items()
        ph["bytes"] = sum(len(v) for _, v in db.items())
    del db  # freed here, not inside the next phase when the name is rebound
    with ctx.phase("warm_reopen"):
        db = ebooklet.open(ctx.conn(), ctx.path("all.blt"), "r")
    ok = db[wanted[0]] is not None
    db.close()
    ctx.metrics["warm_read_ok"] = ok
    with ctx.phase("open_w"):
        db = ebooklet.open(ctx.conn(), ctx.path("all.blt"), "w")
    db.close()


def cold_read_boto3(ctx: Ctx) -> None:
    s = ctx.sizes
    client = ctx.client()
    wanted = random_keys(s["small_n"], s["random_keys"])
    with ctx.phase("one_get") as ph:
        ph["bytes"] = len(client.get_object(Bucket=BUCKET, Key="boto3/all")["Body"].read())
    with ctx.phase("get_and_booklet_write") as ph:
        ph["bytes"] = _get_into_booklet(ctx, client, s["small_n"], s["small_size"])
    with ctx.phase("random_keys") as ph:
        ph["bytes"] = sum(
            len(client.get_object(Bucket=BUCKET, Key=f"boto3/{k}")["Body"].read())
            for k in wanted
        )


def _get_into_booklet(ctx: Ctx, client: Any, n: int, size: int) -> int:
    """The least a cold read of everything can cost with a booklet cache: one GET of
    all the bytes, then each value written into a fresh booklet file (as ebooklet's
    cache is sized: twice as many buckets as keys), with its timestamp."""
    import booklet

    blob = client.get_object(Bucket=BUCKET, Key="boto3/all")["Body"].read()
    keys = [k for k, _ in small_items(n, 0)]
    with booklet.open(ctx.path("raw.blt"), "n", key_serializer="str", value_serializer=None,
                      n_buckets=2 * n) as db:
        for i, key in enumerate(keys):
            db.set(key, blob[i * size:(i + 1) * size], timestamp=1_700_000_000_000_000)
    return len(blob)


def incremental_setup(ctx: Ctx) -> None:
    load_small_db(ctx, ctx.path("writer.blt"))


def changed_items(ctx: Ctx) -> list[tuple[str, bytes]]:
    s = ctx.sizes
    n = max(1, round(s["small_n"] * s["change_fraction"]))
    rng = random.Random(3)
    keys = random_keys(s["small_n"], n, seed=4)
    return [(k, rng.randbytes(s["small_size"])) for k in keys]


def incremental_ebooklet(ctx: Ctx) -> None:
    import ebooklet

    changes = changed_items(ctx)
    with ebooklet.open(ctx.conn(), ctx.path("writer.blt"), "w") as db:
        for key, value in changes:
            db[key] = value
        before = ctx.listing()  # after open: the lock object is not part of the push
        with ctx.phase("push") as ph:
            result = db.changes().push()
            ph["keys_pushed"] = result.keys_pushed
    after = ctx.listing()
    new = {k: size for k, (etag, size) in after.items() if before.get(k, (None,))[0] != etag}
    ctx.metrics["changed_bytes"] = sum(len(v) for _, v in changes)
    ctx.metrics["uploaded_bytes"] = sum(new.values())
    ctx.metrics["shard_bytes"] = sum(v for k, v in new.items() if ".ebk/index/" in k)
    ctx.metrics["pack_bytes"] = sum(v for k, v in new.items() if ".ebk/pack/" in k)
    ctx.metrics["shards_touched"] = sum(".ebk/index/" in k for k in new)
    ctx.metrics["shards_total"] = sum(".ebk/index/" in k for k in after) - sum(
        ".ebk/index/" in k for k in new
    )


def incremental_boto3(ctx: Ctx) -> None:
    boto3_puts(ctx, changed_items(ctx), "changes")


def large_ebooklet(ctx: Ctx) -> None:
    import ebooklet

    s = ctx.sizes
    with ebooklet.open(ctx.conn(), ctx.path("writer.blt"), "n") as db:
        for i in range(s["large_n"]):
            db[f"big{i}"] = large_value(i, s["large_size"])
        db.sync()
        with ctx.phase("push") as ph:
            ph["bytes"] = db.changes().push().bytes_uploaded
    with (
        ctx.phase("pull") as ph,
        ebooklet.open(ctx.conn(), ctx.path("reader.blt"), "r") as db,
    ):
        ph["values"] = db.load_items()
    ph["bytes"] = s["large_n"] * s["large_size"]


def large_boto3(ctx: Ctx) -> None:
    """boto3 moving the same bytes between local files and S3 (as ebooklet does)."""
    s = ctx.sizes
    client = ctx.client()
    src, dst = ctx.workdir / "boto3-src", ctx.workdir / "boto3-dst"
    src.mkdir()
    dst.mkdir()
    for i in range(s["large_n"]):
        (src / f"big{i}").write_bytes(large_value(i, s["large_size"]))

    def put(i: int) -> None:
        with open(src / f"big{i}", "rb") as f:
            client.put_object(Bucket=BUCKET, Key=f"boto3/big{i}", Body=f)

    def get(i: int) -> int:
        body = client.get_object(Bucket=BUCKET, Key=f"boto3/big{i}")["Body"]
        with open(dst / f"big{i}", "wb") as f:
            for chunk in body.iter_chunks(1 << 20):
                f.write(chunk)
            return f.tell()

    with ctx.phase("push") as ph:
        ctx.pool_map(put, list(range(s["large_n"])))
    ph["bytes"] = s["large_n"] * s["large_size"]
    with ctx.phase("pull") as ph:
        ph["bytes"] = sum(ctx.pool_map(get, list(range(s["large_n"]))))


def local_items(ctx: Ctx) -> tuple[list[tuple[str, bytes]], list[str]]:
    s = ctx.sizes
    items = small_items(s["local_n"], s["local_size"], seed=5)
    order = [k for k, _ in items]
    random.Random(6).shuffle(order)
    return items, order


LOCAL_READ_PASSES = 3


def _local_phases(ctx: Ctx, db: Any) -> None:
    items, order = local_items(ctx)
    with ctx.phase("set"):
        for key, value in items:
            db[key] = value
        db.sync()
    for _ in range(LOCAL_READ_PASSES):  # CPU-bound and short: the fastest pass is the least noisy
        with ctx.phase("get") as ph:
            ph["bytes"] = sum(len(db[k]) for k in order)
        with ctx.phase("iterate") as ph:
            ph["bytes"] = sum(len(v) for _, v in db.items())


def local_ebooklet(ctx: Ctx) -> None:
    import ebooklet

    with ebooklet.open(None, ctx.path("local.blt"), "n") as db:
        _local_phases(ctx, db)


def local_booklet(ctx: Ctx) -> None:
    import booklet

    with booklet.open(ctx.path("raw.blt"), "n", key_serializer="str", value_serializer=None) as db:
        _local_phases(ctx, db)


# ---------------------------------------------------------------- scale

# The scale workload: one database of N keys with 100 B values, each phase in a fresh
# process (so that its peak RSS is its own), in this order on one server per N.

_SCALE_BLOB = random.Random(7).randbytes(8192)


def scale_key(i: int) -> str:
    return f"key{i:09d}"


def scale_value(i: int, size: int, salt: int = 0) -> bytes:
    """A value unique to ``(i, salt)`` (no two alike, so none is deduplicated), made
    in well under a microsecond."""
    head = (i * 4 + salt).to_bytes(8, "little")
    start = (i * 61 + salt * 17) % (len(_SCALE_BLOB) - size)
    return head + _SCALE_BLOB[start:start + size - 8]


def _scale_sample(ctx: Ctx, k: int, seed: int) -> list[int]:
    n = ctx.spec["n"]
    return random.Random(seed).sample(range(n), min(k, n))


def _local_files_bytes(path: str) -> int:
    """Bytes of a local database: its booklet file and the files beside it."""
    base = Path(path)
    return sum(p.stat().st_size for p in base.parent.glob(base.name + "*") if p.is_file())


def _scale_conn(ctx: Ctx) -> Any:
    """The step's S3 connection, made before any timed phase: the first one in a process
    imports botocore's credential chain (its time is kept as a metric)."""
    start = time.perf_counter()
    conn = ctx.conn()
    ctx.metrics.setdefault("first_connection_s", time.perf_counter() - start)
    return conn


def scale_write(ctx: Ctx) -> None:
    """Local write loop of N keys into a new file (with the remote), then close()."""
    import ebooklet

    conn = _scale_conn(ctx)
    n, size = ctx.spec["n"], ctx.sizes["scale_size"]
    start = time.perf_counter()
    for i in range(n):  # what the loop costs without the database
        scale_key(i), scale_value(i, size)
    ctx.metrics["loop_overhead_us"] = (time.perf_counter() - start) / n * 1e6
    db = ebooklet.open(conn, ctx.path("writer.blt"), "n")
    with ctx.phase("write_loop") as ph:
        for i in range(n):
            db[scale_key(i)] = scale_value(i, size)
        ph["keys"] = n
    with ctx.phase("close"):
        db.close()
    ctx.metrics["local_file_bytes"] = _local_files_bytes(ctx.path("writer.blt"))


def scale_initial_push(ctx: Ctx) -> None:
    import ebooklet

    conn = _scale_conn(ctx)
    with ctx.phase("open_w"):
        db = ebooklet.open(conn, ctx.path("writer.blt"), "w")
    try:
        with ctx.phase("initial_push") as ph:
            result = db.changes().push()
            ph["keys"] = result.keys_pushed
            ph["bytes_uploaded"] = result.bytes_uploaded
    finally:
        db.close()


def scale_boto3_push(ctx: Ctx) -> None:
    """The initial push's reference: plain boto3 PUTting as many bytes as the push sent
    (packs and index shards, on the wire) in as many objects as it sent PUTs, on the same
    number of threads."""
    n_objects, total = ctx.spec["push_puts"], ctx.spec["push_bytes"]
    blob = random.Random(15).randbytes(-(-total // n_objects))
    client = ctx.client()

    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"boto3/pack{i}", Body=blob)

    with ctx.phase("boto3_push") as ph:
        ctx.pool_map(put, list(range(n_objects)))
        ph["bytes"] = n_objects * len(blob)


def scale_warm_reopen(ctx: Ctx) -> None:
    import ebooklet

    conn = _scale_conn(ctx)
    with ctx.phase("warm_reopen"):
        db = ebooklet.open(conn, ctx.path("writer.blt"), "r")
    db.close()


def scale_cold_read(ctx: Ctx) -> None:
    """Open into a fresh local file, then read one key."""
    import ebooklet

    conn = _scale_conn(ctx)
    key = scale_key(_scale_sample(ctx, 1, seed=11)[0])
    with ctx.phase("cold_open"):
        db = ebooklet.open(conn, ctx.path("cold.blt"), "r")
    try:
        ctx.metrics["cold_file_bytes_after_open"] = _local_files_bytes(ctx.path("cold.blt"))
        with ctx.phase("cold_read_one") as ph:
            ph["value_bytes"] = len(db[key])
    finally:
        db.close()


def scale_cold_len(ctx: Ctx) -> None:
    import ebooklet

    conn = _scale_conn(ctx)
    with ctx.phase("cold_len") as ph:  # from nothing to the count: open included
        db = ebooklet.open(conn, ctx.path("cold-len.blt"), "r")
        ph["len"] = len(db)
    db.close()
    ctx.metrics["len_ok"] = ph["len"] == ctx.spec["n"]


def _scale_push_changes(ctx: Ctx, indexes: list[int], salt: int, name: str) -> None:
    import ebooklet

    conn = _scale_conn(ctx)
    size = ctx.sizes["scale_size"]
    with ctx.phase("open_w"):
        db = ebooklet.open(conn, ctx.path("writer.blt"), "w")
    try:
        for i in indexes:
            db[scale_key(i)] = scale_value(i, size, salt)
        with ctx.phase(name) as ph:
            result = db.changes().push()
            ph["keys"] = result.keys_pushed
            ph["bytes_uploaded"] = result.bytes_uploaded
    finally:
        db.close()


def scale_push_one(ctx: Ctx) -> None:
    _scale_push_changes(ctx, [ctx.spec["n"] // 2], 1, "push_one")


def scale_push_pct(ctx: Ctx) -> None:
    _scale_push_changes(ctx, _scale_sample(ctx, max(1, ctx.spec["n"] // 100), 12), 2,
                        "push_pct")


def scale_local_get(ctx: Ctx) -> None:
    """Random reads of the writer's own (pushed) values in its warm local file."""
    import ebooklet

    conn = _scale_conn(ctx)
    keys = [scale_key(i) for i in _scale_sample(ctx, ctx.sizes["scale_get_n"], 13)]
    with ebooklet.open(conn, ctx.path("writer.blt"), "r") as db:
        for _ in range(LOCAL_READ_PASSES):
            with ctx.phase("local_get") as ph:
                for key in keys:
                    db[key]
                ph["keys"] = len(keys)


def scale_update(ctx: Ctx) -> None:
    """``update()`` of changed values for 100k (or N) of the keys, then close()."""
    import ebooklet

    conn = _scale_conn(ctx)
    size = ctx.sizes["scale_size"]
    indexes = _scale_sample(ctx, ctx.sizes["scale_update_n"], 14)
    db = ebooklet.open(conn, ctx.path("writer.blt"), "w")
    with ctx.phase("update") as ph:
        db.update((scale_key(i), scale_value(i, size, 3)) for i in indexes)
        ph["keys"] = len(indexes)
    with ctx.phase("update_close"):
        db.close()


SCALE_STEPS: dict[str, Callable[[Ctx], None]] = {
    "write": scale_write,
    "initial_push": scale_initial_push,
    "boto3_push": scale_boto3_push,
    "warm_reopen": scale_warm_reopen,
    "cold_read": scale_cold_read,
    "cold_len": scale_cold_len,
    "push_one": scale_push_one,
    "push_pct": scale_push_pct,
    "local_get": scale_local_get,
    "update": scale_update,
}


# ---------------------------------------------------------------- previous generation

# The same code runs in ebooklet 0.11.1's venv (its S3Connection takes the same leading
# arguments, and it names open() open_ebooklet(), which we keep as an alias). 0.11.1
# has no local-only mode: both sides open with a remote, each under its own db key.


def previous_side(ctx: Ctx) -> None:
    """Local set and get of 100,000 values of 100 B in random order, then a push
    (not compared) and a warm reopen."""
    import ebooklet

    s = ctx.sizes
    items = small_items(s["previous_n"], s["previous_size"], seed=8)
    random.Random(9).shuffle(items)
    order = [k for k, _ in items]
    random.Random(10).shuffle(order)
    path = ctx.path(f"{ctx.spec['step']}.blt")
    db = ebooklet.open_ebooklet(ctx.conn(), path, "n")
    try:
        with ctx.phase("set") as ph:
            for key, value in items:
                db[key] = value
            ph["keys"] = len(items)
        with ctx.phase("sync"):
            db.sync()
        for _ in range(LOCAL_READ_PASSES):
            with ctx.phase("get") as ph:
                for key in order:
                    db[key]
                ph["keys"] = len(order)
        with ctx.phase("push"):
            db.changes().push()
    finally:
        db.close()
    del db  # freed here, not inside the next phase when the name is rebound
    gc.collect()
    conn = ctx.conn()
    with ctx.phase("warm_reopen"):
        db = ebooklet.open_ebooklet(conn, path, "r")
    db.close()
    ctx.metrics["version"] = getattr(ebooklet, "__version__", None)


# The dask workload (issue 14): one database of N values written and read by one process
# (ebooklet.open + update + push, open + load_items), then by ebooklet.dask on a
# LocalCluster of two worker processes of one thread (write_bag of a bag made on the
# workers, read_bag reduced on the workers: no value goes through the client).

DASK_WORKERS = 2


def dask_item(i: int, size: int) -> tuple[str, bytes]:
    """Key ``i`` and its value: ``size`` bytes, distinct per key (no dedup)."""
    return f"key{i:07d}", (i.to_bytes(8, "little") * (size // 8 + 1))[:size]


def _value_bytes(part: Any) -> list[int]:
    return [sum(len(value) for _, value in part)]


def dask_process(ctx: Ctx) -> None:
    """One process: write the database with ebooklet.open and push, read it back whole."""
    import ebooklet

    n, size = ctx.sizes["dask_n"], ctx.sizes["dask_size"]
    items = [dask_item(i, size) for i in range(n)]
    with ctx.phase("write"), ebooklet.open(ctx.conn(), ctx.path("w.blt"), "n") as db:
        db.update(items)
        db.changes().push()
    with ctx.phase("read") as record, ebooklet.open(ctx.conn(), ctx.path("r.blt"), "r") as db:
        record["values"] = db.load_items()


def dask_cluster(ctx: Ctx) -> None:
    """The same on a cluster: write_bag from the workers, read_bag summed on them."""
    import dask.bag
    from distributed import Client, LocalCluster

    from ebooklet import dask as edask

    n, size, parts = ctx.sizes["dask_n"], ctx.sizes["dask_size"], ctx.sizes["dask_partitions"]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    with LocalCluster(n_workers=DASK_WORKERS, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None, env=env) as cluster, \
            Client(cluster) as client:
        client.run(lambda: __import__("ebooklet.dask"))  # imports are not what is timed
        bag = dask.bag.range(n, npartitions=parts).map(dask_item, size)
        with ctx.phase("write", profile=False) as record:
            result = edask.write_bag(bag, ctx.conn().copy(db_key="bench/dask"), "n")
            record["partitions"], record["packs"] = result.partitions, result.packs
        with ctx.phase("read", profile=False) as record:
            bag = edask.read_bag(ctx.conn(), npartitions=parts)
            record["bytes"] = sum(bag.map_partitions(_value_bytes).compute())
            record["partitions"] = bag.npartitions
    ctx.metrics["workers"] = DASK_WORKERS


# ---------------------------------------------------------------- processes

# The processes workload: reads per second of cached values with 1, 2 and 4 reader
# processes on one local copy (issue 16, docs/processes.md).

PROCESS_COUNTS = (1, 2, 4)


def processes_setup(ctx: Ctx) -> None:
    """Push the database, then load every value into the shared local copy."""
    import ebooklet

    s = ctx.sizes
    with ebooklet.open(ctx.conn(), ctx.path("proc-writer.blt"), "n") as db:
        db.update(dict(small_items(s["proc_n"], s["proc_size"], seed=8)))
        db.changes().push()
    with ebooklet.open(ctx.conn(), ctx.path("proc.blt"), "r") as db:
        db.load_items(progress=False)


def _proc_reader(url: str | None, path: str, keys: list[str], passes: int, barrier: Any,
                 results: Any) -> None:
    """One reader process: open the copy (with plain booklet when ``url`` is None), wait
    for the others, read ``keys`` ``passes`` times; reports (reads, start, end, bytes),
    times on the system's monotonic clock."""
    import booklet

    import ebooklet

    with ebooklet.open(url, path, "r") if url else booklet.open(path, "r") as db:
        for key in keys:  # the first read of a key checks it against the index once
            db[key]
        barrier.wait(300)
        started = time.monotonic()
        size = 0
        for _ in range(passes):
            for key in keys:
                size += len(db[key])
        results.put((passes * len(keys), started, time.monotonic(), size))


def _processes_reading(ctx: Ctx, url: str | None) -> None:
    """Phases ``read_1``, ``read_2``, ``read_4``: that many reader processes at once."""
    import multiprocessing

    s = ctx.sizes
    keys = [k for k, _ in small_items(s["proc_n"], s["proc_size"], seed=8)]
    random.Random(9).shuffle(keys)
    spawn = multiprocessing.get_context("spawn")
    for count in PROCESS_COUNTS:
        barrier, results = spawn.Barrier(count), spawn.Queue()
        args = (url, ctx.path("proc.blt"), keys, s["proc_passes"], barrier, results)
        with ctx.phase(f"read_{count}", profile=False) as ph:
            readers = [spawn.Process(target=_proc_reader, args=args) for _ in range(count)]
            for reader in readers:
                reader.start()
            done = [results.get(timeout=600) for _ in readers]
            for reader in readers:
                reader.join(60)
            reads = sum(n for n, _, _, _ in done)
            ph["reads"] = reads
            ph["bytes"] = sum(b for _, _, _, b in done)
            ph["read_seconds"] = max(end for _, _, end, _ in done) - min(start for _, start, _, _ in done)
            ph["reads_per_second"] = reads / ph["read_seconds"]


def processes_ebooklet(ctx: Ctx) -> None:
    _processes_reading(ctx, f"{ctx.endpoint}/{BUCKET}/{ctx.db_key}")


def processes_booklet(ctx: Ctx) -> None:
    """The reference: plain booklet readers (flag 'r': a shared lock and an mmap) of the
    same data file."""
    _processes_reading(ctx, None)


PROCESSES_STEPS: dict[str, Callable[[Ctx], None]] = {
    "setup": processes_setup,
    "ebooklet": processes_ebooklet,
    "booklet": processes_booklet,
}


def evaluate_processes(steps: dict) -> list[dict]:
    """Reads per second of cached values by 1, 2 and 4 processes on one copy, against
    plain booklet readers of the same file, and against 1 process."""
    e, b = steps["ebooklet"]["phases"], steps["booklet"]["phases"]
    one = e["read_1"]["reads_per_second"]
    rows = []
    for count in PROCESS_COUNTS:
        rate = e[f"read_{count}"]["reads_per_second"]
        rows.append(_row(f"cached reads, {count} process(es) on one copy", "reads/s", rate,
                         b[f"read_{count}"]["reads_per_second"], "plain booklet, as many"))
        if count > 1:
            rows.append(_row(f"cached reads, {count} processes against 1", "reads/s", rate, one,
                             "ebooklet, 1 process"))
    return rows


PREVIOUS_VERSION = "0.11.1"
PREVIOUS_STEPS: dict[str, Callable[[Ctx], None]] = {
    "ebooklet": previous_side,
    "previous": previous_side,
}


# workload -> steps, in order; each step is a function above, in its own process.
WORKLOADS: dict[str, dict[str, Callable[[Ctx], None]]] = {
    "small_push": {"ebooklet": small_push_ebooklet, "boto3": small_push_boto3},
    "cold_read": {
        "setup": cold_read_setup,
        "ebooklet": cold_read_ebooklet,
        "boto3": cold_read_boto3,
    },
    "incremental": {
        "setup": incremental_setup,
        "ebooklet": incremental_ebooklet,
        "boto3": incremental_boto3,
    },
    "large": {"ebooklet": large_ebooklet, "boto3": large_boto3},
    "local": {"ebooklet": local_ebooklet, "booklet": local_booklet},
    "scale": SCALE_STEPS,
    "previous": PREVIOUS_STEPS,
    "dask": {"process": dask_process, "ebooklet": dask_cluster},  # the process writes first
    "processes": PROCESSES_STEPS,
}


def _peak_rss() -> int:
    """This process's peak resident set size so far, in bytes.

    On Linux from ``VmHWM``: ``ru_maxrss`` survives ``fork`` and ``exec``, so a child
    would report at least the runner's own RSS at the time it was started."""
    peak = _vm_hwm(os.getpid())
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    # The protocol owns the original stdout; anything printed goes to stderr.
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    ctx = Ctx(spec, sys.stdin, proto_out)
    WORKLOADS[spec["workload"]][spec["step"]](ctx)
    result = {"phases": ctx.phases, "metrics": ctx.metrics, "peak_rss": _peak_rss()}
    proto_out.write("@result " + json.dumps(result) + "\n")
    proto_out.flush()
    return 0


# =============================================================================
# The parent side: servers, children, evaluation, output.
# =============================================================================


def _process_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CountingProxy:
    """A TCP relay on loopback in front of the server that counts the bytes each way.

    moto logs no response sizes, so the scale workload talks to the server through
    this relay (one thread pair per connection; moto closes every connection after
    one request). Bytes are counted as they are relayed, HTTP headers included.
    """

    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        self._upstream = (host, upstream_port)
        self._lock = threading.Lock()
        self.down = 0  # server -> client
        self.up = 0  # client -> server
        self._listener = socket.create_server((host, 0), backlog=256)
        self.endpoint_url = f"http://{host}:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self._upstream)
        except OSError:
            client.close()
            return
        up = threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True)
        up.start()
        self._pump(upstream, client, True)
        up.join()
        client.close()
        upstream.close()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while data := src.recv(1 << 17):
                with self._lock:  # counted before it is sent: a reply read is a reply counted
                    if down:
                        self.down += len(data)
                    else:
                        self.up += len(data)
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def take(self) -> tuple[int, int]:
        """``(bytes down, bytes up)`` since the previous call."""
        with self._lock:
            counts = (self.down, self.up)
            self.down = self.up = 0
        return counts

    def close(self) -> None:
        self._listener.close()


def run_step(
    server: Any, spec: dict, timeout: float, proxy: CountingProxy | None = None,
    python: str | None = None,
) -> dict:
    """Run one step in a subprocess (``python``, default this one), answering its
    request-count questions (and byte counts when a ``proxy`` relays its traffic)."""
    env = None
    if python is not None:  # another venv: our PYTHONPATH (src/) must not shadow its ebooklet
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [python or sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    result = None
    server_cpu = _process_cpu(server.pid)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        for line in proc.stdout:
            if line.startswith("@counts"):
                requests = server.iter_requests()
                server.reset_request_counts()
                cpu, server_cpu = server_cpu, _process_cpu(server.pid)
                answer = {
                    "requests": dict(Counter(method for method, _, _ in requests)),
                    "statuses": dict(Counter(f"{m} {status}" for m, _, status in requests)),
                    "server_cpu": server_cpu - cpu if None not in (cpu, server_cpu) else None,
                }
                if proxy is not None:
                    answer["net_down"], answer["net_up"] = proxy.take()
                proc.stdin.write(json.dumps(answer) + "\n")
                proc.stdin.flush()
            elif line.startswith("@result "):
                result = json.loads(line[len("@result ") :])
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    name = f"{spec['workload']}.{spec['step']}"
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"benchmark step {name} failed (exit code {proc.returncode})")
    return result


def _spec(name: str, step: str, args: argparse.Namespace, sizes: dict, endpoint: str,
          workdir: str, **extra: Any) -> dict:
    return {
        "workload": name,
        "step": step,
        "sizes": sizes,
        "threads": args.threads,
        "endpoint": endpoint,
        "workdir": workdir,
        "profile_dir": str(args.profile) if args.profile else None,
        **extra,
    }


def run_workload(name: str, args: argparse.Namespace, sizes: dict) -> dict:
    from ebooklet.server import LocalS3Server

    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix=f"ebooklet-bench-{name}-")
    steps: dict[str, dict] = {}
    try:
        with LocalS3Server() as server:
            server.create_bucket(BUCKET, public=True)
            for step in WORKLOADS[name]:
                extra: dict[str, Any] = {}
                python = None
                if name == "previous":  # each side under its own key, 0.11.1 in its venv
                    extra["db_key"] = f"bench/{step}"
                    python = str(args.previous_python) if step == "previous" else None
                spec = _spec(name, step, args, sizes, server.endpoint_url, workdir, **extra)
                steps[step] = run_step(server, spec, args.step_timeout, python=python)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"steps": steps, "seconds": time.perf_counter() - started}


def _vm_hwm(pid: int | None) -> int | None:
    """Peak RSS of process ``pid`` in bytes (Linux ``VmHWM``), else None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def run_scale(args: argparse.Namespace, sizes: dict) -> dict:
    """The scale workload: every step of :data:`SCALE_STEPS` at each size, on a fresh
    server per size, through a :class:`CountingProxy`. Runs once (``--repeat`` is not
    applied: the large sizes are too long to repeat)."""
    from ebooklet.server import LocalS3Server

    by_n: dict[str, dict] = {}
    for n in sizes["scale_sizes"]:
        started = time.perf_counter()
        workdir = tempfile.mkdtemp(prefix=f"ebooklet-bench-scale-{n}-")
        steps: dict[str, dict] = {}
        failed: dict[str, str] = {}  # step -> why it has no result
        try:
            with LocalS3Server() as server:
                server.create_bucket(BUCKET, public=True)
                proxy = CountingProxy(server.port)
                try:
                    extra: dict[str, int] = {}
                    for step in SCALE_STEPS:
                        spec = _spec("scale", step, args, sizes, proxy.endpoint_url, workdir,
                                     n=n, **extra)
                        try:
                            steps[step] = run_step(server, spec, args.step_timeout, proxy)
                        except RuntimeError as exc:  # killed at --step-timeout, or failed
                            failed[step] = str(exc)
                            print(f"  scale {n:,} keys: {exc}; going on", file=sys.stderr, flush=True)
                            continue
                        if step == "initial_push":  # what the boto3 reference uploads
                            push = steps[step]["phases"]["initial_push"]
                            extra = {"push_puts": push["requests"].get("PUT", 1),
                                     "push_bytes": push["net_up"]}
                finally:
                    proxy.close()
                server_rss = _vm_hwm(server.pid)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        seconds = time.perf_counter() - started
        by_n[str(n)] = {"steps": steps, "seconds": seconds, "server_peak_rss": server_rss,
                        "failed": failed}
        print(f"  scale {n:,} keys: {seconds:.0f} s", file=sys.stderr, flush=True)
    return {"by_n": by_n, "sizes": sizes["scale_sizes"],
            "seconds": sum(r["seconds"] for r in by_n.values())}


def merge_runs(runs: list[dict]) -> dict:
    """One result from repeated runs of a workload: each phase's fastest run.

    Request counts and metrics come with the fastest run of each phase (they are
    the same in every run); peak RSS is the largest seen; every run's time is kept
    in ``seconds_all``, and the least CPU time of any run in ``client_cpu_min``.
    """
    merged = {"runs": len(runs), "seconds": sum(r["seconds"] for r in runs), "steps": {}}
    for step in runs[0]["steps"]:
        results = [r["steps"][step] for r in runs]
        phases = {}
        for phase in results[0]["phases"]:
            records = [res["phases"][phase] for res in results]
            best = dict(min(records, key=lambda rec: rec["seconds"]))
            best["seconds_all"] = [rec["seconds"] for rec in records]
            best["client_cpu_min"] = min(rec["client_cpu"] for rec in records)
            phases[phase] = best
        merged["steps"][step] = {
            "phases": phases,
            "metrics": results[0]["metrics"],
            "peak_rss": max(res["peak_rss"] for res in results),
        }
    return merged


# ---------------------------------------------------------------- evaluation


def _row(
    metric: str, unit: str, ours: float, ref: float | None = None, ref_name: str = "",
    target: str = "", met: bool | None = None, ratio: float | None = None,
) -> dict:
    if ratio is None and ref:
        ratio = ours / ref
    return {
        "metric": metric, "unit": unit, "ebooklet": ours, "reference": ref,
        "reference_name": ref_name, "ratio": ratio, "target": target, "met": met,
    }


def _total(phase: dict) -> int:
    return sum(phase["requests"].values())


def _mbps(phase: dict) -> float:
    return phase["bytes"] / MiB / phase["seconds"]


def evaluate(name: str, res: dict, sizes: dict) -> list[dict]:
    """The table rows (with targets) of one workload."""
    steps = res["steps"]
    rows: list[dict] = []
    if name == "small_push":
        e, b = steps["ebooklet"]["phases"], steps["boto3"]["phases"]
        packs = steps["ebooklet"]["metrics"]["packs"]
        n = sizes["small_n"]
        per_value = e["local_write"]["seconds"] / n * 1e6
        rows.append(_row(f"local write of {n} values", "s", e["local_write"]["seconds"],
                         ref_name=f"{per_value:.0f} µs/value"))
        ratio = e["push"]["seconds"] / b["one_put"]["seconds"]
        rows.append(_row("push", "s", e["push"]["seconds"], b["one_put"]["seconds"],
                         "1 PUT of all bytes", "≤ 2×", ratio <= 2))
        rows.append(_row("push", "s", e["push"]["seconds"], b["many_puts"]["seconds"],
                         f"{n} PUTs, {sizes['threads']} threads"))
        reqs = _total(e["push"])
        rows.append(_row("push requests", "req", reqs, _total(b["many_puts"]), f"{n} PUTs",
                         f"≤ 5 + {packs} packs", reqs <= 5 + packs, ratio=None))
    elif name == "cold_read":
        e, b = steps["ebooklet"]["phases"], steps["boto3"]["phases"]
        floor = b["one_get"]["seconds"]
        for phase, label in (("read_all_items", "read all, items()"),
                             ("read_all_load_items", "read all, load_items()")):
            ratio = e[phase]["seconds"] / floor
            rows.append(_row(label, "s", e[phase]["seconds"], floor, "1 GET of all bytes",
                             "≤ 5×", ratio <= 5))
            rows.append(_row(label, "s", e[phase]["seconds"],
                             b["get_and_booklet_write"]["seconds"],
                             "1 GET + raw booklet writes"))
            rows.append(_row(label + " requests", "req", _total(e[phase])))
        ratio = e["random_keys"]["seconds"] / b["random_keys"]["seconds"]
        k = sizes["random_keys"]
        rows.append(_row(f"{k} random keys, one by one", "s", e["random_keys"]["seconds"],
                         b["random_keys"]["seconds"], f"{k} get_object", "≤ 0.75×",
                         ratio <= 0.75))
        rows.append(_row(f"{k} random keys requests", "req", _total(e["random_keys"]),
                         _total(b["random_keys"]), f"{k} get_object"))
        rows.append(_row(f"{k} random keys, client CPU", "s", e["random_keys"]["client_cpu"],
                         b["random_keys"]["client_cpu"], f"{k} get_object"))
        if None not in (e["random_keys"]["server_cpu"], b["random_keys"]["server_cpu"]):
            rows.append(_row(f"{k} random keys, server CPU", "s", e["random_keys"]["server_cpu"],
                             b["random_keys"]["server_cpu"], f"{k} get_object"))
        warm = e["warm_reopen"]
        one_304 = _total(warm) == 1 and warm["statuses"].get("GET 304") == 1
        rows.append(_row("warm reopen requests", "req", _total(warm),
                         target="exactly 1 (a 304)", met=one_304))
        rows.append(_row("warm reopen", "s", warm["seconds"]))
        rows.append(_row("open 'w' (lock taken)", "s", e["open_w"]["seconds"],
                         target="≤ 0.1 s", met=e["open_w"]["seconds"] <= 0.1))
    elif name == "incremental":
        e, b = steps["ebooklet"]["phases"], steps["boto3"]["phases"]
        m = steps["ebooklet"]["metrics"]
        limit = 2 * m["changed_bytes"] + m["shard_bytes"]
        n = e["push"]["keys_pushed"]
        rows.append(_row(f"push {n} changed keys", "s", e["push"]["seconds"],
                         b["many_puts"]["seconds"], f"{n} PUTs"))
        rows.append(_row(f"push {n} changed keys", "s", e["push"]["seconds"],
                         b["one_put"]["seconds"], "1 PUT of the changed bytes"))
        rows.append(_row("push requests", "req", _total(e["push"]), _total(b["many_puts"]),
                         f"{n} PUTs"))
        rows.append(_row("bytes uploaded", "KiB", m["uploaded_bytes"] / 1024,
                         m["changed_bytes"] / 1024, "changed bytes",
                         f"≤ 2×changed + {m['shards_touched']}/{m['shards_total']} shards "
                         f"({limit / 1024:.0f} KiB)", m["uploaded_bytes"] <= limit))
    elif name == "large":
        e, b = steps["ebooklet"]["phases"], steps["boto3"]["phases"]
        for phase, limit in (("push", 0.8), ("pull", 0.6)):
            ratio = _mbps(e[phase]) / _mbps(b[phase])
            rows.append(_row(f"{phase} MB/s", "MiB/s", _mbps(e[phase]), _mbps(b[phase]),
                             "boto3 files, same threads", f"≥ {limit:.0%}", ratio >= limit))
        peak = steps["ebooklet"]["peak_rss"]
        limit_bytes = 256 * MiB + sizes["large_size"]
        rows.append(_row("peak RSS", "MiB", peak / MiB, steps["boto3"]["peak_rss"] / MiB,
                         "boto3 process", f"≤ {limit_bytes / MiB:.0f} MiB",
                         peak <= limit_bytes))
        rows.append(_row("push requests", "req", _total(e["push"]), _total(b["push"]),
                         "boto3 put_object"))
    elif name == "local":
        # Purely local and CPU-bound: compared by the process's CPU time, which other
        # load on the machine does not inflate (wall-clock times are in the JSON).
        e, b = steps["ebooklet"]["phases"], steps["booklet"]["phases"]
        n = sizes["local_n"]
        for phase, limit in (("get", 1.2), ("set", 1.5), ("iterate", None)):
            ratio = e[phase]["client_cpu_min"] / b[phase]["client_cpu_min"]
            rows.append(_row(f"{phase} {n} values (CPU time)", "s", e[phase]["client_cpu_min"],
                             b[phase]["client_cpu_min"], "raw booklet",
                             f"≤ {limit}×" if limit else "", ratio <= limit if limit else None))
    elif name == "previous":
        rows = evaluate_previous(steps, sizes)
    elif name == "dask":
        rows = evaluate_dask(steps, sizes)
    elif name == "processes":
        rows = evaluate_processes(steps)
    for row in rows:
        row["workload"] = name
    return rows


def evaluate_dask(steps: dict, sizes: dict) -> list[dict]:
    """ebooklet.dask on two workers against one process doing the same: throughput of
    the values (MiB/s) and requests per partition."""
    d, p = steps["ebooklet"]["phases"], steps["process"]["phases"]
    mib = sizes["dask_n"] * sizes["dask_size"] / MiB
    workers = steps["ebooklet"]["metrics"]["workers"]
    ref = "1 process: open + update + push / open + load_items"
    rows = []
    for phase in ("write", "read"):
        rows.append(_row(f"{phase} MiB/s, {workers} workers", "MiB/s", mib / d[phase]["seconds"],
                         mib / p[phase]["seconds"], ref))
        partitions = d[phase]["partitions"]
        rows.append(_row(f"{phase} requests per partition ({partitions})", "req",
                         _total(d[phase]) / partitions, ratio=None))
        rows.append(_row(f"{phase} requests", "req", _total(d[phase]), _total(p[phase]), ref))
    return rows


def evaluate_previous(steps: dict, sizes: dict) -> list[dict]:
    """Ours against ebooklet 0.11.1 on the same data and server. Set and get are
    compared by CPU time per value (both CPU-bound; wall time is in the JSON)."""
    e, p = steps["ebooklet"]["phases"], steps["previous"]["phases"]
    measured = steps["previous"]["metrics"]["version"]
    if measured != PREVIOUS_VERSION:
        raise RuntimeError(f"the previous side ran ebooklet {measured}, not {PREVIOUS_VERSION}")
    ref = f"ebooklet {PREVIOUS_VERSION}"
    rows = []
    for phase in ("set", "get"):
        ours, theirs = (x[phase]["client_cpu"] / x[phase]["keys"] for x in (e, p))
        rows.append(_row(f"local {phase} per value (CPU time)", "µs", ours * 1e6,
                         theirs * 1e6, ref, "≤ 1×", ours <= theirs))
        ours, theirs = (x[phase]["seconds"] / x[phase]["keys"] for x in (e, p))
        rows.append(_row(f"local {phase} per value (wall time)", "µs", ours * 1e6,
                         theirs * 1e6, ref))
    ours, theirs = e["warm_reopen"]["seconds"], p["warm_reopen"]["seconds"]
    rows.append(_row("warm reopen", "s", ours, theirs, ref, "≤ 1×", ours <= theirs))
    rows.append(_row("warm reopen requests", "req", _total(e["warm_reopen"]),
                     _total(p["warm_reopen"]), ref, "exactly 1",
                     _total(e["warm_reopen"]) == 1, ratio=None))
    return rows


# The scale table: (label, step, phase, kind, target, check(values, growth)).
# kind: s (seconds), us_key (µs per key), rss (the step's peak RSS, MiB), req, up/down
# (KiB through the proxy, headers included), beyond (KiB down beyond the value read),
# server_rss (moto's peak RSS at the end of the size, MiB), metric_s (a step's metric, s),
# boto3_share (boto3's time for the initial push's bytes and objects over ours).
_Check = Callable[[list[float], float], bool] | None
SCALE_METRICS: list[tuple[str, str, str, str, str, _Check]] = [
    ("local write loop", "write", "write_loop", "us_key", "flat (≤ 1.5×)",
     lambda v, g: g <= 1.5),
    ("close() after the write loop", "write", "close", "s", "≤ 1 s", lambda v, g: max(v) <= 1),
    ("local write, peak RSS", "write", "", "rss", "", None),
    ("initial push", "initial_push", "initial_push", "s", "", None),
    ("initial push, peak RSS", "initial_push", "", "rss", "≤ 256 MiB",
     lambda v, g: max(v) <= 256),
    ("initial push, throughput against boto3's", "boto3_push", "", "boto3_share", "≥ 50 %",
     lambda v, g: min(v) >= 0.5),
    ("initial push, requests", "initial_push", "initial_push", "req", "", None),
    ("initial push, up", "initial_push", "initial_push", "up", "", None),
    ("warm reopen", "warm_reopen", "warm_reopen", "s", "", None),
    ("warm reopen, requests", "warm_reopen", "warm_reopen", "req", "exactly 1",
     lambda v, g: all(x == 1 for x in v)),
    ("cold open", "cold_read", "cold_open", "s", "≤ 20 ms, flat (≤ 1.5×)",
     lambda v, g: max(v) <= 0.02 and g <= 1.5),
    ("cold open, down", "cold_read", "cold_open", "down", "", None),
    ("first S3Connection of a process (before cold open)", "cold_read", "first_connection_s",
     "metric_s", "", None),
    ("cold read of 1 key (after open)", "cold_read", "cold_read_one", "s", "", None),
    ("cold read of 1 key, down beyond the value", "cold_read", "cold_read_one", "beyond",
     "≤ 64 KiB", lambda v, g: max(v) <= 64),
    ("cold read of 1 key, requests", "cold_read", "cold_read_one", "req", "", None),
    ("cold read, peak RSS", "cold_read", "", "rss", "", None),
    ("cold open + len()", "cold_len", "cold_len", "s", "", None),
    ("cold len(), down", "cold_len", "cold_len", "down", "", None),
    ("open 'w' of the writer", "push_one", "open_w", "s", "", None),
    ("push of 1 changed key", "push_one", "push_one", "s", "≤ 1.5×", lambda v, g: g <= 1.5),
    ("push of 1 changed key, peak RSS", "push_one", "", "rss", "≤ 128 MiB and ≤ 1.5×",
     lambda v, g: max(v) <= 128 and g <= 1.5),
    ("push of 1 changed key, requests", "push_one", "push_one", "req", "≤ 8",
     lambda v, g: max(v) <= 8),
    ("push of 1 changed key, up", "push_one", "push_one", "up", "", None),
    ("push of 1 % changed", "push_pct", "push_pct", "s", "", None),
    ("push of 1 % changed, peak RSS", "push_pct", "", "rss", "", None),
    ("push of 1 % changed, requests", "push_pct", "push_pct", "req", "", None),
    ("push of 1 % changed, up", "push_pct", "push_pct", "up", "", None),
    ("update() of 100k (or N)", "update", "update", "us_key", "", None),
    ("close() after update()", "update", "update_close", "s", "≤ 1 s", lambda v, g: max(v) <= 1),
    ("update(), peak RSS", "update", "", "rss", "", None),
    ("local get (random, warm file)", "local_get", "local_get", "us_key", "", None),
    ("local get, requests", "local_get", "local_get", "req", "", None),
    ("moto server, peak RSS", "", "", "server_rss", "", None),
]
_SCALE_UNITS = {"s": "s", "us_key": "µs/key", "rss": "MiB", "req": "req", "up": "KiB",
                "down": "KiB", "beyond": "KiB", "server_rss": "MiB", "metric_s": "s",
                "boto3_share": "×"}


def scale_measure(res: dict, step: str, phase: str, kind: str) -> float | None:
    """One measurement of one size's result (see :data:`SCALE_METRICS`)."""
    if kind == "server_rss":
        return res["server_peak_rss"] / MiB if res.get("server_peak_rss") else None
    if step not in res["steps"]:
        return None  # a result from before the step existed
    st = res["steps"][step]
    if kind == "boto3_share":  # boto3's time over ours for the same bytes and objects
        if "initial_push" not in res["steps"]:
            return None
        ours = res["steps"]["initial_push"]["phases"]["initial_push"]["seconds"]
        return st["phases"]["boto3_push"]["seconds"] / ours
    if kind == "rss":
        return st["peak_rss"] / MiB
    if kind == "metric_s":
        return st["metrics"][phase]
    ph = st["phases"][phase]
    if kind == "s":
        return ph["seconds"]
    if kind == "us_key":
        return ph["seconds"] / ph["keys"] * 1e6
    if kind == "req":
        return _total(ph)
    if kind == "up":
        return ph["net_up"] / 1024
    if kind == "down":
        return ph["net_down"] / 1024
    return (ph["net_down"] - ph["value_bytes"]) / 1024  # beyond


def scale_series(result: dict) -> list[dict]:
    """Each scale metric across the sizes: values, growth (largest N over smallest),
    target and whether it is met."""
    ns = result["sizes"]
    out = []
    for label, step, phase, kind, target, check in SCALE_METRICS:
        values = [scale_measure(result["by_n"][str(n)], step, phase, kind) for n in ns]
        present = [v for v in values if v is not None]  # a step killed at a size has none
        if not present:
            continue
        growth = present[-1] / present[0] if present[0] else None
        met = None
        if check is not None:
            met = bool(check(present, growth if growth is not None else math.inf))
        out.append({"metric": label, "kind": kind, "unit": _SCALE_UNITS[kind],
                    "values": values, "growth": growth, "target": target, "met": met})
    return out


def _human_n(n: int) -> str:
    for div, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


def evaluate_scale(result: dict) -> list[dict]:
    """The main table's rows: each metric at the largest N against the smallest."""
    ns = result["sizes"]
    rows = []
    for ser in scale_series(result):
        rows.append(_row(f"{ser['metric']}, {_human_n(ns[-1])}", ser["unit"],
                         ser["values"][-1], ser["values"][0], f"at {_human_n(ns[0])}",
                         ser["target"], ser["met"], ratio=ser["growth"]))
        rows[-1]["workload"] = "scale"
    return rows


def format_scale_table(result: dict) -> str:
    """A markdown table: one row per metric, one column per N, the growth."""
    ns = result["sizes"]
    header = ["metric", *(f"{_human_n(n)} keys" for n in ns),
              f"{_human_n(ns[-1])}/{_human_n(ns[0])}", "target", "met"]
    lines = [header]
    for ser in scale_series(result):
        growth = f"{ser['growth']:.2f}×" if ser["growth"] is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[ser["met"]]
        lines.append([ser["metric"], *(_fmt(v, ser["unit"]) for v in ser["values"]), growth,
                      ser["target"], met])
    return _markdown(lines)


# Time series on the plot's left panel: (label, step, phase, kind).
_PLOT_TIMES = [
    ("initial push", "initial_push", "initial_push", "s"),
    ("push of 1 key", "push_one", "push_one", "s"),
    ("push of 1 %", "push_pct", "push_pct", "s"),
    ("open 'w'", "push_one", "open_w", "s"),
    ("close() after writes", "write", "close", "s"),
    ("cold open", "cold_read", "cold_open", "s"),
    ("cold read of 1 key", "cold_read", "cold_read_one", "s"),
    ("cold open + len()", "cold_len", "cold_len", "s"),
    ("warm reopen", "warm_reopen", "warm_reopen", "s"),
]


def write_scale_plot(result: dict, path: Path) -> str:
    """A log-log PNG of time and peak RSS against N; a message saying what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]')"
    ns = result["sizes"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 5.5))
    def series(step: str, phase: str, kind: str) -> list[float]:  # nan: the step was killed
        values = [scale_measure(result["by_n"][str(n)], step, phase, kind) for n in ns]
        return [math.nan if v is None else v for v in values]

    for label, step, phase, kind in _PLOT_TIMES:
        left.plot(ns, series(step, phase, kind), marker="o", label=label)
    for label, step, phase, kind, *_ in SCALE_METRICS:
        if kind == "us_key":
            middle.plot(ns, series(step, phase, kind), marker="o", label=label)
    for label, step, _, kind, *_ in SCALE_METRICS:
        if kind == "rss":
            right.plot(ns, series(step, "", "rss"), marker="o", label=label.removesuffix(", peak RSS"))
    server = [scale_measure(result["by_n"][str(n)], "", "", "server_rss") for n in ns]
    if None not in server:
        right.plot(ns, server, marker="s", linestyle="--", label="moto server")
    right.axhline(128, color="grey", linewidth=0.8, linestyle=":")
    right.axhline(256, color="grey", linewidth=0.8, linestyle=":")
    for ax, title, unit in ((left, "time", "seconds"), (middle, "per key", "µs per key"),
                            (right, "peak RSS", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("keys (100 B values)")
        ax.set_ylabel(unit)
        ax.set_title(f"ebooklet scale: {title} against N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot in {path}"


# ---------------------------------------------------------------- output


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "req":
        return f"{value:.0f}"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "×":
        return f"{value:.0%}"
    return f"{value:.1f} {unit}"


def format_table(rows: list[dict]) -> str:
    header = ["workload", "metric", "ebooklet", "reference", "ratio", "target", "met"]
    lines = [header]
    for r in rows:
        ref = _fmt(r["reference"], r["unit"])
        if r["reference_name"]:
            ref = f"{ref} ({r['reference_name']})" if ref else r["reference_name"]
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else ""
        lines.append([r["workload"], r["metric"], _fmt(r["ebooklet"], r["unit"]), ref, ratio,
                      r["target"], met])
    return _markdown(lines)


def _markdown(lines: list[list[str]]) -> str:
    header = lines[0]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


DEFAULT_PREVIOUS_VENV = Path("~/.cache/ebooklet-bench") / f"venv-{PREVIOUS_VERSION}"


def previous_venv_path(given: Path | None) -> Path:
    """The venv of the previous generation: ``given``, else $EBOOKLET_BENCH_PREVIOUS_VENV,
    else :data:`DEFAULT_PREVIOUS_VENV`."""
    default = os.environ.get("EBOOKLET_BENCH_PREVIOUS_VENV", str(DEFAULT_PREVIOUS_VENV))
    return (given or Path(default)).expanduser()


def previous_python(given: Path | None) -> Path | None:
    """The Python of the venv holding ebooklet 0.11.1. A venv named by ``--previous-venv``
    is created when missing (``python -m venv``, then ``pip install``: needs the package
    index); the default one is only used if it exists (None when it does not)."""
    venv = previous_venv_path(given)
    python = venv / "bin" / "python"
    if python.exists() or given is None:
        return python if python.exists() else None
    print(f"creating {venv} with ebooklet {PREVIOUS_VERSION} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"ebooklet=={PREVIOUS_VERSION}"],
                   check=True)
    return python


def default_out() -> Path:
    return HERE / "results" / f"{dt.date.today().isoformat()}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (< 2 minutes)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--only", help="comma-separated workloads: " + ", ".join(WORKLOADS))
    parser.add_argument("--threads", type=int, default=16, help="threads on both sides")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each workload N times (fresh server each), keep each phase's best")
    parser.add_argument("--out", type=Path, help="JSON file, or a directory for <date>.json")
    parser.add_argument("--profile", type=Path, help="write cProfile files here")
    parser.add_argument("--step-timeout", type=float, default=900.0, help="seconds per step")
    parser.add_argument("--scale-sizes", help="comma-separated key counts of the scale workload, "
                        "e.g. 10000,100000,1000000 (default: the mode's)")
    parser.add_argument("--previous-venv", type=Path,
                        help=f"venv with ebooklet {PREVIOUS_VERSION}, created if missing "
                        f"(default: {DEFAULT_PREVIOUS_VENV}, used only if it exists)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child_main(args.child)

    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = dict(SIZES[mode])
    if args.scale_sizes:
        sizes["scale_sizes"] = sorted(int(n) for n in args.scale_sizes.split(","))
    names = list(WORKLOADS) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    out = args.out or default_out()
    if out.suffix != ".json":
        out = out / f"{dt.date.today().isoformat()}.json"

    import ebooklet

    started = time.perf_counter()
    results: dict[str, Any] = {}
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    messages: list[str] = []
    for name in names:
        if name == "previous":
            args.previous_python = previous_python(args.previous_venv)
            if args.previous_python is None:
                skipped[name] = (f"no venv with ebooklet {PREVIOUS_VERSION} at "
                                 f"{previous_venv_path(None)}; --previous-venv PATH creates one")
                print(f"skipping previous: {skipped[name]}", file=sys.stderr, flush=True)
                continue
        if name == "dask" and importlib.util.find_spec("distributed") is None:
            skipped[name] = 'dask[distributed] is not installed: pip install -e ".[dask]"'
            print(f"skipping dask: {skipped[name]}", file=sys.stderr, flush=True)
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        if name == "scale":
            results[name] = run_scale(args, sizes)
        else:
            results[name] = merge_runs([run_workload(name, args, sizes)
                                        for _ in range(args.repeat)])
        # Kept as it comes, so that a failure later loses no finished workload.
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"partial": True, "sizes": sizes, "workloads": results}) + "\n")
        if name == "scale":
            rows.extend(evaluate_scale(results[name]))
        else:
            rows.extend(evaluate(name, results[name], {**sizes, "threads": args.threads}))
    command = "python benchmarks/run.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "mode": mode,
        "sizes": sizes,
        "threads": args.threads,
        "repeat": args.repeat,
        "seconds": time.perf_counter() - started,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "ebooklet": getattr(ebooklet, "__version__", None),
            "ebooklet_path": str(Path(ebooklet.__file__).parent),
        },
        "rows": rows,
        "workloads": results,
        "skipped": skipped,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if "scale" in results:
        report["scale_table"] = format_scale_table(results["scale"])
        messages.append(write_scale_plot(results["scale"], out.with_name(out.stem + "-scale.png")))
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(rows))
    if "scale" in results:
        print("\nscale (" + ", ".join(
            f"{_human_n(int(n))}: {r['seconds']:.0f} s" for n, r in results["scale"]["by_n"].items()
        ) + ")\n" + report["scale_table"])
    for message in messages:
        print(message)
    met = [r["met"] for r in rows if r["met"] is not None]
    print(f"\n{sum(met)}/{len(met)} targets met; {report['seconds']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
