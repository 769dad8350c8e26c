"""The registry: what driftloop knows about datasets (and, later, models, aliases,
scoring runs and monitoring results), in one SQL database with a versioned schema."""

from driftloop.registry.store import (
    DatasetRecord,
    ModelNotFound,
    ModelVersionRecord,
    RegistryStore,
    ScoringRunRecord,
    open_registry,
)

__all__ = ["DatasetRecord", "ModelNotFound", "ModelVersionRecord", "RegistryStore", "ScoringRunRecord", "open_registry"]
