"""The package's import graph has no cycle, and loading a checkpoint needs nothing but ``import lightning_vitcompress``.

The graph counts every import statement of a package module that runs:
top-level ones and those inside functions (a lazy import that closes a cycle
is still a cycle: ``_structure`` once reached the techniques that import it
that way). Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from helpers import TINY

from lightning_vitcompress.digits import DigitsClassifier
from lightning_vitcompress.functional import prune_vit, quantize_model, swap_attention

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_vitcompress"


def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package (a package by its ``__init__.py``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def _imported(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The package modules ``tree`` imports anywhere, but under ``if TYPE_CHECKING:``."""
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if _is_type_checking(node):
            continue  # its else branch (rare) is ignored too
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            for alias in node.names:  # ``from package import module`` imports the module
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
        found |= _imported(node, modules)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(ast.parse(path.read_text()), modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``[]``."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        path.append(node)
        for child in sorted(graph[node]):
            cycle = visit(child)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return []

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return []


def test_find_cycle_sees_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_graph_reads_lazy_and_skips_type_checking_imports() -> None:
    graph = import_graph()
    assert "lightning_vitcompress._registry" in graph["lightning_vitcompress._structure"]
    layers = graph["lightning_vitcompress.functional.quantize_layers"]
    assert "lightning_vitcompress.functional.quantize_configs" not in layers  # only under TYPE_CHECKING
    assert "lightning_vitcompress.functional.x86_int8" in graph["lightning_vitcompress.functional.prune"]  # lazy


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_layers_import_downwards() -> None:
    """``models`` < ``functional`` < ``callbacks``: a layer never imports one above it."""
    rank = {"models": 0, "functional": 1, "callbacks": 2}
    layer = {name: rank.get(name.split(".")[1] if name.count(".") else "") for name in import_graph()}
    upward = [
        f"{name} -> {target}"
        for name, targets in import_graph().items()
        for target in targets
        if layer[name] is not None and layer[target] is not None and layer[target] > layer[name]
    ]
    assert not upward, upward


def test_structure_modules_import_no_technique() -> None:
    graph = import_graph()
    for module in ("_registry", "_structure", "_state_dict_structure", "_checkpoint_file"):
        imported = graph[f"lightning_vitcompress.{module}"]
        assert not {name for name in imported if name.startswith("lightning_vitcompress.functional")}, module


def test_load_compressed_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """A bare state dict of a pruned, Nystrom-swapped, quantized ViT: every technique's reader is needed."""
    torch.manual_seed(0)
    module = DigitsClassifier(**TINY).eval()
    images = torch.randn(2, 3, 32, 32)
    prune_vit(module.model, 0.5, images)
    swap_attention(module.model, 8)
    quantize_model(module.model, "int8_dynamic_x86", example_input=images)
    with torch.no_grad():
        torch.save({"images": images, "logits": module(images)}, tmp_path / "expected.pt")
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import lightning_vitcompress
        from lightning_vitcompress.digits import DigitsClassifier
        model = lightning_vitcompress.load_compressed(DigitsClassifier, "weights.pt", **{TINY!r})
        expected = torch.load("expected.pt", weights_only=True)
        with torch.no_grad():
            torch.testing.assert_close(model(expected["images"]), expected["logits"])
        print([edit["kind"] for edit in model.__dict__["_vitcompress_edits"]])  # the records it replayed
        """
    )
    path = os.pathsep.join(filter(None, [str(PACKAGE.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "['prune', 'nystrom', 'quantize']"
