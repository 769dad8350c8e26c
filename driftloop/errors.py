"""Errors a user can cause. Each message names the thing at fault and the fix."""

from __future__ import annotations


class DriftloopError(Exception):
    """Base class: the CLI prints ``str(error)`` as one line and exits non-zero."""


class SpecError(DriftloopError):
    """The dataset spec file is missing, unreadable or invalid."""


class SourceError(DriftloopError):
    """The input cannot be read at all (missing file, empty file, unreachable database)."""


class SchemaError(DriftloopError):
    """The input as a whole does not fit the spec (for example a required column is missing)."""


class RejectLimitExceeded(DriftloopError):
    """More rows failed validation than the spec's ``max_reject_fraction`` allows."""

    def __init__(self, message: str, quarantine_uri: str | None) -> None:
        super().__init__(message)
        self.quarantine_uri = quarantine_uri


class RegistryError(DriftloopError):
    """The registry database cannot be reached or is at an unexpected schema version."""


class ModelNotFound(DriftloopError):
    """No such model, version or alias."""


class Unreachable(DriftloopError):
    """A service (registry database, artifact store) could not be reached over the network."""


class RegistryUnreachable(RegistryError, Unreachable):
    """The registry database's host did not answer (as opposed to refusing the credentials)."""


# Network-level failures: the only ones an edge agent may ride out on its cached model.
_NETWORK_ERRNOS = {101, 104, 110, 111, 113}  # ENETUNREACH, ECONNRESET, ETIMEDOUT, ECONNREFUSED, EHOSTUNREACH
_NETWORK_ERROR_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
                        "ServerDisconnectedError", "ConnectError", "ConnectTimeout"}


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says a host could not be reached."""
    import socket

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, Unreachable | ConnectionError | TimeoutError | socket.gaierror):
            return True
        if isinstance(current, OSError) and current.errno in _NETWORK_ERRNOS:
            return True
        if {c.__name__ for c in type(current).__mro__} & _NETWORK_ERROR_NAMES:
            return True
        current = current.__cause__ or current.__context__
    return False


class CredentialsInUri(SourceError):
    """A URI with credentials in it (a password, a token, a signature); refused before anything runs."""
