"""The ViT-like timm families teams fine-tune (tests/zoo.py): every technique works or is refused at the call.

Each family's row runs its four cells once (prune 50%, int8, token merging, Nyström on a
tiny random-weight model): a cell that is silent, leaves a broken model or crashes fails
(:class:`zoo.CellFailure`), and the row must be the README's family table row, so the table
cannot drift from what the code does. The callbacks get the same answers inside ``fit``:
they act (and reload) or refuse at ``setup``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from helpers import fast_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from zoo import README_END, README_START, TECHNIQUES, ZOO, ZooClassifier, run_cell, table_row

from lightning_vitcompress import NystromSwap, PruningSchedule, QuantizeOnFit, TokenMerging, load_compressed, prune_vit

README = Path(__file__).resolve().parents[1] / "README.md"
#: families whose every cell works today and must keep working
ALL_WORK = ["ViT", "DeiT distilled", "DeiT III", "DINOv2", "DINOv2 + registers", "CLIP", "SigLIP (MAP head)"]


def _readme_rows() -> dict[str, str]:
    text = README.read_text()
    table = text[text.index(README_START) : text.index(README_END)]
    return {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ") and " | `" in line}


@pytest.mark.parametrize("family", list(ZOO))
def test_every_technique_works_or_is_refused_at_the_call_and_the_readme_says_which(family):
    cells = {technique: run_cell(family, technique) for technique in TECHNIQUES}
    if family in ALL_WORK:
        assert all(cell.works for cell in cells.values()), {t: c.why for t, c in cells.items() if not c.works}
    for technique, cell in cells.items():
        if not cell.works:
            assert len(cell.why) > 40, f"{technique}: a refusal too short to say what is supported: {cell.why!r}"
    assert _readme_rows().get(family) == table_row(family, cells), (
        f"The README's family table is out of date for {family}: run `python tests/zoo.py --update-readme`."
    )


def test_the_readme_table_has_one_row_per_family_and_no_other():
    assert list(_readme_rows()) == list(ZOO)


@pytest.mark.parametrize(
    ("family", "callback", "message"),
    [
        ("Swin", lambda: NystromSwap(num_landmarks=4), r"WindowAttention"),
        ("Swin", lambda: TokenMerging(r=2), r"WindowAttention|window"),
        ("ViT RelPos", lambda: PruningSchedule(0.5), r"RelPosAttention.*Supported"),
        ("PiT", lambda: PruningSchedule(0.5), r"PoolingVisionTransformer.*widths"),
        ("EVA-02", lambda: PruningSchedule(0.5), r"prune_heads=False.*\(Eva\).*RoPE.*Pass prune_heads=True"),
        ("CaiT", lambda: NystromSwap(num_landmarks=4), r"Cait: talking heads"),
    ],
)
def test_callbacks_refuse_at_setup_what_the_function_refuses(tmp_path, digits, family, callback, message):
    module = ZooClassifier(family)
    trainer = fast_trainer(tmp_path, callbacks=[callback()], max_steps=1, limit_val_batches=0)
    with pytest.raises((TypeError, ValueError), match=message):
        trainer.fit(module, digits)
    assert trainer.global_step == 0  # refused before any training step


@pytest.mark.parametrize("family", ["SigLIP (MAP head)", "EVA-02", "Swin"])
def test_pruned_and_int8_fit_resumes_and_reloads(tmp_path, digits, family):
    """Pruned at setup, trained, int8 at the end: the checkpoint reloads to the same logits; a resume rebuilds it."""
    images = torch.rand(2, 3, 32, 32)

    def callbacks() -> list:
        return [PruningSchedule(0.5, prune_heads=family == "EVA-02"), QuantizeOnFit("int8_dynamic")]

    module = ZooClassifier(family)
    params = sum(p.numel() for p in module.parameters())
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = fast_trainer(
        tmp_path, callbacks=[*callbacks(), saver], limit_train_batches=2, limit_val_batches=0, enable_checkpointing=True
    )
    trainer.fit(module, digits)
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    assert sum(p.numel() for p in module.parameters()) < params
    loaded = load_compressed(ZooClassifier, tmp_path / "final.ckpt")
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), module(images), rtol=1e-4, atol=1e-4)

    resumed = ZooClassifier(family)
    fast_trainer(tmp_path, callbacks=callbacks(), max_epochs=2, limit_train_batches=2, limit_val_batches=0).fit(
        resumed, digits, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert {n: p.shape for n, p in resumed.named_parameters()} == {n: p.shape for n, p in module.named_parameters()}


def test_a_headless_backbone_prunes_to_narrower_features():
    """num_classes=0: the output is the embedding, so pruning narrows it (not a broken model)."""
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
    ).eval()
    prune_vit(vit, 0.5, torch.rand(1, 3, 32, 32))
    assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 16)
