"""The three-way rule (:func:`ebooklet.local.three_way`) and its callers agreeing on it.

The pure function is tested by properties with no server; ``iter_changes`` and
``push`` are tested against the real moto server to report and do what it decides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import ebooklet
from ebooklet.local import (
    REMOTE_UNKNOWN,
    UNKNOWN_MD5,
    Edit,
    State,
    found_edit,
    local_side,
    new_base,
    remote_md5,
    three_way,
)

T0 = 1_600_000_000_000_000
T1 = 1_700_000_000_000_000


class Version(NamedTuple):
    """A remote version as the rule reads it."""

    md5: bytes
    timestamp: int


# Few md5s and timestamps, so that sides often hold the same one.
md5s = st.sampled_from([b"a" * 16, b"b" * 16, b"c" * 16])
maybe_md5s = st.none() | md5s
timestamps = st.sampled_from([T0, T1])
edits = st.builds(Edit, maybe_md5s, maybe_md5s, st.booleans()).filter(
    lambda e: not (e.retimed and e.md5 is None)  # a retimed edit always has a value
)
remotes = st.none() | st.builds(Version, md5s, timestamps)
LOCAL_EDIT_STATES = {State.SETTLED, State.ADDED, State.MODIFIED, State.DELETED, State.CONFLICT}


@given(edits, remotes, timestamps, st.booleans())
def test_an_edited_key_is_in_a_local_edit_state(edit: Edit, remote: Any, ts: int, replacing: bool) -> None:
    assert three_way(edit, remote, ts, replacing) in LOCAL_EDIT_STATES


@given(remotes, st.none() | timestamps, st.booleans())
def test_a_key_without_edit_only_follows_the_remote(remote: Any, ts: int | None, replacing: bool) -> None:
    """No edit: unchanged, or a cached copy (``ts`` not None) the remote changed or deleted;
    nothing when the copy replaces its remote or caches nothing."""
    state = three_way(None, remote, ts, replacing)
    if replacing or ts is None:
        assert state is State.UNCHANGED
    elif remote is None:
        assert state is State.REMOTE_DELETED
    else:
        assert state is (State.UNCHANGED if remote.timestamp == ts else State.REMOTE_CHANGED)
    assert three_way(None, REMOTE_UNKNOWN, ts, replacing) is State.UNCHANGED


@given(edits, remotes, timestamps)
def test_settled_iff_local_equals_remote(edit: Edit, remote: Any, ts: int) -> None:
    """Settled exactly when the remote holds the local value, and, for a retimed edit,
    also its timestamp."""
    r = remote.md5 if remote is not None else None
    same = edit.md5 == r and (not edit.retimed or remote.timestamp == ts)
    assert (three_way(edit, remote, ts, False) is State.SETTLED) == same


@given(edits, remotes, timestamps)
def test_conflict_iff_both_sides_changed_and_differ(edit: Edit, remote: Any, ts: int) -> None:
    """A conflict exactly when the remote moved away from the base and the local copy
    does not hold what it moved to."""
    state = three_way(edit, remote, ts, False)
    r = remote.md5 if remote is not None else None
    assert (state is State.CONFLICT) == (r != edit.base and state is not State.SETTLED)
    if r != edit.base and not edit.retimed:
        assert (state is State.CONFLICT) == (edit.md5 != r)


@given(maybe_md5s, maybe_md5s, maybe_md5s, timestamps)
def test_local_and_remote_are_symmetric(local: Any, remote: Any, base: Any, ts: int) -> None:
    """Swapping the local value and the remote one (plain edits, each side changed from
    the base) keeps a conflict a conflict and a settled edit settled. (A pending edit
    back to its base still counts as a local change: set on purpose, it wins only by
    being pushed, so it is not symmetric with a remote that never moved.)"""
    assume(local != base and remote != base)

    def state(mine: bytes | None, theirs: bytes | None) -> State:
        version = None if theirs is None else Version(theirs, ts)
        return three_way(Edit(mine, base), version, ts, False)

    for kind in (State.CONFLICT, State.SETTLED):
        assert (state(local, remote) is kind) == (state(remote, local) is kind)


@given(edits, remotes, timestamps)
def test_unconflicted_edits_are_named_by_their_local_side(edit: Edit, remote: Any, ts: int) -> None:
    """Neither settled nor a conflict: a deletion, an addition (no remote value to
    replace) or a modification."""
    state = three_way(edit, remote, ts, False)
    if state in (State.SETTLED, State.CONFLICT):
        return
    if edit.md5 is None:
        assert state is State.DELETED
    else:
        assert state is (State.ADDED if edit.base is None else State.MODIFIED)


@given(edits, remotes, remotes, timestamps)
def test_a_replacing_copy_ignores_the_remote(edit: Edit, one: Any, other: Any, ts: int) -> None:
    """A copy replacing its remote: no conflict, every value added, every deletion settled,
    whatever the remote holds."""
    state = three_way(edit, one, ts, True)
    assert state is three_way(edit, other, ts, True)
    assert state is (State.SETTLED if edit.md5 is None else State.ADDED)
    assert remote_md5(edit, one, True) is None


@given(edits, timestamps)
def test_offline_the_remote_is_taken_to_be_the_base(edit: Edit, ts: int) -> None:
    """Remote unknown: never a conflict; a plain edit is judged as if the remote still held
    its base, a retimed one is a change to push."""
    state = three_way(edit, REMOTE_UNKNOWN, ts, False)
    assert state is not State.CONFLICT
    assert remote_md5(edit, REMOTE_UNKNOWN, False) == edit.base
    if not edit.retimed:
        as_base = None if edit.base is None else Version(edit.base, ts)
        assert state is three_way(edit, as_base, ts, False)
    else:
        assert state.listed


@given(edits, remotes, timestamps, st.booleans())
def test_listed_iff_push_has_work(edit: Edit, remote: Any, ts: int, replacing: bool) -> None:
    """What iter_changes lists for an edit is exactly what push does not settle."""
    state = three_way(edit, remote, ts, replacing)
    assert state.listed == (state is not State.SETTLED)
    assert state.value in {"added", "modified", "deleted", "conflict", "settled"}


@given(st.none() | edits, st.booleans())
def test_reads_follow_the_local_side(edit: Edit | None, replacing: bool) -> None:
    """A read is the local file's exactly when the key has an edit or the copy replaces
    its remote, and finds a value only for an edit that holds one."""
    side = local_side(edit, replacing)
    assert (side is None) == (edit is None and not replacing)
    assert bool(side) == (edit is not None and edit.md5 is not None)


@given(st.none() | edits, remotes | st.just(REMOTE_UNKNOWN), st.booleans())
def test_a_new_edit_keeps_the_first_base(edit: Edit | None, remote: Any, replacing: bool) -> None:
    """An edit of an edited key keeps the base of the first; otherwise the base is what
    the remote holds as far as known, nothing for a copy that replaces it."""
    base = new_base(edit, remote, replacing)
    if edit is not None:
        assert base == edit.base
    elif replacing or remote is None:
        assert base is None
    else:
        assert base == (UNKNOWN_MD5 if remote is REMOTE_UNKNOWN else remote.md5)


@given(md5s, timestamps, st.none() | edits, remotes, st.booleans())
def test_recovery_finds_what_differs(
    md5: bytes, ts: int, edit: Edit | None, remote: Any, whole_file: bool
) -> None:
    """A record written outside ebooklet is no edit when it holds the pending edit's value,
    or (no edit) the remote's value or timestamp; what it finds is an edit the rule would
    not settle against that remote."""
    found = found_edit(md5, ts, edit, remote, whole_file)
    if edit is not None:
        assert found == (None if edit.md5 == md5 else (md5, edit.base))
        return
    if remote is not None and (md5 == remote.md5 or ts == remote.timestamp):
        assert found is None
    if found is not None:
        assert found == (md5, remote and remote.md5)
        assert three_way(Edit(*found), remote, ts, False) is not State.SETTLED
    assert found_edit(md5, ts, None, REMOTE_UNKNOWN, whole_file) == (md5, UNKNOWN_MD5)


def _kinds(db: Any) -> list[str]:
    return [c.kind for c in db.changes().iter_changes()]


def test_retimed_edit_equal_to_the_remote_is_settled_by_both(conn: Any, tmp_path: Path) -> None:
    """Two writers give a key the same new timestamp: the second one's edit already equals
    the remote (value and timestamp), so iter_changes lists nothing and push commits
    nothing, and the edit is gone."""
    first, second = tmp_path / "first.blt", tmp_path / "second.blt"
    with ebooklet.open(conn, first, "n", value_serializer="pickle") as db:
        db.set("k", "v", timestamp=T0)
        db.changes().push()
    with ebooklet.open(conn, second, "w", value_serializer="pickle") as db:
        assert db["k"] == "v"  # cached with T0
    with ebooklet.open(conn, first, "w") as db:
        db.set_timestamp("k", T1)
        assert db.changes().push().committed
    with ebooklet.open(conn, second, "w") as db:
        db.set_timestamp("k", T1)
        assert _kinds(db) == []
        result = db.changes().push()
        assert not result.committed
        assert _kinds(db) == []
        assert db.get_timestamp("k") == T1
        assert db["k"] == "v"


def test_a_push_refused_for_a_conflict_changes_nothing(conn: Any, tmp_path: Path) -> None:
    """A push that meets a conflict forgets no edit, not even one already equal to the
    remote (it stays pending, with its base): a later remote change of that key is a
    conflict too. A push with nothing to send still forgets such an edit."""
    first, second = tmp_path / "first.blt", tmp_path / "second.blt"
    with ebooklet.open(conn, first, "n") as db:
        db.changes().push()
    with ebooklet.open(conn, second, "w") as db:
        db.update({"a": b"same", "c": b"mine"})
    with ebooklet.open(conn, first, "w") as db:
        db.update({"a": b"same", "c": b"theirs"})
        db.changes().push()
    with ebooklet.open(conn, second, "w") as db:
        with pytest.raises(ebooklet.ConflictError) as refused:
            db.changes().push()
        assert refused.value.keys == ["c"]
        assert db.info().pending_edits == 2
    with ebooklet.open(conn, first, "w") as db:
        db["a"] = b"changed"
        db.changes().push()
    with ebooklet.open(conn, second, "w") as db:
        with pytest.raises(ebooklet.ConflictError) as refused:
            db.changes().push()
        assert sorted(refused.value.keys) == ["a", "c"]
        db["c"] = b"theirs"
        db["a"] = b"changed"
        assert not db.changes().push().committed
        assert db.info().pending_edits == 0


def test_retimed_edit_to_the_remote_timestamp_lists_nothing(conn: Any, tmp_path: Path) -> None:
    """set_timestamp() to the timestamp the key already has remotely is no change."""
    path = tmp_path / "w.blt"
    with ebooklet.open(conn, path, "n", value_serializer="pickle") as db:
        db.set("k", "v", timestamp=T0)
        db.changes().push()
    with ebooklet.open(conn, path, "w") as db:
        db.set_timestamp("k", T0)
        assert _kinds(db) == []
        assert not db.changes().push().committed


def test_retimed_edit_to_another_timestamp_is_listed_and_pushed(
    conn: Any, reader: Any, tmp_path: Path
) -> None:
    """A retimed edit whose timestamp differs from the remote's is a modification, listed
    and pushed, even though the value equals the remote's."""
    path = tmp_path / "w.blt"
    with ebooklet.open(conn, path, "n", value_serializer="pickle") as db:
        db.set("k", "v", timestamp=T0)
        db.changes().push()
    with ebooklet.open(conn, path, "w") as db:
        db.set_timestamp("k", T1)
        assert _kinds(db) == ["modified"]
        result = db.changes().push()
        assert (result.committed, result.keys_pushed) == (True, 1)
        assert _kinds(db) == []
    with ebooklet.open(reader(conn), tmp_path / "r.blt", value_serializer="pickle") as r:
        assert r.get_timestamp("k") == T1


# --------------------------------------------------------------------------- callers agree

VALUES = (None, b"x", b"y", b"z")  # None: absent (remote) or deleted (local)


def _cases() -> dict[str, tuple[bytes | None, bytes | None, bytes | None]]:
    """key -> (base, remote, local): every plain edit of a key absent or holding x at its
    base, while the remote keeps it, deletes it or sets another value."""
    return {
        f"{base}-{remote}-{local}": (base, remote, local)
        for base in (None, b"x")
        for remote in (None, b"x", b"y")
        for local in VALUES
    }


#: key -> (timestamp the remote gets, timestamp the local copy gives): retimed edits of a
#: value x set at T0; ``None``: the remote sets value y instead.
RETIMED = {"retime-same": (T1, T1), "retime-other": (T1, T1 + 1), "retime-conflict": (None, T1)}


def _expected(cases: dict) -> dict[str, State]:
    """The rule's verdict per key, from the values themselves (equal values, equal md5s)."""
    out = {}
    for key, (base, remote, local) in cases.items():
        version = None if remote is None else Version(remote, 0)
        out[key] = three_way(Edit(local, base), version, None, False)
    for key, (theirs, mine) in RETIMED.items():
        version = Version(b"y", T0) if theirs is None else Version(b"x", theirs)
        out[key] = three_way(Edit(b"x", b"x", True), version, mine, False)
    return out


def _make_states(conn: Any, tmp_path: Path, cases: dict) -> Path:
    """Write the base, the local edits (second copy) and the remote changes; returns the
    second copy's path."""
    first, second = tmp_path / "first.blt", tmp_path / "second.blt"
    with ebooklet.open(conn, first, "n") as db:
        for key, (base, _, _) in cases.items():
            if base is not None:
                db[key] = base
        for key in RETIMED:
            db.set(key, b"x", timestamp=T0)
        db.changes().push()
    with ebooklet.open(conn, second, "w") as db:
        for key, (_, _, local) in cases.items():
            if local is None:
                db[key] = b"z"  # an edit of its own, then deleted
                del db[key]
            else:
                db[key] = local
        for key, (_, mine) in RETIMED.items():
            db.set_timestamp(key, mine)
    with ebooklet.open(conn, first, "w") as db:
        for key, (base, remote, _) in cases.items():
            if remote is None and base is not None:
                del db[key]
            elif remote is not None and remote != base:
                db[key] = remote
        for key, (theirs, _) in RETIMED.items():
            if theirs is None:
                db.set(key, b"y", timestamp=T0)
            else:
                db.set_timestamp(key, theirs)
        db.changes().push()
    return second


def test_iter_changes_and_push_follow_the_rule(conn: Any, reader: Any, tmp_path: Path) -> None:
    """For every combination of base, remote and local edit: iter_changes lists the rule's
    verdict, push refuses exactly its conflicts, and a forced push uploads, deletes and
    settles exactly what it says; nothing is listed after."""
    cases = _cases()
    path = _make_states(conn, tmp_path, cases)
    expected = _expected(cases)
    with ebooklet.open(conn, path, "w") as db:
        listed = {c.key: c.kind for c in db.changes().iter_changes()}
        assert listed == {k: s.value for k, s in expected.items() if s.listed}
        conflicts = {k for k, s in expected.items() if s is State.CONFLICT}
        assert conflicts  # the combinations hold conflicts, and push refuses them all
        try:
            db.changes().push()
        except ebooklet.ConflictError as exc:
            assert set(exc.keys) == conflicts
        else:
            raise AssertionError("push did not refuse the conflicts")
        assert {c.key: c.kind for c in db.changes().iter_changes()} == listed
        result = db.changes().push(force=True)
        local = {k: c[2] for k, c in cases.items()} | dict.fromkeys(RETIMED, b"x")
        pushed = {k for k, s in expected.items() if s.listed and local[k] is not None}
        deleted = {k for k, s in expected.items() if s.listed and local[k] is None}
        assert (result.keys_pushed, result.keys_deleted) == (len(pushed), len(deleted))
        assert list(db.changes().iter_changes()) == []
    with ebooklet.open(reader(conn), tmp_path / "r.blt") as r:
        for key, value in local.items():
            assert r.get(key) == value, key
        assert r.get_timestamp("retime-same") == T1
        assert r.get_timestamp("retime-other") == T1 + 1
