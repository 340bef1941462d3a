"""Every byte layout ebooklet writes: the manifest, index shards and packs.

The layouts are documented in ``docs/format.md``; this module is their only
reader and writer. All integers are little-endian.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import operator
import re
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

import orjson

from .errors import FormatVersionError, IntegrityError, ShardLimitError

FORMAT_NAME = "ebooklet"
FORMAT_VERSION = 2

NO_MD5 = b"\x00" * 16
"""Stands for "no value" wherever an md5 field is required (absent or deleted)."""

SHARD_MAGIC = b"EBKIDX02"
PACK_MAGIC = b"EBKPCK01"

# md5, timestamp, pack id, offset, length, key offset, key length
_SHARD_RECORD = struct.Struct("<16sq16sQQII")
# md5, timestamp, offset, length, key offset, key length
_PACK_RECORD = struct.Struct("<16sqQQII")
_HEADER = struct.Struct("<8sI")  # magic, record count
_DIRECTORY_HEADER = struct.Struct("<8sII")  # magic, records per page, record count
_PAGE_REF = struct.Struct("<III16s")  # page offset, page length, first key length, page md5
_SHARD_TRAILER = struct.Struct("<I8s")  # directory length, magic
_PACK_TRAILER = struct.Struct("<Q8s")  # footer length, magic

# ---------------------------------------------------------------- limits of what a reader accepts
# Everything read from a bucket is checked against these before it is used (docs/format.md,
# "Validation and limits"): a hostile or damaged object gives an IntegrityError, never a
# huge allocation, a name outside the database, or a raw struct/orjson/KeyError.

MAX_MANIFEST_BYTES = 16 << 20
"""Largest manifest (or commit record) body a reader downloads."""
KEYS_PER_SHARD = 1 << 14
"""Writers keep about this many keys per index shard (16,384; read as
``format.KEYS_PER_SHARD`` at each push, so that a test may change it): the shard count is the smallest power of two that keeps the average at or below it, and
keys are spread by hash, so a shard holds a little more than the average at most."""
MAX_SHARD_RECORDS = 4 * KEYS_PER_SHARD
"""Most records a reader accepts in one index shard (65,536): four times what writers
put there, so an honest shard is never refused and a hostile one stays small."""
SHARD_KEY_BYTES = 64 << 20
"""Most key bytes a reader accepts in one index shard: keys averaging 1 KiB at
:data:`MAX_SHARD_RECORDS` (4 KiB at :data:`KEYS_PER_SHARD`). A writer whose shard would
hold more refuses to push (:func:`encode_shard`)."""
PAGE_RECORDS = 256
"""Records per page of an index shard, as writers cut them (read as ``format.PAGE_RECORDS``
at each shard written, so that a test may change it): about 20 KiB with short keys, what
a cold read of one key downloads besides the shard's directory."""
MAX_DIRECTORY_BYTES = (
    _DIRECTORY_HEADER.size + (MAX_SHARD_RECORDS // PAGE_RECORDS) * (_PAGE_REF.size + (1 << 16)) + 16
)
"""Largest directory of an index shard a reader accepts (16 MiB: 256 pages whose first keys
are as long as keys can be); a writer's, of pages of :data:`PAGE_RECORDS`, always fits."""
MAX_SHARD_BYTES = (
    MAX_SHARD_RECORDS * _SHARD_RECORD.size + SHARD_KEY_BYTES + MAX_DIRECTORY_BYTES
    + _SHARD_TRAILER.size
)
"""Largest index shard a reader downloads (84 MiB: records, keys, directory, trailer)."""
DIRECTORY_TRAILER_SIZE = _SHARD_TRAILER.size
"""Bytes of the trailer at the end of an index shard (its directory's length and magic)."""
MAX_FOOTER_BYTES = 256 << 20
"""Largest pack footer a reader downloads."""
MAX_LOCK_BYTES = 64 << 10
"""Largest lock record a reader downloads."""
MAX_SHARDS = 1 << 18
"""Most index shards a manifest may declare (a power of two up to this)."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects in a manifest (its user metadata included)."""
MAX_MESSAGE = 1 << 16
"""Longest commit message, in characters."""
MAX_SEQ = 10**12 - 1
"""Largest commit sequence number (commit record names hold 12 digits)."""
MAX_COUNT = (1 << 63) - 1
"""Largest key or byte count of a manifest."""
KEY_MAX = (1 << 16) - 1
"""Longest encoded key (booklet keeps a key's length in 2 bytes)."""
VALUE_MAX = (1 << 32) - 1
"""Longest encoded value (booklet keeps a value's length in 4 bytes)."""
TIMESTAMP_END = 1 << 56
"""Timestamps are µs since the epoch in ``0 <= t < TIMESTAMP_END``."""
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MAX_OBJECT_SIZE = 5 << 40
"""S3's largest object (5 TiB): no value may claim to lie beyond it."""

_ID = re.compile(r"[0-9a-f]{32}")
_SERIALIZER = re.compile(r"[A-Za-z0-9_]{1,64}")
_SUFFIX = re.compile(r"(\.ebk(/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199})+)?")


try:  # CPython's own MD5: a third faster than OpenSSL's on a 100-byte value, slower on 1 MiB
    from _md5 import md5 as _small_md5
except ImportError:  # a build without it
    _small_md5 = functools.partial(hashlib.md5, usedforsecurity=False)
_SMALL_MD5 = 1024  # bytes below which _small_md5 is the faster


def md5(data: bytes | memoryview) -> bytes:
    """The 16-byte MD5 digest of ``data`` (the identity of a value)."""
    if len(data) < _SMALL_MD5:
        return _small_md5(data).digest()
    return hashlib.md5(data, usedforsecurity=False).digest()


_digest = operator.methodcaller("digest")


def md5s(values: list[bytes]) -> list[bytes]:
    """The :func:`md5` of each of ``values`` (for many values: no Python call a value
    when they are all small)."""
    if max(map(len, values), default=0) < _SMALL_MD5:
        return list(map(_digest, map(_small_md5, values)))
    return list(map(md5, values))


class Entry(NamedTuple):
    """Where one value lives remotely: one record of the remote index."""

    md5: bytes
    timestamp: int
    pack: bytes
    offset: int
    length: int


_new = tuple.__new__
"""``_new(Entry, fields)`` is ``Entry(*fields)`` without the Python-level frame of a
NamedTuple's ``__new__`` (for the loops that build one per record)."""


# ---------------------------------------------------------------- object names


def pack_name(pack: bytes) -> str:
    """Object-key suffix of a pack, given its 16-byte id."""
    return f".ebk/pack/{pack.hex()}"


def shard_name(commit_id: str, shard: int) -> str:
    """Object-key suffix of one index shard written by commit ``commit_id``."""
    return f".ebk/index/{commit_id}-{shard}"


def commit_name(seq: int, commit_id: str) -> str:
    """Object-key suffix of the commit record of ``seq``."""
    return f".ebk/commit/{seq:012d}-{commit_id}"


LOCK_NAME = ".ebk/lock"
PREFIX = ".ebk/"

_OWN_NAME = re.compile(
    r"\.ebk/(?:pack/[0-9a-f]{32}|index/[0-9a-f]{32}-[0-9]{1,7}|commit/[0-9]{12}-[0-9a-f]{32})"
)


def is_id(value: Any) -> bool:
    """True when ``value`` is a uuid or commit id: 32 lowercase hex digits, nothing else."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def is_own_name(suffix: str) -> bool:
    """True when ``suffix`` is the name of a pack, index shard or commit record as ebooklet
    makes them (a name from a listing that is not is left alone, never read or written)."""
    return _OWN_NAME.fullmatch(suffix) is not None


def check_suffix(suffix: str) -> str:
    """``suffix`` itself if it may follow the database key in an object key: empty, or
    ``.ebk/`` and path segments of letters, digits, ``_``, ``-`` and inner dots (no empty,
    ``.`` or ``..`` segment, so no URL can leave the database's objects).

    Raises:
        IntegrityError: any other name (it came from a damaged or hostile remote).
    """
    if not isinstance(suffix, str) or _SUFFIX.fullmatch(suffix) is None:
        raise IntegrityError(
            f"Refused the object name {suffix!r:.120}: it is not one ebooklet makes and could "
            "point outside the database. The remote is damaged or hostile; do not use it."
        )
    return suffix


def new_id() -> bytes:
    """A fresh random 16-byte identifier (packs)."""
    return uuid.uuid4().bytes


def new_commit_id() -> str:
    """A fresh random commit id (32 hex digits)."""
    return uuid.uuid4().hex


# ---------------------------------------------------------------- sharding


_KEY_HASHER = hashlib.blake2b(digest_size=8)
"""An unfed BLAKE2b of 8-byte digests: :func:`key_hash` feeds a copy of it (a fifth
faster than making one from its parameters)."""


def key_hash(key: bytes | memoryview) -> int:
    """The 64-bit hash that places ``key`` (its BLAKE2b digest of 8 bytes, big-endian,
    unsigned): :func:`shard_of` takes its top bits."""
    hasher = _KEY_HASHER.copy()
    hasher.update(key)
    return int.from_bytes(hasher.digest(), "big")


def shard_of(key: bytes, n_shards: int) -> int:
    """The shard that holds ``key`` among ``n_shards`` (a power of two).

    The top bits of :func:`key_hash`: doubling ``n_shards`` splits every
    shard in two without moving keys between the others.
    """
    if n_shards == 1:
        return 0
    return shard_of_hash(key_hash(key), n_shards)


def shards_of(keys: Iterable[bytes], n_shards: int) -> list[int]:
    """:func:`shard_of` of each of ``keys`` (for many keys: no Python call a key)."""
    shift, copy, from_bytes = 65 - n_shards.bit_length(), _KEY_HASHER.copy, int.from_bytes
    numbers = []
    for key in keys:
        hasher = copy()
        hasher.update(key)
        numbers.append(from_bytes(hasher.digest(), "big") >> shift)
    return numbers


def shard_of_hash(h: int, n_shards: int) -> int:
    """The shard among ``n_shards`` of a key whose :func:`key_hash` is ``h``."""
    return h >> (65 - n_shards.bit_length())


def shard_hashes(number: int, n_shards: int) -> tuple[int, int]:
    """``(first, end)``: the :func:`key_hash` values of the keys of shard ``number`` of
    ``n_shards`` are those from ``first`` up to ``end`` (excluded)."""
    shift = 65 - n_shards.bit_length()
    return number << shift, (number + 1) << shift


def check_placement(keys: Iterable[bytes], number: int, n_shards: int, name: str) -> None:
    """Check that every key of the shard at position ``number`` of ``n_shards`` belongs
    there (:func:`shard_of`): a key the index lists in another shard would be iterated
    but never found by a lookup, which goes to its own shard.

    Raises:
        IntegrityError: a key belongs to another shard (a damaged or forged index).
    """
    if n_shards == 1:
        return
    for kb in keys:
        if shard_of(kb, n_shards) != number:
            raise IntegrityError(
                f"Index shard {name} (shard {number} of {n_shards}) lists key "
                f"{bytes(kb[:40])!r}, which belongs to shard {shard_of(kb, n_shards)}: the "
                "remote index is damaged or was not written by ebooklet. Ask its owner to "
                "check it (ebooklet.check) or to push it again."
            )


def shards_needed(n_keys: int, per_shard: int) -> int:
    """The smallest power of two of shards that keeps each near ``per_shard`` keys."""
    n = 1
    while n * per_shard < n_keys:
        n *= 2
    return n


# ---------------------------------------------------------------- index shards


class PageRef(NamedTuple):
    """One page of an index shard, as its directory records it."""

    offset: int
    length: int
    md5: bytes


class ShardDirectory(NamedTuple):
    """The directory of an index shard: where its pages are and the first key of each.

    Every page but the last holds ``page_records`` records; the last holds the rest.
    """

    page_records: int
    count: int
    pages: list[PageRef]
    first_keys: list[bytes]

    def page_of(self, key: bytes) -> int | None:
        """The page where ``key`` is if the shard holds it (``None``: before the first key)."""
        i = bisect.bisect_right(self.first_keys, key) - 1
        return i if i >= 0 else None

    def records_in(self, page: int) -> int:
        """How many records page number ``page`` holds."""
        return min(self.page_records, self.count - page * self.page_records)

    @property
    def pages_end(self) -> int:
        """Where the pages end (and the directory starts) in the shard."""
        return self.pages[-1].offset + self.pages[-1].length if self.pages else 0


def encode_shard(entries: Mapping[bytes, Entry]) -> bytes:
    """Serialize one index shard (``key -> Entry``): its records sorted by key in pages of
    :data:`PAGE_RECORDS`, then the directory of the pages, then the trailer.

    Raises:
        ShardLimitError: readers would refuse the shard: over :data:`MAX_SHARD_RECORDS`
            records or :data:`SHARD_KEY_BYTES` of keys (nothing is written).
    """
    _check_shard_limits(len(entries), sum(map(len, entries)))
    keys = sorted(entries)
    values = list(map(entries.__getitem__, keys))
    per_page = PAGE_RECORDS
    pages: list[bytes] = []
    refs = bytearray(_DIRECTORY_HEADER.pack(SHARD_MAGIC, per_page, len(keys)))
    first_keys = bytearray()
    at = 0
    for start in range(0, len(keys), per_page):
        page = _encode_page(keys[start : start + per_page], values[start : start + per_page])
        first = keys[start]
        refs += _PAGE_REF.pack(at, len(page), len(first), md5(page))
        first_keys += first
        pages.append(page)
        at += len(page)
    directory = bytes(refs + first_keys)
    directory += md5(directory)
    return b"".join([*pages, directory, _SHARD_TRAILER.pack(len(directory), SHARD_MAGIC)])


def _encode_page(keys: list[bytes], entries: list[Entry]) -> bytes:
    """One page of ``keys`` and their ``entries``: its records, then its keys back to back
    (packed a column at a time: no Python call per record)."""
    lengths = list(map(len, keys))
    md5s, timestamps, packs, offsets, value_lengths = zip(*entries, strict=True)
    records = map(
        _SHARD_RECORD.pack, md5s, timestamps, packs, offsets, value_lengths,
        itertools.accumulate(lengths, initial=0), lengths,
    )
    return b"".join([*records, *keys])


def _check_shard_limits(n_records: int, key_bytes: int) -> None:
    """Refuse to write a shard that readers would refuse (see :func:`encode_shard`)."""
    if n_records > MAX_SHARD_RECORDS or key_bytes > SHARD_KEY_BYTES:
        raise ShardLimitError(
            f"An index shard would hold {n_records:,} keys of {key_bytes:,} bytes in all, over "
            f"the {MAX_SHARD_RECORDS:,} keys or {SHARD_KEY_BYTES:,} bytes readers accept: the "
            "keys are too long (or crafted to share a shard). Nothing was committed; use "
            "shorter keys (a digest of a long key, with the long key in the value)."
        )


def shard_directory_length(trailer: bytes, name: str = "index shard", size: int | None = None) -> int:
    """Length of the directory before an index shard's trailer (its last
    :data:`DIRECTORY_TRAILER_SIZE` bytes).

    Args:
        trailer: the shard's trailer.
        name: the shard, for messages.
        size: the shard's size, when known: the directory and trailer must fit in it.

    Raises:
        IntegrityError: no trailer, a bad magic, or a directory length out of range.
    """
    return _trailer_length(
        trailer, _SHARD_TRAILER, SHARD_MAGIC, name, "index shard", "directory",
        _DIRECTORY_HEADER.size + 16, MAX_DIRECTORY_BYTES, size,
    )


def decode_directory(
    data: bytes | memoryview, name: str = "index shard", size: int | None = None
) -> ShardDirectory:
    """Parse and validate the directory of an index shard (without the trailer).

    Args:
        data: the directory bytes, its md5 included.
        name: the shard, for messages.
        size: the shard's size, when known: its pages must end where the directory starts.

    Raises:
        IntegrityError: a checksum mismatch, a bad magic, more pages than its bytes hold,
            pages that do not follow each other from offset 0 or are too short for their
            records, first keys out of order, or over :data:`MAX_SHARD_RECORDS` records.
    """
    if not _DIRECTORY_HEADER.size + 16 <= len(data) <= MAX_DIRECTORY_BYTES or md5(data[:-16]) != data[-16:]:
        raise IntegrityError(
            f"{name}: its directory is truncated or corrupted (checksum mismatch); {_DAMAGED}"
        )
    magic, per_page, count = _DIRECTORY_HEADER.unpack_from(data)
    if magic != SHARD_MAGIC or per_page < 1:
        raise IntegrityError(
            f"{name}: its directory is not an ebooklet shard directory (magic {magic!r}, "
            f"{per_page:,} records per page); {_DAMAGED}"
        )
    if count > MAX_SHARD_RECORDS:
        raise IntegrityError(
            f"{name} claims {count:,} records, over the {MAX_SHARD_RECORDS:,} of any index "
            f"shard; {_DAMAGED}"
        )
    n_pages = -(-count // per_page)
    blob = _DIRECTORY_HEADER.size + n_pages * _PAGE_REF.size
    if blob > len(data) - 16:
        raise IntegrityError(
            f"{name}: its directory claims {n_pages:,} pages, more than its {len(data):,} "
            f"bytes can hold; {_DAMAGED}"
        )
    view = memoryview(data)
    keys = view[blob:-16]
    directory = ShardDirectory(per_page, count, [], [])
    at = k_at = 0
    for i, (offset, length, k_len, digest) in enumerate(_PAGE_REF.iter_unpack(view[_DIRECTORY_HEADER.size : blob])):
        first = bytes(keys[k_at : k_at + k_len])
        least = directory.records_in(i) * _SHARD_RECORD.size
        if offset != at or length < least or k_len > KEY_MAX or k_at + k_len > len(keys):
            raise IntegrityError(
                f"{name}: its directory puts page {i} at {offset:,}+{length:,} with a first key "
                f"of {k_len:,} bytes; it must start at {at:,}, where the previous page ended, "
                f"hold its {least:,} bytes of records and its key within the directory; {_DAMAGED}"
            )
        if directory.first_keys and first <= directory.first_keys[-1]:
            raise IntegrityError(f"{name}: the first keys of its pages are not in order; {_DAMAGED}")
        directory.pages.append(PageRef(offset, length, digest))
        directory.first_keys.append(first)
        at, k_at = offset + length, k_at + k_len
    if k_at != len(keys):
        raise IntegrityError(f"{name}: its directory holds bytes no page's key uses; {_DAMAGED}")
    if size is not None and at + len(data) + _SHARD_TRAILER.size != size:
        raise IntegrityError(
            f"{name}: its pages end at {at:,}, not where its directory starts "
            f"({size - len(data) - _SHARD_TRAILER.size:,}); {_DAMAGED}"
        )
    return directory


def decode_page(
    data: bytes | memoryview, directory: ShardDirectory, page: int, name: str = "index shard"
) -> dict[bytes, Entry]:
    """Parse and validate page number ``page`` of an index shard whose directory is
    ``directory``: its md5 and length as the directory says, its records as
    :func:`decode_shard` checks them, its keys in order from the directory's first key,
    each below the next page's first key, and back to back to the page's end.

    Raises:
        IntegrityError: the page does not match its md5, or a record is out of range or
            out of order.
    """
    _check_page(data, directory, page, name)
    view = memoryview(data)
    blob = directory.records_in(page) * _SHARD_RECORD.size
    keys = bytes(view[blob:])  # one copy of the key blob: each key is then one slice of it
    rows = list(_SHARD_RECORD.iter_unpack(view[:blob]))
    following = directory.first_keys[page + 1] if page + 1 < len(directory.pages) else None
    whole = _sound_page(rows, keys, directory.first_keys[page], following)
    if whole is not None:
        return whole
    n = len(keys)
    out: dict[bytes, Entry] = {}
    packs: dict[bytes, bytes] = {}  # one object per pack id, not one per record
    at, previous = 0, None
    for md5_, ts, pack, off, length, k_off, k_len in rows:
        _check_record(name, ts, off, length, k_off, k_len, n, at)
        at = k_off + k_len
        key = keys[k_off:at]
        if key <= previous if previous is not None else key != directory.first_keys[page]:
            raise IntegrityError(
                f"{name}: the keys of page {page} are not in order from its first key; {_DAMAGED}"
            )
        out[key] = _new(Entry, (md5_, ts, packs.setdefault(pack, pack), off, length))
        previous = key
    if at != n or (following is not None and previous is not None and previous >= following):
        raise IntegrityError(
            f"{name}: page {page} holds bytes after its last key, or a key at or past the "
            f"next page's first; {_DAMAGED}"
        )
    return out


def _sound_page(
    rows: list[tuple], keys: bytes, first: bytes, following: bytes | None
) -> dict[bytes, Entry] | None:
    """The entries of a page's records ``rows`` (unpacked) and key blob ``keys`` when every
    check of :func:`decode_page` passes, made column by column (no Python call per record);
    ``None`` when any fails or there is no record (:func:`decode_page` then finds which
    check, record by record)."""
    if not rows:
        return None
    md5s, timestamps, packs, offsets, lengths, key_offsets, key_lengths = zip(*rows, strict=True)
    ends = list(itertools.accumulate(key_lengths))
    if (
        ends[-1] != len(keys) or key_offsets != (0, *ends[:-1]) or max(key_lengths) > KEY_MAX
        or min(timestamps) < 0 or max(timestamps) >= TIMESTAMP_END or max(lengths) > VALUE_MAX
        or max(map(operator.add, offsets, lengths)) > MAX_OBJECT_SIZE
    ):
        return None
    page_keys = list(map(keys.__getitem__, map(slice, key_offsets, ends)))
    if (
        page_keys[0] != first
        or not all(map(operator.lt, page_keys, itertools.islice(page_keys, 1, None)))
        or (following is not None and page_keys[-1] >= following)
    ):
        return None
    shared: dict[bytes, bytes] = {}  # one object per pack id, not one per record
    fields = zip(md5s, timestamps, map(shared.setdefault, packs, packs), offsets, lengths, strict=True)
    return dict(zip(page_keys, map(_new, itertools.repeat(Entry), fields), strict=True))


def decode_shard_directory(data: bytes | memoryview, name: str = "index shard") -> ShardDirectory:
    """The validated directory of a whole index shard ``data`` (see :func:`decode_directory`).

    Raises:
        IntegrityError: as :func:`shard_directory_length` and :func:`decode_directory`.
    """
    if len(data) > MAX_SHARD_BYTES:
        raise IntegrityError(f"{name} is over {MAX_SHARD_BYTES:,} bytes; {_DAMAGED}")
    length = shard_directory_length(data[-_SHARD_TRAILER.size :], name, len(data))
    end = len(data) - _SHARD_TRAILER.size
    return decode_directory(data[end - length : end], name, len(data))


def decode_shard(data: bytes | memoryview, name: str = "index shard") -> dict[bytes, Entry]:
    """Parse and validate a whole index shard: its directory, then every page.

    At most :data:`MAX_SHARD_BYTES` and :data:`MAX_SHARD_RECORDS` records, whose keys
    follow each other in each page's key blob as :func:`encode_shard` writes them (no two
    records share key bytes), so what is built is bounded by the shard's size
    (docs/format.md §10).

    Raises:
        IntegrityError: the shard is over those limits, truncated, corrupted or not an
            ebooklet shard; its directory is inconsistent (see :func:`decode_directory`);
            or a page is (see :func:`decode_page`).
    """
    directory = decode_shard_directory(data, name)
    view = memoryview(data)
    out: dict[bytes, Entry] = {}
    for i, ref in enumerate(directory.pages):
        out.update(decode_page(view[ref.offset : ref.offset + ref.length], directory, i, name))
    return out


_DAMAGED = (
    "the remote is damaged or not an ebooklet database. Run ebooklet.check() on it, "
    "or re-push from a good copy."
)


def _checked_table(
    data: bytes | memoryview, name: str, magic: bytes, record_size: int, what: str
) -> tuple[memoryview, int]:
    """The view of a shard or pack footer whose checksum, magic and record count are
    consistent, and where its key blob starts; checked before anything is allocated."""
    if len(data) < _HEADER.size + 16 or md5(data[:-16]) != data[-16:]:
        raise IntegrityError(f"{name} is truncated or corrupted (checksum mismatch); {_DAMAGED}")
    found, count = _HEADER.unpack_from(data)
    if found != magic:
        raise IntegrityError(f"{name} is not an ebooklet {what} (bad magic {found!r}); {_DAMAGED}")
    blob = _HEADER.size + count * record_size
    if blob > len(data) - 16:
        raise IntegrityError(
            f"{name} claims {count:,} records, more than its {len(data):,} bytes can hold; {_DAMAGED}"
        )
    return memoryview(data), blob


def _check_page(data: bytes | memoryview, directory: ShardDirectory, page: int, name: str) -> None:
    """Refuse page ``page``'s bytes ``data`` unless they match its directory's length and md5."""
    ref = directory.pages[page]
    if len(data) != ref.length or md5(data) != ref.md5:
        raise IntegrityError(
            f"{name}: page {page} is truncated or corrupted (it does not match the md5 of its "
            f"directory); {_DAMAGED}"
        )


def _check_record(
    name: str, ts: int, off: int, length: int, k_off: int, k_len: int, blob: int, at: int,
    end: int = MAX_OBJECT_SIZE,
) -> None:
    """Refuse a shard or footer record out of range: its key not at ``at`` (where the
    previous one ended), outside the ``blob``-byte key blob or too long, its timestamp
    out of range, or its value too long or ending past ``end``.

    Raises:
        IntegrityError: saying which field (:func:`_refuse_record`).
    """
    if not (
        k_off == at and k_off + k_len <= blob and k_len <= KEY_MAX and 0 <= ts < TIMESTAMP_END
        and length <= VALUE_MAX and off + length <= end
    ):
        _refuse_record(name, ts, off, length, k_off, k_len, blob, at)


def _refuse_record(
    name: str, ts: int, off: int, length: int, k_off: int, k_len: int, blob: int, at: int
) -> None:
    """Raise for a shard or footer record found out of range, saying which field is
    (``at``: where its key should start, right after the previous record's)."""
    if k_off != at:
        problem = f"a key at {k_off:,}, not at {at:,} where the previous key ended"
    elif k_off + k_len > blob or k_len > KEY_MAX:
        problem = f"a key at {k_off:,}+{k_len:,} outside its {blob:,}-byte key blob or too long"
    elif not 0 <= ts < TIMESTAMP_END:
        problem = f"a timestamp {ts} outside 0 <= t < 2**56"
    else:
        problem = f"a value of {length:,} bytes at offset {off:,}, beyond what can exist"
    raise IntegrityError(f"{name} holds {problem}; {_DAMAGED}")


def search_page(
    data: bytes | memoryview, directory: ShardDirectory, page: int, keys: Iterable[bytes],
    name: str = "index shard",
) -> dict[bytes, Entry | None]:
    """The entries of ``keys`` in page number ``page`` of an index shard whose directory
    is ``directory`` (``None``: not there), found by a binary search of its sorted records
    instead of parsing them all: for a page whose bytes were validated whole by
    :func:`decode_page` or written by :func:`encode_shard` before they were kept (the local
    mirror), and are checked here against the directory's md5. Each record read is checked
    as :func:`decode_page` checks it.

    Raises:
        IntegrityError: the page does not match its md5, or a record read is out of range.
    """
    _check_page(data, directory, page, name)
    view = memoryview(data)
    count, size, unpack = directory.records_in(page), _SHARD_RECORD.size, _SHARD_RECORD.unpack_from
    blob = count * size
    n = len(view) - blob
    out: dict[bytes, Entry | None] = {}
    for key in keys:
        out[key] = None
        low, high = 0, count
        while low < high:
            mid = (low + high) // 2
            md5_, ts, pack, off, length, k_off, k_len = unpack(view, mid * size)
            _check_record(name, ts, off, length, k_off, k_len, n, k_off)
            found = bytes(view[blob + k_off : blob + k_off + k_len])
            if found < key:
                low = mid + 1
            elif found > key:
                high = mid
            else:
                out[key] = _new(Entry, (md5_, ts, pack, off, length))
                break
    return out


# ---------------------------------------------------------------- packs


class PackItem(NamedTuple):
    """One value of a pack: what the footer records about it."""

    key: bytes
    md5: bytes
    timestamp: int
    offset: int
    length: int


def encode_pack_footer(items: Iterable[PackItem | tuple[bytes, bytes, int, int, int]]) -> bytes:
    """The self-describing footer appended after a pack's values (and its trailer);
    ``items`` are :class:`PackItem` or tuples of the same fields."""
    footer = PackFooter()
    for key, md5_, timestamp, offset, length in items:
        footer.add(key, md5_, timestamp, offset, length)
    return footer.encode()


class PackFooter:
    """A pack's footer built a value at a time, held as columns (no object per value,
    packed at :meth:`encode`): :meth:`encode` gives the bytes :func:`encode_pack_footer`
    would."""

    def __init__(self) -> None:
        self._keys: list[bytes] = []
        self._md5s: list[bytes] = []
        self._timestamps: list[int] = []
        self._offsets: list[int] = []
        self._lengths: list[int] = []

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: bytes, md5_: bytes, timestamp: int, offset: int, length: int) -> None:
        """Record one value of the pack."""
        self._keys.append(key)
        self._md5s.append(md5_)
        self._timestamps.append(timestamp)
        self._offsets.append(offset)
        self._lengths.append(length)

    def extend(
        self, keys: Iterable[bytes], md5s: Iterable[bytes], timestamps: Iterable[int],
        offsets: Iterable[int], lengths: Iterable[int],
    ) -> None:
        """Record values of the pack, a column each (as :meth:`add` one at a time)."""
        self._keys.extend(keys)
        self._md5s.extend(md5s)
        self._timestamps.extend(timestamps)
        self._offsets.extend(offsets)
        self._lengths.extend(lengths)

    def entries(self, pack: bytes) -> Iterator[Entry]:
        """The :class:`Entry` of each value recorded, in order, for the pack of id ``pack``."""
        columns = zip(self._md5s, self._timestamps, itertools.repeat(pack), self._offsets, self._lengths)
        return map(_new, itertools.repeat(Entry), columns)

    def encode(self) -> bytes:
        """The footer's bytes, its trailer included."""
        key_lengths = list(map(len, self._keys))
        records = map(
            _PACK_RECORD.pack, self._md5s, self._timestamps, self._offsets, self._lengths,
            itertools.accumulate(key_lengths, initial=0), key_lengths,
        )
        body = b"".join([_HEADER.pack(PACK_MAGIC, len(self)), *records, *self._keys])
        footer = body + md5(body)
        return footer + _PACK_TRAILER.pack(len(footer), PACK_MAGIC)


PACK_TRAILER_SIZE = _PACK_TRAILER.size


def pack_footer_length(trailer: bytes, name: str = "pack", size: int | None = None) -> int:
    """Length of the footer that precedes a pack's 16-byte trailer.

    Args:
        trailer: the pack's last 16 bytes.
        name: the pack, for messages.
        size: the pack's size, when known: the footer and trailer must fit in it.

    Raises:
        IntegrityError: no trailer, a bad magic, or a footer length out of range.
    """
    return _trailer_length(
        trailer, _PACK_TRAILER, PACK_MAGIC, name, "pack", "footer",
        _HEADER.size + 16, MAX_FOOTER_BYTES, size,
    )


def _trailer_length(
    trailer: bytes, layout: struct.Struct, magic: bytes, name: str, kind: str, part: str,
    smallest: int, largest: int, size: int | None,
) -> int:
    """The length of the ``part`` (footer, directory) before the trailer of a ``kind`` of
    object: one rule for packs and shards (see :func:`pack_footer_length`).

    Raises:
        IntegrityError: no trailer, a bad magic, or a length out of range.
    """
    if len(trailer) != layout.size:
        raise IntegrityError(f"{name} is truncated (no trailer); {_DAMAGED}")
    length, found = layout.unpack(trailer)
    if found != magic:
        raise IntegrityError(
            f"{name} is truncated or not an ebooklet {kind} (its trailer has the magic "
            f"{found!r}); {_DAMAGED}"
        )
    fits = size is None or length + layout.size <= size
    if not (smallest <= length <= largest and fits):
        raise IntegrityError(
            f"{name} claims a {part} of {length:,} bytes (the {kind} holds {size} bytes; "
            f"a {part} holds {smallest} to {largest:,}); {_DAMAGED}"
        )
    return length


def decode_pack_footer(
    footer: bytes | memoryview, name: str = "pack", values_end: int | None = None
) -> list[PackItem]:
    """Parse and validate a pack footer (without its trailer).

    Args:
        footer: the footer bytes.
        name: the pack, for messages.
        values_end: where the pack's values end (the footer's offset in the pack), when
            known: every value must lie before it.

    Raises:
        IntegrityError: the footer is truncated, corrupted, or a record is out of range.
    """
    view, blob = _checked_table(footer, name, PACK_MAGIC, _PACK_RECORD.size, "pack footer")
    end = MAX_OBJECT_SIZE if values_end is None else values_end
    items = []
    keys = bytes(view[blob:-16])
    n, at = len(keys), 0
    for m, ts, off, length, k_off, k_len in _PACK_RECORD.iter_unpack(view[_HEADER.size : blob]):
        _check_record(name, ts, off, length, k_off, k_len, n, at, end)
        at = k_off + k_len
        items.append(_new(PackItem, (keys[k_off:at], m, ts, off, length)))
    return items


# ---------------------------------------------------------------- manifest


MANIFEST_FIELDS = (
    "format",
    "version",
    "uuid",
    "seq",
    "commit_id",
    "parent",
    "timestamp",
    "key_serializer",
    "value_serializer",
    "n_buckets",
    "n_shards",
    "shards",
    "n_keys",
    "n_bytes",
    "metadata",
    "message",
)


def build_manifest(
    content: Mapping[str, Any],
    parent: Mapping[str, Any] | None,
    *,
    commit_id: str | None = None,
    seq: int | None = None,
    timestamp: int | None = None,
) -> dict[str, Any]:
    """The manifest of a commit: ``content`` with the fields that place it in the history.

    Every manifest a writer commits (push, copy, vacuum's re-laid commits) is built here.

    Args:
        content: the fields that say what the commit holds (``uuid``, the serializers,
            ``n_buckets``, ``n_shards``, ``shards``, ``n_keys``, ``n_bytes``, ``metadata``,
            ``message``, optional ``changed_keys``, ``copied_from``, ``relayout``); the
            fields set here are replaced if it has them.
        parent: the commit it follows (a manifest or ``{"seq", "commit_id"}``), ``None``
            for the first.
        commit_id: its id (default: a new one).
        seq: its sequence number (default: the parent's plus one, 1 without a parent).
        timestamp: µs since the epoch (default: now).
    """
    manifest = dict(content)
    manifest.update(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
        commit_id=commit_id if commit_id is not None else new_commit_id(),
        seq=seq if seq is not None else (parent["seq"] + 1 if parent else 1),
        parent={"seq": parent["seq"], "commit_id": parent["commit_id"]} if parent else None,
        timestamp=timestamp if timestamp is not None else int(time.time() * 1_000_000),
    )
    return manifest


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    """Serialize a manifest dict to JSON bytes.

    Raises:
        ValueError: it would be refused by readers: nested deeper than
            :data:`MAX_JSON_DEPTH` or over :data:`MAX_MANIFEST_BYTES` (user metadata too
            deep or too large).
    """
    if json_depth(dict(manifest)) > MAX_JSON_DEPTH:
        raise ValueError(
            f"The metadata nests deeper than readers accept ({MAX_JSON_DEPTH} levels with "
            "the manifest); set flatter metadata with set_metadata() and push again."
        )
    body = orjson.dumps(dict(manifest), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    if len(body) > MAX_MANIFEST_BYTES:
        raise ValueError(
            f"The manifest would be {len(body):,} bytes, over the {MAX_MANIFEST_BYTES:,} readers "
            "accept: keep large data in values, not in metadata or the commit message."
        )
    return body


def decode_manifest(data: bytes, name: str = "manifest") -> dict[str, Any]:
    """Parse and validate a manifest (see :func:`check_manifest`).

    Raises:
        IntegrityError: it is over :data:`MAX_MANIFEST_BYTES`, not JSON, or a field is
            missing or out of range.
        FormatVersionError: it was written by a newer ebooklet.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise IntegrityError(
            f"{name} is over {MAX_MANIFEST_BYTES:,} bytes, more than any manifest; {_DAMAGED}"
        )
    try:
        manifest = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise IntegrityError(
            f"{name} is not valid JSON ({exc}); it is corrupted or not an ebooklet database."
        ) from None
    return check_manifest(manifest, name)


def _is_int(value: Any, low: int, high: int) -> bool:
    """True for an int (not a bool) in ``low <= value <= high``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_opt_str(value: Any, pattern: re.Pattern | None = None, longest: int = MAX_MESSAGE) -> bool:
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    return pattern.fullmatch(value) is not None if pattern is not None else len(value) <= longest


def _is_parent(value: Any) -> bool:
    return value is None or (
        isinstance(value, dict)
        and _is_int(value.get("seq"), 1, MAX_SEQ)
        and is_id(value.get("commit_id"))
    )


def _is_power_of_two(value: Any) -> bool:
    return _is_int(value, 1, MAX_SHARDS) and value & (value - 1) == 0


_MANIFEST_CHECKS: dict[str, tuple[Any, str]] = {
    "uuid": (is_id, "32 lowercase hex digits"),
    "seq": (lambda v: _is_int(v, 1, MAX_SEQ), f"an int from 1 to {MAX_SEQ}"),
    "commit_id": (is_id, "32 lowercase hex digits"),
    "parent": (_is_parent, 'null or {"seq": int, "commit_id": 32 hex digits}'),
    "timestamp": (lambda v: _is_int(v, 0, TIMESTAMP_END - 1), "an int of µs in 0 <= t < 2**56"),
    "key_serializer": (lambda v: _is_opt_str(v, _SERIALIZER), "null or a serializer name"),
    "value_serializer": (lambda v: _is_opt_str(v, _SERIALIZER), "null or a serializer name"),
    "n_buckets": (lambda v: _is_int(v, 0, MAX_COUNT), "a non-negative int"),
    "n_shards": (_is_power_of_two, f"a power of two from 1 to {MAX_SHARDS}"),
    "shards": (lambda v: isinstance(v, list), "a list"),
    "n_keys": (lambda v: _is_int(v, 0, MAX_COUNT), "a non-negative int"),
    "n_bytes": (lambda v: _is_int(v, 0, MAX_COUNT), "a non-negative int"),
    "metadata": (lambda v: True, "any JSON"),
    "message": (_is_opt_str, f"null or a str of at most {MAX_MESSAGE:,} characters"),
}
"""Each required manifest field (bar ``format`` and ``version``): its test and what it must be."""


def check_manifest(obj: Any, name: str = "manifest") -> dict[str, Any]:
    """``obj`` itself if it is a valid manifest: every field of the right type and range.

    Checks ``format`` and ``version``; every field of ``MANIFEST_FIELDS`` (ids of 32 hex
    digits, as they become object names); that ``shards`` has ``n_shards`` entries, each
    null or a commit id; that ``parent.seq`` is below ``seq`` (a history walk ends); the
    optional ``changed_keys``; and that no array or object nests deeper than
    :data:`MAX_JSON_DEPTH`. Unknown fields are kept (readers ignore them). Whether a named
    serializer may be used is decided elsewhere; here only its shape is checked.

    Raises:
        IntegrityError: not a manifest, or a field missing or out of range (named).
        FormatVersionError: ``version`` is newer than this ebooklet reads.
    """
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise IntegrityError(f"{name} is not an ebooklet manifest; {_DAMAGED}")
    version = obj.get("version")
    if _is_int(version, FORMAT_VERSION + 1, MAX_COUNT):
        raise FormatVersionError(
            f"{name} has format version {version!r}, newer than this ebooklet "
            f"understands ({FORMAT_VERSION}); upgrade ebooklet to read it."
        )
    if _is_int(version, 1, FORMAT_VERSION - 1):
        raise IntegrityError(
            f"{name} has format version {version}, whose index shards this ebooklet no longer "
            f"reads (it reads {FORMAT_VERSION}); re-push the data from a local copy with an "
            "ebooklet of that version."
        )
    if not _is_int(version, FORMAT_VERSION, FORMAT_VERSION):
        raise IntegrityError(f"{name} has format version {version!r:.40}, not an int; {_DAMAGED}")
    missing = [f for f in MANIFEST_FIELDS if f not in obj]
    if missing:
        raise IntegrityError(f"{name} is missing fields {missing}; {_DAMAGED}")
    for field, (test, expected) in _MANIFEST_CHECKS.items():
        if not test(obj[field]):
            raise _bad_field(name, field, obj[field], expected)
    if obj["parent"] is not None and obj["parent"]["seq"] >= obj["seq"]:
        raise _bad_field(name, "parent", obj["parent"], f"a seq below this commit's {obj['seq']}")
    shards = obj["shards"]
    if len(shards) != obj["n_shards"] or not all(c is None or is_id(c) for c in shards):
        raise _bad_field(name, "shards", shards, f"{obj['n_shards']} entries, each null or a commit id")
    most = sum(c is not None for c in shards) * MAX_SHARD_RECORDS
    if obj["n_keys"] > most:
        raise _bad_field(name, "n_keys", obj["n_keys"], f"at most {most:,} (what its shards can hold)")
    if obj.get("changed_keys") is not None and not _is_int(obj["changed_keys"], 0, MAX_COUNT):
        raise _bad_field(name, "changed_keys", obj["changed_keys"], "null or a non-negative int")
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise IntegrityError(f"{name} nests deeper than {MAX_JSON_DEPTH} levels; {_DAMAGED}")
    return obj


def _bad_field(name: str, field: str, value: Any, expected: str) -> IntegrityError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return IntegrityError(f"{name}: field {field!r} is {shown}, not {expected}; {_DAMAGED}")


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in a decoded JSON value (a scalar: 0), up to
    just past :data:`MAX_JSON_DEPTH` (where it stops looking). Walks with a stack of
    iterators: no recursion, and memory bounded by the depth, not the width."""
    deepest = 0
    stack = [iter((value,))]
    while stack and deepest <= MAX_JSON_DEPTH:
        for item in stack[-1]:
            if isinstance(item, (dict, list)):
                stack.append(iter(item.values() if isinstance(item, dict) else item))
                deepest = max(deepest, len(stack) - 1)
                break
        else:
            stack.pop()
    return deepest


def shard_under(manifest: Mapping[str, Any], number: int, n_shards: int) -> int:
    """The number of the shard of ``manifest`` that holds the keys of shard ``number`` of
    ``n_shards`` (as many as the manifest's or more: a shard splits by doubling)."""
    return number * manifest["n_shards"] // n_shards


def shard_name_at(manifest: Mapping[str, Any], shard: int) -> str | None:
    """Object suffix of shard number ``shard`` of a manifest (``None``: empty shard)."""
    commit = manifest["shards"][shard]
    return shard_name(commit, shard) if commit is not None else None


def iter_shard_names(manifest: Mapping[str, Any]) -> Iterator[tuple[int, str]]:
    """``(shard number, object suffix)`` of every non-empty shard of a manifest."""
    for i, commit in enumerate(manifest["shards"]):
        if commit is not None:
            yield i, shard_name(commit, i)


def check_sizes(key: Any, kb: bytes, raw: bytes) -> None:
    """Refuse an encoded key ``kb`` (of ``key``) or value ``raw`` longer than the layouts
    hold (:data:`KEY_MAX`, :data:`VALUE_MAX`).

    Raises:
        ValueError: one is too long, with what to do.
    """
    if len(kb) > KEY_MAX:
        raise ValueError(
            f"Key {key!r:.60} is {len(kb):,} bytes once encoded; keys can be at most "
            f"{KEY_MAX:,} bytes. Use a shorter key (a hash of it, for instance)."
        )
    if len(raw) > VALUE_MAX:
        raise ValueError(
            f"The value of key {key!r:.60} is {len(raw):,} bytes once encoded; values can "
            f"be at most {VALUE_MAX:,} bytes. Split it over several keys."
        )


def utc_datetime(timestamp: int) -> datetime:
    """The aware UTC datetime of a timestamp in µs since the Unix epoch (exact to the µs)."""
    return _EPOCH + timedelta(microseconds=timestamp)
