"""Which serializers ebooklet decodes with, and which of them a remote may choose.

A remote manifest names its database's key and value serializers. Whoever can write
the bucket writes the manifest (over ``http://``, so can anyone on the path), so a
name read from it is used only when the serializer can neither run code nor blow up
in memory (:data:`SAFE`), or when the caller allowed it: by passing the same
serializer to :func:`ebooklet.open`, or with ``trust_serializers``. This module owns
that rule (:func:`choose`), the mapping of names to serializer classes
(:func:`resolve`, which also refuses a serializer whose package is not installed, naming
the extra that installs it), and the bounded forms of booklet's zstd serializers
(:func:`inflate`, :data:`INFLATE_LIMIT`). It reads no file and talks to no remote;
see ``docs/security.md`` for the whole trust model.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import booklet
from booklet import serializers as bk_serializers

from .errors import (
    DecompressionLimitError,
    IntegrityError,
    SerializationError,
    UntrustedSerializerError,
)

SAFE = frozenset(
    {
        None, "bytes", "str", "json", "orjson", "msgpack",
        "uint1", "int1", "uint2", "int2", "uint4", "int4", "uint5", "int5", "uint8", "int8",
        "numpy_int1", "numpy_int2", "numpy_int4", "numpy_int8",
    }
)
"""Serializers a remote may choose on its own: their decoders run no code of the data's
choosing and inflate nothing. They do build Python objects larger than the bytes they
read: measured, JSON lists 24-27 times, msgpack empty maps up to 74 times (10 M of them
in 9.5 MiB took 705 MiB), so reading a value costs memory in proportion to its size,
which the reader sees in the index before fetching it. Everything else (``pickle``,
every ``*zstd`` serializer, ``pd_zstd``, ``gpd_zstd``, ``wkb``) needs the caller's
consent."""

INFLATE_LIMIT = 256 << 20
"""The most bytes one value may inflate to through a zstd serializer. A value
past it raises :class:`DecompressionLimitError`; raise this module attribute (read at
each decode) to read databases of larger compressed values."""

BYTES = bk_serializers.serial_dict[None]
"""The default value serializer: values are bytes, stored as they are."""

HEADER_CUSTOM = "custom"
"""What a booklet file's header records for a serializer class that is not booklet's
(code 0), as :func:`header_name` gives it."""

_INFLATE_CHUNK = 1 << 20
"""A zstd frame that does not declare its size is inflated this many bytes at a time."""

_INFLATED = {
    "zstd": "bytes",
    "pickle_zstd": "pickle",
    "orjson_zstd": "orjson",
    "msgpack_zstd": "msgpack",
    "wkb_zstd": "wkb",
    "numpy_int2_zstd": "numpy_int2",
    "numpy_int4_zstd": "numpy_int4",
    "numpy_int8_zstd": "numpy_int8",
}
"""booklet's zstd serializers: each is the serializer named here over one zstd frame.
(``pd_zstd`` and ``gpd_zstd`` compress inside the Feather format, out of our reach.)"""


DISTRIBUTION = "ebooklet-s3"
"""The name this package is installed by (``pip install ebooklet-s3``; it is imported as
``ebooklet``). Its extras install the packages of the optional serializers."""

_NEEDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "zstd": ("zstd", ("zstandard",)),
    "pickle_zstd": ("zstd", ("zstandard",)),
    "orjson_zstd": ("zstd", ("zstandard",)),
    "msgpack": ("msgpack", ("msgpack",)),
    "msgpack_zstd": ("msgpack,zstd", ("msgpack", "zstandard")),
    **{f"numpy_int{n}": ("numpy", ("numpy",)) for n in (1, 2, 4, 8)},
    **{f"numpy_int{n}_zstd": ("numpy,zstd", ("numpy", "zstandard")) for n in (2, 4, 8)},
    "pd_zstd": ("pandas", ("pandas", "pyarrow")),
    "gpd_zstd": ("geopandas", ("geopandas", "pyarrow")),
    "wkb": ("shapely", ("shapely",)),
    "wkb_zstd": ("shapely,zstd", ("shapely", "zstandard")),
}
"""booklet's serializers that need packages ebooklet does not depend on:
``{name: (the extras that install them, the modules they import)}``."""


class _Unset:
    """The default of ``key_serializer``/``value_serializer``: "the database's own"."""

    def __repr__(self) -> str:
        return "<the database's own>"


UNSET: Any = _Unset()
"""``open()`` was given no serializer: a new database takes the default, an existing
one the serializer it records (if :func:`choose` allows it)."""


def inflate(data: bytes | bytearray | memoryview) -> bytes:
    """One zstd frame of ``data``, decompressed, of at most :data:`INFLATE_LIMIT` bytes.

    A frame that declares its size is refused before anything is allocated when the size
    is over the limit (zstd checks the declaration while decompressing); one that does not
    is inflated a chunk at a time and stopped at the limit.

    Raises:
        DecompressionLimitError: the value inflates past the limit.
        SerializationError: ``data`` is not a zstd frame.
    """
    import zstandard

    limit = INFLATE_LIMIT
    try:
        declared = zstandard.frame_content_size(data)
        if declared > limit:
            raise _too_large(f"declares {declared:,} bytes")
        if declared >= 0:
            return zstandard.ZstdDecompressor().decompress(data)
        out = bytearray()
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            while chunk := reader.read(_INFLATE_CHUNK):
                if len(out) + len(chunk) > limit:
                    raise _too_large("inflates further")
                out += chunk
        return bytes(out)
    except zstandard.ZstdError as exc:
        raise SerializationError(f"A value is not valid zstd data ({exc}).") from None


def key_type(ks: Any) -> str | None:
    """The Python type of the keys a booklet key serializer takes (``None``: another
    serializer, which says itself what it can encode)."""
    if ks is bk_serializers.Str:
        return "str"
    if ks is BYTES:
        return "bytes"
    name = getattr(ks, "__name__", "")
    if name.startswith(("Int", "Uint")) and getattr(ks, "__module__", None) == bk_serializers.__name__:
        return "int"
    return None


def _too_large(what: str) -> DecompressionLimitError:
    return DecompressionLimitError(
        f"A compressed value {what}, over the limit of {INFLATE_LIMIT:,} bytes "
        "(ebooklet.serializers.INFLATE_LIMIT). If you trust this database and its values "
        "are that large, raise ebooklet.serializers.INFLATE_LIMIT before reading them."
    )


def _bounded(name: str) -> type:
    """booklet's serializer ``name`` whose ``loads`` inflates through :func:`inflate`."""
    base = bk_serializers.serial_dict[name]
    inner = bk_serializers.serial_dict[_INFLATED[name]]

    def loads(data: bytes) -> Any:
        return inner.loads(inflate(data))

    return type(f"Bounded{base.__name__}", (base,), {"loads": staticmethod(loads), "__module__": __name__})


_BOUNDED = {name: _bounded(name) for name in _INFLATED}
_NAME_OF: dict[Any, str | None] = {cls: name for name, cls in reversed(bk_serializers.serial_dict.items())}
_NAME_OF.update({cls: name for name, cls in _BOUNDED.items()})
_CUSTOM = object()  # the name of a serializer class that is not booklet's


def resolve(name_or_class: Any, field: str) -> tuple[Any, str | None]:
    """``(serializer class, recorded name)``: a booklet name (zstd ones bounded), or a
    class with ``dumps``/``loads`` (recorded as ``None``).

    Raises:
        ValueError: an unknown name.
        TypeError: neither a name nor a serializer class.
        SerializationError: a package the named serializer needs is not installed.
    """
    if isinstance(name_or_class, str) or name_or_class is None:
        if name_or_class not in bk_serializers.serial_dict:
            raise ValueError(
                f"{field} {name_or_class!r} is not a booklet serializer; use one of "
                f"{sorted(str(k) for k in booklet.available_serializers)} or a class with "
                "dumps/loads."
            )
        _check_installed(name_or_class, field)
        cls = _BOUNDED.get(name_or_class) or bk_serializers.serial_dict[name_or_class]
        return cls, name_or_class
    if hasattr(name_or_class, "dumps") and hasattr(name_or_class, "loads"):
        return name_or_class, None
    raise TypeError(f"{field} must be a serializer name or a class with dumps and loads methods.")


def _check_installed(name: str | None, field: str) -> None:
    """Refuse serializer ``name`` when a package it needs cannot be imported, naming the
    extra to install (booklet would accept it and fail at the first value).

    Raises:
        SerializationError: a package is missing.
    """
    if name not in _NEEDS:
        return
    extras, modules = _NEEDS[name]
    missing = [module for module in modules if not _importable(module)]
    if missing:
        raise SerializationError(
            f"{field} {name!r} needs {' and '.join(missing)}, which cannot be imported here: "
            f'install it with  pip install "{DISTRIBUTION}[{extras}]"'
        )


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def booklet_spec(cls: Any) -> Any:
    """What to give ``booklet.open`` for serializer ``cls``: its booklet name when it has
    one (so that the file records booklet's code and plain booklet reads it), else ``cls``."""
    return _NAME_OF.get(cls, cls)


def trusted_names(trust_serializers: Any) -> frozenset | bool:
    """The ``trust_serializers`` argument of ``open()`` checked: ``True`` (any serializer
    a remote names) or the set of names allowed (``False``: none beyond :data:`SAFE`).

    Raises:
        ValueError, TypeError: not a bool, a name or a collection of names.
    """
    if isinstance(trust_serializers, bool):
        return trust_serializers or frozenset()
    names = [trust_serializers] if isinstance(trust_serializers, str) else trust_serializers
    if not isinstance(names, Iterable):
        raise TypeError(
            "trust_serializers must be True, False, a serializer name or a collection of "
            f"names, not {type(trust_serializers).__name__}."
        )
    names = frozenset(names)
    unknown = [n for n in names if not isinstance(n, str) or n not in bk_serializers.serial_dict]
    if unknown:
        raise ValueError(f"trust_serializers holds {unknown!r}, which are not booklet serializer names.")
    return names


def choose(field: str, recorded: Any, given: Any, trusted: frozenset | bool, where: str) -> tuple[Any, str | None]:
    """The serializer to use for ``field`` of an existing database: ``(class, name)``.

    Args:
        field: ``"key_serializer"`` or ``"value_serializer"``.
        recorded: the name the database records (``None``: bytes, or a custom class).
        given: what the caller passed to ``open()``, or :data:`UNSET`.
        trusted: names the caller allows (``True``: all).
        where: the database, as the messages name it.

    Raises:
        SerializationError: ``given`` differs from ``recorded``.
        UntrustedSerializerError: nothing given, and ``recorded`` is neither safe nor
            trusted.
        IntegrityError: ``recorded`` is not a name at all.
    """
    if recorded is not None and not isinstance(recorded, str):
        raise IntegrityError(f"{where} records a {field} of type {type(recorded).__name__}; it is corrupted.")
    if recorded not in bk_serializers.serial_dict:
        raise SerializationError(
            f"{where} records {field} {recorded!r}, which this version of booklet does not "
            "know; upgrade booklet to read it."
        )
    if given is not UNSET:
        cls, name = resolve(given, field)
        _check_same(field, recorded, cls, where)
        return cls, name
    if recorded not in SAFE and not (trusted is True or recorded in trusted):
        raise UntrustedSerializerError(
            recorded,
            field,
            f"{where} records {field} {recorded!r}, which can run code or inflate values "
            "while decoding them; a database cannot impose it on its readers. If you trust "
            f"whoever can write this database, open it with {field}={recorded!r} (or "
            f"trust_serializers={{{recorded!r}}}).",
        )
    return resolve(recorded, field)


def header_name(code: int, field: str, where: str) -> Any:
    """The serializer a booklet file's header records as ``code``: its name (``None`` for
    bytes), or :data:`HEADER_CUSTOM` for booklet's code 0 (a class passed when it was
    created).

    Raises:
        IntegrityError: a code booklet does not know (the header is damaged).
    """
    if code == 0:
        return HEADER_CUSTOM
    if code not in bk_serializers.serial_int_dict:
        raise IntegrityError(
            f"{where} records {field} code {code}, which booklet does not know: the file is "
            "damaged. Move it away: whatever was pushed is safe remotely."
        )
    return _NAME_OF[bk_serializers.serial_int_dict[code]]


def check_header(field: str, header: Any, cls: Any, where: str, chosen_by: str, remedy: str) -> None:
    """Refuse serializer ``cls``, chosen by ``chosen_by``, for the booklet file ``where``
    whose header records ``header`` (a :func:`header_name`): its bytes were written by
    another serializer. ``remedy`` tells what to do.

    Raises:
        SerializationError: they differ.
    """
    mine = _NAME_OF.get(cls, HEADER_CUSTOM)
    if mine == header:
        return
    raise SerializationError(
        f"{where} records {field} {header!r} in its header, but {chosen_by} says {mine!r}: "
        f"decoding with either could give wrong values. {remedy}"
    )


def _check_same(field: str, recorded: str | None, cls: Any, where: str) -> None:
    """Refuse a serializer passed to ``open()`` that is not the one the database records
    (``None`` records bytes or a custom class: any class is taken as the custom one)."""
    mine = _NAME_OF[bk_serializers.serial_dict[recorded]]  # "bytes" is recorded as None too
    passed = _NAME_OF.get(cls, _CUSTOM)
    if passed == mine or (mine is None and passed is _CUSTOM):
        return
    shown = getattr(cls, "__name__", cls) if passed is _CUSTOM else passed
    advice = "leave it out" if recorded in SAFE else f"pass {field}={recorded!r} if you trust it"
    raise SerializationError(
        f"{where} records {field} {recorded!r}, but {shown!r} was passed to open(); decoding "
        f"with either would give wrong values. {advice[0].upper()}{advice[1:]}, or use flag "
        f"'n' to start a new database with {shown!r}."
    )
