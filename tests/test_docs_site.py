"""The documentation site's generated pages: a reference page for every registered name, and every
relative link of the hand-written pages pointing at a page or file the site has."""

from __future__ import annotations

import posixpath
import runpy
from pathlib import Path

import mtlkit as mk
from mtlkit.estimators import ESTIMATORS
from mtlkit.merging import MERGERS
from mtlkit.pareto import APPROACHES

ROOT = Path(__file__).resolve().parents[1]
generator = runpy.run_path(str(ROOT / "scripts" / "gen_docs_pages.py"), run_name="gen_docs_pages")
PAGES = generator["pages"]()


def test_every_registered_name_has_a_reference_page():
    expected = (
        [f"reference/methods/{n}.md" for n in mk.methods.available()]
        + [f"reference/models/{n}.md" for n in mk.models.available()]
        + [f"reference/merging/{n}.md" for n in MERGERS.available()]
        + [f"reference/estimators/{n}.md" for n in ESTIMATORS.available()]
        + [f"reference/fronts/{n}.md" for n in APPROACHES]
    )
    missing = [p for p in expected if p not in PAGES]
    assert missing == []
    epo = PAGES["reference/methods/epo.md"]
    assert "| `eps` | `0.0001` |" in epo and "::: mtlkit.methods.epo.EPO" in epo
    assert "K=40:" in PAGES["reference/methods/mgda.md"]  # the measured cost, from the committed table
    assert "270,338 parameters" in PAGES["reference/models/mmoe.md"]  # from census_architectures.json
    assert "0.347 of a dense ViT's FLOPs" in PAGES["reference/models/m3vit.md"]
    assert "0.73x sklearn GB" in PAGES["reference/estimators/rmtgb_regressor.md"]


def test_every_relative_link_resolves_inside_the_site():
    docs_pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    site = set(PAGES) | docs_pages
    broken = []
    for path, text in PAGES.items():
        if not isinstance(text, str) or not path.endswith(".md"):
            continue
        for target in generator["_links"](text):
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
            if resolved not in site and not (resolved.endswith("/") or (ROOT / "docs" / resolved).is_dir()):
                broken.append(f"{path} -> {target}")
    assert broken == []
