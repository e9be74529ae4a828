"""What a D' pair's .json carries: the input's record plus ours, never a field that a trainer or a
strict JSON reader would take wrongly."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from capfilt.curate import Candidate, Curated
from capfilt.data import iter_samples, sample_captions
from capfilt.decision import Rule, Scored, decide
from capfilt.ledger import ok_row, table
from capfilt.pipelines.clean_output import Shard, prepare, write_human_shard, write_web_shard

WEB_CAPTIONS = ["IMG_0001.jpg", "stock photo", "click here to buy"]  # alt texts a scraper collected
HUMAN_CAPTIONS = ["a red square", "a square, red", "one red square on nothing"]


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 20, 20)).save(buf, "JPEG")
    return buf.getvalue()


def _strict(data: bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(data, parse_constant=refuse)


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    prepare(tmp_path / "out", {"test": "records"}, resume=False)
    return tmp_path / "out"


def test_web_and_synthetic_pairs_train_on_their_own_text(tmp_path: Path, out: Path) -> None:
    meta = {"captions": WEB_CAPTIONS, "similarity": float("nan"), "aesthetic": float("inf"), "width": 32}
    # Python's json writes NaN and Infinity as bare words, as scrapers' records often hold them.
    tar = _tar(
        tmp_path / "00000.tar",
        {"a.jpg": _jpeg(), "a.txt": b"IMG_0001.jpg", "a.json": json.dumps(meta).encode()},
    )
    synthetic = [Candidate("a red square on a white background", 0.9, 0.3)]
    decision = decide(Scored("IMG_0001.jpg", 0.7), [Scored(c.text, c.itm) for c in synthetic], Rule())
    curated = Curated("a", "IMG_0001.jpg", 0.7, 0.2, synthetic, decision)
    row = ok_row(curated, shard=str(tar), url=None, threshold=0.5, captioner_id="c", filter_id="f", seed=0)
    write_web_shard(out, Shard(0, str(tar), "web"), table([row]).to_pylist())
    pairs = list(iter_samples([out / "dprime" / "00000.tar"]))
    assert sorted(p.key for p in pairs) == ["a", "a_s0"]
    for pair in pairs:
        # Before, the input's "captions" list came along and training read it in place of .txt.
        assert sample_captions(pair) == [pair.text] and pair.meta["source_captions"] == WEB_CAPTIONS
    with tarfile.open(out / "dprime" / "00000.tar") as t:
        for name in ("a.json", "a_s0.json"):
            record = _strict(t.extractfile(name).read())
            assert record["similarity"] is None and record["aesthetic"] is None and record["width"] == 32
            assert "captions" not in record and record["caption"] in ("IMG_0001.jpg", synthetic[0].text)


def test_human_pairs_keep_every_phrasing(tmp_path: Path, out: Path) -> None:
    meta = {"captions": HUMAN_CAPTIONS, "score": float("-inf")}
    tar = _tar(
        tmp_path / "00001.tar",
        {
            "h.jpg": _jpeg(),
            "h.txt": b"a red square",
            "h.json": json.dumps(meta).encode(),
            "z.jpg": _jpeg(),
            "z.txt": "\u200b\ufeff".encode(),  # nothing to read, though str.strip() keeps it
        },
    )
    stats = write_human_shard(out, Shard(1, str(tar), "human"))
    assert stats["skipped_samples"] == [
        {
            "key": "z",
            "reason": "no_text",
            "error_message": "z has no text (.txt, or a caption in its .json or table row)",
        }
    ]
    [pair] = iter_samples([out / "dprime" / "00001.tar"])
    assert (
        pair.key == "h_h" and sample_captions(pair) == HUMAN_CAPTIONS and "source_captions" not in pair.meta
    )
    with tarfile.open(out / "dprime" / "00001.tar") as t:
        assert _strict(t.extractfile("h_h.json").read())["score"] is None


def test_dprime_tars_are_what_webdatasets_writer_writes_byte_for_byte(tmp_path: Path) -> None:
    """The writers write tars with tarfile alone (webdataset would import torch into each writer
    process); the bytes are those of webdataset's `TarWriter` with the settings D' used: members in
    extension order, mtime 0, mode 0444, no user or group; a PAX header only for a name over 100
    characters."""
    import random

    import webdataset as wds

    from capfilt.pipelines.clean_output import _write_tar

    rng = random.Random(7)
    records = [
        {
            "__key__": f"{i:09d}_s{i % 3}",
            "jpg": rng.randbytes(rng.randint(0, 3000)),
            "txt": "ü, a caption".encode(),
            "json": json.dumps({"key": i}).encode(),
        }
        for i in range(50)
    ]
    records.append({"__key__": "k" * 150, "png": b"\x89PNG", "txt": b""})  # a long name
    with wds.TarWriter(str(tmp_path / "wds.tar"), encoder=False, mtime=0, user="", group="") as sink:
        for record in records:
            sink.write(record)
    _write_tar(tmp_path / "ours.tar", records)
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "wds.tar").read_bytes()
    with tarfile.open(tmp_path / "ours.tar") as tar:
        assert [m.name for m in tar.getmembers() if m.pax_headers] == ["k" * 150 + ".png", "k" * 150 + ".txt"]
