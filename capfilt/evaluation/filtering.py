"""How well the filter's decisions on web texts match the world's truth.

The positive class is *noisy*: a rejection of a noisy text is a true positive, a rejection of a
clean text a false one. precision = rejected & noisy / rejected, recall = rejected & noisy / noisy.
Each noise type gets its own recall (the fraction of its texts rejected); clean texts get their
false-rejection rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from capfilt.world import NOISE_TYPES

CLEAN = "clean"  # the row name of clean texts in the per-type table


@dataclass(frozen=True)
class TypeRow:
    """One row of the per-type table; `rate` is recall for a noise type, false rejections for clean."""

    noise_type: str
    count: int
    rejected: int

    @property
    def rate(self) -> float:
        return self.rejected / self.count if self.count else 0.0


@dataclass(frozen=True)
class FilterReport:
    """Rejection quality of one set of decisions; ratios are 0.0 where their denominator is 0
    (`to_dict` gives null there, `to_markdown` "n/a")."""

    texts: int  # texts with a decision that the truth knows
    noisy: int
    rejected: int
    true_rejections: int  # rejected and noisy
    by_type: tuple[TypeRow, ...]  # noise types in NOISE_TYPES order (then any others), clean last
    missing: int = 0  # truth rows (of the split evaluated) with no decision; not counted above

    @property
    def precision(self) -> float:
        return self.true_rejections / self.rejected if self.rejected else 0.0

    @property
    def recall(self) -> float:
        return self.true_rejections / self.noisy if self.noisy else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def false_rejection_rate(self) -> float:
        clean = self.texts - self.noisy
        return (self.rejected - self.true_rejections) / clean if clean else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON (summary.json); a ratio with nothing to divide by is null (no
        text rejected, no noisy text, or no clean one), not a 0.0 that reads as the worst filter."""
        clean = self.texts - self.noisy
        return {
            "texts": self.texts,
            "noisy": self.noisy,
            "rejected": self.rejected,
            "true_rejections": self.true_rejections,
            "missing": self.missing,
            "precision": self.precision if self.rejected else None,
            "recall": self.recall if self.noisy else None,
            "f1": self.f1 if self.rejected and self.noisy else None,
            "false_rejection_rate": self.false_rejection_rate if clean else None,
            "by_type": [asdict(row) | {"rate": row.rate} for row in self.by_type],
        }

    def to_markdown(self) -> str:
        """A summary line and the per-type table, for docs/results.md. A ratio with nothing to
        divide by reads "n/a" here (null in `to_dict`): no noisy texts, or none rejected."""

        def ratio(value: float, defined: bool) -> str:
            return f"{value:.3f}" if defined else "n/a"

        lines = [
            f"Web-text rejections: precision {ratio(self.precision, self.rejected > 0)}, "
            f"recall {ratio(self.recall, self.noisy > 0)}, "
            f"F1 {ratio(self.f1, self.rejected > 0 and self.noisy > 0)} "
            f"({self.rejected} of {self.texts} texts rejected, {self.noisy} noisy).",
            "",
            "| text type | texts | rejected | rate |",
            "|---|---:|---:|---:|",
        ]
        for row in self.by_type:
            label = "clean (false rejections)" if row.noise_type == CLEAN else f"{row.noise_type} (recall)"
            lines.append(f"| {label} | {row.count} | {row.rejected} | {row.rate:.3f} |")
        if self.missing:
            lines += ["", f"{self.missing} texts had no decision and are left out."]
        return "\n".join(lines) + "\n"


def _rows(truth: Any) -> Iterable[Mapping[str, Any]]:
    """Rows as mappings from a pyarrow Table, a pandas DataFrame or an iterable of mappings."""
    if hasattr(truth, "to_pylist"):  # pyarrow.Table
        return truth.to_pylist()
    if hasattr(truth, "to_dict") and hasattr(truth, "columns"):  # pandas.DataFrame
        return truth.to_dict("records")
    return truth


def _noise_type(value: Any) -> str | None:
    """Null noise types come back as None from pyarrow and as NaN from pandas."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _noisy(value: Any, key: str) -> bool:
    """The truth's `noisy` flag: a bool (numpy's too) or 0/1; a string such as "False" (a CSV read
    without types) is refused, not read as true."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"truth row {key!r}: noisy must be true or false, got {value!r}")


def filter_report(truth: Any, decisions: Mapping[str, bool], split: str | None = "web") -> FilterReport:
    """Score `decisions` (key -> the web text is kept) against the truth table.

    truth: rows with `key`, `noisy`, `noise_type` (and `split`: only rows of `split` are used when
    the column exists; pass split=None to use every row). A decision on a key the truth does not
    hold is an error; truth rows without a decision are counted as `missing`.
    """
    counts: dict[str, list[int]] = {}  # type -> [texts, rejected]
    seen: set[str] = set()  # keys with a decision
    seen_rows: set[str] = set()
    missing = 0
    for row in _rows(truth):
        if split is not None and "split" in row and row["split"] != split:
            continue
        key = str(row["key"])
        if key in seen_rows:
            raise ValueError(f"the truth holds key {key!r} twice; each text must have one row")
        seen_rows.add(key)
        if key not in decisions:
            missing += 1
            continue
        seen.add(key)
        noisy = _noisy(row["noisy"], key)
        kind = (_noise_type(row["noise_type"]) or "unknown") if noisy else CLEAN
        entry = counts.setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += not decisions[key]
    unknown = [k for k in decisions if k not in seen]
    if unknown:
        raise ValueError(
            f"{len(unknown)} decisions are for keys not in the truth table"
            + (f" split {split!r}" if split else "")
            + f", e.g. {unknown[:3]}; check that the decisions and the truth come from the same world"
        )

    order = [t for t in NOISE_TYPES if t in counts] + sorted(set(counts) - {*NOISE_TYPES, CLEAN})
    order += [CLEAN] if CLEAN in counts else []
    by_type = tuple(TypeRow(t, *counts[t]) for t in order)
    noisy_rows = [r for r in by_type if r.noise_type != CLEAN]
    return FilterReport(
        texts=sum(r.count for r in by_type),
        noisy=sum(r.count for r in noisy_rows),
        rejected=sum(r.rejected for r in by_type),
        true_rejections=sum(r.rejected for r in noisy_rows),
        by_type=by_type,
        missing=missing,
    )
