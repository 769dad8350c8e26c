"""NannyML sends usage telemetry unless NML_DISABLE_USAGE_LOGGING is set before it is
imported. tests/conftest.py sets it for every test, which would hide a regression: here
fresh processes start without it and count what NannyML would send."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Records every call NannyML makes to its telemetry client (segment) instead of sending
# it, then runs a calculator as monitoring does.
_PROBE = """
import json, os, sys
import segment.analytics as segment
calls = []
segment.track = lambda *a, **k: calls.append("track")
segment.identify = lambda *a, **k: calls.append("identify")
segment.flush = lambda *a, **k: None
assert "NML_DISABLE_USAGE_LOGGING" not in os.environ
entry = sys.argv[1]
if entry == "nannyml":  # control: NannyML imported as anyone would
    import nannyml as nml
elif entry == "monitor":  # driftloop's monitoring
    from driftloop.tasks.monitor_frames import nannyml
    nml = nannyml()
elif entry == "cli":  # the command line, before it runs any command
    from driftloop.cli.common import configure_environment
    configure_environment(verbose=False)
    import nannyml as nml
import numpy as np
import pandas as pd
frame = pd.DataFrame({"x": np.random.default_rng(0).random(400)})
calculator = nml.UnivariateDriftCalculator(column_names=["x"], chunk_size=100)
calculator.fit(frame)
calculator.calculate(frame)
print(json.dumps(calls))
"""


def _calls(entry: str, tmp_path: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "NML_DISABLE_USAGE_LOGGING"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", _PROBE, entry], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_probe_sees_nannyml_telemetry_when_nothing_turns_it_off(tmp_path: Path) -> None:
    assert _calls("nannyml", tmp_path), "the probe saw no telemetry: it could not catch a regression"


@pytest.mark.parametrize("entry", ["monitor", "cli"])
def test_driftloop_turns_nannyml_telemetry_off_by_itself(entry: str, tmp_path: Path) -> None:
    assert _calls(entry, tmp_path) == []
