"""`driftloop infra apply` against a real Prefect server is idempotent, whoever comes
first: a pool that a starting worker (`prefect worker start --pool NAME` creates a missing
pool) created between apply's read and its create is updated, not an error."""

from __future__ import annotations

import pytest

from driftloop.work_pools import POOLS, apply_pools, load_template

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]


def _delete_pools() -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in POOLS:
            try:
                client.delete_work_pool(name)
            except ObjectNotFound:
                pass


def test_a_pool_created_by_a_worker_between_read_and_create_is_updated(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    _delete_pools()
    real_read = SyncPrefectClient.read_work_pool
    raced: list[str] = []

    def read_then_race(self, name):  # type: ignore[no-untyped-def]
        """Reads the pool for real; when it is missing, creates it as a starting worker
        would (process type, Prefect's default template) before apply gets to create it."""
        try:
            return real_read(self, name)
        except ObjectNotFound:
            self.create_work_pool(WorkPoolCreate(name=name, type="process"))
            raced.append(name)
            raise

    monkeypatch.setattr(SyncPrefectClient, "read_work_pool", read_then_race)
    applied = apply_pools(gpu_device="cpu", gpus=1)
    monkeypatch.undo()

    assert sorted(raced) == sorted(POOLS)  # every create met a pool that already existed
    assert {a["pool"]: a["action"] for a in applied} == {name: "updated" for name in POOLS}
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name in POOLS:
            pool = client.read_work_pool(name)
            # Ours, not the worker's default: the template driftloop applies won.
            assert pool.base_job_template == load_template(name, gpu_device="cpu")
    assert {a["action"] for a in apply_pools(gpu_device="cpu", gpus=1)} == {"updated"}  # and again


def test_missing_pools_are_created() -> None:
    _delete_pools()
    assert {a["action"] for a in apply_pools(gpu_device="cpu", gpus=1)} == {"created"}
