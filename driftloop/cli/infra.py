"""Prefect work pools: ``infra apply``."""

from __future__ import annotations

import argparse
from typing import Any

from driftloop.cli.common import FlowBinding, add_command, add_group, int_at_least

APPLY = FlowBinding("driftloop.work_pools:apply_pools", {"gpu_device": "gpu_device", "gpus": "gpus"})


def cmd_infra_apply(args: argparse.Namespace) -> dict[str, Any]:
    if args.dry_run:
        from driftloop.work_pools import plan_pools

        pools = plan_pools(gpu_device=args.gpu_device, gpus=args.gpus)
        return {"dry_run": True, "pools": [{k: v for k, v in p.items() if k != "template"} for p in pools]}
    return {"dry_run": False, "pools": APPLY.call(args)}


def human_pools(p: dict[str, Any]) -> str:
    return "\n".join(f"{x['pool']}: {x['action']} (concurrency {x['concurrency_limit']}, env {x['env']})"
                     for x in p["pools"])


def register(sub: argparse._SubParsersAction) -> None:
    infra = add_group(sub, "infra", help="Prefect work pools")
    apply = add_command(infra, "apply", help="create or update the cpu, gpu and edge pools", handler=cmd_infra_apply,
                        human=human_pools, binding=APPLY,
                        needs_prefect=lambda args: not args.dry_run)
    apply.add_argument("--gpu-device", choices=["cuda", "cpu"],
                       help="DRIFTLOOP_DEVICE for the gpu pool (cpu where there is no GPU; default: as infra/pools/gpu.json sets it)")
    apply.add_argument("--gpus", type=int_at_least(1), metavar="N",
                       help="gpu pool concurrency (default: GPUs nvidia-smi sees)")
    apply.add_argument("--dry-run", action="store_true",
                       help="print the pools and settings it would send, without contacting a Prefect server")
