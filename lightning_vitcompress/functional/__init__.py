"""Compression without a Trainer: pure torch / torchao functions the callbacks are built on.

Example::

    from lightning_vitcompress.functional import compare_throughput, prune_vit, quantize_model
    prune_vit(vit, 0.5, torch.randn(1, 3, 224, 224))
    quantize_model(vit, "int8_dynamic")
"""

from lightning_vitcompress._measure import (
    compare_throughput,
    count_macs,
    count_parameters,
    measure_accuracy,
    measure_latency,
    serialized_size_bytes,
    thread_count,
)
from lightning_vitcompress._model import find_attention_blocks
from lightning_vitcompress._x86_int8 import compile_frozen
from lightning_vitcompress.benchmark import benchmark_model, compare_models
from lightning_vitcompress.nystrom import NystromAttention
from lightning_vitcompress.pruning import prune_vit
from lightning_vitcompress.quantization import INFERENCE_PRECISIONS, NAMED_CONFIGS, quantize_model

__all__ = [
    "INFERENCE_PRECISIONS",
    "NAMED_CONFIGS",
    "NystromAttention",
    "benchmark_model",
    "compare_models",
    "compare_throughput",
    "compile_frozen",
    "count_macs",
    "count_parameters",
    "find_attention_blocks",
    "measure_accuracy",
    "measure_latency",
    "prune_vit",
    "quantize_model",
    "serialized_size_bytes",
    "thread_count",
]
