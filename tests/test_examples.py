"""The README's quickstart runs (its wiring, in --fast mode) and writes the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_quickstart_prunes_distils_quantizes_and_reports(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--fast", "--quantize", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "vitcompress_benchmark.json").read_text())
    assert report["final"]["params"] < 0.3 * report["baseline"]["params"]
    assert report["ratios"]["size_ratio"] < 0.2  # pruned to a quarter, then int8
    assert "report written to" in proc.stdout


def test_readme_without_a_trainer_snippet_runs():
    """The README's functional example, as written: prune, swap, quantize and compare, no Trainer."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = readme.split("## Without a Trainer", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    report = namespace["report"]
    assert report["final"]["params"] < 0.7 * report["baseline"]["params"]
    assert report["final"]["size_mb"] < 0.5 * report["baseline"]["size_mb"]


def test_reload_formats_example_runs():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "reload_formats.py")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "difference" in line]
    assert len(rows) >= 19  # 4 models x 5 formats, less what safetensors refuses
    assert all(float(row.rsplit(" ", 2)[-2]) < 1e-4 for row in rows)


def test_transformers_example_compresses_and_reloads(tmp_path):
    import pytest

    pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "transformers_example.py"),
            "--fast",
            "--epochs",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "reload gives the same logits: True" in proc.stdout
    report = json.loads((tmp_path / "vitcompress_benchmark.json").read_text())
    assert report["final"]["params"] < 0.35 * report["baseline"]["params"]


def test_readme_models_snippet_prunes_every_family():
    import pytest

    pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = readme.split("## Models", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    ratios = namespace["ratios"]
    assert set(ratios) == {"timm", "torchvision", "transformers"}
    assert all(0.2 < ratio < 0.4 for ratio in ratios.values()), ratios
