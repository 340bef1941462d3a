"""Behaviour 14: a model-based test of two local replicas of one remote database.

A hypothesis state machine drives random sequences of set, delete, clear, push (all,
forced, or one key), pull, discard, reopen and ``iter_changes`` on two local copies of
one remote database, and checks every read against a plain-dict model:

- ``committed``: what the remote holds;
- per replica, ``seen`` (the remote as of the replica's last refresh), ``pending``
  (unpushed edits, ``None`` for a deletion), ``base`` (the remote value each pending
  edit replaced) and ``replace`` (``clear()`` not pushed yet).

Both replicas are writers, so they take the remote write lock in turn: using one
closes the other (its edits stay pending in its files) and opening refreshes it. A push
must raise ``ConflictError`` exactly when the model says a key changed on both sides
since its base, naming those keys, and commit nothing.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import ebooklet
from conftest import S3Target
from ebooklet import ConflictError

KEYS = ("a", "b", "c")
keys = st.sampled_from(KEYS)
# Few values, so that both sides often hold the same one (dedup, "settled" edits).
values = st.sampled_from([b"", b"x", b"y", b"zz", bytes(range(40))])
replicas = st.sampled_from([0, 1])
LOCAL_KINDS = {"added", "modified", "deleted", "conflict"}


@dataclass
class Replica:
    """The model of one local copy."""

    seen: dict[str, bytes]
    pending: dict[str, bytes | None] = field(default_factory=dict)
    base: dict[str, bytes | None] = field(default_factory=dict)
    replace: bool = False

    def view(self) -> dict[str, bytes]:
        """What reads must return."""
        out = {} if self.replace else dict(self.seen)
        for key, value in self.pending.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
        return out

    def edit(self, key: str, value: bytes | None) -> None:
        if key not in self.pending:
            self.base[key] = None if self.replace else self.seen.get(key)
        self.pending[key] = value

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self.pending.pop(key, None)
            self.base.pop(key, None)

    def conflicts(self, committed: dict[str, bytes], keys: list[str]) -> set[str]:
        """Pending keys changed remotely since their base (and not to the same value)."""
        if self.replace:
            return set()
        return {
            k for k in keys
            if self.pending[k] != committed.get(k) and committed.get(k) != self.base[k]
        }

    def expected_changes(self, committed: dict[str, bytes]) -> set[tuple[str, str]]:
        """``(kind, key)`` of the local edits and conflicts ``iter_changes`` reports."""
        out = set()
        for key, value in self.pending.items():
            remote = None if self.replace else committed.get(key)
            if value == remote:
                continue
            if not self.replace and remote != self.base[key]:
                out.add(("conflict", key))
            elif value is None:
                out.add(("deleted", key))
            elif self.base[key] is None or self.replace:
                out.add(("added", key))
            else:
                out.add(("modified", key))
        return out


class ReplicaMachine(RuleBasedStateMachine):
    """Two replicas of one remote; ``target`` is set by the test."""

    target: S3Target

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"tests/model-{uuid.uuid4().hex[:12]}/"
        self.conn = self.target.connection(self.prefix + "db", threads=4)
        self.tmp = Path(tempfile.mkdtemp(prefix="ebooklet-model-"))
        self.paths = [self.tmp / "replica0", self.tmp / "replica1"]
        self.committed: dict[str, bytes] = {}
        self.model: list[Replica] = []
        self.db: Any = None
        self.current: int | None = None

    # ------------------------------------------------------------ plumbing

    def use(self, r: int) -> Any:
        """The open database of replica ``r`` (closing the other: one writer at a time)."""
        if self.current != r:
            self.close()
            self.db = ebooklet.open(self.conn, self.paths[r], "w")
            self.current = r
            self.model[r].seen = dict(self.committed)  # opening refreshes
        return self.db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db, self.current = None, None

    def teardown(self) -> None:
        try:
            self.close()
            self.conn.close()
            self.target.delete_prefix(self.prefix)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------ rules

    @initialize(initial=st.dictionaries(keys, values, max_size=3))
    def create(self, initial: dict[str, bytes]) -> None:
        with ebooklet.open(self.conn, self.paths[0], "n") as db:
            db.update(initial)
            assert db.changes().push().committed
        self.committed = dict(initial)
        self.model = [Replica(dict(initial)), Replica(dict(initial))]

    @rule(r=replicas, key=keys, value=values)
    def set_value(self, r: int, key: str, value: bytes) -> None:
        self.use(r)[key] = value
        self.model[r].edit(key, value)

    @rule(first=replicas, key=keys, mine=values, theirs=values)
    def both_edit_one_pushes(self, first: int, key: str, mine: bytes, theirs: bytes) -> None:
        """Both replicas edit the same key and the other one pushes first: a later push
        of ``first`` meets a conflict (unless the values agree)."""
        self.set_value(first, key, mine)
        self.set_value(1 - first, key, theirs)
        self._push(1 - first, list(self.model[1 - first].pending), force=False)

    @rule(r=replicas, items=st.dictionaries(keys, values, min_size=2))
    def update(self, r: int, items: dict[str, bytes]) -> None:
        self.use(r).update(items)
        for key, value in items.items():
            self.model[r].edit(key, value)

    @rule(r=replicas, key=keys)
    def delete(self, r: int, key: str) -> None:
        db = self.use(r)
        if key in self.model[r].view():
            del db[key]
            self.model[r].edit(key, None)
        else:
            with pytest.raises(KeyError):
                del db[key]

    @rule(r=replicas)
    def clear(self, r: int) -> None:
        self.use(r).clear()
        m = self.model[r]
        m.pending, m.base, m.replace = {}, {}, True

    def with_edits(self) -> list[int]:
        """Replicas that have something to push or discard."""
        return [r for r, m in enumerate(self.model) if m.pending or m.replace]

    @precondition(lambda self: self.with_edits())
    @rule(data=st.data(), force=st.booleans())
    def push(self, data: st.DataObject, force: bool) -> None:
        """Push every edit of a replica, or only those of one key."""
        r = data.draw(st.sampled_from(self.with_edits()), label="replica")
        m = self.model[r]
        only = data.draw(st.none() | st.sampled_from(sorted(m.pending) or KEYS), label="only")
        if only is None:
            self._push(r, list(m.pending), force)
        elif m.replace and self.committed:  # a pending clear() replaces the whole database
            with pytest.raises(ValueError, match="Push all keys"):
                self.use(r).changes().push([only], force=force)
        else:
            self._push(r, [only] if only in m.pending else [], force, keys=[only])

    def _push(self, r: int, selected: list[str], force: bool, keys: Any = None) -> None:
        db, m = self.use(r), self.model[r]
        m.seen = dict(self.committed)  # a push refreshes first
        conflicts = set() if force else m.conflicts(self.committed, selected)
        if conflicts:
            with pytest.raises(ConflictError) as info:
                db.changes().push(keys)
            assert set(info.value.keys) == conflicts
            return
        db.changes().push(keys, force=force)
        if m.replace and keys is None:
            self.committed = {k: v for k, v in m.pending.items() if v is not None}
            m.pending, m.base, m.replace = {}, {}, False
        elif m.replace:  # some keys replace an empty remote; the other edits stay pending
            self.committed = {k: m.pending[k] for k in selected if m.pending[k] is not None}
            m.forget(selected)
            m.replace = False
        else:
            for key in selected:
                if m.pending[key] is None:
                    self.committed.pop(key, None)
                else:
                    self.committed[key] = m.pending[key]
            m.forget(selected)
        m.seen = dict(self.committed)

    @rule(r=replicas)
    def pull(self, r: int) -> None:
        self.use(r).pull()
        self.model[r].seen = dict(self.committed)

    @precondition(lambda self: self.with_edits())
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        """Drop every edit of a replica (and a pending clear), or only those of one key."""
        r = data.draw(st.sampled_from(self.with_edits()), label="replica")
        m = self.model[r]
        only = data.draw(st.none() | st.sampled_from(KEYS), label="only")
        if only is None:
            self.use(r).changes().discard()
            m.pending, m.base, m.replace = {}, {}, False
        else:
            self.use(r).changes().discard([only])
            m.forget([only])

    @rule(r=replicas)
    def reopen(self, r: int) -> None:
        self.close()
        self.use(r)

    # ------------------------------------------------------------ checks

    @invariant()
    def reads_match_the_model(self) -> None:
        if self.db is None:
            return
        expected = self.model[self.current].view()
        for key in KEYS:
            assert self.db.get(key) == expected.get(key), key
            assert (key in self.db) == (key in expected), key
        assert len(self.db) == len(expected)
        assert sorted(self.db) == sorted(expected)
        assert dict(self.db.items()) == expected

    @invariant()
    def changes_match_the_model(self) -> None:
        """``iter_changes`` (which refreshes; the open replica is always up to date, since
        only it can push) reports the local edits and conflicts the model predicts."""
        if self.db is None:
            return
        got = {(c.kind, c.key) for c in self.db.changes().iter_changes()}
        assert {c for c in got if c[0] in LOCAL_KINDS} == self.model[
            self.current
        ].expected_changes(self.committed)


def test_two_replicas_agree_with_a_dict_model(s3_server: S3Target) -> None:
    machine = type("BoundReplicaMachine", (ReplicaMachine,), {"target": s3_server})
    run_state_machine_as_test(
        machine, settings=settings(max_examples=30, stateful_step_count=30, deadline=None)
    )


# --------------------------------------------------------------------------- regressions


def test_fresh_copy_edits_a_remote_key_without_a_false_conflict(
    conn: Any, tmp_path: Path
) -> None:
    """A key edited before its index shard was fetched had an unknown base that was
    resolved only when the remote head had changed: pushing it raised ConflictError."""
    with ebooklet.open(conn, tmp_path / "a", "n") as db:
        db["k"] = b"old"
        db.changes().push()
    with ebooklet.open(conn, tmp_path / "b", "w") as db:
        db["k"] = b"new"  # nothing read first: the shard is not local
        assert [c.kind for c in db.changes().iter_changes()] == ["modified"]
        assert db.changes().push().keys_pushed == 1
    with ebooklet.open(conn, tmp_path / "c", "r") as db:
        assert db["k"] == b"new"


def test_empty_value_after_another_value_reads_alone(
    conn: Any, reader: Any, tmp_path: Path
) -> None:
    """An empty value at a non-zero pack offset has no valid Range header; reading it
    alone used to fail ("the server ignored the Range header")."""
    with ebooklet.open(conn, tmp_path / "a", "n") as db:
        db.update({"full": b"xyz", "empty": b""})
        db.changes().push()
    with ebooklet.open(reader(conn), tmp_path / "b", "r") as db:
        assert db["empty"] == b""
        assert dict(db.items()) == {"full": b"xyz", "empty": b""}
