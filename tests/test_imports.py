"""The library's import graph, read with ast: no cycle, imports point down the layers, no stage module
imports another, and lmforge modules are imported at the top of a file, not inside functions.

A function-local import of lmforge code usually hides a cycle; it is allowed only where ALLOWED_LOCAL
names the module and says why. Optional heavy third-party packages (transformers, mlflow, peft …)
may be imported where they are used: this test reads lmforge imports only.
"""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

from lmforge import imports

LIB = Path(__file__).resolve().parents[1] / "lib"

# Lowest first. A module may import modules of its own layer or of a layer below, never above.
LAYERS = [
    ("leaves", ["lmforge", "lmforge.errors", "lmforge.files", "lmforge.device", "lmforge.tasks",
                "lmforge.distributed", "lmforge.imports", "lmforge.model_config", "lmforge.hf_config",
                "lmforge.sections", "lmforge.config"]),
    ("architecture", ["lmforge.model", "lmforge.kernels", "lmforge.tokenizer"]),
    ("model files", ["lmforge.checkpoint", "lmforge.lora", "lmforge.quant"]),
    ("data and interop", ["lmforge.data", "lmforge.data.*", "lmforge.generate", "lmforge.hf", "lmforge.loader"]),
    ("training", ["lmforge.train", "lmforge.train.*"]),
    ("measuring", ["lmforge.evaluate", "lmforge.report", "lmforge.rewards", "lmforge.estimate", "lmforge.tracking"]),
    ("stages", ["lmforge.stages", "lmforge.stages.*"]),
    ("glue", ["lmforge.cli", "lmforge.workflow", "lmforge.pipeline", "lmforge.config_doc"]),
]

# importer -> why its lmforge imports may sit inside functions.
ALLOWED_LOCAL = {
    "lmforge.cli": "each subcommand imports the library it runs, so `lmforge --help` and `lmforge run` "
                   "start without loading torch",
    "lmforge.data.sources": "the embedded corpora (data.builtin, ~0.14 s to import) load only when a source "
                            "names one, so parsing a config stays cheap",
}


MODULES = {m: imports.module_file(m) for m in imports.all_modules()}


def lmforge_imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported lmforge module, line, nested) for every import statement of ``name``; nested: not at the
    top level of the file (inside a function, a class, an if or a try). ``from lmforge import x`` is
    lmforge.x when x is a module, relative imports are resolved."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, nested) for a in child.names if a.name.split(".")[0] == "lmforge")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1] + ([base] if base else []))
                if base.split(".")[0] == "lmforge":
                    for alias in child.names:
                        sub = f"{base}.{alias.name}"
                        found.append((sub if sub in MODULES else base, child.lineno, nested))
            visit(child, True)  # whatever a statement holds is below the top level

    visit(ast.parse(path.read_text(), str(path)), False)
    return sorted(set(found))


def graph() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in lmforge_imports(m)} - {m} for m in MODULES}


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name} (and to the "
                         f"layer picture in docs) at the lowest layer above everything it imports")


def test_the_scan_finds_the_known_imports():
    found = lmforge_imports("lmforge.stages.common")
    assert any(t == "lmforge.distributed" and not nested for t, _, nested in found)  # from lmforge import distributed as dist
    assert any(t == "lmforge.loader" and not nested for t, _, nested in found)


def test_the_library_has_no_import_cycle():
    assert imports.find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    cycle = imports.find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in sorted(graph().items()) for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_no_stage_module_imports_another():
    """Stages share code through stages.common or a lower layer, never through each other."""
    shared = {"lmforge.stages", "lmforge.stages.common"}
    crossing = [f"{m} imports {t}" for m, targets in sorted(graph().items()) if m.startswith("lmforge.stages.")
                for t in sorted(targets) if t.startswith("lmforge.stages.") and t not in shared]
    assert not crossing, "\n".join(crossing)


def test_lmforge_imports_sit_at_the_top_of_each_file():
    local = [f"{MODULES[m].relative_to(LIB)}:{line}: {t}" for m in MODULES if m not in ALLOWED_LOCAL
             for t, line, nested in lmforge_imports(m) if nested and t != m]  # (a module's __main__ may import itself)
    assert not local, ("lmforge imports inside functions (move them to the top; a cycle they dodged is a "
                       "layering problem to solve, not to hide):\n" + "\n".join(local))
    assert all(why.strip() for why in ALLOWED_LOCAL.values()) and set(ALLOWED_LOCAL) <= set(MODULES)


def test_the_workflow_code_hash_sees_the_same_imports():
    """lmforge.imports reads the graph with a regular expression (fast enough for every Snakemake call);
    it must find the statements the ast finds."""
    for m in MODULES:
        ours = {(t, line, nested) for t, line, nested in lmforge_imports(m)}
        theirs = set(imports.imports_of(m))
        assert theirs == ours, f"{m}: only the ast finds {sorted(ours - theirs)}, only the regex {sorted(theirs - ours)}"
