"""The edge agent, one run: refresh the model (signed channel, or the registry on a
single trusted device), score, measure, and send the scored rows and the telemetry home.

Called by ``driftloop edge score`` (cron, systemd) and by the ``score-edge`` flow alike.

Sending home: each run's scored parts and its telemetry go to an outbox in the device's
cache (``<cache>/<model>/outbox/<run id>/``), then every queued run, oldest first, is
copied to the store's inbox prefix ``<inbox>/<model>/<device>/<run id>/``: parts first,
``telemetry.json`` last (the central ingest reads a run only once its telemetry is
there). A run leaves the outbox only after its upload finished, so a crash or an outage
mid-upload is retried by the next run; the central commit is idempotent by the edge run
id, so a run uploaded twice lands once. The outbox has a disk budget: when a run does not
fit, it is not queued, the agent says so loudly and the oldest unsent runs are kept.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import polars as pl
from pydantic import BaseModel, Field

from driftloop.atomic import write_atomic
from driftloop.errors import DriftloopError, SourceError, is_unreachable
from driftloop.outputs import OutputError, new_run_id
from driftloop.tasks.edge import (
    CachedModel,
    ChannelSource,
    ModelCache,
    refresh,
    refresh_from_channel,
)

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 10  # scores in [0, 1] (the positive class's probability), 10 equal bins
TELEMETRY = "telemetry.json"
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # device and run ids: they become paths


class EdgeResult(BaseModel):
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    output_uri: str
    model: str
    version: int
    cache_hit: bool
    offline: bool
    note: str
    latency_p50_ms: float
    latency_p95_ms: float
    run_id: str = ""
    device_id: str | None = None
    wave: int | None = None
    refused: str | None = Field(default=None, description="Why the channel's manifest was refused (cause: message).")
    upload: str = Field(default="", description="What happened to the run's rows: sent, queued (offline), not queued.")
    queued_runs: int = 0


class PartRecord(BaseModel):
    name: str
    rows: int
    sha256: str


class EdgeTelemetry(BaseModel):
    """One edge run as the device reports it (untrusted at the receiving end)."""

    format: int = 1
    run_id: str
    device_id: str
    model: str
    version: int
    wave: int | None = None
    started_at: datetime
    finished_at: datetime
    rows_in: int = Field(ge=0)
    rows_scored: int = Field(ge=0)
    rows_quarantined: int = Field(ge=0)
    failed: bool = False
    error: str | None = None
    latency_p50_ms: float = Field(default=0.0, ge=0)
    latency_p95_ms: float = Field(default=0.0, ge=0)
    histogram: list[int] | None = None
    parts: list[PartRecord] = Field(default_factory=list)
    offline: bool = False
    refused: str | None = None


def check_id(value: str, what: str) -> str:
    if not SAFE_ID.fullmatch(value or ""):
        raise DriftloopError(f"{what} {value!r} must be letters, digits, '_', '.', '-' (at most 128, not starting "
                             "with a dot): it becomes part of a path in the store")
    return value


def score_histogram(scores: pl.Series | np.ndarray) -> list[int]:
    """Counts of scores in 10 equal bins over [0, 1] (values outside are clipped)."""
    values = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    values = values[~np.isnan(values)]
    counts, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return [int(c) for c in counts]


def _score_column(frame: pl.DataFrame) -> str | None:
    for name in ("probability", "prediction"):
        if name in frame.columns:
            return name
    return None


def percentile_ms(values: list[float], q: float) -> float:
    return round(1000 * float(np.percentile(values, q)), 3) if values else 0.0


# --- the outbox ------------------------------------------------------------------------


@dataclass
class Outbox:
    root: Path
    budget_bytes: int

    def runs(self) -> list[Path]:
        """Queued runs, oldest first (run ids sort by start time); only complete ones
        (telemetry written last)."""
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and (p / TELEMETRY).exists())

    def used_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file()) if self.root.exists() else 0

    def queue(self, telemetry: EdgeTelemetry, parts: list[tuple[str, bytes]]) -> str:
        """Queue one run; ``not queued`` (loudly) when it would exceed the budget."""
        size = sum(len(b) for _, b in parts) + 4096
        used = self.used_bytes()
        if used + size > self.budget_bytes:
            message = (f"OUTBOX FULL: run {telemetry.run_id} ({size / 1e6:.1f} MB) not queued: the outbox {self.root} "
                       f"holds {used / 1e6:.1f} MB of its {self.budget_bytes / 1e6:.1f} MB budget; the oldest unsent "
                       "runs are kept. Connect the device to the store, or raise DRIFTLOOP_EDGE_OUTBOX_BUDGET_MB")
            logger.error(message)
            return "not queued: outbox full"
        directory = self.root / telemetry.run_id
        for name, data in parts:
            write_atomic(directory / name, data)
        write_atomic(directory / TELEMETRY, telemetry.model_dump_json(indent=1).encode())
        return "queued"


def upload_run(run_dir: Path, inbox_uri: str, model: str, device_id: str) -> None:
    """Copy one queued run to the inbox: parts first, telemetry last (each one PUT)."""
    prefix = f"{inbox_uri.rstrip('/')}/{model}/{device_id}/{run_dir.name}"
    fs, base = fsspec.core.url_to_fs(prefix)
    fs.makedirs(base, exist_ok=True)
    for path in sorted(run_dir.iterdir()):
        if path.name != TELEMETRY and path.is_file():
            fs.pipe_file(f"{base}/{path.name}", path.read_bytes())
    fs.pipe_file(f"{base}/{TELEMETRY}", (run_dir / TELEMETRY).read_bytes())


def flush_outbox(outbox: Outbox, inbox_uri: str, model: str, device_id: str) -> tuple[int, int]:
    """Send every queued run, oldest first; stop at the first outage. (sent, left)."""
    runs = outbox.runs()
    sent = 0
    for run_dir in runs:
        try:
            upload_run(run_dir, inbox_uri, model, device_id)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            logger.warning("%s: store unreachable (%s); %d run(s) stay queued", model, exc, len(runs) - sent)
            break
        shutil.rmtree(run_dir)
        sent += 1
    return sent, len(runs) - sent


# --- one run ---------------------------------------------------------------------------


@dataclass
class AgentConfig:
    model: str
    input_uri: str
    output_uri: str
    cache_root: Path
    device_id: str
    channel: ChannelSource | None = None
    registry_url: str | None = None  # single trusted device only: no channel
    inbox_uri: str | None = None  # default with a channel: <store root>/inbox
    batch_size: int = 100_000
    threads: int | None = None
    outbox_budget_bytes: int = 512 * 1_000_000


def refresh_model(config: AgentConfig, cache: ModelCache) -> CachedModel:
    if config.channel is not None:
        return refresh_from_channel(cache, config.channel)
    if config.registry_url is None:
        raise DriftloopError("edge agent: give a channel (--channel and --public-key) or a registry")
    from driftloop.registry import open_registry

    url, ref = config.registry_url, config.model
    return refresh(cache, lambda: open_registry(url).resolve(ref))


def run_agent(config: AgentConfig) -> EdgeResult:
    """One edge run. A scoring failure is reported home as a failed run (the rollout
    controller counts it) and then raised."""
    from driftloop.channel import store_root_of_channel
    from driftloop.onnx_model import load_model
    from driftloop.outputs import ScoringOutput
    from driftloop.registry.store import parse_model_ref
    from driftloop.tasks.score import score_stream

    name, _, _ = parse_model_ref(config.model)
    check_id(config.device_id, "device id")
    cache = ModelCache(config.cache_root, name)
    cached = refresh_model(config, cache)
    inbox = config.inbox_uri
    if inbox is None and config.channel is not None:
        inbox = f"{store_root_of_channel(config.channel.channel_uri)}/inbox"
    outbox = Outbox(cache.dir / "outbox", config.outbox_budget_bytes)

    started = datetime.now(UTC)
    base = {"device_id": config.device_id, "model": name, "version": cached.version, "wave": cached.wave,
                "offline": cached.offline, "refused": cached.refused}
    try:
        loaded = load_model(cached.read(), threads=config.threads)
        result = score_stream(loaded, config.input_uri, config.output_uri, model_name=name,
                              model_version=cached.version, batch_size=config.batch_size)
    except BaseException as exc:
        # A failed run counts against the version (the rollout controller's error rate);
        # an input or output the device was given wrong is not the model's fault.
        if isinstance(exc, Exception) and not isinstance(exc, SourceError | OutputError) and inbox is not None:
            failed = EdgeTelemetry(run_id=new_run_id(started), started_at=started, finished_at=datetime.now(UTC),
                                   rows_in=0, rows_scored=0, rows_quarantined=0, failed=True,
                                   error=f"{type(exc).__name__}: {str(exc)[:500]}", **base)
            outbox.queue(failed, [])
            flush_outbox(outbox, inbox, name, config.device_id)
        raise

    output = ScoringOutput(result.output_uri)
    parts: list[tuple[str, bytes]] = []
    records: list[PartRecord] = []
    scores: list[pl.Series] = []
    assert result.manifest is not None
    for part in result.manifest.parts:
        with output.fs.open(output._full(part.path), "rb") as fh:
            data = fh.read()
        frame = pl.read_parquet(data)
        column = _score_column(frame)
        if column is not None:
            scores.append(frame[column])
        part_name = Path(part.path).name
        parts.append((part_name, data))
        records.append(PartRecord(name=part_name, rows=frame.height, sha256=hashlib.sha256(data).hexdigest()))
    histogram = score_histogram(pl.concat(scores).to_numpy()) if scores else None
    telemetry = EdgeTelemetry(
        run_id=result.run_id, started_at=started, finished_at=datetime.now(UTC), rows_in=result.rows_in,
        rows_scored=result.rows_scored, rows_quarantined=result.rows_quarantined,
        latency_p50_ms=percentile_ms(result.batch_latencies_s, 50),
        latency_p95_ms=percentile_ms(result.batch_latencies_s, 95), histogram=histogram, parts=records, **base)

    upload, left = "no inbox: rows stay on the device", 0
    if inbox is not None:
        upload = outbox.queue(telemetry, parts)
        _, left = flush_outbox(outbox, inbox, name, config.device_id)
        if upload == "queued":
            upload = "sent" if not any(p.name == result.run_id for p in outbox.runs()) else "queued (store unreachable)"
    return EdgeResult(
        rows_in=result.rows_in, rows_scored=result.rows_scored, rows_quarantined=result.rows_quarantined,
        output_uri=result.output_uri, model=name, version=cached.version, cache_hit=cached.cache_hit,
        offline=cached.offline, note=cached.note, latency_p50_ms=telemetry.latency_p50_ms,
        latency_p95_ms=telemetry.latency_p95_ms, run_id=result.run_id, device_id=config.device_id, wave=cached.wave,
        refused=cached.refused, upload=upload, queued_runs=left)


def telemetry_payload(result: EdgeResult) -> dict[str, Any]:
    """The ``driftloop.edge.scored`` event's payload."""
    return {
        "rows_in": result.rows_in, "rows_scored": result.rows_scored, "rows_quarantined": result.rows_quarantined,
        "latency_p50_ms": result.latency_p50_ms, "latency_p95_ms": result.latency_p95_ms,
        "model_version": result.version, "cache_hit": result.cache_hit, "offline": result.offline,
        "run_id": result.run_id, "wave": result.wave, "refused": result.refused, "upload": result.upload,
    }

