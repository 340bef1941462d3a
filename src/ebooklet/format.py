"""Every byte layout ebooklet writes: the manifest, index shards and packs.

The layouts are documented in ``docs/format.md``; this module is their only
reader and writer. All integers are little-endian.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import orjson

from .errors import FormatVersionError, IntegrityError

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
    """Serialize one index shard (``key -> Entry``), keys sorted, md5-terminated."""
    records = bytearray(_HEADER.pack(SHARD_MAGIC, len(entries)))
    blob = bytearray()
    for key, (md5_, timestamp, pack, offset, length) in sorted(entries.items()):
        records += _SHARD_RECORD.pack(md5_, timestamp, pack, offset, length, len(blob), len(key))
        blob += key
    body = bytes(records + blob)
    return body + md5(body)


def decode_shard(data: bytes, name: str = "index shard") -> dict[bytes, Entry]:
    """Parse an index shard; raises :class:`IntegrityError` if it is damaged."""
    if len(data) < _HEADER.size + 16 or md5(data[:-16]) != data[-16:]:
        raise IntegrityError(
            f"{name} is truncated or corrupted (checksum mismatch); "
            "run ebooklet.check() on the remote or re-push from a good copy."
        )
    magic, count = _HEADER.unpack_from(data)
    if magic != SHARD_MAGIC:
        raise IntegrityError(f"{name} is not an ebooklet index shard (bad magic {magic!r}).")
    view = memoryview(data)
    start = _HEADER.size
    blob = start + count * _SHARD_RECORD.size
    out = {}
    for md5_, ts, pack, off, length, k_off, k_len in _SHARD_RECORD.iter_unpack(view[start:blob]):
        key = bytes(view[blob + k_off : blob + k_off + k_len])
        out[key] = Entry(md5_, ts, pack, off, length)
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


def pack_footer_length(trailer: bytes, name: str = "pack") -> int:
    """Length of the footer that precedes a pack's 16-byte trailer."""
    if len(trailer) != _PACK_TRAILER.size:
        raise IntegrityError(f"{name} is truncated (no trailer).")
    length, magic = _PACK_TRAILER.unpack(trailer)
    if magic != PACK_MAGIC:
        raise IntegrityError(f"{name} is not an ebooklet pack (bad magic {magic!r}).")
    return length


def decode_pack_footer(footer: bytes, name: str = "pack") -> list[PackItem]:
    """Parse a pack footer (without its trailer)."""
    if len(footer) < _HEADER.size + 16 or md5(footer[:-16]) != footer[-16:]:
        raise IntegrityError(f"{name} footer is truncated or corrupted (checksum mismatch).")
    magic, count = _HEADER.unpack_from(footer)
    if magic != PACK_MAGIC:
        raise IntegrityError(f"{name} footer has a bad magic {magic!r}.")
    view = memoryview(footer)
    start = _HEADER.size
    blob = start + count * _PACK_RECORD.size
    return [
        PackItem(bytes(view[blob + k_off : blob + k_off + k_len]), m, ts, off, length)
        for m, ts, off, length, k_off, k_len in _PACK_RECORD.iter_unpack(view[start:blob])
    ]


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


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    """Serialize a manifest dict to JSON bytes."""
    return orjson.dumps(dict(manifest), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def decode_manifest(data: bytes, name: str = "manifest") -> dict[str, Any]:
    """Parse and validate a manifest; raises on damage or a newer format."""
    try:
        manifest = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise IntegrityError(
            f"{name} is not valid JSON ({exc}); it is corrupted or not an ebooklet database."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IntegrityError(f"{name} is not an ebooklet manifest.")
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{name} has format version {version!r}, newer than this ebooklet "
            f"understands ({FORMAT_VERSION}); upgrade ebooklet to read it."
        )
    missing = [f for f in MANIFEST_FIELDS if f not in manifest]
    if missing or len(manifest["shards"]) != manifest["n_shards"]:
        raise IntegrityError(f"{name} is missing fields {missing}; it is corrupted.")
    return manifest


def shard_name_at(manifest: Mapping[str, Any], shard: int) -> str | None:
    """Object suffix of shard number ``shard`` of a manifest (``None``: empty shard)."""
    commit = manifest["shards"][shard]
    return shard_name(commit, shard) if commit is not None else None


def iter_shard_names(manifest: Mapping[str, Any]) -> Iterator[tuple[int, str]]:
    """``(shard number, object suffix)`` of every non-empty shard of a manifest."""
    for i, commit in enumerate(manifest["shards"]):
        if commit is not None:
            yield i, shard_name(commit, i)
