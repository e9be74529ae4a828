"""`capfilt bench throughput`: the figures it prints are computed, checked and consistent."""

from __future__ import annotations

import json

import pytest
import torch

from capfilt.cli import main
from capfilt.errors import CapfiltError
from capfilt.model.config import med_config
from capfilt.model.med import MED
from capfilt.pipelines.bench_throughput import ThroughputConfig, run_throughput, vit_flops


def test_vit_flops_equal_the_counted_matmuls(monkeypatch) -> None:
    """Our FLOP formula, attention aside (torch's counter does not see CPU attention), equals what
    torch counts in the encoder's convolution and linear layers (run unfused: the counter does
    not look inside torch's fused encoder layer)."""
    from torch.utils.flop_counter import FlopCounterMode

    from capfilt.model import vit

    monkeypatch.setattr(vit, "_FUSED_LAYER", None)

    for size, px, stem in (("tiny", 32, "patch"), ("small", 64, "patch"), ("small", 64, "conv")):
        cfg = med_config(size, image_size=px, stem=stem)
        med = MED(cfg).eval()
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            med.encode_image(torch.randn(3, 3, px, px))
        v = cfg.vision
        tokens = (px // v.patch_size) ** 2 + 1
        attention = v.depth * 4 * tokens**2 * v.width
        assert counter.get_total_flops() == 3 * (vit_flops(cfg) - attention)
    # ViT-B/16 at 224 px: 17.6 GMACs, as timm reports it.
    assert vit_flops(med_config("base")) / 2 == pytest.approx(17.56e9, rel=0.01)


def test_bench_compares_paths_on_identical_weights(capsys) -> None:
    code = main(
        [
            "bench", "throughput", "--size", "tiny", "--pairs", "8", "--batch-size", "4",
            "--check-images", "4", "--paths", "transformers", "exact", "fast", "--repeats", "2", "--json",
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    paths = result["paths"]
    assert set(paths) == {"transformers", "exact", "fast"}
    from capfilt.inference import fast_cpu_kind

    assert paths["fast"]["notes"]["kind"] == fast_cpu_kind()  # bf16 where AMX, else int8
    for name, p in paths.items():
        peak = "bf16" if name == "fast" and p["notes"]["kind"] == "bf16" else "fp32"  # fast's dtype
        assert p["pairs"] == 8 and p["seconds"] > 0
        assert p["pairs_per_s"] == pytest.approx(8 / p["seconds"])
        rounds = p["notes"]["round_seconds"]  # interleaved rounds; the path's time is their median
        assert len(rounds) == 2 and p["seconds"] == pytest.approx(sum(rounds) / 2)
        assert 0 < p["mfu"] == pytest.approx(p["model_tflops"] / result["matmul_tflops"][peak])
    assert result["ratios"]["exact_over_transformers"] == pytest.approx(
        paths["exact"]["pairs_per_s"] / paths["transformers"]["pairs_per_s"]
    )
    exact = result["exactness"]
    assert exact["images"] == 4 and exact["greedy_identical"] == 4
    assert exact["itm_texts"] == 8 and exact["itm_max_abs_diff"] < 1e-4
    fast = paths["fast"]["notes"]
    assert 0.0 <= fast["decision_agreement"] <= 1.0
    assert 0.0 < fast["web_itm_max_abs_diff"] < 0.1  # bf16 or int8 changes the scores, a little
    assert result["vit"]["images_per_s"] > 0 and result["vit"]["mfu"] > 0
    assert result["round_ratios"] == pytest.approx(
        [
            a / b
            for a, b in zip(
                paths["transformers"]["notes"]["round_seconds"], paths["exact"]["notes"]["round_seconds"]
            )
        ]
    )
    stages = result["stages"]
    for path in ("a", "b"):
        assert set(stages[path]) == {"images", "decoding", "scoring"}
        assert all(v > 0 for v in stages[path].values())
    a, b = sum(stages["a"].values()), sum(stages["b"].values())
    assert stages["bounds"]["exact_over_transformers"] == pytest.approx(a / b)
    assert stages["bounds"]["without_our_decoding"] == pytest.approx(a / (b - stages["b"]["decoding"]))


def test_bench_runs_the_clean_job_and_the_scaling_run(ray_cluster) -> None:
    result = run_throughput(
        ThroughputConfig(size="tiny", pairs=8, batch_size=4, paths=("exact", "job"), scaling=(6,))
    )
    job = result["job"]
    assert job["pairs"] == 8 and job["wall_s"] > 0 and job["peak_rss_gb"] > 0
    assert result["paths"]["job"]["pairs_per_s"] == pytest.approx(8 / job["wall_s"])
    assert "job_over_exact" in result["ratios"]
    (row,) = result["scaling"]
    assert row["pairs"] == 6 and row["seconds_per_pair"] == pytest.approx(row["wall_s"] / 6)


def test_steady_rate_is_read_between_shares_of_the_samples_scored() -> None:
    from capfilt.pipelines.bench_throughput import _window_rate

    # (seconds, samples scored so far): a slow start (fill), 100 samples/s, then a slow drain
    points = [(5.0, 10), (6.0, 100), (7.0, 200), (8.0, 300), (9.0, 400), (10.0, 500), (11.0, 600)]
    points += [(12.0, 700), (13.0, 800), (14.0, 900), (20.0, 1000)]
    assert _window_rate(points, 0.1, 0.9) == pytest.approx(100.0)
    assert _window_rate(points, 0.0, 1.0) == pytest.approx(990 / 15)
    assert _window_rate([(2.0, 100)], 0.1, 0.9) is None  # one point tells no rate
    assert _window_rate([(2.0, 100), (2.0, 200)], 0.1, 0.9) is None
    assert _window_rate([], 0.1, 0.9) is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"size": "huge"}, "--size must be one of"),
        ({"pairs": 0}, "--pairs must be >= 1"),
        ({"paths": ("exact", "fastest")}, "--paths takes some of"),
        ({"device": "tpu"}, "--device must be auto, cpu or cuda"),
        ({"captioner": "/nonexistent/ckpt"}, "--captioner /nonexistent/ckpt: checkpoint not found"),
        ({"scaling": (0,)}, "--scaling pair counts must be >= 1"),
        ({"repeats": 0}, "--repeats must be >= 1"),
    ],
)
def test_options_are_checked_by_name(changes: dict, message: str) -> None:
    with pytest.raises(CapfiltError, match=message):
        ThroughputConfig(**changes).validate()
