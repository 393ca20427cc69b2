"""The README and docs/ hold together: every relative link leads to a file and, with an anchor,
to a heading there; the generated pages (the configuration reference, the results.json JSON
Schema) are current; the README stays short."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ensemble.config.docs import reference_page
from ensemble.core.results import json_schema

from .conftest import REPO

PAGES = [REPO / "README.md", REPO / "slurm" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here (no network)
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


def test_every_relative_link_leads_somewhere():
    bad = {str(p.relative_to(REPO)): b for p in PAGES if (b := broken_links(p))}
    assert not bad, bad


def test_the_link_checker_sees_a_broken_link(tmp_path: Path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page.write_text(
        "# Page\n\n[ok](other.md#a-section) [gone](missing.md) [no heading](other.md#nope) [self](#page)\n"
    )
    assert [line.split(":")[0] for line in broken_links(page)] == ["missing.md", "other.md#nope"]


def test_the_configuration_reference_is_current():
    """docs/configuration.md is written from the config's field docstrings (the text of --help):
    regenerate it with `python -m ensemble.config.docs` after changing a field."""
    assert (REPO / "docs" / "configuration.md").read_text() == reference_page()


def test_the_results_schema_is_current():
    """docs/results.schema.json is the JSON Schema of ensemble/core/results.py: regenerate it with
    `python -m ensemble.core.results` after changing a type."""
    assert json.loads((REPO / "docs" / "results.schema.json").read_text()) == json_schema()


def test_the_readme_is_short_and_links_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme)}
    pages = {p.name for p in (REPO / "docs").iterdir()}
    assert pages <= linked, f"docs/ pages the README does not link: {sorted(pages - linked)}"
