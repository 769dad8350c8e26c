"""Credentials out of what is run, stored and shown.

The rule: **a URI with credentials in it is refused before anything runs**
(:func:`refuse_credentials`, called by the input reader, the command line and every flow
at its start). Credentials come from the environment, fsspec's configuration, a Prefect
Secret or a driftloop block. What counts as credentials: a user part with a password
(``s3://key:secret@bucket/...``, also when the secret holds ``/``, ``#`` or ``?``), a lone
token as the user part of an HTTP(S) or FTP URL (``https://token@host/...``), or a query parameter that carries one
(pre-signed ``?X-Amz-Signature=...``, ``?sig=...``, ``?password=...``).

:func:`mask_uri` is still what is shown wherever a URI is: a URI that slipped past (a
database URL in an error message) appears with its secrets as ``***``. It masks
conservatively: when it cannot tell a path from a secret, it masks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from driftloop.errors import CredentialsInUri

MASK = "***"
# Query parameters that carry credentials (pre-signed URLs, SAS tokens, API keys).
SECRET_PARAMS = {
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
    "sig", "signature", "token", "access_token", "api_key", "apikey", "key", "password", "secret", "sas", "se",
    "code", "client_secret",
}
# Object-store schemes: a bucket or container name never has a port, so any ':' before
# the first '/' is a user part's password.
_NO_PORT_SCHEMES = {"s3", "s3a", "s3n", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}
# Where a lone user part (no password) is a token by convention (``https://TOKEN@host``);
# elsewhere (``postgresql://scorer@db``, ``sftp://ann@host``) it is a user name.
_TOKEN_USER_SCHEMES = {"http", "https", "ftp", "ftps", "ws", "wss"}
SAFE_WAYS = ("give credentials through the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
             "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*), fsspec's configuration, a Prefect Secret "
             "(--sql-secret) or a driftloop block, never in the URI")


def _split(uri: str) -> tuple[str, str | None, str] | None:
    """``(scheme, userinfo or None, the rest after the userinfo)`` of a URL; None when
    ``uri`` is not one (no ``scheme://``).

    By the RFC the user part ends at the last ``@`` before the first ``/``, ``?`` or
    ``#``. A secret holding one of those (half of AWS secret keys hold ``/``) ends the
    authority early, so: when an ``@`` follows and the authority holds a ``:`` that is not
    a port, everything up to the last ``@`` is taken as the user part; so too when the user
    part holds a password and another ``@`` follows (a password holding ``@`` and ``/``)."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not scheme or any(c in scheme for c in "/?#@"):
        return None
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:end]
    last = rest.rfind("@")
    if "@" in authority:
        at = authority.rfind("@")
        if ":" in rest[:at] and last > end:  # a password holding '@' and then '/', '?' or '#'
            at = last
        return scheme, rest[:at], rest[at + 1:]
    at = last
    if at > end:
        host = authority.rsplit("]", 1)[-1] if authority.startswith("[") else authority  # [::1]:8080
        _, colon, port = host.partition(":")
        is_port = port.isdigit() and len(port) <= 5 and scheme.lower() not in _NO_PORT_SCHEMES
        if colon and not is_port:
            return scheme, rest[:at], rest[at + 1:]
    return scheme, None, rest


def _token_user(scheme: str) -> bool:
    return scheme.lower().rsplit("+", 1)[-1] in _TOKEN_USER_SCHEMES


def _secret_params(query: str) -> list[str]:
    return [k for k, _ in parse_qsl(query, keep_blank_values=True) if k.lower() in SECRET_PARAMS]


def credentials_in(uri: str) -> list[str]:
    """What in ``uri`` is a credential, in words (never the values); empty when nothing is."""
    parts = _split(uri)
    if parts is None:
        return []
    scheme, userinfo, rest = parts
    found = []
    if userinfo is not None and ":" in userinfo:
        found.append("a password in its user part")
    elif userinfo is not None and _token_user(scheme):
        found.append("a token as its user part")
    try:
        query = urlsplit(f"{scheme}://{rest}").query
    except ValueError:
        query = rest.partition("?")[2]
    found += [f"the query parameter {k}" for k in dict.fromkeys(_secret_params(query))]
    return found


def mask_uri(uri: str) -> str:
    """``uri`` with its password (or lone token) in the user part and its secret query
    parameters masked (and the fragment, which may be the rest of a secret holding
    ``#``); anything that is not a URL comes back unchanged."""
    parts = _split(uri)
    if parts is None:
        return uri
    scheme, userinfo, rest = parts
    prefix = ""
    if userinfo is not None:
        user, sep, _ = userinfo.partition(":")
        if sep:
            prefix = f"{user}:{MASK}@" if user else f"{MASK}@"
        else:
            prefix = f"{MASK}@" if _token_user(scheme) else f"{user}@"
    try:
        split = urlsplit(f"{scheme}://{rest}")
    except ValueError:
        return f"{scheme}://{MASK}"
    query, fragment = split.query, split.fragment
    if query and _secret_params(query):
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*")
        fragment = MASK if fragment else fragment
    return urlunsplit((split.scheme, prefix + split.netloc, split.path, query, fragment))


def refuse_credentials(uri: str, what: str = "input") -> str:
    """``uri`` itself when it holds no credentials; else :class:`CredentialsInUri`, whose
    message names ``what`` and the masked URI (never the secret) and the safe ways."""
    found = credentials_in(uri)
    if found:
        raise CredentialsInUri(f"{what} {mask_uri(uri)} holds credentials ({', '.join(found)}); a URI with "
                               f"credentials is refused before anything runs: {SAFE_WAYS}")
    return uri


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    from pydantic import BaseModel, SecretStr

    if isinstance(value, str):
        yield path, value
    elif isinstance(value, SecretStr):
        yield path, value.get_secret_value()
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _strings(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


def refuse_credentials_in(parameters: Mapping[str, Any]) -> None:
    """Refuse a flow's (or command's) parameters when any string in them, nested in models,
    lists and dicts included, is a URI with credentials. Every flow calls this at its
    start (:func:`flows.config.run_settings`), before it logs, reads or records anything."""
    for name, value in parameters.items():
        for path, text in _strings(value, name):
            refuse_credentials(text, f"parameter {path}:")
