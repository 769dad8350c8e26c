"""Talking to a real Prefect server's REST API from tests: patient requests and polling."""

from __future__ import annotations

import time

import httpx

RETRYABLE = {429, 502, 503, 504}  # what Prefect's own client retries; 503 = its SQLite was busy


def api(server, method: str, path: str, **kwargs):
    # The server shares two cores with the workers' training runs and answers 503 while
    # its SQLite database is locked: be patient with it, as Prefect's client is.
    attempts = 8
    for attempt in range(attempts):
        try:
            response = httpx.request(method, f"{server.api_url}{path}", timeout=120, **kwargs)
        except httpx.TransportError:
            if attempt == attempts - 1:
                raise
        else:
            if response.status_code not in RETRYABLE or attempt == attempts - 1:
                break
        time.sleep(min(2 * (attempt + 1), 10))
    response.raise_for_status()
    return response.json() if response.content else None


def wait_for(predicate, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
