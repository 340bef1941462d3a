"""The exception hierarchy of ebooklet: every exception and warning it raises on purpose.

Every error is an :class:`EBookletError`; each message says what happened and what
to do about it. Where a builtin means the same, the error subclasses it too, so that
``except FileNotFoundError`` works as a user expects::

    Exception
    ├── EBookletError
    │   ├── ReadOnlyError ·························· also PermissionError
    │   ├── RemoteNotFoundError ···················· also FileNotFoundError
    │   ├── RemoteExistsError ······················ also FileExistsError
    │   ├── ConflictError
    │   │   ├── CommitRetryError
    │   │   └── VacuumConflictError
    │   ├── LockedError
    │   ├── IntegrityError
    │   │   └── CacheDamagedError
    │   ├── FormatVersionError
    │   ├── OfflineError ··························· also ConnectionError
    │   ├── AuthError ······························ also PermissionError
    │   ├── UntrustedEndpointError ················· also PermissionError
    │   ├── RemoteError
    │   │   └── PreconditionFailed ················· internal: a conditional write lost
    │   ├── ScanInterrupted ························ internal; also RuntimeError
    │   ├── SerializationError ····················· also TypeError
    │   │   ├── UntrustedSerializerError
    │   │   └── DecompressionLimitError
    │   └── ShardLimitError ························ also ValueError
    └── Warning
        └── UserWarning
            ├── OfflineWarning
            └── ConsistencyWarning

All of them are exported as ``ebooklet.<Name>`` except those marked internal, which
ebooklet catches itself (``tests/test_exported_members.py`` keeps this true).
"""

from __future__ import annotations

from collections.abc import Iterable


class EBookletError(Exception):
    """Base class of every error ebooklet raises on purpose."""


class ReadOnlyError(EBookletError, PermissionError):
    """A write was attempted on a database opened read-only."""


class RemoteNotFoundError(EBookletError, FileNotFoundError):
    """The remote database (or its bucket) does not exist, or is not public."""


class ConflictError(EBookletError):
    """The same keys were changed locally and remotely since the last sync.

    Attributes:
        keys: the conflicting keys (decoded with the key serializer).
    """

    def __init__(self, keys: Iterable, message: str | None = None):
        self.keys = list(keys)
        shown = ", ".join(repr(k) for k in self.keys[:10])
        more = f" and {len(self.keys) - 10} more" if len(self.keys) > 10 else ""
        super().__init__(
            message
            or f"{len(self.keys)} key(s) changed both locally and remotely: {shown}{more}. "
            "Resolve with changes().push(keys, force=True) to keep the local values, "
            "or changes().pull(keys, force=True) / discard(keys) to keep the remote ones."
        )

    def __reduce__(self) -> tuple:
        return _rebuilt, (type(self), self.args, self.__dict__)


class LockedError(EBookletError):
    """Another writer holds the remote write lock.

    Attributes:
        owner: the lock record (host, pid, owner id, created, expires).
    """

    def __init__(self, owner: dict, message: str):
        self.owner = owner
        super().__init__(message)

    def __reduce__(self) -> tuple:
        return _rebuilt, (type(self), self.args, self.__dict__)


class IntegrityError(EBookletError):
    """A remote or local object is corrupt, truncated, or not ebooklet's."""


class FormatVersionError(EBookletError):
    """A file or object was written by a newer (or unknown) format version."""


class OfflineError(EBookletError, ConnectionError):
    """The remote cannot be reached and the operation needs it."""


class AuthError(EBookletError, PermissionError):
    """The remote refused our credentials or permissions (HTTP 401/403)."""


class RemoteError(EBookletError):
    """The remote answered with an unexpected error."""


class SerializationError(EBookletError, TypeError):
    """A key or value could not be encoded or decoded by its serializer."""


class OfflineWarning(UserWarning):
    """The remote could not be reached; the database works from local files."""


class ConsistencyWarning(UserWarning):
    """The remote server does not honour conditional writes; only the lock protects pushes."""


class RemoteExistsError(EBookletError, FileExistsError):
    """The target of a copy already holds a database (pass ``overwrite=True`` to replace it)."""


class UntrustedSerializerError(SerializationError):
    """A remote database names a serializer that can run code or decompress, and the
    caller did not allow it (pass the same serializer to ``open``, or ``trust_serializers``).

    Attributes:
        serializer: the serializer's name, as the remote records it.
        field: ``"key_serializer"`` or ``"value_serializer"``.
    """

    def __init__(self, serializer: str, field: str, message: str):
        self.serializer = serializer
        self.field = field
        super().__init__(message)

    def __reduce__(self) -> tuple:
        return _rebuilt, (type(self), self.args, self.__dict__)


class DecompressionLimitError(SerializationError):
    """A compressed value inflates past ``ebooklet.serializers.INFLATE_LIMIT`` bytes."""


class UntrustedEndpointError(EBookletError, PermissionError):
    """Credentials would be sent to an endpoint that the caller did not choose."""


class ShardLimitError(EBookletError, ValueError):
    """An index shard a push would write is larger than readers accept (keys too long)."""


class CacheDamagedError(IntegrityError):
    """A local cache file (``P.remote_index``) is damaged and the remote, which is not at
    fault, could not be reached to fetch its content again."""


class PreconditionFailed(RemoteError):
    """A conditional write lost: the object changed (or appeared) meanwhile (HTTP 412).
    Internal: the commit and the lock catch it and retry or report their own error."""


class ScanInterrupted(EBookletError, RuntimeError):
    """The data file was written to while it was being scanned (booklet's own scan
    raises a ``RuntimeError`` then, hence the base). Internal: the readers catch it and
    finish key by key."""


class CommitRetryError(ConflictError):
    """A push gave up: each of its tries lost its commit to another writer's.

    A ``ConflictError`` with no keys (no key conflicts; the same remedy: push again), so
    that ``except ConflictError`` catches it as before.

    Attributes:
        attempts: how many commits were tried.
    """

    def __init__(self, attempts: int):
        self.attempts = attempts
        super().__init__(
            [],
            f"push() gave up after {attempts} tries: each time another writer committed "
            "between this push reading the remote and committing (a writer that ignores the "
            "write lock, or a lock broken by hand). Nothing was committed and the edits stay "
            "pending: push again once the other writer is done.",
        )


class VacuumConflictError(ConflictError):
    """A vacuum that rewrote packs lost its commit: another writer committed while it held
    the write lock (a writer that ignores the lock, or a lock broken by hand).

    A ``ConflictError`` with no keys (nothing conflicts key by key; the remedy is to run
    vacuum again), so that ``except ConflictError`` catches it as before.
    """

    def __init__(self) -> None:
        super().__init__(
            [],
            "Another writer committed while vacuum held the lock (a server without "
            "conditional writes, or a lock broken by hand); nothing was deleted. Run vacuum "
            "again: the packs and index shards this one wrote are referenced by no commit, "
            "and the next vacuum deletes them.",
        )


def _rebuilt(cls: type[BaseException], args: tuple, state: dict) -> BaseException:
    """An error of ``cls`` with ``args`` and attributes ``state``, made without its
    ``__init__`` (whose parameters differ from ``args``): how errors with attributes
    cross a pickle (a process pool's or a Dask worker's error reaching the caller)."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error
