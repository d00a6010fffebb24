"""Bad inputs to ``BenchmarkCallback`` (see tests/bad_inputs.py for the harness)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from bad_inputs import Case, check_case
from helpers import TINY

from lightning_vitcompress import BenchmarkCallback
from lightning_vitcompress.digits import small_vit

B = "BenchmarkCallback"
FAST = dict(rounds=1, min_run_time=0.05, latency_repeats=3)


def init(id: str, argument: str, error: type[BaseException], **kwargs: Any) -> Case:
    return Case(id, lambda t: BenchmarkCallback(**kwargs), f"{argument}=", "init", B, error)


def setup(id: str, argument: str, make: Callable[[Path], Any], **case_kwargs: Any) -> Case:
    return Case(id, make, argument, "setup", B, **case_kwargs)


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "report.json"
    path.write_text("{}")
    return path


CASES = [
    # ------------------------------------------------------------ constructor: the value alone decides
    init("batch-size-zero", "batch_size", ValueError, batch_size=0),
    init("batch-size-bool", "batch_size", ValueError, batch_size=True),
    init("batch-size-float", "batch_size", ValueError, batch_size=2.5),
    init("num-threads-zero", "num_threads", ValueError, num_threads=0),
    init("num-threads-float", "num_threads", ValueError, num_threads=1.5),
    init("devices-tpu", "devices", ValueError, devices=("tpu",)),
    init("devices-empty", "devices", ValueError, devices=()),
    init("devices-int", "devices", TypeError, devices=[0]),
    init("devices-typo", "devices", ValueError, devices="gpu0"),
    init("input-shape-string", "input_shape", ValueError, input_shape="abc"),
    init("input-shape-int", "input_shape", ValueError, input_shape=32),
    init("input-shape-two-dims", "input_shape", ValueError, input_shape=(32, 32)),
    init("input-shape-zero", "input_shape", ValueError, input_shape=(3, 0, 32)),
    init("input-shape-float", "input_shape", ValueError, input_shape=(3, 32.5, 32)),
    init("dataloader-not-iterable", "dataloader", TypeError, dataloader=5),
    init("accuracy-batches-zero", "accuracy_batches", ValueError, accuracy_batches=0),
    init("baseline-model-a-path", "baseline_model", TypeError, baseline_model="baseline.ckpt"),
    init("output-dir-int", "output_dir", TypeError, output_dir=123),
    init("rounds-zero", "rounds", ValueError, rounds=0),
    init("rounds-float", "rounds", ValueError, rounds=2.5),
    init("min-run-time-infinite", "min_run_time", ValueError, min_run_time=float("inf")),
    init("latency-repeats-bool", "latency_repeats", ValueError, latency_repeats=True),
    init("plot-string", "plot", TypeError, plot="no"),
    init("model-attribute-empty", "model_attribute", ValueError, model_attribute=""),
    # ------------------------------------------------------------ setup: needs the model, the machine or disk
    setup(
        "input-shape-the-model-cannot-run",
        "input_shape=",
        lambda t: BenchmarkCallback(input_shape=(3, 64, 64), **FAST),
        error=ValueError,
    ),
    setup(
        "input-shape-wrong-channels",
        "input_shape=",
        lambda t: BenchmarkCallback(input_shape=(1, 32, 32), **FAST),
        error=ValueError,
    ),
    setup(
        "baseline-model-of-another-input-size",
        "input_shape=",
        lambda t: BenchmarkCallback(baseline_model=small_vit(**{**TINY, "image_size": 64}), **FAST),
        error=ValueError,
    ),
    setup(
        "output-dir-is-a-file",
        "output_dir=",
        lambda t: BenchmarkCallback(output_dir=_a_file(t), **FAST),
        error=NotADirectoryError,
    ),
    setup(
        "model-attribute-missing",
        "model_attribute=",
        lambda t: BenchmarkCallback(model_attribute="net", **FAST),
        error=AttributeError,
    ),
]
if not torch.cuda.is_available():
    CASES += [
        setup(
            "devices-cuda-only-without-cuda",
            "devices=",
            lambda t: BenchmarkCallback(devices=("cuda",), **FAST),
            error=ValueError,
        ),
        setup(
            "devices-cuda-index-without-cuda",
            "devices=",
            lambda t: BenchmarkCallback(devices=("cpu", "cuda:1"), **FAST),
            error=ValueError,
        ),
    ]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, digits):
    check_case(case, tmp_path, digits)
