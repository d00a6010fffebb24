"""Make torch, installed in one environment, importable from another without a second copy.

torch's wheel carries about 5 GB of CUDA libraries; the floors environment (.ci/floors) needs exactly the
torch the test environment has (its floor is that version), so it links torch and the packages torch
depends on (their files and metadata, nothing else) into a folder and puts that folder on its path.
pip then sees torch as installed and resolves the other floors against it.

Usage: python share_torch.py SOURCE_PYTHON TARGET_SITE_PACKAGES
"""

import json
import os
import subprocess
import sys
from pathlib import Path

CLOSURE = r"""
import importlib.metadata as md, json, re
from packaging.requirements import Requirement
seen, todo, out = set(), ["torch"], {}
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen:
        continue
    seen.add(name)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    tops = {str(f).split("/")[0] for f in (dist.files or []) if not str(f).startswith("..")}
    out[name] = sorted(str(dist.locate_file(t)) for t in tops if t not in ("__pycache__",) and not t.endswith(".pth"))
    for req in dist.requires or []:
        r = Requirement(req)
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            todo.append(r.name)
print(json.dumps(out))
"""


def main(source_python: str, target_site: str) -> None:
    closure = json.loads(subprocess.check_output([source_python, "-c", CLOSURE], text=True))
    shared = Path(target_site) / "_shared_torch"
    shared.mkdir(exist_ok=True)
    for paths in closure.values():
        for path in map(Path, paths):
            link = shared / path.name
            if path.exists() and not link.exists():
                os.symlink(path, link)
    (Path(target_site) / "zz_shared_torch.pth").write_text(f"{shared}\n")
    print(f"shared from {source_python}: {', '.join(sorted(closure))}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
