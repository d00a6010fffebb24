"""The ViT-like timm architectures teams fine-tune, tiny, and what each technique does to them.

Import as ``from zoo import ZOO, TECHNIQUES, run_cell, family_table``; run as a script to print
the family x technique table, or to write it into the README between its markers::

    python tests/zoo.py                  # print the table
    python tests/zoo.py --update-readme  # regenerate the README's family table

Every model: random weights (``pretrained=False``), 32x32 images, 10 classes, about
2 blocks of width 32 (stage-wise models: two small stages). A cell either *works*
(the model changed as asked, its output is finite and of the same shape, and a
state dict of it reloads through ``load_compressed`` to the same outputs) or is
*refused* at the call with a ``TypeError``/``ValueError`` naming the module class
and what is supported. Anything else (a silent no-op, a broken model, another
exception) is a :class:`CellFailure`.
"""

from __future__ import annotations

import io
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_vitcompress import load_compressed, merge_tokens, prune_vit, quantize_model, swap_attention  # noqa: E402
from lightning_vitcompress.functional.token_merging import merged_token_counts  # noqa: E402
from lightning_vitcompress.models import logits_of  # noqa: E402

IMAGE, CLASSES = 32, 10
VIT = dict(img_size=IMAGE, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)
#: timm's LayerScale starts at 1e-5 on random weights: every block would look like a no-op
SCALED = dict(VIT, init_values=1.0)


def _mvitv2() -> nn.Module:
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    return MultiScaleVit(
        MultiScaleVitCfg(depths=(1, 1), embed_dim=32, num_heads=1), img_size=(IMAGE, IMAGE), num_classes=CLASSES
    )


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)


@dataclass(frozen=True)
class Family:
    """One row of the table: how to build the tiny model, and what timm calls it."""

    label: str
    timm_name: str
    build: Callable[[], nn.Module]


#: family key -> tiny model; the rows of the README table, in this order
ZOO: dict[str, Family] = {
    f.label: f
    for f in [
        Family("ViT", "vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", **VIT)),
        Family("DeiT distilled", "deit_tiny_distilled_patch16_224", _timm("deit_tiny_distilled_patch16_224", **VIT)),
        Family("DeiT III", "deit3_small_patch16_224", _timm("deit3_small_patch16_224", **SCALED)),
        Family("DINOv2", "vit_small_patch14_dinov2", _timm("vit_small_patch14_dinov2", **SCALED)),
        Family("DINOv2 + registers", "vit_small_patch14_reg4_dinov2", _timm("vit_small_patch14_reg4_dinov2", **SCALED)),
        Family("CLIP", "vit_base_patch16_clip_224", _timm("vit_base_patch16_clip_224", **VIT)),
        Family("FlexiViT", "flexivit_small", _timm("flexivit_small", **VIT)),
        Family("ViT global-avg-pool", "vit_medium_patch16_gap_256", _timm("vit_medium_patch16_gap_256", **VIT)),
        Family("SigLIP (MAP head)", "vit_base_patch16_siglip_224", _timm("vit_base_patch16_siglip_224", **VIT)),
        Family("EVA-02", "eva02_tiny_patch14_224", _timm("eva02_tiny_patch14_224", **dict(VIT, mlp_ratio=4 * 2 / 3))),
        Family("ViT RoPE", "vit_base_patch16_rope_224", _timm("vit_base_patch16_rope_224", **VIT)),
        Family("BEiT", "beit_base_patch16_224", _timm("beit_base_patch16_224", **SCALED)),
        Family("CaiT", "cait_xxs24_224", _timm("cait_xxs24_224", **dict(SCALED, depth_token_only=1))),
        Family(
            "Swin",
            "swin_tiny_patch4_window7_224",
            _timm(
                "swin_tiny_patch4_window7_224",
                img_size=IMAGE,
                patch_size=4,
                window_size=4,
                embed_dim=32,
                depths=(2, 2),
                num_heads=(2, 4),
            ),
        ),
        Family("ViT RelPos", "vit_relpos_small_patch16_224", _timm("vit_relpos_small_patch16_224", **VIT)),
        Family(
            "XCiT",
            "xcit_nano_12_p16_224",
            _timm("xcit_nano_12_p16_224", img_size=IMAGE, patch_size=8, embed_dim=32, depth=2, num_heads=4),
        ),
        Family(
            "ConViT",
            "convit_tiny",
            _timm("convit_tiny", img_size=IMAGE, patch_size=8, embed_dim=8, depth=2, num_heads=4, local_up_to_layer=1),
        ),
        Family(
            "LeViT",
            "levit_128s",
            _timm("levit_128s", img_size=IMAGE, embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1)),
        ),
        Family(
            "PiT",
            "pit_ti_224",
            _timm("pit_ti_224", img_size=IMAGE, patch_size=8, stride=4, base_dims=[16, 16], depth=[1, 1], heads=[2, 4]),
        ),
        Family("MViTv2", "mvitv2_tiny", _mvitv2),
    ]
}


def build(family: str, seed: int = 0) -> nn.Module:
    """A fresh tiny model of ``family`` (a key of :data:`ZOO`) with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return ZOO[family].build().eval()


class ZooClassifier(L.LightningModule):
    """A plain LightningModule around a tiny zoo model (what ``load_compressed`` rebuilds)."""

    def __init__(self, family: str = "ViT", lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build(family).train()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(images))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


# ----------------------------------------------------------------------------- the techniques
IMAGES = torch.rand(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _pruner(**options: Any) -> Callable[[nn.Module], Callable[[nn.Module], str]]:
    def prune(model: nn.Module) -> Callable[[nn.Module], str]:
        before = _params(model)
        prune_vit(model, 0.5, IMAGES[:1], **options)
        after = _params(model)
        assert after < before, f"prune_vit left {after} of {before} parameters"
        return lambda loaded: ""

    return prune


def _int8(model: nn.Module) -> Callable[[nn.Module], str]:
    summary = quantize_model(model, "int8_dynamic", example_input=IMAGES[:1])
    assert summary["quantized"], f"quantize_model quantized nothing: {summary}"
    return lambda loaded: ""


def _tome(model: nn.Module) -> Callable[[nn.Module], str]:
    plan = merge_tokens(model, 2)
    counts = merged_token_counts(model, IMAGES[:1])
    assert counts and counts[-1] < plan["tokens_in"], f"merge_tokens merged nothing: {plan['tokens_in']} -> {counts}"
    return lambda loaded: str(merge_tokens(loaded, 2))  # a state dict does not hold the merging: apply it again


def _nystrom(model: nn.Module) -> Callable[[nn.Module], str]:
    swapped = swap_attention(model, 4)
    assert swapped, "swap_attention swapped nothing"
    return lambda loaded: ""


#: technique column -> (what the call is, the call); each returns what to redo on the reloaded model
TECHNIQUES: dict[str, tuple[str, Callable[[nn.Module], Callable[[nn.Module], str]]]] = {
    "prune 50%": ("prune_vit(model, 0.5, x)", _pruner()),
    "prune 50%, whole heads": ("prune_vit(model, 0.5, x, prune_heads=True)", _pruner(prune_heads=True)),
    "int8": ('quantize_model(model, "int8_dynamic")', _int8),
    "token merging": ("merge_tokens(model, 2)", _tome),
    "Nyström": ("swap_attention(model, 4)", _nystrom),
}


class CellFailure(AssertionError):
    """A cell that is neither working nor clearly refused: silent, broken or crashing."""


@dataclass(frozen=True)
class Cell:
    works: bool
    why: str  # the refusal message; "" when it works


def _clear(error: BaseException, model: nn.Module) -> bool:
    """A refusal names a class of the model (the model's or a module's) and what is supported or possible."""
    message = str(error)
    classes = {type(m).__name__ for m in model.modules()}
    names_class = any(re.search(rf"\b{re.escape(c)}\b", message) for c in classes)
    return names_class and re.search(r"support|possible|pass |only|cannot", message, re.I) is not None


def run_cell(family: str, technique: str) -> Cell:
    """Apply ``technique`` to a fresh tiny ``family`` model and check the outcome (see the module docstring).

    Raises:
        CellFailure: the technique was silent, left a broken model, or crashed unclearly.
    """
    lit = ZooClassifier(family).eval()
    model = lit.model
    with torch.no_grad():
        reference = logits_of(model(IMAGES))
    _, apply = TECHNIQUES[technique]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            redo = apply(model)
        except AssertionError as err:
            raise CellFailure(f"{family} / {technique}: silent ({err})") from err
        except (TypeError, ValueError) as err:
            if not _clear(err, model):
                raise CellFailure(f"{family} / {technique}: unclear refusal {type(err).__name__}: {err}") from err
            return Cell(False, str(err))
        except Exception as err:
            raise CellFailure(f"{family} / {technique}: crashed with {type(err).__name__}: {err}") from err
        try:
            with torch.no_grad():
                output = logits_of(lit.eval()(IMAGES))
        except Exception as err:
            raise CellFailure(f"{family} / {technique}: broken model ({type(err).__name__}: {err})") from err
        if output.shape != reference.shape or not torch.isfinite(output).all():
            raise CellFailure(
                f"{family} / {technique}: output {tuple(output.shape)} finite="
                f"{bool(torch.isfinite(output).all())}, expected {tuple(reference.shape)}"
            )
        buffer = io.BytesIO()
        torch.save(lit.state_dict(), buffer)
        try:
            loaded = _load(buffer, family)
            redo(loaded.model)
            with torch.no_grad():
                again = logits_of(loaded(IMAGES))
        except Exception as err:
            raise CellFailure(f"{family} / {technique}: does not reload ({type(err).__name__}: {err})") from err
    if not torch.allclose(again, output, rtol=1e-4, atol=1e-5):
        raise CellFailure(f"{family} / {technique}: reloaded output differs by {(again - output).abs().max():.2e}")
    return Cell(True, "")


def _load(buffer: io.BytesIO, family: str) -> ZooClassifier:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        path.write_bytes(buffer.getvalue())
        return load_compressed(ZooClassifier, path, family=family)


# ----------------------------------------------------------------------------- the table
README_START, README_END = "<!-- family-table -->", "<!-- /family-table -->"


def _short(why: str) -> str:
    """The first sentence of a refusal, for the table."""
    first = re.split(r"(?<=\.)\s", why.replace("|", "/").replace("\n", " "), maxsplit=1)[0]
    return first if len(first) <= 240 else first[:237] + "..."


def table_row(family: str, cells: dict[str, Cell]) -> str:
    """The table's row of ``family`` from its cells (``technique -> Cell``)."""
    return (
        f"| {family} | `{ZOO[family].timm_name}` | "
        + " | ".join("works" if c.works else f"refused: {_short(c.why)}" for c in cells.values())
        + " |"
    )


def family_table(cells: dict[tuple[str, str], Cell]) -> str:
    """The Markdown table of ``cells`` (``(family, technique) -> Cell``), between the README markers."""
    lines = [
        README_START,
        "Generated by `python tests/zoo.py --update-readme` (checked by `tests/test_zoo.py`): tiny timm models, "
        "random weights; **works** = the model changed, its output is finite and of the same shape, and its "
        "state dict reloads through `load_compressed` to the same logits; **refused** = a `TypeError`/`ValueError` "
        "at the call naming the module and what is supported (its first sentence is quoted).",
        "",
        "| family | timm model | " + " | ".join(f"{t} (`{TECHNIQUES[t][0]}`)" for t in TECHNIQUES) + " |",
        "|---|---|" + "---|" * len(TECHNIQUES),
    ]
    lines.extend(table_row(family, {t: cells[family, t] for t in TECHNIQUES}) for family in ZOO)
    lines.append(README_END)
    return "\n".join(lines)


def all_cells() -> dict[tuple[str, str], Cell]:
    """Every cell of the table (about 20-40 s on 2 cores)."""
    return {(family, technique): run_cell(family, technique) for family in ZOO for technique in TECHNIQUES}


def readme_with_table(readme: str, table: str) -> str:
    """``readme`` with the text between the family-table markers replaced by ``table``."""
    start, end = readme.index(README_START), readme.index(README_END) + len(README_END)
    return readme[:start] + table + readme[end:]


if __name__ == "__main__":
    torch.set_num_threads(1)
    table = family_table(all_cells())
    if "--update-readme" in sys.argv:
        readme = ROOT / "README.md"
        readme.write_text(readme_with_table(readme.read_text(), table))
        print(f"wrote the family table into {readme}")
    else:
        print(table)
