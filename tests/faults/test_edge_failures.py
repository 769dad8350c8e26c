"""The edge agent rides out an outage on its cached model, and only an outage: a
configuration error fails the run, and a model name never walks out of the cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from driftloop.errors import RegistryError, SpecError, is_unreachable
from driftloop.registry.store import open_registry
from driftloop.tasks.edge import ModelCache, refresh


def cached(tmp_path: Path) -> ModelCache:
    cache = ModelCache(tmp_path / "cache", "loans")
    data = b"an artifact fetched while online"
    cache.install(3, hashlib.sha256(data).hexdigest(), data, "s3://bucket/models/loans.onnx")
    return cache


def test_an_unreachable_registry_falls_back_to_the_cache(tmp_path: Path) -> None:
    cache = cached(tmp_path)
    model = refresh(cache, lambda: open_registry("postgresql+psycopg://edge@127.0.0.1:1/registry").resolve("loans"))
    assert model.offline and model.version == 3 and "unreachable" in model.note


@pytest.mark.postgres
def test_a_configuration_error_fails_instead_of_scoring_with_a_stale_model(tmp_path: Path, postgres) -> None:
    cache = cached(tmp_path)
    wrong_database = postgres.url.rsplit("/", 1)[0] + "/no_such_registry"
    with pytest.raises(RegistryError, match="no_such_registry") as err:
        refresh(cache, lambda: open_registry(wrong_database).resolve("loans"))
    assert not is_unreachable(err.value)


def test_any_other_failure_is_not_taken_for_an_outage(tmp_path: Path) -> None:
    cache = cached(tmp_path)

    def revoked():
        raise PermissionError(13, "Access Denied (the credential was revoked)")

    with pytest.raises(PermissionError):
        refresh(cache, revoked)


@pytest.mark.parametrize("name", ["../..", "../../etc", "a/b", "Loans", "", "car_loan\n", "car_loan\n/../x"])
def test_a_model_name_never_becomes_a_path_outside_the_cache(tmp_path: Path, name: str) -> None:
    with pytest.raises(SpecError, match="not a driftloop model name"):
        ModelCache(tmp_path / "cache", name)
