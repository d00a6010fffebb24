"""Model adapters: every family answers the same questions, and torch-pruning works through them."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
import torch_pruning as tp
from families import CLASSES, DEPTH, HEADS, MLP, WIDTH, MHAViT
from families import hf_vit as _hf
from families import timm_vit as _timm
from families import torchvision_vit as _torchvision
from torch import nn

from lightning_vitcompress.models import (
    HandWrittenAdapter,
    TimmAdapter,
    TorchvisionAdapter,
    TransformersAdapter,
    adapter_for,
    logits_of,
)


@dataclass
class Case:
    build: Callable[[], nn.Module]
    adapter: type
    blocks: list[str]
    prefix: int
    heads: list[str]


TIMM_BLOCKS = [f"blocks.{i}.attn" for i in range(DEPTH)]
TV_BLOCKS = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(DEPTH)]
MHA_BLOCKS = [f"encoder.layers.{i}.self_attn" for i in range(DEPTH)]

CASES = {
    "timm-vit": Case(_timm, TimmAdapter, TIMM_BLOCKS, 1, ["head"]),
    "timm-registers": Case(lambda: _timm(reg_tokens=4), TimmAdapter, TIMM_BLOCKS, 5, ["head"]),
    "timm-deit-distilled": Case(
        lambda: _timm("deit_tiny_distilled_patch16_224"), TimmAdapter, TIMM_BLOCKS, 2, ["head", "head_dist"]
    ),
    "torchvision": Case(_torchvision, TorchvisionAdapter, TV_BLOCKS, 1, ["heads.head"]),
    "hf-vit-eager": Case(
        lambda: _hf("ViTForImageClassification"),
        TransformersAdapter,
        [f"vit.layers.{i}.attention" for i in range(DEPTH)],
        1,
        ["classifier"],
    ),
    "hf-vit-sdpa": Case(
        lambda: _hf("ViTForImageClassification", "sdpa"),
        TransformersAdapter,
        [f"vit.layers.{i}.attention" for i in range(DEPTH)],
        1,
        ["classifier"],
    ),
    "hf-deit": Case(
        lambda: _hf("DeiTForImageClassification", "sdpa"),
        TransformersAdapter,
        [f"deit.layers.{i}.attention" for i in range(DEPTH)],
        2,
        ["classifier"],  # DeiTModel always has both tokens
    ),
    "hf-deit-teacher": Case(
        lambda: _hf("DeiTForImageClassificationWithTeacher"),
        TransformersAdapter,
        [f"deit.layers.{i}.attention" for i in range(DEPTH)],
        2,
        ["cls_classifier", "distillation_classifier"],
    ),
    "mha-batch-first": Case(MHAViT, HandWrittenAdapter, MHA_BLOCKS, 1, ["head"]),
    "mha-seq-first": Case(lambda: MHAViT(batch_first=False), HandWrittenAdapter, MHA_BLOCKS, 1, ["head"]),
}
HEAD_PRUNABLE = [name for name in CASES if adapter_for(CASES[name].build()).capabilities.head_pruning]


def _make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[name].build().eval()


@pytest.mark.parametrize("name", CASES)
def test_adapter_reads_family(name: str) -> None:
    case = CASES[name]
    model = _make(name)
    adapter = adapter_for(model)
    assert type(adapter) is case.adapter

    assert [n for n, _ in adapter.attention_blocks()] == case.blocks
    modules = dict(model.named_modules())
    assert all(modules[n] is m for n, m in adapter.attention_blocks())
    for layout in adapter.layouts():
        assert (layout.embed_dim, layout.num_heads, layout.head_dim) == (WIDTH, HEADS, WIDTH // HEADS)
        assert math.isclose(layout.effective_scale, (WIDTH // HEADS) ** -0.5)
        assert layout.out_proj.out_features == WIDTH
    assert adapter.embed_dim() == WIDTH
    assert adapter.input_shape() == (3, 32, 32)

    tokens = adapter.prefix_tokens()
    assert tokens.count == case.prefix
    assert all(p.parameter.shape[p.dim] == WIDTH for p in tokens.parameters)
    assert any("pos" in p.name for p in tokens.parameters)

    heads = adapter.classifier_heads()
    assert [n for n, _ in heads] == case.heads
    assert all(modules[n] is m and m.out_features == CLASSES for n, m in heads)

    assert [m.out_features for m in adapter.mlp_input_layers()] == [MLP] * DEPTH
    residual = adapter.residual_layers()
    assert residual[0] is adapter.patch_embedding() and len(residual) == 1 + 2 * DEPTH

    logits = adapter.forward_logits(adapter.example_input(2))
    assert logits.shape == (2, CLASSES)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("prune_heads", [False, True], ids=["head-dims-or-embed", "heads"])
def test_torch_pruning_round_trip(name: str, prune_heads: bool) -> None:
    """MetaPruner fed only from the adapter prunes 50%; after fix_attributes the model runs smaller."""
    model = _make(name)
    adapter = adapter_for(model)
    if prune_heads and not adapter.capabilities.head_pruning:
        with pytest.raises(ValueError, match="prune_heads=True"):
            adapter.capabilities.require("head_pruning", "prune_heads=True", adapter.family)
        return
    example = adapter.example_input(2)
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[head for _, head in adapter.classifier_heads()],
        num_heads=adapter.head_groups(),
        prune_num_heads=prune_heads,
        prune_head_dims=not prune_heads,
        head_pruning_ratio=0.5 if prune_heads else 0.0,
        unwrapped_parameters=adapter.unwrapped_parameters(),
        round_to=adapter.embed_multiple_of(),
        output_transform=adapter.logits,
    )
    for group in pruner.step(interactive=True):
        group.prune()
    adapter.fix_attributes(pruner.num_heads)

    with torch.no_grad():
        assert adapter.forward_logits(example).shape == (2, CLASSES)
    assert sum(p.numel() for p in model.parameters()) < 0.6 * before
    layouts = adapter.layouts()
    if prune_heads:
        assert [(lay.num_heads, lay.head_dim) for lay in layouts] == [(HEADS // 2, WIDTH // HEADS)] * DEPTH
    elif adapter.capabilities.head_dim_pruning:
        assert [(lay.num_heads, lay.head_dim) for lay in layouts] == [(HEADS, WIDTH // HEADS // 2)] * DEPTH
    else:  # nn.MultiheadAttention: the embedding and head_dim shrink together, heads stay
        assert [(lay.num_heads, lay.head_dim) for lay in layouts] == [(HEADS, WIDTH // 2 // HEADS)] * DEPTH
    assert all(lay.embed_dim == WIDTH // 2 for lay in layouts) and adapter.embed_dim() == WIDTH // 2
    assert [m.out_features for m in adapter.mlp_input_layers()] == [MLP // 2] * DEPTH


def test_timm_fused_attention_keeps_trained_scale_after_head_dim_pruning() -> None:
    """timm's SDPA path ignores `scale`: fix_attributes folds the trained scale into the queries."""
    model = _make("timm-vit")
    adapter = TimmAdapter(model)
    keep = torch.cat([torch.arange(h * 8, h * 8 + 4) for h in range(HEADS)])  # first 4 dims of each head
    for block in model.blocks:
        attn = block.attn
        rows = torch.cat([keep + part * WIDTH for part in range(3)])
        qkv = nn.Linear(WIDTH, 3 * len(keep))
        qkv.weight.data, qkv.bias.data = attn.qkv.weight.data[rows].clone(), attn.qkv.bias.data[rows].clone()
        proj = nn.Linear(len(keep), WIDTH)
        proj.weight.data, proj.bias.data = attn.proj.weight.data[:, keep].clone(), attn.proj.bias.data.clone()
        attn.qkv, attn.proj = qkv, proj
    reference = copy.deepcopy(model)  # eager path, trained scale 1/sqrt(8), head_dim set by hand
    for block in reference.blocks:
        block.attn.head_dim, block.attn.attn_dim, block.attn.fused_attn = 4, 16, False
    adapter.fix_attributes()
    assert all(block.attn.fused_attn for block in model.blocks)
    assert all(lay.head_dim == 4 and math.isclose(lay.scale, 0.5) for lay in adapter.layouts())
    images = adapter.example_input(2)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images))


def test_mha_fold_keeps_trained_scale() -> None:
    """nn.MultiheadAttention computes 1/sqrt(head_dim): after embedding pruning the queries carry the old scale."""
    model = _make("torchvision")
    adapter = adapter_for(model)
    pruner = tp.pruner.MetaPruner(
        model,
        adapter.example_input(),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[h for _, h in adapter.classifier_heads()],
        round_to=adapter.embed_multiple_of(),
        unwrapped_parameters=adapter.unwrapped_parameters(),
    )
    for group in pruner.step(interactive=True):
        group.prune()
    attn = model.encoder.layers[0].self_attention
    q_before, k_before = attn.in_proj_weight[:16].clone(), attn.in_proj_weight[16:32].clone()
    adapter.fix_attributes()
    torch.testing.assert_close(attn.in_proj_weight[:16], q_before * (8**-0.5 / 4**-0.5))
    torch.testing.assert_close(attn.in_proj_weight[16:32], k_before)
    assert model.hidden_dim == 16 and attn.head_dim == 4
    adapter.fix_attributes()  # nothing left to fold: idempotent
    torch.testing.assert_close(attn.in_proj_weight[:16], q_before * (8**-0.5 / 4**-0.5))


def test_transformers_scaling_kept_and_config_updated() -> None:
    model = _make("hf-vit-sdpa")
    adapter = adapter_for(model)
    for layout in adapter.layouts():
        layout.module.q_proj = nn.Linear(WIDTH, 16)
        layout.module.k_proj = nn.Linear(WIDTH, 16)
        layout.module.v_proj = nn.Linear(WIDTH, 16)
        layout.module.o_proj = nn.Linear(16, WIDTH)
    adapter.fix_attributes({name: 2 for name, _ in adapter.attention_blocks()})  # two heads of 8 removed
    assert [(lay.num_heads, lay.head_dim, lay.scale) for lay in adapter.layouts()] == [(2, 8, 8**-0.5)] * DEPTH
    assert (model.config.num_attention_heads, model.config.head_dim, model.config.hidden_size) == (2, 8, WIDTH)
    assert adapter.forward_logits(adapter.example_input(2)).shape == (2, CLASSES)


def test_logits_from_every_output_type() -> None:
    logits = torch.randn(2, CLASSES)

    class Output:  # what transformers' ModelOutput looks like to us
        def __init__(self) -> None:
            self.logits = logits

    assert logits_of(logits) is logits
    assert logits_of((logits, torch.randn(2, CLASSES))) is logits
    assert logits_of(Output()) is logits
    assert logits_of({"logits": logits}) is logits
    with pytest.raises(TypeError, match="str"):
        logits_of("nope")


def test_deit_teacher_logits_are_the_average() -> None:
    model = _make("hf-deit-teacher")
    adapter = adapter_for(model)
    images = adapter.example_input(2)
    with torch.no_grad():
        output = model(images)
    torch.testing.assert_close(adapter.logits(output), (output.cls_logits + output.distillation_logits) / 2)
    assert adapter.logits(model(images, return_dict=False)).shape == (2, CLASSES)


def test_unsupported_attention_names_the_class() -> None:
    relpos = timm.create_model(
        "vit_relpos_small_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        num_classes=CLASSES,
    )
    with pytest.raises(TypeError, match=r"RelPosAttention at 'blocks\.0\.attn'.*timm VisionTransformer"):
        adapter_for(relpos)


def test_unsupported_attention_inside_a_supported_family() -> None:
    class OddAttention(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = _make("timm-vit")
    model.blocks[1].attn = OddAttention()
    expected = r"OddAttention at 'blocks\.1\.attn' of a timm VisionTransformer is not supported: it has neither"
    with pytest.raises(TypeError, match=expected):
        adapter_for(model)


def test_no_attention_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="No attention found in Sequential"):
        adapter_for(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(10)))


def test_capability_message_names_the_option() -> None:
    adapter = adapter_for(_make("torchvision"))
    with pytest.raises(ValueError, match=r"prune_head_dims=True is not possible on torchvision.*Turn off"):
        adapter.capabilities.require("head_dim_pruning", "prune_head_dims=True", adapter.family)
    adapter_for(_make("timm-vit")).capabilities.require("head_dim_pruning", "prune_head_dims=True", "timm")


def test_input_shape_unknown_is_none() -> None:
    model = MHAViT()
    del model.img_size
    adapter = adapter_for(model)
    assert adapter.input_shape() is None
    with pytest.raises(ValueError, match="does not state its input shape"):
        adapter.example_input()


@pytest.mark.parametrize("name", CASES)
def test_residual_and_mlp_layers_are_what_pruning_must_ignore(name: str) -> None:
    """Ignoring the residual writers keeps the embedding; ignoring the MLP inputs keeps the MLP width."""
    model = _make(name)
    adapter = adapter_for(model)
    heads = [head for _, head in adapter.classifier_heads()]
    pruner = tp.pruner.MetaPruner(
        model,
        adapter.example_input(2),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[*heads, *adapter.residual_layers(), *adapter.mlp_input_layers()],
        num_heads=adapter.head_groups(),
        unwrapped_parameters=adapter.unwrapped_parameters(),
        output_transform=adapter.logits,
    )
    for group in pruner.step(interactive=True):
        group.prune()
    adapter.fix_attributes(pruner.num_heads)
    assert adapter.embed_dim() == WIDTH
    assert [m.out_features for m in adapter.mlp_input_layers()] == [MLP] * DEPTH
    expected_head_dim = WIDTH // HEADS // (2 if adapter.capabilities.head_dim_pruning else 1)
    assert [lay.head_dim for lay in adapter.layouts()] == [expected_head_dim] * DEPTH
    assert adapter.forward_logits(adapter.example_input(2)).shape == (2, CLASSES)


@pytest.mark.parametrize("name", ["timm-vit", "mha-batch-first"])
def test_nystrom_swapped_blocks_are_still_found(name: str) -> None:
    """After NystromSwap, the same adapter family still reads the (marked) Nystrom modules."""
    from lightning_vitcompress.functional.nystrom import NystromAttention

    model = _make(name)
    for block_name, attention in adapter_for(model).attention_blocks():
        parent, _, child = block_name.rpartition(".")
        setattr(model.get_submodule(parent), child, NystromAttention.from_attention(attention, num_landmarks=4))
    adapter = adapter_for(model)
    assert type(adapter) is CASES[name].adapter
    assert [type(m) for _, m in adapter.attention_blocks()] == [NystromAttention] * DEPTH
    assert [(lay.kind, lay.num_heads, lay.head_dim) for lay in adapter.layouts()] == [("qkv", HEADS, 8)] * DEPTH
    assert adapter.forward_logits(adapter.example_input(2)).shape == (2, CLASSES)


def test_models_package_never_imports_transformers_at_module_level() -> None:
    """transformers is the optional [hf] extra: no adapter file may import it at import time."""
    import ast
    from pathlib import Path

    from lightning_vitcompress import models

    for path in Path(models.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "transformers" for n in names), f"{path.name} imports transformers"
