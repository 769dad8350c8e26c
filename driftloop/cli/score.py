"""Batch scoring: ``score``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from driftloop.cli.common import FlowBinding, add_command, check_input, int_at_least, model_ref

SCORE = FlowBinding("driftloop.flows.score:score", {
    "input": "input_uri", "output": "output_uri", "model": "model", "batch_size": "batch_size",
    "threads": "threads", "engine": "engine", "device": "device", "workers": "workers",
    "dask_address": "dask_address",
})


def _progress_bar(enabled: bool) -> None:
    """A progress bar on stderr for long steps, when stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from driftloop import progress

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), transient=True, console=None)
    tasks: dict[str, Any] = {}

    def listener(step: str, done: int, total: int | None) -> None:
        if step not in tasks:
            bar.start()
            tasks[step] = bar.add_task(f"{step} rows", total=total)
        bar.update(tasks[step], completed=done, total=total)
        if total is not None and done >= total:
            bar.stop()

    progress.add_listener(listener)


def check_score(args: argparse.Namespace) -> None:
    check_input(args.input, "--input")


def cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    _progress_bar(not getattr(args, "json", False))
    return SCORE.call(args).model_dump()


def human_score(p: dict[str, Any]) -> str:
    lines = [
        f"scored with {p['model']}:{p['version']}, {p['form_reason']}",
        f"  rows in          {p['rows_in']:>10,}",
        f"  rows scored      {p['rows_scored']:>10,}",
        f"  rows quarantined {p['rows_quarantined']:>10,}",
        f"  table            {p['table']} snapshot {p['snapshot_id']} (scoring run {p['run_id']})",
        f"  input key        {p['input_key']}",
    ]
    if p["output_uri"]:
        lines.append(f"  export           {p['output_uri']}")
    if p["quarantine_uri"]:
        lines.append(f"  quarantine       {p['quarantine_uri']}")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    score = add_command(sub, "score", help="batch-score a file with a registered model", handler=cmd_score,
                        human=human_score, check=check_score, binding=SCORE, needs_prefect=True)
    score.add_argument("--model", required=True, type=model_ref,
                       help="NAME, NAME@alias or NAME:VERSION (bare NAME: champion)")
    score.add_argument("--input", required=True, help="Parquet or CSV path, directory, glob or URI")
    score.add_argument("--output", help="also export this run's rows as a plain Parquet file: a .parquet path or URI, "
                       "or a directory or prefix that gets <run id>.parquet (the rows always go to the table "
                       "predictions.<model>)")
    score.add_argument("--batch-size", type=int_at_least(1), default=100_000, metavar="ROWS",
                       help="rows per batch (default %(default)s)")
    score.add_argument("--threads", type=int_at_least(1), help="scoring threads (default: all cores)")
    score.add_argument("--engine", choices=["auto", "onnx", "native", "tensor", "compiled"], default="auto",
                       help="which verified form of the version scores: auto (default) takes the fastest that runs "
                            "here, as timed at registration; onnx (tree kernel, portable), native (the booster; "
                            "needs its library), tensor (standard tensor ops, any ONNX Runtime provider), "
                            "compiled (XGBoost's trees on driftloop's own kernel, its scores bit for bit; needs "
                            "numba)")
    score.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="cuda: the tensor form on ONNX Runtime's CUDA provider (needs onnxruntime-gpu; "
                            "default %(default)s)")
    score.add_argument("--workers", type=int_at_least(1), metavar="N",
                       help="score the input as partitions on a temporary local Dask cluster of N processes (one "
                            "thread each): a directory or glob (one partition per file), or one Parquet file "
                            "(row-group ranges); needs driftloop[scale]")
    score.add_argument("--dask-address", metavar="ADDRESS",
                       help="score as partitions on this existing Dask scheduler (tcp://host:8786; default: "
                            "DRIFTLOOP_DASK_ADDRESS, if set); with --workers, N only sets the partition count")
