"""`make demo` with PREFECT_API_URL naming a server that already holds driftloop's pools
or deployments: refused before anything on it changes, saying what would change, unless
the user says --yes-this-server. The tests' real Prefect server plays the foreign one."""

from __future__ import annotations

from pathlib import Path

import pytest

from driftloop.errors import DriftloopError

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]


class Changed(Exception):
    """Raised where the demo would start changing the server."""


@pytest.fixture()
def edge_pool_on_server():
    """The server holds a pool named like one of ours (someone's production `edge`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            before = client.read_work_pool("edge")
            created = False
        except ObjectNotFound:
            before = client.create_work_pool(WorkPoolCreate(name="edge", type="process", concurrency_limit=7))
            created = True
    yield before
    if created:
        with get_client(sync_client=True) as client:
            client.delete_work_pool("edge")


def _pools() -> dict[str, object]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {p.name: (p.concurrency_limit, p.base_job_template) for p in client.read_work_pools()}


def test_demo_refuses_a_server_holding_our_pools_and_says_what_would_change(
        home: Path, edge_pool_on_server, monkeypatch: pytest.MonkeyPatch) -> None:
    from driftloop.demo import run_loop_demo
    from driftloop.local_stack import LocalStack

    def changed(*_a, **_k):
        raise Changed

    monkeypatch.setattr(LocalStack, "deploy", changed)
    monkeypatch.setattr(LocalStack, "start_workers", changed)
    pools_before = _pools()
    with pytest.raises(DriftloopError) as refused:
        run_loop_demo(trials=1)
    message = str(refused.value)
    # The session's server may hold other tests' pools too: the edge pool is named among them.
    assert "already holds" in message and "work pool edge" in message and "--yes-this-server" in message
    assert "edge (updated: its base job template and concurrency limit reset)" in message
    assert "cpu (created)" in message or "cpu (updated" in message
    assert "start a cpu and a gpu worker" in message and "deployments of prefect.yaml" in message
    assert _pools() == pools_before  # nothing on the server changed

    with pytest.raises(Changed):  # the user said yes: the demo goes on to deploy
        run_loop_demo(trials=1, yes_this_server=True)


def test_what_is_ours_on_a_server_is_read_from_it(edge_pool_on_server) -> None:
    from driftloop.local_stack import ours_on_server

    ours = ours_on_server()
    assert "edge" in ours["pools"] and set(ours["pools"]) <= {"cpu", "gpu", "edge"}
