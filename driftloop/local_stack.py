"""A local Prefect stack for the demo: a server on 127.0.0.1 (unless PREFECT_API_URL is
set), the pools, blocks and deployments of this repository, and process workers.
Everything it starts it stops again, workers before the server, unless asked to keep
it running.

What it started is written to ``<DRIFTLOOP_HOME>/demo-stack.json`` (pid and start time
of each process): ``driftloop demo --stop`` stops exactly those, and nothing else that
happens to be called ``prefect worker`` on the machine (:func:`stop_recorded`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from driftloop.errors import DriftloopError
from driftloop.resources import project_root

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_environment(port: int, prefect_home: Path) -> dict[str, str]:
    """The environment of ``prefect server start --host 127.0.0.1 --port PORT``.

    The UI asks ``/ui-settings`` where its API is, and that answer comes from settings
    (``PREFECT_UI_API_URL``, else ``PREFECT_API_URL``, else ``PREFECT_SERVER_API_HOST`` and
    ``_PORT``), never from ``--port``: without these a server on any port but 4200 serves
    a UI that cannot reach its API."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # a client setting, maybe of another server
    env.update({
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
    })
    return env


PID_FILE = "demo-stack.json"


def _started_at(pid: int) -> float | None:
    """When process ``pid`` started (an opaque number, the same for the same process), or
    None when there is no such process. A recycled pid gets a new start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return float(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks
    except FileNotFoundError:
        return None
    except OSError:
        pass
    try:  # no /proc (macOS): psutil where it is installed
        import psutil

        return psutil.Process(pid).create_time()
    except ImportError:
        return None
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess and friends
        return None


def stop_recorded(home: Path, *, timeout_s: float = 30) -> list[dict[str, object]]:
    """Stop the processes a kept-running demo recorded in ``home/demo-stack.json``,
    workers before the server, each with its process group (a worker's flow-run
    processes): SIGTERM, then SIGKILL after ``timeout_s``. A recorded pid whose process
    has gone, or whose start time differs (the pid was reused), is left alone. Returns
    what was recorded, each with what happened to it."""
    path = home / PID_FILE
    if not path.exists():
        raise DriftloopError(f"no running demo recorded in {path}: nothing to stop (start one with: make demo KEEP=1)")
    recorded = json.loads(path.read_text())["processes"]
    done = []
    for entry in sorted(recorded, key=lambda e: e["role"] == "server"):  # workers first
        pid = int(entry["pid"])
        if _started_at(pid) != entry["started_at"]:
            done.append({**entry, "stopped": False, "why": "no longer running"})
            continue
        try:
            os.killpg(pid, signal.SIGTERM)  # the demo started it in a session of its own
        except ProcessLookupError:
            done.append({**entry, "stopped": False, "why": "no longer running"})
            continue
        deadline = time.monotonic() + timeout_s
        while _started_at(pid) == entry["started_at"] and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        why = "ended on SIGTERM"
        if _started_at(pid) == entry["started_at"]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            why = f"killed (SIGKILL) after {timeout_s:g} s"
        done.append({**entry, "stopped": True, "why": why})
    path.unlink()
    return done


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is this process's child (a zombie still has its /proc entry)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _prefect_yaml_deployments() -> list[tuple[str, str]]:
    """``(name, entrypoint)`` of each deployment in this repository's prefect.yaml."""
    import yaml

    document = yaml.safe_load((project_root() / "prefect.yaml").read_text())
    return [(d["name"], d["entrypoint"]) for d in document.get("deployments", [])]


def ours_on_server() -> dict[str, list[str]]:
    """The work pools and deployments of this project already on the server that
    ``PREFECT_API_URL`` names (pools by name, deployments as ``flow/name``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        WorkPoolFilter,
        WorkPoolFilterName,
    )

    from driftloop.work_pools import POOLS

    names = sorted({name for name, _ in _prefect_yaml_deployments()})
    try:
        with get_client(sync_client=True) as client:
            pools = client.read_work_pools(work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=list(POOLS))))
            deployments = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)))
            flows = {d.flow_id: client.read_flow(d.flow_id).name for d in deployments}
    except Exception as exc:  # noqa: BLE001 - httpx and Prefect raise many kinds; one line says which server
        raise DriftloopError(f"the Prefect server at PREFECT_API_URL={os.environ.get('PREFECT_API_URL')} cannot be "
                             f"read ({type(exc).__name__}: {exc}); check it, or unset PREFECT_API_URL for a private "
                             "demo server") from None
    return {"pools": sorted(p.name for p in pools),
            "deployments": sorted(f"{flows[d.flow_id]}/{d.name}" for d in deployments)}


def what_the_demo_changes(api_url: str, ours: dict[str, list[str]]) -> str:
    """In words: what ``make demo`` would do to the server at ``api_url``, given what of
    this project is already there."""
    from driftloop.work_pools import POOLS

    deployments = _prefect_yaml_deployments()
    pools = ", ".join(f"{p} ({'updated: its base job template and concurrency limit reset' if p in ours['pools'] else 'created'})"
                      for p in POOLS)
    existing = f" (replacing {', '.join(ours['deployments'])})" if ours["deployments"] else ""
    return (f"on {api_url} the demo would: create or update the work pools {pools}; register the driftloop block "
            f"types; deploy the {len(deployments)} deployments of prefect.yaml ("
            + ", ".join(f"{entry} as {name}" for name, entry in deployments)
            + f"){existing}, with their nightly score and monitor schedules and the retrain automation; start a "
            "cpu and a gpu worker polling it (they run whatever is scheduled on those pools); and run train, score, "
            "labels, monitor and a retrain of car_loan through them")


@dataclass
class LocalStack:
    home: Path
    keep_running: bool = False
    yes_this_server: bool = False  # with PREFECT_API_URL set: change that server even if it holds our pools or deployments
    api_url: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    server: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PREFECT_API_URL": self.api_url,
            "DRIFTLOOP_HOME": str(self.home),
            "DRIFTLOOP_PROJECT_DIR": str(project_root()),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "NML_DISABLE_USAGE_LOGGING": "1",
        }

    def start_server(self) -> None:
        if os.environ.get("PREFECT_API_URL"):
            self.api_url = os.environ["PREFECT_API_URL"]
            self.check_foreign_server()
            return
        port = _free_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        prefect_home = self.home / "prefect"
        prefect_home.mkdir(parents=True, exist_ok=True)
        env = server_environment(port, prefect_home)
        log = (self.home / "prefect-server.log").open("wb")
        self.server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._record()
        deadline = time.monotonic() + 180
        while not _healthy(self.api_url):
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise DriftloopError(f"the Prefect server did not start; see {self.home / 'prefect-server.log'}")
            time.sleep(0.5)
        self.crash_orphaned_runs()

    def check_foreign_server(self) -> None:
        """A server this stack did not start may be someone's production server: refuse
        to change it when it already holds pools or deployments of this project, unless
        ``yes_this_server``; the refusal says what the demo would change."""
        if self.yes_this_server:
            return
        ours = ours_on_server()
        if ours["pools"] or ours["deployments"]:
            found = ", ".join([*(f"work pool {p}" for p in ours["pools"]), *(f"deployment {d}" for d in ours["deployments"])])
            raise DriftloopError(
                f"PREFECT_API_URL names a server the demo did not start, and it already holds {found}: "
                f"{what_the_demo_changes(self.api_url, ours)}. Rerun with --yes-this-server (make demo "
                "YES_THIS_SERVER=1) if that is what you want, or unset PREFECT_API_URL for a private server on 127.0.0.1")

    def crash_orphaned_runs(self) -> list[str]:
        """End the runs an earlier, interrupted stack left behind: pending or running ones
        as Crashed, overdue scheduled ones as Cancelled.

        Only for a server this stack started: no worker of it was alive, so in-flight
        runs never finish and would hold the pools' and deployments' concurrency slots
        (the gpu pool has one per GPU), and overdue runs would start with the workers."""
        from datetime import UTC, datetime

        import httpx

        def runs(states: list[str], **extra: object) -> list[dict]:
            body = {"flow_runs": {"state": {"type": {"any_": states}}, **extra}, "limit": 200}
            return httpx.post(f"{self.api_url}/flow_runs/filter", timeout=30, json=body).raise_for_status().json()

        now = datetime.now(UTC).isoformat()
        ended = [(run, "CRASHED", "Crashed") for run in runs(["PENDING", "RUNNING", "CANCELLING"])]
        ended += [(run, "CANCELLED", "Cancelled") for run in runs(["SCHEDULED"], expected_start_time={"before_": now})]
        for run, state_type, name in ended:
            httpx.post(f"{self.api_url}/flow_runs/{run['id']}/set_state", timeout=30, json={
                "state": {"type": state_type, "name": name, "message": "left behind by an interrupted driftloop stack"},
            }).raise_for_status()
        return [run["name"] for run, _, _ in ended]

    def run(self, *args: str) -> str:
        done = subprocess.run(list(args), cwd=project_root(), env=self.env(), check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise DriftloopError(f"{' '.join(args)} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        return done.stdout

    def deploy(self, *, gpu_device: str) -> None:
        self.run(str(BIN / "driftloop"), "infra", "apply", "--gpu-device", gpu_device)
        self.run(str(BIN / "prefect"), "block", "register", "-m", "driftloop.blocks.driftloop_blocks")
        self.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--all")

    def start_workers(self, pools: tuple[str, ...] = ("cpu", "gpu")) -> None:
        for pool in pools:
            log = (self.home / f"worker-{pool}.log").open("wb")
            self.processes.append(subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", pool],
                cwd=project_root(), env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))
        self._record()

    def _record(self) -> None:
        """Write what this stack started (pid, start time, role) to ``home/demo-stack.json``
        for ``driftloop demo --stop``."""
        started = ([("server", self.server)] if self.server else []) + [
            (f"worker {' '.join(p.args[-2:])}" if isinstance(p.args, list) else "worker", p) for p in self.processes]
        entries = [{"role": role, "pid": p.pid, "started_at": _started_at(p.pid)} for role, p in started]
        (self.home / PID_FILE).write_text(json.dumps({"api_url": self.api_url, "processes": entries}, indent=1))

    def stop(self) -> None:
        if self.keep_running:
            return  # demo-stack.json stays: `driftloop demo --stop` stops them later
        for proc in self.processes:  # workers first: they report to the server
            proc.send_signal(signal.SIGTERM)
        for proc in [*self.processes, *([self.server] if self.server else [])]:
            if proc is self.server:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        (self.home / PID_FILE).unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.home.mkdir(parents=True, exist_ok=True)
        self.start_server()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
