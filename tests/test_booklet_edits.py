"""Edits made to the data file ``P`` outside ebooklet are found before any read.

"Work in booklet, push later": ``P`` is a plain booklet file, and whatever is written to
it with ``booklet.open(P, 'w')`` between two ebooklet sessions (or by a process killed
before its journal records reached the disk) becomes pending local edits at the next
open, before a read could download the remote value over it. All against moto_server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import booklet
import pytest

import ebooklet
import ebooklet.outside
import ebooklet.replica

PUSHED = {"a": 1, "b": 2, "c": 3, "d": 4}


def seed(conn: Any, path: Path, values: dict | None = None) -> None:
    """Push ``values`` (default :data:`PUSHED`) from a local copy at ``path`` and close it."""
    with ebooklet.open(conn, path, "c", value_serializer="orjson") as db:
        db.update(values or PUSHED)
        db.changes().push()


def changes(db: Any) -> set[tuple[str, Any]]:
    return {(c.kind, c.key) for c in db.changes().iter_changes()}


def read_back(remote: Any, path: Path) -> dict:
    with ebooklet.open(remote, path, "r") as db:
        return dict(db.items())


def test_booklet_edits_become_pending_edits_and_are_pushed(
    conn: Any, public_url: str, tmp_path: Path
) -> None:
    """New keys, overwrites, an overwrite equal to the remote value and a deletion made
    with plain booklet: read first, they are the local values; iter_changes lists them;
    push uploads them; a reader by URL sees them."""
    path = tmp_path / "db"
    seed(conn, path)
    with ebooklet.open(conn, path, "w") as db:
        db["c"] = 30  # a pending edit, deleted below with plain booklet
    with booklet.open(str(path), "w") as book:
        book["new"] = 10
        book["a"] = 100
        book["b"] = 2  # the remote's value again: no edit
        del book["c"]

    with ebooklet.open(conn, path, "w") as db:
        assert db["a"] == 100
        assert db["new"] == 10
        assert db["b"] == 2
        assert "c" not in db
        assert changes(db) == {("modified", "a"), ("added", "new"), ("deleted", "c")}
        result = db.changes().push()
        assert (result.keys_pushed, result.keys_deleted) == (2, 1)
        assert changes(db) == set()

    assert read_back(public_url, tmp_path / "reader") == {"a": 100, "b": 2, "d": 4, "new": 10}


def test_deleting_a_cached_value_with_booklet_is_told_not_pushed(conn: Any, tmp_path: Path) -> None:
    """The documented limit: booklet marks a deletion in place, so a deleted value that
    was only a copy of the remote cannot be told from one never downloaded. The open
    says so; the key reads the remote again and nothing is pushed for it."""
    path = tmp_path / "db"
    seed(conn, path)
    with booklet.open(str(path), "w") as book:
        del book["d"]
    with pytest.warns(RuntimeWarning, match="At least 1 value"):
        db = ebooklet.open(conn, path, "w")
    with db:
        assert db["d"] == 4
        assert changes(db) == set()


def test_flag_r_reads_booklet_edits_and_a_later_w_open_still_finds_them(
    conn: Any, public_url: str, tmp_path: Path
) -> None:
    """Flag 'r' writes no journal: the edits found are held for the session (reads return
    them, downloads do not overwrite them) and found again by the next open."""
    path = tmp_path / "db"
    seed(conn, path)
    with booklet.open(str(path), "w") as book:
        book["a"] = 100
        book["new"] = 10
    journal = Path(f"{path}.local_hash")
    before = journal.read_bytes()

    with ebooklet.open(conn, path, "r") as db:
        assert db["a"] == 100
        assert db["new"] == 10
        db.load_items()
        assert dict(db.items()) == {"a": 100, "b": 2, "c": 3, "d": 4, "new": 10}
        assert changes(db) == {("modified", "a"), ("added", "new")}
    assert journal.read_bytes() == before
    with booklet.open(str(path)) as book:
        assert (book["a"], book["new"]) == (100, 10)

    with ebooklet.open(conn, path, "r") as db:  # a second read-only session too
        assert db["a"] == 100
    with ebooklet.open(conn, path, "w") as db:
        assert changes(db) == {("modified", "a"), ("added", "new")}
        db.changes().push()
    assert read_back(public_url, tmp_path / "reader")["a"] == 100


def test_booklet_regrowing_its_index_and_pruning(conn: Any, tmp_path: Path) -> None:
    """Many new keys make booklet move its index to the end of the file (the scan skips
    it); a prune rewrites the file (the whole file is read): every edit is found."""
    path = tmp_path / "db"
    with ebooklet.open(conn, path, "c", value_serializer="orjson", n_buckets=11) as db:
        db.update(PUSHED)
        db.changes().push()
    added = {f"k{i}": i for i in range(300)}
    with booklet.open(str(path), "w") as book:
        book.update(added)
    with ebooklet.open(conn, path, "w") as db:
        assert {k: db[k] for k in added} == added
        assert len(changes(db)) == len(added)
    with booklet.open(str(path), "w") as book:
        book["a"] = 100
        book.prune()
        book["b"] = 200
    with ebooklet.open(conn, path, "w") as db:
        assert (db["a"], db["b"]) == (100, 200)
        assert changes(db) == {("modified", "a"), ("modified", "b")} | {
            ("added", k) for k in added
        }


def test_a_clean_reopen_reads_no_record(conn: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """Cost: reopening a file ebooklet closed scans nothing; after plain booklet
    appended one value, only that record is read."""
    path = tmp_path / "db"
    seed(conn, path, {f"k{i}": i for i in range(2000)})
    read: list[int] = []
    real_scan = ebooklet.replica.scan

    def counting_scan(*args: Any) -> Any:
        for record in real_scan(*args):
            read.append(1)
            yield record

    for module in (ebooklet.replica, ebooklet.outside):  # the data file's scans: both read it
        monkeypatch.setattr(module, "scan", counting_scan)
    ebooklet.open(conn, path, "w").close()
    assert read == []
    with booklet.open(str(path), "w") as book:
        book["k1"] = -1
    with ebooklet.open(conn, path, "w") as db:
        assert db["k1"] == -1
    assert len(read) == 1


CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import ebooklet
    spec = json.loads(os.environ["EBOOKLET_TEST_CHILD"])
    conn = ebooklet.S3Connection(**spec["conn"])
    db = ebooklet.open(conn, spec["path"], "w")
    db.load_items()
    for key, value in spec["sets"].items():
        db[key] = value
    db.update(spec["update"])
    db.sync()
    print("ready", flush=True)
    time.sleep(600)
    """
)


def run_and_kill(s3_server: Any, conn: Any, path: Path, sets: dict, update: dict) -> None:
    """A child process opens ``path``, downloads every value, writes ``sets`` and
    ``update``, syncs, and is killed with SIGKILL before it closes anything."""
    spec = {
        "conn": {
            "access_key_id": s3_server.access_key_id,
            "access_key": s3_server.access_key,
            "db_key": conn.db_key,
            "bucket": s3_server.bucket,
            "endpoint_url": s3_server.endpoint_url,
            "region": s3_server.region,
        },
        "path": str(path),
        "sets": sets,
        "update": update,
    }
    env = dict(os.environ, EBOOKLET_TEST_CHILD=json.dumps(spec))  # credentials not on argv
    env["PYTHONPATH"] = os.pathsep.join([str(Path(ebooklet.__file__).parents[1]), *sys.path])
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        line = child.stdout.readline()
        assert line == b"ready\n", child.stderr.read().decode()[-3000:]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.stderr.close()


@pytest.mark.parametrize("journal", ["intact", "cut at a record boundary"])
def test_values_written_by_a_killed_process_are_found(
    s3_server: Any, conn: Any, tmp_path: Path, journal: str
) -> None:
    """Reopened after the writer was killed: every value it wrote is there and pending,
    the values it downloaded are no edits. With its journal cut right after the magic
    (its records lost, as after a system crash), the values in P are still found."""
    seed(conn, tmp_path / "pusher", {f"k{i}": i for i in range(50)})
    path = tmp_path / "db"
    ebooklet.open(conn, path, "c").close()
    run_and_kill(s3_server, conn, path, {"k1": -1, "x": "new"}, {"k2": -2, "y": [1, 2]})
    if journal != "intact":
        with open(f"{path}.local_hash", "r+b") as f:
            f.truncate(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        db = ebooklet.open(conn, path, "w")
    with db:
        assert (db["k1"], db["x"], db["k2"], db["y"]) == (-1, "new", -2, [1, 2])
        assert changes(db) == {("modified", "k1"), ("modified", "k2"), ("added", "x"), ("added", "y")}
        db.changes().push()
    assert read_back(conn, tmp_path / "reader")["y"] == [1, 2]


def test_values_downloaded_by_a_killed_process_are_no_edits(
    s3_server: Any, conn: Any, tmp_path: Path
) -> None:
    """load_items(), then SIGKILL: the reopened copy has no pending edit."""
    seed(conn, tmp_path / "pusher", {f"k{i}": i for i in range(50)})
    path = tmp_path / "db"
    ebooklet.open(conn, path, "c").close()
    run_and_kill(s3_server, conn, path, {}, {})
    with ebooklet.open(conn, path, "w") as db:
        assert changes(db) == set()
        assert db["k7"] == 7
