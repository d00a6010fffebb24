"""The Lightning callbacks, one per file: each decides *when* and *how much*; ``functional`` does *what*."""

from lightning_vitcompress.callbacks.benchmark import BenchmarkCallback
from lightning_vitcompress.callbacks.distillation import DistillationTeacher
from lightning_vitcompress.callbacks.export import ExportOnFit
from lightning_vitcompress.callbacks.nystrom import NystromSwap
from lightning_vitcompress.callbacks.plan import CompressionPlan
from lightning_vitcompress.callbacks.pruning import PruningSchedule
from lightning_vitcompress.callbacks.quantization import QuantizeOnFit
from lightning_vitcompress.callbacks.token_merging import TokenMerging

__all__ = [
    "BenchmarkCallback",
    "CompressionPlan",
    "DistillationTeacher",
    "ExportOnFit",
    "NystromSwap",
    "PruningSchedule",
    "QuantizeOnFit",
    "TokenMerging",
]
