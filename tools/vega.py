"""Refresh the offline page of `dvc plots show` / `dvc plots diff`: vega, vega-lite and
vega-embed from their npm packages, inlined into DVC's HTML template `.dvc/plots/index.html`
(`plots.html_template` in `.dvc/config`), their licences beside it.

DVC's own page loads the three scripts from a CDN and draws nothing offline. Inlining them
keeps the page whole wherever `dvc plots show -o DIR` writes it (a relative `src` would break
under another output folder). Run from the repository root (needs `npm`, reaches only the
npm registry):

    python tools/vega.py                       # the pinned versions below
    python tools/vega.py --vega 5.33.1 --vega-lite 5.23.0 --vega-embed 6.29.0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: DVC's plot templates write Vega-Lite v5 specs: vega-lite 5, and the vega and vega-embed
#: majors it goes with.
VERSIONS = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}
TEMPLATE = Path(".dvc/plots/index.html")
LICENSES = Path(".dvc/plots/licenses")
#: DVC fills these placeholders with str.replace: a script holding one would be corrupted.
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

BSD_3_CLAUSE = """The npm package ships no LICENSE file; its package.json declares BSD-3-Clause:

Copyright (c) {holder}
All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this list of
   conditions and the following disclaimer.
2. Redistributions in binary form must reproduce the above copyright notice, this list of
   conditions and the following disclaimer in the documentation and/or other materials provided
   with the distribution.
3. Neither the name of the copyright holder nor the names of its contributors may be used to
   endorse or promote products derived from this software without specific prior written
   permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR
IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND
FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR
CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE,
DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER
IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT
OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {credits}: from npm, inlined by tools/vega.py
         (licences: .dvc/plots/licenses/); the page has no placeholder for DVC's CDN scripts -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, version in VERSIONS.items():
        parser.add_argument(f"--{name}", default=version, help=f"npm version (default {version})")
    return parser.parse_args(argv)


def fetch(package: str, version: str, into: Path) -> Path:
    """``npm pack`` one package (the registry checks its integrity) and unpack it; returns
    the unpacked ``package/`` folder."""
    done = subprocess.run(
        ["npm", "pack", f"{package}@{version}", "--json", "--pack-destination", str(into)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"error: npm pack {package}@{version} failed:\n{done.stderr.strip()}")
    tarball = into / json.loads(done.stdout)[0]["filename"]
    target = into / package
    with tarfile.open(tarball) as archive:
        archive.extractall(target, filter="data")
    return target / "package"


def script(package: Path, name: str) -> str:
    """The package's ``build/<name>.min.js``, checked to be safe to inline."""
    text = (package / "build" / f"{name}.min.js").read_text(encoding="utf-8")
    for marker in (*PLACEHOLDERS, "</script"):
        if marker in text:
            sys.exit(f"error: {name}.min.js holds {marker!r}: it cannot be inlined")
    return f"    <script>{text}</script>"


def licence(package: Path, name: str, version: str) -> str:
    """The package's LICENSE, or (vega ships none in its npm package) what its package.json
    declares."""
    shipped = package / "LICENSE"
    manifest = json.loads((package / "package.json").read_text(encoding="utf-8"))
    header = f"{name} {version} (npm), licence: {manifest['license']}\n\n"
    if shipped.exists():
        return header + shipped.read_text(encoding="utf-8")
    author = manifest.get("author")
    holder = author.get("name") if isinstance(author, dict) else author
    if manifest["license"] != "BSD-3-Clause":
        sys.exit(f"error: {name} ships no LICENSE and declares {manifest['license']}: check it")
    # BSD-3-Clause asks for its text beside the code: the SPDX text, the package's author
    return header + BSD_3_CLAUSE.format(holder=holder)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    versions = {name: getattr(args, name.replace("-", "_")) for name in VERSIONS}
    LICENSES.mkdir(parents=True, exist_ok=True)
    scripts = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, version in versions.items():
            package = fetch(name, version, Path(scratch))
            scripts.append(script(package, name))
            (LICENSES / f"{name}.txt").write_text(licence(package, name, version))
    credits = ", ".join(f"{name} {version}" for name, version in versions.items())
    TEMPLATE.write_text(PAGE.format(credits=credits, scripts="\n".join(scripts)))
    print(f"wrote {TEMPLATE} ({credits})")


if __name__ == "__main__":
    main()
