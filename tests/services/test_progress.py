"""A job's progress as REST reports it, read from its output directory while it runs."""

from __future__ import annotations

import json
from pathlib import Path

from capfilt.services.jobs import read_progress


def _shard(out: Path, name: str, kind: str, stats: dict) -> str:
    (out / "stats").mkdir(parents=True, exist_ok=True)
    (out / "stats" / f"{name}.json").write_text(json.dumps({"shard": name, "kind": kind, **stats}))
    return json.dumps({"shard": name, "kind": kind, "dprime_pairs": stats.get("dprime_pairs", 0)}) + "\n"


def test_progress_counts_finished_shards_and_names_read_errors(tmp_path: Path) -> None:
    assert read_progress(tmp_path) is None  # nothing written yet
    (tmp_path / "job.json").write_text(
        json.dumps({"inputs": ["a.tar", "b.tar", "c.tar"], "human": ["h.tar"]})
    )
    web_ok = {
        "input": "a.tar",
        "samples": 10,
        "web_kept": 4,
        "synthetic_kept": 6,
        "dprime_pairs": 10,
        "status": {"success": 10},
        "reasons": {"kept_web": 4, "web_below_threshold": 6},
        "read_error": None,
    }
    web_cut = {
        "input": "b.tar",
        "samples": 3,
        "web_kept": 1,
        "synthetic_kept": 2,
        "dprime_pairs": 3,
        "status": {"success": 3},
        "reasons": {"kept_web": 1, "web_below_threshold": 2},
        "read_error": "tar cut short after 3 samples",
    }
    human_cut = {"input": "h.tar", "samples": 5, "dprime_pairs": 5, "read_error": "corrupt member"}
    lines = _shard(tmp_path, "00000", "web", web_ok) + _shard(tmp_path, "00001", "web", web_cut)
    lines += _shard(tmp_path, "h00000", "human", human_cut)
    (tmp_path / "manifest.jsonl").write_text(
        lines + '{"shard": "00002", "kind": "web"'
    )  # last line unfinished
    progress = read_progress(tmp_path)
    assert progress is not None
    assert (progress.shards_total, progress.shards_done, progress.samples_done) == (4, 3, 13)
    assert (progress.web_kept, progress.synthetic_kept, progress.dprime_pairs) == (5, 8, 18)
    assert progress.reasons == {"kept_web": 5, "web_below_threshold": 8}
    assert progress.read_errors == {"b.tar": "tar cut short after 3 samples", "h.tar": "corrupt member"}
