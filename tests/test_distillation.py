"""DistillationTeacher: the loss it adds, the teacher it keeps frozen and out of checkpoints, its errors."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, fast_trainer, run_ddp_script
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_vitcompress import DistillationTeacher
from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress.digits import DigitsClassifier, small_vit
from lightning_vitcompress.functional import (
    DistillConfig,
    combine_losses,
    hard_distillation_loss,
    load_teacher,
    soft_distillation_loss,
)


def tiny_teacher(seed: int = 1, **overrides: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    return small_vit(**{**TINY, **overrides})


# ------------------------------------------------------------ loss functions
def test_soft_and_hard_losses_match_hand_computation():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    T = 2.0
    expected_soft = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p = [math.exp(v / T) for v in t_row]
        p = [v / sum(p) for v in p]
        q = [math.exp(v / T) for v in s_row]
        q = [v / sum(q) for v in q]
        expected_soft += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected_soft = expected_soft / 2 * T * T
    assert soft_distillation_loss(student, teacher, T).item() == pytest.approx(expected_soft, rel=1e-5)
    # teacher argmax: class 0 (tie 0/1 -> first) and class 1
    expected_hard = (
        -math.log(math.exp(2.0) / (math.exp(2.0) + 1 + math.exp(-1.0)))
        - math.log(math.exp(1.5) / (math.exp(0.5) + math.exp(1.5) + 1))
    ) / 2
    assert hard_distillation_loss(student, teacher).item() == pytest.approx(expected_hard, rel=1e-5)
    assert combine_losses(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(2.5)
    assert soft_distillation_loss(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_config_is_checked_once_frozen_and_computes_the_term():
    config = DistillConfig(mode="deit", alpha=1, temperature=3, deit_target="soft")
    assert (config.alpha, config.temperature) == (1.0, 3.0) and isinstance(config.alpha, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.alpha = 0.2  # type: ignore[misc]
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.equal(config.loss(student, teacher), soft_distillation_loss(student, teacher, 3.0))
    assert torch.equal(
        DistillConfig(mode="soft", temperature=4).loss(student, teacher), soft_distillation_loss(student, teacher, 4.0)
    )
    for mode in ("hard", "deit"):  # deit's default target is DeiT's hard term
        assert torch.equal(DistillConfig(mode=mode).loss(student, teacher), hard_distillation_loss(student, teacher))
    for kwargs, match in [
        (dict(alpha=1.5), r"alpha=1.5"),
        (dict(mode="kd"), r"mode='kd'"),
        (dict(temperature=0), r"temperature=0"),
        (dict(deit_target="soft"), r"deit_target='soft'"),
    ]:
        with pytest.raises(ValueError, match=match):
            DistillConfig(**kwargs)


def test_callback_takes_a_config_or_the_keywords_not_both():
    config = DistillConfig(mode="hard", alpha=0.3)
    assert DistillationTeacher(torch.nn.Linear(2, 2), config=config).config is config
    assert DistillationTeacher(torch.nn.Linear(2, 2), mode="hard", alpha=0.3).config == config
    with pytest.raises(
        ValueError, match=r"\(config=\.\.\., mode='deit', alpha=0.7\): pass the options either in config"
    ):
        DistillationTeacher(torch.nn.Linear(2, 2), "deit", 0.7, config=DistillConfig(mode="hard"))
    with pytest.raises(TypeError, match=r"config=\{'mode': 'hard'\}: pass a DistillConfig"):
        DistillationTeacher(torch.nn.Linear(2, 2), config={"mode": "hard"})


def test_load_teacher_works_without_a_trainer(tmp_path):
    big = DigitsClassifier(embed_dim=48, depth=2, num_heads=4)
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": big.state_dict(), "hyper_parameters": dict(big.hparams)}, path)
    teacher = load_teacher(path, teacher_class=DigitsClassifier)
    assert teacher.embed_dim == 48
    assert all(torch.equal(v, big.model.state_dict()[k]) for k, v in teacher.state_dict().items())
    assert load_teacher(big) is big.model  # a LightningModule gives its ViT
    with pytest.raises(ValueError, match=r"teacher=.*teacher.ckpt' is a checkpoint path: pass teacher_class"):
        load_teacher(path)
    arch = dict(num_classes=10, img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=4)
    named = load_teacher("vit_tiny_patch16_224", pretrained=False, teacher_kwargs=arch)
    assert named.num_classes == 10


# ------------------------------------------------ the loss the trainer backprops
class LossCheck(Callback):
    """At ``on_before_backward``, recompute the expected total loss from the batch and the pre-step weights."""

    def __init__(self, callback: DistillationTeacher, forwards: int = 1) -> None:
        self.callback = callback
        self.forwards = forwards
        self.pairs: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    @torch.no_grad()
    def on_before_backward(self, trainer, pl_module, loss):
        images, labels = self.batch
        student, teacher, cb = pl_module.model, self.callback.teacher, self.callback
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cb.teacher_precision)
        with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):
            teacher_logits = teacher(images).float()
        if cb.config.mode == "deit":
            student.set_distilled_training(True)
            cls_logits, dist_logits = student(images)
            student.set_distilled_training(False)
            task = F.cross_entropy(cls_logits, labels)
            distill = (
                F.cross_entropy(dist_logits, teacher_logits.argmax(-1))
                if cb.config.deit_target == "hard"
                else soft_distillation_loss(dist_logits, teacher_logits, cb.config.temperature)
            )
        else:
            logits = student(images)
            task = F.cross_entropy(logits, labels) * self.forwards
            if cb.config.mode == "soft":
                distill = (
                    F.kl_div(
                        F.log_softmax(logits / cb.config.temperature, -1),
                        F.softmax(teacher_logits / cb.config.temperature, -1),
                        reduction="batchmean",
                    )
                    * cb.config.temperature**2
                )
            else:
                distill = F.cross_entropy(logits, teacher_logits.argmax(-1))
        self.pairs.append((loss.item(), ((1 - cb.config.alpha) * task + cb.config.alpha * distill).item()))


@pytest.mark.parametrize(
    "mode, model_name, deit_target",
    [
        ("soft", "vit_tiny_patch16_224", "hard"),
        ("hard", "vit_tiny_patch16_224", "hard"),
        ("deit", "deit_tiny_distilled_patch16_224", "hard"),
        ("deit", "deit_tiny_distilled_patch16_224", "soft"),
    ],
)
def test_backpropagated_loss_is_the_formula(tmp_path, digits, tiny_classifier, mode, model_name, deit_target):
    settings = dict(mode=mode, alpha=0.3, temperature=3.0, deit_target=deit_target)
    if mode == "hard":  # the same settings as one config
        callback = DistillationTeacher(tiny_teacher(), config=DistillConfig(**settings))
    else:
        callback = DistillationTeacher(tiny_teacher(), **settings)
    check = LossCheck(callback)
    trainer = fast_trainer(tmp_path, callbacks=[callback, check], limit_train_batches=2, limit_val_batches=0)
    trainer.fit(tiny_classifier(model_name=model_name), digits)
    assert len(check.pairs) == 2
    for got, expected in check.pairs:
        assert got == pytest.approx(expected, rel=1e-4)
    assert {"distill/task_loss_epoch", "distill/loss_epoch", "distill/agreement_epoch"} <= set(trainer.callback_metrics)
    assert 0.0 <= trainer.callback_metrics["distill/agreement_epoch"].item() <= 1.0


class TwoViews(DigitsClassifier):
    """Calls the model twice with gradients (same images) and once without: the no-grad call is ignored."""

    def training_step(self, batch, batch_idx):
        images, labels = batch
        with torch.no_grad():
            self(images.flip(-1))
        return F.cross_entropy(self(images), labels) + F.cross_entropy(self(images), labels)


def test_several_forward_calls_average_their_terms(tmp_path, digits):
    L.seed_everything(0, verbose=False)
    callback = DistillationTeacher(tiny_teacher(), mode="soft", alpha=0.5, temperature=2.0)
    check = LossCheck(callback, forwards=2)  # task = sum of two CEs, distill = mean of two identical terms
    trainer = fast_trainer(tmp_path, callbacks=[callback, check], limit_train_batches=1, limit_val_batches=0)
    trainer.fit(TwoViews(**TINY), digits)
    got, expected = check.pairs[0]
    assert got == pytest.approx(expected, rel=1e-4)


class DictStep(DigitsClassifier):
    def training_step(self, batch, batch_idx):
        images, labels = batch
        return {"loss": F.cross_entropy(self(images), labels), "extra": torch.tensor(7.0)}


class Outputs(Callback):
    def __init__(self) -> None:
        self.outputs: list[Any] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)


def test_dict_returning_training_step(tmp_path, digits):
    L.seed_everything(0, verbose=False)
    callback = DistillationTeacher(tiny_teacher(), alpha=1.0)
    check, outputs = LossCheck(callback), Outputs()
    trainer = fast_trainer(tmp_path, callbacks=[callback, check, outputs], limit_train_batches=2, limit_val_batches=0)
    trainer.fit(DictStep(**TINY), digits)
    assert len(check.pairs) == len(outputs.outputs) == 2  # both steps checked: a zip over nothing checks nothing
    for (got, expected), output in zip(check.pairs, outputs.outputs, strict=True):
        assert got == pytest.approx(expected, rel=1e-4)
        assert output["extra"].item() == 7.0 and output["loss"].item() == pytest.approx(got, rel=1e-5)


# ------------------------------------------------------ teacher kept apart
def test_teacher_frozen_outside_checkpoint_and_gradients_reach_only_the_student(tmp_path, digits, tiny_classifier):
    teacher = tiny_teacher()
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = tiny_classifier()
    student_before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = DistillationTeacher(teacher, alpha=0.5)
    trainer = fast_trainer(tmp_path, callbacks=[callback], limit_val_batches=0)
    trainer.fit(model, digits)
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(student_before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is not None for p in model.model.parameters() if p.requires_grad)
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["state_dict"]) == set(model.state_dict())
    assert not any(
        isinstance(v, torch.Tensor) and v.numel() > 1
        for v in checkpoint["callbacks"][
            next(k for k in checkpoint["callbacks"] if "DistillationTeacher" in k)
        ].values()
    )
    # the wrapper is gone after fit: the module's own training_step again
    assert "training_step" not in model.__dict__


class DeitSpy(DigitsClassifier):
    """Records what ``self(images)`` returns inside training_step."""

    seen: ClassVar[list[Any]] = []  # one list for the class: the test reads what any instance saw

    def training_step(self, batch, batch_idx):
        logits = self(batch[0])
        self.seen.append(tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits))
        return F.cross_entropy(logits, batch[1])


def test_deit_student_trains_both_heads_and_evaluates_their_average(tmp_path, digits):
    L.seed_everything(0, verbose=False)
    model = DeitSpy(model_name="deit_tiny_distilled_patch16_224", **TINY)
    heads = {n: model.model.get_submodule(n).weight.clone() for n in ("head", "head_dist")}
    callback = DistillationTeacher(tiny_teacher(), mode="deit", alpha=0.5)
    fast_trainer(tmp_path, callbacks=[callback], limit_train_batches=2, limit_val_batches=0).fit(model, digits)
    assert model.seen == [(64, 10), (64, 10)]  # training_step saw ordinary logits
    for name, weight in heads.items():
        assert not torch.equal(weight, model.model.get_submodule(name).weight), f"{name} did not train"
    assert model.model.distilled_training is False
    model.eval()
    images = digits.val_set[:4][0]
    with torch.no_grad():
        features = model.model.forward_features(images)
        average = (model.model.head(features[:, 0]) + model.model.head_dist(features[:, 1])) / 2
        assert torch.allclose(model(images), average, atol=1e-5)


def test_teacher_at_another_resolution_and_logit_cache(tmp_path, digits, tiny_classifier):
    calls = {"n": 0, "sizes": set()}
    teacher = tiny_teacher(image_size=64, patch_size=8)

    def count(module, args, output):
        calls["n"] += 1
        calls["sizes"].add(tuple(args[0].shape[-2:]))

    teacher.register_forward_hook(count)
    callback = DistillationTeacher(teacher, mode="hard", cache_teacher_logits=True)  # resized automatically
    loader = DataLoader(digits.train_set, batch_size=64, shuffle=False)
    trainer = fast_trainer(tmp_path, callbacks=[callback], max_epochs=2, limit_train_batches=3)
    trainer.fit(tiny_classifier(), train_dataloaders=loader)
    # one image at setup (the teacher must run the student's input), then 3 batches; second epoch: all from the cache
    assert calls == {"n": 1 + 3, "sizes": {(64, 64)}}
    assert len(callback._cache) == 192

    explicit = DistillationTeacher(tiny_teacher(image_size=48, patch_size=8), input_adapter=48)
    fast_trainer(tmp_path, callbacks=[explicit], limit_train_batches=1, limit_val_batches=0).fit(
        tiny_classifier(), digits
    )
    adapted: list[tuple[int, ...]] = []

    def halve(images: torch.Tensor) -> torch.Tensor:
        adapted.append(tuple(images.shape))
        return images * 0.5

    custom = DistillationTeacher(tiny_teacher(), input_adapter=halve)
    fast_trainer(tmp_path, callbacks=[custom], limit_train_batches=1, limit_val_batches=0).fit(
        tiny_classifier(), digits
    )
    assert adapted == [(1, 3, 32, 32), (64, 3, 32, 32)]  # the setup check's one image, then the batch


def test_teacher_follows_the_students_precision(tmp_path, digits, tiny_classifier):
    callback = DistillationTeacher(tiny_teacher(), alpha=0.5)
    trainer = fast_trainer(
        tmp_path, callbacks=[callback], precision="bf16-true", limit_train_batches=1, limit_val_batches=0
    )
    trainer.fit(tiny_classifier(), digits)
    assert {p.dtype for p in callback.teacher.parameters()} == {torch.bfloat16}
    assert torch.isfinite(trainer.callback_metrics["distill/loss_epoch"])


class LinearDtypes:
    """The dtype of every nn.Linear output of a model's forward calls, and whether autograd recorded it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: set[tuple[torch.dtype, bool]] = set()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.seen.add((output.dtype, output.is_inference()))


@pytest.mark.parametrize(
    "requested, precision, expected",
    [(None, "32-true", None), ("bf16", "32-true", torch.bfloat16), ("fp32", "bf16-mixed", torch.float32)],
)
def test_teacher_precision_runs_the_teacher_under_autocast_in_inference_mode(
    tmp_path, digits, tiny_classifier, requested, precision, expected
):
    from lightning_vitcompress.functional.distill import autocast_runs_natively

    teacher = tiny_teacher()
    dtypes = LinearDtypes(teacher)
    callback = DistillationTeacher(teacher, teacher_precision=requested)
    trainer = fast_trainer(
        tmp_path, callbacks=[callback], precision=precision, limit_train_batches=1, limit_val_batches=0
    )
    trainer.fit(tiny_classifier(), digits)
    if requested is None:  # the per-device default: bf16 only where this CPU has native bf16
        native = autocast_runs_natively("cpu", "bf16")
        assert callback.teacher_precision == ("bf16" if native else "fp32")
        expected = torch.bfloat16 if native else torch.float32
    assert dtypes.seen == {(expected, True)}  # every teacher matmul at that precision, no autograd record
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}  # weights untouched
    state = callback.state_dict()
    assert state["teacher_precision"] == callback.teacher_precision
    assert torch.isfinite(trainer.callback_metrics["distill/loss_epoch"])


def test_teacher_forward_precision_returns_float32_logits_close_to_fp32():
    from lightning_vitcompress.functional.distill import teacher_forward

    teacher, x = tiny_teacher().eval(), torch.randn(8, 3, 32, 32)
    exact = teacher_forward(teacher, x, precision="fp32")
    with torch.no_grad():
        assert torch.equal(exact, teacher(x))
    low = teacher_forward(teacher, x, precision="bf16")
    assert low.dtype == torch.float32 and not low.is_inference() and not torch.equal(low, exact)
    torch.testing.assert_close(low, exact, atol=0.1, rtol=0.05)


class DropLastBlockAtSetup(CompressionCallback):
    """A structural edit at order 20 (as pruning): distillation must see the edited student in any list order."""

    order = 20

    def ordered_setup(self, trainer, pl_module, stage):
        model = self.target(pl_module)
        model.blocks = model.blocks[:-1]


def test_list_order_does_not_matter(tmp_path, digits, tiny_classifier):
    losses = []
    for distill_first in (True, False):
        distill, drop = DistillationTeacher(tiny_teacher(), alpha=0.5), DropLastBlockAtSetup()
        model = tiny_classifier()
        callbacks = [distill, drop] if distill_first else [drop, distill]
        trainer = fast_trainer(tmp_path, callbacks=callbacks, limit_train_batches=2, limit_val_batches=0)
        L.seed_everything(0, verbose=False)  # same data order in both runs
        trainer.fit(model, digits)
        assert len(model.model.blocks) == 1
        losses.append(trainer.callback_metrics["distill/loss_epoch"].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_resume_continues_exactly_where_the_checkpoint_stopped(tmp_path, digits, tiny_classifier):
    """1 epoch + resume for 1 ends with the weights of 2 uninterrupted epochs (data in a fixed order)."""
    loader = DataLoader(digits.train_set, batch_size=64, shuffle=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    straight = tiny_classifier()
    fast_trainer(
        tmp_path,
        callbacks=[DistillationTeacher(tiny_teacher()), checkpoints],
        max_epochs=2,
        limit_val_batches=0,
        enable_checkpointing=True,
    ).fit(straight, train_dataloaders=loader)
    saved = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    assert saved["callbacks"]["DistillationTeacher"]["mode"] == "soft"

    seen: dict = {}

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    L.seed_everything(5, verbose=False)
    resumed_model = DigitsClassifier(**TINY)  # other initial weights: the checkpoint must provide all of them
    resumed = fast_trainer(
        tmp_path, callbacks=[DistillationTeacher(tiny_teacher()), AtStart()], max_epochs=2, limit_val_batches=0
    )
    resumed.fit(resumed_model, train_dataloaders=loader, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert resumed.current_epoch == 2 and "distill/loss_epoch" in resumed.callback_metrics
    assert all(torch.equal(seen[k], v) for k, v in saved["state_dict"].items())  # started from the checkpoint
    for key, value in straight.state_dict().items():
        assert torch.allclose(resumed_model.state_dict()[key], value, atol=1e-6), key
        if key.startswith("model.") and value.is_floating_point():
            changed = not torch.equal(value, saved["state_dict"][key])
            seen["changed"] = seen.get("changed", False) or changed
    assert seen["changed"]  # the resumed epoch trained


@pytest.mark.parametrize(("argument", "first", "then"), [("mode", "deit", "soft"), ("deit_target", "hard", "soft")])
def test_resuming_with_another_loss_is_an_error_naming_both_values(tmp_path, digits, argument, first, then):
    def student():
        L.seed_everything(0, verbose=False)
        return DigitsClassifier(model_name="deit_tiny_distilled_patch16_224", **TINY)

    def callback(**kwargs):
        return DistillationTeacher(tiny_teacher(), **{"mode": "deit", **kwargs})

    trainer = fast_trainer(tmp_path, callbacks=[callback(**{argument: first})], limit_train_batches=1)
    trainer.fit(student(), digits)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    model = student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resumed = fast_trainer(tmp_path, callbacks=[callback(**{argument: then})], max_epochs=2)
    with pytest.raises(ValueError, match=rf"{argument}='{then}', but the checkpoint.*{argument}='{first}'"):
        resumed.fit(model, digits, ckpt_path=tmp_path / "run.ckpt")
    assert resumed.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before loading


def test_resuming_with_another_alpha_warns_and_uses_the_new_value(tmp_path, digits, tiny_classifier):
    trainer = fast_trainer(tmp_path, callbacks=[DistillationTeacher(tiny_teacher(), alpha=0.5)], limit_train_batches=1)
    trainer.fit(tiny_classifier(), digits)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    callback = DistillationTeacher(tiny_teacher(), alpha=0.9)
    resumed = fast_trainer(tmp_path, callbacks=[callback], max_epochs=2, limit_train_batches=1, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"alpha=0.5 -> 0.9.*new values apply"):
        resumed.fit(tiny_classifier(), digits, ckpt_path=tmp_path / "run.ckpt")
    assert callback.config.alpha == 0.9 and resumed.current_epoch == 2


def test_resuming_with_another_teacher_precision_warns_naming_both(tmp_path, digits, tiny_classifier):
    first = DistillationTeacher(tiny_teacher(), teacher_precision="fp32")
    trainer = fast_trainer(tmp_path, callbacks=[first], limit_train_batches=1, limit_val_batches=0)
    trainer.fit(tiny_classifier(), digits)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    callback = DistillationTeacher(tiny_teacher(), teacher_precision="bf16")
    resumed = fast_trainer(tmp_path, callbacks=[callback], max_epochs=2, limit_train_batches=1, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"teacher_precision='fp32' -> 'bf16'"):
        resumed.fit(tiny_classifier(), digits, ckpt_path=tmp_path / "run.ckpt")
    assert callback.teacher_precision == "bf16" and resumed.current_epoch == 2


# ------------------------------------------------------------ teacher sources
def test_teacher_from_checkpoint_path_and_timm_name_with_local_file(tmp_path, digits, tiny_classifier):
    big = DigitsClassifier(embed_dim=48, depth=2, num_heads=4)
    trainer = fast_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(big, digits)
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    callback = DistillationTeacher(str(path))  # loaded as the student's class, with the saved hyper-parameters
    fast_trainer(tmp_path, callbacks=[callback], limit_train_batches=1, limit_val_batches=0).fit(
        tiny_classifier(), digits
    )
    assert callback.teacher.embed_dim == 48
    assert all(torch.equal(v, big.model.state_dict()[k]) for k, v in callback.teacher.state_dict().items())

    weights = tmp_path / "vit.pth"
    torch.save(big.model.state_dict(), weights)
    arch = dict(num_classes=10, img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=4)
    named = DistillationTeacher("vit_tiny_patch16_224", teacher_weights=weights, teacher_kwargs=arch)
    fast_trainer(tmp_path, callbacks=[named], limit_train_batches=1, limit_val_batches=0).fit(tiny_classifier(), digits)
    assert all(torch.equal(v, big.model.state_dict()[k]) for k, v in named.teacher.state_dict().items())


# ---------------------------------------------------------------- fail fast
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=1.5), r"alpha=1.5.*\[0, 1\]"),
        (dict(alpha=-0.1), r"alpha=-0.1"),
        (dict(temperature=0), r"temperature=0: must be a positive"),
        (dict(temperature=float("inf")), r"temperature=inf"),
        (dict(mode="kd"), r"mode='kd'"),
        (dict(deit_target="x"), r"deit_target='x'"),
        (dict(input_adapter=(224,)), r"input_adapter"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationTeacher(torch.nn.Linear(2, 2), **kwargs)


def test_an_unknown_timm_name_is_refused_in_the_constructor_with_close_matches():
    with pytest.raises(ValueError, match=r"teacher='vit_tiny_patch16_24'.*Close matches: \[.*'vit_tiny_patch16_224'"):
        DistillationTeacher("vit_tiny_patch16_24", pretrained=False)


class Manual(DigitsClassifier):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False


@pytest.mark.parametrize(
    "case, match",
    [
        ("classes", r"teacher predicts 7 classes but the student 10"),
        ("deit", r"mode='deit' needs a student with a distillation token.*VisionTransformer has none"),
        ("path", r"teacher='.*missing.ckpt': no such checkpoint file"),
        ("shared", r"shares parameters with the LightningModule"),
        ("manual", r"automatic_optimization is False"),
    ],
)
def test_setup_errors(tmp_path, digits, tiny_classifier, case, match):
    model = Manual(**TINY) if case == "manual" else tiny_classifier()
    teacher: Any = {
        "classes": tiny_teacher(num_classes=7),
        "deit": tiny_teacher(),
        "path": str(tmp_path / "missing.ckpt"),
        "shared": model.model,
        "manual": tiny_teacher(),
    }[case]
    callback = DistillationTeacher(teacher, mode="deit" if case == "deit" else "soft", pretrained=False)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        fast_trainer(tmp_path, callbacks=[callback]).fit(model, digits)
    assert "training_step" not in model.__dict__


class NoForward(DigitsClassifier):
    def training_step(self, batch, batch_idx):
        return self.model.head(self.model.forward_features(batch[0])[:, 0]).logsumexp(-1).mean()


def test_step_without_a_student_forward_says_so(tmp_path, digits):
    with pytest.raises(RuntimeError, match="was not called with gradients enabled"):
        fast_trainer(tmp_path, callbacks=[DistillationTeacher(tiny_teacher())]).fit(NoForward(**TINY), digits)


class FailingTeacher(torch.nn.Module):
    """A teacher whose forward fails on its fourth call (the setup check's, then two batches): a failure in the
    middle of distilling."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_teacher()
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        if self.calls == 4:
            raise RuntimeError("injected teacher failure")
        return self.net(images)


def test_a_failing_teacher_leaves_the_student_as_the_last_good_step_left_it(tmp_path, digits, tiny_classifier):
    model = tiny_classifier()
    images = next(iter(digits.val_dataloader()))[0][:8]
    after_good_steps = {}

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after_good_steps.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    trainer = fast_trainer(tmp_path, callbacks=[DistillationTeacher(FailingTeacher()), Snapshot()], limit_val_batches=0)
    with pytest.raises(RuntimeError, match="injected teacher failure"):
        trainer.fit(model, digits)
    assert trainer.global_step == 2  # two steps trained, the third failed before its optimizer step
    assert all(torch.equal(after_good_steps[k], v) for k, v in model.state_dict().items())
    assert "training_step" not in model.__dict__  # the wrapper is gone: the module's own training_step again
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()


# ---------------------------------------------------------------------- DDP
def test_ddp_two_processes(tmp_path):
    reports = run_ddp_script(
        f"""
        import lightning as L, torch
        from lightning.pytorch.callbacks import Callback, ModelCheckpoint
        from lightning_vitcompress import DistillationTeacher
        from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule, small_vit

        class Spy(Callback):
            losses = []
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.losses.append(float(outputs["loss"]))
                self.wrapped = type(trainer.strategy.model).__name__

        torch.manual_seed(1)
        teacher = small_vit(**{TINY!r})
        L.seed_everything(0)
        distill = DistillationTeacher(teacher, mode="soft", alpha=0.5)
        spy = Spy()
        trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, limit_train_batches=2,
                            limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[distill, spy])
        model = DigitsClassifier(**{TINY!r})
        trainer.fit(model, DigitsDataModule(batch_size=16))
        report(trainer, wrapped=spy.wrapped, teacher_type=type(distill.teacher).__name__,
               teacher_frozen=all(not p.requires_grad for p in distill.teacher.parameters()),
               param_sum=float(sum(p.double().sum() for p in model.parameters())),
               distill_loss=float(trainer.callback_metrics["distill/loss_epoch"]),
               n_losses=len(spy.losses))
        """,
        tmp_path,
    )
    assert [r["wrapped"] for r in reports] == ["DistributedDataParallel"] * 2
    assert all(r["teacher_type"] == "VisionTransformer" and r["teacher_frozen"] for r in reports)
    assert reports[0]["param_sum"] == pytest.approx(reports[1]["param_sum"], rel=1e-6)  # ranks in lock-step
    assert all(r["distill_loss"] > 0 and r["n_losses"] == 2 for r in reports)


# ---------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "bf16-true"])
def test_teacher_on_the_students_gpu_and_precision(tmp_path, digits, tiny_classifier, precision):
    callback = DistillationTeacher(tiny_teacher(image_size=64, patch_size=8), mode="soft", cache_teacher_logits=True)
    trainer = fast_trainer(
        tmp_path, accelerator="gpu", precision=precision, max_epochs=2, limit_val_batches=0, callbacks=[callback]
    )
    model = tiny_classifier()
    trainer.fit(model, digits)
    teacher_param = next(callback.teacher.parameters())
    assert teacher_param.device.type == "cuda"
    assert teacher_param.dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    assert torch.isfinite(trainer.callback_metrics["distill/loss_epoch"])
