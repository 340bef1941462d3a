"""The top-level functions of ebooklet: ``open``, ``open_rcg``, ``check``, ``break_lock``.

Each checks its arguments, picks the class or module that does the work, and calls it.
This module sits above every class; nothing in the package imports it but
``__init__.py``.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any, Literal, overload

import booklet

from . import lock, maintenance, serializers
from .connection import S3Connection, connection_from
from .ebooklet import EBooklet
from .errors import EBookletError
from .local import in_use, local_paths, lock_paths
from .maintenance import CheckResult, check_commit_arg
from .rcg import GROUP_KEY_SERIALIZER, GROUP_SERIALIZER, RemoteConnGroup
from .replica import Replica


@overload
def open(
    remote: S3Connection | str | None,
    file_path: str | os.PathLike,
    flag: str = "r",
    value_serializer: Any = serializers.UNSET,
    key_serializer: Any = serializers.UNSET,
    n_buckets: int = 12007,
    buffer_size: int = 2**22,
    lock_timeout: float = 0.0,
    timeout: float | None = None,
    commit: int | str | None = None,
    remote_conn_group: Literal[False] = False,
    trust_serializers: bool | str | Collection[str] = False,
    remote_timeout: float | None = None,
    lock: str = "open",
) -> EBooklet: ...


@overload
def open(
    remote: S3Connection | str | None,
    file_path: str | os.PathLike,
    flag: str = "r",
    value_serializer: Any = serializers.UNSET,
    key_serializer: Any = serializers.UNSET,
    n_buckets: int = 12007,
    buffer_size: int = 2**22,
    lock_timeout: float = 0.0,
    timeout: float | None = None,
    commit: int | str | None = None,
    *,
    remote_conn_group: Literal[True],
    trust_serializers: bool | str | Collection[str] = False,
    remote_timeout: float | None = None,
    lock: str = "open",
) -> RemoteConnGroup: ...


@overload
def open(
    remote: S3Connection | str | None,
    file_path: str | os.PathLike,
    flag: str = "r",
    value_serializer: Any = serializers.UNSET,
    key_serializer: Any = serializers.UNSET,
    n_buckets: int = 12007,
    buffer_size: int = 2**22,
    lock_timeout: float = 0.0,
    timeout: float | None = None,
    commit: int | str | None = None,
    remote_conn_group: bool = False,
    trust_serializers: bool | str | Collection[str] = False,
    remote_timeout: float | None = None,
    lock: str = "open",
) -> EBooklet | RemoteConnGroup: ...


def open(
    remote: S3Connection | str | None,
    file_path: str | os.PathLike,
    flag: str = "r",
    value_serializer: Any = serializers.UNSET,
    key_serializer: Any = serializers.UNSET,
    n_buckets: int = 12007,
    buffer_size: int = 2**22,
    lock_timeout: float = 0.0,
    timeout: float | None = None,
    commit: int | str | None = None,
    remote_conn_group: bool = False,
    trust_serializers: bool | str | Collection[str] = False,
    remote_timeout: float | None = None,
    lock: str = "open",
) -> EBooklet | RemoteConnGroup:
    """Open a database kept in ``file_path`` and synced with ``remote``.

    Args:
        remote: an :class:`S3Connection`, a public URL string (read-only), or
            ``None`` to work locally only.
        file_path: the local booklet file; ``.local_hash``, ``.remote_index``
            and ``.ebk.json`` files are kept beside it.
        flag: ``'r'`` read-only, ``'w'`` read-write existing, ``'c'`` create if
            missing, ``'n'`` new and empty (the next push replaces the remote).
        value_serializer: a booklet serializer name or a class with
            ``dumps``/``loads``. A new database records it (default ``None``: bytes
            values). An existing database uses the one it records: leave it out, or
            pass the same one (anything else raises ``SerializationError``). Passing
            one also allows it when it can run code or inflate (``pickle``,
            ``*zstd``...): see ``trust_serializers``.
        key_serializer: the same for keys (default ``"str"``).
        n_buckets: booklet's initial index size for the local file.
        buffer_size: booklet's write buffer of the local file, in bytes.
        lock_timeout: seconds to wait for another writer's remote lock.
        timeout: seconds to wait for another process's local file lock
            (``None``: wait). It is not about the remote: see ``remote_timeout``.
        commit: open that past commit (a seq, or a commit id) as a read-only
            snapshot (flag ``'r'`` only); see :meth:`EBooklet.history`.
        remote_conn_group: open a remote connection group
            (:class:`ebooklet.rcg.RemoteConnGroup`) instead of a plain database.
        trust_serializers: which serializers the remote may choose beyond the safe
            ones (bytes, str, json, orjson, msgpack, integers): ``True`` for any, or
            a name or collection of names such as ``{"pickle"}``. Without it, a
            remote recording ``pickle`` or a ``*zstd`` serializer that was not passed
            raises ``UntrustedSerializerError``. The choice is remembered in
            ``P.ebk.json`` for this remote. See docs/security.md.
        remote_timeout: seconds to wait for the remote. The open waits at most this
            long for the manifest, all tries together, then works offline from the
            local files (``OfflineWarning``; ``OfflineError`` when there are none).
            Default :data:`ebooklet.ebooklet.OPEN_WAIT` (5 s, or the connection's ``timeout`` when
            shorter): an endpoint that accepts connections and never answers costs
            the open 5.0 s (measured 5.01-5.02 s; 121.3 s before this bound). With a URL
            string it is also the ``timeout`` of the :class:`S3Connection` made for
            it (each later request's read timeout; default 30 s); an
            :class:`S3Connection` keeps its own ``timeout`` and ``connect_timeout``.
        lock: how long a writer holds the remote write lock. ``"open"`` (the default):
            from open to close, so no other writer can open the database meanwhile.
            ``"push"``: only while a push (or vacuum, or ``delete_remote``) runs, waiting
            at most ``lock_timeout`` for it; several writers can keep the database open
            at once, and an edit of a key that another writer pushed meanwhile is caught
            at push by the three-way check and the conditional commit
            (``ConflictError``). See docs/design-notes.md.

    Raises:
        ValueError, TypeError: bad arguments (``lock`` not ``"open"`` or ``"push"``...).
        ReadOnlyError: a write flag with a public URL, or with local files that
            cannot be written (flag ``'r'`` reads them); flag ``'r'`` with no data
            file where none can be created.
        OfflineError: the remote cannot be reached and there is no local copy.
        RemoteNotFoundError: flag ``'r'``/``'w'`` and no database anywhere.
        LockedError: another writer holds the remote lock (``lock="open"`` only).
        IntegrityError, FormatVersionError: damaged or too new files.
        UntrustedSerializerError: the remote records a serializer that can run code
            or inflate, and the caller did not allow it.
        SerializationError: a serializer passed differs from the one recorded.
    """
    if commit is not None:
        check_commit_arg(commit)
        if flag != "r":
            raise ValueError(f"A past commit opens read-only: use flag 'r' with commit=, not {flag!r}.")
    if remote_conn_group:
        if value_serializer not in (serializers.UNSET, GROUP_SERIALIZER):
            raise ValueError(f"A remote connection group stores {GROUP_SERIALIZER!r} values; drop value_serializer.")
        if key_serializer not in (serializers.UNSET, GROUP_KEY_SERIALIZER):
            raise ValueError(f"A remote connection group has {GROUP_KEY_SERIALIZER!r} keys; drop key_serializer.")
        # Passed explicitly: a group whose manifest records anything else is refused.
        value_serializer, key_serializer = GROUP_SERIALIZER, GROUP_KEY_SERIALIZER
    replica = Replica(
        remote, file_path, flag, value_serializer, key_serializer, n_buckets, buffer_size,
        lock_timeout, timeout, trust_serializers, remote_timeout,
        pin=None if commit is None else lambda opened: maintenance.pin_commit(opened, commit),
        lock=lock,
    )
    db = EBooklet(replica)
    return RemoteConnGroup(db) if remote_conn_group else db


def open_rcg(
    remote: S3Connection | str | None, file_path: str | os.PathLike, flag: str = "r", **kw: Any
) -> RemoteConnGroup:
    """Open a remote connection group: ``open(..., remote_conn_group=True)``."""
    return open(remote, file_path, flag, remote_conn_group=True, **kw)


def check(remote: S3Connection | str, sample: int | float | None = None, seed: int | None = None) -> CheckResult:
    """Verify a remote database without changing anything.

    Checks that the manifest, its commit record, every index shard and every
    pack it references exist and are intact, and that the values match their
    md5 (all of them, or a random ``sample``: a count, or a fraction in (0, 1]).
    With a writable connection it also walks the whole history and lists
    orphans: objects no commit references (left by interrupted pushes).

    Args:
        remote: an :class:`S3Connection` or a public URL.
        sample: ``None`` checks every value.
        seed: seeds the sample, for repeatable checks.

    Raises:
        RemoteNotFoundError: there is no database at ``remote``.
    """
    conn = connection_from(remote)
    if conn is None:
        raise TypeError("check needs an S3Connection or a public URL.")
    return maintenance.check_remote(conn, sample, seed)


def break_lock(conn: S3Connection) -> dict | None:
    """Delete the write lock of ``conn``'s database by hand; returns the broken record.

    Raises:
        ValueError: ``conn`` cannot write (a public URL).
    """
    if not conn.writable:
        raise ValueError("break_lock needs a writable S3Connection (bucket, db_key, credentials).")
    return lock.break_lock(conn)


def delete_local(file_path: str | os.PathLike, force: bool = False) -> list[str]:
    """Delete the local files of a database: ``file_path`` and the ``.local_hash``,
    ``.remote_index`` and ``.ebk.json`` files beside it (and its empty lock files
    ``.ebk.lock`` and ``.ebk.writer``, not listed in the result). The remote is not touched:
    what was pushed stays there, and opening the path again downloads it afresh.

    Args:
        file_path: the path given to :func:`open`.
        force: delete even when the files hold unpushed edits (they are lost).

    Returns the paths deleted (none when there were no files).

    Raises:
        EBookletError: the files hold unpushed edits and ``force`` is false, or
            another process has the database open.
    """
    paths = local_paths(file_path)
    if not any(p.exists() for p in paths):
        return []
    busy = EBookletError(f"{file_path} is open in another process; close it there, then delete it.")
    if in_use(file_path):
        raise busy
    try:
        with open(None, file_path, "r", timeout=0) as db:
            pending = sum(1 for c in db.changes().iter_changes())
    except booklet.LockTimeoutError:
        raise busy from None
    if pending and not force:
        raise EBookletError(
            f"{file_path} holds {pending} unpushed edit(s); push them first, or pass "
            "force=True to lose them."
        )
    deleted = []
    for path in paths:
        if path.exists():
            path.unlink()
            deleted.append(str(path))
    for lock_file in lock_paths(file_path):  # empty files, not listed (docs/processes.md)
        lock_file.unlink(missing_ok=True)
    return deleted
