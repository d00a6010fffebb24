"""The import-time floor check: an old dependency is named with the version needed."""

from __future__ import annotations

from importlib import metadata

import pytest
from packaging.requirements import Requirement

from lightning_vitcompress._versions import check_versions, declared_requirements

FLOORS = [Requirement("timm>=1.0.23"), Requirement("torch>=2.14"), Requirement("numpy")]


def versions(**installed: str):
    def version_of(name: str) -> str:
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    return version_of


def test_an_old_dependency_is_named_with_the_version_needed():
    with pytest.raises(ImportError) as err:
        check_versions(FLOORS, versions(timm="1.0.15", torch="2.14.1", numpy="2.0"))
    assert str(err.value) == (
        'lightning-vitcompress needs timm>=1.0.23, but timm 1.0.15 is installed. Upgrade it: pip install "timm>=1.0.23"'
    )


def test_floors_met_local_builds_and_nightlies_pass():
    check_versions(FLOORS, versions(timm="1.0.23", torch="2.14.1+cu130", numpy="1.23.5"))
    check_versions(FLOORS, versions(timm="1.1.0.dev0", torch="2.15.0.dev20270101+cpu", numpy="3.0"))


def test_a_missing_or_unreadable_dependency_is_left_to_its_own_import():
    check_versions(FLOORS, versions(torch="2.14.1"))  # no timm: the functional layer's own import says so
    check_versions(FLOORS, versions(timm="not-a-version", torch="2.14.1"))


def test_the_floors_are_read_from_the_installed_metadata():
    names = {r.name.replace("_", "-").lower() for r in declared_requirements()}
    assert {
        "torch",
        "timm",
        "torchao",
        "torch-pruning",
        "lightning",
        "torchmetrics",
    } <= names
    assert not names & {
        "onnx",
        "openvino",
        "transformers",
        "pytest",
    }  # extras are not checked at import
    check_versions()  # this environment meets them
