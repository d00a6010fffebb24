import pytest
from torch import nn

from lightning_vitcompress._model import find_attention_blocks, resolve_target_model, resolve_target_path
from lightning_vitcompress.digits import small_vit


class _Holder(nn.Module):
    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.head_metric = nn.Identity()
        self.net = vit


def test_finds_timm_vit_and_deit_blocks():
    vit = small_vit(depth=3)
    deit = small_vit("deit_tiny_distilled_patch16_224", depth=2)
    assert [n for n, _ in find_attention_blocks(vit)] == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert len(find_attention_blocks(deit)) == 2


def test_finds_multihead_attention_transformer():
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    assert len(find_attention_blocks(encoder)) == 2


def test_single_child_is_found_and_named_attribute_wins():
    holder = _Holder(small_vit(depth=1))
    assert resolve_target_path(holder) == "net"
    assert resolve_target_model(holder) is holder.net
    assert resolve_target_model(holder, "net") is holder.net


def test_module_itself_when_blocks_are_spread_over_children():
    holder = _Holder(small_vit(depth=1))
    holder.second = small_vit(depth=1)
    assert resolve_target_path(holder) == ""


def test_no_attention_error_names_what_was_looked_at():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"No attention blocks.*Sequential.*Flatten.*model_attribute"):
        resolve_target_path(model)


def test_unknown_attribute_error_lists_children():
    holder = _Holder(small_vit(depth=1))
    with pytest.raises(AttributeError, match=r"model_attribute='backbone'.*\['head_metric', 'net'\]"):
        resolve_target_path(holder, "backbone")
    with pytest.raises(ValueError, match=r"model_attribute='head_metric'.*no attention blocks"):
        resolve_target_path(holder, "head_metric")
