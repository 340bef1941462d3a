"""Mirrors (see ``remote.Mirror``) kept in memory, for the ``RemoteIndex`` that maintenance
operations read index shards through."""

from __future__ import annotations

from collections.abc import Iterable


class MemoryMirror:
    """A mirror (see ``remote.Mirror``) kept in memory: for one-off remotes (copy targets, checks)."""

    def __init__(self) -> None:
        self._manifest: tuple[dict | None, str | None] = (None, None)
        self._shards: dict[str, bytes] = {}

    def get_manifest(self) -> tuple[dict | None, str | None]:
        return self._manifest

    def set_manifest(self, manifest: dict | None, etag: str | None) -> None:
        self._manifest = (manifest, etag)

    def get_shard(self, name: str) -> bytes | None:
        return self._shards.get(name)

    def set_shard(self, name: str, data: bytes) -> None:
        self._shards[name] = data

    def drop_shards(self, names: Iterable[str]) -> None:
        for name in names:
            self._shards.pop(name, None)

