"""Does BenchmarkCallback's CPU throughput agree with an independent measurement?

For timm ``vit_small_patch16_224`` and ``vit_base_patch16_224`` (random
weights) it runs a one-step fit with ``BenchmarkCallback`` and measures the
same model independently with a plain ``torch.utils.benchmark.Timer`` before
and after the fit, in the same process. Target: within 10%.

    python benchmarks/bench_benchmark.py [--batch-size 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics

import lightning as L
import timm
import torch
import torch.nn.functional as F
from torch.utils import benchmark as torch_benchmark
from torch.utils.data import DataLoader, TensorDataset

from lightning_vitcompress import BenchmarkCallback


class Classifier(L.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.model = timm.create_model(name, pretrained=False, num_classes=10)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def independent_images_per_s(model: torch.nn.Module, batch_size: int, threads: int) -> float:
    x = torch.randn(batch_size, 3, 224, 224)
    model.eval()
    with torch.inference_mode():
        timer = torch_benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)
        timer.timeit(2)
        return batch_size / timer.blocked_autorange(min_run_time=3.0).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = TensorDataset(torch.randn(2, 3, 224, 224), torch.tensor([0, 1]))
    rows = []
    for name in ("vit_small_patch16_224", "vit_base_patch16_224"):
        L.seed_everything(0, verbose=False)
        module = Classifier(name)
        before = independent_images_per_s(module.model, args.batch_size, args.threads)
        bench = BenchmarkCallback(batch_size=args.batch_size, num_threads=args.threads, devices=["cpu"], plot=False)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[bench],
            default_root_dir="/tmp/bench_benchmark",
        )
        trainer.fit(module, DataLoader(data, batch_size=2))
        after = independent_images_per_s(module.model, args.batch_size, args.threads)
        ours = bench.report["final"]["cpu_images_per_s"]
        independent = statistics.mean([before, after])
        rows.append((name, ours, before, after, ours / independent))
    print(f"\nbatch {args.batch_size}, {args.threads} threads, {bench.report['cpu_name']}, torch {torch.__version__}")
    print("| model | BenchmarkCallback img/s | torch.utils.benchmark before / after fit | ratio |")
    print("|---|---|---|---|")
    for name, ours, before, after, ratio in rows:
        print(f"| {name} | {ours:.2f} | {before:.2f} / {after:.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
