"""CompressionPlan's setup inputs: its arguments checked, the checkpoint state a resume plans from, the timed batch."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._checkpoint_file import read_checkpoint
from lightning_vitcompress._data import first_batch, validation_data
from lightning_vitcompress._lightning import callbacks_of, fit_ckpt_path
from lightning_vitcompress.callbacks.distillation import DistillationTeacher
from lightning_vitcompress.callbacks.nystrom import NystromSwap
from lightning_vitcompress.callbacks.pruning import PruningSchedule
from lightning_vitcompress.callbacks.quantization import QuantizeOnFit
from lightning_vitcompress.callbacks.token_merging import TokenMerging
from lightning_vitcompress.functional.measure import images_of
from lightning_vitcompress.functional.nystrom import NystromConfig
from lightning_vitcompress.functional.plan import Candidate, Recipe, SpeedModel, eligible_candidates
from lightning_vitcompress.functional.prune import PruneConfig
from lightning_vitcompress.functional.quantize_configs import QUANTIZATION_CONFIGS
from lightning_vitcompress.functional.token_merging import TokenMergingConfig

__all__ = [
    "DISTILLATION",
    "PLANNED",
    "check_candidates",
    "check_goal",
    "check_options",
    "check_plan_fit",
    "example_batch",
    "recipe_callbacks",
    "resumed_choice",
    "saved_plan_state",
]

#: the callbacks the plan configures itself (one of them in the list too would act twice)
PLANNED = (PruningSchedule, NystromSwap, TokenMerging, DistillationTeacher, QuantizeOnFit)

#: ``DistillationTeacher``'s options when ``distillation=None``
DISTILLATION = {"mode": "soft", "alpha": 0.5, "temperature": 2.0}


def check_goal(target_speedup: Any, max_accuracy_drop: Any, device: Any, runtime: Any, quantization: Any) -> None:
    """What is asked (speedup, budget) and where it is deployed; refused with a message naming the argument."""
    if target_speedup != "max":
        _check_number(
            target_speedup, "target_speedup", 1.0, "a speedup over the uncompressed model, e.g. 4.0, or 'max'"
        )
    if max_accuracy_drop is not None:
        _check_number(max_accuracy_drop, "max_accuracy_drop", 0.0, "points of top-1, e.g. 1.0, or None")
    if device != "cpu":
        raise ValueError(f"device={device!r}: the plan times CPU deployment for now; pass device='cpu'.")
    if runtime not in ("torch", "openvino"):
        raise ValueError(f"runtime={runtime!r}: pass 'torch' or 'openvino'.")
    if runtime == "openvino":
        if importlib.util.find_spec("openvino") is None:
            raise ImportError(
                "runtime='openvino' needs the openvino package (pip install openvino), or pass runtime='torch'."
            )
        if quantization:
            raise ValueError(
                f"quantization={tuple(quantization)!r} with runtime='openvino': the plan times "
                "OpenVINO's float model only for now; pass quantization=() (for NNCF int8 use "
                "ExportOnFit('model.xml', quantize='int8')), or runtime='torch'."
            )


def check_candidates(
    pruning_ratios: Any, r_values: Any, num_landmarks: Any, quantization: Any
) -> tuple[tuple[float, ...], Optional[tuple[int, ...]], tuple[int, ...], tuple[str, ...]]:
    """The candidate values of each technique, as tuples: ``(pruning_ratios, r_values, num_landmarks, quantization)``."""
    ratios = tuple(float(p) for p in _sequence(pruning_ratios, "pruning_ratios", "(0, 0.25, 0.5)"))
    if any(not 0.0 <= p < 1.0 for p in ratios):
        raise ValueError(f"pruning_ratios={tuple(pruning_ratios)!r}: each a fraction in [0, 1), e.g. (0, 0.25, 0.5).")
    if r_values is not None:
        r_values = tuple(_sequence(r_values, "r_values", "(4, 8) or None"))
        _check_ints(r_values, "r_values", "(4, 8), () for no token merging, or None")
    landmarks = tuple(_sequence(num_landmarks, "num_landmarks", "(32, 64)"))
    _check_ints(landmarks, "num_landmarks", "(32, 64), or () for no Nystrom")
    configs = tuple(_sequence(quantization, "quantization", "('int8_dynamic',)"))
    unknown = [c for c in configs if c not in QUANTIZATION_CONFIGS]
    if unknown:
        raise ValueError(
            f"quantization={configs!r}: {unknown} are not configs; known: "
            f"{sorted(QUANTIZATION_CONFIGS)}, or () for none."
        )
    return ratios, r_values, landmarks, configs


def check_options(
    batch_size: Any,
    pruning_steps: Any,
    rounds: Any,
    num_threads: Any,
    min_run_time: Any,
    distill: Any,
    distillation: Any,
    speed_model: Any,
    verify: Any = True,
) -> None:
    """How it times and trains."""
    if not isinstance(verify, bool):
        raise ValueError(f"verify={verify!r}: pass True (time the chosen recipe built whole at setup) or False.")
    for value, name, example in (
        (batch_size, "batch_size", "4"),
        (pruning_steps, "pruning_steps", "2"),
        (rounds, "rounds", "3"),
    ):
        _check_ints((value,), name, example)
    if num_threads is not None:
        _check_ints((num_threads,), "num_threads", "2, or None")
    _check_number(min_run_time, "min_run_time", 1e-6, "seconds, e.g. 0.05")
    if not isinstance(distill, bool):
        raise ValueError(f"distill={distill!r}: pass True (train against the model entering fit) or False.")
    if distillation is not None and not isinstance(distillation, dict):
        raise ValueError(
            f"distillation={distillation!r}: pass DistillationTeacher options as a dict, "
            f"e.g. {DISTILLATION}, or None for those."
        )
    if speed_model is not None and not isinstance(speed_model, SpeedModel):
        raise ValueError(
            f"speed_model={type(speed_model).__name__}: pass what measure_speed_model returned, "
            "or None to measure at setup."
        )


def check_plan_fit(
    trainer: pl.Trainer, plan: Callback, planned_types: tuple[type, ...], max_accuracy_drop: Optional[float]
) -> None:
    """The fit ``plan`` sets up is one it can plan: the plan first of the compression callbacks, none of the
    ``planned_types`` it adds itself in the list, and validation data when there is a budget."""
    ours = [cb for cb in callbacks_of(trainer) if isinstance(cb, CompressionCallback)]
    if ours and ours[0] is not plan:
        raise ValueError(
            f"CompressionPlan comes after {type(ours[0]).__name__} in Trainer(callbacks=[...]): it chooses the "
            "callbacks the others see at setup. Put CompressionPlan first in the list."
        )
    planned = [type(cb).__name__ for cb in callbacks_of(trainer) if isinstance(cb, planned_types)]
    if planned:
        raise ValueError(
            f"CompressionPlan configures {', '.join(planned)} itself: remove {planned} from Trainer(callbacks=...)"
            ", or drop CompressionPlan and use the plain callbacks (the report's compression_plan_callbacks.py)."
        )
    loader, _ = validation_data(trainer)
    if max_accuracy_drop is not None and loader is None:
        raise ValueError(
            f"CompressionPlan(max_accuracy_drop={max_accuracy_drop!r}) checks validation top-1 at each step, "
            f"but this fit has no validation data (limit_val_batches={trainer.limit_val_batches!r}). Pass "
            "val_dataloaders to fit / a datamodule with val_dataloader and limit_val_batches > 0, or "
            "max_accuracy_drop=None (no checks, no back-off)."
        )


def saved_plan_state(trainer: pl.Trainer, state_key: str) -> Optional[dict[str, Any]]:
    """What ``CompressionPlan`` (under ``state_key``) saved in the checkpoint this fit resumes from (None: a fresh fit, or none saved).

    Read here, at setup, because Lightning restores callback state only after the model is rebuilt."""
    path, weights_only = fit_ckpt_path(trainer)
    if not path or not Path(path).is_file():
        return None
    checkpoint = read_checkpoint(path, weights_only=weights_only, argument="ckpt_path")
    saved = (checkpoint.get("callbacks") or {}).get(state_key)
    return saved if isinstance(saved, dict) and saved.get("speed_model") else None


def example_batch(trainer: pl.Trainer, batch_size: int) -> torch.Tensor:
    """``batch_size`` images of the fit (validation data first), repeated if a batch is smaller: what is timed."""
    images = None
    for validation in (True, False):
        images = images_of(first_batch(trainer, validation=validation))
        if images is not None:
            break
    if images is None:
        raise ValueError(
            "CompressionPlan times the model on the fit's images, but neither the validation nor "
            "the training data gave a batch of image tensors."
        )
    images = images.detach().cpu()
    repeats = -(-batch_size // images.shape[0])
    return images.repeat(repeats, *([1] * (images.dim() - 1)))[:batch_size]


def _sequence(value: Any, name: str, example: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name}={value!r}: pass a sequence, e.g. {example}.")
    return value


def _check_number(value: Any, name: str, least: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= least:
        raise ValueError(f"{name}={value!r}: pass a number >= {least:g} ({what}).")


def _check_ints(values: Sequence[Any], name: str, example: str) -> None:
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(
            f"{name}={tuple(values) if len(values) != 1 else values[0]!r}: pass positive integers, e.g. {example}."
        )


def recipe_callbacks(
    recipe: Recipe,
    r: int,
    budget: Optional[float],
    pruning_steps: tuple[int, int],
    teacher: Optional[nn.Module],
    distillation: dict[str, Any],
    merge_again: Callable[[pl.LightningModule], None],
    *,
    model_attribute: Optional[str],
) -> list[Callback]:
    """The recipe as the plain callbacks, each with the plan's budget.

    Token merging at ``r`` (the r in force: a resume after a back-off merges what the checkpoint recorded);
    ``pruning_steps``: ``(num_steps, end_epoch)``; ``teacher``: the frozen model entering fit, None for no
    distillation; ``merge_again``: what merges again after a pruning rollback undid the merging done since.
    """
    out: list[Callback] = []
    if recipe.pruning_ratio:
        steps, end_epoch = pruning_steps  # one step: end_epoch 0, num_steps 1, the defaults
        config = PruneConfig(pruning_ratio=recipe.pruning_ratio)
        pruning = PruningSchedule(
            end_epoch=end_epoch,
            num_steps=steps,
            max_accuracy_drop=budget,
            config=config,
            model_attribute=model_attribute,
        )
        if recipe.r:  # a rollback of a step undoes the merging done since (same modules): merge again after
            pruning.redo_after_rollback = (("tome",), merge_again)
        out.append(pruning)
    if recipe.num_landmarks:
        nystrom = NystromConfig(num_landmarks=recipe.num_landmarks)
        out.append(NystromSwap(max_accuracy_drop=budget, config=nystrom, model_attribute=model_attribute))
    if recipe.r:
        out.append(TokenMerging(config=TokenMergingConfig(r=r), model_attribute=model_attribute))
    if teacher is not None:
        out.append(DistillationTeacher(teacher, **distillation, model_attribute=model_attribute))
    if recipe.quantization:
        out.append(QuantizeOnFit(recipe.quantization, max_accuracy_drop=budget, model_attribute=model_attribute))
    return out


def resumed_choice(
    frontier: Sequence[Candidate],
    target_speedup: Union[float, Literal["max"]],
    chosen: Candidate,
    trained: Recipe,
    max_cost: Optional[float] = None,
) -> Candidate:
    """The candidate a resumed fit goes on with: the recipe its checkpoint ``trained``, if the same arguments could
    have chosen it (the first fit's verification may have moved past ``chosen``): one predicted to reach the
    target, or for ``"max"`` one whose prior cost is within ``max_cost``. Anything else means other arguments:
    refused, naming both."""
    found = next((c for c in eligible_candidates(frontier, target_speedup, max_cost) if c.recipe == trained), None)
    if found is None:
        raise ValueError(
            f"CompressionPlan(target_speedup={target_speedup!r}) chooses {chosen.recipe.label()}, but the checkpoint "
            f"being resumed trained {trained.label()}. Resume with the first fit's target_speedup and candidates."
        )
    return found
