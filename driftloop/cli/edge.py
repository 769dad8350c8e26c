"""The edge fleet: ``keys init``, ``channel publish``, ``edge score`` (the agent),
``edge rollout`` (one controller step) and ``edge status``."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

from driftloop.cli.common import (
    UsageError,
    add_command,
    add_group,
    check_input,
    int_at_least,
    model_ref,
    registry,
)
from driftloop.errors import DriftloopError


def cmd_keys_init(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.channel import generate_key_pair, key_id, write_key_pair

    public = Path(args.public_key)
    if args.secret_block:
        # The private key goes to a Prefect Secret block (the publisher reads it there);
        # only the public key is written to disk, for the devices.
        from prefect.blocks.system import Secret

        private_pem, public_pem = generate_key_pair()
        Secret(value=private_pem.decode("ascii")).save(args.secret_block, overwrite=args.force)
        public.parent.mkdir(parents=True, exist_ok=True)
        public.write_bytes(public_pem)
        return {"key_id": key_id(public_pem), "private_key": f"secret block {args.secret_block}",
                "public_key": str(public), "set": f"DRIFTLOOP_CHANNEL_KEY_BLOCK={args.secret_block}"}
    private = Path(args.private_key)
    kid = write_key_pair(private, public, overwrite=args.force)
    return {"key_id": kid, "private_key": str(private), "public_key": str(public),
            "set": f"DRIFTLOOP_CHANNEL_KEY_FILE={private.resolve()}"}


def human_keys(p: dict[str, Any]) -> str:
    return (f"key {p['key_id']}\n  private: {p['private_key']} (the publisher; {p['set']})\n"
            f"  public:  {p['public_key']} (copy to every device: driftloop edge score --public-key)")


def _signing_key() -> tuple[Any, bytes]:
    from driftloop.channel import ChannelError, signing_key
    from driftloop.settings import get_settings

    settings = get_settings()
    key = signing_key(settings)
    if key is None:
        raise ChannelError("no channel signing key: set DRIFTLOOP_CHANNEL_KEY_FILE (or DRIFTLOOP_CHANNEL_KEY_BLOCK); "
                           "make one with driftloop keys init")
    return settings, key


def cmd_channel_publish(args: argparse.Namespace) -> dict[str, Any]:
    from datetime import timedelta

    from driftloop.channel import channel_relpath, publish_champion
    from driftloop.storage import ArtifactStore

    settings, key = _signing_key()
    store = ArtifactStore(settings.artifact_root_uri())
    manifest = publish_champion(registry(), store, args.model, key, ttl=timedelta(seconds=settings.channel_ttl_s))
    return {"model": args.model, "channel": store.uri(channel_relpath(args.model)),
            **manifest.model_dump(mode="json")}


def human_channel(p: dict[str, Any]) -> str:
    r = p["rollout"]
    return (f"{p['channel']}: v{p['target']['version']} ({r['state']}, wave {r['wave']} of {r['plan']['waves']}), "
            f"expires {p['expires_at'][:19]}")


def cmd_edge_score(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.settings import get_settings
    from driftloop.tasks.edge import ChannelSource
    from driftloop.tasks.edge_agent import AgentConfig, run_agent

    try:
        public = Path(args.public_key).read_bytes()
    except OSError as exc:
        raise UsageError(f"--public-key {args.public_key}: {exc.strerror}", "usage") from None
    settings = get_settings()
    device = args.device_id or platform.node()
    result = run_agent(AgentConfig(
        model=args.model, input_uri=args.input, output_uri=args.output, cache_root=settings.edge_cache_path(),
        device_id=device, channel=ChannelSource(args.channel, public, device), inbox_uri=args.inbox,
        batch_size=args.batch_size, threads=args.threads,
        outbox_budget_bytes=int(settings.edge_outbox_budget_mb * 1_000_000)))
    return result.model_dump(mode="json")


def human_edge_score(p: dict[str, Any]) -> str:
    lines = [(f"{p['model']} v{p['version']} on {p['device_id']} (wave {p['wave']}): {p['rows_scored']:,} of "
             f"{p['rows_in']:,} rows scored, {p['rows_quarantined']:,} quarantined -> {p['output_uri']}"),
             f"  {p['note']}", f"  rows home: {p['upload']}" + (f" ({p['queued_runs']} run(s) queued)"
                                                                 if p["queued_runs"] else "")]
    if p["refused"]:
        lines.insert(1, f"  REFUSED manifest: {p['refused']}")
    return "\n".join(lines)


def cmd_edge_rollout(args: argparse.Namespace) -> dict[str, Any]:
    from datetime import UTC, datetime, timedelta

    from driftloop.storage import ArtifactStore
    from driftloop.tables import open_tables
    from driftloop.tasks.edge_inbox import ingest_inbox
    from driftloop.tasks.edge_rollout import control

    settings, key = _signing_key()
    store = ArtifactStore(settings.artifact_root_uri())
    reg = registry()
    ingested = ingest_inbox(store, open_tables(reg.engine, store.root), reg, args.model)
    step = control(reg, store, args.model, key, now=datetime.now(UTC), ttl=timedelta(seconds=settings.channel_ttl_s))
    return {"model": args.model, "runs_committed": len(ingested.committed), "rows_committed": ingested.rows,
            "rejected": ingested.rejected, "action": step.action, "version": step.version, "wave": step.wave,
            "state": step.state, "reasons": step.reasons, "figures": step.figures}


def human_edge_rollout(p: dict[str, Any]) -> str:
    return (f"{p['model']}: {p['action']} (v{p['version']}, wave {p['wave']}, {p['state']}): {'; '.join(p['reasons'])}"
            f"\n  edge runs committed: {p['runs_committed']} ({p['rows_committed']:,} rows), rejected: "
            f"{len(p['rejected'])}")


def cmd_edge_status(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.settings import get_settings
    from driftloop.storage import ArtifactStore
    from driftloop.tasks.edge_rollout import fleet_status

    return fleet_status(ArtifactStore(get_settings().artifact_root_uri()), args.model)


def human_edge_status(p: dict[str, Any]) -> str:
    c = p["channel"]
    if c is None:
        return f"{p['model']}: no channel published (driftloop channel publish {p['model']})"
    lines = [(f"{p['model']}: channel v{c['version']} (previous v{c['previous']}), {c['state']}, wave {c['wave']} of "
             f"{c['waves']}, bake {c['bake']}, expires {c['expires_at'][:19]}"),
             "  devices per version (latest run): " + (", ".join(f"v{v}: {n}" for v, n in
                                                                 p["devices_per_version"].items()) or "none yet")]
    for version, stats in c["versions"].items():
        lines.append(f"  v{version}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    if c["telemetry"]:
        lines.append("  judged: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in c["telemetry"].items()))
    if c["aborted"]:
        lines.append(f"  ABORTED v{c['aborted']['version']} in wave {c['aborted']['wave']}: "
                     + "; ".join(c["aborted"]["reasons"]))
    return "\n".join(lines)


def _check_edge_score(args: argparse.Namespace) -> None:
    check_input(args.input, "--input")
    from driftloop.tasks.edge_agent import check_id

    if args.device_id is not None:
        try:
            check_id(args.device_id, "--device-id")
        except DriftloopError as exc:
            raise UsageError(str(exc)) from None


def _model_name(text: str) -> str:
    from driftloop.spec import check_model_name

    try:
        return check_model_name(text)
    except DriftloopError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:
    keys = add_group(sub, "keys", help="the edge channel's signing keys")
    init = add_command(keys, "init", help="make an Ed25519 key pair for the edge channel", handler=cmd_keys_init,
                       human=human_keys,
                       description="The private key signs channels/<model>.json (keep it with the registry side: a "
                                   "file, or a Prefect Secret block); the public key goes to every device.")
    init.add_argument("--private-key", default="channel-key.pem", help="where to write the private key (mode 0600)")
    init.add_argument("--public-key", default="channel-key.pub.pem", help="where to write the public key")
    init.add_argument("--secret-block", metavar="NAME", help="store the private key in this Prefect Secret block "
                                                             "instead of a file")
    init.add_argument("--force", action="store_true", help="replace existing keys (devices must get the new public "
                                                           "key)")

    channel = add_group(sub, "channel", help="the signed edge model channel")
    publish = add_command(channel, "publish", help="sign and publish channels/<model>.json for the champion now "
                                                   "(alias moves do it themselves)",
                          handler=cmd_channel_publish, human=human_channel)
    publish.add_argument("model", type=_model_name, help="model name")

    edge = add_group(sub, "edge", help="edge devices: the agent, the rollout controller, the fleet's status")
    score = add_command(edge, "score", help="score on this device with the model the signed channel assigns it",
                        handler=cmd_edge_score, human=human_edge_score, check=_check_edge_score,
                        description="Needs read access to the artifact store and the channel's public key; no "
                                    "registry. A refused manifest (signature, expiry, artifact hash) is named and the "
                                    "verified cached model keeps serving. Scored rows go home through the store's "
                                    "inbox prefix.")
    score.add_argument("--model", required=True, type=model_ref, help="model name")
    score.add_argument("--input", required=True, help="CSV/Parquet file, directory or glob to score")
    score.add_argument("--output", required=True, help="scoring output directory or prefix on the device")
    score.add_argument("--channel", required=True, help="the channel file: <artifact store>/channels/<model>.json")
    score.add_argument("--public-key", required=True, help="the channel's public key (driftloop keys init)")
    score.add_argument("--device-id", help="this device's stable id (its rollout wave); default: the host name")
    score.add_argument("--inbox", help="where scored rows go home (default <artifact store>/inbox)")
    score.add_argument("--batch-size", type=int_at_least(1), default=100_000, help="rows per batch")
    score.add_argument("--threads", type=int_at_least(1), help="ONNX Runtime threads")

    rollout = add_command(edge, "rollout", help="one controller step: commit uploaded edge rows, then advance or "
                                                "stop the model's rollout and re-sign the channel",
                          handler=cmd_edge_rollout, human=human_edge_rollout)
    rollout.add_argument("--model", required=True, type=_model_name, help="model name")
    status = add_command(edge, "status", help="the channel's waves, devices per version and each version's telemetry",
                         handler=cmd_edge_status, human=human_edge_status)
    status.add_argument("--model", required=True, type=_model_name, help="model name")
