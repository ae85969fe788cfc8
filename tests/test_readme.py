"""The docs stay true to the tree: the layout block of docs/architecture.md lists exactly the
package's modules."""

from __future__ import annotations

import re

from repository import REPO

MARKER = "<!-- layout: checked against src/grounding by tests/test_readme.py -->"


def layout_files(readme: str) -> set[str]:
    """The files of the layout block, as paths below ``src/grounding``: each line is
    an indented name (a folder ends in ``/``) and an optional description."""
    block = readme.split(MARKER, 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()[1:]  # the first line is src/grounding/ itself
    folders: list[tuple[int, str]] = []
    files = set()
    for line in lines:
        match = re.match(r"^( +)(\S+)", line)
        assert match, f"not a layout line: {line!r}"
        depth, name = len(match.group(1)) // 2, match.group(2)
        folders = [(d, f) for d, f in folders if d < depth]
        prefix = "".join(f for _, f in folders)
        if name.endswith("/"):
            folders.append((depth, name))
        else:
            files.add(prefix + name)
    return files


def test_the_layout_section_lists_every_module_and_no_other() -> None:
    readme = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    package = REPO / "src" / "grounding"
    actual = {path.relative_to(package).as_posix() for path in package.rglob("*.py")}
    listed = layout_files(readme)
    assert listed - actual == set(), "listed in docs/architecture.md but not in the package"
    assert actual - listed == set(), "in the package but missing from docs/architecture.md's layout"


def test_the_layout_parser_reads_nesting() -> None:
    readme = f"{MARKER}\n```text\nsrc/grounding/\n  a.py  x\n  io/\n    b.py\n  c.py\n```\n"
    assert layout_files(readme) == {"a.py", "io/b.py", "c.py"}
