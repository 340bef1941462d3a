"""Vacuum: shorten a database's history and delete what the kept commits do not reference.

``docs/history-and-vacuum.md`` explains what it guarantees.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

from .. import format as fmt
from .. import remote
from ..connection import S3Connection
from ..errors import IntegrityError, PreconditionFailed, RemoteNotFoundError, VacuumConflictError
from ..format import Entry
from ..lock import RemoteLock
from ..progress import Progress, ProgressArg
from ..remote import RemoteIndex, read_pack_footer
from ..replica import Replica
from . import versioning
from .history import db_head, iter_chain, writable_conn

DEFAULT_REWRITE_BELOW = 0.5
"""``vacuum`` rewrites a pack when its live bytes fall below this fraction of its size."""
DELETE_STEP = 1000
"""Objects ``vacuum`` deletes between two progress reports (one ``DeleteObjects`` request)."""


def _now_us() -> int:
    return int(time.time() * 1_000_000)


def _kind(name: str) -> str:
    """The kind of a ``.ebk/<kind>/...`` suffix: ``"commit"``, ``"index"``, ``"pack"``..."""
    return name[len(fmt.PREFIX) :].partition("/")[0]


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


def _live_values(index: RemoteIndex, kept: list[dict]) -> dict[bytes, dict[tuple[int, int], _Live]]:
    """The values the kept commits reference: ``pack -> (offset, length) -> _Live``."""
    live: dict[bytes, dict[tuple[int, int], _Live]] = {}
    for m in kept:
        for _, name in fmt.iter_shard_names(m):
            for key, e in index.shard(name).items():
                live.setdefault(e.pack, {}).setdefault((e.offset, e.length), _Live(key, e))
    return live


def vacuum(
    replica: Replica,
    keep: int | None = None,
    older_than: Any = None,
    rewrite_below: float = DEFAULT_REWRITE_BELOW,
    purge: bool | None = None,
    progress: ProgressArg = None,
) -> VacuumResult:
    """Shorten the history and delete what the kept commits do not reference.

    See :meth:`EBooklet.vacuum`.
    """
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise ValueError(f"keep must be an int >= 1 or None, not {keep!r}.")
    cutoff = _cutoff(older_than)
    if not isinstance(rewrite_below, (int, float)) or isinstance(rewrite_below, bool) or not 0 <= rewrite_below <= 1:
        raise ValueError(f"rewrite_below must be a fraction between 0 and 1, not {rewrite_below!r}.")
    conn = writable_conn(replica, "vacuum")
    with Progress(progress, None, "object", "vacuum") as counter, replica.holding_lock() as lock:
        return _vacuum(replica, conn, lock, keep, cutoff, rewrite_below, purge, counter)


def _vacuum(
    replica: Replica,
    conn: S3Connection,
    lock: RemoteLock,
    keep: int | None,
    cutoff: Any,
    rewrite_below: float,
    purge: bool | None,
    progress: Progress,
) -> VacuumResult:
    """:func:`vacuum` once its arguments are checked and the write lock is held;
    ``progress`` counts the packs rewritten, then the objects deleted."""
    head = db_head(replica)
    if head is None:
        raise RemoteNotFoundError(f"{conn!r} has nothing committed to vacuum.")
    listing = dict(conn.list(fmt.PREFIX))
    chain = list(iter_chain(conn, head, listing=listing))
    n_kept = _kept_prefix(chain, keep, cutoff)
    kept, removed = chain[:n_kept], chain[n_kept:]
    purge = n_kept == 1 if purge is None else purge
    result = VacuumResult(commits_removed=[m["seq"] for m in removed])

    # what the kept commits reference
    index = replica.remote
    index.load_shards(name for m in kept for _, name in fmt.iter_shard_names(m))
    live = _live_values(index, kept)
    missing = [p.hex() for p in live if fmt.pack_name(p) not in listing]
    if missing:
        raise IntegrityError(
            f"{len(missing)} pack(s) referenced by kept commits are missing ({missing[:3]}); "
            "vacuum stopped without deleting anything. Run ebooklet.check()."
        )

    rewrite = _packs_to_rewrite(conn, live, listing, rewrite_below, purge)
    if rewrite:
        lock.ensure()
        kept = _relayout(index, conn, kept, live, rewrite, result)
        live = _live_values(index, kept)
        progress.update(len(rewrite))

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
    _delete_owned(conn, doomed, listing, keep_names, result, progress)
    result.commits_kept = [m["seq"] for m in kept]
    _forget_deleted_uploads(replica, {n for n in doomed if n.startswith(fmt.PREFIX + "pack/")})
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
    index: RemoteIndex,
    conn: S3Connection,
    kept: list[dict],
    live: dict[bytes, dict[tuple[int, int], _Live]],
    rewrite: set[bytes],
    result: VacuumResult,
) -> list[dict]:
    """Copy the live values of ``rewrite`` into new packs and commit the new layout.

    Every kept commit whose index points into a rewritten pack (and every newer
    one, whose parent pointer changes) gets a new commit id and record; the
    head's is committed with the usual conditional manifest PUT. Returns the new
    kept manifests, newest first. Nothing is deleted here.

    Raises:
        VacuumConflictError: another writer committed meanwhile (nothing is deleted).
    """
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
        fetched = {(e.pack, e.offset): raw for _, e, raw in index.fetch_values(batch)}
        items = [(v.key, fetched[(v.entry.pack, v.entry.offset)], v.entry.md5, v.entry.timestamp) for v in batch]
        for v, (_, new) in zip(batch, index.upload_pack(items).located, strict=True):
            moved[(v.entry.pack, v.entry.offset)] = new
        result.bytes_written += size
        batch, size = [], 0

    for v in values:
        if size and size + v.entry.length > remote.PACK_SIZE:
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
            if name in renamed or any(e.pack in rewrite for e in index.shard(name).values())
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
                    for k, e in index.shard(name).items()
                }
                data = fmt.encode_shard(entries)
                conn.put(fmt.shard_name(commit_id, i), data)
                result.bytes_written += len(data)
                renamed[name] = commit_id
                index.keep_shard(fmt.shard_name(commit_id, i), data, entries)
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
            index.commit(new_head, index.etag)
        except PreconditionFailed:
            raise VacuumConflictError() from None
    return list(reversed(new_kept))


def _delete_owned(
    conn: S3Connection,
    doomed: list[str],
    listing: dict[str, int],
    keep_names: set[str],
    result: VacuumResult,
    progress: Progress,
) -> None:
    """Delete ``doomed`` objects (all versions in a versioned bucket): records, shards, packs;
    ``progress`` learns the total (adding them to what it counted already) and counts them.

    Commit records go first, so that a crash half-way leaves only unreferenced
    objects behind, never a listed commit whose objects are gone.
    """
    order = {"commit": 0, "index": 1, "pack": 2}
    doomed = sorted(doomed, key=lambda n: (order.get(_kind(n), 3), n))
    versions = versioning.versions(conn, fmt.PREFIX)
    items: list[tuple[str, str | None, int]]
    if versioning.is_versioned(versions):
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
        manifests = versioning.versions(conn, "", exact=True) or []
        items += [("", v.version_id, v.size) for v in manifests if not v.is_latest]
    else:
        items = [(name, None, listing[name]) for name in doomed]
    progress.set_total(progress.done + len(items))
    for start in range(0, len(items), DELETE_STEP):
        step = items[start : start + DELETE_STEP]
        conn.delete_objects((name, vid) for name, vid, _ in step)
        progress.update(len(step))
    kinds = Counter(_kind(name) for name in doomed)
    result.packs_removed += kinds["pack"]
    result.shards_removed += kinds["index"]
    result.records_removed += kinds["commit"]
    result.objects_removed = len(items)
    result.bytes_removed = sum(size for _, _, size in items)


def _forget_deleted_uploads(replica: Replica, deleted_packs: set[str]) -> None:
    """Drop journaled uploads (of a failed push) whose pack vacuum deleted."""
    log = replica.log
    stale = [m for m, up in log.uploads.items() if fmt.pack_name(up.pack) in deleted_packs]
    if stale:
        log.forget_uploads(stale)
