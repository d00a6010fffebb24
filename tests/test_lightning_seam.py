"""The seam to Lightning's private API (``lightning_vitcompress._lightning``), checked against the installed Lightning.

Each seam function gets a test that fails if what it reads moves or changes
meaning: a tiny fit of a two-layer model, with a probe callback asking the seam
at the hook where the package asks it, compared with what the public API says
once Lightning fills it in. The last test keeps Lightning's private attributes
out of every other module.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.strategies.strategy import Strategy, _ForwardRedirection
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_vitcompress
from lightning_vitcompress._lightning import (
    WRAPPED_MARKER,
    current_hook_name,
    fit_ckpt_path,
    rewrap_and_setup_optimizers,
    rich_display,
    train_dataloaders,
    val_dataloaders,
    wrap_training_step,
)


class TwoLayers(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=generator), torch.arange(n) % 2), batch_size=4)


class Probe(Callback):
    """Keeps ``ask(trainer, pl_module, hook)`` at the first call of each of :attr:`HOOKS`, by hook name."""

    HOOKS = ("setup", "on_train_start", "on_train_epoch_start", "on_train_batch_end", "on_train_end")

    def __init__(self, ask: Callable[[pl.Trainer, pl.LightningModule, str], Any]) -> None:
        self.ask = ask
        self.seen: dict[str, Any] = {}

    def _see(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hook: str) -> None:
        if hook not in self.seen:
            self.seen[hook] = self.ask(trainer, pl_module, hook)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._see(trainer, pl_module, "setup")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._see(trainer, pl_module, "on_train_start")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._see(trainer, pl_module, "on_train_epoch_start")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._see(trainer, pl_module, "on_train_batch_end")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._see(trainer, pl_module, "on_train_end")


def _trainer(tmp_path: Path, callbacks: list[Callback], **overrides: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    options.update(overrides)
    return pl.Trainer(callbacks=callbacks, **options)


def test_fit_ckpt_path_reads_the_arguments_of_trainer_run(tmp_path: Path) -> None:
    parameters = inspect.signature(pl.Trainer._run).parameters
    assert "ckpt_path" in parameters  # the seam reads this local from the call stack
    path = tmp_path / "first.ckpt"
    first = _trainer(tmp_path, [])
    first.fit(TwoLayers(), _loader())
    first.save_checkpoint(path)

    fresh = Probe(lambda trainer, _, __: (fit_ckpt_path(trainer), trainer.ckpt_path))
    _trainer(tmp_path, [fresh]).fit(TwoLayers(), _loader())
    assert fresh.seen["setup"] == ((None, True), None)

    weights_only = {"weights_only": False} if "weights_only" in parameters else {}
    resumed = Probe(lambda trainer, _, __: (fit_ckpt_path(trainer), trainer.ckpt_path))
    _trainer(tmp_path, [resumed], max_epochs=2).fit(TwoLayers(), _loader(), ckpt_path=path, **weights_only)
    # at setup the public trainer.ckpt_path is not set yet (why the seam exists); the seam already knows
    assert resumed.seen["setup"] == ((str(path), not weights_only), None)
    assert str(resumed.seen["on_train_start"][1]) == str(path)  # what the public attribute says once restored

    stateful = Probe(lambda trainer, _, __: fit_ckpt_path(trainer))
    trainer = _trainer(tmp_path, [stateful], max_epochs=2)
    trainer.ckpt_path = path  # the setter Lightning documents; resolved into _run's ckpt_path
    trainer.fit(TwoLayers(), _loader())
    assert stateful.seen["setup"] == (str(path), True)
    assert fit_ckpt_path(trainer) == (str(path), True)  # outside a fit: trainer.ckpt_path


def test_dataloaders_at_setup_are_the_ones_the_loops_use(tmp_path: Path) -> None:
    train, val = _loader(), _loader(4)
    probe = Probe(
        lambda trainer, _, hook: (
            (train_dataloaders(trainer), val_dataloaders(trainer))
            if hook == "setup"
            else (trainer.train_dataloader, trainer.val_dataloaders)
        )
    )
    _trainer(tmp_path, [probe]).fit(TwoLayers(), train, val)
    assert probe.seen["setup"][0] is train and probe.seen["setup"][1] is val
    assert probe.seen["on_train_start"] == (train, val)  # the public attributes, filled in once the loops start

    class WithLoaders(TwoLayers):  # the module's own *_dataloader methods
        def train_dataloader(self) -> DataLoader:
            return train

        def val_dataloader(self) -> DataLoader:
            return val

    module_probe = Probe(lambda trainer, _, __: (train_dataloaders(trainer), val_dataloaders(trainer)))
    _trainer(tmp_path, [module_probe]).fit(WithLoaders())
    assert module_probe.seen["setup"] == (train, val)

    no_val = Probe(lambda trainer, _, __: val_dataloaders(trainer))
    _trainer(tmp_path, [no_val]).fit(TwoLayers(), train)
    assert no_val.seen["setup"] is None


def test_current_hook_name_is_the_hook_lightning_runs(tmp_path: Path) -> None:
    probe = Probe(lambda _, pl_module, __: current_hook_name(pl_module))
    _trainer(tmp_path, [probe]).fit(TwoLayers(), _loader())
    assert probe.seen == {hook: hook for hook in Probe.HOOKS}


def test_wrap_training_step_is_what_lightning_calls_and_undo_restores(tmp_path: Path) -> None:
    module = TwoLayers()
    calls: list[int] = []

    def step(original: Callable[..., Any], batch: Any, batch_idx: int) -> Any:
        calls.append(batch_idx)
        return original(batch, batch_idx) * 1.0

    undo = wrap_training_step(module, step)
    assert getattr(module.training_step, WRAPPED_MARKER) is True
    _trainer(tmp_path, []).fit(module, _loader())
    assert calls == [0, 1]  # Strategy.training_step looks the step up on the instance
    undo()
    assert "training_step" not in module.__dict__ and module.training_step.__func__ is TwoLayers.training_step

    own = module.__dict__["training_step"] = lambda *args: None  # someone else's instance attribute comes back
    wrap_training_step(module, step)()
    assert module.__dict__["training_step"] is own

    # under DDP the step is looked up by name inside the wrapper's forward, so the instance attribute wins there too
    assert '"training_step"' in inspect.getsource(Strategy.training_step)
    assert "getattr(original_module, method_name)" in inspect.getsource(_ForwardRedirection.__call__)


def test_rich_display_is_the_live_bar_and_its_console(tmp_path: Path) -> None:
    bar = RichProgressBar()
    assert rich_display(bar) == (None, None)  # before the fit: no display yet
    probe = Probe(lambda _, __, ___: rich_display(bar))
    _trainer(tmp_path, [bar, probe], enable_progress_bar=True).fit(TwoLayers(), _loader())
    progress, console = probe.seen["on_train_batch_end"]
    assert progress is bar.progress and progress is not None
    assert console is not None and console is progress.console
    assert rich_display(bar)[0] is None  # stopped after the fit: our bars open their own display


def test_rewrap_and_setup_optimizers_builds_new_optimizers_mid_fit(tmp_path: Path) -> None:
    def rebuild(trainer: pl.Trainer, pl_module: pl.LightningModule, hook: str) -> Any:
        if hook != "on_train_batch_end":
            return None
        before = trainer.optimizers[0]
        pl_module.net[0] = nn.Linear(4, 8)  # parameters replaced, as a structural edit does
        rewrap_and_setup_optimizers(trainer)
        after = trainer.optimizers[0]
        return before is not after, {id(p) for g in after.param_groups for p in g["params"]} == {
            id(p) for p in pl_module.parameters()
        }

    probe = Probe(rebuild)
    _trainer(tmp_path, [probe]).fit(TwoLayers(), _loader())
    assert probe.seen["on_train_batch_end"] == (True, True)


def test_no_lightning_private_attribute_outside_the_seam() -> None:
    owners = r"(trainer|strategy|pl_module|lightning_module|loop|val_loop|fit_loop|epoch_loop|callback|connector)"
    private = re.compile(
        rf"\b{owners}\._[a-z]\w*|_(accelerator|logger|checkpoint|data|callback)_connector\b"
        r"|\b(_data_source|_current_fx_name|_progress_stopped|_console)\b|Trainer\._run\b"
    )
    package = Path(lightning_vitcompress.__file__).parent
    found = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "_lightning.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not found, "Lightning private API outside lightning_vitcompress/_lightning.py:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "name",
    [
        "fit_ckpt_path",
        "train_dataloaders",
        "val_dataloaders",
        "current_hook_name",
        "wrap_training_step",
        "rich_display",
        "rewrap_and_setup_optimizers",
    ],
)
def test_each_seam_function_names_what_it_relies_on(name: str) -> None:
    from lightning_vitcompress import _lightning

    doc = inspect.getdoc(getattr(_lightning, name)) or ""
    assert "Lightning 2.4-2.6" in doc


# ------------------------------------------------------------------ torch: lightning_vitcompress.functional._torch_internals
def test_compiled_call_is_what_module_compile_sets_and_call_runs() -> None:
    from lightning_vitcompress.functional._torch_internals import compiled_call, eager_call, set_compiled_call

    layer, x = nn.Linear(4, 2), torch.randn(3, 4)
    assert compiled_call(layer) is None
    layer.compile()  # compiles lazily, at the first call: nothing is compiled here
    assert compiled_call(layer) is not None
    set_compiled_call(layer, lambda *args, **kwargs: "compiled")
    assert layer(x) == "compiled"  # nn.Module.__call__ runs it instead of forward
    set_compiled_call(layer, None)
    assert compiled_call(layer) is None and torch.equal(layer(x), eager_call(layer)(x))


def test_forward_hook_dicts_hold_every_kind_of_forward_hook() -> None:
    from lightning_vitcompress.functional._torch_internals import FORWARD_HOOK_DICTS

    layer, calls = nn.Linear(4, 2), []
    layer.register_forward_pre_hook(lambda *args: calls.append("pre"))
    layer.register_forward_pre_hook(lambda *args: calls.append("pre, kwargs"), with_kwargs=True)
    layer.register_forward_hook(lambda *args: calls.append("post"), with_kwargs=True, always_call=True)
    layer(torch.randn(1, 4))
    assert len(calls) == 3
    calls.clear()
    for name in FORWARD_HOOK_DICTS:  # what export's _hooks_set_aside does: then no hook runs
        setattr(layer, name, type(getattr(layer, name))())
    layer(torch.randn(1, 4))
    assert not calls


def test_inductor_and_dispatch_internals() -> None:
    import torch._inductor
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_vitcompress.functional import _torch_internals as internals

    assert {"default", "max-autotune"} <= set(internals.inductor_mode_options())
    assert hasattr(internals.inductor_config(), "freezing") and callable(internals.inductor_config().patch)
    assert callable(torch._inductor.aoti_compile_and_package) and callable(torch._inductor.aoti_load_package)
    assert not internals.in_dispatch_mode()
    with FlopCounterMode(display=False):
        assert internals.in_dispatch_mode()
    assert internals.tree_map(lambda v: v * 2, {"a": [1, (2, 3)]}) == {"a": [2, (4, 6)]}
    internals.register_quantized_decomposed_ops()
    assert hasattr(torch.ops.quantized_decomposed, "quantize_per_tensor")


def test_cpu_feature_probes_exist() -> None:
    from lightning_vitcompress.functional import _torch_internals as internals

    assert isinstance(internals.mkldnn_bf16_supported(), bool)
    assert any(hasattr(torch.cpu, name) for name in ("_is_vnni_supported", "_is_amx_tile_supported"))
    assert isinstance(internals.cpu_has_amx_or_vnni(), bool)
