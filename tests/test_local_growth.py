"""The data file's index grows as keys arrive (``_booklet_io.DataFile``): the file stays a
plain booklet file, ``close()`` has no index to rebuild, and a process killed in the
middle of a growth leaves a file the next open relinks, with every value that reached it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import booklet
import pytest

import ebooklet
from ebooklet import _booklet_io


def test_a_grown_file_is_a_plain_booklet_file(tmp_path: Path) -> None:
    """40,000 keys grow the index past booklet's first two sizes; plain booklet reads
    every value, iterates every key, prunes, and ebooklet reads the pruned file."""
    path = tmp_path / "db"
    with ebooklet.open(None, path, "n", key_serializer="str", value_serializer="orjson") as db:
        for i in range(40_000):
            db[f"k{i}"] = i
        db["k5"] = "again"
        del db["k6"]
        db.set_metadata({"m": 1})
    with booklet.open(str(path)) as book:
        assert _booklet_io.n_buckets(book) > 40_000
        assert len(book) == 39_999 and sum(1 for _ in book) == 39_999
        assert book["k39999"] == 39_999 and book["k5"] == "again" and "k6" not in book
        assert book.get_metadata() == {"m": 1}
    with booklet.open(str(path), "w") as book:
        book.prune()
    with ebooklet.open(None, path, "w") as db:
        assert (db["k7"], db["k5"], len(db)) == (7, "again", 39_999)


def test_close_after_many_writes_has_no_index_to_rebuild(tmp_path: Path) -> None:
    """booklet relinked its whole index in close() (40 s at 1M keys); here the index
    grew on the way, and close() writes only the last buffer."""
    with ebooklet.open(None, tmp_path / "db", "n", key_serializer="str") as db:
        for i in range(30_000):
            db[f"k{i}"] = b"v"
        start = time.perf_counter()
    assert time.perf_counter() - start < 1.0


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import ebooklet
    from ebooklet import _booklet_io
    path, kill_at = sys.argv[1], int(sys.argv[2])

    class Killing:
        '''os for _booklet_io: SIGKILL right after the kill_at-th pwrite of a growth.'''
        calls = None
        def __getattr__(self, name):
            return getattr(os, name)
        def pwrite(self, fd, data, position):
            written = os.pwrite(fd, data, position)
            if self.calls is not None:
                self.calls += 1
                if self.calls == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return written

    killing = Killing()
    grow = _booklet_io.DataFile._grow
    def growing(self, *args, **kwargs):
        killing.calls = 0
        if kill_at == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return grow(self, *args, **kwargs)
    _booklet_io.os = killing
    _booklet_io.DataFile._grow = growing
    db = ebooklet.open(None, path, "w")
    for i in range(5_000, 11_000):
        db[f"k{i}"] = f"v{i}"
    db.sync()  # 11,000 keys: no growth yet
    del db["k3"]
    for i in range(11_000, 13_000):
        db[f"k{i}"] = f"v{i}"
    db.sync()  # 13,000 keys: the index grows first, then these are written
    print("not killed", flush=True)
    """
)


@pytest.mark.parametrize("kill_at", range(9))
def test_a_process_killed_while_the_index_grows(tmp_path: Path, kill_at: int) -> None:
    """The writer is killed after the kill_at-th write from the start of a growth (0:
    before any; the key count marked, the next-record fields relinked a chunk at a time,
    the new array, the header; then the buffered records' mark, write and links).
    Reopened: every value written before reads back right, the deletion holds, the
    values that were buffered are all there (pending) or all gone (told), and plain
    booklet reads the relinked file as ebooklet does."""
    path = tmp_path / "db"
    with ebooklet.open(None, path, "n", key_serializer="str", value_serializer="str") as db:
        db.update({f"k{i}": f"v{i}" for i in range(5_000)})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(ebooklet.__file__).parents[1]), *sys.path]))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(kill_at)], capture_output=True, env=env, timeout=120
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-3000:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        db = ebooklet.open(None, path, "w")
    with db:
        assert [db.get(f"k{i}") for i in range(11_000)] == [
            None if i == 3 else f"v{i}" for i in range(11_000)
        ]
        buffered = [db.get(f"k{i}") for i in range(11_000, 13_000)]
        reached = buffered[0] is not None
        assert buffered == [f"v{i}" if reached else None for i in range(11_000, 13_000)]
        n_keys = 12_999 if reached else 10_999
        assert len(db) == n_keys
        assert len(list(db.changes().iter_changes())) == n_keys
    assert any("never reached it" in str(w.message) for w in caught) != reached
    with booklet.open(str(path)) as book:
        assert len(book) == n_keys == sum(1 for _ in book)
        assert book["k10999"] == "v10999" and "k3" not in book


HOLDING_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import ebooklet
    db = ebooklet.open(None, sys.argv[1], "w")
    db["synced"] = "s"
    db.sync()
    db["held"] = "h"  # its journal record and its value wait in memory
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_kill_before_the_buffer_is_written_loses_the_write_and_its_record(tmp_path: Path) -> None:
    """set() holds the journal record with the value in the data file's buffer: a kill
    before the buffer is written loses both, as if the write had not been made (no
    pending edit without its value, no warning); what sync() wrote is pending."""
    path = tmp_path / "db"
    ebooklet.open(None, path, "n", key_serializer="str", value_serializer="str").close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(ebooklet.__file__).parents[1]), *sys.path]))
    child = subprocess.run([sys.executable, "-c", HOLDING_CHILD, str(path)], capture_output=True, env=env)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        db = ebooklet.open(None, path, "w")
    with db:
        assert (db.get("synced"), db.get("held")) == ("s", None)
        assert [c.key for c in db.changes().iter_changes()] == ["synced"]


def test_a_batch_links_through_the_bucket_array_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the index is large (booklet's 144,013 buckets after 12,007 keys), a write of
    200 new keys links them through the bucket array read whole into a buffer kept for the
    next write (one ``preadv``), not a ``pread`` of a slot a key (issue 12: past 1.7M keys
    those system calls made the write loop four times slower); every value reads back."""
    path = tmp_path / "db"
    with ebooklet.open(None, path, "n", key_serializer="str", value_serializer="str") as db:
        for i in range(13_000):
            db[f"k{i}"] = "v"
        db.sync()
        reads = []
        pread = os.pread
        monkeypatch.setattr(_booklet_io.os, "pread", lambda *a: reads.append(a) or pread(*a))
        for batch in range(2):
            for i in range(200):
                db[f"n{batch}-{i}"] = "w"
            db.sync()
        monkeypatch.undo()
        assert len(reads) < 200  # chains of the keys whose bucket is taken; not one a key (400)
        assert db["n1-199"] == "w" and db["k12999"] == "v"
    with booklet.open(str(path)) as book:
        assert _booklet_io.n_buckets(book) == 144_013 and len(book) == 13_400


GROWING_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from ebooklet import _booklet_io
    from ebooklet.local import FileLock, lock_paths
    path = sys.argv[1]

    class Killing:
        '''os for _booklet_io: SIGKILL right after the 2nd pwrite of a growth (the key
        count marked, the records' next-record fields relinked; the header not moved).'''
        calls = 0
        def __getattr__(self, name):
            return getattr(os, name)
        def pwrite(self, fd, data, position):
            written = os.pwrite(fd, data, position)
            self.calls += 1
            if self.calls == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return written

    data = _booklet_io.DataFile(
        path, "c", FileLock(lock_paths(path)[0]), key_serializer="str", value_serializer="str"
    )
    with data.batch():  # as a reader growing the index for the values it caches
        _booklet_io.os = Killing()
        data._grow(101)
    """
)


def test_a_growth_in_another_process_hides_no_edit(tmp_path: Path) -> None:
    """Issue 16: another process that has the copy open grows the index (relinks every
    record, then moves the header to the new array) and is killed in between: the writer
    and a reader that had the copy open read every edit right (a lookup that misses while
    the file is marked "being written" waits for the batch lock, which repairs it); they
    read an edit as missing (KeyError, or IntegrityError "lacks the value")."""
    path = tmp_path / "db"
    items = {f"k{i}": f"v{i}" for i in range(300)}
    with ebooklet.open(None, path, "n", key_serializer="str", value_serializer="str") as db:
        db.update(items)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(ebooklet.__file__).parents[1]), *sys.path]))
    with ebooklet.open(None, path, "w") as writer, ebooklet.open(None, path, "r") as reader:
        assert (writer["k1"], reader["k2"]) == ("v1", "v2")  # checked: read without a check from now on
        child = subprocess.run(
            [sys.executable, "-c", GROWING_CHILD, str(path)], capture_output=True, env=env, timeout=120
        )
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-3000:]
        assert {k: writer[k] for k in items} == items
        assert {k: reader[k] for k in items} == items
