"""One settings object for driftloop, read from ``DRIFTLOOP_*`` environment variables.

Build it with :func:`get_settings` when you need it; nothing is read at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRIFTLOOP_", extra="ignore")

    home: Path = Field(
        default=Path(".driftloop"),
        description="Working directory for local state: registry database, artifacts, demo data.",
    )
    registry_url: SecretStr | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the registry database, e.g. "
            "postgresql+psycopg://user:pass@host/db. Default: SQLite file under home."
        ),
    )
    artifact_root: str | None = Field(
        default=None,
        description="Where snapshots, quarantines and models go: a local path or fsspec URI "
        "(s3://bucket/prefix). Default: <home>/artifacts.",
    )
    registry_lock_timeout_s: float = Field(
        default=30, gt=0,
        description="How long a write waits for a SQLite registry that another process holds locked before it "
        "fails with an error naming the file.",
    )
    edge_cache_dir: Path | None = Field(
        default=None, description="Where an edge agent keeps verified model artifacts. Default: <home>/edge-cache."
    )
    channel_key_file: Path | None = Field(
        default=None,
        description="Ed25519 private key (PEM, from driftloop keys init) that signs the edge model channel; the "
        "registry side only. Unset, with no channel_key_block: no channel is published.",
    )
    channel_key_block: str | None = Field(
        default=None, description="Name of a Prefect Secret block holding the channel's private key (PEM), instead "
        "of a file.",
    )
    channel_ttl_s: float = Field(
        default=7 * 24 * 3600, gt=0,
        description="How long a signed channel manifest is valid; the edge rollout controller re-signs it on each run.",
    )
    edge_outbox_budget_mb: float = Field(
        default=512, gt=0,
        description="Disk an edge agent may use for scored rows waiting to be sent home; when full it keeps the "
        "oldest and says so loudly.",
    )
    retention_days: float = Field(
        default=90, gt=0, description="driftloop gc removes monitoring runs and Optuna studies older than this."
    )
    optuna_storage: SecretStr | None = Field(
        default=None,
        description=(
            "PostgreSQL URL of the Optuna study database for multi-worker tuning "
            "(train --tuning-workers N > 1) when the registry is not on PostgreSQL, e.g. "
            "postgresql+psycopg://user:pass@host/optuna."
        ),
    )
    dask_address: str | None = Field(
        default=None,
        description="Dask scheduler (tcp://host:8786) that partitioned scoring and tuning workers run on when a "
        "run is not given workers or an address of its own.",
    )
    parity_min_rows: int = Field(
        default=100_000, ge=1,
        description="Rows every scoring form is checked against the native model on before a version is registered "
        "(the promise is 100,000). Lower it only for tests and benchmarks: it is the worker's setting, not a flow "
        "parameter, and each version records the rows it was checked on (parity.rows).",
    )
    device: Literal["cpu", "cuda"] = Field(
        default="cpu", description="Training device; GPU work pools set DRIFTLOOP_DEVICE=cuda."
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    def registry_database_url(self) -> str:
        if self.registry_url is not None:
            return self.registry_url.get_secret_value()
        return f"sqlite:///{self.home_dir / 'registry.db'}"

    def edge_cache_path(self) -> Path:
        return (self.edge_cache_dir or self.home_dir / "edge-cache").expanduser().resolve()

    def artifact_root_uri(self) -> str:
        if self.artifact_root:
            return self.artifact_root.rstrip("/")
        return str(self.home_dir / "artifacts")


def get_settings() -> Settings:
    return Settings()
