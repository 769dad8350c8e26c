"""The ``driftloop-dask`` block: a Dask scheduler address a user picks in the UI. It takes
only tcp:// or tls:// host:port (refusing anything else with an error that says what to
write, a pasted password masked); the score flow resolves a saved block by name when the
run starts, and an explicit ``dask_address`` wins over it."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from driftloop.blocks.driftloop_blocks import DaskCluster, check_dask_address
from driftloop.errors import DriftloopError


@pytest.mark.parametrize("address", [
    "tcp://dask-scheduler:8786", "tls://scheduler.dask.svc.cluster.local:8786", "tcp://10.0.0.7:8786",
    "tcp://[::1]:8786", "tcp://localhost:1", "tls://a:65535",
])
def test_tcp_and_tls_host_port_addresses_are_taken(address: str) -> None:
    assert DaskCluster(address=address).address == address
    assert check_dask_address(address) == address


@pytest.mark.parametrize("address", [
    "dask-scheduler:8786",            # no scheme
    "http://dask-scheduler:8786",     # a dashboard URL, not the scheduler
    "inproc://dask-scheduler:8786",
    "tcp://dask-scheduler",           # no port
    "tcp://dask-scheduler:0", "tcp://dask-scheduler:65536", "tcp://dask-scheduler:port",
    "tcp://dask-scheduler:8786/",     # a path
    "tcp://dask-scheduler:8786?x=1",
    " tcp://dask-scheduler:8786", "tcp://dask scheduler:8786", "tcp://-scheduler:8786", "",
])
def test_anything_else_is_refused_saying_what_to_write(address: str) -> None:
    with pytest.raises(ValidationError, match=r"is not tcp://host:port or tls://host:port.*tcp://dask-scheduler:8786"):
        DaskCluster(address=address)
    with pytest.raises(ValueError, match="is not tcp://host:port"):
        check_dask_address(address)


def test_a_pasted_password_is_refused_and_never_shown() -> None:
    with pytest.raises(ValidationError) as refused:
        DaskCluster(address="tcp://admin:hunter2@dask-scheduler:8786")
    assert "hunter2" not in str(refused.value)
    assert "tcp://admin:***@dask-scheduler:8786" in str(refused.value)


def test_the_ui_form_gets_the_same_rule() -> None:
    schema = DaskCluster.model_json_schema()["properties"]["address"]
    assert schema["pattern"].startswith("^(tcp|tls)://")
    assert schema["description"]
    assert DaskCluster.get_block_type_slug() == "driftloop-dask"


def test_nothing_is_loaded_on_import() -> None:
    """Importing the flow and the blocks loads no block (only a run with dask_block does)."""
    import subprocess
    import sys

    code = (
        "from prefect.blocks.core import Block\n"
        "def refuse(*a, **k): raise SystemExit('Block.load on import')\n"
        "Block.load = Block.aload = classmethod(refuse)\n"
        "import driftloop.blocks.driftloop_blocks, driftloop.flows.config, driftloop.flows.score\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_server")
class TestSavedBlock:
    def test_a_saved_block_resolves_by_name(self) -> None:
        from driftloop.flows.config import dask_block_address

        name = f"dask-{uuid.uuid4().hex[:8]}"
        DaskCluster(address="tcp://dask-scheduler:8786").save(name)
        assert dask_block_address(name) == "tcp://dask-scheduler:8786"

    def test_a_missing_block_names_itself_and_the_fix(self) -> None:
        from driftloop.flows.config import dask_block_address

        with pytest.raises(DriftloopError, match=r"driftloop-dask block 'no-such-cluster'.*create it in the UI"):
            dask_block_address("no-such-cluster")

    def test_a_block_edited_into_a_bad_address_is_refused_when_loaded(self) -> None:
        """A block changed through the API is input: it is checked again on load."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import BlockDocumentUpdate

        from driftloop.flows.config import dask_block_address

        name = f"dask-{uuid.uuid4().hex[:8]}"
        DaskCluster(address="tcp://dask-scheduler:8786").save(name)
        with get_client(sync_client=True) as client:
            document = client.read_block_document_by_name(name, block_type_slug="driftloop-dask")
            client.update_block_document(document.id, BlockDocumentUpdate(data={"address": "http://evil.example:80"}))
        with pytest.raises(DriftloopError, match=rf"block '{name}' is invalid: .*'http://evil.example:80' is not "
                                                  r"tcp://host:port.*edit it in the UI"):
            dask_block_address(name)

    def test_the_score_flow_loads_the_block_at_the_start_and_an_explicit_address_wins(self) -> None:
        from driftloop.flows.score import score

        # The block is resolved first: a missing one fails the run before anything else.
        with pytest.raises(DriftloopError, match="driftloop-dask block 'absent-cluster'"):
            score(input_uri="unused.parquet", model="no_such_model", dask_block="absent-cluster")
        # With dask_address given the block is not loaded: the run gets as far as the model.
        with pytest.raises(Exception) as failed:
            score(input_uri="unused.parquet", model="no_such_model", dask_block="absent-cluster",
                  dask_address="tcp://127.0.0.1:8786")
        assert "absent-cluster" not in str(failed.value)
        assert "no_such_model" in str(failed.value)
