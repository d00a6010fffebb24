"""LightningCLI entry point: every callback configurable from YAML.

    python examples/cli.py fit --config examples/configs/benchmark.yaml
    python examples/cli.py fit --config examples/configs/pipeline.yaml --trainer.max_epochs=3

The configs list callbacks under ``trainer.callbacks`` with ``class_path`` and
``init_args``; the model and data are the offline digits classifier and data module.
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch.cli import LightningCLI

from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule


def main(args: Optional[list[str]] = None, run: bool = True) -> LightningCLI:
    """``run=False`` only parses and instantiates (then ``args`` holds no subcommand)."""
    return LightningCLI(
        DigitsClassifier,
        DigitsDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
