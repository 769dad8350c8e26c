"""One device of the process fleet test: an edge agent process that scores once per
round. The test writes ``<dir>/rounds/<n>``; the agent runs the agent code (the same as
``driftloop edge score``) and writes ``<dir>/results/<n>-<device>.json``; ``<dir>/stop``
ends it. Imports are paid once per process, not once per round.

Usage: python edge_fleet_agent.py DIR DEVICE_ID CHANNEL_URI PUBLIC_KEY INPUT
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from driftloop.tasks.edge import ChannelSource
from driftloop.tasks.edge_agent import AgentConfig, run_agent

root, device, channel, public_key, input_uri = sys.argv[1:6]
base = Path(root)
public = Path(public_key).read_bytes()
done = -1
while not (base / "stop").exists():
    rounds = sorted(int(p.name) for p in (base / "rounds").iterdir()) if (base / "rounds").exists() else []
    if not rounds or rounds[-1] == done:
        time.sleep(0.25)  # 20 agents polling: keep their idle CPU small
        continue
    done = rounds[-1]
    try:
        result = run_agent(AgentConfig(
            model="loans", input_uri=input_uri, output_uri=str(base / "outputs" / device), batch_size=50,
            cache_root=base / "caches" / device, device_id=device, channel=ChannelSource(channel, public, device),
            threads=1))
        out = {"version": result.version, "refused": result.refused, "upload": result.upload, "error": None}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out = {"version": None, "refused": None, "upload": None, "error": f"{type(exc).__name__}: {exc}"}
    (base / "results").mkdir(exist_ok=True)
    tmp = base / "results" / f".{done}-{device}.tmp"
    tmp.write_text(json.dumps(out))
    tmp.rename(base / "results" / f"{done}-{device}.json")  # whole or absent for the test
