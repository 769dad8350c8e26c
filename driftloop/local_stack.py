"""A local Prefect stack for the demo: a server on 127.0.0.1 (unless PREFECT_API_URL is
set), the pools, blocks and deployments of this repository, and process workers.
Everything it starts it stops again, workers before the server, unless asked to keep
it running."""

from __future__ import annotations

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

REPO = Path(__file__).resolve().parent.parent
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


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class LocalStack:
    home: Path
    keep_running: bool = False
    api_url: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    server: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PREFECT_API_URL": self.api_url,
            "DRIFTLOOP_HOME": str(self.home),
            "DRIFTLOOP_PROJECT_DIR": str(REPO),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "NML_DISABLE_USAGE_LOGGING": "1",
        }

    def start_server(self) -> None:
        if os.environ.get("PREFECT_API_URL"):
            self.api_url = os.environ["PREFECT_API_URL"]
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
        deadline = time.monotonic() + 180
        while not _healthy(self.api_url):
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise DriftloopError(f"the Prefect server did not start; see {self.home / 'prefect-server.log'}")
            time.sleep(0.5)
        self.crash_orphaned_runs()

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
        done = subprocess.run(list(args), cwd=REPO, env=self.env(), check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise DriftloopError(f"{' '.join(args)} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        return done.stdout

    def deploy(self, *, gpu_device: str) -> None:
        self.run(str(BIN / "driftloop"), "infra", "apply", "--gpu-device", gpu_device)
        self.run(str(BIN / "prefect"), "block", "register", "-f", "blocks/driftloop_blocks.py")
        self.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--all")

    def start_workers(self, pools: tuple[str, ...] = ("cpu", "gpu")) -> None:
        for pool in pools:
            log = (self.home / f"worker-{pool}.log").open("wb")
            self.processes.append(subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", pool],
                cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))

    def stop(self) -> None:
        if self.keep_running:
            return
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

    def __enter__(self) -> Self:
        self.home.mkdir(parents=True, exist_ok=True)
        self.start_server()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
