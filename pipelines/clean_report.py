"""The clean job's `report.html`: one self-contained page that says what CapFilt did to a dataset.

    path = write_report("runs/clean")  # -> runs/clean/report.html

Everything comes from what the job wrote (`job.json`, `threshold.json`, `stats/`, and the ledger,
the only per-sample record); image thumbnails are re-read from the input shards named in the
ledger, for the gallery only. The page works offline: inline CSS, charts as inline SVG, images as
`data:` URIs, and a Content-Security-Policy that forbids scripts and any outside load. Every text
that comes from the data (web texts, captions, keys, paths, error messages) is escaped.

Sections: the job and its totals; samples by reason and by status; ITM p(match) histograms of
web texts and synthetic captions with the threshold; keep rate against threshold; a gallery of
kept and rejected samples.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.errors import CapfiltError
from capfilt.ledger import CANDIDATE_TYPE, LEDGER_SCHEMA, OK

log = logging.getLogger(__name__)

REPORT = "report.html"
THUMBNAIL = 128  # px, longest side
LIST_SHOWN = 20  # job.json list entries shown in the header
KEEP_RATE_GRID = 101  # thresholds 0.00, 0.01, ..., 1.00
COLORS = {"web": "#1f77b4", "synthetic": "#ff7f0e", "candidates": "#2ca02c", "threshold": "#d62728"}
SERIES = {  # histogram / keep-rate series: (title, colour)
    "web": ("web texts", COLORS["web"]),
    "synthetic": ("synthetic captions (best per image)", COLORS["synthetic"]),
    "candidates": ("synthetic captions (all candidates)", COLORS["candidates"]),
}
# What the counts, histograms and keep rates read of every ledger row: scores and decisions, not
# texts, one ledger file at a time, summed as they go (`_Totals`): the page's memory does not grow
# with the job (holding these columns for the whole ledger took some 0.3 KB a row, 3 GB at 10M
# pairs). The galleries read their few rows whole.
SUMMARY_COLUMNS = [
    "status",
    "reason",
    "threshold",
    "web_itm",
    "web_kept",
    "synthetic.list.element.itm",
    "synthetic_kept",
]
DICTIONARY_COLUMNS = ["status", "reason"]  # a few values each: read as dictionaries
# SVG chart geometry: plot area inside margins (left, right, top, bottom).
W, H, ML, MR, MT, MB = 360, 240, 62, 16, 26, 42
PW, PH = W - ML - MR, H - MT - MB

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin:0 0 8px}h2{margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{background:#1f77b4;height:12px;min-width:1px}.barcell{width:320px}
.charts{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0}figcaption{font-size:12px;color:#555}
svg text{font:10px sans-serif;fill:#333}
.legend{list-style:none;padding:0}.legend span{display:inline-block;width:12px;height:12px;margin-right:6px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:12px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px;overflow-wrap:anywhere;font-size:13px}
.card.kept{border-left:5px solid #2ca02c}.card.rejected{border-left:5px solid #d62728}
.card img,.noimg{display:block;max-width:128px;max-height:128px;margin-bottom:6px}
.noimg{width:128px;height:64px;background:#eee;color:#777;display:flex;align-items:center;justify-content:center}
.card p,.card ol{margin:4px 0}.kept-text{color:#1a7f1a}.dropped-text{color:#999}
.reason{background:#eee;border-radius:4px;padding:0 4px;font-family:monospace}.error{color:#b00}
code{font-size:12px}
"""


def _e(value: Any) -> str:
    """Escape anything for HTML text or a quoted attribute (data is hostile)."""
    return html.escape(str(value), quote=True)


def _short(n: float) -> str:
    """A count that fits above a histogram bar: 7, 950, 12k, 3.4M."""
    if n < 1000:
        return f"{n:g}"
    if n < 1_000_000:
        return f"{n / 1000:.3g}k"
    return f"{n / 1_000_000:.3g}M"


def _axis_top(n: int) -> int:
    """The top of a count axis at or above `n`, so that its 4 ticks are round integers."""
    power = 1
    while True:
        for m in (1, 2, 2.5, 4, 5):
            step = m * power
            if step == int(step) and 4 * step >= n:
                return int(4 * step)
        power *= 10


# ----------------------------------------------------------------------------- reading the job


def load_images(shard: str, keys: set[str]) -> dict[str, bytes]:
    """The original image bytes of `keys` in one input shard, as the ledger's `shard` column names
    it (a webdataset tar or a parquet image table, local or URL); keys without an image are left
    out, and a shard that cannot be read (gone, not an input) gives {}: the gallery then shows
    "image unavailable". A truncated tar gives what was read before the cut."""
    from .clean_inputs import original_images

    return original_images(shard, keys)


def _thumbnail(data: bytes) -> str | None:
    """A max-128px JPEG `data:` URI for display only (D' keeps the original bytes), or None."""
    from capfilt.images import ImageError, open_image

    try:
        img = open_image(data)  # RGB, EXIF-rotated, decompression bombs refused
    except ImageError:
        return None
    img.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    loaded = json.loads(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def _ledger_thresholds(files: Sequence[Path]) -> list[float]:
    """The thresholds the ledger's rows were decided with, in the order first met (one column read;
    a file that cannot be read is named by the pass that reads its scores)."""
    seen: list[float] = []
    for path in files:
        try:
            column = pq.ParquetFile(path).read(columns=["threshold"])["threshold"]
        except (pa.ArrowException, OSError, KeyError, ValueError):
            continue
        seen += pc.unique(pc.drop_null(column)).cast(pa.float64()).to_pylist()
    return pc.unique(pa.array(seen, pa.float64())).to_pylist()  # as Arrow tells values apart: NaN once


def _threshold(files: Sequence[Path], out: Path, job: dict[str, Any]) -> float | None:
    """The threshold that decided the rows: the ledger's, else threshold.json's, else job.json's."""
    used = _ledger_thresholds(files)
    if len(used) > 1:
        log.warning("%s: the ledger holds several thresholds %s; showing the first", out, used)
    if used:
        return used[0]
    saved = _read_json(out / "threshold.json").get("threshold", job.get("threshold"))
    return None if saved is None else float(saved)


def _finite(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Scores as float64 in [0, 1], nulls and NaNs dropped."""
    arr = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
    return np.clip(arr[np.isfinite(arr)], 0.0, 1.0)


def _scores(ledger: pa.Table) -> dict[str, np.ndarray]:
    """ITM p(match) of the ok rows: web texts, best candidate per image, every candidate."""
    ok = pc.equal(ledger["status"], OK)
    synthetic = pc.filter(ledger["synthetic"], ok).combine_chunks()
    flat = pc.list_flatten(synthetic)
    itm = np.asarray(pc.struct_field(flat, "itm").to_numpy(zero_copy_only=False), dtype=np.float64)
    parents = pc.list_parent_indices(synthetic).to_numpy()
    finite = np.isfinite(itm)
    itm, parents = np.clip(itm[finite], 0.0, 1.0), parents[finite]
    best = np.empty(0)
    if itm.size:  # candidates are grouped by row: the max of each run
        _, starts = np.unique(parents, return_index=True)
        best = np.maximum.reduceat(itm, starts)
    return {"web": _finite(pc.filter(ledger["web_itm"], ok)), "synthetic": best, "candidates": itm}


def _kept_mask(ledger: pa.Table) -> np.ndarray:
    """Rows that put at least one pair into D'."""
    web = pc.fill_null(ledger["web_kept"], False).to_numpy(zero_copy_only=False)
    synthetic = pc.fill_null(pc.list_value_length(ledger["synthetic_kept"]), 0).to_numpy()
    return np.asarray(web, dtype=bool) | (np.asarray(synthetic) > 0)


def _value_counts(column: pa.ChunkedArray) -> Counter[str]:
    return Counter(
        {
            str(v["values"]) if v["values"] is not None else "(none)": int(v["counts"])
            for v in pc.value_counts(column).to_pylist()
        }
    )


def _counts(counts: Counter[str]) -> list[tuple[str, int]]:
    """(value, count), most frequent first."""
    return sorted(counts.items(), key=lambda p: (-p[1], p[0]))


@dataclass
class _Series:
    """One series of scores, summed file by file: its histogram, how many lie strictly above each
    threshold of the keep-rate grid and above the job's threshold, and how many there are."""

    bins: int
    threshold: float | None
    histogram: np.ndarray = field(init=False)
    above_grid: np.ndarray = field(init=False)
    above: int = 0
    size: int = 0

    def __post_init__(self) -> None:
        self.histogram = np.zeros(self.bins, dtype=np.int64)
        self.above_grid = np.zeros(KEEP_RATE_GRID, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        self.histogram += np.histogram(values, bins=self.bins, range=(0.0, 1.0))[0]
        grid = np.linspace(0.0, 1.0, KEEP_RATE_GRID)
        self.above_grid += values.size - np.searchsorted(np.sort(values), grid, side="right")
        if self.threshold is not None:
            self.above += int((values > self.threshold).sum())
        self.size += values.size


@dataclass
class _Totals:
    """What the page shows of every ledger row, summed one ledger file at a time."""

    files: list[Path]
    series: dict[str, _Series]
    rows: list[int] = field(default_factory=list)  # per file
    kept: list[int] = field(default_factory=list)  # rows with a pair in D', per file
    ok: int = 0
    web_kept: int = 0
    synthetic_kept: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def samples(self) -> int:
        return sum(self.rows)


def _totals(files: list[Path], bins: int, threshold: float | None) -> _Totals:
    """Sum the ledger's files: each is read (its SUMMARY_COLUMNS), added and let go."""
    schema = _summary_schema()
    totals = _Totals(files, {s: _Series(bins, threshold) for s in SERIES})
    for path in files:
        ledger = _read_summary_file(path, schema)
        for series, values in _scores(ledger).items():
            totals.series[series].add(values)
        totals.rows.append(ledger.num_rows)
        totals.kept.append(int(_kept_mask(ledger).sum()))
        totals.ok += int(pc.sum(pc.equal(ledger["status"], OK).cast(pa.int64())).as_py() or 0)
        totals.web_kept += int(pc.sum(pc.fill_null(ledger["web_kept"], False).cast(pa.int64())).as_py() or 0)
        totals.synthetic_kept += int(pc.sum(pc.list_value_length(ledger["synthetic_kept"])).as_py() or 0)
        totals.reasons.update(_value_counts(ledger["reason"]))
        totals.statuses.update(_value_counts(ledger["status"]))
    return totals


def _pick(totals: _Totals, n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Up to `n` kept and `n` rejected rows, evenly spaced in ledger order (its files by name, each
    file's rows as written: shard by shard, a shard's samples in input order), read whole. Only the
    files holding a picked row are read again."""
    if n == 0 or not totals.samples:
        return [], []
    kept = np.asarray(totals.kept, dtype=np.int64)
    sides = {True: kept, False: np.asarray(totals.rows, dtype=np.int64) - kept}
    picked: dict[bool, np.ndarray] = {}
    for side, per_file in sides.items():
        count = int(per_file.sum())
        picked[side] = (
            np.linspace(0, count - 1, n).round().astype(np.int64) if count > n else np.arange(count)
        )
    where: dict[bool, list[dict[str, int]]] = {True: [], False: []}
    schema = _summary_schema()
    starts = {side: np.cumsum(per_file) - per_file for side, per_file in sides.items()}
    for i, path in enumerate(totals.files):
        wanted = {}
        for side, per_file in sides.items():
            first = starts[side][i]
            at = picked[side][(picked[side] >= first) & (picked[side] < first + per_file[i])] - first
            if at.size:
                wanted[side] = at
        if not wanted:
            continue
        mask = _kept_mask(_read_summary_file(path, schema))
        for side, at in wanted.items():
            rows = np.flatnonzero(mask == side)[at]
            where[side] += [{"_file": i, "_row": int(r)} for r in rows]
    return _whole_rows(totals.files, where[True]), _whole_rows(totals.files, where[False])


def _thumbnails(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(shard, key) -> thumbnail URI of the ok rows; each input shard is read once."""
    wanted: dict[str, set[str]] = {}
    for row in rows:
        if row["status"] == OK and row["shard"]:
            wanted.setdefault(row["shard"], set()).add(row["key"])
    out = {}
    for shard, keys in sorted(wanted.items()):
        for key, data in load_images(shard, keys).items():
            uri = _thumbnail(data)
            if uri is not None:
                out[(shard, key)] = uri
    return out


# ----------------------------------------------------------------------------- rendering


def _table(head: Sequence[str], rows: Sequence[str], cls: str) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _count_table(name: str, counts: list[tuple[str, int]], total: int) -> str:
    """One row per value with its count, share and a horizontal bar."""
    top = max((n for _, n in counts), default=1)
    rows = [
        f'<tr data-{name}="{_e(v)}"><td><code>{_e(v)}</code></td><td class="n">{n}</td>'
        f'<td class="n">{100 * n / total:.1f}%</td>'
        f'<td class="barcell"><div class="bar" style="width:{100 * n / top:.1f}%"></div></td></tr>'
        for v, n in counts
    ]
    return _table([name, "samples", "share", ""], rows, f"counts {name}") if rows else "<p>No samples.</p>"


def _x(v: float) -> float:
    return ML + PW * v


def _y(f: float) -> float:
    return MT + PH * (1.0 - f)


def _svg(body: list[str], label: str, x_label: str, y_label: str, y_top: float, y_fmt: str) -> str:
    """Axes with ticks on [0, 1] x [0, y_top] around `body`."""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        f'role="img" aria-label="{_e(label)}">',
        *body,
        f'<line x1="{ML}" y1="{_y(0)}" x2="{ML + PW}" y2="{_y(0)}" stroke="#333"/>',
        f'<line x1="{ML}" y1="{MT}" x2="{ML}" y2="{_y(0)}" stroke="#333"/>',
    ]
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = _x(v), _y(v)
        parts.append(f'<line x1="{x}" y1="{_y(0)}" x2="{x}" y2="{_y(0) + 4}" stroke="#333"/>')
        parts.append(f'<text x="{x}" y="{_y(0) + 15}" text-anchor="middle">{v:g}</text>')
        parts.append(f'<line x1="{ML - 4}" y1="{y}" x2="{ML}" y2="{y}" stroke="#333"/>')
        tick = f"{v * y_top:.0%}" if y_fmt == "%" else _short(round(v * y_top))
        parts.append(f'<text x="{ML - 6}" y="{y + 3}" text-anchor="end">{tick}</text>')
    parts += [
        f'<text class="xlabel" x="{ML + PW / 2}" y="{H - 6}" text-anchor="middle">{_e(x_label)}</text>',
        f'<text class="ylabel" x="12" y="{MT + PH / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {MT + PH / 2})">{_e(y_label)}</text>',
        "</svg>",
    ]
    return "".join(parts)


def _threshold_line(threshold: float | None) -> list[str]:
    if threshold is None:
        return []
    x = _x(threshold)
    anchor = "end" if threshold > 0.6 else "start"  # the label stays inside the chart
    return [
        f'<line class="threshold" data-threshold="{threshold!r}" x1="{x}" y1="{MT - 12}" x2="{x}" '
        f'y2="{_y(0)}" stroke="{COLORS["threshold"]}" stroke-width="2" stroke-dasharray="5 3"/>',
        f'<text x="{x + (-4 if anchor == "end" else 4)}" y="{MT - 14}" text-anchor="{anchor}" '
        f'style="fill:{COLORS["threshold"]}">threshold {threshold:.3g}</text>',
    ]


def _histogram(series: str, scores: _Series, threshold: float | None) -> str:
    """Counts of the scores in `bins` equal bins on [0, 1], one <rect class="bin"> per bin."""
    title, color = SERIES[series]
    counts, bins = scores.histogram, scores.bins
    edges = np.linspace(0.0, 1.0, bins + 1)  # np.histogram's edges
    top = _axis_top(int(counts.max()))
    body = []
    for c, lo, hi in zip(counts.tolist(), edges[:-1].tolist(), edges[1:].tolist()):
        x, w, h = _x(lo), PW * (hi - lo), PH * c / top
        body.append(
            f'<rect class="bin" data-count="{c}" x="{x:.2f}" y="{_y(0) - h:.2f}" width="{max(w - 1, 0.5):.2f}" '
            f'height="{h:.2f}" fill="{color}"><title>{lo:.3g}-{hi:.3g}: {c}</title></rect>'
        )
        if c and bins <= 40:
            body.append(
                f'<text x="{x + w / 2:.2f}" y="{_y(0) - h - 2:.2f}" text-anchor="middle" font-size="8">{_short(c)}</text>'
            )
    svg = _svg(body + _threshold_line(threshold), title, "ITM p(match)", "texts", top, "n")
    return (
        f'<figure class="histogram" data-series="{series}" data-total="{scores.size}">{svg}'
        f"<figcaption>{_e(title)}: {scores.size} scored</figcaption></figure>"
    )


def _keep_rate(scores: dict[str, _Series], threshold: float | None) -> str:
    """Fraction of web texts and of best synthetic captions above each threshold of a grid."""
    grid = np.linspace(0.0, 1.0, KEEP_RATE_GRID)
    body, legend = [], []
    for series in ("web", "synthetic"):
        values = scores[series]
        if not values.size:
            continue
        title, color = SERIES[series]
        # kept: strictly above; as 1 - below / n, the float the whole-ledger page computed
        kept = 1.0 - (values.size - values.above_grid) / values.size
        points = " ".join(f"{_x(t):.2f},{_y(f):.2f}" for t, f in zip(grid.tolist(), kept.tolist()))
        body.append(
            f'<polyline data-series="{series}" points="{points}" fill="none" stroke="{color}" stroke-width="2"/>'
        )
        note = ""
        if threshold is not None:
            at = values.above / values.size
            body.append(
                f'<circle cx="{_x(threshold):.2f}" cy="{_y(at):.2f}" r="4" fill="{color}"><title>{at:.1%}</title></circle>'
            )
            note = f": {at:.1%} kept at threshold {threshold:.3g}"
        legend.append(
            f'<li data-series="{series}" data-kept="{values.above if threshold is not None else ""}" '
            f'data-total="{values.size}"><span style="background:{color}"></span>{_e(title)}{note} '
            f"(n = {values.size})</li>"
        )
    if not body:
        return "<p>No scored texts.</p>"
    svg = _svg(body + _threshold_line(threshold), "keep rate", "threshold", "fraction kept", 1.0, "%")
    return f'<figure class="keep-rate">{svg}<ul class="legend">{"".join(legend)}</ul></figure>'


def _score(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _card(row: dict[str, Any], side: str, image: str | None) -> str:
    """One gallery sample: thumbnail, web text, candidates best first, what was kept and why."""
    picture = (
        f'<img src="{image}" alt="{_e(row["key"])}">'
        if image
        else '<div class="noimg">image unavailable</div>'
    )
    if row["web_text"] is None:
        web = '<p class="web">no web text</p>'
    else:
        cls, mark = ("kept-text", "kept") if row["web_kept"] else ("dropped-text", "dropped")
        web = f'<p class="web {cls}"><b>web</b> {_score(row["web_itm"])} {mark}: {_e(row["web_text"])}</p>'
    kept = set(row["synthetic_kept"] or [])
    items = [
        f'<li class="{"kept-text" if c["text"] in kept else "dropped-text"}">{_score(c["itm"])} '
        f"{'kept' if c['text'] in kept else 'dropped'}: {_e(c['text'])}</li>"
        for c in sorted(row["synthetic"] or [], key=lambda c: -(c["itm"] if c["itm"] is not None else -1.0))
    ]
    synthetic = f'<ol class="synthetic">{"".join(items)}</ol>' if items else ""
    error = f'<p class="error">{_e(row["error_message"])}</p>' if row["error_message"] else ""
    shard = row["shard"] or ""
    return (
        f'<article class="card {side}" data-key="{_e(row["key"])}" data-reason="{_e(row["reason"])}">{picture}'
        f'<p><code>{_e(row["key"])}</code> <span class="reason">{_e(row["reason"])}</span></p>'
        f"{web}{synthetic}{error}"
        f'<p><small title="{_e(shard)}">{_e(Path(shard).name)}</small>'
        f"{' · <small>' + _e(row['url']) + '</small>' if row['url'] else ''}</p></article>"
    )


def _gallery(side: str, rows: list[dict[str, Any]], images: dict[tuple[str, str], str]) -> str:
    if not rows:
        return f"<p>No {side} samples.</p>"
    cards = "".join(_card(r, side, images.get((r["shard"], r["key"]))) for r in rows)
    return f'<div class="gallery" id="gallery-{side}">{cards}</div>'


def _header(job: dict[str, Any], threshold: float | None, keep_fraction: Any, totals: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, list):  # inputs: a big job has thousands
            more = f"<br>… and {len(v) - LIST_SHOWN} more" if len(v) > LIST_SHOWN else ""
            return "<br>".join(f"<code>{_e(x)}</code>" for x in v[:LIST_SHOWN]) + more or "—"
        return "—" if v is None else f"<code>{_e(v)}</code>"

    shown = {**job, "threshold (used)": threshold, "keep_fraction": keep_fraction}
    job_rows = [f"<tr><th>{_e(k)}</th><td>{value(v)}</td></tr>" for k, v in shown.items()]
    total_rows = [
        f'<tr data-total="{_e(k)}"><th>{_e(k)}</th><td class="n">{_e(v)}</td></tr>' for k, v in totals.items()
    ]
    return (
        f'<section id="job"><h2>Job</h2><table>{"".join(job_rows)}</table></section>'
        f'<section id="totals"><h2>Totals</h2><table>{"".join(total_rows)}</table></section>'
    )


def _summary_schema() -> pa.Schema:
    """SUMMARY_COLUMNS as `_read_summary_file` holds them: `synthetic` keeps each candidate's ITM alone,
    `status` and `reason` are dictionaries."""
    fields = []
    for column in dict.fromkeys(c.split(".")[0] for c in SUMMARY_COLUMNS):
        field = LEDGER_SCHEMA.field(column)
        if column == "synthetic":
            field = field.with_type(pa.list_(pa.struct([CANDIDATE_TYPE.field("itm")])))
        elif column in DICTIONARY_COLUMNS:
            field = field.with_type(pa.dictionary(pa.int32(), pa.string()))
        fields.append(field)
    return pa.schema(fields)


def _read_summary_file(path: Path, schema: pa.Schema) -> pa.Table:
    """One ledger file's SUMMARY_COLUMNS. A file the projection does not fit (one written with
    another list layout, or lacking a column) is read whole as `read_ledger` reads it."""
    try:
        table = pq.ParquetFile(path, read_dictionary=DICTIONARY_COLUMNS).read(columns=SUMMARY_COLUMNS)
        if table.column_names == schema.names:
            return table.cast(schema)
    except (pa.ArrowException, KeyError, ValueError, TypeError):
        pass
    try:
        whole = pq.read_table(path, schema=LEDGER_SCHEMA)
    except (pa.ArrowException, OSError) as err:
        raise CapfiltError(f"ledger file {path} cannot be read: {err}") from err
    synthetic = whole["synthetic"].combine_chunks()
    itm = pa.StructArray.from_arrays([pc.struct_field(synthetic.values, "itm")], names=["itm"])
    only_itm = pa.ListArray.from_arrays(synthetic.offsets, itm, mask=synthetic.is_null())
    whole = whole.set_column(whole.schema.get_field_index("synthetic"), "synthetic", only_itm)
    return whole.select(schema.names).cast(schema)


def _whole_rows(files: Sequence[Path], where: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The whole ledger rows at `where` (`_file`, `_row`), in that order; each file read once."""
    wanted: dict[int, list[int]] = {}
    for w in where:
        wanted.setdefault(w["_file"], []).append(w["_row"])
    rows = {}
    for i, at in wanted.items():
        table = pq.read_table(files[i], schema=LEDGER_SCHEMA).take(pa.array(at, pa.int64()))
        rows.update({(i, j): row for j, row in zip(at, table.to_pylist())})
    return [rows[(w["_file"], w["_row"])] for w in where]


def _render(out: Path, gallery_size: int, bins: int) -> str:
    """The report page of the clean job in `out`."""
    files = sorted((out / "ledger").glob("*.parquet"))
    job = _read_json(out / "job.json")
    threshold = _threshold(files, out, job)
    keep_fraction = job.get("keep_fraction", _read_json(out / "threshold.json").get("keep_fraction"))
    totals = _totals(files, bins, threshold)
    if not job and totals.samples:  # no job.json: what the ledger knows
        first = next(i for i, n in enumerate(totals.rows) if n)
        row = _whole_rows(files, [{"_file": first, "_row": 0}])[0]
        job = {k: row[k] for k in ("captioner_id", "filter_id", "seed")}
    scores, samples, kept = totals.series, totals.samples, sum(totals.kept)
    stats = [_read_json(p) for p in sorted((out / "stats").glob("*.json"))]
    summary = {
        "samples": samples,
        "scored samples (status ok)": totals.ok,
        "web texts scored": scores["web"].size,
        "kept web texts": totals.web_kept,
        "kept synthetic captions": totals.synthetic_kept,
        "D' pairs": sum(int(s.get("dprime_pairs", 0)) for s in stats)
        if stats
        else totals.web_kept + totals.synthetic_kept,
        "human pairs in D'": sum(int(s.get("dprime_pairs", 0)) for s in stats if s.get("kind") == "human"),
        "samples with a pair in D'": kept,
        "keep rate": f"{kept / samples:.1%}" if samples else "—",
    }
    histograms = [
        _histogram(s, scores[s], threshold)
        for s in ("web", "synthetic", "candidates")
        if s != "candidates" or scores["candidates"].size > scores["synthetic"].size  # K = 1: same as best
    ]
    kept_rows, rejected_rows = _pick(totals, gallery_size)
    images = _thumbnails(kept_rows + rejected_rows)
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
            f"<title>CapFilt clean report: {_e(out.name)}</title><style>{CSS}</style></head><body>",
            f"<h1>CapFilt clean report</h1><p><code>{_e(out)}</code></p>",
            _header(job, threshold, keep_fraction, summary),
            '<section id="reasons"><h2>Samples by reason</h2>'
            f"{_count_table('reason', _counts(totals.reasons), samples)}</section>",
            '<section id="status"><h2>Samples by status</h2>'
            f"{_count_table('status', _counts(totals.statuses), samples)}</section>",
            f'<section id="scores"><h2>ITM p(match)</h2><div class="charts">{"".join(histograms)}</div></section>',
            f'<section id="keep-rate"><h2>Keep rate against threshold</h2>{_keep_rate(scores, threshold)}</section>',
            f'<section id="kept"><h2>Kept samples</h2>{_gallery("kept", kept_rows, images)}</section>',
            f'<section id="rejected"><h2>Rejected samples</h2>{_gallery("rejected", rejected_rows, images)}</section>',
            "</body></html>",
        ]
    )


def write_report(output: str | Path, *, gallery_size: int = 12, bins: int = 20) -> Path:
    """Write `output/report.html` for the clean job in `output` (atomically); returns its path."""
    out = Path(output)
    if not out.is_dir():
        raise CapfiltError(f"{out} is not a directory: give the output directory of a `capfilt clean` job")
    if bins < 1:
        raise CapfiltError(f"report bins must be >= 1; got {bins}")
    if gallery_size < 0:
        raise CapfiltError(f"report gallery size must be >= 0; got {gallery_size}")
    page = _render(out, gallery_size, bins)
    path = out / REPORT
    tmp = path.with_name(REPORT + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    log.info("wrote %s", path)
    return path
