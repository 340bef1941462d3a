#!/usr/bin/env python
"""Benchmarks: ebooklet against plain boto3 on the same S3 server, in the same run.

    python benchmarks/run.py             # the full run (about 5-10 minutes)
    python benchmarks/run.py --quick     # smaller sizes, under two minutes
    python benchmarks/run.py --quick --tiny --out /tmp/x.json   # seconds (smoke test)

Every workload gets its own ``moto_server`` (:class:`ebooklet.server.LocalS3Server`,
a separate process on loopback; moto keeps everything in memory, so a fresh one per
workload keeps them independent). Each step of a workload (setup, the ebooklet side,
the boto3 side) runs in a fresh Python subprocess, which reports its peak RSS
(``resource.getrusage``). HTTP requests are counted per phase from the server's
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
import importlib.util
import json
import os
import platform
import random
import resource
import shutil
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
    ),
    "quick": dict(
        small_n=5_000, small_size=1024, random_keys=200, change_fraction=0.01,
        large_n=4, large_size=16 * MiB, local_n=30_000, local_size=100,
    ),
    "tiny": dict(
        small_n=300, small_size=1024, random_keys=20, change_fraction=0.05,
        large_n=2, large_size=1 * MiB, local_n=2_000, local_size=100,
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
            record.update(seconds=seconds, **counts)
            if name not in self.phases or seconds < self.phases[name]["seconds"]:
                self.phases[name] = record

    # ---- S3 access

    def conn(self, **kw: Any) -> Any:
        import ebooklet

        kw.setdefault("threads", self.threads)
        return ebooklet.S3Connection(
            "testing", "testing", DB_KEY, BUCKET, endpoint_url=self.endpoint, **kw
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
}


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    # The protocol owns the original stdout; anything printed goes to stderr.
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    ctx = Ctx(spec, sys.stdin, proto_out)
    WORKLOADS[spec["workload"]][spec["step"]](ctx)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    result = {"phases": ctx.phases, "metrics": ctx.metrics, "peak_rss": peak_bytes}
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


def run_step(server: Any, spec: dict, timeout: float) -> dict:
    """Run one step in a subprocess, answering its request-count questions."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
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


def run_workload(name: str, args: argparse.Namespace, sizes: dict) -> dict:
    from ebooklet.server import LocalS3Server

    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix=f"ebooklet-bench-{name}-")
    steps: dict[str, dict] = {}
    try:
        with LocalS3Server() as server:
            server.create_bucket(BUCKET, public=True)
            for step in WORKLOADS[name]:
                spec = {
                    "workload": name,
                    "step": step,
                    "sizes": sizes,
                    "threads": args.threads,
                    "endpoint": server.endpoint_url,
                    "workdir": workdir,
                    "profile_dir": str(args.profile) if args.profile else None,
                }
                steps[step] = run_step(server, spec, args.step_timeout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"steps": steps, "seconds": time.perf_counter() - started}


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
    for row in rows:
        row["workload"] = name
    return rows


# ---------------------------------------------------------------- output


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "req":
        return f"{value:.0f}"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
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
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child_main(args.child)

    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = dict(SIZES[mode])
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
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        runs = [run_workload(name, args, sizes) for _ in range(args.repeat)]
        results[name] = merge_runs(runs)
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
        },
        "rows": rows,
        "workloads": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(rows))
    met = [r["met"] for r in rows if r["met"] is not None]
    print(f"\n{sum(met)}/{len(met)} targets met; {report['seconds']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
