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
