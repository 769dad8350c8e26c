"""Work pools from ``infra/pools/*.json`` (package data ``driftloop.infra``): create or update them, idempotently."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

from driftloop.resources import package_file

POOLS = ("cpu", "gpu", "edge")


def gpu_count() -> int:
    """GPUs nvidia-smi sees (at least 1, so the pool can run where none is visible yet)."""
    if shutil.which("nvidia-smi") is None:
        return 1
    try:
        out = subprocess.run(["nvidia-smi", "-L"], check=False, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 1
    return max(1, sum(1 for line in out.splitlines() if line.startswith("GPU ")))


def load_template(name: str, *, gpu_device: str | None = None) -> dict[str, Any]:
    template = json.loads(package_file("infra", "pools", f"{name}.json").read_text())
    if name == "gpu" and gpu_device:
        template["variables"]["properties"]["env"]["default"]["DRIFTLOOP_DEVICE"] = gpu_device
    return template


def plan_pools(*, gpu_device: str | None = None, gpus: int | None = None) -> list[dict[str, Any]]:
    """What :func:`apply_pools` would send, read from the package data only (no server)."""
    plans = []
    for name in POOLS:
        template = load_template(name, gpu_device=gpu_device)
        plans.append({"pool": name, "action": "would create or update", "template": template,
                      "concurrency_limit": (gpus or gpu_count()) if name == "gpu" else None,
                      "env": template["variables"]["properties"]["env"]["default"]})
    return plans


def apply_pools(*, gpu_device: str | None = None, gpus: int | None = None) -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client

    applied = []
    with get_client(sync_client=True) as client:
        for plan in plan_pools(gpu_device=gpu_device, gpus=gpus):
            name, template, limit = plan["pool"], plan.pop("template"), plan["concurrency_limit"]
            applied.append({**plan, "action": _create_or_update(client, name, template, limit)})
    return applied


def _create_or_update(client: Any, name: str, template: dict[str, Any], limit: int | None) -> str:
    """"created" or "updated". A pool created between the read and the create (a
    ``prefect worker start --pool NAME`` started meanwhile creates its missing pool) is
    updated instead: applying is idempotent, whoever comes first."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        client.read_work_pool(name)
    except ObjectNotFound:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template,
                                                   concurrency_limit=limit))
            return "created"
        except ObjectAlreadyExists:
            pass
    client.update_work_pool(name, WorkPoolUpdate(base_job_template=template, concurrency_limit=limit))
    return "updated"
