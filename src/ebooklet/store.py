"""The store below the remote database: what ebooklet asks of an object store, typed.

:class:`Store` holds the verbs :mod:`.remote`, :mod:`.lock` and the layers above use:
get (conditional), range and tail gets, put with a :data:`Precondition`, multipart put,
delete, list, and the capabilities of the server behind it. :class:`MaintenanceStore`
adds what only maintenance needs (object versions, bulk delete, server-side copy).
:class:`~ebooklet.connection.S3Connection` implements both. Objects are named by their
*suffix*, the part of the key after the database's ``db_key`` (``""`` is the manifest,
``.ebk/...`` the rest; :func:`.format.check_suffix` says which suffixes exist).

This module holds the protocols and the values that cross them, no I/O.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple, Protocol, TypeAlias, runtime_checkable

from .workers import Workers

PUBLIC_FIELDS = ("bucket", "db_key", "endpoint_url", "db_url", "region")
"""Where a database is, without credentials: :meth:`Store.public_params`, as
``P.ebk.json`` and remote connection group entries record it."""


class NotModified(NamedTuple):
    """Answer to a conditional GET whose object is unchanged."""

    etag: str


class Fetched(NamedTuple):
    """An object's bytes and its ETag."""

    data: bytes
    etag: str


class ObjectVersion(NamedTuple):
    """One entry of :meth:`MaintenanceStore.list_versions`."""

    suffix: str
    version_id: str | None
    size: int
    is_latest: bool
    delete_marker: bool


class Mode(enum.Enum):
    """The unconditional preconditions of a put."""

    CREATE = "create"
    """Write only where no object is (``If-None-Match: *``)."""
    OVERWRITE = "overwrite"
    """Write whatever is there."""


class IfMatch(NamedTuple):
    """Write (or delete) only over the object whose ETag is ``etag`` (``If-Match``).

    An empty ``etag`` (the server named none, or a damaged lock record was read as
    empty) sets no condition: the write overwrites.
    """

    etag: str


Precondition: TypeAlias = Mode | IfMatch
"""What must hold for a put to happen: :attr:`Mode.CREATE`, :attr:`Mode.OVERWRITE` or
:class:`IfMatch`. A server that ignores conditions (:meth:`Store.conditional_writes`
false) writes anyway: there only the write lock keeps writers apart."""


@runtime_checkable
class Store(Protocol):
    """The objects of one database in an object store, and what its server can do.

    Every verb may raise :class:`~ebooklet.errors.OfflineError` (the endpoint cannot be
    reached or did not answer in time), :class:`~ebooklet.errors.AuthError` (access
    denied) and :class:`~ebooklet.errors.RemoteError` (any other failure); the ones
    listed under a verb are those its callers act on.

    Attributes:
        db_key: the key of the database's manifest (``None``: a public URL only).
        db_url: the public URL of the manifest.
        timeout: seconds a request waits for each answer of the server.
        workers: the thread pool parallel transfers run on.
        request_counts: requests sent, by HTTP method.
    """

    db_key: str | None
    db_url: str | None
    timeout: float
    workers: Workers
    request_counts: Counter[str]

    @property
    def writable(self) -> bool:
        """True when the store can write and list (it knows the bucket and key)."""
        ...

    def public_params(self) -> dict[str, Any]:
        """The store's location without credentials: the fields of :data:`PUBLIC_FIELDS`."""
        ...

    def describe(self, suffix: str) -> str:
        """Where the object ``suffix`` is, for messages (never with credentials)."""
        ...

    def get(
        self,
        suffix: str,
        etag: str | None = None,
        max_bytes: int | None = None,
        wait: float | None = None,
    ) -> Fetched | NotModified:
        """An object's bytes and ETag; :class:`NotModified` when its ETag is still ``etag``.

        Args:
            max_bytes: the most bytes accepted (the download stops past it).
            wait: seconds the GET may take, all tries together (``None``: the
                store's timeouts and retries).

        Raises:
            RemoteNotFoundError: no such object (or not public, anonymously), or no
                such bucket (its message names the bucket).
            IntegrityError: the object is larger than ``max_bytes``.
        """
        ...

    def get_range(
        self, suffix: str, start: int, length: int, into: bytearray | None = None
    ) -> bytes | memoryview:
        """The ``length`` bytes of an object from ``start``: new bytes, or a view of the
        first ``length`` bytes of ``into`` (grown as the bytes arrive) when given.

        Raises:
            RemoteNotFoundError: no such object.
            IntegrityError: the object ends before ``start + length``.
            RemoteError: the server ignored the range.
        """
        ...

    def get_tail(self, suffix: str, length: int) -> tuple[bytes, int]:
        """The last ``length`` bytes of an object (fewer if it is smaller) and its size.

        Raises:
            RemoteNotFoundError: no such object.
            RemoteError: the server sent no object size.
            IntegrityError: the server sent more than the object's size.
        """
        ...

    def put(
        self,
        suffix: str,
        data: bytes | memoryview | list[bytes | memoryview],
        *,
        precondition: Precondition = Mode.OVERWRITE,
        content_type: str = "application/octet-stream",
        content_md5: bytes | None = None,
    ) -> str:
        """Write an object if ``precondition`` holds; returns its new ETag.

        ``data`` may be a list of buffers, sent one after the other as one body;
        ``content_md5`` is the body's md5 when the caller has it already.

        Raises:
            PreconditionFailed: the precondition did not hold (412).
        """
        ...

    def put_multipart(self, suffix: str, parts: Iterable[bytes | memoryview]) -> str:
        """Write an object in parts (each at least 5 MiB but the last), in parallel on
        :attr:`workers`; returns its ETag. A failed upload is aborted.

        Raises:
            RemoteError: a part or the completion failed.
        """
        ...

    def delete(self, suffix: str, precondition: IfMatch | None = None) -> None:
        """Delete an object (a missing one is fine), only if ``precondition`` holds.

        Raises:
            PreconditionFailed: the object's ETag is not the one of ``precondition``.
        """
        ...

    def list(self, suffix_prefix: str) -> Iterator[tuple[str, int]]:
        """``(suffix, size)`` of every object whose suffix starts with ``suffix_prefix``.

        Raises:
            RemoteNotFoundError: no such bucket (or, anonymously, listing not allowed).
        """
        ...

    def conditional_writes(self) -> bool:
        """Whether the server honours preconditions, probed once per bucket (a
        throw-away object under ``D.ebk/``) unless already known."""
        ...

    def knows_conditional_writes(self) -> bool:
        """True once :meth:`conditional_writes` can answer without a request."""
        ...

    def probe_conditional_writes(self, suffix: str, data: bytes) -> bool:
        """Learn :meth:`conditional_writes` from an object just created with
        :attr:`Mode.CREATE`: write the same ``data`` the same way again (one request; the
        object is left as it was)."""
        ...

    def remember_conditional_writes(self, honoured: bool) -> None:
        """Record an answer of :meth:`conditional_writes` known from before."""
        ...

    def close(self) -> None:
        """Release the store's connections and :attr:`workers`."""
        ...


@runtime_checkable
class MaintenanceStore(Store, Protocol):
    """A :class:`Store` with the operations only maintenance uses: object versions,
    bulk delete and server-side copy."""

    def list_versions(self, suffix_prefix: str, exact: bool = False) -> Iterator[ObjectVersion]:
        """Every version and delete marker of the objects whose suffix starts with
        ``suffix_prefix`` (an unversioned bucket lists one version ``"null"`` each);
        with ``exact``, of the object ``suffix_prefix`` only.

        Raises:
            RemoteError: the server does not list versions.
        """
        ...

    def delete_version(self, suffix: str, version_id: str | None) -> None:
        """Delete one version of an object for good (``None``: the plain delete)."""
        ...

    def delete_objects(self, items: Iterable[tuple[str, str | None]]) -> int:
        """Delete many ``(suffix, version id or None)`` objects; returns how many.

        Raises:
            RemoteError: some objects could not be deleted (their keys are named).
        """
        ...

    def copy_source(self, suffix: str) -> str:
        """How a server-side copy names the object ``suffix`` of this store as its source.

        Raises:
            ValueError: the store has no bucket and key (a public URL only).
        """
        ...

    def copy_object(
        self,
        source: MaintenanceStore,
        suffix: str,
        size: int,
        target_suffix: str | None = None,
        *,
        max_single: int | None = None,
        part_size: int | None = None,
    ) -> str:
        """Copy ``source``'s object ``suffix`` (``size`` bytes) here as ``target_suffix``
        (default: the same), server-side: both stores on one server, with credentials
        that read the source and write here. Returns the new object's ETag.

        Raises:
            RemoteNotFoundError, AuthError, RemoteError: the copy failed.
        """
        ...
