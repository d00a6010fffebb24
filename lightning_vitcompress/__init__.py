"""Lightning callbacks that compress Vision Transformers.

Example::

    from lightning_vitcompress import BenchmarkCallback, PruningSchedule, QuantizeOnFit
    trainer = Trainer(callbacks=[PruningSchedule(0.5), QuantizeOnFit("int8_dynamic"), BenchmarkCallback()])
"""

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._model import find_attention_blocks, resolve_target_model
from lightning_vitcompress._structure import load_compressed, save_safetensors
from lightning_vitcompress._x86_int8 import (
    Int8DynamicX86Config,
    Int8StaticX86Config,
    X86Int8DynamicLinear,
    X86Int8StaticLinear,
    compile_frozen,
)
from lightning_vitcompress.benchmark import BenchmarkCallback, benchmark_model, compare_models
from lightning_vitcompress.distillation import DistillationTeacher
from lightning_vitcompress.nystrom import NystromAttention, NystromSwap
from lightning_vitcompress.pruning import PruningSchedule
from lightning_vitcompress.quantization import QuantizeOnFit, quantize_model

__version__ = "0.1.0.dev0"

__all__ = [
    "BenchmarkCallback",
    "CompressionCallback",
    "DistillationTeacher",
    "NystromAttention",
    "NystromSwap",
    "PruningSchedule",
    "QuantizeOnFit",
    "Int8DynamicX86Config",
    "Int8StaticX86Config",
    "X86Int8DynamicLinear",
    "X86Int8StaticLinear",
    "compile_frozen",
    "benchmark_model",
    "compare_models",
    "find_attention_blocks",
    "load_compressed",
    "quantize_model",
    "resolve_target_model",
    "save_safetensors",
]
