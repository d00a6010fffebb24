"""TokenMerging: matching and merge, each family, the callback's lifecycle, and the six-callback pipeline."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, FamilyClassifier, build_family
from helpers import TINY, fast_trainer, run_ddp_script
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_vitcompress import (
    BenchmarkCallback,
    DistillationTeacher,
    NystromAttention,
    NystromSwap,
    PruningSchedule,
    QuantizeOnFit,
    TokenMerging,
    load_compressed,
    merge_tokens,
)
from lightning_vitcompress._structure import STRUCTURE_KEY, read_checkpoint, recorded_edits
from lightning_vitcompress.digits import DigitsClassifier, small_vit
from lightning_vitcompress.functional.token_merging import (
    MERGE_ATTRIBUTE,
    _attend,
    bipartite_soft_matching,
    merge_weighted_average,
    merged_token_counts,
    token_schedule,
)
from lightning_vitcompress.models import adapter_for, logits_of


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(model(images))


def _sizes(model: nn.Module) -> torch.Tensor:
    """The sizes the last merging block left (per token), from the model's shared merge state."""
    block = next(m for m in model.modules() if MERGE_ATTRIBUTE in m.__dict__)
    return block.__dict__[MERGE_ATTRIBUTE].state.size


# ------------------------------------------------------------------ the math
def test_class_tokens_are_never_merged_and_sizes_sum_to_the_input_length():
    torch.manual_seed(0)
    prefix, patches = 2, 15
    x = torch.randn(3, prefix + patches, 8)
    x[:, :prefix] = x[:, prefix : prefix + 1]  # prefix tokens identical to a patch token: the best matches there are
    size = None
    tokens = x
    for r in (4, 3, 3):
        merge = bipartite_soft_matching(tokens, r, prefix)
        tokens, size = merge_weighted_average(merge, tokens, size)
    assert tokens.shape[1] == prefix + patches - 10
    torch.testing.assert_close(tokens[:, :prefix], x[:, :prefix])  # untouched, still in front
    assert torch.equal(size[:, :prefix, 0], torch.ones(3, prefix))
    assert torch.equal(size.sum(1)[:, 0], torch.full((3,), float(prefix + patches)))


def test_merged_token_is_the_size_weighted_mean():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.1])
    x = torch.stack([a, b])[None]  # no prefix: a in set A, b in set B, merged into one
    merge = bipartite_soft_matching(x, 1, 0)
    merged, size = merge_weighted_average(merge, x, torch.tensor([[[3.0], [1.0]]]))
    torch.testing.assert_close(merged[0, 0], (3 * a + b) / 4)
    assert size.item() == 4


def test_schedule_caps_each_block_at_half_the_patches():
    assert token_schedule(197, 1, [16] * 12)[-1] == 11  # ToMe's r=16 on ViT-B/16 at 224
    assert token_schedule(17, 1, [0, 3]) == [17, 14]


# ------------------------------------------------------------------ each family
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_merges_and_is_exact_at_r_zero(family):
    model = build_family(family).eval()
    with torch.no_grad():  # zero-initialized heads (torchvision) would hide any change
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    images = torch.randn(2, 3, 32, 32)
    before = _logits(model, images)
    merge_tokens(model, 0)
    torch.testing.assert_close(_logits(model, images), before, rtol=0, atol=0)
    # the size-aware attention reproduces the family's own attention when all sizes are 1
    _, block, attribute = adapter_for(model).token_blocks()[0]
    attention = getattr(block, attribute)
    h = torch.randn(2, 9, 32)
    if isinstance(attention, nn.MultiheadAttention):
        seq = h if attention.batch_first else h.transpose(0, 1)
        own = attention(seq, seq, seq, need_weights=False)[0]
        own = own if attention.batch_first else own.transpose(0, 1)
    else:
        own = attention(h)
        own = own[0] if isinstance(own, tuple) else own
    with torch.no_grad():
        torch.testing.assert_close(_attend(attention, h, torch.ones(2, 9, 1))[0], own, rtol=1e-5, atol=1e-5)
    plan = merge_tokens(model, 3)
    out = _logits(model, images)
    assert out.shape == before.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, before)
    assert merged_token_counts(model) == plan["tokens"] == [plan["tokens_in"] - 3, plan["tokens_in"] - 6]
    assert _sizes(model).sum(1).flatten().tolist() == [plan["tokens_in"]] * 2


def test_blocks_left_out_keep_their_tokens_but_weigh_merged_ones():
    model = build_family("timm-vit").eval()
    images = torch.randn(2, 3, 32, 32)
    plan = merge_tokens(model, 5, blocks=[0])
    assert plan["block_r"] == [5, 0] and merged_token_counts(model, images) == [12, 12]
    with_sizes = _logits(model, images)
    merge_tokens(model, 5, blocks=[0], proportional_attention=False)
    assert not torch.allclose(_logits(model, images), with_sizes)  # block 1 weighs the merged tokens by size
    model.set_grad_checkpointing(True)
    with pytest.raises(TypeError, match="gradient checkpointing"):
        merge_tokens(model, 5)


def test_merged_model_composes_with_nystrom_and_pruning_and_copies():
    import copy

    from lightning_vitcompress.functional import prune_vit, swap_attention

    model = small_vit(**TINY).eval()  # 65 tokens
    images = torch.randn(2, 3, 32, 32)
    merge_tokens(model, 8)
    swap_attention(model, 8)  # landmarks over the merged tokens
    prune_vit(model, 0.5, images[:1])
    copied = copy.deepcopy(model)
    torch.testing.assert_close(_logits(copied, images), _logits(model, images))
    assert merged_token_counts(copied, images) == [57, 49]
    assert all(isinstance(b.attn, NystromAttention) for b in copied.blocks)
    assert copied.blocks[0].forward.__self__ is copied.blocks[0]  # the copy merges with its own modules


# ------------------------------------------------------------------ the callback
def test_merging_mid_fit_resumes_and_loads_from_the_record(tmp_path, tiny_classifier, digits):
    merging = dict(r=[6, 10], start_epoch=1)
    short = dict(limit_train_batches=2, limit_val_batches=1)
    first = fast_trainer(
        tmp_path,
        callbacks=[
            TokenMerging(**merging),
            ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1, every_n_epochs=1),
        ],
        max_epochs=2,
        enable_checkpointing=True,
        **short,
    )
    model = tiny_classifier()
    first.fit(model, digits)
    assert first.callback_metrics["tome/tokens_out"] == 65 - 16 and first.callback_metrics["tome/r"] == 8
    (record,) = read_checkpoint(tmp_path / "last.ckpt")[STRUCTURE_KEY]
    assert record["kind"] == "tome" and record["block_r"] == [6, 10] and record["config"]["start_epoch"] == 1
    images = next(iter(digits.val_dataloader()))[0]
    loaded = load_compressed(DigitsClassifier, tmp_path / "last.ckpt")
    torch.testing.assert_close(_logits(loaded, images), _logits(model.eval(), images))
    assert merged_token_counts(loaded.model) == [59, 49]

    # resumed after the merge: replayed from the record, not merged twice
    resumed_model = tiny_classifier()
    resumed = fast_trainer(tmp_path, callbacks=[TokenMerging(**merging)], max_epochs=3, **short)
    resumed.fit(resumed_model, digits, ckpt_path=tmp_path / "last.ckpt")
    assert len(recorded_edits(resumed_model)) == 1 and merged_token_counts(resumed_model.model) == [59, 49]
    # resumed before it (the epoch-0 checkpoint holds no record): merges at its start epoch
    early = next(p for p in tmp_path.glob("epoch=0*.ckpt"))
    assert STRUCTURE_KEY not in read_checkpoint(early) or not read_checkpoint(early)[STRUCTURE_KEY]
    again = tiny_classifier()
    fast_trainer(tmp_path, callbacks=[TokenMerging(**merging)], max_epochs=2, **short).fit(
        again, digits, ckpt_path=early
    )
    assert len(recorded_edits(again)) == 1 and merged_token_counts(again.model) == [59, 49]
    with pytest.raises(ValueError, match=r"r=\[6, 9\].*was r=\[6, 10\]"):
        fast_trainer(tmp_path, callbacks=[TokenMerging(r=[6, 9], start_epoch=1)], max_epochs=3).fit(
            tiny_classifier(), digits, ckpt_path=tmp_path / "last.ckpt"
        )


def test_ddp_two_processes_merge_in_lock_step(tmp_path):
    body = """
    import lightning as L
    from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
    from lightning_vitcompress import TokenMerging
    from lightning_vitcompress.functional import merged_token_counts
    L.seed_everything(0, verbose=False)
    model = DigitsClassifier(embed_dim=32, depth=2, num_heads=4)
    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, limit_train_batches=3, limit_val_batches=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[TokenMerging(r=12, start_epoch=1)],
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    report(trainer, tokens=merged_token_counts(model.model), checksum=sum(p.double().sum().item() for p in model.parameters()))
    """
    rank0, rank1 = run_ddp_script(body, tmp_path)
    assert rank0["tokens"] == rank1["tokens"] == [53, 41]
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-6)


@pytest.mark.parametrize("family", ["torchvision", "hf-vit-sdpa"])
def test_other_families_train_through_the_callback(tmp_path, digits, family):
    model = FamilyClassifier(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = fast_trainer(tmp_path, callbacks=[TokenMerging(r=4)])
    trainer.fit(model, digits)
    assert trainer.callback_metrics["tome/tokens_out"] == 17 - 8
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "mask_token" not in n)


# ------------------------------------------------------------------ all six callbacks
def test_all_six_callbacks_give_the_same_result_in_two_list_orders(tmp_path, tiny_classifier, digits):
    torch.manual_seed(1)
    teacher = small_vit(embed_dim=48, depth=2, num_heads=4).eval()
    results = []
    for order in ("forward", "reverse"):
        callbacks = [
            PruningSchedule(0.5, start_epoch=0, end_epoch=1, num_steps=2),
            DistillationTeacher(teacher, mode="soft", alpha=0.5, temperature=2.0),
            NystromSwap(num_landmarks=16, swap_epoch=1),
            TokenMerging(r=8, start_epoch=1),
            QuantizeOnFit("int8_dynamic"),
            BenchmarkCallback(
                batch_size=8,
                rounds=1,
                min_run_time=0.01,
                latency_repeats=2,
                accuracy_batches=1,
                plot=False,
                output_dir=tmp_path / order,
            ),
        ]
        model = tiny_classifier()
        fast_trainer(
            tmp_path / order,
            callbacks=callbacks if order == "forward" else callbacks[::-1],
            max_epochs=2,
            limit_train_batches=2,
            limit_val_batches=1,
        ).fit(model, digits)
        bench = next(cb for cb in callbacks if isinstance(cb, BenchmarkCallback))
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        results.append((shapes, bench.report))
        assert all(isinstance(b.attn, NystromAttention) for b in model.model.blocks)
        assert "Int8" in type(model.model.blocks[0].mlp.fc1.weight).__name__
        assert not any(MERGE_ATTRIBUTE in m.__dict__ for m in teacher.modules())  # the teacher is not merged
    (shapes_a, report_a), (shapes_b, report_b) = results
    assert shapes_a == shapes_b
    assert report_a["final_tokens_per_block"] == report_b["final_tokens_per_block"] == [57, 49]
    assert report_a["final"]["macs_per_image"] == report_b["final"]["macs_per_image"]
    assert "final_tokens_per_block" not in report_a["baseline"]
