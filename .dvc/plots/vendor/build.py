"""Rebuild .dvc/plots/offline.html (the `dvc plots show` / `dvc plots diff` page) from the npm packages.

The page inlines the minified builds of vega, vega-lite and vega-embed, so a page DVC writes renders with no
network and wherever it is copied (DVC's default page loads them from a CDN). Usage, from the repository root:

    cd /tmp && npm pack vega@5.33.0 vega-lite@5.23.0 vega-embed@6.29.0 && cd -
    python .dvc/plots/vendor/build.py /tmp/vega-5.33.0.tgz /tmp/vega-lite-5.23.0.tgz /tmp/vega-embed-6.29.0.tgz

It writes .dvc/plots/offline.html, .dvc/plots/vendor/<package>.LICENSE (each package's own LICENSE file) and
.dvc/plots/vendor/versions.json (version, npm integrity, sha256 of each inlined file; the tests check it).
"""
from __future__ import annotations

import base64
import hashlib
import json
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = HERE.parent / "offline.html"
PACKAGES = ("vega", "vega-lite", "vega-embed")  # load order: vega-lite needs vega, vega-embed needs both

# DVC fills {refresh_tag} and {plot_divs}; there is no {scripts} placeholder, so DVC adds no CDN <script> tags.
SKELETON = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{refresh_tag}
<title>g2d-bench: training curves (dvc plots)</title>
<!-- Written by `dvc plots show` / `dvc plots diff` from .dvc/plots/offline.html (plots.html_template in
     .dvc/config). Vega, Vega-Lite and Vega-Embed are inlined below (BSD-3-Clause; licences in
     .dvc/plots/vendor/), so this page needs no network. Rebuild: .dvc/plots/vendor/build.py. -->
@SCRIPTS@
<style>
  body { font-family: system-ui, sans-serif; margin: 16px 24px; color: #222; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  p.note { margin: 0 0 16px; color: #555; font-size: 13px; max-width: 1100px; }
  #plots { display: flex; flex-wrap: wrap; gap: 28px 36px; align-items: flex-start; }
</style>
</head>
<body>
<h1>g2d-bench: test metric per epoch</h1>
<p class="note">One chart per (group, dataset) of the suite: one line per method, the mean over seeds, with a band
of &plusmn; 1 std; <code>teacher-&lt;modality&gt;</code> lines are the unimodal teachers. The line
style tells the revision under <code>dvc plots diff</code> (teachers dashed). Click a legend entry to highlight a method;
hover a point for its values. Definitions: <code>plots:</code> in dvc.yaml, template
<code>.dvc/plots/g2d_curves.json</code>.</p>
<div id="plots">
{plot_divs}
</div>
</body>
</html>
"""


def read_package(tgz: Path) -> dict:
    with tarfile.open(tgz) as tar:
        meta = json.load(tar.extractfile("package/package.json"))
        name = meta["name"]
        if name not in PACKAGES:
            raise SystemExit(f"{tgz}: package {name!r} is not one of {PACKAGES}")
        build = tar.extractfile(f"package/build/{name}.min.js").read()
        try:
            licence = tar.extractfile("package/LICENSE").read()
        except KeyError:
            raise SystemExit(f"{tgz}: no package/LICENSE (vega@5.33.1 ships none: use 5.33.0)") from None
    raw = tgz.read_bytes()
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(raw).digest()).decode()
    return {"name": name, "version": meta["version"], "license": meta["license"], "build": build,
            "licence_text": licence, "integrity": integrity}


def script_tag(pkg: dict) -> str:
    js = pkg["build"].decode("utf-8")
    if "</script" in js.lower() or "{plot_divs}" in js or "{refresh_tag}" in js or "{scripts}" in js:
        raise SystemExit(f"{pkg['name']}: the build cannot be inlined as is")
    return f"<script>/* {pkg['name']}@{pkg['version']} build/{pkg['name']}.min.js ({pkg['license']}) */\n{js}\n</script>"


def main(argv: list[str]) -> None:
    pkgs = {p["name"]: p for p in map(read_package, map(Path, argv))}
    missing = [n for n in PACKAGES if n not in pkgs]
    if missing:
        raise SystemExit(f"missing npm tarballs for {missing}; usage: see the docstring")
    page = SKELETON.replace("@SCRIPTS@", "\n".join(script_tag(pkgs[n]) for n in PACKAGES))
    PAGE.write_text(page, encoding="utf-8")
    versions = {}
    for n in PACKAGES:
        p = pkgs[n]
        (HERE / f"{n}.LICENSE").write_bytes(p["licence_text"])
        versions[n] = {"version": p["version"], "license": p["license"], "npm_integrity": p["integrity"],
                       "file": f"package/build/{n}.min.js", "sha256": hashlib.sha256(p["build"]).hexdigest()}
    (HERE / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(f"wrote {PAGE} ({PAGE.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
