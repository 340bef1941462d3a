"""Several writers, several processes, crashes, and neighbouring databases.

Behaviours 6, 7, 8, 11 (second half) and 13 of the core-engine issue:

- racing writers never lose a committed update (conditional manifest PUT, refresh, retry);
- the remote write lock: who holds it, waiting, renewal, expiry, reclaim, break, release;
- ``kill -9`` during a push leaves the remote at the last commit and the edits pending;
- two processes on one local file are serialised by file locks;
- pushing a database never touches a sibling database's objects.

Every writer here is a real process (:class:`Worker`) talking to the real server; an
``S3Connection`` is not picklable, so workers get the connection *parameters*.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import booklet
import pytest

import ebooklet
from conftest import folder_blocks_create
from ebooklet import format as fmt

# --------------------------------------------------------------------------- workers

WORKER = r"""
import json, os, sys, time

import ebooklet
import ebooklet.lock

spec = json.loads(os.environ["EBOOKLET_TEST_WORKER"])
if spec.get("lease"):
    ebooklet.lock.LOCK_LEASE = spec["lease"]  # a short (or long) lease, for lock tests
conn = ebooklet.S3Connection(**spec["conn"])
db = None


def send(**msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def receive():
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)
    return json.loads(line)


def value(tag, i, size):
    unit = f"{tag}:{i};"
    return (unit * (size // len(unit) + 1))[:size]


def hold_first_commit():
    # Timing only: stop the push right before its first commit until the parent says
    # "go", so that two writers provably build on the same head. Nothing is faked:
    # the real commit (commit record + conditional manifest PUT) runs afterwards.
    real = db._replica.remote.commit
    calls = []

    def commit(manifest, base_etag):
        calls.append(manifest["seq"])
        if len(calls) == 1:
            send(event="at_commit", seq=manifest["seq"])
            if receive()["op"] != "go":
                raise RuntimeError("expected go")
        return real(manifest, base_etag)

    db._replica.remote.commit = commit
    return calls


def run(op, cmd):
    global db
    if op == "open":
        db = ebooklet.open(
            conn, cmd["path"], cmd.get("flag", "w"), value_serializer="str",
            lock_timeout=cmd.get("lock_timeout", 0.0), timeout=cmd.get("timeout"),
        )
        return {"offline": db.offline}
    if op == "update":
        db.update(cmd["items"])
        db.sync()
        return {}
    if op == "fill":
        db.update({f"k{i:05d}": value(cmd["tag"], i, cmd["size"]) for i in range(cmd["n"])})
        db.sync()
        return {}
    if op == "get":
        return {"value": db.get(cmd["key"])}
    if op == "changes":
        return {"changes": sorted([c.kind, c.key] for c in db.changes().iter_changes())}
    if op == "push":
        calls = hold_first_commit() if cmd.get("hold") else []
        if cmd.get("announce"):
            send(event="pushing")
        result = db.changes().push()
        return {"seq": result.seq, "committed": result.committed, "commit_calls": len(calls)}
    if op == "close":
        time.sleep(cmd.get("after", 0))
        db.close()
        return {}
    if op == "break_lock":
        return {"holder": ebooklet.break_lock(conn)}
    if op == "turns":
        # Read-modify-write a shared counter n times, taking the lock in turn.
        for i in range(cmd["n"]):
            with ebooklet.open(
                conn, cmd["path"], "w", value_serializer="str", lock_timeout=60
            ) as d:
                d["counter"] = str(int(d.get("counter", "0")) + 1)
                d[f"{cmd['name']}-{i}"] = str(i)
                d.changes().push()
        return {}
    raise ValueError(f"unknown op {op!r}")


send(event="ready", pid=os.getpid())
while True:
    cmd = receive()
    op = cmd.pop("op")
    if op == "exit":
        break
    try:
        send(ok=True, **run(op, cmd))
    except Exception as exc:
        keys = getattr(exc, "keys", None)
        send(ok=False, error=type(exc).__name__, message=str(exc),
             keys=list(keys) if isinstance(keys, list) else None)
"""


class Worker:
    """A child Python process running ebooklet commands sent as JSON lines.

    ``call(op, **kw)`` sends a command and returns its reply (``{"ok": True, ...}``
    or ``{"ok": False, "error": <exception class name>, "message": ...}``).
    """

    def __init__(self, name: str, target: Any, db_key: str, tmp_path: Path, lease: float | None):
        self.name = name
        spec = {
            "conn": {
                "access_key_id": target.access_key_id,
                "access_key": target.access_key,
                "db_key": db_key,
                "bucket": target.bucket,
                "endpoint_url": target.endpoint_url,
                "region": target.region,
            },
            "lease": lease,
        }
        # Credentials go through the environment, never the command line.
        env = dict(os.environ, EBOOKLET_TEST_WORKER=json.dumps(spec))
        self._stderr_path = tmp_path / f"worker-{name}-{uuid.uuid4().hex[:6]}.stderr"
        with open(self._stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WORKER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.pid = self.expect("ready")["pid"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _stderr(self) -> str:
        return self._stderr_path.read_text()[-3000:]

    def send(self, op: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = 120.0) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"worker {self.name} said nothing for {timeout} s; stderr:\n{self._stderr()}"
            ) from None
        if line is None:
            raise AssertionError(f"worker {self.name} died; stderr:\n{self._stderr()}")
        return json.loads(line)

    def expect(self, event: str) -> dict:
        msg = self.receive()
        assert msg.get("event") == event, f"worker {self.name}: expected {event!r}, got {msg}"
        return msg

    def request(self, op: str, **kw: Any) -> dict:
        """Run ``op`` and return its reply, success or failure."""
        self.send(op, **kw)
        return self.receive()

    def call(self, op: str, **kw: Any) -> dict:
        """Run ``op`` and return the reply, which must be a success."""
        return self.ok(self.request(op, **kw))

    def ok(self, reply: dict) -> dict:
        assert reply.get("ok"), f"worker {self.name}: {reply}\nstderr:\n{self._stderr()}"
        return reply

    def kill(self) -> None:
        """SIGKILL, as in a crash: no cleanup of any kind runs."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.proc.wait()


@pytest.fixture
def spawn(s3_server: Any, db_key: str, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Factory ``spawn(name, lease=None) -> Worker`` on this test's database (killed after
    the test); ``lease`` sets the worker's ``ebooklet.lock.LOCK_LEASE``."""
    workers: list[Worker] = []

    def factory(name: str, lease: float | None = None) -> Worker:
        worker = Worker(name, s3_server, db_key, tmp_path, lease)
        workers.append(worker)
        return worker

    yield factory
    for worker in workers:
        worker.stop()


# --------------------------------------------------------------------------- helpers


def fresh_path(tmp_path: Path, name: str = "copy") -> Path:
    return tmp_path / f"{name}-{uuid.uuid4().hex[:8]}.blt"


def read_remote(remote: Any, tmp_path: Path) -> dict:
    """Everything the remote holds, read through a brand-new local copy."""
    with ebooklet.open(remote, fresh_path(tmp_path, "reader")) as db:
        return dict(db.items())


def create(conn: Any, tmp_path: Path, items: dict) -> None:
    """Create the remote database with ``items`` from a throw-away local file."""
    with ebooklet.open(conn, fresh_path(tmp_path, "creator"), "n", value_serializer="str") as db:
        db.update(items)
        assert db.changes().push().committed


def head_manifest(boto3_client: Any, bucket: str, db_key: str) -> dict:
    body = boto3_client.get_object(Bucket=bucket, Key=db_key)["Body"].read()
    return fmt.decode_manifest(body)


def referenced_packs(boto3_client: Any, bucket: str, db_key: str) -> dict[str, list]:
    """Pack object key -> index entries pointing into it, for the head commit."""
    manifest = head_manifest(boto3_client, bucket, db_key)
    packs: dict[str, list] = {}
    for _, name in fmt.iter_shard_names(manifest):
        raw = boto3_client.get_object(Bucket=bucket, Key=db_key + name)["Body"].read()
        for entry in fmt.decode_shard(raw, name).values():
            packs.setdefault(db_key + fmt.pack_name(entry.pack), []).append(entry)
    return packs


def list_objects(boto3_client: Any, bucket: str, prefix: str) -> dict[str, int]:
    """Object key -> size of every object under ``prefix``."""
    found = {}
    for page in boto3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = obj["Size"]
    return found


def lock_exists(boto3_client: Any, bucket: str, db_key: str) -> bool:
    return db_key + fmt.LOCK_NAME in list_objects(boto3_client, bucket, db_key + fmt.LOCK_NAME)


# --------------------------------------------------------------------------- 6. racing writers


@pytest.mark.parametrize("release", ["one_then_other", "together"])
@pytest.mark.parametrize("same_key", [False, True], ids=["disjoint_keys", "same_key"])
def test_racing_writers_never_lose_a_committed_update(
    spawn, conn, make_conn, s3_server, boto3_client, db_key, tmp_path, same_key, release
):
    """Two processes build commits on the same head; the loser's manifest PUT fails (412).

    The loser refreshes and re-checks: with disjoint keys it commits on top (both
    updates survive, its pack is reused, not uploaded again); with the same key it
    raises ``ConflictError`` naming it, commits nothing and keeps its edit pending.

    The lock is bypassed honestly: B breaks A's lock with ``ebooklet.break_lock``
    (as a user would for a writer believed dead), so only the conditional manifest
    PUT stands between the two commits.
    """
    create(conn, tmp_path, {"base": "0"})
    base_seq = head_manifest(boto3_client, s3_server.bucket, db_key)["seq"]
    # A long lease: A must not notice the broken lock while the test runs.
    a, b = spawn("a", lease=600), spawn("b", lease=600)
    a.call("open", path=str(tmp_path / "a.blt"))
    assert b.call("break_lock")["holder"]["pid"] == a.pid
    b.call("open", path=str(tmp_path / "b.blt"))
    edits = {
        a: {"k" if same_key else "from-a": "value of a"},
        b: {"k" if same_key else "from-b": "value of b"},
    }
    for worker in (a, b):
        worker.call("update", items=edits[worker])
        worker.send("push", hold=True)
        assert worker.expect("at_commit")["seq"] == base_seq + 1  # both on the same head

    replies = {}
    if release == "one_then_other":
        for worker in (b, a):  # b commits first, then a's conditional PUT must fail
            worker.send("go")
            replies[worker] = worker.receive()
    else:
        for worker in (a, b):
            worker.send("go")
        replies = {worker: worker.receive() for worker in (a, b)}

    final = read_remote(make_conn(), tmp_path)
    manifest = head_manifest(boto3_client, s3_server.bucket, db_key)
    if not same_key:
        for worker in (a, b):
            worker.ok(replies[worker])
        assert final == {"base": "0", **edits[a], **edits[b]}
        assert manifest["seq"] == base_seq + 2
        # Exactly one writer needed a second commit attempt: the loser, on top of the winner.
        calls = sorted(replies[w]["commit_calls"] for w in (a, b))
        assert calls == [1, 2], replies
        if release == "one_then_other":
            assert replies[a]["commit_calls"] == 2
        # The loser reused its uploaded pack: one pack per commit, none uploaded twice.
        packs = list_objects(boto3_client, s3_server.bucket, db_key + ".ebk/pack/")
        assert len(packs) == 3, packs
        for worker in (a, b):
            assert worker.call("changes")["changes"] == []
    else:
        winners = [w for w in (a, b) if replies[w]["ok"]]
        losers = [w for w in (a, b) if not replies[w]["ok"]]
        assert len(winners) == 1 and len(losers) == 1, replies
        winner, loser = winners[0], losers[0]
        if release == "one_then_other":
            assert winner is b
        assert replies[loser]["error"] == "ConflictError", replies[loser]
        assert replies[loser]["keys"] == ["k"]
        assert final == {"base": "0", **edits[winner]}
        assert manifest["seq"] == base_seq + 1  # the loser committed nothing
        # The loser still has its edit, now seen as a conflict it can resolve.
        assert loser.call("get", key="k")["value"] == "value of " + loser.name
        assert loser.call("changes")["changes"] == [["conflict", "k"]]


def test_writers_taking_the_lock_in_turn_lose_no_update(spawn, conn, make_conn, tmp_path):
    """Two processes increment one counter in turns, each from its own local file.

    Each turn opens 'w' (waiting for the other's lock), reads the counter, writes it
    back plus one, pushes and closes. Every increment must survive.
    """
    create(conn, tmp_path, {"counter": "0"})
    turns = 4
    workers = [spawn(name) for name in ("a", "b")]
    for worker in workers:
        worker.send("turns", n=turns, name=worker.name, path=str(tmp_path / f"{worker.name}.blt"))
    for worker in workers:
        worker.ok(worker.receive())
    final = read_remote(make_conn(), tmp_path)
    assert final["counter"] == str(2 * turns)
    for worker in workers:
        assert {k: v for k, v in final.items() if k.startswith(worker.name + "-")} == {
            f"{worker.name}-{i}": str(i) for i in range(turns)
        }


# --------------------------------------------------------------------------- 7. the write lock


def test_live_writers_lock_raises_locked_error_saying_who_and_since_when(
    spawn, conn, tmp_path
):
    """Opening 'w' while a live process holds the lock waits ``lock_timeout``, then raises."""
    create(conn, tmp_path, {"x": "1"})
    holder = spawn("holder")
    holder.call("open", path=str(tmp_path / "holder.blt"))
    mine = tmp_path / "mine.blt"

    started = time.monotonic()
    with pytest.raises(ebooklet.LockedError) as info:
        ebooklet.open(conn, mine, "w", lock_timeout=1.5)
    waited = time.monotonic() - started
    assert 1.5 <= waited < 15

    owner = info.value.owner
    assert owner["pid"] == holder.pid
    assert owner["host"] == socket.gethostname()
    since = datetime.fromisoformat(owner["created"])
    assert abs((datetime.now(timezone.utc) - since).total_seconds()) < 60
    message = str(info.value)
    assert str(holder.pid) in message and socket.gethostname() in message
    assert owner["created"] in message

    # Without lock_timeout it does not wait.
    started = time.monotonic()
    with pytest.raises(ebooklet.LockedError):
        ebooklet.open(conn, mine, "w")
    assert time.monotonic() - started < 1.5

    # The failed opens disturbed nothing: the holder still pushes, and once it has
    # closed, our local file (not left locked by the failed opens) opens for writing.
    holder.call("update", items={"x": "2"})
    assert holder.call("push")["committed"]
    holder.call("close")
    with ebooklet.open(conn, mine, "w") as db:
        assert db["x"] == "2"


def test_lock_timeout_waits_until_the_holder_closes(spawn, conn, tmp_path):
    """With ``lock_timeout`` the open waits for the other writer instead of failing,
    and then sees what that writer pushed while it waited."""
    create(conn, tmp_path, {"x": "1"})
    holder = spawn("holder")
    holder.call("open", path=str(tmp_path / "holder.blt"))
    holder.call("update", items={"x": "2"})
    holder.call("push")
    holder.send("close", after=1.0)
    started = time.monotonic()
    with ebooklet.open(conn, tmp_path / "mine.blt", "w", lock_timeout=30) as db:
        assert time.monotonic() - started >= 0.5
        assert db["x"] == "2"
    holder.ok(holder.receive())


def test_lease_is_renewed_while_alive_and_expires_after_kill(spawn, conn, tmp_path):
    """A live writer renews its short lease; SIGKILLed, its lock expires and is taken over."""
    lease = 2.0
    create(conn, tmp_path, {"x": "1"})
    holder = spawn("holder", lease=lease)
    holder.call("open", path=str(tmp_path / "holder.blt"))
    mine = tmp_path / "mine.blt"

    time.sleep(lease * 1.5)  # longer than the lease: only renewal keeps the lock
    with pytest.raises(ebooklet.LockedError):
        ebooklet.open(conn, mine, "w")

    holder.kill()
    with pytest.raises(ebooklet.LockedError):  # not expired yet
        ebooklet.open(conn, mine, "w")
    started = time.monotonic()
    with ebooklet.open(conn, mine, "w", lock_timeout=10 * lease) as db:
        assert time.monotonic() - started <= lease + 2
        db["x"] = "mine"
        assert db.changes().push().committed


def test_same_local_file_reclaims_its_own_lock_after_a_crash(
    spawn, conn, make_conn, boto3_client, s3_server, db_key, tmp_path
):
    """After a SIGKILL, reopening the crashed writer's file takes its lock back at once
    (same owner id) while any other copy is still locked out."""
    create(conn, tmp_path, {"x": "1"})
    path = tmp_path / "crashed.blt"
    writer = spawn("crashed")
    writer.call("open", path=str(path))
    writer.call("update", items={"x": "unpushed"})
    writer.kill()

    with pytest.raises(ebooklet.LockedError):
        ebooklet.open(conn, tmp_path / "other.blt", "w")
    started = time.monotonic()
    with ebooklet.open(conn, path, "w", lock_timeout=0) as db:
        assert time.monotonic() - started < 5
        assert db["x"] == "unpushed"
        assert db.changes().push().committed
    assert not lock_exists(boto3_client, s3_server.bucket, db_key)
    assert read_remote(make_conn(), tmp_path) == {"x": "unpushed"}


def test_break_lock_by_hand(spawn, conn, make_conn, tmp_path):
    """``break_lock`` removes a live writer's lock; that writer notices and cannot push
    while the new holder has it, then pushes safely once it is free."""
    assert ebooklet.break_lock(conn) is None  # nothing to break yet
    create(conn, tmp_path, {"x": "1"})
    holder = spawn("holder", lease=0.9)
    holder.call("open", path=str(tmp_path / "holder.blt"))
    holder.call("update", items={"h": "from holder"})

    broken = ebooklet.break_lock(conn)
    assert broken["pid"] == holder.pid and broken["host"] == socket.gethostname()
    with ebooklet.open(conn, tmp_path / "mine.blt", "w") as db:
        time.sleep(1.0)  # the holder's next renewal finds its lock gone
        reply = holder.request("push")
        assert not reply["ok"] and reply["error"] == "LockedError", reply
        db["m"] = "from me"
        db.changes().push()
    assert holder.call("push")["committed"]
    assert read_remote(make_conn(), tmp_path) == {"x": "1", "h": "from holder", "m": "from me"}


def test_an_open_n_refused_by_the_lock_changes_nothing(conn, make_conn, tmp_path):
    """An open that raises ``LockedError`` leaves the local copy as it was."""
    create(conn, tmp_path, {"x": "1", "y": "2"})
    path = tmp_path / "mine.blt"
    with ebooklet.open(conn, path, "w") as db:
        db["x"] = "pending"
    holder = ebooklet.open(make_conn(), tmp_path / "holder.blt", "w")
    with holder, pytest.raises(ebooklet.LockedError):
        ebooklet.open(conn, path, "n")
    with ebooklet.open(conn, path, "w") as db:
        assert db["x"] == "pending"
        db.changes().push()
    assert read_remote(make_conn(), tmp_path) == {"x": "pending", "y": "2"}


def test_close_releases_the_lock(conn, boto3_client, s3_server, db_key, tmp_path):
    """The lock exists exactly while a writer has the database open."""
    create(conn, tmp_path, {"x": "1"})
    assert not lock_exists(boto3_client, s3_server.bucket, db_key)
    db = ebooklet.open(conn, tmp_path / "a.blt", "w")
    assert lock_exists(boto3_client, s3_server.bucket, db_key)
    db.close()
    assert not lock_exists(boto3_client, s3_server.bucket, db_key)
    with ebooklet.open(conn, tmp_path / "b.blt", "w"):  # no wait needed
        assert lock_exists(boto3_client, s3_server.bucket, db_key)
    assert not lock_exists(boto3_client, s3_server.bucket, db_key)


# --------------------------------------------------------------------------- 8. kill -9 while pushing


def test_kill_during_push_leaves_the_last_commit_and_pending_edits(
    spawn, make_conn, s3_server, boto3_client, db_key, tmp_path
):
    """SIGKILL a pushing process at random moments, several times.

    Each time: a fresh copy reads either the whole old state or the whole new one,
    never a mix; reopening the same local file reclaims the lock at once, still has
    the edits (pending unless the commit had landed), and its push completes them,
    reusing values the dead push had uploaded (or leaving them for vacuum); every
    pack the head references is whole. Fresh copies read by connection and, where the
    bucket is public, by public URL in turn.
    """
    seed = int(os.environ.get("EBOOKLET_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    n, size = 1000, 9000  # ~9 MiB: two packs, one of them multipart
    path = tmp_path / "writer.blt"
    keys = [f"k{i:05d}" for i in range(n)]

    def state(gen: int) -> dict:
        out = {}
        for i, key in enumerate(keys):
            unit = f"g{gen}:{i};"
            out[key] = (unit * (size // len(unit) + 1))[:size]
        return out

    def packs() -> dict[str, int]:
        return list_objects(boto3_client, s3_server.bucket, db_key + ".ebk/pack/")

    def push_generation(gen: int, wait: Callable[[], object] | None) -> float:
        """Push generation ``gen`` from a child; SIGKILL it once ``wait()`` returns."""
        worker = spawn(f"gen{gen}")
        worker.call("open", path=str(path), flag="c")
        worker.call("fill", n=n, size=size, tag=f"g{gen}")
        worker.send("push", announce=True)
        worker.expect("pushing")
        started = time.monotonic()
        if wait is None:
            worker.ok(worker.receive())
            worker.call("close")
        else:
            wait()
            worker.kill()
        return time.monotonic() - started

    def packs_are_up(before: set[str]) -> Callable[[], object]:
        def wait() -> None:  # both packs uploaded, commit not yet (or just) made
            deadline = time.monotonic() + 30
            while len(set(packs()) - before) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)

        return wait

    push_time = push_generation(0, None)
    fractions = [0.0, 0.15, 0.35, 0.55, 0.75, 0.95, 1.3]
    kill_points: list[float | str] = [*rng.sample(fractions, 2), "packs up"]
    readers = [make_conn(), s3_server.public_url(db_key)]
    readers = [r for r in readers if r is not None]
    outcomes = []
    for gen, point in enumerate(kill_points, 1):
        reader = readers[gen % len(readers)]
        note = f"seed={seed} gen={gen} kill point {point} (push takes {push_time:.2f} s)"
        old, new = state(gen - 1), state(gen)
        packs_before = set(packs())
        if isinstance(point, str):
            push_generation(gen, packs_are_up(packs_before))
        else:
            push_generation(gen, partial(time.sleep, point * push_time))

        seen = read_remote(reader, tmp_path)
        committed = seen == new
        assert committed or seen == old, (
            f"{note}: a mix of {sum(seen.get(k) == new[k] for k in keys)} new and "
            f"{sum(seen.get(k) == old[k] for k in keys)} old values"
        )
        dead_packs = set(packs()) - packs_before

        started = time.monotonic()
        with ebooklet.open(make_conn(), path, "w", lock_timeout=0) as db:
            assert time.monotonic() - started < 5, note
            pending = {c.key: c.kind for c in db.changes().iter_changes()}
            assert pending == ({} if committed else dict.fromkeys(keys, "modified")), note
            for key in rng.sample(keys, 50):
                assert db[key] == new[key], note
            result = db.changes().push()
        assert result.committed == (not committed), note
        assert read_remote(reader, tmp_path) == new, note

        # Every pack the head references is whole; the dead push's packs are either
        # referenced (reused: their values were not uploaded again) or left unreferenced.
        referenced = referenced_packs(boto3_client, s3_server.bucket, db_key)
        existing = packs()
        for pack, entries in referenced.items():
            assert pack in existing, f"{note}: {pack} referenced but missing"
            assert max(e.offset + e.length for e in entries) <= existing[pack], note
        reused = sum(e.length for p, es in referenced.items() if p in dead_packs for e in es)
        if not committed:
            assert result.bytes_uploaded == n * size - reused, note
        outcomes.append((point, committed, reused))
    print("kill outcomes (point, committed, bytes reused):", outcomes, "seed", seed)


# --------------------------------------------------------------------------- 11. same local file


@pytest.mark.parametrize("flag", ["r", "w", "n"])
def test_two_processes_on_one_local_file_are_serialised(spawn, conn, tmp_path, flag):
    """A second writer opening the same local file waits for the first one to close
    (``timeout=None``) or raises booklet's ``LockTimeoutError`` after ``timeout``, without
    touching the first one's files; a reader (flag 'r') opens beside the writer at once
    and reads its flushed edits (issue 16, docs/processes.md)."""
    create(conn, tmp_path, {"x": "1"})
    path = tmp_path / "shared.blt"
    first = spawn("first")
    first.call("open", path=str(path))
    first.call("update", items={"x": "first"})

    started = time.monotonic()
    if flag == "r":
        with ebooklet.open(conn, path, flag, timeout=1.0) as db:
            assert db["x"] == "first"
    else:
        with pytest.raises(booklet.LockTimeoutError):
            ebooklet.open(conn, path, flag, timeout=1.0)
    assert time.monotonic() - started < 10
    first.call("update", items={"y": "after the attempt"})

    first.send("close", after=1.0)
    started = time.monotonic()
    with ebooklet.open(conn, path, "w", timeout=None) as db:
        assert time.monotonic() - started >= 0.5
        # The first process's edits, intact and pending.
        assert (db["x"], db["y"]) == ("first", "after the attempt")
        assert {c.key: c.kind for c in db.changes().iter_changes()} == {
            "x": "modified", "y": "added"
        }
    first.ok(first.receive())


# --------------------------------------------------------------------------- 13. neighbours


def _neighbour_keys(db_key: str, folder_ok: bool = True) -> list[str]:
    """Objects named like ``D``; ``D/child`` (``D`` used as a "directory") only where
    the store lets ``D`` be created beside it (see ``folder_blocks_create``)."""
    folder, name = db_key.rsplit("/", 1)
    return [
        f"{db_key}2",  # D2
        f"{db_key}.old",  # D.old
        f"{folder}/data/{name}",  # data/D
        *([f"{db_key}/child"] if folder_ok else []),
        f"{db_key}.ebk",  # the prefix without its slash
        f"{db_key}.ebkx/pack/0",  # a longer prefix
        f"{db_key}2.ebk/lock",  # D2's lock
    ]


def _snapshot(boto3_client: Any, bucket: str, keys: list[str]) -> dict[str, tuple[bytes, str]]:
    out = {}
    for key in keys:
        obj = boto3_client.get_object(Bucket=bucket, Key=key)
        out[key] = (obj["Body"].read(), obj["ETag"])
    return out


def _touched_keys(requests: list[tuple[str, str, int]], bucket: str) -> list[str]:
    """Object keys (and list prefixes, marked ``LIST:``) of logged requests."""
    out = []
    for _, target, _ in requests:
        url = urlsplit(target)
        path = unquote(url.path)
        if path.rstrip("/") == f"/{bucket}":
            prefix = parse_qs(url.query).get("prefix", [""])[0]
            out.append(f"LIST:{prefix}")
        elif path.startswith(f"/{bucket}/"):
            out.append(path[len(bucket) + 2 :])
    return out


def test_pushing_a_database_never_touches_its_neighbours(
    make_conn, s3_server, boto3_client, db_key, tmp_path
):
    """Create, update, delete keys, replace ('n'), clear, break the lock and list the
    packs of ``D``: objects named like it (``D2``, ``D.old``, ``data/D``, ``D/child``,
    ``D.ebk``, ``D.ebkx/...``; ``D/child`` where the store allows it, see
    tests/test_providers.py) stay byte-identical, none appear, and (on moto, from its
    request log) no request reads or lists anything outside ``D`` and ``D.ebk/``."""
    bucket = s3_server.bucket
    neighbours = _neighbour_keys(db_key, not folder_blocks_create(s3_server, db_key.rsplit("/", 1)[0]))
    for key in neighbours:
        boto3_client.put_object(Bucket=bucket, Key=key, Body=f"neighbour {key}".encode() * 100)
    before = _snapshot(boto3_client, bucket, neighbours)
    folder = db_key.rsplit("/", 1)[0] + "/"
    log = s3_server.server
    mark = len(log.iter_requests()) if log is not None else 0

    conn = make_conn()
    path = tmp_path / "d.blt"
    with ebooklet.open(conn, path, "c", value_serializer="str") as db:
        db.update({f"k{i}": str(i) for i in range(20)})
        db.changes().push()
        del db["k0"]
        db["k1"] = "changed"
        db.changes().push()
        db.get_remote_hash()
    with ebooklet.open(conn, path, "n", value_serializer="str") as db:
        db["only"] = "one"
        db.changes().push()
        db.clear()
        db.changes().push()
    ebooklet.break_lock(conn)
    requests = log.iter_requests()[mark:] if log is not None else []

    assert _snapshot(boto3_client, bucket, neighbours) == before
    for key in list_objects(boto3_client, bucket, folder):
        assert key in neighbours or key == db_key or key.startswith(db_key + ".ebk/"), key
    assert requests or log is None
    for key in _touched_keys(requests, bucket):
        if key.startswith("LIST:"):
            assert key.startswith(f"LIST:{db_key}.ebk/"), key
        else:
            assert key == db_key or key.startswith(db_key + ".ebk/"), key


def test_two_databases_in_one_bucket_work_side_by_side(make_conn, s3_server, db_key, tmp_path):
    """``D`` and ``D2`` (a prefix of each other's name) are written, pushed, replaced
    and read back interleaved, each seeing only its own keys."""
    keys = {db_key: "d", db_key + "2": "d2"}
    dbs = {
        key: ebooklet.open(make_conn(key), tmp_path / f"{tag}.blt", "c", value_serializer="str")
        for key, tag in keys.items()
    }
    try:
        for round_ in range(3):
            for key, tag in keys.items():
                dbs[key][f"{tag}-{round_}"] = f"{tag} round {round_}"
                dbs[key]["shared-name"] = f"{tag} {round_}"
                dbs[key].changes().push()
        del dbs[db_key]["d-0"]
        dbs[db_key].changes().push()
    finally:
        for db in dbs.values():
            db.close()
    expected = {
        db_key: {"d-1": "d round 1", "d-2": "d round 2", "shared-name": "d 2"},
        db_key + "2": {
            "d2-0": "d2 round 0", "d2-1": "d2 round 1", "d2-2": "d2 round 2", "shared-name": "d2 2",
        },
    }
    for key, items in expected.items():
        assert read_remote(make_conn(key), tmp_path) == items
        url = s3_server.public_url(key)
        if url is not None:
            assert read_remote(url, tmp_path) == items
