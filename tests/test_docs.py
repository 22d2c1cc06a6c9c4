"""The docs stay true: the generated config reference is current, the README is short and its links resolve."""
import re
from pathlib import Path

import pytest

from lmforge.config_doc import load_schema, render

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_config_reference_is_generated_from_the_current_schema():
    committed = (REPO / "docs/config.md").read_text()
    assert committed == render(load_schema()), (
        "docs/config.md is out of date with lib/lmforge/config.schema.yaml: run `make docs` and commit it")


def test_config_reference_has_a_row_for_every_key():
    schema = load_schema()
    page = render(schema)

    def keys(node, prefix=""):
        for branch in node.get("anyOf", [node]):
            for name, sub in branch.get("properties", {}).items():
                yield prefix + name
                yield from keys(sub, prefix + name + ".")

    def rendered(key):  # sibling objects with one schema are listed once, as <name>
        parts = key.split(".")
        names = [key] + [".".join([*parts[:i], "<name>", *parts[i + 1:]]) for i in range(len(parts))]
        return any(f"| `{name}` |" in page for name in names)

    for section, sub in schema["properties"].items():
        assert f"## `{section}`" in page or rendered(section)
        for key in keys(sub):
            assert rendered(key), f"{section}.{key} is missing from the reference"


def test_references_and_all_of_are_followed():
    schema = {"$defs": {"lr": {"type": "number", "default": 1.0e-8, "description": "step size"}},
              "properties": {"opt": {"type": "object", "allOf": [{"properties": {"lr": {"$ref": "#/$defs/lr"}}}],
                                     "properties": {"name": {"enum": ["a", "b"], "default": "a"}}}}}
    page = render(schema)
    assert "| `lr` | number | `1.0e-08` |  | step size |" in page
    assert "| `name` | string | `a` | one of `a`, `b` |  |" in page


def test_readme_is_a_short_front_door():
    assert len((REPO / "README.md").read_text()) < 15_000


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))])
def test_relative_links_point_to_files_that_exist(page):
    path = REPO / page
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor in the same page
        assert (path.parent / target.split("#")[0]).exists(), f"{page} links to {target}, which does not exist"
