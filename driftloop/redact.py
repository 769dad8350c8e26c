"""Credentials out of what is stored and shown: a source given as
``s3://key:secret@bucket/...`` or ``https://user:token@host/...?sig=...`` is recorded in
the registry, artifacts, logs and events with its secrets replaced by ``***``."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that carry credentials (pre-signed URLs, SAS tokens, API keys).
SECRET_PARAMS = {
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
    "sig", "signature", "token", "access_token", "api_key", "apikey", "key", "password", "secret", "sas", "se",
    "code", "client_secret",
}


def mask_uri(uri: str) -> str:
    """``uri`` with its password (or lone token) in the userinfo and its secret query
    parameters masked; anything that is not a URL comes back unchanged."""
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri.split("://", 1)[0] + "://" + MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if sep else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
