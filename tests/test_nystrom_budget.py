"""NystromSwap's budgets: max_accuracy_drop swaps costly blocks back, min_tokens swaps only long sequences; DDP."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import fast_trainer, run_ddp_script
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_vitcompress import NystromSwap, TokenMerging
from lightning_vitcompress._model import find_attention_blocks
from lightning_vitcompress._structure import load_compressed, recorded_edits
from lightning_vitcompress.digits import DigitsClassifier
from lightning_vitcompress.functional import measure_accuracy
from lightning_vitcompress.functional.nystrom import NystromAttention, NystromConfig, swap_attention, swap_back


def nystrom_blocks(model: nn.Module) -> list[str]:
    return [name for name, m in find_attention_blocks(model) if isinstance(m, NystromAttention)]


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("value", [0, -3, 1.5, True, "fast", [64]])
def test_min_tokens_is_checked_in_the_constructor(value):
    with pytest.raises(ValueError, match=rf"min_tokens={value!r}.*int >= 1.*'auto'".replace("[", r"\[")):
        NystromSwap(min_tokens=value)


@pytest.mark.parametrize("value", [-1, 100, "1"])
def test_max_accuracy_drop_is_checked_in_the_constructor(value):
    with pytest.raises(ValueError, match=rf"max_accuracy_drop={value!r}"):
        NystromSwap(max_accuracy_drop=value)


def test_a_budget_without_validation_data_is_an_error_at_setup(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    trainer = fast_trainer(
        tmp_path, callbacks=[NystromSwap(num_landmarks=8, max_accuracy_drop=1.0)], limit_val_batches=0
    )
    with pytest.raises(ValueError, match=r"NystromSwap\(max_accuracy_drop=1.0\) measures validation top-1"):
        trainer.fit(model, digits)
    assert not nystrom_blocks(model.model)  # refused before anything was swapped


# ----------------------------------------------------------------------------- max_accuracy_drop
def test_swap_back_restores_exact_attention_with_the_shared_weights():
    from timm.layers.attention import Attention

    torch.manual_seed(0)
    vit = nn.Sequential(Attention(32, num_heads=4)).eval()
    x = torch.randn(2, 65, 32)
    exact = vit(x)
    swap_attention(vit, NystromConfig(num_landmarks=4))
    with torch.no_grad():
        vit[0].qkv.weight.mul_(1.5)  # "fine-tuning" of the swapped block
    removed = swap_back(vit, ["0"])
    assert isinstance(removed["0"], NystromAttention) and type(vit[0]) is Attention
    assert vit[0].qkv is removed["0"].qkv  # the fine-tuned weights, not a copy of the old ones
    assert not torch.allclose(vit(x), exact)
    with pytest.raises(ValueError, match="not Nyström attention blocks"):
        swap_back(vit, ["0"])


def _accuracy_with_nystrom(model: nn.Module, blocks: list[int], validation: list) -> float:
    trial = copy.deepcopy(model)
    swap_attention(trial, NystromConfig(num_landmarks=1), blocks=blocks)
    return measure_accuracy(trial, validation)


def test_the_budget_swaps_the_most_costly_block_back_and_the_checkpoint_rebuilds_the_rest(
    tmp_path, tiny_classifier, digits, trained_tiny
):
    model = tiny_classifier(lr=1e-9)  # the fine-tune leaves the weights as they are: the swap alone costs accuracy
    model.load_state_dict(trained_tiny)
    validation = list(digits.val_dataloader())
    entering = measure_accuracy(model.model, validation)
    both = _accuracy_with_nystrom(model.model, [0, 1], validation)
    only = {i: _accuracy_with_nystrom(model.model, [i], validation) for i in (0, 1)}  # the other one swapped back
    best = max(only.values())
    assert both < best, (both, only)  # one landmark harms: swapping one block back gains accuracy
    budget = max(0.0, (entering - best) * 100) + 1e-3  # within it with one block back, not with none
    callback = NystromSwap(num_landmarks=1, max_accuracy_drop=budget)
    logger = CSVLogger(tmp_path)
    trainer = fast_trainer(tmp_path, callbacks=[callback], limit_train_batches=1, limit_val_batches=None, logger=logger)
    trainer.fit(model, digits)

    assert callback.budget_reference == pytest.approx(entering)
    assert len(callback.swapped_back) == 1
    back = callback.swapped_back[0]["block"]
    stays = [name for name in ("blocks.0.attn", "blocks.1.attn") if name != back]
    if only[0] != only[1]:  # the block whose swap costs most is the one swapped back
        assert only[int(stays[0].split(".")[1])] == best
    assert nystrom_blocks(model.model) == stays
    assert type(model.model.get_submodule(back)).__name__ == "Attention"
    final = measure_accuracy(model.model, validation)
    assert (entering - final) * 100 <= budget + 1e-6
    record = next(r for r in recorded_edits(model) if r["kind"] == "nystrom")
    assert record["blocks"] == stays and back in record["swapped_back"]
    decided = callback.decisions()
    assert decided["nystrom_blocks"] == stays and decided["swapped_back"][0]["block"] == back
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "nystrom/swapped_back" in logged and f"nystrom/swap_back/{back}/accuracy_gain" in logged

    # a checkpoint of the fitted model rebuilds exactly the blocks that stayed Nyström, for inference ...
    path = tmp_path / "after.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_compressed(DigitsClassifier, path)
    assert nystrom_blocks(loaded.model) == stays
    images = validation[0][0][:8]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
    # ... and for a resumed fit, which keeps the decision (the swapped-back block is not swapped again)
    resumed_model = tiny_classifier(lr=1e-9)
    resumed = NystromSwap(num_landmarks=1, max_accuracy_drop=budget)
    fast_trainer(tmp_path, callbacks=[resumed], max_epochs=2, limit_train_batches=1, limit_val_batches=None).fit(
        resumed_model, digits, ckpt_path=path
    )
    assert resumed.budget_reference == pytest.approx(entering)
    assert nystrom_blocks(resumed_model.model) == stays
    assert resumed.decisions()["swapped_back"][0]["block"] == back


def test_the_benchmark_report_lists_blocks_swapped_back_and_skipped():
    from lightning_vitcompress.functional.report import format_report

    row = dict.fromkeys(("params", "size_mb", "accuracy"), None)
    report = {
        "baseline": row,
        "final": row,
        "ratios": {"accuracy_delta": None},
        "batch_size": 4,
        "num_threads": 2,
        "cpu_name": "cpu",
        "gpu_name": None,
        "decisions": {
            "NystromSwap": {
                "max_accuracy_drop": 1.0,
                "nystrom_blocks": ["blocks.0.attn"],
                "break_even_tokens": None,
                "swapped_back": [
                    {
                        "block": "blocks.1.attn",
                        "accuracy_gain": 3.5,
                        "logit_change": 0.2,
                        "accuracy_after": 0.9,
                        "reference": 0.91,
                    }
                ],
                "skipped_blocks": {"blocks.2.attn": "sees 49 tokens < min_tokens=60"},
            },
        },
    }
    text = format_report(report)
    assert (
        "NystromSwap: blocks.1.attn swapped back to exact attention for max_accuracy_drop=1.0 (alone it gains "
        "+3.50 pt; top-1 after 90.00% vs 91.00% entering fit)"
    ) in text
    assert "NystromSwap: blocks.2.attn kept exact: sees 49 tokens < min_tokens=60" in text
    assert "NystromSwap(min_tokens='auto'): measured break-even not reached" in text


# ----------------------------------------------------------------------------- min_tokens
def test_min_tokens_skips_the_blocks_token_merging_leaves_short(tmp_path, tiny_classifier, digits):
    model = tiny_classifier()
    swap = NystromSwap(num_landmarks=8, min_tokens=60)
    # 65 tokens enter block 0, which merges 16: block 1 sees 49
    trainer = fast_trainer(tmp_path, callbacks=[TokenMerging(r=16), swap], limit_train_batches=2)
    trainer.fit(model, digits)
    assert nystrom_blocks(model.model) == ["blocks.0.attn"]
    assert swap.skipped_blocks == {"blocks.1.attn": "sees 49 tokens < min_tokens=60"}
    record = next(r for r in recorded_edits(model) if r["kind"] == "nystrom")
    assert record["blocks"] == ["blocks.0.attn"] and "blocks.1.attn" in record["skipped"]

    # without merging every block sees 65 tokens: all are skipped, and that decision is recorded too
    model = tiny_classifier()
    swap = NystromSwap(num_landmarks=8, min_tokens=100)
    fast_trainer(tmp_path, callbacks=[swap], limit_train_batches=1).fit(model, digits)
    assert not nystrom_blocks(model.model)
    assert set(swap.skipped_blocks) == {"blocks.0.attn", "blocks.1.attn"}
    assert next(r for r in recorded_edits(model) if r["kind"] == "nystrom")["blocks"] == []


def test_min_tokens_auto_swaps_from_the_measured_break_even_and_logs_it(tmp_path, tiny_classifier, digits, monkeypatch):
    import lightning_vitcompress.callbacks._nystrom_setup as callback_module  # where min_tokens="auto" times

    timed: list[list[int]] = []

    def measured(attention, config, prefix, token_counts, **kwargs):  # this machine's timing, made up: 60 tokens
        timed.append(sorted(set(token_counts)))
        return {"speedups": {18: 0.5, 36: 0.8, 49: 0.9, 65: 1.2}, "break_even": 60}

    monkeypatch.setattr(callback_module, "nystrom_break_even", measured)
    model = tiny_classifier()
    swap = NystromSwap(num_landmarks=8, min_tokens="auto")
    logger = CSVLogger(tmp_path)
    fast_trainer(tmp_path, callbacks=[swap, TokenMerging(r=16)], limit_train_batches=1, logger=logger).fit(
        model, digits
    )
    assert timed == [[18, 36, 49, 65]]  # a doubling grid from 2 (m + prefix) and the counts the blocks see
    assert nystrom_blocks(model.model) == ["blocks.0.attn"]  # 65 tokens; block 1 sees 49 after merging
    assert swap.skipped_blocks == {"blocks.1.attn": "sees 49 tokens < min_tokens='auto' (measured break-even 60)"}
    assert swap.decisions()["break_even_tokens"] == 60
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "nystrom/break_even_tokens" in logged and "nystrom/auto/65_tokens/speedup" in logged


def test_break_even_timing_reports_each_count_where_nystrom_approximates():
    from timm.layers.attention import Attention

    from lightning_vitcompress.functional.nystrom import nystrom_break_even

    result = nystrom_break_even(
        Attention(32, num_heads=4),
        NystromConfig(num_landmarks=8),
        1,
        [9, 18, 65, 18],
        batch_size=1,
        num_threads=1,
        min_run_time=0.01,
        rounds=1,
    )
    assert set(result["speedups"]) == {18, 65}  # 9 tokens: the landmarks cover the patches, both are exact
    assert all(ratio > 0 for ratio in result["speedups"].values())
    even = result["break_even"]
    assert even is None or all(result["speedups"][t] > 1.0 for t in result["speedups"] if t >= even)


@pytest.mark.parametrize("family", ["timm-vit", "torchvision", "hf-vit-eager", "mha-seq-first"])
def test_swap_back_gives_every_family_its_exact_output_back(family):
    from families import build_family

    from lightning_vitcompress.models import logits_of

    model = build_family(family).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for parameter in model.parameters():  # sharper attention than at initialisation: the approximation shows
            parameter.add_(torch.randn_like(parameter) * 0.3)
        exact = logits_of(model(images))
        swap_attention(model, NystromConfig(num_landmarks=2, num_prefix_tokens=1))
        swapped = logits_of(model(images))
        swap_back(model, nystrom_blocks(model))
        back = logits_of(model(images))
    assert not nystrom_blocks(model)
    assert not torch.allclose(swapped, exact, atol=1e-4)  # the approximation changed the output ...
    torch.testing.assert_close(back, exact)  # ... and the exact modules, with the same weights, give it back
    assert set(model.state_dict()) == set(build_family(family).state_dict())  # the original keys, no Nyström state


# ----------------------------------------------------------------------------- DDP
def test_ddp_ranks_swap_back_the_same_blocks(tmp_path, trained_tiny):
    torch.save(trained_tiny, tmp_path / "trained.pt")
    body = """
    import hashlib
    import lightning as L
    from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
    from lightning_vitcompress import NystromSwap
    from lightning_vitcompress._structure import recorded_edits
    L.seed_everything(0, verbose=False)
    model = DigitsClassifier(embed_dim=32, depth=2, num_heads=4, lr=1e-9)
    model.load_state_dict(torch.load(os.path.join(OUT, "trained.pt"), weights_only=True))
    swap = NystromSwap(num_landmarks=1, max_accuracy_drop=0.0)
    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[swap],
    )
    trainer.fit(model, DigitsDataModule(batch_size=64))
    state = model.state_dict()
    structure = hashlib.sha256(repr([(k, tuple(v.shape)) for k, v in state.items()]).encode()).hexdigest()
    report(trainer, blocks=[type(b.attn).__name__ for b in model.model.blocks], structure=structure,
           swapped_back=[e["block"] for e in swap.swapped_back],
           recorded=[r["blocks"] for r in recorded_edits(model) if r["kind"] == "nystrom"],
           checksum=sum(v.double().sum().item() for v in state.values() if v.is_floating_point()))
    """
    rank0, rank1 = run_ddp_script(body, tmp_path)
    assert rank0["swapped_back"], rank0  # one landmark costs accuracy: the 0-point budget swaps blocks back
    for key in ("blocks", "structure", "swapped_back", "recorded"):
        assert rank0[key] == rank1[key], key
    assert rank0["recorded"][0] == [
        f"blocks.{i}.attn" for i, kind in enumerate(rank0["blocks"]) if kind == "NystromAttention"
    ]
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-6)
