"""Faults during the clean job (local Ray, tiny checkpoints), each ending in the result of an
uninterrupted run: model actors killed mid-job (Ray restarts them and retries their batches), and
an output that fills up or loses its write permission (a clear error naming the file; the shard
being written is not in the manifest, and --resume finishes the job).

A killed driver is test_clean.py::test_killed_job_resumes_to_the_same_result; a service restarted
while its job runs is tests/services/test_restart.py.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import signal
import tarfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from capfilt.data import iter_samples
from capfilt.errors import CapfiltError
from capfilt.ledger import read_ledger
from capfilt.pipelines import clean_output, clean_stages
from capfilt.pipelines.clean import CleanConfig, CleanSummary, clean
from capfilt.world.writer import Sample, write_shard

SEED = 7
THRESHOLD = 0.0222  # as test_clean: the tiny random filter's p(match) lie in 0.020-0.023
SHARDS = 4


@pytest.fixture(scope="module")
def inputs(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The world's 40 web samples in 4 shards of 10: a job long enough to be hit in the middle."""
    out = tmp_path_factory.mktemp("fault_inputs")
    web = [
        Sample(s.key, s.image, s.text, s.meta["url"], s.meta["width"], s.meta["height"])
        for s in iter_samples(world / "web")
    ]
    for i in range(SHARDS):
        write_shard(out, i, web[10 * i : 10 * i + 10])
    return out


def _config(inputs: Path, out: Path, captioner: Path, filt: Path, **changes: Any) -> CleanConfig:
    base = CleanConfig(
        inputs=[str(inputs)],
        output=str(out),
        captioner=str(captioner),
        filter=str(filt),
        num_captions=2,
        batch_size=4,  # more batches: more of them in flight when a fault strikes
        seed=SEED,
        threshold=THRESHOLD,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def baseline(inputs, our_captioner_dir, our_filter_dir, tmp_path_factory, ray_cluster) -> CleanSummary:
    """The uninterrupted run every faulted one must equal."""
    out = tmp_path_factory.mktemp("faults") / "baseline"
    return clean(_config(inputs, out, our_captioner_dir, our_filter_dir))


def _scores(row: dict[str, Any]) -> list[float | None]:
    return [row["web_itm"], row["web_itc"], *(c["itm"] for c in row["synthetic"])]


def assert_same_result(out: Path, expected: Path) -> None:
    """The job in `out` decided what the one in `expected` did (ledger rows; scores to 1e-6: a
    retried batch may be grouped differently) and wrote the same D' tars: the same members in the
    same order, images and texts byte for byte, metadata equal but for the score (to 1e-6)."""
    fields = ("key", "status", "reason", "error_message", "web_text", "web_kept", "synthetic_kept")
    rows = [
        sorted(read_ledger(o).to_pylist(), key=lambda r: (r["key"], r["status"])) for o in (out, expected)
    ]
    assert [r["key"] for r in rows[0]] == [r["key"] for r in rows[1]]
    for a, b in zip(*rows):
        assert {k: a[k] for k in fields} == {k: b[k] for k in fields}
        assert [c["text"] for c in a["synthetic"]] == [c["text"] for c in b["synthetic"]]
        for x, y in zip(_scores(a), _scores(b), strict=True):
            assert (x is None and y is None) or math.isclose(x, y, abs_tol=1e-6), (a["key"], x, y)
    tars = [sorted(p.name for p in (o / "dprime").glob("*.tar")) for o in (out, expected)]
    assert tars[0] == tars[1]
    for name in tars[0]:
        members = [_members(o / "dprime" / name) for o in (out, expected)]
        assert [m[0] for m in members[0]] == [m[0] for m in members[1]], name
        for (member, a), (_, b) in zip(*members):
            if not member.endswith(".json"):
                assert a == b, (name, member)  # images byte for byte, texts exactly
                continue
            meta_a, meta_b = json.loads(a), json.loads(b)
            itm_a, itm_b = meta_a.pop("itm"), meta_b.pop("itm")
            assert meta_a == meta_b, (name, member)
            assert (itm_a is None and itm_b is None) or math.isclose(itm_a, itm_b, abs_tol=1e-6)


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def _manifest(out: Path) -> list[str]:
    return sorted(json.loads(line)["shard"] for line in (out / "manifest.jsonl").read_text().splitlines())


def _map_workers() -> dict[str, dict[str, Any]]:
    """This job's Ray Data actors (the caption and filter pools), by actor id."""
    import ray
    from ray._private import state  # the GCS's actor table: no dashboard needed, unlike ray.util.state

    job = ray.get_runtime_context().get_job_id()
    return {
        actor_id: info
        for actor_id, info in state.actors().items()
        if info["JobID"] == job and "MapWorker" in info["ActorClassName"]
    }


def _held(stage: type, gate: Path, shards: int) -> type:
    """`stage`, whose actor waits at its first batch of the `shards`-th shard it meets: it writes its
    pid to `gate/<stage name>` and waits there, mid-batch, until `gate/open` exists. So the test can
    kill it with work in flight however fast the machine runs; once the gate is open (after the kill),
    its restart runs on."""

    class Held(stage):  # type: ignore[misc]
        def __call__(self, batch: pa.Table) -> pa.Table:
            seen = self.__dict__.setdefault("shards_seen", set())
            seen.update(batch.column("shard_id").to_pylist())
            opened = gate / "open"
            if len(seen) >= shards and not opened.exists():
                note = gate / f".{stage.__name__}"
                note.write_text(str(os.getpid()))
                note.replace(gate / stage.__name__)  # whole, for the test to read
                deadline = time.monotonic() + 120  # a safety net: a test that never kills fails, not hangs
                while not opened.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            return super().__call__(batch)

    # Defined here, it travels to the actors by value; its name keeps the pools' names.
    Held.__name__ = Held.__qualname__ = stage.__name__
    return Held


def test_model_actors_killed_mid_job_are_restarted_to_the_same_result(
    baseline, inputs, our_captioner_dir, our_filter_dir, tmp_path, monkeypatch
) -> None:
    # Both model actors must still have work when the first shard is written, or there is nothing
    # to kill: left alone they finish within ~0.2 s of it, before a slow driver looks. So each waits
    # mid-batch: the captioner at its 4th shard, the filter at its 3rd (the driver gets a block only
    # once the next one exists, so the 1st shard is written once the filter has finished its 2nd).
    gate = tmp_path / "gate"
    gate.mkdir()
    stages = {"CaptionStage": 4, "FilterStage": 3}
    for name, shards in stages.items():
        monkeypatch.setattr(clean_stages, name, _held(getattr(clean_stages, name), gate, shards))
    killed: dict[str, str] = {}
    held: dict[str, int] = {}
    # The whole pytest session is one Ray job: earlier jobs' pools (the baseline's among them) may
    # still be listed ALIVE until their handles are collected, so only this job's new actors count.
    earlier = {actor_id: info["State"] for actor_id, info in _map_workers().items()}

    def kill_the_model_actors(shards_done: int, shards_total: int, samples_done: int) -> None:
        if shards_done != 1:
            return
        # One shard written, three in the pipeline: kill the model actors once both wait mid-batch.
        deadline = time.monotonic() + 120  # a safety net only: both wait within a second here
        while not all((gate / name).exists() for name in stages) and time.monotonic() < deadline:
            time.sleep(0.02)
        held.update({name: int((gate / name).read_text()) for name in stages if (gate / name).exists()})
        for actor_id, info in _map_workers().items():
            if info["State"] == "ALIVE" and actor_id not in earlier and info["Pid"] in held.values():
                os.kill(info["Pid"], signal.SIGKILL)  # as the OOM killer would
                killed[actor_id] = info["ActorClassName"]
        (gate / "open").touch()

    out = tmp_path / "killed"
    try:
        summary = clean(_config(inputs, out, our_captioner_dir, our_filter_dir), kill_the_model_actors)
    finally:
        (gate / "open").touch()  # never leave an actor waiting
    assert sorted(killed.values()) == [f"MapWorker(MapBatches({name}))" for name in stages], (
        f"expected one captioner and one filter actor, held mid-batch ({held}), killed {killed}"
    )
    after = _map_workers()
    restarts = {actor_id: after[actor_id]["NumRestarts"] for actor_id in killed}
    print(
        f"\nkilled {len(killed)} model actors mid-batch after 1 of {SHARDS} shards; restarts: "
        f"{restarts}; earlier jobs' actors at the start: {sorted(earlier.values())}"
    )
    assert all(n >= 1 for n in restarts.values()), restarts
    assert summary.samples == baseline.samples == 40 and _manifest(out) == _manifest(baseline.output)
    assert_same_result(out, baseline.output)


write_tar = clean_output._write_tar


class _DiskFull:
    """`clean_output._write_tar` that writes half of the second D' tar the job writes, then fails as
    a full disk does."""

    def __init__(self) -> None:
        self.calls = 0
        self.failed: Path | None = None

    def __call__(self, path: Path, records: list[dict[str, Any]]) -> None:
        self.calls += 1
        write_tar(path, records)
        if self.calls < 2:
            return
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        self.failed = path
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write(2) reports it: no file name


def _resume_to_baseline(out: Path, config: CleanConfig, baseline: CleanSummary, finished: int) -> None:
    """After the fault: the finished shards alone are in the manifest, the shard being written has
    no final file; --resume skips the finished ones and ends with the uninterrupted run's result."""
    done = _manifest(out)
    assert len(done) == finished
    for name in {f"{i:05d}" for i in range(SHARDS)} - set(done):
        assert (
            not (out / "dprime" / f"{name}.tar").exists()
            and not (out / "ledger" / f"{name}.parquet").exists()
        )
    resumed = clean(dataclasses.replace(config, resume=True))
    assert resumed.shards_skipped == finished and resumed.samples == baseline.samples
    assert _manifest(out) == _manifest(baseline.output) and not list(out.rglob("*.tmp"))
    assert_same_result(out, baseline.output)


def test_a_full_disk_names_the_file_and_resume_finishes_the_job(
    baseline, inputs, our_captioner_dir, our_filter_dir, tmp_path, monkeypatch
) -> None:
    disk = _DiskFull()
    monkeypatch.setattr(clean_output, "_write_tar", disk)
    out = tmp_path / "full"
    config = _config(inputs, out, our_captioner_dir, our_filter_dir)
    with pytest.raises(CapfiltError) as err:
        clean(config)
    assert disk.failed is not None and disk.failed.name.endswith(".tar.tmp")
    assert str(err.value) == (
        f"cannot write {disk.failed}: No space left on device; free space or fix permissions there, "
        "then rerun with --resume"
    )
    assert disk.failed.stat().st_size > 0  # half a shard on disk, and not counted as done
    monkeypatch.undo()
    _resume_to_baseline(out, config, baseline, finished=1)


def _permissions_bind(directory: Path) -> bool:
    """Whether a read-only directory stops this process (not for root with CAP_DAC_OVERRIDE)."""
    probe = directory / "probe"
    probe.mkdir()
    probe.chmod(0o500)
    try:
        (probe / "file").touch()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o700)
    return False


def test_an_unwritable_output_names_the_directory_and_resume_finishes_the_job(
    baseline, inputs, our_captioner_dir, our_filter_dir, tmp_path
) -> None:
    if not _permissions_bind(tmp_path):
        pytest.skip("file permissions do not bind this process (root)")
    out = tmp_path / "unwritable"
    config = _config(inputs, out, our_captioner_dir, our_filter_dir)
    # Before the job: refused up front, naming the directory.
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(
            CapfiltError, match=rf"cannot write {re.escape(str(out))}/dprime: Permission denied; "
        ):
            clean(config)
    finally:
        out.chmod(0o700)

    # During it: the next shard's write fails once dprime/ is read-only.
    def lock_dprime(shards_done: int, shards_total: int, samples_done: int) -> None:
        if shards_done == 1:
            (out / "dprime").chmod(0o500)

    try:
        with pytest.raises(
            CapfiltError,
            match=rf"cannot write {re.escape(str(out))}/dprime/0000\d\.tar\.tmp: Permission denied; ",
        ):
            clean(config, lock_dprime)
    finally:
        (out / "dprime").chmod(0o700)
    _resume_to_baseline(out, config, baseline, finished=1)
