"""A refactor changes no behaviour: the same seeded compression fits give bit-identical models before and after.

Runs three small, seeded, deterministic fits on scikit-learn's digits (pruning with Taylor importance +
distillation + int8; Nystrom + token merging; a pruning schedule under an accuracy budget) once with the
package as it is in the working tree and once as it was at ``--against`` (checked out into a temporary
git worktree), each in its own process, and compares the compressed models' logits on 32 test images.
Timings would need a quiet machine; identical outputs say more about a refactor and hold on a busy one.

    python benchmarks/same_outputs.py --against ce1ddb0
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_fits(output: str) -> None:
    """The fits, with whichever ``lightning_vitcompress`` is first on ``sys.path``; logits saved to ``output``."""
    import warnings

    import lightning as L
    import torch

    import lightning_vitcompress
    from lightning_vitcompress import DistillationTeacher, NystromSwap, PruningSchedule, QuantizeOnFit, TokenMerging
    from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"  package: {lightning_vitcompress.__file__}", flush=True)
    recipes = {
        "prune taylor + distil + int8": lambda teacher: [
            PruningSchedule(0.5, end_epoch=1, num_steps=2, importance="taylor"),
            DistillationTeacher(teacher),
            QuantizeOnFit("int8_dynamic"),
        ],
        "nystrom + token merging": lambda teacher: [NystromSwap(num_landmarks=4), TokenMerging(r=2)],
        "pruning schedule with a budget": lambda teacher: [
            PruningSchedule(0.5, end_epoch=2, num_steps=3, max_accuracy_drop=50.0)
        ],
    }
    logits = {}
    for name, callbacks in recipes.items():
        L.seed_everything(0, verbose=False)
        model = DigitsClassifier(embed_dim=64, depth=2, num_heads=4)
        teacher = DigitsClassifier(embed_dim=64, depth=2, num_heads=4).model.eval()
        trainer = L.Trainer(
            max_epochs=3,
            limit_train_batches=6,
            limit_val_batches=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
            callbacks=callbacks(teacher),
        )
        data = DigitsDataModule()
        trainer.fit(model, data)
        data.setup("test")
        images = next(iter(data.test_dataloader()))[0][:32]
        with torch.no_grad():
            logits[name] = model.model.eval()(images).float()
    torch.save(logits, output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="the git revision to compare the working tree with")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: the child process's output
    args = parser.parse_args()
    if args.run:
        run_fits(args.run)
        return
    import torch

    with tempfile.TemporaryDirectory() as scratch:
        old_tree = Path(scratch) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.against], check=True)
        try:
            outputs = {}
            for label, tree in ((args.against, old_tree), ("working tree", ROOT)):
                print(f"{label}:", flush=True)
                outputs[label] = str(Path(scratch) / f"{len(outputs)}.pt")
                env = {**os.environ, "PYTHONPATH": str(tree)}
                subprocess.run([sys.executable, __file__, "--run", outputs[label]], env=env, check=True, cwd=scratch)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=True)
        before, after = (torch.load(path) for path in outputs.values())
    print(f"\n{'fit':34} {'logits':>10}  result")
    different = 0
    for name, old in before.items():
        new = after[name]
        same = old.shape == new.shape and torch.equal(old, new)
        different += not same
        verdict = "bit-identical" if same else f"DIFFERENT (max |diff| {(old - new).abs().max():.3g})"
        print(f"{name:34} {tuple(new.shape)!s:>10}  {verdict}")
    sys.exit(1 if different else 0)


if __name__ == "__main__":
    main()
