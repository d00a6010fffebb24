"""Smoke of every callback and the functional API, run by ``.ci/run`` in the floors environment.

The environment is pinned to the lowest versions ``pyproject.toml`` allows (``.ci/floors.txt``), so
a pass here is what makes those floors true. It needs only the core dependencies: a tiny timm ViT,
random batches, one epoch per fit, CPU. Runs every step and exits non-zero if any failed;
words on the command line run only the steps whose names contain one of them::

    python .ci/smoke_floors.py              # everything
    python .ci/smoke_floors.py Pruning      # only the steps that prune
    python .ci/smoke_floors.py --at-floors  # first check that each core dependency is at its floor
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import lightning as L
import torch
from packaging.version import Version
from torch.utils.data import DataLoader, TensorDataset

import lightning_vitcompress as lvc
from lightning_vitcompress._versions import declared_requirements
from lightning_vitcompress.digits import DigitsClassifier, small_vit
from lightning_vitcompress.functional import (
    ExportConfig,
    NystromConfig,
    PruneConfig,
    TokenMergingConfig,
    export_compressed,
    load_artifact,
    merge_tokens,
    prune_vit,
    quantize_model,
    swap_attention,
)

#: 64 wide, so the pruned layers stay over 16 input features (torchao < 0.18 leaves those unquantized)
TINY = dict(embed_dim=64, depth=2, num_heads=4)


def batches(n: int = 32) -> DataLoader:
    """Random 32x32 images and digit labels: the smoke checks that things run, not what they learn."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def fit(folder: Path, callbacks: list) -> tuple[DigitsClassifier, Path]:
    """One short epoch of the tiny classifier with ``callbacks``; returns it and its last checkpoint."""
    L.seed_everything(0, verbose=False)
    module = DigitsClassifier(**TINY)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        callbacks=callbacks,
    )
    trainer.fit(module, batches(), batches(8))
    checkpoint = folder / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    return module, checkpoint


def check_reload(module: DigitsClassifier, checkpoint: Path, tolerance: float = 1e-3) -> None:
    """``load_compressed`` rebuilds the compressed model: the same output on the same input."""
    x = torch.randn(2, 3, 32, 32)
    loaded = lvc.load_compressed(DigitsClassifier, checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.eval()(x), rtol=tolerance, atol=tolerance)


def fit_pipeline(folder: Path) -> None:
    teacher = small_vit(embed_dim=48, depth=2, num_heads=4).eval()
    module, checkpoint = fit(
        folder,
        [
            lvc.PruningSchedule(0.5),
            lvc.DistillationTeacher(teacher, mode="soft", alpha=0.5, temperature=2.0),
            lvc.NystromSwap(num_landmarks=16),
            lvc.QuantizeOnFit("int8_dynamic"),
            lvc.BenchmarkCallback(
                batch_size=4,
                devices=("cpu",),
                rounds=1,
                min_run_time=0.02,
                latency_repeats=1,
                accuracy_batches=1,
                plot=False,
                output_dir=folder,
            ),
        ],
    )
    assert type(module.model.blocks[0].attn).__name__ == "NystromAttention"
    assert type(module.model.blocks[0].mlp.fc1.weight) is not torch.nn.Parameter  # a torchao tensor subclass
    check_reload(module, checkpoint)


def fit_default_quantization(folder: Path) -> None:
    module, checkpoint = fit(folder, [lvc.TokenMerging(r=4), lvc.QuantizeOnFit()])
    check_reload(module, checkpoint, tolerance=2e-2)  # the x86 default may run in bf16


def fit_export(folder: Path) -> None:
    module, _ = fit(folder, [lvc.ExportOnFit(folder / "vit.pt2")])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_artifact(folder / "vit.pt2")(x), module.eval()(x), rtol=1e-3, atol=1e-3)


def functional(folder: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    vit = small_vit(**TINY).eval()
    before = sum(p.numel() for p in vit.parameters())
    # whole heads out, the embedding kept: attention narrower than the residual stream (timm < 1.0.23 cannot run it)
    prune_vit(vit, PruneConfig(0.5, prune_heads=True, prune_embed_dim=False), x)
    assert sum(p.numel() for p in vit.parameters()) < before
    assert vit.blocks[0].attn.qkv.out_features // 3 < vit.embed_dim
    swap_attention(vit, NystromConfig(num_landmarks=16), blocks=[-1])
    merge_tokens(vit, TokenMergingConfig(r=4), example_input=x)
    export_compressed(vit, folder / "functional.pt2", x, ExportConfig(format="pt2"))
    quantize_model(vit, "int8_dynamic", example_input=x)
    with torch.no_grad():
        assert vit(x).shape == (2, 10)


STEPS: dict[str, Callable[[Path], None]] = {
    "fit: PruningSchedule + Distillation + NystromSwap + QuantizeOnFit('int8_dynamic') + Benchmark": fit_pipeline,
    "fit: TokenMerging + QuantizeOnFit() (the default config)": fit_default_quantization,
    "fit: ExportOnFit('.pt2')": fit_export,
    "functional: prune_vit, swap_attention, merge_tokens, export_compressed, quantize_model": functional,
}


def off_floor() -> list[str]:
    """The core dependencies whose installed version is not the floor ``pyproject.toml`` declares (``>=X``)."""
    wrong = []
    for requirement in declared_requirements():
        floors = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
        installed = Version(version(requirement.name))
        if floors and Version(installed.public) != floors[0]:  # a local label (2.14.1+cpu) is the same release
            wrong.append(f"{requirement.name} {installed} (floor {floors[0]})")
    return wrong


def main(args: list[str]) -> int:
    only = [word for word in args if word != "--at-floors"]
    steps = {name: step for name, step in STEPS.items() if not only or any(word in name for word in only)}
    torch.set_num_threads(2)
    requirements = declared_requirements()
    print("versions:", ", ".join(f"{r.name} {version(r.name)}" for r in requirements), flush=True)
    if not requirements:
        print("lightning-vitcompress is not installed: no floors to read", file=sys.stderr)
        return 1
    if "--at-floors" in args and off_floor():
        print(f"not at the floors of pyproject.toml: {', '.join(off_floor())}", file=sys.stderr)
        return 1
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, step) in enumerate(steps.items()):
            start = time.perf_counter()
            folder = Path(tmp) / str(i)
            folder.mkdir()
            try:
                step(folder)
            except Exception:
                traceback.print_exc()
                failed.append(name)
                print(f"FAIL {name}", flush=True)
            else:
                print(f"ok   {name} ({time.perf_counter() - start:.0f}s)", flush=True)
    if failed:
        print(f"{len(failed)} of {len(steps)} smoke steps failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
