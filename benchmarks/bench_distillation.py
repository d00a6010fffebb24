"""What DistillationTeacher costs per step, and what it buys in accuracy, on the offline digits.

Overhead: the time of one training step (``on_train_batch_start`` to
``on_train_batch_end``: training_step, backward, optimizer step, logging) of a
student with the teacher, against a student step without it plus one teacher
forward (on the adapted batch, under ``no_grad``), measured side by side in one
process, interleaved over several rounds (median), by the wall clock and by the
main thread's CPU time (at ``--overhead-threads 1`` all the work runs on the
main thread, so the CPU clock stays meaningful on a machine shared with other
jobs, where wall times are not). Target: ratio <= 1.10.

Accuracy: a stronger teacher (``DigitsClassifier(embed_dim=64, depth=4)``, ~8x the student's MACs) is
trained here and saved to a temporary checkpoint, which is the ``teacher`` path
given to the callback. Small students are trained for the same epochs alone and
distilled, over several seeds; the table gives the test accuracy's mean and
standard deviation. Digits have no random augmentation, so the runs use
``cache_teacher_logits=True``. When ``PruningSchedule`` is available, a pruned
row fine-tunes the teacher pruned by 50% alone and distilled from the unpruned one.

    python benchmarks/bench_distillation.py [--threads 2] [--seeds 3] [--epochs 20] [--skip-accuracy]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_vitcompress._measure import measure_accuracy
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule, small_vit
from lightning_vitcompress.distillation import DistillationTeacher

TEACHER = dict(embed_dim=64, depth=4, num_heads=4)
STUDENT = dict(embed_dim=32, depth=2, num_heads=4)


def trainer(max_epochs: int, callbacks: list[Callback], limit_train_batches: Any = 1.0) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


# ------------------------------------------------------------------ overhead
class StepTimer(Callback):
    """Wall time and CPU time of the main thread per step (CPU time barely depends on other processes)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = (time.perf_counter(), time.thread_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append((time.perf_counter() - self.start[0], time.thread_time() - self.start[1]))


def step_times(
    teacher: Optional[torch.nn.Module], dm: DigitsDataModule, steps: int, adapter: Any
) -> list[tuple[float, float]]:
    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if teacher is not None:
        callbacks.insert(0, DistillationTeacher(teacher, mode="soft", alpha=0.5, input_adapter=adapter))
    trainer(1, callbacks, limit_train_batches=steps + 2).fit(DigitsClassifier(**STUDENT), dm)
    return timer.times[2:]  # the first steps warm up


def teacher_forward_times(
    teacher: torch.nn.Module, dm: DigitsDataModule, steps: int, size: Optional[int]
) -> list[tuple[float, float]]:
    images = next(iter(dm.train_dataloader()))[0]
    times = []
    teacher.eval()
    with torch.no_grad():
        for i in range(steps + 2):
            start = (time.perf_counter(), time.thread_time())
            x = images if size is None else torch.nn.functional.interpolate(images, size=size, mode="bilinear")
            teacher(x)
            if i >= 2:
                times.append((time.perf_counter() - start[0], time.thread_time() - start[1]))
    return times


def overhead(rounds: int, steps: int) -> list[list[str]]:
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    rows = []
    for label, size in (("teacher 64x4 @32", None), ("teacher 64x4 @64 (resized)", 64)):
        torch.manual_seed(0)
        teacher = small_vit(**TEACHER, image_size=size or 32, patch_size=4 if size is None else 8)
        plain, distilled, forward = [], [], []
        for _ in range(rounds):  # interleaved: plain, distilled, teacher forward, ...
            plain += step_times(None, dm, steps, size)
            distilled += step_times(teacher, dm, steps, size)
            forward += teacher_forward_times(teacher, dm, steps, size)
        row = [label]
        ratios = []
        for clock in (0, 1):  # wall, CPU
            p, d, f = (statistics.median(t[clock] for t in v) * 1e3 for v in (plain, distilled, forward))
            row += [f"{p:.1f}", f"{f:.1f}", f"{d:.1f}"]
            ratios.append(d / (p + f))
        row += [f"{r:.3f} {'ok' if r <= 1.1 else 'OVER'}" for r in ratios]
        rows.append(row)
    return rows


# ------------------------------------------------------------------ accuracy
def train_teacher(dm: DigitsDataModule, epochs: int, path: Path) -> float:
    L.seed_everything(0, verbose=False)
    model = DigitsClassifier(**TEACHER)
    t = trainer(epochs, [])
    t.fit(model, dm)
    t.save_checkpoint(path)
    return measure_accuracy(model, dm.test_dataloader())


def student_accuracy(
    dm: DigitsDataModule, seed: int, epochs: int, teacher_path: Optional[Path], mode: str, model_name: str
) -> float:
    L.seed_everything(seed, verbose=False)
    model = DigitsClassifier(model_name=model_name, **STUDENT)
    callbacks: list[Callback] = []
    if teacher_path is not None:
        callbacks.append(
            DistillationTeacher(str(teacher_path), mode=mode, alpha=0.5, temperature=4.0, cache_teacher_logits=True)
        )
    trainer(epochs, callbacks).fit(model, dm)
    return measure_accuracy(model, dm.test_dataloader())


def pruned_accuracy(dm: DigitsDataModule, seed: int, epochs: int, teacher_path: Path, distil: bool) -> float:
    from lightning_vitcompress.pruning import PruningSchedule

    L.seed_everything(seed, verbose=False)
    model = DigitsClassifier.load_from_checkpoint(teacher_path, lr=5e-4)
    callbacks: list[Callback] = [PruningSchedule(pruning_ratio=0.5)]
    if distil:
        callbacks.append(
            DistillationTeacher(str(teacher_path), mode="soft", alpha=0.5, temperature=4.0, cache_teacher_logits=True)
        )
    trainer(epochs, callbacks).fit(model, dm)
    return measure_accuracy(model, dm.test_dataloader())


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def accuracy(seeds: int, epochs: int, teacher_epochs: int, prune_epochs: int, modes: list[str]) -> list[list[str]]:
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "teacher.ckpt"
        teacher_acc = train_teacher(dm, teacher_epochs, path)
        rows.append([f"teacher 64x4, {teacher_epochs} ep", "-", f"{100 * teacher_acc:.1f}", "-", "-"])
        cases = [
            ("ViT 32x2, soft T=4", "vit_tiny_patch16_224", "soft"),
            ("ViT 32x2, hard", "vit_tiny_patch16_224", "hard"),
            ("DeiT-distilled 32x2, deit", "deit_tiny_distilled_patch16_224", "deit"),
        ]
        for label, name, mode in [case for case in cases if case[2] in modes]:
            alone = [student_accuracy(dm, s, epochs, None, mode, name) for s in range(seeds)]
            distilled = [student_accuracy(dm, s, epochs, path, mode, name) for s in range(seeds)]
            gain = statistics.mean(d - a for d, a in zip(distilled, alone))
            rows.append([f"{label}, {epochs} ep", mean_std(alone), mean_std(distilled), f"{100 * gain:+.1f}",
                         f"{sum(d > a for d, a in zip(distilled, alone))}/{seeds}"])
        try:
            import lightning_vitcompress.pruning  # noqa: F401
        except ImportError:
            rows.append(["teacher pruned 50%", "n/a (PruningSchedule not available)", "", "", ""])
        else:
            try:
                alone = [pruned_accuracy(dm, s, prune_epochs, path, False) for s in range(seeds)]
                distilled = [pruned_accuracy(dm, s, prune_epochs, path, True) for s in range(seeds)]
            except Exception as err:  # PruningSchedule is developed alongside; keep the other rows
                rows.append(["teacher pruned 50%", f"failed: {type(err).__name__}: {str(err)[:80]}", "", "", ""])
                return rows
            gain = statistics.mean(d - a for d, a in zip(distilled, alone))
            rows.append([f"teacher pruned 50%, {prune_epochs} ep fine-tune", mean_std(alone), mean_std(distilled),
                         f"{100 * gain:+.1f}", f"{sum(d > a for d, a in zip(distilled, alone))}/{seeds}"])
    return rows


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overhead-threads", type=int, default=1,
                        help="threads for the overhead part; at 1 the main thread's CPU time holds all the work")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved overhead rounds")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--prune-epochs", type=int, default=3)
    parser.add_argument("--modes", default="soft,deit", help="student rows among soft,hard,deit")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, lightning {L.__version__}, {args.threads} threads, batch 64, student ViT 32x2")
    if not args.skip_overhead:
        torch.set_num_threads(args.overhead_threads)
        print(f"\nOverhead per training step at {args.overhead_threads} thread(s), median ms over interleaved rounds "
              "(wall clock | CPU time of the main thread)")
        print("target: step with teacher / (student step + teacher forward) <= 1.10")
        print_table(
            ["teacher", "step", "t-fwd", "step+t", "CPU step", "CPU t-fwd", "CPU step+t", "ratio wall", "ratio CPU"],
            overhead(args.rounds, args.steps),
        )
    if not args.skip_accuracy:
        torch.set_num_threads(args.threads)
        print(f"\nTest accuracy % on digits, mean ± std over {args.seeds} seeds (alpha 0.5)")
        print_table(
            ["student", "alone", "distilled", "mean gain", "seeds better"],
            accuracy(args.seeds, args.epochs, args.teacher_epochs, args.prune_epochs, args.modes.split(",")),
        )


if __name__ == "__main__":
    main()
