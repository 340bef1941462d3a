"""`EBooklet`, the dict-like database, and :func:`open`."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, MutableMapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import booklet
from booklet import utils as bk_utils

from . import format as fmt
from . import serializers
from ._booklet_io import append_records, data_changed_from, data_state, deleted_last, scan
from .changes import Changes
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
from .format import Entry
from .local import (
    UNKNOWN_MD5,
    ChangeLog,
    IndexMirror,
    LocalMeta,
    found_edit,
    local_paths,
    local_side,
    new_base,
    remote_md5,
)
from .lock import RemoteLock
from .remote import MISSING_SHARD, RemoteIndex

logger = logging.getLogger("ebooklet")
_T = TypeVar("_T")

FLAGS = ("r", "w", "c", "n")
_CHUNK = 1000
_CHUNK_BYTES = 8 << 20
"""items() downloads the values it lacks in batches of about this many bytes."""
_ABSENT = object()  # "no such key", told from any value a get may return
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


class EBooklet(MutableMapping):
    """A key/value database in a local booklet file, kept in sync with S3.

    Open one with :func:`ebooklet.open`. Reads prefer local edits, then the
    newest remote version (fetched once, then cached); writes stay local until
    ``changes().push()``. Thread-safe.
    """

    def __init__(self) -> None:  # built by open(); see _open
        raise TypeError("Use ebooklet.open(remote, file_path, flag) to open a database.")

    # ------------------------------------------------------------ opening

    @classmethod
    def _open(
        cls,
        remote: S3Connection | str | None,
        file_path: str | os.PathLike,
        flag: str,
        value_serializer: Any,
        key_serializer: Any,
        n_buckets: int,
        buffer_size: int,
        lock_timeout: float,
        timeout: float | None,
        commit: int | str | None = None,
        trust_serializers: Any = False,
        remote_timeout: float | None = None,
    ) -> EBooklet:
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
        self = object.__new__(cls)
        self.path = Path(file_path)
        self.flag = flag
        self.writable = flag != "r"
        self.offline = conn is None
        self._conn = conn
        self._rlock = threading.RLock()
        self._closed = True
        self._lock: RemoteLock | None = None
        self._pinned: dict | None = None  # open(..., commit=): the snapshot's manifest
        self._found_unsaved = False  # edits found in the data file that only memory holds
        self._warned_unchecked = False  # see _unchecked_copy
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
            if commit is not None:
                from .maintenance import pin_commit

                pin_commit(self, commit)
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
        return self

    def _take_remote_lock(self, lock_timeout: float) -> None:
        conn = self._conn
        if self.writable and conn is not None and conn.writable and not self.offline:
            self._lock = RemoteLock(conn, self._meta.owner_id, str(self.path.resolve()))
            self._lock.acquire(lock_timeout)
            if self._lock.contended:
                self._refresh()  # the writer we waited for may have committed meanwhile

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
            if edit.md5 is not None and self._decode_key(kb) not in self._data
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
                self._refresh(wait)
            except OfflineError as exc:
                self.offline = True
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

    def _refresh(self, wait: float | None = None) -> bool:
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
            self.offline = False
            return False
        with self._rlock:
            # Values cached from now on come from the new head: the next open tells them
            # from edits made outside against the manifest it finds in the mirror.
            self._record_data_state(closed=False)
            self._remote.adopt(manifest, etag)
        self.offline = False
        return True

    # ------------------------------------------------------------ encoding

    def _key(self, key: Any) -> bytes:
        try:
            kb = self._ks.dumps(key)
        except Exception as exc:
            raise SerializationError(_bad_key_message(key, self._ks, self._ks_name, exc)) from None
        if not isinstance(kb, bytes):
            raise SerializationError(_bad_key_message(key, self._ks, self._ks_name))
        return kb

    def _value(self, value: Any) -> bytes:
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

    def _decode(self, raw: bytes) -> Any:
        try:
            return self._vs.loads(raw)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(
                f"A value of {self.path} cannot be decoded by its value serializer "
                f"{self._vs_name!r} ({type(exc).__name__}: {exc})."
            ) from None

    def _decode_key(self, kb: bytes) -> Any:
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

    def _check_open(self) -> None:
        if self._closed:
            raise EBookletError(f"{self.path} is closed; reopen it with ebooklet.open().")

    def _check_writable(self) -> None:
        self._check_open()
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

    def _check_local_writable(self, what: str) -> None:
        """Refuse (``ReadOnlyError``) an operation that writes the local files when they
        cannot be written (flag ``'r'`` on a read-only file system)."""
        if not self._local_writable:
            raise ReadOnlyError(
                f"{what} writes into the local files of {self.path}, which cannot be written "
                "(read-only file system, or no permission); read values with get(), items() "
                "or get_items() instead: they are fetched without being cached."
            )

    # ------------------------------------------------------------ the read path

    def _remote_entry(self, kb: bytes) -> Any:
        """The remote entry of a key, :data:`MISSING_SHARD` when unknowable offline."""
        if self._log.replace:
            return None
        if self.offline or self._conn is None:
            return self._remote.entry(kb, fetch=False)
        try:
            return self._indexed(lambda: self._remote.entry(kb))
        except OfflineError:
            return self._remote.entry(kb, fetch=False)

    def _indexed(self, lookup: Callable[[], _T]) -> _T:
        """``lookup()`` in the remote index; when one of its shards is gone because the
        remote moved on since this copy read its manifest (``vacuum()`` rewrites the
        index), once more after taking the new manifest."""
        try:
            return lookup()
        except RemoteNotFoundError:
            with self._rlock:
                if not self._refresh():
                    raise
            return lookup()

    def _store(self, key: Any, raw: bytes, timestamp: Any = None) -> None:
        """Write an encoded value to the data file; a large one goes straight to the
        file, without booklet's copies (see :func:`_booklet_io.append_records`)."""
        if len(raw) > LARGE_VALUE:
            append_records(self._data, [(self._ks.dumps(key), raw, timestamp)])
        else:
            self._data.set(key, raw, timestamp=timestamp, encode_value=False)

    def _cached(self, key: Any) -> tuple[int, bytes] | None:
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

    def _scan(self, include_value: bool = True) -> Iterator[tuple]:
        """The data file's ``(encoded key, timestamp[, encoded value])``, see :func:`_booklet_io.scan`."""
        return scan(self._data, self._data_path, include_value)

    def _scan_pays(self, n_keys: int) -> bool:
        """Whether reading ``n_keys`` keys' local data is faster by one sequential scan of
        the data file than by a lookup each: when they are half of it or more."""
        return 2 * n_keys >= len(self._data)

    def _stored_values(self, kbs: Collection[bytes]) -> Iterator[tuple[bytes, int, bytes]]:
        """``(encoded key, timestamp, encoded value)`` of those of ``kbs`` in the data
        file, in file order.

        When they are half the file or more, one sequential scan reads them (about
        twice as fast as a lookup per key); if a read caches a value meanwhile (which
        ends booklet's scan), the rest are looked up one by one.
        """
        todo = set(kbs)
        if self._scan_pays(len(todo)):
            try:
                for kb, ts, raw in self._scan():
                    if kb in todo:
                        todo.discard(kb)
                        yield kb, ts, raw
                    raw = None  # noqa: F841 - drop a large value before reading the next
            except ScanInterrupted:
                pass
        for kb in sorted(todo):
            cached = self._cached(self._decode_key(kb))
            if cached is not None:
                yield kb, *cached

    def _local_only(self, kb: bytes) -> bool | None:
        """Whether the value of ``kb`` is the local file's (``True``: a local edit), is
        gone (``False``: deleted, or not kept from a remote being replaced), or is the
        remote's to say (``None``): :func:`.local.local_side`."""
        return local_side(self._log.edits.get(kb), self._log.replace)

    def _raw(self, key: Any) -> tuple[int, bytes] | None:
        """``(timestamp, encoded value)`` of a key, fetching it if needed."""
        self._check_open()
        kb = self._key(key)
        local = self._local_only(kb)
        if local is not None:
            return self._edited(key, kb) if local else None
        return self._remote_raw(key, kb)

    def _edited(self, key: Any, kb: bytes) -> tuple[int, bytes]:
        """``(timestamp, encoded value)`` of a key with a local edit, checked against the md5
        journaled with the edit.

        Raises:
            IntegrityError: the data file lacks the value, or holds another one.
        """
        found = self._cached(key)
        edit = self._log.edits.get(kb)
        if edit is not None and self._log.checked.get(kb) == edit.md5 and found is not None:
            return found
        if found is None or edit is None or fmt.md5(found[1]) != edit.md5:
            with self._rlock:  # set() journals, then writes: read both as one state
                found = self._cached(key)
                edit = self._log.edits.get(kb)
                if edit is None or edit.md5 is None:
                    return found  # discarded or deleted meanwhile: a read of the older state
                if found is None or fmt.md5(found[1]) != edit.md5:
                    raise self._damaged_edit(kb, found is not None)
        self._log.checked[kb] = edit.md5
        return found

    def _damaged_edit(self, kb: bytes, present: bool) -> IntegrityError:
        """The error for a local edit whose value in the data file is missing (``present``
        false) or is not the value that was journaled."""
        key = self._decode_key(kb)
        what = "holds another value than the one" if present else "lacks the value"
        return IntegrityError(
            f"{self.path} {what} last set locally for key {key!r:.80} (not pushed yet): the "
            "write did not reach the file (a crash) or the file was damaged. Set the key "
            f"again, or discard it (db.changes().discard([{key!r:.80}])) to read the remote "
            "value."
        )

    def _lookup(self, key: Any, default: Any) -> Any:
        """The decoded value of ``key``, or ``default``.

        A local edit whose value this process wrote or already checked (see
        :attr:`ChangeLog.checked`) is read by booklet's own ``get``, which skips the
        timestamp: the hot path of a local database. Otherwise its md5 is checked
        against the journal once (:meth:`_edited`): an md5 per read would cost 12 %
        of a local get (benchmarks/README.md)."""
        if self._closed:
            self._check_open()
        kb = self._key(key)
        edit = self._log.edits.get(kb)
        if edit is not None and edit.md5 is not None and self._log.checked.get(kb) == edit.md5:
            return self._data.get(key, default)
        local = self._local_only(kb)
        if local is not None:
            return self._decode(self._edited(key, kb)[1]) if local else default
        found = self._remote_raw(key, kb)
        return default if found is None else self._decode(found[1])

    def _remote_raw(self, key: Any, kb: bytes) -> tuple[int, bytes] | None:
        """``(timestamp, encoded value)`` of a key with no local edit: the cached copy
        when it is the remote's current value, else downloaded and cached."""
        entry = self._remote_entry(kb)
        if entry is None:
            return None
        cached = self._cached(key)
        if entry is MISSING_SHARD:
            if cached is None:
                raise OfflineError(
                    f"Key {key!r} is not cached locally and the remote cannot be reached; "
                    "reconnect and try again."
                )
            return self._unchecked_copy(cached)
        if cached is not None and _is_copy(cached[0], cached[1], entry):
            return cached
        try:
            return self._download_one(kb, entry)
        except OfflineError as exc:
            if cached is not None and cached[0] == entry.timestamp:
                raise self._damaged_copy(kb, exc) from None
            raise
        except RemoteNotFoundError:
            moved = self._moved([(kb, entry)])
            if moved is None:
                raise
            return self._download_one(*moved[0]) if moved else None

    def _unchecked_copy(self, cached: tuple[int, bytes]) -> tuple[int, bytes]:
        """A cached copy read offline while the index shard that holds its md5 is not
        local (a newer head rewrote that shard since the value was cached): it cannot be
        checked, so it is returned with an ``OfflineWarning``, once a session."""
        if not self._warned_unchecked:
            self._warned_unchecked = True
            warnings.warn(
                f"Working offline, {self.path} returns cached values whose index shard is "
                "not local: they cannot be checked against the remote's md5 (a damaged copy "
                "would go unnoticed). Reconnect to have them checked.",
                OfflineWarning,
                stacklevel=4,
            )
        return cached

    def _damaged_copy(self, kb: bytes, exc: OfflineError) -> IntegrityError:
        """The error for a cached copy of a remote value that fails its md5 (it has the
        remote entry's timestamp) when the remote cannot be reached to fetch it again."""
        return IntegrityError(
            f"The copy of key {self._decode_key(kb)!r:.80} cached in {self.path} is damaged (it "
            f"does not match the md5 of the remote index), and the remote cannot be reached "
            f"to fetch it again ({exc}). Reconnect and read it again: it is then downloaded."
        )

    def _download_one(self, kb: bytes, entry: Entry) -> tuple[int, bytes] | None:
        head = self._remote.etag
        for _, e, raw in self._remote.fetch_values([(kb, entry)]):
            self._cache_fetched([(kb, raw, e.timestamp)], head)
            return e.timestamp, raw
        return None

    def _moved(self, wanted: list[tuple[bytes, Entry]]) -> list[tuple[bytes, Entry]] | None:
        """After a pack of ``wanted`` was not found: their current entries (keys deleted
        since left out) when the remote moved them since this copy read its manifest,
        as ``vacuum()`` does when it rewrites packs; ``None`` when nothing moved."""
        with self._rlock:
            self._refresh()
            current = self._remote.entries([kb for kb, _ in wanted])
        if all(current[kb] == entry for kb, entry in wanted):
            return None
        return [(kb, e) for kb, e in current.items() if e is not None]

    def __getitem__(self, key: Any) -> Any:
        value = self._lookup(key, _ABSENT)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        return self._lookup(key, default)

    def __contains__(self, key: Any) -> bool:
        self._check_open()
        kb = self._key(key)
        local = self._local_only(kb)
        if local is not None:
            return local
        entry = self._remote_entry(kb)
        if entry is MISSING_SHARD:
            return key in self._data
        return entry is not None

    def _edits_in_remote(self) -> dict[bytes, bool]:
        """For every edited key, whether the remote head has it (as far as known:
        :func:`.local.remote_md5`)."""
        edits = dict(self._log.edits)
        if self._log.replace or not self._remote.exists:
            return dict.fromkeys(edits, False)
        entries = self._known_entries(edits)
        return {kb: remote_md5(edit, entries[kb], False) is not None for kb, edit in edits.items()}

    def _known_entries(self, kbs: Iterable[bytes]) -> dict[bytes, Any]:
        """The head's entries of ``kbs``, fetched when online; offline, from local shards
        (:data:`MISSING_SHARD` where the shard is not local)."""
        kbs = list(kbs)
        if not self.offline:
            with contextlib.suppress(OfflineError):
                return self._remote.entries(kbs)
        return {kb: self._remote.entry(kb, fetch=False) for kb in kbs}

    def __len__(self) -> int:
        self._check_open()
        with self._rlock:
            edits = dict(self._log.edits)
            in_remote = self._edits_in_remote()
            manifest = self._remote.manifest
            n = 0 if self._log.replace or manifest is None else manifest["n_keys"]
            for kb, edit in edits.items():
                n += (edit.md5 is not None) - in_remote[kb]
            return n

    def _iter_key_bytes(self) -> Iterator[bytes]:
        edits = dict(self._log.edits)
        if not self._log.replace and self._remote.exists:
            try:
                for kb, _ in self._remote.iter_entries():
                    if kb not in edits:
                        yield kb
            except OfflineError as exc:
                warnings.warn(
                    f"Listing only locally cached keys: {exc}", OfflineWarning, stacklevel=3
                )
                for key in self._data:
                    kb = self._key(key)
                    if kb not in edits:
                        yield kb
        for kb, edit in edits.items():
            if edit.md5 is not None:
                yield kb

    def __iter__(self) -> Iterator[Any]:
        self._check_open()
        for kb in self._iter_key_bytes():
            yield self._decode_key(kb)

    def keys(self, keys: Iterable[Any] | None = None) -> Iterator[Any]:  # type: ignore[override]
        """The keys of the database (or those of ``keys`` that exist)."""
        if keys is None:
            return iter(self)
        return (k for k in keys if k in self)

    def items(self, keys: Iterable[Any] | None = None) -> Iterator[tuple[Any, Any]]:  # type: ignore[override]
        """``(key, value)`` pairs, downloading missing values in coalesced batches.

        Without ``keys``, the values cached locally come first, from one scan of the
        local file, then the others, downloaded in the order they lie in the remote.
        """
        self._check_open()
        if keys is None:
            edits = dict(self._log.edits)
            try:
                remote = self._remote_entries_to_read(edits)
            except OfflineError:
                pass  # part of the index is out of reach: key by key, as far as possible
            else:
                yield from self._all_items(edits, remote)
                return
        chunk: list[Any] = []
        for key in self if keys is None else self.keys(keys):
            chunk.append(key)
            if len(chunk) == _CHUNK:
                yield from self._items_chunk(chunk)
                chunk = []
        yield from self._items_chunk(chunk)

    def _all_items(
        self, edits: dict[bytes, Any], remote: dict[bytes, Entry]
    ) -> Iterator[tuple[Any, Any]]:
        """Every item: the values in the data file first, from one scan (each checked: an
        edit's against the journal's md5, a remote value's against the index), then the
        others, downloaded. A value that fails its check is read key by key, which
        downloads it again or raises."""
        done: set[bytes] = set()
        try:
            for kb, ts, raw in self._scan():
                edit = edits.get(kb)
                if edit is not None and edit.md5 is not None:
                    done.add(kb)
                    if edit.md5 != self._log.checked.get(kb) and edit.md5 != fmt.md5(raw):
                        yield from self._decoded([kb], {})  # checked again: raises if damaged
                    else:
                        yield self._decode_key(kb), self._decode(raw)
                    continue
                entry = remote.get(kb)
                if entry is not None and _is_copy(ts, raw, entry):
                    done.add(kb)
                    yield self._decode_key(kb), self._decode(raw)
            interrupted = False
        except ScanInterrupted:  # the loop's body wrote to the database: finish key by key
            interrupted = True
        rest = sorted((e.pack, e.offset, kb) for kb, e in remote.items() if kb not in done)
        wanted = [(kb, remote[kb]) for _, _, kb in rest]
        for chunk in _byte_chunks(wanted):
            fetched = self._fetch(self._stale(chunk) if interrupted else chunk)
            yield from self._decoded([kb for kb, _ in chunk], fetched)
        yield from self._decoded(
            [kb for kb, edit in edits.items() if edit.md5 is not None and kb not in done], {}
        )

    def _remote_entries_to_read(self, edits: dict[bytes, Any]) -> dict[bytes, Entry]:
        """Every remote entry not hidden by a local edit (none while the remote is to be
        replaced)."""
        if self._log.replace or not self._remote.exists:
            return {}
        entries = self._indexed(lambda: list(self._remote.iter_entries()))
        return {kb: e for kb, e in entries if kb not in edits}

    def _decoded(
        self, kbs: Iterable[bytes], fetched: dict[bytes, bytes | None]
    ) -> Iterator[tuple[Any, Any]]:
        """``(key, value)`` of ``kbs``, from ``fetched`` or else read (or fetched) one by
        one; a key edited since ``fetched`` was downloaded is read locally."""
        edits = self._log.edits
        for kb in kbs:
            key = self._decode_key(kb)
            raw = fetched.get(kb) if kb not in edits else None
            if raw is None:
                found = self._raw(key)
                raw = found[1] if found is not None else None
            if raw is not None:
                yield key, self._decode(raw)

    def _items_chunk(self, keys: list[Any]) -> Iterator[tuple[Any, Any]]:
        yield from self._decoded([self._key(key) for key in keys], self._load(keys))

    def values(self, keys: Iterable[Any] | None = None) -> Iterator[Any]:  # type: ignore[override]
        """The values (of ``keys`` when given)."""
        for _, value in self.items(keys):
            yield value

    def get_items(self, keys: Iterable[Any], default: Any = None) -> Iterator[tuple[Any, Any]]:
        """``(key, value or default)`` for each of ``keys``, fetched in coalesced batches."""
        keys = list(keys)
        if self._local_writable:  # else each value is fetched by its get
            self.load_items(keys)
        for key in keys:
            yield key, self.get(key, default)

    def load_items(self, keys: Iterable[Any] | None = None) -> int:
        """Download values into the local file without returning them.

        Neighbouring values are fetched together. ``keys=None`` loads every key.
        Returns how many values were downloaded.

        Raises:
            ReadOnlyError: the local files cannot be written (read-only file system).
        """
        self._check_open()
        self._check_local_writable("load_items")
        return len(self._load(keys, keep=False))

    def _load(self, keys: Iterable[Any] | None, keep: bool = True) -> dict[bytes, bytes | None]:
        """Download the values of ``keys`` not cached yet; returns them by encoded key
        (as ``None`` when large or without ``keep``: then only the data file has them)."""
        if self._log.replace or not self._remote.exists or self.offline:
            return {}
        kbs = [self._key(k) for k in keys] if keys is not None else None
        if kbs is None:
            candidates = self._indexed(lambda: list(self._remote.iter_entries()))
        else:
            entries = self._indexed(lambda: self._remote.entries(kbs))
            candidates = [(kb, e) for kb, e in entries.items() if e is not None]
        edits = self._log.edits
        return self._fetch(self._stale([(kb, e) for kb, e in candidates if kb not in edits]), keep)

    def _stale(self, candidates: list[tuple[bytes, Entry]]) -> list[tuple[bytes, Entry]]:
        """Those of ``candidates`` with no up-to-date copy in the data file.

        Many candidates (half the file or more) are checked against one scan of the
        file's keys and timestamps, a few by a lookup each.
        """
        if self._scan_pays(len(candidates)):
            with contextlib.suppress(ScanInterrupted):  # a write ended the scan: look up
                local = dict(self._scan(include_value=False))
                return [(kb, e) for kb, e in candidates if local.get(kb) != e.timestamp]
        return [
            (kb, e) for kb, e in candidates
            if self._data.get_timestamp(self._decode_key(kb)) != e.timestamp
        ]

    def _fetch(self, wanted: list[tuple[bytes, Entry]], keep: bool = True) -> dict[bytes, bytes | None]:
        """Download ``wanted`` values into the data file; returns them by encoded key
        (a large value as ``None``: it is only read back from the data file; every
        value without ``keep``). When a pack is gone because the remote moved the values
        (a vacuum), the manifest is refreshed and the rest downloaded from where they
        lie now."""
        fetched: dict[bytes, bytes | None] = {}
        try:
            self._download(wanted, keep, fetched)
        except RemoteNotFoundError:
            moved = self._moved(wanted)
            if moved is None:
                raise
            self._download(self._stale(moved), keep, fetched)  # those cached already stay
        return fetched

    def _download(
        self, wanted: list[tuple[bytes, Entry]], keep: bool, fetched: dict[bytes, bytes | None]
    ) -> None:
        """:meth:`_fetch` without the retry, into ``fetched``. Values are written to the
        data file in batches of about :data:`_CHUNK_BYTES` (one write each, see
        :func:`_booklet_io.append_records`), a large one on its own."""
        batch: list[tuple[bytes, bytes | memoryview, int]] = []
        size = 0
        head = self._remote.etag
        caching = self._local_writable  # else every value is handed over, in a buffer of its own
        try:
            for kb, entry, raw in self._remote.fetch_values(wanted, reuse_buffers=caching):
                large = len(raw) > LARGE_VALUE
                fetched[kb] = raw if keep and not (large and caching) else None
                if large:  # its buffer is reused by the next one: write it now
                    self._cache_fetched([(kb, raw, entry.timestamp)], head)
                    continue
                batch.append((kb, raw, entry.timestamp))
                size += len(raw)
                if size >= _CHUNK_BYTES:
                    self._cache_fetched(batch, head)
                    batch, size = [], 0
        finally:  # what was downloaded and verified is kept, even if a later value fails
            self._cache_fetched(batch, head)

    def _cache_fetched(self, records: list[tuple[bytes, bytes | memoryview, int]], head: str | None) -> None:
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

    def set(self, key: Any, value: Any, timestamp: int | str | datetime | None = None) -> None:
        """Set ``key`` to ``value`` locally, with an optional timestamp (µs, ISO str or datetime)."""
        self._check_writable()
        kb = self._key(key)
        raw = self._value(value)
        _check_sizes(key, kb, raw)
        timestamp = _timestamp(timestamp)
        m = fmt.md5(raw)
        with self._rlock:
            self._log.record_edits([(kb, m, self._base(kb))])
            self._store(key, raw, timestamp)
            self._log.checked[kb] = m

    def __setitem__(self, key: Any, value: Any) -> None:
        self.set(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Set many keys at once (a mapping, pairs, or keyword arguments)."""
        self._check_writable()
        pairs = dict(*args, **kwargs)
        encoded = [(key, self._key(key), self._value(value)) for key, value in pairs.items()]
        for key, kb, raw in encoded:  # all or nothing: nothing is journaled before this
            _check_sizes(key, kb, raw)
        md5s = [fmt.md5(raw) for _, _, raw in encoded]
        with self._rlock:
            self._log.record_edits(
                (kb, m, self._base(kb)) for (_, kb, _), m in zip(encoded, md5s, strict=True)
            )
            append_records(self._data, [(kb, raw, None) for _, kb, raw in encoded])
            self._log.checked.update((kb, m) for (_, kb, _), m in zip(encoded, md5s, strict=True))

    def __delitem__(self, key: Any) -> None:
        self._check_writable()
        kb = self._key(key)
        with self._rlock:
            if key not in self:
                raise KeyError(key)
            self._log.record_edits([(kb, None, self._base(kb))])
            if key in self._data:
                del self._data[key]

    def clear(self) -> None:
        """Delete every key; the next push replaces the remote database with an empty one."""
        self._check_writable()
        with self._rlock:
            metadata_dirty = self._log.metadata_dirty
            self._log.reset()
            self._log.set_replace(True)
            if metadata_dirty:
                self._log.set_metadata_dirty(True)
            self._data.clear()
            self._record_data_state(closed=False)

    # ------------------------------------------------------------ timestamps & metadata

    def get_timestamp(self, key: Any, include_value: bool = False, default: Any = None) -> Any:
        """The timestamp (µs) of ``key``; ``(timestamp, value)`` with ``include_value``."""
        self._check_open()
        kb = self._key(key)
        if not include_value and kb not in self._log.edits and not self._log.replace:
            entry = self._remote_entry(kb)
            if entry is None:
                return default
            if entry is not MISSING_SHARD:
                return entry.timestamp
        found = self._raw(key)
        if found is None:
            return default
        return (found[0], self._decode(found[1])) if include_value else found[0]

    def timestamps(self, include_value: bool = False) -> Iterator[tuple]:
        """``(key, timestamp)`` (or ``(key, timestamp, value)``) for every key."""
        if include_value:
            for key, value in self.items():
                yield key, self.get_timestamp(key), value
            return
        for key in self:
            yield key, self.get_timestamp(key)

    def set_timestamp(self, key: Any, timestamp: int | str | datetime) -> None:
        """Change the timestamp of ``key`` (makes it a local edit)."""
        self._check_writable()
        timestamp = _timestamp(timestamp)
        found = self._raw(key)
        if found is None:
            raise KeyError(key)
        with self._rlock:
            kb = self._key(key)
            self._log.record_edits([(kb, fmt.md5(found[1]), self._base(kb))], retimed=True)
            self._store(key, found[1], timestamp)

    def set_metadata(self, data: Any) -> None:
        """Set the database's user metadata (any JSON-serializable object); pushed with the data."""
        self._check_writable()
        with self._rlock:
            self._log.set_metadata_dirty(True)
            self._data.set_metadata(data)

    def get_metadata(self) -> Any:
        """The user metadata: the local edit if any, else the remote's."""
        self._check_open()
        if self._log.metadata_dirty or self._remote.manifest is None:
            return self._data.get_metadata()
        return self._remote.manifest.get("metadata")

    # ------------------------------------------------------------ sync

    def changes(self) -> Changes:
        """The :class:`Changes` between this copy and the remote (push, pull, discard)."""
        self._check_open()
        return Changes(self)

    def pull(self, keys: Iterable[Any] | None = None, force: bool = False) -> int:
        """Bring the remote's changes into the local file; see :meth:`Changes.pull`."""
        return self.changes().pull(keys, force=force)

    def prune(self, timestamp: int | str | datetime | None = None) -> int:
        """Compact the local file; with ``timestamp``, delete keys older than it.

        Returns how many keys were deleted.
        """
        self._check_writable()
        removed = 0
        if timestamp is not None:
            cutoff = booklet.make_timestamp_int(timestamp)
            old = [key for key, ts in self.timestamps() if ts < cutoff]
            for key in old:
                del self[key]
            removed = len(old)
        with self._rlock:
            self._data.prune()
            self._record_data_state(closed=False)
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
        self._check_writable()
        with self._rlock:
            found = self._find_outside_edits(self._remote.manifest, 0)
            self._log.compact()
            self._record_data_state(closed=False)
            return found

    def get_remote_hash(self) -> dict[Any, tuple[str, int]]:
        """Rebuild the remote index from the packs' footers: ``key -> (md5 hex, timestamp)``.

        Lists every pack of the database (needs list permission); where a key is
        in several packs, the newest timestamp wins. A recovery and audit tool: it
        cannot know which keys were deleted later.
        """
        self._check_open()
        if self._conn is None or not self._conn.writable:
            raise ReadOnlyError("get_remote_hash lists the bucket: it needs an S3Connection with credentials.")
        from .remote import read_pack_footer

        found: dict[bytes, tuple[bytes, int]] = {}
        packs = [name for name, _ in self._conn.list(fmt.PREFIX + "pack/") if fmt.is_own_name(name)]
        for items, _, _ in self._conn.workers.map(lambda name: read_pack_footer(self._conn, name), packs):
            for item in items:
                if item.key not in found or found[item.key][1] < item.timestamp:
                    found[item.key] = (item.md5, item.timestamp)
        return {self._decode_key(k): (m.hex(), ts) for k, (m, ts) in found.items()}

    def sync(self) -> None:
        """Flush local files to disk."""
        self._check_open()
        with self._rlock:
            self._data.sync()
            self._mirror.sync()

    # ------------------------------------------------------------ attributes

    @property
    def remote(self) -> S3Connection | None:
        """The connection this database syncs with (``None``: local only)."""
        return self._conn

    @property
    def uuid(self) -> str:
        """The database's uuid (shared by every copy of it)."""
        return self._meta.data["uuid"]

    def _ensure_lock(self, timeout: float = 0.0) -> RemoteLock:
        if self._lock is None or not self._lock.held:
            self._lock = RemoteLock(self._conn, self._meta.owner_id, str(self.path.resolve()))
            self._lock.acquire(timeout)
        return self._lock

    # ------------------------------------------------------------ closing

    def _close_files(self) -> None:
        for closer in (
            lambda: self._data.close(),
            lambda: self._log.close(),
            lambda: self._mirror.close(),
        ):
            with contextlib.suppress(AttributeError):
                closer()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

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

    def __enter__(self) -> EBooklet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("offline" if self.offline else "online")
        return f"<EBooklet {str(self.path)!r} flag={self.flag!r} {state} remote={self._conn!r}>"

    # ------------------------------------------------------------ remote management
    # (thin wrappers: the work is in maintenance.py; see docs/history-and-vacuum.md)

    @property
    def commit(self) -> int | None:
        """The seq of the snapshot opened with ``open(..., commit=)``, else ``None``."""
        return self._pinned["seq"] if self._pinned is not None else None

    def history(self, limit: int | None = None) -> list:
        """The commits of the remote database, newest first (``limit``: at most that many).

        Each is a :class:`ebooklet.maintenance.Commit` with ``seq``, ``commit_id``,
        ``timestamp`` (µs) and ``time`` (datetime), ``changed_keys``, ``n_keys``,
        ``n_bytes`` and the ``message`` given to ``push(message=...)``. Works with
        a public URL too (it follows each commit's parent with GETs). Commits
        removed by :meth:`vacuum` are not listed.
        """
        from . import maintenance

        return maintenance.history(self._conn, maintenance.db_head(self), limit)

    def diff(self, seq_a: int | str, seq_b: int | str | None = None) -> list:
        """The keys whose values differ between commits ``seq_a`` and ``seq_b`` (default: the head).

        Returns :class:`ebooklet.maintenance.KeyDiff` records ``(kind, key, old_md5,
        new_md5)``, ``kind`` being ``"added"``, ``"modified"`` or ``"deleted"``
        going from ``seq_a`` to ``seq_b``, sorted by encoded key. Only index
        shards that differ are read; no value is downloaded.
        """
        from . import maintenance

        return maintenance.db_diff(self, seq_a, seq_b)

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
        from . import maintenance

        return maintenance.delete_remote(self)

    def _hold_local_values(self) -> None:
        """Before the remote is deleted: every value this copy shows from its data file
        becomes a local edit, journaled against the remote version it equals (so that a
        push settles it while the remote lives: nothing changes if the deletion stops
        midway), and so does the remote's user metadata. A cached copy of an older
        version (not the head's) is dropped: the key is not that value any more."""
        self._check_local_writable("delete_remote")
        with self._rlock:
            self._data.sync()
            edits = self._log.edits
            cached = [(kb, fmt.md5(raw)) for kb, _, raw in self._scan() if kb not in edits]
            remote = {} if self._log.replace else self._remote.entries(kb for kb, _ in cached)
            current = [(kb, m, m) for kb, m in cached if remote.get(kb) and remote[kb].md5 == m]
            self._log.record_edits(current)
            for kb, m in cached:
                if not (remote.get(kb) and remote[kb].md5 == m):
                    del self._data[self._decode_key(kb)]
            manifest = self._remote.manifest
            if manifest is not None and not self._log.replace and not self._log.metadata_dirty:
                self._log.set_metadata_dirty(True)
                self._data.set_metadata(manifest.get("metadata"))

    def _forget_deleted_remote(self) -> None:
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
            self.offline = True

    def copy_remote(
        self,
        target: S3Connection,
        overwrite: bool = False,
        server_side: bool | None = None,
        message: str | None = None,
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

        Returns a :class:`ebooklet.maintenance.CopyResult`.
        """
        from . import maintenance

        return maintenance.copy_remote(self, target, overwrite, server_side, message)

    def vacuum(
        self,
        keep: int | None = None,
        older_than: Any = None,
        rewrite_below: float = 0.5,
        purge: bool | None = None,
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

        Returns a :class:`ebooklet.maintenance.VacuumResult` (what was removed,
        ``bytes_reclaimed``).
        """
        from . import maintenance

        return maintenance.vacuum(self, keep, older_than, rewrite_below, purge)



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


def _check_sizes(key: Any, kb: bytes, raw: bytes) -> None:
    """Refuse an encoded key or value too long for the local file (``ValueError``)."""
    if len(kb) > fmt.KEY_MAX:
        raise ValueError(
            f"Key {key!r:.60} is {len(kb):,} bytes once encoded; keys can be at most "
            f"{fmt.KEY_MAX:,} bytes. Use a shorter key (a hash of it, for instance)."
        )
    if len(raw) > fmt.VALUE_MAX:
        raise ValueError(
            f"The value of key {key!r:.60} is {len(raw):,} bytes once encoded; values can "
            f"be at most {fmt.VALUE_MAX:,} bytes. Split it over several keys."
        )


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



def _stat_changed(path: Path, recorded: dict | None) -> bool:
    """Whether the data file may have been written since its state was ``recorded``
    (by size, modification time and inode, without opening it)."""
    if recorded is None:
        return True
    stat = os.stat(path)
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino) != (
        recorded["size"], recorded["mtime_ns"], recorded["inode"]
    )


def _is_copy(timestamp: int, raw: bytes | memoryview, entry: Entry) -> bool:
    """Whether a value cached in the data file is an intact copy of the remote value of
    ``entry``: same timestamp, length and md5. (The md5 costs about 1 µs a small value,
    against about 30 µs for the rest of a read of a remote key; see benchmarks/README.md.)"""
    return timestamp == entry.timestamp and len(raw) == entry.length and fmt.md5(raw) == entry.md5


def _byte_chunks(wanted: list[tuple[bytes, Entry]]) -> Iterator[list[tuple[bytes, Entry]]]:
    """Cut ``wanted`` into runs of about :data:`_CHUNK_BYTES` of values (one value at least)."""
    chunk: list[tuple[bytes, Entry]] = []
    size = 0
    for item in wanted:
        chunk.append(item)
        size += item[1].length
        if size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


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
        return booklet.open(
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
