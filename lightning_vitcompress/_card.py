"""The model card written when ``fit`` ends: what the compressed model is and how to load it without us.

Markdown in the shape of a Hugging Face model card (YAML front matter, then
"Model Details", "How to Get Started with the Model", "Training Details",
"Evaluation", "Technical Specifications"): the recipe (the plan table), the
resolved configs and budget decisions, the benchmark's before/after table, the
library and torch versions, the CPU/GPU it was measured on, and a snippet that
loads the exported file with torch (or onnxruntime, or OpenVINO) only.

It is written as ``MODEL_CARD.md`` beside the file ``ExportOnFit`` wrote and
beside ``BenchmarkCallback``'s report (one card per folder), on rank zero. A
card never fails a fit: a folder it cannot write to gives a warning naming the
path. Rename it ``README.md`` to push the folder to the Hugging Face Hub.

Example::

    >>> import lightning as L
    >>> from lightning_vitcompress import TokenMerging
    >>> from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
    >>> model = DigitsClassifier(embed_dim=32, depth=2, num_heads=4)
    >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[TokenMerging(r=4)],
    ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
    ...                     enable_model_summary=False)
    >>> trainer.fit(model, DigitsDataModule())
    >>> text = render_model_card(trainer, model, card_dir=Path("outputs"))
    >>> text.splitlines()[0], "TokenMerging" in text  # Hugging Face Hub metadata first, then the card
    ('---', True)
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_vitcompress._lightning import callbacks_of

__all__ = ["MODEL_CARD_FILENAME", "load_snippet", "render_model_card", "write_model_cards"]

#: the card's file name, in each folder it is written to
MODEL_CARD_FILENAME = "MODEL_CARD.md"

_SNIPPETS = {
    "pt2": """import torch
from torch._inductor import aoti_load_package  # torch only: no Lightning, timm, torchao or this library

runner = aoti_load_package({path!r})
images = torch.zeros({shape})  # float32 (N, C, H, W), any N, preprocessed as in training
logits = runner(images)
print(tuple(logits.shape))""",
    "onnx": """import numpy as np
import onnxruntime  # no torch needed

session = onnxruntime.InferenceSession({path!r}, providers=["CPUExecutionProvider"])
images = np.zeros({shape}, dtype=np.float32)  # (N, C, H, W), any N, preprocessed as in training
(logits,) = session.run(None, {{session.get_inputs()[0].name: images}})
print(tuple(logits.shape))""",
    "openvino": """import numpy as np
import openvino as ov  # no torch needed

core = ov.Core()
ir = core.read_model({path!r})  # finds the .bin beside it
hint = ir.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str)  # the precision it was checked in
model = core.compile_model(ir, "CPU", {{"INFERENCE_PRECISION_HINT": hint}})
images = np.zeros({shape}, dtype=np.float32)  # (N, C, H, W), any N, preprocessed as in training
logits = model(images)[0]
print(tuple(logits.shape))""",
}


def load_snippet(path: str, format: str, input_shape: tuple[int, ...]) -> str:
    """Python that loads the artifact at ``path`` without this library and prints its logits' shape for one image."""
    return _SNIPPETS[format].format(path=path, shape=(1, *input_shape))


def _callback(trainer: pl.Trainer, name: str) -> Any:
    return next((cb for cb in callbacks_of(trainer) if type(cb).__name__ == name), None)


def _input_shape(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[tuple[int, ...]]:
    bench, export = _callback(trainer, "BenchmarkCallback"), _callback(trainer, "ExportOnFit")
    if bench is not None and bench.report is not None:
        return tuple(bench.report["input_shape"])
    example = getattr(export, "_example", None)
    if isinstance(example, torch.Tensor):
        return tuple(example.shape[1:])
    from lightning_vitcompress._model import stated_input_shape

    return stated_input_shape(export.target(pl_module)) if export is not None else None


def _relative(path: str, folder: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _environment(report: Optional[dict[str, Any]]) -> list[str]:
    from lightning_vitcompress.functional.report import cpu_name, package_versions

    versions = report["versions"] if report is not None else package_versions()
    gpu = (report or {}).get("gpu_name") or (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    lines = [f"- {name}: {version or 'not installed'}" for name, version in versions.items()]
    lines.append(f"- python: {platform.python_version()}")
    measured = "measured on" if report is not None else "trained on (nothing was measured: no BenchmarkCallback)"
    lines.append(
        f"- CPU ({measured}): {report['cpu_name'] if report else cpu_name()}"
        + (f", {report['num_threads']} threads" if report else "")
    )
    lines.append(f"- GPU: {gpu or 'none (n/a)'}")
    return lines


def render_model_card(trainer: pl.Trainer, pl_module: pl.LightningModule, card_dir: Path) -> str:
    """The card's Markdown for a finished fit, with paths relative to ``card_dir`` where they lie inside it."""
    from lightning_vitcompress._plan import format_plan, plan_rows
    from lightning_vitcompress.functional.report import format_report

    export, bench = _callback(trainer, "ExportOnFit"), _callback(trainer, "BenchmarkCallback")
    quant = _callback(trainer, "QuantizeOnFit")
    rows = plan_rows(trainer)
    artifact = export.summary if export is not None else None
    report = bench.report if bench is not None else None
    shape = _input_shape(trainer, pl_module)
    model_name = type(pl_module).__name__
    tags = ["vision-transformer", "lightning-vitcompress", *sorted({r.callback for r in rows})]
    if artifact is not None:
        tags.append(artifact["format"])
    out = ["---", "library_name: pytorch", "pipeline_tag: image-classification", "tags:"]
    out += [f"- {tag}" for tag in tags]
    out += ["---", "", f"# {model_name}, compressed with lightning-vitcompress", "", "## Model Details", ""]
    out.append(f"- LightningModule: `{type(pl_module).__module__}.{model_name}`")
    out.append(f"- Input: float32 images of shape (N, {', '.join(map(str, shape))})" if shape else "- Input: n/a")
    if artifact is not None:
        out.append(
            f"- Artifact: `{_relative(artifact['path'], card_dir)}` ({artifact['format']}, "
            f"{artifact['inference_precision']}{', NNCF ' + artifact['quantize'] if artifact.get('quantize') else ''}"
            f", {artifact['size_bytes'] / 1e6:.2f} MB), checked against the live model: relative logit error "
            f"{_number(artifact.get('relative_error'))} (tolerance {artifact['tolerance']:g})"
        )
    if report is not None:
        out.append(f"- Benchmark report: `{_relative(str(bench.report_path), card_dir)}`")
    out += ["", "## How to Get Started with the Model", ""]
    if artifact is not None and shape is not None:
        out += [
            "Without Lightning, timm, torchao or lightning-vitcompress installed:",
            "",
            "```python",
            load_snippet(_relative(artifact["path"], card_dir), artifact["format"], shape),
            "```",
        ]
        out.append(
            "\nRun it from this folder. Feed images preprocessed as the training data was (same size, "
            "channels and normalisation)."
        )
    else:
        out.append(
            'No exported file: add `ExportOnFit("model.pt2")` to the Trainer, or load the checkpoint with '
            '`lightning_vitcompress.load_compressed(MyModule, "last.ckpt")`.'
        )
    out += [
        "",
        "## Training Details",
        "",
        "### Compression recipe",
        "",
        f"Trained for {trainer.current_epoch} epoch(s), {trainer.global_step} step(s), with:",
        "",
        format_plan(rows) if rows else "(no compression callback)",
        "",
        "### Resolved configs and decisions",
        "",
    ]
    out += _resolved(quant, report, artifact)
    out += ["", "## Evaluation", ""]
    if report is not None:
        out += [
            f"Batch {report['batch_size']}, {report['num_threads']} CPU threads; accuracy on the validation data "
            "the Trainer had (None: none).",
            "",
            format_report(report),
        ]
    else:
        out.append("Not measured: add `BenchmarkCallback()` to the Trainer for the before/after table.")
    out += ["", "## Technical Specifications", "", *_environment(report), ""]
    return "\n".join(out)


def _number(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _resolved(quant: Any, report: Optional[dict[str, Any]], artifact: Optional[dict[str, Any]]) -> list[str]:
    lines = []
    summary = getattr(quant, "summary", None)
    if summary is not None:
        choice = getattr(quant, "default_choice", None)
        why = f" (default for this device: {choice.reason})" if choice is not None else ""
        lines.append(
            f"- QuantizeOnFit: `{summary['config']}`, {summary['inference_precision']}{why}; "
            f"{len(summary['quantized'])} layers quantized, {len(summary['skipped'])} kept in full "
            "precision"
        )
    elif quant is not None:
        lines.append("- QuantizeOnFit: nothing was quantized (see the decisions below and the fit's log)")
    decisions = (report or {}).get("decisions")
    if decisions:
        lines += ["- Budget and 'auto' decisions:", "", "```json", json.dumps(decisions, indent=2, default=str), "```"]
    if artifact is not None:
        lines.append(
            f"- ExportOnFit: {artifact['format']} in {artifact['inference_precision']}, exported in "
            f"{artifact['export_seconds']:.1f} s"
            + (
                f", top-1 agreement with the live model {artifact['top1_agreement']:.2%}"
                if artifact.get("top1_agreement") is not None
                else ""
            )
        )
    return lines or ["- Nothing to resolve: every setting is as passed."]


def write_model_cards(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Path]:
    """Write the card beside the exported file and the benchmark report (rank zero); the paths written.

    Never raises: a card that cannot be written (or rendered) is a warning naming the path.
    """
    if not trainer.is_global_zero:
        return []
    export, bench = _callback(trainer, "ExportOnFit"), _callback(trainer, "BenchmarkCallback")
    folders: list[Path] = []
    if export is not None and export.summary is not None:
        folders.append(Path(export.summary["path"]).parent)
    if bench is not None and bench.report_path is not None:
        folders.append(Path(bench.report_path).parent)
    written = []
    for folder in dict.fromkeys(f.resolve() for f in folders):
        path = folder / MODEL_CARD_FILENAME
        try:
            path.write_text(render_model_card(trainer, pl_module, folder))
        except Exception as err:  # a card never fails the fit
            rank_zero_warn(
                f"The model card could not be written to {path} ({type(err).__name__}: {err}); the "
                "fit's results are unaffected."
            )
            continue
        written.append(path)
        rank_zero_info(f"Model card: {path}")
    return written
