"""Registry database URLs as they may be shown: passwords masked."""

from __future__ import annotations

from sqlalchemy.engine import make_url

from driftloop.redact import MASK, mask_uri


def masked_url(url: str) -> str:
    """The URL with any password (in the user part or a ``?password=`` parameter) replaced
    by ***, safe to log and show; a string that is not a URL is shown as ``***`` only."""
    if "://" not in url:
        return MASK
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: show only its scheme
        return url.split("://", 1)[0] + "://" + MASK
    return mask_uri(shown)
