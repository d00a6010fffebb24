"""Which linear layers lose the most when quantized: measured one layer at a time.

Pure torch / torchao (no Lightning). ``QuantizeOnFit(max_accuracy_drop=...)``
keeps the most sensitive layers in full precision until the model is within
its accuracy budget; the ranking comes from :func:`layer_sensitivity`, which
quantizes each selected layer alone (the rest of the model as trained) and
measures how much the model's output moves on real inputs.

Example::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional.quantize_sensitivity import layer_sensitivity
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    >>> selected = ["blocks.0.attn.qkv", "blocks.1.mlp.fc2"]
    >>> ranking = layer_sensitivity(vit, "int8_dynamic", selected, [torch.randn(4, 3, 32, 32)])
    >>> most_sensitive_first = sorted(ranking, key=ranking.get, reverse=True)
    >>> sorted(most_sensitive_first) == sorted(selected), all(change >= 0 for change in ranking.values())
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchao.quantization
from torch import nn

from lightning_vitcompress._model import set_submodule
from lightning_vitcompress.functional.measure import eval_mode, model_device
from lightning_vitcompress.functional.quantize_configs import resolve_quantization
from lightning_vitcompress.functional.quantize_layers import SkipSpec, is_linear, skip_matcher
from lightning_vitcompress.functional.x86_int8 import calibrate_input_ranges
from lightning_vitcompress.models.base import logits_of

__all__ = ["layer_sensitivity", "skip_also"]


def layer_sensitivity(
    model: nn.Module, config: Any, layers: Sequence[str], inputs: Sequence[torch.Tensor]
) -> dict[str, float]:
    """Relative change of ``model``'s output on ``inputs`` when only that layer is quantized with ``config``.

    ``model`` is left as it was (each layer is swapped for a quantized copy and back).
    Calibrated configs (``"int8_static_x86"``) take each layer's range from ``inputs``.
    """
    spec = resolve_quantization(config)
    device = model_device(model)
    batches = [x.to(device) for x in inputs]
    result: dict[str, float] = {}
    with eval_mode(model), torch.no_grad():
        references = [logits_of(model(x)).float() for x in batches]
        ranges = calibrate_input_ranges(model, list(layers), (((x,), {}) for x in batches)) if spec.calibrates else {}
        for name in layers:
            original = model.get_submodule(name)
            if spec.calibrates and name not in ranges:
                result[name] = 0.0  # no input reached it
                continue
            holder = nn.ModuleList([spec.prepared_copy(original)])
            torchao.quantization.quantize_(holder, spec.ptq_config(ranges.get(name)), filter_fn=is_linear)
            set_submodule(model, name, holder[0])
            try:
                change = sum(
                    float((logits_of(model(x)).float() - reference).norm() / reference.norm().clamp_min(1e-12))
                    for x, reference in zip(batches, references)
                )
            finally:
                set_submodule(model, name, original)
            result[name] = change / max(1, len(batches))
    return result


def skip_also(skip: SkipSpec, names: Sequence[str]) -> Callable[[str, nn.Module], bool]:
    """``skip`` widened by the layers ``names`` (kept in full precision too), as one ``fn(name, module)``."""
    matches, extra = skip_matcher(skip), frozenset(names)
    return lambda name, module: name in extra or matches(name, module)
