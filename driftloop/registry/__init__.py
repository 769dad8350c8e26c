"""The registry: what driftloop knows about datasets, models, aliases, scoring runs,
monitoring results and retrains, in one SQL database with a versioned schema."""

from driftloop.registry.store import (
    ChampionChanged,
    DatasetRecord,
    IncompleteVersion,
    ModelNotFound,
    ModelVersionRecord,
    RegistryStore,
    ScoringRunRecord,
    VersionDraft,
    open_registry,
)

__all__ = [
    "ChampionChanged", "DatasetRecord", "IncompleteVersion", "ModelNotFound", "ModelVersionRecord", "RegistryStore", "ScoringRunRecord",
    "VersionDraft", "open_registry",
]
