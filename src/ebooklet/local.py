"""The local files of a database and its three-way state.

For a user path ``P``:

- ``P`` — a booklet file with the values: local edits and cached remote values.
- ``P.local_hash`` — :class:`ChangeLog`, an append-only journal of local edits
  (md5 of the local value, md5 of the remote version it replaced), uploads not
  yet committed, and flags. Each record is written with an ``os.write``
  *before* the value goes into ``P`` (the records of ``set()`` wait in memory until
  ``P`` writes its buffer, which flushes them first), so a process killed at any
  point never hides an edit from the next push.
- ``P.remote_index`` — :class:`IndexMirror`, a booklet file with the last
  manifest seen and the index shards already fetched.
- ``P.ebk.json`` — human-readable metadata: where the remote is (no
  credentials), the database uuid, the serializers, the owner id of the writer.

The data file ``P`` is read and written in booklet's own layout by
:mod:`._booklet_io`, the only module that knows it.

Byte layouts are in ``docs/format.md``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
import shutil
import sqlite3
import struct
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, ItemsView, Iterable, Iterator, MutableMapping, ValuesView
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol

import booklet
import orjson
import portalocker

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no record locks, no fetch claims
    fcntl = None  # type: ignore[assignment]

from ._booklet_io import DATA_STATE_FIELDS, DataFile
from .errors import FormatVersionError, IntegrityError
from .format import (
    KEY_MAX,
    NO_MD5,
    PACK_TRAILER_SIZE,
    check_manifest,
    decode_pack_footer,
    key_hash,
    shard_hashes,
    shard_of,
    shard_of_hash,
)
from .store import PUBLIC_FIELDS

LOCAL_FORMAT_VERSION = 1
UNKNOWN_MD5 = b"\xff" * 16
"""Base md5 not yet known: the key's shard was not fetched when it was edited."""

_LOG_MAGIC = b"EBKLOG02"
_LOG_MAGIC_V1 = b"EBKLOG01"  # records without checksums: read, then rewritten as version 2
_RECORD_V1 = struct.Struct("<cI16s16s")  # kind, key length, md5, base md5
_HEAD = struct.Struct("<cI16s16sI")  # the same, then the crc32 of those 37 bytes
_CHECK = struct.Struct("<I")  # after the key and extra: crc32 of the whole record before it
_UPLOAD = struct.Struct("<16sQQq")  # pack id, offset, length, timestamp
_CLOSED_SIZE = _HEAD.size + _CHECK.size  # a close record: no key, no extra
CLAIM_MAX = 4096
"""A download of more values than this at once claims none of them (see
:class:`FetchClaims`): a bulk load is not worth one record lock per key."""
LOCK_POLL = 0.01
"""Seconds between two tries of a :class:`FileLock` taken with a timeout."""
HOLD_SIZE = 1 << 20
"""Bytes of journal records :meth:`ChangeLog.record_edits` holds in memory at most."""

SET, DELETE, RETIME, CLEAN, UPLOADED, PACK, REPLACE, METADATA, RESET, CLOSED = (
    b"S", b"D", b"T", b"C", b"U", b"P", b"R", b"M", b"X", b"E"
)
_KEY_KINDS = (SET, DELETE, RETIME, CLEAN)
_EMPTY_KINDS = (UPLOADED, REPLACE, METADATA, RESET, CLOSED)  # records with no key
DAMAGED_SUFFIX = ".damaged-"
"""A damaged journal ``P.local_hash`` is kept as ``P.local_hash.damaged-<UTC time>``."""
_MIRROR_HEAD = "head"  # the index mirror's key of the head manifest (docs/format.md §9.3)


class Edit(NamedTuple):
    """A key's local edit: md5 of the local value (``None``: deleted) and its base.

    ``retimed`` marks an explicit timestamp change, pushed even when the value
    equals the remote one.
    """

    md5: bytes | None
    base: bytes | None
    retimed: bool = False


class RemoteVersion(Protocol):
    """What the three-way rule reads of a remote index entry (:class:`format.Entry` is one)."""

    @property
    def md5(self) -> bytes: ...

    @property
    def timestamp(self) -> int: ...


class _RemoteUnknown:
    """The type of :data:`REMOTE_UNKNOWN`."""

    def __repr__(self) -> str:
        return "REMOTE_UNKNOWN"


REMOTE_UNKNOWN: Any = _RemoteUnknown()
"""The remote version of a key cannot be known now (offline, its shard not local)."""


class State(str, Enum):
    """How one key stands between the local copy, its remote and the edit's base.

    The values ``added`` to ``remote_deleted`` are the kinds of :class:`Change`.
    """

    UNCHANGED = "unchanged"  # nothing to do or to show
    SETTLED = "settled"  # a local edit that already equals the remote: forget it
    ADDED = "added"
    MODIFIED = "modified"
    DELETED = "deleted"
    CONFLICT = "conflict"  # both sides changed since the base, to different values
    REMOTE_CHANGED = "remote_changed"  # a cached value the remote replaced
    REMOTE_DELETED = "remote_deleted"  # a cached value the remote deleted

    @property
    def listed(self) -> bool:
        """Whether ``iter_changes`` reports a key in this state."""
        return self not in (State.UNCHANGED, State.SETTLED)


def remote_md5(edit: Edit, remote: RemoteVersion | None, replacing: bool) -> bytes | None:
    """The md5 the remote holds for an edited key as far as known (``None``: no value).

    A copy ``replacing`` its remote ignores what the remote holds; a remote version
    unknown now (:data:`REMOTE_UNKNOWN`) is taken to be the edit's base: no remote
    change is known, so none is assumed.
    """
    if replacing:
        return None
    if remote is REMOTE_UNKNOWN:
        return edit.base
    return remote.md5 if remote is not None else None


# Why one function decides this, and why it decides the way it does.
#
# The state of a key is read by several callers: iter_changes() lists it, push() plans
# from it (upload, delete, forget, or refuse), len() counts from its remote side. When each
# computed it on its own, two of them disagreed: an edit that only changed a timestamp
# and already matched the remote was listed as "modified" and then settled silently by
# push. So the rule lives here, pure (no I/O: callers pass what they looked up), and the
# callers only act on its verdict.
#
# The comparisons are of md5s, not values: the journal keeps the md5 of the local value
# and of the remote version the edit replaced (its base), the remote index keeps the
# remote's. Local and remote holding the same md5 is "settled" whatever the base: there
# is nothing to push, and nothing to lose by forgetting the edit (the local copy takes
# the remote's timestamp). A timestamp counts only for an edit whose point was the
# timestamp (``set_timestamp``, a "retimed" edit): it is settled only when the remote
# holds the same value AND the same timestamp, else it is a modification to push. We
# could have treated every edit so, but a plain set() that happens to write the remote's
# value would then push a new timestamp nobody asked for.
#
# Otherwise the remote having moved away from the base is a conflict: both sides
# changed, to different values. A copy replacing its remote (flag 'n', clear()) has
# no remote to conflict with: every value it holds is added. An unknown remote version
# (offline) is taken to be the base: offline, nothing is a conflict or settled by
# the remote's timestamp, and a change is listed by its local side only.
#
# Keys without an edit have no base: a cached copy whose timestamp differs from the
# remote's is out of date (the remote changed), one the remote no longer holds was
# deleted there. Timestamps, not md5s, because the data file does not keep md5s of
# cached values, and a cached copy always carries the remote's timestamp.
def three_way(
    edit: Edit | None,
    remote: RemoteVersion | None,
    local_timestamp: int | None,
    replacing: bool,
) -> State:
    """The state of one key (see the comment above for why).

    Args:
        edit: the key's pending local edit, ``None`` when it has none.
        remote: the remote's version of the key (``md5``, ``timestamp``), ``None`` when the
            remote does not hold it, :data:`REMOTE_UNKNOWN` when that cannot be known now.
        local_timestamp: the timestamp of the local value; needed for a retimed edit and
            for a key with no edit (``None``: not cached), ignored otherwise.
        replacing: the copy replaces its remote at the next push.
    """
    if edit is None:
        return _cached_state(remote, local_timestamp, replacing)
    r = remote_md5(edit, remote, replacing)
    if edit.md5 == r and (not edit.retimed or _same_time(remote, local_timestamp, replacing)):
        return State.SETTLED
    if r != edit.base and not replacing:
        return State.CONFLICT
    if edit.md5 is None:
        return State.DELETED
    return State.ADDED if r is None else State.MODIFIED


def _same_time(remote: RemoteVersion | None, local_timestamp: int | None, replacing: bool) -> bool:
    """Whether the remote's version is known and carries ``local_timestamp``."""
    if replacing or remote is None or remote is REMOTE_UNKNOWN:
        return False
    return remote.timestamp == local_timestamp


def _cached_state(remote: RemoteVersion | None, local_timestamp: int | None, replacing: bool) -> State:
    """The state of a key with no local edit: a cached copy the remote changed or deleted."""
    if replacing or local_timestamp is None or remote is REMOTE_UNKNOWN:
        return State.UNCHANGED
    if remote is None:
        return State.REMOTE_DELETED
    return State.UNCHANGED if remote.timestamp == local_timestamp else State.REMOTE_CHANGED


def local_side(edit: Edit | None, replacing: bool) -> bool | None:
    """Whether a read of a key is answered by the local file (``True``: its edited value),
    by nothing (``False``: deleted, or not kept from a remote being replaced), or is the
    remote's to answer (``None``: no edit)."""
    if edit is None and not replacing:
        return None
    return edit is not None and edit.md5 is not None


def new_base(edit: Edit | None, remote: RemoteVersion | None, replacing: bool) -> bytes | None:
    """The base of a new edit of a key: the pending edit's base (an edit of an edit still
    replaces the remote version the first one replaced), else the remote's md5 (``None``:
    no remote value, or a remote being replaced; :data:`UNKNOWN_MD5` when it cannot be
    known now, resolved at the next refresh)."""
    if edit is not None:
        return edit.base
    if replacing or remote is None:
        return None
    return UNKNOWN_MD5 if remote is REMOTE_UNKNOWN else remote.md5


def found_edit(
    md5_: bytes, timestamp: int, edit: Edit | None, remote: RemoteVersion | None, whole_file: bool
) -> tuple[bytes, bytes | None] | None:
    """``(md5, base)`` of the pending edit that a live record of the data file, written
    outside ebooklet's knowledge, stands for; ``None`` when it is none.

    The record is the local side of :func:`three_way`: an edit settled against the remote
    is none. A record that is no pending edit's value and not the remote's may still be a
    cached copy: one with the remote's timestamp is (a cached copy carries it), and so is
    an older one when the record may predate the data file's recorded state
    (``whole_file``: a copy cached before the remote changed).

    Args:
        md5_, timestamp: the record's value md5 and timestamp.
        edit: the key's pending edit (``None``: none); the value in the file wins over it.
        remote: the key's version in the manifest cached values came from (``None``: not
            there, :data:`REMOTE_UNKNOWN`: unknown offline, the base is resolved later).
        whole_file: the record may predate the data file's recorded state.
    """
    if edit is not None:
        return None if edit.md5 == md5_ else (md5_, edit.base)
    candidate = Edit(md5_, new_base(None, remote, False))
    if remote is REMOTE_UNKNOWN or remote is None:
        return candidate[:2]
    if three_way(candidate, remote, timestamp, False) is State.SETTLED:
        return None
    if timestamp == remote.timestamp or (whole_file and timestamp < remote.timestamp):
        return None
    return candidate[:2]


class Upload(NamedTuple):
    """A value uploaded into a pack by a push that has not (yet) committed."""

    pack: bytes
    offset: int
    length: int
    timestamp: int


def _edit_kind(md5_: bytes | None, retimed: bool) -> bytes:
    if md5_ is None:
        return DELETE
    return RETIME if retimed else SET


def _md5_or_none(raw: bytes) -> bytes | None:
    return None if raw == NO_MD5 else raw


class _Damaged(Exception):
    """A journal is damaged at byte ``offset`` (``reason`` says how)."""

    def __init__(self, offset: int, reason: str):
        super().__init__(offset, reason)
        self.offset = offset
        self.reason = reason


JOURNAL_READ = 1 << 20
"""A journal is read this many bytes at a time (at least a whole record)."""
_Apply = Callable[[bytes, Any, bytes, bytes, bytes, int], None]
"""Takes a journal record ``(kind, key, md5, base, extra, where the key starts in the
file)``; the key of a pack record (its footer) is a memoryview valid during the call."""


def _parse_journal(file: BinaryIO, size: int, apply: _Apply) -> tuple[int, bytes | None]:
    """Hand each record of a journal file of ``size`` bytes to ``apply``, in order, read
    a piece at a time (no list of records, no copy of the file); returns the length of
    its intact part (shorter than ``size`` when a last record was cut short) and the
    kind of its last record (``None``: none).

    Raises:
        _Damaged: anything else is wrong (magic, a checksum, a kind, a length).
    """
    magic = file.read(len(_LOG_MAGIC))
    if magic == _LOG_MAGIC:
        return _parse_records(file, size, len(magic), apply)
    if magic == _LOG_MAGIC_V1:
        return _parse_records_v1(magic + file.read(), len(magic), apply)
    raise _Damaged(0, "it does not start with the magic bytes of an ebooklet change log")


def _parse_records(file: BinaryIO, end: int, pos: int, apply: _Apply) -> tuple[int, bytes | None]:
    """Records of format 2 from ``pos`` (see :func:`_parse_journal`). A record whose head
    is incomplete, or whose head is intact and says it goes past the end, is the last
    one, cut short; every other record must pass both its checksums."""
    buf, buf_at, last = b"", pos, None
    view = memoryview(buf)
    while end - pos >= _HEAD.size:
        if pos + _HEAD.size > buf_at + len(buf):
            buf, buf_at = _read_at(file, pos, min(JOURNAL_READ, end - pos)), pos  # no more than is left
            view = memoryview(buf)
            if len(buf) < _HEAD.size:
                break  # the file was cut while it was read (the writer dropped its close record)
        at = pos - buf_at
        kind, key_len, md5_, base, head_crc = _HEAD.unpack_from(buf, at)
        if zlib.crc32(view[at : at + _RECORD_V1.size]) != head_crc:
            raise _Damaged(pos, "a record's head fails its checksum")
        _check_record(pos, kind, key_len)
        stop = pos + _HEAD.size + key_len + (_UPLOAD.size if kind == UPLOADED else 0)
        if stop + _CHECK.size > end:
            break  # the last record, cut short by a crash: the change after it never happened
        if stop + _CHECK.size > buf_at + len(buf):
            length = min(max(JOURNAL_READ, stop + _CHECK.size - pos), end - pos)
            buf, buf_at, at = _read_at(file, pos, length), pos, 0
            view = memoryview(buf)
            if len(buf) < stop + _CHECK.size - pos:
                break  # the file was cut while it was read: as if cut short
        key_at, stop_at = at + _HEAD.size, stop - buf_at
        if zlib.crc32(view[at:stop_at]) != _CHECK.unpack_from(buf, stop_at)[0]:
            raise _Damaged(pos, "a record fails its checksum")
        key_end = key_at + key_len
        key = view[key_at:key_end] if kind == PACK else buf[key_at:key_end]
        apply(kind, key, md5_, base, buf[key_end:stop_at], pos + _HEAD.size)
        last = kind
        pos = stop + _CHECK.size
    return pos, last


def _read_at(file: BinaryIO, pos: int, length: int) -> bytes:
    file.seek(pos)
    return file.read(length)


def _parse_records_v1(data: bytes, pos: int, apply: _Apply) -> tuple[int, bytes | None]:
    """Records of format 1 (no checksums) from ``pos`` in the file's bytes ``data``:
    whatever follows the last whole record counts as cut short."""
    end, last = len(data), None
    while pos + _RECORD_V1.size <= end:
        kind, key_len, md5_, base = _RECORD_V1.unpack_from(data, pos)
        _check_record(pos, kind, key_len)
        key_at = pos + _RECORD_V1.size
        stop = key_at + key_len + (_UPLOAD.size if kind == UPLOADED else 0)
        if stop > end:
            break
        apply(kind, data[key_at : key_at + key_len], md5_, base, data[key_at + key_len : stop], key_at)
        last = kind
        pos = stop
    return pos, last


def _check_record(pos: int, kind: bytes, key_len: int) -> None:
    """Refuse a record kind this version does not know, or a key length its kind cannot have."""
    if kind in _KEY_KINDS:
        if key_len > KEY_MAX:
            raise _Damaged(pos, f"a record claims a key of {key_len:,} bytes")
    elif kind in _EMPTY_KINDS:
        if key_len:
            raise _Damaged(pos, f"a record of kind {kind!r} claims a key of {key_len:,} bytes")
    elif kind != PACK:
        raise _Damaged(pos, f"a record has an unknown kind {kind!r}")


def _replace_durably(path: Path, parts: Iterable[bytes]) -> int:
    """Replace ``path`` by a file holding the bytes of ``parts`` one after the other
    (written :data:`HOLD_SIZE` bytes at a time), atomically and durably: the new file is
    synced before the rename and the folder after it, so that a power cut leaves the old
    file or the new one, never an empty or short one (a rename of unsynced data may).
    Returns the file's size."""
    tmp = path.with_name(path.name + ".tmp")
    size = 0
    with open(tmp, "wb") as file:
        chunk: list[bytes] = []
        held = 0
        for part in parts:
            chunk.append(part)
            held += len(part)
            if held >= HOLD_SIZE:
                file.write(b"".join(chunk))
                size, chunk, held = size + held, [], 0
        file.write(b"".join(chunk))
        size += held
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return size


_REBUILD = (
    "call get_local_hash() before reading anything: it rebuilds the pending edits from the "
    "data file (every value there that differs from the remote becomes a pending edit "
    "again; unpushed deletions are not recovered)"
)
"""What to do when the journal's pending edits are lost (damaged, cut or missing)."""


def _check_closed(last: bytes | None, intact: int, size: int) -> None:
    """Refuse a journal of ``size`` bytes whose last session closed it, but that does not
    end with the close record (its last record is of kind ``last``): it was cut (at a
    record boundary, or in a record), and the records after the last whole one,
    ``intact`` bytes in, are lost."""
    if last != CLOSED or intact < size:
        raise _Damaged(
            intact,
            "the session that wrote it last closed it cleanly, but it does not end with "
            "the record that closes it: the file was cut, and any record after that byte "
            "is lost",
        )


SPILL_EDITS = 1 << 17
"""Pending edits an :class:`EditMap` holds in memory at most (read as ``local.SPILL_EDITS``
so that a test may change it); beyond, it moves them to a temporary database of its own."""
SPILL_CACHE_KIB = 4096
"""KiB of page cache of that temporary database."""
_SPILL_CHUNK = 4096  # rows written or read at once in the temporary database
_SIGN = 1 << 63  # format.key_hash minus this: SQLite's signed 64-bit integer, same order
_NOTHING: Any = object()
_DELETE_ROW = "DELETE FROM edits WHERE h = ? AND key = ?"
_RETIMED, _HAS_MD5, _HAS_BASE, _CHECKED_IS_MD5, _HAS_CHECKED = 1, 2, 4, 8, 16
_SET_UNCHECKED, _SET_CHECKED = bytes((_HAS_MD5,)), bytes((_HAS_MD5 | _CHECKED_IS_MD5,))


def _pack(edit: Edit, checked: bytes | None) -> bytes:
    """An edit and its checked md5 as one value of the temporary database: a byte of
    flags, then the md5, base and checked md5 that are there (the last only when it is
    not the md5)."""
    md5_, base, retimed = edit
    if base is None and not retimed and md5_ is not None:  # most edits: a value set
        if checked is None:
            return _SET_UNCHECKED + md5_
        if checked == md5_:
            return _SET_CHECKED + md5_
    flags = retimed | (md5_ is not None) << 1 | (base is not None) << 2
    if checked is not None:
        flags |= _CHECKED_IS_MD5 if checked == md5_ else _HAS_CHECKED
    return b"".join(
        (bytes((flags,)), md5_ or b"", base or b"", checked if flags & _HAS_CHECKED else b"")  # type: ignore[list-item]
    )


def _unpack(value: bytes) -> tuple[Edit, bytes | None]:
    """``(edit, checked md5)`` of a value of :func:`_pack`."""
    flags, at = value[0], 1
    md5_ = base = checked = None
    if flags & _HAS_MD5:
        md5_, at = value[at : at + 16], at + 16
    if flags & _HAS_BASE:
        base, at = value[at : at + 16], at + 16
    if flags & _CHECKED_IS_MD5:
        checked = md5_
    elif flags & _HAS_CHECKED:
        checked = value[at : at + 16]
    return Edit(md5_, base, bool(flags & _RETIMED)), checked


class _Bloom:
    """A Bloom filter of the keys of a temporary database, by their Python ``hash()`` (a
    bytes object keeps its hash: a dict lookup of the key already computed it), three
    probes by double hashing, 10 bits a key for ``capacity`` keys: a key absent from the
    database passes for about one in sixty (one in a thousand at half the capacity)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._n_bits = n_bits = max(1 << 16, capacity * 10)
        self._bits = bytearray(n_bits // 8 + 1)

    def add(self, keys: Iterable[bytes]) -> None:
        """Add ``keys``."""
        bits, n_bits = self._bits, self._n_bits
        for key in keys:
            h = hash(key)
            a, b = h % n_bits, (h >> 32) % n_bits | 1
            bits[a >> 3] |= 1 << (a & 7)
            a = (a + b) % n_bits
            bits[a >> 3] |= 1 << (a & 7)
            a = (a + b) % n_bits
            bits[a >> 3] |= 1 << (a & 7)

    def __contains__(self, key: bytes) -> bool:
        bits, n_bits, h = self._bits, self._n_bits, hash(key)
        a = h % n_bits
        if not bits[a >> 3] >> (a & 7) & 1:
            return False
        b = (h >> 32) % n_bits | 1
        a = (a + b) % n_bits
        if not bits[a >> 3] >> (a & 7) & 1:
            return False
        a = (a + b) % n_bits
        return bool(bits[a >> 3] >> (a & 7) & 1)


class _EditItems(ItemsView):
    """The ``(key, edit)`` pairs of an :class:`EditMap`, streamed (no lookup per key)."""

    def __iter__(self) -> Iterator[tuple[bytes, Edit]]:
        return ((key, edit) for key, edit, _ in self._mapping.rows())


class _EditValues(ValuesView):
    """The edits of an :class:`EditMap`, streamed."""

    def __iter__(self) -> Iterator[Edit]:
        return (edit for _, edit, _ in self._mapping.rows())


# Why the pending edits may live in a temporary database.
#
# A push of everything (a new database of ten million keys) has ten million pending
# edits: about 220 bytes each in a dict (key, Edit, md5s, slot), 2.6 GiB. So the map holds
# SPILL_EDITS of them in a dict (the hot paths, db[k] = v of a new key and a read of an
# edited key, are a dict lookup as long as nothing spilled) and moves them, a dict at a
# time, to a private SQLite database: sqlite3.connect("") is a temporary file deleted at
# close, written with no journal and no sync; its page cache is small, the OS caches the
# rest. It is scratch: the durable record stays the journal, replayed into a new map at
# each open. Rows are keyed by (hash, key), the hash format.shard_of places keys by, so
# that the edits of one shard of the remote index are one range (by_shard: a push holds
# one shard's group at once); the rest of a row is one packed value (each bound column
# costs ~0.5 µs a row). A key is in the dict or in the database, never both: a new edit
# of a spilled key rewrites its row. A lookup of a key the database lacks (every
# db[k] = v of a new key) is first asked of a Bloom filter: a point query costs ~5 µs,
# the filter a fraction of one. A journal replayed at open (loading) skips those lookups:
# a spill replaces older rows, and the filter is built once at the end (a third faster).
class EditMap(MutableMapping[bytes, Edit]):
    """The pending edits of a copy: encoded key -> :class:`Edit`, and for each the md5
    of its value this process wrote or checked (:meth:`checked_md5`).

    At most :data:`SPILL_EDITS` are held in memory, the rest in a temporary database
    (see the comment above). :meth:`by_shard` hands them out a shard of the remote index
    at a time. Writes come from one thread at a time (the :class:`ChangeLog`'s lock);
    reads from any thread.
    """

    def __init__(self) -> None:
        self._edits: dict[bytes, Edit] = {}
        self._checked: dict[bytes, bytes] = {}  # of keys in _edits only
        self._db: sqlite3.Connection | None = None
        self._bloom: _Bloom | None = None
        self._spilled = 0  # rows in _db
        self._loading = False  # see loading()
        self._lock = threading.RLock()  # around every use of _db, and a spill

    # ------------------------------------------------------------ the mapping

    def __getitem__(self, key: bytes) -> Edit:
        edit = self._edits.get(key)
        if edit is None:
            edit = self.get(key)  # spilled?
            if edit is None:
                raise KeyError(key)
        return edit

    def get(self, key: bytes, default: Any = None) -> Any:
        edit = self._edits.get(key)
        if edit is None and self._db is not None:
            value = self._spilled_value(key)
            edit = None if value is None else _unpack(value)[0]
        return default if edit is None else edit

    def __contains__(self, key: object) -> bool:
        return key in self._edits or (
            self._db is not None and self._spilled_value(key) is not None  # type: ignore[arg-type]
        )

    def __setitem__(self, key: bytes, edit: Edit) -> None:
        edits = self._edits
        if self._db is not None and key not in edits and not self._loading:
            bloom = self._bloom  # asked here: the write loop of new keys stops at it
            if bloom is not None and key in bloom and self._update_spilled(key, edit):
                return
        edits[key] = edit
        if len(edits) > SPILL_EDITS:
            self._spill()

    def __delitem__(self, key: bytes) -> None:
        self.pop(key)

    def pop(self, key: bytes, default: Any = _NOTHING) -> Any:
        """Remove ``key``'s edit (and its checked md5) and return it, else ``default``.

        Raises:
            KeyError: no edit of ``key`` and no ``default``.
        """
        with self._lock:  # with the checked md5 (mark_checked holds it too)
            edit = self._edits.pop(key, None)
            if self._loading and self._db is not None:  # an older edit of key may be spilled
                self._db.execute(_DELETE_ROW, (key_hash(key) - _SIGN, key))
            if edit is not None:
                self._checked.pop(key, None)
                return edit
            if self._db is not None:
                value = self._spilled_value(key, _DELETE_ROW + " RETURNING v")
                if value is not None:
                    self._spilled -= 1
                    return _unpack(value)[0]
        if default is _NOTHING:
            raise KeyError(key)
        return default

    def __iter__(self) -> Iterator[bytes]:
        if self._db is None:
            return iter(self._edits)
        return (key for key, _, _ in self.rows())

    def __len__(self) -> int:
        return len(self._edits) + self._spilled

    def items(self) -> _EditItems:  # type: ignore[override]
        return _EditItems(self)

    def values(self) -> _EditValues:  # type: ignore[override]
        return _EditValues(self)

    def clear(self) -> None:
        """Forget every edit (the temporary database is deleted)."""
        with self._lock:
            db = self._db
            self._edits, self._checked, self._db, self._bloom, self._spilled = {}, {}, None, None, 0
        if db is not None:
            db.close()

    def close(self) -> None:
        """Release what the map holds (it is empty afterwards)."""
        self.clear()

    # ------------------------------------------------------------ checked values

    def checked_md5(self, key: bytes) -> bytes | None:
        """The md5 of ``key``'s value as this process wrote it to, or checked it in, the
        data file since the key's edit was made (``None``: neither): reads trust a value
        whose edit has that md5. It goes with the edit."""
        md5_ = self._checked.get(key)
        if md5_ is None and self._db is not None:
            value = self._spilled_value(key)
            md5_ = None if value is None else _unpack(value)[1]
        return md5_

    def mark_checked(self, key: bytes, md5_: bytes) -> None:
        """Remember that this process wrote or checked ``key``'s value, of md5 ``md5_``
        (nothing when the key has no edit)."""
        with self._lock:
            if key in self._edits:
                self._checked[key] = md5_
                return
            value = self._spilled_value(key) if self._db is not None else None
            if value is not None:
                self._write_row(key, _pack(_unpack(value)[0], md5_))

    # ------------------------------------------------------------ streams

    def rows(self) -> Iterator[tuple[bytes, Edit, bytes | None]]:
        """``(key, edit, checked md5)`` of every edit, those in memory first, then the
        spilled ones in (hash, key) order, read a chunk at a time: the map may change
        meanwhile (an edit made during the iteration may be missed)."""
        with self._lock:
            checked = self._checked
            memory = [(k, e, checked.get(k)) for k, e in list(self._edits.items())]
        yield from memory
        del memory
        sql = "SELECT h, key, v FROM edits {} ORDER BY h, key LIMIT ?"
        where, after = "", ()
        while True:
            with self._lock:
                if self._db is None:
                    return
                found = self._db.execute(sql.format(where), (*after, _SPILL_CHUNK)).fetchall()
            for _, key, value in found:
                yield key, *_unpack(value)
            if len(found) < _SPILL_CHUNK:
                return
            where, after = "WHERE (h, key) > (?, ?)", found[-1][:2]

    def by_shard(self, n_shards: int) -> Iterator[tuple[int, list[tuple[bytes, Edit]]]]:
        """``(shard number, [(key, edit), ...])`` of each shard of ``n_shards`` (a power
        of two; :func:`format.shard_of`) that holds an edit, in shard order, one group in
        memory at a time (besides the edits the map holds in memory). The map may change
        between two groups (a group is a copy; an edit made meanwhile may be missed)."""
        keys: dict[int, list[bytes]] = {}
        for key in list(self._edits):
            keys.setdefault(shard_of(key, n_shards), []).append(key)
        in_memory = sorted(keys, reverse=True)
        number = 0
        while True:
            with self._lock:
                while in_memory and in_memory[-1] < number:
                    in_memory.pop()
                spilled = self._next_spilled_shard(number, n_shards)
                if spilled is None and not in_memory:
                    return
                number = min(n for n in (spilled, in_memory[-1] if in_memory else None) if n is not None)
                group = self._spilled_group(number, n_shards) if number == spilled else []
                for key in keys.pop(number, ()):
                    edit = self._edits.get(key)
                    if edit is not None:
                        group.append((key, edit))
            if group:
                yield number, group
            number += 1

    def keys_based_on(self, base: bytes) -> list[bytes]:
        """The keys whose edit has the base md5 ``base`` (one scan, in SQLite for the
        spilled edits)."""
        found = [key for key, edit in list(self._edits.items()) if edit.base == base]
        with self._lock:
            rows = [] if self._db is None else self._db.execute(
                "SELECT key, v FROM edits WHERE instr(v, ?) > 0", (base,)
            ).fetchall()
        return found + [key for key, value in rows if _unpack(value)[0].base == base]

    def adopt(self, other: EditMap) -> None:
        """Take the edits of ``other`` (left empty) in place of this map's: a journal read
        again. A checked md5 is kept where the key's new edit still has that md5."""
        for key, _, checked in self.rows():
            if checked is not None:
                edit = other.get(key)
                if edit is not None and edit.md5 == checked:
                    other.mark_checked(key, checked)
        with self._lock, other._lock:
            old = self._db
            self._edits, self._checked, self._db = other._edits, other._checked, other._db
            self._bloom, self._spilled = other._bloom, other._spilled
            other._edits, other._checked, other._db, other._bloom, other._spilled = {}, {}, None, None, 0
        if old is not None:
            old.close()

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Fill this empty map with edits in the order they were made (a journal replayed),
        faster: meanwhile a key is not looked up among the spilled edits (a spilled edit
        is replaced by a later one at the next spill) and the Bloom filter is built once,
        at the end. Only ``m[key] = edit``, ``pop`` and ``clear`` may be used meanwhile."""
        self._loading = True
        try:
            yield
        finally:
            with self._lock:
                self._loading = False
                if self._db is not None:
                    self._end_loading(self._db)

    def _end_loading(self, db: sqlite3.Connection) -> None:
        """After :meth:`loading`: a key held in memory leaves its older spilled edit, and
        the count and the Bloom filter are those of the database (lock held)."""
        self._spilled = db.execute("SELECT count(*) FROM edits").fetchone()[0]
        self._bloom = None
        self._add_to_bloom(db)
        bloom = self._bloom
        older = [(key_hash(key) - _SIGN, key) for key in self._edits if key in bloom]  # type: ignore[operator]
        changes = db.total_changes
        db.executemany(_DELETE_ROW, older)
        self._spilled -= db.total_changes - changes

    # ------------------------------------------------------------ the temporary database

    def _spilled_value(
        self, key: bytes, sql: str = "SELECT v FROM edits WHERE h = ? AND key = ?"
    ) -> bytes | None:
        """The packed value ``sql`` returns for the spilled ``key`` (parameters: its hash
        and the key), ``None`` when it returns none, the Bloom filter rules the key out or
        nothing is spilled."""
        bloom = self._bloom  # a spill replaces it by a larger one, clear() by None
        if bloom is None or key not in bloom:
            return None
        with self._lock:
            if self._db is None:
                return None
            found = self._db.execute(sql, (key_hash(key) - _SIGN, key)).fetchall()
        return found[0][0] if found else None

    def _write_row(self, key: bytes, value: bytes) -> None:
        """Replace the packed value of the spilled ``key`` (lock held)."""
        self._db.execute(  # type: ignore[union-attr]
            "UPDATE edits SET v = ? WHERE h = ? AND key = ?", (value, key_hash(key) - _SIGN, key)
        )

    def _update_spilled(self, key: bytes, edit: Edit) -> bool:
        """Write a new edit of ``key`` over its spilled one (its checked md5 stays);
        returns whether there was one."""
        with self._lock:
            value = self._spilled_value(key)
            if value is None:
                return False
            self._write_row(key, _pack(edit, _unpack(value)[1]))
            return True

    def _spill(self) -> None:
        """Move the edits held in memory to the temporary database, in (hash, key) order."""
        with self._lock:
            db = self._db if self._db is not None else self._open_db()
            edits, checked = self._edits, self._checked
            keys, values = list(edits), list(edits.values())
            hashes = [key_hash(key) - _SIGN for key in keys]
            order = sorted(range(len(keys)), key=hashes.__getitem__)  # B-tree order: fewer pages touched
            insert = f"INSERT {'OR REPLACE ' if self._loading else ''}INTO edits VALUES (?, ?, ?)"
            db.execute("BEGIN")
            for at in range(0, len(order), _SPILL_CHUNK):
                rows = [
                    (hashes[i], keys[i], _pack(values[i], checked.get(keys[i])))
                    for i in order[at : at + _SPILL_CHUNK]
                ]
                db.executemany(insert, rows)
            db.execute("COMMIT")
            if not self._loading:
                self._spilled += len(keys)
                self._add_to_bloom(db, edits)
            self._db, self._edits, self._checked = db, {}, {}

    def _add_to_bloom(self, db: sqlite3.Connection, keys: Iterable[bytes] = ()) -> None:
        """Add ``keys`` (just spilled) to the Bloom filter, or build a larger one of
        every spilled key when it holds :attr:`_spilled` keys no longer (lock held)."""
        if self._bloom is None or self._spilled > self._bloom.capacity:
            self._bloom = _Bloom(self._spilled * 2)
            self._bloom.add(key for (key,) in db.execute("SELECT key FROM edits"))
        else:
            self._bloom.add(keys)

    def _open_db(self) -> sqlite3.Connection:
        db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute(f"PRAGMA cache_size = -{SPILL_CACHE_KIB}")
        db.execute(
            "CREATE TABLE edits (h INTEGER NOT NULL, key BLOB NOT NULL, v BLOB NOT NULL, "
            "PRIMARY KEY (h, key)) WITHOUT ROWID"
        )
        return db

    def _next_spilled_shard(self, number: int, n_shards: int) -> int | None:
        """The first shard from ``number`` on that holds a spilled edit (lock held)."""
        if self._db is None or number >= n_shards:
            return None
        first = shard_hashes(number, n_shards)[0] - _SIGN
        row = self._db.execute("SELECT h FROM edits WHERE h >= ? ORDER BY h LIMIT 1", (first,)).fetchone()
        return None if row is None else shard_of_hash(row[0] + _SIGN, n_shards)

    def _spilled_group(self, number: int, n_shards: int) -> list[tuple[bytes, Edit]]:
        """The spilled edits of shard ``number`` (lock held)."""
        first, end = shard_hashes(number, n_shards)
        rows = self._db.execute(  # type: ignore[union-attr]
            "SELECT key, v FROM edits WHERE h >= ? AND h <= ? ORDER BY h, key",
            (first - _SIGN, end - 1 - _SIGN),
        )
        return [(key, _unpack(value)[0]) for key, value in rows]


class ChangeLog:
    """The ``P.local_hash`` journal: pending local edits and uncommitted uploads.

    The state is replayed at open (the pending edits into an :class:`EditMap`, which
    holds a bounded number in memory); the file is only appended to, and rewritten
    compactly (streamed) after a push. The records of :meth:`hold_edit` wait in memory until :meth:`flush`,
    which the data file calls before it writes the values they name, or until anything
    else is appended (they go first), at most :data:`HOLD_SIZE` bytes of them. Every
    record carries checksums: only a last record cut short (a write killed midway) is
    dropped; a journal damaged anywhere else is moved aside
    (never deleted) and opening it raises :class:`IntegrityError`. :meth:`close`
    appends a close record, removed again before anything else is appended (so there
    is one at most, the last record): a journal cut anywhere after a clean close, even at
    a record boundary (which the checksums cannot tell), lacks it (``expect_closed``).
    """

    def __init__(
        self, path: Path, writable: bool = True, damaged_ok: bool = False,
        expect_closed: bool = False,
    ):
        """Read the journal at ``path`` (if any) and, when ``writable``, open it for appending.

        Args:
            path: the journal file ``P.local_hash``.
            writable: append to it (a torn last record is cut away first, and a journal
                of format version 1 is rewritten in the current one).
            damaged_ok: do not read an existing journal (flag 'n' replaces it).
            expect_closed: the session that wrote the journal last closed it (``P.ebk.json``
                says so): a journal of the current format that does not end with its
                close record was cut, which is damage.

        Raises:
            IntegrityError: the journal is damaged; when ``writable`` it was moved to
                ``P.local_hash.damaged-<time>`` first (see :meth:`_set_aside`).
        """
        self.path = _as_path(path)
        self.edits = EditMap()
        """The pending edits, with the md5 of each value this process wrote or checked
        (:meth:`EditMap.checked_md5`; not journaled: reads trust those values)."""
        self._uploads: dict[bytes, Upload] = {}
        # (pack id, where its footer starts in the file, its length): packs journaled and
        # not read into _uploads yet; the footers stay in the file (see _journaled_footers)
        self._packs: list[tuple[bytes, int, int]] = []
        self._v1 = False  # the file is of format 1 (the _packs positions are in its layout)
        self.replace = False
        self.metadata_dirty = False
        self.ends_closed = False
        """Whether the file ends with a close record (nothing appended since a close)."""
        self._lock = threading.RLock()
        self._records = 0
        self._fd: int | None = None
        self._size = 0  # bytes in the file, so that a short write can be undone
        self._held = bytearray()  # records not written yet (hold_edit)
        self._stat: tuple[int, int, int] | None = None  # the file's when read (see reload)
        rewrite = False
        # a journal flag 'n' did not read (and will replace) gets no close record
        self._end_known = not (damaged_ok and self.path.exists())
        if self.path.exists() and not damaged_ok:
            rewrite = self._load(writable, expect_closed)
        elif expect_closed and not damaged_ok:
            raise IntegrityError(
                f"{self.path} is missing, although the session that wrote it last closed it: "
                f"the pending edits it held are unknown. Reopen the database and {_REBUILD}."
            )
        if writable:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._size = os.fstat(self._fd).st_size
            if self._size == 0:
                self._append(_LOG_MAGIC)
            elif rewrite:
                self.compact()

    def _load(self, writable: bool, expect_closed: bool) -> bool:
        """Replay the journal file; returns whether it is to be rewritten (format 1).
        A torn last record is cut away when ``writable``; see :meth:`__init__` for
        ``expect_closed`` (an empty file is a journal not started yet)."""
        damage = None
        with open(self.path, "rb") as file:
            # the file opened, not the path: the writer may replace it (a compaction) meanwhile
            stat = os.fstat(file.fileno())
            self._stat = stat.st_ino, stat.st_size, stat.st_mtime_ns  # as _file_stat: seen by reload
            size = stat.st_size
            if not size and not expect_closed:
                return False
            old_format = self._v1 = file.read(len(_LOG_MAGIC)) == _LOG_MAGIC_V1
            file.seek(0)
            try:
                with self.edits.loading():
                    intact, last = _parse_journal(file, size, self._apply)
                if expect_closed and not old_format:
                    _check_closed(last, intact, size)
            except _Damaged as exc:
                damage = exc
        if damage is not None:
            raise self._set_aside(damage, writable) from None
        if writable and intact < size:
            if old_format:  # no checksums to tell a torn record from damage: keep a copy
                kept = self._damaged_name()
                shutil.copyfile(self.path, kept)
                warnings.warn(
                    f"{self.path} (format 1) ended with {size - intact} byte(s) that are "
                    f"not a whole record, dropped as a write cut short; the file as it was is "
                    f"kept at {kept}.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            else:
                os.truncate(self.path, intact)
        return writable and old_format

    def _damaged_name(self) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        return self.path.with_name(self.path.name + DAMAGED_SUFFIX + stamp)

    def _set_aside(self, damage: _Damaged, writable: bool) -> IntegrityError:
        """The error for a damaged journal; when ``writable``, the file is first renamed to
        ``P.local_hash.damaged-<time>`` (kept, never deleted) so that a reopen starts a new one."""
        what = f"{self.path} is damaged at byte {damage.offset}: {damage.reason}."
        rebuild = _REBUILD
        if not writable:
            return IntegrityError(
                f"{what} Nothing was changed. Open the database with flag 'w' to set the "
                f"damaged journal aside, then {rebuild}."
            )
        kept = self._damaged_name()
        os.replace(self.path, kept)
        return IntegrityError(
            f"{what} It was moved to {kept} (kept, not deleted), so the next open starts an "
            f"empty journal that knows no pending edit. Reopen the database and {rebuild}."
        )

    def _apply(
        self, kind: bytes, key: bytes, md5_: bytes, base: bytes, extra: bytes, key_at: int = 0
    ) -> None:
        self._records += 1
        self.ends_closed = kind == CLOSED
        if kind in (SET, DELETE, RETIME):
            self.edits[key] = Edit(_md5_or_none(md5_), _md5_or_none(base), kind == RETIME)
        elif kind == CLEAN:
            self.edits.pop(key, None)
        elif kind == UPLOADED:
            self._uploads[md5_] = Upload(*_UPLOAD.unpack(extra))
        elif kind == PACK:
            self._packs.append((md5_, key_at, len(key)))
        elif kind == REPLACE:
            self.replace = md5_ != NO_MD5
        elif kind == METADATA:
            self.metadata_dirty = md5_ != NO_MD5
        elif kind == RESET:
            self.edits.clear()
            self._uploads.clear()
            self._packs.clear()
            self.replace = False
            self.metadata_dirty = False

    @staticmethod
    def _encode(kind: bytes, key: bytes, md5_: bytes | None, base: bytes | None, extra: bytes = b"") -> bytes:
        head = _RECORD_V1.pack(kind, len(key), md5_ or NO_MD5, base or NO_MD5)
        head += _CHECK.pack(zlib.crc32(head))
        return b"".join((head, key, extra, _CHECK.pack(zlib.crc32(extra, zlib.crc32(key, zlib.crc32(head))))))

    def _append(self, blob: bytes) -> None:
        """Append the records held back by :meth:`_write` and encoded records ``blob``
        with one ``os.write`` (the caller holds the lock); a write the kernel cuts short (a
        full disk) is undone and raises ``OSError``."""
        self._go_on()
        if self._held:
            blob = bytes(self._held) + blob
            self._held.clear()
        if not blob:
            return
        written = os.write(self._fd, blob)
        if written != len(blob):
            os.ftruncate(self._fd, self._size)
            raise OSError(
                f"Only {written} of {len(blob)} bytes could be written to {self.path} (is the "
                "disk full?); nothing was journaled and the change was not made."
            )
        self._size += written

    def _go_on(self) -> None:
        """Before anything is appended: the journal goes on, so its close record goes
        (there is only ever one, the last record)."""
        if self._fd is None:
            raise IntegrityError(f"{self.path} is open read-only.")
        if self.ends_closed:
            os.ftruncate(self._fd, self._size - _CLOSED_SIZE)
            self._size -= _CLOSED_SIZE
            self._records -= 1
            self.ends_closed = False
        self._end_known = True

    def _write(self, records: list[tuple]) -> None:
        blob = b"".join(self._encode(*r) for r in records)
        with self._lock:
            self._append(blob)
            for r in records:
                kind, key, md5_, base = r[:4]
                self._apply(kind, key, md5_ or NO_MD5, base or NO_MD5, r[4] if len(r) > 4 else b"")

    # ---------------------------------------------------------------- edits

    def record_edits(
        self, edits: Iterable[tuple[bytes, bytes | None, bytes | None]], retimed: bool = False
    ) -> None:
        """Journal local edits ``(key, md5 or None for a deletion, base md5)``.

        ``retimed``: the edits are explicit timestamp changes.
        """
        self._write([(_edit_kind(m, retimed), k, m, b) for k, m, b in edits])

    def hold_edit(self, key: bytes, md5_: bytes, base: bytes | None, retimed: bool = False) -> None:
        """Journal one local value edit, as ``record_edits([(key, md5_, base)], retimed)``
        does, but the record may wait in memory until :meth:`flush`, which the data file
        calls before it writes the value (see the class docstring); on the path of every
        ``set()``."""
        blob = self._encode(RETIME if retimed else SET, key, md5_, base)
        with self._lock:
            if self.ends_closed or self._fd is None:
                self._go_on()
            self._held += blob
            if len(self._held) >= HOLD_SIZE:
                self._append(b"")
            self._records += 1
            self.edits[key] = Edit(md5_, base, retimed)

    def flush(self) -> None:
        """Write the records held in memory (see :meth:`hold_edit`), if any."""
        if self._held:
            with self._lock:
                self._append(b"")

    @staticmethod
    def start(path: Path) -> None:
        """Start an empty journal at ``path`` if there is none (a reader opening a new
        copy: the copy has its four files, as a writer leaves them)."""
        if not path.exists():
            _replace_durably(path, [_LOG_MAGIC])

    def reload(self, writable: bool = False) -> bool:
        """A journal opened read-only (a reader's): read it again if another process (the
        writer) changed it since it was read; returns whether it did. The edits remembered
        in memory only (:meth:`remember_edits`) are replaced by the file's. ``writable``:
        read it again in any case, and append to it from now on (the caller became the
        copy's writer).

        Raises:
            IntegrityError: the journal is now damaged.
        """
        if self._fd is not None or (_file_stat(self.path) == self._stat and not writable):
            return False
        fresh = ChangeLog(self.path, writable=writable)
        with self._lock:
            self._fd, self._size, self._end_known = fresh._fd, fresh._size, fresh._end_known
            self.edits.adopt(fresh.edits)
            self._uploads, self._packs, self._v1 = fresh._uploads, fresh._packs, fresh._v1
            self.replace, self.metadata_dirty = fresh.replace, fresh.metadata_dirty
            self.ends_closed, self._records, self._stat = fresh.ends_closed, fresh._records, fresh._stat
        return True

    def remember_edits(self, edits: Iterable[tuple[bytes, bytes | None, bytes | None]]) -> None:
        """Hold edits ``(key, md5 or None, base md5)`` in memory only, for this session:
        edits found in the data file by a copy that may not write the journal (flag 'r')."""
        with self._lock:
            for key, md5_, base in edits:
                self.edits[key] = Edit(md5_, base)

    def forget_edits(self, keys: Iterable[bytes]) -> None:
        """Forget the edits of ``keys`` in memory only, for this session: a copy that may
        not write the journal (a reader); the next writable open journals it."""
        with self._lock:
            for key in keys:
                self.edits.pop(key, None)

    def mark_clean(self, keys: Iterable[bytes]) -> None:
        """Forget the edits of ``keys`` (pushed or discarded)."""
        self._write([(CLEAN, k, None, None) for k in keys])

    @property
    def uploads(self) -> dict[bytes, Upload]:
        """md5 -> where a value lies that a push uploaded but did not commit (yet)."""
        with self._lock:
            for pack, footer in self._journaled_footers():
                try:
                    items = decode_pack_footer(footer[:-PACK_TRAILER_SIZE])
                except IntegrityError:  # a damaged record: its values are uploaded again
                    continue
                for item in items:
                    self._uploads[item.md5] = Upload(pack, item.offset, item.length, item.timestamp)
            self._packs.clear()
            return self._uploads

    def forget_uploads(self, md5s: Iterable[bytes]) -> None:
        """Forget the journaled uploads of ``md5s`` (their pack is gone), in one rewrite."""
        with self._lock:
            for m in md5s:
                self._uploads.pop(m, None)
            self.compact()

    def record_pack(self, pack: bytes, footer: bytes) -> None:
        """Remember a pack uploaded by a push that may not commit, so that the next
        attempt reuses its values: one record, the pack id and the pack's footer
        (read back from the file into :attr:`uploads` only when asked; not held)."""
        with self._lock:
            self._append(self._encode(PACK, footer, pack, None))
            self._packs.append((pack, self._size - _CHECK.size - len(footer), len(footer)))
            self._records += 1

    def _journaled_footers(self) -> list[tuple[bytes, bytes]]:
        """``(pack id, footer)`` of the packs journaled and not read into :attr:`uploads`,
        read back from the file; a record that no longer reads back whole there, with its
        checksums, is left out (its values are uploaded again)."""
        found: list[tuple[bytes, bytes]] = []
        if not self._packs:
            return found
        head = _RECORD_V1.size if self._v1 else _HEAD.size
        tail = 0 if self._v1 else _CHECK.size
        with open(self.path, "rb") as file:
            for pack, at, length in self._packs:
                raw = _read_at(file, at - head, head + length + tail)
                got: list[tuple[bytes, bytes, bytes]] = []

                def keep(kind: bytes, key: Any, md5_: bytes, *_: Any) -> None:
                    got.append((kind, bytes(key), md5_))  # noqa: B023 - called right here

                try:
                    if self._v1:
                        _parse_records_v1(raw, 0, keep)
                    else:
                        _parse_records(io.BytesIO(raw), len(raw), 0, keep)
                except _Damaged:
                    continue
                if len(got) == 1 and got[0][0] == PACK and got[0][2] == pack:
                    found.append((pack, got[0][1]))
        return found

    def set_replace(self, on: bool) -> None:
        """Set or clear the "next push replaces the remote database" flag."""
        self._write([(REPLACE, b"", b"\x01" * 16 if on else None, None)])

    def set_metadata_dirty(self, on: bool) -> None:
        """Set or clear the "user metadata changed locally" flag."""
        self._write([(METADATA, b"", b"\x01" * 16 if on else None, None)])

    def reset(self) -> None:
        """Forget everything (a new, empty database)."""
        self._write([(RESET, b"", None, None)])

    def pushed(self, keys: Iterable[bytes] | None, metadata: bool) -> None:
        """A push committed: forget the edits of ``keys``, every journaled upload and the
        "replace the remote" flag, in one atomic rewrite of the journal (no record per key).

        Args:
            keys: the keys whose edits the commit holds (``None``: every pending edit).
            metadata: the commit holds the user metadata (clears that flag too).
        """
        with self._lock:
            if keys is None:
                self.edits.clear()
            for key in keys or ():
                self.edits.pop(key, None)
            self._uploads.clear()
            self._packs.clear()
            self.replace = False
            if metadata:
                self.metadata_dirty = False
            self.compact()

    def compact(self) -> None:
        """Rewrite the journal with only the live state, atomically."""
        if self._fd is None:
            return
        with self._lock:
            packs: list[tuple[bytes, int, int]] = []
            size = _replace_durably(self.path, self._live_records(self._journaled_footers(), packs))
            self._packs, self._v1 = packs, False
            self._held.clear()
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            self._size = size
            self._records = len(self.edits) + len(self._uploads) + len(packs) + self.replace
            self._records += self.metadata_dirty
            self.ends_closed = False
            self._end_known = True

    def _live_records(
        self, footers: list[tuple[bytes, bytes]], packs: list[tuple[bytes, int, int]]
    ) -> Iterator[bytes]:
        """The journal of the live state, a record at a time after the magic: edits,
        uploads, the packs of ``footers`` (each appended to ``packs`` as ``(pack id, where
        its footer starts, its length)``), flags."""
        yield _LOG_MAGIC
        at = len(_LOG_MAGIC)
        for key, edit in self.edits.items():
            record = self._encode(_edit_kind(edit.md5, edit.retimed), key, edit.md5, edit.base)
            at += len(record)
            yield record
        for md5_, upload in self._uploads.items():
            record = self._encode(UPLOADED, b"", md5_, None, _UPLOAD.pack(*upload))
            at += len(record)
            yield record
        for pack, footer in footers:
            packs.append((pack, at + _HEAD.size, len(footer)))
            record = self._encode(PACK, footer, pack, None)
            at += len(record)
            yield record
        if self.replace:
            yield self._encode(REPLACE, b"", b"\x01" * 16, None)
        if self.metadata_dirty:
            yield self._encode(METADATA, b"", b"\x01" * 16, None)

    def needs_compaction(self) -> bool:
        """True when most of the journal is superseded records."""
        live = len(self.edits) + len(self._uploads) + len(self._packs) + 2
        return self._records > 1000 and self._records > 4 * live

    def close(self, mark_closed: bool = True) -> None:
        """Compact if worthwhile, end the file with a close record (unless nothing was
        appended since the last one, or not ``mark_closed``: a reader that wrote one
        cleanup, whose session did not open the journal) and close it.

        Raises:
            OSError: the close record could not be written (the file is closed anyway).
        """
        if self._fd is not None:
            try:
                if self.needs_compaction():
                    self.compact()
                self.flush()
                if self._end_known and not self.ends_closed and mark_closed:
                    self._write([(CLOSED, b"", None, None)])
            finally:
                os.close(self._fd)
                self._fd = None
        self.edits.close()  # the edits are in the file: the map's temporary database goes


class IndexMirror:
    """``P.remote_index``: the manifests and index shards already fetched.

    Holds one manifest, under the key ``head``: the newest seen, which reads use (a
    ``synced`` key that files of earlier versions may hold is never read).

    Opened with ``writable=False`` (local files that cannot be written), the file is
    only read, if it exists; what is stored meanwhile is kept in memory and lost at
    :meth:`close`. With a ``batch_lock``, the file is shared with the other processes
    that have the copy open (:class:`._booklet_io.DataFile`): each write holds the lock.
    While :attr:`head_in_memory` is set, a new head manifest is kept in memory only
    (a reader's, while a writer owns the copy's head: docs/processes.md).
    """

    def __init__(
        self, path: Path, writable: bool = True, timeout: float | None = None,
        batch_lock: FileLock | None = None,
    ):
        self.path = _as_path(path)
        flag = "c" if writable else "r"
        self._memory: dict[str, bytes | None] | None = None if writable else {}
        self.head_in_memory = False
        self._head: bytes | None = None  # the head kept in memory (head_in_memory)...
        self.head_pending = False  # ... when there is one, not written to the file yet
        if not writable and not self.path.exists():
            self._db = None
        else:
            try:
                self._db = DataFile(
                    str(self.path), flag, batch_lock, key_serializer="str", value_serializer=None,
                    timeout=timeout,
                )
            except booklet.LockTimeoutError:
                raise
            except Exception as exc:
                raise IntegrityError(
                    f"{self.path} cannot be opened ({type(exc).__name__}: {exc}). It is only "
                    "a cache of the remote index: delete it and reopen."
                ) from None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This mirror's lock, after the copy's batch lock when the file is shared: every
        write takes them in that order, as the replica does (``persist_head`` under the
        batch lock), so that two threads never wait for each other."""
        shared = self._db is not None and self._memory is None and self._db.shared
        with self._db.batch() if shared else contextlib.nullcontext(), self._lock:
            yield

    def _get(self, name: str) -> bytes | None:
        if self._memory is not None and name in self._memory:
            return self._memory[name]
        return self._db.get(name) if self._db is not None else None

    def _put(self, name: str, data: bytes | None) -> None:
        """Store (``None``: delete) one record, in memory when the file is read-only
        (the caller holds the lock)."""
        if self._memory is not None:
            self._memory[name] = data
        elif data is not None:
            self._db[name] = data
        elif name in self._db:
            with contextlib.suppress(KeyError):  # deleted meanwhile by another process
                del self._db[name]

    def get_manifest(self) -> tuple[dict | None, str | None]:
        """``(manifest, etag)`` of the head manifest stored, ``(None, None)`` if none.

        The manifest is validated as one fresh from the bucket (``format.check_manifest``).
        A damaged record reads as absent, with a ``RuntimeWarning``: this file is only a
        cache, and the remote's manifest is fetched again at the next refresh.

        Raises:
            FormatVersionError: the cached manifest is of a newer format.
        """
        raw = self._head if self.head_pending else self._get(_MIRROR_HEAD)
        if raw is None:
            return None, None
        try:
            record = orjson.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("etag"), (str, type(None))):
                raise IntegrityError("the record is not {'manifest': ..., 'etag': str}")
            return check_manifest(record.get("manifest"), "the cached head manifest"), record["etag"]
        except (orjson.JSONDecodeError, IntegrityError) as exc:
            warnings.warn(
                f"{self.path}: the cached head manifest is damaged ({exc}); it is ignored "
                "and the remote's is fetched again (offline, the copy shows no remote data "
                "until then).",
                RuntimeWarning,
                stacklevel=2,
            )
            return None, None

    def stored_etag(self) -> str | None:
        """The ETag of the head manifest in the file (the copy's head, whatever
        :attr:`head_in_memory` holds), ``None`` if none or damaged."""
        raw = self._get(_MIRROR_HEAD)
        try:
            etag = orjson.loads(raw).get("etag") if raw is not None else None
        except (orjson.JSONDecodeError, AttributeError):
            return None
        return etag if isinstance(etag, str) else None

    def set_manifest(self, manifest: dict | None, etag: str | None) -> None:
        """Store the head manifest and its ETag (``None``: forget it); in memory only
        while :attr:`head_in_memory`."""
        with self._locked():
            record = None if manifest is None else orjson.dumps({"manifest": manifest, "etag": etag})
            if self.head_in_memory:
                self._head, self.head_pending = record, True
                return
            self._put(_MIRROR_HEAD, record)
            if self._memory is None:
                self._db.sync()

    def persist_head(self) -> None:
        """Write the head kept in memory (see :attr:`head_in_memory`) to the file."""
        if not self.head_pending:
            return  # nothing to write: no lock to take (the usual case, at every open and close)
        with self._locked():
            if not self.head_pending:
                return
            self._put(_MIRROR_HEAD, self._head)
            self._head, self.head_pending = None, False
            if self._memory is None:
                self._db.sync()

    def get_shard(self, name: str) -> bytes | None:
        """The raw bytes of a fetched shard, or ``None``."""
        return self._get("shard:" + name)

    def get_shard_part(self, name: str, start: int, length: int) -> bytes | None:
        """Bytes ``start`` to ``start + length`` of a fetched shard (one page of it), or
        ``None``, without reading the rest."""
        key = "shard:" + name
        if self._memory is not None and key in self._memory:
            data = self._memory[key]
            return None if data is None else data[start : start + length]
        return self._db.get_part(key, start, length) if self._db is not None else None

    def set_shard(self, name: str, data: bytes) -> None:
        """Store a fetched (immutable) shard."""
        with self._locked():
            self._put("shard:" + name, data)

    def drop_shards(self, names: Iterable[str]) -> None:
        """Forget shards no longer referenced by the head manifest (not while
        :attr:`head_in_memory`: the copy's head in the file may still use them)."""
        if self.head_in_memory:
            return
        with self._locked():
            for name in names:
                self._put("shard:" + name, None)

    def sync(self) -> None:
        if self._db is not None and self._db.writable:
            with self._locked():
                self._db.sync()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


_LOCK_FILE_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0)


class FileLock:
    """An exclusive lock on a small file beside the local copy, for the processes that
    open the copy (``flock``, so two opens in one process exclude each other too; on
    Windows, ``LockFileEx``). Reentrant for the thread holding it; a ``with`` block
    waits for it as long as it takes. The file holds nothing and stays when released.

    Args:
        path: the lock file (created if missing).
    """

    def __init__(self, path: Path):
        self.path = _as_path(path)
        self._fd: int | None = os.open(path, _LOCK_FILE_FLAGS, 0o666)
        self._file = None if fcntl is not None else os.fdopen(self._fd, "r+b")  # portalocker's
        self._mutex = threading.RLock()
        self._depth = 0

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock, waiting at most ``timeout`` seconds (``None``: as long as it takes,
        0: not at all); returns whether it was taken. Each taking needs its :meth:`release`."""
        if not self._mutex.acquire(timeout=-1 if timeout is None else timeout):
            return False
        if self._depth:
            self._depth += 1
            return True
        try:
            taken = self._lock(None if timeout is None else time.monotonic() + timeout)
        except BaseException:
            self._mutex.release()
            raise
        if not taken:
            self._mutex.release()
            return False
        self._depth = 1
        return True

    def _lock(self, deadline: float | None) -> bool:
        """Lock the file, polling until ``deadline`` (``None``: a blocking wait); returns
        whether it was locked by then."""
        if deadline is None:
            _lock_file(self._fd, self._file, wait=True)
            return True
        while not _lock_file(self._fd, self._file, wait=False):
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_POLL)
        return True

    def release(self) -> None:
        """Give back one taking of the lock."""
        self._depth -= 1
        if self._depth == 0:
            _unlock_file(self._fd, self._file)
        self._mutex.release()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def close(self) -> None:
        """Close the file (which releases the lock)."""
        if self._file is not None:
            self._file.close()
        elif self._fd is not None:
            os.close(self._fd)
        self._fd = self._file = None


def _lock_file(fd: int, file: BinaryIO | None, wait: bool) -> bool:
    """Lock the open file ``fd`` exclusively (``file``: the same as a file object, where
    there is no ``fcntl``); returns ``False`` when ``wait`` is false and another holds it.
    ``flock`` is called directly where it exists: portalocker's layers cost several times
    the system call, on every open and close."""
    if file is not None:
        try:
            portalocker.lock(file, portalocker.LOCK_EX | (0 if wait else portalocker.LOCK_NB))
        except portalocker.exceptions.AlreadyLocked:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock_file(fd: int, file: BinaryIO | None) -> None:
    """Unlock what :func:`_lock_file` locked."""
    if file is not None:
        portalocker.unlock(file)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)


class LocalMeta:
    """``P.ebk.json``: what the local files are a copy of (never credentials)."""

    def __init__(self, path: Path, damaged_ok: bool = False, lock: FileLock | None = None):
        """Read ``path`` if it exists.

        Args:
            path: the file ``P.ebk.json``.
            damaged_ok: a file that is not valid JSON reads as empty (flag 'n').
            lock: the copy's batch lock, held around each save (the processes sharing
                the copy save it in turn).

        Raises:
            IntegrityError: the file is not JSON, or a field has a wrong type or value.
            FormatVersionError: written by a newer ebooklet.
        """
        self.path = _as_path(path)
        self.data: dict[str, Any] = {}
        self._lock = lock
        self._read(damaged_ok)

    def reload(self) -> None:
        """Read the file again (another process may have saved it); a damaged one leaves
        :attr:`data` as it was."""
        with contextlib.suppress(IntegrityError):
            self._read(False)

    def _read(self, damaged_ok: bool) -> None:
        """Read the file into :attr:`data`, if it exists (see :meth:`__init__`)."""
        raw = _read_if_exists(self.path)
        if raw is None:
            return
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            if damaged_ok:
                return
            raise self._damaged("it is not valid JSON") from None
        problem = _meta_problem(data)
        if problem is not None:
            if damaged_ok:
                return
            raise self._damaged(problem)
        if data["version"] > LOCAL_FORMAT_VERSION:
            raise FormatVersionError(
                f"{self.path} was written by a newer ebooklet (local format "
                f"{data['version']}); upgrade ebooklet."
            )
        self.data = data

    def _damaged(self, problem: str) -> IntegrityError:
        return IntegrityError(
            f"{self.path} is damaged: {problem}. It holds no data, only where the remote is "
            "and this copy's ids: delete it and reopen the database with its connection (or "
            "public URL) and serializers to rebuild it; no value or pending edit is lost."
        )

    @property
    def owner_id(self) -> str:
        """A stable id of this local copy as a writer (reclaims its own lock after a crash)."""
        if "owner_id" not in self.data:
            self.data["owner_id"] = uuid.uuid4().hex
        return self.data["owner_id"]

    @property
    def data_state(self) -> dict[str, Any] | None:
        """The state of the data file recorded when ebooklet last left it
        (:func:`data_state`, plus ``closed``: whether that session closed the file);
        ``None`` when none is recorded or the record is damaged."""
        state = self.data.get("data_state")
        if not isinstance(state, dict) or not isinstance(state.get("closed"), bool):
            return None
        if not all(type(state.get(f)) is int and state[f] >= 0 for f in DATA_STATE_FIELDS):
            return None
        return state

    def save(self, **fields: Any) -> None:
        """Update fields and write the file atomically."""
        self.data.update(fields)
        self.data["version"] = LOCAL_FORMAT_VERSION
        self.data.setdefault("format", "ebooklet-local")
        self.owner_id  # noqa: B018 - make sure it is recorded
        tmp = self.path.with_name(self.path.name + ".tmp")
        with self._lock if self._lock is not None else contextlib.nullcontext():
            tmp.write_bytes(orjson.dumps(self.data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
            os.replace(tmp, self.path)


def _read_if_exists(path: Path) -> bytes | None:
    """The bytes of the file ``path``, ``None`` when it does not exist (one open, no stat
    before it)."""
    try:
        with open(path, "rb", buffering=0) as file:
            return file.read()
    except FileNotFoundError:
        return None


def _meta_problem(data: Any) -> str | None:
    """What is wrong with the fields of a ``P.ebk.json`` (see docs/format.md 9.4), or ``None``."""
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not an object"
    version = data.get("version")
    if type(version) is not int or version < 1:
        return f"field 'version' is {version!r}, not a positive integer"
    for name, check, wanted in _META_FIELDS:
        if name in data and not check(data[name]):
            return f"field {name!r} is {data[name]!r:.80}, not {wanted}"
    remote = data.get("remote")
    if isinstance(remote, dict):
        for name, value in remote.items():
            if name not in PUBLIC_FIELDS or not (value is None or isinstance(value, str)):
                return f"field 'remote' has {name!r:.40}: {value!r:.80}, not a location"
    return None


def _hex32(value: Any) -> bool:
    return isinstance(value, str) and _HEX32.fullmatch(value) is not None


_HEX32 = re.compile("[0-9a-f]{32}")


def _serializer_name(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value in booklet.serializers.serial_dict)


#: (field, check, what it must be) of ``P.ebk.json``; 'version' and 'remote' are checked
#: on their own.
_META_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("format", lambda v: v == "ebooklet-local", "'ebooklet-local'"),
    ("uuid", lambda v: isinstance(v, str) and 0 < len(v) <= 64, "a string (a database uuid)"),
    ("owner_id", _hex32, "32 lowercase hex digits"),
    ("key_serializer", _serializer_name, "a booklet serializer name or null"),
    ("value_serializer", _serializer_name, "a booklet serializer name or null"),
    ("n_buckets", lambda v: type(v) is int and 1 <= v < 1 << 40, "a positive integer"),
    ("conditional_writes", lambda v: isinstance(v, bool), "true or false"),
    ("remote", lambda v: v is None or isinstance(v, dict), "an object or null"),
)


class FetchClaims:
    """Which process is downloading which value of a local copy now, so that a process
    about to download a value another one is downloading waits for it and then finds it
    cached instead (docs/processes.md). A claim is a POSIX record lock on one byte of the
    batch lock file, chosen by a hash of the key (two keys may share a byte: one waits
    for the other, as for one key). Record locks belong to a process: the threads of one
    process do not wait for each other's downloads. Without ``fcntl`` (Windows), or
    without a path, nothing is claimed and every process downloads what it lacks.

    Args:
        path: the batch lock file (``None``: claim nothing).
    """

    def __init__(self, path: Path | None):
        self._fd = None if path is None or fcntl is None else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def take(self, keys: list[bytes], wait: bool = False) -> list[bytes] | None:
        """Claim the downloads of ``keys`` (encoded), waiting for each when ``wait``; returns
        those claimed (not those another process holds, or whose wait would deadlock), or
        ``None`` when nothing is claimed here (no record locks, or more than
        :data:`CLAIM_MAX` keys): download them all."""
        if self._fd is None or len(keys) > CLAIM_MAX:
            return None
        flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
        taken = []
        for key in keys:
            try:
                fcntl.lockf(self._fd, flags, 1, _claim_byte(key))
            except OSError:  # held by another process (or a wait that would deadlock)
                continue
            taken.append(key)
        return taken

    def give_back(self, keys: Iterable[bytes]) -> None:
        """Release the claims of ``keys``."""
        if self._fd is None:
            return
        for key in keys:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _claim_byte(key))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _claim_byte(key: bytes) -> int:
    """The byte of the batch lock file whose record lock claims the download of ``key``."""
    return int.from_bytes(hashlib.blake2s(key, digest_size=4).digest(), "little") & 0x7FFFFFFF


def _as_path(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`Path`, not built again when it is one (pathlib is slow to
    build, and every open passes the paths of :func:`local_paths`)."""
    return path if isinstance(path, Path) else Path(path)


def _file_stat(path: Path) -> tuple[int, int, int] | None:
    """``(inode, size, mtime in ns)`` of a file, ``None`` when missing: what changes when
    another process appends to it or replaces it."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def lock_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(batch lock, writer lock)`` files of a user path (docs/processes.md): ``P.ebk.lock``,
    held around each write to the shared local files, and ``P.ebk.writer``, held by the
    one writer for as long as it has the copy open."""
    return _sibling_paths(os.fspath(path))[4:]


def in_use(path: str | os.PathLike) -> bool:
    """Whether a process has the local copy at ``path`` open (each open holds a shared
    lock on its data file ``P``)."""
    data = Path(path)
    if not data.exists():
        return False
    with open(data, "rb") as file:
        try:
            portalocker.lock(file, portalocker.LOCK_EX | portalocker.LOCK_NB)
        except portalocker.exceptions.LockException:
            return True
        portalocker.unlock(file)
    return False


def local_paths(path: str | os.PathLike) -> tuple[Path, Path, Path, Path]:
    """``(data, change log, index mirror, metadata)`` paths for a user path."""
    return _sibling_paths(os.fspath(path))[:4]


@functools.lru_cache(maxsize=64)
def _sibling_paths(path: str) -> tuple[Path, ...]:
    """The files of the copy at ``path``: :func:`local_paths`, then :func:`lock_paths`
    (remembered: every open asks several times, and pathlib is slow to build them)."""
    p = Path(path)
    return (p, *(p.with_name(p.name + suffix) for suffix in _SUFFIXES))


_SUFFIXES = (".local_hash", ".remote_index", ".ebk.json", ".ebk.lock", ".ebk.writer")
