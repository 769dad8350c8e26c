"""The edge model channel: one signed manifest per model, ``channels/<model>.json`` in the
artifact store, saying which version edge devices run.

Devices hold no registry credentials and no registry URL: they read the manifest and the
artifact from the store (read access only) and check them with the publisher's Ed25519
public key. The registry side re-publishes the manifest on every champion move
(:func:`publish_on_champion_move`, a listener of the registry store) and the rollout
controller re-signs it as waves advance or stop.

The file is ``{"payload": "<canonical JSON>", "signature": "<base64>", "key_id": ...}``:
the signature covers the payload's exact bytes, so no JSON re-serialisation sits between
what was signed and what is checked. Everything in a manifest is untrusted until its
signature checks; after that its fields are still validated (a signed manifest naming
``../`` is refused all the same).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from driftloop.errors import DriftloopError
from driftloop.spec import EdgeRollout, check_model_name

logger = logging.getLogger(__name__)

FORMAT = 1
CHANNELS = "channels"
DEFAULT_TTL = timedelta(days=7)  # the controller's scheduled run re-signs well before this
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

RefusalCause = Literal["unreadable", "signature", "malformed", "model", "expired", "replayed", "artifact_hash"]


class ChannelError(DriftloopError):
    """The channel cannot be published (no signing key, no champion, a bad artifact path)."""


class ManifestRefused(DriftloopError):
    """A manifest (or the artifact it names) failed a check; ``cause`` names which."""

    def __init__(self, cause: RefusalCause, message: str) -> None:
        super().__init__(f"channel manifest refused ({cause}): {message}")
        self.cause = cause


# --- keys ------------------------------------------------------------------------------


def generate_key_pair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as PEM: (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def write_key_pair(private_path: Path, public_path: Path, *, overwrite: bool = False) -> str:
    """Write a new pair (the private key readable by its owner only); returns the key id."""
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise ChannelError(f"{path} exists; keep it (devices trust its public key) or pass --force to replace it")
    private, public = generate_key_pair()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(public)
    return key_id(public)


def key_id(public_pem: bytes) -> str:
    """A short name for a public key (the sha256 of its raw bytes), so a refusal can say
    which key signed and which one the device holds."""
    return hashlib.sha256(_load_public(public_pem).public_bytes_raw()).hexdigest()[:16]


def _load_private(pem: bytes) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ChannelError(f"the channel signing key is not a PEM private key ({exc}); make one: driftloop keys init") \
            from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ChannelError("the channel signing key is not an Ed25519 key; make one: driftloop keys init")
    return key


def _load_public(pem: bytes) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ChannelError(f"the public key is not a PEM public key ({exc}); use the one driftloop keys init wrote") \
            from None
    if not isinstance(key, Ed25519PublicKey):
        raise ChannelError("the public key is not an Ed25519 key; use the one driftloop keys init wrote")
    return key


def public_key_of(private_pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return _load_private(private_pem).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- the manifest ----------------------------------------------------------------------


class ChannelTarget(BaseModel):
    """A version as devices fetch it: its ONNX artifact, relative to the store's root."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1)
    artifact: str = Field(description="Path of the ONNX artifact relative to the artifact store's root.")
    sha256: str

    def checked(self) -> ChannelTarget:
        if not _SAFE_PATH.fullmatch(self.artifact) or ".." in self.artifact.split("/"):
            raise ValueError(f"artifact path {self.artifact!r} is not a plain relative path in the store")
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"sha256 {self.sha256!r} is not 64 lowercase hex digits")
        return self


class Aborted(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int
    wave: int
    at: datetime
    reasons: list[str]
    figures: dict[str, float | int | None]


class RolloutState(BaseModel):
    """Where a rollout stands. ``wave`` is the index of the last wave that runs ``version``;
    devices in later waves run ``previous``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan: EdgeRollout = Field(default_factory=EdgeRollout)
    wave: int = Field(default=0, ge=0)
    state: Literal["rolling", "complete", "aborted"] = "rolling"
    started_at: datetime
    wave_started_at: datetime
    aborted: Aborted | None = None


class ChannelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = FORMAT
    model: str
    target: ChannelTarget
    previous: ChannelTarget | None = None
    rollout: RolloutState
    issued_at: datetime
    expires_at: datetime

    @property
    def version(self) -> int:
        return self.target.version

    def for_device(self, device_id: str) -> tuple[ChannelTarget, int]:
        """The version this device runs now, and the device's wave."""
        wave = device_wave(self.model, device_id, self.rollout.plan.waves)
        if self.previous is None or self.rollout.state == "complete":
            return self.target, wave
        if self.rollout.state == "aborted":
            return self.previous, wave
        return (self.target if wave <= self.rollout.wave else self.previous), wave


def device_share(model: str, device_id: str) -> float:
    """A device's stable place in [0, 1) for a model: the same on every run and every
    machine (sha256, not Python's salted hash)."""
    digest = hashlib.sha256(f"{model}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def device_wave(model: str, device_id: str, waves: list[float]) -> int:
    """Index of the first wave whose cumulative share covers the device."""
    share = device_share(model, device_id)
    for index, cumulative in enumerate(waves):
        if share < cumulative:
            return index
    return len(waves) - 1


def sign(manifest: ChannelManifest, private_pem: bytes) -> bytes:
    """The channel file's bytes: the canonical payload and its signature."""
    payload = json.dumps(manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    key = _load_private(private_pem)
    signature = key.sign(payload.encode("utf-8"))
    document = {"payload": payload, "signature": base64.b64encode(signature).decode("ascii"),
                "key_id": key_id(public_key_of(private_pem))}
    return json.dumps(document, indent=1).encode("utf-8")


def verify(data: bytes, public_pem: bytes, *, model: str, now: datetime | None = None,
           not_before: datetime | None = None) -> ChannelManifest:
    """The manifest in ``data``, only if it is signed by ``public_pem``'s key, is for
    ``model``, has not expired, and (``not_before``: the issue time of the last manifest
    this device accepted) is not older than one already accepted. Otherwise
    :class:`ManifestRefused` naming the check that failed."""
    from cryptography.exceptions import InvalidSignature

    now = now or datetime.now(UTC)
    try:
        document = json.loads(data.decode("utf-8"))
        payload, signature = document["payload"], base64.b64decode(document["signature"], validate=True)
        if not isinstance(payload, str):
            raise TypeError("payload is not a string")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ManifestRefused("unreadable", f"not a signed channel file ({type(exc).__name__}: {exc})") from None
    public = _load_public(public_pem)
    try:
        public.verify(signature, payload.encode("utf-8"))
    except InvalidSignature:
        signer = document.get("key_id") if isinstance(document.get("key_id"), str) else "unknown"
        raise ManifestRefused("signature", f"the signature does not check with this device's public key "
                              f"(key id {key_id(public_pem)}; the manifest names key id {signer[:32]}): signed by "
                              "another key, or modified after signing") from None
    try:
        manifest = ChannelManifest.model_validate_json(payload)
        manifest.target.checked()
        if manifest.previous is not None:
            manifest.previous.checked()
        if manifest.issued_at.tzinfo is None or manifest.expires_at.tzinfo is None:
            raise ValueError("issued_at and expires_at must carry a time zone")
    except (ValidationError, ValueError) as exc:
        raise ManifestRefused("malformed", f"signed, but not a valid manifest: {str(exc).splitlines()[0]}") from None
    if manifest.model != model:
        raise ManifestRefused("model", f"the manifest is for model {manifest.model!r}, not {model!r}")
    if manifest.expires_at <= now:
        raise ManifestRefused("expired", f"expired at {manifest.expires_at.isoformat(timespec='seconds')} (now "
                              f"{now.isoformat(timespec='seconds')}); the rollout controller re-signs it on its "
                              "schedule: check that it runs")
    if not_before is not None and manifest.issued_at < not_before:
        raise ManifestRefused("replayed", f"issued at {manifest.issued_at.isoformat()}, older than the manifest this "
                              f"device already accepted ({not_before.isoformat()}): an old manifest put back")
    return manifest


# --- publishing (the registry side) ----------------------------------------------------


def channel_relpath(model: str) -> str:
    return f"{CHANNELS}/{check_model_name(model)}.json"


def store_root_of_channel(channel_uri: str) -> str:
    """The artifact store's root, from a channel URI ``<root>/channels/<model>.json``:
    the device reads artifacts relative to it."""
    head, sep, _ = channel_uri.rstrip("/").rpartition(f"/{CHANNELS}/")
    if not sep:
        raise ChannelError(f"channel {channel_uri!r} is not <artifact root>/{CHANNELS}/<model>.json")
    return head


def relative_artifact(store_root: str, uri: str) -> str:
    """``uri`` (a registered artifact) relative to the store root the devices read."""
    root = store_root.rstrip("/") + "/"
    if not uri.startswith(root):
        raise ChannelError(f"artifact {uri} is not under the artifact store {store_root}; devices read only the store")
    return uri[len(root):]


def target_of(record: Any, store_root: str) -> ChannelTarget:
    return ChannelTarget(version=record.version, artifact=relative_artifact(store_root, record.onnx_uri),
                         sha256=record.onnx_sha256).checked()


def read_manifest_unverified(store: Any, model: str) -> ChannelManifest | None:
    """The publisher's own view of the current channel (its own store, its own
    signature): used to carry the rollout state forward."""
    relpath = channel_relpath(model)
    if not store.exists(relpath):
        return None
    with store.fs.open(store.path(relpath), "rb") as fh:
        document = json.loads(fh.read().decode("utf-8"))
    return ChannelManifest.model_validate_json(document["payload"])


def new_manifest(model: str, target: ChannelTarget, previous: ChannelTarget | None, plan: EdgeRollout, *,
                 now: datetime, ttl: timedelta = DEFAULT_TTL) -> ChannelManifest:
    """A manifest that starts rolling ``target`` out in ``plan``'s first wave (all devices
    at once when there is no previous version)."""
    state = "complete" if previous is None or previous.sha256 == target.sha256 else "rolling"
    return ChannelManifest(
        model=model, target=target, previous=None if state == "complete" else previous,
        rollout=RolloutState(plan=plan, wave=len(plan.waves) - 1 if state == "complete" else 0, state=state,
                             started_at=now, wave_started_at=now),
        issued_at=now, expires_at=now + ttl)


def resign(manifest: ChannelManifest, *, now: datetime, ttl: timedelta = DEFAULT_TTL, **changes: Any) -> ChannelManifest:
    return manifest.model_copy(update={"issued_at": now, "expires_at": now + ttl, **changes})


def write_manifest(store: Any, manifest: ChannelManifest, private_pem: bytes) -> str:
    """Sign and write the channel file in one PUT (readers see the old file or the new)."""
    return store.write_bytes(channel_relpath(manifest.model), sign(manifest, private_pem))


def publish_champion(registry: Any, store: Any, model: str, private_pem: bytes, *, plan: EdgeRollout | None = None,
                     now: datetime | None = None, ttl: timedelta = DEFAULT_TTL) -> ChannelManifest:
    """Point the channel at the registry's champion of ``model``: a new rollout from the
    version devices run now (the channel's current target) to the champion. Unchanged
    champion: the manifest is re-signed with its rollout state as it is."""
    now = now or datetime.now(UTC)
    champion = registry.find_alias(model, "champion")
    if champion is None:
        raise ChannelError(f"model {model!r} has no champion; nothing to publish")
    target = target_of(champion, store.root)
    current = read_manifest_unverified(store, model)
    if current is not None and current.target.sha256 == target.sha256:
        manifest = resign(current, now=now, ttl=ttl)
    else:
        # What most of the fleet runs now: a rollout that did not complete left most
        # devices on ``previous``.
        running = None
        if current is not None:
            running = current.target if current.rollout.state == "complete" else current.previous
        if plan is None:
            plan = plan_of(champion)
        manifest = new_manifest(model, target, running, plan, now=now, ttl=ttl)
        if current is not None and current.previous is not None and current.previous.sha256 == target.sha256:
            # Back to the version the fleet ran before (a rollback): every device at once.
            manifest = manifest.model_copy(update={"previous": current.target, "rollout": manifest.rollout.model_copy(
                update={"state": "complete", "wave": len(plan.waves) - 1})})
    write_manifest(store, manifest, private_pem)
    logger.info("channel %s: v%d (%s, wave %d)", model, manifest.version, manifest.rollout.state, manifest.rollout.wave)
    return manifest


def plan_of(record: Any) -> EdgeRollout:
    """The edge rollout plan of the spec the version was trained with (carried in its
    ONNX artifact); one wave (every device at once) when the spec has none."""
    import fsspec

    from driftloop.onnx_model import load_model

    with fsspec.open(record.onnx_uri, "rb") as fh:
        data = fh.read()
    if hashlib.sha256(data).hexdigest() != record.onnx_sha256:
        raise ChannelError(f"{record.model_name} v{record.version}: artifact {record.onnx_uri} does not match its "
                           "registered sha256; nothing published")
    spec = load_model(data, threads=1).spec()
    edge = getattr(getattr(spec, "rollout", None), "edge", None)
    return edge if edge is not None else EdgeRollout()


def signing_key(settings: Any) -> bytes | None:
    """The channel's private key: a file (``DRIFTLOOP_CHANNEL_KEY_FILE``) or a Prefect
    Secret block (``DRIFTLOOP_CHANNEL_KEY_BLOCK``), read at run time; None when neither is
    set (no channel is published)."""
    if settings.channel_key_file is not None:
        path = Path(settings.channel_key_file).expanduser()
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ChannelError(f"channel signing key {path}: {exc.strerror}; make one with driftloop keys init") \
                from None
    if settings.channel_key_block:
        from prefect.blocks.system import Secret

        value = Secret.load(settings.channel_key_block).get()
        return (value if isinstance(value, str) else json.dumps(value)).encode("utf-8")
    return None


def publish_on_champion_move(registry: Any, model: str) -> None:
    """What the registry store calls after a champion moves: re-publish that model's
    channel. The settings are read at each call (a key configured after the registry was
    opened counts); with no signing key configured nothing is published."""
    from driftloop.settings import get_settings
    from driftloop.storage import ArtifactStore

    settings = get_settings()
    key = signing_key(settings)
    if key is None:
        return
    publish_champion(registry, ArtifactStore(settings.artifact_root_uri()), model, key,
                     ttl=timedelta(seconds=settings.channel_ttl_s))
