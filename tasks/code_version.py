"""A stage's code version, derived from its imports: editing any core module it uses re-runs it.

The version is the package version plus a hash of the source of every core module
(`dpoflow.tasks.*`, `dpoflow.storage.*`) that the stage function's module imports, followed
transitively, function-level imports included. The imports are read from the source (AST),
so nothing is imported and no list is kept by hand: a new helper module is covered the day
it is imported. Shell modules (`dpoflow.flows.*`) are plumbing and are not part of it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import threading
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CORE = ("dpoflow.tasks", "dpoflow.storage")


def _is_core(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in CORE)


@lru_cache(maxsize=512)
def _source(name: str) -> Path | None:
    """The .py file of a core module or package (None when `name` is not one).

    Found from the folder of its top package (`dpoflow.tasks`, `dpoflow.storage`), without
    importing the module or its parents: computing a version must stay cheap (no torch)."""
    top = next((c for c in CORE if name == c or name.startswith(c + ".")), None)
    if top is None:
        return None
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations)))
    rest = name[len(top):].lstrip(".").split(".") if name != top else []
    for candidate in (base.joinpath(*rest, "__init__.py"), base.joinpath(*rest[:-1], f"{rest[-1]}.py") if rest else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _imported(name: str, path: Path) -> set[str]:
    """Module names that `path` (the module `name`) imports, resolved to absolute names.

    ``from pkg import x`` counts as ``pkg.x`` when that is a module, else as ``pkg``."""
    tree = ast.parse(path.read_bytes(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if _source(sub) is not None else base)
    return found


def _shell_source(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (imports for type hints only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def module_closure(start: str) -> dict[str, Path]:
    """Source files of the core modules `start` reaches through imports, by module name.

    `start` itself is included only when it is a core module."""
    seen: set[str] = set()
    todo = [start]
    files: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _source(name) if _is_core(name) else _shell_source(name)
        if path is None:
            continue
        if _is_core(name):
            files[name] = path
            todo.extend(p for p in _parents(name) if _is_core(p))
        if _is_core(name) or name == start:
            todo.extend(m for m in _imported(name, path) if _is_core(m))
    return dict(sorted(files.items()))


_LOCK = threading.Lock()  # CPython 3.11's ast.parse is not safe in concurrent threads (score | ingest)


def code_version(module: str) -> str:
    """``<package version>+<hash of the core sources `module` reaches>``."""
    with _LOCK:
        return _code_version(module)


@lru_cache(maxsize=128)
def _code_version(module: str) -> str:
    try:
        pkg = version("dpoflow")
    except PackageNotFoundError:
        pkg = "0+local"
    h = hashlib.sha256()
    for name, path in module_closure(module).items():
        h.update(name.encode())
        h.update(path.read_bytes())
    return f"{pkg}+{h.hexdigest()[:12]}"
