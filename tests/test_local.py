"""Downloaded values and large ones are appended to the local booklet file by
ebooklet's own writer (:func:`ebooklet._booklet_io.append_records`), which must write exactly
what ``booklet.set`` writes, index included: these tests fail the day a booklet release
changes its layout."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import booklet
import pytest

import ebooklet
from ebooklet._booklet_io import append_records

TS = 1_700_000_000_000_000  # microseconds, as booklet keeps them


def _records() -> list[tuple[bytes, bytes, int]]:
    """Small and large values interleaved, one key written twice, an empty key."""
    large = random.Random(1).randbytes(1 << 20) * 5  # past ebooklet.ebooklet.LARGE_VALUE (4 MiB)
    return [
        (b"small-1", b"x" * 100, TS),
        (b"large-1", large, TS + 1),
        (b"small-2", b"y" * 3000, TS + 2),
        (b"large-2", large[::-1], TS + 3),
        (b"large-1", large[: (5 << 20) - 7], TS + 4),
        (b"", b"z" * (4 << 20 | 1), TS + 5),
    ]


def _batches() -> list[list[tuple[bytes, bytes, int]]]:
    """The records above, then many small ones: keys written again and again, in
    batches of one, of many, and one past booklet's write buffer (4 MiB)."""
    rng = random.Random(3)
    small = [(b"k%d" % rng.randrange(300), rng.randbytes(rng.randrange(200)), TS + i) for i in range(1000)]
    big_batch = [(b"b%d" % i, rng.randbytes(5000), TS) for i in range(1000)]
    return [_records(), small[:1], small[1:600], big_batch, small[600:]]


def _write(path: Path, by_append: bool, n_buckets: int) -> None:
    with booklet.open(
        str(path), "n", key_serializer="bytes", value_serializer="bytes", n_buckets=n_buckets
    ) as book:
        book.set(b"first", b"by booklet", timestamp=TS)  # still in booklet's buffers
        for i, batch in enumerate(_batches()):
            if by_append:
                append_records(book, batch)
            else:
                for key, value, ts in batch:
                    book.set(key, value, timestamp=ts, encode_value=False)
                book.sync()
            book.pop(b"k%d" % i, None)  # a delete between batches, by booklet on both sides


@pytest.mark.parametrize("n_buckets", [11, 12007])  # 11: long chains, and booklet regrows its index
@pytest.mark.parametrize("write_size", [ebooklet._booklet_io.WRITE_SIZE, 10_000])  # one write, many
def test_appended_records_make_the_same_file_as_booklet_set(
    tmp_path: Path, n_buckets: int, write_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ebooklet._booklet_io, "WRITE_SIZE", write_size)
    by_set, by_append = tmp_path / "set.blt", tmp_path / "append.blt"
    _write(by_set, by_append=False, n_buckets=n_buckets)
    _write(by_append, by_append=True, n_buckets=n_buckets)
    # The first bytes differ by the file's own timestamp and uuid; index and data are equal.
    start = booklet.utils.sub_index_init_pos
    assert by_append.read_bytes()[start:] == by_set.read_bytes()[start:]
    with booklet.open(str(by_set), "r") as a, booklet.open(str(by_append), "r") as b:
        assert len(a) == len(b)
        assert list(a.timestamps(include_value=True)) == list(b.timestamps(include_value=True))


def test_appended_records_read_back(tmp_path: Path) -> None:
    expected = {key: (ts, value) for key, value, ts in _records()}
    path = tmp_path / "db.blt"
    with booklet.open(str(path), "n", key_serializer="bytes", value_serializer="bytes") as book:
        append_records(book, _records())
        assert book.get_timestamp(b"large-2", include_value=True) == expected[b"large-2"]
        assert len(book) == len(expected)
    with booklet.open(str(path), "r") as book:
        assert {k: (ts, v) for k, ts, v in book.timestamps(include_value=True)} == expected
        assert len(book) == len(expected)


def test_large_values_written_through_ebooklet_open_with_plain_booklet(tmp_path: Path) -> None:
    big = os.urandom(6 << 20)
    path = tmp_path / "db.blt"
    with ebooklet.open(None, path, "n", value_serializer="bytes") as db:
        db["big"] = big
        db["small"] = b"s"
        db["big"] = big[:-1]  # overwritten: the newest value wins
        assert db["big"] == big[:-1]
    with booklet.open(str(path), "r") as book:
        assert dict(book.items()) == {"big": big[:-1], "small": b"s"}


@pytest.mark.parametrize("sizes", [[0, 3], [5, 0, 2], [1 << 16, 1]])
def test_write_all_writes_every_buffer_in_order(tmp_path: Path, sizes: list[int]) -> None:
    from ebooklet._booklet_io import _write_all

    buffers = [os.urandom(n) for n in sizes]
    path = tmp_path / "out"
    with open(path, "wb", buffering=0) as f:
        _write_all(f.fileno(), [memoryview(b) for b in buffers])
    assert path.read_bytes() == b"".join(buffers)


def test_scan_reads_what_booklet_timestamps_reads(tmp_path: Path) -> None:
    """Overwrites, deletes, metadata and enough keys to make booklet move its index."""
    from ebooklet._booklet_io import scan

    path = tmp_path / "db.blt"
    rng = random.Random(2)
    with booklet.open(str(path), "n", key_serializer="bytes", value_serializer="bytes", n_buckets=11) as book:
        book.set_metadata({"a": 1})
        for i in range(3000):
            book.set(b"k%d" % rng.randrange(2000), rng.randbytes(rng.randrange(300)), timestamp=TS + i)
            if i % 7 == 0:
                book.pop(b"k%d" % rng.randrange(2000), None)
        append_records(book, [(b"large", b"L" * (5 << 20), TS)])  # past the scan's 1 MiB reads
        book.set(b"after large", b"a", timestamp=TS)
        book.set(b"k1", b"k1 again", timestamp=TS)
        expected = list(book.timestamps(include_value=True, decode_value=False))
        assert book._index_offset != booklet.utils.sub_index_init_pos  # the index moved
        assert list(scan(book, path)) == expected
        assert list(scan(book, path, include_value=False)) == [(k, ts) for k, ts, _ in expected]


@pytest.mark.parametrize("read_size", [40, 1 << 20])
def test_scan_reads_edge_records_as_booklet_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_size: int
) -> None:
    """Records the scan's usual path leaves to its careful one: keys as long as booklet's
    reserved keys (not reserved: they are read), an empty key and an empty value (nothing
    after the timestamp), and a last record of one byte, with the metadata's reserved
    record among them; across reads or within one."""
    from ebooklet._booklet_io import scan

    monkeypatch.setattr(ebooklet._booklet_io, "SCAN_BUFFER", read_size)
    path = tmp_path / "db.blt"
    reserved_length = len(next(iter(booklet.utils.reserved_key_bytes)))
    with booklet.open(str(path), "n", key_serializer="bytes", value_serializer="bytes") as book:
        book.set(b"k" * reserved_length, b"same length as a reserved key", timestamp=TS)
        book.set_metadata({"a": 1})
        book.set(b"", b"", timestamp=TS + 1)
        book.set(b"x" * reserved_length, b"", timestamp=TS + 2)
        book.set(b"z", b"", timestamp=TS + 3)
        expected = list(book.timestamps(include_value=True, decode_value=False))
        assert len(expected) == 4
        assert list(scan(book, path)) == expected
        assert list(scan(book, path, include_value=False)) == [(k, ts) for k, ts, _ in expected]


@pytest.mark.parametrize("read_size", [16, 97, 1000])
def test_scan_reads_the_same_whatever_its_read_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_size: int
) -> None:
    """Records across the scan's reads, values larger than a read (read on their own), and
    deleted records (``deleted=True``) come out as booklet reads them."""
    from ebooklet._booklet_io import scan

    monkeypatch.setattr(ebooklet._booklet_io, "SCAN_BUFFER", read_size)
    path = tmp_path / "db.blt"
    rng = random.Random(3)
    with booklet.open(str(path), "n", key_serializer="bytes", value_serializer="bytes") as book:
        for i in range(300):
            book.set(b"k%d" % i, rng.randbytes(rng.randrange(1500)), timestamp=TS + i)
        for i in range(0, 300, 7):
            del book[b"k%d" % i]
        expected = list(book.timestamps(include_value=True, decode_value=False))
        assert list(scan(book, path)) == expected
        assert list(scan(book, path, include_value=False)) == [(k, ts) for k, ts, _ in expected]
        with_deleted = list(scan(book, path, include_value=False, deleted=True))
    assert sorted(with_deleted, key=lambda r: int(r[0][1:])) == [
        (b"k%d" % i, None if i % 7 == 0 else TS + i) for i in range(300)
    ]


def test_scan_stops_when_the_file_is_written_meanwhile(tmp_path: Path) -> None:
    from ebooklet._booklet_io import scan

    path = tmp_path / "db.blt"
    with booklet.open(str(path), "n", key_serializer="bytes", value_serializer="bytes") as book:
        for i in range(10):
            book[b"k%d" % i] = b"v"
        records = scan(book, path)
        next(records)
        book[b"new"] = b"v"
        with pytest.raises(RuntimeError, match="written to during a scan"):
            list(records)


def test_a_refused_record_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    """append_records writes all of its records or none: a bad timestamp after a large
    value (written on its own) refuses the batch before anything reaches the file."""
    import datetime

    path = tmp_path / "db.blt"
    with booklet.open(str(path), "n", key_serializer="bytes", value_serializer="bytes") as book:
        book.set(b"before", b"b", timestamp=TS)
        book.sync()
        size = path.stat().st_size
        batch = [(b"big", b"B" * (2 << 20), TS), (b"bad", b"x", datetime.datetime(2024, 1, 1))]
        with pytest.raises(ValueError):
            append_records(book, batch)
        assert path.stat().st_size == size
        assert list(book.keys()) == [b"before"]
    with booklet.open(str(path), "r") as book:
        assert dict(book.items()) == {b"before": b"b"}


def test_scan_of_a_file_cleared_meanwhile_stops_like_booklet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ebooklet._booklet_io import scan

    monkeypatch.setattr(ebooklet._booklet_io, "SCAN_BUFFER", 16)  # a read for every record
    path = tmp_path / "db.blt"
    with booklet.open(str(path), "n", key_serializer="bytes", value_serializer="bytes") as book:
        append_records(book, [(b"k%d" % i, b"v" * 100, TS) for i in range(10)])
        records = scan(book, path)
        next(records)
        book.clear()
        with pytest.raises(RuntimeError, match="written to during a scan"):
            list(records)


def test_journaled_packs_are_read_back_and_a_damaged_one_is_skipped(tmp_path: Path) -> None:
    """A push's uploaded packs are journaled as their footers; reopened, the journal knows
    every value in them. A footer that fails its checksum is skipped (its values are
    uploaded again by the next push), not an error at every push."""
    from ebooklet import format as fmt
    from ebooklet.local import ChangeLog

    items = [(b"k%d" % i, fmt.md5(b"v%d" % i), TS + i, 10 * i, 10) for i in range(3)]
    good, bad = fmt.encode_pack_footer(items), bytearray(fmt.encode_pack_footer(items[:1]))
    bad[20] ^= 0xFF
    log = ChangeLog(tmp_path / "db.local_hash")
    log.record_pack(b"P" * 16, good)
    log.record_pack(b"Q" * 16, bytes(bad))
    log.close()
    reopened = ChangeLog(tmp_path / "db.local_hash")
    expected = {m: (b"P" * 16, offset, length, ts) for _, m, ts, offset, length in items}
    assert {m: tuple(up) for m, up in reopened.uploads.items()} == expected
    assert {m: tuple(up) for m, up in reopened.uploads.items()} == expected  # asked again
    reopened.compact()
    reopened.close()
    assert {m: tuple(up) for m, up in ChangeLog(tmp_path / "db.local_hash").uploads.items()} == expected


def test_journaled_pack_footers_are_read_back_from_the_file_not_held(tmp_path: Path) -> None:
    """A journaled pack's footer is not kept in memory (a push of 1M keys journals ~50 MB
    of them): ``uploads`` reads it back from the file, checked again by its record's
    checksums, so a footer changed in the file since is skipped (its values go up again)."""
    from ebooklet import format as fmt
    from ebooklet.local import ChangeLog

    items = [(b"k%d" % i, fmt.md5(b"v%d" % i), TS + i, 10 * i, 10) for i in range(3)]
    footers = {b"P" * 16: fmt.encode_pack_footer(items), b"Q" * 16: fmt.encode_pack_footer(items[:1])}
    path = tmp_path / "db.local_hash"
    log = ChangeLog(path)
    for pack, footer in footers.items():
        log.record_pack(pack, footer)
    data = bytearray(path.read_bytes())
    at = data.rindex(footers[b"Q" * 16])
    data[at + 30] ^= 0xFF
    with open(path, "r+b") as file:
        file.write(data)
    assert {up.pack for up in log.uploads.values()} == {b"P" * 16}
    log.close()


def test_scan_skips_a_record_cut_short_by_a_killed_write(tmp_path: Path) -> None:
    """A process killed while appending leaves a torn record at the end of the file; a
    scan (what a push reads its values from) must not take its truncated value."""
    from ebooklet._booklet_io import scan

    path = tmp_path / "db.blt"
    with booklet.open(str(path), "n", key_serializer="bytes", value_serializer="bytes") as book:
        append_records(book, [(b"whole", b"w" * 100, TS)])
        size = path.stat().st_size
    with open(path, "ab") as f:  # what a write of b"torn" -> 3 MiB got to before the kill
        f.write(append_head(b"torn", 3 << 20) + b"t" * 1000)
    with booklet.open(str(path), "w", key_serializer="bytes", value_serializer="bytes") as book:
        assert path.stat().st_size > size
        assert [(k, len(v)) for k, _, v in scan(book, path)] == [(b"whole", 100)]
        assert [k for k, _ in scan(book, path, include_value=False)] == [b"whole"]


def append_head(key: bytes, value_len: int) -> bytes:
    """booklet's record head for ``key`` and a value of ``value_len`` bytes, then the key."""
    from ebooklet._booklet_io import _NO_NEXT_BLOCK, _RECORD_HEAD

    head = _RECORD_HEAD.pack(booklet.utils.hash_key(key), _NO_NEXT_BLOCK, len(key), value_len)
    return head + TS.to_bytes(7, "little") + key


def _journal_with_edits(path: Path) -> Any:
    """A writer's journal (issue 16): 50 edits, 40 of them pushed since (the file is long)."""
    from ebooklet.local import ChangeLog

    writer = ChangeLog(path)
    writer.record_edits([(b"k%d" % i, b"\x01" * 16, None) for i in range(50)])
    writer.mark_clean([b"k%d" % i for i in range(40)])
    return writer


def test_a_reader_reads_the_journal_the_writer_compacts_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer (another process) compacts the journal between the reader's look at
    its size and its open: the reader reads the new file whole, as the file it opened
    (it read the new file with the old one's size: struct.error)."""
    import builtins

    from ebooklet import local

    path = tmp_path / "db.local_hash"
    writer = _journal_with_edits(path)

    def compacting_first(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file) == path:
            monkeypatch.setattr(local, "open", builtins.open, raising=False)
            writer.compact()  # the writer's push: the journal shrinks to its 10 live edits
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(local, "open", compacting_first, raising=False)
    reader = local.ChangeLog(path, writable=False)
    assert sorted(reader.edits) == sorted(b"k%d" % i for i in range(40, 50))


def test_a_reader_reads_the_journal_the_writer_cuts_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer drops its close record (it goes on writing) after the reader took the
    journal's size and before it read it: the reader reads it as cut short there, not as
    damage (struct.error)."""
    import os as real_os

    from ebooklet import local

    path = tmp_path / "db.local_hash"
    writer = _journal_with_edits(path)
    writer.close()  # ends with its close record

    class Cutting:
        """os for local: the first fstat of the journal is followed by the writer's cut."""

        cut = False

        def __getattr__(self, name: str) -> Any:
            return getattr(real_os, name)

        def fstat(self, fd: int) -> Any:
            stat = real_os.fstat(fd)
            if not self.cut:
                self.cut = True
                real_os.truncate(path, 8)  # all but the magic: cut in place
            return stat

    monkeypatch.setattr(local, "os", Cutting())
    reader = local.ChangeLog(path, writable=False)
    assert reader.edits == {}


def test_the_index_mirror_takes_the_batch_lock_before_its_own(tmp_path: Path) -> None:
    """Issue 16: one thread flushes the index mirror (its lock, then the copy's batch lock
    to write) while another, holding the batch lock, writes a reader's head to it (as
    ``Replica._record_data_state`` does): both finish. They deadlocked (each held the
    lock the other waited for) while the mirror took its own lock first."""
    import threading
    import time

    from ebooklet.local import FileLock, IndexMirror

    batch = FileLock(tmp_path / "db.ebk.lock")
    mirror = IndexMirror(tmp_path / "db.remote_index", batch_lock=batch)
    mirror.head_in_memory = True
    mirror.set_manifest({"n_keys": 0}, "etag")  # a reader's head, kept in memory
    mirror.head_in_memory = False
    holding, done = threading.Event(), []

    def flush() -> None:
        holding.wait(5)
        mirror.set_shard("s", b"x")  # buffered by the mirror's data file
        mirror.sync()
        done.append("flush")

    def record_head() -> None:
        with batch:
            holding.set()
            time.sleep(0.2)  # the other thread is in sync() by now
            mirror.persist_head()
        done.append("head")

    threads = [threading.Thread(target=f, daemon=True) for f in (flush, record_head)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert sorted(done) == ["flush", "head"]
    mirror.close()
    batch.close()
