"""Managing remote databases: history, snapshots, diff, delete, copy, vacuum and check.

A database at object key ``D`` owns ``D`` (its manifest) and the objects under
``D.ebk/`` (see ``DESIGN.md``); nothing here ever reads or writes another key,
so sibling keys such as ``D2`` or ``D.old`` are never touched.

History is a chain: each commit's manifest names its parent ``{seq, commit_id}``
and every committed manifest is kept as ``D.ebk/commit/<seq:012d>-<commit_id>``,
so walking the chain needs only GETs (public readers can do it). ``vacuum``
shortens the chain and deletes whatever the kept commits do not reference;
``docs/history-and-vacuum.md`` explains what it guarantees.
"""

from __future__ import annotations

import hashlib
import random
import time
import uuid as uuid_mod
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, NamedTuple

from . import format as fmt
from .connection import (
    COPY_SINGLE_MAX,
    ObjectVersion,
    S3Connection,
)
from .errors import (
    AuthError,
    ConflictError,
    EBookletError,
    FormatVersionError,
    IntegrityError,
    OfflineError,
    PreconditionFailed,
    ReadOnlyError,
    RemoteError,
    RemoteExistsError,
    RemoteNotFoundError,
)
from .format import Entry
from .lock import RemoteLock
from .remote import PACK_SIZE, PART_SIZE, RemoteIndex, plan_ranges, read_pack_footer

if TYPE_CHECKING:
    from .ebooklet import EBooklet

DEFAULT_REWRITE_BELOW = 0.5
"""``vacuum`` rewrites a pack when its live bytes fall below this fraction of its size."""


def _now_us() -> int:
    return int(time.time() * 1_000_000)


# ---------------------------------------------------------------- in-memory mirrors


class MemoryMirror:
    """A mirror (see ``remote.Mirror``) kept in memory: for one-off remotes (copy targets, checks)."""

    def __init__(self) -> None:
        self._manifest: tuple[dict | None, str | None] = (None, None)
        self._shards: dict[str, bytes] = {}

    def get_manifest(self) -> tuple[dict | None, str | None]:
        return self._manifest

    def set_manifest(self, manifest: dict | None, etag: str | None) -> None:
        self._manifest = (manifest, etag)

    def get_shard(self, name: str) -> bytes | None:
        return self._shards.get(name)

    def set_shard(self, name: str, data: bytes) -> None:
        self._shards[name] = data

    def drop_shards(self, names: Iterable[str]) -> None:
        for name in names:
            self._shards.pop(name, None)


class PinnedMirror(MemoryMirror):
    """The mirror of a snapshot: the pinned manifest in memory, shards through the real mirror.

    Index shards are immutable and named by the commit that wrote them, so the
    local ``P.remote_index`` can share them; its ``head`` is never changed.
    """

    def __init__(self, manifest: dict, base: Any):
        super().__init__()
        self._manifest = (manifest, None)
        self._base = base

    def get_shard(self, name: str) -> bytes | None:
        return self._base.get_shard(name)

    def set_shard(self, name: str, data: bytes) -> None:
        self._base.set_shard(name, data)

    def drop_shards(self, names: Iterable[str]) -> None:
        pass


class _Shards:
    """Decoded index shards by object name, each fetched once (in parallel)."""

    def __init__(self, conn: S3Connection, remote: RemoteIndex | None = None):
        self.conn = conn
        self.remote = remote
        self._cache: dict[str, dict[bytes, Entry]] = {}

    def load(self, names: Iterable[str | None]) -> None:
        missing = []
        for name in {n for n in names if n is not None and n not in self._cache}:
            cached = self.remote.local_shard(name)[0] if self.remote is not None else None
            if cached is not None:
                self._cache[name] = cached
            else:
                missing.append(name)

        def fetch(name: str) -> tuple[str, dict[bytes, Entry]]:
            return name, fmt.decode_shard(self.conn.get(name, max_bytes=fmt.MAX_SHARD_BYTES).data, name)

        for name, shard in self.conn.workers.map(fetch, sorted(missing)):
            self._cache[name] = shard

    def __getitem__(self, name: str | None) -> dict[bytes, Entry]:
        if name is None:
            return {}
        if name not in self._cache:
            self.load([name])
        return self._cache[name]

    def entries(self, manifest: dict) -> Iterator[tuple[bytes, Entry]]:
        """Every ``(key, entry)`` of a manifest."""
        names = [name for _, name in fmt.iter_shard_names(manifest)]
        self.load(names)
        for name in names:
            yield from self._cache[name].items()


# ---------------------------------------------------------------- history


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
        return datetime.fromtimestamp(self.timestamp / 1_000_000, timezone.utc)

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


def _kind(name: str) -> str:
    """The kind of a ``.ebk/<kind>/...`` suffix: ``"commit"``, ``"index"``, ``"pack"``..."""
    return name[len(fmt.PREFIX) :].partition("/")[0]


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


def history(conn: S3Connection, head: dict | None, limit: int | None = None) -> list[Commit]:
    """The commits of the chain ending at ``head``, newest first."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, not {limit!r}.")
    return [Commit.from_manifest(m) for m in iter_chain(conn, head, limit)]


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


def pin_commit(db: EBooklet, commit: int | str) -> None:
    """Make an opened read-only database show commit ``commit`` (``open(..., commit=)``).

    The pinned manifest lives in memory only: the local mirror's head is left alone.
    """
    if db._conn is None:
        raise ValueError("commit= needs a remote (an S3Connection or a public URL).")
    if db.offline:
        raise OfflineError(f"{db._conn!r} cannot be reached: a past commit can only be opened online.")
    if db._log.edits or db._log.replace or db._log.metadata_dirty:
        raise EBookletError(
            f"{db.path} has unpushed edits, which would hide the snapshot's values; "
            "open the snapshot with another file path."
        )
    manifest = find_commit(db._conn, db._remote.manifest, commit)
    db._pinned = manifest
    db._remote = RemoteIndex(db._conn, PinnedMirror(manifest, db._mirror))


def db_head(db: EBooklet) -> dict | None:
    """The newest head manifest of a database's remote (or its pinned snapshot)."""
    db._check_open()
    if db._conn is None:
        raise OfflineError(f"{db.path} has no remote; reopen it with an S3Connection or URL.")
    db._refresh()
    return db._remote.manifest


# ---------------------------------------------------------------- diff


class KeyDiff(NamedTuple):
    """A key whose value differs between two commits (md5s as hex, ``None``: absent)."""

    kind: str  # "added", "modified" or "deleted" (going from the first commit to the second)
    key: Any
    old_md5: str | None
    new_md5: str | None


def diff_manifests(shards: _Shards, a: dict, b: dict) -> Iterator[tuple[str, bytes, Entry | None, Entry | None]]:
    """``(kind, key, entry in a, entry in b)`` for every key whose value differs.

    Shards that both commits share (same object) are skipped unread.
    """
    if a["n_shards"] == b["n_shards"]:
        pairs = [
            (fmt.shard_name_at(a, i), fmt.shard_name_at(b, i))
            for i in range(a["n_shards"])
            if a["shards"][i] != b["shards"][i]
        ]
        shards.load([n for pair in pairs for n in pair])
        olds: dict[bytes, Entry] = {}
        news: dict[bytes, Entry] = {}
        for name_a, name_b in pairs:
            olds.update(shards[name_a])
            news.update(shards[name_b])
    else:
        olds, news = dict(shards.entries(a)), dict(shards.entries(b))
    for key in sorted(olds.keys() | news.keys()):
        old, new = olds.get(key), news.get(key)
        if old is None:
            yield "added", key, None, new
        elif new is None:
            yield "deleted", key, old, None
        elif old.md5 != new.md5:
            yield "modified", key, old, new


def db_diff(db: EBooklet, seq_a: int | str, seq_b: int | str | None = None) -> list[KeyDiff]:
    """Keys whose values differ between commits ``seq_a`` and ``seq_b`` (default: the head)."""
    head = db_head(db)
    a = find_commit(db._conn, head, seq_a)
    b = head if seq_b is None else find_commit(db._conn, head, seq_b)
    shards = _Shards(db._conn, db._remote)
    return [
        KeyDiff(kind, db._decode_key(key), _hex(old), _hex(new))
        for kind, key, old, new in diff_manifests(shards, a, b)
    ]


def _hex(entry: Entry | None) -> str | None:
    return entry.md5.hex() if entry is not None else None


# ---------------------------------------------------------------- listing what a database owns


def _versions(conn: S3Connection, suffix: str, exact: bool = False) -> list[ObjectVersion] | None:
    """Every version under ``suffix``; ``None`` when the server cannot list versions."""
    try:
        return list(conn.list_versions(suffix, exact=exact))
    except AuthError as exc:
        warnings.warn(
            f"Cannot list object versions ({exc}); if the bucket is versioned, old "
            "versions stay until you delete them (grant s3:ListBucketVersions).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    except RemoteError:
        return None  # a server without versioning support


def _is_versioned(versions: Iterable[ObjectVersion] | None) -> bool:
    return versions is not None and any(v.version_id not in (None, "null") for v in versions)


def _vid(version: ObjectVersion) -> str | None:
    return version.version_id if version.version_id not in (None, "null") else None


# ---------------------------------------------------------------- delete


@dataclass
class DeleteResult:
    """What :meth:`EBooklet.delete_remote` removed.

    Attributes:
        objects: distinct object keys removed (the manifest and every ``D.ebk/`` object).
        versions: object versions and delete markers removed (equals ``objects``
            in an unversioned bucket).
        bytes: the bytes they held.
    """

    objects: int = 0
    versions: int = 0
    bytes: int = 0


def _writable_conn(db: EBooklet, what: str) -> S3Connection:
    """The connection of a database, for an operation that writes remotely.

    The remote needs credentials; the local flag does not matter (``'r'`` only
    protects the local file), nor may the database be a past snapshot.
    """
    db._check_open()
    if db._pinned is not None:
        raise ReadOnlyError(f"{db.path} is a snapshot of commit {db._pinned['seq']}; {what} needs the head.")
    conn = db._conn
    if conn is not None and not conn.writable:
        raise ReadOnlyError(
            f"{what} cannot work through the public URL {conn.db_url}, which is read-only: "
            "open the database with an S3Connection with credentials (access key id and "
            "secret key)."
        )
    if conn is None:
        raise ReadOnlyError(
            f"{what} needs a database opened with an S3Connection with credentials; "
            f"{db.path} was opened without a remote."
        )
    if db.offline:
        raise OfflineError(f"{conn!r} cannot be reached; {what} needs the remote.")
    return conn


def delete_remote(db: EBooklet) -> DeleteResult:
    """Delete the remote database ``D``: the manifest and every ``D.ebk/`` object.

    Takes the write lock first. In a versioned bucket every version is deleted
    for good. Deletes the manifest first (so no reader sees a half-deleted
    database), then the rest, then the lock. The local files stay as a
    local-only database whose values are all local edits (see
    :meth:`EBooklet.delete_remote`): the database object goes on working offline
    from them, and a push with a connection recreates the remote.
    """
    conn = _writable_conn(db, "delete_remote")
    lock = db._ensure_lock()
    db._refresh()  # the cached values kept are those of the newest commit
    db._hold_local_values()
    manifests = _versions(conn, "", exact=True)
    owned = _versions(conn, fmt.PREFIX) if manifests is not None else None
    if manifests is None or owned is None:
        manifests = [ObjectVersion("", None, 0, True, False)]
        owned = [ObjectVersion(name, None, size, True, False) for name, size in conn.list(fmt.PREFIX)]
    result = DeleteResult()
    keys: set[str] = set()

    def remove(versions: list[ObjectVersion]) -> None:
        if versions:
            conn.delete_objects((v.suffix, _vid(v)) for v in versions)
            keys.update(v.suffix for v in versions)
            result.versions += len(versions)
            result.bytes += sum(v.size for v in versions)

    # older manifest versions first: until the current one goes, the database is intact
    remove([v for v in manifests if not v.is_latest])
    remove([v for v in manifests if v.is_latest])
    remove([v for v in owned if v.suffix != fmt.LOCK_NAME])
    lock.release()
    db._lock = None
    if _is_versioned(owned) or _is_versioned(manifests):
        remove(_versions(conn, fmt.LOCK_NAME, exact=True) or [])
    result.objects = len(keys)
    db._forget_deleted_remote()
    return result


# ---------------------------------------------------------------- copy


@dataclass
class CopyResult:
    """What :meth:`EBooklet.copy_remote` did.

    Attributes:
        uuid: the copy's database uuid (a copy is a database of its own).
        seq: the copy's commit sequence number.
        server_side: True when objects were copied inside the store (``CopyObject``).
        objects_copied: index shards and packs copied.
        objects_skipped: objects already at the target with the same name and size.
        bytes_copied: their bytes.
        requests: HTTP requests sent to the target, by method.
    """

    uuid: str
    seq: int
    server_side: bool
    objects_copied: int = 0
    objects_skipped: int = 0
    bytes_copied: int = 0
    requests: Counter = field(default_factory=Counter)


def same_store(a: S3Connection, b: S3Connection) -> bool:
    """True when one connection can copy the other's objects server-side.

    Both must have credentials, the same endpoint and region, and the same keys.
    """
    if not (a.writable and b.writable) or (a.endpoint_url, a.region) != (b.endpoint_url, b.region):
        return False
    return a.same_credentials(b)


def _check_target(source: S3Connection, target: Any) -> S3Connection:
    if not isinstance(target, S3Connection):
        raise TypeError(f"target must be an S3Connection, not {type(target).__name__}.")
    if not target.writable:
        raise ReadOnlyError("The target of copy_remote needs an S3Connection with bucket and db_key.")
    if source.writable and (source.endpoint_url, source.bucket) == (target.endpoint_url, target.bucket):
        a, b = source.db_key, target.db_key
        if a == b or a.startswith(b + fmt.PREFIX) or b.startswith(a + fmt.PREFIX):
            raise ValueError(f"Cannot copy {source!r} onto itself or inside its own objects ({target!r}).")
    return target


def copy_remote(
    db: EBooklet,
    target: S3Connection,
    overwrite: bool = False,
    server_side: bool | None = None,
    message: str | None = None,
) -> CopyResult:
    """Copy the database's newest commit (or its snapshot) to another location.

    See :meth:`EBooklet.copy_remote`.
    """
    head = db_head(db)
    source = db._conn
    target = _check_target(source, target)
    if head is None:
        raise RemoteNotFoundError(f"{source!r} has nothing committed to copy; push first.")
    same = same_store(source, target)
    if server_side is None:
        server_side = same
    elif server_side and not same:
        raise ValueError(
            "server_side=True needs both connections on the same endpoint with the same credentials."
        )
    before = Counter(target.request_counts)
    lock = RemoteLock(target, uuid_mod.uuid4().hex, "copy_remote")
    lock.acquire()
    try:
        index = RemoteIndex(target, MemoryMirror())
        old, old_etag = index.fetch_manifest()
        if old is not None and not overwrite:
            raise RemoteExistsError(
                f"{target!r} already holds a database (uuid {old['uuid']}, seq {old['seq']}); "
                "pass overwrite=True to replace it (its history stays until vacuum)."
            )
        shards = _Shards(source, db._remote)
        names = [name for _, name in fmt.iter_shard_names(head)]
        packs = sorted({fmt.pack_name(e.pack) for _, e in shards.entries(head)})
        result = CopyResult("", 0, server_side)
        sizes = dict(source.list(fmt.PREFIX)) if source.writable else None
        existing = dict(target.list(fmt.PREFIX))
        todo = _split_todo([*names, *packs], sizes, existing, result)
        if server_side:
            assert sizes is not None  # same_store() implies a writable source
            _copy_server_side(source, target, todo, sizes, result)
        else:
            _copy_streamed(source, target, todo, existing, result)
        content = {name: value for name, value in head.items() if name != "relayout"}
        content.update(
            uuid=uuid_mod.uuid4().hex,
            changed_keys=head["n_keys"],
            message=message if message is not None else f"copy of {source.db_url} at seq {head['seq']}",
            copied_from={"uuid": head["uuid"], "seq": head["seq"], "commit_id": head["commit_id"]},
        )
        manifest = fmt.build_manifest(content, old)
        try:
            index.commit(manifest, old_etag)
        except PreconditionFailed:
            raise RemoteExistsError(
                f"{target!r} was changed by another writer during the copy; nothing was committed. "
                "Copy again (with overwrite=True to replace it)."
            ) from None
        result.uuid, result.seq = manifest["uuid"], manifest["seq"]
    finally:
        lock.release()
    result.requests = Counter(target.request_counts) - before
    return result


def _split_todo(
    wanted: list[str], sizes: dict[str, int] | None, existing: dict[str, int], result: CopyResult
) -> list[str]:
    """The objects of ``wanted`` to copy: those not already at the target with the same size."""
    todo = []
    for name in wanted:
        if sizes is not None and name not in sizes:
            raise IntegrityError(f"{name} is referenced by the source's head but missing; run ebooklet.check().")
        if sizes is not None and existing.get(name) == sizes[name]:
            result.objects_skipped += 1
        else:
            todo.append(name)
    return todo


def _copy_server_side(
    source: S3Connection,
    target: S3Connection,
    todo: list[str],
    sizes: dict[str, int],
    result: CopyResult,
) -> None:
    """Copy inside the store (``CopyObject``), then check every copy's size."""
    large = [n for n in todo if sizes[n] > COPY_SINGLE_MAX]
    small = [n for n in todo if sizes[n] <= COPY_SINGLE_MAX]
    list(target.workers.map(lambda name: target.copy_object(source, name, sizes[name]), small))
    for name in large:  # multipart copies run their parts on the pool themselves
        target.copy_object(source, name, sizes[name])
    after = dict(target.list(fmt.PREFIX))
    wrong = [n for n in todo if after.get(n) != sizes[n]]
    if wrong:
        raise IntegrityError(f"Server-side copies of {len(wrong)} object(s) have the wrong size: {wrong[:5]}.")
    result.objects_copied += len(todo)
    result.bytes_copied += sum(sizes[n] for n in todo)


class _PackVerifier:
    """Checks, as a pack streams by, that every value matches the md5 in its footer."""

    def __init__(self, name: str, items: list[fmt.PackItem], tail: bytes, size: int):
        self.name = name
        self.items = sorted(items, key=lambda it: it.offset)
        self.hashers = [hashlib.md5(usedforsecurity=False) for _ in self.items]
        self.tail = tail  # the object's last bytes: footer and trailer
        self.tail_start = size - len(tail)
        self.size = size
        self._first = 0  # items before this one are complete

    def feed(self, start: int, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        end = start + len(view)
        i = self._first
        while i < len(self.items) and self.items[i].offset < end:
            item = self.items[i]
            lo, hi = max(item.offset, start), min(item.offset + item.length, end)
            if lo < hi:
                self.hashers[i].update(view[lo - start : hi - start])
            if item.offset + item.length <= end and i == self._first:
                self._first += 1
            i += 1
        lo = max(start, self.tail_start)
        if lo < end and bytes(view[lo - start :]) != self.tail[lo - self.tail_start : end - self.tail_start]:
            raise IntegrityError(f"{self.name} changed while it was being copied (footer differs).")

    def finish(self) -> None:
        for item, hasher in zip(self.items, self.hashers, strict=True):
            if hasher.digest() != item.md5:
                raise IntegrityError(
                    f"The value of key {item.key!r} in {self.name} does not match its md5: the "
                    "source pack is corrupted, nothing was committed to the target. Run ebooklet.check()."
                )


def _copy_streamed(
    source: S3Connection,
    target: S3Connection,
    todo: list[str],
    existing: dict[str, int],
    result: CopyResult,
) -> None:
    """Copy through this machine: small objects in parallel, large ones part by part."""
    large: list[tuple[str, list[fmt.PackItem], bytes, int]] = []

    def small_copy(name: str) -> tuple[int, int]:
        """``(objects copied, bytes copied)``; large packs are queued for later."""
        if name.startswith(fmt.PREFIX + "index/"):
            data = source.get(name, max_bytes=fmt.MAX_SHARD_BYTES).data
            fmt.decode_shard(data, name)  # verifies the shard's md5
        else:
            items, tail, size = read_pack_footer(source, name)
            if existing.get(name) == size:
                return 0, 0  # copied before (a pack's name fixes its content)
            if size > PART_SIZE:
                large.append((name, items, tail, size))
                return 0, 0
            data = tail if size == len(tail) else source.get_range(name, 0, size)
            verifier = _PackVerifier(name, items, tail, size)
            verifier.feed(0, data)
            verifier.finish()
        target.put(name, data)
        return 1, len(data)

    done = list(source.workers.map(small_copy, todo))
    result.objects_copied += sum(n for n, _ in done)
    result.bytes_copied += sum(b for _, b in done)
    result.objects_skipped += len(todo) - sum(n for n, _ in done) - len(large)
    for name, items, tail, size in sorted(large):
        target.put_multipart(name, _verified_parts(source, name, items, tail, size))
        result.objects_copied += 1
        result.bytes_copied += size


def _verified_parts(
    source: S3Connection, name: str, items: list[fmt.PackItem], tail: bytes, size: int
) -> Iterator[bytes]:
    """A large pack in parts of :data:`PART_SIZE`, each verified before it is handed on."""
    verifier = _PackVerifier(name, items, tail, size)
    for start in range(0, size, PART_SIZE):
        chunk = source.get_range(name, start, min(PART_SIZE, size - start))
        verifier.feed(start, chunk)
        if start + len(chunk) == size:
            verifier.finish()  # before the last part goes: a bad value aborts the upload
        yield chunk


# ---------------------------------------------------------------- vacuum


@dataclass
class VacuumResult:
    """What :meth:`EBooklet.vacuum` did.

    Attributes:
        commits_kept: seqs of the commits kept, newest first.
        commits_removed: seqs of the commits removed from the history.
        packs_removed, shards_removed, records_removed: objects deleted, by kind
            (``records_removed`` counts commit records, including those of pushes
            that never committed).
        packs_rewritten: packs whose live values were copied into new packs.
        objects_removed: every object (or object version) deleted.
        bytes_removed: the bytes they held.
        bytes_written: bytes of the new packs, index shards and commit records.
        unknown: objects under ``D.ebk/`` that are not ebooklet's, left alone.
    """

    commits_kept: list[int] = field(default_factory=list)
    commits_removed: list[int] = field(default_factory=list)
    packs_removed: int = 0
    shards_removed: int = 0
    records_removed: int = 0
    packs_rewritten: int = 0
    objects_removed: int = 0
    bytes_removed: int = 0
    bytes_written: int = 0
    unknown: list[str] = field(default_factory=list)

    @property
    def bytes_reclaimed(self) -> int:
        """Net bytes freed in the bucket (removed minus written)."""
        return self.bytes_removed - self.bytes_written


def _cutoff(older_than: Any) -> int | None:
    """``older_than`` as microseconds since the epoch."""
    if older_than is None:
        return None
    if isinstance(older_than, timedelta):
        return _now_us() - int(older_than.total_seconds() * 1_000_000)
    if isinstance(older_than, str):
        try:
            older_than = datetime.fromisoformat(older_than)
        except ValueError:
            raise ValueError(f"older_than {older_than!r} is not an ISO 8601 date/time.") from None
    if isinstance(older_than, datetime):
        if older_than.tzinfo is None:
            older_than = older_than.replace(tzinfo=timezone.utc)
        return int(older_than.timestamp() * 1_000_000)
    if isinstance(older_than, int) and not isinstance(older_than, bool):
        return older_than
    raise TypeError(
        "older_than must be a datetime, a timedelta (age), an ISO string or microseconds "
        f"since the epoch, not {type(older_than).__name__}."
    )


def _kept_prefix(chain: list[dict], keep: int | None, cutoff: int | None) -> int:
    """How many of the newest commits vacuum keeps (at least the head).

    The first commit beyond ``keep`` *and* older than ``cutoff`` (either test
    passes when not given) is removed, with every older one.
    """
    if keep is None and cutoff is None:
        return len(chain)
    n = 1
    while n < len(chain):
        beyond_keep = keep is None or n >= keep
        too_old = cutoff is None or chain[n]["timestamp"] < cutoff
        if beyond_keep and too_old:
            break
        n += 1
    return n


class _Live(NamedTuple):
    key: bytes
    entry: Entry


def _live_values(shards: _Shards, kept: list[dict]) -> dict[bytes, dict[tuple[int, int], _Live]]:
    """The values the kept commits reference: ``pack -> (offset, length) -> _Live``."""
    live: dict[bytes, dict[tuple[int, int], _Live]] = {}
    for m in kept:
        for _, name in fmt.iter_shard_names(m):
            for key, e in shards[name].items():
                live.setdefault(e.pack, {}).setdefault((e.offset, e.length), _Live(key, e))
    return live


def vacuum(
    db: EBooklet,
    keep: int | None = None,
    older_than: Any = None,
    rewrite_below: float = DEFAULT_REWRITE_BELOW,
    purge: bool | None = None,
) -> VacuumResult:
    """Shorten the history and delete what the kept commits do not reference.

    See :meth:`EBooklet.vacuum`.
    """
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise ValueError(f"keep must be an int >= 1 or None, not {keep!r}.")
    cutoff = _cutoff(older_than)
    if not isinstance(rewrite_below, (int, float)) or isinstance(rewrite_below, bool) or not 0 <= rewrite_below <= 1:
        raise ValueError(f"rewrite_below must be a fraction between 0 and 1, not {rewrite_below!r}.")
    conn = _writable_conn(db, "vacuum")
    lock = db._ensure_lock()
    head = db_head(db)
    if head is None:
        raise RemoteNotFoundError(f"{conn!r} has nothing committed to vacuum.")
    listing = dict(conn.list(fmt.PREFIX))
    chain = list(iter_chain(conn, head, listing=listing))
    n_kept = _kept_prefix(chain, keep, cutoff)
    kept, removed = chain[:n_kept], chain[n_kept:]
    purge = n_kept == 1 if purge is None else purge
    result = VacuumResult(commits_removed=[m["seq"] for m in removed])

    # what the kept commits reference
    shards = _Shards(conn, db._remote)
    shards.load(name for m in kept for _, name in fmt.iter_shard_names(m))
    live = _live_values(shards, kept)
    missing = [p.hex() for p in live if fmt.pack_name(p) not in listing]
    if missing:
        raise IntegrityError(
            f"{len(missing)} pack(s) referenced by kept commits are missing ({missing[:3]}); "
            "vacuum stopped without deleting anything. Run ebooklet.check()."
        )

    rewrite = _packs_to_rewrite(conn, live, listing, rewrite_below, purge)
    if rewrite:
        lock.ensure()
        kept = _relayout(db, conn, kept, shards, live, rewrite, result)
        live = _live_values(shards, kept)

    keep_names = {fmt.commit_name(m["seq"], m["commit_id"]) for m in kept}
    keep_names.update(name for m in kept for _, name in fmt.iter_shard_names(m))
    keep_names.update(fmt.pack_name(p) for p in live)
    doomed: list[str] = []
    for name in sorted(listing):
        if name.startswith(fmt.PREFIX + "probe-"):  # left by a writer that crashed mid-probe
            doomed.append(name)
            continue
        if not fmt.is_own_name(name):
            if name != fmt.LOCK_NAME:
                result.unknown.append(name)
            continue
        if name not in keep_names:
            doomed.append(name)
    lock.ensure()
    _delete_owned(conn, doomed, listing, keep_names, result)
    result.commits_kept = [m["seq"] for m in kept]
    _forget_deleted_uploads(db, {n for n in doomed if n.startswith(fmt.PREFIX + "pack/")})
    return result


def _packs_to_rewrite(
    conn: S3Connection,
    live: dict[bytes, dict[tuple[int, int], _Live]],
    listing: dict[str, int],
    rewrite_below: float,
    purge: bool,
) -> set[bytes]:
    """Packs whose live values vacuum copies into new packs.

    With ``purge``, every pack holding a value (or a key name in its footer)
    that no kept commit references; otherwise packs whose live bytes are below
    ``rewrite_below`` of their value bytes. Footers are read (one GET each)
    only for packs that might qualify: every pack when purging, else those
    whose live bytes are below ``rewrite_below`` of the whole object.
    """

    def live_bytes(pack: bytes) -> int:
        return sum(length for _, length in live[pack])

    candidates = sorted(
        p for p in live if purge or live_bytes(p) < rewrite_below * listing[fmt.pack_name(p)]
    )

    def qualifies(pack: bytes) -> bool:
        items, _, _ = read_pack_footer(conn, fmt.pack_name(pack))
        if purge and any((it.offset, it.length) not in live[pack] for it in items):
            return True
        return live_bytes(pack) < rewrite_below * sum(it.length for it in items)

    return {p for p, yes in zip(candidates, conn.workers.map(qualifies, candidates), strict=True) if yes}


def _relayout(
    db: EBooklet,
    conn: S3Connection,
    kept: list[dict],
    shards: _Shards,
    live: dict[bytes, dict[tuple[int, int], _Live]],
    rewrite: set[bytes],
    result: VacuumResult,
) -> list[dict]:
    """Copy the live values of ``rewrite`` into new packs and commit the new layout.

    Every kept commit whose index points into a rewritten pack (and every newer
    one, whose parent pointer changes) gets a new commit id and record; the
    head's is committed with the usual conditional manifest PUT. Returns the new
    kept manifests, newest first. Nothing is deleted here.
    """
    remote = db._remote
    moved: dict[tuple[bytes, int], Entry] = {}
    values = sorted(
        (v for pack in rewrite for v in live[pack].values()),
        key=lambda v: (v.entry.pack, v.entry.offset),
    )
    batch: list[_Live] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if not batch:
            return
        fetched = {(e.pack, e.offset): raw for _, e, raw in remote.fetch_values(batch)}
        items = [(v.key, fetched[(v.entry.pack, v.entry.offset)], v.entry.md5, v.entry.timestamp) for v in batch]
        for v, (_, new) in zip(batch, remote.upload_pack(items).located, strict=True):
            moved[(v.entry.pack, v.entry.offset)] = new
        result.bytes_written += size
        batch, size = [], 0

    for v in values:
        if size and size + v.entry.length > PACK_SIZE:
            flush()
        batch.append(v)
        size += v.entry.length
    flush()
    result.packs_rewritten = len(rewrite)

    renamed: dict[str, str] = {}  # old shard name -> commit id of its rewritten copy
    relaid: dict[str, str] = {}  # old commit id -> new commit id
    new_kept: list[dict] = []
    now = _now_us()
    for m in reversed(kept):  # oldest first, so parents are re-laid before children
        touched = [
            (i, name) for i, name in fmt.iter_shard_names(m)
            if name in renamed or any(e.pack in rewrite for e in shards[name].values())
        ]
        parent = m.get("parent")
        if not touched and not (parent and parent["commit_id"] in relaid):
            new_kept.append(m)
            continue
        if parent and parent["commit_id"] in relaid:
            parent = {"seq": parent["seq"], "commit_id": relaid[parent["commit_id"]]}
        content = dict(m, shards=list(m["shards"]), relayout={"of": m["commit_id"], "at": now})
        new = fmt.build_manifest(content, parent, seq=m["seq"], timestamp=m["timestamp"])
        commit_id = new["commit_id"]
        for i, name in touched:
            if name not in renamed:
                entries = {
                    k: moved.get((e.pack, e.offset), e) if e.pack in rewrite else e
                    for k, e in shards[name].items()
                }
                data = fmt.encode_shard(entries)
                conn.put(fmt.shard_name(commit_id, i), data)
                result.bytes_written += len(data)
                renamed[name] = commit_id
                shards._cache[fmt.shard_name(commit_id, i)] = entries
            new["shards"][i] = renamed[name]
        relaid[m["commit_id"]] = commit_id
        body = fmt.encode_manifest(new)
        result.bytes_written += len(body)
        if m is not kept[0]:
            conn.put(fmt.commit_name(new["seq"], commit_id), body)
        new_kept.append(new)
    new_head = new_kept[-1]
    if new_head is not kept[0]:
        try:
            remote.commit(new_head, remote.etag)
        except PreconditionFailed:
            raise ConflictError(
                [],
                "Another writer committed while vacuum held the lock (a server without "
                "conditional writes, or a lock broken by hand); nothing was deleted. Run vacuum again.",
            ) from None
    return list(reversed(new_kept))


def _delete_owned(
    conn: S3Connection,
    doomed: list[str],
    listing: dict[str, int],
    keep_names: set[str],
    result: VacuumResult,
) -> None:
    """Delete ``doomed`` objects (all versions in a versioned bucket): records, shards, packs.

    Commit records go first, so that a crash half-way leaves only unreferenced
    objects behind, never a listed commit whose objects are gone.
    """
    order = {"commit": 0, "index": 1, "pack": 2}
    doomed = sorted(doomed, key=lambda n: (order.get(_kind(n), 3), n))
    versions = _versions(conn, fmt.PREFIX)
    items: list[tuple[str, str | None, int]]
    if _is_versioned(versions):
        assert versions is not None
        doomed_set = set(doomed)
        rank = {n: i for i, n in enumerate(doomed)}
        items = []
        for v in versions:
            if v.suffix == fmt.LOCK_NAME or v.suffix in result.unknown:
                continue
            # not listed and not kept: deleted earlier, only old versions remain
            gone = v.suffix in doomed_set or (v.suffix not in listing and v.suffix not in keep_names)
            if gone or (v.suffix in keep_names and not v.is_latest):
                items.append((v.suffix, v.version_id, v.size))
        items.sort(key=lambda it: (rank.get(it[0], -1), it[0]))
        manifests = _versions(conn, "", exact=True) or []
        items += [("", v.version_id, v.size) for v in manifests if not v.is_latest]
    else:
        items = [(name, None, listing[name]) for name in doomed]
    conn.delete_objects((name, vid) for name, vid, _ in items)
    kinds = Counter(_kind(name) for name in doomed)
    result.packs_removed += kinds["pack"]
    result.shards_removed += kinds["index"]
    result.records_removed += kinds["commit"]
    result.objects_removed = len(items)
    result.bytes_removed = sum(size for _, _, size in items)


def _forget_deleted_uploads(db: EBooklet, deleted_packs: set[str]) -> None:
    """Drop journaled uploads (of a failed push) whose pack vacuum deleted."""
    log = db._log
    stale = [m for m, up in log.uploads.items() if fmt.pack_name(up.pack) in deleted_packs]
    if stale:
        for m in stale:
            del log.uploads[m]
        log.compact()


# ---------------------------------------------------------------- check


@dataclass
class CheckResult:
    """What :func:`ebooklet.check` found.

    Attributes:
        seq, commit_id: the head commit checked.
        commits: commits of the history walked.
        shards_checked, packs_checked, values_checked: objects and values verified.
        missing: referenced objects that do not exist.
        corrupt: descriptions of damaged objects and values.
        orphans: objects under ``D.ebk/`` no commit of the history references
            (``None`` when the connection cannot list, e.g. a public URL).
            ``vacuum()`` deletes them; ``check`` never deletes anything.
    """

    seq: int = 0
    commit_id: str = ""
    commits: int = 0
    shards_checked: int = 0
    packs_checked: int = 0
    values_checked: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    orphans: list[str] | None = None

    @property
    def ok(self) -> bool:
        """True when nothing referenced is missing or corrupt (orphans are harmless)."""
        return not self.missing and not self.corrupt


def check_remote(conn: S3Connection, sample: int | float | None = None, seed: int | None = None) -> CheckResult:
    """Verify the remote database of ``conn`` without changing anything: the work of
    :func:`ebooklet.check`, whose docstring says what is checked.

    Raises:
        RemoteNotFoundError: there is no database at ``conn``.
    """
    result = CheckResult()
    index = RemoteIndex(conn, MemoryMirror())
    try:
        head, _ = index.fetch_manifest()
    except (IntegrityError, FormatVersionError) as exc:
        result.corrupt.append(f"manifest: {exc}")
        return result
    if head is None:
        raise RemoteNotFoundError(f"There is no database at {conn!r} (or it is not public).")
    result.seq, result.commit_id = head["seq"], head["commit_id"]
    listing = dict(conn.list(fmt.PREFIX)) if conn.writable else None
    shards = _Shards(conn)

    def exists(name: str) -> bool:
        if listing is not None:
            return name in listing
        try:
            conn.get_range(name, 0, 1)
            return True
        except RemoteNotFoundError:
            return False

    record = fmt.commit_name(head["seq"], head["commit_id"])
    if not exists(record):
        result.missing.append(record)
    chain = list(iter_chain(conn, head, listing=listing)) if listing is not None else [head]
    result.commits = len(chain)
    referenced = {fmt.commit_name(m["seq"], m["commit_id"]) for m in chain}
    names = list(dict.fromkeys(name for m in chain for _, name in fmt.iter_shard_names(m)))
    referenced.update(names)

    def load(name: str) -> str | None:
        """``None`` when the shard is intact, else what is wrong with it."""
        if listing is not None and name not in listing:
            return "missing"
        try:
            shards.load([name])
        except RemoteNotFoundError:
            return "missing"
        except IntegrityError as exc:
            return str(exc)
        return None

    good = set()
    for name, problem in zip(names, conn.workers.map(load, names), strict=True):
        result.shards_checked += 1
        if problem == "missing":
            result.missing.append(name)
        elif problem is not None:
            result.corrupt.append(problem)
        else:
            good.add(name)
            referenced.update(fmt.pack_name(e.pack) for e in shards[name].values())
    head_entries = [
        item for _, name in fmt.iter_shard_names(head) if name in good for item in shards[name].items()
    ]
    packs = sorted(n for n in referenced if n.startswith(fmt.PREFIX + "pack/"))
    present = dict(zip(packs, conn.workers.map(exists, packs), strict=True))
    result.packs_checked = len(packs)
    result.missing.extend(n for n, ok in present.items() if not ok)
    if listing is not None:
        for key, e in head_entries:
            size = listing.get(fmt.pack_name(e.pack))
            if size is not None and e.offset + e.length > size:
                result.corrupt.append(f"{key!r}: its value lies past the end of {fmt.pack_name(e.pack)}")
    wanted = [(k, e) for k, e in head_entries if present.get(fmt.pack_name(e.pack))]
    wanted = _sample(wanted, sample, seed)
    result.values_checked = len(wanted)
    result.corrupt.extend(_verify_values(conn, wanted))
    if listing is not None:
        result.orphans = sorted(n for n in listing if n not in referenced and n != fmt.LOCK_NAME)
    return result


def _sample(wanted: list, sample: int | float | None, seed: int | None) -> list:
    if sample is None:
        return wanted
    if isinstance(sample, bool) or not isinstance(sample, (int, float)) or sample <= 0:
        raise ValueError(f"sample must be a positive count, a fraction in (0, 1], or None; not {sample!r}.")
    n = sample if isinstance(sample, int) else max(1, round(sample * len(wanted)))
    if isinstance(sample, float) and sample > 1:
        raise ValueError(f"A sample fraction must be at most 1, not {sample}.")
    if n >= len(wanted):
        return wanted
    return random.Random(seed).sample(wanted, n)


def _verify_values(conn: S3Connection, wanted: list[tuple[bytes, Entry]]) -> list[str]:
    """Fetch values range by range and describe every one that does not match its md5."""
    ranges = plan_ranges(wanted)

    def verify(rng: Any) -> list[str]:
        name = fmt.pack_name(rng.pack)
        try:
            data = conn.get_range(name, rng.start, rng.length)
        except (IntegrityError, RemoteNotFoundError) as exc:
            return [f"{name}: {exc}"]
        bad = []
        for key, e in rng.items:
            start = e.offset - rng.start
            if fmt.md5(data[start : start + e.length]) != e.md5:
                bad.append(f"{key!r}: the value in {name} does not match its md5")
        return bad

    return [problem for problems in conn.workers.map(verify, ranges) for problem in problems]
