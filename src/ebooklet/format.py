"""Every byte layout ebooklet writes: the manifest, index shards and packs.

The layouts are documented in ``docs/format.md``; this module is their only
reader and writer. All integers are little-endian.
"""

from __future__ import annotations

import hashlib
import re
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import orjson

from .errors import FormatVersionError, IntegrityError, ShardLimitError

FORMAT_NAME = "ebooklet"
FORMAT_VERSION = 1

NO_MD5 = b"\x00" * 16
"""Stands for "no value" wherever an md5 field is required (absent or deleted)."""

SHARD_MAGIC = b"EBKIDX01"
PACK_MAGIC = b"EBKPCK01"

# md5, timestamp, pack id, offset, length, key offset, key length
_SHARD_RECORD = struct.Struct("<16sq16sQQII")
# md5, timestamp, offset, length, key offset, key length
_PACK_RECORD = struct.Struct("<16sqQQII")
_HEADER = struct.Struct("<8sI")  # magic, record count
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
MAX_SHARD_BYTES = _HEADER.size + MAX_SHARD_RECORDS * _SHARD_RECORD.size + SHARD_KEY_BYTES + 16
"""Largest index shard a reader downloads (68 MiB: header, records, keys, md5)."""
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
MAX_OBJECT_SIZE = 5 << 40
"""S3's largest object (5 TiB): no value may claim to lie beyond it."""

_ID = re.compile(r"[0-9a-f]{32}")
_SERIALIZER = re.compile(r"[A-Za-z0-9_]{1,64}")
_SUFFIX = re.compile(r"(\.ebk(/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199})+)?")


def md5(data: bytes | memoryview) -> bytes:
    """The 16-byte MD5 digest of ``data`` (the identity of a value)."""
    return hashlib.md5(data, usedforsecurity=False).digest()


class Entry(NamedTuple):
    """Where one value lives remotely: one record of the remote index."""

    md5: bytes
    timestamp: int
    pack: bytes
    offset: int
    length: int


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


def shard_of(key: bytes, n_shards: int) -> int:
    """The shard that holds ``key`` among ``n_shards`` (a power of two).

    The top bits of the key's BLAKE2b hash: doubling ``n_shards`` splits every
    shard in two without moving keys between the others.
    """
    if n_shards == 1:
        return 0
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - (n_shards.bit_length() - 1))


def shards_needed(n_keys: int, per_shard: int) -> int:
    """The smallest power of two of shards that keeps each near ``per_shard`` keys."""
    n = 1
    while n * per_shard < n_keys:
        n *= 2
    return n


# ---------------------------------------------------------------- index shards


def encode_shard(entries: Mapping[bytes, Entry]) -> bytes:
    """Serialize one index shard (``key -> Entry``), keys sorted, md5-terminated.

    Raises:
        ShardLimitError: readers would refuse the shard: over :data:`MAX_SHARD_RECORDS`
            records or :data:`SHARD_KEY_BYTES` of keys (nothing is written).
    """
    _check_shard_limits(len(entries), sum(map(len, entries)))
    records = bytearray(_HEADER.pack(SHARD_MAGIC, len(entries)))
    blob = bytearray()
    for key, (md5_, timestamp, pack, offset, length) in sorted(entries.items()):
        records += _SHARD_RECORD.pack(md5_, timestamp, pack, offset, length, len(blob), len(key))
        blob += key
    body = bytes(records + blob)
    return body + md5(body)


def _check_shard_limits(n_records: int, key_bytes: int) -> None:
    """Refuse to write a shard that readers would refuse (see :func:`encode_shard`)."""
    if n_records > MAX_SHARD_RECORDS or key_bytes > SHARD_KEY_BYTES:
        raise ShardLimitError(
            f"An index shard would hold {n_records:,} keys of {key_bytes:,} bytes in all, over "
            f"the {MAX_SHARD_RECORDS:,} keys or {SHARD_KEY_BYTES:,} bytes readers accept: the "
            "keys are too long (or crafted to share a shard). Nothing was committed; use "
            "shorter keys (a digest of a long key, with the long key in the value)."
        )


def decode_shard(data: bytes, name: str = "index shard") -> dict[bytes, Entry]:
    """Parse and validate an index shard.

    At most :data:`MAX_SHARD_BYTES` and :data:`MAX_SHARD_RECORDS` records, whose keys
    follow each other in the key blob as :func:`encode_shard` writes them (no two records
    share key bytes), so what is built is bounded by the shard's size (docs/format.md §10).

    Raises:
        IntegrityError: the shard is over those limits, truncated, corrupted or not an
            ebooklet shard; or a record is out of range (a key not where the previous one
            ended, a bad timestamp, a value longer than booklet allows or lying beyond
            S3's largest object).
    """
    if len(data) > MAX_SHARD_BYTES:
        raise IntegrityError(f"{name} is over {MAX_SHARD_BYTES:,} bytes; {_DAMAGED}")
    view, blob = _checked_table(data, name, SHARD_MAGIC, _SHARD_RECORD.size, "index shard")
    count = (blob - _HEADER.size) // _SHARD_RECORD.size
    if count > MAX_SHARD_RECORDS:
        raise IntegrityError(
            f"{name} claims {count:,} records, over the {MAX_SHARD_RECORDS:,} of any index "
            f"shard; {_DAMAGED}"
        )
    out = {}
    start, keys = _HEADER.size, view[blob:-16]
    n, ts_end, value_max, object_max = len(keys), TIMESTAMP_END, VALUE_MAX, MAX_OBJECT_SIZE
    at = 0
    for md5_, ts, pack, off, length, k_off, k_len in _SHARD_RECORD.iter_unpack(view[start:blob]):
        if not (
            k_off == at and k_off + k_len <= n and k_len <= KEY_MAX and 0 <= ts < ts_end
            and length <= value_max and off + length <= object_max
        ):
            _refuse_record(name, ts, off, length, k_off, k_len, n, at)
        at = k_off + k_len
        out[bytes(keys[k_off:at])] = Entry(md5_, ts, pack, off, length)
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
    items = list(items)
    records = bytearray(_HEADER.pack(PACK_MAGIC, len(items)))
    blob = bytearray()
    for key, md5_, timestamp, offset, length in items:
        records += _PACK_RECORD.pack(md5_, timestamp, offset, length, len(blob), len(key))
        blob += key
    body = bytes(records + blob)
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
    if len(trailer) != _PACK_TRAILER.size:
        raise IntegrityError(f"{name} is truncated (no trailer); {_DAMAGED}")
    length, magic = _PACK_TRAILER.unpack(trailer)
    if magic != PACK_MAGIC:
        raise IntegrityError(f"{name} is not an ebooklet pack (bad magic {magic!r}); {_DAMAGED}")
    fits = size is None or length + _PACK_TRAILER.size <= size
    if not (_HEADER.size + 16 <= length <= MAX_FOOTER_BYTES and fits):
        raise IntegrityError(
            f"{name} claims a footer of {length:,} bytes (the pack holds {size} bytes; "
            f"footers hold {_HEADER.size + 16} to {MAX_FOOTER_BYTES:,}); {_DAMAGED}"
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
    keys = view[blob:-16]
    n, at = len(keys), 0
    for m, ts, off, length, k_off, k_len in _PACK_RECORD.iter_unpack(view[_HEADER.size : blob]):
        if not (
            k_off == at and k_off + k_len <= n and k_len <= KEY_MAX and 0 <= ts < TIMESTAMP_END
            and length <= VALUE_MAX and off + length <= end
        ):
            _refuse_record(name, ts, off, length, k_off, k_len, n, at)
        at = k_off + k_len
        items.append(PackItem(bytes(keys[k_off:at]), m, ts, off, length))
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
    if not _is_int(version, 1, FORMAT_VERSION):
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


def shard_name_at(manifest: Mapping[str, Any], shard: int) -> str | None:
    """Object suffix of shard number ``shard`` of a manifest (``None``: empty shard)."""
    commit = manifest["shards"][shard]
    return shard_name(commit, shard) if commit is not None else None


def iter_shard_names(manifest: Mapping[str, Any]) -> Iterator[tuple[int, str]]:
    """``(shard number, object suffix)`` of every non-empty shard of a manifest."""
    for i, commit in enumerate(manifest["shards"]):
        if commit is not None:
            yield i, shard_name(commit, i)
