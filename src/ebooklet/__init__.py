"""ebooklet: a dict-like key/value database in a local file, kept in sync with S3.

A database is a local booklet file with the ``MutableMapping``/``dbm`` API, synced with
any S3-compatible store: reads fetch lazily and cache, writes stay local until
``db.changes().push()`` uploads only what changed, in one atomic commit. Anyone can read
a published database through its public URL, without credentials.

    import ebooklet

    conn = ebooklet.S3Connection(access_key_id, secret_key, "weather/stations", "my-bucket")
    with ebooklet.open(conn, "stations.blt", "c", value_serializer="orjson") as db:
        db["station-1"] = {"temp": 21}       # local, works offline
        db.changes().push(message="survey")   # one commit
    with ebooklet.open(conn.db_url, "copy.blt") as reader:   # read-only, no credentials
        reader["station-1"]

Start with :func:`open`; :class:`EBooklet` is the database, :class:`Changes` what a push
sends, :class:`S3Connection` the remote. ``ebooklet --help`` is the command line.
docs/: api.md, cli.md, format.md, security.md, providers.md, architecture.md.
"""

from .api import break_lock, check, delete_local, open, open_rcg
from .changes import Change, Changes, PushResult
from .connection import S3Connection
from .ebooklet import DatabaseInfo, EBooklet
from .errors import (
    AuthError,
    CacheDamagedError,
    CommitRetryError,
    ConflictError,
    ConsistencyWarning,
    DecompressionLimitError,
    EBookletError,
    FormatVersionError,
    IntegrityError,
    LockedError,
    OfflineError,
    OfflineWarning,
    ReadOnlyError,
    RemoteError,
    RemoteExistsError,
    RemoteNotFoundError,
    SerializationError,
    ShardLimitError,
    UntrustedEndpointError,
    UntrustedSerializerError,
    VacuumConflictError,
)
from .rcg import RemoteConnGroup
from .reads import KeyStat

open_ebooklet = open

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "CacheDamagedError",
    "Change",
    "Changes",
    "CommitRetryError",
    "ConflictError",
    "ConsistencyWarning",
    "DatabaseInfo",
    "DecompressionLimitError",
    "EBooklet",
    "EBookletError",
    "FormatVersionError",
    "IntegrityError",
    "KeyStat",
    "LockedError",
    "OfflineError",
    "OfflineWarning",
    "PushResult",
    "ReadOnlyError",
    "RemoteConnGroup",
    "RemoteError",
    "RemoteExistsError",
    "RemoteNotFoundError",
    "S3Connection",
    "SerializationError",
    "ShardLimitError",
    "UntrustedEndpointError",
    "UntrustedSerializerError",
    "VacuumConflictError",
    "break_lock",
    "check",
    "delete_local",
    "open",
    "open_ebooklet",
    "open_rcg",
]
