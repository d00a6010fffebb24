"""The callbacks take their config dataclass's fields from the config itself (``_options.takes_config``)."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
import torch

from lightning_vitcompress import DistillationTeacher, ExportOnFit, NystromSwap, PruningSchedule, TokenMerging
from lightning_vitcompress._options import _args_section, _entry_names
from lightning_vitcompress.functional import DistillConfig, ExportConfig, NystromConfig, PruneConfig, TokenMergingConfig

CALLBACKS = [
    (PruningSchedule, PruneConfig, (), ()),
    (NystromSwap, NystromConfig, (), ()),
    (TokenMerging, TokenMergingConfig, (), ()),
    (ExportOnFit, ExportConfig, ("path",), ("check", "opset_version")),
    (DistillationTeacher, DistillConfig, ("teacher",), ()),
]
IDS = [callback.__name__ for callback, *_ in CALLBACKS]


@pytest.mark.parametrize(("callback", "config", "required", "config_only"), CALLBACKS, ids=IDS)
def test_signature_lists_every_config_field_with_its_default_and_type(callback, config, required, config_only):
    parameters = inspect.signature(callback).parameters
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        if field.name in config_only:
            assert field.name not in parameters
            continue
        parameter = parameters[field.name]
        if not (callback is ExportOnFit and field.name == "format"):  # None: from the path's suffix
            assert parameter.default == field.default
            assert parameter.annotation == hints[field.name]
    assert parameters["config"].default is None
    assert [name for name, p in parameters.items() if p.default is inspect.Parameter.empty] == list(required)
    assert all(p.annotation is not inspect.Parameter.empty for p in parameters.values())


@pytest.mark.parametrize(("callback", "config", "required", "config_only"), CALLBACKS, ids=IDS)
def test_docstring_documents_every_keyword_in_signature_order(callback, config, required, config_only):
    _, entries, _ = _args_section(callback.__doc__)
    documented = [_entry_names(entry) for entry in entries]
    names = list(inspect.signature(callback).parameters)
    assert sorted(n for entry in documented for n in entry if n in names) == sorted(names)
    firsts = [min(names.index(n) for n in entry if n in names) for entry in documented]
    assert firsts == sorted(firsts)


def _build(callback, **options):
    if callback is ExportOnFit:
        return callback("model.pt2", **options)
    if callback is DistillationTeacher:
        return callback(torch.nn.Linear(2, 2), **options)
    return callback(**options)


def test_keywords_and_config_give_the_same_config_and_conflict_loudly():
    assert PruningSchedule(0.3, prune_heads=True).config == PruneConfig(0.3, prune_heads=True)
    assert NystromSwap(32, 2).config == NystromConfig(num_landmarks=32)
    assert NystromSwap(32, 2).swap_epoch == 2
    assert TokenMerging(4, 1, [0]).config == TokenMergingConfig(r=4, blocks=[0])
    assert DistillationTeacher(torch.nn.Linear(2, 2), "hard", 0.3).config == DistillConfig("hard", 0.3)
    assert ExportOnFit("model.onnx").config.format == "onnx"
    for callback, config in [(PruningSchedule, PruneConfig()), (NystromSwap, NystromConfig())]:
        assert _build(callback, config=config).config is config
    with pytest.raises(ValueError, match=r"PruningSchedule\(config=..., pruning_ratio=0.3\): pass the options either"):
        PruningSchedule(0.3, config=PruneConfig())
    with pytest.raises(TypeError, match=r"NystromSwap.__init__\(\) got an unexpected keyword argument 'landmarks'"):
        NystromSwap(landmarks=8)
