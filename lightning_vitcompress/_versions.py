"""The dependency floors, checked when the package is imported.

An older ``timm``, ``torch-pruning`` or ``torchao`` fails deep inside a call (a
missing module or attribute) instead of saying what to upgrade. This check runs
first and names the package, the version installed and the version needed.

The floors are read from the installed distribution's metadata, so
``pyproject.toml`` stays the one place they are written. A dependency that is
not installed is left to fail at its own import (``lightning_vitcompress.functional``
works without Lightning); a source tree that is not installed is not checked.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Optional

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

DISTRIBUTION = "lightning-vitcompress"


def declared_requirements() -> list[Requirement]:
    """The core dependencies (no extras) the installed distribution declares; none if it is not installed."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    requirements = [Requirement(line) for line in requires]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def check_versions(
    requirements: Optional[list[Requirement]] = None,
    version_of: Callable[[str], str] = metadata.version,
) -> None:
    """Raise ``ImportError`` naming the first installed dependency older than its floor.

    Args:
        requirements: what to check; the installed distribution's core dependencies by default.
        version_of: ``name -> installed version`` (``importlib.metadata.version``).
    """
    for requirement in declared_requirements() if requirements is None else requirements:
        if not requirement.specifier:
            continue
        try:
            installed = version_of(requirement.name)
        except metadata.PackageNotFoundError:
            continue
        try:
            ok = requirement.specifier.contains(Version(installed), prereleases=True)
        except InvalidVersion:
            continue  # a version string packaging cannot read: nothing sure to say
        if not ok:
            needed = f"{requirement.name}{requirement.specifier}"
            raise ImportError(
                f"{DISTRIBUTION} needs {needed}, but {requirement.name} {installed} is installed. "
                f'Upgrade it: pip install "{needed}"'
            )


check_versions()
