"""The edge agent's model cache: the champion's artifact kept locally, verified by hash,
so scoring goes on when the registry or the artifact store cannot be reached.

Layout per model: ``artifacts/<sha256>.onnx`` and ``state.json`` naming the ``current``
and ``previous`` artifacts. Moving to a new champion writes the new artifact first and
then replaces ``state.json`` (both durably: fsynced before the rename), so a crash or a
power loss leaves the old state or the new one. The previous artifact stays for
:func:`rollback`.

Agents on one device share the cache: every change and every read of the state and the
artifacts happens under one file lock (``.lock``), and a model handed to the scorer holds
its verified bytes, so another agent's pruning cannot pull the artifact from under it. A
``state.json`` that is damaged all the same (a disk that lied about its flush) is rebuilt
from the registry on the next run that reaches it; offline it is one clear error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from driftloop.atomic import write_atomic
from driftloop.errors import DriftloopError, ModelNotFound, is_unreachable
from driftloop.spec import check_model_name
from driftloop.tasks.score import ArtifactIntegrityError, fetch_verified

logger = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 300.0  # another agent installing a model holds the lock for one fetch at most


class DamagedCacheState(DriftloopError):
    """The cache's state.json cannot be read (empty, truncated, not a cache state)."""


@dataclass
class CachedModel:
    name: str
    version: int
    sha256: str
    path: Path
    cache_hit: bool
    offline: bool
    note: str
    data: bytes | None = None  # the artifact's bytes, read and verified under the cache's lock
    refused: str | None = None  # why the channel's manifest was refused (cause: message); None when accepted
    wave: int | None = None  # the device's rollout wave (channel mode)

    def read(self) -> bytes:
        data = self.data if self.data is not None else self.path.read_bytes()
        found = hashlib.sha256(data).hexdigest()
        if found != self.sha256:
            raise ArtifactIntegrityError(
                f"cached artifact {self.path} has sha256 {found}, expected {self.sha256}; delete the cache "
                "directory to fetch the model again"
            )
        return data


_EMPTY: dict[str, Any] = {"current": None, "previous": None}


def _valid_entry(entry: Any) -> bool:
    return entry is None or (isinstance(entry, dict) and isinstance(entry.get("version"), int)
                             and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64)


class ModelCache:
    def __init__(self, root: Path, model_name: str) -> None:
        check_model_name(model_name)  # it becomes a path: no '..', no '/'
        self.dir = root / model_name
        self.name = model_name
        self._lock = FileLock(str(self.dir / ".lock"), timeout=LOCK_TIMEOUT_S)

    @property
    def _state_path(self) -> Path:
        return self.dir / "state.json"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The cache to this agent alone (reentrant within the agent)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            with self._lock:
                yield
        except Timeout:
            raise DriftloopError(
                f"edge cache {self.dir}: another agent has held its lock ({self.dir / '.lock'}) for more than "
                f"{LOCK_TIMEOUT_S:.0f} s; if no other agent runs on this device, delete the lock file"
            ) from None

    def state(self) -> dict[str, Any]:
        """The cache's state; :class:`DamagedCacheState` if state.json is unreadable."""
        try:
            raw = self._state_path.read_bytes()
        except FileNotFoundError:
            return dict(_EMPTY)
        try:
            state = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            reason = "empty" if not raw.strip(b"\0 \n") else f"not JSON ({exc})"
            raise DamagedCacheState(f"edge cache state {self._state_path} is damaged: {reason}") from None
        if not (isinstance(state, dict) and _valid_entry(state.get("current")) and _valid_entry(state.get("previous"))):
            raise DamagedCacheState(f"edge cache state {self._state_path} is damaged: not a cache state "
                                    "(current and previous entries with version and sha256)")
        return {"current": state.get("current"), "previous": state.get("previous")}

    def _write_state(self, state: dict[str, Any]) -> None:
        write_atomic(self._state_path, json.dumps(state, indent=2).encode())  # old or new state, even on power loss

    def _artifact_path(self, sha256: str) -> Path:
        return self.dir / "artifacts" / f"{sha256}.onnx"

    def _holds(self, sha256: str) -> bool:
        path = self._artifact_path(sha256)
        return path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256

    def install(self, version: int, sha256: str, data: bytes, source_uri: str, *, rebuild: bool = False) -> None:
        """Make ``data`` the current artifact. ``rebuild``: a damaged state is replaced
        (the previous model is then unknown)."""
        with self.locked():
            try:
                state = self.state()
            except DamagedCacheState as exc:
                if not rebuild:
                    raise
                logger.warning("%s; rebuilding it from the registry (v%d current, no previous model)", exc, version)
                state = dict(_EMPTY)
            if not self._holds(sha256):
                write_atomic(self._artifact_path(sha256), data)
            entry = {"version": version, "sha256": sha256, "source_uri": source_uri,
                     "installed_at": datetime.now(UTC).isoformat()}
            previous = state["current"] if (state["current"] or {}).get("sha256") != sha256 else state["previous"]
            self._write_state({"current": entry, "previous": previous})
            self._prune(keep={sha256, (previous or {}).get("sha256")})

    def _prune(self, keep: set[str | None]) -> None:
        for path in (self.dir / "artifacts").glob("*.onnx"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)

    def current(self, *, cache_hit: bool, offline: bool, note: str) -> CachedModel | None:
        """The current model with its verified bytes, read under the lock."""
        with self.locked():
            entry = self.state()["current"]
            if entry is None:
                return None
            path = self._artifact_path(entry["sha256"])
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise ArtifactIntegrityError(f"cached artifact {path} (v{entry['version']}) is missing; connect once to "
                                     "fetch the model again, or delete the cache directory") from None
            model = CachedModel(self.name, entry["version"], entry["sha256"], path, cache_hit, offline, note, data)
            model.read()  # verified now
            return model

    def rollback(self) -> dict[str, Any]:
        """Make the previous artifact current again (the current one becomes previous)."""
        with self.locked():
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
        with cache.locked():
            try:
                state = cache.state()
            except DamagedCacheState:
                state = dict(_EMPTY)  # rebuilt below, from the registry's record
            if state["current"] and state["current"]["sha256"] == record.onnx_sha256 \
                    and cache._holds(record.onnx_sha256):
                model = cache.current(cache_hit=True, offline=False, note=f"cached v{record.version} is current")
                assert model is not None
                return model
            data = cache._artifact_path(record.onnx_sha256).read_bytes() if cache._holds(record.onnx_sha256) \
                else fetch_verified(record.onnx_uri, record.onnx_sha256)
            cache.install(record.version, record.onnx_sha256, data, record.onnx_uri, rebuild=True)
            before = state["current"]["version"] if state["current"] else None
            note = f"fetched v{record.version}" + (f" (replacing cached v{before})" if before is not None else "")
            model = cache.current(cache_hit=False, offline=False, note=note)
            assert model is not None
            return model
    except (ArtifactIntegrityError, ModelNotFound, DamagedCacheState):
        raise  # a tampered artifact is never installed; an unknown model is an error
    except Exception as exc:
        # Only an outage may be ridden out on the cache: a configuration error or a revoked
        # credential must fail the run, not score with a stale model forever.
        if not is_unreachable(exc):
            raise
        try:
            cached = cache.current(cache_hit=True, offline=True,
                                   note=f"registry or artifact store unreachable ({exc}); scoring with the cached model")
        except DamagedCacheState as damaged:
            raise DamagedCacheState(
                f"{damaged} and the registry or artifact store cannot be reached ({exc}): the cached model cannot be "
                "told; connect once to rebuild the state from the registry (or delete the cache directory)"
            ) from None
        if cached is None:
            raise DriftloopError(
                f"edge agent: cannot reach the registry or artifact store ({exc}) and no model of {cache.name!r} "
                "is cached yet; connect once to fetch it"
            ) from None
        logger.warning("%s: %s", cache.name, cached.note)
        return cached


# --- the signed channel (no registry on the device) ---------------------------------------


@dataclass(frozen=True)
class ChannelSource:
    """Where a device learns its model: the channel file in the artifact store, the
    publisher's public key, and the device's id (its rollout wave)."""

    channel_uri: str
    public_key: bytes
    device_id: str


_ACCEPTED = "channel.json"  # the issue time of the last manifest accepted (an older one is a replay)


def _last_accepted(cache: ModelCache) -> datetime | None:
    try:
        return datetime.fromisoformat(json.loads((cache.dir / _ACCEPTED).read_text())["issued_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fetch_artifact(uri: str, sha256: str) -> bytes:
    """The artifact's bytes if they hash to the signed sha256; a refusal otherwise. An
    outage (unreachable store) propagates as itself."""
    import fsspec

    from driftloop.channel import ManifestRefused

    try:
        with fsspec.open(uri, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ManifestRefused("artifact_hash", f"the artifact {uri} it names is missing (expected sha256 {sha256})") \
            from None
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise ManifestRefused("artifact_hash", f"the artifact {uri} has sha256 {found}, the manifest signs {sha256}")
    return data


def refresh_from_channel(cache: ModelCache, source: ChannelSource, *, now: datetime | None = None) -> CachedModel:
    """Make the cache hold the version the signed channel assigns to this device. A
    manifest that fails its signature, expiry or artifact hash is refused (named in the
    result) and the verified cached model keeps serving; an unreachable store is ridden
    out on the cache, as with the registry."""
    import fsspec

    from driftloop.channel import ManifestRefused, store_root_of_channel, verify

    root = store_root_of_channel(source.channel_uri)
    try:
        try:
            with fsspec.open(source.channel_uri, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise ManifestRefused("unreadable", f"no channel file at {source.channel_uri} (is the model's champion "
                                  "published? driftloop channel publish MODEL)") from None
        with cache.locked():
            manifest = verify(data, source.public_key, model=cache.name, now=now, not_before=_last_accepted(cache))
            target, wave = manifest.for_device(source.device_id)
            try:
                state = cache.state()
            except DamagedCacheState:
                state = dict(_EMPTY)  # rebuilt below, from the signed manifest
            if state["current"] and state["current"]["sha256"] == target.sha256 and cache._holds(target.sha256):
                model = cache.current(cache_hit=True, offline=False,
                                      note=f"cached v{target.version} is current (wave {wave})")
            else:
                uri = f"{root}/{target.artifact}"
                data = cache._artifact_path(target.sha256).read_bytes() if cache._holds(target.sha256) \
                    else _fetch_artifact(uri, target.sha256)
                cache.install(target.version, target.sha256, data, uri, rebuild=True)
                before = state["current"]["version"] if state["current"] else None
                note = f"fetched v{target.version} (wave {wave})" + \
                    (f", replacing cached v{before}" if before is not None else "")
                model = cache.current(cache_hit=False, offline=False, note=note)
            write_atomic(cache.dir / _ACCEPTED, json.dumps({"issued_at": manifest.issued_at.isoformat()}).encode())
            assert model is not None
            model.wave = wave
            return model
    except ManifestRefused as refusal:
        try:
            cached = cache.current(cache_hit=True, offline=False,
                                   note=f"{refusal}; scoring with the verified cached model")
        except DamagedCacheState as damaged:
            raise DriftloopError(f"{refusal}; and {damaged}") from None
        if cached is None:
            raise DriftloopError(f"{refusal}; no verified model of {cache.name!r} is cached, so nothing is scored") \
                from None
        cached.refused = f"{refusal.cause}: {refusal}"
        logger.warning("%s: %s", cache.name, cached.note)
        return cached
    except DamagedCacheState:
        raise
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        cached = cache.current(cache_hit=True, offline=True,
                               note=f"artifact store unreachable ({exc}); scoring with the cached model")
        if cached is None:
            raise DriftloopError(f"edge agent: cannot reach the artifact store ({exc}) and no model of "
                                 f"{cache.name!r} is cached yet; connect once to fetch it") from None
        logger.warning("%s: %s", cache.name, cached.note)
        return cached
