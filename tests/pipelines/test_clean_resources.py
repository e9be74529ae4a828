"""The cleaning job's model actors, chosen from the Ray cluster's resources or as given."""

from __future__ import annotations

import logging

import pytest

from capfilt.model.config import med_config
from capfilt.pipelines.clean_resources import (
    MAX_CPU_ACTORS,
    MIN_CPUS,
    Node,
    default_batch_size,
    gpu_share_problem,
    plan_actors,
)


def _counts(plan):
    return plan.device, plan.captioner_actors, plan.filter_actors


def test_a_laptop_keeps_one_actor_per_pool_on_a_share_of_a_core():
    plan = plan_actors([Node(2)])
    assert _counts(plan) == ("cpu", 1, 1)
    assert plan.cpus_per_actor == pytest.approx(2 / 3) and plan.task_cpus == pytest.approx(2 / 3)
    assert plan.threads_per_actor == 1 and plan.gpus_per_actor == 0


@pytest.mark.parametrize(
    ("cpus", "expected", "threads"),
    [(4, (2, 1), 1), (16, (4, 3), 2), (64, (4, 4), 7)],
)
def test_cpu_clusters_get_whole_cores_per_actor_and_keep_some_for_decoding(cpus, expected, threads):
    plan = plan_actors([Node(cpus)])
    assert (plan.captioner_actors, plan.filter_actors) == expected
    assert plan.threads_per_actor == threads and plan.cpus_per_actor == threads
    actors = plan.captioner_actors + plan.filter_actors
    assert actors <= MAX_CPU_ACTORS
    assert actors * plan.cpus_per_actor <= cpus - max(1, cpus / 8)  # the rest reads and decodes
    assert plan.captioner_actors >= plan.filter_actors  # the captioner's work is the larger


def test_an_actor_fits_on_one_node():
    plan = plan_actors([Node(8)] * 4)  # 32 CPUs, but no node has more than 8
    assert plan.threads_per_actor <= 4
    per_node = 8 // plan.threads_per_actor
    assert plan.captioner_actors + plan.filter_actors <= per_node * 4


@pytest.mark.parametrize(
    "nodes",
    [
        [Node(1), Node(1)],  # two 1-CPU nodes: an actor on each left a third of a CPU each
        [Node(1)] * 3,
        [Node(1), Node(2)],
        [Node(0.5), Node(1.5)],
        [Node(2), Node(2)],
        [Node(3), Node(3), Node(1)],
        [Node(8)] * 4,
        [Node(0), Node(2, 1)],
    ],
)
def test_a_read_task_fits_on_some_node_however_ray_spreads_the_actors(nodes):
    """Ray may place each actor on the freest node; a read or decode task must still fit on one
    node, or the pipeline never reads a shard and the job waits for ever."""
    plan = plan_actors(nodes)
    free = [n.cpus for n in nodes]
    for _ in range(plan.captioner_actors + plan.filter_actors):
        i = max(range(len(free)), key=free.__getitem__)
        assert free[i] >= plan.cpus_per_actor - 1e-9, "an actor that fits no node"
        free[i] -= plan.cpus_per_actor
    assert max(free) >= plan.task_cpus - 1e-9 and plan.task_cpus >= MIN_CPUS


def test_two_one_cpu_nodes_read_on_the_third_of_a_cpu_each_keeps():
    plan = plan_actors([Node(1), Node(1)])
    assert _counts(plan) == ("cpu", 1, 1)
    assert plan.cpus_per_actor == pytest.approx(2 / 3) and plan.task_cpus == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("nodes", "share", "expected"),
    [
        ([Node(16, 1)], 0.5, (1, 1)),  # one GPU: a captioner and a filter share it
        ([Node(16, 2)], 1.0, (1, 1)),
        ([Node(16, 8)], 1.0, (4, 4)),
        ([Node(8, 1)] * 3, 1.0, (2, 1)),
        ([Node(0), Node(4, 1)], 0.5, (1, 1)),  # a head without resources and a GPU worker
    ],
)
def test_gpus_are_used_when_the_cluster_has_them(nodes, share, expected):
    plan = plan_actors(nodes)
    assert plan.device == "cuda" and plan.gpus_per_actor == share
    assert (plan.captioner_actors, plan.filter_actors) == expected
    assert (plan.captioner_actors + plan.filter_actors) * share <= sum(n.gpus for n in nodes)


def test_zero_gpus_keeps_the_models_on_cpus():
    assert plan_actors([Node(16, 4)], num_gpus=0).device == "cpu"


def test_given_counts_are_kept():
    plan = plan_actors([Node(16)], captioner_actors=10, filter_actors=10)
    assert _counts(plan) == ("cpu", 10, 10)
    assert plan.cpus_per_actor * 20 <= 14 and plan.threads_per_actor == 1  # shares of the cores left
    plan = plan_actors([Node(16)], filter_actors=2)
    assert _counts(plan) == ("cpu", 5, 2)
    plan = plan_actors([Node(16, 1)], captioner_actors=2, filter_actors=2)  # 4 actors on one GPU
    assert _counts(plan) == ("cuda", 2, 2) and plan.gpus_per_actor == 0.25


def test_an_autoscaling_cluster_with_nothing_yet_takes_the_plan_as_given(caplog):
    with caplog.at_level(logging.WARNING):
        plan = plan_actors([Node(0)], num_gpus=0.5, captioner_actors=4, filter_actors=4)
    assert _counts(plan) == ("cuda", 4, 4) and plan.gpus_per_actor == 0.5
    assert plan.cpus_per_actor == 1.0  # a core each, on the GPU workers to come
    assert "need 4 GPUs" in caplog.text and "has 0 now" in caplog.text
    bare = plan_actors([Node(0)])  # CPU workers to come: one actor per pool
    assert _counts(bare) == ("cpu", 1, 1)


def _cache_bytes(size: str, image_size: int | None = None) -> int:
    """A decoder's cached image keys and values per image (fp32), as the job computes them."""
    config = med_config(size, image_size=image_size)
    return config.text.depth * 2 * (config.vision.num_patches + 1) * config.text.width * 4


@pytest.mark.parametrize(
    ("size", "image_size", "captions", "expected"),
    [
        ("small", None, 1, 128),  # 199 KB an image
        ("small", None, 5, 128),
        ("base", 384, 1, 32),  # 42.5 MB an image: 32 fit 1.5 GiB, 64 do not
        ("base", 384, 5, 8),  # five captions an image: five times the rows, and never below 8
        ("base", 224, 1, 64),
    ],
)
def test_batch_size_on_cpus_fits_the_decoding_cache(size, image_size, captions, expected):
    assert default_batch_size("cpu", _cache_bytes(size, image_size) * captions) == expected


def test_batch_size_on_gpus_is_the_gpu_default():
    assert default_batch_size("cuda", _cache_bytes("base", 384)) == 32


@pytest.mark.parametrize(("captioners", "filters"), [(3, None), (None, 3), (3, 3)])
def test_actor_counts_given_on_one_gpu_share_it(captioners, filters):
    """Given one pool's count (or both) and no --num-gpus, the actors share the cluster's one GPU:
    a plan for more GPUs than a fixed cluster has leaves a pool waiting for ever."""
    plan = plan_actors([Node(8, 1)], captioner_actors=captioners, filter_actors=filters)
    assert plan.device == "cuda"
    assert (plan.captioner_actors + plan.filter_actors) * plan.gpus_per_actor <= 1.0
    if captioners:
        assert plan.captioner_actors == captioners
    if filters:
        assert plan.filter_actors == filters


@pytest.mark.parametrize(
    ("share", "problem"),
    [
        (0, None),
        (0.5, None),
        (1e-4, None),
        (3, None),
        (1e-5, "at least 0.0001"),  # Ray refused it only when it made the actor, mid-job
        (1.5, "whole number"),
        (-1, ">= 0"),
        (float("nan"), ">= 0"),
    ],
)
def test_gpu_shares_ray_would_refuse_are_named_before_the_job(share, problem):
    found = gpu_share_problem(share)
    assert found is None if problem is None else problem in found
