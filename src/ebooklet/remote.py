"""The remote database: manifest, index shards, values, packs and commits (the write
lock is :mod:`.lock`).

Nothing here knows about the local files beyond the :class:`IndexMirror`-like
object it is handed to keep fetched shards in.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple, Protocol

from . import format as fmt
from .errors import (
    CacheDamagedError,
    ConsistencyWarning,
    IntegrityError,
    OfflineError,
    PreconditionFailed,
    RemoteError,
    RemoteNotFoundError,
)
from .format import Entry
from .local import REMOTE_UNKNOWN
from .store import IfMatch, Mode, NotModified, Store

PACK_SIZE = 4 << 20
"""Small values are grouped into packs of about this many bytes. Kept small enough
that a server which copies the whole object for each range GET (moto does, and
spills objects over 5 MiB to disk) answers single-key reads fast."""
PART_SIZE = 8 << 20
"""Multipart part size, and the size above which a value gets a pack of its own."""
PUT_MAX = 64 << 20
"""A large value's pack up to this size goes up in one PUT, a larger one by multipart."""
LARGE_IN_FLIGHT = 64 << 20
"""Bytes of large values being uploaded, or downloaded and not yet consumed, at once
(at least one value whatever its size): they move in parallel in bounded memory."""
RANGE_GAP = 256 << 10
"""Neighbouring values of one pack closer than this are fetched in one GET."""
RANGE_MAX = 16 << 20
"""A coalesced range GET is cut at about this many bytes."""
SHARD_CACHE = 256
"""Parsed shards kept in memory (the raw bytes stay in the local mirror)."""
PAGE_CACHE = 1024
"""Parsed shard pages (and, apart, shard directories) kept in memory."""
DIRECTORY_READ = 8 << 10
"""Bytes read from an index shard's end to get its directory in one GET (a shard of
16,384 keys of 16 bytes has a directory of about 3 KiB; a shard this small comes whole)."""
WHOLE_SHARD_RECORDS = 768
"""A read of one key GETs its whole shard when the manifest's shards hold at most this
many keys on average (about 60 KiB with short keys: one GET, no more bytes than a
directory and a page), else the shard's directory and the key's page."""
PAGES_BEFORE_WHOLE = 4
"""Once this many pages of one shard were fetched one by one, the next read of another
of its pages fetches the whole shard: reads of many keys cost a few requests, not one a
page."""
SEARCHES_BEFORE_PARSE = 16
"""Lookups of keys in a shard the local mirror holds whole (and that is not parsed in
memory) search their pages: each page read alone, its md5 checked, a binary search of its
records (20-50 µs, none of the shard parsed). Once the pages of one shard were searched
this many times its number of pages (one page a key looked up alone; a batch of keys,
one a page it touches), the next lookup parses it whole into the :data:`SHARD_CACHE`
(~0.7 ms a page, 45 ms at 16,384 keys): keys looked up sparsely (random edits of a large
database) cost a search each, keys looked up densely at most about twice what parsing the
shard at once would have."""
DIRECTORY_PIECE = "#dir"
"""Suffix of the mirror name of a shard's directory (its pages: ``#<page number>``)."""


class Mirror(Protocol):
    """Where fetched manifests and shards are kept (``local.IndexMirror``)."""

    def get_manifest(self) -> tuple[dict | None, str | None]: ...
    def set_manifest(self, manifest: dict | None, etag: str | None) -> None: ...
    def get_shard(self, name: str) -> bytes | None: ...
    def get_shard_part(self, name: str, start: int, length: int) -> bytes | None: ...
    def set_shard(self, name: str, data: bytes) -> None: ...
    def drop_shards(self, names: Iterable[str]) -> None: ...


class MemoryMirror:
    """A :class:`Mirror` kept in memory: for one-off remotes (copy targets, checks)."""

    def __init__(self) -> None:
        self._manifest: tuple[dict | None, str | None] = (None, None)
        self._shards: dict[str, bytes] = {}

    def get_manifest(self) -> tuple[dict | None, str | None]:
        return self._manifest

    def set_manifest(self, manifest: dict | None, etag: str | None) -> None:
        self._manifest = (manifest, etag)

    def get_shard(self, name: str) -> bytes | None:
        return self._shards.get(name)

    def get_shard_part(self, name: str, start: int, length: int) -> bytes | None:
        data = self._shards.get(name)
        return None if data is None else data[start : start + length]

    def set_shard(self, name: str, data: bytes) -> None:
        self._shards[name] = data

    def drop_shards(self, names: Iterable[str]) -> None:
        for name in names:
            self._shards.pop(name, None)


class PinnedMirror(MemoryMirror):
    """The mirror of a snapshot: the pinned manifest in memory, shards through the real
    mirror ``base``. Index shards are immutable and named by the commit that wrote them,
    so the local ``P.remote_index`` can share them; its head is never changed."""

    def __init__(self, manifest: dict, base: Mirror):
        super().__init__()
        self._manifest = (manifest, None)
        self._base = base

    def get_shard(self, name: str) -> bytes | None:
        return self._base.get_shard(name)

    def get_shard_part(self, name: str, start: int, length: int) -> bytes | None:
        return self._base.get_shard_part(name, start, length)

    def set_shard(self, name: str, data: bytes) -> None:
        self._base.set_shard(name, data)

    def drop_shards(self, names: Iterable[str]) -> None:
        pass


class RemoteIndex:
    """The remote database as seen through its manifest and index shards.

    Args:
        conn: how to reach the remote (``None``: local only, offline for good).
        mirror: where fetched manifests and shards are kept.
    """

    def __init__(self, conn: Store | None, mirror: Mirror):
        self.conn = conn
        self.mirror = mirror
        self.manifest, self.etag = mirror.get_manifest()
        self._shards: OrderedDict[str, dict[bytes, Entry]] = OrderedDict()
        self._directories: OrderedDict[str, fmt.ShardDirectory] = OrderedDict()
        self._pages: OrderedDict[str, dict[bytes, Entry]] = OrderedDict()
        self._pages_fetched: dict[str, int] = {}  # pages fetched one by one, by shard
        self._searches: dict[str, int] = {}  # pages searched (see _mirrored_entries), by shard
        self._lock = threading.RLock()
        self._fetching: dict[str, threading.Lock] = {}

    # ------------------------------------------------------------ manifest

    @property
    def exists(self) -> bool:
        """True when a remote manifest is known."""
        return self.manifest is not None

    def fetch_manifest(self, wait: float | None = None) -> tuple[dict | None, str | None]:
        """GET the head manifest, conditional on the one we hold.

        Returns ``(manifest, etag)``; ``(None, None)`` when the database does not exist.
        ``wait``: seconds the GET may take, all tries together (``None``: the
        connection's timeouts and retries).
        """
        self._require_conn()
        try:
            answer = self.conn.get(
                "", self.etag if self.manifest is not None else None,
                max_bytes=fmt.MAX_MANIFEST_BYTES, wait=wait,
            )
        except RemoteNotFoundError as exc:
            if "Bucket" in str(exc):
                raise
            return None, None
        if isinstance(answer, NotModified):
            return self.manifest, self.etag
        return fmt.decode_manifest(answer.data, f"manifest of {self.conn!r}"), answer.etag

    def adopt(self, manifest: dict | None, etag: str | None) -> None:
        """Make ``manifest`` the head (after a refresh or our own commit)."""
        with self._lock:
            gone = _shard_names(self.manifest) - _shard_names(manifest)
            self.manifest, self.etag = manifest, etag
            self.mirror.set_manifest(manifest, etag)
            self.mirror.drop_shards([piece for name in gone for piece in self._mirrored_names(name)])
            for name in gone:
                self._shards.pop(name, None)
                self._searches.pop(name, None)
                directory = self._directories.pop(name, None)
                for i in range(len(directory.pages) if directory else 0):
                    self._pages.pop(f"{name}#{i}", None)

    def _mirrored_names(self, name: str) -> list[str]:
        """The mirror names under which shard ``name`` may be kept: whole, its directory,
        its pages (as many as its mirrored directory says; none if that is damaged)."""
        names = [name, name + DIRECTORY_PIECE]
        raw = self.mirror.get_shard(name + DIRECTORY_PIECE)
        try:
            pages = len(fmt.decode_directory(raw, name).pages) if raw is not None else 0
        except IntegrityError:
            pages = 0
        return names + [f"{name}#{i}" for i in range(pages)]

    def _require_conn(self) -> None:
        if self.conn is None:
            raise OfflineError(
                "This database has no remote; reopen it with an S3Connection to reach one."
            )

    # ------------------------------------------------------------ shards

    def shard_for(self, key: bytes, manifest: dict | None = None) -> tuple[int, str | None]:
        """``(shard number, object suffix or None if empty)`` holding ``key``."""
        manifest = manifest if manifest is not None else self.manifest
        i = fmt.shard_of(key, manifest["n_shards"])
        return i, fmt.shard_name_at(manifest, i)

    def group_by_shard(self, keys: Iterable[bytes], manifest: dict | None) -> dict[str | None, list[bytes]]:
        """``keys`` grouped by the object suffix of the shard of ``manifest`` that holds
        each (``None``: an empty shard, or every key when there is no ``manifest``)."""
        if manifest is None:
            return {None: list(keys)}
        groups: dict[str | None, list[bytes]] = {}
        for key in keys:
            groups.setdefault(self.shard_for(key, manifest)[1], []).append(key)
        return groups

    def cached_shard(self, name: str, remember: bool = True) -> dict[bytes, Entry] | None:
        """A shard already in memory or in the local mirror (no request); one parsed from
        the mirror is kept in memory when ``remember``.

        Raises:
            CacheDamagedError: the mirror's copy is damaged (:meth:`shard` fetches it again).
        """
        with self._lock:
            shard = self._shards.get(name)
            if shard is not None:
                self._shards.move_to_end(name)
                return shard
        raw = self.mirror.get_shard(name)
        if raw is None:
            return None
        try:
            shard = fmt.decode_shard(raw, name)
        except IntegrityError as exc:
            raise self._cache_damaged(name, exc) from None
        return self._remember(name, shard) if remember else shard

    def _cache_damaged(self, name: str, exc: IntegrityError) -> CacheDamagedError:
        """The error for shard ``name`` (or a piece of it) found damaged in the mirror."""
        where = getattr(self.mirror, "path", "the local index cache")
        return CacheDamagedError(
            f"The copy of index shard {name} cached in {where} is damaged "
            f"({str(exc).split(';')[0]}). The remote is not at fault: reconnect and "
            "read again to fetch the shard anew, or delete that file (it is only a cache)."
        )

    def _warn_damaged(self, name: str) -> None:
        warnings.warn(
            f"{getattr(self.mirror, 'path', 'The local index cache')}: the cached index "
            f"shard {name} is damaged; it is dropped and fetched again from the remote.",
            RuntimeWarning, stacklevel=4,
        )

    def local_shard(
        self, name: str, remember: bool = True
    ) -> tuple[dict[bytes, Entry] | None, CacheDamagedError | None]:
        """``(shard, None)`` from memory or the mirror, ``(None, None)`` when not local,
        ``(None, error)`` when the mirror's copy is damaged (``remember``: see
        :meth:`cached_shard`)."""
        try:
            return self.cached_shard(name, remember), None
        except CacheDamagedError as exc:
            return None, exc

    def _fetch_shard(
        self, name: str, damage: CacheDamagedError | None, remember: bool = True
    ) -> dict[bytes, Entry]:
        """GET a shard, validate it and keep it in the mirror (replacing a damaged copy,
        with a ``RuntimeWarning``).

        Raises:
            CacheDamagedError: the mirror's copy was damaged and the remote is out of reach.
            OfflineError: the shard is not local and the remote is out of reach.
        """
        if damage is not None:
            self._warn_damaged(name)
        try:
            self._require_conn()
            answer = self.conn.get(name, max_bytes=fmt.MAX_SHARD_BYTES)
        except OfflineError:
            if damage is not None:
                raise damage from None
            raise
        shard = fmt.decode_shard(answer.data, name)
        self.mirror.set_shard(name, answer.data)
        return self._remember(name, shard) if remember else shard

    def _remember(self, name: str, shard: dict[bytes, Entry]) -> dict[bytes, Entry]:
        return _cached(self._lock, self._shards, name, shard, SHARD_CACHE)

    def shard(self, name: str | None, remember: bool = True) -> dict[bytes, Entry]:
        """A shard by object suffix, fetched (once) if needed; ``None`` is the empty shard.
        ``remember=False``: a shard not in memory is parsed for the caller only (a push of
        many shards reads each once: memory), not kept there."""
        if name is None:
            return {}
        shard, _ = self.local_shard(name, remember)
        if shard is not None:
            return shard
        with self._lock:
            guard = self._fetching.setdefault(name, threading.Lock())
        with guard:
            shard, damage = self.local_shard(name, remember)
            return shard if shard is not None else self._fetch_shard(name, damage, remember)

    def load_shards(self, names: Iterable[str | None], remember: bool = True) -> None:
        """Fetch the given shards that are not local yet (or damaged there), in parallel.
        ``remember=False``: fetched shards are kept in the mirror only, and one the mirror
        holds counts as local without being parsed (a damaged copy is fetched again when
        :meth:`shard` reads it)."""
        missing = sorted({n for n in names if n is not None and not self._is_local(n, remember)})
        if missing:
            self._require_conn()
            list(self.conn.workers.map(lambda n: self.shard(n, remember), missing))

    def _is_local(self, name: str, parse: bool) -> bool:
        if parse:
            return self.local_shard(name)[0] is not None
        with self._lock:
            if name in self._shards:
                return True
        return self.mirror.get_shard(name) is not None

    def entry(self, key: bytes, fetch: bool = True, manifest: dict | None = None) -> Entry | None:
        """The remote index entry of ``key`` (``None``: not in the remote).

        The key's shard is used whole when it is parsed in memory; when the local mirror
        holds it whole, the key's page is searched there (see :data:`SEARCHES_BEFORE_PARSE`);
        else only the page that would hold the key is read, from the shard's directory and
        that page, each fetched by one range GET and kept in the mirror (a shard expected small,
        see :data:`WHOLE_SHARD_RECORDS`, or found smaller than :data:`DIRECTORY_READ`,
        comes whole). With ``fetch=False`` only what is local is
        consulted and :data:`MISSING_SHARD` is returned when that is not the key's page.

        Raises:
            IntegrityError: the shard's directory or page is damaged or hostile.
            CacheDamagedError: the mirror's copy is damaged and cannot be fetched again.
        """
        manifest = manifest if manifest is not None else self.manifest
        if manifest is None:
            return None
        _, name = self.shard_for(key, manifest)
        if name is None:
            return None
        whole = _memory(self._lock, self._shards, name)
        if whole is not None:
            return whole.get(key)
        found = self._mirrored_entries(name, [key], fetch)
        if found is not None:
            return found[key]
        records = self._records_near(name, key, fetch, manifest)
        return MISSING_SHARD if records is None else records.get(key)

    def local_entries(self, keys: Iterable[bytes], manifest: dict | None = None) -> dict[bytes, Any]:
        """``entry(key, fetch=False)`` of each of ``keys`` (no request), shard by shard: a
        shard the mirror holds whole is read from it once for all its keys.

        Raises:
            CacheDamagedError: the mirror's copy of a shard is damaged.
            IntegrityError: a directory or page kept apart in the mirror is damaged.
        """
        manifest = manifest if manifest is not None else self.manifest
        if manifest is None:
            return dict.fromkeys(keys)
        by_shard = self.group_by_shard(keys, manifest)
        out: dict[bytes, Any] = {}
        for name, kbs in by_shard.items():
            whole = _memory(self._lock, self._shards, name) if name is not None else {}
            if whole is not None:
                out.update((kb, whole.get(kb)) for kb in kbs)
                continue
            found = self._mirrored_entries(name, kbs, fetch=False)
            if found is None:
                found = {kb: self.entry(kb, False, manifest) for kb in kbs}
            out.update(found)
        return out

    def shard_entries(
        self, name: str | None, keys: list[bytes], remember: bool = True
    ) -> dict[bytes, Entry | None]:
        """The entries of ``keys``, all of shard ``name`` (``None``: the empty shard): from
        the shard parsed in memory, else searched in the mirror's whole copy (see
        :data:`SEARCHES_BEFORE_PARSE`), else from the shard fetched whole (once);
        ``remember``: as :meth:`shard`.

        Raises:
            IntegrityError: the shard fetched is damaged or hostile.
            OfflineError: the shard is not local and the remote is out of reach.
        """
        if name is None:
            return dict.fromkeys(keys)
        whole = _memory(self._lock, self._shards, name)
        if whole is None:
            found = self._mirrored_entries(name, keys, True, remember)
            if found is not None:
                return found
            whole = self.shard(name, remember)
        return {kb: whole.get(kb) for kb in keys}

    def _mirrored_entries(
        self, name: str, keys: list[bytes], fetch: bool, remember: bool = True
    ) -> dict[bytes, Entry | None] | None:
        """The entries of ``keys`` (all of shard ``name``, which is not parsed in memory) from
        the mirror's whole copy of the shard: their pages searched; or the shard parsed
        (kept when ``remember``) once its pages were searched :data:`SEARCHES_BEFORE_PARSE`
        times their number, or when ``keys`` are a third of its records or more (a binary
        search costs about three records parsed); ``None`` when the mirror does not hold it
        whole. A damaged copy is fetched again when ``fetch``.

        Raises:
            CacheDamagedError: the mirror's copy is damaged and is not to be (or cannot be)
                fetched again.
        """
        try:
            found = self._search(name, keys)
        except IntegrityError as exc:
            if not fetch:
                raise self._cache_damaged(name, exc) from None
            whole = self.shard(name, remember)  # fetched again, with a warning
            return {kb: whole.get(kb) for kb in keys}
        if found is not _PARSE:
            return found
        try:
            whole = self.cached_shard(name, remember)
        except CacheDamagedError:
            if not fetch:
                raise
            whole = self.shard(name, remember)
        if whole is None:
            return None
        with self._lock:
            self._searches.pop(name, None)
        return {kb: whole.get(kb) for kb in keys}

    def _search(self, name: str, keys: list[bytes]) -> Any:
        """The entries of ``keys`` in shard ``name`` as the mirror's whole copy of it holds
        them (``None``: it holds none; :data:`_PARSE`: parsing it pays, see
        :meth:`_mirrored_entries`): its directory (parsed once, kept with the others), then
        each key's page read (alone when the directory is known and the keys are on few
        pages, else with the whole copy), checked and searched.

        Raises:
            IntegrityError: the directory or a page is damaged.
        """
        with self._lock:
            searched = self._searches.get(name, 0)
            directory = self._directories.get(name)
        raw = None
        if directory is None:
            raw = self.mirror.get_shard(name)
            if raw is None:
                return None
            directory = fmt.decode_shard_directory(raw, name)
            _cached(self._lock, self._directories, name, directory, PAGE_CACHE)
        if searched >= SEARCHES_BEFORE_PARSE * len(directory.pages) or len(keys) * 3 >= directory.count > 0:
            return _PARSE
        by_page: dict[int | None, list[bytes]] = {}
        for key in keys:
            by_page.setdefault(directory.page_of(key), []).append(key)
        if raw is None and len(by_page) * 4 > len(directory.pages):  # a quarter: read it whole
            raw = self.mirror.get_shard(name)
            if raw is None:
                return None
        view = memoryview(raw) if raw is not None else None
        out: dict[bytes, Entry | None] = {}
        for i, kbs in by_page.items():
            if i is None:
                out.update(dict.fromkeys(kbs))
                continue
            ref = directory.pages[i]
            if view is not None:
                data = view[ref.offset : ref.offset + ref.length]
            else:
                data = self.mirror.get_shard_part(name, ref.offset, ref.length)
                if data is None:
                    return None
            out.update(fmt.search_page(data, directory, i, kbs, name))
        with self._lock:
            self._searches[name] = self._searches.get(name, 0) + len(by_page)
        return out

    def _records_near(
        self, name: str, key: bytes, fetch: bool, manifest: dict
    ) -> Mapping[bytes, Entry] | None:
        """Records of shard ``name`` that hold ``key``'s if the shard has it: the whole
        shard when local (or when ``manifest`` says shards are small: then fetched whole),
        else the key's page (``None``: not local, and not ``fetch``)."""
        whole = _memory(self._lock, self._shards, name)
        if whole is not None:
            return whole
        directory = _memory(self._lock, self._directories, name)
        if directory is not None:
            i = directory.page_of(key)
            page = {} if i is None else _memory(self._lock, self._pages, f"{name}#{i}")
            if page is not None:
                return page
        try:
            whole = self.cached_shard(name)
        except CacheDamagedError:
            if not fetch:
                raise
            whole = self.shard(name)
        if whole is not None:
            return whole
        if directory is None:
            if fetch and manifest["n_keys"] <= WHOLE_SHARD_RECORDS * manifest["n_shards"]:
                return self.shard(name)
            directory, whole = self._directory(name, fetch)
            if directory is None:
                return whole
        i = directory.page_of(key)
        return {} if i is None else self._page(name, directory, i, fetch)

    def _guard(self, name: str) -> threading.Lock:
        """The lock that makes one thread at a time fetch ``name`` (a shard or a piece)."""
        with self._lock:
            return self._fetching.setdefault(name, threading.Lock())

    def _directory(
        self, name: str, fetch: bool
    ) -> tuple[fmt.ShardDirectory | None, dict[bytes, Entry] | None]:
        """``(directory, None)`` of shard ``name`` from the mirror or fetched;
        ``(None, shard)`` when the whole shard came with it (kept as :meth:`shard` keeps
        it); ``(None, None)`` when it is not local and not ``fetch``.

        Raises:
            CacheDamagedError: the mirror's copy is damaged and cannot be fetched again.
        """
        damage = None
        piece = self.mirror.get_shard(name + DIRECTORY_PIECE)
        if piece is not None:
            try:
                directory = fmt.decode_directory(piece, name)
                return _cached(self._lock, self._directories, name, directory, PAGE_CACHE), None
            except IntegrityError as exc:
                damage = self._cache_damaged(name, exc)
        if not fetch:
            if damage is not None:
                raise damage
            return None, None
        with self._guard(name + DIRECTORY_PIECE):
            directory = _memory(self._lock, self._directories, name)
            return (directory, None) if directory is not None else self._fetch_directory(name, damage)

    def _fetch_directory(
        self, name: str, damage: CacheDamagedError | None
    ) -> tuple[fmt.ShardDirectory | None, dict[bytes, Entry] | None]:
        """GET the end of shard ``name``: its directory (a second GET if it is over
        :data:`DIRECTORY_READ`), or the whole shard if that small; see :meth:`_directory`."""
        if damage is not None:
            self._warn_damaged(name)
        try:
            self._require_conn()
            tail, size = self.conn.get_tail(name, DIRECTORY_READ)
        except OfflineError:
            if damage is not None:
                raise damage from None
            raise
        if size > fmt.MAX_SHARD_BYTES:
            raise IntegrityError(
                f"{name} is {size:,} bytes, over the {fmt.MAX_SHARD_BYTES:,} of any index shard; "
                "the remote is damaged or not an ebooklet database. Run ebooklet.check() on it."
            )
        if len(tail) == size:
            shard = fmt.decode_shard(tail, name)
            self.mirror.set_shard(name, tail)
            return None, self._remember(name, shard)
        need = fmt.shard_directory_length(tail[-fmt.DIRECTORY_TRAILER_SIZE :], name, size)
        need += fmt.DIRECTORY_TRAILER_SIZE
        if need > len(tail):
            tail = bytes(self.conn.get_range(name, size - need, need))
        piece = tail[len(tail) - need : len(tail) - fmt.DIRECTORY_TRAILER_SIZE]
        directory = fmt.decode_directory(piece, name, size)
        self.mirror.set_shard(name + DIRECTORY_PIECE, piece)
        return _cached(self._lock, self._directories, name, directory, PAGE_CACHE), None

    def _page(
        self, name: str, directory: fmt.ShardDirectory, i: int, fetch: bool
    ) -> dict[bytes, Entry] | None:
        """Page ``i`` of shard ``name``: from memory, the mirror, or one range GET (kept in
        the mirror; after :data:`PAGES_BEFORE_WHOLE` such GETs of one shard, the whole
        shard instead, which holds the page's records); ``None`` when it is not local and
        not ``fetch``.

        Raises:
            IntegrityError: the page fetched is damaged or hostile.
            CacheDamagedError: the mirror's copy is damaged and cannot be fetched again.
        """
        piece = f"{name}#{i}"
        page = _memory(self._lock, self._pages, piece)
        if page is not None:
            return page
        damage = None
        raw = self.mirror.get_shard(piece)
        if raw is not None:
            try:
                return _cached(self._lock, self._pages, piece, fmt.decode_page(raw, directory, i, name), PAGE_CACHE)
            except IntegrityError as exc:
                damage = self._cache_damaged(name, exc)
        if not fetch:
            if damage is not None:
                raise damage
            return None
        if self._pages_fetched.get(name, 0) >= PAGES_BEFORE_WHOLE:
            return self.shard(name)  # many of its keys are read: the rest of it comes whole
        with self._guard(piece):
            page = _memory(self._lock, self._pages, piece)
            return page if page is not None else self._fetch_page(name, directory, i, damage)

    def _fetch_page(
        self, name: str, directory: fmt.ShardDirectory, i: int, damage: CacheDamagedError | None
    ) -> dict[bytes, Entry]:
        """GET page ``i`` of shard ``name`` by its range, validate it and keep it."""
        if damage is not None:
            self._warn_damaged(name)
        ref = directory.pages[i]
        try:
            self._require_conn()
            data = bytes(self.conn.get_range(name, ref.offset, ref.length))
        except OfflineError:
            if damage is not None:
                raise damage from None
            raise
        page = fmt.decode_page(data, directory, i, name)
        self.mirror.set_shard(f"{name}#{i}", data)
        with self._lock:
            self._pages_fetched[name] = self._pages_fetched.get(name, 0) + 1
        return _cached(self._lock, self._pages, f"{name}#{i}", page, PAGE_CACHE)

    def entries(self, keys: Iterable[bytes], manifest: dict | None = None) -> dict[bytes, Entry | None]:
        """Remote entries of many keys, fetching their shards in parallel, then reading
        them shard by shard (:meth:`shard_entries`: each shard once for all its keys, so
        that more shards than :data:`SHARD_CACHE` keeps parsed are not parsed again)."""
        manifest = manifest if manifest is not None else self.manifest
        keys = list(keys)
        if manifest is None:
            return dict.fromkeys(keys)
        by_shard = self.group_by_shard(keys, manifest)
        self.load_shards(by_shard)
        out: dict[bytes, Entry | None] = {}
        for name, kbs in by_shard.items():
            out.update(self.shard_entries(name, kbs))
        return {key: out[key] for key in keys}

    def shard_contents(
        self, head: dict | None, number: int, n_shards: int, remember: bool = True
    ) -> dict[bytes, Entry]:
        """The entries of shard ``number`` of ``n_shards`` in ``head`` (a copy; ``{}``
        without a head): when the shard count grew, those of the old shard it splits
        (see :func:`format.shard_of`). ``remember``: as :meth:`shard`."""
        if head is None:
            return {}
        old = self.shard(fmt.shard_name_at(head, fmt.shard_under(head, number, n_shards)), remember)
        if head["n_shards"] == n_shards:
            return dict(old)
        return {kb: e for kb, e in old.items() if fmt.shard_of(kb, n_shards) == number}

    def shards_to_write(
        self, head: dict | None, n_shards: int, touched: Iterable[int], remember: bool = True
    ) -> tuple[list[str | None], list[int]]:
        """The shard list of a commit of ``n_shards`` shards on top of ``head``, to be
        filled in, and the numbers of the shards it writes: the ``touched`` ones when the
        count is ``head``'s, else every shard (each old one is split: all are read now;
        ``remember``: as :meth:`load_shards`)."""
        if head is not None and n_shards == head["n_shards"]:
            return list(head["shards"]), sorted(touched)
        if head is not None:
            self.load_shards((n for _, n in fmt.iter_shard_names(head)), remember)
        return [None] * n_shards, list(range(n_shards))

    def write_shards(
        self, commit_id: str, head: dict | None, changes: Mapping[bytes, Entry | None]
    ) -> ShardsWritten:
        """Merge ``changes`` (key -> its new entry, ``None`` to delete it) into the index
        of ``head`` (``None``: a new or replaced database) and upload the shards they
        touch for commit ``commit_id``, ``conn.threads`` at a time. Nothing is committed.

        Raises:
            ShardLimitError: a shard would be larger than readers accept.
        """
        self._require_conn()
        n_shards = shard_count(head, sum(e is not None for e in changes.values()))
        groups: dict[int, list[bytes]] = {}
        for kb in changes:
            groups.setdefault(fmt.shard_of(kb, n_shards), []).append(kb)
        shards, numbers = self.shards_to_write(head, n_shards, groups)
        counts = [head["n_keys"] if head else 0, head["n_bytes"] if head else 0]

        def write(number: int) -> tuple[int, str | None, int, int]:
            contents = self.shard_contents(head, number, n_shards)
            old_keys, old_bytes = len(contents), sum(e.length for e in contents.values())
            for kb in groups.get(number, ()):
                entry = changes[kb]
                if entry is None:
                    contents.pop(kb, None)
                else:
                    contents[kb] = entry
            if contents:
                self.upload_shard(commit_id, number, contents, remember=False)
            n_bytes = sum(e.length for e in contents.values())
            return number, commit_id if contents else None, len(contents) - old_keys, n_bytes - old_bytes

        for number, written, keys_delta, bytes_delta in self.conn.workers.map(write, numbers):
            shards[number] = written
            counts[0] += keys_delta
            counts[1] += bytes_delta
        return ShardsWritten(shards, n_shards, counts[0], counts[1])

    def existing_packs(self, packs: Iterable[bytes]) -> set[bytes]:
        """Those of ``packs`` still in the bucket: one 1-byte GET each, in parallel (works
        anonymously too)."""
        self._require_conn()
        conn = self.conn

        def exists(pack: bytes) -> bool:
            try:
                conn.get_range(fmt.pack_name(pack), 0, 1)
                return True
            except RemoteNotFoundError:
                return False

        todo = sorted(set(packs))
        return {p for p, ok in zip(todo, conn.workers.map(exists, todo), strict=True) if ok}

    def iter_entries(self, manifest: dict | None = None) -> Iterator[tuple[bytes, Entry]]:
        """Every ``(key, entry)`` of the remote index (all shards fetched in parallel).

        Raises:
            IntegrityError: a shard lists a key of another (:func:`format.check_placement`).
        """
        manifest = manifest if manifest is not None else self.manifest
        if manifest is None:
            return
        placed = list(fmt.iter_shard_names(manifest))
        self.load_shards(name for _, name in placed)
        for number, name in placed:
            shard = self.shard(name)
            fmt.check_placement(shard, number, manifest["n_shards"], name)
            yield from shard.items()

    # ------------------------------------------------------------ values

    def fetch_values(
        self, wanted: Sequence[tuple[bytes, Entry]], reuse_buffers: bool = False
    ) -> Iterator[tuple[bytes, Entry, bytes | memoryview]]:
        """Download and md5-verify values; yields ``(key, entry, bytes)``.

        Neighbouring values of the same pack are coalesced into one range GET;
        ranges are fetched ``conn.workers.threads`` at a time. Values larger than
        :data:`PART_SIZE` come last, see :meth:`_fetch_large`. With
        ``reuse_buffers``, those come as memoryviews of buffers that later values
        reuse: each is valid only until the caller asks for the next item.

        Raises:
            IntegrityError: a value does not match its md5.
        """
        self._require_conn()
        ranges = plan_ranges(wanted)
        batch: list[_Range] = []
        for rng in ranges:
            if rng.length > PART_SIZE:
                continue
            batch.append(rng)
            if len(batch) == self.conn.workers.threads:
                yield from self._fetch_batch(batch)
                batch = []
        yield from self._fetch_batch(batch)
        yield from self._fetch_large([rng for rng in ranges if rng.length > PART_SIZE], reuse_buffers)

    def _download(self, rng: _Range, into: bytearray | None = None) -> bytes | memoryview:
        return self.conn.get_range(fmt.pack_name(rng.pack), rng.start, rng.length, into)

    def _fetch_batch(self, batch: list[_Range]) -> Iterator[tuple[bytes, Entry, bytes]]:
        for rng, data in zip(batch, self.conn.workers.map(self._download, batch), strict=False):
            yield from self._verified(rng, data)

    def _fetch_large(
        self, ranges: list[_Range], reuse_buffers: bool = False
    ) -> Iterator[tuple[bytes, Entry, bytes | memoryview]]:
        """Large values, each one GET, md5-verified on the connection's threads: while
        the caller handles one, the next ones download, at most
        :data:`LARGE_IN_FLIGHT` bytes held here (the one handed over included).

        Each GET reads into one new bytes object, or with ``reuse_buffers`` into a
        buffer freed by an earlier value: fresh memory is slow to touch (page faults;
        on a VM, 1-3 ms per MiB), a reused buffer is not. A reused buffer counts at its
        own size; spare buffers only ever held downloads counted before, and are
        dropped when the next value needs a bigger one.
        """
        todo = deque(ranges)
        pending: deque[tuple[int, bytearray | None, Future]] = deque()
        free: list[bytearray] = []
        held = 0
        try:
            while pending or todo:
                while todo and (not pending or held + todo[0].length <= LARGE_IN_FLIGHT):
                    rng = todo.popleft()
                    buffer = _buffer_for(free, rng.length) if reuse_buffers else None
                    size = max(len(buffer), rng.length) if buffer is not None else rng.length
                    future = self.conn.workers.submit(self._fetch_verified, rng, buffer)
                    pending.append((size, buffer, future))
                    held += size
                size, buffer, future = pending.popleft()
                yield from future.result()
                held -= size
                if buffer is not None:
                    free.append(buffer)
        finally:
            for _, _, future in pending:
                future.cancel()

    def _fetch_verified(
        self, rng: _Range, into: bytearray | None = None
    ) -> list[tuple[bytes, Entry, bytes | memoryview]]:
        return list(self._verified(rng, self._download(rng, into)))

    @staticmethod
    def _verified(rng: _Range, data: bytes | memoryview) -> Iterator[tuple[bytes, Entry, bytes | memoryview]]:
        view = memoryview(data)
        for key, entry in rng.items:
            start = entry.offset - rng.start
            value = view[start : start + entry.length]
            if fmt.md5(value) != entry.md5:
                raise IntegrityError(
                    f"The value of key {key!r} in {fmt.pack_name(entry.pack)} does not match "
                    "its md5: the pack is corrupted. Nothing was cached; run ebooklet.check()."
                )
            whole = start == 0 and entry.length == len(data)
            yield key, entry, data if whole else bytes(value)

    # ------------------------------------------------------------ uploads

    def upload_pack(self, items: Sequence[tuple[bytes, bytes, bytes, int]]) -> PackUpload:
        """Upload ``(key, value, md5, timestamp)`` items as one new pack.

        Returns the pack and each key's new :class:`Entry`. A large value (over :data:`PART_SIZE`)
        alone goes up as :meth:`upload_large` sends it; a pack of small values (at most
        ``PACK_SIZE`` plus one value) is one PUT, even when its footer takes it past
        ``PART_SIZE``.
        """
        self._require_conn()
        if len(items) == 1 and len(items[0][1]) > PART_SIZE:
            key, value, _, ts = items[0]
            return self.upload_large(key, value, ts, hashlib.md5(value, usedforsecurity=False))
        new = NewPack()
        for item in items:
            new.add(*item)
        footer = self.send_pack(new)
        return PackUpload(new.pack, footer, list(new.located()))

    def send_pack(self, new: NewPack) -> bytes:
        """Upload a pack of small values filled by the caller (one PUT of its values and
        footer, not joined); returns its footer (trailer included)."""
        self._require_conn()
        footer = new.footer()
        self.conn.put(fmt.pack_name(new.pack), [new.values, footer])
        return footer

    def upload_values(self, items: Iterable[tuple[bytes, bytes, bytes, int]]) -> Iterator[PackUpload]:
        """Upload ``(key, value, md5, timestamp)`` items as new packs; yields each
        :class:`PackUpload` once it is up (their ``located`` entries are what an index
        needs). Values are grouped into packs closed once they reach :data:`PACK_SIZE`,
        up to ``conn.threads`` of them uploading at once on the connection's workers; a
        value over :data:`PART_SIZE` goes up alone from the calling thread (a multipart
        upload runs its parts on those workers). ``items`` is read as packs are sent."""
        self._require_conn()
        pending: deque[Future] = deque()
        pack: list[tuple[bytes, bytes, bytes, int]] = []
        size = 0
        for item in items:
            if len(item[1]) > PART_SIZE:
                yield self.upload_pack([item])
                continue
            pack.append(item)
            size += len(item[1])
            if size >= PACK_SIZE:
                pending.append(self.conn.workers.submit(self.upload_pack, pack))
                pack, size = [], 0
                while len(pending) > self.conn.threads:
                    yield pending.popleft().result()
        if pack:
            pending.append(self.conn.workers.submit(self.upload_pack, pack))
        while pending:
            yield pending.popleft().result()

    def upload_large(self, key: bytes, value: bytes, ts: int, hashed: Any) -> PackUpload:
        """Upload one large value as a pack of its own; returns it with its new :class:`Entry`.

        ``hashed`` is the ``hashlib.md5`` state after ``value`` (the caller hashed it to
        learn its md5); the pack's ``Content-MD5`` carries it on over the footer, so the
        value is read once. A pack up to :data:`PUT_MAX` is one PUT of the value and
        the footer, not joined; a larger one goes by multipart (see :func:`_parts`).
        """
        self._require_conn()
        m = hashed.digest()
        pack = fmt.new_id()
        footer = fmt.encode_pack_footer([(key, m, ts, 0, len(value))])
        name = fmt.pack_name(pack)
        if len(value) + len(footer) <= PUT_MAX:
            whole = hashed.copy()
            whole.update(footer)
            self.conn.put(name, [value, footer], content_md5=whole.digest())
        else:
            self.conn.put_multipart(name, _parts(value, footer))
        return PackUpload(pack, footer, [(key, Entry(m, ts, pack, 0, len(value)))])

    def upload_shard(
        self, commit_id: str, number: int, entries: dict[bytes, Entry], remember: bool = True
    ) -> str:
        """Upload one index shard for ``commit_id``; returns its object suffix.

        The shard is kept in the local mirror, and with ``remember`` its decoded
        ``entries`` in memory too (a push of many shards does not keep them: memory).

        Raises:
            ShardLimitError: readers would refuse the shard (nothing is uploaded).
        """
        name = fmt.shard_name(commit_id, number)
        data = fmt.encode_shard(entries)
        self.conn.put(name, data)
        if remember:
            self.keep_shard(name, data, entries)
        else:
            self.mirror.set_shard(name, data)
        return name

    def keep_shard(self, name: str, data: bytes, entries: dict[bytes, Entry]) -> None:
        """Keep a shard this process wrote: its bytes ``data`` in the mirror, its decoded
        ``entries`` in memory, so that reading it makes no request."""
        self.mirror.set_shard(name, data)
        self._remember(name, entries)

    # ------------------------------------------------------------ commit

    def commit(self, manifest: dict, base_etag: str | None) -> str:
        """Commit ``manifest``: its commit record, then the conditional manifest PUT.

        Returns the new ETag. Raises :class:`PreconditionFailed` when another
        writer committed first (read back, so a retried PUT that had in fact
        succeeded is not mistaken for a loss).
        """
        self._require_conn()
        body = fmt.encode_manifest(manifest)
        self.conn.put(fmt.commit_name(manifest["seq"], manifest["commit_id"]), body)
        if not self.conn.conditional_writes():
            warnings.warn(
                f"{self.conn!r}: the server ignores conditional writes; "
                "only the write lock protects this push from a concurrent writer.",
                ConsistencyWarning,
                stacklevel=3,
            )
        try:
            etag = self.conn.put(
                "", body, precondition=Mode.CREATE if base_etag is None else IfMatch(base_etag),
                content_type="application/json",
            )
        except (PreconditionFailed, OfflineError, RemoteError) as exc:
            head, head_etag = self._read_back()
            if head is not None and head.get("commit_id") == manifest["commit_id"]:
                etag = head_etag
            elif head is None and base_etag is None and isinstance(exc, PreconditionFailed):
                raise self._folder_error() from None
            else:
                raise exc from None
        self.adopt(manifest, etag)
        return etag

    def _folder_error(self) -> RemoteError:
        """The creating PUT (``If-None-Match: *``) failed although no manifest can be
        read: no writer committed first. Path-based stores (SeaweedFS) answer so when
        other objects use the database's key as a folder (``D/...``); retrying cannot
        help."""
        key = self.conn.db_key
        return RemoteError(
            f"Cannot create the database at {key!r}: the server refused to create it "
            "(412) although no database is there. Other objects probably use it as a "
            f"folder ({key}/...): path-based stores such as SeaweedFS then refuse the "
            "conditional create (If-None-Match) that keeps concurrent creators apart. "
            "Choose another db_key, or move the objects under it."
        )

    def _read_back(self) -> tuple[dict | None, str | None]:
        try:
            answer = self.conn.get("", max_bytes=fmt.MAX_MANIFEST_BYTES)
        except (RemoteNotFoundError, OfflineError):
            return None, None
        return fmt.decode_manifest(answer.data), answer.etag


def _cached(lock: threading.RLock, cache: OrderedDict, name: str, value: Any, most: int) -> Any:
    """Put ``value`` in the LRU ``cache`` of at most ``most`` items; returns it."""
    with lock:
        cache[name] = value
        cache.move_to_end(name)
        while len(cache) > most:
            cache.popitem(last=False)
    return value


def _memory(lock: threading.RLock, cache: OrderedDict, name: str) -> Any:
    """The item ``name`` of the LRU ``cache`` (``None`` if absent), marked as just used."""
    with lock:
        value = cache.get(name)
        if value is not None:
            cache.move_to_end(name)
    return value


def _shard_names(manifest: dict | None) -> set[str]:
    return {name for _, name in fmt.iter_shard_names(manifest)} if manifest else set()


_PARSE: Any = object()
"""Returned by :meth:`RemoteIndex._search` when parsing the shard whole pays."""

MISSING_SHARD: Any = REMOTE_UNKNOWN
"""Returned by :meth:`RemoteIndex.entry` with ``fetch=False`` when the shard is not local:
the remote version is unknown to the three-way rule (:func:`.local.three_way`)."""


def shard_count(head: dict | None, added: int) -> int:
    """The number of index shards of a commit on top of ``head`` (``None``: a new or
    replaced database) adding at most ``added`` keys: ``head``'s, doubled while the keys
    would average more than :data:`format.KEYS_PER_SHARD` a shard (never fewer)."""
    old_n = head["n_shards"] if head else 1
    old_keys = head["n_keys"] if head else 0
    return max(old_n, fmt.shards_needed(old_keys + added, fmt.KEYS_PER_SHARD))


class ShardsWritten(NamedTuple):
    """The index of a commit once :meth:`RemoteIndex.write_shards` uploaded its shards:
    the manifest's ``shards``, ``n_shards``, ``n_keys`` and ``n_bytes``."""

    shards: list[str | None]
    n_shards: int
    n_keys: int
    n_bytes: int


class PackUpload(NamedTuple):
    """A pack just uploaded: its id, its footer (trailer included) and where each of its
    values now lies."""

    pack: bytes
    footer: bytes
    located: list[tuple[bytes, Entry]]


class NewPack:
    """A pack of small values being filled (by a push), held as packed bytes: its values
    back to back and its footer's records, and a reference to each key; no object per
    value. Uploaded by :meth:`RemoteIndex.send_pack`."""

    def __init__(self) -> None:
        self.pack = fmt.new_id()
        self.keys: list[bytes] = []
        self.values = bytearray()
        self._footer = fmt.PackFooter()

    def add(self, key: bytes, value: bytes | memoryview, md5_: bytes, ts: int) -> None:
        """Append one value (of md5 ``md5_``, timestamp ``ts``) of ``key``."""
        self._footer.add(key, md5_, ts, len(self.values), len(value))
        self.values += value
        self.keys.append(key)

    def extend(self, keys: list[bytes], values: list[bytes], md5s: list[bytes], timestamps: list[int]) -> None:
        """Append values, a column each (as :meth:`add` one at a time)."""
        lengths = list(map(len, values))
        offsets = itertools.islice(itertools.accumulate(lengths, initial=len(self.values)), len(lengths))
        self._footer.extend(keys, md5s, timestamps, offsets, lengths)
        self.values += b"".join(values)
        self.keys.extend(keys)

    def footer(self) -> bytes:
        """The pack's footer (trailer included)."""
        return self._footer.encode()

    def entries(self) -> Iterator[Entry]:
        """Each value's :class:`Entry` in this pack, in order (of the keys of ``keys``)."""
        return self._footer.entries(self.pack)

    def located(self) -> Iterator[tuple[bytes, Entry]]:
        """Each key's :class:`Entry` in this pack, in order."""
        return zip(self.keys, self.entries(), strict=True)


class _Range(NamedTuple):
    pack: bytes
    start: int
    length: int
    items: list[tuple[bytes, Entry]]


def plan_ranges(wanted: Iterable[tuple[bytes, Entry]]) -> list[_Range]:
    """Group wanted values into as few range GETs as sensible (same pack, close by); a
    value over :data:`PART_SIZE` is a range of its own."""
    by_pack: dict[bytes, list[tuple[bytes, Entry]]] = {}
    for item in wanted:
        by_pack.setdefault(item[1].pack, []).append(item)
    ranges = []
    for pack, items in by_pack.items():
        items.sort(key=_offset)
        current: list[tuple[bytes, Entry]] = []
        start = end = 0
        alone = False  # the current range is one large value
        for item in items:
            _, _, _, offset, length = item[1]
            if current and (
                alone or length > PART_SIZE or offset - end > RANGE_GAP or offset + length - start > RANGE_MAX
            ):
                ranges.append(_Range(pack, start, end - start, current))
                current = []
            if not current:
                start, alone = offset, length > PART_SIZE
            current.append(item)
            if offset + length > end:
                end = offset + length
        if current:
            ranges.append(_Range(pack, start, end - start, current))
    return ranges


def _offset(item: tuple[bytes, Entry]) -> int:
    return item[1].offset


def _buffer_for(free: list[bytearray], length: int) -> bytearray:
    """A buffer for a value of ``length`` bytes: the smallest big enough in ``free`` (taken
    out of it), else a new empty one that grows as the bytes arrive (``length`` comes from
    the index: it is never allocated on trust), and then the buffers in ``free``, all too
    small, are dropped (kept, they would pile up while values grow)."""
    fits = [b for b in free if len(b) >= length]
    if not fits:
        free.clear()
        return bytearray()
    best = min(fits, key=len)
    free.remove(best)
    return best


def _parts(value: bytes, footer: bytes) -> Iterator[memoryview | bytes]:
    """Cut ``value + footer`` into multipart parts of :data:`PART_SIZE`, the last one
    taking the rest (up to twice that, no tiny last part); all but the last are slices
    of ``value``, not copies."""
    view = memoryview(value)
    last = max(1, (len(value) + len(footer)) // PART_SIZE) - 1
    for start in range(0, last * PART_SIZE, PART_SIZE):
        yield view[start : start + PART_SIZE]
    yield b"".join([view[last * PART_SIZE :], footer])


TAIL_READ = 64 << 10
"""Bytes read from a pack's end to get its footer in one GET (most footers fit)."""


def read_pack_footer(conn: Store, name: str) -> tuple[list[fmt.PackItem], bytes, int]:
    """A pack's footer items, its tail bytes (footer + trailer) and its size.

    One suffix-range GET, a second only for a footer over :data:`TAIL_READ`;
    works anonymously (no HEAD, no listing). The footer length must fit in the
    object and in :data:`format.MAX_FOOTER_BYTES`, and every value must lie before it.

    Raises:
        IntegrityError: the pack is truncated, damaged or not an ebooklet pack.
    """
    tail, size = conn.get_tail(name, TAIL_READ)
    footer_len = fmt.pack_footer_length(tail[-fmt.PACK_TRAILER_SIZE :], name, size)
    need = footer_len + fmt.PACK_TRAILER_SIZE
    if need > len(tail):
        tail = bytes(conn.get_range(name, size - need, need))
    tail = tail[-need:]
    return fmt.decode_pack_footer(tail[:footer_len], name, size - need), tail, size
