"""ebooklet: a dict-like key/value database in a local file, synced with S3."""

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
