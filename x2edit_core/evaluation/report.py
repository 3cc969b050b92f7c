"""Evaluation outputs: a CSV of the per-sample records and one self-contained HTML report.

The HTML page needs nothing from the network: thumbnails are inline JPEG data URLs, histograms are
inline SVG, and sorting the tables is a few lines of inline script. Every text from the manifest or
the judge is HTML-escaped.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

__all__ = ["write_csv", "write_html"]

CSV_COLUMNS = (
    ("id", "id"),
    ("task", "task"),
    ("instruction", "instruction"),
    ("l1", "l1"),
    ("l2", "l2"),
    ("clip_i", "clip_i"),
    ("clip_t", "clip_t"),
    ("dino", "dino"),
    ("sc", "sc"),
    ("pq", "pq"),
    ("overall", "overall"),
    ("judge_reason", "judge_reason"),
    ("judge_error", "judge_error"),
    ("source", "source"),
    ("edited", "edited"),
    ("target", "target"),
)
METRIC_LABELS = {
    "l1": ("L1", "lower is better"),
    "l2": ("L2", "lower is better"),
    "clip_i": ("CLIP-I", "higher is better"),
    "clip_t": ("CLIP-T", "higher is better"),
    "dino": ("DINO", "higher is better"),
    "sc": ("SC", "judge: instruction followed, 0-10"),
    "pq": ("PQ", "judge: perceptual quality, 0-10"),
    "overall": ("O", "judge: sqrt(SC*PQ), 0-10"),
}


def _value(record: dict, key: str):
    if key in ("source", "edited", "target"):
        return (record.get("identity") or {}).get(key)
    return record.get(key)


def write_csv(records: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([name for name, _ in CSV_COLUMNS])
        for record in records:
            row = []
            for _, key in CSV_COLUMNS:
                value = _value(record, key)
                row.append("" if value is None else (f"{value:.6g}" if isinstance(value, float) else value))
            writer.writerow(row)


def _thumbnail(path: str | None, side: int) -> str:
    if not path:
        return '<span class="none">—</span>'
    try:
        with Image.open(path) as image:
            image.load()
            picture = image.convert("RGB")
    except (OSError, ValueError):
        return '<span class="none">unreadable</span>'
    picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=72)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" alt="">'


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _sort_value(value) -> str:
    return str(value) if isinstance(value, (int, float)) else ""


def _metrics_present(summary: dict) -> list[str]:
    return [m for m in METRIC_LABELS if summary["all"][m]["count"]]


def _summary_table(title: str, rows: list[tuple[str, dict]], metrics: list[str]) -> str:
    head = "".join(
        f'<th title="{html.escape(METRIC_LABELS[m][1])}">{METRIC_LABELS[m][0]}</th>' for m in metrics
    )
    body = []
    for name, block in rows:
        cells = "".join(
            f'<td data-v="{block[m]["mean"] if block[m]["mean"] is not None else ""}">'
            f"{_fmt(block[m]['mean'])}<small> n={block[m]['count']}</small></td>"
            for m in metrics
        )
        problems = block["judge_errors"] + block["judge_unusable"]
        body.append(
            f'<tr><td class="text">{html.escape(name)}</td>'
            f'<td data-v="{block["samples"]}">{block["samples"]}</td>{cells}'
            f'<td data-v="{problems}">{problems}</td></tr>'
        )
    return (
        f'<h2>{html.escape(title)}</h2><table class="sortable"><thead><tr><th>task</th><th>samples</th>'
        f'{head}<th title="judge errors + unusable answers">judge failed</th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _histogram(metric: str, values: list[float], bins: int = 12) -> str:
    label, hint = METRIC_LABELS[metric]
    width, height, pad = 260, 120, 22
    if metric in ("sc", "pq", "overall"):
        low, high = 0.0, 10.0
    else:
        low, high = min(values), max(values)
        if high - low < 1e-9:
            low, high = low - 0.5, high + 0.5
    counts = [0] * bins
    for value in values:
        index = min(bins - 1, max(0, int((value - low) / (high - low) * bins)))
        counts[index] += 1
    top = max(counts) or 1
    bar_width = (width - 2 * pad) / bins
    bars = []
    for i, count in enumerate(counts):
        bar_height = (height - 2 * pad) * count / top
        x = pad + i * bar_width
        y = height - pad - bar_height
        start = low + (high - low) * i / bins
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_width - 1:.1f}" height="{bar_height:.1f}">'
            f"<title>{start:.3g}–{start + (high - low) / bins:.3g}: {count}</title></rect>"
        )
    mean = sum(values) / len(values)
    return (
        f'<figure><svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{label} histogram">{"".join(bars)}'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" class="axis"/>'
        f'<text x="{pad}" y="{height - 6}">{low:.3g}</text>'
        f'<text x="{width - pad}" y="{height - 6}" text-anchor="end">{high:.3g}</text>'
        f'<text x="{width / 2}" y="14" text-anchor="middle">{label} (mean {mean:.3g}, n={len(values)})</text>'
        f"</svg><figcaption>{html.escape(hint)}</figcaption></figure>"
    )


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse;background:#fff;margin-bottom:8px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right;vertical-align:middle}
th{background:#f0f0f0;cursor:pointer;user-select:none;position:sticky;top:0}
th.asc::after{content:" ▲"}th.desc::after{content:" ▼"}
td.text{text-align:left;max-width:280px}td small{color:#888}
td img{display:block;max-width:160px;max-height:160px}
.none{color:#aaa}.err{color:#b00}
.hist{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:4px}
figcaption{font-size:12px;color:#666;text-align:center}
svg rect{fill:#4a78b8}svg text{font-size:11px;fill:#444}svg .axis{stroke:#888}
.muted{color:#666}
"""

_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(th, col){
    th.addEventListener('click', function(){
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = !th.classList.contains('asc');
      table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
      th.classList.add(asc ? 'asc' : 'desc');
      function key(row){
        var cell = row.cells[col], v = cell.getAttribute('data-v');
        if (v === null) return cell.textContent.toLowerCase();
        return v === '' ? null : parseFloat(v);
      }
      rows.sort(function(a, b){
        var x = key(a), y = key(b);
        if (x === y) return 0; if (x === null) return 1; if (y === null) return -1;
        return (x < y ? -1 : 1) * (asc ? 1 : -1);
      });
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
});
"""


def write_html(
    records: Sequence[dict],
    summary: dict,
    path: Path,
    *,
    thumbnail_side: int = 160,
    title: str = "x2edit-eval",
) -> None:
    metrics = _metrics_present(summary)
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="muted">{len(records)} samples, {len(summary["tasks"])} task(s). Click a column to sort. '
        "L1/L2 on pixels in [0, 1]; CLIP-I, DINO: cosine to the target; CLIP-T: cosine to the caption (or "
        "the instruction); SC/PQ/O: judge scores 0-10, O = sqrt(SC·PQ).</p>",
        _summary_table("Overall", [("all", summary["all"])], metrics),
        _summary_table("Per task", list(summary["tasks"].items()), metrics),
    ]
    histograms = []
    for metric in metrics:
        values = [float(r[metric]) for r in records if isinstance(r.get(metric), (int, float))]
        if values:
            histograms.append(_histogram(metric, values))
    parts.append(f'<h2>Distributions</h2><div class="hist">{"".join(histograms)}</div>')

    head = "".join(
        f'<th title="{html.escape(METRIC_LABELS[m][1])}">{METRIC_LABELS[m][0]}</th>' for m in metrics
    )
    rows = []
    for record in records:
        identity = record.get("identity") or {}
        cells = "".join(
            f'<td data-v="{_sort_value(record.get(m))}">{_fmt(record.get(m))}</td>' for m in metrics
        )
        note = html.escape(record.get("judge_reason") or "")
        if record.get("judge_error"):
            note = f'<span class="err">judge error: {html.escape(record["judge_error"])}</span>'
        elif record.get("judge_unusable"):
            note = f'<span class="err">unusable answer: {html.escape(record["judge_unusable"][:200])}</span>'
        rows.append(
            f'<tr><td class="text">{html.escape(str(record["id"]))}</td>'
            f'<td class="text">{html.escape(str(record.get("task", "")))}</td>'
            f"<td>{_thumbnail(identity.get('source'), thumbnail_side)}</td>"
            f"<td>{_thumbnail(identity.get('edited'), thumbnail_side)}</td>"
            f"<td>{_thumbnail(identity.get('target'), thumbnail_side)}</td>"
            f'<td class="text">{html.escape(record.get("instruction") or "")}</td>{cells}'
            f'<td class="text">{note}</td></tr>'
        )
    parts.append(
        '<h2>Samples</h2><table class="sortable"><thead><tr><th>id</th><th>task</th><th>source</th>'
        f"<th>edited</th><th>target</th><th>instruction</th>{head}<th>judge reason</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    Path(path).write_text("".join(parts), encoding="utf-8")
