"""ExportOnFit / export_compressed: .pt2 (AOTInductor) and .onnx files checked against the live model, loaded
without this library, measured by BenchmarkCallback; bad inputs fail at setup and never lose the model.

AOTInductor compiles take tens of seconds on 2 cores: three .pt2 packages in this file (a pruned + int8 timm
model, a pruned + int8 torchvision model, a Nystrom model through the callback); ONNX carries the rest of the
family coverage.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from families import FamilyClassifier, build_family
from helpers import fast_trainer, run_ddp_script
from torch import nn

from lightning_vitcompress import (
    BenchmarkCallback,
    ExportOnFit,
    NystromSwap,
    PruningSchedule,
    QuantizeOnFit,
    X86Int8StaticLinear,
    export_compressed,
    load_artifact,
)
from lightning_vitcompress.digits import DigitsDataModule
from lightning_vitcompress.functional import NystromConfig, prune_vit, quantize_model, swap_attention
from lightning_vitcompress.functional.export import TOLERANCES, ArtifactMismatchError, _Deployable
from lightning_vitcompress.functional.x86_int8 import cpu_supports_bfloat16

ONNX_MISSING = [
    name for name in ("onnx", "onnxscript", "onnxruntime") if not __import__("importlib.util").util.find_spec(name)
]
needs_onnx = pytest.mark.skipif(
    bool(ONNX_MISSING),
    reason=f"the [export] extra is not installed ({ONNX_MISSING}): pip install onnx onnxscript onnxruntime",
)
BF16 = "bf16-mixed" if cpu_supports_bfloat16() else "32-true"
IMAGES = 32

#: what a server runs: torch (and onnxruntime) only; importing Lightning, this library, timm or torchao fails
LOADER = textwrap.dedent(
    """
    import sys
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning_vitcompress", "timm", "torchao"):
        sys.modules[name] = None  # `import name` now raises ImportError
    import torch

    images = torch.load(sys.argv[1], weights_only=True)
    outputs = {}
    for path in sys.argv[3:]:
        if path.endswith(".pt2"):
            from torch._inductor import aoti_load_package

            runner = aoti_load_package(path)
            outputs[path] = runner(images)
        else:
            import onnxruntime

            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
            outputs[path] = torch.from_numpy(logits)
    for name in ("lightning", "lightning_vitcompress", "timm", "torchao"):
        assert not any(m == name or m.startswith(name + ".") for m in sys.modules if sys.modules[m] is not None), name
    torch.save(outputs, sys.argv[2])
    """
)


def run_without_library(tmp_path: Path, images: torch.Tensor, paths: list[Path]) -> dict[str, torch.Tensor]:
    """Run the files in a fresh process where Lightning, this library, timm and torchao cannot be imported."""
    torch.save(images, tmp_path / "images.pt")
    (tmp_path / "loader.py").write_text(LOADER)
    result = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "loader.py"),
            str(tmp_path / "images.pt"),
            str(tmp_path / "outputs.pt"),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "outputs.pt", weights_only=True)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output.float() - reference.float()).abs().max() / reference.abs().max())


def live_logits(model: nn.Module, images: torch.Tensor, precision: str = "32-true") -> torch.Tensor:
    """The live model's logits, eager, in ``precision``: what the artifact is compared with."""
    model.eval()
    with torch.inference_mode():
        return _Deployable(model, torch.bfloat16 if precision == "bf16-mixed" else None)(images)


@pytest.fixture(scope="module")
def digit_images() -> torch.Tensor:
    dm = DigitsDataModule(batch_size=8)
    dm.setup()
    return next(iter(dm.val_dataloader()))[0]


@pytest.fixture(scope="module")
def pruned_int8(tmp_path_factory, digit_images):
    """A tiny timm ViT pruned 50% and int8_static_x86 quantized, exported once to .pt2 (bf16-mixed where the CPU
    has bf16) and to .onnx."""
    folder = tmp_path_factory.mktemp("pruned_int8")
    model = build_family("timm-vit").eval()
    prune_vit(model, 0.5, digit_images[:1])
    quantize_model(model, "int8_static_x86", example_input=digit_images, calibration_inputs=[digit_images])
    pt2 = export_compressed(model, folder / "vit.pt2", digit_images, inference_precision=BF16)
    onnx = export_compressed(model, folder / "vit.onnx", digit_images) if not ONNX_MISSING else None
    return model, folder, pt2, onnx


# ----------------------------------------------------------------------------- .pt2
def test_pt2_of_pruned_int8_model_matches_the_live_model_at_any_batch_size(pruned_int8):
    model, folder, summary, _ = pruned_int8
    assert summary["format"] == "pt2" and summary["inference_precision"] == BF16
    assert summary["relative_error"] <= summary["tolerance"] == TOLERANCES[(BF16, True)]
    assert Path(summary["path"]).stat().st_size == summary["size_bytes"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no partial file left
    assert any(isinstance(m, X86Int8StaticLinear) for m in model.modules())
    artifact = load_artifact(summary["path"])
    for batch in (1, 5):  # dynamic batch size: neither is the export's
        images = torch.randn(batch, 3, IMAGES, IMAGES)
        with torch.inference_mode():
            output = artifact(images)
        assert output.shape == (batch, 10) and output.dtype == torch.float32
        assert relative_error(output, live_logits(model, images, BF16)) <= summary["tolerance"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.py runs it on a GPU)")
def test_pt2_for_cuda_of_a_pruned_bf16_model_runs_on_the_gpu_like_the_live_model(digit_images, tmp_path):
    model = build_family("timm-vit").eval()
    prune_vit(model, 0.5, digit_images[:1])
    model.cuda()
    summary = export_compressed(
        model, tmp_path / "vit.pt2", digit_images.cuda(), device="cuda", inference_precision="bf16-mixed"
    )
    assert summary["relative_error"] <= summary["tolerance"]
    images = torch.randn(5, 3, IMAGES, IMAGES, device="cuda")
    with torch.inference_mode():
        output = load_artifact(summary["path"], device="cuda")(images)
    assert output.device.type == "cuda" and output.shape == (5, 10)
    assert (
        relative_error(output.float().cpu(), live_logits(model, images, "bf16-mixed").float().cpu())
        <= summary["tolerance"]
    )


def test_files_load_and_run_where_lightning_this_library_timm_and_torchao_cannot_import(
    pruned_int8, digit_images, tmp_path
):
    model, _folder, pt2, onnx = pruned_int8
    paths = [Path(pt2["path"])] + ([Path(onnx["path"])] if onnx else [])
    images = digit_images[:3]
    outputs = run_without_library(tmp_path, images, paths)
    assert relative_error(outputs[pt2["path"]], live_logits(model, images, BF16)) <= pt2["tolerance"]
    if onnx:  # int8_static_x86 runs in onnxruntime as a QuantizeLinear/DequantizeLinear graph
        assert relative_error(outputs[onnx["path"]], live_logits(model, images)) <= onnx["tolerance"]


# ----------------------------------------------------------------------------- ONNX: the families
@needs_onnx
@pytest.mark.parametrize(
    "family, technique",
    [
        ("timm-deit-distilled", "pruned"),
        ("timm-registers", "nystrom"),
        ("hf-vit-sdpa", "pruned"),
        ("hf-deit-teacher", "nystrom"),
        ("torchvision", "pruned"),
        ("mha-seq-first", "pruned"),
    ],
)
def test_onnx_of_each_family_runs_in_onnxruntime_like_the_live_model(family, technique, digit_images, tmp_path):
    model = build_family(family).eval()
    if family == "torchvision":  # its head starts at zero: every logit 0, nothing to compare
        torch.nn.init.normal_(model.heads.head.weight, std=0.1)
    if technique == "pruned":
        params = sum(p.numel() for p in model.parameters())
        prune_vit(model, 0.5, digit_images[:1])
        assert sum(p.numel() for p in model.parameters()) < params
    else:
        assert swap_attention(model, NystromConfig(num_landmarks=4))
    summary = export_compressed(model, tmp_path / "model.onnx", digit_images)
    assert summary["format"] == "onnx" and summary["relative_error"] <= TOLERANCES[("32-true", False)]
    images = torch.randn(3, 3, IMAGES, IMAGES)
    with torch.inference_mode():
        output = load_artifact(tmp_path / "model.onnx")(images)
    assert relative_error(output, live_logits(model, images)) <= TOLERANCES[("32-true", False)]


@needs_onnx
@pytest.mark.parametrize("family", ["timm-deit-distilled", "torchvision", "hf-vit-sdpa", "mha-seq-first"])
def test_onnx_of_each_family_in_static_int8_runs_in_onnxruntime_like_the_live_model(family, digit_images, tmp_path):
    model = build_family(family).eval()
    if family == "torchvision":  # its head starts at zero: every logit 0, nothing to compare
        torch.nn.init.normal_(model.heads.head.weight, std=0.1)
    summary = quantize_model(model, "int8_static_x86", example_input=digit_images, calibration_inputs=[digit_images])
    assert len(summary["quantized"]) >= 4 * 2  # every block's attention and MLP (nn.MultiheadAttention included)
    exported = export_compressed(model, tmp_path / "model.onnx", digit_images)
    assert exported["relative_error"] <= TOLERANCES[("32-true", True)]
    images = digit_images[:3]  # static int8: the calibrated input ranges hold for images like these
    with torch.inference_mode():
        output = load_artifact(tmp_path / "model.onnx")(images)
    assert relative_error(output, live_logits(model, images)) <= TOLERANCES[("32-true", True)]


@needs_onnx
def test_onnx_of_torchao_int8_names_the_format_that_runs_it(digit_images, tmp_path):
    model = build_family("timm-vit").eval()
    quantize_model(model, "int8_dynamic", example_input=digit_images)
    with pytest.raises(ValueError, match=r"(?s)format='onnx'.*int8 layers.*format='pt2'"):
        export_compressed(model, tmp_path / "model.onnx", digit_images)
    assert not list(tmp_path.iterdir())  # nothing half-written


# ----------------------------------------------------------------------------- the callback
def test_export_on_fit_writes_a_checked_nystrom_pt2_that_the_benchmark_measures_as_deployed(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    bench = BenchmarkCallback(
        batch_size=4, devices=("cpu",), rounds=1, min_run_time=0.05, latency_repeats=1, accuracy_batches=1, plot=False
    )
    export = ExportOnFit(tmp_path / "vit.pt2")
    trainer = fast_trainer(
        tmp_path,
        callbacks=[bench, export, NystromSwap(num_landmarks=4)],
        limit_train_batches=2,
        logger=CSVLogger(tmp_path),
    )
    module = FamilyClassifier("timm-vit")
    trainer.fit(module, DigitsDataModule(batch_size=16))
    summary = export.summary
    assert summary is not None and Path(summary["path"]) == tmp_path / "vit.pt2"
    assert summary["relative_error"] <= TOLERANCES[("32-true", False)]
    # the file is the Nystrom model as trained: same logits as the live model on new images
    images = torch.randn(3, 3, IMAGES, IMAGES)
    with torch.inference_mode():
        output = load_artifact(summary["path"])(images)
    assert relative_error(output, live_logits(module.model, images)) <= TOLERANCES[("32-true", False)]
    report = bench.report
    assert report["deployed"]["size_mb"] == pytest.approx(summary["size_bytes"] / 1e6)
    assert report["deployed"]["params"] is None and report["deployed"]["cpu_images_per_s"] > 0
    assert report["deployed"]["accuracy"] == pytest.approx(report["final"]["accuracy"], abs=0.02)
    assert report["deployed_startup"]["path"] == summary["path"] and report["deployed_startup"]["load_seconds"] > 0
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"export/size_mb", "export/relative_error", "export/load_seconds", "bench/deployed_cpu_images_per_s"} <= set(
        logged
    )


@needs_onnx
def test_export_runs_after_quantize_on_fit_saved_and_follows_its_precision_choice(tmp_path):
    quantize = QuantizeOnFit(
        "int8_static_x86",
        compile=False,
        save_path=tmp_path / "int8.ckpt",
        save_fp32_path=tmp_path / "fp32.ckpt",
        calibration_batches=1,
    )
    export = ExportOnFit(tmp_path / "vit.onnx")
    # list order reversed on purpose: the canonical order still quantizes (and saves) first
    trainer = fast_trainer(tmp_path, callbacks=[export, quantize, PruningSchedule(0.5)], limit_train_batches=2)
    module = FamilyClassifier("timm-vit")
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert (tmp_path / "int8.ckpt").is_file() and (tmp_path / "fp32.ckpt").is_file()
    assert export.summary["format"] == "onnx" and export.summary["inference_precision"] == "32-true"
    images = torch.randn(2, 3, IMAGES, IMAGES)
    with torch.inference_mode():
        output = load_artifact(tmp_path / "vit.onnx")(images)
    assert relative_error(output, live_logits(module.model, images)) <= TOLERANCES[("32-true", True)]


@needs_onnx
def test_ddp_rank_zero_writes_one_checked_file_every_rank_gets_its_summary_or_its_failure(tmp_path):
    reports = run_ddp_script(
        f"""
        import lightning as L
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from families import FamilyClassifier
        import lightning_vitcompress.callbacks.export as export_module
        from lightning_vitcompress import ExportOnFit, PruningSchedule
        from lightning_vitcompress.digits import DigitsDataModule

        def fit(export):
            L.seed_everything(0, verbose=False)
            trainer = L.Trainer(
                accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=2,
                limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=[PruningSchedule(0.5), export],
            )
            trainer.fit(FamilyClassifier("torchvision"), DigitsDataModule(batch_size=16))
            return trainer

        export = ExportOnFit(os.path.join(OUT, "vit.onnx"))
        trainer = fit(export)
        values = {{"path": export.summary["path"], "size": export.summary["size_bytes"]}}

        def fails_on_rank_zero(*args, **kwargs):
            raise RuntimeError("disk full")

        export_module.export_compressed = fails_on_rank_zero  # only rank zero exports: would the others hang?
        try:
            fit(ExportOnFit(os.path.join(OUT, "again.onnx")))
        except RuntimeError as err:
            values["error"] = str(err)
        report(trainer, **values)
        """,
        tmp_path,
        timeout=400,
    )
    assert reports[0]["path"] == reports[1]["path"] == str(tmp_path / "vit.onnx")
    assert reports[0]["size"] == reports[1]["size"] == (tmp_path / "vit.onnx").stat().st_size
    for rank in reports:
        assert "ExportOnFit(path=" in rank["error"] and "disk full" in rank["error"]
    assert not (tmp_path / "again.onnx").exists()


def test_pt2_of_a_pruned_int8_torchvision_vit_quantizes_its_attention_and_matches(digit_images, tmp_path):
    model = build_family("torchvision").eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.1)  # its head starts at zero: nothing to compare
    prune_vit(model, 0.5, digit_images[:1])
    summary = quantize_model(model, "int8_dynamic_x86", example_input=digit_images)
    assert summary["split_attention"] and all(
        f"{name}.qkv" in summary["quantized"] for name in summary["split_attention"]
    )
    pt2 = export_compressed(model, tmp_path / "vit.pt2", digit_images)
    assert pt2["relative_error"] <= pt2["tolerance"] == TOLERANCES[("32-true", True)]
    images = torch.randn(3, 3, IMAGES, IMAGES)
    with torch.inference_mode():
        output = load_artifact(tmp_path / "vit.pt2")(images)
    assert relative_error(output, live_logits(model, images)) <= pt2["tolerance"]


# ----------------------------------------------------------------------------- bad inputs
class ValueBranch(nn.Module):
    """A ViT whose forward branches on a tensor's value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = build_family("timm-vit")
        self.img_size = IMAGES

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        return logits if images.mean() > 0 else -logits


class Wrapped(FamilyClassifier):
    def __init__(self) -> None:
        super().__init__("timm-vit")
        self.model = ValueBranch()
        self.example_input_array = torch.zeros(1, 3, IMAGES, IMAGES)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


def test_data_dependent_control_flow_and_unwritable_path_fail_at_setup_before_training(tmp_path):
    module = Wrapped()
    trainer = fast_trainer(tmp_path, callbacks=[ExportOnFit(tmp_path / "m.pt2")])
    with pytest.raises(ValueError, match=r"ValueBranch cannot be exported with torch.export.*data-dependent"):
        trainer.fit(module, DigitsDataModule(batch_size=16))
    assert module.steps == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    module = FamilyClassifier("timm-vit")
    trainer = fast_trainer(tmp_path, callbacks=[ExportOnFit(blocker / "m.pt2")])
    with pytest.raises((ValueError, OSError), match=r"path="):
        trainer.fit(module, DigitsDataModule(batch_size=16))
    assert trainer.global_step == 0


@needs_onnx
def test_a_failed_check_keeps_no_file_and_leaves_the_trained_model(tmp_path):
    module = FamilyClassifier("timm-vit")
    export = ExportOnFit(tmp_path / "m.onnx", tolerance=1e-30)  # no real export matches this
    trainer = fast_trainer(tmp_path, callbacks=[export, PruningSchedule(0.5)], limit_train_batches=2)
    with pytest.raises(RuntimeError, match=r"ExportOnFit.*failed: ArtifactMismatchError.*model is unchanged") as err:
        trainer.fit(module, DigitsDataModule(batch_size=16))
    assert isinstance(err.value.__cause__, ArtifactMismatchError)
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".m.onnx*"))
    assert trainer.global_step == 2  # trained; the pruned, trained model is still the module's
    images = torch.randn(2, 3, IMAGES, IMAGES)
    assert module.model(images).shape == (2, 10)
