"""What DistillationTeacher costs per step, and what it buys in accuracy, on the offline digits.

Overhead: the time of one training step (``on_train_batch_start`` to
``on_train_batch_end``: training_step, backward, optimizer step, logging) of a
student with the teacher, against a student step without it plus one teacher
forward (the resize to the teacher's image size, i.e. the input adapter, included,
then the teacher under ``no_grad``), measured side by side in one
process, interleaved over several rounds (median), by the wall clock and by the
main thread's CPU time (at ``--overhead-threads 1`` all the work runs on the
main thread, so the CPU clock stays meaningful on a machine shared with other
jobs, where wall times are not). Target: ratio <= 1.10. The teacher forward is
also timed inside the distilled step, so the table shows the teacher's cost
there apart from the rest (the callback's code, and the student slowed by sharing
caches with the teacher).

Accuracy: a stronger teacher (``DigitsClassifier(embed_dim=64, depth=4)``, ~8x the student's MACs) is
trained here and saved to a temporary checkpoint, which is the ``teacher`` path
given to the callback. Small students are trained for the same epochs alone and
distilled, over several seeds; the table gives the test accuracy's mean and
standard deviation. Digits have no random augmentation, so the runs use
``cache_teacher_logits=True``. When ``PruningSchedule`` is available, a pruned
row fine-tunes the teacher pruned by 50% (one shot) for ``--prune-epochs`` alone and
distilled from the unpruned one.

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

from lightning_vitcompress import DistillationTeacher
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule, small_vit
from lightning_vitcompress.functional import measure_accuracy
from lightning_vitcompress.functional.distill import check_input_adapter, teacher_forward

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
    """Wall time and CPU time of the main thread per step (CPU time depends less on other processes)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = (time.perf_counter(), time.thread_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append((time.perf_counter() - self.start[0], time.thread_time() - self.start[1]))


class TimedTeacher(DistillationTeacher):
    """Also times the callback's teacher forward (input adapter included) inside the step: the rest of
    (step with teacher - student step - this) is the callback's own code (hooks, loss, logging) plus any
    slowdown of the student's work from sharing caches with the teacher in one step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.forward_times: list[tuple[float, float]] = []

    def _teacher_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        start = (time.perf_counter(), time.thread_time())
        logits = super()._teacher_forward(inputs)
        self.forward_times.append((time.perf_counter() - start[0], time.thread_time() - start[1]))
        return logits


def step_times(
    teacher: Optional[torch.nn.Module],
    dm: DigitsDataModule,
    steps: int,
    adapter: Any,
    inner: Optional[list] = None,
    precision: str = "fp32",
    student: Optional[dict[str, Any]] = None,
) -> list[tuple[float, float]]:
    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if teacher is not None:
        callbacks.insert(
            0, TimedTeacher(teacher, mode="soft", alpha=0.5, input_adapter=adapter, teacher_precision=precision)
        )
    trainer(1, callbacks, limit_train_batches=steps + 2).fit(DigitsClassifier(**(student or STUDENT)), dm)
    if teacher is not None and inner is not None:
        inner += callbacks[0].forward_times[2:]
    return timer.times[2:]  # the first steps warm up


def teacher_forward_times(
    teacher: torch.nn.Module, dm: DigitsDataModule, steps: int, size: Optional[int], precision: str = "fp32"
) -> list[tuple[float, float]]:
    images = next(iter(dm.train_dataloader()))[0]
    times = []
    teacher.eval()
    for i in range(steps + 2):
        start = (time.perf_counter(), time.thread_time())
        teacher_forward(teacher, images, check_input_adapter(size), precision=precision)
        if i >= 2:
            times.append((time.perf_counter() - start[0], time.thread_time() - start[1]))
    return times


#: ViT-Tiny's width and depth (192 wide, 6 blocks, 3 heads) at 32x32: a student big enough for bf16 to pay
TINY_WIDTH = dict(embed_dim=192, depth=6, num_heads=3)
#: (label, student, teacher, teacher image size or None for the student's 32): a same-size teacher is the
#: student's own architecture; 64x4 is the accuracy part's teacher (~8x the 32x2 student's MACs)
OVERHEAD_TEACHERS = [
    ("student 32x2, same-size teacher", STUDENT, STUDENT, None),
    ("student 32x2, teacher 64x4", STUDENT, TEACHER, None),
    ("student 32x2, teacher 64x4 @64 (resized)", STUDENT, TEACHER, 64),
    ("student 192x6, same-size teacher", TINY_WIDTH, TINY_WIDTH, None),
]


def overhead(rounds: int, steps: int, precisions: list[str], cases: list[int]) -> list[list[str]]:
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    teachers = []
    for label, student, arch, size in (OVERHEAD_TEACHERS[i] for i in cases):
        torch.manual_seed(0)
        teacher = small_vit(**arch, image_size=size or 32, patch_size=4 if size is None else 8)
        teachers.append((label, student, teacher, size))
    configs = [(*teacher, precision) for teacher in teachers for precision in precisions]
    students = {repr(student): student for _, student, _, _ in teachers}
    plain: dict[str, list] = {key: [] for key in students}
    distilled: dict[int, list] = {i: [] for i in range(len(configs))}
    forward: dict[int, list] = {i: [] for i in range(len(configs))}
    inner: dict[int, list] = {i: [] for i in range(len(configs))}
    for _ in range(rounds):  # interleaved: each plain student, then each teacher and precision
        for key, student in students.items():
            plain[key] += step_times(None, dm, steps, None, student=student)
        for i, (_label, student, teacher, size, precision) in enumerate(configs):
            distilled[i] += step_times(teacher, dm, steps, size, inner[i], precision, student)
            forward[i] += teacher_forward_times(teacher, dm, steps, size, precision)
    rows = []
    for i, (label, student, _, _, precision) in enumerate(configs):
        row = [label, precision]
        ratios = []
        for clock in (0, 1):  # wall, CPU
            p, d, f, n = (
                statistics.median(t[clock] for t in v) * 1e3
                for v in (plain[repr(student)], distilled[i], forward[i], inner[i])
            )
            row += [f"{p:.1f}", f"{f:.1f}", f"{d:.1f}", f"{n:.1f}", f"{d - p - n:.1f}"]
            ratios.append((d / (p + f), d / p))
        (wall_fwd, _), (cpu_fwd, cpu_step) = ratios
        row += [
            f"{wall_fwd:.3f} {'ok' if wall_fwd <= 1.1 else 'OVER'}",
            f"{cpu_fwd:.3f} {'ok' if cpu_fwd <= 1.1 else 'OVER'}",
            f"{cpu_step:.2f}",
        ]
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
    dm: DigitsDataModule,
    seed: int,
    epochs: int,
    teacher_path: Optional[Path],
    mode: str,
    model_name: str,
    settings: dict[str, Any],
) -> float:
    L.seed_everything(seed, verbose=False)
    model = DigitsClassifier(model_name=model_name, **STUDENT)
    callbacks: list[Callback] = []
    if teacher_path is not None:
        callbacks.append(DistillationTeacher(str(teacher_path), mode=mode, cache_teacher_logits=True, **settings))
    trainer(epochs, callbacks).fit(model, dm)
    return measure_accuracy(model, dm.test_dataloader())


def pruned_accuracy(
    dm: DigitsDataModule, seed: int, epochs: int, teacher_path: Path, distil: bool, lr: float, settings: dict[str, Any]
) -> float:
    from lightning_vitcompress import PruningSchedule

    L.seed_everything(seed, verbose=False)
    model = DigitsClassifier.load_from_checkpoint(teacher_path, lr=lr)
    callbacks: list[Callback] = [PruningSchedule(pruning_ratio=0.5)]
    if distil:
        callbacks.append(DistillationTeacher(str(teacher_path), mode="soft", cache_teacher_logits=True, **settings))
    trainer(epochs, callbacks).fit(model, dm)
    return measure_accuracy(model, dm.test_dataloader())


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def accuracy(args: argparse.Namespace) -> list[list[str]]:
    seeds, epochs, teacher_epochs, prune_epochs = args.seeds, args.epochs, args.teacher_epochs, args.prune_epochs
    modes = args.modes.split(",")
    soft = dict(alpha=args.alpha, temperature=args.temperature)
    deit = dict(alpha=args.alpha, temperature=args.temperature, deit_target=args.deit_target)
    pruned = dict(alpha=args.prune_alpha, temperature=args.prune_temperature)
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "teacher.ckpt"
        teacher_acc = train_teacher(dm, teacher_epochs, path)
        rows.append([f"teacher 64x4, {teacher_epochs} ep", "-", f"{100 * teacher_acc:.1f}", "-", "-"])
        t, a = f"{args.temperature:g}", f"{args.alpha:g}"
        cases = [
            (f"ViT 32x2, soft T={t} a={a}", "vit_tiny_patch16_224", "soft", soft),
            (f"ViT 32x2, hard a={a}", "vit_tiny_patch16_224", "hard", dict(alpha=args.alpha)),
            (
                f"DeiT-distilled 32x2, deit ({args.deit_target}{' T=' + t if args.deit_target == 'soft' else ''} a={a})",
                "deit_tiny_distilled_patch16_224",
                "deit",
                deit,
            ),
        ]
        for label, name, mode, settings in [case for case in cases if case[2] in modes]:
            alone = [student_accuracy(dm, s, epochs, None, mode, name, settings) for s in range(seeds)]
            distilled = [student_accuracy(dm, s, epochs, path, mode, name, settings) for s in range(seeds)]
            gain = statistics.mean(d - a for d, a in zip(distilled, alone))
            print(f"  {label}: alone {alone}, distilled {distilled}", flush=True)
            rows.append(
                [
                    f"{label}, {epochs} ep",
                    mean_std(alone),
                    mean_std(distilled),
                    f"{100 * gain:+.1f}",
                    f"{sum(d > a for d, a in zip(distilled, alone))}/{seeds}",
                ]
            )
        if args.sweep:
            rows += sweep(args, dm, path, epochs, seeds)
        if args.prune_epochs <= 0:
            return rows
        lr = args.prune_lr
        alone = [pruned_accuracy(dm, s, prune_epochs, path, False, lr, pruned) for s in range(seeds)]
        distilled = [pruned_accuracy(dm, s, prune_epochs, path, True, lr, pruned) for s in range(seeds)]
        gain = statistics.mean(d - a for d, a in zip(distilled, alone))
        print(f"  pruned: alone {alone}, distilled {distilled}", flush=True)
        label = (
            f"teacher pruned 50%, {prune_epochs} ep fine-tune (lr {lr:g}; soft T={args.prune_temperature:g} "
            f"a={args.prune_alpha:g})"
        )
        rows.append(
            [
                label,
                mean_std(alone),
                mean_std(distilled),
                f"{100 * gain:+.1f}",
                f"{sum(d > a for d, a in zip(distilled, alone))}/{seeds}",
            ]
        )
    return rows


def sweep(args: argparse.Namespace, dm: DigitsDataModule, path: Path, epochs: int, seeds: int) -> list[list[str]]:
    """Soft-mode settings side by side: the student alone once per seed, each setting distilled per seed,
    gains paired by seed. ``--sweep "4:0.5:fp32 1:0.5 2:0.3"`` = temperature:alpha[:teacher precision]."""
    name = "vit_tiny_patch16_224"
    alone = [student_accuracy(dm, s, epochs, None, "soft", name, {}) for s in range(seeds)]
    print(f"  sweep: alone {alone}", flush=True)
    rows = [[f"sweep: ViT 32x2 alone, {epochs} ep", mean_std(alone), "-", "-", "-"]]
    for item in args.sweep.split():
        temperature, alpha, *precision = item.split(":")
        settings: dict[str, Any] = dict(alpha=float(alpha), temperature=float(temperature))
        if precision:
            settings["teacher_precision"] = precision[0]
        distilled = [student_accuracy(dm, s, epochs, path, "soft", name, settings) for s in range(seeds)]
        gains = [d - a for d, a in zip(distilled, alone)]
        print(f"  sweep {item}: distilled {distilled}", flush=True)
        label = f"sweep: soft T={temperature} a={alpha}" + (f" {precision[0]} teacher" if precision else "")
        rows.append(
            [
                label,
                mean_std(alone),
                mean_std(distilled),
                f"{100 * statistics.mean(gains):+.1f}",
                f"{sum(g > 0 for g in gains)}/{seeds}",
            ]
        )
    return rows


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--overhead-threads",
        type=int,
        default=1,
        help="threads for the overhead part; at 1 the main thread's CPU time holds all the work",
    )
    parser.add_argument("--rounds", type=int, default=4, help="interleaved overhead rounds")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term (student rows)")
    parser.add_argument("--temperature", type=float, default=4.0, help="soft-term temperature (student rows)")
    parser.add_argument(
        "--deit-target",
        choices=("hard", "soft"),
        default="hard",
        help="term training the distillation head in the deit row",
    )
    parser.add_argument("--prune-epochs", type=int, default=12, help="fine-tune epochs of the pruned row (0: skip)")
    parser.add_argument("--prune-lr", type=float, default=5e-4, help="peak lr of the pruned fine-tune (cosine)")
    parser.add_argument("--prune-alpha", type=float, default=0.5)
    parser.add_argument("--prune-temperature", type=float, default=4.0)
    parser.add_argument("--modes", default="soft,deit", help="student rows among soft,hard,deit ('' for none)")
    parser.add_argument("--overhead-precisions", default="fp32,bf16", help="teacher precisions of the overhead rows")
    parser.add_argument(
        "--overhead-cases",
        default="0,1,2,3",
        help="indices into OVERHEAD_TEACHERS (student/teacher pairs) of the overhead rows",
    )
    parser.add_argument(
        "--sweep", default="", help="extra soft rows: 'T:alpha[:teacher precision] ...', paired by seed"
    )
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, lightning {L.__version__}, {args.threads} threads, batch 64, student ViT 32x2")
    if not args.skip_overhead:
        torch.set_num_threads(args.overhead_threads)
        print(
            f"\nOverhead per training step at {args.overhead_threads} thread(s), median ms over interleaved rounds "
            "(wall clock | CPU time of the main thread)"
        )
        print(
            "target: step with teacher (step+t) / (student step + teacher forward t-fwd) <= 1.10; t-fwd includes the "
            "resize to the teacher's size (the input adapter)\n(t-fwd in it): the callback's teacher forward timed "
            "inside step+t, adapter included; (own): step+t - step - (t-fwd in it): the callback's code (hooks, loss, "
            "logging) plus any slowdown of the student's work next to the teacher's"
        )
        print(
            "step+t / step (CPU): what the teacher adds to a student step (target for a same-size bf16 teacher: "
            "<= 1.20)"
        )
        print_table(
            [
                "teacher",
                "precision",
                "step",
                "t-fwd",
                "step+t",
                "(t-fwd in it)",
                "(own)",
                "CPU step",
                "CPU t-fwd",
                "CPU step+t",
                "(CPU t-fwd in it)",
                "(CPU own)",
                "ratio wall",
                "ratio CPU",
                "step+t / step CPU",
            ],
            overhead(
                args.rounds,
                args.steps,
                args.overhead_precisions.split(","),
                [int(i) for i in args.overhead_cases.split(",")],
            ),
        )
    if not args.skip_accuracy:
        torch.set_num_threads(args.threads)
        print(
            f"\nTest accuracy % on digits, mean ± std over {args.seeds} seeds (seeds 0..{args.seeds - 1}; the same "
            "seeds alone and distilled, gains paired by seed)"
        )
        print_table(
            ["student", "alone", "distilled", "mean gain", "seeds better"],
            accuracy(args),
        )


if __name__ == "__main__":
    main()
