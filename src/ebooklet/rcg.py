"""Remote connection groups: a database whose entries are other databases.

A group is an ordinary ebooklet database (it pushes, pulls and has history
like any other) whose keys are database uuids and whose values describe where
each database lives and what its manifest said when it was added:

.. code-block:: python

    {
        "uuid": "5f0c...", "bucket": "data", "db_key": "weather/db",
        "endpoint_url": "https://...", "db_url": "https://.../weather/db",
        "region": "auto",
        "n_keys": 1200, "n_bytes": 3456789, "seq": 7, "commit_id": "…",
        "last_commit": 1730000000000000,            # µs since the epoch
        "metadata": {...},                          # the database's user metadata
        "key_serializer": "str", "value_serializer": "pickle",
        "added": 1730000000000000,
    }

Entries never hold credentials: only :meth:`S3Connection.public_params`.
Open one with ``ebooklet.open(conn, path, flag, remote_conn_group=True)`` or
``ebooklet.open_rcg``; fill it with :meth:`RemoteConnGroup.add`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from . import format as fmt
from .connection import S3Connection, connection_from
from .errors import EBookletError, IntegrityError, RemoteNotFoundError, UntrustedEndpointError
from .store import PUBLIC_FIELDS, Fetched

if TYPE_CHECKING:
    from .ebooklet import EBooklet

GROUP_SERIALIZER = "orjson"
"""The value serializer of every group."""
GROUP_KEY_SERIALIZER = "str"
"""The key serializer of every group (keys are database uuids)."""
GROUP_TAG = "remote_conn_group"
"""The group's user metadata holds ``{"ebooklet": GROUP_TAG, "version": 1}``."""
URL_FIELDS = ("endpoint_url", "db_url")
"""Connection fields that are URLs: ``http://`` or ``https://`` when not null."""
FIELD_MAX = 4096
"""Longest string a connection field of an entry may hold."""


class RemoteConnGroup(MutableMapping):
    """A group of remote databases, keyed by database uuid.

    Reading works like a dict (``group[uuid]``, ``in``, ``len``, iteration,
    ``items()``); entries are added with :meth:`add`, which reads the
    database's manifest, and removed with ``del group[uuid]``. ``group[uuid] = x``
    and ``set`` are refused: an entry always comes from a real manifest.
    ``changes()``, ``pull()``, ``history()``, ``close()`` and the context manager
    work as on any database.
    """

    def __init__(self, db: EBooklet):
        self._db = db
        try:
            metadata = db.get_metadata()
            if isinstance(metadata, dict) and metadata.get("ebooklet") == GROUP_TAG:
                return
            if metadata is None and len(db) == 0:
                if db.writable:
                    db.set_metadata({"ebooklet": GROUP_TAG, "version": 1})
                return
            raise EBookletError(
                f"{db.path} is a database, not a remote connection group; open it with "
                "ebooklet.open() (without remote_conn_group), or use another path."
            )
        except BaseException:
            db.close()
            raise

    # ------------------------------------------------------------ filling

    def add(self, remote: S3Connection | str) -> str:
        """Add (or refresh) the database at ``remote``; returns its uuid.

        ``remote`` is an :class:`S3Connection` or a public URL. Its manifest is
        read (one GET); only its location without credentials and what the
        manifest says are stored.

        Raises:
            RemoteNotFoundError: there is no database at ``remote``.
        """
        conn = connection_from(remote)
        if conn is None:
            raise TypeError("add() needs an S3Connection or a public URL of a database.")
        try:
            answer = conn.get("", max_bytes=fmt.MAX_MANIFEST_BYTES)
        except RemoteNotFoundError as exc:
            raise RemoteNotFoundError(f"Cannot add {conn!r} to the group: {exc}") from None
        assert isinstance(answer, Fetched)
        manifest = fmt.decode_manifest(answer.data, f"manifest of {conn!r}")
        entry: dict[str, Any] = dict(conn.public_params())
        entry.update(
            uuid=manifest["uuid"],
            n_keys=manifest["n_keys"],
            n_bytes=manifest["n_bytes"],
            seq=manifest["seq"],
            commit_id=manifest["commit_id"],
            last_commit=manifest["timestamp"],
            metadata=manifest.get("metadata"),
            key_serializer=manifest.get("key_serializer"),
            value_serializer=manifest.get("value_serializer"),
            added=int(time.time() * 1_000_000),
        )
        self._db.set(manifest["uuid"], entry)
        return manifest["uuid"]

    def set(self, key: Any, value: Any, timestamp: Any = None) -> None:
        """Refused: entries come from :meth:`add`, which reads the database's manifest."""
        raise TypeError(
            "A remote connection group is filled with group.add(conn), which reads the "
            "database's manifest; set() and group[uuid] = ... are not supported."
        )

    def __setitem__(self, key: Any, value: Any) -> None:
        self.set(key, value)

    def connection(self, uuid: str, access_key_id: str | None = None, access_key: str | None = None, **kw: Any) -> S3Connection:
        """An :class:`S3Connection` to member ``uuid``.

        Without credentials (and without ``kw``), when the entry has a public ``db_url``,
        it is the anonymous read-only connection. Otherwise the connection signs its
        requests (with the keys given, or boto3's credential chain), and an entry, which
        whoever can write the group chose, must not choose where those credentials go:
        the member's bucket must be the group's own (that of its signed connection)
        unless the caller passes ``bucket=``, and its endpoint and region (which picks the
        host on AWS) must be the group's own unless the caller passes ``endpoint_url=``
        (and ``region=`` if it differs); what the caller passes replaces the entry's.

        Raises:
            KeyError: no member ``uuid``.
            IntegrityError: the entry is malformed (:func:`check_entry`).
            ValueError: the member was added by public URL (it can only be read so).
            UntrustedEndpointError: credentials would go to an endpoint, bucket or region
                the caller did not choose.
        """
        entry = self[uuid]
        if access_key_id is None and access_key is None and not kw and entry.get("db_url"):
            return S3Connection(db_url=entry["db_url"])
        params = {f: entry.get(f) for f in PUBLIC_FIELDS}
        if params["db_key"] is None:
            raise ValueError(f"Member {uuid} was added by public URL; it can only be read through it.")
        params.pop("db_url")
        if "endpoint_url" not in kw:
            self._check_endpoint(uuid, params["endpoint_url"])
            if "region" not in kw:
                self._check_own(uuid, "region", params["region"])
        if "bucket" not in kw:
            self._check_own(uuid, "bucket", params["bucket"])
        params.update(kw)
        return S3Connection(access_key_id, access_key, **params)

    def _check_own(self, uuid: str, field: str, value: Any) -> None:
        """Refuse to sign requests for a bucket (or region) the caller did not choose: only
        the group's own signed connection's is taken as chosen (else a writer of the
        group could make the caller's keys act on another bucket of the same endpoint)."""
        own = self._db.remote
        if own is not None and own.writable and value == getattr(own, field):
            return
        raise UntrustedEndpointError(
            f"Member {uuid} of {self._db.path} names the {field} {value!r}, not the group's "
            f"own {getattr(own, field, None)!r}: the group's entries cannot choose what your "
            f"credentials act on. If you trust it, pass {field}={value!r} to connection()."
        )

    def _check_endpoint(self, uuid: str, endpoint_url: Any) -> None:
        """Refuse to sign requests to a member's endpoint that the caller did not choose:
        only the endpoint of the group's own signed connection is taken as chosen."""
        own = self._db.remote
        if own is not None and own.writable and endpoint_url == own.endpoint_url:
            return
        chosen = f"the group's endpoint {own.endpoint_url!r}" if own is not None and own.writable else (
            "no endpoint (the group was not opened with credentials)"
        )
        raise UntrustedEndpointError(
            f"Member {uuid} of {self._db.path} names the endpoint {endpoint_url!r}, but you chose "
            f"{chosen}: the group's entries cannot choose where your credentials go. If you "
            f"trust that endpoint, pass endpoint_url={endpoint_url!r} to connection()."
        )

    # ------------------------------------------------------------ the mapping

    def __getitem__(self, uuid: str) -> dict:
        return check_entry(uuid, self._db[uuid])

    def __delitem__(self, uuid: str) -> None:
        del self._db[uuid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._db)

    def __len__(self) -> int:
        return len(self._db)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self._db

    def items(self, keys: Any = None) -> Iterator[tuple[str, dict]]:  # type: ignore[override]
        return ((uuid, check_entry(uuid, entry)) for uuid, entry in self._db.items(keys))

    def values(self, keys: Any = None) -> Iterator[dict]:  # type: ignore[override]
        return (entry for _, entry in self.items(keys))

    def get(self, uuid: str, default: Any = None) -> Any:
        return self[uuid] if uuid in self._db else default

    # ------------------------------------------------------------ as a database

    @property
    def db(self) -> EBooklet:
        """The underlying database."""
        return self._db

    def changes(self) -> Any:
        """See :meth:`EBooklet.changes`: ``group.changes().push()`` publishes the group."""
        return self._db.changes()

    def pull(self, keys: Any = None, force: bool = False) -> int:
        return self._db.pull(keys, force=force)

    def history(self, limit: int | None = None) -> list:
        return self._db.history(limit)

    def sync(self) -> None:
        self._db.sync()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RemoteConnGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        if name in ("path", "remote", "uuid", "writable", "offline", "flag", "diff", "vacuum",
                    "delete_remote", "copy_remote", "get_metadata", "load_items", "commit"):
            return getattr(self._db, name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"<RemoteConnGroup of {len(self)} databases at {self._db!r}>"



_ENTRY_TYPES: dict[str, tuple[type, ...]] = {
    "n_keys": (int,), "n_bytes": (int,), "seq": (int,), "last_commit": (int,), "added": (int,),
    "commit_id": (str,), "key_serializer": (str,), "value_serializer": (str,),
}
"""Optional fields of an entry besides the connection fields, and their types (or null)."""


def _connection_field_ok(field: str, value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, str) or len(value) > FIELD_MAX or not value.isprintable():
        return False
    return field not in URL_FIELDS or value.startswith(("http://", "https://"))


def check_entry(uuid: Any, entry: Any) -> dict:
    """``entry`` itself if it is a valid group entry: an object whose connection fields are
    null or printable strings (URLs ``http://`` or ``https://``), with a ``db_url`` or a
    ``db_key`` and ``bucket``, and whose other known fields have their types.

    Raises:
        IntegrityError: anything else (the group was damaged or written by hand).
    """
    problem = None
    if not isinstance(entry, dict):
        problem = f"is {type(entry).__name__}, not an object"
    else:
        bad = [f for f in PUBLIC_FIELDS if not _connection_field_ok(f, entry.get(f))]
        bad += [
            f for f, types in _ENTRY_TYPES.items()
            if entry.get(f) is not None
            and (not isinstance(entry[f], types) or isinstance(entry[f], bool))
        ]
        if bad:
            problem = f"has malformed fields {bad}"
        elif entry.get("db_url") is None and (entry.get("db_key") is None or entry.get("bucket") is None):
            problem = "names neither a db_url nor a bucket and db_key"
    if problem is not None:
        raise IntegrityError(
            f"The entry {uuid!r:.80} of this remote connection group {problem}: the group is "
            "damaged or was not written by ebooklet. Remove it (del group[uuid]) and add the "
            "database again with group.add()."
        )
    return entry
