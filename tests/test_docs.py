"""The docs stay true to the files they show: every included table equals its report's table,
every include names a benchmark command that exists, the README stays a front page, and the
MkDocs site builds without a warning (a broken link or a page missing from the nav fails)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from repository import REPO

#: ``<!-- include: reports/X.md[#N] (python -m benchmarks.Y ...) -->`` ... ``<!-- end include -->``
#: (``release.Y`` for a release build)
#: (each marker on a line of its own)
INCLUDE = re.compile(
    r"^<!-- include: (?P<path>\S+?)(?:#(?P<table>\d+))? \((?P<command>[^)]+)\) -->\n"
    r"(?P<body>.*?)"
    r"^<!-- end include -->$",
    re.DOTALL | re.MULTILINE,
)
OPENING = re.compile(r"^<!-- include:", re.MULTILINE)
README_LIMIT = 12 * 1024


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def tables(text: str) -> list[str]:
    """The Markdown tables of ``text`` in order, each as its lines joined by newlines."""
    found: list[list[str]] = []
    previous_is_table = False
    for line in text.splitlines():
        is_table = line.startswith("|")
        if is_table and not previous_is_table:
            found.append([])
        if is_table:
            found[-1].append(line)
        previous_is_table = is_table
    return ["\n".join(lines) for lines in found]


def includes(text: str) -> list[re.Match[str]]:
    opened = len(OPENING.findall(text))
    blocks = list(INCLUDE.finditer(text))
    assert len(blocks) == opened, "an include marker is malformed or has no end marker"
    return blocks


def benchmark_exists(command: str) -> bool:
    """Whether ``command`` is ``python -m FOLDER.NAME ...`` of a module in benchmarks/ or
    release/ (the commands that write reports)."""
    match = re.fullmatch(r"python -m (benchmarks|release)\.(\w+)( .*)?", command)
    return bool(match) and (REPO / match.group(1) / f"{match.group(2)}.py").is_file()


def test_the_table_parser_splits_tables() -> None:
    text = "a\n| x |\n|---|\n| 1 |\n\ntext\n| y |\n|---|\n"
    assert tables(text) == ["| x |\n|---|\n| 1 |", "| y |\n|---|"]


def test_an_include_without_an_end_is_an_error() -> None:
    with pytest.raises(AssertionError):
        includes("<!-- include: reports/a.md (python -m benchmarks.results) -->\n| x |\n")


def test_the_command_check_needs_an_existing_benchmark() -> None:
    assert benchmark_exists("python -m benchmarks.results")
    assert benchmark_exists("python -m benchmarks.candidates --real")
    assert benchmark_exists("python -m release.pretrained")
    assert not benchmark_exists("python -m release.no_such_build")
    assert not benchmark_exists("python -m benchmarks.no_such_benchmark")
    assert not benchmark_exists("make results")


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_each_included_table_equals_its_report(page: Path) -> None:
    for block in includes(page.read_text(encoding="utf-8")):
        source = REPO / block["path"]
        assert source.is_file(), f"{block['path']} does not exist"
        assert benchmark_exists(block["command"]), f"no benchmark runs {block['command']!r}"
        found = tables(source.read_text(encoding="utf-8"))
        index = int(block["table"] or 1) - 1
        assert index < len(found), f"{block['path']} has {len(found)} tables"
        if block["table"] is None:
            assert len(found) == 1, f"{block['path']} has {len(found)} tables: name one (#N)"
        assert block["body"].strip() == found[index], (
            f"{page.name}: the table of {block['path']} changed; copy it again"
        )


def test_every_report_table_in_the_docs_is_an_include() -> None:
    """A results table typed by hand would go stale: each report table shown is included."""
    report_tables = {
        table
        for report in (REPO / "reports").glob("*.md")
        for table in tables(report.read_text(encoding="utf-8"))
    }
    for page in markdown_files():
        text = INCLUDE.sub("", page.read_text(encoding="utf-8"))
        stray = [t.splitlines()[0] for t in tables(text) if t in report_tables]
        assert stray == [], f"{page.name}: a report table outside an include block"


def test_the_readme_is_a_front_page() -> None:
    size = (REPO / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}"


def test_the_pictures_stay_small() -> None:
    sizes = {p.name: p.stat().st_size for p in (REPO / "docs" / "images").glob("*.png")}
    assert "grounding-1000268201.png" in sizes
    assert {name: size for name, size in sizes.items() if size > 300 * 1024} == {}


def test_the_readme_links_point_at_files() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "the README links no page"
    # the pages other issues write are linked before they exist; the coordinator adds them
    pending = {
        "docs/reproducibility.md",
        "docs/collaboration.md",
        "docs/experiments.md",
        "docs/inference.md",
        "docs/annotation.md",
    }
    missing = [t for t in local if not (REPO / t).exists() and t not in pending]
    assert missing == []


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip('mkdocs-material is not installed (pip install -e ".[dev]" installs it)')
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    assert (tmp_path / "index.html").is_file()
    assert (tmp_path / "images" / "grounding-1000268201.png").is_file()
