"""Deleting a remote database and copying one to another location."""

from __future__ import annotations

import hashlib
import uuid as uuid_mod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import format as fmt
from .. import remote
from ..connection import COPY_SINGLE_MAX, S3Connection
from ..errors import (
    IntegrityError,
    PreconditionFailed,
    ReadOnlyError,
    RemoteExistsError,
    RemoteNotFoundError,
)
from ..lock import RemoteLock
from ..progress import Progress, ProgressArg
from ..remote import MemoryMirror, RemoteIndex, read_pack_footer
from ..replica import Replica
from ..store import ObjectVersion
from . import versioning
from .history import db_head, writable_conn


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


def delete_remote(replica: Replica) -> DeleteResult:
    """Delete the remote database ``D``: the manifest and every ``D.ebk/`` object.

    Takes the write lock first. In a versioned bucket every version is deleted
    for good. Deletes the manifest first (so no reader sees a half-deleted
    database), then the rest, then the lock. The local files stay as a
    local-only database whose values are all local edits (see
    :meth:`EBooklet.delete_remote`): the database object goes on working offline
    from them, and a push with a connection recreates the remote.
    """
    conn = writable_conn(replica, "delete_remote")
    replica.ensure_lock()
    replica.refresh()  # the cached values kept are those of the newest commit
    replica.keep_values_local()
    manifests = versioning.versions(conn, "", exact=True)
    owned = versioning.versions(conn, fmt.PREFIX) if manifests is not None else None
    if manifests is None or owned is None:
        manifests = [ObjectVersion("", None, 0, True, False)]
        owned = [ObjectVersion(name, None, size, True, False) for name, size in conn.list(fmt.PREFIX)]
    result = DeleteResult()
    keys: set[str] = set()

    def remove(versions: list[ObjectVersion]) -> None:
        if versions:
            conn.delete_objects((v.suffix, versioning.version_id(v)) for v in versions)
            keys.update(v.suffix for v in versions)
            result.versions += len(versions)
            result.bytes += sum(v.size for v in versions)

    # older manifest versions first: until the current one goes, the database is intact
    remove([v for v in manifests if not v.is_latest])
    remove([v for v in manifests if v.is_latest])
    remove([v for v in owned if v.suffix != fmt.LOCK_NAME])
    replica.release_lock()
    if versioning.is_versioned(owned) or versioning.is_versioned(manifests):
        remove(versioning.versions(conn, fmt.LOCK_NAME, exact=True) or [])
    result.objects = len(keys)
    replica.detach()
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
    replica: Replica,
    target: S3Connection,
    overwrite: bool = False,
    server_side: bool | None = None,
    message: str | None = None,
    progress: ProgressArg = None,
) -> CopyResult:
    """Copy the database's newest commit (or its snapshot) to another location.

    See :meth:`EBooklet.copy_remote`.
    """
    with Progress(progress, None, "object", "copy_remote") as counter:
        return _copy_remote(replica, target, overwrite, server_side, message, counter)


def _copy_remote(
    replica: Replica,
    target: S3Connection,
    overwrite: bool,
    server_side: bool | None,
    message: str | None,
    progress: Progress,
) -> CopyResult:
    """:func:`copy_remote`, reporting objects copied (or found already there) to ``progress``."""
    head = db_head(replica)
    source = replica.conn
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
        names = [name for _, name in fmt.iter_shard_names(head)]
        packs = sorted({fmt.pack_name(e.pack) for _, e in replica.remote.iter_entries(head)})
        result = CopyResult("", 0, server_side)
        sizes = dict(source.list(fmt.PREFIX)) if source.writable else None
        existing = dict(target.list(fmt.PREFIX))
        todo = _split_todo([*names, *packs], sizes, existing, result)
        progress.set_total(len(todo))
        if server_side:
            assert sizes is not None  # same_store() implies a writable source
            _copy_server_side(source, target, todo, sizes, result, progress)
        else:
            _copy_streamed(source, target, todo, existing, result, progress)
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
    progress: Progress,
) -> None:
    """Copy inside the store (``CopyObject``), then check every copy's size."""
    large = [n for n in todo if sizes[n] > COPY_SINGLE_MAX]
    small = [n for n in todo if sizes[n] <= COPY_SINGLE_MAX]

    def copy(name: str) -> None:
        target.copy_object(source, name, sizes[name])
        progress.update(1)

    list(target.workers.map(copy, small))
    for name in large:  # multipart copies run their parts on the pool themselves
        copy(name)
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
    progress: Progress,
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
                progress.update(1)
                return 0, 0  # copied before (a pack's name fixes its content)
            if size > remote.PART_SIZE:
                large.append((name, items, tail, size))
                return 0, 0
            data = tail if size == len(tail) else source.get_range(name, 0, size)
            verifier = _PackVerifier(name, items, tail, size)
            verifier.feed(0, data)
            verifier.finish()
        target.put(name, data)
        progress.update(1)
        return 1, len(data)

    done = list(source.workers.map(small_copy, todo))
    result.objects_copied += sum(n for n, _ in done)
    result.bytes_copied += sum(b for _, b in done)
    result.objects_skipped += len(todo) - sum(n for n, _ in done) - len(large)
    for name, items, tail, size in sorted(large):
        target.put_multipart(name, _verified_parts(source, name, items, tail, size))
        result.objects_copied += 1
        result.bytes_copied += size
        progress.update(1)


def _verified_parts(
    source: S3Connection, name: str, items: list[fmt.PackItem], tail: bytes, size: int
) -> Iterator[bytes]:
    """A large pack in parts of :data:`PART_SIZE`, each verified before it is handed on."""
    verifier = _PackVerifier(name, items, tail, size)
    for start in range(0, size, remote.PART_SIZE):
        chunk = source.get_range(name, start, min(remote.PART_SIZE, size - start))
        verifier.feed(start, chunk)
        if start + len(chunk) == size:
            verifier.finish()  # before the last part goes: a bad value aborts the upload
        yield chunk
