"""Where the project's data files live, from a clone and from an installed wheel alike.

The repository keeps ``deployments/`` and ``infra/`` at its top level; the wheel installs
them as the packages ``driftloop.deployments`` and ``driftloop.infra`` (package data), and
an editable install maps those names to the top-level folders. Reading through the
package names is what makes both work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from driftloop.errors import DriftloopError


def package_file(package: str, *parts: str) -> Path:
    """Path of a file shipped in ``driftloop.<package>`` (``deployments`` or ``infra``)."""
    found = importlib.util.find_spec(f"driftloop.{package}")
    if found is None or not found.submodule_search_locations:
        raise DriftloopError(f"driftloop.{package} is missing from this installation; reinstall driftloop")
    return Path(next(iter(found.submodule_search_locations))).joinpath(*parts)


def project_root() -> Path:
    """The clone that holds ``prefect.yaml`` (what ``prefect deploy`` and the demo's
    workers run from). An installed wheel has none: say so instead of failing later."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "prefect.yaml").is_file():
        raise DriftloopError(
            "this needs a clone of the driftloop repository (its prefect.yaml and flows/); "
            "an installed wheel runs `driftloop demo` without --loop, and deploys from a clone"
        )
    return root
