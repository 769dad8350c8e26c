"""The demo's data: NannyML's synthetic car-loan files, which ship inside the nannyml
package (nothing is downloaded), named by ``demo:`` URIs so deployments carry no machine
paths. Core code: every stage resolves ``demo:`` inputs through here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from driftloop.errors import DriftloopError
from driftloop.resources import package_file

DEMO_SPEC = package_file("deployments", "specs", "car_loan.yaml")
_FILES = {
    "reference": "synthetic_car_loan_reference.csv",
    "analysis": "synthetic_car_loan_analysis.csv",
    "analysis_targets": "synthetic_car_loan_analysis_target.csv",
}


def demo_data_path(part: str) -> Path:
    """Path of a car-loan CSV inside the installed nannyml package (found without
    importing nannyml, which is slow to import)."""
    found = importlib.util.find_spec("nannyml")
    if found is None or not found.submodule_search_locations:
        raise DriftloopError(
            "the demo data ships with nannyml, which is not installed; "
            "install driftloop with the monitor extra: pip install 'driftloop[monitor]'"
        )
    path = Path(next(iter(found.submodule_search_locations))) / "datasets" / "data" / _FILES[part]
    if not path.exists():
        raise DriftloopError(f"demo file {path} is missing from the nannyml package; reinstall nannyml")
    return path


def resolve_demo_uri(uri: str) -> str:
    """``demo:reference``, ``demo:analysis`` and ``demo:analysis_targets`` name the
    car-loan files inside the installed nannyml package (so deployments carry no
    machine paths); any other URI is returned as it is."""
    if uri.startswith("demo:"):
        part = uri.removeprefix("demo:")
        if part not in _FILES:
            raise DriftloopError(f"unknown demo data {uri!r}; use one of " + ", ".join(f"demo:{p}" for p in _FILES))
        return str(demo_data_path(part))
    return uri
