"""What a flow run is configured with besides its parameters: the worker's environment
(``DRIFTLOOP_*``), overridden by the Prefect blocks a user names in the UI.

- ``registry_block``: the name of a ``driftloop-registry`` block; its URL and artifact
  root replace ``DRIFTLOOP_REGISTRY_URL`` / ``DRIFTLOOP_ARTIFACT_ROOT`` for the run.
- ``sql-block:<name>`` as a source: the ``driftloop-sql-source`` block of that name. The
  string is what the dataset records as its source, so a drift event can hand it to
  the retrain automation and the retrain reads the same table or query again.
- ``dask_block``: the name of a ``driftloop-dask`` block; its scheduler address is where
  ``score`` runs partitioned scoring (see :func:`dask_block_address`).
"""

from __future__ import annotations

from driftloop.errors import DriftloopError
from driftloop.settings import Settings, get_settings
from tasks.ingest import SqlSource

SQL_BLOCK_PREFIX = "sql-block:"


def run_settings(registry_block: str | None = None) -> Settings:
    settings = get_settings()
    if not registry_block:
        return settings
    from blocks.driftloop_blocks import RegistryConnection

    block = _load(RegistryConnection, registry_block, "driftloop-registry")
    return settings.model_copy(update={"registry_url": block.url, "artifact_root": block.artifact_root or settings.artifact_root})


def resolve_source(source: str) -> str | SqlSource:
    """A path or URI stays as it is; ``sql-block:<name>`` becomes the block's SQL source."""
    if not source.startswith(SQL_BLOCK_PREFIX):
        return source
    from blocks.driftloop_blocks import SqlDataSource

    name = source.removeprefix(SQL_BLOCK_PREFIX)
    block = _load(SqlDataSource, name, "driftloop-sql-source")
    try:
        return SqlSource(url=block.url, table=block.table, query=block.query, params=block.params)
    except ValueError as exc:
        raise DriftloopError(f"{SQL_BLOCK_PREFIX}{name}: the block is incomplete: {exc}; edit it in the UI (Blocks)") from None


def dask_block_address(name: str) -> str:
    """The scheduler address saved in the ``driftloop-dask`` block ``name``, checked again
    here (tcp:// or tls:// host:port): a block edited through the API is input too."""
    from blocks.driftloop_blocks import DaskCluster, check_dask_address

    try:
        block = _load(DaskCluster, name, "driftloop-dask")
    except RuntimeError as exc:  # Prefect's "failed validation": say which value and how to fix it
        cause = exc.__cause__
        detail = "; ".join(e["msg"].removeprefix("Value error, ") for e in cause.errors()) if hasattr(cause, "errors") \
            else str(exc)
        raise DriftloopError(f"the driftloop-dask block {name!r} is invalid: {detail}; edit it in the UI (Blocks)") from None
    try:
        return check_dask_address(block.address)
    except ValueError as exc:
        raise DriftloopError(f"the driftloop-dask block {name!r} is invalid: {exc}; edit it in the UI (Blocks)") from None


def _load(block_type, name: str, slug: str):
    try:
        return block_type.load(name)
    except ValueError as exc:
        raise DriftloopError(
            f"cannot load the {slug} block {name!r} ({exc}); create it in the UI (Blocks) or in Python "
            f"after `prefect block register -f blocks/driftloop_blocks.py`"
        ) from None
