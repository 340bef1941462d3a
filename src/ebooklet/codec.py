"""`Codec`: the key and value serializers of one open database, and encoding with them.

At open, :meth:`Codec.choose` picks the serializers: the caller's for a new database,
else those the database records (its remote manifest, or ``P.ebk.json``) as far as
:func:`serializers.choose` allows, checked against the data file's header. The codec
then encodes and decodes keys and values, with errors that say what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from booklet import utils as bk_utils

from . import serializers
from .connection import S3Connection
from .errors import EBookletError, IntegrityError, SerializationError
from .local import LocalMeta, local_paths

_HEADER_SERIALIZERS = {"value_serializer": slice(29, 31), "key_serializer": slice(31, 33)}
"""Where a booklet file's header records its serializers' codes (2 bytes little-endian each)."""
_HEADER_END = 33
_PLAIN_KEYS = frozenset({str, bytes, int})
"""Types of decoded keys known to be hashable: any other is hashed once to check it."""
_LOCATION = ("bucket", "db_key", "endpoint_url", "db_url")
"""The fields of ``S3Connection.public_params()`` that say which remote it is."""
NEW_KEY_SERIALIZER = "str"
NEW_VALUE_SERIALIZER = None
"""The serializers of a new database when open() is given none (bytes values)."""


class Codec:
    """The key and value serializers of one database (fixed for the life of an open
    copy), encoding and decoding keys and values.

    Args:
        key_serializer, value_serializer: the serializer classes (booklet's interface:
            ``dumps``, ``loads``).
        key_serializer_name, value_serializer_name: their names as manifests record them.
        path: the local data file, named in errors (a database read without one: its
            location).
        source: where decoded keys come from, named in errors: the remote's URL, or the
            data file's path for a local-only copy.
    """

    def __init__(
        self,
        key_serializer: Any,
        key_serializer_name: str | None,
        value_serializer: Any,
        value_serializer_name: str | None,
        path: Path | str,
        source: str,
    ) -> None:
        self._ks = key_serializer
        self._ks_name = key_serializer_name
        self._vs = value_serializer
        self._vs_name = value_serializer_name
        self._path = path
        self.source = source

    @classmethod
    def choose(
        cls,
        path: Path,
        key_serializer: Any,
        value_serializer: Any,
        trust_serializers: Any,
        *,
        fresh: bool,
        manifest: dict | None,
        meta: LocalMeta,
        conn: S3Connection | None,
    ) -> Codec:
        """Choose the serializers of the database at ``path``: the caller's for a new
        database (``fresh``: flag 'n'), else those the database records, as far as
        :func:`serializers.choose` allows (see docs/security.md).

        The remote ``manifest`` (``None``: none, or the copy replaces it) is not the
        caller's: a serializer it names that can run code or inflate is used only when
        passed to open(), allowed by ``trust_serializers``, or remembered in ``meta``
        (``P.ebk.json``) from an open of the same remote that allowed it. ``P.ebk.json``
        itself is the user's file: a database with no remote manifest uses what it records.

        Raises:
            SerializationError, UntrustedSerializerError: see :func:`ebooklet.open`.
        """
        trusted = serializers.trusted_names(trust_serializers)
        recorded = manifest if manifest is not None else meta.data
        header = _header_serializers(local_paths(path)[0])
        source = conn.db_url if conn is not None else str(path)
        if fresh or "key_serializer" not in recorded:
            codec = cls(
                *_unrecorded("key_serializer", key_serializer, header),
                *_unrecorded("value_serializer", value_serializer, header),
                path, source,
            )
            codec._check_header(
                header, "open()'s arguments",
                "Leave the serializer arguments out to use the file's own.",
            )
            return codec
        user_owned = recorded is meta.data
        where = f"{path} (its {meta.path.name})" if user_owned else repr(conn)
        remembered = {} if user_owned else _remembered_serializers(meta, conn)

        def choose(field: str, given: Any) -> tuple[Any, str | None]:
            allowed = True if user_owned or trusted is True else trusted | remembered.get(field, set())
            return serializers.choose(field, recorded[field], given, allowed, where)

        codec = cls(
            *choose("key_serializer", key_serializer),
            *choose("value_serializer", value_serializer),
            path, source,
        )
        if user_owned:
            remedy = (
                f"If {meta.path.name} was edited, restore it, or delete it to use the "
                "file's own serializers."
            )
        else:
            remedy = (
                f"Move {path} and its {path.name}.* files away (whatever was pushed "
                "is safe remotely): reopening downloads the database again."
            )
        codec._check_header(header, where, remedy)
        return codec

    def _check_header(self, header: dict[str, Any] | None, chosen_by: str, remedy: str) -> None:
        """Refuse serializers (chosen by ``chosen_by``) that differ from those the data
        file's header records (``None``: no data file); see :func:`serializers.check_header`."""
        if header is None:
            return
        for field, cls in (("key_serializer", self._ks), ("value_serializer", self._vs)):
            serializers.check_header(field, header[field], cls, str(self._path), chosen_by, remedy)

    @property
    def key_serializer(self) -> Any:
        """The key serializer class."""
        return self._ks

    @property
    def value_serializer(self) -> Any:
        """The value serializer class."""
        return self._vs

    @property
    def key_serializer_name(self) -> str | None:
        """The key serializer's name as manifests record it."""
        return self._ks_name

    @property
    def value_serializer_name(self) -> str | None:
        """The value serializer's name as manifests record it."""
        return self._vs_name

    def encode_prefix(self, prefix: Any) -> bytes:
        """The encoded form with which the encoded form of every key starting with
        ``prefix`` starts: keys of the key serializer ``'str'`` take a ``str`` prefix
        (UTF-8 keeps prefixes), keys stored as bytes (``None``) a ``bytes`` prefix.

        Raises:
            TypeError: another key serializer (numbers, JSON...: encodings that do not
                keep prefixes), or a prefix of another type than the keys'.
        """
        kind = serializers.key_type(self._ks)
        if kind not in ("str", "bytes"):
            raise TypeError(
                f"prefix= needs str or bytes keys (key serializer 'str' or None); the keys of "
                f"{self._path} are encoded by {self._ks_name!r}, whose encodings do not keep "
                "prefixes: filter the keys yourself."
            )
        if not isinstance(prefix, str if kind == "str" else bytes):
            raise TypeError(
                f"The keys of {self._path} are {kind}: prefix must be {kind}, "
                f"not {type(prefix).__name__}."
            )
        return self.encode_key(prefix)

    def encode_key(self, key: Any) -> bytes:
        """``key`` encoded by the key serializer.

        Raises:
            SerializationError: the serializer refuses it or returns no bytes.
        """
        try:
            kb = self._ks.dumps(key)
        except Exception as exc:
            raise SerializationError(_bad_key_message(key, self._ks, self._ks_name, exc)) from None
        if not isinstance(kb, bytes):
            raise SerializationError(_bad_key_message(key, self._ks, self._ks_name))
        return kb

    def encode_value(self, value: Any) -> bytes:
        """``value`` encoded by the value serializer.

        Raises:
            SerializationError: the serializer refuses it or returns no bytes.
        """
        try:
            raw = self._vs.dumps(value)
        except Exception as exc:
            raise SerializationError(
                f"Value of type {type(value).__name__} cannot be encoded by the value "
                f"serializer {self._vs_name!r}: {exc}"
            ) from None
        if not isinstance(raw, bytes):
            if self._vs is serializers.BYTES:
                raise SerializationError(
                    f"{self._path} stores bytes values (value_serializer=None), and a value of "
                    f"type {type(value).__name__} is not bytes. Encode it yourself, or choose "
                    "a serializer when creating the database: ebooklet.open(remote, path, 'n', "
                    "value_serializer='orjson') for JSON-like data, 'pickle' for any Python "
                    "object (its readers must then allow pickle)."
                )
            raise SerializationError(f"The value serializer returned {type(raw).__name__}, not bytes.")
        return raw

    def decode_value(self, raw: bytes) -> Any:
        """The value encoded as ``raw``.

        Raises:
            SerializationError: the value serializer fails on it.
        """
        try:
            return self._vs.loads(raw)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(
                f"A value of {self._path} cannot be decoded by its value serializer "
                f"{self._vs_name!r} ({type(exc).__name__}: {exc})."
            ) from None

    def decode_key(self, kb: bytes) -> Any:
        """The key encoded as ``kb`` (from the remote index, a pack footer or the local
        files), decoded by the key serializer.

        Raises:
            IntegrityError: the serializer fails on ``kb`` (in any way: invalid text,
                nesting too deep, a number too long...) or decodes it to an unhashable
                value, which cannot be a key.
        """
        try:
            key = self._ks.loads(kb)
            if type(key) not in _PLAIN_KEYS:
                hash(key)
            return key
        except Exception as exc:
            raise _undecodable_key(kb, self._ks_name, self.source, exc) from None


def _remembered_serializers(meta: LocalMeta, conn: S3Connection | None) -> dict[str, set]:
    """``{field: {name}}`` that ``P.ebk.json`` (``meta``) records for this very remote
    (opened without a remote: for the remote it last synced with). It records only
    serializers this copy was allowed to use (:meth:`Codec.choose` runs before it is
    saved), so each was the caller's choice once."""
    known = meta.data.get("remote")
    if conn is not None:
        mine = conn.public_params()
        if not isinstance(known, dict) or any(known.get(f) != mine[f] for f in _LOCATION):
            return {}
    return {f: {meta.data[f]} for f in ("key_serializer", "value_serializer") if f in meta.data}


def _bad_key_message(key: Any, ks: Any, ks_name: str | None, error: Exception | None = None) -> str:
    """Why ``key`` is not a key of a database with key serializer ``ks`` (which raised
    ``error``, or returned no bytes), and what to do."""
    kind = serializers.key_type(ks)
    named = ks_name is not None or ks is serializers.BYTES  # None names the bytes one too
    serializer = repr(ks_name) if named else "a custom class"
    if kind:
        must = f"are {kind} (key serializer {serializer})"
    else:
        why = f"{type(error).__name__}: {error}" if error is not None else "it returned no bytes"
        must = f"must be what their key serializer, {serializer}, encodes ({why})"
    return (
        f"Key {key!r:.60} is of type {type(key).__name__}: keys of this database {must}. "
        "Convert the key (str(key), for instance), or create the database with another "
        "key serializer: ebooklet.open(..., 'n', key_serializer='orjson') takes str and "
        "int keys (see booklet.available_serializers)."
    )


def _undecodable_key(kb: bytes, ks_name: str | None, where: str, exc: Exception) -> EBookletError:
    """The error for key bytes ``kb`` of database ``where`` that its key serializer fails to
    decode (``exc``): the serializer cannot run here, or the bytes are not a key of it."""
    if isinstance(exc, (ImportError, NameError)):
        return SerializationError(
            f"The key serializer {ks_name!r} of {where} cannot run here ({exc}): install the "
            "package it needs (e.g. msgpack, numpy) to read this database."
        )
    shown = f"{bytes(kb[:40])!r}{'...' if len(kb) > 40 else ''}"
    return IntegrityError(
        f"Key bytes {shown} in the index of {where} cannot be decoded by key serializer "
        f"{ks_name!r} ({type(exc).__name__}: {str(exc)[:200]}): the database is damaged or "
        "not written with that serializer. Its keys cannot be listed until whoever writes it "
        "repairs it; the values of other keys can still be read by key."
    )


def _header_serializers(path: Path) -> dict[str, Any] | None:
    """The serializers the header of the booklet file ``path`` records, as
    :func:`serializers.header_name` gives them (``None``: no such file, or not a booklet
    file, which opening it then reports)."""
    try:
        with path.open("rb") as file:
            head = file.read(_HEADER_END)
    except OSError:
        return None
    if len(head) < _HEADER_END or head[: len(bk_utils.uuid_variable_blt)] != bk_utils.uuid_variable_blt:
        return None
    where = f"The header of {path}"
    return {
        field: serializers.header_name(int.from_bytes(head[at], "little"), field, where)
        for field, at in _HEADER_SERIALIZERS.items()
    }


def _unrecorded(field: str, given: Any, header: dict[str, Any] | None) -> tuple[Any, str | None]:
    """The serializer for ``field`` when neither the remote nor ``P.ebk.json`` records one:
    the caller's, else the data file header's, else the default.

    Raises:
        SerializationError: the header records a custom class and none was given.
    """
    if given is serializers.UNSET:
        if header is None:
            given = NEW_KEY_SERIALIZER if field == "key_serializer" else NEW_VALUE_SERIALIZER
        elif header[field] == serializers.HEADER_CUSTOM:
            raise SerializationError(
                f"The data file was written with a custom {field} class (its header records "
                f"booklet's code 0): pass that class to open() as {field}= to read it."
            )
        else:
            given = header[field]
    return serializers.resolve(given, field)
