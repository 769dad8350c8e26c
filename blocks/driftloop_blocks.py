"""driftloop's Prefect Block types. Register them with
``prefect block register -f blocks/driftloop_blocks.py``; then create and edit
instances in the UI, and pass their names to flows."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from driftloop.spec import MonitoringPolicy


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


class MonitoringPolicyBlock(Block):
    """What monitoring computes and when it asks for retraining (editable in the UI)."""

    _block_type_name = "driftloop monitoring policy"
    _block_type_slug = "driftloop-monitoring-policy"

    policy: MonitoringPolicy = Field(default_factory=MonitoringPolicy)
