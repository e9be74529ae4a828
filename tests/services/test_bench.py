"""`capfilt bench serve`: a bounded loopback load test that reports both modes; batching wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from capfilt.errors import CapfiltError

from .conftest import RayHead


def test_bench_serve_reports_both_modes_and_batching_wins(
    our_captioner_dir: Path, our_filter_dir: Path, ray_head: RayHead
) -> None:
    argv = [sys.executable, "-m", "capfilt.services.bench_cli", "--captioner", str(our_captioner_dir)]
    argv += ["--filter", str(our_filter_dir), "--clients", "16", "--duration", "2", "--warmup", "1"]
    argv += ["--image-size", "64", "--ray-address", ray_head.address, "--json"]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the session's Ray head: no second Ray to start
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    batched, alone = result["modes"]
    assert (batched["max_batch"], alone["max_batch"]) == (16, 1)
    for mode in (batched, alone):
        assert mode["requests"] > 0 and mode["errors"] == 0
        assert 0 < mode["p50_ms"] <= mode["p99_ms"]
    assert alone["mean_batch"] == 1.0 and batched["mean_batch"] > 2
    # 16 clients on a 2-core machine shared with other work: the margin is wide, the floor is real
    assert result["speedup"] == pytest.approx(batched["throughput"] / alone["throughput"], rel=1e-3)
    assert result["speedup"] > 1.5, result


def test_bench_options_are_checked() -> None:
    import argparse

    from capfilt.services.bench_cli import add_bench_serve_parser, run_bench_serve

    parser = argparse.ArgumentParser()
    add_bench_serve_parser(parser.add_subparsers(dest="bench_command"))
    for extra, message in (
        (["--max-batch", "1"], "--max-batch >= 2"),
        (["--duration", "0"], "--duration must be in"),
        (["--captioner", "x"], "give both --captioner and --filter"),
    ):
        with pytest.raises(CapfiltError, match=message):
            run_bench_serve(parser.parse_args(["serve", *extra]))
