"""How a cleaning job sizes its captioner and filter actor pools from the Ray cluster it runs on.

Left to choose (`--num-gpus`, `--captioner-actors`, `--filter-actors` not given), a job uses what
the cluster has:
- **GPUs, when it has any**: one GPU per model actor, or half of one each for a captioner and a
  filter actor when the cluster has a single GPU; one CPU per actor for its host work.
- **CPUs otherwise**. Below `SMALL_CLUSTER_CPUS` (a laptop, CI): one captioner and one filter
  actor, each on a share of a core, beside the read and decode tasks. From there up: an eighth of
  the CPUs (at least one) stays for reading and decoding, and the rest go to at most
  `MAX_CPU_ACTORS` model actors of equal whole cores (each holds its own model in memory), each
  running torch on that many threads.

Either way the actors are split between the two pools in about the ratio of their work: the
captioner encodes each image and decodes a caption, the filter encodes each image and scores two
texts (55:45 on the CPU and the H100 of `docs/benchmarks.md`).

Counts given are taken as given. The cluster is read when the job starts: on an autoscaling
cluster whose workers scale from zero, name the GPUs and actor counts (as `deploy/kuberay` does);
a plan that asks for more GPUs than the cluster has then is logged as a warning, and the actor
pools wait for the autoscaler to add them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CPU_MAX_BATCH = 128  # images per model batch on CPUs, when --batch-size is not given
CPU_CACHE_BUDGET = 1.5 * 2**30  # bytes of a captioner batch's cached image keys and values on a CPU
GPU_BATCH = 32  # images per model batch on GPUs, when --batch-size is not given
MIN_BATCH = 8
CAPTIONER_SHARE = 0.55  # of the model actors, when neither count is given
SMALL_CLUSTER_CPUS = 4  # below this, one actor per pool on a share of a core
MAX_CPU_ACTORS = 8  # CPU model actors in all, when their counts are not given
READ_SHARE = 1 / 8  # of a larger cluster's CPUs, kept for the read and decode tasks
MIN_CPUS = 0.25  # the least share of a CPU an actor or a task asks Ray for


@dataclass(frozen=True)
class Node:
    """One alive Ray node's CPUs and GPUs."""

    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True)
class ActorPlan:
    """What the model stages ask Ray for."""

    device: str  # "cuda" or "cpu"
    captioner_actors: int
    filter_actors: int
    gpus_per_actor: float  # 0 on CPUs
    cpus_per_actor: float
    threads_per_actor: int  # torch's intra-op threads in each model actor
    task_cpus: float  # each read or decode task
    cluster_cpus: float
    cluster_gpus: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cluster_nodes() -> list[Node]:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    return [
        Node(float(n["Resources"].get("CPU", 0.0)), float(n["Resources"].get("GPU", 0.0)))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def plan_actors(
    nodes: Sequence[Node],
    num_gpus: float | None = None,
    captioner_actors: int | None = None,
    filter_actors: int | None = None,
) -> ActorPlan:
    """The model actors for a cluster of `nodes`; None: choose (see the module docstring).
    `num_gpus` 0 keeps the models on CPUs whatever the cluster has."""
    cpus = sum(n.cpus for n in nodes)
    gpus = sum(n.gpus for n in nodes)
    use_gpus = num_gpus > 0 if num_gpus is not None else gpus >= 1
    if use_gpus:
        plan = _gpu_plan(nodes, cpus, gpus, num_gpus, captioner_actors, filter_actors)
    else:
        plan = _cpu_plan(nodes, cpus, gpus, captioner_actors, filter_actors)
    return _tasks_fit_beside_actors(nodes, plan)


def _tasks_fit_beside_actors(nodes: Sequence[Node], plan: ActorPlan) -> ActorPlan:
    """The plan with read and decode tasks no larger than the CPUs some node keeps once the
    actors are spread over the nodes (Ray may spread them so): sized from the cluster's total
    alone, on two 1-CPU nodes an actor on each left a third of a CPU per node, the tasks asked for
    two thirds, and the job waited for ever."""
    free = sorted((n.cpus for n in nodes), reverse=True)
    if not free or plan.cluster_cpus <= 0:  # an autoscaling cluster with no worker yet: nothing to fit
        return plan
    for _ in range(plan.captioner_actors + plan.filter_actors):
        i = max(range(len(free)), key=free.__getitem__)  # the freest node takes the next actor
        free[i] -= plan.cpus_per_actor
    left = max(free)
    if left + 1e-9 >= plan.task_cpus:
        return plan
    if left < MIN_CPUS:
        log.warning(
            "the model actors leave no node %g CPUs for reading and decoding: the job may wait for "
            "CPUs; give the cluster more CPUs or set --captioner-actors / --filter-actors lower",
            MIN_CPUS,
        )
        return dataclasses.replace(plan, task_cpus=MIN_CPUS)
    return dataclasses.replace(plan, task_cpus=left)


def _split(slots: int, captioner: int | None, filt: int | None) -> tuple[int, int]:
    """Actors per pool for `slots` actors in all, keeping any count given."""
    if captioner is None and filt is None:
        captioner = max(1, min(slots - 1, round(slots * CAPTIONER_SHARE)))
        return captioner, max(1, slots - captioner)
    if captioner is None:
        return max(1, slots - filt), filt  # type: ignore[operator]
    if filt is None:
        return captioner, max(1, slots - captioner)
    return captioner, filt


def _host_cpus(cpus: float, actors: int) -> tuple[float, float]:
    """(CPUs per actor, CPUs per read or decode task) when the actors need a core at most."""
    actor = max(MIN_CPUS, min(1.0, cpus / (actors + 1)))
    return actor, max(MIN_CPUS, min(1.0, cpus - actor * actors))


def _gpu_plan(
    nodes: Sequence[Node],
    cpus: float,
    gpus: float,
    num_gpus: float | None,
    captioner: int | None,
    filt: int | None,
) -> ActorPlan:
    if num_gpus is None:  # the cluster has GPUs now
        # at least the actors given, and one of a pool whose count is not: a plan that asks for
        # more GPUs than the cluster has would leave a pool waiting for ever on a fixed cluster
        wanted = (captioner or 1) + (filt or 1)
        share = min(1.0, max(n.gpus for n in nodes), gpus / wanted)  # one GPU: the two pools share it
        while _fit(nodes, share) < wanted:
            share /= 2  # actors that fit on the nodes' GPUs
    else:
        share = num_gpus
    fits = _fit(nodes, share)
    captioner, filt = _split(max(2, fits), captioner, filt)
    if fits < captioner + filt:
        log.warning(
            "%d captioner and %d filter actors at %g GPU each need %g GPUs on nodes that hold them; the Ray "
            "cluster has %g now: the actor pools wait until the autoscaler adds them (with none coming, "
            "lower --captioner-actors, --filter-actors or --num-gpus)",
            captioner,
            filt,
            share,
            (captioner + filt) * share,
            gpus,
        )
    actor_cpus, task_cpus = _host_cpus(cpus, captioner + filt)
    if cpus < captioner + filt:  # no CPUs to share yet (workers to come): a core per actor, as they come
        actor_cpus = 1.0
    return ActorPlan("cuda", captioner, filt, share, actor_cpus, 1, task_cpus, cpus, gpus)


def _fit(nodes: Sequence[Node], share: float) -> int:
    """Actors of `share` GPU each that the nodes' GPUs hold (an actor runs on one node)."""
    return sum(math.floor(n.gpus / share + 1e-9) for n in nodes)


def _cpu_plan(
    nodes: Sequence[Node], cpus: float, gpus: float, captioner: int | None, filt: int | None
) -> ActorPlan:
    if cpus < SMALL_CLUSTER_CPUS:
        captioner, filt = captioner or 1, filt or 1
        actor_cpus, task_cpus = _host_cpus(cpus, captioner + filt)
        return ActorPlan("cpu", captioner, filt, 0.0, actor_cpus, 1, task_cpus, cpus, gpus)
    model_cpus = cpus - max(1.0, cpus * READ_SHARE)
    largest = max(n.cpus for n in nodes)  # nodes exist: cpus >= SMALL_CLUSTER_CPUS
    if captioner is not None and filt is not None:
        threads = max(1, min(int(model_cpus // (captioner + filt)), int(largest)))
    else:
        threads = max(1, min(math.ceil(model_cpus / MAX_CPU_ACTORS), int(largest // 2)))
        fit = sum(int(n.cpus // threads) for n in nodes)  # an actor runs on one node
        captioner, filt = _split(max(2, min(fit, int(model_cpus // threads))), captioner, filt)
    actors = captioner + filt
    actor_cpus = float(threads) if threads * actors <= model_cpus else max(MIN_CPUS, model_cpus / actors)
    task_cpus = max(MIN_CPUS, min(1.0, cpus - actor_cpus * actors))
    return ActorPlan("cpu", captioner, filt, 0.0, actor_cpus, max(1, int(actor_cpus)), task_cpus, cpus, gpus)


def gpu_share_problem(share: float) -> str | None:
    """Why Ray would refuse `share` GPUs for an actor, or None: 0 (no GPU), a fraction of one GPU
    down to Ray's granularity of 0.0001, or whole GPUs."""
    if not math.isfinite(share) or share < 0:
        return "must be >= 0"
    if 0 < share < 1e-4:
        return "must be 0 (CPUs) or at least 0.0001 (Ray's smallest GPU share)"
    if share > 1 and share != int(share):
        return "above 1 must be a whole number of GPUs (Ray's rule)"
    return None


def default_batch_size(device: str, cache_bytes_per_image: int) -> int:
    """Images per model batch when the job is not told (`--batch-size`).

    On CPUs, the largest power of two up to CPU_MAX_BATCH whose captioner batch keeps at most
    CPU_CACHE_BUDGET of the images' cross-attention keys and values (every decoder layer's, fp32),
    and at least MIN_BATCH: 128 for the small model, 32 for BLIP-base at 384 px. Measured on the
    2-core Xeon of `docs/benchmarks.md`: the small job's steady rate 278 pairs/s at 32, 329 at
    128; base's (b) 1.63x transformers at 32, 1.49x at 8. On GPUs GPU_BATCH: what fits a GPU
    depends on its memory, which the job's driver does not see; `docs/benchmarks.md` ran BLIP-base
    at 1,024 on an 80 GB H100, so there, pass a larger --batch-size."""
    if device != "cpu":
        return GPU_BATCH
    batch = CPU_MAX_BATCH
    while batch > MIN_BATCH and batch * cache_bytes_per_image > CPU_CACHE_BUDGET:
        batch //= 2
    return batch


# One writer (1,600-6,500 pairs/s measured for 64 px images, docs/operations.md) keeps up with 2-8
# H100s of base CapFilt (766 pairs/s each); larger images cost more to copy: 4.
GPUS_PER_WRITER = 4
MAX_WRITERS = 8


def default_writers(plan: ActorPlan, local_cpus: int | None) -> int:
    """Processes that write finished shards when the job is not told (`--writers`): 1 (the driver
    itself) on CPU clusters and below 4 GPUs, one more for every 4 GPUs the model actors hold, at
    most half the driver machine's `local_cpus` and MAX_WRITERS."""
    gpus = (plan.captioner_actors + plan.filter_actors) * plan.gpus_per_actor
    wanted = 1 + int(gpus // GPUS_PER_WRITER)
    return max(1, min(wanted, MAX_WRITERS, (local_cpus or 1) // 2))


# A cgroup's CPU quota: v2 "QUOTA PERIOD" (or "max"), v1 two files in microseconds.
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def local_cpus() -> int:
    """CPUs this process may use: its CPU affinity, and its cgroup's quota where one is set (a
    Kubernetes pod's CPU limit), which `os.cpu_count()` does not see: a head pod limited to 4 CPUs
    on a 64-core host reads 64 there."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        if CGROUP_CPU_MAX.is_file():
            quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        else:
            quota, period = (p.read_text().strip() for p in CGROUP_V1_QUOTA)
        if quota not in ("max", "-1"):
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup files (macOS, an older kernel): the affinity stands
        pass
    return cpus
