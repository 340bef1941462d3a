"""The only code that knows booklet's private file layout.

booklet is pinned to 0.12 in pyproject.toml: this module reads and writes that
version's records, index buckets and private attributes (``_file``, ``_n_buckets``,
``_index_offset``, ``_mutation_count``...) directly, where booklet's public API is too
slow: a scan of every record, a batch record writer and the index linker, and the
file state that tells whether plain booklet wrote to a data file. Nothing else in
ebooklet may touch a booklet object's private state; ``tests/test_local.py`` fails
the day a booklet release changes the layout.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from hashlib import blake2s
from pathlib import Path
from typing import Any

import booklet
import portalocker

from .errors import ScanInterrupted

#: :func:`_link_records` and :func:`_link_buffer` read booklet's bucket array whole (one
#: ``preadv`` into a kept buffer, one ``pwrite``) for a batch of at least one key per this
#: many buckets, else a ``pread`` and a ``pwrite`` a key: past 1.7M keys booklet's array
#: holds 20.7M buckets (124 MB), and a batch of a 4 MiB write buffer (~30,000 keys of
#: 100 B) costs less read whole (~2 µs a key) than in system calls (~10 µs a key).
_BUCKETS_PER_KEY = 1024

#: booklet 0.12's record header: key hash, position of the next record of the same
#: index bucket, key length, value length (the timestamp and the key follow).
_HASH_LEN = booklet.utils.key_hash_len
_RECORD_HEAD = struct.Struct(f"<{_HASH_LEN}s{booklet.utils.n_bytes_file}sHI")
_NO_NEXT_BLOCK = (1).to_bytes(booklet.utils.n_bytes_file, "little")  # the end of a bucket's chain
_DELETED = bytes(booklet.utils.n_bytes_file)  # the next-record position of a deleted record
_RECORD_LENGTHS = struct.Struct(f"<{_HASH_LEN}x{booklet.utils.n_bytes_file}sHI")
#: The same and 8 bytes on: booklet's 7-byte timestamp and the next byte, which
#: ``& _TIMESTAMP_MASK`` drops (a timestamp without a slice of its own).
_RECORD_LENGTHS_TIMESTAMP = struct.Struct(f"<{_HASH_LEN}x{booklet.utils.n_bytes_file}sHIQ")
_TIMESTAMP_MASK = (1 << 56) - 1

#: :func:`append_records` copies values up to this size into its write buffer, and
#: writes that buffer whenever it holds this much.
COPY_MAX = 1 << 20
WRITE_SIZE = 8 << 20

_IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one writev takes

#: Read size of :func:`scan`.
SCAN_BUFFER = 1 << 20
_READ_AHEAD = 512  # get_value reads this much of a record: a small value comes with its head

#: What identifies a data file's content as ebooklet left it (see :func:`data_state`).
DATA_STATE_FIELDS = ("size", "mtime_ns", "inode", "n_keys", "index_offset", "first_data")


def n_buckets(book: Any) -> int:
    """The number of index buckets of the booklet file ``book`` (a manifest records it)."""
    return book._n_buckets


def scan(
    book: Any, path: Path, include_value: bool = True, start: int = 0, deleted: bool = False
) -> Iterator[tuple]:
    """``(encoded key, timestamp, encoded value)`` (or ``(encoded key, timestamp)``) of
    every key in the booklet file ``book`` opened from ``path``, in file order; with
    ``start`` (a record boundary, see :func:`data_changed_from`), of those whose record
    lies at or after that position; with ``deleted`` (and not ``include_value``), the
    records marked deleted too, as ``(encoded key, None)``.

    This is ``book.timestamps()`` without decoding, read a :data:`SCAN_BUFFER` at a
    time and parsed in place: booklet reads a writable file with a seek and two
    unbuffered reads per record, 3x slower. As ``timestamps()`` does, the scan stops
    when the file is written to before it ends.

    Raises:
        ScanInterrupted: the file was written to during the scan (a ``RuntimeError``).
    """
    utils = booklet.utils
    book.sync()
    if isinstance(book, DataFile):
        book.refresh()
    with book._thread_lock:
        mutations = book._mutation_count
        reader = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
        index_size = book._n_buckets * utils.n_bytes_file
        first = book._first_data_block_pos or utils.sub_index_init_pos + index_size
        regions = [(first, os.fstat(reader.fileno()).st_size)]
        if book._index_offset != utils.sub_index_init_pos:  # booklet moved its index here
            regions = [(first, book._index_offset), (book._index_offset + index_size, regions[0][1])]
        regions = [(max(begin, start), end) for begin, end in regions if end > start]
    try:
        for start, end in regions:
            yield from _records(reader, start, end, book._ts_bytes_len, include_value, deleted, book, mutations)
    except Exception:
        if book._mutation_count != mutations:  # e.g. cleared or pruned under the reader
            raise ScanInterrupted(f"{path} was written to during a scan.") from None
        raise
    finally:
        reader.close()


def _records(
    reader: Any, start: int, end: int, ts_len: int, include_value: bool, deleted: bool,
    book: Any, mutations: int,
) -> Iterator[tuple]:
    """The live records of booklet's data between ``start`` and ``end`` (see
    :data:`_RECORD_HEAD`), read a :data:`SCAN_BUFFER` at a time; a deleted one has 0 as its
    next-record position, and is yielded as ``(key, None)`` when ``deleted`` (for
    :func:`deleted_last`; never with ``include_value``). A value over :data:`SCAN_BUFFER`
    not in the buffer already is read on its own, into one new bytes object. A record cut
    short by the end (a write killed midway) is not one. Stops with
    :class:`ScanInterrupted` once ``book``'s mutation count is no longer ``mutations``."""
    head_size, skip = _RECORD_HEAD.size, booklet.utils.reserved_key_bytes
    skip_lengths = frozenset(map(len, skip))
    unpack, from_bytes = _RECORD_LENGTHS.unpack_from, int.from_bytes
    key_start = head_size + ts_len
    # the usual record (live, whole in the buffer, with its value asked, not of a reserved
    # key's length, a 7-byte timestamp and a byte after it) is read by the first branch
    # below, any other by the second, one check at a time (which reads the usual ones alike)
    usual_size = _RECORD_LENGTHS_TIMESTAMP.size if include_value and ts_len == 7 else 1 << 62
    unpack_usual = _RECORD_LENGTHS_TIMESTAMP.unpack_from
    data, at, base, n = b"", 0, start, 0  # base: the file position of data[0]; n: its length
    reader.seek(start)
    while True:
        if at + usual_size <= n:
            next_block, key_len, value_len, ts = unpack_usual(data, at)
            key_at = at + key_start
            value_at = key_at + key_len
            stop = value_at + value_len
            if stop <= n and next_block != _DELETED and key_len not in skip_lengths:
                if book._mutation_count != mutations:
                    raise ScanInterrupted(f"{reader.name} was written to during a scan.")
                yield data[key_at:value_at], ts & _TIMESTAMP_MASK, data[value_at:stop]
                at = stop
                continue
        if at + head_size <= n:
            next_block, key_len, value_len = unpack(data, at)
            key_at = at + key_start
            value_at = key_at + key_len
            stop = value_at + value_len
            whole = stop <= n
            if whole or (value_at <= n and value_len > SCAN_BUFFER):
                if not whole and base + stop > end:
                    return
                if next_block != _DELETED or deleted:
                    key = data[key_at:value_at]
                    if key not in skip:
                        if book._mutation_count != mutations:
                            raise ScanInterrupted(f"{reader.name} was written to during a scan.")
                        if next_block == _DELETED:
                            yield key, None
                        elif not include_value:
                            yield key, from_bytes(data[at + head_size : key_at], "little")
                        elif whole:
                            yield key, from_bytes(data[at + head_size : key_at], "little"), data[value_at:stop]
                        else:
                            value = _read_at(reader, base + value_at, value_len)
                            if book._mutation_count != mutations:  # read from a file cut meanwhile
                                raise ScanInterrupted(f"{reader.name} was written to during a scan.")
                            yield key, from_bytes(data[at + head_size : key_at], "little"), value
                            del value
                if whole:
                    at = stop
                else:  # the value was not in the buffer: go on after it
                    data, at, base, n = b"", 0, base + stop, 0
                    reader.seek(base)
                continue
        want = min(SCAN_BUFFER, end - base - n)
        more = reader.read(want) if want else b""
        if not more:
            if want and book._mutation_count != mutations:  # the file was cut meanwhile
                raise ScanInterrupted(f"{reader.name} was written to during a scan.")
            return
        data, at, base = data[at:] + more, 0, base + at
        n = len(data)


def _read_at(reader: Any, position: int, length: int) -> bytes:
    """``length`` bytes of ``reader`` from ``position``."""
    reader.seek(position)
    return reader.read(length)


def deleted_last(book: Any, path: Path, keys: Iterable[bytes]) -> set[bytes]:
    """Those of ``keys`` (encoded) whose last record in the booklet file ``book`` opened
    from ``path`` is marked deleted: what booklet's ``del`` leaves (it marks the record
    in place). A key with no record, or whose last record is live although booklet
    does not find it, was lost by damage (a truncation, a garbled index), not deleted.
    Reads the whole file, so only for a few keys known to be absent."""
    wanted = set(keys)
    last: dict[bytes, bool] = {}
    for key, ts in scan(book, path, include_value=False, deleted=True):
        if key in wanted:
            last[key] = ts is None
    return {key for key, gone in last.items() if gone}


def data_state(book: Any, path: Path) -> dict[str, int]:
    """The state of the booklet file ``book`` opened from ``path``, after a sync: its size,
    modification time and inode, booklet's key count and where its index and first
    record lie. Any write changes one of them: booklet appends every new record at the
    end of the file, marks a deletion in place (the key count drops) and rewrites the
    file on ``prune()``/``clear()`` (the layout changes)."""
    book.sync()
    if isinstance(book, DataFile):
        book.refresh()
    stat = os.stat(path)
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino,
        "n_keys": book._n_keys,
        "index_offset": book._index_offset,
        "first_data": book._first_data_block_pos,
    }


def data_changed_from(recorded: dict[str, Any] | None, current: dict[str, int]) -> int | None:
    """Where the records written to a data file since its state was ``recorded`` begin:
    ``None`` when it is unchanged, the recorded size when everything before it is as it
    was (writes were appended, perhaps with booklet's index moved to the end by a
    regrowth, and deletions marked in place), 0 when anything else happened (another
    file, a prune or clear, nothing recorded): the whole file has to be read."""
    if recorded is None:
        return 0
    if all(recorded[f] == current[f] for f in DATA_STATE_FIELDS):
        return None
    size = recorded["size"]
    appended = (
        current["inode"] == recorded["inode"]
        and current["size"] >= size
        and current["first_data"] == recorded["first_data"]
        and (
            current["index_offset"] == recorded["index_offset"]
            or current["index_offset"] >= size  # booklet moved its index after the old end
        )
    )
    return size if appended else 0


def get_value(
    book: Any, kb: bytes, again: bool = True, part: tuple[int, int] | None = None
) -> bytes | None:
    """The encoded value of the encoded key ``kb`` in the booklet file ``book`` (``None``:
    not there), as ``book.get`` reads it, minus the key encoding and value decoding.

    booklet seeks and reads three times a record (about 6 µs a 100 B value); here one
    ``pread`` reads the bucket and one each record of its chain, the value with it when
    the value is small (about 3 µs). The writable file is unbuffered, so ``pread`` sees
    every write; records still in booklet's write buffer are flushed first, as its
    ``get`` does. A miss in a shared :class:`DataFile` is looked up once more (``again``)
    when another process moved the index meanwhile (:meth:`DataFile.refresh`).
    ``part``: ``(start, length)``, only those bytes of the value (fewer past its end),
    read by one ``pread`` of their own.
    """
    key_hash = blake2s(kb, digest_size=_HASH_LEN).digest()
    if key_hash in book._buffer_index_set:
        book.sync()
    width, ts_len = booklet.utils.n_bytes_file, book._ts_bytes_len
    if getattr(book, "_view", None) is not None:  # a reader's map (DataFile.map_for_reading)
        raw = _mapped_get(book, key_hash, ts_len)
        if raw is not _BEYOND:
            if raw is None and again and book.refresh():
                return get_value(book, kb, False, part)
            return raw if part is None or raw is None else bytes(raw[part[0] : part[0] + part[1]])
    with book._thread_lock:
        fd = book._file.fileno()
        bucket = book._index_offset + int.from_bytes(key_hash, "little") % book._n_buckets * width
        block = int.from_bytes(os.pread(fd, width, bucket), "little")
        while block > 1:
            record = os.pread(fd, _READ_AHEAD, block)
            if len(record) < _RECORD_HEAD.size:  # a stale view of an index another process moved
                break
            block_hash, next_block, key_len, value_len = _RECORD_HEAD.unpack_from(record)
            if next_block == _DELETED:
                break
            if block_hash == key_hash:
                start = _RECORD_HEAD.size + ts_len + key_len
                if part is not None:
                    skip = min(part[0], value_len)
                    return os.pread(fd, min(part[1], value_len - skip), block + start + skip)
                if start + value_len <= len(record):
                    return record[start : start + value_len]
                return os.pread(fd, value_len, block + start)
            if next_block == _NO_NEXT_BLOCK:
                break
            block = int.from_bytes(next_block, "little")
    if again and isinstance(book, DataFile) and book.refresh():
        return get_value(book, kb, False, part)
    return None


_BEYOND = object()  # a lookup in a map of the file that went past the map's end


def _mapped_get(book: DataFile, key_hash: bytes, ts_len: int) -> Any:
    """:func:`get_value` through the reader's map of the file, made again once when the
    lookup needs records appended since: the value, ``None``, or :data:`_BEYOND`."""
    with book._thread_lock:
        view = book._view
        if view is None:
            return _BEYOND
        raw = _mapped_lookup(view, book._index_offset, book._n_buckets, key_hash, ts_len)
        if raw is _BEYOND:
            book._remap()
            if book._view is not None:
                raw = _mapped_lookup(book._view, book._index_offset, book._n_buckets, key_hash, ts_len)
        return raw


def _mapped_lookup(view: mmap.mmap, index_offset: int, n_buckets: int, key_hash: bytes, ts_len: int) -> Any:
    """:func:`get_value` through a map of the file: the value, ``None`` (not there), or
    :data:`_BEYOND` when the lookup needs bytes past the map (appended since it was made)."""
    width, head_size = booklet.utils.n_bytes_file, _RECORD_HEAD.size
    size = len(view)
    bucket = index_offset + int.from_bytes(key_hash, "little") % n_buckets * width
    if bucket + width > size:
        return _BEYOND
    block = int.from_bytes(view[bucket : bucket + width], "little")
    while block > 1:
        if block + head_size > size:
            return _BEYOND
        block_hash, next_block, key_len, value_len = _RECORD_HEAD.unpack_from(view, block)
        if next_block == _DELETED:
            return None
        if block_hash == key_hash:
            start = block + head_size + ts_len + key_len
            return view[start : start + value_len] if start + value_len <= size else _BEYOND
        if next_block == _NO_NEXT_BLOCK:
            return None
        block = int.from_bytes(next_block, "little")
    return None


def append_records(book: Any, records: Iterable[tuple[bytes, bytes | memoryview, Any]]) -> None:
    """Append ``(encoded key, encoded value, timestamp)`` records to the booklet file
    ``book``, byte for byte as ``book.set(key, value, timestamp, encode_value=False)``
    for each, in order, then ``book.sync()``, would; all of them or, when one is
    refused or the write fails, none.

    ``booklet.set`` costs about 12 µs a record: it builds each record by joining bytes,
    asks the file for its end, copies the record into its write buffer (a large value
    twice, 50 ms for 32 MiB), and links it into the index with a seek and a read or
    write per step. Here the records' heads are made first (a key or value too long
    for booklet, or a bad timestamp, is refused before anything is written), then laid
    out in a buffer written :data:`WRITE_SIZE` at a time (a value over :data:`COPY_MAX`
    is written from where it is, with ``writev``), then linked by :func:`_link_records`.
    This follows booklet 0.12's file layout and private attributes (booklet is pinned to
    0.12 in pyproject.toml); ``tests/test_local.py`` checks that both ways write
    identical files.
    """
    ts_len = book._ts_bytes_len
    heads: list[tuple[bytes, bytes, bytes | memoryview]] = []  # (key hash, head + key, value)
    for key, value, timestamp in records:
        key_hash = blake2s(key, digest_size=_HASH_LEN).digest()  # booklet's utils.hash_key
        head = _RECORD_HEAD.pack(key_hash, _NO_NEXT_BLOCK, len(key), len(value))
        if ts_len:
            if type(timestamp) is not int:
                timestamp = booklet.utils.make_timestamp_int(timestamp)
            head += timestamp.to_bytes(ts_len, "little")
        heads.append((key_hash, head + key, value))
    if not heads:
        return
    with getattr(book, "batch", contextlib.nullcontext)():
        _append_heads(book, heads)


def _append_heads(book: Any, heads: list[tuple[bytes, bytes, bytes | memoryview]]) -> None:
    """:func:`append_records` once the records' heads are made (and, for a shared
    :class:`DataFile`, its batch lock taken)."""
    book.sync()  # records buffered go first, as set() keeps the order
    with book._thread_lock:
        if getattr(book, "before_write", None) is not None:
            book.before_write()
        book._mutation_count += 1
        file = book._file
        start = file.seek(0, 2)
        if isinstance(book, DataFile):  # until the records are linked (see DataFile)
            os.pwrite(file.fileno(), _N_KEYS_CRASH, book._n_keys_pos)
        try:
            links = _write_records(file.fileno(), start, heads)
        except BaseException:
            os.ftruncate(file.fileno(), start)  # no record may stay in the file unindexed
            raise
        book._n_keys += _link_records(book, links)
        file.seek(book._n_keys_pos)
        file.write(book._n_keys.to_bytes(4, "little"))
        book._check_auto_reindex()  # booklet checks twice, in _sync_index and in sync
    book.sync()


def _write_records(fd: int, position: int, heads: list[tuple[bytes, bytes, Any]]) -> list[tuple[bytes, int]]:
    """Write the records at ``fd``'s position (``position``); returns each one's key
    hash and position."""
    links = []
    body = bytearray()
    for key_hash, head, value in heads:
        links.append((key_hash, position))
        position += len(head) + len(value)
        body += head
        if len(value) > COPY_MAX:
            _write_all(fd, [body, value])
            body = bytearray()
            continue
        body += value
        if len(body) >= WRITE_SIZE:
            _write_all(fd, [body])
            body = bytearray()
    _write_all(fd, [body])
    return links


def _link_records(book: Any, links: list[tuple[bytes, int]]) -> int:
    """Link records just written at the given positions into booklet's index, in order,
    as booklet's ``utils.update_index`` does: a key already in its bucket's chain takes
    the old record's place (which is marked deleted), a new key goes at the chain's end.
    Returns the number of new keys.

    Position fields (bucket slots and the records' next-record fields) are read with
    ``pread`` and written back with ``pwrite`` once each; booklet seeks, reads and
    writes key by key. For a batch that touches much of the bucket array, the array is
    read and written whole.
    """
    fd = book._file.fileno()
    width, hash_len = booklet.utils.n_bytes_file, booklet.utils.key_hash_len
    n_buckets, index_offset = book._n_buckets, book._index_offset
    index_end = index_offset + n_buckets * width
    buckets = _bucket_array(book) if len(links) * _BUCKETS_PER_KEY >= n_buckets else None
    changed: dict[int, int] = {}  # field position -> new value

    def field(pos: int) -> int:
        if pos in changed:
            return changed[pos]
        if buckets is not None and index_offset <= pos < index_end:
            return int.from_bytes(buckets[pos - index_offset : pos - index_offset + width], "little")
        return int.from_bytes(os.pread(fd, width, pos), "little")

    new_keys = 0
    for key_hash, position in links:
        previous = index_offset + int.from_bytes(key_hash, "little") % n_buckets * width
        block = field(previous)
        while block > 1:  # 0 or 1: an empty bucket
            if block + hash_len in changed:
                block_hash, next_block = os.pread(fd, hash_len, block), changed[block + hash_len]
            else:
                head = os.pread(fd, hash_len + width, block)
                block_hash, next_block = head[:hash_len], int.from_bytes(head[hash_len:], "little")
            if next_block and block_hash == key_hash:  # the key's old record: replace it
                changed[block + hash_len] = 0
                if next_block > 1:
                    changed[position + hash_len] = next_block
                break
            if next_block <= 1:  # the chain ends (1), or at a deleted record (0)
                new_keys += 1
                if next_block == 1:
                    previous = block + hash_len
                break
            previous, block = block + hash_len, next_block
        else:
            new_keys += 1
        changed[previous] = position
    if buckets is not None:
        for pos in [pos for pos in changed if index_offset <= pos < index_end]:
            at = pos - index_offset
            buckets[at : at + width] = changed.pop(pos).to_bytes(width, "little")
        os.pwrite(fd, buckets, index_offset)
    for pos, value in changed.items():
        os.pwrite(fd, value.to_bytes(width, "little"), pos)
    return new_keys


def _link_buffer(book: DataFile, start: int) -> tuple[int, list[tuple[int, bytes | bytearray]]]:
    """Link the records buffered by :meth:`DataFile.put` (to be written at ``start``)
    into the index, in order, each at the head of its bucket's chain: their own
    next-record fields are set in the buffer, and a key already in the chain has its old
    record marked deleted and taken out of the chain (booklet links at the chain's end;
    either order finds the one live record of a key). The file is read (with ``pread``:
    an ``mmap`` would count the pages it touches in the process's memory), not written:
    returns the number of new keys and the fields to write after the buffer (the bucket
    array whole, or its changed slots, and the old records' fields)."""
    fd, buffer = book._file.fileno(), book._buffer_data
    width, hash_len = booklet.utils.n_bytes_file, _HASH_LEN
    n_buckets, index_offset = book._n_buckets, book._index_offset
    index_end = index_offset + n_buckets * width
    buckets = _bucket_array(book) if len(book._pending) * _BUCKETS_PER_KEY >= n_buckets else None
    changed: dict[int, int] = {}  # position of a field in the file -> its new value

    def field(pos: int) -> int:
        if pos >= start:
            return int.from_bytes(buffer[pos - start : pos - start + width], "little")
        if pos in changed:
            return changed[pos]
        if buckets is not None and index_offset <= pos < index_end:
            return int.from_bytes(buckets[pos - index_offset : pos - index_offset + width], "little")
        return int.from_bytes(os.pread(fd, width, pos), "little")

    def set_field(pos: int, value: int) -> None:
        if pos >= start:
            buffer[pos - start : pos - start + width] = value.to_bytes(width, "little")
        elif buckets is not None and index_offset <= pos < index_end:
            buckets[pos - index_offset : pos - index_offset + width] = value.to_bytes(width, "little")
        else:
            changed[pos] = value

    new_keys = 0
    for key_hash, at in book._pending:
        bucket = int.from_bytes(key_hash, "little") % n_buckets * width
        new_keys += 1
        if buckets is not None and buckets[bucket : bucket + width] == _NO_NEXT_BLOCK:
            buckets[bucket : bucket + width] = (start + at).to_bytes(width, "little")
            continue  # an empty bucket (most, below one key per bucket): no chain
        slot = index_offset + bucket
        previous, block = slot, field(slot)
        while block > 1:  # 0 or 1: the chain ends
            if block >= start:
                block_hash = buffer[block - start : block - start + hash_len]
            else:
                block_hash = os.pread(fd, hash_len, block)
            next_block = field(block + hash_len)
            if next_block and block_hash == key_hash:  # the key's old record
                set_field(block + hash_len, 0)
                set_field(previous, next_block)
                new_keys -= 1
                break
            previous, block = block + hash_len, next_block
        set_field(start + at + hash_len, field(slot))
        set_field(slot, start + at)
    fields: list[tuple[int, bytes | bytearray]] = [
        (pos, value.to_bytes(width, "little")) for pos, value in changed.items()
    ]
    if buckets is not None:
        fields.append((index_offset, buckets))
    return new_keys, fields


def _bucket_array(book: Any) -> bytearray:
    """booklet's bucket array, read whole from the file into a buffer that a
    :class:`DataFile` keeps for the next batch: an array of tens of MB read into fresh
    memory each batch costs its page faults each time (on a VM, about 1 ms a MiB).

    Raises:
        OSError: the array could not be read whole.
    """
    size = book._n_buckets * booklet.utils.n_bytes_file
    buckets = getattr(book, "_bucket_buffer", None)
    if buckets is None or len(buckets) != size:
        buckets = bytearray(size)
        if isinstance(book, DataFile):
            book._bucket_buffer = buckets
    if os.preadv(book._file.fileno(), [buckets], book._index_offset) != size:
        raise OSError(f"{book._file_path}: its index could not be read whole")
    return buckets


def _write_all(fd: int, buffers: list[bytes | bytearray | memoryview]) -> None:
    """Write ``buffers`` one after the other at ``fd``'s position, with one ``writev``
    call unless the kernel writes less (over 2 GiB on Linux) or there are more than
    ``IOV_MAX`` buffers."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views:
            views[0] = views[0][written:]


#: booklet's ``n_keys`` of a file not closed cleanly; :class:`DataFile` writes it while it
#: relinks the index or links new records, so that an open after a kill mid-way relinks.
_N_KEYS_CRASH = booklet.utils.n_keys_crash.to_bytes(4, "little")
#: The head of the deleted record that covers an index :class:`DataFile` appends: a scan
#: of the file passes over the index as over any deleted record (see :meth:`DataFile._grow`).
_SKIP_KEY = b"\x00"
_HEADER_END = booklet.utils.first_data_block_pos_pos + booklet.utils.n_bytes_file
_UNSET_POSITION = 52983525027888  # what booklet reads as "no position recorded" besides 0
_MISS = object()


def _skip_head(size: int, ts_len: int) -> bytes:
    """The head of a deleted record whose value is the ``size`` bytes after it."""
    return _RECORD_HEAD.pack(bytes(_HASH_LEN), _DELETED, 1, size) + bytes(ts_len) + _SKIP_KEY


class DataFile(booklet.VariableLengthValue):
    """booklet 0.12's variable-length file (``booklet.open(path)`` reads it as its own),
    with ebooklet's write path:

    - :meth:`put` buffers a record from an encoded key in booklet's own write buffer
      (booklet's reads and iterations see it, and flush it first); :meth:`sync` writes
      the buffer with one write, after calling :attr:`before_write` (the journal's
      flush: a journal record reaches the disk before the value it names), linked
      beforehand in memory by :func:`_link_buffer` (a new key costs no write of its own).
    - the index grows as keys arrive: when there are more keys than buckets, a bucket
      array of booklet's next size is appended, and every record is relinked in one
      sequential pass (:meth:`_grow`); booklet would relink at ``close()`` with a seek,
      read and write per record, and walk chains of N / 12,007 records until then.

    A growth, and a write of records until they are linked, is marked in the header by
    booklet's "not closed cleanly" key count, and an open that finds it relinks the
    whole index (a kill mid-way leaves records out of reach or chains that miss keys,
    never one that leads to another key's value); the appended array lies inside a
    deleted record, so that a scan of the file in any state passes over it.
    """

    before_write: Callable[[], None] | None = None
    """Called before buffered records are written to the file."""
    _bucket_buffer: bytearray | None = None  # see _bucket_array

    def __init__(self, path: str, flag: str, batch_lock: contextlib.AbstractContextManager | None = None, **params: Any):
        """Open ``path`` as ``booklet.open(path, flag, **params)`` does; a file marked
        "not closed cleanly" (a growth or a write killed mid-way, or a booklet object
        never closed) is relinked when writable.

        ``batch_lock`` (a reentrant lock shared by the processes that open the file, see
        :class:`.local.FileLock`), with flag ``'c'``: the file is shared with them (see
        :meth:`batch`); without it, booklet's exclusive file lock is held until close.
        """
        self._batch_lock = batch_lock if flag != "r" else None
        self._batch_depth = 0
        self._pending: list[tuple[bytes, int]] = []  # (key hash, position in the buffer)
        if self._batch_lock is None:
            interrupted = flag in ("c", "w") and _marked_crashed(path)
            super().__init__(path, flag, **params)
            if interrupted and self.writable:
                with self._thread_lock:
                    self._grow(self._n_buckets, dedupe=True)
            return
        with self._batch_lock:
            if os.path.exists(path):
                self._open_shared(path, **params)
            else:  # created holding booklet's exclusive lock, then shared for the session
                super().__init__(path, "c", **params)
                portalocker.lock(self._file, portalocker.LOCK_SH)
            self._pending = []
            if self._n_keys == booklet.utils.n_keys_crash:  # a process was killed writing
                with self._thread_lock:
                    self._grow(self._n_buckets, dedupe=True)

    def _open_shared(
        self, path: str, key_serializer: Any = None, value_serializer: Any = None,
        n_buckets: int = 12007, buffer_size: int = 2**22, timeout: float | None = None,
    ) -> None:
        """Open an existing file for reading and writing holding a shared file lock (booklet
        takes an exclusive one): what booklet's ``init_files_variable`` does for it."""
        utils = booklet.utils
        file = open(path, "r+b", buffering=0)  # noqa: SIM115 - closed by close()
        try:
            utils._acquire_lock(file, portalocker.LOCK_SH, timeout, path)
            header = file.read(utils.sub_index_init_pos)
            if header[:16] != utils.uuid_variable_blt:
                raise TypeError("This is not the correct file type.")
            self._defer_reindex = False
            self.writable = True
            self._lock_timeout = timeout
            self._write_buffer_size = buffer_size
            self._buffer_data = bytearray()
            self._buffer_index = bytearray()
            self._buffer_index_set: set[bytes] = set()
            self._thread_lock = threading.Lock()
            self._mutation_count = 0
            self._compaction_count = 0
            self._is_file = True
            self._file_path = Path(path)
            self._file = file
            self._mmap = None
            utils.read_base_params_variable(self, header, key_serializer, value_serializer)
            if self._version < 4:
                if self._version != 3:
                    raise ValueError("File is an older version.")
                self._init_timestamps = 0
                self._ts_bytes_len = 0
        except BaseException:
            file.close()
            raise
        self._finalizer = weakref.finalize(self, utils.close_files, file, 0, self._n_keys_pos, False, None)

    @property
    def shared(self) -> bool:
        """Whether other processes may have the file open too (see :meth:`batch`)."""
        return self._batch_lock is not None

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Hold the batch lock around a write to a shared file, seeing the file as the
        other processes left it: the header is read again (another process may have
        appended records or moved the index), and a write another process was killed in
        (the header's "not closed cleanly" key count) is repaired first: the index is
        relinked from the records and a record cut short at the end is cut away, so
        that nothing is appended after a torn record. A no-op for a file not shared."""
        if self._batch_lock is None:
            yield
            return
        with self._batch_lock:
            self._batch_depth += 1
            try:
                if self._batch_depth == 1:
                    with self._thread_lock:
                        self._reread_header(repair=True)
                yield
            finally:
                self._batch_depth -= 1
                if self._batch_depth == 0 and getattr(self, "_view", None) is not None:
                    with self._thread_lock:
                        self._remap()  # what this process wrote, a repair's cut: mapped as it is

    def map_for_reading(self) -> None:
        """Look values up through a map of the file from now on (:func:`get_value`), as
        booklet's flag ``'r'`` does: no system call a read, so that readers in several
        processes scale where system calls do not. The map is made again when a lookup
        needs what was appended since (:meth:`refresh`, and after this process's writes).
        Only for a reader of a shared file: the file only grows while others have it open
        (what a repair cuts away was never linked), so a lookup never touches a page
        past the file's end."""
        if self._batch_lock is not None:
            with self._thread_lock:
                self._remap()

    def _remap(self) -> None:
        """Map the whole file as it is now (the caller holds the thread lock)."""
        old = getattr(self, "_view", None)
        size = os.fstat(self._file.fileno()).st_size
        self._view = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_READ) if size else None
        if old is not None:
            old.close()

    def refresh(self) -> bool:
        """Read the header of a shared file again (without the batch lock): returns
        whether another process moved the index or appended records since (a reader's
        map of the file is made again then), so that a lookup that missed is worth
        another try (its chains were relinked for the new index). A header marked "not
        closed cleanly" (another process in the middle of a write, or killed in one)
        is waited for under the batch lock, which repairs a killed write."""
        if self._batch_lock is None or self._file is None or self._file.closed:
            return False
        if os.pread(self._file.fileno(), 4, self._n_keys_pos) == _N_KEYS_CRASH:
            # another process is linking records or relinking the index (or was killed
            # doing so): chains may lead astray until it is done; the batch lock waits
            # for it, or repairs what it left, and reads the header again
            with self.batch():
                return True
        with self._thread_lock:
            moved = self._reread_header(repair=False)
            view = getattr(self, "_view", None)
            if view is not None and os.fstat(self._file.fileno()).st_size > len(view):
                self._remap()
                return True
            return moved

    def _reread_header(self, repair: bool) -> bool:
        """Adopt the header's index, first record and key count (the caller holds the
        thread lock); a key count saying "not closed cleanly" is kept out and, when
        ``repair`` (the batch lock held), the file relinked. Returns whether the index moved."""
        utils = booklet.utils
        width = utils.n_bytes_file
        header = os.pread(self._file.fileno(), _HEADER_END, 0)
        n_buckets = int.from_bytes(header[21:25], "little")
        n_keys = int.from_bytes(header[utils.n_keys_pos : utils.n_keys_pos + 4], "little")
        index_offset = int.from_bytes(header[utils.index_offset_pos : utils.index_offset_pos + width], "little")
        first = int.from_bytes(header[utils.first_data_block_pos_pos : _HEADER_END], "little")
        moved = (n_buckets, index_offset) != (self._n_buckets, self._index_offset)
        if index_offset not in (0, _UNSET_POSITION):
            self._index_offset = index_offset
        if first not in (0, _UNSET_POSITION):
            self._first_data_block_pos = first
        self._n_buckets = n_buckets
        if n_keys != utils.n_keys_crash:
            self._n_keys = n_keys
        elif repair:
            self._grow(n_buckets, dedupe=True)
            moved = True
        if moved:
            self._mutation_count += 1
        return moved

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        """Hold the file alone, for a write that moves records (``clear``, ``prune``):
        no other process may have it open then.

        Raises:
            booklet.LockTimeoutError: another process has the file open.
        """
        if self._batch_lock is None:
            yield
            return
        with self.batch():
            try:
                portalocker.lock(self._file, portalocker.LOCK_EX | portalocker.LOCK_NB)
            except portalocker.exceptions.LockException:
                portalocker.lock(self._file, portalocker.LOCK_SH)  # a failed conversion drops it
                raise booklet.LockTimeoutError(
                    f"{self._file_path} is open in another process: close it there first."
                ) from None
            try:
                yield
            finally:
                portalocker.lock(self._file, portalocker.LOCK_SH)

    def get(self, key: Any, default: Any = None) -> Any:
        """booklet's ``get``, once more after a miss when another process moved the index."""
        value = super().get(key, _MISS)
        if value is _MISS and self.refresh():
            value = super().get(key, _MISS)
        return default if value is _MISS else value

    def get_part(self, key: Any, start: int, length: int) -> bytes | None:
        """Bytes ``start`` to ``start + length`` of the encoded value of ``key`` (fewer past
        its end; ``None``: no such key), without reading the rest of it."""
        return get_value(self, self._pre_key(key), part=(start, length))

    def get_timestamp(
        self, key: Any, include_value: bool = False, decode_value: bool = True, default: Any = None
    ) -> Any:
        """booklet's ``get_timestamp``, once more after a miss when another process moved the index."""
        found = super().get_timestamp(key, include_value, decode_value, _MISS)
        if found is _MISS and self.refresh():
            found = super().get_timestamp(key, include_value, decode_value, _MISS)
        return default if found is _MISS else found

    def __contains__(self, key: Any) -> bool:
        """booklet's ``in``, once more after a miss when another process moved the index."""
        return super().__contains__(key) or (self.refresh() and super().__contains__(key))

    def __delitem__(self, key: Any) -> None:
        """booklet's ``del``, under the batch lock."""
        with self.batch():
            super().__delitem__(key)

    def set_timestamp(self, key: Any, timestamp: Any) -> None:
        """booklet's ``set_timestamp``, under the batch lock."""
        with self.batch():
            super().set_timestamp(key, timestamp)

    def set_metadata(self, data: Any, timestamp: Any = None) -> None:
        """booklet's ``set_metadata``, under the batch lock and marked "not closed
        cleanly" while it writes (booklet appends a record and links it)."""
        with self.batch():
            self.sync()
            if self._batch_lock is not None:
                os.pwrite(self._file.fileno(), _N_KEYS_CRASH, self._n_keys_pos)
            super().set_metadata(data, timestamp)
            if self._batch_lock is not None:
                os.pwrite(self._file.fileno(), self._n_keys.to_bytes(4, "little"), self._n_keys_pos)

    def close(self) -> None:
        """booklet's ``close``, and the reader's map of the file (if any) goes."""
        super().close()
        self._bucket_buffer = None
        view = getattr(self, "_view", None)
        if view is not None:
            self._view = None
            view.close()

    def prune(self, *args: Any, **kwargs: Any) -> Any:
        """booklet's ``prune``, with the file alone (see :meth:`alone`)."""
        with self.alone():
            return super().prune(*args, **kwargs)

    def put(self, key: bytes, value: bytes, timestamp: Any = None) -> None:
        """Set the encoded ``key`` to the encoded ``value`` (with ``timestamp``: µs, ISO
        str or datetime; ``None``: now), as ``set(..., encode_value=False)`` does.

        Raises:
            ValueError: the file is read-only.
        """
        if not self.writable:
            raise ValueError("File is open for read only.")
        if timestamp is None:
            timestamp = time.time_ns() // 1000
        elif type(timestamp) is not int:
            timestamp = booklet.utils.make_timestamp_int(timestamp)
        key_hash = blake2s(key, digest_size=_HASH_LEN).digest()
        head = _RECORD_HEAD.pack(key_hash, _NO_NEXT_BLOCK, len(key), len(value))
        head += timestamp.to_bytes(self._ts_bytes_len, "little")
        with self._thread_lock:
            self._mutation_count += 1
            buffer = self._buffer_data
            self._pending.append((key_hash, len(buffer)))
            self._buffer_index_set.add(key_hash)
            buffer += head
            buffer += key
            buffer += value
        if len(buffer) >= self._write_buffer_size:
            self.sync()

    def set(self, key: Any, value: Any, timestamp: Any = None, encode_value: bool = True) -> None:
        """booklet's ``set``, through :meth:`put`."""
        if encode_value:
            value = self._pre_value(value)
        elif not isinstance(value, bytes):
            raise TypeError("If encode_value is False, then value must be a bytes object.")
        self.put(self._pre_key(key), value, timestamp)

    def update(self, key_value: Any) -> None:
        """booklet's ``update``, through :meth:`put`."""
        for key, value in key_value.items():
            self.set(key, value)

    def clear(self) -> None:
        """booklet's ``clear``, which drops the buffered records too, with the file alone
        (see :meth:`alone`)."""
        with self.alone():
            with self._thread_lock:
                self._buffer_data.clear()
                self._pending.clear()
                self._buffer_index_set.clear()
            super().clear()

    def sync(self) -> None:
        """Write the buffered records (after :attr:`before_write`), link them, and grow
        the index if it holds more keys than buckets."""
        if not self.writable or self._file is None or self._file.closed:
            return
        if not self._buffer_data and self._n_keys <= self._n_buckets:
            return
        with self.batch(), self._thread_lock:
            if self._buffer_data:
                if self.before_write is not None:
                    self.before_write()
                self._grow_for(len(self._pending))  # before the records: they link short chains
                self._flush()
            self._grow_for(0)

    def _flush(self) -> None:
        """Write booklet's buffer at the end of the file and link its records (the
        caller holds the lock)."""
        fd = self._file.fileno()
        start = os.fstat(fd).st_size
        buffer = self._buffer_data
        new_keys, fields = _link_buffer(self, start)
        os.pwrite(fd, _N_KEYS_CRASH, self._n_keys_pos)  # until the records are linked
        try:
            _write_all_at(fd, buffer, start)
        except BaseException:
            os.ftruncate(fd, start)  # no record may stay in the file unindexed
            raise
        finally:
            buffer.clear()
            self._pending.clear()
            self._buffer_index_set.clear()
        for position, data in fields:
            _write_all_at(fd, data, position)
        self._n_keys += new_keys
        os.pwrite(fd, self._n_keys.to_bytes(4, "little"), self._n_keys_pos)

    def _check_auto_reindex(self) -> None:
        """Grow the index (booklet calls this after its writes, holding the lock)."""
        self._grow_for(0)

    def _grow_for(self, new_keys: int) -> None:
        """Grow the index to booklet's next size (or beyond) if it has fewer buckets than
        the keys it holds and ``new_keys`` (the caller holds the lock)."""
        wanted, n_buckets = self._n_keys + new_keys, self._n_buckets
        if wanted <= n_buckets or self._defer_reindex:
            return
        while n_buckets < wanted:
            n_buckets = booklet.utils.get_new_n_buckets(n_buckets) or 2 * n_buckets + 1
        self._grow(n_buckets)

    def _grow(self, n_buckets: int, dedupe: bool = False) -> None:
        """Link every live record into a new index of ``n_buckets`` appended at the end,
        then point the header at it (the caller holds the lock). ``dedupe``: after a
        kill, a key may have two live records (the newer one not linked yet): the older
        one is marked deleted.

        In this order: the header's key count says "not closed cleanly"; every record's
        next-record field is rewritten in one sequential pass (read and written a
        :data:`SCAN_BUFFER` at a time); the array is appended inside a deleted record;
        an index booklet moved (not inside such a record) is overwritten by booklet's
        deleted block; the header takes the new index and the key count in one write.
        """
        fd = self._file.fileno()
        ts_len, width = self._ts_bytes_len, booklet.utils.n_bytes_file
        size = os.fstat(fd).st_size
        old_at, old_size = self._index_offset, self._n_buckets * width
        regions = [(self._first_data_block_pos, size)]
        if old_at != booklet.utils.sub_index_init_pos:
            regions = [(self._first_data_block_pos, old_at), (old_at + old_size, size)]
        os.pwrite(fd, _N_KEYS_CRASH, self._n_keys_pos)
        stale = _stale_records(fd, regions, ts_len) if dedupe else set()
        heads = bytearray(_NO_NEXT_BLOCK * n_buckets)
        n_keys, end = _relink(fd, regions, ts_len, heads, stale)
        if end < size:  # a record cut short by a kill: not one
            os.ftruncate(fd, end)
        new_at = end + len(_skip_head(0, ts_len))
        _write_all_at(fd, _skip_head(len(heads), ts_len) + heads, end)
        if old_at != booklet.utils.sub_index_init_pos:
            skip_at = old_at - len(_skip_head(0, ts_len))
            if os.pread(fd, new_at - end, skip_at) != _skip_head(old_size, ts_len):
                booklet.utils.write_skip_block_variable(self._file, old_at, old_size, ts_len)
        header = bytearray(os.pread(fd, _HEADER_END, 0))
        utils = booklet.utils
        header[21:25] = n_buckets.to_bytes(4, "little")
        header[utils.n_keys_pos : utils.n_keys_pos + 4] = n_keys.to_bytes(4, "little")
        header[utils.index_offset_pos : utils.index_offset_pos + width] = new_at.to_bytes(width, "little")
        header[utils.first_data_block_pos_pos : _HEADER_END] = self._first_data_block_pos.to_bytes(
            width, "little"
        )
        os.pwrite(fd, header[21:], 21)
        self._mutation_count += 1
        self._n_buckets, self._index_offset, self._n_keys = n_buckets, new_at, n_keys


def _marked_crashed(path: str) -> bool:
    """Whether the booklet file at ``path`` holds booklet's "not closed cleanly" key count."""
    try:
        with open(path, "rb") as file:
            file.seek(booklet.utils.n_keys_pos)
            return file.read(4) == _N_KEYS_CRASH
    except OSError:
        return False


def _heads(fd: int, regions: list[tuple[int, int]], ts_len: int) -> Iterator[tuple[bytearray, int, int, int, int]]:
    """``(chunk, chunk position, record offset in chunk, next-record field, record size)``
    of every whole record in ``regions``, read a :data:`SCAN_BUFFER` at a time (a value
    past the chunk is skipped, not read); a chunk is yielded again as it is left, with
    offset -1 and as size the end of its last whole record (the end of the records, when
    the last one is cut short by the end of the file)."""
    head_size = _RECORD_HEAD.size
    unpack = _RECORD_LENGTHS.unpack_from
    for start, end in regions:
        position = start
        while position + head_size <= end:
            chunk = bytearray(os.pread(fd, min(SCAN_BUFFER, end - position), position))
            at = 0
            while at + head_size <= len(chunk):
                next_block, key_len, value_len = unpack(chunk, at)
                size = head_size + ts_len + key_len + value_len
                if position + at + size > end:
                    break
                yield chunk, position, at, next_block, size
                at += size
            yield chunk, position, -1, b"", at
            if at == 0:
                break
            position += at


def _stale_records(fd: int, regions: list[tuple[int, int]], ts_len: int) -> set[int]:
    """Positions of live records followed by a live record of the same key hash."""
    last: dict[bytes, int] = {}
    stale = set()
    for chunk, position, at, next_block, _ in _heads(fd, regions, ts_len):
        if at >= 0 and next_block != _DELETED:
            key_hash = bytes(chunk[at : at + _HASH_LEN])
            if key_hash in last:
                stale.add(last[key_hash])
            last[key_hash] = position + at
    return stale


def _relink(
    fd: int, regions: list[tuple[int, int]], ts_len: int, heads: bytearray, stale: set[int]
) -> tuple[int, int]:
    """Link every live record of ``regions`` at the head of its bucket's chain in
    ``heads`` (a bucket array, in memory), rewriting the records' next-record fields in
    place, a chunk at a time; records at ``stale`` positions are marked deleted. Returns
    the number of keys (booklet's reserved keys are linked, not counted) and where the
    last region's whole records end."""
    width, hash_len = booklet.utils.n_bytes_file, _HASH_LEN
    n_buckets = len(heads) // width
    reserved = booklet.utils.reserved_key_hashes
    n_keys, end = 0, regions[-1][0]
    low = high = -1
    for chunk, position, at, next_block, size in _heads(fd, regions, ts_len):
        if at < 0:  # the chunk is done: write back what changed
            if low >= 0:
                os.pwrite(fd, chunk[low:high], position + low)
            low = high = -1
            end = max(end, position + size)
            continue
        if next_block == _DELETED:
            continue
        field = at + hash_len
        if position + at in stale:
            chunk[field : field + width] = _DELETED
        else:
            key_hash = bytes(chunk[at:field])
            bucket = int.from_bytes(key_hash, "little") % n_buckets * width
            chunk[field : field + width] = heads[bucket : bucket + width]
            heads[bucket : bucket + width] = (position + at).to_bytes(width, "little")
            n_keys += key_hash not in reserved
        if low < 0:
            low = at
        high = field + width
    return n_keys, end


def _write_all_at(fd: int, data: bytes | bytearray, position: int) -> None:
    """Write ``data`` at ``position`` of ``fd`` (``pwrite`` until all of it is written)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view, position = view[written:], position + written
