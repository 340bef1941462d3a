"""The read path of a :class:`Replica`: a local edit or the remote entry, cached copies
checked against the index, coalesced downloads into the data file, and one retry when
the remote moved on (a vacuum rewrote the index or the packs) since the manifest was read.
Also the facts of a key from the index alone (:class:`KeyStat`), prefix filtering, the
head's value of a key under a local edit, and evicting cached copies (never journaled).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from . import format as fmt
from ._booklet_io import get_value
from .errors import (
    IntegrityError,
    OfflineError,
    OfflineWarning,
    RemoteNotFoundError,
    ScanInterrupted,
)
from .format import Entry
from .local import local_side, remote_md5
from .progress import Progress, ProgressArg
from .remote import MISSING_SHARD
from .replica import LARGE_VALUE, Replica

_T = TypeVar("_T")

_CHUNK = 1000
_CHUNK_BYTES = 8 << 20
"""items() downloads the values it lacks in batches of about this many bytes."""


class KeyStat(NamedTuple):
    """What :meth:`EBooklet.stat` knows of a key without downloading its value.

    ``size``: bytes of the encoded value; ``md5``: its md5 as a hex string;
    ``timestamp``: µs since the Unix epoch (``time``: as an aware UTC datetime);
    ``local``: ``True`` for a local edit not pushed yet, ``False`` for the remote's entry.
    """

    size: int
    md5: str
    timestamp: int
    local: bool

    @property
    def time(self) -> datetime:
        """The timestamp as an aware UTC datetime."""
        return fmt.utc_datetime(self.timestamp)


class Reads:
    """Reads of one :class:`Replica`: values, membership, counts, keys, items, downloads.

    Keys and values go in and out decoded; :meth:`lookup` and :meth:`key_bytes` give the
    encoded forms. Thread-safe as the replica is (its mutex).
    """

    def __init__(self, replica: Replica):
        self._replica = replica
        self._log = replica.log  # both fixed for the replica's life: read on the hot path
        self._data = replica.data
        self._encode_key = replica.codec.encode_key
        self._decode_value = replica.codec.decode_value
        self._warned_unchecked = False  # see _unchecked_copy
        self._verified: tuple[dict | None, set[bytes]] = (None, set())
        """(head manifest, keys): the keys without a local edit whose cached copy this
        session checked against that head's index (see :meth:`get`)."""

    def _remote_entry(self, kb: bytes, head: bool = False) -> Any:
        """The remote entry of a key, :data:`MISSING_SHARD` when unknowable offline;
        ``None`` while the remote is to be replaced, unless ``head``: the head's entry."""
        if self._log.replace and not head:
            return None
        if self._replica.offline or self._replica.conn is None:
            return self._replica.remote.entry(kb, fetch=False)
        try:
            return self._indexed(lambda: self._replica.remote.entry(kb))
        except OfflineError:
            return self._replica.remote.entry(kb, fetch=False)

    def _indexed(self, lookup: Callable[[], _T]) -> _T:
        """``lookup()`` in the remote index; when one of its shards is gone because the
        remote moved on since this copy read its manifest (``vacuum()`` rewrites the
        index), once more after taking the new manifest."""
        try:
            return lookup()
        except RemoteNotFoundError:
            with self._replica.mutex:
                if not self._replica.refresh():
                    raise
            return lookup()

    def _local_only(self, kb: bytes) -> bool | None:
        """Whether the value of ``kb`` is the local file's (``True``: a local edit), is
        gone (``False``: deleted, or not kept from a remote being replaced), or is the
        remote's to say (``None``): :func:`.local.local_side`."""
        return local_side(self._log.edits.get(kb), self._log.replace)

    def lookup(self, key: Any) -> tuple[int, bytes] | None:
        """``(timestamp, encoded value)`` of a key, fetching it if needed."""
        self._replica.check_open()
        kb = self._encode_key(key)
        local = self._local_only(kb)
        if local is not None:
            return self._edited(key, kb) if local else None
        return self._remote_raw(key, kb)

    def _edited(self, key: Any, kb: bytes) -> tuple[int, bytes] | None:
        """``(timestamp, encoded value)`` of a key with a local edit, checked against the md5
        journaled with the edit. A reader whose journal the writer (another process)
        changed since it read it reads it again, and the key as it is now.

        Raises:
            IntegrityError: the data file lacks the value, or holds another one.
        """
        found = self._replica.cached(key)
        edit = self._log.edits.get(kb)
        if edit is not None and self._log.edits.checked_md5(kb) == edit.md5 and found is not None:
            return found
        if found is None or edit is None or fmt.md5(found[1]) != edit.md5:
            with self._replica.mutex:  # set() journals, then writes: read both as one state
                found = self._replica.cached(key)
                edit = self._log.edits.get(kb)
                if edit is None or edit.md5 is None:
                    return found  # discarded or deleted meanwhile: a read of the older state
                if found is None or fmt.md5(found[1]) != edit.md5:
                    if self._replica.catch_up_edits():  # a writer in another process changed it
                        return self.lookup(key)
                    raise self._replica.damaged_edit(kb, found is not None)
        self._log.edits.mark_checked(kb, edit.md5)
        return found

    def get(self, key: Any, default: Any) -> Any:
        """The decoded value of ``key``, or ``default``.

        Two kinds of value are read from the data file alone (no timestamp, no md5, no
        index lookup; :func:`._booklet_io.get_value`): the hot path of a local database. A local edit whose
        value this process wrote or already checked (see :meth:`EditMap.checked_md5`);
        otherwise its md5 is checked against the journal once (:meth:`_edited`): an
        md5 per read would cost 12 % of a local get (benchmarks/README.md). And a key
        without a local edit whose cached copy this session already checked against
        the index of the current head (:meth:`_trust`): a new head (a refresh, a push,
        a vacuum) checks it again; a write makes it a local edit; a discard, a pull or
        a ``clear()`` that drops the copy sends the read back to the remote (and no
        other write puts a value there without a new head)."""
        if self._replica.closed:
            self._replica.check_open()
        kb = self._encode_key(key)
        edit = self._log.edits.get(kb)
        if edit is None:
            head, verified = self._verified
            if kb in verified and head is self._replica.remote.manifest:
                raw = get_value(self._data, kb)
                if raw is not None:
                    return self._decode_value(raw)
        elif edit.md5 is not None and self._log.edits.checked_md5(kb) == edit.md5:
            raw = get_value(self._data, kb)
            return default if raw is None else self._decode_value(raw)
        local = self._local_only(kb)
        if local is not None:
            found = self._edited(key, kb) if local else None
            return default if found is None else self._replica.codec.decode_value(found[1])
        found = self._remote_raw(key, kb)
        return default if found is None else self._replica.codec.decode_value(found[1])

    def _trust(self, kb: bytes, head: dict | None) -> None:
        """Remember that the cached copy of ``kb`` (no local edit) is the value of its
        entry in ``head``, the manifest its entry was looked up in: :meth:`get` then
        reads it without checking it again while ``head`` is the current head."""
        current, verified = self._verified
        if current is not head:
            verified = set()
            self._verified = (head, verified)  # one assignment: threads see a consistent pair
        verified.add(kb)

    def _remote_raw(self, key: Any, kb: bytes) -> tuple[int, bytes] | None:
        """``(timestamp, encoded value)`` of a key with no local edit: the cached copy
        when it is the remote's current value, else downloaded and cached."""
        head = self._replica.remote.manifest  # before the lookup: a refresh may follow
        entry = self._remote_entry(kb)
        if entry is None:
            return None
        cached = self._replica.cached(key)
        if entry is MISSING_SHARD:
            if cached is None:
                raise OfflineError(
                    f"Key {key!r} is not cached locally and the remote cannot be reached; "
                    "reconnect and try again."
                )
            return self._unchecked_copy(cached)
        if cached is not None and _is_copy(cached[0], cached[1], entry):
            self._trust(kb, head)
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
                f"Working offline, {self._replica.path} returns cached values whose index shard is "
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
            f"The copy of key {self._replica.codec.decode_key(kb)!r:.80} cached in {self._replica.path} is damaged (it "
            f"does not match the md5 of the remote index), and the remote cannot be reached "
            f"to fetch it again ({exc}). Reconnect and read it again: it is then downloaded."
        )

    def _download_one(self, kb: bytes, entry: Entry) -> tuple[int, bytes] | None:
        """Download and cache the value of ``entry``, unless another process that was
        downloading it (see :class:`.local.FetchClaims`) cached it meanwhile."""
        claims = self._replica.claims
        claimed = claims.take([kb])
        if claimed == []:  # another process is downloading it: wait for it
            claims.take([kb], wait=True)
        try:
            if claimed is not None:  # another process may have cached it since it was looked up
                cached = self._replica.cached(self._replica.codec.decode_key(kb))
                if cached is not None and _is_copy(cached[0], cached[1], entry):
                    return cached
            head = self._replica.remote.etag
            for _, e, raw in self._replica.remote.fetch_values([(kb, entry)]):
                self._replica.cache_fetched([(kb, raw, e.timestamp)], head)
                return e.timestamp, raw
            return None
        finally:
            claims.give_back([kb])

    def _moved(self, wanted: list[tuple[bytes, Entry]]) -> list[tuple[bytes, Entry]] | None:
        """After a pack of ``wanted`` was not found: their current entries (keys deleted
        since left out) when the remote moved them since this copy read its manifest,
        as ``vacuum()`` does when it rewrites packs; ``None`` when nothing moved."""
        with self._replica.mutex:
            self._replica.refresh()
            current = self._replica.remote.entries([kb for kb, _ in wanted])
        if all(current[kb] == entry for kb, entry in wanted):
            return None
        return [(kb, e) for kb, e in current.items() if e is not None]

    def stat(self, key: Any, remote: bool = False) -> KeyStat:
        """Size, md5 and timestamp of ``key``'s value, without downloading it: of the
        local edit (read from the data file), else of the remote index entry (its shard
        may be fetched; offline, a cached copy whose shard is not local, with an
        ``OfflineWarning``). ``remote``: the head's entry, whatever the local edits.

        Raises:
            KeyError: no such key (or, with ``remote``, not in the head).
            OfflineError: the entry's index shard is not local and the remote cannot be
                reached.
        """
        self._replica.check_open()
        kb = self._encode_key(key)
        local = None if remote else self._local_only(kb)
        if local:
            found = self._edited(key, kb)
            if found is not None:
                return KeyStat(len(found[1]), fmt.md5(found[1]).hex(), found[0], True)
        elif local is None:
            entry = self._remote_entry(kb, head=remote)
            if entry is MISSING_SHARD:
                cached = None if remote else self._replica.cached(key)
                if cached is None:
                    raise _no_shard(key)
                timestamp, raw = self._unchecked_copy(cached)
                return KeyStat(len(raw), fmt.md5(raw).hex(), timestamp, False)
            if entry is not None:
                return KeyStat(entry.length, entry.md5.hex(), entry.timestamp, False)
        raise KeyError(key)

    def get_remote(self, key: Any, default: Any) -> Any:
        """The decoded value of ``key`` in the head this copy holds (``default`` when the
        head lacks it), whatever the local edits: a key without one reads as
        :meth:`get` does; the head's value of a key with a local edit is downloaded and
        checked against its md5, and not cached (the data file keeps the local edit).

        Raises:
            OfflineError: the value (or its index shard) is not local and the remote
                cannot be reached.
        """
        self._replica.check_open()
        kb = self._encode_key(key)
        if kb not in self._log.edits and not self._log.replace:
            found = self._remote_raw(key, kb)
        else:
            found = self._remote_uncached(key, kb)
        return default if found is None else self._replica.codec.decode_value(found[1])

    def _remote_uncached(self, key: Any, kb: bytes) -> tuple[int, bytes] | None:
        """``(timestamp, encoded value)`` of the head's entry of ``kb``, downloaded and
        verified but not cached; once more where a vacuum moved it (see :meth:`_moved`)."""
        entry = self._remote_entry(kb, head=True)
        if entry is MISSING_SHARD:
            raise _no_shard(key)
        if entry is None:
            return None
        try:
            return self._fetch_one(kb, entry)
        except RemoteNotFoundError:
            moved = self._moved([(kb, entry)])
            if moved is None:
                raise
            return self._fetch_one(*moved[0]) if moved else None

    def _fetch_one(self, kb: bytes, entry: Entry) -> tuple[int, bytes] | None:
        """``(timestamp, encoded value)`` of ``entry``, downloaded and verified."""
        for _, e, raw in self._replica.remote.fetch_values([(kb, entry)]):
            return e.timestamp, bytes(raw)
        return None

    def evict(self, keys: Iterable[Any] | None = None) -> int:
        """Drop the cached copies of remote values (of ``keys``, or all) from the data
        file; returns how many were dropped. Local edits are never dropped, and nothing
        is journaled: an eviction is never pushed (the remote keeps every key). The keys
        read the remote again, downloading their values.

        Raises:
            ReadOnlyError: the local files cannot be written (read-only file system).
        """
        replica = self._replica
        replica.check_open()
        replica.check_local_writable("evict")
        with replica.mutex:
            edits = self._log.edits
            if keys is None:
                kbs = [kb for kb, _ in replica.scan(include_value=False) if kb not in edits]
            else:
                kbs = [
                    kb for kb in dict.fromkeys(self._encode_key(k) for k in keys)
                    if kb not in edits and replica.local_timestamp(kb) is not None
                ]
            replica.drop_values(kbs)
            self._verified = (None, set())  # an evicted key is looked up again
        return len(kbs)

    def prefix_bytes(self, prefix: Any) -> bytes:
        """The encoded form with which the encoded form of every key starting with
        ``prefix`` starts. Keys of the key serializer ``'str'`` take a ``str`` prefix
        (UTF-8 keeps prefixes: a key starts with it exactly when its encoding starts with
        the prefix's), keys stored as bytes (``None``) a ``bytes`` prefix.

        Raises:
            TypeError: another key serializer (numbers, JSON...: encodings that do not
                keep prefixes), or a prefix of another type than the keys'.
        """
        return self._replica.codec.encode_prefix(prefix)

    def contains(self, key: Any) -> bool:
        """Whether ``key`` is in the database (asks the remote index only for a key
        without a local edit)."""
        self._replica.check_open()
        kb = self._encode_key(key)
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
        edits = dict(self._log.edits.items())
        if self._log.replace or not self._replica.remote.exists:
            return dict.fromkeys(edits, False)
        entries = self._known_entries(edits)
        return {kb: remote_md5(edit, entries[kb], False) is not None for kb, edit in edits.items()}

    def _known_entries(self, kbs: Iterable[bytes]) -> dict[bytes, Any]:
        """The head's entries of ``kbs``, fetched when online; offline, from local shards
        (:data:`MISSING_SHARD` where the shard is not local)."""
        kbs = list(kbs)
        if not self._replica.offline:
            with contextlib.suppress(OfflineError):
                return self._replica.remote.entries(kbs)
        return {kb: self._replica.remote.entry(kb, fetch=False) for kb in kbs}

    def count(self) -> int:
        """How many keys the database holds: the head's count corrected by the local edits."""
        self._replica.check_open()
        with self._replica.mutex:
            edits = dict(self._log.edits.items())
            in_remote = self._edits_in_remote()
            manifest = self._replica.remote.manifest
            n = 0 if self._log.replace or manifest is None else manifest["n_keys"]
            for kb, edit in edits.items():
                n += (edit.md5 is not None) - in_remote[kb]
            return n

    def key_bytes(self, prefix: bytes = b"") -> Iterator[bytes]:
        """Every key, encoded (those starting with ``prefix``): the remote's not edited,
        then the local edits' (offline, the locally cached keys stand for the remote's,
        with an ``OfflineWarning``)."""
        edits = dict(self._log.edits.items())
        if not self._log.replace and self._replica.remote.exists:
            try:
                for kb, _ in self._replica.remote.iter_entries():
                    if kb not in edits and kb.startswith(prefix):
                        yield kb
            except OfflineError as exc:
                warnings.warn(
                    f"Listing only locally cached keys: {exc}", OfflineWarning, stacklevel=3
                )
                for key in self._data:
                    kb = self._encode_key(key)
                    if kb not in edits and kb.startswith(prefix):
                        yield kb
        for kb, edit in edits.items():
            if edit.md5 is not None and kb.startswith(prefix):
                yield kb

    def keys(self, prefix: Any = None) -> Iterator[Any]:
        """Every key (starting with ``prefix``: see :meth:`prefix_bytes`, :meth:`key_bytes`)."""
        self._replica.check_open()
        for kb in self.key_bytes(b"" if prefix is None else self.prefix_bytes(prefix)):
            yield self._replica.codec.decode_key(kb)

    def items(
        self, keys: Iterable[Any] | None = None, prefix: Any = None
    ) -> Iterator[tuple[Any, Any]]:
        """``(key, value)`` pairs (of ``keys``, of those starting with ``prefix``: see
        :meth:`prefix_bytes`), downloading missing values in coalesced batches; no value
        of a key outside ``prefix`` is downloaded.

        Without ``keys``, the values cached locally come first, from one scan of the
        local file, then the others, downloaded in the order they lie in the remote.
        """
        self._replica.check_open()
        start = b"" if prefix is None else self.prefix_bytes(prefix)
        if keys is None:
            edits = dict(self._log.edits.items())
            try:
                remote = self._remote_entries_to_read(edits)
            except OfflineError:
                pass  # part of the index is out of reach: key by key, as far as possible
            else:
                if start:
                    edits = {kb: e for kb, e in edits.items() if kb.startswith(start)}
                    remote = {kb: e for kb, e in remote.items() if kb.startswith(start)}
                yield from self._all_items(edits, remote)
                return
        if keys is None:
            wanted: Iterable[Any] = self.keys(prefix)
        elif start:
            wanted = (k for k in keys if self._encode_key(k).startswith(start) and self.contains(k))
        else:
            wanted = (k for k in keys if self.contains(k))
        chunk: list[Any] = []
        for key in wanted:
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
            for kb, ts, raw in self._replica.scan():
                edit = edits.get(kb)
                if edit is not None and edit.md5 is not None:
                    done.add(kb)
                    if edit.md5 != self._log.edits.checked_md5(kb) and edit.md5 != fmt.md5(raw):
                        yield from self._decoded([kb], {})  # checked again: raises if damaged
                    else:
                        yield self._replica.codec.decode_key(kb), self._replica.codec.decode_value(raw)
                    continue
                entry = remote.get(kb)
                if entry is not None and _is_copy(ts, raw, entry):
                    done.add(kb)
                    yield self._replica.codec.decode_key(kb), self._replica.codec.decode_value(raw)
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
        if self._log.replace or not self._replica.remote.exists:
            return {}
        entries = self._indexed(lambda: list(self._replica.remote.iter_entries()))
        return {kb: e for kb, e in entries if kb not in edits}

    def _decoded(
        self, kbs: Iterable[bytes], fetched: dict[bytes, bytes | None]
    ) -> Iterator[tuple[Any, Any]]:
        """``(key, value)`` of ``kbs``, from ``fetched`` or else read (or fetched) one by
        one; a key edited since ``fetched`` was downloaded is read locally."""
        edits = self._log.edits
        for kb in kbs:
            key = self._replica.codec.decode_key(kb)
            raw = fetched.get(kb) if kb not in edits else None
            if raw is None:
                found = self.lookup(key)
                raw = found[1] if found is not None else None
            if raw is not None:
                yield key, self._replica.codec.decode_value(raw)

    def _items_chunk(self, keys: list[Any]) -> Iterator[tuple[Any, Any]]:
        yield from self._decoded([self._encode_key(key) for key in keys], self._load(keys))

    def load_items(self, keys: Iterable[Any] | None = None, progress: ProgressArg = None) -> int:
        """Download values into the local file without returning them.

        Neighbouring values are fetched together. ``keys=None`` loads every key.
        Returns how many values were downloaded.

        Args:
            keys: the keys to load (``None``: all).
            progress: values downloaded, out of those to download (see
                :mod:`ebooklet.progress`: a callable(done, total), ``True`` for a bar,
                ``False`` for nothing, ``None``: a bar on a terminal only).

        Raises:
            ReadOnlyError: the local files cannot be written (read-only file system).
            TypeError: ``progress`` is none of its kinds (before any request).
        """
        self._replica.check_open()
        self._replica.check_local_writable("load_items")
        with Progress(progress, None, "value", "load_items") as counter:
            return len(self._load(keys, keep=False, progress=counter))

    def _load(
        self, keys: Iterable[Any] | None, keep: bool = True, progress: Progress | None = None
    ) -> dict[bytes, bytes | None]:
        """Download the values of ``keys`` not cached yet; returns them by encoded key
        (as ``None`` when large or without ``keep``: then only the data file has them).
        ``progress`` learns how many are to be downloaded, then counts them."""
        if self._log.replace or not self._replica.remote.exists or self._replica.offline:
            if progress is not None:
                progress.set_total(0)
            return {}
        kbs = [self._encode_key(k) for k in keys] if keys is not None else None
        if kbs is None:
            candidates = self._indexed(lambda: list(self._replica.remote.iter_entries()))
        else:
            entries = self._indexed(lambda: self._replica.remote.entries(kbs))
            candidates = [(kb, e) for kb, e in entries.items() if e is not None]
        edits = self._log.edits
        wanted = self._stale([(kb, e) for kb, e in candidates if kb not in edits])
        if progress is not None:
            progress.set_total(len(wanted))
        return self._fetch(wanted, keep, progress)

    def _stale(self, candidates: list[tuple[bytes, Entry]]) -> list[tuple[bytes, Entry]]:
        """Those of ``candidates`` with no up-to-date copy in the data file.

        Many candidates (half the file or more) are checked against one scan of the
        file's keys and timestamps, a few by a lookup each.
        """
        if self._replica.scan_pays(len(candidates)):
            with contextlib.suppress(ScanInterrupted):  # a write ended the scan: look up
                local = dict(self._replica.scan(include_value=False))
                return [(kb, e) for kb, e in candidates if local.get(kb) != e.timestamp]
        return [
            (kb, e) for kb, e in candidates
            if self._replica.local_timestamp(kb) != e.timestamp
        ]

    def _fetch(
        self, wanted: list[tuple[bytes, Entry]], keep: bool = True, progress: Progress | None = None
    ) -> dict[bytes, bytes | None]:
        """Download ``wanted`` values into the data file; returns them by encoded key
        (a large value as ``None``: it is only read back from the data file; every
        value without ``keep``). When a pack is gone because the remote moved the values
        (a vacuum), the manifest is refreshed and the rest downloaded from where they
        lie now."""
        fetched: dict[bytes, bytes | None] = {}
        try:
            self._download(wanted, keep, fetched, progress)
        except RemoteNotFoundError:
            moved = self._moved(wanted)
            if moved is None:
                raise
            self._download(self._stale(moved), keep, fetched, progress)  # those cached already stay
        return fetched

    def _download(
        self, wanted: list[tuple[bytes, Entry]], keep: bool, fetched: dict[bytes, bytes | None],
        progress: Progress | None = None,
    ) -> None:
        """:meth:`_fetch` without the retry, into ``fetched``. Values are written to the
        data file in batches of about :data:`_CHUNK_BYTES` (one write each, see
        :func:`_booklet_io.append_records`), a large one on its own; each value
        downloaded counts one in ``progress``."""
        batch: list[tuple[bytes, bytes | memoryview, int]] = []
        size = 0
        head = self._replica.remote.etag
        caching = self._replica.local_writable  # else every value is handed over, in a buffer of its own
        # values another process is downloading now are left to it (read later, one by one)
        claimed = self._replica.claims.take([kb for kb, _ in wanted])
        if claimed is not None and len(claimed) < len(wanted):
            mine = set(claimed)
            wanted = [(kb, e) for kb, e in wanted if kb in mine]
        try:
            for kb, entry, raw in self._replica.remote.fetch_values(wanted, reuse_buffers=caching):
                large = len(raw) > LARGE_VALUE
                fetched[kb] = raw if keep and not (large and caching) else None
                if progress is not None:
                    progress.update(1)
                if large:  # its buffer is reused by the next one: write it now
                    self._replica.cache_fetched([(kb, raw, entry.timestamp)], head)
                    continue
                batch.append((kb, raw, entry.timestamp))
                size += len(raw)
                if size >= _CHUNK_BYTES:
                    self._replica.cache_fetched(batch, head)
                    batch, size = [], 0
        finally:  # what was downloaded and verified is kept, even if a later value fails
            try:
                self._replica.cache_fetched(batch, head)
            finally:
                self._replica.claims.give_back(claimed or ())


    def timestamp(
        self, key: Any, include_value: bool = False, default: Any = None, as_datetime: bool = False
    ) -> Any:
        """The timestamp (µs) of ``key`` (an aware UTC datetime with ``as_datetime``);
        ``(timestamp, value)`` with ``include_value``; ``default`` when there is no such key."""
        self._replica.check_open()
        kb = self._encode_key(key)
        if not include_value and kb not in self._log.edits and not self._log.replace:
            entry = self._remote_entry(kb)
            if entry is None:
                return default
            if entry is not MISSING_SHARD:
                return fmt.utc_datetime(entry.timestamp) if as_datetime else entry.timestamp
        found = self.lookup(key)
        if found is None:
            return default
        timestamp = fmt.utc_datetime(found[0]) if as_datetime else found[0]
        return (timestamp, self._replica.codec.decode_value(found[1])) if include_value else timestamp


def _no_shard(key: Any) -> OfflineError:
    """The error for a key whose index shard is not local while the remote is out of reach."""
    return OfflineError(
        f"The remote index entry of key {key!r:.80} is not local and the remote cannot be "
        "reached; reconnect and try again."
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


