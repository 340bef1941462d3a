"""`OutsideWrites`: the writes made to a replica's data file outside ebooklet.

The data file is a plain booklet file: it may be written with booklet itself, or hold
values that a process killed before its journal records reached the disk wrote. Ebooklet
records the file's state in ``P.ebk.json`` whenever every value in it is accounted for
(a pending edit's, or one of the head manifest the local mirror holds); the next open
reads only what was written after that state, and makes it pending edits
(:meth:`OutsideWrites.reconcile_at_open`), as ``get_local_hash`` does for the whole file
(:meth:`OutsideWrites.find_edits`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from . import format as fmt
from ._booklet_io import data_changed_from, data_state, deleted_last, scan
from .codec import Codec
from .errors import OfflineError, RemoteNotFoundError
from .local import ChangeLog, LocalMeta, found_edit
from .remote import RemoteIndex


class OutsideWrites:
    """The recorded state of one replica's data file and the edits found against it.

    Args:
        path: the database's file path, named in warnings.
        meta: its ``P.ebk.json``, where the state is recorded (read once, here).
        writable: whether edits found are journaled (flag ``'r'``: held in memory only,
            the recorded state then stays as it was, so that the next open finds them again).
        local_writable: whether the local files can be written (else nothing is recorded).
    """

    def __init__(self, path: Path, meta: LocalMeta, writable: bool, local_writable: bool) -> None:
        self._path = path
        self._meta = meta
        self._writable = writable
        self._local_writable = local_writable
        self._recorded = meta.data_state  # the data file's state the last session recorded
        self._found_unsaved = False  # edits found in the data file that only memory holds

    @property
    def closed_cleanly(self) -> bool:
        """Whether the last session recorded that it closed the data file."""
        return self._recorded is not None and self._recorded["closed"]

    def stat_changed(self, data_path: Path) -> bool:
        """Whether the data file may have been written since its state was recorded
        (by size, modification time and inode, without opening it)."""
        recorded = self._recorded
        if recorded is None:
            return True
        stat = os.stat(data_path)
        return (stat.st_size, stat.st_mtime_ns, stat.st_ino) != (
            recorded["size"], recorded["mtime_ns"], recorded["inode"]
        )

    # ------------------------------------------------------------ the recorded state

    def mark_session_open(self) -> None:
        """Before anything is appended to the journal, make ``P.ebk.json`` stop saying
        that the last session closed cleanly (the state it recorded stays, for the
        reconciliation): from here on, a journal that does not end with its close record
        is one this process was killed writing, not one cut after a clean close (see
        :class:`ChangeLog`, ``expect_closed``)."""
        recorded = self._recorded
        if self._local_writable and recorded is not None and recorded["closed"]:
            self._meta.save(data_state={**recorded, "closed": False})

    def unmark_session_open(self, log: ChangeLog | None) -> None:
        """An open failed: if the journal ``log`` (``None``: not opened) ends with its
        close record again (see :meth:`ChangeLog.close`), ``P.ebk.json`` says again that
        the last session closed cleanly, as before :meth:`mark_session_open`."""
        recorded = self._recorded
        if log is None or not log.ends_closed or not (recorded and recorded["closed"]):
            return
        if self._local_writable and self._meta.data.get("data_state") != recorded:
            self._meta.save(data_state=recorded)

    def record_data_state(self, data: Any, data_path: Path, closed: bool, always: bool = False) -> None:
        """Record the state of the open data file ``data`` (:func:`_booklet_io.data_state`)
        in ``P.ebk.json``, and whether this session is closing the file, so that the next
        open reads only what was written after it. Called where every value in the file
        is a pending edit's or a value of the head manifest held by the local mirror: at
        open (after the reconciliation), before a new head is adopted, after each write of
        a snapshot's values, after a prune or a clear, at close. While edits found in the
        file are held in memory only, the state recorded at open stays, restored as it was
        at close (see :meth:`mark_session_open`). ``always``: save ``P.ebk.json`` even if
        nothing changed."""
        if not self._local_writable:  # flag 'r' on files that cannot be written
            return
        fields = {}
        state = self._state_to_record(data, data_path, closed)
        if state is not None and state != self._meta.data.get("data_state"):
            fields["data_state"] = state
        if fields or always:
            self._meta.save(**fields)

    def _state_to_record(self, data: Any, data_path: Path, closed: bool) -> dict | None:
        """The ``data_state`` for :meth:`record_data_state`; ``None``: leave it as it is."""
        if self._found_unsaved:
            return self._recorded if closed else None
        return {**data_state(data, data_path), "closed": closed}

    def note_edits(self, log: ChangeLog, edits: list[tuple[bytes, bytes | None, bytes | None]]) -> None:
        """Journal in ``log`` edits found or resolved ``(encoded key, md5, base)``; flag
        'r' holds them in memory for this session (reads return the local value,
        downloads do not overwrite it) and leaves the data file's recorded state as it
        was, so that the next open finds them again."""
        if not edits:
            return
        if self._writable:
            log.record_edits(edits)
        else:
            log.remember_edits(edits)
            self._found_unsaved = True

    # ------------------------------------------------------------ finding the edits

    def reconcile_at_open(
        self, data: Any, data_path: Path, log: ChangeLog, remote: RemoteIndex, codec: Codec,
        offline: bool, cached_from: dict | None,
    ) -> None:
        """Find what was written to the data file ``data`` since ebooklet last recorded
        its state and make it pending edits in ``log``, before anything reads the file.

        ``cached_from``: the head manifest the local mirror held at open, which every
        value cached since the recorded state came from (see :meth:`record_data_state`);
        ``remote`` (out of reach when ``offline``) gives its entries.
        """
        recorded = self._recorded
        clean = recorded is not None and recorded["closed"]
        current = data_state(data, data_path)
        start = data_changed_from(recorded, current)
        if start is not None:
            self.find_edits(data, data_path, log, remote, offline, cached_from, start)
        if not clean:
            self._forget_unwritten_edits(data, log, codec)
        elif start is not None:
            deleted = self._delete_absent_edits(data, data_path, log, codec, current["size"] < recorded["size"])
            self._warn_cached_deletions(recorded["n_keys"] - len(data) - deleted)

    def find_edits(
        self, data: Any, data_path: Path, log: ChangeLog, remote: RemoteIndex, offline: bool,
        cached_from: dict | None, start: int = 0,
    ) -> int:
        """Make pending edits in ``log`` of the live records of ``data`` at or after
        ``start`` (0: the whole data file) that hold neither a pending edit's value nor
        a value of ``cached_from`` (entries from ``remote``, out of reach when
        ``offline``); returns how many were found."""
        edits = log.edits
        records = [(kb, ts, fmt.md5(raw)) for kb, ts, raw in scan(data, data_path, True, start)]
        unknown = [kb for kb, _, _ in records if kb not in edits]
        entries = _reference_entries(unknown, log, remote, offline, cached_from)
        found = []
        for kb, ts, md5_ in records:
            edit = found_edit(md5_, ts, edits.get(kb), entries.get(kb), whole_file=start == 0)
            if edit is not None:
                found.append((kb, *edit))
        self.note_edits(log, found)
        return len(found)

    def _delete_absent_edits(self, data: Any, data_path: Path, log: ChangeLog, codec: Codec, shrunk: bool) -> int:
        """After a clean close: a pending value gone from the data file whose last record
        there is marked deleted was deleted outside ebooklet (booklet's ``del``), which
        makes it a pending deletion. Returns how many.

        Any other absent value was lost by damage (no record left: the file was cut;
        its record live but out of booklet's reach: a garbled index), and so is any when
        the file is shorter than recorded (``shrunk``: cut, or pruned with booklet, which
        drops the deleted records): the edit stays pending, and reading or pushing the
        key raises IntegrityError (set it again or discard it), never a silent deletion.
        """
        absent = _absent_edits(data, log, codec)
        if not absent or shrunk:
            return 0
        deleted = deleted_last(data, data_path, absent)
        self.note_edits(log, [(kb, None, log.edits[kb].base) for kb in absent if kb in deleted])
        return len(deleted)

    def _forget_unwritten_edits(self, data: Any, log: ChangeLog, codec: Codec) -> None:
        """After a killed session: a pending value the data file does not hold never
        reached it (journaled first, lost with booklet's write buffer); forget the edit,
        the key reads the remote again. Flag 'r' leaves the journal as it is."""
        lost = _absent_edits(data, log, codec)
        if not lost:
            return
        if not self._writable:
            self._found_unsaved = True  # the next writable open does it
            return
        warnings.warn(
            f"{self._path} was not closed cleanly: {len(lost)} unpushed value(s) never reached "
            "it; those keys read the remote version again.",
            RuntimeWarning,
            stacklevel=5,
        )
        log.mark_clean(lost)

    def _warn_cached_deletions(self, at_least: int) -> None:
        """Tell that values cached from the remote were deleted outside ebooklet: booklet
        marks a deletion in place, so which keys cannot be known (only that booklet's key
        count dropped by more than the pending edits explain)."""
        if at_least > 0:
            warnings.warn(
                f"At least {at_least} value(s) cached from the remote were deleted from "
                f"{self._path} outside ebooklet. Such deletions cannot be told key by key, so "
                "they are not pending: those keys read the remote again. Delete keys with "
                "ebooklet (del db[key]) to delete them remotely.",
                RuntimeWarning,
                stacklevel=5,
            )


def _reference_entries(
    kbs: list[bytes], log: ChangeLog, remote: RemoteIndex, offline: bool, manifest: dict | None
) -> dict[bytes, Any]:
    """The entries of ``kbs`` in ``manifest``, fetching shards when online (those of
    the head if a vacuum removed ``manifest``'s); offline, :data:`MISSING_SHARD` for
    a key whose shard is not local."""
    if not kbs or log.replace or manifest is None:
        return dict.fromkeys(kbs)
    if not offline:
        for which in (manifest, remote.manifest):
            try:
                return remote.entries(kbs, which)
            except RemoteNotFoundError:
                continue
            except OfflineError:
                break
    return {kb: remote.entry(kb, fetch=False, manifest=manifest) for kb in kbs}


def _absent_edits(data: Any, log: ChangeLog, codec: Codec) -> list[bytes]:
    """Keys with a pending value that the data file ``data`` does not hold."""
    return [
        kb for kb, edit in log.edits.items()
        if edit.md5 is not None and codec.decode_key(kb) not in data
    ]
