"""`EBooklet`, the dict-like database: the MutableMapping/dbm face over a :class:`Replica`.

It checks flags, encodes keys and values, and hands the work to the replica (local files,
remote view, writes) and to :class:`Reads` (the read path).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from datetime import datetime
from typing import IO, Any, NamedTuple

import booklet

from . import display, maintenance
from . import format as fmt
from .changes import Changes, PushResult
from .connection import S3Connection
from .progress import ProgressArg
from .reads import KeyStat, Reads
from .replica import OPEN_WAIT as OPEN_WAIT
from .replica import Replica

_ABSENT = object()  # "no such key", told from any value a get may return
_NOT_OPENED = "Use ebooklet.open(remote, file_path, flag) to open a database."

MAP_CHUNK = 1000
""":meth:`EBooklet.map` hands its workers keys this many at a time at most."""
UPDATE_BATCH = 10_000
"""``update()`` writes its pairs this many at a time (fewer when they are large, see
:data:`UPDATE_BATCH_BYTES`): it holds one batch, never all the pairs."""
UPDATE_BATCH_BYTES = 8 << 20
UPDATE_SPOOL_BYTES = 8 << 20
"""``update()`` keeps the encoded pairs in memory up to this many bytes, then in a
temporary file (see :func:`_spool_pairs`)."""
_SPOOLED = struct.Struct("<HI16s")  # key length, value length, md5 of the value


class DatabaseInfo(NamedTuple):
    """What :meth:`EBooklet.info` says about a database.

    Attributes:
        path: the local data file.
        remote: the database's URL (``None``: local only).
        flag: the flag it was opened with.
        state: ``"online"``, ``"offline"`` or ``"closed"``.
        commit: the seq of the head commit held (of the snapshot, for
            ``open(..., commit=)``); ``None`` before the first push.
        commit_time: when that commit was made (aware UTC datetime).
        n_keys: the keys, pending edits included (``len(db)``).
        n_bytes: the bytes of the values in that commit (``None`` before the first push).
        pending_edits: keys with unpushed edits, plus 1 for unpushed user metadata.
        key_serializer, value_serializer: their names (``None``: a custom class).
        uuid: the database's uuid.
        write_lock: whether this copy holds the remote write lock now.
    """

    path: str
    remote: str | None
    flag: str
    state: str
    commit: int | None
    commit_time: datetime | None
    n_keys: int
    n_bytes: int | None
    pending_edits: int
    key_serializer: str | None
    value_serializer: str | None
    uuid: str
    write_lock: bool


class EBooklet(MutableMapping):
    """A key/value database in a local booklet file, kept in sync with S3.

    Open one with :func:`ebooklet.open`. Reads prefer local edits, then the
    newest remote version (fetched once, then cached); writes stay local until
    ``changes().push()``. Thread-safe.
    """

    def __init__(self, replica: Replica | None = None) -> None:
        """Built by :func:`ebooklet.open` over the :class:`Replica` it opened.

        Raises:
            TypeError: called without one (use :func:`ebooklet.open`).
        """
        if not isinstance(replica, Replica):
            raise TypeError(_NOT_OPENED)
        self._replica = replica
        self._reads = Reads(replica)
        self.path = replica.path
        self.flag = replica.flag
        self.writable = replica.writable

    @property
    def offline(self) -> bool:
        """Whether the remote is out of reach (or there is none): reads use the local files."""
        return self._replica.offline

    # ------------------------------------------------------------ reads

    def __getitem__(self, key: Any) -> Any:
        value = self._reads.get(key, _ABSENT)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        return self._reads.get(key, default)

    def __contains__(self, key: Any) -> bool:
        return self._reads.contains(key)

    def __len__(self) -> int:
        return self._reads.count()

    def __iter__(self) -> Iterator[Any]:
        return self._reads.keys()

    def keys(  # type: ignore[override]
        self, keys: Iterable[Any] | None = None, prefix: str | bytes | None = None
    ) -> Iterator[Any]:
        """The keys of the database (or those of ``keys`` that exist); with ``prefix``,
        only those starting with it. No value is downloaded.

        ``prefix`` works on str keys (key serializer ``'str'``, the default: the keys
        whose UTF-8 encoding starts with the prefix's, which are the keys starting with
        it) and bytes keys (key serializer ``None``: a bytes prefix).

        Raises:
            TypeError: ``prefix`` with another key serializer, or of another type than
                the keys.
        """
        if keys is None:
            return iter(self) if prefix is None else self._reads.keys(prefix)
        if prefix is None:
            return (k for k in keys if k in self)
        start = self._reads.prefix_bytes(prefix)
        encode = self._replica.codec.encode_key
        return (k for k in keys if encode(k).startswith(start) and k in self)

    def items(  # type: ignore[override]
        self, keys: Iterable[Any] | None = None, prefix: str | bytes | None = None
    ) -> Iterator[tuple[Any, Any]]:
        """``(key, value)`` pairs, downloading missing values in coalesced batches; with
        ``prefix``, only of the keys starting with it (as :meth:`keys`): no other value
        is downloaded.

        Without ``keys``, the values cached locally come first, from one scan of the
        local file, then the others, downloaded in the order they lie in the remote.

        Raises:
            TypeError: a ``prefix`` :meth:`keys` refuses.
        """
        return self._reads.items(keys, prefix)

    def values(  # type: ignore[override]
        self, keys: Iterable[Any] | None = None, prefix: str | bytes | None = None
    ) -> Iterator[Any]:
        """The values (of ``keys`` when given; of the keys starting with ``prefix``, as
        :meth:`items`)."""
        for _, value in self.items(keys, prefix):
            yield value

    def stat(self, key: Any, remote: bool = False) -> KeyStat:
        """Size, md5 and timestamp of ``key``'s value, without downloading the value.

        Returns a :class:`KeyStat` ``(size, md5, timestamp, local)``: of the local edit
        (``local`` true: its value is in the local file) or else of the remote index
        entry. ``remote=True``: the head's entry whatever the local edits (the remote
        side of a conflict).

        Raises:
            KeyError: no such key (with ``remote``: not in the head).
            OfflineError: the remote is out of reach and the key's index shard is not local.
        """
        return self._reads.stat(key, remote)

    def get_remote(self, key: Any, default: Any = None) -> Any:
        """The value of ``key`` in the head (the remote side of a conflict), or ``default``
        when the head lacks it, whatever the local edits.

        The head is the one this copy holds (``changes().iter_changes()`` and a push
        refresh it). A key with a local edit has its head value downloaded and checked
        against the index md5, without replacing the edit in the local file.

        Raises:
            OfflineError: the value is not local and the remote is out of reach.
        """
        return self._reads.get_remote(key, default)

    def evict(self, keys: Iterable[Any] | None = None) -> int:
        """Drop cached copies of remote values from the local file (of ``keys``, or all),
        to free the disk; returns how many were dropped.

        Local edits stay, and an eviction is never pushed: the remote keeps the keys,
        which read the remote again (a download). Unlike :meth:`prune` with a timestamp,
        which deletes keys. Works with flag ``'r'``; ``prune()`` compacts the file after.

        Raises:
            ReadOnlyError: the local files cannot be written (read-only file system).
        """
        return self._reads.evict(keys)

    def get_items(self, keys: Iterable[Any], default: Any = None) -> Iterator[tuple[Any, Any]]:
        """``(key, value or default)`` for each of ``keys``, fetched in coalesced batches."""
        keys = list(keys)
        if self._replica.local_writable:  # else each value is fetched by its get
            self.load_items(keys)
        for key in keys:
            yield key, self.get(key, default)

    def load_items(self, keys: Iterable[Any] | None = None, progress: ProgressArg = None) -> int:
        """Download values into the local file without returning them.

        Neighbouring values are fetched together. ``keys=None`` loads every key.
        Returns how many values were downloaded.

        Args:
            keys: the keys to load (``None``: all).
            progress: reports values downloaded out of those to download: a
                callable(done, total), ``True`` (a tqdm bar), ``False`` (nothing), or
                ``None`` (a bar on a terminal only); see :mod:`ebooklet.progress`.

        Raises:
            ReadOnlyError: the local files cannot be written (read-only file system).
            TypeError: ``progress`` is none of those (before any request).
        """
        return self._reads.load_items(keys, progress)

    def map(
        self, func: Callable[[Any, Any], Any], keys: Iterable[Any] | None = None,
        processes: int | None = None,
    ) -> dict[Any, Any]:
        """Run ``func(key, value)`` over the database (or over ``keys``) on a pool of
        ``processes`` local worker processes; returns ``{key: func's result}``.

        This process first brings the values into the local copy (it downloads those
        missing, as :meth:`load_items` does) and flushes it; then each worker opens the same
        local copy read-only and without a remote (``ebooklet.open(None, path, "r")``: no
        credentials leave this process, no worker downloads anything) and reads its share
        of the keys from it, all in parallel (docs/processes.md). Workers start with the
        ``spawn`` method: ``func`` must be picklable (defined at the top level of a module,
        not a lambda or a closure), and so must its results. Keys of ``keys`` that the
        database lacks are skipped.

        Args:
            func: called as ``func(key, value)`` in a worker.
            keys: the keys to map over (``None``: every key).
            processes: the number of worker processes (``None``: ``os.cpu_count()``).

        Raises:
            TypeError: ``func`` is not callable, or ``processes`` not an int.
            ValueError: ``processes`` is below 1, or the database is a snapshot
                (``open(..., commit=)``), which workers cannot open.
            OfflineError: a value is not local and the remote cannot be reached.
            Exception: what ``func`` raised, for the first key it failed on, with a note
                naming the key (``exc.__notes__``); the pool is stopped.
        """
        if not callable(func):
            raise TypeError(f"func must be callable, not {type(func).__name__}.")
        processes = _pool_size(processes)
        replica = self._replica
        replica.check_open()
        if replica.pinned is not None:
            raise ValueError("map() reads the local copy's head; a snapshot (commit=) cannot be mapped.")
        try:  # before anything is loaded: a lambda or a closure fails here
            task = functools.partial(_map_chunk, pickle.dumps(func))
        except Exception as exc:
            exc.add_note(_MAP_IMPORTABLE)
            raise
        wanted = list(self.keys()) if keys is None else list(keys)
        if replica.local_writable and not replica.offline and replica.conn is not None:
            self.load_items(wanted, progress=False)
        replica.sync()
        codec = replica.codec
        opener = (
            str(replica.path),
            codec.key_serializer_name or codec.key_serializer,
            codec.value_serializer_name or codec.value_serializer,
        )
        size = max(1, min(MAP_CHUNK, -(-len(wanted) // (processes * 4))))
        chunks = [wanted[i : i + size] for i in range(0, len(wanted), size)]
        results: dict[Any, Any] = {}
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(processes, max(1, len(chunks))), _map_open, opener) as pool:
            for part in pool.imap_unordered(task, chunks):
                results.update(part)
            pool.close()
            pool.join()
        return results

    # ------------------------------------------------------------ writes

    def set(self, key: Any, value: Any, timestamp: int | str | datetime | None = None) -> None:
        """Set ``key`` to ``value`` locally, with an optional timestamp (µs, ISO str or datetime)."""
        replica = self._replica
        replica.check_writable()
        kb = replica.codec.encode_key(key)
        raw = replica.codec.encode_value(value)
        fmt.check_sizes(key, kb, raw)
        replica.set_value(key, kb, raw, fmt.md5(raw), _timestamp(timestamp))

    def __setitem__(self, key: Any, value: Any) -> None:
        self.set(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Set many keys at once (a mapping, pairs, or keyword arguments): all of them or,
        when one cannot be encoded or is too long, none.

        Every pair is encoded and checked first, into a temporary file when they are
        many, then written :data:`UPDATE_BATCH` at a time: memory holds one batch.

        Raises:
            SerializationError: a key or value the serializers cannot encode.
            ValueError: an encoded key or value too long for the local file.
        """
        replica = self._replica
        replica.check_writable()
        with tempfile.SpooledTemporaryFile(UPDATE_SPOOL_BYTES) as spool:
            _spool_pairs(replica, _pairs(args, kwargs), spool)  # all or nothing: nothing is journaled before this
            spool.seek(0)
            with replica.mutex:
                for batch in _spooled_batches(spool):
                    replica.set_values(batch)

    def __delitem__(self, key: Any) -> None:
        replica = self._replica
        replica.check_writable()
        kb = replica.codec.encode_key(key)
        with replica.mutex:
            if not self._reads.contains(key):
                raise KeyError(key)
            replica.delete_value(key, kb)

    def clear(self) -> None:
        """Delete every key; the next push replaces the remote database with an empty one."""
        self._replica.check_writable()
        self._replica.clear()

    # ------------------------------------------------------------ timestamps & metadata

    def get_timestamp(
        self, key: Any, include_value: bool = False, default: Any = None, as_datetime: bool = False
    ) -> Any:
        """The timestamp of ``key``: µs since the Unix epoch, or an aware UTC datetime with
        ``as_datetime``; ``(timestamp, value)`` with ``include_value``; ``default`` when
        there is no such key."""
        return self._reads.timestamp(key, include_value, default, as_datetime)

    def timestamps(self, include_value: bool = False, as_datetime: bool = False) -> Iterator[tuple]:
        """``(key, timestamp)`` (or ``(key, timestamp, value)``) for every key; timestamps
        as aware UTC datetimes with ``as_datetime``."""
        if include_value:
            for key, value in self.items():
                yield key, self.get_timestamp(key, as_datetime=as_datetime), value
            return
        for key in self:
            yield key, self.get_timestamp(key, as_datetime=as_datetime)

    def set_timestamp(self, key: Any, timestamp: int | str | datetime) -> None:
        """Change the timestamp of ``key`` (makes it a local edit)."""
        replica = self._replica
        replica.check_writable()
        timestamp = _timestamp(timestamp)
        found = self._reads.lookup(key)
        if found is None:
            raise KeyError(key)
        raw = found[1]
        replica.set_value(key, replica.codec.encode_key(key), raw, fmt.md5(raw), timestamp, retimed=True)

    def set_metadata(self, data: Any) -> None:
        """Set the database's user metadata (any JSON-serializable object); pushed with the data."""
        self._replica.check_writable()
        self._replica.set_metadata(data)

    def get_metadata(self) -> Any:
        """The user metadata: the local edit if any, else the remote's."""
        self._replica.check_open()
        return self._replica.metadata()

    # ------------------------------------------------------------ sync

    def changes(self) -> Changes:
        """The :class:`Changes` between this copy and the remote (push, pull, discard)."""
        self._replica.check_open()
        return Changes(self._replica, self._reads)

    def pull(
        self, keys: Iterable[Any] | None = None, force: bool = False, progress: ProgressArg = None
    ) -> int:
        """Bring the remote's changes into the local file; see :meth:`Changes.pull`."""
        return self.changes().pull(keys, force=force, progress=progress)

    def prune(self, timestamp: int | str | datetime | None = None) -> int:
        """Compact the local file; with ``timestamp``, delete keys older than it.

        Returns how many keys were deleted.
        """
        self._replica.check_writable()
        removed = 0
        if timestamp is not None:
            cutoff = booklet.make_timestamp_int(timestamp)
            old = [key for key, ts in self.timestamps() if ts < cutoff]
            for key in old:
                del self[key]
            removed = len(old)
        self._replica.prune()
        return removed

    def get_local_hash(self) -> int:
        """Find, in the whole data file, values written outside ebooklet that are not pending
        edits yet, and make them pending edits (as every open does for what was written
        since ebooklet last closed the file, see docs/design-notes.md).

        A value equal to the remote's current version, or not newer than it (by its
        timestamp: an out-of-date cached copy), is not an edit. A key deleted with plain
        booklet is found only if it had a pending edit: deleting a value that was only
        cached from the remote cannot be told from never having downloaded it, so that
        key reads the remote again (delete keys with ``del db[key]`` instead).

        Returns how many edits were found.

        Raises:
            ReadOnlyError: the database was opened with flag 'r'.
            OfflineError: an index shard needed is not local and the remote is out of reach.
        """
        self._replica.check_writable()
        return self._replica.find_outside_edits()

    def get_remote_hash(self) -> dict[Any, tuple[str, int]]:
        """Rebuild the remote index from the packs' footers: ``key -> (md5 hex, timestamp)``.

        Lists every pack of the database (needs list permission); where a key is
        in several packs, the newest timestamp wins. A recovery and audit tool: it
        cannot know which keys were deleted later.
        """
        return maintenance.remote_hash(self._replica)

    def sync(self) -> None:
        """Flush local files to disk."""
        self._replica.check_open()
        self._replica.sync()

    # ------------------------------------------------------------ attributes

    @property
    def remote(self) -> S3Connection | None:
        """The connection this database syncs with (``None``: local only)."""
        return self._replica.conn

    @property
    def uuid(self) -> str:
        """The database's uuid (shared by every copy of it)."""
        return self._replica.uuid

    # ------------------------------------------------------------ closing

    def close(self) -> None:
        """Flush and close the local files and release the remote write lock."""
        self._replica.close()

    def __enter__(self) -> EBooklet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._replica.closed:
                self._replica.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<EBooklet {str(self.path)!r} flag={self.flag!r} {self._state()} remote={self._replica.conn!r}>"

    def _state(self) -> str:
        replica = self._replica
        return "closed" if replica.closed else ("offline" if replica.offline else "online")

    def info(self) -> DatabaseInfo:
        """What this database is and holds, from the manifest held and the local files
        (no request, except what ``len()`` needs: the index shards of edited keys).

        Raises:
            EBookletError: the database is closed.
        """
        replica = self._replica
        replica.check_open()
        conn = replica.conn
        manifest = replica.pinned or replica.remote.manifest
        return DatabaseInfo(
            path=str(self.path),
            remote=None if conn is None else conn.db_url,
            flag=self.flag,
            state=self._state(),
            commit=None if manifest is None else manifest["seq"],
            commit_time=None if manifest is None else fmt.utc_datetime(manifest["timestamp"]),
            n_keys=len(self),
            n_bytes=None if manifest is None else manifest["n_bytes"],
            pending_edits=len(replica.log.edits) + replica.log.metadata_dirty,
            key_serializer=replica.codec.key_serializer_name,
            value_serializer=replica.codec.value_serializer_name,
            uuid=replica.uuid,
            write_lock=replica.holds_lock,
        )

    def _repr_html_(self) -> str:
        if self._replica.closed:
            return display.fields(f"EBooklet {self.path} (closed)", [])
        info = self.info()
        return display.fields(f"EBooklet {info.path}", [
            (name.replace("_", " "), value) for name, value in info._asdict().items() if name != "path"
        ])

    # ------------------------------------------------------------ remote management
    # (thin wrappers: the work is in maintenance/; see docs/history-and-vacuum.md)

    @property
    def commit(self) -> int | None:
        """The seq of the snapshot opened with ``open(..., commit=)``, else ``None``."""
        pinned = self._replica.pinned
        return pinned["seq"] if pinned is not None else None

    def history(self, limit: int | None = None) -> list:
        """The commits of the remote database, newest first (``limit``: at most that many).

        Each is a :class:`ebooklet.maintenance.Commit` with ``seq``, ``commit_id``,
        ``timestamp`` (µs) and ``time`` (datetime), ``changed_keys``, ``n_keys``,
        ``n_bytes`` and the ``message`` given to ``push(message=...)``. Works with
        a public URL too (it follows each commit's parent with GETs). Commits
        removed by :meth:`vacuum` are not listed.
        """
        return maintenance.history(self._replica.conn, maintenance.db_head(self._replica), limit)

    def diff(self, seq_a: int | str, seq_b: int | str | None = None) -> list:
        """The keys whose values differ between commits ``seq_a`` and ``seq_b`` (default: the head).

        Returns :class:`ebooklet.maintenance.KeyDiff` records ``(kind, key, old_md5,
        new_md5)``, ``kind`` being ``"added"``, ``"modified"`` or ``"deleted"``
        going from ``seq_a`` to ``seq_b``, sorted by encoded key. Only index
        shards that differ are read; no value is downloaded.
        """
        return maintenance.db_diff(self._replica, seq_a, seq_b)

    def revert(self, commit: int | str, message: str | None = None) -> PushResult:
        """Restore the database to the state of a past ``commit`` (a seq or a commit id)
        as a new commit: every key whose value differs between the head and that commit
        (and the user metadata) gets its value of then back, or is deleted; history
        keeps every commit in between. Downloads only the values that differ.

        Returns the push's :class:`PushResult` (``committed`` false when the head
        already is that state).

        Raises:
            EBookletError: the local copy has unpushed edits (push or discard them first).
            ReadOnlyError: flag ``'r'``, a public URL, a snapshot, or no remote.
            OfflineError: the remote cannot be reached.
            RemoteNotFoundError: no such commit (never made, or removed by vacuum).
            ConflictError: another writer committed a change to one of those keys
                meanwhile (the restored values stay pending: push or discard them).
        """
        maintenance.stage_revert(self._replica, commit)
        return self.changes().push(message=message if message is not None else f"revert to {commit}")

    def delete_remote(self) -> Any:
        """Delete the remote database: its manifest and every ``D.ebk/`` object, nothing else.

        Takes the write lock; in a versioned bucket every version goes. The local
        files stay and make a local-only database: every value they hold (local
        edits and cached values of the newest commit; call :meth:`load_items` first
        to keep them all) and the user metadata become local edits, readable as
        before, which the next push (reopen with the connection) uploads to
        recreate the remote. This object goes on working offline (``remote``
        becomes ``None``). Returns a :class:`ebooklet.maintenance.DeleteResult`.
        """
        return maintenance.delete_remote(self._replica)

    def copy_remote(
        self,
        target: S3Connection,
        overwrite: bool = False,
        server_side: bool | None = None,
        message: str | None = None,
        progress: ProgressArg = None,
    ) -> Any:
        """Copy the remote database's newest commit to ``target`` (an :class:`S3Connection`).

        Same endpoint and credentials: copied inside the store (``CopyObject``,
        multipart over 5 GiB), no value is downloaded. Otherwise streamed through
        this machine part by part, every value checked against its md5. The copy
        is a database of its own (new uuid, one commit) whose manifest is committed
        last, conditionally. Local edits that were not pushed are not copied.

        Args:
            target: where the copy goes.
            overwrite: replace a database already at ``target`` (else
                :class:`RemoteExistsError`).
            server_side: force (True) or forbid (False) the in-store copy;
                ``None`` decides from the connections.
            message: the copy's commit message.
            progress: reports objects (index shards and packs) copied or found already
                at the target: a callable(done, total), ``True`` (a tqdm bar), ``False``
                (nothing), ``None`` (a bar on a terminal only); see
                :mod:`ebooklet.progress`.

        Returns a :class:`ebooklet.maintenance.CopyResult`.

        Raises:
            TypeError: ``progress`` is none of those (before any request).
        """
        return maintenance.copy_remote(
            self._replica, target, overwrite, server_side, message, progress
        )

    def vacuum(
        self,
        keep: int | None = None,
        older_than: Any = None,
        rewrite_below: float = 0.5,
        purge: bool | None = None,
        progress: ProgressArg = None,
    ) -> Any:
        """Drop old commits and delete every object the kept commits do not reference.

        Under the write lock. Keeps the newest ``keep`` commits and those newer
        than ``older_than`` (a datetime, a timedelta age, an ISO string or µs);
        with both, a commit goes only when it is beyond ``keep`` *and* older.
        With neither, all commits stay and only unreferenced objects (from
        interrupted pushes) go. Packs whose live bytes are below ``rewrite_below``
        of their size are rewritten; with ``purge`` (the default when only one
        commit is kept) every pack holding a value or key no kept commit
        references is, so that nothing deleted or overwritten stays downloadable.
        A new layout is committed before anything is deleted.

        ``progress`` reports the packs rewritten, then the objects (and versions)
        deleted: a callable(done, total) (``total`` is ``None`` until the deletions are
        listed), ``True`` (a tqdm bar), ``False`` (nothing), ``None`` (a bar on a
        terminal only); see :mod:`ebooklet.progress`.

        Returns a :class:`ebooklet.maintenance.VacuumResult` (what was removed,
        ``bytes_reclaimed``).

        Raises:
            TypeError: ``progress`` is none of those (before any request).
        """
        return maintenance.vacuum(self._replica, keep, older_than, rewrite_below, purge, progress)


def _pairs(args: tuple, kwargs: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    """The ``(key, value)`` pairs of ``update(*args, **kwargs)``, in ``dict(*args, **kwargs)``'s
    order and with its errors, without a copy of them."""
    if len(args) > 1:
        raise TypeError(f"update expected at most 1 argument, got {len(args)}")
    if args:
        source = args[0]
        if isinstance(source, dict):
            yield from source.items()
        elif hasattr(source, "keys"):
            yield from ((key, source[key]) for key in source.keys())  # noqa: SIM118 - as dict() does
        else:
            for i, element in enumerate(source):
                try:
                    pair = tuple(element)
                except TypeError:
                    raise TypeError(
                        f"cannot convert dictionary update sequence element #{i} to a sequence"
                    ) from None
                if len(pair) != 2:
                    raise ValueError(
                        f"dictionary update sequence element #{i} has length {len(pair)}; 2 is required"
                    )
                hash(pair[0])  # an unhashable key is refused, as dict() refuses it
                yield pair
    yield from kwargs.items()


def _spool_pairs(replica: Replica, pairs: Iterable[tuple[Any, Any]], spool: IO[bytes]) -> None:
    """Encode and check every pair (:func:`format.check_sizes`) into ``spool``, as records of
    :data:`_SPOOLED` then the encoded key and value.

    Raises:
        SerializationError, ValueError: as :meth:`EBooklet.update`.
    """
    write, encode_key, encode_value = spool.write, replica.codec.encode_key, replica.codec.encode_value
    for key, value in pairs:
        kb, raw = encode_key(key), encode_value(value)
        fmt.check_sizes(key, kb, raw)
        write(_SPOOLED.pack(len(kb), len(raw), fmt.md5(raw)))
        write(kb)
        write(raw)


def _spooled_batches(spool: IO[bytes]) -> Iterator[list[tuple[bytes, bytes, bytes]]]:
    """The ``(encoded key, encoded value, md5)`` records :func:`_spool_pairs` wrote, in
    batches of :data:`UPDATE_BATCH` records or about :data:`UPDATE_BATCH_BYTES`."""
    read, size = spool.read, _SPOOLED.size
    batch: list[tuple[bytes, bytes, bytes]] = []
    n_bytes = 0
    while head := read(size):
        key_len, value_len, md5 = _SPOOLED.unpack(head)
        batch.append((read(key_len), read(value_len), md5))
        n_bytes += value_len
        if len(batch) >= UPDATE_BATCH or n_bytes >= UPDATE_BATCH_BYTES:
            yield batch
            batch, n_bytes = [], 0
    if batch:
        yield batch


def _timestamp(timestamp: Any) -> int | None:
    """A timestamp in µs since the epoch from what ``set`` accepts (``None`` stays
    ``None``: now, when written); refused before anything is journaled."""
    if timestamp is None:
        return None
    try:
        value = booklet.utils.make_timestamp_int(timestamp)
    except (TypeError, ValueError) as exc:
        raise type(exc)(
            f"Bad timestamp {timestamp!r}: give microseconds since the epoch (int), an ISO "
            "8601 string with a timezone, or a datetime with a timezone."
        ) from None
    if not 0 <= value < fmt.TIMESTAMP_END:
        raise ValueError(f"Timestamp {timestamp!r} is out of range: 0 <= µs since the epoch < 2**56.")
    return value


def _pool_size(processes: Any) -> int:
    """The number of worker processes of :meth:`EBooklet.map` (``None``: the CPUs)."""
    if processes is None:
        return os.cpu_count() or 1
    if isinstance(processes, bool) or not isinstance(processes, int):
        raise TypeError(f"processes must be an int, not {type(processes).__name__}.")
    if processes < 1:
        raise ValueError(f"processes must be 1 or more, not {processes}.")
    return processes


_MAP_DB: EBooklet | None = None  # a map() worker's read-only copy, opened once
_MAP_OPEN_ERROR: BaseException | None = None  # why a map() worker could not open it
_MAP_IMPORTABLE = (
    "ebooklet map(): func runs in worker processes started with 'spawn', which load it by "
    "its module and name: define it in a module (a .py file) and import it, not in a "
    "notebook or `python -c`, and not as a lambda or a closure."
)


def _map_open(path: str, key_serializer: Any, value_serializer: Any) -> None:
    """Open, in a :meth:`EBooklet.map` worker, the local copy at ``path`` read-only and
    without a remote."""
    global _MAP_DB, _MAP_OPEN_ERROR
    try:  # a pool restarts a worker whose initializer fails, forever: the task raises instead
        _MAP_DB = EBooklet(
            Replica(None, path, "r", value_serializer, key_serializer, 12007, 2**22, 0.0, None)
        )
    except Exception as exc:
        _MAP_OPEN_ERROR = exc


def _map_chunk(pickled: bytes, keys: list[Any]) -> list[tuple[Any, Any]]:
    """``(key, func(key, value))`` of those of ``keys`` the worker's copy holds, ``func``
    unpickled from ``pickled`` here (a pool's worker that cannot load its task dies, and
    the task is lost: its caller waits forever); an exception of ``func`` goes up with a
    note naming its key, one loading it or opening the copy as it is."""
    if _MAP_OPEN_ERROR is not None:
        raise _MAP_OPEN_ERROR
    try:
        func = pickle.loads(pickled)
    except Exception as exc:
        exc.add_note(_MAP_IMPORTABLE)
        raise
    db = _MAP_DB
    assert db is not None
    out = []
    for key in keys:
        value = db.get(key, _ABSENT)
        if value is _ABSENT:
            continue
        try:
            out.append((key, func(key, value)))
        except Exception as exc:
            exc.add_note(f"ebooklet map(): func raised this for key {key!r:.200}")
            raise
    return out
