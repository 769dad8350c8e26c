"""driftloop's Prefect Block types. Register them with
``prefect block register -m driftloop.blocks.driftloop_blocks``; then create and edit
instances in the UI, and pass their names to flows."""

from __future__ import annotations

import re

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr, field_validator

from driftloop.redact import mask_uri
from driftloop.spec import MonitoringPolicy

# tcp://host:port or tls://host:port: a DNS name, an IPv4 address or a bracketed IPv6 one.
DASK_ADDRESS_PATTERN = r"^(tcp|tls)://([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$"


class RegistryConnection(Block):
    """Where the model registry lives (a SQLAlchemy URL, password kept secret) and where
    its artifacts go. Flows take its name as ``registry_block``."""

    _block_type_name = "driftloop registry"
    _block_type_slug = "driftloop-registry"
    _description = "driftloop model registry database and artifact store."

    url: SecretStr = Field(description="SQLAlchemy URL, e.g. postgresql+psycopg://user:pass@host/driftloop")
    artifact_root: str | None = Field(default=None, description="Local path or fsspec URI (s3://bucket/prefix)")



class SqlDataSource(Block):
    """A table or query in a SQL database, for ingestion: pass ``sql-block:<name>`` as a
    flow's source (ingest, train, lifecycle, retrain)."""

    _block_type_name = "driftloop SQL source"
    _block_type_slug = "driftloop-sql-source"

    url: SecretStr = Field(description="SQLAlchemy URL of the source database")
    table: str | None = Field(default=None, description="Table to read (schema.table allowed)")
    query: str | None = Field(default=None, description="SELECT with :named parameters")
    params: dict[str, str | int | float | bool | None] = Field(default_factory=dict, description="Values for the query's :named parameters")


def check_dask_address(address: str) -> str:
    """``address`` if it is a Dask scheduler address driftloop connects to (``tcp://`` or
    ``tls://`` host:port, port 1-65535), else a ``ValueError`` that says what to write."""
    if not isinstance(address, str) or re.fullmatch(DASK_ADDRESS_PATTERN, address) is None \
            or not 0 < int(address.rsplit(":", 1)[1]) < 65536:
        shown = mask_uri(address) if isinstance(address, str) else type(address).__name__
        raise ValueError(
            f"Dask scheduler address {shown!r} is not tcp://host:port or tls://host:port; write the scheduler's "
            "address as the flow's worker reaches it, e.g. tcp://dask-scheduler:8786 (no path, user or other scheme)"
        )
    return address


class DaskCluster(Block):
    """An existing Dask cluster that partitioned scoring runs on: its scheduler's address.
    A deployment of the ``score`` flow takes the block's name as ``dask_block``, so a
    platform team points the nightly run at its cluster by picking a block in the UI."""

    _block_type_name = "driftloop Dask cluster"
    _block_type_slug = "driftloop-dask"
    _description = "Dask scheduler that driftloop's partitioned scoring runs on (tcp:// or tls:// host:port)."
    # A pasted address may carry a password: errors show it masked, never the raw input.
    model_config = ConfigDict(hide_input_in_errors=True)

    address: str = Field(
        description="Scheduler address as the flow's worker reaches it, e.g. tcp://dask-scheduler:8786. tls:// "
        "takes its certificates from the worker's Dask config (DASK_DISTRIBUTED__COMM__TLS__* variables).",
        examples=["tcp://dask-scheduler:8786"],
        json_schema_extra={"pattern": DASK_ADDRESS_PATTERN},  # the UI's form checks it too
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_dask_address(value)


class MonitoringPolicyBlock(Block):
    """What monitoring computes and when it asks for retraining (editable in the UI)."""

    _block_type_name = "driftloop monitoring policy"
    _block_type_slug = "driftloop-monitoring-policy"

    policy: MonitoringPolicy = Field(default_factory=MonitoringPolicy)
