"""``ebooklet.delete_local``: a database's local files go, never unpushed edits by surprise."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

import ebooklet
from ebooklet import EBookletError

SUFFIXES = ("", ".local_hash", ".remote_index", ".ebk.json")


def _files(path: Path) -> list[Path]:
    return [p for p in (path.with_name(path.name + s) for s in SUFFIXES) if p.exists()]


def test_deletes_the_four_files_and_the_remote_stays(conn, tmp_path):
    path = tmp_path / "a.blt"
    with ebooklet.open(conn, path, "n") as db:
        db["k"] = b"v"
        db.changes().push()
    assert len(_files(path)) == 4
    deleted = ebooklet.delete_local(path)
    assert sorted(deleted) == sorted(str(p) for p in (path.with_name(path.name + s) for s in SUFFIXES))
    assert _files(path) == []
    assert ebooklet.delete_local(path) == []  # nothing left: nothing to do
    with ebooklet.open(conn, path, "r") as db:  # downloaded afresh
        assert db["k"] == b"v"


def test_refuses_unpushed_edits_unless_forced(tmp_path):
    path = tmp_path / "a.blt"
    with ebooklet.open(None, path, "n") as db:
        db["k"] = b"v"
    with pytest.raises(EBookletError, match="1 unpushed edit"):
        ebooklet.delete_local(path)
    with ebooklet.open(None, path, "r") as db:  # untouched
        assert db["k"] == b"v"
    assert len(ebooklet.delete_local(path, force=True)) == 4
    assert _files(path) == []


def _hold_open(path: str, opened, release) -> None:
    with ebooklet.open(None, path, "w"):
        opened.set()
        release.wait(30)


def test_refuses_a_database_another_process_has_open(tmp_path):
    path = tmp_path / "a.blt"
    with ebooklet.open(None, path, "n") as db:
        db["k"] = b"v"
        db.changes().discard()
    ctx = multiprocessing.get_context("spawn")
    opened, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_open, args=(str(path), opened, release))
    holder.start()
    try:
        assert opened.wait(30)
        with pytest.raises(EBookletError, match="open in another process"):
            ebooklet.delete_local(path)
        assert len(_files(path)) == 4
    finally:
        release.set()
        holder.join(30)
    assert len(ebooklet.delete_local(path)) == 4
