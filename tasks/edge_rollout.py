"""The edge rollout controller's judgement: is the wave on the new version healthy, next
to the devices still on the previous one?

Per version, from the edge runs' telemetry since the rollout started: runs, failed runs,
rows quarantined, the mean p95 batch latency, and the summed score histogram. The new
version's wave is compared with the previous version's devices:

- ``error_rate``: failed runs / runs on the new version (a crash on a value only field
  devices see);
- ``latency_p95_ratio``: new mean p95 over previous mean p95 (a slower model);
- ``score_psi``: the population stability index between the two score histograms (a
  model that scores differently on the devices' data).

Any figure above the spec's ``abort`` stops the rollout: the channel points every
device at the previous version. The next wave opens once the current one has run the
new version with no breach for the ``bake`` time (and at least one run reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NONE

from driftloop.channel import (
    DEFAULT_TTL,
    Aborted,
    ChannelManifest,
    publish_champion,
    read_manifest_unverified,
    resign,
    write_manifest,
)
from driftloop.tasks.edge_agent import HISTOGRAM_BINS, EdgeTelemetry

Action = Literal["advance", "complete", "abort", "hold", "idle"]
_EPS = 1e-4  # PSI's floor for an empty bin


@dataclass
class VersionStats:
    version: int
    runs: int = 0
    failed: int = 0
    rows_in: int = 0
    rows_quarantined: int = 0
    p95_ms: list[float] = field(default_factory=list)
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    devices: set[str] = field(default_factory=set)

    def add(self, run: EdgeTelemetry) -> None:
        self.runs += 1
        self.devices.add(run.device_id)
        self.failed += int(run.failed)
        self.rows_in += run.rows_in
        self.rows_quarantined += run.rows_quarantined
        if not run.failed:
            self.p95_ms.append(run.latency_p95_ms)
        if run.histogram is not None and len(run.histogram) == HISTOGRAM_BINS:
            self.histogram = [a + max(0, b) for a, b in zip(self.histogram, run.histogram, strict=True)]

    @property
    def error_rate(self) -> float | None:
        return self.failed / self.runs if self.runs else None

    @property
    def mean_p95_ms(self) -> float | None:
        return sum(self.p95_ms) / len(self.p95_ms) if self.p95_ms else None

    def summary(self) -> dict[str, float | int | None]:
        return {"runs": self.runs, "failed": self.failed, "devices": len(self.devices), "rows_in": self.rows_in,
                "rows_quarantined": self.rows_quarantined, "error_rate": self.error_rate,
                "mean_p95_ms": self.mean_p95_ms}


def psi(expected: list[int], actual: list[int]) -> float | None:
    """Population stability index of two histograms over the same bins."""
    total_e, total_a = sum(expected), sum(actual)
    if not total_e or not total_a:
        return None
    value = 0.0
    for e, a in zip(expected, actual, strict=True):
        pe, pa = max(e / total_e, _EPS), max(a / total_a, _EPS)
        value += (pa - pe) * math.log(pa / pe)
    return value


@dataclass
class Decision:
    action: Action
    reasons: list[str]
    figures: dict[str, float | int | None]
    new: VersionStats | None = None
    old: VersionStats | None = None


def judge(manifest: ChannelManifest, runs: list[EdgeTelemetry], now: datetime) -> Decision:
    """What the controller does with this manifest, given the edge runs' telemetry."""
    rollout = manifest.rollout
    if rollout.state != "rolling" or manifest.previous is None:
        return Decision("idle", [f"rollout {rollout.state}"], {})
    new, old = VersionStats(manifest.target.version), VersionStats(manifest.previous.version)
    for run in runs:
        if run.model != manifest.model or run.finished_at < rollout.started_at:
            continue
        if run.version == new.version:
            new.add(run)
        elif run.version == old.version:
            old.add(run)
    abort = rollout.plan.abort
    ratio = (new.mean_p95_ms / old.mean_p95_ms) if new.mean_p95_ms and old.mean_p95_ms else None
    shift = psi(old.histogram, new.histogram)
    figures: dict[str, float | int | None] = {
        "wave": rollout.wave, "new_runs": new.runs, "new_failed": new.failed, "old_runs": old.runs,
        "error_rate": new.error_rate, "latency_p95_ratio": ratio, "score_psi": shift,
        "new_p95_ms": new.mean_p95_ms, "old_p95_ms": old.mean_p95_ms,
    }
    breaches = []
    if new.error_rate is not None and new.error_rate > abort.error_rate:
        breaches.append(f"error rate {new.error_rate:.3f} > {abort.error_rate} ({new.failed} of {new.runs} runs failed)")
    if ratio is not None and ratio > abort.latency_p95_ratio:
        breaches.append(f"p95 latency ratio {ratio:.2f} > {abort.latency_p95_ratio} "
                        f"({new.mean_p95_ms:.1f} ms vs {old.mean_p95_ms:.1f} ms)")
    if shift is not None and shift > abort.score_psi:
        breaches.append(f"score PSI {shift:.3f} > {abort.score_psi}")
    if breaches:
        return Decision("abort", breaches, figures, new, old)
    baked = (now - rollout.wave_started_at).total_seconds() >= rollout.plan.bake_s
    if not new.runs:
        return Decision("hold", ["no telemetry from the new version yet"], figures, new, old)
    if not baked:
        return Decision("hold", [f"baking wave {rollout.wave} (healthy so far)"], figures, new, old)
    last = rollout.wave >= len(rollout.plan.waves) - 1
    return Decision("complete" if last else "advance", [f"wave {rollout.wave} healthy for {rollout.plan.bake}"],
                    figures, new, old)


def apply(manifest: ChannelManifest, decision: Decision, now: datetime) -> ChannelManifest | None:
    """The manifest after ``decision`` (unsigned; None: nothing changes but the expiry)."""
    rollout = manifest.rollout
    if decision.action == "advance":
        state = rollout.model_copy(update={"wave": rollout.wave + 1, "wave_started_at": now})
    elif decision.action == "complete":
        state = rollout.model_copy(update={"state": "complete"})
    elif decision.action == "abort":
        state = rollout.model_copy(update={"state": "aborted", "aborted": Aborted(
            version=manifest.target.version, wave=rollout.wave, at=now, reasons=decision.reasons,
            figures=decision.figures)})
    else:
        return None
    return manifest.model_copy(update={"rollout": state})


@dataclass
class ControlResult:
    model: str
    version: int | None
    action: Action | Literal["published"]
    wave: int | None
    state: str | None
    reasons: list[str]
    figures: dict[str, float | int | None]


def control(registry: Any, store: Any, model: str, private_pem: bytes, *, now: datetime,
            ttl: timedelta = DEFAULT_TTL) -> ControlResult:
    """One controller step for ``model``: publish the channel if it does not follow the
    registry's champion, else judge the rollout and advance, complete or abort it; the
    manifest is re-signed every time (its expiry moves on)."""
    from driftloop.tasks.edge_inbox import read_telemetry

    current = read_manifest_unverified(store, model)
    champion = registry.find_alias(model, "champion")
    if champion is not None and (current is None or current.target.sha256 != champion.onnx_sha256):
        published = publish_champion(registry, store, model, private_pem, now=now, ttl=ttl)
        return ControlResult(model, published.version, "published", published.rollout.wave, published.rollout.state,
                             ["the channel did not follow the champion"], {})
    if current is None:
        return ControlResult(model, None, "idle", None, None, [f"{model} has no champion and no channel"], {})
    decision = judge(current, read_telemetry(store, model), now)
    changed = apply(current, decision, now)
    manifest = resign(changed or current, now=now, ttl=ttl)
    write_manifest(store, manifest, private_pem)
    return ControlResult(model, manifest.version, decision.action, manifest.rollout.wave, manifest.rollout.state,
                         decision.reasons, decision.figures)


def fleet_status(store: Any, model: str) -> dict[str, Any]:
    """What ``driftloop edge status`` shows: the channel's rollout, devices per version
    (from their latest run), and each version's telemetry since the rollout started."""
    from driftloop.tasks.edge_inbox import read_telemetry

    manifest = read_manifest_unverified(store, model)
    runs = read_telemetry(store, model)
    latest: dict[str, EdgeTelemetry] = {}
    for run in sorted(runs, key=lambda r: r.finished_at):
        latest[run.device_id] = run
    per_version: dict[int, list[str]] = {}
    for device, run in sorted(latest.items()):
        per_version.setdefault(run.version, []).append(device)
    out: dict[str, Any] = {"model": model, "channel": None,
                           "devices_per_version": {str(v): len(d) for v, d in sorted(per_version.items())}}
    if manifest is not None:
        decision = judge(manifest, runs, manifest.issued_at) if manifest.rollout.state == "rolling" else None
        out["channel"] = {
            "version": manifest.version, "previous": manifest.previous.version if manifest.previous else None,
            "state": manifest.rollout.state, "wave": manifest.rollout.wave, "waves": manifest.rollout.plan.waves,
            "bake": manifest.rollout.plan.bake, "wave_started_at": manifest.rollout.wave_started_at.isoformat(),
            "issued_at": manifest.issued_at.isoformat(), "expires_at": manifest.expires_at.isoformat(),
            "aborted": manifest.rollout.aborted.model_dump(mode="json") if manifest.rollout.aborted else None,
            "telemetry": decision.figures if decision else {},
            "versions": {str(s.version): s.summary() for s in (decision.new, decision.old) if s is not None}
            if decision else {},
        }
    return out


@task(name="edge-rollout-step", cache_policy=NONE)
def control_task(registry: Any, store: Any, model: str, private_pem: bytes, ttl_s: float) -> ControlResult:
    from datetime import UTC

    return control(registry, store, model, private_pem, now=datetime.now(UTC), ttl=timedelta(seconds=ttl_s))
