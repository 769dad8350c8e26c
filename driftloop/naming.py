"""Names derived from model names: Prefect artifact keys.

Prefect artifact keys allow lowercase letters, digits and dashes only; model names also
allow ``_``. Replacing ``_`` with ``-`` alone made ``car_loan`` and ``car-loan`` share
every artifact key (one model's card, metrics and monitoring shown as the other's).
:func:`artifact_key` is the one place keys are made.
"""

from __future__ import annotations

import hashlib
import re

_HASH_LIKE = re.compile(r"-[0-9a-f]{8}$")


def artifact_slug(name: str) -> str:
    """``name`` as an artifact-key segment, different for different names.

    A name without ``-`` keeps its readable form (``car_loan`` -> ``car-loan``): on those
    names replacing ``_`` by ``-`` loses nothing. A name with ``-`` (or one whose slug
    would end like a hash suffix) gets ``-`` plus 8 hex digits of its sha256
    (``car-loan`` -> ``car-loan-1d3a...``), so it can never equal a slug of the first kind,
    which never ends in such a suffix.
    """
    slug = name.replace("_", "-")
    if "-" in name or _HASH_LIKE.search(slug):
        return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return slug


def artifact_key(kind: str, name: str) -> str:
    """The Prefect artifact key of ``kind`` (``model-card``, ``monitoring``, ...) for the
    model or dataset ``name``."""
    return f"{kind}-{artifact_slug(name)}"
