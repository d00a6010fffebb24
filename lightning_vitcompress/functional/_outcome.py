"""The check every technique runs on what it made: the model still runs, same output shape, finite.

A structural edit on a family whose adapter misses a layer that reads the
edited widths (an attention pool, a reshape to the input width) gives a model
that fails later, far from the cause. :func:`check_outcome` turns that into an
error at the call, naming the model class, the technique and what is supported.

Example (a tiny timm ViT; an edit that changes the output shape is refused)::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional._outcome import check_outcome, output_shape
    >>> from lightning_vitcompress.functional.prune import prune_vit
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    >>> images = torch.randn(2, 3, 32, 32)
    >>> before = output_shape(model, images)
    >>> _ = prune_vit(model, 0.5, images[:1])
    >>> check_outcome(model, images, before, "prune_vit")  # still runs, same shape, finite: nothing happens
    >>> model.head = torch.nn.Linear(96, 5)
    >>> check_outcome(model, images, before, "my_edit")
    Traceback (most recent call last):
    ...
    TypeError: my_edit: the edited VisionTransformer then returns logits of shape (2, 5) instead of (2, 10): ...
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lightning_vitcompress.functional.measure import eval_mode
from lightning_vitcompress.models import logits_of


def output_shape(model: nn.Module, example_input: Optional[torch.Tensor]) -> Optional[torch.Size]:
    """The logits' shape of ``model`` on ``example_input`` (eval mode, no grad); None without an input."""
    if example_input is None:
        return None
    with eval_mode(model), torch.no_grad():
        return logits_of(model(example_input)).shape


def check_outcome(
    model: nn.Module,
    example_input: Optional[torch.Tensor],
    before: Optional[torch.Size],
    technique: str,
    features: bool = False,
) -> None:
    """Raise ``TypeError`` when ``model`` no longer runs ``example_input``, changed its output shape or gives
    non-finite logits after ``technique``; nothing when there is no input to check with.

    ``features=True``: the model has no classifier head (``num_classes=0``), so its output is the
    embedding, whose width pruning may change; only the other dimensions must stay.
    The message names the model class and says what the technique supports; the
    caller undoes its edit first where it can.
    """
    if example_input is None or before is None:
        return
    problem: Optional[str] = None
    try:
        with eval_mode(model), torch.no_grad():
            logits: Any = logits_of(model(example_input))
    except Exception as err:
        problem = f"then fails on its input ({type(err).__name__}: {err})"
    else:
        if (logits.shape[:-1], logits.dim()) != (before[:-1], len(before)) or (not features and logits.shape != before):
            problem = f"then returns logits of shape {tuple(logits.shape)} instead of {tuple(before)}"
        elif not torch.isfinite(logits).all():
            problem = "then returns non-finite logits"
    if problem:
        from lightning_vitcompress.models import supported_families

        raise TypeError(
            f"{technique}: the edited {type(model).__name__} {problem}: a layer of this model reads the edited "
            f"widths or tokens in a way its adapter does not know. Supported families: {supported_families()}."
        )
