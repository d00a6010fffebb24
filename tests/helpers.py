"""Test helpers: a fast Trainer and 2-process DDP runs (import as ``from helpers import ...``)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from timm.layers.attention import Attention as TimmAttention
from torch import nn
from torch.utils.data import DataLoader

from lightning_vitcompress import CompressionCallback
from lightning_vitcompress._structure import record_edit, register_replay
from lightning_vitcompress._training_state import refresh_after_structural_change
from lightning_vitcompress.digits import DigitsClassifier

#: the tiny classifier every fast test trains: 2 blocks of width 32
TINY = dict(embed_dim=32, depth=2, num_heads=4)


def fast_trainer(tmp_path: Path, **overrides: Any) -> L.Trainer:
    """A CPU Trainer that keeps tests short and quiet; pass overrides to change anything."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=False,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def run_ddp_script(body: str, tmp_path: Path, timeout: float = 240) -> list[dict[str, Any]]:
    """Run ``body`` as a script under ``Trainer(strategy="ddp", devices=2)`` on CPU (gloo).

    ``body`` sees ``OUT`` (a folder) and must build ``trainer`` and fit; it
    should call ``report(trainer, **values)`` to write one JSON per rank.
    Returns the per-rank reports sorted by rank. Lightning's ddp launcher
    re-runs the script for rank 1, which is why this is a script and not a
    function.
    """
    prelude = textwrap.dedent(
        f"""
        import atexit, json, os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        torch.set_num_threads(1)
        # Lightning leaves the gloo process group up; torn down by C++ static destructors at exit, it
        # sometimes aborted a finished run ("terminate called without an active exception", rc -6)
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())
        OUT = {str(tmp_path)!r}

        def report(trainer, **values):
            values["rank"] = trainer.global_rank
            with open(os.path.join(OUT, f"rank{{trainer.global_rank}}.json"), "w") as f:
                json.dump(values, f)
        """
    )
    script = tmp_path / "ddp_script.py"
    script.write_text(prelude + textwrap.dedent(body))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    reports = sorted(tmp_path.glob("rank*.json"))
    if proc.returncode != 0 or len(reports) != 2:
        raise AssertionError(f"DDP script failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads(p.read_text()) for p in reports]


class DictBatches(torch.utils.data.Dataset):
    """A dataset of ``(image, label)`` pairs served as Hugging Face style dicts ``{"pixel_values", "labels"}``."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self.dataset[index]
        return {"pixel_values": image, "labels": label}


def dict_loaders(digits: L.LightningDataModule, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    """The digits train / validation data as loaders of dict batches."""
    return (
        DataLoader(DictBatches(digits.train_dataloader().dataset), batch_size=batch_size, shuffle=True),
        DataLoader(DictBatches(digits.val_dataloader().dataset), batch_size=batch_size),
    )


class DictDigitsClassifier(DigitsClassifier):
    """The digits classifier trained on dict batches (``{"pixel_values": ..., "labels": ...}``)."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return super().training_step((batch["pixel_values"], batch["labels"]), batch_idx)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        return super().validation_step((batch["pixel_values"], batch["labels"]), batch_idx)


class NoHeadsAttention(TimmAttention):
    """Hand-written timm-style attention that keeps its head count as ``heads``, not ``num_heads``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__(dim, heads)
        self.heads = heads
        del self.num_heads

    def forward(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(*qkv.unbind(0))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


def no_heads_model() -> DigitsClassifier:
    """The tiny classifier with :class:`NoHeadsAttention` in every block."""
    L.seed_everything(0, verbose=False)
    model = DigitsClassifier(**TINY)
    for block in model.model.blocks:
        block.attn = NoHeadsAttention(TINY["embed_dim"], TINY["num_heads"])
    return model


class MaskedInTrainingBlock(torch.nn.Module):
    """A hand-written pre-norm block on ``nn.MultiheadAttention`` that passes an ``attn_mask`` only in training."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[1]
        mask = torch.zeros(tokens, tokens, dtype=torch.bool, device=x.device) if self.training else None
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MaskedInTrainingViT(torch.nn.Module):
    """A ViT written inline (class token, 4x4 patches of 32x32 images) on :class:`MaskedInTrainingBlock`."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, width, 4, 4)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = torch.nn.Sequential(MaskedInTrainingBlock(width), MaskedInTrainingBlock(width))
        self.head = torch.nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        return self.head(self.blocks(x)[:, 0])


def masked_in_training_model() -> DigitsClassifier:
    """The digits classifier around :class:`MaskedInTrainingViT`."""
    L.seed_everything(0, verbose=False)
    model = DigitsClassifier(**TINY)
    model.model = MaskedInTrainingViT()
    return model


class MappedImages(torch.utils.data.Dataset):
    """A dataset of ``(image, label)`` pairs with ``fn`` applied to each image."""

    def __init__(self, dataset: torch.utils.data.Dataset, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.dataset, self.fn = dataset, fn

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.dataset[index]
        return self.fn(image), label


def mapped_loaders(
    digits: L.LightningDataModule, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 32
) -> tuple[DataLoader, DataLoader]:
    """The digits train / validation data with ``fn`` applied to every image."""
    return (
        DataLoader(MappedImages(digits.train_dataloader().dataset, fn), batch_size=batch_size, shuffle=True),
        DataLoader(MappedImages(digits.val_dataloader().dataset, fn), batch_size=batch_size),
    )


def grey_loaders(digits: L.LightningDataModule) -> tuple[DataLoader, DataLoader]:
    """One channel (1x32x32), for models that take three."""
    return mapped_loaders(digits, lambda image: image[:1])


def _with_nan(image: torch.Tensor) -> torch.Tensor:
    image = image.clone()
    image[0, 0, 0] = float("nan")
    return image


def nan_loaders(digits: L.LightningDataModule) -> tuple[DataLoader, DataLoader]:
    """Every image holds a NaN (what a broken normalisation gives)."""
    return mapped_loaders(digits, _with_nan)


# ---------------------------------------------------------------------------- shared test models and callbacks
#: three fixed images for models that state no input size
EXAMPLE_IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@register_replay("test_drop_blocks")
def _replay_drop_blocks(model: nn.Module, record: dict) -> None:
    model.blocks = model.blocks[: record["keep"]]


class DropLastBlock(CompressionCallback):
    """A structural edit for tests: drop the last block at setup or at ``epoch``."""

    order = 20

    def __init__(self, epoch: int | None = None) -> None:
        super().__init__()
        self.epoch = epoch
        self.calls: list[str] = []

    def _drop(self, pl_module) -> None:
        model = self.target(pl_module)
        keep = len(model.blocks) - 1
        model.blocks = model.blocks[:keep]
        record_edit(pl_module, {"kind": "test_drop_blocks", "target": self.target_path, "keep": keep})

    def ordered_setup(self, trainer, pl_module, stage):
        self.calls.append("setup")
        if self.epoch is None and stage == "fit" and not self.replayed_records(trainer, "test_drop_blocks"):
            self._drop(pl_module)

    def ordered_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and not self.replayed_records(trainer, "test_drop_blocks"):
            self._drop(pl_module)
            refresh_after_structural_change(trainer)


class PatchEncoder(nn.Module):
    """A plain PyTorch ViT: 4x4 patches, nn.TransformerEncoder (nn.MultiheadAttention), mean pool."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(48, 32)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
        self.head = nn.Linear(32, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = images.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        return self.head(self.encoder(self.embed(patches)).mean(1))


class MHAClassifier(DigitsClassifier):
    def __init__(self, **kwargs):
        super().__init__(**TINY)
        self.model = PatchEncoder()


class CustomAttention(TimmAttention):
    def forward(self, x, attn_mask=None, is_causal=False):
        return self.proj(x)


class MaskedEncoder(nn.Module):
    """4x4 patches through nn.TransformerEncoder with a key padding mask, as padded-sequence code does."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(48, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = images.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        tokens = self.embed(patches)
        padding = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return self.head(self.encoder(tokens, src_key_padding_mask=padding).mean(1))


class MaskedClassifier(DigitsClassifier):
    def __init__(self, **kwargs):
        super().__init__(**TINY)
        torch.manual_seed(0)
        self.model = MaskedEncoder()


class StopAfterEpoch0(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


# ---------------------------------------------------------------------------- kill and resume
#: (phase, when the process is SIGKILLed): mid-epoch after that phase's edit, or at train end before quantizing.
#: The schedule: pruning at epoch 1, Nyström at epoch 2, QAT from epoch 3, quantization at train end (4 epochs
#: of 2 steps, a checkpoint at every epoch end).
KILL_PHASES = {"pruning": 3, "nystrom": 5, "qat": 7, "quantize": "train_end"}


class KillAt(Callback):
    """SIGKILLs its own process at ``global_step == at`` (after that step's update) or at train end."""

    def __init__(self, at: Any) -> None:
        self.at = at

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.at:
            self._kill()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at == "train_end":
            self._kill()

    @staticmethod
    def _kill() -> None:
        if os.environ.get("KILL_GROUP"):  # every DDP rank (they share the process group of a new session)
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def pipeline_run(folder: Path, kill_at: Any = None, ckpt_path: Any = None, **trainer_kwargs: Any) -> DigitsClassifier:
    """The seeded pipeline fit of the kill-and-resume test (fixed data order); returns the final model."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_vitcompress import NystromSwap, PruningSchedule, QuantizeOnFit
    from lightning_vitcompress.digits import DigitsDataModule

    torch.set_num_threads(2)
    L.seed_everything(0, verbose=False)
    model = DigitsClassifier(**TINY)
    digits = DigitsDataModule(batch_size=32)
    digits.setup()
    images, labels = next(iter(DataLoader(digits.train_set, batch_size=64)))
    loader = DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=32)  # the same order every run
    callbacks: list[Callback] = [KillAt(kill_at)] if kill_at is not None else []
    callbacks += [
        PruningSchedule(0.5, start_epoch=1, end_epoch=1, num_steps=1, seed=0),
        NystromSwap(num_landmarks=8, swap_epoch=2),
        QuantizeOnFit("int8_dynamic", qat_start_epoch=3),
        ModelCheckpoint(dirpath=folder, save_last=True),
    ]
    trainer = fast_trainer(
        folder,
        callbacks=callbacks,
        max_epochs=4,
        limit_train_batches=2,
        limit_val_batches=0,
        enable_checkpointing=True,
        **trainer_kwargs,
    )
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model


def start_killed(folder: Path, kill_at: Any) -> subprocess.Popen:
    """Start :func:`pipeline_run` in a fresh process that SIGKILLs itself at ``kill_at`` (wait on it)."""
    folder.mkdir(parents=True, exist_ok=True)
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import helpers; "
        f"helpers.pipeline_run(helpers.Path({str(folder)!r}), {kill_at!r})"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def ddp_pipeline(folder: Path, kill_at: Any = None, ckpt_path: Any = None, timeout: float = 300) -> int:
    """:func:`pipeline_run` under 2-process DDP (gloo) in a new session; rank zero saves the final weights
    (dequantized) to ``folder/final.pt``. Returns the exit code (``-SIGKILL`` when killed)."""
    folder.mkdir(parents=True, exist_ok=True)
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import helpers
        model = helpers.pipeline_run(
            helpers.Path({str(folder)!r}), {kill_at!r}, {str(ckpt_path) if ckpt_path else None!r},
            strategy="ddp", devices=2,
        )
        if model.trainer.is_global_zero:
            plain = (torch.Tensor, torch.nn.Parameter)
            torch.save({{k: v if type(v) in plain else v.dequantize() for k, v in model.state_dict().items()}},
                       {str(folder / "final.pt")!r})
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    """)
    script = folder / "ddp_pipeline.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "KILL_GROUP": "1"}
    process = subprocess.run(
        [sys.executable, str(script)], cwd=folder, env=env, capture_output=True, timeout=timeout, start_new_session=True
    )
    if process.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"DDP pipeline failed (rc={process.returncode}):\n{process.stderr.decode()[-4000:]}")
    return process.returncode


EXAMPLES = Path(__file__).parents[1] / "examples"


@contextlib.contextmanager
def example_module(name: str) -> Iterator[Any]:
    """``examples/<name>.py`` imported as a module while the block runs (examples/ on ``sys.path`` for its own
    imports; registered in ``sys.modules``, where dataclasses look their module up)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        for imported in (name, "fashion_mnist_study"):  # the plan example imports the study
            sys.modules.pop(imported, None)
        sys.path.remove(str(EXAMPLES))
