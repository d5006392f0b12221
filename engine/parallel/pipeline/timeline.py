"""Timeline picture of a simulated schedule: one row per pipeline rank, one box per action.

Plain SVG written by hand (no plotting dependency). F blue, B green, W orange; later virtual
chunks are drawn darker; the number in a box is the micro-batch.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Sequence

from engine.parallel.pipeline.simulator import SimResult

_BASE = {"F": (66, 133, 244), "B": (52, 168, 83), "W": (251, 140, 0)}


def _color(kind: str, chunk: int, vpp: int) -> str:
    r, g, b = _BASE[kind]
    k = 1.0 - 0.45 * (chunk / max(vpp - 1, 1)) if vpp > 1 else 1.0  # darker for later chunks
    return f"rgb({int(r * k)},{int(g * k)},{int(b * k)})"


def timeline_svg(results: Sequence[SimResult], unit_px: float = 18.0, row_px: int = 22) -> str:
    """One panel per result, stacked vertically, on a common time scale."""
    left, gap, title_h = 70, 18, 18
    span = max(r.makespan for r in results)
    width = int(left + span * unit_px + 20)
    parts, y = [], 10
    for res in results:
        s = res.schedule
        label = (f"{s.name}: pp={s.pp} vpp={s.vpp} m={s.num_micro}  makespan={res.makespan:g}  "
                 f"bubble={res.bubble_total:.3f}  peak in-flight/rank={res.peak_in_flight}")
        parts.append(f'<text x="4" y="{y + 13}" font-size="12" font-family="monospace">{escape(label)}</text>')
        y += title_h
        for rank in range(s.pp):
            ry = y + rank * row_px
            parts.append(f'<text x="4" y="{ry + 15}" font-size="11" font-family="monospace">rank {rank}</text>')
            parts.append(f'<rect x="{left}" y="{ry}" width="{res.makespan * unit_px:.1f}" height="{row_px - 2}" '
                         f'fill="#eee"/>')
        for e in res.events:
            x = left + e.start * unit_px
            w = max((e.end - e.start) * unit_px, 0.5)
            ry = y + e.rank * row_px
            fill = _color(e.action.kind, e.action.chunk, s.vpp)
            parts.append(f'<rect x="{x:.1f}" y="{ry}" width="{w:.1f}" height="{row_px - 2}" fill="{fill}" '
                         f'stroke="white" stroke-width="0.5"><title>{escape(repr(e.action))} '
                         f'[{e.start:g}, {e.end:g})</title></rect>')
            if w >= 12:  # room for a label
                parts.append(f'<text x="{x + w / 2:.1f}" y="{ry + 14}" font-size="10" text-anchor="middle" '
                             f'fill="white" font-family="monospace">{e.action.mb}</text>')
        y += s.pp * row_px + gap
    legend = " ".join(f'<rect x="{left + i * 90}" y="{y}" width="12" height="12" fill="{_color(k, 0, 1)}"/>'
                      f'<text x="{left + i * 90 + 16}" y="{y + 11}" font-size="11" font-family="monospace">'
                      f'{name}</text>' for i, (k, name) in enumerate(
                          [("F", "forward"), ("B", "backward"), ("W", "weight-grad")]))
    height = y + 24
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}"><rect width="100%" height="100%" fill="white"/>'
            + "".join(parts) + legend + "</svg>\n")


def write_timeline(results: Sequence[SimResult], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(timeline_svg(results))
    return path
