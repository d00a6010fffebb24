"""OpenVINO IR as a deployment target: export_compressed(..., "vit.xml"), ExportOnFit(format="openvino"), NNCF int8.

Each family (timm, torchvision, transformers, hand-written nn.MultiheadAttention) pruned and token-merged, then
written as an int8 IR and checked against the live model; the IR loads where torch cannot even be imported; the
callback writes it from the trained float model before QuantizeOnFit quantizes, and bad input fails at setup.
Conversions take a few seconds each on 2 cores; skipped, with the reason, where the [openvino] extra is absent.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from families import FamilyClassifier, build_family
from helpers import fast_trainer

from lightning_vitcompress import (
    BenchmarkCallback,
    ExportOnFit,
    PruningSchedule,
    QuantizeOnFit,
    TokenMerging,
    X86Int8StaticLinear,
    export_compressed,
    load_artifact,
    merge_tokens,
)
from lightning_vitcompress.digits import DigitsDataModule
from lightning_vitcompress.functional import prune_vit, quantize_model
from lightning_vitcompress.functional.export import NNCF_INT8_TOLERANCE, TOLERANCES, ArtifactMismatchError
from lightning_vitcompress.functional.x86_int8 import cpu_supports_bfloat16

MISSING = [name for name in ("openvino", "nncf") if __import__("importlib.util").util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"the [openvino] extra is not installed ({MISSING}): pip install openvino nncf"
)
NATIVE = "bf16-mixed" if cpu_supports_bfloat16() else "32-true"
HINTS = {"bf16-mixed": "bf16", "32-true": "f32"}
IMAGES = 32

#: what a server runs: OpenVINO and numpy only; torch, Lightning, this library, timm and torchao cannot import
OPENVINO_ONLY = textwrap.dedent(
    """
    import sys
    for name in ("torch", "lightning", "lightning_vitcompress", "timm", "torchao", "nncf"):
        sys.modules[name] = None  # `import name` now raises ImportError
    import numpy as np
    import openvino as ov

    images = np.load(sys.argv[1])
    core = ov.Core()
    ir = core.read_model(sys.argv[2])
    hint = ir.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str)
    model = core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    np.save(sys.argv[3], model(images)[0])
    print(model.get_property("INFERENCE_PRECISION_HINT").get_type_name())
    """
)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output.float() - reference.float()).abs().max() / reference.abs().max())


def live_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    from lightning_vitcompress.models import logits_of

    model.eval()
    with torch.inference_mode():
        return logits_of(model(images)).float()


@pytest.fixture(scope="module")
def digit_batches() -> list[torch.Tensor]:
    dm = DigitsDataModule(batch_size=16)
    dm.setup()
    return [images for images, _ in list(dm.val_dataloader())[:4]]


# ----------------------------------------------------------------------------- export_compressed
@pytest.mark.parametrize("family", ["timm-vit", "torchvision", "hf-vit-sdpa", "mha-batch-first"])
def test_int8_ir_of_each_family_pruned_and_token_merged_runs_like_the_live_model(family, digit_batches, tmp_path):
    model = build_family(family).eval()
    if family == "torchvision":  # its head starts at zero: every logit 0, nothing to compare
        torch.nn.init.normal_(model.heads.head.weight, std=0.1)
    params = sum(p.numel() for p in model.parameters())
    prune_vit(model, 0.5, digit_batches[0][:1])
    plan = merge_tokens(model, 2, example_input=digit_batches[0][:1])
    assert sum(p.numel() for p in model.parameters()) < params and plan["tokens"][-1] < plan["tokens"][0]

    summary = export_compressed(
        model, tmp_path / "vit.xml", digit_batches[0], quantize="int8", calibration_data=digit_batches
    )
    assert summary["format"] == "openvino" and summary["quantize"] == "int8"
    assert summary["inference_precision"] == NATIVE and summary["tolerance"] == NNCF_INT8_TOLERANCE
    assert summary["relative_error"] <= NNCF_INT8_TOLERANCE
    xml, weights = tmp_path / "vit.xml", tmp_path / "vit.bin"
    assert summary["size_bytes"] == xml.stat().st_size + weights.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.bin", "vit.xml"]  # no partial file left
    assert "FakeQuantize" in xml.read_text()  # NNCF really quantized it
    artifact = load_artifact(xml)
    assert artifact._runner.precision_hint == HINTS[NATIVE]
    for batch in (1, 5):  # dynamic batch: neither is the export's
        images = digit_batches[1][:batch]
        output = artifact(images)
        assert output.shape == (batch, 10) and torch.isfinite(output).all()
        assert relative_error(output, live_logits(model, images)) <= NNCF_INT8_TOLERANCE


def test_float_ir_keeps_the_live_models_outputs_and_carries_its_precision_hint(digit_batches, tmp_path):
    model = build_family("timm-vit").eval()
    for precision in ("32-true", NATIVE):
        path = tmp_path / precision / "vit.xml"
        summary = export_compressed(model, path, digit_batches[0], inference_precision=precision)
        assert summary["quantize"] is None and summary["relative_error"] <= TOLERANCES[(precision, False)]
        assert load_artifact(path)._runner.precision_hint == HINTS[precision]
        assert "FakeQuantize" not in path.read_text()


def test_ir_loads_and_runs_with_openvino_alone_where_torch_cannot_import(digit_batches, tmp_path):
    import numpy as np

    model = build_family("timm-vit").eval()
    prune_vit(model, 0.5, digit_batches[0][:1])
    export_compressed(model, tmp_path / "vit.xml", digit_batches[0], quantize="int8", calibration_data=digit_batches)
    images = digit_batches[2][:3]
    np.save(tmp_path / "images.npy", images.numpy())
    (tmp_path / "server.py").write_text(OPENVINO_ONLY)
    result = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "server.py"),
            str(tmp_path / "images.npy"),
            str(tmp_path / "vit.xml"),
            str(tmp_path / "logits.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == HINTS[NATIVE]  # the precision travelled inside the IR
    logits = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    assert relative_error(logits, live_logits(model, images)) <= NNCF_INT8_TOLERANCE


def test_torch_int8_models_and_bad_arguments_are_refused_naming_what_works(digit_batches, tmp_path):
    images = digit_batches[0]
    int8 = build_family("timm-vit").eval()
    quantize_model(int8, "int8_static_x86", example_input=images, calibration_inputs=[images])
    assert any(isinstance(m, X86Int8StaticLinear) for m in int8.modules())
    with pytest.raises(ValueError, match=r"(?s)format='openvino'.*torch int8 layers.*quantize='int8'.*format='pt2'"):
        export_compressed(int8, tmp_path / "vit.xml", images)
    model = build_family("timm-vit").eval()
    with pytest.raises(ValueError, match=r"path=.*vit.onnx.*format='openvino'.*\.xml"):
        export_compressed(model, tmp_path / "vit.onnx", images, format="openvino")
    with pytest.raises(ValueError, match=r"quantize='int8' with format='pt2'.*format='openvino'"):
        export_compressed(model, tmp_path / "vit.pt2", images, quantize="int8")
    with pytest.raises(ValueError, match=r"quantize='int4'.*'int8'"):
        export_compressed(model, tmp_path / "vit.xml", images, quantize="int4")
    with pytest.raises(ValueError, match=r"calibration_data.*quantize='int8'"):
        export_compressed(model, tmp_path / "vit.xml", images, calibration_data=digit_batches)
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_extra_names_the_install_command(monkeypatch, digit_batches, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    with pytest.raises(ImportError, match=r"quantize='int8' needs \['nncf'\].*lightning-vitcompress\[openvino\]"):
        export_compressed(build_family("timm-vit"), tmp_path / "vit.xml", digit_batches[0], quantize="int8")


def test_a_file_that_fails_its_check_is_not_kept(digit_batches, tmp_path):
    model = build_family("timm-vit").eval()
    with pytest.raises(ArtifactMismatchError, match="not kept"):
        export_compressed(
            model,
            tmp_path / "vit.xml",
            digit_batches[0],
            quantize="int8",
            calibration_data=digit_batches,
            tolerance=1e-9,
        )
    assert not list(tmp_path.iterdir())  # neither the .xml nor the .bin


# ----------------------------------------------------------------------------- ExportOnFit
def test_export_on_fit_writes_the_float_model_before_quantize_on_fit_and_nncf_quantizes_it(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    bench = BenchmarkCallback(
        batch_size=4, devices=("cpu",), rounds=1, min_run_time=0.05, latency_repeats=1, accuracy_batches=1, plot=False
    )
    export = ExportOnFit(tmp_path / "vit.xml", quantize="int8", calibration_batches=2)
    quantize = QuantizeOnFit("int8_static_x86", compile=False, calibration_batches=1, save_path=tmp_path / "int8.ckpt")
    # list order on purpose: the canonical order exports the float model, then quantizes
    trainer = fast_trainer(
        tmp_path,
        callbacks=[quantize, export, bench, PruningSchedule(0.5), TokenMerging(r=2)],
        limit_train_batches=3,
        logger=CSVLogger(tmp_path),
    )
    module = FamilyClassifier("timm-vit")
    trainer.fit(module, DigitsDataModule(batch_size=16))

    summary = export.summary
    assert summary is not None and summary["format"] == "openvino" and summary["quantize"] == "int8"
    assert 0.0 <= summary["top1_agreement"] <= 1.0
    assert any(isinstance(m, X86Int8StaticLinear) for m in module.model.modules())  # the live model: torch int8
    assert (tmp_path / "int8.ckpt").is_file() and "FakeQuantize" in (tmp_path / "vit.xml").read_text()
    report = bench.report
    assert report["deployed"]["size_mb"] == pytest.approx(summary["size_bytes"] / 1e6)
    assert report["deployed"]["cpu_images_per_s"] > 0 and report["deployed_startup"]["format"] == "openvino"
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"export/top1_agreement", "export/size_mb", "bench/deployed_cpu_images_per_s"} <= set(logged)


def test_float_ir_beside_quantize_on_fit_is_refused_at_setup(tmp_path):
    module = FamilyClassifier("timm-vit")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = fast_trainer(tmp_path, callbacks=[ExportOnFit(tmp_path / "vit.xml"), QuantizeOnFit("int8_dynamic")])
    with pytest.raises(
        ValueError,
        match=r"(?s)format='openvino', quantize=None\) with a QuantizeOnFit.*"
        r"quantize='int8'",
    ):
        trainer.fit(module, DigitsDataModule(batch_size=16))
    assert trainer.global_step == 0 and all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_constructor_refuses_a_path_that_is_not_xml():
    with pytest.raises(ValueError, match=r"path='vit.bin' with format='openvino'.*'vit.xml'"):
        ExportOnFit("vit.bin", format="openvino")
    with pytest.raises(ValueError, match=r"calibration_batches=0"):
        ExportOnFit("vit.xml", quantize="int8", calibration_batches=0)


class _SingularValueHead(torch.nn.Linear):
    """A head that adds its logits' singular values (``torch.linalg.svdvals``): an op OpenVINO's converter lacks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits + torch.linalg.svdvals(logits.reshape(logits.shape[0], 2, 5)).sum(-1, keepdim=True)


class _Unconvertible(FamilyClassifier):
    def __init__(self) -> None:
        super().__init__("timm-vit")
        head = self.model.head
        self.model.head = _SingularValueHead(head.in_features, head.out_features)
        self.example_input_array = torch.zeros(1, 3, IMAGES, IMAGES)


def test_a_model_the_converter_refuses_fails_at_setup_before_training(tmp_path):
    trainer = fast_trainer(tmp_path, callbacks=[ExportOnFit(tmp_path / "vit.xml")])
    with pytest.raises(
        ValueError,
        match=r"format='openvino': ov.convert_model cannot convert VisionTransformer "
        r"\(OpConversionFailure: No conversion rule .*linalg_svdvals.*format='pt2'",
    ):
        trainer.fit(_Unconvertible(), DigitsDataModule(batch_size=16))
    assert trainer.global_step == 0 and not list(tmp_path.glob("vit.*"))


def test_a_failed_openvino_export_raises_at_fit_end_after_quantize_on_fit_saved(tmp_path, monkeypatch):
    import lightning_vitcompress.functional.export as export_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "write_openvino", broken)
    quantize = QuantizeOnFit("int8_dynamic", save_path=tmp_path / "int8.ckpt")
    export = ExportOnFit(tmp_path / "vit.xml", quantize="int8", calibration_batches=1)
    trainer = fast_trainer(tmp_path, callbacks=[export, quantize], limit_train_batches=2)
    with pytest.raises(RuntimeError, match=r"(?s)format='openvino'\) failed: RuntimeError: disk full.*written after"):
        trainer.fit(FamilyClassifier("timm-vit"), DigitsDataModule(batch_size=16))
    assert (tmp_path / "int8.ckpt").is_file()  # the quantized model was saved before the error surfaced
    assert quantize.summary is not None and export.summary is None
    assert not list(tmp_path.glob("*vit*"))


def test_the_int8_ir_keeps_the_trained_models_top1_on_the_digits_validation_set(tiny_classifier, digits, tmp_path):
    from lightning_vitcompress.functional import measure_accuracy

    module = tiny_classifier(embed_dim=64, lr=5e-3)  # 2 blocks: about 70% after 8 epochs
    fast_trainer(tmp_path, max_epochs=8, limit_train_batches=None, limit_val_batches=0).fit(module, digits)
    model = module.model.eval()
    train = [images for images, _ in list(digits.train_dataloader())[:4]]
    summary = export_compressed(model, tmp_path / "vit.xml", train[0], quantize="int8", calibration_data=train)
    batches = list(digits.val_dataloader())
    float_top1 = measure_accuracy(model, batches)
    ir_top1 = measure_accuracy(load_artifact(summary["path"]), batches)
    assert float_top1 > 0.6  # a trained model (chance: 0.1), where a wrong quantization would show
    assert abs(ir_top1 - float_top1) <= 0.005 + 1e-9, (ir_top1, float_top1)  # within half a point: one image of 270


def test_nncf_calibrates_on_whole_training_batches_even_for_a_model_left_in_eval_mode(tmp_path, monkeypatch):
    import lightning_vitcompress.functional.export as export_module

    seen: dict[str, list[int]] = {}
    real = export_module.write_openvino

    def spy(*args, calibration_data=None, **kwargs):
        seen["rows"] = [batch.shape[0] for batch in calibration_data]
        return real(*args, calibration_data=calibration_data, **kwargs)

    monkeypatch.setattr(export_module, "write_openvino", spy)
    module = FamilyClassifier("timm-vit")
    module.model.eval()  # common: timm.create_model(...).eval() before wrapping it; Lightning keeps the mode
    export = ExportOnFit(tmp_path / "vit.xml", quantize="int8", calibration_batches=2)
    fast_trainer(tmp_path, callbacks=[export], limit_train_batches=3).fit(module, DigitsDataModule(batch_size=16))
    assert seen["rows"] == [16, 16]  # the first two training batches, not the 8-row check example
    assert export.summary is not None and not module.model.training
