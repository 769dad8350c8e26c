"""The edge agent's model cache: the champion's artifact kept locally, verified by hash,
so scoring goes on when the registry or the artifact store cannot be reached.

Layout per model: ``artifacts/<sha256>.onnx`` and ``state.json`` naming the ``current``
and ``previous`` artifacts. Moving to a new champion writes the new artifact first and
then replaces ``state.json`` in one rename: a crash leaves the old state intact. The
previous artifact stays for :func:`rollback`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from driftloop.errors import DriftloopError, is_unreachable
from driftloop.registry.store import ModelNotFound
from driftloop.spec import check_model_name
from driftloop.tasks.score import ArtifactIntegrityError, fetch_verified

logger = logging.getLogger(__name__)


@dataclass
class CachedModel:
    name: str
    version: int
    sha256: str
    path: Path
    cache_hit: bool
    offline: bool
    note: str

    def read(self) -> bytes:
        data = self.path.read_bytes()
        found = hashlib.sha256(data).hexdigest()
        if found != self.sha256:
            raise ArtifactIntegrityError(
                f"cached artifact {self.path} has sha256 {found}, expected {self.sha256}; delete the cache "
                "directory to fetch the model again"
            )
        return data


class ModelCache:
    def __init__(self, root: Path, model_name: str) -> None:
        check_model_name(model_name)  # it becomes a path: no '..', no '/'
        self.dir = root / model_name
        self.name = model_name

    @property
    def _state_path(self) -> Path:
        return self.dir / "state.json"

    def state(self) -> dict[str, Any]:
        if not self._state_path.exists():
            return {"current": None, "previous": None}
        return json.loads(self._state_path.read_text())

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.dir / f".state-{os.getpid()}.json"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self._state_path)  # atomic: readers see old or new state

    def _artifact_path(self, sha256: str) -> Path:
        return self.dir / "artifacts" / f"{sha256}.onnx"

    def install(self, version: int, sha256: str, data: bytes, source_uri: str) -> None:
        path = self._artifact_path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        state = self.state()
        entry = {"version": version, "sha256": sha256, "source_uri": source_uri,
                 "installed_at": datetime.now(UTC).isoformat()}
        self._write_state({"current": entry, "previous": state["current"]})
        self._prune(keep={sha256, (state["current"] or {}).get("sha256")})

    def _prune(self, keep: set[str | None]) -> None:
        for path in (self.dir / "artifacts").glob("*.onnx"):
            if path.stem not in keep:
                path.unlink()

    def current(self, *, cache_hit: bool, offline: bool, note: str) -> CachedModel | None:
        entry = self.state()["current"]
        if entry is None:
            return None
        return CachedModel(self.name, entry["version"], entry["sha256"], self._artifact_path(entry["sha256"]),
                           cache_hit, offline, note)

    def rollback(self) -> dict[str, Any]:
        """Make the previous artifact current again (the current one becomes previous)."""
        state = self.state()
        if state["previous"] is None:
            raise DriftloopError(f"edge cache for {self.name}: no previous model to roll back to")
        self._write_state({"current": state["previous"], "previous": state["current"]})
        return state["previous"]


def refresh(cache: ModelCache, resolve: Callable[[], Any]) -> CachedModel:
    """Make the cache hold the registry's current model and return it; fall back to the
    cached model (marked offline) when the registry or artifact store is unreachable."""
    try:
        record = resolve()
        state = cache.state()
        if state["current"] and state["current"]["sha256"] == record.onnx_sha256:
            model = cache.current(cache_hit=True, offline=False, note=f"cached v{record.version} is current")
            assert model is not None
            return model
        data = fetch_verified(record.onnx_uri, record.onnx_sha256)
        cache.install(record.version, record.onnx_sha256, data, record.onnx_uri)
        before = state["current"]["version"] if state["current"] else None
        note = f"fetched v{record.version}" + (f" (replacing cached v{before})" if before is not None else "")
        model = cache.current(cache_hit=False, offline=False, note=note)
        assert model is not None
        return model
    except (ArtifactIntegrityError, ModelNotFound):
        raise  # a tampered artifact is never installed; an unknown model is an error
    except Exception as exc:
        # Only an outage may be ridden out on the cache: a configuration error or a revoked
        # credential must fail the run, not score with a stale model forever.
        if not is_unreachable(exc):
            raise
        cached = cache.current(cache_hit=True, offline=True, note=f"registry or artifact store unreachable ({exc}); scoring with the cached model")
        if cached is None:
            raise DriftloopError(
                f"edge agent: cannot reach the registry or artifact store ({exc}) and no model of {cache.name!r} "
                "is cached yet; connect once to fetch it"
            ) from None
        logger.warning("%s: %s", cache.name, cached.note)
        return cached


@task(name="refresh-edge-cache", cache_policy=NONE)
def refresh_task(cache: ModelCache, resolve: Callable[[], Any]) -> CachedModel:
    return refresh(cache, resolve)
