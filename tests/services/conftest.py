"""Fixtures for the service tests: one Ray head and one `capfilt serve` for the whole session.

As a deployment runs it: `ray start --head` (with its dashboard, which Ray Jobs needs), then the
service as its own process (`python -m capfilt.services.serve_cli --ray-address ...`): the tiny
checkpoints of tests/conftest.py in real Ray actors, uvicorn on 127.0.0.1 on a free port, an API
key from the environment guarding the job endpoints, input/output roots in this session's temp dir.

`serve(...)` starts such a service; tests that stop or kill one start their own with it.

Everything of this Ray is this session's own: every port is picked free (a second Ray on the
machine, such as the pipelines tests' in-process one, holds the defaults, the dashboard agent's
52365 among them, and a head sharing it could not run jobs), its temp dir is private (so
`ray.init()` elsewhere never finds it), and its process group is ended at the end of the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.pipelines.conftest import world  # noqa: F401  (the tiny built-in world)

API_KEY = "test-key-0123456789abcdef"
MAX_BODY = 1_000_000
MAX_PIXELS = 1_000_000
START_TIMEOUT_S = 240


@dataclass
class RayHead:
    address: str  # the GCS, host:port
    dashboard: str  # http://host:port


@dataclass
class Service:
    url: str
    dashboard: str
    ray_address: str
    input_root: Path
    output_root: Path
    captioner: Path
    filter: Path

    def client(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120.0)


def ray_jobs(dashboard: str) -> Any:
    """Ray's own JobSubmissionClient, with the cluster's token (Ray 2.60 local clusters use one)."""
    from ray.job_submission import JobSubmissionClient

    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    token = os.environ.get("RAY_AUTH_TOKEN") or (
        token_file.read_text().strip() if token_file.is_file() else ""
    )
    return JobSubmissionClient(dashboard, headers={"Authorization": f"Bearer {token}"} if token else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def input_root(tmp_path_factory: pytest.TempPathFactory, world: Path) -> Path:  # noqa: F811
    """A copy of the world's first web shard (with its sidecar) and a symlink that leads out."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "web").mkdir()
    for name in ("00000.tar", "00000.parquet"):
        shutil.copy(world / "web" / name, root / "web" / name)
    (root / "escape").symlink_to(world / "web", target_is_directory=True)
    return root


def _first_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The process's first stdout line, or "" if none comes in time."""
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.append(proc.stdout.readline() if proc.stdout else ""), daemon=True
    )
    reader.start()
    reader.join(timeout_s)
    return lines[0] if lines else ""


def _end(proc: subprocess.Popen[Any], first: signal.Signals, grace_s: float) -> None:
    """Signal the process group `proc` leads, then kill whatever is left of it after `grace_s`."""
    if proc.poll() is None:
        os.killpg(proc.pid, first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    temp = Path(tempfile.mkdtemp(prefix="cfray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port, dashboard_port, agent_port = free_port(), free_port(), free_port()
    log_path = tmp_path_factory.mktemp("ray_head") / "ray.log"
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--temp-dir={temp}"]
    argv += [
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--num-gpus=0",  # CPU jobs on any machine
        "--object-store-memory=200000000",
    ]
    argv += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    argv += [f"--dashboard-agent-listen-port={agent_port}", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = RayHead(address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard_port}")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, log_path.read_text()[-5000:]
            assert time.monotonic() < deadline, "the Ray head did not start"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{head.dashboard}/api/version", timeout=5).status_code in (200, 401):
                    break
            time.sleep(0.5)
        yield head
    finally:
        _end(proc, signal.SIGTERM, 5)
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def serve(
    ray_head: RayHead,
    input_root: Path,
    output_root: Path,
    captioner: Path,
    filt: Path,
    log_path: Path,
    *,
    port: int = 0,
    replicas: int = 2,
    wait_ready: bool = True,
) -> Iterator[tuple[Service, subprocess.Popen[str]]]:
    """A `capfilt serve` process on `ray_head`, once it listens (and, with `wait_ready`, once its
    models answer); stopped with SIGINT on exit, unless it is gone already."""
    argv = [
        *("--captioner", str(captioner), "--filter", str(filt)),
        *(
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ray-address",
            ray_head.address,
            "--max-wait-ms",
            "20",
        ),
        *("--replicas", str(replicas)),
        *("--input-root", str(input_root), "--output-root", str(output_root)),
        *("--max-body-bytes", str(MAX_BODY), "--max-image-pixels", str(MAX_PIXELS)),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray 2.60: a driver given an explicit address uses the cluster's token auth only when told to
    env.update(CAPFILT_API_KEY=API_KEY, RAY_AUTH_MODE="token")
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "capfilt.services.serve_cli", *argv],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
            start_new_session=True,
        )
    try:
        line = _first_line(proc, START_TIMEOUT_S)
        if not line:
            pytest.fail(f"capfilt serve did not start; its log:\n{log_path.read_text()[-5000:]}")
        facts = json.loads(line)
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx.Client(base_url=facts["url"], timeout=10) as client:
            while wait_ready:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError as err:
                    pytest.fail(
                        f"capfilt serve stopped answering ({err}); its log:\n{log_path.read_text()[-5000:]}"
                    )
                assert proc.poll() is None, log_path.read_text()[-5000:]
                assert time.monotonic() < deadline, "the models did not load in time"
                time.sleep(0.2)
        service = Service(
            url=facts["url"],
            dashboard=facts["dashboard"],
            ray_address=facts["ray_address"],
            input_root=input_root,
            output_root=output_root,
            captioner=captioner,
            filter=filt,
        )
        yield service, proc
    finally:
        _end(proc, signal.SIGINT, 30)  # on SIGINT run_serve stops uvicorn, then its actors


@pytest.fixture(scope="session")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    ray_head: RayHead,
    input_root: Path,
    our_captioner_dir: Path,
    our_filter_dir: Path,
) -> Iterator[Service]:
    output_root = tmp_path_factory.mktemp("outputs")
    log_path = tmp_path_factory.mktemp("service_log") / "serve.log"
    with serve(ray_head, input_root, output_root, our_captioner_dir, our_filter_dir, log_path) as (
        started,
        _,
    ):
        yield started
