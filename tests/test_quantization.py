"""QuantizeOnFit: torchao quantization when fit ends, QAT, fail-fast checks, checkpoints, DDP."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
import torchao.quantization
import yaml
from helpers import TINY, fast_trainer, run_ddp_script
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import Int8Tensor
from torchao.quantization.qat import FakeQuantizedLinear
from torchao.quantization.transform_module import register_quantize_module_handler

from lightning_vitcompress import (
    Int8DynamicX86Config,
    Int8StaticX86Config,
    QuantizeOnFit,
    X86Int8DynamicLinear,
    X86Int8StaticLinear,
    load_compressed,
)
from lightning_vitcompress._model import set_submodule
from lightning_vitcompress._structure import STRUCTURE_KEY, UnsafeCheckpointError, recorded_edits
from lightning_vitcompress.digits import DigitsClassifier
from lightning_vitcompress.functional import (
    QUANTIZATION_CONFIGS,
    QuantizationSpec,
    quantize_model,
    resolve_quantization,
    select_layers,
)
from lightning_vitcompress.functional.measure import measure_accuracy
from lightning_vitcompress.functional.multihead_attention import MultiheadSelfAttention
from lightning_vitcompress.functional.quantize_structure import spec_for_label
from lightning_vitcompress.functional.x86_int8 import calibrate_input_ranges


@pytest.fixture
def safe_loads(monkeypatch) -> list:
    """Every ``torch.load`` in the test must be ``weights_only=True``; the list of files loaded shows loads ran.

    Loading a checkpoint with ``weights_only=False`` would read the same tensors, so a test that only checks
    what it loaded cannot tell safe loading from unsafe; this one fails on the first unsafe call.
    """
    real_load, loaded = torch.load, []
    # Lightning's own resume passes weights_only=None: torch >= 2.6 reads that as True unless this is set
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)

    def load(f, *args, **kwargs):
        safe = kwargs.get("weights_only") is True or ("weights_only" in kwargs and kwargs["weights_only"] is None)
        assert safe, f"torch.load({f!r}) with weights_only={kwargs.get('weights_only', 'not given')!r}"
        loaded.append(Path(f).name if isinstance(f, (str, Path)) else f)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return loaded


def linear_weight_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m.weight.data) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_int8_dynamic_quantizes_every_linear_keeps_accuracy_and_trainer_test_uses_it(tmp_path, tiny_classifier, digits):
    model = tiny_classifier(lr=3e-3)
    callback = QuantizeOnFit("int8_dynamic", save_fp32_path=tmp_path / "fp32.ckpt")
    trainer = fast_trainer(tmp_path, callbacks=[callback], max_epochs=10, limit_train_batches=None, limit_val_batches=0)
    trainer.fit(model, digits)

    types = linear_weight_types(model.model)
    assert set(types.values()) == {Int8Tensor}, types  # qkv, proj, fc1, fc2 of both blocks, and the head
    assert callback.summary["quantized"] == list(types) and callback.summary["skipped"] == {}
    assert callback.summary["size_after_bytes"] < 0.5 * callback.summary["size_before_bytes"]
    assert callback.summary["output_relative_error"] < 0.05

    fp32 = load_compressed(DigitsClassifier, tmp_path / "fp32.ckpt")  # the trained weights are not lost
    assert set(linear_weight_types(fp32.model).values()) == {torch.Tensor}
    test_batches = list(digits.test_dataloader())
    fp32_accuracy = measure_accuracy(fp32, test_batches)
    int8_accuracy = measure_accuracy(model, test_batches)
    assert fp32_accuracy > 0.5  # trained enough for the comparison to mean something
    assert fp32_accuracy - int8_accuracy <= 0.005  # at most 0.5 pt lost

    (result,) = trainer.test(model, digits, verbose=False)
    assert result["test/acc"] == pytest.approx(int8_accuracy)
    assert set(linear_weight_types(model.model).values()) == {Int8Tensor}


def test_int8_dynamic_x86_swaps_in_int8_layers_compiles_them_to_onednn_and_round_trips(
    tmp_path, tiny_classifier, digits, safe_loads
):
    from torch._dynamo.utils import counters

    model = tiny_classifier(lr=3e-3)
    callback = QuantizeOnFit(
        "int8_dynamic_x86", save_path=tmp_path / "int8.ckpt", save_fp32_path=tmp_path / "fp32.ckpt"
    )
    trainer = fast_trainer(tmp_path, callbacks=[callback], max_epochs=10, limit_train_batches=None, limit_val_batches=0)
    counters.clear()
    trainer.fit(model, digits)

    linears = {
        name: type(m) for name, m in model.model.named_modules() if isinstance(m, (nn.Linear, X86Int8DynamicLinear))
    }
    assert set(linears.values()) == {X86Int8DynamicLinear} and callback.summary["quantized"] == list(linears)
    assert model.model.blocks[0].mlp.fc1.weight.dtype == torch.int8
    assert callback.summary["size_after_bytes"] < 0.5 * callback.summary["size_before_bytes"]
    # compiled by default, with inductor freezing: the int8 layers became oneDNN int8 GEMMs
    assert callback.summary["compile_seconds"] is not None
    lowered = counters["inductor"]["qlinear_unary_lower_count"] + counters["inductor"]["qlinear_binary_lower_count"]
    assert lowered >= len(linears)

    test_batches = list(digits.test_dataloader())
    fp32_accuracy = measure_accuracy(load_compressed(DigitsClassifier, tmp_path / "fp32.ckpt"), test_batches)
    int8_accuracy = measure_accuracy(model, test_batches)
    assert fp32_accuracy > 0.5 and fp32_accuracy - int8_accuracy <= 0.005
    (result,) = trainer.test(model, digits, verbose=False)
    assert result["test/acc"] == pytest.approx(int8_accuracy)

    loaded = load_compressed(DigitsClassifier, tmp_path / "int8.ckpt")  # eager, from a weights_only load
    assert safe_loads[-1] == "int8.ckpt"
    assert type(loaded.model.blocks[1].attn.proj) is X86Int8DynamicLinear
    images = test_batches[0][0]
    model.eval()
    with torch.inference_mode():
        eager = model.model.forward(images)  # forward() bypasses the compiled call
        torch.testing.assert_close(loaded.model.forward(images), eager)
        compiled = model(images)
    # oneDNN's int8 GEMM rounds a little differently from the reference dequantize-then-matmul
    assert (compiled - eager).abs().max() < 0.1
    assert (compiled.argmax(1) == eager.argmax(1)).float().mean() >= 0.95


class LastEpochInputs(Callback):
    """Keeps the images of the first training batches of the last epoch, as QuantizeOnFit should."""

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self.images: list[torch.Tensor] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.images = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if len(self.images) < self.batches:
            self.images.append(batch[0].clone())


def test_int8_static_x86_calibrates_on_the_last_epoch_runs_bf16_mixed_and_round_trips(
    tmp_path, tiny_classifier, digits, safe_loads
):
    model = tiny_classifier(lr=3e-3)
    inputs = LastEpochInputs(batches=2)
    callback = QuantizeOnFit(
        "int8_static_x86",
        inference_precision="bf16-mixed",
        calibration_batches=2,
        save_path=tmp_path / "int8.ckpt",
        save_fp32_path=tmp_path / "fp32.ckpt",
    )
    trainer = fast_trainer(
        tmp_path, callbacks=[callback, inputs], max_epochs=10, limit_train_batches=None, limit_val_batches=0
    )
    trainer.fit(model, digits)

    layers = {name: m for name, m in model.model.named_modules() if isinstance(m, (nn.Linear, X86Int8DynamicLinear))}
    assert {type(m) for m in layers.values()} == {X86Int8StaticLinear} and callback.summary["quantized"] == list(layers)
    # the activation scales are those of the last epoch's first 2 training batches run through the trained model
    fp32 = load_compressed(DigitsClassifier, tmp_path / "fp32.ckpt").eval()
    expected = calibrate_input_ranges(fp32.model, list(layers), [((images,), {}) for images in inputs.images])
    for name, layer in layers.items():
        reference = X86Int8StaticLinear(layer.in_features, layer.out_features)
        reference.set_input_range(*expected[name])
        assert (layer.input_scale, layer.input_zero_point) == pytest.approx(
            (reference.input_scale, reference.input_zero_point)
        ), name
    assert len({layer.input_scale for layer in layers.values()}) > 1  # one range per layer, not one for all

    test_batches = list(digits.test_dataloader())
    images = test_batches[0][0]
    model.eval()
    with torch.inference_mode():
        eager = model.model.forward(images)  # forward() bypasses the compiled call: float32 reference ops
        compiled = model(images)  # oneDNN int8 GEMMs, the rest in bf16 under autocast
    assert compiled.dtype == torch.float32  # bf16-mixed hands back float32 logits...
    assert torch.equal(compiled, compiled.bfloat16().float())  # ...computed in bf16
    assert not torch.equal(eager, eager.bfloat16().float())
    assert (compiled.argmax(1) == eager.argmax(1)).float().mean() >= 0.95
    fp32_accuracy = measure_accuracy(fp32, test_batches)
    int8_accuracy = measure_accuracy(model, test_batches)
    assert fp32_accuracy > 0.5 and fp32_accuracy - int8_accuracy <= 0.005
    (result,) = trainer.test(model, digits, verbose=False)
    assert result["test/acc"] == pytest.approx(int8_accuracy)

    loaded = load_compressed(DigitsClassifier, tmp_path / "int8.ckpt")  # weights_only: scales as extra state
    assert safe_loads[-1] == "int8.ckpt"
    loaded_layer, layer = loaded.model.blocks[1].mlp.fc2, model.model.blocks[1].mlp.fc2
    assert type(loaded_layer) is X86Int8StaticLinear
    assert (loaded_layer.input_scale, loaded_layer.input_zero_point) == (layer.input_scale, layer.input_zero_point)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model.forward(images), eager)


def test_quantize_model_needs_calibration_inputs_for_the_static_config(tiny_classifier):
    model = tiny_classifier().model.eval()
    with pytest.raises(ValueError, match=r"config='int8_static_x86'.*pass calibration_inputs="):
        quantize_model(model, "int8_static_x86")
    summary = quantize_model(model, "int8_static_x86", calibration_inputs=[torch.randn(4, 3, 32, 32)])
    assert type(model.head) is X86Int8StaticLinear and len(summary["quantized"]) == 2 * 4 + 1


def test_a_config_added_as_one_registry_entry_quantizes_in_a_fit_and_reloads(
    tmp_path, tiny_classifier, digits, monkeypatch
):
    # the whole of adding a config: a second name for the x86 dynamic layers that keeps narrow layers fp32
    toy = QuantizationSpec(
        name="toy_int8_x86_wide",
        build=Int8DynamicX86Config,
        devices=("cpu",),
        incompatible=lambda layer: "fewer than 64 inputs" if layer.in_features < 64 else None,
        module_class=X86Int8DynamicLinear,
    )
    monkeypatch.setitem(QUANTIZATION_CONFIGS, toy.name, toy)
    model = tiny_classifier()
    callback = QuantizeOnFit(toy.name, save_path=tmp_path / "toy.ckpt")
    fast_trainer(tmp_path, callbacks=[callback]).fit(model, digits)
    wide = ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]  # in_features 128; the rest take 32
    assert callback.summary["config"] == toy.name and callback.summary["quantized"] == wide
    assert callback.summary["skipped"]["head"] == "fewer than 64 inputs"
    assert "compile_seconds" not in callback.summary  # compiled_by_default=False
    assert recorded_edits(model)[-1]["config"] == toy.name

    images = next(iter(digits.test_dataloader()))[0]
    model.eval()
    with torch.no_grad():
        expected = model(images)
    torch.save(model.state_dict(), tmp_path / "toy.pt")
    for loaded in (
        load_compressed(DigitsClassifier, tmp_path / "toy.ckpt"),  # replayed by its label
        load_compressed(DigitsClassifier, tmp_path / "toy.pt", **TINY),
    ):  # read from the tensors
        assert {name for name, m in loaded.model.named_modules() if type(m) is X86Int8DynamicLinear} == set(wide)
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), expected)


def test_a_config_resolves_once_to_a_spec_and_records_replay_by_label():
    assert resolve_quantization("int8_static_x86") is QUANTIZATION_CONFIGS["int8_static_x86"]
    static = resolve_quantization(Int8StaticX86Config())  # an object of a registered class: its entry's layers
    assert (static.name, static.module_class, static.calibrates) == ("Int8StaticX86Config", X86Int8StaticLinear, True)
    assert static.compiled_by_default and static.bf16_mixed and static.devices is None
    assert not resolve_quantization(Int8StaticX86Config(input_range=(-1.0, 1.0))).calibrates
    int4 = resolve_quantization(torchao.quantization.Int4WeightOnlyConfig(group_size=32))
    assert int4.group_size == 32 and not int4.bfloat16_weights  # quantized as given, as before
    assert resolve_quantization(FailsOnSmallLayersConfig()).name == "FailsOnSmallLayersConfig"
    assert spec_for_label("int8_dynamic_x86").module_class is X86Int8DynamicLinear
    assert spec_for_label("Int8StaticX86Config") is QUANTIZATION_CONFIGS["int8_static_x86"]
    assert spec_for_label("Int8Tensor") is None  # a tensor subclass read from a bare state dict
    with pytest.raises(ValueError, match=r"config='int9_magic', which is neither a registered.*QuantizationSpec"):
        spec_for_label("int9_magic")
    monkeypatched = dict(QUANTIZATION_CONFIGS)
    monkeypatched["alias"] = QUANTIZATION_CONFIGS["int8_dynamic"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lightning_vitcompress.functional.quantize_configs.QUANTIZATION_CONFIGS", monkeypatched)
        with pytest.raises(ValueError, match=r"QUANTIZATION_CONFIGS\['alias'\] is a QuantizationSpec named"):
            resolve_quantization("alias")


def test_size_ratio_on_vit_small():
    vit = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    summary = quantize_model(vit, "int8_dynamic")
    assert len(summary["quantized"]) == 12 * 4 + 1
    assert summary["size_after_bytes"] / summary["size_before_bytes"] <= 0.27


def test_skip_by_name_pattern_or_predicate(tiny_classifier):
    vit = tiny_classifier().model
    selected, skipped = select_layers(vit, ["head", "blocks.1.*"])
    assert skipped == dict.fromkeys(
        ["blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "head"], "skip"
    )
    assert selected == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    summary = quantize_model(vit, "int8_weight_only", skip=lambda name, module: module.out_features == 10)
    assert summary["skipped"] == {"head": "skip"}
    assert type(vit.head.weight.data) is torch.Tensor and type(vit.blocks[0].mlp.fc1.weight.data) is Int8Tensor


def test_layers_a_cuda_config_cannot_take_are_reported_not_silently_skipped(tiny_classifier):
    vit = tiny_classifier(embed_dim=128).model
    _, skipped = select_layers(vit, group_size=QUANTIZATION_CONFIGS["int4_weight_only"].group_size)
    assert skipped == {}  # in_features 128 and 512: multiples of 128
    vit = tiny_classifier(embed_dim=96, num_heads=4).model
    _, skipped = select_layers(vit, group_size=128)
    assert skipped["blocks.0.attn.qkv"] == "in_features=96 is not a multiple of group_size=128"
    assert "blocks.0.mlp.fc2" not in skipped and "head" in skipped  # fc2: in_features 384 = 3 x 128
    vit = tiny_classifier(embed_dim=128).model
    _, skipped = select_layers(vit, incompatible=QUANTIZATION_CONFIGS["float8_dynamic"].incompatible)
    assert sorted(skipped) == ["blocks.0.attn.proj", "blocks.1.attn.proj"]  # torchao 0.18 bug, seen on an H100


class Recorder(Callback):
    """Records, in the last batch of each epoch, the layer types and what the optimizer trains."""

    def __init__(self) -> None:
        self.seen: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.seen[trainer.current_epoch] = dict(
            qkv_type=type(pl_module.model.blocks[0].attn.qkv),
            optimizer_matches=optimized == {id(p) for p in pl_module.parameters()},
            qkv_weight=pl_module.model.blocks[0].attn.qkv.weight.detach().clone(),
        )


def test_qat_fake_quantizes_from_the_start_epoch_trains_the_same_parameters_and_converts(
    tmp_path, tiny_classifier, digits
):
    model = tiny_classifier()
    recorder = Recorder()
    callback = QuantizeOnFit("int8_dynamic", qat_start_epoch=1, skip="head")
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fast_trainer(tmp_path, callbacks=[callback, recorder, checkpoints], max_epochs=2, enable_checkpointing=True).fit(
        model, digits
    )
    assert recorder.seen[0]["qkv_type"] is nn.Linear
    assert recorder.seen[1]["qkv_type"] is FakeQuantizedLinear
    assert recorder.seen[1]["optimizer_matches"]  # prepare kept the parameter objects: the optimizer trains on
    assert not torch.equal(recorder.seen[0]["qkv_weight"], recorder.seen[1]["qkv_weight"])  # and it trained
    assert callback.summary["qat"] and callback.summary["skipped"] == {"head": "skip"}
    assert type(model.model.blocks[0].attn.qkv) is nn.Linear  # fake quantization removed...
    assert type(model.model.blocks[0].attn.qkv.weight.data) is Int8Tensor  # ...and really quantized
    assert type(model.model.head.weight.data) is torch.Tensor

    # a checkpoint saved during QAT holds plain fp32 weights under nn.Linear's keys; resuming re-enters QAT
    resumed_model, resumed_callback = tiny_classifier(), QuantizeOnFit("int8_dynamic", qat_start_epoch=1, skip="head")
    resumed_recorder = Recorder()
    fast_trainer(tmp_path, callbacks=[resumed_callback, resumed_recorder], max_epochs=3).fit(
        resumed_model, digits, ckpt_path=tmp_path / "last.ckpt"
    )
    assert list(resumed_recorder.seen) == [2] and resumed_recorder.seen[2]["qkv_type"] is FakeQuantizedLinear
    assert resumed_callback.summary["qat"] and type(resumed_model.model.blocks[0].attn.qkv.weight.data) is Int8Tensor


def test_qat_for_the_x86_config_converts_to_x86_int8_layers(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    recorder = Recorder()
    callback = QuantizeOnFit("int8_dynamic_x86", qat_start_epoch=1, compile=False)
    fast_trainer(tmp_path, callbacks=[callback, recorder], max_epochs=2).fit(model, digits)
    assert recorder.seen[1]["qkv_type"] is FakeQuantizedLinear and recorder.seen[1]["optimizer_matches"]
    assert type(model.model.head) is X86Int8DynamicLinear and callback.summary["qat"]
    assert "compile_seconds" not in callback.summary  # compile=False is respected


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(config="int4_weight_only"), ValueError, r"config='int4_weight_only' runs on CUDA only.*'cpu'"),
        (dict(config="float8_dynamic"), ValueError, r"config='float8_dynamic' runs on CUDA only"),
        (dict(qat_start_epoch=2), ValueError, r"qat_start_epoch=2\) would never act: Trainer\(max_epochs=2\)"),
        (dict(skip="*"), ValueError, r"selects no nn.Linear layer"),
    ],
)
def test_setup_rejects_what_cannot_run_before_any_training(tmp_path, tiny_classifier, digits, kwargs, error, match):
    model = tiny_classifier()
    before = copy.deepcopy(model.state_dict())
    trainer = fast_trainer(tmp_path, callbacks=[QuantizeOnFit(**{"config": "int8_dynamic", **kwargs})], max_epochs=2)
    with pytest.raises(error, match=match):
        trainer.fit(model, digits)
    assert trainer.global_step == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_constructor_rejects_unknown_configs_and_bad_arguments():
    with pytest.raises(ValueError, match=r"config='int3'.*\['float8_dynamic', 'int4_weight_only', 'int8_dynamic'"):
        QuantizeOnFit("int3")
    with pytest.raises(TypeError, match=r"config=.*torchao config object"):
        QuantizeOnFit(torch.qint8)
    with pytest.raises(ValueError, match="qat_start_epoch=-1"):
        QuantizeOnFit(qat_start_epoch=-1)
    with pytest.raises(TypeError, match="compile='max-autotune'"):
        QuantizeOnFit(compile="max-autotune")
    with pytest.raises(ValueError, match="on_error='ignore'"):
        QuantizeOnFit(on_error="ignore")
    with pytest.raises(ValueError, match=r"inference_precision='bf16'.*\['32-true', 'bf16-mixed'\]"):
        QuantizeOnFit("int8_static_x86", inference_precision="bf16")
    with pytest.raises(ValueError, match=r"inference_precision='bf16-mixed' needs an x86 config.*'int8_dynamic'"):
        QuantizeOnFit("int8_dynamic", inference_precision="bf16-mixed")
    with pytest.raises(ValueError, match=r"inference_precision='bf16-mixed'.*compile=False"):
        QuantizeOnFit("int8_dynamic_x86", inference_precision="bf16-mixed", compile=False)
    with pytest.raises(ValueError, match="calibration_batches=0"):
        QuantizeOnFit("int8_static_x86", calibration_batches=0)


def test_setup_rejects_a_static_config_when_no_training_step_would_give_calibration_data(
    tmp_path, tiny_classifier, digits
):
    trainer = fast_trainer(tmp_path, callbacks=[QuantizeOnFit("int8_static_x86")], limit_train_batches=0)
    with pytest.raises(ValueError, match=r"config='int8_static_x86'.*limit_train_batches=0\) runs no training step"):
        trainer.fit(tiny_classifier(), digits)


def test_setup_rejects_bf16_mixed_on_a_cpu_without_bf16_math(tmp_path, tiny_classifier, digits, monkeypatch):
    monkeypatch.setattr("lightning_vitcompress.callbacks.quantization.cpu_supports_bfloat16", lambda: False)
    trainer = fast_trainer(tmp_path, callbacks=[QuantizeOnFit("int8_static_x86", inference_precision="bf16-mixed")])
    with pytest.raises(ValueError, match=r"no native bf16 math.*inference_precision='32-true'"):
        trainer.fit(tiny_classifier(), digits)
    assert trainer.global_step == 0


@dataclass
class FailsOnSmallLayersConfig(AOBaseConfig):
    """A torchao config that passes the setup dry run (a 256-wide layer) and fails on the real model."""


@register_quantize_module_handler(FailsOnSmallLayersConfig)
def _fail_on_small_layers(module: nn.Module, config: FailsOnSmallLayersConfig) -> nn.Module:
    if module.in_features != 256:
        raise RuntimeError("no kernel for this shape")
    return module


def test_a_failing_quantization_leaves_the_trained_fp32_model_in_place(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    snapshot: dict = {}

    class Snapshot(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshot.update(copy.deepcopy(pl_module.state_dict()))

    trainer = fast_trainer(tmp_path, callbacks=[QuantizeOnFit(FailsOnSmallLayersConfig()), Snapshot()])
    with pytest.raises(RuntimeError, match=r"FailsOnSmallLayersConfig.*left in place.*no kernel for this shape"):
        trainer.fit(model, digits)
    assert set(linear_weight_types(model.model).values()) == {torch.Tensor}
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key])


def test_a_model_that_fails_to_run_after_quantization_gets_its_fp32_layers_back(
    tmp_path, tiny_classifier, digits, monkeypatch
):
    model = tiny_classifier()
    attention = model.model.blocks[0].attn
    qkv, run_attention = attention.qkv, attention.forward

    def attention_without_a_kernel_for_int8(x, *args, **kwargs):  # as nn.MultiheadAttention's out_proj does
        if type(attention.qkv.weight.data) is not torch.Tensor:
            raise RuntimeError("kernel crashed")
        return run_attention(x, *args, **kwargs)

    monkeypatch.setattr(attention, "forward", attention_without_a_kernel_for_int8)
    callback = QuantizeOnFit("int8_dynamic", on_error="warn")
    with pytest.warns(UserWarning, match=r"left in place.*kernel crashed"):
        fast_trainer(tmp_path, callbacks=[callback]).fit(model, digits)
    assert callback.summary is None
    assert attention.qkv is qkv and set(linear_weight_types(model.model).values()) == {torch.Tensor}
    model.eval()
    assert model(next(iter(digits.val_dataloader()))[0]).shape == (64, 10)


class EncoderClassifier(L.LightningModule):
    """A plain nn.TransformerEncoder ViT: patch embedding, MHA blocks, head."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Linear(3 * 4 * 4, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(images, kernel_size=4, stride=4).transpose(1, 2)
        return self.head(self.encoder(self.patch(patches)).mean(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_multihead_attention_projections_quantize_through_linear_layers_compile_log_and_load_back(tmp_path, digits):
    L.seed_everything(0, verbose=False)
    model = EncoderClassifier()
    images = next(iter(digits.test_dataloader()))[0]
    callback = QuantizeOnFit(
        "int8_dynamic", compile={"backend": "eager"}, save_path=tmp_path / "int8.ckpt"
    )  # inductor: benchmark's
    logger = CSVLogger(tmp_path)
    fast_trainer(tmp_path, callbacks=[callback], logger=logger).fit(model, digits)
    summary = callback.summary
    assert summary["compile_seconds"] is not None
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    # the target is the child holding the attention blocks: `encoder`
    assert {"quant/layers_quantized", "quant/size_ratio", "quant/compile_seconds"} <= set(metrics)
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["quant/config"] == "int8_dynamic" and hparams["quant/inference_precision"] == "32-true"
    # nn.MultiheadAttention hands its raw weights to one kernel: it became linear projections, which quantize
    assert summary["split_attention"] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert summary["skipped"] == {}
    assert summary["quantized"] == [
        f"layers.{i}.{layer}" for i in (0, 1) for layer in ("self_attn.qkv", "self_attn.out_proj", "linear1", "linear2")
    ]
    attention = model.encoder.layers[0].self_attn
    assert isinstance(attention, MultiheadSelfAttention) and type(attention.qkv.weight.data) is Int8Tensor
    assert summary["output_relative_error"] < 0.05
    model.eval()
    with torch.no_grad():
        expected = model(images)
    loaded = load_compressed(EncoderClassifier, tmp_path / "int8.ckpt").eval()
    assert isinstance(loaded.encoder.layers[1].self_attn, MultiheadSelfAttention)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected)
    bare = tmp_path / "weights.pt"  # no records: the split is read from the saved keys
    torch.save(model.state_dict(), bare)
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(EncoderClassifier, bare).eval()(images), expected)


def test_a_failing_quantization_puts_nn_multihead_attention_back(tmp_path, digits):
    model = EncoderClassifier()
    attentions = [layer.self_attn for layer in model.encoder.layers]
    keys = set(model.state_dict())
    callback = QuantizeOnFit(FailsOnSmallLayersConfig(), on_error="warn")
    with pytest.warns(UserWarning, match=r"left in place.*no kernel for this shape"):
        fast_trainer(tmp_path, callbacks=[callback]).fit(model, digits)
    assert [layer.self_attn for layer in model.encoder.layers] == attentions  # the very modules, as trained
    assert set(model.state_dict()) == keys and recorded_edits(model) == []


def test_split_multihead_attention_is_the_same_function_with_masks_weights_and_either_layout():
    torch.manual_seed(0)
    for batch_first in (True, False):
        attention = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        split = MultiheadSelfAttention.from_multihead(attention)
        assert split.qkv.weight is attention.in_proj_weight and split.out_proj.weight is attention.out_proj.weight
        x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
        padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
        for options in (
            {"need_weights": False},
            {"key_padding_mask": padding, "average_attn_weights": False},
            {"attn_mask": torch.randn(5, 5)},
            {"attn_mask": torch.rand(5, 5) > 0.7, "need_weights": False},
        ):
            expected, expected_weights = attention(x, x, x, **options)
            out, weights = split(x, x, x, **options)
            torch.testing.assert_close(out, expected)
            assert (weights is None) == (expected_weights is None)
            if weights is not None:
                torch.testing.assert_close(weights, expected_weights)
    with pytest.raises(ValueError, match="self-attention"):
        split(x, torch.randn_like(x), x)
    with pytest.raises(ValueError, match="cross-attention"):
        MultiheadSelfAttention.from_multihead(nn.MultiheadAttention(16, 4, kdim=8, vdim=8))


def test_checkpoints_before_quantization_resume_and_the_saved_quantized_model_loads(
    tmp_path, tiny_classifier, digits, safe_loads
):
    model = tiny_classifier()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = fast_trainer(
        tmp_path,
        callbacks=[QuantizeOnFit("int8_dynamic", save_path=tmp_path / "int8.ckpt"), checkpoints],
        enable_checkpointing=True,
    )
    trainer.fit(model, digits)

    saved = torch.load(tmp_path / "int8.ckpt", weights_only=True)  # safe loading works for torchao's tensors
    assert saved[STRUCTURE_KEY][-1]["kind"] == "quantize"
    assert saved[STRUCTURE_KEY][-1]["layers"] == list(linear_weight_types(model.model))
    loaded = load_compressed(DigitsClassifier, tmp_path / "int8.ckpt")
    assert set(linear_weight_types(loaded.model).values()) == {Int8Tensor}
    images = next(iter(digits.test_dataloader()))[0]
    model.eval()
    torch.testing.assert_close(loaded(images), model(images))

    last = torch.load(tmp_path / "last.ckpt", weights_only=True)  # saved during training: fp32, no quantize record
    assert all(record["kind"] != "quantize" for record in last.get(STRUCTURE_KEY, []))
    resumed_model = tiny_classifier()
    resumed = fast_trainer(tmp_path, callbacks=[QuantizeOnFit("int8_dynamic")], max_epochs=2)
    resumed.fit(resumed_model, digits, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.current_epoch == 2
    assert set(linear_weight_types(resumed_model.model).values()) == {Int8Tensor}

    with pytest.raises(RuntimeError, match="saved after the model was quantized"):
        fast_trainer(tmp_path, callbacks=[QuantizeOnFit()], max_epochs=3).fit(
            tiny_classifier(), digits, ckpt_path=tmp_path / "int8.ckpt"
        )
    assert {"int8.ckpt", "last.ckpt"} <= set(safe_loads)  # load_compressed and the resumes read them safely

    crafted = torch.load(tmp_path / "int8.ckpt", weights_only=True)
    crafted["extra"] = Path("not plain data")  # what a tampered file could carry
    torch.save(crafted, tmp_path / "crafted.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint_path=.*crafted.ckpt"):
        load_compressed(DigitsClassifier, tmp_path / "crafted.ckpt")


def test_ddp_every_rank_ends_with_the_same_quantized_model_and_rank_zero_writes(tmp_path):
    reports = run_ddp_script(
        f"""
        import lightning as L
        from torch import nn
        from lightning_vitcompress import QuantizeOnFit
        from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        L.seed_everything(0)
        model = DigitsClassifier(**{TINY!r})
        trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, limit_train_batches=2,
                            limit_val_batches=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[QuantizeOnFit("int8_dynamic", qat_start_epoch=1, save_path=OUT + "/int8.ckpt")])
        trainer.fit(model, DigitsDataModule(batch_size=16))
        model.eval()
        torch.manual_seed(1)
        with torch.no_grad():
            out = model(torch.randn(2, 3, 32, 32))
        types = sorted({{type(m.weight.data).__name__ for m in model.modules() if isinstance(m, nn.Linear)}})
        report(trainer, types=types, output=out.flatten().tolist())
        """,
        tmp_path,
    )
    assert [r["types"] for r in reports] == [["Int8Tensor"], ["Int8Tensor"]]
    assert reports[0]["output"] == pytest.approx(reports[1]["output"], abs=1e-6)
    assert (tmp_path / "int8.ckpt").is_file()


def test_ddp_ranks_calibrate_on_their_own_batches_and_end_with_the_same_static_scales(tmp_path):
    reports = run_ddp_script(
        f"""
        import lightning as L
        from lightning_vitcompress import X86Int8StaticLinear
        from lightning_vitcompress import QuantizeOnFit
        from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        L.seed_everything(0)
        model = DigitsClassifier(**{TINY!r})
        callback = QuantizeOnFit("int8_static_x86", calibration_batches=1, compile=False)
        seen = []
        trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, limit_train_batches=2,
                            limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
        model.model.register_forward_pre_hook(lambda m, args: seen.append(float(args[0].sum())) if m.training else None)
        trainer.fit(model, DigitsDataModule(batch_size=16))
        scales = [(m.input_scale, m.input_zero_point) for m in model.modules() if isinstance(m, X86Int8StaticLinear)]
        report(trainer, first_batch=seen[0], scales=scales)
        """,
        tmp_path,
    )
    assert reports[0]["first_batch"] != reports[1]["first_batch"]  # each rank calibrated on its own data...
    assert len(reports[0]["scales"]) == 2 * 4 + 1
    assert reports[0]["scales"] == reports[1]["scales"]  # ...and the ranges were merged across ranks


# ------------------------------------------------------------------ nothing lost: failures injected mid-action
class BeforeQuantizing(Callback):
    """Listed before QuantizeOnFit: records the trained model's outputs and weights just before it acts."""

    def __init__(self) -> None:
        self.images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        self.outputs: torch.Tensor = torch.empty(0)
        self.state: dict = {}

    def on_train_end(self, trainer, pl_module):
        # after a failure the trained fp32 layers are back, without QAT's fake quantization
        plain = copy.deepcopy(pl_module)
        for name, module in list(plain.named_modules()):
            if isinstance(module, FakeQuantizedLinear):
                set_submodule(plain, name, module.to_linear())
        self.outputs = self.run(plain)
        self.state = copy.deepcopy(plain.state_dict())

    def run(self, pl_module) -> torch.Tensor:
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            outputs = pl_module(self.images.to(pl_module.device)).cpu()
        pl_module.train(was_training)
        return outputs

    def assert_unchanged(self, pl_module) -> None:
        assert set(linear_weight_types(pl_module.model).values()) == {torch.Tensor}
        assert not any(isinstance(m, (FakeQuantizedLinear, X86Int8DynamicLinear)) for m in pl_module.modules())
        state = pl_module.state_dict()
        assert set(state) == set(self.state)
        assert all(torch.equal(state[key], value) for key, value in self.state.items())
        assert torch.equal(self.run(pl_module), self.outputs)


@pytest.mark.parametrize("qat", [False, True])
def test_quantize_failing_midway_through_the_layers_leaves_the_outputs_unchanged(
    tmp_path, tiny_classifier, digits, monkeypatch, qat
):
    """The static config quantizes layer by layer: the third ``quantize_`` call fails."""
    real_quantize, calls = torchao.quantization.quantize_, []

    class FailFromTrainEnd(Callback):
        def on_train_start(self, trainer, pl_module):  # after the setup dry run, which must succeed
            def quantize_(*args, **kwargs):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError("injected: out of memory")
                return real_quantize(*args, **kwargs)

            monkeypatch.setattr(torchao.quantization, "quantize_", quantize_)

    model, before = tiny_classifier(), BeforeQuantizing()
    callback = QuantizeOnFit("int8_static_x86", qat_start_epoch=0 if qat else None, compile=False)
    with pytest.raises(RuntimeError, match=r"full-precision model was left in place.*injected: out of memory"):
        fast_trainer(tmp_path, callbacks=[before, callback, FailFromTrainEnd()], limit_train_batches=2).fit(
            model, digits
        )
    assert len(calls) == 3
    before.assert_unchanged(model)
    assert callback.summary is None and not recorded_edits(model)


def _failing_save(monkeypatch, trainer, failing: Path) -> None:
    real_save = trainer.strategy.save_checkpoint

    def save_checkpoint(checkpoint, filepath, *args, **kwargs):
        if Path(filepath) == failing:
            Path(filepath).write_bytes(b"partial")  # as a full disk would leave it
            raise OSError(28, "No space left on device")
        return real_save(checkpoint, filepath, *args, **kwargs)

    monkeypatch.setattr(trainer.strategy, "save_checkpoint", save_checkpoint)


@pytest.mark.parametrize("qat", [False, True])
def test_a_failed_save_of_the_quantized_model_puts_the_trained_model_back_and_says_where_the_fp32_copy_is(
    tmp_path, tiny_classifier, digits, monkeypatch, qat
):
    model, before = tiny_classifier(), BeforeQuantizing()
    callback = QuantizeOnFit(
        "int8_dynamic",
        save_path=tmp_path / "int8.ckpt",
        save_fp32_path=tmp_path / "fp32.ckpt",
        qat_start_epoch=0 if qat else None,
    )
    trainer = fast_trainer(tmp_path, callbacks=[before, callback], limit_train_batches=2)
    _failing_save(monkeypatch, trainer, tmp_path / "int8.ckpt")
    with pytest.raises(
        RuntimeError,
        match=r"save_path='.*int8.ckpt' failed \(OSError.*No space.*full precision.*save_fp32_path='.*fp32",
    ):
        trainer.fit(model, digits)
    before.assert_unchanged(model)
    assert callback.summary is None and not recorded_edits(model)
    assert not (tmp_path / "int8.ckpt").exists()  # the half-written file was removed
    fp32 = load_compressed(DigitsClassifier, tmp_path / "fp32.ckpt")  # the copy named in the message is complete
    assert torch.equal(before.run(fp32), before.outputs)


def test_a_failed_save_warns_with_on_error_warn_and_says_no_fp32_copy_was_written(
    tmp_path, tiny_classifier, digits, monkeypatch
):
    model, before = tiny_classifier(), BeforeQuantizing()
    callback = QuantizeOnFit("int8_dynamic", save_path=tmp_path / "int8.ckpt", on_error="warn")
    trainer = fast_trainer(tmp_path, callbacks=[before, callback], limit_train_batches=2)
    _failing_save(monkeypatch, trainer, tmp_path / "int8.ckpt")
    with pytest.warns(UserWarning, match=r"save_path=.*no fp32 copy was written \(pass save_fp32_path"):
        trainer.fit(model, digits)
    before.assert_unchanged(model)


def test_a_failed_fp32_save_stops_before_quantizing(tmp_path, tiny_classifier, digits, monkeypatch):
    model, before = tiny_classifier(), BeforeQuantizing()
    callback = QuantizeOnFit("int8_dynamic", save_path=tmp_path / "int8.ckpt", save_fp32_path=tmp_path / "fp32.ckpt")
    trainer = fast_trainer(tmp_path, callbacks=[before, callback], limit_train_batches=2)
    _failing_save(monkeypatch, trainer, tmp_path / "fp32.ckpt")
    with pytest.raises(RuntimeError, match=r"did not quantize: writing .*save_fp32_path='.*fp32.ckpt' failed"):
        trainer.fit(model, digits)
    before.assert_unchanged(model)
    assert not (tmp_path / "int8.ckpt").exists()


def test_a_directory_as_save_path_is_refused_before_training_naming_the_argument(tmp_path, tiny_classifier, digits):
    (tmp_path / "out").mkdir()
    trainer = fast_trainer(tmp_path, callbacks=[QuantizeOnFit("int8_dynamic", save_path=tmp_path / "out")])
    with pytest.raises(IsADirectoryError, match=r"save_path='.*out' is a directory; pass a file path in it"):
        trainer.fit(tiny_classifier(), digits)
    assert trainer.global_step == 0


def test_resuming_qat_with_the_same_arguments_or_before_qat_started_is_allowed(tmp_path, tiny_classifier, digits):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    callback = QuantizeOnFit("int8_dynamic", qat_start_epoch=1, skip="head")
    fast_trainer(
        tmp_path, callbacks=[callback, checkpoints], max_epochs=2, limit_train_batches=1, enable_checkpointing=True
    ).fit(tiny_classifier(), digits)
    saved = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)["callbacks"]["QuantizeOnFit"]
    assert saved == {
        "config": "int8_dynamic",
        "qat_start_epoch": 1,
        "skip": ["head"],
        "skip_callable": False,
        "qat_active": True,
    }
    # before QAT started anything may change; in QAT, the same arguments resume
    for ckpt, kwargs in (("epoch=0.ckpt", dict(config="int8_weight_only")), ("epoch=1.ckpt", dict(skip=["head"]))):
        arguments = {"config": "int8_dynamic", "qat_start_epoch": 1, "skip": "head", **kwargs}
        resumed = fast_trainer(tmp_path, callbacks=[QuantizeOnFit(**arguments)], max_epochs=3, limit_train_batches=1)
        resumed.fit(tiny_classifier(), digits, ckpt_path=tmp_path / ckpt)
        assert resumed.current_epoch == 3
    with pytest.raises(ValueError, match=r"skip=\['blocks.0.\*'\], but the checkpoint .* skip=\['head'\]"):
        fast_trainer(
            tmp_path, callbacks=[QuantizeOnFit("int8_dynamic", qat_start_epoch=1, skip="blocks.0.*")], max_epochs=3
        ).fit(tiny_classifier(), digits, ckpt_path=tmp_path / "epoch=1.ckpt")


def test_int8_static_x86_calibrates_a_model_left_in_eval_mode(tmp_path, tiny_classifier, digits):
    """``timm.create_model(...).eval()`` before wrapping: Lightning trains it in eval mode; calibration still
    captures the training steps' inputs (not the validation ones)."""
    model = tiny_classifier()
    model.model.eval()
    callback = QuantizeOnFit("int8_static_x86", calibration_batches=2)
    trainer = fast_trainer(tmp_path, callbacks=[callback], limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, digits)
    assert callback.summary is not None and callback.summary["quantized"]
    assert {type(m) for m in model.model.modules() if isinstance(m, (nn.Linear, X86Int8StaticLinear))} == {
        X86Int8StaticLinear
    }
