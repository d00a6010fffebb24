"""QuantizeOnFit()'s default: the int8 config fast on the device the Trainer runs on, read from the hardware.

The choice itself (``default_quantization``) is checked for every kind of machine by faking what the hardware
reports; one real fit checks that the callback applies what this machine reports, says why, and warns where the
model is too narrow for int8 to pay.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import fast_trainer

import lightning_vitcompress.functional.quantize_configs as registry
from lightning_vitcompress import QuantizeOnFit
from lightning_vitcompress.callbacks.quantization import INT8_PAYS_FROM_WIDTH
from lightning_vitcompress.functional import default_quantization
from lightning_vitcompress.functional.x86_int8 import X86Int8StaticLinear


def _hardware(monkeypatch, *, int8_dot: bool, bf16: bool) -> None:
    monkeypatch.setattr(registry, "cpu_supports_int8_dot_product", lambda: int8_dot)
    monkeypatch.setattr(registry, "cpu_supports_bfloat16", lambda: bf16)


@pytest.mark.parametrize(
    ("int8_dot", "bf16", "calibrates", "config", "precision"),
    [
        (True, True, True, "int8_static_x86", "bf16-mixed"),  # AMX / Zen 4: VNNI and native bf16
        (True, False, True, "int8_static_x86", "32-true"),  # VNNI without bf16 (Cascade Lake)
        (True, True, False, "int8_dynamic_x86", "bf16-mixed"),  # no training batch to calibrate on
        (False, False, True, "int8_dynamic", "32-true"),  # ARM, or x86 without VNNI: the portable path
    ],
)
def test_cpu_default_follows_what_the_hardware_reports(monkeypatch, int8_dot, bf16, calibrates, config, precision):
    _hardware(monkeypatch, int8_dot=int8_dot, bf16=bf16)
    choice = default_quantization(torch.device("cpu"), calibrates=calibrates)
    assert (choice.config, choice.inference_precision) == (config, precision)
    assert choice.reason and ("VNNI" in choice.reason) == int8_dot


@pytest.mark.parametrize(
    ("capability", "config"), [((9, 0), "float8_dynamic"), ((8, 9), "float8_dynamic"), ((8, 0), "int8_dynamic")]
)
def test_cuda_default_is_float8_where_the_gpu_has_it_else_int8(monkeypatch, capability, config):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    choice = default_quantization(torch.device("cuda", 0))
    assert choice.config == config and choice.inference_precision == "32-true"
    assert f"{capability[0]}.{capability[1]}" in choice.reason


def test_the_default_applies_this_machines_choice_and_says_why(tmp_path, tiny_classifier, digits, caplog, recwarn):
    expected = default_quantization(torch.device("cpu"))
    model = tiny_classifier()
    callback = QuantizeOnFit(calibration_batches=1)
    assert callback.spec is None and callback.default  # chosen at setup, where the device is known
    with caplog.at_level(logging.INFO):
        fast_trainer(tmp_path, callbacks=[callback], limit_train_batches=2).fit(model, digits)
    assert callback.default_choice == expected and callback.spec.name == expected.config
    assert callback.summary["config"] == expected.config
    assert callback.summary["inference_precision"] == callback.inference_precision == expected.inference_precision
    assert f"config={expected.config!r}" in caplog.text and expected.reason in caplog.text
    if expected.config == "int8_static_x86":
        assert any(isinstance(m, X86Int8StaticLinear) for m in model.model.modules())
        assert callback.summary["compile_seconds"] is not None  # compiled, as the x86 configs are fast
        # compiled x86 int8 paid even at width 64 (bench_int8_width.py): no narrow-model warning
        assert not [w for w in recwarn if "runs eager here" in str(w.message)]


def test_without_int8_dot_products_the_default_is_portable_and_a_given_precision_is_checked(
    tmp_path, tiny_classifier, digits, monkeypatch
):
    _hardware(monkeypatch, int8_dot=False, bf16=True)
    callback = QuantizeOnFit(inference_precision="32-true")
    model = tiny_classifier()
    widest = max(m.in_features for m in model.model.modules() if isinstance(m, torch.nn.Linear))
    assert widest < INT8_PAYS_FROM_WIDTH
    with pytest.warns(UserWarning, match=rf"config='int8_dynamic' runs eager here.*takes {widest} features"):
        fast_trainer(tmp_path, callbacks=[callback], limit_train_batches=2).fit(model, digits)
    assert callback.summary["config"] == "int8_dynamic" and callback.inference_precision == "32-true"

    trainer = fast_trainer(tmp_path, callbacks=[QuantizeOnFit(inference_precision="bf16-mixed")])
    with pytest.raises(ValueError, match=r"inference_precision='bf16-mixed' needs an x86 config.*'int8_dynamic'"):
        trainer.fit(tiny_classifier(), digits)
    assert trainer.global_step == 0


def test_a_bad_precision_is_refused_in_the_constructor_even_before_the_config_is_known():
    with pytest.raises(ValueError, match=r"inference_precision='bf16'.*\['32-true', 'bf16-mixed'\]"):
        QuantizeOnFit(inference_precision="bf16")
