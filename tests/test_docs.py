"""The README stays a page a newcomer reads, the manual (docs/, mkdocs.yml) holds the rest.

`make docs` builds the site with ``mkdocs build --strict`` (CI runs it: a broken link or anchor in
docs/ fails there); these tests check what mkdocs does not: the README's own links and size, that its
at-a-glance tables are copies of the manual's, that every page and picture is reachable, that the
generated configuration reference is current, and that every `README "SECTION"` a code or config
comment names can still be found.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    """Every page of the manual; docs/reports is a link to reports/ (the ablation reports)."""
    return sorted(p for p in DOCS.rglob("*.md") if "reports" not in p.relative_to(DOCS).parts)


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug of a heading (what GitHub and mkdocs both link to here)."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[\s]+", "-", text)


def _table_after(text: str, marker: str) -> str:
    """The first markdown table after ``marker``."""
    rest = text[text.index(marker) :]
    lines = rest.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


@pytest.fixture
def config_reference(monkeypatch):
    """tools/config_reference.py as a module (tools/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "tools" / "config_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "config_reference", module)  # its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


def test_readme_fits_in_a_head():
    n = len(README.read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines: move sections into docs/ (the manual), keep <= 300"


def test_readme_links_resolve():
    text = README.read_text()
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            assert anchor in anchors, f"README links to #{anchor}, which is no heading of it"
        else:
            assert (ROOT / path).exists(), f"README links to {path}, which does not exist"


def test_readme_tables_are_copies_of_the_manuals():
    readme = README.read_text()
    results = (DOCS / "explanation" / "results.md").read_text()
    demo = _table_after(readme, "### `make demo`")
    assert "| conversion | two-tower (served: with the blend) |" in demo
    assert demo == _table_after(results, "## `make demo`"), "README's demo table differs from results.md"
    groups = _table_after(readme, "## Config groups at a glance")
    assert "| `model/head` |" in groups
    assert groups == _table_after((DOCS / "reference" / "config-groups.md").read_text(), "# Config groups")


def test_every_page_and_picture_is_reachable():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def nav_files(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [f for item in node for f in nav_files(item)]
        return [f for value in node.values() for f in nav_files(value)]

    in_nav = set(nav_files(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in _pages()}
    assert pages - in_nav == set(), "pages of docs/ missing from mkdocs.yml's nav"
    assert in_nav - pages == set(), "mkdocs.yml's nav names pages that do not exist"
    linked = {
        (page.parent / target.partition("#")[0]).resolve()
        for page in _pages()
        for target in LINK.findall(page.read_text())
    }
    others = [p for p in DOCS.rglob("*") if p.is_file() and p.suffix != ".md" and "reports" not in p.parts]
    assert others, "docs/ holds the MLflow UI screenshots"
    for path in others:
        assert path.resolve() in linked, f"{path.relative_to(ROOT)} is linked from no page of the manual"


def test_config_reference_is_current(config_reference):
    page = config_reference.render()
    assert (DOCS / "reference" / "config.md").read_text() == page, (
        "docs/reference/config.md is not what conf/ says: run `python tools/config_reference.py`"
    )
    # every option file of conf/ has its section, with its keys
    for path in (ROOT / "conf").rglob("*.yaml"):
        assert f"File `{path.relative_to(ROOT).as_posix()}`" in page
    assert "| `data.batch_size` | `1024` |" in page
    assert "| `loss.task_weights.conversion` | `1.0` |" in page


def test_config_reference_reads_comments(config_reference):
    module = config_reference
    rows = {row.path: row for row in module.read_config(ROOT / "conf" / "loss" / "sampled_softmax.yaml").rows}
    assert rows["advertiser_weight"].comment.startswith("> 0 adds the advertiser-level softmax")
    assert rows["task_weights.engagement"].value == "`0.3`"
    assert module._split_comment("a: 'x # y'  # z") == ("a: 'x # y'", "z")
    assert module._escape("a | b `c | d` *e*") == "a \\| b `c \\| d` \\*e\\*"


def test_readme_section_references_resolve():
    """A comment naming `README "SECTION"` finds SECTION in the README or in its map of moved sections."""
    readme = README.read_text()
    names = [h.strip() for h in re.findall(r"^#+ (.+)$", readme, flags=re.M)]
    moved = readme[readme.index("### Where the README's former sections went") :]
    for row in re.findall(r"^\| (.+?) \| .+\|$", moved, flags=re.M):
        names += [name.strip() for name in row.split(";")]
    reference = re.compile(r"README(?:'s)?[\s,:(]*\"([^\"]+)\"")
    files = [ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / ".ci" / "run"]
    for folder in ("convcg_cli", "conf", "data_schemas", "tests", "tools"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml")]
    found = 0
    for path in files:
        if path == Path(__file__).resolve():
            continue
        for name in reference.findall(path.read_text()):
            found += 1
            assert any(n.startswith(name) for n in names), (
                f'{path.relative_to(ROOT)}: README "{name}" not found'
            )
    assert found, "the code names README sections; this test checks them"
