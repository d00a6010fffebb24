"""Attention written out as matmuls under bf16 CPU inference (functional/sdpa.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_vitcompress.functional import DecomposedAttention, decomposed_attention
from lightning_vitcompress.functional.x86_int8 import cpu_supports_bfloat16, run_in_precision


def _qkv(batch: int = 2, heads: int = 3, queries: int = 17, keys: int = 17, width: int = 8, kv_heads: int = 0):
    torch.manual_seed(0)
    kv = kv_heads or heads
    return (
        torch.randn(batch, heads, queries, width),
        torch.randn(batch, kv, keys, width),
        torch.randn(batch, kv, keys, width),
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"scale": 0.3},
        {"is_causal": True},
        {"attn_mask": torch.rand(17, 17) > 0.3},
        {"attn_mask": torch.randn(2, 1, 17, 17)},
    ],
    ids=["plain", "scale", "causal", "bool-mask", "float-mask"],
)
def test_decomposed_attention_matches_the_fused_kernel(kwargs):
    q, k, v = _qkv()
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype == torch.bool:
        mask[:, 0] = True  # no fully masked row: both sides would return NaN there
    torch.testing.assert_close(
        decomposed_attention(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs)
    )


def test_decomposed_attention_handles_cross_attention_and_grouped_heads():
    q, k, v = _qkv(queries=5, keys=11, heads=4, kv_heads=2)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(decomposed_attention(q, k, v, enable_gqa=True), expected)


class _Attend(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = k = v = x.unflatten(-1, (2, -1)).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout).transpose(1, 2).flatten(2)


def _ops_traced(module: nn.Module, x: torch.Tensor, mode: DecomposedAttention) -> set[str]:
    with mode:
        program = torch.export.export(module, (x,))
    return {str(node.target) for node in program.graph.nodes if node.op == "call_function"}


def test_the_mode_writes_attention_out_in_the_traced_graph():
    ops = _ops_traced(_Attend(), torch.randn(2, 10, 16), DecomposedAttention())
    assert not any("scaled_dot_product" in op for op in ops), ops
    assert any("softmax" in op for op in ops), ops


def test_the_mode_leaves_long_sequences_to_the_fused_kernel():
    ops = _ops_traced(_Attend(), torch.randn(2, 10, 16), DecomposedAttention(max_tokens=9))
    assert any("scaled_dot_product" in op for op in ops), ops


def test_the_mode_leaves_dropout_to_the_fused_kernel():
    x = torch.randn(2, 10, 16)
    with DecomposedAttention():
        with_dropout = _Attend(dropout=0.5)(x)
        without = _Attend()(x)
    # a rewrite that dropped dropout_p would return the dropout-free result
    assert not torch.allclose(with_dropout, without)


def test_max_tokens_must_be_positive():
    with pytest.raises(ValueError, match="max_tokens=0"):
        DecomposedAttention(max_tokens=0)


@pytest.mark.skipif(not cpu_supports_bfloat16(), reason="needs a CPU with native bf16 (AVX512-BF16 or AMX)")
def test_bf16_inference_runs_attention_decomposed_and_stays_close():
    module, x = _Attend().eval(), torch.randn(2, 10, 16)
    with torch.inference_mode():
        reference = module(x)
        out = run_in_precision(module, torch.bfloat16, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=0.05, rtol=0.05)
    program = torch.export.export(_InPrecision(module), (x,))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("scaled_dot_product" in op for op in ops), ops


class _InPrecision(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_in_precision(self.module, torch.bfloat16, x)


def _compiled_calls(compile_model) -> str:
    graphs: list[torch.fx.GraphModule] = []

    def capture(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    module = _Attend().eval()
    compile_model(module, capture)
    with torch.inference_mode():
        module(torch.randn(2, 10, 16))
    return " ".join(str(node.target) for graph in graphs for node in graph.graph.nodes)


@pytest.mark.parametrize("decompose", [True, False])
def test_compile_frozen_decomposes_attention_unless_told_not_to(decompose):
    from lightning_vitcompress.functional import compile_frozen

    calls = _compiled_calls(
        lambda module, backend: compile_frozen(
            module, autocast_dtype=torch.bfloat16, decompose_attention=decompose, backend=backend
        )
    )
    assert ("scaled_dot_product_attention" in calls) is not decompose, calls


def test_quantize_on_fit_passes_decompose_attention_to_the_x86_compile():
    from lightning_vitcompress import QuantizeOnFit
    from lightning_vitcompress.functional import QUANTIZATION_CONFIGS

    compile = QuantizeOnFit("int8_static_x86", compile={"decompose_attention": False}).compile
    # the callback's compile step: spec.compile(model, precision, **compile)
    calls = _compiled_calls(
        lambda module, backend: QUANTIZATION_CONFIGS["int8_static_x86"].compile(
            module, "bf16-mixed", **compile, backend=backend
        )
    )
    assert "scaled_dot_product_attention" in calls, calls
