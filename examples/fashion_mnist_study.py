"""The study's table on Fashion-MNIST (60k/10k real images), every recipe paired with a control trained as long.

Run through ``examples/paper_table.py --dataset fashion-mnist`` (or this file directly).

**What is compared.** Per seed, one base ViT is trained from scratch (``--epochs``) and
cached on disk; every recipe starts from it and fine-tunes ``--fine-tune-epochs``, and its
**control** is the same base fine-tuned exactly as long, with the same optimizer, learning
rate and seed, without the recipe. The table reports each recipe's top-1, its control's,
and the paired Δ (recipe - control of the same seed), mean ± std over seeds. Recipes without
fine-tuning (int8 PTQ) are paired with the base itself. Top-1 is always on the full 10,000
test images.

**The scale, chosen for 2 shared CPU cores** (measured here, Dec 2026, with other jobs
on the machine, load 4-10): a 96-wide, 4-block, 3-head timm ViT at patch 4 on 28x28x1
(49 patches + class token, 0.46M parameters). Training runs on **one thread**
(``--threads``): under that load one thread trained 475-484 images per CPU-second, two
threads 71-104 (they wait on each other at every barrier while one is descheduled); the
first base model trained at 358 img/s wall on one thread (2 threads: 100-150 img/s; a
192-wide 6-block ViT: 40-70, the DESIGN note). bf16 autocast (``--precision bf16-mixed``;
this EPYC has avx512_bf16) was no faster at this width in interleaved runs (small,
overhead-bound matmuls), so training is fp32. Data: a fixed 20,000-image subset of the
55,000 training images left after a 5,000-image validation hold-out (no validation loop
runs), base 15 epochs (2,340 steps of 128; 12 epochs of 10,000 reached only 74.7%), each
recipe and control 3 more epochs. About 1.0-1.2M training images per seed, ~1 h per seed
at ~350 img/s: 3 seeds in about 3-4 h, in pieces.

**Teacher.** Distillation needs a teacher genuinely better than the student. As in DeiT
(whose teacher was a RegNet), it is a small convolutional network (:class:`ConvTeacher`, 5
conv layers, 0.14M parameters) trained on the same 20,000-image subset for
``--teacher-epochs``, once (seed 0), cached beside the bases; its test top-1 is written
to the JSON (a rerun whose cache is gone retrains it and stops unless it reaches the JSON's
top-1: the cells must share one teacher). The distillation rows fine-tune from the base like the
others; the two rows "..., from scratch" instead run the base's whole training (same seed, init,
epochs, lr) with the teacher added, paired with the vanilla base of their seed. A first attempt, the softmax ensemble of the three seeds' base ViTs (83.9%),
was *weaker* than seed 0's own base (84.5%): a ViT this size on 20k images is data-starved
and its seeds disagree by up to 4 points, so ViT knowledge could not teach a ViT. A
convnet's locality prior is exactly what such a student lacks (DeiT's finding: a convnet
teacher beats a stronger ViT teacher), and it trains in minutes.

**Resuming.** Results go to ``docs/results/fashion_mnist.json`` after every finished cell
(atomically); a rerun skips the (recipe, seed) cells already there and reuses the base
checkpoints cached under ``--cache-dir`` (gitignored ``outputs/``). A JSON written with
other settings is refused, naming the settings that differ.

**Speed** is a separate step (``--speed-only``): the same recipes on ViT-B/16 / DeiT-B at 224
with random weights, as ``paper_table.py`` measures them, stored in the JSON's ``speed``
section. The accuracy run never times anything. ``--table-only`` regenerates the README
table and the plot from the JSON without training.

    python examples/paper_table.py --dataset fashion-mnist              # accuracy run, resumes
    python examples/paper_table.py --dataset fashion-mnist --speed-only # ViT-B/16 speed columns
    python examples/paper_table.py --dataset fashion-mnist --table-only --update-readme
    python examples/paper_table.py --dataset fashion-mnist --fast       # smoke run (a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from lightning_vitcompress import DistillationTeacher, NystromSwap, PruningSchedule, QuantizeOnFit, TokenMerging
from lightning_vitcompress.digits import DigitsClassifier
from lightning_vitcompress.fashion_mnist import FashionMNISTDataModule
from lightning_vitcompress.functional import measure_accuracy, quantize_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "fashion_mnist.json"
PLOT = ROOT / "docs" / "results" / "fashion_mnist.png"
CONTROL = "vanilla + fine-tune (control)"
VANILLA = "vanilla"
#: token merging on the 49-patch, 4-block model: r=12 in every block halves the MACs (0.50x)
MERGE_FASHION = dict(r=12)
DISTIL_SOFT = dict(mode="soft", alpha=0.5, temperature=2.0)
DISTIL_HARD = dict(mode="hard", alpha=0.5)


@dataclass(frozen=True)
class StudyRecipe:
    """One row: what is applied to the base model (then fine-tuned, unless nothing trains).

    ``speed_landmarks``: Nyström landmarks at the ViT-B/16 speed scale, at the same
    tokens-per-landmark ratio (49 patches / 8 ~ 196 / 32).
    """

    name: str
    prune: Optional[float] = None
    importance: str = "l2"
    nystrom: Optional[int] = None
    speed_landmarks: Optional[int] = None
    distil: Optional[str] = None  # "soft" | "hard" | "deit"
    merge: bool = False
    quantize: Optional[str] = None
    control: bool = False
    #: trained from scratch (not from the base) for the base's epochs: paired with the vanilla base of its seed
    from_scratch: bool = False

    @property
    def fine_tuned(self) -> bool:
        if self.from_scratch:
            return False
        return self.control or self.merge or any(v is not None for v in (self.prune, self.nystrom, self.distil))

    @property
    def needs_teacher(self) -> bool:
        return self.distil is not None


RECIPES = [
    StudyRecipe(VANILLA),
    StudyRecipe(CONTROL, control=True),
    StudyRecipe("int8 dynamic (PTQ)", quantize="int8_dynamic"),
    StudyRecipe("Nystrom m=8 + fine-tune", nystrom=8, speed_landmarks=32),
    StudyRecipe("Nystrom m=16 + fine-tune", nystrom=16, speed_landmarks=64),
    StudyRecipe("token merging (ToMe r=12) + fine-tune", merge=True),
    StudyRecipe("structured pruning 50% L2 + fine-tune", prune=0.5),
    StudyRecipe("structured pruning 50% Taylor + fine-tune", prune=0.5, importance="taylor"),
    StudyRecipe("distillation soft", distil="soft"),
    StudyRecipe("distillation hard", distil="hard"),
    StudyRecipe("DeiT distillation token", distil="deit"),
    StudyRecipe("distillation soft, from scratch", distil="soft", from_scratch=True),
    StudyRecipe("distillation hard, from scratch", distil="hard", from_scratch=True),
    StudyRecipe("combined: prune 50% + distil + int8 dynamic", prune=0.5, distil="soft", quantize="int8_dynamic"),
    StudyRecipe(
        "combined: prune 50% + distil + token merging + int8 dynamic",
        prune=0.5,
        distil="soft",
        merge=True,
        quantize="int8_dynamic",
    ),
]


# ------------------------------------------------------------------------------------------ JSON
def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"--results {path}: not valid JSON ({err}); move it away to start afresh.") from err


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Atomically: a kill mid-write leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(partial, path)


def find_cell(results: dict[str, Any], recipe: str, seed: int) -> Optional[dict[str, Any]]:
    return next((c for c in results.get("cells", []) if c["recipe"] == recipe and c["seed"] == seed), None)


def setup_of(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that makes two runs' cells comparable; a resume must match it exactly."""
    return {
        "dataset": "fashion-mnist",
        "model": {
            "timm": "vit_tiny_patch16_224",
            "embed_dim": args.embed_dim,
            "depth": args.depth,
            "num_heads": args.num_heads,
            "patch_size": 4,
            "image_size": 28,
            "in_chans": 1,
        },
        "train_subset": args.train_subset,
        "val_size": 5000,
        "test_images": None if args.fast else 10000,
        "epochs": args.epochs,
        "fine_tune_epochs": args.fine_tune_epochs,
        "lr": args.lr,
        "fine_tune_lr": args.fine_tune_lr,
        "batch_size": args.train_batch_size,
        "precision": args.precision,
        "augment": "horizontal flip + 2-pixel random crop",
        "distil_soft": DISTIL_SOFT,
        "distil_hard": DISTIL_HARD,
        "merge": MERGE_FASHION,
        "teacher": f"ConvTeacher (5 conv layers), {args.teacher_epochs} epochs on the same subset, seed 0",
        "fast": bool(args.fast),
    }


def check_setup(results: dict[str, Any], setup: dict[str, Any], path: Path) -> None:
    old = results.get("setup")
    if old is not None and old != setup:
        differ = sorted(k for k in set(old) | set(setup) if old.get(k) != setup.get(k))
        detail = "; ".join(f"{k}: file {old.get(k)!r}, now {setup.get(k)!r}" for k in differ)
        raise SystemExit(
            f"--results {path} was written with other settings ({detail}). Rerun with the file's settings to "
            "resume it, or pass another --results path to start a new table."
        )


# ------------------------------------------------------------------------------------------ models
class ConvTeacher(nn.Module):
    """The distillation teacher: a small VGG-style convnet for 28x28x1 images (logits out)."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *conv(1, w),
            *conv(w, w),
            nn.MaxPool2d(2),  # 14x14
            *conv(w, 2 * w),
            *conv(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 7x7
            *conv(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class TeacherClassifier(DigitsClassifier):
    """:class:`DigitsClassifier`'s training loop around :class:`ConvTeacher` (same optimizer and schedule)."""

    def __init__(self, lr: float) -> None:
        super().__init__(lr=lr, embed_dim=32, depth=1, num_heads=1, image_size=28, in_chans=1)
        self.model = ConvTeacher()


def new_classifier(args: argparse.Namespace, model_name: str = "vit_tiny_patch16_224") -> DigitsClassifier:
    return DigitsClassifier(
        model_name=model_name,
        lr=args.lr,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.num_heads,
        image_size=28,
        in_chans=1,
    )


def deit_from_base(base: DigitsClassifier, args: argparse.Namespace) -> DigitsClassifier:
    """A timm DeiT-distilled student holding the base ViT's weights: the distillation token and its
    position start as copies of the class token's, ``head_dist`` as a copy of ``head``."""
    deit = new_classifier(args, "deit_tiny_distilled_patch16_224")
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    pos = state["pos_embed"]
    state["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
    state["dist_token"] = state["cls_token"].clone()
    state["head_dist.weight"], state["head_dist.bias"] = state["head.weight"].clone(), state["head.bias"].clone()
    deit.model.load_state_dict(state)
    return deit


def copy_classifier(base: DigitsClassifier, args: argparse.Namespace) -> DigitsClassifier:
    clone = new_classifier(args)
    clone.model.load_state_dict(base.model.state_dict())
    return clone


def model_size(model: nn.Module) -> dict[str, float]:
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return {"params": sum(p.numel() for p in model.parameters()), "size_mb": buffer.tell() / 1e6}


class Study:
    """Trains what the cells need, lazily, and caches base models on disk."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data = FashionMNISTDataModule(
            root=args.data_root, batch_size=args.train_batch_size, train_subset=args.train_subset
        )
        self.data.setup("fit")
        loader = torch.utils.data.DataLoader(self.data.test_set, batch_size=500)
        self.test_batches = list(loader)[:2] if args.fast else list(loader)
        self.test_images = sum(len(b[1]) for b in self.test_batches)
        self.bases: dict[int, DigitsClassifier] = {}
        self.teacher: Optional[nn.Module] = None
        self.cache = Path(args.cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)

    def trainer(self, epochs: int, callbacks: list[Any] = ()) -> L.Trainer:
        # --fast: 5 of the subset's 8 batches: more than PruningSchedule's gradient_batches (4), or Taylor never prunes
        quick = dict(limit_train_batches=5) if self.args.fast else {}
        return L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            precision=self.args.precision,
            callbacks=list(callbacks),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            **quick,
        )

    def accuracy(self, model: nn.Module) -> float:
        return 100 * measure_accuracy(model, self.test_batches)

    def base(self, seed: int) -> DigitsClassifier:
        if seed in self.bases:
            return self.bases[seed]
        path = self.cache / f"base_{base_fingerprint(self.args)}_seed{seed}.pt"
        lock = path.with_name(path.name + ".lock")
        while not path.is_file() and lock.is_file() and _process_alive(lock.read_text().strip()):
            print(
                f"  base seed {seed}: process {lock.read_text().strip()} is training it ({lock}); waiting", flush=True
            )
            time.sleep(30)
        module = new_classifier(self.args)
        if path.is_file():
            module.model.load_state_dict(torch.load(path, weights_only=True))
            print(f"  base seed {seed}: loaded {path}", flush=True)
        else:
            start = time.perf_counter()
            lock.write_text(str(os.getpid()))  # another process of this study waits instead of training it twice
            try:
                L.seed_everything(seed, verbose=False)
                module = new_classifier(self.args)
                self.trainer(self.args.epochs).fit(module, self.data)
                partial = path.with_name(path.name + ".partial")
                torch.save(module.model.state_dict(), partial)
                os.replace(partial, path)
            finally:
                lock.unlink(missing_ok=True)
            seconds = time.perf_counter() - start
            images = len(self.data.train_set) * self.args.epochs
            print(
                f"  base seed {seed}: trained in {seconds:.0f} s ({images / seconds:.0f} img/s), saved {path}",
                flush=True,
            )
        module.model.eval()
        self.bases[seed] = module
        return module

    def trained_teacher(self) -> nn.Module:
        """The convnet teacher, trained once (seed 0) and cached like the bases."""
        if self.teacher is None:
            path = self.cache / f"teacher_conv_{base_fingerprint(self.args)}_{self.args.teacher_epochs}ep.pt"
            module = TeacherClassifier(lr=self.args.lr)
            if path.is_file():
                module.model.load_state_dict(torch.load(path, weights_only=True))
                print(f"  teacher: loaded {path}", flush=True)
            else:
                start = time.perf_counter()
                L.seed_everything(0, verbose=False)
                module = TeacherClassifier(lr=self.args.lr)
                self.trainer(self.args.teacher_epochs).fit(module, self.data)
                partial = path.with_name(path.name + ".partial")
                torch.save(module.model.state_dict(), partial)
                os.replace(partial, path)
                print(f"  teacher: trained in {time.perf_counter() - start:.0f} s, saved {path}", flush=True)
            self.teacher = _frozen_copy(module.model)
        return self.teacher

    def run(self, recipe: StudyRecipe, seed: int) -> tuple[nn.Module, dict[str, Any]]:
        """The recipe's model for this seed and extra facts (swap-only accuracy for Nyström)."""
        extra: dict[str, Any] = {}
        if recipe.from_scratch:  # the vanilla base's run (same seed, init, data order, epochs, lr) plus the teacher
            L.seed_everything(seed, verbose=False)
            student = new_classifier(self.args)
            settings = {"soft": DISTIL_SOFT, "hard": DISTIL_HARD}[recipe.distil or "soft"]
            teacher = DistillationTeacher(_frozen_copy(self.trained_teacher()), **settings)
            self.trainer(self.args.epochs, [teacher]).fit(student, self.data)
            return student.model.eval(), extra
        base = self.base(seed)
        if recipe.name == VANILLA:
            return base.model, extra
        if not recipe.fine_tuned:  # PTQ of the base
            model = _frozen_copy(base.model)
            calibration = next(iter(self.data.train_dataloader()))[0]
            quantize_model(model, recipe.quantize, calibration_inputs=[calibration])
            return model, extra
        if recipe.nystrom is not None:
            from lightning_vitcompress import swap_attention

            swapped = _frozen_copy(base.model)
            swap_attention(swapped, recipe.nystrom)
            extra["swap_only_top1"] = self.accuracy(swapped)
        L.seed_everything(seed, verbose=False)
        student = deit_from_base(base, self.args) if recipe.distil == "deit" else copy_classifier(base, self.args)
        student.hparams.lr = self.args.fine_tune_lr
        student.model.train()
        callbacks: list[Any] = []
        if recipe.prune is not None:
            callbacks.append(PruningSchedule(recipe.prune, importance=recipe.importance))
        if recipe.nystrom is not None:
            callbacks.append(NystromSwap(num_landmarks=recipe.nystrom))
        if recipe.merge:
            callbacks.append(TokenMerging(**MERGE_FASHION))
        if recipe.distil is not None:
            settings = {"soft": DISTIL_SOFT, "hard": DISTIL_HARD, "deit": dict(mode="deit")}[recipe.distil]
            callbacks.append(DistillationTeacher(_frozen_copy(self.trained_teacher()), **settings))
        if recipe.quantize:
            callbacks.append(QuantizeOnFit(recipe.quantize))
        self.trainer(self.args.fine_tune_epochs, callbacks).fit(student, self.data)
        check_applied(recipe, student.model, base.model)
        return student.model, extra


def check_applied(recipe: StudyRecipe, model: nn.Module, base: nn.Module) -> None:
    """Refuse to record a cell whose technique silently did nothing (checked through structure, not outputs)."""
    from lightning_vitcompress import NystromAttention

    params, base_params = (sum(p.numel() for p in m.parameters()) for m in (model, base))
    if recipe.prune is not None and params > (1 - recipe.prune / 2) * base_params:
        raise RuntimeError(
            f"{recipe.name}: the model kept {params:,} of {base_params:,} parameters; pruning did not act."
        )
    if recipe.nystrom is not None and not any(isinstance(m, NystromAttention) for m in model.modules()):
        raise RuntimeError(f"{recipe.name}: no NystromAttention block in the fine-tuned model; the swap did not act.")


def _process_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def base_fingerprint(args: argparse.Namespace) -> str:
    """Short hash of what the base model depends on: a cache from other settings is never reused."""
    import hashlib

    setup = setup_of(args)
    keys = ("model", "train_subset", "val_size", "epochs", "lr", "batch_size", "precision", "augment", "fast")
    return hashlib.sha256(json.dumps({k: setup[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:10]


def _frozen_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cpu().eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ accuracy run
def order_of_work(recipes: list[StudyRecipe], seeds: int) -> list[tuple[StudyRecipe, int]]:
    """Seed by seed, in table order, each seed's distillation cells last (they wait for the teacher)."""
    work = []
    for seed in range(seeds):
        work += [(r, seed) for r in recipes if not r.needs_teacher]
        work += [(r, seed) for r in recipes if r.needs_teacher]
    return work


def accuracy_run(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    results = load_results(path)
    setup = setup_of(args)
    check_setup(results, setup, path)
    results.setdefault("setup", setup)
    results.setdefault("cells", [])
    unknown = sorted(set(args.recipes or []) - {r.name for r in RECIPES})
    if unknown:
        raise SystemExit(f"--recipes {unknown}: no such row; the rows are {[r.name for r in RECIPES]}.")
    # the vanilla row and the control always run: every other row is paired with one of them
    recipes = [r for r in RECIPES if not args.recipes or r.name in args.recipes or r.name in (VANILLA, CONTROL)]
    work = [(r, s) for r, s in order_of_work(recipes, args.seeds) if find_cell(results, r.name, s) is None]
    print(f"{len(work)} cell(s) to run, {len(results['cells'])} already in {path}", flush=True)
    if not work:
        return results
    study = Study(args)
    results["setup"]["test_images"] = study.test_images if args.fast else 10000
    for recipe, seed in work:
        if recipe.needs_teacher and "teacher" not in results:
            teacher = study.trained_teacher()
            results["teacher"] = {
                "model": "ConvTeacher",
                "epochs": args.teacher_epochs,
                "seed": 0,
                "params": sum(p.numel() for p in teacher.parameters()),
                "top1": study.accuracy(teacher),
            }
            write_results(path, results)
            print(f"  teacher: {results['teacher']}", flush=True)
        elif recipe.needs_teacher and study.teacher is None:
            retrained = study.accuracy(study.trained_teacher())  # the cache may be gone: it must be the same teacher
            if abs(retrained - results["teacher"]["top1"]) > 0.05:
                raise SystemExit(
                    f"The teacher trained now reaches {retrained:.2f}% but the JSON's cells were taught by one of "
                    f"{results['teacher']['top1']:.2f}%: not the same teacher. Restore its cache ({args.cache_dir}) "
                    "or start a new results file."
                )
        start = time.perf_counter()
        model, extra = study.run(recipe, seed)
        top1 = study.accuracy(model)
        trained = args.epochs + (args.fine_tune_epochs if recipe.fine_tuned else 0)
        control_name = (
            None if recipe.name == VANILLA else (CONTROL if recipe.fine_tuned and not recipe.control else VANILLA)
        )
        if recipe.control:
            control_name = None
        cell = {
            "recipe": recipe.name,
            "seed": seed,
            "epochs": trained,
            "fine_tune_epochs": args.fine_tune_epochs if recipe.fine_tuned else 0,
            "top1": top1,
            "control": control_name,
            **model_size(model),
            **extra,
            "seconds": round(time.perf_counter() - start, 1),
        }
        results["cells"].append(cell)
        write_results(path, results)
        print(
            f"  [{time.strftime('%H:%M:%S')}] seed {seed} {recipe.name}: {top1:.2f}% ({cell['seconds']:.0f} s)",
            flush=True,
        )
    return results


# ------------------------------------------------------------------------------------------ speed
def speed_run(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """The ViT-B/16 / DeiT-B scale columns for these recipes (paper_table.py's measurement), into the JSON."""
    import paper_table as pt

    results = load_results(path)
    speed_args = pt.parse_args(
        ["--rounds", str(args.rounds), "--min-run-time", str(args.min_run_time)]
        + (["--fast"] if args.fast else [])
        + (["--no-reference"] if args.no_reference else [])
    )
    rows, names = [], {}
    for recipe in RECIPES:
        speed_recipe = pt.Recipe(
            recipe.name,
            family="deit" if recipe.distil == "deit" else "vit",
            prune=recipe.prune,
            nystrom=recipe.speed_landmarks,
            quantize=recipe.quantize,
            merge=recipe.merge,
        )
        signature = dataclass_key(speed_recipe)
        if signature not in names:  # distillation rows run the vanilla model: measure each model once
            names[signature] = recipe.name
            rows.append(speed_recipe)
    rows.sort(key=lambda r: r.method != VANILLA)
    load = round(os.getloadavg()[0], 1)  # other jobs on the machine distort timings: say how busy it was
    models, info = pt.speed_models(rows, speed_args)
    measured = pt.measure_speed(models, speed_args)
    conditions = measured.pop("conditions")
    by_recipe: dict[str, Any] = {}
    for recipe in RECIPES:
        speed_recipe = next(
            r
            for r in rows
            if dataclass_key(r)
            == dataclass_key(
                pt.Recipe(
                    recipe.name,
                    family="deit" if recipe.distil == "deit" else "vit",
                    prune=recipe.prune,
                    nystrom=recipe.speed_landmarks,
                    quantize=recipe.quantize,
                    merge=recipe.merge,
                )
            )
        )
        name, size = pt.speed_architecture(speed_recipe, speed_args)
        key = f"{name}@{size}|{speed_recipe.method}"
        base_key = f"{speed_args.speed_models[0]}@{speed_args.speed_image_size}|{VANILLA}"
        reference = measured.get(f"{speed_args.speed_models[0]}@{speed_args.speed_image_size}|{pt.REFERENCE}")
        m, base = measured[key], measured[base_key]
        by_recipe[recipe.name] = {
            "speed_model": f"{name} @{size}",
            "params_m": m["params"] / 1e6,
            "size_mb": m["size_mb"],
            "macs_g": None if info[key]["macs"] is None else info[key]["macs"] / 1e9,
            "cpu_images_per_s": m["cpu_images_per_s"],
            "cpu_speedup": m["cpu_images_per_s"] / base["cpu_images_per_s"],
            "cpu_speedup_vs_bf16_compiled": None
            if reference is None
            else m["cpu_images_per_s"] / reference["cpu_images_per_s"],
            "size_ratio": m["size_mb"] / base["size_mb"],
        }
    results["speed"] = {
        "rows": by_recipe,
        "conditions": conditions,
        "models": speed_args.speed_models,
        "image_size": speed_args.speed_image_size,
        "batch_size": speed_args.batch_size,
        "threads": speed_args.threads,
        "load_average": load,
    }
    write_results(path, results)
    return results


def dataclass_key(recipe: Any) -> tuple:
    return tuple(v for k, v in asdict(recipe).items() if k != "method")


# ------------------------------------------------------------------------------------------ table
def _mean_std(values: list[float]) -> Optional[tuple[float, Optional[float]]]:
    """Mean and sample std; the std is None for one value (no spread to report)."""
    if not values:
        return None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _pm(value: Optional[tuple[float, Optional[float]]], signed: bool = False) -> str:
    if value is None:
        return "n/a"
    mean = f"{value[0]:+.2f}" if signed else f"{value[0]:.2f}"
    return f"{mean} (1 seed)" if value[1] is None else f"{mean} ± {value[1]:.2f}"


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per recipe: top-1 and control over seeds, and the paired Δ for the seeds holding both."""
    cells = results.get("cells", [])
    speed = results.get("speed", {}).get("rows", {})
    rows = []
    for recipe in RECIPES:
        mine = sorted((c for c in cells if c["recipe"] == recipe.name), key=lambda c: c["seed"])
        deltas, controls = [], []
        for cell in mine:
            control = find_cell(results, cell["control"], cell["seed"]) if cell["control"] else None
            if control is not None:
                controls.append(control["top1"])
                deltas.append((cell["seed"], cell["top1"] - control["top1"]))
        swap = [c["swap_only_top1"] for c in mine if "swap_only_top1" in c]
        rows.append(
            {
                "recipe": recipe.name,
                "seeds": [c["seed"] for c in mine],
                "top1": _mean_std([c["top1"] for c in mine]),
                "control": mine[0]["control"] if mine else None,
                "control_top1": _mean_std(controls),
                "delta": _mean_std([d for _, d in deltas]),
                "delta_per_seed": deltas,
                "swap_only": _mean_std(swap),
                "params": mine[0]["params"] if mine else None,
                "size_mb": mine[0]["size_mb"] if mine else None,
                "epochs": mine[0]["epochs"] if mine else None,
                # a model trained from scratch with a teacher is the vanilla architecture: its speed
                "speed": speed.get(recipe.name) or (speed.get(VANILLA) if recipe.from_scratch else None),
            }
        )
    return rows


def markdown(results: dict[str, Any], rows: list[dict[str, Any]], target_seeds: int = 3) -> str:
    setup = results["setup"]
    model = setup["model"]
    teacher = results.get("teacher")
    speed = results.get("speed")
    test_set = (
        "the full 10,000-image test set"
        if setup["test_images"] == 10000
        else f"{setup['test_images']} test images (a smoke run)"
    )
    speed_models = " / ".join(speed.get("models", ["ViT-B/16", "DeiT-B"])) if speed else ""
    lines = [
        f"**Fashion-MNIST, every recipe against a control trained as long.** Model: timm ViT, {model['embed_dim']} "
        f"wide, {model['depth']} blocks, {model['num_heads']} heads, patch {model['patch_size']} on "
        f"{model['image_size']}x{model['image_size']}x{model['in_chans']} (49 patches + class token), fp32 "
        f"({setup['precision']}), trained here. Base: {setup['epochs']} epochs from scratch on a fixed "
        f"{setup['train_subset']:,}-image training subset (flip + crop augmentation), lr {setup['lr']}; each "
        f"recipe and its control: {setup['fine_tune_epochs']} more epochs from the base at lr "
        f"{setup['fine_tune_lr']} (int8 PTQ: none, paired with the base; the rows '..., from scratch': the "
        f"base's own {setup['epochs']}-epoch run from the same seed with the teacher added, paired with the base). "
        "Top-1 on "
        f"{test_set}; mean ± std over the seeds listed; Δ = recipe - control of "
        f"the same seed. Teacher for the distillation rows: {setup['teacher']}"
        + (f", {teacher['params'] / 1e6:.2f}M parameters, test top-1 {teacher['top1']:.2f}%." if teacher else ".")
        + (
            f" Speed, size, MACs: the same recipe on {speed_models} at {speed.get('image_size', 224)}, random "
            f"weights, batch {speed['batch_size']}, {speed['threads']} threads of "
            f"{speed['conditions'].get('cpu_name')}, one interleaved run (`--speed-only`, load average "
            f"{speed.get('load_average', 'n/a')} when it started), speedup against the fp32 eager ViT."
            if speed
            else " Speed columns: n/a until `--speed-only` has run."
        ),
        "",
        "| method | seeds | top-1 (%) | control | control top-1 (%) | Δ vs control (pt) | Δ per seed | "
        "params (small) | ViT-B/16 scale: size (MB) | MACs (G) | CPU speedup | vs bf16 compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        top1 = _pm(r["top1"]) + (f" (swap only: {_pm(r['swap_only'])})" if r["swap_only"] else "")
        per_seed = ", ".join(f"{s}: {d:+.2f}" for s, d in r["delta_per_seed"]) or "n/a"
        s = r["speed"] or {}
        lines.append(
            f"| {r['recipe']} | {','.join(map(str, r['seeds'])) or 'none yet'} | {top1} | {r['control'] or '-'} "
            f"| {_pm(r['control_top1'])} | {_pm(r['delta'], signed=True)} | {per_seed} "
            f"| {_millions(r['params'])} "
            f"| {_f(s.get('size_mb'), 1)} | {_f(s.get('macs_g'), 2)} | {_x(s.get('cpu_speedup'))} "
            f"| {_x(s.get('cpu_speedup_vs_bf16_compiled'))} |"
        )
    missing = [
        f"{r['recipe']} (has seeds {','.join(map(str, r['seeds'])) or 'none'})"
        for r in rows
        if len(r["seeds"]) < target_seeds
    ]
    if missing:
        lines.append(
            f"\n**Incomplete** (fewer than {target_seeds} seeds; the run resumes): " + "; ".join(missing) + "."
        )
    return "\n".join(lines)


def _millions(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value / 1e6:.2f}M"


def _f(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _x(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def plot(rows: list[dict[str, Any]], path: Path, test_images: Optional[int] = None) -> Optional[Path]:
    """Paired Δ vs control per recipe: each seed a dot, the mean a bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shown = [r for r in rows if r["delta_per_seed"]]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.5))
    for i, r in enumerate(shown):
        ax.barh(i, r["delta"][0], color="tab:blue" if r["delta"][0] >= 0 else "tab:red", alpha=0.4)
        ax.scatter([d for _, d in r["delta_per_seed"]], [i] * len(r["delta_per_seed"]), color="black", s=12, zorder=3)
    ax.set_yticks(range(len(shown)), [f"{r['recipe']} (n={len(r['delta_per_seed'])})" for r in shown], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_xlabel("top-1 Δ vs a control trained as long (pt); dots: seeds, bar: mean")
    images = f"{test_images:,}" if test_images else "?"
    ax.set_title(f"Fashion-MNIST ({images} test images): each recipe against its own control", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def update_readme(table: str, readme: Path = ROOT / "README.md") -> None:
    """Replace the README's block between the fashion-mnist-table markers."""
    start_marker, end_marker = "<!-- fashion-mnist-table -->", "<!-- /fashion-mnist-table -->"
    text = readme.read_text()
    if start_marker not in text:
        raise SystemExit(f"{readme}: no {start_marker} ... {end_marker} block to replace; add the two markers.")
    block = (
        f"{start_marker}\nGenerated from `docs/results/fashion_mnist.json` by `python examples/paper_table.py "
        f"--dataset fashion-mnist --table-only --update-readme`:\n\n{table}\n\n"
        f"![paired deltas](docs/results/fashion_mnist.png)\n{end_marker}"
    )
    start, end = text.index(start_marker), text.index(end_marker) + len(end_marker)
    readme.write_text(text[:start] + block + text[end:])
    print(f"updated {readme}")


# ------------------------------------------------------------------------------------------ main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["fashion-mnist"], default="fashion-mnist")
    p.add_argument("--data-root", default="data", help="holds FashionMNIST/raw/ (unpacked there from the apt package)")
    p.add_argument(
        "--results", default=None, help=f"the JSON (default {RESULTS.relative_to(ROOT)}; --fast: in --output-dir)"
    )
    p.add_argument("--cache-dir", default=None, help="base checkpoints (default outputs/fashion_mnist_cache)")
    p.add_argument("--output-dir", default="outputs/fashion_mnist")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--recipes", nargs="*", default=None, help="only these rows (names as in the table)")
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=15, help="base training epochs")
    p.add_argument("--fine-tune-epochs", type=int, default=3, help="every recipe and its control")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--fine-tune-lr", type=float, default=5e-4)
    p.add_argument("--train-batch-size", type=int, default=128)
    p.add_argument("--precision", default="32-true", help="Lightning precision of training, e.g. bf16-mixed")
    p.add_argument("--teacher-epochs", type=int, default=15, help="training epochs of the convnet teacher")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="training threads (1: on a shared machine 2 threads wasted 5x the CPU time, see the docstring)",
    )
    p.add_argument("--speed-only", action="store_true", help="measure the ViT-B/16-scale columns into the JSON")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--no-reference", action="store_true", help="--speed-only: skip the bf16-compiled reference")
    p.add_argument("--table-only", action="store_true", help="no training: table and plot from the JSON")
    p.add_argument(
        "--bases-only",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help="only train and cache these seeds' base models (e.g. in a second "
        "process while the main run works); the main run loads them from --cache-dir",
    )
    p.add_argument(
        "--update-readme", action="store_true", help="write the table into README.md, the plot to docs/results/"
    )
    p.add_argument(
        "--fast", action="store_true", help="smoke run: 1 seed, 3 batches per epoch, 1000 test images, 1-epoch teacher"
    )
    return p


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.fast:
        args.seeds, args.epochs, args.fine_tune_epochs, args.train_subset = 1, 1, 1, 1024
        args.teacher_epochs = 1
    if args.update_readme and args.fast:
        raise SystemExit("--update-readme with --fast would put a smoke run's numbers in the README; drop --fast.")
    output = Path(args.output_dir)
    path = Path(args.results) if args.results else (output / "fashion_mnist.json" if args.fast else RESULTS)
    args.cache_dir = args.cache_dir or str(output / "cache" if args.fast else Path("outputs") / "fashion_mnist_cache")
    torch.set_num_threads(args.threads)
    if args.bases_only is not None:
        study = Study(args)
        for seed in args.bases_only:
            study.base(seed)
        return {}
    if args.speed_only:
        results = speed_run(args, path)
    elif args.table_only:
        results = load_results(path)
        if not results:
            raise SystemExit(f"--table-only: {path} does not exist yet; run without --table-only first.")
    else:
        results = accuracy_run(args, path)
    rows = table_rows(results)
    table = markdown(results, rows, target_seeds=args.seeds)
    print("\n" + table)
    output.mkdir(parents=True, exist_ok=True)
    (output / "fashion_mnist.md").write_text(table + "\n")
    png = plot(
        rows, PLOT if args.update_readme else output / "fashion_mnist.png", results.get("setup", {}).get("test_images")
    )
    if args.update_readme:
        update_readme(table)
    print(f"results: {path}; plot: {png}")
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
