"""The lmforge import graph, read from the source files without importing anything.

Snakemake sees a ``script:``'s own mtime, not the library code the script runs. A
stage's code version is therefore the hash of every lmforge file its module can
load: its transitive import closure, function-local imports included, plus the
package ``__init__`` files Python runs on the way. Reading the source keeps
building the DAG free of torch (importing the stages would cost seconds per
``snakemake`` call). tests/test_imports.py checks this scan against ``ast`` and the graph for cycles.
"""
from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

PACKAGE = "lmforge"
LIB_ROOT = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def _files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (one directory walk)."""
    files = {}
    for path in sorted(LIB_ROOT.rglob("*.py")):
        parts = path.relative_to(LIB_ROOT).with_suffix("").parts
        files[".".join((PACKAGE, *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return files


def module_file(module: str) -> Path | None:
    """The source file of an lmforge module (a package's ``__init__.py``), or None if there is none."""
    return _files().get(module)


# An import statement at the start of a line: `from lmforge.x import a, b` (or a parenthesised list
# over several lines) or `import lmforge.x`. A regular expression reads the ~50 files in a few ms where
# ast.parse takes half a second; tests/test_imports.py checks that both find the same statements.
_IMPORT = re.compile(r"^([ \t]*)(?:from[ \t]+(lmforge[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]*)"
                     r"|import[ \t]+(lmforge[\w.]*))", re.M)


@functools.lru_cache(maxsize=None)
def imports_of(module: str) -> tuple[tuple[str, int, bool], ...]:
    """(imported module, line, indented) for every lmforge import in ``module``'s source; indented
    means inside a function (or another block): loaded only when that code runs."""
    path = module_file(module)
    if path is None:
        return ()
    text = path.read_text()
    found = []
    for m in _IMPORT.finditer(text):
        indent, base, names, plain = m.groups()
        line = text.count("\n", 0, m.start()) + 1
        if plain:
            targets = [plain]
        else:
            listed = [n.split(" as ")[0].strip() for n in names.strip("()").replace("\n", " ").split(",")]
            targets = [f"{base}.{n}" for n in listed if n and module_file(f"{base}.{n}") is not None] or [base]
        found.extend((t, line, bool(indent)) for t in targets)
    return tuple(found)


def all_modules() -> list[str]:
    """Every module of the package, by dotted name."""
    return sorted(_files())


def _with_packages(module: str) -> list[str]:
    """``module`` and the packages Python imports before it (lmforge, lmforge.train, ...)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(*modules: str) -> list[str]:
    """Every lmforge module that importing ``modules`` (and calling into them) can load, sorted."""
    seen: set[str] = set()
    todo = [p for m in modules for p in _with_packages(m)]
    while todo:
        m = todo.pop()
        if m in seen or module_file(m) is None:
            continue
        seen.add(m)
        todo.extend(p for name, _, _ in imports_of(m) for p in _with_packages(name))
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def _source_digest(module: str) -> str:
    path = module_file(module)
    return hashlib.sha256(path.relative_to(LIB_ROOT).as_posix().encode() + b"\0" + path.read_bytes()).hexdigest()


def code_version(*modules: str) -> str:
    """Hash of the source of the closure of ``modules``: changes exactly when one of those files does."""
    return hashlib.sha256("".join(_source_digest(m) for m in closure(*modules)).encode()).hexdigest()[:16]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``edges`` as [a, b, ..., a], or None when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None
