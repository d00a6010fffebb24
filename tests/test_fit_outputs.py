"""What a fit shows and leaves beside its results: progress bars for the end-of-fit work, the plan at fit
start, and the model card (issue #29). The card's load snippet and the LitServe example run against one .pt2
exported once here (tests/test_serve.py shares the fixture through conftest)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap

import pytest
import yaml
from helpers import fast_trainer
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from lightning_vitcompress import BenchmarkCallback, PruningSchedule, QuantizeOnFit, TokenMerging
from lightning_vitcompress._card import MODEL_CARD_FILENAME
from lightning_vitcompress.digits import DigitsDataModule

#: the end-of-fit stages the cheap fit below runs (calibration, the benchmark's measurements)
STAGES = ("QuantizeOnFit: calibrating int8_static_x86", "BenchmarkCallback: measuring")


def _bench(**kwargs):
    return BenchmarkCallback(
        batch_size=4,
        devices=("cpu",),
        rounds=1,
        min_run_time=0.02,
        latency_repeats=1,
        accuracy_batches=1,
        plot=False,
        **kwargs,
    )


@pytest.mark.parametrize("bar", ["tqdm", "rich", None])
def test_end_of_fit_stages_show_in_the_trainers_bar_style_and_not_without_a_bar(
    bar, tiny_classifier, tmp_path, capsys, caplog
):
    callbacks = [
        PruningSchedule(0.5, max_accuracy_drop=50.0),
        TokenMerging(r=2),
        QuantizeOnFit("int8_static_x86", compile=False, calibration_batches=2),
        _bench(output_dir=tmp_path),
    ]
    if bar is not None:
        callbacks += [TQDMProgressBar() if bar == "tqdm" else RichProgressBar(), ModelSummary()]
    trainer = fast_trainer(
        tmp_path,
        callbacks=callbacks,
        enable_progress_bar=bar is not None,
        enable_model_summary=bar is not None,
        logger=CSVLogger(tmp_path),
        limit_train_batches=3,
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(tiny_classifier(), DigitsDataModule(batch_size=16))
    out = capsys.readouterr().out
    log = caplog.text
    for stage in STAGES:
        assert (stage in out) == (bar is not None), (stage, out[-2000:])
    if bar == "tqdm":  # the Trainer's bar format: "<desc>: 100%|####| 2/2 [elapsed<remaining, rate]"
        assert re.search(r"calibrating int8_static_x86: 100%\|.*\| 2/2 \[", out), out[-2000:]
    # the plan: printed where the model summary prints, one row per callback with when and the resolved choice
    assert ("Compression plan" in log) == (bar is not None)
    if bar is not None:
        table = log[log.index("Compression plan") :]
        assert re.search(
            r"\| PruningSchedule \| structured pruning, 0.5 of the channels removed \| setup "
            r"\(before the optimizer exists\) \| .*max_accuracy_drop=50 pt \(entry top-1",
            table,
        )
        assert "| TokenMerging | token merging (ToMe), r=2 per block (constant) | setup" in table
        assert (
            "| QuantizeOnFit | int8: int8_static_x86, 32-true | train end | named in config=; calibrated on 2" in table
        )
        assert table.index("| BenchmarkCallback") < table.index("| PruningSchedule") < table.index("| QuantizeOnFit")
    # ... and always logged to the loggers, one hyperparameter per callback
    hparams = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text())
    assert hparams["plan/QuantizeOnFit"].startswith("int8: int8_static_x86, 32-true; train end;")
    assert {k for k in hparams if k.startswith("plan/")} == {
        "plan/BenchmarkCallback",
        "plan/PruningSchedule",
        "plan/TokenMerging",
        "plan/QuantizeOnFit",
    }


def test_a_card_that_cannot_be_written_warns_naming_the_path_and_the_fit_finishes(tiny_classifier, tmp_path):
    (tmp_path / MODEL_CARD_FILENAME).mkdir()  # a folder where the card's file would go
    bench = _bench(output_dir=tmp_path)
    with pytest.warns(UserWarning, match=rf"model card could not be written to {re.escape(str(tmp_path))}/MODEL_CARD"):
        fast_trainer(tmp_path, callbacks=[bench], limit_train_batches=1).fit(
            tiny_classifier(), DigitsDataModule(batch_size=16)
        )
    assert bench.report is not None and bench.report_path.is_file()  # the results are there all the same


def test_a_bar_that_cannot_draw_warns_and_the_work_goes_on(tiny_classifier, tmp_path, monkeypatch):
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    def broken(*args, **kwargs):
        raise OSError("stdout closed")

    monkeypatch.setattr(Tqdm, "set_postfix_str", broken)  # what our bars call for each step; the Trainer's does not
    bench = _bench(output_dir=tmp_path)
    trainer = fast_trainer(
        tmp_path,
        callbacks=[bench, TQDMProgressBar()],
        enable_progress_bar=True,
        limit_train_batches=1,
        limit_val_batches=0,
    )
    with pytest.warns(UserWarning, match=r"progress bar for 'BenchmarkCallback: measuring' could not be drawn"):
        trainer.fit(tiny_classifier(), DigitsDataModule(batch_size=16))
    assert bench.report["final"]["cpu_images_per_s"] > 0


# ------------------------------------------------------------------ the card of a fit that exported a .pt2
def test_model_card_sections_tables_and_a_load_snippet_that_runs_without_this_library(served):
    card = (served["folder"] / MODEL_CARD_FILENAME).read_text()
    front, body = card.split("---\n", 2)[1:]
    meta = yaml.safe_load(front)
    assert meta["pipeline_tag"] == "image-classification" and {"ExportOnFit", "pt2"} <= set(meta["tags"])
    for section in (
        "## Model Details",
        "## How to Get Started with the Model",
        "## Training Details",
        "### Compression recipe",
        "### Resolved configs and decisions",
        "## Evaluation",
        "## Technical Specifications",
    ):
        assert section in body, section
    assert "| ExportOnFit | writes vit.pt2 (pt2) | train end, after QuantizeOnFit |" in body
    assert "| top-1 accuracy |" in body and "| CPU images/s |" in body  # the before/after table
    assert re.search(r"- torch: \d", body) and "- lightning-vitcompress:" in body and "- CPU (measured on): " in body
    snippet = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    blocked = textwrap.dedent("""
        import sys
        for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning_vitcompress", "timm", "torchao"):
            sys.modules[name] = None  # importing them now fails
        """)
    result = subprocess.run(
        [sys.executable, "-c", blocked + snippet], cwd=served["folder"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(1, 10)"


def test_export_stages_show_as_one_bar_with_each_stage(served):
    assert re.search(r"ExportOnFit: vit.pt2: 100%\|.*\| 3/3 \[.*load back and check", served["printed"]), served[
        "printed"
    ][-2000:]
