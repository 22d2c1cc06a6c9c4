"""The config reference, docs/config.md, generated from the config schema.

    python -m lmforge.config_doc > docs/config.md      # what `make docs` runs

Every key of every section, nested ones included, with its type, default, allowed values
and description, read from ``config.schema.yaml`` alone (no torch), so the page cannot
drift from what the config loader and Snakemake's validate() enforce; tests/test_docs.py
checks that the committed page equals ``render(load_schema())``.
"""
from __future__ import annotations

import json
import sys

from lmforge.config import load_schema

HEADER = """\
# Config reference

<!-- Generated from lib/lmforge/config.schema.yaml by `make docs`; do not edit by hand. -->

Every key lmforge reads, with its type, its default and the values it accepts.
A key left out of a config takes the default below; `config/config.yaml` (the
embedded default run) sets its own values over these, and a preset given with
`--configfile` is merged over that. Unknown keys and values outside the
allowed ones are errors that name the key. Nested keys are written with dots:
`data.builtin.noise.wrong` is `wrong` under `noise` under `builtin` in the
`data` section.
"""


def render(schema: dict) -> str:
    """The whole page as Markdown: top-level scalar keys first, then one table per section."""
    out = [HEADER]
    properties = _resolve(schema, schema).get("properties", {})
    scalars = {k: v for k, v in properties.items() if not _is_section(_resolve(v, schema), schema)}
    sections = {k: v for k, v in properties.items() if k not in scalars}
    if scalars:
        out.append("## Top level\n")
        out.append(_table([row for key, sub in scalars.items() for row in _rows(key, sub, schema)]))
    for name, sub in sections.items():
        node = _resolve(sub, schema)
        out.append(f"## `{name}`\n")
        if node.get("description"):
            out.append(_sentence(node["description"]) + "\n")
        out.append(_table(_child_rows(node, schema)))
    return "\n".join(out)


# --------------------------------------------------------------------------- schema walking


def _resolve(node: dict, root: dict) -> dict:
    """``node`` with a local ``$ref`` followed and the branches of an ``allOf`` merged in."""
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is not None:
        if not ref.startswith("#/"):
            raise ValueError(f"only local $ref are supported, got {ref!r}")
        target = root
        for part in ref[2:].split("/"):
            target = target[part]
        node = {**_resolve(target, root), **node}
    for branch in node.pop("allOf", []):
        branch = _resolve(branch, root)
        merged = {**node.get("properties", {}), **branch.get("properties", {})}
        node = {**branch, **node, "properties": merged} if merged else {**branch, **node}
    return node


def _branches(node: dict, root: dict) -> list[dict]:
    """The alternatives a value may take: the ``anyOf``/``oneOf`` branches, or the node itself."""
    alternatives = node.get("anyOf") or node.get("oneOf")
    return [_resolve(b, root) for b in alternatives] if alternatives else [node]


def _properties(node: dict, root: dict) -> dict:
    """The keys of an object node, from whichever branch declares them."""
    for branch in _branches(node, root):
        if branch.get("properties"):
            return branch["properties"]
    return {}


def _is_section(node: dict, root: dict) -> bool:
    return bool(_properties(node, root))


def _rows(key: str, sub: dict, root: dict) -> list[list[str]]:
    """A row for ``key`` and one for each key nested under it (dotted)."""
    node = _resolve(sub, root)
    row = [f"`{key}`", _type(node, root), _default(node), _allowed(node, root), _describe(node)]
    return [row] + [[_nest(key, r[0]), *r[1:]] for r in _child_rows(node, root)]


def _child_rows(node: dict, root: dict) -> list[list[str]]:
    """The rows of the keys under an object node, named relative to it.

    Sibling objects with identical schemas (the per-rule entries of ``resources``)
    are listed once as ``<name>``, with the names they stand for.
    """
    rows = []
    children = _properties(node, root)
    groups: dict[str, list[str]] = {}
    for name, child in children.items():
        groups.setdefault(json.dumps(_resolve(child, root), sort_keys=True, default=str), []).append(name)
    done = set()
    for name, child in children.items():
        if name in done:
            continue
        same = next(names for names in groups.values() if name in names)
        if len(same) > 2 and _properties(_resolve(child, root), root):
            done.update(same)
            group_rows = _rows("<name>", child, root)
            group_rows[0][3] = _join("`<name>` is any of " + ", ".join(f"`{n}`" for n in same), group_rows[0][3])
            rows += group_rows
        else:
            rows += _rows(name, child, root)
    return rows


def _nest(parent: str, child_cell: str) -> str:
    return f"`{parent.strip('`')}.{child_cell.strip('`')}`"


# --------------------------------------------------------------------------- cells


def _type(node: dict, root: dict) -> str:
    types: list[str] = []
    for branch in _branches(node, root):
        declared = branch.get("type")
        if declared is None and "enum" in branch:
            declared = sorted({_json_type(v) for v in branch["enum"]}, key=_TYPE_ORDER.index)
        for t in [declared] if isinstance(declared, str) else declared or []:
            if t not in types:
                types.append(t)
    if not types and _properties(node, root):
        types = ["object"]
    if "array" in types and isinstance(node.get("items"), dict) and node["items"].get("type"):
        item = node["items"]["type"]
        item = " or ".join(item) if isinstance(item, list) else item
        types[types.index("array")] = f"list of {item}"
    return " or ".join(types)


_TYPE_ORDER = ["boolean", "integer", "number", "string", "array", "object", "null"]


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"


def _default(node: dict) -> str:
    if "default" not in node:
        return ""
    value = node["default"]
    if isinstance(value, dict) and not value:
        return ""  # an object whose keys have their own defaults
    return f"`{_literal(value)}`"


def _literal(value) -> str:
    """A value as it would be written in the YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and "e" in repr(value) and "." not in repr(value):
        return repr(value).replace("e", ".0e")  # 1.0e-08: YAML reads 1e-08 as a string
    return str(value)


def _allowed(node: dict, root: dict) -> str:
    parts: list[str] = []
    for branch in _branches(node, root):
        parts += _constraints(branch)
    if isinstance(node.get("items"), dict):
        items = _resolve(node["items"], root)
        parts += [f"each {c}" for c in _constraints(items)]
    if node.get("minItems"):
        parts.append(f"at least {node['minItems']} item{'s' if node['minItems'] > 1 else ''}")
    if node.get("uniqueItems"):
        parts.append("no repeats")
    return "; ".join(dict.fromkeys(parts))


def _constraints(node: dict) -> list[str]:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{_literal(v)}`" for v in node["enum"]))
    bounds = [("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")]
    limits = [f"{sign} {_literal(node[name])}" for name, sign in bounds if name in node]
    if limits:
        parts.append(", ".join(limits))
    if node.get("minLength"):
        parts.append("non-empty" if node["minLength"] == 1 else f"at least {node['minLength']} characters")
    if "pattern" in node:
        parts.append(f"matches `{node['pattern']}`")
    return parts


def _describe(node: dict) -> str:
    return _sentence(node.get("description", "")) if node.get("description") else ""


def _sentence(text: str) -> str:
    return " ".join(str(text).split())


def _join(first: str, second: str) -> str:
    return "; ".join(p for p in (first, second) if p)


def _table(rows: list[list[str]]) -> str:
    lines = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.stdout.write(render(load_schema()))


if __name__ == "__main__":
    main()
