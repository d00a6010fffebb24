"""NystromAttention (the approximation) and NystromSwap (the callback)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, CustomAttention, MaskedClassifier, fast_trainer, run_ddp_script
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from timm.layers.attention import Attention
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_vitcompress import NystromSwap
from lightning_vitcompress._model import find_attention_blocks
from lightning_vitcompress._structure import STRUCTURE_KEY, load_compressed, read_checkpoint, recorded_edits
from lightning_vitcompress.digits import DigitsClassifier
from lightning_vitcompress.functional.nystrom import (
    AttentionMaskError,
    NystromAttention,
    iterative_pinv,
    segment_means,
    swap_attention,
)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def nystrom_blocks(model: nn.Module) -> list[str]:
    return [name for name, m in find_attention_blocks(model) if isinstance(m, NystromAttention)]


# ----------------------------------------------------------------- the module
def test_segment_means_split_uneven_lengths_without_padding():
    x = torch.arange(10.0).reshape(1, 10, 1)
    # 10 tokens in 4 segments: sizes 3, 3, 2, 2
    assert segment_means(x, 4).flatten().tolist() == [1.0, 4.0, 6.5, 8.5]
    assert segment_means(x, 5).flatten().tolist() == [0.5, 2.5, 4.5, 6.5, 8.5]


def test_iterative_pinv_inverts_softmax_matrices():
    matrices = torch.softmax(torch.randn(3, 2, 12, 12), dim=-1)
    torch.testing.assert_close(iterative_pinv(matrices, 20), torch.linalg.inv(matrices), atol=1e-3, rtol=1e-3)
    # each matrix is inverted on its own: a batch neighbour does not change the result
    torch.testing.assert_close(iterative_pinv(matrices[:1], 6), iterative_pinv(matrices, 6)[:1])


@pytest.mark.parametrize("tokens, prefix", [(65, 1), (198, 2), (50, 0)])
def test_landmarks_covering_the_tokens_reproduce_exact_attention(tokens, prefix):
    torch.manual_seed(0)
    exact = Attention(32, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm).eval()
    x = torch.randn(2, tokens, 32)
    for m in (tokens - prefix, tokens, 4 * tokens):
        swapped = NystromAttention.from_attention(exact, num_landmarks=m, num_prefix_tokens=prefix).eval()
        assert relative_error(swapped(x), exact(x)) < 1e-4
    fewer = NystromAttention.from_attention(exact, num_landmarks=8, num_prefix_tokens=prefix).eval()
    assert relative_error(fewer(x), exact(x)) > 1e-3  # really approximating below that


def test_prefix_tokens_stay_exact_and_reuse_trained_modules():
    torch.manual_seed(0)
    exact = Attention(32, num_heads=4).eval()
    swapped = NystromAttention.from_attention(exact, num_landmarks=4, num_prefix_tokens=2).eval()
    assert swapped.qkv is exact.qkv and swapped.proj is exact.proj and swapped.scale == exact.scale
    x = torch.randn(2, 66, 32)
    out, ref = swapped(x), exact(x)
    torch.testing.assert_close(out[:, :2], ref[:, :2], atol=1e-5, rtol=1e-5)  # class/dist rows exact
    assert relative_error(out[:, 2:], ref[:, 2:]) > 1e-3  # patch rows approximated


def test_error_falls_as_landmarks_grow_on_a_trained_model(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    fast_trainer(tmp_path, limit_train_batches=8).fit(model, digits)
    attention = model.model.blocks[-1].attn.eval()
    inputs = []
    handle = attention.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    images = next(iter(digits.val_dataloader()))[0][:16]
    with torch.no_grad():
        model.eval()(images)
        handle.remove()
        x = inputs[0]  # real activations: 65 tokens (class token + 64 patches)
        exact = attention(x)
        errors = {
            m: relative_error(NystromAttention.from_attention(attention, m, num_prefix_tokens=1)(x), exact)
            for m in (2, 8, 32, 64)
        }
    assert errors[2] > errors[8] > errors[32] > errors[64]
    assert errors[64] < 1e-4


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    swapped = NystromAttention(32, num_heads=4, num_landmarks=6, num_prefix_tokens=1, conv_kernel_size=3, qkv_bias=True)
    x = torch.randn(2, 33, 32, requires_grad=True)
    swapped(x).square().sum().backward()
    for name, parameter in [("input", x), *swapped.named_parameters()]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_multihead_attention_layers_swap_with_both_layouts():
    torch.manual_seed(0)
    for batch_first in (True, False):
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=batch_first, dropout=0.0).eval()
        x = torch.randn(2, 20, 32) if batch_first else torch.randn(20, 2, 32)
        exact = layer(x)
        layer.self_attn = NystromAttention.from_attention(layer.self_attn, num_landmarks=20)
        torch.testing.assert_close(layer(x), exact, atol=1e-5, rtol=1e-5)
        layer.self_attn.num_landmarks = 4
        assert layer(x).shape == x.shape and relative_error(layer(x), exact) > 1e-4
    with pytest.raises(ValueError, match="kdim=16"):
        NystromAttention.from_attention(nn.MultiheadAttention(32, 4, kdim=16, vdim=16), num_landmarks=8)
    with pytest.raises(
        TypeError,
        match=r"supports timm's Attention, nn.MultiheadAttention and transformers' ViT/DeiT attention, not Linear",
    ):
        NystromAttention.from_attention(nn.Linear(4, 4))


# ----------------------------------------------------------------- the callback
def batch_loss(model: DigitsClassifier, batch) -> float:
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(batch[0]), batch[1]).item()


def test_swap_at_setup_trains_and_loss_falls(tmp_path, tiny_classifier, digits):
    model = tiny_classifier(lr=3e-3)
    batch = next(iter(digits.val_dataloader()))
    # one batch, seen 15 times: the loss on it must fall (a tiny ViT from scratch plateaus on fresh data)
    repeated = DataLoader(TensorDataset(batch[0].repeat(15, 1, 1, 1), batch[1].repeat(15)), batch_size=len(batch[1]))
    trainer = fast_trainer(
        tmp_path, callbacks=[NystromSwap(num_landmarks=16)], limit_train_batches=None, limit_val_batches=0
    )
    before = batch_loss(model, batch)
    trainer.fit(model.train(), train_dataloaders=repeated)
    assert nystrom_blocks(model.model) == ["blocks.0.attn", "blocks.1.attn"]
    assert batch_loss(model, batch) < before - 0.05
    assert recorded_edits(model)[0]["num_prefix_tokens"] == 1  # read from the timm ViT
    assert [b.attn.num_landmarks for b in model.model.blocks] == [16, 16]
    assert trainer.callback_metrics["nystrom/num_landmarks"] == model.model.blocks[0].attn.num_landmarks
    assert trainer.callback_metrics["nystrom/swapped_blocks"] == len(nystrom_blocks(model.model))


class BlockTypes(Callback):
    def __init__(self) -> None:
        self.swapped_per_epoch: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.swapped_per_epoch.append(len(nystrom_blocks(pl_module.model)))


def test_swap_at_epoch_k_joins_new_parameters_to_the_optimizer(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    seen = BlockTypes()
    swap = NystromSwap(num_landmarks=8, swap_epoch=1, blocks=[-1], conv_kernel_size=3)
    fast_trainer(tmp_path, callbacks=[swap, seen], max_epochs=2).fit(model, digits)
    assert seen.swapped_per_epoch == [0, 1]
    conv = model.model.blocks[1].attn.conv
    optimized = {id(p) for group in model.trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(conv.weight) in optimized and conv.weight.abs().sum() > 0  # trained from its zero start


def test_checkpoint_resume_and_load_compressed_restore_the_swap(tmp_path, tiny_classifier, digits):
    swap = dict(num_landmarks=8, swap_epoch=1, conv_kernel_size=3)
    first = fast_trainer(
        tmp_path,
        callbacks=[NystromSwap(**swap), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        max_epochs=2,
        enable_checkpointing=True,
    )
    model = tiny_classifier()
    first.fit(model, digits)
    path = tmp_path / "last.ckpt"
    (record,) = read_checkpoint(path)[STRUCTURE_KEY]
    assert record["kind"] == "nystrom" and record["blocks"] == ["blocks.0.attn", "blocks.1.attn"]

    loaded = load_compressed(DigitsClassifier, path)
    assert nystrom_blocks(loaded.model) == record["blocks"]
    images = next(iter(digits.val_dataloader()))[0]
    torch.testing.assert_close(loaded(images), model.eval()(images))

    resumed_model = tiny_classifier()
    resumed = fast_trainer(tmp_path, callbacks=[NystromSwap(**swap)], max_epochs=3)
    resumed.fit(resumed_model, digits, ckpt_path=path)
    assert resumed.current_epoch == 3
    assert nystrom_blocks(resumed_model.model) == record["blocks"]
    assert len(recorded_edits(resumed_model)) == 1  # replayed, not swapped a second time


def test_fail_fast_errors_name_the_argument(tmp_path, tiny_classifier, digits):
    with pytest.raises(ValueError, match="num_landmarks=0"):
        NystromSwap(num_landmarks=0)
    with pytest.raises(ValueError, match="swap_epoch=-1"):
        NystromSwap(swap_epoch=-1)
    with pytest.raises(ValueError, match="conv_kernel_size=4"):
        NystromSwap(conv_kernel_size=4)
    cases = [
        (NystromSwap(blocks=[5]), {}, r"blocks=\[5\]: index 5 is out of range; the model has 2 attention blocks"),
        (NystromSwap(blocks=["head"]), {}, r"'head' is not an attention block; choose from \['blocks.0.attn'"),
        (NystromSwap(swap_epoch=3), dict(max_epochs=3), r"swap_epoch=3.*max_epochs=3"),
    ]
    for callback, overrides, message in cases:
        model = tiny_classifier()
        trainer = fast_trainer(tmp_path, callbacks=[callback], **overrides)
        with pytest.raises(ValueError, match=message):
            trainer.fit(model, digits)
        assert trainer.global_step == 0 and not nystrom_blocks(model.model)  # refused at setup, nothing changed
    model = tiny_classifier()
    for block in model.model.blocks:
        block.attn = CustomAttention(TINY["embed_dim"], TINY["num_heads"])
    with pytest.raises(ValueError, match=r"cannot swap.*not CustomAttention"):
        fast_trainer(tmp_path, callbacks=[NystromSwap()]).fit(model, digits)


def test_ddp_two_processes_swap_mid_fit_in_lock_step(tmp_path):
    body = """
    import lightning as L
    from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
    from lightning_vitcompress.functional.nystrom import NystromAttention
    from lightning_vitcompress import NystromSwap
    L.seed_everything(0, verbose=False)
    model = DigitsClassifier(embed_dim=32, depth=2, num_heads=4)
    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, limit_train_batches=3, limit_val_batches=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[NystromSwap(num_landmarks=8, swap_epoch=1, conv_kernel_size=3)],
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    blocks = [type(b.attn).__name__ for b in model.model.blocks]
    report(trainer, blocks=blocks, checksum=sum(p.double().sum().item() for p in model.parameters()),
           conv=model.model.blocks[0].attn.conv.weight.abs().sum().item())
    """
    rank0, rank1 = run_ddp_script(body, tmp_path)
    assert rank0["blocks"] == rank1["blocks"] == ["NystromAttention", "NystromAttention"]
    assert rank0["conv"] > 0  # the new parameters trained under the rebuilt DDP wrapper
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-6)


# ------------------------------------------------------------------ trust: masks, second fit, failures, resume
def _outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images)


def test_masked_blocks_are_refused_before_any_swap_with_an_example_input(tmp_path, digits):
    model = MaskedClassifier()
    images = next(iter(digits.val_dataloader()))[0][:4]
    before = _outputs(model, images)
    trainer = fast_trainer(tmp_path, callbacks=[NystromSwap(num_landmarks=4, example_input=images)])
    with pytest.raises(ValueError, match=r"encoder.layers.0.self_attn gets key_padding_mask"):
        trainer.fit(model, digits)
    assert trainer.global_step == 0 and not nystrom_blocks(model.model)
    torch.testing.assert_close(_outputs(model, images), before, rtol=0, atol=0)


def test_masked_blocks_are_refused_at_setup_from_the_trainers_data(tmp_path, digits):
    """No example_input: the first batch of the Trainer's data shows the masks before anything is swapped."""
    model = MaskedClassifier()
    trainer = fast_trainer(tmp_path, callbacks=[NystromSwap(num_landmarks=4)])
    with pytest.raises(
        ValueError, match=r"NystromSwap\(blocks=None\): encoder.layers.0.self_attn gets key_padding_mask"
    ):
        trainer.fit(model, digits)
    assert trainer.global_step == 0 and not nystrom_blocks(model.model)


def test_masked_blocks_unseen_at_setup_get_their_swap_undone(tmp_path, digits, monkeypatch):
    """Where no example can be had at setup, a masked call at the first step undoes the swap."""
    from lightning_vitcompress.callbacks import nystrom as nystrom_callback

    monkeypatch.setattr(nystrom_callback, "example_from_data", lambda trainer: None)
    model = MaskedClassifier()
    images = next(iter(digits.val_dataloader()))[0][:4]
    before = _outputs(model, images)
    trainer = fast_trainer(tmp_path, callbacks=[NystromSwap(num_landmarks=4)])
    with pytest.raises(ValueError, match="does not support attention masks") as info:
        trainer.fit(model, digits)
    assert any("undid its swap" in note for note in getattr(info.value, "__notes__", []))
    assert trainer.global_step == 0
    assert not nystrom_blocks(model.model) and not recorded_edits(model)
    assert isinstance(model.model.encoder.layers[0].self_attn, nn.MultiheadAttention)
    torch.testing.assert_close(_outputs(model, images), before, rtol=0, atol=0)  # works as before


def test_second_fit_with_the_same_callback_keeps_the_swap(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    callback = NystromSwap(num_landmarks=8)
    fast_trainer(tmp_path, callbacks=[callback], max_steps=1).fit(model, digits)
    swapped = [b.attn for b in model.model.blocks]
    trainer = fast_trainer(tmp_path, callbacks=[callback], max_steps=1)
    trainer.fit(model, digits)
    assert [b.attn for b in model.model.blocks] == swapped  # the same modules, not swapped again
    assert len(recorded_edits(model)) == 1
    assert callback.swapped_blocks == ["blocks.0.attn", "blocks.1.attn"]
    assert trainer.callback_metrics["nystrom/num_landmarks"] == 8


@pytest.mark.parametrize("fails", ["second_block", "record"])
def test_a_failing_swap_leaves_the_model_as_it_was(tmp_path, tiny_classifier, digits, monkeypatch, fails):
    model = tiny_classifier()
    images = next(iter(digits.val_dataloader()))[0][:4]
    before = _outputs(model, images)
    if fails == "record":
        monkeypatch.setattr(
            "lightning_vitcompress._base.record_edit", lambda *args: (_ for _ in ()).throw(RuntimeError("injected"))
        )
    else:
        calls = []
        swapping = importlib.import_module("lightning_vitcompress.functional.nystrom")  # where swap_attention swaps
        original = swapping.set_submodule

        def set_once(root, path, module):  # the first block is swapped, the second fails
            calls.append(path)
            if len(calls) == 2:
                raise RuntimeError("injected")
            original(root, path, module)

        monkeypatch.setattr(swapping, "set_submodule", set_once)
    trainer = fast_trainer(tmp_path, callbacks=[NystromSwap(num_landmarks=4)])
    with pytest.raises(RuntimeError, match=r"keeps its softmax attention.*injected"):
        trainer.fit(model, digits)
    assert not nystrom_blocks(model.model) and not recorded_edits(model)
    torch.testing.assert_close(_outputs(model, images), before, rtol=0, atol=0)


def test_resume_before_the_swap_epoch_gives_the_weights_of_an_uninterrupted_run(tmp_path, tiny_classifier, digits):
    images, labels = next(iter(DataLoader(digits.train_set, batch_size=96)))
    loader = DataLoader(TensorDataset(images, labels), batch_size=32)  # fixed order: both runs see the same data

    class StopAfterEpoch0(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    restored = {}

    class AtRestore(Callback):
        def on_train_start(self, trainer, pl_module):  # after the checkpoint's weights loaded
            restored.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    def run(folder, *extra, **fit_kwargs):
        model = tiny_classifier()
        swap = NystromSwap(num_landmarks=8, swap_epoch=1, conv_kernel_size=3)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)
        trainer = fast_trainer(
            tmp_path / folder,
            callbacks=[swap, checkpoint, *extra],
            max_epochs=3,
            limit_train_batches=None,
            limit_val_batches=0,
            enable_checkpointing=True,
        )
        trainer.fit(model, train_dataloaders=loader, **fit_kwargs)
        return model

    uninterrupted = run("a")
    run("b", StopAfterEpoch0())  # checkpoint after epoch 0, before the swap
    path = tmp_path / "b" / "last.ckpt"
    assert STRUCTURE_KEY not in read_checkpoint(path) or not read_checkpoint(path)[STRUCTURE_KEY]
    resumed = run("c", AtRestore(), ckpt_path=path)
    for key, value in read_checkpoint(path)["state_dict"].items():
        torch.testing.assert_close(restored[key], value, msg=key)
    assert nystrom_blocks(resumed.model) == nystrom_blocks(uninterrupted.model) == ["blocks.0.attn", "blocks.1.attn"]
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


def test_transformers_attention_swaps_exactly_and_refuses_a_real_mask():
    """transformers ViT attention: exact at m >= tokens, (out, None) like the original, a mask refused in eager."""
    pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
    from families import build_family

    model = build_family("hf-vit-sdpa").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        exact = model(images).logits
        swap_attention(model, 64)  # 16 patches: exact attention through the fused qkv
        torch.testing.assert_close(model(images).logits, exact, atol=1e-5, rtol=1e-5)
    block = model.vit.layers[0].attention
    assert isinstance(block, NystromAttention) and block.interface == "transformers"
    out, weights = block(torch.randn(2, 17, 32))
    assert out.shape == (2, 17, 32) and weights is None
    with pytest.raises(AttentionMaskError, match="does not support attention masks"):
        block(torch.randn(2, 17, 32), torch.zeros(2, 1, 17, 17))


def test_class_token_of_a_vit_written_inline_is_kept_exact():
    """No ``num_prefix_tokens`` attribute: the model adapter finds the class token parameter."""
    from families import MHAViT

    from lightning_vitcompress.functional.nystrom import NystromConfig, swap_attention

    model = MHAViT()
    assert not hasattr(model, "num_prefix_tokens")
    swap_attention(model, NystromConfig(num_landmarks=4))
    swapped = [m for m in model.modules() if isinstance(m, NystromAttention)]
    assert len(swapped) == 2 and {m.num_prefix_tokens for m in swapped} == {1}
