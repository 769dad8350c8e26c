"""Artifact keys: one per model name, valid for Prefect, readable for ordinary names."""

from __future__ import annotations

import itertools
import re

from driftloop.naming import artifact_key, artifact_slug
from driftloop.spec import MODEL_NAME


def test_car_loan_and_car_hyphen_loan_do_not_share_artifact_keys() -> None:
    assert artifact_key("model-card", "car_loan") != artifact_key("model-card", "car-loan")
    assert artifact_key("monitoring", "car_loan") == "monitoring-car-loan"  # the demo's keys stay readable
    assert artifact_key("retrain", "loans") == "retrain-loans"


def test_slugs_are_distinct_for_distinct_names_and_valid_keys() -> None:
    # Every name over a small alphabet with _ and -, plus names that look like a hashed slug.
    names = {"a" + "".join(p) for n in range(5) for p in itertools.product("b_-1", repeat=n)}
    names |= {"car_loan-" + artifact_slug("car-loan").rsplit("-", 1)[1], "car-" + artifact_slug("car-loan").rsplit("-", 1)[1],
              "car_loan_1234abcd", "car-loan-1234abcd", "car_loan"}
    names = {n for n in names if MODEL_NAME.fullmatch(n)}
    slugs = {artifact_slug(n) for n in names}
    assert len(slugs) == len(names)
    assert all(re.fullmatch(r"[a-z0-9-]+", artifact_key("model-card", n)) for n in names)
