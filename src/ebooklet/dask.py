"""Dask: read a remote database into a ``dask.bag``, write a bag as one commit, map one
database into another (the ``dask`` extra: ``pip install "ebooklet-s3[dask]"``).

No local booklet file is involved and no value passes through the client. The client
reads the manifest (and, when writing, merges index entries and commits); the workers
read index shards and values with coalesced range GETs, or serialize values and upload
packs, straight from and to the bucket.

Credentials never travel in a task: workers get a :class:`~ebooklet.connection.ConnectionSpec`
(where the database is, no secret) and resolve credentials from their own environment
or AWS profile, or read anonymously through a public URL. docs/dask.md shows how.
"""

from __future__ import annotations

import functools
import pickle
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import dask
import dask.bag

from . import format as fmt
from . import remote as remote_module
from . import serializers
from .changes import MAX_COMMIT_ATTEMPTS, PushResult
from .codec import NEW_KEY_SERIALIZER, NEW_VALUE_SERIALIZER, Codec
from .connection import ConnectionSpec, S3Connection
from .errors import (
    AuthError,
    CommitRetryError,
    ConflictError,
    IntegrityError,
    PreconditionFailed,
    ReadOnlyError,
    RemoteNotFoundError,
    SerializationError,
)
from .format import Entry
from .local import Edit, State, three_way
from .lock import RemoteLock
from .remote import MemoryMirror, RemoteIndex

__all__ = ["BagWriteResult", "map_bag", "read_bag", "write_bag"]

PARTITION_BYTES = 64 << 20
"""Value bytes a partition of :func:`read_bag` holds about, when ``npartitions`` is not given."""
SEGMENT_BYTES = 8 << 20
"""A pack is read by partitions in segments of this many bytes: each segment's values go
to one partition (neighbouring segments to neighbouring partitions), which reads them
with one coalesced range GET or a few. A pack of small values (about 4 MiB) is mostly
one segment: one GET (1 MiB segments made four, each costing as much as the whole pack
on servers that copy the object for a range, as moto does)."""
MAX_PARTITIONS = 1 << 16
"""The most partitions :func:`read_bag` makes when ``npartitions`` is not given: their
number follows the byte count the manifest claims, which a hostile bucket may inflate
(a partition of a larger database then holds more than :data:`PARTITION_BYTES`)."""
N_BUCKETS = 12007
"""The ``n_buckets`` a database created by :func:`write_bag` records (booklet's default)."""
LOOKUP_RECORD_BYTES = 128
"""What reading a record of an index shard costs, counted in bytes of values. A partition
of :func:`write_bag` looks up its keys in the base's index (to upload only the values
that changed) when the records it would read cost less than its values (estimated at
the base's mean value size); else it uploads every value: with values of a few dozen
bytes, reading the index costs more than what it spares."""
MODES = ("c", "w", "n")
"""The modes of :func:`write_bag`: create or merge, merge into an existing one, replace."""


@dataclass
class BagWriteResult(PushResult):
    """What :func:`write_bag` did: a :class:`~ebooklet.PushResult` (``keys_pushed``,
    ``bytes_uploaded``, ``requests`` of the client and the workers together, ``commit_id``,
    ``seq``) plus the number of ``partitions`` written, of ``packs`` and ``values_uploaded``
    they uploaded, and of ``keys_unchanged``: pairs whose value the database's head held
    already for their key, neither uploaded nor (but with mode ``'n'``) re-indexed."""

    partitions: int = 0
    packs: int = 0
    values_uploaded: int = 0
    keys_unchanged: int = 0


class _Coding(NamedTuple):
    """The serializers of a database as a task carries them: booklet names, or classes
    (custom ones), resolved again on the worker (which refuses one it cannot run)."""

    key: Any
    key_name: str | None
    value: Any
    value_name: str | None
    where: str

    @classmethod
    def of(cls, codec: Codec, where: str) -> _Coding:
        def arg(klass: Any, name: str | None) -> Any:
            return name if name is not None else klass

        return cls(
            arg(codec.key_serializer, codec.key_serializer_name), codec.key_serializer_name,
            arg(codec.value_serializer, codec.value_serializer_name), codec.value_serializer_name,
            where,
        )

    def codec(self) -> Codec:
        ks, _ = serializers.resolve(self.key, "key_serializer")
        vs, _ = serializers.resolve(self.value, "value_serializer")
        return Codec(ks, self.key_name, vs, self.value_name, self.where, self.where)


class _Written(NamedTuple):
    """What a partition of :func:`write_bag` sends back: index entries, never values
    (``entries``: a list of ``(key, Entry)`` in one :func:`_packed` blob), and the keys
    whose value the base holds already (``unchanged``: a blob of a list of keys, whose
    entries are among ``entries`` when the write replaces the database; ``kept`` of them).
    ``requests`` are those of another process's connection (none on the caller's
    connection, whose own count the client reads)."""

    entries: bytes
    unchanged: bytes
    kept: int
    packs: list[bytes]
    values: int
    value_bytes: int
    requests: Counter


# ---------------------------------------------------------------- the client side


def _handle_of(remote: Any, writing: bool) -> tuple[_Handle, S3Connection]:
    """The handle that tasks carry and the client's connection, from what the caller gave.

    Raises:
        TypeError: ``remote`` is none of an S3Connection, a ConnectionSpec or a URL.
        ReadOnlyError: ``writing`` to a public URL or another read-only remote.
    """
    if isinstance(remote, S3Connection):
        spec, conn = remote.spec(), remote
    elif isinstance(remote, ConnectionSpec):
        spec, conn = remote, remote.connect()
    elif isinstance(remote, str):
        spec = ConnectionSpec(db_url=remote)
        conn = spec.connect()
    else:
        raise TypeError(
            "remote must be an S3Connection, an ebooklet.connection.ConnectionSpec or a public "
            f"URL string, not {type(remote).__name__}."
        )
    if writing and not spec.writable:
        raise ReadOnlyError(
            f"{conn!r} is read-only (a public URL): writing needs an S3Connection with "
            "bucket and db_key, whose credentials the workers find in their environment."
        )
    return _Handle.of(spec, conn), conn


def _head(conn: S3Connection) -> tuple[dict | None, str | None]:
    """The database's head manifest and its ETag (``None``: no database)."""
    return RemoteIndex(conn, MemoryMirror()).fetch_manifest()


def _existing_head(conn: S3Connection) -> dict:
    """The head manifest of the database to read.

    Raises:
        RemoteNotFoundError: there is no database at ``conn``.
    """
    head, _ = _head(conn)
    if head is None:
        raise RemoteNotFoundError(f"There is no database at {conn!r} (or it is not public).")
    return head


def _same_database(a: S3Connection, b: S3Connection) -> bool:
    """Whether two connections reach the same database (its public URL, or its place)."""
    if a.writable and b.writable:
        return (a.endpoint_url, a.bucket, a.db_key) == (b.endpoint_url, b.bucket, b.db_key)
    return a.db_url == b.db_url


def _reading_codec(
    head: dict, conn: S3Connection, key_serializer: Any, value_serializer: Any, trust: Any
) -> Codec:
    """The codec of an existing database: the serializers its manifest names, as far as
    :func:`serializers.choose` allows (pickle and the like only when passed or trusted)."""
    trusted = serializers.trusted_names(trust)
    where = repr(conn)
    ks, ks_name = serializers.choose(
        "key_serializer", head["key_serializer"], key_serializer, trusted, where
    )
    vs, vs_name = serializers.choose(
        "value_serializer", head["value_serializer"], value_serializer, trusted, where
    )
    return Codec(ks, ks_name, vs, vs_name, conn.db_url, conn.db_url)


def _new_codec(conn: S3Connection, key_serializer: Any, value_serializer: Any) -> Codec:
    """The codec of a database being created or replaced: the caller's serializers, else
    those of a new database."""
    if key_serializer is serializers.UNSET:
        key_serializer = NEW_KEY_SERIALIZER
    if value_serializer is serializers.UNSET:
        value_serializer = NEW_VALUE_SERIALIZER
    ks, ks_name = serializers.resolve(key_serializer, "key_serializer")
    vs, vs_name = serializers.resolve(value_serializer, "value_serializer")
    return Codec(ks, ks_name, vs, vs_name, conn.db_url, conn.db_url)


def _check_count(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, not {value!r}.")


def read_bag(
    remote: S3Connection | ConnectionSpec | str,
    keys: Iterable[Any] | None = None,
    prefix: Any = None,
    *,
    npartitions: int | None = None,
    key_serializer: Any = serializers.UNSET,
    value_serializer: Any = serializers.UNSET,
    trust_serializers: bool | str | Collection[str] = False,
) -> dask.bag.Bag:
    """The ``(key, value)`` pairs of a remote database's head as a ``dask.bag.Bag``.

    The client reads the manifest only. Index tasks (one per group of index shards) read
    the shards and hand each partition the entries of its pack segments
    (:data:`SEGMENT_BYTES`); each partition reads its values with coalesced range GETs,
    checks their md5s and decodes them. Workers reach the bucket through
    ``remote``'s :class:`~ebooklet.connection.ConnectionSpec`: with credentials of their
    own (environment, profile, role), or anonymously by public URL.

    Args:
        remote: an :class:`~ebooklet.S3Connection`, a ``ConnectionSpec`` or a public URL.
        keys: only these keys (those absent are left out); ``None``: every key.
        prefix: only keys starting with it (``str`` keys: a ``str``; bytes keys: bytes).
        npartitions: how many partitions (default: one per :data:`PARTITION_BYTES` of
            values, at most :data:`MAX_PARTITIONS`).
        key_serializer: as :func:`ebooklet.open` takes it (the database's own, by default).
        value_serializer: as :func:`ebooklet.open` takes it: a manifest naming ``pickle``
            or a ``*zstd`` serializer is followed only when the caller passes or trusts it.
        trust_serializers: as :func:`ebooklet.open` takes it.

    Raises:
        TypeError, ValueError: bad arguments (``keys`` and ``prefix`` together...).
        SerializationError: a key of ``keys`` that the key serializer refuses, or a
            serializer passed that differs from the database's.
        UntrustedSerializerError: the database's serializer may run code and was not allowed.
        RemoteNotFoundError: there is no database at ``remote``.
    """
    _check_read_args(keys, prefix, npartitions)
    handle, conn = _handle_of(remote, writing=False)
    head = _existing_head(conn)
    codec = _reading_codec(head, conn, key_serializer, value_serializer, trust_serializers)
    return _bag_of(handle, conn, head, codec, keys, prefix, npartitions)


def _check_read_args(keys: Any, prefix: Any, npartitions: Any) -> None:
    """Refuse arguments of :func:`read_bag` that cannot work, before any request.

    Raises:
        TypeError, ValueError: what is wrong, and what to give instead.
    """
    _check_count("npartitions", npartitions)
    if keys is not None and prefix is not None:
        raise ValueError("Give keys or prefix, not both: filter the keys yourself.")
    if isinstance(keys, (str, bytes)):
        raise TypeError(
            f"keys must be a collection of keys, not one {type(keys).__name__} key: "
            "pass [key]."
        )


def _bag_of(
    handle: _Handle,
    conn: S3Connection,
    head: dict,
    codec: Codec,
    keys: Iterable[Any] | None,
    prefix: Any,
    npartitions: int | None,
) -> dask.bag.Bag:
    """The bag of :func:`read_bag` for the database's commit ``head``."""
    shards = dict(fmt.iter_shard_names(head))
    wanted: dict[int, list[bytes]] | None = None
    share = 1.0
    if keys is not None:
        wanted = {}
        for kb in {codec.encode_key(k) for k in keys}:
            wanted.setdefault(fmt.shard_of(kb, head["n_shards"]), []).append(kb)
        shards = {i: name for i, name in shards.items() if i in wanted}
        share = sum(map(len, wanted.values())) / max(1, head["n_keys"])
    prefix_bytes = None if prefix is None else codec.encode_prefix(prefix)
    n = npartitions or _default_partitions(head["n_bytes"] * share)
    numbers = sorted(shards)
    per_task = max(1, -(-len(numbers) // n))  # at most n index tasks
    index_tasks = [
        dask.delayed(_index_part)(
            handle,
            [(i, shards[i]) for i in group],
            head["n_shards"],
            None if wanted is None else [kb for i in group for kb in wanted[i]],
            prefix_bytes,
            n,
        )
        for group in (numbers[at : at + per_task] for at in range(0, len(numbers), per_task))
    ]
    coding = _Coding.of(codec, conn.db_url)
    reads = [
        dask.delayed(_read_part)(handle, coding, [task[g] for task in index_tasks])
        for g in range(n)
    ]
    return dask.bag.from_delayed(reads)


def _default_partitions(value_bytes: float) -> int:
    """How many partitions hold ``value_bytes`` (a count the manifest claims): one per
    :data:`PARTITION_BYTES`, at most :data:`MAX_PARTITIONS`."""
    return min(max(1, -(-int(value_bytes) // PARTITION_BYTES)), MAX_PARTITIONS)


def write_bag(
    bag: dask.bag.Bag,
    remote: S3Connection | ConnectionSpec,
    mode: str = "c",
    *,
    message: str | None = None,
    force: bool = False,
    key_serializer: Any = serializers.UNSET,
    value_serializer: Any = serializers.UNSET,
    trust_serializers: bool | str | Collection[str] = False,
    lock_timeout: float = 60.0,
) -> BagWriteResult:
    """Write a bag of ``(key, value)`` pairs to a remote database as one commit.

    Each partition serializes its values and uploads them as packs from its worker, and
    sends back only index entries; then the client, holding the remote write lock,
    merges the entries into index shards and commits once with the conditional manifest
    PUT, as :meth:`ebooklet.Changes.push` does. A value that the head read at the start
    holds for its key is not uploaded, and the key is no change (partitions look their
    keys up in that head's index when it costs less than uploading the values, see
    :data:`LOOKUP_RECORD_BYTES`); if nothing changed, nothing is committed (unless
    ``mode='n'``). A key given several times keeps its last value (of the last partition
    holding it, the last pair within a partition). If a partition fails (or is cancelled), nothing is committed; the packs already uploaded
    are orphans that :func:`ebooklet.check` lists and ``vacuum()`` deletes. It returns
    (or raises) once every partition has finished.

    Args:
        bag: the pairs; keys of the type the key serializer takes.
        remote: a writable :class:`~ebooklet.S3Connection` or ``ConnectionSpec``.
        mode: ``'c'`` create the database or merge into it, ``'w'`` merge into an existing
            one, ``'n'`` replace it whole (its history stays until vacuum).
        message: recorded in the commit.
        force: on conflict keep this write's values instead of raising.
        key_serializer: that of a database created or replaced (default ``'str'``); an
            existing database's own is used, and one passed must be the same.
        value_serializer: likewise (default: bytes values).
        trust_serializers: as :func:`ebooklet.open` (an existing database naming pickle).
        lock_timeout: seconds to wait for another writer's lock before committing.

    When another writer committed between the start of the write and its commit, a key
    both changed is a conflict (the three-way rule of push, the head at the start being
    the base); keys only one side changed merge: no update is lost.

    Raises:
        ConflictError: keys changed meanwhile by another writer (nothing is committed).
        RemoteNotFoundError: mode ``'w'`` and no database.
        ReadOnlyError: a public URL.
        SerializationError: a partition holds something other than pairs, or a key or
            value its serializer refuses (raised from the worker).
        LockedError: another writer held the lock for ``lock_timeout`` seconds.
        TypeError, ValueError: bad arguments.
    """
    if not isinstance(bag, dask.bag.Bag):
        raise TypeError(
            f"write_bag takes a dask.bag.Bag of (key, value) pairs, not {type(bag).__name__}."
        )
    _check_write_args(mode, message, trust_serializers, lock_timeout)
    handle, conn = _handle_of(remote, writing=True)
    before = Counter(conn.request_counts)
    base, _ = _head(conn)
    return _write(bag, handle, conn, before, base, mode, message, force, key_serializer,
                  value_serializer, trust_serializers, lock_timeout)


def _check_write_args(mode: Any, message: Any, trust: Any, lock_timeout: Any) -> None:
    """Refuse arguments of :func:`write_bag` that cannot work, before any request.

    Raises:
        TypeError, ValueError: what is wrong, and what to give instead.
    """
    if mode not in MODES:
        raise ValueError(
            f"mode must be 'c' (create or merge), 'w' (merge into an existing database) or "
            f"'n' (replace it), not {mode!r}."
        )
    if message is not None and not isinstance(message, str):
        raise TypeError(f"message must be a str or None, not {type(message).__name__}.")
    number = isinstance(lock_timeout, (int, float)) and not isinstance(lock_timeout, bool)
    if not number or not lock_timeout >= 0:
        raise ValueError(f"lock_timeout must be a number of seconds >= 0, not {lock_timeout!r}.")
    serializers.trusted_names(trust)


def _write(
    bag: dask.bag.Bag,
    handle: _Handle,
    conn: S3Connection,
    before: Counter,
    base: dict | None,
    mode: str,
    message: str | None,
    force: bool,
    key_serializer: Any,
    value_serializer: Any,
    trust: Any,
    lock_timeout: float,
) -> BagWriteResult:
    """:func:`write_bag` once its arguments are checked; ``base`` is the head the pairs
    of ``bag`` are based on (``None``: no database), ``before`` the request counts of
    ``conn`` before it was read."""
    if base is None and mode == "w":
        raise RemoteNotFoundError(f"There is no database at {conn!r} to merge into; use mode 'c'.")
    replace = mode == "n"
    if replace or base is None:
        codec = _new_codec(conn, key_serializer, value_serializer)
    else:
        codec = _reading_codec(base, conn, key_serializer, value_serializer, trust)
    coding = _Coding.of(codec, conn.db_url)
    # one copy of the base manifest in the graph, which every partition reads
    shared_base = None if base is None else dask.delayed(base, traverse=False)
    tasks = [
        dask.delayed(_write_part)(handle, coding, shared_base, replace, part)
        for part in bag.to_delayed()
    ]
    written = _compute(tasks)
    entries, result = _merged(written)
    if entries or replace:  # else nothing changed: no commit, as push() makes none
        lock = RemoteLock(conn, uuid.uuid4().hex, "write_bag")
        lock.acquire(lock_timeout)
        try:
            index = RemoteIndex(conn, MemoryMirror())
            _check_packs(index, {e.pack for e in entries.values()})
            _commit(index, entries, base, replace, force, codec, message, result)
        finally:
            lock.release()
    result.requests.update(Counter(conn.request_counts) - before)
    return result


def _merged(written: list[_Written]) -> tuple[dict[bytes, Entry], BagWriteResult]:
    """The entries of the partitions' keys to commit (a key given by several partitions
    keeps its state in the last: a new value, or the base's) and the partitions' counts."""
    entries: dict[bytes, Entry] = {}
    result = BagWriteResult(partitions=len(written))
    for part in written:
        entries.update(pickle.loads(part.entries))
        for kb in pickle.loads(part.unchanged):
            entries.pop(kb, None)
        result.packs += len(part.packs)
        result.values_uploaded += part.values
        result.keys_unchanged += part.kept
        result.bytes_uploaded += part.value_bytes
        result.requests.update(part.requests)
    return entries, result


def _compute(tasks: list[Any]) -> list[_Written]:
    """Run the partitions' tasks on the scheduler dask would use; the first failure is
    raised once every task has finished, on a distributed cluster (so that no upload of
    a failed write lands after it returns); the local schedulers stop at the first one.
    """
    scheduler = dask.base.get_scheduler()
    client = getattr(scheduler, "__self__", None)
    try:
        from distributed import Client, wait
    except ImportError:  # pragma: no cover - the dask extra installs distributed
        Client = None
    if Client is None or not isinstance(client, Client):
        return list(dask.compute(*tasks, scheduler=scheduler))
    futures = client.compute(tasks)
    wait(futures)
    return client.gather(futures)


def _check_packs(index: RemoteIndex, packs: set[bytes]) -> None:
    """Refuse to commit when a pack of this write's entries is gone: one it uploaded, or
    (replacing the database) one of the base holding unchanged values (a vacuum ran
    meanwhile: it deletes what the commits it keeps do not reference). Called holding the
    write lock, which keeps vacuum away until the commit.

    Raises:
        IntegrityError: some packs are missing (nothing is committed).
    """
    missing = packs - index.existing_packs(packs)
    if missing:
        raise IntegrityError(
            f"{len(missing)} pack(s) of the values of this write are gone (a vacuum ran "
            "meanwhile?); nothing was committed. Run write_bag again."
        )


def _commit(
    index: RemoteIndex,
    entries: dict[bytes, Entry],
    base: dict | None,
    replace: bool,
    force: bool,
    codec: Codec,
    message: str | None,
    result: BagWriteResult,
) -> None:
    """Merge ``entries`` into the head's index and commit, retrying on top of a commit
    that won the race (as push does); ``base`` is the head the write started from.

    Raises:
        ConflictError: keys changed by another writer since ``base`` (and not ``force``).
        CommitRetryError: every try lost its commit.
    """
    for _ in range(MAX_COMMIT_ATTEMPTS):
        head, etag = index.fetch_manifest()
        index.adopt(head, etag)
        if not replace:
            _check_serializers(head, codec)
        changes = entries if replace else _plan(index, entries, base, head, force, codec)
        if not changes and not replace:
            return
        commit_id = fmt.new_commit_id()
        index_head = None if replace else head
        written = index.write_shards(commit_id, index_head, changes)
        content = {
            "uuid": head["uuid"] if head is not None and not replace else uuid.uuid4().hex,
            "key_serializer": codec.key_serializer_name,
            "value_serializer": codec.value_serializer_name,
            "n_buckets": (index_head or {}).get("n_buckets", N_BUCKETS),
            "n_shards": written.n_shards,
            "shards": written.shards,
            "n_keys": written.n_keys,
            "n_bytes": written.n_bytes,
            "metadata": (index_head or {}).get("metadata"),
            "message": message,
            "changed_keys": len(changes),
        }
        manifest = fmt.build_manifest(content, head, commit_id=commit_id)
        try:
            index.commit(manifest, etag)
        except PreconditionFailed:
            time.sleep(0.05)
            continue
        result.keys_pushed = len(changes)
        result.commit_id, result.seq = commit_id, manifest["seq"]
        return
    raise CommitRetryError(MAX_COMMIT_ATTEMPTS)


def _check_serializers(head: dict | None, codec: Codec) -> None:
    """Refuse to merge into a head whose serializers are not those the values were
    encoded with (another writer created or replaced the database meanwhile).

    Raises:
        ConflictError: they differ (nothing is committed).
    """
    mine = (codec.key_serializer_name, codec.value_serializer_name)
    if head is not None and (head["key_serializer"], head["value_serializer"]) != mine:
        raise ConflictError(
            [],
            f"Another writer created or replaced the database meanwhile with serializers "
            f"{head['key_serializer']!r}/{head['value_serializer']!r}, not {mine[0]!r}/{mine[1]!r} "
            "as this write encoded its values; nothing was committed. Run it again.",
        )


def _plan(
    index: RemoteIndex,
    entries: dict[bytes, Entry],
    base: dict | None,
    head: dict | None,
    force: bool,
    codec: Codec,
) -> dict[bytes, Entry]:
    """The entries to commit on top of ``head``: each key judged by the three-way rule,
    the version in ``base`` being the one this write replaces. Keys whose value the head
    already holds are left as they are.

    Raises:
        ConflictError: keys changed since ``base`` to other values (and not ``force``).
    """
    now = index.entries(entries, manifest=head) if head is not None else dict.fromkeys(entries)
    same = head is not None and base is not None and head["commit_id"] == base["commit_id"]
    if same:
        then = now
    elif base is not None:
        then = index.entries(entries, manifest=base)
    else:
        then = dict.fromkeys(entries)
    changes, conflicts = {}, []
    for kb, entry in entries.items():
        old = then[kb]
        state = three_way(Edit(entry.md5, old.md5 if old else None), now[kb], None, False)
        if state is State.CONFLICT and not force:
            conflicts.append(kb)
        elif state is not State.SETTLED:
            changes[kb] = entry
    if conflicts:
        raise ConflictError(
            [codec.decode_key(kb) for kb in conflicts],
            f"{len(conflicts)} key(s) were changed by another writer while write_bag ran "
            f"(e.g. {codec.decode_key(conflicts[0])!r}); nothing was committed. Run it again "
            "from the new head, or pass force=True to keep this write's values.",
        )
    return changes


def map_bag(
    func: Callable[[Any, Any], Any],
    remote: S3Connection | ConnectionSpec | str,
    target: S3Connection | ConnectionSpec,
    keys: Iterable[Any] | None = None,
    prefix: Any = None,
    mode: str = "c",
    *,
    npartitions: int | None = None,
    message: str | None = None,
    force: bool = False,
    key_serializer: Any = serializers.UNSET,
    value_serializer: Any = serializers.UNSET,
    trust_serializers: bool | str | Collection[str] = False,
    lock_timeout: float = 60.0,
) -> BagWriteResult:
    """Read ``remote`` (its ``keys``, or those under ``prefix``), apply
    ``func(key, value) -> new value`` on the cluster and write the results to ``target``
    as one commit: :func:`read_bag`, then :func:`write_bag`.

    ``target`` may be ``remote`` itself (a new commit of the same database, based on the
    head that was read: a key another writer changed meanwhile is a conflict). A new or
    replaced target takes ``key_serializer``/``value_serializer``, by default the
    source's; an existing one keeps its own. ``trust_serializers`` applies to both.

    Raises:
        what :func:`read_bag` and :func:`write_bag` raise, and ``func``'s errors.
    """
    if not callable(func):
        raise TypeError(f"func must be a callable(key, value) -> value, not {type(func).__name__}.")
    _check_read_args(keys, prefix, npartitions)
    _check_write_args(mode, message, trust_serializers, lock_timeout)
    source, source_conn = _handle_of(remote, writing=False)
    handle, conn = _handle_of(target, writing=True)
    head = _existing_head(source_conn)
    codec = _reading_codec(head, source_conn, serializers.UNSET, serializers.UNSET,
                           trust_serializers)
    bag = _bag_of(source, source_conn, head, codec, keys, prefix, npartitions)
    # the new values derive from ``head``: when it is the target's, it is their base
    before = Counter(conn.request_counts)
    base = head if _same_database(source_conn, conn) else _head(conn)[0]
    if mode == "n" or base is None:  # a new target: the source's serializers by default
        if key_serializer is serializers.UNSET:
            key_serializer = head["key_serializer"]
        if value_serializer is serializers.UNSET:
            value_serializer = head["value_serializer"]
    return _write(bag.map(_apply, func), handle, conn, before, base, mode, message, force,
                  key_serializer, value_serializer, trust_serializers, lock_timeout)


def _apply(pair: tuple[Any, Any], func: Callable[[Any, Any], Any]) -> tuple[Any, Any]:
    key, value = pair
    return key, func(key, value)


# ---------------------------------------------------------------- the workers' side


_CALLERS_HANDLES: weakref.WeakValueDictionary[str, _Handle] = weakref.WeakValueDictionary()
"""The handles made in the caller's process, by token, for as long as a graph holds them:
a handle unpickled there (a cluster of threads) finds the caller's connection again."""


class _Handle:
    """How a task reaches the bucket: a :class:`ConnectionSpec` and a token naming the
    caller's handle in the caller's process.

    In that process (the local schedulers, which do not pickle tasks, or a cluster of
    threads, which does) a task uses the very connection the caller passed, credentials
    included, held by the graph as long as it lives. A pickled handle carries the spec
    and the token only (a random id, no secret), so in another process the task uses a
    connection made from the spec, which finds credentials of its own.
    """

    __slots__ = ("__weakref__", "_conn", "spec", "token")

    def __init__(self, spec: ConnectionSpec, token: str, conn: S3Connection | None = None):
        self.spec = spec
        self.token = token
        if conn is None:
            original = _CALLERS_HANDLES.get(token)
            conn = original._conn if original is not None else None
        self._conn = conn

    @classmethod
    def of(cls, spec: ConnectionSpec, conn: S3Connection) -> _Handle:
        """A new handle of the caller's ``conn`` (whose spec is ``spec``)."""
        handle = cls(spec, uuid.uuid4().hex, conn)
        _CALLERS_HANDLES[handle.token] = handle
        return handle

    def __reduce__(self) -> tuple[type, tuple[ConnectionSpec, str]]:
        return _Handle, (self.spec, self.token)

    def __dask_tokenize__(self) -> tuple[ConnectionSpec, str]:
        return self.spec, self.token

    def __repr__(self) -> str:
        return f"<ebooklet.dask handle of {self.spec!r}>"

    @property
    def callers(self) -> bool:
        """True when tasks use the caller's own connection (this is the caller's process)."""
        return self._conn is not None

    def connection(self) -> S3Connection:
        """The caller's connection in the caller's process, else this process's
        connection for the spec (see :func:`_connect`)."""
        return self._conn if self._conn is not None else _connect(self.spec)


@functools.lru_cache(maxsize=16)
def _connect(spec: ConnectionSpec) -> S3Connection:
    """A worker process's connection for ``spec``, made once (its pool, threads and
    credentials serve every task of the process)."""
    return spec.connect()


@contextmanager
def _on_worker(handle: _Handle) -> Iterator[S3Connection]:
    """The connection of a task; a worker without credentials says where they come from."""
    try:
        yield handle.connection()
    except AuthError as exc:
        if handle.callers:
            raise
        raise AuthError(
            f"{exc} (in a process other than the caller's: a Dask worker, or a process of "
            "Dask's multiprocessing scheduler, a bag's default without a distributed Client. "
            "Such a process resolves credentials of its own, never the caller's: set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE in its environment, pass "
            "profile= to the S3Connection, or read by public URL; without a cluster, "
            "compute(scheduler='threads') uses the caller's connection)"
        ) from None


def _index_part(
    handle: _Handle,
    placed: list[tuple[int, str]],
    n_shards: int,
    wanted: list[bytes] | None,
    prefix: bytes | None,
    n: int,
) -> list[bytes]:
    """Read the index shards ``placed`` (``(number, name)`` of ``n_shards``); their
    entries (of the ``wanted`` keys, or those starting with ``prefix``) for each of the
    ``n`` partitions, by pack segment (each list of ``(key, Entry)`` as one
    :func:`_packed` blob).

    Raises:
        IntegrityError: a shard lists a key of another (:func:`format.check_placement`).
    """
    with _on_worker(handle) as conn:
        index = RemoteIndex(conn, MemoryMirror())
        index.load_shards(name for _, name in placed)
        parts: list[list[tuple[bytes, Entry]]] = [[] for _ in range(n)]
        for number, name in placed:
            shard = index.shard(name)
            if wanted is None:
                fmt.check_placement(shard, number, n_shards, name)
                items: Iterable[tuple[bytes, Entry]] = shard.items()
            else:
                items = [(kb, shard[kb]) for kb in wanted if kb in shard]
            for kb, entry in items:
                if prefix is None or kb.startswith(prefix):
                    parts[_partition_of(entry, n)].append((kb, entry))
        return [_packed(part) for part in parts]


def _partition_of(entry: Entry, n: int) -> int:
    """The partition reading ``entry``: by its pack (ids are random) and segment."""
    return (int.from_bytes(entry.pack[:8], "little") + entry.offset // SEGMENT_BYTES) % n


def _packed(entries: list[tuple[bytes, Entry]]) -> bytes:
    """Index entries as one blob between tasks: Dask's distributed scheduler moves a list
    of 100,000 small tuples in seconds (it walks it), one bytes object in milliseconds.
    Only ebooklet's tasks make and read these blobs."""
    return pickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL)


def _read_part(handle: _Handle, coding: _Coding, parts: list[bytes]) -> list[tuple[Any, Any]]:
    """Fetch, verify and decode the values of one partition: coalesced range GETs."""
    codec = coding.codec()
    with _on_worker(handle) as conn:
        index = RemoteIndex(conn, MemoryMirror())
        wanted = [item for part in parts for item in pickle.loads(part)]
        return [
            (codec.decode_key(kb), codec.decode_value(bytes(raw)))
            for kb, _, raw in index.fetch_values(wanted)
        ]


def _write_part(
    handle: _Handle, coding: _Coding, base: dict | None, replace: bool, items: Iterable[Any]
) -> _Written:
    """Serialize one partition's pairs and upload the new values as packs; their index
    entries.

    A value whose md5 is that of its key's entry in ``base`` (the head the write started
    from) is not uploaded: its key is sent back as unchanged (with its entry in ``base``
    when the write ``replace``-s the database). A value equal to one already uploaded by
    the partition is not uploaded again; a key given twice keeps its last value.
    """
    codec = coding.codec()
    with _on_worker(handle) as conn:
        before = Counter(conn.request_counts)
        pairs = _keyed(codec, items)
        old: dict[bytes, Entry] = {}
        if base is not None:
            pairs = list(pairs)
            old = _base_entries(conn, base, {kb for kb, _, _ in pairs})
        timestamp = int(time.time() * 1_000_000)
        state: dict[bytes, bytes | Entry] = {}  # key -> md5 of its new value, or base entry
        seen: set[bytes] = set()
        sizes = [0]

        def values() -> Iterator[tuple[bytes, bytes, bytes, int]]:
            for kb, key, value in pairs:
                raw = codec.encode_value(value)
                fmt.check_sizes(key, kb, raw)
                m = fmt.md5(raw)
                entry = old.get(kb)
                if entry is not None and entry.md5 == m:
                    state[kb] = entry
                    continue
                state[kb] = m
                if m not in seen:
                    seen.add(m)
                    sizes[0] += len(raw)
                    yield kb, raw, m, timestamp

        located: dict[bytes, Entry] = {}
        packs = []
        for upload in RemoteIndex(conn, MemoryMirror()).upload_values(values()):
            packs.append(upload.pack)
            located.update((entry.md5, entry) for _, entry in upload.located)
        entries = [(kb, located[s]) for kb, s in state.items() if isinstance(s, bytes)]
        unchanged = [(kb, s) for kb, s in state.items() if not isinstance(s, bytes)]
        if replace:
            entries += unchanged
        requests = Counter() if handle.callers else Counter(conn.request_counts) - before
        return _Written(
            _packed(entries), _packed([] if replace else [kb for kb, _ in unchanged]),
            len(unchanged), packs, len(seen), sizes[0], requests,
        )


def _keyed(codec: Codec, items: Iterable[Any]) -> Iterator[tuple[bytes, Any, Any]]:
    """The pairs of ``items`` as ``(encoded key, key, value)``."""
    for i, item in enumerate(items):
        key, value = _pair(item, i)
        yield codec.encode_key(key), key, value


def _base_entries(conn: S3Connection, base: dict, keys: Collection[bytes]) -> dict[bytes, Entry]:
    """The entries in the index of commit ``base`` of those ``keys`` it holds.

    The keys of a shard are looked up on one of the connection's threads, with an index
    of its own, dropped once done (a worker holds a shard at a time per thread): in the
    shard's directory and pages as a read of one key does (:meth:`RemoteIndex.entry`),
    or in the whole shard when more of them than :data:`remote.PAGES_BEFORE_WHOLE`
    (a read of that many pages of a shard fetches the rest whole). None is looked up
    (``{}``) when that costs more than uploading the values (:func:`_worth_looking_up`).
    """
    groups: dict[str, list[bytes]] = {}
    for kb in keys:
        name = fmt.shard_name_at(base, fmt.shard_of(kb, base["n_shards"]))
        if name is not None:
            groups.setdefault(name, []).append(kb)
    if not _worth_looking_up(base, [len(g) for g in groups.values()], len(keys)):
        return {}

    def look_up(item: tuple[str, list[bytes]]) -> list[tuple[bytes, Entry | None]]:
        name, group = item
        index = RemoteIndex(conn, MemoryMirror())
        if len(group) > remote_module.PAGES_BEFORE_WHOLE:
            shard = index.shard(name, remember=False)
            return [(kb, shard.get(kb)) for kb in group]
        return [(kb, index.entry(kb, manifest=base)) for kb in group]

    found: dict[bytes, Entry] = {}
    for looked_up in conn.workers.map(look_up, groups.items()):
        found.update((kb, e) for kb, e in looked_up if e is not None)
    return found


def _worth_looking_up(base: dict, groups: list[int], n_keys: int) -> bool:
    """Whether ``n_keys`` keys, ``groups`` of them in non-empty shards of ``base``, are
    worth looking up there: the records read (a shard whole, or a page a key) cost less
    than the values (see :data:`LOOKUP_RECORD_BYTES`)."""
    per_shard = base["n_keys"] / base["n_shards"]
    records = sum(
        per_shard if n > remote_module.PAGES_BEFORE_WHOLE else min(per_shard, n * fmt.PAGE_RECORDS)
        for n in groups
    )
    mean_value = base["n_bytes"] / max(1, base["n_keys"])
    return records * LOOKUP_RECORD_BYTES < n_keys * mean_value


def _pair(item: Any, i: int) -> tuple[Any, Any]:
    """``item`` as a ``(key, value)`` pair.

    Raises:
        SerializationError: it is not a pair.
    """
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise SerializationError(
        f"write_bag takes a bag of (key, value) pairs; item {i} of a partition is "
        f"{type(item).__name__} {item!r:.60}. Make pairs first, e.g. "
        "bag.map(lambda record: (record['id'], record))."
    )
