"""`Replica`: one open local copy of one remote database.

A replica owns the local files (the data file, :class:`ChangeLog`, :class:`IndexMirror`,
:class:`LocalMeta`), the view of the remote (:class:`RemoteIndex`), the codec (the key and
value serializers), the mutex and the remote write lock. It opens them (reconciling what
was written to the data file outside ebooklet), keeps the remote view fresh, pins a
snapshot, detaches from a deleted remote, and closes them. The read path
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
from booklet import utils as bk_utils

from . import format as fmt
from . import serializers
from ._booklet_io import DataFile, append_records, data_changed_from, data_state, deleted_last, scan
from .connection import S3Connection, check_seconds, connection_from
from .errors import (
    EBookletError,
    IntegrityError,
    OfflineError,
    OfflineWarning,
    ReadOnlyError,
    RemoteNotFoundError,
    ScanInterrupted,
    SerializationError,
)
from .local import UNKNOWN_MD5, ChangeLog, IndexMirror, LocalMeta, found_edit, local_paths, new_base
from .lock import RemoteLock
from .remote import RemoteIndex

logger = logging.getLogger("ebooklet")

FLAGS = ("r", "w", "c", "n")
_HEADER_SERIALIZERS = {"value_serializer": slice(29, 31), "key_serializer": slice(31, 33)}
"""Where a booklet file's header records its serializers' codes (2 bytes little-endian each)."""
_HEADER_END = 33
_PLAIN_KEYS = frozenset({str, bytes, int})
"""Types of decoded keys known to be hashable: any other is hashed once to check it."""
LARGE_VALUE = 4 << 20
"""A value longer than this goes into the data file without booklet's copies of it."""
_LOCATION = ("bucket", "db_key", "endpoint_url", "db_url")
"""The fields of ``S3Connection.public_params()`` that say which remote it is."""
NEW_KEY_SERIALIZER = "str"
NEW_VALUE_SERIALIZER = None
"""The serializers of a new database when open() is given none (bytes values)."""
OPEN_WAIT = 5.0
"""Seconds :func:`open` waits at most for the remote's manifest, all tries together,
before it works offline from the local files (``remote_timeout`` changes it)."""


class Replica:
    """One open local copy of one remote (or of none: local only).

    Opening it (``Replica(remote, file_path, flag, ...)``, as :func:`ebooklet.open` does)
    reads the remote manifest, reconciles the local files and takes the remote write lock
    when writable. Fixed for its life: ``path``, ``flag``, ``writable``, ``local_writable``,
    ``log`` (the :class:`ChangeLog`) and ``data`` (the booklet data file).

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
    ) -> None:
        if not isinstance(flag, str) or flag not in FLAGS:
            raise ValueError(f"flag must be one of 'r', 'w', 'c', 'n', not {flag!r}.")
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
        self._offline = conn is None
        self._conn = conn
        self._rlock = threading.RLock()
        self._closed = True
        self._lock: RemoteLock | None = None
        self._pinned: dict | None = None  # open(..., commit=): the snapshot's manifest
        self._found_unsaved = False  # edits found in the data file that only memory holds
        self._recorded: dict | None = None  # the data file's state the last session recorded
        # False: flag 'r' on local files that cannot be written (a read-only file
        # system): nothing is written, values fetched are returned without being cached
        self._local_writable = _local_files_writable(self.path, flag)
        data_path, log_path, mirror_path, meta_path = local_paths(self.path)
        # The index mirror is opened first: its file lock keeps other processes off
        # the whole set of local files while this open decides what to do with them.
        self._mirror = IndexMirror(mirror_path, self._local_writable, timeout=timeout)
        self._remote = RemoteIndex(conn, self._mirror)
        try:
            fresh = flag == "n"  # a damaged journal or metadata is replaced, not read
            self._meta = LocalMeta(meta_path, damaged_ok=fresh)
            self._recorded = self._meta.data_state  # see _record_data_state
            closed = self._recorded is not None and self._recorded["closed"]
            try:
                self._log = ChangeLog(
                    log_path, self._local_writable, damaged_ok=fresh, expect_closed=closed and not fresh
                )
            except IntegrityError:
                self._mark_session_open()  # said once: the next open starts a new journal
                raise
            if not fresh:
                self._mark_session_open()
            local_exists = data_path.exists() and not fresh
            if not fresh:
                self._check_same_remote(conn)
            # Values cached in the data file came from this manifest (see _record_data_state).
            cached_from = self._remote.manifest
            self._written_outside = local_exists and _stat_changed(data_path, self._recorded)
            self._refresh_at_open(flag, local_exists, _open_wait(conn, remote_timeout))
            if pin is not None:
                pin(self)
            if conn is not None and conn.writable and "conditional_writes" in self._meta.data:
                conn.remember_conditional_writes(self._meta.data["conditional_writes"])
            self._take_remote_lock(lock_timeout)
            if fresh:
                self._start_afresh(data_path, log_path)
            self._init_serializers(key_serializer, value_serializer, trust_serializers)
            # The local index is sized by the caller's n_buckets only, never from the
            # remote's n_keys: a manifest claiming 10**9 keys made a 12 GB file (booklet
            # grows its index as keys arrive).
            kept = local_exists and data_path.exists()  # not dropped for a foreign remote
            self._data = _open_data(
                data_path, self._ks, self._vs, n_buckets, buffer_size, timeout, self._local_writable
            )
            self._data.before_write = self._log.flush  # the journal reaches the disk first
            self._data_path = data_path
            if not local_exists and flag != "n":
                self._forget_lost_values()
            self._closed = False
            if kept:
                self._reconcile_at_open(cached_from)
            self._meta.data.setdefault("uuid", uuid.uuid4().hex)
            self._meta.data.update(
                remote=conn.public_params() if conn else self._meta.data.get("remote"),
                key_serializer=self._ks_name,
                value_serializer=self._vs_name,
                n_buckets=n_buckets,
            )
            self._record_data_state(closed=False, always=True)
        except BaseException:
            self._close_files()
            self._unmark_session_open()
            raise

    def _take_remote_lock(self, lock_timeout: float) -> None:
        conn = self._conn
        if self.writable and conn is not None and conn.writable and not self.offline:
            self._lock = RemoteLock(conn, self._meta.owner_id, str(self.path.resolve()))
            self._lock.acquire(lock_timeout)
            if self._lock.contended:
                self.refresh()  # the writer we waited for may have committed meanwhile

    def _start_afresh(self, data_path: Path, log_path: Path) -> None:
        """Flag 'n', both locks held: an empty copy that replaces the remote at the next push."""
        self._mark_session_open()
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
                stacklevel=4,
            )
            self._log.mark_clean(lost)

    # ------------------------------------------------------------ writes made outside ebooklet

    def _reconcile_at_open(self, cached_from: dict | None) -> None:
        """Find what was written to the data file since ebooklet last recorded its state
        (with plain booklet, or by a process killed before its journal records reached
        the disk) and make it pending edits, before anything reads the file.

        ``cached_from``: the head manifest the local mirror held at open, which every
        value cached since the recorded state came from (see :meth:`_record_data_state`).
        """
        recorded = self._recorded
        clean = recorded is not None and recorded["closed"]
        current = data_state(self._data, self._data_path)
        start = data_changed_from(recorded, current)
        if start is not None:
            self._find_outside_edits(cached_from, start)
        if not clean:
            self._forget_unwritten_edits()
        elif start is not None:
            deleted = self._delete_absent_edits(shrunk=current["size"] < recorded["size"])
            self._warn_cached_deletions(recorded["n_keys"] - len(self._data) - deleted)

    def _find_outside_edits(self, cached_from: dict | None, start: int) -> int:
        """Make pending edits of the live records at or after ``start`` (0: the whole
        data file) that hold neither a pending edit's value nor a value of
        ``cached_from``; returns how many were found."""
        edits = self._log.edits
        records = [(kb, ts, fmt.md5(raw)) for kb, ts, raw in scan(self._data, self._data_path, True, start)]
        entries = self._reference_entries([kb for kb, _, _ in records if kb not in edits], cached_from)
        found = []
        for kb, ts, md5_ in records:
            edit = found_edit(md5_, ts, edits.get(kb), entries.get(kb), whole_file=start == 0)
            if edit is not None:
                found.append((kb, *edit))
        self._note_edits(found)
        return len(found)

    def _reference_entries(self, kbs: list[bytes], manifest: dict | None) -> dict[bytes, Any]:
        """The entries of ``kbs`` in ``manifest``, fetching shards when online (those of
        the head if a vacuum removed ``manifest``'s); offline, :data:`MISSING_SHARD` for
        a key whose shard is not local."""
        if not kbs or self._log.replace or manifest is None:
            return dict.fromkeys(kbs)
        if not self.offline:
            for which in (manifest, self._remote.manifest):
                try:
                    return self._remote.entries(kbs, which)
                except RemoteNotFoundError:
                    continue
                except OfflineError:
                    break
        return {kb: self._remote.entry(kb, fetch=False, manifest=manifest) for kb in kbs}

    def _absent_edits(self) -> list[bytes]:
        """Keys with a pending value that the data file does not hold."""
        return [
            kb for kb, edit in self._log.edits.items()
            if edit.md5 is not None and self.decode_key(kb) not in self._data
        ]

    def _delete_absent_edits(self, shrunk: bool) -> int:
        """After a clean close: a pending value gone from the data file whose last record
        there is marked deleted was deleted outside ebooklet (booklet's ``del``), which
        makes it a pending deletion. Returns how many.

        Any other absent value was lost by damage (no record left: the file was cut;
        its record live but out of booklet's reach: a garbled index), and so is any when
        the file is shorter than recorded (``shrunk``: cut, or pruned with booklet, which
        drops the deleted records): the edit stays pending, and reading or pushing the
        key raises IntegrityError (set it again or discard it), never a silent deletion.
        """
        absent = self._absent_edits()
        if not absent or shrunk:
            return 0
        deleted = deleted_last(self._data, self._data_path, absent)
        self._note_edits([(kb, None, self._log.edits[kb].base) for kb in absent if kb in deleted])
        return len(deleted)

    def _forget_unwritten_edits(self) -> None:
        """After a killed session: a pending value the data file does not hold never
        reached it (journaled first, lost with booklet's write buffer); forget the edit,
        the key reads the remote again. Flag 'r' leaves the journal as it is."""
        lost = self._absent_edits()
        if not lost:
            return
        if not self.writable:
            self._found_unsaved = True  # the next writable open does it
            return
        warnings.warn(
            f"{self.path} was not closed cleanly: {len(lost)} unpushed value(s) never reached "
            "it; those keys read the remote version again.",
            RuntimeWarning,
            stacklevel=5,
        )
        self._log.mark_clean(lost)

    def _warn_cached_deletions(self, at_least: int) -> None:
        """Tell that values cached from the remote were deleted outside ebooklet: booklet
        marks a deletion in place, so which keys cannot be known (only that booklet's key
        count dropped by more than the pending edits explain)."""
        if at_least > 0:
            warnings.warn(
                f"At least {at_least} value(s) cached from the remote were deleted from "
                f"{self.path} outside ebooklet. Such deletions cannot be told key by key, so "
                "they are not pending: those keys read the remote again. Delete keys with "
                "ebooklet (del db[key]) to delete them remotely.",
                RuntimeWarning,
                stacklevel=5,
            )

    def _note_edits(self, edits: list[tuple[bytes, bytes | None, bytes | None]]) -> None:
        """Journal edits found or resolved; flag 'r' holds them in memory for this session
        (reads return the local value, downloads do not overwrite it) and leaves the
        data file's recorded state as it was, so that the next open finds them again."""
        if not edits:
            return
        if self.writable:
            self._log.record_edits(edits)
        else:
            self._log.remember_edits(edits)
            self._found_unsaved = True

    def _mark_session_open(self) -> None:
        """Before anything is appended to the journal, make ``P.ebk.json`` stop saying
        that the last session closed cleanly (the state it recorded stays, for the
        reconciliation): from here on, a journal that does not end with its close record
        is one this process was killed writing, not one cut after a clean close (see
        :class:`ChangeLog`, ``expect_closed``)."""
        recorded = self._recorded
        if self._local_writable and recorded is not None and recorded["closed"]:
            self._meta.save(data_state={**recorded, "closed": False})

    def _unmark_session_open(self) -> None:
        """An open failed: if the journal ends with its close record again (see
        :meth:`ChangeLog.close`), ``P.ebk.json`` says again that the last session closed
        cleanly, as before :meth:`_mark_session_open`."""
        recorded = self._recorded
        log = getattr(self, "_log", None)
        if log is None or not log.ends_closed or not (recorded and recorded["closed"]):
            return
        if self._local_writable and self._meta.data.get("data_state") != recorded:
            self._meta.save(data_state=recorded)

    def _record_data_state(self, closed: bool, always: bool = False) -> None:
        """Record the data file's state (:func:`_booklet_io.data_state`) in ``P.ebk.json``, and
        whether this session is closing the file, so that the next open reads only what
        was written after it. Called where every value in the file is a pending edit's
        or a value of the head manifest held by the local mirror: at open (after the
        reconciliation), before a new head is adopted, after each write of a snapshot's
        values, after a prune or a clear, at close. While edits found in the file are held
        in memory only, the state recorded at open stays, restored as it was at close (see
        :meth:`_mark_session_open`). ``always``: save ``P.ebk.json`` even if nothing changed."""
        if not self._local_writable:  # flag 'r' on files that cannot be written
            return
        fields = {}
        state = self._state_to_record(closed)
        if state is not None and state != self._meta.data.get("data_state"):
            fields["data_state"] = state
        if fields or always:
            self._meta.save(**fields)

    def _state_to_record(self, closed: bool) -> dict | None:
        """The ``data_state`` for :meth:`_record_data_state`; ``None``: leave it as it is."""
        if self._closed:
            return None
        if self._found_unsaved:
            return self._recorded if closed else None
        return {**data_state(self._data, self._data_path), "closed": closed}

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
        if data_path.exists():
            data_path.unlink()

    def _init_serializers(self, key_serializer: Any, value_serializer: Any, trust_serializers: Any) -> None:
        """Choose the serializers: the caller's for a new database, else those the
        database records, as far as :func:`serializers.choose` allows (see docs/security.md).

        The remote manifest is not the caller's: a serializer it names that can run code
        or inflate is used only when passed to open(), allowed by ``trust_serializers``,
        or remembered in ``P.ebk.json`` from an open of the same remote that allowed it.
        ``P.ebk.json`` itself is the user's file: a database with no remote manifest (local
        only, or about to replace its remote) uses what it records.
        """
        trusted = serializers.trusted_names(trust_serializers)
        manifest = self._remote.manifest
        replacing = self.flag == "n" or self._log.replace
        recorded = manifest if manifest is not None and not replacing else self._meta.data
        header = _header_serializers(local_paths(self.path)[0])
        if self.flag == "n" or "key_serializer" not in recorded:
            self._ks, self._ks_name = _unrecorded("key_serializer", key_serializer, header)
            self._vs, self._vs_name = _unrecorded("value_serializer", value_serializer, header)
            self._check_header(
                header, "open()'s arguments",
                "Leave the serializer arguments out to use the file's own.",
            )
            return
        user_owned = recorded is self._meta.data
        where = f"{self.path} (its {self._meta.path.name})" if user_owned else repr(self._conn)
        remembered = {} if user_owned else self._remembered_serializers()

        def choose(field: str, given: Any) -> tuple[Any, str | None]:
            allowed = True if user_owned or trusted is True else trusted | remembered.get(field, set())
            return serializers.choose(field, recorded[field], given, allowed, where)

        self._ks, self._ks_name = choose("key_serializer", key_serializer)
        self._vs, self._vs_name = choose("value_serializer", value_serializer)
        if user_owned:
            remedy = (
                f"If {self._meta.path.name} was edited, restore it, or delete it to use the "
                "file's own serializers."
            )
        else:
            remedy = (
                f"Move {self.path} and its {self.path.name}.* files away (whatever was pushed "
                "is safe remotely): reopening downloads the database again."
            )
        self._check_header(header, where, remedy)

    def _check_header(self, header: dict[str, Any] | None, chosen_by: str, remedy: str) -> None:
        """Refuse serializers (chosen by ``chosen_by``) that differ from those the data
        file's header records (``None``: no data file); see :func:`serializers.check_header`."""
        if header is None:
            return
        for field, cls in (("key_serializer", self._ks), ("value_serializer", self._vs)):
            serializers.check_header(field, header[field], cls, str(self.path), chosen_by, remedy)

    def _remembered_serializers(self) -> dict[str, set]:
        """``{field: {name}}`` that ``P.ebk.json`` records for this very remote (opened
        without a remote: for the remote it last synced with). It records only serializers
        this copy was allowed to use (:meth:`_init_serializers` runs before it is saved),
        so each was the caller's choice once."""
        known = self._meta.data.get("remote")
        if self._conn is not None:
            mine = self._conn.public_params()
            if not isinstance(known, dict) or any(known.get(f) != mine[f] for f in _LOCATION):
                return {}
        return {f: {self._meta.data[f]} for f in ("key_serializer", "value_serializer") if f in self._meta.data}

    def refresh(self, wait: float | None = None) -> bool:
        """Adopt the newest remote manifest, first resolving unknown bases of edits.

        ``wait``: seconds the manifest GET may take, all tries together (``None``: the
        connection's timeouts and retries).
        """
        if self._pinned is not None:
            return False  # a snapshot (open(..., commit=)) stays at its commit
        old_manifest = self._remote.manifest
        manifest, etag = self._remote.fetch_manifest(wait)
        # Resolve even when the head is unchanged: a key edited before its shard was
        # fetched must not look like a conflict at the next push.
        unknown = [k for k, e in self._log.edits.items() if e.base == UNKNOWN_MD5]
        if unknown and self._local_writable:  # else resolved by the next writable open
            entries = self._remote.entries(unknown, old_manifest)
            self._note_edits(
                [(k, self._log.edits[k].md5, new_base(None, e, False)) for k, e in entries.items()]
            )
        if etag == self._remote.etag and (manifest is None) == (old_manifest is None):
            self._offline = False
            return False
        with self._rlock:
            # Values cached from now on come from the new head: the next open tells them
            # from edits made outside against the manifest it finds in the mirror.
            self._record_data_state(closed=False)
            self._remote.adopt(manifest, etag)
        self._offline = False
        return True

    # ------------------------------------------------------------ encoding

    def encode_key(self, key: Any) -> bytes:
        """``key`` encoded by the key serializer.

        Raises:
            SerializationError: the serializer refuses it or returns no bytes.
        """
        try:
            kb = self._ks.dumps(key)
        except Exception as exc:
            raise SerializationError(_bad_key_message(key, self._ks, self._ks_name, exc)) from None
        if not isinstance(kb, bytes):
            raise SerializationError(_bad_key_message(key, self._ks, self._ks_name))
        return kb

    def encode_value(self, value: Any) -> bytes:
        """``value`` encoded by the value serializer.

        Raises:
            SerializationError: the serializer refuses it or returns no bytes.
        """
        try:
            raw = self._vs.dumps(value)
        except Exception as exc:
            raise SerializationError(
                f"Value of type {type(value).__name__} cannot be encoded by the value "
                f"serializer {self._vs_name!r}: {exc}"
            ) from None
        if not isinstance(raw, bytes):
            if self._vs is serializers.BYTES:
                raise SerializationError(
                    f"{self.path} stores bytes values (value_serializer=None), and a value of "
                    f"type {type(value).__name__} is not bytes. Encode it yourself, or choose "
                    "a serializer when creating the database: ebooklet.open(remote, path, 'n', "
                    "value_serializer='orjson') for JSON-like data, 'pickle' for any Python "
                    "object (its readers must then allow pickle)."
                )
            raise SerializationError(f"The value serializer returned {type(raw).__name__}, not bytes.")
        return raw

    def decode_value(self, raw: bytes) -> Any:
        """The value encoded as ``raw``.

        Raises:
            SerializationError: the value serializer fails on it.
        """
        try:
            return self._vs.loads(raw)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(
                f"A value of {self.path} cannot be decoded by its value serializer "
                f"{self._vs_name!r} ({type(exc).__name__}: {exc})."
            ) from None

    def decode_key(self, kb: bytes) -> Any:
        """The key encoded as ``kb`` (from the remote index, a pack footer or the local
        files), decoded by the key serializer.

        Raises:
            IntegrityError: the serializer fails on ``kb`` (in any way: invalid text,
                nesting too deep, a number too long...) or decodes it to an unhashable
                value, which cannot be a key.
        """
        try:
            key = self._ks.loads(kb)
            if type(key) not in _PLAIN_KEYS:
                hash(key)
            return key
        except Exception as exc:
            where = self._conn.db_url if self._conn is not None else str(self.path)
            raise _undecodable_key(kb, self._ks_name, where, exc) from None

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
            cached = self.cached(self.decode_key(kb))
            if cached is not None:
                yield kb, *cached

    def damaged_edit(self, kb: bytes, present: bool) -> IntegrityError:
        """The error for a local edit whose value in the data file is missing (``present``
        false) or is not the value that was journaled."""
        key = self.decode_key(kb)
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
        mirror holds, see :meth:`_record_data_state`)."""
        with self._rlock:
            if self._log.replace or self._remote.etag != head:
                return
            edits = self._log.edits
            records = [r for r in records if r[0] not in edits]
            if records and self._local_writable:  # else values are returned, not cached
                append_records(self._data, records)
                if self._pinned is not None:  # a snapshot's values: not the mirror's head
                    self._record_data_state(closed=False)

    # ------------------------------------------------------------ the write path

    def _base(self, kb: bytes) -> bytes | None:
        """The remote md5 a new edit of ``kb`` replaces (no request is made):
        :func:`.local.new_base`."""
        edit = self._log.edits.get(kb)
        replacing = self._log.replace
        remote = self._remote.entry(kb, fetch=False) if edit is None and not replacing else None
        return new_base(edit, remote, replacing)

    def set_value(
        self, key: Any, kb: bytes, raw: bytes, md5: bytes, timestamp: int | None, retimed: bool = False
    ) -> None:
        """Journal and store an encoded value ``raw`` (md5 ``md5``) of ``key`` (encoded
        ``kb``) as a local edit; ``retimed``: only its timestamp changed."""
        with self._rlock:
            self._log.hold_edit(kb, md5, self._base(kb), retimed)
            self._store(kb, raw, timestamp)
            if not retimed:
                self._log.checked[kb] = md5

    def set_values(self, encoded: list[tuple[bytes, bytes, bytes]]) -> None:
        """Journal and store ``(encoded key, encoded value, md5)`` as local edits, in one
        write of the data file."""
        with self._rlock:
            self._log.record_edits((kb, m, self._base(kb)) for kb, _, m in encoded)
            append_records(self._data, [(kb, raw, None) for kb, raw, _ in encoded])
            self._log.checked.update((kb, m) for kb, _, m in encoded)

    def delete_value(self, key: Any, kb: bytes) -> None:
        """Journal the deletion of ``key`` (encoded ``kb``) and drop its local value."""
        with self._rlock:
            self._log.record_edits([(kb, None, self._base(kb))])
            if key in self._data:
                del self._data[key]

    def drop_values(self, kbs: Iterable[bytes]) -> None:
        """Drop the local values of ``kbs`` from the data file (journaling nothing)."""
        with self._rlock:
            for kb in kbs:
                key = self.decode_key(kb)
                if key in self._data:
                    del self._data[key]

    def clear(self) -> None:
        """Drop every local value and edit: the next push replaces the remote with an
        empty database (the user metadata keeps its pending edit)."""
        with self._rlock:
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
        return self._data.get_timestamp(self.decode_key(kb))

    def settle(self, settled: list[tuple[bytes, Any]]) -> None:
        """Forget the edits of ``settled`` ``(encoded key, remote entry or None)``, equal
        to the remote's; the local copies take the remote timestamps."""
        for kb, entry in settled:
            key = self.decode_key(kb)
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
            found = self._find_outside_edits(self._remote.manifest, 0)
            self._log.compact()
            self._record_data_state(closed=False)
            return found

    def record_push(self, kbs: list[bytes], metadata: bool) -> None:
        """A push committed the edits of ``kbs`` (and the user metadata if ``metadata``)."""
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
    def key_serializer_name(self) -> str | None:
        """The key serializer's name as manifests record it."""
        return self._ks_name

    @property
    def value_serializer_name(self) -> str | None:
        """The value serializer's name as manifests record it."""
        return self._vs_name

    @property
    def uuid(self) -> str:
        """The database's uuid (shared by every copy of it)."""
        return self._meta.data["uuid"]

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
        self._remote = RemoteIndex(self._conn, _PinnedMirror(manifest, self._mirror))

    def keep_values_local(self) -> None:
        """Before the remote is deleted: every value this copy shows from its data file
        becomes a local edit, journaled against the remote version it equals (so that a
        push settles it while the remote lives: nothing changes if the deletion stops
        midway), and so does the remote's user metadata. A cached copy of an older
        version (not the head's) is dropped: the key is not that value any more."""
        self.check_local_writable("delete_remote")
        with self._rlock:
            self._data.sync()
            edits = self._log.edits
            cached = [(kb, fmt.md5(raw)) for kb, _, raw in self.scan() if kb not in edits]
            remote = {} if self._log.replace else self._remote.entries(kb for kb, _ in cached)
            current = [(kb, m, m) for kb, m in cached if remote.get(kb) and remote[kb].md5 == m]
            self._log.record_edits(current)
            for kb, m in cached:
                if not (remote.get(kb) and remote[kb].md5 == m):
                    del self._data[self.decode_key(kb)]
            manifest = self._remote.manifest
            if manifest is not None and not self._log.replace and not self._log.metadata_dirty:
                self._log.set_metadata_dirty(True)
                self._data.set_metadata(manifest.get("metadata"))

    def detach(self) -> None:
        """After the remote was deleted: a local-only copy whose values are all edits to
        push (none based on a remote version: the next push recreates the remote),
        without local deletions (nothing is left to delete) or a remote manifest."""
        with self._rlock:
            edits = dict(self._log.edits)
            self._log.mark_clean(kb for kb, edit in edits.items() if edit.md5 is None)
            self._log.record_edits((kb, e.md5, None) for kb, e in edits.items() if e.md5 is not None)
            if self._log.replace:
                self._log.set_replace(False)
            self._remote.adopt(None, None)
            self._log.compact()
            self._conn = None
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

class _PinnedMirror:
    """The mirror of a snapshot (see ``remote.Mirror``): the pinned manifest in memory,
    shards through the real mirror ``base``. Index shards are immutable and named by the
    commit that wrote them, so the local ``P.remote_index`` can share them; its head is
    never changed."""

    def __init__(self, manifest: dict, base: IndexMirror):
        self._manifest: tuple[dict | None, str | None] = (manifest, None)
        self._base = base

    def get_manifest(self) -> tuple[dict | None, str | None]:
        return self._manifest

    def set_manifest(self, manifest: dict | None, etag: str | None) -> None:
        self._manifest = (manifest, etag)

    def get_shard(self, name: str) -> bytes | None:
        return self._base.get_shard(name)

    def set_shard(self, name: str, data: bytes) -> None:
        self._base.set_shard(name, data)

    def drop_shards(self, names: Iterable[str]) -> None:
        pass


def _bad_key_message(key: Any, ks: Any, ks_name: str | None, error: Exception | None = None) -> str:
    """Why ``key`` is not a key of a database with key serializer ``ks`` (which raised
    ``error``, or returned no bytes), and what to do."""
    kind = serializers.key_type(ks)
    named = ks_name is not None or ks is serializers.BYTES  # None names the bytes one too
    serializer = repr(ks_name) if named else "a custom class"
    if kind:
        must = f"are {kind} (key serializer {serializer})"
    else:
        why = f"{type(error).__name__}: {error}" if error is not None else "it returned no bytes"
        must = f"must be what their key serializer, {serializer}, encodes ({why})"
    return (
        f"Key {key!r:.60} is of type {type(key).__name__}: keys of this database {must}. "
        "Convert the key (str(key), for instance), or create the database with another "
        "key serializer: ebooklet.open(..., 'n', key_serializer='orjson') takes str and "
        "int keys (see booklet.available_serializers)."
    )


def _undecodable_key(kb: bytes, ks_name: str | None, where: str, exc: Exception) -> EBookletError:
    """The error for key bytes ``kb`` of database ``where`` that its key serializer fails to
    decode (``exc``): the serializer cannot run here, or the bytes are not a key of it."""
    if isinstance(exc, (ImportError, NameError)):
        return SerializationError(
            f"The key serializer {ks_name!r} of {where} cannot run here ({exc}): install the "
            "package it needs (e.g. msgpack, numpy) to read this database."
        )
    shown = f"{bytes(kb[:40])!r}{'...' if len(kb) > 40 else ''}"
    return IntegrityError(
        f"Key bytes {shown} in the index of {where} cannot be decoded by key serializer "
        f"{ks_name!r} ({type(exc).__name__}: {str(exc)[:200]}): the database is damaged or "
        "not written with that serializer. Its keys cannot be listed until whoever writes it "
        "repairs it; the values of other keys can still be read by key."
    )


def _stat_changed(path: Path, recorded: dict | None) -> bool:
    """Whether the data file may have been written since its state was ``recorded``
    (by size, modification time and inode, without opening it)."""
    if recorded is None:
        return True
    stat = os.stat(path)
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino) != (
        recorded["size"], recorded["mtime_ns"], recorded["inode"]
    )


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
    files = [p for p in local_paths(path) if p.exists()]
    folder = path.parent
    if (os.access(folder, os.W_OK) or not folder.exists()) and all(os.access(p, os.W_OK) for p in files):
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


def _header_serializers(path: Path) -> dict[str, Any] | None:
    """The serializers the header of the booklet file ``path`` records, as
    :func:`serializers.header_name` gives them (``None``: no such file, or not a booklet
    file, which opening it then reports)."""
    try:
        with path.open("rb") as file:
            head = file.read(_HEADER_END)
    except OSError:
        return None
    if len(head) < _HEADER_END or head[: len(bk_utils.uuid_variable_blt)] != bk_utils.uuid_variable_blt:
        return None
    where = f"The header of {path}"
    return {
        field: serializers.header_name(int.from_bytes(head[at], "little"), field, where)
        for field, at in _HEADER_SERIALIZERS.items()
    }


def _unrecorded(field: str, given: Any, header: dict[str, Any] | None) -> tuple[Any, str | None]:
    """The serializer for ``field`` when neither the remote nor ``P.ebk.json`` records one:
    the caller's, else the data file header's, else the default.

    Raises:
        SerializationError: the header records a custom class and none was given.
    """
    if given is serializers.UNSET:
        if header is None:
            given = NEW_KEY_SERIALIZER if field == "key_serializer" else NEW_VALUE_SERIALIZER
        elif header[field] == serializers.HEADER_CUSTOM:
            raise SerializationError(
                f"The data file was written with a custom {field} class (its header records "
                f"booklet's code 0): pass that class to open() as {field}= to read it."
            )
        else:
            given = header[field]
    return serializers.resolve(given, field)


def _open_data(
    path: Path, ks: Any, vs: Any, n_buckets: int, buffer_size: int, timeout: float | None,
    writable: bool = True,
):
    if not path.exists():
        # Create with serializer names, so that the file records booklet's codes and plain
        # booklet.open(path) can read it (a class is recorded as "custom": code 0).
        ks, vs = serializers.booklet_spec(ks), serializers.booklet_spec(vs)
    try:
        return DataFile(
            str(path), "c" if writable else "r", key_serializer=ks, value_serializer=vs,
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
