"""Listing what a database owns: every version of its objects (for delete and vacuum)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from ..connection import ObjectVersion, S3Connection
from ..errors import AuthError, RemoteError


def versions(conn: S3Connection, suffix: str, exact: bool = False) -> list[ObjectVersion] | None:
    """Every version under ``suffix``; ``None`` when the server cannot list versions."""
    try:
        return list(conn.list_versions(suffix, exact=exact))
    except AuthError as exc:
        warnings.warn(
            f"Cannot list object versions ({exc}); if the bucket is versioned, old "
            "versions stay until you delete them (grant s3:ListBucketVersions).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    except RemoteError:
        return None  # a server without versioning support


def is_versioned(versions: Iterable[ObjectVersion] | None) -> bool:
    return versions is not None and any(v.version_id not in (None, "null") for v in versions)


def version_id(version: ObjectVersion) -> str | None:
    return version.version_id if version.version_id not in (None, "null") else None
