"""BenchmarkCallback and the plain measuring functions."""

from __future__ import annotations

import io
import json
import platform
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from helpers import TINY, DictDigitsClassifier, DropLastBlock, MHAClassifier, dict_loaders, fast_trainer, run_ddp_script
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_vitcompress import BenchmarkCallback, benchmark_model, compare_models
from lightning_vitcompress.digits import DigitsClassifier, small_vit
from lightning_vitcompress.functional.report import REPORT_FILENAME, format_report

FAST = dict(rounds=2, min_run_time=0.1, latency_repeats=5)


class RunTwice(nn.Module):
    """The same model run twice per forward: exactly twice the work."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model(x)
        return self.model(x)


def test_twice_the_work_measures_about_half_the_throughput():
    vit = small_vit(embed_dim=64, depth=2)
    report = compare_models(
        {"once": vit, "twice": RunTwice(vit)},
        torch.randn(16, 3, 32, 32),
        devices=["cpu"],
        # one thread: on a shared machine a two-thread run waits at every barrier for a descheduled thread,
        # which slowed one side 3.6x in a CI run beside other jobs; one thread slows both sides alike
        num_threads=1,
        rounds=5,
        min_run_time=0.2,
        latency_repeats=5,
    )
    ratio = report["once"]["cpu_images_per_s"] / report["twice"]["cpu_images_per_s"]
    assert 1.6 < ratio < 2.5
    assert report["twice"]["macs_per_image"] == 2 * report["once"]["macs_per_image"]


_PAGE_FAULTS = """
import resource, torch
from lightning_vitcompress.functional.measure import settle_allocator
def faults():  # minor page faults of 20 allocations of 4 MiB, each touched and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        block = torch.empty(4 << 20, dtype=torch.uint8)
        block[::4096] = 1
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults())
settle_allocator()
print(faults())
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds only"
)
def test_timing_settles_the_allocator_so_medium_blocks_stop_page_faulting():
    # a fresh process (what a benchmark script is): glibc maps medium blocks afresh, page faults and all, until a
    # larger free raises its threshold; after settle_allocator (what every timing function calls first) they reuse
    # the heap. Unsettled, int8 dynamic's per-call buffers made it 2x slower in a fresh process than in a fit.
    out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], capture_output=True, text=True, check=True).stdout
    fresh, settled = map(int, out.split())
    assert fresh >= 1024  # at least the first 4 MiB block faults in page by page
    assert settled < fresh / 10


def test_size_is_the_saved_state_dict_and_gpu_is_none_without_cuda(tmp_path):
    vit = small_vit(**TINY)
    stats = benchmark_model(vit, torch.randn(4, 3, 32, 32), **FAST)
    buffer = io.BytesIO()
    torch.save(vit.state_dict(), buffer)
    assert stats["size_mb"] == pytest.approx(buffer.getbuffer().nbytes / 1e6)
    assert stats["size_mib"] == pytest.approx(buffer.getbuffer().nbytes / 2**20)
    assert stats["params"] == sum(p.numel() for p in vit.parameters())
    assert stats["batch_size"] == 4 and stats["num_threads"] >= 1
    if not torch.cuda.is_available():
        assert stats["gpu_images_per_s"] is None and stats["gpu_latency_ms_p50"] is None
        assert stats["gpu_name"] is None


def test_measuring_leaves_the_model_as_it_was():
    vit = small_vit(**TINY).train()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    benchmark_model(vit, torch.randn(4, 3, 32, 32), batches=[(torch.randn(4, 3, 32, 32), torch.arange(4))], **FAST)
    assert vit.training and all(m.training for m in vit.modules())
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert next(vit.parameters()).device.type == "cpu"


@pytest.mark.parametrize("edit_first", [True, False])
def test_baseline_is_the_model_before_any_edit(tmp_path, tiny_classifier, digits, edit_first):
    bench = BenchmarkCallback(batch_size=8, **FAST)
    callbacks = [DropLastBlock(), bench] if edit_first else [bench, DropLastBlock()]
    model = tiny_classifier(depth=3)
    fast_trainer(tmp_path, callbacks=callbacks).fit(model, digits)
    report = json.loads((tmp_path / REPORT_FILENAME).read_text())
    assert report == json.loads(json.dumps(bench.report))
    per_block = report["baseline"]["params"] - report["final"]["params"]
    assert per_block == sum(p.numel() for p in model.model.blocks[0].parameters())
    assert report["ratios"]["params_ratio"] < 1
    # values, not just keys (the report's dicts are built from one list of names, so keys are always there)
    assert report["baseline"]["params"] == sum(p.numel() for p in tiny_classifier(depth=3).model.parameters())
    for stage in ("baseline", "final"):
        measured = report[stage]
        assert isinstance(measured["params"], int) and measured["params"] > 0
        assert measured["size_mb"] > 0 and measured["size_mib"] == pytest.approx(measured["size_mb"] * 1e6 / 2**20)
        assert measured["cpu_images_per_s"] > 0 and measured["cpu_latency_ms_p50"] > 0
        assert measured["macs_per_image"] > 0
        assert 0 <= measured["accuracy"] <= 1
        if not torch.cuda.is_available():
            assert measured["gpu_images_per_s"] is None and measured["gpu_latency_ms_p50"] is None
    assert report["final"]["size_mb"] < report["baseline"]["size_mb"]
    assert report["batch_size"] == 8 and report["input_shape"] == [3, 32, 32]
    assert report["num_threads"] == torch.get_num_threads()
    assert isinstance(report["cpu_name"], str) and report["cpu_name"]
    if not torch.cuda.is_available():
        assert report["gpu_name"] is None
    for package in ("torch", "lightning", "timm", "torchao"):
        assert report["versions"][package] == metadata.version(package)
    assert report["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert "| params |" in format_report(report)


def test_no_dataloader_gives_none_accuracy_with_a_warning(tmp_path, tiny_classifier, digits):
    bench = BenchmarkCallback(batch_size=4, output_dir=tmp_path / "out", **FAST)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = fast_trainer(tmp_path, callbacks=[bench], limit_val_batches=0, logger=logger)
    with pytest.warns(UserWarning, match="no dataloader to measure accuracy"):
        trainer.fit(tiny_classifier(), train_dataloaders=digits.train_dataloader())
    assert bench.report["final"]["accuracy"] is None
    assert (tmp_path / "out" / REPORT_FILENAME).is_file()
    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"bench/cpu_speedup", "bench/size_ratio", "bench/final_size_mb"} <= set(logged)
    assert "bench/final_accuracy" not in logged  # None is not logged as a number


def test_bf16_compiled_baseline_gives_the_speedup_against_what_a_team_would_run(tmp_path, tiny_classifier, digits):
    from lightning_vitcompress.functional.baselines import CompiledAutocast

    bench = BenchmarkCallback(batch_size=8, baselines=("bf16_compiled",), accuracy_batches=1, plot=False, **FAST)
    model = tiny_classifier(depth=3)
    fast_trainer(tmp_path, callbacks=[DropLastBlock(), bench]).fit(model, digits)
    report = json.loads((tmp_path / REPORT_FILENAME).read_text())
    reference = report["baselines"]["bf16_compiled"]
    baseline, final = report["baseline"], report["final"]
    # the reference is the uncompressed model (same weights, same work), only run differently
    assert reference["params"] == baseline["params"] > final["params"]
    assert reference["macs_per_image"] == baseline["macs_per_image"]
    assert reference["cpu_images_per_s"] > 0 and reference["cpu_latency_ms_p50"] > 0
    assert reference["accuracy"] == pytest.approx(baseline["accuracy"], abs=0.1)
    assert reference["ratios"]["cpu_speedup"] == pytest.approx(
        final["cpu_images_per_s"] / reference["cpu_images_per_s"]
    )
    assert report["ratios"]["cpu_speedup"] == pytest.approx(final["cpu_images_per_s"] / baseline["cpu_images_per_s"])
    assert "| bf16_compiled |" in format_report(report) and "| fp32 eager (baseline) |" in format_report(report)
    # the functional piece: a new module, close to the fp32 model, the original untouched
    vit = small_vit(**TINY).eval()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    wrapped = CompiledAutocast(vit)
    x = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        got, expected = wrapped(x), vit(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch_size=0), "batch_size=0: must be a positive"),
        (dict(baselines=("fp16_compiled",)), r"baselines='fp16_compiled': use one of 'bf16_compiled'"),
        (dict(baselines=3), r"baselines=3: pass a tuple of names"),
        (dict(devices=["tpu"]), "devices='tpu'"),
        (dict(devices=["gpu0"]), "devices='gpu0' is not a device name"),
        (dict(num_threads=-1), "num_threads=-1"),
        (dict(input_shape=(32, 32)), r"input_shape=\(32, 32\)"),
        (dict(input_shape="abc"), r"input_shape='abc': give \(channels, height, width\)"),
        (dict(batch_size=2.5), r"batch_size=2.5: must be a positive whole number"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchmarkCallback(**kwargs)


def test_model_without_attention_fails_at_setup(tmp_path, digits):
    import lightning as L

    class Linear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="No attention blocks"):
        fast_trainer(tmp_path, callbacks=[BenchmarkCallback()]).fit(Linear(), digits)


def test_ddp_writes_one_report_on_rank_zero(tmp_path):
    reports = run_ddp_script(
        f"""
        import lightning as L
        from lightning_vitcompress import BenchmarkCallback
        from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        L.seed_everything(0)
        bench = BenchmarkCallback(batch_size=4, rounds=1, min_run_time=0.05, latency_repeats=3, output_dir=OUT)
        trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, limit_train_batches=2,
                            limit_val_batches=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[bench])
        trainer.fit(DigitsClassifier(**{TINY!r}), DigitsDataModule(batch_size=16))
        report(trainer, has_report=bench.report is not None)
        """,
        tmp_path,
    )
    assert [r["has_report"] for r in reports] == [True, False]
    assert len(list(tmp_path.glob(REPORT_FILENAME))) == 1


def test_macs_are_none_for_torchao_quantized_weights_not_a_fraction():
    from lightning_vitcompress import quantize_model

    vit = small_vit(**TINY)
    x = torch.randn(2, 3, 32, 32)
    assert benchmark_model(vit, x, devices=["cpu"], **FAST)["macs_per_image"] > 0
    quantize_model(vit, "int8_dynamic")
    stats = benchmark_model(vit, x, devices=["cpu"], **FAST)
    assert stats["macs_per_image"] is None
    assert stats["cpu_images_per_s"] > 0 and stats["size_mb"] > 0


class TorchvisionClassifier(DigitsClassifier):
    """The digits module around a tiny torchvision ``VisionTransformer`` (its input size is ``image_size``)."""

    def __init__(self) -> None:
        super().__init__(**TINY)
        from torchvision.models.vision_transformer import VisionTransformer

        self.model = VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10
        )


@pytest.mark.parametrize("family", ["torchvision", "transformers"])
def test_input_shape_comes_from_the_family_adapter(tmp_path, digits, family):
    """torchvision and transformers ViTs state their input size elsewhere than timm: no input_shape needed."""
    if family == "transformers":
        pytest.importorskip("transformers", reason="the [hf] extra is not installed")
        from transformers import ViTConfig, ViTForImageClassification

        class Module(DigitsClassifier):
            def __init__(self) -> None:
                super().__init__(**TINY)
                config = ViTConfig(
                    image_size=32,
                    patch_size=8,
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=64,
                    num_labels=10,
                )
                self.model = ViTForImageClassification(config)

            def forward(self, images):
                return self.model(images).logits

        model = Module()
    else:
        model = TorchvisionClassifier()
    bench = BenchmarkCallback(
        batch_size=4,
        devices=("cpu",),
        rounds=1,
        min_run_time=0.05,
        latency_repeats=3,
        output_dir=tmp_path,
        plot=False,
        accuracy_batches=1,
    )
    fast_trainer(tmp_path, callbacks=[bench], limit_train_batches=1, limit_val_batches=1).fit(model, digits)
    assert bench.report["final"]["params"] == sum(p.numel() for p in model.model.parameters())
    assert bench.report["final"]["cpu_images_per_s"] > 0


@pytest.mark.parametrize("source", ["datamodule", "dataloaders"])
def test_input_shape_comes_from_the_first_batch(tmp_path, digits, source):
    """A hand-written ViT that states no input size is measured at the shape of the Trainer's data."""

    bench = BenchmarkCallback(
        batch_size=4,
        devices=("cpu",),
        rounds=1,
        min_run_time=0.05,
        latency_repeats=3,
        output_dir=tmp_path,
        plot=False,
        accuracy_batches=1,
    )
    trainer = fast_trainer(tmp_path, callbacks=[bench], limit_train_batches=1, limit_val_batches=1)
    if source == "datamodule":
        trainer.fit(MHAClassifier(), digits)
    else:
        trainer.fit(MHAClassifier(), train_dataloaders=digits.train_dataloader())
    assert bench.report["input_shape"] == [3, 32, 32]
    assert bench.report["final"]["cpu_images_per_s"] > 0


def test_dict_batches_are_measured_for_accuracy(tmp_path, digits):
    """Hugging Face shaped batches ({"pixel_values", "labels"}): the report is written, accuracy from the dicts
    (the NystromSwap budget measures the same batches)."""
    import lightning as L

    from lightning_vitcompress import NystromSwap

    train, val = dict_loaders(digits)
    L.seed_everything(0, verbose=False)
    model = DictDigitsClassifier(**TINY)
    bench = BenchmarkCallback(output_dir=tmp_path, plot=False, accuracy_batches=2, **FAST)
    swap = NystromSwap(num_landmarks=8, max_accuracy_drop=99.0)
    fast_trainer(tmp_path, callbacks=[bench, swap]).fit(model, train, val)
    assert bench.report is not None and (tmp_path / REPORT_FILENAME).is_file()
    assert 0.0 <= bench.report["final"]["accuracy"] <= 1.0
    assert 0.0 <= bench.report["baseline"]["accuracy"] <= 1.0


def test_batches_without_labels_are_refused_at_setup(tmp_path, tiny_classifier, digits):
    images_only = torch.utils.data.DataLoader([digits.val_dataloader().dataset[i][0] for i in range(8)], batch_size=4)
    bench = BenchmarkCallback(output_dir=tmp_path, plot=False, dataloader=images_only, **FAST)
    trainer = fast_trainer(tmp_path, callbacks=[bench])
    with pytest.raises(ValueError, match=r"dataloader=.*no \(images, labels\) pair") as info:
        trainer.fit(tiny_classifier(), digits)
    assert trainer.global_step == 0 and "labels" in str(info.value)
