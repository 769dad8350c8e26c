"""What a database driver's failure means for the registry: locked, unreachable (an
outage: an edge agent may ride it out on its cache) or refused (configuration), as one
error that says what to do."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from driftloop.errors import RegistryError, RegistryUnreachable
from driftloop.registry.urls import masked_url

_NETWORK_FAILURE = re.compile(
    r"connection refused|could not connect|timeout expired|timed out|could not translate host name|"
    r"no route to host|network is unreachable|name or service not known|connection reset",
    re.IGNORECASE,
)
# A server that went away under an open connection (restart, failover, admin shutdown).
_CONNECTION_LOST = re.compile(
    r"server closed the connection|terminating connection|connection .*closed|the database system is "
    r"(shutting down|starting up|in recovery mode)|consuming input failed|SSL SYSCALL error",
    re.IGNORECASE,
)


def _reason(exc: OperationalError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)


def operational_error(url: Any, exc: OperationalError) -> RegistryError:
    """The registry error for a driver failure: locked, unreachable or refused."""
    reason = _reason(exc)
    shown = masked_url(str(url))
    if "database is locked" in reason:
        return RegistryError(
            f"the registry database {shown} is locked by another process and stayed locked past "
            "DRIFTLOOP_REGISTRY_LOCK_TIMEOUT_S; nothing was written: find the process holding it "
            f"(fuser {make_url(str(url)).database}) and run again, or use a PostgreSQL registry for many writers"
        )
    if _NETWORK_FAILURE.search(reason) or _CONNECTION_LOST.search(reason):
        return RegistryUnreachable(
            f"lost the registry database {shown}: {reason}; nothing of the interrupted step was written: "
            "run again when the database is back"
        )
    return RegistryError(f"registry database {shown}: {reason}")


def open_error(url: str, exc: OperationalError) -> RegistryError:
    """The registry error for a failure to open (and upgrade) the database at ``url``."""
    reason = _reason(exc)
    if "database is locked" in reason:
        return operational_error(url, exc)
    # Refused credentials or a missing database are configuration errors; a host that
    # does not answer is an outage (an edge agent may ride it out on its cache).
    error = RegistryUnreachable if _NETWORK_FAILURE.search(reason) else RegistryError
    return error(
        f"cannot open the registry database {masked_url(url)}: {reason}; "
        "check DRIFTLOOP_REGISTRY_URL (host, port, credentials) or DRIFTLOOP_HOME"
    )
