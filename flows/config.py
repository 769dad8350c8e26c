"""What a flow run is configured with besides its parameters: the worker's environment
(``DRIFTLOOP_*``), overridden by the Prefect blocks a user names in the UI.

- ``registry_block``: the name of a ``driftloop-registry`` block; its URL and artifact
  root replace ``DRIFTLOOP_REGISTRY_URL`` / ``DRIFTLOOP_ARTIFACT_ROOT`` for the run.
- ``sql-block:<name>`` as a source: the ``driftloop-sql-source`` block of that name. The
  string is what the dataset records as its source, so a drift event can hand it to
  the retrain automation and the retrain reads the same table or query again.
- ``dask_block``: the name of a ``driftloop-dask`` block; its scheduler address is where
  ``score`` runs partitioned scoring (see :func:`dask_block_address`).

:func:`run_settings`, which every flow calls first, refuses a run whose parameters hold a
URI with credentials in it, before anything is logged, read or recorded.
"""

from __future__ import annotations

from driftloop.errors import DriftloopError
from driftloop.redact import refuse_credentials, refuse_credentials_in
from driftloop.settings import Settings, get_settings
from driftloop.tasks.ingest import SqlSource

SQL_BLOCK_PREFIX = "sql-block:"


def refuse_credentials_in_run() -> None:
    """Refuse this flow run when any of its parameters holds a URI with credentials in it
    (see :mod:`driftloop.redact`): before the flow logs, reads or records anything. A
    no-op outside a flow run. Every flow calls it first, through :func:`run_settings`."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is not None and context.parameters:
        refuse_credentials_in(context.parameters)


def run_settings(registry_block: str | None = None) -> Settings:
    """The run's settings; first, the run's parameters are checked for credentials
    (:func:`refuse_credentials_in_run`), and so is the artifact root the settings name."""
    refuse_credentials_in_run()
    settings = get_settings()
    if registry_block:
        from driftloop.blocks.driftloop_blocks import RegistryConnection

        block = _load(RegistryConnection, registry_block, "driftloop-registry")
        settings = settings.model_copy(update={"registry_url": block.url,
                                               "artifact_root": block.artifact_root or settings.artifact_root})
    refuse_credentials(settings.artifact_root_uri(), "the artifact root (DRIFTLOOP_ARTIFACT_ROOT or the registry block's)")
    return settings


def resolve_source(source: str) -> str | SqlSource:
    """A path or URI stays as it is; ``sql-block:<name>`` becomes the block's SQL source."""
    if not source.startswith(SQL_BLOCK_PREFIX):
        return source
    from driftloop.blocks.driftloop_blocks import SqlDataSource

    name = source.removeprefix(SQL_BLOCK_PREFIX)
    block = _load(SqlDataSource, name, "driftloop-sql-source")
    try:
        return SqlSource(url=block.url, table=block.table, query=block.query, params=block.params)
    except ValueError as exc:
        raise DriftloopError(f"{SQL_BLOCK_PREFIX}{name}: the block is incomplete: {exc}; edit it in the UI (Blocks)") from None


def dask_block_address(name: str) -> str:
    """The scheduler address saved in the ``driftloop-dask`` block ``name``, checked again
    here (tcp:// or tls:// host:port): a block edited through the API is input too."""
    from driftloop.blocks.driftloop_blocks import DaskCluster, check_dask_address

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
            f"after `prefect block register -m driftloop.blocks.driftloop_blocks`"
        ) from None
