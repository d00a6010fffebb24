"""The one seam to torch's private API (the functional layer's twin of :mod:`lightning_vitcompress._lightning`).

Every use of a torch name or attribute that starts with ``_`` (an
``nn.Module``'s compiled call, inductor's config, CPU feature probes, pytree)
is a small named function here, so a torch release that moves one breaks one
function, and ``tests/test_lightning_seam.py`` says which. Checked on torch
2.14; no Lightning here (the functional layer runs without it).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = [
    "FORWARD_HOOK_DICTS",
    "aoti_compile_and_package",
    "aoti_load_package",
    "compiled_call",
    "cpu_has_amx_or_vnni",
    "eager_call",
    "in_dispatch_mode",
    "inductor_config",
    "inductor_mode_options",
    "mkldnn_bf16_supported",
    "register_quantized_decomposed_ops",
    "set_compiled_call",
    "tree_map",
]

#: the ``nn.Module`` attributes holding its forward hooks (``nn.Module.__init__`` creates them)
FORWARD_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def compiled_call(module: nn.Module) -> Optional[Callable[..., Any]]:
    """What ``nn.Module.compile`` installed on ``module`` (``module._compiled_call_impl``), None when not compiled."""
    return module.__dict__.get("_compiled_call_impl")


def set_compiled_call(module: nn.Module, call: Optional[Callable[..., Any]]) -> None:
    """Set ``module._compiled_call_impl``, what ``nn.Module.compile`` sets and ``__call__`` runs instead of
    ``forward``; None runs the module eager again (undoes ``compile``)."""
    module._compiled_call_impl = call


def eager_call(module: nn.Module) -> Callable[..., Any]:
    """``module._call_impl``: the module's call with its hooks, what ``nn.Module.compile`` compiles."""
    return module._call_impl


def inductor_config() -> ModuleType:
    """``torch._inductor.config`` (``.patch(...)`` sets options around a compiled call)."""
    import torch._inductor.config as config

    return config


def inductor_mode_options() -> list[str]:
    """The ``mode`` values ``torch.compile`` takes (``torch._inductor.list_mode_options``)."""
    import torch._inductor

    return list(torch._inductor.list_mode_options())


def aoti_compile_and_package(*args: Any, **kwargs: Any) -> Any:
    """``torch._inductor.aoti_compile_and_package`` (AOTInductor's documented entry point, in a private module)."""
    from torch._inductor import aoti_compile_and_package as compile_and_package

    return compile_and_package(*args, **kwargs)


def aoti_load_package(*args: Any, **kwargs: Any) -> Any:
    """``torch._inductor.aoti_load_package`` (AOTInductor's documented loader, in a private module)."""
    from torch._inductor import aoti_load_package as load_package

    return load_package(*args, **kwargs)


def in_dispatch_mode() -> bool:
    """Whether a ``TorchDispatchMode`` (e.g. ``FlopCounterMode``) is active
    (``torch.utils._python_dispatch._get_current_dispatch_mode``)."""
    from torch.utils import _python_dispatch

    return _python_dispatch._get_current_dispatch_mode() is not None


def mkldnn_bf16_supported() -> bool:
    """Whether oneDNN has native bf16 on this CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported``)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def register_quantized_decomposed_ops() -> None:
    """Define the ``quantized_decomposed`` ops (importing ``torch.ao.quantization.fx._decomposed`` does)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401


def cpu_has_amx_or_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (``torch.cpu._is_vnni_supported`` or
    ``_is_amx_tile_supported``; False where this torch has neither probe)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_vnni_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)
