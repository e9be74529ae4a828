"""Fixtures for the pipelines tests: a tiny built-in world, a tiny pre-trained MED, one local Ray.

Ray takes seconds to start on a 2-core machine, so every Ray test shares one local cluster per
session. Ray 2.60 turns on token authentication for a new local cluster: `ray.init` generates a
token (saved under ~/.ray) and uses it itself, so nothing more is needed here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

WORLD = dict(web=40, human=24, test=8, image_size=32, shard_size=20)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from capfilt.world import synthesize

    out = tmp_path_factory.mktemp("world")
    synthesize(out, **WORLD)
    return out


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory: pytest.TempPathFactory, world: Path) -> Path:
    """A tiny MED pre-trained in-process for a few steps: the start of fine-tuning tests."""
    from capfilt.pipelines.train import TrainConfig, train

    out = tmp_path_factory.mktemp("pretrained")
    cfg = TrainConfig(
        task="pretrain",
        data=[str(world / "web")],
        out=str(out),
        size="tiny",
        epochs=1,
        batch_size=8,
        workers=0,
    )
    return train(cfg).checkpoint


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    if ray.is_initialized():  # another suite's fixture got there first
        yield
        return
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)  # CPU jobs on any machine
    yield
    ray.shutdown()
