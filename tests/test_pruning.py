"""PruningSchedule: real structured pruning of timm ViTs inside fit, checkpoints, DDP."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from helpers import EXAMPLE_IMAGES, TINY, MHAClassifier, fast_trainer, run_ddp_script
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lightning_vitcompress import PruningSchedule
from lightning_vitcompress._structure import (
    STRUCTURE_KEY,
    ModelSnapshot,
    load_compressed,
    read_checkpoint,
    recorded_edits,
)
from lightning_vitcompress.digits import DigitsClassifier, small_vit
from lightning_vitcompress.functional.measure import count_macs, count_parameters
from lightning_vitcompress.functional.prune import prune_vit

IMAGES = EXAMPLE_IMAGES


def _widths(vit: nn.Module) -> list:
    """Every shape that pruning may change, to compare structures."""
    return [list(p.shape) for p in vit.parameters()] + [
        (b.attn.num_heads, b.attn.head_dim, b.attn.attn_dim) for b in vit.blocks
    ]


def _kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Indices of the original rows each pruned row is a copy of."""
    return torch.cdist(pruned, original).argmin(dim=1)


def _sliced_by_hand(original: nn.Module, pruned: nn.Module) -> nn.Module:
    """``original`` with the pruned model's surviving rows/columns sliced out by hand.

    Uses timm's eager attention with the ORIGINAL softmax scale, so matching the
    pruned model (fused path) proves the head bookkeeping and the kept scale.
    """
    reference = copy.deepcopy(original)
    for ref, new in zip(reference.blocks, pruned.blocks):
        attn_dim = new.attn.attn_dim
        w_old, w_new = ref.attn.qkv.weight.detach(), new.attn.qkv.weight.detach()
        old_dim = ref.attn.attn_dim
        kept = _kept_rows(w_old[old_dim : 2 * old_dim], w_new[attn_dim : 2 * attn_dim])  # from the k rows
        rows = torch.cat([kept, kept + old_dim, kept + 2 * old_dim])
        ref.attn.qkv.weight = nn.Parameter(w_old[rows])
        ref.attn.qkv.bias = nn.Parameter(ref.attn.qkv.bias.detach()[rows])
        ref.attn.proj.weight = nn.Parameter(ref.attn.proj.weight.detach()[:, kept])
        ref.attn.num_heads, ref.attn.attn_dim = new.attn.num_heads, attn_dim
        ref.attn.head_dim = attn_dim // new.attn.num_heads
        ref.attn.fused_attn = False  # eager path: q * ref.attn.scale, the trained scale, untouched
        hidden = _kept_rows(ref.mlp.fc1.weight.detach(), new.mlp.fc1.weight.detach())
        ref.mlp.fc1.weight = nn.Parameter(ref.mlp.fc1.weight.detach()[hidden])
        ref.mlp.fc1.bias = nn.Parameter(ref.mlp.fc1.bias.detach()[hidden])
        ref.mlp.fc2.weight = nn.Parameter(ref.mlp.fc2.weight.detach()[:, hidden])
    return reference.eval()


@pytest.mark.parametrize("prune_heads", [False, True], ids=["head_dims", "whole_heads"])
def test_pruned_outputs_equal_hand_sliced_weights(prune_heads):
    torch.manual_seed(0)
    original = small_vit(**TINY).eval()
    pruned = copy.deepcopy(original)
    prune_vit(pruned, 0.5, IMAGES[:1], prune_embed_dim=False, prune_heads=prune_heads)
    attn = pruned.blocks[0].attn
    assert attn.qkv.out_features == 3 * 16 and attn.proj.in_features == 16
    assert (attn.num_heads, attn.head_dim) == ((2, 8) if prune_heads else (4, 4))
    assert pruned.blocks[0].mlp.fc1.out_features == 64
    assert attn.fused_attn  # the fast path stays on
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(IMAGES), _sliced_by_hand(original, pruned)(IMAGES))
        for block in pruned.blocks:  # the eager path agrees too: one scale for both
            block.attn.fused_attn = False
        torch.testing.assert_close(pruned(IMAGES), _sliced_by_hand(original, pruned)(IMAGES))


def test_one_shot_at_setup_shrinks_params_and_macs(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    params, macs = count_parameters(model.model), count_macs(model.model, IMAGES[:1])
    trainer = fast_trainer(tmp_path, callbacks=[PruningSchedule(0.5)], max_steps=2)
    trainer.fit(model, digits)
    vit = model.model
    assert vit.embed_dim == 16 and vit.blocks[0].mlp.fc1.out_features == 64
    assert vit.head.out_features == 10  # classifier outputs intact
    # every channel dimension halves, so weight matrices shrink ~4x (the head and biases less)
    assert 0.2 < count_parameters(vit) / params < 0.32
    assert 0.2 < count_macs(vit, IMAGES[:1]) / macs < 0.32
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}  # setup pruning: optimizer built on the new params
    # the logged ratio is read from the model: half of the embedding, head-dim and MLP channels are gone
    assert vit.blocks[0].attn.head_dim == 4 and vit.blocks[1].mlp.fc1.out_features == 64
    assert trainer.callback_metrics["prune/ratio"] == pytest.approx(0.5, abs=1e-4)


def test_iterative_schedule_reaches_target_and_training_continues(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    callback = PruningSchedule(0.5, start_epoch=1, end_epoch=2, schedule="cubic")
    trainer = fast_trainer(tmp_path, callbacks=[callback], max_epochs=4, limit_train_batches=2)
    widths = []

    class WidthSpy(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            widths.append(pl_module.model.blocks[0].mlp.fc1.out_features)

    trainer.callbacks.append(WidthSpy())
    trainer.fit(model, digits)
    # cubic: 7/8 of the final ratio after step 1 of 2 -> 128 * (1 - 0.4375) = 72
    assert widths == [128, 72, 64, 64]
    assert model.model.blocks[0].attn.head_dim == 4 and model.model.embed_dim == 16
    assert trainer.global_step == 8  # trained through the rebuilds
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4  # schedule position kept


def test_resume_mid_schedule_reaches_same_structure_and_load_compressed(tmp_path, tiny_classifier, digits):
    def schedule():
        return PruningSchedule(0.5, start_epoch=0, end_epoch=2)

    uninterrupted = tiny_classifier()
    fast_trainer(tmp_path / "a", callbacks=[schedule()], max_epochs=3, limit_train_batches=2).fit(uninterrupted, digits)

    class Interrupt(Callback):  # the job is killed after epoch 1, mid-schedule
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    first = tiny_classifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer = fast_trainer(
        tmp_path / "b",
        callbacks=[schedule(), Interrupt(), checkpoint],
        max_epochs=3,
        limit_train_batches=2,
        enable_checkpointing=True,
    )
    trainer.fit(first, digits)
    saved = read_checkpoint(tmp_path / "b" / "last.ckpt")[STRUCTURE_KEY]
    assert [r["step"] for r in saved] == [1, 2]

    resumed = tiny_classifier()
    resumed_trainer = fast_trainer(
        tmp_path / "c",
        callbacks=[schedule(), ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)],
        max_epochs=3,
        limit_train_batches=2,
        enable_checkpointing=True,
    )
    resumed_trainer.fit(resumed, digits, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert resumed_trainer.current_epoch == 3
    assert _widths(resumed.model) == _widths(uninterrupted.model)
    assert resumed.model.blocks[0].mlp.fc1.out_features == 64

    final = tmp_path / "c" / "last.ckpt"
    assert [r["step"] for r in read_checkpoint(final)[STRUCTURE_KEY]] == [1, 2, 3]
    loaded = load_compressed(DigitsClassifier, final)
    assert _widths(loaded.model) == _widths(resumed.model)
    resumed.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IMAGES), resumed(IMAGES))


def test_deit_distilled_prunes_with_taylor_at_step_interval_and_trains(tmp_path, tiny_classifier, digits):
    model = tiny_classifier(model_name="deit_tiny_distilled_patch16_224")
    callback = PruningSchedule(0.5, num_steps=2, interval="step", importance="taylor", gradient_batches=1)
    trainer = fast_trainer(tmp_path, callbacks=[callback], limit_train_batches=4)
    trainer.fit(model, digits)
    vit = model.model
    assert callback.steps_done == 2
    assert vit.dist_token.shape[-1] == vit.cls_token.shape[-1] == vit.pos_embed.shape[-1] == 16
    assert vit.head.out_features == vit.head_dist.out_features == 10
    assert vit.head_dist.in_features == 16
    model.train()
    vit.set_distilled_training(True)  # now returns (cls, dist) logits: both heads run on pruned tokens
    logits = model(IMAGES)
    assert isinstance(logits, tuple) and logits[1].shape == (3, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pruning_ratio=1.0), r"pruning_ratio=1.0: must be a number in \(0, 1\)"),
        (dict(pruning_ratio=0.0), r"pruning_ratio=0.0"),
        (dict(start_epoch=2, end_epoch=1), "end_epoch=1: pass an int >= 2"),
        (dict(importance="magic"), "importance='magic'"),
        (dict(prune_embed_dim=False, prune_attention=False, prune_mlp=False), "nothing"),
    ],
)
def test_bad_values_fail_in_the_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningSchedule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(end_epoch=3), r"end_epoch=3\) would never act: Trainer\(max_epochs=2\)"),
        (dict(ignored_layers=["nope"]), r"ignored_layers=\['nope'\]: 'nope' is not a module"),
        (dict(pruning_ratio=0.999), r"pruning_ratio=0.999 would remove every channel.*<= 0.875"),
    ],
)
def test_model_dependent_values_fail_at_setup(tmp_path, tiny_classifier, digits, kwargs, match):
    callback = PruningSchedule(**kwargs)  # the value alone is fine
    trainer = fast_trainer(tmp_path, callbacks=[callback], max_epochs=2)
    with pytest.raises(ValueError, match=match):
        trainer.fit(tiny_classifier(), digits)
    assert trainer.global_step == 0


def test_multihead_attention_models_prune_embedding_attention_and_mlp(tmp_path, digits):
    """nn.MultiheadAttention ties q/k/v to the embedding: pruned together by default; what cannot be done is refused."""
    with pytest.raises(
        ValueError, match=r"prune_heads=True is not possible on hand-written models.*Turn off prune_heads"
    ):
        fast_trainer(tmp_path, callbacks=[PruningSchedule(prune_heads=True, example_input=IMAGES)], max_steps=1).fit(
            MHAClassifier(), digits
        )
    with pytest.raises(ValueError, match="prune_attention=True with prune_embed_dim=False is not possible"):
        callback = PruningSchedule(prune_embed_dim=False, example_input=IMAGES)
        fast_trainer(tmp_path, callbacks=[callback], max_steps=1).fit(MHAClassifier(), digits)

    model = MHAClassifier()  # states no input size: the example comes from the Trainer's first batch
    callback = PruningSchedule(0.5)
    trainer = fast_trainer(tmp_path, callbacks=[callback], max_steps=2, enable_checkpointing=True)
    trainer.fit(model, digits)
    assert [layer.linear1.out_features for layer in model.model.encoder.layers] == [32, 32]
    attention = model.model.encoder.layers[0].self_attn
    assert (attention.embed_dim, attention.num_heads, attention.head_dim) == (16, 4, 4)
    loaded = load_compressed(MHAClassifier, trainer.checkpoint_callback.best_model_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IMAGES), model.eval()(IMAGES))


def test_params_target_and_logged_metrics(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    params = count_parameters(model.model)
    callback = PruningSchedule(0.6, target="params")
    trainer = fast_trainer(tmp_path, callbacks=[callback], max_steps=1)
    trainer.fit(model, digits)
    assert count_parameters(model.model) / params == pytest.approx(0.4, abs=0.04)
    metrics = trainer.callback_metrics
    assert metrics["prune/params"] == count_parameters(model.model)
    assert metrics["prune/macs"] == count_macs(model.model, IMAGES[:1])
    assert metrics["prune/params_ratio"] == pytest.approx(count_parameters(model.model) / params)
    # prune/ratio is the fraction of prunable channels the model lost, not the 0.6 of params asked for
    vit = model.model
    channels = vit.embed_dim + sum(b.attn.attn_dim + b.mlp.fc1.out_features for b in vit.blocks)
    assert metrics["prune/ratio"] == pytest.approx(1 - channels / (32 + 2 * (32 + 128)))
    assert metrics["prune/ratio"] != pytest.approx(0.6, abs=1e-3)


def test_unsupported_strategy_fails_at_setup(tmp_path, digits):
    from unittest import mock

    with (
        mock.patch("lightning_vitcompress._training_state.SUPPORTED_STRATEGIES", ()),
        pytest.raises(RuntimeError, match="PruningSchedule changes the model's structure"),
    ):
        fast_trainer(tmp_path, callbacks=[PruningSchedule()], max_steps=1).fit(DigitsClassifier(**TINY), digits)


def test_ddp_ranks_prune_identically_at_setup_and_mid_fit(tmp_path):
    reports = run_ddp_script(
        """
        import torch
        from helpers import TINY, fast_trainer
        from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        from lightning_vitcompress import PruningSchedule

        torch.manual_seed(int(os.environ.get("LOCAL_RANK", 0)))  # ranks start from different weights
        model = DigitsClassifier(**TINY)
        trainer = fast_trainer(OUT, strategy="ddp", devices=2, max_epochs=2, limit_train_batches=2,
                               limit_val_batches=0, callbacks=[PruningSchedule(0.5, end_epoch=1)])
        trainer.fit(model, DigitsDataModule(batch_size=16))
        shapes = [list(p.shape) for p in model.parameters()]
        report(trainer, shapes=shapes, checksum=float(sum(p.double().sum() for p in model.parameters())),
               steps=trainer.global_step)
        """,
        tmp_path,
    )
    assert reports[0]["shapes"] == reports[1]["shapes"]
    assert [16, 3, 4, 4] in reports[0]["shapes"]
    assert reports[0]["checksum"] == pytest.approx(reports[1]["checksum"], rel=1e-6)  # still in lock-step
    assert reports[0]["steps"] == reports[1]["steps"] == 4


def test_nystrom_attention_prunes_like_the_timm_attention_it_came_from():
    from lightning_vitcompress.functional.nystrom import NystromAttention

    def swap(vit: nn.Module) -> nn.Module:
        for block in vit.blocks:
            block.attn = NystromAttention.from_attention(block.attn, num_landmarks=8, num_prefix_tokens=1)
        return vit

    torch.manual_seed(0)
    original = small_vit(**TINY).eval()
    swapped_then_pruned = swap(copy.deepcopy(original))
    prune_vit(swapped_then_pruned, 0.5, IMAGES[:1])
    pruned_then_swapped = copy.deepcopy(original)
    prune_vit(pruned_then_swapped, 0.5, IMAGES[:1])
    swap(pruned_then_swapped)
    attn = swapped_then_pruned.blocks[0].attn
    assert isinstance(attn, NystromAttention) and attn.num_landmarks == 8
    assert (attn.num_heads, attn.head_dim, attn.qkv.out_features) == (4, 4, 48)
    with torch.no_grad():
        torch.testing.assert_close(swapped_then_pruned(IMAGES), pruned_then_swapped.eval()(IMAGES))


def _mlp_widths(vit: nn.Module) -> list[int]:
    return [block.mlp.fc1.out_features for block in vit.blocks]


def test_callable_schedule_sets_the_fraction_reached_at_each_step(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    callback = PruningSchedule(0.5, start_epoch=0, end_epoch=1, schedule=lambda progress: progress**2)
    widths = []

    class WidthSpy(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            widths.append(_mlp_widths(pl_module.model)[0])

    fast_trainer(tmp_path, callbacks=[callback, WidthSpy()], max_epochs=3, limit_train_batches=2).fit(model, digits)
    # step 1 of 2: progress 0.5 -> 0.25 of the final ratio -> 128 * (1 - 0.125) = 112; step 2: 64
    assert widths == [112, 64, 64]


def test_round_to_keeps_every_pruned_width_a_multiple(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    fast_trainer(tmp_path, callbacks=[PruningSchedule(0.3, round_to=8)], max_steps=1).fit(model, digits)
    vit = model.model
    assert vit.embed_dim % 8 == 0 and vit.embed_dim < 32
    assert all(width % 8 == 0 and width < 128 for width in _mlp_widths(vit))
    # without round_to the same ratio leaves widths that are not multiples of 8
    plain = tiny_classifier()
    fast_trainer(tmp_path, callbacks=[PruningSchedule(0.3)], max_steps=1).fit(plain, digits)
    assert any(width % 8 for width in [plain.model.embed_dim, *_mlp_widths(plain.model)])


def test_hessian_importance_uses_training_gradients(tmp_path, tiny_classifier, digits):
    kept = {}
    for importance in ("l2", "hessian"):
        model = tiny_classifier()
        original_fc1 = model.model.blocks[0].mlp.fc1.weight.detach().clone()
        callback = PruningSchedule(
            0.5, num_steps=1, interval="step", importance=importance, gradient_batches=2, prune_embed_dim=False
        )
        fast_trainer(tmp_path, callbacks=[callback], limit_train_batches=4).fit(model, digits)
        assert callback.steps_done == 1 and _mlp_widths(model.model) == [64, 64]
        # which hidden channels survived (read before the fine-tuning steps moved them too far)
        kept[importance] = set(_kept_rows(original_fc1, model.model.blocks[0].mlp.fc1.weight.detach()).tolist())
    assert kept["l2"] != kept["hessian"]  # the gradients, not the weight norms alone, chose


def test_global_pruning_over_steps_reaches_the_overall_ratio_with_uneven_widths(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    before = sum(_mlp_widths(model.model))
    callback = PruningSchedule(0.5, start_epoch=0, end_epoch=1, global_pruning=True, prune_embed_dim=False)
    fast_trainer(tmp_path, callbacks=[callback], max_epochs=2, limit_train_batches=2).fit(model, digits)
    widths = _mlp_widths(model.model)
    assert callback.steps_done == 2
    assert len(set(widths)) > 1  # ranked across layers, not the same cut everywhere
    total = sum(widths) + sum(block.attn.attn_dim for block in model.model.blocks)
    original = before + 2 * 32
    assert total / original == pytest.approx(0.5, abs=0.06)


# ------------------------------------------------------------------ trust: resume, second fit, failures
def _fixed_loader(digits) -> torch.utils.data.DataLoader:
    """Training batches in a fixed order (no shuffling), so two runs see the same data."""
    images, labels = next(iter(torch.utils.data.DataLoader(digits.train_set, batch_size=128)))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=32)


class StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = trainer.current_epoch == self.epoch


def test_resume_mid_schedule_gives_the_weights_of_an_uninterrupted_run(tmp_path, tiny_classifier, digits):
    def run(folder, model, *extra, **fit_kwargs):
        schedule = PruningSchedule(0.5, start_epoch=0, end_epoch=2)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)
        trainer = fast_trainer(
            tmp_path / folder,
            callbacks=[schedule, checkpoint, *extra],
            max_epochs=3,
            limit_train_batches=None,
            limit_val_batches=0,
            enable_checkpointing=True,
        )
        trainer.fit(model, train_dataloaders=_fixed_loader(digits), **fit_kwargs)
        return model

    uninterrupted = run("a", tiny_classifier())
    run("b", tiny_classifier(), StopAfter(1))  # killed after epoch 1 of 3, between pruning steps 2 and 3
    saved = read_checkpoint(tmp_path / "b" / "last.ckpt")

    resumed = run("c", tiny_classifier(), ckpt_path=tmp_path / "b" / "last.ckpt")
    assert _widths(resumed.model) == _widths(uninterrupted.model)
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)
    assert len(saved["state_dict"]) == len(resumed.state_dict())


def test_resuming_an_unpruned_checkpoint_prunes_after_the_restore(tmp_path, tiny_classifier, digits):
    plain = fast_trainer(
        tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        limit_train_batches=2,
        enable_checkpointing=True,
    )
    plain.fit(tiny_classifier(), digits)
    saved = read_checkpoint(tmp_path / "last.ckpt")["state_dict"]
    seen = {}

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module):  # after the restore, before the deferred pruning
            seen["restored"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    model = tiny_classifier()
    trainer = fast_trainer(tmp_path / "r", callbacks=[PruningSchedule(0.5), Spy()], max_epochs=2, limit_train_batches=2)
    trainer.fit(model, digits, ckpt_path=tmp_path / "last.ckpt")
    for key, value in saved.items():
        torch.testing.assert_close(seen["restored"][key], value, msg=key)  # the checkpoint's weights, unpruned
    assert model.model.embed_dim == 16 and _mlp_widths(model.model) == [64, 64]  # then pruned
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    assert trainer.global_step == 4


def test_second_fit_with_the_same_callback_does_not_compound(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    callback = PruningSchedule(0.5)
    fast_trainer(tmp_path, callbacks=[callback], max_steps=1).fit(model, digits)
    assert _mlp_widths(model.model) == [64, 64]
    trainer = fast_trainer(tmp_path, callbacks=[callback], max_steps=1)
    trainer.fit(model, digits)
    assert _mlp_widths(model.model) == [64, 64] and model.model.embed_dim == 16  # still 50%, not 75%
    assert len([r for r in recorded_edits(model) if r["kind"] == "prune"]) == 1


@pytest.mark.parametrize("on_module_itself", [False, True], ids=["submodule", "module_is_the_vit"])
@pytest.mark.parametrize("start_epoch", [0, 1], ids=["at_setup", "mid_fit"])
def test_a_failing_pruning_step_leaves_the_model_as_it_was(
    tmp_path, tiny_classifier, digits, monkeypatch, on_module_itself, start_epoch
):
    import lightning_vitcompress.functional.prune as pruning

    model = VitModule() if on_module_itself else tiny_classifier()
    outputs = {}

    class Before(Callback):  # listed first: runs before the pruning step of each epoch start
        def on_train_epoch_start(self, trainer, pl_module):
            pl_module.eval()
            with torch.no_grad():
                outputs["before"] = pl_module(IMAGES)
            pl_module.train()

    def broken_fix(*args, **kwargs):  # fails after torch-pruning has already cut the layers
        raise RuntimeError("injected failure")

    monkeypatch.setattr(pruning, "_keep_head_counts", broken_fix)
    callback = PruningSchedule(0.5, start_epoch=start_epoch)
    trainer = fast_trainer(
        tmp_path, callbacks=[Before(), callback], max_epochs=2, limit_train_batches=2, limit_val_batches=0
    )
    model.eval()
    with torch.no_grad():
        initial = model(IMAGES)
    with pytest.raises(RuntimeError, match=r"restored to how it was before this step.*injected failure"):
        trainer.fit(model, digits)
    vit = model if on_module_itself else model.model
    assert callback.target_path == ("" if on_module_itself else "model")
    assert vit.embed_dim == 32 and [m.fc1.out_features for m in vit.modules() if hasattr(m, "fc1")] == [128, 128]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), outputs.get("before", initial), rtol=0, atol=0)
    assert not recorded_edits(model)


class VitModule(VisionTransformer, L.LightningModule):
    """A LightningModule that is itself the timm ViT (no child holds it): pruning acts on the module in place."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(img_size=32, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=4)
        # two children hold attention blocks, so the callbacks act on the module itself (target path "")
        self.more_blocks = nn.Sequential(self.blocks[1])
        self.blocks = nn.Sequential(self.blocks[0])

    def forward_features(self, x, **kwargs):
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
        return self.norm(self.more_blocks(self.blocks(x)))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_a_model_snapshot_restores_the_same_state_every_time():
    """Rolled back twice (two pruning steps beyond budget): the second restore must not hand back trained values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    parameters = list(model.parameters())
    saved = copy.deepcopy(model.state_dict())
    snapshot = ModelSnapshot(model)
    for _ in range(2):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)  # training after the restore
        model[0].out_features = 2  # a structural edit: attribute and parameter dict
        model[0]._parameters["bias"] = nn.Parameter(torch.zeros(2))
        snapshot.restore()
        assert model[0].out_features == 4 and list(model.parameters()) == parameters  # the very objects
        for key, value in model.state_dict().items():
            assert torch.equal(value, saved[key]), key
