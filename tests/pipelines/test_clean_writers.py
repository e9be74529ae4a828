"""Finished shards written by worker processes (`clean_writers.ShardWriters`): what the driver's
own thread writes, each shard's manifest line only once its files are renamed, a failed or
killed write named, and a stop that keeps the shards being written. No Ray: the writers are
plain processes beside the driver."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from capfilt.curate import Candidate, Curated
from capfilt.decision import Rule, Scored, decide
from capfilt.errors import CapfiltError
from capfilt.ledger import ok_row, table
from capfilt.pipelines import clean_resources, clean_writers
from capfilt.pipelines.clean_output import Shard, prepare, read_manifest, write_web_shard
from capfilt.pipelines.clean_resources import ActorPlan, default_writers
from capfilt.pipelines.clean_writers import ShardWriters
from capfilt.world.writer import Sample, sample_key, write_shard

SHARDS, ROWS = 5, 12


def _image(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (40 * i % 256, 90, 200 - 7 * i % 200)).save(buf, "JPEG")
    return buf.getvalue()


def _rows(shard: int, tar: Path, keys: list[str]) -> list[dict[str, Any]]:
    """Ledger rows with made-up scores, decided by BLIP's rule: some texts kept, some not."""
    rows = []
    for i, key in enumerate(keys):
        web = Scored(f"web text {shard} {i}", (0.13 * i) % 1.0)
        synthetic = [Candidate(f"a caption {shard} {i}", (0.31 * i + 0.2) % 1.0, 0.1)]
        decision = decide(web, [Scored(c.text, c.itm) for c in synthetic], Rule(threshold=0.5))
        curated = Curated(key, web.text, web.itm, 0.2, synthetic, decision)
        rows.append(
            ok_row(curated, shard=str(tar), url=None, threshold=0.5, captioner_id="c", filter_id="f", seed=0)
        )
    return table(rows).to_pylist()  # as the driver gets them from Ray Data


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Shard, list[dict[str, Any]]]]:
    root = tmp_path_factory.mktemp("writers_in")
    out = []
    for s in range(SHARDS):
        keys = [sample_key(s, i, 100) for i in range(ROWS)]
        tar = write_shard(
            root, s, [Sample(k, _image(s * ROWS + i), "t", None, 32, 24) for i, k in enumerate(keys)]
        )
        out.append((Shard(s, str(tar), "web"), _rows(s, tar, keys)))
    return out


def _output(path: Path) -> Path:
    prepare(path, {"test": "writers"}, resume=False)
    return path


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for d in ("dprime", "dprime_index", "ledger", "stats")
        for p in sorted((out / d).iterdir())
    }


def test_writer_processes_write_what_the_driver_writes(shards, tmp_path: Path) -> None:
    inline = _output(tmp_path / "inline")
    for shard, rows in shards:
        write_web_shard(inline, shard, rows)
    out = _output(tmp_path / "pool")
    heard: list[int] = []
    with ShardWriters(out, 2, on_written=lambda stats: heard.append(stats["dprime_pairs"])) as writing:
        assert writing.pool is not None
        for shard, rows in shards:
            writing.web(shard, rows)
    files = _files(inline)
    assert len(files) == 4 * SHARDS and _files(out) == files
    assert read_manifest(out) == read_manifest(inline) and len(heard) == SHARDS
    assert sum(heard) == sum(json.loads(files[f"stats/{s.name}.json"])["dprime_pairs"] for s, _ in shards) > 0
    assert not list(out.rglob("*.tmp"))


def test_a_failed_write_is_named_and_the_other_shards_are_kept(shards, tmp_path: Path) -> None:
    out = _output(tmp_path / "out")
    (out / "ledger" / "00002.parquet.tmp").mkdir()  # shard 00002's ledger cannot be written there
    failed = r"cannot write .*ledger/00002\.parquet\.tmp: .*then rerun with --resume"
    with (
        pytest.raises(CapfiltError, match=failed),
        ShardWriters(out, 2, on_written=lambda stats: None) as writing,
    ):
        for shard, rows in shards:
            writing.web(shard, rows)
    listed = set(read_manifest(out))
    assert "00002" not in listed and {"00000", "00001"} <= listed  # written before it, or beside it
    assert {p.stem for p in (out / "dprime").glob("*.tar")} == listed  # 00002's stays .tmp until --resume
    assert (out / "dprime" / "00002.tar.tmp").is_file()


def test_a_stop_keeps_the_shards_being_written_and_drops_the_rest(shards, tmp_path: Path) -> None:
    out = _output(tmp_path / "out")
    heard: list[str] = []
    with (
        pytest.raises(KeyboardInterrupt),
        ShardWriters(out, 2, on_written=lambda stats: heard.append(stats["shard"])) as writing,
    ):
        for shard, rows in shards[:3]:
            writing.web(shard, rows)
        raise KeyboardInterrupt  # as Ctrl-C, or SIGTERM through signals_interrupt, does
    listed = set(read_manifest(out))
    # Each shard is either finished (listed, every file there) or absent: never half of one.
    assert listed == set(heard) and listed <= {"00000", "00001", "00002"} and listed
    for d, ext in (("dprime", "tar"), ("dprime_index", "parquet"), ("ledger", "parquet"), ("stats", "json")):
        assert {p.stem for p in (out / d).glob(f"*.{ext}")} == listed, d
    assert not list(out.rglob("*.tmp"))


def test_what_a_writer_logs_is_logged_by_the_driver(shards, tmp_path: Path, caplog) -> None:
    out = _output(tmp_path / "out")
    shard, rows = shards[0]
    gone = Shard(shard.id, str(tmp_path / "moved_away.tar"), "web")  # kept images no longer readable
    with caplog.at_level(logging.WARNING), ShardWriters(out, 2, on_written=lambda stats: None) as writing:
        writing.web(gone, rows)
    warned = [r for r in caplog.records if r.name == "capfilt.pipelines.clean_output"]
    assert warned and all(r.levelno == logging.WARNING for r in warned)
    assert any("could not be read again to copy it into D'" in r.getMessage() for r in warned)
    assert json.loads((out / "stats" / "00000.json").read_text())["dprime_pairs"] == 0


def _die(*args: Any) -> Any:
    os._exit(3)  # as the kernel's OOM killer would end it


def test_a_writer_that_dies_is_named_with_its_shard(shards, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(clean_writers, "write_web_files", _die)
    out = _output(tmp_path / "out")
    (first, rows), (second, more) = shards[:2]
    died = r"a process writing shard {} \(.*\) died: killed, out of memory, or .*rerun with --resume"
    with (
        pytest.raises(CapfiltError, match=died.format("00000")),
        ShardWriters(out, 2, on_written=lambda stats: None) as writing,
    ):
        writing.web(first, rows)
    with (
        pytest.raises(CapfiltError, match=died.format("00000")),  # the one it held, not the next
        ShardWriters(out, 2, on_written=lambda stats: None) as writing,
    ):
        writing.web(first, rows)
        wait(list(writing.pending))  # the pool is broken now
        writing.web(second, more)  # before, the pool's own BrokenProcessPool: a traceback
    assert read_manifest(out) == {}


def _plan(actors: int, gpus_per_actor: float) -> ActorPlan:
    return ActorPlan("cuda" if gpus_per_actor else "cpu", actors, actors, gpus_per_actor, 1, 1, 1, 64, 0)


def test_one_writer_unless_the_models_hold_four_gpus() -> None:
    assert default_writers(_plan(4, 0.0), 64) == 1  # CPU clusters: the driver keeps up
    assert default_writers(_plan(1, 0.5), 64) == 1  # one shared GPU
    assert default_writers(_plan(2, 1.0), 64) == 2  # 4 GPUs
    assert default_writers(_plan(8, 1.0), 64) == 5  # 16 GPUs
    assert default_writers(_plan(64, 1.0), 64) == 8  # at most 8
    assert default_writers(_plan(8, 1.0), 4) == 2  # at most half the driver machine's CPUs
    assert default_writers(_plan(8, 1.0), None) == 1


KILLED_DRIVER = """
import os, signal, sys
from pathlib import Path
from capfilt.pipelines.clean_output import prepare
from capfilt.pipelines.clean_writers import ShardWriters
if __name__ == "__main__":
    out = Path(sys.argv[1])
    prepare(out, {"test": "killed"}, resume=False)
    writing = ShardWriters(out, 2, on_written=lambda stats: None)
    list(writing.pool.map(abs, [1, 2]))  # both writers started
    print(*writing.pool._processes, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_writers_end_with_a_killed_driver(tmp_path: Path) -> None:
    """Before, a pool's processes outlived a SIGKILLed driver, some 0.8 GB each, for ever."""
    script = tmp_path / "driver.py"
    script.write_text(KILLED_DRIVER)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10 * clean_writers.PARENT_POLL_S
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # an exited child not yet reaped by init would still answer: a zombie counts as ended
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


def test_the_driver_machine_counts_its_pod_limit_not_the_host(tmp_path: Path, monkeypatch) -> None:
    host = len(os.sched_getaffinity(0))
    v2, quota, period = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    monkeypatch.setattr(clean_resources, "CGROUP_CPU_MAX", v2)
    monkeypatch.setattr(clean_resources, "CGROUP_V1_QUOTA", (quota, period))
    assert clean_resources.local_cpus() == host  # no cgroup files: the affinity
    quota.write_text("-1\n")
    period.write_text("100000\n")
    assert clean_resources.local_cpus() == host  # v1, no limit
    quota.write_text("150000\n")
    assert clean_resources.local_cpus() == 1  # v1, 1.5 CPUs: whole ones
    v2.write_text("max 100000\n")
    assert clean_resources.local_cpus() == host
    v2.write_text("50000 100000\n")
    assert clean_resources.local_cpus() == 1  # half a CPU still gets one
    if host >= 2:
        v2.write_text(f"{100000 * (host + 8)} 100000\n")
        assert clean_resources.local_cpus() == host  # a quota above the affinity: the affinity
    v2.write_text("garbage\n")
    assert clean_resources.local_cpus() == host


STOPPED_WHILE_STARTING = """
import pickle, sys, time
from pathlib import Path
from capfilt.errors import signals_interrupt
from capfilt.pipelines.clean_output import prepare, read_manifest
from capfilt.pipelines.clean_writers import ShardWriters
if __name__ == "__main__":
    out, shards = Path(sys.argv[1]), pickle.loads(Path(sys.argv[2]).read_bytes())
    prepare(out, {"test": "starting"}, resume=False)
    try:  # as clean() runs them: SIGTERM stops as Ctrl-C does
        with signals_interrupt(), ShardWriters(out, 2, on_written=lambda stats: None) as writing:
            for shard, rows in shards[:2]:
                writing.web(shard, rows)
            while not all(f.running() for f in writing.pending):  # queued for the writers, so
                time.sleep(0.01)  # a stop keeps them: only shards not begun are dropped
            print("handed over", flush=True)
            writing.drain()
    except KeyboardInterrupt:
        print("stopped", sorted(read_manifest(out)), flush=True)
        sys.exit(130)
"""


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_while_the_writers_start_keeps_their_shards(shards, tmp_path: Path, stop: int) -> None:
    """Ctrl-C and a closed terminal reach the terminal's whole process group, `ray job stop` the
    job's processes: the writers ignore them and finish their shards; the driver stops. Before, a Ctrl-C while they
    imported torch (1-13 s) killed them: 'a process writing shard 00000 ... died'."""
    script, handed = tmp_path / "driver.py", tmp_path / "shards.pickle"
    script.write_text(STOPPED_WHILE_STARTING)
    handed.write_bytes(pickle.dumps(shards))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "out"), str(handed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job: the signal goes to all
    )
    try:
        assert proc.stdout.readline() == "handed over\n"
        os.killpg(proc.pid, stop)  # the writers are still starting: spawned, importing
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert out == "stopped ['00000', '00001']\n" and "died" not in err
