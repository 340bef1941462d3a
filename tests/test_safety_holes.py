"""Issue 10, points 7-9: holes through which edits were lost, waits had no bound, or
errors misled.

- ``delete_remote()`` leaves a usable local-only database whose next push recreates
  the remote (its values used to vanish on every reopen);
- ``push(keys=...)`` after flag ``'n'`` works when the remote holds nothing;
- an endpoint that accepts connections and never answers costs ``open()`` a few
  seconds (``OPEN_WAIT``, or ``remote_timeout``), not 121 s; connections are made
  within ``connect_timeout``;
- flag ``'r'`` works on local files that cannot be written (a read-only tmpfs mount);
- ``vars(conn)`` never holds the secret key;
- error messages about key types and public URLs say what the user can do.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ebooklet
from ebooklet import (
    OfflineError,
    OfflineWarning,
    ReadOnlyError,
    RemoteNotFoundError,
    S3Connection,
    SerializationError,
)
from ebooklet.ebooklet import OPEN_WAIT
from ebooklet.local import local_paths

VALUES = {"a": "A", "b": "B", "c": "C"}


def make_remote(conn: Any, path: Path, values: dict[str, str] = VALUES, metadata: Any = None) -> None:
    """A remote database holding ``values`` (str serializer) and ``metadata``."""
    with ebooklet.open(conn, path, "n", value_serializer="str") as db:
        db.update(values)
        if metadata is not None:
            db.set_metadata(metadata)
        assert db.changes().push().committed


def read_all(remote: Any, path: Path) -> tuple[dict[str, str], Any]:
    """Everything a fresh copy of ``remote`` reads: its values and metadata."""
    with ebooklet.open(remote, path, "r") as db:
        return dict(db.items()), db.get_metadata()


# --------------------------------------------------------------------------- delete_remote


def test_after_delete_remote_every_reopen_reads_the_values(conn: Any, tmp_path: Path) -> None:
    """The values cached or edited locally stay readable: in the same object, after a
    reopen without remote, and after a reopen with the connection (which finds no
    remote); they are local edits ("added"), ready to recreate the remote."""
    make_remote(conn, tmp_path / "w.blt")
    path = tmp_path / "copy.blt"
    with ebooklet.open(conn, path, "w") as db:
        db.load_items()
        db["d"] = "D"
        db.delete_remote()
        assert dict(db.items()) == {**VALUES, "d": "D"}
    with ebooklet.open(None, path, "r") as db:
        assert dict(db.items()) == {**VALUES, "d": "D"} and len(db) == 4
    with ebooklet.open(conn, path, "w") as db:
        assert not db.offline and db["a"] == "A" and len(db) == 4
        changes = {c.key: c.kind for c in db.changes().iter_changes()}
        assert changes == dict.fromkeys([*VALUES, "d"], "added")


def test_the_next_push_after_delete_remote_recreates_the_remote(
    conn: Any, reader: Any, tmp_path: Path
) -> None:
    """What the local copy showed (edits, values of the newest commit, the metadata)
    is what the recreated remote holds; a local deletion and values never cached are
    gone with the old remote."""
    make_remote(conn, tmp_path / "w.blt", {**VALUES, "never_read": "N"}, metadata={"v": 1})
    path = tmp_path / "copy.blt"
    with ebooklet.open(conn, path, "w") as db:
        assert db["a"] == "A" and db["b"] == "B" and db["c"] == "C"
        db["b"] = "B2"
        del db["c"]
        db["new"] = "NEW"
        result = db.delete_remote()
        assert result.objects > 0 and db.remote is None
    with pytest.raises(RemoteNotFoundError):
        ebooklet.open(reader(conn), tmp_path / "gone.blt", "r")
    with ebooklet.open(conn, path, "w") as db:
        pushed = db.changes().push()
        assert pushed.committed and pushed.keys_pushed == 3
        assert list(db.changes().iter_changes()) == []
    expected = {"a": "A", "b": "B2", "new": "NEW"}
    assert read_all(reader(conn), tmp_path / "fresh.blt") == (expected, {"v": 1})


def test_delete_remote_drops_a_cached_copy_of_an_older_version(
    conn: Any, make_conn: Callable[..., Any], tmp_path: Path
) -> None:
    """A value cached before another writer changed it is not the key's value: it is
    not kept as an edit (nor resurrected after the other writer deleted the key)."""
    make_remote(conn, tmp_path / "w.blt")
    path = tmp_path / "copy.blt"
    with ebooklet.open(conn, path, "r") as db:
        db.load_items()
    with ebooklet.open(make_conn(), tmp_path / "w.blt", "w") as other:
        other["a"] = "A2"
        del other["b"]
        other.changes().push()
    with ebooklet.open(conn, path, "r") as db:
        db.delete_remote()
    with ebooklet.open(None, path, "r") as db:
        assert dict(db.items()) == {"c": "C"}


# --------------------------------------------------------------------------- 'n' + push(keys)


def test_push_some_keys_of_a_new_database_when_no_remote_exists(
    conn: Any, reader: Any, tmp_path: Path
) -> None:
    path = tmp_path / "new.blt"
    with ebooklet.open(conn, path, "n", value_serializer="str") as db:
        db.update(VALUES)
        first = db.changes().push(keys=["a"])
        assert first.committed and first.keys_pushed == 1
        assert {c.key for c in db.changes().iter_changes()} == {"b", "c"}
        assert dict(db.items()) == VALUES
    assert read_all(reader(conn), tmp_path / "r1.blt")[0] == {"a": "A"}
    with ebooklet.open(conn, path, "w") as db:
        assert db.changes().push().keys_pushed == 2
    assert read_all(reader(conn), tmp_path / "r2.blt")[0] == VALUES


def test_push_some_keys_replacing_a_remote_that_holds_keys_is_refused(
    conn: Any, reader: Any, tmp_path: Path
) -> None:
    """That would delete the remote's other keys while some edits stay unpushed: the
    error says to push all keys, and nothing is committed."""
    make_remote(conn, tmp_path / "w.blt")
    with ebooklet.open(conn, tmp_path / "new.blt", "n", value_serializer="str") as db:
        db["x"] = "X"
        db["y"] = "Y"
        with pytest.raises(ValueError, match="holds 3 key") as info:
            db.changes().push(keys=["x"])
        assert "changes().push()" in str(info.value)
    assert read_all(reader(conn), tmp_path / "r.blt")[0] == VALUES


# --------------------------------------------------------------------------- bounded waits


@contextlib.contextmanager
def silent_endpoint(backlog: int = 64, accept: bool = True) -> Iterator[str]:
    """``http://127.0.0.1:<port>``: a loopback socket that accepts connections (or, with
    ``accept=False`` and its one-connection backlog filled, lets new ones hang) and
    never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(backlog)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_all() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept_all, daemon=True)
    if accept:
        thread.start()
    else:  # fill the accept queue: the kernel drops further connection attempts
        for _ in range(backlog + 1):
            client = socket.socket()
            client.settimeout(0.5)
            with contextlib.suppress(OSError):
                client.connect(server.getsockname())
            held.append(client)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        server.close()
        for sock in held:
            sock.close()


def local_copy(path: Path) -> None:
    """A local-only database at ``path`` holding ``VALUES``."""
    with ebooklet.open(None, path, "c", value_serializer="str") as db:
        db.update(VALUES)


def timed_open(remote: Any, path: Path, **kw: Any) -> tuple[Any, float, list]:
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        db = ebooklet.open(remote, path, "r", **kw)
    return db, time.monotonic() - start, [w.category for w in caught]


@pytest.mark.parametrize("form", ["connection", "url"])
def test_a_silent_endpoint_costs_the_open_a_few_seconds(form: str, tmp_path: Path) -> None:
    """The open falls back to offline (OfflineWarning, values read from the local
    files) after OPEN_WAIT seconds (it took 121 s: 30 s x 4 tries)."""
    path = tmp_path / "copy.blt"
    local_copy(path)
    with silent_endpoint() as endpoint:
        remote = (
            S3Connection("id", "secret", "db", "bucket", endpoint_url=endpoint)
            if form == "connection" else f"{endpoint}/bucket/db"
        )
        db, took, caught = timed_open(remote, path)
        with db:
            assert OPEN_WAIT - 0.5 < took < OPEN_WAIT + 2
            assert db.offline and OfflineWarning in caught
            assert dict(db.items()) == VALUES


@pytest.mark.parametrize("form", ["connection", "url"])
def test_remote_timeout_bounds_the_open(form: str, tmp_path: Path) -> None:
    """``remote_timeout`` sets the bound of both forms; with a URL string it is also
    the timeout of the connection made for it. No local copy: OfflineError in time."""
    with silent_endpoint() as endpoint:
        conn = S3Connection("id", "secret", "db", "bucket", endpoint_url=endpoint)
        remote = conn if form == "connection" else f"{endpoint}/bucket/db"
        path = tmp_path / "copy.blt"
        local_copy(path)
        db, took, _ = timed_open(remote, path, remote_timeout=1.0)
        with db:
            assert 0.9 < took < 3 and db.offline and db["a"] == "A"
            assert db.remote.timeout == (30.0 if form == "connection" else 1.0)
        start = time.monotonic()
        with warnings.catch_warnings(record=True) as caught, pytest.raises(
            OfflineError, match="no local copy"
        ):
            warnings.simplefilter("always")
            ebooklet.open(remote, tmp_path / "none.blt", "r", remote_timeout=1.0)
        assert time.monotonic() - start < 3
        assert caught == []  # no "working offline" warning before the error


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "5", True])
def test_remote_timeout_must_be_positive_seconds(bad: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="remote_timeout"):
        ebooklet.open(None, tmp_path / "x.blt", "c", remote_timeout=bad)


def test_connect_timeout_is_distinct_from_the_read_timeout() -> None:
    """An endpoint that does not take connections fails each try after
    ``connect_timeout``, whatever the (long) read timeout."""
    with silent_endpoint(backlog=0, accept=False) as endpoint:
        conn = S3Connection(
            db_url=f"{endpoint}/bucket/db", timeout=60.0, connect_timeout=0.5, retries=1
        )
        assert (conn.connect_timeout, conn.timeout) == (0.5, 60.0)
        assert conn.copy().connect_timeout == 0.5
        start = time.monotonic()
        with pytest.raises(OfflineError):
            conn.get("")
        assert time.monotonic() - start < 3  # two tries of 0.5 s and a pause
    for bad in (0, -1, float("inf"), "3"):
        with pytest.raises(ValueError, match="connect_timeout"):
            S3Connection(db_url="http://127.0.0.1:1/b/db", connect_timeout=bad)


# --------------------------------------------------------------------------- read-only files


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Callable[[], Path]]:
    """A tmpfs mounted at ``tmp_path / "mnt"``; calling the fixture's value remounts it
    read-only and returns it (as root, chmod blocks no write). Skips where mounting
    is not allowed."""
    folder = tmp_path / "mnt"
    folder.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a read-only file system")
    done = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")

    def make_read_only() -> Path:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        return folder

    try:
        yield make_read_only
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_flag_r_reads_from_a_read_only_file_system(
    conn: Any, reader: Any, read_only_dir: Callable[[], Path], tmp_path: Path
) -> None:
    """Cached values come from the local files; others (even of a commit made since)
    are fetched and returned without being cached; nothing is written."""
    make_remote(conn, tmp_path / "w.blt")
    remote = reader(conn)
    with ebooklet.open(remote, tmp_path / "mnt" / "copy.blt", "r") as db:
        assert db["a"] == "A"
    with ebooklet.open(conn, tmp_path / "w.blt", "w") as db:
        db["d"] = "D"
        db.changes().push()
    path = read_only_dir() / "copy.blt"
    before = {p: p.read_bytes() for p in local_paths(path)}
    for _ in range(2):
        with ebooklet.open(remote, path, "r") as db:
            assert db["a"] == "A" and db["b"] == "B" and db.get("d") == "D"
            assert dict(db.items()) == {**VALUES, "d": "D"} and len(db) == 4
            assert dict(db.get_items(["c", "zz"])) == {"c": "C", "zz": None}
            with pytest.raises(ReadOnlyError, match="cannot be written"):
                db.load_items()
            with pytest.raises(ReadOnlyError, match="cannot be written"):
                db.pull()
    assert {p: p.read_bytes() for p in local_paths(path)} == before


def test_read_only_file_system_refuses_writes_and_missing_files(
    conn: Any, read_only_dir: Callable[[], Path], tmp_path: Path
) -> None:
    make_remote(conn, tmp_path / "w.blt")
    with ebooklet.open(conn, tmp_path / "mnt" / "copy.blt", "r") as db:
        assert db["a"] == "A"
    folder = read_only_dir()
    with pytest.raises(ReadOnlyError, match="flag 'r'"):
        ebooklet.open(conn, folder / "copy.blt", "w")
    with ebooklet.open(conn, folder / "copy.blt", "r") as db, pytest.raises(
        ReadOnlyError, match="local files cannot be written"
    ) as info:
        db["a"] = "x"
    assert "reopen with 'w'" not in str(info.value)
    with pytest.raises(ReadOnlyError, match="does not exist and cannot be created"):
        ebooklet.open(conn, folder / "other.blt", "r")


# --------------------------------------------------------------------------- secrets


def strings_in(obj: Any, depth: int = 0) -> Iterator[str | bytes]:
    """Every str and bytes in ``obj``, through dicts, lists, tuples and sets."""
    if depth > 20:
        return
    if isinstance(obj, (str, bytes, bytearray)):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from strings_in(key, depth + 1)
            yield from strings_in(value, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            yield from strings_in(item, depth + 1)


def test_no_attribute_of_a_connection_holds_the_secret(
    s3_server: Any, make_conn: Callable[..., Any], tmp_path: Path
) -> None:
    conn = make_conn()
    make_remote(conn, tmp_path / "w.blt")
    with ebooklet.open(conn, tmp_path / "copy.blt", "r") as db:
        assert db["a"] == "A"
    secret = s3_server.access_key
    found = [
        s for s in strings_in(vars(conn))
        if secret in (s if isinstance(s, str) else s.decode("latin-1"))
    ]
    assert found == []
    assert secret not in repr(conn) and secret not in repr(vars(conn))


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    ("key_serializer", "key", "kind"),
    [("str", 1, "str"), (None, "k", "bytes"), ("uint4", "k", "int"), ("str", b"k", "str")],
)
def test_a_key_of_the_wrong_type_says_what_keys_must_be(
    key_serializer: Any, key: Any, kind: str, tmp_path: Path
) -> None:
    with ebooklet.open(None, tmp_path / "k.blt", "n", key_serializer=key_serializer) as db:
        for use in (lambda: db.__setitem__(key, b"v"), lambda: db.get(key), lambda: key in db):
            with pytest.raises(SerializationError) as info:
                use()
            message = str(info.value)
            assert f"keys of this database are {kind} (key serializer {key_serializer!r})" in message
            assert "key_serializer=" in message and type(key).__name__ in message
            assert "has no attribute" not in message and "object" not in message


def public_reader(conn: Any, public_url: str, tmp_path: Path) -> Any:
    make_remote(conn, tmp_path / "w.blt")
    return ebooklet.open(public_url, tmp_path / "pub.blt", "r")


PUBLIC_URL_WRITES = {
    "set": lambda db: db.__setitem__("a", "x"),
    "delete": lambda db: db.__delitem__("a"),
    "push": lambda db: db.changes().push(),
    "discard": lambda db: db.changes().discard(),
    "delete_remote": lambda db: db.delete_remote(),
    "vacuum": lambda db: db.vacuum(),
}


@pytest.mark.parametrize("operation", list(PUBLIC_URL_WRITES))
def test_a_public_url_reader_is_advised_credentials_not_another_flag(
    operation: str, conn: Any, public_url: str, tmp_path: Path
) -> None:
    with public_reader(conn, public_url, tmp_path) as db, pytest.raises(ReadOnlyError) as info:
        PUBLIC_URL_WRITES[operation](db)
    message = str(info.value)
    assert "S3Connection with credentials" in message and "public URL" in message
    assert "reopen with 'w'" not in message


def test_a_missing_public_url_is_not_advised_flag_c(public_url: str, tmp_path: Path) -> None:
    with pytest.raises(RemoteNotFoundError) as info:
        ebooklet.open(public_url, tmp_path / "x.blt", "r")
    message = str(info.value)
    assert "check the URL" in message and "S3Connection with credentials" in message
    assert "use flag 'c'" not in message


def test_a_missing_database_by_connection_is_still_advised_flag_c(conn: Any, tmp_path: Path) -> None:
    with pytest.raises(RemoteNotFoundError, match="use flag 'c'"):
        ebooklet.open(conn, tmp_path / "x.blt", "r")
