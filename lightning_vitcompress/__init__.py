"""Lightning callbacks that compress Vision Transformers.

Example::

    from lightning_vitcompress import BenchmarkCallback
    trainer = Trainer(callbacks=[BenchmarkCallback()])
"""

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._model import find_attention_blocks, resolve_target_model
from lightning_vitcompress._structure import load_compressed
from lightning_vitcompress.benchmark import BenchmarkCallback, benchmark_model, compare_models

__version__ = "0.1.0.dev0"

__all__ = [
    "BenchmarkCallback",
    "CompressionCallback",
    "benchmark_model",
    "compare_models",
    "find_attention_blocks",
    "load_compressed",
    "resolve_target_model",
]
