"""The offline page of `dvc plots show` / `dvc plots diff`: `.dvc/config` names the template
that tools/vega.py writes, and the template loads nothing from the network."""

from __future__ import annotations

import configparser
import re

from conftest import REPO_ROOT

TEMPLATE = REPO_ROOT / ".dvc" / "plots" / "index.html"


def test_dvc_config_names_the_vendored_template() -> None:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / ".dvc" / "config")
    assert (REPO_ROOT / ".dvc" / config["plots"]["html_template"]).resolve() == TEMPLATE


def test_the_template_inlines_vega_and_fetches_nothing() -> None:
    page = TEMPLATE.read_text(encoding="utf-8")
    assert "{plot_divs}" in page  # where DVC puts the plots
    assert "{scripts}" not in page  # DVC's CDN script tags would go there
    assert not re.search(r"<script[^>]*\bsrc=", page)
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(scripts) == 3
    for name, global_name in (
        ("vega", ".vega="),
        ("vega-lite", ".vegaLite="),
        ("vega-embed", ".vegaEmbed="),
    ):
        assert any(global_name in script for script in scripts), name
        licence = REPO_ROOT / ".dvc" / "plots" / "licenses" / f"{name}.txt"
        assert "BSD-3-Clause" in licence.read_text(encoding="utf-8")
