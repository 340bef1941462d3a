"""A database's history: the chain of commits, finding and pinning one, and the diff of two.

History is a chain: each commit's manifest names its parent ``{seq, commit_id}``
and every committed manifest is kept as ``D.ebk/commit/<seq:012d>-<commit_id>``,
so walking the chain needs only GETs (public readers can do it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from .. import display
from .. import format as fmt
from ..connection import S3Connection
from ..errors import (
    EBookletError,
    IntegrityError,
    OfflineError,
    ReadOnlyError,
    RemoteNotFoundError,
)
from ..format import Entry
from ..remote import RemoteIndex
from ..replica import Replica


@dataclass(frozen=True)
class Commit:
    """One commit of a database's history, as :meth:`EBooklet.history` lists it.

    Attributes:
        seq: the commit's sequence number (1 for the first push).
        commit_id: its unique id (changes when ``vacuum`` re-lays a commit out).
        timestamp: when it was committed, in microseconds since the Unix epoch.
        changed_keys: how many keys the push set or deleted (``None`` if unknown).
        n_keys, n_bytes: the database's key count and value bytes after it.
        message: the ``push(message=...)`` note, or ``None``.
        uuid: the database uuid at that commit.
    """

    seq: int
    commit_id: str
    timestamp: int
    changed_keys: int | None
    n_keys: int
    n_bytes: int
    message: str | None
    uuid: str

    @property
    def time(self) -> datetime:
        """:attr:`timestamp` as an aware UTC datetime."""
        return fmt.utc_datetime(self.timestamp)

    @classmethod
    def from_manifest(cls, manifest: dict) -> Commit:
        return cls(
            manifest["seq"],
            manifest["commit_id"],
            manifest["timestamp"],
            manifest.get("changed_keys"),
            manifest["n_keys"],
            manifest["n_bytes"],
            manifest.get("message"),
            manifest["uuid"],
        )


def _ref_name(ref: dict) -> str:
    return fmt.commit_name(ref["seq"], ref["commit_id"])


def _parse_commit_name(name: str) -> tuple[int, str] | None:
    """``(seq, commit_id)`` of a ``.ebk/commit/<seq:012d>-<32 hex>`` suffix, or ``None`` for
    any other name (a listed name is used only if it is exactly one ebooklet makes)."""
    prefix = fmt.PREFIX + "commit/"
    if not name.startswith(prefix) or not fmt.is_own_name(name):
        return None
    seq, _, commit_id = name[len(prefix) :].partition("-")
    return int(seq), commit_id


def _fetch_record(conn: S3Connection, name: str) -> dict | None:
    """The commit record ``name`` (``None``: gone, removed by ``vacuum``)."""
    try:
        return fmt.decode_manifest(conn.get(name, max_bytes=fmt.MAX_MANIFEST_BYTES).data, name)
    except RemoteNotFoundError:
        return None


def iter_chain(
    conn: S3Connection,
    head: dict | None,
    limit: int | None = None,
    listing: Iterable[str] | None = None,
) -> Iterator[dict]:
    """The head manifest, then each parent's commit record, newest first.

    Follows ``parent`` pointers with GETs (public readers can do it). With a
    writable connection the commit records are listed and fetched in parallel
    first. The walk ends at the first commit without a parent or whose record
    is gone (removed by ``vacuum``).
    """
    if head is None:
        return
    records: dict[str, dict] = {}
    if conn.writable:
        names = listing if listing is not None else (n for n, _ in conn.list(fmt.PREFIX + "commit/"))
        low = head["seq"] - limit if limit is not None else 0
        wanted = [n for n in names if (p := _parse_commit_name(n)) and low < p[0] < head["seq"]]
        fetched = zip(wanted, conn.workers.map(lambda name: _fetch_record(conn, name), wanted), strict=True)
        records = {name: m for name, m in fetched if m is not None}
    yield head
    count, ref = 1, head.get("parent")
    while ref is not None and (limit is None or count < limit):
        name = _ref_name(ref)
        manifest = records.get(name) or _fetch_record(conn, name)
        if manifest is None:
            return  # removed by vacuum: the history starts after it
        if manifest["commit_id"] != ref["commit_id"] or manifest["seq"] != ref["seq"]:
            raise IntegrityError(f"Commit record {name} does not hold the commit it is named after.")
        yield manifest
        count += 1
        ref = manifest.get("parent")


def history(conn: S3Connection, head: dict | None, limit: int | None = None) -> History:
    """The commits of the chain ending at ``head``, newest first."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, not {limit!r}.")
    return History(Commit.from_manifest(m) for m in iter_chain(conn, head, limit))


class History(list):
    """A list of :class:`Commit`, newest first, shown as a table in notebooks."""

    def _repr_html_(self) -> str:
        rows = (
            (c.seq, c.time.strftime("%Y-%m-%d %H:%M:%S UTC"), c.changed_keys, c.n_keys, c.n_bytes, c.message)
            for c in self
        )
        return display.table("History", ("seq", "time", "changed keys", "keys", "bytes", "message"), rows)


def check_commit_arg(commit: Any) -> None:
    """Check a ``commit=`` argument: a seq (int >= 1) or a commit id (non-empty str).

    Raises:
        TypeError, ValueError: it is neither.
    """
    if isinstance(commit, bool) or not isinstance(commit, (int, str)):
        raise TypeError(f"commit must be a seq (int) or a commit id (str), not {commit!r}.")
    if isinstance(commit, int) and commit < 1:
        raise ValueError(f"commit seq must be >= 1, not {commit}.")
    if isinstance(commit, str) and not commit:
        raise ValueError("commit id must not be empty.")


def find_commit(conn: S3Connection, head: dict | None, commit: int | str) -> dict:
    """The manifest of commit ``commit`` (a seq or a commit id) in the chain ending at ``head``.

    Raises:
        RemoteNotFoundError: no such commit (never made, or removed by vacuum).
    """
    check_commit_arg(commit)
    if head is None:
        raise RemoteNotFoundError(f"{conn!r} has no commits yet.")
    limit = None
    if isinstance(commit, int):
        if commit > head["seq"]:
            raise RemoteNotFoundError(f"Commit {commit} does not exist: the newest is {head['seq']}.")
        limit = head["seq"] - commit + 1
    oldest = head["seq"]
    for manifest in iter_chain(conn, head, limit):
        if commit in (manifest["seq"], manifest["commit_id"]):
            return manifest
        oldest = manifest["seq"]
    raise RemoteNotFoundError(
        f"Commit {commit!r} is not in the history of {conn!r} (it goes back to seq {oldest}; "
        "older commits were removed by vacuum)."
    )


def pin_commit(replica: Replica, commit: int | str) -> None:
    """Make an opened read-only database show commit ``commit`` (``open(..., commit=)``).

    The pinned manifest lives in memory only: the local mirror's head is left alone.
    """
    if replica.conn is None:
        raise ValueError("commit= needs a remote (an S3Connection or a public URL).")
    if replica.offline:
        raise OfflineError(f"{replica.conn!r} cannot be reached: a past commit can only be opened online.")
    log = replica.log
    if log.edits or log.replace or log.metadata_dirty:
        raise EBookletError(
            f"{replica.path} has unpushed edits, which would hide the snapshot's values; "
            "open the snapshot with another file path."
        )
    replica.pin(find_commit(replica.conn, replica.remote.manifest, commit))


def db_head(replica: Replica) -> dict | None:
    """The newest head manifest of a database's remote (or its pinned snapshot)."""
    replica.check_open()
    if replica.conn is None:
        raise OfflineError(f"{replica.path} has no remote; reopen it with an S3Connection or URL.")
    replica.refresh()
    return replica.remote.manifest


def writable_conn(replica: Replica, what: str) -> S3Connection:
    """The connection of a database, for an operation that writes remotely.

    The remote needs credentials; the local flag does not matter (``'r'`` only
    protects the local file), nor may the database be a past snapshot.
    """
    replica.check_open()
    if replica.pinned is not None:
        raise ReadOnlyError(f"{replica.path} is a snapshot of commit {replica.pinned['seq']}; {what} needs the head.")
    conn = replica.conn
    if conn is not None and not conn.writable:
        raise ReadOnlyError(
            f"{what} cannot work through the public URL {conn.db_url}, which is read-only: "
            "open the database with an S3Connection with credentials (access key id and "
            "secret key)."
        )
    if conn is None:
        raise ReadOnlyError(
            f"{what} needs a database opened with an S3Connection with credentials; "
            f"{replica.path} was opened without a remote."
        )
    if replica.offline:
        raise OfflineError(f"{conn!r} cannot be reached; {what} needs the remote.")
    return conn


# ---------------------------------------------------------------- diff


class KeyDiff(NamedTuple):
    """A key whose value differs between two commits (md5s as hex, ``None``: absent)."""

    kind: str  # "added", "modified" or "deleted" (going from the first commit to the second)
    key: Any
    old_md5: str | None
    new_md5: str | None


def diff_manifests(index: RemoteIndex, a: dict, b: dict) -> Iterator[tuple[str, bytes, Entry | None, Entry | None]]:
    """``(kind, key, entry in a, entry in b)`` for every key whose value differs.

    Shards are read through ``index``; those that both commits share (same object)
    are skipped unread.
    """
    if a["n_shards"] == b["n_shards"]:
        pairs = [
            (fmt.shard_name_at(a, i), fmt.shard_name_at(b, i))
            for i in range(a["n_shards"])
            if a["shards"][i] != b["shards"][i]
        ]
        index.load_shards([n for pair in pairs for n in pair])
        olds: dict[bytes, Entry] = {}
        news: dict[bytes, Entry] = {}
        for name_a, name_b in pairs:
            olds.update(index.shard(name_a))
            news.update(index.shard(name_b))
    else:
        olds, news = dict(index.iter_entries(a)), dict(index.iter_entries(b))
    for key in sorted(olds.keys() | news.keys()):
        old, new = olds.get(key), news.get(key)
        if old is None:
            yield "added", key, None, new
        elif new is None:
            yield "deleted", key, old, None
        elif old.md5 != new.md5:
            yield "modified", key, old, new


REVERT_BATCH = 1000
"""A revert downloads the values it restores this many at a time."""


def stage_revert(replica: Replica, commit: int | str) -> int:
    """Make the local copy hold the state of ``commit`` as pending edits: each key whose
    value differs between the head and ``commit`` is set to its value then (with its
    timestamp then) or deleted, and so is the user metadata. Returns how many keys.

    Raises:
        EBookletError: the local copy has unpushed edits (push or discard them first).
        ReadOnlyError, OfflineError: as :func:`writable_conn`; flag ``'r'``.
        RemoteNotFoundError: no such commit (never made, or removed by vacuum).
    """
    replica.check_writable()
    writable_conn(replica, "revert")
    log = replica.log
    if log.edits or log.replace or log.metadata_dirty:
        raise EBookletError(
            f"{replica.path} has unpushed edits: push or discard them before reverting, so "
            "that the revert does not mix with them."
        )
    head = db_head(replica)
    old = find_commit(replica.conn, head, commit)
    restore: list[tuple[bytes, Entry]] = []
    deleted = 0
    for kind, kb, _, then in diff_manifests(replica.remote, head, old):
        if kind == "deleted":
            replica.delete_value(replica.codec.decode_key(kb), kb)
            deleted += 1
        else:
            restore.append((kb, then))
    for start in range(0, len(restore), REVERT_BATCH):
        for kb, entry, raw in replica.remote.fetch_values(restore[start : start + REVERT_BATCH]):
            raw = bytes(raw)
            replica.set_value(replica.codec.decode_key(kb), kb, raw, entry.md5, entry.timestamp)
    if old.get("metadata") != head.get("metadata"):
        replica.set_metadata(old.get("metadata"))
    return len(restore) + deleted


def db_diff(replica: Replica, seq_a: int | str, seq_b: int | str | None = None) -> list[KeyDiff]:
    """Keys whose values differ between commits ``seq_a`` and ``seq_b`` (default: the head)."""
    head = db_head(replica)
    a = find_commit(replica.conn, head, seq_a)
    b = head if seq_b is None else find_commit(replica.conn, head, seq_b)
    return [
        KeyDiff(kind, replica.codec.decode_key(key), _hex(old), _hex(new))
        for kind, key, old, new in diff_manifests(replica.remote, a, b)
    ]


def _hex(entry: Entry | None) -> str | None:
    return entry.md5.hex() if entry is not None else None
