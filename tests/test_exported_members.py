"""The public names: ``ebooklet.__all__`` lists exactly what the package exports, and every
exception of ``errors.py`` is either exported or documented there as internal."""

from __future__ import annotations

import inspect
import re
import sys
import typing
from pathlib import Path

import pytest

import ebooklet
from ebooklet import errors

INTERNAL_ERRORS = {"PreconditionFailed", "ScanInterrupted"}
"""Exceptions ebooklet catches itself; errors.py's docstring marks them internal."""


def drawn_tree(doc: str) -> dict[str, tuple[str, str]]:
    """``{class name: (parent's name, its line)}`` of the tree drawn in a docstring."""
    tree: dict[str, tuple[str, str]] = {}
    parents: list[tuple[int, str]] = []  # (column, name) of the open branches
    for line in doc.splitlines():
        match = re.fullmatch(r"    ([│├└─ ]*)(\w+).*", line)
        if match is None:
            continue
        column, name = len(match.group(1)), match.group(2)
        while parents and parents[-1][0] >= column:
            parents.pop()
        if parents:
            tree[name] = (parents[-1][1], line)
        parents.append((column, name))
    return tree


def test_all_is_the_public_names() -> None:
    public = {name for name in vars(ebooklet) if not name.startswith("_")}
    submodules = {n for n in public if inspect.ismodule(getattr(ebooklet, n))}
    assert sorted(ebooklet.__all__) == sorted(public - submodules)
    assert len(set(ebooklet.__all__)) == len(ebooklet.__all__)


def test_every_exception_is_exported_or_internal() -> None:
    classes = {
        name for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == errors.__name__
    }
    assert classes - set(ebooklet.__all__) == INTERNAL_ERRORS
    tree = drawn_tree(errors.__doc__)
    assert classes <= set(tree), "every exception is drawn in errors.py's tree"
    for name in classes:
        parent, line = tree[name]
        assert parent in {base.__name__ for base in getattr(errors, name).__bases__}, line
        assert ("internal" in line) == (name in INTERNAL_ERRORS), line
    for name in classes - INTERNAL_ERRORS:
        assert getattr(ebooklet, name) is getattr(errors, name)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads is new in 3.11")
def test_type_checkers_see_what_open_returns() -> None:
    """``open()`` is typed as returning an EBooklet, or a RemoteConnGroup with
    ``remote_conn_group=True``, not ``Any``; the wheel says it is typed (``py.typed``)."""
    returns = {
        inspect.signature(f).parameters["remote_conn_group"].annotation: inspect.signature(f).return_annotation
        for f in typing.get_overloads(ebooklet.open)
    }
    assert returns == {
        "Literal[False]": "EBooklet",
        "Literal[True]": "RemoteConnGroup",
        "bool": "EBooklet | RemoteConnGroup",
    }
    assert inspect.signature(ebooklet.open_rcg).return_annotation == "RemoteConnGroup"
    assert (Path(ebooklet.__file__).parent / "py.typed").is_file()
