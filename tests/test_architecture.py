"""The module map holds (docs/architecture.md): no module reaches into another's private
state, and imports go only downward, read from the package's syntax trees."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ebooklet"

LAYERS = [
    {"errors"},
    {"format", "serializers", "_sigv4", "display"},
    {"store", "workers", "progress"},
    {"connection"},
    {"_booklet_io", "local", "lock", "remote"},
    {"replica", "reads", "codec", "outside"},
    {
        "changes",
        "maintenance",
        "maintenance.history",
        "maintenance.copying",
        "maintenance.vacuum",
        "maintenance.check",
        "maintenance.versioning",
    },
    {"ebooklet"},
    {"rcg"},
    {"api"},
    {"__init__", "server", "demo", "cli", "dask", "__main__"},
]
"""Each module's layer, lowest first: a module imports only from its layer and below."""

NAMEDTUPLE_API = {"_asdict", "_replace", "_fields", "_make", "_field_defaults"}
"""Named tuples' public methods, underscored so as not to clash with field names."""

OWN_PRIVATE_LAYOUT = {"_booklet_io"}
"""The modules allowed to read private members of objects from outside the package
(booklet's layout)."""


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _on_self(node: ast.AST) -> bool:
    """Whether ``node`` is ``self.x`` or ``cls.x``."""
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in ("self", "cls")
    )


def _defined_privates(tree: ast.Module) -> set[str]:
    """Private names a module defines: its functions, classes and module variables, and
    the methods, class variables and ``self._x`` attributes of its classes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif _on_self(node):
            names.add(node.attr)
    return {n for n in names if _private(n)}


def _reach_ins(modules: dict[str, ast.Module]) -> list[str]:
    in_package: set[str] = set()
    defined = {name: _defined_privates(tree) for name, tree in modules.items()}
    for names in defined.values():
        in_package |= names
    found = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                found += [
                    f"{name}:{node.lineno} imports {alias.name}"
                    for alias in node.names
                    if _private(alias.name)
                ]
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            if _on_self(node) or node.attr in defined[name] or node.attr in NAMEDTUPLE_API:
                continue
            if node.attr not in in_package and name in OWN_PRIVATE_LAYOUT:
                continue
            found.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    return found


def _layer(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"module {name} has no layer in tests/test_architecture.py")


def _imported(name: str, node: ast.ImportFrom) -> list[str]:
    """The package modules a relative import in module ``name`` names (a package's
    ``__init__`` is named after its package)."""
    is_package = (PACKAGE / name.replace(".", "/") / "__init__.py").exists() and name != "__init__"
    package = name.split(".") if is_package else name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    if node.module is None:
        return [".".join([*base, alias.name]) for alias in node.names]
    return [".".join([*base, node.module])]


def _upward_imports(modules: dict[str, ast.Module]) -> list[str]:
    found = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            for target in _imported(name, node):
                if target not in modules:
                    continue
                if name != "__init__" and _layer(target) > _layer(name):
                    found.append(f"{name}:{node.lineno} imports {target} from a layer above")
    return found


def test_no_module_reaches_into_another_modules_private_state():
    assert _reach_ins(_modules()) == []


def test_imports_go_only_downward():
    assert _upward_imports(_modules()) == []


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)
