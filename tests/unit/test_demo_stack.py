"""The demo's own processes and waits: `driftloop demo --stop` stops exactly what a
kept-running demo started (never whatever else is called "prefect worker"), and the wait
for the automated retrain ends, saying what it waited for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from driftloop.local_stack import PID_FILE, LocalStack, _started_at, stop_recorded

SLEEPER = "import time; time.sleep(600)"
# A worker-like process: it starts a child (a flow run) in its own process group and
# writes the child's pid to the file named by its first argument.
WORKER = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
          "open(sys.argv[1] + '.tmp', 'w').write(str(c.pid)); __import__('os').replace(sys.argv[1] + '.tmp', sys.argv[1]); "
          "time.sleep(600)")


def _ended(pid: int) -> bool:
    """Gone, or a zombie waiting for its parent: no longer running either way."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_for(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads start times from /proc")
def test_demo_stop_stops_the_recorded_processes_and_their_children_and_nothing_else(tmp_path: Path, monkeypatch) -> None:
    child_pid_file = tmp_path / "flow-run.pid"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(child_pid_file), "--pool", "cpu"], start_new_session=True)
    server = subprocess.Popen([sys.executable, "-c", SLEEPER, "server"], start_new_session=True)
    # what `pkill -f "prefect worker"` would also have hit: someone else's worker
    bystander = subprocess.Popen([sys.executable, "-c", SLEEPER, "prefect worker --pool cpu"], start_new_session=True)
    try:
        _wait_for(child_pid_file.exists, "the worker started its flow-run child")
        flow_run = int(child_pid_file.read_text())
        stack = LocalStack(tmp_path, keep_running=True, server=server, processes=[worker])
        stack._record()
        assert (tmp_path / PID_FILE).exists()
        stack.stop()  # kept running: stop() leaves them, and their record
        assert (tmp_path / PID_FILE).exists() and worker.poll() is None

        signalled: list[int] = []
        real_killpg = os.killpg
        monkeypatch.setattr(os, "killpg", lambda pgid, sig: (signalled.append(pgid), real_killpg(pgid, sig)))
        monkeypatch.setattr(os, "kill", lambda pid, sig: pytest.fail(f"os.kill({pid}) outside the recorded groups"))
        done = stop_recorded(tmp_path, timeout_s=30)

        assert [(e["role"], e["pid"], e["stopped"]) for e in done] == [
            ("worker --pool cpu", worker.pid, True), ("server", server.pid, True)]  # workers first
        assert signalled == [worker.pid, server.pid]
        assert _started_at(worker.pid) is None and _started_at(server.pid) is None
        _wait_for(lambda: _ended(flow_run), "the worker's flow-run child ended with its group")
        assert bystander.poll() is None and bystander.pid not in signalled
        assert not (tmp_path / PID_FILE).exists()
    finally:
        monkeypatch.undo()
        for proc in (worker, server, bystander):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_recorded_pid_now_held_by_another_process_is_left_alone(tmp_path: Path, monkeypatch) -> None:
    import json

    other = subprocess.Popen([sys.executable, "-c", SLEEPER])
    try:
        (tmp_path / PID_FILE).write_text(json.dumps({"api_url": "x", "processes": [
            {"role": "worker --pool cpu", "pid": other.pid, "started_at": -1.0}]}))  # the pid was reused
        monkeypatch.setattr(os, "killpg", lambda *a: pytest.fail("signalled a process the demo did not start"))
        done = stop_recorded(tmp_path)
        assert done[0]["stopped"] is False and done[0]["why"] == "no longer running"
        assert other.poll() is None
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()


def test_stop_without_a_running_demo_says_so(tmp_path: Path) -> None:
    from driftloop.errors import DriftloopError

    with pytest.raises(DriftloopError, match="no running demo recorded"):
        stop_recorded(tmp_path)


class _Clock:
    """monotonic() and sleep() of a fake clock: sleeping advances it, no time passes."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps = 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        if self.sleeps > 100_000:
            raise AssertionError("still waiting after 100,000 polls: the wait is unbounded")
        self.now += seconds


class _fake_client:  # stands in for prefect's get_client(sync_client=True)
    def __init__(self, runs: list) -> None:
        self.client = SimpleNamespace(read_flow_runs=lambda **_: runs, read_artifacts=lambda **_: [])

    def __enter__(self) -> SimpleNamespace:
        return self.client

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("state", ["Running", "Pending", None])
def test_waiting_for_a_retrain_that_never_ends_is_bounded_and_says_what_it_waited_for(monkeypatch, state) -> None:
    import prefect.client.orchestration

    from driftloop.demo import _wait_for_retrain

    since = datetime.now(UTC)
    stuck = SimpleNamespace(
        id=uuid.uuid4(), name="stuck-fox", created=since + timedelta(seconds=5), parameters={"model": "car_loan"},
        state=None if state is None else SimpleNamespace(name=state, is_final=lambda: False))
    clock = _Clock()
    monkeypatch.setattr(time, "monotonic", clock.monotonic)
    monkeypatch.setattr(time, "sleep", clock.sleep)
    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda **_: _fake_client([stuck]))

    waited = _wait_for_retrain(since=since, timeout_s=120, finish_timeout_s=900)

    assert waited["flow_run"] == "stuck-fox" and waited["verdict"] is None
    assert waited["state"].startswith(state or "without a state")
    assert "not ended after 900 s" in waited["state"] and "retrain/every-model" in waited["state"]
    assert 900 < clock.now - 1000.0 <= 900 + 2 * 2  # bounded by the finish timeout (polling every 2 s)


def test_waiting_for_a_retrain_that_never_starts_is_bounded_too(monkeypatch) -> None:
    import prefect.client.orchestration

    from driftloop.demo import _wait_for_retrain

    clock = _Clock()
    monkeypatch.setattr(time, "monotonic", clock.monotonic)
    monkeypatch.setattr(time, "sleep", clock.sleep)
    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda **_: _fake_client([]))
    waited = _wait_for_retrain(since=datetime.now(UTC), timeout_s=120)
    assert waited["flow_run"] is None and waited["state"].startswith("not triggered: no retrain/every-model flow run within 120 s")


def test_a_server_holding_nothing_of_ours_is_used_without_asking(tmp_path: Path, monkeypatch) -> None:
    from driftloop import local_stack

    monkeypatch.setattr(local_stack, "ours_on_server", lambda: {"pools": [], "deployments": []})
    LocalStack(tmp_path, api_url="http://127.0.0.1:1/api").check_foreign_server()  # no refusal
    monkeypatch.setattr(local_stack, "ours_on_server", lambda: {"pools": [], "deployments": ["train/car-loan"]})
    with pytest.raises(local_stack.DriftloopError, match=r"already holds deployment train/car-loan: on http://127.0.0.1:1/api"):
        LocalStack(tmp_path, api_url="http://127.0.0.1:1/api").check_foreign_server()
    LocalStack(tmp_path, api_url="http://127.0.0.1:1/api", yes_this_server=True).check_foreign_server()
