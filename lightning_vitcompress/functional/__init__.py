"""Compression without a Trainer: the pure torch / torchao functions the callbacks are built on.

Nothing here imports Lightning, so a deployment environment can use it with
torch, timm and torchao alone.

Example::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional import prune_vit, quantize_model
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    >>> summary = prune_vit(vit, 0.5, torch.randn(1, 3, 32, 32))
    >>> summary = quantize_model(vit, "int8_dynamic")
    >>> vit.embed_dim, vit(torch.randn(2, 3, 32, 32)).shape
    (96, torch.Size([2, 1000]))
"""

from lightning_vitcompress._model import find_attention_blocks, resolve_target_model
from lightning_vitcompress._structure import (
    load_compressed,
    record_edit,
    register_replay,
    replay_edits,
    save_safetensors,
)
from lightning_vitcompress.functional.distill import (
    DistillConfig,
    combine_losses,
    hard_distillation_loss,
    load_teacher,
    soft_distillation_loss,
)
from lightning_vitcompress.functional.export import (
    ArtifactMismatchError,
    ExportConfig,
    LoadedArtifact,
    check_exportable,
    export_compressed,
    load_artifact,
)
from lightning_vitcompress.functional.measure import (
    compare_throughput,
    count_macs,
    count_parameters,
    measure_accuracy,
    measure_latency,
    serialized_size_bytes,
    thread_count,
)
from lightning_vitcompress.functional.multihead_attention import MultiheadSelfAttention, split_multihead_attention
from lightning_vitcompress.functional.nystrom import NystromAttention, NystromConfig, swap_attention
from lightning_vitcompress.functional.prune import PruneConfig, prune_vit
from lightning_vitcompress.functional.quantize import ModelInputs, quantize_model
from lightning_vitcompress.functional.quantize_configs import (
    INFERENCE_PRECISIONS,
    QUANTIZATION_CONFIGS,
    DefaultChoice,
    QuantizationSpec,
    default_quantization,
    resolve_quantization,
)
from lightning_vitcompress.functional.quantize_layers import select_layers
from lightning_vitcompress.functional.report import benchmark_model, compare_models, format_report
from lightning_vitcompress.functional.sdpa import DecomposedAttention, decomposed_attention
from lightning_vitcompress.functional.token_merging import (
    TokenMergingConfig,
    merge_tokens,
    merged_token_counts,
    remove_token_merging,
    token_merging_paused,
)
from lightning_vitcompress.functional.x86_int8 import (
    Int8DynamicX86Config,
    Int8StaticX86Config,
    X86Int8DynamicLinear,
    X86Int8StaticLinear,
    compile_frozen,
)

__all__ = [
    "INFERENCE_PRECISIONS",
    "QUANTIZATION_CONFIGS",
    "ArtifactMismatchError",
    "DecomposedAttention",
    "DefaultChoice",
    "DistillConfig",
    "ExportConfig",
    "Int8DynamicX86Config",
    "Int8StaticX86Config",
    "LoadedArtifact",
    "ModelInputs",
    "MultiheadSelfAttention",
    "NystromAttention",
    "NystromConfig",
    "PruneConfig",
    "QuantizationSpec",
    "TokenMergingConfig",
    "X86Int8DynamicLinear",
    "X86Int8StaticLinear",
    "benchmark_model",
    "check_exportable",
    "combine_losses",
    "compare_models",
    "compare_throughput",
    "compile_frozen",
    "count_macs",
    "count_parameters",
    "decomposed_attention",
    "default_quantization",
    "export_compressed",
    "find_attention_blocks",
    "format_report",
    "hard_distillation_loss",
    "load_artifact",
    "load_compressed",
    "load_teacher",
    "measure_accuracy",
    "measure_latency",
    "merge_tokens",
    "merged_token_counts",
    "prune_vit",
    "quantize_model",
    "record_edit",
    "register_replay",
    "remove_token_merging",
    "replay_edits",
    "resolve_quantization",
    "resolve_target_model",
    "save_safetensors",
    "select_layers",
    "serialized_size_bytes",
    "soft_distillation_loss",
    "split_multihead_attention",
    "swap_attention",
    "thread_count",
    "token_merging_paused",
]
