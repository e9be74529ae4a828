"""`capfilt eval retrieval | caption | filter` through the real entry point, on a tiny world."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from capfilt.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from capfilt.world import synthesize

    out = tmp_path_factory.mktemp("eval_world")
    synthesize(out, web=30, human=4, test=6, image_size=32, shard_size=16, seed=2)
    return out


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_retrieval(world, our_filter_dir, capsys):
    code, out, err = _run(
        capsys, "eval", "retrieval", "--model", str(our_filter_dir), "--data", str(world / "test"), "--k", "6"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 6 and result["texts"] >= 18  # 3-5 phrasings per test image
    for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"):
        assert 0.0 <= result[key] <= 100.0
    assert result["ir_r10"] == 100.0  # k covers all 6 images: every text's image is within the top 10
    assert result["r1_mean"] == pytest.approx((result["tr_r1"] + result["ir_r1"]) / 2)


def test_eval_caption_with_truth(world, our_captioner_dir, capsys):
    code, out, err = _run(
        capsys,
        "eval",
        "caption",
        "--model",
        str(our_captioner_dir),
        "--data",
        str(world / "test"),
        "--truth",
        str(world / "truth.parquet"),
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 6 and result["method"] == "beam"
    assert 0.0 <= result["attribute_accuracy"] <= 1.0 and result["bleu4"] >= 0.0 and result["cider_d"] >= 0.0


def test_eval_filter_counts_every_web_text(world, our_filter_dir, capsys):
    code, out, err = _run(
        capsys,
        "eval",
        "filter",
        "--model",
        str(our_filter_dir),
        "--data",
        str(world / "web"),
        "--truth",
        str(world / "truth.parquet"),
        "--threshold",
        "0.0",
    )
    assert code == 0, err
    result = json.loads(out)
    truth = [r for r in pq.read_table(world / "truth.parquet").to_pylist() if r["split"] == "web"]
    assert result["texts"] == len(truth) and result["missing"] == 0
    assert result["noisy"] == sum(r["noisy"] for r in truth)
    empty = sum(1 for r in truth if not r["text"].strip())
    assert result["rejected"] == empty  # threshold 0 keeps every text that has something to match
    assert "Web-text rejections" in err


def test_eval_errors_name_the_problem(world, our_captioner_dir, our_filter_dir, capsys, tmp_path):
    code, _, err = _run(
        capsys, "eval", "retrieval", "--model", str(our_captioner_dir), "--data", str(world / "test")
    )
    assert code == 2 and "cannot score texts" in err
    code, _, err = _run(
        capsys,
        "eval",
        "filter",
        "--model",
        str(our_filter_dir),
        "--data",
        str(world / "web"),
        "--truth",
        str(tmp_path / "nope.parquet"),
    )
    assert code == 2 and "nope.parquet" in err
    code, _, err = _run(
        capsys,
        "eval",
        "filter",
        "--model",
        str(our_filter_dir),
        "--data",
        str(world / "web"),
        "--truth",
        str(world / "truth.parquet"),
        "--threshold",
        "2",
    )
    assert code == 2 and "--threshold" in err


def test_eval_inputs_without_samples_or_truth_are_usage_errors(
    world, our_filter_dir, tmp_path, capsys
) -> None:
    import tarfile

    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    assert main(["eval", "retrieval", "--model", str(our_filter_dir), "--data", str(empty)]) == 2
    assert "retrieval needs images and texts; got 0 images" in capsys.readouterr().err
    not_parquet = tmp_path / "truth.parquet"
    not_parquet.write_text("{}")
    code, _, err = _run(capsys, "eval", "filter", "--model", str(our_filter_dir), "--data", str(world / "web"),
                        "--truth", str(not_parquet))  # fmt: skip
    assert code == 2 and "is not a world's truth table" in err


def test_eval_filter_on_another_split_is_refused(world, our_filter_dir, capsys) -> None:
    """Keys repeat across a world's splits: test shards against the web truth would give figures."""
    argv = ["eval", "filter", "--model", str(our_filter_dir), "--truth", str(world / "truth.parquet")]
    assert main([*argv, "--data", str(world / "test")]) == 2
    assert "carries another text than the web split" in capsys.readouterr().err
    assert main([*argv, "--data", str(world / "web")]) == 0


def test_eval_filter_against_another_worlds_truth_is_refused(world, our_filter_dir, tmp_path, capsys) -> None:
    """A world of the same seed with another noise mix (most texts alike, some not) or fewer pairs:
    figures against its truth would count other texts' noise, so nothing is scored."""
    from capfilt.world import synthesize

    argv = ["eval", "filter", "--model", str(our_filter_dir), "--data", str(world / "web")]
    noiseless = synthesize(tmp_path / "noiseless", web=30, human=4, test=6, image_size=32, shard_size=16, seed=2,
                           noise=0.0)  # fmt: skip
    fewer = synthesize(tmp_path / "fewer", web=10, human=4, test=6, image_size=32, shard_size=16, seed=2)
    code, out, err = _run(capsys, *argv, "--truth", str(noiseless.truth))
    assert code == 2 and out == ""
    assert "carries another text than the web split" in err and str(world / "web") in err
    code, out, err = _run(capsys, *argv, "--truth", str(fewer.truth))
    assert code == 2 and out == ""
    assert ("is not in the web split" in err or "carries another text" in err) and "Traceback" not in err


def test_eval_caption_against_another_worlds_truth_or_split_is_refused(
    world, our_captioner_dir, tmp_path, capsys
) -> None:
    """Every world uses the same keys: another world's truth (or the web shards against the test
    truth) gave an attribute accuracy of other images' contents, with exit 0."""
    from capfilt.world import synthesize

    other = synthesize(tmp_path / "other", web=30, human=4, test=6, image_size=32, shard_size=16, seed=3)
    argv = ["eval", "caption", "--model", str(our_captioner_dir)]
    code, out, err = _run(capsys, *argv, "--data", str(world / "test"), "--truth", str(other.truth))
    assert code == 2 and out == "" and "carries another text than the test split" in err
    code, out, err = _run(
        capsys, *argv, "--data", str(world / "web"), "--truth", str(world / "truth.parquet")
    )
    assert code == 2 and out == "" and "test split" in err and "Traceback" not in err
