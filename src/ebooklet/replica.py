"""`Replica`: one open local copy of one remote database.

A replica owns the local files (the data file, :class:`ChangeLog`, :class:`IndexMirror`,
:class:`LocalMeta`), the view of the remote (:class:`RemoteIndex`), the :class:`Codec` (the
key and value serializers, :mod:`.codec`), the mutex and the remote write lock. It opens
them (reconciling what was written to the data file outside ebooklet, with
:class:`OutsideWrites`), keeps the remote view fresh, pins a snapshot, detaches from a
deleted remote, and closes them. The read path
(:mod:`.reads`), :class:`EBooklet`, :class:`Changes` and the maintenance functions use it
through its public methods and attributes only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import booklet

from . import format as fmt
from . import serializers
from ._booklet_io import DataFile, append_records, scan
from .codec import Codec
from .connection import S3Connection, check_seconds, connection_from
from .errors import (
    EBookletError,
    IntegrityError,
    OfflineError,
    OfflineWarning,
    ReadOnlyError,
    RemoteNotFoundError,
    ScanInterrupted,
)
from .local import (
    UNKNOWN_MD5,
    ChangeLog,
    FetchClaims,
    FileLock,
    IndexMirror,
    LocalMeta,
    in_use,
    local_paths,
    lock_paths,
    new_base,
)
from .lock import RemoteLock
from .outside import OutsideWrites
from .remote import PinnedMirror, RemoteIndex

logger = logging.getLogger("ebooklet")

FLAGS = ("r", "w", "c", "n")
LOCK_SCOPES = ("open", "push")
"""How long a writer holds the remote write lock (``open(..., lock=)``): while the
database is open with a write flag, or only while it pushes (vacuums, deletes)."""
LARGE_VALUE = 4 << 20
"""A value longer than this goes into the data file without booklet's copies of it."""
OPEN_WAIT = 5.0
"""Seconds :func:`open` waits at most for the remote's manifest, all tries together,
before it works offline from the local files (``remote_timeout`` changes it)."""


class Replica:
    """One open local copy of one remote (or of none: local only).

    Opening it (``Replica(remote, file_path, flag, ...)``, as :func:`ebooklet.open` does)
    reads the remote manifest, reconciles the local files and takes the remote write lock
    when writable. Fixed for its life: ``path``, ``flag``, ``writable``, ``local_writable``,
    ``log`` (the :class:`ChangeLog`), ``data`` (the booklet data file) and ``codec`` (the
    :class:`Codec`: encoding and decoding keys and values; an attribute, for the hot path).

    Args:
        remote: an :class:`S3Connection`, a public URL, or ``None``.
        file_path: the local data file (its journal, mirror and metadata lie beside it).
        flag: ``'r'``, ``'w'``, ``'c'`` or ``'n'``.
        value_serializer, key_serializer, trust_serializers: see :func:`ebooklet.open`.
        n_buckets, buffer_size, timeout: booklet parameters of the data file.
        lock_timeout: seconds to wait for another writer's remote lock.
        remote_timeout: seconds to wait for the remote's manifest.
        pin: called with the replica once the remote head is read, before the serializers
            are chosen: ``open(..., commit=)`` pins its snapshot there (:meth:`pin`).
        lock: one of :data:`LOCK_SCOPES`: ``"open"`` takes the remote write lock at open
            and holds it until close; ``"push"`` takes it only around each push (and
            vacuum or remote deletion), waiting at most ``lock_timeout`` for it.

    Raises:
        The errors of :func:`ebooklet.open`.
    """

    def __init__(
        self,
        remote: S3Connection | str | None,
        file_path: str | os.PathLike,
        flag: str,
        value_serializer: Any,
        key_serializer: Any,
        n_buckets: int,
        buffer_size: int,
        lock_timeout: float,
        timeout: float | None,
        trust_serializers: Any = False,
        remote_timeout: float | None = None,
        pin: Callable[[Replica], None] | None = None,
        lock: str = "open",
    ) -> None:
        if not isinstance(flag, str) or flag not in FLAGS:
            raise ValueError(f"flag must be one of 'r', 'w', 'c', 'n', not {flag!r}.")
        if not isinstance(lock, str) or lock not in LOCK_SCOPES:
            raise ValueError(f"lock must be one of 'open', 'push', not {lock!r}.")
        if not isinstance(file_path, (str, os.PathLike)):
            raise TypeError(f"file_path must be a str or path, not {type(file_path).__name__}.")
        if remote_timeout is not None:
            check_seconds("remote_timeout", remote_timeout)
        conn = connection_from(remote, remote_timeout)
        if flag != "r" and conn is not None and not conn.writable:
            raise ReadOnlyError(
                f"{conn.db_url} is a public URL: it can only be opened with flag 'r'. "
                "Use an S3Connection with credentials to write."
            )
        self.path = Path(file_path)
        self.flag = flag
        self.writable = flag != "r"
        self._journaling = self.writable  # writes the journal and owns P.ebk.json (docs/processes.md)
        self._offline = conn is None
        self._conn = conn
        self._rlock = threading.RLock()
        self._closed = True
        self._lock: RemoteLock | None = None
        self.lock_scope = lock
        self._lock_timeout = lock_timeout
        self._pinned: dict | None = None  # open(..., commit=): the snapshot's manifest
        # False: flag 'r' on local files that cannot be written (a read-only file
        # system): nothing is written, values fetched are returned without being cached
        self._local_writable = _local_files_writable(self.path, flag)
        data_path, log_path, mirror_path, meta_path = local_paths(self.path)
        self._batch, self._writer = _copy_locks(self.path, self._local_writable, self.writable, timeout)
        self.claims = FetchClaims(lock_paths(self.path)[0] if self._local_writable else None)
        """Which process downloads which value now (see :class:`FetchClaims`)."""
        try:
            # The local files are read holding the batch lock: as one state, between
            # two writes of the other processes that have the copy open (docs/processes.md).
            with self._batched():
                self._mirror = IndexMirror(
                    mirror_path, self._local_writable, timeout=timeout, batch_lock=self._batch
                )
                # a reader's new head waits in memory until it may become the copy's
                self._mirror.head_in_memory = not self.writable and self._writer is not None
                self._remote = RemoteIndex(conn, self._mirror)
                fresh = flag == "n"  # a damaged journal or metadata is replaced, not read
                self._meta = LocalMeta(meta_path, damaged_ok=fresh, lock=self._batch)
                self._outside = OutsideWrites(self.path, self._meta, self.writable, self._local_writable)
                closed = self._outside.closed_cleanly
                try:
                    self._log = ChangeLog(
                        log_path, self._local_writable and self.writable, damaged_ok=fresh,
                        expect_closed=closed and not fresh,
                    )
                except IntegrityError:
                    self._set_damaged_journal_aside(log_path, closed and not fresh)
                    raise
                if not fresh and self.writable:
                    self._outside.mark_session_open()
                elif not self.writable and self._local_writable:
                    ChangeLog.start(log_path)
                meta_saved = None if fresh else dict(self._meta.data)  # P.ebk.json as on disk
                local_exists = data_path.exists() and not fresh
                if not fresh:
                    self._check_same_remote(conn)
                # Values cached in the data file came from this manifest (see OutsideWrites).
                cached_from = self._remote.manifest
                self._written_outside = local_exists and self._outside.stat_changed(data_path)
            self._refresh_at_open(flag, local_exists, _open_wait(conn, remote_timeout))
            if pin is not None:
                pin(self)
            if conn is not None and conn.writable and "conditional_writes" in self._meta.data:
                conn.remember_conditional_writes(self._meta.data["conditional_writes"])
            self._take_remote_lock(lock_timeout)
            with self._batched():
                self._open_local(
                    data_path, log_path, fresh, local_exists, cached_from, meta_saved, conn,
                    (key_serializer, value_serializer, trust_serializers, n_buckets, buffer_size, timeout),
                )
        except BaseException:
            self._close_files()
            outside = getattr(self, "_outside", None)  # None: P.ebk.json could not be read
            if outside is not None and self.writable:
                outside.unmark_session_open(getattr(self, "_log", None))
            self._close_locks()
            raise

    def _open_local(
        self, data_path: Path, log_path: Path, fresh: bool, local_exists: bool,
        cached_from: dict | None, meta_saved: dict | None, conn: S3Connection | None,
        params: tuple,
    ) -> None:
        """The second half of the open, holding the batch lock: the serializers, the data
        file, what was written to it outside ebooklet, ``P.ebk.json`` (saved only when it
        differs from ``meta_saved``, its content as read; ``None``: always)."""
        key_serializer, value_serializer, trust_serializers, n_buckets, buffer_size, timeout = params
        if fresh:
            self._start_afresh(data_path, log_path)
        self.codec = Codec.choose(
            self.path, key_serializer, value_serializer, trust_serializers,
            fresh=fresh,
            manifest=None if fresh or self._log.replace else self._remote.manifest,
            meta=self._meta, conn=conn,
        )
        # The local index is sized by the caller's n_buckets only, never from the
        # remote's n_keys: a manifest claiming 10**9 keys made a 12 GB file (booklet
        # grows its index as keys arrive).
        kept = local_exists and data_path.exists()  # not dropped for a foreign remote
        self._data = _open_data(
            data_path, self.codec, n_buckets, buffer_size, timeout, self._local_writable, self._batch
        )
        self._data.before_write = self._log.flush  # the journal reaches the disk first
        if not self.writable:
            self._data.map_for_reading()  # reads without a system call (docs/processes.md)
        self._data_path = data_path
        if not local_exists and not fresh:
            self._forget_lost_values()
        self._closed = False
        if not self.writable:  # the writer may have journaled edits since the journal was read
            self._log.reload()
        if kept:
            self._outside.reconcile_at_open(
                self._data, data_path, self._log, self._remote, self.codec, self.offline, cached_from
            )
        if "uuid" not in self._meta.data:
            self._meta.data["uuid"] = uuid.uuid4().hex
        self._meta.data.update(
            remote=conn.public_params() if conn else self._meta.data.get("remote"),
            key_serializer=self.codec.key_serializer_name,
            value_serializer=self.codec.value_serializer_name,
            n_buckets=n_buckets,
        )
        self._record_data_state(closed=False, always=self._meta.data != meta_saved, reread=False)

    def _set_damaged_journal_aside(self, log_path: Path, expect_closed: bool) -> None:
        """The journal is damaged: a writer has set it aside (see :class:`ChangeLog`); a
        reader does so too when no writer has the copy open. Said once: the next open
        starts a new journal."""
        if not self.writable:
            if self._writer is None or not self._writer.acquire(0):
                return  # the writer's (or the next writable open's) to set aside
            try:
                ChangeLog(log_path, True, expect_closed=expect_closed).close(mark_closed=False)
            except IntegrityError:
                pass  # set aside
            finally:
                self._writer.release()
        self._outside.mark_session_open()

    def _batched(self) -> contextlib.AbstractContextManager:
        """The batch lock (held around each write to the shared local files), or nothing
        when the local files cannot be written."""
        return self._batch if self._batch is not None else contextlib.nullcontext()

    def _take_remote_lock(self, lock_timeout: float) -> None:
        conn = self._conn
        if self.lock_scope != "open":
            return  # taken around each push instead (holding_lock)
        if self.writable and conn is not None and conn.writable and not self.offline:
            self._lock = RemoteLock(conn, self._meta.owner_id, str(self.path.resolve()))
            self._lock.acquire(lock_timeout)
            if self._lock.contended:
                self.refresh()  # the writer we waited for may have committed meanwhile

    def _start_afresh(self, data_path: Path, log_path: Path) -> None:
        """Flag 'n', both locks held: an empty copy that replaces the remote at the next push.

        Raises:
            booklet.LockTimeoutError: another process has the copy open (as a reader).
        """
        if in_use(data_path):
            raise booklet.LockTimeoutError(
                f"{self.path} is open in another process: flag 'n' needs the local copy alone; "
                "close it there first."
            )
        self._outside.mark_session_open()
        self._log.close()
        for path in (data_path, log_path):
            path.unlink(missing_ok=True)
        self._log = ChangeLog(log_path)
        self._log.set_replace(True)
        self._meta.data["uuid"] = uuid.uuid4().hex

    def _forget_lost_values(self) -> None:
        """The data file was missing: edits whose value went with it cannot be pushed."""
        lost = [kb for kb, edit in self._log.edits.items() if edit.md5 is not None]
        if lost:
            warnings.warn(
                f"{self.path} was missing: {len(lost)} unpushed value(s) were lost with it; "
                "those keys read the remote version again.",
                RuntimeWarning,
                stacklevel=5,
            )
            if self._journaling:
                self._log.mark_clean(lost)
            elif self._writer is not None and self._writer.acquire(0):
                try:  # a reader, no writer open: it may journal this as a writer would
                    self._outside.mark_session_open()
                    cleanup = ChangeLog(self._log.path)
                    cleanup.mark_clean(lost)
                    cleanup.close(mark_closed=False)
                    self._log.reload()
                finally:
                    self._writer.release()
            else:  # a writer has the copy: the next writable open finds them lost too
                self._log.forget_edits(lost)

    def _record_data_state(self, closed: bool, always: bool = False, reread: bool = True) -> None:
        """Record the data file's state while it is open: :meth:`OutsideWrites.record_data_state`.

        A reader (flag 'r') records it only while no writer has the copy open (it takes
        the writer lock without waiting), with the ``closed`` flag ``P.ebk.json`` has (a
        reader never writes the journal), after reading ``P.ebk.json`` again when
        ``reread``; then the head it holds becomes the copy's head (docs/processes.md).
        """
        if self._closed:
            return
        if self._journaling or self._writer is None:
            self._outside.record_data_state(self._data, self._data_path, closed, always)
            return
        if not self._writer.acquire(0):
            return  # a writer owns P.ebk.json and the copy's head
        try:
            with self._batch:
                if reread:
                    self._meta.reload()
                state = self._meta.data_state
                self._outside.record_data_state(
                    self._data, self._data_path, bool(state and state["closed"]), always
                )
                self._mirror.persist_head()
        finally:
            self._writer.release()

    def _check_same_remote(self, conn: S3Connection | None) -> None:
        known = self._meta.data.get("remote")
        if conn is None or not known or not conn.writable or not known.get("db_key"):
            return
        mine = conn.public_params()
        for field in ("bucket", "db_key", "endpoint_url"):
            if known.get(field) != mine[field]:
                raise ValueError(
                    f"{self.path} is the local copy of another remote ({field} "
                    f"{known.get(field)!r}, not {mine[field]!r}); use another file path, "
                    "or flag 'n' to start this one afresh."
                )

    def _refresh_at_open(self, flag: str, local_exists: bool, wait: float | None) -> None:
        """Read the remote manifest (waiting at most ``wait`` seconds for it, else working
        offline) and check that ``flag`` can open what there is."""
        if self._conn is not None:
            try:
                self.refresh(wait)
            except OfflineError as exc:
                self._offline = True
                if not local_exists and flag != "n":
                    raise OfflineError(
                        f"{self._conn!r} cannot be reached and there is no local copy at "
                        f"{self.path}; reconnect and open again. ({exc})"
                    ) from None
                warnings.warn(f"Working offline from local files: {exc}", OfflineWarning, stacklevel=4)
        remote_exists = self._remote.exists
        if flag in ("r", "w") and not (remote_exists or local_exists):
            if self._conn is None:
                where = "no remote given"
            elif self._conn.writable:
                where = f"{self._conn!r} does not exist"
            else:
                where = f"{self._conn.db_url} was not found or is not public"
            create = (
                "check the URL (a database is created with an S3Connection with credentials "
                "and flag 'c')"
                if self._conn is not None and not self._conn.writable
                else "use flag 'c' to create one"
            )
            raise RemoteNotFoundError(f"No database at {self.path}, and {where}; {create}.")
        if flag == "w" and self._conn is not None and self._conn.writable and not remote_exists and not self.offline:
            logger.warning(
                "%s does not exist remotely yet: the first push creates it from %s.",
                self._conn,
                self.path,
            )
        manifest = self._remote.manifest
        # A pending replacement ('n' or clear() not pushed yet) keeps its own uuid.
        if manifest is not None and flag != "n" and not self._log.replace:
            known = self._meta.data.get("uuid")
            if known and known != manifest["uuid"]:
                self._adopt_foreign_remote(manifest)
            self._meta.data["uuid"] = manifest["uuid"]

    def _adopt_foreign_remote(self, manifest: dict) -> None:
        """The remote was replaced by another database: drop caches built for the old one."""
        if self._log.edits or self._log.metadata_dirty or self._written_outside:
            if self._conn is not None and not self._conn.writable:
                todo = (
                    "Read the new database with another file path; this one keeps the "
                    "edits (ebooklet.open(None, path) reads them)."
                )
            else:
                todo = (
                    "Open with flag 'n' to start over, or open the old file read-only "
                    "elsewhere to recover the edits."
                )
            raise EBookletError(
                f"The remote database was replaced (uuid {manifest['uuid']}) while {self.path} "
                f"has unpushed edits of the old one (or was written outside ebooklet). {todo}"
            )
        data_path = local_paths(self.path)[0]
        if data_path.exists() and not self._local_writable:
            raise EBookletError(
                f"The remote database was replaced (uuid {manifest['uuid']}), and {self.path} "
                "holds the cache of the old one but cannot be written to drop it: open the "
                "remote with another, writable file path."
            )
        with self._batched():  # no other process opens the data file meanwhile
            if data_path.exists() and in_use(data_path):
                raise EBookletError(
                    f"The remote database was replaced (uuid {manifest['uuid']}), and {self.path} "
                    "holds the cache of the old one, open in another process: close it there "
                    "first, or read the new database with another file path."
                )
            data_path.unlink(missing_ok=True)

    def refresh(self, wait: float | None = None) -> bool:
        """Adopt the newest remote manifest, first resolving unknown bases of edits.

        ``wait``: seconds the manifest GET may take, all tries together (``None``: the
        connection's timeouts and retries).
        """
        if self._pinned is not None:
            return False  # a snapshot (open(..., commit=)) stays at its commit
        if not self._closed:
            self.catch_up_edits()  # a reader sees the writer's flushed edits from here on
        old_manifest = self._remote.manifest
        manifest, etag = self._remote.fetch_manifest(wait)
        # Resolve even when the head is unchanged: a key edited before its shard was
        # fetched must not look like a conflict at the next push.
        unknown = self._log.edits.keys_based_on(UNKNOWN_MD5)
        if unknown and self._local_writable:  # else resolved by the next writable open
            entries = self._remote.entries(unknown, old_manifest)
            self._outside.note_edits(
                self._log, [(k, self._log.edits[k].md5, new_base(None, e, False)) for k, e in entries.items()]
            )
        if etag == self._remote.etag and (manifest is None) == (old_manifest is None):
            self._offline = False
            if self._mirror.head_pending:  # a reader's head, not the copy's yet
                self._record_data_state(closed=False)
            return False
        with self._rlock, self._batched():
            # Values cached from now on come from the new head: the next open tells them
            # from edits made outside against the manifest it finds in the mirror. (A
            # reader adopts it in memory, then records: see _record_data_state.)
            if self._journaling:
                self._record_data_state(closed=False)
            self._remote.adopt(manifest, etag)
            if not self._journaling:
                self._record_data_state(closed=False)
        self._offline = False
        return True

    # ------------------------------------------------------------ state checks

    def check_open(self) -> None:
        """Raises ``EBookletError`` once the replica is closed."""
        if self._closed:
            raise EBookletError(f"{self.path} is closed; reopen it with ebooklet.open().")

    def check_writable(self) -> None:
        """Raises ``EBookletError`` when closed, ``ReadOnlyError`` (saying why) when the
        copy was opened read-only."""
        self.check_open()
        if self.writable:
            return
        if self._conn is not None and not self._conn.writable:
            raise ReadOnlyError(
                f"{self.path} was opened from the public URL {self._conn.db_url}, which is "
                "read-only: to write, open the database with an S3Connection with "
                "credentials (access key id and secret key) and flag 'w'."
            )
        if not self._local_writable:
            raise ReadOnlyError(
                f"{self.path} was opened read-only because its local files cannot be "
                "written (read-only file system, or no permission); to write, copy them "
                "where you can write and open the copy with flag 'w'."
            )
        raise ReadOnlyError(f"{self.path} was opened read-only (flag 'r'); reopen with 'w' to write.")

    def check_local_writable(self, what: str) -> None:
        """Refuse (``ReadOnlyError``) an operation that writes the local files when they
        cannot be written (flag ``'r'`` on a read-only file system)."""
        if not self._local_writable:
            raise ReadOnlyError(
                f"{what} writes into the local files of {self.path}, which cannot be written "
                "(read-only file system, or no permission); read values with get(), items() "
                "or get_items() instead: they are fetched without being cached."
            )

    # ------------------------------------------------------------ the data file

    def _store(self, kb: bytes, raw: bytes, timestamp: Any = None) -> None:
        """Write an encoded value of the encoded key ``kb`` to the data file; a large one
        goes straight to the file, without copies (see :func:`_booklet_io.append_records`)."""
        if len(raw) > LARGE_VALUE:
            append_records(self._data, [(kb, raw, timestamp)])
        else:
            self._data.put(kb, raw, timestamp)

    def cached(self, key: Any) -> tuple[int, bytes] | None:
        """``(timestamp, encoded value)`` of ``key`` in the data file, or ``None``.

        Raises:
            IntegrityError: the data file is too damaged to look the key up (booklet
                follows index positions that lead nowhere).
        """
        try:
            return self._data.get_timestamp(key, include_value=True, decode_value=False)
        except (OSError, ValueError, IndexError, OverflowError) as exc:
            raise IntegrityError(
                f"{self.path} is damaged: looking up key {key!r:.80} failed "
                f"({type(exc).__name__}: {exc}). Move it away (keep it: plain booklet may "
                "still read some values) and reopen: pushed values are downloaded again; "
                "the unpushed values that were in it are lost, and the reopen says how many."
            ) from None

    def scan(self, include_value: bool = True) -> Iterator[tuple]:
        """The data file's ``(encoded key, timestamp[, encoded value])``, see :func:`_booklet_io.scan`."""
        return scan(self._data, self._data_path, include_value)

    def scan_pays(self, n_keys: int) -> bool:
        """Whether reading ``n_keys`` keys' local data is faster by one sequential scan of
        the data file than by a lookup each: when they are half of it or more."""
        return 2 * n_keys >= len(self._data)

    def stored_values(self, kbs: Collection[bytes]) -> Iterator[tuple[bytes, int, bytes]]:
        """``(encoded key, timestamp, encoded value)`` of those of ``kbs`` in the data
        file, in file order.

        When they are half the file or more, one sequential scan reads them (about
        twice as fast as a lookup per key); if a read caches a value meanwhile (which
        ends booklet's scan), the rest are looked up one by one.
        """
        todo = set(kbs)
        if self.scan_pays(len(todo)):
            try:
                for kb, ts, raw in self.scan():
                    if kb in todo:
                        todo.discard(kb)
                        yield kb, ts, raw
                    raw = None  # noqa: F841 - drop a large value before reading the next
            except ScanInterrupted:
                pass
        for kb in sorted(todo):
            cached = self.cached(self.codec.decode_key(kb))
            if cached is not None:
                yield kb, *cached

    def catch_up_edits(self) -> bool:
        """A reader: read the journal again if the writer (another process) changed it
        since; returns whether it did (see docs/processes.md)."""
        if self._journaling or not self._local_writable:
            return False
        with self._rlock, self._batch:  # the writer journals and writes under it: one state
            return self._log.reload()

    def _become_writer(self) -> None:
        """A reader about to write the journal (``delete_remote`` keeps the values as
        edits): it takes the writer lock for the rest of its session, and from then on
        writes the journal and owns ``P.ebk.json`` and the copy's head, as a writer.

        Raises:
            booklet.LockTimeoutError: a writer has the copy open.
        """
        if self._journaling:
            return
        if not self._writer.acquire(0):
            raise booklet.LockTimeoutError(
                f"{self.path} is open for writing in another process; this needs the copy's "
                "writer lock: close it there first."
            )
        with self._batch:
            self._record_data_state(closed=False)  # as a reader: the head becomes the copy's
            self._log.reload(writable=True)
            self._outside.mark_session_open()
            self._mirror.head_in_memory = False
            self._journaling = True

    def damaged_edit(self, kb: bytes, present: bool) -> IntegrityError:
        """The error for a local edit whose value in the data file is missing (``present``
        false) or is not the value that was journaled."""
        key = self.codec.decode_key(kb)
        what = "holds another value than the one" if present else "lacks the value"
        return IntegrityError(
            f"{self.path} {what} last set locally for key {key!r:.80} (not pushed yet): the "
            "write did not reach the file (a crash) or the file was damaged. Set the key "
            f"again, or discard it (db.changes().discard([{key!r:.80}])) to read the remote "
            "value."
        )

    def cache_fetched(self, records: list[tuple[bytes, bytes | memoryview, int]], head: str | None) -> None:
        """Write downloaded ``(encoded key, value, timestamp)`` records to the data file,
        but none over a local edit made while they downloaded, and none if they came
        from another head manifest than ``head``, the current one (then they are fetched
        again when read: values in the data file must come from the head the local
        mirror holds, see :meth:`OutsideWrites.record_data_state`)."""
        with self._rlock:
            if self._log.replace or self._remote.etag != head or not records or not self._local_writable:
                return  # else values are returned, not cached
            with self._batch, self._writing_snapshot() as alone:
                if not alone or (not self._journaling and not self._may_cache(head)):
                    return
                edits = self._log.edits
                records = [r for r in records if r[0] not in edits]
                if records:
                    append_records(self._data, records)
                    if self._pinned is not None:  # a snapshot's values: not the mirror's head
                        self._record_data_state(closed=False)

    @contextlib.contextmanager
    def _writing_snapshot(self) -> Iterator[bool]:
        """A reader of a snapshot: hold the writer lock (without waiting) around a write of
        its values and the record of the data file's state after them, so that no writer
        opens in between (it would take them for edits); yields whether it may write.
        Anyone else: yields ``True``."""
        if self._pinned is None or self._journaling:
            yield True
            return
        if not self._writer.acquire(0):
            yield False
            return
        try:
            yield True
        finally:
            self._writer.release()

    def _may_cache(self, head: str | None) -> bool:
        """Whether a reader may write values of the head ``head`` to the data file now (the
        batch lock held): they must be values of the copy's head (a snapshot's only while
        no writer has the copy open, see :meth:`_writing_snapshot`), and the journal is
        read again if the writer changed it, so that no edit is written over."""
        if self._pinned is None and self._mirror.stored_etag() != head:
            return False  # another process moved the copy's head: a refresh catches up
        try:
            self._log.reload()
        except IntegrityError:
            return False
        return True

    # ------------------------------------------------------------ the write path

    def _base(self, kb: bytes) -> bytes | None:
        """The remote md5 a new edit of ``kb`` replaces (no request is made):
        :func:`.local.new_base`."""
        edit = self._log.edits.get(kb)
        replacing = self._log.replace
        remote = self._remote.entry(kb, fetch=False) if edit is None and not replacing else None
        return new_base(edit, remote, replacing)

    def _bases(self, kbs: list[bytes]) -> list[bytes | None]:
        """:meth:`_base` of each of ``kbs`` (before any of them is journaled), the remote
        entries looked up shard by shard (:meth:`RemoteIndex.local_entries`)."""
        edits, replacing = self._log.edits, self._log.replace
        new = [kb for kb in kbs if kb not in edits] if not replacing else []
        remote = self._remote.local_entries(new) if new else {}
        return [new_base(edits.get(kb), remote.get(kb), replacing) for kb in kbs]

    def set_value(
        self, key: Any, kb: bytes, raw: bytes, md5: bytes, timestamp: int | None, retimed: bool = False
    ) -> None:
        """Journal and store an encoded value ``raw`` (md5 ``md5``) of ``key`` (encoded
        ``kb``) as a local edit; ``retimed``: only its timestamp changed."""
        with self._rlock:
            self._log.hold_edit(kb, md5, self._base(kb), retimed)
            self._store(kb, raw, timestamp)
            if not retimed:
                self._log.edits.mark_checked(kb, md5)

    def set_values(self, encoded: list[tuple[bytes, bytes, bytes]]) -> None:
        """Journal and store ``(encoded key, encoded value, md5)`` as local edits, in one
        write of the data file."""
        with self._rlock, self._batched():
            bases = self._bases([kb for kb, _, _ in encoded])
            self._log.record_edits((kb, m, b) for (kb, _, m), b in zip(encoded, bases, strict=True))
            append_records(self._data, [(kb, raw, None) for kb, raw, _ in encoded])
            for kb, _, m in encoded:
                self._log.edits.mark_checked(kb, m)

    def delete_value(self, key: Any, kb: bytes) -> None:
        """Journal the deletion of ``key`` (encoded ``kb``) and drop its local value."""
        with self._rlock, self._batched():
            self._log.record_edits([(kb, None, self._base(kb))])
            if key in self._data:
                del self._data[key]

    def drop_values(self, kbs: Iterable[bytes]) -> None:
        """Drop the local values of ``kbs`` from the data file (journaling nothing); a
        reader leaves those the writer has edited since it read the journal."""
        with self._rlock, self._batched():
            if not self._journaling and self._local_writable:
                self._log.reload()
                kbs = [kb for kb in kbs if kb not in self._log.edits]
            for kb in kbs:
                key = self.codec.decode_key(kb)
                if key in self._data:
                    del self._data[key]

    def clear(self) -> None:
        """Drop every local value and edit: the next push replaces the remote with an
        empty database (the user metadata keeps its pending edit)."""
        with self._rlock, self._data.alone():
            metadata_dirty = self._log.metadata_dirty
            self._log.reset()
            self._log.set_replace(True)
            if metadata_dirty:
                self._log.set_metadata_dirty(True)
            self._data.clear()
            self._record_data_state(closed=False)

    def set_metadata(self, data: Any) -> None:
        """Set the user metadata locally, as an edit to push."""
        with self._rlock:
            self._log.set_metadata_dirty(True)
            self._data.set_metadata(data)

    def metadata(self) -> Any:
        """The user metadata: the local edit if any, else the remote's."""
        if self._log.metadata_dirty or self._remote.manifest is None:
            return self._data.get_metadata()
        return self._remote.manifest.get("metadata")

    def local_timestamp(self, kb: bytes) -> int | None:
        """The timestamp of the local value of ``kb`` (``None``: none)."""
        return self._data.get_timestamp(self.codec.decode_key(kb))

    def settle(self, settled: list[tuple[bytes, Any]]) -> None:
        """Forget the edits of ``settled`` ``(encoded key, remote entry or None)``, equal
        to the remote's; the local copies take the remote timestamps."""
        for kb, entry in settled:
            key = self.codec.decode_key(kb)
            if entry is not None and key in self._data:
                self._data.set_timestamp(key, entry.timestamp)
        self._log.mark_clean(kb for kb, _ in settled)

    def prune(self) -> None:
        """Compact the data file."""
        with self._rlock:
            self._data.prune()
            self._record_data_state(closed=False)

    def find_outside_edits(self) -> int:
        """Make pending edits of the values in the whole data file written outside
        ebooklet (see :meth:`EBooklet.get_local_hash`); returns how many were found."""
        with self._rlock:
            found = self._outside.find_edits(
                self._data, self._data_path, self._log, self._remote, self.offline, self._remote.manifest
            )
            self._log.compact()
            self._record_data_state(closed=False)
            return found

    def record_push(self, kbs: list[bytes] | None, metadata: bool) -> None:
        """A push committed the edits of ``kbs`` (``None``: every edit) and the user
        metadata if ``metadata``."""
        self._log.pushed(kbs, metadata)
        self._meta.save(uuid=self.uuid, conditional_writes=self._conn.conditional_writes())

    def sync(self) -> None:
        """Flush the data file and the index mirror to disk."""
        with self._rlock:
            self._data.sync()
            self._mirror.sync()

    # ------------------------------------------------------------ attributes

    @property
    def conn(self) -> S3Connection | None:
        """The connection this copy syncs with (``None``: local only, or detached)."""
        return self._conn

    @property
    def remote(self) -> RemoteIndex:
        """The view of the remote: its manifest and index (a snapshot's when pinned)."""
        return self._remote

    @property
    def log(self) -> ChangeLog:
        """The journal of local edits (``P.local_hash``)."""
        return self._log

    @property
    def data(self) -> Any:
        """The data file ``P`` (a booklet file; values stored encoded)."""
        return self._data

    @property
    def mutex(self) -> threading.RLock:
        """The lock that makes each change of the local files one step for other threads."""
        return self._rlock

    @property
    def offline(self) -> bool:
        """Whether the remote is out of reach (or there is none)."""
        return self._offline

    @property
    def closed(self) -> bool:
        """Whether the local files are closed."""
        return self._closed

    @property
    def local_writable(self) -> bool:
        """Whether the local files can be written (flag 'r' on a read-only file system: no)."""
        return self._local_writable

    @property
    def pinned(self) -> dict | None:
        """The manifest of the snapshot opened with ``open(..., commit=)``, else ``None``."""
        return self._pinned

    @property
    def uuid(self) -> str:
        """The database's uuid (shared by every copy of it)."""
        return self._meta.data["uuid"]

    @property
    def holds_lock(self) -> bool:
        """Whether this copy holds the remote write lock now."""
        return self._lock is not None and self._lock.held

    # ------------------------------------------------------------ the remote

    def ensure_lock(self, timeout: float = 0.0) -> RemoteLock:
        """The remote write lock, taken (waiting at most ``timeout`` s) if not held.

        Raises:
            LockedError: another writer holds it.
        """
        if self._lock is None or not self._lock.held:
            self._lock = RemoteLock(self._conn, self._meta.owner_id, str(self.path.resolve()))
            self._lock.acquire(timeout)
        return self._lock

    @contextlib.contextmanager
    def holding_lock(self) -> Iterator[RemoteLock]:
        """The remote write lock for one operation that writes the remote (a push, a
        vacuum): taken if not held. With ``lock="open"`` it stays held until close;
        with ``lock="push"`` it is taken waiting at most the open's ``lock_timeout``,
        and released when the operation ends.

        Raises:
            LockedError: another writer holds it.
        """
        scoped = self.lock_scope == "push"
        taken_here = scoped and (self._lock is None or not self._lock.held)
        lock = self.ensure_lock(self._lock_timeout if scoped else 0.0)
        try:
            yield lock
        finally:
            if taken_here:
                self.release_lock()

    def release_lock(self) -> None:
        """Release the remote write lock if this copy holds it."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def pin(self, manifest: dict) -> None:
        """Show the snapshot ``manifest`` (a past commit's) instead of the head, for the
        rest of this session: refreshes keep it. Its index shards are read through the
        local mirror, whose head stays as it was."""
        self._pinned = manifest
        self._remote = RemoteIndex(self._conn, PinnedMirror(manifest, self._mirror))

    def keep_values_local(self) -> None:
        """Before the remote is deleted: every value this copy shows from its data file
        becomes a local edit, journaled against the remote version it equals (so that a
        push settles it while the remote lives: nothing changes if the deletion stops
        midway), and so does the remote's user metadata. A cached copy of an older
        version (not the head's) is dropped: the key is not that value any more."""
        self.check_local_writable("delete_remote")
        with self._rlock:
            self._become_writer()
            self._data.sync()
            edits = self._log.edits
            cached = [(kb, fmt.md5(raw)) for kb, _, raw in self.scan() if kb not in edits]
            remote = {} if self._log.replace else self._remote.entries(kb for kb, _ in cached)
            current = [(kb, m, m) for kb, m in cached if remote.get(kb) and remote[kb].md5 == m]
            self._log.record_edits(current)
            for kb, m in cached:
                if not (remote.get(kb) and remote[kb].md5 == m):
                    del self._data[self.codec.decode_key(kb)]
            manifest = self._remote.manifest
            if manifest is not None and not self._log.replace and not self._log.metadata_dirty:
                self._log.set_metadata_dirty(True)
                self._data.set_metadata(manifest.get("metadata"))

    def detach(self) -> None:
        """After the remote was deleted: a local-only copy whose values are all edits to
        push (none based on a remote version: the next push recreates the remote),
        without local deletions (nothing is left to delete) or a remote manifest."""
        with self._rlock:
            self._become_writer()
            edits = dict(self._log.edits.items())
            self._log.mark_clean(kb for kb, edit in edits.items() if edit.md5 is None)
            self._log.record_edits((kb, e.md5, None) for kb, e in edits.items() if e.md5 is not None)
            if self._log.replace:
                self._log.set_replace(False)
            self._remote.adopt(None, None)
            self._log.compact()
            self._conn = None
            self.codec.source = str(self.path)
            self._remote.conn = None
            self._offline = True

    # ------------------------------------------------------------ closing

    def _close_files(self) -> None:
        for closer in (
            lambda: self._data.close(),
            lambda: self._log.close(),
            lambda: self._mirror.close(),
        ):
            with contextlib.suppress(AttributeError):
                closer()
        self.release_lock()

    def _close_locks(self) -> None:
        """Close the lock files (which releases the writer lock)."""
        for lock in (self._batch, self._writer):
            if lock is not None:
                lock.close()
        self.claims.close()

    def close(self) -> None:
        """Flush and close the local files and release the remote write lock."""
        if self._closed:
            return
        try:
            self._log.close()  # its close record first: P.ebk.json says closed only after it
            self._record_data_state(closed=True)
        finally:
            self._closed = True
            self._close_files()
            self._close_locks()

def _open_wait(conn: S3Connection | None, remote_timeout: float | None) -> float | None:
    """Seconds the open's manifest GET may take: ``remote_timeout``, else
    :data:`OPEN_WAIT` (or the connection's ``timeout`` when shorter)."""
    if conn is None:
        return None
    return remote_timeout if remote_timeout is not None else min(OPEN_WAIT, conn.timeout)


def _local_files_writable(path: Path, flag: str) -> bool:
    """Whether the local files of ``path`` (and their directory) can be written.

    Only flag ``'r'`` opens local files that cannot be written (a read-only file system,
    or no permission), and only when the data file exists.

    Raises:
        ReadOnlyError: another flag, or no data file to read.
    """
    folder = path.parent
    if (os.access(folder, os.W_OK) or not folder.exists()) and all(
        os.access(p, os.W_OK) or not p.exists() for p in local_paths(path)
    ):
        return True
    why = "read-only file system, or no permission"
    if flag != "r":
        raise ReadOnlyError(
            f"The local files of {path} cannot be written ({why}): open them with flag 'r' "
            "to read, or use a file path where you can write."
        )
    if not path.exists():
        raise ReadOnlyError(
            f"{path} does not exist and cannot be created ({why}): use a file path where "
            "you can write."
        )
    return False


def _copy_locks(
    path: Path, local_writable: bool, writable: bool, timeout: float | None
) -> tuple[FileLock | None, FileLock | None]:
    """The batch lock and the writer lock of the copy at ``path`` (none when its local
    files cannot be written); a writer takes the writer lock, waiting at most ``timeout``
    seconds (``None``: as long as it takes).

    Raises:
        booklet.LockTimeoutError: another process has the copy open with a write flag.
    """
    if not local_writable:
        return None, None
    batch_path, writer_path = lock_paths(path)
    batch, writer = FileLock(batch_path), FileLock(writer_path)
    if writable and not writer.acquire(timeout):
        batch.close()
        writer.close()
        raise booklet.LockTimeoutError(
            f"{path} is open for writing in another process (one writer at a time); waited "
            f"{timeout} s. Close it there, open with flag 'r' to read alongside it, or pass a "
            "longer timeout."
        )
    return batch, writer


def _open_data(
    path: Path, codec: Codec, n_buckets: int, buffer_size: int, timeout: float | None,
    writable: bool = True, batch_lock: FileLock | None = None,
):
    ks, vs = codec.key_serializer, codec.value_serializer
    if not path.exists():
        # Create with serializer names, so that the file records booklet's codes and plain
        # booklet.open(path) can read it (a class is recorded as "custom": code 0).
        ks, vs = serializers.booklet_spec(ks), serializers.booklet_spec(vs)
    try:
        return DataFile(
            str(path), "c" if writable else "r", batch_lock, key_serializer=ks, value_serializer=vs,
            n_buckets=n_buckets, buffer_size=buffer_size, timeout=timeout,
        )
    except booklet.LockTimeoutError:
        raise
    except Exception as exc:
        raise IntegrityError(
            f"{path} cannot be opened as a booklet file ({type(exc).__name__}: {exc}). "
            "Move it away: whatever was pushed is safe remotely, and reopening "
            "downloads it again."
        ) from None
