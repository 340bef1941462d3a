"""``open(..., lock="push")``: several writers keep one database open at once.

Every writer is a real process talking to the real server. The parent is the barrier:
it sends a push only after every writer has answered its open, so both hold flag
``'w'`` before either pushes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ebooklet
from ebooklet import format as fmt

WORKER = r"""
import json, os, sys

import ebooklet

conn = ebooklet.S3Connection(**json.loads(os.environ["EBOOKLET_TEST_WORKER"]))
db = None
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    try:
        if op == "open":
            db = ebooklet.open(conn, cmd["path"], "w", value_serializer="str", lock=cmd["lock"])
            reply = {}
        elif op == "update":
            db.update(cmd["items"])
            reply = {}
        elif op == "push":
            result = db.changes().push(force=cmd.get("force", False))
            reply = {"seq": result.seq}
        elif op == "pull":
            reply = {"n": db.changes().pull(force=cmd.get("force", False))}
        elif op == "get":
            reply = {"value": db.get(cmd["key"])}
        elif op == "close":
            db.close()
            reply = {}
        else:
            raise ValueError(op)
        reply["ok"] = True
    except Exception as exc:
        reply = {"ok": False, "error": type(exc).__name__, "message": str(exc),
                 "keys": list(getattr(exc, "keys", None) or [])}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
"""


class Writer:
    """A child process running ebooklet commands sent as JSON lines (credentials go
    through the environment)."""

    def __init__(self, target: Any, db_key: str):
        spec = {
            "access_key_id": target.access_key_id, "access_key": target.access_key,
            "db_key": db_key, "bucket": target.bucket, "endpoint_url": target.endpoint_url,
            "region": target.region,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=dict(os.environ, EBOOKLET_TEST_WORKER=json.dumps(spec)),
        )

    def request(self, op: str, **kw: Any) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the writer died during {op}"
        return json.loads(line)

    def call(self, op: str, **kw: Any) -> dict:
        reply = self.request(op, **kw)
        assert reply["ok"], reply
        return reply

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def writers(s3_server: Any, db_key: str) -> Iterator[Callable[[], Writer]]:
    made: list[Writer] = []

    def factory() -> Writer:
        made.append(Writer(s3_server, db_key))
        return made[-1]

    yield factory
    for w in made:
        w.stop()


def _seed(conn: Any, path: Path) -> None:
    with ebooklet.open(conn, path, "c", value_serializer="str") as db:
        db.update({"shared": "base", "other": "base"})
        db.changes().push()


def _both_open(writers: Callable[[], Writer], tmp_path: Path, lock: str) -> tuple[Writer, Writer]:
    a, b = writers(), writers()
    replies = [w.request("open", path=str(tmp_path / name), lock=lock) for w, name in ((a, "a"), (b, "b"))]
    assert all(r["ok"] for r in replies), replies  # the barrier: both open before any push
    return a, b


def test_disjoint_keys_both_land(conn: Any, writers: Callable[[], Writer], tmp_path: Path) -> None:
    _seed(conn, tmp_path / "seed")
    a, b = _both_open(writers, tmp_path, "push")
    a.call("update", items={"a1": "A", "a2": "A"})
    b.call("update", items={"b1": "B", "other": "B"})
    seq_a = a.call("push")["seq"]
    seq_b = b.call("push")["seq"]
    assert seq_b == seq_a + 1
    a.call("pull")
    assert a.call("get", key="b1")["value"] == "B"
    with ebooklet.open(conn, tmp_path / "check", "r") as db:
        assert dict(db.items()) == {"shared": "base", "other": "B", "a1": "A", "a2": "A", "b1": "B"}
    names = dict(conn.list(fmt.PREFIX))
    assert fmt.LOCK_NAME not in names  # released after each push


def test_overlapping_key_conflicts(conn: Any, writers: Callable[[], Writer], tmp_path: Path) -> None:
    _seed(conn, tmp_path / "seed")
    a, b = _both_open(writers, tmp_path, "push")
    a.call("update", items={"shared": "from A"})
    b.call("update", items={"shared": "from B", "b1": "B"})
    a.call("push")
    failed = b.request("push")
    assert failed["error"] == "ConflictError" and failed["keys"] == ["shared"], failed
    with ebooklet.open(conn, tmp_path / "check", "r") as db:
        assert db["shared"] == "from A" and "b1" not in db  # nothing of B's committed
    b.call("push", force=True)  # B keeps its value on purpose
    a.call("pull")
    assert a.call("get", key="shared")["value"] == "from B"
    assert a.call("get", key="b1")["value"] == "B"


def test_pull_force_takes_the_remote(conn: Any, writers: Callable[[], Writer], tmp_path: Path) -> None:
    _seed(conn, tmp_path / "seed")
    a, b = _both_open(writers, tmp_path, "push")
    a.call("update", items={"shared": "from A"})
    b.call("update", items={"shared": "from B"})
    a.call("push")
    assert b.request("push")["error"] == "ConflictError"
    b.call("pull", force=True)
    assert b.call("get", key="shared")["value"] == "from A"


def test_default_lock_refuses_second_writer(
    conn: Any, writers: Callable[[], Writer], tmp_path: Path
) -> None:
    _seed(conn, tmp_path / "seed")
    a, b = writers(), writers()
    a.call("open", path=str(tmp_path / "a"), lock="open")
    second = b.request("open", path=str(tmp_path / "b"), lock="open")
    assert second["error"] == "LockedError", second
    a.call("close")
    b.call("open", path=str(tmp_path / "b"), lock="open")


def test_push_scope_waits_for_an_open_scope_writer(conn: Any, tmp_path: Path) -> None:
    _seed(conn, tmp_path / "seed")
    with (
        ebooklet.open(conn, tmp_path / "a", "w", lock="open"),
        ebooklet.open(conn, tmp_path / "b", "w", lock="push") as db,  # opens: takes no lock
    ):
        db["k"] = "v"
        with pytest.raises(ebooklet.LockedError):
            db.changes().push()
        assert db.changes().pull() == 0  # reads need no lock


@pytest.mark.parametrize("bad", ["never", "", None, 1])
def test_bad_lock_argument(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="'open', 'push'"):
        ebooklet.open(None, tmp_path / "x", "c", lock=bad)
