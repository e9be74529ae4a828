"""The clean job end to end on a local Ray with tiny checkpoints: every input key in the ledger
once, D' readable by webdataset and Ray Data with the input's bytes, the same results as
`capfilt.curate` in-process, resume after SIGKILL, and option errors that name the option."""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.data import iter_samples
from capfilt.errors import CapfiltError
from capfilt.ledger import read_ledger
from capfilt.pipelines.clean import CleanConfig, CleanSummary, clean
from capfilt.pipelines.clean_inputs import read_tar
from capfilt.world.writer import SIDECAR_SCHEMA, Sample, write_shard

log = logging.getLogger(__name__)

SEED = 7
THRESHOLD = 0.0222  # the tiny random filter's p(match) lie in 0.020-0.023: keep about half
FAILED_KEY = "000099990"  # in shard 0's sidecar only: img2dataset could not download it
CORRUPT_KEY, EMPTY_KEY, NO_IMAGE_KEY = "000099991", "000099992", "000099993"


@pytest.fixture(scope="module")
def inputs(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The world's 40 web samples in 4 shards of 10, plus one sample of each kind of failure."""
    out = tmp_path_factory.mktemp("clean_inputs")
    web = list(iter_samples(world / "web"))
    good = [Sample(s.key, s.image, s.text, s.meta["url"], s.meta["width"], s.meta["height"]) for s in web]
    bad = {
        1: Sample(CORRUPT_KEY, b"\xff\xd8\xff not a jpeg", "a red circle", "http://x/c.jpg", 32, 32),
        3: Sample(EMPTY_KEY, b"", "a blue square", "http://x/e.jpg", 32, 32),
    }
    for i in range(4):
        write_shard(out, i, good[10 * i : 10 * i + 10] + ([bad[i]] if i in bad else []))
    sidecar = pq.read_table(out / "00000.parquet").to_pylist()
    sidecar.append(
        {
            **sidecar[0],
            "key": FAILED_KEY,
            "status": "failed_to_download",
            "error_message": "HTTP 404",
            "sha256": None,
        }
    )
    pq.write_table(pa.Table.from_pylist(sidecar, schema=SIDECAR_SCHEMA), out / "00000.parquet")
    with tarfile.open(out / "00002.tar", "a") as tar:  # a key with a text but no image
        info = tarfile.TarInfo(f"{NO_IMAGE_KEY}.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    return out


def _config(inputs: Path, world: Path, out: Path, captioner: Path, filt: Path, **changes: Any) -> CleanConfig:
    base: dict[str, Any] = dict(
        inputs=[str(inputs)],
        output=str(out),
        captioner=str(captioner),
        filter=str(filt),
        human=[str(world / "human")],
        num_captions=2,
        batch_size=8,
        seed=SEED,
        threshold=THRESHOLD,
    )
    return CleanConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def whole(inputs, world, our_captioner_dir, our_filter_dir, tmp_path_factory, ray_cluster) -> CleanSummary:
    """One uninterrupted job."""
    out = tmp_path_factory.mktemp("clean") / "whole"
    seen: list[tuple[int, int, int]] = []
    summary = clean(_config(inputs, world, out, our_captioner_dir, our_filter_dir), lambda *a: seen.append(a))
    assert seen[0] == (0, 6, 0) and seen[-1] == (6, 6, 44)
    # Samples are counted as batches of 8 leave the filter: they move within a shard, never back.
    steps = list(itertools.pairwise(seen))
    assert all(b[0] >= a[0] and b[2] >= a[2] for a, b in steps)
    assert any(b[0] == a[0] and b[2] > a[2] for a, b in steps)
    log.info("clean: %.1f samples/s, %s", summary.samples_per_s, summary.timings)
    return summary


def _input_bytes(directory: Path) -> dict[str, bytes]:
    """Image bytes by key of every tar in `directory` (web and human keys overlap: keep apart)."""
    return {
        s.key: s.files[s.image_ext] for t in directory.glob("*.tar") for s in read_tar(t)[0] if s.image_ext
    }


def _dprime(out: Path) -> dict[str, tuple[bytes, bytes, dict[str, Any]]]:
    """D' read with webdataset: key -> (image bytes, text bytes, json)."""
    import webdataset as wds

    urls = [str(p) for p in sorted((out / "dprime").glob("*.tar"))]
    pairs = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert s["__key__"] not in pairs, f"{s['__key__']} twice in D'"
        pairs[s["__key__"]] = (s["jpg"], s["txt"], json.loads(s["json"]))
    return pairs


def test_every_key_once_and_dprime_is_byte_identical(whole: CleanSummary, inputs: Path, world: Path) -> None:
    ledger = read_ledger(whole.output).to_pylist()
    keys = [r["key"] for r in ledger]
    expected = {s.key for tar in inputs.glob("*.tar") for s in read_tar(tar)[0]} | {FAILED_KEY}
    assert len(keys) == len(set(keys)) == len(expected) == 44 and set(keys) == expected
    by_key = {r["key"]: r for r in ledger}
    assert by_key[FAILED_KEY]["status"] == "failed_to_download"
    assert (
        by_key[FAILED_KEY]["error_message"] == "HTTP 404"
        and by_key[FAILED_KEY]["reason"] == "failed_to_download"
    )
    assert by_key[CORRUPT_KEY]["status"] == "image_undecodable"
    assert by_key[EMPTY_KEY]["status"] == "image_empty" and by_key[NO_IMAGE_KEY]["status"] == "missing_image"
    assert whole.status == {
        "failed_to_download": 1,
        "image_empty": 1,
        "image_undecodable": 1,
        "missing_image": 1,
        "ok": 40,
    }
    for row in ledger:
        assert row["captioner_id"].startswith("sha256:") and row["filter_id"].startswith("sha256:")
        if row["status"] == "ok":
            assert len(row["synthetic"]) == 2
            assert (row["web_itm"] is None) == (not (row["web_text"] or "").strip())  # empty texts: unscored
    # D' = kept web ∪ kept synthetic ∪ human, each image byte-identical to its input.
    pairs, web_bytes, human_bytes = _dprime(whole.output), _input_bytes(inputs), _input_bytes(world / "human")
    index = pq.read_table(whole.output / "dprime_index").to_pylist()
    assert {r["key"] for r in index} == set(pairs) and len(index) == whole.dprime_pairs
    kept = {r["key"] for r in ledger if r["web_kept"]}
    kept |= {f"{r['key']}_s{j}" for r in ledger for j in range(len(r["synthetic_kept"]))}
    human = {f"{s.key}_h" for s in iter_samples(world / "human")}
    assert set(pairs) == kept | human and whole.human_pairs == len(human) == 24
    assert whole.web_kept + whole.synthetic_kept > 0, "nothing kept: the test would not see D' at all"
    for key, (image, text, meta) in pairs.items():
        origin = "human" if key.endswith("_h") else "synthetic" if "_s" in key else "web"
        assert image == (human_bytes if origin == "human" else web_bytes)[meta["source_key"]]
        assert meta["origin"] == origin and text.decode() == meta["caption"]
        if origin != "human":
            assert meta["itm"] > whole.threshold
    # Ray Data reads the directory as it is.
    import ray

    rows = ray.data.read_webdataset(str(whole.output / "dprime"), decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(pairs)
    assert all(bytes(r["jpg"]) == pairs[r["__key__"]][0] for r in rows)


def test_dprime_tars_spend_no_pax_header_on_each_member(whole: CleanSummary) -> None:
    """Plain ustar members: a PAX header (1 KiB a member; a float mtime asks for one) made up 40%
    of a D' of small images."""
    tars = sorted((whole.output / "dprime").glob("*.tar"))
    assert tars
    for path in tars:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert members and all(m.pax_headers == {} and m.mtime == 0 for m in members), path
        data = sum(-(-m.size // 512) * 512 for m in members)
        # each member's 512-byte header, its data, and the end blocks padded to a 10 KiB record
        assert path.stat().st_size == -(-(512 * len(members) + data + 1024) // 10240) * 10240


def _close(a: float | None, b: float | None, tol: float) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, abs_tol=tol))


def test_ledger_matches_curate_in_process(whole, inputs, our_captioner_dir, our_filter_dir) -> None:
    from capfilt.curate import curate
    from capfilt.decision import Rule
    from capfilt.images import open_image
    from capfilt.inference import Captioner, Filter

    ok = [s for s in iter_samples(inputs) if s.key not in (CORRUPT_KEY, EMPTY_KEY)]
    config = _config(inputs, inputs, whole.output, our_captioner_dir, our_filter_dir)
    curated = curate(
        Captioner(our_captioner_dir),
        Filter(our_filter_dir),
        [open_image(s.image) for s in ok],
        [s.key for s in ok],
        [s.text for s in ok],
        Rule(threshold=THRESHOLD),
        config.generation(),
        seed=SEED,
    )
    by_key = {r["key"]: r for r in read_ledger(whole.output).to_pylist()}
    assert len(curated) == 40
    for c in curated:
        row = by_key[c.key]
        assert row["reason"] == c.decision.reason and row["web_kept"] == c.decision.web_kept
        assert row["synthetic_kept"] == [s.text for s in c.decision.synthetic_kept]
        assert [s["text"] for s in row["synthetic"]] == [s.text for s in c.synthetic]
        assert _close(row["web_itm"], c.web_itm, 1e-5) and _close(row["web_itc"], c.web_itc, 1e-5)
        for got, want in zip(row["synthetic"], c.synthetic):
            assert _close(got["itm"], want.itm, 1e-5) and _close(got["itc"], want.itc, 1e-5)


KILLED_RUN = f"""
import sys, time
from capfilt.pipelines.clean import CleanConfig, clean
inputs, world, out, captioner, filt, address = sys.argv[1:]
def stall(done, total, samples):
    if done >= 1:
        time.sleep(120)  # killed here, between shards
clean(CleanConfig(inputs=[inputs], output=out, captioner=captioner, filter=filt, human=[world + "/human"],
                  num_captions=2, batch_size=8, seed={SEED}, threshold={THRESHOLD!r}, ray_address=address), stall)
"""


def _comparable(out: Path) -> tuple[list[dict[str, Any]], list[tuple[str, bytes, bytes, str, str]]]:
    ledger = sorted(read_ledger(out).to_pylist(), key=lambda r: r["key"])
    dprime = sorted((k, img, txt, m["origin"], m["source_key"]) for k, (img, txt, m) in _dprime(out).items())
    return ledger, dprime


def test_killed_job_resumes_to_the_same_result(
    whole, inputs, world, our_captioner_dir, our_filter_dir, tmp_path
):
    import ray

    out = tmp_path / "killed"
    args = [str(inputs), str(world), str(out), str(our_captioner_dir), str(our_filter_dir)]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, *args, ray.get_runtime_context().gcs_address])
    try:
        deadline = time.monotonic() + 600  # generous: a loaded 2-core machine starts actors slowly
        while time.monotonic() < deadline and not (out / "manifest.jsonl").is_file():
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = (out / "manifest.jsonl").read_text().splitlines()
    assert len(finished) == 1
    # What a kill can leave: temp files, a finished-looking file without a manifest line, a torn line.
    (out / "dprime" / "00003.tar.tmp").write_bytes(b"half a tar")
    (out / "ledger" / "00002.parquet").write_bytes(b"not parquet")
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"shard": "000')
    resumed = clean(_config(inputs, world, out, our_captioner_dir, our_filter_dir, resume=True))
    assert resumed.shards_skipped == 1 and resumed.run_samples < 44
    manifest = [json.loads(line)["shard"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(manifest) == [f"{i:05d}" for i in range(6)]
    assert not list(out.rglob("*.tmp"))
    ledger_a, dprime_a = _comparable(whole.output)
    ledger_b, dprime_b = _comparable(out)
    assert dprime_a == dprime_b
    assert [r["key"] for r in ledger_a] == [r["key"] for r in ledger_b]
    for a, b in zip(ledger_a, ledger_b):
        assert _close(a["web_itm"], b["web_itm"], 1e-6) and _close(a["web_itc"], b["web_itc"], 1e-6)
        same = (
            "status",
            "reason",
            "web_kept",
            "synthetic_kept",
            "error_message",
            "captioner_id",
            "filter_id",
        )
        assert {k: a[k] for k in same} == {k: b[k] for k in same}, a["key"]
    # Finished: a rerun does nothing.
    again = clean(_config(inputs, world, out, our_captioner_dir, our_filter_dir, resume=True))
    assert again.shards_skipped == 6 and again.run_samples == 0 and again.dprime_pairs == whole.dprime_pairs


def test_writer_processes_write_what_the_driver_writes(
    whole, inputs, world, our_captioner_dir, our_filter_dir, tmp_path
) -> None:
    """--writers 2: two processes write the finished shards beside the pipeline (one driver writes
    some 4,200 pairs/s); every shard file equals the driver's own, byte for byte."""
    out = tmp_path / "writers"
    seen: list[tuple[int, int, int]] = []
    config = _config(inputs, world, out, our_captioner_dir, our_filter_dir, writers=2)
    summary = clean(config, lambda *a: seen.append(a))
    assert summary.resources["writers"] == 2 and whole.resources["writers"] == 1
    assert seen[-1] == (6, 6, 44) and all(b[0] >= a[0] for a, b in itertools.pairwise(seen))
    files = sorted(
        p.relative_to(whole.output)
        for d in ("dprime", "dprime_index", "ledger", "stats")
        for p in (Path(whole.output) / d).iterdir()
    )
    assert len(files) == 6 + 6 + 4 + 6  # 4 web shards and 2 human ones, which have no ledger
    assert (
        sorted(
            p.relative_to(out)
            for d in ("dprime", "dprime_index", "ledger", "stats")
            for p in (out / d).iterdir()
        )
        == files
    )
    for f in files:
        assert (out / f).read_bytes() == (Path(whole.output) / f).read_bytes(), f
    manifest = Path(whole.output, "manifest.jsonl").read_text().splitlines()
    assert sorted((out / "manifest.jsonl").read_text().splitlines()) == sorted(manifest)
    assert summary.dprime_pairs == whole.dprime_pairs and summary.samples == whole.samples


def test_a_writer_starting_from_an_unguarded_script_starts_no_job(
    inputs, world, our_captioner_dir, our_filter_dir, tmp_path, monkeypatch
) -> None:
    """spawn imports the driver's script again in each writer: without the `__main__` guard its
    clean() ran a whole second job (with --resume, on the same output) inside the writer."""
    import multiprocessing

    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    out = tmp_path / "out"
    with pytest.raises(CapfiltError, match=r'put that call under `if __name__ == "__main__":`'):
        clean(_config(inputs, world, out, our_captioner_dir, our_filter_dir, writers=2))
    assert not out.exists()


def test_ctrl_c_names_the_stop_and_what_is_finished(
    inputs, world, our_captioner_dir, our_filter_dir, tmp_path, monkeypatch, ray_cluster
) -> None:
    from capfilt.pipelines import clean as job

    def ctrl_c(*args: Any) -> None:
        raise KeyboardInterrupt  # as Python raises it for SIGINT: no message

    monkeypatch.setattr(job, "plan_actors", ctrl_c)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt) as stopped:
        clean(_config(inputs, world, out, our_captioner_dir, our_filter_dir))
    # before: "clean : 0 of 6 ..." (an exception is true even when its message is empty)
    assert str(stopped.value) == (
        f"clean interrupted: 0 of 6 shards are finished in {out}; rerun the same command with --resume "
        "to clean the rest"
    )


STOPPED_CLI = """
import sys, time
from capfilt.pipelines import clean_writers
record = clean_writers.record_shard
def record_then_wait(*args):
    record(*args)
    time.sleep(300)  # stopped here, one shard finished
clean_writers.record_shard = record_then_wait
from capfilt.cli import main
sys.exit(main(sys.argv[1:]))
"""


REPORTING_CLI = """
import sys, time
from capfilt.pipelines import clean as job
job._report = lambda *args: time.sleep(300)  # stopped here, every shard finished
from capfilt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_after_the_last_shard_still_stops_as_documented(
    inputs, world, our_captioner_dir, our_filter_dir, tmp_path, ray_cluster
):
    """While the summary and report are written: before, the signal handlers were back to Ray's
    by then, and the driver died with exit 15, no message and no summary."""
    import ray

    out = tmp_path / "reporting"
    argv = ["clean", "--input", str(inputs), "--output", str(out), "--captioner", str(our_captioner_dir)]
    argv += ["--filter", str(our_filter_dir), "--batch-size", "8", "--seed", str(SEED)]
    argv += ["--ray-address", ray.get_runtime_context().gcs_address]
    proc = subprocess.Popen(
        [sys.executable, "-c", REPORTING_CLI, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        shards = len(list(inputs.glob("*.tar")))
        while time.monotonic() < deadline and (
            not (out / "manifest.jsonl").is_file()
            or len((out / "manifest.jsonl").read_text().splitlines()) < shards
        ):
            assert proc.poll() is None, f"the job ended before it could be stopped: {proc.stderr.read()}"
            time.sleep(0.05)
        time.sleep(1)  # into the stubbed report
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    said = f"{shards} of {shards} shards are finished in {out}; rerun the same command with --resume to write"
    assert said in err, err
    same = dict(human=None, num_captions=1, threshold=None, resume=True)  # the CLI's defaults above
    resumed = clean(_config(inputs, world, out, our_captioner_dir, our_filter_dir, **same))
    assert resumed.shards_skipped == shards and resumed.report is not None and resumed.report.is_file()


def test_sigterm_stops_the_job_as_ctrl_c_does_and_says_how_to_resume(
    whole, inputs, world, our_captioner_dir, our_filter_dir, tmp_path
):
    """What `ray job stop`, Kubernetes or a scheduler send: before, Ray's handler aborted the
    driver (exit 134, a stack dump); now the job stops as on Ctrl-C and names the resume."""
    import ray

    out = tmp_path / "stopped"
    argv = ["clean", "--input", str(inputs), "--output", str(out), "--captioner", str(our_captioner_dir)]
    argv += ["--filter", str(our_filter_dir), "--human", str(world / "human"), "--num-captions", "2"]
    argv += ["--batch-size", "8", "--seed", str(SEED), "--threshold", str(THRESHOLD)]
    gcs = ["--ray-address", ray.get_runtime_context().gcs_address]
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPED_CLI, *argv, *gcs],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600  # generous: a loaded 2-core machine starts actors slowly
        while time.monotonic() < deadline and not (out / "manifest.jsonl").is_file():
            assert proc.poll() is None, f"the job ended before it could be stopped: {proc.stderr.read()}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert (
        f"clean stopped by SIGTERM: 1 of 6 shards are finished in {out}; rerun the same command with --resume"
        in err
    )
    assert "SIGTERM received" not in err and not list(out.rglob("*.tmp"))
    resumed = clean(_config(inputs, world, out, our_captioner_dir, our_filter_dir, resume=True))
    assert resumed.shards_skipped == 1 and resumed.dprime_pairs == whole.dprime_pairs


CONNECTING_CLI = """
import sys, time
from pathlib import Path
from capfilt.pipelines import clean as job
def slow_connect(address):
    Path(sys.argv[-1]).touch()
    time.sleep(300)  # stopped here, as in a ray.init starting a local cluster
job.connect_ray = slow_connect
from capfilt.cli import main
sys.exit(main(sys.argv[1:-1]))
"""


def test_sigterm_while_connecting_stops_and_leaves_the_new_output_as_it_was(
    inputs, world, our_captioner_dir, our_filter_dir, tmp_path
):
    """Before, the default SIGTERM killed the driver there, and its job.json made the same command
    refuse a "non-empty" --output."""
    out, marker = tmp_path / "never", tmp_path / "connecting"
    argv = ["clean", "--input", str(inputs), "--output", str(out), "--captioner", str(our_captioner_dir)]
    argv += ["--filter", str(our_filter_dir)]
    proc = subprocess.Popen(
        [sys.executable, "-c", CONNECTING_CLI, *argv, str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not marker.exists():
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "stopped by SIGTERM" in err, err
    assert not out.exists()


@pytest.mark.parametrize("made_first", [False, True], ids=["absent", "empty"])
def test_a_cluster_that_cannot_be_reached_is_named_and_the_same_command_runs_again(
    inputs, world, our_captioner_dir, our_filter_dir, tmp_path, monkeypatch, made_first
):
    """Ray's own error was a ConnectionError traceback after 20 s naming neither the address nor
    the token, and the job.json written before it made the rerun refuse a "non-empty" --output."""
    import ray

    def unreachable(address=None, **kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    from capfilt.pipelines import ray_connect

    monkeypatch.setattr(ray_connect, "_probe", lambda where: None)  # Ray's own error, past the probe
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", unreachable)
    out = tmp_path / "out"
    if made_first:
        out.mkdir()
    config = _config(inputs, world, out, our_captioner_dir, our_filter_dir, ray_address="10.9.9.9:6379")
    with pytest.raises(CapfiltError) as err:
        clean(config)
    assert "could not connect to the Ray cluster at 10.9.9.9:6379" in str(err.value)
    assert "RAY_AUTH_TOKEN" in str(err.value) and "--ray-address" in str(err.value)
    assert out.is_dir() == made_first and (not made_first or not any(out.iterdir()))


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("127.0.0.1:1", "could not connect to the Ray cluster at 127.0.0.1:1: nothing answers there"),
        ("head", "'head' is not a Ray cluster address"),
    ],
)
def test_an_address_where_no_cluster_can_be_is_refused_at_once(
    inputs, world, our_captioner_dir, our_filter_dir, tmp_path, monkeypatch, address, says
):
    """No mock of Ray here: where nothing listened Ray's own connect retried for over 12 minutes
    (Ctrl-C did not stop it), and an address it cannot parse was a ValueError traceback."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    out = tmp_path / "out"
    config = _config(inputs, world, out, our_captioner_dir, our_filter_dir, ray_address=address)
    start = time.monotonic()
    with pytest.raises(CapfiltError, match=re.escape(says)):
        clean(config)
    assert time.monotonic() - start < 30 and not out.exists()


def test_a_refused_token_says_what_to_set(monkeypatch):
    import ray
    from ray.exceptions import AuthenticationError

    from capfilt.pipelines import ray_connect
    from capfilt.pipelines.ray_connect import connect_ray

    def refused(address=None, **kwargs):
        raise AuthenticationError("Invalid authentication token")

    monkeypatch.setattr(ray_connect, "_probe", lambda where: None)
    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    with pytest.raises(
        CapfiltError, match=r"the Ray cluster at head:6379 refused this process's token.*RAY_AUTH_TOKEN"
    ):
        connect_ray(None)


def test_read_and_decode_never_run_inside_the_captioner_actors(
    inputs, world, our_captioner_dir, our_filter_dir, tmp_path, ray_cluster, capsys
):
    """With equal CPUs per task and per actor (4 CPUs: 1 and 1) Ray Data fused read and decode
    into the captioner's actor pool, which then took `batch_size` shards a call: a 12-shard job
    ran in one call of one actor and gave no row for 46 s, then all of them."""
    from capfilt.pipelines.clean import _pipeline, inspect_checkpoint
    from capfilt.pipelines.clean_output import Shard
    from capfilt.pipelines.clean_resources import ActorPlan

    plan = ActorPlan("cpu", 2, 1, 0.0, 1.0, 1, 1.0, 4.0, 0.0)  # what a 4-CPU machine gets
    config = _config(inputs, world, tmp_path / "out", our_captioner_dir, our_filter_dir)
    cap = inspect_checkpoint(str(our_captioner_dir), "caption", "captioner")
    filt = inspect_checkpoint(str(our_filter_dir), "score", "filter")
    shards = [Shard(i, str(p), "web") for i, p in enumerate(sorted(inputs.glob("*.tar")))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline = _pipeline(config, plan, shards, cap, filt, 0.5)
    # the remote arguments that keep the stages apart are named ones: Ray 2.60 deprecates the rest
    assert not [w for w in caught if "ray_remote_args" in str(w.message)]
    pipeline.explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(read_shard)->MapBatches(decode_batch)]" in optimized
    assert "ActorPoolMapOperator[MapBatches(CaptionStage)]" in optimized, optimized


def test_keep_fraction_picks_the_threshold_over_all_scores(
    inputs, our_captioner_dir, our_filter_dir, tmp_path, ray_cluster, monkeypatch
) -> None:
    """Also stopped in its first pass, after one shard is scored: the stop says so, and the resumed
    job keeps that shard's scores."""
    from capfilt.decision import Rule, Scored, decide, threshold_for_keep_fraction
    from capfilt.ledger import judged_scores
    from capfilt.pipelines import clean as job

    out = tmp_path / "fraction"
    two_shards = [str(inputs / "00000.tar"), str(inputs / "00001.tar")]
    config = _config(inputs, inputs, out, our_captioner_dir, our_filter_dir, human=None, threshold=None)
    config = dataclasses.replace(config, inputs=two_shards, keep_fraction=0.3)
    write = job.write_parquet

    def write_then_stop(*args: Any) -> None:
        write(*args)
        raise KeyboardInterrupt("stopped by SIGTERM")

    monkeypatch.setattr(job, "write_parquet", write_then_stop)
    with pytest.raises(
        KeyboardInterrupt, match=r"0 of 2 shards are finished .*first pass scored 1; the rerun keeps"
    ):
        clean(config)
    monkeypatch.setattr(job, "write_parquet", write)
    (stashed,) = (out / "scored").glob("*.parquet")
    stashed_rows = pq.read_metadata(stashed).num_rows
    summary = clean(dataclasses.replace(config, resume=True))
    assert summary.run_samples == summary.samples - stashed_rows  # the stashed shard was not scored again
    rows = read_ledger(out).to_pylist()
    judged = judged_scores(rows, Rule())
    assert len(judged) >= 35  # 20 images: web texts (some empty) and best candidates
    assert summary.threshold == threshold_for_keep_fraction(judged, 0.3) != 0.5
    assert sum(s > summary.threshold for s in judged) == round(0.3 * len(judged))
    for r in rows:  # the stored decision is the rule applied to the stored scores
        assert r["threshold"] == summary.threshold
        if r["status"] == "ok":
            web = Scored(r["web_text"], r["web_itm"]) if r["web_itm"] is not None else None
            d = decide(web, [Scored(c["text"], c["itm"]) for c in r["synthetic"]], Rule(summary.threshold))
            assert (r["reason"], r["web_kept"]) == (d.reason, d.web_kept)
            assert r["synthetic_kept"] == [s.text for s in d.synthetic_kept]
    assert summary.dprime_pairs == summary.web_kept + summary.synthetic_kept > 0
    picked = json.loads((out / "threshold.json").read_text())
    assert not (out / "scored").exists() and picked["keep_fraction"] == 0.3
    assert (picked["texts"], picked["samples"]) == (len(judged), len(rows))  # texts: once the rows


def test_options_are_named_in_errors(inputs, world, our_captioner_dir, our_filter_dir, tmp_path) -> None:
    def config(**changes: Any) -> CleanConfig:
        return dataclasses.replace(
            _config(inputs, world, tmp_path / "out", our_captioner_dir, our_filter_dir), **changes
        )

    with pytest.raises(CapfiltError, match=r"--threshold must be a probability in \[0, 1\]; got 1\.5"):
        clean(config(threshold=1.5))
    with pytest.raises(CapfiltError, match="--keep-fraction and --threshold exclude each other"):
        clean(config(keep_fraction=0.5))
    with pytest.raises(CapfiltError, match=r"--captioner .*nowhere: checkpoint not found"):
        clean(config(captioner=str(tmp_path / "nowhere")))
    with pytest.raises(CapfiltError, match=r"--captioner .*cannot write captions"):
        clean(config(captioner=str(our_filter_dir)))
    with pytest.raises(CapfiltError, match=r"--input: data path not found"):
        clean(config(inputs=[str(tmp_path / "no_shards")]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    with pytest.raises(CapfiltError, match=r"--output .* is not empty; pass --resume"):
        clean(config())
    with pytest.raises(CapfiltError, match=r"--num-captions must be between 1 and 64; got 0"):
        clean(config(num_captions=0))
    with pytest.raises(CapfiltError, match=r"--num-captions must be between 1 and 64; got 1000000"):
        clean(config(num_captions=1_000_000))
    with pytest.raises(CapfiltError, match=r"--precision must be one of exact, fast; got 'half'"):
        clean(config(precision="half"))
    with pytest.raises(CapfiltError, match=r"--top-k must be >= 0 \(0: no top-k cut\); got -1"):
        clean(config(top_k=-1))
    for writers in (0, 9):
        with pytest.raises(CapfiltError, match=rf"--writers must be in \[1, 8\]; got {writers}"):
            clean(config(writers=writers, output=str(tmp_path / "fresh")))
    for seed in (-1, 2**63):  # the captioners refused -1, and the ledger's int64 2**63, after the job began
        with pytest.raises(CapfiltError, match=rf"--seed must be in \[0, 2\*\*63 - 1\].*got {seed}"):
            clean(config(seed=seed, output=str(tmp_path / "fresh")))
    assert not (tmp_path / "fresh").exists()


def test_fast_precision_cleans_every_sample_with_close_scores(
    whole, inputs, world, our_captioner_dir, our_filter_dir, tmp_path
) -> None:
    """`--precision fast` (bf16 or int8, as this CPU has AMX or not): the same samples, the same statuses, web-text scores
    near exact mode's (the synthetic captions may differ: sampling diverges once a logit moves)."""
    fast = clean(
        _config(inputs, world, tmp_path / "fast", our_captioner_dir, our_filter_dir, precision="fast")
    )
    exact = {r["key"]: r for r in read_ledger(whole.output).to_pylist()}
    rows = read_ledger(fast.output).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(exact)
    for row in rows:
        assert row["status"] == exact[row["key"]]["status"]
        if row["web_itm"] is not None:
            assert abs(row["web_itm"] - exact[row["key"]]["web_itm"]) < 0.05
    job = json.loads((fast.output / "job.json").read_text())
    assert job["precision"] == "fast" and job["top_k"] == 50
    with pytest.raises(CapfiltError, match=r"precision: saved 'fast', now 'exact'"):  # resumed as exact
        clean(_config(inputs, world, fast.output, our_captioner_dir, our_filter_dir, resume=True))


def _parser() -> argparse.ArgumentParser:
    from capfilt.pipelines.clean_cli import add_clean_parser

    parser = argparse.ArgumentParser()
    add_clean_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_reruns_a_finished_job_as_a_json_summary(
    whole, inputs, world, our_captioner_dir, our_filter_dir, capsys
):
    from capfilt.pipelines.clean_cli import run_clean

    argv = [
        "clean",
        "--input",
        str(inputs),
        "--output",
        str(whole.output),
        "--captioner",
        str(our_captioner_dir),
    ]
    argv += ["--filter", str(our_filter_dir), "--human", str(world / "human"), "--num-captions", "2"]
    argv += ["--batch-size", "8", "--seed", str(SEED), "--threshold", str(THRESHOLD), "--resume"]
    summary = json.loads(json.dumps(run_clean(_parser().parse_args(argv))))
    assert json.loads((whole.output / "summary.json").read_text()) == summary  # what the REST API shows
    assert summary["shards_skipped"] == summary["shards"] == 6 and summary["samples"] == 44
    assert summary["dprime_pairs"] == whole.dprime_pairs and summary["status"] == whole.status
    assert summary["ledger"] == str(whole.output / "ledger")
    # The test cluster (2 CPUs, no GPU): one actor per pool on a share of a core, as chosen.
    resources = summary["resources"]
    assert (resources["device"], resources["captioner_actors"], resources["filter_actors"]) == ("cpu", 1, 1)
    assert resources["cpus_per_actor"] == pytest.approx(2 / 3) and resources["threads_per_actor"] == 1
    assert whole.resources == resources
    # stderr is no terminal here: the progress comes as a line (rich's live bar would print nothing)
    assert "clean shards: 6/6 (100%), samples 44" in capsys.readouterr().err


def test_cli_flags_map_onto_the_config() -> None:
    from capfilt.pipelines.clean_cli import config_from_args

    parser = _parser()
    argv = "clean --input a b --output o --captioner c --filter f --keep-fraction 0.3 --num-captions 4 "
    argv += (
        "--top-p 0.8 --top-k 7 --batch-size 5 --num-gpus 0.5 --captioner-actors 2 --filter-actors 3 --resume --seed 9"
        " --precision fast --writers 3"
    )
    config = config_from_args(parser.parse_args(argv.split()))
    assert config.writers == 3 and config_from_args(parser.parse_args(argv.split()[:10])).writers is None
    assert config.inputs == ["a", "b"] and config.keep_fraction == 0.3 and config.threshold is None
    assert (config.num_captions, config.top_p, config.batch_size, config.num_gpus) == (4, 0.8, 5, 0.5)
    assert (config.captioner_actors, config.filter_actors, config.resume, config.seed) == (2, 3, True, 9)
    assert config.precision == "fast" and config.top_k == 7
    assert (
        config.generation().top_k == 7 and config_from_args(parser.parse_args(argv.split()[:10])).top_k == 50
    )
    with pytest.raises(SystemExit):
        parser.parse_args([*argv.split(), "--threshold", "0.5"])  # exclusive with --keep-fraction


def test_the_job_writes_its_report(whole: CleanSummary) -> None:
    assert whole.report == whole.output / "report.html" and whole.report.is_file()
    page = whole.report.read_text()
    ledger = read_ledger(whole.output)
    assert f'<td class="n">{ledger.num_rows}</td>' in page or str(ledger.num_rows) in page
    assert page.count("<svg") >= 3 and "data:image/jpeg;base64," in page  # histograms, keep rate, gallery
    assert "report_s" in whole.timings


def test_the_default_threshold_and_an_explicit_one_are_one_job(tmp_path: Path) -> None:
    """`--threshold 0.5` and no `--threshold` decide alike, so a job started with one resumes with
    the other (the shipped RayJob passes 0.5, the docs' resume command none); outputs written
    when job.json held None for the default resume too; another threshold is still refused."""
    from capfilt.errors import CapfiltError
    from capfilt.pipelines.clean import effective_threshold
    from capfilt.pipelines.clean_output import JOB, prepare

    assert effective_threshold(None, None) == effective_threshold(0.5, None) == 0.5
    assert effective_threshold(None, 0.3) is None and effective_threshold(0.7, None) == 0.7
    job = {"inputs": ["a"], "threshold": 0.5, "keep_fraction": None, "seed": 0}
    out = tmp_path / "out"
    prepare(out, job, resume=False)
    prepare(out, dict(job), resume=True)
    (out / JOB).write_text(json.dumps({**job, "threshold": None}))  # an output of an earlier version
    prepare(out, dict(job), resume=True)
    (out / JOB).write_text(json.dumps({**job, "threshold": None}))
    with pytest.raises(CapfiltError, match=r"threshold: saved 0.5, now 0.7"):
        prepare(out, {**job, "threshold": 0.7}, resume=True)
    with pytest.raises(CapfiltError, match=r"keep_fraction: saved None, now 0.3"):
        prepare(out, {**job, "threshold": None, "keep_fraction": 0.3}, resume=True)
