"""`capfilt serve` before it listens: a port that is taken is refused before Ray and the models
start, uvicorn's own failure to listen is an error naming the flags, and a cluster that cannot
hold the model actors is named at the start (the service otherwise stays 503 without a word)."""

from __future__ import annotations

import asyncio
import logging
import socket
from types import SimpleNamespace

import pytest

from capfilt.errors import CapfiltError
from capfilt.pipelines.clean_resources import Node
from capfilt.services import serve_cli
from capfilt.services.config import ServeConfig


def test_a_port_in_use_is_refused_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            CapfiltError, match=rf"--port {port}: cannot listen on 127.0.0.1:{port}.*another --port"
        ):
            serve_cli._check_port("127.0.0.1", port)
    serve_cli._check_port("127.0.0.1", 0)  # any free port
    serve_cli._check_port("127.0.0.1", port)  # free again once closed


def test_an_address_that_is_not_this_machine_s_is_refused() -> None:
    with pytest.raises(CapfiltError, match=r"--port 8000: cannot listen on 198\.51\.100\.1:8000"):
        serve_cli._check_port("198.51.100.1", 8000)  # TEST-NET-2: documentation addresses, never local


def test_uvicorn_exiting_before_it_listens_is_an_error_naming_the_flags() -> None:
    class Refused:
        started = False

        async def serve(self) -> None:
            raise SystemExit(3)  # what uvicorn does when it cannot bind

    config = ServeConfig(captioner="c", filter="f", port=8123)
    with pytest.raises(
        CapfiltError, match=r"--host 127.0.0.1 --port 8123: could not listen there \(uvicorn's exit code 3"
    ):
        asyncio.run(serve_cli._listen(Refused(), config))


def test_a_signal_uvicorn_hands_on_after_its_shutdown_ends_the_service_quietly() -> None:
    class Stopped:
        started = True

        async def serve(self) -> None:
            raise KeyboardInterrupt("stopped by SIGTERM")

    assert asyncio.run(serve_cli._listen(Stopped(), ServeConfig(captioner="c", filter="f"))) is None


@pytest.mark.parametrize(
    ("nodes", "options", "warned"),
    [
        (
            [Node(2.0, 0.0)],
            dict(num_gpus=0.5),
            "2 actors of 0 CPU and 0.5 GPU each need more than the Ray cluster has now (0 GPUs)",
        ),
        (
            [Node(8.0, 1.0)],
            dict(num_gpus=0.5, replicas=2),
            "4 actors of 0 CPU and 0.5 GPU each need more than the Ray cluster has now (1 GPUs)",
        ),
        ([Node(8.0, 1.0)], dict(num_gpus=0.5), None),
        (
            [Node(2.0, 0.0)],
            dict(num_cpus=2.0),
            "2 actors of 2 CPU each need more than the Ray cluster has now (2 CPUs)",
        ),
        ([Node(2.0, 0.0)], {}, None),  # 0 CPUs each: always placeable
    ],
)
def test_model_actors_the_cluster_cannot_hold_are_named_at_the_start(
    monkeypatch, caplog, nodes, options, warned
) -> None:
    import capfilt.pipelines.clean_resources as resources

    monkeypatch.setattr(resources, "cluster_nodes", lambda: nodes)
    with caplog.at_level(logging.WARNING, logger=serve_cli.log.name):
        serve_cli._warn_unplaceable(ServeConfig(captioner="c", filter="f", **options))
    said = [r.getMessage() for r in caplog.records]
    if warned is None:
        assert not said
    else:
        assert len(said) == 1 and said[0].startswith(warned) and "lower --replicas" in said[0]


def test_the_port_is_checked_before_ray_starts(monkeypatch) -> None:
    """The check comes first: before, a taken port failed after Ray and both models had started."""
    calls: list[str] = []

    def taken(host: str, port: int) -> None:
        calls.append("port")
        raise CapfiltError(f"--port {port}: taken")

    config = SimpleNamespace(validate=lambda: None, api_key="k", host="127.0.0.1", port=1)
    monkeypatch.setattr(serve_cli, "config_from_args", lambda args: config)
    monkeypatch.setattr(serve_cli, "_check_port", taken)
    monkeypatch.setattr(serve_cli, "init_ray", lambda config: calls.append("ray"))
    with pytest.raises(CapfiltError, match="taken"):
        serve_cli.run_serve(SimpleNamespace())
    assert calls == ["port"]
