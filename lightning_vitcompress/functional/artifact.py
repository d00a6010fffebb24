"""The exported file loaded back for inference: :func:`load_artifact` and :class:`LoadedArtifact`.

What :func:`~lightning_vitcompress.functional.export_compressed` checks its file
with, and what :class:`~lightning_vitcompress.BenchmarkCallback` measures as the
deployed model. A server needs none of this: torch, onnxruntime or openvino alone
load the files (see the README).

Example::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional import export_compressed, load_artifact
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    >>> images = torch.randn(2, 3, 32, 32)
    >>> summary = export_compressed(vit, "vit.pt2", images)
    >>> artifact = load_artifact("vit.pt2")  # or "vit.onnx", "vit.xml"
    >>> artifact(images).shape
    torch.Size([2, 1000])
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_vitcompress._checks import check_choice
from lightning_vitcompress.functional.openvino import OpenVINORunner, openvino_files

__all__ = [
    "ARTIFACT_FORMATS",
    "ArtifactMismatchError",
    "LoadedArtifact",
    "artifact_files",
    "load_artifact",
    "verify_artifact",
]

#: ``format`` -> file suffix
ARTIFACT_FORMATS: dict[str, str] = {"pt2": ".pt2", "onnx": ".onnx", "openvino": ".xml"}


class ArtifactMismatchError(RuntimeError):
    """The exported file loaded back but its outputs differ from the live model's beyond the tolerance."""


def artifact_files(path: Path, format: str) -> tuple[Path, ...]:
    """The files an artifact at ``path`` consists of (an OpenVINO IR: ``.xml`` and ``.bin``)."""
    return openvino_files(path) if format == "openvino" else (path,)


class LoadedArtifact(nn.Module):
    """An exported file loaded for inference, as an ``nn.Module``: ``artifact(images) -> logits``.

    What :class:`~lightning_vitcompress.BenchmarkCallback` measures as the deployed
    model. It holds no parameters; :attr:`size_bytes` is the file's size and
    :attr:`load_seconds` / :attr:`first_call_seconds` what loading cost.
    A server needs none of this: see the README's loader (torch, onnxruntime or openvino alone).
    """

    def __init__(self, path: Union[str, os.PathLike], format: str, device: torch.device) -> None:
        super().__init__()
        self.path = Path(path)
        self.format = format
        self.device = device
        self.size_bytes = sum(file.stat().st_size for file in artifact_files(self.path, format))
        self.first_call_seconds: Optional[float] = None
        start = time.perf_counter()
        if format == "pt2":
            from lightning_vitcompress.functional._torch_internals import aoti_load_package

            self._runner: Any = aoti_load_package(str(self.path))
        elif format == "openvino":
            self._runner = OpenVINORunner(self.path)
        else:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            # torch's thread count, and no spin-waiting between calls: idle threads would steal the CPU from
            # whatever runs next (other models, a benchmark's interleaved variants)
            options.intra_op_num_threads = torch.get_num_threads()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            providers = ["CUDAExecutionProvider"] if device.type == "cuda" else []
            self._runner = onnxruntime.InferenceSession(
                str(self.path), options, providers=[*providers, "CPUExecutionProvider"]
            )
            self._input_name = self._runner.get_inputs()[0].name
        self.load_seconds = time.perf_counter() - start

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter() if self.first_call_seconds is None else None
        if self.format == "pt2":
            output = self._runner(images.to(self.device))
        elif self.format == "openvino":
            output = self._runner(images)
        else:
            output = torch.from_numpy(self._runner.run(None, {self._input_name: images.detach().cpu().numpy()})[0])
        if start is not None:
            self.first_call_seconds = time.perf_counter() - start
        return output

    def __deepcopy__(self, memo: dict[int, Any]) -> LoadedArtifact:
        # the runner is a native handle; a copy is a fresh load of the same file (on its own device)
        return LoadedArtifact(self.path, self.format, self.device)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, format={self.format!r}, size_bytes={self.size_bytes}"


def load_artifact(
    path: Union[str, os.PathLike], *, format: Optional[str] = None, device: Union[str, torch.device, None] = None
) -> LoadedArtifact:
    """Load a file :func:`export_compressed` wrote (format from the suffix unless given) as a :class:`LoadedArtifact`.

    Example::

        >>> import torch
        >>> from lightning_vitcompress.functional import export_compressed, load_artifact
        >>> convnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
        >>> logits = convnet(torch.randn(1, 3, 16, 16))  # any model, not only a ViT
        >>> summary = export_compressed(convnet.eval(), "convnet.pt2", torch.randn(2, 3, 16, 16))
        >>> load_artifact("convnet.pt2")(torch.randn(3, 3, 16, 16)).shape
        torch.Size([3, 10])
    """
    path = Path(path)
    if format is None:
        format = next((name for name, suffix in ARTIFACT_FORMATS.items() if path.suffix == suffix), None)
        if format is None:
            raise ValueError(f"path={str(path)!r}: pass format= one of {list(ARTIFACT_FORMATS)} for this suffix.")
    check_choice(format, "format", tuple(ARTIFACT_FORMATS))
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no such file.")
    return LoadedArtifact(path, format, torch.device(device) if device is not None else torch.device("cpu"))


def verify_artifact(
    path: Path,
    format: str,
    example: torch.Tensor,
    reference: torch.Tensor,
    tolerance: float,
    device: torch.device,
) -> dict[str, Any]:
    """Load the file back, run ``example``, compare with ``reference`` (max |difference| / max |logit| within
    ``tolerance``); the load and first-call seconds and the error. ``ArtifactMismatchError`` otherwise."""
    try:
        loaded = load_artifact(path, format=format, device=device)
        with torch.inference_mode():
            output = loaded(example)
    except Exception as err:
        raise ArtifactMismatchError(
            f"The exported {format} file does not run when loaded back ({type(err).__name__}: {err}); it was not "
            "kept. The model itself is unchanged."
        ) from err
    if tuple(output.shape) != tuple(reference.shape):
        raise ArtifactMismatchError(
            f"The exported {format} file returns shape {tuple(output.shape)}, the live model {tuple(reference.shape)}; "
            "it was not kept."
        )
    scale = reference.abs().max().clamp_min(1e-12)
    error = float((output.float().to(reference.device) - reference).abs().max() / scale)
    if not error <= tolerance:
        raise ArtifactMismatchError(
            f"The exported {format} file's logits differ from the live model's by {error:.3g} (max abs difference / "
            f"max abs logit) on a real batch, above tolerance={tolerance:g}; it was not kept. Pass a larger "
            "tolerance if this precision loss is expected, or report the model that does this."
        )
    return {
        "load_seconds": loaded.load_seconds,
        "first_call_seconds": loaded.first_call_seconds,
        "relative_error": error,
    }
