"""Progress reporting: a callback for programs, a bar when asked or on a terminal,
nothing in scripts; push, pull, load_items, copy_remote and vacuum against the server."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import ebooklet
import ebooklet.remote
from ebooklet import EBookletError
from ebooklet.progress import Progress


def test_a_callback_sees_every_unit_from_every_thread():
    seen: list[tuple[int, int | None]] = []
    lock = threading.Lock()

    def callback(done: int, total: int | None) -> None:
        with lock:
            seen.append((done, total))

    with Progress(callback, total=8 * 100) as progress:
        threads = [threading.Thread(target=lambda: [progress.update(1) for _ in range(100)]) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert progress.done == 800
    assert sorted(done for done, _ in seen) == list(range(1, 801))
    assert {total for _, total in seen} == {800}


def test_silent_by_default_off_a_terminal_and_when_false(capsys):
    for how in (None, False):
        with Progress(how, total=10) as progress:
            progress.update(10)
    assert capsys.readouterr() == ("", "")


def test_true_draws_a_bar(capsys):
    with Progress(True, total=3 << 20, desc="push") as progress:
        progress.update(3 << 20)
    assert "push" in capsys.readouterr().err


def test_bad_kinds_are_refused():
    with pytest.raises(TypeError, match="progress must be"):
        Progress("yes", total=1)


def test_true_without_tqdm_names_the_extra():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'tqdm': raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from ebooklet.progress import Progress\n"
        "from ebooklet import EBookletError\n"
        "try:\n"
        "    Progress(True, total=1)\n"
        "except EBookletError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert '[progress]"' in out.stdout, out.stderr
    assert EBookletError  # the type the child caught


# --------------------------------------------------------------------------- operations


class Seen:
    """A progress callback recording ``(done, total)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None]] = []
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int | None) -> None:
        with self._lock:
            self.calls.append((done, total))

    def check_ends_at(self, total: int) -> None:
        """Counts only grow, every known total is ``total``, the last call is the end."""
        assert self.calls, "the callback was never called"
        dones = [d for d, _ in self.calls]
        assert dones == sorted(dones)
        assert {t for _, t in self.calls if t is not None} == {total}
        assert self.calls[-1] == (total, total)


def _values(n: int, size: int, tag: str = "v") -> dict[str, str]:
    return {f"k{i:03d}": (f"{tag}{i};" * size)[:size] for i in range(n)}


@pytest.fixture
def small_packs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packs of about 2 kB: a push of a few values uploads several packs."""
    monkeypatch.setattr(ebooklet.remote, "PACK_SIZE", 2000)


def test_push_reports_bytes_uploaded(conn: Any, tmp_path: Path, small_packs: None) -> None:
    seen = Seen()
    with ebooklet.open(conn, tmp_path / "db", "c", value_serializer="str") as db:
        db.update(_values(20, 700))
        db["same"] = db["k000"]  # a duplicate: not uploaded again
        result = db.changes().push(progress=seen)
    assert result.bytes_uploaded == 20 * 700
    seen.check_ends_at(result.bytes_uploaded)
    assert len(seen.calls) > 2  # pack by pack


def test_load_items_and_pull_report_values(conn: Any, tmp_path: Path, small_packs: None) -> None:
    with ebooklet.open(conn, tmp_path / "a", "c", value_serializer="str") as db:
        db.update(_values(30, 500))
        db.changes().push()
    seen = Seen()
    with ebooklet.open(conn, tmp_path / "b", "r") as db:
        assert db.load_items(progress=seen) == 30
    seen.check_ends_at(30)
    assert [d for d, _ in seen.calls[1:]] == list(range(1, 31))  # value by value

    with ebooklet.open(conn, tmp_path / "a", "w") as db:
        db.update(_values(5, 500, tag="new"))
        db.changes().push()
    seen = Seen()
    with ebooklet.open(conn, tmp_path / "b", "r") as db:
        assert db.pull(progress=seen) == 5
    seen.check_ends_at(5)


@pytest.mark.parametrize("server_side", [True, False])
def test_copy_reports_objects(
    conn: Any, make_conn: Any, db_key: str, tmp_path: Path, small_packs: None, server_side: bool
) -> None:
    target = make_conn(db_key=db_key[: -len("db")] + f"copy-{server_side}")
    seen = Seen()
    with ebooklet.open(conn, tmp_path / "db", "c", value_serializer="str") as db:
        db.update(_values(20, 700))
        db.changes().push()
        result = db.copy_remote(target, server_side=server_side, progress=seen)
    assert result.objects_copied > 3
    seen.check_ends_at(result.objects_copied)


def test_vacuum_reports_objects(conn: Any, tmp_path: Path, small_packs: None) -> None:
    seen = Seen()
    with ebooklet.open(conn, tmp_path / "db", "c", value_serializer="str") as db:
        for tag in "abc":
            db.update(_values(10, 700, tag))
            db.changes().push()
        result = db.vacuum(keep=1, progress=seen)
    assert result.objects_removed > 3
    seen.check_ends_at(result.packs_rewritten + result.objects_removed)


def test_false_prints_nothing(conn: Any, make_conn: Any, db_key: str, tmp_path: Path, capfd: Any) -> None:
    target = make_conn(db_key=db_key[: -len("db")] + "copy")
    with ebooklet.open(conn, tmp_path / "a", "c", value_serializer="str") as db:
        db.update(_values(5, 100))
        db.changes().push(progress=False)
        db.copy_remote(target, progress=False)
        db.vacuum(progress=False)
    with ebooklet.open(conn, tmp_path / "b", "r") as db:
        db.load_items(progress=False)
        db.pull(progress=False)
    assert capfd.readouterr() == ("", "")


def test_a_bad_value_is_refused_before_any_request(
    conn: Any, make_conn: Any, db_key: str, tmp_path: Path
) -> None:
    target = make_conn(db_key=db_key[: -len("db")] + "copy")
    with ebooklet.open(conn, tmp_path / "a", "c", value_serializer="str") as db:
        db["k"] = "v"
        db.changes().push()
        db["k"] = "w"
        calls = [
            lambda: db.changes().push(progress="yes"),
            lambda: db.load_items(progress=1),
            lambda: db.pull(progress="yes"),
            lambda: db.copy_remote(target, progress="yes"),
            lambda: db.vacuum(progress=[]),
        ]
        for call in calls:
            before = sum(conn.request_counts.values()) + sum(target.request_counts.values())
            with pytest.raises(TypeError, match="progress must be"):
                call()
            assert sum(conn.request_counts.values()) + sum(target.request_counts.values()) == before
        assert [c.kind for c in db.changes().iter_changes()] == ["modified"]  # nothing pushed


def test_a_total_learned_later_is_told_at_once():
    seen = Seen()
    with Progress(seen, total=None) as progress:
        progress.update(3)
        progress.set_total(5)
        progress.update(2)
    assert seen.calls == [(3, None), (3, 5), (5, 5)]
