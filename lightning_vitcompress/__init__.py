"""Lightning callbacks that compress Vision Transformers.

Example::

    >>> from lightning import Trainer
    >>> from lightning_vitcompress import BenchmarkCallback, PruningSchedule, QuantizeOnFit
    >>> trainer = Trainer(callbacks=[PruningSchedule(0.5), QuantizeOnFit("int8_dynamic"), BenchmarkCallback()])

The callbacks (and everything that needs Lightning) load on first use, so
``lightning_vitcompress.functional`` works where only torch, timm and torchao
are installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_vitcompress import _versions  # noqa: F401 - first: an old dependency is named, not met mid-import
from lightning_vitcompress.functional import (
    DistillConfig,
    ExportConfig,
    Int8DynamicX86Config,
    Int8StaticX86Config,
    NystromAttention,
    NystromConfig,
    PruneConfig,
    TokenMergingConfig,
    X86Int8DynamicLinear,
    X86Int8StaticLinear,
    benchmark_model,
    compare_models,
    compile_frozen,
    export_compressed,
    find_attention_blocks,
    load_artifact,
    load_compressed,
    merge_tokens,
    prune_vit,
    quantize_model,
    resolve_target_model,
    save_safetensors,
    swap_attention,
)

if TYPE_CHECKING:
    from lightning_vitcompress._base import CompressionCallback
    from lightning_vitcompress._training_state import refresh_after_structural_change
    from lightning_vitcompress.callbacks import (
        BenchmarkCallback,
        CompressionPlan,
        DistillationTeacher,
        ExportOnFit,
        NystromSwap,
        PruningSchedule,
        QuantizeOnFit,
        TokenMerging,
    )

__version__ = "0.1.0.dev0"

#: public names that need Lightning, and the module each lives in
_LIGHTNING_NAMES = {
    "BenchmarkCallback": "lightning_vitcompress.callbacks",
    "CompressionPlan": "lightning_vitcompress.callbacks",
    "DistillationTeacher": "lightning_vitcompress.callbacks",
    "ExportOnFit": "lightning_vitcompress.callbacks",
    "NystromSwap": "lightning_vitcompress.callbacks",
    "PruningSchedule": "lightning_vitcompress.callbacks",
    "QuantizeOnFit": "lightning_vitcompress.callbacks",
    "TokenMerging": "lightning_vitcompress.callbacks",
    "CompressionCallback": "lightning_vitcompress._base",
    "refresh_after_structural_change": "lightning_vitcompress._training_state",
}


def __getattr__(name: str) -> Any:
    module = _LIGHTNING_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_vitcompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


__all__ = [
    "BenchmarkCallback",
    "CompressionCallback",
    "CompressionPlan",
    "DistillConfig",
    "DistillationTeacher",
    "ExportConfig",
    "ExportOnFit",
    "Int8DynamicX86Config",
    "Int8StaticX86Config",
    "NystromAttention",
    "NystromConfig",
    "NystromSwap",
    "PruneConfig",
    "PruningSchedule",
    "QuantizeOnFit",
    "TokenMerging",
    "TokenMergingConfig",
    "X86Int8DynamicLinear",
    "X86Int8StaticLinear",
    "benchmark_model",
    "compare_models",
    "compile_frozen",
    "export_compressed",
    "find_attention_blocks",
    "load_artifact",
    "load_compressed",
    "merge_tokens",
    "prune_vit",
    "quantize_model",
    "refresh_after_structural_change",
    "resolve_target_model",
    "save_safetensors",
    "swap_attention",
]
