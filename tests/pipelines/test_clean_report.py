"""The clean job's report.html on an output directory written by the job's own writers (no Ray):
counts match the ledger, histograms add up, the threshold is drawn, the gallery shows thumbnails
from the input shards, hostile text stays text, and missing shards or empty jobs do not crash."""

from __future__ import annotations

import base64
import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.curate import Candidate, Curated
from capfilt.decision import Rule, Scored, decide
from capfilt.errors import CapfiltError
from capfilt.ledger import LEDGER_SCHEMA, failed_row, ok_row, read_ledger
from capfilt.pipelines.clean_output import Shard, prepare, write_web_shard
from capfilt.pipelines.clean_report import load_images, write_report
from capfilt.world.writer import Sample, sample_key, write_shard

THRESHOLD = 0.5
HOSTILE_WEB = "<script>alert(1)</script>"
HOSTILE_CAPTION = '"><img src=x onerror=alert(2)>'
HOSTILE_ERROR = "<b>HTTP 404</b>"
FAILED_KEY = "000009999"  # in shard 0's ledger only: never downloaded
UNDECODABLE_KEY = sample_key(1, 0, 100)
JOB = {
    "captioner_id": "sha256:" + "a" * 64,
    "filter_id": "sha256:" + "b" * 64,
    "human": [],
    "keep_fraction": None,
    "num_captions": 2,
    "seed": 3,
    "threshold": THRESHOLD,
    "top_p": 0.9,
}


# ----------------------------------------------------------------------------- a tiny HTML tree


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str, cls: str | None = None, **attrs: str) -> list[Node]:
        return [
            n
            for n in self.iter()
            if n.tag == tag
            and (cls is None or cls in n.attrs.get("class", "").split())
            and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def text(self) -> str:
        return "".join(self.texts) + "".join(c.text() for c in self.children)


class TreeBuilder(HTMLParser):
    """html.parser into a tree; fails on an end tag that does not close the open element."""

    VOID: ClassVar[set[str]] = {"meta", "img", "br", "hr", "input", "link"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].texts.append(data)


def parse(text: str) -> Node:
    builder = TreeBuilder()
    builder.feed(text)
    builder.close()
    assert builder.stack == [builder.root], f"unclosed: {[n.tag for n in builder.stack]}"
    return builder.root


# ----------------------------------------------------------------------------- a clean job's output


def _image(i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (160, 120), (40 * i % 256, 90, 200 - 20 * i % 200)).save(buf, fmt)
    return buf.getvalue()


def _ok(key: str, shard: Path, i: int) -> dict[str, Any]:
    """An ok row with made-up scores spread over [0, 1], decided by BLIP's rule."""
    web_text = None if i == 3 else (HOSTILE_WEB if i == 1 else f"web text {i}")
    web_itm = None if web_text is None else round((0.05 + 0.37 * i) % 1.0, 4)
    texts = [HOSTILE_CAPTION if i == 2 else f"caption {i}a", f"caption {i}b"]
    itms = [round((0.1 + 0.29 * i) % 1.0, 4), round((0.2 + 0.53 * i) % 1.0, 4)]
    synthetic = [Candidate(t, p, 0.1) for t, p in zip(texts, itms)]
    web = None if web_text is None else Scored(web_text, web_itm)
    decision = decide(web, [Scored(c.text, c.itm) for c in synthetic], Rule(threshold=THRESHOLD))
    curated = Curated(key, web_text, web_itm, None if web_itm is None else 0.2, synthetic, decision)
    common = {k: JOB[k] for k in ("captioner_id", "filter_id", "seed")}
    return ok_row(
        curated, shard=str(shard), url=f"http://example.com/{key}.jpg", threshold=THRESHOLD, **common
    )


def _failed(key: str, shard: Path, status: str, message: str) -> dict[str, Any]:
    common = {k: JOB[k] for k in ("captioner_id", "filter_id", "seed")}
    row = dict(status=status, error_message=message, web_text="a cat", url=None, threshold=THRESHOLD)
    return failed_row(key, shard=str(shard), **row, **common)


def _write_job(out: Path, inputs: Path, per_shard: int = 8) -> list[Path]:
    """Three input shards cleaned with made-up scores through the job's writers; returns the tars."""
    tars = []
    for s in range(3):
        images = [_image(s * per_shard + i, "PNG" if i % 2 else "JPEG") for i in range(per_shard)]
        samples = [Sample(sample_key(s, i, 100), b, "t", "u", 160, 120) for i, b in enumerate(images)]
        if s == 1:
            samples[0] = Sample(UNDECODABLE_KEY, b"\xff\xd8 not a jpeg", "t", "u", 160, 120)
        tars.append(write_shard(inputs, s, samples))
    prepare(out, {**JOB, "inputs": [str(t) for t in tars]}, resume=False)
    for s, tar in enumerate(tars):
        rows = [_ok(sample_key(s, i, 100), tar, s * per_shard + i) for i in range(per_shard)]
        if s == 0:
            rows.append(_failed(FAILED_KEY, tar, "failed_to_download", HOSTILE_ERROR))
        if s == 1:
            rows[0] = _failed(UNDECODABLE_KEY, tar, "image_undecodable", "not a readable image")
        write_web_shard(out, Shard(s, str(tar), "web"), rows)
    return tars


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished job whose third input shard has since been deleted."""
    root = tmp_path_factory.mktemp("report")
    (root / "inputs").mkdir()
    tars = _write_job(root / "out", root / "inputs")
    tars[2].unlink()
    return root / "out"


def _render(out: Path, **kwargs: Any) -> tuple[str, Node]:
    path = write_report(out, **kwargs)
    assert path == out / "report.html" and not (out / "report.html.tmp").exists()
    text = path.read_text(encoding="utf-8")
    return text, parse(text)


def _cards(root: Node, side: str) -> list[Node]:
    return root.find_all("article", cls=side)


# ----------------------------------------------------------------------------- tests


def test_counts_by_reason_and_status_and_totals_match_the_ledger(job: Path) -> None:
    _, root = _render(job)
    ledger = read_ledger(job).to_pylist()
    for name in ("reason", "status"):
        shown = {
            tr.attrs[f"data-{name}"]: int(tr.find_all("td", cls="n")[0].text())
            for tr in root.find_all("tr")
            if f"data-{name}" in tr.attrs
        }
        assert shown == Counter(r[name] for r in ledger), name
        bars = [tr.find_all("div", cls="bar") for tr in root.find_all("tr") if f"data-{name}" in tr.attrs]
        assert all(len(b) == 1 for b in bars)
    totals = {
        tr.attrs["data-total"]: tr.find_all("td")[0].text()
        for tr in root.find_all("tr")
        if "data-total" in tr.attrs
    }
    dprime = sum(pq.read_metadata(p).num_rows for p in (job / "dprime_index").glob("*.parquet"))
    assert dprime > 0
    assert totals["samples"] == str(len(ledger)) == "25"
    assert totals["kept web texts"] == str(sum(r["web_kept"] for r in ledger))
    assert totals["kept synthetic captions"] == str(sum(len(r["synthetic_kept"]) for r in ledger))
    assert totals["D' pairs"] == str(dprime)
    kept = sum(bool(r["web_kept"] or r["synthetic_kept"]) for r in ledger)
    assert totals["keep rate"] == f"{kept / len(ledger):.1%}"
    job_text = root.find_all("section", id="job")[0].text()
    assert JOB["captioner_id"] in job_text and JOB["filter_id"] in job_text and "00002.tar" in job_text


def test_histograms_add_up_to_the_scored_texts_and_draw_the_threshold(job: Path) -> None:
    _, root = _render(job, bins=10)
    ledger = [r for r in read_ledger(job).to_pylist() if r["status"] == "ok"]
    web = [r["web_itm"] for r in ledger if r["web_itm"] is not None]
    best = [max(c["itm"] for c in r["synthetic"]) for r in ledger if r["synthetic"]]
    every = [c["itm"] for r in ledger for c in r["synthetic"]]
    expected = {"web": web, "synthetic": best, "candidates": every}
    figures = {f.attrs["data-series"]: f for f in root.find_all("figure", cls="histogram")}
    assert set(figures) == set(expected)
    for series, values in expected.items():
        counts = [int(r.attrs["data-count"]) for r in figures[series].find_all("rect", cls="bin")]
        assert len(counts) == 10 and sum(counts) == len(values) > 0, series
        assert counts == np.histogram(values, bins=10, range=(0, 1))[0].tolist(), series
        lines = figures[series].find_all("line", cls="threshold")
        assert [float(line.attrs["data-threshold"]) for line in lines] == [THRESHOLD]
        assert "ITM p(match)" in figures[series].text()
    # keep rate at the job's threshold is what the job kept
    rate = root.find_all("figure", cls="keep-rate")[0]
    assert {p.attrs["data-series"] for p in rate.find_all("polyline")} == {"web", "synthetic"}
    legend = {li.attrs["data-series"]: li for li in rate.find_all("li")}
    assert legend["web"].attrs["data-kept"] == str(sum(r["web_kept"] for r in ledger))
    assert legend["synthetic"].attrs["data-kept"] == str(sum(len(r["synthetic_kept"]) > 0 for r in ledger))
    assert rate.find_all("line", cls="threshold")


def test_gallery_shows_evenly_spaced_kept_and_rejected_samples_with_thumbnails(job: Path) -> None:
    _, root = _render(job, gallery_size=4)
    by_key = {r["key"]: r for r in read_ledger(job).to_pylist()}
    kept, rejected = _cards(root, "kept"), _cards(root, "rejected")
    assert len(kept) == len(rejected) == 4
    for card in kept:
        row = by_key[card.attrs["data-key"]]
        assert row["web_kept"] or row["synthetic_kept"]
        assert card.attrs["data-reason"] == row["reason"]
    for card in rejected:
        row = by_key[card.attrs["data-key"]]
        assert not row["web_kept"] and not row["synthetic_kept"]
    kept_keys = sorted(k for k, r in by_key.items() if r["web_kept"] or r["synthetic_kept"])
    shown = [c.attrs["data-key"] for c in kept]
    assert shown == sorted(shown) and shown[0] == kept_keys[0] and shown[-1] == kept_keys[-1]
    assert write_report(job, gallery_size=4).read_text() == write_report(job, gallery_size=4).read_text()
    images = 0
    for card in kept + rejected:
        imgs = card.find_all("img")
        if by_key[card.attrs["data-key"]]["shard"].endswith("00002.tar"):
            continue  # input deleted: see the next test
        if by_key[card.attrs["data-key"]]["status"] != "ok":
            assert not imgs and "image unavailable" in card.text()
            continue
        src = imgs[0].attrs["src"]
        assert src.startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(src.partition(",")[2])))
        thumb.load()
        assert max(thumb.size) == 128 and thumb.size == (128, 96)
        images += 1
    assert images > 0


def test_every_row_in_a_big_gallery_and_missing_inputs_say_image_unavailable(job: Path) -> None:
    _, root = _render(job, gallery_size=100)
    ledger = read_ledger(job).to_pylist()
    cards = {c.attrs["data-key"]: c for c in _cards(root, "kept") + _cards(root, "rejected")}
    assert set(cards) == {r["key"] for r in ledger}
    for row in ledger:
        card = cards[row["key"]]
        if row["shard"].endswith("00002.tar") or row["status"] != "ok":
            assert not card.find_all("img") and "image unavailable" in card.text()
        else:
            assert card.find_all("img") and "image unavailable" not in card.text()
    assert HOSTILE_ERROR in cards[FAILED_KEY].text()  # the error message, as text


def test_hostile_texts_stay_text(job: Path) -> None:
    text, root = _render(job, gallery_size=100)
    assert "<script" not in text.lower()  # the page has no scripts of its own either
    assert HOSTILE_ERROR not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert HOSTILE_WEB in root.text() and HOSTILE_CAPTION in root.text()
    assert all(img.attrs["src"].startswith("data:") for img in root.find_all("img"))


def test_page_is_self_contained(job: Path) -> None:
    _, root = _render(job, gallery_size=100)
    assert not root.find_all("script") and not root.find_all("link") and not root.find_all("iframe")
    for node in root.iter():
        for name in ("src", "href"):
            assert node.attrs.get(name, "data:").startswith("data:"), (node.tag, node.attrs)
    style = "".join(n.text() for n in root.find_all("style"))
    assert "url(" not in style and "@import" not in style
    csp = root.find_all("meta", http_equiv="Content-Security-Policy")
    assert csp and "default-src 'none'" in csp[0].attrs["content"]


def test_load_images_reads_one_input_and_returns_nothing_for_what_it_cannot_read(
    job: Path, tmp_path: Path
) -> None:
    tar = Path(read_ledger(job).to_pylist()[0]["shard"])
    keys = {sample_key(0, 1, 100), sample_key(0, 2, 100), "not-there"}
    images = load_images(str(tar), keys)
    assert set(images) == keys - {"not-there"}
    assert Image.open(io.BytesIO(images[sample_key(0, 1, 100)])).size == (160, 120)
    assert load_images(str(tar.with_name("00002.tar")), keys) == {}  # deleted
    assert load_images(str(tar.with_suffix(".parquet")), keys) == {}  # the sidecar: no image table
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar at all")
    assert load_images(str(broken), keys) == {}
    table = tmp_path / "table.parquet"  # a parquet image table, the clean job's other input format
    png = _image(1, "PNG")
    pq.write_table(pa.table({"key": ["a", "b"], "image": [png, b"x"], "caption": ["x", "y"]}), table)
    assert load_images(str(table), {"a", "c"}) == {"a": png}


def test_empty_jobs_give_a_valid_page(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    prepare(out, {**JOB, "inputs": []}, resume=False)
    _, root = _render(out)
    totals = {
        tr.attrs["data-total"]: tr.find_all("td")[0].text()
        for tr in root.find_all("tr")
        if "data-total" in tr.attrs
    }
    assert totals["samples"] == "0" and totals["D' pairs"] == "0"
    assert "No samples." in root.text() and "No scored texts." in root.text()
    for figure in root.find_all("figure", cls="histogram"):
        assert sum(int(r.attrs["data-count"]) for r in figure.find_all("rect", cls="bin")) == 0
    assert not _cards(root, "kept") and not _cards(root, "rejected")
    # only failures: rows, but nothing scored
    failed = tmp_path / "failed"
    (tmp_path / "in").mkdir()
    tar = write_shard(tmp_path / "in", 0, [])
    prepare(failed, {**JOB, "inputs": [str(tar)]}, resume=False)
    write_web_shard(
        failed, Shard(0, str(tar), "web"), [_failed(FAILED_KEY, tar, "failed_to_download", "404")]
    )
    _, root = _render(failed)
    assert len(_cards(root, "rejected")) == 1 and "No scored texts." in root.text()
    rows = {tr.attrs["data-reason"]: tr for tr in root.find_all("tr") if "data-reason" in tr.attrs}
    assert list(rows) == ["failed_to_download"]


def test_bad_arguments_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CapfiltError, match="not a directory"):
        write_report(tmp_path / "nope")
    with pytest.raises(CapfiltError, match="bins"):
        write_report(tmp_path, bins=0)


def _rewrite_ledgers(src: Path, dst: Path, change) -> Path:
    """A copy of the job `src` whose ledger files went through `change(table, path)`."""
    import shutil

    shutil.copytree(src, dst)
    for path in sorted((dst / "ledger").glob("*.parquet")):
        change(pq.read_table(path), path)
    return dst


def test_ledgers_of_other_layouts_give_the_same_page(job: Path, tmp_path: Path) -> None:
    """The report reads the ledger's scores alone (a projection of nested columns); files written
    with the legacy list layout, lacking a column, or with a first file of 0 rows and no job.json
    render as the whole ledger does."""
    from capfilt.pipelines import clean_report

    def page_of(out: Path) -> str:  # the page less the output's own path and name
        return clean_report._render(out, 12, 20).replace(str(out), "OUT").replace(out.name, "OUT")

    page = page_of(job)
    legacy = _rewrite_ledgers(
        job,
        tmp_path / "legacy",
        lambda t, p: pq.write_table(t.cast(LEDGER_SCHEMA), p, use_compliant_nested_type=False),
    )
    schema = pq.ParquetFile(legacy / "ledger" / "00000.parquet").schema
    assert "synthetic.list.item.itm" in [schema.column(i).path for i in range(len(schema))]
    assert page_of(legacy) == page
    no_seed = _rewrite_ledgers(
        job, tmp_path / "no_seed", lambda t, p: pq.write_table(t.drop_columns(["seed"]), p)
    )
    assert page_of(no_seed) == page
    # No job.json and a first ledger file of 0 rows (an empty shard): the header is the ledger's.
    empty_first = _rewrite_ledgers(job, tmp_path / "empty_first", lambda t, p: None)
    (empty_first / "job.json").unlink()
    first = pq.read_table(empty_first / "ledger" / "00000.parquet")
    pq.write_table(first.slice(0, 0), empty_first / "ledger" / "00000.parquet")
    assert JOB["captioner_id"] in page_of(empty_first)


def test_a_ledger_file_that_cannot_be_read_is_named(job: Path, tmp_path: Path) -> None:
    from capfilt.pipelines.clean_report import _render

    broken = _rewrite_ledgers(job, tmp_path / "broken", lambda t, p: None)
    (broken / "ledger" / "00001.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(CapfiltError, match=r"ledger file .*00001\.parquet cannot be read"):
        _render(broken, 12, 20)


def test_the_page_is_summed_file_by_file_and_reads_only_the_picked_rows_whole(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page's memory does not grow with the ledger: its files are read one at a time and
    summed. The same rows split into a file each, or joined into one file, give the same page; and
    only the gallery's rows are read whole."""
    from capfilt.pipelines import clean_report

    def page_of(out: Path, gallery: int = 4) -> str:
        return clean_report._render(out, gallery, 20).replace(str(out), "OUT").replace(out.name, "OUT")

    page = page_of(job)
    whole = read_ledger(job)
    one = _rewrite_ledgers(job, tmp_path / "joined_ledger", lambda t, p: p.unlink())
    pq.write_table(whole, one / "ledger" / "00000.parquet")
    assert page_of(one) == page
    each = _rewrite_ledgers(job, tmp_path / "split_ledger", lambda t, p: p.unlink())
    for i in range(whole.num_rows):
        pq.write_table(whole.slice(i, 1), each / "ledger" / f"{i:05d}.parquet")
    assert page_of(each) == page

    read_whole: list[int] = []
    real = clean_report.pq.read_table

    def counting(path: Any, *args: Any, **kwargs: Any) -> pa.Table:
        read_whole.append(1)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(clean_report.pq, "read_table", counting)
    assert page_of(each) == page
    assert len(read_whole) == 8  # the 4 kept and 4 rejected rows of the gallery, a file each


def test_the_page_holds_one_ledger_file_at_a_time(tmp_path: Path) -> None:
    """The peak of Arrow's memory while the page is made is that of a ledger file or two (the
    gallery reads its rows' files whole), not the whole ledger's scores and decisions, which a job
    of millions of rows could not hold (some 0.3 KB a row)."""
    import subprocess
    import sys

    out, files, rows = tmp_path / "out", 40, 2_000
    (out / "ledger").mkdir(parents=True)
    for f in range(files):
        row = _ok(sample_key(f, 0, 100), tmp_path / "gone.tar", f)
        pq.write_table(
            pa.Table.from_pylist([{**row, "key": f"{f:05d}{i:04d}"} for i in range(rows)], LEDGER_SCHEMA),
            out / "ledger" / f"{f:05d}.parquet",
        )
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "import pyarrow as pa\n"
        "from capfilt.pipelines import clean_report as r\n"
        "out = Path(sys.argv[1])\n"
        "one = r._read_summary_file(out / 'ledger' / '00000.parquet', r._summary_schema()).nbytes\n"
        "r.write_report(out, gallery_size=2)\n"
        "print(one, pa.default_memory_pool().max_memory())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)], capture_output=True, text=True, check=True
    )
    one, peak = map(int, done.stdout.split())
    assert peak < files * one / 2, (peak, one)


def test_keep_rate_points_are_those_of_the_whole_ledger_to_the_last_digit() -> None:
    """Summed file by file, the fraction kept is still 1 - below / n, as it was computed over the
    whole ledger: (n - below) / n differs in the last bit for some counts (800 texts, 69 of them at
    0: 40.84 for 40.83 in the drawn points)."""
    import re

    from capfilt.pipelines.clean_report import KEEP_RATE_GRID, _keep_rate, _Series, _x, _y

    values = np.concatenate([np.zeros(69), np.linspace(0.001, 1.0, 731)])
    series = {"web": _Series(20, 0.5), "synthetic": _Series(20, 0.5)}
    for part in np.array_split(values, 7):
        series["web"].add(part)
    grid = np.linspace(0.0, 1.0, KEEP_RATE_GRID)
    kept = 1.0 - np.searchsorted(np.sort(values), grid, side="right") / values.size
    expected = " ".join(f"{_x(t):.2f},{_y(f):.2f}" for t, f in zip(grid.tolist(), kept.tolist()))
    drawn = re.search(r'<polyline data-series="web" points="([^"]*)"', _keep_rate(series, 0.5))
    assert drawn is not None and drawn.group(1) == expected
