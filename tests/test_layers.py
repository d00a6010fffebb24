"""The package's floors: ``functional`` is pure torch/torchao, callbacks sit on top, examples use public names."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import lightning_vitcompress

PACKAGE = pathlib.Path(lightning_vitcompress.__file__).parent
ROOT = PACKAGE.parent


def _imported_modules(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_functional_imports_neither_lightning_nor_the_callbacks():
    # by import: with lightning made unimportable, the whole functional layer still loads
    code = (
        "import sys\n"
        "for name in ('lightning', 'lightning.pytorch', 'pytorch_lightning', 'lightning_fabric'):\n"
        "    sys.modules[name] = None\n"
        "import lightning_vitcompress.functional as F\n"
        "from lightning_vitcompress.functional import nystrom, prune, quantize, distill, report, measure, x86_int8\n"
        "assert not [m for m in sys.modules if m.startswith('lightning_vitcompress.callbacks')], 'callbacks imported'\n"
        "print(len(F.__all__))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    # and by reading the sources: no module of the layer names lightning or the callbacks
    for path in (PACKAGE / "functional").glob("*.py"):
        bad = {m for m in _imported_modules(path) if m.split(".")[0] in ("lightning", "pytorch_lightning")}
        bad |= {m for m in _imported_modules(path) if m.startswith("lightning_vitcompress.callbacks")}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_callbacks_are_public_and_lazily_loaded():
    code = (
        "import sys\n"
        "import lightning_vitcompress\n"
        "assert 'lightning_vitcompress.callbacks' not in sys.modules\n"
        "from lightning_vitcompress import PruningSchedule\n"
        "assert PruningSchedule.__module__ == 'lightning_vitcompress.callbacks.pruning'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in lightning_vitcompress.__all__:
        assert getattr(lightning_vitcompress, name) is not None, name


def test_examples_and_benchmarks_use_public_names_only():
    offenders = []
    for folder in ("examples", "benchmarks"):
        for path in (ROOT / folder).glob("*.py"):
            for module in _imported_modules(path):
                parts = module.split(".")
                if parts[0] == "lightning_vitcompress" and any(part.startswith("_") for part in parts[1:]):
                    offenders.append(f"{folder}/{path.name}: {module}")
    assert not offenders, offenders
