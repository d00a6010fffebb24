"""What a team would run without compressing: reference variants of the uncompressed model.

A speedup against fp32 eager flatters compression: a team that does not compress
at least runs its model in bf16 (where the device has it) and compiled. These
variants are built from the uncompressed model and measured next to it, so a
report gives both speedups. Pure torch, no Lightning.

Example::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional.baselines import build_baseline
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    >>> reference = build_baseline(vit, "bf16_compiled")  # a new module; vit is untouched
    >>> reference is vit, type(reference).__name__
    (False, 'CompiledAutocast')

and then ``compare_models({"fp32 eager": vit, "bf16 compiled": reference, "ours": compressed}, x)``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from lightning_vitcompress._checks import check_choice
from lightning_vitcompress.functional._torch_internals import in_dispatch_mode, inductor_config, tree_map

__all__ = ["BASELINES", "CompiledAutocast", "build_baseline", "check_baselines"]

#: name -> what it is, for messages and report headers
BASELINES = {
    "bf16_compiled": "the uncompressed model under bf16 autocast (where the device runs bf16 natively, else fp32), "
    "compiled with inductor (freezing on)",
}


def check_baselines(baselines: Any, argument: str = "baselines") -> tuple[str, ...]:
    """``baselines`` as a tuple of known names (a single name is one baseline); ``ValueError`` naming it."""
    if isinstance(baselines, str):
        baselines = (baselines,)
    if not isinstance(baselines, Sequence):
        raise ValueError(f"{argument}={baselines!r}: pass a tuple of names, e.g. ('bf16_compiled',), or ().")
    for name in baselines:
        check_choice(name, argument, tuple(BASELINES))
    return tuple(dict.fromkeys(baselines))


def _native_bf16(device: torch.device) -> bool:
    # imported here: distill.py imports the model-finding helpers, which this module does not need at import
    from lightning_vitcompress.functional.distill import autocast_runs_natively

    return autocast_runs_natively(device, "bf16")


class CompiledAutocast(nn.Module):
    """``model`` compiled with inductor (freezing on) and run under bf16 autocast where the device has it.

    Compiled lazily per device type on the first call; a deep copy (e.g. to move it
    to CUDA) compiles afresh. Floating outputs come back as float32. Its
    ``state_dict`` is the wrapped model's under ``model.``.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self._compiled: dict[str, Any] = {}

    def autocast_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        """The dtype this variant autocasts to on ``device``; ``None``: it runs fp32 there."""
        return self.dtype if _native_bf16(device) else None

    def forward(self, x: torch.Tensor) -> Any:
        device = x.device
        if in_dispatch_mode():
            return self.model(x)  # under a dispatch mode (count_macs' FlopCounterMode): eager, no new compile
        compiled = self._compiled.get(device.type)
        if compiled is None:
            with warnings.catch_warnings():  # first called under FlopCounterMode's global hooks: harmless here
                warnings.filterwarnings("ignore", message=".*global hooks on modules.*")
                compiled = self._compiled[device.type] = torch.compile(self.model)
        dtype = self.autocast_dtype(device)
        with (
            inductor_config().patch(freezing=True),
            torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None),
        ):
            output = compiled(x)
        return tree_map(lambda v: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v, output)

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledAutocast:
        clone = CompiledAutocast(copy.deepcopy(self.model, memo), self.dtype)
        return clone.train(self.training)


def build_baseline(model: nn.Module, name: str) -> nn.Module:
    """A new module: the ``name`` variant (see :data:`BASELINES`) of a copy of ``model`` (left untouched)."""
    (name,) = check_baselines((name,), "name")
    return CompiledAutocast(copy.deepcopy(model).eval())
